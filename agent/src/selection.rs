//! Which processes and connections are traced at all (`--trace-*`, `--ignore-*`): unlike the
//! views' filters, what is not selected is never captured. Ports are decided in the kernel, per
//! socket, before any payload is copied; so are cgroups, whose ids a walk of the cgroup tree
//! marks ([`CgroupScanner`]). Processes (by executable, pid, or a cgroup not marked yet) are
//! decided here from `/proc`, on their first event, and the decision is written to the
//! kernel's process map, so their later sends and receives are not copied either.
use std::collections::HashMap;

use agent_common::maps::port_select;

use crate::views::filter::glob_matches;

/// A port or an inclusive range (`8080`, `8000-8999`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange(pub u16, pub u16);

impl PortRange {
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("bad port `{s}`: expected a port (8080) or a range (8000-8999)");
        let port = |p: &str| p.trim().parse::<u16>().ok().filter(|p| *p != 0);
        match s.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (port(a).ok_or_else(bad)?, port(b).ok_or_else(bad)?);
                if a > b {
                    return Err(bad());
                }
                Ok(Self(a, b))
            }
            None => port(s).map(|p| Self(p, p)).ok_or_else(bad),
        }
    }

    fn ports(self) -> impl Iterator<Item = u16> {
        self.0..=self.1
    }
}

/// What is traced at all (unlike the views' filters, what is left out is never captured): a
/// process is traced when it matches every kind of `--trace-*` rule given and no `--ignore-*`
/// rule; a connection when a `--trace-port` (if any) and no `--ignore-port` is at either end.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct Selection {
    /// Trace only connections with one of these ports at either end (`80,8000-8999`;
    /// repeatable). Decided in the kernel before anything is copied.
    #[arg(long = "trace-port", env = "SOCKSPAN_TRACE_PORT", value_name = "PORTS", value_delimiter = ',',
          value_parser = PortRange::parse)]
    pub trace_ports: Vec<PortRange>,
    /// Never trace connections with one of these ports at either end (`22,9000-9100`).
    #[arg(long = "ignore-port", env = "SOCKSPAN_IGNORE_PORT", value_name = "PORTS", value_delimiter = ',',
          value_parser = PortRange::parse)]
    pub ignore_ports: Vec<PortRange>,
    /// Trace only processes whose executable matches a glob: its file name (`python3*`), or its
    /// whole path when the glob has a `/` (`/opt/shop/*`).
    #[arg(
        long = "trace-exe",
        env = "SOCKSPAN_TRACE_EXE",
        value_name = "GLOB",
        value_delimiter = ','
    )]
    pub trace_exes: Vec<String>,
    /// Never trace processes whose executable matches a glob (as `--trace-exe`).
    #[arg(
        long = "ignore-exe",
        env = "SOCKSPAN_IGNORE_EXE",
        value_name = "GLOB",
        value_delimiter = ','
    )]
    pub ignore_exes: Vec<String>,
    /// Trace only these processes.
    #[arg(
        long = "trace-pid",
        env = "SOCKSPAN_TRACE_PID",
        value_name = "PID",
        value_delimiter = ','
    )]
    pub trace_pids: Vec<u32>,
    /// Never trace these processes.
    #[arg(
        long = "ignore-pid",
        env = "SOCKSPAN_IGNORE_PID",
        value_name = "PID",
        value_delimiter = ','
    )]
    pub ignore_pids: Vec<u32>,
    /// Trace only processes in a matching cgroup: a glob over the cgroup path
    /// (`/system.slice/nginx.service`, `*kubepods*`) or a container id (or its prefix).
    #[arg(
        long = "trace-cgroup",
        env = "SOCKSPAN_TRACE_CGROUP",
        value_name = "GLOB",
        value_delimiter = ','
    )]
    pub trace_cgroups: Vec<String>,
    /// Never trace processes in a matching cgroup (as `--trace-cgroup`).
    #[arg(
        long = "ignore-cgroup",
        env = "SOCKSPAN_IGNORE_CGROUP",
        value_name = "GLOB",
        value_delimiter = ','
    )]
    pub ignore_cgroups: Vec<String>,
}

/// What a process is selected by.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessFacts {
    pub pid: u32,
    /// `/proc/<pid>/exe`'s target (empty when unreadable).
    pub exe: String,
    /// The unified (v2) cgroup path, or else the first one listed.
    pub cgroup: String,
}

impl ProcessFacts {
    /// Reads them from `/proc` (what cannot be read stays empty).
    pub fn read(pid: u32) -> Self {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        Self {
            pid,
            exe,
            cgroup: cgroup_path(&cgroups),
        }
    }
}

