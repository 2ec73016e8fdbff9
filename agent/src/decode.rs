//! Raw ring-buffer records → typed events. Every length is checked; nothing here panics.
use agent_common::{DataEvent, EventHeader, GoEvent, MAX_CAPTURE, SockEvent, kind};

/// One decoded record, borrowing its payload from the raw bytes.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    Data {
        header: EventHeader,
        flags: u32,
        /// The thread's loop epoch and wait deadline (see `DataEvent::epoch`).
        lp: LoopStamp,
        /// The Go goroutine that made the syscall (0: not known, see `DataEvent::goroutine`).
        goroutine: u64,
        payload: &'a [u8],
    },
    /// A thread connect()ed a TCP socket (fd, socket and thread in the header).
    Connect {
        header: EventHeader,
        lp: LoopStamp,
    },
    Close(SockEvent),
    TcpState(SockEvent),
    /// A Go program's runtime or `net/http` hook fired (see `agent_common::go_op`).
    Go(GoEvent),
}

impl Event<'_> {
    pub fn header(&self) -> &EventHeader {
        match self {
            Event::Data { header, .. } | Event::Connect { header, .. } => header,
            Event::Close(s) | Event::TcpState(s) => &s.header,
            Event::Go(g) => &g.header,
        }
    }
}

/// Where in its event loop a thread was at a syscall (see `DataEvent::epoch`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoopStamp {
    /// 0: not a loop thread.
    pub epoch: u64,
    pub wait_deadline_ns: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {len} bytes is shorter than its header")]
    Short { len: usize },
    #[error("unknown event kind {kind}")]
    UnknownKind { kind: u8 },
    #[error("data record claims {captured} payload bytes but carries {available}")]
    BadPayloadLen { captured: usize, available: usize },
}

impl DecodeError {
    /// Low-cardinality labels for metrics, by [`Self::index`].
    pub const REASONS: [&'static str; 3] = ["short", "unknown_kind", "bad_payload_len"];

    pub fn index(&self) -> usize {
        match self {
            DecodeError::Short { .. } => 0,
            DecodeError::UnknownKind { .. } => 1,
            DecodeError::BadPayloadLen { .. } => 2,
        }
    }

    /// Low-cardinality label for metrics.
    pub fn reason(&self) -> &'static str {
        Self::REASONS[self.index()]
    }
}

fn read<T: Copy>(b: &[u8]) -> Option<T> {
    if b.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: length checked; T is a plain #[repr(C)] type valid for any bit pattern (Pod).
    Some(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<T>()) })
}

pub fn decode(record: &[u8]) -> Result<Event<'_>, DecodeError> {
    let header: EventHeader = read(record).ok_or(DecodeError::Short { len: record.len() })?;
    match header.kind {
        kind::DATA | kind::CONNECT => {
            if record.len() < DataEvent::HEADER_LEN {
                return Err(DecodeError::Short { len: record.len() });
            }
            let hl = size_of::<EventHeader>();
            let word = |at: usize| u32::from_ne_bytes([record[at], record[at + 1], record[at + 2], record[at + 3]]);
            let dword = |at: usize| u64::from(word(at)) | (u64::from(word(at + 4)) << 32);
            let (captured, flags) = (word(hl) as usize, word(hl + 4));
            let lp = LoopStamp {
                epoch: dword(hl + 8),
                wait_deadline_ns: dword(hl + 16),
            };
            let goroutine = dword(hl + 24);
            if header.kind == kind::CONNECT {
                return Ok(Event::Connect { header, lp });
            }
            let available = record.len() - DataEvent::HEADER_LEN;
            if captured > available || captured > MAX_CAPTURE {
                return Err(DecodeError::BadPayloadLen { captured, available });
            }
            Ok(Event::Data {
                header,
                flags,
                lp,
                goroutine,
                payload: &record[DataEvent::HEADER_LEN..DataEvent::HEADER_LEN + captured],
            })
        }
        kind::CLOSE => Ok(Event::Close(
            read(record).ok_or(DecodeError::Short { len: record.len() })?,
        )),
        kind::TCP_STATE => Ok(Event::TcpState(
            read(record).ok_or(DecodeError::Short { len: record.len() })?,
        )),
        kind::GO => Ok(Event::Go(read(record).ok_or(DecodeError::Short { len: record.len() })?)),
        other => Err(DecodeError::UnknownKind { kind: other }),
    }
}

