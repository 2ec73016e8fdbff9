//! Incremental HTTP/1.x parsing and request/response pairing for one TCP connection.
//!
//! The kernel reports each socket syscall as a [`Chunk`]: a captured prefix of the bytes it
//! moved plus the total count. Bytes past the prefix are a *gap* (known length, unknown
//! content). [`HttpConn`] parses the request stream (client → server) and the response stream
//! (server → client) of one connection, skips bodies by length (also across gaps), pairs
//! responses with requests in FIFO order (keep-alive and pipelining) and emits one
//! [`Exchange`] per answered request.
//!
//! Hostile input: every buffer is bounded, nothing indexes unchecked, every loop consumes
//! input. Only a handful of request header values are copied out (capped); Cookie,
//! Authorization and bodies never leave the transient header buffer.
//!
//! Failure handling, by reason (each counted in [`HttpStats`]):
//! - a stream whose message start is not a start line → the connection is not HTTP (dead);
//! - headers cut by the capture limit or over [`MAX_HEADER_BYTES`] → keep what was parsed,
//!   mark `headers_truncated`; a request is assumed to have no body and its stream resyncs; a
//!   response's end becomes unknown (see [`HttpConn::flush_idle`]);
//! - a gap where framing bytes (chunk-size lines, the next message's start) would be, or bad
//!   chunked framing → sync lost: a request stream skips chunks until one starts with a
//!   request line; a response's end becomes unknown. A chunked response whose framing was lost
//!   also ends at the first fully captured chunk that ends with the last-chunk terminator
//!   (`0\r\n\r\n`, or `0\r\n` + trailer lines + `\r\n`); when that chunk parses from a
//!   chunk-size line onward, the chunked parser resumes there instead (so a next response in
//!   the same chunk is parsed too).
//!
//! Requests are numbered ([`Request::seq`]) and can be observed as soon as their headers are
//! parsed ([`HttpConn::take_started`]), long before their response.

mod body;
mod parse;
#[cfg(test)]
mod tests;

use std::{collections::VecDeque, sync::Arc};

use smallvec::SmallVec;

use body::{Body, Chunked, GapOutcome, Outcome};
use parse::{ContentLength, Prefix};

/// Largest header section (start line included) buffered per message.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Cap on the stored request-target.
pub const MAX_TARGET_BYTES: usize = 2048;
/// Cap on every other stored header value.
pub const MAX_VALUE_BYTES: usize = 512;
/// Longest method token accepted.
pub const MAX_METHOD_LEN: usize = 20;
/// Requests kept waiting for a response per connection; beyond this the oldest is emitted
/// unanswered (counted `pending_overflow`).
pub const MAX_PENDING_REQUESTS: usize = 64;
/// Started requests kept until [`HttpConn::take_started`]; beyond this the oldest is dropped
/// (counted `started_overflow`).
pub const MAX_STARTED_REQUESTS: usize = 256;

/// One syscall's worth of bytes on one direction of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk<'a> {
    /// The first bytes the syscall moved (a prefix; may be shorter than `total`).
    pub captured: &'a [u8],
    /// Bytes moved by the syscall, `>= captured.len()` (a smaller value is read as
    /// `captured.len()`).
    pub total: u64,
    pub tid: u32,
    /// Time of the chunk's first byte.
    pub first_ns: u64,
    /// Time of the chunk's last byte.
    pub last_ns: u64,
}

/// A parsed request. Only exported header values are kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// Shared with its [`Started`] (and on to the stitcher): counted, not copied.
    pub method: Arc<str>,
    /// Raw request-target as sent, e.g. "/a/b?x=1" or absolute-form (capped at
    /// [`MAX_TARGET_BYTES`]).
    pub target: Arc<str>,
    /// 0 or 1.
    pub version_minor: u8,
    pub host: Option<String>,
    pub user_agent: Option<String>,
    pub content_length: Option<u64>,
    /// Body bytes seen, by length (gaps included; chunked: chunk data only, not framing).
    pub body_bytes: u64,
    pub first_ns: u64,
    pub last_ns: u64,
    pub first_tid: u32,
    pub headers_truncated: bool,
    /// 0-based index of this request on its connection, in stream order, assigned when its
    /// request line is recognized (pipelined requests get consecutive numbers). Requests that
    /// are dropped (cut mid-headers by close) still consume their number, so gaps are
    /// possible. For [`HttpConn::new_resync`] connections numbering
    /// starts at 0 with the first request seen, not with the connection's first request.
    pub seq: u64,
}

/// A request whose headers were just parsed ([`HttpConn::take_started`]): what deciding its
/// parent needs, long before its response. Its [`Request`] follows in the [`Exchange`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Started {
    pub method: Arc<str>,
    pub target: Arc<str>,
    /// The [`Request::seq`] of its request.
    pub seq: u64,
    pub first_ns: u64,
    pub first_tid: u32,
    pub headers_truncated: bool,
    /// Read only to join the caller's trace: not part of the span. Boxed, and only when the
    /// request carried any (starts move through the pipeline by value).
    pub propagation: Option<Box<Propagation>>,
}

