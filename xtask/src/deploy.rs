//! Deployment: `cargo xtask image` builds the container image without any registry (FROM scratch
//! over a root filesystem assembled here), and `cargo xtask deploy` (the test step `deploy`)
//! checks the Helm chart and runs that image as the chart's DaemonSet would run it:
//! 1. lints and renders the chart with Helm's engine (deploy/render.py, helm-python-sdk: no helm
//!    binary), and checks deploy/daemonset.yaml is its default rendering;
//! 2. validates every rendered manifest offline (`kubernetes-validate --strict`) against
//!    Kubernetes [`KUBE_VERSION`];
//! 3. builds the image with `podman build` and exports its root filesystem;
//! 4. runs the exported root filesystem chrooted, read-only, with the DaemonSet's mounts, args,
//!    config and exactly its capabilities (all others dropped, no_new_privs), as rendered with
//!    the default values and with `goHooks: false`, and checks that a Go server run by another
//!    user is traced: a span with its `OTEL_SERVICE_NAME`, its executable and the node name, the
//!    Go hooks attached (or not tried), and `/healthz` answering.
use std::{
    collections::BTreeSet,
    fs,
    io::Write as _,
    os::unix::{fs::PermissionsExt as _, io::AsRawFd as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::util::{self, Guard, TempDir, on_path, output, run};

/// The Kubernetes version the manifests are validated against.
pub const KUBE_VERSION: &str = "1.32.0";
/// Python packages of the chart checks, pinned (installed by `cargo xtask setup` in [`venv`]).
/// helm-python-sdk bundles Helm's Go SDK (v4.2.3) as a shared library: `helm lint` and `helm
/// template` without a helm binary, which neither Debian nor PyPI ships.
pub const PIP_PACKAGES: &[&str] = &["helm-python-sdk==0.2.2", "kubernetes-validate==1.37.0"];
/// Held while an agent runs: other end-to-end runs on this machine load the same programs.
const E2E_LOCK: &str = "/tmp/sockspan-e2e.lock";
/// The test's node name (the DaemonSet sets NODE_NAME from the downward API).
const NODE_NAME: &str = "deploy-test-node";
/// The probe server's service name and executable (longer than the 15-byte command name, so
/// the executable name proves /proc/<pid>/exe was read).
const PROBE_SERVICE: &str = "deploy-probe";
const PROBE_EXE: &str = "sockspan-deploy-probe";
/// The uid the probe server runs as: not the agent's, as in a cluster.
const NOBODY: &str = "65534";

/// The virtualenv with [`PIP_PACKAGES`] (outside the work tree, so fresh clones share it).
pub fn venv() -> PathBuf {
    PathBuf::from("/var/cache/sockspan-xtask/venv")
}

fn image_tag() -> String {
    format!("localhost/sockspan:{}", env!("CARGO_PKG_VERSION"))
}

/// `cargo xtask image`: assembles target/image/rootfs and builds the image from it.
pub fn image(bin: &Path) -> Result<String> {
    let rootfs = util::target_dir().join("image/rootfs");
    assemble_rootfs(bin, &rootfs)?;
    let tag = image_tag();
    // the previous build's layers go with its tag (ignored when there is none)
    let _ = output(Command::new("podman").args(["rmi", "--force", &tag]));
    let containerfile = util::root().join("deploy/Containerfile");
    let mut build = Command::new("podman");
    build.args(["build", "--quiet", "--pull=never", "-f"]);
    build.arg(&containerfile).args(["-t", &tag]).arg(&rootfs);
    run("podman build", &mut build)?;
    println!("image: built {tag} from {}", rootfs.display());
    Ok(tag)
}

/// The image's root filesystem: the binary, the libraries and loader `ldd` lists, CA certificates.
fn assemble_rootfs(bin: &Path, rootfs: &Path) -> Result<()> {
    if !bin.is_file() {
        bail!(
            "{} is missing: build it with `cargo build --release -p agent` (or point SOCKSPAN_BIN at one)",
            bin.display()
        );
    }
    let _ = fs::remove_dir_all(rootfs);
    let ldd = output(Command::new("ldd").arg(bin)).with_context(|| format!("ldd {} failed", bin.display()))?;
    let mut files = vec![(bin.to_path_buf(), PathBuf::from("usr/local/bin/sockspan"))];
    for lib in ldd_paths(&ldd) {
        let inside = lib.strip_prefix("/").unwrap_or(&lib).to_path_buf();
        files.push((lib, inside));
    }
    files.push((
        PathBuf::from("/etc/ssl/certs/ca-certificates.crt"),
        PathBuf::from("etc/ssl/certs/ca-certificates.crt"),
    ));
    for (from, to) in &files {
        let dest = rootfs.join(to);
        fs::create_dir_all(dest.parent().expect("a file has a parent"))?;
        // fs::copy follows symlinks: the image gets the files themselves
        fs::copy(from, &dest).with_context(|| {
            format!(
                "copy {} into the image (for CA certificates: apt-get install ca-certificates)",
                from.display()
            )
        })?;
    }
    println!("image: root filesystem {} ({} files)", rootfs.display(), files.len());
    Ok(())
}

/// Absolute paths of the shared objects in `ldd` output (the vDSO has none).
fn ldd_paths(ldd: &str) -> Vec<PathBuf> {
    ldd.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.trim().split(" (").next()?.trim(),
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// `cargo xtask deploy`: the test step (see the module doc).
pub fn deploy(bin: &Path) -> Result<()> {
    let t0 = Instant::now();
    let work = util::target_dir().join("deploy");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let python = venv().join("bin/python");
    if !python.exists() {
        bail!("{} is missing: run `cargo xtask setup`", python.display());
    }
    for tool in ["podman", "capsh", "setpriv", "unshare", "go", "ldd", "tar"] {
        if !on_path(tool) {
            bail!("`{tool}` is not on PATH: run `cargo xtask setup`");
        }
    }

    // 1. lint + render (and deploy/daemonset.yaml is the default rendering)
    let rendered = work.join("rendered");
    run(
        "render the chart",
        Command::new(&python)
            .arg(util::root().join("deploy/render.py"))
            .arg("--out")
            .arg(&rendered)
            .arg("--kube-version")
            .arg(format!("v{KUBE_VERSION}")),
    )?;

    // 2. offline schema validation, unknown fields refused
    let mut manifests: Vec<PathBuf> = fs::read_dir(&rendered)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    manifests.sort();
    manifests.push(util::root().join("deploy/daemonset.yaml"));
    run(
        "kubernetes-validate",
        Command::new(venv().join("bin/kubernetes-validate"))
            .args(["--strict", "--quiet", "-k", KUBE_VERSION])
            .args(&manifests),
    )?;
    println!(
        "deploy: {} manifest files valid for Kubernetes {KUBE_VERSION} (strict)",
        manifests.len()
    );

    // 3. the image, and its root filesystem as the runtime would unpack it
    let facts = |variant: &str| -> Result<Value> {
        let path = rendered.join(format!("{variant}.json"));
        serde_json::from_str(&fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?)
            .with_context(|| format!("parse {}", path.display()))
    };
    let tag = image(bin)?;
    let default = facts("default")?;
    let chart_image = default["image"].as_str().unwrap_or_default();
    if chart_image != tag {
        bail!(
            "the chart's default image is {chart_image} but `cargo xtask image` builds {tag}: align Chart.yaml's appVersion with the workspace version"
        );
    }
    let rootfs = work.join("rootfs");
    export_rootfs(&tag, &rootfs, &work)?;

    // 4. run it as the DaemonSet does, with either capability set
    for variant in ["default", "no-go-hooks"] {
        let spec = PodSpec::from_facts(&facts(variant)?)?;
        if spec.go_hooks != (variant == "default") {
            bail!(
                "the {variant} values should render Go hooks {}",
                if spec.go_hooks { "off" } else { "on" }
            );
        }
        println!("deploy: values `{variant}`");
        run_as_daemonset(&rootfs, &spec, &work.join(variant))?;
    }
    println!("deploy: all checks passed in {}", util::secs(t0.elapsed()));
    Ok(())
}

fn export_rootfs(tag: &str, rootfs: &Path, work: &Path) -> Result<()> {
    let entry =
        output(Command::new("podman").args(["image", "inspect", "--format", "{{json .Config.Entrypoint}}", tag]))
            .context("podman image inspect failed")?;
    if entry.trim() != r#"["/usr/local/bin/sockspan"]"# {
        bail!(
            "the image's entrypoint is {} (expected /usr/local/bin/sockspan)",
            entry.trim()
        );
    }
    let cid = output(Command::new("podman").args(["create", tag]))
        .context("podman create failed")?
        .trim()
        .to_owned();
    let tar = work.join("rootfs.tar");
    let res = run(
        "podman export",
        Command::new("podman").args(["export", "-o"]).arg(&tar).arg(&cid),
    );
    let _ = output(Command::new("podman").args(["rm", &cid]));
    res?;
    fs::create_dir_all(rootfs)?;
    run(
        "unpack the image",
        Command::new("tar").arg("-xf").arg(&tar).arg("-C").arg(rootfs),
    )?;
    Ok(())
}

/// What the chart's DaemonSet gives its container (from deploy/render.py's default.json).
#[derive(Debug)]
struct PodSpec {
    args: Vec<String>,
    caps: Vec<String>,
    /// (host path or config files, path in the container, read-only)
    mounts: Vec<(MountSource, String, bool)>,
    read_only_root: bool,
    no_new_privs: bool,
    go_hooks: bool,
}

#[derive(Debug)]
enum MountSource {
    Host(String),
    Files(Vec<(String, String)>),
}

impl PodSpec {
    fn from_facts(f: &Value) -> Result<Self> {
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
                .unwrap_or_default()
        };
        if strings(&f["capabilities"]["drop"]) != ["ALL"] {
            bail!(
                "the DaemonSet does not drop ALL capabilities: {}",
                f["capabilities"]["drop"]
            );
        }
        if f["privileged"].as_bool() != Some(false) || !f["hostPID"].as_bool().unwrap_or(false) {
            bail!("the DaemonSet must be unprivileged with hostPID (the test runs it so)");
        }
        let caps = strings(&f["capabilities"]["add"]);
        let mut mounts = Vec::new();
        let mut go_hooks = true;
        for m in f["mounts"].as_array().context("no mounts")? {
            let path = m["mountPath"].as_str().context("mountPath")?.to_owned();
            let ro = m["readOnly"].as_bool().unwrap_or(false);
            let source = if let Some(h) = m["hostPath"].as_str() {
                MountSource::Host(h.to_owned())
            } else {
                let files: Vec<(String, String)> = m["files"]
                    .as_object()
                    .context("a mount is neither hostPath nor configMap")?
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect();
                if files
                    .iter()
                    .any(|(_, text)| text.lines().any(|l| l.trim() == "no_go_hooks: true"))
                {
                    go_hooks = false;
                }
                MountSource::Files(files)
            };
            mounts.push((source, path, ro));
        }
        Ok(Self {
            args: strings(&f["args"]),
            caps,
            mounts,
            read_only_root: f["readOnlyRootFilesystem"].as_bool().unwrap_or(false),
            no_new_privs: f["allowPrivilegeEscalation"].as_bool() == Some(false),
            go_hooks,
        })
    }
}

/// The probe: a Go server whose `/` calls its own `/leaf` with net/http's client (so both Go
/// hooks' functions exist in it).
const PROBE_GO: &str = r#"package main

import (
	"io"
	"net/http"
	"os"
)

func main() {
	port := os.Args[1]
	http.HandleFunc("/leaf", func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("leaf\n")) })
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		resp, err := http.Get("http://127.0.0.1:" + port + "/leaf")
		if err != nil {
			http.Error(w, err.Error(), 502)
			return
		}
		io.Copy(w, resp.Body)
		resp.Body.Close()
	})
	if err := http.ListenAndServe("127.0.0.1:"+port, nil); err != nil {
		panic(err)
	}
}
"#;

