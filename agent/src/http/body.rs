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
            // A gap may also cover the CRLF that ends chunk data: those bytes are fixed, so
            // the stream stays in sync when the gap ends right after them (a writer that
            // sends each chunk as one syscall: size line, data, CRLF).
            Body::Chunked(st) => match *st {
                Chunked::Data { remaining } => {
                    if gap < remaining {
                        *st = Chunked::Data {
                            remaining: remaining - gap,
                        };
                        (gap, GapOutcome::More)
                    } else {
                        match data_end_gap(false, gap - remaining) {
                            Some(next) => {
                                *st = next;
                                (remaining, GapOutcome::More)
                            }
                            None => (remaining, GapOutcome::LostSync),
                        }
                    }
                }
                Chunked::DataEnd { seen_cr } => match data_end_gap(seen_cr, gap) {
                    Some(next) => {
                        *st = next;
                        (0, GapOutcome::More)
                    }
                    None => (0, GapOutcome::LostSync),
                },
                _ => (0, GapOutcome::LostSync),
            },
        }
    }
}

/// State after `gap` unseen bytes in [`Chunked::DataEnd`] (`seen_cr`: its CR was seen):
/// `None` if the gap reaches past the CRLF (into a chunk-size line).
fn data_end_gap(seen_cr: bool, gap: u64) -> Option<Chunked> {
    match (seen_cr, gap) {
        (_, 0) => Some(Chunked::DataEnd { seen_cr }),
        (false, 1) => Some(Chunked::DataEnd { seen_cr: true }),
        (false, 2) | (true, 1) => Some(Chunked::START),
        _ => None,
    }
}

/// Trailer lines accepted by [`last_chunk_start`].
const MAX_TRAILER_LINES: usize = 64;
/// Resync points tried by [`find_resync`] before the last-chunk line itself.
const MAX_RESYNC_CANDIDATES: usize = 32;

/// If `data` ends with a chunked body's end — the last-chunk line (`0`, optional extensions),
/// optional trailer lines, then an empty line — returns where the last-chunk line starts.
/// That line must start `data` or follow a line feed (e.g. the CRLF ending chunk data).
pub(super) fn last_chunk_start(data: &[u8]) -> Option<usize> {
    let d = data.strip_suffix(b"\n")?;
    let d = d.strip_suffix(b"\r").unwrap_or(d);
    // `d` ends with the line feed of the last-chunk line or of the last trailer line.
    let mut end = d.len();
    for _ in 0..=MAX_TRAILER_LINES {
        let nl = end.checked_sub(1)?;
        if d.get(nl) != Some(&b'\n') {
            return None;
        }
        let head = d.get(..nl)?;
        let start = head.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let line = head.get(start..)?;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if is_last_chunk_line(line) {
            return Some(start);
        }
        if data.len() - start > MAX_TRAILER_BYTES || !is_trailer_line(line) {
            return None;
        }
        end = start;
    }
    None
}

/// `0` (up to 16 zeros), optionally followed by extensions.
fn is_last_chunk_line(line: &[u8]) -> bool {
    let zeros = line.iter().take_while(|&&b| b == b'0').count();
    (1..=16).contains(&zeros)
        && line.len() <= MAX_CHUNK_LINE
        && line.get(zeros).is_none_or(|b| matches!(b, b';' | b' ' | b'\t'))
}

/// `name: value` (leniently: starts with a visible non-colon byte and has a colon).
fn is_trailer_line(line: &[u8]) -> bool {
    line.first().is_some_and(|&b| b.is_ascii_graphic() && b != b':') && line.contains(&b':')
}

/// Where a chunked parser can restart in `data` (a fully captured chunk whose last-chunk line
/// starts at `last_chunk`, see [`last_chunk_start`]) so that the body parses to its end: at
/// the end of `data`, or where a status line (the next response) starts. Tries the start and
/// each line start before `last_chunk` (at most [`MAX_RESYNC_CANDIDATES`]), earliest first,
/// then `last_chunk` itself.
pub(super) fn find_resync(data: &[u8], last_chunk: usize) -> Option<usize> {
    let line_starts = std::iter::once(0)
        .chain(
            data.iter()
                .take(last_chunk)
                .enumerate()
                .filter(|&(_, &b)| b == b'\n')
                .map(|(i, _)| i + 1),
        )
        .filter(|&p| p < last_chunk)
        .take(MAX_RESYNC_CANDIDATES);
    line_starts
        .chain(std::iter::once(last_chunk))
        .find(|&p| parses_to_end(data.get(p..).unwrap_or_default()))
}

/// A chunked body starting at `data[0]` ends inside `data`, followed by nothing but line ends
/// or the (possibly partial) start of a response.
fn parses_to_end(data: &[u8]) -> bool {
    let mut body = Body::Chunked(Chunked::START);
    let fed = body.feed(data);
    if fed.outcome != Outcome::Done {
        return false;
    }
    let rest = data.get(fed.consumed..).unwrap_or_default();
    let skip = rest.iter().take_while(|&&b| b == b'\r' || b == b'\n').count();
    let rest = rest.get(skip..).unwrap_or_default();
    rest.is_empty() || super::parse::classify_response(rest) != super::parse::Prefix::NoMatch
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
