//! Recorded event streams: the exact bytes the kernel sent, replayable through the userspace
//! stages with no kernel (bug reports, tests, benchmarks), and a synthetic stream generator.
//!
//! File format: a magic line, then records as `u32 little-endian length` + bytes.
use std::io::{self, Read, Write};

use agent_common::{AF_INET, EventHeader, SockEvent, direction, kind, side, syscall, tcp_state};

use crate::{
    decode::{LoopStamp, encode_data, encode_sock},
    reader::RawBatch,
};

pub const MAGIC: &[u8; 16] = b"sockspan-rec-v3\n";
/// Older recordings, read with the fields their data records lack set to 0: v1 (before the loop
/// stamp) and v2 (before the goroutine), with the header bytes of their data records.
const OLDER: [(&[u8; 16], usize); 2] = [
    (b"sockspan-rec-v1\n", agent_common::DataEvent::HEADER_LEN - 24),
    (b"sockspan-rec-v2\n", agent_common::DataEvent::HEADER_LEN - 8),
];

/// Creates (or truncates) a recording file readable by its owner only, refusing to follow a
/// symbolic link: a recording holds raw payloads (bodies, cookies, credentials).
pub fn create_recording(path: &std::path::Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    // An existing file keeps its mode through O_TRUNC: set it.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(f)
}

pub fn write_header(w: &mut impl Write) -> io::Result<()> {
    w.write_all(MAGIC)
}

