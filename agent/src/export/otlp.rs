//! OTLP export through `opentelemetry-otlp`, which reads the standard `OTEL_EXPORTER_OTLP_*`
//! variables (endpoint, traces endpoint, protocol, headers, timeout). Batching follows the
//! `OTEL_BSP_*` variables. Spans are grouped by process resource: one request per resource.
use std::{
    borrow::Cow,
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, UNIX_EPOCH},
};

use opentelemetry::{
    InstrumentationScope, KeyValue, Value,
    trace::{Link, SpanContext, SpanId, SpanKind as OtelKind, Status, TraceFlags, TraceId, TraceState},
};
use opentelemetry_otlp::SpanExporter;
use opentelemetry_sdk::{
    Resource,
    trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks},
};
use tokio::{sync::mpsc, task::JoinSet};

use crate::{
    budget::MemoryBudget,
    courtesy::{Slack, Stretch},
    process::ProcessInfo,
    span::{AttrValue, Span, SpanKind, monotonic_ns},
    telemetry::{Counter, ExportFailure, Metrics},
};

/// The instrumentation scope of every span sockspan exports: its name and version.
const SCOPE: (&str, &str) = ("sockspan", env!("CARGO_PKG_VERSION"));

fn scope() -> InstrumentationScope {
    InstrumentationScope::builder(SCOPE.0).with_version(SCOPE.1).build()
}

/// Heap bytes a queued span holds, about (65,536 queued spans measured near 60 MiB).
pub const SPAN_BYTES: u64 = 1024;

/// Batch span processor settings (`OTEL_BSP_*`; spec defaults except the queue size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BspConfig {
    pub max_queue_size: usize,
    pub schedule_delay: Duration,
    pub max_export_batch_size: usize,
    pub export_timeout: Duration,
    /// Export requests in flight at once (`OTEL_BSP_MAX_CONCURRENT_EXPORTS`).
    pub max_concurrent_exports: usize,
}

impl Default for BspConfig {
    fn default() -> Self {
        Self {
            // The spec's 2048 suits one process's spans; a node agent makes ~100k spans/s under
            // load, and 2048 (20 ms of them) overflowed at every export that took a little
            // longer. 65,536 spans hold about 60 MiB at most.
            max_queue_size: 65_536,
            schedule_delay: Duration::from_millis(5000),
            max_export_batch_size: 512,
            export_timeout: Duration::from_millis(30000),
            // The SDK's default is 1; with one request at a time a collector slower than the
            // node's span rate dropped spans while the agent had CPU to spare.
            max_concurrent_exports: 4,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{name}={value:?} is not a valid {what}")]
    Invalid {
        name: &'static str,
        value: String,
        what: &'static str,
    },
    #[error("OTEL_EXPORTER_OTLP_PROTOCOL={0:?} is not supported (use grpc, http/protobuf or http/json)")]
    Protocol(String),
    #[error("cannot build the OTLP exporter: {0}")]
    Build(String),
    #[error("{name}={path}: {reason}")]
    Tls {
        name: &'static str,
        path: String,
        reason: String,
    },
}

impl BspConfig {
    /// Reads `OTEL_BSP_*` from a key→value source (the process environment in production).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let d = Self::default();
        let num = |name: &'static str, default: u64| -> Result<u64, ConfigError> {
            match get(name) {
                None => Ok(default),
                Some(v) if v.trim().is_empty() => Ok(default),
                Some(v) => v.trim().parse::<u64>().map_err(|_| ConfigError::Invalid {
                    name,
                    value: v,
                    what: "non-negative integer",
                }),
            }
        };
        let cfg = Self {
            max_queue_size: num("OTEL_BSP_MAX_QUEUE_SIZE", d.max_queue_size as u64)?.max(1) as usize,
            schedule_delay: Duration::from_millis(
                num("OTEL_BSP_SCHEDULE_DELAY", d.schedule_delay.as_millis() as u64)?.max(1),
            ),
            max_export_batch_size: num("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", d.max_export_batch_size as u64)?.max(1)
                as usize,
            export_timeout: Duration::from_millis(
                num("OTEL_BSP_EXPORT_TIMEOUT", d.export_timeout.as_millis() as u64)?.max(1),
            ),
            max_concurrent_exports: num("OTEL_BSP_MAX_CONCURRENT_EXPORTS", d.max_concurrent_exports as u64)?
                .clamp(1, MAX_CONCURRENT_EXPORTS) as usize,
        };
        Ok(Self {
            max_export_batch_size: cfg.max_export_batch_size.min(cfg.max_queue_size),
            ..cfg
        })
    }
}

