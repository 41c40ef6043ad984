//! A loopback HTTP proxy in front of the test S3 server that misbehaves on purpose: it
//! answers a seeded share of requests with `503 SlowDown` or resets the connection
//! (RST, no answer), or refuses every write with `403 AccessDenied` (a read-only
//! repository). It counts what it saw, at the store's side: requests by method and the
//! response bytes it passed on, independently of backupd's own counters.
//!
//! Each request gets a connection of its own (the proxy asks both sides for
//! `Connection: close`), so every request is seen and decided alone.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use super::common::Rng;

/// How the proxy misbehaves.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// Passes everything on.
    Honest,
    /// A share (per mille) of requests answered 503 SlowDown, another share reset.
    Flaky {
        /// 503s per thousand requests.
        slow_down: u32,
        /// Resets per thousand requests.
        reset: u32,
    },
    /// Every PUT, POST and DELETE answered 403 AccessDenied.
    ReadOnly,
}

/// What the proxy saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// Requests in all.
    pub requests: AtomicU64,
    /// GET and HEAD requests.
    pub reads: AtomicU64,
    /// PUT and POST requests.
    pub writes: AtomicU64,
    /// DELETE requests.
    pub deletes: AtomicU64,
    /// Answered 503.
    pub slow_downs: AtomicU64,
    /// Reset.
    pub resets: AtomicU64,
    /// Answered 403.
    pub denied: AtomicU64,
    /// Bytes of responses passed on to the client (headers and bodies).
    pub bytes_down: AtomicU64,
    /// Bytes of GET response bodies passed on.
    pub body_bytes_down: AtomicU64,
}

/// A running proxy; stops when dropped.
pub struct S3Proxy {
    /// Its port.
    pub port: u16,
    /// What it saw.
    pub seen: Arc<Seen>,
    stop: Arc<AtomicBool>,
}

impl S3Proxy {
    /// Starts a proxy to `upstream_port` on loopback.
    pub fn start(upstream_port: u16, mode: Mode, seed: u64) -> S3Proxy {
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Seen::default());
        let stop = Arc::new(AtomicBool::new(false));
        let rng = Arc::new(Mutex::new(Rng(seed)));
        {
            let (seen, stop) = (seen.clone(), stop.clone());
            thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let (seen, rng) = (seen.clone(), rng.clone());
                    thread::spawn(move || {
                        let _ = serve(conn, upstream_port, mode, &seen, &rng);
                    });
                }
            });
        }
        S3Proxy { port, seen, stop }
    }

    /// `s3:http://127.0.0.1:PORT/PATH` through the proxy.
    pub fn location(&self, path: &str) -> String {
        format!("s3:http://127.0.0.1:{}/{path}", self.port)
    }

    /// A number it counted.
    pub fn count(c: &AtomicU64) -> u64 {
        c.load(Ordering::SeqCst)
    }
}

impl Drop for S3Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Reads one request head (up to the blank line).
fn read_head(r: &mut BufReader<TcpStream>) -> std::io::Result<Vec<String>> {
    let mut lines = vec![];
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        if line.is_empty() {
            return Ok(lines);
        }
        lines.push(line);
    }
}

fn header<'a>(head: &'a [String], name: &str) -> Option<&'a str> {
    head.iter().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Reads (and returns) the request body the head announces.
fn read_body(r: &mut BufReader<TcpStream>, head: &[String]) -> std::io::Result<Vec<u8>> {
    let len: usize = header(head, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    Ok(body)
}

fn answer(mut conn: &TcpStream, status: &str, code: &str, message: &str) {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    );
    let _ = write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.flush();
}

/// Closes with a TCP reset: SO_LINGER 0, then close.
fn reset(conn: TcpStream) {
    let _ = nix::sys::socket::setsockopt(
        &conn,
        nix::sys::socket::sockopt::Linger,
        &nix::libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    );
    drop(conn);
}

fn serve(
    conn: TcpStream,
    upstream_port: u16,
    mode: Mode,
    seen: &Seen,
    rng: &Mutex<Rng>,
) -> std::io::Result<()> {
    let mut r = BufReader::new(conn.try_clone()?);
    let head = read_head(&mut r)?;
    let method = head[0].split_whitespace().next().unwrap_or("").to_string();
    seen.requests.fetch_add(1, Ordering::SeqCst);
    match method.as_str() {
        "GET" | "HEAD" => &seen.reads,
        "DELETE" => &seen.deletes,
        _ => &seen.writes,
    }
    .fetch_add(1, Ordering::SeqCst);
    if header(&head, "expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
        (&conn).write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    let body = read_body(&mut r, &head)?;
    match mode {
        Mode::ReadOnly if matches!(method.as_str(), "PUT" | "POST" | "DELETE") => {
            seen.denied.fetch_add(1, Ordering::SeqCst);
            answer(&conn, "403 Forbidden", "AccessDenied", "Access Denied");
            return Ok(());
        }
        Mode::Flaky {
            slow_down,
            reset: resets,
        } => {
            let roll = rng.lock().unwrap().next() % 1000;
            if roll < u64::from(slow_down) {
                seen.slow_downs.fetch_add(1, Ordering::SeqCst);
                answer(
                    &conn,
                    "503 Slow Down",
                    "SlowDown",
                    "Please reduce your request rate.",
                );
                return Ok(());
            }
            if roll < u64::from(slow_down + resets) {
                seen.resets.fetch_add(1, Ordering::SeqCst);
                reset(conn);
                return Ok(());
            }
        }
        _ => {}
    }
    // Pass it on, on a connection of its own.
    let mut up = TcpStream::connect(("127.0.0.1", upstream_port))?;
    let mut out = String::new();
    out += &head[0];
    out += "\r\n";
    for l in head.iter().skip(1) {
        let lower = l.to_ascii_lowercase();
        if !lower.starts_with("connection:") && !lower.starts_with("expect:") {
            out += l;
            out += "\r\n";
        }
    }
    out += "Connection: close\r\n\r\n";
    up.write_all(out.as_bytes())?;
    up.write_all(&body)?;
    up.flush()?;
    let mut client = conn;
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0u64;
    let mut head_len: Option<u64> = None;
    let mut seen_head = Vec::new();
    loop {
        let n = up.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if head_len.is_none() {
            seen_head.extend_from_slice(&buf[..n]);
            if let Some(p) = seen_head.windows(4).position(|w| w == b"\r\n\r\n") {
                head_len = Some(p as u64 + 4);
            }
        }
        client.write_all(&buf[..n])?;
        total += n as u64;
    }
    seen.bytes_down.fetch_add(total, Ordering::SeqCst);
    if method == "GET" {
        seen.body_bytes_down.fetch_add(
            total.saturating_sub(head_len.unwrap_or(total)),
            Ordering::SeqCst,
        );
    }
    let _ = client.shutdown(Shutdown::Both);
    Ok(())
}
