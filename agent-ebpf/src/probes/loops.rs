//! Event-loop epochs: the end of each epoll/poll/select wait starts a new stretch of a thread's
//! event loop (a "tick"). Userspace links a call written by a loop thread to the message that
//! thread read last in the same stretch, so the stretch must also end at every input userspace
//! does not see: a read of data from anything but a TCP socket (an eventfd or pipe that
//! signals a finished background task, a unix socket) bumps the epoch too (in `syscalls`).
//!
//! Each wait's timeout is kept as a deadline: loops compute it from their nearest timer (and
//! make it 0 while other work is pending), and their timer callbacks run after the I/O
//! callbacks of the same stretch, with no wait in between. Before the deadline no timer can
//! have fired: userspace uses that to trust a quiet stretch's writes (see `agent/src/loops.rs`).
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user},
    macros::tracepoint,
    programs::TracePointContext,
};

use agent_common::hooks::args::{EPOLL_TIMEOUT, POLL_TIMEOUT, PPOLL_TSP, PSELECT_TSP, SELECT_TVP};

use crate::maps::{LOOP_STATE, LoopState, TRACED_TGIDS, self_tgid};

/// How a wait passes its timeout.
#[derive(Clone, Copy)]
enum Timeout {
    /// An `int` of milliseconds (negative: none).
    Millis(usize),
    /// A pointer to a `struct __kernel_timespec` (NULL: none).
    Timespec(usize),
    /// A pointer to a `struct __kernel_old_timeval` (NULL: none).
    Timeval(usize),
}

/// The current thread, if its process uses TCP sockets (other processes' waits cost one
/// lookup).
#[inline(always)]
fn traced_thread() -> Option<u64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // SAFETY: presence check only.
    if tgid == self_tgid() || unsafe { TRACED_TGIDS.get(tgid).is_none() } {
        return None;
    }
    Some(pid_tgid)
}

#[inline(always)]
fn on_wait_start(ctx: &TracePointContext, timeout: Timeout) -> u32 {
    let Some(pid_tgid) = traced_thread() else { return 0 };
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let deadline = wait_deadline(ctx, timeout, now);
    if let Some(s) = LOOP_STATE.get_ptr_mut(pid_tgid) {
        // SAFETY: this thread's own entry; only this thread writes it.
        unsafe { (*s).waiting_deadline_ns = deadline };
    } else {
        // A fresh entry starts at the clock, not at 0: a thread whose entry the LRU evicted and
        // recreated must not count its epochs again from where userspace may still remember an
        // old stretch.
        let s = LoopState {
            epoch: now,
            deadline_ns: 0,
            waiting_deadline_ns: deadline,
        };
        let _ = LOOP_STATE.insert(pid_tgid, s, 0);
    }
    0
}

/// `now` + the wait's timeout; `u64::MAX` for none.
#[inline(always)]
fn wait_deadline(ctx: &TracePointContext, timeout: Timeout, now: u64) -> u64 {
    // SAFETY (all reads): offsets from the tracepoint formats; user memory through the helper.
    let after = match timeout {
        Timeout::Millis(off) => match super::ctx_field::<u64>(ctx, off) as i32 {
            ms if ms >= 0 => ms as u64 * 1_000_000,
            _ => return u64::MAX,
        },
        Timeout::Timespec(off) | Timeout::Timeval(off) => {
            let ptr: u64 = super::ctx_field(ctx, off);
            if ptr == 0 {
                return u64::MAX;
            }
            let Ok(pair) = (unsafe { bpf_probe_read_user(ptr as *const [i64; 2]) }) else {
                return u64::MAX;
            };
            let sub = if matches!(timeout, Timeout::Timeval(_)) {
                1_000
            } else {
                1
            };
            if pair[0] < 0 || pair[1] < 0 || pair[0] > 1 << 32 {
                return u64::MAX;
            }
            pair[0] as u64 * 1_000_000_000 + pair[1] as u64 * sub
        }
    };
    now.saturating_add(after)
}

/// Starts a new epoch for the current thread at the end of its wait. Only threads that passed
/// `traced_thread` at the wait's start have an entry: no second check here.
#[inline(always)]
fn on_wait_end() -> u32 {
    if let Some(s) = LOOP_STATE.get_ptr_mut(bpf_get_current_pid_tgid()) {
        // SAFETY: this thread's own entry; only this thread writes it.
        unsafe {
            (*s).epoch += 1;
            (*s).deadline_ns = (*s).waiting_deadline_ns;
        }
    }
    0
}

/// Ends the current thread's epoch (an input userspace does not see), if it is a loop thread.
#[inline(always)]
pub fn bump_epoch(pid_tgid: u64) {
    if let Some(s) = LOOP_STATE.get_ptr_mut(pid_tgid) {
        // SAFETY: this thread's own entry; only this thread writes it.
        unsafe { (*s).epoch += 1 };
    }
}

/// The current thread's (epoch, wait deadline); (0, 0) if it never waited in a poll-family
/// call.
#[inline(always)]
pub fn loop_state(pid_tgid: u64) -> (u64, u64) {
    // SAFETY: copied out at once.
    match unsafe { LOOP_STATE.get(pid_tgid).copied() } {
        Some(s) => (s.epoch, s.deadline_ns),
        None => (0, 0),
    }
}

/// Every wait of the poll family, entry and exit; one line each.
macro_rules! waits {
    ($($enter:ident, $exit:ident => $tp_enter:literal, $tp_exit:literal, $timeout:expr;)*) => {$(
        #[tracepoint(category = "syscalls", name = $tp_enter)]
        pub fn $enter(ctx: TracePointContext) -> u32 {
            on_wait_start(&ctx, $timeout)
        }
        #[tracepoint(category = "syscalls", name = $tp_exit)]
        pub fn $exit(_ctx: TracePointContext) -> u32 {
            on_wait_end()
        }
    )*};
}

// Timeout arguments: `agent_common::hooks::args`.
waits! {
    sys_enter_epoll_wait, sys_exit_epoll_wait => "sys_enter_epoll_wait", "sys_exit_epoll_wait", Timeout::Millis(EPOLL_TIMEOUT.offset);
    sys_enter_epoll_pwait, sys_exit_epoll_pwait => "sys_enter_epoll_pwait", "sys_exit_epoll_pwait", Timeout::Millis(EPOLL_TIMEOUT.offset);
    sys_enter_epoll_pwait2, sys_exit_epoll_pwait2 => "sys_enter_epoll_pwait2", "sys_exit_epoll_pwait2", Timeout::Timespec(EPOLL_TIMEOUT.offset);
    sys_enter_poll, sys_exit_poll => "sys_enter_poll", "sys_exit_poll", Timeout::Millis(POLL_TIMEOUT.offset);
    sys_enter_ppoll, sys_exit_ppoll => "sys_enter_ppoll", "sys_exit_ppoll", Timeout::Timespec(PPOLL_TSP.offset);
    sys_enter_select, sys_exit_select => "sys_enter_select", "sys_exit_select", Timeout::Timeval(SELECT_TVP.offset);
    sys_enter_pselect6, sys_exit_pselect6 => "sys_enter_pselect6", "sys_exit_pselect6", Timeout::Timespec(PSELECT_TSP.offset);
}
