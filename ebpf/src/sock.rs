//! Socket load balancing: cgroup programs that translate a service address to a backend
//! before a packet exists (Cilium's `bpf_sock.c`, reference `services-lb.md` §1.1–1.3).
//!
//! - `sock4_connect` (`cgroup/connect4`, TCP and connected UDP) and `sock4_sendmsg`
//!   (`cgroup/sendmsg4`, each datagram of an unconnected UDP socket): frontend lookup
//!   ([`lookup_service`]: the exact frontend, else — from the host namespace only — the
//!   NodePort wildcard for the node's own or loopback addresses); ExternalIPs only when the
//!   address is the node's; no active backend ⇒ `EHOSTUNREACH`; session affinity by network
//!   namespace cookie; otherwise a random active backend (TCP: `bpf_get_prandom_u32`, UDP:
//!   the socket cookie, so one UDP socket keeps one backend). A reverse-translation entry
//!   (socket cookie, backend) → frontend is written before the address is rewritten; if
//!   it cannot be, the call fails with `ENOMEM` rather than leave a socket that would see
//!   replies from an address it never asked for.
//! - `sock4_recvmsg` (`cgroup/recvmsg4`) and `sock4_getpeername` (`cgroup/getpeername4`):
//!   the backend address the kernel reports becomes the frontend again, if the entry still
//!   names the frontend's current service id (a stale entry is removed and counted).
//! - `sock4_post_bind` (`cgroup/post_bind4`): in the host namespace, a bind that overlaps a
//!   NodePort, LoadBalancer or ExternalIP frontend fails with `EADDRINUSE`.
//! - `sock_release` (`cgroup/sock_release`): removes the reverse-translation entry of a
//!   connected socket's peer. Unconnected UDP sockets' entries stay until the LRU evicts
//!   them (*planned*: per-socket storage).
//!
//! Errors reach the caller through `bpf_set_retval` and a 0 return (`SYS_REJECT`); every
//! outcome is counted in `mb_lb_metrics` ([`sock_lb_counter`]). Not a service ⇒ the call
//! proceeds untranslated. The recvmsg/getpeername hooks must return 1 (the verifier
//! enforces it): they only ever rewrite.

use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_F_NO_PREALLOC,
    helpers::{
        bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns,
        bpf_set_retval,
    },
    macros::{cgroup_sock, cgroup_sock_addr, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, SockContext},
};
use membrane_common::{
    Lb4Affinity, Lb4AffinityKey, Lb4Backend, Lb4ReverseSk, Lb4ReverseSkKey, Lb4Service,
    Lb4ServiceKey, Lb4SlotKey, LbAffinityMatchKey, LbConfig, MaglevTable, backend_state, identity,
    lb_scope, proto, service_flags, sock_lb_counter,
};

use crate::lookup_identity;

// Names must equal `membrane_common::names::*` (checked against the built object).

#[map(name = "mb_lb4_services")]
pub(crate) static LB4_SERVICES: HashMap<Lb4ServiceKey, Lb4Service> = HashMap::pinned(65536, 0);

#[map(name = "mb_lb4_backends")]
pub(crate) static LB4_BACKENDS: HashMap<u32, Lb4Backend> = HashMap::pinned(65536, 0);

#[map(name = "mb_lb4_slots")]
pub(crate) static LB4_SLOTS: HashMap<Lb4SlotKey, u32> = HashMap::pinned(65536, 0);

/// Read by the per-packet path (*planned*); declared here so userspace can write tables and
/// the ABI test sees it. Not preallocated: 64 KiB per table, only for services that use one.
#[map(name = "mb_lb4_maglev")]
pub(crate) static LB4_MAGLEV: HashMap<u32, MaglevTable> = HashMap::pinned(1024, BPF_F_NO_PREALLOC);

#[map(name = "mb_lb4_reverse_sk")]
static LB4_REVERSE_SK: LruHashMap<Lb4ReverseSkKey, Lb4ReverseSk> = LruHashMap::pinned(65536, 0);

#[map(name = "mb_lb4_affinity")]
static LB4_AFFINITY: LruHashMap<Lb4AffinityKey, Lb4Affinity> = LruHashMap::pinned(65536, 0);

#[map(name = "mb_lb_affinity_match")]
static LB_AFFINITY_MATCH: HashMap<LbAffinityMatchKey, u32> = HashMap::pinned(65536, 0);

#[map(name = "mb_lb_config")]
pub(crate) static LB_CONFIG: Array<LbConfig> = Array::pinned(1, 0);

#[map(name = "mb_lb_metrics")]
static LB_METRICS: PerCpuArray<u64> = PerCpuArray::pinned(sock_lb_counter::SLOTS, 0);

