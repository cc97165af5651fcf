use super::*;
use crate::subnets::Site;
use dhcproto::v4::{Architecture, Flags};
use dhcproto::Decodable;

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const NOW: u64 = 1_700_000_000;

const RELAY: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);

fn net(text: &str) -> crate::subnets::Ipv4Net {
    text.parse().unwrap()
}

/// br0 with 10.77.0.0/24 (two addresses to hand out and a reservation), 10.78.0.0/24 behind a
/// router that relays (reached through br0), and 10.79.0.0/24 on eth1.
fn settings(mode: DhcpMode) -> Settings {
    let mut link = Site::on_link("br0", net("10.77.0.0/24"), SERVER);
    link.range = Some((Ipv4Addr::new(10, 77, 0, 100), Ipv4Addr::new(10, 77, 0, 101)));
    link.reservations = [(
        "52:54:00:00:00:99".parse().unwrap(),
        Ipv4Addr::new(10, 77, 0, 50),
    )]
    .into();
    let mut relayed = Site::on_link("br0", net("10.78.0.0/24"), SERVER);
    relayed.attached = false;
    relayed.range = Some((Ipv4Addr::new(10, 78, 0, 100), Ipv4Addr::new(10, 78, 0, 101)));
    relayed.router = Some(RELAY);
    relayed.dns = vec![Ipv4Addr::new(10, 78, 0, 53)];
    let mut other = Site::on_link("eth1", net("10.79.0.0/24"), Ipv4Addr::new(10, 79, 0, 1));
    other.range = Some((Ipv4Addr::new(10, 79, 0, 100), Ipv4Addr::new(10, 79, 0, 109)));
    Settings {
        mode,
        sites: vec![link, relayed, other],
        lease_secs: 600,
        uefi_loader: UefiLoader::Snponly,
        http_port: 8080,
        uefi_chain: ChainChooser::default(),
    }
}

fn mac(n: u8) -> [u8; 6] {
    [0x52, 0x54, 0, 0, 0, n]
}

#[derive(Clone, Copy)]
enum Who {
    Bios,
    Uefi,
    Ipxe,
    /// UEFI HTTP boot (OVMF's HttpBootDxe).
    Http,
    Agent,
    Plain,
}

fn packet(who: Who, n: u8, kind: MessageType, extra: Vec<DhcpOption>) -> Vec<u8> {
    let z = Ipv4Addr::UNSPECIFIED;
    let mut msg = Message::new_with_id(0x1000 + u32::from(n), z, z, z, z, &mac(n));
    msg.set_flags(Flags::default().set_broadcast());
    let opts = msg.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    let pxe = |arch: u16| {
        vec![
            DhcpOption::ClassIdentifier(
                format!("PXEClient:Arch:{arch:05}:UNDI:003000").into_bytes(),
            ),
            DhcpOption::ClientSystemArchitecture(Architecture(arch)),
        ]
    };
    let who_opts = match who {
        Who::Bios => pxe(0),
        Who::Uefi => pxe(7),
        Who::Ipxe => [pxe(0), vec![DhcpOption::UserClass(b"iPXE".to_vec())]].concat(),
        Who::Http => vec![
            DhcpOption::ClassIdentifier(b"HTTPClient:Arch:00016:UNDI:003000".to_vec()),
            DhcpOption::ClientSystemArchitecture(Architecture(16)),
        ],
        Who::Agent => vec![DhcpOption::ClassIdentifier(b"diskcast-agent".to_vec())],
        Who::Plain => vec![],
    };
    for opt in who_opts.into_iter().chain(extra) {
        opts.insert(opt);
    }
    msg.to_vec().unwrap()
}

fn from() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68)
}

fn reply_of(handled: &Handled) -> Message {
    Message::from_bytes(&handled.reply.as_ref().expect("a reply").payload).unwrap()
}

