//! membrane's kernel programs: tc classifiers on the host-side veth of every endpoint.
//!
//! `from_endpoint` runs on the tc ingress hook of the host-side veth (packets the pod sends:
//! the endpoint's *egress* policy); `to_endpoint` runs on its tc egress hook (packets delivered
//! to the pod: the endpoint's *ingress* policy). Both share one body, [`try_policy`]:
//!
//! 1. endpoint lookup by ifindex (unknown interface ⇒ drop 152, never pass);
//! 2. parse: ARP passes; other L3 and IPv4 fragments are dropped while enforcing;
//! 3. conntrack: one lookup of the connection as the endpoint sees it (its own address and
//!    port first, whichever way the packet goes); a live entry opened in the other direction
//!    makes the packet a reply, which skips policy (Cilium: CT_REPLY skips policy);
//! 4. identities: the endpoint's own from `mb_endpoints`; the peer's cached in the conntrack
//!    entry while its verdict is current, else from the ipcache (LPM, unknown ⇒ world) or
//!    from the mark of a packet the proxy sent;
//! 5. policy (skipped while an established connection's cached verdict is current): exact
//!    remote identity and any identity, each an LPM lookup over protocol and port; higher
//!    precedence wins, then the longer L4 prefix, then the exact identity. Deny ⇒ drop 181,
//!    no entry ⇒ drop 133, a proxy port ⇒ redirect;
//! 6. conntrack create/refresh (failure ⇒ drop 155), a flow event for new connections and
//!    every drop, per-CPU counters by (direction, reason).
//!
//! The established path stores only what changed, so a connection's entry stays read-mostly
//! (its two directions usually run on different CPUs): the packet counter, the time at most
//! once per second (`ct_timeout::REFRESH_NS`), flags when a bit is new, the cached verdict
//! when the revision moved.
//!
//! Redirect (egress): mark `0x0200 | port << 16`, then `bpf_sk_assign` to the proxy's socket
//! (the established one for this tuple, else the listener on the proxy port); the node's
//! policy-routing rule for that mark delivers the packet locally. No socket ⇒ drop 178. Never
//! bypass. Redirect (ingress, at `to_endpoint` where `bpf_sk_assign` is not available): the
//! packet is marked and hairpinned with `bpf_redirect(.., BPF_F_INGRESS)` to the same veth's
//! ingress, where `from_endpoint` recognises the mark and assigns the socket. Pods cannot
//! forge that mark: crossing from the pod's namespace scrubs it.
//!
//! Packets that arrived through the tunnel carry the sender's identity in the mark
//! (`MAGIC_IDENTITY`, set by [`tunnel`]'s `from_tunnel`): `to_endpoint` takes it as the
//! peer's identity instead of the ipcache's. Pods cannot forge it either.
//!
//! Socket load balancing (cgroup programs) lives in [`sock`]; the per-packet service
//! translation ([`lb`], off unless configured) runs before conntrack at `from_endpoint`
//! (policy judges the backend) and after policy at `to_endpoint` (replies get the service
//! address back).
//!
//! Depends only on `aya-ebpf` and the ABI crate `membrane-common`.
#![no_std]
#![no_main]

mod lb;
mod sock;
mod tunnel;

use aya_ebpf::{
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_F_INGRESS, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP,
        BPF_RB_NO_WAKEUP, TC_ACT_OK, TC_ACT_SHOT, bpf_sock, bpf_sock_tuple,
    },
    helpers::{
        bpf_ktime_get_coarse_ns, bpf_ktime_get_ns, bpf_redirect, bpf_sk_assign, bpf_sk_lookup_udp,
        bpf_sk_release, bpf_skc_lookup_tcp,
    },
    macros::{classifier, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::TcContext,
};
use membrane_common::{
    CtEntry, CtKeyV4, Direction, EVENTS_WAKEUP_BYTES, EVENTS_WAKEUP_NS, EndpointInfo, FlowEvent,
    IpcacheKeyV4, IpcacheValue, METRICS_EVENTS_LOST, METRICS_SLOTS, MetricsValue, PolicyEntry,
    PolicyKey, ct_flags, ct_timeout, endpoint_flags, event_kind, identity, mark, match_type,
    metrics_index, policy_flags, proto, reason, verdict,
};

