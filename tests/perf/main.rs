//! `membrane-perf`: side-by-side datapath benchmarks, run by hand (never timed in tests).
//!
//! ```text
//! cargo run --release -p membrane-tests --bin membrane-perf -- datapath   # ns/packet: TEST_RUN, bpf_stats
//! cargo run --release -p membrane-tests --bin membrane-perf -- veth       # TCP_RR / TCP_CRR between pods
//! cargo run --release -p membrane-tests --bin membrane-perf -- proxy      # req/s with vs without a Wasm filter
//! cargo run --release -p membrane-tests --bin membrane-perf -- http       # vs haproxy, nginx, direct (http.rs)
//! cargo run --release -p membrane-tests --bin membrane-perf -- grpc       # a filter's gRPC callout vs the call made directly
//! ```
//!
//! `datapath` loads the programs with 100, 10k and 100k ipcache and policy entries and reports
//! ns per packet for an established reply, an established forward packet and a new allowed
//! connection, each twice: as `BPF_PROG_TEST_RUN` measures it (including its own per-run
//! overhead) and as the kernel's run-time statistics (`bpf_stats`) measure the program
//! alone; an empty program calibrates both. Plus the flatness ratio 100k/100. `veth` runs
//! request/response (TCP_RR) and connect/request/response/close loops (TCP_CRR, 8 at once)
//! between two pods of a node namespace with (a) no filter, (b) iptables with 1k rules in the
//! node's FORWARD chain behind an `ESTABLISHED` rule, (c) the same 1k rules without conntrack,
//! (d) membrane with an equivalent policy (1k entries), prints the ratios DESIGN §8 targets
//! (d/a ≥ 0.97, d/b ≥ 1.3), then the programs' own ns per packet under that traffic.
//! Everything runs in namespaces it creates and removes; loops are bounded in time.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use membrane_common::{Direction, names, proto};
use membrane_datapath::{
    Datapath, EndpointEntry, Ipv4Prefix, MapSizes, Netns, PolicyRule, PolicyVerdict, PortMatch,
    enable_run_time_stats, plumbing::Node,
};
use membrane_tests::{NsGuard, PinGuard, packet, require_root, unique_name};

mod dns;
mod empty_prog;
mod events;
mod grpc;
mod http;
mod proxy;

fn main() {
    let what = std::env::args().nth(1).unwrap_or_default();
    if what == "proxy" {
        // Loopback only: no root, no namespaces.
        proxy::run();
        return;
    }
    if what == "grpc" {
        // In process, loopback only.
        grpc::run();
        return;
    }
    if what == "http" {
        // Loopback only, like `proxy`; raises its own open-file limit.
        http::run();
        return;
    }
    require_root();
    membrane_tests::sweep_stale();
    match what.as_str() {
        "datapath" => datapath(),
        "veth" => veth(),
        "dns" => dns::run(),
        "events" => events::run(),
        _ => {
            eprintln!("usage: membrane-perf datapath|veth|dns|events|proxy|http|grpc");
            std::process::exit(2);
        }
    }
}

const EP: u32 = 7;
const EP_IDENTITY: u32 = 500;
const POD: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);

/// The `membrane` binary of this benchmark's build profile (next to it); exits with a hint
/// when it was not built.
fn membrane_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let membrane = exe.with_file_name("membrane");
    if !membrane.is_file() {
        eprintln!(
            "{} not found: build it in the same profile first, e.g. \
             `cargo build --release -p membrane-agent --bin membrane`",
            membrane.display()
        );
        std::process::exit(2);
    }
    membrane
}

fn peer_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0A00_0000 | (i + 1))
}

/// Kernel-measured average ns per run of `program` on `frame`, `repeat` times.
fn avg_ns(dp: &mut Datapath, program: &'static str, frame: &[u8], repeat: u32) -> f64 {
    dp.test_run_repeat(program, frame, repeat)
        .expect("test run")
        .as_nanos() as f64
}

