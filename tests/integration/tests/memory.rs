//! The memory budget (`--memory-limit`): the agent's resident memory stays under it while the
//! state the issue lists piles up: 10,000 idle keep-alive connections, 2,000 slowloris
//! connections, 50,000 requests that are never answered, and a collector that is down while
//! traffic goes on. Past the budget, state is given back and counted; the agent keeps tracing.
//!
//! Needs root, the release agent and python3; skips outside CI when missing, panics with CI=true.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use agent_integration_tests::{
    Receiver,
    harness::{
        Agent, AgentBuilder, Metrics, Protocol, Server, curl, free_port, hold_server, hostile, serial, unique_path,
    },
    require,
};
use anyhow::{Result, ensure};

/// The budget under test: small enough that the loads below go past it.
const LIMIT_MIB: u64 = 144;

/// Samples the agent's resident memory every 50 ms; keeps the highest.
struct RssWatch {
    stop: Arc<AtomicBool>,
    peak_kib: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl RssWatch {
    fn start(pid: u32) -> Self {
        let (stop, peak_kib) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let (s, p) = (stop.clone(), peak_kib.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Relaxed) {
                if let Some(kib) = rss_kib(pid) {
                    p.fetch_max(kib, Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Self {
            stop,
            peak_kib,
            thread: Some(thread),
        }
    }

    /// The peak so far, in MiB.
    fn peak_mib(&self) -> f64 {
        self.peak_kib.load(Relaxed) as f64 / 1024.0
    }
}

impl Drop for RssWatch {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn budgeted(builder: AgentBuilder) -> Result<Agent> {
    builder
        .metrics()
        .arg("--memory-limit")
        .arg(format!("{LIMIT_MIB}MiB"))
        .start()
}

/// `sockspan_memory_shed_total` of one stage.
fn shed_at(m: &Metrics, stage: &str) -> f64 {
    m.value("sockspan_memory_shed_total", Some(&format!(r#"stage="{stage}""#)))
        .unwrap_or(0.0)
}

fn shed(m: &Metrics) -> String {
    let v = |stage: &str| shed_at(m, stage);
    format!(
        "heap {:.1} MiB, shed: connections {} requests {}, events dropped {}, spans dropped {}",
        m.value("sockspan_heap_bytes", None).unwrap_or(0.0) / 1048576.0,
        v("connections"),
        v("requests"),
        m.value("sockspan_events_dropped_total", Some(r#"reason="memory_limit""#))
            .unwrap_or(0.0),
        m.value("sockspan_spans_dropped_total", Some(r#"reason="memory_limit""#))
            .unwrap_or(0.0),
    )
}

/// After the load: the peak is under the budget, and the agent still traces a request.
fn still_within_budget_and_tracing(
    agent: Agent,
    watch: &RssWatch,
    rx: &Receiver,
    py: &Server,
    what: &str,
) -> Result<()> {
    let m = agent.metrics()?;
    println!(
        "{what}: peak RSS {:.1} MiB of {LIMIT_MIB} MiB; {}",
        watch.peak_mib(),
        shed(&m)
    );
    ensure!(
        watch.peak_mib() <= LIMIT_MIB as f64,
        "{what}: peak RSS {:.1} MiB over the {LIMIT_MIB} MiB budget ({})",
        watch.peak_mib(),
        shed(&m)
    );
    // Still traced (two spans), then a stop with the books balanced.
    let path = unique_path("afterload");
    ensure!(
        curl(&[py.url(&path)], &[])?[0].status == 200,
        "the server stopped answering"
    );
    rx.wait_for_matching(2, Duration::from_secs(20), Duration::from_millis(500), |s| {
        s.url_path().is_some_and(|p| p == path)
    })?;
    agent.stop()?;
    Ok(())
}

#[test]
fn ten_thousand_idle_keep_alive_connections_stay_within_the_budget() -> Result<()> {
    let _g = serial();
    require!(Python, Curl);
    let rx = Receiver::start()?;
    let py = Server::python(None)?;
    let held = hold_server(true)?;
    let agent = budgeted(AgentBuilder::new().otlp(&rx, Protocol::Grpc))?;
    let watch = RssWatch::start(agent.pid());
    let out = hostile("hold", held.port, &["10000", "1", "5"])?;
    ensure!(out["ok"] == 10000, "{out}");
    still_within_budget_and_tracing(agent, &watch, &rx, &py, "10,000 idle keep-alive connections")
}

#[test]
fn two_thousand_slowloris_connections_stay_within_the_budget() -> Result<()> {
    let _g = serial();
    require!(Python, Curl);
    let rx = Receiver::start()?;
    let py = Server::python(None)?;
    let held = hold_server(false)?;
    let agent = budgeted(AgentBuilder::new().otlp(&rx, Protocol::Grpc))?;
    let watch = RssWatch::start(agent.pid());
    let out = hostile("slowloris", held.port, &["2000", "4"])?;
    ensure!(out["connections"] == 2000, "{out}");
    still_within_budget_and_tracing(agent, &watch, &rx, &py, "2,000 slowloris connections")
}

/// 800 connections each send 63 requests that the server reads and never answers: 50,400
/// requests in flight on both ends, all arriving within a few batches. State is shed (counted:
/// connections, and their requests dropped without spans) and the burst's peak stays within
/// the budget.
#[test]
fn fifty_thousand_unanswered_requests_stay_within_the_budget() -> Result<()> {
    let _g = serial();
    require!(Python, Curl);
    let rx = Receiver::start()?;
    let py = Server::python(None)?;
    let held = hold_server(false)?;
    let agent = budgeted(AgentBuilder::new().otlp(&rx, Protocol::Grpc))?;
    let watch = RssWatch::start(agent.pid());
    let out = hostile("hold", held.port, &["800", "63", "5"])?;
    ensure!(out["connections"] == 800, "{out}");
    let m = agent.metrics()?;
    ensure!(shed_at(&m, "connections") > 0.0, "no state shed: {}", shed(&m));
    ensure!(
        shed_at(&m, "requests")
            <= m.value("sockspan_spans_dropped_total", Some(r#"reason="memory_limit""#))
                .unwrap_or(0.0),
        "requests shed without their spans counted dropped: {}",
        shed(&m)
    );
    still_within_budget_and_tracing(agent, &watch, &rx, &py, "50,400 unanswered requests")
}

/// The collector is down (nothing listens at the endpoint) for 30 s of pipelined traffic:
/// exports fail and their spans are dropped, counted; memory stays within the budget.
#[test]
fn a_collector_down_under_load_stays_within_the_budget() -> Result<()> {
    let _g = serial();
    require!(Python, Curl);
    let py = Server::python(None)?;
    let held = hold_server(true)?;
    let down = format!("http://127.0.0.1:{}", free_port());
    let agent = budgeted(
        AgentBuilder::new()
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", down)
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
    )?;
    let watch = RssWatch::start(agent.pid());
    let start = Instant::now();
    let mut requests = 0;
    while start.elapsed() < Duration::from_secs(30) {
        let out = hostile("pipeline", held.port, &["50", "60", "300"])?;
        requests += out["ok"].as_u64().unwrap_or(0);
    }
    let m = agent.metrics()?;
    println!(
        "collector down: {requests} requests in 30 s, peak RSS {:.1} MiB of {LIMIT_MIB} MiB; {}",
        watch.peak_mib(),
        shed(&m)
    );
    ensure!(
        watch.peak_mib() <= LIMIT_MIB as f64,
        "peak RSS {:.1} MiB over the {LIMIT_MIB} MiB budget",
        watch.peak_mib()
    );
    let failed = m
        .value("sockspan_spans_dropped_total", Some(r#"reason="export_failed""#))
        .unwrap_or(0.0);
    ensure!(failed > 0.0, "no export failure counted with the collector down");
    drop(py);
    agent.stop()?;
    Ok(())
}
