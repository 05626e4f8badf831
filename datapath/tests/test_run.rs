//! Tier 1 kernel tests: the tc programs run with `BPF_PROG_TEST_RUN` on crafted frames.
//! The frames' interface is the loopback of the test's namespace (ifindex 1), registered
//! as an endpoint; nothing is sent anywhere.

use std::net::Ipv4Addr;

use membrane_common::{Direction, names, proto, reason};
use membrane_datapath::{
    AllowRule, Datapath, MapSizes,
    maps::{EndpointEntry, Ipv4Prefix},
};
use membrane_tests::{PinGuard, packet, require_root};

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const LO_IFINDEX: u32 = 1;
const EP: u32 = 7;

const POD: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
const PEER: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 20);
const OTHER: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);

struct Fixture {
    datapath: Datapath,
    _pins: PinGuard,
}

fn fixture(enforce_ingress: bool, enforce_egress: bool) -> Fixture {
    require_root();
    let pins = PinGuard::new();
    let mut datapath = Datapath::load(pins.path(), MapSizes::default()).expect("load datapath");
    datapath
        .endpoints()
        .upsert(EndpointEntry {
            ifindex: LO_IFINDEX,
            endpoint_id: EP,
            enforce_ingress,
            enforce_egress,
        })
        .expect("register endpoint");
    Fixture {
        datapath,
        _pins: pins,
    }
}

fn allow(direction: Direction, remote: &str, protocol: u8, port: u16) -> AllowRule {
    AllowRule {
        endpoint_id: EP,
        direction,
        remote: remote.parse::<Ipv4Prefix>().expect("prefix"),
        protocol,
        port,
        rule_cookie: 42,
    }
}

impl Fixture {
    /// A packet the pod sends (its egress policy).
    fn send(&mut self, frame: &[u8]) -> i32 {
        self.datapath
            .test_run(names::PROG_FROM_ENDPOINT, frame)
            .expect("test run")
    }
    /// A packet delivered to the pod (its ingress policy).
    fn receive(&mut self, frame: &[u8]) -> i32 {
        self.datapath
            .test_run(names::PROG_TO_ENDPOINT, frame)
            .expect("test run")
    }
    fn count(&self, direction: Direction, reason: u8) -> u64 {
        self.datapath
            .metrics()
            .get(direction, reason)
            .expect("metrics")
            .packets
    }
    fn insert(&mut self, rule: AllowRule) {
        self.datapath.policy().insert(&rule).expect("insert rule");
    }
}

#[test]
fn egress_allow_entry_forwards_and_other_ports_are_denied() {
    let mut f = fixture(true, true);
    f.insert(allow(Direction::Egress, "10.200.0.20/32", proto::TCP, 8080));
    assert_eq!(
        f.send(&packet::tcp((POD, 40000), (PEER, 8080), packet::TCP_SYN)),
        TC_ACT_OK
    );
    assert_eq!(
        f.send(&packet::tcp((POD, 40001), (PEER, 9090), packet::TCP_SYN)),
        TC_ACT_SHOT
    );
    assert_eq!(
        f.send(&packet::udp((POD, 40002), (PEER, 8080), b"x")),
        TC_ACT_SHOT,
        "UDP is not TCP"
    );
    assert_eq!(
        f.send(&packet::tcp((POD, 40003), (OTHER, 8080), packet::TCP_SYN)),
        TC_ACT_SHOT
    );
    assert_eq!(f.count(Direction::Egress, reason::FORWARDED), 1);
    assert_eq!(f.count(Direction::Egress, reason::POLICY_DENIED), 3);
}

#[test]
fn replies_of_allowed_connections_pass_and_unsolicited_packets_do_not() {
    let mut f = fixture(true, true);
    f.insert(allow(Direction::Egress, "10.200.0.20/32", proto::TCP, 8080));
    // Before any connection, the "reply" is an unsolicited ingress packet: denied.
    let syn_ack = packet::tcp(
        (PEER, 8080),
        (POD, 40000),
        packet::TCP_SYN | packet::TCP_ACK,
    );
    assert_eq!(f.receive(&syn_ack), TC_ACT_SHOT);
    assert_eq!(
        f.send(&packet::tcp((POD, 40000), (PEER, 8080), packet::TCP_SYN)),
        TC_ACT_OK
    );
    assert_eq!(f.receive(&syn_ack), TC_ACT_OK, "reply passes via conntrack");
    // Same ports, different peer port: not a reply.
    assert_eq!(
        f.receive(&packet::tcp((PEER, 8081), (POD, 40000), packet::TCP_ACK)),
        TC_ACT_SHOT
    );
    // The peer cannot open its own connection to the pod's port either.
    assert_eq!(
        f.receive(&packet::tcp((PEER, 40000), (POD, 8080), packet::TCP_SYN)),
        TC_ACT_SHOT
    );

    let ct = f.datapath.conntrack().list().expect("ct list");
    let entry = ct
        .iter()
        .find(|e| e.dport == 8080 && e.sport == 40000)
        .expect("conntrack entry for the allowed connection");
    assert_eq!(entry.direction, Direction::Egress);
    assert!(entry.seen_reply);
    assert_eq!(entry.rule_cookie, 42);
}

