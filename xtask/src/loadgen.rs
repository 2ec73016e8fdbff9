//! A fixed-rate HTTP/1.1 load generator for latency figures: requests are sent on a schedule
//! (rate ÷ connections apart on each keep-alive connection) and each latency is measured from
//! the time the request was due, not the time it was sent, so a server that stalls is charged
//! for every request that queued behind the stall (no coordinated omission, as in wrk2 or oha).
use std::{
    io::{Read, Write},
    net::TcpStream,
    os::fd::AsRawFd,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

/// What one fixed-rate run measured.
#[derive(Clone, Debug, Default)]
pub struct Latency {
    /// The rate asked for, req/s.
    pub rate: u32,
    /// Requests answered per second, from the start until the last answer (a server that falls
    /// behind answers the last requests after the schedule ended).
    pub achieved: f64,
    pub requests: u64,
    pub errors: u64,
    /// Requests still unsent a second after the schedule ended (the server fell that far behind).
    pub unsent: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
}

impl Latency {
    /// The server kept up: it answered nearly all it was asked, without errors.
    pub fn sustained(&self) -> bool {
        self.errors == 0 && self.unsent == 0 && self.achieved >= 0.97 * f64::from(self.rate)
    }
}

/// Sends `GET path` to 127.0.0.1:`port` at `rate` req/s for `secs` seconds over `connections`
/// keep-alive connections, all driven by one thread pinned to CPU `cpu` (as wrk2 and oha do:
/// a thread per connection woke twice per request and kept the client core busier than any
/// real client would, in the way of whatever else ran there).
pub fn run(port: u16, path: &str, rate: u32, secs: u64, connections: u32, cpu: usize) -> Result<Latency> {
    if rate == 0 || connections == 0 {
        bail!("rate and connections must be positive");
    }
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: sockspan-loadgen\r\n\r\n");
    let interval = Duration::from_secs_f64(f64::from(connections) / f64::from(rate));
    let start = Instant::now() + Duration::from_millis(50);
    let end = start + Duration::from_secs(secs);
    let worker = thread::spawn(move || {
        pin_to(cpu);
        // Connection k's first request is due k/rate after the start: the load is even.
        let mut conns: Vec<Scheduled> = (0..connections)
            .map(|k| Scheduled::new(start + Duration::from_secs_f64(f64::from(k) / f64::from(rate))))
            .collect();
        drive(port, request.as_bytes(), &mut conns, interval, end)
    });
    let r = worker.join().map_err(|_| anyhow::anyhow!("the load thread panicked"))?;
    let mut all = r.latencies_ns;
    all.sort_unstable();
    let q = |p: f64| -> f64 {
        if all.is_empty() {
            return 0.0;
        }
        let i = ((all.len() as f64 * p).ceil() as usize).clamp(1, all.len()) - 1;
        all[i] as f64 / 1e3
    };
    Ok(Latency {
        rate,
        achieved: all.len() as f64 / (r.finished - start).as_secs_f64(),
        requests: all.len() as u64,
        errors: r.errors,
        unsent: r.unsent,
        p50_us: q(0.50),
        p99_us: q(0.99),
        p999_us: q(0.999),
    })
}

fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and sched_setaffinity (pid 0:
    // this thread) only read and write it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// What the run did, over all connections.
struct RunTotals {
    /// From each request's due time to its whole answer.
    latencies_ns: Vec<u64>,
    errors: u64,
    unsent: u64,
    finished: Instant,
}

/// How long past the schedule a connection that fell behind keeps sending: a server that
/// cannot keep up is shown as such, without the run lasting as long as its backlog.
const OVERRUN: Duration = Duration::from_secs(1);
/// A request unanswered this long fails (and its connection is closed).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// One connection's schedule: its next request is due at `due`, sent once the one before it
/// was answered (no pipelining), and timed from `due` however late it went out.
struct Scheduled {
    due: Instant,
    conn: Option<Conn>,
    /// The request is out (since when) and its answer is being read.
    waiting: Option<Instant>,
}

impl Scheduled {
    fn new(due: Instant) -> Self {
        Self {
            due,
            conn: None,
            waiting: None,
        }
    }

    /// The request due now goes out (on a new connection if there is none).
    fn send(&mut self, port: u16, request: &[u8], now: Instant) -> std::io::Result<()> {
        let conn = match &mut self.conn {
            Some(c) => c,
            None => self.conn.insert(Conn::open(port)?),
        };
        conn.buf.clear();
        // A request of a few dozen bytes on a connection with nothing unread fits the socket's
        // buffer at once; should it not, the rest is written blocking, counted in its latency.
        let sent = match conn.stream.write(request) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        if sent < request.len() {
            conn.stream.set_nonblocking(false)?;
            conn.stream.write_all(&request[sent..])?;
            conn.stream.set_nonblocking(true)?;
        }
        self.waiting = Some(now);
        Ok(())
    }

    /// Reads what arrived; Some(whether the connection stays open) once the answer is whole.
    fn receive(&mut self) -> std::io::Result<Option<bool>> {
        let conn = self.conn.as_mut().ok_or(std::io::ErrorKind::NotConnected)?;
        let mut chunk = [0u8; 16 * 1024];
        // Read until the answer is whole or nothing more waits (not always to `EAGAIN`: that
        // read would be one more syscall per request, traced like the others).
        let closed = loop {
            match conn.stream.read(&mut chunk) {
                Ok(0) => break true,
                Ok(n) => {
                    conn.buf.extend_from_slice(&chunk[..n]);
                    if response_end(&conn.buf).is_some() {
                        break false;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break false,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        };
        // A server may close right after its last answer (`Connection: close`, keep-alive
        // limits): the answer counts, the connection does not stay.
        match response_end(&conn.buf) {
            Some(done) => {
                let keep = !header_has(&conn.buf[..done.headers], b"connection: close");
                Ok(Some(keep && !closed && done.len == conn.buf.len()))
            }
            None if closed => Err(std::io::ErrorKind::UnexpectedEof.into()),
            None => Ok(None),
        }
    }

    /// The request due at `due` ended (answered or failed): the next one is due an interval on.
    fn next(&mut self, interval: Duration, keep: bool) {
        self.waiting = None;
        if !keep {
            self.conn = None;
        }
        self.due += interval;
    }
}

/// Runs every connection's schedule on this thread: sends what is due, waits (to the
/// nanosecond, with `ppoll`) for answers or the next due time, reads what arrived.
fn drive(port: u16, request: &[u8], conns: &mut [Scheduled], interval: Duration, end: Instant) -> RunTotals {
    let mut t = RunTotals {
        latencies_ns: Vec::new(),
        errors: 0,
        unsent: 0,
        finished: Instant::now(),
    };
    let mut fds: Vec<libc::pollfd> = Vec::with_capacity(conns.len());
    let mut polled: Vec<usize> = Vec::with_capacity(conns.len());
    loop {
        let now = Instant::now();
        if now > end + OVERRUN {
            for c in conns.iter().filter(|c| c.due < end) {
                t.unsent += ((end - c.due).as_nanos() / interval.as_nanos().max(1)) as u64 + 1;
            }
            break;
        }
        for c in conns.iter_mut() {
            if c.waiting.is_none() && c.due < end && c.due <= now && c.send(port, request, now).is_err() {
                t.errors += 1;
                c.next(interval, false);
            }
            if c.waiting.is_some_and(|sent| now - sent > ANSWER_TIMEOUT) {
                t.errors += 1;
                c.next(interval, false);
            }
        }
        let next_due = conns
            .iter()
            .filter(|c| c.waiting.is_none() && c.due < end)
            .map(|c| c.due)
            .min();
        if next_due.is_none() && conns.iter().all(|c| c.waiting.is_none()) {
            break;
        }
        fds.clear();
        polled.clear();
        for (i, c) in conns.iter().enumerate() {
            if let (Some(_), Some(conn)) = (c.waiting, &c.conn) {
                fds.push(libc::pollfd {
                    fd: conn.stream.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                polled.push(i);
            }
        }
        let wait = next_due.map_or(Duration::from_millis(100), |d| d.saturating_duration_since(now));
        let timeout = libc::timespec {
            tv_sec: wait.as_secs() as libc::time_t,
            tv_nsec: wait.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `fds` is a valid array of `fds.len()` pollfds that outlives the call.
        let ready = unsafe { libc::ppoll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, &timeout, std::ptr::null()) };
        if ready <= 0 {
            continue;
        }
        for (fd, &i) in fds.iter().zip(&polled) {
            if fd.revents == 0 {
                continue;
            }
            let c = &mut conns[i];
            match c.receive() {
                Ok(None) => {}
                Ok(Some(keep)) => {
                    t.latencies_ns.push(c.due.elapsed().as_nanos() as u64);
                    c.next(interval, keep);
                }
                Err(_) => {
                    t.errors += 1;
                    c.next(interval, false);
                }
            }
        }
    }
    t.finished = Instant::now();
    t
}

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn open(port: u16) -> std::io::Result<Self> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_nodelay(true)?;
        stream.set_nonblocking(true)?;
        Ok(Self {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }
}

struct End {
    /// Length of the head, through its blank line.
    headers: usize,
    /// Length of the whole response.
    len: usize,
}

/// Where the response in `buf` ends, once it is complete (Content-Length or chunked bodies).
fn response_end(buf: &[u8]) -> Option<End> {
    let headers = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = &buf[..headers];
    if let Some(n) = content_length(head) {
        let len = headers + n;
        return (buf.len() >= len).then_some(End { headers, len });
    }
    if header_has(head, b"transfer-encoding: chunked") {
        let body = &buf[headers..];
        let end = body.windows(5).position(|w| w == b"0\r\n\r\n")?;
        // The last chunk starts a line of its own.
        if end == 0 || body[end - 2..end] == *b"\r\n" {
            return Some(End {
                headers,
                len: headers + end + 5,
            });
        }
        return None;
    }
    Some(End { headers, len: headers })
}

fn content_length(head: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(head).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())?
    })
}

fn header_has(head: &[u8], lower: &[u8]) -> bool {
    head.to_ascii_lowercase().windows(lower.len()).any(|w| w == lower)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_end_of_a_response() {
        let fixed = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel";
        assert!(response_end(fixed).is_none());
        let fixed = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(response_end(fixed).map(|e| e.len), Some(fixed.len()));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        assert_eq!(response_end(chunked).map(|e| e.len), Some(chunked.len()));
        assert!(response_end(&chunked[..chunked.len() - 2]).is_none());
    }

    /// Against a real listener: the schedule is kept and every answer is counted.
    #[test]
    fn keeps_the_rate_against_a_real_server() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        thread::spawn(move || {
            for s in listener.incoming().flatten() {
                thread::spawn(move || {
                    let mut s = s;
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let l = run(port, "/", 400, 1, 4, 0).unwrap();
        assert_eq!(l.errors, 0);
        assert!(l.requests >= 380 && l.requests <= 400, "{l:?}");
        assert!(l.p50_us > 0.0 && l.p50_us <= l.p99_us && l.p99_us <= l.p999_us, "{l:?}");
    }

    /// A server that closes after every answer (as nginx does at its keep-alive limit): each
    /// answer counts, and the next request goes out on a new connection.
    #[test]
    fn counts_answers_followed_by_a_close() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        thread::spawn(move || {
            for mut s in listener.incoming().flatten() {
                let mut buf = [0u8; 4096];
                if s.read(&mut buf).is_ok_and(|n| n > 0) {
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok");
                }
            }
        });
        let l = run(port, "/", 200, 1, 2, 0).unwrap();
        assert_eq!(l.errors, 0, "{l:?}");
        assert!(l.requests >= 190 && l.requests <= 200, "{l:?}");
    }
}
