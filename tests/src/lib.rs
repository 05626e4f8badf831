//! membrane's test harness, shared by the kernel tests of every crate and the end-to-end
//! suites in `tests/tests/`.
//!
//! Owns: unique names per test ([`unique_name`]), RAII guards that clean up also when a test
//! panics (network namespaces, private bpffs mounts, a whole [`TestNode`]), a sweep of what a
//! killed test run left behind ([`sweep_stale`]), and bounded real-socket clients and servers
//! that run inside a namespace ([`net`]), a real etcd per test ([`etcd::Etcd`]).
//!
//! Privileged tests call [`require_root`] first: they fail loudly when they cannot run, they
//! never skip. Nothing here touches the root network namespace: all traffic goes between
//! namespaces the test created.
//!
//! Depends on `membrane-datapath`, and on the proxy for [`proxy::RunningProxy`] (and the
//! `membrane-perf` benchmarks); it must not depend on the agent, whose tests build on this
//! crate.

pub mod etcd;
pub mod net;
mod node;
pub mod packet;
pub mod proxy;

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use membrane_datapath::{Netns, bpffs::PinDir};
pub use node::{TestNode, TestPod};

/// Prefix of every namespace and mount the harness creates.
pub const PREFIX: &str = "mbt";

/// Directory holding the private bpffs mount points of test runs.
pub const BPFFS_TEST_ROOT: &str = "/run/membrane-tests";

static SEQ: AtomicU32 = AtomicU32::new(0);

/// `mbt-<pid>-<seq>-<what>`: unique within and across concurrently running test processes.
pub fn unique_name(what: &str) -> String {
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    format!("{PREFIX}-{}-{seq}-{what}", std::process::id())
}

/// Fails the calling test unless it runs as root (privileged tests never skip silently).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (netns, bpffs, BPF_PROG_TEST_RUN); run the suite with `cargo xtask test` as root"
    );
}

/// A network namespace deleted on drop.
#[derive(Debug)]
pub struct NsGuard(Option<Netns>);

impl NsGuard {
    pub fn create(what: &str) -> Self {
        let name = unique_name(what);
        let ns = Netns::create(&name).unwrap_or_else(|e| panic!("create netns {name}: {e}"));
        Self(Some(ns))
    }

    pub fn adopt(ns: Netns) -> Self {
        Self(Some(ns))
    }

    pub fn netns(&self) -> &Netns {
        self.0.as_ref().expect("namespace present until drop")
    }
}

impl Drop for NsGuard {
    fn drop(&mut self) {
        if let Some(ns) = self.0.take() {
            let name = ns.name().to_owned();
            if let Err(e) = ns.delete() {
                eprintln!("warning: could not delete netns {name}: {e}");
            }
        }
    }
}

/// A private bpffs instance for one test's pinned maps, unmounted and removed on drop.
#[derive(Debug)]
pub struct PinGuard(Option<PinDir>);

impl PinGuard {
    pub fn new() -> Self {
        let root = PathBuf::from(BPFFS_TEST_ROOT);
        std::fs::create_dir_all(&root).unwrap_or_else(|e| panic!("create {}: {e}", root.display()));
        let dir = root.join(unique_name("bpffs"));
        let pins = PinDir::private(&dir)
            .unwrap_or_else(|e| panic!("private bpffs at {}: {e}", dir.display()));
        Self(Some(pins))
    }

    pub fn path(&self) -> &std::path::Path {
        self.0.as_ref().expect("pins present until drop").path()
    }
}

impl Default for PinGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        if let Some(pins) = self.0.take() {
            let path = pins.path().to_owned();
            if let Err(e) = pins.remove() {
                eprintln!("warning: could not remove pins at {}: {e}", path.display());
            }
        }
    }
}

/// A cgroup v2 directory of the test's own: a child of the cgroup2 mount (found in
/// `/proc/mounts`, never assumed; never the root itself), removed on drop. Only processes
/// the test starts for the purpose join it (`membrane-sock-probe` moves itself in).
#[derive(Debug)]
pub struct CgroupGuard(PathBuf);

impl CgroupGuard {
    pub fn new(what: &str) -> Self {
        let root = membrane_datapath::cgroup2_mount().unwrap_or_else(|e| panic!("cgroup2: {e}"));
        let dir = root.join(unique_name(what));
        std::fs::create_dir(&dir)
            .unwrap_or_else(|e| panic!("create cgroup {}: {e}", dir.display()));
        Self(dir)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        // The cgroup empties once its processes are reaped; give a late exit a moment.
        for _ in 0..100 {
            match std::fs::remove_dir(&self.0) {
                Ok(()) => return,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => {
                    eprintln!("warning: could not remove cgroup {}: {e}", self.0.display());
                    return;
                }
            }
        }
        eprintln!("warning: cgroup {} still busy", self.0.display());
    }
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?.strip_prefix('-')?;
    rest.split('-').next()?.parse().ok()
}

/// Removes namespaces and bpffs mounts left by test processes that no longer exist (a test
/// run killed by a timeout cannot run its destructors). Returns what it removed.
pub fn sweep_stale() -> Vec<String> {
    let mut removed = Vec::new();
    for name in Netns::list() {
        if let Some(pid) = owner_pid(&name)
            && !pid_alive(pid)
            && let Ok(ns) = Netns::open(&name)
            && ns.delete().is_ok()
        {
            removed.push(format!("netns {name}"));
        }
    }
    if let Ok(entries) = std::fs::read_dir(BPFFS_TEST_ROOT) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = owner_pid(&name)
                && !pid_alive(pid)
            {
                let path = entry.path();
                if let Ok(c) = std::ffi::CString::new(path.to_string_lossy().as_bytes()) {
                    // SAFETY: NUL-terminated path that outlives the call.
                    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
                }
                if std::fs::remove_dir(&path).is_ok() {
                    removed.push(format!("bpffs {}", path.display()));
                }
            }
        }
    }
    // cgroups of killed tests (empty once their probes died).
    if let Ok(root) = membrane_datapath::cgroup2_mount()
        && let Ok(entries) = std::fs::read_dir(&root)
    {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = owner_pid(&name)
                && !pid_alive(pid)
                && std::fs::remove_dir(entry.path()).is_ok()
            {
                removed.push(format!("cgroup {}", entry.path().display()));
            }
        }
    }
    // Labs that tests brought up under `mbt-<pid>-...` names: pins and state.
    for dir in ["/sys/fs/bpf/membrane", "/run/membrane"] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(pid) = owner_pid(&name)
                    && !pid_alive(pid)
                    && std::fs::remove_dir_all(entry.path()).is_ok()
                {
                    removed.push(format!("lab state {}", entry.path().display()));
                }
            }
        }
    }
    removed
}

/// What the harness would leave behind if cleanup failed: namespaces and bpffs mount points
/// with the harness prefix (of any process). `cargo xtask test` fails when this is non-empty
/// after the suite.
pub fn leftovers() -> Vec<String> {
    let mut out: Vec<String> = Netns::list()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{PREFIX}-")))
        .map(|n| format!("netns {n}"))
        .collect();
    if let Ok(entries) = std::fs::read_dir(BPFFS_TEST_ROOT) {
        out.extend(
            entries
                .flatten()
                .map(|e| format!("bpffs {}", e.path().display())),
        );
    }
    if let Ok(root) = membrane_datapath::cgroup2_mount()
        && let Ok(entries) = std::fs::read_dir(&root)
    {
        out.extend(
            entries
                .flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(&format!("{PREFIX}-"))
                })
                .map(|e| format!("cgroup {}", e.path().display())),
        );
    }
    out
}