/// The kernel's own ns per run of `program` (`run_time_ns / run_cnt`, run-time statistics
/// on) over whatever `f` runs.
fn stats_ns(dp: &mut Datapath, program: &'static str, f: impl FnOnce(&mut Datapath)) -> f64 {
    let before = dp.program_stats(program).expect("program stats");
    f(dp);
    let after = dp.program_stats(program).expect("program stats");
    after
        .since(before)
        .ns_per_run()
        .expect("run-time statistics counted no run (BPF_ENABLE_STATS off?)")
}

fn upsert_endpoint(dp: &mut Datapath) {
    dp.endpoints()
        .upsert(EndpointEntry {
            ifindex: 1,
            endpoint_id: EP,
            identity: EP_IDENTITY,
            enforce_ingress: true,
            enforce_egress: true,
        })
        .expect("endpoint");
}

/// `flows` new connections to `peer`, one `BPF_PROG_TEST_RUN` each, from source addresses
/// of `subnet` (10.<subnet>.x.x, never used before in this datapath). Returns the average of
/// the kernel-measured durations. The ring buffer is drained every 4096 flows (outside the
/// measured runs), so every verdict event is really written, none counted as lost.
fn new_flows(dp: &mut Datapath, peer: Ipv4Addr, subnet: u8, flows: u32) -> f64 {
    let mut events = dp.take_events();
    let mut total = 0.0;
    for i in 0..flows {
        let sport = 1024 + (i % 60_000) as u16;
        let src = Ipv4Addr::new(10, subnet, 1 + (i / 60_000) as u8, 10);
        // An endpoint write between runs, kept from the first version of this harness so
        // its numbers stay comparable (it leaves the caches as an agent's updates would).
        upsert_endpoint(dp);
        total += avg_ns(
            dp,
            names::PROG_FROM_ENDPOINT,
            &packet::tcp((src, sport), (peer, 8080), packet::TCP_SYN),
            1,
        );
        if i % 4096 == 4095
            && let Some(r) = events.as_mut()
        {
            let _ = r.drain();
        }
    }
    if let Some(r) = events.as_mut() {
        let _ = r.drain();
    }
    total / f64::from(flows)
}

