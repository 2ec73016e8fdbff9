//! Command line (each flag has a `SOCKSPAN_*` environment twin, as DaemonSets set env).
//! The OTLP destination follows the standard `OTEL_EXPORTER_OTLP_*` / `OTEL_BSP_*` variables.
use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand, ValueEnum};

use crate::{
    export::PrintFormat,
    views::{SpanFilter, View, filter::parse_duration},
};

#[derive(Debug, Parser)]
#[command(
    name = "sockspan",
    version,
    about = "Trace HTTP services from socket syscalls with eBPF and export OpenTelemetry spans",
    long_about = "Trace HTTP services from socket syscalls with eBPF and export OpenTelemetry spans.\n\n\
        With OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) set, spans are exported over OTLP \
        (OTEL_EXPORTER_OTLP_PROTOCOL=grpc|http/protobuf|http/json, OTEL_EXPORTER_OTLP_HEADERS, OTEL_BSP_*); without one, live \
        spans are printed on stdout. Must run as root."
)]
pub struct Cli {
    /// Read settings from this YAML file: one key per flag, in snake_case (`memory_limit: 128MiB`,
    /// `service: [checkout, pay*]`); flags and `SOCKSPAN_*` variables win over it. Its schema:
    /// docs/config.schema.json.
    #[arg(long, env = "SOCKSPAN_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Print every setting's effective value and where it came from (default, file, env, flag),
    /// secrets masked, and exit.
    #[arg(long)]
    pub print_config: bool,

    /// Print spans on stdout: `text` (one line per span, the default), `json` (one object per
    /// line) or `traces` (each completed local trace as a timeline). On by default when no OTLP
    /// endpoint is configured.
    #[arg(long, env = "SOCKSPAN_PRINT", value_name = "FORMAT", num_args = 0..=1, require_equals = true, default_missing_value = "text")]
    pub print: Option<PrintArg>,