/// The trace-context headers a request carried (capped, as sent).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Propagation {
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    /// The single "b3" header.
    pub b3: Option<String>,
    pub x_b3_trace_id: Option<String>,
    pub x_b3_span_id: Option<String>,
    pub x_b3_parent_span_id: Option<String>,
    pub x_b3_sampled: Option<String>,
}

/// A parsed final response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub version_minor: u8,
    /// Body bytes seen, by length (gaps included; chunked: chunk data only). 0 when the
    /// headers were truncated (the body's start is unknown). Approximate when the end was
    /// unknown because chunked framing was lost (or Content-Length was invalid): chunk data
    /// up to the loss, then every byte the server sent after it (chunked framing included).
    pub body_bytes: u64,
    pub first_ns: u64,
    pub last_ns: u64,
    pub last_tid: u32,
    pub headers_truncated: bool,
    /// Always false in emitted exchanges: 1xx interim responses are skipped.
    pub interim: bool,
}

/// A request and its final response (`None`: the connection closed before it came).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exchange {
    /// Boxed as it waited for its response: an exchange passes through several stages, and
    /// moving the pointer, not the request, saves a copy at each.
    pub request: Box<Request>,
    pub response: Option<Response>,
}

/// Counters; every dropped or rejected thing is counted by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpStats {
    /// Requests whose headers were parsed (complete or truncated).
    pub requests: u64,
    /// Final (non-1xx, or 101) responses whose headers were parsed.
    pub responses: u64,
    /// Connections found not to be HTTP (garbage where a message must start).
    pub not_http: u64,
    /// Header sections over [`MAX_HEADER_BYTES`] (kept truncated, then resync).
    pub header_too_large: u64,
    /// Invalid Content-Length / Transfer-Encoding / chunked framing.
    pub bad_framing: u64,
    /// Header sections cut by the capture limit (a gap in header mode).
    pub truncated_headers: u64,
    /// Final responses with no request waiting (not emitted).
    pub unmatched_responses: u64,
    /// Chunks skipped while waiting for one that starts with a start line.
    pub resync_skipped_chunks: u64,
    /// 1xx responses skipped (101 excluded).
    pub interim_responses: u64,
    /// 101 Switching Protocols / successful CONNECT: parsing stopped after emitting.
    pub upgrades: u64,
    /// A gap covered framing bytes (chunk-size line, next message's start): stream resynced.
    pub sync_lost: u64,
    /// A gap may have hidden whole messages (pipelined beyond what one call's capture holds):
    /// the request stream stopped, or (responses hidden while requests waited) the connection.
    pub messages_hidden: u64,
    /// Requests emitted with `response: None` at close.
    pub unanswered_requests: u64,
    /// Requests emitted unanswered because too many were waiting.
    pub pending_overflow: u64,
    /// Messages cut by close: responses mid-body (emitted anyway), messages mid-headers (dropped).
    pub incomplete_at_close: u64,
    /// Requests waiting for a response when the connection stopped being parsed (emitted
    /// unanswered).
    pub abandoned_requests: u64,
    /// Started requests dropped from the [`HttpConn::take_started`] queue (not taken in time).
    pub started_overflow: u64,
}

