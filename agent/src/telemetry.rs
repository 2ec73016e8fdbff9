//! The agent's own metrics: every event, drop and rejection is counted here and served in the
//! Prometheus text format (`--metrics-addr`), and summarised at exit.
use std::{
    fmt::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::loader::KernelCounters;

#[derive(Default, Debug)]
pub struct Counter(AtomicU64);
impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
    pub fn set(&self, n: u64) {
        self.0.store(n, Relaxed);
    }
}

/// What kind of value a [`Family`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// One exported metric family, named, described and filled by the stage that keeps its values
/// (`families()` beside each stage's counters); this module only prints them.
#[derive(Clone, Debug)]
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    /// (label name, label value, value); an empty label name gives the bare metric name.
    pub samples: Vec<(&'static str, &'static str, u64)>,
}

impl Family {
    pub fn counter(name: &'static str, help: &'static str, samples: Vec<(&'static str, &'static str, u64)>) -> Self {
        Self {
            name,
            help,
            kind: Kind::Counter,
            samples,
        }
    }

    /// One unlabelled counter.
    pub fn total(name: &'static str, help: &'static str, n: u64) -> Self {
        Self::counter(name, help, vec![("", "", n)])
    }

    pub fn gauge(name: &'static str, help: &'static str, samples: Vec<(&'static str, &'static str, u64)>) -> Self {
        Self {
            kind: Kind::Gauge,
            ..Self::counter(name, help, samples)
        }
    }

    /// One unlabelled gauge.
    pub fn level(name: &'static str, help: &'static str, n: u64) -> Self {
        Self::gauge(name, help, vec![("", "", n)])
    }

    fn render(&self, s: &mut String) {
        let kind = match self.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let _ = writeln!(s, "# HELP {} {}\n# TYPE {} {kind}", self.name, self.help, self.name);
        for (k, v, n) in &self.samples {
            if k.is_empty() {
                let _ = writeln!(s, "{} {n}", self.name);
            } else {
                let _ = writeln!(s, "{}{{{k}=\"{v}\"}} {n}", self.name);
            }
        }
    }
}

/// Why an OTLP export request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFailure {
    Status,
    TooLarge,
    Unreachable,
    Timeout,
}

impl ExportFailure {
    pub const ALL: [Self; 4] = [Self::Status, Self::TooLarge, Self::Unreachable, Self::Timeout];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Status => "status",
            Self::TooLarge => "too_large",
            Self::Unreachable => "unreachable",
            Self::Timeout => "timeout",
        }
    }
}

