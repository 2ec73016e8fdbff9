//! Damaged kernel record streams through every userspace stage: bytes flipped, records cut,
//! dropped, repeated and swapped, random records. Nothing may panic, and the books balance:
//! every record is decoded or counted as undecodable. (Seeded and repeatable; not coverage-guided
//! fuzzing, which docs/reliability.md lists as not done.)
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
