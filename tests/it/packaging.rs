//! The shipped systemd units: `systemd-analyze verify` accepts them, and the command lines
//! they run are ones this binary accepts.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use super::common::*;

fn units() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("packaging/systemd");
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[test]
fn systemd_analyze_verify_accepts_the_units() {
    let all = units();
    assert_eq!(all.len(), 3, "{all:?}");
    // systemd checks that ExecStart's program exists: point it at the binary under test.
    let dir = tempfile::tempdir().unwrap();
    let mut copies = vec![];
    for u in &all {
        let text = fs::read_to_string(u)
            .unwrap()
            .replace("/usr/bin/backupd", BIN);
        let c = dir.path().join(u.file_name().unwrap());
        fs::write(&c, text).unwrap();
        copies.push(c);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&copies)
        .output()
        .expect("systemd-analyze (package systemd)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    for c in &copies {
        let name = c.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            !text.contains(&name),
            "systemd-analyze complains about {name}:\n{text}"
        );
    }
}

#[test]
fn the_units_command_lines_are_accepted_by_the_binary() {
    for u in units() {
        let text = fs::read_to_string(&u).unwrap();
        for line in text.lines().filter(|l| l.starts_with("ExecStart=")) {
            let args: Vec<&str> = line["ExecStart=".len()..].split_whitespace().collect();
            assert_eq!(args[0], "/usr/bin/backupd", "{line}");
            // Every option is parsed before --help is acted on: an unknown one fails.
            let out = backupd().args(&args[1..]).arg("--help").run();
            assert_eq!(out.code(), 0, "{}: {line}\n{}", u.display(), out.describe());
        }
    }
}