// Map names must equal `membrane_common::names::*`; a datapath test checks the built object.
// Sizes are defaults; the loader overrides max_entries from its configuration.

#[map(name = "mb_abi")]
static ABI: Array<u32> = Array::pinned(1, 0);

#[map(name = "mb_revision")]
static REVISION: Array<u32> = Array::pinned(1, 0);

#[map(name = "mb_endpoints")]
static ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::pinned(1024, 0);

#[map(name = "mb_ipcache_v4")]
static IPCACHE_V4: LpmTrie<IpcacheKeyV4, IpcacheValue> = LpmTrie::pinned(512_000, 0);

#[map(name = "mb_policy")]
static POLICY: LpmTrie<PolicyKey, PolicyEntry> = LpmTrie::pinned(16384, 0);

#[map(name = "mb_ct_v4")]
static CT_V4: LruHashMap<CtKeyV4, CtEntry> = LruHashMap::pinned(65536, 0);

#[map(name = "mb_metrics")]
static METRICS: PerCpuArray<MetricsValue> = PerCpuArray::pinned(METRICS_SLOTS, 0);

#[map(name = "mb_events")]
static EVENTS: RingBuf = RingBuf::pinned(1 << 20, 0);

#[map(name = "mb_events_wakeup")]
static EVENTS_WAKEUP: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

const ETH_HLEN: usize = 14;
/// `skb->pkt_type` for frames addressed to this host.
const PACKET_HOST: u32 = 0;
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
const TCP_LISTEN: u32 = 10;
const TCP_TIME_WAIT: u32 = 6;
/// 127.0.0.1 in network order: where the proxy's listeners are looked up (they bind
/// 0.0.0.0 or 127.0.0.1 with IP_TRANSPARENT).
const LOCALHOST_BE: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

#[classifier]
pub fn from_endpoint(ctx: TcContext) -> i32 {
    handle(&ctx, Direction::Egress)
}

#[classifier]
pub fn to_endpoint(ctx: TcContext) -> i32 {
    handle(&ctx, Direction::Ingress)
}

/// What to do with the packet once policy passed it.
enum Action {
    /// Continue on the normal path.
    Pass,
    /// `bpf_redirect` already set up the redirect: return its verdict.
    Redirect(i32),
}

