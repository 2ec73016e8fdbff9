//! The connection-pairing index: client requests by connection, so the server request at the
//! other end of the same connection on this host finds its parent.
use std::{collections::VecDeque, net::SocketAddr, sync::Arc};

use super::RequestStart;
use crate::{FastMap, span::Span};

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

#[derive(Default)]
pub struct Pairing {
    /// Client requests by (link, seq); removed when the client is done.
    by_seq: FastMap<LinkKey, SpanIds>,
    /// Client requests in flight on connections whose numbering is not trustworthy, oldest
    /// first; removed when paired or done.
    queued: FastMap<Link, VecDeque<Queued>>,
    /// Times (Unix ns) of paired client spans that finished before their server span did.
    finished: FastMap<[u8; 8], (u64, u64)>,
    finished_order: VecDeque<[u8; 8]>,
}

impl Pairing {
    /// Frees spare capacity (after state was shed under the memory budget).
    pub fn shrink(&mut self) {
        self.by_seq.shrink_to_fit();
        self.queued.shrink_to_fit();
    }

    /// Indexes a client request once its ids are decided.
    pub fn add_client(&mut self, s: &RequestStart, ids: SpanIds) -> Slot {
        let mut slot = Slot::default();
        let Some(link) = s.link else { return slot };
        if s.aligned {
            if self.by_seq.len() < MAX_CLIENTS {
                slot.by_seq = Some((link, s.seq));
                self.by_seq.insert((link, s.seq), ids);
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
            return self.by_seq.get(&(link, s.seq)).copied();
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

    /// A client request is done: it leaves the index; if it was answered, its span's times
    /// (`span` carries them; its id is `span_id`, not yet set on it) bound its server span's.
    pub fn client_done(&mut self, slot: Slot, seq: u64, answered: bool, span_id: [u8; 8], span: &Span) {
        let indexed = self.forget_client(slot, seq);
        if (indexed || slot.queued_on.is_some()) && answered {
            if self.finished_order.len() >= MAX_FINISHED_CLIENTS
                && let Some(old) = self.finished_order.pop_front()
            {
                self.finished.remove(&old);
            }
            self.finished.insert(span_id, (span.start_unix_ns, span.end_unix_ns));
            self.finished_order.push_back(span_id);
        }
    }

    /// A client request leaves the index (done, or shed under the memory budget); whether it
    /// was indexed by order.
    pub fn forget_client(&mut self, slot: Slot, seq: u64) -> bool {
        if let Some(link) = slot.queued_on
            && let Some(q) = self.queued.get_mut(&link)
        {
            q.retain(|c| c.seq != seq);
            if q.is_empty() {
                self.queued.remove(&link);
            }
        }
        slot.by_seq.is_some_and(|key| self.by_seq.remove(&key).is_some())
    }

    /// Keeps a server span inside its client span's time range: the server's last write returns
    /// a little after the client may already have read the last byte. The byte left the server
    /// before the client read it, so the server span ends no later than its client span.
    pub fn clamp_server(&mut self, client: [u8; 8], span: &mut Span) {
        if let Some((start, end)) = self.finished.remove(&client) {
            span.end_unix_ns = span.end_unix_ns.min(end).max(start);
            span.start_unix_ns = span.start_unix_ns.clamp(start, span.end_unix_ns);
        }
    }
}
