#![no_main]
use diskcast_agent::imaging::receiver::{Receiver, ReceiverConfig};
use diskcast_agent::imaging::wire::Packet;
use libfuzzer_sys::fuzz_target;
use std::time::Instant;

fuzz_target!(|data: &[u8]| {
    if let Ok(packet) = Packet::parse(data) {
        assert_eq!(Packet::parse(&packet.emit()), Ok(packet));
    }
    let mut receiver = Receiver::new(ReceiverConfig::default(), Instant::now());
    let _ = receiver.handle_datagram(data, Instant::now());
});
