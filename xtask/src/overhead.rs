//! `cargo xtask bench overhead`: what tracing costs each service, side by side in one run.
//! Every service (nginx, a Node.js `http` server, a Python service, a two-hop Node.js chain) is
//! measured with no agent, under the floor (count-only probes on the agent's tracepoints),
//! with sockspan exporting OTLP, with sockspan printing, and with the OpenTelemetry zero-code
//! agent of its language: maximum req/s (wrk) and latency at fixed rates (`loadgen`), with the
//! agent's CPU per request, its peak RSS, events lost and spans delivered per request. One
//! table of ratios against "no agent" goes to docs/benchmarks.md.
use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::{
    // the server's core and the load's, as in `cargo xtask bench`
    bench::{self, Agent, CLIENT_CPU, Output, SERVER_CPU, Wrk},
    loadgen::{self, Latency},
    report::RunFacts,
    setup,
    util::{self, Guard, TempDir},
};

pub struct Opts {
    /// Seconds of the wrk run (maximum req/s).
    pub duration: u64,
    /// Seconds per fixed rate.
    pub rate_secs: u64,
    /// Fixed rates, req/s.
    pub rates: Vec<u32>,
    /// Services to measure (names of `SERVICES`).
    pub services: Vec<String>,
    pub no_write: bool,
    pub command: String,
}

const WRK_CONNECTIONS: u32 = 32;
const RATE_CONNECTIONS: u32 = 16;

/// The OpenTelemetry zero-code agents compared with, pinned.
const NODE_PACKAGES: &[&str] = &[
    "@opentelemetry/auto-instrumentations-node@0.67.0",
    "@opentelemetry/api@1.9.0",
];
/// Every Python package of the service and its OpenTelemetry agent, pinned (pip freeze).
const PYTHON_REQUIREMENTS: &str = include_str!("../../scripts/bench/python-requirements.txt");

/// A service under test: how to start it, plain or under its language's OpenTelemetry agent.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Nginx,
    Node,
    Python,
    /// Node.js front → Node.js back, one keep-alive call per request.
    Chain,
}

struct Service {
    name: &'static str,
    kind: Kind,
    /// Server spans per request (one per hop).
    hops: u64,
    /// The OpenTelemetry agent compared with, if any.
    peer: Option<&'static str>,
}

const SERVICES: &[Service] = &[
    Service {
        name: "nginx",
        kind: Kind::Nginx,
        hops: 1,
        peer: None,
    },
    Service {
        name: "node",
        kind: Kind::Node,
        hops: 1,
        peer: Some("otel-node"),
    },
    Service {
        name: "python",
        kind: Kind::Python,
        hops: 1,
        peer: Some("otel-python"),
    },
    Service {
        name: "chain",
        kind: Kind::Chain,
        hops: 2,
        peer: Some("otel-node"),
    },
];

pub fn names() -> Vec<&'static str> {
    SERVICES.iter().map(|s| s.name).collect()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Off,
    Floor,
    Otlp,
    Print,
    Peer,
}

impl Mode {
    fn label(self, svc: &Service) -> &'static str {
        match self {
            Mode::Off => "no agent",
            Mode::Floor => "floor (count-only)",
            Mode::Otlp => "sockspan → OTLP",
            Mode::Print => "sockspan → print",
            Mode::Peer => svc.peer.unwrap_or("peer"),
        }
    }
}

/// What the load measured in one configuration.
#[derive(Debug, Default)]
struct Figures {
    /// Requests of the warm-up (before any agent started; under a peer, traced too).
    warm_up: u64,
    max: Wrk,
    rates: Vec<Latency>,
}

impl Figures {
    /// Requests answered in the measured runs.
    fn requests(&self) -> u64 {
        self.max.requests + self.rates.iter().map(|l| l.requests).sum::<u64>()
    }
}

