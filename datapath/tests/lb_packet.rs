//! The per-packet service translation of the tc programs, by `BPF_PROG_TEST_RUN` on crafted
//! frames (interface: the loopback, registered as an endpoint; nothing is sent): a packet
//! to a service leaves with a backend's address and port and valid checksums, its reply
//! comes back from the service, a flow keeps its backend, a service without an active
//! backend drops with 158, Maglev picks from the table, policy judges the backend, and
//! nothing changes while the per-packet path is off.

use std::net::Ipv4Addr;

use membrane_common::{Direction, names, proto, reason};
use membrane_datapath::{
    BackendState, Datapath, EndpointEntry, Ipv4Prefix, MapSizes, PolicyRule, PolicyVerdict,
    PortMatch, ServiceBackend, ServiceFrontend, ServiceKind, ServiceScope,
};
use membrane_tests::{PinGuard, packet, require_root};

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const POD: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const BE1: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 21);
const BE2: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 22);

fn datapath(pins: &PinGuard) -> Datapath {
    require_root();
    let mut dp = Datapath::load(pins.path(), MapSizes::default()).expect("load");
    dp.endpoints()
        .upsert(EndpointEntry {
            ifindex: 1,
            endpoint_id: 7,
            identity: 1000,
            enforce_ingress: false,
            enforce_egress: false,
        })
        .expect("endpoint");
    dp
}

fn service(protocol: u8, backends: &[Ipv4Addr], maglev: bool) -> ServiceFrontend {
    let backends: Vec<ServiceBackend> = backends
        .iter()
        .map(|a| ServiceBackend {
            address: *a,
            port: 8080,
            state: BackendState::Active,
        })
        .collect();
    let table = maglev.then(|| {
        (0..membrane_common::MAGLEV_TABLE_SIZE)
            .map(|i| (i % backends.len()) as u32)
            .collect()
    });
    ServiceFrontend {
        address: VIP,
        port: 80,
        protocol,
        scope: ServiceScope::External,
        kind: ServiceKind::ClusterIp,
        two_scopes: false,
        local_only: false,
        affinity_timeout_secs: None,
        backends,
        maglev: table,
    }
}

#[test]
fn tcp_to_a_service_is_translated_both_ways() {
    let pins = PinGuard::new();
    let mut dp = datapath(&pins);
    dp.services()
        .apply(&[service(proto::TCP, &[BE1], false)])
        .expect("apply");

    // Off: untouched.
    let syn = packet::tcp((POD, 40000), (VIP, 80), packet::TCP_SYN);
    let (verdict, out) = dp
        .test_run_packet(names::PROG_FROM_ENDPOINT, &syn)
        .expect("run");
    assert_eq!((verdict, out.as_slice()), (TC_ACT_OK, syn.as_slice()));

    dp.services().set_per_packet(true).expect("per packet on");
    let (verdict, out) = dp
        .test_run_packet(names::PROG_FROM_ENDPOINT, &syn)
        .expect("run");
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        out,
        packet::tcp((POD, 40000), (BE1, 8080), packet::TCP_SYN),
        "destination rewritten to the backend, checksums valid"
    );

    let reply = packet::tcp((BE1, 8080), (POD, 40000), packet::TCP_SYN | packet::TCP_ACK);
    let (verdict, out) = dp
        .test_run_packet(names::PROG_TO_ENDPOINT, &reply)
        .expect("run");
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        out,
        packet::tcp((VIP, 80), (POD, 40000), packet::TCP_SYN | packet::TCP_ACK),
        "the reply comes from the service"
    );

    // The flow keeps its backend after a second one joins.
    dp.services()
        .apply(&[service(proto::TCP, &[BE1, BE2], false)])
        .expect("apply");
    let ack = packet::tcp((POD, 40000), (VIP, 80), packet::TCP_ACK);
    for _ in 0..8 {
        let (_, out) = dp
            .test_run_packet(names::PROG_FROM_ENDPOINT, &ack)
            .expect("run");
        assert_eq!(out, packet::tcp((POD, 40000), (BE1, 8080), packet::TCP_ACK));
    }
}

