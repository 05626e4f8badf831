//! Labels: Cilium's `source:key=value` triples, label sets, CIDR labels and the
//! security-relevant label filter.
//!
//! Owns the string forms (`k8s:app=web`, `$host`, `cidr:10.0.0.0/8`,
//! `cidr:2001-db8--/32`), the source list of `pkg/labels` (reference §1.5), containment
//! semantics of `cidr:` labels and the default label-prefix filter that decides which
//! labels feed identity allocation. It knows nothing about selectors or policy.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Serialize, Serializer};

use crate::cidr::IpPrefix;
use crate::error::LabelError;

/// Where a label comes from. Mirrors `pkg/labels` sources; `Any` only appears in selectors
/// and matches a label of every source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LabelSource {
    /// `k8s:` pod, namespace and policy labels.
    K8s,
    /// `container:` runtime labels.
    Container,
    /// `cni:` labels set by a CNI plugin.
    Cni,
    /// `reserved:` labels of the reserved identities (`reserved:host`, …).
    Reserved,
    /// `cidr:` a prefix; matches by containment.
    Cidr,
    /// `cidrgroup:` a CiliumCIDRGroup name.
    CidrGroup,
    /// `fqdn:` a toFQDNs selector text (`fqdn:*.cilium.io`).
    Fqdn,
    /// `node:` node labels.
    Node,
    /// `directory:` labels from a static directory source.
    Directory,
    /// `unspec:` a label given without a source.
    Unspec,
    /// `any:` selector-only wildcard source.
    Any,
}

impl LabelSource {
    /// All sources, in the order of their names below.
    pub const ALL: [LabelSource; 11] = [
        LabelSource::K8s,
        LabelSource::Container,
        LabelSource::Cni,
        LabelSource::Reserved,
        LabelSource::Cidr,
        LabelSource::CidrGroup,
        LabelSource::Fqdn,
        LabelSource::Node,
        LabelSource::Directory,
        LabelSource::Unspec,
        LabelSource::Any,
    ];