/// Return values of cgroup socket hooks.
const SYS_PROCEED: i32 = 1;
const SYS_REJECT: i32 = 0;
const EHOSTUNREACH: i32 = 113;
const ENOMEM: i32 = 12;
const EADDRINUSE: i32 = 98;
const AF_INET: u32 = 2;
const NS_PER_SEC: u64 = 1_000_000_000;

#[inline(always)]
fn count(slot: u32) {
    if let Some(value) = LB_METRICS.get_ptr_mut(slot) {
        // SAFETY: this CPU's copy of the slot; the program is not preempted while it runs.
        unsafe { *value += 1 };
    }
}

#[inline(always)]
pub(crate) fn config() -> LbConfig {
    LB_CONFIG.get(0).copied().unwrap_or_default()
}

/// Whether the socket lives in the node's (host) network namespace.
#[inline(always)]
fn in_host_netns(netns_cookie: u64, config: &LbConfig) -> bool {
    config.host_netns_cookie != 0 && netns_cookie == config.host_netns_cookie
}

/// 127.0.0.0/8 (network order in memory: the first octet is the low byte on little endian).
#[inline(always)]
fn is_loopback(addr_be: u32) -> bool {
    u32::from_be(addr_be) >> 24 == 127
}

#[inline(always)]
fn is_node_address(addr_be: u32) -> bool {
    is_loopback(addr_be) || lookup_identity(addr_be) == identity::HOST
}

#[inline(always)]
pub(crate) fn get_service(key: &Lb4ServiceKey) -> Option<Lb4Service> {
    // SAFETY: copied out at once; a concurrent update can at worst mix the old and the new
    // value of one frontend, each a valid one (userspace writes slots before counts).
    let svc = unsafe { *LB4_SERVICES.get_ptr(key)? };
    if svc.flags & service_flags::TWO_SCOPES == 0 {
        return Some(svc);
    }
    // In-cluster clients (every socket) use the internal scope.
    let internal = Lb4ServiceKey {
        scope: lb_scope::INTERNAL,
        ..*key
    };
    // SAFETY: as above.
    LB4_SERVICES.get_ptr(internal).map(|p| unsafe { *p })
}

/// The frontend of `addr_be:port_be/protocol` as seen from a socket: the exact address,
/// else the NodePort wildcard (address 0) when the socket is in the host namespace, the
/// port is in the NodePort range and the address is the node's own or loopback.
#[inline(always)]
fn lookup_service(
    addr_be: u32,
    port_be: u16,
    protocol: u8,
    host_ns: bool,
    config: &LbConfig,
) -> Option<Lb4Service> {
    let mut key = Lb4ServiceKey {
        addr_be,
        port_be,
        protocol,
        scope: lb_scope::EXTERNAL,
    };
    if let Some(svc) = get_service(&key) {
        return Some(svc);
    }
    let port = u16::from_be(port_be);
    if !host_ns || port < config.nodeport_min || port > config.nodeport_max {
        return None;
    }
    if !is_node_address(addr_be) {
        return None;
    }
    key.addr_be = 0;
    get_service(&key).filter(|svc| svc.flags & service_flags::NODEPORT != 0)
}

#[inline(always)]
pub(crate) fn get_backend(id: u32) -> Option<Lb4Backend> {
    // SAFETY: copied out at once (8 bytes, updated whole by userspace).
    LB4_BACKENDS.get_ptr(id).map(|p| unsafe { *p })
}

#[inline(always)]
pub(crate) fn slot_backend(service_id: u32, slot: u32) -> Option<u32> {
    // SAFETY: a u32 copied out at once.
    LB4_SLOTS
        .get_ptr(Lb4SlotKey { service_id, slot })
        .map(|p| unsafe { *p })
}

/// The affinity entry's backend if it is still current: within the timeout, still one of
/// the service's backends, still active.
#[inline(always)]
fn affinity_backend(key: &Lb4AffinityKey, svc: &Lb4Service, now: u64) -> Option<(u32, Lb4Backend)> {
    // SAFETY: copied out at once.
    let entry = unsafe { *LB4_AFFINITY.get_ptr(key)? };
    let timeout_ns = u64::from(svc.affinity_timeout_secs) * NS_PER_SEC;
    if now.wrapping_sub(entry.last_used_ns) > timeout_ns {
        return None;
    }
    let member = LbAffinityMatchKey {
        backend_id: entry.backend_id,
        service_id: svc.service_id,
    };
    LB_AFFINITY_MATCH.get_ptr(member)?;
    let backend = get_backend(entry.backend_id)?;
    (backend.state == backend_state::ACTIVE).then_some((entry.backend_id, backend))
}

