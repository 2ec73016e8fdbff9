//! Start lines and header fields. Everything here works on a bounded header buffer and copies
//! out only the few values sockspan exports (capped); credentials and bodies are never copied.

use std::sync::Arc;

use super::{MAX_METHOD_LEN, MAX_TARGET_BYTES, MAX_VALUE_BYTES, Propagation};

/// Whether a (possibly partial) message start is a valid start line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Prefix {
    Match,
    NoMatch,
    /// Too short to tell, and no line end yet.
    NeedMore,
}

const KNOWN_METHODS: [&[u8]; 9] = [
    b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"TRACE", b"CONNECT",
];

fn is_ws(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn trim_start(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s {
        if is_ws(*first) {
            s = rest;
        } else {
            break;
        }
    }
    s
}

fn trim_end(mut s: &[u8]) -> &[u8] {
    while let [rest @ .., last] = s {
        if is_ws(*last) || *last == b'\r' {
            s = rest;
        } else {
            break;
        }
    }
    s
}

fn trim(s: &[u8]) -> &[u8] {
    trim_end(trim_start(s))
}

/// Classifies the start of a request: a known method and a space, or another all-uppercase
/// token (at most [`MAX_METHOD_LEN`]) followed by " /" or " http".
pub(super) fn classify_request(b: &[u8]) -> Prefix {
    let need = if b.contains(&b'\n') {
        Prefix::NoMatch
    } else {
        Prefix::NeedMore
    };
    if b.is_empty() {
        return need;
    }
    let m = b.iter().take_while(|c| c.is_ascii_uppercase()).count();
    if m == 0 || m > MAX_METHOD_LEN {
        return Prefix::NoMatch;
    }
    let Some(&sep) = b.get(m) else { return need };
    if sep != b' ' {
        return Prefix::NoMatch;
    }
    let method = b.get(..m).unwrap_or_default();
    if KNOWN_METHODS.contains(&method) {
        return Prefix::Match;
    }
    let after = b.get(m + 1..).unwrap_or_default();
    match after.first() {
        None => need,
        Some(b'/') => Prefix::Match,
        Some(_) => {
            let n = after.len().min(4);
            let (Some(have), Some(want)) = (after.get(..n), b"http".get(..n)) else {
                return Prefix::NoMatch;
            };
            if !have.eq_ignore_ascii_case(want) {
                Prefix::NoMatch
            } else if n == 4 {
                Prefix::Match
            } else {
                need
            }
        }
    }
}

/// Classifies the start of a response: "HTTP/1.0 " or "HTTP/1.1 " and three digits.
pub(super) fn classify_response(b: &[u8]) -> Prefix {
    const HEAD: &[u8] = b"HTTP/1.";
    for (i, &c) in b.iter().take(12).enumerate() {
        let ok = match i {
            0..=6 => HEAD.get(i) == Some(&c),
            7 => c == b'0' || c == b'1',
            8 => c == b' ',
            _ => c.is_ascii_digit(),
        };
        if !ok {
            return Prefix::NoMatch;
        }
    }
    if b.len() >= 12 { Prefix::Match } else { Prefix::NeedMore }
}

/// The pieces of `block` between '\n's, as `split` gives them (a trailing empty one included),
/// found with memchr.
fn lines(block: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut ends = memchr::memchr_iter(b'\n', block);
    let mut start = 0;
    std::iter::from_fn(move || {
        if start > block.len() {
            return None;
        }
        let end = ends.next().unwrap_or(block.len());
        let line = block.get(start..end).unwrap_or_default();
        start = end + 1;
        Some(line)
    })
}

/// Splits a header block into its first line (without "\n") and the rest; `true` if the first
/// line is complete.
pub(super) fn split_first_line(buf: &[u8]) -> (&[u8], &[u8], bool) {
    match memchr::memchr(b'\n', buf) {
        Some(i) => (
            buf.get(..i).unwrap_or_default(),
            buf.get(i + 1..).unwrap_or_default(),
            true,
        ),
        None => (buf, &[], false),
    }
}

/// A parsed request line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RequestLine {
    pub method: Arc<str>,
    pub target: Arc<str>,
    pub version_minor: u8,
}

