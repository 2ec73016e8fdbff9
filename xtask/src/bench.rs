//! `cargo xtask bench`: (a) userspace pipeline throughput, (b) wrk against nginx with the agent
//! off / the bpftrace floor / the agent on (and, with `--baseline`, another agent binary on, in
//! the same rounds), (c) the agent's memory. Prints the figures and records them in
//! docs/benchmarks.md. Every phase has a time limit and every process it starts is owned
//! by a `Guard`, so errors and Ctrl-C leave nothing running.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    report, setup,
    util::{self, Guard, TempDir},
};

pub struct Opts {
    /// Seconds per wrk run.
    pub duration: u64,
    /// wrk connections.
    pub connections: u32,
    /// Rounds of (off, floor, agent); figures are medians over rounds.
    pub rounds: u32,
    /// Another `sockspan` binary, run as one more agent configuration in every round.
    pub baseline: Option<PathBuf>,
    /// Print only; leave docs/benchmarks.md alone.
    pub no_write: bool,
    /// The `cargo xtask bench ...` command line, for the report.
    pub command: String,
}

/// CPU layout: the server on core 0, the load generator (and the pipeline benchmark) on core 1.
pub const SERVER_CPU: usize = 0;
pub const CLIENT_CPU: usize = 1;
/// Targets printed next to the figures.
pub const PIPELINE_TARGET_EVENTS: f64 = 300_000.0;
pub const LOSS_RATIO_TARGET: f64 = 2.0;

#[derive(Clone, Debug, Default)]
pub struct Wrk {
    pub rps: f64,
    pub p99_ms: f64,
    pub requests: u64,
    pub errors: String,
    /// Tracers this bench did not start that were running when the run began.
    pub foreign: Vec<String>,
}

/// A floor run: what the load measured (`L`), and the hits.
#[derive(Debug, Default)]
pub struct Floor<L = Wrk> {
    pub load: L,
    /// Tracepoint hits bpftrace counted during the run (all processes).
    pub hits: u64,
}

/// An agent run: what the load measured (`L`), and what the agent did meanwhile.
#[derive(Debug, Default)]
pub struct Agent<L = Wrk> {
    pub load: L,
    pub sink_requests: u64,
    pub spans_total: u64,
    pub get_server: u64,
    pub get_client: u64,
    pub vm_hwm_kb: u64,
    pub vm_rss_kb: u64,
    pub cpu: Cpu,
    /// `sockspan_*` counters about events, drops and exports from /metrics.
    pub metrics: Vec<String>,
}

/// CPU the agent spent on one run: its kernel programs during the load (`bpf_stats`), and its
/// process from the load's start until its exports settled (`/proc/<pid>/stat`).
#[derive(Debug, Default, Clone, Copy)]
pub struct Cpu {
    pub kernel_ns: u64,
    pub kernel_runs: u64,
    pub process_ns: u64,
}

impl Cpu {
    /// The agent's programs' (run time, runs) so far: from the fdinfo of the program
    /// descriptors it holds (with `kernel.bpf_stats_enabled` on), each program once.
    fn programs(pid: u32) -> (u64, u64) {
        let mut seen = std::collections::HashMap::new();
        for entry in fs::read_dir(format!("/proc/{pid}/fdinfo"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let Ok(info) = fs::read_to_string(entry.path()) else {
                continue;
            };
            let field = |k: &str| info.lines().find_map(|l| l.strip_prefix(k)?.trim().parse::<u64>().ok());
            if let (Some(id), Some(ns), Some(runs)) = (field("prog_id:"), field("run_time_ns:"), field("run_cnt:")) {
                seen.insert(id, (ns, runs));
            }
        }
        seen.values().fold((0, 0), |(a, b), (ns, runs)| (a + ns, b + runs))
    }

    /// The process's user + system time so far, in ns.
    fn process(pid: u32) -> u64 {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // After the command name's closing parenthesis: utime and stime are fields 14 and 15.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        // `rest` starts at field 3 (the state).
        (ticks(11) + ticks(12)) * 1_000_000_000 / hz
    }
}

/// Turns `kernel.bpf_stats_enabled` on while it lives (the kernel then times every program
/// run); puts the old value back.
struct BpfStats(String);

impl BpfStats {
    const PATH: &str = "/proc/sys/kernel/bpf_stats_enabled";

