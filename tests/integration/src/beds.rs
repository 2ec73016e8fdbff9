//! Accuracy test beds for in-process parent links in concurrent runtimes.
//!
//! For each runtime ([`Runtime`]: Node.js, asyncio, Go, Java, a Python thread pool) a middle
//! service M receives `GET /work/<tok>` from a load generator and, for each request, calls a
//! backend three times: in parallel `GET /inventory/<t1>` and `GET /price/<t2>`, then
//! `POST /charge/<t3>`. The tokens are fresh random ones, so nothing in a call names the request
//! it serves: the agent can only link M's CLIENT spans to M's SERVER span from what it sees inside
//! M (threads, timing). M appends what it did to a truth file the agent never reads; the expected
//! span tree comes from that file and the load generator's report, never from the spans.
//! Fixture programs: `tests/fixtures/beds/`; the tests: `tests/beds.rs`.
//!
//! Per request the expected tree is loadgen CLIENT (root) ← M SERVER ← 3 × M CLIENT ← 3 × backend
//! SERVER, scored with [`topology::score`] in three classes: [`CLASS_IN`] (M CLIENT → M SERVER,
//! what the beds measure), [`CLASS_CROSS`] (the edges across a connection) and [`CLASS_ROOT`].

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    io::Write as _,
    path::PathBuf,
    process::Command,
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, ensure};
use serde_json::Value;

use crate::{
    harness::{self, TempDir, Tool, fixtures_dir, free_port},
    receiver::{CollectedSpan, Receiver},
    topology::{self, ClassScore, ExpectedSpan, LoadRequest, Proc, Scored, Verdict, dump, parse_requests, python},
};

pub const SVC_LOADGEN: &str = "bed-loadgen";
pub const SVC_BACKEND: &str = "bed-backend";

/// M's CLIENT span → M's SERVER span: the links the beds measure.
pub const CLASS_IN: &str = "in-process";
/// Backend SERVER → M CLIENT and M SERVER → loadgen CLIENT: linked through the connection.
pub const CLASS_CROSS: &str = "cross-process";
/// The load generator's CLIENT spans, which must have no parent.
pub const CLASS_ROOT: &str = topology::CLASS_ROOT;

/// How long spans may take to arrive, and how long to wait after they did (so duplicates show).
pub const SPAN_TIMEOUT: Duration = Duration::from_secs(20);
pub const SETTLE: Duration = Duration::from_millis(1000);
/// Wrong edges described per run and class (for the failure message), and missing or lost ones
/// (printed only: today they are the common case).
const SHOW_WRONG: usize = 4;
const SHOW_OTHER: usize = 2;

pub fn bed_fixture(name: &str) -> PathBuf {
    fixtures_dir().join("beds").join(name)
}

fn onoff(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

// ---------------------------------------------------------------------------------------------
// Runtimes and processes

/// The runtime M is written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Runtime {
    /// `node_bed.js`: `http` server, keep-alive `http.Agent`, `Promise.all`.
    Node,
    /// `node_bed.js` with a bounded client pool (`maxSockets: 4`): at concurrency 8 and more,
    /// requests wait in the pool for a connection and are written when another's response frees
    /// one.
    NodePool,
    /// `asyncio_bed.py`: aiohttp server, one shared `ClientSession`, `asyncio.gather`.
    Asyncio,
    /// `go_bed.go`: net/http server, shared `http.Client`, goroutines + `sync.WaitGroup`.
    Go,
    /// `JavaBed.java`: `HttpServer` on 8 threads, shared `HttpClient`, two `sendAsync` joined.
    Java,
    /// `pool_bed.py`: `ThreadingHTTPServer` handing each request to a `ThreadPoolExecutor` worker.
    Pool,
}

