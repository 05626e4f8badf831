//! Two nodes in one test: node namespaces joined by an underlay veth, each with its own
//! datapath (pins of its own) and pods, routed to each other natively or through the VXLAN
//! tunnel (`membrane_datapath::routing`). The maps are written by the test, as an agent
//! would from the cluster store; what is checked is the kernel's part:
//!
//! - tunnel: the receiving node enforces with the identity the VNI carried, not with what
//!   its ipcache says about the source address; a tunnel packet from an outer source that is
//!   no known node is dropped (172); a destination without a tunnel endpoint is dropped (160);
//!   bulk data crosses with the MTU accounted for;
//! - native: the receiving node enforces with its ipcache's identity of the source.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use membrane_common::{Direction, identity, proto, reason};
use membrane_datapath::{
    IpcacheInfo, Ipv4Prefix, PolicyRule, PolicyVerdict, PortMatch,
    routing::{self, NodeRoute, RoutingMode},
};
use membrane_tests::{
    TestNode, TestPod,
    net::{Exchange, tcp_echo_server, tcp_exchange, tcp_stream_server},
};

const UNDERLAY_1: Ipv4Addr = Ipv4Addr::new(10, 199, 0, 1);
const UNDERLAY_2: Ipv4Addr = Ipv4Addr::new(10, 199, 0, 2);
const ROUTER_1: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const ROUTER_2: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 1);
const A_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
const C_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 30);
const B_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 20);
const ID_FRONTEND: u32 = 1000;
const ID_BACKEND: u32 = 2000;
const ID_OTHER: u32 = 3000;
const UNDERLAY_IFNAME: &str = "underlay";
const UNDERLAY_MTU: u32 = 1500;
const EXPECT_REPLY: Duration = Duration::from_secs(5);
const EXPECT_DROP: Duration = Duration::from_millis(800);

fn prefix(s: &str) -> Ipv4Prefix {
    s.parse().expect("prefix")
}

struct TwoNodes {
    n1: TestNode,
    n2: TestNode,
    a: TestPod,
    c: TestPod,
    b: TestPod,
}

/// Node 1 (pods a: frontend, c: other) and node 2 (pod b: backend, ingress enforced: only
/// frontend on 8080), routed by `mode`. Every map entry an agent would write from the store
/// is written here, with `a_seen_by_n2` as node 2's ipcache identity of a's address.
fn two_nodes(mode: RoutingMode, a_seen_by_n2: u32) -> TwoNodes {
    let mut n1 = TestNode::new();
    let mut n2 = TestNode::new();
    // The underlay: one veth between the node namespaces (both ends go with them).
    let n2_name = n2.node_netns().name().to_owned();
    n1.node_netns()
        .ip(&[
            "link",
            "add",
            UNDERLAY_IFNAME,
            "type",
            "veth",
            "peer",
            "name",
            UNDERLAY_IFNAME,
            "netns",
            &n2_name,
        ])
        .expect("underlay veth");
    for (node, ip) in [(&n1, UNDERLAY_1), (&n2, UNDERLAY_2)] {
        let ns = node.node_netns();
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", UNDERLAY_IFNAME])
            .expect("underlay address");
        ns.ip(&["link", "set", UNDERLAY_IFNAME, "up"])
            .expect("underlay up");
    }

    let a = n1.add_pod("xa", A_IP, ID_FRONTEND, false, true);
    let c = n1.add_pod("xc", C_IP, ID_OTHER, false, false);
    let b = n2.add_pod("xb", B_IP, ID_BACKEND, true, false);
    n1.datapath()
        .policy()
        .insert(&allow(&a, Direction::Egress, ID_BACKEND, 8080))
        .expect("a egress");
    n2.datapath()
        .policy()
        .insert(&allow(&b, Direction::Ingress, ID_FRONTEND, 8080))
        .expect("b ingress");

    let tunnel = mode == RoutingMode::Tunnel;
    let tunnel_mtu = UNDERLAY_MTU - routing::TUNNEL_OVERHEAD;
    for (node, router, own_underlay, peer_underlay, peer_cidr) in [
        (&mut n1, ROUTER_1, UNDERLAY_1, UNDERLAY_2, "10.200.1.0/24"),
        (&mut n2, ROUTER_2, UNDERLAY_2, UNDERLAY_1, "10.200.0.0/24"),
    ] {
        let ns = node.node_netns().clone();
        if tunnel {
            routing::ensure_tunnel_device(&ns, router, UNDERLAY_MTU).expect("tunnel device");
            node.datapath()
                .attach_tunnel(&ns, routing::TUNNEL_IFNAME)
                .expect("attach tunnel programs");
        }
        let route = NodeRoute {
            pod_cidr: prefix(peer_cidr),
            underlay_ip: peer_underlay,
        };
        routing::sync_routes(&ns, mode, &[route], tunnel_mtu, router).expect("routes");
        let endpoint = tunnel.then_some(peer_underlay);
        let ipcache = node.datapath().ipcache();
        for (p, identity, tunnel_endpoint) in [
            (Ipv4Prefix::host(own_underlay), identity::HOST, None),
            (Ipv4Prefix::host(router), identity::HOST, None),
            (Ipv4Prefix::host(peer_underlay), identity::REMOTE_NODE, None),
            (prefix(peer_cidr), identity::WORLD, endpoint),
        ] {
            ipcache
                .upsert_info(
                    p,
                    IpcacheInfo {
                        identity,
                        tunnel_endpoint,
                    },
                )
                .expect("ipcache");
        }
    }
    let info = |identity| IpcacheInfo {
        identity,
        tunnel_endpoint: tunnel.then_some(UNDERLAY_1),
    };
    for (ip, id) in [(A_IP, a_seen_by_n2), (C_IP, ID_OTHER)] {
        n2.datapath()
            .ipcache()
            .upsert_info(Ipv4Prefix::host(ip), info(id))
            .expect("n2 ipcache");
    }
    n1.datapath()
        .ipcache()
        .upsert_info(
            Ipv4Prefix::host(B_IP),
            IpcacheInfo {
                identity: ID_BACKEND,
                tunnel_endpoint: tunnel.then_some(UNDERLAY_2),
            },
        )
        .expect("n1 ipcache");
    if tunnel {
        // Pods see the tunnel's MTU (as Cilium gives them the route MTU).
        for pod in [&a, &c] {
            pod.netns
                .ip(&["link", "set", "eth0", "mtu", &tunnel_mtu.to_string()])
                .expect("pod mtu");
        }
    }
    TwoNodes { n1, n2, a, c, b }
}

