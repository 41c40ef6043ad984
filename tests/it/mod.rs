//! Test modules of the `main` integration test binary.

pub mod common;

mod agent;
mod attributes;
mod bad_env;
mod cli;
mod confine;
mod conformance;
mod dedup;
mod disk_full;
mod faults;
mod format;
mod influx;
pub mod influxserver;
mod interrupt;
mod keyring;
mod keys;
mod packaging;
mod pg;
pub mod pgserver;
pub mod policy;
mod prune;
mod retire;
mod rotation;
mod roundtrip;
mod s3;
pub mod s3proxy;
mod secrets;
mod stream;
mod tamper;
mod torture;
mod verify;
mod walstream;
