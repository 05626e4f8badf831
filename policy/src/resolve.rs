//! Per-endpoint resolution: from the rules selecting an endpoint and the known identities
//! to (a) datapath policy-map entries and (b) L7 rule sets for the proxy.
//!
//! Owns the semantics of reference §1.6–1.8 and §2.3: per-direction default deny
//! (`enableDefaultDeny`), deny beats allow regardless of specificity, a peer that is both
//! L4-only allowed and L7-restricted on a port is proxied with a wildcard L7 rule (so all
//! its requests pass) while peers that are only L4-allowed there are not proxied at all
//! (Cilium's per-selector redirect, cilium/cilium#7471), port ranges become
//! aligned port prefixes, ICMP types sit in the port field (protocol 1/58), CIDR peers
//! resolve to `cidr:` identities by containment, toFQDNs peers to `fqdn:` label selectors.
//!
//! How entries are built so that the datapath's two LPM lookups (exact identity, then
//! identity 0) give the intended verdict: all contributions for one remote identity (a
//! "bucket") are merged per key by precedence, then a key is kept only if it beats every
//! broader key of the same bucket (an LPM lookup returns only the longest match, so a
//! broader higher-precedence entry must not be hidden by a narrower one). Across buckets
//! the datapath compares precedence itself. A bucket depends only on the (set of)
//! contributions whose selector matches that identity, which makes identity changes
//! incremental, and policy changes too: after recompiling, only buckets of identities
//! matched by a selector whose contributions changed are recomputed (see
//! [`crate::Resolver`]). No I/O.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::ops::Bound;

use serde::{Serialize, Serializer};

use crate::cidr::IpPrefix;
use crate::identity::{Identity, IdentitySet, cidr_identity_labels};
use crate::labels::{LabelSource, Labels, keys};
use crate::model::{Entity, L7Rules, PeerRule, Peers, Port, Protocol, Rule, Subject};
use crate::ports::{PortPrefix, range_to_prefixes};
use crate::repository::Repository;
use crate::selector::{EndpointSelector, Operator, Requirement};

/// Traffic direction, seen from the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Direction {
    /// Towards the endpoint (`egress` bit 0).
    Ingress,
    /// From the endpoint (`egress` bit 1).
    Egress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        })
    }
}

/// A policy-map key: remote identity (0 = any), direction, protocol (0 = any, then the
/// port is fully wildcarded), port with a prefix length over the 16 port bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PolicyKey {
    /// Remote identity; [`Identity::ANY`] matches every peer (the second lookup).
    pub identity: Identity,
    /// Direction.
    pub direction: Direction,
    /// IP protocol number (6, 17, 132, 1, 58) or 0 for any.
    pub protocol: u8,
    /// Port (host order), or ICMP type for protocols 1/58; masked to the prefix.
    pub port: u16,
    /// Significant port bits (0..=16); 0 when `protocol` is 0.
    pub port_prefix_len: u8,
}

impl PolicyKey {
    /// Prefix length over the protocol and port bits, as stored in the entry
    /// (`lpm_prefix_length`, 0..=24).
    pub fn proto_port_prefix_len(&self) -> u8 {
        if self.protocol == 0 {
            0
        } else {
            8 + self.port_prefix_len
        }
    }

    /// Full LPM-trie prefix length of the kernel key (identity and direction are always
    /// significant: 32 + 8 bits).
    pub fn lpm_prefix_len(&self) -> u32 {
        40 + u32::from(self.proto_port_prefix_len())
    }

    /// The port block of this key.
    pub fn port_prefix(&self) -> PortPrefix {
        PortPrefix {
            port: self.port,
            prefix_len: self.port_prefix_len,
        }
    }

    /// True if this key's (protocol, port) block includes `other`'s (identities and
    /// directions are not compared).
    pub fn covers_l4(&self, other: &PolicyKey) -> bool {
        if self.protocol == 0 {
            return true;
        }
        self.protocol == other.protocol && self.port_prefix().covers(other.port_prefix())
    }

    /// True if a packet (protocol, port) hits this key's L4 block.
    pub fn matches_l4(&self, protocol: u8, port: u16) -> bool {
        self.protocol == 0 || (self.protocol == protocol && self.port_prefix().contains(port))
    }

    fn first_of(identity: Identity) -> PolicyKey {
        PolicyKey {
            identity,
            direction: Direction::Ingress,
            protocol: 0,
            port: 0,
            port_prefix_len: 0,
        }
    }
}

impl fmt::Display for PolicyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} id={} ", self.direction, self.identity)?;
        if self.protocol == 0 {
            f.write_str("ANY")
        } else if self.port_prefix_len == 0 {
            write!(f, "{}/ANY", self.protocol)
        } else if self.port_prefix_len == 16 {
            write!(f, "{}/{}", self.protocol, self.port)
        } else {
            let p = self.port_prefix();
            write!(f, "{}/{}-{}", self.protocol, p.first(), p.last())
        }
    }
}

/// What the datapath does on a match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Action {
    /// Drop (policy deny).
    Deny,
    /// Pass.
    Allow,
    /// Pass through the L7 proxy at `proxy_port`.
    Redirect,
}

/// Precedence low byte of deny entries.
pub const PRECEDENCE_DENY: u32 = 255;
/// Precedence low byte of proxy-redirect entries (Cilium: 2..=254 by listener priority;
/// there is one built-in proxy, so one value).
pub const PRECEDENCE_REDIRECT: u32 = 254;
/// Precedence low byte of plain allow entries.
pub const PRECEDENCE_ALLOW: u32 = 1;

/// A policy-map value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct PolicyEntry {
    /// Deny, allow or redirect.
    pub action: Action,
    /// Proxy port for [`Action::Redirect`], else 0.
    pub proxy_port: u16,
    /// Higher wins across the two lookups. High 24 bits: inverted priority (all v2 rules
    /// have priority 0, encoded as 0); low byte: 255 deny, 254 redirect, 1 allow.
    pub precedence: u32,
    /// Names the rule that produced the entry (see [`EndpointPolicy::cookies`]); 0 for
    /// entries not produced by a rule (default allow, allow-localhost).
    pub cookie: u32,
}

