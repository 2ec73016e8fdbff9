use std::{collections::HashMap, sync::Arc};

use super::*;
use crate::{process::ProcessInfo, span::SpanKind};

fn ep(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[expect(clippy::too_many_arguments, reason = "test fixture mirrors the struct")]
fn start(
    conn_id: u64,
    seq: u64,
    side: Side,
    pid: u32,
    tid: u32,
    t: u64,
    target: &str,
    link: (u16, u16),
) -> RequestStart {
    RequestStart {
        conn_id,
        seq,
        side,
        pid,
        tid,
        start_ns: t,
        method: "GET".into(),
        target: target.into(),
        context: None,
        link: Some((ep(link.0), ep(link.1))),
        aligned: true,
        peer: Some(ep(if side == Side::Client { link.1 } else { link.0 })),
        loop_hint: None,
        goroutine: 0,
        go_chain: None,
        go_program: false,
    }
}

fn done(conn_id: u64, seq: u64, side: Side, t: u64) -> Finished {
    let resource = Arc::new(ProcessInfo {
        pid: 1,
        service_name: "s".into(),
        executable_name: "s".into(),
        host_name: "h".into(),
        container_id: None,
        pod: None,
    });
    let span = Span {
        trace_id: [9; 16],
        span_id: [9; 8],
        parent_span_id: None,
        kind: if side == Side::Server {
            SpanKind::Server
        } else {
            SpanKind::Client
        },
        name: format!("{conn_id}/{seq}"),
        start_unix_ns: 0,
        end_unix_ns: 0,
        attributes: Vec::new(),
        error: false,
        resource,
        links: Vec::new(),
        upstream_sampled: None,
    };
    Finished {
        span,
        conn_id,
        seq,
        side,
        end_ns: t,
        answered: true,
    }
}

fn source(s: &Span) -> Option<&str> {
    match s.attr(crate::vocab::attr::SOCKSPAN_PARENT_SOURCE) {
        Some(AttrValue::Str(v)) => Some(v.as_ref()),
        _ => None,
    }
}

/// One step of a scripted stream.
type Step = Box<dyn FnOnce(&mut Stitcher)>;

fn run(items: Vec<Step>) -> HashMap<String, Span> {
    let mut st = Stitcher::new(IdGenerator::seeded(7));
    for f in items {
        f(&mut st);
    }
    let mut out = Vec::new();
    st.flush(&mut out);
    out.into_iter().map(|s| (s.name.clone(), s)).collect()
}

/// curl (pid 1) → A (pid 2, thread 20) → B (pid 3): connection, thread, connection.
#[test]
fn chain_across_processes() {
    let spans = run(vec![
        Box::new(|s| s.push_start(start(1, 0, Side::Client, 1, 10, 100, "/a", (5000, 8000)))),
        Box::new(|s| s.push_start(start(2, 0, Side::Server, 2, 20, 110, "/a", (5000, 8000)))),
        Box::new(|s| s.push_start(start(3, 0, Side::Client, 2, 20, 120, "/b", (5001, 9000)))),
        Box::new(|s| s.push_start(start(4, 0, Side::Server, 3, 30, 130, "/b", (5001, 9000)))),
        Box::new(|s| s.push_done(done(4, 0, Side::Server, 140))),
        Box::new(|s| s.push_done(done(3, 0, Side::Client, 150))),
        Box::new(|s| s.push_answering(2, 0, 155, 20)),
        Box::new(|s| s.push_done(done(2, 0, Side::Server, 160))),
        Box::new(|s| s.push_done(done(1, 0, Side::Client, 170))),
    ]);
    let (c1, s1, c2, s2) = (&spans["1/0"], &spans["2/0"], &spans["3/0"], &spans["4/0"]);
    assert_eq!(c1.parent_span_id, None);
    assert_eq!(s1.parent_span_id, Some(c1.span_id));
    assert_eq!(source(s1), Some("connection"));
    assert_eq!(c2.parent_span_id, Some(s1.span_id));
    assert_eq!(source(c2), Some("thread"));
    assert_eq!(s2.parent_span_id, Some(c2.span_id));
    for s in [s1, c2, s2] {
        assert_eq!(s.trace_id, c1.trace_id);
    }
}

/// A Go server (pid 2) serves two requests at once, read by goroutines 0xa and 0xb on threads
/// that say nothing. A call asked for by a goroutine that 0xa created while serving its request
/// is that request's child, several creations down; one asked for by a worker that 0xb created
/// before its current request began (a background goroutine) is nobody's.
#[test]
fn goroutine_chains_lead_to_the_request_their_creator_was_serving() {
    use crate::goroutines::{GoChain, MAX_DEPTH};
    fn chain(links: &[(u64, u64)]) -> Option<Box<GoChain>> {
        let mut c = GoChain {
            links: [(0, 0); MAX_DEPTH],
            len: links.len(),
        };
        c.links[..links.len()].copy_from_slice(links);
        Some(Box::new(c))
    }
    let server = |conn, g, t, target: &'static str, port| {
        let mut st = start(conn, 0, Side::Server, 2, 20 + conn as u32, t, target, (port, 8000));
        st.goroutine = g;
        st
    };
    let call = |conn, t, target: &'static str, port, links: &'static [(u64, u64)]| {
        let mut st = start(conn, 0, Side::Client, 2, 29, t, target, (port, 9000));
        st.go_chain = chain(links);
        st
    };
    let spans = run(vec![
        Box::new(move |s| s.push_start(server(1, 0xa, 100, "/a", 5000))),
        Box::new(move |s| s.push_start(server(2, 0xb, 110, "/b", 5001))),
        // 0xa created 0x1 at 120, which created 0x2 at 130, which asked for the call
        Box::new(move |s| s.push_start(call(3, 140, "/x", 6000, &[(0x2, u64::MAX), (0x1, 130), (0xa, 120)]))),
        // 0xb created 0x3 at 50, before its request began at 110
        Box::new(move |s| s.push_start(call(4, 150, "/y", 6001, &[(0x3, u64::MAX), (0xb, 50)]))),
        // 0xb asks itself
        Box::new(move |s| s.push_start(call(5, 160, "/z", 6002, &[(0xb, u64::MAX)]))),
        Box::new(|s| s.push_done(done(3, 0, Side::Client, 170))),
        Box::new(|s| s.push_done(done(4, 0, Side::Client, 171))),
        Box::new(|s| s.push_done(done(5, 0, Side::Client, 172))),
        Box::new(|s| s.push_done(done(1, 0, Side::Server, 180))),
        Box::new(|s| s.push_done(done(2, 0, Side::Server, 181))),
    ]);
    let (a, b) = (&spans["1/0"], &spans["2/0"]);
    assert_eq!(spans["3/0"].parent_span_id, Some(a.span_id));
    assert_eq!(source(&spans["3/0"]), Some("goroutine"));
    assert_eq!(spans["4/0"].parent_span_id, None, "a goroutine older than the request");
    assert_eq!(spans["5/0"].parent_span_id, Some(b.span_id));
}

