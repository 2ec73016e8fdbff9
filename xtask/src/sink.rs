//! The OTLP/HTTP receiver the benchmarks export to (`cargo xtask otlp-sink DIR`, started by
//! the bench as a child process). It answers every `POST /v1/traces` with 200 and appends the
//! body, still encoded, to `DIR/bodies.bin`; `GET /stats` gives `{"requests": N, "bytes": N}`.
//! Nothing is decoded while a benchmark runs (`scripts/otlp-sink.py count DIR` does it after),
//! so that receiving costs the machine little: the Python receiver this replaces took about
//! 1.2 ms of CPU per request of 512 spans, on the cores the service and the agent share.
//!
//! `bodies.bin` holds one record per request: its length (u32, little-endian, of what follows
//! the encoding byte), its `Content-Encoding` (one byte: 0 none, 1 gzip, 2 deflate, 3 other)
//! and the body as received.
use std::{
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::Path,
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result};

/// The longest request head read (the exporters send a few hundred bytes).
const MAX_HEAD: usize = 64 << 10;

struct Received {
    file: File,
    requests: u64,
    bytes: u64,
}

/// Serves until killed; prints `otlp-sink listening on 127.0.0.1:PORT` once it accepts.
pub fn serve(dir: &Path, port: u16) -> Result<()> {
    let path = dir.join("bodies.bin");
    let file = File::create(&path).with_context(|| format!("create {}", path.display()))?;
    let received = Arc::new(Mutex::new(Received {
        file,
        requests: 0,
        bytes: 0,
    }));
    let listener = TcpListener::bind(("127.0.0.1", port)).with_context(|| format!("bind 127.0.0.1:{port}"))?;
    println!("otlp-sink listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let received = received.clone();
        std::thread::spawn(move || {
            // A client that sends something else, or goes away, only loses its connection.
            let _ = serve_connection(conn, &received);
        });
    }
    Ok(())
}

/// One keep-alive connection: requests in turn until the client closes it.
fn serve_connection(conn: TcpStream, received: &Mutex<Received>) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    let mut out = conn.try_clone()?;
    let mut input = BufReader::with_capacity(256 << 10, conn);
    while let Some(head) = read_head(&mut input)? {
        if head.expects_continue {
            out.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let body = if head.chunked {
            read_chunked(&mut input)?
        } else {
            let mut body = vec![0; head.content_length];
            input.read_exact(&mut body)?;
            body
        };
        let (status, content_type, reply) = match (head.method.as_str(), head.path.as_str()) {
            ("POST", "/v1/traces") => {
                store(received, head.encoding, &body)?;
                // An empty ExportTraceServiceResponse: full success.
                ("200 OK", "application/x-protobuf", String::new())
            }
            ("GET", "/stats") => {
                let r = received.lock().expect("no thread panics holding it");
                let stats = format!("{{\"requests\": {}, \"bytes\": {}}}", r.requests, r.bytes);
                ("200 OK", "application/json", stats)
            }
            _ => ("404 Not Found", "text/plain", String::new()),
        };
        // One write: a reply in pieces waits for the client's delayed ACK (Nagle), 40 ms.
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{reply}",
            reply.len()
        );
        out.write_all(response.as_bytes())?;
        if head.close {
            break;
        }
    }
    Ok(())
}

/// Appends one record; written whole in one call, so that a sink stopped by a signal leaves
/// whole records behind.
fn store(received: &Mutex<Received>, encoding: u8, body: &[u8]) -> std::io::Result<()> {
    let mut record = Vec::with_capacity(body.len() + 5);
    record.extend_from_slice(&(body.len() as u32).to_le_bytes());
    record.push(encoding);
    record.extend_from_slice(body);
    let mut r = received.lock().expect("no thread panics holding it");
    r.file.write_all(&record)?;
    r.requests += 1;
    r.bytes += body.len() as u64;
    Ok(())
}

struct Head {
    method: String,
    path: String,
    content_length: usize,
    chunked: bool,
    /// 0 none, 1 gzip, 2 deflate, 3 another.
    encoding: u8,
    expects_continue: bool,
    close: bool,
}

/// The next request's line and headers; `None` when the client closed the connection.
fn read_head(input: &mut impl BufRead) -> std::io::Result<Option<Head>> {
    let mut line = String::new();
    if input.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_owned(),
        parts.next().unwrap_or("").to_owned(),
    );
    let mut head = Head {
        method,
        path,
        content_length: 0,
        chunked: false,
        encoding: 0,
        expects_continue: false,
        close: false,
    };
    let mut read = line.len();
    loop {
        line.clear();
        let n = input.read_line(&mut line)?;
        read += n;
        if n == 0 || read > MAX_HEAD {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "request head"));
        }
        let Some((name, value)) = line.trim_end().split_once(':') else {
            break;
        };
        let value = value.trim().to_ascii_lowercase();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                head.content_length = value
                    .parse()
                    .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "content-length"))?
            }
            "transfer-encoding" => head.chunked = value.contains("chunked"),
            "content-encoding" => {
                head.encoding = match value.as_str() {
                    "" | "identity" => 0,
                    "gzip" => 1,
                    "deflate" => 2,
                    _ => 3,
                }
            }
            "expect" => head.expects_continue = value == "100-continue",
            "connection" => head.close = value == "close",
            _ => {}
        }
    }
    Ok(Some(head))
}

/// A chunked body (Node.js's exporter streams its requests): size lines and chunks up to an
/// empty last one, then trailers up to a blank line.
fn read_chunked(input: &mut impl BufRead) -> std::io::Result<Vec<u8>> {
    let invalid = |what| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let mut body = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        input.read_line(&mut line)?;
        let size = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size, 16).map_err(|_| invalid("chunk size"))?;
        if size == 0 {
            loop {
                line.clear();
                if input.read_line(&mut line)? == 0 || line.trim().is_empty() {
                    return Ok(body);
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        input.read_exact(&mut body[start..])?;
        line.clear();
        input.read_line(&mut line)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_and_chunked_bodies() {
        let mut input: &[u8] = b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Encoding: gzip\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\nGET /stats HTTP/1.1\r\nConnection: close\r\n\r\n";
        let h = read_head(&mut input).unwrap().unwrap();
        assert_eq!(
            (h.method.as_str(), h.path.as_str(), h.chunked, h.encoding),
            ("POST", "/v1/traces", true, 1)
        );
        assert_eq!(read_chunked(&mut input).unwrap(), b"abcde");
        let h = read_head(&mut input).unwrap().unwrap();
        assert_eq!((h.path.as_str(), h.content_length, h.close), ("/stats", 0, true));
        assert!(read_head(&mut input).unwrap().is_none());
        let mut bad: &[u8] = b"POST / HTTP/1.1\r\nContent-Length: many\r\n\r\n";
        assert!(read_head(&mut bad).is_err());
    }
}
