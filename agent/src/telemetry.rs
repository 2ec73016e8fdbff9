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

/// Counters shared by every stage. Names follow `sockspan_<what>_total`.
#[derive(Default, Debug)]
pub struct Metrics {
    pub events_read: Counter,
    pub events_dropped_channel_full: Counter,
    pub events_decode_failed: Counter,
    pub kernel_ringbuf_full: Counter,
    pub kernel_pending_full: Counter,
    pub kernel_payload_read_failed: Counter,
    pub kernel_events_submitted: Counter,
    pub connections_opened: Counter,
    pub connections_evicted: Counter,
    pub exchanges: Counter,
    pub spans_created: Counter,
    pub spans_exported: Counter,
    pub spans_printed: Counter,
    pub spans_dropped_queue_full: Counter,
    pub spans_dropped_export_failed: Counter,
    pub spans_dropped_channel_full: Counter,
    pub export_requests_failed: Counter,
    /// HTTP parser rejections by reason (label values are static names).
    pub http_rejected: Mutex<Vec<(&'static str, u64)>>,
    /// The stitcher's decisions.
    pub stitch: Mutex<crate::stitch::StitchStats>,
    /// The event-loop tracker's causes and abstentions.
    pub loops: Mutex<crate::loops::LoopStats>,
    /// The goroutine tracker's reports and chains.
    pub go: Mutex<crate::goroutines::GoStats>,
    /// Go executables hooked, and those whose hooks failed (the attacher's counts).
    pub go_executables_hooked: Counter,
    pub go_executables_failed: Counter,
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
    }