fn build_probe(dir: &Path) -> Result<PathBuf> {
    let src = dir.join("probe");
    fs::create_dir_all(&src)?;
    fs::write(src.join("main.go"), PROBE_GO)?;
    fs::write(src.join("go.mod"), "module probe\n\ngo 1.18\n")?;
    let exe = dir.join(PROBE_EXE);
    run(
        "go build (probe server)",
        Command::new("go")
            .current_dir(&src)
            .args(["build", "-o"])
            .arg(&exe)
            .arg(".")
            .env("GOFLAGS", "-mod=mod")
            .env("GOTOOLCHAIN", "local"),
    )?;
    // another user runs it
    for p in [dir, &exe] {
        fs::set_permissions(p, fs::Permissions::from_mode(0o755))?;
    }
    Ok(exe)
}

/// The capability names of this shell's bounding set (`cap_chown`, ...).
fn bounding_set() -> Result<BTreeSet<String>> {
    let print = output(Command::new("capsh").arg("--print")).context("capsh --print failed")?;
    let line = print
        .lines()
        .find_map(|l| l.strip_prefix("Bounding set ="))
        .context("capsh --print shows no bounding set")?;
    Ok(line
        .split(',')
        .map(|c| c.trim().to_owned())
        .filter(|c| !c.is_empty())
        .collect())
}

