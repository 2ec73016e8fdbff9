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
    io::Write,
    sync::{Arc, atomic::Ordering::Relaxed, mpsc},
    time::{Duration, Instant},
};

pub use filter::SpanFilter;
pub use waterfall::Style;

use crate::{
    export::{PrintCounts, PrintFormat},
    span::Span,
    traces::TraceCollector,
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

/// Spans waiting for the view thread or held for their trace; beyond it batches are dropped
/// (counted).
const MAX_QUEUED_SPANS: u64 = 200_000;

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
                            traces.add(s, now).into_iter().for_each(&mut print);
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
            (crate::vocab::attr::HTTP_RESPONSE_STATUS_CODE, AttrValue::Int(200)),
            (crate::vocab::attr::SERVER_ADDRESS, AttrValue::fixed("pay")),
            (crate::vocab::attr::SERVER_PORT, AttrValue::Int(80)),
        ],
        error: false,
        resource: Arc::new(crate::process::ProcessInfo {
            pid: u32::from(id) + 100,
            service_name: service.into(),
            executable_name: service.into(),
            host_name: "h".into(),
            container_id: None,
            pod: None,
        }),
        links: Vec::new(),
        upstream_sampled: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn span(trace: u8, id: u8, parent: Option<u8>) -> Span {
        let mut s = Span::sample(u64::from(id));
        s.trace_id = [trace; 16];
        s.span_id = [id; 8];
        s.parent_span_id = parent.map(|p| [p; 8]);
        s
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
