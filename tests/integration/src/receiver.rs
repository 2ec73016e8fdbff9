//! An in-process OTLP trace receiver built on the official protobuf definitions.
//!
//! [`Receiver::start`] listens on two ephemeral ports on 127.0.0.1: one serves the OTLP/gRPC
//! `TraceService` (opentelemetry-proto's generated `TraceServiceServer`), the other OTLP/HTTP
//! (`POST /v1/traces`, `application/x-protobuf`, decoded with prost into
//! `ExportTraceServiceRequest`). Every span received is flattened with its resource into a
//! [`CollectedSpan`]; the raw request bodies and headers are kept too (privacy checks search the
//! raw bytes, header tests look at the headers).
//!
//! The receiver runs on its own tokio runtime, so tests stay plain synchronous `#[test]`s.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    fmt,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value},
    trace::v1::{span::SpanKind, status::StatusCode},
};
use prost::Message as _;

/// An attribute value, typed as it arrived.
#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue {
    Str(String),
    Int(i64),
    Double(f64),
    Bool(bool),
    Bytes(Vec<u8>),
    Array(Vec<AttrValue>),
    Map(BTreeMap<String, AttrValue>),
    Empty,
}

impl AttrValue {
    fn from_any(v: Option<&AnyValue>) -> Self {
        let Some(v) = v.and_then(|v| v.value.as_ref()) else {
            return AttrValue::Empty;
        };
        match v {
            any_value::Value::StringValue(s) => AttrValue::Str(s.clone()),
            any_value::Value::BoolValue(b) => AttrValue::Bool(*b),
            any_value::Value::IntValue(i) => AttrValue::Int(*i),
            any_value::Value::DoubleValue(d) => AttrValue::Double(*d),
            any_value::Value::BytesValue(b) => AttrValue::Bytes(b.clone()),
            any_value::Value::ArrayValue(a) => {
                AttrValue::Array(a.values.iter().map(|v| AttrValue::from_any(Some(v))).collect())
            }
            any_value::Value::KvlistValue(kv) => AttrValue::Map(attrs_to_map(&kv.values)),
            #[allow(unreachable_patterns)]
            _ => AttrValue::Empty,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            AttrValue::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            AttrValue::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// Every string reachable from this value (for privacy checks).
    fn collect_strings(&self, out: &mut Vec<String>) {
        match self {
            AttrValue::Str(s) => out.push(s.clone()),
            AttrValue::Bytes(b) => out.push(String::from_utf8_lossy(b).into_owned()),
            AttrValue::Array(a) => a.iter().for_each(|v| v.collect_strings(out)),
            AttrValue::Map(m) => m.iter().for_each(|(k, v)| {
                out.push(k.clone());
                v.collect_strings(out)
            }),
            _ => {}
        }
    }
}

impl fmt::Display for AttrValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttrValue::Str(s) => write!(f, "{s:?}"),
            AttrValue::Int(i) => write!(f, "{i}"),
            AttrValue::Double(d) => write!(f, "{d}"),
            AttrValue::Bool(b) => write!(f, "{b}"),
            AttrValue::Bytes(b) => write!(f, "bytes{b:?}"),
            AttrValue::Array(a) => write!(f, "{a:?}"),
            AttrValue::Map(m) => write!(f, "{m:?}"),
            AttrValue::Empty => write!(f, "<empty>"),
        }
    }
}

fn attrs_to_map(kvs: &[KeyValue]) -> BTreeMap<String, AttrValue> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), AttrValue::from_any(kv.value.as_ref())))
        .collect()
}

/// Which OTLP transport delivered a span.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Grpc,
    Http,
}

/// One span, flattened with its resource and scope.
#[derive(Clone, Debug)]
pub struct CollectedSpan {
    pub trace_id: String,
    pub span_id: String,
    /// `None` when the parent span id is empty.
    pub parent_span_id: Option<String>,
    pub name: String,
    /// "SERVER", "CLIENT", "INTERNAL", "PRODUCER", "CONSUMER" or "UNSPECIFIED".
    pub kind: String,
    pub start_ns: u64,
    pub end_ns: u64,
    /// "UNSET", "OK" or "ERROR".
    pub status: String,
    pub status_message: String,
    pub attributes: BTreeMap<String, AttrValue>,
    pub resource: BTreeMap<String, AttrValue>,
    pub scope_name: String,
    pub events: Vec<(String, BTreeMap<String, AttrValue>)>,
    /// Span links: (trace id, span id, attributes).
    pub links: Vec<(String, String, BTreeMap<String, AttrValue>)>,
    pub transport: Transport,
}