impl HttpStats {
    /// Every counter, named and described here, beside what it counts. `conn_rejected`: the
    /// connection stage's own rejections (label, count), which share the rejection family.
    pub fn families(&self, conn_rejected: &[(&'static str, u64)]) -> Vec<crate::telemetry::Family> {
        use crate::telemetry::Family;
        let mut rejected = vec![
            ("reason", "not_http", self.not_http),
            ("reason", "header_too_large", self.header_too_large),
            ("reason", "bad_framing", self.bad_framing),
            ("reason", "truncated_headers", self.truncated_headers),
            ("reason", "unmatched_response", self.unmatched_responses),
            ("reason", "resync_skipped_chunk", self.resync_skipped_chunks),
            ("reason", "sync_lost", self.sync_lost),
            ("reason", "messages_hidden", self.messages_hidden),
            ("reason", "pending_overflow", self.pending_overflow),
            ("reason", "incomplete_at_close", self.incomplete_at_close),
            ("reason", "abandoned_request", self.abandoned_requests),
            ("reason", "started_overflow", self.started_overflow),
        ];
        for &(reason, n) in conn_rejected {
            match rejected.iter_mut().find(|r| r.1 == reason) {
                Some(r) => r.2 += n,
                None => rejected.push(("reason", reason, n)),
            }
        }
        vec![
            Family::counter(
                "sockspan_http_messages_total",
                "HTTP messages whose headers were parsed, by kind (interim: 1xx skipped; upgrade: parsing stopped after a 101 or CONNECT).",
                vec![
                    ("kind", "request", self.requests),
                    ("kind", "response", self.responses),
                    ("kind", "interim", self.interim_responses),
                    ("kind", "upgrade", self.upgrades),
                ],
            ),
            Family::counter(
                "sockspan_http_rejected_total",
                "Streams, messages or chunks the HTTP stage rejected, skipped or lost, by reason.",
                rejected,
            ),
            Family::total(
                "sockspan_http_unanswered_requests_total",
                "Requests that ended without a response (emitted as spans with no status).",
                self.unanswered_requests,
            ),
        ]
    }

    /// Adds every counter of `other` to `self`.
    pub fn add(&mut self, other: &HttpStats) {
        let HttpStats {
            requests,
            responses,
            not_http,
            header_too_large,
            bad_framing,
            truncated_headers,
            unmatched_responses,
            resync_skipped_chunks,
            interim_responses,
            upgrades,
            sync_lost,
            messages_hidden,
            unanswered_requests,
            pending_overflow,
            incomplete_at_close,
            abandoned_requests,
            started_overflow,
        } = other;
        self.requests += requests;
        self.responses += responses;
        self.not_http += not_http;
        self.header_too_large += header_too_large;
        self.bad_framing += bad_framing;
        self.truncated_headers += truncated_headers;
        self.unmatched_responses += unmatched_responses;
        self.resync_skipped_chunks += resync_skipped_chunks;
        self.interim_responses += interim_responses;
        self.upgrades += upgrades;
        self.sync_lost += sync_lost;
        self.messages_hidden += messages_hidden;
        self.unanswered_requests += unanswered_requests;
        self.pending_overflow += pending_overflow;
        self.incomplete_at_close += incomplete_at_close;
        self.abandoned_requests += abandoned_requests;
        self.started_overflow += started_overflow;
    }
}

/// True if `b` starts with a plausible request line: a known method and a space, or another
/// all-uppercase token of at most 20 characters followed by " /" or " http".
pub fn looks_like_request(b: &[u8]) -> bool {
    parse::classify_request(b) == Prefix::Match
}

/// True if `b` starts with "HTTP/1.0 " or "HTTP/1.1 " and three digits.
pub fn looks_like_response(b: &[u8]) -> bool {
    parse::classify_response(b) == Prefix::Match
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Req,
    Resp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Expecting a message start (leading empty lines are skipped).
    Start,
    /// Buffering a header section.
    Headers,
    /// Skipping a body.
    Body(Body),
    /// Response only: headers were truncated or framing lost; the current response absorbs
    /// chunks until one starts with a status line, a request starts, close or idle flush (or,
    /// for [`Unknown::Chunked`], a chunk ends with the last-chunk terminator).
    UnknownEnd(Unknown),
    /// Skipping chunks until one starts with a start line.
    Resync,
    /// Request stream only, for good: a capture gap may have hidden whole requests
    /// (pipelining), so a later request could be paired with a hidden one's response. The
    /// requests already waiting are still answered; every later response is counted unmatched,
    /// one per request lost.
    Lost,
}

/// Why a response's end is unknown; decides what later chunks count for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unknown {
    /// Headers cut or too large: where the body starts is unknown; nothing is counted.
    Headers,
    /// Headers complete but the body's length invalid: every later byte is counted.
    Length,
    /// Chunked framing lost: every later byte is counted, and a fully captured chunk ending
    /// with the last-chunk terminator ends the response.
    Chunked,
}

/// One direction of a connection.
#[derive(Debug)]
struct Stream {
    state: State,
    /// Header bytes of the current message while its section spans chunks (bounded by
    /// [`MAX_HEADER_BYTES`]); transient.
    buf: Vec<u8>,
    /// The buffered start has been recognized as a start line.
    validated: bool,
    /// The current header line has a byte other than CR.
    line_nonempty: bool,
    first_ns: u64,
    first_tid: u32,
    /// Request stream: sequence number of the current message.
    seq: u64,
}

impl Stream {
    fn new(state: State) -> Self {
        Stream {
            state,
            buf: Vec::new(),
            validated: false,
            line_nonempty: false,
            first_ns: 0,
            first_tid: 0,
            seq: 0,
        }
    }

    fn release_buf(&mut self) {
        self.buf.clear();
        if self.buf.capacity() > 512 {
            self.buf = Vec::new();
        }
    }
}

#[derive(Debug)]
struct CurResp {
    resp: Response,
    /// Id of the request this response answers (`None`: unmatched).
    req_id: Option<u64>,
}

/// One connection's HTTP state: both streams and the FIFO of requests awaiting a response.
#[derive(Debug)]
pub struct HttpConn {
    req: Stream,
    resp: Stream,
    /// Requests awaiting their response, oldest first (boxed: an idle queue's spare slots
    /// then cost a pointer each, not a whole request).
    pending: VecDeque<(u64, Box<Request>)>,
    /// Responses still to come for requests pushed out of `pending` (emitted unanswered):
    /// they are skipped, so later responses pair with their own requests.
    owed_to_evicted: u64,
    next_id: u64,
    /// Sequence number of the next request line recognized.
    next_seq: u64,
    /// Requests whose headers were parsed, not yet taken (bounded by
    /// [`MAX_STARTED_REQUESTS`]).
    /// Inline room for one: a request's start is taken right after the call that parsed it,
    /// so a queue allocated per request only to be taken cost a tenth of the parsing.
    started: SmallVec<[Started; 1]>,
    /// Request whose body is still arriving on the request stream.
    cur_req: Option<u64>,
    /// Response being received.
    cur_resp: Option<CurResp>,
    dead: bool,
    closed: bool,
    last_activity_ns: u64,
}

impl Default for HttpConn {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpConn {
    /// A connection seen from its start: the first chunk of each stream must start a message.
    pub fn new() -> Self {
        Self::with_state(State::Start)
    }

