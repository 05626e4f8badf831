//! Tier 2 kernel tests: a node namespace with pods (and world hosts), the tc programs
//! attached to the pods' host-side veths, real TCP/UDP/ICMP traffic on both sides.

use std::{
    io::Read as _,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    time::{Duration, Instant},
};

use membrane_common::{Direction, identity, proto, reason};
use membrane_datapath::{EventKind, Ipv4Prefix, PolicyRule, PolicyVerdict, PortMatch};
use membrane_tests::{
    TestNode, TestPod,
    net::{
        Exchange, tcp_echo_server, tcp_exchange, tcp_stream_server, transparent_tcp_server,
        udp_echo_server, udp_exchange,
    },
};

const A_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
const B_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 20);
const C_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 30);
const WORLD_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const OTHER_WORLD_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const ID_FRONTEND: u32 = 1000;
const ID_BACKEND: u32 = 2000;
const ID_OTHER: u32 = 3000;
const ID_CIDR: u32 = 0x0100_0001;
const PROXY_PORT: u16 = 15001;
/// Long enough for a real exchange on a loaded CI machine.
const EXPECT_REPLY: Duration = Duration::from_secs(5);
/// How long we wait before calling a connection blocked.
const EXPECT_DROP: Duration = Duration::from_millis(800);

fn allow(pod: &TestPod, direction: Direction, remote: u32, protocol: u8, port: u16) -> PolicyRule {
    let ports = if port == 0 {
        PortMatch::Any
    } else {
        PortMatch::Exact(port)
    };
    PolicyRule::new(
        pod.endpoint_id,
        direction,
        remote,
        protocol,
        ports,
        PolicyVerdict::Allow,
    )
    .with_cookie(1)
}

fn at(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

fn any(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)
}

#[test]
fn identity_allow_between_labelled_pods_and_denial_of_others() {
    let mut node = TestNode::new();
    let a = node.add_pod("a", A_IP, ID_FRONTEND, true, true);
    let b = node.add_pod("b", B_IP, ID_BACKEND, true, true);
    let c = node.add_pod("c", C_IP, ID_OTHER, false, false);
    let _tcp_8080 = tcp_echo_server(&b.netns, any(8080));
    let tcp_9090 = tcp_echo_server(&b.netns, any(9090));
    let _udp_8080 = udp_echo_server(&b.netns, any(8080));
    let udp_9090 = udp_echo_server(&b.netns, any(9090));

    let a_egress_tcp = allow(&a, Direction::Egress, ID_BACKEND, proto::TCP, 8080);
    for r in [
        a_egress_tcp,
        allow(&a, Direction::Egress, ID_BACKEND, proto::UDP, 8080),
        allow(&b, Direction::Ingress, ID_FRONTEND, proto::TCP, 8080),
        allow(&b, Direction::Ingress, ID_FRONTEND, proto::UDP, 8080),
    ] {
        node.datapath().policy().insert(&r).expect("insert rule");
    }

    let ok = tcp_exchange(&a.netns, at(B_IP, 8080), b"hello", EXPECT_REPLY);
    assert!(
        ok.is_reply(b"echo:hello"),
        "frontend -> backend:8080/TCP allowed, got {ok:?}"
    );
    assert_eq!(
        tcp_exchange(&a.netns, at(B_IP, 9090), b"x", EXPECT_DROP),
        Exchange::TimedOut
    );
    assert_eq!(tcp_9090.served(), 0);
    let ok = udp_exchange(&a.netns, at(B_IP, 8080), b"ping", EXPECT_REPLY);
    assert!(
        ok.is_reply(b"echo:ping"),
        "frontend -> backend:8080/UDP allowed, got {ok:?}"
    );
    assert_eq!(
        udp_exchange(&a.netns, at(B_IP, 9090), b"ping", EXPECT_DROP),
        Exchange::TimedOut
    );
    assert_eq!(udp_9090.served(), 0);

    // Another identity (no egress policy of its own) is stopped by backend's ingress policy.
    let other = tcp_exchange(&c.netns, at(B_IP, 8080), b"hi", EXPECT_DROP);
    assert_eq!(
        other,
        Exchange::TimedOut,
        "identity {ID_OTHER} is not allowed into backend"
    );

    // Backend may not open connections to frontend (no rule that way), replies aside.
    let _a_server = tcp_echo_server(&a.netns, any(8080));
    assert_eq!(
        tcp_exchange(&b.netns, at(A_IP, 8080), b"hi", EXPECT_DROP),
        Exchange::TimedOut
    );

    let denied = node
        .datapath()
        .metrics()
        .get(Direction::Ingress, reason::POLICY_DENIED)
        .expect("metrics");
    assert!(denied.packets >= 1, "ingress drops counted: {denied:?}");

    let events = node.datapath().take_events().expect("events").drain();
    let backend_drop = events
        .iter()
        .find(|e| e.kind == EventKind::Drop && e.endpoint_id == b.endpoint_id && e.src == C_IP)
        .expect("drop event at backend for the other identity");
    assert_eq!(backend_drop.drop_reason, Some(reason::POLICY_DENIED));
    assert_eq!(
        (backend_drop.src_identity, backend_drop.dst_identity),
        (ID_OTHER, ID_BACKEND)
    );
    assert!(
        events.iter().any(|e| e.kind == EventKind::PolicyVerdict
            && e.endpoint_id == b.endpoint_id
            && e.src_identity == ID_FRONTEND
            && e.dport == 8080),
        "policy verdict for the allowed connection: {events:#?}"
    );

    // Deleting frontend's egress entry stops new TCP connections to 8080; UDP stays.
    node.datapath()
        .policy()
        .remove(&a_egress_tcp)
        .expect("remove rule");
    assert_eq!(
        tcp_exchange(&a.netns, at(B_IP, 8080), b"again", EXPECT_DROP),
        Exchange::TimedOut
    );
    let still = udp_exchange(&a.netns, at(B_IP, 8080), b"ping2", EXPECT_REPLY);
    assert!(
        still.is_reply(b"echo:ping2"),
        "UDP entry untouched, got {still:?}"
    );
}

