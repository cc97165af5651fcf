#![no_main]
use diskcast_bootserver::config::{DhcpMode, UefiChain, UefiLoader};
use diskcast_bootserver::dhcp_server::{ChainChooser, DhcpServer, Port, Settings};
use diskcast_bootserver::leases::LeaseTable;
use diskcast_bootserver::subnets::Site;
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
            let network = |a, b, c| {
                diskcast_bootserver::subnets::Ipv4Net::new(Ipv4Addr::new(a, b, c, 0), 24).unwrap()
            };
            let mut link = Site::on_link("eth0", network(10, 0, 0), Ipv4Addr::new(10, 0, 0, 1));
            link.range = Some((Ipv4Addr::new(10, 0, 0, 10), Ipv4Addr::new(10, 0, 0, 20)));
            // Behind a router: what relayed requests (giaddr in 10.0.1.0/24) are answered from.
            let mut relayed = Site::on_link("eth0", network(10, 0, 1), Ipv4Addr::new(10, 0, 0, 1));
            relayed.attached = false;
            relayed.range = Some((Ipv4Addr::new(10, 0, 1, 10), Ipv4Addr::new(10, 0, 1, 20)));
            relayed.router = Some(Ipv4Addr::new(10, 0, 1, 1));
            let settings = Settings {
                mode,
                sites: vec![link, relayed],
                lease_secs: 600,
                uefi_loader: UefiLoader::Snponly,
                http_port: 8080,
                // Both boot chains a UEFI client may be handed.
                uefi_chain: ChainChooser::always(match mode {
                    DhcpMode::Full => UefiChain::Signed,
                    DhcpMode::Proxy => UefiChain::Ipxe,
                }),
            };
            let mut server = DhcpServer::new(settings, LeaseTable::default());
            for port in [Port::Dhcp, Port::PxeBoot] {
                for interface in ["eth0", "eth1"] {
                    let _ = server.handle_on(
                        data,
                        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68),
                        port,
                        interface,
                        1_000,
                    );
                }
            }
        }
    }
);