    /// A connection joined mid-stream: each stream skips chunks until one starts with a
    /// request line (request stream) / status line (response stream).
    pub fn new_resync() -> Self {
        Self::with_state(State::Resync)
    }

    fn with_state(state: State) -> Self {
        HttpConn {
            req: Stream::new(state),
            resp: Stream::new(state),
            pending: VecDeque::new(),
            owed_to_evicted: 0,
            next_id: 0,
            next_seq: 0,
            started: SmallVec::new(),
            cur_req: None,
            cur_resp: None,
            dead: false,
            closed: false,
            last_activity_ns: 0,
        }
    }

    /// Feeds a chunk the client sent.
    pub fn on_request_chunk(&mut self, c: &Chunk<'_>, out: &mut Vec<Exchange>, stats: &mut HttpStats) {
        self.on_chunk(Dir::Req, c, out, stats);
    }

    /// Feeds a chunk the server sent.
    pub fn on_response_chunk(&mut self, c: &Chunk<'_>, out: &mut Vec<Exchange>, stats: &mut HttpStats) {
        self.on_chunk(Dir::Resp, c, out, stats);
    }

    /// The connection closed (or EOF): ends close-delimited responses and responses of
    /// unknown end (last byte = last chunk's `last_ns`, not `ts_ns`); a response cut mid-body
    /// is emitted as is (counted `incomplete_at_close`); requests never answered are emitted
    /// with `response: None`. Later chunks are ignored.
    pub fn on_close(&mut self, ts_ns: u64, out: &mut Vec<Exchange>, stats: &mut HttpStats) {
        if self.dead || self.closed {
            return;
        }
        self.closed = true;
        self.last_activity_ns = self.last_activity_ns.max(ts_ns);
        match self.resp.state {
            State::Body(Body::UntilClose) | State::UnknownEnd(_) => self.complete_response(out),
            State::Body(_) => {
                stats.incomplete_at_close += 1;
                self.complete_response(out);
            }
            State::Headers if self.resp.validated => stats.incomplete_at_close += 1,
            _ => {}
        }
        if self.req.state == State::Headers && self.req.validated {
            stats.incomplete_at_close += 1;
        }
        for (_, request) in self.pending.drain(..) {
            stats.unanswered_requests += 1;
            out.push(Exchange {
                request,
                response: None,
            });
        }
        self.cur_req = None;
        self.cur_resp = None;
        self.req = Stream::new(State::Resync);
        self.resp = Stream::new(State::Resync);
    }

    /// Ends a response whose end could not be known (headers truncated, framing lost) once
    /// nothing arrived on the connection for `idle_ns`.
    pub fn flush_idle(&mut self, now_ns: u64, idle_ns: u64, out: &mut Vec<Exchange>, _stats: &mut HttpStats) {
        if self.dead || self.closed || !matches!(self.resp.state, State::UnknownEnd(_)) {
            return;
        }
        if now_ns.saturating_sub(self.last_activity_ns) >= idle_ns {
            self.complete_response(out);
            self.resp.state = State::Resync;
        }
    }

    /// Parsing stopped: the connection is not HTTP (or was upgraded to another protocol).
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    /// Requests waiting for a response.
    pub fn pending_requests(&self) -> usize {
        self.pending.len()
    }

    /// Moves out (appends to `out`, in stream order) the [`Started`] of each request whose
    /// headers were parsed since the last call, truncated header sections included: callers
    /// learn of a request long before its response. Its `seq` matches the request in the
    /// [`Exchange`] emitted later. Requests whose headers never end are never reported.
    /// Taking right after each `on_*` call sees a start no later than its exchange. At most [`MAX_STARTED_REQUESTS`] are kept; older ones are dropped (counted
    /// `started_overflow`), so a caller not interested should still drain (or ignore the
    /// counter). Survives `on_close` and the connection dying.
    pub fn take_started(&mut self, out: &mut Vec<Started>) {
        out.extend(self.started.drain(..));
        if self.started.spilled() {
            // A pipelined burst's room goes with it.
            self.started = SmallVec::new();
        }
    }

    fn stream(&self, dir: Dir) -> &Stream {
        match dir {
            Dir::Req => &self.req,
            Dir::Resp => &self.resp,
        }
    }

    fn stream_mut(&mut self, dir: Dir) -> &mut Stream {
        match dir {
            Dir::Req => &mut self.req,
            Dir::Resp => &mut self.resp,
        }
    }

