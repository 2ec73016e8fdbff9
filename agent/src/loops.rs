//! Event-loop causality: which message a loop thread acted on when it wrote a request.
//!
//! A single-threaded event loop (Node.js, nginx, a Python selector loop) runs one callback per
//! ready socket after each epoll/poll/select wait: it reads the message, and everything the
//! callback does (microtasks included) happens before the next socket's callback reads. So a
//! request written by the loop thread was caused by the last message that thread read in the
//! same stretch of its loop (the kernel's *epoch*: it ends at every wait and at every read of
//! data userspace does not see, such as an eventfd that signals a finished background task).
//! A request whose connection the thread opened in such a stretch was caused by that stretch's
//! message, even when it is written later, once the connection is up.
//!
//! Only the I/O callbacks read sockets, but other work runs in the same stretch after them,
//! with no wait in between: timers (a delayed retry, a `setTimeout` sleep), `setImmediate`
//! callbacks (Bluebird schedules every promise continuation so), write-completion callbacks. A
//! write (or connect) after the stretch's last read may be any of them, so a cause counts only
//! once the thread reads again in the same stretch: then the write was inside an I/O callback,
//! the one of the message read last before it. Until then the hint is *unconfirmed*; if the
//! stretch ends first, the stitcher turns it into a span link, not a parent.
//!
//! A write is also certain when the stretch read one connection only, before the time the wait
//! that began it would have timed out, and nothing in it flushed a message begun earlier: the
//! loop computes that timeout from its nearest timer and from pending work (immediates, queued
//! completions make it 0), so no timer has fired yet, no immediate was pending, and whatever ran
//! since the read (its callback, immediates and write completions it caused) came from that
//! one message. This covers the quiet loops, where a stretch often holds a single callback.
//!
//! Precision guards, each a reason to give no cause:
//! - the thread is not a loop thread (epoch 0): thread-per-request servers are the thread
//!   rule's, not this one's;
//! - the process has more than one loop thread doing TCP I/O (Go's scheduler threads, Java's
//!   selector threads, Netty's loops): there a callback may write for another thread's
//!   message; or its one loop thread never read a server request (a client I/O thread serving
//!   other threads, such as `java.net.http`'s selector);
//! - the process is a Go program: goroutines switch without a wait, so the last message read
//!   says nothing of who writes next;
//! - the last input was not one whole message: several requests in one read (pipelined), a
//!   partial response, bytes of another protocol, the end of a stream;
//! - the write is on the connection whose response was just read while the process's other
//!   connections to that peer were all busy: a full client pool hands a freed connection to a
//!   request queued for one, in that response's callback (a span link, not a parent).
use crate::{FastMap, decode::LoopStamp, telemetry::Family};

/// How early, before the wait's deadline, a timer may already fire: loops keep time in whole
/// milliseconds (libuv truncates; a coarse clock may lag by another one).
const TIMER_SLACK_NS: u64 = 2_000_000;

/// The message a loop thread acted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// A server request (its connection and sequence number) was read.
    Request { conn_id: u64, seq: u64 },
    /// The response to a client request was read whole: its continuation runs now.
    /// `pool_full`: every other connection of the process to that peer was busy, so a client
    /// pool may have had requests queued for a free connection, and hands this one to the
    /// oldest of them now: a request written on this connection in this stretch may be that
    /// queued one (another request's), not the continuation.
    Response { conn_id: u64, seq: u64, pool_full: bool },
}

/// How a cause reached a client request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Written in the same stretch of the loop as the message was read.
    Stretch,
    /// The first request on a connection the thread opened in the stretch of the message.
    Connect,
}

/// What the loop said about a client request's cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopHint {
    pub cause: Cause,
    pub via: Via,
    /// The write was followed by a read in the same stretch (see the module's doc).
    pub confirmed: bool,
}