/// The path of `/proc/<pid>/cgroup`'s unified line (`0::/path`), else of its first line.
pub fn cgroup_path(contents: &str) -> String {
    let unified = contents.lines().find_map(|l| l.strip_prefix("0::"));
    let first = contents.lines().find_map(|l| l.splitn(3, ':').nth(2));
    unified.or(first).unwrap_or("").to_owned()
}

impl Selection {
    /// The kernel's `PORT_MODE` bits (0: no port rule, nothing looked up).
    pub fn port_mode(&self) -> u32 {
        let mut mode = 0;
        if !self.trace_ports.is_empty() {
            mode |= port_select::MODE_ONLY_LISTED;
        }
        if !self.ignore_ports.is_empty() {
            mode |= port_select::MODE_IGNORE;
        }
        mode
    }

    /// The kernel's `PORT_SELECT` entries: (port, flags), each port once.
    pub fn port_entries(&self) -> Vec<(u16, u8)> {
        let mut flags: HashMap<u16, u8> = HashMap::new();
        for (ranges, flag) in [
            (&self.trace_ports, port_select::TRACE),
            (&self.ignore_ports, port_select::IGNORE),
        ] {
            for p in ranges.iter().flat_map(|r| r.ports()) {
                *flags.entry(p).or_default() |= flag;
            }
        }
        let mut v: Vec<(u16, u8)> = flags.into_iter().collect();
        v.sort_unstable();
        v
    }

    /// Whether any rule is about processes (else every process is selected, nothing is read).
    pub fn has_process_rules(&self) -> bool {
        !(self.trace_exes.is_empty()
            && self.ignore_exes.is_empty()
            && self.trace_pids.is_empty()
            && self.ignore_pids.is_empty()
            && self.trace_cgroups.is_empty()
            && self.ignore_cgroups.is_empty())
    }

    /// Whether a process is traced: it matches every kind of `--trace-*` rule given and no
    /// `--ignore-*` rule.
    pub fn selects(&self, p: &ProcessFacts) -> bool {
        let exe_matches = |pattern: &String| {
            let name = p.exe.rsplit('/').next().unwrap_or("");
            if pattern.contains('/') {
                glob_matches(pattern, &p.exe)
            } else {
                glob_matches(pattern, name)
            }
        };
        let wanted = (self.trace_exes.is_empty() || self.trace_exes.iter().any(exe_matches))
            && (self.trace_pids.is_empty() || self.trace_pids.contains(&p.pid));
        let ignored = self.ignore_exes.iter().any(exe_matches) || self.ignore_pids.contains(&p.pid);
        wanted && !ignored && self.cgroup_selected(&p.cgroup)
    }

    pub fn has_cgroup_rules(&self) -> bool {
        !(self.trace_cgroups.is_empty() && self.ignore_cgroups.is_empty())
    }

    /// Whether the processes of cgroup `path` pass the cgroup rules (a glob over the path, or a
    /// container id in it, or its prefix).
    pub fn cgroup_selected(&self, path: &str) -> bool {
        let container = crate::process::container_id(&format!("0::{path}"));
        let matches = |pattern: &String| {
            glob_matches(pattern, path)
                || container
                    .as_deref()
                    .is_some_and(|id| glob_matches(pattern, id) || id.starts_with(pattern.as_str()))
        };
        (self.trace_cgroups.is_empty() || self.trace_cgroups.iter().any(matches))
            && !self.ignore_cgroups.iter().any(matches)
    }
}

/// Where cgroups found not selected are marked: the kernel's `CGROUP_SELECT` in the live agent.
pub trait CgroupGate: Send {
    /// Mark cgroup `id` not selected; false when there is no room.
    fn mark(&mut self, id: u64) -> bool;
    fn unmark(&mut self, id: u64);
}

/// The unified (v2) cgroup hierarchy's mount, where cgroup ids are its directories' inodes.
pub fn unified_root() -> Option<std::path::PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.join("cgroup.controllers").exists())
}

/// Directories walked below the root at most (a cgroup tree is a few levels deep).
const CGROUP_DEPTH: usize = 16;

/// Walks the cgroup tree and keeps the kernel's marks of the cgroups not selected current
/// (new containers' cgroups marked, removed ones forgotten), so their processes' calls stop in
/// the kernel from their first one.
pub struct CgroupScanner {
    rules: Selection,
    root: std::path::PathBuf,
    marked: std::collections::HashSet<u64>,
}

impl CgroupScanner {
    pub fn new(rules: Selection, root: std::path::PathBuf) -> Self {
        Self {
            rules,
            root,
            marked: std::collections::HashSet::new(),
        }
    }