fn datapath() {
    println!(
        "BPF_PROG_TEST_RUN, ns per packet: `test_run` = the run's kernel-measured average (with \
         the harness's per-run skb setup), `prog` = the program alone (bpf_stats run_time_ns/run_cnt)"
    );
    println!(
        "{:>8} {:>11} {:>7} {:>11} {:>7} {:>11} {:>7}",
        "entries", "est. reply", "prog", "est. fwd", "prog", "new flow", "prog"
    );
    let mut rows = Vec::new();
    for n in [100u32, 10_000, 100_000] {
        let pins = PinGuard::new();
        let sizes = MapSizes {
            policy: 2 * n + 16,
            conntrack: 65536,
            ..MapSizes::default()
        };
        let mut dp = Datapath::load(pins.path(), sizes).expect("load");
        upsert_endpoint(&mut dp);
        for i in 0..n {
            dp.ipcache()
                .upsert(Ipv4Prefix::host(peer_ip(i)), 1000 + i)
                .expect("ipcache");
            let rule = PolicyRule::new(
                EP,
                Direction::Egress,
                1000 + i,
                proto::TCP,
                PortMatch::Exact(8080),
                PolicyVerdict::Allow,
            );
            dp.policy().insert(&rule).expect("policy");
        }
        // The measured peer sits in the middle of the table.
        let peer = peer_ip(n / 2);
        let forward = packet::tcp((POD, 40000), (peer, 8080), packet::TCP_ACK);
        let reply = packet::tcp((peer, 8080), (POD, 40000), packet::TCP_ACK);
        assert_eq!(
            dp.test_run(
                names::PROG_FROM_ENDPOINT,
                &packet::tcp((POD, 40000), (peer, 8080), packet::TCP_SYN)
            )
            .expect("run"),
            0
        );
        // First without run-time statistics (they add two clock reads per run)...
        let est_reply = avg_ns(&mut dp, names::PROG_TO_ENDPOINT, &reply, 200_000);
        let est_forward = avg_ns(&mut dp, names::PROG_FROM_ENDPOINT, &forward, 200_000);
        let new_flow = new_flows(&mut dp, peer, 200, 20_000);
        // ...then the same runs with them, for the program's own time.
        let stats = enable_run_time_stats().expect("enable bpf stats");
        let prog_reply = stats_ns(&mut dp, names::PROG_TO_ENDPOINT, |dp| {
            avg_ns(dp, names::PROG_TO_ENDPOINT, &reply, 200_000);
        });
        let prog_forward = stats_ns(&mut dp, names::PROG_FROM_ENDPOINT, |dp| {
            avg_ns(dp, names::PROG_FROM_ENDPOINT, &forward, 200_000);
        });
        let prog_new = stats_ns(&mut dp, names::PROG_FROM_ENDPOINT, |dp| {
            new_flows(dp, peer, 201, 20_000);
        });
        drop(stats);
        println!(
            "{n:>8} {est_reply:>11.1} {prog_reply:>7.1} {est_forward:>11.1} {prog_forward:>7.1} {new_flow:>11.1} {prog_new:>7.1}"
        );
        rows.push((
            n,
            [est_reply, est_forward, new_flow],
            [prog_reply, prog_forward, prog_new],
        ));
        drop(dp);
        drop(pins);
    }
    let (first, last) = (&rows[0], &rows[rows.len() - 1]);
    for (what, i) in [("test_run", 1usize), ("prog", 2)] {
        let (a, b) = if i == 1 {
            (first.1, last.1)
        } else {
            (first.2, last.2)
        };
        println!(
            "flatness 100k/100 ({what}): est. reply {:.2}x, est. forward {:.2}x, new flow {:.2}x (target <= 1.25x)",
            b[0] / a[0],
            b[1] / a[1],
            b[2] / a[2]
        );
    }
    // The floors. An empty program run by BPF_PROG_TEST_RUN: the harness by itself (skb
    // setup, the run loop); with run-time statistics on, what they add to every run (a clock
    // read). An ARP frame through our program: the endpoint lookup and the EtherType check.
    let pins = PinGuard::new();
    let mut dp = Datapath::load(pins.path(), MapSizes::default()).expect("load");
    upsert_endpoint(&mut dp);
    let empty = empty_prog::EmptyProgram::load();
    let arp = packet::ethertype(0x0806, 28);
    let floor = avg_ns(&mut dp, names::PROG_TO_ENDPOINT, &arp, 200_000);
    let empty_run = empty.test_run_ns(&arp, 200_000);
    let stats = enable_run_time_stats().expect("enable bpf stats");
    let prog_floor = stats_ns(&mut dp, names::PROG_TO_ENDPOINT, |dp| {
        avg_ns(dp, names::PROG_TO_ENDPOINT, &arp, 200_000);
    });
    let empty_stats = empty.stats_ns(&arp, 200_000);
    drop(stats);
    println!(
        "empty program: test_run {empty_run:.1} ns (the harness), prog {empty_stats:.1} ns (the statistics' own clock read)"
    );
    println!("ARP frame (endpoint lookup, pass): test_run {floor:.1} ns, prog {prog_floor:.1} ns");
    println!("the programs' own cost (test_run - empty test_run | prog - empty prog):");
    for (n, t, p) in &rows {
        println!(
            "{n:>8}  est. reply {:>6.1} | {:>6.1}   est. forward {:>6.1} | {:>6.1}   new flow {:>6.1} | {:>6.1}",
            t[0] - empty_run,
            p[0] - empty_stats,
            t[1] - empty_run,
            p[1] - empty_stats,
            t[2] - empty_run,
            p[2] - empty_stats
        );
    }
}