/// Parses a complete request line: `METHOD SP target SP HTTP/1.x` (extra spaces tolerated).
pub(super) fn parse_request_line(line: &[u8]) -> Option<RequestLine> {
    let line = trim_end(line);
    let m = line.iter().take_while(|c| c.is_ascii_uppercase()).count();
    if m == 0 || m > MAX_METHOD_LEN {
        return None;
    }
    let method = line.get(..m)?;
    let rest = line.get(m..)?;
    if !is_ws(*rest.first()?) {
        return None;
    }
    let rest = trim_start(rest);
    let v_start = rest.iter().rposition(|&b| is_ws(b))? + 1;
    let version_minor = match rest.get(v_start..)? {
        b"HTTP/1.0" => 0,
        b"HTTP/1.1" => 1,
        _ => return None,
    };
    let target = trim_end(rest.get(..v_start)?);
    if target.is_empty() {
        return None;
    }
    Some(RequestLine {
        method: method_text(method),
        target: cap_text(target, MAX_TARGET_BYTES),
        version_minor,
    })
}

/// Best effort for a request line cut short by the capture limit: the method and as much of
/// the target as was captured; the version is assumed to be 1.1.
pub(super) fn parse_partial_request_line(line: &[u8]) -> Option<RequestLine> {
    if let Some(full) = parse_request_line(line) {
        return Some(full);
    }
    let m = line.iter().take_while(|c| c.is_ascii_uppercase()).count();
    if m == 0 || m > MAX_METHOD_LEN {
        return None;
    }
    let rest = trim_start(line.get(m..)?);
    let end = rest.iter().position(|&b| is_ws(b) || b == b'\r').unwrap_or(rest.len());
    Some(RequestLine {
        method: method_text(line.get(..m)?),
        target: cap_text(rest.get(..end)?, MAX_TARGET_BYTES),
        version_minor: 1,
    })
}

/// Parses a status line (complete or cut after the status code): `(version_minor, status)`.
pub(super) fn parse_status_line(line: &[u8]) -> Option<(u8, u16)> {
    let line = trim_end(line);
    if classify_response(line) != Prefix::Match {
        return None;
    }
    let minor = line.get(7)?.checked_sub(b'0')?;
    let mut status: u16 = 0;
    for &d in line.get(9..12)? {
        status = status * 10 + u16::from(d.checked_sub(b'0')?);
    }
    if let Some(&c) = line.get(12)
        && !is_ws(c)
    {
        return None;
    }
    if status < 100 {
        return None;
    }
    Some((minor, status))
}

/// Content-Length as seen across all its header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum ContentLength {
    #[default]
    Absent,
    Value(u64),
    Invalid,
}

/// The header fields sockspan keeps, plus what framing needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Fields {
    pub host: Option<String>,
    pub user_agent: Option<String>,
    /// Boxed on the first trace-context header (most requests carry none).
    pub propagation: Option<Box<Propagation>>,
    pub content_length: ContentLength,
    pub te_present: bool,
    /// The last transfer coding is "chunked".
    pub te_chunked: bool,
}

/// Parses header lines (the block after the start line). `keep_values`: copy out the request
/// header values sockspan exports; otherwise only framing is read. Lines without a colon and
/// obs-fold continuation lines are ignored.
pub(super) fn parse_headers(block: &[u8], keep_values: bool) -> Fields {
    let mut f = Fields::default();
    for raw in lines(block) {
        let line = trim_end(raw);
        let Some(&first) = line.first() else { continue };
        if is_ws(first) {
            continue;
        }
        let Some(colon) = memchr::memchr(b':', line) else {
            continue;
        };
        let name = trim(line.get(..colon).unwrap_or_default());
        let value = trim(line.get(colon + 1..).unwrap_or_default());
        let eq = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
        if eq("content-length") {
            f.content_length = merge_content_length(f.content_length, value);
            continue;
        }
        if eq("transfer-encoding") {
            f.te_present = true;
            if let Some(last) = value.split(|&b| b == b',').map(trim).rfind(|c| !c.is_empty()) {
                f.te_chunked = last.eq_ignore_ascii_case(b"chunked");
            }
            continue;
        }
        if !keep_values {
            continue;
        }
        let slot = if eq("host") {
            &mut f.host
        } else if eq("user-agent") {
            &mut f.user_agent
        } else if eq("traceparent") {
            &mut f.propagation.get_or_insert_default().traceparent
        } else if eq("tracestate") {
            &mut f.propagation.get_or_insert_default().tracestate
        } else if eq("b3") {
            &mut f.propagation.get_or_insert_default().b3
        } else if eq("x-b3-traceid") {
            &mut f.propagation.get_or_insert_default().x_b3_trace_id
        } else if eq("x-b3-spanid") {
            &mut f.propagation.get_or_insert_default().x_b3_span_id
        } else if eq("x-b3-parentspanid") {
            &mut f.propagation.get_or_insert_default().x_b3_parent_span_id
        } else if eq("x-b3-sampled") {
            &mut f.propagation.get_or_insert_default().x_b3_sampled
        } else {
            continue;
        };
        if slot.is_none() {
            *slot = Some(cap_string(value, MAX_VALUE_BYTES));
        }
    }
    f
}

