//! The trace-accuracy topology: a load generator → nginx → orders (Python) → inventory (Node.js)
//! → pricing (Python), and orders → payments (Python, slow first attempts and a failing
//! endpoint). No service carries tracing code; the services print what they did (the ground
//! truth), [`expected_spans`] turns that into the expected span tree and [`score::score`] judges
//! the agent's parents against it. Fixture programs: `tests/fixtures/topology/`.

pub mod score;

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use serde_json::Value;

use crate::{
    harness::{ProcessGuard, TempDir, Tool, fixtures_dir, free_port, nginx_command, nginx_config, wait_for_port},
    receiver::CollectedSpan,
};
pub use score::{ClassScore, ExpectedSpan, Row, Scored, Verdict, format_table, score};

pub const SVC_LOADGEN: &str = "topo-loadgen";
/// nginx rewrites its environment block for its process title (setproctitle), so the agent cannot
/// read an `OTEL_SERVICE_NAME` from a worker's /proc/PID/environ: it is named after its executable.
pub const SVC_GATEWAY: &str = "nginx";
pub const SVC_ORDERS: &str = "topo-orders";
pub const SVC_INVENTORY: &str = "topo-inventory";
pub const SVC_PRICING: &str = "topo-pricing";
pub const SVC_PAYMENTS: &str = "topo-payments";
pub const SVC_TP_CLIENT: &str = "topo-tp-client";
pub const SVC_TP_FRONT: &str = "topo-tp-front";
pub const SVC_TP_BACK: &str = "topo-tp-back";

/// Edge classes.
pub const CLASS_ROOT: &str = "root";
pub const CLASS_THREADED: &str = "threaded+nginx";
pub const CLASS_NODE: &str = "node-middle";

/// orders' client timeout for payments and payments' sleep on slow first attempts (seconds).
pub const PAYMENT_TIMEOUT: f64 = 0.3;
pub const PAYMENT_SLOW: f64 = 0.6;

pub fn topology_fixture(name: &str) -> PathBuf {
    fixtures_dir().join("topology").join(name)
}

/// A run token: lowercase letters only, so it is never mistaken for an identifier (≥ 8 chars
/// with a digit) -- it is shared by every request of a run.
pub fn run_token() -> String {
    let mut x = crate::harness::now_ns() ^ (u64::from(std::process::id()) << 32);
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    x ^= N
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..10)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (b'a' + (x % 26) as u8) as char
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A process (group) with its stdout+stderr lines, killed on drop.
pub struct Proc {
    pub guard: ProcessGuard,
    pub port: u16,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Spawn `cmd` (stdout and stderr collected); when `port` is given, wait until it accepts.
    pub fn spawn(name: &str, mut cmd: Command, port: Option<u16>) -> Result<Self> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut guard = ProcessGuard::spawn(name, &mut cmd)?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = guard.child().stdout.take().context("stdout")?;
        let err = guard.child().stderr.take().context("stderr")?;
        for r in [Box::new(out) as Box<dyn std::io::Read + Send>, Box::new(err)] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(r).lines() {
                    let Ok(l) = l else { break };
                    lines.lock().unwrap_or_else(|e| e.into_inner()).push(l);
                }
            });
        }
        let mut p = Self {
            guard,
            port: port.unwrap_or(0),
            lines,
        };
        if let Some(port) = port {
            let res = {
                let g = &mut p.guard;
                wait_for_port(port, Duration::from_secs(20), || g.check_alive())
            };
            res.with_context(|| format!("{name} on port {port}; output:\n{}", p.lines().join("\n")))?;
        }
        Ok(p)
    }
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    /// Output lines that are JSON objects.
    pub fn json_lines(&self) -> Vec<Value> {
        self.lines()
            .iter()
            .filter(|l| l.starts_with('{'))
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
    /// Wait for the process to exit (up to `timeout`), then give the readers a moment.
    pub fn wait(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let st = self
            .guard
            .wait_timeout(timeout)?
            .ok_or_else(|| anyhow!("{} did not finish within {timeout:?}", self.guard.name))?;
        std::thread::sleep(Duration::from_millis(50));
        Ok(st)
    }
}

