//! Tier 1 kernel tests: the tc programs run with `BPF_PROG_TEST_RUN` on crafted frames.
//! The frames' interface is the loopback of the test's namespace (ifindex 1), registered
//! as an endpoint; nothing is sent anywhere.

use std::net::Ipv4Addr;

use membrane_common::{Direction, identity, mark, match_type, names, proto, reason};
use membrane_datapath::{
    Datapath, EndpointEntry, EventKind, EventVerdict, FlowEventView, Ipv4Prefix, MapSizes,
    PolicyRule, PolicyVerdict, PortMatch,
};
use membrane_tests::{PinGuard, packet, require_root};

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;
const LO_IFINDEX: u32 = 1;
const EP: u32 = 7;
const EP_IDENTITY: u32 = 1000;
const PEER_IDENTITY: u32 = 2000;
const CIDR_IDENTITY: u32 = 0x0100_0001;

const POD: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
const PEER: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 20);
const UNKNOWN: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
const DOC_NET_HOST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

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
            identity: EP_IDENTITY,
            enforce_ingress,
            enforce_egress,
        })
        .expect("register endpoint");
    let ipcache = datapath.ipcache();
    ipcache
        .upsert(Ipv4Prefix::host(POD), EP_IDENTITY)
        .expect("ipcache");
    ipcache
        .upsert(Ipv4Prefix::host(PEER), PEER_IDENTITY)
        .expect("ipcache");
    ipcache
        .upsert("198.51.100.0/24".parse().expect("prefix"), CIDR_IDENTITY)
        .expect("ipcache");
    Fixture {
        datapath,
        _pins: pins,
    }
}

fn rule(
    direction: Direction,
    remote: u32,
    protocol: u8,
    ports: PortMatch,
    verdict: PolicyVerdict,
) -> PolicyRule {
    PolicyRule::new(EP, direction, remote, protocol, ports, verdict).with_cookie(42)
}

fn allow(direction: Direction, remote: u32, protocol: u8, port: u16) -> PolicyRule {
    let ports = if port == 0 {
        PortMatch::Any
    } else {
        PortMatch::Exact(port)
    };
    rule(direction, remote, protocol, ports, PolicyVerdict::Allow)
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
    fn insert(&mut self, rule: PolicyRule) {
        self.datapath.policy().insert(&rule).expect("insert rule");
    }
    fn events(&mut self) -> Vec<FlowEventView> {
        let mut reader = self.datapath.take_events().expect("event reader");
        let events = reader.drain();
        assert_eq!(reader.undecodable(), 0);
        events
    }
}

fn syn(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
    packet::tcp(src, dst, packet::TCP_SYN)
}

#[test]
fn identity_allow_forwards_and_everything_else_is_denied() {
    let mut f = fixture(true, true);
    f.insert(allow(Direction::Egress, PEER_IDENTITY, proto::TCP, 8080));
    assert_eq!(f.send(&syn((POD, 40000), (PEER, 8080))), TC_ACT_OK);
    assert_eq!(
        f.send(&syn((POD, 40001), (PEER, 9090))),
        TC_ACT_SHOT,
        "other port"
    );
    assert_eq!(
        f.send(&packet::udp((POD, 40002), (PEER, 8080), b"x")),
        TC_ACT_SHOT,
        "UDP is not TCP"
    );
    assert_eq!(
        f.send(&syn((POD, 40003), (UNKNOWN, 8080))),
        TC_ACT_SHOT,
        "world identity"
    );
    assert_eq!(f.count(Direction::Egress, reason::FORWARDED), 1);
    assert_eq!(f.count(Direction::Egress, reason::POLICY_DENIED), 3);

    let events = f.events();
    assert_eq!(events.len(), 4, "{events:#?}");
    let verdict = &events[0];
    assert_eq!(verdict.kind, EventKind::PolicyVerdict);
    assert_eq!(verdict.verdict, EventVerdict::Forwarded);
    assert_eq!(verdict.match_type, match_type::L3_L4);
    assert_eq!(
        (verdict.src_identity, verdict.dst_identity),
        (EP_IDENTITY, PEER_IDENTITY)
    );
    assert_eq!(
        (verdict.src, verdict.sport, verdict.dst, verdict.dport),
        (POD, 40000, PEER, 8080)
    );
    assert_eq!(verdict.rule_cookie, 42);
    let world_drop = &events[3];
    assert_eq!(world_drop.kind, EventKind::Drop);
    assert_eq!(world_drop.drop_reason, Some(reason::POLICY_DENIED));
    assert_eq!(world_drop.dst_identity, identity::WORLD);
}

