//! membrane's kernel ABI: every type that crosses the boundary between the eBPF programs
//! (`membrane-ebpf`) and userspace (`membrane-datapath`), plus the names of maps and programs.
//!
//! Rules (STYLE.md, "Kernel ABI types"):
//! - `#[repr(C)]`, fixed-width integers only, explicit padding fields that are always zero,
//!   and a `const` size assertion per type, so a layout change is a compile error here rather
//!   than a silent mismatch in the kernel.
//! - Fields in network byte order carry `_be` in their name; everything else is host order.
//! - Map and program names are constants here; a test in `membrane-datapath` checks them
//!   against the built object, because the eBPF side must spell them as literals in attributes.
//!
//! This crate is `no_std` and must not depend on anything but `aya` (behind the `user`
//! feature, for `aya::Pod`).
#![cfg_attr(not(test), no_std)]

/// Version of the layout of every pinned map. Bump it with any change to a type in this
/// crate: a build refuses pinned maps of another version instead of misreading them.
pub const ABI_VERSION: u32 = 6;

pub mod names {
    //! Names of maps and programs in the built eBPF object.

    /// One-entry array holding [`crate::ABI_VERSION`] of the pinned maps.
    pub const MAP_ABI: &str = "mb_abi";
    /// One-entry array: the revision of policy, ipcache and endpoint state. Userspace bumps
    /// it after every change; conntrack caches a connection's verdict with the revision it
    /// was computed at and looks policy up again when the revision moved.
    pub const MAP_REVISION: &str = "mb_revision";
    /// Endpoints by host-side interface index: [`crate::EndpointInfo`].
    pub const MAP_ENDPOINTS: &str = "mb_endpoints";
    /// IPv4 address/prefix → security identity: LPM trie of [`crate::IpcacheKeyV4`] →
    /// [`crate::IpcacheValue`].
    pub const MAP_IPCACHE_V4: &str = "mb_ipcache_v4";
    /// Per-endpoint policy: LPM trie of [`crate::PolicyKey`] → [`crate::PolicyEntry`].
    pub const MAP_POLICY: &str = "mb_policy";
    /// Connection tracking: LRU hash of [`crate::CtKeyV4`] → [`crate::CtEntry`].
    pub const MAP_CT_V4: &str = "mb_ct_v4";
    /// Per-CPU packet/byte counters by direction and verdict: [`crate::MetricsValue`].
    pub const MAP_METRICS: &str = "mb_metrics";
    /// Flow events ([`crate::FlowEvent`]) for userspace.
    pub const MAP_EVENTS: &str = "mb_events";
    /// Per-CPU `u64`: `bpf_ktime_get_ns()` of the last event after which this CPU woke the
    /// ring buffer's reader (see [`crate::EVENTS_WAKEUP_NS`]). Scratch state of the loaded
    /// programs, not pinned: a restarted datapath starts it afresh.
    pub const MAP_EVENTS_WAKEUP: &str = "mb_events_wakeup";

    /// Service frontends: hash of [`crate::Lb4ServiceKey`] → [`crate::Lb4Service`].
    pub const MAP_LB4_SERVICES: &str = "mb_lb4_services";
    /// Backends by node-local id: hash of `u32` → [`crate::Lb4Backend`].
    pub const MAP_LB4_BACKENDS: &str = "mb_lb4_backends";
    /// A service's backend slots: hash of [`crate::Lb4SlotKey`] → backend id (`u32`).
    pub const MAP_LB4_SLOTS: &str = "mb_lb4_slots";
    /// Maglev lookup tables by service id: hash (not preallocated) of `u32` →
    /// [`crate::MaglevTable`]. Written by userspace; read by the per-packet path (*planned*).
    pub const MAP_LB4_MAGLEV: &str = "mb_lb4_maglev";
    /// Socket reverse translation (UDP replies, getpeername): LRU hash of
    /// [`crate::Lb4ReverseSkKey`] → [`crate::Lb4ReverseSk`].
    pub const MAP_LB4_REVERSE_SK: &str = "mb_lb4_reverse_sk";
    /// Session affinity: LRU hash of [`crate::Lb4AffinityKey`] → [`crate::Lb4Affinity`].
    pub const MAP_LB4_AFFINITY: &str = "mb_lb4_affinity";
    /// Which backends belong to which service, for affinity validation: hash of
    /// [`crate::LbAffinityMatchKey`] → `u32` (always 1).
    pub const MAP_LB_AFFINITY_MATCH: &str = "mb_lb_affinity_match";
    /// One-entry array: [`crate::LbConfig`].
    pub const MAP_LB_CONFIG: &str = "mb_lb_config";
    /// Per-CPU `u64` counters of the socket programs, indexed by [`crate::sock_lb_counter`].
    pub const MAP_LB_METRICS: &str = "mb_lb_metrics";
    /// Per-packet service translation of the tc programs: LRU hash of [`crate::Lb4NatKey`]
    /// → [`crate::Lb4Nat`] (forward: the client's tuple to the service → its backend;
    /// reverse: the backend's reply tuple → the service address to restore).
    pub const MAP_LB4_NAT: &str = "mb_lb4_nat";

