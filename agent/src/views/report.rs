//! Where the time went, over many spans: per operation (a service's route, or a call it makes)
//! the count, rate, error share, p50/p95/p99 and time of its own; per service, its share of all
//! the time of their own. A call's own time (its duration less the server span it reached) is
//! the network, queues and any untraced dependency: it is shown as the callee's (`→ payments`,
//! or `→ host:port` when the callee is not traced), not the caller's.
use std::{collections::HashMap, fmt::Write as _};

use super::waterfall::{self, human};
use crate::span::{AttrValue, Span, SpanKind};

#[derive(Debug, Clone, PartialEq)]
pub struct OpStats {
    /// `service SERVER GET /users/{id}` style key parts.
    pub service: String,
    pub kind: SpanKind,
    pub name: String,
    pub count: u64,
    pub errors: u64,
    pub p50_ns: u64,
    pub p95_ns: u64,
    pub p99_ns: u64,
    /// Time of its own, summed over its spans.
    pub own_ns: u64,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Slowest first (by p95).
    pub ops: Vec<OpStats>,
    /// (service, or `→ callee` for calls' own time; its own time), largest first.
    pub services: Vec<(String, u64)>,
    /// From the first span's start to the last span's end.
    pub window_ns: u64,
}

/// The `p`-quantile (0..=1) of sorted values, nearest rank.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Each span's own time: its duration less the union of its children's (same trace).
pub fn own_times(spans: &[Span]) -> Vec<u64> {
    let by_id: HashMap<([u8; 16], [u8; 8]), usize> = spans
        .iter()
        .enumerate()
        .map(|(i, s)| ((s.trace_id, s.span_id), i))
        .collect();
    let mut children: HashMap<usize, Vec<usize>> = HashMap::new();
    for (i, s) in spans.iter().enumerate() {
        if let Some(&p) = s.parent_span_id.and_then(|p| by_id.get(&(s.trace_id, p))) {
            children.entry(p).or_default().push(i);
        }
    }
    (0..spans.len())
        .map(|i| waterfall::own_time(spans, i, children.get(&i).map_or(&[][..], Vec::as_slice)))
        .collect()
}

fn peer(s: &Span) -> String {
    let v = |k: &str| match s.attr(k) {
        Some(AttrValue::Str(a)) => a.to_string(),
        Some(AttrValue::Int(p)) => p.to_string(),
        _ => "?".to_owned(),
    };
    format!(
        "{}:{}",
        v(crate::vocab::attr::SERVER_ADDRESS),
        v(crate::vocab::attr::SERVER_PORT)
    )
}

/// The report of the spans `keep` picks; own times count every span's children, kept or not.
pub fn build(spans: &[Span], keep: impl Fn(&Span) -> bool) -> Report {
    let own = own_times(spans);
    struct Acc {
        durations: Vec<u64>,
        errors: u64,
        own_ns: u64,
    }
    let mut ops: HashMap<(String, SpanKind, String), Acc> = HashMap::new();
    let mut services: HashMap<String, u64> = HashMap::new();
    // The service each call reached (its server child), when traced.
    let callee: HashMap<([u8; 16], [u8; 8]), &str> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Server)
        .filter_map(|s| Some(((s.trace_id, s.parent_span_id?), s.resource.service_name.as_str())))
        .collect();
    for (s, &own_ns) in spans.iter().zip(&own).filter(|(s, _)| keep(s)) {
        let a = ops
            .entry((s.resource.service_name.clone(), s.kind, s.name.clone()))
            .or_insert(Acc {
                durations: Vec::new(),
                errors: 0,
                own_ns: 0,
            });
        a.durations.push(s.end_unix_ns.saturating_sub(s.start_unix_ns));
        a.errors += u64::from(s.error);
        a.own_ns += own_ns;
        let who = match s.kind {
            SpanKind::Server => s.resource.service_name.clone(),
            SpanKind::Client => match callee.get(&(s.trace_id, s.span_id)) {
                Some(service) => format!("→ {service}"),
                None => format!("→ {}", peer(s)),
            },
        };
        *services.entry(who).or_default() += own_ns;
    }
    let mut ops: Vec<OpStats> = ops
        .into_iter()
        .map(|((service, kind, name), mut a)| {
            a.durations.sort_unstable();
            OpStats {
                service,
                kind,
                name,
                count: a.durations.len() as u64,
                errors: a.errors,
                p50_ns: percentile(&a.durations, 0.50),
                p95_ns: percentile(&a.durations, 0.95),
                p99_ns: percentile(&a.durations, 0.99),
                own_ns: a.own_ns,
            }
        })
        .collect();
    ops.sort_by(|a, b| b.p95_ns.cmp(&a.p95_ns).then_with(|| a.name.cmp(&b.name)));
    let mut services: Vec<(String, u64)> = services.into_iter().collect();
    services.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let start = spans
        .iter()
        .filter(|s| keep(s))
        .map(|s| s.start_unix_ns)
        .min()
        .unwrap_or(0);
    let end = spans
        .iter()
        .filter(|s| keep(s))
        .map(|s| s.end_unix_ns)
        .max()
        .unwrap_or(start);
    Report {
        ops,
        services,
        window_ns: end.saturating_sub(start),
    }
}

