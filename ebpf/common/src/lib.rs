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
#![no_std]

pub mod names {
    //! Names of maps and programs in the built eBPF object.

    /// Endpoints by host-side interface index: [`crate::EndpointInfo`].
    pub const MAP_ENDPOINTS: &str = "mb_endpoints";
    /// L3/L4 allow-list per endpoint: LPM trie of [`crate::PolicyKeyV4`] → [`crate::PolicyValue`].
    pub const MAP_POLICY_V4: &str = "mb_policy_v4";
    /// Connection tracking: LRU hash of [`crate::CtKeyV4`] → [`crate::CtEntry`].
    pub const MAP_CT_V4: &str = "mb_ct_v4";
    /// Per-CPU packet/byte counters by direction and verdict: [`crate::MetricsValue`].
    pub const MAP_METRICS: &str = "mb_metrics";
    /// Every map the object must contain, and nothing else.
    pub const ALL_MAPS: [&str; 4] = [MAP_ENDPOINTS, MAP_POLICY_V4, MAP_CT_V4, MAP_METRICS];

    /// tc program for packets leaving an endpoint (host-side veth, tc ingress hook).
    pub const PROG_FROM_ENDPOINT: &str = "from_endpoint";
    /// tc program for packets entering an endpoint (host-side veth, tc egress hook).
    pub const PROG_TO_ENDPOINT: &str = "to_endpoint";
    /// Every program the object must contain, and nothing else.
    pub const ALL_PROGRAMS: [&str; 2] = [PROG_FROM_ENDPOINT, PROG_TO_ENDPOINT];
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
}

/// Drop reasons, numbered as Cilium's datapath (`bpf/lib/common.h`, `pkg/monitor/api/drop.go`)
/// so Hubble's names apply. Index 0 in the metrics map means "forwarded".
pub mod reason {
    /// Not a drop: the packet was forwarded.
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
    /// IPv4 fragment: not supported, see ARCHITECTURE.md (`Fragmented packet`... `not supported`).
    pub const FRAG_NOT_SUPPORTED: u8 = 157;

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
    /// [`endpoint_flags`] bits.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<EndpointInfo>() == 8);

/// Key data of [`names::MAP_POLICY_V4`] (an LPM trie; the `prefix_len` header is added by the
/// map wrapper). Field order matters: the trie matches a prefix of these bytes, so all exact
/// fields come first and the remote IPv4 address last.
///
/// `protocol == 0` means any protocol (then `dport_be` must be 0); `dport_be == 0` means any
/// port of that protocol. For ICMP the port field carries the ICMP type (Cilium's convention).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PolicyKeyV4 {
    pub endpoint_id: u32,
    /// [`Direction`] as u8.
    pub direction: u8,
    pub protocol: u8,
    pub dport_be: u16,
    pub remote_ip4_be: u32,
}
const _: () = assert!(core::mem::size_of::<PolicyKeyV4>() == 12);

impl PolicyKeyV4 {
    /// Bits of the key before the remote address: always matched exactly.
    pub const EXACT_BITS: u32 = 64;
    /// Full prefix length of a key matching one remote address.
    pub const FULL_BITS: u32 = Self::EXACT_BITS + 32;
}

/// Bits of [`PolicyValue::action`].
pub mod policy_action {
    /// Allow the packet (and create a conntrack entry).
    pub const ALLOW: u8 = 1;
}

/// Value of [`names::MAP_POLICY_V4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicyValue {
    /// [`policy_action`] value.
    pub action: u8,
    pub _pad0: u8,
    pub _pad1: u16,
    /// Names the rule that produced the entry (for flow records and `bpf policy get`).
    pub rule_cookie: u32,
}
const _: () = assert!(core::mem::size_of::<PolicyValue>() == 8);

/// Key of [`names::MAP_CT_V4`]: the tuple of the packet that opened the connection, in the
/// direction it was first seen at this endpoint. A reply is found by reversing its tuple.
/// For ICMP echo the identifier is the source "port" of the request and the destination "port"
/// of the reply, so the reversal works the same way.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtKeyV4 {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub endpoint_id: u32,
    pub protocol: u8,
    /// [`Direction`] of the opening packet.
    pub direction: u8,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<CtKeyV4>() == 20);

/// Bits of [`CtEntry::flags`].
pub mod ct_flags {
    /// A FIN or RST was seen: the entry uses the short closing timeout.
    pub const CLOSING: u32 = 1 << 0;
    /// The responder answered at least once.
    pub const SEEN_REPLY: u32 = 1 << 1;
}

/// Conntrack lifetimes in seconds (Cilium's defaults: TCP 6 h, non-TCP 60 s, closing 10 s).
pub mod ct_timeout {
    pub const TCP_SECS: u64 = 21_600;
    pub const NON_TCP_SECS: u64 = 60;
    pub const CLOSING_SECS: u64 = 10;
}

/// Value of [`names::MAP_CT_V4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtEntry {
    /// `bpf_ktime_get_ns()` at creation (CLOCK_MONOTONIC).
    pub created_ns: u64,
    /// `bpf_ktime_get_ns()` of the last packet in either direction.
    pub last_seen_ns: u64,
    pub packets_fwd: u64,
    pub packets_rev: u64,
    /// [`ct_flags`] bits.
    pub flags: u32,
    /// Rule cookie of the policy entry that allowed the connection (0: enforcement was off).
    pub rule_cookie: u32,
}
const _: () = assert!(core::mem::size_of::<CtEntry>() == 40);

/// Value of [`names::MAP_METRICS`] (per CPU), indexed by [`metrics_index`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MetricsValue {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<MetricsValue>() == 16);

/// Number of slots in [`names::MAP_METRICS`]: one per (direction, reason).
pub const METRICS_SLOTS: u32 = 512;

/// Slot of a (direction, reason) pair in [`names::MAP_METRICS`].
pub const fn metrics_index(direction: Direction, reason: u8) -> u32 {
    ((direction as u32) << 8) | reason as u32
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all impls): the types are `#[repr(C)]`, made only of integers, with explicit
    // padding fields, so every bit pattern is valid and there are no implicit padding bytes.
    unsafe impl aya::Pod for super::EndpointInfo {}
    unsafe impl aya::Pod for super::PolicyKeyV4 {}
    unsafe impl aya::Pod for super::PolicyValue {}
    unsafe impl aya::Pod for super::CtKeyV4 {}
    unsafe impl aya::Pod for super::CtEntry {}
    unsafe impl aya::Pod for super::MetricsValue {}
}