    /// Every map the object must contain, and nothing else.
    pub const ALL_MAPS: [&str; 19] = [
        MAP_ABI,
        MAP_REVISION,
        MAP_ENDPOINTS,
        MAP_IPCACHE_V4,
        MAP_POLICY,
        MAP_CT_V4,
        MAP_METRICS,
        MAP_EVENTS,
        MAP_EVENTS_WAKEUP,
        MAP_LB4_SERVICES,
        MAP_LB4_BACKENDS,
        MAP_LB4_SLOTS,
        MAP_LB4_MAGLEV,
        MAP_LB4_REVERSE_SK,
        MAP_LB4_AFFINITY,
        MAP_LB_AFFINITY_MATCH,
        MAP_LB_CONFIG,
        MAP_LB_METRICS,
        MAP_LB4_NAT,
    ];

    /// tc program for packets leaving an endpoint (host-side veth, tc ingress hook).
    pub const PROG_FROM_ENDPOINT: &str = "from_endpoint";
    /// tc program for packets entering an endpoint (host-side veth, tc egress hook).
    pub const PROG_TO_ENDPOINT: &str = "to_endpoint";
    /// tc egress of the node's VXLAN device: the tunnel key (source identity, node).
    pub const PROG_TO_TUNNEL: &str = "to_tunnel";
    /// tc ingress of the node's VXLAN device: the identity the VNI carries, into the mark.
    pub const PROG_FROM_TUNNEL: &str = "from_tunnel";
    /// Every tc program the object must contain, and nothing else.
    pub const ALL_PROGRAMS: [&str; 4] = [
        PROG_FROM_ENDPOINT,
        PROG_TO_ENDPOINT,
        PROG_TO_TUNNEL,
        PROG_FROM_TUNNEL,
    ];

    /// Socket LB, `cgroup/connect4`: service → backend before the connection exists.
    pub const PROG_SOCK4_CONNECT: &str = "sock4_connect";
    /// Socket LB, `cgroup/sendmsg4`: the same per datagram of an unconnected UDP socket.
    pub const PROG_SOCK4_SENDMSG: &str = "sock4_sendmsg";
    /// Socket LB, `cgroup/recvmsg4`: a reply's backend source back to the service.
    pub const PROG_SOCK4_RECVMSG: &str = "sock4_recvmsg";
    /// Socket LB, `cgroup/getpeername4`: the peer shown as the service.
    pub const PROG_SOCK4_GETPEERNAME: &str = "sock4_getpeername";
    /// `cgroup/post_bind4`: refuses binds to NodePort frontends in the host namespace.
    pub const PROG_SOCK4_POST_BIND: &str = "sock4_post_bind";
    /// `cgroup/sock_release`: removes a closing socket's reverse-translation entry.
    pub const PROG_SOCK_RELEASE: &str = "sock_release";
    /// Every cgroup socket-address program (`cgroup/<hook>` sections) with its hook.
    pub const SOCK_ADDR_PROGRAMS: [(&str, &str); 4] = [
        (PROG_SOCK4_CONNECT, "connect4"),
        (PROG_SOCK4_SENDMSG, "sendmsg4"),
        (PROG_SOCK4_RECVMSG, "recvmsg4"),
        (PROG_SOCK4_GETPEERNAME, "getpeername4"),
    ];
    /// Every cgroup socket program (`cgroup/<hook>` sections) with its hook.
    pub const SOCK_PROGRAMS: [(&str, &str); 2] = [
        (PROG_SOCK4_POST_BIND, "post_bind4"),
        (PROG_SOCK_RELEASE, "sock_release"),
    ];
}

/// Traffic direction, from the endpoint's point of view (Cilium's convention).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Traffic entering the endpoint.
    Ingress = 0,
    /// Traffic leaving the endpoint.
    Egress = 1,
}

impl Direction {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Ingress),
            1 => Some(Self::Egress),
            _ => None,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        }
    }

    pub const fn reverse(self) -> Self {
        match self {
            Self::Ingress => Self::Egress,
            Self::Egress => Self::Ingress,
        }
    }
}

/// Security identities with a fixed meaning (Cilium's numbers).
pub mod identity {
    /// In a policy key: any remote identity (an L4-only entry).
    pub const ANY: u32 = 0;
    /// The local node (and host-network processes).
    pub const HOST: u32 = 1;
    /// Everything outside the cluster without a more specific identity; the ipcache's
    /// fallback for addresses it does not know.
    pub const WORLD: u32 = 2;
    /// Another node of the cluster (its underlay and router addresses, and whatever a
    /// remote node sends as its host).
    pub const REMOTE_NODE: u32 = 6;
    /// Identities at or above this are node-local (CIDR, `fqdn:`): they never cross the
    /// tunnel (the VNI has 24 bits).
    pub const LOCAL_SCOPE: u32 = 1 << 24;
}

