//! The live agent: load the kernel programs, start every stage, stop cleanly on a signal.
use std::{path::Path, sync::Arc, time::Duration};

use anyhow::{Context as _, anyhow};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use sockspan::{
    budget::MemoryBudget,
    config::Cli,
    conn::ConnTable,
    export::{BspConfig, OtlpExporter, PrintFormat, otlp},
    loader::{self, KernelConfig},
    pipeline::{self, Processor, Sinks},
    process::ProcessTable,
    reader::Reader,
    sampling::{HeadSampler, Sampler},
    selection::ProcessSelector,
    span::{SpanFactory, SpanOptions},
    telemetry::{self, Metrics},
    views::{SpanFilter, View},
};

/// Why the agent stopped, and the exit code that says so: a library error's own
/// ([`sockspan::Error::exit_code`]), else 1.
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl From<sockspan::Error> for Failure {
    fn from(e: sockspan::Error) -> Self {
        Self {
            code: e.exit_code(),
            error: e.into(),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Self { code: 1, error }
    }
}

/// `?` on each of the library's errors goes through [`sockspan::Error`], for its exit code.
macro_rules! library_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for Failure {
            fn from(e: $t) -> Self {
                sockspan::Error::from(e).into()
            }
        }
    )*};
}
library_errors!(
    sockspan::export::otlp::ConfigError,
    sockspan::budget::BudgetTooSmall,
    sockspan::kube::KubeError,
    sockspan::loader::LoaderError,
    sockspan::views::analyze::AnalyzeError
);

type Result<T, E = Failure> = std::result::Result<T, E>;

/// How long the start waits for the first list of this node's pods (then goes on without).
const PODS_LISTED_WAIT: Duration = Duration::from_secs(5);

