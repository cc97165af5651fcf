//! Server state of a diskcast lab in one embedded SQLite file.
#![forbid(unsafe_code)]

mod mac;

pub use mac::{MacAddr, MacParseError};
