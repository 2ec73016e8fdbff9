//! Process harness: the agent under test, real servers on free ports, real clients.
//!
//! Every child process is started in its own process group and owned by a [`ProcessGuard`] that
//! kills the whole group on drop, so a failing test never leaves servers or agents behind.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::process::{CommandExt as _, ExitStatusExt as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};

use crate::receiver::Receiver;

// ---------------------------------------------------------------------------------------------
// Environment and prerequisites

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

pub fn fixtures_dir() -> PathBuf {
    workspace_root().join("tests/fixtures")
}

pub fn fixture(name: &str) -> PathBuf {
    fixtures_dir().join(name)
}

/// The agent binary: `$SOCKSPAN_BIN`, else `<workspace>/target/release/sockspan`.
pub fn agent_bin() -> PathBuf {
    match std::env::var_os("SOCKSPAN_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => workspace_root().join("target/release/sockspan"),
    }
}

pub fn in_ci() -> bool {
    matches!(
        std::env::var("CI").as_deref(),
        Ok("true") | Ok("1") | Ok("TRUE") | Ok("True")
    )
}

/// External programs a test may need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tool {
    Python,
    Nginx,
    Node,
    Curl,
    Go,
    /// A JDK: `java` and `javac` (the single-file source launcher needs the compiler).
    Java,
    /// The `aiohttp` package, importable by `python3`.
    Aiohttp,
    /// A terminal for the full-screen views (send-keys, capture-pane).
    Tmux,
}

