//! Command-line contract: a bad flag is one line on stderr and exit code 2.

use std::{process::Command, time::Duration};

use agent_integration_tests::harness::{self, agent_bin, run};
use anyhow::{Result, ensure};

fn bad_invocation(args: &[&str]) -> Result<()> {
    let mut cmd = Command::new(agent_bin());
    cmd.args(args);
    let (st, out, err) = run(&mut cmd, Duration::from_secs(10))?;
    ensure!(
        st.code() == Some(2),
        "sockspan {args:?}: exit {st}, want 2; stderr:\n{err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    ensure!(
        lines.len() == 1,
        "sockspan {args:?}: want exactly one line on stderr, got {}:\n{err}",
        lines.len()
    );
    ensure!(
        out.trim().is_empty(),
        "sockspan {args:?}: nothing on stdout expected, got:\n{out}"
    );
    Ok(())
}

/// Whether the agent binary is there to run (these tests need it, not root); never false in CI.
fn binary_present() -> Result<bool> {
    if harness::prerequisites(false, &[]) && agent_bin().is_file() {
        return Ok(true);
    }
    ensure!(
        !harness::in_ci(),
        "CI=true: agent binary {} not found",
        agent_bin().display()
    );
    Ok(false)
}

#[test]
fn bad_flag_exits_2_with_one_line() -> Result<()> {
    // needs the binary, not root: a bad flag must be refused before anything is loaded
    if !harness::prerequisites(false, &[]) {
        return Ok(());
    }
    if !agent_bin().is_file() {
        let msg = format!("agent binary {} not found", agent_bin().display());
        if harness::in_ci() {
            panic!("CI=true: {msg}");
        }
        eprintln!("SKIPPED: {msg}");
        return Ok(());
    }
    bad_invocation(&["--definitely-not-a-flag"])?;
    bad_invocation(&["--capture-bytes", "lots"])?;
    bad_invocation(&["--print=yaml"])?;
    bad_invocation(&["--log-format", "xml"])?;
    Ok(())
}

/// `sockspan analyze` on spans saved with `--print=json` (here from a replayed recording of a
/// curl → Python → nginx → Node.js chain): the report and the slowest traces' timelines;
/// filters apply; a file of something else is one clear line and exit code 1.
#[test]
fn analyze_reports_saved_spans() -> Result<()> {
    if !binary_present()? {
        return Ok(());
    }
    let dir = harness::TempDir::new("analyze")?;
    let rec = harness::workspace_root().join("tests/fixtures/replay/chain.rec");
    let mut replay = Command::new(agent_bin());
    replay.arg("replay").arg(&rec).args(["--format", "json"]);
    let (st, json, err) = run(&mut replay, Duration::from_secs(30))?;
    ensure!(st.success(), "replay: {st}\n{err}");
    let saved = dir.path().join("spans.json");
    std::fs::write(&saved, &json)?;

    let mut analyze = Command::new(agent_bin());
    analyze.arg("analyze").arg(&saved).args(["--traces", "1"]);
    let (st, out, err) = run(&mut analyze, Duration::from_secs(30))?;
    ensure!(st.success(), "analyze: {st}\n{err}");
    ensure!(
        out.contains("slowest operations") && out.contains("time per service"),
        "{out}"
    );
    for svc in ["python3", "nginx", "node"] {
        ensure!(out.contains(svc), "{svc} in the report:\n{out}");
    }
    ensure!(
        out.matches("\ntrace ").count() + usize::from(out.starts_with("trace ")) == 1,
        "one timeline:\n{out}"
    );
    ensure!(out.contains("bottleneck:") && out.contains("(via connection)"), "{out}");

    let mut only = Command::new(agent_bin());
    only.arg("analyze").arg(&saved).args(["--service", "node"]);
    let (_, out, _) = run(&mut only, Duration::from_secs(30))?;
    let report = out.split("\ntrace ").next().unwrap_or_default();
    ensure!(
        report.contains("node SERVER") && !report.contains("python3 SERVER"),
        "--service node: only node's operations:\n{out}"
    );

    let junk = dir.path().join("junk.bin");
    std::fs::write(&junk, b"\x00\x01 not spans")?;
    let mut bad = Command::new(agent_bin());
    bad.arg("analyze").arg(&junk);
    let (st, out, err) = run(&mut bad, Duration::from_secs(30))?;
    ensure!(st.code() == Some(1) && out.is_empty(), "exit {st}, stdout {out}");
    ensure!(
        err.trim().lines().count() == 1 && err.contains("neither JSON spans"),
        "{err}"
    );
    Ok(())
}

/// The configuration file: a bad key or value is one line naming the key and its line, exit 2;
/// `--print-config` shows each setting's value and source (flag > env > file > default), and
/// masks secrets.
#[test]
fn config_file_precedence_and_errors() -> Result<()> {
    if !binary_present()? {
        return Ok(());
    }
    let dir = harness::TempDir::new("config")?;
    let file = dir.path().join("sockspan.yaml");
    std::fs::write(
        &file,
        "# node agent\nmemory_limit: 128MiB\nunhealthy_after: 30\nprint: traces\nservice: [checkout, 'pay*']\n",
    )?;
    let f = file.display().to_string();
    let mut show = Command::new(agent_bin());
    show.args(["--config", &f, "--print-config", "--unhealthy-after", "90"])
        .env("SOCKSPAN_PRINT", "json")
        .env("OTEL_EXPORTER_OTLP_HEADERS", "api-key=s3cret");
    let (st, out, err) = run(&mut show, Duration::from_secs(10))?;
    ensure!(st.success(), "--print-config: {st}\n{err}");
    for line in [
        "memory_limit: 128MiB  # file",
        "unhealthy_after: 90  # flag",
        "print: json  # env",
        "service: [checkout, \"pay*\"]  # file",
        "capture_bytes: 1024  # default",
        "# OTEL_EXPORTER_OTLP_HEADERS=api-key=***",
    ] {
        ensure!(out.lines().any(|l| l == line), "`{line}` in:\n{out}");
    }
    ensure!(!out.contains("s3cret"), "a secret printed:\n{out}");

    std::fs::write(&file, "memory_limit: 128MiB\nring_bites: 65536\n")?;
    bad_invocation(&["--config", &f])?;
    let mut cmd = Command::new(agent_bin());
    cmd.args(["--config", &f]);
    let (_, _, err) = run(&mut cmd, Duration::from_secs(10))?;
    ensure!(err.contains("line 2: unknown key `ring_bites`"), "{err}");
    std::fs::write(&file, "status: 7\n")?;
    bad_invocation(&["--config", &f])?;
    bad_invocation(&["--config", "/nonexistent/sockspan.yaml"])?;
    Ok(())
}