/// Items arrive out of order (server read before the client's write event): sorted by time.
#[test]
fn reorders_by_timestamp() {
    let spans = run(vec![
        Box::new(|s| s.push_start(start(2, 0, Side::Server, 2, 20, 110, "/a", (5000, 8000)))),
        Box::new(|s| s.push_start(start(1, 0, Side::Client, 1, 10, 100, "/a", (5000, 8000)))),
        Box::new(|s| s.push_done(done(2, 0, Side::Server, 160))),
        Box::new(|s| s.push_done(done(1, 0, Side::Client, 170))),
    ]);
    assert_eq!(spans["2/0"].parent_span_id, Some(spans["1/0"].span_id));
}

#[test]
fn keep_alive_pairs_by_order() {
    let mut items: Vec<Step> = Vec::new();
    for seq in 0..3u64 {
        let t = 1000 * (seq + 1);
        items.push(Box::new(move |s| {
            s.push_start(start(1, seq, Side::Client, 1, 10, t, "/k", (5000, 8000)))
        }));
        items.push(Box::new(move |s| {
            s.push_start(start(2, seq, Side::Server, 2, 20, t + 10, "/k", (5000, 8000)))
        }));
        items.push(Box::new(move |s| s.push_done(done(2, seq, Side::Server, t + 20))));
        items.push(Box::new(move |s| s.push_done(done(1, seq, Side::Client, t + 30))));
    }
    let spans = run(items);
    for seq in 0..3 {
        assert_eq!(
            spans[&format!("2/{seq}")].parent_span_id,
            Some(spans[&format!("1/{seq}")].span_id)
        );
    }
}