/// Removes the test's own `OTEL_*` and `SOCKSPAN_*` variables from a service's environment.
pub fn clean_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os().filter(|(k, _)| {
        let k = k.to_string_lossy();
        k.starts_with("OTEL_") || k.starts_with("SOCKSPAN_")
    }) {
        cmd.env_remove(k);
    }
}

/// `python3 -u ARGS` with a clean OTEL_* environment and `OTEL_SERVICE_NAME=service`.
pub fn python(role_args: &[String], service: &str) -> Command {
    let mut cmd = Command::new(Tool::Python.program());
    clean_env(&mut cmd);
    cmd.arg("-u").args(role_args).env("OTEL_SERVICE_NAME", service);
    cmd
}

/// `services.py ROLE PORT EXTRA...` on a free port, as `service_name`.
pub fn service(role: &str, service_name: &str, extra: &[String]) -> Result<Proc> {
    let port = free_port();
    let mut args = vec![
        topology_fixture("services.py").display().to_string(),
        role.to_string(),
        port.to_string(),
    ];
    args.extend(extra.iter().cloned());
    Proc::spawn(service_name, python(&args, service_name), Some(port))
}

/// The running checkout topology. Dropping it kills every process.
pub struct Topology {
    pub pricing: Proc,
    pub payments: Proc,
    pub inventory: Proc,
    pub orders: Proc,
    pub nginx: Proc,
    /// nginx port proxying to orders with upstream keep-alive (HTTP/1.1, pooled connections).
    pub gateway_keepalive: u16,
    /// nginx port proxying to orders without upstream keep-alive (HTTP/1.0, a connection per request).
    pub gateway_close: u16,
    _dir: TempDir,
}