#[inline(always)]
fn handle(ctx: &TcContext, direction: Direction) -> i32 {
    match try_policy(ctx, direction) {
        Ok(Action::Pass) => {
            // Replies of per-packet translated flows get the service address back, after
            // conntrack and policy saw the backend.
            if direction == Direction::Ingress
                && lb::enabled()
                && let Ok(flow) = parse_ipv4(ctx)
                && let Err(drop_reason) = lb::xlate_rev(ctx, &flow)
            {
                count(direction, drop_reason, ctx.len());
                return TC_ACT_SHOT;
            }
            count(direction, reason::FORWARDED, ctx.len());
            TC_ACT_OK
        }
        Ok(Action::Redirect(verdict)) => {
            count(direction, reason::FORWARDED, ctx.len());
            verdict
        }
        Err(drop_reason) => {
            count(direction, drop_reason, ctx.len());
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn bump(slot: u32, len: u32) {
    if let Some(value) = METRICS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot pointer from the map; no other CPU writes this copy and the
        // program is not preempted while it runs.
        unsafe {
            (*value).packets += 1;
            (*value).bytes += u64::from(len);
        }
    }
}

#[inline(always)]
fn count(direction: Direction, verdict: u8, len: u32) {
    bump(metrics_index(direction, verdict), len);
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
    /// Offset of the L4 header in the frame.
    l4_off: usize,
}

/// Everything an event needs besides the flow.
struct Verdict {
    kind: u8,
    verdict: u8,
    reason: u8,
    match_type: u8,
    cookie: u32,
    proxy_port_be: u16,
}

/// Where a verdict is taken: the packet, its endpoint and the peer's identity.
struct Site<'a> {
    ctx: &'a TcContext,
    ep: EndpointInfo,
    direction: Direction,
    flow: &'a Flow,
    peer: u32,
}

#[inline(always)]
fn emit(site: &Site<'_>, v: &Verdict) {
    let Site {
        ctx,
        ep,
        direction,
        flow,
        peer,
    } = *site;
    let (src_identity, dst_identity) = match direction {
        Direction::Egress => (ep.identity, peer),
        Direction::Ingress => (peer, ep.identity),
    };
    // Reserved in the ring and written in place: no stack copy for `bpf_ringbuf_output`
    // to copy again.
    // SAFETY: helper without preconditions.
    let timestamp_ns = unsafe { bpf_ktime_get_ns() };
    // Decided before the reservation: keeps the reservation's lifetime short (the verifier
    // tracks it as a reference).
    let wakeup = wakeup_flag(timestamp_ns);
    let Some(mut slot) = EVENTS.reserve::<FlowEvent>(0) else {
        bump(METRICS_EVENTS_LOST, 0);
        return;
    };
    slot.write(FlowEvent {
        timestamp_ns,
        kind: v.kind,
        verdict: v.verdict,
        reason: v.reason,
        direction: direction as u8,
        match_type: v.match_type,
        protocol: flow.protocol,
        tcp_flags: flow.tcp_flags,
        _pad0: 0,
        endpoint_id: ep.endpoint_id,
        src_identity,
        dst_identity,
        saddr_be: flow.saddr_be,
        daddr_be: flow.daddr_be,
        sport_be: flow.sport_be,
        dport_be: flow.policy_port_be,
        proxy_port_be: v.proxy_port_be,
        _pad1: 0,
        rule_cookie: v.cookie,
        // SAFETY: `skb` is the context pointer the kernel passed to this program.
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        len: ctx.len(),
    });
    slot.submit(wakeup);
}

/// A [`FlowEvent`] in the ring: its 8-byte record header and the event.
const EVENT_RECORD_BYTES: u64 = 8 + core::mem::size_of::<FlowEvent>() as u64;

/// Whether this event wakes the ring buffer's reader (`EVENTS_WAKEUP_NS`,
/// `EVENTS_WAKEUP_BYTES`).
#[inline(always)]
fn wakeup_flag(now_ns: u64) -> u64 {
    let Some(last) = EVENTS_WAKEUP.get_ptr_mut(0) else {
        // Unreachable (index 0 of a one-entry array); wake as the kernel would by default.
        return 0;
    };
    // SAFETY: this CPU's slot; the program is not preempted while it runs.
    let last = unsafe { &mut *last };
    // Only the event that crosses the threshold: while the reader is behind (or absent)
    // every further one would pay a wakeup again.
    let pending = EVENTS.query(u64::from(BPF_RB_AVAIL_DATA));
    if now_ns.wrapping_sub(*last) >= EVENTS_WAKEUP_NS
        || (pending < EVENTS_WAKEUP_BYTES && pending + EVENT_RECORD_BYTES >= EVENTS_WAKEUP_BYTES)
    {
        *last = now_ns;
        u64::from(BPF_RB_FORCE_WAKEUP)
    } else {
        u64::from(BPF_RB_NO_WAKEUP)
    }
}

#[inline(always)]
fn drop_with(site: &Site<'_>, drop_reason: u8, matched: u8, cookie: u32) -> Result<Action, u8> {
    emit(
        site,
        &Verdict {
            kind: event_kind::DROP,
            verdict: verdict::DROPPED,
            reason: drop_reason,
            match_type: matched,
            cookie,
            proxy_port_be: 0,
        },
    );
    Err(drop_reason)
}

#[inline(always)]
fn try_policy(ctx: &TcContext, direction: Direction) -> Result<Action, u8> {
    // SAFETY: `skb` is the context pointer the kernel passed to this program.
    let (ifindex, skb_mark) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).mark) };
    let endpoint = match ENDPOINTS.get_ptr(ifindex) {
        // SAFETY: copied out at once; a concurrent update can at worst mix old and new
        // fields of one endpoint, each a valid configuration.
        Some(ep) => unsafe { *ep },
        None => return Err(reason::NO_ENDPOINT),
    };
    let enforce_bit = match direction {
        Direction::Ingress => endpoint_flags::ENFORCE_INGRESS,
        Direction::Egress => endpoint_flags::ENFORCE_EGRESS,
    };
    let enforce = endpoint.flags & enforce_bit != 0;

    let eth_proto = u16::from_be(read::<u16>(ctx, 12).map_err(|_| reason::INVALID_PACKET)?);
    match eth_proto {
        ETH_P_IP => {}
        // Neighbour resolution must work for any policy; ARP carries no L3/L4 policy subject.
        ETH_P_ARP => return Ok(Action::Pass),
        _ if enforce => return Err(reason::UNSUPPORTED_L3),
        _ => return Ok(Action::Pass),
    }

    let mut flow = match parse_ipv4(ctx) {
        Ok(flow) => flow,
        Err(r) if enforce => return Err(r),
        // Not enforcing: the packet is not ours to judge even if we cannot parse it.
        Err(_) => return Ok(Action::Pass),
    };

    let magic = skb_mark & mark::MAGIC_MASK;
    // A packet hairpinned by `to_endpoint` for an ingress redirect: its policy verdict is
    // already taken; hand it to the proxy socket named in the mark.
    if direction == Direction::Egress && magic == mark::MAGIC_TO_PROXY {
        let port = (skb_mark >> 16) as u16;
        // The frame still carries the pod's MAC as destination (it was on its way out to
        // the pod), so the stack would see it as meant for another host and drop it before
        // routing. Mark it as ours.
        if ctx.change_type(PACKET_HOST).is_err() {
            let site = Site {
                ctx,
                ep: endpoint,
                direction: Direction::Ingress,
                flow: &flow,
                peer: identity::WORLD,
            };
            return drop_with(&site, reason::PROXY_SET_FAILED, match_type::NONE, 0);
        }
        return match assign_proxy_socket(ctx, &flow, port.to_be()) {
            Ok(()) => Ok(Action::Pass),
            Err(r) => {
                let site = Site {
                    ctx,
                    ep: endpoint,
                    direction: Direction::Ingress,
                    flow: &flow,
                    peer: identity::WORLD,
                };
                drop_with(&site, r, match_type::NONE, 0)
            }
        };
    }
    let from_proxy = direction == Direction::Ingress
        && (magic == mark::MAGIC_PROXY_EGRESS || magic == mark::MAGIC_PROXY_INGRESS);

    // Per-packet service translation: before conntrack and policy, which see the backend.
    if direction == Direction::Egress
        && lb::enabled()
        && let Err(r) = lb::xlate_fwd(ctx, &mut flow)
    {
        let site = Site {
            ctx,
            ep: endpoint,
            direction,
            flow: &flow,
            peer: identity::WORLD,
        };
        return drop_with(&site, r, match_type::NONE, 0);
    }

    // Conntrack ages in seconds: the coarse clock (jiffies resolution) is cheaper per packet.
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // The connection as this endpoint sees it, the same for both directions.
    let (local_addr_be, remote_addr_be, local_port_be, remote_port_be) = match direction {
        Direction::Egress => (flow.saddr_be, flow.daddr_be, flow.sport_be, flow.dport_be),
        Direction::Ingress => (flow.daddr_be, flow.saddr_be, flow.dport_be, flow.sport_be),
    };
    let ct_key = CtKeyV4 {
        local_addr_be,
        remote_addr_be,
        local_port_be,
        remote_port_be,
        endpoint_id: endpoint.endpoint_id,
        protocol: flow.protocol,
        _pad: [0; 3],
    };

    let existing = match CT_V4.get_ptr_mut(ct_key) {
        Some(entry) => {
            // SAFETY: pointer into the map value; concurrent counter updates may race, which
            // only makes statistics approximate.
            let entry = unsafe { &mut *entry };
            if expired(entry, now, flow.protocol) {
                // Replaced below like any new connection (or, if policy drops this packet,
                // left to be replaced or evicted later).
                None
            } else if entry.direction != direction as u8 {
                // Replies of a live connection skip policy.
                touch(entry, now, ct_flags::SEEN_REPLY | closing_bits(&flow));
                entry.packets_rev += 1;
                return Ok(Action::Pass);
            } else if flow.protocol == proto::TCP
                && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
                && entry.flags & ct_flags::CLOSING != 0
            {
                // A new connection on the tuple of a closing one.
                None
            } else {
                Some(entry)
            }
        }
        None => None,
    };
    let is_new = existing.is_none();

    // The ingress proxy already enforced this endpoint's ingress policy at L7.
    let enforced = enforce && !(from_proxy && magic == mark::MAGIC_PROXY_INGRESS);
    let revision = REVISION.get(0).copied().unwrap_or(0);
    // An established connection whose verdict was computed at the current revision of
    // policy, ipcache and endpoints keeps it, and the peer identity it was computed with:
    // any change to those bumps the revision and sends the next packet through the lookups
    // again (deletions take effect at once). Without enforcement there is no verdict to
    // reuse, and the stored identity serves only events, which established connections do
    // not emit (bar a failed redirect, whose drop event may then carry an identity older
    // than the last revision).
    let current = match &existing {
        Some(entry) if !enforced || entry.policy_rev == revision => Some((
            entry.remote_identity,
            entry.rule_cookie,
            entry.proxy_port_be,
        )),
        _ => None,
    };

    let peer = match current {
        Some((remote, _, _)) => remote,
        // The proxy speaks for the original source; the mark carries its identity.
        None if from_proxy => mark::decode_identity(skb_mark),
        // Arrived through the tunnel: the identity the sending node put in the VNI.
        None if direction == Direction::Ingress && magic == mark::MAGIC_IDENTITY => {
            mark::decode_identity(skb_mark)
        }
        None => lookup_identity(match direction {
            Direction::Egress => flow.daddr_be,
            Direction::Ingress => flow.saddr_be,
        }),
    };
    let site = Site {
        ctx,
        ep: endpoint,
        direction,
        flow: &flow,
        peer,
    };

    // Policy.
    let mut cookie = 0;
    let mut matched = match_type::NONE;
    let mut proxy_port_be = 0u16;
    if enforced {
        match current {
            Some((_, c, p)) => {
                cookie = c;
                if !from_proxy {
                    proxy_port_be = p;
                }
            }
            None => match lookup_policy(endpoint.endpoint_id, peer, direction, &flow) {
                Some((entry, exact)) => {
                    matched = classify_match(exact, entry.l4_prefix_len);
                    cookie = entry.cookie;
                    if entry.flags & policy_flags::DENY != 0 {
                        return drop_with(&site, reason::POLICY_DENY, matched, cookie);
                    }
                    // Packets the proxy sends are never sent back to it.
                    if !from_proxy {
                        proxy_port_be = entry.proxy_port_be;
                    }
                }
                None => {
                    return drop_with(&site, reason::POLICY_DENIED, matched, 0);
                }
            },
        }
    }

    let redirect_flag = if proxy_port_be != 0 {
        ct_flags::PROXY_REDIRECT
    } else {
        0
    };
    match existing {
        Some(entry) => {
            touch(entry, now, closing_bits(&flow));
            entry.packets_fwd += 1;
            // Written only when recomputed: a current entry stays read-mostly.
            if entry.policy_rev != revision {
                entry.policy_rev = revision;
                entry.rule_cookie = cookie;
                entry.proxy_port_be = proxy_port_be;
                entry.remote_identity = peer;
                entry.flags = (entry.flags & !ct_flags::PROXY_REDIRECT) | redirect_flag;
            }
        }
        None => {
            let entry = CtEntry {
                created_ns: now,
                last_seen_ns: now,
                packets_fwd: 1,
                packets_rev: 0,
                flags: closing_bits(&flow) | redirect_flag,
                rule_cookie: cookie,
                src_identity: match direction {
                    Direction::Egress => endpoint.identity,
                    Direction::Ingress => peer,
                },
                proxy_port_be,
                direction: direction as u8,
                _pad: 0,
                policy_rev: revision,
                remote_identity: peer,
            };
            if CT_V4.insert(ct_key, entry, 0).is_err() {
                return drop_with(&site, reason::CT_CREATE_FAILED, matched, cookie);
            }
        }
    }

    if proxy_port_be != 0 {
        if flow.protocol != proto::TCP && flow.protocol != proto::UDP {
            return drop_with(&site, reason::PROXY_UNSUPPORTED_PROTO, matched, cookie);
        }
        let action = match direction {
            Direction::Egress => {
                assign_proxy_socket(ctx, &flow, proxy_port_be).map(|()| Action::Pass)
            }
            Direction::Ingress => {
                // No bpf_sk_assign on the tc egress hook: hairpin to this veth's ingress,
                // where from_endpoint assigns the socket named by the mark.
                ctx.skb
                    .set_mark(mark::to_proxy(u16::from_be(proxy_port_be)));
                // SAFETY: helper without memory arguments.
                let rc = unsafe { bpf_redirect(ifindex, u64::from(BPF_F_INGRESS)) };
                Ok(Action::Redirect(rc as i32))
            }
        };
        return match action {
            Ok(action) => {
                if is_new {
                    emit(
                        &site,
                        &Verdict {
                            kind: event_kind::POLICY_VERDICT,
                            verdict: verdict::REDIRECTED,
                            reason: 0,
                            match_type: matched,
                            cookie,
                            proxy_port_be,
                        },
                    );
                }
                Ok(action)
            }
            Err(r) => drop_with(&site, r, matched, cookie),
        };
    }

    if is_new {
        emit(
            &site,
            &Verdict {
                kind: if enforced {
                    event_kind::POLICY_VERDICT
                } else {
                    event_kind::TRACE
                },
                verdict: verdict::FORWARDED,
                reason: 0,
                match_type: matched,
                cookie,
                proxy_port_be: 0,
            },
        );
    }
    Ok(Action::Pass)
}

