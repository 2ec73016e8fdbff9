//! `cargo xtask fuzz`: coverage-guided fuzzing of the userspace stages (the `fuzz/` crate) with
//! libFuzzer, on the stable toolchain. cargo-fuzz wants a nightly only for `-Zsanitizer`; the
//! coverage feedback itself is LLVM's SanitizerCoverage pass, which stable rustc runs when asked
//! with `-Cpasses` and `-Cllvm-args`. libfuzzer-sys builds libFuzzer with the system C++ compiler.
//!
//! Each target runs on a scratch copy of its committed seed corpus (`fuzz/corpus/<target>`), so
//! long runs do not grow the committed one; crashes land in `fuzz/target/fuzz-work/<target>/`.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::util;

pub const TARGETS: [&str; 4] = ["http_parser", "conn_reassembly", "record_decode", "pipeline"];

/// What cargo-fuzz passes (its `-Zsanitizer=address` aside): SanitizerCoverage with inline 8-bit
/// counters, the PC table and comparison tracing (libFuzzer's feedback), `--cfg fuzzing`, and
/// debug assertions with overflow checks so arithmetic slips fail loudly.
const RUSTFLAGS: &[&str] = &[
    "-Cpasses=sancov-module",
    "-Cllvm-args=-sanitizer-coverage-level=4",
    "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
    "-Cllvm-args=-sanitizer-coverage-pc-table",
    "-Cllvm-args=-sanitizer-coverage-trace-compares",
    "-Cllvm-args=-sanitizer-coverage-stack-depth",
    "-Cllvm-args=-simplifycfg-branch-fold-threshold=0",
    "--cfg=fuzzing",
    "-Cdebug-assertions",
    "-Coverflow-checks",
    "-Ccodegen-units=1",
];

pub struct Opts {
    /// Empty: every target.
    pub targets: Vec<String>,
    /// Per target (each job runs this long).
    pub seconds: u64,
    /// Stop each job after this many executions instead (whichever comes first).
    pub runs: Option<u64>,
    /// libFuzzer processes per target, sharing its scratch corpus.
    pub jobs: u32,
    /// Rewrite the seed corpus from the recordings first.
    pub regen_corpus: bool,
    /// More libFuzzer flags, passed to every job.
    pub libfuzzer: Vec<String>,
}

struct Outcome {
    target: String,
    execs: u64,
    elapsed: Duration,
    cov: String,
    ft: String,
    corpus: String,
    /// Crash, timeout or out-of-memory inputs written by this run.
    failures: Vec<PathBuf>,
}

pub fn fuzz(opts: &Opts) -> Result<()> {
    let targets: Vec<String> = if opts.targets.is_empty() {
        TARGETS.iter().map(|t| (*t).to_owned()).collect()
    } else {
        opts.targets.clone()
    };
    for t in &targets {
        if !TARGETS.contains(&t.as_str()) {
            bail!("unknown fuzz target `{t}` (targets: {})", TARGETS.join(", "));
        }
    }
    let fuzz_dir = util::root().join("fuzz");
    if opts.regen_corpus {
        regen_corpus(&fuzz_dir)?;
    }
    let bin_dir = build(&fuzz_dir, &targets)?;
    let mut outcomes = Vec::new();
    for t in &targets {
        let o = run_target(&fuzz_dir, &bin_dir, t, opts)?;
        println!(
            "fuzz: {:<16} {:>12} execs in {:>6} ({:>9}/s), cov {}, ft {}, corpus {}: {}",
            o.target,
            o.execs,
            util::secs(o.elapsed),
            (o.execs as f64 / o.elapsed.as_secs_f64().max(0.001)).round() as u64,
            o.cov,
            o.ft,
            o.corpus,
            if o.failures.is_empty() { "ok" } else { "FAILED" }
        );
        for f in &o.failures {
            println!("fuzz: {}: failing input {}", o.target, f.display());
        }
        outcomes.push(o);
    }
    let total: u64 = outcomes.iter().map(|o| o.execs).sum();
    println!("fuzz: {total} executions in all");
    let failed: Vec<String> = outcomes
        .iter()
        .flat_map(|o| o.failures.iter().map(move |f| format!("{}: {}", o.target, f.display())))
        .collect();
    if !failed.is_empty() {
        bail!(
            "fuzzing found {} failing input(s) (reproduce: fuzz/target/<triple>/release/<target> <input>):\n  {}",
            failed.len(),
            failed.join("\n  ")
        );
    }
    Ok(())
}

/// The host's target triple: building for it explicitly keeps RUSTFLAGS off build scripts and
/// proc macros (instrumented, they could not load).
fn host_triple() -> Result<String> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = util::output_of(&rustc, ["-vV"]).with_context(|| format!("cannot run `{rustc} -vV`"))?;
    out.lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .with_context(|| format!("no host line in `{rustc} -vV`"))
}

/// Builds the targets with coverage instrumentation; returns the directory of the binaries.
fn build(fuzz_dir: &Path, targets: &[String]) -> Result<PathBuf> {
    let triple = host_triple()?;
    let target_dir = fuzz_dir.join("target");
    let mut cmd = util::cargo();
    cmd.args(["build", "--release", "--manifest-path"])
        .arg(fuzz_dir.join("Cargo.toml"))
        .args(["--target", &triple, "--target-dir"])
        .arg(&target_dir);
    for t in targets {
        cmd.args(["--bin", t]);
    }
    cmd.env("RUSTFLAGS", RUSTFLAGS.join(" "))
        // It would take precedence over RUSTFLAGS.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        // The eBPF object is embedded, never loaded: skip building it.
        .env("SOCKSPAN_EBPF_SKIP", "1");
    println!("fuzz: building {} ({})", targets.join(", "), util::show(&cmd));
    let t = Instant::now();
    util::run("building the fuzz targets", &mut cmd)?;
    println!("fuzz: built in {}", util::secs(t.elapsed()));
    Ok(target_dir.join(triple).join("release"))
}

