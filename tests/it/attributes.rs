//! Format-2 attributes end to end: extended attributes of every namespace (ACLs and file
//! capabilities among them), file flags, FIFOs and devices, sparse files, names of any
//! bytes, paths longer than `PATH_MAX` and deeper than the descriptor limit, and the
//! exclusion options. Each tree is backed up and restored by the real binary, and source
//! and copy are compared with the tools that show these attributes (`find -printf`,
//! `stat`, `getfattr`, `lsattr`), not with backupd's own view of them.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::Instant;

use serde_json::Value;

use super::common::*;

// ---------------------------------------------------------------------------------------
// Running and inspecting
// ---------------------------------------------------------------------------------------

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// Runs `backupd ARGS` under a wrapper (`runuser -u nobody --`, `prlimit --nofile=N:N --`),
/// with no inherited `BACKUPD_*` variable but those of `env`, stdin from /dev/null, in
/// `cwd`; killed after [`TIMEOUT`]; asserts it did not panic.
fn run_under(wrapper: &[&str], env: &[(&str, &OsStr)], cwd: &Path, args: &[&OsStr]) -> Output {
    let mut cmd = Command::new(wrapper[0]);
    cmd.args(&wrapper[1..]).arg(BIN).args(args).current_dir(cwd);
    for (k, _) in std::env::vars_os() {
        if k.as_bytes().starts_with(b"BACKUPD_") {
            cmd.env_remove(&k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawning backupd under its wrapper");
    let mut so = child.stdout.take().expect("stdout is piped");
    let mut se = child.stderr.take().expect("stderr is piped");
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
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for backupd") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{wrapper:?} backupd {args:?} did not finish within {TIMEOUT:?}");
        }
        thread::sleep(std::time::Duration::from_millis(10));
    };
    let mut shown: Vec<String> = wrapper.iter().map(|s| s.to_string()).collect();
    shown.extend(args.iter().map(|a| a.to_string_lossy().into_owned()));
    let out = Output {
        status,
        stdout: t_out.join().expect("stdout reader"),
        stderr: String::from_utf8_lossy(&t_err.join().expect("stderr reader")).into_owned(),
        args: shown,
    };
    assert!(
        !out.stderr.contains("panicked"),
        "backupd panicked:\n{}",
        out.describe()
    );
    out
}

/// Runs `prog ARGS` in `cwd`; asserts success; returns stdout.
#[track_caller]
fn stdout_of(cwd: &Path, prog: &str, args: &[&OsStr]) -> Vec<u8> {
    let out = Command::new(prog)
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?} in {} failed: {}\n{}",
        cwd.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Bytes as text: printable ASCII kept, everything else as `\xNN`.
fn show(b: &[u8]) -> String {
    let mut s = String::new();
    for &c in b {
        if (0x20..0x7f).contains(&c) && c != b'\\' {
            s.push(c as char);
        } else {
            s.push_str(&format!("\\x{c:02x}"));
        }
    }
    s
}

/// Every entry under `root` (itself as ""), as `find -printf` shows it: path, type, mode,
/// owner, group, size (not of directories: it depends on their history), mtime with
/// nanoseconds, link target, link count. Sockets are left out (never restored). With
/// `owners` false, owner and group are left out too. Sorted.
fn listing(root: &Path, owners: bool) -> Vec<String> {
    let o = if owners { "%U:%G|" } else { "" };
    let others = format!("%P|%y|%m|{o}%s|%T@|%l|%n\\0");
    let dirs = format!("%P|%y|%m|{o}%T@|%n\\0");
    let mut out = vec![];
    let filters: [(&[&str], String); 2] = [
        (&["!", "-type", "d", "!", "-type", "s"], others),
        (&["-type", "d"], dirs),
    ];
    for (filter, fmt) in filters {
        let mut args: Vec<&OsStr> = vec![os(".")];
        args.extend(filter.iter().map(|s| os(s)));
        args.push(os("-printf"));
        args.push(os(&fmt));
        let raw = stdout_of(root, "find", &args);
        out.extend(raw.split(|&b| b == 0).filter(|r| !r.is_empty()).map(show));
    }
    out.sort();
    out
}

/// `getfattr -R -h -d -m - -e hex .` in `root`: one block per entry with attributes
/// (`# file: PATH` and `name=0xVALUE` lines), blocks sorted.
fn xattr_dump(root: &Path) -> Vec<String> {
    let raw = stdout_of(
        root,
        "getfattr",
        &[
            os("-R"),
            os("-h"),
            os("-d"),
            os("-m"),
            os("-"),
            os("-e"),
            os("hex"),
            os("."),
        ],
    );
    let text = show(&raw).replace("\\x0a", "\n");
    let mut blocks: Vec<String> = text
        .split("\n\n")
        .map(|b| b.trim().to_string())
        .filter(|b| !b.is_empty())
        .collect();
    blocks.sort();
    blocks
}

/// The `lsattr -d` flags of `root/rel` (the path column dropped).
fn lsattr(root: &Path, rel: &[u8]) -> String {
    let p = if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(OsStr::from_bytes(rel))
    };
    let raw = stdout_of(root, "lsattr", &[os("-d"), p.as_os_str()]);
    let text = String::from_utf8_lossy(&raw).into_owned();
    text.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// `lsattr -d` of every regular file and directory under `root`, by relative path.
fn flags_of_tree(root: &Path) -> BTreeMap<String, String> {
    scan(root)
        .into_iter()
        .filter(|(_, m)| matches!(m.kind, Kind::File | Kind::Dir))
        .map(|(rel, _)| (show(&rel), lsattr(root, &rel)))
        .collect()
}

/// Allocated bytes of a file (`st_blocks * 512`), after flushing it.
fn allocated(p: &Path) -> u64 {
    let f = fs::File::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    f.sync_all().expect("fsync");
    f.metadata().expect("fstat").blocks() * 512
}

/// Sets an extended attribute on `p` itself (`setfattr -h`).
#[track_caller]
fn setfattr(p: &Path, name: &str, value: &str) {
    run_prog(
        "setfattr",
        &[
            os("-h"),
            os("-n"),
            os(name),
            os("-v"),
            os(value),
            p.as_os_str(),
        ],
    );
}

/// `chown -h OWNER p`.
#[track_caller]
fn chown(p: &Path, owner: &str) {
    run_prog("chown", &[os("-h"), os(owner), p.as_os_str()]);
}

#[track_caller]
fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
}

/// Gives every entry under `root` an mtime (with nanoseconds) from a list reaching from
/// 1901 to 2200: files, links and special files first, then directories deepest first,
/// so creating nothing changes them afterwards.
fn set_all_mtimes(root: &Path) {
    const TIMES: [&str; 7] = [
        "1901-12-20 01:02:03",
        "1969-12-31 23:59:59",
        "1960-02-29 12:00:00",
        "2021-03-04 05:06:07",
        "2038-01-19 03:14:08",
        "2106-02-07 06:28:16",
        "2200-01-01 00:00:00",
    ];
    let mut all: Vec<(PathBuf, Kind)> = scan(root)
        .into_iter()
        .filter(|(_, m)| m.kind != Kind::Socket)
        .map(|(rel, m)| (root.join(OsStr::from_bytes(&rel)), m.kind))
        .collect();
    all.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
    let (dirs, others): (Vec<_>, Vec<_>) = all.into_iter().partition(|(_, k)| *k == Kind::Dir);
    for (i, (p, _)) in others.iter().chain(dirs.iter()).enumerate() {
        let when = format!(
            "{}.{:09} UTC",
            TIMES[i % TIMES.len()],
            100_000_001 + i * 7_654_321
        );
        set_mtime(p, &when);
    }
}

/// Strings of a JSON array.
#[track_caller]
fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().expect("a string").to_string())
        .collect()
}

/// Takes the immutable and append-only flags off these paths when dropped (on a panic
/// too), so the temporary directories holding them can be removed.
struct Unseal(Vec<PathBuf>);

