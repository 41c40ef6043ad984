//! A physical replication client: PostgreSQL's walsender protocol spoken directly (as
//! `pg_receivewal` does), over TCP or the server's Unix socket, blocking, on one thread.
//!
//! The session starts with `replication=true` in the startup packet, authenticates
//! (trust, password, MD5 or SCRAM-SHA-256, with `postgres-protocol`'s SCRAM and MD5), then
//! speaks the replication commands as simple queries: `IDENTIFY_SYSTEM`,
//! `TIMELINE_HISTORY`, `READ_REPLICATION_SLOT`, `CREATE_REPLICATION_SLOT ... PHYSICAL
//! RESERVE_WAL`, `DROP_REPLICATION_SLOT ... WAIT` and `START_REPLICATION SLOT ... PHYSICAL`.
//! The last enters copy-both mode: the server sends `XLogData` (`w`: start, end, send
//! time, WAL bytes) and keepalives (`k`: its end of WAL, time, reply requested); the
//! client sends standby status updates (`r`: written, flushed, applied). When the server
//! ends the timeline it is streaming (a promotion), it sends CopyDone and then the next
//! timeline and where it begins.
//!
//! Why not a crate: upstream tokio-postgres has no copy-both mode, and the crates that add
//! one speak logical replication or pull in an async runtime per connection; the physical
//! protocol is these few messages (docs/decisions/0016-wal-streaming.md). No TLS: the
//! streamer is meant for a server on the same host or network, as the archive command is.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::frontend;

use super::walname::Lsn;

/// Why the replication session failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// The server could not be reached or the connection broke.
    #[error("PostgreSQL replication connection to {server}: {source}")]
    Io {
        /// `host:port` or the socket path.
        server: String,
        /// The I/O error.
        source: io::Error,
    },
    /// The server answered with an error.
    #[error("PostgreSQL ({server}) refused {what}: {message}")]
    Server {
        /// Where.
        server: String,
        /// What was asked.
        what: String,
        /// The server's message, with its SQLSTATE.
        message: String,
    },
    /// Something the protocol does not allow.
    #[error("PostgreSQL replication protocol from {server}: {why}")]
    Protocol {
        /// Where.
        server: String,
        /// What was wrong.
        why: String,
    },
    /// The server wants a password and none was given.
    #[error("PostgreSQL ({server}) asks user {user} for a password and none is set (PGPASSWORD, the password file or the policy's password source)")]
    NoPassword {
        /// Where.
        server: String,
        /// Who.
        user: String,
    },
}

/// What `IDENTIFY_SYSTEM` returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SystemId {
    /// The cluster's system identifier.
    pub system_id: u64,
    /// The timeline it is on.
    pub timeline: u32,
    /// Its current WAL flush position.
    pub position: Lsn,
}

/// A replication slot as `READ_REPLICATION_SLOT` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotInfo {
    /// The oldest WAL the slot keeps (none before WAL is reserved).
    pub restart_lsn: Option<Lsn>,
    /// The timeline of `restart_lsn`.
    pub restart_tli: Option<u32>,
}

/// One message of a running stream.
#[derive(Debug)]
pub enum StreamEvent {
    /// WAL bytes starting at `start`.
    XLogData {
        /// Position of the first byte.
        start: Lsn,
        /// The server's end of WAL when it sent this.
        server_end: Lsn,
        /// The bytes (the message's own buffer, not a copy).
        data: BytesMut,
    },
    /// The server's end of WAL; `reply` when it wants a status update now.
    Keepalive {
        /// The server's end of WAL.
        server_end: Lsn,
        /// Whether the server asks for a status update at once.
        reply: bool,
    },
    /// The streamed timeline ended (the server was promoted): the next one and where it
    /// begins.
    EndOfTimeline {
        /// The next timeline.
        next_timeline: u32,
        /// Where it branches off.
        next_start: Lsn,
    },
}

enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Socket {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.set_read_timeout(t),
            Socket::Unix(s) => s.set_read_timeout(t),
        }
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.read(buf),
            Socket::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.write(buf),
            Socket::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.flush(),
            Socket::Unix(s) => s.flush(),
        }
    }
}

/// A backend message: its tag and body.
struct Message {
    tag: u8,
    body: BytesMut,
}

/// The largest backend message accepted: XLogData carries at most a few WAL pages
/// (`MAX_SEND_SIZE`, 128 KiB in PostgreSQL), replies to the commands here are small.
const MAX_MESSAGE: usize = 64 << 20;
/// Seconds since the Unix epoch at PostgreSQL's epoch (2000-01-01 UTC).
const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;

/// A replication session.
pub struct Replication {
    socket: Socket,
    server: String,
    rbuf: BytesMut,
    streaming: bool,
}

/// Connection parameters of a replication session (the password is not kept).
pub struct ConnectTo<'a> {
    /// Host name, IP or socket directory.
    pub host: &'a str,
    /// Port.
    pub port: u16,
    /// User.
    pub user: &'a str,
    /// `application_name` the server shows in `pg_stat_replication`.
    pub application_name: &'a str,
}

impl Replication {
    /// Connects and authenticates.
    ///
    /// # Errors
    /// `Io` when unreachable, `Server` when refused (pg_hba.conf, a wrong password),
    /// `NoPassword` when one is needed and not given.
    pub fn connect(to: &ConnectTo<'_>, password: Option<&[u8]>) -> Result<Self, ReplicationError> {
        let (socket, server) = if to.host.starts_with('/') {
            let path = format!("{}/.s.PGSQL.{}", to.host, to.port);
            let s = UnixStream::connect(&path).map_err(|source| ReplicationError::Io {
                server: path.clone(),
                source,
            })?;
            (Socket::Unix(s), path)
        } else {
            let server = format!("{}:{}", to.host, to.port);
            let io_err = |source| ReplicationError::Io {
                server: server.clone(),
                source,
            };
            let addrs: Vec<_> = (to.host, to.port)
                .to_socket_addrs()
                .map_err(io_err)?
                .collect();
            let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
            let mut found = None;
            for a in addrs {
                match TcpStream::connect_timeout(&a, Duration::from_secs(30)) {
                    Ok(s) => {
                        found = Some(s);
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            let s = found.ok_or_else(|| io_err(last))?;
            let _ = s.set_nodelay(true);
            (Socket::Tcp(s), server)
        };
        let mut r = Replication {
            socket,
            server,
            rbuf: BytesMut::with_capacity(64 << 10),
            streaming: false,
        };
        r.startup(to, password)?;
        Ok(r)
    }

    /// Where the session is connected, for messages.
    pub fn server(&self) -> &str {
        &self.server
    }

    fn io(&self, source: io::Error) -> ReplicationError {
        ReplicationError::Io {
            server: self.server.clone(),
            source,
        }
    }

    fn protocol(&self, why: impl Into<String>) -> ReplicationError {
        ReplicationError::Protocol {
            server: self.server.clone(),
            why: why.into(),
        }
    }

    fn send(&mut self, buf: &[u8]) -> Result<(), ReplicationError> {
        self.socket
            .write_all(buf)
            .and_then(|()| self.socket.flush())
            .map_err(|e| self.io(e))
    }

    fn startup(
        &mut self,
        to: &ConnectTo<'_>,
        password: Option<&[u8]>,
    ) -> Result<(), ReplicationError> {
        let mut buf = BytesMut::new();
        frontend::startup_message(
            [
                ("user", to.user),
                ("replication", "true"),
                ("application_name", to.application_name),
            ],
            &mut buf,
        )
        .map_err(|e| self.io(e))?;
        self.send(&buf)?;
        let need_password = || ReplicationError::NoPassword {
            server: to.host.to_string(),
            user: to.user.to_string(),
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            let m = self.read_message()?;
            match m.tag {
                b'R' => {
                    let mut body = m.body;
                    if body.len() < 4 {
                        return Err(self.protocol("short authentication request"));
                    }
                    let code = body.get_i32();
                    let mut out = BytesMut::new();
                    match code {
                        0 => continue,
                        3 => {
                            let pw = password.ok_or_else(need_password)?;
                            frontend::password_message(pw, &mut out).map_err(|e| self.io(e))?;
                        }
                        5 => {
                            let pw = password.ok_or_else(need_password)?;
                            if body.len() < 4 {
                                return Err(self.protocol("short MD5 salt"));
                            }
                            let salt = [body[0], body[1], body[2], body[3]];
                            let hash = postgres_protocol::authentication::md5_hash(
                                to.user.as_bytes(),
                                pw,
                                salt,
                            );
                            frontend::password_message(hash.as_bytes(), &mut out)
                                .map_err(|e| self.io(e))?;
                        }
                        10 => {
                            let pw = password.ok_or_else(need_password)?;
                            let offers: Vec<&[u8]> = body[..]
                                .split(|b| *b == 0)
                                .filter(|s| !s.is_empty())
                                .collect();
                            if !offers.contains(&SCRAM_SHA_256.as_bytes()) {
                                return Err(self.protocol(
                                    "the server offers no SASL mechanism backupd speaks (SCRAM-SHA-256)",
                                ));
                            }
                            let s = ScramSha256::new(pw, ChannelBinding::unsupported());
                            frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut out)
                                .map_err(|e| self.io(e))?;
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram.as_mut().ok_or_else(|| ReplicationError::Protocol {
                                server: to.host.to_string(),
                                why: "SASL continue before SASL began".into(),
                            })?;
                            s.update(&body).map_err(|e| ReplicationError::Server {
                                server: to.host.to_string(),
                                what: "SCRAM authentication".into(),
                                message: e.to_string(),
                            })?;
                            frontend::sasl_response(s.message(), &mut out)
                                .map_err(|e| self.io(e))?;
                        }
                        12 => {
                            let s = scram.as_mut().ok_or_else(|| ReplicationError::Protocol {
                                server: to.host.to_string(),
                                why: "SASL final before SASL began".into(),
                            })?;
                            s.finish(&body).map_err(|e| ReplicationError::Server {
                                server: to.host.to_string(),
                                what: "SCRAM authentication (the server's proof)".into(),
                                message: e.to_string(),
                            })?;
                            continue;
                        }
                        other => {
                            return Err(self.protocol(format!(
                                "authentication method {other} is not supported"
                            )))
                        }
                    }
                    self.send(&out)?;
                }
                b'E' => return Err(self.server_error("the replication connection", &m.body)),
                b'Z' => return Ok(()),
                // ParameterStatus, BackendKeyData, NoticeResponse.
                _ => {}
            }
        }
    }

    fn server_error(&self, what: &str, body: &[u8]) -> ReplicationError {
        let mut code = String::new();
        let mut message = String::new();
        for field in body.split(|b| *b == 0) {
            match field.first() {
                Some(b'C') => code = String::from_utf8_lossy(&field[1..]).into_owned(),
                Some(b'M') => message = String::from_utf8_lossy(&field[1..]).into_owned(),
                _ => {}
            }
        }
        ReplicationError::Server {
            server: self.server.clone(),
            what: what.to_string(),
            message: if code.is_empty() {
                message
            } else {
                format!("{message} (SQLSTATE {code})")
            },
        }
    }

    /// The next whole message, reading as needed; `None` when the socket's read timeout
    /// passed with no whole message.
    fn try_read_message(&mut self) -> Result<Option<Message>, ReplicationError> {
        loop {
            if self.rbuf.len() >= 5 {
                let len =
                    u32::from_be_bytes([self.rbuf[1], self.rbuf[2], self.rbuf[3], self.rbuf[4]])
                        as usize;
                if !(4..=MAX_MESSAGE).contains(&len) {
                    return Err(self.protocol(format!("a message of {len} bytes")));
                }
                if self.rbuf.len() > len {
                    let tag = self.rbuf[0];
                    self.rbuf.advance(5);
                    let body = self.rbuf.split_to(len - 4);
                    return Ok(Some(Message { tag, body }));
                }
            }
            let mut chunk = [0u8; 64 << 10];
            match self.socket.read(&mut chunk) {
                Ok(0) => {
                    return Err(self.io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the server closed the connection",
                    )))
                }
                Ok(n) => self.rbuf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io(e)),
            }
        }
    }

    fn read_message(&mut self) -> Result<Message, ReplicationError> {
        loop {
            if let Some(m) = self.try_read_message()? {
                return Ok(m);
            }
        }
    }

    /// Runs one replication command; its rows, each column as text (`None` for NULL).
    fn command(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, ReplicationError> {
        let mut buf = BytesMut::new();
        frontend::query(sql, &mut buf).map_err(|e| self.io(e))?;
        self.send(&buf)?;
        let mut rows = vec![];
        let mut failed = None;
        loop {
            let m = self.read_message()?;
            match m.tag {
                b'D' => rows.push(self.data_row(m.body)?),
                b'E' => failed = Some(self.server_error(sql, &m.body)),
                b'Z' => {
                    return match failed {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    }
                }
                _ => {}
            }
        }
    }

    fn data_row(&self, mut body: BytesMut) -> Result<Vec<Option<String>>, ReplicationError> {
        if body.len() < 2 {
            return Err(self.protocol("short data row"));
        }
        let n = body.get_u16() as usize;
        let mut row = Vec::with_capacity(n);
        for _ in 0..n {
            if body.len() < 4 {
                return Err(self.protocol("short data row"));
            }
            let len = body.get_i32();
            if len < 0 {
                row.push(None);
                continue;
            }
            let len = len as usize;
            if body.len() < len {
                return Err(self.protocol("short data row"));
            }
            let v = body.split_to(len);
            row.push(Some(String::from_utf8_lossy(&v).into_owned()));
        }
        Ok(row)
    }

    fn one_row(
        &self,
        what: &str,
        rows: Vec<Vec<Option<String>>>,
    ) -> Result<Vec<Option<String>>, ReplicationError> {
        rows.into_iter()
            .next()
            .ok_or_else(|| self.protocol(format!("{what} returned no row")))
    }

    /// `IDENTIFY_SYSTEM`.
    ///
    /// # Errors
    /// As the session.
    pub fn identify_system(&mut self) -> Result<SystemId, ReplicationError> {
        let rows = self.command("IDENTIFY_SYSTEM")?;
        let row = self.one_row("IDENTIFY_SYSTEM", rows)?;
        let col = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        let system_id = col(0)
            .parse()
            .map_err(|_| self.protocol(format!("system identifier {:?}", col(0))))?;
        let timeline = col(1)
            .parse()
            .map_err(|_| self.protocol(format!("timeline {:?}", col(1))))?;
        let position = col(2)
            .parse::<Lsn>()
            .ok()
            .ok_or_else(|| self.protocol(format!("position {:?}", col(2))))?;
        Ok(SystemId {
            system_id,
            timeline,
            position,
        })
    }

    /// `SHOW name`: a server setting as text.
    ///
    /// # Errors
    /// As the session.
    pub fn show(&mut self, name: &str) -> Result<String, ReplicationError> {
        let rows = self.command(&format!("SHOW {name}"))?;
        let row = self.one_row("SHOW", rows)?;
        Ok(row.into_iter().next().flatten().unwrap_or_default())
    }

    /// `TIMELINE_HISTORY tli`: the history file's name and content.
    ///
    /// # Errors
    /// As the session.
    pub fn timeline_history(
        &mut self,
        timeline: u32,
    ) -> Result<(String, Vec<u8>), ReplicationError> {
        let rows = self.command(&format!("TIMELINE_HISTORY {timeline}"))?;
        let row = self.one_row("TIMELINE_HISTORY", rows)?;
        let name = row.first().cloned().flatten().unwrap_or_default();
        let content = row.get(1).cloned().flatten().unwrap_or_default();
        Ok((name, content.into_bytes()))
    }

    /// `READ_REPLICATION_SLOT name` (PostgreSQL 15 and later): `None` when there is no
    /// such slot.
    ///
    /// # Errors
    /// As the session; `Server` on a logical slot.
    pub fn read_slot(&mut self, name: &str) -> Result<Option<SlotInfo>, ReplicationError> {
        let rows = self.command(&format!("READ_REPLICATION_SLOT {}", ident(name)))?;
        let row = self.one_row("READ_REPLICATION_SLOT", rows)?;
        if row.first().cloned().flatten().is_none() {
            return Ok(None);
        }
        Ok(Some(SlotInfo {
            restart_lsn: row
                .get(1)
                .cloned()
                .flatten()
                .and_then(|s| s.parse::<Lsn>().ok()),
            restart_tli: row.get(2).cloned().flatten().and_then(|s| s.parse().ok()),
        }))
    }

    /// `CREATE_REPLICATION_SLOT name PHYSICAL RESERVE_WAL`: the slot keeps WAL from now.
    ///
    /// # Errors
    /// As the session; `Server` when it exists.
    pub fn create_slot(&mut self, name: &str) -> Result<(), ReplicationError> {
        self.command(&format!(
            "CREATE_REPLICATION_SLOT {} PHYSICAL RESERVE_WAL",
            ident(name)
        ))
        .map(|_| ())
    }

    /// `DROP_REPLICATION_SLOT name WAIT`.
    ///
    /// # Errors
    /// As the session; `Server` when there is no such slot.
    pub fn drop_slot(&mut self, name: &str) -> Result<(), ReplicationError> {
        self.command(&format!("DROP_REPLICATION_SLOT {} WAIT", ident(name)))
            .map(|_| ())
    }

    /// `START_REPLICATION SLOT name PHYSICAL start TIMELINE tli`: copy-both mode from here.
    ///
    /// # Errors
    /// As the session; `Server` when the server no longer has the WAL asked for.
    pub fn start(&mut self, slot: &str, start: Lsn, timeline: u32) -> Result<(), ReplicationError> {
        let sql = format!(
            "START_REPLICATION SLOT {} PHYSICAL {} TIMELINE {timeline}",
            ident(slot),
            start
        );
        let mut buf = BytesMut::new();
        frontend::query(&sql, &mut buf).map_err(|e| self.io(e))?;
        self.send(&buf)?;
        loop {
            let m = self.read_message()?;
            match m.tag {
                b'W' => {
                    self.streaming = true;
                    return Ok(());
                }
                b'E' => {
                    let e = self.server_error(&sql, &m.body);
                    // ReadyForQuery follows the error.
                    while self.read_message()?.tag != b'Z' {}
                    return Err(e);
                }
                _ => {}
            }
        }
    }

    /// The next stream message, or `None` when `wait` passed without one.
    ///
    /// # Errors
    /// As the session; `Server` when the server ends the stream with an error.
    pub fn next_event(&mut self, wait: Duration) -> Result<Option<StreamEvent>, ReplicationError> {
        self.socket
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
            .map_err(|e| self.io(e))?;
        let got = self.try_read_message();
        self.socket.set_read_timeout(None).map_err(|e| self.io(e))?;
        let Some(m) = got? else { return Ok(None) };
        match m.tag {
            b'd' => {
                let mut body = m.body;
                match body.first().copied() {
                    Some(b'w') if body.len() >= 25 => {
                        body.advance(1);
                        let start = Lsn(body.get_u64());
                        let server_end = Lsn(body.get_u64());
                        let _sent = body.get_i64();
                        Ok(Some(StreamEvent::XLogData {
                            start,
                            server_end,
                            data: body,
                        }))
                    }
                    Some(b'k') if body.len() >= 18 => {
                        body.advance(1);
                        let server_end = Lsn(body.get_u64());
                        let _sent = body.get_i64();
                        let reply = body.get_u8() != 0;
                        Ok(Some(StreamEvent::Keepalive { server_end, reply }))
                    }
                    other => Err(self.protocol(format!("copy data of kind {other:?}"))),
                }
            }
            b'c' => {
                // The timeline ended: answer CopyDone, then read the next timeline.
                let mut buf = BytesMut::new();
                frontend::copy_done(&mut buf);
                self.send(&buf)?;
                self.streaming = false;
                let mut next = None;
                loop {
                    let m = self.read_message()?;
                    match m.tag {
                        b'D' => {
                            let row = self.data_row(m.body)?;
                            let tli = row.first().cloned().flatten().and_then(|s| s.parse().ok());
                            let lsn = row
                                .get(1)
                                .cloned()
                                .flatten()
                                .and_then(|s| s.parse::<Lsn>().ok());
                            next = tli.zip(lsn);
                        }
                        b'E' => return Err(self.server_error("the end of the timeline", &m.body)),
                        b'Z' => break,
                        _ => {}
                    }
                }
                let (next_timeline, next_start) =
                    next.ok_or_else(|| self.protocol("the stream ended without a next timeline"))?;
                Ok(Some(StreamEvent::EndOfTimeline {
                    next_timeline,
                    next_start,
                }))
            }
            b'E' => Err(self.server_error("the WAL stream", &m.body)),
            // Notices and the like.
            _ => Ok(None),
        }
    }

    /// A standby status update: WAL written and flushed (durable) up to `flushed`;
    /// `reply` asks the server for a keepalive with its end of WAL at once.
    ///
    /// # Errors
    /// As the session.
    pub fn send_status(
        &mut self,
        written: Lsn,
        flushed: Lsn,
        reply: bool,
    ) -> Result<(), ReplicationError> {
        let now_us = chrono::Utc::now().timestamp_micros() - PG_EPOCH_UNIX_SECS * 1_000_000;
        let mut payload = Vec::with_capacity(34);
        payload.push(b'r');
        payload.extend_from_slice(&written.0.to_be_bytes());
        payload.extend_from_slice(&flushed.0.to_be_bytes());
        // Applied: nothing is applied here; the flush position is what frees the slot.
        payload.extend_from_slice(&flushed.0.to_be_bytes());
        payload.extend_from_slice(&now_us.to_be_bytes());
        payload.push(u8::from(reply));
        let mut buf = BytesMut::new();
        frontend::CopyData::new(&payload[..])
            .map_err(|e| self.io(e))?
            .write(&mut buf);
        self.send(&buf)
    }

    /// Ends the session politely.
    pub fn close(mut self) {
        let mut buf = BytesMut::new();
        if self.streaming {
            frontend::copy_done(&mut buf);
        }
        frontend::terminate(&mut buf);
        let _ = self.send(&buf);
    }
}

/// A slot name as an identifier (PostgreSQL slot names are `[a-z0-9_]`; quoted anyway).
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Whether `name` is a valid replication slot name: 1 to 63 of `a-z`, `0-9`, `_`.
pub fn valid_slot_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names_follow_postgresql() {
        assert!(valid_slot_name("backupd_main"));
        assert!(!valid_slot_name(""));
        assert!(!valid_slot_name("Upper"));
        assert!(!valid_slot_name("a-b"));
        assert!(!valid_slot_name(&"a".repeat(64)));
    }
}