/// Drop reasons, numbered as Cilium's datapath (`bpf/lib/common.h`, `pkg/monitor/api/drop.go`)
/// so Hubble's names apply. Index 0 in the metrics map means "forwarded".
pub mod reason {
    /// Not a drop: the packet was forwarded (or redirected to the proxy).
    pub const FORWARDED: u8 = 0;
    /// No allow entry matched (`Policy denied`).
    pub const POLICY_DENIED: u8 = 133;
    /// Malformed or truncated packet (`Invalid packet`).
    pub const INVALID_PACKET: u8 = 134;
    /// L4 header truncated or invalid (`CT: Truncated or invalid header`).
    pub const CT_INVALID_HDR: u8 = 135;
    /// Not IPv4 while enforcing (`Unsupported L3 protocol`).
    pub const UNSUPPORTED_L3: u8 = 139;
    /// The interface is not a known endpoint (`No matching local container found`).
    pub const NO_ENDPOINT: u8 = 152;
    /// Conntrack entry could not be created (`CT: Map insertion failed`).
    pub const CT_CREATE_FAILED: u8 = 155;
    /// IPv4 fragment while enforcing (`Fragmentation not supported`).
    pub const FRAG_NOT_SUPPORTED: u8 = 157;
    /// Redirect to the proxy, but no proxy socket (`Proxy lookup failed`).
    pub const PROXY_LOOKUP_FAILED: u8 = 178;
    /// Redirect to the proxy, but assigning its socket failed (`Proxy assignment failed`).
    pub const PROXY_SET_FAILED: u8 = 179;
    /// Redirect to the proxy for a protocol it does not serve (`Proxy redirection not
    /// supported for protocol`).
    pub const PROXY_UNSUPPORTED_PROTO: u8 = 180;
    /// An explicit deny entry matched (`Policy denied by denylist`).
    pub const POLICY_DENY: u8 = 181;
    /// A service without an active backend, per packet (`Service backend not found`).
    pub const NO_SERVICE: u8 = 158;
    /// The per-packet service translation could not record or rewrite the flow
    /// (`Service NAT failed`, membrane's wording; Cilium has no exact equivalent).
    pub const SERVICE_NAT_FAILED: u8 = 159;
    /// A tunnelled packet whose tunnel key could not be read or written (`Error retrieving
    /// tunnel key`).
    pub const TUNNEL_KEY_FAILED: u8 = 147;
    /// Routed into the tunnel, but the ipcache names no node for the destination (`No
    /// tunnel/encapsulation endpoint (datapath BUG!)`).
    pub const NO_TUNNEL_ENDPOINT: u8 = 160;
    /// A source identity the tunnel cannot carry, or a VNI of 0 (`Invalid identity`).
    pub const INVALID_IDENTITY: u8 = 171;
    /// A tunnelled packet from an outer source that is no node of the cluster (`Unknown
    /// sender`): anyone who can reach UDP 8472 could otherwise claim any identity.
    pub const UNKNOWN_SENDER: u8 = 172;

    /// Human-readable description, Cilium's wording.
    pub const fn describe(reason: u8) -> &'static str {
        match reason {
            FORWARDED => "Forwarded",
            POLICY_DENIED => "Policy denied",
            INVALID_PACKET => "Invalid packet",
            CT_INVALID_HDR => "CT: Truncated or invalid header",
            UNSUPPORTED_L3 => "Unsupported L3 protocol",
            NO_ENDPOINT => "No matching local container found",
            CT_CREATE_FAILED => "CT: Map insertion failed",
            FRAG_NOT_SUPPORTED => "Fragmentation not supported",
            PROXY_LOOKUP_FAILED => "Proxy lookup failed",
            PROXY_SET_FAILED => "Proxy assignment failed",
            PROXY_UNSUPPORTED_PROTO => "Proxy redirection not supported for protocol",
            POLICY_DENY => "Policy denied by denylist",
            NO_SERVICE => "Service backend not found",
            SERVICE_NAT_FAILED => "Service NAT failed",
            TUNNEL_KEY_FAILED => "Error retrieving tunnel key",
            NO_TUNNEL_ENDPOINT => "No tunnel/encapsulation endpoint (datapath BUG!)",
            INVALID_IDENTITY => "Invalid identity",
            UNKNOWN_SENDER => "Unknown sender",
            _ => "Unknown drop reason",
        }
    }
}

/// IP protocol numbers the datapath understands.
pub mod proto {
    pub const ANY: u8 = 0;
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const SCTP: u8 = 132;
}

