//! The agent's allocator: mimalloc (span building and export allocate many small strings; it
//! spends about half the time glibc's allocator did on them, measured under `cargo xtask
//! bench`), counting the bytes live so memory use is a metric, not a guess.
use std::{
    alloc::{GlobalAlloc, Layout},
    cell::Cell,
    sync::atomic::{AtomicI64, AtomicUsize, Ordering::Relaxed},
};

/// Live bytes, in one slot per thread: a thread updates its own slot with a plain load and
/// store, because a locked add on one shared counter for every allocation cost about a tenth of
/// the agent's CPU under load. The sum over all slots is the live total (a block may be
/// freed on another thread than the one that allocated it, so one slot can go negative).
const SLOTS: usize = 64;

#[repr(align(64))]
struct Slot(AtomicI64);

static LIVE: [Slot; SLOTS] = [const { Slot(AtomicI64::new(0)) }; SLOTS];
/// Threads beyond the slots share this one, with locked adds.
static SHARED: AtomicI64 = AtomicI64::new(0);
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    // const-initialised and without a destructor: safe to touch inside the allocator.
    static MY_SLOT: Cell<usize> = const { Cell::new(usize::MAX) };
}

#[inline]
fn count(delta: i64) {
    let slot = MY_SLOT.try_with(|s| {
        let mut i = s.get();
        if i == usize::MAX {
            i = NEXT_SLOT.fetch_add(1, Relaxed);
            s.set(i);
        }
        i
    });
    match slot {
        Ok(i) if i < SLOTS => {
            // Only this thread writes this slot: a plain read-modify-write is exact.
            let c = &LIVE[i].0;
            c.store(c.load(Relaxed) + delta, Relaxed);
        }
        _ => {
            SHARED.fetch_add(delta, Relaxed);
        }
    }
}

/// Install with `#[global_allocator] static A: sockspan::alloc::Counting = sockspan::alloc::Counting;`.
pub struct Counting;

// SAFETY: every call is forwarded unchanged to mimalloc; only a counter is updated beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { mimalloc::MiMalloc.alloc(layout) };
        if !p.is_null() {
            count(layout.size() as i64);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size() as i64);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) };
        count(-(layout.size() as i64));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(new_size as i64 - layout.size() as i64);
        }
        p
    }
}

/// Bytes allocated and not yet freed through [`Counting`] (0 if another allocator is in use).
pub fn live_bytes() -> u64 {
    let slots: i64 = LIVE.iter().map(|s| s.0.load(Relaxed)).sum();
    (slots + SHARED.load(Relaxed)).max(0) as u64
}

/// Returns the memory the allocator keeps for reuse (freed blocks, pages of exited threads) to
/// the system, so the resident size follows the live heap: the start-up's kernel-object and
/// verifier buffers, or state just shed under the memory budget, otherwise stay resident.
pub fn give_back() {
    // SAFETY: no preconditions; safe to call from any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// Keeps the process on small pages. mimalloc advises transparent huge pages on its arenas, and
/// a 2 MiB page is resident as soon as one byte of it is touched: at 10,000 connections, 59 of
/// the heap's 71 MiB resident were huge pages around a live heap of 28 MiB. Small pages cost
/// nothing measurable in the replay. Call first in `main`, before the heap grows.
pub fn small_pages_only() {
    // SAFETY: PR_SET_THP_DISABLE takes integers only and sets a flag of this process.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
}
