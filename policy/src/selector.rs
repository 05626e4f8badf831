//! Endpoint selectors: Kubernetes label selectors with Cilium's source-extended keys.
//!
//! Owns key extension (`k8s:foo` → source k8s key `foo`; plain `foo` → any source),
//! `matchLabels`/`matchExpressions` (In, NotIn, Exists, DoesNotExist) and matching against
//! [`Labels`], including `cidr:` containment. Namespace scoping of selectors is applied by
//! the parser (see `parse.rs`) with the helpers here.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Serialize, Serializer};

use crate::error::SelectorError;
use crate::labels::{Label, LabelSource, Labels, split_source};

/// Operator of one requirement.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Operator {
    /// A label with the key exists and its value is in the set.
    In(BTreeSet<String>),
    /// No label with the key has a value in the set (an absent key matches).
    NotIn(BTreeSet<String>),
    /// A label with the key exists.
    Exists,
    /// No label with the key exists.
    DoesNotExist,
}

/// One requirement over an extended key (source + key).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Requirement {
    /// Source the key is looked up in; [`LabelSource::Any`] matches every source.
    pub source: LabelSource,
    /// The label key.
    pub key: String,
    /// What must hold.
    pub op: Operator,
}

impl Requirement {
    /// True if `labels` satisfy the requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        let any = |pred: &dyn Fn(&str) -> bool| labels.any_value_for(self.source, &self.key, pred);
        match &self.op {
            Operator::In(set) => any(&|v| set.contains(v)),
            Operator::NotIn(set) => !any(&|v| set.contains(v)),
            Operator::Exists => any(&|_| true),
            Operator::DoesNotExist => !any(&|_| true),
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = format!("{}:{}", self.source, self.key);
        let join = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>().join(",");
        match &self.op {
            Operator::In(s) if s.len() == 1 => write!(f, "{k}={}", join(s)),
            Operator::In(s) => write!(f, "{k} in ({})", join(s)),
            Operator::NotIn(s) => write!(f, "{k} notin ({})", join(s)),
            Operator::Exists => write!(f, "{k}"),
            Operator::DoesNotExist => write!(f, "!{k}"),
        }
    }
}

/// A selector: all requirements must hold. No requirements = wildcard (selects everything).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointSelector {
    /// Sorted and deduplicated, so equal selectors compare equal.
    requirements: Vec<Requirement>,
}

/// Parses a selector key (`k8s:app`, `app`, `$host`, `reserved:host`) into (source, key);
/// no source means [`LabelSource::Any`] (Cilium's default key extender).
pub fn parse_selector_key(text: &str) -> Result<(LabelSource, String), SelectorError> {
    let (source, key) = split_source(text)?;
    if key.is_empty() {
        return Err(SelectorError::Label(crate::error::LabelError::new(
            text,
            "empty label key",
        )));
    }
    let source = source.unwrap_or(LabelSource::Any);
    if source == LabelSource::Cidr {
        // Canonicalize so that `cidr:10.0.0.1/8` and `cidr:10.0.0.0/8` are one selector.
        let p = crate::labels::parse_cidr_key(key)
            .map_err(|m| SelectorError::Label(crate::error::LabelError::new(text, &m)))?;
        return Ok((source, p.to_string()));
    }
    Ok((source, key.to_owned()))
}

impl EndpointSelector {
    /// The wildcard selector (matches every label set, including the empty one).
    pub fn wildcard() -> EndpointSelector {
        EndpointSelector::default()
    }

