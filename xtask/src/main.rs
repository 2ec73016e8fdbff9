//! `cargo xtask`: set-up, run, test and benchmark sockspan on a Debian 12 machine (as root).
//! The eBPF object itself is built by `agent/build.rs` during a plain `cargo build`.
mod bench;
mod deploy;
mod fuzz;
mod loadgen;
mod overhead;
mod report;
mod setup;
mod sink;
mod testsuite;
mod util;

use std::{ffi::OsString, os::unix::process::CommandExt, path::PathBuf, process::Command};

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Development tasks for sockspan (run as root)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the eBPF toolchain and test/bench dependencies (idempotent; fast when done).
    Setup {
        /// Also install the benchmark tools (wrk, bpftrace).
        #[arg(long)]
        bench: bool,
    },
    /// Set up, build the agent (release) and run it in the foreground.
    Run {
        /// Arguments for `sockspan` (after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Run the whole test suite: fmt, clippy, unit + replay tests, a bounded fuzz pass, release build,
    /// deployment checks, end-to-end tests.
    Test {
        /// Only fmt, clippy, the unit + replay tests and the bounded fuzz pass (no root needed beyond
        /// set-up).
        #[arg(long, conflicts_with_all = ["e2e", "deploy"])]
        unit: bool,
        /// Only the release build, the deployment checks and the end-to-end tests.
        #[arg(long, conflicts_with = "deploy")]
        e2e: bool,
        /// Only the deployment checks (`cargo xtask deploy`), on the release binary already built
        /// (target/release/sockspan, or SOCKSPAN_BIN).
        #[arg(long)]
        deploy: bool,
    },
    /// Build the container image without a registry: FROM scratch over a root filesystem made of
    /// the release binary, its shared libraries and CA certificates (podman build).
    Image,
    /// Deployment checks: lint, render and validate the Helm chart, build the image, and run it
    /// with exactly the DaemonSet's capabilities and mounts until it traces a span.
    Deploy,
    /// Coverage-guided fuzzing (libFuzzer, stable toolchain): each target on a copy of its seed corpus.
    Fuzz {
        /// Target to fuzz (repeatable; default: every target).
        #[arg(long = "target", value_name = "T", value_parser = clap::builder::PossibleValuesParser::new(fuzz::TARGETS))]
        targets: Vec<String>,
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Stop each job after this many executions instead, if sooner.
        #[arg(long)]
        runs: Option<u64>,
        /// libFuzzer processes per target (sharing its corpus).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        jobs: u32,
        /// Rewrite fuzz/corpus/ from the recordings and hand-written samples first.
        #[arg(long)]
        regen_corpus: bool,
        /// More libFuzzer flags (after `--`), e.g. `-- -max_len=4096`.
        #[arg(last = true, value_name = "LIBFUZZER_FLAGS")]
        libfuzzer: Vec<String>,
    },
    /// Benchmarks: pipeline throughput, overhead under wrk vs a bpftrace floor, agent memory
    /// (`bench overhead`: every service and configuration side by side, with the peers).
    Bench {
        #[command(subcommand)]
        what: Option<BenchWhat>,
        /// Seconds per wrk run.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// wrk connections.
        #[arg(long, default_value_t = 32)]
        connections: u32,
        /// Rounds of (off, floor, agent) runs; figures are medians over the rounds.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
        rounds: u32,
        /// Another sockspan binary (e.g. a build of an earlier commit) to run as one more agent
        /// configuration in every round, and to compare the agent with.
        #[arg(long, value_name = "PATH")]
        baseline: Option<PathBuf>,
        /// Print the figures only; leave docs/benchmarks.md unchanged.
        #[arg(long)]
        no_write: bool,
    },
    /// The OTLP/HTTP receiver the benchmarks export to (started by them): stores what it
    /// receives in DIR/bodies.bin until killed.
    #[command(hide = true)]
    OtlpSink {
        dir: PathBuf,
        /// Port on 127.0.0.1 (0: any free one; the one taken is printed).
        #[arg(long, default_value_t = 0)]
        port: u16,
    },
}

