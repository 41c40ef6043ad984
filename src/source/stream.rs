//! Stream sources: stdin, or the stdout of a command. The stream becomes one file node
//! named by `--stdin-filename` at the root of the snapshot. The command runs without the
//! secret variables in its environment ([`crate::secret_env`]).

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicU64;

use super::meta::NameCache;
use super::reader::save_stream;
use super::CancelToken;
use crate::pipeline::chunker::Cutter;
use crate::pipeline::stages::{BlobSaver, SaveError};
use crate::pipeline::{BlobId, BlobKind};
use crate::repo::{Node, NodeKind, Repository, Tree};

/// Why a stream backup failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Reading the stream failed.
    #[error("reading {what}: {source}")]
    Read {
        /// stdin or the command.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// The command could not start.
    #[error("starting command {command:?}: {source}")]
    Spawn {
        /// Program.
        command: String,
        /// Why.
        source: std::io::Error,
    },
    /// The command exited non-zero: no snapshot.
    #[error("command {command:?} failed ({status}); no snapshot was written")]
    CommandFailed {
        /// Program.
        command: String,
        /// Exit status.
        status: String,
    },
    /// Storing failed.
    #[error(transparent)]
    Save(#[from] SaveError),
    /// SIGINT/SIGTERM.
    #[error("interrupted")]
    Interrupted,
}

/// Where the stream comes from.
pub enum StreamSource {
    /// Standard input.
    Stdin,
    /// A command's stdout.
    Command(Vec<String>),
}

/// One stream (stdin or a command's output) as a source: one file, `name`.
pub struct StreamBackup {
    /// Where the bytes come from.
    pub source: StreamSource,
    /// The file's name in the snapshot.
    pub name: String,
}

impl super::Source for StreamBackup {
    fn kind(&self) -> &'static str {
        match self.source {
            StreamSource::Stdin => "stdin",
            StreamSource::Command(_) => "command",
        }
    }

    fn paths(&self) -> Vec<String> {
        vec![format!("/{}", self.name)]
    }

    fn command(&self) -> Option<Vec<String>> {
        match &self.source {
            StreamSource::Command(c) => Some(c.clone()),
            StreamSource::Stdin => None,
        }
    }

    /// A stream has no parent: nothing of it can be taken without reading it.
    fn is_parent(&self, _host: &str, _s: &crate::repo::Snapshot) -> bool {
        false
    }

    fn read(
        &self,
        ctx: &super::ReadContext<'_>,
    ) -> Result<super::SourceOutput, super::SourceError> {
        use std::sync::atomic::Ordering;
        ctx.stats.files_new.fetch_add(1, Ordering::Relaxed);
        let (tree, size) = backup_stream(
            ctx.repo,
            ctx.saver,
            &self.source,
            &self.name,
            ctx.cancel,
            &ctx.stats.bytes_read,
        )?;
        ctx.stats.bytes_total.fetch_add(size, Ordering::Relaxed);
        Ok(super::SourceOutput::tree_only(tree))
    }
}

/// Saves one stream as file `name`; returns the root tree and the byte count.
///
/// # Errors
/// Read errors, a failed command, interrupt, or pipeline failure.
pub fn backup_stream(
    repo: &Repository,
    saver: &BlobSaver,
    source: &StreamSource,
    name: &str,
    cancel: &CancelToken,
    read_counter: &AtomicU64,
) -> Result<(BlobId, u64), StreamError> {
    let cutter = Cutter::new(repo.config().chunker, repo.keys().gear_table());
    let started = chrono::Utc::now();
    let (ids, lists, size) = match source {
        StreamSource::Stdin => {
            let stdin = std::io::stdin().lock();
            run(stdin, saver, &cutter, cancel, read_counter, "stdin")?
        }
        StreamSource::Command(argv) => {
            let (prog, args) = argv.split_first().ok_or_else(|| StreamError::Spawn {
                command: String::new(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"),
            })?;
            let mut cmd = Command::new(prog);
            cmd.args(args)
                // A group of its own: on interrupt the whole pipeline it starts is
                // stopped, so a blocked read of its output ends.
                .process_group(0)
                // Our allocator setting is for us, not for the command.
                .env_remove(crate::allocator::MMAP_THRESHOLD_VAR)
                .stdin(Stdio::null())
                .stdout(Stdio::piped());
            // Nor are our secrets: a command that needs a database password gets it from
            // its own file (PGPASSFILE), not by inheriting PGPASSWORD.
            crate::secret_env::scrub(&mut cmd);
            let mut child = cmd.spawn().map_err(|source| StreamError::Spawn {
                command: prog.clone(),
                source,
            })?;
            let out = child.stdout.take().expect("stdout is piped");
            let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
            let done = std::sync::atomic::AtomicBool::new(false);
            let r = std::thread::scope(|scope| {
                // A read from the command blocks until it writes: watch for the interrupt
                // meanwhile and stop the command's process group.
                let watcher = scope.spawn(|| {
                    while !done.load(std::sync::atomic::Ordering::Relaxed) {
                        if cancel.is_cancelled() {
                            let _ =
                                nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGTERM);
                            return;
                        }
                        std::thread::park_timeout(std::time::Duration::from_millis(50));
                    }
                });
                let r = run(out, saver, &cutter, cancel, read_counter, prog);
                done.store(true, std::sync::atomic::Ordering::Relaxed);
                // Woken now, not at its next tick.
                watcher.thread().unpark();
                r
            });
            if r.is_err() {
                let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
                let _ = child.kill();
            }
            let status = child.wait().map_err(|source| StreamError::Read {
                what: prog.clone(),
                source,
            })?;
            let r = r?;
            if !status.success() {
                return Err(StreamError::CommandFailed {
                    command: prog.clone(),
                    status: status.to_string(),
                });
            }
            r
        }
    };
    let mut names = NameCache::default();
    let uid = nix::unistd::getuid().as_raw();
    let gid = nix::unistd::getgid().as_raw();
    let now_ns = started.timestamp_nanos_opt().unwrap_or(0);
    let node = Node {
        name: name.to_string(),
        raw_name: None,
        kind: NodeKind::File,
        mode: 0o600,
        uid,
        gid,
        user: names.user(uid),
        group: names.group(gid),
        mtime_ns: now_ns,
        ctime_ns: now_ns,
        inode: 0,
        device: 0,
        links: 1,
        size,
        content: ids,
        content_lists: lists,
        subtree: None,
        link_target: None,
        raw_link_target: None,
        ..Node::default()
    };
    let tree = Tree { nodes: vec![node] };
    let (id, _) = saver.save(BlobKind::Tree, tree.to_bytes())?;
    Ok((id, size))
}

fn run<R: Read>(
    reader: R,
    saver: &BlobSaver,
    cutter: &Cutter,
    cancel: &CancelToken,
    read_counter: &AtomicU64,
    what: &str,
) -> Result<(Vec<BlobId>, Vec<BlobId>, u64), StreamError> {
    save_stream(reader, saver, cutter, cancel, read_counter).map_err(|e| match e {
        Some(source) => StreamError::Read {
            what: what.into(),
            source,
        },
        None if cancel.is_cancelled() => StreamError::Interrupted,
        None => StreamError::Save(SaveError::Stopped),
    })
}
