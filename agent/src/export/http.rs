//! sockspan's own OTLP/HTTP protobuf transport: it posts the bytes [`super::proto`] writes
//! straight from sockspan's spans, which the SDK's exporter cannot take (it converts
//! `SpanData` twice before encoding, most of the export's cost). It keeps the SDK exporter's
//! behaviour: the same variables (endpoint, headers, timeout, TLS files), the same retries
//! (429, 502, 503, 504 and network errors, with backoff, jitter and `Retry-After`, within the
//! timeout), and the same error texts, which [`super::otlp`] classifies. The other protocols
//! stay with the SDK's exporter.
use std::time::{Duration, Instant};

use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};

use super::{otlp::ConfigError, tls::signal_var};
use crate::telemetry::Counter;

const DEFAULT_ENDPOINT: &str = "http://localhost:4318";
const TRACES_PATH: &str = "/v1/traces";

/// The SDK's recommended retry policy: 3 retries after the first attempt, from 100 ms doubling
/// to 1.6 s, plus up to 100 ms of jitter; a server's `Retry-After` is followed up to a minute.
const MAX_RETRIES: u32 = 3;
const FIRST_DELAY: Duration = Duration::from_millis(100);
const MAX_DELAY: Duration = Duration::from_millis(1600);
const MAX_JITTER_MS: u64 = 100;
const MAX_THROTTLE: Duration = Duration::from_secs(60);

/// Posts OTLP protobuf requests to the traces endpoint.
pub struct HttpTraces {
    client: reqwest::Client,
    endpoint: reqwest::Url,
    headers: HeaderMap,
    /// Each attempt's limit, and the deadline of an export with its retries.
    timeout: Duration,
}

impl HttpTraces {
    /// The sender the environment asks for, or `None` when the SDK's exporter must send
    /// (another protocol than http/protobuf). Compression was refused before
    /// ([`super::otlp::check_compression`]).
    pub fn from_lookup(
        get: &impl Fn(&str) -> Option<String>,
        tls: &super::tls::TlsFiles,
    ) -> Result<Option<Self>, ConfigError> {
        if super::tls::protocol(get) != opentelemetry_otlp::Protocol::HttpBinary {
            return Ok(None);
        }
        let (name, endpoint) = match signal_var(
            get,
            ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"],
        ) {
            // The signal's own endpoint is used as it is; the general one gets the signal's path.
            Some(("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", v)) => ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", v),
            found => {
                let base = found.map_or(DEFAULT_ENDPOINT.to_owned(), |(_, v)| v);
                (
                    "OTEL_EXPORTER_OTLP_ENDPOINT",
                    format!("{}{TRACES_PATH}", base.trim_end_matches('/')),
                )
            }
        };
        let endpoint = reqwest::Url::parse(&endpoint).map_err(|_| ConfigError::Invalid {
            name,
            value: endpoint,
            what: "URL",
        })?;
        let headers = signal_var(get, ["OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"])
            .map(|(_, v)| parse_headers(&v))
            .unwrap_or_default();
        let timeout = super::tls::timeout(get);
        Ok(Some(Self {
            client: tls.reqwest(timeout)?,
            endpoint,
            headers,
            timeout,
        }))
    }

    /// Sends one request, retrying as the SDK's exporter does (each retry counted in
    /// `retries`). The error says why the last attempt failed, in the SDK's words.
    pub async fn export(&self, body: Vec<u8>, retries: &Counter) -> Result<(), String> {
        let body = bytes::Bytes::from(body);
        let start = Instant::now();
        let mut delay = FIRST_DELAY;
        let mut attempt = 0;
        loop {
            let failure = match self.send(body.clone()).await {
                Ok(()) => return Ok(()),
                Err(f) => f,
            };
            let remaining = self.timeout.saturating_sub(start.elapsed());
            let wait = match failure.retry {
                Retry::No => None,
                Retry::After(server) => Some(server.min(MAX_THROTTLE)),
                Retry::Backoff => Some((delay + jitter()).min(MAX_DELAY)),
            };
            match wait {
                Some(wait) if attempt < MAX_RETRIES && wait < remaining => {
                    attempt += 1;
                    retries.inc();
                    tokio::time::sleep(wait).await;
                    delay = (delay * 2).min(MAX_DELAY);
                }
                _ => return Err(failure.message),
            }
        }
    }

    async fn send(&self, body: bytes::Bytes) -> Result<(), Failure> {
        let request = self
            .client
            .post(self.endpoint.clone())
            .headers(self.headers.clone())
            .header(CONTENT_TYPE, "application/x-protobuf")
            .body(body);
        let response = request.send().await.map_err(|e| Failure {
            retry: Retry::Backoff,
            message: if e.is_timeout() {
                "export timed out".to_owned()
            } else {
                "HTTP export failed: network error".to_owned()
            },
        })?;
        let status = response.status();
        if status.is_success() {
            // Drain the answer so the connection is reused.
            let _ = response.bytes().await;
            return Ok(());
        }
        let code = status.as_u16();
        let retry = match code {
            429 | 503 => response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
                .map_or(Retry::Backoff, |s| Retry::After(Duration::from_secs(s))),
            502 | 504 => Retry::Backoff,
            _ => Retry::No,
        };
        Err(Failure {
            retry,
            message: format!("HTTP export failed with status code: {code}"),
        })
    }
}