/// A loop thread's current epoch: its last input (`None`: one with no usable cause), and what
/// it wrote or connected since, waiting for a read to confirm it.
#[derive(Debug, Clone, Default)]
struct Stretch {
    epoch: u64,
    /// When the wait that began it would have timed out.
    deadline_ns: u64,
    last: Option<Cause>,
    /// Fds read in this stretch (two are enough to say "more than one").
    read_fds: Vec<i32>,
    /// A write in it went on with a message begun in an earlier stretch.
    older_flushed: bool,
    /// Client requests (connection, seq) given a cause in this stretch, unconfirmed.
    unconfirmed: Vec<(u64, u64)>,
    /// Fds connected in this stretch, their connect unconfirmed.
    connecting: Vec<i32>,
}

/// A connect waiting for its connection's first request.
#[derive(Debug, Clone, Copy)]
struct Connect {
    sock: u64,
    cause: Cause,
    confirmed: bool,
}

#[derive(Debug, Default)]
struct ProcessLoops {
    /// The loop threads seen doing TCP I/O (capped: two are enough to say "more than one").
    threads: Vec<u32>,
    /// One of them read a server request.
    serves: bool,
    /// A Go program (never qualifies).
    go: bool,
    /// When it was last looked at (the tracker's own count of lookups): the least recently
    /// seen processes are forgotten first.
    seen: u64,
}

impl Stretch {
    /// Whatever the thread does at `at_ns` comes from the one message read in this stretch.
    fn lone(&self, at_ns: u64) -> bool {
        self.read_fds.len() == 1 && !self.older_flushed && at_ns.saturating_add(TIMER_SLACK_NS) < self.deadline_ns
    }
}

impl ProcessLoops {
    fn note_thread(&mut self, tid: u32) {
        if !self.threads.contains(&tid) && self.threads.len() < 2 {
            self.threads.push(tid);
        }
    }

    /// Why thread `tid`'s stretches say nothing of its calls, if they don't.
    fn disqualified(&self, tid: u32) -> Option<Abstain> {
        if self.go {
            Some(Abstain::GoProgram)
        } else if self.threads.len() != 1 || self.threads[0] != tid {
            Some(Abstain::SeveralLoopThreads)
        } else if !self.serves {
            Some(Abstain::NotServing)
        } else {
            None
        }
    }
}

/// Why a client request written by a loop thread got no cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abstain {
    /// Its process has more than one loop thread doing TCP I/O.
    SeveralLoopThreads,
    /// Its process runs a Go program.
    GoProgram,
    /// Its process's loop thread never read a server request (a client I/O thread).
    NotServing,
    /// No whole message was read in the stretch (a new stretch, several requests in one read,
    /// a partial response, another protocol).
    NoMessage,
    /// The first request on a connection whose connect carried no cause.
    ConnectWithoutCause,
    /// Written (or connected) after the stretch's last read: a timer, an immediate or a
    /// completion callback may have done it. Exported as a span link, not a parent.
    Unconfirmed,
    /// Written on the connection whose response was just read while every other connection to
    /// that peer was busy: maybe a queued request handed the connection. A span link.
    PoolHandoff,
}

impl Abstain {
    pub const ALL: [Abstain; 7] = [
        Abstain::SeveralLoopThreads,
        Abstain::GoProgram,
        Abstain::NotServing,
        Abstain::NoMessage,
        Abstain::ConnectWithoutCause,
        Abstain::Unconfirmed,
        Abstain::PoolHandoff,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Abstain::SeveralLoopThreads => "several_loop_threads",
            Abstain::GoProgram => "go_program",
            Abstain::NotServing => "not_serving",
            Abstain::NoMessage => "no_message",
            Abstain::ConnectWithoutCause => "connect_without_cause",
            Abstain::Unconfirmed => "unconfirmed",
            Abstain::PoolHandoff => "pool_handoff",
        }
    }
}

/// What the tracker said of client requests written by loop threads.
#[derive(Debug, Default, Clone, Copy)]
pub struct LoopStats {
    /// Causes given (and confirmed), by [`Via`] (stretch, connect).
    pub hints: [u64; 2],
    /// No cause, by [`Abstain`].
    pub abstained: [u64; Abstain::ALL.len()],
}

