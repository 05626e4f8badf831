//! The key layout and value formats of the cluster store, declared once.
//!
//! Layout: Cilium's kvstore layout (reference `cluster.md` §1.1) under our own root
//! `membrane/` instead of `cilium/`. Same tree, so an operator who knows Cilium's kvstore
//! finds everything where expected; a different root, because our values are not
//! byte-compatible with Cilium's (JSON shapes differ), so a Cilium agent pointed at the same
//! etcd must never read them as its own.
//!
//! | key | value | lease |
//! |---|---|---|
//! | `membrane/state/identities/v1/id/<ID>` | labels, Cilium's form `k8s:app=web;k8s:io.kubernetes.pod.namespace=default;` | none (the "master key"; removed only by GC) |
//! | `membrane/state/identities/v1/value/<labels>/<node>` | decimal ID (`"1234"`) | the node's session |
//! | `membrane/state/identities/v1/locks/<labels>/<lease hex>` | (etcd's lock service) | the node's lock lease |
//! | `membrane/state/ip/v1/<cluster>/<ip>` | JSON [`IpcacheEntry`] | the owning node's session |
//! | `membrane/state/nodes/v1/<cluster>/<node>` | JSON [`NodeInfo`] | the node's session |
//! | `membrane/state/podcidr/v1/<cluster>/<a.b.c.d>/<len>` | JSON [`PodCidrClaim`] | none (released explicitly) |
//! | `membrane/state/policies/v1/<kind>/<namespace or _>/<name>` | JSON [`PolicyDocument`] | none |
//! | `membrane/state/operator/v1/leader` | JSON [`OperatorLeader`] | the leader's session |
//! | `membrane/state/services/v1/<cluster>/<ns>/<svc>` | reserved for services | — |
//! | `membrane/.heartbeat` | read by the status probe (a quorum read; never written) | — |
//!
//! Every JSON value type is strict (`deny_unknown_fields`): the key carries the format
//! version (`v1`), so a new format is a new prefix, never a silently ignored field. Decoding
//! never panics: [`StoreValue::decode`] returns a [`DecodeError`] naming the key, which the
//! watchers count and skip.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use membrane_policy::{Identity, Label, Labels};
use serde::{Deserialize, Serialize};

use crate::error::{AllocError, DecodeError};
use crate::ipam::Ipv4Cidr;

/// Root of every key.
pub const ROOT: &str = "membrane/";
/// Identities: master keys `id/`, per-node references `value/`, locks `locks/`.
pub const IDENTITIES_PREFIX: &str = "membrane/state/identities/v1/";
/// Master keys: `id/<ID>` → labels.
pub const IDENTITY_ID_PREFIX: &str = "membrane/state/identities/v1/id/";
/// Per-node references: `value/<labels>/<node>` → ID.
pub const IDENTITY_VALUE_PREFIX: &str = "membrane/state/identities/v1/value/";
/// Allocation locks: `locks/<labels>`.
pub const IDENTITY_LOCKS_PREFIX: &str = "membrane/state/identities/v1/locks/";
/// ipcache entries: `ip/v1/<cluster>/<ip>`.
pub const IP_PREFIX: &str = "membrane/state/ip/v1/";
/// Node registrations: `nodes/v1/<cluster>/<node>`.
pub const NODES_PREFIX: &str = "membrane/state/nodes/v1/";
/// Pod CIDR claims: `podcidr/v1/<cluster>/<cidr>` (membrane's; Cilium keeps them in CRDs).
pub const PODCIDR_PREFIX: &str = "membrane/state/podcidr/v1/";
/// Policy documents: `policies/v1/<kind>/<namespace>/<name>`.
pub const POLICIES_PREFIX: &str = "membrane/state/policies/v1/";
/// Reserved for services (`services/v1/<cluster>/<ns>/<svc>`, Cilium's `ClusterService`).
pub const SERVICES_PREFIX: &str = "membrane/state/services/v1/";
/// The operator-role leader key.
pub const OPERATOR_LEADER_KEY: &str = "membrane/state/operator/v1/leader";
/// Read by the status probe: a linearizable read needs a quorum, which is what "connected"
/// should mean.
pub const HEARTBEAT_KEY: &str = "membrane/.heartbeat";
/// The namespace path element of cluster-scoped policies (`_` is never a Kubernetes
/// namespace name).
pub const CLUSTER_SCOPE_NAMESPACE: &str = "_";