pub fn write_batch(w: &mut (impl Write + ?Sized), batch: &RawBatch) -> io::Result<()> {
    for record in batch.iter() {
        w.write_all(&(record.len() as u32).to_le_bytes())?;
        w.write_all(record)?;
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("not a sockspan recording (bad magic)")]
    BadMagic,
    #[error("recording is truncated at record {0}")]
    Truncated(usize),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Reads a whole recording into batches of at most `batch_records` records.
pub fn read_recording(mut r: impl Read, batch_records: usize) -> Result<Vec<RawBatch>, ReplayError> {
    let mut magic = [0u8; 16];
    r.read_exact(&mut magic).map_err(|_| ReplayError::BadMagic)?;
    let old_header_len = match OLDER.iter().find(|(m, _)| **m == magic) {
        Some(&(_, len)) => Some(len),
        None if &magic == MAGIC => None,
        None => return Err(ReplayError::BadMagic),
    };
    let mut upgraded = Vec::new();
    let mut data = Vec::new();
    r.read_to_end(&mut data)?;
    let mut batches = vec![RawBatch::default()];
    let mut at = 0usize;
    let mut n = 0usize;
    while at < data.len() {
        let len_bytes: [u8; 4] = data
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .ok_or(ReplayError::Truncated(n))?;
        let len = u32::from_le_bytes(len_bytes) as usize;
        let mut rec = data.get(at + 4..at + 4 + len).ok_or(ReplayError::Truncated(n))?;
        if let Some(old) = old_header_len
            && matches!(rec.first(), Some(&(kind::DATA | kind::CONNECT)))
            && rec.len() >= old
        {
            upgraded.clear();
            upgraded.extend_from_slice(&rec[..old]);
            upgraded.resize(agent_common::DataEvent::HEADER_LEN, 0);
            upgraded.extend_from_slice(&rec[old..]);
            rec = &upgraded;
        }
        if batches.last().is_some_and(|b| b.len() >= batch_records) {
            batches.push(RawBatch::default());
        }
        if let Some(b) = batches.last_mut() {
            b.push(rec);
        }
        at += 4 + len;
        n += 1;
    }
    Ok(batches)
}

/// Builds event streams as the kernel would report them (for tests and benchmarks).
pub struct StreamBuilder {
    pub batch: RawBatch,
    buf: Vec<u8>,
    pub now_ns: u64,
    next_sock: u64,
    /// Loop stamp of each thread's events (threads absent: not a loop thread).
    pub loops: crate::FastMap<u32, LoopStamp>,
    /// The goroutine each thread runs (threads absent: not known, 0).
    pub goroutines: crate::FastMap<u32, u64>,
}

impl Default for StreamBuilder {
    fn default() -> Self {
        Self::new()
    }
}

/// One simulated TCP connection between two local processes.
#[derive(Debug, Clone, Copy)]
pub struct SimConn {
    pub client_pid: u32,
    pub client_fd: i32,
    pub client_sock: u64,
    pub server_pid: u32,
    pub server_fd: i32,
    pub server_sock: u64,
    pub client_port: u16,
    pub server_port: u16,
}

impl StreamBuilder {
    pub fn new() -> Self {
        Self {
            batch: RawBatch::default(),
            buf: Vec::new(),
            now_ns: 1_000_000_000,
            next_sock: 0xffff_0000_0000_1000,
            loops: crate::FastMap::default(),
            goroutines: crate::FastMap::default(),
        }
    }

    fn tick(&mut self, ns: u64) -> u64 {
        self.now_ns += ns;
        self.now_ns
    }

    /// Opens a loopback connection (both ESTABLISHED events); the fds are marked by side.
    pub fn connect(
        &mut self,
        client_pid: u32,
        client_fd: i32,
        server_pid: u32,
        server_fd: i32,
        client_port: u16,
        server_port: u16,
    ) -> SimConn {
        self.connect_from(
            1,
            client_pid,
            client_fd,
            server_pid,
            server_fd,
            client_port,
            server_port,
        )
    }

    /// [`Self::connect`] from client address 127.0.0.`host` (more connections than one
    /// address has ephemeral ports).
    #[allow(clippy::too_many_arguments)]
    pub fn connect_from(
        &mut self,
        host: u8,
        client_pid: u32,
        client_fd: i32,
        server_pid: u32,
        server_fd: i32,
        client_port: u16,
        server_port: u16,
    ) -> SimConn {
        let c = SimConn {
            client_pid,
            client_fd,
            client_sock: self.next_sock,
            server_pid,
            server_fd,
            server_sock: self.next_sock + 0x800,
            client_port,
            server_port,
        };
        self.next_sock += 0x1000;
        let (client, server) = (([127, 0, 0, host], client_port), ([127, 0, 0, 1], server_port));
        self.established_between(c.client_sock, client, server, 0);
        self.established_between(c.server_sock, server, client, 0);
        c
    }

    /// The client thread's connect() of `c`, in the thread's current loop epoch.
    pub fn connect_call(&mut self, c: &SimConn, tid: u32) {
        let t = self.tick(1_000);
        let header = EventHeader {
            kind: kind::CONNECT,
            side: side::CONNECTED,
            pid: c.client_pid,
            tid,
            fd: c.client_fd,
            sock: c.client_sock,
            ts_enter_ns: t,
            ts_exit_ns: t,
            ..Default::default()
        };
        let lp = self.loops.get(&tid).copied().unwrap_or_default();
        let g = self.goroutines.get(&tid).copied().unwrap_or_default();
        self.buf.clear();
        encode_data(&header, 0, lp, g, &[], &mut self.buf);
        self.batch.push(&self.buf);
    }

    /// A Go hook's report from thread `tid` of `pid` (see `agent_common::go_op`).
    pub fn go(&mut self, pid: u32, tid: u32, op: u8, a: u64, b: u64) {
        let t = self.tick(1_000);
        let ev = agent_common::GoEvent {
            header: EventHeader {
                kind: kind::GO,
                pid,
                tid,
                fd: -1,
                ts_enter_ns: t,
                ts_exit_ns: t,
                ..Default::default()
            },
            op,
            a,
            b,
            ..Default::default()
        };
        self.buf.clear();
        crate::decode::encode_go(&ev, &mut self.buf);
        self.batch.push(&self.buf);
    }

    /// The ESTABLISHED event of a loopback socket; the kernel sets `pid` only on the agent's own
    /// sockets.
    pub fn established(&mut self, sock: u64, local_port: u16, remote_port: u16, pid: u32) {
        let lo = [127, 0, 0, 1];
        self.established_between(sock, (lo, local_port), (lo, remote_port), pid);
    }

    /// [`Self::established`] between IPv4 endpoints.
    fn established_between(&mut self, sock: u64, local: ([u8; 4], u16), remote: ([u8; 4], u16), pid: u32) {
        let v4 = |ip: [u8; 4]| {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&ip);
            a
        };
        let t = self.tick(1_000);
        let ev = SockEvent {
            header: EventHeader {
                kind: kind::TCP_STATE,
                fd: -1,
                pid,
                sock,
                ts_enter_ns: t,
                ts_exit_ns: t,
                ..Default::default()
            },
            family: AF_INET,
            local_port: local.1,
            remote_port: remote.1,
            old_state: tcp_state::SYN_SENT,
            new_state: tcp_state::ESTABLISHED,
            local_addr: v4(local.0),
            remote_addr: v4(remote.0),
        };
        self.buf.clear();
        encode_sock(&ev, &mut self.buf);
        self.batch.push(&self.buf);
    }

    /// One syscall's worth of bytes (`captured` ≤ `total`).
    #[allow(clippy::too_many_arguments)]
    pub fn data(
        &mut self,
        pid: u32,
        tid: u32,
        fd: i32,
        sock: u64,
        fd_side: u8,
        egress: bool,
        captured: &[u8],
        total: usize,
        comm: &str,
    ) {
        let enter = self.tick(2_000);
        let exit = self.tick(3_000);
        let mut c = [0u8; 16];
        let n = comm.len().min(15);
        c[..n].copy_from_slice(&comm.as_bytes()[..n]);
        let header = EventHeader {
            kind: kind::DATA,
            direction: if egress { direction::EGRESS } else { direction::INGRESS },
            syscall: if egress { syscall::WRITE } else { syscall::READ },
            side: fd_side,
            pid,
            tid,
            fd,
            sock,
            ts_enter_ns: enter,
            ts_exit_ns: exit,
            bytes: total as i64,
            comm: c,
        };
        self.buf.clear();
        let lp = self.loops.get(&tid).copied().unwrap_or_default();
        let g = self.goroutines.get(&tid).copied().unwrap_or_default();
        encode_data(&header, 0, lp, g, captured, &mut self.buf);
        self.batch.push(&self.buf);
    }

    /// `n` connections from `client_pid` (fds from `first_client_fd`) to `server_pid` (fds from
    /// 10) on `server_port`, each from its own ephemeral port (40,000 per client address).
    pub fn connect_many(
        &mut self,
        n: u32,
        client_pid: u32,
        first_client_fd: i32,
        server_pid: u32,
        server_port: u16,
    ) -> Vec<SimConn> {
        (0..n)
            .map(|i| {
                let (host, ephemeral) = (1 + (i / 40000) as u8, (20000 + i % 40000) as u16);
                self.connect_from(
                    host,
                    client_pid,
                    first_client_fd + i as i32,
                    server_pid,
                    10 + i as i32,
                    ephemeral,
                    server_port,
                )
            })
            .collect()
    }

    /// The client writes a request (thread `client_tid`), the server reads it (`server_tid`).
    pub fn send_request(&mut self, c: &SimConn, client_tid: u32, server_tid: u32, request: &[u8]) {
        let n = request.len();
        self.data(
            c.client_pid,
            client_tid,
            c.client_fd,
            c.client_sock,
            side::CONNECTED,
            true,
            request,
            n,
            "client",
        );
        self.data(
            c.server_pid,
            server_tid,
            c.server_fd,
            c.server_sock,
            side::ACCEPTED,
            false,
            request,
            n,
            "server",
        );
    }

    /// The server writes a response, the client reads it.
    pub fn send_response(&mut self, c: &SimConn, server_tid: u32, client_tid: u32, response: &[u8]) {
        self.send_response_call(c, server_tid, client_tid, response, response.len());
    }

    /// One call's worth of a response, `total` bytes of which `captured` are seen: the
    /// server's write, then the client's read.
    fn send_response_call(&mut self, c: &SimConn, server_tid: u32, client_tid: u32, captured: &[u8], total: usize) {
        self.data(
            c.server_pid,
            server_tid,
            c.server_fd,
            c.server_sock,
            side::ACCEPTED,
            true,
            captured,
            total,
            "server",
        );
        self.data(
            c.client_pid,
            client_tid,
            c.client_fd,
            c.client_sock,
            side::CONNECTED,
            false,
            captured,
            total,
            "client",
        );
    }

    /// A full exchange on `c`, each side on its process's main thread.
    pub fn exchange(&mut self, c: &SimConn, request: &[u8], response: &[u8]) {
        self.send_request(c, c.client_pid, c.server_pid, request);
        self.send_response(c, c.server_pid, c.client_pid, response);
    }

    /// Both ends close their fds.
    pub fn close(&mut self, c: &SimConn) {
        for (pid, fd, sock, s) in [
            (c.client_pid, c.client_fd, c.client_sock, side::CONNECTED),
            (c.server_pid, c.server_fd, c.server_sock, side::ACCEPTED),
        ] {
            let t = self.tick(1_000);
            let ev = SockEvent {
                header: EventHeader {
                    kind: kind::CLOSE,
                    syscall: syscall::CLOSE,
                    side: s,
                    pid,
                    tid: pid,
                    fd,
                    sock,
                    ts_enter_ns: t,
                    ts_exit_ns: t,
                    ..Default::default()
                },
                new_state: tcp_state::CLOSE,
                ..Default::default()
            };
            self.buf.clear();
            encode_sock(&ev, &mut self.buf);
            self.batch.push(&self.buf);
        }
    }
}