    fn on() -> Self {
        let old = fs::read_to_string(Self::PATH).unwrap_or_else(|_| "0".to_owned());
        if let Err(e) = fs::write(Self::PATH, "1") {
            println!("bench: cannot enable {}: {e}; kernel CPU figures will be 0", Self::PATH);
        }
        Self(old.trim().to_owned())
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = fs::write(Self::PATH, &self.0);
    }
}

/// The lines of `bench-pipeline` after its first: the same replay with each batch's spans
/// encoded as the OTLP/HTTP exporter does, then through the SDK's conversions as the gRPC and
/// JSON exporters do, then formatted as `--print=json` lines.
const ENCODINGS: [&str; 3] = ["with_otlp_encoding:", "with_sdk_encoding:", "with_json_lines:"];

pub enum Pipeline {
    Ok {
        line: String,
        events_per_sec: f64,
        /// The [`ENCODINGS`] lines.
        with_encoding: Vec<String>,
    },
    Missing(String),
}

/// One agent configuration of (b): the binary it ran and its runs, one per round.
#[derive(Debug, Default)]
pub struct AgentRuns {
    /// "agent" or "baseline": names the configuration in the log and the report.
    pub name: &'static str,
    pub bin: PathBuf,
    /// The binary's SHA-256 (12 hex digits): a path alone does not say which build ran.
    pub sha256: String,
    pub runs: Vec<Agent>,
}

impl AgentRuns {
    fn new(name: &'static str, bin: &Path) -> Self {
        let sha256 = util::output_of("sha256sum", [bin])
            .and_then(|s| s.get(..12).map(str::to_owned))
            .unwrap_or_else(|| "?".to_owned());
        Self {
            name,
            bin: bin.to_path_buf(),
            sha256,
            runs: Vec::new(),
        }
    }
}

/// Everything one `cargo xtask bench` measured; (b) has one entry per round and configuration.
pub struct Results {
    pub pipeline: Pipeline,
    /// `sockspan bench-stitch` output lines (stitching throughput; memory with requests in
    /// flight), or why it could not run.
    pub stitch: std::result::Result<Vec<String>, String>,
    /// (g): each sweep point ("10 connections", "1 MiB bodies", ...) and its `bench-pipeline`
    /// line, or why the sweep could not run.
    pub scaling: std::result::Result<Vec<(String, String)>, String>,
    pub off: Vec<Wrk>,
    pub floor: Vec<Floor>,
    pub agent: AgentRuns,
    /// With `--baseline`: the other binary, measured in the same rounds as `agent`.
    pub baseline: Option<AgentRuns>,
    /// Why an agent run failed (the bench then stops and fails).
    pub agent_error: Option<String>,
    pub wrk_cmd: String,
    pub opts_command: String,
    pub facts: report::RunFacts,
}

pub fn bench(opts: &Opts) -> Result<()> {
    util::require_root("bench")?;
    setup::setup(setup::BENCH)?;
    let bin = agent_binary()?;
    for b in std::iter::once(&bin).chain(&opts.baseline) {
        if !b.exists() {
            bail!("{} does not exist", b.display());
        }
    }
    let tmp = TempDir::new("sockspan-bench")?;

    println!(
        "\nbench (a): userspace pipeline, `taskset -c {CLIENT_CPU} {} bench-pipeline`",
        bin.display()
    );
    let pipeline = pipeline(&bin, &tmp.0);
    match &pipeline {
        Pipeline::Ok {
            line, with_encoding, ..
        } => {
            println!("bench (a): {line}");
            for l in with_encoding {
                println!("bench (a): {l}");
            }
        }
        Pipeline::Missing(why) => println!("bench (a): not available: {why}"),
    }

    println!(
        "\nbench (d, e): stitching and in-flight memory, `taskset -c {CLIENT_CPU} {} bench-stitch`",
        bin.display()
    );
    let stitch = stitch(&bin, &tmp.0);
    match &stitch {
        Ok(lines) => lines.iter().for_each(|l| println!("bench (d, e): {l}")),
        Err(why) => println!("bench (d, e): not available: {why}"),
    }

    println!("\nbench (g): the pipeline's cost versus connections and response size, `bench-pipeline`");
    let scaling = scaling(&bin, &tmp.0);
    match &scaling {
        Ok(runs) => runs.iter().for_each(|(what, l)| println!("bench (g): {what}: {l}")),
        Err(why) => println!("bench (g): not available: {why}"),
    }

    println!("\nbench (b): nginx on core {SERVER_CPU}, wrk on core {CLIENT_CPU}");
    let port = util::free_port(18099)?;
    let _nginx = start_nginx(&tmp.0, port)?;
    let url = format!("http://127.0.0.1:{port}/index.html");
    let wrk_args = |secs: u64| wrk_args(&url, opts.connections, secs);
    let wrk_cmd = format!("taskset {}", wrk_args(opts.duration).join(" "));
    println!("bench (b): warm-up (2 s)");
    run_wrk(&wrk_args(2), 2)?;

    // Rounds of off → floor → agent (→ baseline), so that slow drifts of a shared machine hit
    // every configuration alike; the report uses medians over rounds.
    let mut r = Results {
        pipeline,
        stitch,
        scaling,
        off: Vec::new(),
        floor: Vec::new(),
        agent: AgentRuns::new("agent", &bin),
        baseline: opts.baseline.as_deref().map(|b| AgentRuns::new("baseline", b)),
        agent_error: None,
        wrk_cmd,
        opts_command: opts.command.clone(),
        facts: report::RunFacts::collect(),
    };
    let load = || run_wrk(&wrk_args(opts.duration), opts.duration);
    'rounds: for round in 1..=opts.rounds {
        let n = opts.rounds;
        let dir = tmp.0.join(format!("round-{round}"));
        fs::create_dir_all(&dir)?;
        println!("bench (b): round {round}/{n}: agent off");
        r.off.push(load()?);
        print_wrk("off", r.off.last().expect("pushed"));

        println!("bench (b): round {round}/{n}: floor (bpftrace count-only probes on the agent's tracepoints)");
        r.floor.push(run_floor(&dir, load)?);
        print_wrk("floor", &r.floor.last().expect("pushed").load);

        let mut agents: Vec<&mut AgentRuns> = std::iter::once(&mut r.agent).chain(&mut r.baseline).collect();
        // The two agents take turns going first, so that neither always runs right after the
        // floor or right after the other: a position effect would otherwise read as a difference.
        if round % 2 == 0 {
            agents.reverse();
        }
        for a in agents {
            let name = a.name;
            println!(
                "bench (b): round {round}/{n}: {name} on, `{}` (OTLP http/protobuf to a local sink)",
                a.bin.display()
            );
            // Each agent gets its own directory: the sink's files are counted after the run.
            let dir = dir.join(name);
            fs::create_dir_all(&dir)?;
            match run_agent(&a.bin, &dir, Output::Otlp, load) {
                Ok(run) => {
                    print_wrk(name, &run.load);
                    a.runs.push(run);
                }
                Err(e) => {
                    println!("bench (b): {name} run FAILED: {e:#}");
                    r.agent_error = Some(format!("{name} (`{}`): {e:#}", a.bin.display()));
                    break 'rounds;
                }
            }
        }
    }

