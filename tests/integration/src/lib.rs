//! End-to-end test support for sockspan: an in-process OTLP receiver ([`receiver`]), a process
//! harness for the agent, servers and clients ([`harness`]), and the assertions a user would make
//! about the spans of one HTTP exchange ([`checks`]). The tests themselves live in `tests/`.

pub mod beds;
pub mod checks;
pub mod harness;
pub mod receiver;
pub mod topology;

pub use receiver::{AttrValue, CollectedSpan, Receiver, Transport};