impl CollectedSpan {
    pub fn attr(&self, key: &str) -> Option<&AttrValue> {
        self.attributes.get(key)
    }
    pub fn attr_str(&self, key: &str) -> Option<&str> {
        self.attr(key).and_then(AttrValue::as_str)
    }
    pub fn attr_int(&self, key: &str) -> Option<i64> {
        self.attr(key).and_then(AttrValue::as_int)
    }
    pub fn res_str(&self, key: &str) -> Option<&str> {
        self.resource.get(key).and_then(AttrValue::as_str)
    }
    pub fn res_int(&self, key: &str) -> Option<i64> {
        self.resource.get(key).and_then(AttrValue::as_int)
    }
    pub fn service_name(&self) -> Option<&str> {
        self.res_str("service.name")
    }
    pub fn url_path(&self) -> Option<&str> {
        self.attr_str("url.path")
    }
    pub fn is_server(&self) -> bool {
        self.kind == "SERVER"
    }
    pub fn is_client(&self) -> bool {
        self.kind == "CLIENT"
    }
    pub fn duration(&self) -> Duration {
        Duration::from_nanos(self.end_ns.saturating_sub(self.start_ns))
    }

    /// Every string this span carries: ids, names, attribute keys and values, resource, events.
    pub fn all_strings(&self) -> Vec<String> {
        let mut out = vec![
            self.trace_id.clone(),
            self.span_id.clone(),
            self.name.clone(),
            self.status_message.clone(),
            self.scope_name.clone(),
        ];
        for (k, v) in self.attributes.iter().chain(self.resource.iter()) {
            out.push(k.clone());
            v.collect_strings(&mut out);
        }
        for (name, attrs) in &self.events {
            out.push(name.clone());
            for (k, v) in attrs {
                out.push(k.clone());
                v.collect_strings(&mut out);
            }
        }
        out
    }
}

impl fmt::Display for CollectedSpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:?} status={} dur={:?} trace={} span={} parent={:?} svc={:?} attrs={{",
            self.kind,
            self.name,
            self.status,
            self.duration(),
            self.trace_id,
            self.span_id,
            self.parent_span_id,
            self.service_name()
        )?;
        for (i, (k, v)) in self.attributes.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{k}={v}")?;
        }
        write!(f, "}}")
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Flatten an export request into spans.
pub fn flatten(req: &ExportTraceServiceRequest, transport: Transport) -> Vec<CollectedSpan> {
    let mut out = Vec::new();
    for rs in &req.resource_spans {
        let resource = rs
            .resource
            .as_ref()
            .map(|r| attrs_to_map(&r.attributes))
            .unwrap_or_default();
        for ss in &rs.scope_spans {
            let scope_name = ss.scope.as_ref().map(|s| s.name.clone()).unwrap_or_default();
            for s in &ss.spans {
                let kind = match SpanKind::try_from(s.kind).unwrap_or(SpanKind::Unspecified) {
                    SpanKind::Unspecified => "UNSPECIFIED",
                    SpanKind::Internal => "INTERNAL",
                    SpanKind::Server => "SERVER",
                    SpanKind::Client => "CLIENT",
                    SpanKind::Producer => "PRODUCER",
                    SpanKind::Consumer => "CONSUMER",
                };
                let (status, status_message) = match &s.status {
                    Some(st) => (
                        match StatusCode::try_from(st.code).unwrap_or(StatusCode::Unset) {
                            StatusCode::Unset => "UNSET",
                            StatusCode::Ok => "OK",
                            StatusCode::Error => "ERROR",
                        },
                        st.message.clone(),
                    ),
                    None => ("UNSET", String::new()),
                };
                out.push(CollectedSpan {
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: (!s.parent_span_id.is_empty()).then(|| hex(&s.parent_span_id)),
                    name: s.name.clone(),
                    kind: kind.to_string(),
                    start_ns: s.start_time_unix_nano,
                    end_ns: s.end_time_unix_nano,
                    status: status.to_string(),
                    status_message,
                    attributes: attrs_to_map(&s.attributes),
                    resource: resource.clone(),
                    scope_name: scope_name.clone(),
                    events: s
                        .events
                        .iter()
                        .map(|e| (e.name.clone(), attrs_to_map(&e.attributes)))
                        .collect(),
                    links: s
                        .links
                        .iter()
                        .map(|l| (hex(&l.trace_id), hex(&l.span_id), attrs_to_map(&l.attributes)))
                        .collect(),
                    transport,
                });
            }
        }
    }
    out
}

