//! Parent-child inference and trace-id assignment (the ladder of docs/architecture.md).
//!
//! Parts: [`reorder`] (items back in time order), [`serving`] (the server requests each process
//! is serving), [`pairing`] (client requests by connection), [`calls`] (the event loop's index of
//! finished calls) and [`rules`] (one function per rung, asked in the order below).
//!
//! Decisions are made when a request *starts* (its headers are parsed), in causal order, so a
//! child learns its parent's ids while the parent is still in flight and streams out as soon as
//! it ends. Event order across CPUs is not causal order: items wait in a short reorder buffer
//! and are processed by timestamp (client request: first byte written, at write entry; server
//! request: first byte read, at read exit — so a client start always sorts before the server
//! start it causes).
//!
//! Rules, first that answers wins; precision over recall (abstain rather than guess):
//! 1. `traceparent`/B3 carried by the request → join that trace, parent = the caller's span.
//! 2. thread: a client request written by a thread with exactly one server request in flight
//!    (read, not yet being answered) in the same process → child of that server span. Not for
//!    processes seen answering a request from another thread than the one that read it: their
//!    requests move between threads (Go's goroutines, hand-off pools), so a thread says nothing
//!    about which request a call serves.
//! 3. connection: a server request is the child of the client request on the other end of the
//!    same connection (same 4-tuple), paired by order on keep-alive connections. On connections
//!    that predate the agent the two ends' numbering may differ by one, so there the server
//!    request pairs with the client request in flight on the connection, written before it was
//!    read and with the same request line, or with none.
//! 4. proxy: a client request whose method and target equal those of exactly one in-flight
//!    server request of the same process (nginx, event loops) → child of it; failing that, one
//!    whose path carries an identifier (≥ 8 chars with a digit) that exactly one in-flight
//!    server request of the process also carries.
//! 5. event loop (see `crate::loops`): a client request written by a process's single
//!    event-loop thread is the child of the server request whose message that thread read
//!    last in the same stretch of its loop (`loop`), or a sibling of the call whose response
//!    it read last (`loop_response`: the continuation of an await); the first request on a
//!    connection the loop opened takes the cause of the stretch that opened it
//!    (`loop_connect`). The cause must still be in flight, and confirmed: the connection stage
//!    reports it once the thread reads again in that stretch ([`Stitcher::confirm_loop_hint`]
//!    marks the held start). An unconfirmed cause gives a span link, not a parent.
//! 6. goroutine (see `crate::goroutines`): a client request of a hooked Go process is the
//!    child of the one in-flight server request read by the goroutine that asked for it, or
//!    else by its nearest creator that read any, if that request began before the creator
//!    created the next goroutine of the chain.
//! 7. otherwise no parent: a new trace.
mod calls;
pub mod context;
mod pairing;
mod reorder;
mod rules;
mod serving;

use std::{net::SocketAddr, sync::Arc};

pub use context::{ContextFormat, PropagatedContext, extract};

use self::{
    calls::FinishedCalls,
    pairing::{Pairing, Slot, SpanIds},
    reorder::Reorder,
    serving::{InFlight, Key, Serving},
};
use crate::{
    FastMap, FastSet,
    conn::Side,
    goroutines::GoChain,
    loops::LoopHint,
    span::{AttrValue, IdGenerator, Span, SpanLink},
    telemetry::Family,
};

/// How a parent was inferred (exported as `sockspan.parent.source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParentSource {
    Traceparent,
    B3,
    Thread,
    Connection,
    Proxy,
    Loop,
    LoopResponse,
    LoopConnect,
    Goroutine,
}

impl ParentSource {
    pub const ALL: [ParentSource; 9] = [
        ParentSource::Traceparent,
        ParentSource::B3,
        ParentSource::Thread,
        ParentSource::Connection,
        ParentSource::Proxy,
        ParentSource::Loop,
        ParentSource::LoopResponse,
        ParentSource::LoopConnect,
        ParentSource::Goroutine,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ParentSource::Traceparent => "traceparent",
            ParentSource::B3 => "b3",
            ParentSource::Thread => "thread",
            ParentSource::Connection => "connection",
            ParentSource::Proxy => "proxy",
            ParentSource::Loop => "loop",
            ParentSource::LoopResponse => "loop_response",
            ParentSource::LoopConnect => "loop_connect",
            ParentSource::Goroutine => "goroutine",
        }
    }
}

