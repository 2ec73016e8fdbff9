//! One local trace as a timeline a person reads top to bottom: each span's offset from the
//! trace's start, its duration and a proportional bar, nested under its parent; the critical
//! path (the chain of last-finishing children that decides when the root ends) marked, and on it
//! the bottleneck (the span with the most time of its own); retries of one call collapsed into
//! one line with each attempt's outcome; a call's network and queueing time (the client span
//! minus the server span it reached) shown apart; and how each parent was inferred, or that it
//! was never seen, so a broken trace reads as broken.
use std::{collections::HashMap, fmt::Write as _};

use crate::span::{AttrValue, Span, SpanKind};

/// One line of the timeline: a span, or a call and its retries.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// Indices (into the trace's spans) of the span, or of each attempt in order.
    pub spans: Vec<usize>,
    pub depth: usize,
    pub start_ns: u64,
    pub end_ns: u64,
    pub critical: bool,
    pub bottleneck: bool,
    /// A client span's time outside the server span it reached (network, queues, the peer's
    /// accept): its duration minus its one server child's.
    pub network_ns: Option<u64>,
    /// The span names a parent this trace never showed (lost, sampled out, or not traced).
    pub parent_missing: bool,
}

/// The timeline of a trace's spans (any order).
pub fn layout(spans: &[Span]) -> Vec<Line> {
    let by_id: HashMap<[u8; 8], usize> = spans.iter().enumerate().map(|(i, s)| (s.span_id, i)).collect();
    let mut children: HashMap<usize, Vec<usize>> = HashMap::new();
    let mut roots = Vec::new();
    for (i, s) in spans.iter().enumerate() {
        match s.parent_span_id.and_then(|p| by_id.get(&p)) {
            Some(&p) if p != i => children.entry(p).or_default().push(i),
            _ => roots.push(i),
        }
    }
    let by_start = |v: &mut Vec<usize>| v.sort_by_key(|&i| (spans[i].start_unix_ns, spans[i].end_unix_ns));
    by_start(&mut roots);
    for v in children.values_mut() {
        by_start(v);
    }
    let critical = critical_path(spans, &roots, &children);
    let tree = Tree {
        spans,
        by_id,
        children,
        critical,
    };
    let mut lines = Vec::new();
    for &r in &roots {
        push_subtree(&tree, r, 0, &mut lines);
    }
    // The bottleneck: the critical line with the most time of its own (a retried call's: all
    // its attempts').
    let own = |l: &Line| -> u64 { l.spans.iter().map(|&s| own_time(spans, s, tree.kids(s))).sum() };
    if let Some(b) = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.critical)
        .max_by_key(|(_, l)| own(l))
        .map(|(i, _)| i)
    {
        lines[b].bottleneck = true;
    }
    lines
}

/// A trace's spans, each one's children (by start) and whether it is on the critical path.
struct Tree<'a> {
    spans: &'a [Span],
    by_id: HashMap<[u8; 8], usize>,
    children: HashMap<usize, Vec<usize>>,
    critical: Vec<bool>,
}

impl Tree<'_> {
    fn kids(&self, i: usize) -> &[usize] {
        self.children.get(&i).map_or(&[][..], Vec::as_slice)
    }
}

fn push_subtree(t: &Tree<'_>, node: usize, depth: usize, out: &mut Vec<Line>) {
    out.push(line(t, vec![node], depth));
    let kids = t.kids(node);
    let mut i = 0;
    while i < kids.len() {
        // A call and the retries that follow it, one line.
        let mut group = vec![kids[i]];
        while i + group.len() < kids.len() && is_retry_of(&t.spans[kids[i + group.len()]], &t.spans[kids[i]]) {
            group.push(kids[i + group.len()]);
        }
        i += group.len();
        if group.len() == 1 {
            push_subtree(t, group[0], depth + 1, out);
        } else {
            out.push(line(t, group.clone(), depth + 1));
            for &attempt in &group {
                for &k in t.kids(attempt) {
                    push_subtree(t, k, depth + 2, out);
                }
            }
        }
    }
}