#[test]
fn replies_of_allowed_connections_pass_and_unsolicited_packets_do_not() {
    let mut f = fixture(true, true);
    f.insert(allow(Direction::Egress, PEER_IDENTITY, proto::TCP, 8080));
    let syn_ack = packet::tcp(
        (PEER, 8080),
        (POD, 40000),
        packet::TCP_SYN | packet::TCP_ACK,
    );
    assert_eq!(
        f.receive(&syn_ack),
        TC_ACT_SHOT,
        "unsolicited before the connection"
    );
    assert_eq!(f.send(&syn((POD, 40000), (PEER, 8080))), TC_ACT_OK);
    assert_eq!(f.receive(&syn_ack), TC_ACT_OK, "reply passes via conntrack");
    assert_eq!(
        f.receive(&packet::tcp((PEER, 8081), (POD, 40000), packet::TCP_ACK)),
        TC_ACT_SHOT
    );
    assert_eq!(
        f.receive(&syn((PEER, 40000), (POD, 8080))),
        TC_ACT_SHOT,
        "peer cannot open its own"
    );

    let ct = f.datapath.conntrack().list().expect("ct list");
    let entry = ct
        .iter()
        .find(|e| e.dport == 8080 && e.sport == 40000)
        .expect("conntrack entry");
    assert_eq!(entry.direction, Direction::Egress);
    assert!(entry.seen_reply);
    assert_eq!(entry.src_identity, EP_IDENTITY);
    assert_eq!(entry.rule_cookie, 42);
    assert_eq!(entry.proxy_port, None);
}

#[test]
fn ingress_identity_allow_and_udp_reply() {
    let mut f = fixture(true, true);
    f.insert(allow(Direction::Ingress, PEER_IDENTITY, proto::UDP, 5353));
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
    assert_eq!(
        f.receive(&packet::udp((UNKNOWN, 1111), (POD, 5353), b"q")),
        TC_ACT_SHOT,
        "world"
    );
    assert_eq!(f.count(Direction::Ingress, reason::POLICY_DENIED), 2);
    let ct = f.datapath.conntrack().list().expect("ct");
    assert_eq!(ct.len(), 1, "one entry for both directions: {ct:?}");
    assert_eq!(
        ct[0].src_identity, PEER_IDENTITY,
        "ingress entries keep the source identity"
    );
    assert_eq!(
        (
            ct[0].direction,
            ct[0].src,
            ct[0].sport,
            ct[0].dst,
            ct[0].dport
        ),
        (Direction::Ingress, PEER, 1111, POD, 5353),
        "shown as opened, from the peer"
    );
    assert_eq!((ct[0].packets_fwd, ct[0].packets_rev), (1, 1));
}

