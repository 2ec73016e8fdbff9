//! Arbitrary bytes as one kernel ring-buffer record. Decoding never panics, and what it decodes
//! encodes back to the record's own bytes (the payload exactly as long as the record says).
#![no_main]

use agent_common::{DataEvent, GoEvent, SockEvent};
use libfuzzer_sys::fuzz_target;
use sockspan::decode::{Event, decode, encode_data, encode_go, encode_sock};

fuzz_target!(|data: &[u8]| {
    let Ok(ev) = decode(data) else { return };
    let mut back = Vec::new();
    match ev {
        Event::Data {
            header,
            flags,
            lp,
            goroutine,
            payload,
        } => {
            assert_eq!(header.kind, data[0]);
            encode_data(&header, flags, lp, goroutine, payload, &mut back);
            assert_eq!(back, data[..DataEvent::HEADER_LEN + payload.len()]);
        }
        Event::Connect { header, lp } => {
            // A connect record carries no payload: everything but its length field round-trips.
            encode_data(&header, 0, lp, 0, &[], &mut back);
            let hl = size_of_val(&header);
            assert_eq!(back[..hl], data[..hl]);
            assert_eq!(back[hl + 8..hl + 24], data[hl + 8..hl + 24]);
        }
        Event::Close(s) | Event::TcpState(s) => {
            encode_sock(&s, &mut back);
            assert_eq!(back, data[..size_of::<SockEvent>()]);
        }
        Event::Go(g) => {
            encode_go(&g, &mut back);
            assert_eq!(back, data[..size_of::<GoEvent>()]);
        }
    }
    assert_eq!(ev.header().kind, data[0]);
});