/// The setups `veth` compares.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    NoFilter,
    /// iptables as real rule sets are written: `ESTABLISHED,RELATED` first, so only a
    /// connection's first packet walks the 1k rules (plus netfilter conntrack on every packet).
    IptablesStateful,
    /// iptables without conntrack: every packet walks the 1k rules before the matching one.
    IptablesStateless,
    Membrane,
}

impl Mode {
    const ALL: [Mode; 4] = [
        Mode::NoFilter,
        Mode::IptablesStateful,
        Mode::IptablesStateless,
        Mode::Membrane,
    ];

    fn name(self) -> &'static str {
        match self {
            Mode::NoFilter => "no filter",
            Mode::IptablesStateful => "iptables 1k, ct first",
            Mode::IptablesStateless => "iptables 1k, stateless",
            Mode::Membrane => "membrane 1k entries",
        }
    }
}

/// Concurrent connect/request/response/close loops of the TCP_CRR client.
const CRR_CONNECTIONS: usize = 8;
/// Rounds of the rotation, and the length of one measurement.
const ROUNDS: usize = 10;
const ROUND: Duration = Duration::from_secs(1);

/// Request/response and connect/request/response rates between two pods. The setups exist
/// side by side and are measured in rotation (10 rounds of 1 s each; medians of the per-round ratios), so load from
/// other work on the machine hits them alike. Then one more round of membrane with the
/// kernel's run-time statistics on, for the programs' own ns per packet.
fn veth() {
    let setups: Vec<VethSetup> = Mode::ALL.iter().map(|&m| VethSetup::new(m)).collect();
    let mut rr = vec![Vec::new(); setups.len()];
    let mut crr = vec![Vec::new(); setups.len()];
    let mut crr_errors = vec![0u64; setups.len()];
    for _ in 0..ROUNDS {
        for (i, setup) in setups.iter().enumerate() {
            rr[i].push(setup.tcp_rr(ROUND));
            let (rate, errors) = setup.tcp_crr(ROUND);
            crr[i].push(rate);
            crr_errors[i] += errors;
        }
    }
    // (median, min, max)
    let spread = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    println!(
        "{ROUNDS} rounds of {} s in rotation, median [min-max]; TCP_CRR: {CRR_CONNECTIONS} concurrent connect/request/response/close loops",
        ROUND.as_secs()
    );
    for (i, setup) in setups.iter().enumerate() {
        let (r, r_lo, r_hi) = spread(&rr[i]);
        let (c, c_lo, c_hi) = spread(&crr[i]);
        println!(
            "{:<24} TCP_RR {r:>7.0}/s [{r_lo:.0}-{r_hi:.0}]   TCP_CRR {c:>6.0}/s [{c_lo:.0}-{c_hi:.0}], {} failed",
            setup.mode.name(),
            crr_errors[i]
        );
    }
    // Ratios per round (the setups of one round ran seconds apart, under the same load),
    // then their median: slow changes in the machine's load cancel out.
    let mb = Mode::ALL.len() - 1;
    println!("membrane / other, median of the per-round ratios [min-max]:");
    for (i, setup) in setups.iter().enumerate().take(mb) {
        let target = if setup.mode == Mode::NoFilter {
            "0.97"
        } else {
            "1.3"
        };
        let ratios =
            |v: &[Vec<f64>]| -> Vec<f64> { v[mb].iter().zip(&v[i]).map(|(m, o)| m / o).collect() };
        let (r, r_lo, r_hi) = spread(&ratios(&rr));
        let (c, c_lo, c_hi) = spread(&ratios(&crr));
        println!(
            "  / {:<24} RR {r:.3}x [{r_lo:.2}-{r_hi:.2}]   CRR {c:.3}x [{c_lo:.2}-{c_hi:.2}]   (target >= {target})",
            setup.mode.name()
        );
    }

    // The programs' own cost on real packets.
    let membrane = &setups[3];
    let dp = membrane
        ._datapath
        .as_ref()
        .expect("membrane setup has a datapath");
    let stats = enable_run_time_stats().expect("enable bpf stats");
    let snapshot = || {
        [names::PROG_FROM_ENDPOINT, names::PROG_TO_ENDPOINT]
            .map(|p| dp.program_stats(p).expect("program stats"))
    };
    for (what, run) in [
        (
            "TCP_RR ",
            &(|s: &VethSetup| s.tcp_rr(ROUND)) as &dyn Fn(&VethSetup) -> f64,
        ),
        ("TCP_CRR", &|s: &VethSetup| s.tcp_crr(ROUND).0),
    ] {
        let before = snapshot();
        let rate = run(membrane);
        let after = snapshot();
        let [from, to] = [0, 1].map(|i| after[i].since(before[i]));
        let transactions = rate * ROUND.as_secs_f64();
        println!(
            "membrane {what} with bpf_stats: from_endpoint {:.1} ns/packet ({} runs), to_endpoint {:.1} ns/packet ({} runs), {:.1} program runs per transaction",
            from.ns_per_run().unwrap_or(f64::NAN),
            from.run_count,
            to.ns_per_run().unwrap_or(f64::NAN),
            to.run_count,
            (from.run_count + to.run_count) as f64 / transactions.max(1.0),
        );
    }
    drop(stats);
}

