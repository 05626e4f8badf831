//! `membrane-perf dns`: dnsperf against three servers side by side, in a network namespace of
//! the run's own (loopback only):
//! - unbound (authoritative for `perf.test` from `local-data`, one thread), directly;
//! - membrane's DNS proxy (in process: policy `*.perf.test`, forwarding to unbound, every
//!   answer held for an in-memory FQDN observer, as on a node);
//! - dnsmasq as a forwarder to unbound, without a cache (`--cache-size=0`), like the proxy.
//!
//! Rounds rotate over the three so machine noise hits them alike; the median of each is
//! reported with membrane/direct and membrane/dnsmasq ratios (DESIGN §8: ≥ 0.9× direct and
//! ≥ 2× dnsmasq). The agent's plumbing latency (answer received → maps updated) is reported by
//! the lab (`membrane status`, FQDN line) and measured by `agent/tests/lab.rs`.

use std::{
    collections::HashSet,
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use membrane_l7proxy::dns::{
    DnsPolicy, DnsPortMatch, DnsProxy, DnsProxyConfig, EndpointScope, FqdnLearning, FqdnObserver,
    FqdnObserverError, StaticUpstream,
};
use membrane_policy::FqdnSelector;
use membrane_tests::NsGuard;

const UNBOUND: u16 = 5301;
const MEMBRANE: u16 = 5302;
const DNSMASQ: u16 = 5303;
const NAMES: usize = 1000;
const ROUNDS: usize = 3;
const SECONDS: u32 = 5;

/// What the agent does on the fast path, in memory: remember the addresses.
struct MemoryObserver(Mutex<HashSet<(String, std::net::IpAddr)>>);

impl FqdnObserver for MemoryObserver {
    async fn learned(&self, learning: &FqdnLearning) -> Result<(), FqdnObserverError> {
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for ip in &learning.ips {
            seen.insert((learning.name.clone(), ip.ip));
        }
        Ok(())
    }
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn need(program: &str) {
    if Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        eprintln!("{program} not found: apt-get install -y dnsperf unbound dnsmasq-base");
        std::process::exit(2);
    }
}

/// dnsperf's queries per second and average latency (ms) against `port`.
fn dnsperf(ns: &str, queries: &std::path::Path, port: u16) -> (f64, f64) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "dnsperf", "-s", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .arg("-d")
        .arg(queries)
        .args([
            "-l",
            &SECONDS.to_string(),
            "-c",
            "8",
            "-T",
            "1",
            "-q",
            "200",
        ])
        .output()
        .expect("run dnsperf");
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |label: &str| -> f64 {
        text.lines()
            .find(|l| l.trim_start().starts_with(label))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("dnsperf output without `{label}`:\n{text}"))
    };
    let lost = field("Queries lost");
    if lost > 0.0 {
        eprintln!("  (port {port}: {lost} queries lost)");
    }
    (
        field("Queries per second"),
        field("Average Latency (s)") * 1000.0,
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn run() {
    for p in ["dnsperf", "unbound", "dnsmasq"] {
        need(p);
    }
    let ns = NsGuard::create("dnsperf");
    let name = ns.netns().name().to_owned();
    ns.netns().ip(&["link", "set", "lo", "up"]).expect("lo up");
    let dir = std::env::temp_dir().join(format!("membrane-perf-dns-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut conf = format!(
        "server:\n  interface: 127.0.0.1@{UNBOUND}\n  do-daemonize: no\n  chroot: \"\"\n  username: \"\"\n  pidfile: \"\"\n  logfile: \"\"\n  use-syslog: no\n  num-threads: 1\n  access-control: 127.0.0.0/8 allow\n  local-zone: \"perf.test.\" static\n"
    );
    let mut queries = String::new();
    for i in 0..NAMES {
        conf.push_str(&format!(
            "  local-data: \"n{i}.perf.test. 300 IN A 192.0.2.{}\"\n",
            i % 250 + 1
        ));
        queries.push_str(&format!("n{i}.perf.test A\n"));
    }
    std::fs::write(dir.join("unbound.conf"), conf).expect("write unbound.conf");
    std::fs::write(dir.join("queries"), queries).expect("write queries");
    let spawn = |args: &[&str]| -> Killed {
        Killed(
            Command::new("ip")
                .args(["netns", "exec", &name])
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start server"),
        )
    };
    let _unbound = spawn(&[
        "unbound",
        "-d",
        "-c",
        dir.join("unbound.conf").to_str().expect("utf-8 path"),
    ]);
    let _dnsmasq = spawn(&[
        "dnsmasq",
        "-k",
        &format!("--port={DNSMASQ}"),
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        "--no-resolv",
        "--no-hosts",
        "--cache-size=0",
        &format!("--server=127.0.0.1#{UNBOUND}"),
        &format!("--pid-file={}", dir.join("dnsmasq.pid").display()),
    ]);
    // membrane's DNS proxy, on a runtime of its own inside the namespace.
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let observer = Arc::new(MemoryObserver(Mutex::new(HashSet::new())));
    let proxy_observer = observer.clone();
    let proxy_ns = ns.netns().clone();
    let proxy = std::thread::spawn(move || {
        proxy_ns
            .run(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                runtime.block_on(async move {
                    let upstream: SocketAddr = ([127, 0, 0, 1], UNBOUND).into();
                    let mut config = DnsProxyConfig::new(
                        ([127, 0, 0, 1], MEMBRANE).into(),
                        StaticUpstream(upstream),
                    )
                    .with_observer(proxy_observer);
                    let mut policy = DnsPolicy::new();
                    policy
                        .allow(
                            EndpointScope::Any,
                            DnsPortMatch::any(),
                            &[FqdnSelector::pattern("*.perf.test").expect("pattern")],
                        )
                        .expect("policy");
                    config.policy = policy;
                    let proxy = DnsProxy::bind(config).await.expect("bind the DNS proxy");
                    proxy
                        .serve(async move {
                            let _ = stop_rx.await;
                        })
                        .await;
                });
            })
            .expect("enter the namespace");
    });
    std::thread::sleep(Duration::from_secs(1));
    // Warm-up: every server answers a query before measuring.
    for port in [UNBOUND, MEMBRANE, DNSMASQ] {
        let ok = Command::new("ip")
            .args(["netns", "exec", &name, "dig", "+short", "+time=2", "-p"])
            .arg(port.to_string())
            .args(["@127.0.0.1", "n1.perf.test"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("192.0.2.2"))
            .unwrap_or(false);
        assert!(ok, "server on port {port} does not answer");
    }
    println!(
        "dnsperf, {ROUNDS} rounds x {SECONDS} s in rotation, 8 clients, ≤ 200 outstanding, {NAMES} names"
    );
    let queries = dir.join("queries");
    let mut results: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); 3];
    for _ in 0..ROUNDS {
        for (i, port) in [UNBOUND, MEMBRANE, DNSMASQ].into_iter().enumerate() {
            let (qps, ms) = dnsperf(&name, &queries, port);
            results[i].0.push(qps);
            results[i].1.push(ms);
        }
    }
    let labels = [
        "unbound direct",
        "membrane proxy -> unbound",
        "dnsmasq -> unbound",
    ];
    let medians: Vec<(f64, f64)> = results
        .into_iter()
        .map(|(q, l)| (median(q), median(l)))
        .collect();
    println!("{:<28} {:>10} {:>14}", "", "qps", "avg latency");
    for (label, (qps, ms)) in labels.iter().zip(&medians) {
        println!("{label:<28} {qps:>10.0} {ms:>11.3} ms");
    }
    println!(
        "membrane / direct: {:.2}x qps (target >= 0.9)   membrane / dnsmasq: {:.2}x qps (target >= 2)",
        medians[1].0 / medians[0].0,
        medians[1].0 / medians[2].0
    );
    println!(
        "names learned by the proxy's observer: {}",
        observer.0.lock().map(|s| s.len()).unwrap_or(0)
    );
    let _ = stop_tx.send(());
    let _ = proxy.join();
    let _ = std::fs::remove_dir_all(&dir);
}
