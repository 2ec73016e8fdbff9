//! Loads the kernel programs, sets their load-time configuration and attaches every hook.
//! Owns the `Ebpf` handle: dropping it detaches all programs.
use std::path::Path;

use agent_common::{
    MAX_CAPTURE,
    config::{
        GLOBAL_CAPTURE_BYTES, GLOBAL_CGROUP_RULES, GLOBAL_PORT_MODE, GLOBAL_SELF_TGID, GLOBAL_SOCK_OFFSETS,
        GLOBAL_WAKEUP_BYTES,
    },
    hooks::Tracepoint,
    maps::{
        CGROUP_NOT_SELECTED, CGROUP_SELECT_MAP, COUNTERS_MAP, EVENTS_MAP, PORT_SELECT_MAP, TRACED_TGIDS_MAP, counter,
        traced,
    },
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{TracePoint, UProbe, trace_point::TracePointLinkId, uprobe::UProbeScope},
};

/// The eBPF object built by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf.o"));

const TRACEFS: &str = "/sys/kernel/tracing";

/// Every tracepoint program, and the tracepoint it attaches to: the table of hooks
/// (`agent_common::hooks`), whose programs are named after their tracepoints.
pub use agent_common::hooks::TRACEPOINTS as PROGRAMS;

/// Go programs' hooks (`agent-ebpf/src/probes/golang.rs`): program → the function it attaches
/// to (a return hook's program is a uretprobe). Attached per Go executable, when a Go process
/// is first seen moving TCP bytes (see `crate::goroutines`).
pub const GO_HOOKS: &[(&str, &str)] = &[
    ("go_newproc1", "runtime.newproc1"),
    ("go_newproc1_ret", "runtime.newproc1"),
    ("go_round_trip", "net/http.(*persistConn).roundTrip"),
    ("go_request_write", "net/http.(*Request).write"),
];

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("sockspan must run as root (it loads eBPF programs and reads other processes' /proc)")]
    NotRoot,
    #[error(
        "this binary was built without its eBPF object (SOCKSPAN_EBPF_SKIP was set): rebuild with the BPF toolchain (`cargo xtask setup`)"
    )]
    NoObject,
    #[error("the kernel exposes no BTF at /sys/kernel/btf/vmlinux (needs CONFIG_DEBUG_INFO_BTF=y)")]
    NoBtf,
    #[error(
        "tracefs is not mounted at {TRACEFS} and mounting it failed ({0}); mount it with `mount -t tracefs nodev {TRACEFS}`"
    )]
    NoTracefs(std::io::Error),
    #[error(
        "the kernel has no tracepoint {category}:{name} (sockspan needs Linux 6.3 or later with syscall tracepoints)"
    )]
    MissingTracepoint { category: &'static str, name: &'static str },
    #[error(
        "tracepoint {category}:{name}: field `{field}` is {found} in {TRACEFS}/events/{category}/{name}/format, where sockspan reads offset {offset}, size {size} (agent_common::hooks)"
    )]
    FieldMismatch {
        category: &'static str,
        name: &'static str,
        field: &'static str,
        offset: usize,
        size: usize,
        found: String,
    },
    #[error("the eBPF object has tracepoint program {0}, which the table of hooks (agent_common::hooks) lacks")]
    UnlistedProgram(String),
    #[error("loading the eBPF object failed: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("the kernel refused program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// A CPU's share of the wake-up threshold is at least this, so that many CPUs do not wake the
/// reader for every few records.
const MIN_WAKEUP_BYTES_PER_CPU: u32 = 16 * 1024;

/// Load-time settings of the kernel programs.
#[derive(Clone, Debug)]
pub struct KernelConfig {
    pub capture_bytes: u32,
    pub ring_bytes: u32,
    /// Bytes waiting in the ring at which the reader is woken; each CPU counts its own share.
    pub wakeup_bytes: u32,
    /// Port selection: the `PORT_MODE` bits and the `PORT_SELECT` entries.
    pub port_mode: u32,
    pub port_entries: Vec<(u16, u8)>,
    /// Cgroup rules are given: the kernel looks up `CGROUP_SELECT`.
    pub cgroup_rules: bool,
}

