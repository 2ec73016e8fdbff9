//! The event-loop rule on scripted kernel streams: a single loop thread serving several
//! requests at once, whose calls carry nothing of the request that caused them.
use sockspan::{
    decode::LoopStamp,
    loops::{Abstain, LoopStats},
    pipeline::Processor,
    replay::{SimConn, StreamBuilder},
    span::{AttrValue, Span, SpanKind, SpanOptions},
    telemetry::Metrics,
};

/// Spans keep their paths as sent: the scripts find them by path.
const RAW_PATHS: SpanOptions = SpanOptions {
    keep_query_values: false,
    keep_path: true,
    routes: Vec::new(),
};

const LOADGEN: u32 = 100;
const LOOP: u32 = 200;
const BACKEND: u32 = 300;
const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: s\r\n\r\n").into_bytes()
}

fn run(b: StreamBuilder) -> (Vec<Span>, LoopStats) {
    let mut p = Processor::offline_with(Metrics::new(), RAW_PATHS);
    let mut spans = Vec::new();
    p.process(&b.batch, &mut spans);
    p.finish(&mut spans);
    (spans, p.conns.loops.stats)
}

fn abstained(st: &LoopStats, why: Abstain) -> u64 {
    st.abstained[why as usize]
}

fn path(s: &Span) -> &str {
    match s.attr("url.path") {
        Some(AttrValue::Str(v)) => v.as_ref(),
        _ => "",
    }
}

fn span<'a>(spans: &'a [Span], kind: SpanKind, p: &str) -> &'a Span {
    spans
        .iter()
        .find(|s| s.kind == kind && path(s) == p)
        .unwrap_or_else(|| panic!("no {kind:?} span {p}"))
}

/// (parent's url.path, sockspan.parent.source) of the loop's CLIENT span `p`.
fn parent_of(spans: &[Span], p: &str) -> Option<(String, String)> {
    let c = span(spans, SpanKind::Client, p);
    if c.resource.pid != LOOP {
        panic!("{p} is not the loop's call");
    }
    let parent = spans.iter().find(|s| Some(s.span_id) == c.parent_span_id)?;
    let source = match c.attr("sockspan.parent.source") {
        Some(AttrValue::Str(v)) => v.to_string(),
        _ => "-".into(),
    };
    Some((path(parent).to_string(), source))
}

/// The loop process: `n_in` connections from the load generator, `n_out` to the backend.
struct Bed {
    b: StreamBuilder,
    inbound: Vec<SimConn>,
    outbound: Vec<SimConn>,
}

impl Bed {
    fn new(n_in: u32, n_out: u32) -> Self {
        let mut b = StreamBuilder::new();
        let inbound = (0..n_in)
            .map(|i| b.connect(LOADGEN, 10 + i as i32, LOOP, 20 + i as i32, 40000 + i as u16, 8080))
            .collect();
        let outbound = (0..n_out)
            .map(|i| b.connect(LOOP, 50 + i as i32, BACKEND, 60 + i as i32, 45000 + i as u16, 9090))
            .collect();
        Self { b, inbound, outbound }
    }

    /// Thread `tid` is in epoch `e` of its loop, begun by a wait that did not block (timeout 0:
    /// work was pending), so only a later read confirms what it writes.
    fn epoch(&mut self, tid: u32, e: u64) {
        self.wait(tid, e, 0);
    }

    /// Thread `tid` is in epoch `e`, begun by a wait that would have timed out at `deadline`.
    fn wait(&mut self, tid: u32, e: u64, deadline: u64) {
        let lp = LoopStamp {
            epoch: e,
            wait_deadline_ns: deadline,
        };
        self.b.loops.insert(tid, lp);
    }

    /// The load generator sends `p` on inbound connection `i`; the loop thread reads it.
    fn request_in(&mut self, i: usize, p: &str) {
        let c = self.inbound[i];
        self.b.send_request(&c, LOADGEN, LOOP, &get(p));
    }

    /// Thread `tid` of the loop process writes `p` on outbound connection `o`.
    fn call(&mut self, o: usize, tid: u32, p: &str) {
        let c = self.outbound[o];
        let bytes = get(p);
        self.b.data(
            LOOP,
            tid,
            c.client_fd,
            c.client_sock,
            2,
            true,
            &bytes,
            bytes.len(),
            "loop",
        );
        self.b.data(
            BACKEND,
            BACKEND,
            c.server_fd,
            c.server_sock,
            1,
            false,
            &bytes,
            bytes.len(),
            "backend",
        );
    }