    fn set_state(&mut self, dir: Dir, state: State) {
        self.stream_mut(dir).state = state;
    }

    fn on_chunk(&mut self, dir: Dir, c: &Chunk<'_>, out: &mut Vec<Exchange>, st: &mut HttpStats) {
        if self.dead || self.closed {
            return;
        }
        self.last_activity_ns = self.last_activity_ns.max(c.last_ns);
        let data = c.captured;
        let gap = c.total.saturating_sub(data.len() as u64);
        match self.stream(dir).state {
            State::Resync => {
                let starts = match dir {
                    Dir::Req => looks_like_request(data),
                    Dir::Resp => looks_like_response(data),
                };
                if !starts {
                    st.resync_skipped_chunks += 1;
                    return;
                }
                self.set_state(dir, State::Start);
            }
            State::UnknownEnd(why) => {
                if dir == Dir::Resp && looks_like_response(data) {
                    // The unknown-end response ended with the previous chunk.
                    self.complete_response(out);
                    self.set_state(dir, State::Start);
                } else {
                    let last_chunk = if why == Unknown::Chunked && gap == 0 {
                        body::last_chunk_start(data)
                    } else {
                        None
                    };
                    match last_chunk {
                        Some(at) => self.end_lost_chunked(c, at, out, st),
                        None => {
                            let counted = if why == Unknown::Headers {
                                0
                            } else {
                                c.total.max(data.len() as u64)
                            };
                            self.touch(dir, c, counted);
                        }
                    }
                    return;
                }
            }
            _ => {}
        }
        if self.feed_captured(dir, c, out, st) && gap > 0 {
            self.feed_gap(dir, c, gap, out, st);
        }
    }

    /// Feeds the captured bytes; false if the rest of the chunk (and its gap) is to be ignored.
    fn feed_captured(&mut self, dir: Dir, c: &Chunk<'_>, out: &mut Vec<Exchange>, st: &mut HttpStats) -> bool {
        let data = c.captured;
        let mut pos = 0usize;
        while let Some(rest) = data.get(pos..) {
            if rest.is_empty() || self.dead {
                break;
            }
            match self.stream(dir).state {
                State::Start => {
                    let skip = rest.iter().take_while(|&&b| b == b'\r' || b == b'\n').count();
                    pos += skip;
                    if skip == rest.len() {
                        break;
                    }
                    let s = self.stream_mut(dir);
                    s.buf.clear();
                    s.validated = false;
                    s.line_nonempty = false;
                    s.first_ns = c.first_ns;
                    s.first_tid = c.tid;
                    s.state = State::Headers;
                }
                State::Headers => {
                    pos += self.feed_headers(dir, c, rest, out, st);
                    if self.dead {
                        return false;
                    }
                    match self.stream(dir).state {
                        State::Resync | State::UnknownEnd(Unknown::Headers) => return false,
                        State::UnknownEnd(_) => {
                            // The body starts here; the rest of the chunk counts.
                            let rest_len = (data.len() - pos) as u64 + c.total.saturating_sub(data.len() as u64);
                            self.touch(dir, c, rest_len);
                            return false;
                        }
                        _ => {}
                    }
                }
                State::Body(mut body) => {
                    let fed = body.feed(rest);
                    let body_start = pos;
                    pos += fed.consumed;
                    self.set_state(dir, State::Body(body));
                    self.touch(dir, c, fed.payload);
                    match fed.outcome {
                        Outcome::More if fed.consumed == 0 => break, // defensive: no progress
                        Outcome::More => {}
                        Outcome::Done => self.body_done(dir, out),
                        Outcome::Bad => {
                            st.bad_framing += 1;
                            // Every byte from here on counts (the payload fed is counted).
                            let rest_len = (data.len() - body_start) as u64 + c.total.saturating_sub(data.len() as u64);
                            self.lose_sync(dir, c, rest_len.saturating_sub(fed.payload));
                            return false;
                        }
                    }
                }
                State::UnknownEnd(_) | State::Resync | State::Lost => return false,
            }
        }
        !self.dead
    }

