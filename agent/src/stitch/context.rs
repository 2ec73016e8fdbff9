//! Trace context a request already carries: W3C `traceparent` and B3 (single and multi header).
use crate::http::Propagation;

/// Where an incoming context came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextFormat {
    W3c,
    B3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PropagatedContext {
    pub trace_id: [u8; 16],
    /// The caller's span: the parent of a server span that receives this context.
    pub span_id: [u8; 8],
    /// The caller's sampling decision, when the context states one.
    pub sampled: Option<bool>,
    pub format: ContextFormat,
}

/// The context in a request's headers, W3C first. Invalid or all-zero ids are ignored.
pub fn extract(req: &Propagation) -> Option<PropagatedContext> {
    req.traceparent.as_deref().and_then(parse_traceparent).or_else(|| {
        req.b3.as_deref().and_then(parse_b3_single).or_else(|| {
            let trace = req.x_b3_trace_id.as_deref().and_then(parse_trace_id)?;
            let span = req.x_b3_span_id.as_deref().and_then(parse_span_id)?;
            Some(PropagatedContext {
                trace_id: trace,
                span_id: span,
                sampled: req.x_b3_sampled.as_deref().and_then(b3_sampled),
                format: ContextFormat::B3,
            })
        })
    })
}

/// `00-<32 hex trace>-<16 hex parent>-<2 hex flags>` (future versions: same prefix).
pub fn parse_traceparent(v: &str) -> Option<PropagatedContext> {
    let mut parts = v.trim().split('-');
    let version = parts.next()?;
    if version.len() != 2 || version.eq_ignore_ascii_case("ff") || !version.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let trace = parts.next().filter(|t| t.len() == 32).and_then(parse_trace_id)?;
    let span = parts.next().filter(|s| s.len() == 16).and_then(parse_span_id)?;
    let flags = parts.next()?;
    if flags.len() != 2 || !flags.bytes().all(|b| b.is_ascii_hexdigit()) || (version == "00" && parts.next().is_some())
    {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(PropagatedContext {
        trace_id: trace,
        span_id: span,
        sampled: Some(flags & 1 == 1),
        format: ContextFormat::W3c,
    })
}

/// `b3: {trace}-{span}[-{sampled}[-{parent}]]`; a lone sampling flag carries no context.
pub fn parse_b3_single(v: &str) -> Option<PropagatedContext> {
    let mut parts = v.trim().split('-');
    let trace = parts.next().and_then(parse_trace_id)?;
    let span = parts.next().filter(|s| s.len() == 16).and_then(parse_span_id)?;
    Some(PropagatedContext {
        trace_id: trace,
        span_id: span,
        sampled: parts.next().and_then(b3_sampled),
        format: ContextFormat::B3,
    })
}

/// B3's sampling state: `1` (or `d`, debug, or `true`) keeps, `0` (or `false`) drops.
fn b3_sampled(v: &str) -> Option<bool> {
    match v.trim() {
        "1" | "d" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

/// 32 hex digits, or 16 (B3's 64-bit ids, left-padded with zeros); never all zero.
fn parse_trace_id(s: &str) -> Option<[u8; 16]> {
    let s = s.trim();
    let mut id = [0u8; 16];
    match s.len() {
        32 => hex_into(s, &mut id)?,
        16 => hex_into(s, &mut id[8..])?,
        _ => return None,
    }
    (id != [0; 16]).then_some(id)
}

fn parse_span_id(s: &str) -> Option<[u8; 8]> {
    let mut id = [0u8; 8];
    if s.trim().len() != 16 {
        return None;
    }
    hex_into(s.trim(), &mut id)?;
    (id != [0; 8]).then_some(id)
}

fn hex_into(s: &str, out: &mut [u8]) -> Option<()> {
    let b = s.as_bytes();
    if b.len() != out.len() * 2 {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        let hi = (b[2 * i] as char).to_digit(16)?;
        let lo = (b[2 * i + 1] as char).to_digit(16)?;
        *o = (hi * 16 + lo) as u8;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_cases() {
        let ok = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(ok.trace_id[0], 0x4b);
        assert_eq!(ok.span_id[7], 0xb7);
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "garbage",
            "",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
        assert!(parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future").is_some());
    }

    #[test]
    fn sampling_flags() {
        let tp =
            |flags: &str| parse_traceparent(&format!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{flags}"));
        assert_eq!(tp("01").unwrap().sampled, Some(true));
        assert_eq!(tp("00").unwrap().sampled, Some(false));
        assert_eq!(tp("03").unwrap().sampled, Some(true), "other bits do not matter");
        let b3 = |v: &str| parse_b3_single(v).unwrap().sampled;
        assert_eq!(b3("64fe8b2a57d3eff7-e457b5a2e4d86bd1-0"), Some(false));
        assert_eq!(b3("64fe8b2a57d3eff7-e457b5a2e4d86bd1-d"), Some(true));
        assert_eq!(
            b3("64fe8b2a57d3eff7-e457b5a2e4d86bd1"),
            None,
            "deferred: the sampler decides"
        );
    }

    #[test]
    fn b3_cases() {
        let c = parse_b3_single("80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90").unwrap();
        assert_eq!(c.format, ContextFormat::B3);
        let short = parse_b3_single("64fe8b2a57d3eff7-e457b5a2e4d86bd1-1").unwrap();
        assert_eq!(&short.trace_id[..8], &[0; 8]);
        assert!(parse_b3_single("1").is_none());
        assert!(parse_b3_single("0").is_none());
    }
}