#[test]
fn cidr_egress_to_a_world_host_and_icmp_per_policy() {
    let mut node = TestNode::new();
    let a = node.add_pod("a", A_IP, ID_FRONTEND, false, true);
    let b = node.add_pod("b", B_IP, ID_BACKEND, false, false);
    let world = node.add_external_host("w1", WORLD_IP);
    let other_world = node.add_external_host("w2", OTHER_WORLD_IP);
    let _w = tcp_echo_server(&world, any(443));
    let _o = tcp_echo_server(&other_world, any(443));
    // toCIDR 198.51.100.0/24 on 443/TCP: the prefix gets a local-scope identity.
    let prefix: Ipv4Prefix = "198.51.100.0/24".parse().expect("prefix");
    node.datapath()
        .ipcache()
        .upsert(prefix, ID_CIDR)
        .expect("ipcache");
    node.datapath()
        .policy()
        .insert(&allow(&a, Direction::Egress, ID_CIDR, proto::TCP, 443))
        .expect("rule");
    // ICMP echo to backend only.
    node.datapath()
        .policy()
        .insert(&allow(&a, Direction::Egress, ID_BACKEND, proto::ICMP, 8))
        .expect("rule");

    let ok = tcp_exchange(&a.netns, at(WORLD_IP, 443), b"tls?", EXPECT_REPLY);
    assert!(ok.is_reply(b"echo:tls?"), "CIDR egress allowed, got {ok:?}");
    let blocked = tcp_exchange(&a.netns, at(OTHER_WORLD_IP, 443), b"x", EXPECT_DROP);
    assert_eq!(
        blocked,
        Exchange::TimedOut,
        "203.0.113.10 is world, not the CIDR"
    );

    let ping = |dst: Ipv4Addr| {
        a.netns
            .command("ping")
            .args(["-c", "1", "-W", "1", &dst.to_string()])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    assert!(
        ping(B_IP),
        "echo request to backend allowed, and its reply passes"
    );
    assert!(!ping(WORLD_IP), "ICMP to the world host is not allowed");
    let _ = b;
}

#[test]
fn redirect_reaches_a_transparent_listener_with_the_original_destination() {
    let mut node = TestNode::new();
    let a = node.add_pod("a", A_IP, ID_FRONTEND, false, true);
    let _b = node.add_pod("b", B_IP, ID_BACKEND, false, false);
    node.datapath()
        .policy()
        .insert(&PolicyRule::new(
            a.endpoint_id,
            Direction::Egress,
            ID_BACKEND,
            proto::TCP,
            PortMatch::Exact(8080),
            PolicyVerdict::Redirect(PROXY_PORT),
        ))
        .expect("rule");
    let proxy = transparent_tcp_server(node.node_netns(), any(PROXY_PORT));

    let reply = tcp_exchange(&a.netns, at(B_IP, 8080), b"GET /", EXPECT_REPLY);
    assert!(
        reply.is_reply(format!("proxied to {B_IP}:8080").as_bytes()),
        "the proxy answered and saw the original destination, got {reply:?}"
    );
    // The server counts a request after writing its reply, so the client can see the reply
    // first: give the count a moment.
    let deadline = Instant::now() + Duration::from_secs(2);
    while proxy.served() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(proxy.served(), 1);
    let ct = node.datapath().conntrack().list().expect("ct");
    assert!(
        ct.iter().any(|e| e.endpoint_id == a.endpoint_id
            && e.dport == 8080
            && e.proxy_port == Some(PROXY_PORT)),
        "conntrack marks the connection as redirected: {ct:?}"
    );
    let events = node.datapath().take_events().expect("events").drain();
    assert!(
        events
            .iter()
            .any(|e| e.kind == EventKind::PolicyVerdict && e.proxy_port == Some(PROXY_PORT)),
        "a redirected verdict event: {events:#?}"
    );
}

#[test]
fn redirect_without_a_listener_fails_and_reports_178() {
    let mut node = TestNode::new();
    let a = node.add_pod("a", A_IP, ID_FRONTEND, false, true);
    let b = node.add_pod("b", B_IP, ID_BACKEND, false, false);
    let backend = tcp_echo_server(&b.netns, any(8080));
    node.datapath()
        .policy()
        .insert(&PolicyRule::new(
            a.endpoint_id,
            Direction::Egress,
            ID_BACKEND,
            proto::TCP,
            PortMatch::Exact(8080),
            PolicyVerdict::Redirect(PROXY_PORT),
        ))
        .expect("rule");
    let mut events = node.datapath().take_events().expect("events");

    let result = tcp_exchange(&a.netns, at(B_IP, 8080), b"GET /", EXPECT_DROP);
    assert_eq!(
        result,
        Exchange::TimedOut,
        "no proxy: the connection fails, it never bypasses"
    );
    assert_eq!(backend.served(), 0, "the backend never saw it");

    let deadline = Instant::now() + Duration::from_secs(5);
    let mut drops = Vec::new();
    while drops.is_empty() && Instant::now() < deadline {
        drops = events
            .wait(Duration::from_millis(200))
            .expect("read events")
            .into_iter()
            .filter(|e| e.drop_reason == Some(reason::PROXY_LOOKUP_FAILED))
            .collect();
    }
    let drop = drops
        .first()
        .expect("a drop event with reason 178 from the ring buffer");
    assert_eq!((drop.src, drop.dst, drop.dport), (A_IP, B_IP, 8080));
    assert_eq!(drop.direction, Direction::Egress);
    assert_eq!(node.datapath().metrics().events_lost().expect("lost"), 0);
}

#[test]
fn agent_restart_mid_transfer_keeps_the_connection_and_enforcement() {
    let mut node = TestNode::new();
    let a = node.add_pod("a", A_IP, ID_FRONTEND, true, true);
    let b = node.add_pod("b", B_IP, ID_BACKEND, true, true);
    let _deny_probe_target = tcp_echo_server(&b.netns, any(9090));
    const CHUNKS: usize = 60;
    const CHUNK: usize = 4096;
    let _stream = tcp_stream_server(
        &b.netns,
        any(8080),
        CHUNKS,
        CHUNK,
        Duration::from_millis(25),
    );
    for r in [
        allow(&a, Direction::Egress, ID_BACKEND, proto::TCP, 8080),
        allow(&b, Direction::Ingress, ID_FRONTEND, proto::TCP, 8080),
    ] {
        node.datapath().policy().insert(&r).expect("rule");
    }

    let mut conn = a
        .netns
        .run(|| TcpStream::connect_timeout(&SocketAddr::V4(at(B_IP, 8080)), EXPECT_REPLY))
        .expect("netns")
        .expect("connect to the streaming backend");
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut received = 0usize;
    let mut buf = vec![0u8; 65536];
    while received < CHUNKS * CHUNK / 3 {
        let n = conn.read(&mut buf).expect("read before the restart");
        assert!(n > 0, "stream ended early");
        received += n;
    }

    node.restart_datapath(|| {
        // No process holds the datapath now; the pinned programs still enforce.
        let probe = tcp_exchange(&a.netns, at(B_IP, 9090), b"x", EXPECT_DROP);
        assert_eq!(
            probe,
            Exchange::TimedOut,
            "enforcement continues while the agent is away"
        );
    });

    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => received += n,
            Err(e) => panic!("transfer broke after {received} bytes: {e}"),
        }
    }
    assert_eq!(
        received,
        CHUNKS * CHUNK,
        "every byte arrived across the restart"
    );
    // The reloaded datapath enforces with the same maps.
    assert_eq!(
        tcp_exchange(&a.netns, at(B_IP, 9090), b"x", EXPECT_DROP),
        Exchange::TimedOut
    );
    let _ = identity::WORLD;
}

#[test]
fn teardown_leaves_nothing_behind() {
    let names;
    {
        let mut node = TestNode::new();
        let a = node.add_pod("a", A_IP, ID_FRONTEND, true, true);
        names = vec![
            node.node_netns().name().to_owned(),
            a.netns.name().to_owned(),
        ];
        for n in &names {
            assert!(
                membrane_datapath::Netns::exists(n),
                "{n} exists while the node lives"
            );
        }
    }
    for n in &names {
        assert!(!membrane_datapath::Netns::exists(n), "{n} removed on drop");
    }
}

#[test]
fn cleanup_runs_when_a_test_panics() {
    let names = std::sync::Mutex::new(Vec::new());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut node = TestNode::new();
        let a = node.add_pod("a", A_IP, ID_FRONTEND, true, true);
        names.lock().expect("lock").extend([
            node.node_netns().name().to_owned(),
            a.netns.name().to_owned(),
        ]);
        panic!("simulated test failure");
    }));
    assert!(result.is_err());
    let names = names.into_inner().expect("lock");
    assert_eq!(names.len(), 2);
    for n in &names {
        assert!(
            !membrane_datapath::Netns::exists(n),
            "{n} removed while unwinding"
        );
    }
}
