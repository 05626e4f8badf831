//! Typed handles over the datapath's maps. Each handle owns its map (taken from the loaded
//! object, or opened from its pin by another process such as the CLI) and speaks in the
//! crate's types: addresses as `Ipv4Addr`, ports in host order, directions as [`Direction`].

use std::{
    fmt,
    net::Ipv4Addr,
    path::Path,
    str::FromStr,
    sync::{Arc, Mutex},
};

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, lpm_trie::Key};
use membrane_common::{
    CtEntry, CtKeyV4, Direction, EndpointInfo, IpcacheKeyV4, IpcacheValue, METRICS_EVENTS_LOST,
    MetricsValue, PolicyEntry, PolicyKey, ct_flags, endpoint_flags, metrics_index, names,
    policy_flags, proto,
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

/// The revision of policy, ipcache and endpoint state (`mb_revision`). Every mutation through
/// the typed handles bumps it *after* the change, so a connection whose cached verdict was
/// computed before the change looks policy up again on its next packet.
#[derive(Clone)]
pub struct RevisionCounter(Arc<Mutex<Array<MapData, u32>>>);

impl RevisionCounter {
    pub(crate) fn new(map: Map) -> Result<Self> {
        let map = Array::try_from(map).map_err(map_err(names::MAP_REVISION, "open"))?;
        Ok(Self(Arc::new(Mutex::new(map))))
    }

    pub fn open_pinned(pin_dir: &Path) -> Result<Self> {
        Self::new(open_pinned(pin_dir, names::MAP_REVISION)?)
    }

    pub fn get(&self) -> Result<u32> {
        let map = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        map.get(&0, 0)
            .map_err(map_err(names::MAP_REVISION, "lookup"))
    }

    /// Moves to the next revision (never 0, which a fresh map holds).
    pub fn bump(&self) -> Result<u32> {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let current = map
            .get(&0, 0)
            .map_err(map_err(names::MAP_REVISION, "lookup"))?;
        let next = current.wrapping_add(1).max(1);
        map.set(0, next, 0)
            .map_err(map_err(names::MAP_REVISION, "update"))?;
        Ok(next)
    }
}

/// The endpoints map: host-side ifindex → endpoint id, identity and enforcement flags.
pub struct EndpointsMap(HashMap<MapData, u32, EndpointInfo>, RevisionCounter);

/// One row of [`EndpointsMap::list`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointEntry {
    pub ifindex: u32,
    pub endpoint_id: u32,
    pub identity: u32,
    pub enforce_ingress: bool,
    pub enforce_egress: bool,
}

impl EndpointsMap {
    pub(crate) fn new(map: Map, revision: RevisionCounter) -> Result<Self> {
        let map = HashMap::try_from(map).map_err(map_err(names::MAP_ENDPOINTS, "open"))?;
        Ok(Self(map, revision))
    }

    pub fn open_pinned(pin_dir: &Path) -> Result<Self> {
        Self::new(
            open_pinned(pin_dir, names::MAP_ENDPOINTS)?,
            RevisionCounter::open_pinned(pin_dir)?,
        )
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
            identity: entry.identity,
            flags,
            _pad: 0,
        };
        self.0
            .insert(entry.ifindex, value, 0)
            .map_err(map_err(names::MAP_ENDPOINTS, "insert"))?;
        self.1.bump().map(drop)
    }

    pub fn remove(&mut self, ifindex: u32) -> Result<()> {
        self.0
            .remove(&ifindex)
            .map_err(map_err(names::MAP_ENDPOINTS, "remove"))?;
        self.1.bump().map(drop)
    }

    pub fn list(&self) -> Result<Vec<EndpointEntry>> {
        let mut out = Vec::new();
        for item in self.0.iter() {
            let (ifindex, info) = item.map_err(map_err(names::MAP_ENDPOINTS, "iterate"))?;
            out.push(EndpointEntry {
                ifindex,
                endpoint_id: info.endpoint_id,
                identity: info.identity,
                enforce_ingress: info.flags & endpoint_flags::ENFORCE_INGRESS != 0,
                enforce_egress: info.flags & endpoint_flags::ENFORCE_EGRESS != 0,
            });
        }
        out.sort_by_key(|e| e.endpoint_id);
        Ok(out)
    }
}

