//! Secrets stay in the process: hooks, command sources, password commands and the S3
//! `credential_process` command never inherit a secret variable; secret files that other
//! users can read, or anyone but their owner can write, are refused.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::common::*;

/// The secret variables a child must never see, with distinctive values.
const SECRETS: &[(&str, &str)] = &[
    ("BACKUPD_NEW_PASSWORD", "secret-new-password-1"),
    ("BACKUPD_RECOVERY_CODE", "secret-recovery-code-2"),
    ("BACKUPD_TO_PASSWORD", "secret-to-password-3"),
    ("PGPASSWORD", "secret-pgpassword-4"),
    ("AWS_SECRET_ACCESS_KEY", "secret-aws-secret-key-5"),
    ("AWS_SESSION_TOKEN", "secret-aws-session-token-6"),
];

/// Variables that policies of the tests name in `password_env`: secrets once a policy
/// names them. `APP_REPO_PW` holds the repository password.
const POLICY_SECRETS: &[(&str, &str)] = &[
    ("APP_REPO_PW", PASSWORD),
    ("OTHER_POLICY_PW", "secret-other-policy-7"),
];

/// `run` with every secret of [`SECRETS`] and `policy` set, and the repository password in
/// `BACKUPD_PASSWORD`.
fn with_secrets(run: Run, policy: &[(&str, &str)]) -> Run {
    let mut run = run.env("BACKUPD_PASSWORD", PASSWORD);
    for (k, v) in SECRETS.iter().chain(policy) {
        run = run.env(k, v);
    }
    run
}

/// Asserts that `file` (an `env` dump written by a child) exists and holds no secret
/// variable of [`SECRETS`] or `policy`, nor `BACKUPD_PASSWORD`, and no secret value; `what`
/// names the child.
#[track_caller]
fn assert_no_secrets(file: &Path, what: &str, policy: &[(&str, &str)]) {
    let text = fs::read_to_string(file)
        .unwrap_or_else(|e| panic!("{what} did not record its environment in {file:?}: {e}"));
    assert!(
        text.contains("PATH="),
        "{what}: not an environment dump:\n{text}"
    );
    let all = || SECRETS.iter().chain(policy);
    for name in all().map(|(k, _)| *k).chain(["BACKUPD_PASSWORD"]) {
        assert!(
            !text.lines().any(|l| l.starts_with(&format!("{name}="))),
            "{what} inherited {name}:\n{text}"
        );
    }
    for value in all().map(|(_, v)| *v).chain([PASSWORD]) {
        assert!(
            !text.contains(value),
            "{what} saw the secret {value:?}:\n{text}"
        );
    }
}

