//! Maps and load-time globals.
use agent_common::{
    DataEvent, MAX_CAPTURE,
    maps::{
        CGROUP_NOT_SELECTED, CGROUP_SELECT_MAX_ENTRIES, DEFAULT_RING_BYTES, FD_INFO_MAX_ENTRIES,
        GO_SPAWNING_MAX_ENTRIES, LOOP_EPOCH_MAX_ENTRIES, PENDING_MAX_ENTRIES, TRACED_TGIDS_MAX_ENTRIES, counter,
    },
};
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};

/// Every event, in the order the kernel produced it. Size is set by userspace at load time.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

/// Per-CPU counters (see `agent_common::maps::counter`).
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Syscall arguments stashed at entry, keyed by pid_tgid, taken at exit. A thread's entry stays
/// from one syscall to the next and is rewritten in place (an LRU insert and delete per syscall
/// cost twice the rest of an entry program). LRU: threads that are gone, or more threads than
/// it holds, cannot fill it and stop capture; an evicted stash of a send or receive is rebuilt
/// at the socket layer (a late stash, counted) from the registers saved at syscall entry.
#[map]
pub static PENDING: LruHashMap<u64, PendingCall> = LruHashMap::with_max_entries(PENDING_MAX_ENTRIES, 0);

/// What the kernel knows of a process's socket fd, keyed by `tgid << 32 | fd`.
#[map]
pub static FD_INFO: LruHashMap<u64, FdInfo> = LruHashMap::with_max_entries(FD_INFO_MAX_ENTRIES, 0);

/// Each loop thread's epoch and wait deadline (pid_tgid), see `agent_common::DataEvent::epoch`.
#[map]
pub static LOOP_STATE: LruHashMap<u64, LoopState> = LruHashMap::with_max_entries(LOOP_EPOCH_MAX_ENTRIES, 0);

#[repr(C)]
#[derive(Clone, Copy)]
pub struct LoopState {
    pub epoch: u64,
    /// Deadline of the wait that began the current epoch.
    pub deadline_ns: u64,
    /// Deadline of the wait in progress (set at its entry, moved to `deadline_ns` at its exit).
    pub waiting_deadline_ns: u64,
}

/// Processes (tgid) that moved bytes on a TCP socket: the waits of other processes cost one
/// lookup and are not counted. The value holds `traced` flags; userspace adds `SKIP` to the
/// processes it does not select.
#[map]
pub static TRACED_TGIDS: LruHashMap<u32, u8> = LruHashMap::with_max_entries(TRACED_TGIDS_MAX_ENTRIES, 0);

pub use agent_common::maps::traced;

/// Cgroup ids userspace found not selected (`CGROUP_NOT_SELECTED`); read only when
/// `CGROUP_RULES` is set. A cgroup not in it is left to userspace.
#[map]
pub static CGROUP_SELECT: HashMap<u64, u8> = HashMap::with_max_entries(CGROUP_SELECT_MAX_ENTRIES, 0);

/// Port selection, one `port_select` byte per port (filled by userspace; read only when
/// `PORT_MODE` is set).
#[map]
pub static PORT_SELECT: Array<u8> = Array::with_max_entries(65_536, 0);

/// The goroutine that called `runtime.newproc1`, by thread (pid_tgid), until it returns.
#[map]
pub static GO_SPAWNING: LruHashMap<u64, u64> = LruHashMap::with_max_entries(GO_SPAWNING_MAX_ENTRIES, 0);

/// The agent's own client sockets (its OTLP connections): their ESTABLISHED events are flagged
/// so userspace can ignore the peer side (a collector on this node), which would otherwise
/// turn every export into a span, and that span into the next export.
#[map]
pub static OWN_SOCKS: HashMap<u64, u8> = HashMap::with_max_entries(1024, 0);

/// Scratch space to build a data event: bigger than the stack allows. Twice the capture bound
/// so the verifier can prove `offset < MAX_CAPTURE` plus `len <= MAX_CAPTURE` stays inside.
#[map]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
pub struct Scratch {
    pub event: DataEvent,
    pub overflow: [u8; MAX_CAPTURE],
    /// Bytes this CPU submitted since it last woke the reader (see `capture::submit`).
    pub unannounced: u64,
}

