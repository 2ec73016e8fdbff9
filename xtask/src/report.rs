//! Renders `cargo xtask bench` results and records them in docs/benchmarks.md: the latest run
//! replaces the block between the `bench:latest` markers, and a one-line summary is added to the
//! history table.
use std::{fmt::Write as _, fs, path::Path};

use anyhow::{Context, Result};

use crate::{
    bench::{LOSS_RATIO_TARGET, PIPELINE_TARGET_EVENTS, Pipeline, Results, Wrk},
    setup,
    util::output_of,
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
    agent_rps: Option<f64>,
    /// (max − min) / median of the off runs, in %: how noisy the machine was.
    off_spread: f64,
    floor_loss: f64,
    agent_loss: Option<f64>,
    ratio: Option<f64>,
    spans_pct: Option<f64>,
    vm_hwm_kb: u64,
    vm_rss_kb: u64,
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
    let floor_rps = rps(&r.floor.iter().map(|f| &f.wrk).collect::<Vec<_>>());
    let agent_rps = (!r.agent.is_empty()).then(|| rps(&r.agent.iter().map(|a| &a.wrk).collect::<Vec<_>>()));
    let floor_loss = loss(off_rps, floor_rps);
    let agent_loss = agent_rps.map(|a| loss(off_rps, a));
    let ratio = agent_loss.filter(|_| floor_loss > 0.0).map(|a| a / floor_loss);
    let requests: u64 = r.agent.iter().map(|a| a.wrk.requests).sum();
    let spans: u64 = r.agent.iter().map(|a| a.get_server + a.get_client).sum();
    let spans_pct = (requests > 0).then(|| spans as f64 / (2.0 * requests as f64) * 100.0);
    Derived {
        off_rps,
        floor_rps,
        agent_rps,
        off_spread,
        floor_loss,
        agent_loss,
        ratio,
        spans_pct,
        vm_hwm_kb: r.agent.iter().map(|a| a.vm_hwm_kb).max().unwrap_or(0),
        vm_rss_kb: r.agent.last().map_or(0, |a| a.vm_rss_kb),
    }
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
    let _ = writeln!(
        s,
        "- load: `{}` against nginx (one process, `taskset -c 0`, access_log off, ~600-byte static page); \
         {} round(s) of off → floor → agent, medians reported\n",
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
            if let Some(l) = with_encoding {
                let _ = writeln!(
                    s,
                    "| (a) the same, spans then encoded as the OTLP exporter does (SpanData → protobuf) | `{l}` | | |"
                );
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
    match &r.stitch {
        Ok(lines) => {
            for line in lines {
                let (what, key, unit) = if line.starts_with("stitch:") {
                    (
                        "(d) stitching, whole pipeline on a two-hop chain, one thread",
                        "spans_per_sec",
                        "spans/s",
                    )
                } else {
                    (
                        "(e) heap held per request in flight (10,000 in flight)",
                        "heap_bytes_per_request",
                        "bytes",
                    )
                };
                let figure = crate::bench::kv(line, key).map_or("?".to_owned(), |v| format!("{v:.0} {unit}"));
                let _ = writeln!(s, "| {what} | {figure} (`{line}`) | bounded | |");
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
    match d.ratio {
        Some(ratio) => {
            let _ = writeln!(
                s,
                "| (b) agent loss ÷ floor loss | {ratio:.2} ({} ÷ {}) | ≤ {LOSS_RATIO_TARGET} | {} |",
                pct(d.agent_loss),
                pct(Some(d.floor_loss)),
                verdict(ratio <= LOSS_RATIO_TARGET)
            );
        }
        None if d.agent_loss.is_some() => {
            let _ = writeln!(
                s,
                "| (b) agent loss ÷ floor loss | n/a: the floor lost nothing measurable ({:.1} %) | ≤ {LOSS_RATIO_TARGET} | n/a |",
                d.floor_loss
            );
        }
        None => {}
    }
    if let Some(p) = d.spans_pct {
        let server: u64 = r.agent.iter().map(|a| a.get_server).sum();
        let client: u64 = r.agent.iter().map(|a| a.get_client).sum();
        let requests: u64 = r.agent.iter().map(|a| a.wrk.requests).sum();
        let _ = writeln!(
            s,
            "| (b) spans exported ÷ (2 × requests served) | {p:.1} % ({server} GET SERVER + {client} GET CLIENT for {requests} requests) | 100 % | {} |",
            if p >= 99.0 { "ok" } else { "spans lost" }
        );
    }
    if !r.agent.is_empty() {
        let _ = writeln!(
            s,
            "| (c) agent memory after (b) | VmHWM {}, VmRSS {} | | |",
            mib(d.vm_hwm_kb),
            mib(d.vm_rss_kb)
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
    let floor: Vec<&Wrk> = r.floor.iter().map(|f| &f.wrk).collect();
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
    if let Some(agent_rps) = d.agent_rps {
        let agent: Vec<&Wrk> = r.agent.iter().map(|a| &a.wrk).collect();
        let spans: u64 = r.agent.iter().map(|a| a.spans_total).sum();
        let exports: u64 = r.agent.iter().map(|a| a.sink_requests).sum();
        let _ = writeln!(
            s,
            "| agent: sockspan → OTLP http/protobuf sink | {agent_rps:.0} | {} | {} | {} | {spans} spans in {exports} exports{} |",
            rounds(&agent),
            p99s(&agent),
            pct(d.agent_loss),
            wrk_errors(&agent)
        );
    }
    let mut foreign: Vec<&str> = (r.off.iter())
        .chain(r.floor.iter().map(|f| &f.wrk))
        .chain(r.agent.iter().map(|a| &a.wrk))
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
    if let Some(a) = r.agent.last()
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
    let hwm = if r.agent.is_empty() {
        "n/a".to_owned()
    } else {
        mib(d.vm_hwm_kb)
    };
    format!(
        "| {} | {} | {} | {} | {eps} | {:.0} | {:.1} % | {} | {} | {} | {hwm} |",
        f.date,
        f.commit,
        f.nproc,
        f.kernel,
        d.off_rps,
        d.floor_loss,
        pct(d.agent_loss),
        d.ratio.map_or("n/a".to_owned(), |v| format!("{v:.2}")),
        pct(d.spans_pct),
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
    use crate::bench::{Agent, Floor};

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
            wrk: wrk(rps),
            get_server: 1000,
            get_client: 1000,
            ..Agent::default()
        }
    }

    fn results() -> Results {
        Results {
            pipeline: Pipeline::Ok {
                line: "events_per_sec=400000".into(),
                events_per_sec: 400_000.0,
                with_encoding: None,
            },
            stitch: Err("not run".into()),
            off: vec![wrk(100.0), wrk(120.0), wrk(80.0)],
            floor: [90.0, 70.0, 95.0]
                .map(|r| Floor {
                    wrk: wrk(r),
                    hits: 17_000,
                })
                .into(),
            agent: vec![agent(85.0), agent(86.0), agent(84.0)],
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
        assert!((d.floor_loss - 10.0).abs() < 1e-9);
        assert!((d.agent_loss.unwrap() - 15.0).abs() < 1e-9);
        assert!((d.ratio.unwrap() - 1.5).abs() < 1e-9);
        assert!((d.spans_pct.unwrap() - 100.0).abs() < 1e-9);
        assert!((d.off_spread - 40.0).abs() < 1e-9);
        assert_eq!(median(vec![3.0, 1.0, 2.0, 10.0]), 2.5);
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
