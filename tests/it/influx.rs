//! InfluxDB 1.x end to end, against real `influxd` servers: backups through the backup
//! protocol, restores into another running server (renamed, refused when the database
//! exists), deletes that must stay deleted, incremental backups that read only changed
//! shards and still restore alone, and the errors a user must get.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::Value;

use super::common::*;
use super::influxserver::{points, InfluxServer, WEEK};

/// 2023-11-14: every dataset starts there.
const START_S: i64 = 1_699_920_000;

fn backup(repo: &Repo, s: &InfluxServer, extra: &[&str]) -> Value {
    let mut args = vec![
        "--influxdb".to_string(),
        "--influx-host".into(),
        s.rpc_addr(),
        "--influx-http".into(),
        s.http_url(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    repo.backup(&args)
}

fn restore(repo: &Repo, snap: &str, s: &InfluxServer, extra: &[&str]) -> Output {
    repo.cmd()
        .args(["restore", snap, "--influx-host"])
        .arg(s.rpc_addr())
        .arg("--influx-http")
        .arg(s.http_url())
        .args(extra)
        .run()
}

/// Two databases: `metrics` with a second retention policy, three measurements over four
/// weeks (several shards each) and a continuous query; `events`, small.
fn populate(s: &InfluxServer) -> usize {
    s.exec(None, "CREATE DATABASE metrics");
    s.exec(None, "CREATE DATABASE events");
    // Empty, and named like a file of the snapshot's tree.
    s.exec(None, "CREATE DATABASE metastore");
    s.exec(
        None,
        "CREATE RETENTION POLICY long ON metrics DURATION 0s REPLICATION 1 SHARD DURATION 2w",
    );
    let mut n = 0;
    for (m, count, seed) in [
        ("cpu", 120_000, 1),
        ("mem", 100_000, 2),
        ("disk", 60_000, 3),
    ] {
        s.write("metrics", None, &points(m, count, START_S, 4 * WEEK, seed));
        n += count;
    }
    s.write(
        "metrics",
        Some("long"),
        &points("cpu_daily", 20_000, START_S, 4 * WEEK, 4),
    );
    s.write("events", None, &points("deploy", 500, START_S, WEEK, 5));
    n += 20_500;
    s.exec(
        None,
        "CREATE CONTINUOUS QUERY cq_cpu ON metrics BEGIN SELECT mean(value) INTO metrics.long.cpu_5m FROM cpu GROUP BY time(5m), host END",
    );
    n
}

#[test]
fn databases_restore_exactly_into_another_server_renamed_and_an_existing_one_is_refused() {
    let repo = Repo::new();
    let a = InfluxServer::start();
    let total = populate(&a);
    assert!(total >= 300_000);
    let s = backup(&repo, &a, &[]);
    assert!(s["bytes_read"].as_u64().unwrap() > 1 << 20, "{s}");
    let snaps = repo.snapshots();
    let snap = &snaps[0];
    assert_eq!(snap["source"], "influxdb", "{snap}");
    let meta = &snap["influxdb"];
    let dbs: Vec<&str> = meta["databases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(dbs, ["events", "metastore", "metrics"]);
    let metrics = &meta["databases"][2];
    assert_eq!(metrics["name"], "metrics");
    assert!(
        metrics["shards"].as_array().unwrap().len() >= 5,
        "{metrics}"
    );
    assert_eq!(metrics["counts_before"]["autogen.cpu"]["value"], 120_000);
    assert_eq!(metrics["counts_before"]["long.cpu_daily"]["ok"], 20_000);
    assert_eq!(metrics["continuous_queries"][0][0], "cq_cpu");

    // `ls` shows databases, retention policies and shards with their time and size, then
    // the files; `snapshots` the server and its databases.
    let ls = repo.ok(&["ls", "latest"]).stdout();
    assert!(
        ls.contains("# database metrics (default retention policy autogen)"),
        "{ls}"
    );
    assert!(
        ls.contains("#   retention policy long: keeps forever, shard groups of 336 h"),
        "{ls}"
    );
    assert!(ls.contains("2023-11-13 00:00 .. 2023-11-20 00:00"), "{ls}");
    assert!(ls.contains("#   continuous query cq_cpu"), "{ls}");
    assert!(ls.contains("/metrics/long/"), "{ls}");
    assert!(ls.contains(".tsm"), "{ls}");
    let list = repo.ok(&["snapshots"]).stdout();
    assert!(
        list.contains(&format!(
            "influxdb://{} (events, metastore, metrics)",
            a.rpc_addr()
        )),
        "{list}"
    );

    let b = InfluxServer::start();
    // A dry run creates nothing.
    let out = restore(&repo, "latest", &b, &["--dry-run"]).ok();
    assert!(
        out.stdout().contains("would create database metrics"),
        "{}",
        out.describe()
    );
    assert_eq!(b.databases(), Vec::<String>::new());
    // Two databases under one name: refused before anything is created.
    restore(&repo, "latest", &b, &["--rename", "metrics=events"])
        .expect(1)
        .stderr_has("two databases would be restored under this name");
    assert_eq!(b.databases(), Vec::<String>::new());

    let out = restore(&repo, "latest", &b, &["--rename", "metrics=metrics2"]).ok();
    assert!(
        out.stdout().contains("counts match the backup"),
        "{}",
        out.describe()
    );
    let mut on_b = b.databases();
    on_b.sort();
    assert_eq!(on_b, ["events", "metastore", "metrics2"]);
    for (rp, m) in [
        ("autogen", "cpu"),
        ("autogen", "mem"),
        ("autogen", "disk"),
        ("long", "cpu_daily"),
    ] {
        let want = a.rows("metrics", rp, m);
        assert!(!want.is_empty(), "setup: {rp}.{m}");
        assert!(b.rows("metrics2", rp, m) == want, "{rp}.{m} differs");
    }
    assert!(b.rows("events", "autogen", "deploy") == a.rows("events", "autogen", "deploy"));
    let cqs = b.query("metrics2", "SHOW CONTINUOUS QUERIES").to_string();
    assert!(cqs.contains("cq_cpu") && cqs.contains("metrics2"), "{cqs}");
    let rps = b.query("metrics2", "SHOW RETENTION POLICIES").to_string();
    assert!(rps.contains("long") && rps.contains("336h0m0s"), "{rps}");

    // Again: both exist now; refused by name, nothing changed.
    let before = b.rows("events", "autogen", "deploy");
    let out = restore(&repo, "latest", &b, &["--rename", "metrics=metrics2"])
        .expect(1)
        .stderr_has("events, metastore, metrics2 already exist");
    drop(out);
    assert_eq!(b.rows("events", "autogen", "deploy"), before);
    // One database only, under a third name.
    restore(
        &repo,
        "latest",
        &b,
        &["--influx-database", "metrics", "--rename", "metrics=m3"],
    )
    .ok();
    assert!(b.rows("m3", "long", "cpu_daily") == a.rows("metrics", "long", "cpu_daily"));
    // A database the snapshot does not have.
    restore(&repo, "latest", &b, &["--influx-database", "nope"])
        .expect(1)
        .stderr_has("\"nope\" is not in snapshot");
}

/// What the server counts in one shard of a snapshot: per measurement, values per field
/// (zeros left out, as the snapshot leaves them).
fn server_counts(s: &InfluxServer, db: &str, shard: &Value) -> Value {
    let q = format!(
        "SELECT count(*) FROM \"{}\"./.*/ WHERE time >= {} AND time < {}",
        shard["retention_policy"].as_str().unwrap(),
        shard["start_ns"],
        shard["end_ns"]
    );
    let mut out = serde_json::Map::new();
    for series in s.query(db, &q)["series"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        let mut fields = serde_json::Map::new();
        let cols = series["columns"].as_array().unwrap();
        for (c, v) in cols.iter().zip(series["values"][0].as_array().unwrap()) {
            if let (Some(f), Some(n)) = (c.as_str().unwrap().strip_prefix("count_"), v.as_u64()) {
                if n > 0 {
                    fields.insert(f.to_string(), n.into());
                }
            }
        }
        out.insert(series["name"].as_str().unwrap().to_string(), fields.into());
    }
    out.into()
}

/// Every shard of the newest snapshot: its database and record.
fn shards_of(repo: &Repo) -> Vec<(String, Value)> {
    let snaps = repo.snapshots();
    let meta = &snaps.last().unwrap()["influxdb"];
    let mut out = vec![];
    for d in meta["databases"].as_array().unwrap() {
        for s in d["shards"].as_array().unwrap() {
            out.push((d["name"].as_str().unwrap().to_string(), s.clone()));
        }
    }
    out
}

#[test]
fn counts_come_from_the_shards_files_and_equal_the_servers_shard_by_shard() {
    let repo = Repo::new();
    let a = InfluxServer::start();
    populate(&a);
    // A measurement whose name needs escaping in a series key.
    a.write(
        "events",
        None,
        &format!(
            "my\\ m\\,x,t=1 s=\"a b\",n=3i {}\nmy\\ m\\,x,t=2 s=\"c\" {}\n",
            START_S * 1_000_000_000,
            START_S * 1_000_000_000 + 1
        ),
    );
    // Points written twice over a flush: the first backup writes them to a TSM file, the
    // second writes them again (same series and times, other values) to another. The
    // server keeps one of each; a sum over the files would count them twice.
    a.exec(None, "CREATE DATABASE dup");
    a.write("dup", None, &points("cpu", 3_000, START_S, 86_400, 11));
    backup(&repo, &a, &[]);
    a.write("dup", None, &points("cpu", 3_000, START_S, 86_400, 12));
    backup(&repo, &a, &[]);
    let shards = shards_of(&repo);
    assert!(shards.len() >= 9, "{shards:?}");
    let mut from_files = 0;
    for (db, s) in &shards {
        let want = server_counts(&a, db, s);
        assert_eq!(s["counts_before"], want, "{db} shard {}: {s}", s["id"]);
        assert_eq!(s["counts_after"], want, "{db} shard {}", s["id"]);
        if s["counted_from_files"] == true {
            from_files += 1;
        }
    }
    let (_, dup) = shards.iter().find(|(db, _)| db == "dup").unwrap();
    assert_eq!(dup["counts_before"]["cpu"]["value"], 3_000, "{dup}");
    let tsm_files = dup["files"].as_u64().unwrap() - dup["tombstones"].as_u64().unwrap();
    if tsm_files >= 2 {
        assert_ne!(dup["counted_from_files"], true, "{dup}");
    } else {
        eprintln!("influxd compacted the two flushes into one file before the backup");
    }
    // Every other shard (the rest of the first backup's, read again or taken from it) was
    // counted from its files.
    assert!(
        from_files + 1 >= shards.len(),
        "{from_files} of {}",
        shards.len()
    );

    // A restore checks those counts against the server it restores into.
    let b = InfluxServer::start();
    let out = restore(&repo, "latest", &b, &[]).ok();
    assert!(
        out.stdout().contains("counts match the backup"),
        "{}",
        out.describe()
    );
    assert!(b.rows("dup", "autogen", "cpu") == a.rows("dup", "autogen", "cpu"));
}

#[test]
fn deleted_points_stay_deleted_and_points_written_after_the_delete_stay() {
    let repo = Repo::new();
    let a = InfluxServer::start();
    a.exec(None, "CREATE DATABASE d");
    a.write("d", None, &points("cpu", 20_000, START_S, 2 * WEEK, 7));
    // A first backup flushes the points to TSM files: the delete then leaves tombstones.
    backup(&repo, &a, &[]);
    let cut = (START_S + 86_400) * 1_000_000_000;
    a.exec(
        Some("d"),
        &format!("DELETE FROM cpu WHERE host = 'h3' AND time < {cut}"),
    );
    a.write(
        "d",
        None,
        &format!(
            "cpu,host=h3,region=r0 value=1.5,count=1i,ok=true,note=\"after\" {}\n",
            START_S * 1_000_000_000 + 5
        ),
    );
    let deleted_left = |s: &InfluxServer, db: &str| {
        s.query(
            db,
            &format!("SELECT count(value) FROM cpu WHERE host = 'h3' AND time < {cut}"),
        )["series"][0]["values"][0][1]
            .as_u64()
            .unwrap_or(0)
    };
    assert_eq!(
        deleted_left(&a, "d"),
        1,
        "setup: only the point written after"
    );
    backup(&repo, &a, &[]);
    // The backup follows the delete at once, before influxd compacts the tombstones away
    // (it does within about a second): they are in the snapshot and are replayed.
    let snaps = repo.snapshots();
    let tombstones: u64 = snaps.last().unwrap()["influxdb"]["databases"][0]["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["tombstones"].as_u64().unwrap())
        .sum();
    let b = InfluxServer::start();
    let out = restore(&repo, "latest", &b, &["--json"]).ok().json();
    let replayed = out["databases"][0]["deletes_replayed"].as_u64().unwrap();
    if tombstones > 0 {
        assert!(replayed > 0, "{out}");
        // Which points the tombstones delete needs their times: the server counted.
        let with = snaps.last().unwrap()["influxdb"]["databases"][0]["shards"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["tombstones"].as_u64().unwrap() > 0)
            .cloned()
            .unwrap();
        assert_ne!(with["counted_from_files"], true, "{with}");
    } else {
        eprintln!("influxd compacted the tombstones away before the backup: nothing to replay");
    }
    assert_eq!(
        deleted_left(&b, "d"),
        1,
        "deleted points came back, or the later one is gone"
    );
    assert!(b.rows("d", "autogen", "cpu") == a.rows("d", "autogen", "cpu"));
}

#[test]
fn an_incremental_backup_reads_only_changed_shards_and_restores_alone() {
    let repo = Repo::new();
    let a = InfluxServer::start();
    a.exec(None, "CREATE DATABASE d");
    a.write("d", None, &points("cpu", 80_000, START_S, 4 * WEEK, 9));
    let first = backup(&repo, &a, &[]);
    // The first backup's flush wrote files after its start, and compactions follow: once
    // they are done, the second backup reads those again, and nothing changes after it.
    a.settle();
    backup(&repo, &a, &[]);
    // A day of points appended to the last shard.
    let day_start = START_S + 4 * WEEK - 86_400;
    a.write("d", None, &points("cpu", 2_000, day_start, 86_400, 10));
    let s = backup(&repo, &a, &[]);
    assert!(
        s["bytes_read"].as_u64().unwrap() * 3 < first["bytes_read"].as_u64().unwrap(),
        "an incremental backup read {} of {}",
        s["bytes_read"],
        first["bytes_read"]
    );
    assert!(s["files_unchanged"].as_u64().unwrap() >= 3, "{s}");
    let snaps = repo.snapshots();
    let last = snaps.last().unwrap();
    let unchanged = last["influxdb"]["databases"][0]["shards"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["unchanged"] == true)
        .count();
    assert!(unchanged >= 3, "{last}");
    // Shards taken from the parent keep its counts; the database's are their sums.
    let db = &last["influxdb"]["databases"][0];
    let on_server =
        a.query("d", "SELECT count(value) FROM cpu")["series"][0]["values"][0][1].clone();
    assert!(on_server.as_u64().unwrap() > 80_000, "{on_server}");
    assert_eq!(
        db["counts_before"]["autogen.cpu"]["value"], on_server,
        "{db}"
    );
    assert_eq!(
        db["counts_after"]["autogen.cpu"]["count"], on_server,
        "{db}"
    );
    for shard in db["shards"].as_array().unwrap() {
        assert!(
            shard["counts_before"]["cpu"]["value"].as_u64().unwrap() > 0,
            "{shard}"
        );
    }
    // The parents forgotten and pruned: the last snapshot restores on its own.
    let id = last["id"].as_str().unwrap().to_string();
    for s in &snaps[..snaps.len() - 1] {
        repo.ok(&["forget", s["id"].as_str().unwrap()]);
    }
    repo.ok(&["prune"]);
    repo.ok(&["check", "--read-data"]);
    let b = InfluxServer::start();
    restore(&repo, &id, &b, &[]).ok();
    assert!(b.rows("d", "autogen", "cpu") == a.rows("d", "autogen", "cpu"));
}

/// A TCP proxy to `to` that cuts every connection after `limit` bytes from the server
/// for the first `cut` connections; counts connections.
fn cutting_proxy(to: String, limit: usize, cut: u64) -> (String, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let seen = Arc::new(AtomicU64::new(0));
    let counter = seen.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut client) = c else { return };
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let Ok(mut server) = TcpStream::connect(&to) else {
                return;
            };
            let mut c2 = client.try_clone().unwrap();
            let mut s2 = server.try_clone().unwrap();
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c2, &mut s2);
                let _ = s2.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let mut sent = 0;
                let mut buf = [0u8; 8192];
                loop {
                    let k = match server.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => k,
                    };
                    let k = if n < cut {
                        k.min(limit.saturating_sub(sent))
                    } else {
                        k
                    };
                    if k == 0 || client.write_all(&buf[..k]).is_err() {
                        break;
                    }
                    sent += k;
                }
                let _ = client.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    (addr, seen)
}

#[test]
fn unreachable_servers_missing_databases_and_cut_streams_fail_cleanly() {
    let repo = Repo::new();
    let a = InfluxServer::start();
    a.exec(None, "CREATE DATABASE d");
    a.write("d", None, &points("cpu", 30_000, START_S, WEEK, 11));
    // Nothing listening.
    let port = free_port();
    repo.cmd()
        .args(["backup", "--influxdb", "--influx-http"])
        .arg(a.http_url())
        .arg("--influx-host")
        .arg(format!("127.0.0.1:{port}"))
        .run()
        .expect(1)
        .stderr_has(&format!(
            "cannot reach the InfluxDB RPC port at 127.0.0.1:{port}"
        ));
    // A database it does not have.
    repo.cmd()
        .args([
            "backup",
            "--influxdb",
            "--influx-database",
            "nope",
            "--influx-http",
        ])
        .arg(a.http_url())
        .arg("--influx-host")
        .arg(a.rpc_addr())
        .run()
        .expect(1)
        .stderr_has("database \"nope\" does not exist on the InfluxDB server");
    assert!(repo.snapshots().is_empty());
    // Every stream cut in the middle of the shard: no snapshot.
    let (proxy, _) = cutting_proxy(a.rpc_addr(), 100_000, u64::MAX);
    repo.cmd()
        .args(["backup", "--influxdb", "--influx-http"])
        .arg(a.http_url())
        .arg("--influx-host")
        .arg(&proxy)
        .run()
        .expect(1)
        .stderr_has("no snapshot was written");
    assert!(repo.snapshots().is_empty());
    // The shard cut twice, then whole (connections 0 and 1 ask for the metastore and the
    // shard list): it is read again and the backup completes.
    let (proxy, seen) = cutting_proxy(a.rpc_addr(), 100_000, 4);
    let s = repo
        .cmd()
        .args(["backup", "--json", "--influxdb", "--influx-http"])
        .arg(a.http_url())
        .arg("--influx-host")
        .arg(&proxy)
        .run()
        .ok()
        .json();
    assert!(seen.load(Ordering::SeqCst) > 4, "{s}");
    let b = InfluxServer::start();
    restore(&repo, "latest", &b, &[]).ok();
    assert!(b.rows("d", "autogen", "cpu") == a.rows("d", "autogen", "cpu"));
}

#[test]
fn the_financial_pipeline_policies_run_and_a_restore_test_proves_the_influxdb_backup() {
    use super::policy::PolicyDir;
    let repo = Repo::new_s3();
    let a = InfluxServer::start();
    a.exec(None, "CREATE DATABASE financial_data");
    let mut lines = String::new();
    for i in 0..5_000i64 {
        lines.push_str(&format!(
            "stock_prices,symbol=S{} open={:.2},close={:.2},volume={}i {}\n",
            i % 50,
            100.0 + (i % 97) as f64,
            101.0 + (i % 89) as f64,
            1000 + i,
            (START_S + i * 600) * 1_000_000_000
        ));
    }
    a.write("financial_data", None, &lines);
    let d = PolicyDir::examples();
    let root = repo.scratch("root");
    std::fs::create_dir_all(root.join("opt/financial-pipeline/configs")).unwrap();
    std::fs::write(
        root.join("opt/financial-pipeline/configs/pipeline.yaml"),
        b"sources: [nasdaq]\n",
    )
    .unwrap();
    std::fs::write(root.join("opt/financial-pipeline/.env"), b"API_KEY=x\n").unwrap();
    let creds = d.secret("aws-credentials");
    std::fs::write(
        &creds,
        format!("[default]\naws_access_key_id = {S3_ACCESS_KEY}\naws_secret_access_key = {S3_SECRET_KEY}\n"),
    )
    .unwrap();
    let cache = repo.scratch("cache").display().to_string();
    d.edit("financial-pipeline-configs.toml", |doc| {
        doc["repository"]["location"] = toml_edit::value(repo.location.clone());
        let mut paths = toml_edit::Array::new();
        paths.push(
            root.join("opt/financial-pipeline/configs")
                .display()
                .to_string(),
        );
        paths.push(
            root.join("opt/financial-pipeline/.env")
                .display()
                .to_string(),
        );
        doc["source"]["paths"] = toml_edit::value(paths);
    });
    d.edit("financial-pipeline-influxdb.toml", |doc| {
        doc["repository"]["location"] = toml_edit::value(repo.location.clone());
        doc["repository"]["cache_dir"] = toml_edit::value(cache.clone());
        doc["source"]["host"] = toml_edit::value(a.rpc_addr());
        doc["source"]["http"] = toml_edit::value(a.http_url());
        let checks: toml_edit::ArrayOfTables = {
            let mut t = toml_edit::Table::new();
            t["database"] = toml_edit::value("financial_data");
            t["query"] = toml_edit::value("SELECT count(close) FROM stock_prices");
            t["at_least"] = toml_edit::value(5_000);
            let mut arr = toml_edit::ArrayOfTables::new();
            arr.push(t);
            arr
        };
        doc["verify"]["influxql_checks"] = toml_edit::Item::ArrayOfTables(checks);
    });
    let policies = d.policies();
    let run = |args: &[&str]| {
        backupd()
            .arg("--policies")
            .arg(&policies)
            .env("BACKUPD_CACHE_DIR", repo.scratch("cache"))
            .args(args)
            .run()
    };
    run(&["policy", "check"]).ok();
    run(&["backup", "--policy", "financial-pipeline-configs"]).ok();
    run(&["backup", "--policy", "financial-pipeline-influxdb"]).ok();
    let snaps = repo.snapshots();
    assert_eq!(snaps.len(), 2);
    let ix = snaps
        .iter()
        .find(|s| s["policy"] == "financial-pipeline-influxdb")
        .unwrap();
    assert_eq!(ix["source"], "influxdb");
    assert_eq!(
        ix["paths"][0],
        format!("influxdb://{}/financial_data", a.rpc_addr())
    );

    let scratch = repo.scratch("scratch");
    let v = run(&[
        "verify",
        "--policy",
        "financial-pipeline-influxdb",
        "--json",
        "--scratch",
        scratch.to_str().unwrap(),
    ])
    .ok()
    .json();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["restore"]["source"], "influxdb", "{v}");
    assert_eq!(
        v["restore"]["measurements"]["financial_data"],
        serde_json::json!(["stock_prices"]),
        "{v}"
    );
    assert_eq!(v["restore"]["influxql_checks"][0]["value"], "5000", "{v}");
    assert_eq!(
        std::fs::read_dir(&scratch).unwrap().count(),
        0,
        "scratch left behind"
    );

    // A measurement the copy lacks, and a check that does not hold: named, exit 1.
    d.edit("financial-pipeline-influxdb.toml", |doc| {
        let mut ms = toml_edit::Array::new();
        ms.push("stock_prices");
        ms.push("order_book");
        doc["verify"]["measurements"] = toml_edit::value(ms);
        doc["verify"]["influxql_checks"][0]["at_least"] = toml_edit::value(5_001);
    });
    let out = run(&[
        "verify",
        "--policy",
        "financial-pipeline-influxdb",
        "--json",
        "--scratch",
        scratch.to_str().unwrap(),
    ])
    .expect(1);
    let v = out.json();
    let problems = v["problems"].to_string();
    assert!(problems.contains("measurement order_book"), "{v}");
    assert!(
        problems.contains("InfluxQL check failed in financial_data"),
        "{v}"
    );
    // No influxd where the policy says: the key is named.
    d.edit("financial-pipeline-influxdb.toml", |doc| {
        doc["verify"]["influxd"] = toml_edit::value("/nonexistent/influxd");
    });
    let v = run(&[
        "verify",
        "--policy",
        "financial-pipeline-influxdb",
        "--json",
        "--scratch",
        scratch.to_str().unwrap(),
    ])
    .expect(1)
    .json();
    assert!(
        v["problems"].to_string().contains("[verify] influxd"),
        "{v}"
    );
}