#[test]
fn deny_beats_allow_regardless_of_specificity() {
    // Within one remote identity the trie's longest prefix decides, so the policy model
    // never emits an allow that a broader deny of the same identity covers (Cilium's
    // MapState does the same); what the kernel must get right is a narrower deny inside a
    // broader allow, and a deny found by the other lookup (any identity vs exact identity).
    let mut f = fixture(true, true);
    f.insert(allow(Direction::Egress, PEER_IDENTITY, proto::ANY, 0));
    f.insert(rule(
        Direction::Egress,
        PEER_IDENTITY,
        proto::TCP,
        PortMatch::Exact(8080),
        PolicyVerdict::Deny,
    ));
    assert_eq!(f.send(&syn((POD, 1), (PEER, 8080))), TC_ACT_SHOT);
    assert_eq!(f.send(&syn((POD, 2), (PEER, 8081))), TC_ACT_OK);
    assert_eq!(f.count(Direction::Egress, reason::POLICY_DENY), 1);

    // An L3-only deny of the peer (exact identity) beats an L4 allow for any peer.
    let mut f = fixture(true, true);
    f.insert(allow(Direction::Egress, identity::ANY, proto::TCP, 8080));
    f.insert(rule(
        Direction::Egress,
        PEER_IDENTITY,
        proto::ANY,
        PortMatch::Any,
        PolicyVerdict::Deny,
    ));
    assert_eq!(f.send(&syn((POD, 1), (PEER, 8080))), TC_ACT_SHOT);
    assert_eq!(
        f.send(&syn((POD, 2), (UNKNOWN, 8080))),
        TC_ACT_OK,
        "other peers keep the L4 allow"
    );
    assert_eq!(f.count(Direction::Egress, reason::POLICY_DENY), 1);

    // An L4 deny for any peer beats an L3 allow of one peer.
    let mut f = fixture(true, true);
    f.insert(allow(Direction::Egress, PEER_IDENTITY, proto::ANY, 0));
    f.insert(rule(
        Direction::Egress,
        identity::ANY,
        proto::TCP,
        PortMatch::Exact(80),
        PolicyVerdict::Deny,
    ));
    assert_eq!(
        f.send(&syn((POD, 2), (PEER, 80))),
        TC_ACT_SHOT,
        "port 80 denied for everyone"
    );
    assert_eq!(
        f.send(&syn((POD, 3), (PEER, 81))),
        TC_ACT_OK,
        "port 81 allowed by the L3 rule"
    );
    assert_eq!(
        f.send(&packet::icmp(POD, PEER, 8, 1)),
        TC_ACT_OK,
        "ping allowed by the L3 rule"
    );
    let events = f.events();
    let denied = events
        .iter()
        .find(|e| e.drop_reason == Some(reason::POLICY_DENY))
        .expect("deny event");
    assert_eq!(denied.match_type, match_type::L4_ONLY);
    let l3 = events.iter().find(|e| e.dport == 81).expect("allow event");
    assert_eq!(l3.match_type, match_type::L3_ONLY);
}

#[test]
fn redirect_beats_allow_at_equal_priority_and_deny_beats_redirect() {
    let mut f = fixture(true, true);
    // Plain L3 allow plus an any-peer redirect on 80: the redirect wins (higher precedence),
    // and with no proxy listening the packet is dropped with 178, never passed.
    f.insert(allow(Direction::Egress, PEER_IDENTITY, proto::ANY, 0));
    f.insert(rule(
        Direction::Egress,
        identity::ANY,
        proto::TCP,
        PortMatch::Exact(80),
        PolicyVerdict::Redirect(1),
    ));
    assert_eq!(f.send(&syn((POD, 10), (PEER, 80))), TC_ACT_SHOT);
    assert_eq!(f.count(Direction::Egress, reason::PROXY_LOOKUP_FAILED), 1);
    let drop = f
        .events()
        .into_iter()
        .find(|e| e.kind == EventKind::Drop)
        .expect("drop event");
    assert_eq!(drop.drop_reason, Some(reason::PROXY_LOOKUP_FAILED));
    // A deny on the same port beats the redirect.
    f.insert(rule(
        Direction::Egress,
        PEER_IDENTITY,
        proto::TCP,
        PortMatch::Exact(80),
        PolicyVerdict::Deny,
    ));
    assert_eq!(f.send(&syn((POD, 11), (PEER, 80))), TC_ACT_SHOT);
    assert_eq!(f.count(Direction::Egress, reason::POLICY_DENY), 1);
}

