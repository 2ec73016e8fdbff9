//! Parent-child inference and trace-id assignment (the ladder of docs/architecture.md).
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
//!    (read, not yet being answered) in the same process → child of that server span.
//! 3. connection: a server request is the child of the client request on the other end of the
//!    same connection (same 4-tuple), paired by order on keep-alive connections.
//! 4. proxy: a client request whose method and target equal those of exactly one in-flight
//!    server request of the same process (nginx, event loops) → child of it; failing that, one
//!    whose path carries an identifier (≥ 8 chars with a digit) that exactly one in-flight
//!    server request of the process also carries.
//! 5. otherwise no parent: a new trace.
pub mod context;

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
    net::SocketAddr,
};

pub use context::{ContextFormat, PropagatedContext, extract};

use crate::{
    conn::Side,
    span::{AttrValue, IdGenerator, Span},
};

/// How a parent was inferred (exported as `sockspan.parent.source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParentSource {
    Traceparent,
    B3,
    Thread,
    Connection,
    Proxy,
}

impl ParentSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ParentSource::Traceparent => "traceparent",
            ParentSource::B3 => "b3",
            ParentSource::Thread => "thread",
            ParentSource::Connection => "connection",
            ParentSource::Proxy => "proxy",
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
    pub method: String,
    pub target: String,
    pub context: Option<PropagatedContext>,
    /// (client endpoint, server endpoint) of the connection, when known.
    pub link: Option<(SocketAddr, SocketAddr)>,
    /// Both the request numbering and the link are trustworthy (connection seen from its start).
    pub aligned: bool,
    /// Remote endpoint (the server, for client requests).
    pub peer: Option<SocketAddr>,
}

/// A finished span with the keys that tie it to its start.
#[derive(Debug)]
pub struct Finished {
    pub span: Span,
    pub conn_id: u64,
    pub seq: u64,
    pub side: Side,
    /// Monotonic ns of the exchange's last byte.
    pub end_ns: u64,
}

#[derive(Debug)]
enum Item {
    Start(RequestStart),
    Answering { conn_id: u64, seq: u64 },
    Done(Finished),
}

#[derive(Debug, Clone, Copy)]
struct Decided {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent: Option<([u8; 8], ParentSource)>,
    resend_count: u32,
}

/// A server request in flight in some process: a candidate parent.
#[derive(Debug)]
struct InFlight {
    conn_id: u64,
    seq: u64,
    tid: u32,
    start_ns: u64,
    method: String,
    target: String,
    ids: Decided,
    answering: bool,
    /// Client calls made on its behalf, by (peer, method, target): for resend counts.
    calls: HashMap<(Option<SocketAddr>, String, String), u32>,
}

/// Counters of the stitcher's decisions.
#[derive(Debug, Default, Clone, Copy)]
pub struct StitchStats {
    pub parents: [u64; 5],
    pub roots: u64,
    pub ambiguous: u64,
    pub late_items: u64,
    pub unmatched_done: u64,
}

/// Items held before processing: a little event time after the newest item seen, and at most
/// this much wall time.
const REORDER_EVENT_NS: u64 = 10_000_000;
const REORDER_WALL_NS: u64 = 250_000_000;
/// Bounds on remembered state (beyond them, oldest items are processed early / entries refused).
const MAX_PENDING_ITEMS: usize = 200_000;
const MAX_DECIDED: usize = 200_000;
const MAX_INFLIGHT_PER_PROCESS: usize = 50_000;

/// Heap entry ordered by (timestamp, arrival).
#[derive(Debug)]
struct Queued {
    key: u64,
    order: u64,
    item: Item,
}
impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.key, self.order) == (other.key, other.order)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.key, self.order).cmp(&(other.key, other.order))
    }
}

pub struct Stitcher {
    ids: IdGenerator,
    queue: BinaryHeap<Reverse<Queued>>,
    next_order: u64,
    max_key_seen: u64,
    last_released: u64,
    /// Ids decided at start, by (connection, request seq), until the span is done.
    decided: HashMap<(u64, u64), Decided>,
    inflight: HashMap<u32, Vec<InFlight>>,
    /// Client requests by (link, seq), for the connection rule; removed when the client is done.
    client_by_link: HashMap<((SocketAddr, SocketAddr), u64), Decided>,
    pub stats: StitchStats,
}

