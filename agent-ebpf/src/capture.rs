//! Builds one data event in the per-CPU scratch slot and sends it through the ring buffer,
//! truncated to the bytes actually captured.
use core::ffi::c_void;

use agent_common::{
    DataEvent, EventHeader, MAX_CAPTURE, MAX_IOVECS, REQUEST_CAPTURE_MAX, SockEvent, kind, maps::counter,
};
use aya_ebpf::{
    bindings::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_current_comm, bpf_ktime_get_ns, bpf_probe_read_user, generated},
};

use crate::maps::{EVENTS, PendingCall, SCRATCH, buf_kind, capture_bytes, count, traced, wakeup_bytes};

/// Offsets in `struct user_msghdr` (include/linux/socket.h, stable UAPI layout on 64-bit).
const MSGHDR_IOV: usize = 16;
const MSGHDR_IOVLEN: usize = 24;

#[repr(C)]
#[derive(Clone, Copy)]
struct IoVec {
    base: u64,
    len: u64,
}

/// Fills the per-CPU scratch slot's record header for the current thread's syscall `p`: a data
/// event (`kind::DATA`, moving `ret` bytes) or a connect (`kind::CONNECT`), with the thread's
/// name if `with_comm` (else zeros: userspace keeps the name of a socket's first record).
#[inline(always)]
fn scratch_event(
    p: &PendingCall,
    pid_tgid: u64,
    kind: u8,
    side: u8,
    ret: i64,
    traced: u8,
    with_comm: bool,
) -> Result<&'static mut DataEvent, i64> {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return Err(-1);
    };
    // SAFETY: the per-CPU scratch slot is ours for the duration of this program run.
    let ev = unsafe { &mut (*scratch).event };
    let data = kind == kind::DATA;
    ev.header = EventHeader {
        kind,
        direction: if data { p.direction } else { 0 },
        syscall: if data { p.syscall } else { 0 },
        side,
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        fd: p.fd,
        sock: p.sock,
        ts_enter_ns: p.ts_enter_ns,
        // SAFETY: helper without preconditions.
        ts_exit_ns: unsafe { bpf_ktime_get_ns() },
        bytes: ret,
        comm: if with_comm {
            bpf_get_current_comm().unwrap_or([0; 16])
        } else {
            [0; 16]
        },
    };
    ev.flags = if data { p.recv_flags } else { 0 };
    ev.captured_len = 0;
    (ev.epoch, ev.wait_deadline_ns) = crate::probes::loops::loop_state(pid_tgid);
    ev.goroutine = if traced & traced::GO != 0 {
        crate::probes::golang::current_goroutine()
    } else {
        0
    };
    Ok(ev)
}

/// Emits the data event(s) of a finished syscall that moved `ret` bytes on a TCP socket: one
/// record of up to the capture setting's bytes, or, when `segmented` (a call that carries
/// requests, or a response on a connection that pipelines), [`emit_segments`].
/// `traced`: the process's `maps::traced` flags; `with_comm`: send the thread's name.
#[inline(always)]
pub fn emit_data(
    p: &PendingCall,
    pid_tgid: u64,
    ret: i64,
    side: u8,
    traced: u8,
    segmented: bool,
    with_comm: bool,
) -> Result<(), i64> {
    let ev = scratch_event(p, pid_tgid, kind::DATA, side, ret, traced, with_comm)?;
    if segmented {
        return emit_segments(ev, p, ret as u64);
    }
    let mut want = u64::from(capture_bytes());
    if want > ret as u64 {
        want = ret as u64;
    }
    if want > MAX_CAPTURE as u64 {
        want = MAX_CAPTURE as u64;
    }
    let captured = match p.buf_kind {
        buf_kind::PLAIN => copy_user(ev.payload.as_mut_ptr(), p.buf, want),
        buf_kind::IOVEC => copy_iovecs(ev.payload.as_mut_ptr(), p.buf, p.count, want),
        buf_kind::MSGHDR => {
            let (iov, n) = msghdr_iovecs(p.buf);
            copy_iovecs(ev.payload.as_mut_ptr(), iov, n, want)
        }
        _ => 0,
    };
    send_record(ev, captured)
}