    /// Payload bytes captured per response syscall (status line and headers must fit). Calls that
    /// carry requests, and responses of connections that pipeline, are captured whole up to 64 KiB.
    #[arg(long, env = "SOCKSPAN_CAPTURE_BYTES", default_value_t = agent_common::config::DEFAULT_CAPTURE_BYTES,
          value_parser = clap::value_parser!(u32).range(64..=agent_common::MAX_CAPTURE as i64))]
    pub capture_bytes: u32,

    /// The agent's whole memory (resident bytes; e.g. `256MiB`). Past it, state is given back,
    /// least useful first, and new events or spans are dropped, all counted
    /// (`sockspan_memory_shed_total`, `reason="memory_limit"`).
    #[arg(long, env = "SOCKSPAN_MEMORY_LIMIT", value_name = "SIZE", default_value = "256MiB",
          value_parser = crate::budget::parse_size)]
    pub memory_limit: u64,

    /// Kernel ring buffer size: `auto` (2 MiB per online CPU, from 4 to 32 MiB) or a size (a
    /// power of two, at least 64 KiB: `16MiB`). Its pages count twice in the agent's resident
    /// memory; events it has no room for are lost, counted (`sockspan_kernel_events_lost_total`).
    #[arg(long, env = "SOCKSPAN_RING_BYTES", value_name = "SIZE", default_value = "auto", value_parser = parse_ring_bytes)]
    pub ring_bytes: RingBytes,

    /// Serve the agent's own Prometheus metrics at http://ADDR/metrics, and its health at
    /// http://ADDR/healthz.
    #[arg(long, env = "SOCKSPAN_METRICS_ADDR", value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// `/healthz` answers 503 once OTLP exports have failed for this many seconds without a
    /// success (or the pipeline has not moved for 10 s).
    #[arg(long, env = "SOCKSPAN_UNHEALTHY_AFTER", value_name = "SECONDS", default_value_t = 60)]
    pub unhealthy_after: u64,

    /// Export query-string values as sent (default: `key=REDACTED`).
    #[arg(long, env = "SOCKSPAN_KEEP_QUERY_VALUES")]
    pub keep_query_values: bool,

    /// Export `url.path` as sent (default: ids, emails and token-like segments become `{id}`,
    /// `{email}`, `{token}`, as in span names).
    #[arg(long, env = "SOCKSPAN_KEEP_PATH")]
    pub keep_path: bool,

    /// Name server spans after this route when the path matches it (`/users/{id}/orders`;
    /// `{*rest}` last for the rest of the path), and set `http.route`; the first that matches
    /// wins. Repeatable or comma-separated. Other spans keep the generalised path.
    #[arg(long = "route-pattern", env = "SOCKSPAN_ROUTE_PATTERN", value_name = "PATTERN", value_delimiter = ',',
          value_parser = crate::routes::RoutePattern::parse)]
    pub route_patterns: Vec<crate::routes::RoutePattern>,

    /// Do not attach the Go hooks (uprobes on `runtime.newproc1` and `net/http`'s pooled
    /// connections in Go programs): no goroutine parents, and none of the hooks' cost.
    #[arg(long, env = "SOCKSPAN_NO_GO_HOOKS")]
    pub no_go_hooks: bool,

    /// Show a live table, refreshed every second, of the slowest operations (rate, errors,
    /// p50/p95/p99, own time) and the time per service over the last minute: full-screen on a
    /// terminal (keys: p r e o n sort, q quits), plain text otherwise. Replaces `--print`.
    #[arg(long, env = "SOCKSPAN_TOP")]
    pub top: bool,

    /// Tail sampling of the export: keep every local trace with an error or slower than
    /// --tail-slower-than, and --tail-ratio of the others, decided once the trace is complete
    /// (2 s after its last span). After OTEL_TRACES_SAMPLER; the live views show every span.
    #[arg(long, env = "SOCKSPAN_TAIL_SAMPLING")]
    pub tail_sampling: bool,

    /// With --tail-sampling: traces at least this long (`500ms`, `2s`) are kept.
    #[arg(long, env = "SOCKSPAN_TAIL_SLOWER_THAN", value_name = "DURATION", default_value = "1s",
          value_parser = parse_duration)]
    pub tail_slower_than: std::time::Duration,

    /// With --tail-sampling: the share (0 to 1) of the other traces kept, by trace id.
    #[arg(long, env = "SOCKSPAN_TAIL_RATIO", value_name = "RATIO", default_value = "0.1",
          value_parser = crate::sampling::parse_ratio)]
    pub tail_ratio: f64,

    /// Add this node's pods' metadata (k8s.pod.name, k8s.namespace.name, k8s.deployment.name,
    /// ...) to each process's spans, watching the API server for the pods of NODE_NAME. On by
    /// itself in a pod (KUBERNETES_SERVICE_HOST set).
    #[arg(long, env = "SOCKSPAN_KUBERNETES")]
    pub kubernetes: bool,

    /// The API server to ask instead of the pod's own (`kubectl proxy`'s http://127.0.0.1:8001
    /// outside a cluster); implies --kubernetes.
    #[arg(long, env = "SOCKSPAN_KUBERNETES_API", value_name = "URL")]
    pub kubernetes_api: Option<String>,

    #[command(flatten)]
    pub select: crate::selection::Selection,

    #[command(flatten)]
    pub filter: SpanFilter,

    /// Log format on stderr.
    #[arg(long, env = "SOCKSPAN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Record every kernel event to FILE (replay it with `sockspan replay FILE`).
    #[arg(long, env = "SOCKSPAN_RECORD", value_name = "FILE")]
    pub record: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Option<Command>,
}

