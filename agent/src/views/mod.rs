//! What a person at the node sees: live spans, filtered (`filter`), and whole local traces as
//! timelines (`waterfall`), assembled here from spans as they finish. Views never change what
//! is exported, and never hold up capture: they run on a thread of their own behind a bounded
//! queue whose overflow is dropped and counted.
pub mod analyze;
pub mod filter;
pub mod report;
pub mod top;
pub mod waterfall;

use std::{
    collections::HashMap,
    io::Write,
    sync::{Arc, atomic::Ordering::Relaxed, mpsc},
    time::{Duration, Instant},
};

pub use filter::SpanFilter;
pub use waterfall::Style;

use crate::{
    export::{PrintCounts, PrintFormat},
    span::Span,
};

/// What a live view prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// One line (text or JSON) per span.
    Lines(PrintFormat),
    /// Each completed local trace as a timeline.
    Traces,
    /// The slowest operations and the time per service, refreshed every second.
    Top,
}

/// How long a trace waits after its root arrived and its last span came, for late spans
/// (the other end of a connection, a reorder window) before it is printed.
pub const TRACE_GRACE: Duration = Duration::from_secs(2);
/// A trace whose root never arrives (a broken trace, or a root still running) is printed
/// anyway this long after its first span, marked as broken where parents are missing.
pub const TRACE_MAX_WAIT: Duration = Duration::from_secs(30);
/// Traces assembled at once; beyond it the oldest is printed as it stands.
const MAX_TRACES: usize = 10_000;
/// Spans kept per trace; later ones are counted as dropped.
const MAX_SPANS_PER_TRACE: usize = 2_000;
/// Spans waiting for the view thread or held for their trace; beyond it batches are dropped
/// (counted).
const MAX_QUEUED_SPANS: u64 = 200_000;

struct Pending {
    spans: Vec<Span>,
    first_ns: u64,
    last_ns: u64,
    /// Its root (a span without a parent) arrived: spans end before their parents, so the
    /// trace is whole but for late arrivals.
    rooted: bool,
}

/// Spans grouped into local traces until each is complete.
#[derive(Default)]
pub struct TraceCollector {
    pending: HashMap<[u8; 16], Pending>,
    /// Traces in the order they began (some already printed): the oldest is found at once.
    order: std::collections::VecDeque<[u8; 16]>,
    /// Spans beyond a trace's bound.
    pub dropped_spans: u64,
}

impl TraceCollector {
    /// Adds a span seen at `now_ns` (any monotonic clock); returns traces pushed out by the bound.
    pub fn add(&mut self, span: Span, now_ns: u64) -> Option<Vec<Span>> {
        let mut evicted = None;
        if !self.pending.contains_key(&span.trace_id) {
            if self.pending.len() >= MAX_TRACES {
                while let Some(id) = self.order.pop_front() {
                    if let Some(p) = self.pending.remove(&id) {
                        evicted = Some(p.spans);
                        break;
                    }
                }
            }
            self.order.push_back(span.trace_id);
        }
        let p = self.pending.entry(span.trace_id).or_insert_with(|| Pending {
            spans: Vec::new(),
            first_ns: now_ns,
            last_ns: now_ns,
            rooted: false,
        });
        p.last_ns = now_ns;
        p.rooted |= span.parent_span_id.is_none();
        if p.spans.len() >= MAX_SPANS_PER_TRACE {
            self.dropped_spans += 1;
        } else {
            p.spans.push(span);
        }
        evicted
    }

    /// Traces complete at `now_ns`, oldest first.
    pub fn take_ready(&mut self, now_ns: u64) -> Vec<Vec<Span>> {
        let grace = TRACE_GRACE.as_nanos() as u64;
        let max_wait = TRACE_MAX_WAIT.as_nanos() as u64;
        let mut ready: Vec<([u8; 16], u64)> = self
            .pending
            .iter()
            .filter(|(_, p)| {
                (p.rooted && now_ns.saturating_sub(p.last_ns) >= grace) || now_ns.saturating_sub(p.first_ns) >= max_wait
            })
            .map(|(id, p)| (*id, p.first_ns))
            .collect();
        ready.sort_by_key(|&(_, first)| first);
        ready
            .into_iter()
            .filter_map(|(id, _)| self.pending.remove(&id).map(|p| p.spans))
            .collect()
    }