fn full_exchange(server: &mut DhcpServer, who: Who, n: u8) -> Message {
    let offer = reply_of(&server.handle(
        &packet(who, n, MessageType::Discover, vec![]),
        from(),
        Port::Dhcp,
        NOW,
    ));
    assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
    let request = packet(
        who,
        n,
        MessageType::Request,
        vec![
            DhcpOption::RequestedIpAddress(offer.yiaddr()),
            DhcpOption::ServerIdentifier(SERVER),
        ],
    );
    let handled = server.handle(&request, from(), Port::Dhcp, NOW);
    assert!(matches!(
        handled.lease_change,
        Some(LeaseChange::Granted { lease, .. }) if lease.address == offer.yiaddr()
    ));
    let ack = reply_of(&handled);
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(ack.yiaddr(), offer.yiaddr());
    ack
}

#[test]
fn bios_pxe_gets_undionly_with_pxe_options() {
    let mut server = DhcpServer::new(settings(DhcpMode::Full), LeaseTable::default());
    let ack = full_exchange(&mut server, Who::Bios, 1);
    assert_eq!(
        ack.fname_str().unwrap().unwrap().trim_end_matches('\0'),
        "undionly.kpxe"
    );
    assert_eq!(ack.siaddr(), SERVER);
    assert_eq!(
        ack.opts().get(OptionCode::ClassIdentifier),
        Some(&DhcpOption::ClassIdentifier(b"PXEClient".to_vec()))
    );
    assert_eq!(
        ack.opts().get(OptionCode::VendorExtensions),
        Some(&DhcpOption::VendorExtensions(vec![6, 1, 8, 255]))
    );
    assert_eq!(ack.yiaddr(), Ipv4Addr::new(10, 77, 0, 100));
    assert_eq!(server.leases.leases["52:54:00:00:00:01"].expires, NOW + 600);
}

#[test]
fn uefi_gets_the_configured_loader_and_ipxe_gets_its_script() {
    let mut server = DhcpServer::new(settings(DhcpMode::Full), LeaseTable::default());
    let ack = full_exchange(&mut server, Who::Uefi, 1);
    assert_eq!(
        ack.fname_str().unwrap().unwrap().trim_end_matches('\0'),
        "snponly.efi"
    );
    // The same machine, now running iPXE: the script, and no waiting for proxy offers.
    let ack = full_exchange(&mut server, Who::Ipxe, 1);
    assert_eq!(
        ack.fname_str().unwrap().unwrap().trim_end_matches('\0'),
        "http://10.77.0.1:8080/boot/52-54-00-00-00-01.ipxe"
    );
    assert_eq!(
        ack.opts().get(OptionCode::from(175)),
        Some(&DhcpOption::Unknown(UnknownOption::new(
            OptionCode::from(175),
            vec![176, 1, 1]
        )))
    );
    assert_eq!(
        ack.yiaddr(),
        Ipv4Addr::new(10, 77, 0, 100),
        "same machine, same address"
    );
}

fn boot_file_of(message: &Message) -> String {
    message
        .fname_str()
        .unwrap()
        .unwrap()
        .trim_end_matches('\0')
        .to_string()
}

#[test]
fn secure_boot_machines_get_shim_and_the_others_ipxe() {
    let mut settings = settings(DhcpMode::Full);
    let signed: MacAddr = "52:54:00:00:00:02".parse().unwrap();
    settings.uefi_chain = ChainChooser::new(move |mac| {
        if mac == signed {
            UefiChain::Signed
        } else {
            UefiChain::Ipxe
        }
    });
    let mut server = DhcpServer::new(settings, LeaseTable::default());
    assert_eq!(
        boot_file_of(&full_exchange(&mut server, Who::Uefi, 1)),
        "snponly.efi"
    );
    let ack = full_exchange(&mut server, Who::Uefi, 2);
    assert_eq!(boot_file_of(&ack), SHIM_BOOT_FILE);
    assert_eq!(
        ack.opts().get(OptionCode::ClassIdentifier),
        Some(&DhcpOption::ClassIdentifier(b"PXEClient".to_vec()))
    );
    // BIOS machines have no Secure Boot: always iPXE.
    assert_eq!(
        boot_file_of(&full_exchange(&mut server, Who::Bios, 2)),
        "undionly.kpxe"
    );
}

