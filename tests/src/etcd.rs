//! A real etcd for one test (Debian's `etcd-server`), as `cluster/tests/common` starts it:
//! on 127.0.0.1, ports picked free (etcd cannot bind port 0) with a retry on collision,
//! data in a directory of its own under `/dev/shm` (tmpfs) or the temp dir, killed on drop
//! — also when the test panics — and, through `PR_SET_PDEATHSIG`, when the test process
//! dies. The data directory goes on drop too.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::unique_name;

/// How long etcd may take to answer `/health` after a start.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Port collisions tolerated before giving up.
const START_ATTEMPTS: u32 = 5;

/// One etcd member.
pub struct Etcd {
    child: Option<Child>,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    /// Plain-HTTP `/health` (etcd's `--listen-metrics-urls`).
    metrics_port: u16,
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Etcd {
    /// Starts a fresh member; panics (the test fails) if it cannot.
    pub fn start() -> Etcd {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            let dir = base.join(unique_name("etcd"));
            std::fs::create_dir_all(&dir)
                .unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
            let mut etcd = Etcd {
                child: None,
                dir,
                client_port: free_port().expect("free port"),
                peer_port: free_port().expect("free port"),
                metrics_port: free_port().expect("free port"),
            };
            match etcd.spawn_and_wait() {
                Ok(()) => return etcd,
                Err(e) => last = e,
            }
        }
        panic!("etcd (Debian's etcd-server) did not start: {last}")
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let client = self.endpoint();
        let metrics = format!("http://127.0.0.1:{}", self.metrics_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))
            .map_err(|e| e.to_string())?;
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", "test"])
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")])
            // Fast leader election at start and restart; lease TTLs ≥ 1 s stay valid.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--listen-metrics-urls", &metrics])
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        // SAFETY: prctl is async-signal-safe; it only sets this child's parent-death signal.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        self.child = Some(cmd.spawn().map_err(|e| format!("spawn etcd: {e}"))?);
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(c) = &mut self.child
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                return Err(format!(
                    "etcd exited at start ({status}): {}",
                    self.log_tail()
                ));
            }
            if self.healthy() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
        Err(format!("not healthy in time: {}", self.log_tail()))
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

    /// The end of etcd's log (for failure messages).
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default();
        let start = log.len().saturating_sub(2000);
        log.get(start..).unwrap_or_default().to_owned()
    }

    /// The client URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// SIGKILL (connections refused afterwards).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the same member again (same ports, same data).
    pub fn restart(&mut self) {
        self.kill();
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            match self.spawn_and_wait() {
                Ok(()) => return,
                Err(e) => {
                    last = e;
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        panic!("etcd did not restart: {last}")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
