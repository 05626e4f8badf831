//! `membrane-perf http`: the standalone HTTP proxy with 10 L7 rules side by side with haproxy
//! and nginx configured equivalently, and with the backend alone (DESIGN §8).
//!
//! Setup (loopback only, no root needed):
//! - backend: nginx answering every request `200 ok` (`return 200`, one worker, no access
//!   log). nginx rather than a server in this process: it is fast enough not to be the
//!   bottleneck, it runs in a process of its own that can be pinned, and its cost per request
//!   is known. Two instances: one on the proxy core for the direct measurement (the server
//!   under test always has that core to itself), one on the load core behind the proxies.
//! - membrane: the real `membrane proxy` binary (same profile as this one), `--workers 1`,
//!   `--policy` with 10 HTTP rules; access records go to /dev/null (they are formatted and
//!   written, as in production; haproxy and nginx log nothing).
//! - haproxy (`nbthread 1`): the same 10 rules as `method` + `path_reg` ACL pairs,
//!   `http-request deny deny_status 403 unless` one pair matches.
//! - nginx (`worker_processes 1`): the same 10 rules as `if ($method_path ~ ...)`, `return 403`
//!   when none matched, `proxy_pass` to a keep-alive upstream block.
//!
//! The benchmark's request (`GET /api/v2/items/42`) matches only the last rule, so every
//! engine evaluates all ten. Each server under test is pinned (`taskset`) to `PROXY_CPU`;
//! this process, the load generators and the proxies' backend run on `LOAD_CPU`.
//!
//! Measurements, each target in rotation (rounds, median) so noise hits all alike:
//! 1. throughput: `wrk` (HTTP/1.1 keep-alive); requests per CPU-second of the server under
//!    test (its CPU time read from /proc/PID/stat, all its processes and threads, not assumed
//!    to be one core), and the ratios membrane/haproxy, membrane/nginx, membrane/direct;
//! 2. latency at a fixed 1k requests/s: an open-loop client in this process (keep-alive
//!    connections on threads, each request sent at its scheduled time), p50/p99 per target
//!    and the added latency of each proxy (proxy minus direct);
//! 3. idle memory: a fresh instance of each proxy, N keep-alive connections that each carried
//!    one request and then stay idle; RSS (VmRSS, all the proxy's processes) before and
//!    after, in bytes per idle connection.
//!
//! Every process started here is in a process group of its own and gets SIGTERM when this
//! process dies (PR_SET_PDEATHSIG); a guard ends the group on drop, also on panic.

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The core of the server under test, and the core of everything else.
const PROXY_CPU: usize = 0;
const LOAD_CPU: usize = 1;

/// Throughput: rounds in rotation, seconds per round, wrk connections.
const ROUNDS: usize = 5;
const ROUND: Duration = Duration::from_secs(3);
const WRK_CONNECTIONS: usize = 50;

/// Latency: requests per second, rounds of this length in rotation, connections.
const LATENCY_RATE: u32 = 1000;
const LATENCY_ROUND: Duration = Duration::from_secs(3);
const LATENCY_ROUNDS: usize = 3;
const LATENCY_CONNECTIONS: u32 = 16;

/// Idle connections per proxy (override with `MEMBRANE_PERF_IDLE_CONNECTIONS`).
const IDLE_CONNECTIONS: usize = 10_000;

/// Matches only the last of [`RULES`].
const BENCH_PATH: &str = "/api/v2/items/42";
/// Matches none (the method of the last rule, a path it does not match).
const DENIED_PATH: &str = "/api/v2/items/x42";

/// (method, path regex), Cilium's `rules.http` semantics: both anchored, OR'ed.
const RULES: [(&str, &str); 10] = [
    ("GET", "/api/v1/users/[0-9]+"),
    ("POST", "/api/v1/users"),
    ("GET", "/api/v1/orders/[0-9]+/items"),
    ("PUT", "/api/v1/orders/[0-9]+"),
    ("DELETE", "/api/v1/orders/[0-9]+"),
    ("GET", "/static/.*\\.css"),
    ("GET", "/static/.*\\.js"),
    ("GET", "/healthz"),
    ("POST", "/api/v2/events"),
    ("GET", "/api/v2/items/[0-9]+"),
];

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Target {
    Direct,
    Membrane,
    Haproxy,
    Nginx,
}

