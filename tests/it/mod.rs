//! Test modules of the `main` integration test binary.

pub mod common;

mod agent;
mod cli;
mod conformance;
mod dedup;
mod disk_full;
mod interrupt;
mod keys;
mod pg;
pub mod pgserver;
mod policy;
mod prune;
mod roundtrip;
mod s3;
mod stream;
mod tamper;