/// Identity of a remote address: most specific ipcache prefix, else world.
#[inline(always)]
fn lookup_identity(addr_be: u32) -> u32 {
    match lookup_ipcache(addr_be) {
        Some(value) => value.identity,
        None => identity::WORLD,
    }
}

/// The most specific ipcache entry covering an address.
#[inline(always)]
fn lookup_ipcache(addr_be: u32) -> Option<IpcacheValue> {
    let key = Key::new(32, IpcacheKeyV4 { ip4_be: addr_be });
    IPCACHE_V4.get(&key).copied()
}

#[inline(always)]
fn classify_match(exact_identity: bool, l4_prefix_len: u8) -> u8 {
    match (exact_identity, l4_prefix_len) {
        (true, 0) => match_type::L3_ONLY,
        (true, 8) => match_type::L3_PROTO,
        (true, _) => match_type::L3_L4,
        (false, 0) => match_type::ALL,
        (false, 8) => match_type::PROTO_ONLY,
        (false, _) => match_type::L4_ONLY,
    }
}

/// The winning policy entry and whether it matched the exact remote identity.
#[inline(always)]
fn lookup_policy(
    endpoint_id: u32,
    remote: u32,
    direction: Direction,
    flow: &Flow,
) -> Option<(PolicyEntry, bool)> {
    let key = |remote_identity| {
        Key::new(
            PolicyKey::FULL_BITS,
            PolicyKey {
                endpoint_id,
                remote_identity,
                direction: direction as u8,
                protocol: flow.protocol,
                dport_be: flow.policy_port_be,
            },
        )
    };
    let exact = POLICY.get(key(remote)).copied();
    let any = if remote == identity::ANY {
        None
    } else {
        POLICY.get(key(identity::ANY)).copied()
    };
    match (exact, any) {
        (Some(e), Some(a)) => {
            let any_wins = a.precedence > e.precedence
                || (a.precedence == e.precedence && a.l4_prefix_len > e.l4_prefix_len);
            Some(if any_wins { (a, false) } else { (e, true) })
        }
        (Some(e), None) => Some((e, true)),
        (None, Some(a)) => Some((a, false)),
        (None, None) => None,
    }
}

