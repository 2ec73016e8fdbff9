//! sockspan's userspace library: every pipeline stage, testable without a kernel.
//!
//! ```text
//! loader/reader ─▶ decode ─▶ conn ─▶ http ─▶ process/span ─▶ export (OTLP, print, metrics)
//! ```
//! Each stage is a plain type; `pipeline` wires them together for the binary, and `replay`
//! pushes a recorded event stream through the same stages for tests and benchmarks.

pub mod alloc;
pub mod btf;
pub mod budget;
pub mod config;
pub mod config_file;
pub mod conn;
pub mod courtesy;
pub mod decode;
pub mod error;
pub use error::Error;
pub mod export;
pub mod goroutines;
pub mod http;
pub mod kube;
pub mod loader;
pub mod loops;
pub mod pipeline;
pub mod process;
pub mod reader;
pub mod replay;
pub mod routes;
pub mod sampling;
pub mod selection;
pub mod span;
pub mod stitch;
pub mod telemetry;
pub mod traces;
pub mod views;
pub mod vocab;

/// Hash maps for the per-event tables: foldhash (randomly seeded, so keys from the network
/// cannot be chosen to collide) instead of SipHash, which showed up in profiles.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub type FastSet<T> = std::collections::HashSet<T, foldhash::fast::RandomState>;
