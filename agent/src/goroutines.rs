//! Go programs: which goroutine asked for each client request, and the goroutines that led to it.
//!
//! A Go HTTP server reads each request and runs its handler in the connection's goroutine; the
//! handler's calls run in that goroutine or in goroutines it creates (a fan-out), perhaps
//! several levels down. `net/http`'s client does not write a request from the goroutine that
//! asks for it: the pooled connection's write loop goroutine does, after
//! `persistConn.roundTrip` hands it the request. Threads say nothing (goroutines move between
//! them), so the kernel reports the goroutine of every syscall of a hooked Go process, and three
//! hooks report what syscalls cannot show (`agent-ebpf/src/probes/golang.rs`): goroutine
//! creation, `roundTrip` (which goroutine asks for which `*http.Request`) and `Request.write`
//! (which goroutine writes it). Keyed by the request, not the connection, so connections
//! opened before the hooks were attached are followed too.
//!
//! From these the tracker gives each client request a [`GoChain`]: the goroutine that asked for
//! it, then its creator, and so on, each with the moment it created the next. The stitcher's
//! goroutine rule (`stitch::rules::goroutine`) walks it to the nearest goroutine that read a
//! server request still in flight, and takes that request if it began before the chain left
//! that goroutine: a worker created during an earlier request (a long-lived background
//! goroutine) names no parent.
//!
//! Precision: a `g` is reused by the runtime only for a goroutine it creates anew, which a new
//! creation record reports (it resets what was known of that `g`); a `*http.Request`'s memory
//! is reused only after the request is done, and its next `roundTrip` overwrites its asker.
use std::sync::mpsc::Sender;

use agent_common::{GoEvent, go_op};

use crate::{FastMap, telemetry::Family};

/// Ancestors followed from the asking goroutine (a fan-out inside a fan-out is 2).
pub const MAX_DEPTH: usize = 6;
/// Entries per process and per index; beyond it the index starts over (counted). Goroutines
/// are bounded by what a program holds at once (the runtime reuses a `g` for each new one);
/// requests leave the asker index when their first write is seen.
const MAX_PER_PROCESS: usize = 1 << 17;
/// Processes remembered; beyond it all start over (processes that exited leave nothing else).
const MAX_PROCESSES: usize = 4096;

/// A client request's asking goroutine and its ancestors, nearest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GoChain {
    /// (goroutine, since): `since` is when that goroutine created the previous one in the
    /// chain (`u64::MAX` for the asking goroutine itself): the request it serves must have
    /// begun by then.
    pub links: [(u64, u64); MAX_DEPTH],
    pub len: usize,
}

impl GoChain {
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.links[..self.len].iter().copied()
    }
}

#[derive(Default)]
struct GoProcess {
    /// goroutine → (its creator, when it was created).
    creator: FastMap<u64, (u64, u64)>,
    /// goroutine → the `*http.Request` it writes (its latest `Request.write`).
    writing: FastMap<u64, u64>,
    /// `*http.Request` → the goroutine that asked for it in `roundTrip`.
    asker: FastMap<u64, u64>,
}

/// Counters of the Go hooks (exported as `sockspan_go_*`).
#[derive(Debug, Default, Clone, Copy)]
pub struct GoStats {
    /// Executables whose hooks were attached, and those that could not be (no symbol table:
    /// a binary built with `-ldflags=-s`; or the kernel refused), counted by the attacher.
    pub executables_hooked: u64,
    pub executables_failed: u64,
    /// Hook reports by kind: creations, round trips, request writes.
    pub spawns: u64,
    pub round_trips: u64,
    pub request_writes: u64,
    /// Client requests given a chain.
    pub chains: u64,
    /// Client requests written by a goroutine whose hooks said nothing of who asked for them
    /// (written before the hooks were attached, or by a client other than `net/http`'s).
    pub unknown_asker: u64,
    /// Indexes that reached their bound and started over.
    pub resets: u64,
}

