//! The collector misbehaves, the agent is killed: what users of a node-wide agent must be able
//! to rely on. A collector down at start, refusing with 503, refusing large requests (413) or
//! answering seconds late: spans are retried or dropped and counted, export resumes by itself,
//! and the applications never wait. `kill -9`: nothing stays attached.
//!
//! Needs root, the release agent, python3, curl and bpftool; skips outside CI when missing,
//! panics with CI=true.

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::TcpStream,
    process::Command,
    time::{Duration, Instant},
};

use agent_integration_tests::{
    Receiver,
    harness::{AgentBuilder, Protocol, Server, curl, free_port, serial, unique_path},
    receiver::Fault,
    require,
};
use anyhow::{Context as _, Result, bail, ensure};

const SPAN_TIMEOUT: Duration = Duration::from_secs(20);

/// Sends `n` requests for `path-i` and waits until both spans of each reached `rx`.
fn traced(rx: &Receiver, srv: &Server, path: &str, n: usize) -> Result<()> {
    let urls: Vec<String> = (0..n).map(|i| srv.url(&format!("{path}-{i}"))).collect();
    ensure!(curl(&urls, &[])?.iter().all(|t| t.status == 200), "the server failed");
    let prefix = format!("{path}-");
    rx.wait_for_matching(2 * n, SPAN_TIMEOUT, Duration::ZERO, |s| {
        s.url_path().is_some_and(|p| p.starts_with(&prefix))
    })
    .map(drop)
}