#[test]
fn udp_is_translated_and_a_service_without_backends_drops() {
    let pins = PinGuard::new();
    let mut dp = datapath(&pins);
    dp.services().set_per_packet(true).expect("per packet on");
    dp.services()
        .apply(&[service(proto::UDP, &[BE2], false)])
        .expect("apply");
    let q = packet::udp((POD, 5353), (VIP, 80), b"query");
    let (verdict, out) = dp
        .test_run_packet(names::PROG_FROM_ENDPOINT, &q)
        .expect("run");
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, packet::udp((POD, 5353), (BE2, 8080), b"query"));
    let a = packet::udp((BE2, 8080), (POD, 5353), b"answer");
    let (_, out) = dp
        .test_run_packet(names::PROG_TO_ENDPOINT, &a)
        .expect("run");
    assert_eq!(out, packet::udp((VIP, 80), (POD, 5353), b"answer"));

    dp.services()
        .apply(&[service(proto::UDP, &[], false)])
        .expect("apply");
    let q2 = packet::udp((POD, 5354), (VIP, 80), b"query");
    let (verdict, _) = dp
        .test_run_packet(names::PROG_FROM_ENDPOINT, &q2)
        .expect("run");
    assert_eq!(verdict, TC_ACT_SHOT);
    let drops = dp
        .metrics()
        .get(Direction::Egress, reason::NO_SERVICE)
        .expect("metrics");
    assert_eq!(drops.packets, 1, "counted as `Service backend not found`");
}

#[test]
fn maglev_services_pick_from_their_table() {
    let pins = PinGuard::new();
    let mut dp = datapath(&pins);
    dp.services().set_per_packet(true).expect("per packet on");
    dp.services()
        .apply(&[service(proto::TCP, &[BE1, BE2], true)])
        .expect("apply");
    let id = dp.services().list().expect("list")[0].service_id;
    assert!(dp.services().maglev_table(id).expect("table").is_some());
    let mut seen = std::collections::BTreeSet::new();
    for port in 40000..40064u16 {
        let syn = packet::tcp((POD, port), (VIP, 80), packet::TCP_SYN);
        let (_, out) = dp
            .test_run_packet(names::PROG_FROM_ENDPOINT, &syn)
            .expect("run");
        let dst = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
        assert!(dst == BE1 || dst == BE2, "{dst}");
        seen.insert(dst);
    }
    assert_eq!(seen.len(), 2, "flows spread over both backends");
}

#[test]
fn policy_judges_the_backend_not_the_service() {
    let pins = PinGuard::new();
    let mut dp = datapath(&pins);
    dp.endpoints()
        .upsert(EndpointEntry {
            ifindex: 1,
            endpoint_id: 7,
            identity: 1000,
            enforce_ingress: false,
            enforce_egress: true,
        })
        .expect("enforce egress");
    dp.ipcache()
        .upsert(Ipv4Prefix::host(BE1), 3001)
        .expect("ipcache");
    dp.ipcache()
        .upsert(Ipv4Prefix::host(BE2), 3002)
        .expect("ipcache");
    dp.services().set_per_packet(true).expect("per packet on");
    // Only BE1's identity on the backend port is allowed; nothing names the service.
    dp.policy()
        .insert(&PolicyRule::new(
            7,
            Direction::Egress,
            3001,
            proto::TCP,
            PortMatch::Exact(8080),
            PolicyVerdict::Allow,
        ))
        .expect("policy");

    dp.services()
        .apply(&[service(proto::TCP, &[BE1], false)])
        .expect("apply");
    let syn = packet::tcp((POD, 41000), (VIP, 80), packet::TCP_SYN);
    let (verdict, _) = dp
        .test_run_packet(names::PROG_FROM_ENDPOINT, &syn)
        .expect("run");
    assert_eq!(verdict, TC_ACT_OK, "allowed: the backend is BE1:8080");

    dp.services()
        .apply(&[service(proto::TCP, &[BE2], false)])
        .expect("apply");
    let syn = packet::tcp((POD, 41001), (VIP, 80), packet::TCP_SYN);
    let (verdict, _) = dp
        .test_run_packet(names::PROG_FROM_ENDPOINT, &syn)
        .expect("run");
    assert_eq!(verdict, TC_ACT_SHOT, "denied: BE2 is not allowed");
    let denied = dp
        .metrics()
        .get(Direction::Egress, reason::POLICY_DENIED)
        .expect("metrics");
    assert_eq!(denied.packets, 1);
}