/// Upper bound for `OTEL_BSP_MAX_CONCURRENT_EXPORTS` (each is a connection to the collector).
const MAX_CONCURRENT_EXPORTS: u64 = 64;

/// Whether the environment names an OTLP endpoint at all (else the agent prints spans).
pub fn endpoint_configured(get: impl Fn(&str) -> Option<String>) -> bool {
    super::tls::signal_var(
        &get,
        ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"],
    )
    .is_some()
}

/// Checks the protocol variable early, with a clear message (the SDK would silently fall back).
pub fn check_protocol(get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
    let names = ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"];
    match unsupported(&get, names, &["grpc", "http/protobuf", "http/json"]) {
        Some((_, v)) => Err(ConfigError::Protocol(v)),
        None => Ok(()),
    }
}

/// Checks the compression variable early: no compression is built in, and the SDK's exporter
/// would fail every request over it, so one is refused at start with a clear message.
pub fn check_compression(get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
    let names = [
        "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
        "OTEL_EXPORTER_OTLP_COMPRESSION",
    ];
    match unsupported(&get, names, &["none"]) {
        Some((name, value)) => Err(ConfigError::Invalid {
            name,
            value,
            what: "compression: sockspan sends requests uncompressed (use none)",
        }),
        None => Ok(()),
    }
}