fn line(t: &Tree<'_>, group: Vec<usize>, depth: usize) -> Line {
    let spans = t.spans;
    let first = &spans[group[0]];
    let last = group[group.len() - 1];
    let start_ns = first.start_unix_ns;
    let end_ns = group.iter().map(|&i| spans[i].end_unix_ns).max().unwrap_or(start_ns);
    let s = &spans[last];
    let network_ns = match (s.kind, t.kids(last)) {
        (SpanKind::Client, [only]) if spans[*only].kind == SpanKind::Server => {
            Some(duration(s).saturating_sub(duration(&spans[*only])))
        }
        _ => None,
    };
    Line {
        critical: group.iter().any(|&i| t.critical[i]),
        parent_missing: first.parent_span_id.is_some_and(|p| !t.by_id.contains_key(&p)),
        spans: group,
        depth,
        start_ns,
        end_ns,
        bottleneck: false,
        network_ns,
    }
}

fn duration(s: &Span) -> u64 {
    s.end_unix_ns.saturating_sub(s.start_unix_ns)
}

/// A later attempt of the same call: a client span to the same peer with the same name, begun
/// once the earlier one ended, that the stitcher counted as a resend.
fn is_retry_of(later: &Span, first: &Span) -> bool {
    let peer = |s: &Span| {
        (
            attr(s, crate::vocab::attr::SERVER_ADDRESS),
            attr(s, crate::vocab::attr::SERVER_PORT),
        )
    };
    later.kind == SpanKind::Client
        && first.kind == SpanKind::Client
        && later.name == first.name
        && peer(later) == peer(first)
        && later.start_unix_ns >= first.end_unix_ns
        && matches!(later.attr(crate::vocab::attr::HTTP_REQUEST_RESEND_COUNT), Some(AttrValue::Int(n)) if *n > 0)
}

fn attr(s: &Span, key: &str) -> String {
    match s.attr(key) {
        Some(AttrValue::Str(v)) => v.to_string(),
        Some(AttrValue::Int(v)) => v.to_string(),
        Some(AttrValue::Bool(v)) => v.to_string(),
        None => String::new(),
    }
}

/// The span's time not covered by any of its children (clipped to the span).
pub fn own_time(spans: &[Span], node: usize, kids: &[usize]) -> u64 {
    let (start, end) = (
        spans[node].start_unix_ns,
        spans[node].end_unix_ns.max(spans[node].start_unix_ns),
    );
    let mut iv: Vec<(u64, u64)> = kids
        .iter()
        .map(|&k| {
            (
                spans[k].start_unix_ns.clamp(start, end),
                spans[k].end_unix_ns.clamp(start, end),
            )
        })
        .filter(|(a, b)| b > a)
        .collect();
    iv.sort_unstable();
    let mut covered = 0;
    let mut cur: Option<(u64, u64)> = None;
    for (a, b) in iv {
        match cur {
            Some((ca, cb)) if a <= cb => cur = Some((ca, cb.max(b))),
            Some((ca, cb)) => {
                covered += cb - ca;
                cur = Some((a, b));
            }
            None => cur = Some((a, b)),
        }
    }
    if let Some((a, b)) = cur {
        covered += b - a;
    }
    (end - start) - covered
}

/// Spans on the critical path: from each root, the child whose end the parent waited for last
/// (a call the parent gave up on counts up to when it gave up), then the one it waited for
/// last before that child began, and so on, down every level.
pub fn critical_path(spans: &[Span], roots: &[usize], children: &HashMap<usize, Vec<usize>>) -> Vec<bool> {
    let mut on = vec![false; spans.len()];
    let mut stack: Vec<usize> = roots.to_vec();
    while let Some(n) = stack.pop() {
        on[n] = true;
        let kids = children.get(&n).map_or(&[][..], Vec::as_slice);
        let mut until = spans[n].end_unix_ns;
        loop {
            let next = kids
                .iter()
                .copied()
                .filter(|&k| !on[k] && spans[k].start_unix_ns < until)
                .max_by_key(|&k| spans[k].end_unix_ns.min(until));
            let Some(k) = next else { break };
            stack.push(k);
            on[k] = true;
            until = spans[k].start_unix_ns;
        }
    }
    on
}

/// `812 µs`, `12.3 ms`, `8.21 s`.
pub fn human(ns: u64) -> String {
    let ns = ns as f64;
    if ns < 1e6 {
        format!("{:.0} µs", ns / 1e3)
    } else if ns < 1e9 {
        format!("{:.1} ms", ns / 1e6)
    } else {
        format!("{:.2} s", ns / 1e9)
    }
}