/// Emits a call's bytes as consecutive records of up to [`MAX_CAPTURE`] bytes, each fully
/// captured, up to [`REQUEST_CAPTURE_MAX`] bytes in all; the last record also reports the bytes
/// past that (a gap to userspace). Each record reports its own stretch of the call. Calls with
/// iovecs get one record of up to [`MAX_CAPTURE`] bytes: walking iovecs inside this loop
/// costs the verifier more than a program may take.
#[inline(always)]
fn emit_segments(ev: &mut DataEvent, p: &PendingCall, total: u64) -> Result<(), i64> {
    if p.buf_kind != buf_kind::PLAIN {
        let want = total.min(MAX_CAPTURE as u64);
        let captured = match p.buf_kind {
            buf_kind::IOVEC => copy_iovecs(ev.payload.as_mut_ptr(), p.buf, p.count, want),
            buf_kind::MSGHDR => {
                let (iov, n) = msghdr_iovecs(p.buf);
                copy_iovecs(ev.payload.as_mut_ptr(), iov, n, want)
            }
            _ => 0,
        };
        return send_record(ev, captured);
    }
    let mut done: u64 = 0;
    for _ in 0..REQUEST_CAPTURE_MAX / MAX_CAPTURE {
        let rest = total - done;
        let last = rest <= MAX_CAPTURE as u64 || done + MAX_CAPTURE as u64 >= REQUEST_CAPTURE_MAX as u64;
        let captured = copy_user(ev.payload.as_mut_ptr(), p.buf + done, rest.min(MAX_CAPTURE as u64));
        ev.header.bytes = if last { rest } else { MAX_CAPTURE as u64 } as i64;
        send_record(ev, captured)?;
        if last {
            break;
        }
        done += MAX_CAPTURE as u64;
    }
    Ok(())
}

/// Sends the scratch event with its first `captured` payload bytes.
#[inline(always)]
fn send_record(ev: &mut DataEvent, captured: u64) -> Result<(), i64> {
    ev.captured_len = captured as u32;
    let mut len = DataEvent::HEADER_LEN as u64 + captured;
    if len > core::mem::size_of::<DataEvent>() as u64 {
        len = core::mem::size_of::<DataEvent>() as u64;
    }
    // SAFETY: `len` ≤ size_of::<DataEvent>() and the scratch slot is at least that large.
    let bytes = unsafe { core::slice::from_raw_parts((ev as *const DataEvent).cast::<u8>(), len as usize) };
    submit(bytes)
}

/// The iovec array and count of a `struct user_msghdr` at `msg`.
#[inline(always)]
fn msghdr_iovecs(msg: u64) -> (u64, u64) {
    // SAFETY: reads user memory through the helper, which tolerates bad pointers.
    let iov: u64 = unsafe { bpf_probe_read_user((msg as usize + MSGHDR_IOV) as *const u64) }.unwrap_or(0);
    let n: u64 = unsafe { bpf_probe_read_user((msg as usize + MSGHDR_IOVLEN) as *const u64) }.unwrap_or(0);
    (iov, n)
}

/// A server's reads and a client's writes carry requests (sides the kernel saw established).
#[inline(always)]
pub fn carries_requests(dir: u8, side: u8) -> bool {
    (side == agent_common::side::ACCEPTED && dir == agent_common::direction::INGRESS)
        || (side == agent_common::side::CONNECTED && dir == agent_common::direction::EGRESS)
}

/// Emits the payload-less record of a connect() on a TCP socket (see `kind::CONNECT`).
#[inline(always)]
pub fn emit_connect(p: &PendingCall, pid_tgid: u64, traced: u8) -> Result<(), i64> {
    let ev = scratch_event(
        p,
        pid_tgid,
        kind::CONNECT,
        agent_common::side::CONNECTED,
        0,
        traced,
        true,
    )?;
    // SAFETY: HEADER_LEN ≤ size_of::<DataEvent>().
    let bytes = unsafe { core::slice::from_raw_parts((ev as *const DataEvent).cast::<u8>(), DataEvent::HEADER_LEN) };
    submit(bytes)
}