#[test]
fn http_boot_clients_get_a_url_and_the_http_client_class() {
    for mode in [DhcpMode::Full, DhcpMode::Proxy] {
        let mut server = DhcpServer::new(settings(mode), LeaseTable::default());
        let handled = server.handle(
            &packet(Who::Http, 1, MessageType::Discover, vec![]),
            from(),
            Port::Dhcp,
            NOW,
        );
        assert_eq!(
            handled.seen.map(|s| s.kind),
            Some(ClientKind::Http(Arch::Uefi64))
        );
        let offer = reply_of(&handled);
        assert_eq!(
            boot_file_of(&offer),
            "http://10.77.0.1:8080/boot/snponly.efi",
            "{mode:?}"
        );
        assert_eq!(
            offer.opts().get(OptionCode::BootfileName),
            Some(&DhcpOption::BootfileName(
                b"http://10.77.0.1:8080/boot/snponly.efi".to_vec()
            ))
        );
        assert_eq!(
            offer.opts().get(OptionCode::ClassIdentifier),
            Some(&DhcpOption::ClassIdentifier(b"HTTPClient".to_vec()))
        );
    }
}

#[test]
fn agent_gets_an_address_and_no_boot_file() {
    let mut server = DhcpServer::new(settings(DhcpMode::Full), LeaseTable::default());
    let ack = full_exchange(&mut server, Who::Agent, 1);
    assert_eq!(ack.fname(), None);
    assert!(ack.opts().get(OptionCode::BootfileName).is_none());
}

#[test]
fn reservations_leases_after_restart_and_exhaustion() {
    let mut server = DhcpServer::new(settings(DhcpMode::Full), LeaseTable::default());
    assert_eq!(
        full_exchange(&mut server, Who::Plain, 0x99).yiaddr(),
        Ipv4Addr::new(10, 77, 0, 50)
    );
    let first = full_exchange(&mut server, Who::Plain, 1).yiaddr();
    let second = full_exchange(&mut server, Who::Plain, 2).yiaddr();
    assert_ne!(first, second);
    // The range holds two addresses: a third machine gets no offer.
    let handled = server.handle(
        &packet(Who::Plain, 3, MessageType::Discover, vec![]),
        from(),
        Port::Dhcp,
        NOW,
    );
    assert!(handled.reply.is_none());
    assert!(handled.summary.unwrap().contains("exhausted"));
    // A restarted server with the saved table gives each machine its address back.
    let mut restarted = DhcpServer::new(settings(DhcpMode::Full), server.leases.clone());
    assert_eq!(
        full_exchange(&mut restarted, Who::Plain, 2).yiaddr(),
        second
    );
    assert_eq!(full_exchange(&mut restarted, Who::Plain, 1).yiaddr(), first);
}

#[test]
fn wrong_address_is_naked_and_other_servers_requests_ignored() {
    let mut server = DhcpServer::new(settings(DhcpMode::Full), LeaseTable::default());
    let wrong = packet(
        Who::Plain,
        1,
        MessageType::Request,
        vec![DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 77, 0, 7))],
    );
    let nak = reply_of(&server.handle(&wrong, from(), Port::Dhcp, NOW));
    assert_eq!(nak.opts().msg_type(), Some(MessageType::Nak));
    let elsewhere = packet(
        Who::Plain,
        1,
        MessageType::Request,
        vec![
            DhcpOption::RequestedIpAddress(Ipv4Addr::new(192, 168, 1, 7)),
            DhcpOption::ServerIdentifier(Ipv4Addr::new(192, 168, 1, 1)),
        ],
    );
    assert!(server
        .handle(&elsewhere, from(), Port::Dhcp, NOW)
        .reply
        .is_none());
    assert_eq!(server.stats.naks, 1);
}