    /// Every trace still held (at shutdown, or the end of a file).
    pub fn take_all(&mut self) -> Vec<Vec<Span>> {
        self.order.clear();
        let mut all: Vec<Pending> = self.pending.drain().map(|(_, p)| p).collect();
        all.sort_by_key(|p| p.first_ns);
        all.into_iter().map(|p| p.spans).collect()
    }
}

/// A trace is shown when any of its spans passes every filter (so `--min-duration 2s` shows the
/// traces with a span that slow, and `--errors` the traces with an error).
pub fn trace_shown(filter: &SpanFilter, spans: &[Span]) -> bool {
    filter.is_empty() || spans.iter().any(|s| filter.matches(s))
}

/// Whether stdout is a terminal.
pub fn stdout_is_tty() -> bool {
    // SAFETY: isatty only reads the descriptor's state.
    unsafe { libc::isatty(1) == 1 }
}

/// How stdout takes a view: colours on a terminal (unless `NO_COLOR` is set), and lines cut
/// to the terminal's width; a pipe or a file gets plain, whole lines.
pub fn terminal() -> (Style, Option<usize>) {
    let tty = stdout_is_tty();
    // SAFETY: the TIOCGWINSZ ioctl only reads the descriptor's state into `ws`.
    let cols = unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        (tty && libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_col > 0).then(|| usize::from(ws.ws_col))
    };
    let color = tty && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    (Style { color }, cols)
}

/// Hands finished spans to a view's thread (`--print=traces`, `--top`), bounded: spans count
/// as queued until the view printed, filtered out or dropped them.
pub struct SpanQueue {
    tx: mpsc::Sender<Vec<Span>>,
    counts: Arc<PrintCounts>,
    /// Spans queued or held beyond which batches are dropped (counted).
    max_queued: u64,
}

impl SpanQueue {
    /// Starts a view's thread `name`, running `view` on the batches sent, and the queue to it.
    fn spawn(
        name: &str,
        counts: Arc<PrintCounts>,
        max_queued: u64,
        view: impl FnOnce(mpsc::Receiver<Vec<Span>>) + Send + 'static,
    ) -> std::io::Result<(Self, std::thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel::<Vec<Span>>();
        let thread = std::thread::Builder::new().name(name.into()).spawn(move || view(rx))?;
        Ok((Self { tx, counts, max_queued }, thread))
    }

    /// Hands finished spans to the view thread, or drops them (counted) while it is behind.
    pub fn send(&self, spans: &[Span]) {
        let n = spans.len() as u64;
        if n == 0 {
            return;
        }
        let c = &self.counts;
        if c.queued.load(Relaxed) >= self.max_queued {
            c.dropped_queue_full.fetch_add(n, Relaxed);
            return;
        }
        c.queued.fetch_add(n, Relaxed);
        if self.tx.send(spans.to_vec()).is_err() {
            c.queued.fetch_sub(n, Relaxed);
            c.dropped_write_failed.fetch_add(n, Relaxed);
        }
    }
}

/// Prints completed traces as timelines from a thread of its own.
pub struct TraceQueue;