/// Assigns the packet to the proxy's socket: for TCP the established socket of this tuple
/// (an accepted transparent connection), else (and always for UDP) the proxy's listener on
/// `proxy_port_be`.
#[inline(always)]
fn assign_proxy_socket(ctx: &TcContext, flow: &Flow, proxy_port_be: u16) -> Result<(), u8> {
    let tuple_size = core::mem::size_of::<u32>() * 2 + core::mem::size_of::<u16>() * 2;
    // SAFETY: zeroed is a valid bpf_sock_tuple; the ipv4 member is written before use.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    tuple.__bindgen_anon_1.ipv4.saddr = flow.saddr_be;
    tuple.__bindgen_anon_1.ipv4.daddr = flow.daddr_be;
    tuple.__bindgen_anon_1.ipv4.sport = flow.sport_be;
    tuple.__bindgen_anon_1.ipv4.dport = flow.dport_be;
    let skb = ctx.skb.skb.cast();
    let netns = BPF_F_CURRENT_NETNS as u64;
    let is_tcp = flow.protocol == proto::TCP;
    let lookup = |tuple: &mut bpf_sock_tuple| -> *mut bpf_sock {
        // SAFETY: `skb` is the program's context, `tuple` is a valid IPv4 tuple of
        // `tuple_size` bytes; the returned socket is released below.
        unsafe {
            if is_tcp {
                bpf_skc_lookup_tcp(skb, tuple, tuple_size as u32, netns, 0)
            } else {
                bpf_sk_lookup_udp(skb, tuple, tuple_size as u32, netns, 0)
            }
        }
    };

    // UDP always goes to the listener: the proxy sends its UDP replies from sockets bound
    // to the original destination, which a tuple lookup would find instead.
    let mut sk = if is_tcp {
        lookup(&mut tuple)
    } else {
        core::ptr::null_mut()
    };
    if !sk.is_null() {
        // SAFETY: non-null socket returned by the lookup helper.
        let state = unsafe { (*sk).state };
        if is_tcp && (state == TCP_LISTEN || state == TCP_TIME_WAIT) {
            // SAFETY: releasing the reference the lookup took.
            unsafe { bpf_sk_release(sk.cast()) };
            sk = core::ptr::null_mut();
        }
    }
    if sk.is_null() {
        tuple.__bindgen_anon_1.ipv4.daddr = LOCALHOST_BE;
        tuple.__bindgen_anon_1.ipv4.dport = proxy_port_be;
        sk = lookup(&mut tuple);
    }
    if sk.is_null() {
        return Err(reason::PROXY_LOOKUP_FAILED);
    }
    ctx.skb
        .set_mark(mark::to_proxy(u16::from_be(proxy_port_be)));
    // SAFETY: `skb` is the context and `sk` a referenced socket from the lookup.
    let rc = unsafe { bpf_sk_assign(skb, sk.cast(), 0) };
    // SAFETY: releasing the lookup's reference; sk_assign took its own.
    unsafe { bpf_sk_release(sk.cast()) };
    if rc != 0 {
        Err(reason::PROXY_SET_FAILED)
    } else {
        Ok(())
    }
}

