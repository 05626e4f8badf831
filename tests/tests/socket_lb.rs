//! Socket load balancing in the real kernel: the cgroup programs attached to a cgroup v2
//! directory of the test's own, a network namespace of the test's own with backends on
//! distinct loopback addresses (127.0.0.2, 127.0.0.3, …), and `membrane-sock-probe` as the
//! client: it joins the cgroup and the namespace before opening a socket, so nothing but
//! the probe is ever translated. What a user sees is asserted: which backend answered, the
//! peer address `getpeername` reports, the source of a UDP reply, `connect()`'s errno, a
//! refused bind.
//!
//! cgroup sock_addr programs have no `BPF_PROG_TEST_RUN`; these tests are their tier.

use std::{
    net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use membrane_common::proto;
use membrane_datapath::{
    BackendState, Datapath, MapSizes, Netns, ServiceBackend, ServiceFrontend, ServiceKind,
    ServiceScope, netns_cookie,
};
use membrane_tests::{CgroupGuard, NsGuard, PinGuard, require_root};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const BACKEND_PORT: u16 = 8080;

/// A server on `addr` inside `ns` answering every TCP connection (or UDP datagram) with
/// its tag, until dropped (at most 60 s).
struct TagServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TagServer {
    fn tcp(ns: &Netns, addr: SocketAddrV4, tag: &'static str) -> Self {
        let listener = ns
            .run(move || TcpListener::bind(addr))
            .expect("enter netns")
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        use std::io::{Read as _, Write as _};
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut buf = [0u8; 16];
                        let _ = stream.read(&mut buf);
                        let _ = stream.write_all(tag.as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn udp(ns: &Netns, addr: SocketAddrV4, tag: &'static str) -> Self {
        let socket = ns
            .run(move || UdpSocket::bind(addr))
            .expect("enter netns")
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut buf = [0u8; 64];
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                if let Ok((_, from)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(tag.as_bytes(), from);
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for TagServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One test's world: a namespace with loopback up, a cgroup with the socket programs, the
/// datapath on a private bpffs. Dropped in reverse order: programs detached, pins removed,
/// cgroup and namespace deleted — also when the test fails.
struct World {
    datapath: Datapath,
    cgroup: CgroupGuard,
    ns: NsGuard,
    _pins: PinGuard,
}

impl World {
    fn new(what: &str) -> Self {
        require_root();
        let pins = PinGuard::new();
        let ns = NsGuard::create(what);
        ns.netns().ip(&["link", "set", "lo", "up"]).expect("lo up");
        let cgroup = CgroupGuard::new(what);
        let mut datapath = Datapath::load(pins.path(), MapSizes::default()).expect("load");
        datapath
            .attach_socket_lb(cgroup.path())
            .expect("attach socket LB to the test's cgroup");
        Self {
            datapath,
            cgroup,
            ns,
            _pins: pins,
        }
    }

    fn netns(&self) -> &Netns {
        self.ns.netns()
    }

    /// Runs the probe in the test's cgroup and `netns`; its `key=value` lines.
    fn probe_in(&self, netns: &Netns, args: &[&str]) -> Vec<(String, String)> {
        let out = Command::new(env!("CARGO_BIN_EXE_membrane-sock-probe"))
            .arg(self.cgroup.path())
            .arg(netns.name())
            .args(args)
            .output()
            .expect("run membrane-sock-probe");
        assert!(
            out.status.success(),
            "probe {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    fn probe(&self, args: &[&str]) -> Vec<(String, String)> {
        self.probe_in(self.netns(), args)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Err(e) = self.datapath.detach_socket_lb(self.cgroup.path()) {
            eprintln!("warning: detach socket LB: {e}");
        }
    }
}

fn get<'a>(lines: &'a [(String, String)], key: &str) -> Option<&'a str> {
    lines
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn backend(last_octet: u8) -> ServiceBackend {
    ServiceBackend {
        address: Ipv4Addr::new(127, 0, 0, last_octet),
        port: BACKEND_PORT,
        state: BackendState::Active,
    }
}

fn cluster_ip(protocol: u8, port: u16, backends: Vec<ServiceBackend>) -> ServiceFrontend {
    ServiceFrontend {
        address: VIP,
        port,
        protocol,
        scope: ServiceScope::External,
        kind: ServiceKind::ClusterIp,
        two_scopes: false,
        local_only: false,
        affinity_timeout_secs: None,
        backends,
        maglev: None,
    }
}

#[test]
fn tcp_to_a_cluster_ip_reaches_a_backend_and_getpeername_shows_the_service() {
    let mut w = World::new("socklb-tcp");
    let _a = TagServer::tcp(
        w.netns(),
        SocketAddrV4::new([127, 0, 0, 2].into(), BACKEND_PORT),
        "be-a",
    );
    let _b = TagServer::tcp(
        w.netns(),
        SocketAddrV4::new([127, 0, 0, 3].into(), BACKEND_PORT),
        "be-b",
    );
    w.datapath
        .services()
        .apply(&[cluster_ip(proto::TCP, 80, vec![backend(2), backend(3)])])
        .expect("apply");

    let out = w.probe(&["tcp", "10.96.0.10:80"]);
    let reply = get(&out, "reply").unwrap_or_else(|| panic!("no reply: {out:?}"));
    assert!(reply == "be-a" || reply == "be-b", "reply {reply}");
    assert_eq!(
        get(&out, "peer"),
        Some("10.96.0.10:80"),
        "getpeername shows the service"
    );

    // Without the programs the VIP leads nowhere: the translation did it.
    let counters = w.datapath.services().counters().expect("counters");
    assert!(
        counters.xlate_fwd >= 1 && counters.xlate_rev >= 1,
        "{counters:?}"
    );
    // The connection closed: sock_release removed its reverse-translation entry.
    assert_eq!(w.datapath.services().reverse_sk_len().expect("len"), 0);
    assert!(counters.release_cleaned >= 1, "{counters:?}");

    // Both backends serve over enough connections (random selection).
    let out = w.probe(&["tcp-many", "10.96.0.10:80", "40"]);
    let replies: Vec<&str> = out
        .iter()
        .filter(|(k, _)| k == "reply")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(replies.len(), 40, "{out:?}");
    assert!(
        replies.contains(&"be-a") && replies.contains(&"be-b"),
        "{replies:?}"
    );
}

#[test]
fn udp_replies_come_from_the_service_address() {
    let mut w = World::new("socklb-udp");
    let _a = TagServer::udp(
        w.netns(),
        SocketAddrV4::new([127, 0, 0, 2].into(), BACKEND_PORT),
        "dns-a",
    );
    w.datapath
        .services()
        .apply(&[cluster_ip(proto::UDP, 53, vec![backend(2)])])
        .expect("apply");

    let out = w.probe(&["udp", "10.96.0.10:53"]);
    assert_eq!(get(&out, "reply"), Some("dns-a"), "{out:?}");
    assert_eq!(
        get(&out, "from"),
        Some("10.96.0.10:53"),
        "recvfrom shows the service"
    );

    let out = w.probe(&["udp-connected", "10.96.0.10:53"]);
    assert_eq!(get(&out, "peer"), Some("10.96.0.10:53"), "{out:?}");
    assert_eq!(get(&out, "reply"), Some("dns-a"), "{out:?}");
}

#[test]
fn a_service_without_backends_fails_connect_with_ehostunreach() {
    let mut w = World::new("socklb-empty");
    w.datapath
        .services()
        .apply(&[cluster_ip(proto::TCP, 80, Vec::new())])
        .expect("apply");
    let out = w.probe(&["tcp", "10.96.0.10:80"]);
    assert_eq!(
        get(&out, "errno"),
        Some(libc::EHOSTUNREACH.to_string().as_str()),
        "{out:?}"
    );

    // A terminating backend takes no new connections either.
    let mut draining = backend(2);
    draining.state = BackendState::Terminating;
    w.datapath
        .services()
        .apply(&[cluster_ip(proto::TCP, 80, vec![draining])])
        .expect("apply");
    let out = w.probe(&["tcp", "10.96.0.10:80"]);
    assert_eq!(
        get(&out, "errno"),
        Some(libc::EHOSTUNREACH.to_string().as_str()),
        "{out:?}"
    );
    assert!(
        w.datapath
            .services()
            .counters()
            .expect("counters")
            .no_backend
            >= 2
    );
}

#[test]
fn session_affinity_keeps_the_backend() {
    let mut w = World::new("socklb-affinity");
    let _a = TagServer::tcp(
        w.netns(),
        SocketAddrV4::new([127, 0, 0, 2].into(), BACKEND_PORT),
        "be-a",
    );
    let _b = TagServer::tcp(
        w.netns(),
        SocketAddrV4::new([127, 0, 0, 3].into(), BACKEND_PORT),
        "be-b",
    );
    let mut svc = cluster_ip(proto::TCP, 80, vec![backend(2), backend(3)]);
    svc.affinity_timeout_secs = Some(10_800);
    w.datapath.services().apply(&[svc]).expect("apply");

    let out = w.probe(&["tcp-many", "10.96.0.10:80", "30"]);
    let replies: Vec<&str> = out
        .iter()
        .filter(|(k, _)| k == "reply")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(replies.len(), 30, "{out:?}");
    assert!(
        replies.iter().all(|r| *r == replies[0]),
        "one backend: {replies:?}"
    );
    let counters = w.datapath.services().counters().expect("counters");
    assert!(counters.affinity_hit >= 29, "{counters:?}");
    assert_eq!(w.datapath.services().affinity_len().expect("len"), 1);
}

#[test]
fn nodeport_binds_are_refused_in_the_host_namespace_only() {
    let mut w = World::new("socklb-bind");
    let pod = NsGuard::create("socklb-pod");
    pod.netns().ip(&["link", "set", "lo", "up"]).expect("lo up");
    let _a = TagServer::tcp(
        w.netns(),
        SocketAddrV4::new([127, 0, 0, 2].into(), BACKEND_PORT),
        "be-a",
    );
    let host = netns_cookie(w.netns()).expect("cookie");
    w.datapath
        .services()
        .set_config(host, (30000, 32767))
        .expect("config");
    let nodeport = ServiceFrontend {
        address: Ipv4Addr::UNSPECIFIED,
        port: 30080,
        kind: ServiceKind::NodePort,
        ..cluster_ip(proto::TCP, 30080, vec![backend(2)])
    };
    w.datapath.services().apply(&[nodeport]).expect("apply");

    let out = w.probe(&["bind", "0.0.0.0:30080"]);
    assert_eq!(
        get(&out, "errno"),
        Some(libc::EADDRINUSE.to_string().as_str()),
        "{out:?}"
    );
    let out = w.probe(&["bind", "127.0.0.1:30080"]);
    assert_eq!(
        get(&out, "errno"),
        Some(libc::EADDRINUSE.to_string().as_str()),
        "{out:?}"
    );
    // Other ports bind as usual; so does the NodePort in a pod's namespace.
    let out = w.probe(&["bind", "0.0.0.0:30081"]);
    assert!(out.is_empty(), "bound: {out:?}");
    let out = w.probe_in(pod.netns(), &["bind", "0.0.0.0:30080"]);
    assert!(out.is_empty(), "bound in the pod: {out:?}");

    // From the host namespace the NodePort answers on loopback.
    let out = w.probe(&["tcp", "127.0.0.1:30080"]);
    assert_eq!(get(&out, "reply"), Some("be-a"), "{out:?}");
    assert_eq!(get(&out, "peer"), Some("127.0.0.1:30080"), "{out:?}");
}

#[test]
fn apply_reuses_ids_shrinks_slots_and_removes_what_is_stale() {
    let mut w = World::new("socklb-apply");
    let maps = w.datapath.services();
    let first = vec![
        cluster_ip(proto::TCP, 80, vec![backend(2), backend(3), backend(4)]),
        cluster_ip(proto::UDP, 53, vec![backend(2)]),
    ];
    let stats = maps.apply(&first).expect("apply");
    assert_eq!((stats.frontends_written, stats.backends_written), (2, 4));
    let before = maps.list().expect("list");
    let tcp_id = before
        .iter()
        .find(|e| e.protocol == proto::TCP)
        .expect("tcp")
        .service_id;

    let mut quarantined = backend(3);
    quarantined.state = BackendState::Quarantined;
    let second = vec![cluster_ip(proto::TCP, 80, vec![quarantined, backend(4)])];
    let stats = maps.apply(&second).expect("apply");
    assert_eq!(stats.frontends_removed, 1);
    let after = maps.list().expect("list");
    assert_eq!(after.len(), 1);
    let entry = &after[0];
    assert_eq!(entry.service_id, tcp_id, "the frontend keeps its id");
    assert_eq!((entry.count, entry.qcount), (1, 1));
    let slots: Vec<(u32, Ipv4Addr, BackendState)> = entry
        .backends
        .iter()
        .map(|(slot, _, b)| (*slot, b.address, b.state))
        .collect();
    assert_eq!(
        slots,
        vec![
            (1, Ipv4Addr::new(127, 0, 0, 4), BackendState::Active),
            (2, Ipv4Addr::new(127, 0, 0, 3), BackendState::Quarantined),
        ],
        "active first, then the others; slot 3 removed"
    );
    maps.apply(&[]).expect("apply empty");
    assert!(maps.list().expect("list").is_empty());
}

#[test]
fn a_restarted_datapath_takes_over_the_links_and_maps() {
    let mut w = World::new("socklb-restart");
    let _a = TagServer::tcp(
        w.netns(),
        SocketAddrV4::new([127, 0, 0, 2].into(), BACKEND_PORT),
        "be-a",
    );
    w.datapath
        .services()
        .apply(&[cluster_ip(proto::TCP, 80, vec![backend(2)])])
        .expect("apply");
    let id_before = w.datapath.services().list().expect("list")[0].service_id;

    // A new process: the old one is gone (its pins keep its links and maps), the new one
    // loads from the same pins and attaches to the same cgroup.
    let pins = w._pins.path().to_owned();
    let old = std::mem::replace(
        &mut w.datapath,
        Datapath::load(&pins, MapSizes::default()).expect("reload"),
    );
    drop(old);
    w.datapath
        .attach_socket_lb(w.cgroup.path())
        .expect("attach again");
    let link_pins = std::fs::read_dir(pins.join("links"))
        .expect("links dir")
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).expect("cgroup links").flatten())
        .count();
    assert_eq!(
        link_pins, 6,
        "one pinned link per program, the old ones replaced"
    );
    assert_eq!(
        w.datapath.services().list().expect("list")[0].service_id,
        id_before,
        "the frontend keeps its id across the restart"
    );
    let out = w.probe(&["tcp", "10.96.0.10:80"]);
    assert_eq!(get(&out, "reply"), Some("be-a"), "{out:?}");
    assert_eq!(get(&out, "peer"), Some("10.96.0.10:80"), "{out:?}");

    // Detached, nothing translates any more: the old links went with their pins.
    w.datapath
        .detach_socket_lb(w.cgroup.path())
        .expect("detach");
    let out = w.probe(&["tcp", "10.96.0.10:80"]);
    assert_eq!(
        get(&out, "errno"),
        Some(libc::ENETUNREACH.to_string().as_str()),
        "no route to the VIP without translation: {out:?}"
    );
}
