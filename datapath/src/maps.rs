//! Typed handles over the datapath's maps. Each handle owns its map (taken from the loaded
//! object, or opened from its pin by another process such as the CLI) and speaks in the
//! crate's types: addresses as `Ipv4Addr`, ports in host order, directions as [`Direction`].

use std::{fmt, net::Ipv4Addr, path::Path, str::FromStr};

use aya::maps::{HashMap, LpmTrie, Map, MapData, PerCpuArray, lpm_trie::Key};
use membrane_common::{
    CtEntry, CtKeyV4, Direction, EndpointInfo, MetricsValue, PolicyKeyV4, PolicyValue, ct_flags,
    endpoint_flags, metrics_index, names, policy_action, proto,
};

use crate::error::{DatapathError, Result};

fn map_err(
    map: &'static str,
    op: &'static str,
) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { map, op, source }
}

/// Opens a pinned map `name` under `pin_dir`.
pub(crate) fn open_pinned(pin_dir: &Path, name: &'static str) -> Result<Map> {
    let data = MapData::from_pin(pin_dir.join(name)).map_err(map_err(name, "open pin"))?;
    Map::from_map_data(data).map_err(map_err(name, "open pin"))
}

/// An IPv4 prefix in canonical form (no host bits set).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Prefix {
    addr: Ipv4Addr,
    len: u8,
}

impl Ipv4Prefix {
    /// Fails when `len > 32` or when `addr` has bits set beyond the prefix.
    pub fn new(addr: Ipv4Addr, len: u8) -> Result<Self> {
        if len > 32 {
            return Err(DatapathError::Invalid {
                what: "IPv4 prefix",
                detail: format!("{addr}/{len}: prefix length must be at most 32"),
            });
        }
        let mask = if len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(len))
        };
        let bits = u32::from(addr);
        if bits & !mask != 0 {
            return Err(DatapathError::Invalid {
                what: "IPv4 prefix",
                detail: format!(
                    "{addr}/{len} has host bits set; did you mean {}/{len}?",
                    Ipv4Addr::from(bits & mask)
                ),
            });
        }
        Ok(Self { addr, len })
    }

    pub fn host(addr: Ipv4Addr) -> Self {
        Self { addr, len: 32 }
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn len(&self) -> u8 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

impl FromStr for Ipv4Prefix {
    type Err = DatapathError;

    /// `a.b.c.d/len`, or a bare address meaning `/32`.
    fn from_str(s: &str) -> Result<Self> {
        let invalid = || DatapathError::Invalid {
            what: "IPv4 prefix",
            detail: format!("`{s}` is not an IPv4 address or a.b.c.d/len prefix"),
        };
        match s.split_once('/') {
            Some((addr, len)) => {
                let addr = addr.parse().map_err(|_| invalid())?;
                let len = len.parse().map_err(|_| invalid())?;
                Self::new(addr, len)
            }
            None => Ok(Self::host(s.parse().map_err(|_| invalid())?)),
        }
    }
}

impl fmt::Display for Ipv4Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Name of an IP protocol number for tables.
pub fn protocol_name(protocol: u8) -> String {
    match protocol {
        proto::ANY => "ANY".into(),
        proto::ICMP => "ICMP".into(),
        proto::TCP => "TCP".into(),
        proto::UDP => "UDP".into(),
        proto::SCTP => "SCTP".into(),
        other => other.to_string(),
    }
}

/// The endpoints map: host-side ifindex → endpoint id and enforcement flags.
pub struct EndpointsMap(HashMap<MapData, u32, EndpointInfo>);

/// One row of [`EndpointsMap::list`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointEntry {
    pub ifindex: u32,
    pub endpoint_id: u32,
    pub enforce_ingress: bool,
    pub enforce_egress: bool,
}

impl EndpointsMap {
    pub(crate) fn new(map: Map) -> Result<Self> {
        let map = HashMap::try_from(map).map_err(map_err(names::MAP_ENDPOINTS, "open"))?;
        Ok(Self(map))
    }

    pub fn open_pinned(pin_dir: &Path) -> Result<Self> {
        Self::new(open_pinned(pin_dir, names::MAP_ENDPOINTS)?)
    }

    pub fn upsert(&mut self, entry: EndpointEntry) -> Result<()> {
        let mut flags = 0;
        if entry.enforce_ingress {
            flags |= endpoint_flags::ENFORCE_INGRESS;
        }
        if entry.enforce_egress {
            flags |= endpoint_flags::ENFORCE_EGRESS;
        }
        let value = EndpointInfo {
            endpoint_id: entry.endpoint_id,
            flags,
        };
        self.0
            .insert(entry.ifindex, value, 0)
            .map_err(map_err(names::MAP_ENDPOINTS, "insert"))
    }