/// The report as text: the `top` slowest operations, then the time per service.
pub fn render(r: &Report, top: usize) -> String {
    let mut out = String::new();
    let secs = (r.window_ns as f64 / 1e9).max(1e-9);
    let _ = writeln!(
        out,
        "slowest operations (by p95), over {}:\n{:<44} {:>8} {:>9} {:>7} {:>10} {:>10} {:>10} {:>11}",
        human(r.window_ns),
        "operation",
        "count",
        "rate/s",
        "errors",
        "p50",
        "p95",
        "p99",
        "own time"
    );
    for o in r.ops.iter().take(top) {
        let op = format!("{} {} {}", o.service, o.kind.as_str(), o.name);
        let _ = writeln!(
            out,
            "{:<44} {:>8} {:>9.1} {:>6.1}% {:>10} {:>10} {:>10} {:>11}",
            op,
            o.count,
            o.count as f64 / secs,
            o.errors as f64 * 100.0 / o.count.max(1) as f64,
            human(o.p50_ns),
            human(o.p95_ns),
            human(o.p99_ns),
            human(o.own_ns)
        );
    }
    let total: u64 = r.services.iter().map(|(_, t)| t).sum::<u64>().max(1);
    let _ = writeln!(
        out,
        "\ntime per service (own time; → callee: calls' network, queues, untraced callees):"
    );
    for (who, t) in &r.services {
        let _ = writeln!(
            out,
            "{:<44} {:>11} {:>6.1}%",
            who,
            human(*t),
            *t as f64 * 100.0 / total as f64
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn span(id: u8, parent: Option<u8>, kind: SpanKind, service: &str, name: &str, start: u64, end: u64) -> Span {
        crate::views::test_span(id, parent, kind, service, name, (start, end))
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.50), 50);
        assert_eq!(percentile(&v, 0.95), 95);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&[7], 0.99), 7);
        assert_eq!(percentile(&[], 0.5), 0);
    }

    #[test]
    fn own_time_goes_to_the_service_and_calls_to_their_peer() {
        // order serves 100 ms, of which a call takes 80; the payment server answers in 60.
        let spans = vec![
            span(1, None, SpanKind::Server, "order", "GET /checkout", 0, 100),
            span(2, Some(1), SpanKind::Client, "order", "POST /pay", 10, 90),
            span(3, Some(2), SpanKind::Server, "payment", "POST /pay", 20, 80),
        ];
        assert_eq!(own_times(&spans), vec![20 * MS, 20 * MS, 60 * MS]);
        let r = build(&spans, |_| true);
        assert_eq!(
            r.services,
            vec![
                ("payment".to_owned(), 60 * MS),
                ("order".to_owned(), 20 * MS),
                ("→ payment".to_owned(), 20 * MS)
            ]
        );
        assert_eq!(r.ops[0].name, "GET /checkout");
        assert_eq!(r.ops[0].p95_ns, 100 * MS);
        assert_eq!(r.window_ns, 100 * MS);
        let text = render(&r, 5);
        assert!(
            text.contains("payment") && text.contains("60.0 ms") && text.contains("60.0%"),
            "{text}"
        );
    }
}