/// ANSI styles when writing to a terminal (and `NO_COLOR` is unset); nothing otherwise.
#[derive(Debug, Clone, Copy, Default)]
pub struct Style {
    pub color: bool,
}

impl Style {
    fn paint(self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }
}

/// What one attempt ended with: `200 in 12.0 ms`, `no response in 250.0 ms`.
fn outcome(s: &Span) -> String {
    let status = match s.attr(crate::vocab::attr::HTTP_RESPONSE_STATUS_CODE) {
        Some(AttrValue::Int(c)) => c.to_string(),
        _ => match s.attr(crate::vocab::attr::ERROR_TYPE) {
            Some(AttrValue::Str(e)) if e == "no_response" => "no response".to_owned(),
            Some(AttrValue::Str(e)) => e.to_string(),
            _ => "unfinished".to_owned(),
        },
    };
    format!("{status} in {}", human(duration(s)))
}

/// The trace as text, cut to `width` columns if given.
pub fn render(spans: &[Span], width: Option<usize>, style: Style) -> String {
    let lines = layout(spans);
    let start = spans.iter().map(|s| s.start_unix_ns).min().unwrap_or(0);
    let end = spans.iter().map(|s| s.end_unix_ns).max().unwrap_or(start);
    let total = end.saturating_sub(start).max(1);
    let services: std::collections::BTreeSet<&str> = spans.iter().map(|s| s.resource.service_name.as_str()).collect();
    let errors = spans.iter().filter(|s| s.error).count();
    let broken = lines.iter().filter(|l| l.parent_missing).count();
    let mut out = String::new();
    let trace_id = spans
        .first()
        .map(|s| crate::export::print::hex(&s.trace_id))
        .unwrap_or_default();
    let _ = write!(
        out,
        "trace {trace_id}  {}  {} spans  {} services",
        human(total),
        spans.len(),
        services.len()
    );
    let plural = |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    if errors > 0 {
        let _ = write!(out, "  {}", style.paint("31", &plural(errors, "error", "errors")));
    }
    if broken > 0 {
        let _ = write!(
            out,
            "  {}",
            style.paint("33", &plural(broken, "parent not seen", "parents not seen"))
        );
    }
    out.push('\n');
    let bar_width = width.map_or(30, |w| (w / 5).clamp(10, 30));
    let text_width = width.map_or(usize::MAX, |w| w.saturating_sub(bar_width + 24).max(30));
    for l in &lines {
        let s = &spans[*l.spans.last().expect("a line has a span")];
        let mark = if l.bottleneck {
            "▶"
        } else if l.critical {
            "*"
        } else {
            " "
        };
        let mut text = format!(
            "{}{}[{}] {} {}",
            "  ".repeat(l.depth),
            s.resource.service_name,
            s.resource.pid,
            s.kind.as_str(),
            s.name
        );
        let bottleneck = if l.bottleneck { "  ◀ bottleneck" } else { "" };
        if l.spans.len() > 1 {
            let attempts: Vec<String> = l.spans.iter().map(|&i| outcome(&spans[i])).collect();
            let _ = write!(
                text,
                "{bottleneck}  {} attempts: {}",
                l.spans.len(),
                attempts.join(", ")
            );
        } else {
            match s.attr(crate::vocab::attr::HTTP_RESPONSE_STATUS_CODE) {
                Some(AttrValue::Int(c)) => {
                    let _ = write!(text, " {c}{bottleneck}");
                }
                _ => {
                    let _ = write!(text, " {}{bottleneck}", outcome(s));
                }
            }
        }
        if let Some(n) = l.network_ns {
            let _ = write!(text, "  net {}", human(n));
        }
        if l.parent_missing {
            text.push_str("  [parent not seen]");
        } else if let Some(AttrValue::Str(src)) = s.attr(crate::vocab::attr::SOCKSPAN_PARENT_SOURCE) {
            let _ = write!(text, "  (via {src})");
        }
        if let Some(link) = s.links.first() {
            let _ = write!(text, "  (linked via {})", link.source);
        }
        let text = truncate(&text, text_width);
        let text = if spans[l.spans[l.spans.len() - 1]].error || l.spans.iter().any(|&i| spans[i].error) {
            style.paint("31", &text)
        } else if l.bottleneck {
            style.paint("1", &text)
        } else {
            text
        };
        let _ = writeln!(
            out,
            "{:>10} {:>10} {mark} {}{}",
            format!("+{}", human(l.start_ns.saturating_sub(start))),
            human(l.end_ns.saturating_sub(l.start_ns)),
            bar(
                l.start_ns - start.min(l.start_ns),
                l.end_ns.saturating_sub(l.start_ns),
                total,
                bar_width
            ),
            format_args!(" {text}")
        );
    }
    if let Some(b) = lines.iter().find(|l| l.bottleneck) {
        let s = &spans[b.spans[0]];
        let own: u64 = b
            .spans
            .iter()
            .map(|&i| own_time(spans, i, &children_of(spans, i)))
            .sum();
        let _ = writeln!(
            out,
            "bottleneck: {}[{}] {} {}: {} of its own, {:.0} % of the trace",
            s.resource.service_name,
            s.resource.pid,
            s.kind.as_str(),
            s.name,
            human(own),
            own as f64 * 100.0 / total as f64
        );
    }
    out
}

