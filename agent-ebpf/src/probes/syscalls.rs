//! `syscalls:sys_{enter,exit}_*` programs: stash arguments at entry, emit at exit.
//!
//! The fields read are in `agent_common::hooks` (checked against the kernel's tracepoint
//! formats at start).
use agent_common::{direction, hooks, kind, maps::counter, side, syscall, tcp_state};
use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid},
    macros::tracepoint,
    programs::TracePointContext,
};

use crate::{
    capture::{carries_requests, emit_connect, emit_data, sock_event, submit_sock},
    maps::{
        FD_INFO, FdInfo, PENDING, PendingCall, TRACED_TGIDS, buf_kind, capture_bytes, cgroup_unselected, count, fd_key,
        port_mode, ports_selected, select, self_tgid, traced,
    },
    probes::loops::bump_epoch,
};

const FD: usize = hooks::args::FD.offset;
const RET: usize = hooks::RET.offset;
// The generic stash reads every syscall's descriptor from the first slot.
const _: () = assert!(hooks::args::SENDFILE_OUT_FD.offset == FD);

const MSG_PEEK: u32 = 2;
const EINPROGRESS: i64 = 115;

/// A thread's stash once its syscall's exit took it. Each thread keeps its entry from one
/// syscall to the next (rewritten in place): an LRU insert and delete per syscall cost more
/// than the rest of an entry program.
const DONE: u8 = 255;
/// Pseudo syscall ids for stashes that don't produce data events.
const ACCEPT: u8 = 100;
const CONNECT: u8 = 101;
/// A stash made by a sock tracepoint for a syscall whose entry was never seen: it began
/// before the programs were attached (a server blocked in recv() on an idle keep-alive
/// connection when the agent starts). Its arguments are recovered at exit from the saved user
/// registers.
pub const LATE: u8 = 0;

/// A field of the syscall's record ([`crate::probes::ctx_field`]); it cannot fail, the `Result`
/// only suits the callers' `?` chains.
#[inline(always)]
fn arg<T: Copy>(ctx: &TracePointContext, off: usize) -> Result<T, i64> {
    Ok(crate::probes::ctx_field(ctx, off))
}

/// How a syscall passes what the programs need: its id, direction, what its buffer argument is,
/// and the argument slots of the buffer, the iovec count and the recv flags (0 = none).
#[derive(Clone, Copy)]
struct Spec {
    sys: u8,
    dir: u8,
    kind: u8,
    buf: usize,
    count: usize,
    flags: usize,
}

impl Spec {
    const fn new(sys: u8, dir: u8, kind: u8, buf: usize, count: usize, flags: usize) -> Self {
        Self {
            sys,
            dir,
            kind,
            buf,
            count,
            flags,
        }
    }

    /// A stash that carries no buffer (accept, connect, sendfile).
    const fn bare(sys: u8, dir: u8) -> Self {
        Self::new(sys, dir, buf_kind::NONE, 0, 0, 0)
    }
}

/// Stashes a syscall's arguments for its exit (unless it is the agent's own).
#[inline(always)]
fn stash(ctx: &TracePointContext, spec: &Spec) -> Result<u32, i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) as u32 == self_tgid() {
        return Ok(0);
    }
    let slot = |off: usize| if off != 0 { arg::<u64>(ctx, off) } else { Ok(0) };
    let call = PendingCall {
        buf: slot(spec.buf)?,
        count: slot(spec.count)?,
        fd: arg::<u64>(ctx, FD)? as i32,
        recv_flags: slot(spec.flags)? as u32,
        ..PendingCall::now(spec.sys, spec.dir, spec.kind)
    };
    put_pending(pid_tgid, call);
    Ok(0)
}

/// Writes the thread's stash over its previous one, or makes its entry.
#[inline(always)]
fn put_pending(pid_tgid: u64, call: PendingCall) -> bool {
    if let Some(p) = PENDING.get_ptr_mut(pid_tgid) {
        // SAFETY: this thread's own entry; no other thread writes it.
        unsafe { *p = call };
        return true;
    }
    if PENDING.insert(pid_tgid, call, 0).is_err() {
        count(counter::PENDING_FULL);
        return false;
    }
    true
}

