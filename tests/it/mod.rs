//! Test modules of the `main` integration test binary.

pub mod common;

mod cli;
mod dedup;
mod disk_full;
mod interrupt;
mod keys;
mod roundtrip;
mod stream;
mod tamper;