/// Service → backend for `connect()`/`sendmsg()`. `Ok` means proceed (translated or not a
/// service); `Err` carries the errno for the caller.
#[inline(always)]
fn xlate_fwd(ctx: &SockAddrContext) -> Result<(), i32> {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the context pointer the kernel passed; these are readable fields.
    let (protocol, addr_be, port_be) =
        unsafe { ((*sa).protocol, (*sa).user_ip4, (*sa).user_port as u16) };
    let protocol = match protocol {
        6 => proto::TCP,
        17 => proto::UDP,
        _ => return Ok(()),
    };
    let config = config();
    // SAFETY: helper valid for sock_addr programs (kernel ≥ 5.7).
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let host_ns = in_host_netns(netns_cookie, &config);
    let Some(svc) = lookup_service(addr_be, port_be, protocol, host_ns, &config) else {
        return Ok(());
    };
    // A public address is translated only where it is the node's own (Cilium's
    // `sock4_skip_xlate`): otherwise the socket is meant for the real host out there.
    if svc.flags & service_flags::EXTERNAL_IP != 0 && lookup_identity(addr_be) != identity::HOST {
        return Ok(());
    }
    if svc.count == 0 {
        count(sock_lb_counter::NO_BACKEND);
        return Err(EHOSTUNREACH);
    }

    // SAFETY: helpers valid for sock_addr programs.
    let now = unsafe { bpf_ktime_get_ns() };
    let affinity_key = Lb4AffinityKey {
        client_cookie: netns_cookie,
        service_id: svc.service_id,
        _pad: 0,
    };
    let affinity = svc.flags & service_flags::AFFINITY != 0;
    let sticky = if affinity {
        affinity_backend(&affinity_key, &svc, now)
    } else {
        None
    };
    let (backend_id, backend) = match sticky {
        Some(found) => {
            count(sock_lb_counter::AFFINITY_HIT);
            found
        }
        None => {
            // SAFETY: helpers valid for sock_addr programs.
            let seed = unsafe {
                if protocol == proto::UDP {
                    // One UDP socket keeps one backend (Cilium: the socket cookie).
                    bpf_get_socket_cookie(ctx.as_ptr()) as u32
                } else {
                    bpf_get_prandom_u32()
                }
            };
            let slot = seed % u32::from(svc.count) + 1;
            let Some(id) = slot_backend(svc.service_id, slot) else {
                count(sock_lb_counter::BACKEND_MISSING);
                return Err(EHOSTUNREACH);
            };
            let Some(backend) = get_backend(id) else {
                count(sock_lb_counter::BACKEND_MISSING);
                return Err(EHOSTUNREACH);
            };
            (id, backend)
        }
    };
    if affinity {
        let value = Lb4Affinity {
            last_used_ns: now,
            backend_id,
            _pad: 0,
        };
        // Best effort: a failed refresh only costs stickiness of a later connection.
        let _ = LB4_AFFINITY.insert(affinity_key, value, 0);
    }

    // SAFETY: helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let rev_key = Lb4ReverseSkKey {
        cookie,
        addr_be: backend.addr_be,
        port_be: backend.port_be,
        _pad: 0,
    };
    let rev = Lb4ReverseSk {
        addr_be,
        port_be,
        _pad: 0,
        service_id: svc.service_id,
    };
    // Written only when it changed: sendmsg runs per datagram.
    let current = LB4_REVERSE_SK.get_ptr(rev_key);
    // SAFETY: copied out at once.
    let unchanged = current.is_some_and(|p| unsafe { *p } == rev);
    if !unchanged && LB4_REVERSE_SK.insert(rev_key, rev, 0).is_err() {
        count(sock_lb_counter::REVNAT_UPDATE_FAILED);
        return Err(ENOMEM);
    }

    // SAFETY: `sa` is the context pointer; 4-byte writes of user_ip4/user_port are allowed
    // in connect4 and sendmsg4.
    unsafe {
        (*ctx.sock_addr).user_ip4 = backend.addr_be;
        (*ctx.sock_addr).user_port = u32::from(backend.port_be);
    }
    count(sock_lb_counter::XLATE_FWD);
    Ok(())
}