#[inline(always)]
fn closing_bits(flow: &Flow) -> u32 {
    if flow.protocol == proto::TCP && flow.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        ct_flags::CLOSING
    } else {
        0
    }
}

/// Marks a live entry as seen at `now` with `flags` set, storing only what changed: the
/// timestamp at most once per [`ct_timeout::REFRESH_NS`], the flags when a bit is new.
#[inline(always)]
fn touch(entry: &mut CtEntry, now: u64, flags: u32) {
    if now.wrapping_sub(entry.last_seen_ns) >= ct_timeout::REFRESH_NS {
        entry.last_seen_ns = now;
    }
    if entry.flags & flags != flags {
        entry.flags |= flags;
    }
}

/// Whether the entry outlived its lifetime. `last_seen_ns` lags by up to
/// [`ct_timeout::REFRESH_NS`], which is added here so no entry expires early.
#[inline(always)]
fn expired(entry: &CtEntry, now: u64, protocol: u8) -> bool {
    let lifetime_secs = if entry.flags & ct_flags::CLOSING != 0 {
        ct_timeout::CLOSING_SECS
    } else if protocol == proto::TCP {
        ct_timeout::TCP_SECS
    } else {
        ct_timeout::NON_TCP_SECS
    };
    now.saturating_sub(entry.last_seen_ns) > lifetime_secs * NS_PER_SEC + ct_timeout::REFRESH_NS
}