/// Counts kept across threads (reader, exporter, Go hooks' attacher) and the latest snapshot of
/// the pipeline stages' own families. Names follow `sockspan_<what>_total`.
#[derive(Default, Debug)]
pub struct Metrics {
    pub events_read: Counter,
    pub events_dropped_channel_full: Counter,
    pub events_dropped_memory_limit: Counter,
    pub kernel_ringbuf_full: Counter,
    pub kernel_pending_full: Counter,
    pub kernel_payload_read_failed: Counter,
    pub kernel_events_submitted: Counter,
    pub kernel_late_stashes: Counter,
    /// Sends and receives of what is not selected (`--trace-*`, `--ignore-*`): not reported by
    /// the kernel, or dropped here (a process's first events, before the kernel knew).
    pub kernel_unselected: Counter,
    pub events_unselected: Counter,
    pub spans_created: Counter,
    pub spans_exported: Counter,
    /// The print thread's counts.
    pub print: Arc<crate::export::PrintCounts>,
    /// Sampling's counts.
    pub sampling: Arc<crate::sampling::SamplingCounts>,
    /// The Kubernetes metadata's counts.
    pub kube: Arc<crate::kube::KubeCounts>,
    pub spans_dropped_queue_full: Counter,
    pub spans_dropped_export_failed: Counter,
    pub spans_dropped_channel_full: Counter,
    pub spans_dropped_memory_limit: Counter,
    /// The `--memory-limit` in bytes (0: none, e.g. in replays).
    pub memory_limit: Counter,
    /// Spans handed to the exporter and not yet exported or dropped (its queue and the
    /// requests in progress).
    pub spans_queued: Counter,
    /// Failed export requests by why: the collector answered with an error status, refused
    /// the request as too large (413), could not be reached, or did not answer in time.
    pub export_requests_failed: [Counter; ExportFailure::ALL.len()],
    /// Spans per export request at most (halved on each 413).
    pub export_batch_limit: Counter,
    /// OTLP/HTTP protobuf requests sent again after a retryable failure (sockspan's own
    /// sender; the SDK's do not report theirs).
    pub export_retries: Counter,
    /// Go executables hooked, and those whose hooks failed (the attacher's counts).
    pub go_executables_hooked: Counter,
    pub go_executables_failed: Counter,
    /// Health: when (monotonic ms) exports began failing without a success since (0: they do
    /// not fail), and when the pipeline last ticked.
    pub export_failing_since_ms: Counter,
    pub pipeline_alive_ms: Counter,
    /// The pipeline stages' families, as they last published them.
    stages: Mutex<Vec<Family>>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn set_kernel(&self, k: &KernelCounters) {
        self.kernel_ringbuf_full.set(k.ringbuf_full);
        self.kernel_pending_full.set(k.pending_full);
        self.kernel_payload_read_failed.set(k.payload_read_failed);
        self.kernel_events_submitted.set(k.events_submitted);
        self.kernel_late_stashes.set(k.late_stashes);
        self.kernel_unselected.set(k.unselected);
    }

    /// Replaces the stages' snapshot.
    pub fn set_stages(&self, families: Vec<Family>) {
        if let Ok(mut g) = self.stages.lock() {
            *g = families;
        }
    }

    /// The value of an unlabelled family of the stages' snapshot, or of one labelled sample.
    pub fn stage_value(&self, name: &str, label_value: Option<&str>) -> Option<u64> {
        let g = self.stages.lock().ok()?;
        let f = g.iter().find(|f| f.name == name)?;
        f.samples
            .iter()
            .find(|(k, v, _)| label_value.map_or(k.is_empty(), |want| *v == want))
            .map(|s| s.2)
    }

    /// The export succeeded: healthy again.
    pub fn export_succeeded(&self) {
        self.export_failing_since_ms.set(0);
    }

    /// An export failed: failing since now, unless it already was.
    pub fn export_failed(&self) {
        if self.export_failing_since_ms.get() == 0 {
            self.export_failing_since_ms.set(now_ms().max(1));
        }
    }

    /// Why the agent is unhealthy, if it is: the pipeline has not ticked for 10 s (stuck), or
    /// exports have failed for longer than `export_grace` without one success.
    pub fn unhealthy(&self, export_grace: std::time::Duration) -> Option<String> {
        let now = now_ms();
        let alive = self.pipeline_alive_ms.get();
        if alive != 0 && now.saturating_sub(alive) > PIPELINE_STALL_MS {
            return Some(format!("pipeline stalled for {} ms", now - alive));
        }
        let since = self.export_failing_since_ms.get();
        if since != 0 && now.saturating_sub(since) > export_grace.as_millis() as u64 {
            return Some(format!("OTLP export failing for {} ms", now - since));
        }
        None
    }

    /// Spans lost anywhere after creation.
    pub fn spans_dropped(&self) -> u64 {
        self.spans_dropped_queue_full.get()
            + self.spans_dropped_export_failed.get()
            + self.spans_dropped_channel_full.get()
            + self.spans_dropped_memory_limit.get()
    }

