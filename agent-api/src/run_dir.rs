//! The run directory: `/run/membrane/<name>/`, where a run's agent, proxy and lab keep what
//! is not a BPF object (sockets, snapshots, registries, logs, pid files). Every file's name is
//! here and nowhere else.

use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Parent of every run's directory.
pub const STATE_ROOT: &str = "/run/membrane";

/// The directory of one run (`membrane-agent --name NAME`, `membrane lab up` with
/// `MEMBRANE_LAB_NAME`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// `/run/membrane/<name>`.
    pub fn new(name: &str) -> Self {
        Self {
            path: Path::new(STATE_ROOT).join(name),
        }
    }

    /// A run directory somewhere else (tests).
    pub fn at(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The run directory of the pin directory `<bpffs>/membrane/<name>` (the CLI's `bpf`
    /// views take a pin directory).
    pub fn of_pin_dir(pin_dir: &Path) -> Self {
        let name = pin_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Self::new(&name)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The agent's local API (JSON lines).
    pub fn agent_socket(&self) -> PathBuf {
        self.path.join("agent.sock")
    }

    /// Hubble's observer API (gRPC on a Unix socket).
    pub fn hubble_socket(&self) -> PathBuf {
        self.path.join("hubble.sock")
    }

    /// The address the flow page listens on, one line.
    pub fn ui_addr(&self) -> PathBuf {
        self.path.join("ui-addr")
    }

    /// The agent ↔ proxy channel.
    pub fn proxy_channel(&self) -> PathBuf {
        self.path.join("proxy-channel.sock")
    }

    /// Unix datagram socket the proxy sends its access and DNS records to.
    pub fn proxy_records(&self) -> PathBuf {
        self.path.join("proxy-records.sock")
    }

    /// The supervised proxy's pid.
    pub fn proxy_pid(&self) -> PathBuf {
        self.path.join("proxy.pid")
    }

    /// The proxy's stdout and stderr.
    pub fn proxy_log(&self) -> PathBuf {
        self.path.join("proxy.log")
    }

    /// The HTTP/TLS policy the proxy applied last.
    pub fn proxy_policy_snapshot(&self) -> PathBuf {
        self.path.join("proxy-policy.json")
    }

    /// The DNS rules the proxy applied last.
    pub fn proxy_dns_snapshot(&self) -> PathBuf {
        self.path.join("proxy-dns.json")
    }

    /// The `WasmFilter` attachments the proxy applied last.
    pub fn proxy_filter_snapshot(&self) -> PathBuf {
        self.path.join("proxy-filters.json")
    }

    /// The endpoint registry ([`crate::registry::RegisteredEndpoint`]).
    pub fn endpoints(&self) -> PathBuf {
        self.path.join("endpoints.json")
    }

    /// The node IPAM's block and addresses handed out (restored by a restarted agent).
    pub fn ipam(&self) -> PathBuf {
        self.path.join("ipam.json")
    }

    /// Policies applied over the API, restored by a restarted agent.
    pub fn applied_policies(&self) -> PathBuf {
        self.path.join("applied-policies.json")
    }

    /// Names the DNS proxy learned and their addresses.
    pub fn fqdn_cache(&self) -> PathBuf {
        self.path.join("fqdn-cache.json")
    }

    /// Processes the lab started (one pid per line), stopped by `lab down`.
    pub fn lab_pids(&self) -> PathBuf {
        self.path.join("pids")
    }
}

/// Writes `bytes` to `path` atomically: a temporary file next to it, flushed to disk, then
/// renamed over `path` (removed again if anything fails). Blocking file I/O.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(format!(".tmp-{}", std::process::id()));
    let temporary = PathBuf::from(temporary);
    let result = (|| {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_dir_names_its_run() {
        let run = RunDir::of_pin_dir(Path::new("/sys/fs/bpf/membrane/lab-a"));
        assert_eq!(run.path(), Path::new("/run/membrane/lab-a"));
        assert_eq!(
            run.endpoints(),
            Path::new("/run/membrane/lab-a/endpoints.json")
        );
    }
}
