//! Replay tests: recorded and synthetic kernel event streams pushed through every userspace
//! stage (decode → conn → http → span → stitch), no kernel and no root needed.
use std::collections::HashMap;

use sockspan::{
    pipeline::Processor,
    reader::RawBatch,
    replay::{StreamBuilder, read_recording},
    span::{AttrValue, Span, SpanKind, SpanOptions},
    telemetry::Metrics,
};

/// Spans keep their paths as sent: the scripts find them by path.
const RAW_PATHS: SpanOptions = SpanOptions {
    keep_query_values: false,
    keep_path: true,
    routes: Vec::new(),
};

fn run(batches: &[RawBatch]) -> Vec<Span> {
    let mut p = Processor::offline_with(Metrics::new(), RAW_PATHS);
    let mut spans = Vec::new();
    for b in batches {
        p.process(b, &mut spans);
    }
    p.finish(&mut spans);
    spans
}

fn str_attr<'a>(s: &'a Span, key: &str) -> Option<&'a str> {
    match s.attr(key) {
        Some(AttrValue::Str(v)) => Some(v.as_ref()),
        _ => None,
    }
}

fn int_attr(s: &Span, key: &str) -> Option<i64> {
    match s.attr(key) {
        Some(AttrValue::Int(v)) => Some(*v),
        _ => None,
    }
}

/// A configured route names the server spans whose path it matches and is their `http.route`;
/// client spans, and server spans it does not match, keep the generalised path and no route.
#[test]
fn configured_routes_name_server_spans() {
    let file = std::fs::File::open(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/replay/chain.rec"
    ))
    .unwrap();
    let opts = SpanOptions {
        routes: vec![sockspan::routes::RoutePattern::parse("/replay/{order}").unwrap()],
        ..SpanOptions::default()
    };
    let mut p = Processor::offline_with(Metrics::new(), opts);
    let mut spans = Vec::new();
    for b in &read_recording(file, 16).unwrap() {
        p.process(b, &mut spans);
    }
    p.finish(&mut spans);
    let named = |kind: SpanKind, svc: &str| -> Vec<(String, Option<String>)> {
        spans
            .iter()
            .filter(|s| s.kind == kind && s.resource.service_name == svc)
            .map(|s| (s.name.clone(), str_attr(s, "http.route").map(str::to_owned)))
            .collect()
    };
    let python = named(SpanKind::Server, "python3");
    assert!(
        python.contains(&("GET /replay/{order}".to_owned(), Some("/replay/{order}".to_owned()))),
        "{python:?}"
    );
    for (name, route) in named(SpanKind::Client, "curl") {
        assert!(
            route.is_none() && !name.contains("{order}"),
            "a client span: {name} {route:?}"
        );
    }
    for (name, route) in named(SpanKind::Server, "nginx") {
        assert_eq!((name.as_str(), route), ("GET /down/replay/{id}", None));
    }
}

