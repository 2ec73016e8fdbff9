//! Scoring inferred parent-child edges against a known expected tree.
//!
//! The caller describes every span it expects ([`ExpectedSpan`]: service, kind, `url.path`, the
//! expected parent, an edge class and a group such as the request it belongs to). [`score`]
//! assigns the exported spans to them -- by (service.name, kind, url.path), several attempts of
//! the same triple matched in start-time order -- and judges every edge:
//!
//! * **correct**: the span's `parent_span_id` is the expected parent's `span_id` (for a root: the
//!   span has no parent);
//! * **wrong**: the span has a parent that is not the expected one (for a root: any parent);
//! * **missing**: the span has no parent although one is expected;
//! * **lost**: the span itself (or its expected parent) was never exported, so the edge cannot
//!   exist. Optional spans (e.g. the server side of an attempt the client gave up on) that are
//!   absent are not counted at all.
//!
//! precision = correct / (correct + wrong), recall = correct / expected edges
//! (expected = correct + wrong + missing + lost).
//!
//! Besides edges it checks that every `parent_span_id` refers to an exported span (unless the
//! parent came from a propagated `traceparent`/B3 context), that `sockspan.parent.source` is set
//! exactly when a parent is, and that every group whose edges are all correct shares one trace id.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Write as _,
};

use crate::receiver::CollectedSpan;

/// One span the topology must produce.
#[derive(Clone, Debug)]
pub struct ExpectedSpan {
    /// Unique key (e.g. `r000012x9f8e/orders>payments#1`).
    pub key: String,
    pub service: String,
    /// "SERVER" or "CLIENT".
    pub kind: &'static str,
    pub path: String,
    /// Key of the expected parent; `None` for a root.
    pub parent: Option<String>,
    /// Edge class the edge (this span → its parent) is reported under.
    pub class: String,
    /// Spans of one group (one request) should share a trace id once all their edges are right.
    pub group: String,
    /// The span may legitimately not exist.
    pub optional: bool,
    /// When the service itself saw this request start (Unix ns), if it said so: several spans
    /// of one (service, kind, path) are then matched by nearest start time (within
    /// [`HINT_TOLERANCE_NS`]) instead of by order, so a lost attempt does not shift the others.
    pub at_ns: Option<u64>,
}

/// How far a span's start may be from its [`ExpectedSpan::at_ns`].
pub const HINT_TOLERANCE_NS: u64 = 100_000_000;

/// Counters of one edge class.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClassScore {
    pub expected: usize,
    pub correct: usize,
    pub wrong: usize,
    pub missing: usize,
    pub lost: usize,
}

impl ClassScore {
    /// correct / (correct + wrong); 1.0 when nothing was attributed.
    pub fn precision(&self) -> f64 {
        let d = self.correct + self.wrong;
        if d == 0 { 1.0 } else { self.correct as f64 / d as f64 }
    }
    /// correct / expected; 1.0 when nothing was expected.
    pub fn recall(&self) -> f64 {
        if self.expected == 0 {
            1.0
        } else {
            self.correct as f64 / self.expected as f64
        }
    }
    fn add(&mut self, o: &ClassScore) {
        self.expected += o.expected;
        self.correct += o.correct;
        self.wrong += o.wrong;
        self.missing += o.missing;
        self.lost += o.lost;
    }
}

/// Verdict on one edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Correct,
    Wrong,
    Missing,
    Lost,
}

/// One judged edge, for reports.
#[derive(Clone, Debug)]
pub struct Edge {
    pub child: String,
    pub parent: Option<String>,
    pub class: String,
    pub verdict: Verdict,
}

