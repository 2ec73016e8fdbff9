//! Live spans on stdout: one readable line per span, or one JSON object per line.
use std::{
    borrow::Cow,
    io::Write,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
        mpsc,
    },
};

use serde::{
    Serialize, Serializer,
    ser::{SerializeMap, SerializeSeq},
};

use crate::{
    courtesy::{Slack, Stretch},
    span::{AttrValue, Span, SpanLink, ValueRef, monotonic_ns},
    views::SpanFilter,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrintFormat {
    Text,
    Json,
}

impl PrintFormat {
    /// Appends a line per span to `out`, offering the CPU as it goes while the agent has time
    /// to spare ([`crate::courtesy`]).
    pub fn write_lines<'a>(self, out: &mut Vec<u8>, spans: impl IntoIterator<Item = &'a Span>, slack: &Slack) {
        let mut stretch = Stretch::begin(monotonic_ns, slack);
        let spans = spans.into_iter();
        // Sized at once: grown by doubling, a batch's text was copied again at every step.
        out.reserve(spans.size_hint().0 * LINE_BYTES_HINT);
        for span in spans {
            stretch.offer_if_due();
            match self {
                PrintFormat::Text => write_text_line(out, span),
                PrintFormat::Json => write_json_line(out, span),
            }
            out.push(b'\n');
        }
    }
}