    let text = report::render(&r);
    println!("\n{text}");
    if let Some(e) = &r.agent_error {
        bail!("the agent run failed, docs/benchmarks.md left unchanged: {e}");
    }
    if !opts.no_write {
        report::write(&util::root().join("docs/benchmarks.md"), &r, &text)?;
        println!("bench: results written to docs/benchmarks.md");
    }
    Ok(())
}

/// The agent binary to measure: `SOCKSPAN_BIN` if set, else a fresh release build.
pub fn agent_binary() -> Result<PathBuf> {
    if std::env::var_os("SOCKSPAN_BIN").is_none() {
        println!(
            "bench: building the agent with its benchmark subcommands (cargo build --release -p agent --features bench)"
        );
        util::run(
            "cargo build --release -p agent --features bench",
            util::cargo().args(["build", "--release", "-p", "agent", "--features", "bench"]),
        )?;
    }
    Ok(util::sockspan_bin())
}

/// Runs `sockspan <args>` pinned to the client core, at most 5 minutes; returns its exit status
/// and output lines (stdout, then stderr; stdout is also kept in `tmp/<name>.out`).
fn run_subcommand(
    bin: &Path,
    tmp: &Path,
    args: &[&str],
) -> std::result::Result<(std::process::ExitStatus, Vec<String>), String> {
    let name = args.first().copied().unwrap_or("sockspan");
    let mut child = Command::new("taskset")
        .args(["-c", &CLIENT_CPU.to_string()])
        .arg(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start: {e}"))?;
    let stdout = util::lines_to_channel(
        child.stdout.take().expect("piped"),
        Some(tmp.join(format!("{name}.out"))),
    );
    let stderr = util::lines_to_channel(child.stderr.take().expect("piped"), None);
    let mut g = Guard::new(&format!("sockspan {name}"), child);
    let status = g.wait(Duration::from_secs(300)).map_err(|e| format!("{e:#}"))?;
    Ok((status, stdout.iter().chain(stderr.iter()).collect()))
}

fn pipeline(bin: &Path, tmp: &Path) -> Pipeline {
    let (status, lines) = match run_subcommand(bin, tmp, &["bench-pipeline"]) {
        Ok(r) => r,
        Err(e) => return Pipeline::Missing(e),
    };
    let found = lines.iter().find(|l| l.contains("events_per_sec="));
    match found {
        Some(line) => match kv(line, "events_per_sec") {
            Some(eps) if status.success() => Pipeline::Ok {
                line: line.trim().to_owned(),
                events_per_sec: eps,
                with_encoding: lines
                    .iter()
                    .filter(|l| ENCODINGS.iter().any(|e| l.starts_with(e)))
                    .map(|l| l.trim().to_owned())
                    .collect(),
            },
            _ => Pipeline::Missing(format!("{status}, output: {line}")),
        },
        None => {
            let tail: Vec<&str> = lines.iter().rev().take(3).rev().map(String::as_str).collect();
            Pipeline::Missing(format!(
                "the subcommand printed no `events_per_sec=` line ({status}; last output: {:?})",
                tail.join(" | ")
            ))
        }
    }
}

/// Runs `sockspan bench-stitch`: a two-hop chain replayed through every stage (spans/s), then
/// 10,000 requests held in flight (heap bytes per request); then the chain again with 10 to
/// 50,000 requests in flight at once, whose cost per event must stay flat (no path scans every
/// request in flight; beyond 65,536 connections the table evicts, counted).
fn stitch(bin: &Path, tmp: &Path) -> std::result::Result<Vec<String>, String> {
    let (status, lines) = run_subcommand(bin, tmp, &["bench-stitch", "--in-flight", "10000"])?;
    let mut wanted: Vec<String> = lines
        .iter()
        .filter(|l| l.starts_with("stitch:") || l.starts_with("in_flight:"))
        .cloned()
        .collect();
    if !status.success() || wanted.len() != 2 {
        return Err(format!("{status}: {}", lines.join(" | ")));
    }
    for concurrency in STITCH_SWEEP {
        let c = concurrency.to_string();
        let args = [
            "bench-stitch",
            "--requests",
            "100000",
            "--concurrency",
            &c,
            "--in-flight",
            "10",
        ];
        let (status, lines) = run_subcommand(bin, tmp, &args)?;
        match lines.iter().find(|l| l.starts_with("stitch:")) {
            Some(l) if status.success() => wanted.push(l.clone()),
            _ => return Err(format!("{status}: {}", lines.join(" | "))),
        }
    }
    Ok(wanted)
}

/// Keep-alive connections in the pipeline's connection sweep (200,000 exchanges in all).
const CONNECTION_SWEEP: [u32; 4] = [10, 100, 1_000, 10_000];
/// Response body sizes in the pipeline's body sweep, with the exchanges per connection (of
/// 100): fewer for the largest, whose 64 KiB calls each give a record.
const BODY_SWEEP: [(usize, u32); 4] = [(64, 200), (1024, 200), (16 * 1024, 200), (1024 * 1024, 20)];

/// Runs `sockspan bench-pipeline` over the connection and body-size sweeps: the userspace
/// pipeline's cost per event and per span as the connections held and the responses grow.
fn scaling(bin: &Path, tmp: &Path) -> std::result::Result<Vec<(String, String)>, String> {
    let mut points = Vec::new();
    for c in CONNECTION_SWEEP {
        points.push((format!("{c} connections"), c, 200_000 / c, 615));
    }
    for (body, per_conn) in BODY_SWEEP {
        let what = if body >= 1024 * 1024 {
            format!("{} MiB bodies", body / (1024 * 1024))
        } else if body >= 1024 {
            format!("{} KiB bodies", body / 1024)
        } else {
            format!("{body} B bodies")
        };
        points.push((what, 100, per_conn, body));
    }
    let mut runs = Vec::new();
    for (what, connections, per_conn, body) in points {
        let (c, p, b) = (connections.to_string(), per_conn.to_string(), body.to_string());
        let args = [
            "bench-pipeline",
            "--connections",
            &c,
            "--per-conn",
            &p,
            "--body-bytes",
            &b,
            "--rounds",
            "1",
        ];
        let (status, lines) = run_subcommand(bin, tmp, &args)?;
        match lines.iter().find(|l| l.starts_with("with_otlp_encoding:")) {
            Some(l) if status.success() => runs.push((what, l.trim().to_owned())),
            _ => return Err(format!("{status}: {}", lines.join(" | "))),
        }
    }
    Ok(runs)
}

/// Requests in flight at once in the stitching sweep.
const STITCH_SWEEP: [u32; 5] = [10, 1_000, 10_000, 40_000, 50_000];

/// `key=value` from a line of `k=v` tokens.
pub fn kv(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|t| t.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

pub fn start_nginx(tmp: &Path, port: u16) -> Result<Guard> {
    let dir = tmp.join("nginx");
    fs::create_dir_all(dir.join("www"))?;
    // A small static page (~600 bytes, like nginx's default index.html).
    let page = format!(
        "<!doctype html><title>sockspan bench</title><p>{}</p>\n",
        "hello ".repeat(90)
    );
    fs::write(dir.join("www/index.html"), page)?;
    let d = dir.display();
    // master_process off: one process that is the worker, so stopping it stops everything.
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  default_type text/html;\n\
         \x20 client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
         \x20 uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         \x20 server {{ listen 127.0.0.1:{port}; root {d}/www; }}\n}}\n"
    );
    fs::write(dir.join("nginx.conf"), conf)?;
    let child = Command::new("taskset")
        .args(["-c", &SERVER_CPU.to_string(), "/usr/sbin/nginx", "-p"])
        .arg(&dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-e")
        .arg(dir.join("error.log"))
        .stdin(Stdio::null())
        .spawn()
        .context("start nginx")?;
    let mut g = Guard::new("nginx", child);
    let ok = util::poll_until(Duration::from_secs(10), || {
        util::http_get(port, "/index.html", Duration::from_secs(1)).is_ok_and(|(c, _)| c == 200)
    });
    if !ok {
        let log = fs::read_to_string(dir.join("error.log")).unwrap_or_default();
        bail!(
            "nginx did not serve 127.0.0.1:{port} within 10 s (alive: {}); error.log: {log}",
            g.alive()
        );
    }
    println!(
        "bench (b): nginx serving http://127.0.0.1:{port}/index.html (pid {})",
        g.pid()
    );
    Ok(g)
}