#[test]
fn proxy_mode_answers_boot_clients_only_and_gives_no_address() {
    let mut server = DhcpServer::new(settings(DhcpMode::Proxy), LeaseTable::default());
    let offer = reply_of(&server.handle(
        &packet(Who::Bios, 1, MessageType::Discover, vec![]),
        from(),
        Port::Dhcp,
        NOW,
    ));
    assert_eq!(offer.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(
        offer.fname_str().unwrap().unwrap().trim_end_matches('\0'),
        "undionly.kpxe"
    );
    assert!(offer.opts().get(OptionCode::AddressLeaseTime).is_none());
    assert!(server
        .handle(
            &packet(Who::Plain, 2, MessageType::Discover, vec![]),
            from(),
            Port::Dhcp,
            NOW
        )
        .reply
        .is_none());
    assert!(server
        .handle(
            &packet(Who::Agent, 3, MessageType::Discover, vec![]),
            from(),
            Port::Dhcp,
            NOW
        )
        .reply
        .is_none());
    // The lab server's REQUEST on port 67 is not ours.
    let request = packet(
        Who::Ipxe,
        1,
        MessageType::Request,
        vec![DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 77, 0, 2))],
    );
    assert!(server
        .handle(&request, from(), Port::Dhcp, NOW)
        .reply
        .is_none());
    // Port 4011: the boot file, straight back to the client.
    let client = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 120), 68);
    let handled = server.handle(
        &packet(Who::Ipxe, 1, MessageType::Request, vec![]),
        client,
        Port::PxeBoot,
        NOW,
    );
    assert_eq!(
        handled.reply.as_ref().unwrap().to,
        Destination::Unicast(client)
    );
    let ack = reply_of(&handled);
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(
        ack.fname_str().unwrap().unwrap().trim_end_matches('\0'),
        "http://10.77.0.1:8080/boot/52-54-00-00-00-01.ipxe"
    );
    assert!(server.leases.leases.is_empty());
}

#[test]
fn garbage_never_panics_and_is_counted() {
    let mut server = DhcpServer::new(settings(DhcpMode::Full), LeaseTable::default());
    let valid = packet(Who::Uefi, 1, MessageType::Discover, vec![]);
    let mut state: u64 = 0x9e3779b97f4a7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..20_000 {
        let mut bytes = valid.clone();
        if round % 2 == 0 {
            bytes.truncate((next() % valid.len() as u64) as usize);
        }
        for _ in 0..(next() % 8) {
            let i = (next() % bytes.len().max(1) as u64) as usize;
            if let Some(b) = bytes.get_mut(i) {
                *b = next() as u8;
            }
        }
        let _ = server.handle(&bytes, from(), Port::Dhcp, NOW);
    }
    assert!(server.stats.malformed > 0);
}

