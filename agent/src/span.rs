//! Exchange → span: kind, name, stable HTTP semantic-convention attributes, status, resource.
//! Bodies, cookies and credentials never get here (the parser keeps none); query values are
//! redacted unless asked otherwise.
use std::{borrow::Cow, sync::Arc};

use crate::{
    conn::{ConnExchange, Side},
    process::ProcessInfo,
};

#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    /// Borrowed for the fixed values (scheme, versions, common methods): no allocation per span.
    Str(Cow<'static, str>),
    Int(i64),
    Bool(bool),
}

impl AttrValue {
    pub fn text(s: impl Into<String>) -> Self {
        AttrValue::Str(Cow::Owned(s.into()))
    }

    pub const fn fixed(s: &'static str) -> Self {
        AttrValue::Str(Cow::Borrowed(s))
    }

    pub fn borrowed(&self) -> ValueRef<'_> {
        match self {
            AttrValue::Str(s) => ValueRef::Str(s),
            AttrValue::Int(i) => ValueRef::Int(*i),
            AttrValue::Bool(b) => ValueRef::Bool(*b),
        }
    }
}

/// An attribute's value borrowed from a span or a resource: what the encoders (OTLP, JSON
/// lines) write.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValueRef<'a> {
    Str(&'a str),
    Int(i64),
    Bool(bool),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SpanKind {
    Server,
    Client,
}

impl SpanKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SpanKind::Server => "SERVER",
            SpanKind::Client => "CLIENT",
        }
    }
}

/// A finished span, ready for stitching and export. Times are Unix ns.
#[derive(Debug, Clone)]
pub struct Span {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    pub kind: SpanKind,
    pub name: String,
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    pub attributes: Vec<(&'static str, AttrValue)>,
    pub error: bool,
    pub resource: Arc<ProcessInfo>,
    /// Spans this one is likely, but not certainly, the child of.
    pub links: Vec<SpanLink>,
    /// The sampling decision a propagated context carried into its trace (see
    /// [`crate::sampling`]); `None` when the trace began on this node.
    pub upstream_sampled: Option<bool>,
}

/// A link to a span this one probably belongs under: exported as an OpenTelemetry span link
/// with `sockspan.link.source` naming the rule (a parent is set only when the evidence is
/// certain).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanLink {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub source: &'static str,
}

#[cfg(test)]
impl Span {
    /// A minimal server span numbered `i`, for tests of the sinks.
    pub fn sample(i: u64) -> Span {
        Span {
            trace_id: [1; 16],
            span_id: i.to_be_bytes(),
            parent_span_id: None,
            kind: SpanKind::Server,
            name: "GET /".into(),
            start_unix_ns: 0,
            end_unix_ns: 0,
            attributes: Vec::new(),
            error: false,
            resource: Arc::new(ProcessInfo {
                pid: 1,
                service_name: "s".into(),
                executable_name: "s".into(),
                host_name: "h".into(),
                container_id: None,
                pod: None,
            }),
            links: Vec::new(),
            upstream_sampled: None,
        }
    }
}

impl Span {
    pub fn attr(&self, key: &str) -> Option<&AttrValue> {
        self.attributes.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }
}

/// Span-building options.
#[derive(Debug, Clone, Default)]
pub struct SpanOptions {
    /// Route patterns a server request's path is named after (`--route-pattern`).
    pub routes: Vec<crate::routes::RoutePattern>,
    /// Export query values as sent instead of `REDACTED`.
    pub keep_query_values: bool,
    /// Export `url.path` as sent instead of with its identifier- and secret-like segments
    /// generalised (span names are generalised either way).
    pub keep_path: bool,
}

/// Maps monotonic kernel timestamps to Unix time and builds spans. Ids are not made here:
/// the stitcher gives every span its trace and span id (and parent) when it decides them.
pub struct SpanFactory {
    opts: SpanOptions,
    /// Unix time minus CLOCK_MONOTONIC, ns.
    clock_offset_ns: i128,
}

impl SpanFactory {
    pub fn new(opts: SpanOptions) -> Self {
        Self {
            opts,
            clock_offset_ns: clock_offset_ns(),
        }
    }

