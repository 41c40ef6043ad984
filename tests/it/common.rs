//! Helpers shared by the integration tests: run the real `backupd` binary with a clean
//! environment, make repositories, generate source trees, and compare trees by content
//! and metadata.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_backupd");
/// Default repository password.
pub const PASSWORD: &str = "integration test password";
/// No single command may take longer than this.
pub const TIMEOUT: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------------------
// Running the binary
// ---------------------------------------------------------------------------------------

/// A `backupd` invocation being built.
pub struct Run {
    cmd: Command,
    stdin: Option<Vec<u8>>,
    args: Vec<String>,
}

/// `backupd` with every inherited `BACKUPD_*` variable removed and stdin from /dev/null.
pub fn backupd() -> Run {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars_os() {
        if k.as_bytes().starts_with(b"BACKUPD_") {
            cmd.env_remove(&k);
        }
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Run {
        cmd,
        stdin: None,
        args: vec![],
    }
}

impl Run {
    /// Runs in this directory.
    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.cmd.current_dir(dir);
        self
    }

    /// Adds one argument.
    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.args.push(a.as_ref().to_string_lossy().into_owned());
        self.cmd.arg(a);
        self
    }

    /// Adds arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        for a in args {
            self = self.arg(a);
        }
        self
    }

    /// Sets an environment variable.
    pub fn env(mut self, k: &str, v: impl AsRef<OsStr>) -> Self {
        self.cmd.env(k, v);
        self
    }

    /// Removes an environment variable.
    pub fn env_remove(mut self, k: &str) -> Self {
        self.cmd.env_remove(k);
        self
    }

    /// Feeds these bytes on stdin.
    pub fn stdin(mut self, data: Vec<u8>) -> Self {
        self.stdin = Some(data);
        self
    }

    /// Starts the command without waiting (stdout/stderr piped).
    pub fn spawn(mut self) -> Running {
        if self.stdin.is_some() {
            self.cmd.stdin(Stdio::piped());
        }
        let mut child = self.cmd.spawn().expect("spawning backupd");
        if let Some(data) = self.stdin.take() {
            let mut w = child.stdin.take().expect("stdin is piped");
            // A killed reader ends the feed with a broken pipe, which is expected.
            thread::spawn(move || {
                let _ = w.write_all(&data);
            });
        }
        Running {
            child,
            args: self.args,
        }
    }

    /// Runs to completion (with [`TIMEOUT`]); asserts it did not panic.
    pub fn run(mut self) -> Output {
        if self.stdin.is_some() {
            self.cmd.stdin(Stdio::piped());
        }
        let mut child = self.cmd.spawn().expect("spawning backupd");
        let feeder = self.stdin.take().map(|data| {
            let mut w = child.stdin.take().expect("stdin is piped");
            thread::spawn(move || {
                let _ = w.write_all(&data);
            })
        });
        let out = Running {
            child,
            args: self.args,
        }
        .wait(TIMEOUT);
        if let Some(f) = feeder {
            let _ = f.join();
        }
        out
    }
}

/// A started `backupd`.
pub struct Running {
    /// The process.
    pub child: Child,
    args: Vec<String>,
}

impl Running {
    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the end (killing it after `timeout`); asserts it did not panic.
    pub fn wait(mut self, timeout: Duration) -> Output {
        let mut so = self.child.stdout.take().expect("stdout is piped");
        let mut se = self.child.stderr.take().expect("stderr is piped");
        let t_out = thread::spawn(move || {
            let mut v = vec![];
            let _ = so.read_to_end(&mut v);
            v
        });
        let t_err = thread::spawn(move || {
            let mut v = vec![];
            let _ = se.read_to_end(&mut v);
            v
        });
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("waiting for backupd") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("backupd {:?} did not finish within {timeout:?}", self.args);
            }
            thread::sleep(Duration::from_millis(10));
        };
        let out = Output {
            status,
            stdout: t_out.join().expect("stdout reader"),
            stderr: String::from_utf8_lossy(&t_err.join().expect("stderr reader")).into_owned(),
            args: self.args,
        };
        assert!(
            !out.stderr.contains("panicked") && !out.stderr.contains("RUST_BACKTRACE"),
            "backupd panicked:\n{}",
            out.describe()
        );
        // Output to a pipe is for scripts and logs: no terminal escape sequences.
        assert!(
            !out.stderr.contains('\x1b'),
            "escape sequences on a non-terminal stderr:\n{}",
            out.describe()
        );
        out
    }
}