    /// Builds a selector from `matchLabels` pairs and `matchExpressions` triples
    /// (key, operator name, values) with Kubernetes' validation of operator/value arity.
    pub fn from_parts<'a>(
        match_labels: impl IntoIterator<Item = (&'a str, &'a str)>,
        match_expressions: impl IntoIterator<Item = (&'a str, &'a str, Vec<String>)>,
    ) -> Result<EndpointSelector, SelectorError> {
        let mut reqs = Vec::new();
        for (k, v) in match_labels {
            let (source, key) = parse_selector_key(k)?;
            reqs.push(Requirement {
                source,
                key,
                op: Operator::In(BTreeSet::from([v.to_owned()])),
            });
        }
        for (k, op, values) in match_expressions {
            let (source, key) = parse_selector_key(k)?;
            let arity = |need: bool| -> Result<(), SelectorError> {
                match (need, values.is_empty()) {
                    (true, true) => Err(SelectorError::Values {
                        op: op.to_owned(),
                        key: k.to_owned(),
                        problem: "requires at least one value",
                    }),
                    (false, false) => Err(SelectorError::Values {
                        op: op.to_owned(),
                        key: k.to_owned(),
                        problem: "takes no values",
                    }),
                    _ => Ok(()),
                }
            };
            let op = match op {
                "In" => {
                    arity(true)?;
                    Operator::In(values.iter().cloned().collect())
                }
                "NotIn" => {
                    arity(true)?;
                    Operator::NotIn(values.iter().cloned().collect())
                }
                "Exists" => {
                    arity(false)?;
                    Operator::Exists
                }
                "DoesNotExist" => {
                    arity(false)?;
                    Operator::DoesNotExist
                }
                other => return Err(SelectorError::Operator(other.to_owned())),
            };
            reqs.push(Requirement { source, key, op });
        }
        Ok(EndpointSelector::from_requirements(reqs))
    }

    /// A selector from requirements (sorted and deduplicated).
    pub fn from_requirements(mut reqs: Vec<Requirement>) -> EndpointSelector {
        reqs.sort();
        reqs.dedup();
        EndpointSelector { requirements: reqs }
    }

    /// Selects label sets containing all of `labels` (each as `source:key=value`).
    pub fn from_labels(labels: &[Label]) -> EndpointSelector {
        EndpointSelector::from_requirements(
            labels
                .iter()
                .map(|l| Requirement {
                    source: l.source,
                    key: l.key.clone(),
                    op: Operator::In(BTreeSet::from([l.value.clone()])),
                })
                .collect(),
        )
    }

    /// Selects label sets that have a `reserved:<name>` label.
    pub fn reserved(name: &str) -> EndpointSelector {
        EndpointSelector::from_labels(&[Label::reserved(name)])
    }

    /// The requirements (sorted).
    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }

    /// True if this selects everything.
    pub fn is_wildcard(&self) -> bool {
        self.requirements.is_empty()
    }

    /// True if every requirement holds for `labels`.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// True if a requirement uses `key` with `source` exactly.
    pub fn has_key(&self, source: LabelSource, key: &str) -> bool {
        self.requirements
            .iter()
            .any(|r| r.source == source && r.key == key)
    }

    /// True if a requirement's key (with `source`) starts with `prefix`.
    pub fn has_key_prefix(&self, source: LabelSource, prefix: &str) -> bool {
        self.requirements
            .iter()
            .any(|r| r.source == source && r.key.starts_with(prefix))
    }

    /// True if any requirement is over the `reserved` source.
    pub fn has_reserved_key(&self) -> bool {
        self.requirements
            .iter()
            .any(|r| r.source == LabelSource::Reserved)
    }

    /// The single `In` value of `matchLabels`-style requirement on (source, key), if any.
    pub fn match_value(&self, source: LabelSource, key: &str) -> Option<&str> {
        self.requirements.iter().find_map(|r| match &r.op {
            Operator::In(s) if r.source == source && r.key == key && s.len() == 1 => {
                s.iter().next().map(String::as_str)
            }
            _ => None,
        })
    }

    /// Cilium's `AddMatch`: sets the `matchLabels` entry for (source, key) to `value`,
    /// replacing a previous single-value `In` on the same key. Returns the replaced value.
    pub fn add_match(&mut self, source: LabelSource, key: &str, value: &str) -> Option<String> {
        let old = self.match_value(source, key).map(str::to_owned);
        self.requirements.retain(|r| {
            !(r.source == source
                && r.key == key
                && matches!(&r.op, Operator::In(s) if s.len() == 1))
        });
        self.push(Requirement {
            source,
            key: key.to_owned(),
            op: Operator::In(BTreeSet::from([value.to_owned()])),
        });
        old
    }

    /// Adds a requirement (keeping the canonical order).
    pub fn push(&mut self, req: Requirement) {
        self.requirements.push(req);
        self.requirements.sort();
        self.requirements.dedup();
    }
}