impl PolicyEntry {
    /// A deny entry.
    pub fn deny(cookie: u32) -> PolicyEntry {
        PolicyEntry {
            action: Action::Deny,
            proxy_port: 0,
            precedence: PRECEDENCE_DENY,
            cookie,
        }
    }

    /// A plain allow entry.
    pub fn allow(cookie: u32) -> PolicyEntry {
        PolicyEntry {
            action: Action::Allow,
            proxy_port: 0,
            precedence: PRECEDENCE_ALLOW,
            cookie,
        }
    }

    /// A redirect entry.
    pub fn redirect(proxy_port: u16, cookie: u32) -> PolicyEntry {
        PolicyEntry {
            action: Action::Redirect,
            proxy_port,
            precedence: PRECEDENCE_REDIRECT,
            cookie,
        }
    }

    /// Total order used to merge contributions: precedence, then proxy port, then the
    /// smaller cookie (so merging is order-independent).
    fn rank(&self) -> (u32, u16, std::cmp::Reverse<u32>) {
        (
            self.precedence,
            self.proxy_port,
            std::cmp::Reverse(self.cookie),
        )
    }

    fn beats(&self, other: &PolicyEntry) -> bool {
        self.rank() > other.rank()
    }
}

/// Policy enforcement mode (`--enable-policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub enum EnforcementMode {
    /// Enforce a direction once a rule requests default deny for it.
    #[default]
    Default,
    /// Enforce both directions even without rules.
    Always,
    /// Never enforce (rules are ignored; everything allowed).
    Never,
}

/// Parameters of resolution that are not policy or identities.
#[derive(Debug, Clone)]
pub struct ResolveOptions {
    /// Proxy port for HTTP redirects.
    pub http_proxy_port: u16,
    /// Proxy port for DNS redirects.
    pub dns_proxy_port: u16,
    /// Cluster name for the `cluster` entity (`k8s:io.cilium.k8s.policy.cluster=<name>`).
    pub cluster_name: String,
    /// Enforcement mode.
    pub enforcement: EnforcementMode,
    /// `--allow-localhost` auto/always: the host may always reach local (non-host)
    /// endpoints on ingress. Deny rules still apply.
    pub allow_localhost: bool,
    /// Named ports of remote pods for egress rules: name → (protocol, port) pairs in the
    /// cluster (the agent builds this from pod specs).
    pub egress_named_ports: BTreeMap<String, BTreeSet<(Protocol, u16)>>,
}

impl ResolveOptions {
    /// Options with the given proxy ports and defaults otherwise (cluster `default`,
    /// default enforcement, allow-localhost on).
    pub fn new(http_proxy_port: u16, dns_proxy_port: u16) -> ResolveOptions {
        ResolveOptions {
            http_proxy_port,
            dns_proxy_port,
            cluster_name: "default".to_owned(),
            enforcement: EnforcementMode::Default,
            allow_localhost: true,
            egress_named_ports: BTreeMap::new(),
        }
    }
}

/// A local endpoint to resolve policy for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointInfo {
    /// Endpoint id (the caller's numbering).
    pub id: u64,
    /// Security-relevant labels (the host endpoint has `reserved:host`).
    pub labels: Labels,
    /// Container port names of this endpoint (for ingress named ports).
    pub named_ports: BTreeMap<String, BTreeSet<(Protocol, u16)>>,
}

impl EndpointInfo {
    /// An endpoint with labels and no named ports.
    pub fn new(id: u64, labels: Labels) -> EndpointInfo {
        EndpointInfo {
            id,
            labels,
            named_ports: BTreeMap::new(),
        }
    }

    /// Sets the namespace label `k8s:io.kubernetes.pod.namespace`.
    pub fn with_namespace(mut self, namespace: &str) -> EndpointInfo {
        self.labels
            .insert(crate::labels::Label::k8s(keys::POD_NAMESPACE, namespace));
        self
    }

    /// Adds a named port.
    pub fn with_named_port(mut self, name: &str, protocol: Protocol, port: u16) -> EndpointInfo {
        self.named_ports
            .entry(name.to_ascii_lowercase())
            .or_default()
            .insert((protocol, port));
        self
    }

    /// True for the host endpoint (selected by `nodeSelector` rules only).
    pub fn is_host(&self) -> bool {
        self.labels.get(LabelSource::Reserved, "host").is_some()
    }

    /// True if `rule` selects this endpoint.
    pub fn selected_by(&self, rule: &Rule) -> bool {
        match &rule.subject {
            Subject::Endpoints(s) => !self.is_host() && s.matches(&self.labels),
            Subject::Nodes(s) => self.is_host() && s.matches(&self.labels),
        }
    }
}

/// The L7 protocol of a rule set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum L7Parser {
    /// HTTP rules.
    Http,
    /// DNS rules.
    Dns,
    /// TLS server names (`serverNames`), checked on the ClientHello by the HTTP proxy, which
    /// decides per connection whether it speaks HTTP or relays TLS.
    Tls,
}

/// Remote identities an L7 rule applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum RemoteIdentities {
    /// Every peer (wildcard selector).
    Any,
    /// These identities (may be empty until identities appear).
    Set(BTreeSet<Identity>),
}

impl RemoteIdentities {
    /// True if `id` is included.
    pub fn contains(&self, id: Identity) -> bool {
        match self {
            RemoteIdentities::Any => true,
            RemoteIdentities::Set(s) => s.contains(&id),
        }
    }
}

/// L7 rules for one group of peers on one port (ORed with the other peer rules of the set).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct L7PeerRule {
    /// Who it applies to.
    pub remote: RemoteIdentities,
    /// The rules; an empty list allows everything (the L7 wildcard of §1.8).
    pub rules: L7Rules,
    /// Cookie of the rule it came from.
    pub cookie: u32,
}