struct Failure {
    retry: Retry,
    message: String,
}

enum Retry {
    No,
    Backoff,
    /// The server's `Retry-After`.
    After(Duration),
}

fn jitter() -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let r = std::collections::hash_map::RandomState::new().build_hasher().finish();
    Duration::from_millis(r % (MAX_JITTER_MS + 1))
}

/// `key=value,key2=value2`, values percent-decoded; pairs without a key or value, or that are
/// not valid HTTP, are left out (as the SDK does).
fn parse_headers(spec: &str) -> HeaderMap {
    spec.split_terminator(',')
        .filter_map(|kv| kv.trim().split_once('='))
        .map(|(k, v)| {
            (
                k.trim(),
                percent_decode(v.trim()).unwrap_or_else(|| v.trim().to_owned()),
            )
        })
        .filter(|(k, v)| !k.is_empty() && !v.is_empty())
        .filter_map(|(k, v)| Some((HeaderName::try_from(k).ok()?, HeaderValue::try_from(v).ok()?)))
        .collect()
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).to_owned())
    }

    fn sender(vars: &[(&str, &str)]) -> Option<HttpTraces> {
        let tls = super::super::tls::TlsFiles::from_lookup(lookup(vars)).expect("no TLS files");
        HttpTraces::from_lookup(&lookup(vars), &tls).expect("valid")
    }

    #[test]
    fn endpoints_as_the_specification_builds_them() {
        let url = |vars: &[(&str, &str)]| sender(vars).map(|s| s.endpoint.to_string());
        assert_eq!(url(&[]).as_deref(), Some("http://localhost:4318/v1/traces"));
        assert_eq!(
            url(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/")]).as_deref(),
            Some("http://c:4318/v1/traces")
        );
        assert_eq!(
            url(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://t:9/custom")
            ])
            .as_deref(),
            Some("https://t:9/custom")
        );
    }

    #[test]
    fn other_protocols_stay_with_the_sdk() {
        assert!(sender(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]).is_none());
        assert!(sender(&[("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json")]).is_none());
        assert!(sender(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")]).is_some());
    }

    #[test]
    fn headers_parsed_and_decoded() {
        let h = parse_headers("api-key=a%20b, x-team = core ,bad header=1,=v,k=,");
        assert_eq!(h.get("api-key").map(|v| v.to_str().unwrap()), Some("a b"));
        assert_eq!(h.get("x-team").map(|v| v.to_str().unwrap()), Some("core"));
        assert_eq!(h.len(), 2);
        let s = sender(&[
            ("OTEL_EXPORTER_OTLP_HEADERS", "a=1"),
            ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "b=2"),
        ])
        .expect("http");
        // The signal's variable is used instead of the general one, not merged with it.
        assert!(s.headers.get("b").is_some() && s.headers.get("a").is_none());
    }

    /// A collector on a real socket that answers each request with the next status.
    fn collector(statuses: &'static [u16]) -> String {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            for &status in statuses {
                let Ok((stream, _)) = listener.accept() else { return };
                let mut reader = BufReader::new(stream);
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; length];
                let _ = reader.read_exact(&mut body);
                let answer = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                let _ = reader.get_mut().write_all(answer.as_bytes());
            }
        });
        format!("http://{addr}")
    }

    fn export_to(statuses: &'static [u16]) -> (Result<(), String>, u64) {
        let endpoint = collector(statuses);
        let vars = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())];
        let tls = super::super::tls::TlsFiles::from_lookup(lookup(&vars)).expect("none");
        let http = HttpTraces::from_lookup(&lookup(&vars), &tls)
            .expect("valid")
            .expect("http");
        let retries = Counter::default();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let result = rt.block_on(http.export(vec![1, 2, 3], &retries));
        (result, retries.get())
    }

    #[test]
    fn retryable_statuses_are_retried_and_counted() {
        assert_eq!(export_to(&[503, 502, 200]), (Ok(()), 2));
    }

    #[test]
    fn other_statuses_fail_at_once_in_the_sdks_words() {
        let (result, retries) = export_to(&[400, 200]);
        assert_eq!(retries, 0);
        assert_eq!(result, Err("HTTP export failed with status code: 400".to_owned()));
    }

    #[test]
    fn a_bad_endpoint_is_named() {
        let tls = super::super::tls::TlsFiles::from_lookup(lookup(&[])).expect("none");
        let vars = [("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "not a url")];
        let err = HttpTraces::from_lookup(&lookup(&vars), &tls).err().expect("refused");
        assert!(err.to_string().contains("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"), "{err}");
    }
}