    /// The source's name as written before the `:`.
    pub fn as_str(self) -> &'static str {
        match self {
            LabelSource::K8s => "k8s",
            LabelSource::Container => "container",
            LabelSource::Cni => "cni",
            LabelSource::Reserved => "reserved",
            LabelSource::Cidr => "cidr",
            LabelSource::CidrGroup => "cidrgroup",
            LabelSource::Fqdn => "fqdn",
            LabelSource::Node => "node",
            LabelSource::Directory => "directory",
            LabelSource::Unspec => "unspec",
            LabelSource::Any => "any",
        }
    }

    /// Parses a source name (case-sensitive, as Cilium).
    pub fn from_name(name: &str) -> Option<LabelSource> {
        LabelSource::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl fmt::Display for LabelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One label. For `cidr:` labels the key is the canonical prefix text (`10.0.0.0/8`,
/// `2001:db8::/32`) and the value is empty.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Label {
    /// Where it comes from.
    pub source: LabelSource,
    /// The key, without the source.
    pub key: String,
    /// The value; empty for keys without `=`.
    pub value: String,
}

impl Label {
    /// A label from its parts (no validation: use [`Label::parse`] for user input).
    pub fn new(source: LabelSource, key: impl Into<String>, value: impl Into<String>) -> Label {
        Label {
            source,
            key: key.into(),
            value: value.into(),
        }
    }

    /// `reserved:<name>`.
    pub fn reserved(name: &str) -> Label {
        Label::new(LabelSource::Reserved, name, "")
    }

    /// `k8s:<key>=<value>`.
    pub fn k8s(key: &str, value: &str) -> Label {
        Label::new(LabelSource::K8s, key, value)
    }

    /// `cidr:<prefix>` (canonical prefix text as key).
    pub fn cidr(prefix: IpPrefix) -> Label {
        Label::new(LabelSource::Cidr, prefix.to_string(), "")
    }

    /// `fqdn:<selector text>`.
    pub fn fqdn(selector: &str) -> Label {
        Label::new(LabelSource::Fqdn, selector, "")
    }

    /// Parses `source:key=value`, `source:key`, `key=value`, `key` or `$name` (short for
    /// `reserved:name`). A missing source gives [`LabelSource::Unspec`]. `cidr:` keys must
    /// be prefixes (IPv6 may use `-` for `:` as in Cilium's label form) and are canonicalized.
    pub fn parse(text: &str) -> Result<Label, LabelError> {
        let (source, rest) = split_source(text)?;
        let source = source.unwrap_or(LabelSource::Unspec);
        let (key, value) = match rest.find('=') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        if key.is_empty() {
            return Err(LabelError::new(text, "empty label key"));
        }
        if source == LabelSource::Cidr {
            let prefix = parse_cidr_key(key).map_err(|m| LabelError::new(text, &m))?;
            if !value.is_empty() {
                return Err(LabelError::new(text, "cidr labels take no value"));
            }
            return Ok(Label::cidr(prefix));
        }
        Ok(Label::new(source, key, value))
    }

    /// For `cidr:` labels, the prefix the key names.
    pub fn cidr_prefix(&self) -> Option<IpPrefix> {
        if self.source == LabelSource::Cidr {
            parse_cidr_key(&self.key).ok()
        } else {
            None
        }
    }
}

/// Splits an optional `source:` (or `$`) prefix off `text`. Label keys cannot contain `:`
/// (Kubernetes forbids it), so a `:` always ends a source, except inside an IPv6 `cidr:` key.
pub(crate) fn split_source(text: &str) -> Result<(Option<LabelSource>, &str), LabelError> {
    if let Some(rest) = text.strip_prefix('$') {
        return Ok((Some(LabelSource::Reserved), rest));
    }
    match text.find(':') {
        None => Ok((None, text)),
        Some(i) => {
            let name = &text[..i];
            let source = LabelSource::from_name(name).ok_or_else(|| {
                LabelError::new(
                    text,
                    &format!(
                        "unknown label source `{name}` (known: k8s, container, cni, reserved, cidr, cidrgroup, fqdn, node, directory, unspec, any)"
                    ),
                )
            })?;
            Ok((Some(source), &text[i + 1..]))
        }
    }
}

/// Parses a `cidr:` label key: a prefix, IPv6 possibly written with `-` instead of `:`.
pub(crate) fn parse_cidr_key(key: &str) -> Result<IpPrefix, String> {
    let normalized = if key.contains('-') {
        key.replace('-', ":")
    } else {
        key.to_owned()
    };
    IpPrefix::from_str(&normalized).map_err(|e| e.to_string())
}

impl FromStr for Label {
    type Err = LabelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Label::parse(s)
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.source, self.key)?;
        if !self.value.is_empty() {
            write!(f, "={}", self.value)?;
        }
        Ok(())
    }
}

impl Serialize for Label {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A set of labels, at most one value per (source, key); ordered, so it can key maps
/// (identity allocation is by label set).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Labels {
    map: BTreeMap<(LabelSource, String), String>,
}

impl Labels {
    /// The empty set.
    pub fn new() -> Labels {
        Labels::default()
    }

