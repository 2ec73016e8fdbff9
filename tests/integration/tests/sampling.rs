//! Sampling as users set it: the standard `OTEL_TRACES_SAMPLER` keeps a share of whole traces
//! and follows a caller's decision; `--tail-sampling` keeps every trace with an error or slower
//! than a threshold, whole, and drops the rest; what is left out is counted.
//!
//! Needs root, the release agent, python3, curl, nginx and node (skips outside CI when missing,
//! panics with CI=true).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::Duration,
};

use agent_integration_tests::{
    CollectedSpan, Receiver,
    harness::{AgentBuilder, Protocol, Server, curl, serial, unique_path},
    require,
    topology::{ExpectedSpan, RunConfig, Topology, expected_spans, in_run, run_load, run_token, truth},
};
use anyhow::{Context as _, Result, ensure};

/// Requests sent with no trace context: each is a trace of two spans (curl's and the server's).
const LOCAL: usize = 400;
/// Requests sent with a `traceparent`, per sampled flag.
const PROPAGATED: usize = 20;
const RATIO: f64 = 0.25;

/// The spans of `spans` by the last segment of their path.
fn by_request<'a>(spans: &'a [CollectedSpan], prefix: &str) -> BTreeMap<String, Vec<&'a CollectedSpan>> {
    let mut m: BTreeMap<String, Vec<&CollectedSpan>> = BTreeMap::new();
    for s in spans {
        if let Some(rest) = s.url_path().and_then(|p| p.strip_prefix(prefix)) {
            m.entry(rest.to_owned()).or_default().push(s);
        }
    }
    m
}

