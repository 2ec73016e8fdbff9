//! Load-time configuration of the kernel programs, set with `EbpfLoader::override_global`.

/// Global: tgid of the agent itself; its own syscalls are never traced.
pub const GLOBAL_SELF_TGID: &str = "SELF_TGID";
/// Global: payload bytes copied per data event (clamped to [`crate::MAX_CAPTURE`]).
pub const GLOBAL_CAPTURE_BYTES: &str = "CAPTURE_BYTES";
/// Global: the kernel wakes userspace only once this many bytes wait in the ring
/// (userspace also polls on a short timer, so a quiet ring is never left unread).
pub const GLOBAL_WAKEUP_BYTES: &str = "WAKEUP_BYTES";

/// Default payload capture: a request line and ordinary headers.
pub const DEFAULT_CAPTURE_BYTES: u32 = 1024;
/// Default wake-up threshold.
pub const DEFAULT_WAKEUP_BYTES: u32 = 256 * 1024;