/// DHCPDISCOVERs captured from the QEMU lab (pxe_uefi_ovmf): OVMF's own PXE client, then
/// snponly.efi (iPXE), then the agent.
fn captured(hex: &str) -> Vec<u8> {
    let hex = hex.trim();
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn captured_ovmf_ipxe_and_agent_discovers_get_the_right_answers() {
    let mut server = DhcpServer::new(settings(DhcpMode::Full), LeaseTable::default());
    let cases = [
        (
            include_str!("captured/ovmf_pxe_discover.hex"),
            Some("snponly.efi"),
        ),
        (
            include_str!("captured/ipxe_efi_discover.hex"),
            Some("http://10.77.0.1:8080/boot/52-54-00-dc-00-01.ipxe"),
        ),
        (include_str!("captured/agent_discover.hex"), None),
    ];
    for (hex, file) in cases {
        let request = captured(hex);
        let handled = server.handle(&request, from(), Port::Dhcp, NOW);
        let offer = reply_of(&handled);
        assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
        assert_eq!(offer.chaddr()[..6], [0x52, 0x54, 0, 0xdc, 0, 1]);
        let got = offer
            .fname_str()
            .map(|f| f.unwrap().trim_end_matches('\0').to_string());
        assert_eq!(got.as_deref(), file, "{:?}", handled.summary);
    }
    // The same machine gets the same address at every stage.
    assert_eq!(server.offers.len(), 1);
}

#[test]
fn packets_without_the_magic_cookie_or_too_long_are_dropped() {
    let mut server = DhcpServer::new(settings(DhcpMode::Full), LeaseTable::default());
    let mut discover = packet(Who::Bios, 1, MessageType::Discover, vec![]);
    assert!(server
        .handle(&discover, from(), Port::Dhcp, NOW)
        .reply
        .is_some());
    discover[236] ^= 0xff;
    let handled = server.handle(&discover, from(), Port::Dhcp, NOW);
    assert!(handled.reply.is_none() && handled.summary.unwrap().contains("magic cookie"));
    let mut long = packet(Who::Bios, 2, MessageType::Discover, vec![]);
    long.resize(MAX_MESSAGE, 0);
    assert!(server
        .handle(&long, from(), Port::Dhcp, NOW)
        .reply
        .is_none());
    assert_eq!(server.stats.malformed, 2);
}

#[test]
fn no_lease_for_hardware_addresses_no_nic_has() {
    let mut server = DhcpServer::new(settings(DhcpMode::Full), LeaseTable::default());
    for hardware in [[0u8; 6], [0xff; 6], [0x01, 0x00, 0x5e, 0, 0, 1]] {
        let z = Ipv4Addr::UNSPECIFIED;
        let mut msg = Message::new_with_id(7, z, z, z, z, &hardware);
        msg.opts_mut()
            .insert(DhcpOption::MessageType(MessageType::Discover));
        let handled = server.handle(&msg.to_vec().unwrap(), from(), Port::Dhcp, NOW);
        assert!(handled.reply.is_none(), "{hardware:?} got an answer");
    }
    assert!(server.leases.leases.is_empty());
}

#[test]
fn only_the_holder_releases_and_a_declined_address_stays_out_of_the_pool() {
    let mut server = DhcpServer::new(settings(DhcpMode::Full), LeaseTable::default());
    let address = full_exchange(&mut server, Who::Plain, 1).yiaddr();
    // A RELEASE for machine 1's MAC that names another address: not from the holder.
    let z = Ipv4Addr::UNSPECIFIED;
    let release = |ciaddr: Ipv4Addr| {
        let mut msg = Message::new_with_id(9, ciaddr, z, z, z, &mac(1));
        msg.opts_mut()
            .insert(DhcpOption::MessageType(MessageType::Release));
        msg.to_vec().unwrap()
    };
    let forged = server.handle(
        &release(Ipv4Addr::new(10, 77, 0, 1)),
        from(),
        Port::Dhcp,
        NOW,
    );
    assert!(forged.lease_change.is_none());
    assert!(server.leases.leases.contains_key("52:54:00:00:00:01"));
    let real = server.handle(&release(address), from(), Port::Dhcp, NOW);
    assert!(matches!(
        real.lease_change,
        Some(LeaseChange::Released { .. })
    ));
    assert!(server.leases.leases.is_empty());

    // Machine 2 takes an address, finds it in use, declines it: nobody gets it for a while.
    let taken = full_exchange(&mut server, Who::Plain, 2).yiaddr();
    let decline = packet(
        Who::Plain,
        2,
        MessageType::Decline,
        vec![DhcpOption::RequestedIpAddress(taken)],
    );
    let handled = server.handle(&decline, from(), Port::Dhcp, NOW);
    assert!(matches!(
        handled.lease_change,
        Some(LeaseChange::Declined { address, .. }) if address == taken
    ));
    // The range holds two addresses: machine 2 gets the other one, and with both out of the
    // pool (one leased, one declined) a third machine gets nothing.
    let next = full_exchange(&mut server, Who::Plain, 2).yiaddr();
    assert_ne!(next, taken);
    let third = server.handle(
        &packet(Who::Plain, 3, MessageType::Discover, vec![]),
        from(),
        Port::Dhcp,
        NOW,
    );
    assert!(third.reply.is_none());
    // An hour later the declined address is back.
    let later = NOW + DECLINE_HOLD_SECS + 1;
    let offer = reply_of(&server.handle(
        &packet(Who::Plain, 3, MessageType::Discover, vec![]),
        from(),
        Port::Dhcp,
        later,
    ));
    assert_eq!(offer.yiaddr(), taken);
    // A DECLINE for an address the client was never given changes nothing.
    let stray = packet(
        Who::Plain,
        4,
        MessageType::Decline,
        vec![DhcpOption::RequestedIpAddress(next)],
    );
    assert!(server
        .handle(&stray, from(), Port::Dhcp, NOW)
        .lease_change
        .is_none());
}

#[test]
fn an_ack_whose_lease_cannot_be_saved_is_not_sent() {
    // A real full disk: the registry on a tiny tmpfs, filled up.
    let disk = crate::testing::TinyFs::mount("leases", "512k");
    let registry = diskcast_registry::Registry::open_in(disk.path()).unwrap();
    let filler = disk.fill();

    let mut server = DhcpServer::new(settings(DhcpMode::Full), LeaseTable::default());
    let offer = reply_of(&server.handle(
        &packet(Who::Plain, 1, MessageType::Discover, vec![]),
        from(),
        Port::Dhcp,
        NOW,
    ));
    let request = packet(
        Who::Plain,
        1,
        MessageType::Request,
        vec![
            DhcpOption::RequestedIpAddress(offer.yiaddr()),
            DhcpOption::ServerIdentifier(SERVER),
        ],
    );
    let save = |change: &LeaseChange| match change {
        LeaseChange::Granted { mac, lease } => registry.put_lease(
            diskcast_registry::Lease {
                mac: *mac,
                address: lease.address,
                expires: lease.expires,
            },
            NOW,
        ),
        _ => Ok(()),
    };
    let handled = server.handle(&request, from(), Port::Dhcp, NOW);
    let full = crate::serve::answer_after_saving(handled, save);
    // Room again: the client's next REQUEST is answered.
    std::fs::remove_file(&filler).unwrap();
    let handled = server.handle(&request, from(), Port::Dhcp, NOW);
    let room = crate::serve::answer_after_saving(handled, save);
    drop(registry);
    assert!(
        full.is_none(),
        "an ACK was sent for a lease the disk could not hold"
    );
    assert!(room.is_some());
}

/// `bytes` as a relay agent forwards it: `giaddr` set, option 82 appended when given.
fn relayed(bytes: &[u8], giaddr: Ipv4Addr, agent_information: Option<&[u8]>) -> Vec<u8> {
    let mut msg = Message::from_bytes(bytes).unwrap();
    msg.set_giaddr(giaddr);
    msg.set_hops(1);
    let mut bytes = msg.to_vec().unwrap();
    // By hand: dhcproto 0.15 encodes an option 82 given as raw bytes twice.
    if let Some(info) = agent_information {
        let end = bytes.iter().rposition(|&b| b == 255).unwrap();
        let option = [&[82, info.len() as u8][..], info].concat();
        bytes.splice(end..end, option);
    }
    bytes
}

fn relay_from() -> SocketAddrV4 {
    SocketAddrV4::new(RELAY, 67)
}

/// Sub-option 1 (circuit id "eth1") and 2 (remote id), as a relay such as dhcrelay adds them.
const AGENT_INFORMATION: &[u8] = &[1, 4, b'e', b't', b'h', b'1', 2, 3, 0xaa, 0xbb, 0xcc];

#[test]
fn a_relayed_request_is_answered_from_its_subnets_pool_unicast_to_the_relay() {
    let mut server = DhcpServer::new(settings(DhcpMode::Full), LeaseTable::default());
    let discover = relayed(
        &packet(Who::Ipxe, 7, MessageType::Discover, vec![]),
        RELAY,
        Some(AGENT_INFORMATION),
    );
    let handled = server.handle(&discover, relay_from(), Port::Dhcp, NOW);
    let reply = handled.reply.as_ref().expect("an offer");
    assert_eq!(reply.to, Destination::Unicast(SocketAddrV4::new(RELAY, 67)));
    // Option 82 comes back byte for byte, as the last option.
    assert_eq!(
        raw_option(&reply.payload, 82).as_deref(),
        Some(AGENT_INFORMATION)
    );
    let end = reply.payload.iter().rposition(|&b| b == 255).unwrap();
    assert_eq!(
        &reply.payload[end - AGENT_INFORMATION.len() - 2..end],
        [&[82, AGENT_INFORMATION.len() as u8][..], AGENT_INFORMATION].concat()
    );
    let offer = reply_of(&handled);
    assert_eq!(offer.yiaddr(), Ipv4Addr::new(10, 78, 0, 100));
    assert_eq!(offer.giaddr(), RELAY);
    assert_eq!(offer.siaddr(), SERVER, "TFTP through the router");
    assert_eq!(
        offer.opts().get(OptionCode::Router),
        Some(&DhcpOption::Router(vec![RELAY]))
    );
    assert_eq!(
        offer.opts().get(OptionCode::DomainNameServer),
        Some(&DhcpOption::DomainNameServer(vec![Ipv4Addr::new(
            10, 78, 0, 53
        )]))
    );
    assert_eq!(
        offer.fname_str().unwrap().unwrap().trim_end_matches('\0'),
        "http://10.77.0.1:8080/boot/52-54-00-00-00-07.ipxe"
    );
    assert!(handled.summary.unwrap().contains("via relay 10.78.0.1"));
    let request = relayed(
        &packet(
            Who::Ipxe,
            7,
            MessageType::Request,
            vec![
                DhcpOption::RequestedIpAddress(offer.yiaddr()),
                DhcpOption::ServerIdentifier(SERVER),
            ],
        ),
        RELAY,
        Some(AGENT_INFORMATION),
    );
    let handled = server.handle(&request, relay_from(), Port::Dhcp, NOW);
    assert!(matches!(
        handled.lease_change,
        Some(LeaseChange::Granted { lease, .. }) if lease.address == Ipv4Addr::new(10, 78, 0, 100)
    ));
    let reply = handled.reply.as_ref().unwrap();
    assert_eq!(reply.to, Destination::Unicast(SocketAddrV4::new(RELAY, 67)));
    assert_eq!(reply_of(&handled).opts().msg_type(), Some(MessageType::Ack));
    // A request for an address of the server's own link, relayed from the far subnet: NAK,
    // to the relay, flagged for broadcast (the client has no address yet).
    let mut wrong = Message::from_bytes(&request).unwrap();
    wrong
        .opts_mut()
        .insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(
            10, 77, 0, 100,
        )));
    wrong.set_flags(Flags::default());
    let handled = server.handle(&wrong.to_vec().unwrap(), relay_from(), Port::Dhcp, NOW);
    let nak = reply_of(&handled);
    assert_eq!(nak.opts().msg_type(), Some(MessageType::Nak));
    assert!(nak.flags().broadcast());
    assert_eq!(
        handled.reply.unwrap().to,
        Destination::Unicast(SocketAddrV4::new(RELAY, 67))
    );
}