/// A synthetic workload: `connections` keep-alive connections, each with `per_conn` exchanges
/// of realistic small requests and responses, interleaved as a busy server would see them.
pub fn synthetic(connections: u32, per_conn: u32) -> RawBatch {
    synthetic_sized(connections, per_conn, 615)
}

/// The kernel's default capture of a call that carries no requests (`--capture-bytes`).
const CAPTURE_BYTES: usize = 1024;
/// Bytes a server writes, and a client reads, per call of a large response.
const CALL_BYTES: usize = 64 * 1024;

/// [`synthetic`] with responses of `body_bytes` bytes of body, written and read in calls of
/// 64 KiB of which the first 1 KiB is captured, as the agent's kernel side captures them.
pub fn synthetic_sized(connections: u32, per_conn: u32, body_bytes: usize) -> RawBatch {
    let mut b = StreamBuilder::new();
    let conns = b.connect_many(connections, 1000, 10, 2000, 8080);
    let mut response = format!(
        "HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 24 Nov 2026 06:00:00 GMT\r\nContent-Type: text/html\r\nContent-Length: {body_bytes}\r\nConnection: keep-alive\r\n\r\n"
    )
    .into_bytes();
    response.extend(std::iter::repeat_n(b'x', body_bytes));
    for r in 0..per_conn {
        for (i, c) in conns.iter().enumerate() {
            let req = format!(
                "GET /api/items/{}/detail?page={r} HTTP/1.1\r\nHost: localhost:8080\r\nUser-Agent: wrk/4.2\r\nAccept: */*\r\n\r\n",
                i as u32 * per_conn + r
            );
            b.send_request(c, c.client_pid, c.server_pid, req.as_bytes());
            for call in response.chunks(CALL_BYTES) {
                let captured = &call[..call.len().min(CAPTURE_BYTES)];
                b.send_response_call(c, c.server_pid, c.client_pid, captured, call.len());
            }
        }
    }
    for c in &conns {
        b.close(c);
    }
    b.batch
}

