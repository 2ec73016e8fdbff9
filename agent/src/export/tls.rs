//! TLS for the OTLP export. `https` endpoints work over gRPC and HTTP with the system's trusted
//! roots; the standard variables add to them: `OTEL_EXPORTER_OTLP_[TRACES_]CERTIFICATE` (a PEM
//! bundle of certificate authorities to trust as well: a private collector's CA) and
//! `OTEL_EXPORTER_OTLP_[TRACES_]CLIENT_CERTIFICATE` with `..._CLIENT_KEY` (a PEM certificate
//! chain and its key, for collectors that ask for client certificates).
use std::time::Duration;

use opentelemetry_otlp::{SpanExporter, WithExportConfig as _, WithHttpConfig as _, WithTonicConfig as _};

use super::otlp::ConfigError;

/// The files the variables name, read.
#[derive(Debug, Default, Clone)]
pub struct TlsFiles {
    /// PEM certificate authorities, trusted beside the system's.
    pub ca: Option<Vec<u8>>,
    /// PEM certificate chain and key presented to the collector.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

const CERTIFICATE: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_CERTIFICATE",
];
const CLIENT_CERTIFICATE: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
];
const CLIENT_KEY: [&str; 2] = ["OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", "OTEL_EXPORTER_OTLP_CLIENT_KEY"];

