#![no_main]
use diskcast_agent::udp_frame::UdpDatagram;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(datagram) = UdpDatagram::parse(data) {
        let again = datagram.emit();
        assert_eq!(UdpDatagram::parse(&again).map(|d| d.payload), Some(datagram.payload));
    }
});