/// Encodes a data (or connect) event the way the kernel sends it (for recordings, tests and
/// benchmarks).
pub fn encode_data(header: &EventHeader, flags: u32, lp: LoopStamp, goroutine: u64, payload: &[u8], out: &mut Vec<u8>) {
    let payload = &payload[..payload.len().min(MAX_CAPTURE)];
    // SAFETY: EventHeader is plain #[repr(C)] data without padding.
    let hb =
        unsafe { std::slice::from_raw_parts((header as *const EventHeader).cast::<u8>(), size_of::<EventHeader>()) };
    out.extend_from_slice(hb);
    out.extend_from_slice(&(payload.len() as u32).to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&lp.epoch.to_ne_bytes());
    out.extend_from_slice(&lp.wait_deadline_ns.to_ne_bytes());
    out.extend_from_slice(&goroutine.to_ne_bytes());
    out.extend_from_slice(payload);
}

/// Encodes a Go hook's record the way the kernel sends it.
pub fn encode_go(ev: &GoEvent, out: &mut Vec<u8>) {
    // SAFETY: GoEvent is plain #[repr(C)] data without padding.
    let b = unsafe { std::slice::from_raw_parts((ev as *const GoEvent).cast::<u8>(), size_of::<GoEvent>()) };
    out.extend_from_slice(b);
}

/// Encodes a socket event the way the kernel sends it.
pub fn encode_sock(ev: &SockEvent, out: &mut Vec<u8>) {
    // SAFETY: SockEvent is plain #[repr(C)] data without padding.
    let b = unsafe { std::slice::from_raw_parts((ev as *const SockEvent).cast::<u8>(), size_of::<SockEvent>()) };
    out.extend_from_slice(b);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_round_trip() {
        let h = EventHeader {
            kind: kind::DATA,
            pid: 7,
            tid: 8,
            fd: 3,
            sock: 99,
            bytes: 5,
            ..Default::default()
        };
        let mut buf = Vec::new();
        let lp = LoopStamp {
            epoch: 42,
            wait_deadline_ns: 7,
        };
        encode_data(&h, 0, lp, 0xc000_0001, b"hello", &mut buf);
        match decode(&buf).unwrap() {
            Event::Data {
                header,
                payload,
                lp: got,
                goroutine,
                ..
            } => {
                assert_eq!(header, h);
                assert_eq!(got, lp);
                assert_eq!(goroutine, 0xc000_0001);
                assert_eq!(payload, b"hello");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn sock_round_trip() {
        let ev = SockEvent {
            header: EventHeader {
                kind: kind::TCP_STATE,
                sock: 5,
                ..Default::default()
            },
            local_port: 80,
            ..Default::default()
        };
        let mut buf = Vec::new();
        encode_sock(&ev, &mut buf);
        assert!(matches!(decode(&buf), Ok(Event::TcpState(e)) if e == ev));
        let go = agent_common::GoEvent {
            header: EventHeader {
                kind: kind::GO,
                pid: 3,
                ..Default::default()
            },
            op: agent_common::go_op::SPAWN,
            a: 1,
            b: 2,
            ..Default::default()
        };
        buf.clear();
        encode_go(&go, &mut buf);
        assert!(matches!(decode(&buf), Ok(Event::Go(e)) if e == go));
        assert_eq!(decode(&buf[..70]).unwrap_err().reason(), "short");
    }

    #[test]
    fn rejects_bad_records() {
        assert_eq!(decode(&[1, 2, 3]).unwrap_err().reason(), "short");
        let mut buf = Vec::new();
        encode_data(
            &EventHeader {
                kind: kind::DATA,
                ..Default::default()
            },
            0,
            LoopStamp::default(),
            0,
            b"abc",
            &mut buf,
        );
        buf.truncate(buf.len() - 1);
        assert_eq!(decode(&buf).unwrap_err().reason(), "bad_payload_len");
        let mut buf = vec![0u8; 64];
        buf[0] = 200;
        assert_eq!(decode(&buf).unwrap_err().reason(), "unknown_kind");
    }
}