impl Target {
    const ALL: [Target; 4] = [
        Target::Direct,
        Target::Membrane,
        Target::Haproxy,
        Target::Nginx,
    ];
    const PROXIES: [Target; 3] = [Target::Membrane, Target::Haproxy, Target::Nginx];

    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct (backend)",
            Target::Membrane => "membrane",
            Target::Haproxy => "haproxy",
            Target::Nginx => "nginx",
        }
    }
}

pub fn run() {
    let membrane = crate::membrane_binary();
    for tool in ["taskset", "wrk", "nginx", "haproxy"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map_or(true, |s| !s.success())
        {
            eprintln!(
                "{tool} not found (apt-get install util-linux wrk nginx-light haproxy or nginx)"
            );
            std::process::exit(2);
        }
    }
    let nofile = raise_nofile();
    pin_self(LOAD_CPU);
    let dir = TempDir::new();
    let tools = Tools {
        membrane,
        dir: dir.path().to_path_buf(),
        nofile,
    };
    println!(
        "servers under test pinned to CPU {PROXY_CPU}; load generators and the proxies' backend on CPU {LOAD_CPU}"
    );
    println!(
        "{}; {}; nofile {nofile}",
        first_line("nginx", &["-v"]),
        first_line("haproxy", &["-v"])
    );

    // The backend twice: on the proxy core (direct) and on the load core (behind the proxies).
    let direct = tools.backend("backend-direct", PROXY_CPU);
    let backend = tools.backend("backend", LOAD_CPU);
    let mut peers = HashMap::new();
    peers.insert(Target::Direct, direct);
    for target in Target::PROXIES {
        peers.insert(target, tools.proxy(target, backend.addr, "bench"));
    }
    for target in Target::ALL {
        sanity(target, peers[&target].addr);
    }

    // `MEMBRANE_PERF_HTTP_ONLY=throughput|latency|memory` runs one part.
    let only = std::env::var("MEMBRANE_PERF_HTTP_ONLY").unwrap_or_default();
    let part = |name: &str| only.is_empty() || only == name;
    if part("throughput") {
        throughput(&peers);
    }
    if part("latency") {
        latency(&peers);
    }
    // The throughput peers are done; fresh instances for memory.
    drop(peers);
    if part("memory") {
        idle_memory(&tools, backend.addr);
    }
    drop(backend);
}

/// Programs and the directory for configuration files, logs and pid files.
struct Tools {
    membrane: PathBuf,
    dir: PathBuf,
    nofile: u64,
}

impl Tools {
    fn backend(&self, name: &str, cpu: usize) -> Peer {
        let addr = free_port();
        let conf = format!(
            "{preamble}\
               keepalive_timeout 300s;\n\
               server {{\n\
                 listen {addr} backlog=4096;\n\
                 location / {{ return 200 \"ok\\n\"; }}\n\
               }}\n\
             }}\n",
            preamble = self.nginx_preamble(name)
        );
        self.start_nginx(name, cpu, addr, &conf)
    }

    /// The start of an nginx configuration: one worker in the foreground, files in this run's
    /// directory, no access log, keep-alive without a request limit; the `http` block is
    /// left open.
    fn nginx_preamble(&self, name: &str) -> String {
        format!(
            "worker_processes 1;\n\
             daemon off;\n\
             pid {dir}/{name}.pid;\n\
             error_log {dir}/{name}.error.log warn;\n\
             # open files: the limit this benchmark raised and passed on\n\
             events {{ worker_connections 19000; }}\n\
             http {{\n\
               access_log off;\n\
               default_type text/plain;\n\
               keepalive_requests 1000000000;\n",
            dir = self.dir.display()
        )
    }

