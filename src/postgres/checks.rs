//! A policy's SQL checks, run against a restored copy of its cluster: each query's first
//! value of its first row must be true, at least a number, or equal to a text.

use std::time::Duration;

use tokio_postgres::{NoTls, SimpleQueryMessage};

use crate::policy::{SqlCheck, SqlExpect};

/// Session options for connections to a restored copy: per-role or per-database settings
/// stored in its catalog (`ALTER ROLE ... SET session_preload_libraries`) do not choose
/// the code its sessions load.
pub const RESTORED_SESSION_OPTIONS: &str =
    "-c session_preload_libraries= -c local_preload_libraries= -c dynamic_library_path=$libdir";

/// The outcome of one check.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct SqlCheckResult {
    /// The database it ran in.
    pub database: String,
    /// The query.
    pub query: String,
    /// The first value of the first row (None: no row, or NULL).
    pub value: Option<String>,
    /// Whether it held.
    pub ok: bool,
    /// Why not.
    pub why: Option<String>,
}

/// Whether `value` meets `expect`, and why not.
pub fn evaluate(expect: &SqlExpect, value: Option<&str>) -> Result<(), String> {
    let Some(v) = value else {
        return Err("the query returned no row or NULL".into());
    };
    match expect {
        SqlExpect::True => match v {
            "t" | "true" => Ok(()),
            other => Err(format!("expected true, got {other:?}")),
        },
        SqlExpect::AtLeast(n) => match v.trim().parse::<f64>() {
            Ok(x) if x >= *n as f64 => Ok(()),
            Ok(x) => Err(format!("expected at least {n}, got {x}")),
            Err(_) => Err(format!("expected a number of at least {n}, got {v:?}")),
        },
        SqlExpect::Equals(want) => {
            if v == want {
                Ok(())
            } else {
                Err(format!("expected {want:?}, got {v:?}"))
            }
        }
    }
}

/// Connection settings of the restored server.
pub struct Target<'a> {
    /// Host (the restored server listens on loopback).
    pub host: &'a str,
    /// Its port.
    pub port: u16,
    /// User.
    pub user: &'a str,
    /// Password, if the server asks.
    pub password: Option<&'a str>,
    /// Database for checks that name none.
    pub database: &'a str,
}

async fn one(t: &Target<'_>, c: &SqlCheck) -> SqlCheckResult {
    let db = c.database.as_deref().unwrap_or(t.database).to_string();
    let mut result = SqlCheckResult {
        database: db.clone(),
        query: c.query.clone(),
        value: None,
        ok: false,
        why: None,
    };
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(t.host)
        .port(t.port)
        .user(t.user)
        .dbname(&db)
        .application_name("backupd verify")
        .options(RESTORED_SESSION_OPTIONS)
        .connect_timeout(Duration::from_secs(30));
    if let Some(p) = t.password {
        cfg.password(p);
    }
    let (client, conn) = match cfg.connect(NoTls).await {
        Ok(x) => x,
        Err(e) => {
            result.why = Some(format!("connecting to database {db}: {e}"));
            return result;
        }
    };
    let task = tokio::spawn(conn);
    match client.simple_query(&c.query).await {
        Ok(msgs) => {
            result.value = msgs
                .iter()
                .find_map(|m| match m {
                    SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_string)),
                    _ => None,
                })
                .flatten();
            match evaluate(&c.expect, result.value.as_deref()) {
                Ok(()) => result.ok = true,
                Err(why) => result.why = Some(why),
            }
        }
        Err(e) => result.why = Some(format!("the query failed: {e}")),
    }
    drop(client);
    let _ = task.await;
    result
}

/// Runs every check (each on its own connection), in order.
pub fn run_sql_checks(t: &Target<'_>, checks: &[SqlCheck]) -> Vec<SqlCheckResult> {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return checks
                .iter()
                .map(|c| SqlCheckResult {
                    database: c.database.clone().unwrap_or_default(),
                    query: c.query.clone(),
                    value: None,
                    ok: false,
                    why: Some(format!("runtime: {e}")),
                })
                .collect()
        }
    };
    rt.block_on(async {
        let mut out = vec![];
        for c in checks {
            out.push(one(t, c).await);
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expectations() {
        assert!(evaluate(&SqlExpect::True, Some("t")).is_ok());
        assert!(evaluate(&SqlExpect::True, Some("f"))
            .unwrap_err()
            .contains("expected true"));
        assert!(evaluate(&SqlExpect::AtLeast(1), Some("500")).is_ok());
        assert!(evaluate(&SqlExpect::AtLeast(1), Some("0"))
            .unwrap_err()
            .contains("at least 1"));
        assert!(evaluate(&SqlExpect::AtLeast(1), Some("abc")).is_err());
        assert!(evaluate(&SqlExpect::Equals("x".into()), Some("x")).is_ok());
        assert!(evaluate(&SqlExpect::Equals("x".into()), Some("y")).is_err());
        assert!(evaluate(&SqlExpect::AtLeast(1), None)
            .unwrap_err()
            .contains("no row"));
    }
}