impl fmt::Display for EndpointSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.requirements.is_empty() {
            return f.write_str("{}");
        }
        let parts: Vec<String> = self.requirements.iter().map(|r| r.to_string()).collect();
        f.write_str(&parts.join(","))
    }
}

impl Serialize for EndpointSelector {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(ml: &[(&str, &str)], me: &[(&str, &str, &[&str])]) -> EndpointSelector {
        EndpointSelector::from_parts(
            ml.iter().copied(),
            me.iter()
                .map(|(k, o, v)| (*k, *o, v.iter().map(|s| s.to_string()).collect())),
        )
        .unwrap()
    }

    fn labels(l: &[&str]) -> Labels {
        Labels::parse(l.iter().copied()).unwrap()
    }

    #[test]
    fn key_extension() {
        assert_eq!(
            parse_selector_key("k8s:app").unwrap(),
            (LabelSource::K8s, "app".into())
        );
        assert_eq!(
            parse_selector_key("app").unwrap(),
            (LabelSource::Any, "app".into())
        );
        assert_eq!(
            parse_selector_key("$host").unwrap(),
            (LabelSource::Reserved, "host".into())
        );
        assert!(parse_selector_key("nope:app").is_err());
    }

    #[test]
    fn match_table() {
        let ep = labels(&["k8s:app=web", "k8s:tier=front", "container:env=prod"]);
        let cases: &[(EndpointSelector, bool)] = &[
            (EndpointSelector::wildcard(), true),
            (sel(&[("app", "web")], &[]), true),
            (sel(&[("k8s:app", "web")], &[]), true),
            (sel(&[("container:app", "web")], &[]), false),
            (sel(&[("app", "db")], &[]), false),
            (sel(&[("env", "prod")], &[]), true),
            (sel(&[], &[("app", "In", &["db", "web"])]), true),
            (sel(&[], &[("app", "NotIn", &["web"])]), false),
            (sel(&[], &[("missing", "NotIn", &["x"])]), true),
            (sel(&[], &[("tier", "Exists", &[])]), true),
            (sel(&[], &[("tier", "DoesNotExist", &[])]), false),
            (sel(&[], &[("k8s:env", "DoesNotExist", &[])]), true),
            (sel(&[("app", "web")], &[("tier", "In", &["back"])]), false),
        ];
        for (i, (s, want)) in cases.iter().enumerate() {
            assert_eq!(s.matches(&ep), *want, "case {i}: {s}");
        }
    }

    #[test]
    fn arity_and_operator_errors() {
        let e = EndpointSelector::from_parts([], [("a", "In", vec![])]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "operator In on key `a` requires at least one value"
        );
        let e = EndpointSelector::from_parts([], [("a", "Exists", vec!["x".into()])]).unwrap_err();
        assert_eq!(e.to_string(), "operator Exists on key `a` takes no values");
        let e = EndpointSelector::from_parts([], [("a", "Gt", vec![])]).unwrap_err();
        assert!(
            e.to_string()
                .contains("unknown matchExpressions operator `Gt`")
        );
    }