/// Holds [`E2E_LOCK`] until dropped (or nothing, when a parent process already holds it).
struct Lock {
    _file: Option<fs::File>,
}

impl Lock {
    fn take() -> Result<Self> {
        if let Some(pid) = ancestor_holding(E2E_LOCK) {
            println!(
                "deploy: {E2E_LOCK} is held by this run's parent process {pid} (e.g. `flock {E2E_LOCK} cargo xtask test`)"
            );
            return Ok(Self { _file: None });
        }
        let f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(E2E_LOCK)
            .with_context(|| format!("open {E2E_LOCK}"))?;
        let limit = Duration::from_secs(30 * 60);
        let t0 = Instant::now();
        let mut tries: u32 = 0;
        // SAFETY: flock on a descriptor this File owns.
        while unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                bail!("flock {E2E_LOCK}: {e}");
            }
            // every minute
            if tries.is_multiple_of(120) {
                println!("deploy: waiting for {E2E_LOCK} (another agent run holds it)");
            }
            if t0.elapsed() > limit {
                bail!("{E2E_LOCK} stayed held by another agent run for {limit:?}");
            }
            tries += 1;
            std::thread::sleep(Duration::from_millis(500));
        }
        Ok(Self { _file: Some(f) })
    }
}

/// The nearest ancestor process with `path` open (an enclosing `flock path ...`), if any: taking
/// the lock again would wait for ourselves.
fn ancestor_holding(path: &str) -> Option<u32> {
    let mut pid = std::process::id();
    for _ in 0..64 {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let ppid: u32 = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
        if ppid <= 1 {
            return None;
        }
        let holds = fs::read_dir(format!("/proc/{ppid}/fd"))
            .map(|fds| {
                fds.flatten()
                    .any(|fd| fs::read_link(fd.path()).is_ok_and(|p| p == Path::new(path)))
            })
            .unwrap_or(false);
        if holds {
            return Some(ppid);
        }
        pid = ppid;
    }
    None
}