    /// Starts `target` (a proxy) on [`PROXY_CPU`] in front of `backend`.
    fn proxy(&self, target: Target, backend: SocketAddr, tag: &str) -> Peer {
        let addr = free_port();
        match target {
            Target::Membrane => {
                let policy = self.dir.join("policy.yaml");
                let mut yaml = String::from("# 10 HTTP rules, rules.http syntax\n");
                for (method, path) in RULES {
                    yaml.push_str(&format!("- method: {method}\n  path: '{path}'\n"));
                }
                std::fs::write(&policy, yaml).expect("write policy.yaml");
                let name = format!("membrane-{tag}");
                let mut cmd = pinned(PROXY_CPU, &self.membrane);
                cmd.args(["proxy", "--workers", "1", "--listen", &addr.to_string()])
                    .args(["--upstream", &backend.to_string(), "--policy"])
                    .arg(&policy)
                    // Access records are produced and written, to nowhere.
                    .stdout(Stdio::null())
                    .stderr(self.log(&name))
                    .env("MEMBRANE_LOG", "warn");
                Peer::start(&name, cmd, addr, &self.dir)
            }
            Target::Haproxy => {
                let name = format!("haproxy-{tag}");
                let mut acls = String::new();
                let mut allowed = Vec::new();
                for (i, (method, path)) in RULES.iter().enumerate() {
                    acls.push_str(&format!(
                        "  acl m{i} method {method}\n  acl p{i} path_reg ^{path}$\n"
                    ));
                    allowed.push(format!("m{i} p{i}"));
                }
                let conf = format!(
                    "global\n\
                       nbthread 1\n\
                       ulimit-n {nofile}\n\
                       maxconn {maxconn}\n\
                       pidfile {dir}/{name}.pid\n\
                     defaults\n\
                       mode http\n\
                       option http-keep-alive\n\
                       timeout connect 5s\n\
                       timeout client 60s\n\
                       timeout server 60s\n\
                       timeout http-keep-alive 60s\n\
                     frontend fe\n\
                       bind {addr}\n\
                       maxconn 30000\n\
                     {acls}\
                       http-request deny deny_status 403 unless {allowed}\n\
                       default_backend be\n\
                     backend be\n\
                       http-reuse always\n\
                       server backend {backend}\n",
                    dir = self.dir.display(),
                    allowed = allowed.join(" || "),
                    // haproxy would raise its open-file limit to 2 x maxconn and fail where
                    // the hard limit is lower; it warns and runs with the one it is given.
                    nofile = self.nofile,
                    maxconn = haproxy_maxconn(self.nofile),
                );
                let path = self.dir.join(format!("{name}.cfg"));
                std::fs::write(&path, conf).expect("write haproxy config");
                let mut cmd = pinned(PROXY_CPU, Path::new("haproxy"));
                cmd.arg("-db").arg("-f").arg(&path);
                cmd.stdout(self.log(&name)).stderr(self.log(&name));
                Peer::start(&name, cmd, addr, &self.dir)
            }
            Target::Nginx => {
                let name = format!("nginx-{tag}");
                let mut rules = String::new();
                for (method, path) in RULES {
                    rules.push_str(&format!(
                        "      if ($method_path ~ \"^{method}:{path}$\") {{ set $allowed 1; }}\n"
                    ));
                }
                let conf = format!(
                    "{preamble}\
                       keepalive_timeout 60s;\n\
                       upstream backend {{\n\
                         server {backend};\n\
                         keepalive 1024;\n\
                         keepalive_requests 1000000000;\n\
                         keepalive_timeout 300s;\n\
                       }}\n\
                       server {{\n\
                         listen {addr} backlog=4096;\n\
                         location / {{\n\
                           set $allowed 0;\n\
                           set $method_path \"$request_method:$uri\";\n\
                     {rules}\
                           if ($allowed = 0) {{ return 403 \"Access denied\\r\\n\"; }}\n\
                           proxy_pass http://backend;\n\
                           proxy_http_version 1.1;\n\
                           proxy_set_header Connection \"\";\n\
                         }}\n\
                       }}\n\
                     }}\n",
                    preamble = self.nginx_preamble(&name)
                );
                self.start_nginx(&name, PROXY_CPU, addr, &conf)
            }
            Target::Direct => unreachable!("the backend is not a proxy"),
        }
    }

    fn start_nginx(&self, name: &str, cpu: usize, addr: SocketAddr, conf: &str) -> Peer {
        let path = self.dir.join(format!("{name}.conf"));
        std::fs::write(&path, conf).expect("write nginx config");
        let prefix = self.dir.join(name);
        std::fs::create_dir_all(&prefix).expect("nginx prefix");
        let mut cmd = pinned(cpu, Path::new("nginx"));
        cmd.arg("-p")
            .arg(&prefix)
            .arg("-e")
            .arg(self.dir.join(format!("{name}.error.log")))
            .arg("-c")
            .arg(&path);
        cmd.stdout(self.log(name)).stderr(self.log(name));
        Peer::start(name, cmd, addr, &self.dir)
    }

