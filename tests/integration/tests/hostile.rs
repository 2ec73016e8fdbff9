//! Hostile traffic against a real server with the real agent attached: slowloris connections
//! that never finish their headers, and connection churn. Each has a counted outcome, and the
//! agent's state comes back down once the traffic is gone.
//!
//! Needs root, the release agent and python3; skips outside CI when missing, panics with CI=true.

use std::{process::Command, time::Duration};

use agent_integration_tests::{
    Receiver,
    checks::{one_exchange, under},
    harness::{AgentBuilder, Metrics, Protocol, Server, curl, fixture, run, serial, unique_path},
    require,
};
use anyhow::{Result, ensure};

const SPAN_TIMEOUT: Duration = Duration::from_secs(20);
const SETTLE: Duration = Duration::from_millis(800);

/// `tests/fixtures/hostile_client.py MODE PORT ARGS...`; its JSON output.
fn hostile(mode: &str, port: u16, args: &[&str]) -> Result<serde_json::Value> {
    let mut cmd = Command::new("python3");
    cmd.arg(fixture("hostile_client.py"))
        .arg(mode)
        .arg(port.to_string())
        .args(args);
    let (st, out, err) = run(&mut cmd, Duration::from_secs(120))?;
    ensure!(st.success(), "hostile client {mode} failed ({st}): {err}\n{out}");
    Ok(serde_json::from_str(out.trim())?)
}

fn gauge(m: &Metrics, name: &str) -> f64 {
    m.value(name, None).unwrap_or(-1.0)
}

/// 200 connections send a request line and trickle one header byte every 200 ms for 3 s, then
/// close: no span, each cut request counted (`incomplete_at_close`, on both ends), the agent
/// keeps tracing, and its connection table comes back down.
#[test]
fn slowloris_connections_are_counted_and_forgotten() -> Result<()> {
    let _g = serial();
    require!(Python, Curl);
    let rx = Receiver::start()?;
    let py = Server::python(None)?;
    let agent = AgentBuilder::new().otlp(&rx, Protocol::Grpc).metrics().start()?;
    let before = agent.metrics()?;
    let cut_before = before
        .value("sockspan_http_rejected_total", Some(r#"reason="incomplete_at_close""#))
        .unwrap_or(0.0);

    let out = hostile("slowloris", py.port, &["200", "3"])?;
    ensure!(out["connections"] == 200, "{out}");

    let path = unique_path("after-slowloris");
    assert_eq!(curl(&[py.url(&path)], &[])?[0].status, 200);
    let spans = rx.wait_for_matching(2, SPAN_TIMEOUT, SETTLE, under(&path))?;
    one_exchange(&spans, &path)?;
    let slow = rx.matching(|s| s.url_path().is_some_and(|p| p.starts_with("/slowloris")));
    ensure!(
        slow.is_empty(),
        "{} spans for requests that never ended their headers",
        slow.len()
    );

    let m = agent.wait_metrics(Duration::from_secs(10), |m| {
        m.value("sockspan_http_rejected_total", Some(r#"reason="incomplete_at_close""#))
            .unwrap_or(0.0)
            >= cut_before + 200.0
    })?;
    // Closed connections leave the table (a few of the machine's own may come and go).
    let (open_before, open_after) = (
        gauge(&before, "sockspan_connections"),
        gauge(&m, "sockspan_connections"),
    );
    ensure!(
        open_after <= open_before + 20.0,
        "connections tracked: {open_before} before, {open_after} after the slowloris connections closed"
    );
    agent.stop()?;
    Ok(())
}

/// 2,000 connections one after another, one request each: every exchange reported exactly once
/// (two spans each), and the connection table does not keep them.
#[test]
fn connection_churn_reports_every_exchange_once() -> Result<()> {
    let _g = serial();
    require!(Python);
    let rx = Receiver::start()?;
    let py = Server::python(None)?;
    let agent = AgentBuilder::new().otlp(&rx, Protocol::Grpc).metrics().start()?;
    let before = agent.metrics()?;

    let n = 2000;
    let out = hostile("churn", py.port, &[&n.to_string()])?;
    ensure!(out["ok"] == n, "{out}");
    let rate = n as f64 / out["seconds"].as_f64().unwrap_or(1.0);
    println!("churn: {n} connections at {rate:.0} per second");

    let churned = |s: &agent_integration_tests::CollectedSpan| s.url_path().is_some_and(|p| p.starts_with("/churn/"));
    let spans = rx.wait_for_matching(2 * n, SPAN_TIMEOUT, SETTLE, churned)?;
    ensure!(spans.len() == 2 * n, "{} spans for {n} exchanges", spans.len());
    let mut paths: Vec<_> = spans.iter().filter_map(|s| s.url_path()).collect();
    paths.sort_unstable();
    paths.dedup();
    ensure!(paths.len() == n, "{} distinct paths for {n} exchanges", paths.len());

    let m = agent.metrics()?;
    let (open_before, open_after) = (
        gauge(&before, "sockspan_connections"),
        gauge(&m, "sockspan_connections"),
    );
    ensure!(
        open_after <= open_before + 20.0,
        "connections tracked: {open_before} before, {open_after} after {n} closed connections"
    );
    agent.stop()?;
    Ok(())
}