/// Backend → frontend for a reply's source (`recvmsg`) or the peer name (`getpeername`).
#[inline(always)]
fn xlate_rev(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the context pointer the kernel passed; these are readable fields.
    let (protocol, addr_be, port_be) =
        unsafe { ((*sa).protocol, (*sa).user_ip4, (*sa).user_port as u16) };
    let protocol = match protocol {
        6 => proto::TCP,
        17 => proto::UDP,
        _ => return,
    };
    // SAFETY: helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = Lb4ReverseSkKey {
        cookie,
        addr_be,
        port_be,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    let Some(entry) = LB4_REVERSE_SK.get_ptr(key).map(|p| unsafe { *p }) else {
        return;
    };
    let config = config();
    // SAFETY: helper valid for sock_addr programs.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let host_ns = in_host_netns(netns_cookie, &config);
    let current = lookup_service(entry.addr_be, entry.port_be, protocol, host_ns, &config);
    if current.is_none_or(|svc| svc.service_id != entry.service_id) {
        // The frontend is gone or was replaced: the socket's peer is not that service
        // any more; report the backend as it is.
        let _ = LB4_REVERSE_SK.remove(key);
        count(sock_lb_counter::REVNAT_STALE);
        return;
    }
    // SAFETY: 4-byte writes of user_ip4/user_port are allowed in recvmsg4/getpeername4.
    unsafe {
        (*ctx.sock_addr).user_ip4 = entry.addr_be;
        (*ctx.sock_addr).user_port = u32::from(entry.port_be);
    }
    count(sock_lb_counter::XLATE_REV);
}

#[inline(always)]
fn fwd_verdict(ctx: &SockAddrContext) -> i32 {
    match xlate_fwd(ctx) {
        Ok(()) => SYS_PROCEED,
        Err(errno) => {
            // SAFETY: helper valid for cgroup programs (kernel ≥ 5.18); the caller's
            // syscall fails with this errno.
            unsafe { bpf_set_retval(-errno) };
            SYS_REJECT
        }
    }
}

#[cgroup_sock_addr(connect4)]
pub fn sock4_connect(ctx: SockAddrContext) -> i32 {
    fwd_verdict(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock4_sendmsg(ctx: SockAddrContext) -> i32 {
    fwd_verdict(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock4_recvmsg(ctx: SockAddrContext) -> i32 {
    xlate_rev(&ctx);
    SYS_PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock4_getpeername(ctx: SockAddrContext) -> i32 {
    xlate_rev(&ctx);
    SYS_PROCEED
}

#[cgroup_sock(post_bind4)]
pub fn sock4_post_bind(ctx: SockContext) -> i32 {
    if bind_allowed(&ctx) {
        SYS_PROCEED
    } else {
        count(sock_lb_counter::BIND_REFUSED);
        // SAFETY: helper valid for cgroup programs (kernel ≥ 5.18).
        unsafe { bpf_set_retval(-EADDRINUSE) };
        SYS_REJECT
    }
}

/// Whether a bind in the host namespace leaves every NodePort, LoadBalancer and ExternalIP
/// frontend alone (pods may bind what they like: their namespace has no NodePorts).
#[inline(always)]
fn bind_allowed(ctx: &SockContext) -> bool {
    let config = config();
    // SAFETY: helper valid for cgroup sock programs (kernel ≥ 5.7).
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if !in_host_netns(netns_cookie, &config) {
        return true;
    }
    // SAFETY: `sock` is the context pointer; src_ip4/src_port are readable in post_bind4.
    let (protocol, addr_be, port) = unsafe {
        (
            (*ctx.sock).protocol,
            (*ctx.sock).src_ip4,
            (*ctx.sock).src_port,
        )
    };
    let protocol = match protocol {
        6 => proto::TCP,
        17 => proto::UDP,
        _ => return true,
    };
    // src_port is in host order.
    let port = port as u16;
    let guarded =
        service_flags::NODEPORT | service_flags::LOADBALANCER | service_flags::EXTERNAL_IP;
    let mut key = Lb4ServiceKey {
        addr_be,
        port_be: port.to_be(),
        protocol,
        scope: lb_scope::EXTERNAL,
    };
    // SAFETY: copied out at once.
    if let Some(svc) = LB4_SERVICES.get_ptr(key).map(|p| unsafe { *p })
        && svc.flags & guarded != 0
    {
        return false;
    }
    if port >= config.nodeport_min && port <= config.nodeport_max {
        key.addr_be = 0;
        // SAFETY: copied out at once.
        if let Some(svc) = LB4_SERVICES.get_ptr(key).map(|p| unsafe { *p })
            && svc.flags & service_flags::NODEPORT != 0
        {
            return false;
        }
    }
    true
}

#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    // SAFETY: `sock` is the context pointer; family/dst fields are readable here.
    let (family, dst_ip4, dst_port) = unsafe {
        (
            (*ctx.sock).family,
            (*ctx.sock).dst_ip4,
            (*ctx.sock).dst_port,
        )
    };
    if family == AF_INET && dst_ip4 != 0 {
        // SAFETY: helper valid for cgroup sock programs (kernel ≥ 5.10).
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let key = Lb4ReverseSkKey {
            cookie,
            addr_be: dst_ip4,
            port_be: dst_port,
            _pad: 0,
        };
        if LB4_REVERSE_SK.remove(key).is_ok() {
            count(sock_lb_counter::RELEASE_CLEANED);
        }
    }
    SYS_PROCEED
}