/// The shell script that sets up the container's mounts in a private mount namespace and execs
/// the entrypoint with the pod's capabilities (run by `unshare --mount`).
fn container_script(
    rootfs: &Path,
    spec: &PodSpec,
    config_dirs: &[PathBuf],
    drop: &[String],
    extra: &[String],
) -> String {
    let q = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let r = rootfs.display().to_string();
    let mut s = String::from("set -eu\n");
    // mount points, as the runtime creates them in the container's writable layer
    for d in ["proc", "sys"]
        .iter()
        .map(|d| (*d).to_owned())
        .chain(spec.mounts.iter().map(|(_, p, _)| p.trim_start_matches('/').to_owned()))
    {
        s += &format!("mkdir -p {}\n", q(&format!("{r}/{d}")));
    }
    s += &format!("mount --bind {0} {0}\n", q(&r));
    // the runtime's /sys (read-only without `privileged`) and, with hostPID, the host's /proc
    s += &format!(
        "mount -t sysfs -o ro,nosuid,nodev,noexec sysfs {}\n",
        q(&format!("{r}/sys"))
    );
    s += &format!("mount --rbind /proc {}\n", q(&format!("{r}/proc")));
    let mut configs = config_dirs.iter();
    for (source, path, ro) in &spec.mounts {
        let from = match source {
            MountSource::Host(h) => h.clone(),
            MountSource::Files(_) => configs.next().expect("one dir per config mount").display().to_string(),
        };
        let to = format!("{r}{path}");
        s += &format!("mount --bind {} {}\n", q(&from), q(&to));
        if *ro {
            s += &format!("mount -o remount,bind,ro {}\n", q(&to));
        }
    }
    if spec.read_only_root {
        s += &format!("mount -o remount,bind,ro {}\n", q(&r));
    }
    let caps: Vec<String> = spec.caps.iter().map(|c| format!("cap_{}", c.to_lowercase())).collect();
    s += &format!("exec capsh --chroot={} --drop={}", q(&r), q(&drop.join(",")));
    if !caps.is_empty() {
        s += &format!(" --caps={}", q(&format!("{}=eip", caps.join(","))));
    }
    if spec.no_new_privs {
        s += " --no-new-privs";
    }
    s += " --shell=/usr/local/bin/sockspan --";
    for a in spec.args.iter().chain(extra) {
        s += &format!(" {}", q(a));
    }
    s.push('\n');
    s
}

