//! The server-request index: the requests each process is serving, the candidate parents of the
//! calls it makes, looked up by what the rules know of a call (its thread, goroutine, request
//! line or an identifier in its path): a call costs the requests that share that fact, not every
//! request its process serves (a busy proxy has thousands).
use std::{
    collections::hash_map::Entry,
    hash::{BuildHasher, Hash},
    net::SocketAddr,
    sync::Arc,
};

use smallvec::SmallVec;

use super::pairing::SpanIds;
use crate::{FastMap, FastSet};

pub use crate::vocab::RequestKey as Key;

/// A server request in flight.
#[derive(Debug)]
pub struct InFlight {
    pub pid: u32,
    /// The thread that read it.
    pub tid: u32,
    /// The goroutine that read it, in a hooked Go process; else 0.
    pub goroutine: u64,
    pub start_ns: u64,
    pub method: Arc<str>,
    pub target: Arc<str>,
    pub ids: SpanIds,
    /// Its response is being written.
    pub answering: bool,
    /// Calls made on its behalf, by (peer, method, target): for resend counts.
    pub calls: FastMap<CallKey, u32>,
    /// Where it is indexed (set by [`Serving::insert`], so they are worked out once).
    pub facets: Facets,
}

/// A request's facets: a thread, a line, and rarely more (inline: one is worked out per
/// server request).
pub type Facets = SmallVec<[Facet; 4]>;

/// A call by what it asked: (peer, method, target).
pub type CallKey = (Option<SocketAddr>, Arc<str>, Arc<str>);

/// A fact of a server request that a rule looks it up by, within its process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Facet {
    /// The thread that read it.
    Thread(u32),
    /// The goroutine that read it.
    Goroutine(u64),
    /// A hash of its method and target (equal lines collide; the rule compares the strings).
    Line(u64),
    /// A hash of an identifier-like segment of its path ([`identifiers`]).
    Id(u64),
}

impl Facet {
    pub fn line(method: &str, target: &str) -> Self {
        Facet::Line(hash(&(method, target)))
    }

    pub fn id(identifier: &str) -> Self {
        Facet::Id(hash(&identifier))
    }
}

fn hash(v: &impl Hash) -> u64 {
    // A fixed seed: facets of one request are computed at insert and again at removal.
    foldhash::fast::FixedState::with_seed(0x5eed).hash_one(v)
}

/// Identifier-like path segments (≥ 8 characters with a digit, or ≥ 4 digits): ids that
/// travel from an incoming request into the calls it makes.
pub fn identifiers(target: &str) -> impl Iterator<Item = &str> {
    let path = target.split(['?', '#']).next().unwrap_or("");
    path.split('/').filter(|seg| {
        let digits = seg.bytes().filter(u8::is_ascii_digit).count();
        (seg.len() >= 8 && digits > 0) || (digits >= 4 && digits == seg.len())
    })
}

/// The requests that share one facet: nearly always one (a thread reads one request at a
/// time, most lines are unique), kept inline; a set only when several do.
#[derive(Debug)]
enum Keys {
    One(Key),
    Many(FastSet<Key>),
}

impl Keys {
    fn insert(&mut self, key: Key) {
        match self {
            Keys::One(k) if *k == key => {}
            Keys::One(k) => *self = Keys::Many(FastSet::from_iter([*k, key])),
            Keys::Many(set) => {
                set.insert(key);
            }
        }
    }