/// One row of the table.
struct Row {
    service: &'static str,
    mode: &'static str,
    figures: Figures,
    /// Agent kernel programs' µs per request, process µs per request.
    kernel_us: Option<f64>,
    user_us: Option<f64>,
    rss_mib: Option<f64>,
    /// Kernel events lost + events dropped before the pipeline.
    lost: Option<u64>,
    /// Server spans delivered ÷ (requests × hops).
    spans_per_request: Option<f64>,
}

pub fn overhead(opts: &Opts) -> Result<()> {
    util::require_root("bench overhead")?;
    setup::setup(setup::BENCH)?;
    let bin = bench::agent_binary()?;
    let services: Vec<&Service> = SERVICES
        .iter()
        .filter(|s| opts.services.iter().any(|n| n == s.name))
        .collect();
    let peers = Peers::prepare(&services)?;
    let tmp = TempDir::new("sockspan-overhead")?;
    let facts = RunFacts::collect();
    let mut rows = Vec::new();
    for svc in &services {
        let modes = [Mode::Off, Mode::Floor, Mode::Otlp, Mode::Print]
            .into_iter()
            .chain(svc.peer.map(|_| Mode::Peer));
        for mode in modes {
            let dir = tmp.0.join(format!("{}-{mode:?}", svc.name));
            fs::create_dir_all(&dir)?;
            println!("overhead: {}: {}", svc.name, mode.label(svc));
            let row = measure(&bin, &peers, svc, mode, opts, &dir)
                .with_context(|| format!("{}, {}", svc.name, mode.label(svc)))?;
            print_row(&row);
            rows.push(row);
        }
    }
    let text = render(&rows, opts, &facts);
    println!("\n{text}");
    if !opts.no_write {
        write(&util::root().join("docs/benchmarks.md"), &text)?;
        println!("overhead: written to docs/benchmarks.md");
    }
    Ok(())
}

/// One configuration: a fresh service, a warm-up, then the load under `mode`.
fn measure(bin: &Path, peers: &Peers, svc: &Service, mode: Mode, opts: &Opts, dir: &Path) -> Result<Row> {
    let port = util::free_port(18190)?;
    // The peer exports to its own sink, counted after the run.
    let sink = if mode == Mode::Peer {
        Some(bench::start_sink(dir)?)
    } else {
        None
    };
    let otel = sink.as_ref().map(|(_, _, p)| format!("http://127.0.0.1:{p}"));
    let server = peers.start(svc.kind, dir, port, otel.as_deref())?;
    let url = format!("http://127.0.0.1:{port}/");
    let warm_up = wrk(&url, 2)?.requests;
    let load = || -> Result<Figures> {
        let max = wrk(&url, opts.duration)?;
        let mut rates = Vec::new();
        for &rate in &opts.rates {
            rates.push(loadgen::run(
                port,
                "/",
                rate,
                opts.rate_secs,
                RATE_CONNECTIONS,
                CLIENT_CPU,
            )?);
        }
        Ok(Figures { warm_up, max, rates })
    };
    let mut row = Row {
        service: svc.name,
        mode: mode.label(svc),
        figures: Figures::default(),
        kernel_us: None,
        user_us: None,
        rss_mib: None,
        lost: None,
        spans_per_request: None,
    };
    let expected = |f: &Figures| (f.requests() * svc.hops) as f64;
    match mode {
        Mode::Off => row.figures = load()?,
        Mode::Floor => row.figures = bench::run_floor(dir, load)?.load,
        Mode::Otlp | Mode::Print => {
            let output = if mode == Mode::Otlp {
                Output::Otlp
            } else {
                Output::Print
            };
            let a: Agent<Figures> = bench::run_agent(bin, dir, output, load)?;
            let requests = a.load.requests().max(1) as f64;
            row.kernel_us = Some(a.cpu.kernel_ns as f64 / 1e3 / requests);
            row.user_us = Some(a.cpu.process_ns as f64 / 1e3 / requests);
            row.rss_mib = Some(a.vm_hwm_kb as f64 / 1024.0);
            row.lost = Some(lost(&a.metrics));
            row.spans_per_request = Some(a.get_server as f64 / expected(&a.load).max(1.0));
            row.figures = a.load;
        }
        Mode::Peer => {
            row.figures = load()?;
            // The SDK exports in batches: give its last one time to leave.
            std::thread::sleep(Duration::from_secs(6));
            stop(server);
            let (sink_dir, mut sink_guard, _) = sink.expect("started for the peer");
            sink_guard.stop("TERM", Duration::from_secs(5));
            let counted = bench::sink_count(&sink_dir)?;
            let server_spans = bench::json_u64(&counted, "\"GET SERVER\"").unwrap_or(0);
            let traced = ((row.figures.requests() + row.figures.warm_up) * svc.hops) as f64;
            row.spans_per_request = Some(server_spans as f64 / traced.max(1.0));
            return Ok(row);
        }
    }
    stop(server);
    Ok(row)
}

