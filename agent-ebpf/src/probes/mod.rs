pub mod golang;
pub mod loops;
pub mod sock;
pub mod syscalls;

use aya_ebpf::{EbpfContext, programs::TracePointContext};

/// A field of the tracepoint's record at `off` (from `agent_common::hooks`, checked against the
/// kernel's format at start), read straight from the record: the verifier allows a tracepoint's
/// program to load from its context, which saves a `bpf_probe_read` call per field.
/// `off` must be a multiple of `T`'s size, as the verifier asks of context loads.
#[inline(always)]
pub fn ctx_field<T: Copy>(ctx: &TracePointContext, off: usize) -> T {
    // SAFETY: a load inside the tracepoint's record, which the verifier bounds-checks.
    unsafe { core::ptr::read(ctx.as_ptr().cast::<u8>().add(off).cast::<T>()) }
}