    /// The families kept here.
    fn own_families(&self) -> Vec<Family> {
        let mut f = vec![
            Family::total(
                "sockspan_kernel_events_submitted_total",
                "Events the kernel programs wrote to the ring buffer.",
                self.kernel_events_submitted.get(),
            ),
            Family::counter(
                "sockspan_kernel_events_lost_total",
                "Events the kernel could not deliver, by reason.",
                vec![
                    ("reason", "ringbuf_full", self.kernel_ringbuf_full.get()),
                    ("reason", "pending_map_full", self.kernel_pending_full.get()),
                    ("reason", "payload_read_failed", self.kernel_payload_read_failed.get()),
                ],
            ),
            Family::total(
                "sockspan_kernel_late_stashes_total",
                "Sends and receives seen at the socket layer without their entry (begun before the agent attached, or evicted from the full in-flight syscall table), completed from the saved registers.",
                self.kernel_late_stashes.get(),
            ),
            Family::counter(
                "sockspan_events_unselected_total",
                "Sends and receives of processes or ports not selected (--trace-*, --ignore-*), by where they stopped: in the kernel (nothing copied) or in the agent (a process's first events, before the kernel was told).",
                vec![
                    ("where", "kernel", self.kernel_unselected.get()),
                    ("where", "agent", self.events_unselected.get()),
                ],
            ),
            Family::total(
                "sockspan_events_read_total",
                "Ring-buffer records read by userspace (every submitted event is read: submitted = read once the ring is drained).",
                self.events_read.get(),
            ),
            Family::counter(
                "sockspan_events_dropped_total",
                "Events read but dropped before the pipeline, by reason.",
                vec![
                    ("reason", "channel_full", self.events_dropped_channel_full.get()),
                    ("reason", "memory_limit", self.events_dropped_memory_limit.get()),
                ],
            ),
            Family::total(
                "sockspan_spans_created_total",
                "Spans built from exchanges (= exported + dropped + sampled out + queued, when exporting).",
                self.spans_created.get(),
            ),
            Family::total(
                "sockspan_spans_exported_total",
                "Spans accepted by the OTLP endpoint.",
                self.spans_exported.get(),
            ),
            Family::total(
                "sockspan_spans_printed_total",
                "Spans printed on stdout.",
                self.print.printed.load(Relaxed),
            ),
            Family::total(
                "sockspan_spans_filtered_total",
                "Spans a live view's filters left out (--service, --status, ...): not printed, exported all the same.",
                self.print.filtered.load(Relaxed),
            ),
            Family::counter(
                "sockspan_spans_dropped_total",
                "Spans lost, by reason (export_*, channel_full: not exported; print_*: not printed, the terminal did not keep up or failed).",
                vec![
                    ("reason", "export_queue_full", self.spans_dropped_queue_full.get()),
                    ("reason", "export_failed", self.spans_dropped_export_failed.get()),
                    ("reason", "channel_full", self.spans_dropped_channel_full.get()),
                    ("reason", "memory_limit", self.spans_dropped_memory_limit.get()),
                    (
                        "reason",
                        "print_queue_full",
                        self.print.dropped_queue_full.load(Relaxed),
                    ),
                    ("reason", "print_failed", self.print.dropped_write_failed.load(Relaxed)),
                ],
            ),
            Family::gauge(
                "sockspan_spans_queued",
                "Spans waiting for a sink: handed to the exporter and not yet exported or dropped (otlp), formatted and not yet written (print), held for their trace to complete before the tail sampler decides (tail_sampling).",
                vec![
                    ("sink", "otlp", self.spans_queued.get()),
                    ("sink", "print", self.print.queued.load(Relaxed)),
                    ("sink", "tail_sampling", self.sampling.held.load(Relaxed)),
                ],
            ),
            Family::counter(
                "sockspan_export_requests_failed_total",
                "OTLP export requests that failed (after the exporter's own retries of 429, 502, 503, 504 and network errors), by why: status (an error status), too_large (413: later requests carry half as many spans), unreachable, timeout.",
                ExportFailure::ALL
                    .iter()
                    .map(|f| ("reason", f.as_str(), self.export_requests_failed[*f as usize].get()))
                    .collect(),
            ),
            Family::total(
                "sockspan_export_retries_total",
                "OTLP/HTTP protobuf export requests sent again after a 429, 502, 503, 504 or network error (the gRPC and JSON exporters retry inside the OpenTelemetry SDK, uncounted).",
                self.export_retries.get(),
            ),
            Family::level(
                "sockspan_export_batch_limit_spans",
                "Spans per OTLP export request at most: OTEL_BSP_MAX_EXPORT_BATCH_SIZE, halved each time the collector refused a request as too large.",
                self.export_batch_limit.get(),
            ),
            Family::level(
                "sockspan_heap_bytes",
                "Bytes the agent has allocated and not freed.",
                crate::alloc::live_bytes(),
            ),
            Family::level(
                "sockspan_resident_bytes",
                "The agent's resident size when last measured (what --memory-limit bounds).",
                crate::budget::resident_now(),
            ),
            Family::level(
                "sockspan_memory_limit_bytes",
                "The --memory-limit: the agent's whole memory budget (the heap, sockspan_heap_bytes, gets it less the ring buffer and a fixed part).",
                self.memory_limit.get(),
            ),
        ];
        f.extend(self.sampling.families());
        f.extend(self.kube.families());
        f
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for f in self.own_families() {
            f.render(&mut s);
        }
        if let Ok(g) = self.stages.lock() {
            for f in g.iter() {
                f.render(&mut s);
            }
        }
        s
    }

