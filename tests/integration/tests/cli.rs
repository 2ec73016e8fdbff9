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