impl Cli {
    /// `--tail-sampling`'s rules, when it is on.
    pub fn tail_sampler(&self) -> Option<crate::sampling::TailConfig> {
        self.tail_sampling.then_some(crate::sampling::TailConfig {
            slower_than: self.tail_slower_than,
            ratio: self.tail_ratio,
            max_held_spans: crate::sampling::TAIL_MAX_HELD_SPANS,
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Replay a recording made with `--record` through the userspace pipeline and print its spans
    /// (with the live view's filters).
    Replay {
        file: PathBuf,
        /// `text`, `json` or `traces`.
        #[arg(long, value_enum, default_value_t = PrintArg::Text)]
        format: PrintArg,
    },
    /// Where the time went in spans saved with `--print=json` (or a recording made with
    /// `--record`): the slowest operations, the time per service, and the slowest traces'
    /// timelines (with the live view's filters).
    Analyze {
        file: PathBuf,
        /// Timelines of this many of the slowest traces.
        #[arg(long, default_value_t = 3)]
        traces: usize,
    },
    /// Measure userspace pipeline throughput on a synthetic stream (one thread).
    #[cfg(feature = "bench")]
    #[command(hide = true)]
    BenchPipeline {
        /// Concurrent keep-alive connections in the synthetic stream.
        #[arg(long, default_value_t = 200)]
        connections: u32,
        /// Exchanges per connection.
        #[arg(long, default_value_t = 500)]
        per_conn: u32,
        /// Body bytes of each response (written and read in 64 KiB calls, 1 KiB of each
        /// captured).
        #[arg(long, default_value_t = 615)]
        body_bytes: usize,
        /// Timed repetitions; the best is reported.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Replay this recording (made with `--record`) instead of the synthetic stream.
        #[arg(long, value_name = "FILE")]
        recording: Option<PathBuf>,
    },
    /// Measure stitching throughput on a two-hop chain and memory with requests in flight.
    #[cfg(feature = "bench")]
    #[command(hide = true)]
    BenchStitch {
        /// Requests in the chain workload.
        #[arg(long, default_value_t = 100_000)]
        requests: u32,
        /// Requests in flight at once in the chain workload.
        #[arg(long, default_value_t = 64)]
        concurrency: u32,
        /// Requests held in flight for the memory measurement.
        #[arg(long, default_value_t = 10_000)]
        in_flight: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PrintArg {
    Text,
    Json,
    Traces,
}

impl From<PrintArg> for View {
    fn from(p: PrintArg) -> Self {
        match p {
            PrintArg::Text => View::Lines(PrintFormat::Text),
            PrintArg::Json => View::Lines(PrintFormat::Json),
            PrintArg::Traces => View::Traces,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The kernel ring buffer's size, as asked for (`--ring-bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingBytes {
    /// Sized to the node: events arrive from every CPU, so the room a stall of the reader
    /// needs grows with them. 2 MiB per CPU lost nothing at nginx's saturation on 2 CPUs
    /// (about 200,000 events/s), and every MiB costs two of resident memory.
    Auto,
    Fixed(u32),
}

impl RingBytes {
    const PER_CPU: u64 = 2 << 20;
    const AUTO_MIN: u64 = 4 << 20;
    const AUTO_MAX: u64 = 32 << 20;

    /// The size in bytes, for a node with `online_cpus` CPUs.
    pub fn resolve(self, online_cpus: usize) -> u32 {
        match self {
            Self::Fixed(n) => n,
            Self::Auto => (online_cpus as u64 * Self::PER_CPU)
                .clamp(Self::AUTO_MIN, Self::AUTO_MAX)
                .next_power_of_two() as u32,
        }
    }
}

fn parse_ring_bytes(s: &str) -> Result<RingBytes, String> {
    if s.trim() == "auto" {
        return Ok(RingBytes::Auto);
    }
    let n = crate::budget::parse_size(s)?;
    if !(64 * 1024..=1 << 31).contains(&n) || !n.is_power_of_two() {
        return Err(format!("{n} bytes: the ring must be a power of two from 64KiB to 2GiB"));
    }
    Ok(RingBytes::Fixed(n as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse() {
        let cli = Cli::try_parse_from(["sockspan", "--print=json", "--capture-bytes", "512"]).unwrap();
        assert_eq!(cli.print, Some(PrintArg::Json));
        assert_eq!(cli.capture_bytes, 512);
        assert_eq!(
            Cli::try_parse_from(["sockspan", "--print"]).unwrap().print,
            Some(PrintArg::Text)
        );
        assert!(Cli::try_parse_from(["sockspan", "--capture-bytes", "1"]).is_err());
        assert!(Cli::try_parse_from(["sockspan", "--ring-bytes", "1000"]).is_err());
        assert!(Cli::try_parse_from(["sockspan", "--ring-bytes", "3MiB"]).is_err());
        let ring = |arg: &str| {
            Cli::try_parse_from(["sockspan", "--ring-bytes", arg])
                .unwrap()
                .ring_bytes
        };
        assert_eq!(ring("8MiB"), RingBytes::Fixed(8 << 20));
        assert_eq!(ring("65536"), RingBytes::Fixed(65536));
        assert_eq!(Cli::try_parse_from(["sockspan"]).unwrap().ring_bytes, RingBytes::Auto);
        assert!(Cli::try_parse_from(["sockspan", "--bogus"]).is_err());
    }

    #[test]
    fn the_automatic_ring_grows_with_the_cpus_within_bounds() {
        let mib = |cpus| RingBytes::Auto.resolve(cpus) >> 20;
        assert_eq!([mib(1), mib(2), mib(3), mib(4), mib(8), mib(64)], [4, 4, 8, 8, 16, 32]);
        assert_eq!(RingBytes::Fixed(1 << 16).resolve(64), 1 << 16);
    }
}
