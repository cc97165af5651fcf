//! Integration tests of the registry, in one binary (one link) to keep the build short.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod concurrency;
mod crash;
mod leases;
mod machines;
mod open;
mod tasks;