/// The loaded, attached programs and the maps userspace reads.
pub struct Loaded {
    pub ebpf: Ebpf,
    pub links: Vec<(&'static str, TracePointLinkId)>,
    pub events: RingBuf<MapData>,
    pub counters: PerCpuArray<MapData, u64>,
    /// Where processes not selected are marked.
    pub gate: KernelProcessGate,
    /// Where cgroups not selected are marked.
    pub cgroups: KernelCgroupGate,
}

/// Marks cgroups in the kernel's `CGROUP_SELECT` so their processes' calls are not reported.
pub struct KernelCgroupGate(BpfHashMap<MapData, u64, u8>);

impl crate::selection::CgroupGate for KernelCgroupGate {
    fn mark(&mut self, id: u64) -> bool {
        self.0.insert(id, CGROUP_NOT_SELECTED, 0).is_ok()
    }

    fn unmark(&mut self, id: u64) {
        let _ = self.0.remove(&id);
    }
}

/// Marks processes in the kernel's process map (`TRACED_TGIDS`) so their sends and receives
/// are not reported (`traced::SKIP`).
pub struct KernelProcessGate(BpfHashMap<MapData, u32, u8>);

impl crate::selection::ProcessGate for KernelProcessGate {
    fn skip(&mut self, pid: u32) {
        let flags = self.0.get(&pid, 0).unwrap_or(traced::TCP);
        if let Err(e) = self.0.insert(pid, flags | traced::SKIP, 0) {
            tracing::debug!(pid, error = %e, "Could not mark a process as not selected");
        }
    }

    fn unskip(&mut self, pid: u32) {
        if let Ok(flags) = self.0.get(&pid, 0) {
            let _ = self.0.insert(pid, flags & !traced::SKIP, 0);
        }
    }
}

/// Detaches every program. Each detach waits for the kernel to retire the hook (tens of
/// milliseconds), so they run side by side: a clean stop stays within its time budget.
pub fn detach(mut ebpf: Ebpf, ids: Vec<(&'static str, TracePointLinkId)>) {
    let mut links = Vec::with_capacity(ids.len());
    for (name, id) in ids {
        let program: Option<&mut TracePoint> = ebpf.program_mut(name).and_then(|p| p.try_into().ok());
        if let Some(link) = program.and_then(|p| p.take_link(id).ok()) {
            links.push(link);
        }
    }
    let per_thread = links.len().div_ceil(8).max(1);
    std::thread::scope(|scope| {
        while !links.is_empty() {
            let batch: Vec<_> = links.drain(..per_thread.min(links.len())).collect();
            scope.spawn(move || drop(batch));
        }
    });
    drop(ebpf);
}

/// Checks what the programs need, with one precise message per missing piece.
pub fn preflight() -> Result<(), LoaderError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(LoaderError::NotRoot);
    }
    if EBPF_OBJECT.is_empty() {
        return Err(LoaderError::NoObject);
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(LoaderError::NoBtf);
    }
    ensure_tracefs()?;
    PROGRAMS.iter().try_for_each(check_tracepoint)
}

/// The kernel has tracepoint `tp`, with every field its program reads where the table says.
fn check_tracepoint(tp: &Tracepoint) -> Result<(), LoaderError> {
    let format = Path::new(TRACEFS)
        .join("events")
        .join(tp.category)
        .join(tp.name)
        .join("format");
    let format = std::fs::read_to_string(format).map_err(|_| LoaderError::MissingTracepoint {
        category: tp.category,
        name: tp.name,
    })?;
    check_fields(tp, &format)
}