/// Recorded on a real machine: curl → python (thread per request) → nginx (reverse proxy) →
/// node, twice; and curl → python http.server with secrets in headers and query, and a 404.
#[test]
fn recorded_chain_replays_into_whole_traces() {
    let file = std::fs::File::open(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/replay/chain.rec"
    ))
    .unwrap();
    let spans = run(&read_recording(file, 16).unwrap());
    assert_eq!(spans.len(), 16, "one span per exchange end");
    let by_id: HashMap<[u8; 8], &Span> = spans.iter().map(|s| (s.span_id, s)).collect();

    for id in ["r0001abcdef", "r0002abcdef"] {
        let trace: Vec<&Span> = spans
            .iter()
            .filter(|s| str_attr(s, "url.path").is_some_and(|p| p.ends_with(id)))
            .collect();
        assert_eq!(trace.len(), 6, "{id}: curl, python in and out, nginx in and out, node");
        let root: Vec<&&Span> = trace.iter().filter(|s| s.parent_span_id.is_none()).collect();
        assert_eq!(root.len(), 1, "{id}: one root");
        assert_eq!(root[0].kind, SpanKind::Client);
        assert_eq!(root[0].resource.service_name, "curl");
        for s in &trace {
            assert_eq!(s.trace_id, root[0].trace_id, "{id}: one trace");
            if let Some(p) = s.parent_span_id {
                let parent = by_id[&p];
                // Alternating kinds down the chain: CLIENT → SERVER → CLIENT ...
                assert_ne!(parent.kind, s.kind, "{id}: {} under {}", s.name, parent.name);
                assert!(
                    parent.start_unix_ns <= s.start_unix_ns && s.end_unix_ns <= parent.end_unix_ns,
                    "{id}: child within parent"
                );
                let source = str_attr(s, "sockspan.parent.source").unwrap();
                assert_eq!(
                    source,
                    if s.kind == SpanKind::Server {
                        "connection"
                    } else {
                        "thread"
                    }
                );
            }
        }
        let leaf = trace.iter().find(|s| s.resource.service_name == "node").unwrap();
        assert_eq!(leaf.name, "GET /down/replay/{id}");
        assert_eq!(int_attr(leaf, "http.response.status_code"), Some(200));
    }

    let static_spans: Vec<&Span> = spans
        .iter()
        .filter(|s| int_attr(s, "server.port") == Some(18070))
        .collect();
    assert_eq!(static_spans.len(), 4);
    let index = static_spans
        .iter()
        .find(|s| s.kind == SpanKind::Server && str_attr(s, "url.path") == Some("/index.html"))
        .unwrap();
    assert_eq!(str_attr(index, "url.query"), Some("token=REDACTED"));
    let missing: Vec<&&Span> = static_spans
        .iter()
        .filter(|s| int_attr(s, "http.response.status_code") == Some(404))
        .collect();
    assert_eq!(missing.len(), 2);
    for s in missing {
        assert_eq!(
            s.error,
            s.kind == SpanKind::Client,
            "404 is an error for the client only"
        );
    }
    let dump = format!("{spans:?}");
    for secret in ["SECRETX", "SECRETY", "SECRETZ"] {
        assert!(!dump.contains(secret), "{secret} leaked into a span");
    }
}

/// Three pipelined requests in one write, answered in one write: three exchanges per side,
/// paired in order, each server span the child of its client span.
#[test]
fn pipelined_requests_pair_in_order() {
    let mut b = StreamBuilder::new();
    let c = b.connect(100, 5, 200, 7, 41000, 8080);
    let reqs: String = (1..=3)
        .map(|i| format!("GET /p/{i} HTTP/1.1\r\nHost: s\r\n\r\n"))
        .collect();
    b.send_request(&c, 100, 200, reqs.as_bytes());
    let resps: String = [200, 404, 500]
        .iter()
        .map(|code| format!("HTTP/1.1 {code} X\r\nContent-Length: 3\r\n\r\nabc"))
        .collect();
    b.send_response(&c, 200, 100, resps.as_bytes());
    b.close(&c);
    let spans = run(&[b.batch]);
    assert_eq!(spans.len(), 6);
    for (i, code) in [(1, 200), (2, 404), (3, 500)] {
        let path = format!("/p/{i}");
        let server = spans
            .iter()
            .find(|s| s.kind == SpanKind::Server && str_attr(s, "url.path") == Some(&path))
            .unwrap();
        let client = spans
            .iter()
            .find(|s| s.kind == SpanKind::Client && str_attr(s, "url.path") == Some(&path))
            .unwrap();
        assert_eq!(int_attr(server, "http.response.status_code"), Some(code));
        assert_eq!(int_attr(client, "http.response.status_code"), Some(code));
        assert_eq!(server.parent_span_id, Some(client.span_id));
        assert_eq!(server.error, code >= 500);
        assert_eq!(client.error, code >= 400);
    }
}

