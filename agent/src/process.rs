//! Per-process resource: `service.name` from the process's own `OTEL_SERVICE_NAME` (or
//! `service.name` in its `OTEL_RESOURCE_ATTRIBUTES`), else its executable name; read once per
//! process from /proc. Short-lived processes that are gone by then fall back to their `comm`.
use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::FastMap;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProcessInfo {
    pub pid: u32,
    pub service_name: String,
    pub executable_name: String,
    pub host_name: Arc<str>,
    /// The container it runs in (`container.id`), from its cgroup.
    pub container_id: Option<String>,
    /// Its pod, when Kubernetes metadata is on and the pod is known.
    pub pod: Option<Arc<crate::kube::PodMeta>>,
}

/// Cache of process resources, keyed by pid, bounded in size. A process is one resource
/// whatever its threads are named (Java names every pool thread): a thread name not seen before
/// only makes it check the process's identity, its start time (pid reuse) and executable (an
/// exec keeps the pid and the start time).
pub struct ProcessTable {
    root: PathBuf,
    host_name: Arc<str>,
    cache: FastMap<u32, Cached>,
    /// This node's pods (Kubernetes metadata on).
    pods: Option<(crate::kube::PodIndex, Arc<crate::kube::KubeCounts>)>,
}

/// How long a process in a pod not yet known is looked up again (its spans meanwhile wait in
/// the processor, then go out without the pod's metadata, counted), and how often.
const POD_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
const POD_RETRY: std::time::Duration = std::time::Duration::from_millis(500);

type CommKey = [u8; 16];
const MAX_PROCESSES: usize = 8192;
/// Thread names remembered per process (beyond it, the oldest is forgotten: a start-time read).
const MAX_THREAD_NAMES: usize = 256;

struct Cached {
    info: Arc<ProcessInfo>,
    /// Start time (clock ticks since boot) and executable of the process read; `None` without
    /// /proc.
    identity: Option<(u64, PathBuf)>,
    /// Thread names seen on this process, most recent last.
    names: Vec<CommKey>,
    /// In a pod not known when it was read: (first read, last read), while it is looked up again.
    pod_pending: Option<(std::time::Instant, std::time::Instant)>,
}

impl ProcessTable {
    pub fn new() -> Self {
        Self::with_root("/proc")
    }

    /// A table that never reads /proc: names come from the thread name alone (replays of a
    /// recording, whose pids mean nothing on this machine).
    pub fn without_proc() -> Self {
        Self::with_root("")
    }

