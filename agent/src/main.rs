//! `sockspan`: the binary edge — parse flags, set up logging, dispatch; the wiring of the
//! live agent (`run`) and its exit codes.
#[cfg(feature = "bench")]
mod bench;
mod run;

use std::process::ExitCode;

use run::Failure;

#[global_allocator]
static GLOBAL: sockspan::alloc::Counting = sockspan::alloc::Counting;
use sockspan::config::{Command, LogFormat};

fn main() -> ExitCode {
    sockspan::alloc::small_pages_only();
    let parsed = match sockspan::config_file::parse(std::env::args_os().collect()) {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            // A bad configuration file: one line naming the key, as for a bad flag.
            eprintln!("sockspan: {e}");
            return ExitCode::from(2);
        }
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One clear line, not clap's usage block.
            eprintln!(
                "sockspan: {} (see `sockspan --help`)",
                sockspan::config_file::first_line(&e)
            );
            return ExitCode::from(2);
        }
    };
    if parsed.cli.print_config {
        print!("{}", sockspan::config_file::render(&parsed, |k| std::env::var(k).ok()));
        return ExitCode::SUCCESS;
    }
    let cli = parsed.cli;
    init_logging(cli.log_format);
    match cli.command {
        Some(Command::Replay { ref file, format }) => report(run::replay(file, format.into(), cli.filter.clone())),
        Some(Command::Analyze { ref file, traces }) => report(run::analyze(file, traces, &cli.filter.clone())),
        #[cfg(feature = "bench")]
        Some(Command::BenchStitch {
            requests,
            concurrency,
            in_flight,
        }) => report(bench::bench_stitch(requests, concurrency, in_flight).map_err(Failure::from)),
        #[cfg(feature = "bench")]
        Some(Command::BenchPipeline {
            connections,
            per_conn,
            body_bytes,
            rounds,
            recording,
        }) => report(
            bench::bench_pipeline(connections, per_conn, body_bytes, rounds, recording.as_deref())
                .map_err(Failure::from),
        ),
        None => {
            // One thread: the stages hand batches to each other without waking other threads,
            // and the agent never competes for more than one core with the services it watches.
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => return report(Err(anyhow::Error::new(e).context("tokio runtime").into())),
            };
            let result = runtime.block_on(run::run(cli));
            // Everything was flushed already; don't wait for idle connection tasks.
            runtime.shutdown_timeout(std::time::Duration::from_millis(100));
            report(result)
        }
    }
}

fn report(result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("sockspan: {:#}", f.error);
            ExitCode::from(f.code)
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SOCKSPAN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