    /// The backend answers on outbound connection `o`; thread `tid` reads the response.
    fn answer_call(&mut self, o: usize, tid: u32) {
        let c = self.outbound[o];
        self.b.send_response(&c, BACKEND, tid, OK);
    }

    /// Every inbound request is answered, every connection closed.
    fn end(mut self) -> (Vec<Span>, LoopStats) {
        for c in self.inbound.clone() {
            self.b.send_response(&c, LOOP, LOADGEN, OK);
            self.b.close(&c);
        }
        for c in self.outbound.clone() {
            self.b.close(&c);
        }
        run(self.b)
    }

    /// A warm-up call on every outbound connection (no request in flight: roots), so later
    /// calls are not their connection's first.
    fn warm(&mut self) {
        for o in 0..self.outbound.len() {
            self.call(o, LOOP, &format!("/warm/{o}"));
            self.answer_call(o, LOOP);
        }
    }
}

/// (linked span's url.path, sockspan.link.source) of the loop's CLIENT span `p`.
fn link_of(spans: &[Span], p: &str) -> Option<(String, String)> {
    let c = span(spans, SpanKind::Client, p);
    let l = c.links.first()?;
    let target = spans.iter().find(|s| s.span_id == l.span_id)?;
    Some((path(target).to_string(), l.source.to_string()))
}

fn some(parent: &str, source: &str) -> Option<(String, String)> {
    Some((parent.to_string(), source.to_string()))
}

#[test]
fn loop_thread_calls_take_the_message_read_last_in_their_stretch() {
    let mut bed = Bed::new(6, 4);
    bed.warm();
    bed.epoch(LOOP, 1);
    bed.request_in(0, "/in/a");
    bed.epoch(LOOP, 2);
    bed.request_in(1, "/in/b");
    bed.call(0, LOOP, "/call/b-first");
    bed.call(1, LOOP, "/call/b-second");
    // The next read of the stretch: the two calls were inside /in/b's callback.
    bed.request_in(2, "/in/c");
    // A new stretch with no input yet (a timer, a task woken by a pipe): no cause.
    bed.epoch(LOOP, 3);
    bed.call(2, LOOP, "/call/unknown");
    // The response of b's first call is read: its continuation calls again.
    bed.epoch(LOOP, 4);
    bed.answer_call(0, LOOP);
    bed.call(0, LOOP, "/call/b-after-await");
    bed.request_in(3, "/in/d");
    // The response of the unattributed call is read: whatever follows it has no cause.
    bed.epoch(LOOP, 5);
    bed.answer_call(2, LOOP);
    bed.call(2, LOOP, "/call/after-unknown");
    bed.request_in(4, "/in/e");
    // A write after the stretch's last read, and no read after it before the next wait: a
    // timer or an immediate may have written it, for any request.
    bed.epoch(LOOP, 6);
    bed.request_in(5, "/in/f");
    bed.call(3, LOOP, "/call/after-last-read");
    bed.epoch(LOOP, 7);
    bed.answer_call(1, LOOP);
    let (spans, st) = bed.end();
    for w in 0..4 {
        assert_eq!(parent_of(&spans, &format!("/warm/{w}")), None);
    }
    assert_eq!(parent_of(&spans, "/call/b-first"), some("/in/b", "loop"));
    assert_eq!(parent_of(&spans, "/call/b-second"), some("/in/b", "loop"));
    assert_eq!(parent_of(&spans, "/call/unknown"), None);
    assert_eq!(parent_of(&spans, "/call/b-after-await"), some("/in/b", "loop_response"));
    assert_eq!(parent_of(&spans, "/call/after-unknown"), None);
    assert_eq!(parent_of(&spans, "/call/after-last-read"), None);
    // Likely /in/f's, but a timer may have written it: a link, not a parent.
    assert_eq!(
        link_of(&spans, "/call/after-last-read"),
        some("/in/f", "loop_unconfirmed")
    );
    assert_eq!(link_of(&spans, "/call/b-first"), None);
    // The tracker names a cause for /call/after-unknown too (a response was read); the
    // stitcher finds no parent behind it, since that call had none.
    assert_eq!(st.hints, [4, 0], "stretch, connect");
    assert_eq!(abstained(&st, Abstain::NoMessage), 1);
    assert_eq!(abstained(&st, Abstain::Unconfirmed), 1);
    // The backend's side of each call is its child by connection, as always.
    let server = span(&spans, SpanKind::Server, "/call/b-first");
    assert_eq!(
        server.parent_span_id,
        Some(span(&spans, SpanKind::Client, "/call/b-first").span_id)
    );
}

