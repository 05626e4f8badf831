//! membrane's kernel programs: tc classifiers on the host-side veth of every endpoint.
//!
//! `from_endpoint` runs on the tc ingress hook of the host-side veth (packets the pod sends:
//! the endpoint's *egress* policy); `to_endpoint` runs on its tc egress hook (packets delivered
//! to the pod: the endpoint's *ingress* policy). Both share one body, [`try_policy`]:
//!
//! 1. endpoint lookup by ifindex (unknown interface ⇒ drop 152, never pass);
//! 2. IPv4 parse (ARP passes; other L3 and IPv4 fragments are dropped while enforcing);
//! 3. conntrack: a packet whose reversed tuple opened a live connection at this endpoint is a
//!    reply and skips policy (Cilium: CT_REPLY skips policy);
//! 4. otherwise the allow-list (LPM trie on the remote address, exact protocol and port, then
//!    any-port, then any-protocol) decides; no match ⇒ drop 133;
//! 5. an allowed packet creates or refreshes the conntrack entry; failure ⇒ drop 155.
//!
//! Every outcome is counted per CPU by (direction, reason). Nothing is turned into "allow" on
//! an error path: each error maps to an explicit drop reason.
//!
//! Depends only on `aya-ebpf` and the ABI crate `membrane-common`.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map},
    maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::TcContext,
};
use membrane_common::{
    CtEntry, CtKeyV4, Direction, EndpointInfo, METRICS_SLOTS, MetricsValue, PolicyKeyV4,
    PolicyValue, ct_flags, ct_timeout, endpoint_flags, metrics_index, policy_action, proto, reason,
};

// Map names must equal `membrane_common::names::*`; a datapath test checks the built object.
// Sizes are defaults; the loader may override max_entries.

#[map(name = "mb_endpoints")]
static ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::pinned(1024, 0);

#[map(name = "mb_policy_v4")]
static POLICY_V4: LpmTrie<PolicyKeyV4, PolicyValue> = LpmTrie::pinned(16384, 0);

#[map(name = "mb_ct_v4")]
static CT_V4: LruHashMap<CtKeyV4, CtEntry> = LruHashMap::pinned(65536, 0);