/// A finished `backupd`.
pub struct Output {
    /// Exit status.
    pub status: ExitStatus,
    /// Raw stdout.
    pub stdout: Vec<u8>,
    /// Stderr (lossy).
    pub stderr: String,
    /// Arguments (for messages).
    pub args: Vec<String>,
}

impl Output {
    /// What ran and what it printed, for assertion messages.
    pub fn describe(&self) -> String {
        let so = String::from_utf8_lossy(&self.stdout);
        let so: String = if so.len() > 4000 {
            format!(
                "{}... ({} bytes)",
                &so[..so.floor_char_boundary_compat(4000)],
                so.len()
            )
        } else {
            so.into_owned()
        };
        format!(
            "backupd {:?}\nstatus: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.args, self.status, so, self.stderr
        )
    }

    /// The exit code (panics if killed by a signal).
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| panic!("killed by a signal:\n{}", self.describe()))
    }

    /// Asserts the exit code.
    #[track_caller]
    pub fn expect(self, code: i32) -> Self {
        assert_eq!(
            self.status.code(),
            Some(code),
            "unexpected exit code:\n{}",
            self.describe()
        );
        self
    }

    /// Asserts exit code 0.
    #[track_caller]
    pub fn ok(self) -> Self {
        self.expect(0)
    }

    /// Stdout as text.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Stdout and stderr together (for "is it named somewhere" checks).
    pub fn all_text(&self) -> String {
        format!("{}\n{}", self.stdout(), self.stderr)
    }

    /// Stdout parsed as one JSON value.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.describe()))
    }

    /// Stdout parsed as NDJSON (one value per non-empty line).
    #[track_caller]
    pub fn ndjson(&self) -> Vec<Value> {
        self.stdout()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| {
                    panic!("line {l:?} is not JSON ({e}):\n{}", self.describe())
                })
            })
            .collect()
    }

    /// Asserts that stderr contains `needle`.
    #[track_caller]
    pub fn stderr_has(self, needle: &str) -> Self {
        assert!(
            self.stderr.contains(needle),
            "stderr does not contain {needle:?}:\n{}",
            self.describe()
        );
        self
    }

    /// Asserts that stdout or stderr contains `needle`.
    #[track_caller]
    pub fn output_has(self, needle: &str) -> Self {
        assert!(
            self.all_text().contains(needle),
            "output does not contain {needle:?}:\n{}",
            self.describe()
        );
        self
    }
}

trait FloorCharBoundary {
    fn floor_char_boundary_compat(&self, i: usize) -> usize;
}

impl FloorCharBoundary for str {
    fn floor_char_boundary_compat(&self, mut i: usize) -> usize {
        while i > 0 && !self.is_char_boundary(i) {
            i -= 1;
        }
        i
    }
}

// ---------------------------------------------------------------------------------------
// Repositories
// ---------------------------------------------------------------------------------------

/// A repository in its own temporary directory (or in a bucket of its own S3 server),
/// initialized with [`PASSWORD`].
pub struct Repo {
    dir: TempDir,
    /// Where its objects are as files: the directory, or the S3 server's files of it.
    pub path: PathBuf,
    /// What `--repo` gets.
    pub location: String,
    /// Its password.
    pub password: String,
    /// The S3 server holding it, if any.
    pub s3: Option<S3Server>,
}

impl Repo {
    /// Creates and initializes a local repository; asserts `init` output.
    pub fn new() -> Repo {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("repo");
        let location = path.display().to_string();
        Self::init(Repo {
            dir,
            path,
            location,
            password: PASSWORD.to_string(),
            s3: None,
        })
    }