    /// One walk; returns how many cgroups are marked.
    pub fn scan(&mut self, gate: &mut dyn CgroupGate) -> usize {
        let mut unselected = std::collections::HashSet::new();
        let mut stack = vec![(self.root.clone(), 0usize)];
        while let Some((dir, depth)) = stack.pop() {
            use std::os::unix::fs::MetadataExt as _;
            let path = dir
                .strip_prefix(&self.root)
                .map_or(String::new(), |r| format!("/{}", r.display()));
            if let Ok(meta) = std::fs::metadata(&dir)
                && !self.rules.cgroup_selected(if path.is_empty() { "/" } else { &path })
            {
                unselected.insert(meta.ino());
            }
            if depth >= CGROUP_DEPTH {
                continue;
            }
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push((e.path(), depth + 1));
                }
            }
        }
        for id in self.marked.difference(&unselected).copied().collect::<Vec<_>>() {
            gate.unmark(id);
            self.marked.remove(&id);
        }
        for id in unselected {
            if !self.marked.contains(&id) && gate.mark(id) {
                self.marked.insert(id);
            }
        }
        self.marked.len()
    }
}

/// Where the decisions about processes go: the kernel's process map in the live agent.
pub trait ProcessGate: Send {
    /// Stop reporting `pid`'s sends and receives.
    fn skip(&mut self, pid: u32);
    /// Report them again (the pid now names another process).
    fn unskip(&mut self, pid: u32);
}

/// Processes decided, remembered until they are gone.
const MAX_DECIDED: usize = 65_536;

/// The per-process decisions, cached by pid with the process's start time, so a reused pid is
/// decided again.
pub struct ProcessSelector {
    rules: Selection,
    decided: HashMap<u32, (u64, bool)>,
    gate: Option<Box<dyn ProcessGate>>,
    /// Events of processes not selected that reached userspace (before the kernel knew).
    pub dropped_events: u64,
}

impl ProcessSelector {
    pub fn new(rules: Selection, gate: Option<Box<dyn ProcessGate>>) -> Self {
        Self {
            rules,
            decided: HashMap::new(),
            gate,
            dropped_events: 0,
        }
    }

    /// Whether an event of `pid` is kept (always, without process rules).
    pub fn admits(&mut self, pid: u32) -> bool {
        if !self.rules.has_process_rules() || pid == 0 {
            return true;
        }
        let selected = match self.decided.get(&pid) {
            Some(&(_, selected)) => selected,
            None => self.decide(pid),
        };
        if !selected {
            self.dropped_events += 1;
        }
        selected
    }

    fn decide(&mut self, pid: u32) -> bool {
        if self.decided.len() >= MAX_DECIDED {
            self.forget_gone();
        }
        let selected = self.rules.selects(&ProcessFacts::read(pid));
        self.decided.insert(pid, (Self::start_time(pid), selected));
        if !selected && let Some(g) = &mut self.gate {
            g.skip(pid);
        }
        selected
    }

    /// Forgets the decisions about processes that exited (or whose pid was reused), and tells
    /// the kernel to report a reused pid's events again. Called every few seconds.
    pub fn forget_gone(&mut self) {
        let gone: Vec<(u32, bool)> = self
            .decided
            .iter()
            .filter(|(pid, (start, _))| Self::start_time(**pid) != *start)
            .map(|(pid, (_, selected))| (*pid, *selected))
            .collect();
        for (pid, selected) in gone {
            self.decided.remove(&pid);
            if !selected && let Some(g) = &mut self.gate {
                g.unskip(pid);
            }
        }
    }