struct VethSetup {
    mode: Mode,
    client: Netns,
    server_addr: SocketAddrV4,
    stop: Arc<AtomicBool>,
    _datapath: Option<Datapath>,
    _guards: Vec<NsGuard>,
    _pins: Option<PinGuard>,
}

fn iptables_restore(node: &Node, rules: &str) {
    let mut child = node
        .netns()
        .command("iptables-restore")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("iptables-restore (apt-get install iptables)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(rules.as_bytes())
        .expect("write rules");
    assert!(
        child.wait().expect("wait").success(),
        "iptables-restore failed"
    );
}

/// 1000 non-matching per-peer rules (sources 10.99.x.x), as a policy-per-peer iptables setup
/// would have.
fn iptables_peer_rules() -> String {
    let mut rules = String::new();
    for i in 0..1000u32 {
        let src = Ipv4Addr::from(0x0A63_0000 | i);
        rules.push_str(&format!(
            "-A FORWARD -s {src}/32 -d 10.200.0.20/32 -p tcp --dport 8080 -j ACCEPT\n"
        ));
    }
    rules
}

impl VethSetup {
    fn new(mode: Mode) -> Self {
        let node_name = unique_name("perf-node");
        let node = Node::create(&node_name).expect("node");
        let mut guards = vec![NsGuard::adopt(node.netns().clone())];
        let a = node
            .add_endpoint(
                &unique_name("perf-a"),
                "lxc-a",
                Ipv4Addr::new(10, 200, 0, 10),
            )
            .expect("pod a");
        guards.push(NsGuard::adopt(a.netns.clone()));
        let b = node
            .add_endpoint(
                &unique_name("perf-b"),
                "lxc-b",
                Ipv4Addr::new(10, 200, 0, 20),
            )
            .expect("pod b");
        guards.push(NsGuard::adopt(b.netns.clone()));
        // The CRR client uses the whole port range (the server closes first, so the
        // client's ports are free again at once; the server keeps the TIME_WAITs).
        a.netns
            .sysctl("net.ipv4.ip_local_port_range", "1024 65535")
            .expect("port range");
        let (mut datapath, mut pins) = (None, None);
        let stop = Arc::new(AtomicBool::new(false));
        let events_stop = Arc::clone(&stop);
        match mode {
            Mode::IptablesStateful => {
                let rules = format!(
                    "*filter\n:FORWARD DROP [0:0]\n-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n{}-A FORWARD -s 10.200.0.10/32 -d 10.200.0.20/32 -p tcp --dport 8080 -j ACCEPT\nCOMMIT\n",
                    iptables_peer_rules()
                );
                iptables_restore(&node, &rules);
                // Netfilter keeps closed connections 120 s in TIME_WAIT; at CRR rates that
                // fills the (global) table and drops SYNs. 10 s is membrane's closing timeout.
                node.netns()
                    .sysctl("net.netfilter.nf_conntrack_tcp_timeout_time_wait", "10")
                    .expect("conntrack time_wait timeout (in the node namespace only)");
            }
            Mode::IptablesStateless => {
                let rules = format!(
                    "*filter\n:FORWARD DROP [0:0]\n{}-A FORWARD -s 10.200.0.10/32 -d 10.200.0.20/32 -p tcp --dport 8080 -j ACCEPT\n-A FORWARD -s 10.200.0.20/32 -d 10.200.0.10/32 -p tcp --sport 8080 -j ACCEPT\nCOMMIT\n",
                    iptables_peer_rules()
                );
                iptables_restore(&node, &rules);
            }
            Mode::Membrane => {
                let p = PinGuard::new();
                let mut dp = Datapath::load(p.path(), MapSizes::default()).expect("load");
                for (link, id, ep) in [(&a, 256u32, 1u32), (&b, 257, 2)] {
                    dp.endpoints()
                        .upsert(EndpointEntry {
                            ifindex: link.host_ifindex,
                            endpoint_id: ep,
                            identity: id,
                            enforce_ingress: true,
                            enforce_egress: true,
                        })
                        .expect("endpoint");
                    dp.ipcache()
                        .upsert(Ipv4Prefix::host(link.ipv4), id)
                        .expect("ipcache");
                    dp.attach_endpoint(node.netns(), &link.host_ifname)
                        .expect("attach");
                }
                for i in 0..1000u32 {
                    dp.ipcache()
                        .upsert(Ipv4Prefix::host(Ipv4Addr::from(0x0A63_0000 | i)), 5000 + i)
                        .expect("ipcache");
                    dp.policy()
                        .insert(&PolicyRule::new(
                            2,
                            Direction::Ingress,
                            5000 + i,
                            proto::TCP,
                            PortMatch::Exact(8080),
                            PolicyVerdict::Allow,
                        ))
                        .expect("policy");
                }
                dp.policy()
                    .insert(&PolicyRule::new(
                        2,
                        Direction::Ingress,
                        256,
                        proto::TCP,
                        PortMatch::Exact(8080),
                        PolicyVerdict::Allow,
                    ))
                    .expect("policy");
                dp.policy()
                    .insert(&PolicyRule::new(
                        1,
                        Direction::Egress,
                        257,
                        proto::TCP,
                        PortMatch::Exact(8080),
                        PolicyVerdict::Allow,
                    ))
                    .expect("policy");
                // Flow events are read as the agent reads them (a full ring would make
                // every event after the first 16k a cheap failed reservation).
                let mut reader = dp.take_events().expect("event reader");
                let stop = Arc::clone(&events_stop);
                std::thread::spawn(move || {
                    let deadline = Instant::now() + Duration::from_secs(900);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        if reader.wait(Duration::from_millis(100)).is_err() {
                            break;
                        }
                    }
                });
                datapath = Some(dp);
                pins = Some(p);
            }
            Mode::NoFilter => {}
        }
        let server_addr = SocketAddrV4::new(Ipv4Addr::new(10, 200, 0, 20), 8080);
        let listener = b
            .netns
            .run(move || -> std::io::Result<TcpListener> {
                let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 8080))?;
                // std listens with a backlog of 128; the CRR client opens connections faster
                // than that in bursts. (Listening again only changes the backlog.)
                // SAFETY: a valid listening socket's fd.
                if unsafe { libc::listen(listener.as_raw_fd(), 4096) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                listener.set_nonblocking(true)?;
                Ok(listener)
            })
            .expect("netns")
            .expect("bind");
        let stop2 = stop.clone();
        std::thread::spawn(move || serve_echo(listener, stop2));
        Self {
            mode,
            client: a.netns,
            server_addr,
            stop,
            _datapath: datapath,
            _guards: guards,
            _pins: pins,
        }
    }

    /// Request/response on one connection, run on a thread inside the client namespace.
    fn tcp_rr(&self, duration: Duration) -> f64 {
        let addr = SocketAddr::V4(self.server_addr);
        self.client
            .run(move || {
                let mut s =
                    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
                s.set_nodelay(true).expect("nodelay");
                s.set_read_timeout(Some(Duration::from_secs(2)))
                    .expect("timeout");
                let mut byte = [0u8; 1];
                let start = Instant::now();
                let mut n = 0u64;
                while start.elapsed() < duration {
                    s.write_all(&[REQUEST_KEEP]).expect("write");
                    s.read_exact(&mut byte).expect("read");
                    n += 1;
                }
                n as f64 / start.elapsed().as_secs_f64()
            })
            .expect("netns")
    }

    /// Connect, one request/response, close: [`CRR_CONNECTIONS`] such loops at once on one
    /// thread (a tokio runtime) inside the client namespace. The server closes after its
    /// response (as an HTTP/1.0 server does), so TIME_WAIT stays on the server and the
    /// client's ports are reusable at once. Returns completed transactions per second and
    /// the number of failed ones (every exchange is bounded to 2 s).
    fn tcp_crr(&self, duration: Duration) -> (f64, u64) {
        let addr = SocketAddr::V4(self.server_addr);
        self.client
            .run(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let start = Instant::now();
                    let deadline = start + duration;
                    let loops: Vec<_> = (0..CRR_CONNECTIONS)
                        .map(|_| {
                            tokio::spawn(async move {
                                let (mut done, mut failed) = (0u64, 0u64);
                                while Instant::now() < deadline {
                                    match tokio::time::timeout(
                                        Duration::from_secs(2),
                                        crr_once(addr),
                                    )
                                    .await
                                    {
                                        Ok(Ok(())) => done += 1,
                                        _ => failed += 1,
                                    }
                                }
                                (done, failed)
                            })
                        })
                        .collect();
                    let (mut done, mut failed) = (0u64, 0u64);
                    for l in loops {
                        let (d, f) = l.await.expect("client loop");
                        done += d;
                        failed += f;
                    }
                    assert!(
                        done > 0,
                        "TCP_CRR: no connection completed ({failed} failed)"
                    );
                    (done as f64 / start.elapsed().as_secs_f64(), failed)
                })
            })
            .expect("netns")
    }
}

