//! The userspace stages wired in order: decode → conn (+http) → span → (stitch) → sinks.
//! `Processor` is the synchronous core, shared by the live agent, replays and benchmarks.
use std::{io::Write, sync::Arc, time::Duration};

use tokio::sync::mpsc;

use crate::{
    FastSet,
    budget::{self, MemoryBudget},
    conn::{ConnOutput, ConnTable},
    courtesy::{Slack, Stretch},
    decode::{DecodeError, decode},
    export::{PrintQueue, otlp::ExportQueue},
    process::ProcessTable,
    reader::RawBatch,
    sampling::{HeadSampler, Sampler},
    selection::{ProcessSelector, Selection},
    span::{IdGenerator, Span, SpanFactory, SpanOptions, monotonic_ns},
    stitch::{self, Finished, RequestStart, Stitcher},
    telemetry::{Family, Metrics},
    views::{self, SpanFilter, SpanQueue, TraceQueue, View, top::TopQueue},
};

/// A response whose end could not be seen (headers past the capture limit) ends after this idle time.
const IDLE_FLUSH_NS: u64 = 1_000_000_000;
/// Connections silent this long are forgotten.
const IDLE_EVICT_NS: u64 = 300 * 1_000_000_000;
/// Spans built before a batch ends that are handed to the sinks at once (see
/// [`Processor::process_with`]).
const EARLY_HANDOFF: usize = 4096;
/// Requests the stitcher decides between two checks of the memory budget (each adds its
/// state: a burst of pipelined requests releases tens of thousands at once).
const RELEASE_STEP: usize = 4096;
/// The resident size is read at most this often (a read of /proc/self/statm).
const BUDGET_CHECK_NS: u64 = 5_000_000;
/// Spare memory the allocator keeps beyond the live heap before it is given back at once
/// rather than at the next [`Processor::tick`] (see [`Processor::keep_within_budget`]), at
/// most every [`EARLY_GIVE_BACK_NS`], once the heap moved by half of it.
const SPARE_BYTES: u64 = 8 << 20;
const EARLY_GIVE_BACK_NS: u64 = 50_000_000;
/// How often the idle work runs.
pub const TICK: Duration = Duration::from_millis(250);
/// How long a span waits for its process's pod to be known, and how many wait at once.
const POD_HOLD_NS: u64 = 2_000_000_000;
const MAX_AWAITING_POD: usize = 10_000;
/// Ticks between sweeps of what is kept per process (processes gone, pids reused): the
/// selection's decisions, the connection table's event-loop and Go state.
const PROCESS_SWEEP_TICKS: u64 = 20;

/// The pipeline's last batch: how long it worked on it, and when it ended (monotonic ns).
#[derive(Default, Clone, Copy)]
struct LastBatch {
    busy_ns: u64,
    end_ns: u64,
}

pub struct Processor {
    pub conns: ConnTable,
    procs: ProcessTable,
    spans: SpanFactory,
    pub stitcher: Stitcher,
    metrics: Arc<Metrics>,
    outputs: Vec<ConnOutput>,
    /// Monotonic clock for the reorder window (a replay uses a stopped clock: event time only).
    clock: fn() -> u64,
    /// Records that could not be decoded, by [`DecodeError::index`].
    decode_failed: [u64; DecodeError::REASONS.len()],
    /// HTTP exchanges assembled.
    exchanges: u64,
    /// The live agent's memory budget (none in replays: their output must not depend on the
    /// machine's memory).
    budget: Option<MemoryBudget>,
    /// State given back to keep within the budget: connections evicted, and their requests
    /// ended without spans.
    shed_connections: u64,
    shed_requests: u64,
    ticks: u64,
    budget_checked_ns: u64,
    budget_checked_heap: u64,
    /// When spare memory was last given back early (monotonic ns), and the live heap then.
    gave_back_ns: u64,
    gave_back_heap: u64,
    last_batch: LastBatch,
    /// Whether the agent has time to spare (see [`crate::courtesy`]), judged at each batch.
    slack: Slack,
    /// Which processes are traced (`--trace-exe`, `--ignore-pid`, ...; all by default).
    selector: ProcessSelector,
    /// Spans of processes whose pod is not known yet, waiting for it until a deadline
    /// (monotonic ns), oldest first.
    awaiting_pod: std::collections::VecDeque<(u64, Span)>,
}

