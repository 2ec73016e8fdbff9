//! Checks of the test harness itself, without the agent: the OTLP receiver decodes what the
//! official protobuf definitions encode (over gRPC and HTTP), and every fixture server and client
//! works. Needs no root; needs python3, nginx, node and curl.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

use agent_integration_tests::{
    AttrValue, Receiver, Transport,
    harness::{self, PreexistingClient, Server, curl, node_client, python_client, serial, statuses, unique_path},
    require_tools,
};
use anyhow::{Context as _, Result, ensure};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{ExportTraceServiceRequest, trace_service_client::TraceServiceClient},
    common::v1::{AnyValue, KeyValue, any_value::Value},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span::SpanKind, status::StatusCode},
};
use prost::Message as _;

fn kv(k: &str, v: Value) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue { value: Some(v) }),
        ..Default::default()
    }
}

fn sample_request(path: &str) -> ExportTraceServiceRequest {
    let span = Span {
        trace_id: vec![0x11; 16],
        span_id: vec![0x22; 8],
        parent_span_id: vec![],
        name: "GET /e2e/self/{id}".into(),
        kind: SpanKind::Server as i32,
        start_time_unix_nano: 1_000,
        end_time_unix_nano: 2_000,
        attributes: vec![
            kv("url.path", Value::StringValue(path.into())),
            kv("http.response.status_code", Value::IntValue(503)),
        ],
        status: Some(Status {
            code: StatusCode::Error as i32,
            message: String::new(),
        }),
        ..Default::default()
    };
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    kv("service.name", Value::StringValue("selftest".into())),
                    kv("process.pid", Value::IntValue(42)),
                ],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans: vec![span],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

#[test]
fn receiver_decodes_otlp_http_protobuf() -> Result<()> {
    let rx = Receiver::start()?;
    let path = unique_path("self");
    let body = sample_request(&path).encode_to_vec();
    let mut s = TcpStream::connect(("127.0.0.1", rx.http_port()))?;
    write!(
        s,
        "POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\nX-Test-Header: hello\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(&body)?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    ensure!(resp.starts_with("HTTP/1.1 200"), "response: {resp}");
    rx.wait_for(Duration::from_secs(5), |s| !s.is_empty())?;
    let spans = rx.spans();
    let sp = &spans[0];
    assert_eq!(sp.trace_id, "11".repeat(16));
    assert_eq!(sp.span_id, "22".repeat(8));
    assert_eq!(sp.parent_span_id, None);
    assert_eq!(sp.kind, "SERVER");
    assert_eq!(sp.status, "ERROR");
    assert_eq!(sp.url_path(), Some(path.as_str()));
    assert_eq!(sp.attr_int("http.response.status_code"), Some(503));
    assert_eq!(sp.service_name(), Some("selftest"));
    assert_eq!(sp.res_int("process.pid"), Some(42));
    assert_eq!(sp.transport, Transport::Http);
    assert!(rx.saw_header("x-test-header", "hello"));
    assert_eq!(rx.requests()[0].content_type, "application/x-protobuf");

    // garbage is refused with 400 and recorded as a decode error
    let mut s = TcpStream::connect(("127.0.0.1", rx.http_port()))?;
    s.write_all(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\n\xff\xff\xff")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    ensure!(resp.starts_with("HTTP/1.1 400"), "response: {resp}");
    Ok(())
}

#[test]
fn receiver_decodes_otlp_grpc() -> Result<()> {
    let rx = Receiver::start()?;
    let path = unique_path("self");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let mut client = TraceServiceClient::connect(rx.grpc_endpoint()).await?;
        let mut req = tonic::Request::new(sample_request(&path));
        req.metadata_mut().insert("x-test-header", "grpc-hello".parse()?);
        client.export(req).await?;
        anyhow::Ok(())
    })?;
    rx.wait_for(Duration::from_secs(5), |s| !s.is_empty())?;
    let spans = rx.spans();
    assert_eq!(spans[0].url_path(), Some(path.as_str()));
    assert_eq!(spans[0].transport, Transport::Grpc);
    assert_eq!(
        spans[0].attributes.get("http.response.status_code"),
        Some(&AttrValue::Int(503))
    );
    assert!(
        rx.saw_header("x-test-header", "grpc-hello"),
        "{:?}",
        rx.requests()[0].headers
    );
    Ok(())
}