    /// Removes `key`; whether none is left.
    fn remove(&mut self, key: &Key) -> bool {
        match self {
            Keys::One(k) => k == key,
            Keys::Many(set) => {
                set.remove(key);
                set.is_empty()
            }
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Key> {
        let (one, many) = match self {
            Keys::One(k) => (Some(k), None),
            Keys::Many(set) => (None, Some(set.iter())),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }
}

/// Takes `key` out of the facet index (it is being answered, or gone).
fn unindex(by_facet: &mut FastMap<(u32, Facet), Keys>, key: &Key, f: &InFlight) {
    for &facet in &f.facets {
        let slot = (f.pid, facet);
        if by_facet.get_mut(&slot).is_some_and(|keys| keys.remove(key)) {
            by_facet.remove(&slot);
        }
    }
}

/// Every facet of a request, each once.
fn facets(f: &InFlight) -> Facets {
    let mut v: Facets = SmallVec::new();
    v.push(Facet::Thread(f.tid));
    v.push(Facet::line(&f.method, &f.target));
    if f.goroutine != 0 {
        v.push(Facet::Goroutine(f.goroutine));
    }
    for id in identifiers(&f.target) {
        let facet = Facet::id(id);
        if !v.contains(&facet) {
            v.push(facet);
        }
    }
    v
}

const MAX_PER_PROCESS: usize = 50_000;
/// Processes remembered as moving requests between threads (forgotten all at once beyond this:
/// pids get reused, and a forgotten process is marked again at its next such answer).
const MAX_THREAD_MARKS: usize = 65_536;

#[derive(Default)]
pub struct Serving {
    inflight: FastMap<Key, InFlight>,
    /// Requests in flight per process (the bound per process).
    by_process: FastMap<u32, usize>,
    /// Requests not being answered yet (the only candidate parents), by (process, facet).
    by_facet: FastMap<(u32, Facet), Keys>,
    /// Processes seen answering a request from another thread than the one that read it.
    moves_between_threads: FastSet<u32>,
    /// Processes added to `moves_between_threads`.
    pub thread_rule_disabled: u64,
}

impl Serving {
    /// The requests in flight on connections `conns`.
    pub fn on_connections(&self, conns: &FastSet<u64>) -> Vec<Key> {
        self.inflight
            .keys()
            .filter(|key| conns.contains(&key.0))
            .copied()
            .collect()
    }

    /// Frees spare capacity (after state was shed under the memory budget).
    pub fn shrink(&mut self) {
        self.inflight.shrink_to_fit();
        self.by_process.shrink_to_fit();
        self.by_facet.shrink_to_fit();
    }

    pub fn insert(&mut self, key: Key, mut f: InFlight) {
        let n = self.by_process.entry(f.pid).or_default();
        if *n >= MAX_PER_PROCESS || self.inflight.contains_key(&key) {
            return;
        }
        *n += 1;
        f.facets = facets(&f);
        for &facet in &f.facets {
            match self.by_facet.entry((f.pid, facet)) {
                Entry::Occupied(mut keys) => keys.get_mut().insert(key),
                Entry::Vacant(slot) => {
                    slot.insert(Keys::One(key));
                }
            }
        }
        self.inflight.insert(key, f);
    }

    pub fn get(&self, key: &Key) -> Option<&InFlight> {
        self.inflight.get(key)
    }

    pub fn get_mut(&mut self, key: &Key) -> Option<&mut InFlight> {
        self.inflight.get_mut(key)
    }

    /// Thread `tid` began answering `key`: no longer a context for calls; and if another
    /// thread than the reader answers, the process's requests move between threads.
    pub fn answering(&mut self, key: &Key, tid: u32) {
        let Some(f) = self.inflight.get_mut(key) else { return };
        if f.answering {
            return;
        }
        f.answering = true;
        unindex(&mut self.by_facet, key, f);
        let (pid, reader) = (f.pid, f.tid);
        if reader != tid && !self.moves_between_threads.contains(&pid) {
            if self.moves_between_threads.len() >= MAX_THREAD_MARKS {
                self.moves_between_threads.clear();
            }
            self.moves_between_threads.insert(pid);
            self.thread_rule_disabled += 1;
        }
    }

    pub fn remove(&mut self, key: &Key) {
        let Some(gone) = self.inflight.remove(key) else { return };
        if let Some(n) = self.by_process.get_mut(&gone.pid) {
            *n -= 1;
            if *n == 0 {
                self.by_process.remove(&gone.pid);
            }
        }
        if !gone.answering {
            unindex(&mut self.by_facet, key, &gone);
        }
    }

    /// Whether a thread of `pid` says which request it serves (requests stay on their thread).
    pub fn threads_reliable(&self, pid: u32) -> bool {
        !self.moves_between_threads.contains(&pid)
    }

    /// Whether `pid` serves any request now.
    pub fn serves(&self, pid: u32) -> bool {
        self.by_process.contains_key(&pid)
    }

    /// Server requests of `pid` with `facet`, read by `before_ns` and not yet being answered,
    /// in no particular order.
    pub fn with(&self, pid: u32, facet: Facet, before_ns: u64) -> impl Iterator<Item = (Key, &InFlight)> {
        self.by_facet
            .get(&(pid, facet))
            .into_iter()
            .flat_map(Keys::iter)
            .filter_map(move |k| {
                self.inflight
                    .get(k)
                    .filter(|f| f.start_ns <= before_ns)
                    .map(|f| (*k, f))
            })
    }
}
