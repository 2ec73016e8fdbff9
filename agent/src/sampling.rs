//! Which traces are exported. Two stages, both deciding per trace so a trace is kept or dropped
//! whole:
//! - **head sampling**, the standard `OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG`: decided
//!   from what every span of a trace shares — its trace id (the ratio samplers read its random
//!   part, as OpenTelemetry's `TraceIdRatioBased` does, so SDKs and agents on other nodes agree)
//!   and the sampled flag a propagated context carried into it (the `parentbased_*` samplers
//!   follow it) — so no span waits;
//! - **tail sampling** (`--tail-sampling`), decided per local trace once it is complete, from
//!   what happened in it: every trace with an error or slower than `--tail-slower-than` is kept,
//!   and `--tail-ratio` of the rest. Traces wait a bounded time and memory (counted).
//!
//! Sampling applies to export only: the live views on the node show every span.
use std::{
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

use crate::{export::otlp::ConfigError, span::Span, telemetry::Family, traces::TraceCollector};

/// The sampler for spans whose trace began on this node (and, unless parent-based, for all).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RootSampler {
    AlwaysOn,
    AlwaysOff,
    /// Keeps this share of traces, by trace id.
    TraceIdRatio(f64),
}

/// `OTEL_TRACES_SAMPLER`'s choice.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeadSampler {
    pub root: RootSampler,
    /// A trace that came with a sampling decision (a `traceparent` or B3 flag) follows it.
    pub parent_based: bool,
}

impl Default for HeadSampler {
    /// The specification's default, `parentbased_always_on`.
    fn default() -> Self {
        Self {
            root: RootSampler::AlwaysOn,
            parent_based: true,
        }
    }
}

/// The samplers supported, as a bad `OTEL_TRACES_SAMPLER` is told.
const SAMPLERS: &str = "sampler (one of always_on, always_off, traceidratio, parentbased_always_on, \
                        parentbased_always_off, parentbased_traceidratio)";

impl HeadSampler {
    /// Reads `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG` from a key→value source. An
    /// unsupported sampler or a ratio outside 0..=1 is an error (the agent would otherwise
    /// export far more, or less, than asked).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let name = get("OTEL_TRACES_SAMPLER").map(|v| v.trim().to_ascii_lowercase());
        let ratio = || -> Result<f64, ConfigError> {
            match get("OTEL_TRACES_SAMPLER_ARG") {
                None => Ok(1.0),
                Some(v) if v.trim().is_empty() => Ok(1.0),
                Some(v) => parse_ratio(&v).map_err(|_| ConfigError::Invalid {
                    name: "OTEL_TRACES_SAMPLER_ARG",
                    value: v,
                    what: "ratio (a number from 0 to 1)",
                }),
            }
        };
        let (parent_based, root) = match name.as_deref() {
            None | Some("") | Some("parentbased_always_on") => (true, RootSampler::AlwaysOn),
            Some("always_on") => (false, RootSampler::AlwaysOn),
            Some("always_off") => (false, RootSampler::AlwaysOff),
            Some("parentbased_always_off") => (true, RootSampler::AlwaysOff),
            Some("traceidratio") => (false, RootSampler::TraceIdRatio(ratio()?)),
            Some("parentbased_traceidratio") => (true, RootSampler::TraceIdRatio(ratio()?)),
            Some(_) => {
                return Err(ConfigError::Invalid {
                    name: "OTEL_TRACES_SAMPLER",
                    value: get("OTEL_TRACES_SAMPLER").unwrap_or_default(),
                    what: SAMPLERS,
                });
            }
        };
        Ok(Self { root, parent_based })
    }

    /// Whether a span of trace `trace_id`, whose trace came with decision `upstream` (if any),
    /// is kept: the same answer for every span of the trace.
    pub fn keeps(&self, trace_id: &[u8; 16], upstream: Option<bool>) -> bool {
        if self.parent_based
            && let Some(sampled) = upstream
        {
            return sampled;
        }
        match self.root {
            RootSampler::AlwaysOn => true,
            RootSampler::AlwaysOff => false,
            RootSampler::TraceIdRatio(r) => ratio_keeps(trace_id, r),
        }
    }

    /// Keeps every span (the default's behaviour when no trace came with a decision).
    pub fn keeps_all(&self) -> bool {
        self.root == RootSampler::AlwaysOn
    }
}

/// A ratio from 0 to 1 (a `--tail-ratio` or `OTEL_TRACES_SAMPLER_ARG`).
pub fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("bad ratio `{s}`: expected a number from 0 to 1")),
    }
}

