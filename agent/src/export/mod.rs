//! The last stage: spans go to the terminal (text or JSON lines) and/or to an OTLP endpoint.
//! Printing is synchronous and cheap; OTLP runs in its own task behind a bounded queue, so a
//! slow or unreachable collector never blocks capture (overflow is dropped and counted).
pub mod http;
pub mod otlp;
pub mod print;
pub mod proto;
pub mod tls;

pub use otlp::{BspConfig, OtlpExporter};
pub use print::{PrintCounts, PrintFormat, PrintQueue};
