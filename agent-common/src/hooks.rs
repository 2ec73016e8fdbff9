//! Every tracepoint sockspan attaches to, and the fields of its record that the kernel programs
//! read, written once. The kernel programs take their offsets from here, the loader attaches
//! each program to its tracepoint from here and checks every field against the running
//! kernel's `/sys/kernel/tracing/events/<category>/<name>/format` at start, and
//! `cargo xtask bench` builds its count-only floor (the same hooks, nothing done in them) from
//! here. A program's name is its tracepoint's name.

/// A field of a tracepoint's record, as its format file names and places it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: &'static str,
    pub offset: usize,
    pub size: usize,
}

impl Field {
    pub const fn new(name: &'static str, offset: usize, size: usize) -> Self {
        Self { name, offset, size }
    }

    /// Argument `i` of a syscall's entry record: 8-byte slots from offset 16, whatever the
    /// argument's C type.
    pub const fn arg(name: &'static str, i: usize) -> Self {
        Self::new(name, 16 + 8 * i, 8)
    }
}

/// A tracepoint and the fields its program reads.
#[derive(Clone, Copy, Debug)]
pub struct Tracepoint {
    pub category: &'static str,
    pub name: &'static str,
    pub fields: &'static [Field],
}

const fn tp(category: &'static str, name: &'static str, fields: &'static [Field]) -> Tracepoint {
    Tracepoint { category, name, fields }
}

/// A syscall's return value, in every `sys_exit_*` record.
pub const RET: Field = Field::new("ret", 16, 8);

/// `sock:sock_send_length` and `sock:sock_recv_length`.
pub mod sock_io {
    use super::Field;
    pub const SK: Field = Field::new("sk", 8, 8);
    pub const FAMILY: Field = Field::new("family", 16, 2);
    pub const PROTOCOL: Field = Field::new("protocol", 18, 2);
}

/// `sock:inet_sock_set_state` (ports in host order).
pub mod set_state {
    use super::Field;
    pub const SKADDR: Field = Field::new("skaddr", 8, 8);
    pub const OLDSTATE: Field = Field::new("oldstate", 16, 4);
    pub const NEWSTATE: Field = Field::new("newstate", 20, 4);
    pub const SPORT: Field = Field::new("sport", 24, 2);
    pub const DPORT: Field = Field::new("dport", 26, 2);
    pub const FAMILY: Field = Field::new("family", 28, 2);
    pub const PROTOCOL: Field = Field::new("protocol", 30, 2);
    pub const SADDR: Field = Field::new("saddr", 32, 4);
    pub const DADDR: Field = Field::new("daddr", 36, 4);
    pub const SADDR_V6: Field = Field::new("saddr_v6", 40, 16);
    pub const DADDR_V6: Field = Field::new("daddr_v6", 56, 16);
}

/// The arguments of the syscalls whose entries are hooked, by syscall.
pub mod args {
    use super::Field;
    pub const FD: Field = Field::arg("fd", 0);
    pub const READ_BUF: Field = Field::arg("buf", 1);
    pub const READV_VEC: Field = Field::arg("vec", 1);
    pub const READV_VLEN: Field = Field::arg("vlen", 2);
    pub const RECVFROM_BUF: Field = Field::arg("ubuf", 1);
    pub const RECVFROM_FLAGS: Field = Field::arg("flags", 3);
    pub const RECVMSG_MSG: Field = Field::arg("msg", 1);
    pub const RECVMSG_FLAGS: Field = Field::arg("flags", 2);
    pub const WRITE_BUF: Field = Field::arg("buf", 1);
    pub const WRITEV_VEC: Field = Field::arg("vec", 1);
    pub const WRITEV_VLEN: Field = Field::arg("vlen", 2);
    pub const SENDTO_BUF: Field = Field::arg("buff", 1);
    pub const SENDMSG_MSG: Field = Field::arg("msg", 1);
    pub const SENDFILE_OUT_FD: Field = Field::arg("out_fd", 0);
    pub const EPOLL_TIMEOUT: Field = Field::arg("timeout", 3);
    pub const POLL_TIMEOUT: Field = Field::arg("timeout_msecs", 2);
    pub const PPOLL_TSP: Field = Field::arg("tsp", 2);
    pub const SELECT_TVP: Field = Field::arg("tvp", 4);
    pub const PSELECT_TSP: Field = Field::arg("tsp", 4);
}