/// Kubernetes metadata's settings, when it is on: asked for (an error if it cannot be), or
/// found in a pod (a warning if it cannot be, e.g. no service account token).
fn kubernetes(cli: &Cli, env: impl Fn(&str) -> Option<String>) -> Result<Option<sockspan::kube::ApiConfig>> {
    let asked = cli.kubernetes || cli.kubernetes_api.is_some();
    if !asked && env("KUBERNETES_SERVICE_HOST").is_none() {
        return Ok(None);
    }
    match sockspan::kube::ApiConfig::from_env(cli.kubernetes_api.as_deref(), env) {
        Ok(cfg) => Ok(Some(cfg)),
        Err(e) if !asked => {
            tracing::warn!(error = %e, "In a pod, but no Kubernetes metadata");
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Starts watching this node's pods; waits for the first list a bounded time.
async fn watch_pods(
    cfg: sockspan::kube::ApiConfig,
    counts: Arc<sockspan::kube::KubeCounts>,
) -> sockspan::kube::PodIndex {
    let index = sockspan::kube::PodIndex::default();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let api = cfg.base.clone();
    tokio::spawn(sockspan::kube::keep_current(cfg, index.clone(), counts, tx));
    match tokio::time::timeout(PODS_LISTED_WAIT, rx).await {
        Ok(Ok(())) => tracing::info!(pods = index.len(), api, "Kubernetes metadata on"),
        _ => tracing::warn!(
            api,
            "This node's pods are not listed yet: spans go out without their metadata until they are"
        ),
    }
    index
}

/// How often the cgroup tree is walked for new cgroups to mark (`--trace-cgroup`, ...).
const CGROUP_SCAN_EVERY: Duration = Duration::from_secs(2);

/// Keeps the kernel's marks of the cgroups not selected current, from a thread of its own (a
/// walk of the cgroup tree is blocking file system work). Without a unified (v2) hierarchy, the
/// cgroup rules are applied per process only (see `selection`).
fn mark_cgroups(rules: sockspan::selection::Selection, mut gate: loader::KernelCgroupGate) -> Result<()> {
    let Some(root) = sockspan::selection::unified_root() else {
        tracing::warn!("No unified cgroup hierarchy: cgroup rules are applied to each process after its first event");
        return Ok(());
    };
    let mut scanner = sockspan::selection::CgroupScanner::new(rules, root);
    let marked = scanner.scan(&mut gate);
    tracing::info!(marked, "Cgroups not selected marked in the kernel");
    std::thread::Builder::new()
        .name("cgroups".into())
        .spawn(move || {
            loop {
                std::thread::sleep(CGROUP_SCAN_EVERY);
                scanner.scan(&mut gate);
            }
        })
        .context("start the cgroup thread")?;
    Ok(())
}

/// Batches of raw records waiting between the reader and the processor.
const READER_TO_PROCESSOR: usize = 256;
/// After a signal, draining and the final export must fit in this; detaching the programs
/// (well under a second) follows, all within the 5 s a stop may take.
const SHUTDOWN_BUDGET: Duration = Duration::from_millis(3500);

pub async fn run(cli: Cli) -> Result<()> {
    let env = |k: &str| std::env::var(k).ok();
    let bsp = BspConfig::from_lookup(env)?;
    let exporting = otlp::endpoint_configured(env);
    otlp::check_protocol(env)?;
    otlp::check_compression(env)?;
    let head_sampler = HeadSampler::from_lookup(env)?;
    let print: Option<View> = match (cli.print, exporting) {
        _ if cli.top => Some(View::Top),
        (Some(p), _) => Some(p.into()),
        (None, false) => Some(View::Lines(PrintFormat::Text)),
        (None, true) => None,
    };

    // Listen for signals before the slow start (loading takes seconds): a stop asked for
    // meanwhile is then seen, not lost (a background job starts with SIGINT ignored).
    let stop_signal = stop_signal()?;
    let ring_bytes = cli.ring_bytes.resolve(online_cpus());
    let budget = MemoryBudget::new(cli.memory_limit, u64::from(ring_bytes))?;
    let metrics = Metrics::new();
    metrics.memory_limit.add(budget.limit());
    let loaded = loader::load(KernelConfig {
        capture_bytes: cli.capture_bytes,
        ring_bytes,
        // A sixteenth of the ring: room for 15 more before it fills, and no more wake-ups
        // (each one a context switch) than 256 KiB of events need.
        wakeup_bytes: (ring_bytes / 16).min(agent_common::config::DEFAULT_WAKEUP_BYTES),
        port_mode: cli.select.port_mode(),
        port_entries: cli.select.port_entries(),
        cgroup_rules: cli.select.has_cgroup_rules(),
    })?;
    let loader::Loaded {
        ebpf,
        links,
        events,
        counters,
        gate,
        cgroups,
    } = loaded;
    if cli.select.has_cgroup_rules() {
        mark_cgroups(cli.select.clone(), cgroups)?;
    }
    let attached_ns = sockspan::span::monotonic_ns();

    let processes = match kubernetes(&cli, env)? {
        Some(cfg) => ProcessTable::new().with_pods(watch_pods(cfg, metrics.kube.clone()).await, metrics.kube.clone()),
        None => ProcessTable::new(),
    };

    let cancel = CancellationToken::new();
    let (raw_tx, raw_rx) = mpsc::channel(READER_TO_PROCESSOR);
    let pool = Arc::new(sockspan::reader::BatchPool::default());
    let reader = Reader {
        ring: events,
        metrics: metrics.clone(),
        pool: pool.clone(),
        budget,
    };
    let reader_cancel = cancel.clone();
    let reader_task = tokio::task::spawn_blocking(move || reader.run(raw_tx, reader_cancel));

    // Whether the agent has time to spare: the pipeline judges, the exporter and the
    // printing read.
    let slack = sockspan::courtesy::Slack::default();
    let (otlp_tx, export_task) = if exporting {
        let exporter = OtlpExporter::from_env(bsp, metrics.clone())?.with_slack(slack.clone());
        let (queue, rx) = exporter.queue();
        let sampler = Sampler::new(head_sampler, cli.tail_sampler(), metrics.sampling.clone());
        (
            Some((queue.with_budget(budget), sampler)),
            Some(tokio::spawn(exporter.run(rx))),
        )
    } else {
        (None, None)
    };
    let sinks = Sinks::new(print, cli.filter.clone(), otlp_tx, metrics.clone())
        .context("start the print thread")?
        .with_slack(slack.clone());
    let (go_tx, go_rx) = std::sync::mpsc::channel();
    let stop_hooking = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hooker = {
        let (stop, metrics) = (stop_hooking.clone(), metrics.clone());
        std::thread::Builder::new()
            .name("go-hooks".into())
            .spawn(move || loader::hook_go_programs(ebpf, go_rx, stop, metrics))
            .context("start the Go hooks thread")?
    };
    let conns = if cli.no_go_hooks {
        ConnTable::new()
    } else {
        ConnTable::new().hooking_go(go_tx)
    }
    .attached_at(attached_ns);
    let processor = Processor::new(
        conns,
        processes,
        SpanFactory::new(SpanOptions {
            keep_query_values: cli.keep_query_values,
            keep_path: cli.keep_path,
            routes: cli.route_patterns.clone(),
        }),
        metrics.clone(),
    )
    .with_selection(ProcessSelector::new(cli.select.clone(), Some(Box::new(gate))))
    .with_budget(budget)
    .with_slack(slack);
    let record: Option<Box<dyn std::io::Write + Send>> = match &cli.record {
        Some(path) => {
            let mut f = std::io::BufWriter::new(
                sockspan::replay::create_recording(path)
                    .with_context(|| format!("create recording {} (owner-only, no symlinks)", path.display()))?,
            );
            sockspan::replay::write_header(&mut f).context("write the recording's header")?;
            Some(Box::new(f))
        }
        None => None,
    };
    let pipeline_task = tokio::spawn(pipeline::run(processor, raw_rx, pool, sinks, record));

    if let Some(addr) = cli.metrics_addr {
        let m = metrics.clone();
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("metrics address {addr}"))?;
        tokio::spawn(telemetry::serve(listener, m, Duration::from_secs(cli.unhealthy_after)));
    }
    let kernel_metrics = metrics.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            kernel_metrics.set_kernel(&loader::read_counters(&counters));
        }
    });

    // Loading left megabytes freed (the object file's parse, verifier logs): give them back.
    sockspan::alloc::give_back();
    tracing::info!(
        programs = loader::PROGRAMS.len(),
        capture_bytes = cli.capture_bytes,
        ring_bytes,
        export = if exporting { "otlp" } else { "none" },
        print = ?print,
        "sockspan ready"
    );

    let (mut reader_task, mut pipeline_task) = (reader_task, pipeline_task);
    // A stage that ends before it is told to (a panic, a fatal error) leaves an agent that
    // captures nothing: stop everything and exit non-zero instead.
    let failed: Option<String> = tokio::select! {
        () = stop_signal => None,
        r = &mut reader_task => Some(format!("the ring-buffer reader stopped: {}", ended(r))),
        r = &mut pipeline_task => Some(format!("the pipeline stopped: {}", ended(r))),
    };
    match &failed {
        None => tracing::info!("Stopping: flushing pending spans"),
        Some(why) => tracing::error!("{why}; stopping"),
    }
    cancel.cancel();
    let stopping = std::time::Instant::now();
    let drained = tokio::time::timeout(SHUTDOWN_BUDGET, async {
        if !reader_task.is_finished() || failed.is_none() {
            let _ = (&mut reader_task).await;
        }
        tracing::debug!(elapsed = ?stopping.elapsed(), "Reader stopped");
        if !pipeline_task.is_finished() || failed.is_none() {
            let _ = (&mut pipeline_task).await;
        }
        tracing::debug!(elapsed = ?stopping.elapsed(), "Pipeline drained");
        if let Some(t) = export_task {
            let _ = t.await;
            tracing::debug!(elapsed = ?stopping.elapsed(), "Exporter flushed");
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("Shutdown budget exceeded; exiting with spans still queued");
    }
    stop_hooking.store(true, std::sync::atomic::Ordering::Relaxed);
    let ebpf = hooker.join().map_err(|_| anyhow!("the Go hooks thread panicked"))?;
    loader::detach(ebpf, links);
    tracing::debug!(elapsed = ?stopping.elapsed(), "Programs detached");
    tracing::info!(summary = %metrics.summary(), "sockspan stopped");
    match failed {
        Some(why) => Err(anyhow!(why).into()),
        None => Ok(()),
    }
}

/// How a task that should still run ended.
fn ended<T: std::fmt::Debug>(r: Result<T, tokio::task::JoinError>) -> String {
    match r {
        Ok(v) => format!("it returned {v:?}"),
        Err(e) if e.is_panic() => "it panicked (see the panic message above)".into(),
        Err(e) => e.to_string(),
    }
}

/// CPUs online on the node (every one of them writes to the ring), 1 if unknown.
fn online_cpus() -> usize {
    aya::util::online_cpus().map_or(1, |cpus| cpus.len().max(1))
}

/// Registers the SIGTERM and SIGINT handlers now; the future ends at the first of either.
fn stop_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    })
}