/// The first of `names` set to a value (trimmed, lower case) that is not blank and not one of
/// `supported`: each variable is checked, not only the one that wins.
fn unsupported(
    get: &impl Fn(&str) -> Option<String>,
    names: [&'static str; 2],
    supported: &[&str],
) -> Option<(&'static str, String)> {
    names.into_iter().find_map(|name| {
        let v = get(name)?.trim().to_ascii_lowercase();
        (!v.is_empty() && !supported.contains(&v.as_str())).then_some((name, v))
    })
}

/// The way into the exporter: spans waiting for export (in the channel and in the exporter's
/// queue together) are bounded by `OTEL_BSP_MAX_QUEUE_SIZE`, so a slow collector costs counted
/// drops, not memory.
#[derive(Clone)]
pub struct ExportQueue {
    tx: mpsc::Sender<Vec<Span>>,
    queued: Arc<AtomicUsize>,
    limit: usize,
    budget: Option<MemoryBudget>,
}

impl ExportQueue {
    /// Holds no more spans than the budget's export share, at [`SPAN_BYTES`] each (beyond:
    /// `export_queue_full`), and refuses spans (`memory_limit`) while the agent is over it.
    pub fn with_budget(mut self, budget: MemoryBudget) -> Self {
        self.limit = self.limit.min((budget.export_queue_bytes() / SPAN_BYTES) as usize);
        self.budget = Some(budget);
        self
    }

    /// Hands spans to the exporter; what does not fit is dropped and counted.
    pub fn send(&self, mut spans: Vec<Span>, metrics: &Metrics) {
        if self.budget.is_some_and(|b| b.exhausted()) {
            metrics.spans_dropped_memory_limit.add(spans.len() as u64);
            return;
        }
        let room = self.limit.saturating_sub(self.queued.load(Relaxed));
        if spans.len() > room {
            metrics.spans_dropped_queue_full.add((spans.len() - room) as u64);
            spans.truncate(room);
        }
        let n = spans.len();
        if n == 0 {
            return;
        }
        self.queued.fetch_add(n, Relaxed);
        if self.tx.try_send(spans).is_err() {
            self.queued.fetch_sub(n, Relaxed);
            metrics.spans_dropped_channel_full.add(n as u64);
        }
    }
}

/// What sends an export request: sockspan's own OTLP/HTTP protobuf transport, fed bytes
/// written straight from its spans, or (gRPC, JSON) the SDK's exporter.
enum Sender {
    Direct(Arc<super::http::HttpTraces>),
    Sdk(Box<SpanExporter>),
}

/// A request's spans, in the form its sender takes.
enum Payload {
    Protobuf(Vec<u8>),
    SpanData(Vec<SpanData>),
}

impl Sender {
    async fn send(&self, payload: Payload, metrics: &Metrics) -> Result<(), String> {
        match (self, payload) {
            (Sender::Direct(http), Payload::Protobuf(body)) => http.export(body, &metrics.export_retries).await,
            (Sender::Sdk(exporter), Payload::SpanData(spans)) => {
                exporter.export(spans).await.map_err(|e| e.to_string())
            }
            _ => Err("internal error: a payload for another sender".to_owned()),
        }
    }
}

pub struct OtlpExporter {
    /// Senders not exporting now. The SDK's exporter takes one export at a time, so
    /// concurrent exports use one instance each (`max_concurrent_exports` of them).
    idle: Vec<Sender>,
    /// Spans in the channel or `run`'s queue (shared with [`ExportQueue`]).
    queued: Arc<AtomicUsize>,
    bsp: BspConfig,
    metrics: Arc<Metrics>,
    scope: InstrumentationScope,
    /// After a failed export, batches are dropped (counted) without trying until this time, and
    /// the wait doubles with each further failure: an unreachable collector costs one attempt
    /// per backoff period, not one per batch, and the queue never backs up behind it.
    retry_at: Option<tokio::time::Instant>,
    backoff: Duration,
    /// Spans per export request at most: `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`, halved each time
    /// the collector refuses a request as too large.
    batch_limit: usize,
    /// Whether the agent has time to spare: encoding a request then offers the CPU
    /// ([`crate::courtesy`]).
    slack: Slack,
    /// Set when the agent stops: the final flush ends by then, dropping (counting) the rest.
    deadline: Option<tokio::time::Instant>,
}

const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Why an export failed, from the sender's error (an HTTP status reads "status code: N" from
/// either HTTP exporter, a gRPC one "gRPC code: Name", and a refused or broken connection is a
/// network or transport error).
fn classify(error: &str) -> ExportFailure {
    if error.contains("status code: 413") {
        ExportFailure::TooLarge
    } else if error.contains("timed out") || error.contains("DeadlineExceeded") {
        ExportFailure::Timeout
    } else if ["network error", "transport error", "Connection refused", "connect"]
        .iter()
        .any(|s| error.contains(s))
    {
        ExportFailure::Unreachable
    } else {
        ExportFailure::Status
    }
}

/// `d` ± 20 %, random.
fn jittered(d: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let r = std::collections::hash_map::RandomState::new().build_hasher().finish() % 401;
    d * (800 + r as u32) / 1000
}

/// Time the final flush may take after the span channel closes.
pub const FINAL_FLUSH: Duration = Duration::from_millis(2500);

impl OtlpExporter {
    /// Builds the exporter from the standard environment. Needs a tokio runtime (gRPC).
    pub fn from_env(bsp: BspConfig, metrics: Arc<Metrics>) -> Result<Self, ConfigError> {
        let env = |k: &str| std::env::var(k).ok();
        check_protocol(env)?;
        check_compression(env)?;
        let tls = super::tls::TlsFiles::from_lookup(env)?;
        let idle = match super::http::HttpTraces::from_lookup(&env, &tls)? {
            Some(http) => {
                let http = Arc::new(http);
                (0..bsp.max_concurrent_exports)
                    .map(|_| Sender::Direct(http.clone()))
                    .collect()
            }
            None => (0..bsp.max_concurrent_exports)
                .map(|_| super::tls::span_exporter(&env, &tls).map(|e| Sender::Sdk(Box::new(e))))
                .collect::<Result<Vec<_>, _>>()?,
        };
        let scope = scope();
        metrics.export_batch_limit.set(bsp.max_export_batch_size as u64);
        Ok(Self {
            idle,
            queued: Arc::new(AtomicUsize::new(0)),
            batch_limit: bsp.max_export_batch_size,
            bsp,
            metrics,
            scope,
            retry_at: None,
            backoff: BACKOFF_MIN,
            deadline: None,
            slack: Slack::default(),
        })
    }

    /// Reads whether the agent has time to spare from `slack` (the pipeline judges it).
    pub fn with_slack(mut self, slack: Slack) -> Self {
        self.slack = slack;
        self
    }

    /// The sending side for [`run`](Self::run), with room for `OTEL_BSP_MAX_QUEUE_SIZE` spans.
    pub fn queue(&self) -> (ExportQueue, mpsc::Receiver<Vec<Span>>) {
        // Batches, not spans: the span bound is `queued`.
        let (tx, rx) = mpsc::channel(1024);
        let q = ExportQueue {
            tx,
            queued: self.queued.clone(),
            limit: self.bsp.max_queue_size,
            budget: None,
        };
        (q, rx)
    }

    /// Queues spans from `rx` and exports them every schedule delay or whenever a full batch is
    /// waiting, up to `max_concurrent_exports` requests at once. On channel close, flushes what
    /// is left within [`FINAL_FLUSH`]; what is still unsent then is dropped and counted.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Vec<Span>>) {
        let mut work = Work::default();
        let mut in_flight: JoinSet<Done> = JoinSet::new();
        let mut tick = tokio::time::interval(self.bsp.schedule_delay);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut open = true;
        loop {
            self.launch(&mut work, &mut in_flight);
            self.publish_queued(&work);
            if !open && work.is_empty() && in_flight.is_empty() {
                break;
            }
            let deadline = self.deadline.unwrap_or_else(tokio::time::Instant::now);
            tokio::select! {
                batch = rx.recv(), if open => match batch {
                    // Room for them was counted by `ExportQueue::send`.
                    Some(spans) => work.queue.extend(spans),
                    None => {
                        // Final flush: one more attempt even if the collector looked down.
                        open = false;
                        work.flush = true;
                        self.deadline = Some(tokio::time::Instant::now() + FINAL_FLUSH);
                        self.retry_at = None;
                    }
                },
                _ = tick.tick(), if open => work.flush = true,
                Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                    if let Ok(done) = done {
                        self.finished(done, &mut work);
                    }
                }
                () = tokio::time::sleep_until(deadline), if !open => break,
            }
        }
        // Out of time: what is left is dropped and counted.
        in_flight.abort_all();
        let left = work.queue.len() as u64 + work.jobs.iter().map(|(_, s)| s.len() as u64).sum::<u64>();
        self.metrics
            .spans_dropped_export_failed
            .add(left + work.in_flight_spans);
        for sender in &self.idle {
            if let Sender::Sdk(exporter) = sender {
                let _ = exporter.shutdown_with_timeout(Duration::from_millis(200));
            }
        }
    }

    /// Spans handed over and not yet exported or dropped: in the channel or the queue, waiting
    /// as jobs, or being exported.
    fn publish_queued(&self, work: &Work) {
        let jobs: u64 = work.jobs.iter().map(|(_, s)| s.len() as u64).sum();
        self.metrics
            .spans_queued
            .set(self.queued.load(Relaxed) as u64 + jobs + work.in_flight_spans);
    }

    /// Starts exports while an exporter is idle and there is a full batch (or anything, when
    /// flushing). Spans wait in the bounded queue, not in requests nobody can send yet.
    fn launch(&mut self, work: &mut Work, in_flight: &mut JoinSet<Done>) {
        loop {
            if work.jobs.is_empty() {
                let ready = work.queue.len() >= self.batch_limit || (work.flush && !work.queue.is_empty());
                if !ready || self.idle.is_empty() {
                    if work.queue.is_empty() {
                        work.flush = false;
                    }
                    return;
                }
                let n = work.queue.len().min(self.batch_limit);
                let batch: Vec<Span> = work.queue.drain(..n).collect();
                self.queued.fetch_sub(n, Relaxed);
                work.jobs.extend(group_by_process(batch));
            }
            let now = tokio::time::Instant::now();
            if self.retry_at.is_some_and(|t| now < t) || self.deadline.is_some_and(|d| now >= d) {
                // Backing off after a failure (or out of time): dropped and counted.
                let dropped: u64 = work.jobs.drain(..).map(|(_, s)| s.len() as u64).sum();
                self.metrics.spans_dropped_export_failed.add(dropped);
                continue;
            }
            let Some(mut exporter) = self.idle.pop() else { return };
            let Some((process, spans)) = work.jobs.pop_front() else {
                self.idle.push(exporter);
                return;
            };
            let count = spans.len() as u64;
            let payload = match &mut exporter {
                Sender::Direct(_) => Payload::Protobuf(encode_request(&process, &spans, &self.slack)),
                Sender::Sdk(sdk) => {
                    sdk.set_resource(&resource(&process));
                    let mut stretch = Stretch::begin(monotonic_ns, &self.slack);
                    let spans = spans.into_iter().map(|s| {
                        stretch.offer_if_due();
                        to_span_data(s, &self.scope)
                    });
                    Payload::SpanData(spans.collect())
                }
            };
            let timeout = match self.deadline {
                Some(d) => self.bsp.export_timeout.min(d.saturating_duration_since(now)),
                None => self.bsp.export_timeout,
            };
            work.in_flight_spans += count;
            let metrics = self.metrics.clone();
            in_flight.spawn(async move {
                let result = match tokio::time::timeout(timeout, exporter.send(payload, &metrics)).await {
                    Ok(result) => result,
                    Err(_) => Err("export timed out".to_owned()),
                };
                Done {
                    exporter,
                    count,
                    result,
                }
            });
        }
    }

    fn finished(&mut self, done: Done, work: &mut Work) {
        self.idle.push(done.exporter);
        work.in_flight_spans -= done.count;
        match done.result {
            Ok(()) => {
                self.metrics.spans_exported.add(done.count);
                self.metrics.export_succeeded();
                self.backoff = BACKOFF_MIN;
            }
            Err(e) => self.failed(done.count, &e),
        }
    }

    /// An export request failed after the sender's own retries (429, 502, 503, 504 and network
    /// errors, with backoff and jitter): its spans are dropped, counted. A collector that
    /// refused it as too large gets requests half as large from then on; any other failure
    /// starts (or extends) a backoff.
    fn failed(&mut self, count: u64, error: &str) {
        self.metrics.spans_dropped_export_failed.add(count);
        self.metrics.export_failed();
        let why = classify(error);
        let failures: u64 = self.metrics.export_requests_failed.iter().map(Counter::get).sum();
        self.metrics.export_requests_failed[why as usize].inc();
        if why == ExportFailure::TooLarge {
            if self.batch_limit > 1 {
                self.batch_limit /= 2;
                self.metrics.export_batch_limit.set(self.batch_limit as u64);
                tracing::warn!(
                    spans = count,
                    batch_limit = self.batch_limit,
                    "The OTLP collector refused a request as too large (413); spans dropped, later requests carry half as many"
                );
            }
            return;
        }
        let now = tokio::time::Instant::now();
        // Concurrent requests failing together start one backoff, not one each; the jitter
        // keeps a node's agents from retrying a recovering collector in step.
        if self.retry_at.is_none_or(|t| t <= now) {
            self.retry_at = Some(now + jittered(self.backoff));
            self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        }
        // Rate-limited: the first failure, then every 100th.
        if failures.is_multiple_of(100) {
            tracing::warn!(
                error,
                spans = count,
                failures = failures + 1,
                "OTLP export failed; spans dropped"
            );
        }
    }
}

