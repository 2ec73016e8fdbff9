//! Event-loop epochs: the end of each epoll/poll/select wait starts a new stretch of a thread's
//! event loop (a "tick"). Userspace links a call written by a loop thread to the message that
//! thread read last in the same stretch, so the stretch must also end at every input userspace
//! does not see: a read of data from anything but a TCP socket (an eventfd or pipe that
//! signals a finished background task, a unix socket) bumps the epoch too (in `syscalls`).
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::tracepoint,
    programs::TracePointContext,
};

use crate::maps::{LOOP_EPOCH, TRACED_TGIDS, self_tgid};

/// Starts a new epoch for the current thread, if its process uses TCP sockets.
#[inline(always)]
fn on_wait_end() -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // SAFETY: presence check only.
    if tgid == self_tgid() || unsafe { TRACED_TGIDS.get(tgid).is_none() } {
        return 0;
    }
    bump_epoch(pid_tgid, true);
    0
}

/// Bumps the thread's epoch; creates it (at 1) only when `create`.
#[inline(always)]
pub fn bump_epoch(pid_tgid: u64, create: bool) {
    if let Some(e) = LOOP_EPOCH.get_ptr_mut(pid_tgid) {
        // SAFETY: this thread's own entry; only this thread writes it.
        unsafe { *e += 1 };
    } else if create {
        // A fresh entry starts at the clock, not at 1: a thread whose entry the LRU evicted must
        // not count its epochs again from where userspace may still remember an old stretch.
        // SAFETY: helper without preconditions.
        let _ = LOOP_EPOCH.insert(pid_tgid, unsafe { bpf_ktime_get_ns() }, 0);
    }
}

/// The current thread's epoch (0: it never waited in a poll-family call).
#[inline(always)]
pub fn epoch(pid_tgid: u64) -> u64 {
    // SAFETY: copied out at once.
    unsafe { LOOP_EPOCH.get(pid_tgid).copied().unwrap_or(0) }
}

/// Every wait of the poll family; one line each.
macro_rules! wait_end {
    ($($fn_name:ident => $tp:literal),* $(,)?) => {$(
        #[tracepoint(category = "syscalls", name = $tp)]
        pub fn $fn_name(_ctx: TracePointContext) -> u32 {
            on_wait_end()
        }
    )*};
}

wait_end! {
    sys_exit_epoll_wait => "sys_exit_epoll_wait",
    sys_exit_epoll_pwait => "sys_exit_epoll_pwait",
    sys_exit_epoll_pwait2 => "sys_exit_epoll_pwait2",
    sys_exit_poll => "sys_exit_poll",
    sys_exit_ppoll => "sys_exit_ppoll",
    sys_exit_select => "sys_exit_select",
    sys_exit_pselect6 => "sys_exit_pselect6",
}