    /// A table reading a different /proc (tests).
    pub fn with_root(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            host_name: host_name().into(),
            cache: FastMap::default(),
            pods: None,
        }
    }

    /// Resources carry this node's pods' metadata, from `index`.
    pub fn with_pods(mut self, index: crate::kube::PodIndex, counts: Arc<crate::kube::KubeCounts>) -> Self {
        self.pods = Some((index, counts));
        self
    }

    /// A cached process whose pod was not known: read again (at most every [`POD_RETRY`], for
    /// [`POD_WAIT`]); its resource, when its pod is known now.
    fn pod_pending(&mut self, pid: u32, comm: &[u8; 16]) -> Option<Arc<ProcessInfo>> {
        let (first, last) = self.cache.get(&pid)?.pod_pending?;
        let now = std::time::Instant::now();
        if now.duration_since(first) > POD_WAIT || now.duration_since(last) < POD_RETRY {
            return None;
        }
        let (info, pending) = self.read(pid, comm);
        let c = self.cache.get_mut(&pid)?;
        c.pod_pending = pending.then_some((first, now));
        if !pending {
            c.info = Arc::new(info);
            return Some(c.info.clone());
        }
        None
    }

    /// Whether resources carry pods' metadata.
    pub fn watches_pods(&self) -> bool {
        self.pods.is_some()
    }

    /// The resource cached for `pid`.
    pub fn cached(&self, pid: u32) -> Option<Arc<ProcessInfo>> {
        self.cache.get(&pid).map(|c| c.info.clone())
    }

    /// Whether `pid` runs in a pod that is not known yet (and is still looked up again).
    pub fn awaits_pod(&self, pid: u32) -> bool {
        self.cache
            .get(&pid)
            .and_then(|c| c.pod_pending)
            .is_some_and(|(first, _)| first.elapsed() <= POD_WAIT)
    }

    /// The resource of `pid` once its pod is known (looked up again at most every
    /// [`POD_RETRY`]); `None` while it is not.
    pub fn refresh_pod(&mut self, pid: u32) -> Option<Arc<ProcessInfo>> {
        let comm = self.cache.get(&pid)?.names.last().copied().unwrap_or([0; 16]);
        self.pod_pending(pid, &comm)
    }

    /// A span went out without its pod's metadata (counted).
    pub fn span_without_pod(&self) {
        if let Some((_, counts)) = &self.pods {
            counts
                .spans_without_metadata
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    pub fn get(&mut self, pid: u32, comm: &[u8; 16]) -> Arc<ProcessInfo> {
        // Only with Kubernetes metadata on can a cached process await its pod.
        if self.pods.is_some()
            && let Some(info) = self.pod_pending(pid, comm)
        {
            return info;
        }
        let identity_read = match self.cache.get_mut(&pid) {
            Some(c) if comm[0] == 0 || c.names.contains(comm) => return c.info.clone(),
            Some(c) => {
                // A thread name not seen before: the same process, or a new one with its pid?
                let identity = identity(&self.root, pid);
                if identity.is_some() && identity == c.identity {
                    if c.names.len() >= MAX_THREAD_NAMES {
                        c.names.remove(0);
                    }
                    c.names.push(*comm);
                    return c.info.clone();
                }
                identity
            }
            None => identity(&self.root, pid),
        };
        if self.cache.len() >= MAX_PROCESSES {
            self.cache.clear();
        }
        let (info, pending) = self.read(pid, comm);
        let info = Arc::new(info);
        let now = std::time::Instant::now();
        let cached = Cached {
            info: info.clone(),
            identity: identity_read,
            names: vec![*comm],
            pod_pending: pending.then_some((now, now)),
        };
        self.cache.insert(pid, cached);
        info
    }

    /// The process's resource, and whether it is in a pod not known (yet).
    fn read(&self, pid: u32, comm: &[u8; 16]) -> (ProcessInfo, bool) {
        if self.root.as_os_str().is_empty() {
            let name = comm_name(comm);
            let info = ProcessInfo {
                pid,
                service_name: name.clone(),
                executable_name: name,
                host_name: self.host_name.clone(),
                container_id: None,
                pod: None,
            };
            return (info, false);
        }
        let dir = self.root.join(pid.to_string());
        let comm_name = comm_name(comm);
        let executable_name = std::fs::read_link(dir.join("exe"))
            .ok()
            .and_then(|p| {
                p.file_name()
                    .map(|n| n.to_string_lossy().trim_end_matches(" (deleted)").to_owned())
            })
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| comm_name.clone());
        let env = std::fs::read(dir.join("environ")).unwrap_or_default();
        let cgroup = std::fs::read_to_string(dir.join("cgroup")).unwrap_or_default();
        let container_id = container_id(&cgroup);
        let pod_uid = self
            .pods
            .as_ref()
            .and_then(|_| crate::kube::pod_uid(&crate::selection::cgroup_path(&cgroup)));
        let pod = pod_uid
            .as_deref()
            .and_then(|uid| self.pods.as_ref().and_then(|(index, _)| index.get(uid)));
        // The process's own OTEL_SERVICE_NAME, its pod's name for it, its executable.
        let service_name = service_name_from_environ(&env)
            .or_else(|| pod.as_ref().and_then(|p| p.service_name()).map(str::to_owned))
            .unwrap_or_else(|| executable_name.clone());
        let pending = pod_uid.is_some() && pod.is_none();
        let info = ProcessInfo {
            pid,
            service_name,
            executable_name,
            host_name: self.host_name.clone(),
            container_id,
            pod,
        };
        (info, pending)
    }
}