/// A value type stored under one prefix.
pub trait StoreValue: Sized + Clone + Send + Sync + 'static {
    /// Name used in errors.
    const TYPE_NAME: &'static str;
    /// Parses the value stored at `key` (and checks it against the key where the key
    /// carries part of it).
    fn decode(key: &str, bytes: &[u8]) -> Result<Self, DecodeError>;
    /// The stored bytes.
    fn encode(&self) -> Vec<u8>;
}

fn decode_json<T: for<'de> Deserialize<'de>>(
    key: &str,
    bytes: &[u8],
    type_name: &'static str,
) -> Result<T, DecodeError> {
    serde_json::from_slice(bytes).map_err(|source| DecodeError::Json {
        key: key.to_owned(),
        type_name,
        source,
    })
}

fn encode_json<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing plain structs of strings, numbers and addresses cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

/// Decodes a key's bytes.
pub fn key_str(key: &[u8]) -> Result<&str, DecodeError> {
    std::str::from_utf8(key).map_err(|_| DecodeError::NotUtf8 {
        key: String::from_utf8_lossy(key).into_owned(),
        what: "key",
    })
}

fn value_str<'a>(key: &str, bytes: &'a [u8]) -> Result<&'a str, DecodeError> {
    std::str::from_utf8(bytes).map_err(|_| DecodeError::NotUtf8 {
        key: key.to_owned(),
        what: "value",
    })
}

// ---------------------------------------------------------------------------------------
// Identities
// ---------------------------------------------------------------------------------------

/// Labels in their stored form, Cilium's `source:key=value;` per label, in [`Labels`]'
/// order (source, then key), so every node encodes a label set to the same bytes. The
/// allocation protocol compares these bytes in etcd transactions.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabelsKey(String);

impl LabelsKey {
    /// Encodes labels; a label containing `;` cannot be stored.
    pub fn encode(labels: &Labels) -> Result<LabelsKey, AllocError> {
        let mut s = String::new();
        for l in labels.iter() {
            let text = l.to_string();
            if text.contains(';') {
                return Err(AllocError::Unencodable { label: text });
            }
            s.push_str(&text);
            s.push(';');
        }
        Ok(LabelsKey(s))
    }

    /// Parses the stored form found at `key`.
    pub fn decode(key: &str, text: &str) -> Result<Labels, DecodeError> {
        let labels =
            Labels::parse(text.split(';').filter(|p| !p.is_empty())).map_err(|source| {
                DecodeError::Labels {
                    key: key.to_owned(),
                    source,
                }
            })?;
        if labels.is_empty() {
            return Err(DecodeError::Key {
                key: key.to_owned(),
                expected: "non-empty label set in",
            });
        }
        Ok(labels)
    }

