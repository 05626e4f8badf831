//! A real etcd per test: Debian's `etcd-server` (3.4) on 127.0.0.1, ports picked free
//! (etcd cannot bind port 0) with a retry on collision, data under a temp dir (tmpfs when
//! there is one), killed on drop — also when the test panics — and, through
//! `PR_SET_PDEATHSIG`, when the test process dies.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use membrane_cluster::{Store, StoreConfig};

/// How long etcd may take to answer `/health` after start, ms.
const READY_TIMEOUT_MS: u64 = 15_000;
/// Port collisions tolerated before giving up.
const START_ATTEMPTS: u32 = 5;

pub struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

impl Etcd {
    pub fn start() -> Result<Etcd> {
        let base = if std::fs::metadata("/dev/shm").is_ok_and(|m| m.is_dir()) {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            let mut e = Etcd {
                child: None,
                dir: tempfile::Builder::new()
                    .prefix("membrane-etcd-")
                    .tempdir_in(&base)?,
                client_port: free_port()?,
                peer_port: free_port()?,
            };
            match e.spawn_and_wait() {
                Ok(()) => return Ok(e),
                Err(err) => last = Some(err),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("etcd did not start")))
    }

    fn spawn_and_wait(&mut self) -> Result<()> {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))?;
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", "test"])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")])
            // Faster leader election at start and restart; lease TTLs ≥ 1 s stay valid.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: prctl is async-signal-safe; it only sets this child's parent-death signal.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .context("starting etcd (Debian's etcd-server)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_millis(READY_TIMEOUT_MS);
        while Instant::now() < deadline {
            if let Some(c) = &mut self.child
                && let Some(status) = c.try_wait()?
            {
                self.child = None;
                bail!("etcd exited at start ({status}); log: {}", self.log_tail());
            }
            if self.healthy() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
        bail!(
            "etcd not healthy within {READY_TIMEOUT_MS} ms; log: {}",
            self.log_tail()
        )
    }

    fn healthy(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.client_port)) else {
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

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
        let start = log.len().saturating_sub(2000);
        log.get(start..).unwrap_or_default().to_owned()
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// SIGKILL (connection refused afterwards).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the same member again (same ports, same data).
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            match self.spawn_and_wait() {
                Ok(()) => return Ok(()),
                Err(e) => {
                    last = Some(e);
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("etcd did not restart")))
    }

    /// A test config for `node`: short lease (`ttl` s), fast probes.
    pub fn config(&self, node: &str, ttl: i64) -> StoreConfig {
        let mut c = StoreConfig::new(vec![self.endpoint()], node);
        c.lease_ttl_secs = ttl;
        c.lock_ttl_secs = 2;
        c.dial_timeout_ms = 2_000;
        c.request_timeout_ms = 2_000;
        c.status_interval_ms = 200;
        c.sync_interval_ms = 60_000;
        c
    }

    pub async fn connect(&self, node: &str, ttl: i64) -> Result<Store> {
        Ok(Store::connect(self.config(node, ttl)).await?)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `f` every 20 ms until it is true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