#[test]
fn ingress_allow_and_reply_on_egress() {
    let mut f = fixture(true, true);
    f.insert(allow(
        Direction::Ingress,
        "10.200.0.20/32",
        proto::UDP,
        5353,
    ));
    assert_eq!(
        f.receive(&packet::udp((PEER, 1111), (POD, 5353), b"q")),
        TC_ACT_OK
    );
    assert_eq!(
        f.send(&packet::udp((POD, 5353), (PEER, 1111), b"a")),
        TC_ACT_OK,
        "UDP reply"
    );
    assert_eq!(
        f.receive(&packet::udp((PEER, 1111), (POD, 5354), b"q")),
        TC_ACT_SHOT
    );
    assert_eq!(f.count(Direction::Ingress, reason::POLICY_DENIED), 1);
}

#[test]
fn prefixes_any_port_and_any_protocol_entries() {
    let mut f = fixture(true, true);
    f.insert(allow(Direction::Egress, "10.200.0.0/24", proto::TCP, 443));
    f.insert(allow(Direction::Egress, "10.201.0.0/16", proto::UDP, 0));
    f.insert(allow(Direction::Egress, "192.0.2.7/32", proto::ANY, 0));
    assert_eq!(
        f.send(&packet::tcp(
            (POD, 1),
            (Ipv4Addr::new(10, 200, 0, 99), 443),
            packet::TCP_SYN
        )),
        TC_ACT_OK
    );
    assert_eq!(
        f.send(&packet::tcp(
            (POD, 2),
            (Ipv4Addr::new(10, 200, 1, 99), 443),
            packet::TCP_SYN
        )),
        TC_ACT_SHOT
    );
    assert_eq!(
        f.send(&packet::udp(
            (POD, 3),
            (Ipv4Addr::new(10, 201, 7, 7), 53),
            b"q"
        )),
        TC_ACT_OK
    );
    assert_eq!(
        f.send(&packet::udp(
            (POD, 4),
            (Ipv4Addr::new(10, 201, 7, 7), 65535),
            b"q"
        )),
        TC_ACT_OK
    );
    assert_eq!(
        f.send(&packet::tcp(
            (POD, 5),
            (Ipv4Addr::new(10, 201, 7, 7), 53),
            packet::TCP_SYN
        )),
        TC_ACT_SHOT
    );
    let any = Ipv4Addr::new(192, 0, 2, 7);
    assert_eq!(
        f.send(&packet::tcp((POD, 6), (any, 1), packet::TCP_SYN)),
        TC_ACT_OK
    );
    assert_eq!(f.send(&packet::icmp(POD, any, 8, 9)), TC_ACT_OK);
}

#[test]
fn icmp_type_is_the_port_and_echo_replies_pass() {
    let mut f = fixture(true, true);
    f.insert(allow(Direction::Egress, "10.200.0.20/32", proto::ICMP, 8));
    assert_eq!(
        f.send(&packet::icmp(POD, PEER, 8, 77)),
        TC_ACT_OK,
        "echo request allowed"
    );
    assert_eq!(
        f.receive(&packet::icmp(PEER, POD, 0, 77)),
        TC_ACT_OK,
        "echo reply of that request"
    );
    assert_eq!(
        f.receive(&packet::icmp(PEER, POD, 0, 78)),
        TC_ACT_SHOT,
        "reply to another id"
    );
    assert_eq!(
        f.send(&packet::icmp(POD, PEER, 13, 1)),
        TC_ACT_SHOT,
        "timestamp request: type 13 not allowed"
    );
}

