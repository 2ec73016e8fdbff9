//! End-to-end tests: the real agent (as root) watching real servers and clients, its spans
//! collected by an in-process OTLP receiver (or read from `--print=json`).
//!
//! Every request carries a unique path (`/e2e/<test>/r<seq>x<hex>...`) and assertions only look at
//! spans under it, because every agent sees all of the machine's traffic. Tests take a global lock
//! (and should also be run with `--test-threads=1`).

use std::time::Duration;

use agent_integration_tests::{
    CollectedSpan, Receiver,
    checks::{Exchange, Expect, Svc, check_exchange, describe, exchange_problems, one_exchange, under, with_path},
    harness::{
        Agent, AgentBuilder, ContainerCgroup, NGINX_BIG_FILE_SIZE, PreexistingClient, Protocol, Server, curl,
        free_port, node_client, now_ns, python_client, serial, statuses, tcp_peer_client, tcp_peer_server, unique_path,
    },
    require,
};
use anyhow::{Context as _, Result, bail, ensure};

/// How long spans may take to arrive (the agent batches every 200 ms).
const SPAN_TIMEOUT: Duration = Duration::from_secs(20);
/// After the expected spans arrived, wait this long so duplicates would show up too.
const SETTLE: Duration = Duration::from_millis(800);

#[allow(clippy::too_many_arguments)]
fn expect<'a>(
    method: &'a str,
    path: &'a str,
    route: &'a str,
    status: i64,
    port: u16,
    server: Svc<'a>,
    client: Svc<'a>,
    window: (u64, u64),
) -> Expect<'a> {
    Expect {
        method,
        path,
        route,
        status,
        server_port: port,
        version: "1.1",
        server_service: server,
        client_service: client,
        client_port: None,
        window,
    }
}

fn start_agent(rx: &Receiver, proto: Protocol) -> Result<Agent> {
    AgentBuilder::new().otlp(rx, proto).start()
}

/// Wait for one exchange (SERVER + CLIENT) per path; returns them in `paths` order.
fn exchanges(rx: &Receiver, prefix: &str, paths: &[String]) -> Result<Vec<Exchange>> {
    let spans = rx.wait_for_matching(2 * paths.len(), SPAN_TIMEOUT, SETTLE, under(prefix))?;
    paths.iter().map(|p| one_exchange(&spans, p)).collect()
}

/// The exchange's server span is the child of its client span, by the connection rule.
fn linked_by_connection(ex: &Exchange) -> Result<()> {
    ensure!(
        ex.server.parent_span_id.as_deref() == Some(ex.client.span_id.as_str())
            && ex.server.attr_str("sockspan.parent.source") == Some("connection"),
        "the server span should be the child of the client span by connection\n  {}\n  {}",
        ex.server,
        ex.client
    );
    Ok(())
}

fn assert_body_size(s: &CollectedSpan, key: &str, min: i64, max: i64) -> Result<()> {
    match s.attr_int(key) {
        Some(v) if v >= min && v <= max => Ok(()),
        other => bail!("{} {key} = {other:?}, want an int in [{min}, {max}]\n  {s}", s.kind),
    }
}

// ------------------------------------------------------------------------------------------------
// One exchange per server × client combination

#[test]
fn python_server_curl_client() -> Result<()> {
    let _g = serial();
    require!(Python, Curl);
    let rx = Receiver::start()?;
    // server started before the agent: the agent must learn about an already-running process
    let srv = Server::python(Some("py-e2e-svc"))?;
    let agent = start_agent(&rx, Protocol::HttpProtobuf)?;

    let path = unique_path("pycurl");
    let t0 = now_ns();
    let tr = curl(&[srv.url(&path)], &[])?;
    let t1 = now_ns();
    assert_eq!(tr[0].status, 200);

    let ex = &exchanges(&rx, &path, std::slice::from_ref(&path))?[0];
    let mut e = expect(
        "GET",
        &path,
        "/e2e/pycurl/{id}",
        200,
        srv.port,
        Svc::Exact("py-e2e-svc"),
        Svc::Exact("curl"),
        (t0, t1),
    );
    e.client_port = Some(tr[0].local_port);
    check_exchange(ex, &e)?;
    for s in [&ex.server, &ex.client] {
        ensure!(
            s.attr_str("user_agent.original")
                .is_some_and(|u| u.starts_with("curl/")),
            "{} user_agent.original: {s}",
            s.kind
        );
        assert_body_size(
            s,
            "http.response.body.size",
            tr[0].size_download as i64,
            tr[0].size_download as i64,
        )?;
        ensure!(
            s.attr("url.query").is_none_or(|q| q.as_str() == Some("")),
            "no query was sent, got url.query {:?}",
            s.attr("url.query")
        );
    }
    ensure!(
        ex.server
            .res_str("process.executable.name")
            .is_some_and(|n| n.starts_with("python")),
        "server executable: {}",
        ex.server.res_str("process.executable.name").unwrap_or("-")
    );
    agent.stop()?;
    Ok(())
}

#[test]
fn nginx_server_python_client_grpc() -> Result<()> {
    let _g = serial();
    require!(Nginx, Python);
    let rx = Receiver::start()?;
    // agent first, then nginx: the agent must pick up processes started after it
    let agent = start_agent(&rx, Protocol::Grpc)?;
    let srv = Server::nginx(None)?;

    let path = unique_path("ngxpy");
    let t0 = now_ns();
    let out = python_client(srv.port, &[&path])?;
    let t1 = now_ns();
    assert_eq!(statuses(&out), vec![200]);

    let ex = &exchanges(&rx, &path, std::slice::from_ref(&path))?[0];
    let mut e = expect(
        "GET",
        &path,
        "/e2e/ngxpy/{id}",
        200,
        srv.port,
        Svc::Exact("nginx"),
        Svc::Prefix("python"),
        (t0, t1),
    );
    e.client_port = out["local_port"].as_u64().map(|p| p as u16);
    check_exchange(ex, &e)?;
    assert_body_size(&ex.server, "http.response.body.size", 17, 17)?; // "hello from nginx\n"
    ensure!(ex.server.transport == agent_integration_tests::Transport::Grpc);
    agent.stop()?;
    Ok(())
}

#[test]
fn node_server_node_client() -> Result<()> {
    let _g = serial();
    require!(Node);
    let rx = Receiver::start()?;
    let srv = Server::node(Some("node-e2e-svc"))?;
    let agent = start_agent(&rx, Protocol::HttpProtobuf)?;

    let path = unique_path("nodenode");
    let t0 = now_ns();
    let out = node_client(srv.port, &[&path])?;
    let t1 = now_ns();
    assert_eq!(statuses(&out), vec![200]);

    let ex = &exchanges(&rx, &path, std::slice::from_ref(&path))?[0];
    let mut e = expect(
        "GET",
        &path,
        "/e2e/nodenode/{id}",
        200,
        srv.port,
        Svc::Exact("node-e2e-svc"),
        Svc::Exact("node"),
        (t0, t1),
    );
    e.client_port = out["responses"][0]["local_port"].as_u64().map(|p| p as u16);
    check_exchange(ex, &e)?;
    agent.stop()?;
    Ok(())
}