    pub fn remove(&mut self, ifindex: u32) -> Result<()> {
        self.0
            .remove(&ifindex)
            .map_err(map_err(names::MAP_ENDPOINTS, "remove"))
    }

    pub fn list(&self) -> Result<Vec<EndpointEntry>> {
        let mut out = Vec::new();
        for item in self.0.iter() {
            let (ifindex, info) = item.map_err(map_err(names::MAP_ENDPOINTS, "iterate"))?;
            out.push(EndpointEntry {
                ifindex,
                endpoint_id: info.endpoint_id,
                enforce_ingress: info.flags & endpoint_flags::ENFORCE_INGRESS != 0,
                enforce_egress: info.flags & endpoint_flags::ENFORCE_EGRESS != 0,
            });
        }
        out.sort_by_key(|e| e.ifindex);
        Ok(out)
    }
}

/// One allow-list entry: the endpoint may exchange `protocol`/`port` traffic with `remote`
/// in `direction`. `protocol == 0` means any protocol (port must be 0); `port == 0` means
/// any port. For ICMP, `port` is the ICMP type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllowRule {
    pub endpoint_id: u32,
    pub direction: Direction,
    pub remote: Ipv4Prefix,
    pub protocol: u8,
    pub port: u16,
    /// Names the rule that produced the entry.
    pub rule_cookie: u32,
}

impl AllowRule {
    fn key(&self) -> Result<Key<PolicyKeyV4>> {
        if self.protocol == proto::ANY && self.port != 0 {
            return Err(DatapathError::Invalid {
                what: "allow rule",
                detail: format!(
                    "port {} given with protocol ANY; a port needs a protocol (TCP, UDP, SCTP, ICMP type)",
                    self.port
                ),
            });
        }
        if self.protocol == proto::ICMP && self.port > 255 {
            return Err(DatapathError::Invalid {
                what: "allow rule",
                detail: format!("ICMP type {} is out of range 0-255", self.port),
            });
        }
        Ok(Key::new(
            PolicyKeyV4::EXACT_BITS + u32::from(self.remote.len()),
            PolicyKeyV4 {
                endpoint_id: self.endpoint_id,
                direction: self.direction as u8,
                protocol: self.protocol,
                dport_be: self.port.to_be(),
                remote_ip4_be: u32::from_ne_bytes(self.remote.addr().octets()),
            },
        ))
    }
}

impl fmt::Display for AllowRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let port = if self.port == 0 {
            "any".to_owned()
        } else {
            self.port.to_string()
        };
        write!(
            f,
            "endpoint {} {} {} {}/{} (cookie {})",
            self.endpoint_id,
            self.direction.as_str(),
            self.remote,
            port,
            protocol_name(self.protocol),
            self.rule_cookie
        )
    }
}

/// The L3/L4 allow-list (LPM trie on the remote address).
pub struct PolicyMap(LpmTrie<MapData, PolicyKeyV4, PolicyValue>);

impl PolicyMap {
    pub(crate) fn new(map: Map) -> Result<Self> {
        let map = LpmTrie::try_from(map).map_err(map_err(names::MAP_POLICY_V4, "open"))?;
        Ok(Self(map))
    }

    pub fn open_pinned(pin_dir: &Path) -> Result<Self> {
        Self::new(open_pinned(pin_dir, names::MAP_POLICY_V4)?)
    }

    /// Inserts or replaces the entry for the rule's key.
    pub fn insert(&mut self, rule: &AllowRule) -> Result<()> {
        let key = rule.key()?;
        let value = PolicyValue {
            action: policy_action::ALLOW,
            _pad0: 0,
            _pad1: 0,
            rule_cookie: rule.rule_cookie,
        };
        self.0
            .insert(&key, value, 0)
            .map_err(map_err(names::MAP_POLICY_V4, "insert"))
    }

    /// Removes the entry for the rule's key (the cookie is ignored).
    pub fn remove(&mut self, rule: &AllowRule) -> Result<()> {
        let key = rule.key()?;
        self.0
            .remove(&key)
            .map_err(map_err(names::MAP_POLICY_V4, "remove"))
    }

    pub fn list(&self) -> Result<Vec<AllowRule>> {
        let mut out = Vec::new();
        for item in self.0.iter() {
            let (key, value) = item.map_err(map_err(names::MAP_POLICY_V4, "iterate"))?;
            let data = key.data();
            let remote_len = key.prefix_len().saturating_sub(PolicyKeyV4::EXACT_BITS);
            let remote_len = u8::try_from(remote_len).unwrap_or(32).min(32);
            let addr = Ipv4Addr::from(data.remote_ip4_be.to_ne_bytes());
            out.push(AllowRule {
                endpoint_id: data.endpoint_id,
                direction: Direction::from_u8(data.direction).unwrap_or(Direction::Ingress),
                remote: Ipv4Prefix {
                    addr,
                    len: remote_len,
                },
                protocol: data.protocol,
                port: u16::from_be(data.dport_be),
                rule_cookie: value.rule_cookie,
            });
        }
        out.sort();
        Ok(out)
    }
}

