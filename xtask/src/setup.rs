//! `cargo xtask setup`: everything a fresh Debian 12 machine needs to build, run, test and
//! benchmark sockspan (see docs in shared `bpf-toolchain.md`). Idempotent: every step checks
//! first, so a warm rerun takes about a second.
use std::{fs, path::Path, process::Command, time::Instant};

use anyhow::{Context, Result, bail};

use crate::{
    deploy,
    util::{self, on_path, output, output_of, run},
};

/// Debian packages for building and running the agent and its end-to-end tests.
/// `rustc-web`/`cargo-web` give /usr/bin/{rustc,cargo} (1.96, LLVM 22) with a prebuilt `core`
/// for bpfel-unknown-none (`libstd-rust-web-dev-bpf`); `llvm-22-dev` is what bpf-linker links.
/// In bookworm `nginx` ships /usr/sbin/nginx itself (`nginx-light` only adds a module on top).
pub const BASE: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "bpftool",
    "nginx",
    "curl",
    // libFuzzer (the fuzz step) is C++.
    "g++",
    // the full-screen views' end-to-end tests run them in a terminal
    "tmux",
    // the TLS export test makes its certificate authority with it
    "openssl",
    // the deploy step: builds the image (FROM scratch, no registry), runs it with the
    // DaemonSet's capabilities (capsh)
    "podman",
    "libcap2-bin",
    "ca-certificates",
];
/// Only `cargo xtask bench` needs these.
pub const BENCH: &[&str] = &["wrk", "bpftrace"];

const BPF_LINKER_VERSION: &str = "0.13.0";

fn step(msg: &str) {
    println!("setup: {msg}");
}