/// Every field `tp`'s program reads is where the kernel's format file says it is.
fn check_fields(tp: &Tracepoint, format: &str) -> Result<(), LoaderError> {
    for f in tp.fields {
        let found = format_field(format, f.name);
        if found != Some((f.offset, f.size)) {
            return Err(LoaderError::FieldMismatch {
                category: tp.category,
                name: tp.name,
                field: f.name,
                offset: f.offset,
                size: f.size,
                found: match found {
                    Some((offset, size)) => format!("at offset {offset}, size {size}"),
                    None => "missing".to_owned(),
                },
            });
        }
    }
    Ok(())
}

/// (offset, size) of field `name` in a tracepoint format file, whose lines read
/// `field:<C declaration> <name>[<n>];\toffset:<o>;\tsize:<s>;\tsigned:<0|1>;`.
fn format_field(format: &str, name: &str) -> Option<(usize, usize)> {
    format.lines().find_map(|line| {
        let mut parts = line.trim().split(';');
        let decl = parts.next()?.strip_prefix("field:")?;
        let declared = decl.rsplit([' ', '*']).next()?;
        if declared.split('[').next()? != name {
            return None;
        }
        let value = |key: &str| parts.clone().find_map(|p| p.trim().strip_prefix(key)?.parse().ok());
        Some((value("offset:")?, value("size:")?))
    })
}

fn ensure_tracefs() -> Result<(), LoaderError> {
    if Path::new(TRACEFS).join("events").exists() {
        return Ok(());
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "tracefs", "nodev", TRACEFS])
        .status()
        .map_err(LoaderError::NoTracefs)?;
    if status.success() && Path::new(TRACEFS).join("events").exists() {
        Ok(())
    } else {
        Err(LoaderError::NoTracefs(std::io::Error::other(format!(
            "mount exited with {status}"
        ))))
    }
}