#[test]
fn traceparent_wins() {
    let spans = run(vec![
        Box::new(|s| s.push_start(start(1, 0, Side::Client, 1, 10, 100, "/a", (5000, 8000)))),
        Box::new(|s| {
            let mut r = start(2, 0, Side::Server, 2, 20, 110, "/a", (5000, 8000));
            r.context = context::parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
            s.push_start(r)
        }),
        Box::new(|s| s.push_done(done(2, 0, Side::Server, 160))),
        Box::new(|s| s.push_done(done(1, 0, Side::Client, 170))),
    ]);
    let s1 = &spans["2/0"];
    assert_eq!(
        s1.parent_span_id,
        Some([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7])
    );
    assert_eq!(s1.trace_id[0], 0x4b);
    assert_eq!(source(s1), Some("traceparent"));
}

/// An event loop with two requests in flight on one thread: the thread rule abstains, the
/// request line decides; with no match, no parent.
#[test]
fn event_loop_uses_request_line_or_abstains() {
    let spans = run(vec![
        Box::new(|s| s.push_start(start(1, 0, Side::Server, 2, 20, 100, "/x/r0001abc", (5000, 8000)))),
        Box::new(|s| s.push_start(start(2, 0, Side::Server, 2, 20, 101, "/x/r0002bcd", (5001, 8000)))),
        Box::new(|s| s.push_start(start(3, 0, Side::Client, 2, 20, 110, "/x/r0002bcd", (5002, 9000)))),
        Box::new(|s| s.push_start(start(4, 0, Side::Client, 2, 20, 111, "/other", (5003, 9000)))),
        Box::new(|s| {
            s.push_start(start(
                5,
                0,
                Side::Client,
                2,
                20,
                112,
                "/inventory/r0001abc?x=1",
                (5004, 9000),
            ))
        }),
        Box::new(|s| s.push_done(done(3, 0, Side::Client, 150))),
        Box::new(|s| s.push_done(done(4, 0, Side::Client, 151))),
        Box::new(|s| s.push_done(done(5, 0, Side::Client, 152))),
        Box::new(|s| s.push_done(done(1, 0, Side::Server, 160))),
        Box::new(|s| s.push_done(done(2, 0, Side::Server, 161))),
    ]);
    assert_eq!(spans["3/0"].parent_span_id, Some(spans["2/0"].span_id));
    assert_eq!(source(&spans["3/0"]), Some("proxy"));
    assert_eq!(source(&spans["4/0"]), None);
    assert_eq!(spans["4/0"].parent_span_id, None);
    assert_eq!(spans["5/0"].parent_span_id, Some(spans["1/0"].span_id));
}

/// A server that already began answering is no longer the context of its thread's calls.
#[test]
fn answered_request_is_not_a_parent() {
    let spans = run(vec![
        Box::new(|s| s.push_start(start(1, 0, Side::Server, 2, 20, 100, "/a", (5000, 8000)))),
        Box::new(|s| s.push_answering(1, 0, 105, 20)),
        Box::new(|s| s.push_start(start(2, 0, Side::Client, 2, 20, 110, "/background", (5001, 9000)))),
        Box::new(|s| s.push_done(done(1, 0, Side::Server, 120))),
        Box::new(|s| s.push_done(done(2, 0, Side::Client, 130))),
    ]);
    assert_eq!(spans["2/0"].parent_span_id, None);
}