/// Stops a service's processes, the last started first (a chain's front before its back, so
/// that no request in flight fails).
fn stop(mut guards: Vec<Guard>) {
    while let Some(mut g) = guards.pop() {
        g.stop("TERM", Duration::from_secs(10));
    }
}

/// The sum of the agent's loss counters: events the kernel could not deliver and events read
/// but dropped before the pipeline.
fn lost(metrics: &[String]) -> u64 {
    metrics
        .iter()
        .filter(|l| {
            l.starts_with("sockspan_kernel_events_lost_total{") || l.starts_with("sockspan_events_dropped_total{")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn wrk(url: &str, secs: u64) -> Result<Wrk> {
    bench::run_wrk(&bench::wrk_args(url, WRK_CONNECTIONS, secs), secs)
}

/// Where the services' programs and the OpenTelemetry agents live (installed once, pinned,
/// under target/bench-peers).
struct Peers {
    node_dir: PathBuf,
    venv: PathBuf,
}

const HELLO_JS: &str = r#"// hello.js PORT [BACKEND_URL]: answers GET / (after one keep-alive call to BACKEND_URL, if given).
const http = require('http');
const [port, backend] = [+process.argv[2], process.argv[3]];
const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });
http.createServer((req, res) => {
  if (!backend) { res.writeHead(200, { 'Content-Type': 'text/plain' }); res.end('hello world\n'); return; }
  http.get(backend, { agent }, (r) => {
    let n = 0;
    r.on('data', (c) => { n += c.length; });
    r.on('end', () => { res.writeHead(200, { 'Content-Type': 'text/plain' }); res.end(`front ${n}\n`); });
  }).on('error', () => { res.writeHead(502); res.end(); });
}).listen(port, '127.0.0.1', () => console.log('listening'));
"#;

const APP_PY: &str = include_str!("../../scripts/bench/hello.py");

impl Peers {
    fn prepare(services: &[&Service]) -> Result<Self> {
        let base = util::target_dir().join("bench-peers");
        let peers = Self {
            node_dir: base.join("node"),
            venv: base.join("python"),
        };
        let wants = |k: Kind| services.iter().any(|s| s.kind == k);
        if wants(Kind::Node) || wants(Kind::Chain) {
            fs::create_dir_all(&peers.node_dir)?;
            let stamp = peers.node_dir.join("installed.txt");
            if fs::read_to_string(&stamp).ok().as_deref() != Some(&NODE_PACKAGES.join("\n")) {
                println!("overhead: npm install {}", NODE_PACKAGES.join(" "));
                let mut cmd = Command::new("npm");
                cmd.current_dir(&peers.node_dir)
                    .args(["install", "--no-audit", "--no-fund", "--no-save"])
                    .args(NODE_PACKAGES);
                util::run("npm install", &mut cmd)?;
                fs::write(&stamp, NODE_PACKAGES.join("\n"))?;
            }
            fs::write(peers.node_dir.join("hello.js"), HELLO_JS)?;
        }
        if wants(Kind::Python) {
            let stamp = peers.venv.join("installed.txt");
            if fs::read_to_string(&stamp).ok().as_deref() != Some(PYTHON_REQUIREMENTS) {
                println!("overhead: pip install -r scripts/bench/python-requirements.txt (in a venv)");
                util::run(
                    "python3 -m venv",
                    Command::new("python3").args(["-m", "venv"]).arg(&peers.venv),
                )?;
                util::run(
                    "pip install",
                    Command::new(peers.venv.join("bin/pip"))
                        .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
                        .arg(util::root().join("scripts/bench/python-requirements.txt")),
                )?;
                fs::write(&stamp, PYTHON_REQUIREMENTS)?;
            }
            fs::write(peers.venv.join("hello.py"), APP_PY)?;
        }
        Ok(peers)
    }

    /// Starts `kind` on 127.0.0.1:`port` (pinned to the server core), under its OpenTelemetry
    /// agent exporting to `otel` if given; returns once it answers.
    fn start(&self, kind: Kind, dir: &Path, port: u16, otel: Option<&str>) -> Result<Vec<Guard>> {
        let mut guards = Vec::new();
        match kind {
            Kind::Nginx => guards.push(bench::start_nginx(dir, port)?),
            Kind::Node => guards.push(self.node(port, None, otel, "hello")?),
            Kind::Chain => {
                let back = util::free_port(port + 1)?;
                guards.push(self.node(back, None, otel, "back")?);
                let url = format!("http://127.0.0.1:{back}/");
                guards.push(self.node(port, Some(&url), otel, "front")?);
            }
            Kind::Python => {
                let mut cmd = match otel {
                    Some(_) => {
                        let mut c = Command::new(self.venv.join("bin/opentelemetry-instrument"));
                        c.arg(self.venv.join("bin/python"));
                        c
                    }
                    None => Command::new(self.venv.join("bin/python")),
                };
                cmd.arg(self.venv.join("hello.py")).arg(port.to_string());
                guards.push(spawn_server("python", cmd, port, otel, "hello")?);
            }
        }
        Ok(guards)
    }

    fn node(&self, port: u16, backend: Option<&str>, otel: Option<&str>, name: &str) -> Result<Guard> {
        let mut cmd = Command::new("node");
        cmd.current_dir(&self.node_dir);
        if otel.is_some() {
            cmd.args(["--require", "@opentelemetry/auto-instrumentations-node/register"]);
            cmd.env("OTEL_NODE_RESOURCE_DETECTORS", "none");
        }
        cmd.arg("hello.js").arg(port.to_string()).args(backend);
        spawn_server("node", cmd, port, otel, name)
    }
}

/// Runs `cmd` pinned to the server core (with the OpenTelemetry variables when `otel` names a
/// collector) and waits until it answers GET / on `port`.
fn spawn_server(what: &str, cmd: Command, port: u16, otel: Option<&str>, service: &str) -> Result<Guard> {
    let mut pinned = Command::new("taskset");
    pinned
        .args(["-c", &SERVER_CPU.to_string()])
        .arg(cmd.get_program())
        .args(cmd.get_args());
    if let Some(dir) = cmd.get_current_dir() {
        pinned.current_dir(dir);
    }
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            pinned.env(k, v);
        }
    }
    if let Some(endpoint) = otel {
        pinned
            .env("OTEL_SERVICE_NAME", service)
            .env("OTEL_TRACES_EXPORTER", "otlp")
            .env("OTEL_METRICS_EXPORTER", "none")
            .env("OTEL_LOGS_EXPORTER", "none")
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint);
    }
    let child = pinned
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("start {what}"))?;
    let mut g = Guard::new(what, child);
    let up = util::poll_until(Duration::from_secs(30), || {
        util::http_get(port, "/", Duration::from_secs(1)).is_ok_and(|(c, _)| c == 200)
    });
    if !up {
        bail!(
            "{what} did not answer on 127.0.0.1:{port} within 30 s (alive: {})",
            g.alive()
        );
    }
    Ok(g)
}