/// All L7 rules of one (direction, protocol, port range) for an endpoint: what the proxy
/// needs to decide a request. A request is allowed if any peer rule that includes the
/// source/destination identity allows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct L7RuleSet {
    /// Direction.
    pub direction: Direction,
    /// IP protocol number (6 or 17; DNS on ANY gives one set per protocol).
    pub protocol: u8,
    /// First port.
    pub port: u16,
    /// Last port (equal to `port` for a single port).
    pub end_port: u16,
    /// HTTP, DNS or TLS (server names).
    pub parser: L7Parser,
    /// Proxy port the datapath redirects to.
    pub proxy_port: u16,
    /// Peer rules (ORed).
    pub rules: Vec<L7PeerRule>,
}

/// The resolved policy of one endpoint.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EndpointPolicy {
    /// Endpoint id.
    pub endpoint_id: u64,
    /// Ingress is default-deny.
    pub enforce_ingress: bool,
    /// Egress is default-deny.
    pub enforce_egress: bool,
    /// Policy-map entries.
    #[serde(serialize_with = "serialize_entries")]
    pub entries: BTreeMap<PolicyKey, PolicyEntry>,
    /// L7 rule sets for the proxy.
    pub l7: Vec<L7RuleSet>,
    /// CIDR prefixes referenced by the endpoint's rules with their identities: the ipcache
    /// must map each prefix to its identity.
    pub cidr_prefixes: BTreeMap<IpPrefix, Identity>,
    /// Referenced prefixes whose `cidr:` identity is not in the identity set yet (allocate
    /// them, see [`IdentitySet::ensure_cidr_identities`], and resolve again).
    pub missing_cidr_identities: BTreeSet<IpPrefix>,
    /// Cookie → rule origin (`CiliumNetworkPolicy ns/name specs[1] egress[0]`).
    pub cookies: BTreeMap<u32, String>,
    /// Non-fatal problems (unresolved named ports, unsupported toServices, conflicting L7
    /// types on one port).
    pub warnings: Vec<String>,
}

fn serialize_entries<S: Serializer>(
    entries: &BTreeMap<PolicyKey, PolicyEntry>,
    s: S,
) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Row<'a> {
        key: &'a PolicyKey,
        entry: &'a PolicyEntry,
    }
    s.collect_seq(entries.iter().map(|(key, entry)| Row { key, entry }))
}

impl EndpointPolicy {
    /// The verdict the datapath would reach for a packet, emulating its two LPM lookups
    /// and tie-breaks (precedence, then longer prefix, then the identity-specific match).
    /// `None` means no entry matched: dropped by default deny.
    pub fn lookup(
        &self,
        remote: Identity,
        direction: Direction,
        protocol: u8,
        port: u16,
    ) -> Option<&PolicyEntry> {
        let lpm = |id: Identity| {
            self.entries
                .range(PolicyKey::first_of(id)..)
                .take_while(|(k, _)| k.identity == id)
                .filter(|(k, _)| k.direction == direction && k.matches_l4(protocol, port))
                .max_by_key(|(k, _)| k.proto_port_prefix_len())
        };
        let l3 = if remote == Identity::ANY {
            None
        } else {
            lpm(remote)
        };
        let l4 = lpm(Identity::ANY);
        match (l3, l4) {
            (None, None) => None,
            (Some((_, e)), None) | (None, Some((_, e))) => Some(e),
            (Some((k3, e3)), Some((k4, e4))) => {
                if e4.precedence > e3.precedence
                    || (e4.precedence == e3.precedence
                        && k4.proto_port_prefix_len() > k3.proto_port_prefix_len())
                {
                    Some(e4)
                } else {
                    Some(e3)
                }
            }
        }
    }

    /// The L7 rule sets that apply to a (direction, protocol, port).
    pub fn l7_for(
        &self,
        direction: Direction,
        protocol: u8,
        port: u16,
    ) -> impl Iterator<Item = &L7RuleSet> {
        self.l7.iter().filter(move |s| {
            s.direction == direction
                && s.protocol == protocol
                && (s.port..=s.end_port).contains(&port)
        })
    }
}

/// Added, changed and removed policy-map entries between two resolutions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EntryDiff {
    /// New keys.
    #[serde(serialize_with = "serialize_entries")]
    pub added: BTreeMap<PolicyKey, PolicyEntry>,
    /// Keys whose value changed (new value).
    #[serde(serialize_with = "serialize_entries")]
    pub changed: BTreeMap<PolicyKey, PolicyEntry>,
    /// Keys that disappeared (their value before removal; after [`EntryDiff::merge`], the
    /// value as of the diff that removed them).
    #[serde(serialize_with = "serialize_entries")]
    pub removed: BTreeMap<PolicyKey, PolicyEntry>,
}

impl EntryDiff {
    /// True if nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }

    /// Applies the diff to a map (as the datapath writer would).
    pub fn apply_to(&self, entries: &mut BTreeMap<PolicyKey, PolicyEntry>) {
        for k in self.removed.keys() {
            entries.remove(k);
        }
        for (k, v) in self.added.iter().chain(&self.changed) {
            entries.insert(*k, *v);
        }
    }

    /// Folds a later diff into this one.
    pub fn merge(&mut self, later: EntryDiff) {
        for (k, v) in later.removed {
            if self.added.remove(&k).is_none() {
                self.changed.remove(&k);
                self.removed.insert(k, v);
            }
        }
        for (k, v) in later.added {
            if let Some(old) = self.removed.remove(&k) {
                if old != v {
                    self.changed.insert(k, v);
                }
            } else {
                self.added.insert(k, v);
            }
        }
        for (k, v) in later.changed {
            if let Some(a) = self.added.get_mut(&k) {
                *a = v;
            } else {
                self.changed.insert(k, v);
            }
        }
    }
}

/// Differences between two entry maps.
pub fn diff_entries(
    old: &BTreeMap<PolicyKey, PolicyEntry>,
    new: &BTreeMap<PolicyKey, PolicyEntry>,
) -> EntryDiff {
    let mut d = EntryDiff::default();
    for (k, v) in old {
        match new.get(k) {
            None => {
                d.removed.insert(*k, *v);
            }
            Some(n) if n != v => {
                d.changed.insert(*k, *n);
            }
            Some(_) => {}
        }
    }
    for (k, v) in new {
        if !old.contains_key(k) {
            d.added.insert(*k, *v);
        }
    }
    d
}