/// About the length of a JSON line of a span with the usual attributes (text lines are shorter).
const LINE_BYTES_HINT: usize = 1024;

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
    tx: mpsc::Sender<(Vec<u8>, u64)>,
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
        let (tx, rx) = mpsc::channel::<(Vec<u8>, u64)>();
        let c = counts.clone();
        let thread = std::thread::Builder::new().name("print".into()).spawn(move || {
            for (text, n) in rx {
                let ok = out.write_all(&text).and_then(|()| out.flush()).is_ok();
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
    /// formatting offers the CPU as it goes while the agent has time to spare
    /// ([`crate::courtesy`]).
    pub fn send(&self, spans: &[Span], slack: &Slack) {
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
        let mut text = Vec::new();
        self.format.write_lines(&mut text, shown, slack);
        c.queued.fetch_add(n, Relaxed);
        c.queued_bytes.fetch_add(text.len() as u64, Relaxed);
        if let Err(mpsc::SendError((text, n))) = self.tx.send((text, n)) {
            c.queued.fetch_sub(n, Relaxed);
            c.queued_bytes.fetch_sub(text.len() as u64, Relaxed);
            c.dropped_write_failed.fetch_add(n, Relaxed);
        }
    }
}

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Lower-case hex, by table: a `write!` per byte cost six times the instructions (callgrind:
/// 8.6k against 1.3k for a printed line's three ids).
pub fn hex(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len() * 2);
    write_hex(&mut out, bytes);
    String::from_utf8(out).expect("hex digits are ASCII")
}

/// An attribute's value as text, `-` when absent.
fn write_value(out: &mut Vec<u8>, value: Option<&AttrValue>) {
    // Writing into a Vec cannot fail.
    let _ = match value {
        Some(AttrValue::Str(s)) => out.write_all(s.as_bytes()),
        Some(AttrValue::Int(i)) => write!(out, "{i}"),
        Some(AttrValue::Bool(b)) => write!(out, "{b}"),
        None => out.write_all(b"-"),
    };
}

/// Appends `bytes` in lower-case hex.
fn write_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    for &b in bytes {
        out.push(HEX_DIGITS[usize::from(b >> 4)]);
        out.push(HEX_DIGITS[usize::from(b & 0xf)]);
    }
}

/// Appends one span as a text line, written into the batch's buffer (a `String` per part and
/// per line cost more than the formatting):
/// `07:40:01.123456 SERVER py-shop[1234] GET /users/{id} 200 12.345ms peer=127.0.0.1:54321 trace=… span=… parent=…`
fn write_text_line(out: &mut Vec<u8>, span: &Span) {
    let dur_ms = span.end_unix_ns.saturating_sub(span.start_unix_ns) as f64 / 1e6;
    let (secs, micros) = (
        span.start_unix_ns / 1_000_000_000,
        (span.start_unix_ns % 1_000_000_000) / 1000,
    );
    let day = secs % 86_400;
    // Writing into a Vec cannot fail.
    let _ = write!(
        out,
        "{:02}:{:02}:{:02}.{micros:06} {:<6} {}[{}] {} ",
        day / 3600,
        (day / 60) % 60,
        day % 60,
        span.kind.as_str(),
        span.resource.service_name,
        span.resource.pid,
        span.name,
    );
    write_value(out, span.attr(crate::vocab::attr::HTTP_RESPONSE_STATUS_CODE));
    if span.error {
        out.extend_from_slice(b" ERROR");
    }
    let _ = write!(out, " {dur_ms:.3}ms peer=");
    match (
        span.attr(crate::vocab::attr::NETWORK_PEER_ADDRESS),
        span.attr(crate::vocab::attr::NETWORK_PEER_PORT),
    ) {
        (Some(AttrValue::Str(a)), Some(AttrValue::Int(p))) if a.contains(':') => {
            let _ = write!(out, "[{a}]:{p}");
        }
        (Some(AttrValue::Str(a)), Some(AttrValue::Int(p))) => {
            let _ = write!(out, "{a}:{p}");
        }
        _ => out.push(b'-'),
    }
    out.extend_from_slice(b" trace=");
    write_hex(out, &span.trace_id);
    out.extend_from_slice(b" span=");
    write_hex(out, &span.span_id);
    out.extend_from_slice(b" parent=");
    match span.parent_span_id {
        Some(p) => write_hex(out, &p),
        None => out.push(b'-'),
    }
    // A link is shown only when there is one: `link=<trace>/<span>(<rule>)`.
    for l in &span.links {
        out.extend_from_slice(b" link=");
        write_hex(out, &l.trace_id);
        out.push(b'/');
        write_hex(out, &l.span_id);
        let _ = write!(out, "({})", l.source);
    }
}

/// One span as a text line (what `--print` prints), for tests.
#[cfg(test)]
pub fn text_line(span: &Span) -> String {
    let mut out = Vec::new();
    write_text_line(&mut out, span);
    String::from_utf8(out).expect("the line is made of UTF-8 text")
}

/// One span as a JSON object on one line (what `--print=json` prints), for tests: the
/// printing writes lines into its batch's buffer ([`PrintFormat::write_lines`]).
#[cfg(test)]
pub fn json_line(span: &Span) -> String {
    let mut out = Vec::new();
    write_json_line(&mut out, span);
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

/// Appends one span as a JSON object, written straight from the span: building a
/// `serde_json::Value` first cost a map and a string per key and value. Keys come in sorted
/// order, as that map wrote them, and a key given twice keeps its last value.
fn write_json_line(out: &mut Vec<u8>, span: &Span) {
    serde_json::to_writer(out, &JsonSpan(span)).expect("a Vec grows and every key is a string");
}

struct JsonSpan<'a>(&'a Span);

impl Serialize for JsonSpan<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let s = self.0;
        let attributes = s.attributes.iter().map(|(k, v)| (*k, v.borrowed()));
        let mut m = ser.serialize_map(Some(11))?;
        m.serialize_entry("attributes", &SortedObject::new(attributes))?;
        m.serialize_entry("end_time_unix_nano", &s.end_unix_ns)?;
        m.serialize_entry("kind", s.kind.as_str())?;
        m.serialize_entry("links", &JsonLinks(&s.links))?;
        m.serialize_entry("name", &s.name)?;
        m.serialize_entry("parent_span_id", &s.parent_span_id.map(Hex))?;
        m.serialize_entry("resource", &resource_object(&s.resource))?;
        m.serialize_entry("span_id", &Hex(s.span_id))?;
        m.serialize_entry("start_time_unix_nano", &s.start_unix_ns)?;
        m.serialize_entry("status", if s.error { "ERROR" } else { "UNSET" })?;
        m.serialize_entry("trace_id", &Hex(s.trace_id))?;
        m.end()
    }
}