    fn log(&self, name: &str) -> Stdio {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))
            .map_or_else(|_| Stdio::null(), Stdio::from)
    }
}

/// `taskset -c CPU program`: taskset execs the program, so the child's pid is the server's.
fn pinned(cpu: usize, program: &Path) -> Command {
    let mut cmd = Command::new("taskset");
    cmd.arg("-c").arg(cpu.to_string()).arg(program);
    cmd.stdin(Stdio::null()).process_group(0);
    // SAFETY: runs in the forked child before exec; prctl is async-signal-safe and touches
    // no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            // The peer dies with this benchmark (SIGTERM: nginx's master then stops its
            // workers), even if the benchmark is killed before its guards run.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// A server process (and its children: nginx workers), ended on drop.
struct Peer {
    name: String,
    child: Child,
    addr: SocketAddr,
}

impl Peer {
    fn start(name: &str, mut cmd: Command, addr: SocketAddr, dir: &Path) -> Self {
        let child = cmd.spawn().unwrap_or_else(|e| panic!("start {name}: {e}"));
        let mut peer = Self {
            name: name.to_owned(),
            child,
            addr,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = peer.child.try_wait() {
                let log =
                    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
                let errors = std::fs::read_to_string(dir.join(format!("{name}.error.log")))
                    .unwrap_or_default();
                panic!("{name} exited at start ({status}):\n{log}{errors}");
            }
            if TcpStream::connect(addr).is_ok() {
                return peer;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("{name} did not listen on {addr} within 10 s");
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        // The whole group (nginx's master and workers); it was created for this child.
        let group = -i32::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on the process group this benchmark created for the child.
        unsafe { libc::kill(group, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // SAFETY: as above; whatever ignored SIGTERM.
        unsafe { libc::kill(group, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// Checks that the benchmark request is answered 200 and (through a proxy) a request no rule
/// allows 403: the configurations really are equivalent.
fn sanity(target: Target, addr: SocketAddr) {
    let (status, body) = one_shot(addr, "GET", BENCH_PATH);
    assert_eq!(
        (status, body.as_str()),
        (200, "ok\n"),
        "{}: GET {BENCH_PATH}",
        target.name()
    );
    if target != Target::Direct {
        for (method, path) in [("GET", DENIED_PATH), ("POST", BENCH_PATH), ("GET", "/")] {
            let (status, _) = one_shot(addr, method, path);
            assert_eq!(status, 403, "{}: {method} {path}", target.name());
        }
        // Rule 8 of 10, to be sure the earlier rules are live too.
        let (status, _) = one_shot(addr, "GET", "/healthz");
        assert_eq!(status, 200, "{}: GET /healthz", target.name());
    }
}

/// One request with `Connection: close`; status and body (to the end of the stream).
fn one_shot(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: bench.test\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )
    .expect("send");
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read");
    let text = String::from_utf8_lossy(&out);
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

// ---------------------------------------------------------------------------------------
// Throughput

struct Sample {
    rps: f64,
    cores: f64,
    per_core: f64,
}

fn throughput(peers: &HashMap<Target, Peer>) {
    let connections = env_usize("MEMBRANE_PERF_HTTP_CONNECTIONS", WRK_CONNECTIONS);
    for target in Target::ALL {
        wrk(&peers[&target], connections, Duration::from_secs(1));
    }
    let mut samples: HashMap<Target, Vec<Sample>> = HashMap::new();
    for round in 0..ROUNDS {
        let mut line = format!("round {}:", round + 1);
        for target in Target::ALL {
            let s = wrk(&peers[&target], connections, ROUND);
            line.push_str(&format!(
                "  {} {:.0}/s {:.2} cores",
                target.name(),
                s.rps,
                s.cores
            ));
            samples.entry(target).or_default().push(s);
        }
        println!("{line}");
    }
    println!(
        "\nthroughput: wrk -t1 -c{connections}, HTTP/1.1 keep-alive, GET {BENCH_PATH}, median of {ROUNDS} x {ROUND:?}"
    );
    println!(
        "{:<18} {:>10} {:>12} {:>16}",
        "", "req/s", "CPU (cores)", "req/s per core"
    );
    let mut per_core = HashMap::new();
    for target in Target::ALL {
        let v = &samples[&target];
        let rps = median(v.iter().map(|s| s.rps));
        let cores = median(v.iter().map(|s| s.cores));
        let pc = median(v.iter().map(|s| s.per_core));
        per_core.insert(target, pc);
        println!("{:<18} {rps:>10.0} {cores:>12.2} {pc:>16.0}", target.name());
    }
    let m = per_core[&Target::Membrane];
    println!(
        "membrane / haproxy {:.2}x (target >= 1.0), membrane / nginx {:.2}x (target >= 1.2), membrane / direct {:.2}x (target >= 0.5)",
        m / per_core[&Target::Haproxy],
        m / per_core[&Target::Nginx],
        m / per_core[&Target::Direct],
    );
}

/// One wrk run against `peer`; the server's CPU time over the run from /proc.
fn wrk(peer: &Peer, connections: usize, duration: Duration) -> Sample {
    let url = format!("http://{}{BENCH_PATH}", peer.addr);
    let before = tree_ticks(peer.pid());
    let start = Instant::now();
    let out = Command::new("wrk")
        .args(["-t1", &format!("-c{connections}")])
        .arg(format!("-d{}s", duration.as_secs()))
        .arg(&url)
        .output()
        .expect("run wrk");
    let wall = start.elapsed().as_secs_f64();
    let cpu = (tree_ticks(peer.pid()) - before) as f64 / clock_ticks();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "wrk failed: {text}");
    assert!(
        !text.contains("Non-2xx") && !text.contains("Socket errors"),
        "{}: wrk saw errors:\n{text}",
        peer.name
    );
    let requests: f64 = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no request count in wrk output:\n{text}"));
    let rps: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Requests/sec in wrk output:\n{text}"));
    Sample {
        rps,
        cores: cpu / wall,
        per_core: requests / cpu.max(1e-9),
    }
}

// ---------------------------------------------------------------------------------------
// Latency at a fixed rate

fn latency(peers: &HashMap<Target, Peer>) {
    let mut from_send: HashMap<Target, Vec<Duration>> = HashMap::new();
    let mut from_due: HashMap<Target, Vec<Duration>> = HashMap::new();
    let mut late: HashMap<Target, usize> = HashMap::new();
    for _ in 0..LATENCY_ROUNDS {
        for target in Target::ALL {
            let run = open_loop(peers[&target].addr, LATENCY_RATE, LATENCY_ROUND);
            from_send.entry(target).or_default().extend(run.from_send);
            from_due.entry(target).or_default().extend(run.from_due);
            *late.entry(target).or_default() += run.late;
        }
    }
    println!(
        "\nlatency: open loop, {LATENCY_RATE} req/s on {LATENCY_CONNECTIONS} keep-alive connections, {LATENCY_ROUNDS} x {LATENCY_ROUND:?} per target in rotation"
    );
    println!(
        "{:<18} {:>9} {:>9} {:>12} {:>12} {:>22}",
        "", "p50 µs", "p99 µs", "added p50", "added p99", "from schedule p50/p99"
    );
    let pct = |v: &mut Vec<Duration>, p: usize| {
        v.sort_unstable();
        v[(v.len() * p / 100).min(v.len() - 1)].as_secs_f64() * 1e6
    };
    let direct = from_send.get_mut(&Target::Direct).expect("direct");
    let (d50, d99) = (pct(direct, 50), pct(direct, 99));
    for target in Target::ALL {
        let v = from_send.get_mut(&target).expect("samples");
        let (p50, p99) = (pct(v, 50), pct(v, 99));
        let due = from_due.get_mut(&target).expect("samples");
        let (s50, s99) = (pct(due, 50), pct(due, 99));
        let added = if target == Target::Direct {
            format!("{:>12} {:>12}", "-", "-")
        } else {
            format!("{:>12.1} {:>12.1}", p50 - d50, p99 - d99)
        };
        println!(
            "{:<18} {p50:>9.1} {p99:>9.1} {added} {:>22}",
            target.name(),
            format!("{s50:.1}/{s99:.1}")
        );
        if late[&target] > 0 {
            println!(
                "  ({} requests of {} were sent more than 1 ms late)",
                late[&target],
                v.len()
            );
        }
    }
    println!("targets: added p50 <= 30 µs, added p99 <= 150 µs");
}

struct OpenLoopRun {
    /// Request written → response read.
    from_send: Vec<Duration>,
    /// Scheduled send time → response read (includes the client's own scheduling delay).
    from_due: Vec<Duration>,
    /// Requests sent more than 1 ms after their scheduled time.
    late: usize,
}

/// Sends `rate` requests/s for `duration`, request i at `start + i / rate` regardless of how
/// earlier ones fared (open loop), spread over [`LATENCY_CONNECTIONS`] kept-alive connections.
fn open_loop(addr: SocketAddr, rate: u32, duration: Duration) -> OpenLoopRun {
    let interval = Duration::from_secs(1) / rate;
    let total = u32::try_from((duration.as_secs_f64() * f64::from(rate)) as u64).expect("count");
    let start = Instant::now() + Duration::from_millis(300);
    let threads: Vec<_> = (0..LATENCY_CONNECTIONS)
        .map(|k| {
            std::thread::spawn(move || {
                // Sleeps end within ~µs instead of the default 50 µs slack.
                // SAFETY: prctl on the calling thread only.
                unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1) };
                let mut conn = HttpConn::connect(addr);
                assert_eq!(conn.get(BENCH_PATH), 200);
                let mut out = Vec::new();
                let mut i = k;
                while i < total {
                    let due = start + interval * i;
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    let sent = Instant::now();
                    assert_eq!(conn.get(BENCH_PATH), 200);
                    let done = Instant::now();
                    out.push((done - sent, done - due, sent - due));
                    i += LATENCY_CONNECTIONS;
                }
                out
            })
        })
        .collect();
    let mut run = OpenLoopRun {
        from_send: Vec::new(),
        from_due: Vec::new(),
        late: 0,
    };
    for t in threads {
        for (send, due, lateness) in t.join().expect("latency client") {
            run.from_send.push(send);
            run.from_due.push(due);
            run.late += usize::from(lateness > Duration::from_millis(1));
        }
    }
    run
}

/// A kept-alive HTTP/1.1 client connection (responses framed by Content-Length).
struct HttpConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl HttpConn {
    fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        Self {
            stream,
            buf: Vec::with_capacity(512),
        }
    }

    /// GET `path`; returns the status once the whole response is read.
    fn get(&mut self, path: &str) -> u16 {
        let request = format!(
            "GET {path} HTTP/1.1\r\nhost: bench.test\r\nuser-agent: membrane-perf\r\naccept: */*\r\n\r\n"
        );
        self.stream.write_all(request.as_bytes()).expect("send");
        self.buf.clear();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(head_end) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..head_end]).to_string();
                let status: u16 = head
                    .get(9..12)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("bad status line: {head:?}"));
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse().ok())?
                    })
                    .unwrap_or_else(|| panic!("no content-length in {head:?}"));
                let total = head_end + 4 + length;
                while self.buf.len() < total {
                    self.read_more(&mut chunk);
                }
                assert_eq!(self.buf.len(), total, "unexpected bytes after the response");
                return status;
            }
            self.read_more(&mut chunk);
        }
    }

    fn read_more(&mut self, chunk: &mut [u8]) {
        let n = self.stream.read(chunk).expect("read response");
        assert!(n > 0, "the server closed the connection");
        self.buf.extend_from_slice(&chunk[..n]);
    }

    /// Closes with a reset: no TIME_WAIT left behind for the next thousands of connections.
    fn reset(self) {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt on a socket this struct owns, with a correctly sized value.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&self.stream),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const linger).cast(),
                size_of::<libc::linger>() as libc::socklen_t,
            );
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------------------
// Idle memory

