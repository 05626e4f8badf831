//! The transparent proxy's HTTP policy: a snapshot of every local endpoint's L7 rules, its
//! compiled form for per-request lookups, and its file form for restarts.
//!
//! Owns: [`PolicySnapshot`] (serializable, the shape of the policy engine's `L7RuleSet`s:
//! per endpoint, per direction and port range, peer rules that apply to some remote
//! identities), [`PolicyStore`] (a [`PolicySource`] whose compiled state sits behind an
//! `ArcSwap`: a request reads it without a lock, a writer swaps a new one in, and requests
//! already running keep the state they loaded), and saving/loading the snapshot as JSON so a
//! restarted proxy serves from the last policy it had while the agent is away
//! (DESIGN.md §1).
//!
//! Semantics (cilium-semantics.md §1.8): the peer rules of a port are OR'ed; a peer rule with
//! no HTTP rules is the L7 wildcard (everything allowed); a flow that no peer rule covers has
//! no policy, and the proxy denies all of its requests. A port marked `l7: tls` holds
//! `serverNames` instead ([`PolicySource::tls_policy`]): a peer rule without names is the
//! wildcard (any connection); where a TLS and an HTTP port range overlap, HTTP wins and the
//! TLS peer rules are dropped there (the policy engine's "different types" rule). A rule that does not compile is
//! dropped alone (never the whole snapshot, cilium#41314) and reported; dropping it can only
//! narrow what is allowed: a peer rule whose every rule was dropped allows nothing (it never
//! becomes a wildcard).
//!
//! Pure apart from the two file functions: no sockets, no async.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;

use membrane_policy::ServerName;

use super::tls_sni::TlsPolicy;
use super::{Direction, PolicyQuery, PolicySource};
use crate::policy::{HeaderMatchSpec, HttpPolicy, HttpRuleSpec, MismatchAction};

pub use membrane_agent_api::snapshot::{
    L7Protocol, PolicyDelta, PolicySnapshot, Remotes, SNAPSHOT_FORMAT, SnapshotEndpoint,
    SnapshotHeaderMatch, SnapshotHttpRule, SnapshotPeer, SnapshotPort,
};

impl From<&HttpRuleSpec> for SnapshotHttpRule {
    fn from(spec: &HttpRuleSpec) -> Self {
        Self {
            method: spec.method.clone(),
            path: spec.path.clone(),
            host: spec.host.clone(),
            headers: spec.headers.clone(),
            header_matches: spec
                .header_matches
                .iter()
                .map(|m| SnapshotHeaderMatch {
                    name: m.name.clone(),
                    value: m.value.clone(),
                    mismatch: m.mismatch.as_str().to_owned(),
                })
                .collect(),
        }
    }
}

/// The engine's form of a snapshot rule; fails on an unknown mismatch action.
pub fn rule_spec(rule: &SnapshotHttpRule) -> Result<HttpRuleSpec, String> {
    let header_matches = rule
        .header_matches
        .iter()
        .enumerate()
        .map(|(index, m)| {
            let mismatch = MismatchAction::parse(&m.mismatch).ok_or_else(|| {
                format!(
                    "headerMatches[{index}]: unknown mismatch action {:?} (expected \"\", LOG, ADD, DELETE or REPLACE)",
                    m.mismatch
                )
            })?;
            Ok(HeaderMatchSpec {
                name: m.name.clone(),
                value: m.value.clone(),
                mismatch,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(HttpRuleSpec {
        method: rule.method.clone(),
        path: rule.path.clone(),
        host: rule.host.clone(),
        headers: rule.headers.clone(),
        header_matches,
    })
}

/// A rule that did not compile and was dropped (the rest of the snapshot applies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedRule {
    pub endpoint: u64,
    pub direction: Direction,
    pub port: u16,
    /// Index of the peer rule in the port's `peers`.
    pub peer: usize,
    /// The peer's list the rule is in: `http` or `server_names`.
    pub list: &'static str,
    /// Index of the rule in that list.
    pub rule: usize,
    pub reason: String,
}

impl fmt::Display for RejectedRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "endpoint {} {} port {} peers[{}].{}[{}] dropped (it allows nothing): {}",
            self.endpoint, self.direction, self.port, self.peer, self.list, self.rule, self.reason
        )
    }
}