/// A process that answered a request from another thread than the one that read it (Go's
/// goroutines move between threads) gets no parents by thread any more: a thread that read one
/// request may be writing a call for another. The proxy rule still applies.
#[test]
fn no_thread_rule_once_requests_move_between_threads() {
    // Request 1 is read on thread 20 and answered from `answer_tid`; request 2 is read on thread
    // 20, which then writes a call (3); thread 22 writes a call with request 2's line (4).
    let stream = |answer_tid: u32| -> Vec<Step> {
        vec![
            Box::new(|s| s.push_start(start(1, 0, Side::Server, 2, 20, 100, "/first", (5000, 8000)))),
            Box::new(move |s| s.push_answering(1, 0, 105, answer_tid)),
            Box::new(|s| s.push_done(done(1, 0, Side::Server, 106))),
            Box::new(|s| s.push_start(start(2, 0, Side::Server, 2, 20, 110, "/second", (5001, 8000)))),
            Box::new(|s| s.push_start(start(3, 0, Side::Client, 2, 20, 120, "/elsewhere", (5002, 9000)))),
            Box::new(|s| s.push_start(start(4, 0, Side::Client, 2, 22, 121, "/second", (5003, 9000)))),
            Box::new(|s| s.push_done(done(3, 0, Side::Client, 130))),
            Box::new(|s| s.push_done(done(4, 0, Side::Client, 131))),
            Box::new(|s| s.push_done(done(2, 0, Side::Server, 140))),
        ]
    };
    let moved = run(stream(21));
    assert_eq!(moved["3/0"].parent_span_id, None, "no parent by thread");
    assert_eq!(moved["4/0"].parent_span_id, Some(moved["2/0"].span_id));
    assert_eq!(source(&moved["4/0"]), Some("proxy"));

    let stayed = run(stream(20));
    assert_eq!(stayed["3/0"].parent_span_id, Some(stayed["2/0"].span_id));
    assert_eq!(source(&stayed["3/0"]), Some("thread"));
    assert_eq!(stayed["4/0"].parent_span_id, Some(stayed["2/0"].span_id));
}

/// A Go program's thread says nothing of the request a call serves, even before any answer
/// showed a request moving between threads (the process was serving before the agent started).
#[test]
fn no_thread_rule_in_go_programs() {
    let go = |mut s: RequestStart| {
        s.go_program = true;
        s
    };
    let spans = run(vec![
        Box::new(move |s| s.push_start(go(start(1, 0, Side::Server, 2, 20, 100, "/a", (5000, 8000))))),
        Box::new(move |s| s.push_start(go(start(2, 0, Side::Client, 2, 20, 110, "/b", (5001, 9000))))),
        Box::new(|s| s.push_done(done(2, 0, Side::Client, 120))),
        Box::new(|s| s.push_answering(1, 0, 125, 20)),
        Box::new(|s| s.push_done(done(1, 0, Side::Server, 130))),
    ]);
    assert_eq!(spans["2/0"].parent_span_id, None);
}

/// A request on a connection that predates the agent: numbering starts at the first request
/// each end saw, which may differ by one.
fn unaligned(mut s: RequestStart) -> RequestStart {
    s.aligned = false;
    s
}

/// Pre-existing keep-alive connection: each server request pairs with the client request in
/// flight on it; a server request whose client request was not seen gets no parent, and the
/// numbering offset that leaves does not shift the pairs after it.
#[test]
fn preexisting_connection_pairs_in_flight_requests() {
    let link = (5000, 8000);
    let spans = run(vec![
        // the server saw request k (written before the agent started), the client did not
        Box::new(move |s| s.push_start(unaligned(start(2, 0, Side::Server, 2, 20, 110, "/a", link)))),
        Box::new(|s| s.push_done(done(2, 0, Side::Server, 120))),
        // request k+1: client seq 0, server seq 1
        Box::new(move |s| s.push_start(unaligned(start(1, 0, Side::Client, 1, 10, 200, "/a", link)))),
        Box::new(move |s| s.push_start(unaligned(start(2, 1, Side::Server, 2, 20, 210, "/a", link)))),
        Box::new(|s| s.push_done(done(2, 1, Side::Server, 220))),
        Box::new(|s| s.push_done(done(1, 0, Side::Client, 230))),
        // a client request whose server side is lost, then the next one
        Box::new(move |s| s.push_start(unaligned(start(1, 1, Side::Client, 1, 10, 300, "/a", link)))),
        Box::new(|s| s.push_done(done(1, 1, Side::Client, 330))),
        Box::new(move |s| s.push_start(unaligned(start(1, 2, Side::Client, 1, 10, 400, "/a", link)))),
        Box::new(move |s| s.push_start(unaligned(start(2, 2, Side::Server, 2, 20, 410, "/a", link)))),
        Box::new(|s| s.push_done(done(2, 2, Side::Server, 420))),
        Box::new(|s| s.push_done(done(1, 2, Side::Client, 430))),
        // a different request line on the other end is never paired
        Box::new(move |s| s.push_start(unaligned(start(1, 3, Side::Client, 1, 10, 500, "/b", link)))),
        Box::new(move |s| s.push_start(unaligned(start(2, 3, Side::Server, 2, 20, 510, "/c", link)))),
        Box::new(|s| s.push_done(done(2, 3, Side::Server, 520))),
        Box::new(|s| s.push_done(done(1, 3, Side::Client, 530))),
    ]);
    assert_eq!(spans["2/0"].parent_span_id, None);
    assert_eq!(spans["2/1"].parent_span_id, Some(spans["1/0"].span_id));
    assert_eq!(source(&spans["2/1"]), Some("connection"));
    assert_eq!(spans["2/2"].parent_span_id, Some(spans["1/2"].span_id));
    assert_eq!(spans["2/3"].parent_span_id, None);
}

