//! Benchmark-only subcommands (`bench-pipeline`, `bench-stitch`), built with the `bench`
//! feature (`cargo xtask bench` turns it on): the userspace stages timed on synthetic streams.
use std::path::Path;

use anyhow::{Context as _, Result};
use sockspan::{pipeline::Processor, telemetry::Metrics};

/// Pipeline throughput on one thread, on a synthetic stream or a recording: prints events/s and
/// spans/s, then the same with each batch's spans encoded as the OTLP exporters do.
pub fn bench_pipeline(
    connections: u32,
    per_conn: u32,
    body_bytes: usize,
    rounds: u32,
    recording: Option<&Path>,
) -> Result<()> {
    let stream = match recording {
        None => sockspan::replay::synthetic_sized(connections, per_conn, body_bytes),
        Some(path) => {
            let file = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
            // One batch holds the whole recording.
            sockspan::replay::read_recording(std::io::BufReader::new(file), usize::MAX)?
                .into_iter()
                .next()
                .unwrap_or_default()
        }
    };
    let events = stream.len();
    let best = |encode: Option<fn(Vec<sockspan::span::Span>) -> Vec<u8>>| {
        (0..rounds.max(1))
            .map(|_| {
                let (mut spans, mut bytes) = (0, 0);
                let secs = timed_replay(&stream, &mut |batch| {
                    spans += batch.len();
                    if let Some(encode) = encode {
                        bytes += encode(batch).len();
                    }
                });
                (secs, spans, bytes)
            })
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .unwrap_or_default()
    };
    let (secs, spans, _) = best(None);
    emit(format_args!(
        "events={events} spans={spans} seconds={secs:.3} events_per_sec={:.0} spans_per_sec={:.0}",
        events as f64 / secs,
        spans as f64 / secs
    ))?;
    // The same, and each batch's spans then encoded as the OTLP/HTTP exporter does (straight
    // into protobuf; no network), then as the SDK does for gRPC and JSON (span → SpanData →
    // protobuf types → bytes), then formatted as `--print=json` lines (no terminal).
    for (label, what, encode) in [
        (
            "with_otlp_encoding",
            "otlp_bytes",
            sockspan::export::otlp::encode_direct as fn(_) -> _,
        ),
        (
            "with_sdk_encoding",
            "otlp_bytes",
            sockspan::export::otlp::encode_with_sdk,
        ),
        ("with_json_lines", "json_bytes", json_lines),
    ] {
        let (secs, spans, bytes) = best(Some(encode));
        emit(format_args!(
            "{label}: spans={spans} {what}={bytes} seconds={secs:.3} events_per_sec={:.0} spans_per_sec={:.0}",
            events as f64 / secs,
            spans as f64 / secs
        ))?;
    }
    Ok(())
}

/// The spans as `--print=json` writes them.
fn json_lines(spans: Vec<sockspan::span::Span>) -> Vec<u8> {
    let mut out = Vec::new();
    sockspan::export::print::PrintFormat::Json.write_lines(&mut out, &spans, &sockspan::courtesy::Slack::default());
    out
}

/// Replays a stream through a fresh offline pipeline, handing each batch's spans to `sink` as
/// the live agent does; returns the seconds it took.
fn timed_replay(stream: &sockspan::reader::RawBatch, sink: &mut dyn FnMut(Vec<sockspan::span::Span>)) -> f64 {
    let mut processor = Processor::offline(Metrics::new());
    let start = std::time::Instant::now();
    process_in_batches(&mut processor, stream, sink);
    let mut spans = Vec::new();
    processor.finish(&mut spans);
    sink(spans);
    start.elapsed().as_secs_f64()
}

/// Stitching throughput (spans/s, one thread, whole userspace pipeline on a two-hop chain) and
/// memory held per in-flight request.
pub fn bench_stitch(requests: u32, concurrency: u32, in_flight: u32) -> Result<()> {
    let stream = sockspan::replay::synthetic_chain(requests, concurrency);
    let (mut spans, mut with_parent) = (0, 0);
    let secs = timed_replay(&stream, &mut |batch| {
        spans += batch.len();
        with_parent += batch.iter().filter(|s| s.parent_span_id.is_some()).count();
    });
    emit(format_args!(
        "stitch: requests={requests} concurrency={concurrency} spans={spans} with_parent={with_parent} seconds={secs:.3} spans_per_sec={:.0} events_per_sec={:.0}",
        spans as f64 / secs,
        stream.len() as f64 / secs
    ))?;

    let (started, answers) = sockspan::replay::synthetic_in_flight(in_flight);
    let metrics = Metrics::new();
    let mut processor = Processor::offline(metrics);
    let mut spans = Vec::new();
    let (rss_before, heap_before) = (rss_bytes(), heap_in_use());
    process_in_batches(&mut processor, &started, &mut |b| spans.extend(b));
    let held = processor.stitcher.in_flight() + processor.stitcher.queued();
    let (rss_held, heap_held) = (rss_bytes(), heap_in_use());
    process_in_batches(&mut processor, &answers, &mut |b| spans.extend(b));
    processor.finish(&mut spans);
    let heap = heap_held.saturating_sub(heap_before);
    emit(format_args!(
        "in_flight: requests={in_flight} held_starts={held} heap_bytes={heap} heap_bytes_per_request={} rss_growth_bytes={} spans_after_answers={} left_in_flight={}",
        heap / u64::from(in_flight.max(1)),
        rss_held.saturating_sub(rss_before),
        spans.len(),
        processor.stitcher.in_flight()
    ))?;
    Ok(())
}

/// Feeds a stream in batches of the size the reader hands over; each batch's spans go to `sink`.
fn process_in_batches(
    processor: &mut Processor,
    stream: &sockspan::reader::RawBatch,
    sink: &mut dyn FnMut(Vec<sockspan::span::Span>),
) {
    let mut batch = sockspan::reader::RawBatch::default();
    for rec in stream.iter() {
        batch.push(rec);
        if batch.len() == sockspan::reader::BATCH_RECORDS {
            let mut spans = Vec::new();
            processor.process(&batch, &mut spans);
            sink(spans);
            batch.bytes.clear();
            batch.ends.clear();
        }
    }
    let mut spans = Vec::new();
    processor.process(&batch, &mut spans);
    sink(spans);
}

/// Bytes allocated and not freed (excludes allocator slack that RSS includes).
fn heap_in_use() -> u64 {
    sockspan::alloc::live_bytes()
}

/// Resident set size of this process.
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// One result line on stdout. A failed write (a closed pipe, as in `| head -1`) ends the
/// benchmark with that error instead of a panic.
fn emit(line: std::fmt::Arguments) -> Result<()> {
    use std::io::Write as _;
    writeln!(std::io::stdout().lock(), "{line}").context("writing a result line")
}
