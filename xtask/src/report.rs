//! Renders `cargo xtask bench` results and records them in docs/benchmarks.md: the latest run
//! replaces the block between the `bench:latest` markers, and a one-line summary is added to the
//! history table.
use std::{fmt::Write as _, fs, path::Path};

use anyhow::{Context, Result};

use crate::{
    bench::{Agent, AgentRuns, LOSS_RATIO_TARGET, PIPELINE_TARGET_EVENTS, Pipeline, Results, Wrk},
    setup,
    util::{self, output_of},
};

const LATEST_START: &str = "<!-- bench:latest:start -->";
const LATEST_END: &str = "<!-- bench:latest:end -->";
const HISTORY_END: &str = "<!-- bench:history:end -->";

/// Used when docs/benchmarks.md is missing or lost its markers.
const TEMPLATE: &str = "# Benchmarks\n\n\
Run `cargo xtask bench` as root. This file was regenerated because its markers were missing; \
the description of the method is in its git history.\n\n\
## Latest run\n\n<!-- bench:latest:start -->\n<!-- bench:latest:end -->\n\n\
## History\n\n| date (UTC) | commit | nproc | kernel | (a) events/s | off req/s | floor loss | \
agent loss | ratio | spans / 2×req | agent VmHWM |\n|---|---|---|---|---|---|---|---|---|---|---|\n\
<!-- bench:history:end -->\n";

struct Derived {
    off_rps: f64,
    floor_rps: f64,
    /// (max − min) / median of the off runs, in %: how noisy the machine was.
    off_spread: f64,
    floor_loss: f64,
    /// None when no agent run finished.
    agent: Option<AgentFigures>,
    /// With `--baseline` and at least one finished baseline run.
    baseline: Option<AgentFigures>,
    versus: Option<Versus>,
}

/// One agent configuration's figures against the off and floor runs.
struct AgentFigures {
    rps: f64,
    loss: f64,
    /// loss ÷ floor loss; None when the floor lost nothing measurable.
    ratio: Option<f64>,
    spans_pct: Option<f64>,
    vm_hwm_kb: u64,
    vm_rss_kb: u64,
    /// Medians over the runs: ns per kernel program run, kernel µs per request, process µs
    /// per span created.
    kernel_ns_per_run: Option<f64>,
    kernel_us_per_request: Option<f64>,
    process_us_per_span: Option<f64>,
}