    /// Parses labels from their string forms (`k8s:app=web`, …).
    pub fn parse<'a>(items: impl IntoIterator<Item = &'a str>) -> Result<Labels, LabelError> {
        let mut out = Labels::new();
        for item in items {
            out.insert(Label::parse(item)?);
        }
        Ok(out)
    }

    /// Inserts (replacing the value of the same source and key).
    pub fn insert(&mut self, label: Label) {
        self.map.insert((label.source, label.key), label.value);
    }

    /// Removes the label with this source and key.
    pub fn remove(&mut self, source: LabelSource, key: &str) -> Option<String> {
        self.map.remove(&(source, key.to_owned()))
    }

    /// Number of labels.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True if there are no labels.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The labels, ordered by (source, key).
    pub fn iter(&self) -> impl Iterator<Item = Label> + '_ {
        self.map
            .iter()
            .map(|((s, k), v)| Label::new(*s, k.clone(), v.clone()))
    }

    /// The value of the label with exactly this source and key.
    pub fn get(&self, source: LabelSource, key: &str) -> Option<&str> {
        // A tuple key cannot be borrowed as `(LabelSource, &str)`, and building an owned
        // one allocates on every selector match. Label sets are small (tens of labels), so
        // a scan comparing the source, then the key's length, then its bytes is cheaper
        // than either that or a `range` search (whose tuple comparisons each call memcmp):
        // in benches/resolve.rs, mostly selector matching, the full resolve took 0.49 s
        // with the allocation, 1.1 s with `range` and 0.21 s with the scan.
        self.of_source(source)
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }

    /// (key, value) of the labels of one source, by key.
    fn of_source(&self, source: LabelSource) -> impl Iterator<Item = (&str, &str)> {
        self.map
            .iter()
            .skip_while(move |((s, _), _)| *s < source)
            .take_while(move |((s, _), _)| *s == source)
            .map(|((_, k), v)| (k.as_str(), v.as_str()))
    }

    /// True if a label with exactly this source, key and value exists.
    pub fn contains(&self, label: &Label) -> bool {
        self.get(label.source, &label.key) == Some(label.value.as_str())
    }

    /// True if any label has this source.
    pub fn has_source(&self, source: LabelSource) -> bool {
        self.of_source(source).next().is_some()
    }

    /// True if a label selected by the selector key (`source`, `key`) has a value
    /// satisfying `pred`: `Any` selects every source; `Cidr` selects every `cidr:` label
    /// whose prefix is contained in `key` (Cilium's `LabelArray.Has` containment; their
    /// value is empty); other sources select the label with exactly that source and key.
    /// The hot path of selector matching: allocates nothing unless `cidr:` labels are
    /// compared.
    pub(crate) fn any_value_for(
        &self,
        source: LabelSource,
        key: &str,
        mut pred: impl FnMut(&str) -> bool,
    ) -> bool {
        match source {
            LabelSource::Any => self.map.iter().any(|((_, k), v)| k == key && pred(v)),
            LabelSource::Cidr => {
                let mut cidrs = self.of_source(LabelSource::Cidr).peekable();
                if cidrs.peek().is_none() {
                    return false;
                }
                let Ok(outer) = parse_cidr_key(key) else {
                    return false;
                };
                cidrs.any(|(k, v)| {
                    parse_cidr_key(k).is_ok_and(|inner| outer.contains_prefix(&inner)) && pred(v)
                })
            }
            s => self.get(s, key).is_some_and(pred),
        }
    }

    /// Values of labels selected by a selector key (`source`, `key`): `Any` matches every
    /// source; `Cidr` matches every `cidr:` label whose prefix is contained in `key`
    /// (Cilium's `LabelArray.Has` containment; their value is empty). The reference
    /// definition [`Self::any_value_for`] is tested against.
    #[cfg(test)]
    pub(crate) fn values_for(&self, source: LabelSource, key: &str) -> Vec<&str> {
        match source {
            LabelSource::Any => self
                .map
                .iter()
                .filter(|((_, k), _)| k == key)
                .map(|(_, v)| v.as_str())
                .collect(),
            LabelSource::Cidr => {
                let Ok(outer) = parse_cidr_key(key) else {
                    return Vec::new();
                };
                self.map
                    .iter()
                    .filter(|((s, k), _)| {
                        *s == LabelSource::Cidr
                            && parse_cidr_key(k).is_ok_and(|inner| outer.contains_prefix(&inner))
                    })
                    .map(|(_, v)| v.as_str())
                    .collect()
            }
            s => self
                .map
                .get(&(s, key.to_owned()))
                .map(String::as_str)
                .into_iter()
                .collect(),
        }
    }

    /// True if every label has a source of the local identity scope (`cidr`, `fqdn`,
    /// `cidrgroup`, `reserved`) and at least one is not `reserved`: such sets get local
    /// identities `0x01000000 | n` (reference §2.1, `ScopeForLabels`).
    pub fn is_local_scope(&self) -> bool {
        let mut non_reserved = false;
        for (s, _) in self.map.keys() {
            match s {
                LabelSource::Cidr | LabelSource::Fqdn | LabelSource::CidrGroup => {
                    non_reserved = true
                }
                LabelSource::Reserved => {}
                _ => return false,
            }
        }
        non_reserved
    }
}