    /// A factory with a fixed clock offset (replays, tests, benchmarks).
    pub fn with_clock_offset(opts: SpanOptions, clock_offset_ns: i128) -> Self {
        Self { opts, clock_offset_ns }
    }

    pub fn to_unix(&self, mono_ns: u64) -> u64 {
        (i128::from(mono_ns) + self.clock_offset_ns).clamp(0, i128::from(u64::MAX)) as u64
    }

    /// The exchange's span: its Host and User-Agent strings become attributes as they are.
    pub fn build(&mut self, cx: ConnExchange, resource: Arc<ProcessInfo>) -> Span {
        let end = cx.end_ns();
        let mut req = cx.exchange.request;
        let resp = cx.exchange.response.as_ref();
        let f = &cx.facts;
        let kind = match f.side {
            Side::Server => SpanKind::Server,
            Side::Client => SpanKind::Client,
        };
        let (path, query) = split_target(&req.target);
        let mut attrs: Vec<(&'static str, AttrValue)> = Vec::with_capacity(18);
        attrs.push((crate::vocab::attr::HTTP_REQUEST_METHOD, method_value(&req.method)));
        // A configured route names a server span and is its `http.route`; otherwise the name is
        // the generalised path, which is also url.path unless asked otherwise.
        let configured = (kind == SpanKind::Server)
            .then(|| crate::routes::first_match(&self.opts.routes, path))
            .flatten();
        let generalised = route(path);
        let name = match configured {
            Some(r) => format!("{} {}", req.method, r.text),
            None => span_name(&req.method, &generalised),
        };
        let url_path = if self.opts.keep_path {
            path.to_owned()
        } else {
            generalised
        };
        attrs.push((crate::vocab::attr::URL_PATH, AttrValue::text(url_path)));
        if let Some(q) = query {
            let q = if self.opts.keep_query_values {
                q.to_owned()
            } else {
                redact_query(q)
            };
            attrs.push((crate::vocab::attr::URL_QUERY, AttrValue::text(q)));
        }
        attrs.push((crate::vocab::attr::URL_SCHEME, AttrValue::fixed("http")));
        attrs.push((
            crate::vocab::attr::NETWORK_PROTOCOL_VERSION,
            AttrValue::fixed(if req.version_minor == 0 { "1.0" } else { "1.1" }),
        ));
        let (host, host_port) = req.host.take().map_or((None, None), |h| {
            let (host, port) = host_and_port(h);
            (Some(host), port)
        });
        // Formatted once: it is both client.address (server spans) and network.peer.address.
        let remote_ip = f.remote.map(|r| ip_text(r.ip()));
        match kind {
            SpanKind::Server => {
                if let Some(a) = host.or_else(|| f.local.map(|l| ip_text(l.ip()))) {
                    attrs.push((crate::vocab::attr::SERVER_ADDRESS, AttrValue::text(a)));
                }
                if let Some(port) = f.local.map(|l| l.port()).or(host_port) {
                    attrs.push((crate::vocab::attr::SERVER_PORT, AttrValue::Int(i64::from(port))));
                }
                if let (Some(r), Some(ip)) = (f.remote, &remote_ip) {
                    attrs.push((crate::vocab::attr::CLIENT_ADDRESS, AttrValue::text(ip.as_str())));
                    attrs.push((crate::vocab::attr::CLIENT_PORT, AttrValue::Int(i64::from(r.port()))));
                }
            }
            SpanKind::Client => {
                if let Some(a) = host.or_else(|| remote_ip.clone()) {
                    attrs.push((crate::vocab::attr::SERVER_ADDRESS, AttrValue::text(a)));
                }
                if let Some(port) = f.remote.map(|r| r.port()).or(host_port) {
                    attrs.push((crate::vocab::attr::SERVER_PORT, AttrValue::Int(i64::from(port))));
                }
            }
        }
        if let (Some(r), Some(ip)) = (f.remote, remote_ip) {
            attrs.push((crate::vocab::attr::NETWORK_PEER_ADDRESS, AttrValue::text(ip)));
            attrs.push((
                crate::vocab::attr::NETWORK_PEER_PORT,
                AttrValue::Int(i64::from(r.port())),
            ));
        }
        if let Some(ua) = req.user_agent.take() {
            attrs.push(("user_agent.original", AttrValue::text(ua)));
        }
        if req.content_length.is_some() || req.body_bytes > 0 {
            attrs.push((
                crate::vocab::attr::HTTP_REQUEST_BODY_SIZE,
                AttrValue::Int(req.body_bytes as i64),
            ));
        }
        let mut error = false;
        match resp {
            Some(r) => {
                attrs.push((
                    crate::vocab::attr::HTTP_RESPONSE_STATUS_CODE,
                    AttrValue::Int(i64::from(r.status)),
                ));
                attrs.push((
                    crate::vocab::attr::HTTP_RESPONSE_BODY_SIZE,
                    AttrValue::Int(r.body_bytes as i64),
                ));
                let failed = match kind {
                    SpanKind::Server => r.status >= 500,
                    SpanKind::Client => r.status >= 400,
                };
                if failed {
                    error = true;
                    attrs.push((crate::vocab::attr::ERROR_TYPE, AttrValue::text(r.status.to_string())));
                }
            }
            None if cx.at_shutdown => {
                // Still in flight when the agent stopped: not a failure of the service.
                attrs.push((crate::vocab::attr::SOCKSPAN_INCOMPLETE, AttrValue::Bool(true)));
            }
            None => {
                error = true;
                attrs.push((crate::vocab::attr::ERROR_TYPE, AttrValue::fixed("no_response")));
            }
        }
        if let Some(r) = configured {
            attrs.push((crate::vocab::attr::HTTP_ROUTE, AttrValue::text(r.text.as_str())));
        }
        let start = req.first_ns;
        let end = end.max(start);
        Span {
            trace_id: [0; 16],
            span_id: [0; 8],
            parent_span_id: None,
            kind,
            name,
            start_unix_ns: self.to_unix(start),
            end_unix_ns: self.to_unix(end),
            attributes: attrs,
            error,
            resource,
            links: Vec::new(),
            upstream_sampled: None,
        }
    }
}

/// The method as an attribute value: the standard methods without an allocation.
fn method_value(method: &str) -> AttrValue {
    const KNOWN: [&str; 9] = [
        "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE",
    ];
    match KNOWN.iter().find(|m| **m == method) {
        Some(m) => AttrValue::fixed(m),
        None => AttrValue::text(method),
    }
}

/// Path and query of a request target (origin-form or absolute-form).
pub fn split_target(target: &str) -> (&str, Option<&str>) {
    let mut t = target;
    if let Some(rest) = t.strip_prefix("http://").or_else(|| t.strip_prefix("https://")) {
        t = rest.find('/').map_or("/", |i| &rest[i..]);
    }
    let t = t.split('#').next().unwrap_or(t);
    match t.split_once('?') {
        Some((p, q)) => (if p.is_empty() { "/" } else { p }, Some(q)),
        None => (if t.is_empty() { "/" } else { t }, None),
    }
}

/// `a=1&b=2&tok` → `a=REDACTED&b=REDACTED&REDACTED`: keys are kept (low-risk and useful), a
/// component without `=` is redacted whole (it may be a bare token: `?eyJhbGciOi…`).
pub fn redact_query(q: &str) -> String {
    const REDACTED: &str = "REDACTED";
    // Written into one string: this runs for every span with a query.
    let mut out = String::with_capacity(q.len() + 16);
    for (i, kv) in q.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        match kv.split_once('=') {
            Some((k, _)) => {
                out.push_str(k);
                out.push('=');
                out.push_str(REDACTED);
            }
            None if kv.is_empty() => {}
            None => out.push_str(REDACTED),
        }
    }
    out
}