    /// Appends header bytes up to the end of the header section; returns bytes consumed.
    fn feed_headers(
        &mut self,
        dir: Dir,
        c: &Chunk<'_>,
        rest: &[u8],
        out: &mut Vec<Exchange>,
        st: &mut HttpStats,
    ) -> usize {
        let s = self.stream_mut(dir);
        // The section ends at a line holding nothing but CRs; lines are found with memchr (a
        // byte-at-a-time loop cost as much as all the parsing).
        let has_text = |line: &[u8]| line.iter().any(|&b| b != b'\r');
        let mut end = None;
        let mut line_start = 0;
        for nl in memchr::memchr_iter(b'\n', rest) {
            if !s.line_nonempty && !has_text(rest.get(line_start..nl).unwrap_or_default()) {
                end = Some(nl + 1);
                break;
            }
            s.line_nonempty = false;
            line_start = nl + 1;
        }
        if end.is_none() {
            s.line_nonempty |= has_text(rest.get(line_start..).unwrap_or_default());
        }
        let take = end.unwrap_or(rest.len());
        let room = MAX_HEADER_BYTES.saturating_sub(s.buf.len());
        let too_large = take > room;
        let piece = rest.get(..take.min(room)).unwrap_or_default();
        // A section that begins and ends in this chunk (nearly every one) is parsed where it
        // lies: buffered only when it spans chunks, so idle connections hold no buffer.
        let whole = s.buf.is_empty() && end.is_some() && !too_large;
        if !whole {
            s.buf.extend_from_slice(piece);
        }
        if !s.validated {
            let section: &[u8] = if whole { piece } else { &s.buf };
            let class = match dir {
                Dir::Req => parse::classify_request(section),
                Dir::Resp => parse::classify_response(section),
            };
            match class {
                Prefix::Match => {
                    s.validated = true;
                    self.on_message_start(dir, out);
                }
                Prefix::NeedMore if end.is_none() && !too_large => {}
                Prefix::NoMatch | Prefix::NeedMore => {
                    st.not_http += 1;
                    self.die(out, st);
                    return rest.len();
                }
            }
        }
        if too_large {
            st.header_too_large += 1;
            self.finish_headers(dir, c, true, out, st);
            return rest.len();
        }
        if end.is_some() {
            if whole {
                self.finish_section(dir, c, piece, false, out, st);
            } else {
                self.finish_headers(dir, c, false, out, st);
            }
        }
        take
    }

    /// Skips the chunk's gap (bytes past the captured prefix).
    fn feed_gap(&mut self, dir: Dir, c: &Chunk<'_>, gap: u64, out: &mut Vec<Exchange>, st: &mut HttpStats) {
        match self.stream(dir).state {
            // The next message starts inside the gap: whole messages may be hidden there.
            State::Start => self.lose_hidden(dir, out, st),
            State::Headers => {
                if self.stream(dir).validated {
                    st.truncated_headers += 1;
                    self.finish_headers(dir, c, true, out, st);
                    // More than one header section's worth unseen: later requests may be too.
                    if dir == Dir::Req && gap > MAX_HEADER_BYTES as u64 && !self.dead {
                        self.lose_hidden(dir, out, st);
                    }
                } else {
                    st.sync_lost += 1;
                    self.set_state(dir, State::Resync);
                }
            }
            State::Body(mut body) => {
                let (payload, outcome) = body.gap(gap);
                self.set_state(dir, State::Body(body));
                self.touch(dir, c, payload);
                match outcome {
                    GapOutcome::More => {}
                    GapOutcome::Done { leftover } => {
                        self.body_done(dir, out);
                        if leftover > 0 {
                            self.lose_hidden(dir, out, st);
                        }
                    }
                    GapOutcome::LostSync => {
                        st.sync_lost += 1;
                        self.lose_sync(dir, c, gap - payload);
                    }
                }
            }
            State::UnknownEnd(_) | State::Resync | State::Lost => {}
        }
    }

    /// A gap may hide whole messages of `dir`'s stream, so counting messages to pair them is
    /// off by an unknown number from here on. Hidden requests: the request stream stops (the
    /// responses of requests already waiting still pair, in order). Hidden responses while
    /// requests wait: which requests they answered is unknown, so the connection stops. Hidden
    /// responses with nothing waiting answered nothing known: the stream just resyncs.
    fn lose_hidden(&mut self, dir: Dir, out: &mut Vec<Exchange>, st: &mut HttpStats) {
        match dir {
            Dir::Resp if self.pending.is_empty() => {
                st.sync_lost += 1;
                self.resp.state = State::Resync;
            }
            Dir::Resp => {
                st.messages_hidden += 1;
                self.die(out, st);
            }
            Dir::Req => {
                st.messages_hidden += 1;
                self.cur_req = None;
                self.req.state = State::Lost;
            }
        }
    }

    /// A fully captured response chunk in [`Unknown::Chunked`] mode ends with the last-chunk
    /// terminator (its last-chunk line starts at `last_chunk`): the response ends here. If the
    /// chunk parses from a chunk-size line onward, the chunked parser resumes there (its bytes
    /// before that point are counted as body); otherwise the whole chunk is counted. The end
    /// is a guess (body data may look like a terminator), so the stream then resyncs (waits
    /// for a chunk starting with a status line) rather than requiring the next chunk to start
    /// a message, unless it is already parsing a next response found in this chunk.
    fn end_lost_chunked(&mut self, c: &Chunk<'_>, last_chunk: usize, out: &mut Vec<Exchange>, st: &mut HttpStats) {
        let data = c.captured;
        let split = body::find_resync(data, last_chunk).and_then(|p| Some((p, data.get(p..)?)));
        match split {
            Some((p, rest)) => {
                self.touch(Dir::Resp, c, p as u64);
                self.resp.state = State::Body(Body::Chunked(Chunked::START));
                let sub = Chunk {
                    captured: rest,
                    total: rest.len() as u64,
                    ..*c
                };
                self.feed_captured(Dir::Resp, &sub, out, st);
                if self.resp.state == State::Start {
                    self.resp.state = State::Resync;
                }
            }
            None => {
                self.touch(Dir::Resp, c, data.len() as u64);
                self.complete_response(out);
                self.resp.state = State::Resync;
            }
        }
    }