impl Drop for Unseal {
    fn drop(&mut self) {
        for p in &self.0 {
            if fs::symlink_metadata(p).is_ok() {
                let _ = Command::new("chattr").args(["-i", "-a"]).arg(p).status();
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// 1. Everything, as root
// ---------------------------------------------------------------------------------------

/// Size of the sparse file of [`build_rich_tree`], and where its 8 KiB of data are.
const SPARSE_SIZE: u64 = 1 << 30;
const SPARSE_AT: u64 = 512 << 20;

/// What [`build_rich_tree`] made that the test checks by name.
struct Rich {
    sock: PathBuf,
    sealed: Vec<&'static str>,
    sparse_data: Vec<u8>,
}

/// A tree with every attribute backupd keeps; `unseal` learns the files made immutable
/// or append-only before they are.
fn build_rich_tree(src: &Path, unseal: &mut Unseal) -> Rich {
    for d in [
        "",
        "xdir",
        "acl_dir",
        "hl/a",
        "hl/b",
        "empty_dir",
        "modes/sticky",
        "modes/setgid_dir",
        "owned_dir",
        "flagdir",
        "names",
        "special",
        "links",
        "flags",
    ] {
        fs::create_dir_all(src.join(d)).unwrap();
    }
    // user.* and trusted.* on a file and a directory; many names (a list longer than a
    // first 1 KiB buffer) and a large value on another file; trusted.* on a symlink, a
    // FIFO and a device.
    let file_x = src.join("xdir/file_x");
    fs::write(&file_x, b"a file with attributes\n").unwrap();
    setfattr(&file_x, "user.colour", "0x626c7565");
    setfattr(&file_x, "trusted.secret", "0x00ff7f80");
    setfattr(&src.join("xdir"), "user.dir", "directory value");
    setfattr(&src.join("xdir"), "trusted.dir", "0x01020304");
    let many = src.join("xdir/many");
    fs::write(&many, b"many attributes\n").unwrap();
    for i in 0..40 {
        setfattr(
            &many,
            &format!("user.many.attribute.number.{i:02}"),
            &format!("0x{i:02x}"),
        );
    }
    let big: String = (0..2000)
        .map(|i| format!("{:02x}", (i * 7) % 256))
        .collect();
    setfattr(&many, "user.big", &format!("0x{big}"));
    symlink("../xdir/file_x", src.join("links/trusted_link")).unwrap();
    setfattr(&src.join("links/trusted_link"), "trusted.link", "0xabcdef");

    // ACLs: an access ACL on a file; access and default ACLs on a directory, and a file
    // made in it afterwards (it inherits one).
    let acl_file = src.join("acl_file");
    fs::write(&acl_file, b"acl\n").unwrap();
    run_prog(
        "setfacl",
        &[
            os("-m"),
            os("u:1234:rw-,g:2345:r--,m::rw-"),
            acl_file.as_os_str(),
        ],
    );
    let acl_dir = src.join("acl_dir");
    run_prog(
        "setfacl",
        &[os("-m"), os("u:1234:rwx,g:2345:r-x"), acl_dir.as_os_str()],
    );
    run_prog(
        "setfacl",
        &[
            os("-d"),
            os("-m"),
            os("u:1234:r-x,g:2345:rwx"),
            acl_dir.as_os_str(),
        ],
    );
    fs::write(acl_dir.join("inherited"), b"inherits the default ACL\n").unwrap();

    // A file capability.
    let cap = src.join("cap_true");
    fs::copy("/bin/true", &cap).unwrap();
    run_prog("setcap", &[os("cap_net_bind_service+ep"), cap.as_os_str()]);

    // Special files: a FIFO, two devices, a socket.
    let special = src.join("special");
    run_prog("mkfifo", &[special.join("fifo").as_os_str()]);
    run_prog(
        "mknod",
        &[special.join("chr").as_os_str(), os("c"), os("1"), os("3")],
    );
    run_prog(
        "mknod",
        &[special.join("blk").as_os_str(), os("b"), os("7"), os("200")],
    );
    setfattr(&special.join("fifo"), "trusted.fifo", "0x6669666f");
    setfattr(&special.join("chr"), "trusted.dev", "0x00");
    let sock = special.join("sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());

    // A sparse file: 1 GiB holding 8 KiB of data.
    let sparse_data = random_bytes(8192);
    let f = fs::File::create(src.join("sparse1g")).unwrap();
    f.set_len(SPARSE_SIZE).unwrap();
    f.write_all_at(&sparse_data, SPARSE_AT).unwrap();
    f.sync_all().unwrap();
    drop(f);

    // Names: not UTF-8 (a file and a directory), with a newline, 255 bytes long.
    let names = src.join("names");
    fs::write(
        names.join(OsStr::from_bytes(b"raw-\xff\xfe")),
        b"raw name\n",
    )
    .unwrap();
    let raw_dir = names.join(OsStr::from_bytes(b"dir-\xc3\x28"));
    fs::create_dir(&raw_dir).unwrap();
    fs::write(raw_dir.join("inner"), b"inner\n").unwrap();
    fs::write(names.join("new\nline"), b"newline in the name\n").unwrap();
    let long = "n".repeat(255);
    fs::write(names.join(&long), b"255-byte name\n").unwrap();

    // Symlinks: dangling, looping (two, and one onto itself).
    let links = src.join("links");
    symlink("/nonexistent/backupd-test/nowhere", links.join("dangling")).unwrap();
    symlink("loop_b", links.join("loop_a")).unwrap();
    symlink("loop_a", links.join("loop_b")).unwrap();
    symlink("self", links.join("self")).unwrap();
    symlink("../empty_file", links.join("owned_link")).unwrap();

    // Owners without a name; chown before chmod (chown clears set-id bits).
    fs::write(src.join("owned_dir/owned_file"), b"owned by 54321\n").unwrap();
    chown(&src.join("owned_dir"), "54321:54321");
    chown(&src.join("owned_dir/owned_file"), "54321:54321");
    chown(&links.join("owned_link"), "54321:54321");
    chmod(&src.join("owned_dir"), 0o750);
    chmod(&src.join("owned_dir/owned_file"), 0o640);

    // Set-id and sticky modes.
    let modes = src.join("modes");
    fs::write(modes.join("setuid"), b"#!/bin/sh\n").unwrap();
    fs::write(modes.join("setgid"), b"#!/bin/sh\n").unwrap();
    fs::write(modes.join("no_permissions"), b"mode 0\n").unwrap();
    chmod(&modes.join("setuid"), 0o4755);
    chmod(&modes.join("setgid"), 0o2755);
    chmod(&modes.join("no_permissions"), 0);
    chmod(&modes.join("sticky"), 0o1777);
    chmod(&modes.join("setgid_dir"), 0o2775);

    // Hard links across directories (three names), empty file and directory.
    fs::write(src.join("hl/a/first"), b"three names, one inode\n").unwrap();
    fs::hard_link(src.join("hl/a/first"), src.join("hl/b/second")).unwrap();
    fs::hard_link(src.join("hl/a/first"), src.join("hl/third")).unwrap();
    fs::write(src.join("empty_file"), b"").unwrap();

    // Files to be flagged.
    for n in ["nodump", "noatime", "append", "immutable"] {
        fs::write(src.join("flags").join(n), format!("{n}\n")).unwrap();
    }
    fs::write(src.join("flagdir/in_flagdir"), b"x\n").unwrap();

    set_all_mtimes(src);

    // File flags last: nothing can change an immutable or append-only file after this.
    let sealed = vec!["flags/append", "flags/immutable"];
    unseal.0.extend(sealed.iter().map(|s| src.join(s)));
    for (rel, flag) in [
        ("flags/nodump", "+d"),
        ("flags/noatime", "+A"),
        ("flags/append", "+a"),
        ("flags/immutable", "+i"),
        ("flagdir", "+A"),
    ] {
        run_prog("chattr", &[os(flag), src.join(rel).as_os_str()]);
    }

    // The setup made what the test claims to cover.
    assert_eq!(lmeta(&modes.join("setuid")).mode & 0o7777, 0o4755);
    assert_eq!(lmeta(&links.join("owned_link")).uid, 54321);
    assert_eq!(lmeta(&src.join("hl/third")).nlink, 3);
    assert_eq!(lmeta(&special.join("sock")).kind, Kind::Socket);
    assert!(allocated(&src.join("sparse1g")) < 1 << 20);
    let want = [
        ("flags/nodump", 'd'),
        ("flags/noatime", 'A'),
        ("flags/append", 'a'),
        ("flags/immutable", 'i'),
        ("flagdir", 'A'),
    ];
    for (rel, c) in want {
        assert!(
            lsattr(src, rel.as_bytes()).contains(c),
            "{rel} is not flagged {c}"
        );
    }
    Rich {
        sock,
        sealed,
        sparse_data,
    }
}

#[test]
fn every_attribute_comes_back_as_root() {
    let repo = Repo::new();
    let work = tempfile::tempdir().unwrap();
    let tdir = tempfile::tempdir().unwrap();
    let mut unseal = Unseal(vec![]);
    let src = work.path().join("src");
    let rich = build_rich_tree(&src, &mut unseal);

    // Backup: exit 0, the socket skipped and named, holes not read.
    let out = repo
        .cmd()
        .args([os("backup"), os("--json"), src.as_os_str()])
        .run()
        .ok();
    let sock = rich.sock.display().to_string();
    let out = out.stderr_has(&format!("skipped special file {sock}"));
    let summary = out.json();
    assert_eq!(
        strings(&summary["skipped_special"]),
        [format!("{sock} (socket)")],
        "{summary}"
    );
    for k in ["unreadable", "changed_while_read", "not_kept"] {
        assert_eq!(strings(&summary[k]), Vec::<String>::new(), "{k}: {summary}");
    }
    let features: BTreeSet<String> = strings(&summary["features"]).into_iter().collect();
    let want: BTreeSet<String> = ["file-flags", "sparse", "special-files", "xattrs"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(features, want, "{summary}");
    // Every regular file is read by each of its names; of the sparse one only its data.
    let dense: u64 = scan(&src)
        .iter()
        .filter(|(rel, m)| m.kind == Kind::File && rel.as_slice() != b"sparse1g")
        .map(|(_, m)| m.size)
        .sum();
    assert_eq!(
        summary["bytes_read"].as_u64(),
        Some(dense + 8192),
        "bytes_read: the 1 GiB file's holes were read? {summary}"
    );
    assert!(
        summary["bytes_total"].as_u64().unwrap_or(0) >= SPARSE_SIZE,
        "{summary}"
    );

    // Restore with --file-flags into a fresh target.
    let target = tdir.path().join("restore");
    let restored = restored_path(&target, &src);
    unseal
        .0
        .extend(rich.sealed.iter().map(|s| restored.join(s)));
    let out = repo
        .cmd()
        .args([
            os("restore"),
            os("latest"),
            os("--file-flags"),
            os("--json"),
        ])
        .arg("--target")
        .arg(&target)
        .run();
    let r = out.json();
    let out = out.ok();
    assert!(out.stderr.trim().is_empty(), "{}", out.describe());
    assert_eq!(r["warnings"], Value::Array(vec![]), "{r}");
    assert_eq!(r["failed"], Value::Array(vec![]), "{r}");
    assert_eq!(r["flags_not_set"], 0, "{r}");
    assert_eq!(r["specials"], 3, "{r}");

    // Type, mode, owner, size, mtime (ns), link target, link count of every entry.
    assert_eq!(listing(&restored, true), listing(&src, true));
    // Device numbers.
    let dev = |root: &Path| {
        String::from_utf8(stdout_of(
            root,
            "stat",
            &[
                os("-c"),
                os("%n %F %t %T"),
                os("special/chr"),
                os("special/blk"),
            ],
        ))
        .unwrap()
    };
    assert_eq!(
        dev(&restored),
        "special/chr character special file 1 3\nspecial/blk block special file 7 c8\n"
    );
    assert_eq!(dev(&restored), dev(&src));
    // Extended attributes of every namespace, on every kind of entry.
    let xs = xattr_dump(&src);
    let joined = xs.join("\n");
    for name in [
        "user.colour",
        "user.big",
        "user.many.attribute.number.39",
        "trusted.secret",
        "trusted.dir",
        "trusted.link",
        "trusted.fifo",
        "trusted.dev",
        "security.capability",
        "system.posix_acl_access",
        "system.posix_acl_default",
    ] {
        assert!(joined.contains(name), "setup: no {name} in\n{joined}");
    }
    assert_eq!(xattr_dump(&restored), xs);
    // File flags of files and directories.
    assert_eq!(flags_of_tree(&restored), flags_of_tree(&src));

    // Hard links are one inode again; the sparse file has its holes and its data.
    let first = lmeta(&restored.join("hl/a/first"));
    assert_eq!(first.ino, lmeta(&restored.join("hl/b/second")).ino);
    assert_eq!(first.ino, lmeta(&restored.join("hl/third")).ino);
    let sparse = restored.join("sparse1g");
    assert_eq!(lmeta(&sparse).size, SPARSE_SIZE);
    let alloc = allocated(&sparse);
    assert!(
        alloc < 1 << 20,
        "the restored 1 GiB file allocates {alloc} bytes"
    );
    let mut back = vec![0u8; 8192];
    fs::File::open(&sparse)
        .unwrap()
        .read_exact_at(&mut back, SPARSE_AT)
        .unwrap();
    assert!(back == rich.sparse_data, "the sparse file's data differ");

    // Without --file-flags the flags are counted, not set.
    let plain = tdir.path().join("plain");
    let out = repo
        .cmd()
        .args([
            os("restore"),
            os("latest"),
            os("--target"),
            plain.as_os_str(),
        ])
        .run()
        .ok();
    assert!(
        out.stdout()
            .contains("5 entries have file flags (chattr) that were not set"),
        "{}",
        out.describe()
    );
    let plain_src = restored_path(&plain, &src);
    for rel in ["flags/immutable", "flags/append", "flags/nodump", "flagdir"] {
        let f = lsattr(&plain_src, rel.as_bytes());
        assert!(
            !f.contains(['i', 'a', 'd', 'A']),
            "{rel} has flags {f} without --file-flags"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 2. As an unprivileged user
// ---------------------------------------------------------------------------------------

const NOBODY: u32 = 65534;

/// What [`build_nobody_tree`] made that the test checks by name.
struct Unprivileged {
    sock: PathBuf,
}

/// A tree `nobody` can read: its own files with user.* and trusted.* attributes, ACLs,
/// a capability, a FIFO, devices, a socket, a flag, and some entries of other owners.
fn build_nobody_tree(src: &Path) -> Unprivileged {
    for d in [
        "", "xdir", "acl_dir", "special", "hl/a", "hl/b", "sticky", "root_dir",
    ] {
        fs::create_dir_all(src.join(d)).unwrap();
    }
    let plain = src.join("xdir/plain");
    fs::write(&plain, b"user and trusted attributes\n").unwrap();
    fs::write(src.join("acl_file"), b"acl\n").unwrap();
    fs::copy("/bin/true", src.join("cap_true")).unwrap();
    fs::write(src.join("hl/a/one"), b"two names\n").unwrap();
    fs::hard_link(src.join("hl/a/one"), src.join("hl/b/two")).unwrap();
    fs::write(src.join("setuid"), b"#!/bin/sh\n").unwrap();
    fs::write(src.join("nodump"), b"flagged\n").unwrap();
    fs::write(
        src.join("root_dir/inner"),
        b"nobody's file in root's directory\n",
    )
    .unwrap();
    fs::write(src.join("root_file"), b"root's\n").unwrap();
    fs::write(src.join("foreign_file"), b"54321's\n").unwrap();
    symlink("xdir/plain", src.join("rel_link")).unwrap();
    symlink("acl_file", src.join("foreign_link")).unwrap();
    let special = src.join("special");
    run_prog("mkfifo", &[special.join("fifo").as_os_str()]);
    run_prog(
        "mknod",
        &[special.join("chr").as_os_str(), os("c"), os("1"), os("3")],
    );
    run_prog(
        "mknod",
        &[special.join("blk").as_os_str(), os("b"), os("7"), os("200")],
    );
    let sock = special.join("sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let f = fs::File::create(src.join("sparse")).unwrap();
    f.set_len(64 << 20).unwrap();
    f.write_all_at(b"data in the middle", 32 << 20).unwrap();
    drop(f);

    // Everything nobody's, but for a few entries; then modes, attributes, times.
    run_prog(
        "chown",
        &[os("-R"), os("-h"), os("nobody:nogroup"), src.as_os_str()],
    );
    chown(&src.join("root_dir"), "0:0");
    chown(&src.join("root_file"), "0:0");
    chown(&src.join("foreign_file"), "54321:54321");
    chown(&src.join("foreign_link"), "54321:54321");
    for p in scan(src).keys() {
        let p = src.join(OsStr::from_bytes(p));
        let m = lmeta(&p);
        match m.kind {
            Kind::Dir => chmod(&p, 0o755),
            Kind::File => chmod(&p, 0o644),
            _ => {}
        }
    }
    chmod(&src.join("cap_true"), 0o755);
    chmod(&src.join("setuid"), 0o4755);
    chmod(&src.join("sticky"), 0o1777);
    setfattr(&plain, "user.note", "0x6e6f7465");
    setfattr(&plain, "trusted.hidden", "0x686964");
    setfattr(&src.join("xdir"), "user.dir", "0x646972");
    run_prog(
        "setfacl",
        &[
            os("-m"),
            os("u:1234:rw-,m::rw-"),
            src.join("acl_file").as_os_str(),
        ],
    );
    run_prog(
        "setfacl",
        &[os("-m"), os("u:1234:rwx"), src.join("acl_dir").as_os_str()],
    );
    run_prog(
        "setfacl",
        &[
            os("-d"),
            os("-m"),
            os("u:1234:r-x"),
            src.join("acl_dir").as_os_str(),
        ],
    );
    fs::write(src.join("acl_dir/inherited"), b"inherited ACL\n").unwrap();
    chown(&src.join("acl_dir/inherited"), "nobody:nogroup");
    run_prog(
        "setcap",
        &[
            os("cap_net_bind_service+ep"),
            src.join("cap_true").as_os_str(),
        ],
    );
    set_all_mtimes(src);
    run_prog("chattr", &[os("+d"), src.join("nodump").as_os_str()]);
    assert_eq!(lmeta(&src.join("setuid")).mode & 0o7777, 0o4755);
    assert_eq!(lmeta(&src.join("foreign_link")).uid, 54321);
    Unprivileged { sock }
}

#[test]
fn an_unprivileged_user_backs_up_and_restores_what_it_may_and_is_told_what_not() {
    let work = tempfile::tempdir().unwrap();
    chmod(work.path(), 0o755);
    // nobody's own directory: the repository, its cache, the restore target.
    let home = work.path().join("home");
    fs::create_dir(&home).unwrap();
    chown(&home, "nobody:nogroup");
    let src = work.path().join("src");
    let tree = build_nobody_tree(&src);

    let repo = home.join("repo");
    let cache = home.join("cache");
    let env: [(&str, &OsStr); 3] = [
        ("BACKUPD_REPOSITORY", repo.as_os_str()),
        ("BACKUPD_PASSWORD", os(PASSWORD)),
        ("XDG_CACHE_HOME", cache.as_os_str()),
    ];
    let nobody = |args: &[&OsStr]| run_under(&["runuser", "-u", "nobody", "--"], &env, &home, args);
    nobody(&[os("init")]).ok();
    assert_eq!(lmeta(&repo).uid, NOBODY, "the repository is nobody's");

    // The backup reads everything nobody may read: exit 0, the socket skipped.
    let out = nobody(&[os("backup"), os("--json"), src.as_os_str()]).ok();
    let s = out.json();
    let sock = tree.sock.display().to_string();
    assert_eq!(
        strings(&s["skipped_special"]),
        [format!("{sock} (socket)")],
        "{s}"
    );
    assert_eq!(strings(&s["unreadable"]), Vec::<String>::new(), "{s}");
    let features: BTreeSet<String> = strings(&s["features"]).into_iter().collect();
    for f in ["file-flags", "sparse", "special-files", "xattrs"] {
        assert!(features.contains(f), "feature {f} missing: {s}");
    }

    // The restore makes what nobody may make and names each thing it could not.
    let target = home.join("restore");
    let out = nobody(&[
        os("restore"),
        os("latest"),
        os("--json"),
        os("--target"),
        target.as_os_str(),
    ]);
    let r = out.json();
    let out = out.expect(3);
    assert_eq!(r["failed"], Value::Array(vec![]), "{r}");
    assert_eq!(r["flags_not_set"], 1, "{r}");
    let warnings: BTreeMap<String, String> = r["warnings"]
        .as_array()
        .expect("warnings")
        .iter()
        .map(|w| {
            (
                w["path"].as_str().unwrap().to_string(),
                w["warning"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let chr = src.join("special/chr").display().to_string();
    let blk = src.join("special/blk").display().to_string();
    let cap = src.join("cap_true").display().to_string();
    let paths: BTreeSet<&str> = warnings.keys().map(String::as_str).collect();
    let want: BTreeSet<&str> = ["(owners)", &chr, &blk, &cap].into_iter().collect();
    assert_eq!(paths, want, "{r}");
    assert_eq!(
        r["warnings"].as_array().map(Vec::len),
        Some(4),
        "one warning each: {r}"
    );
    let has = |path: &str, words: &[&str]| {
        let w = &warnings[path];
        for word in words {
            assert!(w.contains(word), "warning for {path}: {w:?} lacks {word:?}");
        }
    };
    has(
        &chr,
        &["character device not created", "Operation not permitted"],
    );
    has(
        &blk,
        &["block device not created", "Operation not permitted"],
    );
    has(
        &cap,
        &[
            "extended attribute security.capability",
            "Operation not permitted",
        ],
    );
    // Entries of other owners: the ancestors of the source and the four made so, hard
    // links once; devices are not made, sockets not backed up.
    let mut foreign = 0;
    let mut inodes = BTreeSet::new();
    for m in scan(&src).values() {
        if matches!(m.kind, Kind::Socket | Kind::Other) || !inodes.insert(m.ino) {
            continue;
        }
        foreign += usize::from((m.uid, m.gid) != (NOBODY, NOBODY));
    }
    assert_eq!(foreign, 4, "setup: entries of other owners");
    for a in src.ancestors().skip(1) {
        if a != Path::new("/") {
            let m = lmeta(a);
            foreign += usize::from((m.uid, m.gid) != (NOBODY, NOBODY));
        }
    }
    has(
        "(owners)",
        &[&format!(
            "{foreign} entries belong to other users or groups"
        )],
    );
    for (p, w) in &warnings {
        let line = format!("backupd: warning: {p}: {w}");
        assert!(
            out.stderr.contains(&line),
            "{line:?} not on stderr:\n{}",
            out.describe()
        );
    }

    // Nothing else differs: every entry but the devices (and the socket) is there with
    // its type, mode, size, mtime, link target and link count, and nobody owns it.
    let restored = restored_path(&target, &src);
    let expected: Vec<String> = listing(&src, false)
        .into_iter()
        .filter(|l| !l.starts_with("special/chr|") && !l.starts_with("special/blk|"))
        .collect();
    assert_eq!(listing(&restored, false), expected);
    for (rel, m) in scan(&restored) {
        assert_eq!((m.uid, m.gid), (NOBODY, NOBODY), "owner of {}", show(&rel));
    }
    assert!(fs::symlink_metadata(restored.join("special/chr")).is_err());
    assert!(fs::symlink_metadata(restored.join("special/blk")).is_err());
    // user.* and ACLs come back; trusted.* was never readable, the capability not
    // settable: the source's attributes without those.
    let source_x = xattr_dump(&src);
    let joined = source_x.join("\n");
    for name in [
        "trusted.hidden",
        "security.capability",
        "user.note",
        "system.posix_acl_default",
    ] {
        assert!(joined.contains(name), "setup: no {name} in\n{joined}");
    }
    let expected_x: Vec<String> = source_x
        .iter()
        .filter_map(|b| {
            let kept: Vec<&str> = b
                .lines()
                .filter(|l| !l.starts_with("trusted.") && !l.starts_with("security.capability="))
                .collect();
            (kept.len() > 1).then(|| kept.join("\n"))
        })
        .collect();
    assert_eq!(xattr_dump(&restored), expected_x);
    assert_eq!(
        fs::read(restored.join("sparse")).unwrap(),
        fs::read(src.join("sparse")).unwrap()
    );

    // The same tree backed up as root, nobody's snapshot its parent: the unchanged files'
    // attributes are read again (nobody could not read trusted.*), not taken from it.
    let as_root = |args: &[&OsStr]| run_under(&["env"], &env, &home, args);
    let s = as_root(&[os("backup"), os("--json"), src.as_os_str()])
        .ok()
        .json();
    assert!(s["files_unchanged"].as_u64().unwrap() > 5, "{s}");
    let plain = src.join("xdir/plain");
    let ls = as_root(&[os("ls"), os("--json"), os("latest"), plain.as_os_str()]).ok();
    let names: Vec<String> = ls.ndjson()[0]["xattrs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["trusted.hidden", "user.note"]);
}

// ---------------------------------------------------------------------------------------
// 3. Sparse files
// ---------------------------------------------------------------------------------------

const TIB: u64 = 1 << 40;
const MIB: u64 = 1 << 20;

/// `[start, end)` of `(offset, len)` widened to 4 KiB blocks.
fn block_span(off: u64, len: u64) -> (u64, u64) {
    (off / 4096 * 4096, (off + len).div_ceil(4096) * 4096)
}

/// Asserts that the data extents of `p` (`SEEK_DATA`/`SEEK_HOLE`) lie within `spans` and
/// cover each of them.
#[track_caller]
fn assert_extents_within(p: &Path, size: u64, spans: &[(u64, u64)]) {
    let f = fs::File::open(p).unwrap();
    f.sync_all().unwrap();
    let ext = backupd::fsattr::data_extents(&f, size)
        .unwrap_or_else(|| panic!("{}: no holes found", p.display()));
    for &(o, l) in &ext {
        assert!(
            spans.iter().any(|&(s, e)| s <= o && o + l <= e),
            "{}: data at [{o}, {}) outside the data written there {spans:?}; extents {ext:?}",
            p.display(),
            o + l
        );
    }
    for &(s, e) in spans {
        let covered: u64 = ext
            .iter()
            .map(|&(o, l)| (o + l).min(e).saturating_sub(o.max(s)))
            .sum();
        assert_eq!(covered, e - s, "[{s}, {e}) is not all data: {ext:?}");
    }
}

#[test]
fn sparse_files_keep_their_holes_and_restore_sparse_punches_zero_runs() {
    let repo = Repo::new();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("sparse_src");
    fs::create_dir(&src).unwrap();
    // 1 TiB holding 10 MiB in five regions, one not block-aligned, a hole at the end.
    let regions: [(u64, u64); 5] = [
        (0, MIB),
        ((4 << 30) + 3 * 4096 + 100, 3 * MIB),
        (300 << 30, 2 * MIB),
        ((777 << 30) + 65536, 3 * MIB),
        (TIB - 5 * MIB, MIB),
    ];
    assert_eq!(regions.iter().map(|r| r.1).sum::<u64>(), 10 * MIB);
    let big = src.join("tib");
    let f = fs::File::create(&big).unwrap();
    f.set_len(TIB).unwrap();
    let mut data = vec![];
    for &(off, len) in &regions {
        let d = random_bytes(len as usize);
        f.write_all_at(&d, off).unwrap();
        data.push(d);
    }
    f.sync_all().unwrap();
    drop(f);
    let spans: Vec<(u64, u64)> = regions.iter().map(|&(o, l)| block_span(o, l)).collect();

    let s = repo.backup(&[&src]);
    let read: u64 = spans.iter().map(|(s, e)| e - s).sum();
    assert_eq!(
        s["bytes_read"].as_u64(),
        Some(read),
        "only the data blocks are read: {s}"
    );
    assert_eq!(s["bytes_total"].as_u64(), Some(TIB), "{s}");
    assert!(
        strings(&s["features"]).contains(&"sparse".to_string()),
        "{s}"
    );

    let target = repo.scratch("r1");
    repo.ok(&[
        os("restore"),
        os("latest"),
        os("--target"),
        target.as_os_str(),
    ]);
    let back = restored_path(&target, &big);
    assert_eq!(lmeta(&back).size, TIB);
    let alloc = allocated(&back);
    assert!(
        (10 * MIB..16 * MIB).contains(&alloc),
        "the restored 1 TiB file allocates {alloc} bytes"
    );
    let rf = fs::File::open(&back).unwrap();
    for (&(off, len), d) in regions.iter().zip(&data) {
        let mut buf = vec![0u8; len as usize];
        rf.read_exact_at(&mut buf, off).unwrap();
        assert!(buf == *d, "the region at {off} differs");
    }
    assert_extents_within(&back, TIB, &spans);

    // 64 MiB of written zeros (no holes) but for nine blocks (one in each 8 MiB, and the
    // one holding a few bytes at an odd offset) and 6 MiB of random bytes: chunks end at
    // content-defined places in those, so the zeros after them start and end blobs at
    // offsets that are not block-aligned.
    let dsrc = work.path().join("dense_src");
    fs::create_dir(&dsrc).unwrap();
    let dense = dsrc.join("zeros");
    let mut content = vec![0u8; 64 << 20];
    let mut nonzero = vec![];
    for k in 0..8u64 {
        let at = k * 8 * MIB + (k + 1) * 4096;
        content[at as usize..at as usize + 4096].copy_from_slice(&random_bytes(4096));
        nonzero.push((at, at + 4096));
    }
    let odd = 5 * MIB + 100;
    content[odd as usize..odd as usize + 10].copy_from_slice(b"0123456789");
    nonzero.push(block_span(odd, 10));
    let (from, to) = (41 * MIB, 47 * MIB);
    content[from as usize..to as usize].copy_from_slice(&random_bytes((to - from) as usize));
    nonzero.push((from, to));
    fs::write(&dense, &content).unwrap();
    assert!(allocated(&dense) >= 64 * MIB, "setup: the file is dense");
    repo.backup(&[&dsrc]);

    let plain = repo.scratch("r2");
    repo.ok(&[
        os("restore"),
        os("latest"),
        os("--target"),
        plain.as_os_str(),
    ]);
    let p = restored_path(&plain, &dense);
    assert!(
        fs::read(&p).unwrap() == content,
        "plain restore: content differs"
    );
    let a = allocated(&p);
    assert!(
        (64 * MIB..65 * MIB).contains(&a),
        "a plain restore writes the zeros: {a} bytes allocated"
    );
    assert_eq!(
        backupd::fsattr::data_extents(&fs::File::open(&p).unwrap(), 64 * MIB),
        None,
        "a plain restore made holes"
    );

    let sparse = repo.scratch("r3");
    repo.ok(&[
        os("restore"),
        os("latest"),
        os("--sparse"),
        os("--target"),
        sparse.as_os_str(),
    ]);
    let p = restored_path(&sparse, &dense);
    assert!(
        fs::read(&p).unwrap() == content,
        "--sparse: content differs"
    );
    // Data only where a block holds something but zeros, and allocated only that (and a
    // block of extent tree).
    nonzero.sort();
    assert_extents_within(&p, 64 * MIB, &nonzero);
    let a = allocated(&p);
    let want: u64 = nonzero.iter().map(|(s, e)| e - s).sum();
    assert!(
        (want..want + 8192).contains(&a),
        "--sparse allocates {a} bytes; the non-zero blocks are {want}"
    );
}

// ---------------------------------------------------------------------------------------
// 4. Long and deep paths
// ---------------------------------------------------------------------------------------

/// The descriptor limit backupd runs under, and the depth of the deep chain.
const NOFILE: usize = 64;
const DEEP: usize = 300;
// One descriptor per level would run out well before the bottom.
const _: () = assert!(DEEP > 2 * NOFILE);

/// Makes directory `name` in `dir` (it must be new) and opens it.
fn mkdir_at(dir: &OwnedFd, name: &str) -> OwnedFd {
    let (fd, created) = backupd::dirfd::ensure_dir(dir, OsStr::new(name), 0o755, false)
        .unwrap_or_else(|e| panic!("mkdir {name}: {e}"));
    assert!(created, "{name} existed");
    fd
}

fn write_at(dir: &OwnedFd, name: &str, data: &[u8]) {
    use std::io::Write;
    let mut f = backupd::dirfd::create_file(dir, OsStr::new(name), 0o644).unwrap();
    f.write_all(data).unwrap();
}

/// Every entry below `dir`, walked by descriptors: relative path -> kind, mode, size,
/// mtime and content (files) or target (symlinks).
fn walk_fd(dir: &OwnedFd, prefix: &[u8], out: &mut BTreeMap<Vec<u8>, String>) {
    use backupd::dirfd;
    use rustix::fs::FileType;
    let mut names = dirfd::list(dir).expect("listing");
    names.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, _) in names {
        let n = OsStr::from_bytes(&name);
        let mut rel = prefix.to_vec();
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(&name);
        let st = dirfd::lstat_at(dir, n).expect("lstat").expect("listed");
        let head = format!(
            "{} {:o} mtime {}",
            dirfd::kind_word(dirfd::file_type(&st)),
            st.st_mode & 0o7777,
            dirfd::mtime_ns(&st)
        );
        match dirfd::file_type(&st) {
            FileType::Directory => {
                out.insert(rel.clone(), head);
                let sub = dirfd::open_subdir(dir, n).expect("open subdirectory");
                walk_fd(&sub, &rel, out);
            }
            FileType::RegularFile => {
                let data = dirfd::read_file(dir, n, 1 << 20).unwrap().unwrap();
                out.insert(rel, format!("{head} size {} {}", st.st_size, show(&data)));
            }
            FileType::Symlink => {
                let t = dirfd::read_link_at(dir, n).unwrap();
                out.insert(rel, format!("{head} -> {}", show(&t)));
            }
            _ => {
                out.insert(rel, head);
            }
        }
    }
}

#[test]
fn paths_longer_than_path_max_and_deeper_than_the_descriptor_limit_restore() {
    let repo = Repo::new();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir(&src).unwrap();
    let root = backupd::dirfd::open_dir_path(&src).unwrap();

    // (a) 30 directories with 200-byte names, a file at the bottom: > 6,000 bytes.
    let mut cur = mkdir_at(&root, "long");
    let mut path_len = src.as_os_str().len() + 5;
    for i in 0..30 {
        let name = format!("{i:03}{}", "L".repeat(197));
        assert_eq!(name.len(), 200);
        cur = mkdir_at(&cur, &name);
        path_len += 201;
    }
    write_at(&cur, "bottom.txt", b"at the end of a 6000-byte path\n");
    path_len += 11;
    assert!(path_len > 6000, "{path_len}");
    // (b) 300 one-character directories, a file every 50 levels and at the bottom.
    let mut cur = mkdir_at(&root, "deep");
    for i in 0..DEEP {
        cur = mkdir_at(&cur, "d");
        if i % 50 == 49 {
            write_at(&cur, "f", format!("level {i}\n").as_bytes());
        }
    }
    write_at(&cur, "bottom.txt", b"300 levels down\n");
    backupd::dirfd::symlink_at(b"../f", &cur, OsStr::new("up")).unwrap();
    drop(cur);

    let mut want = BTreeMap::new();
    walk_fd(&root, b"", &mut want);
    assert_eq!(want.len(), 1 + 30 + 1 + 1 + DEEP + DEEP / 50 + 2);

    // backupd under a descriptor limit far below the depth.
    let limit = format!("--nofile={NOFILE}:{NOFILE}");
    let shell = Command::new("prlimit")
        .args([&limit, "--", "sh", "-c", "ulimit -n"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&shell.stdout).trim(),
        NOFILE.to_string()
    );
    let cache = repo.scratch("cache");
    let env: [(&str, &OsStr); 2] = [
        ("BACKUPD_PASSWORD", os(PASSWORD)),
        ("XDG_CACHE_HOME", cache.as_os_str()),
    ];
    let limited = |args: &[&OsStr]| {
        let mut all = vec![os("--repo"), os(&repo.location)];
        all.extend_from_slice(args);
        run_under(&["prlimit", &limit, "--"], &env, work.path(), &all)
    };
    // Both runs are tried, so a failure of the backup does not hide one of the restore.
    let mut problems = vec![];
    let out = limited(&[os("backup"), os("--json"), src.as_os_str()]);
    if out.code() == 0 {
        let s = out.json();
        if strings(&s["unreadable"]) != Vec::<String>::new()
            || s["files_new"] != 1 + DEEP as u64 / 50 + 1
        {
            problems.push(format!("backup under {limit}: {s}"));
        }
    } else {
        problems.push(format!("backup under {limit}:\n{}", out.describe()));
        // A complete snapshot, for the restore to be tried all the same.
        repo.backup(&[&src]);
    }
    let target = repo.scratch("restore");
    let out = limited(&[
        os("restore"),
        os("latest"),
        os("--target"),
        target.as_os_str(),
    ]);
    if out.code() != 0 || !out.stderr.trim().is_empty() {
        problems.push(format!("restore under {limit}:\n{}", out.describe()));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));

    let back = backupd::dirfd::open_dir_path(&restored_path(&target, &src)).unwrap();
    let mut got = BTreeMap::new();
    walk_fd(&back, b"", &mut got);
    let missing: Vec<String> = want
        .keys()
        .filter(|k| !got.contains_key(*k))
        .map(|k| {
            format!(
                "{} bytes: ...{}",
                k.len(),
                show(&k[k.len().saturating_sub(60)..])
            )
        })
        .collect();
    assert!(
        missing.is_empty(),
        "{} entries missing, first: {:?}",
        missing.len(),
        missing.first()
    );
    let differ: Vec<String> = want
        .iter()
        .filter(|(k, v)| got.get(*k).is_some_and(|g| g != *v))
        .map(|(k, v)| {
            format!(
                "...{}: {} != {}",
                show(&k[k.len().saturating_sub(60)..]),
                got[k],
                v
            )
        })
        .collect();
    assert!(
        differ.is_empty(),
        "{} entries differ, first: {:?}",
        differ.len(),
        differ.first()
    );
    assert_eq!(got.len(), want.len(), "extra entries restored");
}

// ---------------------------------------------------------------------------------------
// 5. Exclusion options
// ---------------------------------------------------------------------------------------

/// A tmpfs mounted on a directory, unmounted when dropped (on a panic too).
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts one; a failure fails the test.
    fn mount(dir: &Path) -> Tmpfs {
        run_prog(
            "mount",
            &[os("-t"), os("tmpfs"), os("none"), dir.as_os_str()],
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

#[test]
fn exclusion_options_leave_out_what_they_name() {
    let repo = Repo::new();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    for d in [
        "nodump_dir",
        "cache_valid/sub",
        "cache_invalid",
        "marked",
        "unmarked",
        "mnt",
    ] {
        fs::create_dir_all(src.join(d)).unwrap();
    }
    let files: [(&str, &[u8]); 11] = [
        ("keep_file", b"kept\n"),
        ("nodump_file", b"nodump\n"),
        ("nodump_dir/inside", b"in a nodump directory\n"),
        (
            "cache_valid/CACHEDIR.TAG",
            b"Signature: 8a477f597d28d172789f06886806bc55\n# This file is a cache directory tag.\n",
        ),
        ("cache_valid/data", b"cached\n"),
        ("cache_valid/sub/x", b"cached too\n"),
        // One hex digit short: not a valid tag.
        (
            "cache_invalid/CACHEDIR.TAG",
            b"Signature: 8a477f597d28d172789f06886806bc5\n",
        ),
        ("cache_invalid/data", b"not a cache\n"),
        ("marked/.nobackup", b""),
        ("marked/data", b"in a marked directory\n"),
        ("unmarked/.nobackup-not", b"a different name\n"),
    ];
    for (rel, data) in files {
        fs::write(src.join(rel), data).unwrap();
    }
    fs::write(src.join("unmarked/data"), b"unmarked\n").unwrap();
    run_prog("chattr", &[os("+d"), src.join("nodump_file").as_os_str()]);
    run_prog("chattr", &[os("+d"), src.join("nodump_dir").as_os_str()]);
    assert!(lsattr(&src, b"nodump_file").contains('d'));
    assert!(lsattr(&src, b"nodump_dir").contains('d'));
    let mnt = src.join("mnt");
    let _tmpfs = Tmpfs::mount(&mnt);
    fs::create_dir(mnt.join("deeper")).unwrap();
    fs::write(mnt.join("on_tmpfs"), b"on another file system\n").unwrap();
    fs::write(mnt.join("deeper/y"), b"y\n").unwrap();
    assert_ne!(
        fs::metadata(&mnt).unwrap().dev(),
        fs::metadata(&src).unwrap().dev(),
        "setup: the tmpfs is not mounted"
    );

    let everything: Vec<&str> = vec![
        "",
        "/cache_invalid",
        "/cache_invalid/CACHEDIR.TAG",
        "/cache_invalid/data",
        "/cache_valid",
        "/cache_valid/CACHEDIR.TAG",
        "/cache_valid/data",
        "/cache_valid/sub",
        "/cache_valid/sub/x",
        "/keep_file",
        "/marked",
        "/marked/.nobackup",
        "/marked/data",
        "/mnt",
        "/mnt/deeper",
        "/mnt/deeper/y",
        "/mnt/on_tmpfs",
        "/nodump_dir",
        "/nodump_dir/inside",
        "/nodump_file",
        "/unmarked",
        "/unmarked/.nobackup-not",
        "/unmarked/data",
    ];
    let src_s = src.display().to_string();
    let backed_up = |opts: &[&str]| -> Vec<String> {
        let mut args: Vec<&OsStr> = opts.iter().map(|o| os(o)).collect();
        args.push(src.as_os_str());
        let s = repo.backup(&args);
        assert_eq!(strings(&s["unreadable"]), Vec::<String>::new(), "{s}");
        let mut v: Vec<String> = repo
            .ok(&["ls", "--json", "latest"])
            .ndjson()
            .iter()
            .filter_map(|n| {
                n["path"]
                    .as_str()
                    .and_then(|p| p.strip_prefix(src_s.as_str()))
                    .map(str::to_string)
            })
            .collect();
        v.sort();
        v
    };
    let without = |gone: &[&str]| -> Vec<String> {
        everything
            .iter()
            .filter(|p| !gone.contains(p))
            .map(|p| p.to_string())
            .collect()
    };

    assert_eq!(backed_up(&[]), without(&[]), "no option");
    assert_eq!(
        backed_up(&["--exclude-nodump"]),
        without(&["/nodump_file", "/nodump_dir", "/nodump_dir/inside"]),
        "--exclude-nodump"
    );
    assert_eq!(
        backed_up(&["--exclude-caches"]),
        without(&[
            "/cache_valid/data",
            "/cache_valid/sub",
            "/cache_valid/sub/x"
        ]),
        "--exclude-caches"
    );
    assert_eq!(
        backed_up(&["--exclude-if-present", ".nobackup"]),
        without(&["/marked", "/marked/.nobackup", "/marked/data"]),
        "--exclude-if-present"
    );
    assert_eq!(
        backed_up(&["-x"]),
        without(&["/mnt/deeper", "/mnt/deeper/y", "/mnt/on_tmpfs"]),
        "-x"
    );
    // The mount point itself is kept, as a directory, and restores empty.
    let node = repo
        .ok(&["ls", "--json", "latest"])
        .ndjson()
        .into_iter()
        .find(|n| n["path"] == format!("{src_s}/mnt"))
        .expect("/mnt in the snapshot");
    assert_eq!(node["type"], "dir", "{node}");
    let target = repo.scratch("restore");
    repo.ok(&[
        os("restore"),
        os("latest"),
        os("--target"),
        target.as_os_str(),
    ]);
    let r = restored_path(&target, &mnt);
    assert!(r.is_dir(), "{} not restored", r.display());
    assert_eq!(
        fs::read_dir(&r).unwrap().count(),
        0,
        "the mount point is not empty"
    );
}

#[test]
fn times_beyond_what_nanoseconds_in_64_bits_hold_come_back_exactly() {
    // ext4 keeps times from 1901 to 2446; i64 nanoseconds only 1677 to 2262.
    let repo = Repo::new();
    let src = repo.scratch("times");
    fs::create_dir_all(&src).unwrap();
    let cases = [
        ("future", "2300-01-01 00:00:00.5 UTC"),
        ("far-future", "2446-05-10 22:38:55.999999999 UTC"),
        ("past", "1902-03-04 05:06:07.123456789 UTC"),
    ];
    for (name, when) in cases {
        fs::write(src.join(name), name.as_bytes()).unwrap();
        set_mtime(&src.join(name), when);
    }
    let before: Vec<(i64, i64)> = cases
        .iter()
        .map(|(n, _)| {
            let m = fs::symlink_metadata(src.join(n)).unwrap();
            (m.mtime(), m.mtime_nsec())
        })
        .collect();
    assert!(
        before[0].0 > 9_300_000_000,
        "the file system kept {before:?}"
    );
    repo.backup(&[src.to_str().unwrap()]);
    let target = repo.scratch("restored");
    repo.ok(&["restore", "latest", "--target", target.to_str().unwrap()]);
    let back = restored_path(&target, &src);
    let after: Vec<(i64, i64)> = cases
        .iter()
        .map(|(n, _)| {
            let m = fs::symlink_metadata(back.join(n)).unwrap();
            (m.mtime(), m.mtime_nsec())
        })
        .collect();
    assert_eq!(after, before);
}

#[test]
fn a_file_that_changes_while_it_is_read_is_backed_up_as_read_and_listed() {
    let repo = Repo::new();
    let src = repo.scratch("changing");
    fs::create_dir_all(&src).unwrap();
    let grows = src.join("grows.log");
    fs::write(&grows, random_bytes(8 << 20)).unwrap();
    fs::write(src.join("still"), b"does not change").unwrap();
    // Appended to for as long as the backup runs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let grows = grows.clone();
        thread::spawn(move || {
            let mut f = fs::OpenOptions::new().append(true).open(&grows).unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::io::Write::write_all(&mut f, &[b'x'; 4096]).unwrap();
                thread::sleep(std::time::Duration::from_micros(200));
            }
        })
    };
    let out = repo
        .cmd()
        .args(["backup", "--json"])
        .arg(&src)
        .run()
        .expect(3);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    let v = out.json();
    assert_eq!(
        strings(&v["changed_while_read"]),
        [grows.display().to_string()],
        "{v}"
    );
    assert!(
        out.stderr.contains("changed while it was read"),
        "{}",
        out.describe()
    );
    let ls = repo
        .cmd()
        .args(["ls", "--json", "latest"])
        .arg(&grows)
        .run()
        .ok()
        .ndjson();
    assert_eq!(ls[0]["changed_while_read"], true, "{ls:?}");
    let still = repo
        .cmd()
        .args(["ls", "--json", "latest"])
        .arg(src.join("still"))
        .run()
        .ok()
        .ndjson();
    assert!(still[0].get("changed_while_read").is_none(), "{still:?}");
}

#[test]
fn ls_long_marks_attributes_and_shows_devices() {
    let repo = Repo::new();
    let src = repo.scratch("ls");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("plain"), b"p").unwrap();
    fs::write(src.join("acl"), b"a").unwrap();
    run_prog(
        "setfacl",
        &[os("-m"), os("u:65534:r"), src.join("acl").as_os_str()],
    );
    run_prog(
        "mknod",
        &[src.join("null").as_os_str(), os("c"), os("1"), os("3")],
    );
    repo.backup(&[src.to_str().unwrap()]);
    let text = repo
        .cmd()
        .args(["ls", "--long", "latest"])
        .arg(&src)
        .run()
        .ok()
        .stdout();
    let line = |name: &str| {
        text.lines()
            .find(|l| l.ends_with(&format!("/{name}")))
            .unwrap_or_else(|| panic!("{name} in:\n{text}"))
            .to_string()
    };
    assert!(line("acl").starts_with("-rw-r--r--+"), "{}", line("acl"));
    assert!(
        !line("plain")
            .split_whitespace()
            .next()
            .unwrap()
            .ends_with('+'),
        "{}",
        line("plain")
    );
    assert!(
        line("null").starts_with('c') && line("null").contains("1, 3"),
        "{}",
        line("null")
    );
    let json = repo
        .cmd()
        .args(["ls", "--json", "latest"])
        .arg(src.join("null"))
        .run()
        .ok()
        .ndjson();
    assert_eq!(json[0]["type"], "chardev");
    assert_eq!(json[0]["rdev"], serde_json::json!({"major": 1, "minor": 3}));
    let acl = repo
        .cmd()
        .args(["ls", "--json", "latest"])
        .arg(src.join("acl"))
        .run()
        .ok()
        .ndjson();
    let names: Vec<&str> = acl[0]["xattrs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["system.posix_acl_access"]);
}

// ---------------------------------------------------------------------------------------
// 6. Files of holes only, dumps, stale attributes, unsearchable directories
// ---------------------------------------------------------------------------------------

/// The names of the extended attributes of `p` (not following a link), sorted.
fn xattr_names(p: &Path) -> Vec<String> {
    let out = stdout_of(
        Path::new("/"),
        "getfattr",
        &[
            os("-h"),
            os("-m"),
            os("-"),
            os("--absolute-names"),
            p.as_os_str(),
        ],
    );
    let mut names: Vec<String> = String::from_utf8_lossy(&out)
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split('=').next().unwrap_or(l).to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn a_file_of_holes_only_restores_sparse_dump_writes_the_holes_and_delta_drops_stale_attributes() {
    let repo = Repo::new();
    let src = repo.scratch("holes_src");
    fs::create_dir(&src).unwrap();
    // 1 TiB of nothing at all, and 16 MiB with one 4 KiB block of data in the middle.
    let holes = src.join("holes");
    fs::File::create(&holes).unwrap().set_len(TIB).unwrap();
    let some = src.join("some");
    let f = fs::File::create(&some).unwrap();
    f.set_len(16 * MIB).unwrap();
    f.write_all_at(&random_bytes(4096), 8 * MIB).unwrap();
    f.sync_all().unwrap();
    drop(f);
    setfattr(&some, "user.kept", "0x6b");

    let s = repo.backup(&[&src]);
    assert_eq!(s["bytes_read"].as_u64(), Some(4096), "{s}");
    let ls = repo
        .cmd()
        .args(["ls", "--json", "latest"])
        .arg(&holes)
        .run()
        .ok()
        .ndjson();
    assert_eq!(ls[0]["extents"], serde_json::json!([[TIB, 0]]), "{ls:?}");

    let target = repo.scratch("restored");
    repo.ok(&[
        os("restore"),
        os("latest"),
        os("--target"),
        target.as_os_str(),
    ]);
    let back = restored_path(&target, &holes);
    assert_eq!((lmeta(&back).size, allocated(&back)), (TIB, 0));
    // `dump` writes the holes as the zeros they read as.
    let dumped = repo
        .cmd()
        .args(["dump", "latest"])
        .arg(&some)
        .run()
        .ok()
        .stdout;
    assert!(dumped == fs::read(&some).unwrap(), "dump differs");

    // A --delta restore makes the attributes the snapshot's: one set since is removed, one
    // removed since comes back.
    let back_some = restored_path(&target, &some);
    setfattr(&back_some, "user.stale", "0x73");
    run_prog(
        "setfattr",
        &[os("-x"), os("user.kept"), back_some.as_os_str()],
    );
    assert_eq!(xattr_names(&back_some), ["user.stale"]);
    repo.ok(&[
        os("restore"),
        os("latest"),
        os("--delta"),
        os("--target"),
        target.as_os_str(),
    ]);
    assert_eq!(xattr_names(&back_some), ["user.kept"]);

    // A marker name holding a `/` names no file in a directory: refused up front.
    repo.cmd()
        .args(["backup", "--exclude-if-present", "sub/.nobackup"])
        .arg(&src)
        .run()
        .expect(2)
        .stderr_has("sub/.nobackup");
}

#[test]
fn an_unsearchable_directory_deep_in_a_tree_is_listed_and_what_follows_it_kept() {
    let work = tempfile::tempdir().unwrap();
    chmod(work.path(), 0o755);
    let home = work.path().join("home");
    fs::create_dir(&home).unwrap();
    chown(&home, "nobody:nogroup");
    // 20 levels, deeper than the 8 directories held open under 64 descriptors; at the
    // bottom a directory nobody may list but not enter (its `..` cannot be opened from
    // it), then a file and a read-only file with an attribute; a file after the chain
    // 12 levels down.
    let src = work.path().join("src");
    let mut level = src.clone();
    for i in 0..20 {
        level = level.join("d");
        if i == 11 {
            fs::create_dir_all(&level).unwrap();
            fs::write(level.with_file_name("z_after"), b"after the chain\n").unwrap();
        }
    }
    fs::create_dir_all(level.join("a_locked")).unwrap();
    fs::write(level.join("a_locked/inside"), b"unreachable\n").unwrap();
    fs::write(level.join("b_file"), b"after the locked directory\n").unwrap();
    let ro = level.join("c_readonly");
    fs::write(&ro, b"read-only, with an attribute\n").unwrap();
    setfattr(&ro, "user.ro", "0x726f");
    run_prog("chown", &[os("-R"), os("nobody:nogroup"), src.as_os_str()]);
    chmod(&ro, 0o444);
    chmod(&level.join("a_locked"), 0o600);

    let repo = home.join("repo");
    let cache = home.join("cache");
    let env: [(&str, &OsStr); 3] = [
        ("BACKUPD_REPOSITORY", repo.as_os_str()),
        ("BACKUPD_PASSWORD", os(PASSWORD)),
        ("XDG_CACHE_HOME", cache.as_os_str()),
    ];
    let nobody = |args: &[&OsStr]| {
        run_under(
            &[
                "prlimit",
                "--nofile=64:64",
                "--",
                "runuser",
                "-u",
                "nobody",
                "--",
            ],
            &env,
            &home,
            args,
        )
    };
    nobody(&[os("init")]).ok();
    let out = nobody(&[os("backup"), os("--json"), src.as_os_str()]).expect(3);
    let s = out.json();
    let locked = level.join("a_locked").display().to_string();
    let unreadable = strings(&s["unreadable"]);
    assert_eq!(unreadable, std::slice::from_ref(&locked), "{s}");
    assert!(
        out.stderr
            .contains(&format!("could not read {locked}: Permission denied")),
        "{}",
        out.describe()
    );

    let target = home.join("restore");
    nobody(&[
        os("restore"),
        os("latest"),
        os("--target"),
        target.as_os_str(),
    ])
    .expect(3)
    // Only the directories above the source are root's: nothing else is said.
    .stderr_has("(owners): ")
    .stderr_has("1 entry restored but not exactly");
    let back = restored_path(&target, &level);
    assert_eq!(
        fs::read(back.join("b_file")).unwrap(),
        b"after the locked directory\n"
    );
    let back_ro = back.join("c_readonly");
    assert_eq!(lmeta(&back_ro).mode & 0o7777, 0o444);
    assert_eq!(xattr_names(&back_ro), ["user.ro"]);
    assert_eq!(lmeta(&back.join("a_locked")).mode & 0o7777, 0o600);
    let after = restored_path(&target, &src.join("d/d/d/d/d/d/d/d/d/d/d/z_after"));
    assert_eq!(fs::read(after).unwrap(), b"after the chain\n");
}