fn print_row(r: &Row) {
    let rates: Vec<String> = r
        .figures
        .rates
        .iter()
        .map(|l| {
            format!(
                "{}/s ({:.0}/s, {} errors, {} unsent): p50 {:.0} µs p99 {:.0} µs p99.9 {:.0} µs",
                l.rate, l.achieved, l.errors, l.unsent, l.p50_us, l.p99_us, l.p999_us
            )
        })
        .collect();
    println!(
        "overhead: {} {}: {:.0} req/s; {}",
        r.service,
        r.mode,
        r.figures.max.rps,
        rates.join("; ")
    );
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "—".to_owned(), |v| format!("{v:.digits$}"))
}

/// The table: per service, each configuration against "no agent".
fn render(rows: &[Row], opts: &Opts, facts: &RunFacts) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Run on {} UTC, commit {}, {} CPUs, kernel {}: `{}`. Server on core {SERVER_CPU}, load on core {CLIENT_CPU}; \
         maximum req/s from `wrk -t1 -c{WRK_CONNECTIONS} -d{}s`, latency from {} s at each fixed rate over \
         {RATE_CONNECTIONS} keep-alive connections, measured from when each request was due. \
         \"p99 +\" is the added p99 against no agent at that rate; \"(n/s)\" marks a rate the \
         configuration could not sustain (what it reached). CPU and RSS are the agent's own; \
         spans/req counts server spans delivered per request and hop.\n",
        facts.date, facts.commit, facts.nproc, facts.kernel, opts.command, opts.duration, opts.rate_secs
    );
    let mut head = "| service | configuration | max req/s | × no agent |".to_owned();
    let mut rule = "|---|---|---|---|".to_owned();
    for rate in &opts.rates {
        let _ = write!(head, " p50 / p99 @{rate}/s | p99 + @{rate}/s |");
        rule.push_str("---|---|");
    }
    head.push_str(" kernel µs/req | user µs/req | RSS MiB | events lost | spans/req |");
    rule.push_str("---|---|---|---|---|");
    let _ = writeln!(s, "{head}\n{rule}");
    for r in rows {
        let off = rows.iter().find(|o| o.service == r.service && o.mode == "no agent");
        let ratio = off.map(|o| r.figures.max.rps / o.figures.max.rps.max(1.0));
        let _ = write!(
            s,
            "| {} | {} | {:.0} | {} |",
            r.service,
            r.mode,
            r.figures.max.rps,
            opt(ratio, 2)
        );
        for (i, l) in r.figures.rates.iter().enumerate() {
            let sustained = if l.sustained() {
                String::new()
            } else {
                format!(" ({:.0}/s)", l.achieved)
            };
            let added = off
                .and_then(|o| o.figures.rates.get(i))
                .filter(|o| o.sustained() && l.sustained())
                .map(|o| l.p99_us - o.p99_us);
            let _ = write!(
                s,
                " {:.0} / {:.0} µs{sustained} | {} |",
                l.p50_us,
                l.p99_us,
                added.map_or_else(|| "—".to_owned(), |a| format!("{a:+.0} µs"))
            );
        }
        let _ = writeln!(
            s,
            " {} | {} | {} | {} | {} |",
            opt(r.kernel_us, 2),
            opt(r.user_us, 2),
            opt(r.rss_mib, 1),
            r.lost.map_or_else(|| "—".to_owned(), |l| l.to_string()),
            opt(r.spans_per_request, 3)
        );
    }
    s
}

const START: &str = "<!-- bench:overhead:start -->";
const END: &str = "<!-- bench:overhead:end -->";

/// Replaces the overhead block of docs/benchmarks.md (added at the end if missing).
fn write(path: &Path, text: &str) -> Result<()> {
    let mut doc = fs::read_to_string(path).unwrap_or_default();
    let block = format!("{START}\n{text}{END}");
    match (doc.find(START), doc.find(END)) {
        (Some(a), Some(b)) if a < b => doc.replace_range(a..b + END.len(), &block),
        _ => {
            let _ = write!(
                doc,
                "\n## Overhead side by side (`cargo xtask bench overhead`)\n\n{block}\n"
            );
        }
    }
    fs::write(path, doc).with_context(|| format!("write {}", path.display()))
}
