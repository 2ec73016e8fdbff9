//! Message body framing: skip a body by length (Content-Length), by chunked framing, or until
//! the connection closes. Only lengths are tracked; body bytes are never stored.

/// Longest chunk-size line (size + extensions) accepted before the framing is called bad.
pub(super) const MAX_CHUNK_LINE: usize = 4096;
/// Largest trailer section accepted after the last chunk.
pub(super) const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// How the rest of a message body is delimited, and how much of it is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Body {
    /// Content-Length: this many bytes remain (never 0 while in this state).
    Length { remaining: u64 },
    /// Transfer-Encoding: chunked.
    Chunked(Chunked),
    /// Response without a length: ends when the connection closes.
    UntilClose,
}

/// Position inside a chunked body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Chunked {
    /// Reading a chunk-size line: hex digits, then optional extensions, up to "\n".
    Size {
        value: u64,
        digits: u8,
        in_ext: bool,
        len: usize,
    },
    /// Skipping chunk data.
    Data { remaining: u64 },
    /// Expecting the "\r\n" after chunk data.
    DataEnd { seen_cr: bool },
    /// After the last (0-size) chunk: trailer lines until an empty line.
    Trailer { line_nonempty: bool, len: usize },
}

impl Chunked {
    /// Start of a chunked body: the first chunk-size line.
    pub(super) const START: Chunked = Chunked::Size {
        value: 0,
        digits: 0,
        in_ext: false,
        len: 0,
    };
}

/// What feeding bytes to a body did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// The body needs more bytes.
    More,
    /// The body's last byte was consumed.
    Done,
    /// The framing is invalid (bad chunk-size line, missing CRLF, oversized line).
    Bad,
}

/// Result of feeding captured bytes to a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Fed {
    /// Bytes of the input that belong to this body (framing included).
    pub consumed: usize,
    /// Payload bytes among them (chunk data, not chunked framing).
    pub payload: u64,
    pub outcome: Outcome,
}

/// Result of skipping a gap (bytes of known length but unknown content).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum GapOutcome {
    /// The whole gap was body; the body continues.
    More,
    /// The body ended inside the gap; `leftover` bytes of the gap follow it.
    Done { leftover: u64 },
    /// The gap covers framing bytes (chunk-size lines) that cannot be read: sync is lost.
    LostSync,
}

impl Body {
    /// Consumes a prefix of `data` belonging to this body.
    pub(super) fn feed(&mut self, data: &[u8]) -> Fed {
        match self {
            Body::Length { remaining } => {
                let n = (data.len() as u64).min(*remaining);
                *remaining -= n;
                Fed {
                    consumed: n as usize,
                    payload: n,
                    outcome: if *remaining == 0 { Outcome::Done } else { Outcome::More },
                }
            }
            Body::UntilClose => Fed {
                consumed: data.len(),
                payload: data.len() as u64,
                outcome: Outcome::More,
            },
            Body::Chunked(st) => feed_chunked(st, data),
        }
    }

    /// Skips `gap` bytes of unknown content. Returns the payload bytes skipped and the outcome.
    pub(super) fn gap(&mut self, gap: u64) -> (u64, GapOutcome) {
        if gap == 0 {
            return (0, GapOutcome::More);
        }
        match self {
            Body::Length { remaining } => {
                if gap < *remaining {
                    *remaining -= gap;
                    (gap, GapOutcome::More)
                } else {
                    let r = *remaining;
                    *remaining = 0;
                    (r, GapOutcome::Done { leftover: gap - r })
                }
            }
            Body::UntilClose => (gap, GapOutcome::More),
            Body::Chunked(st) => match *st {
                Chunked::Data { remaining } => {
                    if gap < remaining {
                        *st = Chunked::Data {
                            remaining: remaining - gap,
                        };
                        (gap, GapOutcome::More)
                    } else if gap == remaining {
                        *st = Chunked::DataEnd { seen_cr: false };
                        (gap, GapOutcome::More)
                    } else {
                        (remaining, GapOutcome::LostSync)
                    }
                }
                _ => (0, GapOutcome::LostSync),
            },
        }
    }
}

fn feed_chunked(st: &mut Chunked, data: &[u8]) -> Fed {
    let mut pos = 0usize;
    let mut payload = 0u64;
    while let Some(rest) = data.get(pos..) {
        let Some(&b) = rest.first() else { break };
        if let Chunked::Data { remaining } = *st {
            let n = (rest.len() as u64).min(remaining);
            pos += n as usize;
            payload += n;
            *st = if remaining == n {
                Chunked::DataEnd { seen_cr: false }
            } else {
                Chunked::Data {
                    remaining: remaining - n,
                }
            };
            continue;
        }
        pos += 1;
        match step(st, b) {
            Outcome::More => {}
            outcome => {
                return Fed {
                    consumed: pos,
                    payload,
                    outcome,
                };
            }
        }
    }
    Fed {
        consumed: pos,
        payload,
        outcome: Outcome::More,
    }
}

/// One byte of chunked framing (not chunk data).
fn step(st: &mut Chunked, b: u8) -> Outcome {
    match st {
        Chunked::Size {
            value,
            digits,
            in_ext,
            len,
        } => {
            *len += 1;
            if *len > MAX_CHUNK_LINE {
                return Outcome::Bad;
            }
            if b == b'\n' {
                if *digits == 0 {
                    return Outcome::Bad;
                }
                *st = if *value == 0 {
                    Chunked::Trailer {
                        line_nonempty: false,
                        len: 0,
                    }
                } else {
                    Chunked::Data { remaining: *value }
                };
                return Outcome::More;
            }
            if *in_ext {
                return Outcome::More;
            }
            if let Some(d) = hex_digit(b) {
                if *digits >= 16 {
                    return Outcome::Bad;
                }
                *value = (*value << 4) | u64::from(d);
                *digits += 1;
                Outcome::More
            } else if *digits > 0 && matches!(b, b';' | b' ' | b'\t' | b'\r') {
                *in_ext = true;
                Outcome::More
            } else {
                Outcome::Bad
            }
        }
        Chunked::DataEnd { seen_cr } => match b {
            b'\r' if !*seen_cr => {
                *seen_cr = true;
                Outcome::More
            }
            b'\n' => {
                *st = Chunked::START;
                Outcome::More
            }
            _ => Outcome::Bad,
        },
        Chunked::Trailer { line_nonempty, len } => {
            *len += 1;
            if *len > MAX_TRAILER_BYTES {
                return Outcome::Bad;
            }
            match b {
                b'\n' if !*line_nonempty => Outcome::Done,
                b'\n' => {
                    *line_nonempty = false;
                    Outcome::More
                }
                b'\r' => Outcome::More,
                _ => {
                    *line_nonempty = true;
                    Outcome::More
                }
            }
        }
        // Data is handled by the caller; reaching here means zero bytes remain.
        Chunked::Data { .. } => {
            *st = Chunked::DataEnd { seen_cr: false };
            step(st, b)
        }
    }
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}