pub fn resource(p: &ProcessInfo) -> Resource {
    Resource::builder_empty()
        .with_attributes([
            KeyValue::new("service.name", p.service_name.clone()),
            KeyValue::new("process.pid", i64::from(p.pid)),
            KeyValue::new("process.executable.name", p.executable_name.clone()),
            KeyValue::new("host.name", p.host_name.to_string()),
            KeyValue::new("telemetry.sdk.name", "sockspan"),
        ])
        .with_attributes(p.container_id.iter().map(|c| KeyValue::new("container.id", c.clone())))
        .with_attributes(
            p.pod
                .iter()
                .flat_map(|pod| pod.attributes())
                .map(|(k, v)| KeyValue::new(k, v.to_owned())),
        )
        .build()
}

/// Spans waiting for the exporter.
#[derive(Default)]
struct Work {
    /// Spans not yet in a request (bounded with the channel by `ExportQueue`).
    queue: VecDeque<Span>,
    /// Requests of the batch being sent, one per process resource.
    jobs: VecDeque<(Arc<ProcessInfo>, Vec<Span>)>,
    /// Spans in requests in flight.
    in_flight_spans: u64,
    /// Send partial batches too (the schedule delay passed, or the agent is stopping).
    flush: bool,
}

impl Work {
    fn is_empty(&self) -> bool {
        self.queue.is_empty() && self.jobs.is_empty()
    }
}

