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
    /// Plain-HTTP `/health` (etcd's `--listen-metrics-urls`), also when clients use TLS.
    metrics_port: u16,
    tls: Option<TlsPki>,
}

/// Certificates made with `openssl` for one test: a CA, the server's (SAN 127.0.0.1,
/// localhost) and a client certificate.
#[derive(Clone)]
pub struct TlsPki {
    pub dir: PathBuf,
}

impl TlsPki {
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.crt"))
    }
    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.key"))
    }

    fn make(dir: PathBuf) -> Result<TlsPki> {
        let run = |args: &[&str]| -> Result<()> {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .context("running openssl")?;
            if !out.status.success() {
                bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(())
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "1",
            "-subj",
            "/CN=membrane-test-ca",
        ])?;
        for (name, ext) in [
            (
                "server",
                "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
            ),
            ("client", "extendedKeyUsage=clientAuth\n"),
        ] {
            std::fs::write(dir.join(format!("{name}.ext")), ext)?;
            run(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={name}"),
            ])?;
            run(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.crt"),
                "-days",
                "1",
                "-extfile",
                &format!("{name}.ext"),
            ])?;
        }
        Ok(TlsPki { dir })
    }
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

impl Etcd {
    pub fn start() -> Result<Etcd> {
        Etcd::start_with(false)
    }

    /// With TLS on the client port and client certificates required.
    pub fn start_tls() -> Result<Etcd> {
        Etcd::start_with(true)
    }

    fn start_with(tls: bool) -> Result<Etcd> {
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
                metrics_port: free_port()?,
                tls: None,
            };
            if tls {
                let pki = e.dir.path().join("pki");
                std::fs::create_dir(&pki)?;
                e.tls = Some(TlsPki::make(pki)?);
            }
            match e.spawn_and_wait() {
                Ok(()) => return Ok(e),
                Err(err) => last = Some(err),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("etcd did not start")))
    }

    fn spawn_and_wait(&mut self) -> Result<()> {
        let client = self.endpoint();
        let metrics = format!("http://127.0.0.1:{}", self.metrics_port);
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
            .args(["--listen-metrics-urls", &metrics])
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(pki) = &self.tls {
            cmd.arg("--cert-file")
                .arg(pki.cert("server"))
                .arg("--key-file")
                .arg(pki.key("server"))
                .arg("--trusted-ca-file")
                .arg(pki.ca())
                .arg("--client-cert-auth");
        }
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
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.metrics_port)) else {
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
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    pub fn pki(&self) -> Option<&TlsPki> {
        self.tls.as_ref()
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
        config_for(self.endpoint(), node, ttl)
    }

    pub async fn connect(&self, node: &str, ttl: i64) -> Result<Store> {
        Ok(Store::connect(self.config(node, ttl)).await?)
    }
}

/// A test config for `node` at `endpoint`: short lease (`ttl` s), fast probes.
pub fn config_for(endpoint: String, node: &str, ttl: i64) -> StoreConfig {
    let mut c = StoreConfig::new(vec![endpoint], node);
    c.lease_ttl_secs = ttl;
    c.lock_ttl_secs = 2;
    c.dial_timeout_ms = 2_000;
    c.request_timeout_ms = 2_000;
    c.status_interval_ms = 200;
    c.sync_interval_ms = 60_000;
    c
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

/// A TCP proxy in front of etcd whose connections can be cut (and new ones refused) while
/// etcd keeps running: a network partition between one node and the store.
pub struct CutProxy {
    port: u16,
    cut: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl CutProxy {
    pub async fn start(target_port: u16) -> Result<CutProxy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let cut = tokio::sync::watch::Sender::new(false);
        let cut_rx = cut.subscribe();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                if *cut_rx.borrow() {
                    continue; // dropped: connection closed at once
                }
                let mut rx = cut_rx.clone();
                tokio::spawn(async move {
                    let Ok(mut server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = rx.wait_for(|c| *c) => {}
                    }
                });
            }
        });
        Ok(CutProxy { port, cut, task })
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Closes every connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
