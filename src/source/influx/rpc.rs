//! The InfluxDB 1.x backup protocol on the server's RPC port (8088 by default), as
//! `influxd backup -portable` and `influxd restore -portable` speak it (1.6:
//! `services/snapshotter`). The port is a TCP mux: each connection sends the mux byte
//! (3, the snapshotter), a request-type byte, then, but for a shard upload, one JSON
//! request and a newline. One request per connection; the reply runs until the server
//! closes it. The server answers an error by closing the connection with nothing sent, so
//! an empty reply is an error here, named by what was asked.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::time::Duration;

use serde::Serialize;

/// The snapshotter's mux byte.
const MUX_SNAPSHOTTER: u8 = 3;
/// The first 8 bytes of a metastore backup and of a metastore update's reply.
pub const BACKUP_MAGIC: u64 = 0x5959_0101;
/// The zero `time.Time` of Go, as its JSON encoder writes it.
const GO_ZERO_TIME: &str = "0001-01-01T00:00:00Z";
/// How long a connection may stay silent (a shard's cache is flushed before it streams).
const IDLE: Duration = Duration::from_secs(600);
/// How long connecting may take.
const CONNECT: Duration = Duration::from_secs(10);
/// A metastore is small; one this large is not one.
const MAX_META: u64 = 256 << 20;

/// Request types of the snapshotter.
#[derive(Clone, Copy, Debug)]
#[repr(u8)]
enum RequestType {
    ShardBackup = 0,
    MetastoreBackup = 1,
    DatabaseInfo = 3,
    MetaStoreUpdate = 6,
    ShardUpdate = 7,
}

/// The JSON request (Go field names; the server ignores what a type does not use).
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Request<'a> {
    #[serde(rename = "Type")]
    kind: u8,
    backup_database: &'a str,
    restore_database: &'a str,
    backup_retention_policy: &'a str,
    restore_retention_policy: &'a str,
    #[serde(rename = "ShardID")]
    shard_id: u64,
    since: String,
    export_start: &'a str,
    export_end: &'a str,
    upload_size: i64,
}

impl<'a> Request<'a> {
    fn new(kind: RequestType) -> Self {
        Request {
            kind: kind as u8,
            backup_database: "",
            restore_database: "",
            backup_retention_policy: "",
            restore_retention_policy: "",
            shard_id: 0,
            since: GO_ZERO_TIME.into(),
            export_start: GO_ZERO_TIME,
            export_end: GO_ZERO_TIME,
            upload_size: 0,
        }
    }
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// Could not connect.
    #[error("cannot reach the InfluxDB RPC port at {addr}: {source} (is influxd running, with bind-address set to it?)")]
    Connect {
        /// host:port.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// The connection failed mid-request.
    #[error("InfluxDB at {addr}: {what}: {source}")]
    Io {
        /// host:port.
        addr: String,
        /// What was being done.
        what: String,
        /// Why.
        source: io::Error,
    },
    /// The server closed without an answer (its way of saying no).
    #[error("InfluxDB at {addr} refused {what} (closed the connection without an answer; its log says why)")]
    Refused {
        /// host:port.
        addr: String,
        /// What was asked.
        what: String,
    },
    /// An answer that is not what the protocol says.
    #[error("InfluxDB at {addr}: {what}: unexpected answer: {why}")]
    Protocol {
        /// host:port.
        addr: String,
        /// What was asked.
        what: String,
        /// What was wrong.
        why: String,
    },
}

/// A server's RPC address.
#[derive(Clone, Debug)]
pub struct Rpc {
    addr: String,
}

/// The metastore as `MetastoreBackup` returns it.
pub struct Metastore {
    /// The `meta.Data` protobuf.
    pub data: Vec<u8>,
    /// The node's JSON (its id and address).
    pub node: Vec<u8>,
}

impl Rpc {
    /// The server at `addr` (`host:port`).
    pub fn new(addr: &str) -> Self {
        Rpc { addr: addr.into() }
    }