/// Loads and attaches everything. The agent's own process is excluded in the kernel.
pub fn load(cfg: KernelConfig) -> Result<Loaded, LoaderError> {
    preflight()?;
    let self_tgid = std::process::id();
    let capture = cfg.capture_bytes.min(MAX_CAPTURE as u32);
    // Without them, connections that predate the agent lack their 4-tuple when they are too
    // short-lived for /proc: worth a warning, not a refusal to run.
    let sock_offsets = crate::btf::Btf::from_sys_fs()
        .and_then(|btf| crate::btf::sock_offsets(&btf))
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "No socket field offsets from the kernel's BTF");
            Default::default()
        });
    // Each CPU wakes the reader after its own share of the threshold (see `capture::submit`).
    let cpus = aya::util::nr_cpus().map_or(1, |n| n.max(1)) as u32;
    let wakeup_per_cpu = (cfg.wakeup_bytes / cpus).max(MIN_WAKEUP_BYTES_PER_CPU);
    let mut ebpf = EbpfLoader::new()
        .override_global(GLOBAL_SELF_TGID, &self_tgid, true)
        .override_global(GLOBAL_CAPTURE_BYTES, &capture, true)
        .override_global(GLOBAL_WAKEUP_BYTES, &wakeup_per_cpu, true)
        .override_global(GLOBAL_SOCK_OFFSETS, &sock_offsets, true)
        .override_global(GLOBAL_PORT_MODE, &cfg.port_mode, true)
        .override_global(GLOBAL_CGROUP_RULES, &u32::from(cfg.cgroup_rules), true)
        .map_max_entries(EVENTS_MAP, cfg.ring_bytes)
        .load(EBPF_OBJECT)
        .map_err(LoaderError::Load)?;
    if let Some((name, _)) = ebpf.programs().find(|(name, p)| {
        matches!(p, aya::programs::Program::TracePoint(_)) && !PROGRAMS.iter().any(|t| t.name == *name)
    }) {
        return Err(LoaderError::UnlistedProgram(name.to_owned()));
    }
    let mut links = Vec::with_capacity(PROGRAMS.len());
    for &Tracepoint { category, name, .. } in PROGRAMS {
        let program: &mut TracePoint = ebpf
            .program_mut(name)
            .ok_or(LoaderError::MissingTracepoint { category, name })?
            .try_into()
            .map_err(|source| LoaderError::Program { name, source })?;
        program.load().map_err(|source| LoaderError::Program { name, source })?;
        let link = program
            .attach(category, name)
            .map_err(|source| LoaderError::Program { name, source })?;
        links.push((name, link));
    }
    for &(name, _) in GO_HOOKS {
        uprobe(&mut ebpf, name)?
            .load()
            .map_err(|source| LoaderError::Program { name, source })?;
    }
    let events = ebpf.take_map(EVENTS_MAP).ok_or(LoaderError::Map {
        name: EVENTS_MAP,
        source: aya::maps::MapError::InvalidName {
            name: EVENTS_MAP.into(),
        },
    })?;
    let events = RingBuf::try_from(events).map_err(|source| LoaderError::Map {
        name: EVENTS_MAP,
        source,
    })?;
    let counters = ebpf.take_map(COUNTERS_MAP).ok_or(LoaderError::Map {
        name: COUNTERS_MAP,
        source: aya::maps::MapError::InvalidName {
            name: COUNTERS_MAP.into(),
        },
    })?;
    let counters = PerCpuArray::try_from(counters).map_err(|source| LoaderError::Map {
        name: COUNTERS_MAP,
        source,
    })?;
    let map_err = |name: &'static str| move |source| LoaderError::Map { name, source };
    let missing = |name: &'static str| LoaderError::Map {
        name,
        source: aya::maps::MapError::InvalidName { name: name.into() },
    };
    let mut ports: Array<&mut MapData, u8> =
        Array::try_from(ebpf.map_mut(PORT_SELECT_MAP).ok_or_else(|| missing(PORT_SELECT_MAP))?)
            .map_err(map_err(PORT_SELECT_MAP))?;
    for &(port, flags) in &cfg.port_entries {
        ports.set(u32::from(port), flags, 0).map_err(map_err(PORT_SELECT_MAP))?;
    }
    let tgids = ebpf
        .take_map(TRACED_TGIDS_MAP)
        .ok_or_else(|| missing(TRACED_TGIDS_MAP))?;
    let gate = KernelProcessGate(BpfHashMap::try_from(tgids).map_err(map_err(TRACED_TGIDS_MAP))?);
    let cgroups = ebpf
        .take_map(CGROUP_SELECT_MAP)
        .ok_or_else(|| missing(CGROUP_SELECT_MAP))?;
    let cgroups = KernelCgroupGate(BpfHashMap::try_from(cgroups).map_err(map_err(CGROUP_SELECT_MAP))?);
    Ok(Loaded {
        ebpf,
        links,
        events,
        counters,
        gate,
        cgroups,
    })
}

fn uprobe<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut UProbe, LoaderError> {
    ebpf.program_mut(name)
        .ok_or(LoaderError::Program {
            name,
            source: aya::programs::ProgramError::UnexpectedProgramType,
        })?
        .try_into()
        .map_err(|source| LoaderError::Program { name, source })
}