#[test]
fn ingress_redirect_hairpins_to_the_interface_ingress() {
    let mut f = fixture(true, true);
    f.insert(rule(
        Direction::Ingress,
        PEER_IDENTITY,
        proto::TCP,
        PortMatch::Exact(8080),
        PolicyVerdict::Redirect(1),
    ));
    assert_eq!(f.receive(&syn((PEER, 5000), (POD, 8080))), TC_ACT_REDIRECT);
    let ct = f.datapath.conntrack().list().expect("ct");
    assert_eq!(ct[0].proxy_port, Some(1));
    let event = f.events().pop().expect("verdict event");
    assert_eq!(event.verdict, EventVerdict::Redirected);
    assert_eq!(event.proxy_port, Some(1));
    // The hairpinned packet, now carrying the to-proxy mark, finds no proxy socket: 178.
    let marked = f
        .datapath
        .test_run_with_mark(
            names::PROG_FROM_ENDPOINT,
            &syn((PEER, 5000), (POD, 8080)),
            mark::to_proxy(1),
        )
        .expect("run");
    assert_eq!(marked, TC_ACT_SHOT);
    assert_eq!(f.count(Direction::Egress, reason::PROXY_LOOKUP_FAILED), 1);
}

#[test]
fn packets_from_the_proxy_carry_the_original_identity() {
    let mut f = fixture(true, true);
    f.insert(allow(Direction::Ingress, PEER_IDENTITY, proto::TCP, 8080));
    // Sent by the egress proxy on behalf of PEER_IDENTITY from some other address.
    let from_proxy = mark::encode_identity(mark::MAGIC_PROXY_EGRESS, PEER_IDENTITY);
    let frame = syn((UNKNOWN, 6000), (POD, 8080));
    assert_eq!(
        f.datapath
            .test_run_with_mark(names::PROG_TO_ENDPOINT, &frame, from_proxy)
            .expect("run"),
        TC_ACT_OK
    );
    // The same packet without the mark is world: denied.
    assert_eq!(f.receive(&syn((UNKNOWN, 6001), (POD, 8080))), TC_ACT_SHOT);
    // On behalf of another identity: denied.
    let other = mark::encode_identity(mark::MAGIC_PROXY_EGRESS, 3000);
    assert_eq!(
        f.datapath
            .test_run_with_mark(
                names::PROG_TO_ENDPOINT,
                &syn((UNKNOWN, 6002), (POD, 8080)),
                other
            )
            .expect("run"),
        TC_ACT_SHOT
    );
    // The ingress proxy already enforced this endpoint's ingress policy at L7.
    let ingress_proxy = mark::encode_identity(mark::MAGIC_PROXY_INGRESS, 3000);
    assert_eq!(
        f.datapath
            .test_run_with_mark(
                names::PROG_TO_ENDPOINT,
                &syn((UNKNOWN, 6003), (POD, 9999)),
                ingress_proxy
            )
            .expect("run"),
        TC_ACT_OK
    );
}

#[test]
fn port_ranges_are_prefixes() {
    let mut f = fixture(true, true);
    // 8080-8083 is one 14-bit prefix.
    f.insert(rule(
        Direction::Egress,
        PEER_IDENTITY,
        proto::TCP,
        PortMatch::Prefix {
            port: 8080,
            len: 14,
        },
        PolicyVerdict::Allow,
    ));
    for (port, expected) in [
        (8079, TC_ACT_SHOT),
        (8080, TC_ACT_OK),
        (8083, TC_ACT_OK),
        (8084, TC_ACT_SHOT),
    ] {
        assert_eq!(
            f.send(&syn((POD, port), (PEER, port))),
            expected,
            "port {port}"
        );
    }
    let listed = f.datapath.policy().list().expect("list");
    assert_eq!(listed[0].ports.range(), (8080, 8083));
}

