//! A throwaway InfluxDB 1.x server for the tests: `influxd run` with its own config,
//! directories and free ports in a temp dir (../shared/design/recipes.md section 2),
//! stopped when dropped. Data goes in and is checked through `curl` on its HTTP API, not
//! through backupd's own client.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::common::free_port;

/// A running influxd.
pub struct InfluxServer {
    /// Its temp dir (config, data, log).
    pub dir: tempfile::TempDir,
    /// HTTP port.
    pub http: u16,
    /// RPC (backup protocol) port.
    pub rpc: u16,
    child: Option<Child>,
}

impl InfluxServer {
    /// Starts one and waits until it answers `/ping`.
    pub fn start() -> InfluxServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let (http, rpc) = loop {
            let (h, r) = (free_port(), free_port());
            if h != r {
                break (h, r);
            }
        };
        let t = dir.path().display().to_string();
        fs::write(
            dir.path().join("influxdb.conf"),
            format!(
                r#"reporting-disabled = true
bind-address = "127.0.0.1:{rpc}"
[meta]
  dir = "{t}/meta"
[data]
  dir = "{t}/data"
  wal-dir = "{t}/wal"
  query-log-enabled = false
[http]
  bind-address = "127.0.0.1:{http}"
  log-enabled = false
[monitor]
  store-enabled = false
"#
            ),
        )
        .unwrap();
        let log = fs::File::create(dir.path().join("influxd.log")).unwrap();
        let child = Command::new("influxd")
            .args(["run", "-config"])
            .arg(dir.path().join("influxdb.conf"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("influxd (apt-get install influxdb)");
        let mut s = InfluxServer {
            dir,
            http,
            rpc,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !s.pings() {
            if let Some(c) = s.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("influxd exited ({status}):\n{}", s.log());
                }
            }
            assert!(
                Instant::now() < deadline,
                "influxd did not start:\n{}",
                s.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    fn pings(&self) -> bool {
        Command::new("curl")
            .args(["-sf", "-o", "/dev/null"])
            .arg(format!("http://127.0.0.1:{}/ping", self.http))
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Its log.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("influxd.log")).unwrap_or_default()
    }

    /// `host:port` of the RPC port.
    pub fn rpc_addr(&self) -> String {
        format!("127.0.0.1:{}", self.rpc)
    }

    /// The HTTP API URL.
    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http)
    }

    /// Runs an InfluxQL statement (POST); panics on an error in the answer.
    #[track_caller]
    pub fn exec(&self, db: Option<&str>, q: &str) -> Value {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "-XPOST"])
            .arg(format!("{}/query", self.http_url()))
            .args(["--data-urlencode", &format!("q={q}")]);
        if let Some(db) = db {
            cmd.args(["--data-urlencode", &format!("db={db}")]);
        }
        let out = cmd.output().unwrap();
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{q}: {e}: {}", String::from_utf8_lossy(&out.stdout)));
        assert!(
            v["results"][0]["error"].is_null() && v["error"].is_null(),
            "{q}: {v}"
        );
        v
    }

    /// Runs a query (GET, nanosecond times) and returns its first result.
    #[track_caller]
    pub fn query(&self, db: &str, q: &str) -> Value {
        let out = Command::new("curl")
            .args(["-sS", "-G"])
            .arg(format!("{}/query", self.http_url()))
            .args(["--data-urlencode", &format!("db={db}")])
            .args(["--data-urlencode", "epoch=ns"])
            .args(["--data-urlencode", &format!("q={q}")])
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(v["results"][0]["error"].is_null(), "{q}: {v}");
        v["results"][0].clone()
    }

    /// Every row of `SELECT * FROM m` in retention policy `rp`, as strings, sorted.
    pub fn rows(&self, db: &str, rp: &str, m: &str) -> Vec<String> {
        let r = self.query(db, &format!("SELECT * FROM \"{rp}\".\"{m}\""));
        let mut rows: Vec<String> = r["series"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["values"].as_array().cloned().unwrap_or_default())
            .map(|row| row.to_string())
            .collect();
        rows.sort();
        rows
    }

    /// Writes line protocol into `db` (retention policy `rp` when given).
    #[track_caller]
    pub fn write(&self, db: &str, rp: Option<&str>, lines: &str) {
        let file = self.dir.path().join("batch.lp");
        fs::write(&file, lines).unwrap();
        let mut url = format!("{}/write?db={db}", self.http_url());
        if let Some(rp) = rp {
            url.push_str(&format!("&rp={rp}"));
        }
        let out = Command::new("curl")
            .args(["-sS", "-o", "/dev/stderr", "-w", "%{http_code}", "-XPOST"])
            .arg(&url)
            .arg("--data-binary")
            .arg(format!("@{}", file.display()))
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "204",
            "write to {db}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Names of its databases.
    pub fn databases(&self) -> Vec<String> {
        self.query("", "SHOW DATABASES")["series"][0]["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r[0].as_str().map(String::from))
            .collect()
    }

    /// Its data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Waits until no file under the data directory has changed for two seconds (the
    /// compactions after a write or a backup's flush are done).
    pub fn settle(&self) {
        let listing = || {
            let mut v = vec![];
            let mut stack = vec![self.data_dir()];
            while let Some(d) = stack.pop() {
                for e in fs::read_dir(&d).into_iter().flatten().flatten() {
                    let m = e.metadata().unwrap();
                    if m.is_dir() {
                        stack.push(e.path());
                    } else {
                        v.push((e.path(), m.len(), m.modified().ok()));
                    }
                }
            }
            v.sort();
            v
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = listing();
        let mut quiet_since = Instant::now();
        while quiet_since.elapsed() < Duration::from_secs(2) {
            assert!(Instant::now() < deadline, "influxd kept changing its files");
            std::thread::sleep(Duration::from_millis(250));
            let now = listing();
            if now != last {
                last = now;
                quiet_since = Instant::now();
            }
        }
    }
}

impl Drop for InfluxServer {
    fn drop(&mut self) {
        if let Some(c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let mut c = c;
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A week in seconds.
pub const WEEK: i64 = 7 * 86_400;

/// Line protocol for `n` points of measurement `m` spread over `span_s` seconds from
/// `start_s`, with tags `host` and `region` and a field of every type.
pub fn points(m: &str, n: usize, start_s: i64, span_s: i64, seed: u64) -> String {
    let mut out = String::with_capacity(n * 100);
    let span_ns = span_s * 1_000_000_000;
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    for i in 0..n {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let t = start_s * 1_000_000_000 + (i as i64) * (span_ns / n as i64);
        out.push_str(&format!(
            "{m},host=h{},region=r{} value={:.6},count={}i,ok={},note=\"n{} {}\" {t}\n",
            i % 7,
            i % 3,
            (x >> 11) as f64 / (1u64 << 53) as f64,
            (x >> 40) as i64 - 8_000_000,
            i % 2 == 0,
            i,
            (x >> 50) % 100
        ));
    }
    out
}