/// Attaches the Go hooks to the executables of the Go processes it is told of (by pid), each
/// executable once; owns the programs meanwhile and hands them back when `stop` is set or no
/// one can ask any more.
pub fn hook_go_programs(
    mut ebpf: Ebpf,
    pids: std::sync::mpsc::Receiver<u32>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    metrics: std::sync::Arc<crate::telemetry::Metrics>,
) -> Ebpf {
    use std::{os::unix::fs::MetadataExt as _, sync::atomic::Ordering};
    let mut hooked = std::collections::HashSet::new();
    while !stop.load(Ordering::Relaxed) {
        let pid = match pids.recv_timeout(std::time::Duration::from_millis(100)) {
            Ok(pid) => pid,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
            // No one will ask any more (hooks off, or the pipeline ended).
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let exe = format!("/proc/{pid}/exe");
        let Ok(meta) = std::fs::metadata(&exe) else { continue };
        if !hooked.insert((meta.dev(), meta.ino())) {
            continue;
        }
        match attach_go_hooks(&mut ebpf, &exe) {
            Ok(()) => {
                metrics.go_executables_hooked.inc();
                tracing::info!(pid, exe = %std::fs::read_link(&exe).unwrap_or_default().display(), "Go hooks attached");
            }
            Err(e) => {
                metrics.go_executables_failed.inc();
                tracing::warn!(pid, error = %e, "Go hooks not attached: calls of this program get no goroutine parents");
            }
        }
    }
    ebpf
}

fn attach_go_hooks(ebpf: &mut Ebpf, exe: &str) -> Result<(), LoaderError> {
    for &(name, symbol) in GO_HOOKS {
        uprobe(ebpf, name)?
            .attach(symbol, exe, UProbeScope::AllProcesses)
            .map_err(|source| LoaderError::Program { name, source })?;
    }
    Ok(())
}

/// Kernel-side counters summed over CPUs.
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelCounters {
    pub ringbuf_full: u64,
    pub pending_full: u64,
    pub payload_read_failed: u64,
    pub events_submitted: u64,
    pub late_stashes: u64,
    pub unselected: u64,
}

pub fn read_counters(map: &PerCpuArray<MapData, u64>) -> KernelCounters {
    let sum = |slot: u32| map.get(&slot, 0).map(|v| v.iter().sum::<u64>()).unwrap_or(0);
    KernelCounters {
        ringbuf_full: sum(counter::RINGBUF_FULL),
        pending_full: sum(counter::PENDING_FULL),
        payload_read_failed: sum(counter::PAYLOAD_READ_FAILED),
        events_submitted: sum(counter::EVENTS_SUBMITTED),
        late_stashes: sum(counter::LATE_STASH),
        unselected: sum(counter::UNSELECTED),
    }
}

#[cfg(test)]
mod tests {
    use agent_common::hooks::{Field, Tracepoint};

    use super::{LoaderError, check_fields, format_field};

    const FORMAT: &str = "name: inet_sock_set_state
ID: 1370
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;
";

    #[test]
    fn fields_found_by_name_in_a_format_file() {
        assert_eq!(format_field(FORMAT, "skaddr"), Some((8, 8)));
        assert_eq!(format_field(FORMAT, "oldstate"), Some((16, 4)));
        assert_eq!(format_field(FORMAT, "saddr_v6"), Some((40, 16)));
        assert_eq!(format_field(FORMAT, "state"), None);
    }

    #[test]
    fn a_field_elsewhere_is_one_clear_error() {
        const MOVED: Tracepoint = Tracepoint {
            category: "sock",
            name: "inet_sock_set_state",
            fields: &[Field::new("skaddr", 8, 8), Field::new("oldstate", 20, 4)],
        };
        let err = check_fields(&MOVED, FORMAT).unwrap_err();
        assert!(matches!(err, LoaderError::FieldMismatch { field: "oldstate", .. }));
        let text = err.to_string();
        assert!(text.contains("field `oldstate` is at offset 16, size 4"), "{text}");
        assert!(text.contains("where sockspan reads offset 20, size 4"), "{text}");
        const GONE: Tracepoint = Tracepoint {
            fields: &[Field::new("newstate", 20, 4)],
            ..MOVED
        };
        assert!(
            check_fields(&GONE, FORMAT)
                .unwrap_err()
                .to_string()
                .contains("`newstate` is missing")
        );
    }

    /// The table agrees with this machine's kernel (where tracefs can be read).
    #[test]
    fn the_table_of_hooks_matches_this_kernel() {
        for tp in super::PROGRAMS {
            match super::check_tracepoint(tp) {
                Ok(()) | Err(LoaderError::MissingTracepoint { .. }) => {}
                Err(e) => panic!("{e}"),
            }
        }
    }
}