/// A counter from the agent's final /metrics lines (`name value`).
fn counter(a: &Agent, name: &str) -> Option<f64> {
    a.metrics
        .iter()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The median of `f` over the runs where it is defined.
fn median_of(a: &AgentRuns, f: impl Fn(&Agent) -> Option<f64>) -> Option<f64> {
    let v: Vec<f64> = a.runs.iter().filter_map(f).collect();
    (!v.is_empty()).then(|| median(v))
}

/// The agent against the baseline. Ratios are taken per round, where the two ran a few seconds
/// apart on a machine in the same state, and then the median over rounds: the load on a shared
/// machine drifts more between rounds than the two agents differ.
struct Versus {
    /// agent req/s ÷ baseline req/s, per round.
    rps_per_round: Vec<f64>,
    rps_ratio: f64,
    /// agent p99 ÷ baseline p99, median over rounds.
    p99_ratio: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn loss(off: f64, x: f64) -> f64 {
    (off - x) / off * 100.0
}

fn derive(r: &Results) -> Derived {
    let rps = |w: &[&Wrk]| median(w.iter().map(|w| w.rps).collect());
    let off: Vec<&Wrk> = r.off.iter().collect();
    let off_rps = rps(&off);
    let max = off.iter().map(|w| w.rps).fold(f64::MIN, f64::max);
    let min = off.iter().map(|w| w.rps).fold(f64::MAX, f64::min);
    let off_spread = if off_rps > 0.0 {
        (max - min) / off_rps * 100.0
    } else {
        0.0
    };
    let floor_rps = rps(&r.floor.iter().map(|f| &f.load).collect::<Vec<_>>());
    let floor_loss = loss(off_rps, floor_rps);
    let figures = |a: &AgentRuns| agent_figures(a, off_rps, floor_loss);
    Derived {
        off_rps,
        floor_rps,
        off_spread,
        floor_loss,
        agent: figures(&r.agent),
        baseline: r.baseline.as_ref().and_then(figures),
        versus: r.baseline.as_ref().and_then(|b| versus(&r.agent, b)),
    }
}

fn agent_figures(a: &AgentRuns, off_rps: f64, floor_loss: f64) -> Option<AgentFigures> {
    if a.runs.is_empty() {
        return None;
    }
    let rps = median(a.runs.iter().map(|a| a.load.rps).collect());
    let loss = loss(off_rps, rps);
    let requests: u64 = a.runs.iter().map(|a| a.load.requests).sum();
    let spans: u64 = a.runs.iter().map(|a| a.get_server + a.get_client).sum();
    Some(AgentFigures {
        rps,
        loss,
        ratio: (floor_loss > 0.0).then(|| loss / floor_loss),
        spans_pct: (requests > 0).then(|| spans as f64 / (2.0 * requests as f64) * 100.0),
        vm_hwm_kb: a.runs.iter().map(|a| a.vm_hwm_kb).max().unwrap_or(0),
        vm_rss_kb: a.runs.last().map_or(0, |a| a.vm_rss_kb),
        kernel_ns_per_run: median_of(a, |r| {
            (r.cpu.kernel_runs > 0).then(|| r.cpu.kernel_ns as f64 / r.cpu.kernel_runs as f64)
        }),
        kernel_us_per_request: median_of(a, |r| {
            (r.load.requests > 0 && r.cpu.kernel_runs > 0)
                .then(|| r.cpu.kernel_ns as f64 / 1e3 / r.load.requests as f64)
        }),
        process_us_per_span: median_of(a, |r| {
            counter(r, "sockspan_spans_created_total")
                .filter(|n| *n > 0.0)
                .map(|n| r.cpu.process_ns as f64 / 1e3 / n)
        }),
    })
}

/// None until both have a run; rounds where only one finished (a failed run) are left out.
fn versus(agent: &AgentRuns, baseline: &AgentRuns) -> Option<Versus> {
    let pairs: Vec<(&Wrk, &Wrk)> = agent
        .runs
        .iter()
        .zip(&baseline.runs)
        .map(|(a, b)| (&a.load, &b.load))
        .collect();
    if pairs.is_empty() {
        return None;
    }
    let rps_per_round: Vec<f64> = pairs.iter().map(|(a, b)| a.rps / b.rps).collect();
    Some(Versus {
        rps_ratio: median(rps_per_round.clone()),
        rps_per_round,
        p99_ratio: median(pairs.iter().map(|(a, b)| a.p99_ms / b.p99_ms).collect()),
    })
}

fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "**MISSED**" }
}

/// Facts about the machine and checkout, read once per run.
pub struct RunFacts {
    /// `YYYY-MM-DD HH:MM`, UTC.
    pub date: String,
    pub nproc: String,
    pub kernel: String,
    pub commit: String,
}

impl RunFacts {
    pub fn collect() -> Self {
        let out = |prog: &str, args: &[&str]| output_of(prog, args).unwrap_or_default().trim().to_owned();
        Self {
            date: out("date", &["-u", "+%Y-%m-%d %H:%M"]),
            nproc: out("nproc", &[]),
            kernel: setup::kernel(),
            commit: commit(),
        }
    }
}

fn commit() -> String {
    let head = output_of("git", ["rev-parse", "--short", "HEAD"]).map(|s| s.trim().to_owned());
    let dirty = output_of("git", ["status", "--porcelain"]).is_some_and(|s| !s.trim().is_empty());
    format!(
        "{}{}",
        head.unwrap_or_else(|| "no-commit".into()),
        if dirty { "-dirty" } else { "" }
    )
}

fn mib(kb: u64) -> String {
    format!("{:.1} MiB", kb as f64 / 1024.0)
}

fn pct(v: Option<f64>) -> String {
    v.map_or("n/a".to_owned(), |v| format!("{v:.1} %"))
}

/// "41.2k, 39.8k, 40.5k" — the per-round figures behind a median.
fn rounds(ws: &[&Wrk]) -> String {
    ws.iter()
        .map(|w| format!("{:.1}k", w.rps / 1000.0))
        .collect::<Vec<_>>()
        .join(", ")
}

fn p99s(ws: &[&Wrk]) -> String {
    format!("{:.2} ms", median(ws.iter().map(|w| w.p99_ms).collect()))
}

fn wrk_errors(ws: &[&Wrk]) -> String {
    let e: Vec<&str> = ws.iter().map(|w| w.errors.as_str()).filter(|e| !e.is_empty()).collect();
    let mut s = if e.is_empty() {
        String::new()
    } else {
        format!("; wrk: {}", e.join("; "))
    };
    let foreign = ws.iter().filter(|w| !w.foreign.is_empty()).count();
    if foreign > 0 {
        let _ = write!(s, "; **{foreign} run(s) with other tracers running**");
    }
    s
}