/// Entry differences between two resolutions of an endpoint.
pub fn diff(old: &EndpointPolicy, new: &EndpointPolicy) -> EntryDiff {
    diff_entries(&old.entries, &new.entries)
}

/// Resolves the policy of one endpoint from scratch.
pub fn resolve_endpoint(
    repo: &Repository,
    endpoint: &EndpointInfo,
    identities: &IdentitySet,
    options: &ResolveOptions,
) -> EndpointPolicy {
    compile(repo, endpoint, options).materialize(endpoint.id, identities)
}

// ---------------------------------------------------------------------------------------
// Compilation: rules selecting the endpoint → identity-independent contributions.

/// Who a contribution applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum PeerSel {
    /// Every identity: entries keyed by identity 0.
    Wildcard,
    /// Identities matching `selectors[i]`.
    Sel(usize),
}

#[derive(Debug, Clone)]
struct Contribution {
    direction: Direction,
    peer: PeerSel,
    /// (protocol, port block) pairs.
    keys: std::sync::Arc<[(u8, PortPrefix)]>,
    entry: PolicyEntry,
}

#[derive(Debug, Clone)]
struct L7Template {
    direction: Direction,
    protocol: u8,
    port: u16,
    end_port: u16,
    parser: L7Parser,
    proxy_port: u16,
    rules: Vec<(PeerSel, L7Rules, u32)>,
}

/// The identity-independent form of an endpoint's policy.
#[derive(Debug, Clone)]
pub(crate) struct CompiledPolicy {
    enforce_ingress: bool,
    enforce_egress: bool,
    selectors: Vec<EndpointSelector>,
    contributions: Vec<Contribution>,
    /// Indices into `contributions` per selector (`PeerSel::Sel(i)` → `by_selector[i]`), so
    /// that a bucket visits only the contributions of the selectors matching its identity.
    by_selector: Vec<Vec<usize>>,
    /// Indices into `contributions` of the wildcard peer (the identity-0 bucket).
    wildcard: Vec<usize>,
    l7: Vec<L7Template>,
    cidr_prefixes: BTreeSet<IpPrefix>,
    cookies: BTreeMap<u32, String>,
    warnings: Vec<String>,
}

/// One L4 item of a peer rule, before prefix expansion.
#[derive(Debug, Clone)]
struct L4Item {
    protocol: u8,
    first: u16,
    last: u16,
    l7: Option<L7Rules>,
}

type FilterKey = (Direction, u8, u16, u16);

struct FilterMember {
    peer: PeerSel,
    l7: Option<L7Rules>,
    cookie: u32,
}

struct Builder<'a> {
    opts: &'a ResolveOptions,
    endpoint: &'a EndpointInfo,
    selectors: Vec<EndpointSelector>,
    index: HashMap<EndpointSelector, usize>,
    contributions: Vec<Contribution>,
    filters: BTreeMap<FilterKey, Vec<FilterMember>>,
    cidr_prefixes: BTreeSet<IpPrefix>,
    cookies: BTreeMap<u32, String>,
    warnings: Vec<String>,
}

/// The selectors an entity stands for (reference §1.3). `cluster` needs the cluster name
/// (`k8s:io.cilium.k8s.policy.cluster=<name>` plus the in-cluster reserved identities);
/// `all` is the wildcard; `none` selects nothing.
pub fn entity_selectors(entity: Entity, cluster_name: &str) -> Vec<EndpointSelector> {
    let reserved = EndpointSelector::reserved;
    match entity {
        Entity::All => vec![EndpointSelector::wildcard()],
        Entity::World => vec![
            reserved("world"),
            reserved("world-ipv4"),
            reserved("world-ipv6"),
        ],
        Entity::Cluster => {
            let mut v: Vec<EndpointSelector> = [
                "host",
                "remote-node",
                "init",
                "ingress",
                "health",
                "unmanaged",
                "kube-apiserver",
            ]
            .into_iter()
            .map(reserved)
            .collect();
            v.push(EndpointSelector::from_labels(&[crate::labels::Label::k8s(
                keys::POLICY_CLUSTER,
                cluster_name,
            )]));
            v
        }
        Entity::Host => vec![reserved("host")],
        Entity::Init => vec![reserved("init")],
        Entity::Ingress => vec![reserved("ingress")],
        Entity::Unmanaged => vec![reserved("unmanaged")],
        Entity::RemoteNode => vec![reserved("remote-node")],
        Entity::Health => vec![reserved("health")],
        Entity::KubeApiserver => vec![reserved("kube-apiserver")],
        Entity::None => vec![],
    }
}

/// FNV-1a, 32 bit: a stable cookie for a rule origin string.
fn cookie_of(origin: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in origin.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    // 0 is reserved for "no rule".
    if h == 0 { 1 } else { h }
}

fn parser_of(r: &L7Rules) -> L7Parser {
    match r {
        L7Rules::Http(_) => L7Parser::Http,
        L7Rules::Dns(_) => L7Parser::Dns,
        L7Rules::Tls(_) => L7Parser::Tls,
    }
}

fn keys_for(protocol: u8, first: u16, last: u16) -> std::sync::Arc<[(u8, PortPrefix)]> {
    if protocol == 0 {
        return std::sync::Arc::from(vec![(0u8, PortPrefix::ALL)]);
    }
    range_to_prefixes(first, last)
        .into_iter()
        .map(|p| (protocol, p))
        .collect::<Vec<_>>()
        .into()
}

impl<'a> Builder<'a> {
    fn selector(&mut self, s: EndpointSelector) -> PeerSel {
        if s.is_wildcard() {
            return PeerSel::Wildcard;
        }
        if let Some(i) = self.index.get(&s) {
            return PeerSel::Sel(*i);
        }
        let i = self.selectors.len();
        self.index.insert(s.clone(), i);
        self.selectors.push(s);
        PeerSel::Sel(i)
    }

    fn entity(&mut self, e: Entity, out: &mut Vec<PeerSel>) {
        for s in entity_selectors(e, &self.opts.cluster_name) {
            out.push(self.selector(s));
        }
    }