#[test]
fn a_relayed_request_from_an_unknown_subnet_is_logged_and_ignored() {
    let mut server = DhcpServer::new(settings(DhcpMode::Full), LeaseTable::default());
    for giaddr in [Ipv4Addr::new(192, 168, 5, 1), Ipv4Addr::new(10, 77, 1, 1)] {
        let discover = relayed(
            &packet(Who::Bios, 8, MessageType::Discover, vec![]),
            giaddr,
            None,
        );
        let handled = server.handle(&discover, SocketAddrV4::new(giaddr, 67), Port::Dhcp, NOW);
        assert!(handled.reply.is_none(), "answered from another pool");
        let summary = handled.summary.expect("logged");
        assert!(summary.contains(&giaddr.to_string()), "{summary}");
        assert!(summary.contains("no configured subnet"), "{summary}");
    }
    // The known far subnet's relay, but on an interface that does not lead there.
    let discover = relayed(
        &packet(Who::Bios, 8, MessageType::Discover, vec![]),
        RELAY,
        None,
    );
    let handled = server.handle_on(&discover, relay_from(), Port::Dhcp, "eth1", NOW);
    assert!(handled.reply.is_none());
    assert!(handled.summary.unwrap().contains("arrived on eth1"));
    assert_eq!(server.stats.unknown_relay, 3);
    assert!(server.offers.is_empty() && server.leases.leases.is_empty());
}