/// A request whose headers were just parsed, with the facts of its connection.
#[derive(Debug, Clone)]
pub struct RequestStart {
    pub conn_id: u64,
    pub seq: u64,
    pub side: Side,
    pub pid: u32,
    pub tid: u32,
    /// Monotonic ns of the request's first byte (written by a client / read by a server).
    pub start_ns: u64,
    pub method: Arc<str>,
    pub target: Arc<str>,
    pub context: Option<PropagatedContext>,
    /// (client endpoint, server endpoint) of the connection, when known.
    pub link: Option<(SocketAddr, SocketAddr)>,
    /// Both the request numbering and the link are trustworthy (connection seen from its start).
    pub aligned: bool,
    /// Remote endpoint (the server, for client requests).
    pub peer: Option<SocketAddr>,
    /// Client requests written by an event-loop thread: the message that caused it.
    pub loop_hint: Option<LoopHint>,
    /// In a hooked Go process, the goroutine that read (server) or wrote (client) it; else 0.
    pub goroutine: u64,
    /// Client requests of a hooked Go process: the goroutines that asked for it.
    pub go_chain: Option<Box<GoChain>>,
    /// The process runs Go (known from its executable, or from a goroutine above).
    pub go_program: bool,
}

/// A finished span with the keys that tie it to its start.
#[derive(Debug)]
pub struct Finished {
    pub span: Span,
    pub conn_id: u64,
    pub seq: u64,
    pub side: Side,
    /// Monotonic ns of the exchange's end.
    pub end_ns: u64,
    /// A response came back (a client that gave up does not bound its server's time).
    pub answered: bool,
}

#[derive(Debug)]
enum Item {
    Start(RequestStart),
    Answering { conn_id: u64, seq: u64, tid: u32 },
    Done(Finished),
}

/// What was decided for a request when it started, kept until its span is done.
#[derive(Debug, Clone, Copy)]
struct Decided {
    ids: SpanIds,
    parent: Option<([u8; 8], ParentSource)>,
    /// A client request's parent server request, when it was one in flight.
    parent_key: Option<Key>,
    resend_count: u32,
    /// Where a client request is indexed for the connection rule.
    slot: Slot,
    /// A likely parent that the evidence does not make certain (exported as a span link).
    link: Option<SpanLink>,
}

/// Counters of the stitcher's decisions.
#[derive(Debug, Default, Clone, Copy)]
pub struct StitchStats {
    pub parents: [u64; ParentSource::ALL.len()],
    pub roots: u64,
    pub ambiguous: u64,
    pub late_items: u64,
    pub unmatched_done: u64,
    /// Event-loop causes confirmed after their request had been decided.
    pub late_loop_confirmations: u64,
    /// Requests given a span link to an unconfirmed event-loop cause.
    pub loop_links: u64,
    /// Processes seen answering a request from another thread than the one that read it.
    pub thread_rule_disabled: u64,
}

/// `sockspan.link.source` of links from unconfirmed event-loop hints.
pub const LINK_LOOP_UNCONFIRMED: &str = "loop_unconfirmed";

/// Requests whose decision is remembered at once (beyond it, new ones end as roots).
const MAX_DECIDED: usize = 200_000;

pub struct Stitcher {
    ids: IdGenerator,
    reorder: Reorder<Item>,
    /// Ids decided at start, by (connection, request seq), until the span is done.
    decided: FastMap<Key, Decided>,
    serving: Serving,
    pairing: Pairing,
    finished_calls: FinishedCalls,
    /// Held starts whose event-loop cause awaits confirmation: key → arrival order.
    awaiting_confirmation: FastMap<Key, u64>,
    stats: StitchStats,
}