    /// Creates a repository at `s3:http://127.0.0.1:PORT/bk1/repo` on a server of its own.
    pub fn new_s3() -> Repo {
        let server = S3Server::start();
        let dir = tempfile::tempdir().expect("tempdir");
        Self::init(Repo {
            dir,
            path: server.bucket_dir("bk1").join("repo"),
            location: server.location("bk1/repo"),
            password: PASSWORD.to_string(),
            s3: Some(server),
        })
    }

    /// The same tests on both kinds of repository.
    pub fn both() -> [Repo; 2] {
        [Repo::new(), Repo::new_s3()]
    }

    fn init(r: Repo) -> Repo {
        let out = r.cmd().arg("init").run().ok();
        let want = format!("at {}", r.location);
        assert!(
            out.stdout().contains("created backupd repository") && out.stdout().contains(&want),
            "init output:\n{}",
            out.describe()
        );
        r
    }

    /// A scratch directory next to the repository (deleted with it).
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `backupd --repo PATH` with `BACKUPD_PASSWORD` set.
    pub fn cmd(&self) -> Run {
        self.cmd_pw(&self.password)
    }

    /// `backupd --repo PATH` with this password.
    pub fn cmd_pw(&self, pw: &str) -> Run {
        let run = backupd()
            .arg("--repo")
            .arg(&self.location)
            .env("BACKUPD_PASSWORD", pw);
        match &self.s3 {
            Some(s) => s
                .credentials(run)
                .env("BACKUPD_CACHE_DIR", self.dir.path().join("cache")),
            // No object cache for a local repository, but the key hint
            // (`BASE/key-hints/`) stays with the repository, out of the user's own cache.
            None => run.env("XDG_CACHE_HOME", self.dir.path().join("cache")),
        }
    }

    /// Runs with these arguments.
    pub fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> Output {
        self.cmd().args(args).run()
    }

    /// Runs and asserts exit 0.
    #[track_caller]
    pub fn ok<S: AsRef<OsStr>>(&self, args: &[S]) -> Output {
        self.run(args).ok()
    }

    /// `backup --json ARGS...`; asserts exit 0; returns the summary.
    #[track_caller]
    pub fn backup<S: AsRef<OsStr>>(&self, args: &[S]) -> Value {
        self.cmd()
            .args(["backup", "--json"])
            .args(args)
            .run()
            .ok()
            .json()
    }

    /// `snapshots --json`.
    #[track_caller]
    pub fn snapshots(&self) -> Vec<Value> {
        match self.ok(&["snapshots", "--json"]).json() {
            Value::Array(a) => a,
            other => panic!("snapshots --json is not an array: {other}"),
        }
    }

