//! By-hand benchmark, ignored by default: the proxy's memory per idle keep-alive client
//! connection, for the standalone listener and for the transparent (redirect) handler.
//!
//! ```text
//! cargo test --release -p membrane-l7proxy --test transparent_idle_memory -- --ignored \
//!     --nocapture --exact standalone_idle_connection_memory
//! ... --exact transparent_idle_connection_memory
//! MEMBRANE_IDLE_CONNECTIONS=5000 cargo test ... (default 10000)
//! ```
//!
//! Run one measurement per process (`--exact`): memory one of them freed stays with the
//! allocator and would hide the other's growth.
//!
//! Each client connection sends one request, reads the whole response and then stays open
//! and idle (HTTP/1.1 keep-alive). The clients live in a child process (this test binary
//! again, running [`idle_client_process`]), so the growth of this process's resident set
//! while they are open is the proxy's alone (plus the in-process upstream's few pooled
//! connections), and each process needs only one descriptor per connection. Prints bytes per
//! connection; asserts nothing about time or size. Raises RLIMIT_NOFILE with `prlimit` when
//! needed; needs root for `SO_MARK` in transparent mode. Loopback only; every wait bounded.

mod common;

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use membrane_l7proxy::redirect::store::{
    L7Protocol, PolicySnapshot, PolicyStore, Remotes, SNAPSHOT_FORMAT, SnapshotEndpoint,
    SnapshotPeer, SnapshotPort,
};
use membrane_l7proxy::redirect::{Direction, IdentitySource, RedirectHandler, TransparentConfig};
use tokio::net::TcpListener;

const DEFAULT_CONNECTIONS: usize = 10_000;
/// Descriptors besides the connections: runtime, upstream, test harness.
const FD_HEADROOM: usize = 1024;
const REQUEST: &[u8] = b"GET /public/idle HTTP/1.1\r\nhost: svc.test\r\n\r\n";
/// Set in the child process: where its clients connect.
const CLIENT_TARGET_ENV: &str = "MEMBRANE_IDLE_CLIENT_TARGET";
const CLIENT_COUNT_ENV: &str = "MEMBRANE_IDLE_CLIENT_COUNT";
/// Upper bound on the whole client side (connect, wait, close).
const CLIENT_DEADLINE: Duration = Duration::from_secs(300);

fn connections() -> usize {
    std::env::var("MEMBRANE_IDLE_CONNECTIONS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(DEFAULT_CONNECTIONS)
}

/// This process's resident set (`VmRSS`), in bytes.
fn rss_bytes() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .context("VmRSS in /proc/self/status")?
        .trim()
        .parse()?;
    Ok(kib * 1024)
}

/// Makes sure this process may open `needed` descriptors: raises the soft RLIMIT_NOFILE
/// with util-linux `prlimit` (no libc binding needed) when it is lower.
fn ensure_nofile(needed: usize) -> Result<()> {
    let limits = std::fs::read_to_string("/proc/self/limits")?;
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .context("Max open files in /proc/self/limits")?;
    let mut numbers = line
        .split_whitespace()
        .filter_map(|word| word.parse::<usize>().ok());
    let (soft, hard) = (
        numbers.next().context("soft limit")?,
        numbers.next().unwrap_or(usize::MAX),
    );
    if soft >= needed {
        return Ok(());
    }
    let limit = needed.max(soft);
    let status = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &std::process::id().to_string(),
            &format!("--nofile={limit}:{}", hard.max(limit)),
        ])
        .status()
        .context("run prlimit (util-linux)")?;
    ensure!(
        status.success(),
        "RLIMIT_NOFILE is {soft} (hard {hard}) and prlimit could not raise it to {limit} \
         ({status}); lower MEMBRANE_IDLE_CONNECTIONS or run with CAP_SYS_RESOURCE"
    );
    Ok(())
}

/// Reads one HTTP/1.1 response with a Content-Length body.
fn read_response(stream: &mut TcpStream) -> Result<String> {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            bail!("closed mid-response: {:?}", String::from_utf8_lossy(&data));
        }
        data.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&data).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .context("content-length")?;
            if body.len() >= length {
                return Ok(text);
            }
        }
    }
}

/// Opens `count` connections to `addr`, each after one answered request, and keeps them.
fn open_idle(addr: SocketAddr, count: usize) -> Result<Vec<TcpStream>> {
    let mut streams = Vec::with_capacity(count);
    for index in 0..count {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connection {index}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(REQUEST)?;
        let response = read_response(&mut stream)?;
        ensure!(
            response.starts_with("HTTP/1.1 200"),
            "connection {index}: {response}"
        );
        streams.push(stream);
    }
    Ok(streams)
}