impl TraceQueue {
    /// Starts the view thread writing to `out`; it prints what it holds once the queue is dropped.
    pub fn start(
        filter: SpanFilter,
        (style, width): (Style, Option<usize>),
        mut out: impl Write + Send + 'static,
        counts: Arc<PrintCounts>,
    ) -> std::io::Result<(SpanQueue, std::thread::JoinHandle<()>)> {
        let c = counts.clone();
        SpanQueue::spawn("traces", counts, MAX_QUEUED_SPANS, move |rx| {
            let epoch = Instant::now();
            let mut traces = TraceCollector::default();
            // Spans stay counted as queued until printed, filtered out or dropped: those held
            // for their trace to complete are waiting for the terminal too.
            let mut print = |spans: Vec<Span>| {
                let n = spans.len() as u64;
                c.queued.fetch_sub(n, Relaxed);
                if !trace_shown(&filter, &spans) {
                    c.filtered.fetch_add(n, Relaxed);
                    return;
                }
                let text = waterfall::render(&spans, width, style);
                let ok = writeln!(out, "{text}").and_then(|()| out.flush()).is_ok();
                (if ok { &c.printed } else { &c.dropped_write_failed }).fetch_add(n, Relaxed);
            };
            loop {
                let got = rx.recv_timeout(Duration::from_millis(250));
                let now = epoch.elapsed().as_nanos() as u64;
                match got {
                    Ok(spans) => {
                        for s in spans {
                            let before = traces.dropped_spans;
                            if let Some(evicted) = traces.add(s, now) {
                                print(evicted);
                            }
                            if traces.dropped_spans > before {
                                c.queued.fetch_sub(1, Relaxed);
                                c.dropped_queue_full.fetch_add(1, Relaxed);
                            }
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
                traces.take_ready(now).into_iter().for_each(&mut print);
            }
            traces.take_all().into_iter().for_each(&mut print);
        })
    }
}

/// A span for the views' tests: trace `[7; 16]`, span `[id; 8]`, pid `100 + id`, a call to or
/// a request of `pay:80` answered 200, from `start_ms` to `end_ms`.
#[cfg(test)]
pub(crate) fn test_span(
    id: u8,
    parent: Option<u8>,
    kind: crate::span::SpanKind,
    service: &str,
    name: &str,
    (start_ms, end_ms): (u64, u64),
) -> Span {
    use crate::span::AttrValue;
    Span {
        trace_id: [7; 16],
        span_id: [id; 8],
        parent_span_id: parent.map(|p| [p; 8]),
        kind,
        name: name.into(),
        start_unix_ns: start_ms * 1_000_000,
        end_unix_ns: end_ms * 1_000_000,
        attributes: vec![
            ("http.response.status_code", AttrValue::Int(200)),
            ("server.address", AttrValue::fixed("pay")),
            ("server.port", AttrValue::Int(80)),
        ],
        error: false,
        resource: Arc::new(crate::process::ProcessInfo {
            pid: u32::from(id) + 100,
            service_name: service.into(),
            executable_name: service.into(),
            host_name: "h".into(),
            container_id: None,
        }),
        links: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(trace: u8, id: u8, parent: Option<u8>) -> Span {
        let mut s = Span::sample(u64::from(id));
        s.trace_id = [trace; 16];
        s.span_id = [id; 8];
        s.parent_span_id = parent.map(|p| [p; 8]);
        s
    }

    const S: u64 = 1_000_000_000;

    #[test]
    fn a_trace_is_ready_once_rooted_and_quiet() {
        let mut c = TraceCollector::default();
        assert!(c.add(span(1, 2, Some(1)), 0).is_none());
        assert!(c.take_ready(5 * S).is_empty(), "no root yet");
        c.add(span(1, 1, None), 5 * S);
        c.add(span(2, 9, None), 5 * S);
        assert!(c.take_ready(6 * S).is_empty(), "within the grace");
        let ready = c.take_ready(7 * S);
        assert_eq!(ready.len(), 2);
        assert_eq!(ready[0].len(), 2, "the older trace first, whole");
        // A trace whose root never comes is printed after the longest wait.
        c.add(span(3, 5, Some(4)), 10 * S);
        assert!(c.take_ready(39 * S).is_empty());
        assert_eq!(c.take_ready(40 * S).len(), 1);
    }

    #[test]
    fn beyond_its_bound_the_oldest_trace_is_pushed_out() {
        let mut c = TraceCollector::default();
        for t in 0..MAX_TRACES as u64 {
            let mut s = span(1, 2, Some(1));
            s.trace_id = [0; 16];
            s.trace_id[..8].copy_from_slice(&t.to_be_bytes());
            assert!(c.add(s, t).is_none());
        }
        let evicted = c.add(span(9, 2, Some(1)), S).expect("the oldest goes");
        assert_eq!(evicted[0].trace_id, [0; 16], "trace 0, the first added");
        assert_eq!(c.pending.len(), MAX_TRACES);
    }

    #[test]
    fn filters_pick_traces_by_any_span() {
        let mut slow = span(1, 2, Some(1));
        slow.end_unix_ns = 3 * S;
        let trace = vec![span(1, 1, None), slow];
        let f = SpanFilter {
            min_duration: Some(Duration::from_secs(2)),
            ..SpanFilter::default()
        };
        assert!(trace_shown(&f, &trace));
        assert!(!trace_shown(&f, &trace[..1]));
        assert!(trace_shown(&SpanFilter::default(), &trace[..1]));
    }
}