/// haproxy refuses to start unless its open-file limit covers 2 × maxconn (a server-side
/// socket per client connection), and the hard limit may not be raisable here.
fn haproxy_maxconn(nofile: u64) -> u64 {
    nofile / 2 - 50
}

fn idle_memory(tools: &Tools, backend: SocketAddr) {
    let requested = env_usize("MEMBRANE_PERF_IDLE_CONNECTIONS", IDLE_CONNECTIONS);
    // The same count for every proxy, within what haproxy accepts (in thousands).
    let cap = usize::try_from(haproxy_maxconn(tools.nofile) / 1000 * 1000).expect("cap");
    let n = requested.min(cap);
    if n < requested {
        println!(
            "\n(idle connections capped at {n}: open-file limit {}, haproxy needs 2 per connection)",
            tools.nofile
        );
    }
    println!(
        "\nidle memory: fresh instance per proxy, {n} keep-alive connections after one request each (sent one at a time)"
    );
    println!(
        "{:<18} {:>11} {:>11} {:>12} {:>14}",
        "", "RSS before", "RSS after", "per conn", "upstream conns"
    );
    for target in Target::PROXIES {
        let peer = tools.proxy(target, backend, "idle");
        // Warm: code pages, the upstream pool, allocator arenas.
        {
            let mut conn = HttpConn::connect(peer.addr);
            for _ in 0..200 {
                assert_eq!(conn.get(BENCH_PATH), 200);
            }
            conn.reset();
        }
        std::thread::sleep(Duration::from_millis(500));
        let before = tree_rss_kib(peer.pid());
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n {
            let mut conn = HttpConn::connect(peer.addr);
            assert_eq!(conn.get(BENCH_PATH), 200);
            conns.push(conn);
        }
        std::thread::sleep(Duration::from_secs(2));
        let after = tree_rss_kib(peer.pid());
        let upstream = established_to(backend.port());
        let per_conn = (after.saturating_sub(before) * 1024) as f64 / n as f64;
        println!(
            "{:<18} {:>8} KiB {:>8} KiB {:>8.0} B {:>14}",
            target.name(),
            before,
            after,
            per_conn,
            upstream
        );
        for conn in conns {
            conn.reset();
        }
        drop(peer);
    }
    println!(
        "target: <= 8 KiB per idle connection (RSS: the proxy's user-space memory; kernel socket buffers are not in it)"
    );
}

