//! glibc malloc tuning, applied by re-executing once at start-up.
//!
//! glibc raises its mmap threshold to the size of the largest freed block (up to 32 MiB).
//! After the first 16–26 MiB pack buffer is freed, every later pack and chunk buffer comes
//! from per-thread arenas, which fragment and keep memory: the first backup of the bench
//! corpus peaked at 126 MiB. With the threshold fixed at 16 MiB, pack buffers are always
//! mapped and unmapped, while blob-sized buffers (≤ 8 MiB) are reused from the arenas:
//! measured peak 68 MiB for the first backup (the floor set by Argon2id key derivation) and
//! 78 MiB for restore. 1 and 4 MiB thresholds also kept memory down but made restore take
//! 6.6–8.6 s instead of 5.4 s (every 1–8 MiB buffer faulted in fresh pages). `mallopt` would need `unsafe`, which this crate
//! forbids; glibc reads the same setting from the environment at start-up, so we set it
//! and exec ourselves. See docs/decisions/0005-compression-level-and-pipeline-depth.md.
//!
//! Verbs that mostly read (restore, dump, check, ...) also get a 128 MiB trim threshold:
//! with glibc's 128 KiB default every freed 1–8 MiB blob buffer at the top of an arena is
//! given back and the next one faults in fresh pages. Measured on the bench corpus restore:
//! 334,000–353,000 minor faults -> 36,000, system time 4.7–8.8 s -> 3.9–4.1 s, wall
//! 5.4–8.4 s -> 4.7–5.0 s, peak RSS +2–4 MiB. Backups keep the default: there the
//! several pipeline threads' arenas each kept their slack and the first backup peaked at
//! 107–109 MiB instead of 74 MiB.

use std::os::unix::process::CommandExt;
use std::process::Command;

/// The environment variable glibc reads.
pub const MMAP_THRESHOLD_VAR: &str = "MALLOC_MMAP_THRESHOLD_";
const THRESHOLD: &str = "16777216";
/// glibc's trim threshold variable.
pub const TRIM_THRESHOLD_VAR: &str = "MALLOC_TRIM_THRESHOLD_";
const READ_TRIM_THRESHOLD: &str = "134217728";

/// How a verb uses memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// Backups: many pipeline threads, memory kept low.
    Write,
    /// Restore and the other readers: blob buffers reused instead of faulted in again.
    Read,
}

/// Re-executes the current binary with a fixed mmap threshold (and, for readers, a large
/// trim threshold), unless the mmap threshold is already set (by us or by the operator).
/// Returns only if it is already set or the exec failed, in which case the program runs
/// on with glibc's defaults.
pub fn ensure_tuned(profile: Profile) {
    if std::env::var_os(MMAP_THRESHOLD_VAR).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
    // `exec` returns only on failure; then we simply carry on.
    let mut cmd = Command::new(&exe);
    cmd.arg0(arg0).args(args).env(MMAP_THRESHOLD_VAR, THRESHOLD);
    if profile == Profile::Read && std::env::var_os(TRIM_THRESHOLD_VAR).is_none() {
        cmd.env(TRIM_THRESHOLD_VAR, READ_TRIM_THRESHOLD);
    }
    let _ = cmd.exec();
}