impl Processor {
    pub fn new(conns: ConnTable, procs: ProcessTable, spans: SpanFactory, metrics: Arc<Metrics>) -> Self {
        let stitcher = Stitcher::new(IdGenerator::from_entropy());
        Self::with_parts(conns, procs, spans, stitcher, monotonic_ns, metrics)
    }

    /// For replays and benchmarks: nothing read from this machine (/proc, clock), deterministic
    /// ids, event time only.
    pub fn offline(metrics: Arc<Metrics>) -> Self {
        Self::offline_with(metrics, SpanOptions::default())
    }

    /// [`Processor::offline`] with other span options (tests that find spans by raw path).
    pub fn offline_with(metrics: Arc<Metrics>, opts: SpanOptions) -> Self {
        Self::with_parts(
            ConnTable::without_proc(),
            ProcessTable::without_proc(),
            SpanFactory::with_clock_offset(opts, 0),
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
            decode_failed: [0; DecodeError::REASONS.len()],
            exchanges: 0,
            budget: None,
            shed_connections: 0,
            shed_requests: 0,
            ticks: 0,
            selector: ProcessSelector::new(Selection::default(), None),
            awaiting_pod: std::collections::VecDeque::new(),
            budget_checked_ns: 0,
            budget_checked_heap: 0,
            gave_back_ns: 0,
            gave_back_heap: 0,
            last_batch: LastBatch::default(),
            slack: Slack::default(),
        }
    }

    /// Traces only the processes `selector` selects.
    pub fn with_selection(mut self, selector: ProcessSelector) -> Self {
        self.selector = selector;
        self
    }

    /// Publishes whether the agent has time to spare in `slack` (the exporter and the
    /// printing read it).
    pub fn with_slack(mut self, slack: Slack) -> Self {
        self.slack = slack;
        self
    }

