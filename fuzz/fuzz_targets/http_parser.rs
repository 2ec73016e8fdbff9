//! One HTTP connection fed arbitrary chunks (captured prefixes with gaps) on both streams, closes
//! and idle flushes. Beyond "no panic", the books must balance after every call: each request
//! parsed is emitted exactly once or still waits, unanswered exchanges are counted by reason,
//! starts come before their exchange, and no count goes past what the streams carried.
#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use sockspan::http::{Chunk, Exchange, HttpConn, HttpStats, MAX_PENDING_REQUESTS, MAX_STARTED_REQUESTS, Started};
use sockspan_fuzz::{HTTP_CLOSE, HTTP_IDLE, Reader, gap_from};

fuzz_target!(|data: &[u8]| {
    let mut r = Reader(data);
    let mode = r.u8().unwrap_or(0);
    let mut conn = if mode & 1 == 0 {
        HttpConn::new()
    } else {
        HttpConn::new_resync()
    };
    // Bit 1: take the started requests only at the end (lets the queue overflow).
    let take_late = mode & 2 != 0;
    let mut stats = HttpStats::default();
    let (mut out, mut started) = (Vec::new(), Vec::new());
    let mut check = Books::default();
    let mut now = 1_000_000u64;
    let mut closed = false;
    while let Some(op) = r.u8() {
        let tid = u32::from(op >> 3);
        match op & 7 {
            k @ 0..=5 => {
                let Some(len) = r.u16() else { break };
                let captured = r.bytes(usize::from(len));
                let gap = gap_from(r.u8().unwrap_or(0));
                let total = (captured.len() as u64).saturating_add(gap);
                let first_ns = now;
                now += 1_000 + u64::from(len);
                let c = Chunk {
                    captured,
                    total,
                    tid,
                    first_ns,
                    last_ns: now,
                };
                if k < 3 {
                    check.req_bytes = check.req_bytes.saturating_add(total);
                    conn.on_request_chunk(&c, &mut out, &mut stats);
                } else {
                    check.resp_bytes = check.resp_bytes.saturating_add(total);
                    conn.on_response_chunk(&c, &mut out, &mut stats);
                }
            }
            HTTP_CLOSE => {
                now += 1_000;
                conn.on_close(now, &mut out, &mut stats);
                closed = true;
            }
            HTTP_IDLE => {
                now += u64::from(r.u8().unwrap_or(0)) * 100_000_000;
                conn.flush_idle(now, 1_000_000_000, &mut out, &mut stats);
            }
            _ => unreachable!(),
        }
        if !take_late {
            conn.take_started(&mut started);
        }
        check.after(&conn, &stats, &mut started, &mut out, closed, take_late);
    }
    conn.take_started(&mut started);
    check.after(&conn, &stats, &mut started, &mut out, closed, false);
});

#[derive(Default)]
struct Books {
    /// Bytes each stream carried (captured and gaps).
    req_bytes: u64,
    resp_bytes: u64,
    started: BTreeSet<u64>,
    last_started: Option<u64>,
    last_emitted: Option<u64>,
    emitted: u64,
    answered: u64,
    unanswered: u64,
}

impl Books {
    fn after(
        &mut self,
        conn: &HttpConn,
        st: &HttpStats,
        started: &mut Vec<Started>,
        out: &mut Vec<Exchange>,
        closed: bool,
        take_late: bool,
    ) {
        assert!(started.len() <= MAX_STARTED_REQUESTS, "started queue over its bound");
        for s in started.drain(..) {
            assert!(self.last_started.is_none_or(|l| s.seq > l), "starts out of order");
            self.last_started = Some(s.seq);
            let p = s.propagation.as_deref().cloned().unwrap_or_default();
            for v in [&p.traceparent, &p.tracestate, &p.b3, &p.x_b3_trace_id, &p.x_b3_span_id, &p.x_b3_parent_span_id, &p.x_b3_sampled]
                .into_iter()
                .flatten()
            {
                assert!(v.len() <= sockspan::http::MAX_VALUE_BYTES, "a header value over its cap");
            }
            self.started.insert(s.seq);
        }
        for x in out.drain(..) {
            let q = &x.request;
            assert!(self.last_emitted.is_none_or(|l| q.seq > l), "exchanges out of order");
            self.last_emitted = Some(q.seq);
            if !take_late && st.started_overflow == 0 {
                assert!(self.started.remove(&q.seq), "exchange {} without its start", q.seq);
            }
            assert!(q.first_ns <= q.last_ns, "request ends before it starts");
            assert!(q.body_bytes <= self.req_bytes, "request body larger than its stream");
            assert!(q.method.len() <= sockspan::http::MAX_METHOD_LEN);
            assert!(q.target.len() <= sockspan::http::MAX_TARGET_BYTES);
            match &x.response {
                Some(resp) => {
                    self.answered += 1;
                    assert!(!resp.interim, "an interim response emitted");
                    assert!(
                        resp.body_bytes <= self.resp_bytes,
                        "response body larger than its stream"
                    );
                    assert!(resp.first_ns <= resp.last_ns, "response ends before it starts");
                }
                None => self.unanswered += 1,
            }
            self.emitted += 1;
        }
        assert!(
            conn.pending_requests() <= MAX_PENDING_REQUESTS,
            "pending over its bound"
        );
        assert_eq!(
            self.emitted + conn.pending_requests() as u64,
            st.requests,
            "a request parsed is emitted once or still waits"
        );
        assert!(self.answered <= st.responses, "more answers than responses parsed");
        assert_eq!(
            self.unanswered,
            st.unanswered_requests + st.pending_overflow + st.abandoned_requests,
            "every unanswered exchange counted by reason"
        );
        if closed || conn.is_dead() {
            assert_eq!(conn.pending_requests(), 0, "closed or dead with requests waiting");
        }
    }
}