/// Why a snapshot could not be read, written or installed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot read the policy snapshot {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the policy snapshot {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the policy snapshot {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot serialize the policy snapshot: {0}")]
    Serialize(#[source] serde_json::Error),
    #[error(
        "policy snapshot format {found} is not supported (this proxy reads format {SNAPSHOT_FORMAT}){}",
        origin.as_ref().map(|p| format!(" in {}", p.display())).unwrap_or_default()
    )]
    Format { found: u32, origin: Option<PathBuf> },
    #[error("policy change from revision {base} does not apply: this proxy holds revision {held}")]
    Base { base: u64, held: u64 },
}

/// Reads a snapshot file (does not install it).
pub fn read_snapshot(path: impl AsRef<Path>) -> Result<PolicySnapshot, SnapshotError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| SnapshotError::Read {
        path: path.to_owned(),
        source,
    })?;
    let snapshot: PolicySnapshot =
        serde_json::from_slice(&bytes).map_err(|source| SnapshotError::Parse {
            path: path.to_owned(),
            source,
        })?;
    if snapshot.format != SNAPSHOT_FORMAT {
        return Err(SnapshotError::Format {
            found: snapshot.format,
            origin: Some(path.to_owned()),
        });
    }
    Ok(snapshot)
}

/// Writes `snapshot` to `path` atomically: a temporary file next to it, flushed to disk, then
/// renamed over `path`, so a crash leaves the old snapshot or the new one, never half of one.
/// Blocking file I/O: from async code, call it on a blocking thread.
pub fn write_snapshot(
    path: impl AsRef<Path>,
    snapshot: &PolicySnapshot,
) -> Result<(), SnapshotError> {
    let path = path.as_ref();
    let mut bytes = serde_json::to_vec_pretty(snapshot).map_err(SnapshotError::Serialize)?;
    bytes.push(b'\n');
    write_atomically(path, &bytes).map_err(|source| SnapshotError::Write {
        path: path.to_owned(),
        source,
    })
}

pub use membrane_agent_api::run_dir::write_atomically;

/// The HTTP policy of every local endpoint, swapped atomically, looked up per request.
pub struct PolicyStore {
    state: ArcSwap<State>,
    /// Serializes writers (each builds the next state from the current one).
    writer: Mutex<()>,
}

#[derive(Default)]
struct State {
    revision: u64,
    endpoints: BTreeMap<u64, EndpointEntry>,
    by_ip: HashMap<IpAddr, Arc<CompiledEndpoint>>,
}

#[derive(Clone)]
struct EndpointEntry {
    spec: Arc<SnapshotEndpoint>,
    compiled: Arc<CompiledEndpoint>,
}

/// Disjoint, sorted port segments per direction.
#[derive(Default)]
struct CompiledEndpoint {
    egress: Vec<Segment>,
    ingress: Vec<Segment>,
}

/// The policy of one port segment for every remote identity, resolved when the snapshot is
/// installed so a request (or a TLS connection) does one hash lookup.
struct Segment {
    first: u16,
    last: u16,
    policies: SegmentPolicies,
}

/// A segment is HTTP or TLS as a whole (HTTP wins where port ranges of both overlap).
enum SegmentPolicies {
    Http(ByRemote<HttpPolicy>),
    Tls(ByRemote<TlsPolicy>),
}

/// A segment's policies by remote identity.
struct ByRemote<T> {
    /// For identities no peer rule names explicitly (only `Remotes::Any` rules apply).
    any: Option<Arc<T>>,
    /// For identities some peer rule names.
    by_identity: HashMap<u32, Option<Arc<T>>>,
}

