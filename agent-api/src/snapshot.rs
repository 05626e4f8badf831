//! What travels on the proxy channel ([`crate::proxy_channel`]) and what the proxy saves in
//! its run directory to serve from after a restart: the HTTP/TLS policy of every local
//! endpoint ([`PolicySnapshot`], changed by [`PolicyDelta`]), the DNS rules
//! ([`DnsSnapshot`]) and the `WasmFilter` attachments ([`FilterSnapshot`]). The agent builds
//! them from its resolved policies; the proxy compiles them. Plain data: no behaviour but
//! diffs and lookups.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::wasm_resource::{CalloutUpstream, FailurePolicy, FilterDirection, FilterProtocol};

/// Which side of a local endpoint a redirected flow is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Leaving a local endpoint: the endpoint is the source.
    Egress,
    /// Entering a local endpoint: the endpoint is the destination.
    Ingress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Egress => "egress",
            Self::Ingress => "ingress",
        })
    }
}

/// Version of the snapshot file format; a file with another version is refused.
pub const SNAPSHOT_FORMAT: u32 = 1;

/// Every local endpoint's HTTP rules, as the agent sends them and as the file stores them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySnapshot {
    /// [`SNAPSHOT_FORMAT`].
    pub format: u32,
    /// The agent's policy revision this snapshot reflects (for diagnostics and to tell a
    /// restored snapshot from a fresh one; the proxy does not interpret it).
    #[serde(default)]
    pub revision: u64,
    #[serde(default)]
    pub endpoints: Vec<SnapshotEndpoint>,
}

impl Default for PolicySnapshot {
    fn default() -> Self {
        Self {
            format: SNAPSHOT_FORMAT,
            revision: 0,
            endpoints: Vec::new(),
        }
    }
}

/// A change from one snapshot revision to the next: the endpoints added or changed, whole,
/// and the ids of those removed. The agent sends these instead of the whole snapshot once the
/// proxy holds `base`; the proxy applies one only on top of exactly `base`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDelta {
    /// The revision this change applies to.
    pub base: u64,
    /// The revision after it.
    pub revision: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upsert: Vec<SnapshotEndpoint>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<u64>,
}

impl PolicyDelta {
    /// What turns `old` into `new` (endpoints compared whole; `new`'s revision).
    pub fn between(old: &PolicySnapshot, new: &PolicySnapshot) -> Self {
        let before: HashMap<u64, &SnapshotEndpoint> =
            old.endpoints.iter().map(|e| (e.id, e)).collect();
        let after: BTreeSet<u64> = new.endpoints.iter().map(|e| e.id).collect();
        Self {
            base: old.revision,
            revision: new.revision,
            upsert: new
                .endpoints
                .iter()
                .filter(|e| before.get(&e.id) != Some(e))
                .cloned()
                .collect(),
            remove: old
                .endpoints
                .iter()
                .map(|e| e.id)
                .filter(|id| !after.contains(id))
                .collect(),
        }
    }

    /// Nothing changes but the revision.
    pub fn is_empty(&self) -> bool {
        self.upsert.is_empty() && self.remove.is_empty()
    }
}

/// One local endpoint: its addresses and the HTTP rules of its redirected ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotEndpoint {
    /// The agent's endpoint id; the proxy's policy store addresses endpoints by it.
    pub id: u64,
    /// The endpoint's addresses: the source of its egress flows, the destination of its
    /// ingress flows.
    pub ips: Vec<IpAddr>,
    #[serde(default)]
    pub ports: Vec<SnapshotPort>,
}

/// The HTTP rules of one direction and TCP port range (the policy engine's `L7RuleSet`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotPort {
    pub direction: Direction,
    /// Destination port (of the original connection).
    pub port: u16,
    /// Last port of a range; `0` (or equal to `port`) means the single port `port`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub end_port: u16,
    /// What the proxy enforces here; absent (older snapshots) is HTTP.
    #[serde(default, skip_serializing_if = "L7Protocol::is_http")]
    pub l7: L7Protocol,
    /// Peer rules, OR'ed.
    #[serde(default)]
    pub peers: Vec<SnapshotPeer>,
}

fn is_zero(value: &u16) -> bool {
    *value == 0
}

/// What a [`SnapshotPort`]'s peer rules hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum L7Protocol {
    /// HTTP requests (`http` rules).
    #[default]
    Http,
    /// TLS connections, by the ClientHello's server name (`server_names`); never terminated.
    Tls,
}