/// Established TCP connections whose remote port is `port` (the proxies' upstream
/// connections to the backend; the backend's own side has it as the local port).
fn established_to(port: u16) -> usize {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return 0;
    };
    let hex = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[2].ends_with(&hex) && f[3] == "01"
        })
        .count()
}

// ---------------------------------------------------------------------------------------
// /proc, limits, helpers

/// The pid and every descendant of it.
fn process_tree(pid: u32) -> Vec<u32> {
    let mut parent = HashMap::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(p) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(fields) = stat_fields(p)
                && let Some(pp) = fields.get(1).and_then(|s| s.parse::<u32>().ok())
            {
                parent.insert(p, pp);
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let current = tree[i];
        tree.extend(
            parent
                .iter()
                .filter(|&(_, &pp)| pp == current)
                .map(|(&p, _)| p),
        );
        i += 1;
    }
    tree
}

/// /proc/PID/stat fields after the command name (field 3, the state, is index 0).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// utime + stime of the process tree (all threads), in clock ticks.
fn tree_ticks(pid: u32) -> u64 {
    process_tree(pid)
        .into_iter()
        .filter_map(stat_fields)
        .map(|f| {
            // utime is field 14, stime 15: indices 11 and 12 here.
            f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0)
        })
        .sum()
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// VmRSS of the process tree, KiB.
fn tree_rss_kib(pid: u32) -> u64 {
    process_tree(pid)
        .into_iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .sum()
}