    /// Every file of the repository, by relative path, with its bytes.
    pub fn objects(&self) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        collect_files(&self.path, &self.path, &mut out);
        out
    }

    /// Total bytes of all files in the repository.
    pub fn size(&self) -> u64 {
        let mut out = BTreeMap::new();
        collect_files(&self.path, &self.path, &mut out);
        out.values().map(|v| v.len() as u64).sum()
    }

    /// Names (ids) of the objects in `keys`, `index` or `snapshots`.
    pub fn names(&self, dir: &str) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.path.join(dir))
            .unwrap_or_else(|e| panic!("{dir}: {e}"))
            .map(|e| {
                e.expect("dir entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        v.sort();
        v
    }

    /// Relative path of a pack.
    pub fn pack_rel(id: &str) -> String {
        format!("data/{}/{}", &id[..2], id)
    }

    /// Every pack and its blobs, as the index files describe them (`cat index`).
    #[track_caller]
    pub fn indexed_packs(&self) -> Vec<PackInfo> {
        let mut out = vec![];
        for name in self.names("index") {
            let v = self.ok(&["cat", "index", &name]).json();
            for p in v["packs"].as_array().expect("packs array") {
                let blobs = p["blobs"]
                    .as_array()
                    .expect("blobs array")
                    .iter()
                    .map(|b| BlobLoc {
                        kind: b["type"].as_str().expect("type").to_string(),
                        id: b["id"].as_str().expect("id").to_string(),
                        offset: b["offset"].as_u64().expect("offset"),
                        length: b["length"].as_u64().expect("length"),
                    })
                    .collect();
                out.push(PackInfo {
                    id: p["id"].as_str().expect("pack id").to_string(),
                    index: name.clone(),
                    blobs,
                });
            }
        }
        out
    }

    /// Every file of a snapshot (absolute path in the snapshot) with its data blob ids,
    /// read by walking its trees with `cat snapshot` and `cat blob`.
    #[track_caller]
    pub fn file_blobs(&self, snapshot: &str) -> BTreeMap<String, Vec<String>> {
        let snap = self.ok(&["cat", "snapshot", snapshot]).json();
        let tree = snap["tree"].as_str().expect("snapshot tree").to_string();
        let mut out = BTreeMap::new();
        self.walk_tree(&tree, "", &mut out);
        out
    }

    fn walk_tree(&self, tree: &str, prefix: &str, out: &mut BTreeMap<String, Vec<String>>) {
        let t = self.ok(&["cat", "blob", tree]).json();
        for n in t["nodes"].as_array().expect("tree nodes") {
            let path = format!("{prefix}/{}", n["name"].as_str().expect("name"));
            match n["type"].as_str().expect("type") {
                "dir" => self.walk_tree(n["subtree"].as_str().expect("subtree"), &path, out),
                "file" => {
                    let mut ids: Vec<String> = n["content"]
                        .as_array()
                        .map(|a| a.iter().map(|i| i.as_str().unwrap().to_string()).collect())
                        .unwrap_or_default();
                    if let Some(lists) = n["content_lists"].as_array() {
                        for l in lists {
                            let raw = self.ok(&["cat", "blob", l.as_str().unwrap()]).stdout;
                            ids.extend(raw.chunks(32).map(hex));
                        }
                    }
                    out.insert(path, ids);
                }
                _ => {}
            }
        }
    }
}

/// One blob in a pack.
#[derive(Clone, Debug)]
pub struct BlobLoc {
    /// "data" or "tree".
    pub kind: String,
    /// Blob id.
    pub id: String,
    /// Offset in the pack.
    pub offset: u64,
    /// Sealed length.
    pub length: u64,
}

/// A pack and its blobs.
#[derive(Clone, Debug)]
pub struct PackInfo {
    /// Pack id.
    pub id: String,
    /// Index file naming it.
    pub index: String,
    /// Its blobs.
    pub blobs: Vec<BlobLoc>,
}

impl PackInfo {
    /// True when every blob is of this kind.
    pub fn all(&self, kind: &str) -> bool {
        !self.blobs.is_empty() && self.blobs.iter().all(|b| b.kind == kind)
    }
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn collect_files(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
    for e in fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let e = e.expect("dir entry");
        let p = e.path();
        let ft = e.file_type().expect("file type");
        if ft.is_dir() {
            collect_files(root, &p, out);
        } else {
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            out.insert(
                rel,
                fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
            );
        }
    }
}

/// Asserts that two object maps are equal except for `except` (relative paths).
#[track_caller]
pub fn assert_objects_unchanged(
    before: &BTreeMap<String, Vec<u8>>,
    after: &BTreeMap<String, Vec<u8>>,
    except: &[&str],
) {
    let strip = |m: &BTreeMap<String, Vec<u8>>| -> BTreeMap<String, Vec<u8>> {
        m.iter()
            .filter(|(k, _)| !except.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    let (b, a) = (strip(before), strip(after));
    let bk: Vec<&String> = b.keys().collect();
    let ak: Vec<&String> = a.keys().collect();
    assert_eq!(bk, ak, "the set of repository files changed");
    for (k, v) in &b {
        assert!(a[k] == *v, "repository file {k} changed");
    }
}

// ---------------------------------------------------------------------------------------
// Source trees
// ---------------------------------------------------------------------------------------

/// `len` random bytes from /dev/urandom.
pub fn random_bytes(len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    fs::File::open("/dev/urandom")
        .expect("/dev/urandom")
        .take(len as u64)
        .read_to_end(&mut v)
        .expect("reading /dev/urandom");
    assert_eq!(v.len(), len);
    v
}

/// Writes `len` random bytes to `path` (streaming, so large files are cheap on memory).
pub fn write_random(path: &Path, len: u64) {
    let mut src = fs::File::open("/dev/urandom").expect("/dev/urandom");
    let mut dst = fs::File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let n = std::io::copy(&mut (&mut src).take(len), &mut dst).expect("copying random bytes");
    assert_eq!(n, len);
}

/// Writes `len` bytes alternating 1 MiB of compressible text and 1 MiB of random bytes.
pub fn write_mixed(path: &Path, len: usize) {
    let block = 1 << 20;
    let mut out = Vec::with_capacity(len);
    let mut i = 0u64;
    while out.len() < len {
        let n = block.min(len - out.len());
        if i.is_multiple_of(2) {
            let mut text = Vec::with_capacity(n);
            let mut line = 0u64;
            while text.len() < n {
                text.extend_from_slice(
                    format!("{i:04} line {line:08}: the quick brown fox jumps over the lazy dog\n")
                        .as_bytes(),
                );
                line += 1;
            }
            text.truncate(n);
            out.extend_from_slice(&text);
        } else {
            out.extend_from_slice(&random_bytes(n));
        }
        i += 1;
    }
    fs::write(path, out).expect("writing mixed file");
}

/// Runs `sh -c SCRIPT`; asserts success.
#[track_caller]
pub fn sh(script: &str) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .output()
        .expect("running sh");
    assert!(
        out.status.success(),
        "sh -c {script:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a program with byte arguments; asserts success.
#[track_caller]
pub fn run_prog(prog: &str, args: &[&OsStr]) {
    let out = Command::new(prog).args(args).output().expect(prog);
    assert!(
        out.status.success(),
        "{prog} {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sets the mtime (with nanoseconds) of `path` without following symlinks (`touch -h -d`).
#[track_caller]
pub fn set_mtime(path: &Path, when: &str) {
    run_prog(
        "touch",
        &[
            OsStr::new("-h"),
            OsStr::new("-d"),
            OsStr::new(when),
            path.as_os_str(),
        ],
    );
}

/// Flips one bit of a file in place.
pub fn flip_bit(path: &Path, offset: u64) {
    let mut b = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    b[offset as usize] ^= 0x10;
    fs::write(path, b).expect("writing tampered file");
}

/// Truncates a file to `len` bytes.
pub fn truncate(path: &Path, len: u64) {
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(len))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// Where `restore --target T` puts the absolute source path `src`.
pub fn restored_path(target: &Path, src: &Path) -> PathBuf {
    target.join(src.strip_prefix("/").expect("absolute source path"))
}

// ---------------------------------------------------------------------------------------
// Tree comparison
// ---------------------------------------------------------------------------------------

/// File kind from lstat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// FIFO.
    Fifo,
    /// Socket.
    Socket,
    /// Character or block device.
    Other,
}

/// The metadata that a restore must reproduce.
#[derive(Clone, Debug)]
pub struct Meta {
    /// Kind.
    pub kind: Kind,
    /// `st_mode` (type and permission bits).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time in nanoseconds.
    pub mtime_ns: i128,
    /// Size (files and symlinks).
    pub size: u64,
    /// Inode.
    pub ino: u64,
    /// Link count.
    pub nlink: u64,
    /// Symlink target bytes.
    pub target: Option<Vec<u8>>,
}

/// lstat of `p`.
pub fn lmeta(p: &Path) -> Meta {
    let md = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let ft = md.file_type();
    let kind = if ft.is_file() {
        Kind::File
    } else if ft.is_dir() {
        Kind::Dir
    } else if ft.is_symlink() {
        Kind::Symlink
    } else if ft.is_fifo() {
        Kind::Fifo
    } else if ft.is_socket() {
        Kind::Socket
    } else {
        Kind::Other
    };
    Meta {
        kind,
        mode: md.mode(),
        uid: md.uid(),
        gid: md.gid(),
        mtime_ns: md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128,
        size: md.len(),
        ino: md.ino(),
        nlink: md.nlink(),
        target: if kind == Kind::Symlink {
            Some(
                fs::read_link(p)
                    .expect("readlink")
                    .as_os_str()
                    .as_bytes()
                    .to_vec(),
            )
        } else {
            None
        },
    }
}

/// Every entry under `root` (and `root` itself as ""), by relative path bytes.
pub fn scan(root: &Path) -> BTreeMap<Vec<u8>, Meta> {
    let mut out = BTreeMap::new();
    scan_into(root, root, &mut out);
    out
}

fn scan_into(root: &Path, p: &Path, out: &mut BTreeMap<Vec<u8>, Meta>) {
    let m = lmeta(p);
    let rel = p
        .strip_prefix(root)
        .unwrap()
        .as_os_str()
        .as_bytes()
        .to_vec();
    let is_dir = m.kind == Kind::Dir;
    out.insert(rel, m);
    if is_dir {
        for e in fs::read_dir(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())) {
            scan_into(root, &e.expect("dir entry").path(), out);
        }
    }
}

/// Compares the tree at `dst` with the one at `src`: same entries (except those of
/// `src` that `skip` rejects), same kind, mode, owner, mtime (ns), size, link target and
/// content. Returns the differences.
pub fn compare_trees(src: &Path, dst: &Path, skip: &dyn Fn(&[u8], &Meta) -> bool) -> Vec<String> {
    let a = scan(src);
    let b = scan(dst);
    let mut diffs = vec![];
    let show = |rel: &[u8]| String::from_utf8_lossy(rel).into_owned();
    for (rel, m) in &a {
        if skip(rel, m) {
            if b.contains_key(rel) {
                diffs.push(format!("{}: should not have been restored", show(rel)));
            }
            continue;
        }
        let Some(r) = b.get(rel) else {
            diffs.push(format!("{}: missing after restore", show(rel)));
            continue;
        };
        let name = show(rel);
        if m.kind != r.kind {
            diffs.push(format!("{name}: kind {:?} != {:?}", r.kind, m.kind));
            continue;
        }
        if m.mode != r.mode {
            diffs.push(format!("{name}: mode {:o} != {:o}", r.mode, m.mode));
        }
        if (m.uid, m.gid) != (r.uid, r.gid) {
            diffs.push(format!(
                "{name}: owner {}:{} != {}:{}",
                r.uid, r.gid, m.uid, m.gid
            ));
        }
        if m.mtime_ns != r.mtime_ns {
            diffs.push(format!("{name}: mtime_ns {} != {}", r.mtime_ns, m.mtime_ns));
        }
        if m.kind != Kind::Dir && m.size != r.size {
            diffs.push(format!("{name}: size {} != {}", r.size, m.size));
        }
        if m.target != r.target {
            diffs.push(format!(
                "{name}: link target {:?} != {:?}",
                r.target
                    .as_ref()
                    .map(|t| String::from_utf8_lossy(t).into_owned()),
                m.target
                    .as_ref()
                    .map(|t| String::from_utf8_lossy(t).into_owned())
            ));
        }
        if m.kind == Kind::File {
            let sp = src.join(OsStr::from_bytes(rel));
            let dp = dst.join(OsStr::from_bytes(rel));
            if fs::read(&sp).expect("read source") != fs::read(&dp).expect("read restored") {
                diffs.push(format!("{name}: content differs"));
            }
        }
    }
    for rel in b.keys() {
        if !a.contains_key(rel) {
            diffs.push(format!("{}: restored but not in the source", show(rel)));
        }
    }
    diffs
}

/// Asserts that [`compare_trees`] finds no difference.
#[track_caller]
pub fn assert_same_tree(src: &Path, dst: &Path, skip: &dyn Fn(&[u8], &Meta) -> bool) {
    let d = compare_trees(src, dst, skip);
    assert!(
        d.is_empty(),
        "restored tree {} differs from {}:\n  {}",
        dst.display(),
        src.display(),
        d.join("\n  ")
    );
}

/// Asserts a string is 64 lower-case hex digits.
#[track_caller]
pub fn assert_hex64(s: &str) {
    assert!(
        s.len() == 64
            && s.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)),
        "{s:?} is not a 64-digit hex id"
    );
}

// ---------------------------------------------------------------------------------------
// A real S3 server (s3s-fs) on loopback
// ---------------------------------------------------------------------------------------

/// Access key of the test servers.
pub const S3_ACCESS_KEY: &str = "AKTEST";
/// Secret key of the test servers.
pub const S3_SECRET_KEY: &str = "SKTEST";

/// The s3s-fs binary: `BACKUPD_TEST_S3S_FS`, else on PATH, else `~/.local/bin` (where
/// `.ci/test-all.sh` installs it). A missing server fails the test: install it.
pub fn s3s_fs_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("BACKUPD_TEST_S3S_FS") {
        return PathBuf::from(p);
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("s3s-fs"))
                .collect()
        })
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(Path::new(&home).join(".local/bin/s3s-fs"));
        candidates.push(Path::new(&home).join(".cargo/bin/s3s-fs"));
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
            "s3s-fs not found; install it with: cargo install s3s-fs@0.14.1 --features binary \\
             --locked --root $HOME/.local (bash .ci/test-all.sh does)"
        )
        })
}