#[test]
fn removing_the_entry_stops_new_connections() {
    let mut f = fixture(true, true);
    let rule = allow(Direction::Egress, "10.200.0.20/32", proto::TCP, 8080);
    f.insert(rule);
    assert_eq!(
        f.send(&packet::tcp((POD, 40000), (PEER, 8080), packet::TCP_SYN)),
        TC_ACT_OK
    );
    f.datapath.policy().remove(&rule).expect("remove rule");
    assert_eq!(
        f.send(&packet::tcp((POD, 40001), (PEER, 8080), packet::TCP_SYN)),
        TC_ACT_SHOT
    );
    assert!(f.datapath.policy().list().expect("list").is_empty());
}

#[test]
fn unenforced_directions_pass_and_still_track() {
    let mut f = fixture(false, true);
    // Ingress is not enforced: anything may come in, and its replies go out through
    // conntrack although egress is enforced with an empty allow-list.
    assert_eq!(
        f.receive(&packet::tcp((PEER, 5555), (POD, 22), packet::TCP_SYN)),
        TC_ACT_OK
    );
    assert_eq!(
        f.send(&packet::tcp(
            (POD, 22),
            (PEER, 5555),
            packet::TCP_SYN | packet::TCP_ACK
        )),
        TC_ACT_OK
    );
    assert_eq!(
        f.send(&packet::tcp((POD, 22), (PEER, 5556), packet::TCP_SYN)),
        TC_ACT_SHOT
    );
}

#[test]
fn explicit_drop_reasons() {
    let mut f = fixture(true, true);
    f.insert(allow(Direction::Egress, "0.0.0.0/0", proto::ANY, 0));
    // IPv4 fragments (MF set, and non-zero offset) are not supported while enforcing.
    let mut frag = packet::Ipv4Frame {
        src: POD,
        dst: PEER,
        protocol: 17,
        frag: 0x2000,
        payload: vec![0; 16],
    };
    assert_eq!(f.send(&frag.build()), TC_ACT_SHOT);
    frag.frag = 0x0010;
    assert_eq!(f.send(&frag.build()), TC_ACT_SHOT);
    assert_eq!(f.count(Direction::Egress, reason::FRAG_NOT_SUPPORTED), 2);
    // Truncated TCP header.
    let short = packet::Ipv4Frame {
        src: POD,
        dst: PEER,
        protocol: 6,
        frag: 0,
        payload: vec![0; 2],
    };
    assert_eq!(f.send(&short.build()), TC_ACT_SHOT);
    assert_eq!(f.count(Direction::Egress, reason::CT_INVALID_HDR), 1);
    // IPv6 while enforcing: unsupported L3; ARP always passes.
    assert_eq!(f.send(&packet::ethertype(0x86dd, 60)), TC_ACT_SHOT);
    assert_eq!(f.count(Direction::Egress, reason::UNSUPPORTED_L3), 1);
    assert_eq!(f.send(&packet::ethertype(0x0806, 28)), TC_ACT_OK);
    // Not IPv4 inside an IPv4 EtherType.
    let mut bogus = packet::udp((POD, 1), (PEER, 2), b"x");
    bogus[14] = 0x65;
    assert_eq!(f.send(&bogus), TC_ACT_SHOT);
    assert_eq!(f.count(Direction::Egress, reason::INVALID_PACKET), 1);
}

#[test]
fn unknown_interface_is_dropped_not_passed() {
    require_root();
    let pins = PinGuard::new();
    let mut datapath = Datapath::load(pins.path(), MapSizes::default()).expect("load");
    let frame = packet::tcp((POD, 1), (PEER, 2), packet::TCP_SYN);
    assert_eq!(
        datapath
            .test_run(names::PROG_FROM_ENDPOINT, &frame)
            .expect("run"),
        TC_ACT_SHOT
    );
    let drops = datapath
        .metrics()
        .get(Direction::Egress, reason::NO_ENDPOINT)
        .expect("metrics");
    assert_eq!(drops.packets, 1);
}

#[test]
fn bad_rules_are_rejected_with_a_reason() {
    let mut f = fixture(true, true);
    let err = f
        .datapath
        .policy()
        .insert(&allow(Direction::Egress, "0.0.0.0/0", proto::ANY, 80))
        .unwrap_err();
    assert!(
        err.to_string().contains("port 80 given with protocol ANY"),
        "{err}"
    );
    let err = "10.0.0.1/24".parse::<Ipv4Prefix>().unwrap_err();
    assert!(
        err.to_string().contains("did you mean 10.0.0.0/24"),
        "{err}"
    );
    let err = f
        .datapath
        .policy()
        .insert(&allow(Direction::Egress, "0.0.0.0/0", proto::ICMP, 300))
        .unwrap_err();
    assert!(err.to_string().contains("ICMP type 300"), "{err}");
}