/// One connection in the conntrack table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtEntryView {
    pub endpoint_id: u32,
    pub direction: Direction,
    pub protocol: u8,
    pub src: Ipv4Addr,
    pub sport: u16,
    pub dst: Ipv4Addr,
    pub dport: u16,
    pub packets_fwd: u64,
    pub packets_rev: u64,
    pub closing: bool,
    pub seen_reply: bool,
    /// Seconds since the last packet.
    pub idle_secs: u64,
    pub rule_cookie: u32,
}

/// The conntrack table.
pub struct CtMap(HashMap<MapData, CtKeyV4, CtEntry>);

fn monotonic_ns() -> u64 {
    // SAFETY: zeroed timespec is a valid out-parameter.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer is valid for the call; CLOCK_MONOTONIC is bpf_ktime_get_ns's clock.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

impl CtMap {
    pub(crate) fn new(map: Map) -> Result<Self> {
        let map = HashMap::try_from(map).map_err(map_err(names::MAP_CT_V4, "open"))?;
        Ok(Self(map))
    }

    pub fn open_pinned(pin_dir: &Path) -> Result<Self> {
        Self::new(open_pinned(pin_dir, names::MAP_CT_V4)?)
    }

    pub fn list(&self) -> Result<Vec<CtEntryView>> {
        let now = monotonic_ns();
        let mut out = Vec::new();
        for item in self.0.iter() {
            let (k, v) = item.map_err(map_err(names::MAP_CT_V4, "iterate"))?;
            out.push(CtEntryView {
                endpoint_id: k.endpoint_id,
                direction: Direction::from_u8(k.direction).unwrap_or(Direction::Ingress),
                protocol: k.protocol,
                src: Ipv4Addr::from(k.saddr_be.to_ne_bytes()),
                sport: u16::from_be(k.sport_be),
                dst: Ipv4Addr::from(k.daddr_be.to_ne_bytes()),
                dport: u16::from_be(k.dport_be),
                packets_fwd: v.packets_fwd,
                packets_rev: v.packets_rev,
                closing: v.flags & ct_flags::CLOSING != 0,
                seen_reply: v.flags & ct_flags::SEEN_REPLY != 0,
                idle_secs: now.saturating_sub(v.last_seen_ns) / 1_000_000_000,
                rule_cookie: v.rule_cookie,
            });
        }
        Ok(out)
    }

    /// Removes every entry of an endpoint (used when the endpoint goes away).
    pub fn flush_endpoint(&mut self, endpoint_id: u32) -> Result<usize> {
        let keys: Vec<CtKeyV4> = self
            .0
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.endpoint_id == endpoint_id)
            .collect();
        for k in &keys {
            // An entry may have been evicted meanwhile (LRU); that is the desired end state.
            let _ = self.0.remove(k);
        }
        Ok(keys.len())
    }
}

/// Summed (over CPUs) counters of one (direction, reason) slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricsSample {
    pub direction: Direction,
    /// 0 = forwarded, otherwise a Cilium drop reason.
    pub reason: u8,
    pub packets: u64,
    pub bytes: u64,
}

/// Per-CPU packet and byte counters by direction and verdict.
pub struct MetricsMap(PerCpuArray<MapData, MetricsValue>);

impl MetricsMap {
    pub(crate) fn new(map: Map) -> Result<Self> {
        let map = PerCpuArray::try_from(map).map_err(map_err(names::MAP_METRICS, "open"))?;
        Ok(Self(map))
    }

    pub fn open_pinned(pin_dir: &Path) -> Result<Self> {
        Self::new(open_pinned(pin_dir, names::MAP_METRICS)?)
    }

    pub fn get(&self, direction: Direction, reason: u8) -> Result<MetricsSample> {
        let values = self
            .0
            .get(&metrics_index(direction, reason), 0)
            .map_err(map_err(names::MAP_METRICS, "lookup"))?;
        let (packets, bytes) = values
            .iter()
            .fold((0, 0), |(p, b), v| (p + v.packets, b + v.bytes));
        Ok(MetricsSample {
            direction,
            reason,
            packets,
            bytes,
        })
    }

    /// Every non-zero slot.
    pub fn snapshot(&self) -> Result<Vec<MetricsSample>> {
        let mut out = Vec::new();
        for direction in [Direction::Ingress, Direction::Egress] {
            for reason in 0..=u8::MAX {
                let sample = self.get(direction, reason)?;
                if sample.packets > 0 {
                    out.push(sample);
                }
            }
        }
        Ok(out)
    }
}