impl L7Protocol {
    pub fn is_http(&self) -> bool {
        *self == Self::Http
    }
}

impl SnapshotPort {
    /// First and last port.
    pub fn range(&self) -> (u16, u16) {
        (self.port, self.end_port.max(self.port))
    }
}

/// HTTP rules for some remote identities (the policy engine's `L7PeerRule`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotPeer {
    /// The remote side: the destination's identity for egress, the source's for ingress.
    pub remotes: Remotes,
    /// OR'ed; empty is the L7 wildcard (every request allowed). HTTP ports only.
    #[serde(default)]
    pub http: Vec<SnapshotHttpRule>,
    /// TLS ports only: allowed server names (`api.example.com`, `*.example.com`), OR'ed;
    /// empty is the L7 wildcard (any connection).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub server_names: Vec<String>,
}

/// Which remote identities a [`SnapshotPeer`] applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Remotes {
    /// Every remote identity (a wildcard selector).
    Any,
    /// These identities (possibly none yet).
    Identities(BTreeSet<u32>),
}

impl Remotes {
    pub fn contains(&self, identity: u32) -> bool {
        match self {
            Self::Any => true,
            Self::Identities(set) => set.contains(&identity),
        }
    }
}

/// One `PortRuleHTTP` in the file (Cilium's field names).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SnapshotHttpRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// `"Name: value"` or `"Name"`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub header_matches: Vec<SnapshotHeaderMatch>,
}

/// One `headerMatches` entry; `mismatch` is `""`, `LOG`, `ADD`, `DELETE` or `REPLACE`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotHeaderMatch {
    pub name: String,
    #[serde(default)]
    pub value: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mismatch: String,
}

// ---- DNS rules ----

/// One `rules.dns` rule set of an endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsSnapshotRule {
    /// 17 UDP or 6 TCP.
    pub protocol: u8,
    pub port: u16,
    pub end_port: u16,
    /// DNS servers (identities) the rule covers; `None` = any.
    pub servers: Option<Vec<u32>>,
    /// `name:<text>` (matchName) or `pattern:<text>` (matchPattern); empty = every name.
    pub selectors: Vec<String>,
    pub cookie: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsSnapshotEndpoint {
    pub id: u64,
    pub ips: Vec<Ipv4Addr>,
    pub rules: Vec<DnsSnapshotRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsSnapshot {
    pub revision: u64,
    pub endpoints: Vec<DnsSnapshotEndpoint>,
}

// ---- WasmFilter attachments ----

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFilter {
    /// `WasmFilter NAMESPACE/NAME`.
    pub key: String,
    pub module: PathBuf,
    pub sha256: String,
    pub config: String,
    /// `spec.protocol`: where the proxy attaches it (HTTP requests or L4 connections); absent
    /// in snapshots saved before the field existed, which held HTTP filters only.
    #[serde(default, skip_serializing_if = "FilterProtocol::is_http")]
    pub protocol: FilterProtocol,
    pub failure_policy: FailurePolicy,
    pub failure_status: u16,
    /// `spec.upstreams`: the callout names the filter may use and their addresses.
    #[serde(default)]
    pub upstreams: Vec<CalloutUpstream>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotAttachment {
    pub endpoint: u64,
    pub ips: Vec<Ipv4Addr>,
    pub direction: FilterDirection,
    /// Empty: every port.
    pub ports: Vec<u16>,
    /// Filter keys, in the order they run.
    pub filters: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilterSnapshot {
    pub revision: u64,
    pub filters: Vec<SnapshotFilter>,
    pub attachments: Vec<SnapshotAttachment>,
    /// What the filters' `source.*` / `destination.*` properties say about peers. Empty when
    /// no filter is attached.
    #[serde(default)]
    pub peers: SnapshotPeers,
}

/// Identity labels and endpoint metadata for the filters' peer properties.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotPeers {
    /// By identity (sorted): the labels as filters see them (`source.labels`).
    pub identities: Vec<SnapshotIdentity>,
    /// Local endpoints (sorted by address).
    pub endpoints: Vec<SnapshotEndpointMeta>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotIdentity {
    pub id: u32,
    /// `(key, value)`: Kubernetes labels without their `k8s:` source, others as
    /// `source:key`.
    pub labels: Vec<(String, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotEndpointMeta {
    pub ip: Ipv4Addr,
    pub namespace: String,
    /// The pod name (`source.workload` / `destination.workload`).
    pub pod: String,
}