#[test]
fn cidr_and_world_identities() {
    let mut f = fixture(true, true);
    f.insert(allow(Direction::Egress, CIDR_IDENTITY, proto::TCP, 443));
    f.insert(allow(Direction::Egress, identity::WORLD, proto::UDP, 53));
    assert_eq!(
        f.send(&syn((POD, 1), (DOC_NET_HOST, 443))),
        TC_ACT_OK,
        "198.51.100.0/24 identity"
    );
    assert_eq!(
        f.send(&syn((POD, 2), (UNKNOWN, 443))),
        TC_ACT_SHOT,
        "not in the CIDR"
    );
    assert_eq!(
        f.send(&packet::udp((POD, 3), (UNKNOWN, 53), b"q")),
        TC_ACT_OK,
        "world"
    );
    assert_eq!(
        f.send(&packet::udp((POD, 4), (PEER, 53), b"q")),
        TC_ACT_SHOT,
        "a cluster identity is not world"
    );
}

#[test]
fn icmp_type_is_the_port_and_echo_replies_pass() {
    let mut f = fixture(true, true);
    f.insert(allow(Direction::Egress, PEER_IDENTITY, proto::ICMP, 8));
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
        "type 13 not allowed"
    );
}

#[test]
fn removing_the_entry_stops_new_connections() {
    let mut f = fixture(true, true);
    let r = allow(Direction::Egress, PEER_IDENTITY, proto::TCP, 8080);
    f.insert(r);
    assert_eq!(f.send(&syn((POD, 40000), (PEER, 8080))), TC_ACT_OK);
    f.datapath.policy().remove(&r).expect("remove rule");
    assert_eq!(f.send(&syn((POD, 40001), (PEER, 8080))), TC_ACT_SHOT);
    assert!(f.datapath.policy().list().expect("list").is_empty());
}

#[test]
fn unenforced_directions_pass_trace_and_still_track() {
    let mut f = fixture(false, true);
    assert_eq!(f.receive(&syn((PEER, 5555), (POD, 22))), TC_ACT_OK);
    assert_eq!(
        f.send(&packet::tcp(
            (POD, 22),
            (PEER, 5555),
            packet::TCP_SYN | packet::TCP_ACK
        )),
        TC_ACT_OK
    );
    assert_eq!(f.send(&syn((POD, 22), (PEER, 5556))), TC_ACT_SHOT);
    let events = f.events();
    assert_eq!(
        events[0].kind,
        EventKind::Trace,
        "no policy applied: a trace, not a verdict"
    );
}

#[test]
fn explicit_drop_reasons() {
    let mut f = fixture(true, true);
    f.insert(allow(Direction::Egress, identity::ANY, proto::ANY, 0));
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
    let short = packet::Ipv4Frame {
        src: POD,
        dst: PEER,
        protocol: 6,
        frag: 0,
        payload: vec![0; 2],
    };
    assert_eq!(f.send(&short.build()), TC_ACT_SHOT);
    assert_eq!(f.count(Direction::Egress, reason::CT_INVALID_HDR), 1);
    assert_eq!(f.send(&packet::ethertype(0x86dd, 60)), TC_ACT_SHOT);
    assert_eq!(f.count(Direction::Egress, reason::UNSUPPORTED_L3), 1);
    assert_eq!(f.send(&packet::ethertype(0x0806, 28)), TC_ACT_OK);
    let mut bogus = packet::udp((POD, 1), (PEER, 2), b"x");
    bogus[14] = 0x65;
    assert_eq!(f.send(&bogus), TC_ACT_SHOT);
    assert_eq!(f.count(Direction::Egress, reason::INVALID_PACKET), 1);
    // Redirect for a protocol the proxy does not serve.
    f.insert(rule(
        Direction::Egress,
        identity::ANY,
        proto::SCTP,
        PortMatch::Any,
        PolicyVerdict::Redirect(1),
    ));
    let sctp = packet::Ipv4Frame {
        src: POD,
        dst: PEER,
        protocol: 132,
        frag: 0,
        payload: vec![0; 12],
    };
    assert_eq!(f.send(&sctp.build()), TC_ACT_SHOT);
    assert_eq!(
        f.count(Direction::Egress, reason::PROXY_UNSUPPORTED_PROTO),
        1
    );
}