/// Content-Length may be repeated (or a list) only with identical values (RFC 9110 8.6).
fn merge_content_length(prev: ContentLength, value: &[u8]) -> ContentLength {
    let mut acc = prev;
    for part in value.split(|&b| b == b',') {
        let n = match parse_decimal(trim(part)) {
            Some(n) => n,
            None => return ContentLength::Invalid,
        };
        acc = match acc {
            ContentLength::Absent => ContentLength::Value(n),
            ContentLength::Value(v) if v == n => acc,
            _ => return ContentLength::Invalid,
        };
    }
    acc
}

fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    let mut v: u64 = 0;
    for &d in s {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    Some(v)
}

/// A request's method: the standard ones shared, not allocated for every request (that cost
/// as much as the target's copy); others copied, capped.
fn method_text(m: &[u8]) -> Arc<str> {
    static STANDARD: std::sync::OnceLock<[Arc<str>; 9]> = std::sync::OnceLock::new();
    let standard = STANDARD.get_or_init(|| {
        [
            "GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS", "CONNECT", "TRACE",
        ]
        .map(Arc::from)
    });
    match standard.iter().find(|s| s.as_bytes() == m) {
        Some(s) => s.clone(),
        None => cap_text(m, MAX_METHOD_LEN),
    }
}

/// [`cap_string`] as a shared string: the request line is handed on to the stitcher and the
/// span with a reference count, not copied.
pub(super) fn cap_text(b: &[u8], cap: usize) -> Arc<str> {
    let b = b.get(..cap.min(b.len())).unwrap_or_default();
    match printable(b) {
        Some(s) => Arc::from(s),
        None => Arc::from(sanitized(b, cap)),
    }
}

/// Copies at most `cap` bytes as UTF-8 (lossy), control characters replaced, result at most
/// `cap` bytes.
pub(super) fn cap_string(b: &[u8], cap: usize) -> String {
    let b = b.get(..cap.min(b.len())).unwrap_or_default();
    match printable(b) {
        Some(s) => s.to_owned(),
        None => sanitized(b, cap),
    }
}

/// `b` as text when it is all printable ASCII, as nearly every value is: then it is copied
/// once, with no per-character pass.
fn printable(b: &[u8]) -> Option<&str> {
    // SAFETY: printable ASCII is UTF-8.
    b.iter()
        .all(|&c| (0x20..0x7f).contains(&c))
        .then(|| unsafe { std::str::from_utf8_unchecked(b) })
}

/// The slow path of [`cap_string`]: lossy UTF-8, tabs as spaces, other control characters
/// replaced, cut back to `cap` bytes on a character boundary.
fn sanitized(b: &[u8], cap: usize) -> String {
    let mut s: String = String::from_utf8_lossy(b)
        .chars()
        .map(|ch| match ch {
            '\t' => ' ',
            c if c.is_control() => '\u{FFFD}',
            c => c,
        })
        .collect();
    if s.len() > cap {
        let mut end = cap;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    #[test]
    fn standard_methods_are_shared_and_others_copied() {
        let (a, b) = (super::method_text(b"GET"), super::method_text(b"GET"));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(&*super::method_text(b"PROPFIND"), "PROPFIND");
        let line = super::parse_request_line(b"DELETE /x HTTP/1.1").unwrap();
        assert_eq!(&*line.method, "DELETE");
    }

    #[test]
    fn lines_split_as_split_does() {
        for block in [
            &b""[..],
            b"\n",
            b"a",
            b"a\n",
            b"a\nb",
            b"\n\nx\r\n\r\n",
            b"Host: h\r\nX: y",
        ] {
            let want: Vec<&[u8]> = block.split(|&b| b == b'\n').collect();
            assert_eq!(super::lines(block).collect::<Vec<_>>(), want, "{block:?}");
        }
    }
}
