//! Drains the kernel ring buffer into batches of raw records. Does the minimum: wait, copy,
//! hand over; never decodes, never blocks on the next stage (a full channel drops the batch,
//! counted).
//!
//! It runs on a thread of its own, not on the pipeline's: a pipeline kept off the CPU (by a
//! busy core's other tasks, for 15–31 ms at a time under `cargo xtask bench overhead`'s
//! 20,000 req/s) then leaves its backlog here, within the memory budget, instead of in the
//! ring, where the kernel would lose the events that no longer fit.
use std::{
    os::fd::{AsFd, AsRawFd},
    sync::Arc,
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::budget::MemoryBudget;

use crate::telemetry::Metrics;

/// Raw records copied out of the ring buffer, back to back.
#[derive(Default, Debug, Clone)]
pub struct RawBatch {
    pub bytes: Vec<u8>,
    /// End offset of each record in `bytes`.
    pub ends: Vec<u32>,
}

impl RawBatch {
    pub fn push(&mut self, record: &[u8]) {
        self.bytes.extend_from_slice(record);
        self.ends.push(self.bytes.len() as u32);
    }
    pub fn len(&self) -> usize {
        self.ends.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let mut start = 0usize;
        self.ends.iter().map(move |&end| {
            let r = &self.bytes[start..end as usize];
            start = end as usize;
            r
        })
    }
}

/// Batches handed back after processing, so their buffers are reused: allocating and freeing
/// a few hundred KiB per batch made the kernel zero fresh pages at every batch. It also counts
/// the bytes of the batches handed to the pipeline and not yet back: the reader channel's
/// backlog, which the memory budget bounds.
#[derive(Default, Debug)]
pub struct BatchPool {
    free: std::sync::Mutex<Vec<RawBatch>>,
    backlog_bytes: std::sync::atomic::AtomicU64,
}

impl BatchPool {
    const KEEP: usize = 8;

    pub fn get(&self) -> RawBatch {
        self.free.lock().ok().and_then(|mut f| f.pop()).unwrap_or_default()
    }

    /// Record bytes handed to the pipeline and not yet put back.
    pub fn backlog_bytes(&self) -> u64 {
        self.backlog_bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn handed_over(&self, batch_bytes: usize) {
        self.backlog_bytes
            .fetch_add(batch_bytes as u64, std::sync::atomic::Ordering::Relaxed);
    }

    fn given_back(&self, batch_bytes: usize) {
        let _ = self.backlog_bytes.fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |b| Some(b.saturating_sub(batch_bytes as u64)),
        );
    }

    /// Takes a batch back after processing (or an empty one the reader did not send).
    pub fn put(&self, mut batch: RawBatch) {
        self.given_back(batch.bytes.len());
        batch.bytes.clear();
        batch.ends.clear();
        if let Ok(mut f) = self.free.lock()
            && f.len() < Self::KEEP
        {
            f.push(batch);
        }
    }
}

/// Records per batch before it is handed over.
pub const BATCH_RECORDS: usize = 1024;
/// The kernel wakes us only once enough bytes wait; this poll bounds the latency otherwise.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

pub struct Reader {
    pub ring: RingBuf<MapData>,
    pub metrics: Arc<Metrics>,
    pub pool: Arc<BatchPool>,
    pub budget: MemoryBudget,
}

impl Reader {
    /// Waits for records (or [`POLL_INTERVAL`]) and drains them, until `cancel` or the
    /// pipeline is gone. Blocks: run it on a thread of its own.
    pub fn run(mut self, tx: mpsc::Sender<RawBatch>, cancel: CancellationToken) -> std::io::Result<()> {
        let (metrics, pool, budget) = (self.metrics, self.pool, self.budget);
        let fd = self.ring.as_fd().as_raw_fd();
        let timeout_ms = POLL_INTERVAL.as_millis() as libc::c_int;
        loop {
            let mut ready = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd; the ring owns `fd` for as long as this loop runs.
            if unsafe { libc::poll(&mut ready, 1, timeout_ms) } < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            let cancelled = cancel.is_cancelled();
            if !drain(&mut self.ring, &tx, &metrics, &pool, budget) || cancelled {
                return Ok(());
            }
        }
    }
}

/// Drains everything waiting; returns false once the next stage is gone.
fn drain(
    ring: &mut RingBuf<MapData>,
    tx: &mpsc::Sender<RawBatch>,
    metrics: &Metrics,
    pool: &BatchPool,
    budget: MemoryBudget,
) -> bool {
    let mut batch = pool.get();
    while let Some(item) = ring.next() {
        batch.push(&item);
        drop(item);
        if batch.len() >= BATCH_RECORDS && !send(std::mem::replace(&mut batch, pool.get()), tx, metrics, pool, budget) {
            return false;
        }
    }
    if batch.is_empty() {
        pool.put(batch);
        return true;
    }
    send(batch, tx, metrics, pool, budget)
}

/// Hands a batch to the pipeline; drops it (counted) when the pipeline lags by a full channel,
/// its backlog is past the reader's share of the memory budget, or the agent is out of budget.
fn send(
    batch: RawBatch,
    tx: &mpsc::Sender<RawBatch>,
    metrics: &Metrics,
    pool: &BatchPool,
    budget: MemoryBudget,
) -> bool {
    let n = batch.len() as u64;
    let size = batch.bytes.len();
    metrics.events_read.add(n);
    if budget.exhausted() || pool.backlog_bytes() + size as u64 > budget.reader_backlog_bytes() {
        metrics.events_dropped_memory_limit.add(n);
        return !tx.is_closed();
    }
    // Counted before the pipeline can give it back.
    pool.handed_over(size);
    match tx.try_send(batch) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            pool.given_back(size);
            metrics.events_dropped_channel_full.add(n);
            true
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            pool.given_back(size);
            false
        }
    }
}