impl Runtime {
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Node => "node",
            Runtime::NodePool => "node-pool",
            Runtime::Asyncio => "asyncio",
            Runtime::Go => "go",
            Runtime::Java => "java",
            Runtime::Pool => "pool",
        }
    }

    /// M's `OTEL_SERVICE_NAME`.
    pub fn service(self) -> &'static str {
        match self {
            Runtime::Node => "bed-node",
            Runtime::NodePool => "bed-node-pool",
            Runtime::Asyncio => "bed-asyncio",
            Runtime::Go => "bed-go",
            Runtime::Java => "bed-java",
            Runtime::Pool => "bed-pool",
        }
    }

    /// The command that runs M with `args` (`PORT BACKEND_PORT on|off TRUTH_FILE`).
    fn command(self, args: &[String]) -> Result<Command> {
        let script = |name: &str| {
            let mut a = vec![bed_fixture(name).display().to_string()];
            a.extend_from_slice(args);
            a
        };
        let mut cmd = match self {
            Runtime::Asyncio => return Ok(python(&script("asyncio_bed.py"), self.service())),
            Runtime::Pool => return Ok(python(&script("pool_bed.py"), self.service())),
            Runtime::Node | Runtime::NodePool => {
                let mut c = Command::new(Tool::Node.program());
                c.arg(bed_fixture("node_bed.js"));
                if self == Runtime::NodePool {
                    c.env("BED_MAX_SOCKETS", "4");
                }
                c
            }
            Runtime::Go => Command::new(go_binary()?),
            Runtime::Java => {
                let mut c = Command::new(Tool::Java.program());
                // `Connection: close` is a restricted header of java.net.http
                c.arg("-Djdk.httpclient.allowRestrictedHeaders=connection")
                    .arg(bed_fixture("JavaBed.java"));
                c
            }
        };
        topology::clean_env(&mut cmd);
        cmd.args(args).env("OTEL_SERVICE_NAME", self.service());
        Ok(cmd)
    }
}

/// `go_bed.go`, built once per test process into `<target>/<profile>/beds/` (Go's build cache
/// there makes the next process's build quick).
fn go_binary() -> Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| build_go().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!("building go_bed: {e}"))
}

fn build_go() -> Result<PathBuf> {
    // the test executable is <target>/<profile>/deps/beds-<hash>
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("test executable directory")?
        .join("beds");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let bin = dir.join("go_bed");
    // another test process may be running the previous binary: build aside, then rename
    let tmp = dir.join(format!("go_bed.{}.tmp", std::process::id()));
    let mut cmd = Command::new(Tool::Go.program());
    cmd.arg("build")
        .arg("-o")
        .arg(&tmp)
        .arg(bed_fixture("go_bed.go"))
        .env("GOCACHE", dir.join("gocache"))
        .env("GOPATH", dir.join("gopath"))
        // one file, standard library only: no module
        .env("GO111MODULE", "off")
        .env("GOFLAGS", "")
        // the pure-Go resolver and no C compiler needed
        .env("CGO_ENABLED", "0");
    let (st, out, err) = harness::run(&mut cmd, Duration::from_secs(300))?;
    ensure!(st.success(), "go build failed ({st}):\n{err}\n{out}");
    std::fs::rename(&tmp, &bin)?;
    Ok(bin)
}

/// Sends M the load generator's requests, unscored: what a service served before the agent
/// started (its client pool opens then).
pub fn load(m: &Middle, cfg: &BedConfig) -> Result<Vec<LoadRequest>> {
    let args = [
        bed_fixture("loadgen.py").display().to_string(),
        m.proc.port.to_string(),
        cfg.count.to_string(),
        cfg.concurrency.to_string(),
        onoff(m.keepalive).into(),
    ];
    let out = topology::run_client(SVC_LOADGEN, &args, Duration::from_secs(120))?;
    parse_requests(&out)
}