/// A body that looks like HTTP never makes a span; a keep-alive connection carries on.
#[test]
fn body_bytes_never_make_spans() {
    let mut b = StreamBuilder::new();
    let c = b.connect(100, 5, 200, 7, 41001, 8080);
    let body = "GET /fake HTTP/1.1\r\n\r\nHTTP/1.1 200 OK\r\n\r\n";
    let post = format!("POST /upload HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    b.send_request(&c, 100, 200, post.as_bytes());
    b.send_response(&c, 200, 100, b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n");
    b.exchange(
        &c,
        b"GET /next HTTP/1.1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    );
    let spans = run(&[b.batch]);
    let mut names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["GET /next", "GET /next", "POST /upload", "POST /upload"]);
    let server_post = spans
        .iter()
        .find(|s| s.kind == SpanKind::Server && s.name == "POST /upload")
        .unwrap();
    assert_eq!(int_attr(server_post, "http.request.body.size"), Some(body.len() as i64));
}

/// Binary protocols stop being parsed, counted, and never produce a span.
#[test]
fn binary_traffic_is_counted_not_traced() {
    let mut b = StreamBuilder::new();
    let c = b.connect(100, 5, 200, 7, 41002, 6379);
    b.exchange(&c, b"*1\r\n$4\r\nPING\r\n", b"+PONG\r\n");
    b.exchange(
        &c,
        &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00],
        &[0x16, 0x03, 0x03, 0x00],
    );
    let metrics = Metrics::new();
    let mut p = Processor::offline_with(metrics.clone(), RAW_PATHS);
    let mut spans = Vec::new();
    p.process(&b.batch, &mut spans);
    p.finish(&mut spans);
    assert!(spans.is_empty());
    assert!(
        metrics
            .render()
            .lines()
            .any(|l| l.starts_with("sockspan_http_rejected_total{reason=\"not_http\"}") && !l.ends_with(" 0"))
    );
}

/// A connection that predates the agent (side unknown to the kernel) joins at the next
/// request: the side is inferred from the first bytes.
#[test]
fn preexisting_connection_joins_at_next_request() {
    let mut b = StreamBuilder::new();
    let c = b.connect(100, 5, 200, 7, 41003, 8080);
    // Mid-body bytes of an earlier response first, then a full exchange; sides unknown.
    b.data(
        200,
        200,
        7,
        c.server_sock,
        0,
        true,
        b"tail of an old body",
        19,
        "server",
    );
    b.data(
        100,
        100,
        5,
        c.client_sock,
        0,
        false,
        b"tail of an old body",
        19,
        "client",
    );
    let req = b"GET /again HTTP/1.1\r\nHost: s\r\n\r\n";
    let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
    b.data(100, 100, 5, c.client_sock, 0, true, req, req.len(), "client");
    b.data(200, 200, 7, c.server_sock, 0, false, req, req.len(), "server");
    b.data(200, 200, 7, c.server_sock, 0, true, resp, resp.len(), "server");
    b.data(100, 100, 5, c.client_sock, 0, false, resp, resp.len(), "client");
    let spans = run(&[b.batch]);
    assert_eq!(spans.len(), 2);
    assert!(
        spans
            .iter()
            .any(|s| s.kind == SpanKind::Server && s.name == "GET /again")
    );
    assert!(
        spans
            .iter()
            .any(|s| s.kind == SpanKind::Client && s.name == "GET /again")
    );
}

/// The agent's own export connection is not traced at the collector's end, but another
/// connection that reuses the agent's ephemeral port towards another peer is.
#[test]
fn own_export_ignored_but_its_port_reused_elsewhere_is_traced() {
    let agent_pid = 999;
    let (agent_sock, collector_sock) = (0xa000, 0xb000);
    let mut b = StreamBuilder::new();
    // agent 127.0.0.1:40000 → collector (pid 300) on :4317. Only the collector's syscalls are
    // seen: the agent's own are excluded in the kernel.
    b.established(agent_sock, 40000, 4317, agent_pid);
    b.established(collector_sock, 4317, 40000, 0);
    let post = b"POST /v1/traces HTTP/1.1\r\nHost: c\r\nContent-Length: 0\r\n\r\n";
    let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
    b.data(300, 300, 11, collector_sock, 1, false, post, post.len(), "collector");
    b.data(300, 300, 11, collector_sock, 1, true, ok, ok.len(), "collector");
    // Meanwhile a client reuses local port 40000 towards another server.
    let c = b.connect(100, 5, 200, 7, 40000, 8080);
    b.exchange(&c, b"GET /shared-port HTTP/1.1\r\nHost: s\r\n\r\n", ok);

    let mut p = Processor::offline_with(Metrics::new(), RAW_PATHS);
    p.conns.set_own_pid(agent_pid);
    let mut spans = Vec::new();
    p.process(&b.batch, &mut spans);
    p.finish(&mut spans);
    let names: Vec<(SpanKind, &str)> = spans.iter().map(|s| (s.kind, s.name.as_str())).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.iter().all(|(_, n)| *n == "GET /shared-port"), "{names:?}");
}
