//! The userspace stages wired in order: decode → conn (+http) → span → (stitch) → sinks.
//! `Processor` is the synchronous core, shared by the live agent, replays and benchmarks.
use std::{io::Write, sync::Arc, time::Duration};

use tokio::sync::mpsc;

use crate::{
    conn::{ConnOutput, ConnTable},
    decode::decode,
    export::{PrintFormat, Printer, otlp::ExportQueue},
    process::ProcessTable,
    reader::RawBatch,
    span::{IdGenerator, Span, SpanFactory, SpanOptions, monotonic_ns},
    stitch::{self, Finished, RequestStart, Stitcher},
    telemetry::Metrics,
};

/// A response whose end could not be seen (headers past the capture limit) ends after this idle time.
const IDLE_FLUSH_NS: u64 = 1_000_000_000;
/// Connections silent this long are forgotten.
const IDLE_EVICT_NS: u64 = 300 * 1_000_000_000;
/// How often the idle work runs.
pub const TICK: Duration = Duration::from_millis(250);

pub struct Processor {
    pub conns: ConnTable,
    procs: ProcessTable,
    spans: SpanFactory,
    pub stitcher: Stitcher,
    metrics: Arc<Metrics>,
    outputs: Vec<ConnOutput>,
    /// Monotonic clock for the reorder window (a replay uses a stopped clock: event time only).
    clock: fn() -> u64,
}

impl Processor {
    pub fn new(conns: ConnTable, procs: ProcessTable, spans: SpanFactory, metrics: Arc<Metrics>) -> Self {
        let stitcher = Stitcher::new(IdGenerator::from_entropy());
        Self::with_parts(conns, procs, spans, stitcher, monotonic_ns, metrics)
    }

    /// For replays and benchmarks: nothing read from this machine (/proc, clock), deterministic
    /// ids, event time only.
    pub fn offline(metrics: Arc<Metrics>) -> Self {
        Self::with_parts(
            ConnTable::without_proc(),
            ProcessTable::without_proc(),
            SpanFactory::with_clock_offset(SpanOptions::default(), 0),
            Stitcher::new(IdGenerator::seeded(1)),
            || 0,
            metrics,
        )
    }