    fn peers(&mut self, rule: &PeerRule, origin: &str) -> Vec<PeerSel> {
        let mut out = Vec::new();
        match &rule.peers {
            Peers::Unspecified => {
                if rule.has_l4() {
                    out.push(PeerSel::Wildcard);
                }
            }
            Peers::Endpoints(v) => {
                for s in v {
                    out.push(self.selector(s.clone()));
                }
            }
            Peers::Entities(v) => {
                for e in v {
                    self.entity(*e, &mut out);
                }
            }
            Peers::Cidrs(v) => {
                for c in v {
                    self.cidr_prefixes.insert(c.cidr);
                    self.cidr_prefixes.extend(c.except.iter().copied());
                    let excepts: Vec<Requirement> = c
                        .except
                        .iter()
                        .map(|e| Requirement {
                            source: LabelSource::Cidr,
                            key: e.to_string(),
                            op: Operator::DoesNotExist,
                        })
                        .collect();
                    let mut reqs = excepts.clone();
                    reqs.push(Requirement {
                        source: LabelSource::Cidr,
                        key: c.cidr.to_string(),
                        op: Operator::Exists,
                    });
                    out.push(self.selector(EndpointSelector::from_requirements(reqs)));
                    if c.cidr.is_default_route() {
                        // 0.0.0.0/0 and ::/0 also select the world identities.
                        let fam = if c.cidr.is_ipv4() {
                            "world-ipv4"
                        } else {
                            "world-ipv6"
                        };
                        for w in ["world", fam] {
                            let mut reqs = excepts.clone();
                            reqs.push(Requirement {
                                source: LabelSource::Reserved,
                                key: w.to_owned(),
                                op: Operator::Exists,
                            });
                            out.push(self.selector(EndpointSelector::from_requirements(reqs)));
                        }
                    }
                }
            }
            Peers::Fqdns(v) => {
                for f in v {
                    let req = Requirement {
                        source: LabelSource::Fqdn,
                        key: f.text().to_owned(),
                        op: Operator::Exists,
                    };
                    out.push(self.selector(EndpointSelector::from_requirements(vec![req])));
                }
            }
            Peers::Services(_) => {
                self.warnings.push(format!(
                    "{origin}: toServices is not resolved yet; the rule allows nothing"
                ));
            }
        }
        out
    }

    fn named_port(
        &mut self,
        dir: Direction,
        name: &str,
        protocol: Protocol,
        origin: &str,
    ) -> Vec<(Protocol, u16)> {
        let table = match dir {
            Direction::Ingress => &self.endpoint.named_ports,
            Direction::Egress => &self.opts.egress_named_ports,
        };
        let found: Vec<(Protocol, u16)> = table
            .get(name)
            .map(|s| {
                s.iter()
                    .filter(|(p, _)| protocol == Protocol::Any || *p == protocol)
                    .copied()
                    .collect()
            })
            .unwrap_or_default();
        if found.is_empty() {
            self.warnings.push(format!(
                "{origin}: named port {name:?} ({}) does not resolve for {dir}; it allows nothing",
                protocol.as_str()
            ));
        }
        found
    }

    fn l4_items(&mut self, dir: Direction, rule: &PeerRule, origin: &str) -> Vec<L4Item> {
        let mut out = Vec::new();
        if !rule.has_l4() {
            out.push(L4Item {
                protocol: 0,
                first: 0,
                last: u16::MAX,
                l7: None,
            });
            return out;
        }
        for f in &rule.icmps {
            out.push(L4Item {
                protocol: f.protocol(),
                first: u16::from(f.icmp_type),
                last: u16::from(f.icmp_type),
                l7: None,
            });
        }
        for pr in &rule.to_ports {
            if pr.ports.is_empty() {
                out.push(L4Item {
                    protocol: 0,
                    first: 0,
                    last: u16::MAX,
                    l7: pr.rules.clone(),
                });
            }
            for pp in &pr.ports {
                match &pp.port {
                    Port::Number(0) => {
                        if pp.protocol == Protocol::Any {
                            out.push(L4Item {
                                protocol: 0,
                                first: 0,
                                last: u16::MAX,
                                l7: pr.rules.clone(),
                            });
                        } else {
                            out.push(L4Item {
                                protocol: pp.protocol.number(),
                                first: 0,
                                last: u16::MAX,
                                l7: pr.rules.clone(),
                            });
                        }
                    }
                    Port::Number(n) => {
                        let last = pp.end_port.filter(|e| e > n).unwrap_or(*n);
                        for p in pp.protocol.expand() {
                            out.push(L4Item {
                                protocol: p.number(),
                                first: *n,
                                last,
                                l7: pr.rules.clone(),
                            });
                        }
                    }
                    Port::Named(name) => {
                        for (p, n) in self.named_port(dir, name, pp.protocol, origin) {
                            out.push(L4Item {
                                protocol: p.number(),
                                first: n,
                                last: n,
                                l7: pr.rules.clone(),
                            });
                        }
                    }
                }
            }
        }
        out
    }

    fn add_rule_section(
        &mut self,
        dir: Direction,
        deny: bool,
        rules: &[PeerRule],
        origin: &str,
        section: &str,
    ) {
        for (i, pr) in rules.iter().enumerate() {
            let o = format!("{origin} {section}[{i}]");
            let cookie = cookie_of(&o);
            self.cookies.entry(cookie).or_insert_with(|| o.clone());
            let peers = self.peers(pr, &o);
            if peers.is_empty() {
                continue;
            }
            let items = self.l4_items(dir, pr, &o);
            for item in items {
                if deny {
                    let keys = keys_for(item.protocol, item.first, item.last);
                    for peer in &peers {
                        self.contributions.push(Contribution {
                            direction: dir,
                            peer: *peer,
                            keys: keys.clone(),
                            entry: PolicyEntry::deny(cookie),
                        });
                    }
                } else {
                    let fk = (dir, item.protocol, item.first, item.last);
                    let members = self.filters.entry(fk).or_default();
                    for peer in &peers {
                        members.push(FilterMember {
                            peer: *peer,
                            l7: item.l7.clone(),
                            cookie,
                        });
                    }
                }
            }
        }
    }