use args::*;

/// Every tracepoint attached, with the fields its program reads.
pub const TRACEPOINTS: &[Tracepoint] = &[
    tp(
        "sock",
        "sock_send_length",
        &[sock_io::SK, sock_io::FAMILY, sock_io::PROTOCOL],
    ),
    tp(
        "sock",
        "sock_recv_length",
        &[sock_io::SK, sock_io::FAMILY, sock_io::PROTOCOL],
    ),
    tp(
        "sock",
        "inet_sock_set_state",
        &[
            set_state::SKADDR,
            set_state::OLDSTATE,
            set_state::NEWSTATE,
            set_state::SPORT,
            set_state::DPORT,
            set_state::FAMILY,
            set_state::PROTOCOL,
            set_state::SADDR,
            set_state::DADDR,
            set_state::SADDR_V6,
            set_state::DADDR_V6,
        ],
    ),
    tp("syscalls", "sys_enter_accept", &[FD]),
    tp("syscalls", "sys_exit_accept", &[RET]),
    tp("syscalls", "sys_enter_accept4", &[FD]),
    tp("syscalls", "sys_exit_accept4", &[RET]),
    tp("syscalls", "sys_enter_connect", &[FD]),
    tp("syscalls", "sys_exit_connect", &[RET]),
    tp("syscalls", "sys_enter_close", &[FD]),
    tp("syscalls", "sys_enter_read", &[FD, READ_BUF]),
    tp("syscalls", "sys_exit_read", &[RET]),
    tp("syscalls", "sys_enter_readv", &[FD, READV_VEC, READV_VLEN]),
    tp("syscalls", "sys_exit_readv", &[RET]),
    tp("syscalls", "sys_enter_recvfrom", &[FD, RECVFROM_BUF, RECVFROM_FLAGS]),
    tp("syscalls", "sys_exit_recvfrom", &[RET]),
    tp("syscalls", "sys_enter_recvmsg", &[FD, RECVMSG_MSG, RECVMSG_FLAGS]),
    tp("syscalls", "sys_exit_recvmsg", &[RET]),
    tp("syscalls", "sys_enter_write", &[FD, WRITE_BUF]),
    tp("syscalls", "sys_exit_write", &[RET]),
    tp("syscalls", "sys_enter_writev", &[FD, WRITEV_VEC, WRITEV_VLEN]),
    tp("syscalls", "sys_exit_writev", &[RET]),
    tp("syscalls", "sys_enter_sendto", &[FD, SENDTO_BUF]),
    tp("syscalls", "sys_exit_sendto", &[RET]),
    tp("syscalls", "sys_enter_sendmsg", &[FD, SENDMSG_MSG]),
    tp("syscalls", "sys_exit_sendmsg", &[RET]),
    tp("syscalls", "sys_enter_sendfile64", &[SENDFILE_OUT_FD]),
    tp("syscalls", "sys_exit_sendfile64", &[RET]),
    tp("syscalls", "sys_enter_epoll_wait", &[EPOLL_TIMEOUT]),
    tp("syscalls", "sys_exit_epoll_wait", &[]),
    tp("syscalls", "sys_enter_epoll_pwait", &[EPOLL_TIMEOUT]),
    tp("syscalls", "sys_exit_epoll_pwait", &[]),
    tp("syscalls", "sys_enter_epoll_pwait2", &[EPOLL_TIMEOUT]),
    tp("syscalls", "sys_exit_epoll_pwait2", &[]),
    tp("syscalls", "sys_enter_poll", &[POLL_TIMEOUT]),
    tp("syscalls", "sys_exit_poll", &[]),
    tp("syscalls", "sys_enter_ppoll", &[PPOLL_TSP]),
    tp("syscalls", "sys_exit_ppoll", &[]),
    tp("syscalls", "sys_enter_select", &[SELECT_TVP]),
    tp("syscalls", "sys_exit_select", &[]),
    tp("syscalls", "sys_enter_pselect6", &[PSELECT_TSP]),
    tp("syscalls", "sys_exit_pselect6", &[]),
];