impl<T> ByRemote<T> {
    fn get(&self, identity: u32) -> Option<Arc<T>> {
        match self.by_identity.get(&identity) {
            Some(policy) => policy.clone(),
            None => self.any.clone(),
        }
    }
}

/// A peer rule after validating its rules one by one.
enum PeerRules {
    /// No rules: everything allowed (every request; on a TLS port, every connection).
    Wildcard,
    /// The HTTP rules that compiled (never empty).
    Rules(Vec<HttpRuleSpec>),
    /// The server names that are valid (never empty).
    ServerNames(Vec<ServerName>),
    /// It had rules and none was valid: it allows nothing.
    Nothing,
}

struct ValidPeer<'a> {
    remotes: &'a Remotes,
    protocol: L7Protocol,
    rules: PeerRules,
}

impl Default for PolicyStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for PolicyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.load();
        f.debug_struct("PolicyStore")
            .field("revision", &state.revision)
            .field("endpoints", &state.endpoints.len())
            .finish()
    }
}

impl PolicyStore {
    /// An empty store: no endpoint has a policy, so every redirected request is denied.
    pub fn new() -> Self {
        Self {
            state: ArcSwap::from_pointee(State::default()),
            writer: Mutex::new(()),
        }
    }

    /// Replaces the whole policy. Requests already being decided finish with the old one;
    /// connections stay open. Returns the rules that did not compile (dropped).
    pub fn install(&self, snapshot: PolicySnapshot) -> Result<Vec<RejectedRule>, SnapshotError> {
        if snapshot.format != SNAPSHOT_FORMAT {
            return Err(SnapshotError::Format {
                found: snapshot.format,
                origin: None,
            });
        }
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let mut rejected = Vec::new();
        let endpoints = snapshot
            .endpoints
            .into_iter()
            .map(|endpoint| {
                let compiled = Arc::new(compile_endpoint(&endpoint, &mut rejected));
                (
                    endpoint.id,
                    EndpointEntry {
                        spec: Arc::new(endpoint),
                        compiled,
                    },
                )
            })
            .collect();
        self.state
            .store(Arc::new(State::new(snapshot.revision, endpoints)));
        Ok(rejected)
    }

    /// Adds or replaces one endpoint's rules (the others are not recompiled).
    pub fn upsert_endpoint(&self, revision: u64, endpoint: SnapshotEndpoint) -> Vec<RejectedRule> {
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let mut rejected = Vec::new();
        let compiled = Arc::new(compile_endpoint(&endpoint, &mut rejected));
        let mut endpoints = self.state.load().endpoints.clone();
        endpoints.insert(
            endpoint.id,
            EndpointEntry {
                spec: Arc::new(endpoint),
                compiled,
            },
        );
        self.state.store(Arc::new(State::new(revision, endpoints)));
        rejected
    }

    /// Removes one endpoint's rules: its redirected requests are denied from now on. Returns
    /// whether it was there.
    pub fn remove_endpoint(&self, revision: u64, id: u64) -> bool {
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let mut endpoints = self.state.load().endpoints.clone();
        let removed = endpoints.remove(&id).is_some();
        self.state.store(Arc::new(State::new(revision, endpoints)));
        removed
    }

    /// Applies `delta` in one swap (requests see the policy before it or after it, never
    /// half of it). Refused, changing nothing, unless the store holds exactly `delta.base`.
    /// Returns the rules that did not compile (dropped).
    pub fn apply_delta(&self, delta: PolicyDelta) -> Result<Vec<RejectedRule>, SnapshotError> {
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.state.load();
        if current.revision != delta.base {
            return Err(SnapshotError::Base {
                base: delta.base,
                held: current.revision,
            });
        }
        let mut endpoints = current.endpoints.clone();
        for id in &delta.remove {
            endpoints.remove(id);
        }
        let mut rejected = Vec::new();
        for endpoint in delta.upsert {
            let compiled = Arc::new(compile_endpoint(&endpoint, &mut rejected));
            endpoints.insert(
                endpoint.id,
                EndpointEntry {
                    spec: Arc::new(endpoint),
                    compiled,
                },
            );
        }
        self.state
            .store(Arc::new(State::new(delta.revision, endpoints)));
        Ok(rejected)
    }