impl Stitcher {
    pub fn new(ids: IdGenerator) -> Self {
        Self {
            ids,
            reorder: Reorder::default(),
            decided: FastMap::default(),
            serving: Serving::default(),
            pairing: Pairing::default(),
            finished_calls: FinishedCalls::default(),
            awaiting_confirmation: FastMap::default(),
            stats: StitchStats::default(),
        }
    }

    pub fn stats(&self) -> StitchStats {
        StitchStats {
            late_items: self.reorder.late,
            thread_rule_disabled: self.serving.thread_rule_disabled,
            ..self.stats
        }
    }

    /// Every counter and gauge of the stitcher, named and described here.
    pub fn families(&self) -> Vec<Family> {
        let st = self.stats();
        let parents = ParentSource::ALL
            .iter()
            .map(|src| ("source", src.as_str(), st.parents[*src as usize]))
            .collect();
        vec![
            Family::counter(
                "sockspan_stitch_parents_total",
                "Requests given a parent, by the rule that inferred it.",
                parents,
            ),
            Family::total(
                "sockspan_stitch_roots_total",
                "Requests that started a trace (no parent inferred).",
                st.roots,
            ),
            Family::total(
                "sockspan_stitch_abstained_total",
                "Client requests left without a parent because several in-flight requests could be theirs.",
                st.ambiguous,
            ),
            Family::total(
                "sockspan_stitch_links_total",
                "Requests left without a parent but given a span link to a likely one (an unconfirmed event-loop cause).",
                st.loop_links,
            ),
            Family::total(
                "sockspan_stitch_late_loop_confirmations_total",
                "Event-loop causes confirmed only after their request had been decided without them.",
                st.late_loop_confirmations,
            ),
            Family::total(
                "sockspan_stitch_late_items_total",
                "Events that arrived after the reorder window had passed their time.",
                st.late_items,
            ),
            Family::total(
                "sockspan_stitch_unmatched_done_total",
                "Spans finished whose start was never decided (over the decision table's bound): exported as roots.",
                st.unmatched_done,
            ),
            Family::total(
                "sockspan_stitch_thread_rule_disabled_total",
                "Processes seen answering from another thread than the reading one (no parents by thread).",
                st.thread_rule_disabled,
            ),
            Family::level(
                "sockspan_requests_in_flight",
                "Requests started whose span is not finished yet.",
                self.in_flight() as u64,
            ),
            Family::level(
                "sockspan_stitch_queued",
                "Items waiting in the reorder buffer.",
                self.queued() as u64,
            ),
        ]
    }

    /// Frees spare capacity after state was shed under the memory budget (see
    /// [`crate::conn::ConnTable::shrink`]).
    pub fn shrink(&mut self) {
        self.decided.shrink_to_fit();
        self.awaiting_confirmation.shrink_to_fit();
        self.reorder.shrink();
        self.serving.shrink();
        self.pairing.shrink();
    }

    /// Requests started whose span is not finished yet.
    pub fn in_flight(&self) -> usize {
        self.decided.len()
    }

    /// Items waiting in the reorder buffer.
    pub fn queued(&self) -> usize {
        self.reorder.len()
    }

    pub fn push_start(&mut self, s: RequestStart) {
        let key = (s.conn_id, s.seq);
        let awaits = s.loop_hint.is_some_and(|h| !h.confirmed);
        let order = self.reorder.push(s.start_ns, Item::Start(s));
        if awaits {
            self.awaiting_confirmation.insert(key, order);
        }
    }

    /// The event-loop cause of client request `seq` of `conn_id` is confirmed: it counts, if
    /// the request is still held.
    pub fn confirm_loop_hint(&mut self, conn_id: u64, seq: u64) {
        let held = self
            .awaiting_confirmation
            .remove(&(conn_id, seq))
            .and_then(|order| self.reorder.get_mut(order));
        match held {
            Some(Item::Start(s)) => {
                if let Some(h) = &mut s.loop_hint {
                    h.confirmed = true;
                }
            }
            _ => self.stats.late_loop_confirmations += 1,
        }
    }

    /// Thread `tid` began writing the response to request `seq` of `conn_id`: from then on it is
    /// no longer the context of client calls on its thread.
    pub fn push_answering(&mut self, conn_id: u64, seq: u64, ts_ns: u64, tid: u32) {
        self.reorder.push(ts_ns, Item::Answering { conn_id, seq, tid });
    }

