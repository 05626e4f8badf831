//! The incremental resolver: repository + identities + endpoints, with every change
//! answered by a per-endpoint diff of policy-map entries instead of a rebuild.
//!
//! Owns which endpoints a change affects: a policy change recompiles only endpoints
//! selected by the old or new version of the policy; an identity change recomputes only
//! that identity's entries (its "bucket", see `resolve.rs`) in every endpoint; endpoint
//! changes recompute that endpoint. Correctness is checked against full resolution in the
//! tests. No I/O: the caller applies the diffs to the maps and the proxy.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::identity::{Identity, IdentitySet};
use crate::labels::Labels;
use crate::model::{Policy, PolicyRef};
use crate::repository::Repository;
use crate::resolve::{
    CompiledPolicy, EndpointInfo, EndpointPolicy, EntryDiff, ResolveOptions, compile, diff_entries,
};

/// One change to the resolver's inputs.
#[derive(Debug, Clone)]
pub enum Change {
    /// Add or replace a policy (keyed by kind, namespace, name).
    UpsertPolicy(Policy),
    /// Remove a policy.
    RemovePolicy(PolicyRef),
    /// Add or replace an endpoint (labels or named ports changed).
    UpsertEndpoint(EndpointInfo),
    /// Remove an endpoint.
    RemoveEndpoint(u64),
    /// Add an identity or change its labels.
    UpsertIdentity(Identity, Labels),
    /// Remove an identity.
    RemoveIdentity(Identity),
}

/// What changed for one endpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EndpointChange {
    /// Policy-map entry changes.
    pub entries: EntryDiff,
    /// The L7 rule sets changed (push them to the proxy).
    pub l7_changed: bool,
    /// The ingress/egress enforcement flags changed.
    pub enforcement_changed: bool,
    /// The CIDR prefixes (ipcache needs) changed.
    pub cidr_changed: bool,
    /// The endpoint was removed (all its entries are in `entries.removed`).
    pub removed: bool,
}

impl EndpointChange {
    /// True if nothing changed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
            && !self.l7_changed
            && !self.enforcement_changed
            && !self.cidr_changed
            && !self.removed
    }
}

/// Changes per endpoint id (endpoints without changes are omitted).
pub type ResolverDiff = BTreeMap<u64, EndpointChange>;

struct EndpointState {
    info: EndpointInfo,
    compiled: CompiledPolicy,
    policy: EndpointPolicy,
}

/// Incremental policy resolution for a node's endpoints.
pub struct Resolver {
    repo: Repository,
    identities: IdentitySet,
    options: ResolveOptions,
    endpoints: BTreeMap<u64, EndpointState>,
}

impl Resolver {
    /// A resolver with no policies, the given identities and no endpoints.
    pub fn new(options: ResolveOptions, identities: IdentitySet) -> Resolver {
        Resolver {
            repo: Repository::new(),
            identities,
            options,
            endpoints: BTreeMap::new(),
        }
    }

    /// The policies.
    pub fn repository(&self) -> &Repository {
        &self.repo
    }

    /// The identities.
    pub fn identities(&self) -> &IdentitySet {
        &self.identities
    }

    /// The resolved policy of an endpoint.
    pub fn endpoint_policy(&self, id: u64) -> Option<&EndpointPolicy> {
        self.endpoints.get(&id).map(|s| &s.policy)
    }