/// The container of a process, from its `/proc/<pid>/cgroup`: the 64-hex-digit id that
/// container runtimes put in the cgroup path (`/docker/<id>`, `docker-<id>.scope`,
/// `cri-containerd-<id>.scope`, `crio-<id>.scope`, `libpod-<id>.scope`, a kubepods
/// `.../<id>`), the innermost one if several; cgroup v1 or v2.
pub fn container_id(cgroup: &str) -> Option<String> {
    let is_id = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    let mut found = None;
    for line in cgroup.lines() {
        let path = line.splitn(3, ':').nth(2).unwrap_or("");
        for seg in path.split('/') {
            let seg = seg.strip_suffix(".scope").unwrap_or(seg);
            let id = seg.rsplit(['-', ':']).next().unwrap_or(seg);
            if is_id(id) {
                found = Some(id.to_ascii_lowercase());
            }
        }
    }
    found
}

/// The process's start time (field 22 of `<root>/<pid>/stat`, after the parenthesised name,
/// which may hold spaces) and executable; `None` without a /proc (replays).
fn identity(root: &Path, pid: u32) -> Option<(u64, PathBuf)> {
    let start = read_start_time(root, pid)?;
    Some((
        start,
        std::fs::read_link(root.join(pid.to_string()).join("exe")).unwrap_or_default(),
    ))
}

/// The process's start time (clock ticks after boot); 0 when it is gone or there is no /proc.
pub(crate) fn start_time(root: &Path, pid: u32) -> u64 {
    read_start_time(root, pid).unwrap_or(0)
}