impl LoopStats {
    /// Every counter, named and described here, beside what it counts.
    pub fn families(&self) -> Vec<Family> {
        let hints = [(Via::Stretch, "stretch"), (Via::Connect, "connect")]
            .into_iter()
            .map(|(via, name)| ("via", name, self.hints[via as usize]))
            .collect();
        let abstained = Abstain::ALL
            .into_iter()
            .map(|a| ("reason", a.as_str(), self.abstained[a as usize]))
            .collect();
        vec![
            Family::counter(
                "sockspan_loop_hints_total",
                "Client requests written by an event-loop thread that were given the message that caused them, by how (the same stretch of the loop, or the stretch that opened the connection).",
                hints,
            ),
            Family::counter(
                "sockspan_loop_abstained_total",
                "Client requests written by an event-loop thread that were given no cause, by reason.",
                abstained,
            ),
        ]
    }
}

/// Loop threads remembered at once (beyond it all are forgotten: they re-learn in one stretch).
const MAX_THREADS: usize = 65_536;
const MAX_PROCESSES: usize = 16_384;
/// Connects waiting for their first request.
const MAX_CONNECTS: usize = 65_536;
/// Writes and connects of one stretch awaiting confirmation.
const MAX_PER_STRETCH: usize = 1024;

/// Tracks each loop thread's last input, in stream order (a thread's events arrive in the order
/// it made them).
#[derive(Default)]
pub struct LoopTracker {
    stretches: FastMap<(u32, u32), Stretch>,
    processes: FastMap<u32, ProcessLoops>,
    /// (pid, fd) → the connect that opened it, until its first request.
    connects: FastMap<(u32, i32), Connect>,
    /// Tells Go programs apart (by pid).
    is_go: Option<fn(u32) -> bool>,
    /// Lookups of `processes` so far.
    touches: u64,
    pub stats: LoopStats,
}

impl LoopTracker {
    /// `is_go`: whether a process runs a Go program (None: never, e.g. replays).
    pub fn new(is_go: Option<fn(u32) -> bool>) -> Self {
        Self {
            is_go,
            ..Self::default()
        }
    }

    fn process(&mut self, pid: u32) -> &mut ProcessLoops {
        if self.processes.len() >= MAX_PROCESSES && !self.processes.contains_key(&pid) {
            // Forget the least recently seen half (processes gone or idle); a process seen
            // again starts over, as a new one does.
            let mut seen: Vec<u64> = self.processes.values().map(|p| p.seen).collect();
            let (_, &mut median, _) = seen.select_nth_unstable(MAX_PROCESSES / 2);
            self.processes.retain(|_, p| p.seen > median);
        }
        self.touches += 1;
        let (is_go, touches) = (self.is_go, self.touches);
        let p = self.processes.entry(pid).or_insert_with(|| ProcessLoops {
            go: is_go.is_some_and(|f| f(pid)),
            ..ProcessLoops::default()
        });
        p.seen = touches;
        p
    }