#[test]
fn retries_carry_resend_count() {
    let spans = run(vec![
        Box::new(|s| s.push_start(start(1, 0, Side::Server, 2, 20, 100, "/a", (5000, 8000)))),
        Box::new(|s| s.push_start(start(2, 0, Side::Client, 2, 20, 110, "/slow", (5001, 9000)))),
        Box::new(|s| s.push_done(done(2, 0, Side::Client, 120))),
        Box::new(|s| s.push_start(start(3, 0, Side::Client, 2, 20, 130, "/slow", (5002, 9000)))),
        Box::new(|s| s.push_done(done(3, 0, Side::Client, 140))),
        Box::new(|s| s.push_start(start(4, 0, Side::Client, 2, 20, 150, "/slow", (5003, 9000)))),
        Box::new(|s| s.push_done(done(4, 0, Side::Client, 160))),
        Box::new(|s| s.push_done(done(1, 0, Side::Server, 170))),
    ]);
    assert_eq!(spans["2/0"].attr(crate::vocab::attr::HTTP_REQUEST_RESEND_COUNT), None);
    assert_eq!(
        spans["3/0"].attr(crate::vocab::attr::HTTP_REQUEST_RESEND_COUNT),
        Some(&AttrValue::Int(1))
    );
    assert_eq!(
        spans["4/0"].attr(crate::vocab::attr::HTTP_REQUEST_RESEND_COUNT),
        Some(&AttrValue::Int(2))
    );
}