    /// The revision of the last change.
    pub fn revision(&self) -> u64 {
        self.state.load().revision
    }

    /// The current policy in its serializable form (endpoints ordered by id).
    pub fn snapshot(&self) -> PolicySnapshot {
        let state = self.state.load();
        PolicySnapshot {
            format: SNAPSHOT_FORMAT,
            revision: state.revision,
            endpoints: state
                .endpoints
                .values()
                .map(|entry| (*entry.spec).clone())
                .collect(),
        }
    }

    /// Saves the current policy to `path` ([`write_snapshot`]; blocking file I/O).
    pub fn save_snapshot(&self, path: impl AsRef<Path>) -> Result<(), SnapshotError> {
        write_snapshot(path, &self.snapshot())
    }

    /// Replaces the current policy with the one saved at `path` ([`read_snapshot`], then
    /// [`PolicyStore::install`]; blocking file I/O). On error the current policy stays.
    pub fn load_snapshot(
        &self,
        path: impl AsRef<Path>,
    ) -> Result<Vec<RejectedRule>, SnapshotError> {
        self.install(read_snapshot(path)?)
    }
}

impl PolicyStore {
    /// The segment of `query`'s endpoint, direction and port.
    fn with_segment<R>(&self, query: &PolicyQuery, f: impl FnOnce(&Segment) -> R) -> Option<R> {
        let state = self.state.load();
        let endpoint = state.by_ip.get(&query.endpoint_ip.to_canonical())?;
        let segments = match query.direction {
            Direction::Egress => &endpoint.egress,
            Direction::Ingress => &endpoint.ingress,
        };
        let index = segments.partition_point(|segment| segment.last < query.port);
        let segment = segments
            .get(index)
            .filter(|segment| segment.first <= query.port)?;
        Some(f(segment))
    }
}

impl PolicySource for PolicyStore {
    fn http_policy(&self, query: &PolicyQuery) -> Option<Arc<HttpPolicy>> {
        self.with_segment(query, |segment| match &segment.policies {
            SegmentPolicies::Http(policies) => policies.get(query.remote_identity),
            SegmentPolicies::Tls(_) => None,
        })
        .flatten()
    }

    fn tls_policy(&self, query: &PolicyQuery) -> Option<Arc<TlsPolicy>> {
        self.with_segment(query, |segment| match &segment.policies {
            SegmentPolicies::Http(_) => None,
            // No peer rule for this remote: a TLS port that allows it nothing.
            SegmentPolicies::Tls(policies) => Some(
                policies
                    .get(query.remote_identity)
                    .unwrap_or_else(|| Arc::new(TlsPolicy::server_names(Vec::new()))),
            ),
        })
        .flatten()
    }
}

impl State {
    fn new(revision: u64, endpoints: BTreeMap<u64, EndpointEntry>) -> Self {
        let mut by_ip = HashMap::new();
        for (id, entry) in &endpoints {
            for ip in &entry.spec.ips {
                // Two endpoints never share an address; if a snapshot says so anyway, the
                // higher id (the newer endpoint) wins, deterministically.
                if let Some(_previous) = by_ip.insert(ip.to_canonical(), entry.compiled.clone()) {
                    tracing::warn!(%ip, endpoint = id, "two endpoints claim one address");
                }
            }
        }
        Self {
            revision,
            endpoints,
            by_ip,
        }
    }
}