    /// A start line was recognized. A new request ends a response of unknown end: the client
    /// only sends once it got the answer (unless pipelining).
    fn on_message_start(&mut self, dir: Dir, out: &mut Vec<Exchange>) {
        if dir != Dir::Req {
            return;
        }
        self.req.seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        if matches!(self.resp.state, State::UnknownEnd(_)) {
            self.complete_response(out);
            self.resp.state = State::Resync;
        }
    }

    /// Parses the buffered header section, then empties the buffer.
    fn finish_headers(
        &mut self,
        dir: Dir,
        c: &Chunk<'_>,
        truncated: bool,
        out: &mut Vec<Exchange>,
        st: &mut HttpStats,
    ) {
        let buf = std::mem::take(&mut self.stream_mut(dir).buf);
        self.finish_section(dir, c, &buf, truncated, out, st);
        if !self.dead {
            let s = self.stream_mut(dir);
            s.buf = buf;
            s.release_buf();
        }
    }

    /// Parses a whole (or `truncated`) header section, start line included.
    fn finish_section(
        &mut self,
        dir: Dir,
        c: &Chunk<'_>,
        section: &[u8],
        truncated: bool,
        out: &mut Vec<Exchange>,
        st: &mut HttpStats,
    ) {
        match dir {
            Dir::Req => self.finish_request(section, c, truncated, out, st),
            Dir::Resp => self.finish_response(section, c, truncated, out, st),
        }
    }

