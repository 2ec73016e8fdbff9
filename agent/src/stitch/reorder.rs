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

/// Items keyed by timestamp. The heap holds only (timestamp, arrival order); the items stay put
/// in `items`, indexed by arrival order from `base` (moving whole items through heap sifts cost
/// more than everything else the stitcher does).
pub struct Reorder<T> {
    heap: BinaryHeap<Reverse<(u64, u64)>>,
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
            heap: BinaryHeap::new(),
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
        self.heap.len()
    }

    /// Frees spare capacity (after state was shed under the memory budget): the buffer keeps
    /// the size of its largest burst otherwise.
    pub fn shrink(&mut self) {
        self.heap.shrink_to_fit();
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
        self.heap
            .retain(|Reverse((_, order))| items.get((order - base) as usize).is_some_and(Option::is_some));
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
        self.heap.push(Reverse((key, order)));
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
            let &Reverse((key, _)) = self.heap.peek()?;
            if watermark.is_some_and(|w| key >= w) && self.heap.len() <= MAX_HELD {
                return None;
            }
            let Reverse((key, order)) = self.heap.pop()?;
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