    /// Keeps the state within `budget` (see [`Self::keep_within_budget`]).
    pub fn with_budget(mut self, budget: MemoryBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Processes one batch of raw records; finished spans are appended to `out`.
    pub fn process(&mut self, batch: &RawBatch, out: &mut Vec<Span>) {
        self.process_with(batch, out, |_| {});
    }

    /// [`Self::process`], handing `out` to `early` whenever it holds [`EARLY_HANDOFF`] spans:
    /// one batch can end thousands of connections, each with dozens of requests waiting.
    pub fn process_with(&mut self, batch: &RawBatch, out: &mut Vec<Span>, mut early: impl FnMut(&mut Vec<Span>)) {
        let start = (self.clock)();
        self.slack.judge(start, self.last_batch.busy_ns, self.last_batch.end_ns);
        let mut stretch = Stretch::begin(self.clock, &self.slack);
        for (i, record) in batch.iter().enumerate() {
            stretch.offer_if_due();
            if i % 64 == 63 {
                // A batch can hold tens of thousands of requests (records of pipelined ones):
                // the connection stage's outputs go to the stitcher as they come (held there
                // until the batch ends, as before) instead of growing one vector by doubling.
                self.feed_stitcher();
                self.keep_within_budget();
                if out.len() >= EARLY_HANDOFF {
                    early(out);
                }
            }
            match decode(record) {
                Ok(ev) if !self.selector.admits(ev.header().pid) => {}
                Ok(ev) => self.conns.on_event(&ev, &mut self.outputs),
                Err(e) => {
                    self.decode_failed[e.index()] += 1;
                    tracing::debug!(reason = e.reason(), error = %e, "Dropped an undecodable event");
                }
            }
        }
        self.build_spans(out);
        self.keep_within_budget();
        let end = (self.clock)();
        self.last_batch = LastBatch {
            busy_ns: end.saturating_sub(start),
            end_ns: end,
        };
    }

    /// Over the budget's shedding mark (checked every [`BUDGET_CHECK_NS`], or sooner once the
    /// heap grew by a sixty-fourth of the state's part): gives the allocator's spare pages back
    /// first; if that is not enough, evicts the least recently active connections, an eighth
    /// at a time, until the agent is under its target: their requests, in flight or held in
    /// the reorder window, end without spans (`memory_limit`), and the stitcher's state for
    /// them is freed. Nothing is built for them: building spans (or deciding held requests)
    /// only to drop them cost as much memory as the shedding gave back, and let a burst
    /// overshoot the limit. Each step is counted. Under the mark, spare memory past
    /// [`SPARE_BYTES`] is given back at once: what a burst of connections freed (its batches,
    /// its buffers) otherwise stayed resident until the next tick, 18 MiB of a 70 MiB peak at
    /// 10,000 connections.
    fn keep_within_budget(&mut self) {
        let Some(budget) = self.budget else { return };
        let (now, heap) = ((self.clock)(), crate::alloc::live_bytes());
        if now.saturating_sub(self.budget_checked_ns) < BUDGET_CHECK_NS
            && heap < self.budget_checked_heap + budget.heap_bytes() / 64
        {
            return;
        }
        (self.budget_checked_ns, self.budget_checked_heap) = (now, heap);
        let resident = budget::resident_now();
        if resident <= budget.shed_above() {
            // Only while the heap moves (a burst arriving or ending): a steady load's spare
            // pages are its working set, and giving them back would cost faulting them in.
            if heap.abs_diff(self.gave_back_heap) > SPARE_BYTES / 2
                && budget.spare(resident, heap) > SPARE_BYTES
                && now.saturating_sub(self.gave_back_ns) >= EARLY_GIVE_BACK_NS
            {
                crate::alloc::give_back();
                (self.gave_back_ns, self.gave_back_heap) = (now, heap);
            }
            return;
        }
        crate::alloc::give_back();
        if budget::resident_now() <= budget.shed_above() {
            return;
        }
        tracing::debug!(
            resident_mib = budget::resident() >> 20,
            heap_mib = heap >> 20,
            in_flight = self.stitcher.in_flight(),
            "Over the memory budget's shedding mark: shedding connections"
        );
        // What the connection stage reported so far goes to the stitcher as usual.
        self.feed_stitcher();
        for _ in 0..4 {
            // Evict until the heap freed what must go (the tables keep their capacity until
            // shrunk, which rehashes them: once per round, not per eviction).
            let need = budget::resident().saturating_sub(budget.shed_to());
            let live = crate::alloc::live_bytes();
            while live.saturating_sub(crate::alloc::live_bytes()) < need / 2 && !self.conns.is_empty() {
                let (shed, requests) = self.conns.shed_oldest(8);
                self.abandon(&shed, requests);
            }
            self.conns.shrink();
            self.stitcher.shrink();
            crate::alloc::give_back();
            if budget::resident_now() <= budget.shed_to() || self.conns.is_empty() {
                break;
            }
        }
        tracing::debug!(
            resident_mib = budget::resident() >> 20,
            heap_mib = crate::alloc::live_bytes() >> 20,
            in_flight = self.stitcher.in_flight(),
            "Shed connections"
        );
    }

    /// The requests of shed connections (`requests` were in flight on them) end without spans,
    /// each counted as a span created and dropped (`memory_limit`) so the books still balance.
    fn abandon(&mut self, shed: &FastSet<u64>, requests: u64) {
        let held = self.stitcher.abandon_connections(shed);
        self.shed_connections += shed.len() as u64;
        self.shed_requests += requests + held;
        self.metrics.spans_created.add(requests + held);
        self.metrics.spans_dropped_memory_limit.add(requests + held);
    }

    /// Idle work: ends responses whose end can't be seen, forgets silent connections.
    pub fn tick(&mut self, now_mono_ns: u64, out: &mut Vec<Span>) {
        self.conns
            .tick(now_mono_ns, IDLE_FLUSH_NS, IDLE_EVICT_NS, &mut self.outputs);
        self.build_spans(out);
        self.publish_stats();
        self.ticks += 1;
        if self.ticks.is_multiple_of(PROCESS_SWEEP_TICKS) {
            self.selector.forget_gone();
            self.conns.forget_gone_processes();
        }
        if self.budget.is_some() && self.ticks.is_multiple_of(4) {
            // Memory freed since (batches, spans sent, connections gone) stops counting as
            // resident within a second.
            crate::alloc::give_back();
            budget::resident_now();
        }
    }

    /// Ends everything (shutdown, end of a replay): in-flight requests come out marked
    /// incomplete, so no exported span points at a parent that is never exported.
    pub fn finish(&mut self, out: &mut Vec<Span>) {
        self.conns.close_all(&mut self.outputs);
        self.build_spans(out);
        let before = out.len();
        self.stitcher.flush(out);
        self.metrics.spans_created.add((out.len() - before) as u64);
        for (_, span) in self.awaiting_pod.drain(..) {
            self.procs.span_without_pod();
            out.push(span);
        }
        self.publish_stats();
    }

    /// Feeds the connection stage's outputs to the stitcher, then takes what it released.
    fn build_spans(&mut self, out: &mut Vec<Span>) {
        self.feed_stitcher();
        let now = (self.clock)();
        let from = out.len();
        loop {
            let before = out.len();
            let more = self.stitcher.release_some(now, RELEASE_STEP, out);
            self.metrics.spans_created.add((out.len() - before) as u64);
            if !more {
                break;
            }
            self.keep_within_budget();
        }
        self.wait_for_pods(now, from, out);
    }

    /// Spans of a process in a pod not known yet (the watch brings a new pod within moments)
    /// wait for it up to [`POD_HOLD_NS`], then go out without its metadata, counted. Spans from
    /// `from` on in `out` are new.
    fn wait_for_pods(&mut self, now: u64, from: usize, out: &mut Vec<Span>) {
        if !self.procs.watches_pods() {
            return;
        }
        let mut i = from;
        while i < out.len() {
            if self.awaiting_pod.len() < MAX_AWAITING_POD && self.procs.awaits_pod(out[i].resource.pid) {
                self.awaiting_pod.push_back((now + POD_HOLD_NS, out.remove(i)));
            } else {
                i += 1;
            }
        }
        for _ in 0..self.awaiting_pod.len() {
            let Some((deadline, mut span)) = self.awaiting_pod.pop_front() else {
                break;
            };
            let pid = span.resource.pid;
            let refreshed = self.procs.refresh_pod(pid);
            if refreshed.is_none() && self.procs.awaits_pod(pid) && now < deadline {
                self.awaiting_pod.push_back((deadline, span));
                continue;
            }
            // Known now (found by this span's lookup, or an earlier one's), or out of time.
            if let Some(resource) = refreshed.or_else(|| self.procs.cached(pid)) {
                span.resource = resource;
            }
            if span.resource.pod.is_none() {
                self.procs.span_without_pod();
            }
            out.push(span);
        }
    }

    /// Hands the connection stage's outputs to the stitcher (finished exchanges become spans
    /// there, held in its reorder window).
    fn feed_stitcher(&mut self) {
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
                        context: r.propagation.as_deref().and_then(stitch::extract),
                        link: s.facts.link(),
                        aligned: s.facts.aligned,
                        peer: s.facts.remote,
                        loop_hint: s.loop_hint,
                        goroutine: s.goroutine,
                        go_chain: s.go_chain,
                        go_program: s.go_program || s.goroutine != 0,
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
                    self.exchanges += 1;
                    let resource = self.procs.get(cx.facts.pid, &cx.facts.comm);
                    let (end_ns, answered) = (cx.end_ns(), cx.exchange.response.is_some());
                    let (conn_id, seq, side) = (cx.facts.conn_id, cx.exchange.request.seq, cx.facts.side);
                    let span = self.spans.build(cx, resource);
                    self.stitcher.push_done(Finished {
                        answered,
                        span,
                        conn_id,
                        seq,
                        side,
                        end_ns,
                    });
                }
            }
        }
    }

    pub fn publish_stats(&self) {
        self.metrics.events_unselected.set(self.selector.dropped_events);
        let mut families = self.conns.families();
        families.extend(self.stitcher.families());
        families.extend(self.families());
        self.metrics.set_stages(families);
    }

    /// The processor's own counts (records it could not decode, exchanges assembled) and the
    /// goroutine tracker's with the Go hooks' attacher's.
    fn families(&self) -> Vec<Family> {
        let failed = DecodeError::REASONS
            .iter()
            .zip(self.decode_failed)
            .map(|(reason, n)| ("reason", *reason, n))
            .collect();
        let mut go = self.conns.go.stats;
        go.executables_hooked = self.metrics.go_executables_hooked.get();
        go.executables_failed = self.metrics.go_executables_failed.get();
        let mut f = vec![
            Family::counter(
                "sockspan_events_decode_failed_total",
                "Records dropped because they could not be decoded, by reason.",
                failed,
            ),
            Family::total(
                "sockspan_http_exchanges_total",
                "HTTP request/response exchanges assembled.",
                self.exchanges,
            ),
            Family::counter(
                "sockspan_memory_shed_total",
                "State given back to stay within --memory-limit, by stage (connections: connections evicted; requests: their requests, in flight or held, ended without spans).",
                vec![
                    ("stage", "connections", self.shed_connections),
                    ("stage", "requests", self.shed_requests),
                ],
            ),
        ];
        f.extend(go.families());
        f
    }
}