/// `backend.py` on a free port, as [`SVC_BACKEND`].
pub fn start_backend() -> Result<Proc> {
    let port = free_port();
    let args = [bed_fixture("backend.py").display().to_string(), port.to_string()];
    Proc::spawn(SVC_BACKEND, python(&args, SVC_BACKEND), Some(port))
}

/// A running middle service and its truth file; both go away on drop.
pub struct Middle {
    pub runtime: Runtime,
    /// M's calls to the backend reuse pooled keep-alive connections.
    pub keepalive: bool,
    pub proc: Proc,
    truth: PathBuf,
    _dir: TempDir,
}

impl Middle {
    pub fn start(runtime: Runtime, backend_port: u16, keepalive: bool) -> Result<Self> {
        let dir = TempDir::new(&format!("bed-{}", runtime.name()))?;
        let truth = dir.path().join("truth.jsonl");
        let port = free_port();
        let args = [
            port.to_string(),
            backend_port.to_string(),
            onoff(keepalive).into(),
            truth.display().to_string(),
        ];
        let proc = Proc::spawn(runtime.service(), runtime.command(&args)?, Some(port))
            .with_context(|| format!("start the {} bed", runtime.name()))?;
        Ok(Self {
            runtime,
            keepalive,
            proc,
            truth,
            _dir: dir,
        })
    }

    /// Every line of the truth file so far.
    pub fn truth(&self) -> Result<Vec<TruthLine>> {
        let text = match std::fs::read_to_string(&self.truth) {
            Ok(t) => t,
            // nothing answered yet
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("read {}", self.truth.display())),
        };
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| TruthLine::parse(l).with_context(|| format!("truth line {l:?}")))
            .collect()
    }

    pub fn output_tail(&self) -> String {
        let lines = self.proc.lines();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

/// One line of M's ground truth: the request it answered and the calls it made for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TruthLine {
    /// `/work/<tok>`
    pub incoming: String,
    /// `/inventory/<t1>`, `/price/<t2>`, `/charge/<t3>`
    pub calls: Vec<String>,
}

impl TruthLine {
    fn parse(line: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(line)?;
        Ok(Self {
            incoming: v["in"].as_str().context("in")?.to_string(),
            calls: v["calls"]
                .as_array()
                .context("calls")?
                .iter()
                .map(|c| c.as_str().map(str::to_string).context("call"))
                .collect::<Result<_>>()?,
        })
    }
}

/// The calls M must make for one request, in order.
const CALLS: [(&str, &str); 3] = [("GET", "inventory"), ("GET", "price"), ("POST", "charge")];

fn token_of<'a>(path: &'a str, op: &str) -> Option<&'a str> {
    let tok = path.strip_prefix('/')?.strip_prefix(op)?.strip_prefix('/')?;
    (tok.len() == 20 && tok.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))).then_some(tok)
}

// ---------------------------------------------------------------------------------------------
// One run

/// One run: the load generator's concurrency and request count; keep-alive is [`Middle`]'s (the
/// load generator uses the same).
#[derive(Clone, Copy, Debug)]
pub struct BedConfig {
    pub concurrency: usize,
    pub count: usize,
}

/// The scores of one run.
#[derive(Clone, Debug)]
pub struct BedRow {
    pub runtime: Runtime,
    pub concurrency: usize,
    pub keepalive: bool,
    pub inproc: ClassScore,
    pub cross: ClassScore,
    pub root: ClassScore,
    /// In-process edges left without a parent whose child links to its true parent, and to
    /// another span (the agent's "likely, not certain" span links).
    pub links_right: usize,
    pub links_wrong: usize,
}

/// Everything one run measured.
pub struct BedRun {
    pub row: BedRow,
    /// The bed did not do what the plan says (requests not answered 200, truth missing or
    /// malformed): the scores do not mean what they should.
    pub problems: Vec<String>,
    /// The first few wrong edges of each class, described with their spans.
    pub wrong: Vec<String>,
    /// Other observations: missing and lost edges, unexpected or dangling spans.
    pub notes: Vec<String>,
    pub spans: usize,
    pub load_time: Duration,
}