const SMALL_RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";

/// A two-hop workload for the stitcher: a load generator (`concurrency` threads, keep-alive
/// connections) calls a thread-per-request service, whose handling thread calls a leaf. Each
/// round starts `concurrency` requests before any is answered, so that many are in flight.
pub fn synthetic_chain(requests: u32, concurrency: u32) -> RawBatch {
    let concurrency = concurrency.max(1);
    let mut b = StreamBuilder::new();
    let front = b.connect_many(concurrency, 1000, 10, 2000, 8080);
    // The middle's client fds come after its server fds (10 ..): no fd names two connections.
    let back = b.connect_many(concurrency, 2000, 10 + concurrency as i32, 3000, 9090);
    let mut r = 0;
    while r < requests {
        let n = concurrency.min(requests - r);
        for i in 0..n {
            let req = format!(
                "GET /checkout/r{:08}x HTTP/1.1\r\nHost: mid:8080\r\nUser-Agent: loadgen\r\n\r\n",
                r + i
            );
            b.send_request(&front[i as usize], 1000 + i, 2000 + i, req.as_bytes());
        }
        for i in 0..n {
            let req = format!("GET /price/r{:08}x HTTP/1.1\r\nHost: leaf:9090\r\n\r\n", r + i);
            b.send_request(&back[i as usize], 2000 + i, 3000 + i, req.as_bytes());
        }
        for i in 0..n {
            b.send_response(&back[i as usize], 3000 + i, 2000 + i, SMALL_RESPONSE);
        }
        for i in 0..n {
            b.send_response(&front[i as usize], 2000 + i, 1000 + i, SMALL_RESPONSE);
        }
        r += n;
    }
    for c in front.iter().chain(&back) {
        b.close(c);
    }
    b.batch
}

/// `n` connections each with one request started and not answered (and, separately, the
/// answers): the in-flight state the agent holds for a slow service.
pub fn synthetic_in_flight(n: u32) -> (RawBatch, RawBatch) {
    let mut b = StreamBuilder::new();
    let conns = b.connect_many(n, 1000, 10, 2000, 8080);
    for (i, c) in conns.iter().enumerate() {
        let req = format!("GET /slow/r{i:08}x HTTP/1.1\r\nHost: slow:8080\r\nUser-Agent: loadgen\r\n\r\n");
        b.send_request(c, 1000 + i as u32, 2000 + i as u32, req.as_bytes());
    }
    let started = std::mem::take(&mut b.batch);
    for (i, c) in conns.iter().enumerate() {
        b.send_response(c, 2000 + i as u32, 1000 + i as u32, SMALL_RESPONSE);
    }
    (started, b.batch)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn recordings_are_private_and_never_follow_links() {
        let dir = std::env::temp_dir().join(format!("sockspan-rec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.rec");
        std::fs::write(&path, b"old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let f = super::create_recording(&path).unwrap();
        assert_eq!(f.metadata().unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(f.metadata().unwrap().len(), 0, "truncated");
        let link = dir.join("link.rec");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let err = super::create_recording(&link).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
