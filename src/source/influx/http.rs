//! InfluxQL over the InfluxDB 1.x HTTP API (`/query`): what the backup protocol does not
//! carry — measurements and their counts (recorded with a snapshot, compared after a
//! restore), deletes (tombstones replayed), continuous queries. Credentials go in an
//! `Authorization: Basic` header, never in the URL.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::Engine;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use zeroize::Zeroizing;

/// Longest a query may take (a count over a large measurement is a scan).
const QUERY_TIMEOUT: Duration = Duration::from_secs(600);
/// The largest answer read.
const MAX_ANSWER: usize = 64 << 20;

/// Why a query failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The URL is not one.
    #[error("InfluxDB HTTP API URL {url:?}: {why}")]
    Url {
        /// The URL.
        url: String,
        /// Why.
        why: String,
    },
    /// No answer.
    #[error("cannot reach the InfluxDB HTTP API at {url}: {why}")]
    Unreachable {
        /// The URL.
        url: String,
        /// Why.
        why: String,
    },
    /// An HTTP error status.
    #[error("InfluxDB HTTP API at {url}: {status} for {query:?}: {body}")]
    Status {
        /// The URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// The statement.
        query: String,
        /// The server's message.
        body: String,
    },
    /// The statement failed (InfluxQL error in the result).
    #[error("InfluxDB at {url}: {query:?} failed: {error}")]
    Statement {
        /// The URL.
        url: String,
        /// The statement.
        query: String,
        /// The server's message.
        error: String,
    },
    /// An answer that is not InfluxDB's.
    #[error("InfluxDB HTTP API at {url}: unexpected answer to {query:?}: {why}")]
    Answer {
        /// The URL.
        url: String,
        /// The statement.
        query: String,
        /// What was wrong.
        why: String,
    },
    /// The runtime could not start.
    #[error("starting the HTTP client: {0}")]
    Runtime(std::io::Error),
}

/// Where and as whom to query.
#[derive(Clone)]
pub struct HttpApi {
    base: String,
    auth: Option<Zeroizing<String>>,
    /// The connector, made at the first request and kept: for `https://` it holds the
    /// system's root certificates, which take a while to load; for `http://` none.
    connector: Arc<OnceLock<Result<Connector, String>>>,
}

type Connector = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

impl std::fmt::Debug for HttpApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpApi")
            .field("base", &self.base)
            .field("auth", &self.auth.as_ref().map(|_| "(set)"))
            .finish()
    }
}

/// One series of a result: its name, columns and rows.
#[derive(Debug, Clone, Default)]
pub struct Series {
    /// Measurement (or what the statement names).
    pub name: String,
    /// Column names.
    pub columns: Vec<String>,
    /// Rows.
    pub values: Vec<Vec<Value>>,
}