#[test]
fn fixtures_python_server_with_curl_keepalive() -> Result<()> {
    let _g = serial();
    require_tools!(Python, Curl);
    let srv = Server::python(None)?;
    let p = unique_path("self");
    let urls = vec![
        srv.url(&p),
        srv.url(&format!("{p}/status/404")),
        srv.url(&format!("{p}/big/100000")),
        srv.url(&format!("{p}/chunked/70000")),
    ];
    let t = curl(&urls, &[])?;
    assert_eq!(t.iter().map(|t| t.status).collect::<Vec<_>>(), vec![200, 404, 200, 200]);
    assert_eq!(
        t.iter().map(|t| t.num_connects).collect::<Vec<_>>(),
        vec![1, 0, 0, 0],
        "curl must reuse the connection"
    );
    assert_eq!(t[2].size_download, 100_000);
    assert_eq!(t[3].size_download, 70_000);
    let t = curl(&[srv.url(&p)], &["--http1.0"])?;
    assert_eq!(t[0].status, 200);
    let t = curl(&[srv.url(&format!("{p}/slow/100"))], &[])?;
    assert_eq!(t[0].status, 200);
    // /abort: the connection closes without a response (curl: empty reply, exit 52)
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sS", "-o", "/dev/null", &srv.url(&format!("{p}/abort"))]);
    let (st, _, _) = harness::run(&mut cmd, Duration::from_secs(10))?;
    assert_eq!(st.code(), Some(52));
    Ok(())
}

#[test]
fn fixtures_python_client_modes() -> Result<()> {
    let _g = serial();
    require_tools!(Python, Nginx);
    let py = Server::python(None)?;
    let ngx = Server::nginx(None)?;
    for srv in [&py, &ngx] {
        let p = unique_path("self");
        let a = format!("{p}/a");
        let b = format!("{p}/status/404");
        let c = format!("{p}/smallfile");
        let out = python_client(srv.port, &["--mode", "pipeline", &a, &b, &c])?;
        assert_eq!(statuses(&out), vec![200, 404, 200], "{:?} pipeline: {out}", srv.kind);
        let out = python_client(srv.port, &[&a, &b])?;
        assert_eq!(statuses(&out), vec![200, 404], "{out}");
        assert!(out["local_port"].as_u64().unwrap() > 0);
        let out = python_client(srv.port, &["--http10", &a])?;
        assert_eq!(statuses(&out), vec![200], "{out}");
    }
    let big = format!("{}/bigfile", unique_path("self"));
    let out = python_client(ngx.port, &[&big])?;
    assert_eq!(
        out["responses"][0]["body_size"].as_u64(),
        Some(harness::NGINX_BIG_FILE_SIZE as u64)
    );
    let out = python_client(
        py.port,
        &[
            "--method",
            "POST",
            "--body-size",
            "300000",
            &format!("{}/x", unique_path("self")),
        ],
    )?;
    assert_eq!(statuses(&out), vec![200]);

    let p = unique_path("self");
    let (client, first) = PreexistingClient::start(py.port, &[&format!("{p}/one"), &format!("{p}/two")])?;
    assert_eq!(statuses(&first), vec![200]);
    let rest = client.go()?;
    assert_eq!(statuses(&rest), vec![200]);
    assert_eq!(rest["reused"], serde_json::Value::Bool(true), "{rest}");
    Ok(())
}

#[test]
fn fixtures_node_server_and_client() -> Result<()> {
    let _g = serial();
    require_tools!(Node, Curl);
    let srv = Server::node(Some("node-self"))?;
    let p = unique_path("self");
    let out = node_client(
        srv.port,
        &[&format!("{p}/chunked/1048576"), &format!("{p}/status/500"), &p],
    )?;
    assert_eq!(statuses(&out), vec![200, 500, 200], "{out}");
    assert_eq!(out["responses"][0]["body_size"].as_u64(), Some(1_048_576));
    let ports: Vec<u64> = out["responses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["local_port"].as_u64().unwrap())
        .collect();
    assert!(
        ports.iter().all(|p| *p == ports[0]),
        "node client must keep one connection: {ports:?}"
    );
    let out = node_client(srv.port, &["--method", "POST", "--body-size", "5000", &p])?;
    assert_eq!(statuses(&out), vec![200]);
    let t = curl(&[srv.url(&format!("{p}/chunked/200000"))], &[])?;
    assert_eq!(t[0].size_download, 200_000);
    Ok(())
}

#[test]
fn fixtures_nginx_with_curl_and_tcp_peer() -> Result<()> {
    let _g = serial();
    require_tools!(Nginx, Curl, Python);
    let srv = Server::nginx(Some("nginx-self"))?;
    let p = unique_path("self");
    let t = curl(
        &[
            srv.url(&p),
            srv.url(&format!("{p}/bigfile")),
            srv.url(&format!("{p}/status/500")),
        ],
        &[],
    )?;
    assert_eq!(t.iter().map(|t| t.status).collect::<Vec<_>>(), vec![200, 200, 500]);
    assert_eq!(t[1].size_download, harness::NGINX_BIG_FILE_SIZE as u64);
    let conf = std::fs::read_to_string(srv.dir.as_ref().unwrap().path().join("nginx.conf"))?;
    assert!(conf.contains("env OTEL_SERVICE_NAME;"));
    // the worker runs as root and has the service name
    let tcp = harness::tcp_peer_server()?;
    harness::tcp_peer_client(tcp.port).context("tcp peer")?;
    Ok(())
}