#[derive(Subcommand)]
enum BenchWhat {
    /// nginx, Node.js, Python and a two-hop chain, each with no agent, the floor, sockspan
    /// exporting and printing, and the OpenTelemetry zero-code agent: one table of ratios.
    Overhead {
        /// Seconds of the wrk run (maximum req/s) per configuration.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Seconds at each fixed rate.
        #[arg(long, default_value_t = 5)]
        rate_secs: u64,
        /// Fixed rates for the latency figures, req/s.
        #[arg(long, value_delimiter = ',', default_values_t = [1000u32, 5000, 20000])]
        rates: Vec<u32>,
        /// Services to measure.
        #[arg(long, value_delimiter = ',', default_values_t = overhead::names().into_iter().map(String::from).collect::<Vec<_>>(),
              value_parser = clap::builder::PossibleValuesParser::new(overhead::names()))]
        services: Vec<String>,
        /// Print the table only; leave docs/benchmarks.md unchanged.
        #[arg(long)]
        no_write: bool,
    },
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Setup { bench } => setup::setup(if bench { setup::BENCH } else { &[] }),
        Cmd::Run { args } => run(&args),
        Cmd::Test { unit, e2e, deploy } => {
            let all = !unit && !e2e && !deploy;
            testsuite::test(&testsuite::Selection {
                unit: unit || all,
                e2e: e2e || all,
                deploy_only: deploy,
            })
        }
        Cmd::Image => {
            util::require_root("image")?;
            deploy::image(&util::sockspan_bin()).map(|_| ())
        }
        Cmd::Deploy => {
            util::require_root("deploy")?;
            deploy::deploy(&util::sockspan_bin())
        }
        Cmd::Fuzz {
            targets,
            seconds,
            runs,
            jobs,
            regen_corpus,
            libfuzzer,
        } => fuzz::fuzz(&fuzz::Opts {
            targets,
            seconds,
            runs,
            jobs,
            regen_corpus,
            libfuzzer,
        }),
        Cmd::Bench {
            what:
                Some(BenchWhat::Overhead {
                    duration,
                    rate_secs,
                    rates,
                    services,
                    no_write,
                }),
            ..
        } => overhead::overhead(&overhead::Opts {
            duration,
            rate_secs,
            rates,
            services,
            no_write,
            command: bench_command(),
        }),
        Cmd::OtlpSink { dir, port } => sink::serve(&dir, port),
        Cmd::Bench {
            what: None,
            duration,
            connections,
            rounds,
            baseline,
            no_write,
        } => bench::bench(&bench::Opts {
            duration,
            connections,
            rounds,
            baseline,
            no_write,
            command: bench_command(),
        }),
    }
}

/// The command line that reproduces a benchmark run. SOCKSPAN_BIN picks the agent binary (and
/// skips the build), so it is part of it.
fn bench_command() -> String {
    let bin_env = std::env::var_os("SOCKSPAN_BIN").map(|b| format!("SOCKSPAN_BIN={}", b.to_string_lossy()));
    bin_env
        .into_iter()
        .chain(std::iter::once("cargo xtask".to_owned()))
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ")
}

fn run(args: &[OsString]) -> Result<()> {
    setup::setup(&[])?;
    println!("run: cargo build --release -p agent");
    util::run(
        "cargo build --release -p agent",
        util::cargo().args(["build", "--release", "-p", "agent"]),
    )?;
    let bin = util::target_dir().join("release/sockspan");
    println!(
        "run: {} {}",
        bin.display(),
        args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
    );
    // exec: the agent takes over this process, so Ctrl-C and SIGTERM reach it directly.
    let err = Command::new(&bin).args(args).exec();
    bail!("cannot exec {}: {err}", bin.display())
}