    /// `host:port`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn io(&self, what: &str) -> impl Fn(io::Error) -> RpcError + '_ {
        let what = what.to_string();
        move |source| RpcError::Io {
            addr: self.addr.clone(),
            what: what.clone(),
            source,
        }
    }

    fn protocol(&self, what: &str, why: impl Into<String>) -> RpcError {
        RpcError::Protocol {
            addr: self.addr.clone(),
            what: what.into(),
            why: why.into(),
        }
    }

    fn refused(&self, what: &str) -> RpcError {
        RpcError::Refused {
            addr: self.addr.clone(),
            what: what.into(),
        }
    }

    /// Connects and sends the mux and type bytes, then `rest`, in one write.
    fn open(&self, kind: RequestType, rest: &[u8]) -> Result<TcpStream, RpcError> {
        let connect = |source| RpcError::Connect {
            addr: self.addr.clone(),
            source,
        };
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the name resolves to no address");
        let mut conn = None;
        for sa in self.addr.to_socket_addrs().map_err(connect)? {
            match TcpStream::connect_timeout(&sa, CONNECT) {
                Ok(c) => {
                    conn = Some(c);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let mut conn = conn.ok_or_else(|| connect(last))?;
        let _ = conn.set_nodelay(true);
        conn.set_read_timeout(Some(IDLE))
            .and_then(|()| conn.set_write_timeout(Some(IDLE)))
            .map_err(self.io("setting timeouts"))?;
        let mut msg = Vec::with_capacity(2 + rest.len());
        msg.push(MUX_SNAPSHOTTER);
        msg.push(kind as u8);
        msg.extend_from_slice(rest);
        conn.write_all(&msg)
            .map_err(self.io("sending the request"))?;
        Ok(conn)
    }

    fn request(&self, req: &Request<'_>, upload: &[u8]) -> Result<TcpStream, RpcError> {
        let mut body = serde_json::to_vec(req).expect("a request serializes");
        body.push(b'\n');
        body.extend_from_slice(upload);
        let kind = match req.kind {
            0 => RequestType::ShardBackup,
            1 => RequestType::MetastoreBackup,
            3 => RequestType::DatabaseInfo,
            _ => RequestType::MetaStoreUpdate,
        };
        self.open(kind, &body)
    }

    /// The whole metastore: databases, retention policies, shard groups, continuous
    /// queries and users.
    ///
    /// # Errors
    /// Connection failures, or an answer that is not a metastore backup.
    pub fn metastore(&self) -> Result<Metastore, RpcError> {
        let what = "the metastore backup";
        let mut conn = self.request(&Request::new(RequestType::MetastoreBackup), &[])?;
        read_metastore_reply(&mut conn).map_err(|e| self.map_reply(what, e))
    }

    /// The shards of `database` (all databases when empty) held on this server, as
    /// `db/rp/id` paths.
    ///
    /// # Errors
    /// Connection failures; an unknown database is refused by the server.
    pub fn shard_paths(&self, database: &str) -> Result<Vec<String>, RpcError> {
        let what = if database.is_empty() {
            "the shard list".to_string()
        } else {
            format!("the shard list of database {database:?}")
        };
        let req = Request {
            backup_database: database,
            ..Request::new(RequestType::DatabaseInfo)
        };
        let conn = self.request(&req, &[])?;
        let mut reply = vec![];
        conn.take(MAX_META)
            .read_to_end(&mut reply)
            .map_err(self.io(&what))?;
        if reply.is_empty() {
            return Err(self.refused(&what));
        }
        parse_shard_list(&reply).map_err(|why| self.protocol(&what, why))
    }

    /// A shard's files as an uncompressed tar stream (`db/rp/id/<file>` names), only
    /// files modified after `since` (RFC 3339) when given. The server flushes the shard's
    /// cache to a file first, and streams hard links of its files taken at that moment.
    ///
    /// # Errors
    /// Connection failures.
    pub fn shard_backup(&self, shard: u64, since: Option<&str>) -> Result<ShardStream, RpcError> {
        let req = Request {
            shard_id: shard,
            since: since.unwrap_or(GO_ZERO_TIME).into(),
            ..Request::new(RequestType::ShardBackup)
        };
        let conn = self.request(&req, &[])?;
        Ok(ShardStream {
            conn,
            read: 0,
            addr: self.addr.clone(),
            shard,
        })
    }

    /// Creates database `restore` (with its retention policies and empty shards) from
    /// database `backup` of `meta` (a `meta.Data` protobuf) holding `shards` shards, and
    /// returns the pairs (shard id in `meta`, new shard id). The server refuses a database
    /// that exists by answering no pairs (as it answers for one without shards).
    ///
    /// # Errors
    /// Connection failures, or the server's refusal (no pairs).
    pub fn metastore_update(
        &self,
        meta: &[u8],
        backup: &str,
        restore: &str,
        shards: usize,
    ) -> Result<Vec<(u64, u64)>, RpcError> {
        let what = format!("creating database {restore:?}");
        let req = Request {
            backup_database: backup,
            restore_database: restore,
            upload_size: meta.len() as i64,
            ..Request::new(RequestType::MetaStoreUpdate)
        };
        // The server reads the upload with one buffered read and one more `Read`: it
        // must arrive in one piece, so it goes in the request's write.
        let mut conn = self.request(&req, meta)?;
        match read_update_reply(&mut conn) {
            Ok(pairs) if pairs.is_empty() && shards > 0 => {
                // 1.6 and 1.7 read the upload with one buffered read and one more `Read`: a
                // large one arrives cut, and is refused.
                Err(if meta.len() > 64 << 10 {
                    RpcError::Refused {
                        addr: self.addr.clone(),
                        what: format!("{what} (a metastore upload of {} bytes; InfluxDB before 1.8 may read only part of one that large)", meta.len()),
                    }
                } else {
                    self.refused(&what)
                })
            }
            Ok(pairs) => Ok(pairs),
            Err(e) => Err(self.map_reply(&what, e)),
        }
    }

    /// Opens the upload of shard `shard`'s files: a tar stream whose `*.tsm` entries
    /// named `db/rp/<shard>/<file>` the server installs (it skips everything else).
    ///
    /// # Errors
    /// Connection failures.
    pub fn shard_update(&self, shard: u64) -> Result<ShardUpload, RpcError> {
        let conn = self.open(RequestType::ShardUpdate, &shard.to_be_bytes())?;
        Ok(ShardUpload {
            conn,
            addr: self.addr.clone(),
            shard,
        })
    }

    fn map_reply(&self, what: &str, e: ReplyError) -> RpcError {
        match e {
            ReplyError::Closed => self.refused(what),
            ReplyError::Io(source) => self.io(what)(source),
            ReplyError::Protocol(why) => self.protocol(what, why),
        }
    }
}

/// Why a reply could not be read.
#[derive(Debug)]
pub enum ReplyError {
    /// The server closed before the first byte: its way of refusing.
    Closed,
    /// The connection failed or ended early.
    Io(io::Error),
    /// Not what the protocol says.
    Protocol(String),
}

impl From<ReadFailure> for ReplyError {
    fn from(e: ReadFailure) -> Self {
        match e {
            ReadFailure::Closed => ReplyError::Closed,
            ReadFailure::Io(e) => ReplyError::Io(e),
        }
    }
}

/// Reads exactly `n` bytes, `n` announced by the server: the buffer grows with the bytes
/// that arrive, so a length claimed but never sent costs nothing.
fn read_announced(r: &mut impl Read, n: u64) -> Result<Vec<u8>, ReplyError> {
    let mut out = Vec::with_capacity(n.min(64 << 10) as usize);
    r.take(n).read_to_end(&mut out).map_err(ReplyError::Io)?;
    if (out.len() as u64) < n {
        return Err(ReplyError::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(out)
}

/// Reads a `MetastoreBackup` reply: `magic u64 | n u64 | n bytes meta.Data | m u64 | m bytes
/// node JSON` (big-endian).
///
/// # Errors
/// A refusal (nothing sent), a cut reply, a wrong magic, or a length above 256 MiB.
pub fn read_metastore_reply(r: &mut impl Read) -> Result<Metastore, ReplyError> {
    let mut head = [0u8; 16];
    read_exact_or_refused(r, &mut head)?;
    let magic = u64::from_be_bytes(head[..8].try_into().expect("8 bytes"));
    if magic != BACKUP_MAGIC {
        return Err(ReplyError::Protocol(format!("magic {magic:#x}")));
    }
    let n = u64::from_be_bytes(head[8..].try_into().expect("8 bytes"));
    if n > MAX_META {
        return Err(ReplyError::Protocol(format!("a metastore of {n} bytes")));
    }
    let data = read_announced(r, n)?;
    let mut len = [0u8; 8];
    r.read_exact(&mut len).map_err(ReplyError::Io)?;
    let m = u64::from_be_bytes(len);
    if m > MAX_META {
        return Err(ReplyError::Protocol(format!(
            "a node description of {m} bytes"
        )));
    }
    let node = read_announced(r, m)?;
    Ok(Metastore { data, node })
}

/// Parses a `DatabaseInfo` reply: `{"Paths": ["db/rp/id", ...]}`.
///
/// # Errors
/// A reply that is not that JSON.
pub fn parse_shard_list(reply: &[u8]) -> Result<Vec<String>, String> {
    #[derive(serde::Deserialize)]
    struct Response {
        #[serde(rename = "Paths", default)]
        paths: Option<Vec<String>>,
    }
    let r: Response = serde_json::from_slice(reply).map_err(|e| e.to_string())?;
    Ok(r.paths.unwrap_or_default())
}

/// Reads a `MetaStoreUpdate` reply: `magic u64 | n u64 | n x (old shard id u64 | new shard
/// id u64)` (big-endian). No pairs: the server refused (or the database has no shards).
///
/// # Errors
/// A refusal (nothing sent), a cut reply, a wrong magic, or more than 2^24 pairs.
pub fn read_update_reply(r: &mut impl Read) -> Result<Vec<(u64, u64)>, ReplyError> {
    let mut head = [0u8; 16];
    read_exact_or_refused(r, &mut head)?;
    let magic = u64::from_be_bytes(head[..8].try_into().expect("8 bytes"));
    if magic != BACKUP_MAGIC {
        return Err(ReplyError::Protocol(format!("magic {magic:#x}")));
    }
    let n = u64::from_be_bytes(head[8..].try_into().expect("8 bytes"));
    if n > 1 << 24 {
        return Err(ReplyError::Protocol(format!("{n} shard pairs")));
    }
    // Grows with the pairs that arrive, not with the count the server claims.
    let mut pairs = Vec::with_capacity(n.min(4096) as usize);
    let mut b = [0u8; 16];
    for _ in 0..n {
        r.read_exact(&mut b).map_err(ReplyError::Io)?;
        pairs.push((
            u64::from_be_bytes(b[..8].try_into().expect("8 bytes")),
            u64::from_be_bytes(b[8..].try_into().expect("8 bytes")),
        ));
    }
    Ok(pairs)
}

enum ReadFailure {
    Closed,
    Io(io::Error),
}

/// Reads `buf` whole; an end of stream before its first byte is a refusal.
fn read_exact_or_refused(r: &mut impl Read, buf: &mut [u8]) -> Result<(), ReadFailure> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Err(ReadFailure::Closed),
            Ok(0) => return Err(ReadFailure::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadFailure::Io(e)),
        }
    }
    Ok(())
}

/// A shard's tar stream, read as it arrives.
pub struct ShardStream {
    conn: TcpStream,
    read: u64,
    addr: String,
    shard: u64,
}

impl ShardStream {
    /// Bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.read
    }

    /// What a failure of this stream is called.
    pub fn describe(&self) -> String {
        format!("shard {} from InfluxDB at {}", self.shard, self.addr)
    }
}

impl Read for ShardStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.conn.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

/// A shard upload: a tar stream written to the server.
pub struct ShardUpload {
    conn: TcpStream,
    addr: String,
    shard: u64,
}

impl ShardUpload {
    /// Ends the upload and waits for the server to close (it installs the files first).
    ///
    /// # Errors
    /// The server resetting the connection (it failed to install the shard).
    pub fn finish(mut self) -> Result<(), RpcError> {
        let what = format!("uploading shard {}", self.shard);
        let io = |source| RpcError::Io {
            addr: self.addr.clone(),
            what: what.clone(),
            source,
        };
        self.conn.flush().map_err(io)?;
        self.conn.shutdown(Shutdown::Write).map_err(io)?;
        // Installing and reopening a large shard may take longer than any idle limit.
        self.conn.set_read_timeout(None).map_err(io)?;
        // Nothing comes back; the close is the answer.
        let mut sink = [0u8; 64];
        loop {
            match self.conn.read(&mut sink) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io(e)),
            }
        }
    }
}

