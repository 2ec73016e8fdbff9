//! sockspan's kernel programs.
//!
//! Hook choice: this design rests on tracepoints, because the kernels it must run on
//! include ones built without kprobes and ones that refuse fentry/fexit (trampolines).
//! - `syscalls:sys_{enter,exit}_*` give the fd, the thread, the user buffer and the byte count;
//!   entry arguments are stashed per thread (`PENDING`, one entry per thread rewritten in
//!   place) and taken at exit.
//! - `sock:sock_{send,recv}_length` fire inside the socket layer during those syscalls with the
//!   socket, its family and protocol: only syscalls they mark as TCP produce events, so files,
//!   pipes and unix sockets cost two hash lookups and produce nothing.
//! - `sock:inet_sock_set_state` gives the 4-tuple of every TCP socket as it becomes ESTABLISHED
//!   (userspace joins it to data events on the socket identity) and marks connect()ing sockets.
//! - uprobes, on Go executables only (`probes::golang`): goroutine creation and `net/http`'s
//!   client hand-off, which no syscall shows. A uprobe hit traps (~10 µs here), so they sit on
//!   functions that run once per call or goroutine, never per syscall.
//!
//! The programs only read; they never write into application memory.
#![no_std]
#![no_main]

mod capture;
mod maps;
mod probes;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
