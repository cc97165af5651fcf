//! Who is asking: PXE firmware (BIOS or UEFI), UEFI HTTP boot firmware, iPXE, the diskcast agent,
//! or any other client. Decided from options 60 (vendor class), 77 (user class), 93
//! (architecture) and 175 (iPXE).

use dhcproto::v4::{DhcpOption, Message, OptionCode};
use std::fmt;

/// The firmware's architecture from option 93 (RFC 4578, IANA "Processor Architecture Types").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Bios,
    Uefi64,
    Other(u16),
}

impl Arch {
    pub fn from_code(code: u16) -> Self {
        match code {
            0 => Self::Bios,
            // 16: x86-64 UEFI HTTP boot (RFC 4578's registry, "x64 UEFI HTTP").
            7 | 9 | 16 => Self::Uefi64,
            other => Self::Other(other),
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bios => f.write_str("bios"),
            Self::Uefi64 => f.write_str("uefi-x64"),
            Self::Other(code) => write!(f, "arch-{code}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    /// Firmware PXE client: gets an iPXE binary over TFTP.
    Pxe(Arch),
    /// iPXE (ours, chainloaded, or a NIC ROM): gets the per-machine script over HTTP.
    Ipxe(Arch),
    /// UEFI HTTP boot firmware (vendor class `HTTPClient`): gets the URL of an EFI loader, no
    /// TFTP at all.
    Http(Arch),
    /// The diskcast agent inside the initramfs: an address, nothing to boot.
    Agent,
    /// Anything else: an address in full mode, nothing in proxy mode.
    Other,
}

impl ClientKind {
    pub fn wants_boot(self) -> bool {
        matches!(self, Self::Pxe(_) | Self::Ipxe(_) | Self::Http(_))
    }
}

impl fmt::Display for ClientKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pxe(arch) => write!(f, "pxe/{arch}"),
            Self::Ipxe(arch) => write!(f, "ipxe/{arch}"),
            Self::Http(arch) => write!(f, "http/{arch}"),
            Self::Agent => f.write_str("agent"),
            Self::Other => f.write_str("other"),
        }
    }
}

const IPXE_ENCAPSULATED: u8 = 175;

pub fn vendor_class(msg: &Message) -> &[u8] {
    match msg.opts().get(OptionCode::ClassIdentifier) {
        Some(DhcpOption::ClassIdentifier(class)) => class,
        _ => &[],
    }
}

pub fn classify(msg: &Message) -> ClientKind {
    let class = vendor_class(msg);
    if class == diskcast_proto::dhcp::AGENT_VENDOR_CLASS {
        return ClientKind::Agent;
    }
    let arch = match msg.opts().get(OptionCode::ClientSystemArchitecture) {
        Some(DhcpOption::ClientSystemArchitecture(arch)) => Arch::from_code(arch.0),
        _ => Arch::Bios,
    };
    let user_class_ipxe = matches!(
        msg.opts().get(OptionCode::UserClass),
        Some(DhcpOption::UserClass(class)) if class.as_slice() == b"iPXE"
    );
    if user_class_ipxe
        || msg
            .opts()
            .get(OptionCode::from(IPXE_ENCAPSULATED))
            .is_some()
    {
        return ClientKind::Ipxe(arch);
    }
    if class.starts_with(b"PXEClient") {
        return ClientKind::Pxe(arch);
    }
    if class.starts_with(b"HTTPClient") {
        return ClientKind::Http(arch);
    }
    ClientKind::Other
}

#[cfg(test)]
mod tests {
    use super::*;
    use dhcproto::v4::{Architecture, UnknownOption};
    use std::net::Ipv4Addr;

    fn request(opts: Vec<DhcpOption>) -> Message {
        let z = Ipv4Addr::UNSPECIFIED;
        let mut msg = Message::new_with_id(1, z, z, z, z, &[0x52, 0x54, 0, 0, 0, 1]);
        for opt in opts {
            msg.opts_mut().insert(opt);
        }
        msg
    }

    #[test]
    fn classifies_the_clients_we_boot() {
        let pxe = |arch| {
            vec![
                DhcpOption::ClassIdentifier(
                    format!("PXEClient:Arch:{arch:05}:UNDI:003000").into_bytes(),
                ),
                DhcpOption::ClientSystemArchitecture(Architecture(arch)),
            ]
        };
        assert_eq!(classify(&request(pxe(0))), ClientKind::Pxe(Arch::Bios));
        assert_eq!(classify(&request(pxe(7))), ClientKind::Pxe(Arch::Uefi64));
        assert_eq!(classify(&request(pxe(9))), ClientKind::Pxe(Arch::Uefi64));
        assert_eq!(
            classify(&request(pxe(11))),
            ClientKind::Pxe(Arch::Other(11))
        );
        let mut ipxe = pxe(7);
        ipxe.push(DhcpOption::UserClass(b"iPXE".to_vec()));
        assert_eq!(classify(&request(ipxe)), ClientKind::Ipxe(Arch::Uefi64));
        let mut ipxe175 = pxe(0);
        ipxe175.push(DhcpOption::Unknown(UnknownOption::new(
            OptionCode::from(175),
            vec![177, 5, 1, 0x80, 0x86, 0x10, 0x0e],
        )));
        assert_eq!(classify(&request(ipxe175)), ClientKind::Ipxe(Arch::Bios));
        // OVMF's HTTP boot client.
        let http = vec![
            DhcpOption::ClassIdentifier(b"HTTPClient:Arch:00016:UNDI:003000".to_vec()),
            DhcpOption::ClientSystemArchitecture(Architecture(16)),
        ];
        assert_eq!(classify(&request(http)), ClientKind::Http(Arch::Uefi64));
        let agent = vec![DhcpOption::ClassIdentifier(b"diskcast-agent".to_vec())];
        assert_eq!(classify(&request(agent)), ClientKind::Agent);
        assert_eq!(classify(&request(vec![])), ClientKind::Other);
    }
}
