//! The lab's cluster store: one etcd member (Debian's `etcd-server`, installed by the
//! bootstrap) for a lab of two or more nodes. It listens on the host's loopback, where the
//! agents' processes are (they enter their node namespace per operation, not for good), on
//! ports picked free; its data lives in the lab's state directory, so `lab down` removes it
//! with the rest. Its pid goes into the lab's `pids` like every process the lab starts.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::lab::{LabError, Result};

/// How long etcd may take to answer `/health`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A started member.
#[derive(Debug, Clone)]
pub struct LabEtcd {
    pub pid: u32,
    /// Client URL (`http://127.0.0.1:PORT`).
    pub endpoint: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
}

fn free_port() -> Result<u16> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| LabError::Step {
            step: "pick a port for etcd".into(),
            detail: e.to_string(),
        })
}

/// Starts etcd with its data under `state/etcd` and waits until it is healthy. `record`
/// gets the pid as soon as the process runs (so a failed wait still tears it down).
pub fn start(state: &Path, record: &mut dyn FnMut(u32) -> Result<()>) -> Result<LabEtcd> {
    let fail = |detail: String| LabError::Step {
        step: "start etcd (Debian's etcd-server; `cargo xtask bootstrap` installs it)".into(),
        detail,
    };
    let data_dir = state.join("etcd");
    std::fs::create_dir_all(&data_dir).map_err(|e| fail(e.to_string()))?;
    let log = state.join("etcd.log");
    let (client, peer, metrics) = (free_port()?, free_port()?, free_port()?);
    let endpoint = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let metrics_url = format!("http://127.0.0.1:{metrics}");
    let out = std::fs::File::create(&log).map_err(|e| fail(e.to_string()))?;
    let err = out.try_clone().map_err(|e| fail(e.to_string()))?;
    let child = Command::new("etcd")
        .args(["--name", "lab"])
        .arg("--data-dir")
        .arg(data_dir.join("data"))
        .args(["--listen-client-urls", &endpoint])
        .args(["--advertise-client-urls", &endpoint])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("lab={peer_url}")])
        .args(["--listen-metrics-urls", &metrics_url])
        .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
        .args(["--log-level", "warn"])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| fail(e.to_string()))?;
    let pid = child.id();
    record(pid)?;
    // The child is not waited for here: it outlives `lab up` and `lab down` stops it.
    drop(child);
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if healthy(metrics) {
            break;
        }
        if !Path::new(&format!("/proc/{pid}")).exists() || Instant::now() > deadline {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail = &text[text.len().saturating_sub(1500)..];
            return Err(fail(format!("not healthy: {tail}")));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(LabEtcd {
        pid,
        endpoint,
        data_dir,
        log,
    })
}

fn healthy(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.contains("\"health\":\"true\"")
}