#[test]
fn a_new_connection_carries_the_cause_of_the_stretch_that_opened_it() {
    let mut bed = Bed::new(6, 4);
    bed.epoch(LOOP, 1);
    bed.request_in(0, "/in/c");
    let k0 = bed.outbound[0];
    bed.b.connect_call(&k0, LOOP);
    bed.request_in(3, "/in/x");
    // The connection comes up in a later stretch, after another request was read.
    bed.epoch(LOOP, 2);
    bed.request_in(1, "/in/d");
    bed.call(0, LOOP, "/call/c-on-new-conn");
    // A first request on a connection whose connect the loop did not see: no cause (it is
    // written when the connection is up, whatever message that stretch read).
    bed.call(1, LOOP, "/call/first-unseen-connect");
    // A connect in a stretch with no cause hands none over.
    bed.epoch(LOOP, 3);
    let k2 = bed.outbound[2];
    bed.b.connect_call(&k2, LOOP);
    bed.epoch(LOOP, 4);
    bed.request_in(2, "/in/e");
    bed.call(2, LOOP, "/call/first-after-causeless-connect");
    // A connect after the stretch's last read (a timer's retry) is not confirmed: none.
    bed.epoch(LOOP, 5);
    bed.request_in(4, "/in/g");
    let k3 = bed.outbound[3];
    bed.b.connect_call(&k3, LOOP);
    bed.epoch(LOOP, 6);
    bed.request_in(5, "/in/h");
    bed.call(3, LOOP, "/call/on-unconfirmed-connect");
    let (spans, st) = bed.end();
    assert_eq!(parent_of(&spans, "/call/c-on-new-conn"), some("/in/c", "loop_connect"));
    assert_eq!(parent_of(&spans, "/call/first-unseen-connect"), None);
    assert_eq!(parent_of(&spans, "/call/first-after-causeless-connect"), None);
    assert_eq!(parent_of(&spans, "/call/on-unconfirmed-connect"), None);
    assert_eq!(
        link_of(&spans, "/call/on-unconfirmed-connect"),
        some("/in/g", "loop_unconfirmed")
    );
    assert_eq!(st.hints, [0, 1], "stretch, connect");
    assert_eq!(abstained(&st, Abstain::ConnectWithoutCause), 2);
    assert_eq!(abstained(&st, Abstain::Unconfirmed), 1);
}

#[test]
fn no_loop_parent_without_one_whole_message_or_one_loop_thread() {
    // Two pipelined requests in one read: either may have caused the call.
    let mut bed = Bed::new(3, 2);
    bed.warm();
    bed.epoch(LOOP, 1);
    bed.request_in(2, "/in/x");
    bed.epoch(LOOP, 2);
    let c = bed.inbound[0];
    let two = [get("/in/p1"), get("/in/p2")].concat();
    bed.b.send_request(&c, LOADGEN, LOOP, &two);
    bed.call(0, LOOP, "/call/after-pipelined");
    let (spans, st) = bed.end();
    assert_eq!(parent_of(&spans, "/call/after-pipelined"), None);
    assert_eq!(abstained(&st, Abstain::NoMessage), 1);

    // A second loop thread doing TCP I/O in the process: a callback may write for another
    // thread's message (Netty-style loops, Java's client selector), so the rule is off.
    let mut bed = Bed::new(3, 2);
    bed.warm();
    bed.epoch(LOOP + 1, 7);
    bed.call(1, LOOP + 1, "/call/other-loop");
    bed.epoch(LOOP, 1);
    bed.request_in(0, "/in/y");
    bed.request_in(1, "/in/z");
    bed.epoch(LOOP, 2);
    bed.request_in(2, "/in/w");
    bed.call(0, LOOP, "/call/two-loops");
    let (spans, st) = bed.end();
    assert_eq!(parent_of(&spans, "/call/two-loops"), None);
    assert_eq!(abstained(&st, Abstain::SeveralLoopThreads), 1);

    // Not a loop thread (epoch 0: never waited in epoll/poll/select), several requests in
    // flight: neither the thread rule nor the loop rule can tell.
    let mut bed = Bed::new(3, 2);
    bed.warm();
    bed.request_in(0, "/in/t1");
    bed.request_in(1, "/in/t2");
    bed.call(0, LOOP, "/call/threaded");
    let (spans, _) = bed.end();
    assert_eq!(parent_of(&spans, "/call/threaded"), None);
}