    /// Endpoint ids.
    pub fn endpoint_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.endpoints.keys().copied()
    }

    /// Applies one change and returns what changed per endpoint.
    pub fn apply(&mut self, change: Change) -> ResolverDiff {
        match change {
            Change::UpsertPolicy(p) => {
                let new_ref = p.policy_ref();
                let old = self.repo.replace(p);
                self.policy_changed(old.as_ref(), self.repo.get(&new_ref).cloned().as_ref())
            }
            Change::RemovePolicy(r) => {
                let old = self.repo.remove(&r);
                self.policy_changed(old.as_ref(), None)
            }
            Change::UpsertEndpoint(info) => {
                let id = info.id;
                let compiled = compile(&self.repo, &info, &self.options);
                let policy = compiled.materialize(id, &self.identities);
                let change = match self.endpoints.get(&id) {
                    Some(old) => endpoint_change(&old.policy, &policy),
                    None => EndpointChange {
                        entries: diff_entries(&BTreeMap::new(), &policy.entries),
                        l7_changed: !policy.l7.is_empty(),
                        enforcement_changed: true,
                        cidr_changed: !policy.cidr_prefixes.is_empty(),
                        removed: false,
                    },
                };
                self.endpoints.insert(
                    id,
                    EndpointState {
                        info,
                        compiled,
                        policy,
                    },
                );
                single(id, change)
            }
            Change::RemoveEndpoint(id) => match self.endpoints.remove(&id) {
                None => ResolverDiff::new(),
                Some(old) => single(
                    id,
                    EndpointChange {
                        entries: diff_entries(&old.policy.entries, &BTreeMap::new()),
                        l7_changed: !old.policy.l7.is_empty(),
                        enforcement_changed: false,
                        cidr_changed: !old.policy.cidr_prefixes.is_empty(),
                        removed: true,
                    },
                ),
            },
            Change::UpsertIdentity(id, labels) => {
                self.identities.insert(id, labels.clone());
                self.identity_changed(id, Some(&labels))
            }
            Change::RemoveIdentity(id) => {
                if self.identities.remove(id).is_none() {
                    return ResolverDiff::new();
                }
                self.identity_changed(id, None)
            }
        }
    }

    fn policy_changed(&mut self, old: Option<&Policy>, new: Option<&Policy>) -> ResolverDiff {
        let mut out = ResolverDiff::new();
        for (id, st) in self.endpoints.iter_mut() {
            let touches = |p: Option<&Policy>| {
                p.is_some_and(|p| p.rules.iter().any(|r| st.info.selected_by(r)))
            };
            if !touches(old) && !touches(new) {
                continue;
            }
            let compiled = compile(&self.repo, &st.info, &self.options);
            let policy = compiled.materialize(*id, &self.identities);
            let change = endpoint_change(&st.policy, &policy);
            st.compiled = compiled;
            st.policy = policy;
            if !change.is_empty() {
                out.insert(*id, change);
            }
        }
        out
    }

    fn identity_changed(&mut self, id: Identity, labels: Option<&Labels>) -> ResolverDiff {
        let mut out = ResolverDiff::new();
        for (ep, st) in self.endpoints.iter_mut() {
            let old_cidr = st.policy.cidr_prefixes.clone();
            let (entries, l7_changed) =
                st.compiled
                    .update_identity(&mut st.policy, id, labels, &self.identities);
            let change = EndpointChange {
                entries,
                l7_changed,
                enforcement_changed: false,
                cidr_changed: old_cidr != st.policy.cidr_prefixes,
                removed: false,
            };
            if !change.is_empty() {
                out.insert(*ep, change);
            }
        }
        out
    }
}

fn single(id: u64, change: EndpointChange) -> ResolverDiff {
    let mut m = ResolverDiff::new();
    if !change.is_empty() {
        m.insert(id, change);
    }
    m
}