/// The collector is not there when the agent starts: exports fail (counted, `unreachable`),
/// then the collector comes up at the same address and spans flow without a restart.
#[test]
fn collector_down_at_start_then_up_resumes_by_itself() -> Result<()> {
    let _g = serial();
    require!(Python, Curl);
    let srv = Server::python(None)?;
    for proto in [Protocol::HttpProtobuf, Protocol::Grpc] {
        let (grpc, http) = (free_port(), free_port());
        let endpoint = match proto {
            Protocol::Grpc => format!("http://127.0.0.1:{grpc}"),
            _ => format!("http://127.0.0.1:{http}"),
        };
        let agent = AgentBuilder::new()
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", proto.as_env())
            .env("OTEL_BSP_SCHEDULE_DELAY", "200")
            .metrics()
            .start()?;
        let base = unique_path("down-at-start");
        let urls: Vec<String> = (0..5).map(|i| srv.url(&format!("{base}/{i}"))).collect();
        ensure!(curl(&urls, &[])?.iter().all(|t| t.status == 200));
        let m = agent.wait_metrics(SPAN_TIMEOUT, |m| {
            m.value("sockspan_export_requests_failed_total", Some(r#"reason="unreachable""#))
                .unwrap_or(0.0)
                > 0.0
        })?;
        ensure!(
            m.value("sockspan_spans_dropped_total", Some(r#"reason="export_failed""#)) > Some(0.0),
            "{proto:?}: spans sent to nobody must be counted dropped:\n{}",
            m.text
        );
        let rx = Receiver::start_on(grpc, http)?;
        // The backoff after the failures is at most a few seconds here: keep sending until
        // a request's spans arrive.
        let deadline = Instant::now() + Duration::from_secs(40);
        let mut i = 0;
        loop {
            let path = format!("{base}/after{i}");
            ensure!(curl(&[srv.url(&path)], &[])?[0].status == 200);
            let arrived = rx
                .wait_for_matching(2, Duration::from_secs(2), Duration::ZERO, |s| {
                    s.url_path() == Some(path.as_str())
                })
                .is_ok();
            if arrived {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "{proto:?}: no span reached the collector 40 s after it came up"
            );
            i += 1;
        }
        eprintln!("{proto:?}: export resumed after {} more requests", i + 1);
        agent.stop()?;
    }
    Ok(())
}

/// A collector answering 503 (gRPC `Unavailable`) a few times: the exporter retries with
/// backoff and jitter, and no span is lost.
#[test]
fn collector_refusing_with_503_is_retried_without_loss() -> Result<()> {
    let _g = serial();
    require!(Python, Curl);
    let srv = Server::python(None)?;
    for proto in [Protocol::HttpProtobuf, Protocol::Grpc] {
        let rx = Receiver::start()?;
        rx.set_fault(Fault {
            unavailable: 2,
            ..Fault::default()
        });
        let agent = AgentBuilder::new()
            .otlp(&rx, proto)
            .env("OTEL_BSP_SCHEDULE_DELAY", "200")
            .metrics()
            .start()?;
        traced(&rx, &srv, &unique_path("refused-503"), 3).with_context(|| format!("{proto:?}"))?;
        ensure!(
            rx.refused() == 2,
            "{proto:?}: {} requests refused, want 2",
            rx.refused()
        );
        let m = agent.metrics()?;
        ensure!(
            m.value("sockspan_spans_dropped_total", Some(r#"reason="export_failed""#)) == Some(0.0),
            "{proto:?}: retried requests must not drop spans:\n{}",
            m.text
        );
        agent.stop()?;
    }
    Ok(())
}

/// A collector that refuses requests over 8 spans as too large (HTTP 413): each refusal drops
/// its request's spans (counted) and halves the requests; export then goes on in requests the
/// collector takes, and every span of a later wave arrives.
#[test]
fn collector_refusing_large_requests_gets_smaller_ones() -> Result<()> {
    let _g = serial();
    require!(Python, Curl);
    let srv = Server::python(None)?;
    let rx = Receiver::start()?;
    rx.set_fault(Fault {
        max_spans: Some(8),
        ..Fault::default()
    });
    let agent = AgentBuilder::new()
        .otlp(&rx, Protocol::HttpProtobuf)
        .env("OTEL_BSP_SCHEDULE_DELAY", "500")
        .env("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "64")
        .metrics()
        .start()?;
    let base = unique_path("too-large");
    let mut waves = 0;
    loop {
        // 20 requests (40 spans, more than 8) within one schedule delay.
        let path = format!("{base}/w{waves}");
        if traced(&rx, &srv, &path, 20).is_ok() {
            break;
        }
        waves += 1;
        ensure!(
            waves < 8,
            "no wave arrived whole after {waves}:\n{}",
            agent.metrics()?.text
        );
    }
    let m = agent.metrics()?;
    // Requests are split by process too, so the limit may stop above 8.
    let limit = m.get("sockspan_export_batch_limit_spans");
    ensure!(limit < 64.0, "batch limit {limit} after 413s");
    ensure!(
        m.value("sockspan_export_requests_failed_total", Some(r#"reason="too_large""#)) == Some(rx.refused() as f64),
        "{} requests refused, not all counted too_large:\n{}",
        rx.refused(),
        m.text
    );
    eprintln!("a whole wave arrived after {waves} lost; batch limit now {limit}");
    agent.stop()?;
    Ok(())
}

/// One request over a new connection; its duration.
fn timed_get(port: u16, path: &str) -> Result<Duration> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    ensure!(raw.starts_with(b"HTTP/1.") && raw.windows(5).any(|w| w == b" 200 "));
    Ok(t0.elapsed())
}

/// Median and 99th percentile, in µs.
fn percentiles(mut d: Vec<Duration>) -> (u128, u128) {
    d.sort();
    let at = |q: f64| d[((d.len() - 1) as f64 * q) as usize].as_micros();
    (at(0.5), at(0.99))
}

/// A collector that takes 2 s to answer each request: the applications' requests do not wait
/// for it (their latency is printed beside a prompt collector's, for docs/reliability.md), and
/// every span is exported or counted.
#[test]
fn slow_collector_never_slows_the_application() -> Result<()> {
    let _g = serial();
    require!(Python, Curl);
    let srv = Server::python(None)?;
    let mut figures = Vec::new();
    for delay in [Duration::ZERO, Duration::from_secs(2)] {
        let rx = Receiver::start()?;
        rx.set_fault(Fault {
            delay,
            ..Fault::default()
        });
        let agent = AgentBuilder::new()
            .otlp(&rx, Protocol::HttpProtobuf)
            .env("OTEL_BSP_SCHEDULE_DELAY", "200")
            .metrics()
            .start()?;
        let base = unique_path("slow-collector");
        let took: Vec<Duration> = (0..300)
            .map(|i| timed_get(srv.port, &format!("{base}/{i}")))
            .collect::<Result<_>>()?;
        let (p50, p99) = percentiles(took);
        figures.push(format!(
            "collector answering after {delay:?}: p50 {p50} µs, p99 {p99} µs"
        ));
        // Every span gets out in the end (a few requests of up to 512 spans each).
        rx.wait_for_matching(600, Duration::from_secs(30), Duration::ZERO, |s| {
            s.url_path().is_some_and(|p| p.starts_with(&base))
        })?;
        agent.stop()?;
    }
    eprintln!(
        "application latency, 300 requests one after another: {}",
        figures.join("; ")
    );
    Ok(())
}

/// The ids of the BPF programs the process `pid` holds (from its descriptors' fdinfo).
fn prog_ids(pid: u32) -> BTreeSet<u32> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return BTreeSet::new();
    };
    fds.flatten()
        .filter_map(|f| std::fs::read_to_string(f.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("prog_id:").and_then(|v| v.trim().parse().ok()))
        })
        .collect()
}

/// The ids of every BPF program loaded on the machine.
fn loaded_progs() -> Result<BTreeSet<u32>> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .context("bpftool")?;
    ensure!(
        out.status.success(),
        "bpftool prog show: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["id"].as_u64().map(|id| id as u32))
        .collect())
}

/// `kill -9`: the kernel drops the agent's programs with its last descriptor, so nothing stays
/// attached, and the application serving meanwhile never notices.
#[test]
fn kill_9_leaves_nothing_attached() -> Result<()> {
    let _g = serial();
    require!(Python, Curl);
    let srv = Server::python(None)?;
    let mut agent = AgentBuilder::new().arg("--print=json").start()?;
    let path = unique_path("before-kill");
    ensure!(curl(&[srv.url(&path)], &[])?[0].status == 200);
    agent.wait_stdout(SPAN_TIMEOUT, |l| l.contains(&path))?;
    let held = prog_ids(agent.pid());
    ensure!(!held.is_empty(), "the running agent holds no BPF program");
    ensure!(
        loaded_progs()?.is_superset(&held),
        "bpftool does not list the agent's programs"
    );
    let pid = agent.pid() as i32;
    // SAFETY: kill(2) on the agent's pid, a child of this test.
    ensure!(unsafe { libc::kill(pid, libc::SIGKILL) } == 0, "kill -9 {pid}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.is_running() {
        ensure!(Instant::now() < deadline, "the agent survived SIGKILL");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Programs go once the kernel has released the last reference (after an RCU grace period).
    let left = loop {
        let left: BTreeSet<u32> = loaded_progs()?.intersection(&held).copied().collect();
        if left.is_empty() || Instant::now() >= deadline {
            break left;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if !left.is_empty() {
        bail!("programs {left:?} of the killed agent are still loaded");
    }
    let after = curl(&[srv.url(&unique_path("after-kill"))], &[])?;
    ensure!(
        after[0].status == 200,
        "the server stopped answering after the agent was killed"
    );
    eprintln!("{} programs held by the agent, none left after kill -9", held.len());
    Ok(())
}