/// OpenTelemetry's `TraceIdRatioBased`: the trace id's last 8 bytes (random in W3C ids and in
/// sockspan's), less their top bit, below `ratio` × 2⁶³.
pub fn ratio_keeps(trace_id: &[u8; 16], ratio: f64) -> bool {
    let mut low = [0u8; 8];
    low.copy_from_slice(&trace_id[8..]);
    let x = u64::from_be_bytes(low) >> 1;
    let bound = (ratio * (1u64 << 63) as f64) as u64;
    x < bound
}

/// Spans the tail sampler holds while their traces complete (about 1 KiB each, so 32 MiB of
/// the memory budget at most); beyond it the oldest traces are decided as they stand.
pub const TAIL_MAX_HELD_SPANS: usize = 32_768;

/// `--tail-sampling`'s rules.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TailConfig {
    /// Traces at least this long (first span's start to last span's end) are kept.
    pub slower_than: Duration,
    /// The share of the other traces kept, by trace id.
    pub ratio: f64,
    /// Spans held while their traces complete; beyond it the oldest traces are decided early.
    pub max_held_spans: usize,
}

/// Why tail sampling kept or dropped a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TailDecision {
    Error,
    Slow,
    Ratio,
    Dropped,
}

impl TailDecision {
    pub const ALL: [Self; 4] = [Self::Error, Self::Slow, Self::Ratio, Self::Dropped];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Slow => "slow",
            Self::Ratio => "ratio",
            Self::Dropped => "dropped",
        }
    }

    /// What the rules say of a complete local trace.
    pub fn of(cfg: &TailConfig, spans: &[Span]) -> Self {
        let start = spans.iter().map(|s| s.start_unix_ns).min().unwrap_or(0);
        let end = spans.iter().map(|s| s.end_unix_ns).max().unwrap_or(0);
        if spans.iter().any(|s| s.error) {
            Self::Error
        } else if end.saturating_sub(start) >= cfg.slower_than.as_nanos() as u64 {
            Self::Slow
        } else if spans.first().is_some_and(|s| ratio_keeps(&s.trace_id, cfg.ratio)) {
            Self::Ratio
        } else {
            Self::Dropped
        }
    }
}

/// Sampling's counts, shared with the metrics endpoint.
#[derive(Debug, Default)]
pub struct SamplingCounts {
    /// Spans not exported: by the head sampler, by the tail sampler.
    pub head_dropped: AtomicU64,
    pub tail_dropped: AtomicU64,
    /// Traces decided by the tail sampler, by [`TailDecision`].
    pub tail_traces: [AtomicU64; TailDecision::ALL.len()],
    /// Traces decided before they were complete, to stay within the held spans' bound.
    pub tail_early: AtomicU64,
    /// Spans held for their trace to complete.
    pub held: AtomicU64,
}

impl SamplingCounts {
    /// Spans sampling left out of the export.
    pub fn sampled_out(&self) -> u64 {
        self.head_dropped.load(Relaxed) + self.tail_dropped.load(Relaxed)
    }

    pub fn families(&self) -> Vec<Family> {
        vec![
            Family::counter(
                "sockspan_spans_sampled_out_total",
                "Spans not exported because sampling dropped their trace, by sampler (head: OTEL_TRACES_SAMPLER, tail: --tail-sampling).",
                vec![
                    ("sampler", "head", self.head_dropped.load(Relaxed)),
                    ("sampler", "tail", self.tail_dropped.load(Relaxed)),
                ],
            ),
            Family::counter(
                "sockspan_tail_sampling_traces_total",
                "Local traces the tail sampler decided, by decision (error, slow: kept for what happened in them; ratio: kept by --tail-ratio; dropped).",
                TailDecision::ALL
                    .iter()
                    .map(|d| ("decision", d.as_str(), self.tail_traces[*d as usize].load(Relaxed)))
                    .collect(),
            ),
            Family::total(
                "sockspan_tail_sampling_decided_early_total",
                "Traces the tail sampler decided before they were complete, to stay within the spans it may hold.",
                self.tail_early.load(Relaxed),
            ),
        ]
    }
}

/// The export's sampling stage: spans in, the spans to export out.
pub struct Sampler {
    head: HeadSampler,
    tail: Option<(TailConfig, TraceCollector)>,
    counts: std::sync::Arc<SamplingCounts>,
}

impl Sampler {
    pub fn new(head: HeadSampler, tail: Option<TailConfig>, counts: std::sync::Arc<SamplingCounts>) -> Self {
        Self {
            head,
            tail: tail.map(|cfg| (cfg, TraceCollector::new(cfg.max_held_spans))),
            counts,
        }
    }

    /// Whether every span passes at once (nothing to do).
    pub fn passes_all(&self) -> bool {
        self.tail.is_none() && self.head.keeps_all() && !self.head.parent_based
    }

