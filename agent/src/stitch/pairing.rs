//! The connection-pairing index: client requests by connection, so the server request at the
//! other end of the same connection on this host finds its parent.
use std::{collections::VecDeque, net::SocketAddr, sync::Arc};

use super::RequestStart;
use crate::{FastMap, FastSet, span::Span};

/// (client endpoint, server endpoint): the same from both ends of a connection.
type Link = (SocketAddr, SocketAddr);
type LinkKey = (Link, u64);

/// A span's identity, as its children need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanIds {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// The sampling decision a propagated context carried into this trace (its `sampled`
    /// flag), inherited by every span of the trace; `None` when the trace began here.
    pub upstream_sampled: Option<bool>,
}

/// Where a client request was indexed (so it leaves the index when it is done).
#[derive(Debug, Clone, Copy, Default)]
pub struct Slot {
    /// By (link, seq): a connection seen from its start.
    by_seq: Option<LinkKey>,
    /// In its connection's queue: a connection that predates the agent.
    queued_on: Option<Link>,
}

/// A client request indexed by order on its connection.
#[derive(Debug, Clone, Copy)]
struct Indexed {
    ids: SpanIds,
    /// A server request at the other end took it as its parent.
    paired: bool,
}

/// A client request in flight on a connection that predates the agent.
#[derive(Debug)]
struct Queued {
    seq: u64,
    start_ns: u64,
    method: Arc<str>,
    target: Arc<str>,
    ids: SpanIds,
}

/// Client requests indexed at once (beyond it new ones are not indexed).
const MAX_CLIENTS: usize = 200_000;
/// Client requests in flight on one connection (HTTP/1.1: one, or a few when pipelined).
const MAX_QUEUED_PER_LINK: usize = 64;
const MAX_FINISHED_CLIENTS: usize = 65_536;
/// Paired server spans done before their client span (beyond it the set starts afresh: its
/// clients then leave their times in `finished` for nobody, until they age out).
const MAX_SERVERS_DONE_FIRST: usize = 65_536;

#[derive(Default)]
pub struct Pairing {
    /// Client requests by (link, seq); removed when the client is done.
    by_seq: FastMap<LinkKey, Indexed>,
    /// Client requests in flight on connections whose numbering is not trustworthy, oldest
    /// first; removed when paired or done.
    queued: FastMap<Link, VecDeque<Queued>>,
    /// Times (Unix ns) of paired client spans that finished before their server span did.
    finished: FastMap<[u8; 8], (u64, u64)>,
    finished_order: VecDeque<[u8; 8]>,
    /// Client span ids whose paired server span was done first (the usual order: the server
    /// writes the answer before the client reads it), so their times are not kept for it.
    servers_done_first: FastSet<[u8; 8]>,
}

impl Pairing {
    /// Frees spare capacity (after state was shed under the memory budget).
    pub fn shrink(&mut self) {
        self.by_seq.shrink_to_fit();
        self.queued.shrink_to_fit();
        self.finished.shrink_to_fit();
        self.servers_done_first.shrink_to_fit();
    }

    /// Indexes a client request once its ids are decided.
    pub fn add_client(&mut self, s: &RequestStart, ids: SpanIds) -> Slot {
        let mut slot = Slot::default();
        let Some(link) = s.link else { return slot };
        if s.aligned {
            if self.by_seq.len() < MAX_CLIENTS {
                slot.by_seq = Some((link, s.seq));
                self.by_seq.insert((link, s.seq), Indexed { ids, paired: false });
            }
        } else if self.queued.len() < MAX_CLIENTS {
            let q = self.queued.entry(link).or_default();
            if q.len() < MAX_QUEUED_PER_LINK {
                slot.queued_on = Some(link);
                q.push_back(Queued {
                    seq: s.seq,
                    start_ns: s.start_ns,
                    method: s.method.clone(),
                    target: s.target.clone(),
                    ids,
                });
            }
        }
        slot
    }

    /// The client request at the other end of server request `s`'s connection: by order on a
    /// connection seen from its start; on one that predates the agent, the oldest client request
    /// in flight on it, if it was written before `s` was read and has the same request line (a
    /// request that finished unpaired left the queue, so it cannot shift the pairs after it).
    pub fn pair_server(&mut self, s: &RequestStart) -> Option<SpanIds> {
        let link = s.link?;
        if s.aligned {
            let client = self.by_seq.get_mut(&(link, s.seq))?;
            client.paired = true;
            return Some(client.ids);
        }
        let q = self.queued.get_mut(&link)?;
        if !q
            .front()
            .is_some_and(|c| c.start_ns <= s.start_ns && c.method == s.method && c.target == s.target)
        {
            return None;
        }
        let client = q.pop_front()?;
        if q.is_empty() {
            self.queued.remove(&link);
        }
        Some(client.ids)
    }

    /// A client request is done: it leaves the index; if it was answered and its server span
    /// is still to come, its span's times (`span` carries them; its id is `span_id`, not yet
    /// set on it) are kept to bound the server span's. A client that no server took by now
    /// never gets one (the server read the request before the client read the answer), and
    /// one on a connection that predates the agent may have been taken off its queue.
    pub fn client_done(&mut self, slot: Slot, seq: u64, answered: bool, span_id: [u8; 8], span: &Span) {
        let paired = self.take_client(slot, seq).is_some_and(|c| c.paired);
        let server_done = self.servers_done_first.remove(&span_id);
        if !answered || server_done || !(paired || slot.queued_on.is_some()) {
            return;
        }
        if self.finished_order.len() >= MAX_FINISHED_CLIENTS
            && let Some(old) = self.finished_order.pop_front()
        {
            self.finished.remove(&old);
        }
        self.finished.insert(span_id, (span.start_unix_ns, span.end_unix_ns));
        self.finished_order.push_back(span_id);
    }

    /// A client request shed under the memory budget leaves the index.
    pub fn forget_client(&mut self, slot: Slot, seq: u64) {
        self.take_client(slot, seq);
    }

    /// A client request leaves the index; its entry, if it was indexed by order.
    fn take_client(&mut self, slot: Slot, seq: u64) -> Option<Indexed> {
        if let Some(link) = slot.queued_on
            && let Some(q) = self.queued.get_mut(&link)
        {
            q.retain(|c| c.seq != seq);
            if q.is_empty() {
                self.queued.remove(&link);
            }
        }
        self.by_seq.remove(&slot.by_seq?)
    }

    /// Client times and done servers kept for a span still to come.
    #[cfg(test)]
    pub(super) fn kept(&self) -> usize {
        self.finished.len() + self.servers_done_first.len()
    }

    /// Keeps a server span inside its client span's time range: the server's last write returns
    /// a little after the client may already have read the last byte. The byte left the server
    /// before the client read it, so the server span ends no later than its client span.
    pub fn clamp_server(&mut self, client: [u8; 8], span: &mut Span) {
        if let Some((start, end)) = self.finished.remove(&client) {
            span.end_unix_ns = span.end_unix_ns.min(end).max(start);
            span.start_unix_ns = span.start_unix_ns.clamp(start, span.end_unix_ns);
        } else {
            if self.servers_done_first.len() >= MAX_SERVERS_DONE_FIRST {
                self.servers_done_first.clear();
            }
            self.servers_done_first.insert(client);
        }
    }
}
