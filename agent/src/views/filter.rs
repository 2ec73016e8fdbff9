//! Which spans a live view shows (`--service`, `--pid`, `--port`, `--route`, `--status`,
//! `--errors`, `--min-duration`): every given filter must pass. Views only; export sees every span.
use std::time::Duration;

use thiserror::Error;

use crate::span::{AttrValue, Span};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("bad status `{0}`: expected a code (404), a class (5xx) or a comparison (>=400, <300)")]
    Status(String),
    #[error("bad duration `{0}`: expected a number with a unit, e.g. 250ms, 2s, 1.5s, 800us")]
    Duration(String),
}

/// Response statuses a view shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFilter {
    Exactly(u16),
    /// `5xx`: 500..=599.
    Class(u16),
    AtLeast(u16),
    Below(u16),
}

impl StatusFilter {
    pub fn parse(s: &str) -> Result<Self, FilterError> {
        let bad = || FilterError::Status(s.to_owned());
        let t = s.trim();
        let num = |v: &str| v.trim().parse::<u16>().ok().filter(|c| (100..=999).contains(c));
        if let Some(v) = t.strip_prefix(">=") {
            return num(v).map(Self::AtLeast).ok_or_else(bad);
        }
        if let Some(v) = t.strip_prefix('>') {
            return num(v).map(|c| Self::AtLeast(c + 1)).ok_or_else(bad);
        }
        if let Some(v) = t.strip_prefix("<=") {
            return num(v).map(|c| Self::Below(c + 1)).ok_or_else(bad);
        }
        if let Some(v) = t.strip_prefix('<') {
            return num(v).map(Self::Below).ok_or_else(bad);
        }
        let lower = t.to_ascii_lowercase();
        if let Some(d) = lower.strip_suffix("xx") {
            return match d.parse::<u16>() {
                Ok(c @ 1..=9) if d.len() == 1 => Ok(Self::Class(c)),
                _ => Err(bad()),
            };
        }
        num(t).map(Self::Exactly).ok_or_else(bad)
    }

    pub fn matches(self, status: u16) -> bool {
        match self {
            Self::Exactly(c) => status == c,
            Self::Class(d) => status / 100 == d,
            Self::AtLeast(c) => status >= c,
            Self::Below(c) => status < c,
        }
    }
}

/// `250ms`, `2s`, `1.5s`, `800us` / `800µs`, `1m`.
pub fn parse_duration(s: &str) -> Result<Duration, FilterError> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| FilterError::Duration(s.to_owned()))?;
    let secs = match unit.trim() {
        "ns" => n / 1e9,
        "us" | "µs" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(FilterError::Duration(s.to_owned())),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| FilterError::Duration(s.to_owned()))
}

/// `*` matches any run of characters (`/users/*`, `*checkout*`); everything else literally.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// Which spans a live view shows (`--print`, `--top`, `replay`, `analyze`); every given filter
/// must pass, and the default passes every span. Export is never filtered.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SpanFilter {
    /// Show only these services (globs, e.g. `pay*`; repeatable or comma-separated).
    #[arg(
        global = true,
        long = "service",
        env = "SOCKSPAN_SERVICE",
        value_name = "NAME",
        value_delimiter = ','
    )]
    pub services: Vec<String>,
    /// Show only these processes (repeatable or comma-separated).
    #[arg(
        global = true,
        long = "pid",
        env = "SOCKSPAN_PID",
        value_name = "PID",
        value_delimiter = ','
    )]
    pub pids: Vec<u32>,
    /// Show only spans of these server ports (a server's own, a client's peer's).
    #[arg(
        global = true,
        long = "port",
        env = "SOCKSPAN_PORT",
        value_name = "PORT",
        value_delimiter = ','
    )]
    pub ports: Vec<u16>,
    /// Show only routes matching this glob (`/users/*`, `*checkout*`).
    #[arg(global = true, long, env = "SOCKSPAN_ROUTE", value_name = "GLOB")]
    pub route: Option<String>,
    /// Show only these response statuses: `404`, `5xx`, `>=400`, `<300`.
    #[arg(global = true, long, env = "SOCKSPAN_STATUS", value_name = "STATUS", value_parser = StatusFilter::parse)]
    pub status: Option<StatusFilter>,
    /// Show only errors (5xx answers to servers, 4xx/5xx or no answer to clients).
    #[arg(global = true, id = "errors", long = "errors", env = "SOCKSPAN_ERRORS")]
    pub errors_only: bool,
    /// Show only spans at least this long: `250ms`, `2s`.
    #[arg(global = true, long, env = "SOCKSPAN_MIN_DURATION", value_name = "DURATION", value_parser = parse_duration)]
    pub min_duration: Option<Duration>,
}