/// The live view's queue.
enum Printer {
    Lines(PrintQueue),
    /// A view that assembles spans on its thread (traces, top).
    Spans(SpanQueue),
}

/// Where finished spans go.
pub struct Sinks {
    printer: Option<(Printer, std::thread::JoinHandle<()>)>,
    pub otlp: Option<ExportQueue>,
    /// Picks the traces exported (the views see every span).
    sampler: Sampler,
    pub metrics: Arc<Metrics>,
    /// The sampler's clock.
    epoch: std::time::Instant,
    /// Whether the agent has time to spare: formatting lines then offers the CPU.
    slack: Slack,
}

impl Sinks {
    /// Starts the view's thread when printing (`filter` picks what it shows); `otlp` gets what
    /// its sampler keeps.
    pub fn new(
        view: Option<View>,
        filter: SpanFilter,
        otlp: Option<(ExportQueue, Sampler)>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let (out, counts) = (std::io::stdout(), metrics.print.clone());
        let printer = match view {
            Some(View::Lines(f)) => {
                let (q, t) = PrintQueue::start(f, filter, out, counts)?;
                Some((Printer::Lines(q), t))
            }
            Some(View::Traces) => {
                let (q, t) = TraceQueue::start(filter, views::terminal(), out, counts)?;
                Some((Printer::Spans(q), t))
            }
            Some(View::Top) => {
                let (q, t) = TopQueue::start(filter, views::stdout_is_tty(), out, counts)?;
                Some((Printer::Spans(q), t))
            }
            None => None,
        };
        let (otlp, sampler) = match otlp {
            Some((q, s)) => (Some(q), s),
            None => (
                None,
                Sampler::new(HeadSampler::default(), None, metrics.sampling.clone()),
            ),
        };
        Ok(Self {
            printer,
            otlp,
            sampler,
            metrics,
            epoch: std::time::Instant::now(),
            slack: Slack::default(),
        })
    }

