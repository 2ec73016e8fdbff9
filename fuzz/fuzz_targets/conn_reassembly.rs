//! The connection table driven by arbitrary data, close, TCP state, connect, Go and tick events
//! on four fds of two processes (fd reuse, unknown sides, end of stream, loop threads included).
//! Each request reported started comes out as exactly one exchange, none comes out twice, an
//! answer is only ever for a started request, and at shutdown nothing is left behind.
#![no_main]

use std::collections::BTreeSet;

use agent_common::{EventHeader, GoEvent, kind};
use libfuzzer_sys::fuzz_target;
use sockspan::{
    conn::{ConnOutput, ConnTable},
    decode::{Event, LoopStamp},
};
use sockspan_fuzz::{
    CONN_CLOSE, CONN_CONNECT, CONN_STATE, CONN_TICK, F_GOROUTINE, F_LOOP, Reader, conn_slot, data_header, gap_from,
    sock_event,
};

fuzz_target!(|data: &[u8]| {
    let mut r = Reader(data);
    let mut table = ConnTable::without_proc();
    let mut out = Vec::new();
    let mut books = Books::default();
    let mut now = 1_000_000_000u64;
    while let Some(op) = r.u8() {
        let slot = (op >> 3) & 3;
        let (pid, fd, sock) = conn_slot(slot);
        now += 10_000;
        match op & 7 {
            0..=3 => {
                let flags = r.u8().unwrap_or(0);
                let Some(len) = r.u16() else { break };
                let captured = r.bytes(usize::from(len).min(agent_common::MAX_CAPTURE));
                let g = r.u8().unwrap_or(0);
                // An empty capture with no gap is the end of the peer's stream (0 bytes read).
                let total = (captured.len() as u64).saturating_add(gap_from(g)).min(i64::MAX as u64);
                let tid = pid * 100 + u32::from(op >> 5);
                let h = data_header(slot, flags, total as i64, now, tid);
                let lp = if flags & F_LOOP != 0 {
                    LoopStamp {
                        epoch: 1 + u64::from(op >> 5),
                        wait_deadline_ns: now + 1_000_000,
                    }
                } else {
                    LoopStamp::default()
                };
                let goroutine = if flags & F_GOROUTINE != 0 {
                    0xc000_0000 + u64::from(tid)
                } else {
                    0
                };
                let ev = Event::Data {
                    header: h,
                    flags: 0,
                    lp,
                    goroutine,
                    payload: captured,
                };
                table.on_event(&ev, &mut out);
            }
            CONN_CLOSE => {
                let mut ev = sock_event(sock, now, false, false, 0, 0);
                ev.header.kind = kind::CLOSE;
                ev.header.pid = pid;
                ev.header.tid = pid;
                ev.header.fd = fd;
                table.on_event(&Event::Close(ev), &mut out);
            }
            CONN_STATE => {
                let variant = r.u8().unwrap_or(0);
                let (lp, rp) = (r.u16().unwrap_or(0), r.u16().unwrap_or(0));
                let sock = if variant & 4 != 0 { sock + 1 } else { sock };
                let mut ev = sock_event(sock, now, variant & 1 == 0, variant & 2 != 0, lp, rp);
                if variant & 8 != 0 {
                    // The kernel sets pid on the agent's own sockets only.
                    ev.header.pid = std::process::id();
                }
                table.on_event(&Event::TcpState(ev), &mut out);
            }
            CONN_CONNECT if op & 0x20 == 0 => {
                let header = EventHeader {
                    kind: kind::CONNECT,
                    side: agent_common::side::CONNECTED,
                    pid,
                    tid: pid * 100,
                    fd,
                    sock,
                    ts_enter_ns: now,
                    ts_exit_ns: now,
                    ..Default::default()
                };
                let lp = LoopStamp {
                    epoch: u64::from(op >> 6),
                    wait_deadline_ns: now + 1_000_000,
                };
                table.on_event(&Event::Connect { header, lp }, &mut out);
            }
            CONN_CONNECT => {
                let (g_op, a, b) = (r.u8().unwrap_or(0) % 4, r.u8().unwrap_or(0), r.u8().unwrap_or(0));
                let ev = GoEvent {
                    header: EventHeader {
                        kind: kind::GO,
                        pid,
                        tid: pid * 100 + u32::from(op >> 6),
                        fd: -1,
                        ts_enter_ns: now,
                        ts_exit_ns: now,
                        ..Default::default()
                    },
                    op: g_op,
                    a: 0xc000_0000 + u64::from(a),
                    b: 0xc000_0000 + u64::from(b),
                    ..Default::default()
                };
                table.on_event(&Event::Go(ev), &mut out);
            }
            CONN_TICK => {
                now += u64::from(r.u8().unwrap_or(0)) * 2_000_000_000;
                table.tick(now, 1_000_000_000, 300_000_000_000, &mut out);
            }
            _ => unreachable!(),
        }
        books.take(&mut out, table.http_stats.started_overflow);
    }
    table.close_all(&mut out);
    books.take(&mut out, table.http_stats.started_overflow);
    assert!(table.is_empty(), "connections left after close_all");
    if table.http_stats.started_overflow == 0 {
        assert!(
            books.open.is_empty(),
            "requests started and never ended: {:?}",
            books.open
        );
    }
});

#[derive(Default)]
struct Books {
    /// (connection, request) started and not yet ended.
    open: BTreeSet<(u64, u64)>,
    ended: BTreeSet<(u64, u64)>,
}

impl Books {
    fn take(&mut self, out: &mut Vec<ConnOutput>, started_overflow: u64) {
        for o in out.drain(..) {
            match o {
                ConnOutput::Started(s) => {
                    let key = (s.facts.conn_id, s.request.seq);
                    assert!(!self.ended.contains(&key), "{key:?} started after it ended");
                    assert!(self.open.insert(key), "{key:?} started twice");
                }
                ConnOutput::Answering { conn_id, seq, .. } => {
                    let key = (conn_id, seq);
                    assert!(
                        self.open.contains(&key) || self.ended.contains(&key) || started_overflow > 0,
                        "answering {key:?}, never started"
                    );
                }
                ConnOutput::Exchange(x) => {
                    let key = (x.facts.conn_id, x.exchange.request.seq);
                    assert!(self.ended.insert(key), "{key:?} ended twice");
                    assert!(
                        self.open.remove(&key) || started_overflow > 0,
                        "{key:?} ended, never started"
                    );
                    assert!(
                        x.end_ns() >= x.exchange.request.first_ns,
                        "{key:?} ends before it starts"
                    );
                }
                ConnOutput::LoopConfirmed { .. } => {}
            }
        }
    }
}