/// Replays a recording and prints its spans.
pub fn replay(path: &std::path::Path, view: View, filter: SpanFilter) -> Result<()> {
    let file = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let batches = sockspan::replay::read_recording(std::io::BufReader::new(file), 1024)
        .with_context(|| format!("read {}", path.display()))?;
    let metrics = Metrics::new();
    let mut processor = Processor::offline(metrics.clone());
    let mut sinks = Sinks::new(Some(view), filter, None, metrics.clone()).context("start the print thread")?;
    for batch in &batches {
        let mut spans = Vec::new();
        processor.process(batch, &mut spans);
        sinks.send(spans);
    }
    let mut spans = Vec::new();
    processor.finish(&mut spans);
    sinks.send(spans);
    if let Some(thread) = sinks.into_print_thread() {
        let _ = thread.join();
    }
    eprintln!("{}", metrics.summary());
    Ok(())
}

/// `sockspan analyze`: the report and the slowest traces of saved spans or a recording.
pub fn analyze(path: &Path, traces: usize, filter: &SpanFilter) -> Result<()> {
    let (spans, skipped) = sockspan::views::analyze::load(path)?;
    if skipped > 0 {
        eprintln!(
            "sockspan: {skipped} lines of {} were not spans (skipped)",
            path.display()
        );
    }
    print!(
        "{}",
        sockspan::views::analyze::analyze(spans, filter, traces, sockspan::views::terminal())
    );
    Ok(())
}
