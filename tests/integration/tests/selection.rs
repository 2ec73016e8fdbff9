//! Process selection as users set it (`--trace-*`, `--ignore-*`): what is not selected never
//! reaches the collector and is counted where it stopped — in the kernel, before anything is
//! copied, for ports and for processes the agent has already decided on.
//!
//! Needs root, the release agent, python3, node and curl (skips outside CI when missing, panics
//! with CI=true).

use std::time::Duration;

use agent_integration_tests::{
    Receiver,
    harness::{AgentBuilder, ContainerCgroup, Protocol, Server, curl, now_ns, serial, unique_path},
    require,
};
use anyhow::{Context as _, Result, ensure};

const SPAN_TIMEOUT: Duration = Duration::from_secs(20);

/// `n` requests for `path-i` on `srv`, all answered.
fn requests(srv: &Server, path: &str, n: usize) -> Result<()> {
    let urls: Vec<String> = (0..n).map(|i| srv.url(&format!("{path}-{i}"))).collect();
    ensure!(curl(&urls, &[])?.iter().all(|t| t.status == 200), "the server failed");
    Ok(())
}

/// Three servers; `--trace-port A,B --ignore-port B`: A's exchanges are exported (both ends),
/// B's (ignored) and C's (not listed) are not, and the kernel counts their calls as unselected.
#[test]
fn ports_not_selected_are_stopped_in_the_kernel() -> Result<()> {
    let _g = serial();
    require!(Python, Curl);
    let (a, b, c) = (Server::python(None)?, Server::python(None)?, Server::python(None)?);
    let rx = Receiver::start()?;
    let agent = AgentBuilder::new()
        .otlp(&rx, Protocol::HttpProtobuf)
        .arg(format!("--trace-port={},{}", a.port, b.port))
        .arg(format!("--ignore-port={}", b.port))
        .metrics()
        .start()?;
    let base = unique_path("ports");
    for (srv, tag) in [(&b, "b"), (&c, "c"), (&a, "a")] {
        requests(srv, &format!("{base}/{tag}"), 5)?;
    }
    let prefix = format!("{base}/a-");
    rx.wait_for_matching(10, SPAN_TIMEOUT, Duration::from_millis(1500), |s| {
        s.url_path().is_some_and(|p| p.starts_with(&prefix))
    })
    .context("the selected port's spans")?;
    let others: Vec<String> = rx
        .matching(|s| {
            s.url_path()
                .is_some_and(|p| p.starts_with(&base) && !p.starts_with(&prefix))
        })
        .iter()
        .map(|s| format!("{} {}", s.kind, s.url_path().unwrap_or("")))
        .collect();
    ensure!(others.is_empty(), "ports not selected were traced: {others:?}");
    let m = agent.metrics()?;
    let kernel = m.value("sockspan_events_unselected_total", Some(r#"where="kernel""#));
    ensure!(
        kernel.is_some_and(|n| n >= 20.0),
        "the unselected servers' reads and writes stop in the kernel (≥ 2 per exchange and end): {kernel:?}"
    );
    agent.stop()?;
    Ok(())
}

/// Selection by executable and by cgroup: `--ignore-exe 'node*'` leaves out the Node.js
/// server, `--ignore-cgroup` with the container id of a Python server moved into a container's
/// cgroup leaves out that one; another Python server is traced (curl, selected, still makes its
/// client spans). After each process's first events, the kernel stops its calls.
#[test]
fn processes_selected_by_executable_and_cgroup() -> Result<()> {
    let _g = serial();
    require!(Python, Node, Curl);
    let (node, kept, boxed) = (Server::node(None)?, Server::python(None)?, Server::python(None)?);
    let id = format!("{:016x}", now_ns()).repeat(4);
    let _cgroup = ContainerCgroup::enter(&id, boxed.guard.pid())?;
    let rx = Receiver::start()?;
    let agent = AgentBuilder::new()
        .otlp(&rx, Protocol::HttpProtobuf)
        .arg("--ignore-exe=node*")
        .arg(format!("--ignore-cgroup={}", &id[..12]))
        .metrics()
        .start()?;
    let base = unique_path("procs");
    for _ in 0..2 {
        for (srv, tag) in [(&node, "node"), (&boxed, "boxed"), (&kept, "kept")] {
            requests(srv, &format!("{base}/{tag}"), 5)?;
        }
    }
    let prefix = format!("{base}/kept-");
    let kept_spans = rx
        .wait_for_matching(10, SPAN_TIMEOUT, Duration::from_millis(1500), |s| {
            s.is_server() && s.url_path().is_some_and(|p| p.starts_with(&prefix))
        })
        .context("the selected server's spans")?;
    ensure!(kept_spans.len() == 10, "each of the kept server's 10 requests once");
    let traced_servers: Vec<String> = rx
        .matching(|s| {
            s.is_server()
                && s.url_path()
                    .is_some_and(|p| p.starts_with(&base) && !p.starts_with(&prefix))
        })
        .iter()
        .map(|s| format!("{} {}", s.service_name().unwrap_or(""), s.url_path().unwrap_or("")))
        .collect();
    ensure!(
        traced_servers.is_empty(),
        "processes not selected were traced: {traced_servers:?}"
    );
    let m = agent.metrics()?;
    let at = |w: &str| m.value("sockspan_events_unselected_total", Some(&format!("where=\"{w}\"")));
    ensure!(
        at("kernel").is_some_and(|n| n > 0.0) && at("agent").is_some_and(|n| n > 0.0),
        "decided in the agent on their first events, then stopped in the kernel: kernel {:?}, agent {:?}",
        at("kernel"),
        at("agent")
    );
    agent.stop()?;
    Ok(())
}

/// A container left out by `--ignore-cgroup` stops in the kernel from its processes' first call:
/// its cgroup is marked when the agent starts (and as new ones appear), so nothing of it reaches
/// the agent, and its server spans never exist; a server outside it is traced.
#[test]
fn cgroups_not_selected_stop_in_the_kernel_from_the_first_call() -> Result<()> {
    let _g = serial();
    require!(Python, Curl);
    let (kept, boxed) = (Server::python(None)?, Server::python(None)?);
    let id = format!("{:016x}", now_ns() ^ 0x5eed).repeat(4);
    let _cgroup = ContainerCgroup::enter(&id, boxed.guard.pid())?;
    let rx = Receiver::start()?;
    let agent = AgentBuilder::new()
        .otlp(&rx, Protocol::HttpProtobuf)
        .arg(format!("--ignore-cgroup={}", &id[..12]))
        .metrics()
        .start()?;
    let base = unique_path("cgroups");
    requests(&boxed, &format!("{base}/boxed"), 10)?;
    requests(&kept, &format!("{base}/kept"), 5)?;
    let prefix = format!("{base}/kept-");
    rx.wait_for_matching(10, SPAN_TIMEOUT, Duration::from_millis(1500), |s| {
        s.url_path().is_some_and(|p| p.starts_with(&prefix))
    })
    .context("the selected server's spans")?;
    let boxed_servers = rx
        .matching(|s| s.is_server() && s.url_path().is_some_and(|p| p.starts_with(&format!("{base}/boxed"))))
        .len();
    ensure!(
        boxed_servers == 0,
        "{boxed_servers} server spans of the container left out"
    );
    let m = agent.metrics()?;
    let at = |w: &str| m.value("sockspan_events_unselected_total", Some(&format!("where=\"{w}\"")));
    ensure!(
        at("kernel").is_some_and(|n| n >= 20.0) && at("agent") == Some(0.0),
        "every call of the container stops in the kernel: kernel {:?}, agent {:?}",
        at("kernel"),
        at("agent")
    );
    agent.stop()?;
    Ok(())
}
