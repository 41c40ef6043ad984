//! The OS keyring as a password source, against a real Secret Service: gnome-keyring on a
//! private D-Bus session (`dbus-run-session`), unlocked with a password of the test's own
//! (recipes.md section 4). Each test's keyring lives in its own scratch `HOME`.

use std::path::Path;
use std::process::Command;

use super::common::*;

/// Runs `script` (sh) in a D-Bus session of its own with gnome-keyring's Secret Service
/// unlocked by `unlock` (a keyring under `home` made on first use). `$B` is backupd, `$R`
/// the repository, `$CACHE` a cache directory. Returns exit status, stdout and stderr.
fn in_keyring_session(home: &Path, unlock: &str, script: &str) -> (i32, String, String) {
    std::fs::create_dir_all(home).unwrap();
    let run = home.join("run");
    std::fs::create_dir_all(&run).unwrap();
    let full = format!(
        "export XDG_RUNTIME_DIR={run} HOME={home}\n\
         eval \"$(printf '%s' \"$UNLOCK\" | gnome-keyring-daemon --unlock --components=secrets)\" >/dev/null\n\
         {script}",
        run = run.display(),
        home = home.display(),
    );
    let out = Command::new("dbus-run-session")
        .args(["--", "sh", "-c", &full])
        .env("B", BIN)
        .env("UNLOCK", unlock)
        .env_remove("BACKUPD_PASSWORD")
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        .output()
        .expect("dbus-run-session (installed by .ci/test-all.sh)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| !l.contains("Failed to set fd limit"))
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

#[test]
fn the_password_from_the_keyring_opens_the_repository_and_a_missing_entry_is_named() {
    let repo = Repo::new();
    repo.ok(&["backup", "--stdin", "--stdin-filename", "x"]);
    let home = repo.scratch("home");
    let env = format!(
        "export R={} XDG_CACHE_HOME={}",
        repo.location,
        repo.scratch("cache").display()
    );
    // keyring-set reads the password from the usual sources and checks it opens the
    // repository; it is never an argument.
    let (code, out, err) = in_keyring_session(
        &home,
        "unlock-1",
        &format!(
            "{env}\n\
             BACKUPD_PASSWORD='{PASSWORD}' $B --repo $R key keyring-set test-repo || exit 10\n\
             BACKUPD_PASSWORD='wrong' $B --repo $R key keyring-set other; echo \"wrong: $?\"\n\
             BACKUPD_PASSWORD_KEYRING=test-repo $B --repo $R snapshots --json || exit 11\n\
             secret-tool lookup service backupd username test-repo >/dev/null || exit 12\n\
             BACKUPD_PASSWORD_KEYRING=nosuch $B --repo $R snapshots; echo \"missing: $?\"\n\
             $B key keyring-delete test-repo || exit 13\n\
             BACKUPD_PASSWORD_KEYRING=test-repo $B --repo $R snapshots; echo \"deleted: $?\""
        ),
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("wrong: 12"), "{out}\n{err}");
    assert!(out.contains("\"stdin\"") || out.contains("stdin"), "{out}");
    assert!(out.contains("missing: 1"), "{out}\n{err}");
    assert!(err.contains("no entry backupd/nosuch"), "{err}");
    assert!(out.contains("deleted: 1"), "{out}\n{err}");
    assert!(
        !err.contains(PASSWORD),
        "the password appeared in a message: {err}"
    );
}

#[test]
fn a_locked_or_absent_keyring_is_an_error_naming_the_entry_never_a_prompt() {
    let repo = Repo::new();
    let home = repo.scratch("home");
    let env = format!("export R={}", repo.location);
    let (code, out, err) = in_keyring_session(
        &home,
        "the-unlock-password",
        &format!("{env}\nBACKUPD_PASSWORD='{PASSWORD}' $B --repo $R key keyring-set locked-test"),
    );
    assert_eq!(code, 0, "{out}\n{err}");
    // The same keyring unlocked with a wrong password stays locked: the daemon has no
    // prompter on a headless host.
    let (code, out, err) = in_keyring_session(
        &home,
        "not-the-unlock-password",
        &format!("{env}\nBACKUPD_PASSWORD_KEYRING=locked-test $B --repo $R snapshots </dev/null"),
    );
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        err.contains("backupd/locked-test") && err.contains("could not be used"),
        "{err}"
    );
    // No Secret Service at all (no session bus).
    let out = repo
        .cmd()
        .env_remove("BACKUPD_PASSWORD")
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        .env("BACKUPD_PASSWORD_KEYRING", "locked-test")
        .arg("snapshots")
        .run()
        .expect(1);
    assert!(
        out.stderr.contains("backupd/locked-test") && out.stderr.contains("password_file"),
        "{}",
        out.describe()
    );
}

#[test]
fn init_with_the_password_in_the_keyring_prints_a_recovery_code_that_opens_it() {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    let (code, out, err) = in_keyring_session(
        &home,
        "unlock-3",
        &format!(
            "export XDG_CACHE_HOME={c}\n\
             secret-tool store --label=x service backupd username fresh <<EOF\n\
             kept-in-the-keyring\n\
             EOF\n\
             BACKUPD_PASSWORD_KEYRING=fresh $B --repo {t}/a init --json || exit 10\n\
             BACKUPD_PASSWORD_KEYRING=fresh $B --repo {t}/b init --no-recovery-code --json || exit 11",
            c = t.path().join("cache").display(),
            t = t.path().display()
        ),
    );
    assert_eq!(code, 0, "{out}\n{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{out}");
    let code_a = lines[0]["recovery_code"].as_str().expect("a recovery code");
    assert!(lines[1].get("recovery_code").is_none(), "{out}");
    // The code alone opens repository a, on a host without that keyring.
    backupd()
        .arg("--repo")
        .arg(t.path().join("a"))
        .env_remove("BACKUPD_PASSWORD")
        .env("XDG_CACHE_HOME", t.path().join("cache2"))
        .env("BACKUPD_RECOVERY_CODE", code_a)
        .arg("snapshots")
        .run()
        .ok();
}

#[test]
fn the_secure_ohlcv_example_runs_with_its_password_in_the_keyring() {
    let d = super::policy::PolicyDir::examples();
    let root = d.dir.path().join("root");
    let data = root.join("var/lib/secure-ohlcv/data");
    std::fs::create_dir_all(data.join("cache")).unwrap();
    std::fs::write(data.join("AAPL-2026-11.ohlcv.enc"), random_bytes(300_000)).unwrap();
    std::fs::write(data.join("part.partial"), b"in flight").unwrap();
    std::fs::write(data.join("cache/c"), b"cache").unwrap();
    let file = d.policies().join("secure-ohlcv-data.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.contains("password_keyring = \"secure-ohlcv\""),
        "{text}"
    );
    assert!(text.contains("rotate_every = \"365d\""), "{text}");
    std::fs::write(
        &file,
        text.replace(
            "/var/lib/secure-ohlcv",
            &format!("{}/var/lib/secure-ohlcv", root.display()),
        )
        .replace(
            "/var/backups/backupd",
            &format!("{}/var/backups/backupd", root.display()),
        ),
    )
    .unwrap();
    let repo = root.join("var/backups/backupd");
    let back = root.join("back");
    let (code, out, err) = in_keyring_session(
        &d.dir.path().join("home"),
        "unlock-ohlcv",
        &format!(
            "export XDG_CACHE_HOME={c} P={p} R={r}\n\
             printf '%s' 'the ohlcv repository password' | secret-tool store --label=x service backupd username secure-ohlcv || exit 9\n\
             BACKUPD_PASSWORD_KEYRING=secure-ohlcv $B --repo $R init --no-recovery-code || exit 10\n\
             $B --policies $P backup --policy secure-ohlcv-data --json || exit 11\n\
             $B --policies $P key rotate --policy secure-ohlcv-data --json || exit 12\n\
             $B --policies $P verify --policy secure-ohlcv-data || exit 13\n\
             BACKUPD_PASSWORD_KEYRING=secure-ohlcv $B --repo $R restore latest --target {b} || exit 14",
            c = d.dir.path().join("cache").display(),
            p = d.policies().display(),
            r = repo.display(),
            b = back.display(),
        ),
    );
    assert_eq!(code, 0, "{out}\n{err}");
    let rotated: serde_json::Value = out
        .lines()
        .filter(|l| l.contains("\"rotated\""))
        .map(|l| serde_json::from_str(l).unwrap())
        .next()
        .expect("key rotate --json");
    // Yearly: a fresh repository's generation is not due.
    assert_eq!(rotated["rotated"], false, "{rotated}");
    assert_eq!(rotated["generation"], 1, "{rotated}");
    let restored = back.join(data.strip_prefix("/").unwrap());
    assert_eq!(
        std::fs::read(restored.join("AAPL-2026-11.ohlcv.enc")).unwrap(),
        std::fs::read(data.join("AAPL-2026-11.ohlcv.enc")).unwrap()
    );
    // The policy's excludes held.
    assert!(!restored.join("part.partial").exists());
    assert!(!restored.join("cache").exists());
}
