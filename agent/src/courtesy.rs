//! The agent shares its cores with the services it watches, and a long stretch of its work on
//! a core delays whatever the scheduler queued behind it there (by `sched_switch`, nginx under
//! `cargo xtask bench overhead`: its waits of over 100 µs behind the agent averaged 600 µs, up
//! to 4 ms). The long stretches on the agent's thread, the pipeline's batches, the exporter's
//! encoding and the formatting of printed lines, offer the CPU every [`YIELD_EVERY_NS`] while
//! the agent has time to spare; an agent falling behind keeps it, or the kernel would lose
//! events.
//!
//! A yield that keeps the agent off the CPU for long ([`CONTENDED_NS`]) shows that the core
//! is contended, not idle: each further yield there puts the agent further back in the queue
//! while the ring buffer fills. So a long yield ends the offering at once, for
//! [`CONTENDED_HOLD_NS`]. Under `cargo xtask bench overhead --services nginx` the agent offered
//! the CPU 54,000–59,000 times a run without this rule, 15,000–22,000 with it.
use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
};

/// The longest stretch of work before the CPU is offered to whatever waits for it.
pub const YIELD_EVERY_NS: u64 = 50_000;
/// Items of a stretch between two looks at the clock.
const ITEMS_PER_CHECK: u32 = 16;
/// A yield that kept the agent off the CPU this long found the core contended.
pub const CONTENDED_NS: u64 = 1_000_000;
/// How long after a contended yield the agent keeps the CPU.
pub const CONTENDED_HOLD_NS: u64 = 1_000_000_000;

/// Whether the agent has time to spare, as the pipeline judged it at its last batch (and no
/// yield since found the core contended); the exporter and the printing read it.
#[derive(Debug, Clone, Default)]
pub struct Slack(Arc<SlackState>);

#[derive(Debug, Default)]
struct SlackState {
    spare: AtomicBool,
    /// When a yield last found the core contended (clock ns; 0: never).
    contended_ns: AtomicU64,
}

impl Slack {
    /// Judges, as a batch begins at `now_ns`, whether the agent has time to spare: the last
    /// batch worked less than a fifth of the time before this one, and no yield found the
    /// core contended in the last [`CONTENDED_HOLD_NS`]. A pipeline falling behind (a
    /// saturated node) keeps the CPU, or the kernel would lose events.
    pub fn judge(&self, now_ns: u64, last_busy_ns: u64, last_end_ns: u64) -> bool {
        let contended = self.0.contended_ns.load(Relaxed);
        let spare = last_busy_ns.saturating_mul(4) < now_ns.saturating_sub(last_end_ns)
            && (contended == 0 || now_ns.saturating_sub(contended) >= CONTENDED_HOLD_NS);
        self.0.spare.store(spare, Relaxed);
        spare
    }

    pub fn spare(&self) -> bool {
        self.0.spare.load(Relaxed)
    }

    fn contended_at(&self, now_ns: u64) {
        self.0.contended_ns.store(now_ns.max(1), Relaxed);
        self.0.spare.store(false, Relaxed);
    }
}

/// One stretch of work, item by item, that offers the CPU once it has kept it for
/// [`YIELD_EVERY_NS`], while `slack` says the agent has time to spare (never with a stopped
/// clock, as in replays).
pub struct Stretch {
    clock: fn() -> u64,
    slack: Slack,
    polite: bool,
    items: u32,
    offered_ns: u64,
}

impl Stretch {
    pub fn begin(clock: fn() -> u64, slack: &Slack) -> Self {
        Self {
            clock,
            slack: slack.clone(),
            polite: slack.spare(),
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
        if self.offered_ns.saturating_sub(now) >= CONTENDED_NS {
            self.polite = false;
            self.slack.contended_at(self.offered_ns);
        }
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

    /// A clock whose every look finds 1.5 ms gone: each yield kept the agent off the CPU.
    fn contended() -> u64 {
        NOW.with(|n| {
            n.set(n.get() + 1_500_000);
            n.get()
        })
    }

    /// A slack judged spare: the last batch took no time.
    fn spare() -> Slack {
        let slack = Slack::default();
        assert!(slack.judge(1_000_000, 0, 0));
        slack
    }

    fn offers(mut stretch: Stretch, items: usize) -> usize {
        (0..items).filter(|_| stretch.offer_if_due()).count()
    }

    #[test]
    fn a_polite_stretch_offers_once_it_kept_the_cpu_long_enough() {
        // Looks at the clock when it begins and at items 16, 32, 48, ...: 10, 20, 30 µs
        // later; offers at item 80, 50 µs.
        let slack = spare();
        assert_eq!(offers(Stretch::begin(ticking, &slack), 79), 0);
        assert_eq!(offers(Stretch::begin(ticking, &slack), 80), 1);
        assert!(offers(Stretch::begin(ticking, &slack), 16 * 100) >= 20);
        assert!(slack.spare(), "short yields leave the slack as judged");
    }

    #[test]
    fn never_offers_without_slack_or_with_the_clock_stopped() {
        assert_eq!(offers(Stretch::begin(ticking, &Slack::default()), 16 * 100), 0);
        assert_eq!(offers(Stretch::begin(|| 0, &spare()), 16 * 100), 0);
    }

    #[test]
    fn a_busy_last_batch_leaves_no_slack() {
        let slack = Slack::default();
        // Worked 1 ms of the last 4.5: more than a fifth.
        assert!(!slack.judge(10_000_000, 1_000_000, 6_500_000));
        assert!(slack.judge(10_000_000, 1_000_000, 5_000_000));
    }

    #[test]
    fn a_long_yield_ends_the_offering_for_a_while() {
        let slack = spare();
        assert_eq!(offers(Stretch::begin(contended, &slack), 16 * 100), 1);
        assert!(!slack.spare(), "the exporter and the printing stop offering too");
        let at = contended();
        assert!(!slack.judge(at + CONTENDED_HOLD_NS / 2, 0, 0));
        assert!(slack.judge(at + CONTENDED_HOLD_NS, 0, 0));
    }

    #[test]
    fn slack_is_shared_between_clones() {
        let a = Slack::default();
        let b = a.clone();
        assert!(!b.spare());
        assert!(a.judge(1_000_000, 0, 0));
        assert!(b.spare());
    }
}
