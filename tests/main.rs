//! Integration tests: one test binary driving the real `backupd` executable.
//!
//! Modules live in `tests/it/`; shared helpers are in `tests/it/common.rs`.

mod it;
