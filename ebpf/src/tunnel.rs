//! Tunnel routing (`routingMode: tunnel`): tc programs on the node's flow-based VXLAN device.
//!
//! The node's routes send other nodes' pod CIDRs into the VXLAN device; the kernel does the
//! encapsulation, these programs supply what it cannot know:
//!
//! - `to_tunnel` (tc egress): the outer destination is the node the ipcache names for the
//!   inner destination (`tunnel_endpoint_be`; none ⇒ drop 160), and the VNI is the source's
//!   identity: from the mark for the proxy's own connections (it speaks for a pod), else the
//!   ipcache's identity of the inner source (this node's pods; the node itself goes as host
//!   and arrives as remote-node). Node-local identities (CIDR, `fqdn:`, ≥ 2^24) cannot be
//!   carried ⇒ drop 171.
//! - `from_tunnel` (tc ingress): the outer source must be a node of the cluster (its address
//!   is in the ipcache as remote-node; else drop 172: anyone who can reach UDP 8472 could
//!   otherwise claim any identity); the VNI becomes the mark (`MAGIC_IDENTITY`), which
//!   `to_endpoint` takes as the peer's identity instead of looking the source up. A remote
//!   node's host identity arrives as remote-node (a node never speaks as this one's host).
//!   The frame's destination MAC is the sender's device's, so the packet is re-typed as
//!   addressed to this host (forwarding drops other-host frames).
//!
//! Both count into the metrics map by (direction, reason): egress for `to_tunnel`, ingress
//! for `from_tunnel`; neither emits flow events (the endpoint programs on either side do).

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, bpf_tunnel_key},
    helpers::{bpf_skb_get_tunnel_key, bpf_skb_set_tunnel_key},
    macros::classifier,
    programs::TcContext,
};
use membrane_common::{Direction, identity, mark, reason};

use crate::{ETH_HLEN, ETH_P_IP, PACKET_HOST, count, lookup_ipcache, read};

/// `BPF_F_ZERO_CSUM_TX`: no outer UDP checksum (the inner packet carries its own), as the
/// kernel's own VXLAN default.
const BPF_F_ZERO_CSUM_TX: u64 = 1 << 1;
/// Outer TTL (IPDEFTTL).
const TUNNEL_TTL: u8 = 64;

#[classifier]
pub fn to_tunnel(ctx: TcContext) -> i32 {
    verdict(&ctx, Direction::Egress, try_to_tunnel(&ctx))
}

#[classifier]
pub fn from_tunnel(ctx: TcContext) -> i32 {
    verdict(&ctx, Direction::Ingress, try_from_tunnel(&ctx))
}

#[inline(always)]
fn verdict(ctx: &TcContext, direction: Direction, result: Result<(), u8>) -> i32 {
    match result {
        Ok(()) => {
            count(direction, reason::FORWARDED, ctx.len());
            TC_ACT_OK
        }
        Err(r) => {
            count(direction, r, ctx.len());
            TC_ACT_SHOT
        }
    }
}

/// The inner IPv4 source and destination (network order); `None` for anything else, which
/// the tunnel carries untouched (ARP does not reach a NOARP device; there is no IPv6).
#[inline(always)]
fn addresses(ctx: &TcContext) -> Result<Option<(u32, u32)>, u8> {
    let proto = u16::from_be(read::<u16>(ctx, 12).map_err(|_| reason::INVALID_PACKET)?);
    if proto != ETH_P_IP {
        return Ok(None);
    }
    let saddr: u32 = read(ctx, ETH_HLEN + 12).map_err(|_| reason::INVALID_PACKET)?;
    let daddr: u32 = read(ctx, ETH_HLEN + 16).map_err(|_| reason::INVALID_PACKET)?;
    Ok(Some((saddr, daddr)))
}

#[inline(always)]
fn try_to_tunnel(ctx: &TcContext) -> Result<(), u8> {
    let Some((saddr_be, daddr_be)) = addresses(ctx)? else {
        // Without a tunnel key the device has no destination: the kernel drops it.
        return Ok(());
    };
    let endpoint = match lookup_ipcache(daddr_be) {
        Some(v) if v.tunnel_endpoint_be != 0 => v.tunnel_endpoint_be,
        _ => return Err(reason::NO_TUNNEL_ENDPOINT),
    };
    // SAFETY: `skb` is the context pointer the kernel passed to this program.
    let skb_mark = unsafe { (*ctx.skb.skb).mark };
    let magic = skb_mark & mark::MAGIC_MASK;
    let source = if magic == mark::MAGIC_PROXY_EGRESS || magic == mark::MAGIC_PROXY_INGRESS {
        mark::decode_identity(skb_mark)
    } else {
        match lookup_ipcache(saddr_be) {
            Some(v) => v.identity,
            // An address of this node the ipcache does not list (the node owns every source
            // it routes here that is not a pod's).
            None => identity::HOST,
        }
    };
    if source == identity::ANY || source >= identity::LOCAL_SCOPE {
        return Err(reason::INVALID_IDENTITY);
    }
    // SAFETY: all-zero is a valid `bpf_tunnel_key` (integers and integer unions).
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = source;
    // The helper takes the address in host order.
    key.__bindgen_anon_1.remote_ipv4 = u32::from_be(endpoint);
    key.tunnel_ttl = TUNNEL_TTL;
    // SAFETY: `key` is a valid, initialised `bpf_tunnel_key` of the size passed.
    let rc = unsafe {
        bpf_skb_set_tunnel_key(
            ctx.skb.skb,
            &mut key,
            core::mem::size_of::<bpf_tunnel_key>() as u32,
            BPF_F_ZERO_CSUM_TX,
        )
    };
    if rc != 0 {
        return Err(reason::TUNNEL_KEY_FAILED);
    }
    Ok(())
}

#[inline(always)]
fn try_from_tunnel(ctx: &TcContext) -> Result<(), u8> {
    // SAFETY: all-zero is a valid `bpf_tunnel_key`.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    // SAFETY: `key` is writable memory of the size passed.
    let rc = unsafe {
        bpf_skb_get_tunnel_key(
            ctx.skb.skb,
            &mut key,
            core::mem::size_of::<bpf_tunnel_key>() as u32,
            0,
        )
    };
    if rc != 0 {
        return Err(reason::TUNNEL_KEY_FAILED);
    }
    // SAFETY: an IPv4 tunnel (the device is created without IPv6) fills `remote_ipv4`.
    let outer_source_be = u32::to_be(unsafe { key.__bindgen_anon_1.remote_ipv4 });
    match lookup_ipcache(outer_source_be) {
        Some(v) if v.identity == identity::REMOTE_NODE => {}
        _ => return Err(reason::UNKNOWN_SENDER),
    }
    let mut source = key.tunnel_id;
    if source == identity::ANY || source >= identity::LOCAL_SCOPE {
        return Err(reason::INVALID_IDENTITY);
    }
    if source == identity::HOST {
        source = identity::REMOTE_NODE;
    }
    if addresses(ctx)?.is_none() {
        return Ok(());
    }
    ctx.skb
        .set_mark(mark::encode_identity(mark::MAGIC_IDENTITY, source));
    if ctx.change_type(PACKET_HOST).is_err() {
        return Err(reason::INVALID_PACKET);
    }
    Ok(())
}
