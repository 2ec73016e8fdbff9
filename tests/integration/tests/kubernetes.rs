//! Kubernetes metadata on spans, as in a DaemonSet: the agent lists and watches this node's
//! pods (asking the API server for `spec.nodeName=NODE_NAME` only) and gives each process in a
//! pod its pod's attributes and service name. The API server is a stand-in serving the pod
//! endpoints as the real one does (`tests/fixtures/kube_api.py`; no cluster can run here); the
//! servers run in real cgroups named as the kubelet names a pod's containers.
//!
//! Needs root, the release agent, python3 and curl (skips outside CI when missing, panics with
//! CI=true).

use std::{io::Write as _, net::TcpStream, process::Command, time::Duration};

use agent_integration_tests::{
    CollectedSpan, Receiver,
    harness::{
        AgentBuilder, ContainerCgroup, ProcessGuard, Protocol, Server, TempDir, curl, fixture, free_port, serial,
        unique_path, wait_for_port,
    },
    require,
};
use anyhow::{Context as _, Result, ensure};
use serde_json::json;

const NODE: &str = "node-k8s-1";

fn pod(name: &str, uid: &str, node: &str, labels: serde_json::Value, owner: (&str, &str)) -> serde_json::Value {
    json!({
        "metadata": {
            "name": name, "namespace": "shop", "uid": uid, "labels": labels,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": owner.0, "name": owner.1, "controller": true}]
        },
        "spec": {"nodeName": node}
    })
}