/// One export request as it arrived.
#[derive(Clone, Debug)]
pub struct RawRequest {
    pub transport: Transport,
    /// Lower-cased header names with their values.
    pub headers: Vec<(String, String)>,
    pub path: String,
    pub content_type: String,
    pub body: Vec<u8>,
    /// Number of spans decoded, or the decode error.
    pub decoded: std::result::Result<usize, String>,
}

#[derive(Default)]
struct State {
    spans: Vec<CollectedSpan>,
    requests: Vec<RawRequest>,
    fault: Fault,
    /// Export requests refused by the fault (neither their spans nor the request recorded).
    refused: usize,
}

/// A collector misbehaving, as the export-fault tests set it ([`Receiver::set_fault`]).
#[derive(Clone, Debug, Default)]
pub struct Fault {
    /// Refuse the next this many export requests: HTTP 503, gRPC `Unavailable`.
    pub unavailable: usize,
    /// Refuse requests carrying more than this many spans: HTTP 413 (gRPC: `ResourceExhausted`).
    pub max_spans: Option<usize>,
    /// Answer each request this late.
    pub delay: Duration,
}

/// What the fault makes of a request carrying `spans` spans: the HTTP status to refuse it
/// with, if any (counted as refused).
fn refusal(shared: &Shared, spans: usize) -> Option<u16> {
    let mut st = shared.lock();
    let status = if st.fault.unavailable > 0 {
        st.fault.unavailable -= 1;
        Some(503)
    } else if st.fault.max_spans.is_some_and(|m| spans > m) {
        Some(413)
    } else {
        None
    };
    st.refused += usize::from(status.is_some());
    status
}

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<State>>);

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one export request (either transport) and the spans it carried.
    fn record(&self, request: RawRequest, spans: Vec<CollectedSpan>) {
        let mut st = self.lock();
        st.requests.push(request);
        st.spans.extend(spans);
    }
}

#[derive(Clone)]
struct GrpcService(Shared);

#[tonic::async_trait]
impl TraceService for GrpcService {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> std::result::Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let headers = header_pairs(&request.metadata().clone().into_headers());
        let content_type = headers
            .iter()
            .find(|(k, _)| k == "content-type")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let req = request.into_inner();
        let spans = flatten(&req, Transport::Grpc);
        let delay = self.0.lock().fault.delay;
        tokio::time::sleep(delay).await;
        match refusal(&self.0, spans.len()) {
            Some(413) => return Err(tonic::Status::resource_exhausted("request too large")),
            Some(_) => return Err(tonic::Status::unavailable("refused by the test's fault")),
            None => {}
        }
        let raw = RawRequest {
            transport: Transport::Grpc,
            headers,
            path: "/opentelemetry.proto.collector.trace.v1.TraceService/Export".into(),
            content_type,
            body: req.encode_to_vec(),
            decoded: Ok(spans.len()),
        };
        self.0.record(raw, spans);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Request headers as (lower-case name, value) pairs, as both transports record them.
fn header_pairs(headers: &hyper::HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_ascii_lowercase(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

async fn http_handler(
    shared: Shared,
    req: Request<Incoming>,
) -> std::result::Result<Response<Full<hyper::body::Bytes>>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let headers = header_pairs(req.headers());
    let content_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes().to_vec(),
        Err(e) => {
            return Ok(Response::builder()
                .status(400)
                .body(Full::new(format!("body: {e}").into_bytes().into()))
                .unwrap());
        }
    };
    let reply = |status: u16, body: Vec<u8>, ct: &str| {
        Ok(Response::builder()
            .status(status)
            .header("content-type", ct)
            .body(Full::new(body.into()))
            .unwrap())
    };
    // Every request is recorded once, with what became of it.
    let (decoded, spans, response) = if method != hyper::Method::POST || path != "/v1/traces" {
        (
            Err(format!("unexpected {method} {path}")),
            Vec::new(),
            (404, b"not found".to_vec(), "text/plain"),
        )
    } else {
        let json = content_type.starts_with("application/json");
        let decoded = if json {
            serde_json::from_slice::<ExportTraceServiceRequest>(&body).map_err(|e| e.to_string())
        } else {
            ExportTraceServiceRequest::decode(body.as_slice()).map_err(|e| e.to_string())
        };
        match decoded {
            Ok(req) => {
                let spans = flatten(&req, Transport::Http);
                let delay = shared.lock().fault.delay;
                tokio::time::sleep(delay).await;
                if let Some(status) = refusal(&shared, spans.len()) {
                    return reply(status, b"refused by the test's fault".to_vec(), "text/plain");
                }
                let response = if json {
                    (200, b"{}".to_vec(), "application/json")
                } else {
                    let ok = ExportTraceServiceResponse::default().encode_to_vec();
                    (200, ok, "application/x-protobuf")
                };
                (Ok(spans.len()), spans, response)
            }
            Err(e) => (
                Err(format!("decode: {e}")),
                Vec::new(),
                (400, format!("decode: {e}").into_bytes(), "text/plain"),
            ),
        }
    };
    let raw = RawRequest {
        transport: Transport::Http,
        headers,
        path,
        content_type,
        body,
        decoded,
    };
    shared.record(raw, spans);
    let (status, body, ct) = response;
    reply(status, body, ct)
}

/// The running receiver. Dropping it shuts the runtime down.
pub struct Receiver {
    shared: Shared,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    /// Both servers speak TLS (`https://` endpoints).
    tls: bool,
    runtime: Option<tokio::runtime::Runtime>,
}

/// A TLS receiver's credentials (PEM): its certificate and key, and the authority its clients'
/// certificates must come from.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    pub client_ca: Vec<u8>,
}

