#![no_main]
use diskcast_proto::dhcp::DhcpClient;
use libfuzzer_sys::fuzz_target;
use std::time::Instant;

// dhcproto's debug assertions can fire on malformed options; `decode_message` catches that
// panic and counts the packet as malformed, and the agent's and bootserver's panic hooks stay
// quiet for it. libFuzzer's hook aborts on every panic, caught or not, so it gets the same
// exception here: any other panic still aborts and is reported as a crash.
fuzz_target!(
    init: {
        let fuzzer_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !diskcast_proto::dhcp::panic_is_guarded() {
                fuzzer_hook(info)
            }
        }));
    },
    |data: &[u8]| {
        let now = Instant::now();
        let mut client = DhcpClient::new([2, 0, 0, 0, 0, 1], 7, now);
        let _ = client.handle(None, now);
        let _ = client.handle(Some(data), now);
    }
);