/// One ipcache entry: the identity, and for another node's addresses in tunnel mode the
/// node's underlay address (the outer destination `to_tunnel` uses).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpcacheInfo {
    pub identity: u32,
    pub tunnel_endpoint: Option<Ipv4Addr>,
}

/// The ipcache: IPv4 address or prefix → security identity (longest prefix wins; addresses
/// it does not cover are `world` to the datapath).
pub struct IpcacheMap(
    LpmTrie<MapData, IpcacheKeyV4, IpcacheValue>,
    RevisionCounter,
);

fn ipcache_key(prefix: Ipv4Prefix) -> Key<IpcacheKeyV4> {
    Key::new(
        u32::from(prefix.len()),
        IpcacheKeyV4 {
            ip4_be: u32::from_ne_bytes(prefix.addr().octets()),
        },
    )
}

impl IpcacheMap {
    pub(crate) fn new(map: Map, revision: RevisionCounter) -> Result<Self> {
        let map = LpmTrie::try_from(map).map_err(map_err(names::MAP_IPCACHE_V4, "open"))?;
        Ok(Self(map, revision))
    }

    pub fn open_pinned(pin_dir: &Path) -> Result<Self> {
        Self::new(
            open_pinned(pin_dir, names::MAP_IPCACHE_V4)?,
            RevisionCounter::open_pinned(pin_dir)?,
        )
    }

    /// An entry without a tunnel endpoint (a local address, or native routing).
    pub fn upsert(&mut self, prefix: Ipv4Prefix, identity: u32) -> Result<()> {
        self.upsert_info(
            prefix,
            IpcacheInfo {
                identity,
                tunnel_endpoint: None,
            },
        )
    }

    pub fn upsert_info(&mut self, prefix: Ipv4Prefix, info: IpcacheInfo) -> Result<()> {
        let value = IpcacheValue {
            identity: info.identity,
            tunnel_endpoint_be: info
                .tunnel_endpoint
                .map_or(0, |ip| u32::from_ne_bytes(ip.octets())),
        };
        self.0
            .insert(&ipcache_key(prefix), value, 0)
            .map_err(map_err(names::MAP_IPCACHE_V4, "insert"))?;
        self.1.bump().map(drop)
    }

    pub fn remove(&mut self, prefix: Ipv4Prefix) -> Result<()> {
        self.0
            .remove(&ipcache_key(prefix))
            .map_err(map_err(names::MAP_IPCACHE_V4, "remove"))?;
        self.1.bump().map(drop)
    }

    /// The identity of `ip`: its longest matching prefix, `None` if no prefix covers it
    /// (the datapath then treats it as world).
    pub fn lookup(&self, ip: Ipv4Addr) -> Result<Option<u32>> {
        match self.0.get(&ipcache_key(Ipv4Prefix::host(ip)), 0) {
            Ok(value) => Ok(Some(value.identity)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(DatapathError::Map {
                map: names::MAP_IPCACHE_V4,
                op: "lookup",
                source,
            }),
        }
    }

    pub fn list(&self) -> Result<Vec<(Ipv4Prefix, u32)>> {
        Ok(self
            .list_info()?
            .into_iter()
            .map(|(p, info)| (p, info.identity))
            .collect())
    }

    /// Every entry with its tunnel endpoint, sorted by prefix.
    pub fn list_info(&self) -> Result<Vec<(Ipv4Prefix, IpcacheInfo)>> {
        let mut out = Vec::new();
        for item in self.0.iter() {
            let (key, value) = item.map_err(map_err(names::MAP_IPCACHE_V4, "iterate"))?;
            let len = u8::try_from(key.prefix_len()).unwrap_or(32).min(32);
            let addr = Ipv4Addr::from(key.data().ip4_be.to_ne_bytes());
            let tunnel_endpoint = (value.tunnel_endpoint_be != 0)
                .then(|| Ipv4Addr::from(value.tunnel_endpoint_be.to_ne_bytes()));
            out.push((
                Ipv4Prefix { addr, len },
                IpcacheInfo {
                    identity: value.identity,
                    tunnel_endpoint,
                },
            ));
        }
        out.sort();
        Ok(out)
    }
}

/// Which destination ports a policy entry covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortMatch {
    /// Every port (and, with protocol ANY, every protocol).
    Any,
    /// One port (for ICMP: one type).
    Exact(u16),
    /// The ports sharing the top `len` bits (1..=15) of `port`: one aligned piece of a range.
    Prefix { port: u16, len: u8 },
}