    /// The stored form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `…/id/<ID>`.
pub fn identity_id_key(id: Identity) -> String {
    format!("{IDENTITY_ID_PREFIX}{}", id.get())
}

/// The identity of a master key.
pub fn parse_identity_id_key(key: &str) -> Result<Identity, DecodeError> {
    let text = key
        .strip_prefix(IDENTITY_ID_PREFIX)
        .ok_or_else(|| DecodeError::Key {
            key: key.to_owned(),
            expected: "identity id",
        })?;
    parse_identity_number(key, text)
}

fn parse_identity_number(key: &str, text: &str) -> Result<Identity, DecodeError> {
    match text.trim().parse::<u32>() {
        // Digits only: `+5` and ` 5` parse with `u32::from_str`/`trim` but are not a form any
        // node writes.
        Ok(n) if n != 0 && text.bytes().all(|b| b.is_ascii_digit()) => Ok(Identity(n)),
        _ => Err(DecodeError::IdentityNumber {
            key: key.to_owned(),
            text: text.to_owned(),
        }),
    }
}

/// `…/value/<labels>/` — the prefix of every node's reference to one label set. The final
/// `/` makes it exact: every label ends with `;`, so no other label set's prefix matches.
pub fn identity_value_prefix(labels: &LabelsKey) -> String {
    format!("{IDENTITY_VALUE_PREFIX}{}/", labels.as_str())
}

/// `…/value/<labels>/<node>`.
pub fn identity_value_key(labels: &LabelsKey, node: &str) -> String {
    format!("{IDENTITY_VALUE_PREFIX}{}/{node}", labels.as_str())
}

/// (labels text, node) of a reference key. The node is after the last `/` (node names
/// have none; labels may, e.g. `k8s:app.kubernetes.io/name=web;`).
pub fn parse_identity_value_key(key: &str) -> Result<(&str, &str), DecodeError> {
    key.strip_prefix(IDENTITY_VALUE_PREFIX)
        .and_then(|rest| rest.rsplit_once('/'))
        .filter(|(labels, node)| !labels.is_empty() && !node.is_empty())
        .ok_or_else(|| DecodeError::Key {
            key: key.to_owned(),
            expected: "identity reference",
        })
}

/// `…/locks/<labels>`: the name of the allocation lock of a label set.
pub fn identity_lock_key(labels: &LabelsKey) -> String {
    format!("{IDENTITY_LOCKS_PREFIX}{}", labels.as_str())
}

/// The value of a master key: the label set of the identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityLabels(pub Labels);

impl StoreValue for IdentityLabels {
    const TYPE_NAME: &'static str = "identity label set";
    fn decode(key: &str, bytes: &[u8]) -> Result<Self, DecodeError> {
        parse_identity_id_key(key)?;
        Ok(IdentityLabels(LabelsKey::decode(
            key,
            value_str(key, bytes)?,
        )?))
    }
    fn encode(&self) -> Vec<u8> {
        // Callers encode through `LabelsKey::encode`, which rejects `;`; a label set that
        // got here anyway is stored as its best-effort text.
        self.0
            .iter()
            .map(|l: Label| format!("{l};"))
            .collect::<String>()
            .into_bytes()
    }
}

/// The value of a reference key: the identity the node uses for the labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentityRef(pub Identity);

impl StoreValue for IdentityRef {
    const TYPE_NAME: &'static str = "identity reference";
    fn decode(key: &str, bytes: &[u8]) -> Result<Self, DecodeError> {
        parse_identity_value_key(key)?;
        Ok(IdentityRef(parse_identity_number(
            key,
            value_str(key, bytes)?,
        )?))
    }
    fn encode(&self) -> Vec<u8> {
        self.0.get().to_string().into_bytes()
    }
}

// ---------------------------------------------------------------------------------------
// ipcache
// ---------------------------------------------------------------------------------------

/// `ip/v1/<cluster>/`.
pub fn ip_prefix(cluster: &str) -> String {
    format!("{IP_PREFIX}{cluster}/")
}

/// `ip/v1/<cluster>/<ip>`.
pub fn ip_key(cluster: &str, ip: IpAddr) -> String {
    format!("{IP_PREFIX}{cluster}/{ip}")
}

/// The address of an ipcache key (any cluster).
pub fn parse_ip_key(key: &str) -> Result<IpAddr, DecodeError> {
    key.strip_prefix(IP_PREFIX)
        .and_then(|rest| rest.split_once('/'))
        .and_then(|(_, ip)| IpAddr::from_str(ip).ok())
        .ok_or_else(|| DecodeError::Key {
            key: key.to_owned(),
            expected: "ipcache",
        })
}

/// One endpoint address published by the node that owns it (Cilium's `IPIdentityPair`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IpcacheEntry {
    /// The endpoint's address (the key's last element).
    pub ip: IpAddr,
    /// Its security identity.
    #[serde(with = "identity_number")]
    pub identity: Identity,
    /// The node that owns the endpoint.
    pub node: String,
    /// That node's underlay address: the tunnel endpoint / next hop for `ip`.
    pub host_ip: IpAddr,
    /// Kubernetes namespace, when the endpoint is a pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Pod name, when the endpoint is a pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

impl StoreValue for IpcacheEntry {
    const TYPE_NAME: &'static str = "ipcache entry";
    fn decode(key: &str, bytes: &[u8]) -> Result<Self, DecodeError> {
        let ip = parse_ip_key(key)?;
        let e: IpcacheEntry = decode_json(key, bytes, Self::TYPE_NAME)?;
        if e.ip != ip {
            return Err(DecodeError::Mismatch {
                key: key.to_owned(),
                field: "ip",
                in_key: ip.to_string(),
                in_value: e.ip.to_string(),
            });
        }
        if e.identity.get() == 0 {
            return Err(DecodeError::IdentityNumber {
                key: key.to_owned(),
                text: "0".to_owned(),
            });
        }
        Ok(e)
    }
    fn encode(&self) -> Vec<u8> {
        encode_json(self)
    }
}

/// Serde for [`Identity`] as its number (the policy crate's type serializes but does not
/// deserialize).
mod identity_number {
    use membrane_policy::Identity;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(id: &Identity, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(id.get())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Identity, D::Error> {
        u32::deserialize(d).map(Identity)
    }
}

// ---------------------------------------------------------------------------------------
// Nodes and pod CIDRs
// ---------------------------------------------------------------------------------------

/// `nodes/v1/<cluster>/`.
pub fn nodes_prefix(cluster: &str) -> String {
    format!("{NODES_PREFIX}{cluster}/")
}

/// `nodes/v1/<cluster>/<node>`.
pub fn node_key(cluster: &str, node: &str) -> String {
    format!("{NODES_PREFIX}{cluster}/{node}")
}

/// (cluster, node) of a node key.
pub fn parse_node_key(key: &str) -> Result<(&str, &str), DecodeError> {
    key.strip_prefix(NODES_PREFIX)
        .and_then(|rest| rest.split_once('/'))
        .filter(|(c, n)| !c.is_empty() && !n.is_empty() && !n.contains('/'))
        .ok_or_else(|| DecodeError::Key {
            key: key.to_owned(),
            expected: "node",
        })
}

/// A node's registration (Cilium's `nodeTypes.Node`, reduced to what membrane uses).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeInfo {
    /// Node name (the key's last element).
    pub name: String,
    /// Cluster name.
    pub cluster: String,
    /// Underlay address: where other nodes send its pods' traffic (route or tunnel).
    pub underlay_ip: IpAddr,
    /// Its pod CIDR from the cluster pool, once claimed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_cidr: Option<Ipv4Cidr>,
    /// Its Hubble server (`IP:4244`), for the relay's peer list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hubble_address: Option<SocketAddr>,
}

impl StoreValue for NodeInfo {
    const TYPE_NAME: &'static str = "node registration";
    fn decode(key: &str, bytes: &[u8]) -> Result<Self, DecodeError> {
        let (cluster, name) = parse_node_key(key)?;
        let n: NodeInfo = decode_json(key, bytes, Self::TYPE_NAME)?;
        for (field, in_key, in_value) in [("name", name, &n.name), ("cluster", cluster, &n.cluster)]
        {
            if in_key != in_value {
                return Err(DecodeError::Mismatch {
                    key: key.to_owned(),
                    field,
                    in_key: in_key.to_owned(),
                    in_value: in_value.clone(),
                });
            }
        }
        Ok(n)
    }
    fn encode(&self) -> Vec<u8> {
        encode_json(self)
    }
}

/// `podcidr/v1/<cluster>/`.
pub fn podcidr_prefix(cluster: &str) -> String {
    format!("{PODCIDR_PREFIX}{cluster}/")
}

/// `podcidr/v1/<cluster>/<a.b.c.d>/<len>`.
pub fn podcidr_key(cluster: &str, cidr: Ipv4Cidr) -> String {
    format!("{PODCIDR_PREFIX}{cluster}/{cidr}")
}

/// The block of a pod CIDR claim key.
pub fn parse_podcidr_key(key: &str) -> Result<Ipv4Cidr, DecodeError> {
    key.strip_prefix(PODCIDR_PREFIX)
        .and_then(|rest| rest.split_once('/'))
        .and_then(|(_, cidr)| Ipv4Cidr::from_str(cidr).ok())
        .ok_or_else(|| DecodeError::Key {
            key: key.to_owned(),
            expected: "pod CIDR claim",
        })
}

/// Who holds a pod CIDR block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PodCidrClaim {
    /// The node holding the block.
    pub node: String,
}

