//! `cargo xtask test`: the whole suite, in the order that fails fastest.
use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::{setup, util};

/// Seconds of each fuzz target in the test suite (`cargo xtask fuzz` runs longer ones).
const FUZZ_SECONDS: u64 = 15;

pub struct Selection {
    pub unit: bool,
    pub e2e: bool,
    /// Only the deployment checks, on the release binary already built.
    pub deploy_only: bool,
}

struct Step {
    name: &'static str,
    cmd: Command,
    /// Runs Rust tests: its `test result:` lines are added up.
    counts: bool,
}

pub fn test(sel: &Selection) -> Result<()> {
    let bin = util::target_dir().join("release/sockspan");
    let mut steps = Vec::new();
    if sel.unit {
        steps.push(Step {
            name: "fmt",
            cmd: cargo(&["fmt", "--all", "--", "--check"]),
            counts: false,
        });
        steps.push(Step {
            name: "clippy",
            cmd: cargo(&["clippy", "--all-targets", "--", "-D", "warnings"]),
            counts: false,
        });
        steps.push(Step {
            name: "unit + replay tests",
            cmd: cargo(&["test"]),
            counts: true,
        });
        // A bounded coverage-guided pass of every fuzz target; a failing input fails the suite.
        let mut fuzz = Command::new(std::env::current_exe().context("cannot find the xtask binary")?);
        fuzz.args(["fuzz", "--seconds", &FUZZ_SECONDS.to_string()]);
        steps.push(Step {
            name: "fuzz (bounded)",
            cmd: fuzz,
            counts: false,
        });
    }
    if sel.e2e {
        steps.push(Step {
            name: "release build",
            cmd: cargo(&["build", "--release", "-p", "agent"]),
            counts: false,
        });
        steps.push(deploy_step(&bin)?);
        let mut e2e = cargo(&[
            "test",
            "-p",
            "agent-integration-tests",
            "--release",
            "--",
            "--test-threads=1",
        ]);
        e2e.env("SOCKSPAN_BIN", &bin);
        steps.push(Step {
            name: "end-to-end tests",
            cmd: e2e,
            counts: true,
        });
    }
    if sel.deploy_only {
        steps.push(deploy_step(&util::sockspan_bin())?);
    }

    let names: Vec<&'static str> = steps.iter().map(|s| s.name).collect();
    let mut done: Vec<(&str, Duration, bool)> = Vec::new();
    let t = Instant::now();
    let res = setup::setup(&[]);
    done.push(("setup", t.elapsed(), res.is_ok()));
    if let Err(e) = res {
        summary(&done, &names);
        return Err(e.context("test step `setup` failed"));
    }
    let (mut passed, mut failed) = (0, 0);
    for (i, step) in steps.iter_mut().enumerate() {
        println!("\n==> xtask test: {} ({})", step.name, util::show(&step.cmd));
        let t = Instant::now();
        let what = format!("test step `{}`", step.name);
        let res = if step.counts {
            util::run_counting(&what, &mut step.cmd).map(|(p, f)| {
                passed += p;
                failed += f;
            })
        } else {
            util::run(&what, &mut step.cmd)
        };
        done.push((step.name, t.elapsed(), res.is_ok()));
        if let Err(e) = res {
            summary(&done, &names[i + 1..]);
            println!("tests: {passed} passed, {} failed", failed.max(1));
            return Err(e);
        }
    }
    summary(&done, &[]);
    println!("xtask test: all {} steps passed", done.len());
    // The closing line: every Rust test harness result, added up.
    println!("tests: {passed} passed, {failed} failed");
    Ok(())
}

/// Chart lint/render/validation, the registry-free image, and the image run with the DaemonSet's
/// capabilities (`cargo xtask deploy`), on the release binary.
fn deploy_step(bin: &std::path::Path) -> Result<Step> {
    let mut cmd = Command::new(std::env::current_exe().context("cannot find the xtask binary")?);
    cmd.arg("deploy").env("SOCKSPAN_BIN", bin);
    Ok(Step {
        name: "deploy",
        cmd,
        counts: false,
    })
}

fn cargo(args: &[&str]) -> Command {
    let mut c = util::cargo();
    c.args(args);
    c
}

fn summary(done: &[(&str, Duration, bool)], skipped: &[&str]) {
    println!("\n==> xtask test summary");
    for (name, d, ok) in done {
        println!(
            "  {:<22} {:<8} {:>8}",
            name,
            if *ok { "ok" } else { "FAILED" },
            util::secs(*d)
        );
    }
    for s in skipped {
        println!("  {:<22} {:<8} {:>8}", s, "skipped", "-");
    }
    let total: Duration = done.iter().map(|d| d.1).sum();
    println!("  {:<22} {:<8} {:>8}", "total", "", util::secs(total));
}