/// The agent, then the baseline if there is one.
fn agents(r: &Results) -> impl Iterator<Item = &AgentRuns> {
    std::iter::once(&r.agent).chain(&r.baseline)
}

/// The agent configurations that finished at least one run, with their figures.
fn with_figures<'a>(r: &'a Results, d: &'a Derived) -> impl Iterator<Item = (&'a AgentRuns, &'a AgentFigures)> {
    agents(r)
        .zip([&d.agent, &d.baseline])
        .filter_map(|(a, f)| Some((a, f.as_ref()?)))
}

/// The binary's path, relative to the workspace when inside it (`target/release/sockspan`).
fn shown_path(a: &AgentRuns) -> String {
    let root = util::root();
    a.bin.strip_prefix(&root).unwrap_or(&a.bin).display().to_string()
}

fn binary(a: &AgentRuns) -> String {
    format!("`{}` (sha256 {}…)", shown_path(a), a.sha256)
}

/// Suffix for the rows that the agent's existing labels name without saying "agent".
fn of_baseline(a: &AgentRuns) -> String {
    if a.name == "agent" {
        String::new()
    } else {
        format!(" ({})", a.name)
    }
}

pub fn render(r: &Results) -> String {
    let d = derive(r);
    let f = &r.facts;
    let mut s = String::new();
    let _ = writeln!(s, "### Run of {} UTC\n", f.date);
    let _ = writeln!(
        s,
        "- machine: `nproc` = {}, kernel {}, commit {}",
        f.nproc, f.kernel, f.commit
    );
    let _ = writeln!(s, "- command: `{}`", r.opts_command);
    for a in agents(r) {
        let _ = writeln!(s, "- {}: {}", a.name, binary(a));
    }
    let order = if r.baseline.is_some() {
        "off → floor → agent → baseline (the two agents taking turns going first)"
    } else {
        "off → floor → agent"
    };
    let _ = writeln!(
        s,
        "- load: `{}` against nginx (one process, `taskset -c 0`, access_log off, ~600-byte static page); \
         {} round(s) of {order}, medians reported\n",
        r.wrk_cmd,
        r.off.len()
    );

    let _ = writeln!(s, "| benchmark | figure | target | verdict |\n|---|---|---|---|");
    match &r.pipeline {
        Pipeline::Ok {
            line,
            events_per_sec,
            with_encoding,
        } => {
            let _ = writeln!(
                s,
                "| (a) userspace pipeline, one thread | {:.0}k events/s (`{line}`) | ≥ {:.0}k events/s | {} |",
                events_per_sec / 1000.0,
                PIPELINE_TARGET_EVENTS / 1000.0,
                verdict(*events_per_sec >= PIPELINE_TARGET_EVENTS)
            );
            for l in with_encoding {
                let how = if l.starts_with("with_sdk_encoding:") {
                    "encoded through the SDK (span → SpanData → protobuf types → bytes), as the gRPC and JSON exporters do"
                } else if l.starts_with("with_json_lines:") {
                    "formatted as the lines `--print=json` writes"
                } else {
                    "encoded straight into protobuf bytes, as the OTLP/HTTP exporter does"
                };
                let _ = writeln!(s, "| (a) the same, spans then {how} | `{l}` | | |");
            }
        }
        Pipeline::Missing(why) => {
            let _ = writeln!(
                s,
                "| (a) userspace pipeline, one thread | not available: {} | ≥ {:.0}k events/s | n/a |",
                why.replace('|', "\\|").replace('\n', " "),
                PIPELINE_TARGET_EVENTS / 1000.0
            );
        }
    }
    match &r.scaling {
        Ok(runs) => {
            for (what, line) in runs {
                let per = |key: &str| crate::bench::kv(line, key).map_or("?".to_owned(), |v| format!("{:.2}", 1e6 / v));
                let _ = writeln!(
                    s,
                    "| (g) userspace pipeline with OTLP encoding, one thread, {what} | {} µs per event, {} µs per span (`{line}`) | flat | |",
                    per("events_per_sec"),
                    per("spans_per_sec")
                );
            }
        }
        Err(why) => {
            let _ = writeln!(
                s,
                "| (g) pipeline versus connections and body size | not available: {} | | |",
                why.replace('|', "\\|").replace('\n', " ")
            );
        }
    }
    match &r.stitch {
        Ok(lines) => {
            for (i, line) in lines.iter().enumerate() {
                if line.starts_with("in_flight:") {
                    let figure = crate::bench::kv(line, "heap_bytes_per_request")
                        .map_or("?".to_owned(), |v| format!("{v:.0} bytes"));
                    let what = "(e) heap held per request in flight (10,000 in flight)";
                    let _ = writeln!(s, "| {what} | {figure} (`{line}`) | bounded | |");
                } else if i == 0 {
                    let figure =
                        crate::bench::kv(line, "spans_per_sec").map_or("?".to_owned(), |v| format!("{v:.0} spans/s"));
                    let what = "(d) stitching, whole pipeline on a two-hop chain, one thread";
                    let _ = writeln!(s, "| {what} | {figure} (`{line}`) | bounded | |");
                } else {
                    // The sweep: cost per event with more and more requests in flight.
                    let in_flight = crate::bench::kv(line, "concurrency").unwrap_or(0.0);
                    let figure = crate::bench::kv(line, "events_per_sec")
                        .map_or("?".to_owned(), |v| format!("{:.2} µs per event", 1e6 / v));
                    let what = format!("(d) the same, {in_flight:.0} requests in flight at once");
                    let _ = writeln!(s, "| {what} | {figure} (`{line}`) | flat | |");
                }
            }
        }
        Err(why) => {
            let _ = writeln!(
                s,
                "| (d, e) stitching | not available: {} | | n/a |",
                why.replace('|', "\\|").replace('\n', " ")
            );
        }
    }
    if let Some(e) = &r.agent_error {
        let _ = writeln!(
            s,
            "| (b) agent run | **FAILED**: {} | | **FAILED** |",
            e.replace('\n', " ").replace('|', "\\|")
        );
    }
    for (a, fig) in with_figures(r, &d) {
        match fig.ratio {
            Some(ratio) => {
                let _ = writeln!(
                    s,
                    "| (b) {} loss ÷ floor loss | {ratio:.2} ({} ÷ {}) | ≤ {LOSS_RATIO_TARGET} | {} |",
                    a.name,
                    pct(Some(fig.loss)),
                    pct(Some(d.floor_loss)),
                    verdict(ratio <= LOSS_RATIO_TARGET)
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    "| (b) {} loss ÷ floor loss | n/a: the floor lost nothing measurable ({:.1} %) | ≤ {LOSS_RATIO_TARGET} | n/a |",
                    a.name, d.floor_loss
                );
            }
        }
    }
    if let (Some(v), Some(new), Some(old)) = (&d.versus, &d.agent, &d.baseline) {
        let per_round: Vec<String> = v.rps_per_round.iter().map(|x| format!("{x:.3}")).collect();
        let loss_ratio = if old.loss > 0.0 {
            format!(" (×{:.2})", new.loss / old.loss)
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "| (b) agent ÷ baseline, in the same rounds | req/s ×{:.3} (median of per-round ratios {}); \
             loss {} vs {}{loss_ratio}; p99 ×{:.2} | | |",
            v.rps_ratio,
            per_round.join(", "),
            pct(Some(new.loss)),
            pct(Some(old.loss)),
            v.p99_ratio
        );
    }
    for (a, fig) in with_figures(r, &d) {
        if let Some(p) = fig.spans_pct {
            let server: u64 = a.runs.iter().map(|a| a.get_server).sum();
            let client: u64 = a.runs.iter().map(|a| a.get_client).sum();
            let requests: u64 = a.runs.iter().map(|a| a.load.requests).sum();
            let _ = writeln!(
                s,
                "| (b) spans exported ÷ (2 × requests served){} | {p:.1} % ({server} GET SERVER + {client} GET CLIENT for {requests} requests) | 100 % | {} |",
                of_baseline(a),
                if p >= 99.0 { "ok" } else { "spans lost" }
            );
        }
    }
    for (a, fig) in with_figures(r, &d) {
        if let (Some(run), Some(req)) = (fig.kernel_ns_per_run, fig.kernel_us_per_request) {
            let _ = writeln!(
                s,
                "| (f) {} kernel programs during (b) (`bpf_stats`) | {run:.0} ns per program run, {req:.2} µs per request | ≤ 400 ns per run | {} |",
                a.name,
                if run <= 400.0 { "ok" } else { "over" }
            );
        }
        if let Some(span) = fig.process_us_per_span {
            let _ = writeln!(
                s,
                "| (f) {} process CPU (user + system) from (b)'s start until exports settled | {span:.2} µs per span created, OTLP encoding included | ≤ 1.5 µs | {} |",
                a.name,
                if span <= 1.5 { "ok" } else { "over" }
            );
        }
    }
    for (a, fig) in with_figures(r, &d) {
        let _ = writeln!(
            s,
            "| (c) {} memory after (b) | VmHWM {}, VmRSS {} | | |",
            a.name,
            mib(fig.vm_hwm_kb),
            mib(fig.vm_rss_kb)
        );
    }

    let _ = writeln!(
        s,
        "\n| wrk run | req/s (median) | per round | p99 (median) | loss vs off | notes |\n|---|---|---|---|---|---|"
    );
    let off: Vec<&Wrk> = r.off.iter().collect();
    let _ = writeln!(
        s,
        "| agent off | {:.0} | {} | {} | — | spread between rounds {:.1} %{} |",
        d.off_rps,
        rounds(&off),
        p99s(&off),
        d.off_spread,
        wrk_errors(&off)
    );
    let floor: Vec<&Wrk> = r.floor.iter().map(|f| &f.load).collect();
    let hits: u64 = r.floor.iter().map(|f| f.hits).sum();
    let freq: u64 = floor.iter().map(|w| w.requests).sum();
    let _ = writeln!(
        s,
        "| floor: bpftrace count-only probes | {:.0} | {} | {} | {:.1} % | {:.1} tracepoint hits per request{} |",
        d.floor_rps,
        rounds(&floor),
        p99s(&floor),
        d.floor_loss,
        hits as f64 / freq.max(1) as f64,
        wrk_errors(&floor)
    );
    for (a, fig) in with_figures(r, &d) {
        let wrk: Vec<&Wrk> = a.runs.iter().map(|a| &a.load).collect();
        let spans: u64 = a.runs.iter().map(|a| a.spans_total).sum();
        let exports: u64 = a.runs.iter().map(|a| a.sink_requests).sum();
        let _ = writeln!(
            s,
            "| {}: `{}` → OTLP http/protobuf sink | {:.0} | {} | {} | {} | {spans} spans in {exports} exports{} |",
            a.name,
            shown_path(a),
            fig.rps,
            rounds(&wrk),
            p99s(&wrk),
            pct(Some(fig.loss)),
            wrk_errors(&wrk)
        );
    }
    let mut foreign: Vec<&str> = (r.off.iter())
        .chain(r.floor.iter().map(|f| &f.load))
        .chain(agents(r).flat_map(|a| a.runs.iter().map(|a| &a.load)))
        .flat_map(|w| w.foreign.iter().map(String::as_str))
        .collect();
    foreign.sort_unstable();
    foreign.dedup();
    if !foreign.is_empty() {
        let _ = writeln!(
            s,
            "\n**Warning:** tracers this bench did not start were running during some runs ({}): they hook \
             the same syscalls, so the figures above are skewed.",
            foreign.join(", ")
        );
    }
    if let Some(a) = r.agent.runs.last()
        && !a.metrics.is_empty()
    {
        let _ = writeln!(s, "\nAgent counters at the end of the last round:\n\n```");
        for m in &a.metrics {
            let _ = writeln!(s, "{m}");
        }
        let _ = writeln!(s, "```");
    }
    s
}

