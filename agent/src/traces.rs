//! Local traces assembled from spans as they finish: spans end before their parents, so a trace
//! is whole once its root (a span without a parent) came and a short grace passed with nothing
//! new. The trace view prints them; tail sampling decides on them.
use std::{
    collections::{HashMap, VecDeque},
    time::Duration,
};

use crate::span::Span;

/// How long a trace waits after its root arrived and its last span came, for late spans
/// (the other end of a connection, a reorder window) before it is complete.
pub const TRACE_GRACE: Duration = Duration::from_secs(2);
/// A trace whose root never arrives (a broken trace, or a root still running) is complete
/// anyway this long after its first span, with its missing parents showing it broken.
pub const TRACE_MAX_WAIT: Duration = Duration::from_secs(30);
/// Traces assembled at once; beyond it the oldest is pushed out as it stands.
const MAX_TRACES: usize = 10_000;
/// Spans kept per trace; later ones are counted as dropped.
const MAX_SPANS_PER_TRACE: usize = 2_000;

struct Pending {
    spans: Vec<Span>,
    first_ns: u64,
    last_ns: u64,
    /// Its root (a span without a parent) arrived: spans end before their parents, so the
    /// trace is whole but for late arrivals.
    rooted: bool,
}

/// Spans grouped into local traces until each is complete.
pub struct TraceCollector {
    pending: HashMap<[u8; 16], Pending>,
    /// Traces in the order they began (some already taken): the oldest is found at once.
    order: VecDeque<[u8; 16]>,
    /// Spans held in all traces, and the bound beyond which the oldest traces are pushed out.
    held: usize,
    max_held: usize,
    /// Spans beyond a trace's bound.
    pub dropped_spans: u64,
}

impl Default for TraceCollector {
    fn default() -> Self {
        Self::new(usize::MAX)
    }
}

impl TraceCollector {
    /// A collector holding at most `max_held` spans in all (and [`MAX_TRACES`] traces).
    pub fn new(max_held: usize) -> Self {
        Self {
            pending: HashMap::new(),
            order: VecDeque::new(),
            held: 0,
            max_held,
            dropped_spans: 0,
        }
    }

    /// Spans held.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Adds a span seen at `now_ns` (any monotonic clock); returns the traces pushed out by the
    /// bounds, oldest first, as they stand.
    pub fn add(&mut self, span: Span, now_ns: u64) -> Vec<Vec<Span>> {
        let mut evicted = Vec::new();
        let new_trace = !self.pending.contains_key(&span.trace_id);
        while (new_trace && self.pending.len() >= MAX_TRACES) || self.held >= self.max_held {
            match self.pop_oldest() {
                Some(spans) => evicted.push(spans),
                None => break,
            }
        }
        if !self.pending.contains_key(&span.trace_id) {
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
            self.held += 1;
        }
        evicted
    }

    fn pop_oldest(&mut self) -> Option<Vec<Span>> {
        while let Some(id) = self.order.pop_front() {
            if let Some(p) = self.pending.remove(&id) {
                self.held -= p.spans.len();
                return Some(p.spans);
            }
        }
        None
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
        let taken: Vec<Vec<Span>> = ready
            .into_iter()
            .filter_map(|(id, _)| self.pending.remove(&id).map(|p| p.spans))
            .collect();
        self.held -= taken.iter().map(Vec::len).sum::<usize>();
        // Ids of traces taken stay in `order` until they reach its front; keep it from growing
        // without bound when old traces linger.
        if self.order.len() > 2 * MAX_TRACES {
            let pending = &self.pending;
            self.order.retain(|id| pending.contains_key(id));
        }
        taken
    }

    /// Every trace still held (at shutdown, or the end of a file).
    pub fn take_all(&mut self) -> Vec<Vec<Span>> {
        self.order.clear();
        self.held = 0;
        let mut all: Vec<Pending> = self.pending.drain().map(|(_, p)| p).collect();
        all.sort_by_key(|p| p.first_ns);
        all.into_iter().map(|p| p.spans).collect()
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
        assert!(c.add(span(1, 2, Some(1)), 0).is_empty());
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
            assert!(c.add(s, t).is_empty());
        }
        let evicted = c.add(span(9, 2, Some(1)), S);
        assert_eq!(evicted.len(), 1, "the oldest goes");
        assert_eq!(evicted[0][0].trace_id, [0; 16], "trace 0, the first added");
        assert_eq!(c.pending.len(), MAX_TRACES);
    }

    #[test]
    fn beyond_the_span_bound_the_oldest_traces_are_pushed_out() {
        let mut c = TraceCollector::new(3);
        c.add(span(1, 1, Some(9)), 0);
        c.add(span(1, 2, Some(9)), 0);
        c.add(span(2, 3, Some(9)), 1);
        assert_eq!(c.held(), 3);
        let evicted = c.add(span(3, 4, Some(9)), 2);
        assert_eq!(evicted.len(), 1);
        assert_eq!(evicted[0].len(), 2, "trace 1, whole");
        assert_eq!(c.held(), 2);
        assert_eq!(c.take_all().len(), 2);
        assert_eq!(c.held(), 0);
    }
}
