//! `membrane-perf`: side-by-side datapath benchmarks, run by hand (never timed in tests).
//!
//! ```text
//! cargo run --release -p membrane-tests --bin membrane-perf -- datapath   # BPF_PROG_TEST_RUN ns/packet
//! cargo run --release -p membrane-tests --bin membrane-perf -- veth       # TCP_RR / TCP_CRR between pods
//! cargo run --release -p membrane-tests --bin membrane-perf -- proxy      # req/s with vs without a Wasm filter
//! cargo run --release -p membrane-tests --bin membrane-perf -- http       # vs haproxy, nginx, direct (http.rs)
//! ```
//!
//! `datapath` loads the programs with 100, 10k and 100k ipcache and policy entries and reports
//! kernel-measured ns per packet for an established reply, an established forward packet
//! (policy lookups on every forward packet, as Cilium does) and a new allowed connection, plus
//! the flatness ratio 100k/100. `veth` runs request/response and connect/request/response loops
//! between two pods of a node namespace with (a) no filter, (b) iptables with 1k rules in the
//! node's FORWARD chain, (c) membrane with an equivalent policy (1k entries), and prints the
//! ratios DESIGN §8 targets (c/a ≥ 0.97, c/b ≥ 1.3). Everything runs in namespaces it creates
//! and removes; loops are bounded in time.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use membrane_common::{Direction, names, proto};
use membrane_datapath::{
    Datapath, EndpointEntry, Ipv4Prefix, MapSizes, Netns, PolicyRule, PolicyVerdict, PortMatch,
    plumbing::Node,
};
use membrane_tests::{NsGuard, PinGuard, packet, require_root, unique_name};

mod dns;
mod events;
mod http;
mod proxy;

fn main() {
    let what = std::env::args().nth(1).unwrap_or_default();
    if what == "proxy" {
        // Loopback only: no root, no namespaces.
        proxy::run();
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
            eprintln!("usage: membrane-perf datapath|veth|dns|events|proxy|http");
            std::process::exit(2);
        }
    }
}

const EP: u32 = 7;
const EP_IDENTITY: u32 = 500;
const POD: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);

fn peer_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0A00_0000 | (i + 1))
}

/// Kernel-measured average ns per run of `program` on `frame`, `repeat` times.
fn avg_ns(dp: &mut Datapath, program: &'static str, frame: &[u8], repeat: u32) -> f64 {
    dp.test_run_repeat(program, frame, repeat)
        .expect("test run")
        .as_nanos() as f64
}

fn datapath() {
    println!("BPF_PROG_TEST_RUN, ns per packet (kernel-measured average)");
    println!(
        "{:>8} {:>14} {:>16} {:>12}",
        "entries", "est. reply", "est. forward", "new flow"
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
        dp.endpoints()
            .upsert(EndpointEntry {
                ifindex: 1,
                endpoint_id: EP,
                identity: EP_IDENTITY,
                enforce_ingress: true,
                enforce_egress: true,
            })
            .expect("endpoint");
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
        let est_reply = avg_ns(&mut dp, names::PROG_TO_ENDPOINT, &reply, 200_000);
        let est_forward = avg_ns(&mut dp, names::PROG_FROM_ENDPOINT, &forward, 200_000);
        // New connections: distinct source ports, one run each.
        let flows = 20_000u32;
        let mut total = 0.0;
        for i in 0..flows {
            let sport = 1024 + (i % 60_000) as u16;
            let src = Ipv4Addr::new(10, 200, 1 + (i / 60_000) as u8, 10);
            dp.endpoints()
                .upsert(EndpointEntry {
                    ifindex: 1,
                    endpoint_id: EP,
                    identity: EP_IDENTITY,
                    enforce_ingress: true,
                    enforce_egress: true,
                })
                .ok();
            total += avg_ns(
                &mut dp,
                names::PROG_FROM_ENDPOINT,
                &packet::tcp((src, sport), (peer, 8080), packet::TCP_SYN),
                1,
            );
        }
        let new_flow = total / f64::from(flows);
        // Drain the ring buffer so it does not count lost events into the next round.
        if let Some(mut r) = dp.take_events() {
            let _ = r.drain();
        }
        println!("{n:>8} {est_reply:>14.1} {est_forward:>16.1} {new_flow:>12.1}");
        rows.push((n, est_reply, est_forward, new_flow));
        drop(dp);
        drop(pins);
    }
    let (first, last) = (rows[0], rows[rows.len() - 1]);
    println!(
        "flatness 100k/100: est. reply {:.2}x, est. forward {:.2}x, new flow {:.2}x (target <= 1.25x)",
        last.1 / first.1,
        last.2 / first.2,
        last.3 / first.3
    );
    // The floor: an ARP frame takes the endpoint lookup and the EtherType check, then
    // passes: what BPF_PROG_TEST_RUN itself (skb setup per run) plus one hash lookup cost on
    // this machine. The policy work of the rows above is what exceeds it.
    let pins = PinGuard::new();
    let mut dp = Datapath::load(pins.path(), MapSizes::default()).expect("load");
    dp.endpoints()
        .upsert(EndpointEntry {
            ifindex: 1,
            endpoint_id: EP,
            identity: EP_IDENTITY,
            enforce_ingress: true,
            enforce_egress: true,
        })
        .expect("endpoint");
    let arp = packet::ethertype(0x0806, 28);
    let floor = avg_ns(&mut dp, names::PROG_TO_ENDPOINT, &arp, 200_000);
    println!(
        "floor (ARP: endpoint lookup, pass): {floor:.1} ns; above it: est. reply {:.1}, est. forward {:.1}, new flow {:.1} ns",
        first.1 - floor,
        first.2 - floor,
        first.3 - floor
    );
}

