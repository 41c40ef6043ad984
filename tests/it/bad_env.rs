//! Bad environments (issue 16): an S3 store that answers 503 SlowDown or resets a share
//! of requests (a proxy on loopback), a read-only repository (a read-only bind mount; on
//! S3 a proxy answering AccessDenied to every write), a restore target that fills up, and
//! an unusable cache directory. The proxy also counts requests and bytes at the store's
//! side, to hold backupd's own counters to.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use super::common::*;
use super::s3proxy::{Mode, S3Proxy};

/// `backupd --repo LOCATION` for `repo` (on S3) with its password and credentials.
fn through(repo: &Repo, location: &str, cache: &Path) -> Run {
    let run = backupd()
        .arg("--repo")
        .arg(location)
        .env("BACKUPD_PASSWORD", &repo.password)
        .env("BACKUPD_CACHE_DIR", cache);
    repo.s3.as_ref().expect("an S3 repository").credentials(run)
}

fn source(dir: &Path) {
    fs::create_dir_all(dir.join("sub")).unwrap();
    for i in 0..30 {
        write_random(&dir.join(format!("f{i}")), 200 << 10);
    }
    write_mixed(&dir.join("sub").join("mixed"), 6 << 20);
}

/// Backup, restore, `check --read-data` and `verify --restore-test` through `proxy`; the
/// time it took.
fn round_trip(repo: &Repo, proxy: &S3Proxy, src: &Path, name: &str) -> f64 {
    let t0 = Instant::now();
    let cache = repo.scratch(&format!("cache-{name}"));
    let loc = proxy.location("bk1/repo");
    through(repo, &loc, &cache)
        .args(["backup", "--json"])
        .arg(src)
        .run()
        .ok();
    let dst = repo.scratch(&format!("restore-{name}"));
    through(repo, &loc, &cache)
        .args(["restore", "latest", "--target"])
        .arg(&dst)
        .run()
        .ok();
    assert_same_tree(src, &restored_path(&dst, src), &|_, _| false);
    through(repo, &loc, &cache)
        .args(["check", "--read-data"])
        .run()
        .ok();
    let scratch = repo.scratch(&format!("scratch-{name}"));
    fs::create_dir_all(&scratch).unwrap();
    through(repo, &loc, &cache)
        .args(["verify", "--restore-test", "--scratch"])
        .arg(&scratch)
        .run()
        .ok();
    t0.elapsed().as_secs_f64()
}

#[test]
fn backups_and_restores_on_s3_finish_through_slowdowns_and_resets() {
    let src = tempfile::tempdir().unwrap();
    source(src.path());
    // The same work twice, each on a repository of its own: once through an honest
    // proxy, once through one that answers 8 % of requests 503 and resets 4 %.
    let honest_repo = Repo::new_s3();
    let honest = S3Proxy::start(honest_repo.s3.as_ref().unwrap().port, Mode::Honest, 1);
    let t_honest = round_trip(&honest_repo, &honest, src.path(), "honest");

    let flaky_repo = Repo::new_s3();
    let seed = 20261201;
    let flaky = S3Proxy::start(
        flaky_repo.s3.as_ref().unwrap().port,
        Mode::Flaky {
            slow_down: 80,
            reset: 40,
        },
        seed,
    );
    let t_flaky = round_trip(&flaky_repo, &flaky, src.path(), "flaky");
    let n = S3Proxy::count(&flaky.seen.requests);
    let slow = S3Proxy::count(&flaky.seen.slow_downs);
    let resets = S3Proxy::count(&flaky.seen.resets);
    assert!(
        slow > 0 && resets > 0,
        "the proxy injected nothing ({n} requests)"
    );
    eprintln!(
        "through 503s and resets (seed {seed}): backup, restore, check --read-data and verify survived \
         {slow} SlowDown and {resets} resets in {n} requests ({:.1} % failed), {t_flaky:.2} s \
         against {t_honest:.2} s honest ({:.2}x)",
        100.0 * (slow + resets) as f64 / n as f64,
        t_flaky / t_honest
    );
}