#[test]
fn unknown_interface_is_dropped_not_passed() {
    require_root();
    let pins = PinGuard::new();
    let mut datapath = Datapath::load(pins.path(), MapSizes::default()).expect("load");
    let frame = syn((POD, 1), (PEER, 2));
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
fn bad_entries_are_rejected_with_a_reason() {
    let mut f = fixture(true, true);
    let err = f
        .datapath
        .policy()
        .insert(&allow(Direction::Egress, 0, proto::ANY, 80))
        .unwrap_err();
    assert!(err.to_string().contains("given with protocol ANY"), "{err}");
    let err = "10.0.0.1/24".parse::<Ipv4Prefix>().unwrap_err();
    assert!(
        err.to_string().contains("did you mean 10.0.0.0/24"),
        "{err}"
    );
    let err = f
        .datapath
        .policy()
        .insert(&allow(Direction::Egress, 0, proto::ICMP, 300))
        .unwrap_err();
    assert!(err.to_string().contains("ICMP type 300"), "{err}");
    let bad_prefix = rule(
        Direction::Egress,
        0,
        proto::TCP,
        PortMatch::Prefix {
            port: 8081,
            len: 14,
        },
        PolicyVerdict::Allow,
    );
    let err = f.datapath.policy().insert(&bad_prefix).unwrap_err();
    assert!(err.to_string().contains("did you mean 8080/14"), "{err}");
}

#[test]
fn pinned_maps_of_another_abi_are_refused() {
    require_root();
    let pins = PinGuard::new();
    drop(Datapath::load(pins.path(), MapSizes::default()).expect("first load"));
    // Reloading the same build reuses the pins.
    let mut again = Datapath::load(pins.path(), MapSizes::default()).expect("reload");
    again
        .ipcache()
        .upsert(Ipv4Prefix::host(PEER), 5)
        .expect("maps usable");
    drop(again);
    // Pins from a build without the ABI map (or another version) are refused, by name.
    std::fs::remove_file(pins.path().join(names::MAP_ABI)).expect("remove abi pin");
    let err = Datapath::load(pins.path(), MapSizes::default())
        .err()
        .expect("refused");
    let message = err.to_string();
    assert!(
        message.contains("ABI version unknown") && message.contains(names::MAP_POLICY),
        "{message}"
    );
}

#[test]
fn established_connections_see_policy_and_identity_changes() {
    let mut f = fixture(true, true);
    let r = allow(Direction::Egress, PEER_IDENTITY, proto::TCP, 8080);
    f.insert(r);
    let ack = packet::tcp((POD, 40000), (PEER, 8080), packet::TCP_ACK);
    assert_eq!(f.send(&syn((POD, 40000), (PEER, 8080))), TC_ACT_OK);
    assert_eq!(f.send(&ack), TC_ACT_OK, "established, verdict cached");
    // Deleting the entry revokes the established connection's forward packets too.
    f.datapath.policy().remove(&r).expect("remove");
    assert_eq!(
        f.send(&ack),
        TC_ACT_SHOT,
        "the cached verdict is stale after a policy change"
    );
    // Re-allowed, then the peer's IP moves to another identity: the ipcache change
    // invalidates the cached verdict as well.
    f.insert(r);
    assert_eq!(f.send(&ack), TC_ACT_OK);
    f.datapath
        .ipcache()
        .upsert(Ipv4Prefix::host(PEER), 4242)
        .expect("ipcache");
    assert_eq!(
        f.send(&ack),
        TC_ACT_SHOT,
        "the peer is no longer the allowed identity"
    );
    // Switching enforcement off (an endpoint change) lets it through again.
    f.datapath
        .endpoints()
        .upsert(EndpointEntry {
            ifindex: LO_IFINDEX,
            endpoint_id: EP,
            identity: EP_IDENTITY,
            enforce_ingress: true,
            enforce_egress: false,
        })
        .expect("endpoint");
    assert_eq!(f.send(&ack), TC_ACT_OK);
}
