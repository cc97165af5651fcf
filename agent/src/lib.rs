//! diskcast agent library: PID 1 of the imaging initramfs and the host CLI, with every I/O edge
//! the protocol needs on a machine being imaged: disks (O_DIRECT, read-back), sysfs inventory,
//! kernel modules, raw-socket DHCP, consoles. The protocol itself is `diskcast-proto`.
#![deny(unsafe_code)]

pub mod hardware;
pub mod http_client;
pub mod imaging;
pub mod inventory;
pub mod logging;
pub mod modules;
pub mod netconfig;
pub mod pid1;
pub mod report;
pub mod stick;
pub mod sys;
pub mod udp_frame;

pub use diskcast_proto::{cmdline, error_chain, READY_MARKER};

/// Seconds since the Unix epoch, for metadata and reports.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