#[test]
fn request_counts_and_bytes_match_what_the_store_saw() {
    let repo = Repo::new_s3();
    let proxy = S3Proxy::start(repo.s3.as_ref().unwrap().port, Mode::Honest, 1);
    let src = repo.scratch("src");
    source(&src);
    let cache = repo.scratch("cache");
    let loc = proxy.location("bk1/repo");
    let out = through(&repo, &loc, &cache)
        .args(["backup", "--json"])
        .arg(&src)
        .run()
        .ok()
        .json();
    let r = &out["requests"];
    let total: u64 = ["get", "get_range", "put", "list", "delete", "exists"]
        .iter()
        .map(|k| {
            r[k].as_u64()
                .unwrap_or_else(|| panic!("requests.{k}: {out}"))
        })
        .sum();
    let seen = &proxy.seen;
    assert_eq!(
        S3Proxy::count(&seen.requests),
        total,
        "requests backupd counted against requests the store saw: {r}"
    );
    assert_eq!(
        S3Proxy::count(&seen.writes),
        r["put"].as_u64().unwrap(),
        "{r}"
    );
    assert_eq!(
        S3Proxy::count(&seen.reads),
        r["get"].as_u64().unwrap()
            + r["get_range"].as_u64().unwrap()
            + r["exists"].as_u64().unwrap()
            + r["list"].as_u64().unwrap(),
        "{r}"
    );
    // What a restore downloads: the bodies the store sent are what backupd counted.
    let before = S3Proxy::count(&seen.body_bytes_down);
    let out = through(&repo, &loc, &repo.scratch("cache-2"))
        .args(["restore", "latest", "--json", "--target"])
        .arg(repo.scratch("dst"))
        .run()
        .ok();
    let sent = S3Proxy::count(&seen.body_bytes_down) - before;
    let pack_bytes: u64 = fs::read_dir(repo.path.join("data"))
        .unwrap()
        .flatten()
        .flat_map(|d| fs::read_dir(d.path()).unwrap().flatten())
        .map(|f| f.metadata().unwrap().len())
        .sum();
    assert!(
        sent >= pack_bytes * 9 / 10 && sent <= pack_bytes + (1 << 20),
        "a restore of everything downloads about the packs' bytes: {sent} sent, {pack_bytes} in packs\n{}",
        out.describe()
    );
}

/// A read-only bind mount of `dir` at `at`; unmounted when dropped.
struct ReadOnlyMount(PathBuf);

impl ReadOnlyMount {
    fn new(dir: &Path, at: &Path) -> ReadOnlyMount {
        fs::create_dir_all(at).unwrap();
        let ok = |c: &mut Command| {
            assert!(
                c.status().unwrap().success(),
                "{c:?} (needs root, as CI runs)"
            )
        };
        ok(Command::new("mount").arg("--bind").arg(dir).arg(at));
        ok(Command::new("mount")
            .args(["-o", "remount,bind,ro"])
            .arg(at));
        ReadOnlyMount(at.to_path_buf())
    }
}

impl Drop for ReadOnlyMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// What a read-only repository must still do, and that backup stops before the source.
fn read_only_checks(run: &dyn Fn() -> Run, src: &Path, scratch: &Path) {
    run().args(["snapshots"]).run().ok();
    let ls = run().args(["ls", "latest"]).run().ok().stdout();
    assert!(ls.contains("mixed"), "{ls}");
    let dst = scratch.join("ro-restore");
    run()
        .args(["restore", "latest", "--target"])
        .arg(&dst)
        .run()
        .ok();
    assert_same_tree(src, &restored_path(&dst, src), &|_, _| false);
    run().args(["check", "--read-data"]).run().ok();
    run()
        .args(["verify", "--read-data", "--restore-test", "--scratch"])
        .arg(scratch)
        .run()
        .ok();
    // A backup fails before it reads its source: 8 MiB offered on stdin, at most a pipe's
    // worth taken.
    let out = run()
        .args(["backup", "--stdin", "--stdin-filename", "x"])
        .stdin(random_bytes(8 << 20))
        .run();
    assert_ne!(out.code(), 0, "{}", out.describe());
    let text = out.stderr.to_lowercase();
    assert!(
        text.contains("read-only") || text.contains("access denied"),
        "the error says why: {}",
        out.describe()
    );
    let _ = src;
}