impl Tool {
    pub fn program(self) -> &'static str {
        match self {
            Tool::Python => "python3",
            // Debian puts nginx in /usr/sbin, which a non-login PATH may lack
            Tool::Nginx if Path::new("/usr/sbin/nginx").exists() => "/usr/sbin/nginx",
            Tool::Nginx => "nginx",
            Tool::Node => "node",
            Tool::Curl => "curl",
            Tool::Go => "go",
            Tool::Java => "java",
            Tool::Aiohttp => "python3",
            Tool::Tmux => "tmux",
        }
    }
    /// The commands that must succeed for the tool to count as present.
    fn probes(self) -> Vec<(&'static str, &'static [&'static str])> {
        match self {
            Tool::Nginx => vec![(self.program(), &["-v"])],
            Tool::Go => vec![("go", &["version"])],
            Tool::Java => vec![("java", &["--version"]), ("javac", &["--version"])],
            Tool::Aiohttp => vec![("python3", &["-c", "import aiohttp"])],
            Tool::Tmux => vec![("tmux", &["-V"])],
            _ => vec![(self.program(), &["--version"])],
        }
    }
    fn probe(self) -> bool {
        self.probes().into_iter().all(|(prog, args)| {
            Command::new(prog)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
    }
    /// What is missing when [`Tool::probe`] fails, for the skip/panic message.
    fn missing(self) -> String {
        self.probes()
            .iter()
            .map(|(prog, args)| {
                let args: Vec<String> = args
                    .iter()
                    .map(|a| {
                        if a.contains(' ') {
                            format!("'{a}'")
                        } else {
                            a.to_string()
                        }
                    })
                    .collect();
                format!("`{prog} {}`", args.join(" "))
            })
            .collect::<Vec<_>>()
            .join(" and ")
            + " must run (`cargo xtask setup` installs it)"
    }
}

/// Check what a test needs: root, the agent binary, the tools. Returns `false` (after printing
/// why) when the test should be skipped; panics instead when `CI=true`, so CI never silently
/// skips.
pub fn prerequisites(need_agent: bool, tools: &[Tool]) -> bool {
    let mut missing = Vec::new();
    if need_agent && unsafe { libc::geteuid() } != 0 {
        missing.push("must run as root (the agent loads eBPF programs)".to_string());
    }
    let bin = agent_bin();
    if need_agent && !bin.is_file() {
        missing.push(format!(
            "agent binary {} not found (build it with `cargo build --release -p agent` or set SOCKSPAN_BIN)",
            bin.display()
        ));
    }
    for t in tools {
        if !t.probe() {
            missing.push(t.missing());
        }
    }
    if missing.is_empty() {
        return true;
    }
    let msg = missing.join("; ");
    if in_ci() {
        panic!("CI=true and prerequisites are missing: {msg}");
    }
    eprintln!("SKIPPED: {msg}");
    println!("SKIPPED: {msg}");
    false
}

/// Skip (outside CI) or panic (in CI) when root, the agent binary or a tool is missing. For
/// tests returning `anyhow::Result<()>`.
#[macro_export]
macro_rules! require {
    ($($tool:ident),* $(,)?) => {
        if !$crate::harness::prerequisites(true, &[$($crate::harness::Tool::$tool),*]) {
            return Ok(());
        }
    };
}

/// Like [`require!`] for tests that need the tools but neither root nor the agent.
#[macro_export]
macro_rules! require_tools {
    ($($tool:ident),* $(,)?) => {
        if !$crate::harness::prerequisites(false, &[$($crate::harness::Tool::$tool),*]) {
            return Ok(());
        }
    };
}

/// Tests run one at a time: every agent sees every process's traffic. The lock makes that true
/// even without `--test-threads=1`.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

static SEQ: AtomicU32 = AtomicU32::new(1);

/// A unique path prefix `/e2e/<test>/r<seq>x<hex>`; the last segment is identifier-like, so
/// the agent's route is `/e2e/<test>/{id}`. `test` must be short lowercase letters.
pub fn unique_path(test: &str) -> String {
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
    let mix = (nanos ^ ((std::process::id() as u64) << 20)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    format!("/e2e/{test}/r{seq:04}x{:08x}", (mix >> 32) as u32)
}

pub fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64
}

/// An unused TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind ephemeral port")
        .local_addr()
        .unwrap()
        .port()
}

/// Wait until something accepts TCP connections on 127.0.0.1:`port`.
pub fn wait_for_port(port: u16, timeout: Duration, mut alive: impl FnMut() -> Result<()>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        alive()?;
        if Instant::now() >= deadline {
            bail!("nothing listening on 127.0.0.1:{port} after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

// ---------------------------------------------------------------------------------------------
// Temporary directories and process guards

/// A directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<Self> {
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!(
            "sockspan-it-{tag}-{}-{seq}-{}",
            std::process::id(),
            now_ns() % 1_000_000
        ));
        std::fs::create_dir_all(&p).with_context(|| format!("create {}", p.display()))?;
        Ok(Self(p))
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Owns a child started in its own process group; kills the whole group on drop.
pub struct ProcessGuard {
    pub name: String,
    child: Option<Child>,
    pgid: i32,
}

impl ProcessGuard {
    /// Spawn `cmd` as the leader of a new process group.
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Self> {
        cmd.process_group(0);
        let child = cmd.spawn().with_context(|| format!("spawn {name}: {cmd:?}"))?;
        let pgid = child.id() as i32;
        Ok(Self {
            name: name.to_string(),
            child: Some(child),
            pgid,
        })
    }
    pub fn pid(&self) -> u32 {
        self.pgid as u32
    }
    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("child already reaped")
    }
    /// `Ok` while the process runs; an error (with its exit status) once it exited.
    pub fn check_alive(&mut self) -> Result<()> {
        match self.child().try_wait()? {
            None => Ok(()),
            Some(st) => Err(anyhow!("{} exited early: {st}", self.name)),
        }
    }
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child().try_wait()?)
    }
    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pgid, sig);
        }
    }
    /// Wait for exit up to `timeout`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child().try_wait()? {
                return Ok(Some(st));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.child().stdin.take()
    }
    pub fn kill_group(&mut self) {
        unsafe {
            libc::kill(-self.pgid, libc::SIGKILL);
        }
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        self.kill_group();
    }
}

/// Collects a pipe's lines in a background thread.
#[derive(Clone, Default)]
pub struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    fn spawn_reader<R: std::io::Read + Send + 'static>(&self, r: R) {
        let me = self.clone();
        std::thread::spawn(move || {
            let mut rd = BufReader::new(r);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match rd.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf).trim_end_matches(['\n', '\r']).to_string();
                        me.0.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                    }
                }
            }
        });
    }
    pub fn all(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    pub fn text(&self) -> String {
        self.all().join("\n")
    }
    pub fn tail(&self, n: usize) -> String {
        let all = self.all();
        all[all.len().saturating_sub(n)..].join("\n")
    }
    pub fn any(&self, pred: impl Fn(&str) -> bool) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|l| pred(l))
    }
}

// ---------------------------------------------------------------------------------------------
// The agent

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

impl Protocol {
    /// Its `OTEL_EXPORTER_OTLP_PROTOCOL` value.
    pub fn as_env(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::HttpProtobuf => "http/protobuf",
        }
    }
}

/// How to start the agent.
pub struct AgentBuilder {
    args: Vec<String>,
    env: Vec<(String, String)>,
    ready_timeout: Duration,
    metrics_port: Option<u16>,
}