impl HttpApi {
    /// The API at `url` (`http://host:8086`), with a user and password when given.
    ///
    /// # Errors
    /// A URL that is not `http://` or `https://` with a host.
    pub fn new(
        url: &str,
        credentials: Option<(String, Zeroizing<String>)>,
    ) -> Result<Self, HttpError> {
        let base = url.trim_end_matches('/').to_string();
        let bad = |why: &str| HttpError::Url {
            url: url.into(),
            why: why.into(),
        };
        let rest = base
            .strip_prefix("http://")
            .or_else(|| base.strip_prefix("https://"))
            .ok_or_else(|| bad("must start with http:// or https://"))?;
        if rest.is_empty() || rest.contains(['?', '#', '@']) {
            return Err(bad(
                "must be scheme://host[:port][/path], without credentials",
            ));
        }
        let auth = credentials.map(|(user, password)| {
            let mut plain = Zeroizing::new(format!("{user}:"));
            plain.push_str(&password);
            Zeroizing::new(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(plain.as_bytes())
            ))
        });
        Ok(HttpApi {
            base,
            auth,
            connector: Arc::default(),
        })
    }

    fn connector(&self) -> Result<Connector, String> {
        self.connector
            .get_or_init(|| {
                let provider = rustls::crypto::ring::default_provider();
                let builder = hyper_rustls::HttpsConnectorBuilder::new();
                let builder = if self.base.starts_with("https://") {
                    builder
                        .with_provider_and_native_roots(provider)
                        .map_err(|e| format!("TLS roots: {e}"))?
                } else {
                    let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
                        .with_safe_default_protocol_versions()
                        .map_err(|e| format!("TLS: {e}"))?
                        .with_root_certificates(rustls::RootCertStore::empty())
                        .with_no_client_auth();
                    builder.with_tls_config(config)
                };
                Ok(builder.https_or_http().enable_http1().build())
            })
            .clone()
    }

    /// The base URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// Runs one statement (`db` when it needs one); returns each series of its result.
    /// Reads go as GET, everything else as POST, as the API asks.
    ///
    /// # Errors
    /// Connection failures, HTTP errors, or the statement's own error.
    pub fn query(&self, db: Option<&str>, q: &str) -> Result<Vec<Series>, HttpError> {
        let mut form = url::form_urlencoded::Serializer::new(String::new());
        if let Some(db) = db {
            form.append_pair("db", db);
        }
        form.append_pair("q", q);
        form.append_pair("epoch", "ns");
        let params = form.finish();
        let read_only = {
            let l = q.trim_start().to_ascii_uppercase();
            l.starts_with("SELECT") || l.starts_with("SHOW")
        };
        let url = format!("{}/query", self.base);
        let (status, _, body) = self.send(&url, &params, read_only, q)?;
        if status != 200 {
            return Err(HttpError::Status {
                url: self.base.clone(),
                status,
                query: q.into(),
                body: String::from_utf8_lossy(&body)
                    .trim()
                    .chars()
                    .take(500)
                    .collect(),
            });
        }
        parse_answer(&body).map_err(|e| match e {
            AnswerError::Statement(error) => HttpError::Statement {
                url: self.base.clone(),
                query: q.into(),
                error,
            },
            AnswerError::Malformed(why) => HttpError::Answer {
                url: self.base.clone(),
                query: q.into(),
                why,
            },
        })
    }

    fn send(
        &self,
        url: &str,
        params: &str,
        get: bool,
        q: &str,
    ) -> Result<(u16, http::HeaderMap, Vec<u8>), HttpError> {
        let unreachable = |why: String| HttpError::Unreachable {
            url: self.base.clone(),
            why,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(HttpError::Runtime)?;
        rt.block_on(async {
            let connector = self.connector().map_err(unreachable)?;
            let client: Client<_, Full<bytes::Bytes>> =
                Client::builder(TokioExecutor::new()).build(connector);
            let mut req = if get {
                http::Request::get(format!("{url}?{params}")).body(Full::default())
            } else {
                http::Request::post(url)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(Full::new(bytes::Bytes::from(params.to_string())))
            }
            .map_err(|e| HttpError::Url {
                url: self.base.clone(),
                why: e.to_string(),
            })?;
            if let Some(a) = &self.auth {
                let v = http::HeaderValue::from_str(a).map_err(|_| HttpError::Url {
                    url: self.base.clone(),
                    why: "the credentials cannot go in a header".into(),
                })?;
                req.headers_mut().insert(http::header::AUTHORIZATION, v);
            }
            let run = async {
                let resp = client
                    .request(req)
                    .await
                    .map_err(|e| unreachable(error_chain(&e)))?;
                let status = resp.status().as_u16();
                let headers = resp.headers().clone();
                let body = Limited::new(resp.into_body(), MAX_ANSWER)
                    .collect()
                    .await
                    .map_err(|e| unreachable(format!("reading the answer: {e}")))?
                    .to_bytes()
                    .to_vec();
                Ok((status, headers, body))
            };
            tokio::time::timeout(QUERY_TIMEOUT, run)
                .await
                .map_err(|_| unreachable(format!("no answer to {q:?} within {QUERY_TIMEOUT:?}")))?
        })
    }

    /// `/ping`: the server's clock (its `Date`, to the second) and version.
    ///
    /// # Errors
    /// No answer, or not 204 (authentication is not asked for by `/ping`).
    pub fn ping(&self) -> Result<(Option<chrono::DateTime<chrono::Utc>>, String), HttpError> {
        let url = format!("{}/ping", self.base);
        let (status, headers, body) = self.send(&url, "", true, "ping")?;
        if status != 204 && status != 200 {
            return Err(HttpError::Status {
                url: self.base.clone(),
                status,
                query: "/ping".into(),
                body: String::from_utf8_lossy(&body)
                    .trim()
                    .chars()
                    .take(500)
                    .collect(),
            });
        }
        let header = |n: &str| {
            headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        let date = chrono::DateTime::parse_from_rfc2822(&header("date"))
            .ok()
            .map(|d| d.with_timezone(&chrono::Utc));
        Ok((date, header("x-influxdb-version")))
    }

    /// Names of the databases.
    ///
    /// # Errors
    /// As [`HttpApi::query`].
    pub fn databases(&self) -> Result<Vec<String>, HttpError> {
        Ok(first_column(&self.query(None, "SHOW DATABASES")?))
    }

    /// Names of the measurements of `db`.
    ///
    /// # Errors
    /// As [`HttpApi::query`].
    pub fn measurements(&self, db: &str) -> Result<Vec<String>, HttpError> {
        Ok(first_column(&self.query(Some(db), "SHOW MEASUREMENTS")?))
    }

    /// Per retention policy and measurement of `db` (keyed `rp.measurement`), its values
    /// per field (`SELECT count(*)`); measurements without values in a retention policy
    /// are left out.
    ///
    /// # Errors
    /// As [`HttpApi::query`].
    pub fn counts(&self, db: &str, retention_policies: &[String]) -> Result<Counts, HttpError> {
        let mut out = Counts::new();
        let measurements = self.measurements(db)?;
        for rp in retention_policies {
            for m in &measurements {
                let q = format!(
                    "SELECT count(*) FROM {}.{}",
                    quote_ident(rp),
                    quote_ident(m)
                );
                let mut fields = BTreeMap::new();
                for s in self.query(Some(db), &q)? {
                    add_counts(&s, &mut fields);
                }
                if !fields.is_empty() {
                    out.insert(format!("{rp}.{m}"), fields);
                }
            }
        }
        Ok(out)
    }

    /// Per measurement of retention policy `rp` of `db`, its values per field with times
    /// in `[start_ns, end_ns)` (one shard group's range): one query, over that shard only.
    ///
    /// # Errors
    /// As [`HttpApi::query`].
    pub fn counts_in(
        &self,
        db: &str,
        rp: &str,
        start_ns: i64,
        end_ns: i64,
    ) -> Result<Counts, HttpError> {
        let q = format!(
            "SELECT count(*) FROM {}./.*/ WHERE time >= {start_ns} AND time < {end_ns}",
            quote_ident(rp)
        );
        let mut out = Counts::new();
        for s in self.query(Some(db), &q)? {
            add_counts(&s, out.entry(s.name.clone()).or_default());
        }
        out.retain(|_, fields| !fields.is_empty());
        Ok(out)
    }

    /// The tag keys of measurement `m` of `db`.
    ///
    /// # Errors
    /// As [`HttpApi::query`].
    pub fn tag_keys(&self, db: &str, m: &str) -> Result<Vec<String>, HttpError> {
        let q = format!("SHOW TAG KEYS FROM {}", quote_ident(m));
        Ok(first_column(&self.query(Some(db), &q)?))
    }
}

/// Per measurement, values per field.
pub type Counts = BTreeMap<String, BTreeMap<String, u64>>;

/// Why a `/query` answer gave no series.
#[derive(Debug)]
pub enum AnswerError {
    /// The statement failed: the server's message.
    Statement(String),
    /// Not an answer of InfluxDB's.
    Malformed(String),
}

/// Decodes the body of a `/query` answer (status 200) into the series of its first result.
///
/// # Errors
/// The statement's error, or a body that is not InfluxDB's JSON answer.
pub fn parse_answer(body: &[u8]) -> Result<Vec<Series>, AnswerError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| AnswerError::Malformed(e.to_string()))?;
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        return Err(AnswerError::Statement(e.into()));
    }
    let result = v
        .get("results")
        .and_then(|r| r.get(0))
        .ok_or_else(|| AnswerError::Malformed("no results".into()))?;
    if let Some(e) = result.get("error").and_then(Value::as_str) {
        return Err(AnswerError::Statement(e.into()));
    }
    let mut out = vec![];
    for s in result
        .get("series")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        out.push(Series {
            name: s.get("name").and_then(Value::as_str).unwrap_or("").into(),
            columns: s
                .get("columns")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|c| c.as_str().map(String::from))
                .collect(),
            values: s
                .get("values")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|r| r.as_array().cloned())
                .collect(),
        });
    }
    Ok(out)
}