#[test]
fn release_waits_for_the_reorder_window() {
    let mut st = Stitcher::new(IdGenerator::seeded(1));
    st.push_start(start(1, 0, Side::Client, 1, 10, 1_000_000_000, "/a", (5000, 8000)));
    st.push_done(done(1, 0, Side::Client, 1_001_000_000));
    let mut out = Vec::new();
    st.release_some(1_001_000_000, usize::MAX, &mut out);
    assert!(out.is_empty(), "held within the window");
    st.release_some(2_000_000_000, usize::MAX, &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(st.in_flight(), 0);
}

/// A client that gives up (no response) does not unlink or cut short the server span, which
/// answers later to a closed connection.
#[test]
fn client_that_gave_up_keeps_its_server_child() {
    let mut gave_up = done(1, 0, Side::Client, 400);
    gave_up.answered = false;
    gave_up.span.start_unix_ns = 100;
    gave_up.span.end_unix_ns = 400;
    let mut late = done(2, 0, Side::Server, 700);
    late.span.start_unix_ns = 110;
    late.span.end_unix_ns = 700;
    let spans = run(vec![
        Box::new(|s| s.push_start(start(1, 0, Side::Client, 1, 10, 100, "/pay", (5000, 8000)))),
        Box::new(|s| s.push_start(start(2, 0, Side::Server, 2, 20, 110, "/pay", (5000, 8000)))),
        Box::new(move |s| s.push_done(gave_up)),
        Box::new(move |s| s.push_done(late)),
    ]);
    let server = &spans["2/0"];
    assert_eq!(server.parent_span_id, Some(spans["1/0"].span_id));
    assert_eq!(
        server.end_unix_ns, 700,
        "not clamped into a client that stopped waiting"
    );
}

/// The server's last write returns after its client already read the last byte: the server span
/// is kept inside its client span (the byte left the server before the client read it).
#[test]
fn server_span_kept_inside_its_client_span() {
    let with_times = |mut f: Finished, start: u64| {
        f.span.start_unix_ns = start;
        f.span.end_unix_ns = f.end_ns;
        f
    };
    let spans = run(vec![
        Box::new(|s| s.push_start(start(1, 0, Side::Client, 1, 10, 100, "/a", (5000, 8000)))),
        Box::new(|s| s.push_start(start(2, 0, Side::Server, 2, 20, 110, "/a", (5000, 8000)))),
        Box::new(move |s| s.push_done(with_times(done(1, 0, Side::Client, 200), 100))),
        Box::new(move |s| s.push_done(with_times(done(2, 0, Side::Server, 205), 110))),
    ]);
    let (client, server) = (&spans["1/0"], &spans["2/0"]);
    assert_eq!(server.parent_span_id, Some(client.span_id));
    assert_eq!((server.start_unix_ns, server.end_unix_ns), (110, 200));
}

/// Nothing is kept for the other end of a pair once both are done, in either order, nor for a
/// client no server took: kept times would stay until they aged out.
#[test]
fn pairing_keeps_nothing_once_both_ends_are_done() {
    let mut st = Stitcher::new(IdGenerator::seeded(1));
    let mut out = Vec::new();
    // Server done first (the usual order), then the other way round, then a lone client.
    st.push_start(start(1, 0, Side::Client, 1, 10, 100, "/a", (5000, 8000)));
    st.push_start(start(2, 0, Side::Server, 2, 20, 110, "/a", (5000, 8000)));
    st.push_done(done(2, 0, Side::Server, 190));
    st.push_done(done(1, 0, Side::Client, 200));
    st.push_start(start(3, 0, Side::Client, 1, 10, 300, "/b", (5001, 8000)));
    st.push_start(start(4, 0, Side::Server, 2, 20, 310, "/b", (5001, 8000)));
    st.push_done(done(3, 0, Side::Client, 400));
    st.push_done(done(4, 0, Side::Server, 405));
    st.push_start(start(5, 0, Side::Client, 1, 10, 500, "/c", (5002, 9000)));
    st.push_done(done(5, 0, Side::Client, 600));
    st.flush(&mut out);
    assert_eq!(out.len(), 5);
    let by_id: std::collections::HashMap<_, _> = out.iter().map(|s| (s.span_id, s)).collect();
    let paired = out
        .iter()
        .filter(|s| s.parent_span_id.is_some_and(|p| by_id.contains_key(&p)))
        .count();
    assert_eq!(paired, 2, "both servers have their client as parent");
    assert_eq!(st.pairing.kept(), 0);
}

/// Connections shed under the memory budget take everything kept for their requests with
/// them, decided or still held in the reorder window, and build no spans; the rest go on.
#[test]
fn abandoned_connections_leave_no_state_and_no_spans() {
    let mut st = Stitcher::new(IdGenerator::seeded(1));
    // Connection 1: a client request decided (released), connection 2 its server end, decided
    // too; connection 3: a server request held in the window, with its span finished.
    st.push_start(start(1, 0, Side::Client, 1, 10, 100, "/a", (5000, 8000)));
    st.push_start(start(2, 0, Side::Server, 2, 20, 110, "/a", (5000, 8000)));
    let mut out = Vec::new();
    st.flush(&mut out);
    st.push_start(start(3, 0, Side::Server, 2, 21, 120, "/b", (5001, 8000)));
    st.push_done(done(3, 0, Side::Server, 130));
    st.push_start(start(4, 0, Side::Server, 2, 22, 140, "/c", (5002, 8000)));
    assert_eq!((st.in_flight(), st.queued()), (2, 3));

    let held = st.abandon_connections(&[1, 2, 3].into_iter().collect());
    assert_eq!(held, 1, "the finished span held for connection 3 is dropped");
    assert_eq!(
        (st.in_flight(), st.queued()),
        (0, 1),
        "only connection 4's start is left"
    );
    assert!(st.serving.on_connections(&[1, 2, 3].into_iter().collect()).is_empty());

    st.push_done(done(4, 0, Side::Server, 150));
    st.flush(&mut out);
    let names: Vec<&str> = out.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["4/0"]);
    assert_eq!(st.in_flight(), 0);
}