fn read_start_time(root: &Path, pid: u32) -> Option<u64> {
    if root.as_os_str().is_empty() {
        return None;
    }
    let stat = std::fs::read_to_string(root.join(pid.to_string()).join("stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// Processes remembered by [`Generations`]; beyond it they are forgotten all at once.
const MAX_GENERATIONS: usize = 8192;

/// The processes a stage keeps state for, each with its start time. A sweep every few seconds
/// names those that exited and those whose pid now belongs to another process, so that what
/// was learnt of a process (whether it runs Go, its event-loop threads) is dropped, not
/// inherited by the pid's next owner.
pub struct Generations {
    /// "" = never read /proc (replays: nothing is ever swept).
    root: PathBuf,
    started: FastMap<u32, u64>,
}

impl Generations {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            started: FastMap::default(),
        }
    }

    /// Remembers `pid`'s start time, the first time it is seen.
    pub fn saw(&mut self, pid: u32) {
        if self.root.as_os_str().is_empty() || self.started.contains_key(&pid) {
            return;
        }
        if self.started.len() >= MAX_GENERATIONS {
            self.started.clear();
        }
        self.started.insert(pid, start_time(&self.root, pid));
    }

    /// The processes seen that exited or whose pid was reused since; forgotten here too.
    pub fn sweep(&mut self) -> Vec<u32> {
        let root = &self.root;
        let mut gone = Vec::new();
        self.started.retain(|&pid, &mut start| {
            let now = start_time(root, pid);
            let same = now != 0 && now == start;
            if !same {
                gone.push(pid);
            }
            same
        });
        gone
    }
}

impl Default for ProcessTable {
    fn default() -> Self {
        Self::new()
    }
}

fn comm_name(comm: &[u8; 16]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// `OTEL_SERVICE_NAME`, else `service.name` inside `OTEL_RESOURCE_ATTRIBUTES`, from a
/// NUL-separated environment block.
pub fn service_name_from_environ(env: &[u8]) -> Option<String> {
    let mut from_attrs = None;
    for var in env.split(|&b| b == 0) {
        if let Some(v) = var.strip_prefix(b"OTEL_SERVICE_NAME=") {
            let v = String::from_utf8_lossy(v).trim().to_owned();
            if !v.is_empty() {
                return Some(v);
            }
        } else if let Some(v) = var.strip_prefix(b"OTEL_RESOURCE_ATTRIBUTES=") {
            from_attrs = String::from_utf8_lossy(v)
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| k.trim() == "service.name")
                .map(|(_, v)| v.trim().to_owned())
                .filter(|v| !v.is_empty());
        }
    }
    from_attrs
}

/// The node's name: `NODE_NAME` (a DaemonSet sets it from the downward API: in a pod, the
/// kernel's hostname is the pod's), else the kernel's hostname.
fn host_name() -> String {
    if let Some(n) = std::env::var("NODE_NAME").ok().filter(|n| !n.trim().is_empty()) {
        return n.trim().to_owned();
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids_from_cgroup_paths() {
        let id = "3f2a1b".repeat(10) + "abcd";
        let cases = [
            format!("0::/system.slice/docker-{id}.scope"),
            format!("12:pids:/docker/{id}\n0::/"),
            format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1a2b.slice/cri-containerd-{id}.scope"
            ),
            format!("0::/kubepods/besteffort/pod1234/{id}"),
            format!("0::/machine.slice/libpod-{id}.scope/container"),
            format!("0::/system.slice/crio-{id}.scope"),
        ];
        for c in &cases {
            assert_eq!(container_id(c), Some(id.clone()), "{c}");
        }
        for none in [
            "0::/",
            "0::/user.slice/user-0.slice/session-1.scope",
            "4:memory:/process_api/0f93a652bc821550aadecd1039121990",
            "",
        ] {
            assert_eq!(container_id(none), None, "{none}");
        }
    }

    #[test]
    fn service_name_precedence() {
        assert_eq!(
            service_name_from_environ(b"A=1\0OTEL_SERVICE_NAME=shop\0"),
            Some("shop".into())
        );
        assert_eq!(
            service_name_from_environ(b"OTEL_RESOURCE_ATTRIBUTES=a=b,service.name=cart\0"),
            Some("cart".into())
        );
        assert_eq!(
            service_name_from_environ(b"OTEL_RESOURCE_ATTRIBUTES=service.name=cart\0OTEL_SERVICE_NAME=shop\0"),
            Some("shop".into())
        );
        assert_eq!(service_name_from_environ(b"OTEL_SERVICE_NAME=\0PATH=/bin\0"), None);
    }

    /// A process is one resource whatever its threads are named; a new process with the same
    /// pid (another start time) is read again.
    #[test]
    fn one_resource_per_process_across_thread_names() {
        let root = std::env::temp_dir().join(format!("sockspan-proc-{}", std::process::id()));
        let dir = root.join("42");
        std::fs::create_dir_all(&dir).unwrap();
        let write = |start: u64, exe: &str, service: &str| {
            let stat = format!("42 (java pool) S 1 42 42 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 30 0 {start} 0 0");
            std::fs::write(dir.join("stat"), stat).unwrap();
            std::fs::write(dir.join("environ"), format!("OTEL_SERVICE_NAME={service}\0")).unwrap();
            let _ = std::fs::remove_file(dir.join("exe"));
            std::os::unix::fs::symlink(exe, dir.join("exe")).unwrap();
        };
        let comm = |name: &str| {
            let mut c = [0u8; 16];
            c[..name.len()].copy_from_slice(name.as_bytes());
            c
        };
        write(1000, "/usr/bin/java", "orders");
        let mut t = ProcessTable::with_root(&root);
        let a = t.get(42, &comm("pool-1-thread-1"));
        let b = t.get(42, &comm("pool-1-thread-2"));
        assert!(Arc::ptr_eq(&a, &b), "one resource for both threads");
        assert_eq!(a.service_name, "orders");
        write(2000, "/usr/bin/java", "payments");
        let c = t.get(42, &comm("main"));
        assert_eq!(c.service_name, "payments", "pid reused by a new process");
        write(2000, "/usr/bin/node", "inventory");
        let d = t.get(42, &comm("node"));
        assert_eq!(d.service_name, "inventory", "the process exec'd another program");
        let _ = std::fs::remove_dir_all(&root);
    }

    /// A sweep names the processes that exited and those whose pid was reused, once.
    #[test]
    fn a_sweep_names_processes_gone_or_reused() {
        let root = std::env::temp_dir().join(format!("sockspan-gen-{}", std::process::id()));
        let write = |pid: u32, start: u64| {
            let dir = root.join(pid.to_string());
            std::fs::create_dir_all(&dir).unwrap();
            let stat = format!("{pid} (a b) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {start} 0 0");
            std::fs::write(dir.join("stat"), stat).unwrap();
        };
        for pid in [1, 2, 3] {
            write(pid, 100);
        }
        let mut g = Generations::new(&root);
        for pid in [1, 2, 3] {
            g.saw(pid);
        }
        assert!(g.sweep().is_empty(), "all still running");
        write(2, 200);
        std::fs::remove_dir_all(root.join("3")).unwrap();
        let mut gone = g.sweep();
        gone.sort();
        assert_eq!(gone, [2, 3]);
        assert!(g.sweep().is_empty(), "forgotten once named");
        g.saw(2);
        assert!(g.sweep().is_empty(), "the pid's new process is the one remembered");
        let _ = std::fs::remove_dir_all(&root);

        let mut replay = Generations::new("");
        replay.saw(1);
        assert!(replay.sweep().is_empty(), "without /proc nothing is swept");
    }

    #[test]
    fn own_process_resolves() {
        let mut t = ProcessTable::new();
        let info = t.get(std::process::id(), b"x\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0");
        assert!(!info.executable_name.is_empty());
        assert_eq!(info.pid, std::process::id());
    }
}

/// Whether process `pid` runs a Go program: its executable has a `.go.buildinfo` or
/// `.note.go.buildid` section (every Go toolchain since 1.13 writes one). Goroutines move
/// between threads and switch without a syscall, which some stitching rules must know.
pub fn is_go_program(pid: u32) -> bool {
    go_build_info(&format!("/proc/{pid}/exe")).is_some()
}

/// Whether process `pid` runs an x86-64 Go program built by Go 1.18 or later, whose functions
/// take their arguments in registers and keep the goroutine in R14: the Go hooks read both
/// (`agent-ebpf/src/probes/golang.rs`), so older or other programs are not hooked.
pub fn is_hookable_go_program(pid: u32) -> bool {
    go_build_info(&format!("/proc/{pid}/exe")).is_some_and(|b| b.x86_64 && b.version.is_some_and(|v| v >= (1, 18)))
}

/// What an executable's Go build sections say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GoBuild {
    pub x86_64: bool,
    /// (major, minor) of the Go toolchain, when the build info holds it inline (Go 1.18+).
    pub version: Option<(u32, u32)>,
}

