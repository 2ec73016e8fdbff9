//! The parent ladder, one function per rung (docs/architecture.md, "Stitching"). The stitcher
//! asks them in order and the first that answers wins; each answers only when its evidence
//! points at exactly one parent.
use super::{
    Decided, ParentSource, RequestStart,
    calls::FinishedCalls,
    context::ContextFormat,
    pairing::{Pairing, SpanIds},
    serving::{Facet, InFlight, Key, Serving, identifiers},
};
use crate::{
    FastMap,
    loops::{Cause, Via},
};

/// Rung 1: The request carries a `traceparent` or B3 context: the caller's span.
pub fn propagated(s: &RequestStart) -> Option<(SpanIds, ParentSource)> {
    let cx = s.context?;
    let source = match cx.format {
        ContextFormat::W3c => ParentSource::Traceparent,
        ContextFormat::B3 => ParentSource::B3,
    };
    Some((
        SpanIds {
            trace_id: cx.trace_id,
            span_id: cx.span_id,
            upstream_sampled: cx.sampled,
        },
        source,
    ))
}

/// Rung 2: A call written by a thread serving exactly one request, in a process whose requests
/// stay on the thread that read them: not a Go program (goroutines move between threads from
/// the start, whether or not an answer has shown it yet).
pub fn thread(serving: &Serving, s: &RequestStart) -> Option<Key> {
    if s.go_program || !serving.threads_reliable(s.pid) {
        return None;
    }
    only(serving.with(s.pid, Facet::Thread(s.tid), s.start_ns), |_| true)
}

/// Rung 3: A server request's client at the other end of the same connection on this host.
pub fn connection(pairing: &mut Pairing, s: &RequestStart) -> Option<(SpanIds, ParentSource)> {
    pairing.pair_server(s).map(|ids| (ids, ParentSource::Connection))
}

/// Rung 4: A call whose request line is that of exactly one request the process serves (a reverse
/// proxy); failing any such, one sharing an identifier-like path segment with exactly one.
pub fn proxy(serving: &Serving, s: &RequestStart) -> Option<Key> {
    let same_line = |f: &InFlight| f.method == s.method && f.target == s.target;
    let facet = Facet::line(&s.method, &s.target);
    if serving.with(s.pid, facet, s.start_ns).any(|(_, f)| same_line(f)) {
        return only(serving.with(s.pid, facet, s.start_ns), same_line);
    }
    // Every request sharing any of the call's identifiers, each once.
    let mut found: Option<Key> = None;
    for id in identifiers(&s.target) {
        let shares = |f: &InFlight| identifiers(&f.target).any(|other| other == id);
        for (k, _) in serving
            .with(s.pid, Facet::id(id), s.start_ns)
            .filter(|(_, f)| shares(f))
        {
            match found {
                Some(other) if other != k => return None,
                _ => found = Some(k),
            }
        }
    }
    found
}

/// Rung 5: A call written by a process's single event-loop thread: the server request its last
/// message in the same stretch leads to (see `crate::loops`), while that request is in flight.
/// The flag says whether a later read in the stretch confirmed the call came from that message's
/// callback: a parent if so; if not, only a span link (a timer, an immediate or a completion
/// callback may have run after it: likely, not certain).
pub fn event_loop(
    serving: &Serving,
    finished: &FinishedCalls,
    decided: &FastMap<Key, Decided>,
    s: &RequestStart,
) -> Option<(Key, ParentSource, bool)> {
    let hint = s.loop_hint?;
    let (key, source) = match hint.cause {
        Cause::Request { conn_id, seq } => ((conn_id, seq), ParentSource::Loop),
        Cause::Response { conn_id, seq, .. } => {
            let call = (conn_id, seq);
            let parent = finished
                .parent_of(&call)
                .or_else(|| decided.get(&call).and_then(|d| d.parent_key))?;
            (parent, ParentSource::LoopResponse)
        }
    };
    let source = if hint.via == Via::Connect {
        ParentSource::LoopConnect
    } else {
        source
    };
    serving
        .get(&key)
        .is_some_and(|f| f.pid == s.pid && f.start_ns <= s.start_ns)
        .then_some((key, source, hint.confirmed))
}

/// Rung 6: A call in a Go program, asked for by a goroutine (`s.go_chain`): the request that the
/// nearest goroutine of the chain reading any request in flight read, if exactly one of its
/// requests began before that goroutine created the chain's next one. No nearer goroutine read
/// one: a goroutine that reads requests is the one serving them (Go's server runs each
/// connection's handler in the goroutine that reads it).
pub fn goroutine(serving: &Serving, s: &RequestStart) -> Option<Key> {
    let chain = s.go_chain.as_deref()?;
    for (g, since) in chain.iter() {
        let facet = Facet::Goroutine(g);
        if serving.with(s.pid, facet, s.start_ns).next().is_some() {
            return only(serving.with(s.pid, facet, s.start_ns), |f| f.start_ns <= since);
        }
    }
    None
}

/// The one candidate that satisfies `pred`, if exactly one does (stops at a second).
fn only<'a>(candidates: impl Iterator<Item = (Key, &'a InFlight)>, pred: impl Fn(&InFlight) -> bool) -> Option<Key> {
    let mut matching = candidates.filter(|(_, f)| pred(f));
    match (matching.next(), matching.next()) {
        (Some((k, _)), None) => Some(k),
        _ => None,
    }
}