    fn finish(mut self, enforce_ingress: bool, enforce_egress: bool) -> CompiledPolicy {
        let mut l7 = Vec::new();
        let filters = std::mem::take(&mut self.filters);
        for ((dir, protocol, first, last), members) in filters {
            let keys = keys_for(protocol, first, last);
            let parser = members
                .iter()
                .filter_map(|m| m.l7.as_ref().map(parser_of))
                .min();
            let Some(parser) = parser else {
                for m in members {
                    self.contributions.push(Contribution {
                        direction: dir,
                        peer: m.peer,
                        keys: keys.clone(),
                        entry: PolicyEntry::allow(m.cookie),
                    });
                }
                continue;
            };
            let proxy_port = match parser {
                L7Parser::Http | L7Parser::Tls => self.opts.http_proxy_port,
                L7Parser::Dns => self.opts.dns_proxy_port,
            };
            let mut t = L7Template {
                direction: dir,
                protocol,
                port: first,
                end_port: last,
                parser,
                proxy_port,
                rules: Vec::new(),
            };
            for m in members {
                let (rules, entry) = match m.l7 {
                    Some(r) if parser_of(&r) != parser => {
                        let origin = self.cookies.get(&m.cookie).cloned().unwrap_or_default();
                        self.warnings.push(format!(
                            "{origin}: L7 rules of different types on {dir} {protocol}/{first}-{last}; the {:?} rules are dropped and allow nothing",
                            parser_of(&r)
                        ));
                        continue;
                    }
                    Some(r) => (r, PolicyEntry::redirect(proxy_port, m.cookie)),
                    // The L7 wildcard of §1.8: an L4-only allow on a proxied port. Its own
                    // entries are plain allows: identities it shares with an L7 member are
                    // redirected by that member's higher-precedence entry and then pass the
                    // proxy through this wildcard; identities only it selects never reach
                    // the proxy (Cilium redirects per selector, cilium/cilium#7471), so e.g.
                    // non-HTTP traffic of an L4-only peer keeps working.
                    None => (
                        match parser {
                            L7Parser::Http => L7Rules::Http(Vec::new()),
                            L7Parser::Dns => L7Rules::Dns(Vec::new()),
                            L7Parser::Tls => L7Rules::Tls(Vec::new()),
                        },
                        PolicyEntry::allow(m.cookie),
                    ),
                };
                self.contributions.push(Contribution {
                    direction: dir,
                    peer: m.peer,
                    keys: keys.clone(),
                    entry,
                });
                if !t.rules.iter().any(|(p, r, _)| *p == m.peer && *r == rules) {
                    t.rules.push((m.peer, rules, m.cookie));
                }
            }
            l7.push(t);
        }
        let all = std::sync::Arc::from(vec![(0u8, PortPrefix::ALL)]);
        for (dir, enforce) in [
            (Direction::Ingress, enforce_ingress),
            (Direction::Egress, enforce_egress),
        ] {
            if !enforce {
                self.contributions.push(Contribution {
                    direction: dir,
                    peer: PeerSel::Wildcard,
                    keys: std::sync::Arc::clone(&all),
                    entry: PolicyEntry::allow(0),
                });
            }
        }
        if self.opts.allow_localhost && enforce_ingress && !self.endpoint.is_host() {
            let host = self.selector(EndpointSelector::reserved("host"));
            self.contributions.push(Contribution {
                direction: Direction::Ingress,
                peer: host,
                keys: all,
                entry: PolicyEntry::allow(0),
            });
        }
        let mut by_selector = vec![Vec::new(); self.selectors.len()];
        let mut wildcard = Vec::new();
        for (ci, c) in self.contributions.iter().enumerate() {
            match c.peer {
                PeerSel::Wildcard => wildcard.push(ci),
                PeerSel::Sel(i) => by_selector[i].push(ci),
            }
        }
        CompiledPolicy {
            enforce_ingress,
            enforce_egress,
            selectors: self.selectors,
            contributions: self.contributions,
            by_selector,
            wildcard,
            l7,
            cidr_prefixes: self.cidr_prefixes,
            cookies: self.cookies,
            warnings: self.warnings,
        }
    }
}

/// Compiles the rules of `repo` that select `endpoint`.
pub(crate) fn compile(
    repo: &Repository,
    endpoint: &EndpointInfo,
    opts: &ResolveOptions,
) -> CompiledPolicy {
    let mut b = Builder {
        opts,
        endpoint,
        selectors: Vec::new(),
        index: HashMap::new(),
        contributions: Vec::new(),
        filters: BTreeMap::new(),
        cidr_prefixes: BTreeSet::new(),
        cookies: BTreeMap::new(),
        warnings: Vec::new(),
    };
    let (mut enforce_ingress, mut enforce_egress) = match opts.enforcement {
        EnforcementMode::Always => (true, true),
        _ => (false, false),
    };
    if opts.enforcement != EnforcementMode::Never {
        for (_, rule) in repo.rules() {
            if !endpoint.selected_by(rule) {
                continue;
            }
            enforce_ingress |= rule.enable_default_deny.ingress;
            enforce_egress |= rule.enable_default_deny.egress;
            b.add_rule_section(
                Direction::Ingress,
                false,
                &rule.ingress,
                &rule.origin,
                "ingress",
            );
            b.add_rule_section(
                Direction::Ingress,
                true,
                &rule.ingress_deny,
                &rule.origin,
                "ingressDeny",
            );
            b.add_rule_section(
                Direction::Egress,
                false,
                &rule.egress,
                &rule.origin,
                "egress",
            );
            b.add_rule_section(
                Direction::Egress,
                true,
                &rule.egress_deny,
                &rule.origin,
                "egressDeny",
            );
        }
    }
    b.finish(enforce_ingress, enforce_egress)
}

impl CompiledPolicy {
    /// The peer selectors (`PeerSel::Sel(i)` names `selectors()[i]`).
    pub(crate) fn selectors(&self) -> &[EndpointSelector] {
        &self.selectors
    }

    /// Indices of the selectors that match `labels`, ascending.
    pub(crate) fn matched(&self, labels: &Labels) -> Vec<usize> {
        self.selectors
            .iter()
            .enumerate()
            .filter(|(_, s)| s.matches(labels))
            .map(|(i, _)| i)
            .collect()
    }

