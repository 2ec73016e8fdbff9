//! Hostile traffic against a real server with the real agent attached: slowloris connections
//! that never finish their headers, and connection churn. Each has a counted outcome, and the
//! agent's state comes back down once the traffic is gone.
//!
//! Needs root, the release agent and python3; skips outside CI when missing, panics with CI=true.

use std::time::Duration;

use agent_integration_tests::{
    Receiver,
    checks::{one_exchange, under},
    harness::{AgentBuilder, Metrics, Protocol, Server, curl, hostile, serial, unique_path},
    require,
};
use anyhow::{Result, ensure};

const SPAN_TIMEOUT: Duration = Duration::from_secs(20);
const SETTLE: Duration = Duration::from_millis(800);

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

/// Status `200 + i % 50` that the fixture asks for in `/pipe/<conn>/<i>/status/<code>`, and
/// the status a span reports: equal when the span paired the request with its own response.
fn pipelined_pairing(s: &agent_integration_tests::CollectedSpan) -> Option<(i64, Option<i64>)> {
    let path = s.url_path()?.strip_prefix("/pipe/")?;
    let i: i64 = path.split('/').nth(1)?.parse().ok()?;
    Some((200 + i % 50, s.attr_int("http.response.status_code")))
}

fn rejected(m: &Metrics, reason: &str) -> f64 {
    m.value("sockspan_http_rejected_total", Some(&format!(r#"reason="{reason}""#)))
        .unwrap_or(0.0)
}

/// 20 connections each write 60 pipelined 1 KB requests in one call (60 KB): every request is
/// seen on both ends and paired with its own response.
#[test]
fn pipelined_requests_in_one_large_write_are_all_seen() -> Result<()> {
    let _g = serial();
    require!(Python);
    let rx = Receiver::start()?;
    let py = Server::python(None)?;
    let agent = AgentBuilder::new().otlp(&rx, Protocol::Grpc).metrics().start()?;

    let (conns, each) = (20, 60);
    let out = hostile("pipeline", py.port, &[&conns.to_string(), &each.to_string(), "1000"])?;
    ensure!(out["ok"] == conns * each, "{out}");

    let want = 2 * conns * each;
    let spans = rx.wait_for_matching(want, SPAN_TIMEOUT, SETTLE, |s| {
        s.url_path().is_some_and(|p| p.starts_with("/pipe/"))
    })?;
    ensure!(
        spans.len() == want,
        "{} spans for {} pipelined exchanges",
        spans.len(),
        conns * each
    );
    for s in &spans {
        let Some((asked, got)) = pipelined_pairing(s) else {
            continue;
        };
        ensure!(
            got == Some(asked),
            "{} span {:?} reports status {got:?}, its response was {asked}",
            if s.is_server() { "server" } else { "client" },
            s.url_path()
        );
    }
    agent.stop()?;
    Ok(())
}

/// Past what one call's capture holds (200 KB of pipelined requests in one write): the client's
/// requests beyond it are not seen, and each one lost is counted (its response unmatched, or
/// its request unanswered); no request is paired with another's response.
#[test]
fn pipelined_requests_beyond_the_capture_are_counted_one_by_one() -> Result<()> {
    let _g = serial();
    require!(Python);
    let rx = Receiver::start()?;
    let py = Server::python(None)?;
    let agent = AgentBuilder::new().otlp(&rx, Protocol::Grpc).metrics().start()?;
    let before = agent.metrics()?;

    let (conns, each) = (2, 200);
    let out = hostile("pipeline", py.port, &[&conns.to_string(), &each.to_string(), "1000"])?;
    ensure!(out["ok"] == conns * each, "{out}");

    let pipelined = |s: &agent_integration_tests::CollectedSpan| s.url_path().is_some_and(|p| p.starts_with("/pipe/"));
    // The server reads in small calls: it sees every request.
    rx.wait_for_matching(conns * each, SPAN_TIMEOUT, SETTLE, |s| pipelined(s) && s.is_server())?;
    let m = agent.wait_metrics(Duration::from_secs(10), |m| {
        rejected(m, "messages_hidden") >= rejected(&before, "messages_hidden") + conns as f64
    })?;
    let spans = rx.matching(pipelined);
    let mut answered = 0;
    let mut unanswered = 0;
    for s in &spans {
        let Some((asked, got)) = pipelined_pairing(s) else {
            continue;
        };
        match got {
            Some(got) => ensure!(
                got == asked,
                "{:?} reports status {got}, its response was {asked}",
                s.url_path()
            ),
            None => unanswered += 1,
        }
        answered += usize::from(s.is_client() && got.is_some());
    }
    ensure!(
        spans.iter().filter(|s| s.is_server()).count() == conns * each,
        "server spans: every request should be seen"
    );
    let unmatched = rejected(&m, "unmatched_response") - rejected(&before, "unmatched_response");
    println!("client side: {answered} answered, {unanswered} unanswered, {unmatched} responses unmatched");
    ensure!(
        answered + unanswered + unmatched as usize == conns * each,
        "every client request is a span or a counted loss: {answered} answered + {unanswered} unanswered + {unmatched} unmatched != {}",
        conns * each
    );
    agent.stop()?;
    Ok(())
}