impl GoStats {
    /// Every counter, named and described here, beside what it counts.
    pub fn families(&self) -> Vec<Family> {
        vec![
            Family::counter(
                "sockspan_go_executables_total",
                "Go executables seen, by whether their hooks (goroutine creation, net/http round trips) were attached.",
                vec![
                    ("result", "hooked", self.executables_hooked),
                    ("result", "failed", self.executables_failed),
                ],
            ),
            Family::counter(
                "sockspan_go_hook_reports_total",
                "Reports of the Go hooks, by hook.",
                vec![
                    ("hook", "newproc1", self.spawns),
                    ("hook", "round_trip", self.round_trips),
                    ("hook", "request_write", self.request_writes),
                ],
            ),
            Family::counter(
                "sockspan_go_chains_total",
                "Client requests of hooked Go processes, by whether the goroutine that asked for them is known.",
                vec![
                    ("asker", "known", self.chains),
                    ("asker", "unknown", self.unknown_asker),
                ],
            ),
            Family::total(
                "sockspan_go_index_resets_total",
                "Goroutine indexes that reached their bound and started over.",
                self.resets,
            ),
        ]
    }
}

/// Which processes run Go, and the requests to hook them.
struct Detector {
    is_go: fn(u32) -> bool,
    checked: FastMap<u32, ()>,
    hook: Sender<u32>,
}

#[derive(Default)]
pub struct GoTracker {
    procs: FastMap<u32, GoProcess>,
    detector: Option<Detector>,
    pub stats: GoStats,
}

impl GoTracker {
    /// A tracker that asks for no hooks (replays: their records carry what the hooks reported).
    pub fn new() -> Self {
        Self::default()
    }

    /// A tracker that asks `hook` for the hooks of each process `is_go` says runs Go, once.
    pub fn with_hooks(is_go: fn(u32) -> bool, hook: Sender<u32>) -> Self {
        Self {
            detector: Some(Detector {
                is_go,
                checked: FastMap::default(),
                hook,
            }),
            ..Self::new()
        }
    }

    /// A process opened a TCP connection: if it is a Go program seen for the first time, ask for
    /// its hooks.
    pub fn saw_process(&mut self, pid: u32) {
        let Some(d) = &mut self.detector else { return };
        if d.checked.contains_key(&pid) {
            return;
        }
        if d.checked.len() >= MAX_PROCESSES {
            d.checked.clear();
        }
        d.checked.insert(pid, ());
        if (d.is_go)(pid) {
            let _ = d.hook.send(pid);
        }
    }

    /// Forgets processes that are gone (or whose pid now names another): their goroutine
    /// indexes, and whether they were checked for Go, so a Go program that reuses a pid is
    /// hooked.
    pub fn forget_processes(&mut self, pids: &[u32]) {
        for pid in pids {
            self.procs.remove(pid);
            if let Some(d) = &mut self.detector {
                d.checked.remove(pid);
            }
        }
    }

    pub fn on_event(&mut self, ev: &GoEvent) {
        if self.procs.len() >= MAX_PROCESSES && !self.procs.contains_key(&ev.header.pid) {
            self.procs.clear();
            self.stats.resets += 1;
        }
        let p = self.procs.entry(ev.header.pid).or_default();
        let (index_len, stats) = match ev.op {
            go_op::SPAWN => {
                p.creator.insert(ev.b, (ev.a, ev.header.ts_exit_ns));
                // The new goroutine reuses a `g`: what that `g` wrote before is void.
                p.writing.remove(&ev.b);
                (p.creator.len(), &mut self.stats.spawns)
            }
            go_op::ROUND_TRIP => {
                p.asker.insert(ev.b, ev.a);
                (p.asker.len(), &mut self.stats.round_trips)
            }
            go_op::REQUEST_WRITE => {
                p.writing.insert(ev.a, ev.b);
                (p.writing.len(), &mut self.stats.request_writes)
            }
            _ => return,
        };
        *stats += 1;
        if index_len > MAX_PER_PROCESS {
            *p = GoProcess::default();
            self.stats.resets += 1;
        }
    }