impl StoreValue for PodCidrClaim {
    const TYPE_NAME: &'static str = "pod CIDR claim";
    fn decode(key: &str, bytes: &[u8]) -> Result<Self, DecodeError> {
        parse_podcidr_key(key)?;
        decode_json(key, bytes, Self::TYPE_NAME)
    }
    fn encode(&self) -> Vec<u8> {
        encode_json(self)
    }
}

// ---------------------------------------------------------------------------------------
// Policies, operator
// ---------------------------------------------------------------------------------------

/// A policy document's name: kind, namespace (none for cluster-scoped kinds), name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyName {
    /// `CiliumNetworkPolicy`, `CiliumClusterwideNetworkPolicy`, `NetworkPolicy`,
    /// `WasmFilter`, ….
    pub kind: String,
    /// Namespace; `None` for cluster-scoped kinds.
    #[serde(default)]
    pub namespace: Option<String>,
    /// `metadata.name`.
    pub name: String,
}

impl From<&membrane_policy::PolicyRef> for PolicyName {
    fn from(r: &membrane_policy::PolicyRef) -> PolicyName {
        PolicyName {
            kind: r.kind.as_str().to_owned(),
            namespace: r.namespace.clone(),
            name: r.name.clone(),
        }
    }
}

impl std::fmt::Display for PolicyName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// `policies/v1/<kind>/<namespace or _>/<name>`; `None` if an element is not a usable
/// path element.
pub fn policy_key(name: &PolicyName) -> Option<String> {
    let ns = name.namespace.as_deref().unwrap_or(CLUSTER_SCOPE_NAMESPACE);
    let ok = |s: &str| !s.is_empty() && !s.contains('/') && !s.chars().any(char::is_control);
    if !ok(&name.kind) || !ok(ns) || !ok(&name.name) {
        return None;
    }
    if name.namespace.as_deref() == Some(CLUSTER_SCOPE_NAMESPACE) {
        return None;
    }
    Some(format!("{POLICIES_PREFIX}{}/{ns}/{}", name.kind, name.name))
}