/// Takes the stash of the current thread's syscall, if it is `sys` (or a late stash).
#[inline(always)]
fn take(sys: u8) -> Option<(u64, PendingCall)> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let entry = PENDING.get_ptr_mut(pid_tgid)?;
    // SAFETY: this thread's own entry, copied out, then marked taken; no other thread writes it.
    let p = unsafe { *entry };
    unsafe { (*entry).syscall = DONE };
    if p.syscall != sys && p.syscall != LATE {
        return None;
    }
    Some((pid_tgid, p))
}

/// The first four syscall arguments from the user registers saved at syscall entry.
#[cfg(bpf_target_arch = "x86_64")]
#[inline(always)]
fn user_args() -> Option<[u64; 4]> {
    use aya_ebpf::{
        bindings::pt_regs,
        helpers::{
            bpf_probe_read_kernel,
            generated::{bpf_get_current_task_btf, bpf_task_pt_regs},
        },
    };
    // SAFETY: helpers on the current task; the register block is read through
    // bpf_probe_read_kernel, which tolerates any pointer.
    unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const pt_regs;
        if regs.is_null() {
            return None;
        }
        // x86_64 syscall ABI: rdi, rsi, rdx, r10.
        Some([
            bpf_probe_read_kernel(core::ptr::addr_of!((*regs).rdi)).ok()?,
            bpf_probe_read_kernel(core::ptr::addr_of!((*regs).rsi)).ok()?,
            bpf_probe_read_kernel(core::ptr::addr_of!((*regs).rdx)).ok()?,
            bpf_probe_read_kernel(core::ptr::addr_of!((*regs).r10)).ok()?,
        ])
    }
}

/// Other architectures: syscalls begun before attach are not recovered.
#[cfg(not(bpf_target_arch = "x86_64"))]
#[inline(always)]
fn user_args() -> Option<[u64; 4]> {
    None
}