#[map(name = "mb_metrics")]
static METRICS: PerCpuArray<MetricsValue> = PerCpuArray::pinned(METRICS_SLOTS, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const IP_MF_AND_OFFSET: u16 = 0x3fff;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const NS_PER_SEC: u64 = 1_000_000_000;

#[classifier]
pub fn from_endpoint(ctx: TcContext) -> i32 {
    handle(&ctx, Direction::Egress)
}

#[classifier]
pub fn to_endpoint(ctx: TcContext) -> i32 {
    handle(&ctx, Direction::Ingress)
}

#[inline(always)]
fn handle(ctx: &TcContext, direction: Direction) -> i32 {
    let verdict = match try_policy(ctx, direction) {
        Ok(()) => reason::FORWARDED,
        Err(drop_reason) => drop_reason,
    };
    count(direction, verdict, ctx.len());
    if verdict == reason::FORWARDED {
        TC_ACT_OK
    } else {
        TC_ACT_SHOT
    }
}

#[inline(always)]
fn count(direction: Direction, verdict: u8, len: u32) {
    if let Some(slot) = METRICS.get_ptr_mut(metrics_index(direction, verdict)) {
        // SAFETY: per-CPU slot pointer from the map; no other CPU writes this copy and the
        // program is not preempted while it runs.
        unsafe {
            (*slot).packets += 1;
            (*slot).bytes += u64::from(len);
        }
    }
}

/// The parsed fields policy and conntrack need.
struct Flow {
    saddr_be: u32,
    daddr_be: u32,
    /// Conntrack ports (for ICMP echo: the identifier on the requester's side).
    sport_be: u16,
    dport_be: u16,
    /// Port used for the policy lookup (for ICMP: the type, Cilium's convention).
    policy_port_be: u16,
    protocol: u8,
    tcp_flags: u8,
}

#[inline(always)]
fn try_policy(ctx: &TcContext, direction: Direction) -> Result<(), u8> {
    // SAFETY: `skb` is the context pointer the kernel passed to this program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: the value is copied out immediately; a concurrent update can at worst give a
    // mix of old and new flags, both of which are valid configurations.
    let endpoint = match unsafe { ENDPOINTS.get(ifindex) } {
        Some(ep) => *ep,
        None => return Err(reason::NO_ENDPOINT),
    };
    let enforce_bit = match direction {
        Direction::Ingress => endpoint_flags::ENFORCE_INGRESS,
        Direction::Egress => endpoint_flags::ENFORCE_EGRESS,
    };
    let enforce = endpoint.flags & enforce_bit != 0;

    let eth_proto = u16::from_be(ctx.load::<u16>(12).map_err(|_| reason::INVALID_PACKET)?);
    match eth_proto {
        ETH_P_IP => {}
        // Neighbour resolution must work for any policy; ARP carries no L3/L4 policy subject.
        ETH_P_ARP => return Ok(()),
        _ if enforce => return Err(reason::UNSUPPORTED_L3),
        _ => return Ok(()),
    }

    let flow = match parse_ipv4(ctx) {
        Ok(flow) => flow,
        Err(r) if enforce => return Err(r),
        // Not enforcing: the packet is not ours to judge even if we cannot parse it.
        Err(_) => return Ok(()),
    };

    let now = unsafe { bpf_ktime_get_ns() };
    let forward_key = CtKeyV4 {
        saddr_be: flow.saddr_be,
        daddr_be: flow.daddr_be,
        sport_be: flow.sport_be,
        dport_be: flow.dport_be,
        endpoint_id: endpoint.endpoint_id,
        protocol: flow.protocol,
        direction: direction as u8,
        _pad: 0,
    };
    let reply_key = CtKeyV4 {
        saddr_be: flow.daddr_be,
        daddr_be: flow.saddr_be,
        sport_be: flow.dport_be,
        dport_be: flow.sport_be,
        endpoint_id: endpoint.endpoint_id,
        protocol: flow.protocol,
        direction: match direction {
            Direction::Ingress => Direction::Egress as u8,
            Direction::Egress => Direction::Ingress as u8,
        },
        _pad: 0,
    };

    // Replies of a live connection skip policy.
    if let Some(entry) = CT_V4.get_ptr_mut(reply_key) {
        // SAFETY: pointer into the map value; concurrent updates of counters may race, which
        // only makes statistics approximate.
        let entry = unsafe { &mut *entry };
        if !expired(entry, now, flow.protocol) {
            entry.last_seen_ns = now;
            entry.packets_rev += 1;
            entry.flags |= ct_flags::SEEN_REPLY | closing_bits(&flow);
            return Ok(());
        }
    }

    let rule_cookie = if enforce {
        let remote = match direction {
            Direction::Ingress => flow.saddr_be,
            Direction::Egress => flow.daddr_be,
        };
        match lookup_policy(endpoint.endpoint_id, direction, &flow, remote) {
            Some(value) if value.action == policy_action::ALLOW => value.rule_cookie,
            _ => return Err(reason::POLICY_DENIED),
        }
    } else {
        0
    };

    if let Some(entry) = CT_V4.get_ptr_mut(forward_key) {
        // SAFETY: as above.
        let entry = unsafe { &mut *entry };
        let reopened = flow.protocol == proto::TCP
            && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
            && entry.flags & ct_flags::CLOSING != 0;
        if !expired(entry, now, flow.protocol) && !reopened {
            entry.last_seen_ns = now;
            entry.packets_fwd += 1;
            entry.flags |= closing_bits(&flow);
            return Ok(());
        }
    }
    let entry = CtEntry {
        created_ns: now,
        last_seen_ns: now,
        packets_fwd: 1,
        packets_rev: 0,
        flags: closing_bits(&flow),
        rule_cookie,
    };
    CT_V4
        .insert(forward_key, entry, 0)
        .map_err(|_| reason::CT_CREATE_FAILED)
}

#[inline(always)]
fn closing_bits(flow: &Flow) -> u32 {
    if flow.protocol == proto::TCP && flow.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        ct_flags::CLOSING
    } else {
        0
    }
}