/// skb marks shared with the proxy (Cilium's values, `bpf/lib/common.h`).
pub mod mark {
    /// Bits holding the magic.
    pub const MAGIC_MASK: u32 = 0x0F00;
    /// To the proxy; the upper 16 bits carry the proxy port (host order).
    pub const MAGIC_TO_PROXY: u32 = 0x0200;
    /// From the ingress proxy; carries the source identity ([`encode_identity`]).
    pub const MAGIC_PROXY_INGRESS: u32 = 0x0A00;
    /// From the egress proxy; carries the source identity ([`encode_identity`]).
    pub const MAGIC_PROXY_EGRESS: u32 = 0x0B00;
    /// From the tunnel: `from_tunnel` put the source identity the VNI carried in the mark
    /// ([`encode_identity`]); `to_endpoint` takes it instead of the ipcache's (Cilium's
    /// MARK_MAGIC_IDENTITY).
    pub const MAGIC_IDENTITY: u32 = 0x0F00;

    /// `MAGIC_TO_PROXY | port << 16`.
    pub const fn to_proxy(port: u16) -> u32 {
        MAGIC_TO_PROXY | ((port as u32) << 16)
    }

    /// The identity's low 16 bits go to the upper half of the mark, bits 16..24 to the low
    /// byte (Cilium's layout, so the magic nibble stays free).
    pub const fn encode_identity(magic: u32, identity: u32) -> u32 {
        magic | ((identity & 0xFFFF) << 16) | ((identity >> 16) & 0xFF)
    }

    pub const fn decode_identity(mark: u32) -> u32 {
        ((mark >> 16) & 0xFFFF) | ((mark & 0xFF) << 16)
    }
}

/// Bits of [`EndpointInfo::flags`].
pub mod endpoint_flags {
    /// Enforce policy on traffic entering the endpoint (default-deny ingress).
    pub const ENFORCE_INGRESS: u32 = 1 << 0;
    /// Enforce policy on traffic leaving the endpoint (default-deny egress).
    pub const ENFORCE_EGRESS: u32 = 1 << 1;
}

/// Value of [`names::MAP_ENDPOINTS`], keyed by the host-side interface index (`u32`, host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EndpointInfo {
    /// Agent-assigned endpoint id; scopes policy and conntrack entries.
    pub endpoint_id: u32,
    /// The endpoint's security identity.
    pub identity: u32,
    /// [`endpoint_flags`] bits.
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<EndpointInfo>() == 16);

/// Key data of [`names::MAP_IPCACHE_V4`] (LPM trie; the prefix covers the address).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct IpcacheKeyV4 {
    pub ip4_be: u32,
}
const _: () = assert!(core::mem::size_of::<IpcacheKeyV4>() == 4);

/// Value of [`names::MAP_IPCACHE_V4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IpcacheValue {
    pub identity: u32,
    /// Underlay address (network order) of the node that has this address, for tunnel
    /// routing: the outer destination of the VXLAN packet `to_tunnel` builds. 0: none (a
    /// local address, or native routing). Was padding before ABI 6, always written 0.
    pub tunnel_endpoint_be: u32,
}
const _: () = assert!(core::mem::size_of::<IpcacheValue>() == 8);

/// Key data of [`names::MAP_POLICY`] (an LPM trie). Field order matters: the trie matches a
/// prefix of these bytes, so the always-exact fields come first ([`PolicyKey::STATIC_BITS`]),
/// then the protocol (8 bits) and the destination port in network order (0..16 bits), which
/// makes a port range a set of power-of-two aligned prefixes.
///
/// `remote_identity == 0` is the "any peer" entry. For ICMP the port field carries the ICMP
/// type (Cilium's convention).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PolicyKey {
    pub endpoint_id: u32,
    pub remote_identity: u32,
    /// [`Direction`] as u8.
    pub direction: u8,
    pub protocol: u8,
    pub dport_be: u16,
}
const _: () = assert!(core::mem::size_of::<PolicyKey>() == 12);

impl PolicyKey {
    /// Bits always matched exactly: endpoint id, remote identity, direction.
    pub const STATIC_BITS: u32 = 72;
    /// Prefix length of an entry for one protocol and one port.
    pub const FULL_BITS: u32 = Self::STATIC_BITS + 24;
}

/// Bits of [`PolicyEntry::flags`].
pub mod policy_flags {
    /// The entry denies (drop 181).
    pub const DENY: u8 = 1 << 0;
}

/// Value of [`names::MAP_POLICY`].
///
/// When both the exact-identity lookup and the any-identity lookup match, the higher
/// `precedence` wins; on a tie the longer `l4_prefix_len`; then the exact-identity entry.
/// The policy model encodes Cilium's precedence (deny 255 in the low byte, proxy redirect
/// 2..254, plain allow 1), so at equal priority deny beats redirect beats allow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicyEntry {
    pub precedence: u32,
    /// Names the rule that produced the entry (flow events, `bpf policy get`).
    pub cookie: u32,
    /// Non-zero: redirect to the proxy listening on this port (network order).
    pub proxy_port_be: u16,
    /// [`policy_flags`] bits.
    pub flags: u8,
    /// Prefix bits of the key beyond [`PolicyKey::STATIC_BITS`] (0 = any protocol, 8 =
    /// protocol only, 8 + n = a port prefix of n bits); the kernel's LPM lookup does not
    /// return the matched length, so the entry carries it.
    pub l4_prefix_len: u8,
}
const _: () = assert!(core::mem::size_of::<PolicyEntry>() == 12);

