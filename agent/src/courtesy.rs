//! The agent shares its cores with the services it watches, and a long stretch of its work on
//! a core delays whatever the scheduler queued behind it there (by `sched_switch`, nginx under
//! `cargo xtask bench overhead`: its waits of over 100 µs behind the agent averaged 600 µs, up
//! to 4 ms). The long stretches on the agent's thread, the pipeline's batches, the exporter's
//! encoding and the formatting of printed lines, offer the CPU every [`YIELD_EVERY_NS`] while
//! the agent has time to spare; an agent falling behind keeps it, or the kernel would lose
//! events.
use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering::Relaxed},
};

/// The longest stretch of work before the CPU is offered to whatever waits for it.
pub const YIELD_EVERY_NS: u64 = 50_000;
/// Items of a stretch between two looks at the clock.
const ITEMS_PER_CHECK: u32 = 16;

/// Whether the agent has time to spare, as the pipeline judged it at its last batch; the
/// exporter and the printing read it.
#[derive(Debug, Clone, Default)]
pub struct Slack(Arc<AtomicBool>);

impl Slack {
    pub fn set(&self, spare: bool) {
        self.0.store(spare, Relaxed);
    }

    pub fn spare(&self) -> bool {
        self.0.load(Relaxed)
    }
}

/// One stretch of work, item by item, that offers the CPU once it has kept it for
/// [`YIELD_EVERY_NS`] (never when not polite, nor with a stopped clock, as in replays).
pub struct Stretch {
    clock: fn() -> u64,
    polite: bool,
    items: u32,
    offered_ns: u64,
}

impl Stretch {
    pub fn begin(clock: fn() -> u64, polite: bool) -> Self {
        Self {
            clock,
            polite,
            items: 0,
            offered_ns: clock(),
        }
    }

    /// Called once per item; looks at the clock every [`ITEMS_PER_CHECK`] items. True when
    /// it offered the CPU.
    pub fn offer_if_due(&mut self) -> bool {
        self.items = self.items.wrapping_add(1);
        if !self.polite || !self.items.is_multiple_of(ITEMS_PER_CHECK) {
            return false;
        }
        let now = (self.clock)();
        if now.saturating_sub(self.offered_ns) < YIELD_EVERY_NS {
            return false;
        }
        std::thread::yield_now();
        self.offered_ns = (self.clock)();
        true
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    thread_local! {
        static NOW: Cell<u64> = const { Cell::new(0) };
    }

    /// A clock that moves 10 µs at each look.
    fn ticking() -> u64 {
        NOW.with(|n| {
            n.set(n.get() + 10_000);
            n.get()
        })
    }

    fn offers(mut stretch: Stretch, items: usize) -> usize {
        (0..items).filter(|_| stretch.offer_if_due()).count()
    }

    #[test]
    fn a_polite_stretch_offers_once_it_kept_the_cpu_long_enough() {
        // Looks at the clock when it begins and at items 16, 32, 48, ...: 10, 20, 30 µs
        // later; offers at item 80, 50 µs.
        assert_eq!(offers(Stretch::begin(ticking, true), 79), 0);
        assert_eq!(offers(Stretch::begin(ticking, true), 80), 1);
        assert!(offers(Stretch::begin(ticking, true), 16 * 100) >= 20);
    }

    #[test]
    fn never_offers_when_not_polite_or_the_clock_is_stopped() {
        assert_eq!(offers(Stretch::begin(ticking, false), 16 * 100), 0);
        assert_eq!(offers(Stretch::begin(|| 0, true), 16 * 100), 0);
    }

    #[test]
    fn slack_is_shared_between_clones() {
        let a = Slack::default();
        let b = a.clone();
        assert!(!b.spare());
        a.set(true);
        assert!(b.spare());
    }
}