impl ServerTls {
    /// A rustls server configuration that asks every client for a certificate from `client_ca`.
    fn rustls(&self) -> Result<rustls::ServerConfig> {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&self.client_ca) {
            roots.add(c.context("client CA")?)?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider.clone())
            .build()
            .context("client verifier")?;
        let certs = CertificateDer::pem_slice_iter(&self.cert)
            .collect::<Result<Vec<_>, _>>()
            .context("server certificate")?;
        let key = PrivateKeyDer::from_pem_slice(&self.key).context("server key")?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(cfg)
    }
}

impl Receiver {
    /// Start both the gRPC and the HTTP receiver on ephemeral 127.0.0.1 ports.
    pub fn start() -> Result<Self> {
        Self::start_on(0, 0)
    }

    /// [`Self::start`] on given ports (a collector that comes up where an agent already sends).
    pub fn start_on(grpc_port: u16, http_port: u16) -> Result<Self> {
        Self::start_with(grpc_port, http_port, None)
    }

    /// Both receivers over TLS, each asking the exporter for a client certificate.
    pub fn start_tls(tls: &ServerTls) -> Result<Self> {
        Self::start_with(0, 0, Some(tls))
    }

    fn start_with(grpc_port: u16, http_port: u16, tls: Option<&ServerTls>) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("otlp-receiver")
            .build()
            .context("tokio runtime")?;
        let shared = Shared::default();

        let (grpc_listener, http_listener) = runtime.block_on(async {
            let g = tokio::net::TcpListener::bind(("127.0.0.1", grpc_port)).await?;
            let h = tokio::net::TcpListener::bind(("127.0.0.1", http_port)).await?;
            Ok::<_, std::io::Error>((g, h))
        })?;
        let grpc_addr = grpc_listener.local_addr()?;
        let http_addr = http_listener.local_addr()?;