    #[test]
    fn cidr_selector_containment() {
        let s = sel(&[("cidr:10.0.0.0/8", "")], &[]);
        assert!(s.matches(&labels(&["cidr:10.1.0.0/16", "reserved:world"])));
        assert!(!s.matches(&labels(&["cidr:11.1.0.0/16"])));
        let except = sel(
            &[("cidr:10.0.0.0/8", "")],
            &[("cidr:10.1.0.0/16", "DoesNotExist", &[])],
        );
        assert!(!except.matches(&labels(&["cidr:10.1.2.0/24"])));
        assert!(except.matches(&labels(&["cidr:10.2.0.0/16"])));
    }

    #[test]
    fn add_match_replaces() {
        let mut s = sel(&[("k8s:io.kubernetes.pod.namespace", "other")], &[]);
        let old = s.add_match(LabelSource::K8s, "io.kubernetes.pod.namespace", "mine");
        assert_eq!(old.as_deref(), Some("other"));
        assert_eq!(s.to_string(), "k8s:io.kubernetes.pod.namespace=mine");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn source() -> impl Strategy<Value = LabelSource> {
            prop::sample::select(vec![
                LabelSource::K8s,
                LabelSource::Container,
                LabelSource::Reserved,
                LabelSource::Fqdn,
                LabelSource::Unspec,
            ])
        }

        proptest! {
            /// A selector built from a label's `source:key` matches a set holding that label;
            /// the plain key (any source) matches too; another source does not.
            #[test]
            fn key_extension(src in source(), key in "[a-z][a-z0-9./_-]{0,16}", value in "[a-z0-9]{0,8}",
                             other in "[a-z]{1,4}") {
                let set: Labels = [Label::new(src, key.clone(), value.clone())].into_iter().collect();
                let exact = format!("{src}:{key}");
                let s = EndpointSelector::from_parts([(exact.as_str(), value.as_str())], []).unwrap();
                prop_assert!(s.matches(&set));
                let any = EndpointSelector::from_parts([(key.as_str(), value.as_str())], []).unwrap();
                prop_assert!(any.matches(&set));
                let other_src = if src == LabelSource::K8s { LabelSource::Container } else { LabelSource::K8s };
                let wrong = format!("{other_src}:{key}");
                let w = EndpointSelector::from_parts([(wrong.as_str(), value.as_str())], []).unwrap();
                prop_assert!(!w.matches(&set));
                // Exists / DoesNotExist / In / NotIn are consistent
                let ex = EndpointSelector::from_parts([], [(key.as_str(), "Exists", vec![])]).unwrap();
                let dne = EndpointSelector::from_parts([], [(key.as_str(), "DoesNotExist", vec![])]).unwrap();
                prop_assert!(ex.matches(&set) && !dne.matches(&set));
                let vals = vec![value.clone(), other.clone()];
                let inn = EndpointSelector::from_parts([], [(key.as_str(), "In", vals.clone())]).unwrap();
                let notin = EndpointSelector::from_parts([], [(key.as_str(), "NotIn", vals)]).unwrap();
                prop_assert!(inn.matches(&set) && !notin.matches(&set));
            }

            /// Arbitrary keys and operators never panic.
            #[test]
            fn from_parts_total(k in any::<String>(), op in any::<String>(), v in proptest::collection::vec(any::<String>(), 0..3)) {
                let _ = EndpointSelector::from_parts([(k.as_str(), "x")], []);
                let _ = EndpointSelector::from_parts([], [(k.as_str(), op.as_str(), v)]);
            }

            /// Equal requirement lists in any order give equal selectors.
            #[test]
            fn canonical_order(keys in proptest::collection::vec("[a-z]{1,6}", 1..6)) {
                let fwd = EndpointSelector::from_parts(keys.iter().map(|k| (k.as_str(), "v")), []).unwrap();
                let rev = EndpointSelector::from_parts(keys.iter().rev().map(|k| (k.as_str(), "v")), []).unwrap();
                prop_assert_eq!(fwd, rev);
            }
        }
    }
}