/// A throwaway s3s-fs server: buckets are directories under `root`, objects plain files,
/// so tests can look at and damage what the server stores.
pub struct S3Server {
    root: TempDir,
    /// Its port on 127.0.0.1.
    pub port: u16,
    child: Option<Child>,
}

impl S3Server {
    /// Starts a server with one bucket, `bk1`, on a free port.
    pub fn start() -> S3Server {
        let root = tempfile::tempdir().expect("tempdir");
        fs::create_dir(root.path().join("bk1")).expect("bucket dir");
        let mut s = S3Server {
            root,
            port: 0,
            child: None,
        };
        s.restart();
        s
    }

    /// Starts the server again on the same root (on a new port the first time).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the server is running");
        for _ in 0..20 {
            let port = if self.port == 0 {
                free_port()
            } else {
                self.port
            };
            let child = Command::new(s3s_fs_binary())
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
                .arg(self.root.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start s3s-fs");
            self.child = Some(child);
            if self.wait_ready(port) {
                self.port = port;
                return;
            }
            self.kill();
            if self.port != 0 {
                thread::sleep(Duration::from_millis(200));
            }
        }
        panic!("s3s-fs did not start");
    }

    fn wait_ready(&mut self, port: u16) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(_)) = c.try_wait() {
                    return false;
                }
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Stops the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `s3:http://127.0.0.1:PORT/PATH`.
    pub fn location(&self, path: &str) -> String {
        format!("s3:{}/{path}", self.endpoint())
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The directory holding a bucket's objects.
    pub fn bucket_dir(&self, bucket: &str) -> PathBuf {
        self.root.path().join(bucket)
    }

    /// Adds the server's credentials to a command.
    pub fn credentials(&self, run: Run) -> Run {
        run.env("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_SESSION_TOKEN")
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port nobody listens on right now, chosen at random below the kernel's ephemeral
/// range (32768-60999): a port from `bind(0)` is in that range, where any outgoing
/// connection of a parallel test may take it as its source port before the server that
/// was meant to get it binds it.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    for _ in 0..200 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let port = 20000 + (h.finish() % 12000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A seeded generator (splitmix64): the same seed, the same run.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        backupd::backend::faults::splitmix(&mut self.0)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}