    /// Takes finished spans seen at `now_ns` (monotonic); returns those to export now.
    pub fn admit(&mut self, spans: Vec<Span>, now_ns: u64) -> Vec<Span> {
        if self.passes_all() {
            return spans;
        }
        let before = spans.len();
        let kept: Vec<Span> = spans
            .into_iter()
            .filter(|s| self.head.keeps(&s.trace_id, s.upstream_sampled))
            .collect();
        self.counts
            .head_dropped
            .fetch_add((before - kept.len()) as u64, Relaxed);
        let Some((_, traces)) = &mut self.tail else {
            return kept;
        };
        let mut early = Vec::new();
        for s in kept {
            early.extend(traces.add(s, now_ns));
        }
        let mut out = Vec::new();
        for trace in early {
            self.counts.tail_early.fetch_add(1, Relaxed);
            self.decide(trace, &mut out);
        }
        self.publish_held();
        out
    }

    /// The traces complete at `now_ns`, decided; returns those kept.
    pub fn tick(&mut self, now_ns: u64) -> Vec<Span> {
        let Some((_, traces)) = &mut self.tail else {
            return Vec::new();
        };
        let ready = traces.take_ready(now_ns);
        let mut out = Vec::new();
        for trace in ready {
            self.decide(trace, &mut out);
        }
        self.publish_held();
        out
    }

    /// Every trace still held, decided as it stands (the agent stops).
    pub fn finish(&mut self) -> Vec<Span> {
        let Some((_, traces)) = &mut self.tail else {
            return Vec::new();
        };
        let all = traces.take_all();
        let mut out = Vec::new();
        for trace in all {
            self.decide(trace, &mut out);
        }
        self.publish_held();
        out
    }

    fn decide(&mut self, trace: Vec<Span>, out: &mut Vec<Span>) {
        let Some((cfg, _)) = &self.tail else {
            out.extend(trace);
            return;
        };
        let d = TailDecision::of(cfg, &trace);
        self.counts.tail_traces[d as usize].fetch_add(1, Relaxed);
        if d == TailDecision::Dropped {
            self.counts.tail_dropped.fetch_add(trace.len() as u64, Relaxed);
        } else {
            out.extend(trace);
        }
    }

    fn publish_held(&self) {
        if let Some((_, traces)) = &self.tail {
            self.counts.held.store(traces.held() as u64, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).to_owned())
    }

    /// A reproducible stream of random trace ids.
    fn trace_ids(n: usize) -> impl Iterator<Item = [u8; 16]> {
        let mut ids = crate::span::IdGenerator::seeded(42);
        (0..n).map(move |_| ids.trace_id())
    }