impl SpanFilter {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
            && self.pids.is_empty()
            && self.ports.is_empty()
            && self.route.is_none()
            && self.status.is_none()
            && !self.errors_only
            && self.min_duration.is_none()
    }

    pub fn matches(&self, span: &Span) -> bool {
        let int = |k: &str| match span.attr(k) {
            Some(AttrValue::Int(v)) => Some(*v),
            _ => None,
        };
        if !self.services.is_empty()
            && !self
                .services
                .iter()
                .any(|g| glob_matches(g, &span.resource.service_name))
        {
            return false;
        }
        if !self.pids.is_empty() && !self.pids.contains(&span.resource.pid) {
            return false;
        }
        if !self.ports.is_empty()
            && !int(crate::vocab::attr::SERVER_PORT).is_some_and(|p| self.ports.iter().any(|&q| i64::from(q) == p))
        {
            return false;
        }
        if let Some(g) = &self.route
            && !glob_matches(g, route_of(span))
        {
            return false;
        }
        if let Some(st) = self.status
            && !int(crate::vocab::attr::HTTP_RESPONSE_STATUS_CODE)
                .is_some_and(|c| u16::try_from(c).is_ok_and(|c| st.matches(c)))
        {
            return false;
        }
        if self.errors_only && !span.error {
            return false;
        }
        if let Some(min) = self.min_duration
            && span.end_unix_ns.saturating_sub(span.start_unix_ns) < min.as_nanos() as u64
        {
            return false;
        }
        true
    }
}

/// The route of a span: its name without the method (`GET /users/{id}` → `/users/{id}`).
pub fn route_of(span: &Span) -> &str {
    span.name.split_once(' ').map_or(span.name.as_str(), |(_, r)| r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        let p = |s: &str| StatusFilter::parse(s);
        assert_eq!(p("5xx"), Ok(StatusFilter::Class(5)));
        assert_eq!(p(">=400"), Ok(StatusFilter::AtLeast(400)));
        assert_eq!(p(">499"), Ok(StatusFilter::AtLeast(500)));
        assert_eq!(p("<300"), Ok(StatusFilter::Below(300)));
        assert_eq!(p("404"), Ok(StatusFilter::Exactly(404)));
        for bad in ["", "abc", "50", "xx", "0xx", "12xx", ">=", "99"] {
            assert!(p(bad).is_err(), "{bad}");
        }
        assert!(StatusFilter::Class(5).matches(503) && !StatusFilter::Class(5).matches(404));
        assert!(StatusFilter::AtLeast(400).matches(404) && !StatusFilter::AtLeast(400).matches(399));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("800us"), Ok(Duration::from_micros(800)));
        for bad in ["", "ms", "5", "5 parsecs", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn globs() {
        assert!(glob_matches("/users/*", "/users/{id}"));
        assert!(glob_matches("*pay*", "/api/payments"));
        assert!(glob_matches("a*b*c", "aXbYc") && !glob_matches("a*b*c", "aXcYb"));
        assert!(glob_matches("exact", "exact") && !glob_matches("exact", "exactly"));
        assert!(!glob_matches("ab*ba", "aba"));
    }

    #[test]
    fn filters_combine() {
        let mut s = Span::sample(1);
        s.name = "GET /pay/{id}".into();
        s.end_unix_ns = 300_000_000;
        s.error = true;
        s.attributes
            .push((crate::vocab::attr::HTTP_RESPONSE_STATUS_CODE, AttrValue::Int(503)));
        s.attributes
            .push((crate::vocab::attr::SERVER_PORT, AttrValue::Int(8080)));
        let f = SpanFilter {
            services: vec!["s*".into()],
            ports: vec![8080],
            route: Some("/pay/*".into()),
            status: Some(StatusFilter::Class(5)),
            errors_only: true,
            min_duration: Some(Duration::from_millis(250)),
            ..SpanFilter::default()
        };
        assert!(f.matches(&s));
        assert!(SpanFilter::default().matches(&s));
        let slower = SpanFilter {
            min_duration: Some(Duration::from_secs(1)),
            ..f.clone()
        };
        assert!(!slower.matches(&s));
        let other_port = SpanFilter {
            ports: vec![9090],
            ..f.clone()
        };
        assert!(!other_port.matches(&s));
        let pid = SpanFilter {
            pids: vec![2],
            ..SpanFilter::default()
        };
        assert!(!pid.matches(&s));
    }
}