#[inline(always)]
fn exit_data(ctx: &TracePointContext, spec: &Spec) -> Result<u32, i64> {
    let Some((pid_tgid, mut p)) = take(spec.sys) else {
        return Ok(0);
    };
    if p.is_tcp == 0 {
        // Data from a pipe, eventfd or unix socket may wake work in an event loop that
        // userspace cannot attribute: it ends the loop thread's current epoch.
        if p.direction == direction::INGRESS && arg::<i64>(ctx, RET).is_ok_and(|r| r > 0) {
            bump_epoch(pid_tgid);
        }
        return Ok(0);
    }
    let traced = mark_traced(pid_tgid);
    if traced & traced::SKIP != 0 || cgroup_unselected() {
        count(counter::UNSELECTED);
        return Ok(0);
    }
    if p.syscall == LATE {
        if p.direction != spec.dir {
            return Ok(0);
        }
        let Some(args) = user_args() else {
            return Ok(0);
        };
        let at = |off: usize| if off == 0 { 0 } else { args[((off - FD) / 8) & 3] };
        p.syscall = spec.sys;
        p.buf_kind = spec.kind;
        p.fd = args[0] as i32;
        p.buf = at(spec.buf);
        p.count = at(spec.count);
        p.recv_flags = at(spec.flags) as u32;
    }
    let ret: i64 = arg(ctx, RET)?;
    // Errors (EAGAIN...) moved nothing; a zero-byte write means nothing; a zero-byte read is the
    // end of the peer's stream, which ends close-delimited responses. Peeked bytes are read again.
    if ret < 0 || (ret == 0 && p.direction == direction::EGRESS) || p.recv_flags & MSG_PEEK != 0 {
        return Ok(0);
    }
    let key = fd_key(pid_tgid, p.fd);
    // SAFETY: copied out at once. Taken apart into plain values: the verifier rejects the
    // code LLVM makes of matches on an `Option<FdInfo>` (it reads the absent value's fields).
    let (known, same_sock, known_side, known_sock, known_wide, known_select, known_named) =
        match unsafe { FD_INFO.get(key) } {
            Some(info) => (
                true,
                info.sock == p.sock,
                info.side,
                info.sock,
                info.wide,
                info.select,
                info.named,
            ),
            None => (false, false, side::UNKNOWN, 0, 0, select::UNKNOWN, 0),
        };
    // The thread's name goes with the first record of each socket on this fd (userspace keeps
    // it with the connection it opens there).
    let named = same_sock && known_named != 0;
    // Accepted fds learn their socket at their first data event.
    let fd_side = if known && (same_sock || known_sock == 0) {
        known_side
    } else {
        side::UNKNOWN
    };
    // Port selection, decided once per socket (two reads of it) and kept with the fd.
    let mode = port_mode();
    let mut selected = if same_sock { known_select } else { select::UNKNOWN };
    if mode != 0 && selected == select::UNKNOWN {
        selected = match crate::probes::sock::ports(p.sock) {
            Some((local, remote)) if !ports_selected(mode, local, remote) => select::NO,
            Some(_) => select::YES,
            None => select::UNKNOWN,
        };
    }
    if !known && selected != select::NO {
        // First sight of this fd: a connection that predates the agent (or an LRU eviction).
        let _ = crate::probes::sock::report_tuple(p.sock);
    }
    let wide = same_sock && known_wide != 0;
    if !same_sock || known_select != selected || (!named && selected != select::NO) {
        let _ = FD_INFO.insert(
            key,
            FdInfo {
                sock: p.sock,
                side: fd_side,
                wide: u8::from(wide),
                select: selected,
                named: u8::from(selected != select::NO),
                _pad: [0; 4],
            },
            0,
        );
    }
    if selected == select::NO {
        count(counter::UNSELECTED);
        return Ok(0);
    }
    let requests = carries_requests(p.direction, fd_side);
    emit_data(&p, pid_tgid, ret, fd_side, traced, requests || wide, !named)?;
    if requests && !wide && ret as u64 > u64::from(capture_bytes()) {
        // SAFETY: a single byte written in place; a concurrent update writes the same value.
        if let Some(info) = FD_INFO.get_ptr_mut(key) {
            unsafe { (*info).wide = 1 };
        }
    }
    Ok(0)
}

/// Remembers that the thread's process uses TCP sockets (its poll-family waits now count);
/// returns what is known of the process (`maps::traced` flags).
#[inline(always)]
fn mark_traced(pid_tgid: u64) -> u8 {
    let tgid = (pid_tgid >> 32) as u32;
    // SAFETY: copied out at once.
    match unsafe { TRACED_TGIDS.get(tgid).copied() } {
        Some(flags) => flags,
        None => {
            let _ = TRACED_TGIDS.insert(tgid, traced::TCP, 0);
            traced::TCP
        }
    }
}

macro_rules! data_syscall {
    ($enter:ident, $exit:ident, $name_enter:literal, $name_exit:literal, $spec:expr) => {
        #[tracepoint(category = "syscalls", name = $name_enter)]
        pub fn $enter(ctx: TracePointContext) -> u32 {
            stash(&ctx, &$spec).unwrap_or(0)
        }
        #[tracepoint(category = "syscalls", name = $name_exit)]
        pub fn $exit(ctx: TracePointContext) -> u32 {
            exit_data(&ctx, &$spec).unwrap_or(0)
        }
    };
}