    /// Entries of one remote identity, given the indices of the selectors matching it
    /// (from [`Self::matched`] or a selector cache; ignored for [`Identity::ANY`], whose
    /// bucket holds the wildcard's contributions). Merging is order-independent (see
    /// `PolicyEntry::rank`), so contributions are visited per selector.
    pub(crate) fn bucket(
        &self,
        id: Identity,
        matched: &[usize],
    ) -> BTreeMap<PolicyKey, PolicyEntry> {
        let mut raw: BTreeMap<PolicyKey, PolicyEntry> = BTreeMap::new();
        let mut add = |ci: usize| {
            let c = &self.contributions[ci];
            for (protocol, pp) in c.keys.iter() {
                let key = PolicyKey {
                    identity: id,
                    direction: c.direction,
                    protocol: *protocol,
                    port: pp.first(),
                    port_prefix_len: if *protocol == 0 { 0 } else { pp.prefix_len },
                };
                raw.entry(key)
                    .and_modify(|e| {
                        if c.entry.beats(e) {
                            *e = c.entry;
                        }
                    })
                    .or_insert(c.entry);
            }
        };
        if id == Identity::ANY {
            self.wildcard.iter().for_each(|ci| add(*ci));
        } else {
            for i in matched {
                if let Some(cs) = self.by_selector.get(*i) {
                    cs.iter().for_each(|ci| add(*ci));
                }
            }
        }
        // Keep a key only if it beats every broader key of the bucket (see module docs).
        raw.iter()
            .filter(|(k, e)| !ancestors(k).any(|a| raw.get(&a).is_some_and(|ae| !e.beats(ae))))
            .map(|(k, e)| (*k, *e))
            .collect()
    }

    /// The L7 rule sets, with the identities of selector `i` given by `remote(i)`.
    fn l7_sets(&self, remote: &dyn Fn(usize) -> BTreeSet<Identity>) -> Vec<L7RuleSet> {
        self.l7
            .iter()
            .map(|t| L7RuleSet {
                direction: t.direction,
                protocol: t.protocol,
                port: t.port,
                end_port: t.end_port,
                parser: t.parser,
                proxy_port: t.proxy_port,
                rules: t
                    .rules
                    .iter()
                    .map(|(peer, rules, cookie)| L7PeerRule {
                        remote: match peer {
                            PeerSel::Wildcard => RemoteIdentities::Any,
                            PeerSel::Sel(i) => RemoteIdentities::Set(remote(*i)),
                        },
                        rules: rules.clone(),
                        cookie: *cookie,
                    })
                    .collect(),
            })
            .collect()
    }

    pub(crate) fn cidr_map(
        &self,
        identities: &IdentitySet,
    ) -> (BTreeMap<IpPrefix, Identity>, BTreeSet<IpPrefix>) {
        let mut found = BTreeMap::new();
        let mut missing = BTreeSet::new();
        for p in &self.cidr_prefixes {
            match identities.lookup(&cidr_identity_labels(*p)) {
                Some(id) => {
                    found.insert(*p, id);
                }
                None => {
                    missing.insert(*p);
                }
            }
        }
        (found, missing)
    }

    /// An endpoint policy from materialized entries and L7 sets, the rest from `self`.
    fn assemble(
        &self,
        endpoint_id: u64,
        entries: BTreeMap<PolicyKey, PolicyEntry>,
        l7: Vec<L7RuleSet>,
        identities: &IdentitySet,
    ) -> EndpointPolicy {
        let (cidr_prefixes, missing_cidr_identities) = self.cidr_map(identities);
        EndpointPolicy {
            endpoint_id,
            enforce_ingress: self.enforce_ingress,
            enforce_egress: self.enforce_egress,
            entries,
            l7,
            cidr_prefixes,
            missing_cidr_identities,
            cookies: self.cookies.clone(),
            warnings: self.warnings.clone(),
        }
    }

    /// Full materialization against an identity set, matching every selector against
    /// every identity.
    pub(crate) fn materialize(&self, endpoint_id: u64, identities: &IdentitySet) -> EndpointPolicy {
        // Buckets come out in identity order (identity 0 first), so collecting them into
        // one sorted Vec lets the map be bulk-built.
        let mut entries: Vec<(PolicyKey, PolicyEntry)> =
            self.bucket(Identity::ANY, &[]).into_iter().collect();
        let mut per_selector = vec![BTreeSet::new(); self.selectors.len()];
        for (id, labels) in identities.iter() {
            if id == Identity::ANY {
                continue;
            }
            let matched = self.matched(labels);
            for i in &matched {
                per_selector[*i].insert(id);
            }
            if !matched.is_empty() {
                entries.extend(self.bucket(id, &matched));
            }
        }
        let l7 = self.l7_sets(&|i| per_selector[i].clone());
        self.assemble(endpoint_id, entries.into_iter().collect(), l7, identities)
    }

