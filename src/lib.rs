//! backupd: streaming, chunked, deduplicated, compressed and encrypted backups.
//!
//! The binary (`main.rs`) only parses arguments and maps errors to exit codes; everything
//! else lives here: [`crypto`], [`pipeline`], [`backend`], [`repo`], [`source`],
//! [`backup`], [`restore`], [`check`] and the verb handlers in [`cli`].

pub mod agent;
pub mod allocator;
pub mod backend;
pub mod backup;
pub mod check;
pub mod cli;
pub mod crypto;
pub mod dirfd;
pub mod error;
pub mod fsattr;
pub mod host;
pub mod keyring_secret;
pub mod pipeline;
pub mod policy;
pub mod postgres;
pub mod repo;
pub mod restore;
pub mod secret_env;
pub mod secret_file;
pub mod secret_source;
pub mod source;