/// Adds a pod to the stand-in API (its watchers get it as ADDED).
fn add_pod(port: u16, pod: &serde_json::Value) -> Result<()> {
    let body = pod.to_string();
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    write!(
        s,
        "POST /control/pods HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    std::io::Read::read_to_string(&mut s, &mut out)?;
    ensure!(out.starts_with("HTTP/1.1 201"), "add pod: {out}");
    Ok(())
}

/// The server span of `path`, once both of its exchange's spans arrived.
fn server_span(rx: &Receiver, srv: &Server, path: &str) -> Result<CollectedSpan> {
    ensure!(curl(&[srv.url(path)], &[])?[0].status == 200);
    let spans = rx.wait_for_matching(2, Duration::from_secs(20), Duration::ZERO, |s| {
        s.url_path() == Some(path)
    })?;
    spans.into_iter().find(|s| s.is_server()).context("a server span")
}

#[test]
fn pods_of_this_node_on_spans() -> Result<()> {
    let _g = serial();
    require!(Python, Curl);
    let (uid_a, uid_b) = (
        "4a3c9b1e-7d2f-4c8a-9e6b-1f0d2c3b4a59",
        "9b8a7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d",
    );
    let dir = TempDir::new("kube")?;
    let pods = dir.path().join("pods.json");
    std::fs::write(
        &pods,
        json!([
            pod(
                "checkout-7d9f8b6c5d-x2k4p",
                uid_a,
                NODE,
                json!({"pod-template-hash": "7d9f8b6c5d", "app.kubernetes.io/name": "checkout-api"}),
                ("ReplicaSet", "checkout-7d9f8b6c5d")
            ),
            pod(
                "elsewhere-0",
                "00000000-0000-4000-8000-000000000000",
                "node-other",
                json!({}),
                ("StatefulSet", "elsewhere")
            ),
        ])
        .to_string(),
    )?;
    let api_port = free_port();
    let mut cmd = Command::new("python3");
    cmd.arg("-u")
        .arg(fixture("kube_api.py"))
        .arg(api_port.to_string())
        .arg(&pods);
    let mut api = ProcessGuard::spawn("kube-api", &mut cmd)?;
    wait_for_port(api_port, Duration::from_secs(10), || api.check_alive())?;

    // Pod A's container runs before the agent starts; pod B's comes later, its pod too.
    let a = Server::python(None)?;
    let _cg_a = ContainerCgroup::enter_at(
        &format!("kubepods/besteffort/pod{uid_a}/{}", "a1".repeat(32)),
        a.guard.pid(),
    )?;
    let rx = Receiver::start()?;
    let agent = AgentBuilder::new()
        .otlp(&rx, Protocol::HttpProtobuf)
        .arg(format!("--kubernetes-api=http://127.0.0.1:{api_port}"))
        .env("NODE_NAME", NODE)
        .metrics()
        .start()?;

    let s = server_span(&rx, &a, &unique_path("kube"))?;
    let want = [
        ("k8s.pod.name", "checkout-7d9f8b6c5d-x2k4p"),
        ("k8s.pod.uid", uid_a),
        ("k8s.namespace.name", "shop"),
        ("k8s.node.name", NODE),
        ("k8s.deployment.name", "checkout"),
        ("service.name", "checkout-api"),
        ("host.name", NODE),
    ];
    for (k, v) in want {
        ensure!(
            s.res_str(k) == Some(v),
            "pod A's span: {k} = {:?}, want {v}\n{:?}",
            s.res_str(k),
            s.resource
        );
    }

    add_pod(
        api_port,
        &pod("ledger-0", uid_b, NODE, json!({}), ("StatefulSet", "ledger")),
    )?;
    let b = Server::python(Some("ledger-svc"))?;
    let _cg_b = ContainerCgroup::enter_at(
        &format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{}.scope",
            uid_b.replace('-', "_"),
            "b2".repeat(32)
        ),
        b.guard.pid(),
    )?;
    let s = server_span(&rx, &b, &unique_path("kube"))?;
    for (k, v) in [
        ("k8s.pod.name", "ledger-0"),
        ("k8s.statefulset.name", "ledger"),
        // the process's own OTEL_SERVICE_NAME wins over the pod's
        ("service.name", "ledger-svc"),
    ] {
        ensure!(
            s.res_str(k) == Some(v),
            "pod B's span (watched after start): {k} = {:?}, want {v}\n{:?}",
            s.res_str(k),
            s.resource
        );
    }

    // Pod C's container sends before the API server tells of its pod: its span waits for it.
    let uid_c = "c0ffee00-1111-4222-8333-444455556666";
    let c = Server::python(None)?;
    let _cg_c = ContainerCgroup::enter_at(
        &format!("kubepods/burstable/pod{uid_c}/{}", "c3".repeat(32)),
        c.guard.pid(),
    )?;
    // Three requests, so several spans of one process wait together.
    let path = unique_path("kube");
    let urls: Vec<String> = (0..3).map(|i| c.url(&format!("{path}-{i}"))).collect();
    ensure!(curl(&urls, &[])?.iter().all(|t| t.status == 200));
    std::thread::sleep(Duration::from_millis(600));
    add_pod(
        api_port,
        &pod(
            "report-8f7e6d5c4b-q9w8e",
            uid_c,
            NODE,
            json!({"pod-template-hash": "8f7e6d5c4b"}),
            ("ReplicaSet", "report-8f7e6d5c4b"),
        ),
    )?;
    let prefix = format!("{path}-");
    let spans = rx.wait_for_matching(6, Duration::from_secs(20), Duration::ZERO, |s| {
        s.url_path().is_some_and(|p| p.starts_with(&prefix))
    })?;
    let servers: Vec<&CollectedSpan> = spans.iter().filter(|s| s.is_server()).collect();
    ensure!(servers.len() == 3, "pod C's three server spans: {}", servers.len());
    for s in servers {
        for (k, v) in [
            ("k8s.pod.name", "report-8f7e6d5c4b-q9w8e"),
            ("k8s.deployment.name", "report"),
            ("service.name", "report"),
        ] {
            ensure!(
                s.res_str(k) == Some(v),
                "pod C's span, which waited for its pod: {k} = {:?}, want {v}\n{:?}",
                s.res_str(k),
                s.resource
            );
        }
    }

    let m = agent.metrics()?;
    ensure!(
        m.get("sockspan_spans_without_kubernetes_metadata_total") == 0.0,
        "no span went out without its pod's metadata: {}",
        m.get("sockspan_spans_without_kubernetes_metadata_total")
    );
    ensure!(
        m.get("sockspan_kubernetes_pods") == 3.0,
        "this node's three pods, not the other node's: {}",
        m.get("sockspan_kubernetes_pods")
    );
    agent.stop()?;
    Ok(())
}