/// `taskset`'s arguments for one wrk run against `url` from the client core: one thread,
/// `connections` connections, `secs` seconds, with the latency distribution.
pub fn wrk_args(url: &str, connections: u32, secs: u64) -> Vec<String> {
    vec![
        "-c".to_owned(),
        CLIENT_CPU.to_string(),
        "wrk".to_owned(),
        "-t1".to_owned(),
        format!("-c{connections}"),
        format!("-d{secs}s"),
        "--latency".to_owned(),
        url.to_owned(),
    ]
}

pub fn run_wrk(args: &[String], secs: u64) -> Result<Wrk> {
    let foreign = util::foreign_tracers();
    let mut child = Command::new("taskset")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start wrk")?;
    let out = util::lines_to_channel(child.stdout.take().expect("piped"), None);
    let err = util::lines_to_channel(child.stderr.take().expect("piped"), None);
    let status = Guard::new("wrk", child).wait(Duration::from_secs(secs + 30))?;
    let text: Vec<String> = out.iter().chain(err.iter()).collect();
    if !status.success() {
        bail!("wrk failed ({status}): {}", text.join("\n"));
    }
    let mut w = parse_wrk(&text).with_context(|| format!("cannot read wrk's output:\n{}", text.join("\n")))?;
    // Checked at both ends of the run: a tracer may start or stop in between.
    w.foreign = foreign;
    w.foreign.extend(util::foreign_tracers());
    w.foreign.sort_unstable();
    w.foreign.dedup();
    Ok(w)
}

