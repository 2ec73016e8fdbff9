//! The goroutine rule on scripted kernel streams: a Go service serving two requests at once on
//! shared threads, whose calls are asked for by goroutines the handlers created and written by
//! `net/http`'s per-connection write loops.
use agent_common::go_op;
use sockspan::{
    pipeline::Processor,
    replay::StreamBuilder,
    span::{AttrValue, Span, SpanKind},
    telemetry::Metrics,
};

const LOADGEN: u32 = 100;
const GO: u32 = 200;
const BACKEND: u32 = 300;
const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
/// The Go service's two threads.
const T1: u32 = 1;
const T2: u32 = 2;
/// The load generator's and the backend's threads.
const LOADGEN_TID: u32 = 1000;
const BACKEND_TID: u32 = 3000;

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: s\r\n\r\n").into_bytes()
}

fn path(s: &Span) -> &str {
    match s.attr("url.path") {
        Some(AttrValue::Str(v)) => v.as_ref(),
        _ => "",
    }
}

/// (parent's url.path, sockspan.parent.source) of the Go service's CLIENT span `p`.
fn parent_of(spans: &[Span], p: &str) -> Option<(String, String)> {
    let c = spans
        .iter()
        .find(|s| s.kind == SpanKind::Client && path(s) == p && s.resource.pid == GO)
        .unwrap_or_else(|| panic!("no call {p}"));
    let parent = spans.iter().find(|s| Some(s.span_id) == c.parent_span_id)?;
    let source = match c.attr("sockspan.parent.source") {
        Some(AttrValue::Str(v)) => v.to_string(),
        _ => "-".into(),
    };
    Some((path(parent).to_string(), source))
}

#[test]
fn calls_written_by_write_loops_go_back_to_the_request_their_asker_serves() {
    let mut b = StreamBuilder::new();
    let inbound: Vec<_> = (0..2)
        .map(|i| b.connect(LOADGEN, 10 + i, GO, 20 + i, 40000 + i as u16, 8080))
        .collect();
    let outbound: Vec<_> = (0..2)
        .map(|i| b.connect(GO, 50 + i, BACKEND, 60 + i, 45000 + i as u16, 9090))
        .collect();
    // Both requests read on thread 1, by the connections' goroutines 0xa and 0xb.
    b.goroutines.insert(T1, 0xa);
    b.send_request(&inbound[0], LOADGEN_TID, T1, &get("/a"));
    b.goroutines.insert(T1, 0xb);
    b.send_request(&inbound[1], LOADGEN_TID, T1, &get("/b"));
    // 0xa creates 0x1, which asks for /x (request 0xe1); 0xb asks for /y itself (0xe0). The
    // write loops 0x71 and 0x70 of the pooled connections write them, from the thread the other
    // request was read on.
    b.go(GO, T1, go_op::SPAWN, 0xa, 0x1);
    b.go(GO, T2, go_op::ROUND_TRIP, 0x1, 0xe1);
    b.go(GO, T1, go_op::ROUND_TRIP, 0xb, 0xe0);
    b.go(GO, T1, go_op::REQUEST_WRITE, 0x71, 0xe1);
    b.go(GO, T2, go_op::REQUEST_WRITE, 0x70, 0xe0);
    b.goroutines.insert(T1, 0x71);
    b.send_request(&outbound[1], T1, BACKEND_TID, &get("/x"));
    b.goroutines.insert(T2, 0x70);
    b.send_request(&outbound[0], T2, BACKEND_TID, &get("/y"));
    b.goroutines.clear();
    for c in [&outbound[0], &outbound[1]] {
        b.send_response(c, BACKEND_TID, T2, OK);
    }
    b.goroutines.insert(T2, 0xb);
    b.send_response(&inbound[1], T2, LOADGEN_TID, OK);
    b.goroutines.insert(T2, 0xa);
    b.send_response(&inbound[0], T2, LOADGEN_TID, OK);

    let mut p = Processor::offline(Metrics::new());
    let mut spans = Vec::new();
    p.process(&b.batch, &mut spans);
    p.finish(&mut spans);
    assert_eq!(parent_of(&spans, "/x"), Some(("/a".into(), "goroutine".into())));
    assert_eq!(parent_of(&spans, "/y"), Some(("/b".into(), "goroutine".into())));
    let st = p.conns.go.stats;
    assert_eq!((st.spawns, st.round_trips, st.request_writes, st.chains), (1, 2, 2, 2));
}