#[inline(always)]
fn expired(entry: &CtEntry, now: u64, protocol: u8) -> bool {
    let lifetime_secs = if entry.flags & ct_flags::CLOSING != 0 {
        ct_timeout::CLOSING_SECS
    } else if protocol == proto::TCP {
        ct_timeout::TCP_SECS
    } else {
        ct_timeout::NON_TCP_SECS
    };
    now.saturating_sub(entry.last_seen_ns) > lifetime_secs * NS_PER_SEC
}

/// Exact port, then any port of the protocol, then any protocol; each on the longest
/// matching remote prefix.
#[inline(always)]
fn lookup_policy(
    endpoint_id: u32,
    direction: Direction,
    flow: &Flow,
    remote_ip4_be: u32,
) -> Option<PolicyValue> {
    let candidates = [
        (flow.protocol, flow.policy_port_be),
        (flow.protocol, 0),
        (proto::ANY, 0),
    ];
    for (protocol, dport_be) in candidates {
        let key = Key::new(
            PolicyKeyV4::FULL_BITS,
            PolicyKeyV4 {
                endpoint_id,
                direction: direction as u8,
                protocol,
                dport_be,
                remote_ip4_be,
            },
        );
        if let Some(value) = POLICY_V4.get(&key) {
            return Some(*value);
        }
    }
    None
}

#[inline(always)]
fn parse_ipv4(ctx: &TcContext) -> Result<Flow, u8> {
    let version_ihl: u8 = ctx.load(ETH_HLEN).map_err(|_| reason::INVALID_PACKET)?;
    if version_ihl >> 4 != 4 {
        return Err(reason::INVALID_PACKET);
    }
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    if ihl < 20 {
        return Err(reason::INVALID_PACKET);
    }
    let frag: u16 = ctx.load(ETH_HLEN + 6).map_err(|_| reason::INVALID_PACKET)?;
    if u16::from_be(frag) & IP_MF_AND_OFFSET != 0 {
        return Err(reason::FRAG_NOT_SUPPORTED);
    }
    let protocol: u8 = ctx.load(ETH_HLEN + 9).map_err(|_| reason::INVALID_PACKET)?;
    let saddr_be: u32 = ctx
        .load(ETH_HLEN + 12)
        .map_err(|_| reason::INVALID_PACKET)?;
    let daddr_be: u32 = ctx
        .load(ETH_HLEN + 16)
        .map_err(|_| reason::INVALID_PACKET)?;
    let l4 = ETH_HLEN + ihl;

    let mut flow = Flow {
        saddr_be,
        daddr_be,
        sport_be: 0,
        dport_be: 0,
        policy_port_be: 0,
        protocol,
        tcp_flags: 0,
    };
    match protocol {
        proto::TCP | proto::UDP | proto::SCTP => {
            flow.sport_be = ctx.load(l4).map_err(|_| reason::CT_INVALID_HDR)?;
            flow.dport_be = ctx.load(l4 + 2).map_err(|_| reason::CT_INVALID_HDR)?;
            flow.policy_port_be = flow.dport_be;
            if protocol == proto::TCP {
                flow.tcp_flags = ctx.load(l4 + 13).map_err(|_| reason::CT_INVALID_HDR)?;
            }
        }
        proto::ICMP => {
            let icmp_type: u8 = ctx.load(l4).map_err(|_| reason::CT_INVALID_HDR)?;
            flow.policy_port_be = u16::from(icmp_type).to_be();
            if icmp_type == ICMP_ECHO_REQUEST || icmp_type == ICMP_ECHO_REPLY {
                let id: u16 = ctx.load(l4 + 4).map_err(|_| reason::CT_INVALID_HDR)?;
                if icmp_type == ICMP_ECHO_REQUEST {
                    flow.sport_be = id;
                } else {
                    flow.dport_be = id;
                }
            }
        }
        // Other protocols: no ports; only an any-port entry for the protocol (or an
        // any-protocol entry) can allow them.
        _ => {}
    }
    Ok(flow)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path, so this is never executed.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
