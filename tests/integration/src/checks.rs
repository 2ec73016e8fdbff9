//! Assertions on the spans of one HTTP exchange, the way a user would check them.

use std::time::Duration;

use anyhow::{Result, bail};

use crate::receiver::CollectedSpan;

/// How to check `service.name`.
#[derive(Clone, Copy, Debug)]
pub enum Svc<'a> {
    Exact(&'a str),
    Prefix(&'a str),
}

impl Svc<'_> {
    fn matches(&self, got: Option<&str>) -> bool {
        match (self, got) {
            (Svc::Exact(w), Some(g)) => *w == g,
            (Svc::Prefix(w), Some(g)) => g.starts_with(w),
            _ => false,
        }
    }
}

/// What one exchange should look like.
#[derive(Clone, Debug)]
pub struct Expect<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// The expected route, e.g. `/e2e/pycurl/{id}`; the span name is `"{method} {route}"`.
    pub route: &'a str,
    pub status: i64,
    pub server_port: u16,
    /// "1.1" or "1.0".
    pub version: &'a str,
    pub server_service: Svc<'a>,
    pub client_service: Svc<'a>,
    /// The client's local port, when the client reported it.
    pub client_port: Option<u16>,
    /// Wall-clock window (ns) around the request; spans must fall inside (with slack).
    pub window: (u64, u64),
}

/// The spans of one exchange.
#[derive(Clone, Debug)]
pub struct Exchange {
    pub server: CollectedSpan,
    pub client: CollectedSpan,
}

pub fn describe(spans: &[CollectedSpan]) -> String {
    spans.iter().map(|s| format!("  {s}")).collect::<Vec<_>>().join("\n")
}

/// Spans whose `url.path` is exactly `path`.
pub fn with_path<'a>(spans: &'a [CollectedSpan], path: &str) -> Vec<&'a CollectedSpan> {
    spans.iter().filter(|s| s.url_path() == Some(path)).collect()
}

/// Exactly one SERVER and one CLIENT span for `path`.
pub fn one_exchange(spans: &[CollectedSpan], path: &str) -> Result<Exchange> {
    let mine = with_path(spans, path);
    let servers: Vec<_> = mine.iter().filter(|s| s.is_server()).collect();
    let clients: Vec<_> = mine.iter().filter(|s| s.is_client()).collect();
    if servers.len() != 1 || clients.len() != 1 || mine.len() != 2 {
        let all: Vec<CollectedSpan> = mine.iter().map(|s| (*s).clone()).collect();
        bail!(
            "expected exactly 1 SERVER + 1 CLIENT span for url.path={path}, got {} server, {} client, {} total:\n{}",
            servers.len(),
            clients.len(),
            mine.len(),
            describe(&all)
        );
    }
    Ok(Exchange {
        server: (**servers[0]).clone(),
        client: (**clients[0]).clone(),
    })
}

const SLACK_NS: u64 = 2_000_000_000;

fn check_common(s: &CollectedSpan, e: &Expect, problems: &mut Vec<String>) {
    let who = s.kind.clone();
    let mut p = |m: String| problems.push(format!("{who}: {m}"));
    let want_name = format!("{} {}", e.method, e.route);
    if s.name != want_name {
        p(format!("name {:?}, want {want_name:?}", s.name));
    }
    if s.attr_str("http.request.method") != Some(e.method) {
        p(format!(
            "http.request.method {:?}, want {:?}",
            s.attr("http.request.method"),
            e.method
        ));
    }
    if s.url_path() != Some(e.path) {
        p(format!("url.path {:?}, want {:?}", s.attr("url.path"), e.path));
    }
    if s.attr_str("url.scheme") != Some("http") {
        p(format!("url.scheme {:?}, want \"http\"", s.attr("url.scheme")));
    }
    if s.attr_int("http.response.status_code") != Some(e.status) {
        p(format!(
            "http.response.status_code {:?}, want int {}",
            s.attr("http.response.status_code"),
            e.status
        ));
    }
    if s.attr_int("server.port") != Some(e.server_port as i64) {
        p(format!(
            "server.port {:?}, want int {}",
            s.attr("server.port"),
            e.server_port
        ));
    }
    if s.attr_str("server.address").is_none() {
        p(format!("server.address missing: {:?}", s.attr("server.address")));
    }
    if s.attr_str("network.protocol.version") != Some(e.version) {
        p(format!(
            "network.protocol.version {:?}, want {:?}",
            s.attr("network.protocol.version"),
            e.version
        ));
    }
    if s.attr_str("network.peer.address").is_none() {
        p(format!(
            "network.peer.address missing: {:?}",
            s.attr("network.peer.address")
        ));
    }
    if s.res_int("process.pid").is_none_or(|p| p <= 0) {
        p(format!(
            "resource process.pid {:?}, want positive int",
            s.resource.get("process.pid")
        ));
    }
    if s.res_str("process.executable.name").is_none_or(str::is_empty) {
        p(format!(
            "resource process.executable.name {:?}",
            s.resource.get("process.executable.name")
        ));
    }
    if s.res_str("host.name").is_none_or(str::is_empty) {
        p(format!("resource host.name {:?}", s.resource.get("host.name")));
    }
    if s.trace_id.len() != 32 || s.trace_id.chars().all(|c| c == '0') {
        p(format!("trace_id {:?} is not a valid 16-byte id", s.trace_id));
    }
    if s.span_id.len() != 16 || s.span_id.chars().all(|c| c == '0') {
        p(format!("span_id {:?} is not a valid 8-byte id", s.span_id));
    }
    if s.end_ns < s.start_ns {
        p(format!("end {} before start {}", s.end_ns, s.start_ns));
    }
    if s.duration() > Duration::from_secs(10) {
        p(format!("duration {:?} is not sane", s.duration()));
    }
    if s.start_ns + SLACK_NS < e.window.0 || s.end_ns > e.window.1 + SLACK_NS {
        p(format!(
            "times [{}, {}] outside the request's wall-clock window [{}, {}] (±2 s); start is {:.3} s after the window opened",
            s.start_ns,
            s.end_ns,
            e.window.0,
            e.window.1,
            (s.start_ns as f64 - e.window.0 as f64) / 1e9
        ));
    }
}

