//! Per-packet service translation in the tc programs, for traffic socket LB did not see
//! (reference `services-lb.md` §1.6; Cilium's `lb4_local`). On only while
//! `lb_config_flags::PER_PACKET` is set; a packet that socket LB already translated carries
//! a backend address and matches no service, so both may run.
//!
//! - [`xlate_fwd`] at `from_endpoint`, before conntrack and policy (so policy judges the
//!   backend): a TCP/UDP packet to a service frontend gets a backend — the one its flow
//!   already has (`mb_lb4_nat`, forward entry) while that backend exists (a terminating or
//!   quarantined backend keeps its flows; a new TCP SYN chooses again), else a new choice:
//!   Maglev over the service's table when it has one, else a random active slot. No active
//!   backend ⇒ drop 158. The forward and reverse entries are written, then the destination
//!   address and port are rewritten with incremental checksum updates.
//! - [`xlate_rev`] at `to_endpoint`, after policy passed the packet: a reply from a
//!   translated flow's backend gets the service as its source again.
//!
//! *Not yet*: session affinity per packet, NodePort/ExternalIP from outside the node (an
//! uplink program with SNAT/DSR), ICMP errors for translated flows, IPv6.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::bpf_get_prandom_u32,
    macros::map,
    maps::LruHashMap,
    programs::TcContext,
};
use membrane_common::{
    Lb4Nat, Lb4NatKey, Lb4ServiceKey, MAGLEV_TABLE_SIZE, lb_algorithm, lb_config_flags, lb_nat_dir,
    lb_scope, proto, reason,
};

use crate::{
    ETH_HLEN, Flow,
    sock::{LB4_MAGLEV, config, get_backend, get_service, slot_backend},
};

#[map(name = "mb_lb4_nat")]
static LB4_NAT: LruHashMap<Lb4NatKey, Lb4Nat> = LruHashMap::pinned(65536, 0);

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// Offsets in the IPv4 header.
const IP_CSUM: usize = ETH_HLEN + 10;
const IP_SADDR: usize = ETH_HLEN + 12;
const IP_DADDR: usize = ETH_HLEN + 16;

#[inline(always)]
pub(crate) fn enabled() -> bool {
    config().flags & lb_config_flags::PER_PACKET != 0
}

/// A flow hash for Maglev (murmur3's finalizer over the tuple): the same flow always
/// lands on the same table entry, on every node.
#[inline(always)]
fn flow_hash(flow: &Flow) -> u32 {
    let mut h = flow.saddr_be ^ flow.daddr_be.rotate_left(16);
    h ^= (u32::from(flow.sport_be) << 16) | u32::from(flow.dport_be);
    h ^= u32::from(flow.protocol) << 24;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// Which end of the packet [`rewrite`] changes.
#[derive(Clone, Copy)]
enum Side {
    Source,
    Destination,
}

/// Rewrites the address (IPv4 header + pseudo-header) and port of one side of the packet,
/// fixing both checksums incrementally.
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    flow: &Flow,
    side: Side,
    new_addr: u32,
    new_port: u16,
) -> Result<(), u8> {
    let (addr_off, old_addr, port_off, old_port) = match side {
        Side::Source => (IP_SADDR, flow.saddr_be, flow.l4_off, flow.sport_be),
        Side::Destination => (IP_DADDR, flow.daddr_be, flow.l4_off + 2, flow.dport_be),
    };
    let (csum_off, mangled) = match flow.protocol {
        proto::TCP => (flow.l4_off + 16, 0),
        // A zero UDP checksum means "none" and must stay zero.
        _ => (flow.l4_off + 6, u64::from(BPF_F_MARK_MANGLED_0)),
    };
    let failed = |_| reason::SERVICE_NAT_FAILED;
    ctx.l4_csum_replace(
        csum_off,
        u64::from(old_addr),
        u64::from(new_addr),
        u64::from(BPF_F_PSEUDO_HDR) | mangled | 4,
    )
    .map_err(failed)?;
    ctx.l4_csum_replace(
        csum_off,
        u64::from(old_port),
        u64::from(new_port),
        mangled | 2,
    )
    .map_err(failed)?;
    ctx.l3_csum_replace(IP_CSUM, u64::from(old_addr), u64::from(new_addr), 4)
        .map_err(failed)?;
    ctx.store(addr_off, &new_addr, 0).map_err(failed)?;
    ctx.store(port_off, &new_port, 0).map_err(failed)?;
    Ok(())
}