    pub fn push_done(&mut self, f: Finished) {
        self.reorder.push(f.end_ns, Item::Done(f));
    }

    /// Processes items old enough that nothing earlier can still arrive, at most `n` (the
    /// state of each request decided grows here; its owner checks its memory budget in
    /// between); finished spans (with their final ids) are appended to `out`. Whether more are
    /// due.
    pub fn release_some(&mut self, now_mono_ns: u64, n: usize, out: &mut Vec<Span>) -> bool {
        let watermark = self.reorder.watermark(now_mono_ns);
        for _ in 0..n {
            let Some(item) = self.reorder.pop(Some(watermark)) else {
                return false;
            };
            self.process(item, out);
        }
        true
    }

    /// Processes everything queued (shutdown, replays).
    pub fn flush(&mut self, out: &mut Vec<Span>) {
        while let Some(item) = self.reorder.pop(None) {
            self.process(item, out);
        }
    }

    /// Frees everything kept for the requests of connections `conns`, held or decided, without
    /// building their spans: the connections were shed under the memory budget, where deciding
    /// held requests or building spans only to drop them would cost the memory being given
    /// back. Returns how many finished spans were held (they are dropped).
    pub fn abandon_connections(&mut self, conns: &FastSet<u64>) -> u64 {
        let mut spans = 0;
        self.reorder.discard(|item| {
            let (conn_id, done) = match item {
                Item::Start(s) => (s.conn_id, false),
                Item::Answering { conn_id, .. } => (*conn_id, false),
                Item::Done(f) => (f.conn_id, true),
            };
            let shed = conns.contains(&conn_id);
            spans += u64::from(shed && done);
            shed
        });
        self.awaiting_confirmation.retain(|key, _| !conns.contains(&key.0));
        // Server requests are in `serving` (also those past the decision table's bound),
        // client requests in `pairing`.
        for key in self.serving.on_connections(conns) {
            self.serving.remove(&key);
        }
        let keys: Vec<Key> = self
            .decided
            .keys()
            .filter(|key| conns.contains(&key.0))
            .copied()
            .collect();
        for key in keys {
            if let Some(d) = self.decided.remove(&key) {
                self.pairing.forget_client(d.slot, key.1);
            }
        }
        spans
    }

    fn process(&mut self, item: Item, out: &mut Vec<Span>) {
        match item {
            Item::Start(s) => self.on_start(s),
            Item::Answering { conn_id, seq, tid } => self.serving.answering(&(conn_id, seq), tid),
            Item::Done(f) => out.push(self.on_done(f)),
        }
    }

    fn new_root(&mut self) -> Decided {
        Decided {
            ids: SpanIds {
                trace_id: self.ids.trace_id(),
                span_id: self.ids.span_id(),
                upstream_sampled: None,
            },
            parent: None,
            parent_key: None,
            resend_count: 0,
            slot: Slot::default(),
            link: None,
        }
    }

    fn child_of(&mut self, parent: SpanIds, source: ParentSource) -> Decided {
        Decided {
            ids: SpanIds {
                span_id: self.ids.span_id(),
                ..parent
            },
            parent: Some((parent.span_id, source)),
            parent_key: None,
            resend_count: 0,
            slot: Slot::default(),
            link: None,
        }
    }

    fn on_start(&mut self, s: RequestStart) {
        self.awaiting_confirmation.remove(&(s.conn_id, s.seq));
        let mut d = match s.side {
            Side::Server => self.decide_server(&s),
            Side::Client => self.decide_client(&s),
        };
        match d.parent {
            Some((_, src)) => self.stats.parents[src as usize] += 1,
            None => self.stats.roots += 1,
        }
        let ids = d.ids;
        if s.side == Side::Client {
            d.slot = self.pairing.add_client(&s, ids);
        }
        let key = (s.conn_id, s.seq);
        if self.decided.len() < MAX_DECIDED {
            self.decided.insert(key, d);
        }
        if s.side == Side::Server {
            self.serving.insert(
                key,
                InFlight {
                    pid: s.pid,
                    tid: s.tid,
                    goroutine: s.goroutine,
                    start_ns: s.start_ns,
                    method: s.method,
                    target: s.target,
                    ids,
                    answering: false,
                    calls: FastMap::default(),
                    facets: Default::default(),
                },
            );
        }
    }

