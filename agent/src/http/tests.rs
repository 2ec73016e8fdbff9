//! Table-driven tests for the HTTP parser and pairing, plus property-style checks.
//!
//! Time convention: an event at tick `t` is a chunk with `first_ns = 10 * t`,
//! `last_ns = 10 * t + 5` and `tid = 1000 + t`, so expectations are written in ticks.

use super::*;

#[derive(Debug, Clone)]
enum Kind {
    Req,
    Resp,
    Close,
    Flush { idle: u64 },
}

#[derive(Debug, Clone)]
struct Ev {
    kind: Kind,
    bytes: Vec<u8>,
    total: u64,
    t: u64,
}

fn ev(kind: Kind, t: u64, b: &[u8], total: Option<u64>) -> Ev {
    Ev {
        kind,
        bytes: b.to_vec(),
        total: total.unwrap_or(b.len() as u64),
        t,
    }
}
/// Request-stream chunk at tick `t`.
fn q(t: u64, b: &[u8]) -> Ev {
    ev(Kind::Req, t, b, None)
}
/// Response-stream chunk at tick `t`.
fn s(t: u64, b: &[u8]) -> Ev {
    ev(Kind::Resp, t, b, None)
}
/// Request-stream chunk with a gap: `total` bytes moved, `b` captured.
fn qg(t: u64, b: &[u8], total: u64) -> Ev {
    ev(Kind::Req, t, b, Some(total))
}
/// Response-stream chunk with a gap.
fn sg(t: u64, b: &[u8], total: u64) -> Ev {
    ev(Kind::Resp, t, b, Some(total))
}
fn close(t: u64) -> Ev {
    ev(Kind::Close, t, b"", None)
}
fn flush(t: u64, idle: u64) -> Ev {
    ev(Kind::Flush { idle }, t, b"", None)
}

fn first(t: u64) -> u64 {
    10 * t
}
fn last(t: u64) -> u64 {
    10 * t + 5
}
fn tid(t: u64) -> u32 {
    1000 + t as u32
}

fn feed(conn: &mut HttpConn, e: &Ev, out: &mut Vec<Exchange>, stats: &mut HttpStats) {
    let c = Chunk {
        captured: &e.bytes,
        total: e.total,
        tid: tid(e.t),
        first_ns: first(e.t),
        last_ns: last(e.t),
    };
    match e.kind {
        Kind::Req => conn.on_request_chunk(&c, out, stats),
        Kind::Resp => conn.on_response_chunk(&c, out, stats),
        Kind::Close => conn.on_close(first(e.t), out, stats),
        Kind::Flush { idle } => conn.flush_idle(first(e.t), idle, out, stats),
    }
}

fn run(resync: bool, evs: &[Ev]) -> (Vec<Exchange>, HttpStats, HttpConn) {
    let mut conn = if resync {
        HttpConn::new_resync()
    } else {
        HttpConn::new()
    };
    let mut out = Vec::new();
    let mut stats = HttpStats::default();
    for e in evs {
        feed(&mut conn, e, &mut out, &mut stats);
    }
    (out, stats, conn)
}

/// Expected exchange, times in ticks.
#[derive(Debug, Clone)]
struct Ex {
    method: &'static str,
    target: &'static str,
    req: (u64, u64),
    req_body: u64,
    req_trunc: bool,
    /// (status, first tick, last tick, body bytes)
    resp: Option<(u16, u64, u64, u64)>,
    resp_trunc: bool,
    seq: Option<u64>,
}

fn ex(method: &'static str, target: &'static str, req: (u64, u64)) -> Ex {
    Ex {
        method,
        target,
        req,
        req_body: 0,
        req_trunc: false,
        resp: None,
        resp_trunc: false,
        seq: None,
    }
}
impl Ex {
    fn resp(mut self, status: u16, first: u64, last: u64, body: u64) -> Self {
        self.resp = Some((status, first, last, body));
        self
    }
    fn req_body(mut self, n: u64) -> Self {
        self.req_body = n;
        self
    }
    fn req_trunc(mut self) -> Self {
        self.req_trunc = true;
        self
    }
    fn resp_trunc(mut self) -> Self {
        self.resp_trunc = true;
        self
    }
    fn seq(mut self, n: u64) -> Self {
        self.seq = Some(n);
        self
    }
}

fn stat(s: &HttpStats, name: &str) -> u64 {
    match name {
        "requests" => s.requests,
        "responses" => s.responses,
        "not_http" => s.not_http,
        "header_too_large" => s.header_too_large,
        "bad_framing" => s.bad_framing,
        "truncated_headers" => s.truncated_headers,
        "unmatched_responses" => s.unmatched_responses,
        "resync_skipped_chunks" => s.resync_skipped_chunks,
        "interim_responses" => s.interim_responses,
        "upgrades" => s.upgrades,
        "sync_lost" => s.sync_lost,
        "messages_hidden" => s.messages_hidden,
        "unanswered_requests" => s.unanswered_requests,
        "pending_overflow" => s.pending_overflow,
        "incomplete_at_close" => s.incomplete_at_close,
        "abandoned_requests" => s.abandoned_requests,
        "started_overflow" => s.started_overflow,
        other => panic!("unknown stat {other}"),
    }
}

