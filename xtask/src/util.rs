//! Small helpers shared by the commands: paths, running commands, owning child processes.
use std::{
    ffi::OsStr,
    fs,
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// The workspace root (the parent of `xtask/`).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Cargo's target directory, honouring `CARGO_TARGET_DIR`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => root().join(d),
        None => root().join("target"),
    }
}

/// The release `sockspan` binary (`SOCKSPAN_BIN` overrides it, as for the end-to-end tests).
pub fn sockspan_bin() -> PathBuf {
    std::env::var_os("SOCKSPAN_BIN").map_or_else(|| target_dir().join("release/sockspan"), PathBuf::from)
}

/// The cargo that runs this xtask (so a rustup toolchain choice carries over).
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// Effective uid, from /proc (std has no getuid and xtask avoids a libc dependency).
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status").ok().is_some_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .is_some_and(|euid| euid == "0")
    })
}

pub fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!("`cargo xtask {what}` must run as root (it installs packages, mounts tracefs and loads eBPF)");
    }
    Ok(())
}

/// Whether `prog` is found on PATH (or is an existing path).
pub fn on_path(prog: &str) -> bool {
    if prog.contains('/') {
        return Path::new(prog).exists();
    }
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
}

/// Human form of a command line, for logs and the benchmark report.
pub fn show(cmd: &Command) -> String {
    let mut s = String::new();
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            s.push_str(&format!("{}={} ", k.to_string_lossy(), v.to_string_lossy()));
        }
    }
    s.push_str(&cmd.get_program().to_string_lossy());
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` with inherited stdio and fails with `what` if it does not exit 0.
pub fn run(what: &str, cmd: &mut Command) -> Result<()> {
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("{what}: cannot start `{}`", show(cmd)))?;
    if !status.success() {
        bail!("{what} failed ({status}): `{}`", show(cmd));
    }
    Ok(())
}

/// Runs a test command, echoing its stdout while adding up the `test result:` lines of the
/// Rust test harness. Returns (passed, failed).
pub fn run_counting(what: &str, cmd: &mut Command) -> Result<(u64, u64)> {
    use std::io::{BufRead, BufReader, Write};
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("{what}: cannot start `{}`", show(cmd)))?;
    let (mut passed, mut failed) = (0, 0);
    if let Some(out) = child.stdout.take() {
        let mut stdout = std::io::stdout();
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = writeln!(stdout, "{line}");
            if let Some(rest) = line.trim_start().strip_prefix("test result:") {
                let count = |key: &str| {
                    rest.split(';')
                        .find_map(|part| {
                            part.trim()
                                .trim_start_matches("ok.")
                                .trim_start_matches("FAILED.")
                                .trim()
                                .strip_suffix(key)
                        })
                        .and_then(|n| n.trim().parse::<u64>().ok())
                        .unwrap_or(0)
                };
                passed += count("passed");
                failed += count("failed");
            }
        }
    }
    let status = child.wait().with_context(|| format!("{what}: wait"))?;
    if !status.success() {
        bail!(
            "{what} failed ({status}): `{}` ({passed} passed, {failed} failed)",
            show(cmd)
        );
    }
    Ok((passed, failed))
}

/// Runs `cmd` quietly and returns its stdout, or None if it cannot start or fails.
pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stdin(Stdio::null()).stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn output_of<I, S>(prog: &str, args: I) -> Option<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    output(Command::new(prog).args(args))
}

/// Sends `sig` (a `kill -s` name) to `pid`.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args(["-s", sig, &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped, so every exit path,
/// errors included, cleans up.
pub struct Guard {
    pub name: String,
    pub child: Option<Child>,
}

impl Guard {
    pub fn new(name: &str, child: Child) -> Self {
        Self {
            name: name.to_owned(),
            child: Some(child),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Sends `sig`, waits up to `grace`, then SIGKILLs. Returns the exit status if it exited by itself.
    pub fn stop(&mut self, sig: &str, grace: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        signal(child.id(), sig);
        if let Some(st) = wait_timeout(&mut child, grace) {
            return Some(st);
        }
        eprintln!(
            "xtask: {} did not stop within {grace:?} of SIG{sig}: killing it",
            self.name
        );
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// Waits up to `limit` for the process to exit by itself; kills it after that.
    pub fn wait(&mut self, limit: Duration) -> Result<ExitStatus> {
        let child = self.child.as_mut().context("process already reaped")?;
        match wait_timeout(child, limit) {
            Some(st) => {
                self.child = None;
                Ok(st)
            }
            None => {
                self.stop("KILL", Duration::from_secs(2));
                bail!("{} did not finish within {limit:?}: killed", self.name)
            }
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop("TERM", Duration::from_secs(5));
    }
}

pub fn wait_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
            _ => return None,
        }
    }
}

/// Forwards each line of `r` to a channel (and appends it to `log`), from a background thread.
pub fn lines_to_channel(r: impl Read + Send + 'static, log: Option<PathBuf>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut file = log.and_then(|p| fs::File::create(p).ok());
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if let Some(f) = file.as_mut() {
                use std::io::Write;
                let _ = writeln!(f, "{line}");
            }
            if tx.send(line).is_err() {
                // Nobody listens any more: keep draining so the writer never blocks on a full pipe.
            }
        }
    });
    rx
}

/// Waits until a line containing `needle` arrives on `rx`. Returns the lines seen on failure.
pub fn wait_for_line(rx: &mpsc::Receiver<String>, needle: &str, limit: Duration) -> Result<(), Vec<String>> {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return Ok(()),
            Ok(line) => seen.push(line),
            Err(_) => return Err(seen),
        }
    }
}

/// A fresh temporary directory, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Result<Self> {
        let p = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).with_context(|| format!("create {}", p.display()))?;
        Ok(Self(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("XTASK_KEEP_TMP").is_none() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// A TCP port that was free a moment ago on 127.0.0.1 (`preferred` if it is free).
pub fn free_port(preferred: u16) -> Result<u16> {
    if std::net::TcpListener::bind(("127.0.0.1", preferred)).is_ok() {
        return Ok(preferred);
    }
    let l = std::net::TcpListener::bind(("127.0.0.1", 0)).context("bind 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// A plain HTTP/1.0 GET on loopback; returns (status code, body).
pub fn http_get(port: u16, path: &str, timeout: Duration) -> Result<(u16, String)> {
    use std::io::Write;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let code = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status line")?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

/// Polls `f` until it returns true or `limit` passes.
pub fn poll_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(100));
    }
    false
}

pub fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 60.0 {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!("{s:.1}s")
    }
}

/// Other eBPF tracers running now (sockspan, bpftrace, …) that this xtask did not start: they
/// hook the same syscalls and skew overhead figures, so the benchmark reports them.
pub fn foreign_tracers() -> Vec<String> {
    let me = std::process::id().to_string();
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for e in dir.flatten() {
        let pid = e.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may contain spaces, so split at the last ')'.
        let Some((head, tail)) = stat.rsplit_once(')') else {
            continue;
        };
        let comm = head.split_once('(').map_or("", |(_, c)| c);
        let ppid = tail.split_whitespace().nth(1).unwrap_or("");
        let tracer = ["sockspan", "bpftrace", "beyla", "pixie", "tetragon", "falco"]
            .iter()
            .any(|t| comm.starts_with(t));
        if tracer && ppid != me && pid != me {
            found.push(format!("{comm}[{pid}]"));
        }
    }
    found
}