/// How a stashed syscall passes its buffer.
pub mod buf_kind {
    /// `buf` is the data pointer.
    pub const PLAIN: u8 = 0;
    /// `buf` points to an iovec array of `count` entries.
    pub const IOVEC: u8 = 1;
    /// `buf` points to a `struct user_msghdr`.
    pub const MSGHDR: u8 = 2;
    /// no user buffer (sendfile, accept, connect).
    pub const NONE: u8 = 3;
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct PendingCall {
    pub ts_enter_ns: u64,
    pub buf: u64,
    /// iovec count for readv/writev.
    pub count: u64,
    /// Socket identity, set by the sock tracepoints while the syscall runs.
    pub sock: u64,
    pub fd: i32,
    pub recv_flags: u32,
    pub syscall: u8,
    pub direction: u8,
    pub buf_kind: u8,
    /// 1 once a sock tracepoint saw a TCP (IPv4/IPv6) socket in this syscall.
    pub is_tcp: u8,
    pub _pad: [u8; 4],
}

impl PendingCall {
    /// A stash of syscall `syscall` made now; the caller fills in what it knows.
    #[inline(always)]
    pub fn now(syscall: u8, direction: u8, buf_kind: u8) -> Self {
        Self {
            // SAFETY: helper without preconditions.
            ts_enter_ns: unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() },
            buf: 0,
            count: 0,
            sock: 0,
            fd: -1,
            recv_flags: 0,
            syscall,
            direction,
            buf_kind,
            is_tcp: 0,
            _pad: [0; 4],
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct FdInfo {
    pub sock: u64,
    pub side: u8,
    /// A request-carrying call on this fd moved more than one capture window (pipelining, or
    /// large headers): its responses are captured in segments too, as they may share a call.
    pub wide: u8,
    /// Whether `sock`'s ports are selected: [`select::UNKNOWN`], `YES` or `NO`.
    pub select: u8,
    /// 1 once a record of this fd's socket carried the thread's name (`comm`): later records
    /// leave it empty, as reading it cost ~70 ns a record.
    pub named: u8,
    pub _pad: [u8; 4],
}

/// [`FdInfo::select`] values.
pub mod select {
    pub const UNKNOWN: u8 = 0;
    pub const YES: u8 = 1;
    pub const NO: u8 = 2;
}

/// Globals set by userspace at load time (`EbpfLoader::override_global`).
#[unsafe(no_mangle)]
static SELF_TGID: u32 = 0;
#[unsafe(no_mangle)]
static CAPTURE_BYTES: u32 = agent_common::config::DEFAULT_CAPTURE_BYTES;
#[unsafe(no_mangle)]
static WAKEUP_BYTES: u32 = agent_common::config::DEFAULT_WAKEUP_BYTES;
#[unsafe(no_mangle)]
static PORT_MODE: u32 = 0;
#[unsafe(no_mangle)]
static CGROUP_RULES: u32 = 0;

#[unsafe(no_mangle)]
static SOCK_OFFSETS: agent_common::config::SockOffsets = agent_common::config::SockOffsets {
    valid: 0,
    daddr: 0,
    rcv_saddr: 0,
    dport: 0,
    num: 0,
    family: 0,
    v6_daddr: 0,
    v6_rcv_saddr: 0,
};

#[inline(always)]
pub fn sock_offsets() -> agent_common::config::SockOffsets {
    // SAFETY: a plain read of a load-time constant.
    unsafe { core::ptr::read_volatile(&SOCK_OFFSETS) }
}

#[inline(always)]
pub fn self_tgid() -> u32 {
    // SAFETY: a plain read of a load-time constant; volatile so the compiler can't fold it.
    unsafe { core::ptr::read_volatile(&SELF_TGID) }
}

#[inline(always)]
pub fn capture_bytes() -> u32 {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(&CAPTURE_BYTES) }
}

#[inline(always)]
pub fn wakeup_bytes() -> u64 {
    // SAFETY: as above.
    u64::from(unsafe { core::ptr::read_volatile(&WAKEUP_BYTES) })
}

#[inline(always)]
pub fn port_mode() -> u32 {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(&PORT_MODE) }
}

/// Whether the current task's cgroup is one userspace found not selected.
#[inline(always)]
pub fn cgroup_unselected() -> bool {
    // SAFETY: as above.
    if unsafe { core::ptr::read_volatile(&CGROUP_RULES) } == 0 {
        return false;
    }
    // SAFETY: a helper without preconditions; the map value is copied at once.
    let id = unsafe { aya_ebpf::helpers::generated::bpf_get_current_cgroup_id() };
    let decided = unsafe { CGROUP_SELECT.get(id).copied() };
    decided == Some(CGROUP_NOT_SELECTED)
}

/// Whether a connection between `local` and `remote` ports is selected.
#[inline(always)]
pub fn ports_selected(mode: u32, local: u16, remote: u16) -> bool {
    use agent_common::maps::port_select::{IGNORE, MODE_IGNORE, MODE_ONLY_LISTED, TRACE};
    let l = PORT_SELECT.get(u32::from(local)).copied().unwrap_or(0);
    let r = PORT_SELECT.get(u32::from(remote)).copied().unwrap_or(0);
    if mode & MODE_IGNORE != 0 && (l | r) & IGNORE != 0 {
        return false;
    }
    mode & MODE_ONLY_LISTED == 0 || (l | r) & TRACE != 0
}

#[inline(always)]
pub fn count(slot: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub fn fd_key(pid_tgid: u64, fd: i32) -> u64 {
    (pid_tgid & 0xffff_ffff_0000_0000) | u64::from(fd as u32)
}