/// `OTEL_TRACES_SAMPLER=parentbased_traceidratio`, `_ARG=0.25`: of 400 requests that start
/// their trace here, a quarter (within 5 standard deviations) reach the collector, each with both
/// its spans in one trace; the 20 whose caller sent `traceparent` flags `01` all do, in the
/// caller's trace; the 20 with flags `00` none do. The books balance, the spans left out counted.
#[test]
fn head_sampling_keeps_a_share_of_whole_traces_and_follows_the_caller() -> Result<()> {
    let _g = serial();
    require!(Python, Curl);
    let srv = Server::python(None)?;
    let rx = Receiver::start()?;
    let agent = AgentBuilder::new()
        .otlp(&rx, Protocol::HttpProtobuf)
        .env("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
        .env("OTEL_TRACES_SAMPLER_ARG", RATIO.to_string())
        .metrics()
        .start()?;
    let base = unique_path("headsampling");
    let urls: Vec<String> = (0..LOCAL).map(|i| srv.url(&format!("{base}/local-{i}"))).collect();
    ensure!(curl(&urls, &[])?.iter().all(|t| t.status == 200), "the server failed");
    for (flags, tag) in [("01", "sampled"), ("00", "unsampled")] {
        for i in 0..PROPAGATED {
            let trace = format!(
                "{:032x}",
                0x5a3e_0000_0000_0000_0000_0000_0000_0000u128 + (i as u128) * 7919 + 1
            );
            let header = format!("traceparent: 00-{trace}-00f067aa0ba902b7-{flags}");
            let url = srv.url(&format!("{base}/{tag}-{i}"));
            ensure!(curl(&[url], &["-H", &header])?[0].status == 200);
        }
    }
    let spans_made = 2 * (LOCAL + 2 * PROPAGATED);
    agent.wait_metrics(Duration::from_secs(30), |m| {
        m.get("sockspan_spans_created_total") >= spans_made as f64
    })?;
    agent.check_accounting()?;
    let m = agent.metrics()?;
    let spans = rx.spans();
    let got = by_request(&spans, &format!("{base}/"));

    let local: Vec<_> = got.iter().filter(|(k, _)| k.starts_with("local-")).collect();
    for (req, s) in &local {
        ensure!(
            s.len() == 2 && s[0].trace_id == s[1].trace_id,
            "a kept trace is whole: {req} has {} spans",
            s.len()
        );
    }
    let kept = local.len() as f64;
    eprintln!("head sampling at {RATIO}: {kept} of {LOCAL} local traces kept");
    let (mean, sd) = (LOCAL as f64 * RATIO, (LOCAL as f64 * RATIO * (1.0 - RATIO)).sqrt());
    ensure!(
        (kept - mean).abs() < 5.0 * sd,
        "{kept} of {LOCAL} local traces kept, expected {mean} ± {:.0}",
        5.0 * sd
    );
    for i in 0..PROPAGATED {
        let s = got.get(&format!("sampled-{i}")).map_or(&[][..], Vec::as_slice);
        ensure!(
            s.len() == 2 && s.iter().all(|s| s.trace_id.starts_with("5a3e")),
            "the caller sampled sampled-{i}: both its spans are kept, in the caller's trace: {} spans",
            s.len()
        );
    }
    ensure!(
        !got.keys().any(|k| k.starts_with("unsampled-")),
        "the caller sampled these out: none is kept"
    );
    let head_out = m.value("sockspan_spans_sampled_out_total", Some(r#"sampler="head""#));
    // At least: the node's other traffic (this test polling the metrics) is sampled too.
    let want = 2.0 * (LOCAL as f64 - kept) + 2.0 * PROPAGATED as f64;
    ensure!(
        head_out >= Some(want),
        "spans sampled out counted: {head_out:?}, want {want}\n{}",
        m.text
    );
    agent.stop()?;
    Ok(())
}

/// `--tail-sampling --tail-slower-than 250ms --tail-ratio 0` on the checkout topology: of 14
/// checkouts, the two whose orders service called a failing payment endpoint (a 500; ids 3 and
/// 13) and the two whose payment timed out and was retried (over 300 ms; ids 5 and 12) reach the
/// collector with every span of their tree; the ten fast, successful ones do not reach it at
/// all; the decisions and the spans left out are counted.
#[test]
fn tail_sampling_keeps_every_error_and_slow_trace_whole() -> Result<()> {
    let _g = serial();
    require!(Python, Nginx, Node);
    let rx = Receiver::start()?;
    let agent = AgentBuilder::new()
        .otlp(&rx, Protocol::Grpc)
        .arg("--tail-sampling")
        .arg("--tail-slower-than=250ms")
        .arg("--tail-ratio=0")
        .metrics()
        .start()?;
    let topo = Topology::start().context("start the topology")?;
    // One at a time: every parent in the tree is then certain, so a trace is never split.
    let cfg = RunConfig {
        run: run_token(),
        count: 14,
        concurrency: 1,
        client_keepalive: true,
        upstream_keepalive: true,
    };
    let load = run_load(&topo, &cfg)?;
    ensure!(
        load.iter().all(|r| r.status == 200),
        "every checkout succeeds: {load:?}"
    );
    let truth = truth(&topo, &cfg.run);
    let notable: BTreeSet<&str> = load
        .iter()
        .map(|r| r.id.as_str())
        .filter(|id| {
            let failed = truth.orders.get(*id).is_some_and(|o| o.fail_called);
            let retried = truth.payments_received.get(*id).is_some_and(|a| a.len() > 1);
            failed || retried
        })
        .collect();
    ensure!(
        notable.len() == 4,
        "the plan: 2 failing and 2 retried checkouts, got {notable:?}"
    );
    // Each trace is decided 2 s after its last span: wait for the kept ones' spans, then as
    // long again for any that should not come.
    let need: Vec<ExpectedSpan> = expected_spans(&cfg.run, &load, &truth)
        .into_iter()
        .filter(|e| !e.optional && e.path.split('/').nth(3).is_some_and(|id| notable.contains(id)))
        .collect();
    let _ = rx.wait_for_matching(need.len(), Duration::from_secs(30), Duration::ZERO, in_run(&cfg.run));
    std::thread::sleep(Duration::from_secs(3));
    agent.check_accounting()?;
    let m = agent.metrics()?;
    let spans = rx.matching(in_run(&cfg.run));
    let id_of = |s: &CollectedSpan| s.url_path().and_then(|p| p.split('/').nth(3)).map(str::to_owned);
    let exported: BTreeSet<String> = spans.iter().filter_map(id_of).collect();
    ensure!(
        exported.iter().map(String::as_str).collect::<BTreeSet<_>>() == notable,
        "exactly the failing and the slow checkouts are kept: {exported:?}, want {notable:?}"
    );
    // Every span the checkout's tree must have is there.
    let mut have: HashMap<(String, String, String), usize> = HashMap::new();
    for s in &spans {
        let key = (
            s.service_name().unwrap_or("").to_owned(),
            s.kind.clone(),
            s.url_path().unwrap_or("").to_owned(),
        );
        *have.entry(key).or_default() += 1;
    }
    for e in need {
        let id = e.path.split('/').nth(3).unwrap_or("");
        let key = (e.service.clone(), e.kind.to_owned(), e.path.clone());
        let n = have.get_mut(&key).filter(|n| **n > 0);
        ensure!(n.is_some(), "kept trace {id} lacks {} {} {}", e.service, e.kind, e.path);
        *n.unwrap() -= 1;
    }
    // The retried checkouts' timed-out attempt is an error too: all four are kept as errors.
    for (decision, at_least) in [("error", 4.0), ("dropped", 10.0)] {
        let n = m
            .value(
                "sockspan_tail_sampling_traces_total",
                Some(&format!("decision=\"{decision}\"")),
            )
            .unwrap_or(0.0);
        ensure!(
            n >= at_least,
            "{n} traces decided {decision}, want ≥ {at_least}\n{}",
            m.text
        );
    }
    ensure!(
        m.value("sockspan_spans_sampled_out_total", Some(r#"sampler="tail""#)) > Some(0.0),
        "the fast checkouts' spans are counted as sampled out"
    );
    agent.stop()?;
    Ok(())
}
