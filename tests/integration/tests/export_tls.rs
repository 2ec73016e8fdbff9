//! Export to a collector over TLS that asks for client certificates, as private collectors do:
//! with `OTEL_EXPORTER_OTLP_CERTIFICATE` (the collector's CA) and the client certificate
//! variables, spans arrive over gRPC and HTTP; without the client certificate the collector
//! refuses the connection, no span arrives, and the failures are counted.
//!
//! Needs root, the release agent, python3, curl and openssl (skips outside CI when missing,
//! panics with CI=true).

use std::{path::Path, process::Command, time::Duration};

use agent_integration_tests::{
    Receiver,
    harness::{AgentBuilder, Protocol, Server, TempDir, curl, serial, unique_path},
    receiver::ServerTls,
    require,
};
use anyhow::{Context as _, Result, ensure};

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("run openssl")?;
    ensure!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A certificate authority, and a server and a client certificate it signed (PEM files in `dir`).
fn make_pki(dir: &Path) -> Result<()> {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=sockspan test CA",
    ]);
    openssl(dir, &ca)?;
    for (name, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext)?;
        let (key, csr, pem, extf) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        let mut req = vec!["req"];
        req.extend(ec);
        req.extend(["-keyout", &key, "-out", &csr, "-subj", "/CN=sockspan test"]);
        openssl(dir, &req)?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &extf,
            ],
        )?;
    }
    Ok(())
}

#[test]
fn export_to_a_tls_collector_with_client_certificates() -> Result<()> {
    let _g = serial();
    require!(Python, Curl);
    let dir = TempDir::new("tls")?;
    make_pki(dir.path())?;
    let file = |n: &str| dir.path().join(n).display().to_string();
    let read = |n: &str| std::fs::read(dir.path().join(n));
    let rx = Receiver::start_tls(&ServerTls {
        cert: read("server.pem")?,
        key: read("server.key")?,
        client_ca: read("ca.pem")?,
    })?;
    let srv = Server::python(None)?;
    for proto in [Protocol::Grpc, Protocol::HttpProtobuf] {
        let agent = AgentBuilder::new()
            .otlp(&rx, proto)
            .env("OTEL_EXPORTER_OTLP_CERTIFICATE", file("ca.pem"))
            .env("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", file("client.pem"))
            .env("OTEL_EXPORTER_OTLP_CLIENT_KEY", file("client.key"))
            .start()?;
        let path = unique_path("tls");
        ensure!(curl(&[srv.url(&path)], &[])?[0].status == 200);
        rx.wait_for_matching(2, Duration::from_secs(20), Duration::ZERO, |s| {
            s.url_path() == Some(path.as_str())
        })
        .with_context(|| format!("{proto:?}: spans over TLS"))?;
        agent.stop()?;

        // The same collector, no client certificate: refused, counted, nothing arrives.
        let agent = AgentBuilder::new()
            .otlp(&rx, proto)
            .env("OTEL_EXPORTER_OTLP_CERTIFICATE", file("ca.pem"))
            .metrics()
            .start()?;
        let refused = unique_path("tlsrefused");
        ensure!(curl(&[srv.url(&refused)], &[])?[0].status == 200);
        let m = agent.wait_metrics(Duration::from_secs(20), |m| {
            m.get("sockspan_export_requests_failed_total") > 0.0
        })?;
        ensure!(
            rx.matching(|s| s.url_path() == Some(refused.as_str())).is_empty(),
            "{proto:?}: spans arrived without a client certificate"
        );
        ensure!(
            m.value("sockspan_spans_dropped_total", Some(r#"reason="export_failed""#)) > Some(0.0),
            "{proto:?}: the refused spans are counted"
        );
        agent.stop()?;
    }
    Ok(())
}