    /// The process's start time (clock ticks after boot; 0 when it is gone).
    fn start_time(pid: u32) -> u64 {
        crate::process::start_time(std::path::Path::new("/proc"), pid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_ranges() {
        assert_eq!(PortRange::parse("8080"), Ok(PortRange(8080, 8080)));
        assert_eq!(PortRange::parse("8000-8010"), Ok(PortRange(8000, 8010)));
        for bad in ["0", "70000", "9-8", "http", ""] {
            assert!(PortRange::parse(bad).is_err(), "{bad}");
        }
        let s = Selection {
            trace_ports: vec![PortRange(80, 81)],
            ignore_ports: vec![PortRange(81, 81), PortRange(22, 22)],
            ..Selection::default()
        };
        assert_eq!(s.port_mode(), port_select::MODE_ONLY_LISTED | port_select::MODE_IGNORE);
        assert_eq!(
            s.port_entries(),
            vec![
                (22, port_select::IGNORE),
                (80, port_select::TRACE),
                (81, port_select::TRACE | port_select::IGNORE)
            ]
        );
        assert_eq!(Selection::default().port_mode(), 0);
    }

    fn facts(pid: u32, exe: &str, cgroup: &str) -> ProcessFacts {
        ProcessFacts {
            pid,
            exe: exe.into(),
            cgroup: cgroup.into(),
        }
    }

    #[test]
    fn processes_by_executable_pid_and_cgroup() {
        let nginx = facts(10, "/usr/sbin/nginx", "/system.slice/nginx.service");
        let py = facts(
            11,
            "/usr/bin/python3.11",
            "/kubepods/besteffort/pod1/cri-containerd-4f2a9c0d8e7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b2a1f.scope",
        );
        let only_python = Selection {
            trace_exes: vec!["python3*".into()],
            ..Selection::default()
        };
        assert!(only_python.selects(&py) && !only_python.selects(&nginx));
        let by_path = Selection {
            ignore_exes: vec!["/usr/sbin/*".into()],
            ..Selection::default()
        };
        assert!(by_path.selects(&py) && !by_path.selects(&nginx));
        let by_container = Selection {
            trace_cgroups: vec!["4f2a9c0d8e7b".into()],
            ..Selection::default()
        };
        assert!(
            by_container.selects(&py) && !by_container.selects(&nginx),
            "a container id prefix"
        );
        let by_unit = Selection {
            ignore_cgroups: vec!["/system.slice/*".into()],
            ..Selection::default()
        };
        assert!(by_unit.selects(&py) && !by_unit.selects(&nginx));
        let both = Selection {
            trace_exes: vec!["python3*".into(), "nginx".into()],
            ignore_pids: vec![11],
            ..Selection::default()
        };
        assert!(both.selects(&nginx) && !both.selects(&py), "an ignore rule wins");
        assert!(Selection::default().selects(&nginx));
    }

    #[derive(Default)]
    struct Marks(std::collections::HashSet<u64>);

    impl CgroupGate for Marks {
        fn mark(&mut self, id: u64) -> bool {
            self.0.insert(id)
        }
        fn unmark(&mut self, id: u64) {
            self.0.remove(&id);
        }
    }

    #[test]
    fn cgroups_not_selected_are_marked_and_forgotten_when_gone() {
        use std::os::unix::fs::MetadataExt as _;
        let root = std::env::temp_dir().join(format!("sockspan-cgroups-{}", std::process::id()));
        let ignored = root.join("system.slice/backup.service");
        std::fs::create_dir_all(&ignored).unwrap();
        std::fs::create_dir_all(root.join("kubepods/pod1")).unwrap();
        let rules = Selection {
            ignore_cgroups: vec!["/system.slice/backup*".into()],
            ..Selection::default()
        };
        let mut scanner = CgroupScanner::new(rules, root.clone());
        let mut marks = Marks::default();
        assert_eq!(scanner.scan(&mut marks), 1);
        let id = std::fs::metadata(&ignored).unwrap().ino();
        assert_eq!(marks.0, [id].into());
        std::fs::remove_dir(&ignored).unwrap();
        assert_eq!(scanner.scan(&mut marks), 0, "gone: forgotten");
        assert!(marks.0.is_empty());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn unified_cgroup_path_first() {
        assert_eq!(cgroup_path("12:cpu:/a\n0::/b/c\n"), "/b/c");
        assert_eq!(cgroup_path("12:cpu:/a\n"), "/a");
        assert_eq!(cgroup_path(""), "");
    }

    /// The gate sees what the selector decides.
    #[derive(Default, Clone)]
    struct Recorded(std::sync::Arc<std::sync::Mutex<Vec<(bool, u32)>>>);

    impl ProcessGate for Recorded {
        fn skip(&mut self, pid: u32) {
            self.0.lock().unwrap().push((true, pid));
        }
        fn unskip(&mut self, pid: u32) {
            self.0.lock().unwrap().push((false, pid));
        }
    }

    #[test]
    fn a_process_not_selected_is_skipped_in_the_kernel_until_it_is_gone() {
        let me = std::process::id();
        let rec = Recorded::default();
        let rules = Selection {
            ignore_pids: vec![me],
            ..Selection::default()
        };
        let mut sel = ProcessSelector::new(rules, Some(Box::new(rec.clone())));
        assert!(!sel.admits(me));
        assert!(!sel.admits(me), "decided once");
        assert!(sel.admits(1), "init is selected");
        assert_eq!(*rec.0.lock().unwrap(), vec![(true, me)]);
        assert_eq!(sel.dropped_events, 2);
        sel.forget_gone();
        assert_eq!(rec.0.lock().unwrap().len(), 1, "still running: still skipped");
        // A pid that is gone (a fake one) is forgotten and let through again.
        sel.decided.insert(u32::MAX - 1, (12345, false));
        sel.forget_gone();
        assert_eq!(rec.0.lock().unwrap().last(), Some(&(false, u32::MAX - 1)));
    }
}