/// Raises this process's open-file limit (inherited by the peers) to what is allowed,
/// at least enough for the idle connections; returns the soft limit.
fn raise_nofile() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit);
        // Root may raise the hard limit too; if that fails, take the soft one up to the hard.
        let wanted = libc::rlimit {
            rlim_cur: limit.rlim_max.max(65536),
            rlim_max: limit.rlim_max.max(65536),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const wanted) != 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit);
    }
    // This process holds the client sockets, each proxy its side of them plus a few.
    let needed = env_usize("MEMBRANE_PERF_IDLE_CONNECTIONS", IDLE_CONNECTIONS) + 1000;
    if (limit.rlim_cur as usize) < needed {
        eprintln!(
            "warning: open-file limit {} is below the {needed} the idle test needs; lower MEMBRANE_PERF_IDLE_CONNECTIONS",
            limit.rlim_cur
        );
    }
    limit.rlim_cur
}

/// Pins this process (and so wrk, which it starts) to `cpu`.
fn pin_self(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET and sched_setaffinity get valid
    // pointers to it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set) != 0 {
            panic!(
                "cannot pin to CPU {cpu}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            let text = [o.stdout, o.stderr].concat();
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .unwrap_or_default()
}

/// The configuration directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("membrane-perf-http-{}", std::process::id()));
        std::fs::create_dir_all(&path).expect("temp dir");
        Self(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