impl TlsFiles {
    /// Reads the files the variables name (the traces-specific variable first). A file that
    /// cannot be read or parsed, or a client certificate without its key, is an error naming
    /// the variable.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let var = |names| signal_var(&get, names);
        let read = |(name, path): (&'static str, String)| {
            std::fs::read(&path)
                .map(|pem| (name, path.clone(), pem))
                .map_err(|e| tls_error(name, &path, e))
        };
        let ca = var(CERTIFICATE).map(read).transpose()?;
        if let Some((name, path, pem)) = &ca {
            let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| tls_error(name, path, e))?;
            if certs.is_empty() {
                return Err(tls_error(name, path, "no PEM certificate in it"));
            }
        }
        let client = match (
            var(CLIENT_CERTIFICATE).map(read).transpose()?,
            var(CLIENT_KEY).map(read).transpose()?,
        ) {
            (None, None) => None,
            (Some((name, path, _)), None) | (None, Some((name, path, _))) => {
                return Err(tls_error(
                    name,
                    &path,
                    "a client certificate needs its key (OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and OTEL_EXPORTER_OTLP_CLIENT_KEY)",
                ));
            }
            (Some((name, path, cert)), Some((_, _, key))) => {
                reqwest::Identity::from_pem(&[cert.as_slice(), b"\n", key.as_slice()].concat())
                    .map_err(|e| tls_error(name, &path, e))?;
                Some((cert, key))
            }
        };
        Ok(Self {
            ca: ca.map(|(_, _, pem)| pem),
            client,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.ca.is_none() && self.client.is_none()
    }

    /// The gRPC exporter's TLS settings: the system's roots, and the files'.
    fn tonic(&self) -> tonic::transport::ClientTlsConfig {
        let mut cfg = tonic::transport::ClientTlsConfig::new().with_native_roots();
        if let Some(ca) = &self.ca {
            cfg = cfg.ca_certificate(tonic::transport::Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = &self.client {
            cfg = cfg.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        cfg
    }

    /// The HTTP exporter's client: the system's roots (the platform verifier), and the files'.
    pub(super) fn reqwest(&self, timeout: Duration) -> Result<reqwest::Client, ConfigError> {
        install_crypto();
        let build = |e: reqwest::Error| ConfigError::Build(format!("the HTTPS client: {e}"));
        let mut b = reqwest::Client::builder().timeout(timeout);
        if let Some(ca) = &self.ca {
            b = b.tls_certs_merge(reqwest::Certificate::from_pem_bundle(ca).map_err(build)?);
        }
        if let Some((cert, key)) = &self.client {
            b = b.identity(
                reqwest::Identity::from_pem(&[cert.as_slice(), b"\n", key.as_slice()].concat()).map_err(build)?,
            );
        }
        b.build().map_err(build)
    }
}

fn tls_error(name: &'static str, path: &str, e: impl std::fmt::Display) -> ConfigError {
    ConfigError::Tls {
        name,
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

/// rustls's cryptography for the process (ring): every reqwest client (the exporter's own, the
/// one made here, the Kubernetes watch's) takes the process default, so it is installed before
/// any is built.
pub fn install_crypto() {
    // An error means one is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The first of a signal's variable and its general form (`OTEL_EXPORTER_OTLP_TRACES_X`, then
/// `OTEL_EXPORTER_OTLP_X`) that is set and not blank: its name and trimmed value.
pub(super) fn signal_var(
    get: &impl Fn(&str) -> Option<String>,
    names: [&'static str; 2],
) -> Option<(&'static str, String)> {
    names.into_iter().find_map(|n| {
        get(n)
            .filter(|v| !v.trim().is_empty())
            .map(|v| (n, v.trim().to_owned()))
    })
}

/// The export protocol the environment asks for (the specification's default:
/// `http/protobuf`, stated explicitly: with JSON compiled in, the exporter would pick it).
pub(super) fn protocol(get: &impl Fn(&str) -> Option<String>) -> opentelemetry_otlp::Protocol {
    let asked = signal_var(
        get,
        ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"],
    )
    .map(|(_, v)| v.to_ascii_lowercase());
    match asked.as_deref() {
        Some("grpc") => opentelemetry_otlp::Protocol::Grpc,
        Some("http/json") => opentelemetry_otlp::Protocol::HttpJson,
        _ => opentelemetry_otlp::Protocol::HttpBinary,
    }
}

/// The export timeout the environment asks for (`OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT`, ms;
/// the specification's default 10 s): the HTTP client made here must apply it itself.
pub(super) fn timeout(get: &impl Fn(&str) -> Option<String>) -> Duration {
    ["OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"]
        .iter()
        .find_map(|k| get(k).and_then(|v| v.trim().parse::<u64>().ok()))
        .map_or(Duration::from_secs(10), Duration::from_millis)
}

/// An exporter built from the standard environment, with `tls`'s files when there are any.
pub fn span_exporter(get: &impl Fn(&str) -> Option<String>, tls: &TlsFiles) -> Result<SpanExporter, ConfigError> {
    // The exporter's own HTTP client is a reqwest one too.
    install_crypto();
    let built = match protocol(get) {
        opentelemetry_otlp::Protocol::Grpc if tls.is_empty() => SpanExporter::builder().with_tonic().build(),
        opentelemetry_otlp::Protocol::Grpc => SpanExporter::builder()
            .with_tonic()
            .with_tls_config(tls.tonic())
            .build(),
        http if tls.is_empty() => SpanExporter::builder().with_http().with_protocol(http).build(),
        http => {
            let timeout = timeout(get);
            SpanExporter::builder()
                .with_http()
                .with_protocol(http)
                .with_timeout(timeout)
                .with_http_client(tls.reqwest(timeout)?)
                .build()
        }
    };
    built.map_err(|e| ConfigError::Build(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).to_owned())
    }

    #[test]
    fn protocols() {
        use opentelemetry_otlp::Protocol;
        assert_eq!(
            protocol(&lookup(&[])),
            Protocol::HttpBinary,
            "the specification's default"
        );
        assert_eq!(
            protocol(&lookup(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")])),
            Protocol::HttpJson
        );
        let both = [
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
        ];
        assert_eq!(protocol(&lookup(&both)), Protocol::Grpc, "the traces variable wins");
    }

    #[test]
    fn bad_files_are_named() {
        let e = TlsFiles::from_lookup(lookup(&[("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/ca.pem")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("OTEL_EXPORTER_OTLP_CERTIFICATE=/nonexistent/ca.pem: "),
            "{e}"
        );
        let not_pem = std::env::temp_dir().join(format!("sockspan-tls-{}.txt", std::process::id()));
        std::fs::write(&not_pem, "hello").unwrap();
        let p = not_pem.display().to_string();
        let e = TlsFiles::from_lookup(lookup(&[("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", &p)]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
        let e = TlsFiles::from_lookup(lookup(&[("OTEL_EXPORTER_OTLP_CLIENT_KEY", &p)]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs its key"), "{e}");
        std::fs::remove_file(not_pem).unwrap();
        assert!(TlsFiles::from_lookup(lookup(&[])).unwrap().is_empty());
    }
}