/// Request/response and connect/request/response rates between two pods. The three setups
/// exist side by side and are measured in rotation (5 rounds of 2 s each, median), so load from
/// other work on the machine hits them alike.
fn veth() {
    let round = Duration::from_secs(2);
    let modes = ["no filter", "iptables 1k rules", "membrane 1k entries"];
    let setups: Vec<VethSetup> = modes.iter().map(|m| VethSetup::new(m)).collect();
    let mut rr = vec![Vec::new(); modes.len()];
    let mut crr = vec![Vec::new(); modes.len()];
    for _ in 0..5 {
        for (i, setup) in setups.iter().enumerate() {
            rr[i].push(setup.tcp_rr(round));
            crr[i].push(setup.tcp_crr(round));
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let mut results = Vec::new();
    for (i, mode) in modes.iter().enumerate() {
        let (r, c) = (median(&mut rr[i]), median(&mut crr[i]));
        println!("{mode:<22} TCP_RR {r:>9.0}/s   TCP_CRR {c:>8.0}/s   (median of 5 x 2 s)");
        results.push((r, c));
    }
    let (none, ipt, mb) = (results[0], results[1], results[2]);
    println!(
        "membrane / no filter: RR {:.3}x, CRR {:.3}x (target >= 0.97)",
        mb.0 / none.0,
        mb.1 / none.1
    );
    println!(
        "membrane / iptables:  RR {:.3}x, CRR {:.3}x (target >= 1.3)",
        mb.0 / ipt.0,
        mb.1 / ipt.1
    );
}

struct VethSetup {
    client: Netns,
    server_addr: SocketAddrV4,
    stop: Arc<AtomicBool>,
    _datapath: Option<Datapath>,
    _guards: Vec<NsGuard>,
    _pins: Option<PinGuard>,
}

impl VethSetup {
    fn new(mode: &str) -> Self {
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
        let (mut datapath, mut pins) = (None, None);
        match mode {
            "iptables 1k rules" => {
                // 1000 non-matching source rules before the accept, as a policy-per-peer
                // iptables setup would have; plus conntrack for replies.
                let mut rules = String::from(
                    "*filter\n:FORWARD DROP [0:0]\n-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n",
                );
                for i in 0..1000u32 {
                    let src = Ipv4Addr::from(0x0A63_0000 | i);
                    rules.push_str(&format!(
                        "-A FORWARD -s {src}/32 -d 10.200.0.20/32 -p tcp --dport 8080 -j ACCEPT\n"
                    ));
                }
                rules.push_str("-A FORWARD -s 10.200.0.10/32 -d 10.200.0.20/32 -p tcp --dport 8080 -j ACCEPT\nCOMMIT\n");
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
            "membrane 1k entries" => {
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
                datapath = Some(dp);
                pins = Some(p);
            }
            _ => {}
        }
        let server_addr = SocketAddrV4::new(Ipv4Addr::new(10, 200, 0, 20), 8080);
        let stop = Arc::new(AtomicBool::new(false));
        let listener = b
            .netns
            .run(move || TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 8080)))
            .expect("netns")
            .expect("bind");
        let stop2 = stop.clone();
        std::thread::spawn(move || serve_echo(listener, stop2));
        Self {
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
                let mut byte = [0u8; 1];
                let start = Instant::now();
                let mut n = 0u64;
                while start.elapsed() < duration {
                    s.write_all(b"x").expect("write");
                    s.read_exact(&mut byte).expect("read");
                    n += 1;
                }
                n as f64 / start.elapsed().as_secs_f64()
            })
            .expect("netns")
    }

    /// Connect, one request/response, close; repeated on a thread inside the client namespace.
    fn tcp_crr(&self, duration: Duration) -> f64 {
        let addr = SocketAddr::V4(self.server_addr);
        self.client
            .run(move || {
                let mut byte = [0u8; 1];
                let start = Instant::now();
                let mut n = 0u64;
                while start.elapsed() < duration {
                    let mut s =
                        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
                    s.set_nodelay(true).expect("nodelay");
                    s.write_all(b"x").expect("write");
                    s.read_exact(&mut byte).expect("read");
                    n += 1;
                }
                n as f64 / start.elapsed().as_secs_f64()
            })
            .expect("netns")
    }
}

impl Drop for VethSetup {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve_echo(listener: TcpListener, stop: Arc<AtomicBool>) {
    // Blocking accept (no polling delay in the connection rate); the benchmark process ends
    // the thread when it exits, and the deadline bounds it otherwise.
    let deadline = Instant::now() + Duration::from_secs(600);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let Ok((mut conn, _)) = listener.accept() else {
            continue;
        };
        let _ = conn.set_nodelay(true);
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut byte = [0u8; 1];
            while !stop.load(Ordering::Relaxed) {
                match conn.read(&mut byte) {
                    Ok(1) => {
                        if conn.write_all(&byte).is_err() {
                            break;
                        }
                    }
                    _ => break,
                }
            }
        });
    }
}