impl FromIterator<Label> for Labels {
    fn from_iter<T: IntoIterator<Item = Label>>(iter: T) -> Self {
        let mut out = Labels::new();
        for l in iter {
            out.insert(l);
        }
        out
    }
}

impl fmt::Display for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for l in self.iter() {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            write!(f, "{l}")?;
        }
        Ok(())
    }
}

impl Serialize for Labels {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter().map(|l| l.to_string()))
    }
}

/// Well-known label keys (`pkg/k8s/apis/cilium.io/const.go`).
pub mod keys {
    /// Namespace of a pod.
    pub const POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
    /// Prefix of namespace labels copied onto pods.
    pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";
    /// Cluster name of an endpoint.
    pub const POLICY_CLUSTER: &str = "io.cilium.k8s.policy.cluster";
    /// Service account of a pod.
    pub const POLICY_SERVICEACCOUNT: &str = "io.cilium.k8s.policy.serviceaccount";
    /// Kind of resource a rule was derived from.
    pub const POLICY_DERIVED_FROM: &str = "io.cilium.k8s.policy.derived-from";
    /// Name of the policy resource.
    pub const POLICY_NAME: &str = "io.cilium.k8s.policy.name";
    /// Namespace of the policy resource (namespaced kinds only).
    pub const POLICY_NAMESPACE: &str = "io.cilium.k8s.policy.namespace";
    /// UID of the policy resource.
    pub const POLICY_UID: &str = "io.cilium.k8s.policy.uid";
}

/// Label keys always kept by the security-relevant filter (prefix match), even when an
/// exclude pattern below also matches (`pkg/labelsfilter` include entries).
const FILTER_INCLUDE_PREFIXES: &[&str] = &[
    keys::POD_NAMESPACE,
    "io.cilium.k8s.namespace.labels",
    "app.kubernetes.io",
    keys::POLICY_CLUSTER,
    keys::POLICY_SERVICEACCOUNT,
];

/// Label keys dropped by the filter (prefix match), reference §1.5.
const FILTER_EXCLUDE_PREFIXES: &[&str] = &[
    "io.kubernetes",
    "kubernetes.io",
    "k8s.io",
    "topology.kubernetes.io",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "batch.kubernetes.io/job-completion-index",
    "batch.kubernetes.io/controller-uid",
    "pod-template-hash",
    "pod-template-generation",
    "controller-revision-hash",
    "controller-uid",
    "annotation",
    "etcd_node",
];

/// True if a label is security-relevant under Cilium's default label-prefix filter:
/// all `reserved:` labels, the include list, and anything not on the exclude list.
pub fn is_security_relevant(label: &Label) -> bool {
    if label.source == LabelSource::Reserved {
        return true;
    }
    let key = label.key.as_str();
    if FILTER_INCLUDE_PREFIXES.iter().any(|p| key.starts_with(p)) {
        return true;
    }
    if key.contains("beta.kubernetes.io") {
        return false;
    }
    !FILTER_EXCLUDE_PREFIXES.iter().any(|p| key.starts_with(p))
}

