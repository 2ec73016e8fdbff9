//! One memory budget for the whole agent (`--memory-limit`), on its resident size. Every
//! stage's state draws from it: past [`MemoryBudget::shed_above`] the pipeline first gives the
//! allocator's spare memory back to the system, then sheds the least recently active
//! connections, whose requests end without spans, until the agent is under
//! [`MemoryBudget::shed_to`]; past the limit itself the reader drops event batches and the
//! exporter drops spans instead of queueing them. Each is
//! counted by stage and reason (`memory_limit`). The resident size is what a container's memory
//! limit sees; the live heap alone (exact, [`crate::alloc::live_bytes`]) leaves out the
//! allocator's spare pages and the ring buffer's mapping, which under load were as large.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The agent's resident bytes when last read ([`resident_now`]).
static RESIDENT: AtomicU64 = AtomicU64::new(0);

/// Reads the agent's resident size (`/proc/self/statm`), and keeps it for [`resident`].
pub fn resident_now() -> u64 {
    let bytes = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * page_size());
    RESIDENT.store(bytes, Relaxed);
    bytes
}

/// The resident size when last read (cheap: for the reader's and exporter's hot paths).
pub fn resident() -> u64 {
    RESIDENT.load(Relaxed)
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 { n as u64 } else { 4096 }
}

/// The memory budget: the limit on the agent's resident size, and the part of it that state
/// can use (what the ring buffer's mapping and the fixed part leave).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBudget {
    limit: u64,
    heap: u64,
}

/// A budget that cannot hold the agent.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "--memory-limit {limit} bytes leaves no room for state: at least {min} bytes are needed with a {ring} byte ring buffer"
)]
pub struct BudgetTooSmall {
    pub limit: u64,
    pub min: u64,
    pub ring: u64,
}

impl MemoryBudget {
    /// Resident bytes outside the heap and the ring buffer: the binary's pages, thread stacks,
    /// the allocator's own overhead (measured idle: 8 MiB anonymous, 7 MiB of the binary).
    pub const FIXED_BYTES: u64 = 16 << 20;
    /// Smallest heap share accepted.
    pub const MIN_HEAP_BYTES: u64 = 16 << 20;
    /// The default limit, documented in the README and matched by the DaemonSet's limits.
    pub const DEFAULT_LIMIT: u64 = 256 << 20;

    /// `limit`: the agent's whole resident memory; `ring_bytes`: the kernel ring buffer, whose
    /// data pages are mapped into the agent twice (so a record can wrap around the end) and
    /// count twice in its resident size.
    pub fn new(limit: u64, ring_bytes: u64) -> Result<Self, BudgetTooSmall> {
        let outside = Self::FIXED_BYTES + 2 * ring_bytes;
        let min = outside + Self::MIN_HEAP_BYTES;
        if limit < min {
            return Err(BudgetTooSmall {
                limit,
                min,
                ring: ring_bytes,
            });
        }
        Ok(Self {
            limit,
            heap: limit - outside,
        })
    }

    /// The whole limit, in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The part of the limit left for state (the heap and the allocator's spare pages).
    pub fn heap_bytes(&self) -> u64 {
        self.heap
    }

    /// Past this resident size, the pipeline sheds state until it is back under
    /// [`Self::shed_to`]: a third and a half of the state's part below the limit (a burst
    /// of requests grows the resident size by megabytes between two checks: with a quarter,
    /// a burst of 50,000 unanswered requests once peaked 8 MiB over a 144 MiB limit).
    pub fn shed_above(&self) -> u64 {
        self.limit - self.heap / 3
    }

    pub fn shed_to(&self) -> u64 {
        self.limit - self.heap / 2
    }

    /// The reader channel's share: record bytes read and not yet processed (a lagging
    /// pipeline's backlog), a quarter of the state's part.
    pub fn reader_backlog_bytes(&self) -> u64 {
        self.heap / 4
    }

    /// The export queue's share: spans waiting for the collector (a slow or unreachable one
    /// fills it), a quarter of the state's part.
    pub fn export_queue_bytes(&self) -> u64 {
        self.heap / 4
    }

    /// The allocator's spare memory: the resident size beyond the live heap `heap`, the ring
    /// buffer and the fixed part (an estimate: the fixed part is rounded up).
    pub fn spare(&self, resident: u64, heap: u64) -> u64 {
        resident.saturating_sub(self.limit - self.heap + heap)
    }

    /// The agent was over its limit when last measured: new state should be refused.
    pub fn exhausted(&self) -> bool {
        resident() > self.limit
    }
}

/// Parses a byte size: a number with an optional binary (`KiB`, `MiB`, `GiB`) or decimal
/// (`K`, `M`, `G`) suffix, e.g. `256MiB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 256MiB)"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "Ki" | "KiB" => 1 << 10,
        "Mi" | "MiB" => 1 << 20,
        "Gi" | "GiB" => 1 << 30,
        other => return Err(format!("unknown size unit `{other}` (use KiB, MiB, GiB, K, M, G)")),
    };
    n.checked_mul(scale).ok_or_else(|| format!("`{s}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spare: what the resident size holds beyond the heap, the ring's two mappings and the
    /// fixed part.
    #[test]
    fn spare_memory() {
        let b = MemoryBudget::new(256 << 20, 4 << 20).unwrap();
        let outside = MemoryBudget::FIXED_BYTES + (8 << 20);
        assert_eq!(b.spare(outside + (36 << 20), 28 << 20), 8 << 20);
        assert_eq!(b.spare(outside + (20 << 20), 28 << 20), 0);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1_000_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64 KiB"), Ok(64 << 10));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("99999999999999GiB").is_err());
    }

    #[test]
    fn the_heap_gets_what_the_ring_and_fixed_part_leave() {
        let b = MemoryBudget::new(256 << 20, 16 << 20).unwrap();
        assert_eq!(b.heap_bytes(), (256 - 16 - 2 * 16) << 20);
        assert!(b.shed_to() < b.shed_above() && b.shed_above() < b.limit());
        assert!(b.shed_to() > b.limit() - b.heap_bytes());
        let e = MemoryBudget::new(40 << 20, 16 << 20).unwrap_err();
        assert_eq!(e.min, (16 + 2 * 16 + 16) << 20);
        assert!(e.to_string().contains("--memory-limit"), "{e}");
    }
}
