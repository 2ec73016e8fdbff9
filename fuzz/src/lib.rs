//! Input formats of the fuzz targets: how raw fuzzer bytes become chunks, events and record
//! streams, and the encoders that turn recordings and hand-written samples into seed inputs
//! (`gen_corpus`). Every decoder accepts any byte string (it stops at the end of the input).
use agent_common::{AF_INET, AF_INET6, EventHeader, SockEvent, direction, kind, side, syscall, tcp_state};
use sockspan::decode::{LoopStamp, encode_data, encode_sock};

/// Reads fields off the front of the fuzzer's input; reads past the end yield nothing.
pub struct Reader<'a>(pub &'a [u8]);

impl<'a> Reader<'a> {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    pub fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.u8()?, self.u8()?]))
    }
    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (b, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        b
    }
}

/// Bytes past the captured prefix, from one input byte: small gaps byte by byte, then powers of
/// two up to 2^55 (and 0: no gap).
pub fn gap_from(g: u8) -> u64 {
    match g {
        0..=200 => u64::from(g),
        _ => 1u64 << (g - 200),
    }
}

// ---------------------------------------------------------------------------------------------
// http_parser: `mode` byte, then ops. Op byte: low 3 bits the kind, high bits the thread id.
//   0..=2 request chunk, 3..=5 response chunk: u16 length, that many captured bytes, gap byte
//   6 close, 7 flush_idle after some idle time (next byte: seconds)

pub const HTTP_REQ: u8 = 0;
pub const HTTP_RESP: u8 = 3;
pub const HTTP_CLOSE: u8 = 6;
pub const HTTP_IDLE: u8 = 7;

/// Encodes one chunk op of the http_parser format.
pub fn http_chunk(out: &mut Vec<u8>, request: bool, captured: &[u8], gap: u8) {
    out.push(if request { HTTP_REQ } else { HTTP_RESP });
    let n = captured.len().min(u16::MAX as usize);
    out.extend_from_slice(&(n as u16).to_le_bytes());
    out.extend_from_slice(&captured[..n]);
    out.push(gap);
}

// ---------------------------------------------------------------------------------------------
// conn_reassembly: ops on 4 fd slots (slot i: pid 1 + i % 2, fd 10 + i). Op byte: low 3 bits
// the kind, the rest the slot and variants.
//   0..=3 data: flags byte, u16 length, captured bytes, gap byte
//   4 close, 5 TCP state change (ports, family), 6 connect, 7 tick (next byte: seconds)

pub const CONN_DATA: u8 = 0;
pub const CONN_CLOSE: u8 = 4;
pub const CONN_STATE: u8 = 5;
pub const CONN_CONNECT: u8 = 6;
pub const CONN_TICK: u8 = 7;

/// Data flags byte of the conn_reassembly format.
pub const F_EGRESS: u8 = 1;
/// The fd's side as the kernel knows it: bits 1-2 (0 unknown, 1 accepted, 2 connected).
pub const F_SIDE_SHIFT: u8 = 1;
/// Another socket behind the same fd (fd reuse).
pub const F_OTHER_SOCK: u8 = 8;
/// A loop thread's event (epoch from the op).
pub const F_LOOP: u8 = 16;
/// A Go goroutine made the syscall.
pub const F_GOROUTINE: u8 = 32;

pub fn conn_slot(slot: u8) -> (u32, i32, u64) {
    let slot = slot % 4;
    (
        1 + u32::from(slot % 2),
        10 + i32::from(slot),
        0x1000 * (u64::from(slot) + 1),
    )
}

/// Encodes one data op of the conn_reassembly format.
pub fn conn_data(out: &mut Vec<u8>, slot: u8, flags: u8, captured: &[u8], gap: u8) {
    out.push(CONN_DATA | (slot % 4) << 3);
    out.push(flags);
    let n = captured.len().min(u16::MAX as usize);
    out.extend_from_slice(&(n as u16).to_le_bytes());
    out.extend_from_slice(&captured[..n]);
    out.push(gap);
}

/// A TCP state change record of a slot's socket (ESTABLISHED or CLOSE), loopback addresses.
pub fn sock_event(sock: u64, ts: u64, established: bool, v6: bool, local_port: u16, remote_port: u16) -> SockEvent {
    let mut addr = [0u8; 16];
    if v6 {
        addr[15] = 1;
    } else {
        addr[..4].copy_from_slice(&[127, 0, 0, 1]);
    }
    SockEvent {
        header: EventHeader {
            kind: kind::TCP_STATE,
            fd: -1,
            sock,
            ts_enter_ns: ts,
            ts_exit_ns: ts,
            ..Default::default()
        },
        family: if v6 { AF_INET6 } else { AF_INET },
        local_port,
        remote_port,
        old_state: tcp_state::SYN_SENT,
        new_state: if established {
            tcp_state::ESTABLISHED
        } else {
            tcp_state::CLOSE
        },
        local_addr: addr,
        remote_addr: addr,
    }
}

/// The data header of a conn_reassembly data op.
pub fn data_header(slot: u8, flags: u8, total: i64, ts: u64, tid: u32) -> EventHeader {
    let (pid, fd, sock) = conn_slot(slot);
    EventHeader {
        kind: kind::DATA,
        direction: if flags & F_EGRESS != 0 {
            direction::EGRESS
        } else {
            direction::INGRESS
        },
        syscall: if flags & F_EGRESS != 0 {
            syscall::WRITE
        } else {
            syscall::READ
        },
        side: match (flags >> F_SIDE_SHIFT) & 3 {
            1 => side::ACCEPTED,
            2 => side::CONNECTED,
            _ => side::UNKNOWN,
        },
        pid,
        tid,
        fd,
        sock: if flags & F_OTHER_SOCK != 0 { sock + 1 } else { sock },
        ts_enter_ns: ts,
        ts_exit_ns: ts + 1_000,
        bytes: total,
        comm: *b"fuzz\0\0\0\0\0\0\0\0\0\0\0\0",
    }
}

// ---------------------------------------------------------------------------------------------
// pipeline: raw kernel records, each `u16 LE length` + bytes, through `Processor` as a replay
// does. Two lengths are ops: `TICK` (next byte: seconds of idle after the latest event) and
// `BATCH` (the records so far form one batch).

pub const REC_TICK: u16 = 0xffff;
pub const REC_BATCH: u16 = 0xfffe;

pub fn push_record(out: &mut Vec<u8>, record: &[u8]) {
    let n = record.len().min(usize::from(REC_BATCH) - 1);
    out.extend_from_slice(&(n as u16).to_le_bytes());
    out.extend_from_slice(&record[..n]);
}

/// A data record as the kernel sends it (for seeds).
pub fn data_record(header: &EventHeader, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    encode_data(header, 0, LoopStamp::default(), 0, payload, &mut v);
    v
}

/// A socket record as the kernel sends it (for seeds).
pub fn sock_record(ev: &SockEvent) -> Vec<u8> {
    let mut v = Vec::new();
    encode_sock(ev, &mut v);
    v
}
