//! Builds the eBPF object (`agent-ebpf`) and leaves it in OUT_DIR for `include_bytes_aligned!`,
//! so a plain `cargo build` yields one self-contained `sockspan` binary.
//!
//! Route 1 (this machine kind, see docs): Debian's rustc ships a prebuilt `core` for
//! `bpfel-unknown-none`; no `-Z build-std`, no rust-src. Route 2 (the standard aya set-up):
//! a rustup nightly with rust-src builds `core` itself. Set `SOCKSPAN_EBPF_SKIP=1` to embed an
//! empty object (clippy/docs on machines without a BPF toolchain; the agent then refuses to run).
use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir.parent().expect("workspace root").to_path_buf();
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let dst = out_dir.join("agent-ebpf.o");

    for p in [
        "agent-ebpf/src",
        "agent-ebpf/Cargo.toml",
        "agent-common/src",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(p).display());
    }
    for v in [
        "SOCKSPAN_EBPF_SKIP",
        "SOCKSPAN_EBPF_CARGO",
        "SOCKSPAN_EBPF_RUSTC",
        "SOCKSPAN_EBPF_ROUTE",
    ] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    if env::var_os("SOCKSPAN_EBPF_SKIP").is_some_and(|v| v != "0") {
        fs::write(&dst, b"").expect("write empty eBPF object");
        return;
    }

    let target_dir = out_dir.join("ebpf-target");
    let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("CARGO_CFG_TARGET_ARCH");
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".to_owned(),
        // bpf-linker emits BTF: needed for global variables (load-time configuration).
        "-Clink-arg=--btf".to_owned(),
    ];

    let debian = Path::new("/usr/lib/rustlib/bpfel-unknown-none/lib").exists();
    let route =
        env::var("SOCKSPAN_EBPF_ROUTE").unwrap_or_else(|_| if debian { "debian".into() } else { "nightly".into() });

    let mut cmd;
    if route == "debian" {
        let cargo = env::var("SOCKSPAN_EBPF_CARGO").unwrap_or_else(|_| "/usr/bin/cargo".into());
        let rustc = env::var("SOCKSPAN_EBPF_RUSTC").unwrap_or_else(|_| "/usr/bin/rustc".into());
        cmd = Command::new(cargo);
        cmd.env("RUSTC", rustc)
            // aya-ebpf uses #![feature(asm_experimental_arch)]; Debian's rustc is a stable
            // compiler, so unlock unstable features for that one crate only.
            .env("RUSTC_BOOTSTRAP", "aya_ebpf");
        cmd.arg("build");
    } else {
        // The standard aya route: a nightly toolchain with rust-src and bpf-linker on PATH.
        cmd = Command::new("rustup");
        cmd.args(["run", "nightly", "cargo", "build", "-Z", "build-std=core"]);
    }
    cmd.current_dir(&workspace)
        .args([
            "--package",
            "agent-ebpf",
            "--bins",
            "--release",
            "--target",
            "bpfel-unknown-none",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags.join("\x1f"));
    // The outer (rustup) build's settings must not leak into the inner build.
    for k in [
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTUP_TOOLCHAIN",
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTDOC",
        "CARGO_ENCODED_RUSTFLAGS_OUTER",
    ] {
        cmd.env_remove(k);
    }
    if route != "debian" {
        cmd.env_remove("RUSTC");
    }
    let output = match cmd.output() {
        Ok(o) => o,
        Err(e) => fail(&format!(
            "cannot run the eBPF build ({e}); install the toolchain with `cargo xtask setup` \
             (Debian: rustc-web cargo-web libstd-rust-web-dev-bpf + bpf-linker) or use nightly + rust-src + bpf-linker"
        )),
    };
    if !output.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&output.stderr));
        let stderr = String::from_utf8_lossy(&output.stderr);
        let hint = if stderr.contains("bpf-linker") {
            "bpf-linker is missing: run `cargo xtask setup`"
        } else if stderr.contains("can't find crate for `core`") || stderr.contains("target may not be installed") {
            "no `core` for bpfel-unknown-none: install Debian's libstd-rust-web-dev-bpf (`cargo xtask setup`) or nightly rust-src"
        } else {
            "see the compiler output above"
        };
        fail(&format!("building the eBPF object failed: {hint}"));
    }
    // The inner build's warnings would otherwise go unseen.
    for line in String::from_utf8_lossy(&output.stderr)
        .lines()
        .filter(|l| l.starts_with("warning:"))
    {
        println!("cargo:warning=agent-ebpf: {line}");
    }
    let obj = target_dir.join("bpfel-unknown-none/release/agent-ebpf");
    if let Err(e) = fs::copy(&obj, &dst) {
        fail(&format!("copy {}: {e}", obj.display()));
    }
}

fn fail(msg: &str) -> ! {
    println!("cargo:warning={msg}");
    eprintln!("error: {msg}");
    std::process::exit(1);
}