/// Key of [`names::MAP_CT_V4`]: a connection as this endpoint sees it, oriented the same way
/// for both directions (the endpoint's side first), so one lookup finds the connection for a
/// packet either way; [`CtEntry::direction`] says which way it was opened, which tells a
/// reply from a forward packet. For ICMP echo the identifier is the source "port" of the
/// request and the destination "port" of the reply, so both land on the same key too.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtKeyV4 {
    /// The endpoint's address: the source of its egress packets, the destination of its
    /// ingress packets.
    pub local_addr_be: u32,
    /// The peer's address.
    pub remote_addr_be: u32,
    pub local_port_be: u16,
    pub remote_port_be: u16,
    pub endpoint_id: u32,
    pub protocol: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<CtKeyV4>() == 20);

/// Bits of [`CtEntry::flags`].
pub mod ct_flags {
    /// A FIN or RST was seen: the entry uses the short closing timeout.
    pub const CLOSING: u32 = 1 << 0;
    /// The responder answered at least once.
    pub const SEEN_REPLY: u32 = 1 << 1;
    /// The connection's forward packets go to the proxy.
    pub const PROXY_REDIRECT: u32 = 1 << 2;
}

/// Conntrack lifetimes in seconds (Cilium's defaults: TCP 6 h, non-TCP 60 s, closing 10 s).
///
/// [`CtEntry::last_seen_ns`] is refreshed at most once per [`ct_timeout::REFRESH_NS`] (a
/// store on every packet would dirty the entry's cache line for every packet of both
/// directions, which on a real node run on different CPUs). An entry therefore counts as
/// expired only when it has been idle for its lifetime *plus* that granularity: a connection
/// lives at least its lifetime after its last packet (never less) and at most one
/// granularity more.
pub mod ct_timeout {
    pub const TCP_SECS: u64 = 21_600;
    pub const NON_TCP_SECS: u64 = 60;
    pub const CLOSING_SECS: u64 = 10;
    /// Granularity of [`crate::CtEntry::last_seen_ns`] (1 s; Cilium keeps lifetimes in
    /// whole seconds).
    pub const REFRESH_NS: u64 = 1_000_000_000;
}

/// Value of [`names::MAP_CT_V4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtEntry {
    /// `bpf_ktime_get_coarse_ns()` at creation (CLOCK_MONOTONIC, jiffies resolution).
    pub created_ns: u64,
    /// `bpf_ktime_get_coarse_ns()` of the last packet in either direction, to within
    /// [`ct_timeout::REFRESH_NS`] (see there).
    pub last_seen_ns: u64,
    pub packets_fwd: u64,
    pub packets_rev: u64,
    /// [`ct_flags`] bits.
    pub flags: u32,
    /// Cookie of the policy entry that allowed the connection (0: enforcement was off).
    pub rule_cookie: u32,
    /// Identity of the connection's source at creation (the proxy reads it).
    pub src_identity: u32,
    /// Proxy port of a redirected connection (network order), else 0.
    pub proxy_port_be: u16,
    /// [`Direction`] of the packet that opened the connection: packets going the other way
    /// are replies.
    pub direction: u8,
    pub _pad: u8,
    /// [`names::MAP_REVISION`] value when the forward verdict (allow, or redirect to
    /// `proxy_port_be`) was last computed; while it is current, forward packets skip the
    /// policy lookups.
    pub policy_rev: u32,
    /// The peer's identity as of `policy_rev` (the destination's for an egress connection,
    /// the source's for an ingress one): forward packets with a current verdict reuse it
    /// instead of an ipcache lookup.
    pub remote_identity: u32,
}
const _: () = assert!(core::mem::size_of::<CtEntry>() == 56);

/// Value of [`names::MAP_METRICS`] (per CPU), indexed by [`metrics_index`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MetricsValue {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<MetricsValue>() == 16);

/// Slots in [`names::MAP_METRICS`]: one per (direction, reason), plus [`METRICS_EVENTS_LOST`].
pub const METRICS_SLOTS: u32 = 513;
/// Slot counting flow events the ring buffer had no room for.
pub const METRICS_EVENTS_LOST: u32 = 512;

/// Slot of a (direction, reason) pair in [`names::MAP_METRICS`].
pub const fn metrics_index(direction: Direction, reason: u8) -> u32 {
    ((direction as u32) << 8) | reason as u32
}

