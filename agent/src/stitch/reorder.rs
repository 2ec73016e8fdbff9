//! The reorder buffer: the stream's order is not causal order across CPUs, so items wait here
//! and come out by timestamp once nothing earlier can still arrive.
use std::{
    cmp::Reverse,
    collections::{BinaryHeap, VecDeque},
};

/// Items are held until this much later event time has arrived, or this much wall time passed.
const HOLD_EVENT_NS: u64 = 10_000_000;
const HOLD_WALL_NS: u64 = 250_000_000;
/// Beyond this many held items, the oldest come out early.
const MAX_HELD: usize = 200_000;

/// Items keyed by timestamp. Only (timestamp, arrival order) pairs are sorted; the items stay
/// put in `items`, indexed by arrival order from `base` (moving whole items through heap sifts
/// cost more than everything else the stitcher does).
pub struct Reorder<T> {
    keys: Keys,
    items: VecDeque<Option<T>>,
    base: u64,
    next_order: u64,
    max_key_seen: u64,
    last_released: u64,
    /// Items released after a later one had been (they came later than the hold allowed).
    pub late: u64,
}

impl<T> Default for Reorder<T> {
    fn default() -> Self {
        Self {
            keys: Keys::default(),
            items: VecDeque::new(),
            base: 0,
            next_order: 0,
            max_key_seen: 0,
            last_released: 0,
            late: 0,
        }
    }
}

impl<T> Reorder<T> {
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Frees spare capacity (after state was shed under the memory budget): the buffer keeps
    /// the size of its largest burst otherwise.
    pub fn shrink(&mut self) {
        self.keys.shrink();
        self.items.shrink_to_fit();
    }

    /// Drops every held item `discard` picks (state shed under the memory budget).
    pub fn discard(&mut self, mut discard: impl FnMut(&T) -> bool) {
        for slot in &mut self.items {
            if slot.as_ref().is_some_and(&mut discard) {
                *slot = None;
            }
        }
        let (items, base) = (&self.items, self.base);
        self.keys
            .retain(|order| items.get((order - base) as usize).is_some_and(Option::is_some));
        while let Some(None) = self.items.front() {
            self.items.pop_front();
            self.base += 1;
        }
    }

    /// Holds `item`; returns its arrival order, by which [`Self::get_mut`] finds it.
    pub fn push(&mut self, key: u64, item: T) -> u64 {
        let order = self.next_order;
        self.next_order += 1;
        self.max_key_seen = self.max_key_seen.max(key);
        self.keys.push((key, order));
        self.items.push_back(Some(item));
        order
    }

    /// The item of arrival order `order`, while it is held.
    pub fn get_mut(&mut self, order: u64) -> Option<&mut T> {
        self.items.get_mut(order.checked_sub(self.base)? as usize)?.as_mut()
    }

    /// The time before which items may come out at wall time `now_mono_ns`.
    pub fn watermark(&self, now_mono_ns: u64) -> u64 {
        let by_events = self.max_key_seen.saturating_sub(HOLD_EVENT_NS);
        let by_wall = now_mono_ns.saturating_sub(HOLD_WALL_NS);
        by_events.max(by_wall)
    }

    /// The oldest item, if it is older than `watermark` (or too many are held); `None` as
    /// watermark takes it whatever its time (a flush).
    pub fn pop(&mut self, watermark: Option<u64>) -> Option<T> {
        loop {
            let (key, _) = self.keys.peek()?;
            if watermark.is_some_and(|w| key >= w) && self.keys.len() <= MAX_HELD {
                return None;
            }
            let (key, order) = self.keys.pop()?;
            if key < self.last_released {
                self.late += 1;
            }
            self.last_released = self.last_released.max(key);
            let item = order
                .checked_sub(self.base)
                .and_then(|i| self.items.get_mut(i as usize))
                .and_then(Option::take);
            while let Some(None) = self.items.front() {
                self.items.pop_front();
                self.base += 1;
            }
            if item.is_some() {
                return item;
            }
        }
    }
}

/// (timestamp, arrival order) pairs, smallest first. Nearly every item arrives no earlier than
/// the one before it (each CPU's events are in order; only the interleaving of CPUs is not):
/// those are appended to a sorted run at no cost, and only the others go through a heap.
#[derive(Default)]
struct Keys {
    /// Sorted: each pair arrived no earlier than the one before it.
    run: VecDeque<(u64, u64)>,
    /// The pairs that arrived earlier than the run's last.
    heap: BinaryHeap<Reverse<(u64, u64)>>,
}

impl Keys {
    fn len(&self) -> usize {
        self.run.len() + self.heap.len()
    }

    fn shrink(&mut self) {
        self.run.shrink_to_fit();
        self.heap.shrink_to_fit();
    }

    fn push(&mut self, pair: (u64, u64)) {
        if self.run.back().is_none_or(|last| pair >= *last) {
            self.run.push_back(pair);
        } else {
            self.heap.push(Reverse(pair));
        }
    }

    fn peek(&self) -> Option<(u64, u64)> {
        match (self.run.front(), self.heap.peek()) {
            (Some(&a), Some(&Reverse(b))) => Some(a.min(b)),
            (a, b) => a.copied().or(b.map(|r| r.0)),
        }
    }

    fn pop(&mut self) -> Option<(u64, u64)> {
        let from_run = match (self.run.front(), self.heap.peek()) {
            (Some(a), Some(Reverse(b))) => a < b,
            (a, _) => a.is_some(),
        };
        if from_run {
            self.run.pop_front()
        } else {
            self.heap.pop().map(|r| r.0)
        }
    }

    /// Keeps the pairs whose arrival order `keep` picks.
    fn retain(&mut self, mut keep: impl FnMut(u64) -> bool) {
        self.run.retain(|&(_, order)| keep(order));
        self.heap.retain(|Reverse((_, order))| keep(*order));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever the arrival order, items come out by (timestamp, arrival order), as from one heap.
    #[test]
    fn out_by_timestamp_then_arrival() {
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for round in 0..50 {
            let mut r = Reorder::default();
            let mut want = Vec::new();
            let mut t = 1000;
            for i in 0..500u64 {
                // Mostly in order, some late by up to 50, some equal.
                t += next() % 3;
                let key = if next() % 5 == 0 {
                    t.saturating_sub(next() % 50)
                } else {
                    t
                };
                r.push(key, i);
                want.push((key, i));
                if next() % 7 == 0 {
                    // Interleave releases with arrivals.
                    want.sort();
                    let (k, item) = want.remove(0);
                    assert_eq!(r.keys.peek().map(|p| p.0), Some(k), "round {round}");
                    assert_eq!(r.pop(None), Some(item), "round {round}");
                }
            }
            want.sort();
            let got: Vec<u64> = std::iter::from_fn(|| r.pop(None)).collect();
            assert_eq!(got, want.iter().map(|w| w.1).collect::<Vec<_>>(), "round {round}");
            assert_eq!(r.len(), 0);
        }
    }
}