/// The result of [`score`].
#[derive(Debug, Default)]
pub struct Scored<'a> {
    pub classes: BTreeMap<String, ClassScore>,
    pub edges: Vec<Edge>,
    /// Expected key → the exported span assigned to it.
    pub assigned: HashMap<String, &'a CollectedSpan>,
    /// Spans that matched no expected span (e.g. more attempts than expected).
    pub unexpected: Vec<&'a CollectedSpan>,
    /// Optional expected spans that were not exported.
    pub optional_absent: Vec<String>,
    /// Spans whose parent id is not an exported span (and not from a propagated context).
    pub dangling: Vec<&'a CollectedSpan>,
    /// Spans where `sockspan.parent.source` presence disagrees with `parent_span_id` presence.
    pub source_mismatch: Vec<&'a CollectedSpan>,
    pub groups: usize,
    /// Groups with every edge correct.
    pub groups_all_correct: usize,
    /// Groups with every edge correct whose spans nevertheless carry several trace ids.
    pub groups_split_trace: Vec<String>,
}

impl Scored<'_> {
    pub fn class(&self, c: &str) -> ClassScore {
        self.classes.get(c).cloned().unwrap_or_default()
    }
    /// Sum over every class.
    pub fn total(&self) -> ClassScore {
        let mut t = ClassScore::default();
        for c in self.classes.values() {
            t.add(c);
        }
        t
    }
    pub fn edges_with(&self, v: Verdict) -> impl Iterator<Item = &Edge> {
        self.edges.iter().filter(move |e| e.verdict == v)
    }
}

fn propagated(s: &CollectedSpan) -> bool {
    matches!(s.attr_str("sockspan.parent.source"), Some("traceparent") | Some("b3"))
}