    fn finish_request(
        &mut self,
        buf: &[u8],
        c: &Chunk<'_>,
        truncated: bool,
        out: &mut Vec<Exchange>,
        st: &mut HttpStats,
    ) {
        let (line, block, line_complete) = parse::split_first_line(buf);
        let parsed = if line_complete {
            parse::parse_request_line(line)
        } else {
            parse::parse_partial_request_line(line)
        };
        let Some(rl) = parsed else {
            st.not_http += 1;
            self.die(out, st);
            return;
        };
        // A truncated section's last line may be cut mid-value: use complete lines only.
        let block = if truncated {
            let end = block.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            block.get(..end).unwrap_or_default()
        } else {
            block
        };
        let f = parse::parse_headers(block, true);
        let content_length = match f.content_length {
            ContentLength::Value(n) => Some(n),
            _ => None,
        };
        let mut resync = truncated;
        let body = if truncated {
            None // assume no body
        } else if f.te_present {
            if f.te_chunked {
                Some(Body::Chunked(Chunked::START))
            } else {
                // A request body must be chunked or sized (RFC 9112 6.3).
                st.bad_framing += 1;
                resync = true;
                None
            }
        } else {
            match f.content_length {
                ContentLength::Absent | ContentLength::Value(0) => None,
                ContentLength::Value(n) => Some(Body::Length { remaining: n }),
                ContentLength::Invalid => {
                    st.bad_framing += 1;
                    resync = true;
                    None
                }
            }
        };
        let request = Request {
            method: rl.method,
            target: rl.target,
            version_minor: rl.version_minor,
            host: f.host,
            user_agent: f.user_agent,
            content_length,
            body_bytes: 0,
            first_ns: self.req.first_ns,
            last_ns: c.last_ns,
            first_tid: self.req.first_tid,
            headers_truncated: truncated,
            seq: self.req.seq,
        };
        st.requests += 1;
        if self.started.len() >= MAX_STARTED_REQUESTS {
            self.started.remove(0);
            st.started_overflow += 1;
        }
        self.started.push(Started {
            method: request.method.clone(),
            target: request.target.clone(),
            seq: request.seq,
            first_ns: request.first_ns,
            first_tid: request.first_tid,
            headers_truncated: request.headers_truncated,
            propagation: f.propagation,
        });
        if self.pending.len() >= MAX_PENDING_REQUESTS
            && let Some((_, request)) = self.pending.pop_front()
        {
            st.pending_overflow += 1;
            self.owed_to_evicted += 1;
            out.push(Exchange {
                request,
                response: None,
            });
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.pending.push_back((id, Box::new(request)));
        self.cur_req = None;
        self.req.state = if resync {
            State::Resync
        } else if let Some(body) = body {
            self.cur_req = Some(id);
            State::Body(body)
        } else {
            State::Start
        };
    }

    fn finish_response(
        &mut self,
        buf: &[u8],
        c: &Chunk<'_>,
        truncated: bool,
        out: &mut Vec<Exchange>,
        st: &mut HttpStats,
    ) {
        let (line, block, _) = parse::split_first_line(buf);
        let Some((version_minor, status)) = parse::parse_status_line(line) else {
            st.not_http += 1;
            self.die(out, st);
            return;
        };
        let block = if truncated {
            let end = block.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            block.get(..end).unwrap_or_default()
        } else {
            block
        };
        let f = parse::parse_headers(block, false);
        if (100..200).contains(&status) && status != 101 {
            st.interim_responses += 1;
            self.resp.state = if truncated { State::Resync } else { State::Start };
            return;
        }
        st.responses += 1;
        let answers_evicted = self.owed_to_evicted > 0;
        let front = if answers_evicted {
            self.owed_to_evicted -= 1;
            None
        } else {
            self.pending
                .front()
                .map(|(id, r)| (*id, &*r.method == "HEAD", &*r.method == "CONNECT"))
        };
        if front.is_none() && !answers_evicted {
            st.unmatched_responses += 1;
        }
        let (is_head, is_connect) = front.map_or((false, false), |(_, h, c)| (h, c));
        self.cur_resp = Some(CurResp {
            resp: Response {
                status,
                version_minor,
                body_bytes: 0,
                first_ns: self.resp.first_ns,
                last_ns: c.last_ns,
                last_tid: c.tid,
                headers_truncated: truncated,
                interim: false,
            },
            req_id: front.map(|(id, _, _)| id),
        });
        if status == 101 || (is_connect && (200..300).contains(&status)) {
            // The connection now carries another protocol.
            self.complete_response(out);
            st.upgrades += 1;
            self.die(out, st);
            return;
        }
        if truncated {
            self.resp.state = State::UnknownEnd(Unknown::Headers);
            return;
        }
        let body = if is_head || status == 204 || status == 304 {
            None
        } else if f.te_present {
            Some(if f.te_chunked {
                Body::Chunked(Chunked::START)
            } else {
                Body::UntilClose
            })
        } else {
            match f.content_length {
                ContentLength::Absent => Some(Body::UntilClose),
                ContentLength::Value(0) => None,
                ContentLength::Value(n) => Some(Body::Length { remaining: n }),
                ContentLength::Invalid => {
                    st.bad_framing += 1;
                    self.resp.state = State::UnknownEnd(Unknown::Length);
                    return;
                }
            }
        };
        match body {
            Some(body) => self.resp.state = State::Body(body),
            None => {
                self.complete_response(out);
                self.resp.state = State::Start;
            }
        }
    }

    /// The body of the stream's current message ended.
    fn body_done(&mut self, dir: Dir, out: &mut Vec<Exchange>) {
        match dir {
            Dir::Req => self.cur_req = None,
            Dir::Resp => self.complete_response(out),
        }
        self.set_state(dir, State::Start);
    }

    /// Sync lost inside a (chunked: only those can lose it) body: a request ends here (its
    /// stream resyncs); a response's end becomes unknown, and `unaccounted` (the chunk's bytes
    /// after those already counted) is added to its body.
    fn lose_sync(&mut self, dir: Dir, c: &Chunk<'_>, unaccounted: u64) {
        match dir {
            Dir::Req => {
                self.touch(dir, c, 0);
                self.cur_req = None;
                self.req.state = State::Resync;
            }
            Dir::Resp => {
                self.touch(dir, c, unaccounted);
                self.resp.state = if self.cur_resp.is_some() {
                    State::UnknownEnd(Unknown::Chunked)
                } else {
                    State::Resync
                };
            }
        }
    }

    /// Bytes of the stream's current message were in chunk `c`.
    fn touch(&mut self, dir: Dir, c: &Chunk<'_>, payload: u64) {
        match dir {
            Dir::Req => {
                let Some(id) = self.cur_req else { return };
                if let Some((_, r)) = self.pending.iter_mut().rev().find(|(i, _)| *i == id) {
                    r.last_ns = c.last_ns;
                    r.body_bytes = r.body_bytes.saturating_add(payload);
                }
            }
            Dir::Resp => {
                if let Some(cur) = &mut self.cur_resp {
                    cur.resp.last_ns = c.last_ns;
                    cur.resp.last_tid = c.tid;
                    cur.resp.body_bytes = cur.resp.body_bytes.saturating_add(payload);
                }
            }
        }
    }

    /// The current response is complete: pair it with its request and emit.
    fn complete_response(&mut self, out: &mut Vec<Exchange>) {
        let Some(cur) = self.cur_resp.take() else {
            return;
        };
        let Some(id) = cur.req_id else { return };
        if self.pending.front().map(|(i, _)| *i) == Some(id)
            && let Some((_, request)) = self.pending.pop_front()
        {
            out.push(Exchange {
                request,
                response: Some(cur.resp),
            });
        }
    }

    /// Stops parsing this connection for good. Requests still waiting for a response come out
    /// unanswered (counted), so nothing downstream waits for them forever.
    fn die(&mut self, out: &mut Vec<Exchange>, st: &mut HttpStats) {
        self.dead = true;
        st.abandoned_requests += self.pending.len() as u64;
        out.extend(self.pending.drain(..).map(|(_, request)| Exchange {
            request,
            response: None,
        }));
        self.cur_req = None;
        self.cur_resp = None;
        self.req = Stream::new(State::Resync);
        self.resp = Stream::new(State::Resync);
    }
}
