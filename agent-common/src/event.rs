//! Event records sent through the `EVENTS` ring buffer.
//!
//! Each record starts with [`EventHeader`] whose first byte is the kind. A data record is sent
//! with only `captured_len` payload bytes (the ring holds variable-size records), so userspace
//! must bounds-check `captured_len` against the record length it received.

/// Upper bound of payload bytes copied per syscall (the kernel's scratch buffer size).
pub const MAX_CAPTURE: usize = 8192;
/// Bytes of one request-carrying syscall (a server's read, a client's write) captured whole, in
/// records of up to [`MAX_CAPTURE`] bytes: pipelined requests sharing one large read or write
/// are all seen. Other calls (responses) get one record of the capture setting's size, as
/// bodies are skipped by length.
pub const REQUEST_CAPTURE_MAX: usize = 64 * 1024;
/// iovecs of one readv/writev/recvmsg/sendmsg whose bytes are captured.
pub const MAX_IOVECS: usize = 8;

/// Event kinds (grouped in ranges, gaps left for growth).
pub mod kind {
    /// Bytes moved through a TCP socket by one syscall: [`super::DataEvent`].
    pub const DATA: u8 = 1;
    /// A process connect()ed a TCP socket: a [`super::DataEvent`] with no payload, so userspace
    /// learns which thread opened the connection, and in which loop epoch.
    pub const CONNECT: u8 = 2;
    /// A Go program's runtime or `net/http` did something syscalls do not show (uprobes):
    /// [`super::GoEvent`].
    pub const GO: u8 = 3;
    /// A traced TCP socket's fd was closed by its process: [`super::SockEvent`].
    pub const CLOSE: u8 = 10;
    /// A TCP socket changed state (ESTABLISHED or CLOSE): [`super::SockEvent`].
    pub const TCP_STATE: u8 = 20;
}

/// Direction of a data event, seen from the traced process.
pub mod direction {
    /// The process wrote bytes to the socket.
    pub const EGRESS: u8 = 1;
    /// The process read bytes from the socket.
    pub const INGRESS: u8 = 2;
}

/// How the process came to hold the socket fd, as the kernel saw it.
pub mod side {
    /// Opened before the agent started (or not seen): userspace infers the side.
    pub const UNKNOWN: u8 = 0;
    /// Returned by accept/accept4: the process is the server of this connection.
    pub const ACCEPTED: u8 = 1;
    /// Passed to a successful (or in-progress) connect: the process is the client.
    pub const CONNECTED: u8 = 2;
}

/// Syscall that produced a data event (for diagnostics and tests).
pub mod syscall {
    pub const READ: u8 = 1;
    pub const READV: u8 = 2;
    pub const RECVFROM: u8 = 3;
    pub const RECVMSG: u8 = 4;
    pub const WRITE: u8 = 11;
    pub const WRITEV: u8 = 12;
    pub const SENDTO: u8 = 13;
    pub const SENDMSG: u8 = 14;
    pub const SENDFILE: u8 = 15;
    pub const CLOSE: u8 = 20;
}

/// TCP states as the kernel numbers them (include/net/tcp_states.h).
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const CLOSE: u8 = 7;
    pub const LISTEN: u8 = 10;
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Common header of every record. Field order keeps every field naturally aligned with no
/// implicit padding (64 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// One of [`kind`].
    pub kind: u8,
    /// One of [`direction`] (data events), else 0.
    pub direction: u8,
    /// One of [`syscall`] (data and close events), else 0.
    pub syscall: u8,
    /// One of [`side`]: what the kernel knows of how the fd was obtained.
    pub side: u8,
    /// Process id (the kernel's tgid).
    pub pid: u32,
    /// Thread id (the kernel's pid).
    pub tid: u32,
    /// File descriptor in `pid` (-1 when not tied to an fd, e.g. TCP state changes).
    pub fd: i32,
    /// Opaque socket identity (the kernel socket's address). Stable while the socket lives.
    pub sock: u64,
    /// Monotonic (CLOCK_MONOTONIC) time at syscall entry, ns.
    pub ts_enter_ns: u64,
    /// Monotonic time at syscall exit, ns (equal to entry for instantaneous events).
    pub ts_exit_ns: u64,
    /// Syscall return value: bytes moved (data), 0 at end of stream.
    pub bytes: i64,
    /// Thread name (`comm`), NUL padded: the fallback service name for short-lived processes.
    pub comm: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<EventHeader>() == 64);