/// An authority without its `user:password@` part (a client that builds `Host` from a URL
/// with credentials sends them there).
fn without_userinfo(authority: &str) -> &str {
    authority.rsplit_once('@').map_or(authority, |(_, host)| host)
}

/// A Host header's host (without userinfo or port), in the header's own string, and its port.
fn host_and_port(mut authority: String) -> (String, Option<u16>) {
    let (start, end, port) = {
        let (host, port) = split_host_port(without_userinfo(&authority));
        let start = host.as_ptr() as usize - authority.as_ptr() as usize;
        (start, start + host.len(), port)
    };
    authority.truncate(end);
    authority.drain(..start);
    (authority, port)
}

/// "host:port" / "[v6]:port" / "host".
fn split_host_port(h: &str) -> (&str, Option<u16>) {
    if let Some(rest) = h.strip_prefix('[')
        && let Some((ip, tail)) = rest.split_once(']')
    {
        return (ip, tail.strip_prefix(':').and_then(|p| p.parse().ok()));
    }
    match h.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => (host, port.parse().ok()),
        _ => (h, None),
    }
}

/// An address as text; IPv4 without the formatting machinery (it is two attributes of
/// nearly every span).
fn ip_text(ip: std::net::IpAddr) -> String {
    let std::net::IpAddr::V4(v4) = ip else {
        return ip.to_string();
    };
    let mut out = String::with_capacity(15);
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        if octet >= 100 {
            out.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            out.push(char::from(b'0' + octet / 10 % 10));
        }
        out.push(char::from(b'0' + octet % 10));
    }
    out
}