fn parse_wrk(lines: &[String]) -> Result<Wrk> {
    let mut w = Wrk::default();
    let mut errors = Vec::new();
    for l in lines {
        let t = l.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            w.rps = v.trim().parse()?;
        } else if let Some(v) = t.strip_prefix("99%") {
            w.p99_ms = duration_ms(v.trim()).context("p99")?;
        } else if t.contains(" requests in ") {
            w.requests = t.split_whitespace().next().unwrap_or("0").parse()?;
        } else if t.starts_with("Socket errors") || t.starts_with("Non-2xx") {
            errors.push(t.to_owned());
        }
    }
    if w.rps == 0.0 || w.requests == 0 {
        bail!("no Requests/sec or request count");
    }
    w.errors = errors.join("; ");
    Ok(w)
}

/// wrk's "1.23ms" / "456.00us" / "1.01s" in milliseconds.
fn duration_ms(s: &str) -> Option<f64> {
    let (num, mul) = if let Some(n) = s.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000.0)
    } else {
        (s.strip_suffix('s')?, 1000.0)
    };
    Some(num.parse::<f64>().ok()? * mul)
}

fn print_wrk(name: &str, w: &Wrk) {
    let errs = if w.errors.is_empty() {
        String::new()
    } else {
        format!(" ({})", w.errors)
    };
    let errs = if w.foreign.is_empty() {
        errs
    } else {
        format!("{errs}  WARNING: other tracers running: {}", w.foreign.join(" "))
    };
    println!(
        "bench (b): {name:<5} {:>10.0} req/s  p99 {:>7.3} ms  {} requests{errs}",
        w.rps, w.p99_ms, w.requests
    );
}