/// An export request that finished, with its exporter (idle again).
struct Done {
    exporter: Sender,
    count: u64,
    result: Result<(), String>,
}

/// The spans of a batch grouped by process (one export request each).
fn group_by_process(batch: Vec<Span>) -> Vec<(Arc<ProcessInfo>, Vec<Span>)> {
    let mut groups: Vec<(Arc<ProcessInfo>, Vec<Span>)> = Vec::new();
    // By pointer: the process table hands out one Arc per process, and hashing the resource's
    // strings per span cost more than building the span.
    let mut index: crate::FastMap<*const ProcessInfo, usize> = crate::FastMap::default();
    for span in batch {
        let i = *index.entry(Arc::as_ptr(&span.resource)).or_insert_with(|| {
            groups.push((span.resource.clone(), Vec::new()));
            groups.len() - 1
        });
        groups[i].1.push(span);
    }
    groups
}

/// One process's spans as the OTLP protobuf request [`super::http`] sends, offering the CPU
/// as it goes while the agent has time to spare (a request of 512 spans is a stretch of a few
/// hundred µs).
fn encode_request(process: &ProcessInfo, spans: &[Span], slack: &Slack) -> Vec<u8> {
    let mut out = Vec::with_capacity(spans.len() * 512);
    let mut stretch = Stretch::begin(monotonic_ns, slack);
    super::proto::write_resource_spans(&mut out, &resource(process), SCOPE, spans, || {
        stretch.offer_if_due();
    });
    out
}