/// One byte at `offset`. Reads two bytes when they are there: for a one-byte bounds check
/// LLVM emits `pkt < pkt_end`, from which the verifier grants no range for a packet pointer
/// with a variable offset.
#[inline(always)]
fn read_u8(ctx: &TcContext, offset: usize) -> Result<u8, i64> {
    match read::<[u8; 2]>(ctx, offset) {
        Ok(pair) => Ok(pair[0]),
        Err(_) => ctx.load(offset),
    }
}

/// Reads a `T` (at least two bytes, see [`read_u8`]) at `offset`: straight from the linear
/// packet data when it is there (no helper call), else through `bpf_skb_load_bytes`
/// (non-linear skbs).
#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, offset: usize) -> Result<T, i64> {
    let start = ctx.data();
    let end = ctx.data_end();
    // Offsets here are at most ETH_HLEN + 60 + 14, which keeps the verifier's range small.
    if offset < 128 && start + offset + core::mem::size_of::<T>() <= end {
        // SAFETY: the bounds check above keeps the read inside the packet; unaligned
        // because IP headers sit at odd offsets from the start of the frame.
        Ok(unsafe { core::ptr::read_unaligned((start + offset) as *const T) })
    } else {
        ctx.load(offset)
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &TcContext) -> Result<Flow, u8> {
    let version_ihl: u8 = read_u8(ctx, ETH_HLEN).map_err(|_| reason::INVALID_PACKET)?;
    if version_ihl >> 4 != 4 {
        return Err(reason::INVALID_PACKET);
    }
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    if ihl < 20 {
        return Err(reason::INVALID_PACKET);
    }
    let frag: u16 = read(ctx, ETH_HLEN + 6).map_err(|_| reason::INVALID_PACKET)?;
    if u16::from_be(frag) & IP_MF_AND_OFFSET != 0 {
        return Err(reason::FRAG_NOT_SUPPORTED);
    }
    let protocol: u8 = read_u8(ctx, ETH_HLEN + 9).map_err(|_| reason::INVALID_PACKET)?;
    // Direct reads where the linear data holds them (no helper call per address).
    let saddr_be: u32 = read(ctx, ETH_HLEN + 12).map_err(|_| reason::INVALID_PACKET)?;
    let daddr_be: u32 = read(ctx, ETH_HLEN + 16).map_err(|_| reason::INVALID_PACKET)?;
    let l4 = ETH_HLEN + ihl;

    let mut flow = Flow {
        saddr_be,
        daddr_be,
        sport_be: 0,
        dport_be: 0,
        policy_port_be: 0,
        protocol,
        tcp_flags: 0,
        l4_off: l4,
    };
    match protocol {
        proto::TCP | proto::UDP | proto::SCTP => {
            flow.sport_be = read(ctx, l4).map_err(|_| reason::CT_INVALID_HDR)?;
            flow.dport_be = read(ctx, l4 + 2).map_err(|_| reason::CT_INVALID_HDR)?;
            flow.policy_port_be = flow.dport_be;
            if protocol == proto::TCP {
                flow.tcp_flags = read_u8(ctx, l4 + 13).map_err(|_| reason::CT_INVALID_HDR)?;
            }
        }
        proto::ICMP => {
            let icmp_type: u8 = read_u8(ctx, l4).map_err(|_| reason::CT_INVALID_HDR)?;
            flow.policy_port_be = u16::from(icmp_type).to_be();
            if icmp_type == ICMP_ECHO_REQUEST || icmp_type == ICMP_ECHO_REPLY {
                let id: u16 = read(ctx, l4 + 4).map_err(|_| reason::CT_INVALID_HDR)?;
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