impl PortMatch {
    fn bits(self) -> u8 {
        match self {
            Self::Any => 0,
            Self::Exact(_) => 16,
            Self::Prefix { len, .. } => len,
        }
    }

    fn port(self) -> u16 {
        match self {
            Self::Any => 0,
            Self::Exact(p) | Self::Prefix { port: p, .. } => p,
        }
    }

    fn from_bits(port: u16, bits: u8) -> Self {
        match bits {
            0 => Self::Any,
            16.. => Self::Exact(port),
            len => Self::Prefix { port, len },
        }
    }

    /// Lowest and highest port covered.
    pub fn range(self) -> (u16, u16) {
        match self {
            Self::Any => (0, u16::MAX),
            Self::Exact(p) => (p, p),
            Self::Prefix { port, len } => {
                let host = u16::MAX >> len;
                (port & !host, port | host)
            }
        }
    }
}

impl fmt::Display for PortMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("any"),
            Self::Exact(p) => write!(f, "{p}"),
            Self::Prefix { .. } => {
                let (lo, hi) = self.range();
                write!(f, "{lo}-{hi}")
            }
        }
    }
}

/// What a policy entry decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PolicyVerdict {
    Allow,
    Deny,
    /// Allow through the proxy listening on this port.
    Redirect(u16),
}

/// Cilium's precedence levels at the default priority: deny > redirect > allow (the same
/// values `membrane-policy` emits).
pub mod precedence {
    pub const ALLOW: u32 = 1;
    pub const REDIRECT: u32 = 254;
    pub const DENY: u32 = 255;
}

/// One entry of the policy map: for `endpoint_id` in `direction`, traffic with the peer
/// `remote_identity` (0 = any peer) on `protocol` (0 = any, then `ports` must be `Any`) and
/// `ports` gets `verdict`. For ICMP, ports are ICMP types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyRule {
    pub endpoint_id: u32,
    pub direction: Direction,
    pub remote_identity: u32,
    pub protocol: u8,
    pub ports: PortMatch,
    pub verdict: PolicyVerdict,
    /// Higher wins when an exact-identity and an any-identity entry both match.
    pub precedence: u32,
    /// Names the rule that produced the entry.
    pub cookie: u32,
}

impl PolicyRule {
    /// An entry with the default precedence of its verdict.
    pub fn new(
        endpoint_id: u32,
        direction: Direction,
        remote_identity: u32,
        protocol: u8,
        ports: PortMatch,
        verdict: PolicyVerdict,
    ) -> Self {
        let precedence = match verdict {
            PolicyVerdict::Allow => precedence::ALLOW,
            PolicyVerdict::Redirect(_) => precedence::REDIRECT,
            PolicyVerdict::Deny => precedence::DENY,
        };
        Self {
            endpoint_id,
            direction,
            remote_identity,
            protocol,
            ports,
            verdict,
            precedence,
            cookie: 0,
        }
    }

    pub fn with_cookie(mut self, cookie: u32) -> Self {
        self.cookie = cookie;
        self
    }

    fn l4_bits(&self) -> Result<u8> {
        let invalid = |detail: String| DatapathError::Invalid {
            what: "policy entry",
            detail,
        };
        if self.protocol == proto::ANY {
            if self.ports != PortMatch::Any {
                return Err(invalid(format!(
                    "ports {} given with protocol ANY; a port needs a protocol (TCP, UDP, SCTP, ICMP type)",
                    self.ports
                )));
            }
            return Ok(0);
        }
        if let PortMatch::Prefix { len, .. } = self.ports
            && !(1..=15).contains(&len)
        {
            return Err(invalid(format!("port prefix length {len} must be 1-15")));
        }
        if self.protocol == proto::ICMP && self.ports.range().1 > 255 {
            return Err(invalid(format!(
                "ICMP type {} is out of range 0-255",
                self.ports
            )));
        }
        if let PortMatch::Prefix { port, len } = self.ports
            && port & (u16::MAX >> len) != 0
        {
            return Err(invalid(format!(
                "port prefix {port}/{len} has bits set beyond its length; did you mean {}/{len}?",
                port & !(u16::MAX >> len)
            )));
        }
        if let PolicyVerdict::Redirect(0) = self.verdict {
            return Err(invalid("redirect to proxy port 0".into()));
        }
        Ok(8 + self.ports.bits())
    }

