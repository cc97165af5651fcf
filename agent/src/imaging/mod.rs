//! Multicast disk imaging: the manifest, the wire format, and the sans-IO sender and receiver.
//!
//! Principles (see shared/DESIGN.md §2): independent chunks at absolute disk offsets; only data
//! chunks travel; receiver-driven repair with NAKs merged at the sender and each missing piece sent
//! once for everybody; CRC32 per datagram, BLAKE3 per chunk before it is written, and the whole
//! image re-read and checked after the final flush; every receiver ends done or failed, loudly.

pub mod bits;
pub mod capture;
pub mod codec;
pub mod disk;
pub mod image_file;
pub mod manifest;
pub mod net;
pub mod receiver;
pub mod sender;
pub mod session;
pub mod wire;

#[cfg(test)]
mod sim;