pub fn setup(extra: &[&str]) -> Result<()> {
    util::require_root("setup")?;
    let t0 = Instant::now();

    // 1. Debian packages (skip apt entirely when everything is there).
    let mut wanted: Vec<&str> = BASE.iter().chain(extra).copied().collect();
    if !on_path("node") {
        wanted.push("nodejs");
    }
    if !on_path("python3") {
        wanted.push("python3");
    }
    // the test beds' Go and Java middle services
    if !on_path("go") {
        wanted.push("golang-go");
    }
    if !on_path("java") || !on_path("javac") {
        wanted.push("openjdk-17-jdk-headless");
    }
    // aiohttp (the asyncio test bed) for Debian's own python3, which is externally managed (no
    // pip); any other python3 (pyenv, a venv) does not see Debian's packages and gets it from pip
    // below
    if !on_path("python3") || (!python_imports("aiohttp") && python_is_debian()) {
        wanted.push("python3-aiohttp");
    }
    // Debian's python3 makes virtualenvs only with python3-venv
    if !on_path("python3") || python_is_debian() {
        wanted.push("python3-venv");
    }
    let missing: Vec<&str> = wanted.into_iter().filter(|p| !pkg_installed(p)).collect();
    if missing.is_empty() {
        step("debian packages: all installed");
    } else {
        step(&format!("debian packages: installing {}", missing.join(" ")));
        apt(&["update", "-q"])?;
        let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
        args.extend(&missing);
        apt(&args)?;
    }
    // pyenv's python3 (or a venv's) only sees what its own pip installed
    if python_imports("aiohttp") {
        step("aiohttp: installed");
    } else {
        step("aiohttp: installing with pip");
        run(
            "pip install aiohttp",
            Command::new("python3")
                .args(["-m", "pip", "install", "-q", "aiohttp"])
                // setup runs as root by design
                .env("PIP_ROOT_USER_ACTION", "ignore"),
        )?;
        if !python_imports("aiohttp") {
            bail!("aiohttp was installed but `python3 -c 'import aiohttp'` still fails");
        }
    }

    // The deploy step's chart tools, pinned, in their own virtualenv.
    deploy_venv()?;

    // 2. bpf-linker, built against Debian's LLVM 22 so it matches Debian's rustc.
    let have = output_of("bpf-linker", ["--version"]).unwrap_or_default();
    if have.split_whitespace().any(|w| w == BPF_LINKER_VERSION) {
        step(&format!("bpf-linker {BPF_LINKER_VERSION}: installed"));
    } else {
        step(&format!(
            "bpf-linker: installing {BPF_LINKER_VERSION} (cargo install, ~1 min)"
        ));
        let path = format!("/usr/lib/llvm-22/bin:{}", std::env::var("PATH").unwrap_or_default());
        let mut cmd = util::cargo();
        cmd.current_dir(std::env::temp_dir())
            .env("PATH", path)
            .env("LLVM_SYS_221_PREFIX", "/usr/lib/llvm-22")
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--locked"])
            .args(["--no-default-features", "--features", "llvm-22"]);
        run("cargo install bpf-linker", &mut cmd)?;
        if !on_path("bpf-linker") {
            bail!("bpf-linker was installed but is not on PATH: add ~/.cargo/bin to PATH");
        }
    }

    // 3. tracefs: per-syscall tracepoints are attached through it.
    if Path::new("/sys/kernel/tracing/events").is_dir() {
        step("tracefs: mounted at /sys/kernel/tracing");
    } else {
        step("tracefs: mounting at /sys/kernel/tracing");
        run(
            "mount tracefs",
            Command::new("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]),
        )?;
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!("this kernel has no BTF (/sys/kernel/btf/vmlinux): sockspan cannot run here");
    }

    // 4. Runtimes the end-to-end tests use as real servers and clients.
    let aiohttp_version: &[&str] = &["-c", "import aiohttp; print('aiohttp', aiohttp.__version__)"];
    for (prog, exe, args) in [
        ("python3", "python3", &["--version"][..]),
        ("aiohttp", "python3", aiohttp_version),
        ("node", "node", &["--version"]),
        ("curl", "curl", &["--version"]),
        ("nginx", "/usr/sbin/nginx", &["-v"]),
        ("go", "go", &["version"]),
        ("java", "java", &["--version"]),
    ] {
        let v = Command::new(exe)
            .args(args)
            .output()
            .with_context(|| format!("{prog} is missing"))?;
        let text = String::from_utf8_lossy(if v.stdout.is_empty() { &v.stderr } else { &v.stdout }).into_owned();
        step(&format!(
            "{prog}: {}",
            text.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
        ));
    }
    step(&format!("done in {}", util::secs(t0.elapsed())));
    Ok(())
}

/// The virtualenv with the deploy step's pinned Python packages (helm-python-sdk renders the chart
/// with Helm's engine, kubernetes-validate checks the manifests).
fn deploy_venv() -> Result<()> {
    let venv = deploy::venv();
    let python = venv.join("bin/python");
    let pins = deploy::PIP_PACKAGES.join(" ");
    let installed = || {
        output(Command::new(&python).args(["-m", "pip", "freeze", "--disable-pip-version-check"])).is_some_and(|f| {
            let have: Vec<String> = f.lines().map(|l| l.trim().to_lowercase().replace('_', "-")).collect();
            deploy::PIP_PACKAGES.iter().all(|p| have.iter().any(|h| h == p))
        })
    };
    if python.exists() && installed() {
        step(&format!("chart tools: {pins}"));
        return Ok(());
    }
    step(&format!("chart tools: installing {pins} in {}", venv.display()));
    if !python.exists() {
        run(
            "python3 -m venv",
            Command::new("python3").arg("-m").arg("venv").arg(&venv),
        )?;
    }
    run(
        "pip install (chart tools)",
        Command::new(&python)
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .args(deploy::PIP_PACKAGES)
            .env("PIP_ROOT_USER_ACTION", "ignore"),
    )?;
    if !installed() {
        bail!(
            "{pins} were installed in {} but pip freeze does not list them",
            venv.display()
        );
    }
    Ok(())
}

/// Whether a Debian package is installed (nginx counts as installed when /usr/sbin/nginx exists,
/// whichever flavour provides it).
fn pkg_installed(pkg: &str) -> bool {
    if pkg == "nginx" && Path::new("/usr/sbin/nginx").exists() {
        return true;
    }
    output_of("dpkg-query", ["-W", "-f=${db:Status-Status}", pkg]).is_some_and(|s| s.trim() == "installed")
}

/// Whether the python3 on PATH can import `module`.
fn python_imports(module: &str) -> bool {
    output_of("python3", ["-c", &format!("import {module}")]).is_some()
}

/// Whether the python3 on PATH is Debian's own (installed under /usr).
fn python_is_debian() -> bool {
    output_of("python3", ["-c", "import sys; print(sys.prefix)"]).is_some_and(|p| p.trim() == "/usr")
}

fn apt(args: &[&str]) -> Result<()> {
    let mut cmd = Command::new("apt-get");
    cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
    run(&format!("apt-get {}", args[0]), &mut cmd)
}

/// Kernel facts worth a line (used by bench reports).
pub fn kernel() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}
