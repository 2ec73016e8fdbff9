//! Arbitrary record streams (seeded from recordings) through the whole userspace pipeline as a
//! replay runs it: decode → conn → http → span → stitch, in batches, with idle ticks. Every
//! record is decoded or counted undecodable, every exchange becomes exactly one span (spans
//! created = spans handed out), and after `finish` nothing is left in flight or queued.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sockspan::{
    decode::{DecodeError, decode},
    pipeline::Processor,
    reader::RawBatch,
    telemetry::Metrics,
};
use sockspan_fuzz::{REC_BATCH, REC_TICK, Reader};

fuzz_target!(|data: &[u8]| {
    let mut r = Reader(data);
    let metrics = Metrics::new();
    let mut p = Processor::offline(metrics.clone());
    let mut spans = Vec::new();
    let mut batch = RawBatch::default();
    let (mut records, mut decodable, mut latest) = (0u64, 0u64, 0u64);
    while let Some(len) = r.u16() {
        match len {
            REC_TICK => {
                p.process(&batch, &mut spans);
                batch = RawBatch::default();
                let idle = u64::from(r.u8().unwrap_or(0)) * 2_000_000_000;
                p.tick(latest.saturating_add(idle), &mut spans);
            }
            REC_BATCH => {
                p.process(&batch, &mut spans);
                batch = RawBatch::default();
            }
            len => {
                let rec = r.bytes(usize::from(len));
                records += 1;
                if let Ok(ev) = decode(rec) {
                    decodable += 1;
                    latest = latest.max(ev.header().ts_exit_ns);
                }
                batch.push(rec);
            }
        }
    }
    p.process(&batch, &mut spans);
    p.finish(&mut spans);

    let undecodable: u64 = DecodeError::REASONS
        .iter()
        .map(|reason| {
            metrics
                .stage_value("sockspan_events_decode_failed_total", Some(reason))
                .unwrap_or(0)
        })
        .sum();
    assert_eq!(decodable + undecodable, records, "every record decoded or counted");
    let exchanges = metrics.stage_value("sockspan_http_exchanges_total", None).unwrap_or(0);
    assert_eq!(exchanges, spans.len() as u64, "one span per exchange");
    assert_eq!(
        metrics.spans_created.get(),
        spans.len() as u64,
        "spans created = spans handed out"
    );
    assert_eq!(p.stitcher.in_flight(), 0, "requests left in flight after finish");
    assert_eq!(p.stitcher.queued(), 0, "items left queued after finish");
    assert!(p.conns.is_empty(), "connections left after finish");
    for s in &spans {
        assert!(s.trace_id != [0; 16] && s.span_id != [0; 8], "a span without ids");
        assert!(s.start_unix_ns <= s.end_unix_ns, "a span ends before it starts");
    }
});