#[test]
fn a_connection_freed_while_its_pool_is_full_may_go_to_a_queued_request() {
    // Three connections to the backend.
    let mut bed = Bed::new(4, 3);
    bed.warm();
    bed.epoch(LOOP, 1);
    bed.request_in(1, "/in/b");
    bed.epoch(LOOP, 2);
    bed.request_in(0, "/in/a");
    bed.call(0, LOOP, "/call/a-1");
    bed.call(1, LOOP, "/call/a-2");
    bed.request_in(2, "/in/c");
    // a-1's response frees connection 0 while connection 2 is idle: nothing can be waiting
    // for a connection, so what follows on connection 0 is a-1's continuation.
    bed.epoch(LOOP, 3);
    bed.answer_call(0, LOOP);
    bed.call(0, LOOP, "/call/continuation");
    bed.request_in(3, "/in/d");
    // Connection 2 gets busy too (a call of no known cause).
    bed.epoch(LOOP, 4);
    bed.call(2, LOOP, "/call/other");
    // a-2's response frees connection 1 while 0 and 2 are busy: the client's pool may hand it
    // to a request queued for a connection (another request's), written now, after that read.
    bed.epoch(LOOP, 5);
    bed.answer_call(1, LOOP);
    bed.call(1, LOOP, "/call/queued-or-continuation");
    bed.answer_call(0, LOOP);
    let (spans, st) = bed.end();
    assert_eq!(parent_of(&spans, "/call/a-1"), some("/in/a", "loop"));
    assert_eq!(parent_of(&spans, "/call/continuation"), some("/in/a", "loop_response"));
    assert_eq!(parent_of(&spans, "/call/queued-or-continuation"), None);
    assert_eq!(
        link_of(&spans, "/call/queued-or-continuation"),
        some("/in/a", "loop_unconfirmed")
    );
    assert_eq!(abstained(&st, Abstain::PoolHandoff), 1);
}

#[test]
fn a_quiet_stretch_with_one_message_needs_no_later_read() {
    let mut bed = Bed::new(6, 4);
    // Connection 3 is left cold: its first request comes after a connect.
    for o in 0..3 {
        bed.call(o, LOOP, &format!("/warm/{o}"));
        bed.answer_call(o, LOOP);
    }
    bed.epoch(LOOP, 1);
    bed.request_in(5, "/in/waiting"); // in flight throughout: the thread alone cannot tell
    bed.request_in(4, "/in/other");
    // /in/other's answer begins; its body goes on in a later stretch.
    let c = bed.inbound[4];
    let head = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n";
    bed.b.data(
        LOOP,
        LOOP,
        c.server_fd,
        c.server_sock,
        1,
        true,
        head,
        head.len(),
        "loop",
    );
    // The wait asked to wake in 50 ms (the loop's nearest timer): one message read, then a call
    // and a connect with no read after them. Nothing but that message's callback (and what it
    // scheduled) can have run: no timer is due, no immediate was pending.
    let deadline = bed.b.now_ns + 50_000_000;
    bed.wait(LOOP, 2, deadline);
    bed.request_in(0, "/in/quiet");
    bed.call(0, LOOP, "/call/quiet");
    let k3 = bed.outbound[3];
    bed.b.connect_call(&k3, LOOP);
    // Once the deadline is near, a timer may have fired: a link only.
    bed.b.now_ns = deadline;
    bed.call(1, LOOP, "/call/timer-time");
    // Two connections read in the stretch: the first one's immediates may run after the second.
    bed.wait(LOOP, 3, u64::MAX);
    bed.request_in(1, "/in/first");
    bed.request_in(2, "/in/second");
    bed.call(2, LOOP, "/call/after-two");
    // A stretch that flushed a message begun earlier (a completion callback may follow it).
    bed.wait(LOOP, 4, u64::MAX);
    bed.request_in(3, "/in/flushing");
    bed.b
        .data(LOOP, LOOP, c.server_fd, c.server_sock, 1, true, b"more-body", 9, "loop");
    bed.call(1, LOOP, "/call/after-flush");
    bed.wait(LOOP, 5, u64::MAX);
    bed.request_in(1, "/in/late");
    bed.call(3, LOOP, "/call/first-on-quiet-connect");
    let (spans, _) = bed.end();
    assert_eq!(parent_of(&spans, "/call/quiet"), some("/in/quiet", "loop"));
    assert_eq!(parent_of(&spans, "/call/timer-time"), None);
    assert_eq!(parent_of(&spans, "/call/after-two"), None);
    assert_eq!(parent_of(&spans, "/call/after-flush"), None);
    assert_eq!(
        parent_of(&spans, "/call/first-on-quiet-connect"),
        some("/in/quiet", "loop_connect")
    );
}
