//! Load-time configuration of the kernel programs, set with `EbpfLoader::override_global`.

/// Global: tgid of the agent itself; its own syscalls are never traced.
pub const GLOBAL_SELF_TGID: &str = "SELF_TGID";
/// Global: payload bytes copied per data event (clamped to [`crate::MAX_CAPTURE`]).
pub const GLOBAL_CAPTURE_BYTES: &str = "CAPTURE_BYTES";
/// Global: a CPU wakes userspace only once it has submitted this many bytes since it last did
/// (userspace also polls on a short timer, so a quiet ring is never left unread).
pub const GLOBAL_WAKEUP_BYTES: &str = "WAKEUP_BYTES";

/// Global: which port lists `PORT_SELECT` holds (`maps::port_select::MODE_*` bits; 0: none,
/// no port is looked up).
pub const GLOBAL_PORT_MODE: &str = "PORT_MODE";

/// Global: 1 when cgroup rules are given (`CGROUP_SELECT` is looked up), else 0.
pub const GLOBAL_CGROUP_RULES: &str = "CGROUP_RULES";

/// Default payload capture: a request line and ordinary headers.
pub const DEFAULT_CAPTURE_BYTES: u32 = 1024;
/// Default wake-up threshold.
pub const DEFAULT_WAKEUP_BYTES: u32 = 256 * 1024;

/// Global: where `struct sock_common` keeps a socket's addresses and ports on the running kernel
/// (read from its BTF by userspace; Rust eBPF has no CO-RE relocations).
pub const GLOBAL_SOCK_OFFSETS: &str = "SOCK_OFFSETS";

/// Byte offsets in `struct sock_common`; `valid` = 0 disables reading them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOffsets {
    pub valid: u32,
    pub daddr: u32,
    pub rcv_saddr: u32,
    pub dport: u32,
    pub num: u32,
    pub family: u32,
    pub v6_daddr: u32,
    pub v6_rcv_saddr: u32,
}
const _: () = assert!(core::mem::size_of::<SockOffsets>() == 32);

#[cfg(feature = "user")]
// SAFETY: plain #[repr(C)] u32 fields, no padding.
unsafe impl aya::Pod for SockOffsets {}