/// Service → backend for a packet leaving an endpoint; updates `flow` to the backend.
#[inline(always)]
pub(crate) fn xlate_fwd(ctx: &TcContext, flow: &mut Flow) -> Result<(), u8> {
    if flow.protocol != proto::TCP && flow.protocol != proto::UDP {
        return Ok(());
    }
    let Some(svc) = get_service(&Lb4ServiceKey {
        addr_be: flow.daddr_be,
        port_be: flow.dport_be,
        protocol: flow.protocol,
        scope: lb_scope::EXTERNAL,
    }) else {
        return Ok(());
    };
    let fwd_key = Lb4NatKey {
        saddr_be: flow.saddr_be,
        daddr_be: flow.daddr_be,
        sport_be: flow.sport_be,
        dport_be: flow.dport_be,
        protocol: flow.protocol,
        direction: lb_nat_dir::FORWARD,
        _pad: 0,
    };
    let new_syn = flow.protocol == proto::TCP && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    // SAFETY: copied out at once.
    let existing = LB4_NAT.get_ptr(fwd_key).map(|p| unsafe { *p });
    let kept = match existing {
        Some(e) if e.service_id == svc.service_id && !new_syn => {
            get_backend(e.backend_id).map(|b| (e.backend_id, b))
        }
        _ => None,
    };
    let (_, backend) = match kept {
        Some(found) => found,
        None => {
            if svc.count == 0 {
                return Err(reason::NO_SERVICE);
            }
            let id = if svc.algorithm == lb_algorithm::MAGLEV {
                // Range reduction by multiply-shift (< M by construction) rather than `%`:
                // LLVM lowers a constant modulo to arithmetic the verifier cannot bound.
                let index =
                    ((u64::from(flow_hash(flow)) * MAGLEV_TABLE_SIZE as u64) >> 32) as usize;
                // Through the stack: otherwise LLVM folds `>> 32` into the `<< 2` of the
                // element offset (`>> 30 & !3`), whose bound the verifier gets too loose.
                // SAFETY: reading a local.
                let index = unsafe { core::ptr::read_volatile(&index) };
                // SAFETY: pointer to the map value, read at once; `get` bounds the index.
                LB4_MAGLEV
                    .get_ptr(svc.service_id)
                    .and_then(|t| unsafe { (*t).backend_ids.get(index).copied() })
            } else {
                // SAFETY: helper without arguments.
                let slot = unsafe { bpf_get_prandom_u32() } % u32::from(svc.count) + 1;
                slot_backend(svc.service_id, slot)
            };
            let Some(id) = id else {
                return Err(reason::NO_SERVICE);
            };
            let Some(backend) = get_backend(id) else {
                return Err(reason::NO_SERVICE);
            };
            let rev_key = Lb4NatKey {
                saddr_be: backend.addr_be,
                daddr_be: flow.saddr_be,
                sport_be: backend.port_be,
                dport_be: flow.sport_be,
                protocol: flow.protocol,
                direction: lb_nat_dir::REVERSE,
                _pad: 0,
            };
            let rev = Lb4Nat {
                addr_be: flow.daddr_be,
                port_be: flow.dport_be,
                _pad: 0,
                backend_id: id,
                service_id: svc.service_id,
            };
            let fwd = Lb4Nat {
                addr_be: backend.addr_be,
                port_be: backend.port_be,
                _pad: 0,
                backend_id: id,
                service_id: svc.service_id,
            };
            // Reverse first: a reply must never find a forward entry without it.
            if LB4_NAT.insert(rev_key, rev, 0).is_err() || LB4_NAT.insert(fwd_key, fwd, 0).is_err()
            {
                return Err(reason::SERVICE_NAT_FAILED);
            }
            (id, backend)
        }
    };
    rewrite(
        ctx,
        flow,
        Side::Destination,
        backend.addr_be,
        backend.port_be,
    )?;
    flow.daddr_be = backend.addr_be;
    flow.dport_be = backend.port_be;
    flow.policy_port_be = backend.port_be;
    Ok(())
}

/// Backend → service for a reply entering an endpoint.
#[inline(always)]
pub(crate) fn xlate_rev(ctx: &TcContext, flow: &Flow) -> Result<(), u8> {
    if flow.protocol != proto::TCP && flow.protocol != proto::UDP {
        return Ok(());
    }
    let key = Lb4NatKey {
        saddr_be: flow.saddr_be,
        daddr_be: flow.daddr_be,
        sport_be: flow.sport_be,
        dport_be: flow.dport_be,
        protocol: flow.protocol,
        direction: lb_nat_dir::REVERSE,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    let Some(rev) = LB4_NAT.get_ptr(key).map(|p| unsafe { *p }) else {
        return Ok(());
    };
    rewrite(ctx, flow, Side::Source, rev.addr_be, rev.port_be)
}