/// Flow events wake the ring buffer's reader at most once per this interval per CPU, or
/// when [`EVENTS_WAKEUP_BYTES`] are waiting; other events are written without a wakeup (a
/// wakeup is an irq_work self-interrupt plus a task wakeup, several µs in a VM, and by
/// default the kernel pays it for every event the reader has caught up with, i.e. for nearly
/// every new connection). An event written without one waits for the next wakeup or for the
/// reader's own poll timeout (the agent polls every 50 ms): at most that late.
pub const EVENTS_WAKEUP_NS: u64 = 10_000_000;
/// Bytes waiting in the ring buffer that wake the reader regardless of the interval (a
/// sixteenth of the 1 MiB ring): the event that crosses it wakes the reader, the ones after
/// it do not (a reader that is behind or absent would otherwise be woken for every event).
pub const EVENTS_WAKEUP_BYTES: u64 = 64 * 1024;

/// [`FlowEvent::kind`] values: Cilium's monitor message types.
pub mod event_kind {
    pub const DROP: u8 = 1;
    pub const TRACE: u8 = 4;
    pub const POLICY_VERDICT: u8 = 5;
}

/// [`FlowEvent::verdict`] values: Hubble's `Verdict` numbers.
pub mod verdict {
    pub const FORWARDED: u8 = 1;
    pub const DROPPED: u8 = 2;
    pub const REDIRECTED: u8 = 5;
}

/// [`FlowEvent::match_type`] values: Cilium's policy match types.
pub mod match_type {
    pub const NONE: u8 = 0;
    pub const L3_ONLY: u8 = 1;
    pub const L3_L4: u8 = 2;
    pub const L4_ONLY: u8 = 3;
    pub const ALL: u8 = 4;
    pub const L3_PROTO: u8 = 5;
    pub const PROTO_ONLY: u8 = 6;
}

/// One record in [`names::MAP_EVENTS`]: a drop, a policy verdict on a new connection, or a
/// trace of a new connection where no policy applied.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowEvent {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub timestamp_ns: u64,
    /// [`event_kind`].
    pub kind: u8,
    /// [`verdict`].
    pub verdict: u8,
    /// Drop reason, 0 if not dropped.
    pub reason: u8,
    /// [`Direction`] as u8, from the endpoint's point of view.
    pub direction: u8,
    /// [`match_type`].
    pub match_type: u8,
    pub protocol: u8,
    pub tcp_flags: u8,
    pub _pad0: u8,
    pub endpoint_id: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proxy_port_be: u16,
    pub _pad1: u16,
    pub rule_cookie: u32,
    pub ifindex: u32,
    /// Packet length in bytes.
    pub len: u32,
}
const _: () = assert!(core::mem::size_of::<FlowEvent>() == 56);

/// Scope of a service frontend (Cilium's `LB_LOOKUP_SCOPE_*`): a service whose internal and
/// external traffic policies differ has two entries per frontend, the external one with the
/// backends for traffic from outside the cluster and the internal one with those for traffic
/// from inside ([`service_flags::TWO_SCOPES`] on the external entry says the other exists).
pub mod lb_scope {
    pub const EXTERNAL: u8 = 0;
    pub const INTERNAL: u8 = 1;
}

/// Bits of [`Lb4Service::flags`].
pub mod service_flags {
    /// An `externalIPs` frontend: translated at the socket only when the address is the
    /// node's own (`reserved:host` in the ipcache), so a public address is never hijacked.
    pub const EXTERNAL_IP: u16 = 1 << 0;
    /// A NodePort frontend (address 0 = every address of the node).
    pub const NODEPORT: u16 = 1 << 1;
    /// `externalTrafficPolicy: Local`: the external scope holds node-local backends only.
    pub const EXT_LOCAL_SCOPE: u16 = 1 << 2;
    /// `internalTrafficPolicy: Local`: the internal scope holds node-local backends only.
    pub const INT_LOCAL_SCOPE: u16 = 1 << 3;
    /// `sessionAffinity: ClientIP`; the timeout is [`super::Lb4Service::affinity_timeout_secs`].
    pub const AFFINITY: u16 = 1 << 4;
    /// A LoadBalancer ingress address.
    pub const LOADBALANCER: u16 = 1 << 5;
    /// A ClusterIP frontend.
    pub const CLUSTER_IP: u16 = 1 << 6;
    /// There is an [`super::lb_scope::INTERNAL`] entry for the same frontend: in-cluster
    /// clients (the socket programs) use it.
    pub const TWO_SCOPES: u16 = 1 << 7;
}

/// [`Lb4Backend::state`] values (Cilium's backend states).
pub mod backend_state {
    /// Ready: takes new connections.
    pub const ACTIVE: u8 = 0;
    /// Terminating: keeps its connections, takes no new ones.
    pub const TERMINATING: u8 = 1;
    /// Not ready (or unhealthy): kept so existing connections survive readiness flaps,
    /// takes no new ones.
    pub const QUARANTINED: u8 = 2;
    /// Taken out by an operator.
    pub const MAINTENANCE: u8 = 3;
}