impl BedRun {
    pub fn tag(&self) -> String {
        format!(
            "[{} c={} ka={}]",
            self.row.runtime.name(),
            self.row.concurrency,
            onoff(self.row.keepalive)
        )
    }
}

mod key {
    pub fn loadgen(incoming: &str) -> String {
        format!("{incoming} loadgen")
    }
    pub fn server(incoming: &str) -> String {
        format!("{incoming} server")
    }
    pub fn call(incoming: &str, i: usize) -> String {
        format!("{incoming} call{i}")
    }
    pub fn backend(incoming: &str, i: usize) -> String {
        format!("{incoming} backend{i}")
    }
}

/// The expected spans of the requests the load generator saw answered and M recorded.
fn expected_spans(service: &str, truth: &[&TruthLine]) -> Vec<ExpectedSpan> {
    let mut out = Vec::new();
    for t in truth {
        let inc = t.incoming.as_str();
        let mut push = |key: String, service: &str, kind: &'static str, path: &str, parent: Option<String>, class| {
            out.push(ExpectedSpan {
                key,
                service: service.to_string(),
                kind,
                path: path.to_string(),
                parent,
                class: String::from(class),
                group: inc.to_string(),
                optional: false,
                at_ns: None,
            });
        };
        push(key::loadgen(inc), SVC_LOADGEN, "CLIENT", inc, None, CLASS_ROOT);
        push(
            key::server(inc),
            service,
            "SERVER",
            inc,
            Some(key::loadgen(inc)),
            CLASS_CROSS,
        );
        for (i, call) in t.calls.iter().enumerate() {
            push(
                key::call(inc, i),
                service,
                "CLIENT",
                call,
                Some(key::server(inc)),
                CLASS_IN,
            );
            push(
                key::backend(inc, i),
                SVC_BACKEND,
                "SERVER",
                call,
                Some(key::call(inc, i)),
                CLASS_CROSS,
            );
        }
    }
    out
}

/// Check what the load generator and M report against the plan; returns the truth of every
/// request answered 200, and the problems found.
fn check_plan<'t>(
    m: &Middle,
    cfg: &BedConfig,
    load: &[LoadRequest],
    truth: &'t [TruthLine],
) -> (Vec<&'t TruthLine>, Vec<String>) {
    let mut problems = Vec::new();
    if load.len() != cfg.count {
        problems.push(format!("loadgen made {} requests, wanted {}", load.len(), cfg.count));
    }
    let failed: Vec<&LoadRequest> = load.iter().filter(|r| r.status != 200).collect();
    if !failed.is_empty() {
        problems.push(format!(
            "{} of {} requests not answered 200 (first 5: {:?}); M's output:\n{}",
            failed.len(),
            load.len(),
            failed
                .iter()
                .take(5)
                .map(|r| format!("{} {} {}", r.path, r.status, r.error.as_deref().unwrap_or("")))
                .collect::<Vec<_>>(),
            m.output_tail()
        ));
    }
    let by_in: HashMap<&str, Vec<&TruthLine>> = truth.iter().fold(HashMap::new(), |mut acc, t| {
        acc.entry(t.incoming.as_str()).or_default().push(t);
        acc
    });
    let mut tokens = HashSet::new();
    let mut found = Vec::new();
    let mut bad = Vec::new();
    for r in load.iter().filter(|r| r.status == 200) {
        let lines = by_in.get(r.path.as_str()).map(Vec::as_slice).unwrap_or_default();
        let [t] = lines else {
            bad.push(format!("{}: {} truth lines", r.path, lines.len()));
            continue;
        };
        let in_tok = token_of(&t.incoming, "work");
        // the calls are the planned ones, with fresh tokens: never the request's, never reused
        let call_toks: Vec<Option<&str>> = CALLS
            .iter()
            .enumerate()
            .map(|(i, (_, op))| t.calls.get(i).and_then(|c| token_of(c, op)))
            .collect();
        let fresh = in_tok.is_some()
            && t.calls.len() == CALLS.len()
            && call_toks
                .iter()
                .all(|c| c.is_some_and(|c| Some(c) != in_tok && tokens.insert(c)));
        if fresh {
            found.push(*t);
        } else {
            bad.push(format!("{}: calls {:?} are not 3 fresh tokens", r.path, t.calls));
        }
    }
    if !bad.is_empty() {
        problems.push(format!(
            "{} answered requests without a proper truth line (first 5): {:?}",
            bad.len(),
            &bad[..bad.len().min(5)]
        ));
    }
    (found, problems)
}