    /// Rungs for a server request: a propagated context, else the connection's client.
    fn decide_server(&mut self, s: &RequestStart) -> Decided {
        match rules::propagated(s).or_else(|| rules::connection(&mut self.pairing, s)) {
            Some((parent, source)) => self.child_of(parent, source),
            None => self.new_root(),
        }
    }

    /// Rungs for a client request: a propagated context, else the one server request of its
    /// process that the thread, the request line or the event loop names.
    fn decide_client(&mut self, s: &RequestStart) -> Decided {
        if let Some((parent, source)) = rules::propagated(s) {
            return self.child_of(parent, source);
        }
        if !self.serving.serves(s.pid) {
            // Every other rung names one of the process's requests in flight: a process that
            // serves none (a load generator, a batch job) makes roots.
            return self.new_root();
        }
        let looped = rules::event_loop(&self.serving, &self.finished_calls, &self.decided, s);
        let chosen = rules::thread(&self.serving, s)
            .map(|k| (k, ParentSource::Thread))
            .or_else(|| rules::proxy(&self.serving, s).map(|k| (k, ParentSource::Proxy)))
            .or_else(|| looped.filter(|l| l.2).map(|(k, source, _)| (k, source)))
            .or_else(|| rules::goroutine(&self.serving, s).map(|k| (k, ParentSource::Goroutine)));
        let Some((key, source)) = chosen else {
            self.stats.ambiguous += 1;
            let mut root = self.new_root();
            root.link = looped
                .filter(|l| !l.2)
                .and_then(|(k, _, _)| self.serving.get(&k))
                .map(|f| SpanLink {
                    trace_id: f.ids.trace_id,
                    span_id: f.ids.span_id,
                    source: LINK_LOOP_UNCONFIRMED,
                });
            if root.link.is_some() {
                self.stats.loop_links += 1;
            }
            return root;
        };
        let Some(parent) = self.serving.get_mut(&key) else {
            return self.new_root();
        };
        let calls = parent
            .calls
            .entry((s.peer, s.method.clone(), s.target.clone()))
            .or_insert(0);
        let resend_count = *calls;
        *calls += 1;
        let ids = parent.ids;
        let mut d = self.child_of(ids, source);
        d.resend_count = resend_count;
        d.parent_key = Some(key);
        d
    }

    fn on_done(&mut self, f: Finished) -> Span {
        let mut span = f.span;
        let key = (f.conn_id, f.seq);
        let d = match self.decided.remove(&key) {
            Some(d) => d,
            None => {
                self.stats.unmatched_done += 1;
                self.new_root()
            }
        };
        match f.side {
            Side::Server => self.serving.remove(&key),
            Side::Client => {
                self.pairing
                    .client_done(d.slot, f.seq, f.answered, d.ids.span_id, &span);
                if let Some(parent) = d.parent_key
                    && f.answered
                {
                    self.finished_calls.remember(key, parent);
                }
            }
        }
        if let Some((parent, ParentSource::Connection)) = d.parent {
            self.pairing.clamp_server(parent, &mut span);
        }
        span.trace_id = d.ids.trace_id;
        span.span_id = d.ids.span_id;
        span.upstream_sampled = d.ids.upstream_sampled;
        span.parent_span_id = d.parent.map(|(p, _)| p);
        span.links.extend(d.link);
        if let Some((_, src)) = d.parent {
            span.attributes.push((
                crate::vocab::attr::SOCKSPAN_PARENT_SOURCE,
                AttrValue::fixed(src.as_str()),
            ));
        }
        if d.resend_count > 0 {
            span.attributes.push((
                crate::vocab::attr::HTTP_REQUEST_RESEND_COUNT,
                AttrValue::Int(i64::from(d.resend_count)),
            ));
        }
        span
    }
}

#[cfg(test)]
mod tests;
