//! Go programs: which goroutine made each syscall, which goroutine created which, and which
//! goroutine asked for each request that `net/http`'s client writes from its connection's
//! write loop goroutine (uprobes, attached by userspace to Go executables only; see
//! `agent/src/goroutines.rs`).
//!
//! Register use follows Go's internal ABI on x86-64 (Go 1.17 and later): arguments and results
//! in RAX, RBX, RCX, ..., the current goroutine's `g` in R14. A syscall made from Go code keeps
//! R14 (the runtime's syscall stubs do not touch it), so the user registers saved at syscall
//! entry name the goroutine.
use agent_common::{EventHeader, GoEvent, go_op, kind};
use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user,
        generated,
    },
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};

use crate::{
    capture::submit,
    maps::{GO_SPAWNING, TRACED_TGIDS, traced},
};

/// Byte offset of R14 in the x86-64 `struct pt_regs` (r15 comes first).
const PT_REGS_R14: usize = 8;

/// The goroutine running on the current thread (in a Go process: its hooks fired).
#[inline(always)]
pub fn current_goroutine() -> u64 {
    // SAFETY: helpers valid in tracing programs; the registers are read through the
    // fault-tolerant helper.
    unsafe {
        let task = generated::bpf_get_current_task_btf();
        let regs = generated::bpf_task_pt_regs(task) as usize;
        if regs == 0 {
            return 0;
        }
        bpf_probe_read_kernel((regs + PT_REGS_R14) as *const u64).unwrap_or(0)
    }
}

/// Sends a [`GoEvent`] for the current thread and marks its process as hooked.
#[inline(always)]
fn emit(op: u8, a: u64, b: u64) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let pid = (pid_tgid >> 32) as u32;
    let flags = traced::TCP | traced::GO;
    // SAFETY: copied out at once.
    if unsafe { TRACED_TGIDS.get(pid).copied() } != Some(flags) {
        let _ = TRACED_TGIDS.insert(pid, flags, 0);
    }
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let ev = GoEvent {
        header: EventHeader {
            kind: kind::GO,
            pid,
            tid: pid_tgid as u32,
            fd: -1,
            ts_enter_ns: now,
            ts_exit_ns: now,
            comm: bpf_get_current_comm().unwrap_or([0; 16]),
            ..EventHeader::default()
        },
        op,
        _pad: [0; 7],
        a,
        b,
    };
    // SAFETY: GoEvent is plain #[repr(C)] data without padding.
    let bytes =
        unsafe { core::slice::from_raw_parts((&ev as *const GoEvent).cast::<u8>(), core::mem::size_of::<GoEvent>()) };
    let _ = submit(bytes);
    0
}

/// `runtime.newproc1(fn, callergp, callerpc) *g`: keeps the creating goroutine (RBX) for the
/// return hook. It runs on the thread's system stack, so the return hook is safe (Go moves
/// goroutine stacks, never the system stack).
#[uprobe]
pub fn go_newproc1(ctx: ProbeContext) -> u32 {
    // SAFETY: the probe's own register snapshot.
    let caller = unsafe { (*ctx.regs).rbx };
    let _ = GO_SPAWNING.insert(bpf_get_current_pid_tgid(), caller, 0);
    0
}

/// `runtime.newproc1` returned the new goroutine (RAX).
#[uretprobe]
pub fn go_newproc1_ret(ctx: RetProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: copied out at once.
    let Some(caller) = (unsafe { GO_SPAWNING.get(pid_tgid).copied() }) else {
        return 0;
    };
    let _ = GO_SPAWNING.remove(pid_tgid);
    // SAFETY: the probe's own register snapshot.
    let child = unsafe { (*ctx.regs).rax };
    emit(go_op::SPAWN, caller, child)
}

/// `net/http.(*persistConn).roundTrip(pc, treq *transportRequest)`: goroutine R14 asks for the
/// request `treq` embeds as its first field (RBX points at it), which the connection's write
/// loop writes.
#[uprobe]
pub fn go_round_trip(ctx: ProbeContext) -> u32 {
    // SAFETY: the probe's own register snapshot; user memory through the helper.
    let (g, treq) = unsafe { ((*ctx.regs).r14, (*ctx.regs).rbx) };
    let Ok(req) = (unsafe { bpf_probe_read_user(treq as *const u64) }) else {
        return 0;
    };
    emit(go_op::ROUND_TRIP, g, req)
}

/// `net/http.(*Request).write(r, ...)`: goroutine R14 writes request `r` (RAX).
#[uprobe]
pub fn go_request_write(ctx: ProbeContext) -> u32 {
    // SAFETY: the probe's own register snapshot.
    let (g, req) = unsafe { ((*ctx.regs).r14, (*ctx.regs).rax) };
    emit(go_op::REQUEST_WRITE, g, req)
}