/// Run the load generator against `m`, then collect and score the spans.
pub fn run_config(rx: &Receiver, m: &Middle, cfg: &BedConfig) -> Result<BedRun> {
    let t0 = Instant::now();
    let load = load(m, cfg)?;
    let load_time = t0.elapsed();
    let truth = m.truth()?;
    let (truth, problems) = check_plan(m, cfg, &load, &truth);

    let expected = expected_spans(m.runtime.service(), &truth);
    let paths: HashSet<&str> = expected.iter().map(|e| e.path.as_str()).collect();
    let mine = |s: &CollectedSpan| s.url_path().is_some_and(|p| paths.contains(p));
    // a timeout is not an error here: what did not arrive is scored as lost
    let _ = rx.wait_for(SPAN_TIMEOUT, |spans| {
        spans.iter().filter(|s| mine(s)).count() >= expected.len()
    });
    std::thread::sleep(SETTLE);
    let spans = rx.matching(mine);
    let exported: HashSet<String> = rx.with_spans(|all| all.iter().map(|s| s.span_id.clone()).collect());
    let sc = topology::score(&expected, &spans, &exported);

    let (links_right, links_wrong) = score_links(&sc);
    let row = BedRow {
        runtime: m.runtime,
        concurrency: cfg.concurrency,
        keepalive: m.keepalive,
        inproc: sc.class(CLASS_IN),
        cross: sc.class(CLASS_CROSS),
        root: sc.class(CLASS_ROOT),
        links_right,
        links_wrong,
    };
    let mut run = BedRun {
        row,
        problems,
        wrong: Vec::new(),
        notes: Vec::new(),
        spans: spans.len(),
        load_time,
    };
    let tag = run.tag();
    for class in [CLASS_IN, CLASS_CROSS, CLASS_ROOT] {
        for v in [Verdict::Wrong, Verdict::Missing, Verdict::Lost] {
            let edges: Vec<&topology::score::Edge> = sc.edges_with(v).filter(|e| e.class == class).collect();
            if edges.is_empty() {
                continue;
            }
            let show = if v == Verdict::Wrong { SHOW_WRONG } else { SHOW_OTHER };
            let text = format!(
                "{tag} {class}: {} {v:?} edges (first {show}):\n{}",
                edges.len(),
                edges
                    .iter()
                    .take(show)
                    .map(|e| describe_edge(rx, &sc, e))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            if v == Verdict::Wrong {
                run.wrong.push(text);
            } else {
                run.notes.push(text);
            }
        }
    }
    for (what, list) in [
        ("spans matched no expected span", &sc.unexpected),
        ("spans have a parent that was never exported", &sc.dangling),
        (
            "spans have sockspan.parent.source set without a parent or the reverse",
            &sc.source_mismatch,
        ),
    ] {
        if !list.is_empty() {
            run.notes.push(format!(
                "{tag} {} {what} (first {SHOW_WRONG}):\n{}",
                list.len(),
                list.iter()
                    .take(SHOW_WRONG)
                    .map(|s| format!("  {}", dump(s)))
                    .collect::<Vec<_>>()
                    .join("\n")
            ));
        }
    }
    Ok(run)
}

/// An edge with its child, the parent it should have and the parent it has.
fn describe_edge(rx: &Receiver, sc: &Scored<'_>, e: &topology::score::Edge) -> String {
    let child = sc.assigned.get(&e.child).copied();
    let want = e.parent.as_ref().and_then(|p| sc.assigned.get(p).copied());
    let actual = match child.and_then(|c| c.parent_span_id.as_deref()) {
        None => "<no parent>".to_string(),
        Some(id) => rx.with_spans(|all| {
            all.iter()
                .find(|s| s.span_id == id)
                .map_or_else(|| format!("<span {id} not exported>"), dump)
        }),
    };
    format!(
        "  edge {} -> {}\n    child:    {}\n    expected: {}\n    actual:   {actual}",
        e.child,
        e.parent.as_deref().unwrap_or("<root>"),
        child.map_or_else(|| "<not exported>".to_string(), dump),
        match (&e.parent, want) {
            (None, _) => "<no parent>".to_string(),
            (Some(_), None) => "<not exported>".to_string(),
            (Some(_), Some(p)) => dump(p),
        },
    )
}

// ---------------------------------------------------------------------------------------------
// Scoreboard

/// The scoreboard: one row per runtime × concurrency × keep-alive; in-process edges in the main
/// columns, the cross-process class at the end.
/// Span links on in-process edges left without a parent: (to the true parent, to another span).
fn score_links(sc: &Scored<'_>) -> (usize, usize) {
    let (mut right, mut wrong) = (0, 0);
    for e in sc.edges_with(Verdict::Missing).filter(|e| e.class == CLASS_IN) {
        let Some(child) = sc.assigned.get(&e.child) else {
            continue;
        };
        if child.links.is_empty() {
            continue;
        }
        let want = e.parent.as_ref().and_then(|p| sc.assigned.get(p)).map(|p| &p.span_id);
        if child.links.iter().any(|(_, span, _)| Some(span) == want) {
            right += 1;
        } else {
            wrong += 1;
        }
    }
    (right, wrong)
}

pub fn format_scoreboard(rows: &[BedRow]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| runtime   | conc | keep-alive | edges | precision | recall  | wrong | missing | lost | links right | links wrong | cross edges | cross precision | cross recall |"
    );
    let _ = writeln!(
        s,
        "|-----------|-----:|------------|------:|----------:|--------:|------:|--------:|-----:|------------:|------------:|------------:|----------------:|-------------:|"
    );
    let mut rows: Vec<&BedRow> = rows.iter().collect();
    rows.sort_by_key(|r| (r.runtime, r.concurrency, !r.keepalive));
    for r in rows {
        let (i, x) = (&r.inproc, &r.cross);
        let _ = writeln!(
            s,
            "| {:<9} | {:>4} | {:<10} | {:>5} | {:>8.2}% | {:>6.2}% | {:>5} | {:>7} | {:>4} | {:>11} | {:>11} | {:>11} | {:>14.2}% | {:>11.2}% |",
            r.runtime.name(),
            r.concurrency,
            onoff(r.keepalive),
            i.expected,
            100.0 * i.precision(),
            100.0 * i.recall(),
            i.wrong,
            i.missing,
            i.lost,
            r.links_right,
            r.links_wrong,
            x.expected,
            100.0 * x.precision(),
            100.0 * x.recall(),
        );
    }
    s
}

/// Append `table` to the file named by `SOCKSPAN_SCOREBOARD`, if set.
pub fn append_scoreboard(table: &str) -> Result<()> {
    let Some(path) = std::env::var_os("SOCKSPAN_SCOREBOARD").filter(|p| !p.is_empty()) else {
        return Ok(());
    };
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("open SOCKSPAN_SCOREBOARD={}", path.to_string_lossy()))?;
    writeln!(f, "{table}")?;
    Ok(())
}