    /// Reads whether the agent has time to spare from `slack` (the pipeline judges it).
    pub fn with_slack(mut self, slack: Slack) -> Self {
        self.slack = slack;
        self
    }

    pub fn send(&mut self, spans: Vec<Span>) {
        if spans.is_empty() {
            return;
        }
        match &self.printer {
            Some((Printer::Lines(p), _)) => p.send(&spans, &self.slack),
            Some((Printer::Spans(q), _)) => q.send(&spans),
            None => {}
        }
        if let Some(q) = &self.otlp {
            let kept = self.sampler.admit(spans, self.epoch.elapsed().as_nanos() as u64);
            q.send(kept, &self.metrics);
        }
    }

    /// Exports the traces the tail sampler kept among those now complete.
    pub fn tick(&mut self) {
        if let Some(q) = &self.otlp {
            q.send(self.sampler.tick(self.epoch.elapsed().as_nanos() as u64), &self.metrics);
        }
    }

    /// Exports what the tail sampler keeps of the traces it still holds (the agent stops).
    pub fn finish_sampling(&mut self) {
        if let Some(q) = &self.otlp {
            q.send(self.sampler.finish(), &self.metrics);
        }
    }

    /// Closes the print queue; the print thread, if any, ends once it has written what it
    /// holds (the caller decides how long to wait for it).
    pub fn into_print_thread(self) -> Option<std::thread::JoinHandle<()>> {
        self.printer.map(|(queue, thread)| {
            drop(queue);
            thread
        })
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
                    processor.process_with(&batch, &mut spans, |s| sinks.send(std::mem::take(s)));
                    pool.put(batch);
                }
                None => break,
            },
            _ = tick.tick() => {
                processor.tick(monotonic_ns(), &mut spans);
                sinks.tick();
                sinks.metrics.pipeline_alive_ms.set(crate::telemetry::now_ms());
            }
        }
        sinks.send(spans);
    }
    let mut spans = Vec::new();
    processor.finish(&mut spans);
    sinks.send(spans);
    sinks.finish_sampling();
    if let Some(w) = &mut record {
        let _ = w.flush();
    }
    // The last lines get a moment to reach a slow terminal; a blocked one keeps them.
    if let Some(thread) = sinks.into_print_thread() {
        let deadline = tokio::time::Instant::now() + PRINT_DRAIN;
        while !thread.is_finished() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// How long the last printed lines may take to reach a slow terminal at shutdown.
const PRINT_DRAIN: Duration = Duration::from_secs(1);
