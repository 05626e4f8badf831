//! Tier 2 kernel tests: a node namespace with two pods, the tc programs attached to their
//! host-side veths, real TCP/UDP sockets on both sides.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use membrane_common::{Direction, proto, reason};
use membrane_datapath::{AllowRule, maps::Ipv4Prefix};
use membrane_tests::{
    TestNode, TestPod,
    net::{Exchange, tcp_echo_server, tcp_exchange, udp_echo_server, udp_exchange},
};

const A_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
const B_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 20);
/// Long enough for a real exchange on a loaded CI machine.
const EXPECT_REPLY: Duration = Duration::from_secs(5);
/// How long we wait before calling a connection blocked.
const EXPECT_DROP: Duration = Duration::from_millis(800);

fn rule(
    pod: &TestPod,
    direction: Direction,
    remote: Ipv4Addr,
    protocol: u8,
    port: u16,
) -> AllowRule {
    AllowRule {
        endpoint_id: pod.endpoint_id,
        direction,
        remote: Ipv4Prefix::host(remote),
        protocol,
        port,
        rule_cookie: 1,
    }
}

fn at(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

#[test]
fn allowed_port_connects_other_port_is_dropped_and_deleting_the_entry_stops_new_connections() {
    let mut node = TestNode::new();
    let a = node.add_pod("a", A_IP, true, true);
    let b = node.add_pod("b", B_IP, true, true);
    let _tcp_8080 = tcp_echo_server(&b.netns, at(Ipv4Addr::UNSPECIFIED, 8080));
    let tcp_9090 = tcp_echo_server(&b.netns, at(Ipv4Addr::UNSPECIFIED, 9090));
    let _udp_8080 = udp_echo_server(&b.netns, at(Ipv4Addr::UNSPECIFIED, 8080));
    let udp_9090 = udp_echo_server(&b.netns, at(Ipv4Addr::UNSPECIFIED, 9090));

    let a_egress_tcp = rule(&a, Direction::Egress, B_IP, proto::TCP, 8080);
    for r in [
        a_egress_tcp,
        rule(&a, Direction::Egress, B_IP, proto::UDP, 8080),
        rule(&b, Direction::Ingress, A_IP, proto::TCP, 8080),
        rule(&b, Direction::Ingress, A_IP, proto::UDP, 8080),
    ] {
        node.datapath().policy().insert(&r).expect("insert rule");
    }

    // TCP: the reply arrives, so the SYN-ACK and data replies passed both endpoints.
    let ok = tcp_exchange(&a.netns, at(B_IP, 8080), b"hello", EXPECT_REPLY);
    assert!(
        ok.is_reply(b"echo:hello"),
        "A -> B:8080/TCP allowed, got {ok:?}"
    );
    let blocked = tcp_exchange(&a.netns, at(B_IP, 9090), b"hello", EXPECT_DROP);
    assert_eq!(
        blocked,
        Exchange::TimedOut,
        "A -> B:9090/TCP must be dropped"
    );
    assert_eq!(tcp_9090.served(), 0);

    // UDP, same shape.
    let ok = udp_exchange(&a.netns, at(B_IP, 8080), b"ping", EXPECT_REPLY);
    assert!(
        ok.is_reply(b"echo:ping"),
        "A -> B:8080/UDP allowed, got {ok:?}"
    );
    let blocked = udp_exchange(&a.netns, at(B_IP, 9090), b"ping", EXPECT_DROP);
    assert_eq!(
        blocked,
        Exchange::TimedOut,
        "A -> B:9090/UDP must be dropped"
    );
    assert_eq!(udp_9090.served(), 0);

    // B may not open connections to A (no rule for that direction), replies aside.
    let _a_server = tcp_echo_server(&a.netns, at(Ipv4Addr::UNSPECIFIED, 8080));
    let reverse = tcp_exchange(&b.netns, at(A_IP, 8080), b"hi", EXPECT_DROP);
    assert_eq!(reverse, Exchange::TimedOut, "B -> A is not allowed");

    let metrics = node.datapath().metrics();
    let denied = metrics
        .get(Direction::Egress, reason::POLICY_DENIED)
        .expect("metrics");
    assert!(denied.packets >= 2, "egress drops counted: {denied:?}");
    let forwarded = metrics
        .get(Direction::Ingress, reason::FORWARDED)
        .expect("metrics");
    assert!(
        forwarded.packets >= 4,
        "ingress forwards counted: {forwarded:?}"
    );

    // Deleting A's egress entry stops new TCP connections to 8080.
    node.datapath()
        .policy()
        .remove(&a_egress_tcp)
        .expect("remove rule");
    let after = tcp_exchange(&a.netns, at(B_IP, 8080), b"again", EXPECT_DROP);
    assert_eq!(
        after,
        Exchange::TimedOut,
        "entry deleted: new connections must fail"
    );
    // UDP on 8080 is still allowed.
    let still = udp_exchange(&a.netns, at(B_IP, 8080), b"ping2", EXPECT_REPLY);
    assert!(
        still.is_reply(b"echo:ping2"),
        "UDP entry untouched, got {still:?}"
    );
}

#[test]
fn ingress_policy_of_the_destination_alone_blocks() {
    let mut node = TestNode::new();
    // A enforces nothing; B enforces ingress only.
    let a = node.add_pod("a", A_IP, false, false);
    let b = node.add_pod("b", B_IP, true, false);
    let _s1 = tcp_echo_server(&b.netns, at(Ipv4Addr::UNSPECIFIED, 8080));
    let _s2 = tcp_echo_server(&b.netns, at(Ipv4Addr::UNSPECIFIED, 9090));
    node.datapath()
        .policy()
        .insert(&rule(&b, Direction::Ingress, A_IP, proto::TCP, 8080))
        .expect("insert rule");

    let ok = tcp_exchange(&a.netns, at(B_IP, 8080), b"x", EXPECT_REPLY);
    assert!(ok.is_reply(b"echo:x"), "got {ok:?}");
    let blocked = tcp_exchange(&a.netns, at(B_IP, 9090), b"x", EXPECT_DROP);
    assert_eq!(blocked, Exchange::TimedOut);
    let denied = node
        .datapath()
        .metrics()
        .get(Direction::Ingress, reason::POLICY_DENIED)
        .expect("metrics");
    assert!(denied.packets >= 1, "{denied:?}");

    // Conntrack shows the allowed connection at B, opened in the ingress direction.
    let ct = node.datapath().conntrack().list().expect("ct");
    assert!(
        ct.iter().any(|e| e.endpoint_id == b.endpoint_id
            && e.direction == Direction::Ingress
            && e.dport == 8080
            && e.src == A_IP
            && e.seen_reply),
        "conntrack: {ct:?}"
    );
}

#[test]
fn teardown_leaves_nothing_behind() {
    let names;
    {
        let mut node = TestNode::new();
        let a = node.add_pod("a", A_IP, true, true);
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
        let a = node.add_pod("a", A_IP, true, true);
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