    /// Full materialization with the identities of selector `i` given by `matches(i)`
    /// (a selector cache's view of `identities`): no selector matching at all.
    pub(crate) fn materialize_with<'m>(
        &self,
        endpoint_id: u64,
        identities: &IdentitySet,
        matches: &dyn Fn(usize) -> &'m BTreeSet<Identity>,
    ) -> EndpointPolicy {
        let mut inverse: BTreeMap<Identity, Vec<usize>> = BTreeMap::new();
        for i in 0..self.selectors.len() {
            for id in matches(i) {
                inverse.entry(*id).or_default().push(i);
            }
        }
        let mut entries: Vec<(PolicyKey, PolicyEntry)> =
            self.bucket(Identity::ANY, &[]).into_iter().collect();
        for (id, matched) in &inverse {
            if *id != Identity::ANY {
                entries.extend(self.bucket(*id, matched));
            }
        }
        let l7 = self.l7_sets(&|i| matches(i).clone());
        self.assemble(endpoint_id, entries.into_iter().collect(), l7, identities)
    }

    /// Replaces the entries of one identity's bucket in `entries` (`matched` as for
    /// [`Self::bucket`]) and returns the diff.
    pub(crate) fn replace_bucket(
        &self,
        entries: &mut BTreeMap<PolicyKey, PolicyEntry>,
        id: Identity,
        matched: &[usize],
    ) -> EntryDiff {
        let upper = match id.0.checked_add(1) {
            Some(n) => Bound::Excluded(PolicyKey::first_of(Identity(n))),
            None => Bound::Unbounded,
        };
        let old: BTreeMap<PolicyKey, PolicyEntry> = entries
            .range((Bound::Included(PolicyKey::first_of(id)), upper))
            .map(|(k, v)| (*k, *v))
            .collect();
        let new = if id == Identity::ANY || !matched.is_empty() {
            self.bucket(id, matched)
        } else {
            BTreeMap::new()
        };
        let d = diff_entries(&old, &new);
        d.apply_to(entries);
        d
    }

    /// An endpoint policy with the given (already materialized) entries and everything
    /// else materialized from `self`, with the identities of selector `i` given by
    /// `matches(i)`.
    pub(crate) fn with_entries<'m>(
        &self,
        endpoint_id: u64,
        entries: BTreeMap<PolicyKey, PolicyEntry>,
        identities: &IdentitySet,
        matches: &dyn Fn(usize) -> &'m BTreeSet<Identity>,
    ) -> EndpointPolicy {
        let l7 = self.l7_sets(&|i| matches(i).clone());
        self.assemble(endpoint_id, entries, l7, identities)
    }

    /// Updates a materialized policy for one identity that appeared, changed, or
    /// disappeared; `matched` are the selectors matching it now (empty if it is gone).
    /// `cidr_may_change` is false when neither the identity's old nor new labels can be a
    /// CIDR identity's, so the CIDR map is unaffected. Returns the entry diff and whether
    /// L7 sets changed.
    pub(crate) fn update_identity(
        &self,
        policy: &mut EndpointPolicy,
        id: Identity,
        matched: &[usize],
        cidr_may_change: bool,
        identities: &IdentitySet,
    ) -> (EntryDiff, bool) {
        if id == Identity::ANY {
            return (EntryDiff::default(), false);
        }
        let d = self.replace_bucket(&mut policy.entries, id, matched);
        let mut l7_changed = false;
        for (set, t) in policy.l7.iter_mut().zip(&self.l7) {
            for (rule, (peer, _, _)) in set.rules.iter_mut().zip(&t.rules) {
                if let (PeerSel::Sel(i), RemoteIdentities::Set(ids)) = (peer, &mut rule.remote) {
                    let changed = if matched.contains(i) {
                        ids.insert(id)
                    } else {
                        ids.remove(&id)
                    };
                    l7_changed |= changed;
                }
            }
        }
        if cidr_may_change {
            let (found, missing) = self.cidr_map(identities);
            policy.cidr_prefixes = found;
            policy.missing_cidr_identities = missing;
        }
        (d, l7_changed)
    }

    /// The contributions of a peer (indices into `contributions`) as a comparable set.
    fn contribution_set(&self, indices: &[usize]) -> Vec<ContributionKey<'_>> {
        let mut v: Vec<ContributionKey<'_>> = indices
            .iter()
            .map(|ci| {
                let c = &self.contributions[*ci];
                (
                    c.direction,
                    &c.keys[..],
                    c.entry.action,
                    c.entry.precedence,
                    c.entry.proxy_port,
                    c.entry.cookie,
                )
            })
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// What a contribution adds to a bucket: direction, (protocol, port block)s and the entry.
type ContributionKey<'a> = (Direction, &'a [(u8, PortPrefix)], Action, u32, u16, u32);

/// Compares two compilations of one endpoint peer by peer. Selectors are named by the
/// caller's ids (`old_ids[i]` names `old.selectors()[i]`, `new_ids[i]` names
/// `new.selectors()[i]`; equal selectors must have equal ids). Returns whether the
/// wildcard's contributions differ and the ids of selectors whose contributions differ.
///
/// A bucket is a function of the set of contributions of the selectors matching its
/// identity (the identity-0 bucket: of the wildcard's), so only the buckets of identities
/// matched by a returned selector (and identity 0 if the flag is set) can differ between
/// the two materializations. Everything else the compilations produce (L7 sets, CIDR
/// map, flags, cookies, warnings) must be refreshed wholesale.
pub(crate) fn changed_peers(
    old: &CompiledPolicy,
    old_ids: &[usize],
    new: &CompiledPolicy,
    new_ids: &[usize],
) -> (bool, BTreeSet<usize>) {
    let wildcard_changed =
        old.contribution_set(&old.wildcard) != new.contribution_set(&new.wildcard);
    let mut before: HashMap<usize, Vec<ContributionKey<'_>>> = old_ids
        .iter()
        .zip(&old.by_selector)
        .map(|(id, cs)| (*id, old.contribution_set(cs)))
        .collect();
    let mut changed = BTreeSet::new();
    for (id, cs) in new_ids.iter().zip(&new.by_selector) {
        let after = new.contribution_set(cs);
        if before.remove(id).unwrap_or_default() != after {
            changed.insert(*id);
        }
    }
    changed.extend(
        before
            .into_iter()
            .filter(|(_, cs)| !cs.is_empty())
            .map(|(id, _)| id),
    );
    (wildcard_changed, changed)
}

/// Broader keys of the same identity and direction that cover `k` (protocol-any key and
/// shorter port prefixes of the same protocol).
fn ancestors(k: &PolicyKey) -> impl Iterator<Item = PolicyKey> + '_ {
    let any = (k.protocol != 0).then_some(PolicyKey {
        protocol: 0,
        port: 0,
        port_prefix_len: 0,
        ..*k
    });
    let shorter = (0..k.port_prefix_len)
        .filter(move |_| k.protocol != 0)
        .map(move |len| {
            let pp = PortPrefix {
                port: k.port,
                prefix_len: len,
            };
            PolicyKey {
                port: pp.first(),
                port_prefix_len: len,
                ..*k
            }
        });
    any.into_iter().chain(shorter)
}

#[cfg(test)]
#[path = "resolve_tests.rs"]
mod tests;