impl Topology {
    pub fn start() -> Result<Self> {
        let pricing = service("pricing", SVC_PRICING, &[])?;
        let payments = service("payments", SVC_PAYMENTS, &["--slow".into(), PAYMENT_SLOW.to_string()])?;
        let inv_port = free_port();
        let mut node = Command::new(Tool::Node.program());
        clean_env(&mut node);
        node.arg(topology_fixture("inventory.js"))
            .arg(inv_port.to_string())
            .arg(pricing.port.to_string())
            .env("OTEL_SERVICE_NAME", SVC_INVENTORY);
        let inventory = Proc::spawn(SVC_INVENTORY, node, Some(inv_port))?;
        let orders = service(
            "orders",
            SVC_ORDERS,
            &[
                "--inventory".into(),
                inventory.port.to_string(),
                "--payments".into(),
                payments.port.to_string(),
                "--timeout".into(),
                PAYMENT_TIMEOUT.to_string(),
                "--retries".into(),
                "2".into(),
            ],
        )?;
        let dir = TempDir::new("topo-nginx")?;
        let (ka, close) = (free_port(), free_port());
        let http = format!(
            r#"    keepalive_requests 100000;
    upstream orders_keepalive {{ server 127.0.0.1:{orders}; keepalive 16; }}
    upstream orders_close {{ server 127.0.0.1:{orders}; }}
    server {{
        listen 127.0.0.1:{ka} backlog=1024;
        location / {{
            proxy_pass http://orders_keepalive;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_read_timeout 30s;
            proxy_next_upstream off;
        }}
    }}
    server {{
        listen 127.0.0.1:{close} backlog=1024;
        location / {{
            proxy_pass http://orders_close;
            proxy_read_timeout 30s;
            proxy_next_upstream off;
        }}
    }}
"#,
            orders = orders.port
        );
        let conf = nginx_config(dir.path(), "", 2, 2048, &http)?;
        let mut cmd = nginx_command(dir.path(), &conf);
        clean_env(&mut cmd);
        let nginx = Proc::spawn(SVC_GATEWAY, cmd, Some(ka))?;
        wait_for_port(close, Duration::from_secs(10), || Ok(()))?;
        Ok(Self {
            pricing,
            payments,
            inventory,
            orders,
            nginx,
            gateway_keepalive: ka,
            gateway_close: close,
            _dir: dir,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Load and ground truth

/// One run of the load generator.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub run: String,
    pub count: usize,
    pub concurrency: usize,
    /// Load generator keeps its connections to nginx alive.
    pub client_keepalive: bool,
    /// nginx keeps its upstream connections to orders alive.
    pub upstream_keepalive: bool,
}

impl RunConfig {
    pub fn keepalive_label(&self) -> String {
        match (self.client_keepalive, self.upstream_keepalive) {
            (true, true) => "on".into(),
            (false, false) => "off".into(),
            (c, u) => format!("lg:{} up:{}", onoff(c), onoff(u)),
        }
    }
}

fn onoff(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

/// What the load generator reported for one request.
#[derive(Clone, Debug)]
pub struct LoadRequest {
    pub id: String,
    pub path: String,
    pub status: u16,
    pub error: Option<String>,
}

/// Run the load generator to completion.
pub fn run_load(topo: &Topology, cfg: &RunConfig) -> Result<Vec<LoadRequest>> {
    let port = if cfg.upstream_keepalive {
        topo.gateway_keepalive
    } else {
        topo.gateway_close
    };
    let args = vec![
        topology_fixture("loadgen.py").display().to_string(),
        "checkout".into(),
        port.to_string(),
        cfg.run.clone(),
        cfg.count.to_string(),
        cfg.concurrency.to_string(),
        onoff(cfg.client_keepalive).into(),
    ];
    let v = run_client(SVC_LOADGEN, &args, Duration::from_secs(120))?;
    parse_requests(&v)
}

/// Runs a Python client fixture as `service` to its end; returns the JSON line with its
/// `requests` summary.
pub fn run_client(service: &str, args: &[String], timeout: Duration) -> Result<Value> {
    let mut p = Proc::spawn(service, python(args, service), None)?;
    let st = p.wait(timeout)?;
    ensure!(st.success(), "{service} failed ({st}):\n{}", p.lines().join("\n"));
    p.json_lines()
        .into_iter()
        .find(|v| v.get("requests").is_some())
        .with_context(|| format!("no JSON from {service}:\n{}", p.lines().join("\n")))
}

pub fn parse_requests(v: &Value) -> Result<Vec<LoadRequest>> {
    v["requests"]
        .as_array()
        .context("requests")?
        .iter()
        .map(|r| {
            Ok(LoadRequest {
                id: r["id"].as_str().context("id")?.to_string(),
                path: r["path"].as_str().context("path")?.to_string(),
                status: r["status"].as_u64().unwrap_or(0) as u16,
                error: r["error"].as_str().map(str::to_string),
            })
        })
        .collect()
}

/// What orders did for one checkout.
#[derive(Clone, Debug, Default)]
pub struct OrdersTruth {
    /// Outcome of every payment attempt whose request was written: "200", "timeout", ...
    pub payment_attempts: Vec<String>,
    /// When orders started each of those attempts (Unix ns).
    pub payment_at: Vec<u64>,
    pub fail_called: bool,
    pub status: u16,
}

/// What the services report for one run, by request id.
#[derive(Clone, Debug, Default)]
pub struct Truth {
    pub orders: HashMap<String, OrdersTruth>,
    /// Payment attempts payments received, by id (in arrival order: slow flag).
    pub payments_received: HashMap<String, Vec<bool>>,
    /// When payments received each of them (Unix ns).
    pub payments_at: HashMap<String, Vec<u64>>,
    pub fail_received: HashSet<String>,
}

pub fn truth(topo: &Topology, run: &str) -> Truth {
    let mut t = Truth::default();
    for v in topo.orders.json_lines() {
        if v["run"].as_str() != Some(run) {
            continue;
        }
        let id = v["id"].as_str().unwrap_or_default().to_string();
        let sent: Vec<&Value> = v["payment"]
            .as_array()
            .map(|a| a.iter().filter(|x| x["sent"].as_bool() == Some(true)).collect())
            .unwrap_or_default();
        t.orders.insert(
            id,
            OrdersTruth {
                payment_attempts: sent
                    .iter()
                    .map(|x| match &x["outcome"] {
                        Value::Number(n) => n.to_string(),
                        Value::String(s) => s.clone(),
                        o => o.to_string(),
                    })
                    .collect(),
                payment_at: sent.iter().map(|x| unix_ns(&x["at"])).collect(),
                fail_called: !v["fail"].is_null(),
                status: v["status"].as_u64().unwrap_or(0) as u16,
            },
        );
    }
    let mut recv: Vec<(String, u64, bool, u64)> = Vec::new();
    for v in topo.payments.json_lines() {
        if v["run"].as_str() != Some(run) {
            continue;
        }
        let id = v["id"].as_str().unwrap_or_default().to_string();
        match v["op"].as_str() {
            Some("fail") => {
                t.fail_received.insert(id);
            }
            Some("payment") => recv.push((
                id,
                v["attempt"].as_u64().unwrap_or(0),
                v["slow"].as_bool() == Some(true),
                unix_ns(&v["at"]),
            )),
            _ => {}
        }
    }
    recv.sort_by_key(|(id, a, _, _)| (id.clone(), *a));
    for (id, _, slow, at) in recv {
        t.payments_received.entry(id.clone()).or_default().push(slow);
        t.payments_at.entry(id).or_default().push(at);
    }
    t
}

fn unix_ns(v: &Value) -> u64 {
    v.as_f64().map_or(0, |s| (s * 1e9) as u64)
}

/// Span keys of one request.
pub mod key {
    pub fn loadgen(id: &str) -> String {
        format!("{id}/loadgen>gateway")
    }
    pub fn gateway_server(id: &str) -> String {
        format!("{id}/gateway")
    }
    pub fn gateway_client(id: &str) -> String {
        format!("{id}/gateway>orders")
    }
    pub fn orders_server(id: &str) -> String {
        format!("{id}/orders")
    }
    pub fn orders_inventory(id: &str) -> String {
        format!("{id}/orders>inventory")
    }
    pub fn inventory_server(id: &str) -> String {
        format!("{id}/inventory")
    }
    pub fn inventory_pricing(id: &str) -> String {
        format!("{id}/inventory>pricing")
    }
    pub fn pricing_server(id: &str) -> String {
        format!("{id}/pricing")
    }
    pub fn orders_payment(id: &str, attempt: usize) -> String {
        format!("{id}/orders>payments#{attempt}")
    }
    pub fn payments_server(id: &str, attempt: usize) -> String {
        format!("{id}/payments#{attempt}")
    }
    pub fn orders_fail(id: &str) -> String {
        format!("{id}/orders>payments/fail")
    }
    pub fn payments_fail(id: &str) -> String {
        format!("{id}/payments/fail")
    }
}

/// The expected span tree of one run, from the load generator's requests and the services'
/// ground truth.
pub fn expected_spans(run: &str, load: &[LoadRequest], truth: &Truth) -> Vec<ExpectedSpan> {
    let mut out = Vec::new();
    for r in load {
        let id = r.id.as_str();
        let mut push = |key: String,
                        service: &str,
                        kind: &'static str,
                        op: &str,
                        parent: Option<String>,
                        optional,
                        at_ns: Option<u64>| {
            let class = if parent.is_none() {
                CLASS_ROOT
            } else if service == SVC_INVENTORY || op == "price" {
                // the edge's child or its parent lives in Node's process
                CLASS_NODE
            } else {
                CLASS_THREADED
            };
            out.push(ExpectedSpan {
                key,
                service: service.to_string(),
                kind,
                path: format!("/{op}/{run}/{id}"),
                parent,
                class: class.to_string(),
                group: id.to_string(),
                optional,
                at_ns,
            });
        };
        use key::*;
        push(loadgen(id), SVC_LOADGEN, "CLIENT", "checkout", None, false, None);
        push(
            gateway_server(id),
            SVC_GATEWAY,
            "SERVER",
            "checkout",
            Some(loadgen(id)),
            false,
            None,
        );
        push(
            gateway_client(id),
            SVC_GATEWAY,
            "CLIENT",
            "checkout",
            Some(gateway_server(id)),
            false,
            None,
        );
        push(
            orders_server(id),
            SVC_ORDERS,
            "SERVER",
            "checkout",
            Some(gateway_client(id)),
            false,
            None,
        );
        push(
            orders_inventory(id),
            SVC_ORDERS,
            "CLIENT",
            "inventory",
            Some(orders_server(id)),
            false,
            None,
        );
        push(
            inventory_server(id),
            SVC_INVENTORY,
            "SERVER",
            "inventory",
            Some(orders_inventory(id)),
            false,
            None,
        );
        push(
            inventory_pricing(id),
            SVC_INVENTORY,
            "CLIENT",
            "price",
            Some(inventory_server(id)),
            false,
            None,
        );
        push(
            pricing_server(id),
            SVC_PRICING,
            "SERVER",
            "price",
            Some(inventory_pricing(id)),
            false,
            None,
        );
        let ot = truth.orders.get(id).cloned().unwrap_or_default();
        let received = truth.payments_received.get(id).map_or(0, Vec::len);
        for (k, outcome) in ot.payment_attempts.iter().enumerate() {
            let sent_at = ot.payment_at.get(k).copied().filter(|t| *t > 0);
            push(
                orders_payment(id, k),
                SVC_ORDERS,
                "CLIENT",
                "payment",
                Some(orders_server(id)),
                false,
                sent_at,
            );
            if k < received {
                // the server side of an attempt orders gave up on may show no exchange at all
                let optional = outcome != "200";
                let recv_at = truth
                    .payments_at
                    .get(id)
                    .and_then(|v| v.get(k))
                    .copied()
                    .filter(|t| *t > 0);
                push(
                    payments_server(id, k),
                    SVC_PAYMENTS,
                    "SERVER",
                    "payment",
                    Some(orders_payment(id, k)),
                    optional,
                    recv_at,
                );
            }
        }
        if ot.fail_called {
            push(
                orders_fail(id),
                SVC_ORDERS,
                "CLIENT",
                "fail",
                Some(orders_server(id)),
                false,
                None,
            );
            if truth.fail_received.contains(id) {
                push(
                    payments_fail(id),
                    SVC_PAYMENTS,
                    "SERVER",
                    "fail",
                    Some(orders_fail(id)),
                    false,
                    None,
                );
            }
        }
    }
    out
}

/// The spans of a run: `url.path` is `/<op>/<run>/<id>`.
pub fn in_run(run: &str) -> impl Fn(&CollectedSpan) -> bool + '_ {
    move |s| s.url_path().is_some_and(|p| p.split('/').nth(2) == Some(run))
}

// ---------------------------------------------------------------------------------------------
// Per-run checks beyond edges

/// Everything measured for one run.
pub struct RunReport {
    pub rows: Vec<Row>,
    /// Failed assertions, human readable, with span dumps.
    pub failures: Vec<String>,
    /// Observations that are not assertions.
    pub notes: Vec<String>,
    /// (service, kind, url.path) of required spans that were not exported in time.
    pub lost: Vec<(String, &'static str, String)>,
}

/// One line describing a span: ids, parent and how it was inferred, status, times, peer.
pub fn dump(s: &CollectedSpan) -> String {
    format!(
        "{} svc={} path={} span={} parent={} trace={} source={:?} status={} start={} end={} dur={:?} resend={:?} error.type={:?} peer={:?}:{:?}",
        s.kind,
        s.service_name().unwrap_or("?"),
        s.url_path().unwrap_or("?"),
        s.span_id,
        s.parent_span_id.as_deref().unwrap_or("-"),
        s.trace_id,
        s.attr_str("sockspan.parent.source"),
        s.status,
        s.start_ns,
        s.end_ns,
        s.duration(),
        s.attr_int("http.request.resend_count"),
        s.attr_str("error.type"),
        s.attr_str("network.peer.address"),
        s.attr_int("network.peer.port"),
    )
}

/// Score one run and check resend counts, error statuses, dangling parents, parent sources and
/// trace-id consistency. `spans`: the run's spans; `all`: every span received (to resolve
/// parents).
pub fn check_run(
    cfg: &RunConfig,
    load: &[LoadRequest],
    truth: &Truth,
    spans: &[CollectedSpan],
    all: &[CollectedSpan],
) -> RunReport {
    let expected = expected_spans(&cfg.run, load, truth);
    let exported: HashSet<String> = all.iter().map(|s| s.span_id.clone()).collect();
    let by_id: HashMap<&str, &CollectedSpan> = all.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let sc = score(&expected, spans, &exported);
    let tag = format!("[c={} ka={} run={}]", cfg.concurrency, cfg.keepalive_label(), cfg.run);
    let mut failures = Vec::new();
    let mut notes = Vec::new();

    let rows: Vec<Row> = [CLASS_ROOT, CLASS_THREADED, CLASS_NODE]
        .iter()
        .map(|c| Row {
            concurrency: cfg.concurrency,
            keepalive: cfg.keepalive_label(),
            class: c.to_string(),
            score: sc.class(c),
        })
        .collect();

    // Edge assertions.
    let root = sc.class(CLASS_ROOT);
    if root.lost > 0 || root.correct != load.len() {
        failures.push(format!(
            "{tag} root loadgen spans: {} of {} present without parent ({} lost, {} with a parent)",
            root.correct,
            load.len(),
            root.lost,
            root.wrong
        ));
    }
    let th = sc.class(CLASS_THREADED);
    if th.wrong > 0 {
        failures.push(format!(
            "{tag} threaded+nginx: {} wrong parents (precision {:.3}%)",
            th.wrong,
            100.0 * th.precision()
        ));
    }
    if th.recall() < 0.999 {
        failures.push(format!(
            "{tag} threaded+nginx: recall {:.3}% < 99.9% ({} missing parents, {} lost spans)",
            100.0 * th.recall(),
            th.missing,
            th.lost
        ));
    }
    let nd = sc.class(CLASS_NODE);
    if nd.precision() < 0.99 {
        failures.push(format!(
            "{tag} node-middle: precision {:.3}% < 99% ({} wrong)",
            100.0 * nd.precision(),
            nd.wrong
        ));
    }
    let describe_edge = |e: &score::Edge| {
        let exp = expected.iter().find(|x| x.key == e.child);
        let child = sc.assigned.get(&e.child).copied();
        let want = e.parent.as_ref().and_then(|p| sc.assigned.get(p).copied());
        let got = child
            .and_then(|c| c.parent_span_id.as_deref())
            .and_then(|p| by_id.get(p).copied());
        format!(
            "  edge {} -> {:?} ({:?}, class {}, optional child {})\n    child:    {}\n    expected: {}\n    actual:   {}",
            e.child,
            e.parent,
            e.verdict,
            e.class,
            exp.is_some_and(|x| x.optional),
            child.map_or("<not exported>".into(), dump),
            want.map_or("<none>".into(), dump),
            got.map_or_else(
                || match child.and_then(|c| c.parent_span_id.clone()) {
                    Some(p) => format!("<span {p} not exported>"),
                    None => "<no parent>".into(),
                },
                dump
            ),
        )
    };
    let mut bad: Vec<String> = Vec::new();
    for v in [Verdict::Wrong, Verdict::Lost, Verdict::Missing] {
        let list: Vec<_> = sc.edges_with(v).collect();
        if list.is_empty() {
            continue;
        }
        bad.push(format!("{tag} {} {:?} edges (first 6):", list.len(), v));
        bad.extend(list.iter().take(6).map(|e| describe_edge(e)));
    }
    if !bad.is_empty() {
        notes.push(bad.join("\n"));
    }
    if !sc.unexpected.is_empty() {
        notes.push(format!(
            "{tag} {} spans matched no expected span (first 6):\n{}",
            sc.unexpected.len(),
            sc.unexpected
                .iter()
                .take(6)
                .map(|s| format!("  {}", dump(s)))
                .collect::<Vec<_>>()
                .join("\n")
        ));
    }
    if !sc.optional_absent.is_empty() {
        notes.push(format!(
            "{tag} {} optional spans (server side of abandoned payment attempts) not exported: {:?}",
            sc.optional_absent.len(),
            sc.optional_absent.iter().take(5).collect::<Vec<_>>()
        ));
    }
    if !sc.dangling.is_empty() {
        failures.push(format!(
            "{tag} {} spans with a parent that was never exported (first 5):\n{}",
            sc.dangling.len(),
            sc.dangling
                .iter()
                .take(5)
                .map(|s| format!("  {}", dump(s)))
                .collect::<Vec<_>>()
                .join("\n")
        ));
    }
    if !sc.source_mismatch.is_empty() {
        failures.push(format!(
            "{tag} {} spans whose sockspan.parent.source presence disagrees with parent_span_id (first 5):\n{}",
            sc.source_mismatch.len(),
            sc.source_mismatch
                .iter()
                .take(5)
                .map(|s| format!("  {}", dump(s)))
                .collect::<Vec<_>>()
                .join("\n")
        ));
    }
    if !sc.groups_split_trace.is_empty() {
        failures.push(format!(
            "{tag} {} requests with all edges correct but several trace ids: {:?}",
            sc.groups_split_trace.len(),
            sc.groups_split_trace.iter().take(5).collect::<Vec<_>>()
        ));
    }
    notes.push(format!(
        "{tag} requests fully stitched (all edges correct, one trace): {}/{}",
        sc.groups_all_correct - sc.groups_split_trace.len(),
        sc.groups
    ));

    // Resend counts on orders' payment attempts; no other span may carry one.
    let (mut first_ok, mut first_n, mut retry_ok, mut retry_n) = (0, 0, 0, 0);
    let mut resend_bad = Vec::new();
    let mut timed_out = Vec::new();
    for r in load {
        let ot = truth.orders.get(&r.id).cloned().unwrap_or_default();
        for (k, outcome) in ot.payment_attempts.iter().enumerate() {
            let Some(s) = sc.assigned.get(&key::orders_payment(&r.id, k)) else {
                continue;
            };
            let rc = s.attr_int("http.request.resend_count");
            let good = if k == 0 { rc.is_none() } else { rc == Some(k as i64) };
            if k == 0 {
                first_n += 1;
                first_ok += usize::from(good);
            } else {
                retry_n += 1;
                retry_ok += usize::from(good);
            }
            if !good {
                resend_bad.push(format!("  attempt {k}: {}", dump(s)));
            }
            if outcome != "200" {
                timed_out.push((r.id.clone(), k, *s));
            }
        }
    }
    let with_resend: Vec<&CollectedSpan> = spans
        .iter()
        .filter(|s| s.attr("http.request.resend_count").is_some())
        .collect();
    let stray: Vec<String> = with_resend
        .iter()
        .filter(|s| !(s.service_name() == Some(SVC_ORDERS) && s.url_path().is_some_and(|p| p.starts_with("/payment/"))))
        .map(|s| format!("  {}", dump(s)))
        .collect();
    notes.push(format!(
        "{tag} resend_count: {} client spans carry it; first attempts without it {first_ok}/{first_n}; retries with the right count {retry_ok}/{retry_n}",
        with_resend.len()
    ));
    if first_ok != first_n || retry_ok != retry_n || !stray.is_empty() {
        failures.push(format!(
            "{tag} http.request.resend_count wrong on {} payment attempts, {} other spans carry it:\n{}\n{}",
            resend_bad.len(),
            stray.len(),
            resend_bad.iter().take(5).cloned().collect::<Vec<_>>().join("\n"),
            stray.iter().take(5).cloned().collect::<Vec<_>>().join("\n")
        ));
    }
    let slow_expected = load
        .iter()
        .filter(|r| {
            truth
                .payments_received
                .get(&r.id)
                .is_some_and(|v| v.first() == Some(&true))
        })
        .count();
    if retry_n < slow_expected {
        failures.push(format!(
            "{tag} only {retry_n} retried payment attempts scored, {slow_expected} slow first attempts planned"
        ));
    }

    // Errors: /fail answers 500 → payments SERVER and orders CLIENT spans are ERROR; a timed-out
    // attempt's CLIENT span is an error too.
    let (mut fail_n, mut fail_ok) = (0, 0);
    let mut fail_bad = Vec::new();
    for r in load {
        if !truth.orders.get(&r.id).is_some_and(|o| o.fail_called) {
            continue;
        }
        for k in [key::orders_fail(&r.id), key::payments_fail(&r.id)] {
            fail_n += 1;
            match sc.assigned.get(&k) {
                Some(s) if s.status == "ERROR" && s.attr_int("http.response.status_code") == Some(500) => fail_ok += 1,
                Some(s) => fail_bad.push(format!("  {}", dump(s))),
                None => fail_bad.push(format!("  {k}: not exported")),
            }
        }
    }
    notes.push(format!(
        "{tag} /fail spans with status ERROR and 500: {fail_ok}/{fail_n}"
    ));
    if fail_ok != fail_n || fail_n == 0 {
        failures.push(format!(
            "{tag} /fail spans not ERROR/500: {}/{fail_n} ok\n{}",
            fail_ok,
            fail_bad.iter().take(6).cloned().collect::<Vec<_>>().join("\n")
        ));
    }
    let timed_out_err = timed_out.iter().filter(|(_, _, s)| s.status == "ERROR").count();
    notes.push(format!(
        "{tag} timed-out payment attempts: {} client spans, {} with status ERROR (error.type {:?})",
        timed_out.len(),
        timed_out_err,
        timed_out
            .iter()
            .map(|(_, _, s)| s.attr_str("error.type").unwrap_or("-").to_string())
            .collect::<BTreeSet<_>>()
    ));
    if timed_out_err != timed_out.len() {
        failures.push(format!(
            "{tag} timed-out payment attempts whose CLIENT span is not ERROR:\n{}",
            timed_out
                .iter()
                .filter(|(_, _, s)| s.status != "ERROR")
                .take(5)
                .map(|(_, _, s)| format!("  {}", dump(s)))
                .collect::<Vec<_>>()
                .join("\n")
        ));
    }
    // Observation: the server side of abandoned attempts (payments slept PAYMENT_SLOW seconds).
    let mut slow_durs = Vec::new();
    for r in load {
        if truth
            .payments_received
            .get(&r.id)
            .is_some_and(|v| v.first() == Some(&true))
            && let Some(s) = sc.assigned.get(&key::payments_server(&r.id, 0))
        {
            slow_durs.push((s.duration(), s.attr_int("http.response.status_code"), *s));
        }
    }
    if !timed_out.is_empty() {
        let durs: Vec<Duration> = timed_out.iter().map(|(_, _, s)| s.duration()).collect();
        let short = durs.iter().filter(|d| d.as_secs_f64() < PAYMENT_TIMEOUT * 0.95).count();
        notes.push(format!(
            "{tag} orders CLIENT spans of timed-out attempts: {short}/{} shorter than the {PAYMENT_TIMEOUT}s orders waited (durations {:?}); e.g.\n  {}",
            durs.len(),
            &durs[..durs.len().min(4)],
            dump(timed_out[0].2)
        ));
    }
    if !slow_durs.is_empty() {
        let short = slow_durs
            .iter()
            .filter(|(d, _, _)| d.as_secs_f64() < PAYMENT_SLOW * 0.95)
            .count();
        notes.push(format!(
            "{tag} payments SERVER spans of abandoned slow attempts: {} exported, {} shorter than the {PAYMENT_SLOW}s the handler slept (durations {:?}, statuses {:?}); e.g.\n  {}",
            slow_durs.len(),
            short,
            slow_durs.iter().take(4).map(|(d, _, _)| *d).collect::<Vec<_>>(),
            slow_durs.iter().map(|(_, st, _)| *st).collect::<BTreeSet<_>>(),
            dump(slow_durs[0].2)
        ));
    }
    let lost = sc
        .edges_with(Verdict::Lost)
        .filter(|e| !sc.assigned.contains_key(&e.child))
        .filter_map(|e| expected.iter().find(|x| x.key == e.child))
        .map(|x| (x.service.clone(), x.kind, x.path.clone()))
        .collect();
    RunReport {
        rows,
        failures,
        notes,
        lost,
    }
}

/// Wait until every required expected span of the run was received (or `timeout`), then let
/// `settle` pass; returns the run's spans.
pub fn collect_run(
    rx: &crate::receiver::Receiver,
    cfg: &RunConfig,
    load: &[LoadRequest],
    truth: &Truth,
    timeout: Duration,
    settle: Duration,
) -> Vec<CollectedSpan> {
    let need = expected_spans(&cfg.run, load, truth)
        .iter()
        .filter(|e| !e.optional)
        .count();
    let filter = in_run(&cfg.run);
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if rx.with_spans(|s| s.iter().filter(|s| filter(s)).count()) >= need {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(settle);
    rx.matching(filter)
}

/// The services must have done what the plan says (otherwise the expected tree is not the
/// one the test means to measure).
pub fn check_plan(cfg: &RunConfig, load: &[LoadRequest], truth: &Truth) -> Result<()> {
    let bad: Vec<&LoadRequest> = load.iter().filter(|r| r.status != 200).collect();
    if !bad.is_empty() {
        bail!(
            "run {}: {} of {} checkouts did not answer 200: {:?}",
            cfg.run,
            bad.len(),
            load.len(),
            bad.iter().take(5).collect::<Vec<_>>()
        );
    }
    ensure!(
        load.len() == cfg.count,
        "loadgen made {} requests, wanted {}",
        load.len(),
        cfg.count
    );
    let missing: Vec<&str> = load
        .iter()
        .filter(|r| !truth.orders.contains_key(&r.id))
        .map(|r| r.id.as_str())
        .collect();
    ensure!(
        missing.is_empty(),
        "orders has no record of {:?}",
        &missing[..missing.len().min(5)]
    );
    Ok(())
}
