//! Connections: which process holds which TCP socket, on which side, with which 4-tuple; each
//! connection's two byte streams are fed to its HTTP state, which yields exchanges.
//!
//! Keyed by (pid, fd) while the fd lives; the socket identity detects fd reuse. The 4-tuple
//! comes from the kernel's ESTABLISHED event for the socket, or, for connections that predate
//! the agent, from /proc once.
use std::{
    collections::{VecDeque, hash_map::Entry},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use agent_common::{AF_INET, AF_INET6, EventHeader, SockEvent, direction, side, tcp_state};

use crate::{
    FastMap, FastSet,
    decode::{Event, LoopStamp},
    goroutines::{GoChain, GoTracker},
    http::{Chunk, Exchange, HttpConn, HttpStats, Started, looks_like_request, looks_like_response},
    loops::{Cause, LoopHint, LoopTracker},
    process::Generations,
    telemetry::Family,
};

pub use crate::vocab::Side;

/// What the connection stage reports, in stream order.
#[derive(Debug)]
pub enum ConnOutput {
    /// A request's headers were parsed: it is in flight.
    Started(ConnStart),
    /// A server began writing its answer to request `seq`.
    /// `tid`: the thread that writes the response.
    Answering {
        conn_id: u64,
        seq: u64,
        ts_ns: u64,
        tid: u32,
    },
    /// A request and its response (or none) are complete.
    Exchange(ConnExchange),
    /// The event-loop cause given to client request `seq` of `conn_id` is confirmed (see
    /// `loops`).
    LoopConfirmed { conn_id: u64, seq: u64 },
}

/// Facts of the connection an HTTP message travelled on.
#[derive(Debug, Clone, Copy)]
pub struct ConnFacts {
    /// Unique for the agent's lifetime.
    pub conn_id: u64,
    pub side: Side,
    pub pid: u32,
    pub comm: [u8; 16],
    pub sock: u64,
    pub local: Option<SocketAddr>,
    pub remote: Option<SocketAddr>,
    /// Seen from its first byte with a kernel-reported 4-tuple: request numbers on both ends of
    /// the connection agree, so the two ends can be paired by order.
    pub aligned: bool,
}

impl ConnFacts {
    /// (client endpoint, server endpoint): the same from both ends of a connection.
    pub fn link(&self) -> Option<(SocketAddr, SocketAddr)> {
        match (self.local, self.remote, self.side) {
            (Some(l), Some(r), Side::Client) => Some((l, r)),
            (Some(l), Some(r), Side::Server) => Some((r, l)),
            _ => None,
        }
    }
}

#[derive(Debug)]
pub struct ConnStart {
    pub request: Started,
    pub facts: ConnFacts,
    /// For a client request written by an event-loop thread: the message that caused it.
    pub loop_hint: Option<LoopHint>,
    /// In a hooked Go process: the goroutine whose syscall completed the headers (a server
    /// request's reader, a client request's writer), else 0.
    pub goroutine: u64,
    /// For a client request of a hooked Go process: the goroutine that asked for it and its
    /// creators (see `goroutines`).
    pub go_chain: Option<Box<GoChain>>,
    /// The process runs a Go program: goroutines move between threads, so the thread that
    /// wrote a call says nothing of which request it serves.
    pub go_program: bool,
}

/// An exchange with the facts of the connection it happened on.
#[derive(Debug)]
pub struct ConnExchange {
    pub exchange: Exchange,
    pub facts: ConnFacts,
    /// Emitted because the agent is stopping, not because the connection ended.
    pub at_shutdown: bool,
    /// When the connection ended, for exchanges that came out because it did.
    pub closed_ns: Option<u64>,
}

impl ConnExchange {
    /// Monotonic ns of the exchange's end: the last response byte; without a response, the
    /// moment the connection ended (a client that gave up waited until then), else the last
    /// request byte. Never before the request's first byte: the stitcher orders an exchange's
    /// end after its start by this time (else the start would stay in flight for good).
    pub fn end_ns(&self) -> u64 {
        let req = &self.exchange.request;
        let end = match (&self.exchange.response, self.closed_ns) {
            (Some(r), _) => r.last_ns,
            (None, Some(closed)) if !self.at_shutdown => closed.max(req.last_ns),
            (None, _) => req.last_ns,
        };
        end.max(req.first_ns)
    }
}

struct Connection {
    id: u64,
    pid: u32,
    aligned: bool,
    /// Started requests not yet being answered (server side), oldest first.
    unanswered: VecDeque<u64>,
    sock: u64,
    side: Option<Side>,
    http: HttpConn,
    comm: [u8; 16],
    local: Option<SocketAddr>,
    remote: Option<SocketAddr>,
    last_activity_ns: u64,
    undecided_chunks: u32,
    /// The peer is the agent itself: never parsed, never a span.
    own: bool,
    /// Loop epoch in which its current outgoing message began (loop threads only).
    out_epoch: u64,
    /// How it is counted in its process's pool to its peer (client connections).
    pool: PoolSlot,
}

/// Chunks looked at before a connection of unknown side is declared not HTTP.
const MAX_UNDECIDED_CHUNKS: u32 = 8;
/// Server requests remembered as "not yet answered" per connection (pipelining depth).
const MAX_UNANSWERED: usize = 256;
/// Connections tracked at once; the least recently active are evicted beyond this.
const MAX_CONNECTIONS: usize = 65536;

pub struct ConnTable {
    /// Boxed: an entry is then a pointer, and the table's spare slots (it doubles as it grows)
    /// cost that, not a whole connection's state, for every keep-alive connection.
    conns: FastMap<(u32, i32), Box<Connection>>,
    /// Monotonic ns by which every hook was attached: bytes moved before it are ignored (see
    /// [`ConnTable::attached_at`]).
    attached_ns: u64,
    /// Data events ignored for predating it.
    pub before_attach: u64,
    /// socket identity → (local, remote), from ESTABLISHED events.
    tuples: FastMap<u64, (SocketAddr, SocketAddr)>,
    pub http_stats: HttpStats,
    pub opened: u64,
    pub evicted: u64,
    pub not_http_undecided: u64,
    /// Connections ignored because their peer is the agent itself (its exports).
    pub own_traffic: u64,
    /// (local, remote) of the agent's own connections (flagged by the kernel) → socket. The
    /// whole pair is the key: an ephemeral port of the agent's is reused at the same time by
    /// other connections to other peers, which must still be traced.
    own_links: FastMap<(SocketAddr, SocketAddr), u64>,
    own_pid: u32,
    proc: ProcTuples,
    /// What each event-loop thread read last (see `loops`).
    pub loops: LoopTracker,
    /// Which goroutine asked for each request in Go programs (see `goroutines`).
    pub go: GoTracker,
    /// The processes `loops` and `go` learn about, to forget them when they are gone.
    processes: Generations,
    /// Client connections by (process, peer): whether a client pool is full.
    pools: PeerPools,
    /// What one event's bytes completed, emptied before the event ends: allocated once, not
    /// per request.
    exchanges: Vec<Exchange>,
    started: Vec<Started>,
}

impl Default for ConnTable {
    fn default() -> Self {
        Self::new()
    }
}

impl ConnTable {
    pub fn new() -> Self {
        Self {
            conns: FastMap::default(),
            attached_ns: 0,
            before_attach: 0,
            tuples: FastMap::default(),
            http_stats: HttpStats::default(),
            opened: 0,
            evicted: 0,
            not_http_undecided: 0,
            own_traffic: 0,
            own_links: FastMap::default(),
            own_pid: std::process::id(),
            proc: ProcTuples::new("/proc"),
            loops: LoopTracker::new(Some(crate::process::is_go_program)),
            go: GoTracker::new(),
            processes: Generations::new("/proc"),
            pools: PeerPools::default(),
            exchanges: Vec::new(),
            started: Vec::new(),
        }
    }

    /// Asks for the Go hooks of each Go process seen (its pid, sent to `hooks`).
    pub fn hooking_go(mut self, hooks: std::sync::mpsc::Sender<u32>) -> Self {
        self.go = GoTracker::with_hooks(crate::process::is_hookable_go_program, hooks);
        self
    }

    /// Ignores the bytes sent or received before `ns` (monotonic), when the hooks were still
    /// being attached one by one: a request read then may have its response written before
    /// the send hooks were in place, and a keep-alive connection would pair every later
    /// request with the response of one before it. Its next exchange starts clean instead.
    pub fn attached_at(mut self, ns: u64) -> Self {
        self.attached_ns = ns;
        self
    }

    /// A table that never reads /proc (replays of recordings from another machine).
    pub fn without_proc() -> Self {
        Self {
            proc: ProcTuples::new(""),
            loops: LoopTracker::new(None),
            processes: Generations::new(""),
            ..Self::new()
        }
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Forgets what is kept per process for the processes that exited or whose pid was
    /// reused (called every few seconds: a sweep reads each one's start time).
    pub fn forget_gone_processes(&mut self) {
        let gone = self.processes.sweep();
        self.loops.forget_processes(&gone);
        self.go.forget_processes(&gone);
    }

    /// This stage's families: its connections, the HTTP parser's counts, the event-loop
    /// tracker's (the goroutine tracker's go out with the Go hooks' attacher's, in the pipeline).
    pub fn families(&self) -> Vec<Family> {
        let mut f = vec![
            Family::total("sockspan_connections_total", "TCP connections tracked.", self.opened),
            Family::total(
                "sockspan_connections_evicted_total",
                "Connections forgotten because idle, over the table limit or over the memory budget.",
                self.evicted,
            ),
            Family::level(
                "sockspan_connections",
                "TCP connections tracked now.",
                self.conns.len() as u64,
            ),
        ];
        f.extend(self.http_stats.families(&[
            ("not_http", self.not_http_undecided),
            ("agent_own_traffic", self.own_traffic),
            ("before_attach", self.before_attach),
        ]));
        f.extend(self.loops.stats.families());
        f
    }

    /// Frees the tables' spare capacity (a hash table keeps its largest size otherwise): after
    /// state was shed under the memory budget.
    pub fn shrink(&mut self) {
        self.conns.shrink_to_fit();
        self.tuples.shrink_to_fit();
        self.pools.counts.shrink_to_fit();
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    pub fn on_event(&mut self, ev: &Event<'_>, out: &mut Vec<ConnOutput>) {
        match ev {
            Event::TcpState(s) => self.on_state(s),
            Event::Connect { header: h, lp } => self.loops.on_connect(h.pid, h.tid, h.fd, h.sock, *lp, h.ts_enter_ns),
            Event::Close(s) => {
                self.loops.on_close(s.header.pid, s.header.fd);
                let key = (s.header.pid, s.header.fd);
                if let Some(mut c) = self.remove(&key) {
                    c.close(s.header.ts_exit_ns, false, &mut self.http_stats, out);
                }
            }
            Event::Data {
                header: h,
                payload,
                lp,
                goroutine,
                ..
            } => {
                // A receive is dated by its return (when the bytes came), a send by its call.
                let moved_ns = if h.direction == direction::INGRESS {
                    h.ts_exit_ns
                } else {
                    h.ts_enter_ns
                };
                if moved_ns < self.attached_ns {
                    self.before_attach += 1;
                    return;
                }
                let first = out.len();
                self.on_data(h, payload, out);
                self.mark_go_program(h.pid, &mut out[first..]);
                if lp.epoch != 0 {
                    self.on_loop_data(h, *lp, out, first);
                }
                if *goroutine != 0 {
                    self.on_goroutine_data(h.pid, *goroutine, &mut out[first..]);
                }
            }
            Event::Go(g) => self.go.on_event(g),
        }
    }

    /// Stamps the requests that `pid`'s syscall started with whether it runs Go.
    fn mark_go_program(&mut self, pid: u32, produced: &mut [ConnOutput]) {
        let mut go = None;
        for o in produced {
            if let ConnOutput::Started(s) = o {
                s.go_program = *go.get_or_insert_with(|| self.loops.runs_go(pid));
            }
        }
    }

    /// Stamps the requests a Go process's syscall started with its goroutine, and client
    /// requests with the chain of goroutines that asked for them.
    fn on_goroutine_data(&mut self, pid: u32, goroutine: u64, produced: &mut [ConnOutput]) {
        for o in produced {
            if let ConnOutput::Started(s) = o {
                s.goroutine = goroutine;
                if s.facts.side == Side::Client {
                    s.go_chain = self.go.chain(pid, goroutine);
                }
            }
        }
    }

    /// Tells the loop tracker what a loop thread's read completed (and reports the requests
    /// that read confirms), or which requests its write started (with their causes);
    /// `out[first..]` is what this event produced.
    fn on_loop_data(&mut self, h: &EventHeader, lp: LoopStamp, out: &mut Vec<ConnOutput>, first: usize) {
        if h.direction == direction::INGRESS {
            let mut causes = out[first..].iter().filter_map(|o| match o {
                ConnOutput::Started(s) if s.facts.side == Side::Server => Some(Cause::Request {
                    conn_id: s.facts.conn_id,
                    seq: s.request.seq,
                }),
                ConnOutput::Exchange(x) if x.facts.side == Side::Client && x.exchange.response.is_some() => {
                    Some(Cause::Response {
                        conn_id: x.facts.conn_id,
                        seq: x.exchange.request.seq,
                        pool_full: false,
                    })
                }
                _ => None,
            });
            let cause = match (causes.next(), causes.next()) {
                (Some(c), None) => Some(c),
                (Some(_), Some(_)) => None,
                // More body of the one request the connection is serving.
                (None, _) => self
                    .conns
                    .get(&(h.pid, h.fd))
                    .filter(|c| c.sock == h.sock && c.side == Some(Side::Server) && h.bytes > 0)
                    .and_then(|c| match c.unanswered.as_slices() {
                        ([seq], []) => Some(Cause::Request {
                            conn_id: c.id,
                            seq: *seq,
                        }),
                        _ => None,
                    }),
            };
            let cause = cause.map(|c| match c {
                Cause::Response { conn_id, seq, .. } => Cause::Response {
                    conn_id,
                    seq,
                    pool_full: !self
                        .conns
                        .get(&(h.pid, h.fd))
                        .is_some_and(|c| self.pools.has_idle_other(c)),
                },
                other => other,
            });
            for (conn_id, seq) in self.loops.on_input(h.pid, h.tid, lp, h.fd, cause) {
                out.push(ConnOutput::LoopConfirmed { conn_id, seq });
            }
        } else {
            // A write that goes on with a message begun in an earlier stretch: a completion
            // callback may run in this one on behalf of that message's request.
            let starts = out[first..].iter().any(|o| match o {
                ConnOutput::Started(s) => s.facts.side == Side::Client,
                ConnOutput::Answering { .. } => true,
                _ => false,
            });
            let older = match self.conns.get_mut(&(h.pid, h.fd)) {
                Some(c) if c.sock == h.sock => {
                    if starts {
                        c.out_epoch = lp.epoch;
                    }
                    c.out_epoch != lp.epoch
                }
                _ => false,
            };
            self.loops.on_output(h.pid, h.tid, lp, older);
            for o in &mut out[first..] {
                if let ConnOutput::Started(s) = o
                    && s.facts.side == Side::Client
                {
                    // Seen from its start: its first request is the connection's first.
                    let first_on_conn = s.request.seq == 0 && s.facts.aligned;
                    let request = (s.facts.conn_id, s.request.seq);
                    s.loop_hint =
                        self.loops
                            .hint(h.pid, h.tid, h.fd, h.sock, lp, h.ts_enter_ns, request, first_on_conn);
                }
            }
        }
    }

    /// Removes a connection from the table and from its pool's counts: every removal comes
    /// through here, so the counts stay exact.
    fn remove(&mut self, key: &(u32, i32)) -> Option<Box<Connection>> {
        let c = self.conns.remove(key)?;
        self.pools.leave(&c);
        Some(c)
    }

    fn on_data(&mut self, h: &EventHeader, payload: &[u8], out: &mut Vec<ConnOutput>) {
        let key = (h.pid, h.fd);
        let known = match self.conns.get(&key) {
            Some(c) if c.sock == h.sock => true,
            Some(_) => {
                // The fd now names another socket: the old connection ended unseen.
                if let Some(mut old) = self.remove(&key) {
                    let at = old.last_activity_ns;
                    old.close(at, false, &mut self.http_stats, out);
                }
                false
            }
            None => false,
        };
        if !known {
            if self.conns.len() >= MAX_CONNECTIONS {
                self.evict_oldest(16, out);
            }
            // A process's first bytes always open a connection here: the one place to learn of it.
            self.processes.saw(h.pid);
            self.go.saw_process(h.pid);
            let mut c = self.open(h);
            if c.side == Some(Side::Client) {
                self.pools.join(&mut c);
            }
            self.conns.insert(key, Box::new(c));
        }
        let Some(c) = self.conns.get_mut(&key) else { return };
        c.last_activity_ns = h.ts_exit_ns;
        if h.comm[0] != 0 {
            // The kernel sends the thread's name with a socket's first record only.
            c.comm = h.comm;
        }
        if c.own {
            return;
        }
        let ingress = h.direction == direction::INGRESS;
        if h.bytes == 0 {
            // End of the peer's stream: ends close-delimited responses.
            if ingress {
                c.http.on_close(h.ts_exit_ns, &mut self.exchanges, &mut self.http_stats);
                c.emit(&mut self.exchanges, false, Some(h.ts_exit_ns), out);
                self.pools.update(c);
            }
            return;
        }
        if c.side.is_none() {
            c.side = infer_side(payload, ingress);
            if c.side.is_none() {
                c.undecided_chunks += 1;
                if c.undecided_chunks == MAX_UNDECIDED_CHUNKS {
                    self.not_http_undecided += 1;
                }
                return;
            }
        }
        let (first_ns, last_ns) = if ingress {
            (h.ts_exit_ns, h.ts_exit_ns)
        } else {
            (h.ts_enter_ns, h.ts_exit_ns)
        };
        let chunk = Chunk {
            captured: payload,
            total: h.bytes as u64,
            tid: h.tid,
            first_ns,
            last_ns,
        };
        let ex = &mut self.exchanges;
        match (c.side, ingress) {
            (Some(Side::Server), true) | (Some(Side::Client), false) => {
                c.http.on_request_chunk(&chunk, ex, &mut self.http_stats);
                c.report_started(&mut self.started, out);
            }
            (Some(Side::Server), false) => {
                // The server writes: it is answering its oldest unanswered request.
                if let Some(seq) = c.unanswered.pop_front() {
                    out.push(ConnOutput::Answering {
                        conn_id: c.id,
                        seq,
                        ts_ns: first_ns,
                        tid: h.tid,
                    });
                }
                c.http.on_response_chunk(&chunk, ex, &mut self.http_stats);
            }
            _ => c.http.on_response_chunk(&chunk, ex, &mut self.http_stats),
        }
        c.emit(ex, false, None, out);
        // Its requests changed: its pool's count of idle connections follows.
        self.pools.update(c);
    }

    fn open(&mut self, h: &EventHeader) -> Connection {
        let (pid, fd, comm, sock, kernel_side) = (h.pid, h.fd, h.comm, h.sock, h.side);
        self.opened += 1;
        let side = match kernel_side {
            side::ACCEPTED => Some(Side::Server),
            side::CONNECTED => Some(Side::Client),
            _ => None,
        };
        let from_kernel = self.tuples.get(&sock).copied();
        let (local, remote) = match from_kernel {
            Some((l, r)) => (Some(l), Some(r)),
            None => self
                .proc
                .lookup(pid, fd, h.ts_exit_ns)
                .map_or((None, None), |(l, r)| (Some(l), Some(r))),
        };
        // A connection seen from its start is parsed from its first byte; one that predates the
        // agent (side unknown) joins at the next message start.
        let http = if side.is_some() {
            HttpConn::new()
        } else {
            HttpConn::new_resync()
        };
        // The other end of one of the agent's own connections (a collector on this node).
        let own = local
            .zip(remote)
            .is_some_and(|(l, r)| self.own_links.contains_key(&(r, l)));
        if own {
            self.own_traffic += 1;
        }
        Connection {
            id: self.opened,
            pid,
            aligned: side.is_some() && from_kernel.is_some(),
            unanswered: VecDeque::new(),
            sock,
            side,
            http,
            comm,
            local,
            remote,
            last_activity_ns: 0,
            undecided_chunks: 0,
            own,
            out_epoch: 0,
            pool: PoolSlot::Outside,
        }
    }

    fn on_state(&mut self, s: &SockEvent) {
        if s.new_state == tcp_state::ESTABLISHED {
            let local = sock_addr(s.family, &s.local_addr, s.local_port);
            let remote = sock_addr(s.family, &s.remote_addr, s.remote_port);
            if let (Some(l), Some(r)) = (local, remote) {
                if self.tuples.len() >= MAX_CONNECTIONS * 2 {
                    self.tuples.clear();
                }
                self.tuples.insert(s.header.sock, (l, r));
                // The kernel sets pid only on the agent's own sockets.
                if s.header.pid != 0 && s.header.pid == self.own_pid {
                    self.own_links.insert((l, r), s.header.sock);
                }
            }
        } else if s.new_state == tcp_state::CLOSE
            && let Some(link) = self.tuples.remove(&s.header.sock)
            && self.own_links.get(&link) == Some(&s.header.sock)
        {
            self.own_links.remove(&link);
        }
    }

    /// Treats `pid` as the agent (replays of another agent's recording, tests).
    pub fn set_own_pid(&mut self, pid: u32) {
        self.own_pid = pid;
    }

    /// Ends responses whose end could not be seen once idle, and forgets idle connections.
    pub fn tick(&mut self, now_ns: u64, idle_flush_ns: u64, idle_evict_ns: u64, out: &mut Vec<ConnOutput>) {
        let mut gone = Vec::new();
        for (key, c) in self.conns.iter_mut() {
            c.http
                .flush_idle(now_ns, idle_flush_ns, &mut self.exchanges, &mut self.http_stats);
            c.emit(&mut self.exchanges, false, None, out);
            self.pools.update(c);
            if now_ns.saturating_sub(c.last_activity_ns) > idle_evict_ns || c.http.is_dead() {
                gone.push(*key);
            }
        }
        for key in gone {
            if let Some(mut c) = self.remove(&key) {
                if !c.http.is_dead() {
                    self.evicted += 1;
                }
                let at = c.last_activity_ns;
                c.close(at, false, &mut self.http_stats, out);
            }
        }
    }

    /// Ends every connection because the agent stops: requests still in flight come out
    /// without a response, marked as cut short by the shutdown.
    pub fn close_all(&mut self, out: &mut Vec<ConnOutput>) {
        self.pools = PeerPools::default();
        for (_, mut c) in std::mem::take(&mut self.conns) {
            let at = c.last_activity_ns;
            c.close(at, true, &mut self.http_stats, out);
        }
    }

    /// Drops the least recently active `1/share` of the table at once, reporting nothing: the
    /// memory budget sheds them, and building what they would report would cost the memory
    /// being given back. Returns their ids and how many requests were in flight on them.
    pub fn shed_oldest(&mut self, share: usize) -> (FastSet<u64>, u64) {
        let (mut ids, mut requests) = (FastSet::default(), 0);
        for key in self.oldest(share) {
            if let Some(c) = self.remove(&key) {
                ids.insert(c.id);
                if c.side.is_some() && !c.own {
                    requests += c.http.pending_requests() as u64;
                }
            }
        }
        (ids, requests)
    }

    /// The least recently active `1/share` of the table (at least one connection).
    fn oldest(&self, share: usize) -> Vec<(u32, i32)> {
        let mut by_age: Vec<(u64, (u32, i32))> = self.conns.iter().map(|(k, c)| (c.last_activity_ns, *k)).collect();
        let n = (by_age.len() / share.max(1)).max(1).min(by_age.len());
        if n > 0 {
            by_age.select_nth_unstable(n - 1);
        }
        by_age.into_iter().take(n).map(|(_, key)| key).collect()
    }

    /// Evicts the least recently active `1/share` of the table at once (at the connection
    /// limit a sixteenth, so a full table costs one scan per 4,096 new connections, not one per
    /// connection). Their waiting requests go out unanswered. Returns how many were evicted.
    pub fn evict_oldest(&mut self, share: usize, out: &mut Vec<ConnOutput>) -> usize {
        let oldest = self.oldest(share);
        for key in &oldest {
            if let Some(mut c) = self.remove(key) {
                self.evicted += 1;
                let at = c.last_activity_ns;
                c.close(at, false, &mut self.http_stats, out);
            }
        }
        oldest.len()
    }
}

impl Connection {
    fn facts(&self, side: Side) -> ConnFacts {
        ConnFacts {
            conn_id: self.id,
            side,
            pid: self.pid,
            comm: self.comm,
            sock: self.sock,
            local: self.local,
            remote: self.remote,
            aligned: self.aligned,
        }
    }

    fn close(&mut self, at_ns: u64, at_shutdown: bool, stats: &mut HttpStats, out: &mut Vec<ConnOutput>) {
        let mut ex = Vec::new();
        if self.side.is_some() && !self.own {
            self.http.on_close(at_ns, &mut ex, stats);
            self.report_started(&mut Vec::new(), out);
        }
        self.emit(&mut ex, at_shutdown, Some(at_ns), out);
    }

    /// Reports requests whose headers just became complete (`started`: an empty buffer to
    /// take them into).
    fn report_started(&mut self, started: &mut Vec<Started>, out: &mut Vec<ConnOutput>) {
        let Some(side) = self.side else { return };
        self.http.take_started(started);
        for request in started.drain(..) {
            if side == Side::Server {
                if self.unanswered.len() >= MAX_UNANSWERED {
                    self.unanswered.pop_front();
                }
                self.unanswered.push_back(request.seq);
            }
            out.push(ConnOutput::Started(ConnStart {
                request,
                facts: self.facts(side),
                loop_hint: None,
                goroutine: 0,
                go_chain: None,
                go_program: false,
            }));
        }
    }

    /// Reports the `exchanges` completed (and empties it).
    fn emit(
        &mut self,
        exchanges: &mut Vec<Exchange>,
        at_shutdown: bool,
        closed_ns: Option<u64>,
        out: &mut Vec<ConnOutput>,
    ) {
        let Some(side) = self.side else {
            exchanges.clear();
            return;
        };
        for exchange in exchanges.drain(..) {
            let seq = exchange.request.seq;
            if let Some(i) = self.unanswered.iter().position(|&s| s == seq) {
                self.unanswered.remove(i);
            }
            out.push(ConnOutput::Exchange(ConnExchange {
                exchange,
                facts: self.facts(side),
                at_shutdown,
                closed_ns,
            }));
        }
    }
}

/// How a client connection is counted in its process's pool to its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PoolSlot {
    /// Not counted: a server connection, or a peer not known.
    Outside,
    Busy,
    /// No request in flight.
    Idle,
}

/// How many client connections each process has to each peer, and how many of them have no
/// request in flight: whether a client pool has a free connection, known in constant time
/// when a response is read. (A scan of the pool per response took 2 % of the agent's CPU
/// under wrk's 32 connections, and grows with the pool.) A count gone wrong errs towards
/// "no idle connection", where the event-loop rule abstains.
#[derive(Default)]
struct PeerPools {
    /// (process, peer) → (connections, idle ones); no entry for an empty pool.
    counts: FastMap<(u32, SocketAddr), (u32, u32)>,
}

impl PeerPools {
    /// Counts a new client connection in.
    fn join(&mut self, c: &mut Connection) {
        let Some(peer) = c.remote else { return };
        self.counts.entry((c.pid, peer)).or_default().0 += 1;
        c.pool = PoolSlot::Busy;
        self.update(c);
    }

    /// Recounts `c` after its requests changed.
    fn update(&mut self, c: &mut Connection) {
        let now = if c.http.pending_requests() == 0 {
            PoolSlot::Idle
        } else {
            PoolSlot::Busy
        };
        if c.pool == PoolSlot::Outside || c.pool == now {
            return;
        }
        let Some((_, idle)) = c.remote.and_then(|peer| self.counts.get_mut(&(c.pid, peer))) else {
            return;
        };
        if now == PoolSlot::Idle {
            *idle += 1;
        } else {
            *idle = idle.saturating_sub(1);
        }
        c.pool = now;
    }

    /// Counts a connection out (it is gone).
    fn leave(&mut self, c: &Connection) {
        let Some(peer) = c.remote.filter(|_| c.pool != PoolSlot::Outside) else {
            return;
        };
        if let Entry::Occupied(mut e) = self.counts.entry((c.pid, peer)) {
            let (members, idle) = e.get_mut();
            *members = members.saturating_sub(1);
            *idle = idle.saturating_sub(u32::from(c.pool == PoolSlot::Idle));
            if *members == 0 {
                e.remove();
            }
        }
    }

    /// Whether `c`'s process has another connection to `c`'s peer with no request in flight:
    /// then its client pool has no request waiting for a connection.
    fn has_idle_other(&self, c: &Connection) -> bool {
        let own = u32::from(c.pool == PoolSlot::Idle);
        c.pool != PoolSlot::Outside
            && c.remote
                .and_then(|peer| self.counts.get(&(c.pid, peer)))
                .is_some_and(|&(_, idle)| idle > own)
    }
}

/// Side of a connection that predates the agent, from the first bytes seen on it.
fn infer_side(payload: &[u8], ingress: bool) -> Option<Side> {
    match (looks_like_request(payload), looks_like_response(payload), ingress) {
        (true, _, true) | (_, true, false) => Some(Side::Server),
        (true, _, false) | (_, true, true) => Some(Side::Client),
        _ => None,
    }
}

pub fn sock_addr(family: u16, addr: &[u8; 16], port: u16) -> Option<SocketAddr> {
    let ip = match family {
        AF_INET => IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3])),
        AF_INET6 => {
            let v6 = Ipv6Addr::from(*addr);
            // v4-mapped (::ffff:a.b.c.d) is an IPv4 peer on a dual-stack socket: show it as one.
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// 4-tuples of sockets from /proc, for connections whose ESTABLISHED event was not seen.
/// Reading /proc/<pid>/net/tcp{,6} costs time in proportion to all the connections of the
/// network namespace, so the parsed tables are kept and read again at most every
/// [`PROC_REREAD_NS`]: under connection churn with lost events, one read per new connection
/// cost more than everything else the agent does, and the agent fell further behind.
struct ProcTuples {
    /// "" = never read /proc (replays).
    root: String,
    /// pid → socket inode → (local, remote), as last read.
    tables: FastMap<u32, FastMap<u64, (SocketAddr, SocketAddr)>>,
    last_read_ns: Option<u64>,
}

/// At most one read of the tables per this much event time (all processes together).
const PROC_REREAD_NS: u64 = 100_000_000;
/// Processes whose tables are kept (all are dropped beyond it).
const PROC_TABLES: usize = 256;

impl ProcTuples {
    fn new(root: &str) -> Self {
        Self {
            root: root.to_owned(),
            tables: FastMap::default(),
            last_read_ns: None,
        }
    }

    fn lookup(&mut self, pid: u32, fd: i32, now_ns: u64) -> Option<(SocketAddr, SocketAddr)> {
        if self.root.is_empty() {
            return None;
        }
        let link = std::fs::read_link(format!("{}/{pid}/fd/{fd}", self.root)).ok()?;
        let inode: u64 = link
            .to_str()?
            .strip_prefix("socket:[")?
            .strip_suffix(']')?
            .parse()
            .ok()?;
        if let Some(t) = self.tables.get(&pid).and_then(|m| m.get(&inode)) {
            return Some(*t);
        }
        if self
            .last_read_ns
            .is_some_and(|t| now_ns.saturating_sub(t) < PROC_REREAD_NS)
        {
            return None;
        }
        self.last_read_ns = Some(now_ns);
        let table = read_tcp_tables(&self.root, pid);
        let found = table.get(&inode).copied();
        if self.tables.len() >= PROC_TABLES {
            self.tables.clear();
        }
        self.tables.insert(pid, table);
        found
    }
}

/// inode → (local, remote) from /proc/<pid>/net/tcp and tcp6.
fn read_tcp_tables(root: &str, pid: u32) -> FastMap<u64, (SocketAddr, SocketAddr)> {
    let mut out = FastMap::default();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("{root}/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() > 9
                && let (Some(l), Some(r), Ok(inode)) = (
                    parse_proc_addr(cols[1]),
                    parse_proc_addr(cols[2]),
                    cols[9].parse::<u64>(),
                )
                && inode != 0
            {
                out.insert(inode, (l, r));
            }
        }
    }
    out
}

/// "0100007F:1F90" (IPv4) or 32 hex digits ":PORT" (IPv6), each 32-bit word in host order.
pub fn parse_proc_addr(s: &str) -> Option<SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = [0u8; 16];
    let words = addr.len() / 8;
    if addr.len() % 8 != 0 || !(words == 1 || words == 4) {
        return None;
    }
    for w in 0..words {
        let word = u32::from_str_radix(addr.get(w * 8..w * 8 + 8)?, 16).ok()?;
        bytes[w * 4..w * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    sock_addr(if words == 1 { AF_INET } else { AF_INET6 }, &bytes, port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_addresses() {
        assert_eq!(
            parse_proc_addr("0100007F:1F90"),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            parse_proc_addr("00000000000000000000000001000000:0050"),
            Some("[::1]:80".parse().unwrap())
        );
        assert_eq!(
            parse_proc_addr("0000000000000000FFFF00000100007F:0050"),
            Some("127.0.0.1:80".parse().unwrap())
        );
        assert_eq!(parse_proc_addr("zz"), None);
    }

    /// After every event, each pool's counts agree with the table's connections: random
    /// requests, responses, closes, ends of stream, reused fds, evictions and sheds on the
    /// client connections of two processes to two peers.
    #[test]
    fn pool_counts_follow_the_connections() {
        use crate::{
            decode::decode,
            replay::{SimConn, StreamBuilder},
        };
        let mut rng = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let (mut table, mut b, mut out) = (ConnTable::without_proc(), StreamBuilder::new(), Vec::new());
        let mut open: Vec<SimConn> = Vec::new();
        let mut port = 30_000;
        let request = b"GET / HTTP/1.1\r\nHost: s\r\n\r\n";
        let response = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        // Headers longer than the capture: its end is not seen, and it ends when the
        // connection idles (a tick flushes it).
        let (cut, cut_total) = (b"HTTP/1.1 200 OK\r\nX-Long: aaaa", 5000);
        for step in 0..4000 {
            let pick = next(open.len().max(1) as u64) as usize;
            match next(20) {
                0..=3 => {
                    // A new connection; its fd may be one an open connection still names.
                    port += 1;
                    let (pid, fd) = (1 + next(2) as u32, 3 + next(24) as i32);
                    let c = b.connect(pid, fd, 9, port as i32, port, 80 + next(2) as u16);
                    open.retain(|o| (o.client_pid, o.client_fd) != (pid, fd));
                    open.push(c);
                }
                4..=9 if !open.is_empty() => b.send_request(&open[pick], 1, 9, request),
                10..=15 if !open.is_empty() => b.send_response(&open[pick], 9, 1, response),
                16 if !open.is_empty() => {
                    let c = open[pick];
                    b.data(
                        c.server_pid,
                        9,
                        c.server_fd,
                        c.server_sock,
                        side::ACCEPTED,
                        true,
                        cut,
                        cut_total,
                        "s",
                    );
                    b.data(
                        c.client_pid,
                        1,
                        c.client_fd,
                        c.client_sock,
                        side::CONNECTED,
                        false,
                        cut,
                        cut_total,
                        "c",
                    );
                }
                17 if !open.is_empty() && next(2) == 0 => b.close(&open.swap_remove(pick)),
                17 if !open.is_empty() => {
                    // The server's end of the stream, read by the client (a 0-byte read).
                    let c = open[pick];
                    b.data(
                        c.client_pid,
                        1,
                        c.client_fd,
                        c.client_sock,
                        side::CONNECTED,
                        false,
                        b"",
                        0,
                        "c",
                    );
                }
                18 => table.tick(b.now_ns, 20_000, 400_000, &mut out),
                19 if step % 7 == 0 => drop(table.shed_oldest(8)),
                _ => {}
            }
            for record in std::mem::take(&mut b.batch).iter() {
                table.on_event(&decode(record).expect("decodes"), &mut out);
            }
            out.clear();
            let mut want: FastMap<(u32, SocketAddr), (u32, u32)> = FastMap::default();
            for c in table.conns.values().filter(|c| c.side == Some(Side::Client)) {
                assert_ne!(c.pool, PoolSlot::Outside, "step {step}: a client connection is counted");
                let n = want.entry((c.pid, c.remote.expect("known peer"))).or_default();
                n.0 += 1;
                n.1 += u32::from(c.http.pending_requests() == 0);
            }
            assert_eq!(table.pools.counts, want, "step {step}");
            for c in table.conns.values().filter(|c| c.side == Some(Side::Client)) {
                let others_idle =
                    want[&(c.pid, c.remote.expect("known"))].1 - u32::from(c.http.pending_requests() == 0);
                assert_eq!(table.pools.has_idle_other(c), others_idle > 0, "step {step}");
            }
        }
    }

    #[test]
    fn sides_from_first_bytes() {
        assert_eq!(infer_side(b"GET / HTTP/1.1\r\n", true), Some(Side::Server));
        assert_eq!(infer_side(b"GET / HTTP/1.1\r\n", false), Some(Side::Client));
        assert_eq!(infer_side(b"HTTP/1.1 200 OK\r\n", true), Some(Side::Client));
        assert_eq!(infer_side(b"\x16\x03\x01", true), None);
    }
}