struct Case {
    name: &'static str,
    resync: bool,
    evs: Vec<Ev>,
    want: Vec<Ex>,
    stats: Vec<(&'static str, u64)>,
    dead: bool,
}

fn case(name: &'static str, evs: Vec<Ev>, want: Vec<Ex>) -> Case {
    Case {
        name,
        resync: false,
        evs,
        want,
        stats: Vec::new(),
        dead: false,
    }
}
impl Case {
    fn stats(mut self, s: &[(&'static str, u64)]) -> Self {
        self.stats = s.to_vec();
        self
    }
    fn dead(mut self) -> Self {
        self.dead = true;
        self
    }
    fn resync(mut self) -> Self {
        self.resync = true;
        self
    }
}

fn check(c: &Case) {
    let (got, stats, conn) = run(c.resync, &c.evs);
    assert_eq!(
        got.len(),
        c.want.len(),
        "{}: exchange count; got {got:#?}\nstats {stats:?}",
        c.name
    );
    for (i, (g, w)) in got.iter().zip(&c.want).enumerate() {
        let ctx = format!("{} #{i}: got {g:#?}", c.name);
        let r = &g.request;
        assert_eq!(&*r.method, w.method, "{ctx}");
        assert_eq!(&*r.target, w.target, "{ctx}");
        assert_eq!((r.first_ns, r.last_ns), (first(w.req.0), last(w.req.1)), "{ctx}");
        assert_eq!(r.first_tid, tid(w.req.0), "{ctx}");
        assert_eq!(r.body_bytes, w.req_body, "{ctx}");
        assert_eq!(r.headers_truncated, w.req_trunc, "{ctx}");
        if let Some(seq) = w.seq {
            assert_eq!(r.seq, seq, "{ctx}");
        }
        match (&g.response, w.resp) {
            (None, None) => {}
            (Some(p), Some((status, f, l, body))) => {
                assert_eq!(p.status, status, "{ctx}");
                assert_eq!((p.first_ns, p.last_ns), (first(f), last(l)), "{ctx}");
                assert_eq!(p.last_tid, tid(l), "{ctx}");
                assert_eq!(p.body_bytes, body, "{ctx}");
                assert_eq!(p.headers_truncated, w.resp_trunc, "{ctx}");
                assert!(!p.interim, "{ctx}");
            }
            _ => panic!("{ctx}: response presence differs from {:?}", w.resp),
        }
    }
    for (name, want) in &c.stats {
        assert_eq!(stat(&stats, name), *want, "{}: stat {name}; {stats:?}", c.name);
    }
    assert_eq!(conn.is_dead(), c.dead, "{}: is_dead; {stats:?}", c.name);
}

const GET: &[u8] = b"GET /a?x=1 HTTP/1.1\r\nHost: example.com\r\n\r\n";
const OK5: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";

fn chunked_resp() -> Vec<u8> {
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
      4;name=val;x=\"q\"\r\nWiki\r\n\
      5\r\npedia\r\n\
      E ; ext\r\n in\r\n\r\nchunks.\r\n\
      0\r\nX-Trailer: 1\r\nOther: 2\r\n\r\n"
        .to_vec()
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn cases() -> Vec<Case> {
    let ka3_req = |t, p: &'static str| q(t, format!("GET {p} HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes());
    let pipelined_reqs = cat(&[
        b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n",
        b"POST /2 HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
        b"HEAD /3 HTTP/1.1\r\n\r\n",
    ]);
    let pipelined_resps = cat(&[
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
    ]);
    // Cuts: inside the first body, inside the second response's chunk data.
    let (pr1, pr2) = pipelined_resps.split_at(39);
    let (pr2, pr3) = pr2.split_at(56);
    let fake = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nGET /evil HTTP/1.1\r\n\r\n";
    let cl_fake_body = cat(&[
        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", fake.len()).as_bytes(),
        fake,
    ]);
    let chunked_fake = cat(&[
        b"POST /up HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        format!("{:x}\r\n", fake.len()).as_bytes(),
        fake,
        b"\r\n0\r\n\r\n",
    ]);
    let big_headers = cat(&[
        b"GET /big HTTP/1.1\r\n",
        "X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n"
            .repeat(300)
            .as_bytes(),
        b"\r\n",
    ]);
    vec![
        case(
            "simple GET",
            vec![q(1, GET), s(2, OK5)],
            vec![ex("GET", "/a?x=1", (1, 1)).resp(200, 2, 2, 5)],
        )
        .stats(&[("requests", 1), ("responses", 1)]),
        case(
            "keep-alive 3 exchanges",
            vec![
                ka3_req(1, "/1"),
                s(2, OK5),
                ka3_req(3, "/2"),
                s(4, b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"),
                ka3_req(5, "/3"),
                s(6, b"HTTP/1.1 500 Oops\r\nContent-Length: 3\r\n\r\n"),
                s(7, b"err"),
            ],
            vec![
                ex("GET", "/1", (1, 1)).resp(200, 2, 2, 5),
                ex("GET", "/2", (3, 3)).resp(404, 4, 4, 0),
                ex("GET", "/3", (5, 5)).resp(500, 6, 7, 3),
            ],
        ),
        case(
            "pipelining: 3 requests in one chunk, responses in one chunk",
            vec![q(1, &pipelined_reqs), s(2, &pipelined_resps), close(9)],
            vec![
                ex("GET", "/1", (1, 1)).resp(200, 2, 2, 2).seq(0),
                ex("POST", "/2", (1, 1)).req_body(3).resp(201, 2, 2, 3).seq(1),
                ex("HEAD", "/3", (1, 1)).resp(200, 2, 2, 0).seq(2),
            ],
        ),
        case(
            "pipelining: responses split oddly",
            vec![q(1, &pipelined_reqs), s(2, pr1), s(3, pr2), s(4, pr3)],
            vec![
                ex("GET", "/1", (1, 1)).resp(200, 2, 3, 2),
                ex("POST", "/2", (1, 1)).req_body(3).resp(201, 3, 4, 3),
                ex("HEAD", "/3", (1, 1)).resp(200, 4, 4, 0),
            ],
        ),
        case(
            "pipelining: second response arrives before third request",
            vec![
                q(1, b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n"),
                s(2, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
                q(3, b"GET /3 HTTP/1.1\r\n\r\n"),
                s(
                    4,
                    b"HTTP/1.1 201 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 202 OK\r\nContent-Length: 0\r\n\r\n",
                ),
            ],
            vec![
                ex("GET", "/1", (1, 1)).resp(200, 2, 2, 0).seq(0),
                ex("GET", "/2", (1, 1)).resp(201, 4, 4, 0).seq(1),
                ex("GET", "/3", (3, 3)).resp(202, 4, 4, 0).seq(2),
            ],
        ),
        {
            let mut evs = Vec::new();
            for (i, b) in GET.iter().enumerate() {
                evs.push(q(1 + i as u64, &[*b]));
            }
            let base = 1 + GET.len() as u64;
            for (i, b) in OK5.iter().enumerate() {
                evs.push(s(base + i as u64, &[*b]));
            }
            let end = base + OK5.len() as u64 - 1;
            case(
                "1-byte chunks",
                evs,
                vec![ex("GET", "/a?x=1", (1, base - 1)).resp(200, base, end, 5)],
            )
        },
        case(
            "Content-Length body containing a fake response and request",
            vec![q(1, GET), s(2, &cl_fake_body), q(3, GET), s(4, OK5)],
            vec![
                ex("GET", "/a?x=1", (1, 1)).resp(200, 2, 2, fake.len() as u64),
                ex("GET", "/a?x=1", (3, 3)).resp(200, 4, 4, 5),
            ],
        )
        .stats(&[("responses", 2), ("unmatched_responses", 0)]),
        case(
            "chunked body with extensions and trailers",
            vec![q(1, GET), s(2, &chunked_resp()), q(3, GET), s(4, OK5)],
            vec![
                ex("GET", "/a?x=1", (1, 1)).resp(200, 2, 2, 23),
                ex("GET", "/a?x=1", (3, 3)).resp(200, 4, 4, 5),
            ],
        ),
        case(
            "chunked request body containing fake requests",
            vec![q(1, &chunked_fake), s(2, b"HTTP/1.1 204 No Content\r\n\r\n")],
            vec![ex("POST", "/up", (1, 1)).req_body(fake.len() as u64).resp(204, 2, 2, 0)],
        )
        .stats(&[("requests", 1)]),
        case(
            "response body in a gap: captured 100 of 100000",
            vec![
                q(1, GET),
                sg(
                    2,
                    &cat(&[b"HTTP/1.1 200 OK\r\nContent-Length: 99958\r\n\r\n", &[b'x'; 58]]),
                    100_000,
                ),
                q(3, GET),
                s(4, OK5),
            ],
            vec![
                ex("GET", "/a?x=1", (1, 1)).resp(200, 2, 2, 99_958),
                ex("GET", "/a?x=1", (3, 3)).resp(200, 4, 4, 5),
            ],
        ),
        case(
            "body in gaps across several chunks",
            vec![
                qg(1, b"POST /up HTTP/1.1\r\nContent-Length: 5000\r\n\r\nab", 1000),
                qg(2, b"cdef", 3000),
                qg(3, b"", 1043),
                q(4, GET),
                s(5, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
                s(6, OK5),
            ],
            vec![
                ex("POST", "/up", (1, 3)).req_body(5000).resp(200, 5, 5, 0),
                ex("GET", "/a?x=1", (4, 4)).resp(200, 6, 6, 5),
            ],
        ),
        case(
            "chunked body data in a gap stays in sync",
            vec![
                q(1, GET),
                sg(
                    2,
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2710\r\nxx",
                    53 + 10_000,
                ),
                s(3, b"\r\n0\r\n\r\n"),
            ],
            vec![ex("GET", "/a?x=1", (1, 1)).resp(200, 2, 3, 10_000)],
        ),
        case(
            "chunked: gap over a size line loses sync, response ends at close",
            vec![
                q(1, GET),
                sg(2, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nxx", 200),
                s(3, b"more"),
                close(9),
            ],
            // 2 bytes of chunk data, then every byte after the loss (gap and "more").
            vec![ex("GET", "/a?x=1", (1, 1)).resp(200, 2, 3, 2 + (200 - 52) + 4)],
        )
        .stats(&[("sync_lost", 1)]),
        case(
            "HEAD with Content-Length has no body",
            vec![
                q(1, b"HEAD / HTTP/1.1\r\n\r\n"),
                s(2, b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"),
                q(3, GET),
                s(4, OK5),
            ],
            vec![
                ex("HEAD", "/", (1, 1)).resp(200, 2, 2, 0),
                ex("GET", "/a?x=1", (3, 3)).resp(200, 4, 4, 5),
            ],
        ),
        case(
            "204 and 304 have no body",
            vec![
                q(1, b"DELETE /x HTTP/1.1\r\n\r\nGET /y HTTP/1.1\r\n\r\n"),
                s(2, b"HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n"),
                s(3, b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n"),
            ],
            vec![
                ex("DELETE", "/x", (1, 1)).resp(204, 2, 2, 0),
                ex("GET", "/y", (1, 1)).resp(304, 3, 3, 0),
            ],
        )
        .stats(&[("pending_overflow", 0)]),
        case(
            "100-continue then 200",
            vec![
                q(
                    1,
                    b"PUT /f HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n",
                ),
                s(2, b"HTTP/1.1 100 Continue\r\n\r\n"),
                q(3, b"data"),
                s(
                    4,
                    b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                ),
            ],
            vec![ex("PUT", "/f", (1, 3)).req_body(4).resp(200, 4, 4, 2)],
        )
        .stats(&[("interim_responses", 2), ("responses", 1)]),
        case(
            "HTTP/1.0 close-delimited response ends at last chunk, not close",
            vec![
                q(1, b"GET /old HTTP/1.0\r\n\r\n"),
                s(2, b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\nbody"),
                s(3, b"HTTP/1.1 200 OK\r\n\r\nnot a message"),
                close(20),
            ],
            vec![ex("GET", "/old", (1, 1)).resp(200, 2, 3, 4 + 32)],
        ),
        case(
            "101 upgrade emits and stops parsing",
            vec![
                q(
                    1,
                    b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
                ),
                s(
                    2,
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello",
                ),
                q(3, b"\x81\x85garbage"),
                close(4),
            ],
            vec![ex("GET", "/ws", (1, 1)).resp(101, 2, 2, 0)],
        )
        .stats(&[("upgrades", 1), ("not_http", 0)])
        .dead(),
        case(
            "CONNECT 200 becomes a tunnel",
            vec![
                q(1, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"),
                s(2, b"HTTP/1.1 200 Connection established\r\n\r\n"),
                q(3, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
            ],
            vec![ex("CONNECT", "example.com:443", (1, 1)).resp(200, 2, 2, 0)],
        )
        .stats(&[("upgrades", 1), ("not_http", 0)])
        .dead(),
        case(
            "truncated request headers: no body assumed, stream resyncs",
            vec![
                qg(1, b"POST /t HTTP/1.1\r\nHost: h\r\nX-Lo", 5000),
                q(2, b"body bytes that are not a request"),
                s(3, OK5),
                q(4, GET),
                s(5, OK5),
            ],
            vec![
                ex("POST", "/t", (1, 1)).req_trunc().resp(200, 3, 3, 5),
                ex("GET", "/a?x=1", (4, 4)).resp(200, 5, 5, 5),
            ],
        )
        .stats(&[("truncated_headers", 1), ("resync_skipped_chunks", 1)]),
        case(
            "truncated request line keeps method and target prefix",
            vec![qg(1, b"GET /very/long/pa", 3000), s(2, OK5)],
            vec![ex("GET", "/very/long/pa", (1, 1)).req_trunc().resp(200, 2, 2, 5)],
        ),
        case(
            "truncated response headers: end at next status line",
            vec![
                q(1, GET),
                sg(2, b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nX-", 5000),
                s(3, b"more body"),
                sg(4, b"", 100),
                q(5, b"GET /2 HTTP/1.1\r\n\r\nGET /3 HTTP/1.1\r\n\r\n"),
                s(6, b"still ignored"),
                s(7, OK5),
                sg(8, b"HTTP/1.1 500 Error\r\n", 100),
                s(9, b"x"),
                s(10, OK5),
            ],
            vec![
                ex("GET", "/a?x=1", (1, 1)).resp(200, 2, 4, 0).resp_trunc(),
                ex("GET", "/2", (5, 5)).resp(200, 7, 7, 5),
                ex("GET", "/3", (5, 5)).resp(500, 8, 9, 0).resp_trunc(),
            ],
        )
        .stats(&[("truncated_headers", 2), ("resync_skipped_chunks", 1)]),
        case(
            "truncated response headers: end at close",
            vec![q(1, GET), sg(2, b"HTTP/1.1 200 OK\r\n", 500), s(3, b"..."), close(9)],
            vec![ex("GET", "/a?x=1", (1, 1)).resp(200, 2, 3, 0).resp_trunc()],
        ),
        case(
            "truncated response headers: end at flush_idle",
            vec![
                q(1, GET),
                sg(2, b"HTTP/1.1 200 OK\r\n", 500),
                s(3, b"..."),
                flush(4, 100),
                flush(20, 100),
                s(21, OK5),
            ],
            vec![ex("GET", "/a?x=1", (1, 1)).resp(200, 2, 3, 0).resp_trunc()],
        )
        .stats(&[("unmatched_responses", 1)]),
        case(
            "header too large: request kept truncated, stream resyncs",
            vec![q(1, &big_headers), s(2, OK5), q(3, GET), s(4, OK5)],
            vec![
                ex("GET", "/big", (1, 1)).req_trunc().resp(200, 2, 2, 5),
                ex("GET", "/a?x=1", (3, 3)).resp(200, 4, 4, 5),
            ],
        )
        .stats(&[("header_too_large", 1)]),
        case(
            "header too large on a response: end unknown, ends at next status line",
            vec![
                q(1, b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n"),
                s(2, &cat(&[b"HTTP/1.1 200 OK\r\n", &big_headers[19..]])),
                s(3, b"body"),
                s(4, OK5),
            ],
            vec![
                ex("GET", "/1", (1, 1)).resp(200, 2, 3, 0).resp_trunc(),
                ex("GET", "/2", (1, 1)).resp(200, 4, 4, 5),
            ],
        )
        .stats(&[("header_too_large", 1)]),
        case(
            "garbage request stream",
            vec![q(1, b"hello world\r\n\r\n"), s(2, OK5), close(3)],
            vec![],
        )
        .stats(&[("not_http", 1)])
        .dead(),
        case(
            "TLS ClientHello",
            vec![
                q(1, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03GET / HTTP/1.1\r\n\r\n"),
                s(2, b"\x16\x03\x03\x00\x7a\x02"),
            ],
            vec![],
        )
        .stats(&[("not_http", 1)])
        .dead(),
        case(
            "redis",
            vec![q(1, b"*1\r\n$4\r\nPING\r\n"), s(2, b"+PONG\r\n"), close(3)],
            vec![],
        )
        .stats(&[("not_http", 1)])
        .dead(),
        case("NUL bytes", vec![q(1, &[0u8; 64]), s(2, &[0u8; 64])], vec![])
            .stats(&[("not_http", 1)])
            .dead(),
        case(
            "server speaks first (SMTP)",
            vec![s(1, b"220 mail.example.com ESMTP\r\n"), q(2, b"HELO x\r\n")],
            vec![],
        )
        .stats(&[("not_http", 1)])
        .dead(),
        case(
            "HTTP/2 prior knowledge preface is not HTTP/1",
            vec![q(1, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")],
            vec![],
        )
        .stats(&[("not_http", 1)])
        .dead(),
        case(
            "garbage after a valid exchange kills the connection",
            vec![
                q(1, GET),
                s(2, OK5),
                q(3, GET),
                q(4, b"\x00\x01binary"),
                s(5, OK5),
                close(6),
            ],
            // the request waiting when parsing stopped comes out unanswered
            vec![
                ex("GET", "/a?x=1", (1, 1)).resp(200, 2, 2, 5),
                ex("GET", "/a?x=1", (3, 3)),
            ],
        )
        .stats(&[("not_http", 1), ("abandoned_requests", 1)])
        .dead(),
        case(
            "response with no request",
            vec![s(1, OK5), q(2, GET), s(3, OK5)],
            vec![ex("GET", "/a?x=1", (2, 2)).resp(200, 3, 3, 5)],
        )
        .stats(&[("unmatched_responses", 1), ("responses", 2)]),
        case(
            "request with no response, then close",
            vec![q(1, GET), q(2, b"GET /b HTTP/1.1\r\n\r\n"), close(5)],
            vec![ex("GET", "/a?x=1", (1, 1)), ex("GET", "/b", (2, 2))],
        )
        .stats(&[("unanswered_requests", 2)]),
        case(
            "response cut mid-body by close is emitted",
            vec![
                q(1, GET),
                s(2, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"),
                close(3),
            ],
            vec![ex("GET", "/a?x=1", (1, 1)).resp(200, 2, 2, 3)],
        )
        .stats(&[("incomplete_at_close", 1)]),
        case(
            "resync: join mid-body",
            vec![
                q(1, b"tail of some earlier request body"),
                s(2, b"rest of an earlier response body HTTP/1.1 200 OK\r\n"),
                s(3, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
                q(4, GET),
                s(5, OK5),
            ],
            vec![ex("GET", "/a?x=1", (4, 4)).resp(200, 5, 5, 5).seq(0)],
        )
        .stats(&[
            ("resync_skipped_chunks", 2),
            ("unmatched_responses", 1),
            ("not_http", 0),
        ])
        .resync(),
        case(
            "lenient: bare LF, lowercase names, extra spaces, leading CRLF",
            vec![
                q(1, b"\r\nGET   /lf   HTTP/1.1\nhost:h\n\n"),
                s(2, b"HTTP/1.1 200 OK\ncontent-length:   2  \n\nok"),
            ],
            vec![ex("GET", "/lf", (1, 1)).resp(200, 2, 2, 2)],
        ),
        case(
            "request without length has no body; unknown method token with /",
            vec![
                q(1, b"PROPFIND /dav HTTP/1.1\r\n\r\n"),
                s(2, b"HTTP/1.1 207 Multi-Status\r\nContent-Length: 1\r\n\r\nx"),
            ],
            vec![ex("PROPFIND", "/dav", (1, 1)).resp(207, 2, 2, 1)],
        ),
        case(
            "absolute-form target (proxy)",
            vec![q(1, b"GET http://example.com/p?q HTTP/1.1\r\n\r\n"), s(2, OK5)],
            vec![ex("GET", "http://example.com/p?q", (1, 1)).resp(200, 2, 2, 5)],
        ),
        case(
            "bad Content-Length on request: counted, resync",
            vec![q(1, b"POST /x HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\nab"), s(2, OK5)],
            vec![ex("POST", "/x", (1, 1)).resp(200, 2, 2, 5)],
        )
        .stats(&[("bad_framing", 1)]),
        case(
            "Content-Length with Transfer-Encoding: chunked framing wins (no smuggled request)",
            vec![
                q(
                    1,
                    b"POST /x HTTP/1.1\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
                ),
                s(2, OK5),
                s(3, OK5),
            ],
            vec![
                ex("POST", "/x", (1, 1)).req_body(3).resp(200, 2, 2, 5),
                ex("GET", "/smuggled", (1, 1)).resp(200, 3, 3, 5),
            ],
        )
        .stats(&[("requests", 2)]),
        case(
            "negative Content-Length: counted, resync",
            vec![q(1, b"POST /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n"), s(2, OK5)],
            vec![ex("POST", "/x", (1, 1)).resp(200, 2, 2, 5)],
        )
        .stats(&[("bad_framing", 1)]),
        case(
            "Content-Length beyond u64: counted, resync",
            vec![
                q(1, b"POST /x HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n"),
                s(2, OK5),
            ],
            vec![ex("POST", "/x", (1, 1)).resp(200, 2, 2, 5)],
        )
        .stats(&[("bad_framing", 1)]),
        case(
            "bad chunk size on response: counted, end unknown",
            vec![
                q(1, GET),
                s(2, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
                s(3, b"junk"),
                s(4, OK5),
            ],
            // Bytes from the bad framing on: "zz\r\n" and "junk".
            vec![ex("GET", "/a?x=1", (1, 1)).resp(200, 2, 3, 8)],
        )
        .stats(&[("bad_framing", 1), ("unmatched_responses", 1)]),
        case(
            "bad Content-Length on response: end unknown, later bytes counted",
            vec![
                q(1, GET),
                s(2, b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\nabc"),
                sg(3, b"defg", 10),
                close(9),
            ],
            vec![ex("GET", "/a?x=1", (1, 1)).resp(200, 2, 3, 13)],
        )
        .stats(&[("bad_framing", 1)]),
        case(
            // The 202 may answer /2 or /3: no guess.
            "responses hidden in a gap while requests wait stop the connection",
            vec![
                q(
                    1,
                    b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\nGET /3 HTTP/1.1\r\n\r\n",
                ),
                sg(2, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 80),
                s(3, b"HTTP/1.1 202 OK\r\nContent-Length: 0\r\n\r\n"),
                close(4),
            ],
            vec![
                ex("GET", "/1", (1, 1)).resp(200, 2, 2, 2),
                ex("GET", "/2", (1, 1)),
                ex("GET", "/3", (1, 1)),
            ],
        )
        .stats(&[("messages_hidden", 1), ("abandoned_requests", 2)])
        .dead(),
        case(
            "a response hidden in a gap with no request waiting resyncs",
            vec![
                q(1, b"GET /1 HTTP/1.1\r\n\r\n"),
                sg(2, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 80),
                q(3, b"GET /2 HTTP/1.1\r\n\r\n"),
                s(4, b"HTTP/1.1 202 OK\r\nContent-Length: 0\r\n\r\n"),
            ],
            vec![
                ex("GET", "/1", (1, 1)).resp(200, 2, 2, 2),
                ex("GET", "/2", (3, 3)).resp(202, 4, 4, 0),
            ],
        )
        .stats(&[("sync_lost", 1), ("messages_hidden", 0)]),
        case(
            // A later request could be paired with a hidden one's response: none is parsed;
            // each response past the waiting ones stands for a lost request.
            "requests hidden in a gap stop the request stream, each loss counted",
            vec![
                qg(1, b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n", 120),
                s(2, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
                s(3, b"HTTP/1.1 201 OK\r\nContent-Length: 0\r\n\r\n"),
                s(4, b"HTTP/1.1 202 OK\r\nContent-Length: 0\r\n\r\n"),
                q(5, b"GET /9 HTTP/1.1\r\n\r\n"),
                s(6, b"HTTP/1.1 203 OK\r\nContent-Length: 0\r\n\r\n"),
            ],
            vec![
                ex("GET", "/1", (1, 1)).resp(200, 2, 2, 0),
                ex("GET", "/2", (1, 1)).resp(201, 3, 3, 0),
            ],
        )
        .stats(&[("messages_hidden", 1), ("unmatched_responses", 2), ("requests", 2)]),
        case(
            "chunked: gap ending right after the data's CRLF stays in sync",
            vec![
                q(1, GET),
                sg(
                    2,
                    &cat(&[CHUNKED_HEAD, b"5\r\nab"]),
                    CHUNKED_HEAD.len() as u64 + 3 + 5 + 2,
                ),
                sg(3, b"3\r\nxy", 7),
                s(4, b"\n0\r\n\r\n"),
            ],
            vec![ex("GET", "/a?x=1", (1, 1)).resp(200, 2, 4, 8)],
        )
        .stats(&[("sync_lost", 0)]),
        case(
            "lost chunked: a chunk with a gap never ends the response",
            vec![
                q(1, GET),
                sg(2, &cat(&[CHUNKED_HEAD, b"2\r\nxx"]), 500),
                sg(3, b"\r\n0\r\n\r\n", 10),
                q(4, GET),
                s(5, OK5),
            ],
            vec![
                ex("GET", "/a?x=1", (1, 1)).resp(200, 2, 3, 2 + (500 - 52) + 10),
                ex("GET", "/a?x=1", (4, 4)).resp(200, 5, 5, 5),
            ],
        )
        .stats(&[("sync_lost", 1)]),
        case(
            "lost chunked: only a chunk ending with the terminator ends the response",
            vec![
                q(1, GET),
                sg(2, &cat(&[CHUNKED_HEAD, b"2\r\nxx"]), 500),
                s(3, b"5\r\nhello\r\n"),
                s(4, b"0\r\n\r\n\r\n"),
                s(5, b"10\r\n\r\n"),
                s(6, b"x0\r\n\r\n"),
                s(7, b"1\r\nz\r\n0\r\n\r\n"),
                q(8, GET),
                s(9, OK5),
            ],
            vec![
                // Resyncs at "1\r\n": 1 byte of chunk data.
                ex("GET", "/a?x=1", (1, 1)).resp(200, 2, 7, 2 + (500 - 52) + 10 + 7 + 6 + 6 + 1),
                ex("GET", "/a?x=1", (8, 8)).resp(200, 9, 9, 5),
            ],
        )
        .stats(&[("sync_lost", 1), ("unmatched_responses", 0)]),
        case(
            "lost chunked: final chunk holds the terminator and the next response",
            vec![
                q(1, b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n"),
                sg(2, &cat(&[CHUNKED_HEAD, b"2\r\nxx"]), 500),
                s(3, &cat(&[b"\r\n0\r\n\r\n", CHUNKED_HEAD, b"3\r\nabc\r\n0\r\n\r\n"])),
                q(4, GET),
                s(5, OK5),
            ],
            vec![
                ex("GET", "/1", (1, 1)).resp(200, 2, 3, 2 + (500 - 52) + 2).seq(0),
                ex("GET", "/2", (1, 1)).resp(200, 3, 3, 3).seq(1),
                ex("GET", "/a?x=1", (4, 4)).resp(200, 5, 5, 5).seq(2),
            ],
        )
        .stats(&[("sync_lost", 1), ("responses", 3)]),
        case(
            "lost chunked: trailer-less terminator with extension, bare LF",
            vec![
                q(1, GET),
                sg(2, &cat(&[CHUNKED_HEAD, b"2\r\nxx"]), 500),
                s(3, b"00;done\n\n"),
                s(4, b"stray bytes"),
                q(5, GET),
                s(6, OK5),
            ],
            vec![
                ex("GET", "/a?x=1", (1, 1)).resp(200, 2, 3, 2 + (500 - 52)),
                ex("GET", "/a?x=1", (5, 5)).resp(200, 6, 6, 5),
            ],
        )
        // After a guessed end the stream resyncs: stray bytes are skipped, not fatal.
        .stats(&[
            ("sync_lost", 1),
            ("resync_skipped_chunks", 1),
            ("unmatched_responses", 0),
        ]),
    ]
}

/// Header section of a chunked 200 response (47 bytes).
const CHUNKED_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";

/// The Node.js pattern: 100 `res.write()` calls of 10000 bytes coalesced into large writev
/// syscalls, of which only 1024 bytes are captured; the chunk-size lines after the first
/// writev fall into gaps. Returns the events (ticks 1..=9) and the first response's expected
/// body bytes.
fn node_pattern(final_chunk: &[u8]) -> (Vec<Ev>, u64) {
    let first = cat(&[CHUNKED_HEAD, b"2710\r\n", &[b'a'; 10_000], b"\r\n"]);
    let writev = cat(&[b"2710\r\n", &[b'b'; 1018]]);
    let mut evs = vec![q(1, GET), sg(2, &first[..1024], first.len() as u64)];
    for t in 3..=6 {
        evs.push(sg(t, &writev, 40_012));
    }
    evs.extend([s(7, final_chunk), q(8, GET), s(9, OK5)]);
    // First writev in sync (10000); second: 1018 captured + 8982 in the gap, then the rest of
    // its gap (38988 - 8982) and three whole writevs are counted after the loss.
    let body = 10_000 + 10_000 + (38_988 - 8_982) + 3 * 40_012;
    (evs, body)
}

#[test]
fn node_chunked_writev_pattern() {
    let last_data = cat(&[b"118\r\n", &[b'c'; 280], b"\r\n0\r\n\r\n"]);
    for (name, final_chunk, extra) in [
        ("bare terminator", &b"0\r\n\r\n"[..], 0),
        ("terminator after CRLF", b"\r\n0\r\n\r\n", 2),
        (
            "terminator with trailers",
            b"0\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n",
            0,
        ),
        ("300-byte final writev with a data chunk", &last_data, 280),
    ] {
        let (evs, body) = node_pattern(final_chunk);
        let (out, stats, conn) = run(false, &evs);
        assert_eq!(out.len(), 2, "{name}: {out:#?}");
        let r0 = out[0].response.as_ref().expect("first response");
        assert_eq!((r0.status, r0.first_ns, r0.last_ns), (200, first(2), last(7)), "{name}");
        assert_eq!(r0.last_tid, tid(7), "{name}");
        assert_eq!(r0.body_bytes, body + extra, "{name}");
        assert!(!r0.headers_truncated, "{name}");
        assert_eq!((out[0].request.seq, out[1].request.seq), (0, 1), "{name}");
        assert_eq!(out[1].request.first_ns, first(8), "{name}");
        let r1 = out[1].response.as_ref().expect("second response");
        assert_eq!(
            (r1.status, r1.first_ns, r1.last_ns, r1.body_bytes),
            (200, first(9), last(9), 5),
            "{name}"
        );
        assert_eq!(stats.sync_lost, 1, "{name}: {stats:?}");
        assert_eq!(stats.unmatched_responses, 0, "{name}: {stats:?}");
        assert_eq!(conn.pending_requests(), 0, "{name}");
        assert!(!conn.is_dead(), "{name}");
    }
}

#[test]
fn started_requests_are_reported_after_their_headers() {
    let mut conn = HttpConn::new();
    let mut out = Vec::new();
    let mut stats = HttpStats::default();
    let mut started = Vec::new();
    let feed_ev = |conn: &mut HttpConn, e: Ev, out: &mut Vec<Exchange>, stats: &mut HttpStats| {
        feed(conn, &e, out, stats);
    };
    feed_ev(
        &mut conn,
        q(
            1,
            b"GET /1 HTTP/1.1\r\nHost: h\r\ntraceparent: tp1\r\n\r\n\
              POST /2 HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc\
              HEAD /3 HTTP/1.1\r\nHo",
        ),
        &mut out,
        &mut stats,
    );
    conn.take_started(&mut started);
    assert!(out.is_empty());
    let names: Vec<_> = started.iter().map(|r| (&*r.method, &*r.target, r.seq)).collect();
    assert_eq!(names, [("GET", "/1", 0), ("POST", "/2", 1)]);
    assert_eq!(
        started[0].propagation.as_ref().and_then(|p| p.traceparent.as_deref()),
        Some("tp1")
    );
    assert_eq!(started[1].propagation, None);
    assert_eq!((started[0].first_ns, started[0].first_tid), (first(1), tid(1)));

    let mut more = Vec::new();
    conn.take_started(&mut more);
    assert!(more.is_empty(), "taken twice: {more:?}");

    feed_ev(&mut conn, q(2, b"st: x\r\n\r\n"), &mut out, &mut stats);
    conn.take_started(&mut more);
    assert_eq!(more.len(), 1);
    assert_eq!((&*more[0].target, more[0].seq), ("/3", 2));
    assert_eq!(more[0].first_ns, first(1));
    started.append(&mut more);
    assert!(out.is_empty());

    // A request cut mid-headers by close is never reported.
    feed_ev(&mut conn, q(3, b"GET /4 HTTP/1.1\r\nHost"), &mut out, &mut stats);
    feed_ev(
        &mut conn,
        s(
            4,
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 201 OK\r\nContent-Length: 0\r\n\r\n\
              HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n",
        ),
        &mut out,
        &mut stats,
    );
    feed_ev(&mut conn, close(5), &mut out, &mut stats);
    conn.take_started(&mut more);
    assert!(more.is_empty(), "{more:?}");
    assert_eq!(out.len(), 3);
    for (e, st) in out.iter().zip(&started) {
        assert_eq!(e.request.seq, st.seq);
        assert_eq!((&e.request.method, &e.request.target), (&st.method, &st.target));
        assert_eq!(e.request.first_ns, st.first_ns);
        assert!(e.response.is_some());
    }
    assert_eq!((out[1].request.content_length, out[1].request.body_bytes), (Some(3), 3));
    let hosts: Vec<_> = out.iter().map(|e| e.request.host.as_deref()).collect();
    assert_eq!(hosts, [Some("h"), None, Some("x")]);
    assert_eq!(out[2].request.last_ns, last(2));
    assert_eq!(stats.incomplete_at_close, 1);
    assert_eq!(stats.started_overflow, 0);
}

#[test]
fn started_requests_are_bounded() {
    let evs: Vec<Ev> = (0..300).map(|i| q(i + 1, b"GET / HTTP/1.1\r\n\r\n")).collect();
    let (_, stats, mut conn) = run(false, &evs);
    let mut started = Vec::new();
    conn.take_started(&mut started);
    assert_eq!(started.len(), MAX_STARTED_REQUESTS);
    assert_eq!(stats.started_overflow, 300 - MAX_STARTED_REQUESTS as u64);
    let seqs: Vec<u64> = started.iter().map(|r| r.seq).collect();
    let want: Vec<u64> = (300 - MAX_STARTED_REQUESTS as u64..300).collect();
    assert_eq!(seqs, want);
}

#[test]
fn truncated_and_resync_requests_are_started_and_numbered() {
    let (out, _, mut conn) = run(
        true,
        &[
            q(1, b"body of an earlier request"),
            qg(2, b"POST /t HTTP/1.1\r\nHost: h\r\nX-Lo", 5000),
            q(3, GET),
        ],
    );
    assert!(out.is_empty());
    let mut started = Vec::new();
    conn.take_started(&mut started);
    let got: Vec<_> = started
        .iter()
        .map(|r| (&*r.target, r.seq, r.headers_truncated))
        .collect();
    assert_eq!(got, [("/t", 0, true), ("/a?x=1", 1, false)]);
}

#[test]
fn table() {
    for c in cases() {
        check(&c);
    }
}

#[test]
fn header_values_are_kept_and_capped() {
    let long = "v".repeat(2000);
    let target = format!("/{}", "p".repeat(5000));
    let req = format!(
        "GET {target} HTTP/1.0\r\nHOST: example.com:8080\r\nuser-agent: curl/8.0\r\n\
         Cookie: secret=1\r\nAuthorization: Bearer secret\r\nProxy-Authorization: Basic secret\r\n\
         traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\
         TraceState: congo=t61rcWkgMzE\r\nb3: 80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1\r\n\
         X-B3-TraceId: 463ac35c9f6413ad\r\nX-B3-SpanId: a2fb4a1d1a96d312\r\n\
         X-B3-ParentSpanId: 0020000000000001\r\nX-B3-Sampled: 1\r\nX-Long: {long}\r\n\
         Host: second-ignored\r\nContent-Length: 0\r\n\r\n"
    );
    let (out, _, mut conn) = run(false, &[q(1, req.as_bytes()), s(2, OK5)]);
    assert_eq!(out.len(), 1);
    let mut started = Vec::new();
    conn.take_started(&mut started);
    let p = started[0].propagation.as_deref().expect("propagation headers");
    let r = &out[0].request;
    assert_eq!(r.target.len(), MAX_TARGET_BYTES);
    assert!(r.target.starts_with("/ppp"));
    assert_eq!(r.version_minor, 0);
    assert_eq!(r.host.as_deref(), Some("example.com:8080"));
    assert_eq!(r.user_agent.as_deref(), Some("curl/8.0"));
    assert_eq!(
        p.traceparent.as_deref(),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    );
    assert_eq!(p.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
    assert_eq!(
        p.b3.as_deref(),
        Some("80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")
    );
    assert_eq!(p.x_b3_trace_id.as_deref(), Some("463ac35c9f6413ad"));
    assert_eq!(p.x_b3_span_id.as_deref(), Some("a2fb4a1d1a96d312"));
    assert_eq!(p.x_b3_parent_span_id.as_deref(), Some("0020000000000001"));
    assert_eq!(p.x_b3_sampled.as_deref(), Some("1"));
    assert_eq!(r.content_length, Some(0));
    let dbg = format!("{out:?} {started:?}");
    assert!(!dbg.contains("secret"), "credentials leaked: {dbg}");
    assert_eq!(out[0].response.as_ref().map(|p| p.version_minor), Some(1));
}

#[test]
fn values_with_control_bytes_and_bad_utf8_are_sanitized() {
    let (out, _, _) = run(
        false,
        &[q(1, b"GET /\xff\x01 HTTP/1.1\r\nHost: a\x00b\xc3\r\n\r\n"), s(2, OK5)],
    );
    assert_eq!(out.len(), 1);
    let r = &out[0].request;
    assert!(!r.target.chars().any(char::is_control));
    assert_eq!(r.host.as_deref(), Some("a\u{FFFD}b\u{FFFD}"));
}

#[test]
fn looks_like_start_lines() {
    for (b, want) in [
        (&b"GET / HTTP/1.1"[..], true),
        (b"GET ", true),
        (b"OPTIONS * HTTP/1.1", true),
        (b"MKCOL /x", true),
        (b"FOO http://x/", true),
        (b"FOO HTTP://x/", true),
        (b"FOO *", false),
        (b"FOO", false),
        (b"GET", false),
        (b"get / HTTP/1.1", false),
        (b"ABCDEFGHIJKLMNOPQRSTU /", false),
        (b"ABCDEFGHIJKLMNOPQRST /", true),
        (b"\x16\x03\x01", false),
        (b"", false),
    ] {
        assert_eq!(looks_like_request(b), want, "{:?}", String::from_utf8_lossy(b));
    }
    for (b, want) in [
        (&b"HTTP/1.1 200 OK"[..], true),
        (b"HTTP/1.0 404", true),
        (b"HTTP/1.1 20", false),
        (b"HTTP/2 200", false),
        (b"HTTP/1.1 2x0", false),
        (b"http/1.1 200", false),
        (b"", false),
    ] {
        assert_eq!(looks_like_response(b), want, "{:?}", String::from_utf8_lossy(b));
    }
}

#[test]
fn pipelined_overflow_is_bounded() {
    let mut evs = Vec::new();
    for i in 0..(MAX_PENDING_REQUESTS as u64 + 10) {
        evs.push(q(i + 1, b"GET / HTTP/1.1\r\n\r\n"));
    }
    let (out, stats, conn) = run(false, &evs);
    assert_eq!(conn.pending_requests(), MAX_PENDING_REQUESTS);
    assert_eq!(out.len(), 10);
    assert!(out.iter().all(|e| e.response.is_none()));
    assert_eq!(stats.pending_overflow, 10);
}

/// Requests pushed out of a full queue still get their responses, in order: those responses
/// are skipped, so every later one pairs with its own request (status 200 + i answers `/i`).
#[test]
fn responses_of_evicted_requests_do_not_shift_pairing() {
    let n = MAX_PENDING_REQUESTS as u64 + 10;
    let reqs: Vec<Vec<u8>> = (0..n)
        .map(|i| format!("GET /{i} HTTP/1.1\r\n\r\n").into_bytes())
        .collect();
    let resps: Vec<Vec<u8>> = (0..n)
        .map(|i| format!("HTTP/1.1 {} OK\r\nContent-Length: 0\r\n\r\n", 200 + i).into_bytes())
        .collect();
    let mut evs: Vec<Ev> = reqs.iter().enumerate().map(|(i, b)| q(i as u64 + 1, b)).collect();
    evs.extend(resps.iter().enumerate().map(|(i, b)| s(n + i as u64 + 1, b)));
    let (out, stats, _) = run(false, &evs);
    assert_eq!(out.len() as u64, n);
    for e in &out {
        let i: u64 = e.request.target.trim_start_matches('/').parse().unwrap();
        match &e.response {
            None => assert!(i < 10, "/{i} unanswered"),
            Some(r) => assert_eq!(u64::from(r.status), 200 + i, "/{i} paired with another's response"),
        }
    }
    assert_eq!((stats.pending_overflow, stats.unmatched_responses), (10, 0));
}

// ---- property-style tests ----

struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
}

/// Rounds for the randomized tests: `SOCKSPAN_HTTP_FUZZ_ROUNDS` (default `default`).
fn rounds(default: usize) -> usize {
    std::env::var("SOCKSPAN_HTTP_FUZZ_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Splits every data event into pieces at the given cut points (same times, so the expected
/// exchanges are identical).
fn split_events(evs: &[Ev], mut cuts_for: impl FnMut(usize, usize) -> Vec<usize>) -> Vec<Ev> {
    let mut res = Vec::new();
    for (i, e) in evs.iter().enumerate() {
        if matches!(e.kind, Kind::Close | Kind::Flush { .. }) || e.bytes.is_empty() {
            res.push(e.clone());
            continue;
        }
        let mut cuts = cuts_for(i, e.bytes.len());
        cuts.retain(|&c| c > 0 && c < e.bytes.len());
        cuts.sort_unstable();
        cuts.dedup();
        let mut start = 0;
        for c in cuts.into_iter().chain(std::iter::once(e.bytes.len())) {
            let mut piece = e.clone();
            piece.bytes = e.bytes[start..c].to_vec();
            piece.total = piece.bytes.len() as u64;
            res.push(piece);
            start = c;
        }
    }
    res
}

/// Gap-free valid conversations from the table, fed in `new()` mode, that never resync
/// (resyncing looks at chunk starts, so it depends on chunk boundaries by design).
fn valid_streams() -> Vec<(&'static str, Vec<Ev>)> {
    cases()
        .into_iter()
        .filter(|c| {
            let (_, st, _) = run(c.resync, &c.evs);
            !c.resync
                && !c.dead
                && st.header_too_large + st.truncated_headers + st.sync_lost + st.bad_framing == 0
                && c.evs
                    .iter()
                    .all(|e| e.total == e.bytes.len() as u64 && !matches!(e.kind, Kind::Flush { .. }))
        })
        .map(|c| (c.name, c.evs))
        .collect()
}

#[test]
fn split_at_every_position_gives_same_exchanges() {
    let streams = valid_streams();
    assert!(streams.len() >= 15, "only {} valid streams", streams.len());
    for (name, evs) in &streams {
        let (whole, whole_stats, _) = run(false, evs);
        assert!(!whole.is_empty(), "{name}");
        for (i, e) in evs.iter().enumerate() {
            for p in 1..e.bytes.len() {
                let split = split_events(evs, |j, _| if j == i { vec![p] } else { vec![] });
                let (got, stats, _) = run(false, &split);
                assert_eq!(got, whole, "{name}: split at {p}");
                assert_eq!(stats.requests, whole_stats.requests, "{name}: split at {p}");
            }
        }
        let one_byte = split_events(evs, |_, len| (1..len).collect());
        let (got, _, _) = run(false, &one_byte);
        assert_eq!(got, whole, "{name}: 1-byte chunks");
    }
}

#[test]
fn chunked_split_at_every_pair_of_positions() {
    let body = chunked_resp();
    let evs = vec![q(1, GET), s(2, &body), q(3, GET), s(4, OK5)];
    let (whole, _, _) = run(false, &evs);
    assert_eq!(whole.len(), 2);
    for a in 1..body.len() {
        for b in a..body.len() {
            let split = split_events(&evs, |j, _| if j == 1 { vec![a, b] } else { vec![] });
            let (got, _, _) = run(false, &split);
            assert_eq!(got, whole, "cuts {a},{b}");
        }
    }
}

#[test]
fn random_splits_of_valid_streams() {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    for (name, evs) in valid_streams() {
        let (whole, _, _) = run(false, &evs);
        for _ in 0..200 {
            let split = split_events(&evs, |_, len| {
                let n = rng.below(6) as usize;
                (0..n).map(|_| rng.below(len as u64) as usize).collect()
            });
            let (got, _, _) = run(false, &split);
            assert_eq!(got, whole, "{name}");
        }
    }
}

fn assert_bounded(out: &[Exchange]) {
    for e in out {
        let r = &e.request;
        assert!(r.method.len() <= MAX_METHOD_LEN);
        assert!(r.target.len() <= MAX_TARGET_BYTES);
        for v in [&r.host, &r.user_agent].into_iter().flatten() {
            assert!(v.len() <= MAX_VALUE_BYTES);
        }
        if let Some(p) = &e.response {
            assert!(!p.interim);
            assert!((100..=999).contains(&p.status));
        }
    }
}

#[test]
fn random_byte_soup_never_panics_or_emits() {
    let mut rng = XorShift(0xDEAD_BEEF_1234_5678 ^ rounds(0) as u64);
    for round in 0..rounds(3000) {
        let resync = round % 2 == 1;
        let mut conn = if resync {
            HttpConn::new_resync()
        } else {
            HttpConn::new()
        };
        let mut out = Vec::new();
        let mut stats = HttpStats::default();
        for i in 0..rng.below(20) {
            let len = rng.below(300) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let c = Chunk {
                captured: &bytes,
                total: if rng.below(4) == 0 {
                    len as u64 + rng.below(1 << 20)
                } else {
                    len as u64
                },
                tid: 1,
                first_ns: i,
                last_ns: i,
            };
            if rng.below(2) == 0 {
                conn.on_request_chunk(&c, &mut out, &mut stats);
            } else {
                conn.on_response_chunk(&c, &mut out, &mut stats);
            }
            conn.flush_idle(i, 1, &mut out, &mut stats);
        }
        conn.on_close(100, &mut out, &mut stats);
        // Random bytes essentially never start with a start line.
        assert!(out.is_empty(), "round {round}: {out:?}");
    }
}

#[test]
fn mutated_valid_streams_never_panic() {
    let mut rng = XorShift(0x0123_4567_89AB_CDEF ^ rounds(0) as u64);
    let streams = valid_streams();
    for round in 0..rounds(4000) {
        let (_, evs) = &streams[round % streams.len()];
        let mut evs = split_events(evs, |_, len| {
            let n = rng.below(4) as usize;
            (0..n).map(|_| rng.below(len as u64) as usize).collect()
        });
        for e in &mut evs {
            if e.bytes.is_empty() {
                continue;
            }
            for _ in 0..rng.below(3) {
                let i = rng.below(e.bytes.len() as u64) as usize;
                e.bytes[i] = match rng.below(4) {
                    0 => b'\r',
                    1 => b'\n',
                    2 => b'0' + rng.below(10) as u8,
                    _ => rng.next() as u8,
                };
            }
            if rng.below(5) == 0 {
                let keep = rng.below(e.bytes.len() as u64 + 1) as usize;
                e.bytes.truncate(keep);
            }
        }
        let (out, _, conn) = run(round % 7 == 0, &evs);
        assert_bounded(&out);
        assert!(conn.pending_requests() <= MAX_PENDING_REQUESTS);
    }
}

#[test]
fn last_chunk_terminator_detection() {
    for (b, want) in [
        (&b"0\r\n\r\n"[..], Some(0)),
        (b"\r\n0\r\n\r\n", Some(2)),
        (b"0000;ext=1\r\n\r\n", Some(0)),
        (b"0\n\n", Some(0)),
        (b"xyz\r\n0\r\nA: 1\r\nB-c: x:y\r\n\r\n", Some(5)),
        (b"0\r\n", None),
        (b"0\r\n\r\n\r\n", None),
        (b"10\r\n\r\n", None),
        (b"x0\r\n\r\n", None),
        (b"0x\r\n\r\n", None),
        (b"00000000000000000\r\n\r\n", None), // 17 digits
        (b"0\r\nnot a trailer\r\n\r\n", None),
        (b"0\r\n: no name\r\n\r\n", None),
        (b"\r\n\r\n", None),
        (b"", None),
        (b"\n", None),
    ] {
        assert_eq!(body::last_chunk_start(b), want, "{:?}", String::from_utf8_lossy(b));
    }
    // Too many trailer lines.
    let many = cat(&[b"0\r\n", "T: 1\r\n".repeat(100).as_bytes(), b"\r\n"]);
    assert_eq!(body::last_chunk_start(&many), None);
}

#[test]
fn resync_point_search() {
    let cases: [(&[u8], Option<usize>); 5] = [
        // Earliest parseable chunk-size line wins.
        (b"ab\r\n3\r\nabc\r\n0\r\n\r\n", Some(4)),
        // "abc\r\n" parses as a size line, but its chunk does not end in the data.
        (b"abc\r\n0\r\n\r\n", Some(5)),
        // Done before the end, then a response start: accepted.
        (b"0\r\n\r\nHTTP/1.1 204 No\r\n\r\n5\r\nx\r\n0\r\n\r\n", Some(0)),
        // Done before the end, then garbage: only the last-chunk line itself.
        (b"0\r\n\r\njunk\r\n0\r\n\r\n", Some(11)),
        (b"1\r\nz\r\n0\r\n\r\n", Some(0)),
    ];
    for (b, want) in cases {
        let at = body::last_chunk_start(b).expect("terminator");
        assert_eq!(body::find_resync(b, at), want, "{:?}", String::from_utf8_lossy(b));
    }
}

#[test]
fn lost_chunked_soup_never_panics() {
    const PIECES: [&[u8]; 12] = [
        b"0",
        b"\r\n",
        b"\n",
        b"1a",
        b"ff;x",
        b"zz",
        b"X-T: 1",
        b"HTTP/1.1 200 OK\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"GET / HTTP/1.1\r\n",
        b"0\r\n\r\n",
        b"\r\n0\r\n\r\n",
    ];
    let mut rng = XorShift(0x5EED_0FC4_A7A7 ^ rounds(0) as u64);
    for round in 0..rounds(3000) {
        let mut conn = HttpConn::new();
        let mut out = Vec::new();
        let mut stats = HttpStats::default();
        let mut started = Vec::new();
        let mut t = 1;
        feed(
            &mut conn,
            &q(t, b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n"),
            &mut out,
            &mut stats,
        );
        t += 1;
        feed(
            &mut conn,
            &sg(t, &cat(&[CHUNKED_HEAD, b"2\r\nxx"]), 500),
            &mut out,
            &mut stats,
        );
        for _ in 0..rng.below(12) {
            t += 1;
            let bytes: Vec<u8> = (0..rng.below(10))
                .flat_map(|_| PIECES[rng.below(12) as usize].to_vec())
                .collect();
            let total = if rng.below(3) == 0 {
                bytes.len() as u64 + rng.below(5000)
            } else {
                bytes.len() as u64
            };
            let kind = if rng.below(6) == 0 { Kind::Req } else { Kind::Resp };
            feed(&mut conn, &ev(kind, t, &bytes, Some(total)), &mut out, &mut stats);
            conn.take_started(&mut started);
        }
        feed(&mut conn, &close(t + 1), &mut out, &mut stats);
        conn.take_started(&mut started);
        assert_bounded(&out);
        assert_eq!(conn.pending_requests(), 0, "round {round}");
        // Every request is reported once, in order; numbers increase.
        let seqs: Vec<u64> = started.iter().map(|r| r.seq).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "round {round}: {seqs:?}");
        for e in &out {
            assert!(seqs.contains(&e.request.seq), "round {round}");
        }
        if let Some(p) = out.first().and_then(|e| e.response.as_ref()) {
            assert!(p.body_bytes <= 500 + 12 * 5000 + 12 * 10 * 30, "round {round}");
        }
    }
}