/// Indices of the spans whose parent is span `i`.
fn children_of(spans: &[Span], i: usize) -> Vec<usize> {
    let id = spans[i].span_id;
    (0..spans.len())
        .filter(|&k| k != i && spans[k].parent_span_id == Some(id))
        .collect()
}

/// `|   ████      |`: where the span sits in the trace, `width` cells.
fn bar(offset: u64, len: u64, total: u64, width: usize) -> String {
    let cell = |ns: u64| ((ns as f64 / total as f64) * width as f64).round() as usize;
    let a = cell(offset).min(width - 1);
    let b = cell(offset + len).clamp(a + 1, width);
    format!("|{}{}{}|", " ".repeat(a), "█".repeat(b - a), " ".repeat(width - b))
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
    t.push('…');
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn span(id: u8, parent: Option<u8>, kind: SpanKind, service: &str, name: &str, start: u64, end: u64) -> Span {
        crate::views::test_span(id, parent, kind, service, name, (start, end))
    }

    fn timed_out(mut s: Span, resend: i64) -> Span {
        s.attributes.retain(|(k, _)| k.starts_with("server."));
        s.attributes
            .push((crate::vocab::attr::ERROR_TYPE, AttrValue::fixed("no_response")));
        s.error = true;
        if resend > 0 {
            s.attributes
                .push((crate::vocab::attr::HTTP_REQUEST_RESEND_COUNT, AttrValue::Int(resend)));
        }
        s
    }

    /// The seed's scenario: curl → order (SERVER) → a slow, retried payment call, then a
    /// quick stock call.
    fn checkout() -> Vec<Span> {
        let mut third = span(5, Some(2), SpanKind::Client, "order", "POST /pay", 520, 540);
        third
            .attributes
            .push((crate::vocab::attr::HTTP_REQUEST_RESEND_COUNT, AttrValue::Int(2)));
        vec![
            span(1, None, SpanKind::Client, "curl", "GET /checkout", 0, 600),
            span(2, Some(1), SpanKind::Server, "order", "GET /checkout", 2, 598),
            timed_out(span(3, Some(2), SpanKind::Client, "order", "POST /pay", 10, 260), 0),
            timed_out(span(4, Some(2), SpanKind::Client, "order", "POST /pay", 265, 515), 1),
            third,
            span(6, Some(5), SpanKind::Server, "payment", "POST /pay", 525, 536),
            span(7, Some(2), SpanKind::Client, "order", "GET /stock", 545, 590),
            span(8, Some(7), SpanKind::Server, "stock", "GET /stock", 550, 585),
        ]
    }

    #[test]
    fn own_time_subtracts_the_union_of_children() {
        let s = checkout();
        // order's server span: 596 ms, of which its calls take 250 + 250 + 20 + 45.
        assert_eq!(own_time(&s, 1, &[2, 3, 4, 6]), (596 - 250 - 250 - 20 - 45) * MS);
        // Overlapping children count once.
        let o = vec![
            span(1, None, SpanKind::Server, "a", "GET /", 0, 100),
            span(2, Some(1), SpanKind::Client, "a", "GET /x", 10, 60),
            span(3, Some(1), SpanKind::Client, "a", "GET /y", 40, 90),
        ];
        assert_eq!(own_time(&o, 0, &[1, 2]), 20 * MS);
    }

    #[test]
    fn critical_path_follows_what_each_parent_waited_for() {
        let s = checkout();
        let lines = layout(&s);
        let critical: Vec<&str> = lines
            .iter()
            .filter(|l| l.critical)
            .map(|l| s[*l.spans.last().unwrap()].resource.service_name.as_str())
            .collect();
        // curl → order → stock (the last call), and before it the payment attempts.
        assert!(
            critical.contains(&"stock") && critical.contains(&"payment"),
            "{critical:?}"
        );
        // Parallel calls: only the one that ended last is critical.
        let p = vec![
            span(1, None, SpanKind::Server, "a", "GET /", 0, 100),
            span(2, Some(1), SpanKind::Client, "a", "GET /fast", 10, 30),
            span(3, Some(1), SpanKind::Client, "a", "GET /slow", 10, 95),
        ];
        let crit = critical_path(&p, &[0], &HashMap::from([(0, vec![1, 2])]));
        assert_eq!(crit, vec![true, false, true]);
        // A call timed out at 300 ms while its server took 600: the server is what the caller
        // waited for, and the bottleneck.
        let t = vec![
            span(1, None, SpanKind::Server, "order", "GET /", 0, 400),
            timed_out(span(2, Some(1), SpanKind::Client, "order", "GET /pay", 10, 310), 0),
            span(3, Some(2), SpanKind::Server, "payment", "GET /pay", 12, 612),
        ];
        let lines = layout(&t);
        assert!(lines.iter().all(|l| l.critical));
        assert_eq!(
            lines.iter().find(|l| l.bottleneck).map(|l| l.spans.clone()),
            Some(vec![2])
        );
    }

    #[test]
    fn retries_collapse_with_each_outcome_and_the_bottleneck_is_marked() {
        let s = checkout();
        let lines = layout(&s);
        let retry = lines.iter().find(|l| l.spans.len() > 1).expect("a retry line");
        assert_eq!(retry.spans, vec![2, 3, 4]);
        assert_eq!((retry.start_ns, retry.end_ns), (10 * MS, 540 * MS));
        // The bottleneck: the payment call's own time (two timeouts, then 9 ms outside the server).
        let b = lines.iter().find(|l| l.bottleneck).expect("a bottleneck");
        assert_eq!(b.spans, vec![2, 3, 4]);
        let text = render(&s, None, Style::default());
        assert!(
            text.contains("3 attempts: no response in 250.0 ms, no response in 250.0 ms, 200 in 20.0 ms"),
            "{text}"
        );
        assert!(text.contains("CLIENT POST /pay  ◀ bottleneck  3 attempts"), "{text}");
        // 250 + 250 + (20 − 11) ms of the payment call's own, of 600.
        assert!(
            text.contains("bottleneck: order[103] CLIENT POST /pay: 509.0 ms of its own, 85 % of the trace"),
            "{text}"
        );
        // Network time of the stock call: 45 ms client, 35 ms server.
        assert!(text.contains("GET /stock 200  net 10.0 ms"), "{text}");
        assert_eq!(
            lines.iter().find(|l| l.spans == vec![6]).unwrap().network_ns,
            Some(10 * MS)
        );
        assert!(
            text.starts_with("trace 07070707070707070707070707070707  600.0 ms  8 spans  4 services  2 errors"),
            "{text}"
        );
    }

    #[test]
    fn a_missing_parent_reads_as_broken() {
        let mut s = checkout();
        s.remove(1); // order's server span never arrived
        let text = render(&s, None, Style::default());
        assert!(text.contains("4 parents not seen"), "{text}");
        assert!(text.contains("[parent not seen]"), "{text}");
        // Nothing is lost: every span still has a line.
        let shown: usize = layout(&s).iter().map(|l| l.spans.len()).sum();
        assert_eq!(shown, s.len());
    }

    #[test]
    fn colours_only_when_asked() {
        let s = checkout();
        assert!(!render(&s, Some(120), Style::default()).contains('\x1b'));
        assert!(render(&s, Some(120), Style { color: true }).contains("\x1b[31m"));
    }
}