/// Encodes a batch of spans into OTLP protobuf as the exporter does (one request per process
/// resource, concatenated: protobuf reads that as one request with them all): for benchmarks,
/// and for the test of [`super::proto`].
#[cfg(any(test, feature = "bench"))]
pub fn encode_with_sdk(spans: Vec<Span>) -> Vec<u8> {
    use prost::Message as _;
    let scope = scope();
    let mut out = Vec::new();
    for (process, spans) in group_by_process(spans) {
        let spans = spans.into_iter().map(|s| to_span_data(s, &scope)).collect();
        let resource = (&resource(&process)).into();
        let resource_spans =
            opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope(spans, &resource);
        opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest { resource_spans }
            .encode(&mut out)
            .expect("a Vec grows");
    }
    out
}

/// The same request written straight from sockspan's spans ([`super::proto`]).
#[cfg(any(test, feature = "bench"))]
pub fn encode_direct(spans: Vec<Span>) -> Vec<u8> {
    let mut out = Vec::new();
    for (process, spans) in group_by_process(spans) {
        out.extend_from_slice(&encode_request(&process, &spans, &Slack::default()));
    }
    out
}

/// A sampled, local span context.
fn span_context(trace_id: [u8; 16], span_id: [u8; 8]) -> SpanContext {
    SpanContext::new(
        TraceId::from_bytes(trace_id),
        SpanId::from_bytes(span_id),
        TraceFlags::SAMPLED,
        false,
        TraceState::default(),
    )
}

fn to_link(l: &crate::span::SpanLink) -> Link {
    let ctx = span_context(l.trace_id, l.span_id);
    Link::new(
        ctx,
        vec![KeyValue::new(crate::vocab::attr::SOCKSPAN_LINK_SOURCE, l.source)],
        0,
    )
}