/// Adds the `count_<field>` columns of a `SELECT count(*)` result to `fields`.
pub fn add_counts(s: &Series, fields: &mut BTreeMap<String, u64>) {
    for row in &s.values {
        for (c, v) in s.columns.iter().zip(row) {
            if let (Some(field), Some(n)) = (c.strip_prefix("count_"), v.as_u64()) {
                // A server's number: a sum past u64 stays at the top, never wraps.
                let e = fields.entry(field.to_string()).or_insert(0);
                *e = e.saturating_add(n);
            }
        }
    }
}

fn first_column(series: &[Series]) -> Vec<String> {
    series
        .iter()
        .flat_map(|s| s.values.iter())
        .filter_map(|r| r.first().and_then(Value::as_str).map(String::from))
        .collect()
}

/// An InfluxQL identifier, double-quoted.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// An InfluxQL string literal, single-quoted.
pub fn quote_str(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_past_u64_saturate_instead_of_wrapping() {
        let body = br#"{"results":[{"statement_id":0,"series":[{"name":"cpu","columns":["time","count_value"],"values":[[0,18446744073709551615],[1,1]]}]}]}"#;
        let series = parse_answer(body).unwrap();
        let mut fields = BTreeMap::new();
        for s in &series {
            add_counts(s, &mut fields);
        }
        assert_eq!(fields["value"], u64::MAX);
        assert!(matches!(
            parse_answer(br#"{"results":[{"error":"database not found: x"}]}"#),
            Err(AnswerError::Statement(e)) if e == "database not found: x"
        ));
        assert!(matches!(
            parse_answer(b"{}"),
            Err(AnswerError::Malformed(_))
        ));
    }

    #[test]
    fn urls_without_a_scheme_or_with_credentials_are_refused_and_the_password_is_not_shown() {
        assert!(HttpApi::new("localhost:8086", None).is_err());
        assert!(HttpApi::new("http://u:p@localhost:8086", None).is_err());
        let api = HttpApi::new(
            "http://127.0.0.1:8086/",
            Some(("u".into(), Zeroizing::new("hunter2".into()))),
        )
        .unwrap();
        assert_eq!(api.url(), "http://127.0.0.1:8086");
        assert!(!format!("{api:?}").contains("hunter2"));
        assert!(!format!("{api:?}")
            .contains(&base64::engine::general_purpose::STANDARD.encode("u:hunter2")));
    }

    #[test]
    fn identifiers_and_strings_are_quoted() {
        assert_eq!(quote_ident(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(quote_str("it's"), r"'it\'s'");
    }
}