fn go_build_info(path: &str) -> Option<GoBuild> {
    std::fs::File::open(path)
        .ok()
        .and_then(|f| read_go_build(f).ok().flatten())
}

/// Reads an ELF64 little-endian file's section headers; `Some` if one is a Go build section.
fn read_go_build(mut f: impl std::io::Read + std::io::Seek) -> std::io::Result<Option<GoBuild>> {
    use std::io::SeekFrom;
    let mut eh = [0u8; 64];
    f.read_exact(&mut eh)?;
    if &eh[..4] != b"\x7fELF" || eh[4] != 2 || eh[5] != 1 {
        return Ok(None);
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
    const EM_X86_64: u16 = 62;
    let x86_64 = u16_at(&eh, 0x12) == EM_X86_64;
    let (shoff, shentsize, shnum, shstrndx) = (
        u64_at(&eh, 0x28),
        u16_at(&eh, 0x3a),
        u16_at(&eh, 0x3c),
        u16_at(&eh, 0x3e),
    );
    if shentsize != 64 || shnum == 0 || shnum > 4096 || shstrndx >= shnum {
        return Ok(None);
    }
    let mut table = vec![0u8; usize::from(shnum) * 64];
    f.seek(SeekFrom::Start(shoff))?;
    f.read_exact(&mut table)?;
    let names_hdr = &table[usize::from(shstrndx) * 64..][..64];
    let (names_off, names_len) = (u64_at(names_hdr, 0x18), u64_at(names_hdr, 0x20));
    if names_len > 1 << 20 {
        return Ok(None);
    }
    let mut names = vec![0u8; names_len as usize];
    f.seek(SeekFrom::Start(names_off))?;
    f.read_exact(&mut names)?;
    let name_of = |sh: &[u8]| {
        let at = u32::from_le_bytes([sh[0], sh[1], sh[2], sh[3]]) as usize;
        names.get(at..).map(|n| n.split(|&b| b == 0).next().unwrap_or(&[]))
    };
    let mut found = None;
    for sh in table.chunks_exact(64) {
        match name_of(sh) {
            Some(b".go.buildinfo") => {
                let mut info = [0u8; 64];
                f.seek(SeekFrom::Start(u64_at(sh, 0x18)))?;
                let n = f.read(&mut info)?;
                return Ok(Some(GoBuild {
                    x86_64,
                    version: build_info_version(&info[..n]),
                }));
            }
            Some(b".note.go.buildid") => found = Some(GoBuild { x86_64, version: None }),
            _ => {}
        }
    }
    Ok(found)
}

/// The toolchain version in a `.go.buildinfo` section: a 32-byte header (magic
/// `\xff Go buildinf:`, pointer size, flags), then, when flag 2 is set (Go 1.18+), the version
/// as a length-prefixed string such as `go1.21.3`.
fn build_info_version(info: &[u8]) -> Option<(u32, u32)> {
    if !info.starts_with(b"\xff Go buildinf:") || info.get(15)? & 2 == 0 {
        return None;
    }
    let len = usize::from(*info.get(32)?);
    let v = std::str::from_utf8(info.get(33..33 + len)?).ok()?;
    let mut parts = v.strip_prefix("go")?.split(['.', 'r', 'b', '-', ' ']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

#[cfg(test)]
mod go_tests {
    #[test]
    fn this_rust_binary_is_not_go_and_garbage_is_not_elf() {
        let me = std::fs::File::open("/proc/self/exe").unwrap();
        assert_eq!(super::read_go_build(me).unwrap(), None);
        assert_eq!(
            super::read_go_build(std::io::Cursor::new(vec![0u8; 100])).unwrap(),
            None
        );
        assert!(super::read_go_build(std::io::Cursor::new(vec![0u8; 10])).is_err());
    }

    #[test]
    fn build_info_versions() {
        let info = |flags: u8, v: &str| {
            let mut b = b"\xff Go buildinf:".to_vec();
            b.push(8);
            b.push(flags);
            b.resize(32, 0);
            b.push(v.len() as u8);
            b.extend_from_slice(v.as_bytes());
            b
        };
        assert_eq!(super::build_info_version(&info(2, "go1.19.8")), Some((1, 19)));
        assert_eq!(super::build_info_version(&info(3, "go1.22rc1")), Some((1, 22)));
        assert_eq!(super::build_info_version(&info(2, "go1.21")), Some((1, 21)));
        // Go 1.17 and older keep pointers to the strings, not the strings.
        assert_eq!(super::build_info_version(&info(0, "go1.16")), None);
        assert_eq!(super::build_info_version(&info(2, "devel +abc")), None);
        assert_eq!(super::build_info_version(b"\xff Go buildinf:"), None);
    }
}