/// The cost floor: a bpftrace script of count-only probes on exactly the tracepoints the
/// agent attaches (its table of hooks). What these cost is the price of hooking at all; the
/// agent's extra cost over it is what its own code (capture, ring buffer, userspace) adds.
pub fn floor_script() -> String {
    let probes: Vec<String> = agent_common::hooks::TRACEPOINTS
        .iter()
        .map(|t| format!("tracepoint:{}:{}", t.category, t.name))
        .collect();
    format!(
        "// Generated by `cargo xtask bench` from agent_common::hooks::TRACEPOINTS.\n{}\n{{\n  @[probe] = count();\n}}\n\n\
         // bpftrace runs BEGIN once every probe above is attached.\nBEGIN\n{{\n  printf(\"floor: attached\\n\");\n}}\n",
        probes.join(",\n")
    )
}

pub fn run_floor<L>(tmp: &Path, load: impl FnOnce() -> Result<L>) -> Result<Floor<L>> {
    let script = tmp.join("floor.bt");
    fs::write(&script, floor_script()).context("write the floor script")?;
    let mut child = Command::new("bpftrace")
        .args(["-B", "line"])
        .arg(&script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start bpftrace")?;
    let out = util::lines_to_channel(child.stdout.take().expect("piped"), Some(tmp.join("bpftrace.out")));
    let err = util::lines_to_channel(child.stderr.take().expect("piped"), Some(tmp.join("bpftrace.err")));
    let mut g = Guard::new("bpftrace", child);
    if let Err(seen) = util::wait_for_line(&out, "floor: attached", Duration::from_secs(120)) {
        let errs: Vec<String> = err.try_iter().collect();
        bail!(
            "bpftrace did not attach within 120 s: {}\n{}",
            seen.join("\n"),
            errs.join("\n")
        );
    }
    let load = load()?;
    // SIGINT makes bpftrace print its maps and exit.
    g.stop("INT", Duration::from_secs(30));
    let hits = out
        .iter()
        .filter(|l| l.starts_with("@["))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    Ok(Floor { load, hits })
}

/// What the agent does with its spans in a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// OTLP http/protobuf to the local sink.
    Otlp,
    /// Printed (text, one line per span) to a file.
    Print,
}

