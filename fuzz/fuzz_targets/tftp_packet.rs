#![no_main]
use diskcast_bootserver::tftp::packet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match packet::parse(data) {
        // Whatever parses re-emits to bytes that parse to the same packet.
        Ok(parsed) => assert_eq!(packet::parse(&parsed.to_bytes()), Ok(parsed)),
        // A refused request is answered with an ERROR that is itself a valid packet.
        Err(error) if error.is_request() => {
            let reply = packet::error_packet(error.reply_code(), &error.to_string());
            assert!(matches!(
                packet::parse(&reply),
                Ok(packet::Packet::Error { .. })
            ));
        }
        Err(_) => {}
    }
});
