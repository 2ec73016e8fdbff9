//! Live spans on stdout: one readable line per span, or one JSON object per line.
use std::{
    io::Write,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
        mpsc,
    },
};

use serde_json::{Map, Value, json};

use crate::{
    courtesy::Stretch,
    span::{AttrValue, Span, monotonic_ns},
    views::SpanFilter,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrintFormat {
    Text,
    Json,
}

impl PrintFormat {
    fn line(self, span: &Span) -> String {
        match self {
            PrintFormat::Text => text_line(span),
            PrintFormat::Json => json_line(span).to_string(),
        }
    }
}

/// Bytes of formatted lines waiting for the terminal; beyond it batches are dropped (counted).
const MAX_QUEUED_BYTES: u64 = 8 << 20;

/// What the print thread did, for the metrics.
#[derive(Debug, Default)]
pub struct PrintCounts {
    pub printed: AtomicU64,
    /// Dropped because the terminal (or pipe) did not keep up, or failed (closed).
    pub dropped_queue_full: AtomicU64,
    pub dropped_write_failed: AtomicU64,
    /// Left out by a view's filters (exported all the same).
    pub filtered: AtomicU64,
    /// Spans formatted and waiting to be written.
    pub queued: AtomicU64,
    queued_bytes: AtomicU64,
}

/// Prints from a thread of its own: capture never waits for a terminal. The pipeline formats
/// each batch and hands it over; while the output does not keep up, batches beyond
/// [`MAX_QUEUED_BYTES`] are dropped and counted.
pub struct PrintQueue {
    format: PrintFormat,
    filter: SpanFilter,
    tx: mpsc::Sender<(String, u64)>,
    counts: Arc<PrintCounts>,
}

impl PrintQueue {
    /// Starts the print thread on `out`; it ends once the queue is dropped and drained.
    pub fn start(
        format: PrintFormat,
        filter: SpanFilter,
        mut out: impl Write + Send + 'static,
        counts: Arc<PrintCounts>,
    ) -> std::io::Result<(Self, std::thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel::<(String, u64)>();
        let c = counts.clone();
        let thread = std::thread::Builder::new().name("print".into()).spawn(move || {
            for (text, n) in rx {
                let ok = out.write_all(text.as_bytes()).and_then(|()| out.flush()).is_ok();
                let counter = if ok { &c.printed } else { &c.dropped_write_failed };
                counter.fetch_add(n, Relaxed);
                c.queued.fetch_sub(n, Relaxed);
                c.queued_bytes.fetch_sub(text.len() as u64, Relaxed);
            }
        })?;
        Ok((
            Self {
                format,
                filter,
                tx,
                counts,
            },
            thread,
        ))
    }

    /// Formats `spans` and queues them for the print thread, or drops them (counted);
    /// formatting offers the CPU as it goes when `polite` ([`crate::courtesy`]).
    pub fn send(&self, spans: &[Span], polite: bool) {
        let c = &self.counts;
        let shown: Vec<&Span> = spans.iter().filter(|s| self.filter.matches(s)).collect();
        c.filtered.fetch_add((spans.len() - shown.len()) as u64, Relaxed);
        let n = shown.len() as u64;
        if n == 0 {
            return;
        }
        if c.queued_bytes.load(Relaxed) >= MAX_QUEUED_BYTES {
            c.dropped_queue_full.fetch_add(n, Relaxed);
            return;
        }
        let mut text = String::new();
        let mut stretch = Stretch::begin(monotonic_ns, polite);
        for span in shown {
            stretch.offer_if_due();
            text.push_str(&self.format.line(span));
            text.push('\n');
        }
        c.queued.fetch_add(n, Relaxed);
        c.queued_bytes.fetch_add(text.len() as u64, Relaxed);
        if let Err(mpsc::SendError((text, n))) = self.tx.send((text, n)) {
            c.queued.fetch_sub(n, Relaxed);
            c.queued_bytes.fetch_sub(text.len() as u64, Relaxed);
            c.dropped_write_failed.fetch_add(n, Relaxed);
        }
    }
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn attr_str(span: &Span, key: &str) -> String {
    match span.attr(key) {
        Some(AttrValue::Str(s)) => s.to_string(),
        Some(AttrValue::Int(i)) => i.to_string(),
        Some(AttrValue::Bool(b)) => b.to_string(),
        None => "-".to_owned(),
    }
}

/// `07:40:01.123456 SERVER py-shop[1234] GET /users/{id} 200 12.345ms peer=127.0.0.1:54321 trace=… span=… parent=…`
pub fn text_line(span: &Span) -> String {
    let dur_ms = span.end_unix_ns.saturating_sub(span.start_unix_ns) as f64 / 1e6;
    let peer = match (
        span.attr(crate::vocab::attr::NETWORK_PEER_ADDRESS),
        span.attr(crate::vocab::attr::NETWORK_PEER_PORT),
    ) {
        (Some(AttrValue::Str(a)), Some(AttrValue::Int(p))) if a.contains(':') => format!("[{a}]:{p}"),
        (Some(AttrValue::Str(a)), Some(AttrValue::Int(p))) => format!("{a}:{p}"),
        _ => "-".to_owned(),
    };
    let status = if span.error {
        format!(
            "{} ERROR",
            attr_str(span, crate::vocab::attr::HTTP_RESPONSE_STATUS_CODE)
        )
    } else {
        attr_str(span, crate::vocab::attr::HTTP_RESPONSE_STATUS_CODE)
    };
    // A link is shown only when there is one: `link=<trace>/<span>(<rule>)`.
    let links: String = span
        .links
        .iter()
        .map(|l| format!(" link={}/{}({})", hex(&l.trace_id), hex(&l.span_id), l.source))
        .collect();
    format!(
        "{} {:<6} {}[{}] {} {} {:.3}ms peer={} trace={} span={} parent={}{}",
        utc_time(span.start_unix_ns),
        span.kind.as_str(),
        span.resource.service_name,
        span.resource.pid,
        span.name,
        status,
        dur_ms,
        peer,
        hex(&span.trace_id),
        hex(&span.span_id),
        span.parent_span_id.map_or_else(|| "-".to_owned(), |p| hex(&p)),
        links,
    )
}

pub fn json_line(span: &Span) -> Value {
    let mut attrs = Map::new();
    for (k, v) in &span.attributes {
        attrs.insert((*k).to_owned(), attr_json(v));
    }
    json!({
        "trace_id": hex(&span.trace_id),
        "span_id": hex(&span.span_id),
        "parent_span_id": span.parent_span_id.map(|p| hex(&p)),
        "name": span.name,
        "kind": span.kind.as_str(),
        "start_time_unix_nano": span.start_unix_ns,
        "end_time_unix_nano": span.end_unix_ns,
        "status": if span.error { "ERROR" } else { "UNSET" },
        "resource": resource_json(&span.resource),
        "attributes": attrs,
        "links": span.links.iter().map(|l| json!({
            "trace_id": hex(&l.trace_id),
            "span_id": hex(&l.span_id),
            "attributes": {crate::vocab::attr::SOCKSPAN_LINK_SOURCE: l.source},
        })).collect::<Vec<_>>(),
    })
}

fn resource_json(r: &crate::process::ProcessInfo) -> Value {
    let mut v = json!({
        "service.name": r.service_name,
        "process.pid": r.pid,
        "process.executable.name": r.executable_name,
        "host.name": &*r.host_name,
    });
    if let Some(c) = &r.container_id {
        v["container.id"] = Value::String(c.clone());
    }
    for (k, val) in r.pod.iter().flat_map(|p| p.attributes()) {
        v[k] = Value::String(val.to_owned());
    }
    v
}

fn attr_json(v: &AttrValue) -> Value {
    match v {
        AttrValue::Str(s) => Value::String(s.to_string()),
        AttrValue::Int(i) => Value::from(*i),
        AttrValue::Bool(b) => Value::Bool(*b),
    }
}

/// `HH:MM:SS.micros` in UTC (the date adds nothing to a live view).
fn utc_time(unix_ns: u64) -> String {
    let secs = unix_ns / 1_000_000_000;
    let micros = (unix_ns % 1_000_000_000) / 1000;
    let day = secs % 86_400;
    format!("{:02}:{:02}:{:02}.{micros:06}", day / 3600, (day / 60) % 60, day % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A terminal that takes nothing until released.
    struct Stalled(mpsc::Receiver<()>);

    impl Write for Stalled {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.recv();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Capture goes on while the terminal is stalled: what does not fit is dropped and counted,
    /// and every span handed over ends printed or dropped.
    #[test]
    fn a_stalled_terminal_costs_counted_lines_not_capture() {
        let (release, stalled) = mpsc::channel();
        let counts = Arc::new(PrintCounts::default());
        let (q, thread) = PrintQueue::start(
            PrintFormat::Json,
            SpanFilter::default(),
            Stalled(stalled),
            counts.clone(),
        )
        .unwrap();
        let batch: Vec<Span> = (0..1000).map(Span::sample).collect();
        for _ in 0..100 {
            q.send(&batch, false);
        }
        let dropped = counts.dropped_queue_full.load(Relaxed);
        assert!(dropped > 0, "100,000 JSON lines exceed the queue's bytes");
        assert_eq!(
            counts.queued.load(Relaxed) + counts.printed.load(Relaxed) + dropped,
            100_000
        );
        drop(release);
        drop(q);
        thread.join().unwrap();
        assert_eq!(counts.printed.load(Relaxed) + dropped, 100_000);
        assert_eq!(counts.queued.load(Relaxed), 0);
    }
}