    pub fn set_http_rejected(&self, values: Vec<(&'static str, u64)>) {
        if let Ok(mut g) = self.http_rejected.lock() {
            *g = values;
        }
    }

    pub fn set_stitch(&self, stats: crate::stitch::StitchStats) {
        if let Ok(mut g) = self.stitch.lock() {
            *g = stats;
        }
    }

    pub fn set_loops(&self, stats: crate::loops::LoopStats) {
        if let Ok(mut g) = self.loops.lock() {
            *g = stats;
        }
    }

    pub fn set_go(&self, stats: crate::goroutines::GoStats) {
        if let Ok(mut g) = self.go.lock() {
            *g = stats;
        }
    }

    /// Spans lost anywhere after creation.
    pub fn spans_dropped(&self) -> u64 {
        self.spans_dropped_queue_full.get()
            + self.spans_dropped_export_failed.get()
            + self.spans_dropped_channel_full.get()
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let mut c = |name: &str, help: &str, labels: &[(&str, &str, u64)]| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter");
            for (k, v, n) in labels {
                if k.is_empty() {
                    let _ = writeln!(s, "{name} {n}");
                } else {
                    let _ = writeln!(s, "{name}{{{k}=\"{v}\"}} {n}");
                }
            }
        };
        c(
            "sockspan_kernel_events_submitted_total",
            "Events the kernel programs wrote to the ring buffer.",
            &[("", "", self.kernel_events_submitted.get())],
        );
        c(
            "sockspan_kernel_events_lost_total",
            "Events the kernel could not deliver, by reason.",
            &[
                ("reason", "ringbuf_full", self.kernel_ringbuf_full.get()),
                ("reason", "pending_map_full", self.kernel_pending_full.get()),
                ("reason", "payload_read_failed", self.kernel_payload_read_failed.get()),
            ],
        );
        c(
            "sockspan_events_read_total",
            "Ring-buffer records read by userspace.",
            &[("", "", self.events_read.get())],
        );
        c(
            "sockspan_events_dropped_total",
            "Events dropped in userspace, by reason.",
            &[
                ("reason", "channel_full", self.events_dropped_channel_full.get()),
                ("reason", "decode_failed", self.events_decode_failed.get()),
            ],
        );
        c(
            "sockspan_connections_total",
            "TCP connections tracked.",
            &[("", "", self.connections_opened.get())],
        );
        c(
            "sockspan_connections_evicted_total",
            "Connections forgotten because idle or over the table limit.",
            &[("", "", self.connections_evicted.get())],
        );
        c(
            "sockspan_http_exchanges_total",
            "HTTP request/response exchanges assembled.",
            &[("", "", self.exchanges.get())],
        );
        let rejected: Vec<(&str, &str, u64)> = self
            .http_rejected
            .lock()
            .map(|g| g.iter().map(|(r, n)| ("reason", *r, *n)).collect())
            .unwrap_or_default();
        c(
            "sockspan_http_rejected_total",
            "Streams or messages the HTTP parser rejected or skipped, by reason.",
            &rejected,
        );
        let st = self.stitch.lock().map(|g| *g).unwrap_or_default();
        let parents: Vec<(&str, &str, u64)> = crate::stitch::ParentSource::ALL
            .iter()
            .map(|src| ("source", src.as_str(), st.parents[*src as usize]))
            .collect();
        c(
            "sockspan_stitch_parents_total",
            "Requests given a parent, by the rule that inferred it.",
            &parents,
        );
        for (name, help, n) in [
            (
                "sockspan_stitch_roots_total",
                "Requests that started a trace (no parent inferred).",
                st.roots,
            ),
            (
                "sockspan_stitch_abstained_total",
                "Client requests left without a parent because several in-flight requests could be theirs.",
                st.ambiguous,
            ),
            (
                "sockspan_stitch_links_total",
                "Requests left without a parent but given a span link to a likely one (an unconfirmed event-loop cause).",
                st.loop_links,
            ),
            (
                "sockspan_stitch_late_loop_confirmations_total",
                "Event-loop causes confirmed only after their request had been decided without them.",
                st.late_loop_confirmations,
            ),
            (
                "sockspan_stitch_late_items_total",
                "Events that arrived after the reorder window had passed their time.",
                st.late_items,
            ),
            (
                "sockspan_stitch_thread_rule_disabled_total",
                "Processes seen answering from another thread than the reading one (no parents by thread).",
                st.thread_rule_disabled,
            ),
        ] {
            c(name, help, &[("", "", n)]);
        }
        let loops = self.loops.lock().map(|g| g.counters()).unwrap_or_default();
        for (name, help, labelled) in &loops {
            c(name, help, labelled);
        }
        let mut go = self.go.lock().map(|g| *g).unwrap_or_default();
        go.executables_hooked = self.go_executables_hooked.get();
        go.executables_failed = self.go_executables_failed.get();
        for (name, help, labelled) in &go.counters() {
            c(name, help, labelled);
        }
        c(
            "sockspan_spans_created_total",
            "Spans built from exchanges.",
            &[("", "", self.spans_created.get())],
        );
        c(
            "sockspan_spans_exported_total",
            "Spans accepted by the OTLP endpoint.",
            &[("", "", self.spans_exported.get())],
        );
        c(
            "sockspan_spans_printed_total",
            "Spans printed on stdout.",
            &[("", "", self.spans_printed.get())],
        );
        c(
            "sockspan_spans_dropped_total",
            "Spans lost, by reason.",
            &[
                ("reason", "export_queue_full", self.spans_dropped_queue_full.get()),
                ("reason", "export_failed", self.spans_dropped_export_failed.get()),
                ("reason", "channel_full", self.spans_dropped_channel_full.get()),
            ],
        );
        c(
            "sockspan_export_requests_failed_total",
            "OTLP export requests that failed.",
            &[("", "", self.export_requests_failed.get())],
        );
        let _ = writeln!(
            s,
            "# HELP sockspan_heap_bytes Bytes the agent has allocated and not freed.\n\
             # TYPE sockspan_heap_bytes gauge\nsockspan_heap_bytes {}",
            crate::alloc::live_bytes()
        );
        s
    }

    /// One line for the end of a run.
    pub fn summary(&self) -> String {
        format!(
            "events_read={} kernel_lost={} events_dropped={} exchanges={} spans_created={} spans_exported={} spans_printed={} spans_dropped={}",
            self.events_read.get(),
            self.kernel_ringbuf_full.get() + self.kernel_pending_full.get(),
            self.events_dropped_channel_full.get() + self.events_decode_failed.get(),
            self.exchanges.get(),
            self.spans_created.get(),
            self.spans_exported.get(),
            self.spans_printed.get(),
            self.spans_dropped(),
        )
    }
}

/// Serves `GET /metrics` (and anything else) with the Prometheus text.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) -> std::io::Result<()> {
    loop {
        let (mut sock, _) = listener.accept().await?;
        let metrics = metrics.clone();
        tokio::spawn(async move {
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
            let body = metrics.render();
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(body.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}
