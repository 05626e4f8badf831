//! containerd for one test: Debian's, with its CRI plugin, root, state, sockets and runc root
//! under the test's directory, started inside the test's node namespace with `nsenter --net`
//! (not `ip netns exec`, which remounts /sys and leaves runc without its cgroup mounts).
//! Killed on drop; the shims of sandboxes still alive (a failing test) are killed by pid,
//! and the shim socket directory it made in /run/containerd is removed if it was not there.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::cri::Cri;

/// Bound on containerd answering CRI after a start.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Where the 1.6 shims always put their sockets.
const SHIM_SOCKET_DIR: &str = "/run/containerd";

pub struct Containerd {
    dir: PathBuf,
    node_netns: String,
    child: Option<Child>,
    created_shim_dir: bool,
}

impl Containerd {
    /// Writes the config and starts containerd; returns once CRI answers `Version`.
    pub fn start(
        dir: &Path,
        node_netns: &str,
        cni_bin_dir: &Path,
        cni_conf_dir: &Path,
        sandbox_image: &str,
    ) -> anyhow::Result<Containerd> {
        std::fs::create_dir_all(dir)?;
        let d = dir.display();
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  netns_mounts_under_state_dir = true
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{conf}"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{d}/runc"
"#,
            bin = cni_bin_dir.display(),
            conf = cni_conf_dir.display(),
        );
        std::fs::write(dir.join("config.toml"), config)?;
        let mut c = Containerd {
            dir: dir.to_owned(),
            node_netns: node_netns.to_owned(),
            child: None,
            created_shim_dir: !Path::new(SHIM_SOCKET_DIR).exists(),
        };
        c.restart()?;
        Ok(c)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        let start = log.len().saturating_sub(4000);
        log.get(start..).unwrap_or_default().to_owned()
    }

    /// (Re)starts the process (after [`Containerd::stop`]) and waits for CRI.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "containerd is running");
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("containerd.log"))?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.node_netns))
            .arg("containerd")
            .arg("--config")
            .arg(self.dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let answered = self.socket().exists()
                && Cri::connect(&self.socket())
                    .and_then(|mut c| c.version())
                    .is_ok();
            if answered {
                return Ok(());
            }
            if let Some(c) = &mut self.child
                && let Ok(Some(status)) = c.try_wait()
            {
                anyhow::bail!("containerd exited ({status}): {}", self.log_tail());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "containerd did not answer CRI within {START_TIMEOUT:?}: {}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM and wait (bounded; SIGKILL after 10 s). The shims and sandboxes keep running.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: plain kill(2) of our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `ctr images import` into the CRI's namespace.
    pub fn import(&self, archive: &Path) -> anyhow::Result<()> {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .args(["-n", "k8s.io", "images", "import"])
            .arg(archive)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "ctr images import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// Pids of shims serving this containerd (their command line names its socket).
    fn shim_pids(&self) -> Vec<i32> {
        let needle = self.socket().display().to_string();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| {
                        let c = String::from_utf8_lossy(&c);
                        c.contains("containerd-shim") && c.contains(&needle)
                    })
                    .unwrap_or(false)
            })
            .collect()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop();
        for pid in self.shim_pids() {
            // SAFETY: kill(2) of a shim this test's containerd started (found by its socket).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // Mounts under the state directory (pod netns, rootfs) of sandboxes a failed test left.
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
            let prefix = self.dir.display().to_string();
            let mut points: Vec<&str> = mounts
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .filter(|p| p.starts_with(&prefix))
                .collect();
            points.sort_by_key(|p| std::cmp::Reverse(p.len()));
            for p in points {
                if let Ok(c) = std::ffi::CString::new(p) {
                    // SAFETY: NUL-terminated path that outlives the call.
                    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
                }
            }
        }
        if self.created_shim_dir {
            let _ = std::fs::remove_dir_all(SHIM_SOCKET_DIR);
        }
    }
}
