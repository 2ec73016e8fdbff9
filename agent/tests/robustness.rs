//! Damaged kernel record streams through every userspace stage: bytes flipped, records cut,
//! dropped, repeated and swapped, random records. Nothing may panic, and the books balance:
//! every record is decoded or counted as undecodable. (Seeded and repeatable; the coverage-guided
//! fuzzing of the same stages is in `fuzz/`, run by `cargo xtask fuzz`.)
use sockspan::{
    pipeline::Processor,
    reader::RawBatch,
    replay::{StreamBuilder, synthetic},
    telemetry::Metrics,
};

/// xorshift64*: repeatable damage without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// The stream's records, damaged.
fn damage(records: &[Vec<u8>], rng: &mut Rng) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = records.to_vec();
    for _ in 0..1 + rng.below(8) {
        if out.is_empty() {
            break;
        }
        let i = rng.below(out.len());
        match rng.below(6) {
            0 => {
                let r = &mut out[i];
                if !r.is_empty() {
                    let at = rng.below(r.len());
                    r[at] ^= 1 << rng.below(8);
                }
            }
            1 => {
                let keep = rng.below(out[i].len() + 1);
                out[i].truncate(keep);
            }
            2 => {
                out.remove(i);
            }
            3 => {
                let copy = out[i].clone();
                out.insert(rng.below(out.len() + 1), copy);
            }
            4 => {
                let j = rng.below(out.len());
                out.swap(i, j);
            }
            _ => {
                let len = rng.below(200);
                let junk = (0..len).map(|_| rng.next() as u8).collect();
                out.insert(i, junk);
            }
        }
    }
    out
}

#[test]
fn damaged_streams_never_panic_and_every_record_is_accounted() {
    let mut streams = vec![synthetic(3, 3)];
    let mut b = StreamBuilder::new();
    let c = b.connect(1, 10, 2, 20, 40000, 8080);
    b.send_request(
        &c,
        1,
        2,
        b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    );
    b.send_response(&c, 2, 1, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    b.close(&c);
    streams.push(b.batch);
    let mut rng = Rng(0x5eed_cafe_f00d_1234);
    for round in 0..3000 {
        let base = &streams[round % streams.len()];
        let records: Vec<Vec<u8>> = base.iter().map(<[u8]>::to_vec).collect();
        let damaged = damage(&records, &mut rng);
        let mut batch = RawBatch::default();
        for r in &damaged {
            batch.push(r);
        }
        let metrics = Metrics::new();
        let mut p = Processor::offline(metrics.clone());
        let mut spans = Vec::new();
        p.process(&batch, &mut spans);
        p.finish(&mut spans);
        let undecodable = metrics
            .stage_value("sockspan_events_decode_failed_total", Some("short"))
            .unwrap_or(0)
            + metrics
                .stage_value("sockspan_events_decode_failed_total", Some("unknown_kind"))
                .unwrap_or(0)
            + metrics
                .stage_value("sockspan_events_decode_failed_total", Some("bad_payload_len"))
                .unwrap_or(0);
        let decodable = damaged.iter().filter(|r| sockspan::decode::decode(r).is_ok()).count() as u64;
        assert_eq!(
            decodable + undecodable,
            damaged.len() as u64,
            "round {round}: records not accounted"
        );
        for s in &spans {
            assert!(
                s.trace_id != [0; 16] && s.span_id != [0; 8],
                "round {round}: a span without ids"
            );
        }
    }
}

/// Every way a request can end without an answer frees what the agent holds for it: a silent
/// connection ages out, a connection that stops being HTTP emits what it waited for, a closed
/// one emits its waiting requests. After each, nothing is left in flight. (A replay's clock is
/// stopped, so the stitcher releases at `finish`; the connection stage's part is seen before.)
#[test]
fn requests_that_never_end_well_leave_no_state_behind() {
    // 1,000 requests never answered on connections that then fall silent: aged out.
    let (started, _answers) = sockspan::replay::synthetic_in_flight(1000);
    let mut p = Processor::offline(Metrics::new());
    let mut spans = Vec::new();
    p.process(&started, &mut spans);
    assert_eq!(p.conns.len(), 2000, "both ends of each connection tracked");
    p.tick(u64::MAX / 2, &mut spans);
    assert_eq!(p.conns.len(), 0, "silent connections aged out");
    p.finish(&mut spans);
    assert_eq!((p.stitcher.in_flight(), p.stitcher.queued()), (0, 0));
    assert_eq!(
        spans.len(),
        2000,
        "each request comes out once, unanswered, on both ends"
    );

    // A connection that stops being HTTP with a request waiting; another closed with one.
    let mut b = StreamBuilder::new();
    let dies = b.connect(1, 10, 2, 20, 40000, 8080);
    let closes = b.connect(1, 11, 2, 21, 40001, 8080);
    b.send_request(&dies, 1, 2, b"GET /dies HTTP/1.1\r\nHost: h\r\n\r\n");
    b.send_request(&dies, 1, 2, b"\x00\x01\x02 binary after a request");
    b.send_request(&closes, 1, 2, b"GET /closes HTTP/1.1\r\nHost: h\r\n\r\n");
    b.close(&closes);
    let mut p = Processor::offline(Metrics::new());
    let mut spans = Vec::new();
    p.process(&b.batch, &mut spans);
    assert_eq!(
        p.conns.http_stats.abandoned_requests, 2,
        "/dies, on both ends, emitted when parsing stopped"
    );
    p.finish(&mut spans);
    assert_eq!((p.stitcher.in_flight(), p.stitcher.queued()), (0, 0));
    assert_eq!(spans.len(), 4, "both requests reported on both ends");
}