    fn key(&self) -> Result<Key<PolicyKey>> {
        let l4_bits = self.l4_bits()?;
        Ok(Key::new(
            PolicyKey::STATIC_BITS + u32::from(l4_bits),
            PolicyKey {
                endpoint_id: self.endpoint_id,
                remote_identity: self.remote_identity,
                direction: self.direction as u8,
                protocol: self.protocol,
                dport_be: self.ports.port().to_be(),
            },
        ))
    }
}

impl fmt::Display for PolicyRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = match self.verdict {
            PolicyVerdict::Allow => "allow".to_owned(),
            PolicyVerdict::Deny => "deny".to_owned(),
            PolicyVerdict::Redirect(p) => format!("redirect:{p}"),
        };
        write!(
            f,
            "endpoint {} {} identity {} {}/{} {} (precedence {}, cookie {})",
            self.endpoint_id,
            self.direction.as_str(),
            self.remote_identity,
            self.ports,
            protocol_name(self.protocol),
            verdict,
            self.precedence,
            self.cookie
        )
    }
}

/// The per-endpoint policy map (one LPM trie for all endpoints).
pub struct PolicyMap(LpmTrie<MapData, PolicyKey, PolicyEntry>, RevisionCounter);

impl PolicyMap {
    pub(crate) fn new(map: Map, revision: RevisionCounter) -> Result<Self> {
        let map = LpmTrie::try_from(map).map_err(map_err(names::MAP_POLICY, "open"))?;
        Ok(Self(map, revision))
    }

    pub fn open_pinned(pin_dir: &Path) -> Result<Self> {
        Self::new(
            open_pinned(pin_dir, names::MAP_POLICY)?,
            RevisionCounter::open_pinned(pin_dir)?,
        )
    }

    /// Inserts or replaces the entry for the rule's key.
    pub fn insert(&mut self, rule: &PolicyRule) -> Result<()> {
        let key = rule.key()?;
        let (flags, proxy_port) = match rule.verdict {
            PolicyVerdict::Allow => (0, 0),
            PolicyVerdict::Deny => (policy_flags::DENY, 0),
            PolicyVerdict::Redirect(port) => (0, port),
        };
        let value = PolicyEntry {
            precedence: rule.precedence,
            cookie: rule.cookie,
            proxy_port_be: proxy_port.to_be(),
            flags,
            l4_prefix_len: rule.l4_bits()?,
        };
        self.0
            .insert(&key, value, 0)
            .map_err(map_err(names::MAP_POLICY, "insert"))?;
        self.1.bump().map(drop)
    }

    /// Removes the entry for the rule's key (verdict, precedence and cookie are ignored).
    pub fn remove(&mut self, rule: &PolicyRule) -> Result<()> {
        let key = rule.key()?;
        self.0
            .remove(&key)
            .map_err(map_err(names::MAP_POLICY, "remove"))?;
        self.1.bump().map(drop)
    }