pub fn run_agent<L>(bin: &Path, tmp: &Path, output: Output, load: impl FnOnce() -> Result<L>) -> Result<Agent<L>> {
    let (sink_dir, mut sink, sink_port) = start_sink(tmp)?;

    // The agent.
    let metrics_port = util::free_port(18098)?;
    let mut cmd = Command::new(bin);
    cmd.args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
    if output == Output::Otlp {
        cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{sink_port}"))
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf");
    }
    cmd.stdin(Stdio::null())
        .stdout(fs::File::create(tmp.join("agent.stdout"))?)
        .stderr(Stdio::piped());
    println!("bench (b): starting `{}`", util::show(&cmd));
    let mut child = cmd.spawn().with_context(|| format!("start {}", bin.display()))?;
    let agent_err = util::lines_to_channel(child.stderr.take().expect("piped"), Some(tmp.join("agent.stderr")));
    let mut agent = Guard::new("sockspan", child);
    if let Err(seen) = util::wait_for_line(&agent_err, "sockspan ready", Duration::from_secs(120)) {
        let tail: Vec<&String> = seen
            .iter()
            .rev()
            .take(15)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        let what = if agent.alive() {
            "did not print `sockspan ready` within 120 s"
        } else {
            "exited before printing `sockspan ready`"
        };
        let tail = tail.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n");
        bail!("the agent {what}; its last stderr lines:\n{tail}");
    }
    // Keep draining the agent's stderr (into the log) so it never blocks on a full pipe.
    thread::spawn(move || for _ in agent_err {});

    let stats = BpfStats::on();
    let (kernel_before, process_before) = (Cpu::programs(agent.pid()), Cpu::process(agent.pid()));
    let load = load()?;
    let kernel_after = Cpu::programs(agent.pid());
    drop(stats);
    if !agent.alive() {
        bail!(
            "the agent exited during the run; its last stderr lines:\n{}",
            tail_file(&tmp.join("agent.stderr"), 15)
        );
    }
    // Let exports settle: wait until the sink has had no new export for 3 s (at most 60 s).
    let settle_start = Instant::now();
    let mut last = (sink_stats(sink_port).unwrap_or(0), Instant::now());
    while settle_start.elapsed() < Duration::from_secs(60) && last.1.elapsed() < Duration::from_secs(3) {
        thread::sleep(Duration::from_millis(250));
        let now = sink_stats(sink_port).unwrap_or(last.0);
        if now != last.0 {
            last = (now, Instant::now());
        }
    }
    let status = fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap_or_default();
    let field = |k: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let (vm_hwm_kb, vm_rss_kb) = (field("VmHWM:"), field("VmRSS:"));
    let cpu = Cpu {
        kernel_ns: kernel_after.0.saturating_sub(kernel_before.0),
        kernel_runs: kernel_after.1.saturating_sub(kernel_before.1),
        process_ns: Cpu::process(agent.pid()).saturating_sub(process_before),
    };
    let metrics = match util::http_get(metrics_port, "/metrics", Duration::from_secs(5)) {
        Ok((200, body)) => body
            .lines()
            .filter(|l| l.starts_with("sockspan_"))
            .map(str::to_owned)
            .collect(),
        Ok((code, _)) => vec![format!("(/metrics answered {code})")],
        Err(e) => vec![format!("(/metrics unavailable: {e})")],
    };
    match agent.stop("TERM", Duration::from_secs(30)) {
        Some(st) if st.success() => {}
        Some(st) => bail!(
            "the agent exited with {st} after SIGTERM; its last stderr lines:\n{}",
            tail_file(&tmp.join("agent.stderr"), 15)
        ),
        None => bail!("the agent did not exit within 30 s of SIGTERM"),
    }
    sink.stop("TERM", Duration::from_secs(5));

    let counted = match output {
        Output::Otlp => sink_count(&sink_dir)?,
        Output::Print => printed_counts(&tmp.join("agent.stdout"))?,
    };
    let num = |k: &str| json_u64(&counted, k).unwrap_or(0);
    let a = Agent {
        load,
        sink_requests: num("\"requests\""),
        spans_total: num("\"spans\""),
        get_server: num("\"GET SERVER\""),
        get_client: num("\"GET CLIENT\""),
        vm_hwm_kb,
        vm_rss_kb,
        cpu,
        metrics,
    };
    println!(
        "bench (b): agent exported {} spans in {} OTLP requests ({} GET SERVER, {} GET CLIENT); {counted}",
        a.spans_total, a.sink_requests, a.get_server, a.get_client
    );
    Ok(a)
}

