//! Writes the seed corpus of every target to `fuzz/corpus/<target>/` from the recordings in
//! `tests/fixtures/replay/` and hand-written HTTP exchanges. Deterministic: running it again
//! rewrites the same files; inputs kept as regressions (`regress-*`) are left alone. Run by
//! `cargo xtask fuzz --regen-corpus`.
use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use agent_common::{direction, go_op, side};
use sockspan::{
    decode::{Event, LoopStamp, decode},
    http::looks_like_request,
    reader::RawBatch,
    replay::{StreamBuilder, read_recording, synthetic, synthetic_chain},
};
use sockspan_fuzz::*;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Hand-written exchanges: (name, request chunks, response chunks); each chunk is (bytes, gap).
type Sample = (&'static str, Vec<(&'static [u8], u8)>, Vec<(&'static [u8], u8)>);

fn samples() -> Vec<Sample> {
    // A header section over MAX_HEADER_BYTES (16 KiB) in 4 KiB chunks: also makes libFuzzer's
    // default input size limit (the largest seed) big enough to reach that limit.
    let big: &'static [u8] = Box::leak(
        format!("GET /big HTTP/1.1\r\nHost: h\r\nCookie: {}\r\n\r\n", "c".repeat(17_000))
            .into_bytes()
            .into_boxed_slice(),
    );
    vec![
        (
            "header-too-large",
            big.chunks(4096).map(|c| (c, 0)).collect(),
            vec![(b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\n\r\n", 0)],
        ),
        (
            "keepalive",
            vec![
                (b"GET /a?x=1 HTTP/1.1\r\nHost: h\r\nUser-Agent: t\r\n\r\n", 0),
                (b"GET /b HTTP/1.1\r\nHost: h\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n", 0),
            ],
            vec![
                (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 0),
                (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", 0),
            ],
        ),
        (
            "chunked",
            vec![(
                b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
                0,
            )],
            vec![
                (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", 0),
                (b"0\r\nX-Trailer: 1\r\n\r\n", 0),
            ],
        ),
        (
            "pipelined",
            vec![(
                b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\n\r\nHEAD /3 HTTP/1.1\r\nHost: h\r\n\r\n",
                0,
            )],
            vec![(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\naHTTP/1.1 304 Not Modified\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n",
                0,
            )],
        ),
        (
            "continue",
            vec![
                (b"PUT /f HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n", 0),
                (b"data", 0),
            ],
            vec![
                (b"HTTP/1.1 100 Continue\r\n\r\n", 0),
                (b"HTTP/1.1 204 No Content\r\n\r\n", 0),
            ],
        ),
        (
            "upgrade",
            vec![(b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", 0)],
            vec![
                (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", 0),
                (b"\x81\x05hello", 0),
            ],
        ),
        (
            "connect",
            vec![(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 0)],
            vec![(b"HTTP/1.1 200 Connection Established\r\n\r\n", 0), (b"\x16\x03\x01", 0)],
        ),
        (
            "until-close",
            vec![(b"GET /old HTTP/1.0\r\n\r\n", 0)],
            vec![(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nbody until close", 0)],
        ),
        (
            "gaps",
            vec![
                (b"POST /big HTTP/1.1\r\nHost: h\r\nContent-Length: 100000\r\n\r\nxxxx", 240),
                (b"GET /cut HTTP/1.1\r\nHost: h\r\nCookie: abc", 150),
                (b"GET /next HTTP/1.1\r\n\r\n", 0),
            ],
            vec![
                (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123", 120),
                (b"abc\r\n0\r\n\r\n", 0),
                (b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\n\r\n", 5),
            ],
        ),
        (
            "bad-framing",
            vec![
                (b"POST /x HTTP/1.1\r\nContent-Length: 12x\r\n\r\n", 0),
                (b"POST /y HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 0),
            ],
            vec![(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nzz", 0), (b"HTTP/1.1 200 OK\r\n\r\n", 0)],
        ),
        (
            "not-http",
            vec![(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 0)],
            vec![(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 0)],
        ),
    ]
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    fs::write(dir.join(name), bytes)?;
    Ok(())
}

fn main() -> Result<()> {
    let fuzz = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let root = fuzz.parent().ok_or("fuzz/ has no parent")?.to_path_buf();
    let dirs = ["http_parser", "conn_reassembly", "record_decode", "pipeline"].map(|t| fuzz.join("corpus").join(t));
    // Seeds are rewritten; inputs that once crashed a target (`regress-*`) stay.
    for d in &dirs {
        fs::create_dir_all(d)?;
        for e in fs::read_dir(d)? {
            let path = e?.path();
            if !path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("regress-"))
            {
                fs::remove_file(path)?;
            }
        }
    }
    let [http_dir, conn_dir, decode_dir, pipe_dir] = &dirs;

    // Record streams: the recordings, synthetic workloads and the hand-written samples played
    // over simulated connections.
    let mut streams: Vec<(String, RawBatch)> = Vec::new();
    let mut recs: Vec<_> = fs::read_dir(root.join("tests/fixtures/replay"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "rec"))
        .collect();
    recs.sort();
    for path in recs {
        let stem = path.file_stem().unwrap_or_default().to_string_lossy().into_owned();
        let mut all = RawBatch::default();
        for b in read_recording(fs::File::open(&path)?, usize::MAX)? {
            for r in b.iter() {
                all.push(r);
            }
        }
        streams.push((format!("rec-{stem}"), all));
    }
    streams.push(("synthetic".into(), synthetic(2, 2)));
    streams.push(("synthetic-chain".into(), synthetic_chain(3, 2)));
    for (name, reqs, resps) in samples() {
        let mut b = StreamBuilder::new();
        let c = b.connect(1, 10, 2, 20, 40000, 8080);
        if name == "keepalive" || name == "pipelined" {
            // The client is an event loop thread in a Go program (loop stamps, goroutines).
            b.loops.insert(
                1,
                LoopStamp {
                    epoch: 1,
                    wait_deadline_ns: u64::MAX,
                },
            );
            b.goroutines.insert(1, 0xc000_0100);
            b.go(1, 1, go_op::SPAWN, 0xc000_0001, 0xc000_0100);
            b.go(1, 1, go_op::ROUND_TRIP, 0xc000_0001, 0xc000_0200);
        }
        b.connect_call(&c, 1);
        let n = reqs.len().max(resps.len());
        for i in 0..n {
            if let Some(&(bytes, gap)) = reqs.get(i) {
                let total = bytes.len() + gap_from(gap) as usize;
                b.data(1, 1, 10, c.client_sock, side::CONNECTED, true, bytes, total, "client");
                b.data(2, 2, 20, c.server_sock, side::ACCEPTED, false, bytes, total, "server");
            }
            if let Some(&(bytes, gap)) = resps.get(i) {
                let total = bytes.len() + gap_from(gap) as usize;
                b.data(2, 2, 20, c.server_sock, side::ACCEPTED, true, bytes, total, "server");
                b.data(1, 1, 10, c.client_sock, side::CONNECTED, false, bytes, total, "client");
            }
        }
        b.close(&c);
        streams.push((format!("hand-{name}"), b.batch));
    }

    // pipeline: each stream whole; the recordings also in batches of 16 with idle ticks.
    for (name, batch) in &streams {
        let mut seed = Vec::new();
        for r in batch.iter() {
            push_record(&mut seed, r);
        }
        write(pipe_dir, name, &seed)?;
        if name.starts_with("rec-") {
            let mut seed = Vec::new();
            for (i, r) in batch.iter().enumerate() {
                if i > 0 && i % 16 == 0 {
                    seed.extend_from_slice(&REC_BATCH.to_le_bytes());
                }
                if i > 0 && i % 40 == 0 {
                    seed.extend_from_slice(&REC_TICK.to_le_bytes());
                    seed.push(1);
                }
                push_record(&mut seed, r);
            }
            write(pipe_dir, &format!("{name}-batched"), &seed)?;
        }
    }

    // record_decode: the first record of each kind and size class of every stream.
    let mut seen = HashMap::new();
    for (_, batch) in &streams {
        for r in batch.iter() {
            let key = (r.first().copied().unwrap_or(0), r.len().min(200) / 50);
            if let std::collections::hash_map::Entry::Vacant(e) = seen.entry(key) {
                e.insert(());
                write(decode_dir, &format!("kind{}-len{}", key.0, r.len()), r)?;
            }
        }
    }

    // conn_reassembly and http_parser: each stream's events on its first four fds.
    for (name, batch) in &streams {
        let (conn_seed, http_seeds) = conn_and_http(batch);
        write(conn_dir, name, &conn_seed)?;
        for (i, s) in http_seeds.iter().enumerate() {
            write(http_dir, &format!("{name}-fd{i}"), s)?;
        }
    }
    for (name, reqs, resps) in samples() {
        let mut s = vec![0u8];
        for i in 0..reqs.len().max(resps.len()) {
            if let Some(&(bytes, gap)) = reqs.get(i) {
                http_chunk(&mut s, true, bytes, gap);
            }
            if let Some(&(bytes, gap)) = resps.get(i) {
                http_chunk(&mut s, false, bytes, gap);
            }
        }
        s.push(HTTP_IDLE);
        s.push(20);
        s.push(HTTP_CLOSE);
        write(http_dir, &format!("hand-{name}"), &s)?;
    }
    for d in &dirs {
        println!("{}: {} seeds", d.display(), fs::read_dir(d)?.count());
    }
    Ok(())
}

/// The gap byte whose gap is closest below `gap` (see [`gap_from`]).
fn gap_byte(gap: u64) -> u8 {
    (0..=255u8).rev().find(|&g| gap_from(g) <= gap).unwrap_or(0)
}

/// A stream as a conn_reassembly input (its first four (pid, fd) pairs as the four slots) and,
/// per slot, its chunks as an http_parser input.
fn conn_and_http(batch: &RawBatch) -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut slots: Vec<(u32, i32)> = Vec::new();
    let mut socks: HashMap<u64, u8> = HashMap::new();
    let mut http: Vec<Vec<u8>> = Vec::new();
    let mut conn = Vec::new();
    for r in batch.iter() {
        let Ok(ev) = decode(r) else { continue };
        let h = *ev.header();
        let slot_of = |slots: &mut Vec<(u32, i32)>, http: &mut Vec<Vec<u8>>| -> Option<u8> {
            match slots.iter().position(|&k| k == (h.pid, h.fd)) {
                Some(i) => Some(i as u8),
                None if slots.len() < 4 => {
                    slots.push((h.pid, h.fd));
                    http.push(vec![0]);
                    Some(slots.len() as u8 - 1)
                }
                None => None,
            }
        };
        match ev {
            Event::Data { payload, .. } => {
                let Some(slot) = slot_of(&mut slots, &mut http) else {
                    continue;
                };
                socks.insert(h.sock, slot);
                let egress = h.direction == direction::EGRESS;
                let side_bits = match h.side {
                    side::ACCEPTED => 1,
                    side::CONNECTED => 2,
                    _ => 0,
                };
                let flags = u8::from(egress) | side_bits << F_SIDE_SHIFT;
                let gap = gap_byte((h.bytes.max(0) as u64).saturating_sub(payload.len() as u64));
                conn_data(&mut conn, slot, flags, payload, gap);
                // The request stream: what the server reads, what the client writes.
                let request = match h.side {
                    side::ACCEPTED => !egress,
                    side::CONNECTED => egress,
                    _ => looks_like_request(payload),
                };
                if h.bytes > 0 {
                    http_chunk(&mut http[usize::from(slot)], request, payload, gap);
                }
            }
            Event::Close(_) => {
                if let Some(slot) = slots.iter().position(|&k| k == (h.pid, h.fd)) {
                    conn.push(CONN_CLOSE | (slot as u8) << 3);
                    http[slot].push(HTTP_CLOSE);
                }
            }
            Event::TcpState(s) => {
                // Sockets are seen here before their fds: take the next free slot's socket.
                let slot = socks.get(&h.sock).copied().unwrap_or(slots.len().min(3) as u8);
                let v6 = s.family == agent_common::AF_INET6;
                let established = s.new_state == agent_common::tcp_state::ESTABLISHED;
                conn.push(CONN_STATE | slot << 3);
                conn.push(u8::from(!established) | u8::from(v6) << 1);
                conn.extend_from_slice(&s.local_port.to_le_bytes());
                conn.extend_from_slice(&s.remote_port.to_le_bytes());
            }
            Event::Connect { .. } => {
                if let Some(slot) = slot_of(&mut slots, &mut http) {
                    conn.push(CONN_CONNECT | slot << 3);
                }
            }
            Event::Go(_) => {}
        }
    }
    conn.push(CONN_TICK);
    conn.push(1);
    (conn, http)
}
