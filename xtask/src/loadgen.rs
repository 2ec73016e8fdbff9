//! A fixed-rate HTTP/1.1 load generator for latency figures: requests are sent on a schedule
//! (rate ÷ connections apart on each keep-alive connection) and each latency is measured from
//! the time the request was due, not the time it was sent, so a server that stalls is charged
//! for every request that queued behind the stall (no coordinated omission, as in wrk2 or oha).
use std::{
    io::{Read, Write},
    net::TcpStream,
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
/// keep-alive connections, each on a thread pinned to CPU `cpu`.
pub fn run(port: u16, path: &str, rate: u32, secs: u64, connections: u32, cpu: usize) -> Result<Latency> {
    if rate == 0 || connections == 0 {
        bail!("rate and connections must be positive");
    }
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: sockspan-loadgen\r\n\r\n");
    let interval = Duration::from_secs_f64(f64::from(connections) / f64::from(rate));
    let start = Instant::now() + Duration::from_millis(50);
    let end = start + Duration::from_secs(secs);
    let workers: Vec<_> = (0..connections)
        .map(|k| {
            let request = request.clone();
            // Connection k's first request is due k/rate after the start: the load is even.
            let first = start + Duration::from_secs_f64(f64::from(k) / f64::from(rate));
            thread::spawn(move || {
                pin_to(cpu);
                connection(port, request.as_bytes(), first, interval, end)
            })
        })
        .collect();
    let (mut all, mut errors, mut unsent, mut last) = (Vec::new(), 0u64, 0u64, end);
    for w in workers {
        let r = w.join().map_err(|_| anyhow::anyhow!("a load thread panicked"))?;
        all.extend(r.latencies_ns);
        errors += r.errors;
        unsent += r.unsent;
        last = last.max(r.finished);
    }
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
        achieved: all.len() as f64 / (last - start).as_secs_f64(),
        requests: all.len() as u64,
        errors,
        unsent,
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

/// What one connection did.
struct ConnRun {
    /// From each request's due time to its whole answer.
    latencies_ns: Vec<u64>,
    errors: u64,
    unsent: u64,
    finished: Instant,
}

/// How long past the schedule a connection that fell behind keeps sending: a server that
/// cannot keep up is shown as such, without the run lasting as long as its backlog.
const OVERRUN: Duration = Duration::from_secs(1);

/// One connection's schedule.
fn connection(port: u16, request: &[u8], first: Instant, interval: Duration, end: Instant) -> ConnRun {
    let (mut latencies_ns, mut errors, mut unsent) = (Vec::new(), 0u64, 0u64);
    let mut conn: Option<Conn> = None;
    let mut due = first;
    while due < end {
        let now = Instant::now();
        if now > end + OVERRUN {
            unsent += ((end - due).as_nanos() / interval.as_nanos().max(1)) as u64 + 1;
            break;
        }
        if due > now {
            thread::sleep(due - now);
        }
        let c = match conn.take() {
            Some(c) => c,
            None => match Conn::open(port) {
                Ok(c) => c,
                Err(_) => {
                    errors += 1;
                    due += interval;
                    continue;
                }
            },
        };
        let mut c = c;
        match c.exchange(request) {
            Ok(keep) => {
                latencies_ns.push(due.elapsed().as_nanos() as u64);
                if keep {
                    conn = Some(c);
                }
            }
            Err(_) => errors += 1,
        }
        due += interval;
    }
    ConnRun {
        latencies_ns,
        errors,
        unsent,
        finished: Instant::now(),
    }
}

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn open(port: u16) -> std::io::Result<Self> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Self {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Sends one request and reads its whole response; Ok(whether the connection stays open).
    fn exchange(&mut self, request: &[u8]) -> std::io::Result<bool> {
        self.stream.write_all(request)?;
        self.buf.clear();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if let Some(done) = response_end(&self.buf) {
                let keep = !header_has(&self.buf[..done.headers], b"connection: close");
                return Ok(keep && done.len == self.buf.len());
            }
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
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
}