fn resource_object(r: &crate::process::ProcessInfo) -> SortedObject<'_> {
    let pod = r.pod.iter().flat_map(|p| p.attributes());
    let entries = [
        ("service.name".into(), ValueRef::Str(&r.service_name)),
        ("process.pid".into(), ValueRef::Int(i64::from(r.pid))),
        ("process.executable.name".into(), ValueRef::Str(&r.executable_name)),
        ("host.name".into(), ValueRef::Str(&r.host_name)),
    ]
    .into_iter()
    .chain(r.container_id.iter().map(|c| ("container.id".into(), ValueRef::Str(c))))
    .chain(pod.map(|(k, v)| (Cow::Owned(k), ValueRef::Str(v))));
    SortedObject::new(entries)
}

/// A JSON object's entries in sorted key order, the last of a repeated key kept.
struct SortedObject<'a>(Vec<(Cow<'a, str>, ValueRef<'a>)>);

impl<'a> SortedObject<'a> {
    fn new<K: Into<Cow<'a, str>>>(entries: impl Iterator<Item = (K, ValueRef<'a>)>) -> Self {
        let mut entries: Vec<_> = entries.map(|(k, v)| (k.into(), v)).collect();
        // Stable: of a repeated key, the last given stays last.
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        Self(entries)
    }
}

impl Serialize for SortedObject<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let kept = self
            .0
            .iter()
            .enumerate()
            .filter(|(i, (k, _))| self.0.get(i + 1).is_none_or(|(next, _)| next != k));
        let mut m = ser.serialize_map(None)?;
        for (_, (k, v)) in kept {
            m.serialize_entry(k.as_ref(), v)?;
        }
        m.end()
    }
}

impl Serialize for ValueRef<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        match self {
            ValueRef::Str(s) => ser.serialize_str(s),
            ValueRef::Int(i) => ser.serialize_i64(*i),
            ValueRef::Bool(b) => ser.serialize_bool(*b),
        }
    }
}

struct JsonLinks<'a>(&'a [SpanLink]);

impl Serialize for JsonLinks<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let mut seq = ser.serialize_seq(Some(self.0.len()))?;
        for l in self.0 {
            seq.serialize_element(&JsonLink(l))?;
        }
        seq.end()
    }
}

struct JsonLink<'a>(&'a SpanLink);

impl Serialize for JsonLink<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let l = self.0;
        let source = [(crate::vocab::attr::SOCKSPAN_LINK_SOURCE, ValueRef::Str(l.source))];
        let mut m = ser.serialize_map(Some(3))?;
        m.serialize_entry("attributes", &SortedObject::new(source.into_iter()))?;
        m.serialize_entry("span_id", &Hex(l.span_id))?;
        m.serialize_entry("trace_id", &Hex(l.trace_id))?;
        m.end()
    }
}

/// Bytes as lower-case hex, a JSON string.
struct Hex<const N: usize>([u8; N]);