#[test]
fn each_interface_answers_from_its_own_subnet_with_its_own_address() {
    let mut server = DhcpServer::new(settings(DhcpMode::Full), LeaseTable::default());
    let handled = server.handle_on(
        &packet(Who::Ipxe, 9, MessageType::Discover, vec![]),
        from(),
        Port::Dhcp,
        "eth1",
        NOW,
    );
    let offer = reply_of(&handled);
    assert_eq!(handled.reply.as_ref().unwrap().to, Destination::Broadcast);
    assert_eq!(offer.yiaddr(), Ipv4Addr::new(10, 79, 0, 100));
    assert_eq!(offer.siaddr(), Ipv4Addr::new(10, 79, 0, 1));
    assert_eq!(
        offer.opts().get(OptionCode::ServerIdentifier),
        Some(&DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 79, 0, 1)))
    );
    assert_eq!(
        offer.fname_str().unwrap().unwrap().trim_end_matches('\0'),
        "http://10.79.0.1:8080/boot/52-54-00-00-00-09.ipxe"
    );
    // The machine moves to the server's first link: an address from there, not its old one.
    let ack = full_exchange(&mut server, Who::Ipxe, 9);
    assert_eq!(ack.yiaddr(), Ipv4Addr::new(10, 77, 0, 100));
    // An interface with no subnet of its own answers nobody.
    let stray = server.handle_on(
        &packet(Who::Bios, 10, MessageType::Discover, vec![]),
        from(),
        Port::Dhcp,
        "eth2",
        NOW,
    );
    assert!(stray.reply.is_none());
    assert!(stray.summary.unwrap().contains("no subnet of its own"));
}