    fn with_parts(
        conns: ConnTable,
        procs: ProcessTable,
        spans: SpanFactory,
        stitcher: Stitcher,
        clock: fn() -> u64,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            conns,
            procs,
            spans,
            stitcher,
            metrics,
            outputs: Vec::new(),
            clock,
        }
    }

    /// Processes one batch of raw records; finished spans are appended to `out`.
    pub fn process(&mut self, batch: &RawBatch, out: &mut Vec<Span>) {
        for record in batch.iter() {
            match decode(record) {
                Ok(ev) => self.conns.on_event(&ev, &mut self.outputs),
                Err(e) => {
                    self.metrics.events_decode_failed.inc();
                    tracing::debug!(reason = e.reason(), error = %e, "Dropped an undecodable event");
                }
            }
        }
        self.build_spans(out);
    }

    /// Idle work: ends responses whose end can't be seen, forgets silent connections.
    pub fn tick(&mut self, now_mono_ns: u64, out: &mut Vec<Span>) {
        self.conns
            .tick(now_mono_ns, IDLE_FLUSH_NS, IDLE_EVICT_NS, &mut self.outputs);
        self.build_spans(out);
        self.publish_stats();
    }

    /// Ends everything (shutdown, end of a replay): in-flight requests come out marked
    /// incomplete, so no exported span points at a parent that is never exported.
    pub fn finish(&mut self, out: &mut Vec<Span>) {
        self.conns.close_all(&mut self.outputs);
        self.build_spans(out);
        let before = out.len();
        self.stitcher.flush(out);
        self.metrics.spans_created.add((out.len() - before) as u64);
        self.publish_stats();
    }

    /// Feeds the connection stage's outputs to the stitcher, then takes what it released.
    fn build_spans(&mut self, out: &mut Vec<Span>) {
        for o in self.outputs.drain(..) {
            match o {
                ConnOutput::Started(s) => {
                    let r = &s.request;
                    self.stitcher.push_start(RequestStart {
                        conn_id: s.facts.conn_id,
                        seq: r.seq,
                        side: s.facts.side,
                        pid: s.facts.pid,
                        tid: r.first_tid,
                        start_ns: r.first_ns,
                        context: stitch::extract(r),
                        link: s.facts.link(),
                        aligned: s.facts.aligned,
                        peer: s.facts.remote,
                        loop_hint: s.loop_hint,
                        goroutine: s.goroutine,
                        go_chain: s.go_chain,
                        method: s.request.method,
                        target: s.request.target,
                    });
                }
                ConnOutput::Answering {
                    conn_id,
                    seq,
                    ts_ns,
                    tid,
                } => self.stitcher.push_answering(conn_id, seq, ts_ns, tid),
                ConnOutput::LoopConfirmed { conn_id, seq } => self.stitcher.confirm_loop_hint(conn_id, seq),
                ConnOutput::Exchange(cx) => {
                    self.metrics.exchanges.inc();
                    let resource = self.procs.get(cx.facts.pid, &cx.facts.comm);
                    let end_ns = cx.end_ns();
                    let span = self.spans.build(&cx, resource);
                    self.stitcher.push_done(Finished {
                        answered: cx.exchange.response.is_some(),
                        span,
                        conn_id: cx.facts.conn_id,
                        seq: cx.exchange.request.seq,
                        side: cx.facts.side,
                        end_ns,
                    });
                }
            }
        }
        let before = out.len();
        self.stitcher.release((self.clock)(), out);
        self.metrics.spans_created.add((out.len() - before) as u64);
    }

    pub fn publish_stats(&self) {
        self.metrics.set_stitch(self.stitcher.stats());
        self.metrics.set_loops(self.conns.loops.stats);
        self.metrics.set_go(self.conns.go.stats);
        let s = &self.conns.http_stats;
        self.metrics.connections_opened.set(self.conns.opened);
        self.metrics.connections_evicted.set(self.conns.evicted);
        self.metrics.set_http_rejected(vec![
            ("not_http", s.not_http + self.conns.not_http_undecided),
            ("agent_own_traffic", self.conns.own_traffic),
            ("header_too_large", s.header_too_large),
            ("bad_framing", s.bad_framing),
            ("truncated_headers", s.truncated_headers),
            ("unmatched_response", s.unmatched_responses),
            ("resync_skipped_chunk", s.resync_skipped_chunks),
        ]);
    }
}

/// Where finished spans go.
pub struct Sinks {
    pub printer: Option<Printer<std::io::Stdout>>,
    pub otlp: Option<ExportQueue>,
    pub metrics: Arc<Metrics>,
}

impl Sinks {
    pub fn new(print: Option<PrintFormat>, otlp: Option<ExportQueue>, metrics: Arc<Metrics>) -> Self {
        Self {
            printer: print.map(|f| Printer::new(f, std::io::stdout())),
            otlp,
            metrics,
        }
    }

    pub fn send(&mut self, spans: Vec<Span>) {
        if spans.is_empty() {
            return;
        }
        if let Some(p) = &mut self.printer {
            let n = p.print(&spans);
            self.metrics.spans_printed.add(n as u64);
        }
        if let Some(q) = &self.otlp {
            q.send(spans, &self.metrics);
        }
    }
}

/// Runs the processor on batches from the reader until the reader is done.
pub async fn run(
    mut processor: Processor,
    mut rx: mpsc::Receiver<RawBatch>,
    pool: Arc<crate::reader::BatchPool>,
    mut sinks: Sinks,
    mut record: Option<Box<dyn Write + Send>>,
) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut spans = Vec::new();
        tokio::select! {
            batch = rx.recv() => match batch {
                Some(batch) => {
                    if let Some(w) = &mut record
                        && let Err(e) = crate::replay::write_batch(w, &batch)
                    {
                        tracing::warn!(error = %e, "Recording failed; recording stops");
                        record = None;
                    }
                    processor.process(&batch, &mut spans);
                    pool.put(batch);
                }
                None => break,
            },
            _ = tick.tick() => processor.tick(monotonic_ns(), &mut spans),
        }
        sinks.send(spans);
    }
    let mut spans = Vec::new();
    processor.finish(&mut spans);
    sinks.send(spans);
    if let Some(w) = &mut record {
        let _ = w.flush();
    }
}