impl<const N: usize> Serialize for Hex<N> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; 32];
        let text = &mut buf[..2 * N.min(16)];
        for (pair, b) in text.chunks_exact_mut(2).zip(self.0) {
            pair[0] = HEX_DIGITS[usize::from(b >> 4)];
            pair[1] = HEX_DIGITS[usize::from(b & 0xf)];
        }
        ser.serialize_str(std::str::from_utf8(text).expect("hex digits"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two spans as text lines: an IPv4 peer, an error and a link; an IPv6 peer, no parent.
    #[test]
    fn a_text_line_shows_time_kind_process_name_status_duration_peer_and_ids() {
        let mut a = Span::sample(7);
        a.parent_span_id = Some([0xab; 8]);
        a.name = "GET /users/{id}".into();
        a.start_unix_ns = 1_700_000_000_000_000_001;
        a.end_unix_ns = 1_700_000_000_012_345_678;
        a.error = true;
        a.attributes.push(("http.response.status_code", AttrValue::Int(503)));
        a.attributes
            .push(("network.peer.address", AttrValue::fixed("10.0.0.7")));
        a.attributes.push(("network.peer.port", AttrValue::Int(8080)));
        a.links.push(SpanLink {
            trace_id: [0x11; 16],
            span_id: [0x22; 8],
            source: "loop",
        });
        let mut b = Span::sample(8);
        b.kind = crate::span::SpanKind::Client;
        b.start_unix_ns = 86_399_999_999_000;
        b.end_unix_ns = 86_400_000_499_000;
        b.attributes.push(("network.peer.address", AttrValue::fixed("::1")));
        b.attributes.push(("network.peer.port", AttrValue::Int(443)));
        assert_eq!(
            text_line(&a),
            "22:13:20.000000 SERVER s[1] GET /users/{id} 503 ERROR 12.346ms peer=10.0.0.7:8080 \
             trace=01010101010101010101010101010101 span=0000000000000007 parent=abababababababab \
             link=11111111111111111111111111111111/2222222222222222(loop)"
        );
        assert_eq!(
            text_line(&b),
            "23:59:59.999999 CLIENT s[1] GET / - 0.500ms peer=[::1]:443 \
             trace=01010101010101010101010101010101 span=0000000000000008 parent=-"
        );
    }

    #[test]
    fn hex_is_lower_case_two_digits_a_byte() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(hex(&[]), "");
    }

    #[test]
    fn a_json_line_is_the_span_with_keys_sorted_and_the_last_of_a_repeated_key() {
        use serde_json::{Value, json};
        let mut span = Span::sample(7);
        span.parent_span_id = Some([0xab; 8]);
        span.name = "GET /users/{id}".into();
        span.start_unix_ns = 1_700_000_000_000_000_001;
        span.end_unix_ns = 1_700_000_000_000_900_001;
        span.error = true;
        span.attributes = vec![
            ("url.path", AttrValue::Str("/users/\"7\"\n".into())),
            ("http.request.method", AttrValue::Str("GET".into())),
            ("http.response.status_code", AttrValue::Int(500)),
            ("sockspan.truncated", AttrValue::Bool(true)),
            ("url.path", AttrValue::Str("/users/8".into())),
        ];
        span.resource = std::sync::Arc::new(crate::process::ProcessInfo {
            pid: 42,
            service_name: "shop".into(),
            executable_name: "shop-bin".into(),
            host_name: "node-1".into(),
            container_id: Some("c0ffee".into()),
            pod: Some(std::sync::Arc::new(crate::kube::PodMeta {
                name: "shop-7d".into(),
                namespace: "prod".into(),
                uid: "u-1".into(),
                node: "node-1".into(),
                workload: Some(("deployment", "shop".into())),
                app_name: None,
            })),
        });
        span.links = vec![SpanLink {
            trace_id: [0x0f; 16],
            span_id: [0x10; 8],
            source: "pool_handoff",
        }];
        let line = json_line(&span);
        let expected = json!({
            "trace_id": "01".repeat(16),
            "span_id": "0000000000000007",
            "parent_span_id": "ab".repeat(8),
            "name": "GET /users/{id}",
            "kind": "SERVER",
            "start_time_unix_nano": 1_700_000_000_000_000_001u64,
            "end_time_unix_nano": 1_700_000_000_000_900_001u64,
            "status": "ERROR",
            "resource": {
                "service.name": "shop", "process.pid": 42, "process.executable.name": "shop-bin",
                "host.name": "node-1", "container.id": "c0ffee", "k8s.pod.name": "shop-7d",
                "k8s.pod.uid": "u-1", "k8s.namespace.name": "prod", "k8s.node.name": "node-1",
                "k8s.deployment.name": "shop",
            },
            "attributes": {
                "url.path": "/users/8", "http.request.method": "GET",
                "http.response.status_code": 500, "sockspan.truncated": true,
            },
            "links": [{
                "trace_id": "0f".repeat(16), "span_id": "10".repeat(8),
                "attributes": {crate::vocab::attr::SOCKSPAN_LINK_SOURCE: "pool_handoff"},
            }],
        });
        assert_eq!(serde_json::from_str::<Value>(&line).unwrap(), expected);
        // serde_json's map (no preserve_order) writes keys sorted: the same text as before.
        assert_eq!(line, expected.to_string());
        let mut root = Span::sample(1);
        root.attributes.clear();
        assert!(json_line(&root).contains(r#""parent_span_id":null"#));
        assert!(json_line(&root).contains(r#""links":[]"#));
    }

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
            q.send(&batch, &Slack::default());
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