/// Keeps only the security-relevant labels (those that feed identity allocation).
pub fn filter_security_relevant(labels: &Labels) -> Labels {
    labels.iter().filter(is_security_relevant).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_forms() {
        let cases = [
            ("k8s:app=web", LabelSource::K8s, "app", "web"),
            ("app=web", LabelSource::Unspec, "app", "web"),
            ("reserved:host", LabelSource::Reserved, "host", ""),
            ("$host", LabelSource::Reserved, "host", ""),
            ("any:app", LabelSource::Any, "app", ""),
            ("k8s:a=b=c", LabelSource::K8s, "a", "b=c"),
            ("fqdn:*.cilium.io", LabelSource::Fqdn, "*.cilium.io", ""),
            ("cidr:10.1.2.0/24", LabelSource::Cidr, "10.1.2.0/24", ""),
            ("cidr:2001-db8--/32", LabelSource::Cidr, "2001:db8::/32", ""),
            ("container:x", LabelSource::Container, "x", ""),
        ];
        for (text, source, key, value) in cases {
            let l = Label::parse(text).unwrap();
            assert_eq!(
                (l.source, l.key.as_str(), l.value.as_str()),
                (source, key, value),
                "{text}"
            );
        }
    }

    #[test]
    fn parse_errors() {
        for bad in [
            "",
            "k8s:",
            "bogus:app",
            "cidr:10.0.0.0/33",
            "cidr:nope",
            "=x",
        ] {
            assert!(Label::parse(bad).is_err(), "{bad} should fail");
        }
        let e = Label::parse("bogus:app").unwrap_err().to_string();
        assert!(e.contains("unknown label source `bogus`"), "{e}");
    }

    #[test]
    fn display_roundtrip() {
        for t in [
            "k8s:app=web",
            "reserved:host",
            "cidr:10.0.0.0/8",
            "fqdn:cilium.io",
        ] {
            assert_eq!(Label::parse(t).unwrap().to_string(), t);
        }
    }

    #[test]
    fn cidr_containment() {
        // ["cidr:1.1.1.1/32"].Has("cidr.1.0.0.0/8") == true (pkg/labels/array.go)
        let l = Labels::parse(["cidr:1.1.1.1/32"]).unwrap();
        assert_eq!(l.values_for(LabelSource::Cidr, "1.0.0.0/8").len(), 1);
        assert_eq!(l.values_for(LabelSource::Cidr, "1.1.1.1/32").len(), 1);
        assert!(l.values_for(LabelSource::Cidr, "2.0.0.0/8").is_empty());
        assert!(l.values_for(LabelSource::Cidr, "1.1.1.0/31").len() == 1);
        let l6 = Labels::parse(["cidr:2001:db8::1/128"]).unwrap();
        assert_eq!(l6.values_for(LabelSource::Cidr, "2001:db8::/32").len(), 1);
        assert!(l6.values_for(LabelSource::Cidr, "0.0.0.0/0").is_empty());
    }

    #[test]
    fn any_source_matches_every_source() {
        let l = Labels::parse(["k8s:app=web", "container:app=x"]).unwrap();
        let mut v = l.values_for(LabelSource::Any, "app");
        v.sort();
        assert_eq!(v, vec!["web", "x"]);
        assert_eq!(l.values_for(LabelSource::K8s, "app"), vec!["web"]);
    }

    #[test]
    fn security_filter() {
        let keep = [
            "k8s:app=web",
            "reserved:host",
            "k8s:io.kubernetes.pod.namespace=default",
            "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=default",
            "k8s:app.kubernetes.io/name=web",
            "k8s:io.cilium.k8s.policy.cluster=default",
            "k8s:io.cilium.k8s.policy.serviceaccount=sa",
        ];
        let drop = [
            "k8s:pod-template-hash=abc",
            "k8s:controller-revision-hash=1",
            "k8s:io.kubernetes.container.name=x",
            "k8s:kubernetes.io/hostname=n1",
            "k8s:failure-domain.beta.kubernetes.io/zone=z",
            "k8s:topology.kubernetes.io/zone=z",
            "k8s:statefulset.kubernetes.io/pod-name=db-0",
            "k8s:batch.kubernetes.io/controller-uid=1",
            "k8s:annotation.foo=bar",
        ];
        for k in keep {
            assert!(is_security_relevant(&Label::parse(k).unwrap()), "{k}");
        }
        for d in drop {
            assert!(!is_security_relevant(&Label::parse(d).unwrap()), "{d}");
        }
    }

    #[test]
    fn local_scope() {
        assert!(
            Labels::parse(["cidr:10.0.0.0/8", "reserved:world"])
                .unwrap()
                .is_local_scope()
        );
        assert!(Labels::parse(["fqdn:cilium.io"]).unwrap().is_local_scope());
        assert!(!Labels::parse(["reserved:world"]).unwrap().is_local_scope());
        assert!(
            !Labels::parse(["k8s:app=x", "cidr:10.0.0.0/8"])
                .unwrap()
                .is_local_scope()
        );
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn source() -> impl Strategy<Value = LabelSource> {
            prop::sample::select(
                LabelSource::ALL
                    .into_iter()
                    .filter(|s| *s != LabelSource::Cidr)
                    .collect::<Vec<_>>(),
            )
        }

        proptest! {
            /// `source:key=value` display and parse round-trip.
            #[test]
            fn roundtrip(src in source(), key in "[a-z][a-z0-9./_-]{0,24}", value in "[A-Za-z0-9._-]{0,12}") {
                let l = Label::new(src, key, value);
                let text = l.to_string();
                prop_assert_eq!(Label::parse(&text).unwrap(), l);
            }

            /// CIDR labels round-trip in both IPv6 spellings and canonicalize.
            #[test]
            fn cidr_roundtrip(a in any::<u32>(), len in 0u8..=32, b in any::<u128>(), len6 in 0u8..=128) {
                let p4 = IpPrefix::new(std::net::IpAddr::V4(a.into()), len).unwrap();
                prop_assert_eq!(Label::parse(&format!("cidr:{p4}")).unwrap().cidr_prefix(), Some(p4));
                let p6 = IpPrefix::new(std::net::IpAddr::V6(b.into()), len6).unwrap();
                let dashed = format!("cidr:{}", p6.to_string().replace(':', "-"));
                prop_assert_eq!(Label::parse(&dashed).unwrap().cidr_prefix(), Some(p6));
            }

            /// Parsing arbitrary text never panics.
            #[test]
            fn parse_total(s in any::<String>()) {
                let _ = Label::parse(&s);
            }

            /// Containment agrees with address arithmetic.
            #[test]
            fn containment(a in any::<u32>(), la in 0u8..=32, b in any::<u32>(), lb in 0u8..=32) {
                let outer = IpPrefix::new(std::net::IpAddr::V4(a.into()), la).unwrap();
                let inner = IpPrefix::new(std::net::IpAddr::V4(b.into()), lb).unwrap();
                let labels: Labels = [Label::cidr(inner)].into_iter().collect();
                let has = !labels.values_for(LabelSource::Cidr, &outer.to_string()).is_empty();
                let mask = if la == 0 { 0 } else { u32::MAX << (32 - u32::from(la)) };
                let want = lb >= la && (b & mask) == (a & mask);
                prop_assert_eq!(has, want);
                prop_assert_eq!(labels.any_value_for(LabelSource::Cidr, &outer.to_string(), |_| true), want);
            }

            /// The allocation-free lookups agree with their definitions (an owned-key map
            /// lookup, a scan of all keys, `values_for`).
            #[test]
            fn lookups_agree(
                items in prop::collection::vec(
                    (prop::sample::select(LabelSource::ALL.to_vec()), "[a-c]{0,2}", "[xy]?"),
                    0..10,
                ),
                source in prop::sample::select(LabelSource::ALL.to_vec()),
                key in "[a-c]{0,2}",
                value in "[xy]?",
            ) {
                let set: Labels = items.into_iter().map(|(s, k, v)| Label::new(s, k, v)).collect();
                prop_assert_eq!(
                    set.get(source, &key),
                    set.map.get(&(source, key.clone())).map(String::as_str)
                );
                prop_assert_eq!(set.has_source(source), set.map.keys().any(|(s, _)| *s == source));
                let values = set.values_for(source, &key);
                prop_assert_eq!(set.any_value_for(source, &key, |_| true), !values.is_empty());
                prop_assert_eq!(
                    set.any_value_for(source, &key, |v| v == value),
                    values.contains(&value.as_str())
                );
            }
        }
    }
}