#[test]
fn proxy_mode_answers_relayed_pxe_clients_through_their_relay() {
    let mut server = DhcpServer::new(settings(DhcpMode::Proxy), LeaseTable::default());
    let discover = relayed(
        &packet(Who::Uefi, 11, MessageType::Discover, vec![]),
        RELAY,
        Some(AGENT_INFORMATION),
    );
    let handled = server.handle(&discover, relay_from(), Port::Dhcp, NOW);
    let reply = handled.reply.as_ref().expect("a proxy offer");
    assert_eq!(reply.to, Destination::Unicast(SocketAddrV4::new(RELAY, 67)));
    assert_eq!(
        raw_option(&reply.payload, 82).as_deref(),
        Some(AGENT_INFORMATION)
    );
    let offer = reply_of(&handled);
    assert_eq!(offer.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(offer.siaddr(), SERVER);
    assert_eq!(
        offer.fname_str().unwrap().unwrap().trim_end_matches('\0'),
        "snponly.efi"
    );
    // Its boot server request on port 4011 comes routed, from its own address.
    let client = SocketAddrV4::new(Ipv4Addr::new(10, 78, 0, 120), 68);
    let ack = server.handle(
        &packet(Who::Ipxe, 11, MessageType::Request, vec![]),
        client,
        Port::PxeBoot,
        NOW,
    );
    assert_eq!(ack.reply.as_ref().unwrap().to, Destination::Unicast(client));
    assert!(server.leases.leases.is_empty());
}