impl Write for ShardUpload {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.conn.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.conn.flush()
    }
}

/// Parses a shard path `db/rp/id`.
pub fn parse_shard_path(p: &str) -> Option<(String, String, u64)> {
    let mut it = p.rsplitn(3, '/');
    let id = it.next()?.parse().ok()?;
    let rp = it.next()?;
    let db = it.next()?;
    (!db.is_empty() && !rp.is_empty()).then(|| (db.to_string(), rp.to_string(), id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_length_the_server_claims_but_does_not_send_allocates_nothing() {
        // A metastore reply announcing 256 MiB, then nothing: an error, and the buffer
        // grows only with what arrives (it was `vec![0; n]` before the reply was read).
        let mut reply = BACKUP_MAGIC.to_be_bytes().to_vec();
        reply.extend_from_slice(&MAX_META.to_be_bytes());
        reply.extend_from_slice(b"abc");
        assert!(matches!(
            read_metastore_reply(&mut &reply[..]),
            Err(ReplyError::Io(_))
        ));
        let mut r = &reply[16..];
        assert!(read_announced(&mut r, MAX_META).is_err());
        // Claims 2^24 shard pairs, sends one.
        let mut upd = BACKUP_MAGIC.to_be_bytes().to_vec();
        upd.extend_from_slice(&(1u64 << 24).to_be_bytes());
        upd.extend_from_slice(&[0u8; 16]);
        assert!(matches!(
            read_update_reply(&mut &upd[..]),
            Err(ReplyError::Io(_))
        ));
        assert!(matches!(
            read_update_reply(&mut &[][..]),
            Err(ReplyError::Closed)
        ));
        // A whole reply reads.
        let mut ok = BACKUP_MAGIC.to_be_bytes().to_vec();
        ok.extend_from_slice(&2u64.to_be_bytes());
        ok.extend_from_slice(b"md");
        ok.extend_from_slice(&1u64.to_be_bytes());
        ok.extend_from_slice(b"n");
        let m = read_metastore_reply(&mut &ok[..]).unwrap();
        assert_eq!((&m.data[..], &m.node[..]), (&b"md"[..], &b"n"[..]));
        assert_eq!(
            parse_shard_list(br#"{"Paths":["db/rp/1"]}"#).unwrap(),
            vec!["db/rp/1".to_string()]
        );
    }

    #[test]
    fn requests_are_what_the_go_server_decodes() {
        let r = Request {
            shard_id: 7,
            backup_database: "db1",
            ..Request::new(RequestType::ShardBackup)
        };
        let j = serde_json::to_string(&r).unwrap();
        assert_eq!(
            j,
            r#"{"Type":0,"BackupDatabase":"db1","RestoreDatabase":"","BackupRetentionPolicy":"","RestoreRetentionPolicy":"","ShardID":7,"Since":"0001-01-01T00:00:00Z","ExportStart":"0001-01-01T00:00:00Z","ExportEnd":"0001-01-01T00:00:00Z","UploadSize":0}"#
        );
    }

    #[test]
    fn shard_paths_split_from_the_right() {
        assert_eq!(
            parse_shard_path("db/autogen/12"),
            Some(("db".into(), "autogen".into(), 12))
        );
        assert_eq!(parse_shard_path("autogen/12"), None);
        assert_eq!(parse_shard_path("db/rp/x"), None);
    }
}
