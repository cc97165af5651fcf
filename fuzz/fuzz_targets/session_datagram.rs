#![no_main]
use diskcast_proto::receiver::{Receiver, ReceiverConfig};
use diskcast_proto::wire::Packet;
use libfuzzer_sys::fuzz_target;
use std::time::Instant;

fuzz_target!(|data: &[u8]| {
    if let Ok(packet) = Packet::parse(data) {
        assert_eq!(Packet::parse(&packet.emit()), Ok(packet));
    }
    let now = Instant::now();
    let mut receiver = Receiver::new(ReceiverConfig::default(), now);
    receiver.handle_datagram(data, std::net::SocketAddr::from(([10, 0, 0, 1], 7744)), now);
    while receiver.poll_transmit().is_some() || receiver.poll_event().is_some() {}
});