/// `{method} {route}`, built in one allocation.
fn span_name(method: &str, route: &str) -> String {
    let mut name = String::with_capacity(method.len() + 1 + route.len());
    name.push_str(method);
    name.push(' ');
    name.push_str(route);
    name
}

/// Low-cardinality route, safe to export: identifier- and secret-like path segments become
/// placeholders (`{id}`, `{email}`, `{token}`, see [`placeholder`]).
pub fn route(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    push_route(&mut out, path);
    out
}

fn push_route(out: &mut String, path: &str) {
    let start = out.len();
    for (i, seg) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(placeholder(seg).unwrap_or(seg));
    }
    if out.len() == start {
        out.push('/');
    }
}

/// What replaces a path segment that names one thing (an id) or may be a secret (an email, a
/// token); `None` for a plain name.
fn placeholder(seg: &str) -> Option<&'static str> {
    if seg.is_empty() {
        return None;
    }
    if is_email(seg) {
        Some("{email}")
    } else if is_jwt(seg) {
        Some("{token}")
    } else if is_identifier(seg) {
        Some("{id}")
    } else if is_token(seg) {
        Some("{token}")
    } else {
        None
    }
}

/// All digits, a UUID, or ≥ 8 characters with at least one digit (hashes, ids, most tokens).
fn is_identifier(seg: &str) -> bool {
    let digits = seg.bytes().filter(u8::is_ascii_digit).count();
    digits == seg.len()
        || (seg.len() == 36
            && seg.bytes().filter(|&b| b == b'-').count() == 4
            && seg.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'))
        || (seg.len() >= 8 && digits > 0)
}

/// `local@domain.tld`, raw or percent-encoded (`%40`).
fn is_email(seg: &str) -> bool {
    // One byte scan first: most segments have neither '@' nor '%'.
    let Some(first) = seg.bytes().position(|b| b == b'@' || b == b'%') else {
        return false;
    };
    let at = seg[first..]
        .find('@')
        .map(|i| (first + i, 1))
        .or_else(|| seg[first..].find("%40").map(|i| (first + i, 3)));
    at.is_some_and(|(i, len)| i > 0 && seg[i + len..].contains('.'))
}

/// A JSON Web Token: three base64url parts, the first a JSON object (`eyJ` is `{"`).
fn is_jwt(seg: &str) -> bool {
    seg.starts_with("eyJ") && seg.bytes().filter(|&b| b == b'.').count() == 2
}

/// A digit-free random-looking string: ≥ 16 characters of the base64/URL-token alphabet whose
/// letters mix cases the way random text does (a quarter or more upper case, and some lower
/// case), or hex of ≥ 16 characters. `getUserProfileSettings` stays a name.
fn is_token(seg: &str) -> bool {
    if seg.len() < 16
        || !seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'+' | b'=' | b'.' | b'~' | b'%'))
    {
        return false;
    }
    let upper = seg.bytes().filter(u8::is_ascii_uppercase).count();
    let lower = seg.bytes().filter(u8::is_ascii_lowercase).count();
    seg.bytes().all(|b| b.is_ascii_hexdigit()) || (upper * 4 >= seg.len() && lower >= 2)
}

/// Unix time minus CLOCK_MONOTONIC (what `bpf_ktime_get_ns` reads), in ns.
fn clock_offset_ns() -> i128 {
    let mono = monotonic_ns();
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128);
    unix - i128::from(mono)
}

pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// splitmix64: fast, statistically good ids (not for secrets).
pub struct IdGenerator(u64);

impl IdGenerator {
    pub fn seeded(seed: u64) -> Self {
        Self(seed)
    }

    pub fn trace_id(&mut self) -> [u8; 16] {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&self.next_nonzero().to_be_bytes());
        id[8..].copy_from_slice(&self.next_nonzero().to_be_bytes());
        id
    }

    pub fn span_id(&mut self) -> [u8; 8] {
        self.next_nonzero().to_be_bytes()
    }

    pub fn from_entropy() -> Self {
        let mut seed = [0u8; 8];
        let ok = std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed))
            .is_ok();
        let mut s = u64::from_ne_bytes(seed);
        if !ok {
            s = monotonic_ns() ^ (u64::from(std::process::id()) << 32);
        }
        Self(s)
    }

    fn next_nonzero(&mut self) -> u64 {
        loop {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            if z != 0 {
                return z;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_generalise_identifiers() {
        for (path, want) in [
            ("/", "/"),
            ("/api/v1/users", "/api/v1/users"),
            ("/users/123", "/users/{id}"),
            ("/item/r000123x9f", "/item/{id}"),
            ("/o/550e8400-e29b-41d4-a716-446655440000/x", "/o/{id}/x"),
            ("/static/index.html", "/static/index.html"),
            ("/page2", "/page2"),
            ("/users/bob@example.com/orders", "/users/{email}/orders"),
            ("/u/bob%40example.com", "/u/{email}"),
            ("/reset/QmFzZTYxVGrZWXaXRoTmEaWdpdHM", "/reset/{token}"),
            ("/k/9f86d081884c7d659a2feaa0c55ad015", "/k/{id}"),
            ("/k/deadbeefcafebabedeadbeef", "/k/{token}"),
            ("/k/abcdefabcdefabcdef", "/k/{token}"),
            ("/a/eyJhbGciOiJIUzI1NiJ9.e30.c2ln", "/a/{token}"),
            ("/api/getUserProfileSettings", "/api/getUserProfileSettings"),
            ("/docs/introduction-to-the-api", "/docs/introduction-to-the-api"),
            ("/v1/@me", "/v1/@me"),
        ] {
            assert_eq!(route(path), want, "{path}");
        }
    }

    #[test]
    fn addresses_as_text() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.255.9",
            "192.168.100.199",
            "::1",
            "fe80::1:2",
        ] {
            assert_eq!(ip_text(ip.parse().unwrap()), ip);
        }
    }

    #[test]
    fn targets_and_queries() {
        assert_eq!(split_target("/a/b?x=1&y"), ("/a/b", Some("x=1&y")));
        assert_eq!(split_target("http://h:8/p?q=1"), ("/p", Some("q=1")));
        assert_eq!(split_target("http://h"), ("/", None));
        assert_eq!(split_target("?q"), ("/", Some("q")));
        assert_eq!(
            redact_query("token=SECRET&x=1&flag"),
            "token=REDACTED&x=REDACTED&REDACTED"
        );
        assert_eq!(redact_query("eyJhbGciOiJIUzI1NiJ9.e30.sig"), "REDACTED");
        assert_eq!(redact_query("a=1&&b"), "a=REDACTED&&REDACTED");
    }

    #[test]
    fn credentials_in_an_authority_are_dropped() {
        assert_eq!(split_host_port(without_userinfo("user:pw@h:8")), ("h", Some(8)));
        for (header, host, port) in [
            ("user:pw@h:8", "h", Some(8)),
            ("[::1]:80", "::1", Some(80)),
            ("example.com", "example.com", None),
            ("a@[fe80::1]", "fe80::1", None),
        ] {
            assert_eq!(host_and_port(header.into()), (host.to_owned(), port), "{header}");
        }
        assert_eq!(without_userinfo("h:8"), "h:8");
        assert_eq!(split_target("http://user:pw@h:8/p?q=1"), ("/p", Some("q=1")));
    }

    #[test]
    fn host_ports() {
        assert_eq!(split_host_port("example.com:8080"), ("example.com", Some(8080)));
        assert_eq!(split_host_port("[::1]:80"), ("::1", Some(80)));
        assert_eq!(split_host_port("localhost"), ("localhost", None));
    }
}