fn compile_endpoint(
    endpoint: &SnapshotEndpoint,
    rejected: &mut Vec<RejectedRule>,
) -> CompiledEndpoint {
    let mut compiled = CompiledEndpoint::default();
    for direction in [Direction::Egress, Direction::Ingress] {
        let ports: Vec<(&SnapshotPort, Vec<ValidPeer<'_>>)> = endpoint
            .ports
            .iter()
            .filter(|port| port.direction == direction)
            .map(|port| (port, validate_peers(endpoint.id, port, rejected)))
            .collect();
        let segments = compile_segments(&ports);
        match direction {
            Direction::Egress => compiled.egress = segments,
            Direction::Ingress => compiled.ingress = segments,
        }
    }
    compiled
}

fn validate_peers<'a>(
    endpoint: u64,
    port: &'a SnapshotPort,
    rejected: &mut Vec<RejectedRule>,
) -> Vec<ValidPeer<'a>> {
    port.peers
        .iter()
        .enumerate()
        .map(|(peer_index, peer)| {
            let mut reject = |list: &'static str, rule: usize, reason: String| {
                rejected.push(RejectedRule {
                    endpoint,
                    direction: port.direction,
                    port: port.port,
                    peer: peer_index,
                    list,
                    rule,
                    reason,
                });
            };
            let rules = if peer.http.is_empty() && peer.server_names.is_empty() {
                PeerRules::Wildcard
            } else {
                match port.l7 {
                    L7Protocol::Http => {
                        for index in 0..peer.server_names.len() {
                            reject("server_names", index, "server names on an HTTP port".into());
                        }
                        let mut valid = Vec::new();
                        for (rule_index, rule) in peer.http.iter().enumerate() {
                            let checked = rule_spec(rule).and_then(|spec| {
                                HttpPolicy::compile(std::slice::from_ref(&spec))
                                    .map(|_| spec)
                                    .map_err(|error| error.to_string())
                            });
                            match checked {
                                Ok(spec) => valid.push(spec),
                                Err(reason) => reject("http", rule_index, reason),
                            }
                        }
                        if valid.is_empty() {
                            PeerRules::Nothing
                        } else {
                            PeerRules::Rules(valid)
                        }
                    }
                    L7Protocol::Tls => {
                        for index in 0..peer.http.len() {
                            reject("http", index, "HTTP rules on a TLS port".into());
                        }
                        let mut valid = Vec::new();
                        for (index, name) in peer.server_names.iter().enumerate() {
                            match ServerName::parse(name) {
                                Ok(name) => valid.push(name),
                                Err(reason) => reject("server_names", index, reason),
                            }
                        }
                        if valid.is_empty() {
                            PeerRules::Nothing
                        } else {
                            PeerRules::ServerNames(valid)
                        }
                    }
                }
            };
            ValidPeer {
                remotes: &peer.remotes,
                protocol: port.l7,
                rules,
            }
        })
        .collect()
}