/// The name of a policy key.
pub fn parse_policy_key(key: &str) -> Result<PolicyName, DecodeError> {
    let bad = || DecodeError::Key {
        key: key.to_owned(),
        expected: "policy",
    };
    let rest = key.strip_prefix(POLICIES_PREFIX).ok_or_else(bad)?;
    let mut parts = rest.split('/');
    let (Some(kind), Some(ns), Some(name), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    if kind.is_empty() || ns.is_empty() || name.is_empty() {
        return Err(bad());
    }
    Ok(PolicyName {
        kind: kind.to_owned(),
        namespace: (ns != CLUSTER_SCOPE_NAMESPACE).then(|| ns.to_owned()),
        name: name.to_owned(),
    })
}

/// Text format of a policy document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyFormat {
    /// YAML (possibly several documents).
    Yaml,
    /// JSON.
    Json,
}

/// A policy document as applied: the text the user gave plus who applied it and when. The
/// store does not parse the text (the agent does, with `membrane-policy`, on every node).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyDocument {
    /// The document text.
    pub text: String,
    /// Its format.
    pub format: PolicyFormat,
    /// Who applied it (user, node or tool).
    pub applied_by: String,
    /// When, milliseconds since the Unix epoch.
    pub applied_at_unix_ms: u64,
}

impl StoreValue for PolicyDocument {
    const TYPE_NAME: &'static str = "policy document";
    fn decode(key: &str, bytes: &[u8]) -> Result<Self, DecodeError> {
        parse_policy_key(key)?;
        decode_json(key, bytes, Self::TYPE_NAME)
    }
    fn encode(&self) -> Vec<u8> {
        encode_json(self)
    }
}

/// The operator-role leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OperatorLeader {
    /// The leading node.
    pub node: String,
}