fn allow(pod: &TestPod, direction: Direction, remote: u32, port: u16) -> PolicyRule {
    PolicyRule::new(
        pod.endpoint_id,
        direction,
        remote,
        proto::TCP,
        PortMatch::Exact(port),
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
fn tunnel_enforces_with_the_identity_in_the_vni() {
    // Node 2's ipcache says a's address is "other" (denied): only the VNI can let it in.
    let mut t = two_nodes(RoutingMode::Tunnel, ID_OTHER);
    let _server = tcp_echo_server(&t.b.netns, any(8080));
    let ok = tcp_exchange(&t.a.netns, at(B_IP, 8080), b"hello", EXPECT_REPLY);
    assert!(
        ok.is_reply(b"echo:hello"),
        "frontend (node 1) -> backend (node 2) over the tunnel, got {ok:?}"
    );
    // The other pod's VNI says "other": denied at node 2's ingress.
    assert_eq!(
        tcp_exchange(&t.c.netns, at(B_IP, 8080), b"hi", EXPECT_DROP),
        Exchange::TimedOut,
        "identity {ID_OTHER} is not allowed into backend"
    );
    let denied =
        t.n2.datapath()
            .metrics()
            .get(Direction::Ingress, reason::POLICY_DENIED)
            .expect("metrics");
    assert!(denied.packets >= 1, "node 2 counted the denial");
    let forwarded =
        t.n1.datapath()
            .metrics()
            .get(Direction::Egress, reason::FORWARDED)
            .expect("metrics");
    assert!(forwarded.packets >= 1);

    // Bulk data (more than a window of full-size segments) crosses: MTU accounted for.
    let _bulk = tcp_stream_server(&t.b.netns, any(8081), 4, 64 * 1024, Duration::ZERO);
    t.n2.datapath()
        .policy()
        .insert(&allow(&t.b, Direction::Ingress, ID_FRONTEND, 8081))
        .expect("b ingress 8081");
    t.n1.datapath()
        .policy()
        .insert(&allow(&t.a, Direction::Egress, ID_BACKEND, 8081))
        .expect("a egress 8081");
    match tcp_exchange(&t.a.netns, at(B_IP, 8081), b"go", EXPECT_REPLY) {
        Exchange::Reply(data) => assert_eq!(data.len(), 4 * 64 * 1024, "all of it arrived"),
        other => panic!("bulk transfer over the tunnel: {other:?}"),
    }
}

#[test]
fn tunnel_drops_unknown_senders_and_unknown_destinations() {
    let mut t = two_nodes(RoutingMode::Tunnel, ID_FRONTEND);
    let _server = tcp_echo_server(&t.b.netns, any(8080));
    let ok = tcp_exchange(&t.a.netns, at(B_IP, 8080), b"hello", EXPECT_REPLY);
    assert!(ok.is_reply(b"echo:hello"), "baseline, got {ok:?}");

    // Node 2 forgets that node 1 is a node: its tunnel packets are refused.
    t.n2.datapath()
        .ipcache()
        .remove(Ipv4Prefix::host(UNDERLAY_1))
        .expect("forget node 1");
    assert_eq!(
        tcp_exchange(&t.a.netns, at(B_IP, 8080), b"again", EXPECT_DROP),
        Exchange::TimedOut
    );
    let unknown =
        t.n2.datapath()
            .metrics()
            .get(Direction::Ingress, reason::UNKNOWN_SENDER)
            .expect("metrics");
    assert!(unknown.packets >= 1, "dropped as from an unknown sender");

    // Node 1 loses every tunnel endpoint for backend: nothing leaves for it.
    t.n1.datapath()
        .ipcache()
        .remove(Ipv4Prefix::host(B_IP))
        .expect("forget b");
    t.n1.datapath()
        .ipcache()
        .remove(prefix("10.200.1.0/24"))
        .expect("forget node 2's pod CIDR");
    // (From c, which enforces nothing: a's own egress policy would stop it first, now that
    // backend's address is world to node 1.)
    let _ = tcp_exchange(&t.c.netns, at(B_IP, 8080), b"lost", EXPECT_DROP);
    let no_endpoint =
        t.n1.datapath()
            .metrics()
            .get(Direction::Egress, reason::NO_TUNNEL_ENDPOINT)
            .expect("metrics");
    assert!(
        no_endpoint.packets >= 1,
        "dropped for want of a tunnel endpoint"
    );
}

#[test]
fn native_routing_enforces_with_the_ipcache_identity() {
    let t = two_nodes(RoutingMode::Native, ID_FRONTEND);
    let _server = tcp_echo_server(&t.b.netns, any(8080));
    let ok = tcp_exchange(&t.a.netns, at(B_IP, 8080), b"hello", EXPECT_REPLY);
    assert!(
        ok.is_reply(b"echo:hello"),
        "frontend (node 1) -> backend (node 2), native, got {ok:?}"
    );
    assert_eq!(
        tcp_exchange(&t.c.netns, at(B_IP, 8080), b"hi", EXPECT_DROP),
        Exchange::TimedOut
    );
    drop(t);

    // The same with node 2 believing a's address is "other": denied (no VNI to say else).
    let t = two_nodes(RoutingMode::Native, ID_OTHER);
    let _server = tcp_echo_server(&t.b.netns, any(8080));
    assert_eq!(
        tcp_exchange(&t.a.netns, at(B_IP, 8080), b"hello", EXPECT_DROP),
        Exchange::TimedOut,
        "native routing takes the source identity from the receiving node's ipcache"
    );
}

#[test]
fn routes_of_ours_are_synced_and_only_ours_removed() {
    let t = two_nodes(RoutingMode::Native, ID_FRONTEND);
    let ns = t.n1.node_netns();
    // A route someone else owns stays.
    ns.ip(&[
        "route",
        "add",
        "10.250.0.0/24",
        "via",
        &UNDERLAY_2.to_string(),
    ])
    .expect("foreign route");
    let want = [
        NodeRoute {
            pod_cidr: prefix("10.200.1.0/24"),
            underlay_ip: UNDERLAY_2,
        },
        NodeRoute {
            pod_cidr: prefix("10.200.2.0/24"),
            underlay_ip: UNDERLAY_2,
        },
    ];
    routing::sync_routes(ns, RoutingMode::Native, &want, 1450, ROUTER_1).expect("sync");
    let mut have = routing::installed_routes(ns).expect("list");
    have.sort();
    assert_eq!(have, [prefix("10.200.1.0/24"), prefix("10.200.2.0/24")]);
    routing::sync_routes(ns, RoutingMode::Native, &want[1..], 1450, ROUTER_1).expect("sync");
    assert_eq!(
        routing::installed_routes(ns).expect("list"),
        [prefix("10.200.2.0/24")]
    );
    let all = ns.ip(&["-4", "route", "show"]).expect("routes");
    assert!(all.contains("10.250.0.0/24"), "foreign route kept: {all}");
    assert_eq!(
        routing::route_device(ns, Ipv4Addr::new(10, 200, 2, 5)).expect("route get"),
        UNDERLAY_IFNAME
    );
}