/// Rewrites `fuzz/corpus/` from the recordings (an uninstrumented debug build of `gen_corpus`).
fn regen_corpus(fuzz_dir: &Path) -> Result<()> {
    let mut cmd = util::cargo();
    cmd.args(["run", "--manifest-path"])
        .arg(fuzz_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(fuzz_dir.join("target"))
        .args(["--bin", "gen_corpus"])
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env("SOCKSPAN_EBPF_SKIP", "1");
    util::run("regenerating the seed corpus", &mut cmd)
}

fn run_target(fuzz_dir: &Path, bin_dir: &Path, target: &str, opts: &Opts) -> Result<Outcome> {
    let work = fuzz_dir.join("target/fuzz-work").join(target);
    let corpus = work.join("corpus");
    let artifacts = work.join("artifacts");
    if corpus.exists() {
        fs::remove_dir_all(&corpus).with_context(|| format!("cannot clear {}", corpus.display()))?;
    }
    fs::create_dir_all(&corpus).with_context(|| format!("cannot create {}", corpus.display()))?;
    fs::create_dir_all(&artifacts).with_context(|| format!("cannot create {}", artifacts.display()))?;
    let seeds = fuzz_dir.join("corpus").join(target);
    for e in fs::read_dir(&seeds).with_context(|| format!("cannot read the seed corpus {}", seeds.display()))? {
        let path = e?.path();
        if let Some(name) = path.file_name() {
            fs::copy(&path, corpus.join(name)).with_context(|| format!("cannot copy {}", path.display()))?;
        }
    }
    let before = list(&artifacts)?;
    let bin = bin_dir.join(target);
    let t = Instant::now();
    let mut children = Vec::new();
    for job in 0..opts.jobs.max(1) {
        let log = work.join(format!("log-{job}.txt"));
        let mut cmd = Command::new(&bin);
        cmd.arg(format!("-max_total_time={}", opts.seconds))
            .arg("-print_final_stats=1")
            // An input slower than this is a failure (a quadratic path), not a pause.
            .arg("-timeout=10")
            .arg(format!("-artifact_prefix={}/", artifacts.display()));
        if let Some(runs) = opts.runs {
            cmd.arg(format!("-runs={runs}"));
        }
        cmd.args(&opts.libfuzzer);
        cmd.arg(&corpus)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?);
        if job == 0 {
            println!("fuzz: {target}: {} (log {})", util::show(&cmd), log.display());
        }
        let child = cmd.spawn().with_context(|| format!("cannot start {}", bin.display()))?;
        children.push((child, log));
    }
    let mut outcome = Outcome {
        target: target.to_owned(),
        execs: 0,
        elapsed: Duration::ZERO,
        cov: "?".into(),
        ft: "?".into(),
        corpus: "?".into(),
        failures: Vec::new(),
    };
    let mut failed_status = None;
    for (mut child, log) in children {
        let status = child.wait().with_context(|| format!("waiting for {target}"))?;
        let text = fs::read_to_string(&log).with_context(|| format!("cannot read {}", log.display()))?;
        outcome.execs += stat(&text, "stat::number_of_executed_units:").unwrap_or(0);
        // The last status line ("#N DONE cov: .. ft: .. corp: n/size ..") of the last job read.
        if let Some(line) = text.lines().rev().find(|l| l.starts_with('#') && l.contains(" cov: ")) {
            outcome.cov = field(line, "cov:").unwrap_or("?").to_owned();
            outcome.ft = field(line, "ft:").unwrap_or("?").to_owned();
            outcome.corpus = field(line, "corp:").unwrap_or("?").to_owned();
        }
        if !status.success() {
            failed_status = Some((status, log));
        }
    }
    outcome.elapsed = t.elapsed();
    outcome.failures = list(&artifacts)?.into_iter().filter(|p| !before.contains(p)).collect();
    if let Some((status, log)) = failed_status
        && outcome.failures.is_empty()
    {
        bail!(
            "{target}: libFuzzer failed ({status}) without writing an input; see {}",
            log.display()
        );
    }
    Ok(outcome)
}

fn list(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    for e in fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        v.push(e?.path());
    }
    Ok(v)
}

/// The number after `key` in libFuzzer's final stats.
fn stat(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
}

/// The word after `key` in a libFuzzer status line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let mut words = line.split_whitespace();
    words.find(|w| *w == key)?;
    words.next()
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_libfuzzer_output() {
        let text = "#43\tINITED cov: 420 ft: 913 corp: 19/5458b exec/s: 0 rss: 27Mb\n\
                    #1686257\tDONE   cov: 825 ft: 3626 corp: 1274/563Kb lim: 3108 exec/s: 105391 rss: 30Mb\n\
                    stat::number_of_executed_units: 1686257\nstat::average_exec_per_sec:     105391\n";
        assert_eq!(super::stat(text, "stat::number_of_executed_units:"), Some(1_686_257));
        let line = text.lines().nth(1).unwrap();
        assert_eq!(super::field(line, "cov:"), Some("825"));
        assert_eq!(super::field(line, "corp:"), Some("1274/563Kb"));
    }
}