/// Score `spans` (the spans of the experiment; extra spans are reported as unexpected) against
/// `expected`. `exported` holds the span ids of every span the backend received (to find dangling
/// parents); pass the ids of `spans` if nothing else was collected.
pub fn score<'a>(expected: &[ExpectedSpan], spans: &'a [CollectedSpan], exported: &HashSet<String>) -> Scored<'a> {
    let mut out = Scored::default();

    // Assign spans to expected spans: per (service, kind, path), both sides in order.
    type Triple<'k> = (&'k str, &'k str, &'k str);
    let mut want: HashMap<Triple<'_>, Vec<&ExpectedSpan>> = HashMap::new();
    for e in expected {
        want.entry((e.service.as_str(), e.kind, e.path.as_str()))
            .or_default()
            .push(e);
    }
    let mut have: HashMap<Triple<'_>, Vec<&'a CollectedSpan>> = HashMap::new();
    for s in spans {
        let key = (
            s.service_name().unwrap_or(""),
            s.kind.as_str(),
            s.url_path().unwrap_or(""),
        );
        have.entry(key).or_default().push(s);
    }
    for (triple, mut got) in have {
        got.sort_by_key(|s| (s.start_ns, s.end_ns));
        let wanted = want.get(&triple).map(Vec::as_slice).unwrap_or(&[]);
        if wanted.len() > 1 && wanted.iter().all(|e| e.at_ns.is_some()) {
            // nearest start time, closest pairs first
            let mut pairs: Vec<(u64, usize, usize)> = Vec::new();
            for (i, e) in wanted.iter().enumerate() {
                for (j, s) in got.iter().enumerate() {
                    let d = s.start_ns.abs_diff(e.at_ns.unwrap_or(0));
                    if d <= HINT_TOLERANCE_NS {
                        pairs.push((d, i, j));
                    }
                }
            }
            pairs.sort_unstable();
            let (mut used_e, mut used_s) = (vec![false; wanted.len()], vec![false; got.len()]);
            for (_, i, j) in pairs {
                if !used_e[i] && !used_s[j] {
                    used_e[i] = true;
                    used_s[j] = true;
                    out.assigned.insert(wanted[i].key.clone(), got[j]);
                }
            }
            out.unexpected
                .extend(got.iter().zip(used_s).filter(|(_, u)| !u).map(|(s, _)| *s));
            continue;
        }
        // Optional spans may be absent: give them a span only if there are enough spans for
        // every required one too. Required spans are filled in order; when spans are short,
        // optional ones are skipped first.
        let required = wanted.iter().filter(|e| !e.optional).count();
        let mut spare = got.len().saturating_sub(required);
        let mut it = got.into_iter();
        for e in wanted {
            if e.optional {
                if spare == 0 {
                    continue;
                }
                spare -= 1;
            }
            match it.next() {
                Some(s) => {
                    out.assigned.insert(e.key.clone(), s);
                }
                None => break,
            }
        }
        out.unexpected.extend(it);
    }
    out.unexpected.sort_by_key(|s| s.start_ns);

    // Judge every edge.
    let by_key: HashMap<&str, &ExpectedSpan> = expected.iter().map(|e| (e.key.as_str(), e)).collect();
    let mut group_ok: BTreeMap<&str, bool> = BTreeMap::new();
    for e in expected {
        let child = out.assigned.get(&e.key).copied();
        if child.is_none() && e.optional {
            out.optional_absent.push(e.key.clone());
            continue;
        }
        let verdict = match (child, &e.parent) {
            (None, _) => Verdict::Lost,
            (Some(c), None) => {
                if c.parent_span_id.is_none() {
                    Verdict::Correct
                } else {
                    Verdict::Wrong
                }
            }
            (Some(c), Some(pk)) => match (out.assigned.get(pk), &c.parent_span_id) {
                (Some(p), Some(actual)) if *actual == p.span_id => Verdict::Correct,
                (Some(_), Some(_)) => Verdict::Wrong,
                (Some(_), None) => Verdict::Missing,
                // The parent was not exported (or is an optional span that is absent).
                (None, _) => {
                    if by_key.get(pk.as_str()).is_some_and(|p| p.optional) {
                        // a child of an absent optional span is itself not expected
                        continue;
                    }
                    Verdict::Lost
                }
            },
        };
        let cs = out.classes.entry(e.class.clone()).or_default();
        cs.expected += 1;
        match verdict {
            Verdict::Correct => cs.correct += 1,
            Verdict::Wrong => cs.wrong += 1,
            Verdict::Missing => cs.missing += 1,
            Verdict::Lost => cs.lost += 1,
        }
        let ok = group_ok.entry(e.group.as_str()).or_insert(true);
        *ok &= verdict == Verdict::Correct;
        out.edges.push(Edge {
            child: e.key.clone(),
            parent: e.parent.clone(),
            class: e.class.clone(),
            verdict,
        });
    }

    // Span-level checks on everything in the experiment.
    for s in spans {
        if let Some(p) = &s.parent_span_id
            && !exported.contains(p)
            && !propagated(s)
        {
            out.dangling.push(s);
        }
        if s.attr_str("sockspan.parent.source").is_some() != s.parent_span_id.is_some() {
            out.source_mismatch.push(s);
        }
    }

    // One trace per fully correct group.
    let mut traces: HashMap<&str, HashSet<&str>> = HashMap::new();
    for e in expected {
        if let Some(s) = out.assigned.get(&e.key) {
            traces.entry(e.group.as_str()).or_default().insert(s.trace_id.as_str());
        }
    }
    out.groups = group_ok.len();
    for (g, ok) in &group_ok {
        if *ok {
            out.groups_all_correct += 1;
            if traces.get(g).is_some_and(|t| t.len() > 1) {
                out.groups_split_trace.push(g.to_string());
            }
        }
    }
    out
}

/// One row of the accuracy table.
#[derive(Clone, Debug)]
pub struct Row {
    pub concurrency: usize,
    pub keepalive: String,
    pub class: String,
    pub score: ClassScore,
}

/// The accuracy table, one row per (run, class).
pub fn format_table(rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| conc | keep-alive   | class          | expected | correct | wrong | missing | lost | precision | recall  |"
    );
    let _ = writeln!(
        s,
        "|-----:|--------------|----------------|---------:|--------:|------:|--------:|-----:|----------:|--------:|"
    );
    for r in rows {
        let c = &r.score;
        let _ = writeln!(
            s,
            "| {:>4} | {:<12} | {:<14} | {:>8} | {:>7} | {:>5} | {:>7} | {:>4} | {:>8.2}% | {:>6.2}% |",
            r.concurrency,
            r.keepalive,
            r.class,
            c.expected,
            c.correct,
            c.wrong,
            c.missing,
            c.lost,
            100.0 * c.precision(),
            100.0 * c.recall()
        );
    }
    s
}