fn run_as_daemonset(rootfs: &Path, spec: &PodSpec, work: &Path) -> Result<()> {
    let caps: BTreeSet<String> = spec.caps.iter().map(|c| format!("cap_{}", c.to_lowercase())).collect();
    let have = bounding_set()?;
    if let Some(c) = caps.iter().find(|c| !have.contains(*c)) {
        bail!("this shell's bounding set lacks {c}, which the DaemonSet adds: cannot run it as the DaemonSet would");
    }
    let drop: Vec<String> = have.difference(&caps).cloned().collect();
    println!(
        "deploy: running the image with capabilities [{}] (all others dropped), mounts {}",
        spec.caps.join(", "),
        spec.mounts
            .iter()
            .map(|(_, p, ro)| format!("{p}{}", if *ro { " (ro)" } else { "" }))
            .collect::<Vec<_>>()
            .join(", ")
    );

    let tmp = TempDir::new("xtask-deploy")?;
    let mut config_dirs = Vec::new();
    for (i, (source, _, _)) in spec.mounts.iter().enumerate() {
        if let MountSource::Files(files) = source {
            let d = tmp.0.join(format!("configmap-{i}"));
            fs::create_dir_all(&d)?;
            for (name, text) in files {
                fs::write(d.join(name), text)?;
            }
            config_dirs.push(d);
        }
    }
    let probe = build_probe(&tmp.0)?;
    let port = util::free_port(18_470)?;
    let metrics_port = util::free_port(19_470)?;
    let server = Command::new("setpriv")
        .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups"])
        .arg(&probe)
        .arg(port.to_string())
        .env("OTEL_SERVICE_NAME", PROBE_SERVICE)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("start the probe server")?;
    let _server = Guard::new("probe server", server);
    if !util::poll_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    }) {
        bail!("the probe server did not listen on 127.0.0.1:{port} within 10 s");
    }

    // Spans on stdout (the chart exports OTLP; its collector is not here), metrics on a free port.
    let extra = vec![
        "--print=json".to_owned(),
        "--metrics-addr".to_owned(),
        format!("127.0.0.1:{metrics_port}"),
    ];
    let script = container_script(rootfs, spec, &config_dirs, &drop, &extra);
    fs::create_dir_all(work)?;
    fs::write(work.join("container.sh"), &script)?;
    let lock = Lock::take()?;
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("NODE_NAME", NODE_NAME)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("start the agent (unshare)")?;
    let out = util::lines_to_channel(child.stdout.take().expect("piped"), Some(work.join("agent.stdout")));
    let err = util::lines_to_channel(child.stderr.take().expect("piped"), Some(work.join("agent.stderr")));
    let mut agent = Guard::new("sockspan (image)", child);
    let result = check_agent(&mut agent, &out, &err, port, metrics_port, spec.go_hooks);
    let stopped = agent.stop("TERM", Duration::from_secs(10));
    drop_lock(lock);
    if let Err(e) = result {
        // every line the agent wrote to stderr is in this file
        let log = work.join("agent.stderr");
        let text = fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(15)..];
        bail!(
            "{e:#}\nagent stderr (last lines; all in {}):\n  {}",
            log.display(),
            tail.join("\n  ")
        );
    }
    match stopped {
        Some(st) if st.success() => Ok(()),
        other => bail!("the agent did not exit cleanly on SIGTERM: {other:?}"),
    }
}