impl StoreValue for OperatorLeader {
    const TYPE_NAME: &'static str = "operator leader";
    fn decode(key: &str, bytes: &[u8]) -> Result<Self, DecodeError> {
        decode_json(key, bytes, Self::TYPE_NAME)
    }
    fn encode(&self) -> Vec<u8> {
        encode_json(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(items: &[&str]) -> Labels {
        Labels::parse(items.iter().copied()).unwrap()
    }

    #[test]
    fn labels_round_trip_in_ciliums_form() {
        let l = labels(&["k8s:app=web", "k8s:io.kubernetes.pod.namespace=default"]);
        let k = LabelsKey::encode(&l).unwrap();
        assert_eq!(
            k.as_str(),
            "k8s:app=web;k8s:io.kubernetes.pod.namespace=default;"
        );
        assert_eq!(LabelsKey::decode("k", k.as_str()).unwrap(), l);
        let bad = labels(&["k8s:app=a;b"]);
        assert!(matches!(
            LabelsKey::encode(&bad),
            Err(AllocError::Unencodable { .. })
        ));
    }

    #[test]
    fn value_keys_split_at_the_last_slash() {
        let l = labels(&["k8s:app.kubernetes.io/name=web"]);
        let k = LabelsKey::encode(&l).unwrap();
        let key = identity_value_key(&k, "node-1");
        let (text, node) = parse_identity_value_key(&key).unwrap();
        assert_eq!((text, node), (k.as_str(), "node-1"));
        assert!(key.starts_with(&identity_value_prefix(&k)));
        let r = IdentityRef::decode(&key, b"300").unwrap();
        assert_eq!(r.0, Identity(300));
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = IdentityRef::decode("membrane/state/identities/v1/value/k8s:a=b;/n1", b"twelve")
            .unwrap_err();
        assert!(e.to_string().contains("value/k8s:a=b;/n1"), "{e}");
        for bad in [&b"+5"[..], b"0", b" 5", b"-1"] {
            assert!(
                IdentityRef::decode("membrane/state/identities/v1/value/k8s:a=b;/n1", bad).is_err()
            );
        }

        let key = ip_key("default", "10.0.0.1".parse().unwrap());
        let e = IpcacheEntry::decode(&key, b"{\"ip\":1}").unwrap_err();
        assert!(e.to_string().contains(&key), "{e}");
        let other = br#"{"ip":"10.0.0.2","identity":300,"node":"n","hostIp":"192.0.2.1"}"#;
        assert!(matches!(
            IpcacheEntry::decode(&key, other),
            Err(DecodeError::Mismatch { field: "ip", .. })
        ));
        let extra = br#"{"ip":"10.0.0.1","identity":300,"node":"n","hostIp":"192.0.2.1","x":1}"#;
        assert!(IpcacheEntry::decode(&key, extra).is_err());
        let good = br#"{"ip":"10.0.0.1","identity":300,"node":"n","hostIp":"192.0.2.1"}"#;
        assert_eq!(
            IpcacheEntry::decode(&key, good).unwrap().identity,
            Identity(300)
        );

        let id_key = identity_id_key(Identity(300));
        assert!(IdentityLabels::decode(&id_key, b"").is_err());
        assert!(IdentityLabels::decode(&id_key, b"nosuch:x=y;").is_err());
        assert!(IdentityLabels::decode(&id_key, &[0xff, 0xfe]).is_err());
    }

    #[test]
    fn policy_keys() {
        let n = PolicyName {
            kind: "CiliumNetworkPolicy".into(),
            namespace: Some("default".into()),
            name: "allow-web".into(),
        };
        let k = policy_key(&n).unwrap();
        assert_eq!(
            k,
            "membrane/state/policies/v1/CiliumNetworkPolicy/default/allow-web"
        );
        assert_eq!(parse_policy_key(&k).unwrap(), n);
        let c = PolicyName {
            kind: "CiliumClusterwideNetworkPolicy".into(),
            namespace: None,
            name: "deny".into(),
        };
        assert_eq!(parse_policy_key(&policy_key(&c).unwrap()).unwrap(), c);
        let bad = PolicyName {
            name: "a/b".into(),
            ..c
        };
        assert!(policy_key(&bad).is_none());
    }

    #[test]
    fn node_and_podcidr_keys() {
        let key = node_key("default", "n1");
        let v = NodeInfo {
            name: "n1".into(),
            cluster: "default".into(),
            underlay_ip: "192.0.2.1".parse().unwrap(),
            pod_cidr: Some("10.244.1.0/24".parse().unwrap()),
            hubble_address: None,
        };
        assert_eq!(NodeInfo::decode(&key, &v.encode()).unwrap(), v);
        assert!(NodeInfo::decode(&node_key("default", "n2"), &v.encode()).is_err());
        let cidr: Ipv4Cidr = "10.244.1.0/24".parse().unwrap();
        assert_eq!(
            parse_podcidr_key(&podcidr_key("default", cidr)).unwrap(),
            cidr
        );
    }
}
