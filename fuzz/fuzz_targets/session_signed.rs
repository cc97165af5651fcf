#![no_main]
//! A receiver that trusts one key and joined its sender's signed session, fed whatever comes
//! from the sender's own address (what a host forging that address can send).
use diskcast_proto::manifest::Manifest;
use diskcast_proto::receiver::{Receiver, ReceiverConfig};
use diskcast_proto::sender::{ChunkSource, Sender, SenderConfig};
use diskcast_proto::trust::{SigningKey, Trust};
use libfuzzer_sys::fuzz_target;
use std::net::SocketAddr;
use std::time::Instant;

struct Zeros;
impl ChunkSource for Zeros {
    fn chunk(&mut self, _: u32) -> std::io::Result<&[u8]> {
        Ok(&[1u8; 8192])
    }
}

fuzz_target!(|data: &[u8]| {
    let key = SigningKey::from_seed([3; 32]);
    let sender_at = SocketAddr::from(([10, 0, 0, 1], 40000));
    let now = Instant::now();
    let image = vec![1u8; 16384];
    let manifest = Manifest::scan(&mut &image[..], image.len() as u64, 8192, |_| {}).unwrap();
    let mut sender = Sender::new(
        SenderConfig {
            signing_key: Some(key.clone()),
            address: sender_at,
            ..SenderConfig::default()
        },
        manifest,
        now,
    );
    let mut receiver = Receiver::new(
        ReceiverConfig {
            trust: Trust::Keys(vec![key.public()]),
            ..ReceiverConfig::default()
        },
        now,
    );
    if let Some(announce) = sender.poll_transmit(now, &mut Zeros) {
        receiver.handle_datagram(&announce.bytes, sender_at, now);
    }
    for piece in data.split(|&b| b == 0xff).take(16) {
        receiver.handle_datagram(piece, sender_at, now);
        while receiver.poll_transmit().is_some() || receiver.poll_event().is_some() {}
    }
});
