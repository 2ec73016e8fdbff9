//! Types shared by the kernel programs (`agent-ebpf`) and the userspace agent.
//!
//! Every kernel↔user record is `#[repr(C)]`, `Copy`, built of fixed-width integers and arrays
//! only, with explicit padding and a size assertion next to it, so both compilers agree on the
//! layout. Kinds are plain `u8` constants (never Rust enums) decoded with `TryFrom` in userspace.
#![no_std]

pub mod config;
pub mod event;
pub mod hooks;
pub mod maps;

pub use event::*;