use buf_kind::{IOVEC, MSGHDR, PLAIN};
use direction::{EGRESS, INGRESS};
#[rustfmt::skip]
mod table {
    //! Argument slots: `agent_common::hooks::args`.
    use super::*;
    use hooks::args::*;
    pub const READ: Spec = Spec::new(syscall::READ, INGRESS, PLAIN, READ_BUF.offset, 0, 0);
    pub const READV: Spec = Spec::new(syscall::READV, INGRESS, IOVEC, READV_VEC.offset, READV_VLEN.offset, 0);
    pub const RECVFROM: Spec = Spec::new(syscall::RECVFROM, INGRESS, PLAIN, RECVFROM_BUF.offset, 0, RECVFROM_FLAGS.offset);
    pub const RECVMSG: Spec = Spec::new(syscall::RECVMSG, INGRESS, MSGHDR, RECVMSG_MSG.offset, 0, RECVMSG_FLAGS.offset);
    pub const WRITE: Spec = Spec::new(syscall::WRITE, EGRESS, PLAIN, WRITE_BUF.offset, 0, 0);
    pub const WRITEV: Spec = Spec::new(syscall::WRITEV, EGRESS, IOVEC, WRITEV_VEC.offset, WRITEV_VLEN.offset, 0);
    pub const SENDTO: Spec = Spec::new(syscall::SENDTO, EGRESS, PLAIN, SENDTO_BUF.offset, 0, 0);
    pub const SENDMSG: Spec = Spec::new(syscall::SENDMSG, EGRESS, MSGHDR, SENDMSG_MSG.offset, 0, 0);
    pub const SENDFILE: Spec = Spec::bare(syscall::SENDFILE, EGRESS);
    pub const ACCEPT_ANY: Spec = Spec::bare(ACCEPT, 0);
    pub const CONNECT_ANY: Spec = Spec::bare(CONNECT, 0);
}

data_syscall!(
    sys_enter_read,
    sys_exit_read,
    "sys_enter_read",
    "sys_exit_read",
    table::READ
);
data_syscall!(
    sys_enter_readv,
    sys_exit_readv,
    "sys_enter_readv",
    "sys_exit_readv",
    table::READV
);
data_syscall!(
    sys_enter_recvfrom,
    sys_exit_recvfrom,
    "sys_enter_recvfrom",
    "sys_exit_recvfrom",
    table::RECVFROM
);
data_syscall!(
    sys_enter_recvmsg,
    sys_exit_recvmsg,
    "sys_enter_recvmsg",
    "sys_exit_recvmsg",
    table::RECVMSG
);
data_syscall!(
    sys_enter_write,
    sys_exit_write,
    "sys_enter_write",
    "sys_exit_write",
    table::WRITE
);
data_syscall!(
    sys_enter_writev,
    sys_exit_writev,
    "sys_enter_writev",
    "sys_exit_writev",
    table::WRITEV
);
data_syscall!(
    sys_enter_sendto,
    sys_exit_sendto,
    "sys_enter_sendto",
    "sys_exit_sendto",
    table::SENDTO
);
data_syscall!(
    sys_enter_sendmsg,
    sys_exit_sendmsg,
    "sys_enter_sendmsg",
    "sys_exit_sendmsg",
    table::SENDMSG
);
data_syscall!(
    sys_enter_sendfile64,
    sys_exit_sendfile64,
    "sys_enter_sendfile64",
    "sys_exit_sendfile64",
    table::SENDFILE
);

// accept/accept4: remember that the returned fd is the server end of a connection.
#[tracepoint(category = "syscalls", name = "sys_enter_accept")]
pub fn sys_enter_accept(ctx: TracePointContext) -> u32 {
    stash(&ctx, &table::ACCEPT_ANY).unwrap_or(0)
}
#[tracepoint(category = "syscalls", name = "sys_exit_accept")]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    exit_accept(&ctx).unwrap_or(0)
}
#[tracepoint(category = "syscalls", name = "sys_enter_accept4")]
pub fn sys_enter_accept4(ctx: TracePointContext) -> u32 {
    stash(&ctx, &table::ACCEPT_ANY).unwrap_or(0)
}
#[tracepoint(category = "syscalls", name = "sys_exit_accept4")]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    exit_accept(&ctx).unwrap_or(0)
}