    pub fn summary(&self) -> String {
        format!(
            "events_read={} kernel_lost={} events_dropped={} spans_created={} spans_exported={} spans_printed={} spans_dropped={}",
            self.events_read.get(),
            self.kernel_ringbuf_full.get() + self.kernel_pending_full.get(),
            self.events_dropped_channel_full.get() + self.events_dropped_memory_limit.get(),
            self.spans_created.get(),
            self.spans_exported.get(),
            self.print.printed.load(Relaxed),
            self.spans_dropped(),
        )
    }
}

/// A pipeline that has not ticked for this long is stuck.
const PIPELINE_STALL_MS: u64 = 10_000;

pub fn now_ms() -> u64 {
    crate::span::monotonic_ns() / 1_000_000
}

/// Connections answered at once; more wait in the listen backlog (a flood costs a bounded amount).
const MAX_METRICS_CONNECTIONS: usize = 32;

/// Serves `GET /healthz` (200 `ok`, or 503 and why: see [`Metrics::unhealthy`]) and the
/// Prometheus text for anything else. Runs until the agent stops: a failed accept (out of file
/// descriptors, a connection reset while queued) is logged and retried after a pause, never the
/// end of the endpoint.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>, export_grace: std::time::Duration) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_METRICS_CONNECTIONS));
    let mut failures = 0u64;
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            Err(e) => {
                // Rate-limited: the first failure, then every 100th.
                if failures.is_multiple_of(100) {
                    tracing::warn!(error = %e, failures = failures + 1, "Metrics endpoint: accept failed; retrying");
                }
                failures += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _slot = slot;
            // One request per connection: read it to its end (bounded) before answering, so
            // the client never sees its unread request reset the connection.
            let mut buf = [0u8; 4096];
            let mut seen = 0usize;
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
            while seen < buf.len() && !buf[..seen].windows(4).any(|w| w == b"\r\n\r\n") {
                match tokio::time::timeout_at(deadline, sock.read(&mut buf[seen..])).await {
                    Ok(Ok(n)) if n > 0 => seen += n,
                    _ => break,
                }
            }
            let (status, body) = if buf[..seen].starts_with(b"GET /healthz") {
                match metrics.unhealthy(export_grace) {
                    None => ("200 OK", "ok\n".to_owned()),
                    Some(why) => ("503 Service Unavailable", format!("unhealthy: {why}\n")),
                }
            } else {
                ("200 OK", metrics.render())
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            // A reader that stops reading must not hold the slot: the answer has 2 s too.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(body.as_bytes()).await;
                let _ = sock.shutdown().await;
            })
            .await;
        });
    }
}
