//! The agent's side of imaging: disks as sources and targets (O_DIRECT writer thread, read-back
//! check), the receiver's driver loop that joins them to [`diskcast_proto::receiver::Receiver`],
//! scanning a disk to send it, and capture into a bootserver's store.
//!
//! How a session works is explained in ARCHITECTURE.md; the protocol itself is
//! `diskcast-proto`, the sender's socket loop `diskcast-transport`.

pub mod capture;
pub mod disk;
pub mod fit;
pub mod judge;
pub mod receive;
pub mod send;