        let svc = TraceServiceServer::new(GrpcService(shared.clone()));
        let mut grpc_server = tonic::transport::Server::builder();
        if let Some(t) = tls {
            grpc_server = grpc_server.tls_config(
                tonic::transport::ServerTlsConfig::new()
                    .identity(tonic::transport::Identity::from_pem(&t.cert, &t.key))
                    .client_ca_root(tonic::transport::Certificate::from_pem(&t.client_ca)),
            )?;
        }
        let acceptor = tls
            .map(|t| {
                t.rustls()
                    .map(|c| tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(c)))
            })
            .transpose()?;
        runtime.spawn(async move {
            let incoming = tonic::transport::server::TcpIncoming::from(grpc_listener);
            if let Err(e) = grpc_server.add_service(svc).serve_with_incoming(incoming).await {
                eprintln!("[receiver] gRPC server stopped: {e}");
            }
        });

        let http_shared = shared.clone();
        runtime.spawn(async move {
            loop {
                let (stream, _) = match http_listener.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("[receiver] accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let shared = http_shared.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| http_handler(shared.clone(), req));
                    let http = hyper::server::conn::http1::Builder::new().keep_alive(true).clone();
                    match acceptor {
                        Some(a) => match a.accept(stream).await {
                            Ok(tls) => {
                                let _ = http.serve_connection(TokioIo::new(tls), service).await;
                            }
                            Err(e) => eprintln!("[receiver] TLS handshake: {e}"),
                        },
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                    }
                });
            }
        });

        Ok(Self {
            shared,
            grpc_addr,
            http_addr,
            tls: tls.is_some(),
            runtime: Some(runtime),
        })
    }

    /// `http://127.0.0.1:PORT` (`https://` over TLS) of the gRPC receiver.
    pub fn grpc_endpoint(&self) -> String {
        self.endpoint(self.grpc_addr)
    }
    /// The HTTP receiver's, likewise (the exporter appends `/v1/traces`).
    pub fn http_endpoint(&self) -> String {
        self.endpoint(self.http_addr)
    }
    fn endpoint(&self, addr: SocketAddr) -> String {
        if self.tls {
            format!("https://{addr}")
        } else {
            format!("http://{addr}")
        }
    }
    pub fn grpc_port(&self) -> u16 {
        self.grpc_addr.port()
    }
    pub fn http_port(&self) -> u16 {
        self.http_addr.port()
    }

    /// Snapshot of every span received so far.
    pub fn spans(&self) -> Vec<CollectedSpan> {
        self.shared.lock().spans.clone()
    }
    /// Run `f` on the spans received so far, without copying them (the agent also reports the
    /// rest of the machine's traffic, which can be a lot).
    pub fn with_spans<R>(&self, f: impl FnOnce(&[CollectedSpan]) -> R) -> R {
        f(&self.shared.lock().spans)
    }
    /// Copies of the spans that satisfy `filter`.
    pub fn matching(&self, filter: impl Fn(&CollectedSpan) -> bool) -> Vec<CollectedSpan> {
        self.with_spans(|spans| spans.iter().filter(|s| filter(s)).cloned().collect())
    }
    /// Snapshot of every export request received so far.
    pub fn requests(&self) -> Vec<RawRequest> {
        self.shared.lock().requests.clone()
    }
    pub fn request_count(&self) -> usize {
        self.shared.lock().requests.len()
    }

    /// Poll (every 50 ms) until `pred` holds for the spans received so far.
    pub fn wait_for<F>(&self, timeout: Duration, mut pred: F) -> Result<()>
    where
        F: FnMut(&[CollectedSpan]) -> bool,
    {
        let deadline = Instant::now() + timeout;
        loop {
            let (ok, n) = self.with_spans(|spans| (pred(spans), spans.len()));
            if ok {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {timeout:?} waiting for spans ({n} received in {} requests)",
                    self.request_count()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait until at least `count` spans match `filter`, then let `settle` pass (so duplicates
    /// would show up) and return every matching span. On timeout the error lists what matched.
    pub fn wait_for_matching<F>(
        &self,
        count: usize,
        timeout: Duration,
        settle: Duration,
        filter: F,
    ) -> Result<Vec<CollectedSpan>>
    where
        F: Fn(&CollectedSpan) -> bool,
    {
        let res = self.wait_for(timeout, |spans| spans.iter().filter(|s| filter(s)).count() >= count);
        if let Err(e) = res {
            let matched: Vec<String> = self.matching(&filter).iter().map(|s| format!("  {s}")).collect();
            bail!(
                "{e}; wanted {count} matching spans, got {}:\n{}",
                matched.len(),
                matched.join("\n")
            );
        }
        std::thread::sleep(settle);
        Ok(self.matching(&filter))
    }

    /// From now on, misbehave as `fault` says.
    pub fn set_fault(&self, fault: Fault) {
        self.shared.lock().fault = fault;
    }

    /// Export requests refused by a fault so far.
    pub fn refused(&self) -> usize {
        self.shared.lock().refused
    }

    /// Whether any export request carried `name: value` (case-insensitive name).
    pub fn saw_header(&self, name: &str, value: &str) -> bool {
        let name = name.to_ascii_lowercase();
        self.requests()
            .iter()
            .any(|r| r.headers.iter().any(|(k, v)| *k == name && v == value))
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}