#[test]
fn nginx_server_curl_client() -> Result<()> {
    let _g = serial();
    require!(Nginx, Curl);
    let rx = Receiver::start()?;
    // nginx's setproctitle overwrites its environment block (/proc/PID/environ), so an
    // OTEL_SERVICE_NAME given to nginx cannot be observed: nginx is named by its executable.
    let srv = Server::nginx(None)?;
    let agent = start_agent(&rx, Protocol::HttpProtobuf)?;

    let path = format!("{}/smallfile", unique_path("ngxcurl"));
    let t0 = now_ns();
    let tr = curl(&[srv.url(&path)], &[])?;
    let t1 = now_ns();
    assert_eq!(tr[0].status, 200);

    let ex = &exchanges(&rx, &path, std::slice::from_ref(&path))?[0];
    let mut e = expect(
        "GET",
        &path,
        "/e2e/ngxcurl/{id}/smallfile",
        200,
        srv.port,
        Svc::Exact("nginx"),
        Svc::Exact("curl"),
        (t0, t1),
    );
    e.client_port = Some(tr[0].local_port);
    check_exchange(ex, &e)?;
    assert_body_size(
        &ex.server,
        "http.response.body.size",
        tr[0].size_download as i64,
        tr[0].size_download as i64,
    )?;
    agent.stop()?;
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Connection reuse

#[test]
fn keepalive_three_requests_on_one_connection() -> Result<()> {
    let _g = serial();
    require!(Python, Node, Curl);
    let rx = Receiver::start()?;
    let py = Server::python(None)?;
    let node = Server::node(None)?;
    // small batches: every export request must respect OTEL_BSP_MAX_EXPORT_BATCH_SIZE
    let agent = AgentBuilder::new()
        .otlp(&rx, Protocol::HttpProtobuf)
        .env("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "2")
        .start()?;

    // curl → python: three URLs in one invocation, one connection; the middle one is slow
    let base = unique_path("keepcurl");
    let paths = vec![format!("{base}/a"), format!("{base}/slow/300"), format!("{base}/c")];
    let t0 = now_ns();
    let tr = curl(&paths.iter().map(|p| py.url(p)).collect::<Vec<_>>(), &[])?;
    let t1 = now_ns();
    assert_eq!(
        tr.iter().map(|t| t.num_connects).collect::<Vec<_>>(),
        vec![1, 0, 0],
        "curl must reuse its connection"
    );
    let exs = exchanges(&rx, &base, &paths)?;
    let routes = [
        "/e2e/keepcurl/{id}/a",
        "/e2e/keepcurl/{id}/slow/{id}",
        "/e2e/keepcurl/{id}/c",
    ];
    for (i, ex) in exs.iter().enumerate() {
        let mut e = expect(
            "GET",
            &paths[i],
            routes[i],
            200,
            py.port,
            Svc::Prefix("python"),
            Svc::Exact("curl"),
            (t0, t1),
        );
        e.client_port = Some(tr[0].local_port);
        check_exchange(ex, &e)?;
    }
    for s in [&exs[1].server, &exs[1].client] {
        ensure!(
            s.duration() >= Duration::from_millis(290),
            "{} span of /slow/300 lasted {:?}, want ≥ 300 ms",
            s.kind,
            s.duration()
        );
        ensure!(
            s.duration() < Duration::from_secs(3),
            "{} span of /slow/300 lasted {:?}",
            s.kind,
            s.duration()
        );
    }
    // requests on one connection follow each other
    for w in exs.windows(2) {
        ensure!(
            w[0].server.end_ns <= w[1].server.start_ns,
            "server spans overlap:\n  {}\n  {}",
            w[0].server,
            w[1].server
        );
        ensure!(
            w[0].client.end_ns <= w[1].client.start_ns,
            "client spans overlap:\n  {}\n  {}",
            w[0].client,
            w[1].client
        );
    }

    // python http.client → node: three requests on one keep-alive connection
    let base = unique_path("keeppy");
    let paths = vec![format!("{base}/a"), format!("{base}/status/404"), format!("{base}/c")];
    let t0 = now_ns();
    let out = python_client(node.port, &paths.iter().map(String::as_str).collect::<Vec<_>>())?;
    let t1 = now_ns();
    assert_eq!(statuses(&out), vec![200, 404, 200]);
    let exs = exchanges(&rx, &base, &paths)?;
    let routes = [
        "/e2e/keeppy/{id}/a",
        "/e2e/keeppy/{id}/status/{id}",
        "/e2e/keeppy/{id}/c",
    ];
    for (i, ex) in exs.iter().enumerate() {
        let status = if i == 1 { 404 } else { 200 };
        let mut e = expect(
            "GET",
            &paths[i],
            routes[i],
            status,
            node.port,
            Svc::Exact("node"),
            Svc::Prefix("python"),
            (t0, t1),
        );
        e.client_port = out["local_port"].as_u64().map(|p| p as u16);
        check_exchange(ex, &e)?;
    }

    let big: Vec<_> = rx
        .requests()
        .iter()
        .filter_map(|r| r.decoded.clone().ok())
        .filter(|n| *n > 2)
        .collect();
    ensure!(
        big.is_empty(),
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE=2 but export requests carried {big:?} spans"
    );
    agent.stop()?;
    Ok(())
}

fn pipelined(server: &Server, test: &str) -> Result<()> {
    let rx = Receiver::start()?;
    let agent = start_agent(&rx, Protocol::HttpProtobuf)?;
    let base = unique_path(test);
    let paths = [
        format!("{base}/first"),
        format!("{base}/status/404"),
        format!("{base}/third"),
    ];
    let out = python_client(server.port, &["--mode", "pipeline", &paths[0], &paths[1], &paths[2]])?;
    assert_eq!(statuses(&out), vec![200, 404, 200], "pipelined responses");

    let spans = rx.wait_for_matching(3, SPAN_TIMEOUT, SETTLE, |s| s.is_server() && under(&base)(s))?;
    let mut servers: Vec<CollectedSpan> = spans;
    ensure!(
        servers.len() == 3,
        "want exactly 3 SERVER spans for 3 pipelined requests, got {}:\n{}",
        servers.len(),
        describe(&servers)
    );
    servers.sort_by_key(|s| (s.start_ns, s.end_ns));
    let got: Vec<(&str, i64)> = servers
        .iter()
        .map(|s| {
            (
                s.url_path().unwrap_or("-"),
                s.attr_int("http.response.status_code").unwrap_or(-1),
            )
        })
        .collect();
    let want: Vec<(&str, i64)> = vec![(&paths[0], 200), (&paths[1], 404), (&paths[2], 200)];
    ensure!(
        got == want,
        "pipelined server spans (by start time) {got:?}, want {want:?}\n{}",
        describe(&servers)
    );
    for w in servers.windows(2) {
        ensure!(
            w[0].end_ns <= w[1].end_ns,
            "pipelined responses end out of order:\n{}",
            describe(&servers)
        );
    }
    for s in &servers {
        ensure!(
            s.attr_int("server.port") == Some(server.port as i64),
            "server.port: {s}"
        );
        ensure!(
            s.attr_int("client.port") == out["local_port"].as_i64(),
            "client.port {:?} want {}: {s}",
            s.attr("client.port"),
            out["local_port"]
        );
        ensure!(s.status == "UNSET", "status: {s}");
    }
    // one CLIENT span per pipelined request too, each with its own response's status
    let spans = rx.wait_for_matching(6, SPAN_TIMEOUT, SETTLE, under(&base))?;
    let mut clients: Vec<(String, i64, String)> = spans
        .iter()
        .filter(|s| s.is_client())
        .map(|s| {
            let path = s.url_path().unwrap_or("-").to_string();
            (
                path,
                s.attr_int("http.response.status_code").unwrap_or(-1),
                s.status.clone(),
            )
        })
        .collect();
    clients.sort();
    let mut want: Vec<(String, i64, String)> = vec![
        (paths[0].clone(), 200, "UNSET".into()),
        (paths[1].clone(), 404, "ERROR".into()),
        (paths[2].clone(), 200, "UNSET".into()),
    ];
    want.sort();
    ensure!(
        clients == want,
        "pipelined CLIENT spans {clients:?}, want {want:?}\n{}",
        describe(&spans)
    );
    agent.stop()?;
    Ok(())
}

#[test]
fn pipelined_requests_python_server() -> Result<()> {
    let _g = serial();
    require!(Python);
    let srv = Server::python(None)?;
    pipelined(&srv, "pipepy")
}

#[test]
fn pipelined_requests_nginx_server() -> Result<()> {
    let _g = serial();
    require!(Python, Nginx);
    let srv = Server::nginx(None)?;
    pipelined(&srv, "pipengx")
}

#[test]
fn preexisting_connection_is_traced() -> Result<()> {
    let _g = serial();
    require!(Python);
    let rx = Receiver::start()?;
    let srv = Server::python(Some("py-pre-svc"))?;
    let base = unique_path("preconn");
    let (p1, p2) = (format!("{base}/before"), format!("{base}/after"));
    // connection opened and used once before the agent exists
    let (client, first) = PreexistingClient::start(srv.port, &[&p1, &p2])?;
    assert_eq!(statuses(&first), vec![200]);
    let agent = start_agent(&rx, Protocol::HttpProtobuf)?;
    let t0 = now_ns();
    let rest = client.go()?;
    let t1 = now_ns();
    assert_eq!(statuses(&rest), vec![200]);
    assert_eq!(
        rest["reused"],
        serde_json::Value::Bool(true),
        "the second request must reuse the connection: {rest}"
    );

    let spans = rx.wait_for_matching(2, SPAN_TIMEOUT, SETTLE, |s| s.url_path() == Some(p2.as_str()))?;
    let ex = one_exchange(&spans, &p2)?;
    let mut e = expect(
        "GET",
        &p2,
        "/e2e/preconn/{id}/after",
        200,
        srv.port,
        Svc::Exact("py-pre-svc"),
        Svc::Prefix("python"),
        (t0, t1),
    );
    e.client_port = rest["local_port"].as_u64().map(|p| p as u16);
    // The agent never saw this connection's connect/accept: the kernel reads its 4-tuple from
    // the socket on first sight, so peer addresses must be there too.
    let problems = exchange_problems(&ex, &e);
    ensure!(
        problems.is_empty(),
        "pre-existing connection, exchange {p2}:\n  - {}\nspans:\n  {}\n  {}",
        problems.join("\n  - "),
        ex.server,
        ex.client
    );
    // Both ends of the connection are on this host: the server span is the client span's child.
    linked_by_connection(&ex).context("pre-existing connection")?;
    agent.stop()?;
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Bodies

#[test]
fn large_and_chunked_bodies() -> Result<()> {
    let _g = serial();
    require!(Node, Python);
    let rx = Receiver::start()?;
    let node = Server::node(None)?;
    let py = Server::python(None)?;
    let agent = start_agent(&rx, Protocol::HttpProtobuf)?;

    // node: 1 MiB chunked response written with many res.write calls
    let path = format!("{}/chunked/1048576", unique_path("chunked"));
    let t0 = now_ns();
    let out = node_client(node.port, &[&path])?;
    let t1 = now_ns();
    assert_eq!(statuses(&out), vec![200]);
    assert_eq!(out["responses"][0]["body_size"].as_u64(), Some(1_048_576));
    let ex = one_exchange(
        &rx.wait_for_matching(2, SPAN_TIMEOUT, SETTLE, |s| s.url_path() == Some(path.as_str()))?,
        &path,
    )?;
    let mut e = expect(
        "GET",
        &path,
        "/e2e/chunked/{id}/chunked/{id}",
        200,
        node.port,
        Svc::Exact("node"),
        Svc::Exact("node"),
        (t0, t1),
    );
    e.client_port = out["responses"][0]["local_port"].as_u64().map(|p| p as u16);
    check_exchange(&ex, &e)?;
    // payload size; chunk framing (a few hundred bytes) tolerated
    let mut problems: Vec<String> = [&ex.server, &ex.client]
        .iter()
        .filter_map(|s| {
            assert_body_size(s, "http.response.body.size", 1_048_576, 1_048_576 + 4096)
                .err()
                .map(|e| format!("node→node: {e}"))
        })
        .collect();
    ensure!(
        ex.client.end_ns >= ex.server.end_ns,
        "client must end after the last chunk was written"
    );

    // python server: 16 KiB chunks, read by curl
    let path = format!("{}/chunked/1048576", unique_path("chunked"));
    let t0 = now_ns();
    let tr = curl(&[py.url(&path)], &[])?;
    let t1 = now_ns();
    assert_eq!((tr[0].status, tr[0].size_download), (200, 1_048_576));
    let ex = one_exchange(
        &rx.wait_for_matching(2, SPAN_TIMEOUT, SETTLE, |s| s.url_path() == Some(path.as_str()))?,
        &path,
    )?;
    let mut e = expect(
        "GET",
        &path,
        "/e2e/chunked/{id}/chunked/{id}",
        200,
        py.port,
        Svc::Prefix("python"),
        Svc::Exact("curl"),
        (t0, t1),
    );
    e.client_port = Some(tr[0].local_port);
    check_exchange(&ex, &e)?;
    problems.extend([&ex.server, &ex.client].iter().filter_map(|s| {
        assert_body_size(s, "http.response.body.size", 1_048_576, 1_048_576 + 4096)
            .err()
            .map(|e| format!("python→curl: {e}"))
    }));
    ensure!(problems.is_empty(), "chunked responses:\n{}", problems.join("\n"));

    // python client → python server: 300 000-byte request body
    let path = format!("{}/upload", unique_path("upload"));
    let t0 = now_ns();
    let out = python_client(py.port, &["--method", "POST", "--body-size", "300000", &path])?;
    let t1 = now_ns();
    assert_eq!(statuses(&out), vec![200]);
    let ex = one_exchange(
        &rx.wait_for_matching(2, SPAN_TIMEOUT, SETTLE, |s| s.url_path() == Some(path.as_str()))?,
        &path,
    )?;
    let mut e = expect(
        "POST",
        &path,
        "/e2e/upload/{id}/upload",
        200,
        py.port,
        Svc::Prefix("python"),
        Svc::Prefix("python"),
        (t0, t1),
    );
    e.client_port = out["local_port"].as_u64().map(|p| p as u16);
    check_exchange(&ex, &e)?;
    for s in [&ex.server, &ex.client] {
        assert_body_size(s, "http.request.body.size", 300_000, 300_000)?;
    }
    agent.stop()?;
    Ok(())
}

#[test]
fn nginx_sendfile_two_megabytes() -> Result<()> {
    let _g = serial();
    require!(Nginx, Python, Curl);
    let rx = Receiver::start()?;
    let srv = Server::nginx(None)?;
    let agent = start_agent(&rx, Protocol::HttpProtobuf)?;
    let size = NGINX_BIG_FILE_SIZE as i64;

    // curl at full speed
    let path = format!("{}/bigfile", unique_path("sendfile"));
    let t0 = now_ns();
    let tr = curl(&[srv.url(&path)], &[])?;
    let t1 = now_ns();
    assert_eq!(tr[0].status, 200);
    assert_eq!(tr[0].size_download, NGINX_BIG_FILE_SIZE as u64);
    let ex = one_exchange(&rx.wait_for_matching(2, SPAN_TIMEOUT, SETTLE, under(&path))?, &path)?;
    let mut e = expect(
        "GET",
        &path,
        "/e2e/sendfile/{id}/bigfile",
        200,
        srv.port,
        Svc::Exact("nginx"),
        Svc::Exact("curl"),
        (t0, t1),
    );
    e.client_port = Some(tr[0].local_port);
    check_exchange(&ex, &e)?;
    assert_body_size(&ex.server, "http.response.body.size", size, size + 4096)?;
    assert_body_size(&ex.client, "http.response.body.size", size, size + 4096)?;

    // a slow reader (64 KiB every 10 ms: ≥ 0.3 s): the client span must end at the last byte read,
    // after the server's last sendfile
    let path = format!("{}/bigfile", unique_path("sendfile"));
    let t0 = now_ns();
    let out = python_client(srv.port, &["--read-chunk", "65536", "--read-delay-ms", "10", &path])?;
    let t1 = now_ns();
    assert_eq!(statuses(&out), vec![200]);
    assert_eq!(out["responses"][0]["body_size"].as_i64(), Some(size));
    let ex = one_exchange(&rx.wait_for_matching(2, SPAN_TIMEOUT, SETTLE, under(&path))?, &path)?;
    let mut e = expect(
        "GET",
        &path,
        "/e2e/sendfile/{id}/bigfile",
        200,
        srv.port,
        Svc::Exact("nginx"),
        Svc::Prefix("python"),
        (t0, t1),
    );
    e.client_port = out["local_port"].as_u64().map(|p| p as u16);
    check_exchange(&ex, &e)?;
    assert_body_size(&ex.server, "http.response.body.size", size, size + 4096)?;
    assert_body_size(&ex.client, "http.response.body.size", size, size + 4096)?;
    ensure!(
        ex.client.duration() >= Duration::from_millis(250),
        "the client read 2 MiB over ≥ 0.3 s ({:.3} s wall), yet its span lasted only {:?}: the end must be the last byte read\n  {}",
        (t1 - t0) as f64 / 1e9,
        ex.client.duration(),
        ex.client
    );
    ensure!(ex.server.end_ns <= ex.client.end_ns);
    agent.stop()?;
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Status, versions, privacy

#[test]
fn error_statuses() -> Result<()> {
    let _g = serial();
    require!(Python, Curl, Nginx);
    let rx = Receiver::start()?;
    let py = Server::python(None)?;
    let ngx = Server::nginx(None)?;
    let agent = start_agent(&rx, Protocol::HttpProtobuf)?;

    let base = unique_path("errors");
    let paths = vec![
        format!("{base}/status/500"),
        format!("{base}/status/404"),
        format!("{base}/status/503"),
        format!("{base}/status/201"),
    ];
    let t0 = now_ns();
    let tr = curl(&paths.iter().map(|p| py.url(p)).collect::<Vec<_>>(), &[])?;
    let t1 = now_ns();
    assert_eq!(
        tr.iter().map(|t| t.status).collect::<Vec<_>>(),
        vec![500, 404, 503, 201]
    );
    let exs = exchanges(&rx, &base, &paths)?;
    for (ex, (p, st)) in exs.iter().zip(paths.iter().zip([500, 404, 503, 201])) {
        let e = expect(
            "GET",
            p,
            "/e2e/errors/{id}/status/{id}",
            st,
            py.port,
            Svc::Prefix("python"),
            Svc::Exact("curl"),
            (t0, t1),
        );
        check_exchange(ex, &e)?;
    }
    // explicit, as a user would read them
    ensure!(
        exs[0].server.status == "ERROR" && exs[0].client.status == "ERROR",
        "500: both ERROR"
    );
    ensure!(exs[0].client.attr_str("error.type") == Some("500"));
    ensure!(
        exs[1].server.status == "UNSET" && exs[1].client.status == "ERROR",
        "404: server UNSET, client ERROR"
    );
    ensure!(exs[1].client.attr_str("error.type") == Some("404"));
    ensure!(
        exs[3].server.status == "UNSET" && exs[3].client.status == "UNSET",
        "201: both UNSET"
    );

    // nginx's own 500 from a python client
    let path = format!("{}/status/500", unique_path("errngx"));
    let t0 = now_ns();
    let out = python_client(ngx.port, &[&path])?;
    let t1 = now_ns();
    assert_eq!(statuses(&out), vec![500]);
    let ex = one_exchange(&rx.wait_for_matching(2, SPAN_TIMEOUT, SETTLE, under(&path))?, &path)?;
    check_exchange(
        &ex,
        &expect(
            "GET",
            &path,
            "/e2e/errngx/{id}/status/{id}",
            500,
            ngx.port,
            Svc::Exact("nginx"),
            Svc::Prefix("python"),
            (t0, t1),
        ),
    )?;
    agent.stop()?;
    Ok(())
}

#[test]
fn http_1_0_request() -> Result<()> {
    let _g = serial();
    require!(Python, Curl, Nginx);
    let rx = Receiver::start()?;
    let py = Server::python(None)?;
    let ngx = Server::nginx(None)?;
    let agent = start_agent(&rx, Protocol::HttpProtobuf)?;

    let path = unique_path("httpten");
    let t0 = now_ns();
    let tr = curl(&[py.url(&path)], &["--http1.0"])?;
    let t1 = now_ns();
    assert_eq!(tr[0].status, 200);
    let ex = one_exchange(&rx.wait_for_matching(2, SPAN_TIMEOUT, SETTLE, under(&path))?, &path)?;
    let mut e = expect(
        "GET",
        &path,
        "/e2e/httpten/{id}",
        200,
        py.port,
        Svc::Prefix("python"),
        Svc::Exact("curl"),
        (t0, t1),
    );
    e.version = "1.0";
    check_exchange(&ex, &e)?;

    let path = unique_path("httpten");
    let t0 = now_ns();
    let out = python_client(ngx.port, &["--http10", &path])?;
    let t1 = now_ns();
    assert_eq!(statuses(&out), vec![200]);
    let ex = one_exchange(&rx.wait_for_matching(2, SPAN_TIMEOUT, SETTLE, under(&path))?, &path)?;
    let mut e = expect(
        "GET",
        &path,
        "/e2e/httpten/{id}",
        200,
        ngx.port,
        Svc::Exact("nginx"),
        Svc::Prefix("python"),
        (t0, t1),
    );
    e.version = "1.0";
    check_exchange(&ex, &e)?;
    agent.stop()?;
    Ok(())
}

#[test]
fn privacy_secrets_never_exported() -> Result<()> {
    let _g = serial();
    require!(Python, Curl, Node);
    let rx = Receiver::start()?;
    let py = Server::python(None)?;
    let node = Server::node(None)?;
    let agent = AgentBuilder::new()
        .as_shipped()
        .otlp(&rx, Protocol::HttpProtobuf)
        .arg("--print=json")
        .start()?;

    // Path segments that name a person or carry a token: an email, an id with the secret in it,
    // a digit-free token, a JWT. Exported generalised, as in the span name.
    let path = "/privacy/SECRET8@example.com/r0SECRET7x/xSECRETkeyQpLmZnWvRtYu/setcookie";
    let generalised = "/privacy/{email}/{id}/{token}/setcookie";
    let tr = curl(
        // a bare query component (no `=`) can be a token too
        &[format!("{}?token=SECRET3&x=1&SECRET6", py.url(path))],
        &[
            "-H",
            "Cookie: session=SECRET1",
            "-H",
            "Authorization: Bearer SECRET2",
            "-H",
            "X-Api-Key: SECRET5",
        ],
    )?;
    assert_eq!(tr[0].status, 200);
    let path2 = "/second/eyJhbGciOiJIUzI1NiJ9.eyJTRUNSRVQ5IjoxfQ.SECRETsig/setcookie";
    let q2 = format!("{path2}?token=SECRET3&x=1&SECRET6");
    let out = node_client(
        node.port,
        &[
            "-H",
            "Cookie: session=SECRET1",
            "-H",
            "Authorization: Bearer SECRET2",
            &q2,
        ],
    )?;
    assert_eq!(statuses(&out), vec![200]);
    let out = python_client(
        py.port,
        &[
            "--method",
            "POST",
            "--body-size",
            "100",
            "-H",
            "Authorization: Basic SECRET2",
            &q2,
        ],
    )?;
    assert_eq!(statuses(&out), vec![200]);
    // An absolute-form target (as sent to a proxy) with credentials in its authority.
    let absolute = format!("http://user:SECRET4@127.0.0.1:{}/third/setcookie", py.port);
    let out = python_client(py.port, &[&absolute])?;
    assert_eq!(statuses(&out).len(), 1);

    let spans = rx.wait_for_matching(2, SPAN_TIMEOUT, SETTLE, |s| s.url_path() == Some(generalised))?;
    rx.wait_for_matching(4, SPAN_TIMEOUT, SETTLE, |s| {
        s.url_path() == Some("/second/{token}/setcookie")
    })?;
    rx.wait_for_matching(2, SPAN_TIMEOUT, SETTLE, |s| s.url_path() == Some("/third/setcookie"))?;
    let ex = one_exchange(&spans, generalised)?;
    for s in [&ex.server, &ex.client] {
        ensure!(
            s.attr_str("url.query") == Some("token=REDACTED&x=REDACTED&REDACTED"),
            "{} url.query {:?}, want \"token=REDACTED&x=REDACTED&REDACTED\"",
            s.kind,
            s.attr("url.query")
        );
        ensure!(
            s.name == format!("GET {generalised}"),
            "{} span name {:?}",
            s.kind,
            s.name
        );
    }
    let agent_stdout_stderr = {
        let (stderr, stdout) = agent.stop()?;
        (stdout.text(), stderr.text())
    };

    let mut leaks = Vec::new();
    rx.with_spans(|spans| {
        for s in spans {
            for text in s.all_strings() {
                if text.contains("SECRET") {
                    leaks.push(format!("span {:?}: {text:?}", s.name));
                }
            }
        }
    });
    for (i, r) in rx.requests().iter().enumerate() {
        if r.body.windows(6).any(|w| w == b"SECRET") {
            leaks.push(format!("raw OTLP request #{i} contains SECRET"));
        }
    }
    for l in agent_stdout_stderr.0.lines().filter(|l| l.contains("SECRET")) {
        leaks.push(format!("--print output: {l}"));
    }
    for l in agent_stdout_stderr.1.lines().filter(|l| l.contains("SECRET")) {
        leaks.push(format!("agent log: {l}"));
    }
    ensure!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Export paths

fn export_with_headers(proto: Protocol, test: &str) -> Result<()> {
    let rx = Receiver::start()?;
    let srv = Server::python(None)?;
    let agent = AgentBuilder::new()
        .otlp(&rx, proto)
        .env(
            "OTEL_EXPORTER_OTLP_HEADERS",
            "x-sockspan-test=abc123,x-sockspan-tenant=team-a",
        )
        .metrics()
        .start()?;
    let path = unique_path(test);
    let t0 = now_ns();
    let tr = curl(&[srv.url(&path)], &[])?;
    let t1 = now_ns();
    assert_eq!(tr[0].status, 200);
    let ex = one_exchange(&rx.wait_for_matching(2, SPAN_TIMEOUT, SETTLE, under(&path))?, &path)?;
    let route = format!("/e2e/{test}/{{id}}");
    check_exchange(
        &ex,
        &expect(
            "GET",
            &path,
            &route,
            200,
            srv.port,
            Svc::Prefix("python"),
            Svc::Exact("curl"),
            (t0, t1),
        ),
    )?;
    let want_transport = match proto {
        Protocol::Grpc => agent_integration_tests::Transport::Grpc,
        Protocol::HttpProtobuf => agent_integration_tests::Transport::Http,
    };
    ensure!(
        ex.server.transport == want_transport,
        "spans arrived over {:?}, want {want_transport:?}",
        ex.server.transport
    );
    let reqs = rx.requests();
    ensure!(
        rx.saw_header("x-sockspan-test", "abc123"),
        "OTEL_EXPORTER_OTLP_HEADERS not seen; headers: {:?}",
        reqs.first().map(|r| &r.headers)
    );
    ensure!(
        rx.saw_header("x-sockspan-tenant", "team-a"),
        "second header not seen; headers: {:?}",
        reqs.first().map(|r| &r.headers)
    );
    let bad: Vec<_> = reqs
        .iter()
        .filter(|r| r.decoded.is_err())
        .map(|r| (r.path.clone(), r.content_type.clone(), r.decoded.clone()))
        .collect();
    ensure!(bad.is_empty(), "export requests the receiver could not decode: {bad:?}");
    if proto == Protocol::HttpProtobuf {
        ensure!(
            reqs.iter()
                .all(|r| r.path == "/v1/traces" && r.content_type == "application/x-protobuf"),
            "HTTP export: {:?}",
            reqs.iter().map(|r| (&r.path, &r.content_type)).collect::<Vec<_>>()
        );
    }
    let m = agent.wait_metrics(Duration::from_secs(10), |m| {
        m.get("sockspan_spans_exported_total") >= 2.0
    })?;
    ensure!(
        m.get("sockspan_events_read_total") > 0.0,
        "sockspan_events_read_total is 0:\n{}",
        m.text
    );
    agent.stop()?;
    Ok(())
}

#[test]
fn otlp_grpc_export_with_headers() -> Result<()> {
    let _g = serial();
    require!(Python, Curl);
    export_with_headers(Protocol::Grpc, "grpc")
}

#[test]
fn otlp_http_protobuf_export_with_headers() -> Result<()> {
    let _g = serial();
    require!(Python, Curl);
    export_with_headers(Protocol::HttpProtobuf, "httpproto")
}

/// `OTEL_EXPORTER_OTLP_PROTOCOL=http/json`: the spans arrive as OTLP JSON, the exchange whole;
/// with no protocol set, the specification's default, protobuf, is what is sent.
#[test]
fn otlp_http_json_export_and_the_protobuf_default() -> Result<()> {
    let _g = serial();
    require!(Python, Curl);
    let rx = Receiver::start()?;
    let srv = Server::python(None)?;
    for (protocol, content_type) in [
        (Some("http/json"), "application/json"),
        (None, "application/x-protobuf"),
    ] {
        let mut agent = AgentBuilder::new().env("OTEL_EXPORTER_OTLP_ENDPOINT", rx.http_endpoint());
        if let Some(p) = protocol {
            agent = agent.env("OTEL_EXPORTER_OTLP_PROTOCOL", p);
        }
        let agent = agent.start()?;
        let path = unique_path("httpjson");
        assert_eq!(curl(&[srv.url(&path)], &[])?[0].status, 200);
        let spans = rx.wait_for_matching(2, SPAN_TIMEOUT, SETTLE, under(&path))?;
        one_exchange(&spans, &path)?;
        let sent: Vec<String> = rx
            .requests()
            .iter()
            .filter(|r| String::from_utf8_lossy(&r.body).contains(path.as_str()))
            .map(|r| r.content_type.clone())
            .collect();
        ensure!(
            !sent.is_empty() && sent.iter().all(|ct| ct.starts_with(content_type)),
            "{protocol:?}: sent as {sent:?}, want {content_type}"
        );
        agent.stop()?;
    }
    Ok(())
}

#[test]
fn otlp_traces_endpoint_overrides_base_endpoint() -> Result<()> {
    let _g = serial();
    require!(Python, Curl);
    let rx = Receiver::start()?;
    let srv = Server::python(None)?;
    let closed = free_port();
    let agent = AgentBuilder::new()
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{closed}"))
        .env(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            format!("{}/v1/traces", rx.http_endpoint()),
        )
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        .start()?;
    let path = unique_path("tracesep");
    let tr = curl(&[srv.url(&path)], &[])?;
    assert_eq!(tr[0].status, 200);
    let spans = rx.wait_for_matching(2, SPAN_TIMEOUT, SETTLE, under(&path))?;
    one_exchange(&spans, &path)?;
    agent.stop()?;
    Ok(())
}

#[test]
fn print_json_output() -> Result<()> {
    let _g = serial();
    require!(Python, Curl);
    let srv = Server::python(Some("py-print-svc"))?;
    // no OTLP endpoint at all
    let agent = AgentBuilder::new()
        .arg("--print=json")
        .arg("--keep-query-values")
        .start()?;
    let path = unique_path("printjson");
    let tr = curl(&[format!("{}?a=1&b=two", srv.url(&path))], &[])?;
    assert_eq!(tr[0].status, 200);
    agent.wait_stdout(SPAN_TIMEOUT, |l| l.contains(&path) && l.contains("CLIENT"))?;
    agent.wait_stdout(SPAN_TIMEOUT, |l| l.contains(&path) && l.contains("SERVER"))?;
    std::thread::sleep(SETTLE);
    let (_stderr, stdout) = agent.stop()?;

    let mut mine = Vec::new();
    for line in stdout.all() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("--print=json line is not JSON: {line}"))?;
        for k in [
            "trace_id",
            "span_id",
            "parent_span_id",
            "name",
            "kind",
            "start_time_unix_nano",
            "end_time_unix_nano",
            "status",
            "resource",
            "attributes",
        ] {
            ensure!(v.get(k).is_some(), "--print=json line lacks {k:?}: {line}");
        }
        if v["attributes"]["url.path"].as_str() == Some(path.as_str()) {
            mine.push(v);
        }
    }
    ensure!(
        mine.len() == 2,
        "want 2 printed spans for {path}, got {}: {mine:?}",
        mine.len()
    );
    let server = mine.iter().find(|v| v["kind"] == "SERVER").context("no SERVER line")?;
    let client = mine.iter().find(|v| v["kind"] == "CLIENT").context("no CLIENT line")?;
    for v in [server, client] {
        ensure!(
            v["trace_id"]
                .as_str()
                .is_some_and(|s| s.len() == 32 && s.chars().all(|c| c.is_ascii_hexdigit())),
            "trace_id: {v}"
        );
        ensure!(
            v["span_id"]
                .as_str()
                .is_some_and(|s| s.len() == 16 && s.chars().all(|c| c.is_ascii_hexdigit())),
            "span_id: {v}"
        );
        ensure!(
            v["parent_span_id"].is_null() || v["parent_span_id"].as_str().is_some_and(|s| s.len() == 16),
            "parent_span_id: {v}"
        );
        ensure!(v["name"] == "GET /e2e/printjson/{id}", "name: {v}");
        ensure!(v["status"] == "UNSET", "status: {v}");
        ensure!(v["attributes"]["http.request.method"] == "GET", "method: {v}");
        ensure!(
            v["attributes"]["http.response.status_code"] == 200,
            "status code must be the number 200: {v}"
        );
        ensure!(
            v["attributes"]["server.port"] == srv.port,
            "server.port must be the number {}: {v}",
            srv.port
        );
        ensure!(
            v["attributes"]["url.query"] == "a=1&b=two",
            "--keep-query-values: url.query {v}"
        );
        let start = v["start_time_unix_nano"]
            .as_u64()
            .or_else(|| v["start_time_unix_nano"].as_str().and_then(|s| s.parse().ok()));
        let end = v["end_time_unix_nano"]
            .as_u64()
            .or_else(|| v["end_time_unix_nano"].as_str().and_then(|s| s.parse().ok()));
        ensure!(
            matches!((start, end), (Some(s), Some(e)) if s > 0 && e >= s),
            "times: {v}"
        );
    }
    ensure!(
        server["resource"]["service.name"] == "py-print-svc",
        "server resource: {server}"
    );
    ensure!(
        client["resource"]["service.name"] == "curl",
        "client resource: {client}"
    );
    Ok(())
}

#[test]
fn print_text_by_default_without_endpoint() -> Result<()> {
    let _g = serial();
    require!(Python, Curl);
    let srv = Server::python(None)?;
    let agent = AgentBuilder::new().start()?;
    let path = unique_path("printtext");
    let tr = curl(&[srv.url(&path)], &[])?;
    assert_eq!(tr[0].status, 200);
    let line = agent.wait_stdout(SPAN_TIMEOUT, |l| l.contains("/e2e/printtext/"))?;
    ensure!(
        serde_json::from_str::<serde_json::Value>(&line).is_err(),
        "default print format should be text, got JSON: {line}"
    );
    agent.stop()?;
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Robustness

/// IPv6 and v4-mapped peers: dual-stack servers (Node.js, Python) reached over `[::1]` and over
/// 127.0.0.1 (which the server's socket sees as `::ffff:127.0.0.1`, reported as IPv4). The 4-tuples
/// come from the kernel, so the server span is also the child of the client span.
#[test]
fn ipv6_and_v4_mapped_peers() -> Result<()> {
    let _g = serial();
    require!(Node, Python, Curl);
    let rx = Receiver::start()?;
    let node = Server::node_on(Some("v6-node"), "::")?;
    let py = Server::python_on(Some("v6-py"), "::")?;
    let agent = start_agent(&rx, Protocol::HttpProtobuf)?;

    // (server, url host, path, the client address the server should report)
    let cases = [
        (&node, "[::1]", unique_path("ipv6"), "::1"),
        (&node, "127.0.0.1", unique_path("ipv6"), "127.0.0.1"),
        (&py, "[::1]", unique_path("ipv6"), "::1"),
    ];
    let mut transfers = Vec::new();
    let t0 = now_ns();
    for (srv, host, path, _) in &cases {
        // -g: the brackets of an IPv6 literal are not a curl glob
        let tr = curl(&[format!("http://{host}:{}{path}", srv.port)], &["-g"])?;
        ensure!(tr[0].status == 200, "curl {host}{path}: status {}", tr[0].status);
        transfers.push(tr[0].local_port);
    }
    let t1 = now_ns();
    let paths: Vec<String> = cases.iter().map(|c| c.2.clone()).collect();
    let got = exchanges(&rx, "/e2e/ipv6/", &paths)?;
    for (((srv, host, path, peer), ex), local_port) in cases.iter().zip(&got).zip(transfers) {
        let service = if srv.port == node.port { "v6-node" } else { "v6-py" };
        let mut e = expect(
            "GET",
            path,
            "/e2e/ipv6/{id}",
            200,
            srv.port,
            Svc::Exact(service),
            Svc::Exact("curl"),
            (t0, t1),
        );
        e.client_port = Some(local_port);
        check_exchange(ex, &e).with_context(|| format!("over {host}"))?;
        let want = |s: &CollectedSpan, key: &str, value: &str| {
            ensure!(
                s.attr_str(key) == Some(value),
                "over {host}: {} {key} should be {value}: {s}",
                s.kind
            );
            Ok(())
        };
        want(&ex.server, "client.address", peer)?;
        want(&ex.server, "network.peer.address", peer)?;
        want(&ex.client, "network.peer.address", peer)?;
        want(&ex.client, "server.address", host.trim_matches(['[', ']']))?;
        linked_by_connection(ex).with_context(|| format!("over {host}"))?;
    }
    agent.stop()?;
    Ok(())
}

/// A service whose requests move between threads (one thread reads a request, the other calls
/// upstream for it and answers, as goroutines move between Go's threads): a thread often writes a
/// call for one request while another it read is in flight, so the thread must not be taken as
/// the parent. Every call must get its own request as parent (by the id in its path) or none.
#[test]
fn requests_moving_between_threads_get_no_wrong_parent() -> Result<()> {
    let _g = serial();
    require!(Python, Curl);
    let rx = Receiver::start()?;
    let upstream = Server::python(Some("handoff-upstream"))?;
    let front = Server::python_handoff("handoff-front", upstream.port)?;
    let agent = AgentBuilder::new()
        .otlp(&rx, Protocol::HttpProtobuf)
        .metrics()
        .start()?;

    // One request alone, then 40 four at a time.
    let first = unique_path("handoff");
    curl(&[front.url(&first)], &[])?;
    let paths: Vec<String> = (0..40).map(|_| unique_path("handoff")).collect();
    let urls: Vec<String> = paths.iter().map(|p| front.url(p)).collect();
    let tr = curl(&urls, &["--parallel", "--parallel-max", "4"])?;
    let codes: Vec<u16> = tr.iter().map(|t| t.status).collect();
    ensure!(codes.iter().all(|&c| c == 200), "statuses {codes:?}");

    let all: Vec<String> = std::iter::once(first).chain(paths).collect();
    // per request: curl CLIENT + front SERVER, front CLIENT + upstream SERVER
    let spans = rx.wait_for_matching(4 * all.len(), SPAN_TIMEOUT, SETTLE, |s| {
        s.url_path().is_some_and(|p| p.contains("/e2e/handoff/"))
    })?;
    let find = |svc: &str, kind: &str, path: &str| {
        spans
            .iter()
            .find(|s| s.service_name() == Some(svc) && s.kind == kind && s.url_path() == Some(path))
    };
    let mut wrong = Vec::new();
    let mut by_proxy = 0;
    for p in &all {
        let server = find("handoff-front", "SERVER", p).with_context(|| format!("front SERVER span of {p}"))?;
        let call = find("handoff-front", "CLIENT", &format!("/up{p}"))
            .with_context(|| format!("front CLIENT span of /up{p}\n{}", describe(&spans)))?;
        match call.parent_span_id.as_deref() {
            Some(parent) if parent == server.span_id => by_proxy += 1,
            None => {}
            Some(_) => wrong.push(format!("  {call}\n    its request: {server}")),
        }
    }
    ensure!(
        wrong.is_empty(),
        "{} calls got another request as parent:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    // The ids in the paths tie each call to its request (the proxy rule).
    ensure!(
        by_proxy == all.len(),
        "{by_proxy} of {} calls have their request as parent",
        all.len()
    );
    let m = agent.metrics()?;
    ensure!(
        m.get("sockspan_stitch_thread_rule_disabled_total") >= 1.0,
        "the agent should have stopped trusting threads in the hand-off service:\n{}",
        m.text
    );
    agent.stop()?;
    Ok(())
}

#[test]
fn non_http_traffic_yields_no_spans() -> Result<()> {
    let _g = serial();
    require!(Python, Curl);
    let rx = Receiver::start()?;
    let tcp = tcp_peer_server()?;
    let py = Server::python(None)?;
    let agent = AgentBuilder::new()
        .otlp(&rx, Protocol::HttpProtobuf)
        .metrics()
        .start()?;
    let before = agent
        .metrics()?
        .value("sockspan_http_rejected_total", Some(r#"reason="not_http""#))
        .unwrap_or(0.0);

    tcp_peer_client(tcp.port)?;
    tcp_peer_client(tcp.port)?;
    // a sentinel HTTP exchange afterwards: the agent is still healthy and has flushed past the TCP traffic
    let path = unique_path("nonhttp");
    let tr = curl(&[py.url(&path)], &[])?;
    assert_eq!(tr[0].status, 200);
    let spans = rx.wait_for_matching(2, SPAN_TIMEOUT, SETTLE, under(&path))?;
    one_exchange(&spans, &path)?;

    let port = tcp.port as i64;
    let on_tcp: Vec<CollectedSpan> = rx.matching(|s| {
        s.attr_int("server.port") == Some(port)
            || s.attr_int("network.peer.port") == Some(port)
            || s.attr_int("client.port") == Some(port)
    });
    ensure!(
        on_tcp.is_empty(),
        "spans for non-HTTP traffic on port {port}:\n{}",
        describe(&on_tcp)
    );
    let m = agent.wait_metrics(Duration::from_secs(10), |m| {
        m.value("sockspan_http_rejected_total", Some(r#"reason="not_http""#))
            .unwrap_or(0.0)
            > before
    })?;
    eprintln!(
        "not_http rejections: before {before}, after {:?}",
        m.value("sockspan_http_rejected_total", Some(r#"reason="not_http""#))
    );
    agent.stop()?;
    Ok(())
}

/// `GET path` on the agent's metrics port: (status, body).
fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let status = raw.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

#[test]
fn unreachable_collector_drops_and_exits_cleanly() -> Result<()> {
    let _g = serial();
    require!(Python, Curl);
    let srv = Server::python(None)?;
    for proto in ["http/protobuf", "grpc"] {
        let closed = free_port();
        let mut agent = AgentBuilder::new()
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{closed}"))
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", proto)
            .env("OTEL_BSP_EXPORT_TIMEOUT", "1000")
            .arg("--unhealthy-after")
            .arg("2")
            .metrics()
            .start()
            .with_context(|| format!("protocol {proto}"))?;
        let port = agent.metrics_port.context("metrics port")?;
        let (status, body) = http_get(port, "/healthz")?;
        ensure!(status == 200, "{proto}: /healthz before any export: {status} {body}");
        let base = unique_path("unreach");
        let urls: Vec<String> = (0..5).map(|i| srv.url(&format!("{base}/n{i}"))).collect();
        assert!(curl(&urls, &[])?.iter().all(|t| t.status == 200));
        let m = agent
            .wait_metrics(Duration::from_secs(30), |m| m.get("sockspan_spans_dropped_total") > 0.0)
            .with_context(|| format!("protocol {proto}: spans for a closed collector must be counted as dropped"))?;
        eprintln!("{proto}: dropped {}", m.get("sockspan_spans_dropped_total"));
        ensure!(
            m.get("sockspan_spans_exported_total") == 0.0,
            "{proto}: nothing can have been exported to a closed port:\n{}",
            m.text
        );
        ensure!(
            agent.is_running(),
            "{proto}: agent died with the collector unreachable:\n{}",
            agent.stderr.tail(20)
        );
        // exports have failed for longer than --unhealthy-after: /healthz says so
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        let (status, body) = loop {
            let (status, body) = http_get(port, "/healthz")?;
            if status == 503 || std::time::Instant::now() > deadline {
                break (status, body);
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        ensure!(
            status == 503 && body.contains("export failing"),
            "{proto}: /healthz with exports failing: {status} {body}"
        );
        // still serving traffic after the failures
        let tr = curl(&[srv.url(&format!("{base}/after"))], &[])?;
        assert_eq!(tr[0].status, 200);
        ensure!(agent.is_running(), "{proto}: agent died:\n{}", agent.stderr.tail(20));
        agent
            .stop()
            .with_context(|| format!("protocol {proto}: SIGTERM with an unreachable collector"))?;
    }
    Ok(())
}

#[test]
fn sigterm_flushes_pending_spans() -> Result<()> {
    let _g = serial();
    require!(Python, Curl);
    let rx = Receiver::start()?;
    let srv = Server::python(None)?;
    // a schedule delay far beyond the test: only the shutdown flush can deliver the spans
    let agent = AgentBuilder::new()
        .otlp(&rx, Protocol::HttpProtobuf)
        .env("OTEL_BSP_SCHEDULE_DELAY", "60000")
        .arg("--print=json")
        .start()?;
    let path = unique_path("flush");
    let tr = curl(&[srv.url(&path)], &[])?;
    assert_eq!(tr[0].status, 200);
    // know the agent has built both spans (printed) before stopping it
    agent.wait_stdout(SPAN_TIMEOUT, |l| l.contains(&path) && l.contains("SERVER"))?;
    agent.wait_stdout(SPAN_TIMEOUT, |l| l.contains(&path) && l.contains("CLIENT"))?;
    let early = rx.matching(|s| s.url_path() == Some(path.as_str())).len();
    agent.stop()?;
    let spans: Vec<CollectedSpan> = rx.matching(|s| s.url_path() == Some(path.as_str()));
    ensure!(
        spans.len() == 2,
        "after SIGTERM the receiver has {} spans for {path} (had {early} before the stop), want 2 flushed:\n{}",
        spans.len(),
        describe(&spans)
    );
    Ok(())
}

#[test]
fn many_exchanges_are_all_reported_once() -> Result<()> {
    let _g = serial();
    require!(Python, Curl);
    let rx = Receiver::start()?;
    let srv = Server::python(None)?;
    let agent = start_agent(&rx, Protocol::Grpc)?;
    let base = unique_path("many");
    let paths: Vec<String> = (0..40).map(|i| format!("{base}/n{i}")).collect();
    // 4 curl processes × 10 keep-alive requests
    for chunk in paths.chunks(10) {
        let tr = curl(&chunk.iter().map(|p| srv.url(p)).collect::<Vec<_>>(), &[])?;
        assert!(tr.iter().all(|t| t.status == 200));
    }
    let spans = rx.wait_for_matching(80, SPAN_TIMEOUT, SETTLE, under(&base))?;
    for p in &paths {
        let n = with_path(&spans, p).len();
        ensure!(n == 2, "{p}: {n} spans, want 2");
    }
    agent.stop()?;
    Ok(())
}

#[test]
fn json_logs_and_metric_names() -> Result<()> {
    let _g = serial();
    require!(Python, Curl);
    let srv = Server::python(None)?;
    let agent = AgentBuilder::new()
        .arg("--log-format")
        .arg("json")
        .arg("--print=json")
        .metrics()
        .start()?;
    let path = unique_path("jsonlogs");
    let tr = curl(&[srv.url(&path)], &[])?;
    assert_eq!(tr[0].status, 200);
    agent.wait_stdout(SPAN_TIMEOUT, |l| l.contains(&path) && l.contains("SERVER"))?;
    let m = agent.wait_metrics(Duration::from_secs(10), |m| m.get("sockspan_events_read_total") > 0.0)?;
    let mut missing = Vec::new();
    for (name, label) in [
        ("sockspan_events_read_total", None),
        ("sockspan_kernel_events_lost_total", None),
        ("sockspan_spans_exported_total", None),
        ("sockspan_spans_dropped_total", Some("reason=")),
        ("sockspan_http_rejected_total", Some(r#"reason="not_http""#)),
    ] {
        if m.value(name, label).is_none() {
            missing.push(format!(
                "{name}{}",
                label.map(|l| format!("{{{l}}}")).unwrap_or_default()
            ));
        }
    }
    ensure!(missing.is_empty(), "/metrics lacks {missing:?}:\n{}", m.text);
    let (stderr, _stdout) = agent.stop()?;
    let mut bad = Vec::new();
    for l in stderr.all().iter().filter(|l| !l.trim().is_empty()) {
        if serde_json::from_str::<serde_json::Value>(l)
            .map(|v| !v.is_object())
            .unwrap_or(true)
        {
            bad.push(l.clone());
        }
    }
    ensure!(
        bad.is_empty(),
        "--log-format json: non-JSON stderr lines:\n{}",
        bad.join("\n")
    );
    ensure!(
        stderr.any(|l| l.contains("sockspan ready")),
        "ready line missing from JSON logs"
    );
    Ok(())
}

#[test]
fn client_without_response_is_error() -> Result<()> {
    let _g = serial();
    require!(Python, Curl);
    let rx = Receiver::start()?;
    let srv = Server::python(None)?;
    let agent = start_agent(&rx, Protocol::HttpProtobuf)?;
    let path = format!("{}/abort", unique_path("noresp"));
    // the server closes the connection without answering: curl reports an empty reply (52)
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sS", "--http1.1", "-o", "/dev/null", &srv.url(&path)]);
    let (st, _out, err) = agent_integration_tests::harness::run(&mut cmd, Duration::from_secs(20))?;
    ensure!(st.code() == Some(52), "curl: {st} {err}");
    let spans = rx.wait_for_matching(1, SPAN_TIMEOUT, SETTLE, |s| {
        s.is_client() && s.url_path() == Some(path.as_str())
    })?;
    ensure!(spans.len() == 1, "want one CLIENT span:\n{}", describe(&spans));
    let c = &spans[0];
    ensure!(
        c.status == "ERROR",
        "no response: CLIENT status {}, want ERROR\n  {c}",
        c.status
    );
    ensure!(
        c.attr_str("error.type").is_some_and(|t| !t.is_empty()),
        "no response: error.type missing\n  {c}"
    );
    ensure!(
        c.attr("http.response.status_code").is_none(),
        "no response, yet a status code: {c}"
    );
    ensure!(c.service_name() == Some("curl"), "service.name: {c}");
    agent.stop()?;
    Ok(())
}

/// A keep-alive connection busy while the agent starts: the hooks attach one by one, so a
/// request can be read before the send hooks exist and its response go unseen. Had those bytes
/// counted, every later request on the connection would pair with the response of one before
/// it, each server span lasting several exchanges. Bytes moved before every hook was attached
/// are ignored (counted): each server span lasts what its exchange did.
#[test]
fn busy_keepalive_connection_during_start_keeps_true_durations() -> Result<()> {
    let _g = serial();
    require!(Python);
    let rx = Receiver::start()?;
    let srv = Server::python(Some("py-busy-start"))?;
    let base = unique_path("busystart");
    // One connection, a request every 20 ms for 12 s: it is busy all through the agent's start.
    let script = format!(
        "import http.client, time\nc = http.client.HTTPConnection('127.0.0.1', {port})\n\
         for i in range(600):\n    c.request('GET', '{base}/%d' % i)\n    c.getresponse().read()\n    time.sleep(0.02)\n",
        port = srv.port
    );
    let mut client = std::process::Command::new("python3")
        .args(["-c", &script])
        .stdout(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    let agent = AgentBuilder::new()
        .otlp(&rx, Protocol::HttpProtobuf)
        .metrics()
        .start()?;
    std::thread::sleep(Duration::from_secs(2));
    let m = agent.metrics()?;
    let ignored = m
        .value("sockspan_http_rejected_total", Some(r#"reason="before_attach""#))
        .unwrap_or(0.0);
    let spans = rx.wait_for_matching(40, SPAN_TIMEOUT, SETTLE, |s| {
        s.is_server() && s.url_path().is_some_and(|p| p.starts_with(&base))
    })?;
    let _ = client.kill();
    let _ = client.wait();
    let slow: Vec<String> = spans
        .iter()
        .filter(|s| s.duration() > Duration::from_millis(15))
        .map(|s| format!("{} {:?}", s.url_path().unwrap_or_default(), s.duration()))
        .collect();
    ensure!(
        slow.is_empty(),
        "server spans longer than one exchange (a response paired with an earlier request): {slow:?} \
         ({ignored} events before attach ignored)"
    );
    agent.stop()?;
    Ok(())
}

/// Resource metadata a node agent adds: `container.id` of a server running in a (real) container
/// cgroup, none for a process outside one, and `host.name` from `NODE_NAME` (a DaemonSet's
/// downward API), not the kernel's hostname.
#[test]
fn container_id_and_node_name_on_spans() -> Result<()> {
    let _g = serial();
    require!(Python, Curl);
    let rx = Receiver::start()?;
    let srv = Server::python(Some("py-in-container"))?;
    let id = format!("{:016x}", now_ns()).repeat(4);
    let cgroup = ContainerCgroup::enter(&id, srv.guard.pid())?;
    let agent = AgentBuilder::new()
        .otlp(&rx, Protocol::HttpProtobuf)
        .env("NODE_NAME", "node-e2e-7")
        .start()?;
    let path = unique_path("container");
    curl(&[srv.url(&path)], &[])?;
    let spans = rx.wait_for_matching(2, SPAN_TIMEOUT, SETTLE, |s| s.url_path() == Some(path.as_str()))?;
    let server = spans.iter().find(|s| s.is_server()).context("a server span")?;
    let client = spans.iter().find(|s| s.is_client()).context("a client span")?;
    ensure!(
        server.res_str("container.id") == Some(id.as_str()),
        "the server's container.id: {:?}",
        server.resource
    );
    ensure!(
        client.res_str("container.id").is_none(),
        "curl runs in no container: {:?}",
        client.resource
    );
    for s in [server, client] {
        ensure!(
            s.res_str("host.name") == Some("node-e2e-7"),
            "host.name: {:?}",
            s.resource
        );
    }
    agent.stop()?;
    drop(cgroup);
    Ok(())
}