#[inline(always)]
fn exit_accept(ctx: &TracePointContext) -> Result<u32, i64> {
    let Some((pid_tgid, _)) = take(ACCEPT) else {
        return Ok(0);
    };
    let ret: i64 = arg(ctx, RET)?;
    if ret >= 0 {
        // The socket is learnt at the first data event; unix sockets never get one and age out.
        let info = FdInfo {
            sock: 0,
            side: side::ACCEPTED,
            wide: 0,
            select: select::UNKNOWN,
            named: 0,
            _pad: [0; 4],
        };
        let _ = FD_INFO.insert(fd_key(pid_tgid, ret as i32), info, 0);
    }
    Ok(0)
}

// connect: `inet_sock_set_state` (→ SYN_SENT) marks the stash as TCP and gives the socket.
#[tracepoint(category = "syscalls", name = "sys_enter_connect")]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    stash(&ctx, &table::CONNECT_ANY).unwrap_or(0)
}
#[tracepoint(category = "syscalls", name = "sys_exit_connect")]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    exit_connect(&ctx).unwrap_or(0)
}

#[inline(always)]
fn exit_connect(ctx: &TracePointContext) -> Result<u32, i64> {
    let Some((pid_tgid, p)) = take(CONNECT) else {
        return Ok(0);
    };
    let ret: i64 = arg(ctx, RET)?;
    if p.is_tcp != 0 && (ret == 0 || ret == -EINPROGRESS) {
        let info = FdInfo {
            sock: p.sock,
            side: side::CONNECTED,
            wide: 0,
            select: select::UNKNOWN,
            named: 0,
            _pad: [0; 4],
        };
        let _ = FD_INFO.insert(fd_key(pid_tgid, p.fd), info, 0);
        let traced = mark_traced(pid_tgid);
        emit_connect(&p, pid_tgid, traced)?;
    }
    Ok(0)
}

/// close: forget the fd; tell userspace when it was a traced TCP socket.
#[tracepoint(category = "syscalls", name = "sys_enter_close")]
pub fn sys_enter_close(ctx: TracePointContext) -> u32 {
    enter_close(&ctx).unwrap_or(0)
}

#[inline(always)]
fn enter_close(ctx: &TracePointContext) -> Result<u32, i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let fd: u64 = arg(ctx, FD)?;
    let key = fd_key(pid_tgid, fd as i32);
    // SAFETY: copied out at once.
    let Some(info) = (unsafe { FD_INFO.get(key).copied() }) else {
        return Ok(0);
    };
    let _ = FD_INFO.remove(key);
    if info.sock == 0 || info.select == select::NO || (pid_tgid >> 32) as u32 == self_tgid() {
        return Ok(0);
    }
    let mut ev = sock_event(kind::CLOSE, info.sock, pid_tgid as u32, (pid_tgid >> 32) as u32);
    ev.header.syscall = syscall::CLOSE;
    ev.header.side = info.side;
    ev.header.fd = fd as i32;
    ev.header.comm = bpf_get_current_comm().unwrap_or([0; 16]);
    ev.new_state = tcp_state::CLOSE;
    submit_sock(&ev)?;
    Ok(0)
}

/// Marks the current thread's pending syscall as running on a TCP socket (called by the sock
/// tracepoints). With no pending syscall (it began before attach), a late stash is made for a
/// send/receive (`late_dir` ≠ 0), completed at its exit.
#[inline(always)]
pub fn mark_pending(pid_tgid: u64, sock: u64, connect_only: bool, late_dir: u8) {
    let pending = PENDING.get_ptr_mut(pid_tgid);
    // SAFETY: this thread's own entry; no other thread writes it.
    if let Some(p) = pending
        && unsafe { (*p).syscall } != DONE
    {
        unsafe {
            if connect_only && (*p).syscall != CONNECT {
                return;
            }
            (*p).sock = sock;
            (*p).is_tcp = 1;
        }
    } else if late_dir != 0 && (pid_tgid >> 32) as u32 != self_tgid() {
        let late = PendingCall {
            sock,
            is_tcp: 1,
            ..PendingCall::now(LATE, late_dir, buf_kind::NONE)
        };
        if put_pending(pid_tgid, late) {
            count(counter::LATE_STASH);
        }
    }
}
