//! `membrane-perf proxy`: end-to-end requests/s through the standalone proxy (`membrane
//! proxy`, the real binary) without a filter and with a proxy-wasm filter doing 20 header
//! sets + 20 gets + 20 removes per request (`tests/perf/guests/header-ops`, upstream SDK).
//!
//! Both proxies front the same upstream (a small keep-alive HTTP/1.1 server in this process)
//! on 127.0.0.1; `CONNECTIONS` client threads send GETs on kept-alive connections. The two
//! setups are measured in rotation (`ROUNDS` × `ROUND`, median) so machine noise hits them
//! alike, and the ratio with/without is printed (DESIGN §8 target ≥ 0.9×). No root needed.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Client connections (override with `MEMBRANE_PERF_CONNECTIONS`).
const CONNECTIONS: usize = 4;

fn connections() -> usize {
    std::env::var("MEMBRANE_PERF_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(CONNECTIONS)
}
const ROUNDS: usize = 5;
const ROUND: Duration = Duration::from_secs(2);
const TARGET: &str = "wasm32-wasip1";

pub fn run() {
    let exe = std::env::current_exe().expect("current exe");
    let membrane = crate::membrane_binary();
    let module = build_guest(&exe);
    let upstream = start_upstream();
    let mut plain = Proxy::start(&membrane, upstream, None);
    let mut filtered = Proxy::start(&membrane, upstream, Some(&module));
    // Warm both (connection pools, instance pools, code pages).
    load(plain.addr, Duration::from_millis(500));
    load(filtered.addr, Duration::from_millis(500));
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        a.push(load(plain.addr, ROUND));
        b.push(load(filtered.addr, ROUND));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|x, y| x.total_cmp(y));
        v[v.len() / 2]
    };
    let (a, b) = (median(&mut a), median(&mut b));
    println!(
        "standalone proxy, HTTP/1.1 keep-alive, {} connections, median of {ROUNDS} x {ROUND:?}",
        connections()
    );
    println!("no filter                         {a:>9.0} req/s");
    println!("filter: 20 set + 20 get + 20 remove {b:>9.0} req/s");
    println!("with / without: {:.3}x (target >= 0.9)", b / a);
    plain.stop();
    filtered.stop();
}

/// Builds the benchmark filter for wasm32-wasip1 next to this binary's target directory.
fn build_guest(exe: &Path) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("perf/guests/header-ops");
    // <target>/<profile>/membrane-perf → <target>/tmp/wasm-guests
    let target_dir = exe
        .parent()
        .and_then(Path::parent)
        .map_or_else(std::env::temp_dir, Path::to_path_buf)
        .join("tmp/wasm-guests");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&dir)
        .args([
            "build",
            "--release",
            "--quiet",
            "--target",
            TARGET,
            "--target-dir",
        ])
        .arg(&target_dir)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .expect("run cargo for the benchmark filter");
    assert!(
        status.success(),
        "building {} for {TARGET} failed (`rustup target add {TARGET}`?)",
        dir.display()
    );
    target_dir.join(TARGET).join("release/perf_header_ops.wasm")
}

/// A keep-alive HTTP/1.1 upstream answering every request `200 ok`, thread per connection.
fn start_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let addr = listener.local_addr().expect("upstream addr");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let _ = conn.set_nodelay(true);
            std::thread::spawn(move || serve(conn));
        }
    });
    addr
}

fn serve(conn: TcpStream) {
    let mut writer = conn.try_clone().expect("clone");
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    loop {
        // Request head only (the benchmark sends GETs without bodies).
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) if line == "\r\n" => break,
                Ok(_) => {}
            }
        }
        if writer
            .write_all(
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok",
            )
            .is_err()
        {
            return;
        }
    }
}

struct Proxy {
    child: Child,
    addr: SocketAddr,
}

impl Proxy {
    fn start(membrane: &Path, upstream: SocketAddr, filter: Option<&Path>) -> Self {
        // A free port: bind, read, release (the proxy binds it right after).
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        let mut cmd = Command::new(membrane);
        cmd.args(["proxy", "--listen", &addr.to_string()])
            .args(["--upstream", &upstream.to_string()])
            // Access records go to stdout: both setups pay for them alike; discard them.
            .stdout(Stdio::null())
            .env("MEMBRANE_LOG", "warn");
        if let Some(module) = filter {
            cmd.arg("--filter").arg(module);
        }
        let child = cmd.spawn().expect("start membrane proxy");
        let proxy = Self { child, addr };
        // Bounded wait until it accepts.
        for _ in 0..500 {
            if TcpStream::connect(addr).is_ok() {
                return proxy;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("membrane proxy on {addr} did not start");
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Requests/s over `duration` with `connections()` keep-alive clients.
fn load(addr: SocketAddr, duration: Duration) -> f64 {
    let done = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let threads: Vec<_> = (0..connections())
        .map(|_| {
            let (done, count) = (done.clone(), count.clone());
            std::thread::spawn(move || client(addr, &done, &count))
        })
        .collect();
    std::thread::sleep(duration);
    done.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("client thread");
    }
    count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

fn client(addr: SocketAddr, done: &AtomicBool, count: &AtomicU64) {
    let conn = TcpStream::connect(addr).expect("connect to the proxy");
    conn.set_nodelay(true).expect("nodelay");
    let mut writer = conn.try_clone().expect("clone");
    let mut reader = BufReader::new(conn);
    let request = b"GET /bench HTTP/1.1\r\nhost: bench.test\r\nuser-agent: membrane-perf\r\naccept: */*\r\n\r\n";
    let mut line = String::new();
    while !done.load(Ordering::Relaxed) {
        writer.write_all(request).expect("send");
        let mut length = 0usize;
        let mut status_ok = false;
        loop {
            line.clear();
            reader.read_line(&mut line).expect("read response head");
            if line.starts_with("HTTP/1.1 ") {
                status_ok = line.starts_with("HTTP/1.1 200");
            } else if line == "\r\n" {
                break;
            } else if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().expect("content-length");
            } else if line.is_empty() {
                panic!("the proxy closed the connection");
            }
        }
        assert!(status_ok, "the proxy answered something else than 200");
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body).expect("read body");
        count.fetch_add(1, Ordering::Relaxed);
    }
}