fn history_row(r: &Results) -> String {
    let d = derive(r);
    let f = &r.facts;
    let eps = match &r.pipeline {
        Pipeline::Ok { events_per_sec, .. } => format!("{:.0}k", events_per_sec / 1000.0),
        Pipeline::Missing(_) => "n/a".into(),
    };
    let agent = d.agent.as_ref();
    let hwm = agent.map_or("n/a".to_owned(), |a| mib(a.vm_hwm_kb));
    format!(
        "| {} | {} | {} | {} | {eps} | {:.0} | {:.1} % | {} | {} | {} | {hwm} |",
        f.date,
        f.commit,
        f.nproc,
        f.kernel,
        d.off_rps,
        d.floor_loss,
        pct(agent.map(|a| a.loss)),
        agent
            .and_then(|a| a.ratio)
            .map_or("n/a".to_owned(), |v| format!("{v:.2}")),
        pct(agent.and_then(|a| a.spans_pct)),
    )
}

pub fn write(path: &Path, r: &Results, latest: &str) -> Result<()> {
    let mut doc = fs::read_to_string(path).unwrap_or_default();
    if !(doc.contains(LATEST_START) && doc.contains(LATEST_END) && doc.contains(HISTORY_END)) {
        doc = TEMPLATE.to_owned();
    }
    let a = doc.find(LATEST_START).expect("marker") + LATEST_START.len();
    let b = doc.find(LATEST_END).expect("marker");
    doc.replace_range(a..b, &format!("\n{latest}"));
    let h = doc.find(HISTORY_END).expect("marker");
    doc.insert_str(h, &format!("{}\n", history_row(r)));
    fs::write(path, doc).with_context(|| format!("write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{Agent, AgentRuns, Floor};

    fn wrk(rps: f64) -> Wrk {
        Wrk {
            rps,
            p99_ms: 1.0,
            requests: 1000,
            ..Wrk::default()
        }
    }

    fn agent(rps: f64) -> Agent {
        Agent {
            load: wrk(rps),
            get_server: 1000,
            get_client: 1000,
            ..Agent::default()
        }
    }

    fn agent_runs(name: &'static str, rps: &[f64]) -> AgentRuns {
        AgentRuns {
            name,
            bin: util::root().join("target/release/sockspan"),
            sha256: "0123456789ab".into(),
            runs: rps.iter().map(|&r| agent(r)).collect(),
        }
    }

    fn results() -> Results {
        Results {
            pipeline: Pipeline::Ok {
                line: "events_per_sec=400000".into(),
                events_per_sec: 400_000.0,
                with_encoding: Vec::new(),
            },
            stitch: Err("not run".into()),
            scaling: Err("not run".into()),
            off: vec![wrk(100.0), wrk(120.0), wrk(80.0)],
            floor: [90.0, 70.0, 95.0]
                .map(|r| Floor {
                    load: wrk(r),
                    hits: 17_000,
                })
                .into(),
            agent: agent_runs("agent", &[85.0, 86.0, 84.0]),
            baseline: None,
            agent_error: None,
            wrk_cmd: "wrk".into(),
            opts_command: "cargo xtask bench".into(),
            facts: RunFacts {
                date: "2026-01-01 00:00".into(),
                nproc: "2".into(),
                kernel: "6.18".into(),
                commit: "abc1234".into(),
            },
        }
    }

    #[test]
    fn derives_losses_and_ratio() {
        let d = derive(&results());
        let a = d.agent.unwrap();
        assert!((d.floor_loss - 10.0).abs() < 1e-9);
        assert!((a.loss - 15.0).abs() < 1e-9);
        assert!((a.ratio.unwrap() - 1.5).abs() < 1e-9);
        assert!((a.spans_pct.unwrap() - 100.0).abs() < 1e-9);
        assert!((d.off_spread - 40.0).abs() < 1e-9);
        assert!(d.baseline.is_none() && d.versus.is_none());
        assert_eq!(median(vec![3.0, 1.0, 2.0, 10.0]), 2.5);
    }

    #[test]
    fn compares_with_the_baseline_round_by_round() {
        let mut r = results();
        // The last baseline run failed: its round is left out of the comparison.
        r.baseline = Some(agent_runs("baseline", &[80.0, 90.0]));
        let d = derive(&r);
        let b = d.baseline.as_ref().unwrap();
        assert!((b.loss - 15.0).abs() < 1e-9);
        let v = d.versus.as_ref().unwrap();
        assert_eq!(v.rps_per_round.len(), 2);
        assert!((v.rps_ratio - (85.0 / 80.0 + 86.0 / 90.0) / 2.0).abs() < 1e-9);
        let text = render(&r);
        assert!(text.contains("| (b) baseline loss ÷ floor loss | 1.50 "));
        assert!(text.contains("| (b) agent ÷ baseline, in the same rounds | req/s ×1.009 "));
        assert!(text.contains("| baseline: `target/release/sockspan` → OTLP"));
        assert!(text.contains("- baseline: `target/release/sockspan` (sha256 0123456789ab…)"));
    }

    #[test]
    fn writes_latest_and_appends_history() {
        let path = std::env::temp_dir().join(format!("xtask-report-{}.md", std::process::id()));
        let _ = fs::remove_file(&path);
        let r = results();
        write(&path, &r, "first\n").unwrap();
        write(&path, &r, "second\n").unwrap();
        let doc = fs::read_to_string(&path).unwrap();
        let _ = fs::remove_file(&path);
        assert!(doc.contains("second") && !doc.contains("first"));
        assert_eq!(
            doc.matches("| 400k | 100 | 10.0 % | 15.0 % | 1.50 | 100.0 % |").count(),
            2
        );
        assert!(doc.trim_end().ends_with(HISTORY_END));
    }
}
