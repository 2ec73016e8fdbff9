//! The server-request index: the requests each process is serving, the candidate parents of the
//! calls it makes.
use std::net::SocketAddr;

use crate::{FastMap, FastSet};

/// (connection, request seq): a request's key.
pub type Key = (u64, u64);

/// A server request in flight.
#[derive(Debug)]
pub struct InFlight {
    pub pid: u32,
    /// The thread that read it.
    pub tid: u32,
    /// The goroutine that read it, in a hooked Go process; else 0.
    pub goroutine: u64,
    pub start_ns: u64,
    pub method: String,
    pub target: String,
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// Its response is being written.
    pub answering: bool,
    /// Calls made on its behalf, by (peer, method, target): for resend counts.
    pub calls: FastMap<(Option<SocketAddr>, String, String), u32>,
}

const MAX_PER_PROCESS: usize = 50_000;
/// Processes remembered as moving requests between threads (forgotten all at once beyond this:
/// pids get reused, and a forgotten process is marked again at its next such answer).
const MAX_THREAD_MARKS: usize = 65_536;

#[derive(Default)]
pub struct Serving {
    inflight: FastMap<Key, InFlight>,
    by_process: FastMap<u32, FastSet<Key>>,
    /// Processes seen answering a request from another thread than the one that read it.
    moves_between_threads: FastSet<u32>,
    /// Processes added to `moves_between_threads`.
    pub thread_rule_disabled: u64,
}

impl Serving {
    pub fn insert(&mut self, key: Key, f: InFlight) {
        let keys = self.by_process.entry(f.pid).or_default();
        if keys.len() < MAX_PER_PROCESS {
            keys.insert(key);
            self.inflight.insert(key, f);
        }
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
        f.answering = true;
        if f.tid != tid && !self.moves_between_threads.contains(&f.pid) {
            if self.moves_between_threads.len() >= MAX_THREAD_MARKS {
                self.moves_between_threads.clear();
            }
            self.moves_between_threads.insert(f.pid);
            self.thread_rule_disabled += 1;
        }
    }

    pub fn remove(&mut self, key: &Key) {
        if let Some(gone) = self.inflight.remove(key)
            && let Some(keys) = self.by_process.get_mut(&gone.pid)
        {
            keys.remove(key);
            if keys.is_empty() {
                self.by_process.remove(&gone.pid);
            }
        }
    }

    /// Whether a thread of `pid` says which request it serves (requests stay on their thread).
    pub fn threads_reliable(&self, pid: u32) -> bool {
        !self.moves_between_threads.contains(&pid)
    }

    /// Server requests of `pid` read by `before_ns` and not yet being answered.
    pub fn candidates(&self, pid: u32, before_ns: u64) -> Vec<Key> {
        let Some(keys) = self.by_process.get(&pid) else {
            return Vec::new();
        };
        keys.iter()
            .copied()
            .filter(|k| {
                self.inflight
                    .get(k)
                    .is_some_and(|f| !f.answering && f.start_ns <= before_ns)
            })
            .collect()
    }
}
