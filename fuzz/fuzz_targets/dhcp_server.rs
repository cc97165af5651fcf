#![no_main]
use diskcast_bootserver::config::{DhcpMode, UefiLoader};
use diskcast_bootserver::dhcp_server::{DhcpServer, Port, Settings};
use diskcast_bootserver::leases::LeaseTable;
use libfuzzer_sys::fuzz_target;
use std::net::{Ipv4Addr, SocketAddrV4};

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
        for mode in [DhcpMode::Full, DhcpMode::Proxy] {
            let settings = Settings {
                mode,
                server: Ipv4Addr::new(10, 0, 0, 1),
                range: Some((Ipv4Addr::new(10, 0, 0, 10), Ipv4Addr::new(10, 0, 0, 20))),
                netmask: Ipv4Addr::new(255, 255, 255, 0),
                router: None,
                dns: vec![],
                lease_secs: 600,
                reservations: Default::default(),
                uefi_loader: UefiLoader::Snponly,
                http_port: 8080,
            };
            let mut server = DhcpServer::new(settings, LeaseTable::default());
            for port in [Port::Dhcp, Port::PxeBoot] {
                let _ = server.handle(data, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68), port, 1_000);
            }
        }
    }
);