impl Default for AgentBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentBuilder {
    /// An agent that exports `url.path` as sent (`--keep-path`): tests find their spans by the
    /// unique ids in their paths. [`AgentBuilder::as_shipped`] drops it.
    pub fn new() -> Self {
        Self {
            args: vec!["--keep-path".into()],
            env: vec![("OTEL_BSP_SCHEDULE_DELAY".into(), "200".into())],
            ready_timeout: Duration::from_secs(60),
            metrics_port: None,
        }
    }
    /// No test-only flags: the defaults a user gets (paths generalised).
    pub fn as_shipped(mut self) -> Self {
        self.args.retain(|a| a != "--keep-path");
        self
    }
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }
    pub fn env(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        let k = k.into();
        self.env.retain(|(x, _)| *x != k);
        self.env.push((k, v.into()));
        self
    }
    /// Export to `rx` with the given protocol (through `OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub fn otlp(self, rx: &Receiver, proto: Protocol) -> Self {
        let endpoint = match proto {
            Protocol::Grpc => rx.grpc_endpoint(),
            Protocol::HttpProtobuf => rx.http_endpoint(),
        };
        self.env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", proto.as_env())
    }
    /// Serve Prometheus metrics on a free port (`--metrics-addr 127.0.0.1:PORT`).
    pub fn metrics(mut self) -> Self {
        let port = free_port();
        self.metrics_port = Some(port);
        self.arg("--metrics-addr").arg(format!("127.0.0.1:{port}"))
    }

    pub fn start(self) -> Result<Agent> {
        let bin = agent_bin();
        let mut cmd = Command::new(&bin);
        // Debugging aid: record every agent's kernel events for `sockspan replay`.
        if let Some(dir) = std::env::var_os("SOCKSPAN_TEST_RECORD_DIR") {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let file = PathBuf::from(dir).join(format!("agent-{}-{n}.rec", std::process::id()));
            cmd.arg("--record").arg(file);
        }
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // the agent reads OTEL_* and SOCKSPAN_* settings from its environment: start from none
        for (k, _) in std::env::vars_os().filter(|(k, _)| {
            let k = k.to_string_lossy();
            k.starts_with("OTEL_") || k.starts_with("SOCKSPAN_")
        }) {
            cmd.env_remove(k);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut guard = ProcessGuard::spawn("sockspan", &mut cmd)?;
        let stdout = Lines::default();
        let stderr = Lines::default();
        stdout.spawn_reader(guard.child().stdout.take().unwrap());
        stderr.spawn_reader(guard.child().stderr.take().unwrap());
        let exporting = self.env.iter().any(|(k, _)| k == "OTEL_EXPORTER_OTLP_ENDPOINT");
        let printing = !exporting || self.args.iter().any(|a| a.starts_with("--print"));
        let mut agent = Agent {
            guard,
            stdout,
            stderr,
            metrics_port: self.metrics_port,
            started: Instant::now(),
            exporting,
            printing,
        };
        let deadline = Instant::now() + self.ready_timeout;
        loop {
            if agent.stderr.any(|l| l.contains("sockspan ready")) {
                break;
            }
            if let Some(st) = agent.guard.try_wait()? {
                bail!(
                    "agent exited before `sockspan ready` ({st}); args {:?}\n--- stderr ---\n{}\n--- stdout ---\n{}",
                    self.args,
                    agent.stderr.tail(40),
                    agent.stdout.tail(10)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "agent not ready after {:?}\n--- stderr ---\n{}",
                    self.ready_timeout,
                    agent.stderr.tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(port) = agent.metrics_port {
            // The ready line promises every probe is attached; the metrics server may be a hair behind.
            wait_for_port(port, Duration::from_secs(10), || Ok(()))
                .with_context(|| format!("metrics endpoint\n--- stderr ---\n{}", agent.stderr.tail(20)))?;
        }
        Ok(agent)
    }
}

/// A running agent. Dropping it kills it; [`Agent::stop`] is the graceful path.
pub struct Agent {
    guard: ProcessGuard,
    pub stdout: Lines,
    pub stderr: Lines,
    pub metrics_port: Option<u16>,
    pub started: Instant,
    /// Started with an OTLP endpoint; printing (without one, or with `--print`).
    exporting: bool,
    printing: bool,
}

impl Agent {
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }
    pub fn is_running(&mut self) -> bool {
        matches!(self.guard.try_wait(), Ok(None))
    }
    /// Send SIGTERM and wait up to `timeout`; returns the exit status (error if still running).
    pub fn terminate(&mut self, timeout: Duration) -> Result<(ExitStatus, Duration)> {
        let t0 = Instant::now();
        self.guard.signal(libc::SIGTERM);
        match self.guard.wait_timeout(timeout)? {
            Some(st) => Ok((st, t0.elapsed())),
            None => bail!(
                "agent still running {timeout:?} after SIGTERM\n--- stderr ---\n{}",
                self.stderr.tail(30)
            ),
        }
    }
    /// Graceful stop: SIGTERM, must exit 0 within 5 s. Returns the agent's stderr and stdout.
    /// An agent serving metrics must first account for everything ([`Agent::check_accounting`]).
    pub fn stop(mut self) -> Result<(Lines, Lines)> {
        if self.metrics_port.is_some() {
            self.check_accounting()?;
        }
        let (st, took) = self.terminate(Duration::from_secs(5))?;
        // give the pipe readers a moment to drain
        std::thread::sleep(Duration::from_millis(50));
        ensure!(
            st.success(),
            "agent exit status after SIGTERM: {st} (signal {:?}), expected 0 (took {took:?})\n--- stderr ---\n{}",
            st.signal(),
            self.stderr.tail(30)
        );
        Ok((self.stderr.clone(), self.stdout.clone()))
    }
    /// Wait until a stdout line satisfies `pred`.
    pub fn wait_stdout(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.stdout.all().into_iter().find(|l| pred(l)) {
                return Ok(l);
            }
            if Instant::now() >= deadline {
                bail!(
                    "no matching stdout line after {timeout:?}; stdout tail:\n{}\n--- stderr ---\n{}",
                    self.stdout.tail(20),
                    self.stderr.tail(20)
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
    /// The agent's books balance once the load has stopped: every event the kernel submitted
    /// was read, and every span created was exported, dropped (counted, by reason) or is still
    /// queued (exporting), or printed (printing). Polled for up to 10 s: spans in flight settle.
    pub fn check_accounting(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let m = self.metrics()?;
            let submitted = m.get("sockspan_kernel_events_submitted_total");
            let read = m.get("sockspan_events_read_total");
            let created = m.get("sockspan_spans_created_total");
            let dropped = |reason: &str| m.value("sockspan_spans_dropped_total", Some(reason)).unwrap_or(0.0);
            let queued = |sink: &str| m.value("sockspan_spans_queued", Some(sink)).unwrap_or(0.0);
            let exported = m.get("sockspan_spans_exported_total");
            let not_exported = dropped(r#"reason="export_"#)
                + dropped(r#"reason="channel_full""#)
                + dropped(r#"reason="memory_limit""#);
            let printed = m.get("sockspan_spans_printed_total");
            // Left out by the view's filters: neither printed nor lost.
            let filtered = m.get("sockspan_spans_filtered_total");
            let not_printed = dropped(r#"reason="print_"#);
            // Sampling's part: left out of the export on purpose, or held until the tail
            // sampler decides.
            let sampled_out = m.get("sockspan_spans_sampled_out_total");
            let exported_balance = created
                == exported + not_exported + sampled_out + queued(r#"sink="otlp""#) + queued(r#"sink="tail_sampling""#);
            let printed_balance = created == printed + filtered + not_printed + queued(r#"sink="print""#);
            let spans_balance = if self.exporting {
                exported_balance && (!self.printing || printed_balance)
            } else {
                printed_balance
            };
            if read >= submitted && spans_balance {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the agent's books do not balance: events submitted {submitted}, read {read}; spans created \
                     {created}, exported {exported} (+{not_exported} dropped, {sampled_out} sampled out), printed {printed} (+{not_printed} dropped, \
                     {filtered} filtered)\n{}",
                    m.text
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Fetch `/metrics` (needs [`AgentBuilder::metrics`]).
    pub fn metrics(&self) -> Result<Metrics> {
        let port = self.metrics_port.context("agent started without --metrics-addr")?;
        Metrics::fetch(port)
    }
    /// Poll `/metrics` until `pred` holds.
    pub fn wait_metrics(&self, timeout: Duration, pred: impl Fn(&Metrics) -> bool) -> Result<Metrics> {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.metrics()?;
            if pred(&m) {
                return Ok(m);
            }
            if Instant::now() >= deadline {
                bail!(
                    "metrics condition not met after {timeout:?}; last /metrics:\n{}",
                    m.text
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A `/metrics` page.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub text: String,
}

impl Metrics {
    pub fn fetch(port: u16) -> Result<Self> {
        let mut s = TcpStream::connect(("127.0.0.1", port)).with_context(|| format!("connect metrics port {port}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
        )?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        let raw = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = raw
            .split_once("\r\n\r\n")
            .context("no header/body separator in /metrics response")?;
        ensure!(
            head.starts_with("HTTP/1.") && head.contains(" 200"),
            "bad /metrics response head: {head}"
        );
        let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
            dechunk(body)
        } else {
            body.to_string()
        };
        Ok(Self { text: body })
    }
    /// Sum of every sample of `name` whose label set contains `label_filter` (e.g.
    /// `reason="not_http"`); `None` if no such sample.
    pub fn value(&self, name: &str, label_filter: Option<&str>) -> Option<f64> {
        let mut found = None;
        for line in self.text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (series, val) = match line.rsplit_once(' ') {
                Some(x) => x,
                None => continue,
            };
            let (metric, labels) = match series.find('{') {
                Some(i) => (&series[..i], &series[i..]),
                None => (series, ""),
            };
            if metric != name {
                continue;
            }
            if let Some(f) = label_filter
                && !labels.contains(f)
            {
                continue;
            }
            if let Ok(v) = val.trim().parse::<f64>() {
                *found.get_or_insert(0.0) += v;
            }
        }
        found
    }
    pub fn get(&self, name: &str) -> f64 {
        self.value(name, None).unwrap_or(0.0)
    }
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.split(';').next().unwrap_or("0").trim(), 16).unwrap_or(0);
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Servers

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerKind {
    Python,
    Nginx,
    Node,
}

/// A server on 127.0.0.1:`port`, killed (whole process group) on drop.
pub struct Server {
    pub kind: ServerKind,
    pub port: u16,
    pub guard: ProcessGuard,
    pub dir: Option<TempDir>,
    pub output: Lines,
}

impl Server {
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn spawn(kind: ServerKind, mut cmd: Command, port: u16, dir: Option<TempDir>) -> Result<Self> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        for (k, _) in std::env::vars_os().filter(|(k, _)| k.to_string_lossy().starts_with("OTEL_")) {
            cmd.env_remove(k);
        }
        let mut guard = ProcessGuard::spawn(&format!("{kind:?} server"), &mut cmd)?;
        let output = Lines::default();
        output.spawn_reader(guard.child().stdout.take().unwrap());
        output.spawn_reader(guard.child().stderr.take().unwrap());
        let mut srv = Self {
            kind,
            port,
            guard,
            dir,
            output,
        };
        let out = srv.output.clone();
        let res = {
            let g = &mut srv.guard;
            wait_for_port(port, Duration::from_secs(20), || g.check_alive())
        };
        res.with_context(|| format!("{kind:?} server on port {port}; output:\n{}", out.tail(20)))?;
        Ok(srv)
    }

    /// `python3 tests/fixtures/http_server.py PORT` (ThreadingHTTPServer, HTTP/1.1 keep-alive).
    pub fn python(service_name: Option<&str>) -> Result<Self> {
        Self::python_on(service_name, "127.0.0.1")
    }

    /// The Python server listening on `host` (`"::"`: dual-stack, IPv6 and v4-mapped).
    pub fn python_on(service_name: Option<&str>, host: &str) -> Result<Self> {
        let port = free_port();
        let mut cmd = Command::new("python3");
        cmd.arg("-u")
            .arg(fixture("http_server.py"))
            .arg(port.to_string())
            .arg(host);
        if let Some(s) = service_name {
            cmd.env("OTEL_SERVICE_NAME", s);
        }
        Self::spawn(ServerKind::Python, cmd, port, None)
    }

    /// `python3 tests/fixtures/handoff_server.py PORT UPSTREAM`: requests move between threads
    /// (read by one, called for and answered by the other), as goroutines do.
    pub fn python_handoff(service_name: &str, upstream_port: u16) -> Result<Self> {
        let port = free_port();
        let mut cmd = Command::new("python3");
        cmd.arg("-u")
            .arg(fixture("handoff_server.py"))
            .arg(port.to_string())
            .arg(upstream_port.to_string())
            .env("OTEL_SERVICE_NAME", service_name);
        Self::spawn(ServerKind::Python, cmd, port, None)
    }

    /// `node tests/fixtures/http_server.js PORT`.
    pub fn node(service_name: Option<&str>) -> Result<Self> {
        Self::node_on(service_name, "127.0.0.1")
    }

    /// The Node.js server listening on `host` (`"::"`: dual-stack, IPv6 and v4-mapped).
    pub fn node_on(service_name: Option<&str>, host: &str) -> Result<Self> {
        let port = free_port();
        let mut cmd = Command::new("node");
        cmd.arg(fixture("http_server.js")).arg(port.to_string()).arg(host);
        if let Some(s) = service_name {
            cmd.env("OTEL_SERVICE_NAME", s);
        }
        Self::spawn(ServerKind::Node, cmd, port, None)
    }

    /// nginx, master + 1 worker, running as root, with a generated config in a temp dir:
    ///   /small.txt, /big.bin (2 MiB, sendfile), `/e2e/...` → 200 "hello from nginx",
    ///   `.../status/404` → 404, `.../status/500` → 500, `.../bigfile` → big.bin,
    ///   `.../smallfile` → small.txt.
    pub fn nginx(service_name: Option<&str>) -> Result<Self> {
        let port = free_port();
        let dir = TempDir::new("nginx")?;
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root)?;
        std::fs::write(root.join("small.txt"), b"small file served by nginx\n")?;
        let big: Vec<u8> = (0..NGINX_BIG_FILE_SIZE).map(|i| b'a' + (i % 26) as u8).collect();
        std::fs::write(root.join("big.bin"), big)?;
        // nginx clears the environment of its workers unless told to keep a variable
        let keep_env = if service_name.is_some() {
            "env OTEL_SERVICE_NAME;"
        } else {
            ""
        };
        let http = format!(
            r#"    sendfile on;
    tcp_nopush off;
    keepalive_requests 1000;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location ~ /status/404$ {{ return 404; }}
        location ~ /status/500$ {{ return 500; }}
        location ~ /bigfile$ {{ rewrite ^ /big.bin break; }}
        location ~ /smallfile$ {{ rewrite ^ /small.txt break; }}
        location /e2e/ {{ default_type text/plain; return 200 "hello from nginx\n"; }}
        location / {{ }}
    }}
"#,
            root = root.display()
        );
        let conf = nginx_config(dir.path(), keep_env, 1, 256, &http)?;
        let mut cmd = nginx_command(dir.path(), &conf);
        if let Some(s) = service_name {
            cmd.env("OTEL_SERVICE_NAME", s);
        }
        Self::spawn(ServerKind::Nginx, cmd, port, Some(dir))
    }
}

pub const NGINX_BIG_FILE_SIZE: usize = 2 * 1024 * 1024;

/// Writes `dir/nginx.conf` (creating its temp directories): master and `workers` workers as
/// root, pid, log and temp files inside `dir`, `main` added to the main context and `http` to
/// the http block (after `access_log off` and a 65 s keep-alive).
pub fn nginx_config(dir: &Path, main: &str, workers: u32, connections: u32, http: &str) -> Result<PathBuf> {
    for t in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        std::fs::create_dir_all(dir.join(t))?;
    }
    let d = dir.display();
    let conf = format!(
        r#"daemon off;
{main}
master_process on;
worker_processes {workers};
user root;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections {connections}; }}
http {{
    access_log off;
    keepalive_timeout 65;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
{http}}}
"#
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    Ok(path)
}

/// The command that runs nginx on a config written by [`nginx_config`].
pub fn nginx_command(dir: &Path, conf: &Path) -> Command {
    let mut cmd = Command::new(Tool::Nginx.program());
    cmd.arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(conf);
    cmd
}

/// A plain TCP peer that speaks no HTTP (tests/fixtures/tcp_peer.py server).
pub fn tcp_peer_server() -> Result<Server> {
    let port = free_port();
    let mut cmd = Command::new("python3");
    cmd.arg("-u")
        .arg(fixture("tcp_peer.py"))
        .arg("server")
        .arg(port.to_string());
    Server::spawn(ServerKind::Python, cmd, port, None)
}

/// `tests/fixtures/hostile_client.py MODE PORT ARGS...` (slowloris, churn, pipelined and held
/// connections); its JSON output.
pub fn hostile(mode: &str, port: u16, args: &[&str]) -> Result<serde_json::Value> {
    let mut cmd = Command::new("python3");
    cmd.arg(fixture("hostile_client.py"))
        .arg(mode)
        .arg(port.to_string())
        .args(args);
    let (st, out, err) = run(&mut cmd, Duration::from_secs(300))?;
    ensure!(st.success(), "hostile client {mode} failed ({st}): {err}\n{out}");
    Ok(serde_json::from_str(out.trim())?)
}

/// An asyncio HTTP server for thousands of connections (tests/fixtures/hold_server.py):
/// answers every request (`answer`), or reads them and never answers.
pub fn hold_server(answer: bool) -> Result<Server> {
    let port = free_port();
    let mut cmd = Command::new("python3");
    cmd.arg("-u")
        .arg(fixture("hold_server.py"))
        .arg(port.to_string())
        .arg(if answer { "answer" } else { "sink" });
    Server::spawn(ServerKind::Python, cmd, port, None)
}

// ---------------------------------------------------------------------------------------------
// Clients

/// Run a command to completion with a timeout; returns (status, stdout, stderr).
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<(ExitStatus, String, String)> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, _) in std::env::vars_os().filter(|(k, _)| k.to_string_lossy().starts_with("OTEL_")) {
        cmd.env_remove(k);
    }
    let desc = format!("{cmd:?}");
    let mut g = ProcessGuard::spawn(&desc, cmd)?;
    let out = Lines::default();
    let err = Lines::default();
    out.spawn_reader(g.child().stdout.take().unwrap());
    err.spawn_reader(g.child().stderr.take().unwrap());
    let st = g
        .wait_timeout(timeout)?
        .ok_or_else(|| anyhow!("{desc} did not finish within {timeout:?}"))?;
    std::thread::sleep(Duration::from_millis(20));
    Ok((st, out.text(), err.text()))
}

/// One transfer reported by curl's `-w`.
#[derive(Clone, Debug)]
pub struct CurlTransfer {
    pub status: u16,
    /// 0 when the transfer reused an existing connection.
    pub num_connects: u32,
    pub size_download: u64,
    pub local_port: u16,
}

/// `curl -sS` with every URL in ONE invocation (so curl reuses the connection), `--http1.1`
/// unless `extra` says otherwise. Each URL's body goes to /dev/null.
pub fn curl(urls: &[String], extra: &[&str]) -> Result<Vec<CurlTransfer>> {
    let mut cmd = Command::new("curl");
    cmd.arg("-sS").arg("--max-time").arg("30");
    if !extra
        .iter()
        .any(|a| a.starts_with("--http1.0") || a.starts_with("--http2") || *a == "-0")
    {
        cmd.arg("--http1.1");
    }
    cmd.args(extra);
    cmd.arg("-w")
        .arg("%{http_code} %{num_connects} %{size_download} %{local_port}\\n");
    for u in urls {
        cmd.arg("-o").arg("/dev/null").arg(u);
    }
    let (st, out, err) = run(&mut cmd, Duration::from_secs(40))?;
    ensure!(st.success(), "curl failed ({st}): {err}");
    let transfers: Vec<CurlTransfer> = out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Ok(CurlTransfer {
                status: f.first().context("status")?.parse()?,
                num_connects: f.get(1).context("num_connects")?.parse()?,
                size_download: f.get(2).context("size")?.parse::<f64>()? as u64,
                local_port: f.get(3).context("local_port")?.parse()?,
            })
        })
        .collect::<Result<_>>()
        .with_context(|| format!("parse curl -w output {out:?}"))?;
    ensure!(
        transfers.len() == urls.len(),
        "curl reported {} transfers for {} URLs: {out}",
        transfers.len(),
        urls.len()
    );
    Ok(transfers)
}

/// tests/fixtures/http_client.py; returns its JSON output.
pub fn python_client(port: u16, args: &[&str]) -> Result<serde_json::Value> {
    let mut cmd = Command::new("python3");
    cmd.arg("-u")
        .arg(fixture("http_client.py"))
        .arg(port.to_string())
        .args(args);
    let (st, out, err) = run(&mut cmd, Duration::from_secs(60))?;
    ensure!(st.success(), "python client failed ({st}): {err}\n{out}");
    serde_json::from_str(out.trim()).with_context(|| format!("python client output {out:?}"))
}

/// tests/fixtures/http_client.js; returns its JSON output.
pub fn node_client(port: u16, args: &[&str]) -> Result<serde_json::Value> {
    let mut cmd = Command::new("node");
    cmd.arg(fixture("http_client.js")).arg(port.to_string()).args(args);
    let (st, out, err) = run(&mut cmd, Duration::from_secs(60))?;
    ensure!(st.success(), "node client failed ({st}): {err}\n{out}");
    serde_json::from_str(out.trim()).with_context(|| format!("node client output {out:?}"))
}

/// Statuses from a client fixture's JSON output.
pub fn statuses(v: &serde_json::Value) -> Vec<u16> {
    v["responses"]
        .as_array()
        .map(|a| a.iter().map(|r| r["status"].as_u64().unwrap_or(0) as u16).collect())
        .unwrap_or_default()
}

/// A python client in `--mode preexisting`: it makes its first request at once; call
/// [`PreexistingClient::go`] to make the rest on the same connection.
pub struct PreexistingClient {
    guard: ProcessGuard,
    stdin: Option<ChildStdin>,
    stdout: Lines,
    stderr: Lines,
}

impl PreexistingClient {
    pub fn start(port: u16, paths: &[&str]) -> Result<(Self, serde_json::Value)> {
        let mut cmd = Command::new("python3");
        cmd.arg("-u")
            .arg(fixture("http_client.py"))
            .arg(port.to_string())
            .arg("--mode")
            .arg("preexisting")
            .args(paths)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut guard = ProcessGuard::spawn("python preexisting client", &mut cmd)?;
        let stdout = Lines::default();
        let stderr = Lines::default();
        stdout.spawn_reader(guard.child().stdout.take().unwrap());
        stderr.spawn_reader(guard.child().stderr.take().unwrap());
        let stdin = guard.take_stdin();
        let mut me = Self {
            guard,
            stdin,
            stdout,
            stderr,
        };
        let first = me.wait_line("\"first\"")?;
        Ok((me, first))
    }
    fn wait_line(&mut self, needle: &str) -> Result<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(l) = self.stdout.all().into_iter().find(|l| l.contains(needle)) {
                return Ok(serde_json::from_str(&l)?);
            }
            if self.guard.try_wait()?.is_some() && !self.stdout.any(|l| l.contains(needle)) {
                std::thread::sleep(Duration::from_millis(50));
                if !self.stdout.any(|l| l.contains(needle)) {
                    bail!("python preexisting client exited: {}", self.stderr.text());
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "python preexisting client: no {needle} line; stderr: {}",
                    self.stderr.text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    /// Let the client make its remaining requests; returns the `rest` JSON.
    pub fn go(mut self) -> Result<serde_json::Value> {
        let mut stdin = self.stdin.take().context("stdin")?;
        stdin.write_all(b"go\n")?;
        stdin.flush()?;
        self.wait_line("\"rest\"")
    }
}

/// Non-HTTP traffic: tests/fixtures/tcp_peer.py client PORT.
pub fn tcp_peer_client(port: u16) -> Result<()> {
    let mut cmd = Command::new("python3");
    cmd.arg("-u")
        .arg(fixture("tcp_peer.py"))
        .arg("client")
        .arg(port.to_string());
    let (st, out, err) = run(&mut cmd, Duration::from_secs(30))?;
    ensure!(
        st.success() && out.contains("ok"),
        "tcp peer client failed ({st}): {err}\n{out}"
    );
    Ok(())
}

/// A cgroup named as a container runtime names a container's, made in the machine's real
/// cgroup tree; removed (its process moved back out) when dropped.
pub struct ContainerCgroup {
    dir: std::path::PathBuf,
    root: std::path::PathBuf,
    pid: u32,
}

impl ContainerCgroup {
    /// Moves `pid` into `<hierarchy>/docker-<id>.scope` in the first writable hierarchy (the
    /// unified one first).
    pub fn enter(id: &str, pid: u32) -> Result<Self> {
        Self::enter_at(&format!("docker-{id}.scope"), pid)
    }

    /// Moves `pid` into `<hierarchy>/<path>` (made, with its parents), as a runtime places a
    /// pod's container (`kubepods/besteffort/pod<uid>/<id>`).
    pub fn enter_at(path: &str, pid: u32) -> Result<Self> {
        let mut tried = Vec::new();
        for root in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup", "/sys/fs/cgroup/pids"] {
            let root = std::path::PathBuf::from(root);
            if !root.join("cgroup.procs").exists() {
                continue;
            }
            let dir = root.join(path);
            match std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(dir.join("cgroup.procs"), pid.to_string()))
            {
                Ok(()) => return Ok(Self { dir, root, pid }),
                Err(e) => {
                    let _ = std::fs::remove_dir(&dir);
                    tried.push(format!("{}: {e}", root.display()));
                }
            }
        }
        bail!("no cgroup hierarchy took the process: {tried:?}")
    }
}

impl Drop for ContainerCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.root.join("cgroup.procs"), self.pid.to_string());
        // The directory and the parents made for it (those still holding others stay).
        let mut dir = self.dir.as_path();
        while dir != self.root && std::fs::remove_dir(dir).is_ok() {
            dir = dir.parent().unwrap_or(&self.root);
        }
    }
}