/// Starts the OTLP sink (`cargo xtask otlp-sink`, see `sink.rs`) on a free port, keeping what
/// it receives in `tmp/sink`: (that directory, the sink, its port). It stands in for a
/// collector, which is not the agent's cost: it runs on the load generator's core (on the
/// service's, nginx waited behind it for 3–26 ms of each second at 5,000 req/s).
pub fn start_sink(tmp: &Path) -> Result<(PathBuf, Guard, u16)> {
    let sink_dir = tmp.join("sink");
    fs::create_dir_all(&sink_dir)?;
    let mut child = Command::new("taskset")
        .args(["-c", &CLIENT_CPU.to_string()])
        .arg(std::env::current_exe().context("this program's path")?)
        .arg("otlp-sink")
        .arg(&sink_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("start the OTLP sink (cargo xtask otlp-sink)")?;
    let sink_out = util::lines_to_channel(child.stdout.take().expect("piped"), None);
    let sink = Guard::new("otlp-sink", child);
    let line = sink_out
        .recv_timeout(Duration::from_secs(10))
        .context("the OTLP sink did not say where it listens within 10 s")?;
    let port: u16 = line
        .rsplit(':')
        .next()
        .and_then(|p| p.trim().parse().ok())
        .context("sink port")?;
    Ok((sink_dir, sink, port))
}

/// What the sink received in `sink_dir` (JSON: spans, OTLP requests, per method and kind).
pub fn sink_count(sink_dir: &Path) -> Result<String> {
    util::output(
        Command::new("python3")
            .arg(util::root().join("scripts/otlp-sink.py"))
            .arg("count")
            .arg(sink_dir),
    )
    .context("counting the exported spans failed")
}

/// The spans the agent printed (text lines: time, kind, service, name, ...), counted as the
/// sink counts what it received (`{"spans": N, "GET SERVER": N, "GET CLIENT": N}`).
fn printed_counts(path: &Path) -> Result<String> {
    let text = fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let (mut spans, mut server, mut client) = (0u64, 0u64, 0u64);
    for line in text.lines() {
        let t: Vec<&str> = line.split_whitespace().take(4).collect();
        if t.len() < 4 {
            continue;
        }
        spans += 1;
        match (t[1], t[3]) {
            ("SERVER", "GET") => server += 1,
            ("CLIENT", "GET") => client += 1,
            _ => {}
        }
    }
    Ok(format!(
        "{{\"spans\": {spans}, \"GET SERVER\": {server}, \"GET CLIENT\": {client}, \"requests\": 0}}"
    ))
}

fn tail_file(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn sink_stats(port: u16) -> Option<u64> {
    let (code, body) = util::http_get(port, "/stats", Duration::from_secs(2)).ok()?;
    (code == 200).then(|| json_u64(&body, "\"requests\""))?
}

/// The number after `key:` in a flat JSON text (enough for the sink's output).
pub fn json_u64(json: &str, key: &str) -> Option<u64> {
    let rest = &json[json.find(key)? + key.len()..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    rest[..rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len())]
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk() {
        let out = "Running 10s test @ http://127.0.0.1:18099/index.html
  1 threads and 32 connections
  Latency Distribution
     50%  370.00us
     99%    1.52ms
  229874 requests in 10.00s, 176.47MB read
Requests/sec:  22984.81
Transfer/sec:     17.64MB";
        let lines: Vec<String> = out.lines().map(str::to_owned).collect();
        let w = parse_wrk(&lines).unwrap();
        assert_eq!(w.requests, 229_874);
        assert!((w.rps - 22984.81).abs() < 1e-6);
        assert!((w.p99_ms - 1.52).abs() < 1e-9);
        assert_eq!(duration_ms("370.00us"), Some(0.37));
        assert_eq!(duration_ms("1.00s"), Some(1000.0));
    }

    #[test]
    fn reads_flat_json_and_kv() {
        let j = r#"{"by_method_kind": {"GET CLIENT": 7, "GET SERVER": 9}, "requests": 3, "spans": 16}"#;
        assert_eq!(json_u64(j, "\"GET SERVER\""), Some(9));
        assert_eq!(json_u64(j, "\"requests\""), Some(3));
        assert_eq!(
            kv("events_per_sec=123.5 spans_per_sec=9", "events_per_sec"),
            Some(123.5)
        );
    }

    /// The floor probes every hook of the agent's table and nothing else.
    #[test]
    fn floor_probes_exactly_the_agents_hooks() {
        let script = super::floor_script();
        let probes: Vec<&str> = script
            .lines()
            .filter_map(|l| l.trim_end_matches(',').strip_prefix("tracepoint:"))
            .collect();
        assert_eq!(probes.len(), agent_common::hooks::TRACEPOINTS.len());
        for t in agent_common::hooks::TRACEPOINTS {
            assert!(
                probes.contains(&format!("{}:{}", t.category, t.name).as_str()),
                "{}",
                t.name
            );
        }
        assert!(script.contains("@[probe] = count();") && script.contains("floor: attached"));
    }
}