/// [`Lb4Service::algorithm`] values (Cilium's `LB_SELECTION_*`).
pub mod lb_algorithm {
    pub const RANDOM: u8 = 1;
    pub const MAGLEV: u8 = 2;
}

/// Key of [`names::MAP_LB4_SERVICES`]: one frontend (address, port, protocol) in one scope.
/// A NodePort frontend has address 0 (every node address).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Lb4ServiceKey {
    pub addr_be: u32,
    pub port_be: u16,
    /// [`proto`] number (TCP or UDP).
    pub protocol: u8,
    /// [`lb_scope`].
    pub scope: u8,
}
const _: () = assert!(core::mem::size_of::<Lb4ServiceKey>() == 8);

/// Value of [`names::MAP_LB4_SERVICES`].
///
/// Slots `1..=count` of [`names::MAP_LB4_SLOTS`] hold the active backends, slots
/// `count+1..=count+qcount` the others (terminating, quarantined), which take no new
/// connections. `count == 0` fails `connect()` with `EHOSTUNREACH`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Lb4Service {
    /// Node-local frontend id (Cilium's `rev_nat_index`, but 32 bits wide): keys the
    /// slots, the affinity and Maglev maps, and validates reverse-translation entries.
    pub service_id: u32,
    /// Active backends.
    pub count: u16,
    /// Backends that take no new connections.
    pub qcount: u16,
    /// [`service_flags`] bits.
    pub flags: u16,
    /// [`lb_algorithm`] for the per-packet path (sockets always pick at random).
    pub algorithm: u8,
    pub _pad: u8,
    /// Session affinity timeout in seconds (with [`service_flags::AFFINITY`]).
    pub affinity_timeout_secs: u32,
}
const _: () = assert!(core::mem::size_of::<Lb4Service>() == 16);

/// Value of [`names::MAP_LB4_BACKENDS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Lb4Backend {
    pub addr_be: u32,
    pub port_be: u16,
    pub protocol: u8,
    /// [`backend_state`].
    pub state: u8,
}
const _: () = assert!(core::mem::size_of::<Lb4Backend>() == 8);

/// Key of [`names::MAP_LB4_SLOTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Lb4SlotKey {
    pub service_id: u32,
    /// 1-based (see [`Lb4Service`]).
    pub slot: u32,
}
const _: () = assert!(core::mem::size_of::<Lb4SlotKey>() == 8);

/// Maglev lookup table size (Cilium's default `M`, a prime from its allowed list); fixed in
/// the ABI because it is the size of [`MaglevTable`].
pub const MAGLEV_TABLE_SIZE: usize = 16381;

/// Value of [`names::MAP_LB4_MAGLEV`]: backend ids by `hash(flow) % MAGLEV_TABLE_SIZE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    pub backend_ids: [u32; MAGLEV_TABLE_SIZE],
}
const _: () = assert!(core::mem::size_of::<MaglevTable>() == 4 * MAGLEV_TABLE_SIZE);

/// Key of [`names::MAP_LB4_REVERSE_SK`]: a socket (by its cookie) and the backend it was
/// sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Lb4ReverseSkKey {
    pub cookie: u64,
    pub addr_be: u32,
    pub port_be: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<Lb4ReverseSkKey>() == 16);

/// Value of [`names::MAP_LB4_REVERSE_SK`]: the service frontend the socket asked for. Used
/// only while that frontend still has the same `service_id` and backends.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Lb4ReverseSk {
    pub addr_be: u32,
    pub port_be: u16,
    pub _pad: u16,
    pub service_id: u32,
}
const _: () = assert!(core::mem::size_of::<Lb4ReverseSk>() == 12);

/// Key of [`names::MAP_LB4_AFFINITY`]: the client (at the socket layer the network
/// namespace cookie, as Cilium: no source address exists yet) and the frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Lb4AffinityKey {
    pub client_cookie: u64,
    pub service_id: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<Lb4AffinityKey>() == 16);

/// Value of [`names::MAP_LB4_AFFINITY`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Lb4Affinity {
    /// `bpf_ktime_get_ns()` of the last connection that used it.
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<Lb4Affinity>() == 16);

/// Key of [`names::MAP_LB_AFFINITY_MATCH`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct LbAffinityMatchKey {
    pub backend_id: u32,
    pub service_id: u32,
}
const _: () = assert!(core::mem::size_of::<LbAffinityMatchKey>() == 8);

/// Value of [`names::MAP_LB_CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct LbConfig {
    /// Cookie of the node's ("host") network namespace: NodePort via the node's own
    /// addresses and bind protection apply there only. 0 = unknown: no socket counts as
    /// the host's.
    pub host_netns_cookie: u64,
    /// NodePort range (inclusive, host order); NodePort lookups only for ports inside.
    pub nodeport_min: u16,
    pub nodeport_max: u16,
    /// [`lb_config_flags`] bits.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<LbConfig>() == 16);