    pub fn list(&self) -> Result<Vec<PolicyRule>> {
        let mut out = Vec::new();
        for item in self.0.iter() {
            let (key, value) = item.map_err(map_err(names::MAP_POLICY, "iterate"))?;
            let data = key.data();
            let l4_bits = key.prefix_len().saturating_sub(PolicyKey::STATIC_BITS);
            let port_bits = u8::try_from(l4_bits.saturating_sub(8))
                .unwrap_or(16)
                .min(16);
            let proxy_port = u16::from_be(value.proxy_port_be);
            let verdict = if value.flags & policy_flags::DENY != 0 {
                PolicyVerdict::Deny
            } else if proxy_port != 0 {
                PolicyVerdict::Redirect(proxy_port)
            } else {
                PolicyVerdict::Allow
            };
            out.push(PolicyRule {
                endpoint_id: data.endpoint_id,
                direction: Direction::from_u8(data.direction).unwrap_or(Direction::Ingress),
                remote_identity: data.remote_identity,
                protocol: data.protocol,
                ports: PortMatch::from_bits(u16::from_be(data.dport_be), port_bits),
                verdict,
                precedence: value.precedence,
                cookie: value.cookie,
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
    /// Identity of the source when the connection opened.
    pub src_identity: u32,
    /// Proxy port of a redirected connection.
    pub proxy_port: Option<u16>,
    /// Seconds since the last packet.
    pub idle_secs: u64,
    pub rule_cookie: u32,
}

/// The conntrack table.
pub struct CtMap(HashMap<MapData, CtKeyV4, CtEntry>);

/// `bpf_ktime_get_ns()`'s clock (CLOCK_MONOTONIC), in nanoseconds.
pub fn monotonic_ns() -> u64 {
    // SAFETY: zeroed timespec is a valid out-parameter.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer is valid for the call.
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
            let proxy_port = u16::from_be(v.proxy_port_be);
            let direction = Direction::from_u8(v.direction).unwrap_or(Direction::Ingress);
            let local = (
                Ipv4Addr::from(k.local_addr_be.to_ne_bytes()),
                k.local_port_be,
            );
            let remote = (
                Ipv4Addr::from(k.remote_addr_be.to_ne_bytes()),
                k.remote_port_be,
            );
            // Shown as opened: egress from the endpoint's side, ingress from the peer's.
            let (src, dst) = match direction {
                Direction::Egress => (local, remote),
                Direction::Ingress => (remote, local),
            };
            out.push(CtEntryView {
                endpoint_id: k.endpoint_id,
                direction,
                protocol: k.protocol,
                src: src.0,
                sport: u16::from_be(src.1),
                dst: dst.0,
                dport: u16::from_be(dst.1),
                packets_fwd: v.packets_fwd,
                packets_rev: v.packets_rev,
                closing: v.flags & ct_flags::CLOSING != 0,
                seen_reply: v.flags & ct_flags::SEEN_REPLY != 0,
                src_identity: v.src_identity,
                proxy_port: (v.flags & ct_flags::PROXY_REDIRECT != 0).then_some(proxy_port),
                idle_secs: now.saturating_sub(v.last_seen_ns) / 1_000_000_000,
                rule_cookie: v.rule_cookie,
            });
        }
        out.sort_by_key(|e| (e.endpoint_id, e.direction, e.src, e.sport, e.dst, e.dport));
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

    fn slot(&self, index: u32) -> Result<(u64, u64)> {
        let values = self
            .0
            .get(&index, 0)
            .map_err(map_err(names::MAP_METRICS, "lookup"))?;
        Ok(values
            .iter()
            .fold((0, 0), |(p, b), v| (p + v.packets, b + v.bytes)))
    }

    pub fn get(&self, direction: Direction, reason: u8) -> Result<MetricsSample> {
        let (packets, bytes) = self.slot(metrics_index(direction, reason))?;
        Ok(MetricsSample {
            direction,
            reason,
            packets,
            bytes,
        })
    }

    /// Flow events the kernel could not queue (the ring buffer was full).
    pub fn events_lost(&self) -> Result<u64> {
        Ok(self.slot(METRICS_EVENTS_LOST)?.0)
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

/// The one-entry map recording the ABI version of a set of pinned maps.
pub(crate) struct AbiMap(Array<MapData, u32>);

impl AbiMap {
    pub(crate) fn new(map: Map) -> Result<Self> {
        let map = Array::try_from(map).map_err(map_err(names::MAP_ABI, "open"))?;
        Ok(Self(map))
    }

    pub(crate) fn get(&self) -> Result<u32> {
        self.0.get(&0, 0).map_err(map_err(names::MAP_ABI, "lookup"))
    }

    pub(crate) fn set(&mut self, version: u32) -> Result<()> {
        self.0
            .set(0, version, 0)
            .map_err(map_err(names::MAP_ABI, "update"))
    }
}