    /// Forgets what was learnt of processes that are gone (or whose pid now names another):
    /// whether they run Go, their loop threads, their pending connects.
    pub fn forget_processes(&mut self, pids: &[u32]) {
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            self.processes.remove(pid);
        }
        self.connects.retain(|(pid, _), _| !pids.contains(pid));
    }

    /// Whether `pid` runs a Go program (asked once per process).
    pub fn runs_go(&mut self, pid: u32) -> bool {
        self.process(pid).go
    }

    /// The thread's stretch, started afresh if `lp` is a new epoch (what waited for
    /// confirmation in the old one never gets it).
    fn stretch(&mut self, pid: u32, tid: u32, lp: LoopStamp) -> &mut Stretch {
        if self.stretches.len() >= MAX_THREADS && !self.stretches.contains_key(&(pid, tid)) {
            self.stretches.clear();
        }
        let s = self.stretches.entry((pid, tid)).or_default();
        if s.epoch != lp.epoch {
            self.stats.abstained[Abstain::Unconfirmed as usize] += s.unconfirmed.len() as u64;
            *s = Stretch {
                epoch: lp.epoch,
                deadline_ns: lp.wait_deadline_ns,
                ..Stretch::default()
            };
        }
        s
    }

    /// A loop thread (epoch ≠ 0) read bytes; `cause` is the whole message they completed, if
    /// exactly one. What the thread wrote or connected earlier in the stretch was inside an I/O
    /// callback: those client requests are returned, confirmed.
    pub fn on_input(&mut self, pid: u32, tid: u32, lp: LoopStamp, fd: i32, cause: Option<Cause>) -> Vec<(u64, u64)> {
        if lp.epoch == 0 {
            return Vec::new();
        }
        let p = self.process(pid);
        p.note_thread(tid);
        if matches!(cause, Some(Cause::Request { .. })) {
            p.serves = true;
        }
        let s = self.stretch(pid, tid, lp);
        s.last = cause;
        if !s.read_fds.contains(&fd) && s.read_fds.len() < 2 {
            s.read_fds.push(fd);
        }
        let confirmed = std::mem::take(&mut s.unconfirmed);
        for fd in std::mem::take(&mut s.connecting) {
            if let Some(c) = self.connects.get_mut(&(pid, fd)) {
                c.confirmed = true;
            }
        }
        self.stats.hints[Via::Stretch as usize] += confirmed.len() as u64;
        confirmed
    }

    /// A loop thread wrote bytes (it does TCP I/O, whatever it writes); `older`: they go on
    /// with a message begun in an earlier stretch.
    pub fn on_output(&mut self, pid: u32, tid: u32, lp: LoopStamp, older: bool) {
        if lp.epoch == 0 {
            return;
        }
        self.process(pid).note_thread(tid);
        if older {
            self.stretch(pid, tid, lp).older_flushed = true;
        }
    }

    /// The cause of the stretch thread `tid` is in, or why there is none.
    fn current(&self, pid: u32, tid: u32, epoch: u64) -> Result<Cause, Abstain> {
        let process = self.processes.get(&pid).ok_or(Abstain::NotServing)?;
        if let Some(why) = process.disqualified(tid) {
            return Err(why);
        }
        self.stretches
            .get(&(pid, tid))
            .filter(|s| s.epoch == epoch)
            .and_then(|s| s.last)
            .ok_or(Abstain::NoMessage)
    }

    /// A thread connected socket `sock` as fd `fd` at `at_ns`.
    pub fn on_connect(&mut self, pid: u32, tid: u32, fd: i32, sock: u64, lp: LoopStamp, at_ns: u64) {
        self.on_output(pid, tid, lp, false);
        self.connects.remove(&(pid, fd));
        let Ok(cause) = self.current(pid, tid, lp.epoch) else {
            return;
        };
        let s = self.stretch(pid, tid, lp);
        let confirmed = s.lone(at_ns);
        if !confirmed && s.connecting.len() < MAX_PER_STRETCH {
            s.connecting.push(fd);
        }
        if self.connects.len() >= MAX_CONNECTS {
            self.connects.clear();
        }
        self.connects.insert((pid, fd), Connect { sock, cause, confirmed });
    }

    /// The cause of client request `request` (connection, seq), whose first bytes thread `tid`
    /// wrote. The first request on a connection takes the cause of the stretch that opened it,
    /// or none: it is written once the connection is up, in whatever stretch reports that,
    /// after whichever message that stretch read. Later requests take the writer's stretch,
    /// unconfirmed until the thread reads again in it ([`Self::on_input`]).
    #[expect(clippy::too_many_arguments, reason = "the facts of one write, named")]
    pub fn hint(
        &mut self,
        pid: u32,
        tid: u32,
        fd: i32,
        sock: u64,
        lp: LoopStamp,
        at_ns: u64,
        request: (u64, u64),
        first_on_conn: bool,
    ) -> Option<LoopHint> {
        let connected = self.connects.remove(&(pid, fd)).filter(|c| c.sock == sock);
        if first_on_conn {
            let Some(c) = connected else {
                self.stats.abstained[Abstain::ConnectWithoutCause as usize] += 1;
                return None;
            };
            let counter = if c.confirmed {
                &mut self.stats.hints[Via::Connect as usize]
            } else {
                &mut self.stats.abstained[Abstain::Unconfirmed as usize]
            };
            *counter += 1;
            return Some(LoopHint {
                cause: c.cause,
                via: Via::Connect,
                confirmed: c.confirmed,
            });
        }
        match self.current(pid, tid, lp.epoch) {
            Ok(
                cause @ Cause::Response {
                    conn_id,
                    pool_full: true,
                    ..
                },
            ) if conn_id == request.0 => {
                // Never confirmed: a span link at most.
                self.stats.abstained[Abstain::PoolHandoff as usize] += 1;
                Some(LoopHint {
                    cause,
                    via: Via::Stretch,
                    confirmed: false,
                })
            }
            Ok(cause) => {
                let s = self.stretch(pid, tid, lp);
                if s.lone(at_ns) {
                    self.stats.hints[Via::Stretch as usize] += 1;
                    return Some(LoopHint {
                        cause,
                        via: Via::Stretch,
                        confirmed: true,
                    });
                }
                if s.unconfirmed.len() >= MAX_PER_STRETCH {
                    // A client flooding requests without reading: nothing to confirm them by.
                    self.stats.abstained[Abstain::Unconfirmed as usize] += 1;
                    return None;
                }
                s.unconfirmed.push(request);
                Some(LoopHint {
                    cause,
                    via: Via::Stretch,
                    confirmed: false,
                })
            }
            Err(why) => {
                self.stats.abstained[why as usize] += 1;
                None
            }
        }
    }

    /// Forgets a closed fd's pending connect.
    pub fn on_close(&mut self, pid: u32, fd: i32) {
        self.connects.remove(&(pid, fd));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Beyond the bound, the processes seen longest ago are forgotten, not the busy ones: a
    /// forgotten multi-loop process would qualify again until its second loop thread shows.
    #[test]
    fn processes_forgotten_least_recently_seen_first() {
        let mut t = LoopTracker::new(None);
        let lp = LoopStamp {
            epoch: 1,
            wait_deadline_ns: 0,
        };
        t.on_output(1, 10, lp, false);
        t.on_output(1, 11, lp, false); // two loop threads: never qualifies
        for pid in 2..=MAX_PROCESSES as u32 {
            t.on_output(pid, pid, lp, false);
            if pid % 1000 == 0 {
                t.on_output(1, 10, lp, false); // process 1 stays busy
            }
        }
        t.on_output(MAX_PROCESSES as u32 + 1, 7, lp, false);
        assert!(t.processes.len() <= MAX_PROCESSES / 2 + 2, "{}", t.processes.len());
        assert!(!t.processes.contains_key(&2), "the stalest process is forgotten");
        let busy = &t.processes[&1];
        assert_eq!(busy.disqualified(10), Some(Abstain::SeveralLoopThreads));
    }

    /// A process forgotten (gone, or its pid reused) is learnt afresh: whether it runs Go is
    /// asked again, and its former loop threads no longer count.
    #[test]
    fn a_forgotten_process_is_learnt_afresh() {
        static RUNS_GO: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        let mut t = LoopTracker::new(Some(|_| RUNS_GO.load(std::sync::atomic::Ordering::Relaxed)));
        let lp = LoopStamp {
            epoch: 1,
            wait_deadline_ns: 0,
        };
        t.on_output(5, 10, lp, false);
        t.on_output(5, 11, lp, false);
        assert!(!t.runs_go(5));
        assert_eq!(t.processes[&5].disqualified(10), Some(Abstain::SeveralLoopThreads));
        RUNS_GO.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(!t.runs_go(5), "asked once per process");
        t.forget_processes(&[5]);
        assert!(t.runs_go(5), "the pid's new owner runs Go");
        assert!(t.processes[&5].threads.is_empty());
    }
}