/// RSS growth per connection while `count` idle connections to `addr` are open.
async fn measure(label: &str, addr: SocketAddr, count: usize) -> Result<()> {
    // Warm-up: the first connections pay for lazily built runtime and allocator state.
    tokio::task::spawn_blocking(move || open_idle(addr, 200)).await??;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_bytes()?;
    let mut clients = tokio::task::spawn_blocking(move || spawn_clients(addr, count)).await??;
    // Let the proxy's tasks reach their idle state.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_bytes()?;
    let delta = after.saturating_sub(before);
    println!(
        "{label}: {count} idle keep-alive connections, RSS {:.1} MiB -> {:.1} MiB, {} bytes per connection",
        before as f64 / 1048576.0,
        after as f64 / 1048576.0,
        delta / count as u64
    );
    // Closing its stdin lets the child close its connections and exit.
    drop(clients.stdin.take());
    tokio::task::spawn_blocking(move || clients.wait()).await??;
    Ok(())
}

/// Starts the child process with `count` idle connections to `addr` and waits until they
/// are all open (it prints `READY`).
fn spawn_clients(addr: SocketAddr, count: usize) -> Result<std::process::Child> {
    use std::io::BufRead as _;
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args([
            "--ignored",
            "--exact",
            "idle_client_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CLIENT_TARGET_ENV, addr.to_string())
        .env(CLIENT_COUNT_ENV, count.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut lines = std::io::BufReader::new(stdout).lines();
    while let Some(line) = lines.next() {
        let line = line?;
        // libtest prints "test idle_client_process ... " before the test's own output.
        if line.contains("READY") {
            // Keep reading what the child's harness prints at exit (it fails on a closed
            // pipe otherwise).
            std::thread::spawn(move || lines.for_each(drop));
            return Ok(child);
        }
        if line.contains("FAILED") || line.contains("panicked") {
            let _ = child.kill();
            bail!("client process failed: {line}");
        }
    }
    let _ = child.kill();
    bail!("client process exited before its connections were open")
}

/// The client side, in the child process started by [`spawn_clients`]: does nothing unless
/// that process set the target.
#[test]
#[ignore = "helper process of the *_idle_connection_memory benchmarks"]
fn idle_client_process() -> Result<()> {
    let Ok(target) = std::env::var(CLIENT_TARGET_ENV) else {
        return Ok(());
    };
    let count: usize = std::env::var(CLIENT_COUNT_ENV)?.parse()?;
    ensure_nofile(count + FD_HEADROOM)?;
    // The parent normally closes stdin long before; this only ends an orphaned child.
    std::thread::spawn(|| {
        std::thread::sleep(CLIENT_DEADLINE);
        std::process::exit(1);
    });
    let streams = open_idle(target.parse()?, count)?;
    println!("READY {}", streams.len());
    std::io::stdout().flush()?;
    let mut rest = Vec::new();
    std::io::stdin().read_to_end(&mut rest)?;
    Ok(())
}

struct Everyone;

impl IdentitySource for Everyone {
    fn identity_of(&self, ip: IpAddr) -> u32 {
        if ip.is_loopback() { 1000 } else { 2 }
    }
}

#[tokio::test]
#[ignore = "by-hand benchmark: prints memory per idle connection"]
async fn standalone_idle_connection_memory() -> Result<()> {
    let count = connections();
    ensure_nofile(count + FD_HEADROOM)?;
    let upstream = common::start_upstream().await?;
    let mut config = common::config(upstream.addr, Some(common::sample_policy()));
    config.idle_timeout = Duration::from_secs(600);
    let proxy = common::start_proxy_with(config).await?;
    measure("standalone", proxy.addr, count).await?;
    proxy.stop().await
}

#[tokio::test]
#[ignore = "by-hand benchmark: prints memory per idle connection"]
async fn transparent_idle_connection_memory() -> Result<()> {
    let count = connections();
    ensure_nofile(count + FD_HEADROOM)?;
    let upstream = common::start_upstream().await?;
    let store = Arc::new(PolicyStore::new());
    store.install(PolicySnapshot {
        format: SNAPSHOT_FORMAT,
        revision: 1,
        endpoints: vec![SnapshotEndpoint {
            id: 1,
            ips: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
            ports: vec![SnapshotPort {
                direction: Direction::Egress,
                port: upstream.addr.port(),
                end_port: 0,
                l7: L7Protocol::Http,
                peers: vec![SnapshotPeer {
                    remotes: Remotes::Any,
                    http: Vec::new(),
                    server_names: Vec::new(),
                }],
            }],
        }],
    })?;
    let config = TransparentConfig {
        idle_timeout: Duration::from_secs(600),
        ..TransparentConfig::default()
    };
    let handler = Arc::new(RedirectHandler::new(&config, store, Arc::new(Everyone)));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let serving = handler.clone();
    let original = upstream.addr;
    let acceptor = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serving.serve_connection(Direction::Egress, stream, original));
        }
    });
    measure("transparent", addr, count).await?;
    handler.stop();
    acceptor.abort();
    Ok(())
}