/// One TCP_CRR transaction: connect, send the close-after-reply request, read the reply and
/// the server's FIN, close.
async fn crr_once(addr: SocketAddr) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(&[REQUEST_CLOSE]).await?;
    let mut byte = [0u8; 1];
    s.read_exact(&mut byte).await?;
    if s.read(&mut byte).await? != 0 {
        return Err(std::io::Error::other("server sent more than one byte"));
    }
    Ok(())
}

impl Drop for VethSetup {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Request byte: echo it and keep the connection (TCP_RR).
const REQUEST_KEEP: u8 = b'k';
/// Request byte: echo it and close (TCP_CRR).
const REQUEST_CLOSE: u8 = b'c';

/// The echo server: one thread with a tokio runtime, a task per connection. Ends when `stop`
/// is set (checked every 100 ms) or after 10 minutes.
fn serve_echo(listener: TcpListener, stop: Arc<AtomicBool>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        let deadline = Instant::now() + Duration::from_secs(600);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            let Ok(accepted) =
                tokio::time::timeout(Duration::from_millis(100), listener.accept()).await
            else {
                continue;
            };
            let Ok((mut conn, _)) = accepted else {
                continue;
            };
            let _ = conn.set_nodelay(true);
            tokio::spawn(async move {
                let mut byte = [0u8; 1];
                // An idle connection is dropped after 30 s.
                while let Ok(Ok(1)) =
                    tokio::time::timeout(Duration::from_secs(30), conn.read(&mut byte)).await
                {
                    if conn.write_all(&byte).await.is_err() || byte[0] == REQUEST_CLOSE {
                        break;
                    }
                }
            });
        }
    });
}