/// Bits of [`LbConfig::flags`].
pub mod lb_config_flags {
    /// The tc programs translate service addresses per packet (for endpoints whose sockets
    /// are not under socket LB; a packet socket LB already translated matches no service).
    pub const PER_PACKET: u32 = 1 << 0;
}

/// Key of [`names::MAP_LB4_NAT`]: a packet's tuple as it is on the wire at the endpoint.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Lb4NatKey {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub protocol: u8,
    /// [`lb_nat_dir`].
    pub direction: u8,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<Lb4NatKey>() == 16);

/// [`Lb4NatKey::direction`] values.
pub mod lb_nat_dir {
    /// Client → service: the value is the backend (destination rewrite).
    pub const FORWARD: u8 = 0;
    /// Backend → client: the value is the service (source rewrite).
    pub const REVERSE: u8 = 1;
}

/// Value of [`names::MAP_LB4_NAT`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Lb4Nat {
    pub addr_be: u32,
    pub port_be: u16,
    pub _pad: u16,
    pub backend_id: u32,
    pub service_id: u32,
}
const _: () = assert!(core::mem::size_of::<Lb4Nat>() == 16);

/// Slots of [`names::MAP_LB_METRICS`] (per-CPU `u64` counters of the socket programs).
pub mod sock_lb_counter {
    /// A socket address was translated to a backend (connect or sendmsg).
    pub const XLATE_FWD: u32 = 0;
    /// A reply source or peer name was translated back to the service.
    pub const XLATE_REV: u32 = 1;
    /// `connect()`/`sendmsg()` to a service without active backends: `EHOSTUNREACH`.
    pub const NO_BACKEND: u32 = 2;
    /// A slot or backend entry was missing (userspace mid-update): `EHOSTUNREACH`.
    pub const BACKEND_MISSING: u32 = 3;
    /// The reverse-translation entry could not be written: `ENOMEM` (Cilium's answer).
    pub const REVNAT_UPDATE_FAILED: u32 = 4;
    /// A reverse-translation entry named a frontend that is gone or changed: removed.
    pub const REVNAT_STALE: u32 = 5;
    /// A bind to a NodePort frontend in the host namespace was refused.
    pub const BIND_REFUSED: u32 = 6;
    /// An affinity entry was used.
    pub const AFFINITY_HIT: u32 = 7;
    /// A closing socket's reverse-translation entry was removed.
    pub const RELEASE_CLEANED: u32 = 8;
    /// Number of slots.
    pub const SLOTS: u32 = 9;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all impls): the types are `#[repr(C)]`, made only of integers, with explicit
    // padding fields, so every bit pattern is valid and there are no implicit padding bytes.
    unsafe impl aya::Pod for super::EndpointInfo {}
    unsafe impl aya::Pod for super::IpcacheKeyV4 {}
    unsafe impl aya::Pod for super::IpcacheValue {}
    unsafe impl aya::Pod for super::PolicyKey {}
    unsafe impl aya::Pod for super::PolicyEntry {}
    unsafe impl aya::Pod for super::CtKeyV4 {}
    unsafe impl aya::Pod for super::CtEntry {}
    unsafe impl aya::Pod for super::MetricsValue {}
    unsafe impl aya::Pod for super::FlowEvent {}
    unsafe impl aya::Pod for super::Lb4ServiceKey {}
    unsafe impl aya::Pod for super::Lb4Service {}
    unsafe impl aya::Pod for super::Lb4Backend {}
    unsafe impl aya::Pod for super::Lb4SlotKey {}
    unsafe impl aya::Pod for super::MaglevTable {}
    unsafe impl aya::Pod for super::Lb4ReverseSkKey {}
    unsafe impl aya::Pod for super::Lb4ReverseSk {}
    unsafe impl aya::Pod for super::Lb4AffinityKey {}
    unsafe impl aya::Pod for super::Lb4Affinity {}
    unsafe impl aya::Pod for super::LbAffinityMatchKey {}
    unsafe impl aya::Pod for super::LbConfig {}
    unsafe impl aya::Pod for super::Lb4NatKey {}
    unsafe impl aya::Pod for super::Lb4Nat {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_survives_the_mark_encoding() {
        // Cluster-scope identities are 24 bits wide; that is all a mark can carry.
        for id in [0, 1, 2, 256, 0xFFFF, 0x1_0000, 0xFF_FFFF] {
            let m = mark::encode_identity(mark::MAGIC_PROXY_EGRESS, id);
            assert_eq!(
                m & mark::MAGIC_MASK,
                mark::MAGIC_PROXY_EGRESS,
                "magic intact for {id:#x}"
            );
            assert_eq!(mark::decode_identity(m), id);
        }
    }

    #[test]
    fn to_proxy_mark_carries_the_port() {
        assert_eq!(mark::to_proxy(15001), 0x3A99_0200);
    }
}