    #[test]
    fn samplers_from_the_environment() {
        let s = |vars: &[(&str, &str)]| HeadSampler::from_lookup(lookup(vars));
        assert_eq!(s(&[]).unwrap(), HeadSampler::default());
        assert_eq!(
            s(&[
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.25")
            ])
            .unwrap(),
            HeadSampler {
                root: RootSampler::TraceIdRatio(0.25),
                parent_based: false
            }
        );
        assert_eq!(
            s(&[("OTEL_TRACES_SAMPLER", " ParentBased_Always_Off ")]).unwrap(),
            HeadSampler {
                root: RootSampler::AlwaysOff,
                parent_based: true
            }
        );
        // Without an argument the ratio is 1, as the specification says.
        assert_eq!(
            s(&[("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")]).unwrap().root,
            RootSampler::TraceIdRatio(1.0)
        );
        let bad = s(&[("OTEL_TRACES_SAMPLER", "jaeger_remote")]).unwrap_err().to_string();
        assert!(
            bad.starts_with("OTEL_TRACES_SAMPLER=\"jaeger_remote\" is not a valid sampler (one of always_on"),
            "{bad}"
        );
        let bad = s(&[
            ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "1.5"),
        ])
        .unwrap_err()
        .to_string();
        assert_eq!(
            bad,
            "OTEL_TRACES_SAMPLER_ARG=\"1.5\" is not a valid ratio (a number from 0 to 1)"
        );
    }

    #[test]
    fn the_ratio_keeps_its_share_within_statistical_bounds() {
        for ratio in [0.01, 0.1, 0.25, 0.5, 0.9] {
            let n = 100_000;
            let kept = trace_ids(n).filter(|id| ratio_keeps(id, ratio)).count() as f64;
            // Binomial: 5 standard deviations either side.
            let (mean, sd) = (n as f64 * ratio, (n as f64 * ratio * (1.0 - ratio)).sqrt());
            assert!((kept - mean).abs() < 5.0 * sd, "ratio {ratio}: kept {kept} of {n}");
        }
        assert!(trace_ids(1000).all(|id| ratio_keeps(&id, 1.0)));
        assert!(trace_ids(1000).all(|id| !ratio_keeps(&id, 0.0)));
    }

    #[test]
    fn parent_based_follows_the_upstream_decision() {
        let pb = HeadSampler {
            root: RootSampler::AlwaysOff,
            parent_based: true,
        };
        let id = [3; 16];
        assert!(pb.keeps(&id, Some(true)));
        assert!(!pb.keeps(&id, Some(false)));
        assert!(!pb.keeps(&id, None), "a local root: the root sampler");
        let plain = HeadSampler {
            root: RootSampler::AlwaysOn,
            parent_based: false,
        };
        assert!(plain.keeps(&id, Some(false)), "not parent-based: the flag is ignored");
    }

    fn span(trace: u8, id: u8, parent: Option<u8>, ms: (u64, u64)) -> Span {
        let mut s = Span::sample(u64::from(id));
        s.trace_id = [trace; 16];
        s.parent_span_id = parent.map(|p| [p; 8]);
        s.start_unix_ns = ms.0 * 1_000_000;
        s.end_unix_ns = ms.1 * 1_000_000;
        s
    }

    const S: u64 = 1_000_000_000;

    #[test]
    fn tail_sampling_keeps_errors_and_slow_traces_whole() {
        let counts = std::sync::Arc::new(SamplingCounts::default());
        let cfg = TailConfig {
            slower_than: Duration::from_millis(500),
            ratio: 0.0,
            max_held_spans: 100,
        };
        let mut s = Sampler::new(HeadSampler::default(), Some(cfg), counts.clone());
        let mut failed = span(1, 2, Some(1), (10, 20));
        failed.error = true;
        let spans = vec![
            failed,
            span(1, 1, None, (0, 30)),
            span(2, 3, Some(4), (0, 900)),
            span(2, 4, None, (0, 1000)),
            span(3, 5, Some(6), (0, 10)),
            span(3, 6, None, (0, 20)),
        ];
        assert!(s.admit(spans, 0).is_empty(), "held until complete");
        assert_eq!(counts.held.load(Relaxed), 6);
        assert!(s.tick(S).is_empty(), "within the grace");
        let kept = s.tick(3 * S);
        let traces: std::collections::BTreeSet<u8> = kept.iter().map(|s| s.trace_id[0]).collect();
        assert_eq!(kept.len(), 4, "the failed and the slow trace, whole");
        assert_eq!(traces, [1, 2].into());
        assert_eq!(counts.tail_traces[TailDecision::Error as usize].load(Relaxed), 1);
        assert_eq!(counts.tail_traces[TailDecision::Slow as usize].load(Relaxed), 1);
        assert_eq!(counts.tail_traces[TailDecision::Dropped as usize].load(Relaxed), 1);
        assert_eq!(counts.tail_dropped.load(Relaxed), 2);
        assert_eq!(counts.held.load(Relaxed), 0);
    }

    #[test]
    fn tail_sampling_decides_early_within_its_bound() {
        let counts = std::sync::Arc::new(SamplingCounts::default());
        let cfg = TailConfig {
            slower_than: Duration::from_secs(1),
            ratio: 1.0,
            max_held_spans: 2,
        };
        let mut s = Sampler::new(HeadSampler::default(), Some(cfg), counts.clone());
        let out = s.admit(
            vec![
                span(1, 1, Some(9), (0, 1)),
                span(1, 2, Some(9), (0, 1)),
                span(2, 3, None, (0, 1)),
            ],
            0,
        );
        assert_eq!(out.len(), 2, "trace 1 decided early (kept by the ratio of 1)");
        assert_eq!(counts.tail_early.load(Relaxed), 1);
        assert_eq!(s.finish().len(), 1, "the rest at the end");
    }

    #[test]
    fn head_sampling_drops_whole_traces_and_counts_them() {
        let counts = std::sync::Arc::new(SamplingCounts::default());
        let head = HeadSampler {
            root: RootSampler::TraceIdRatio(0.5),
            parent_based: true,
        };
        let mut s = Sampler::new(head, None, counts.clone());
        let spans: Vec<Span> = trace_ids(1000)
            .flat_map(|id| {
                (0..3u8).map(move |i| {
                    let mut sp = span(0, i, (i > 0).then_some(0), (0, 1));
                    sp.trace_id = id;
                    sp
                })
            })
            .collect();
        let kept = s.admit(spans, 0);
        assert_eq!(kept.len() % 3, 0, "whole traces");
        let mut per_trace = std::collections::HashMap::<[u8; 16], usize>::new();
        kept.iter().for_each(|s| *per_trace.entry(s.trace_id).or_default() += 1);
        assert!(per_trace.values().all(|n| *n == 3));
        assert_eq!(counts.head_dropped.load(Relaxed) as usize + kept.len(), 3000);
        // Spans under a caller that sampled its trace out are dropped with it.
        let mut unsampled = span(9, 1, Some(8), (0, 1));
        unsampled.upstream_sampled = Some(false);
        assert!(s.admit(vec![unsampled], 0).is_empty());
    }
}