impl Stitcher {
    pub fn new(ids: IdGenerator) -> Self {
        Self {
            ids,
            queue: BinaryHeap::new(),
            next_order: 0,
            max_key_seen: 0,
            last_released: 0,
            decided: HashMap::new(),
            inflight: HashMap::new(),
            client_by_link: HashMap::new(),
            stats: StitchStats::default(),
        }
    }

    /// Requests started whose span is not finished yet.
    pub fn in_flight(&self) -> usize {
        self.decided.len()
    }

    /// Items waiting in the reorder buffer.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    pub fn push_start(&mut self, s: RequestStart) {
        let key = s.start_ns;
        self.push(key, Item::Start(s));
    }

    /// A server began writing the response to request `seq` of `conn_id`: from then on it is
    /// no longer the context of client calls on its thread.
    pub fn push_answering(&mut self, conn_id: u64, seq: u64, ts_ns: u64) {
        self.push(ts_ns, Item::Answering { conn_id, seq });
    }

    pub fn push_done(&mut self, f: Finished) {
        let key = f.end_ns;
        self.push(key, Item::Done(f));
    }

    fn push(&mut self, key: u64, item: Item) {
        let order = self.next_order;
        self.next_order += 1;
        self.max_key_seen = self.max_key_seen.max(key);
        self.queue.push(Reverse(Queued { key, order, item }));
    }

    /// Processes every item old enough that nothing earlier can still arrive; finished spans
    /// (with their final ids) are appended to `out`.
    pub fn release(&mut self, now_mono_ns: u64, out: &mut Vec<Span>) {
        let by_events = self.max_key_seen.saturating_sub(REORDER_EVENT_NS);
        let by_wall = now_mono_ns.saturating_sub(REORDER_WALL_NS);
        let watermark = by_events.max(by_wall);
        while let Some(Reverse(head)) = self.queue.peek() {
            if head.key >= watermark && self.queue.len() <= MAX_PENDING_ITEMS {
                break;
            }
            let Some(Reverse(q)) = self.queue.pop() else { break };
            self.process(q, out);
        }
    }

    /// Processes everything queued (shutdown, replays).
    pub fn flush(&mut self, out: &mut Vec<Span>) {
        while let Some(Reverse(q)) = self.queue.pop() {
            self.process(q, out);
        }
    }

    fn process(&mut self, q: Queued, out: &mut Vec<Span>) {
        if q.key < self.last_released {
            self.stats.late_items += 1;
        }
        self.last_released = self.last_released.max(q.key);
        match q.item {
            Item::Start(s) => self.on_start(s),
            Item::Answering { conn_id, seq } => {
                for list in self.inflight.values_mut() {
                    if let Some(f) = list.iter_mut().find(|f| f.conn_id == conn_id && f.seq == seq) {
                        f.answering = true;
                        return;
                    }
                }
            }
            Item::Done(f) => out.push(self.on_done(f)),
        }
    }

    fn new_root(&mut self) -> Decided {
        let trace_id = self.ids.trace_id();
        Decided {
            trace_id,
            span_id: self.ids.span_id(),
            parent: None,
            resend_count: 0,
        }
    }

    fn child_of(&mut self, trace_id: [u8; 16], parent: [u8; 8], source: ParentSource) -> Decided {
        Decided {
            trace_id,
            span_id: self.ids.span_id(),
            parent: Some((parent, source)),
            resend_count: 0,
        }
    }

    fn on_start(&mut self, s: RequestStart) {
        let d = match s.side {
            Side::Server => self.decide_server(&s),
            Side::Client => self.decide_client(&s),
        };
        match d.parent {
            Some((_, src)) => self.stats.parents[src as usize] += 1,
            None => self.stats.roots += 1,
        }
        if self.decided.len() < MAX_DECIDED {
            self.decided.insert((s.conn_id, s.seq), d);
        }
        match s.side {
            Side::Server => {
                let list = self.inflight.entry(s.pid).or_default();
                if list.len() < MAX_INFLIGHT_PER_PROCESS {
                    list.push(InFlight {
                        conn_id: s.conn_id,
                        seq: s.seq,
                        tid: s.tid,
                        start_ns: s.start_ns,
                        method: s.method,
                        target: s.target,
                        ids: d,
                        answering: false,
                        calls: HashMap::new(),
                    });
                }
            }
            Side::Client => {
                if s.aligned
                    && let Some(link) = s.link
                    && self.client_by_link.len() < MAX_DECIDED
                {
                    self.client_by_link.insert((link, s.seq), d);
                }
            }
        }
    }

    fn decide_server(&mut self, s: &RequestStart) -> Decided {
        if let Some(cx) = s.context {
            return self.child_of(cx.trace_id, cx.span_id, source_of(cx.format));
        }
        if s.aligned
            && let Some(link) = s.link
            && let Some(client) = self.client_by_link.get(&(link, s.seq)).copied()
        {
            return self.child_of(client.trace_id, client.span_id, ParentSource::Connection);
        }
        self.new_root()
    }

    fn decide_client(&mut self, s: &RequestStart) -> Decided {
        if let Some(cx) = s.context {
            return self.child_of(cx.trace_id, cx.span_id, source_of(cx.format));
        }
        let Some(list) = self.inflight.get_mut(&s.pid) else {
            return self.new_root();
        };
        let candidates = |f: &&mut InFlight| !f.answering && f.start_ns <= s.start_ns;
        // Rule 2: same thread, exactly one request in flight on it.
        let mut on_thread = list.iter_mut().filter(|f| f.tid == s.tid).filter(candidates);
        let chosen = match (on_thread.next(), on_thread.next()) {
            (Some(f), None) => Some((f, ParentSource::Thread)),
            (Some(_), Some(_)) => None,
            (None, _) => None,
        };
        let chosen = match chosen {
            Some(c) => Some(c),
            None => {
                // Rule 4: same request line, else one shared identifier, in exactly one.
                let same_line: Vec<usize> = (0..list.len())
                    .filter(|&i| candidates(&&mut list[i]) && list[i].method == s.method && list[i].target == s.target)
                    .collect();
                let pick = if same_line.len() == 1 {
                    Some(same_line[0])
                } else if same_line.is_empty() {
                    let ids = identifiers(&s.target);
                    let sharing: Vec<usize> = (0..list.len())
                        .filter(|&i| {
                            candidates(&&mut list[i]) && ids.iter().any(|id| identifiers(&list[i].target).contains(id))
                        })
                        .collect();
                    (sharing.len() == 1).then(|| sharing[0])
                } else {
                    None
                };
                if pick.is_none() {
                    self.stats.ambiguous += 1;
                }
                pick.map(|i| (&mut list[i], ParentSource::Proxy))
            }
        };
        let Some((parent, source)) = chosen else {
            return self.new_root();
        };
        let key = (s.peer, s.method.clone(), s.target.clone());
        let previous = parent.calls.entry(key).or_insert(0);
        let resend_count = *previous;
        *previous += 1;
        let (trace_id, parent_id) = (parent.ids.trace_id, parent.ids.span_id);
        let mut d = self.child_of(trace_id, parent_id, source);
        d.resend_count = resend_count;
        d
    }

    fn on_done(&mut self, f: Finished) -> Span {
        let mut span = f.span;
        let d = match self.decided.remove(&(f.conn_id, f.seq)) {
            Some(d) => d,
            None => {
                self.stats.unmatched_done += 1;
                self.new_root()
            }
        };
        match f.side {
            Side::Server => {
                for list in self.inflight.values_mut() {
                    if let Some(i) = list.iter().position(|x| x.conn_id == f.conn_id && x.seq == f.seq) {
                        list.swap_remove(i);
                        break;
                    }
                }
                self.inflight.retain(|_, l| !l.is_empty());
            }
            Side::Client => {
                self.client_by_link.retain(|_, v| v.span_id != d.span_id);
            }
        }
        span.trace_id = d.trace_id;
        span.span_id = d.span_id;
        span.parent_span_id = d.parent.map(|(p, _)| p);
        if let Some((_, src)) = d.parent {
            span.attributes
                .push(("sockspan.parent.source", AttrValue::Str(src.as_str().to_owned())));
        }
        if d.resend_count > 0 {
            span.attributes
                .push(("http.request.resend_count", AttrValue::Int(i64::from(d.resend_count))));
        }
        span
    }
}

fn source_of(f: ContextFormat) -> ParentSource {
    match f {
        ContextFormat::W3c => ParentSource::Traceparent,
        ContextFormat::B3 => ParentSource::B3,
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

#[cfg(test)]
mod tests;
