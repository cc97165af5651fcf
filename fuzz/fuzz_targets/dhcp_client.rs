#![no_main]
use diskcast_proto::dhcp::DhcpClient;
use libfuzzer_sys::fuzz_target;
use std::time::Instant;

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let mut client = DhcpClient::new([2, 0, 0, 0, 0, 1], 7, now);
    let _ = client.handle(None, now);
    let _ = client.handle(Some(data), now);
});
