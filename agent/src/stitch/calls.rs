//! The event loop's index: which server request each finished call was made for, so the
//! continuation after a response (`loop_response`) inherits it. The other half of the event-loop
//! signal, each loop thread's last message, lives in `crate::loops` (stream order).
use std::collections::VecDeque;

use super::serving::Key;
use crate::FastMap;

const MAX_FINISHED_CALLS: usize = 65_536;

#[derive(Default)]
pub struct FinishedCalls {
    parent: FastMap<Key, Key>,
    order: VecDeque<Key>,
}

impl FinishedCalls {
    /// Call `call` finished with a response; it was made for server request `parent`.
    pub fn remember(&mut self, call: Key, parent: Key) {
        if self.order.len() >= MAX_FINISHED_CALLS
            && let Some(old) = self.order.pop_front()
        {
            self.parent.remove(&old);
        }
        self.parent.insert(call, parent);
        self.order.push_back(call);
    }

    pub fn parent_of(&self, call: &Key) -> Option<Key> {
        self.parent.get(call).copied()
    }
}