fn drop_lock(lock: Lock) {
    drop(lock);
}

fn check_agent(
    agent: &mut Guard,
    out: &std::sync::mpsc::Receiver<String>,
    err: &std::sync::mpsc::Receiver<String>,
    port: u16,
    metrics_port: u16,
    go_hooks: bool,
) -> Result<()> {
    // ready: programs loaded and attached
    let mut logs = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(line) = err.recv_timeout(Duration::from_millis(100)) {
            let ready = line.contains("sockspan ready");
            logs.push(line);
            if ready {
                break;
            }
        }
        if !agent.alive() {
            bail!("the agent exited before it was ready: {}", logs.join(" | "));
        }
        if Instant::now() > deadline {
            bail!("the agent was not ready within 60 s");
        }
    }
    println!("deploy: agent ready; requests to the probe server (uid {NOBODY}) until its span shows");
    let mut span = None;
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while span.is_none() && Instant::now() < deadline {
        let _ = util::http_get(port, "/", Duration::from_secs(2));
        std::thread::sleep(Duration::from_millis(300));
        for line in out.try_iter() {
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if v["kind"] == "SERVER" && v["name"] == "GET /" && v["attributes"]["server.port"] == port {
                span = Some(v.clone());
            }
            seen.push(line);
        }
        logs.extend(err.try_iter());
    }
    let Some(span) = span else {
        bail!(
            "no SERVER span `GET /` for the probe server on port {port} within 30 s ({} other lines on stdout)",
            seen.len()
        );
    };
    let res = &span["resource"];
    println!("deploy: span {} {}", span["name"], res);
    for (key, want) in [
        ("service.name", PROBE_SERVICE),
        ("process.executable.name", PROBE_EXE),
        ("host.name", NODE_NAME),
    ] {
        if res[key] != want {
            bail!(
                "the probe server's span has {key}={} (expected {want}{})",
                res[key],
                match key {
                    "service.name" => ": /proc/<pid>/environ of another user was not readable",
                    "process.executable.name" => ": /proc/<pid>/exe of another user was not readable",
                    _ => ": NODE_NAME was not used",
                }
            );
        }
    }
    logs.extend(err.try_iter());
    if !go_hooks {
        if logs.iter().any(|l| l.contains("Go hooks")) {
            bail!("the config turns the Go hooks off, yet the agent tried them");
        }
    } else {
        if let Some(l) = logs.iter().find(|l| l.contains("Go hooks not attached")) {
            bail!("the Go hooks failed: {l}");
        }
        if !logs.iter().any(|l| l.contains("Go hooks attached")) {
            bail!("the agent never logged `Go hooks attached` for the probe server");
        }
        println!("deploy: Go hooks attached to the probe server");
    }
    let (code, body) = util::http_get(metrics_port, "/healthz", Duration::from_secs(2)).context("GET /healthz")?;
    if code != 200 {
        bail!("/healthz answered {code}: {body}");
    }
    let (code, body) = util::http_get(metrics_port, "/metrics", Duration::from_secs(2)).context("GET /metrics")?;
    if code != 200 || !body.contains("sockspan_spans_created_total") {
        bail!("/metrics answered {code} without sockspan_spans_created_total");
    }
    println!("deploy: /healthz 200, /metrics served");
    let _ = std::io::stdout().flush();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ldd_output() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            ldd_paths(ldd),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
    }
}