fn endpoint_change(old: &EndpointPolicy, new: &EndpointPolicy) -> EndpointChange {
    EndpointChange {
        entries: diff_entries(&old.entries, &new.entries),
        l7_changed: old.l7 != new.l7,
        enforcement_changed: old.enforce_ingress != new.enforce_ingress
            || old.enforce_egress != new.enforce_egress,
        cidr_changed: old.cidr_prefixes != new.cidr_prefixes
            || old.missing_cidr_identities != new.missing_cidr_identities,
        removed: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{cidr_identity_labels, fqdn_identity_labels};
    use crate::parse::parse_documents;
    use crate::resolve::{Direction, resolve_endpoint};
    use proptest::prelude::*;

    const POLICIES: &str = "
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: server}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: '80', protocol: TCP}]
      rules: {http: [{method: GET}]}
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: '80', endPort: 90, protocol: TCP}]}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: evil}}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: server}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{}]
    icmps: [{fields: [{type: 8}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system}}]
    toPorts:
    - ports: [{port: '53', protocol: ANY}]
      rules: {dns: [{matchPattern: '*.example.com'}]}
  - toFQDNs: [{matchPattern: '*.example.com'}]
  - toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}]
    toPorts: [{ports: [{port: '443', protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: no-world}
spec:
  endpointSelector: {}
  egressDeny:
  - toEntities: [world]
    toPorts: [{ports: [{port: '25', protocol: TCP}]}]
  enableDefaultDeny: {egress: false}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: knp}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress:
  - from: [{namespaceSelector: {}}]
    ports: [{port: 8080}]
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: host}
spec:
  nodeSelector: {}
  ingress:
  - fromEntities: [cluster]
";

    fn policies() -> Vec<Policy> {
        parse_documents(POLICIES, "pool").unwrap()
    }

    fn l(items: &[&str]) -> Labels {
        Labels::parse(items.iter().copied()).unwrap()
    }

    fn identity_pool() -> Vec<(Identity, Labels)> {
        let fqdn = crate::fqdn::FqdnSelector::pattern("*.example.com").unwrap();
        vec![
            (
                Identity(256),
                l(&["k8s:app=client", "k8s:io.kubernetes.pod.namespace=default"]),
            ),
            (
                Identity(257),
                l(&["k8s:app=server", "k8s:io.kubernetes.pod.namespace=default"]),
            ),
            (
                Identity(258),
                l(&["k8s:app=evil", "k8s:io.kubernetes.pod.namespace=default"]),
            ),
            (
                Identity(259),
                l(&[
                    "k8s:k8s-app=kube-dns",
                    "k8s:io.kubernetes.pod.namespace=kube-system",
                ]),
            ),
            // same id, different labels: a relabel
            (
                Identity(256),
                l(&["k8s:app=evil", "k8s:io.kubernetes.pod.namespace=other"]),
            ),
            (
                Identity(0x0100_0001),
                cidr_identity_labels("10.0.0.0/8".parse().unwrap()),
            ),
            (
                Identity(0x0100_0002),
                cidr_identity_labels("10.1.0.0/16".parse().unwrap()),
            ),
            (Identity(0x0100_0003), fqdn_identity_labels([&fqdn])),
            (Identity::WORLD, l(&["reserved:world"])),
        ]
    }

    fn endpoint_pool() -> Vec<EndpointInfo> {
        vec![
            EndpointInfo::new(
                1,
                l(&["k8s:app=server", "k8s:io.kubernetes.pod.namespace=default"]),
            ),
            EndpointInfo::new(
                2,
                l(&["k8s:app=client", "k8s:io.kubernetes.pod.namespace=default"]),
            ),
            EndpointInfo::new(3, l(&["reserved:host"])),
            // endpoint 1 relabelled
            EndpointInfo::new(
                1,
                l(&["k8s:app=client", "k8s:io.kubernetes.pod.namespace=default"]),
            ),
        ]
    }

    #[derive(Debug, Clone)]
    enum Op {
        UpsertPolicy(usize),
        RemovePolicy(usize),
        UpsertIdentity(usize),
        RemoveIdentity(usize),
        UpsertEndpoint(usize),
        RemoveEndpoint(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..6usize).prop_map(Op::UpsertPolicy),
            (0..6usize).prop_map(Op::RemovePolicy),
            (0..9usize).prop_map(Op::UpsertIdentity),
            (0..9usize).prop_map(Op::RemoveIdentity),
            (0..4usize).prop_map(Op::UpsertEndpoint),
            (0..4usize).prop_map(Op::RemoveEndpoint),
        ]
    }

    fn check(ops: &[Op]) -> Result<(), TestCaseError> {
        let pols = policies();
        let idents = identity_pool();
        let eps = endpoint_pool();
        let options = ResolveOptions::new(15001, 15053);
        let mut r = Resolver::new(options.clone(), IdentitySet::with_reserved());
        let mut infos: BTreeMap<u64, EndpointInfo> = BTreeMap::new();
        let mut shadow: BTreeMap<u64, BTreeMap<crate::PolicyKey, crate::PolicyEntry>> =
            BTreeMap::new();
        for op in ops {
            let change = match op {
                Op::UpsertPolicy(i) => Change::UpsertPolicy(pols[*i].clone()),
                Op::RemovePolicy(i) => Change::RemovePolicy(pols[*i].policy_ref()),
                Op::UpsertIdentity(i) => Change::UpsertIdentity(idents[*i].0, idents[*i].1.clone()),
                Op::RemoveIdentity(i) => Change::RemoveIdentity(idents[*i].0),
                Op::UpsertEndpoint(i) => {
                    infos.insert(eps[*i].id, eps[*i].clone());
                    Change::UpsertEndpoint(eps[*i].clone())
                }
                Op::RemoveEndpoint(i) => {
                    infos.remove(&eps[*i].id);
                    Change::RemoveEndpoint(eps[*i].id)
                }
            };
            let d = r.apply(change);
            for (ep, change) in d {
                let m = shadow.entry(ep).or_default();
                change.entries.apply_to(m);
                if change.removed {
                    prop_assert!(m.is_empty());
                    shadow.remove(&ep);
                }
            }
            for (id, info) in &infos {
                let full = resolve_endpoint(r.repository(), info, r.identities(), &options);
                let inc = r.endpoint_policy(*id).cloned();
                prop_assert_eq!(Some(&full), inc.as_ref(), "endpoint {} after {:?}", id, op);
                let empty = BTreeMap::new();
                prop_assert_eq!(
                    &full.entries,
                    shadow.get(id).unwrap_or(&empty),
                    "shadow of {}",
                    id
                );
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Incremental resolution always equals full resolution, and the emitted diffs
        /// reproduce the entries.
        #[test]
        fn incremental_equals_full(ops in proptest::collection::vec(op(), 1..25)) {
            check(&ops)?;
        }
    }

    #[test]
    fn scripted_sequence() {
        use Op::*;
        let ops = [
            UpsertEndpoint(0),
            UpsertEndpoint(1),
            UpsertEndpoint(2),
            UpsertPolicy(0),
            UpsertIdentity(0),
            UpsertIdentity(2),
            UpsertPolicy(2),
            UpsertIdentity(5),
            UpsertIdentity(6),
            UpsertIdentity(7),
            UpsertIdentity(4),
            UpsertPolicy(1),
            UpsertPolicy(3),
            UpsertPolicy(4),
            UpsertPolicy(5),
            RemoveIdentity(0),
            UpsertEndpoint(3),
            RemovePolicy(2),
            RemoveEndpoint(1),
        ];
        check(&ops).unwrap();
    }

    #[test]
    fn identity_change_is_a_small_diff() {
        let mut r = Resolver::new(
            ResolveOptions::new(15001, 15053),
            IdentitySet::with_reserved(),
        );
        r.apply(Change::UpsertPolicy(policies()[0].clone()));
        let d = r.apply(Change::UpsertEndpoint(endpoint_pool()[0].clone()));
        assert!(d[&1].enforcement_changed);
        let (id, labels) = identity_pool()[0].clone();
        let d = r.apply(Change::UpsertIdentity(id, labels));
        let ch = &d[&1];
        assert!(ch.entries.removed.is_empty() && ch.entries.changed.is_empty());
        assert!(ch.entries.added.keys().all(|k| k.identity == id));
        assert!(ch.l7_changed);
        // redirect for 80, prefixes for 81-90
        assert!(
            ch.entries
                .added
                .keys()
                .any(|k| k.port == 80 && k.port_prefix_len == 16)
        );
        let p = r.endpoint_policy(1).unwrap();
        assert_eq!(
            p.lookup(id, Direction::Ingress, 6, 80)
                .map(|e| e.proxy_port),
            Some(15001)
        );
        // an identity no selector cares about changes nothing
        let d = r.apply(Change::UpsertIdentity(
            Identity(999),
            l(&["k8s:app=nobody"]),
        ));
        assert!(d.is_empty());
        // removing the endpoint removes everything
        let d = r.apply(Change::RemoveEndpoint(1));
        assert!(d[&1].removed);
        assert!(r.endpoint_policy(1).is_none());
    }
}
