//! The live agent: load the kernel programs, start every stage, stop cleanly on a signal.
use std::{path::Path, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
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

/// How long the start waits for the first list of this node's pods (then goes on without).
const PODS_LISTED_WAIT: Duration = Duration::from_secs(5);

/// Kubernetes metadata's settings, when it is on: in a pod, or asked for.
fn kubernetes(cli: &Cli, env: impl Fn(&str) -> Option<String>) -> Result<Option<crate::kube::ApiConfig>> {
    let on = cli.kubernetes || cli.kubernetes_api.is_some() || env("KUBERNETES_SERVICE_HOST").is_some();
    if !on {
        return Ok(None);
    }
    Ok(Some(crate::kube::ApiConfig::from_env(
        cli.kubernetes_api.as_deref(),
        env,
    )?))
}

/// Starts watching this node's pods; waits for the first list a bounded time.
async fn watch_pods(cfg: crate::kube::ApiConfig, counts: Arc<crate::kube::KubeCounts>) -> crate::kube::PodIndex {
    let index = crate::kube::PodIndex::default();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let api = cfg.base.clone();
    tokio::spawn(crate::kube::keep_current(cfg, index.clone(), counts, tx));
    match tokio::time::timeout(PODS_LISTED_WAIT, rx).await {
        Ok(Ok(())) => tracing::info!(pods = index.len(), api, "Kubernetes metadata on"),
        _ => tracing::warn!(
            api,
            "This node's pods are not listed yet: spans go out without their metadata until they are"
        ),
    }
    index
}

/// Batches of raw records waiting between the reader and the processor.
const READER_TO_PROCESSOR: usize = 256;
/// After a signal, draining and the final export must fit in this; detaching the programs
/// (well under a second) follows, all within the 5 s a stop may take.
const SHUTDOWN_BUDGET: Duration = Duration::from_millis(3500);

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let env = |k: &str| std::env::var(k).ok();
    let bsp = BspConfig::from_lookup(env)?;
    let exporting = otlp::endpoint_configured(env);
    otlp::check_protocol(env)?;
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
    let budget = MemoryBudget::new(cli.memory_limit, u64::from(cli.ring_bytes))?;
    let metrics = Metrics::new();
    metrics.memory_limit.add(budget.limit());
    let loaded = loader::load(KernelConfig {
        capture_bytes: cli.capture_bytes,
        ring_bytes: cli.ring_bytes,
        wakeup_bytes: (cli.ring_bytes / 64).min(agent_common::config::DEFAULT_WAKEUP_BYTES),
        port_mode: cli.select.port_mode(),
        port_entries: cli.select.port_entries(),
    })?;
    let loader::Loaded {
        ebpf,
        links,
        events,
        counters,
        gate,
    } = loaded;
    let attached_ns = crate::span::monotonic_ns();

    let processes = match kubernetes(&cli, env)? {
        Some(cfg) => ProcessTable::new().with_pods(watch_pods(cfg, metrics.kube.clone()).await, metrics.kube.clone()),
        None => ProcessTable::new(),
    };

    let cancel = CancellationToken::new();
    let (raw_tx, raw_rx) = mpsc::channel(READER_TO_PROCESSOR);
    let pool = Arc::new(crate::reader::BatchPool::default());
    let reader = Reader {
        ring: events,
        metrics: metrics.clone(),
        pool: pool.clone(),
        budget,
    };
    let reader_task = tokio::spawn(reader.run(raw_tx, cancel.clone()));

    let (otlp_tx, export_task) = if exporting {
        let exporter = OtlpExporter::from_env(bsp, metrics.clone()).context("OTLP exporter")?;
        let (queue, rx) = exporter.queue();
        let sampler = Sampler::new(head_sampler, cli.tail_sampler(), metrics.sampling.clone());
        (
            Some((queue.with_budget(budget), sampler)),
            Some(tokio::spawn(exporter.run(rx))),
        )
    } else {
        (None, None)
    };
    let sinks = Sinks::new(print, cli.filter.filter(), otlp_tx, metrics.clone()).context("start the print thread")?;
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
    .with_budget(budget);
    let record: Option<Box<dyn std::io::Write + Send>> = match &cli.record {
        Some(path) => {
            let mut f = std::io::BufWriter::new(
                crate::replay::create_recording(path)
                    .with_context(|| format!("create recording {} (owner-only, no symlinks)", path.display()))?,
            );
            crate::replay::write_header(&mut f)?;
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
    crate::alloc::give_back();
    tracing::info!(
        programs = loader::PROGRAMS.len(),
        capture_bytes = cli.capture_bytes,
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
    let ebpf = hooker
        .join()
        .map_err(|_| anyhow::anyhow!("the Go hooks thread panicked"))?;
    loader::detach(ebpf, links);
    tracing::debug!(elapsed = ?stopping.elapsed(), "Programs detached");
    tracing::info!(summary = %metrics.summary(), "sockspan stopped");
    match failed {
        Some(why) => Err(anyhow::anyhow!(why)),
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
pub fn replay(path: &std::path::Path, view: View, filter: SpanFilter) -> anyhow::Result<()> {
    let file = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let batches = crate::replay::read_recording(std::io::BufReader::new(file), 1024)
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
pub fn analyze(path: &Path, traces: usize, filter: &SpanFilter) -> anyhow::Result<()> {
    let (spans, skipped) = crate::views::analyze::load(path)?;
    if skipped > 0 {
        eprintln!(
            "sockspan: {skipped} lines of {} were not spans (skipped)",
            path.display()
        );
    }
    print!(
        "{}",
        crate::views::analyze::analyze(spans, filter, traces, crate::views::terminal())
    );
    Ok(())
}

/// Pipeline throughput on one thread, on a synthetic stream or a recording: prints events/s and
/// spans/s, then the same with each batch's spans encoded as the OTLP exporter does.
pub fn bench_pipeline(
    connections: u32,
    per_conn: u32,
    body_bytes: usize,
    rounds: u32,
    recording: Option<&Path>,
) -> Result<()> {
    let stream = match recording {
        None => crate::replay::synthetic_sized(connections, per_conn, body_bytes),
        Some(path) => {
            let file = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
            // One batch holds the whole recording.
            crate::replay::read_recording(std::io::BufReader::new(file), usize::MAX)?
                .into_iter()
                .next()
                .unwrap_or_default()
        }
    };
    let events = stream.len();
    let best = |with_export: bool| {
        (0..rounds.max(1))
            .map(|_| {
                let (mut spans, mut bytes) = (0, 0);
                let secs = timed_replay(&stream, &mut |batch| {
                    spans += batch.len();
                    if with_export {
                        bytes += crate::export::otlp::encode_for_bench(batch);
                    }
                });
                (secs, spans, bytes)
            })
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .unwrap_or_default()
    };
    let (secs, spans, _) = best(false);
    println!(
        "events={events} spans={spans} seconds={secs:.3} events_per_sec={:.0} spans_per_sec={:.0}",
        events as f64 / secs,
        spans as f64 / secs
    );
    // The same, and each batch's spans then encoded as the OTLP exporter does (SpanData →
    // protobuf; no network).
    let (secs, spans, bytes) = best(true);
    println!(
        "with_otlp_encoding: spans={spans} otlp_bytes={bytes} seconds={secs:.3} events_per_sec={:.0} spans_per_sec={:.0}",
        events as f64 / secs,
        spans as f64 / secs
    );
    Ok(())
}

/// Replays a stream through a fresh offline pipeline, handing each batch's spans to `sink` as
/// the live agent does; returns the seconds it took.
fn timed_replay(stream: &crate::reader::RawBatch, sink: &mut dyn FnMut(Vec<crate::span::Span>)) -> f64 {
    let mut processor = Processor::offline(Metrics::new());
    let start = std::time::Instant::now();
    process_in_batches(&mut processor, stream, sink);
    let mut spans = Vec::new();
    processor.finish(&mut spans);
    sink(spans);
    start.elapsed().as_secs_f64()
}

/// Stitching throughput (spans/s, one thread, whole userspace pipeline on a two-hop chain) and
/// memory held per in-flight request.
pub fn bench_stitch(requests: u32, concurrency: u32, in_flight: u32) {
    let stream = crate::replay::synthetic_chain(requests, concurrency);
    let (mut spans, mut with_parent) = (0, 0);
    let secs = timed_replay(&stream, &mut |batch| {
        spans += batch.len();
        with_parent += batch.iter().filter(|s| s.parent_span_id.is_some()).count();
    });
    println!(
        "stitch: requests={requests} concurrency={concurrency} spans={spans} with_parent={with_parent} seconds={secs:.3} spans_per_sec={:.0} events_per_sec={:.0}",
        spans as f64 / secs,
        stream.len() as f64 / secs
    );

    let (started, answers) = crate::replay::synthetic_in_flight(in_flight);
    let metrics = Metrics::new();
    let mut processor = Processor::offline(metrics);
    let mut spans = Vec::new();
    let (rss_before, heap_before) = (rss_bytes(), heap_in_use());
    process_in_batches(&mut processor, &started, &mut |b| spans.extend(b));
    let held = processor.stitcher.in_flight() + processor.stitcher.queued();
    let (rss_held, heap_held) = (rss_bytes(), heap_in_use());
    process_in_batches(&mut processor, &answers, &mut |b| spans.extend(b));
    processor.finish(&mut spans);
    let heap = heap_held.saturating_sub(heap_before);
    println!(
        "in_flight: requests={in_flight} held_starts={held} heap_bytes={heap} heap_bytes_per_request={} rss_growth_bytes={} spans_after_answers={} left_in_flight={}",
        heap / u64::from(in_flight.max(1)),
        rss_held.saturating_sub(rss_before),
        spans.len(),
        processor.stitcher.in_flight()
    );
}

/// Feeds a stream in batches of the size the reader hands over; each batch's spans go to `sink`.
fn process_in_batches(
    processor: &mut Processor,
    stream: &crate::reader::RawBatch,
    sink: &mut dyn FnMut(Vec<crate::span::Span>),
) {
    let mut batch = crate::reader::RawBatch::default();
    for rec in stream.iter() {
        batch.push(rec);
        if batch.len() == crate::reader::BATCH_RECORDS {
            let mut spans = Vec::new();
            processor.process(&batch, &mut spans);
            sink(spans);
            batch.bytes.clear();
            batch.ends.clear();
        }
    }
    let mut spans = Vec::new();
    processor.process(&batch, &mut spans);
    sink(spans);
}

/// Bytes allocated and not freed (excludes allocator slack that RSS includes).
fn heap_in_use() -> u64 {
    crate::alloc::live_bytes()
}

/// Resident set size of this process.
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