/// Splits the (possibly overlapping) port ranges into disjoint segments, each with the peer
/// rules of every range covering it, and resolves each segment's policies.
fn compile_segments(ports: &[(&SnapshotPort, Vec<ValidPeer<'_>>)]) -> Vec<Segment> {
    let mut bounds = BTreeSet::new();
    for (port, _) in ports {
        let (first, last) = port.range();
        bounds.insert(u32::from(first));
        bounds.insert(u32::from(last) + 1);
    }
    let bounds: Vec<u32> = bounds.into_iter().collect();
    let mut segments = Vec::new();
    for pair in bounds.windows(2) {
        let (start, end) = (pair[0], pair[1] - 1);
        let peers: Vec<&ValidPeer<'_>> = ports
            .iter()
            .filter(|(port, _)| {
                let (first, last) = port.range();
                u32::from(first) <= start && end <= u32::from(last)
            })
            .flat_map(|(_, peers)| peers.iter())
            .collect();
        if peers.is_empty() {
            continue;
        }
        // Both bounds come from u16 ports (end = a port's `last` or one below another's
        // `first`), so they fit.
        let (Ok(first), Ok(last)) = (u16::try_from(start), u16::try_from(end)) else {
            continue;
        };
        segments.push(compile_segment(first, last, &peers));
    }
    segments
}

fn compile_segment(first: u16, last: u16, peers: &[&ValidPeer<'_>]) -> Segment {
    let http: Vec<&ValidPeer<'_>> = peers
        .iter()
        .copied()
        .filter(|peer| peer.protocol == L7Protocol::Http)
        .collect();
    let policies = if http.is_empty() {
        SegmentPolicies::Tls(by_remote(peers, combine_tls))
    } else {
        if http.len() != peers.len() {
            tracing::warn!(
                first,
                last,
                "TLS (serverNames) and HTTP rules on the same ports; the TLS rules are dropped there"
            );
        }
        SegmentPolicies::Http(by_remote(&http, combine_http))
    };
    Segment {
        first,
        last,
        policies,
    }
}

/// Each remote identity's policy: the combination of the peer rules that apply to it.
fn by_remote<T>(
    peers: &[&ValidPeer<'_>],
    combine: fn(&[&PeerRules]) -> Option<Arc<T>>,
) -> ByRemote<T> {
    // Policies by the set of peer rules that apply; identities that select the same set share
    // one compiled policy.
    let mut by_signature: HashMap<Vec<usize>, Option<Arc<T>>> = HashMap::new();
    let mut resolve = |applies: &dyn Fn(&Remotes) -> bool| {
        let signature: Vec<usize> = peers
            .iter()
            .enumerate()
            .filter(|(_, peer)| applies(peer.remotes))
            .map(|(index, _)| index)
            .collect();
        by_signature
            .entry(signature)
            .or_insert_with_key(|signature| {
                let rules: Vec<&PeerRules> =
                    signature.iter().map(|&index| &peers[index].rules).collect();
                combine(&rules)
            })
            .clone()
    };
    let any = resolve(&|remotes| matches!(remotes, Remotes::Any));
    let named: BTreeSet<u32> = peers
        .iter()
        .filter_map(|peer| match peer.remotes {
            Remotes::Any => None,
            Remotes::Identities(set) => Some(set.iter().copied()),
        })
        .flatten()
        .collect();
    let by_identity = named
        .into_iter()
        .map(|identity| (identity, resolve(&|remotes| remotes.contains(identity))))
        .collect();
    ByRemote { any, by_identity }
}

/// The OR of some HTTP peer rules: allow-all if one is a wildcard, `None` (deny) if none
/// allows anything, else one policy over all their rules.
fn combine_http(rules: &[&PeerRules]) -> Option<Arc<HttpPolicy>> {
    let mut specs = Vec::new();
    for peer in rules {
        match peer {
            PeerRules::Wildcard => return Some(Arc::new(HttpPolicy::allow_all())),
            PeerRules::Rules(rules) => specs.extend(rules.iter().cloned()),
            PeerRules::ServerNames(_) | PeerRules::Nothing => {}
        }
    }
    if specs.is_empty() {
        return None;
    }
    match HttpPolicy::compile(&specs) {
        Ok(policy) => Some(Arc::new(policy)),
        Err(error) => {
            // Every rule compiled alone, so this should not happen; if it does, deny.
            tracing::warn!(%error, "combined HTTP rules did not compile; denying");
            None
        }
    }
}

/// The OR of some TLS peer rules: any connection if one is a wildcard, `None` (deny) if none
/// allows anything, else their server names.
fn combine_tls(rules: &[&PeerRules]) -> Option<Arc<TlsPolicy>> {
    let mut names = Vec::new();
    for peer in rules {
        match peer {
            PeerRules::Wildcard => return Some(Arc::new(TlsPolicy::any_connection())),
            PeerRules::ServerNames(list) => {
                for name in list {
                    if !names.contains(name) {
                        names.push(name.clone());
                    }
                }
            }
            PeerRules::Rules(_) | PeerRules::Nothing => {}
        }
    }
    (!names.is_empty()).then(|| Arc::new(TlsPolicy::server_names(names)))
}