const _: () = assert!(core::mem::align_of::<EventHeader>() == 8);

/// One syscall's bytes on a TCP socket. Sent truncated to `HEADER_LEN + captured_len` bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DataEvent {
    pub header: EventHeader,
    /// Valid bytes at the start of `payload` (≤ `header.bytes`, ≤ the capture setting).
    pub captured_len: u32,
    /// recv flags from the socket layer (e.g. MSG_PEEK), 0 for sends.
    pub flags: u32,
    /// The thread's loop epoch at this syscall: 0 for a thread never seen waiting in
    /// epoll/poll/select, else a per-thread count bumped at each such wait's end and at each
    /// read of data from anything but a TCP socket (a pipe, an eventfd, a unix socket). Two
    /// events of a thread with the same epoch ran in one stretch of that thread's event loop
    /// with no input in between that userspace cannot see.
    pub epoch: u64,
    /// When the wait that began this epoch would have timed out (monotonic ns; `u64::MAX`: it
    /// would not, 0: not a loop thread). A loop computes that timeout from its nearest timer, so
    /// none of its timer callbacks runs before this time.
    pub wait_deadline_ns: u64,
    /// The Go goroutine (its `g` pointer) that made the syscall, in processes whose Go hooks
    /// are attached; else 0.
    pub goroutine: u64,
    /// The first bytes the syscall moved, in stream order (across iovecs).
    pub payload: [u8; MAX_CAPTURE],
}
impl DataEvent {
    /// Bytes before the payload.
    pub const HEADER_LEN: usize = core::mem::size_of::<EventHeader>() + 32;
}
const _: () = assert!(core::mem::size_of::<DataEvent>() == DataEvent::HEADER_LEN + MAX_CAPTURE);

/// Socket-level record (close, TCP state change). Addresses in network byte order, IPv4 in the
/// first 4 bytes; ports in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockEvent {
    pub header: EventHeader,
    /// [`AF_INET`] or [`AF_INET6`] (0 when unknown, e.g. close).
    pub family: u16,
    pub local_port: u16,
    pub remote_port: u16,
    /// Previous and new TCP state ([`tcp_state`]), TCP_STATE events only.
    pub old_state: u8,
    pub new_state: u8,
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<SockEvent>() == 64 + 8 + 32);

/// What a [`GoEvent`] reports. Goroutines are named by their `g` pointer (the runtime reuses a
/// `g` only for a goroutine it creates again, which a new [`go_op::SPAWN`] reports).
pub mod go_op {
    /// `runtime.newproc1` returned: goroutine `a` created goroutine `b`.
    pub const SPAWN: u8 = 1;
    /// `net/http.(*persistConn).roundTrip` began: goroutine `a` asks for request `b` (a
    /// `*http.Request`), which the pooled connection's write loop goroutine then writes.
    pub const ROUND_TRIP: u8 = 2;
    /// `net/http.(*Request).write` began: goroutine `a` writes request `b` (a `*http.Request`).
    pub const REQUEST_WRITE: u8 = 3;
}

/// One Go runtime or `net/http` hook's report (`kind::GO`), see [`go_op`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GoEvent {
    pub header: EventHeader,
    /// One of [`go_op`].
    pub op: u8,
    pub _pad: [u8; 7],
    pub a: u64,
    pub b: u64,
}
const _: () = assert!(core::mem::size_of::<GoEvent>() == 64 + 24);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` data, no padding bytes, every bit pattern valid.
    unsafe impl aya::Pod for super::EventHeader {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DataEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::GoEvent {}
}