#[test]
fn a_read_only_local_repository_lists_restores_checks_and_verifies() {
    let repo = Repo::new();
    let src = repo.scratch("src");
    source(&src);
    repo.backup(&[src.to_str().unwrap()]);
    let ro = repo.scratch("ro");
    let _m = ReadOnlyMount::new(&repo.path, &ro);
    let scratch = repo.scratch("scratch");
    fs::create_dir_all(&scratch).unwrap();
    let run = || {
        backupd()
            .arg("--repo")
            .arg(&ro)
            .env("BACKUPD_PASSWORD", &repo.password)
            .env("XDG_CACHE_HOME", repo.scratch("cache"))
    };
    read_only_checks(&run, &src, &scratch);
}

#[test]
fn a_read_only_s3_repository_lists_restores_checks_and_verifies() {
    let repo = Repo::new_s3();
    let src = repo.scratch("src");
    source(&src);
    repo.backup(&[src.to_str().unwrap()]);
    let proxy = S3Proxy::start(repo.s3.as_ref().unwrap().port, Mode::ReadOnly, 1);
    let loc = proxy.location("bk1/repo");
    let scratch = repo.scratch("scratch");
    fs::create_dir_all(&scratch).unwrap();
    let cache = repo.scratch("cache-ro");
    let run = || through(&repo, &loc, &cache);
    read_only_checks(&run, &src, &scratch);
    assert!(S3Proxy::count(&proxy.seen.denied) > 0);
}

#[test]
fn a_full_restore_target_names_the_file_and_restore_delta_completes_once_freed() {
    let repo = Repo::new();
    let src = repo.scratch("src");
    source(&src);
    repo.backup(&[src.to_str().unwrap()]);
    let mnt = repo.scratch("small");
    fs::create_dir_all(&mnt).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(
        st.success(),
        "mounting a tmpfs needs root (CI runs as root)"
    );
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(mnt.clone());
    let target = mnt.join("t");
    let out = repo
        .cmd()
        .args(["restore", "latest", "--target"])
        .arg(&target)
        .run();
    assert_eq!(out.code(), 1, "{}", out.describe());
    let text = out.all_text();
    assert!(
        text.contains("No space left on device"),
        "the cause is named: {}",
        out.describe()
    );
    assert!(
        text.contains("could not restore")
            && text.contains("sub/mixed: writing")
            && text.contains("could not be restored completely"),
        "the files not restored are listed: {}",
        out.describe()
    );
    // Space freed: restore --delta completes it.
    let st = Command::new("mount")
        .args(["-o", "remount,size=64m"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(st.success());
    repo.cmd()
        .args(["restore", "latest", "--delta", "--target"])
        .arg(&target)
        .run()
        .ok();
    assert_same_tree(&src, &restored_path(&target, &src), &|_, _| false);
}

#[test]
fn an_unusable_cache_directory_costs_a_warning_not_the_command() {
    let repo = Repo::new_s3();
    let src = repo.scratch("src");
    source(&src);
    // A cache "directory" that is a file: nothing can be made under it, even as root.
    let cache = repo.scratch("cache-file");
    fs::write(&cache, "not a directory").unwrap();
    let loc = repo.location.clone();
    let run = || through(&repo, &loc, &cache);
    for args in [
        vec!["backup".to_string(), src.display().to_string()],
        vec!["snapshots".to_string()],
        vec!["check".to_string(), "--read-data".to_string()],
    ] {
        let out = run().args(&args).run().ok();
        let warnings = out
            .stderr
            .lines()
            .filter(|l| l.to_lowercase().contains("cache"))
            .count();
        assert_eq!(
            warnings,
            1,
            "one warning about the cache: {}",
            out.describe()
        );
    }
    let dst = repo.scratch("dst");
    run()
        .args(["restore", "latest", "--target"])
        .arg(&dst)
        .run()
        .ok();
    assert_same_tree(&src, &restored_path(&dst, &src), &|_, _| false);
}