/// Sends a record, waking the reader only once this CPU has sent enough bytes since it last
/// did (batched wake-ups: a wake-up per event costs more than the event at high rates).
/// Userspace also polls on a timer. Counted per CPU rather than by asking the ring how much
/// waits: that reads positions the other CPUs and the reader keep writing, and cost ~120 ns
/// a record in cache misses.
#[inline(always)]
pub fn submit(bytes: &[u8]) -> Result<(), i64> {
    let mut flags = u64::from(BPF_RB_NO_WAKEUP);
    if let Some(scratch) = SCRATCH.get_ptr_mut(0) {
        // SAFETY: the per-CPU scratch slot is ours for the duration of this program run.
        let unannounced = unsafe { &mut (*scratch).unannounced };
        *unannounced += bytes.len() as u64;
        if *unannounced >= wakeup_bytes() {
            *unannounced = 0;
            flags = u64::from(BPF_RB_FORCE_WAKEUP);
        }
    }
    match EVENTS.output::<[u8]>(bytes, flags) {
        Ok(()) => {
            count(counter::EVENTS_SUBMITTED);
            Ok(())
        }
        Err(e) => {
            count(counter::RINGBUF_FULL);
            Err(i64::from(e))
        }
    }
}

/// A socket-level record stamped now, with no tuple yet.
#[inline(always)]
pub fn sock_event(kind: u8, sock: u64, tid: u32, pid: u32) -> SockEvent {
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    SockEvent {
        header: EventHeader {
            kind,
            direction: 0,
            syscall: 0,
            side: 0,
            pid,
            tid,
            fd: -1,
            sock,
            ts_enter_ns: now,
            ts_exit_ns: now,
            bytes: 0,
            comm: [0; 16],
        },
        family: 0,
        local_port: 0,
        remote_port: 0,
        old_state: 0,
        new_state: 0,
        local_addr: [0; 16],
        remote_addr: [0; 16],
    }
}

/// Sends a socket-level record.
#[inline(always)]
pub fn submit_sock(ev: &SockEvent) -> Result<(), i64> {
    // SAFETY: a plain #[repr(C)] value without padding, viewed as its bytes.
    let bytes = unsafe {
        core::slice::from_raw_parts((ev as *const SockEvent).cast::<u8>(), core::mem::size_of::<SockEvent>())
    };
    submit(bytes)
}

/// Copies `want` (≤ MAX_CAPTURE) bytes from user address `src`; returns the bytes copied.
#[inline(always)]
fn copy_user(dst: *mut u8, src: u64, want: u64) -> u64 {
    let mut n = want;
    if n > MAX_CAPTURE as u64 {
        n = MAX_CAPTURE as u64;
    }
    if n == 0 {
        return 0;
    }
    // SAFETY: `dst` has room for MAX_CAPTURE bytes; the helper checks the user pointer.
    let r = unsafe { generated::bpf_probe_read_user(dst.cast::<c_void>(), n as u32, src as *const c_void) };
    if r == 0 {
        n
    } else {
        count(counter::PAYLOAD_READ_FAILED);
        0
    }
}

/// Copies up to `want` bytes spread over the first `MAX_IOVECS` iovecs, in stream order.
#[inline(always)]
fn copy_iovecs(dst: *mut u8, iov: u64, iovcnt: u64, want: u64) -> u64 {
    let mut off: u64 = 0;
    for i in 0..MAX_IOVECS {
        if i as u64 >= iovcnt || off >= want {
            break;
        }
        let at = iov + (i * core::mem::size_of::<IoVec>()) as u64;
        // SAFETY: user memory read through the helper.
        let Ok(v) = (unsafe { bpf_probe_read_user(at as *const IoVec) }) else {
            break;
        };
        let mut n = want - off;
        if n > v.len {
            n = v.len;
        }
        // Bounds the verifier can follow: off < MAX_CAPTURE, n ≤ MAX_CAPTURE; the scratch slot
        // has MAX_CAPTURE spare bytes after the payload.
        let o = off & (MAX_CAPTURE as u64 - 1);
        if n > MAX_CAPTURE as u64 {
            n = MAX_CAPTURE as u64;
        }
        if n == 0 {
            continue;
        }
        // SAFETY: dst + o + n ≤ dst + 2 * MAX_CAPTURE, inside the scratch slot.
        let r = unsafe {
            generated::bpf_probe_read_user(dst.add(o as usize).cast::<c_void>(), n as u32, v.base as *const c_void)
        };
        if r != 0 {
            count(counter::PAYLOAD_READ_FAILED);
            break;
        }
        off += n;
    }
    if off > want { want } else { off }
}
