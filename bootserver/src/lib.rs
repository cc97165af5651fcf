//! diskcast bootserver: DHCP (full and proxy), TFTP and HTTP so that bare machines network-boot
//! into the diskcast agent.
#![forbid(unsafe_code)]

pub mod admin;
pub mod api;
pub mod boot_files;
pub mod classify;
pub mod config;
pub mod console;
pub mod deploy;
pub mod dhcp_server;
pub mod grub;
pub mod http;
pub mod ipxe;
pub mod lab;
pub mod leases;
pub mod pull;
pub mod router_advert;
pub mod serve;
pub mod store;
pub mod subnets;
pub mod tftp;
pub mod tls;
pub mod web;

#[cfg(test)]
mod testing;

/// Seconds since the Unix epoch: lease expiry, image metadata, task times.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