/// Check a SERVER/CLIENT pair against `e`; every problem found is listed in the error.
pub fn check_exchange(ex: &Exchange, e: &Expect) -> Result<()> {
    let problems = exchange_problems(ex, e);
    if problems.is_empty() {
        Ok(())
    } else {
        bail!(
            "exchange {} {} has problems:\n  - {}\nspans:\n  {}\n  {}",
            e.method,
            e.path,
            problems.join("\n  - "),
            ex.server,
            ex.client
        )
    }
}

/// Every way a SERVER/CLIENT pair differs from `e` (empty when it matches).
pub fn exchange_problems(ex: &Exchange, e: &Expect) -> Vec<String> {
    let mut problems = Vec::new();
    let (s, c) = (&ex.server, &ex.client);
    check_common(s, e, &mut problems);
    check_common(c, e, &mut problems);

    // Service and status, each side: a server fails from 500, a client from 400.
    for (kind, span, service, error_from) in [
        ("SERVER", s, &e.server_service, 500),
        ("CLIENT", c, &e.client_service, 400),
    ] {
        if !service.matches(span.service_name()) {
            problems.push(format!(
                "{kind}: service.name {:?}, want {service:?}",
                span.service_name()
            ));
        }
        let want_status = if e.status >= error_from { "ERROR" } else { "UNSET" };
        if span.status != want_status {
            problems.push(format!(
                "{kind}: status {}, want {want_status} for HTTP {}",
                span.status, e.status
            ));
        }
    }

    // server side
    if s.attr_str("client.address").is_none() {
        problems.push(format!(
            "SERVER: client.address missing: {:?}",
            s.attr("client.address")
        ));
    }
    match s.attr_int("client.port") {
        Some(p) if p > 0 && p != e.server_port as i64 => {
            if let Some(cp) = e.client_port
                && p != cp as i64
            {
                problems.push(format!("SERVER: client.port {p}, but the client's local port was {cp}"));
            }
            if s.attr_int("network.peer.port") != Some(p) {
                problems.push(format!(
                    "SERVER: network.peer.port {:?}, want client.port {p}",
                    s.attr("network.peer.port")
                ));
            }
        }
        other => problems.push(format!(
            "SERVER: client.port {other:?}, want the client's ephemeral port"
        )),
    }

    // client side
    if c.attr_int("network.peer.port") != Some(e.server_port as i64) {
        problems.push(format!(
            "CLIENT: network.peer.port {:?}, want {}",
            c.attr("network.peer.port"),
            e.server_port
        ));
    }
    if e.status >= 400 && c.attr_str("error.type") != Some(e.status.to_string().as_str()) {
        problems.push(format!(
            "CLIENT: error.type {:?}, want {:?}",
            c.attr("error.type"),
            e.status.to_string()
        ));
    }
    if s.res_int("process.pid") == c.res_int("process.pid") {
        problems.push("SERVER and CLIENT spans claim the same process.pid".into());
    }

    // the client span encloses the server span
    if c.start_ns > s.start_ns {
        problems.push(format!(
            "CLIENT starts {} ns after SERVER (client must enclose server)",
            c.start_ns - s.start_ns
        ));
    }
    if c.end_ns < s.end_ns {
        problems.push(format!(
            "CLIENT ends {} ns before SERVER (client must enclose server)",
            s.end_ns - c.end_ns
        ));
    }

    problems
}

/// Whether a span belongs to the test that owns `prefix` (by url.path).
pub fn under(prefix: &str) -> impl Fn(&CollectedSpan) -> bool + '_ {
    move |s: &CollectedSpan| s.url_path().is_some_and(|p| p.starts_with(prefix))
}