fn private_file(path: &Path, text: &str, mode: u32) {
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn policy_hooks_and_command_source_inherit_no_secret() {
    let repo = Repo::new();
    let work = repo.scratch("work");
    let pol = work.join("policies");
    fs::create_dir_all(&pol).unwrap();
    let [pre, post, cmd] = ["pre.env", "post.env", "cmd.env"].map(|n| work.join(n));
    fs::write(
        pol.join("app.toml"),
        format!(
            r#"[repository]
location = "{repo}"
password_env = "APP_REPO_PW"
[source]
type = "command"
command = "env > {cmd}; echo dump-data"
filename = "app.dump"
[hooks]
pre = ["env > {pre}"]
post = ["env > {post}"]
"#,
            repo = repo.location,
            cmd = cmd.display(),
            pre = pre.display(),
            post = post.display(),
        ),
    )
    .unwrap();
    // Another policy's password_env is a secret too, though this run does not use it.
    fs::write(
        pol.join("other.toml"),
        format!(
            "[repository]\nlocation = \"{}\"\npassword_env = \"OTHER_POLICY_PW\"\n[source]\ntype = \"command\"\ncommand = \"true\"\nfilename = \"x\"\n",
            repo.location
        ),
    )
    .unwrap();
    let out = with_secrets(backupd(), POLICY_SECRETS)
        .arg("--policies")
        .arg(&pol)
        .args(["backup", "--policy", "app"])
        .run()
        .ok();
    assert_no_secrets(&pre, "the pre hook", POLICY_SECRETS);
    assert_no_secrets(&post, "the post hook", POLICY_SECRETS);
    assert_no_secrets(&cmd, "the command source", POLICY_SECRETS);
    // The hook still gets its own variables.
    assert!(
        fs::read_to_string(&pre)
            .unwrap()
            .contains("BACKUPD_POLICY=app"),
        "{}",
        out.describe()
    );
    assert_eq!(
        repo.ok(&["dump", "latest", "app.dump"]).stdout,
        b"dump-data\n"
    );
}

#[test]
fn stdin_from_command_inherits_no_secret() {
    let repo = Repo::new();
    let out_file = repo.scratch("cmd.env");
    let script = format!("env > {}; echo hello", out_file.display());
    with_secrets(repo.cmd(), &[])
        .args(["backup", "--stdin-from-command", "--", "sh", "-c", &script])
        .run()
        .ok();
    assert_no_secrets(&out_file, "the --stdin-from-command command", &[]);
    assert_eq!(repo.ok(&["dump", "latest", "sh"]).stdout, b"hello\n");
}

#[test]
fn password_commands_inherit_no_secret() {
    let repo = Repo::new();
    let pwfile = repo.scratch("pw");
    private_file(&pwfile, PASSWORD, 0o600);
    // BACKUPD_PASSWORD_COMMAND wins over BACKUPD_PASSWORD, which is set too.
    let env1 = repo.scratch("cmd1.env");
    with_secrets(repo.cmd(), &[])
        .env(
            "BACKUPD_PASSWORD_COMMAND",
            format!("env > {}; cat {}", env1.display(), pwfile.display()),
        )
        .args(["snapshots"])
        .run()
        .ok();
    assert_no_secrets(&env1, "BACKUPD_PASSWORD_COMMAND", &[]);

    // A policy's password_command; another policy names OTHER_POLICY_PW.
    let pol = repo.scratch("policies");
    fs::create_dir_all(&pol).unwrap();
    let env2 = repo.scratch("cmd2.env");
    fs::write(
        pol.join("app.toml"),
        format!(
            "[repository]\nlocation = \"{}\"\npassword_command = \"env > {}; cat {}\"\n[source]\ntype = \"command\"\ncommand = \"echo x\"\nfilename = \"x\"\n",
            repo.location,
            env2.display(),
            pwfile.display()
        ),
    )
    .unwrap();
    fs::write(
        pol.join("other.toml"),
        format!(
            "[repository]\nlocation = \"{}\"\npassword_env = \"OTHER_POLICY_PW\"\n[source]\ntype = \"command\"\ncommand = \"true\"\nfilename = \"x\"\n",
            repo.location
        ),
    )
    .unwrap();
    let other = &POLICY_SECRETS[1..];
    with_secrets(backupd(), other)
        .arg("--policies")
        .arg(&pol)
        .args(["backup", "--policy", "app"])
        .run()
        .ok();
    assert_no_secrets(&env2, "the policy's password_command", other);
}

/// `backupd --repo` on the S3 repository with only a credential command for credentials:
/// the AWS_* variables hold wrong keys, so the command's keys are the ones used.
fn s3_with_command(repo: &Repo, command: &str) -> Run {
    with_secrets(backupd(), &[])
        .arg("--repo")
        .arg(&repo.location)
        .env("BACKUPD_CACHE_DIR", repo.scratch("cache"))
        .env("AWS_ACCESS_KEY_ID", "AKWRONG")
        .env_remove("AWS_PROFILE")
        .env("BACKUPD_S3_CREDENTIALS_COMMAND", command)
}

#[test]
fn s3_credential_command_inherits_no_secret_and_its_keys_are_used() {
    let repo = Repo::new_s3();
    let json = repo.scratch("creds.json");
    private_file(
        &json,
        &format!(
            r#"{{"Version": 1, "AccessKeyId": "{S3_ACCESS_KEY}", "SecretAccessKey": "{S3_SECRET_KEY}", "Expiration": "2999-01-01T00:00:00Z"}}"#
        ),
        0o600,
    );
    let env_file = repo.scratch("cred.env");
    let cmd = format!("env > {}; cat {}", env_file.display(), json.display());
    s3_with_command(&repo, &cmd)
        .args(["backup", "--stdin", "--stdin-filename", "a.txt"])
        .stdin(b"through the credential command\n".to_vec())
        .run()
        .ok();
    assert_no_secrets(&env_file, "the S3 credential command", &[]);
    let out = s3_with_command(&repo, &cmd)
        .args(["dump", "latest", "a.txt"])
        .run()
        .ok();
    assert_eq!(out.stdout, b"through the credential command\n");

    // The same through a policy's s3_credentials_command.
    let pol = repo.scratch("policies");
    fs::create_dir_all(&pol).unwrap();
    let env2 = repo.scratch("cred2.env");
    fs::write(
        pol.join("s3.toml"),
        format!(
            "[repository]\nlocation = \"{}\"\npassword_env = \"APP_REPO_PW\"\ns3_credentials_command = \"env > {}; cat {}\"\n[source]\ntype = \"command\"\ncommand = \"echo x\"\nfilename = \"x\"\n",
            repo.location,
            env2.display(),
            json.display()
        ),
    )
    .unwrap();
    let app = &POLICY_SECRETS[..1];
    with_secrets(backupd(), app)
        .arg("--policies")
        .arg(&pol)
        .env("BACKUPD_CACHE_DIR", repo.scratch("cache2"))
        .env("AWS_ACCESS_KEY_ID", "AKWRONG")
        .args(["backup", "--policy", "s3"])
        .run()
        .ok();
    assert_no_secrets(&env2, "the policy's s3_credentials_command", app);
}

#[test]
fn s3_credential_command_errors_name_the_command_and_hide_the_secret() {
    let repo = Repo::new_s3();
    for (case, doc) in [
        ("not JSON", "oops secret-in-output-8".to_string()),
        (
            "wrong version",
            r#"{"Version": 2, "AccessKeyId": "AK", "SecretAccessKey": "secret-in-output-8"}"#
                .to_string(),
        ),
        (
            "no secret key",
            r#"{"Version": 1, "AccessKeyId": "AK", "SessionToken": "secret-in-output-8"}"#
                .to_string(),
        ),
    ] {
        let json = repo.scratch("bad.json");
        private_file(&json, &doc, 0o600);
        let cmd = format!("cat {} # marker-of-the-command", json.display());
        let out = s3_with_command(&repo, &cmd).args(["snapshots"]).run();
        assert_ne!(out.code(), 0, "{case}: {}", out.describe());
        assert!(
            out.stderr.contains("marker-of-the-command"),
            "{case}: the error does not name the command:\n{}",
            out.describe()
        );
        assert!(
            !out.all_text().contains("secret-in-output-8"),
            "{case}: the error shows the command's output:\n{}",
            out.describe()
        );
    }
    // A failing command: its exit status.
    let out = s3_with_command(&repo, "exit 9 # marker-of-the-command")
        .args(["snapshots"])
        .run();
    assert_ne!(out.code(), 0, "{}", out.describe());
    assert!(
        out.stderr.contains("marker-of-the-command") && out.stderr.contains('9'),
        "{}",
        out.describe()
    );
}

const REFUSED: [u32; 3] = [0o644, 0o660, 0o602];
const ACCEPTED: [u32; 2] = [0o640, 0o600];

#[test]
fn password_files_readable_by_others_or_writable_by_non_owners_are_refused() {
    let repo = Repo::new();
    let f = repo.scratch("pw");
    for mode in REFUSED {
        private_file(&f, PASSWORD, mode);
        let out = repo
            .cmd()
            .env_remove("BACKUPD_PASSWORD")
            .env("BACKUPD_PASSWORD_FILE", &f)
            .args(["snapshots"])
            .run()
            .expect(1);
        assert!(
            out.stderr.contains(&format!("mode {mode:04o}"))
                && out.stderr.contains("chmod 600")
                && out.stderr.contains("chmod 640"),
            "{}",
            out.describe()
        );
        // A new password from a file follows the same rule.
        let out = repo
            .cmd()
            .env("BACKUPD_NEW_PASSWORD_FILE", &f)
            .args(["key", "add"])
            .run()
            .expect(1);
        assert!(
            out.stderr.contains(&format!("mode {mode:04o}")),
            "{}",
            out.describe()
        );
    }
    for mode in ACCEPTED {
        private_file(&f, PASSWORD, mode);
        repo.cmd()
            .env_remove("BACKUPD_PASSWORD")
            .env("BACKUPD_PASSWORD_FILE", &f)
            .args(["snapshots"])
            .run()
            .ok();
    }
}

fn policy_with(dir: &Path, repo: &str, extra: &str) -> PathBuf {
    let pol = dir.join("policies");
    fs::create_dir_all(&pol).unwrap();
    fs::write(
        pol.join("p.toml"),
        format!(
            "[repository]\nlocation = \"{repo}\"\n{extra}\n[source]\ntype = \"command\"\ncommand = \"echo x\"\nfilename = \"x\"\n"
        ),
    )
    .unwrap();
    pol
}

#[test]
fn policy_secret_files_readable_by_others_or_writable_by_non_owners_are_refused() {
    let repo = Repo::new();
    let f = repo.scratch("pw");
    let pol = policy_with(
        &repo.scratch("w"),
        &repo.location,
        &format!("password_file = \"{}\"", f.display()),
    );
    for mode in REFUSED {
        private_file(&f, PASSWORD, mode);
        let out = backupd()
            .args(["policy", "check"])
            .arg(&pol)
            .run()
            .expect(1);
        assert!(
            out.stderr
                .contains("repository.password_file: expected a secret file")
                && out.stderr.contains(&format!("with mode {mode:04o}"))
                && out.stderr.contains("chmod 600")
                && out.stderr.contains("chmod 640"),
            "{}",
            out.describe()
        );
        backupd()
            .arg("--policies")
            .arg(&pol)
            .args(["backup", "--policy", "p"])
            .run()
            .expect(1);
    }
    for mode in ACCEPTED {
        private_file(&f, PASSWORD, mode);
        backupd().args(["policy", "check"]).arg(&pol).run().ok();
        backupd()
            .arg("--policies")
            .arg(&pol)
            .args(["backup", "--policy", "p"])
            .run()
            .ok();
    }
}

#[test]
fn s3_credentials_files_readable_by_others_or_writable_by_non_owners_are_refused() {
    let repo = Repo::new_s3();
    let creds = repo.scratch("aws-credentials");
    let text = format!(
        "[default]\naws_access_key_id = {S3_ACCESS_KEY}\naws_secret_access_key = {S3_SECRET_KEY}\n"
    );
    let through_env = || {
        backupd()
            .arg("--repo")
            .arg(&repo.location)
            .env("BACKUPD_PASSWORD", PASSWORD)
            .env("BACKUPD_CACHE_DIR", repo.scratch("cache"))
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("AWS_PROFILE")
            .env("BACKUPD_S3_CREDENTIALS_FILE", &creds)
            .args(["snapshots"])
            .run()
    };
    let pol = policy_with(
        &repo.scratch("w"),
        &repo.location,
        &format!(
            "password_env = \"APP_REPO_PW\"\ns3_credentials_file = \"{}\"",
            creds.display()
        ),
    );
    let through_policy = |check: bool| {
        let run = backupd()
            .arg("--policies")
            .arg(&pol)
            .env("APP_REPO_PW", PASSWORD)
            .env("BACKUPD_CACHE_DIR", repo.scratch("cache2"))
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("AWS_PROFILE");
        if check {
            run.args(["policy", "check"]).run()
        } else {
            run.args(["backup", "--policy", "p"]).run()
        }
    };
    for mode in REFUSED {
        private_file(&creds, &text, mode);
        let out = through_env().expect(1);
        assert!(
            out.stderr.contains(&format!("mode {mode:04o}"))
                && out.stderr.contains("chmod 600")
                && out.stderr.contains("chmod 640"),
            "{}",
            out.describe()
        );
        let out = through_policy(true).expect(1);
        assert!(
            out.stderr
                .contains("repository.s3_credentials_file: expected a secret file")
                && out.stderr.contains(&format!("with mode {mode:04o}")),
            "{}",
            out.describe()
        );
        through_policy(false).expect(1);
    }
    for mode in ACCEPTED {
        private_file(&creds, &text, mode);
        through_env().ok();
        through_policy(true).ok();
        through_policy(false).ok();
    }
}

#[test]
fn a_restore_test_gives_pg_amcheck_the_database_password_in_a_file_not_pgpassword() {
    use super::pgserver::PgEnv;
    use super::policy::PolicyDir;
    let env = PgEnv::new();
    let cluster = env.cluster("main");
    // A role that must give its password over TCP (postgres itself stays trusted, for the
    // test's own psql); the restored copy keeps this pg_hba.conf.
    cluster.sql("CREATE ROLE checker LOGIN SUPERUSER PASSWORD 'checker-pw-9'");
    cluster.sql("CREATE DATABASE finnexus");
    let hba = cluster.data.join("pg_hba.conf");
    let old = fs::read_to_string(&hba).unwrap();
    fs::write(
        &hba,
        format!("host all checker 127.0.0.1/32 scram-sha-256\n{old}"),
    )
    .unwrap();
    cluster.sql("SELECT pg_reload_conf()");
    cluster.sql("CREATE TABLE users(id int); INSERT INTO users VALUES (1)");
    let d = PolicyDir::examples();
    d.point_finnexus_at(&env, &cluster);
    let pgpw = d.secret("pg.password");
    private_file(&pgpw, "checker-pw-9\n", 0o600);
    d.edit("finnexusai-postgres.toml", |doc| {
        doc["source"]["user"] = toml_edit::value("checker");
        doc["source"]["password_file"] = toml_edit::value(pgpw.display().to_string());
    });
    // A wrong PGPASSWORD in backupd's environment: libpq would prefer it to any password
    // file, so pg_amcheck passes only if it does not inherit it.
    let run = |args: &[&str]| {
        backupd()
            .arg("--policies")
            .arg(d.policies())
            .env("PGPASSWORD", "wrong-pgpassword")
            .args(args)
            .run()
    };
    run(&["backup", "--policy", "finnexusai-postgres"]).ok();
    let scratch = env.path("verify-scratch");
    let v = run(&[
        "verify",
        "--policy",
        "finnexusai-postgres",
        "--scratch",
        scratch.to_str().unwrap(),
        "--json",
    ])
    .ok()
    .json();
    assert_eq!(v["restore"]["amcheck_ok"], true, "{v}");
    assert_eq!(v["ok"], true, "{v}");
    // The temporary password file is gone with the scratch directory's contents.
    let left: Vec<_> = walk(&scratch)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(".pgpass"))
        })
        .collect();
    assert!(left.is_empty(), "password files left behind: {left:?}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                out.extend(walk(&p));
            }
            out.push(p);
        }
    }
    out
}
