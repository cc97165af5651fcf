//! diskcast's protocol crate: everything the agent, the bootserver and the initramfs builder must
//! agree on, and the protocol logic itself, free of I/O (in the manner of `quinn-proto`).
//!
//! - the session's datagrams ([`wire`]), the image's [`manifest`] and how chunks are stored
//!   ([`codec`], [`image_file`]);
//! - the sans-IO [`sender`] and [`receiver`] state machines with their [`pacer`]: they take
//!   datagrams and the time, and hand back datagrams, disk work, events and their next timeout;
//!   a simulator drives whole sessions through a lossy virtual network in the tests;
//! - the boot contract: the agent's kernel command line ([`cmdline`]), the DHCP client and the
//!   agent's vendor class ([`dhcp`]), the kernel module index the initramfs carries
//!   ([`modindex`]), and what the agent reports about its task ([`report`]);
//! - small shared types: [`mac::MacAddr`], [`units::human_size`], a seeded [`rng::XorShift`].
//!
//! No sockets, no files opened, no clock read here: callers pass `now` in and own every edge.
#![forbid(unsafe_code)]

pub mod bits;
pub mod cmdline;
pub mod codec;
pub mod dhcp;
pub mod fec;
pub mod image_file;
pub mod mac;
pub mod manifest;
pub mod modindex;
pub mod pacer;
pub mod read_at;
pub mod receiver;
pub mod relay;
pub mod report;
pub mod rng;
pub mod sender;
pub mod trust;
pub mod units;
pub mod wire;

#[cfg(test)]
pub(crate) mod sim;

/// The line PID 1 prints once the machine is up, network configured and inventory printed.
/// Tests and operators wait for it; its form does not change.
pub const READY_MARKER: &str = "DISKCAST-READY";

/// An error and every cause under it, one per line, as `main` and PID 1 print them.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!("\n  caused by: {cause}"));
        source = cause.source();
    }
    text
}