fn to_span_data(span: Span, scope: &InstrumentationScope) -> SpanData {
    // SpanLinks is non-exhaustive: built empty, then filled.
    let mut links = SpanLinks::default();
    links.links = span.links.iter().map(to_link).collect();
    let ctx = span_context(span.trace_id, span.span_id);
    let attributes = span
        .attributes
        .into_iter()
        .map(|(k, v)| {
            KeyValue::new(
                k,
                match v {
                    AttrValue::Str(s) => Value::from(s),
                    AttrValue::Int(i) => Value::I64(i),
                    AttrValue::Bool(b) => Value::Bool(b),
                },
            )
        })
        .collect();
    SpanData {
        span_context: ctx,
        parent_span_id: span.parent_span_id.map_or(SpanId::INVALID, SpanId::from_bytes),
        parent_span_is_remote: false,
        span_kind: match span.kind {
            SpanKind::Server => OtelKind::Server,
            SpanKind::Client => OtelKind::Client,
        },
        name: Cow::Owned(span.name),
        start_time: UNIX_EPOCH + Duration::from_nanos(span.start_unix_ns),
        end_time: UNIX_EPOCH + Duration::from_nanos(span.end_unix_ns),
        attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links,
        status: if span.error { Status::error("") } else { Status::Unset },
        instrumentation_scope: scope.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bsp_from_env_map() {
        let env: std::collections::HashMap<&str, &str> = [
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "64"),
        ]
        .into();
        let cfg = BspConfig::from_lookup(|k| env.get(k).map(|v| (*v).to_owned())).unwrap();
        assert_eq!(cfg.schedule_delay, Duration::from_millis(200));
        assert_eq!(cfg.max_export_batch_size, 64);
        assert_eq!(cfg.max_queue_size, 65_536);
        assert_eq!(cfg.max_concurrent_exports, 4);
        let one = BspConfig::from_lookup(|k| (k == "OTEL_BSP_MAX_CONCURRENT_EXPORTS").then(|| "0".to_owned())).unwrap();
        assert_eq!(one.max_concurrent_exports, 1);
        let bad = BspConfig::from_lookup(|k| (k == "OTEL_BSP_MAX_QUEUE_SIZE").then(|| "lots".to_owned()));
        assert!(bad.unwrap_err().to_string().contains("OTEL_BSP_MAX_QUEUE_SIZE"));
    }

    /// Spans waiting for export are bounded as a whole; what does not fit is counted.
    #[test]
    fn export_queue_bounds_waiting_spans() {
        let span = Span::sample;
        let (tx, mut rx) = mpsc::channel(16);
        let queued = Arc::new(AtomicUsize::new(0));
        let q = ExportQueue {
            tx,
            queued: queued.clone(),
            limit: 10,
            budget: None,
        };
        let metrics = Metrics::new();
        q.send((0..6).map(span).collect(), &metrics);
        q.send((6..12).map(span).collect(), &metrics);
        assert_eq!(queued.load(Relaxed), 10);
        assert_eq!(metrics.spans_dropped_queue_full.get(), 2);
        assert_eq!(rx.try_recv().map(|b| b.len()).ok(), Some(6));
        assert_eq!(rx.try_recv().map(|b| b.len()).ok(), Some(4));
        // The exporter took them: room again.
        queued.fetch_sub(10, Relaxed);
        q.send((12..15).map(span).collect(), &metrics);
        assert_eq!(rx.try_recv().map(|b| b.len()).ok(), Some(3));
        assert_eq!(metrics.spans_dropped_queue_full.get(), 2);
    }

    #[test]
    fn export_failures_classified_from_the_exporters_messages() {
        use super::{ExportFailure::*, classify};
        for (error, why) in [
            ("HTTP export failed with status code: 413", TooLarge),
            ("HTTP export failed with status code: 500", Status),
            ("HTTP export failed: network error", Unreachable),
            ("export timed out", Timeout),
            (
                "TonicTracesClient export failed with gRPC code: Unavailable: transport error: Connection refused (os error 111)",
                Unreachable,
            ),
            (
                "TonicTracesClient export failed with gRPC code: DeadlineExceeded",
                Timeout,
            ),
            (
                "TonicTracesClient export failed with gRPC code: PermissionDenied",
                Status,
            ),
        ] {
            assert_eq!(classify(error), why, "{error}");
        }
    }

    #[test]
    fn backoff_jitter_stays_within_a_fifth() {
        let d = std::time::Duration::from_secs(10);
        let waits: Vec<_> = (0..64).map(|_| super::jittered(d)).collect();
        assert!(
            waits.iter().all(|w| (8_000..=12_000).contains(&w.as_millis())),
            "{waits:?}"
        );
        assert!(waits.iter().any(|w| *w != waits[0]), "not jittered: {waits:?}");
    }

    #[test]
    fn protocol_checked() {
        assert!(check_protocol(|_| Some("grpc".into())).is_ok());
        assert!(check_protocol(|_| Some("http/protobuf".into())).is_ok());
        assert!(check_protocol(|_| Some("carrier-pigeon".into())).is_err());
        assert!(check_compression(|_| Some("none".into())).is_ok());
        assert!(check_compression(|_| None).is_ok());
        let err = check_compression(|_| Some("gzip".into())).expect_err("refused");
        assert!(err.to_string().contains("COMPRESSION"), "{err}");
        assert!(endpoint_configured(
            |k| (k == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| "http://x:4318".into())
        ));
        assert!(!endpoint_configured(|_| None));
    }
}
