//! diskcast agent library: the pieces the agent binary runs as PID 1 or as a host CLI, and that the
//! bootserver shares (kernel command line, protocol).
#![deny(unsafe_code)]

pub mod cmdline;
pub mod dhcp;
pub mod imaging;
pub mod inventory;
pub mod logging;
pub mod modules;
pub mod netconfig;
pub mod pid1;
pub mod stick;
pub mod sys;
pub mod udp_frame;

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
