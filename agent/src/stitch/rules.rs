//! The parent ladder, one function per rung (docs/architecture.md, "Stitching"). The stitcher
//! asks them in order and the first that answers wins; each answers only when its evidence
//! points at exactly one parent.
use super::{
    Decided, ParentSource, RequestStart,
    calls::FinishedCalls,
    context::ContextFormat,
    pairing::{Pairing, SpanIds},
    serving::{InFlight, Key, Serving},
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
        },
        source,
    ))
}

/// Rung 2: A call written by a thread serving exactly one request (of `candidates`), in a process
/// whose requests stay on the thread that read them.
pub fn thread(serving: &Serving, s: &RequestStart, candidates: &[Key]) -> Option<Key> {
    if !serving.threads_reliable(s.pid) {
        return None;
    }
    only(serving, candidates, |f| f.tid == s.tid)
}

/// Rung 3: A server request's client at the other end of the same connection on this host.
pub fn connection(pairing: &mut Pairing, s: &RequestStart) -> Option<(SpanIds, ParentSource)> {
    pairing.pair_server(s).map(|ids| (ids, ParentSource::Connection))
}

/// Rung 4: A call whose request line is that of exactly one request the process serves (a reverse
/// proxy); failing any such, one sharing an identifier-like path segment with exactly one.
pub fn proxy(serving: &Serving, s: &RequestStart, candidates: &[Key]) -> Option<Key> {
    let same_line = |f: &InFlight| f.method == s.method && f.target == s.target;
    if candidates.iter().any(|k| serving.get(k).is_some_and(same_line)) {
        return only(serving, candidates, same_line);
    }
    let ids = identifiers(&s.target);
    if ids.is_empty() {
        return None;
    }
    only(serving, candidates, |f| {
        identifiers(&f.target).iter().any(|id| ids.contains(id))
    })
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
/// nearest goroutine of the chain reading any of `candidates` read, if exactly one of its
/// requests began before that goroutine created the chain's next one. No nearer goroutine read
/// one: a goroutine that reads requests is the one serving them (Go's server runs each
/// connection's handler in the goroutine that reads it).
pub fn goroutine(serving: &Serving, s: &RequestStart, candidates: &[Key]) -> Option<Key> {
    let chain = s.go_chain?;
    for (g, since) in chain.iter() {
        let reads = |f: &InFlight| f.goroutine == g;
        if candidates.iter().any(|k| serving.get(k).is_some_and(reads)) {
            return only(serving, candidates, |f| reads(f) && f.start_ns <= since);
        }
    }
    None
}

/// The one candidate that satisfies `pred`, if exactly one does.
fn only(serving: &Serving, candidates: &[Key], pred: impl Fn(&InFlight) -> bool) -> Option<Key> {
    let mut matching = candidates.iter().filter(|k| serving.get(k).is_some_and(&pred));
    match (matching.next(), matching.next()) {
        (Some(k), None) => Some(*k),
        _ => None,
    }
}

/// Identifier-like path segments (≥ 8 characters with a digit, or ≥ 4 digits): ids that
/// travel from an incoming request into the calls it makes.
fn identifiers(target: &str) -> Vec<&str> {
    let path = target.split(['?', '#']).next().unwrap_or("");
    path.split('/')
        .filter(|seg| {
            let digits = seg.bytes().filter(u8::is_ascii_digit).count();
            (seg.len() >= 8 && digits > 0) || (digits >= 4 && digits == seg.len())
        })
        .collect()
}
