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
//!    (`loop_connect`). The cause must still be in flight.
//! 6. otherwise no parent: a new trace.
pub mod context;

use std::{cmp::Reverse, collections::BinaryHeap, net::SocketAddr};

pub use context::{ContextFormat, PropagatedContext, extract};

use crate::{
    FastMap, FastSet,
    conn::Side,
    loops::{Cause, LoopHint, Via},
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
    Loop,
    LoopResponse,
    LoopConnect,
}

impl ParentSource {
    pub const ALL: [ParentSource; 8] = [
        ParentSource::Traceparent,
        ParentSource::B3,
        ParentSource::Thread,
        ParentSource::Connection,
        ParentSource::Proxy,
        ParentSource::Loop,
        ParentSource::LoopResponse,
        ParentSource::LoopConnect,
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
    /// Client requests written by an event-loop thread: the message that caused it.
    pub loop_hint: Option<LoopHint>,
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

type LinkKey = ((SocketAddr, SocketAddr), u64);

#[derive(Debug, Clone, Copy)]
struct Decided {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent: Option<([u8; 8], ParentSource)>,
    /// A client request's parent server request, by (connection, seq), when it was in flight.
    parent_key: Option<(u64, u64)>,
    resend_count: u32,
    /// Where a client request is indexed for the connection rule.
    link_key: Option<LinkKey>,
    /// The connection a client request is queued on, when its numbering is not trustworthy.
    queued_on: Option<(SocketAddr, SocketAddr)>,
}

/// A client request in flight on a connection that predates the agent.
#[derive(Debug)]
struct QueuedClient {
    seq: u64,
    start_ns: u64,
    method: String,
    target: String,
    ids: Decided,
}

/// A server request in flight in some process: a candidate parent.
#[derive(Debug)]
struct InFlight {
    pid: u32,
    tid: u32,
    start_ns: u64,
    method: String,
    target: String,
    ids: Decided,
    answering: bool,
    /// Client calls made on its behalf, by (peer, method, target): for resend counts.
    calls: FastMap<(Option<SocketAddr>, String, String), u32>,
}

/// Counters of the stitcher's decisions.
#[derive(Debug, Default, Clone, Copy)]
pub struct StitchStats {
    pub parents: [u64; ParentSource::ALL.len()],
    pub roots: u64,
    pub ambiguous: u64,
    pub late_items: u64,
    pub unmatched_done: u64,
    /// Processes seen answering a request from another thread than the one that read it.
    pub thread_rule_disabled: u64,
}

/// Items held before processing: a little event time after the newest item seen, and at most
/// this much wall time.
const REORDER_EVENT_NS: u64 = 10_000_000;
const REORDER_WALL_NS: u64 = 250_000_000;
/// Bounds on remembered state (beyond them, oldest items are processed early / entries refused).
const MAX_PENDING_ITEMS: usize = 200_000;
const MAX_DECIDED: usize = 200_000;
const MAX_INFLIGHT_PER_PROCESS: usize = 50_000;
/// Client requests in flight on one connection (HTTP/1.1: one, or a few when pipelined).
const MAX_QUEUED_PER_LINK: usize = 64;
const MAX_FINISHED_CLIENTS: usize = 65_536;
/// Processes remembered as moving requests between threads (forgotten all at once beyond this:
/// pids get reused, and a forgotten process is marked again at its next such answer).
const MAX_THREAD_MARKS: usize = 65_536;

pub struct Stitcher {
    ids: IdGenerator,
    /// Reorder buffer: (timestamp, arrival order) in a heap; the items themselves stay put in
    /// `items`, indexed by arrival order from `items_base` (moving whole items through heap
    /// sifts cost more than everything else the stitcher does).
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    items: std::collections::VecDeque<Option<Item>>,
    items_base: u64,
    next_order: u64,
    max_key_seen: u64,
    last_released: u64,
    /// Ids decided at start, by (connection, request seq), until the span is done.
    decided: FastMap<(u64, u64), Decided>,
    /// Server requests in flight by (connection, seq), and their keys per process.
    inflight: FastMap<(u64, u64), InFlight>,
    by_process: FastMap<u32, FastSet<(u64, u64)>>,
    /// Client requests by (link, seq), for the connection rule; removed when the client is done.
    client_by_link: FastMap<LinkKey, Decided>,
    /// Client requests in flight on connections whose numbering is not trustworthy, oldest
    /// first; removed when paired or done.
    queued_clients: FastMap<(SocketAddr, SocketAddr), std::collections::VecDeque<QueuedClient>>,
    /// Times (Unix ns) of linkable client spans that finished before their server span did.
    finished_clients: FastMap<[u8; 8], (u64, u64)>,
    finished_order: std::collections::VecDeque<[u8; 8]>,
    /// The parent server request of client requests that finished, by (connection, seq): a
    /// loop continuation after their response inherits it.
    finished_calls: FastMap<(u64, u64), (u64, u64)>,
    finished_calls_order: std::collections::VecDeque<(u64, u64)>,
    /// Processes whose requests move between threads: rule 2 does not apply to them.
    threads_unreliable: FastSet<u32>,
    pub stats: StitchStats,
}

impl Stitcher {
    pub fn new(ids: IdGenerator) -> Self {
        Self {
            ids,
            queue: BinaryHeap::new(),
            items: std::collections::VecDeque::new(),
            items_base: 0,
            next_order: 0,
            max_key_seen: 0,
            last_released: 0,
            decided: FastMap::default(),
            inflight: FastMap::default(),
            by_process: FastMap::default(),
            client_by_link: FastMap::default(),
            queued_clients: FastMap::default(),
            finished_clients: FastMap::default(),
            finished_order: std::collections::VecDeque::new(),
            finished_calls: FastMap::default(),
            finished_calls_order: std::collections::VecDeque::new(),
            threads_unreliable: FastSet::default(),
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

    /// Thread `tid` began writing the response to request `seq` of `conn_id`: from then on it is
    /// no longer the context of client calls on its thread.
    pub fn push_answering(&mut self, conn_id: u64, seq: u64, ts_ns: u64, tid: u32) {
        self.push(ts_ns, Item::Answering { conn_id, seq, tid });
    }

    pub fn push_done(&mut self, f: Finished) {
        let key = f.end_ns;
        self.push(key, Item::Done(f));
    }

    fn push(&mut self, key: u64, item: Item) {
        let order = self.next_order;
        self.next_order += 1;
        self.max_key_seen = self.max_key_seen.max(key);
        self.queue.push(Reverse((key, order)));
        self.items.push_back(Some(item));
    }

    /// Takes the item of `order` out of the ring, dropping released slots at its front.
    fn take_item(&mut self, order: u64) -> Option<Item> {
        let item = self.items.get_mut(order.checked_sub(self.items_base)? as usize)?.take();
        while let Some(None) = self.items.front() {
            self.items.pop_front();
            self.items_base += 1;
        }
        item
    }

    /// Processes every item old enough that nothing earlier can still arrive; finished spans
    /// (with their final ids) are appended to `out`.
    pub fn release(&mut self, now_mono_ns: u64, out: &mut Vec<Span>) {
        let by_events = self.max_key_seen.saturating_sub(REORDER_EVENT_NS);
        let by_wall = now_mono_ns.saturating_sub(REORDER_WALL_NS);
        let watermark = by_events.max(by_wall);
        while let Some(&Reverse((key, _))) = self.queue.peek() {
            if key >= watermark && self.queue.len() <= MAX_PENDING_ITEMS {
                break;
            }
            let Some(Reverse((key, order))) = self.queue.pop() else {
                break;
            };
            self.process(key, order, out);
        }
    }

    /// Processes everything queued (shutdown, replays).
    pub fn flush(&mut self, out: &mut Vec<Span>) {
        while let Some(Reverse((key, order))) = self.queue.pop() {
            self.process(key, order, out);
        }
    }

    fn process(&mut self, key: u64, order: u64, out: &mut Vec<Span>) {
        if key < self.last_released {
            self.stats.late_items += 1;
        }
        self.last_released = self.last_released.max(key);
        let Some(item) = self.take_item(order) else { return };
        match item {
            Item::Start(s) => self.on_start(s),
            Item::Answering { conn_id, seq, tid } => {
                if let Some(f) = self.inflight.get_mut(&(conn_id, seq)) {
                    f.answering = true;
                    if f.tid != tid && !self.threads_unreliable.contains(&f.pid) {
                        if self.threads_unreliable.len() >= MAX_THREAD_MARKS {
                            self.threads_unreliable.clear();
                        }
                        self.threads_unreliable.insert(f.pid);
                        self.stats.thread_rule_disabled += 1;
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
            parent_key: None,
            resend_count: 0,
            link_key: None,
            queued_on: None,
        }
    }

    fn child_of(&mut self, trace_id: [u8; 16], parent: [u8; 8], source: ParentSource) -> Decided {
        Decided {
            trace_id,
            span_id: self.ids.span_id(),
            parent: Some((parent, source)),
            parent_key: None,
            resend_count: 0,
            link_key: None,
            queued_on: None,
        }
    }

    fn on_start(&mut self, s: RequestStart) {
        let mut d = match s.side {
            Side::Server => self.decide_server(&s),
            Side::Client => self.decide_client(&s),
        };
        match d.parent {
            Some((_, src)) => self.stats.parents[src as usize] += 1,
            None => self.stats.roots += 1,
        }
        if s.side == Side::Client
            && let Some(link) = s.link
        {
            if s.aligned {
                if self.client_by_link.len() < MAX_DECIDED {
                    d.link_key = Some((link, s.seq));
                    self.client_by_link.insert((link, s.seq), d);
                }
            } else if self.queued_clients.len() < MAX_DECIDED {
                let q = self.queued_clients.entry(link).or_default();
                if q.len() < MAX_QUEUED_PER_LINK {
                    d.queued_on = Some(link);
                    q.push_back(QueuedClient {
                        seq: s.seq,
                        start_ns: s.start_ns,
                        method: s.method.clone(),
                        target: s.target.clone(),
                        ids: d,
                    });
                }
            }
        }
        if self.decided.len() < MAX_DECIDED {
            self.decided.insert((s.conn_id, s.seq), d);
        }
        match s.side {
            Side::Server => {
                let keys = self.by_process.entry(s.pid).or_default();
                if keys.len() < MAX_INFLIGHT_PER_PROCESS {
                    keys.insert((s.conn_id, s.seq));
                    self.inflight.insert(
                        (s.conn_id, s.seq),
                        InFlight {
                            pid: s.pid,
                            tid: s.tid,
                            start_ns: s.start_ns,
                            method: s.method,
                            target: s.target,
                            ids: d,
                            answering: false,
                            calls: FastMap::default(),
                        },
                    );
                }
            }
            Side::Client => {}
        }
    }

    fn decide_server(&mut self, s: &RequestStart) -> Decided {
        if let Some(cx) = s.context {
            return self.child_of(cx.trace_id, cx.span_id, source_of(cx.format));
        }
        let Some(link) = s.link else {
            return self.new_root();
        };
        if s.aligned {
            if let Some(client) = self.client_by_link.get(&(link, s.seq)).copied() {
                return self.child_of(client.trace_id, client.span_id, ParentSource::Connection);
            }
        } else if let Some(q) = self.queued_clients.get_mut(&link)
            && q.front()
                .is_some_and(|c| c.start_ns <= s.start_ns && c.method == s.method && c.target == s.target)
            && let Some(client) = q.pop_front()
        {
            // The request in flight on this connection, written before this one was read, with
            // the same request line: the same request seen from the other end. (Requests that
            // finished unpaired left the queue when they finished.)
            if q.is_empty() {
                self.queued_clients.remove(&link);
            }
            let c = client.ids;
            return self.child_of(c.trace_id, c.span_id, ParentSource::Connection);
        }
        self.new_root()
    }

    fn decide_client(&mut self, s: &RequestStart) -> Decided {
        if let Some(cx) = s.context {
            return self.child_of(cx.trace_id, cx.span_id, source_of(cx.format));
        }
        let Some(keys) = self.by_process.get(&s.pid) else {
            return self.new_root();
        };
        // Candidates: server requests of this process read before this request was written
        // and not yet being answered.
        let candidates: Vec<(u64, u64)> = keys
            .iter()
            .copied()
            .filter(|k| {
                self.inflight
                    .get(k)
                    .is_some_and(|f| !f.answering && f.start_ns <= s.start_ns)
            })
            .collect();
        let pick = |pred: &dyn Fn(&InFlight) -> bool| -> (usize, Option<(u64, u64)>) {
            let matching: Vec<(u64, u64)> = candidates
                .iter()
                .copied()
                .filter(|k| self.inflight.get(k).is_some_and(pred))
                .collect();
            (matching.len(), (matching.len() == 1).then(|| matching[0]))
        };
        // Rule 2: the writing thread has exactly one request in flight.
        let by_thread = if self.threads_unreliable.contains(&s.pid) {
            None
        } else {
            pick(&|f| f.tid == s.tid).1
        };
        let chosen = by_thread.map(|k| (k, ParentSource::Thread)).or_else(|| {
            // Rule 4: the same request line in exactly one, else one shared identifier.
            let (n, same_line) = pick(&|f| f.method == s.method && f.target == s.target);
            if n > 0 {
                return same_line.map(|k| (k, ParentSource::Proxy));
            }
            let ids = identifiers(&s.target);
            if ids.is_empty() {
                return None;
            }
            pick(&|f| identifiers(&f.target).iter().any(|id| ids.contains(id)))
                .1
                .map(|k| (k, ParentSource::Proxy))
        });
        let Some((key, source)) = chosen.or_else(|| self.rule_loop(s)) else {
            if !candidates.is_empty() {
                self.stats.ambiguous += 1;
            }
            return self.new_root();
        };
        let Some(parent) = self.inflight.get_mut(&key) else {
            return self.new_root();
        };
        let calls = parent
            .calls
            .entry((s.peer, s.method.clone(), s.target.clone()))
            .or_insert(0);
        let resend_count = *calls;
        *calls += 1;
        let (trace_id, parent_id) = (parent.ids.trace_id, parent.ids.span_id);
        let mut d = self.child_of(trace_id, parent_id, source);
        d.resend_count = resend_count;
        d.parent_key = Some(key);
        d
    }

    /// Rule 5: the server request an event-loop thread's last message leads to, while it is in
    /// flight in the writer's process.
    fn rule_loop(&self, s: &RequestStart) -> Option<((u64, u64), ParentSource)> {
        let hint = s.loop_hint?;
        let (key, source) = match hint.cause {
            Cause::Request { conn_id, seq } => ((conn_id, seq), ParentSource::Loop),
            Cause::Response { conn_id, seq } => {
                let call = (conn_id, seq);
                let parent = self
                    .finished_calls
                    .get(&call)
                    .copied()
                    .or_else(|| self.decided.get(&call).and_then(|d| d.parent_key))?;
                (parent, ParentSource::LoopResponse)
            }
        };
        let source = if hint.via == Via::Connect {
            ParentSource::LoopConnect
        } else {
            source
        };
        self.inflight
            .get(&key)
            .is_some_and(|f| f.pid == s.pid && f.start_ns <= s.start_ns)
            .then_some((key, source))
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
                if let Some(gone) = self.inflight.remove(&(f.conn_id, f.seq))
                    && let Some(keys) = self.by_process.get_mut(&gone.pid)
                {
                    keys.remove(&(f.conn_id, f.seq));
                    if keys.is_empty() {
                        self.by_process.remove(&gone.pid);
                    }
                }
            }
            Side::Client => {
                if let Some(link) = d.queued_on
                    && let Some(q) = self.queued_clients.get_mut(&link)
                {
                    q.retain(|c| c.seq != f.seq);
                    if q.is_empty() {
                        self.queued_clients.remove(&link);
                    }
                }
                let linked = d.link_key.is_some_and(|key| self.client_by_link.remove(&key).is_some());
                if (linked || d.queued_on.is_some()) && f.answered {
                    self.remember_finished_client(d.span_id, span.start_unix_ns, span.end_unix_ns);
                }
                if let Some(parent) = d.parent_key
                    && f.answered
                {
                    self.remember_finished_call((f.conn_id, f.seq), parent);
                }
            }
        }
        // Both ends of one connection: the server's last write returns a little after the
        // client may already have read the last byte. The byte left the server before the
        // client read it, so the server span ends no later than its client span.
        if let Some((parent, ParentSource::Connection)) = d.parent
            && let Some((start, end)) = self.finished_clients.remove(&parent)
        {
            span.end_unix_ns = span.end_unix_ns.min(end).max(start);
            span.start_unix_ns = span.start_unix_ns.clamp(start, span.end_unix_ns);
        }
        span.trace_id = d.trace_id;
        span.span_id = d.span_id;
        span.parent_span_id = d.parent.map(|(p, _)| p);
        if let Some((_, src)) = d.parent {
            span.attributes
                .push(("sockspan.parent.source", AttrValue::fixed(src.as_str())));
        }
        if d.resend_count > 0 {
            span.attributes
                .push(("http.request.resend_count", AttrValue::Int(i64::from(d.resend_count))));
        }
        span
    }
}

impl Stitcher {
    fn remember_finished_client(&mut self, span_id: [u8; 8], start: u64, end: u64) {
        if self.finished_order.len() >= MAX_FINISHED_CLIENTS
            && let Some(old) = self.finished_order.pop_front()
        {
            self.finished_clients.remove(&old);
        }
        self.finished_clients.insert(span_id, (start, end));
        self.finished_order.push_back(span_id);
    }
}

impl Stitcher {
    fn remember_finished_call(&mut self, call: (u64, u64), parent: (u64, u64)) {
        if self.finished_calls_order.len() >= MAX_FINISHED_CLIENTS
            && let Some(old) = self.finished_calls_order.pop_front()
        {
            self.finished_calls.remove(&old);
        }
        self.finished_calls.insert(call, parent);
        self.finished_calls_order.push_back(call);
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
