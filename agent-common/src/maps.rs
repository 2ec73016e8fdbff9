//! Map names and sizes, imported by both sides so they never drift apart.
//! Names stay unique in their first 15 characters (the kernel keeps only 15).

/// The one ring buffer every event goes through.
pub const EVENTS_MAP: &str = "EVENTS";
/// Per-CPU drop and health counters, indexed by [`counter`] slots.
pub const COUNTERS_MAP: &str = "COUNTERS";

/// Ring-buffer size compiled into the programs; the loader sets the size chosen at start
/// (`--ring-bytes`).
pub const DEFAULT_RING_BYTES: u32 = 16 * 1024 * 1024;
/// In-flight syscalls tracked at once (entry → exit), across all threads (LRU).
pub const PENDING_MAX_ENTRIES: u32 = 32 * 1024;
/// Sockets remembered per (tgid, fd) (LRU: entries of processes that exited age out).
pub const FD_INFO_MAX_ENTRIES: u32 = 64 * 1024;

/// Threads whose loop epoch is kept (LRU: threads that exited age out).
pub const LOOP_EPOCH_MAX_ENTRIES: u32 = 64 * 1024;
/// Processes seen using TCP sockets: only their threads' waits bump a loop epoch (LRU).
pub const TRACED_TGIDS_MAX_ENTRIES: u32 = 16 * 1024;

/// Port selection: one byte per TCP port (see [`port_select`]).
pub const PORT_SELECT_MAP: &str = "PORT_SELECT";
/// The agent's view of processes (tgid → `traced` flags), where it marks those not selected.
pub const TRACED_TGIDS_MAP: &str = "TRACED_TGIDS";

/// `PORT_SELECT` entries and the `PORT_MODE` global.
pub mod port_select {
    /// Entry: the port is in a `--trace-port` list.
    pub const TRACE: u8 = 1;
    /// Entry: the port is in an `--ignore-port` list.
    pub const IGNORE: u8 = 2;
    /// Mode bit: only connections with a `TRACE` port at either end are reported.
    pub const MODE_ONLY_LISTED: u32 = 1;
    /// Mode bit: connections with an `IGNORE` port at either end are not reported.
    pub const MODE_IGNORE: u32 = 2;
}

/// Cgroups (by id) userspace decided on with the `--trace-cgroup`/`--ignore-cgroup` rules.
pub const CGROUP_SELECT_MAP: &str = "CGROUP_SELECT";
/// Cgroups decided at once (beyond it, a cgroup's processes are decided in userspace only).
pub const CGROUP_SELECT_MAX_ENTRIES: u32 = 16 * 1024;
/// A `CGROUP_SELECT` value: its processes' sends and receives are not reported.
pub const CGROUP_NOT_SELECTED: u8 = 2;

/// `TRACED_TGIDS` flags.
pub mod traced {
    /// The process moved bytes on a TCP socket.
    pub const TCP: u8 = 1;
    /// Its Go hooks fired: its data events carry the goroutine (one lookup serves both).
    pub const GO: u8 = 2;
    /// Userspace found it not selected (`--trace-exe`, `--ignore-pid`, ...): its sends and
    /// receives are not reported.
    pub const SKIP: u8 = 4;
}

/// Threads inside `runtime.newproc1` (between its entry and return hooks), LRU.
pub const GO_SPAWNING_MAX_ENTRIES: u32 = 16 * 1024;

/// Slots of the per-CPU `COUNTERS` array. Userspace sums them over CPUs.
pub mod counter {
    /// `bpf_ringbuf_output` failed: the ring buffer was full, the event is lost.
    pub const RINGBUF_FULL: u32 = 0;
    /// An entry/exit stash could not be stored (PENDING map full).
    pub const PENDING_FULL: u32 = 1;
    /// Reading the user buffer failed (paged out, bad pointer): the event carries no payload.
    pub const PAYLOAD_READ_FAILED: u32 = 2;
    /// Events written to the ring buffer.
    pub const EVENTS_SUBMITTED: u32 = 3;
    /// A send or receive seen at the socket layer with no entry stash (it began before the
    /// programs were attached, or its stash was evicted from the full `PENDING` LRU): stashed
    /// late, completed from the saved registers at exit.
    pub const LATE_STASH: u32 = 4;
    /// Sends and receives not reported because their process or their connection's ports are
    /// not selected (`--trace-*`/`--ignore-*`): nothing was copied.
    pub const UNSELECTED: u32 = 5;
    /// Number of slots.
    pub const COUNT: u32 = 6;
}