    /// The chain of a client request written by goroutine `writer` of `pid` (boxed: requests
    /// carry it through the pipeline, and only Go programs' calls have one).
    pub fn chain(&mut self, pid: u32, writer: u64) -> Option<Box<GoChain>> {
        if writer == 0 {
            return None;
        }
        let p = self.procs.get_mut(&pid)?;
        // A request `net/http` writes names its asker (a write loop's, another goroutine's, or
        // its own); any other write is its writer's own. Its first write is the one that starts
        // it: the asker is not needed after.
        let asker = match p.writing.get(&writer) {
            Some(req) => match p.asker.remove(req) {
                Some(g) => g,
                None => {
                    self.stats.unknown_asker += 1;
                    return None;
                }
            },
            None => writer,
        };
        let mut chain = GoChain {
            links: [(0, 0); MAX_DEPTH],
            len: 1,
        };
        chain.links[0] = (asker, u64::MAX);
        let mut g = asker;
        while chain.len < MAX_DEPTH {
            let Some(&(creator, at)) = p.creator.get(&g) else { break };
            chain.links[chain.len] = (creator, at);
            chain.len += 1;
            g = creator;
        }
        self.stats.chains += 1;
        Some(Box::new(chain))
    }
}

#[cfg(test)]
mod tests {
    use agent_common::EventHeader;

    use super::*;

    fn ev(op: u8, a: u64, b: u64, ts: u64) -> GoEvent {
        GoEvent {
            header: EventHeader {
                pid: 1,
                ts_exit_ns: ts,
                ..Default::default()
            },
            op,
            a,
            b,
            ..Default::default()
        }
    }

    #[test]
    fn a_written_request_goes_back_to_its_asker_and_the_asker_s_creators() {
        let mut t = GoTracker::new();
        t.on_event(&ev(go_op::SPAWN, 10, 20, 100)); // handler 10 creates 20
        t.on_event(&ev(go_op::SPAWN, 20, 30, 200)); // 20 creates 30
        t.on_event(&ev(go_op::ROUND_TRIP, 30, 0xe0, 300));
        t.on_event(&ev(go_op::REQUEST_WRITE, 99, 0xe0, 350)); // the write loop 99 writes it
        let c = t.chain(1, 99).unwrap();
        assert_eq!(c.iter().collect::<Vec<_>>(), [(30, u64::MAX), (20, 200), (10, 100)]);
        // A goroutine writing its own request is its own asker.
        assert_eq!(t.chain(1, 20).unwrap().iter().next(), Some((20, u64::MAX)));
        assert_eq!(t.chain(1, 0), None);
        assert_eq!(t.chain(2, 20), None, "no hook report from that process");
    }

    #[test]
    fn a_reused_g_forgets_its_former_life() {
        let mut t = GoTracker::new();
        t.on_event(&ev(go_op::ROUND_TRIP, 7, 0xe0, 1));
        t.on_event(&ev(go_op::REQUEST_WRITE, 99, 0xe0, 2));
        t.on_event(&ev(go_op::SPAWN, 10, 99, 3)); // the runtime reuses 99 for a new goroutine
        assert_eq!(t.chain(1, 99).unwrap().iter().next(), Some((99, u64::MAX)));
    }

    /// A Go process is hooked once; a process forgotten (gone, or its pid reused) is checked
    /// again when its pid shows, and its goroutines are forgotten with it.
    #[test]
    fn a_forgotten_process_is_checked_again() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut t = GoTracker::with_hooks(|_| true, tx);
        t.saw_process(1);
        t.saw_process(1);
        t.on_event(&ev(go_op::SPAWN, 10, 20, 100));
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), [1]);
        t.forget_processes(&[1]);
        assert_eq!(t.chain(1, 20), None, "its goroutines are forgotten");
        t.saw_process(1);
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), [1]);
    }

    #[test]
    fn a_request_whose_asker_is_unknown_gives_no_chain() {
        let mut t = GoTracker::new();
        t.on_event(&ev(go_op::REQUEST_WRITE, 99, 0xe0, 1));
        assert_eq!(t.chain(1, 99), None);
        assert_eq!(t.stats.unknown_asker, 1);
    }

    #[test]
    fn creation_cycles_stop_at_the_depth_bound() {
        let mut t = GoTracker::new();
        t.on_event(&ev(go_op::SPAWN, 1, 2, 1));
        t.on_event(&ev(go_op::SPAWN, 2, 1, 2));
        assert_eq!(t.chain(1, 2).unwrap().len, MAX_DEPTH);
    }
}
