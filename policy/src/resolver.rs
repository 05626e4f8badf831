//! The incremental resolver: repository + identities + endpoints, with every change
//! answered by a per-endpoint diff of policy-map entries instead of a rebuild.
//!
//! Owns which endpoints and which entries a change affects:
//! - a policy change recompiles only endpoints selected by the old or new version of the
//!   policy, compares the new compilation with the old one peer by peer
//!   ([`changed_peers`]) and recomputes only the buckets (entries of one remote identity,
//!   see `resolve.rs`) of identities matched by a peer whose contributions changed;
//! - an identity change recomputes only that identity's bucket in every endpoint;
//! - an endpoint change recomputes that endpoint.
//!
//! Which identities a peer selector matches comes from the [`SelectorCache`], shared by
//! all endpoints and kept current on identity changes, so no change re-matches selectors
//! against every identity (only a selector no endpoint used before is matched, once).
//! Correctness is checked against full resolution ([`crate::resolve_endpoint`], which
//! does not use the cache) in the tests. No I/O: the caller applies the diffs to the maps
//! and the proxy.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

use crate::identity::{Identity, IdentitySet};
use crate::labels::{LabelSource, Labels};
use crate::model::{Policy, PolicyRef};
use crate::repository::Repository;
use crate::resolve::{
    CompiledPolicy, EndpointInfo, EndpointPolicy, EntryDiff, ResolveOptions, changed_peers,
    compile, diff_entries,
};
use crate::selector_cache::{SelectorCache, SlotId};

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
    /// The cache slot of each compiled selector (`slots[i]` holds
    /// `compiled.selectors()[i]`); the endpoint holds one reference on each.
    slots: Vec<SlotId>,
    /// Inverse of `slots`.
    local: HashMap<SlotId, usize>,
    policy: EndpointPolicy,
}

impl EndpointState {
    /// Compiles `info` and materializes it from the cache (taking references on its
    /// selectors).
    fn new(
        info: EndpointInfo,
        repo: &Repository,
        options: &ResolveOptions,
        cache: &mut SelectorCache,
        identities: &IdentitySet,
    ) -> EndpointState {
        let compiled = compile(repo, &info, options);
        let (slots, local) = acquire_slots(cache, &compiled, identities);
        let policy = compiled.materialize_with(info.id, identities, &|i| cache.matches(slots[i]));
        EndpointState {
            info,
            compiled,
            slots,
            local,
            policy,
        }
    }

    /// Drops the endpoint's references on cached selectors.
    fn release(self, cache: &mut SelectorCache) {
        for s in self.slots {
            cache.release(s);
        }
    }

    /// Selectors of the compiled policy matching `id`, ascending.
    fn matched(&self, cache: &SelectorCache, id: Identity) -> Vec<usize> {
        matched_locals(cache, &self.local, id)
    }

    /// Recompiles after a policy change and updates the materialized policy in place:
    /// only buckets that [`changed_peers`] says may differ are recomputed.
    fn recompile(
        &mut self,
        repo: &Repository,
        options: &ResolveOptions,
        cache: &mut SelectorCache,
        identities: &IdentitySet,
    ) -> EndpointChange {
        let compiled = compile(repo, &self.info, options);
        let (slots, local) = acquire_slots(cache, &compiled, identities);
        let (wildcard_changed, changed) =
            changed_peers(&self.compiled, &self.slots, &compiled, &slots);
        let mut affected: BTreeSet<Identity> = changed
            .iter()
            .flat_map(|s| cache.matches(*s).iter().copied())
            .collect();
        if wildcard_changed {
            affected.insert(Identity::ANY);
        }
        let mut entries = std::mem::take(&mut self.policy.entries);
        let mut diff = EntryDiff::default();
        for id in affected {
            let matched = matched_locals(cache, &local, id);
            // Buckets are disjoint, so merging their diffs is a union.
            diff.merge(compiled.replace_bucket(&mut entries, id, &matched));
        }
        let policy = compiled.with_entries(self.info.id, entries, identities, &|i| {
            cache.matches(slots[i])
        });
        let change = endpoint_change_with(diff, &self.policy, &policy);
        self.policy = policy;
        self.compiled = compiled;
        self.local = local;
        for s in std::mem::replace(&mut self.slots, slots) {
            cache.release(s);
        }
        change
    }
}

/// Takes a cache reference on each selector of `compiled`; returns the slots by selector
/// index and their inverse.
fn acquire_slots(
    cache: &mut SelectorCache,
    compiled: &CompiledPolicy,
    identities: &IdentitySet,
) -> (Vec<SlotId>, HashMap<SlotId, usize>) {
    let slots: Vec<SlotId> = compiled
        .selectors()
        .iter()
        .map(|s| cache.acquire(s, identities))
        .collect();
    let local = slots.iter().enumerate().map(|(i, s)| (*s, i)).collect();
    (slots, local)
}

/// Indices of the selectors (of the compilation whose slot inverse is `local`) matching
/// `id`, ascending.
fn matched_locals(
    cache: &SelectorCache,
    local: &HashMap<SlotId, usize>,
    id: Identity,
) -> Vec<usize> {
    let mut v: Vec<usize> = cache
        .selecting(id)
        .iter()
        .filter_map(|s| local.get(s).copied())
        .collect();
    v.sort_unstable();
    v
}

/// Incremental policy resolution for a node's endpoints.
pub struct Resolver {
    repo: Repository,
    identities: IdentitySet,
    options: ResolveOptions,
    /// Peer selectors of all endpoints' compiled policies with the identities they match.
    cache: SelectorCache,
    endpoints: BTreeMap<u64, EndpointState>,
}

impl Resolver {
    /// A resolver with no policies, the given identities and no endpoints.
    pub fn new(options: ResolveOptions, identities: IdentitySet) -> Resolver {
        Resolver {
            repo: Repository::new(),
            identities,
            options,
            cache: SelectorCache::default(),
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
                let st = EndpointState::new(
                    info,
                    &self.repo,
                    &self.options,
                    &mut self.cache,
                    &self.identities,
                );
                let policy = &st.policy;
                let change = match self.endpoints.get(&id) {
                    Some(old) => endpoint_change(&old.policy, policy),
                    None => EndpointChange {
                        entries: diff_entries(&BTreeMap::new(), &policy.entries),
                        l7_changed: !policy.l7.is_empty(),
                        enforcement_changed: true,
                        cidr_changed: !policy.cidr_prefixes.is_empty(),
                        removed: false,
                    },
                };
                // Insert (and release the old state's references) after the new state took
                // its own, so selectors both use stay cached.
                if let Some(old) = self.endpoints.insert(id, st) {
                    old.release(&mut self.cache);
                }
                single(id, change)
            }
            Change::RemoveEndpoint(id) => match self.endpoints.remove(&id) {
                None => ResolverDiff::new(),
                Some(old) => {
                    let change = EndpointChange {
                        entries: diff_entries(&old.policy.entries, &BTreeMap::new()),
                        l7_changed: !old.policy.l7.is_empty(),
                        enforcement_changed: false,
                        cidr_changed: !old.policy.cidr_prefixes.is_empty(),
                        removed: true,
                    };
                    old.release(&mut self.cache);
                    single(id, change)
                }
            },
            Change::UpsertIdentity(id, labels) => {
                let old = self.identities.insert(id, labels.clone());
                self.cache.upsert_identity(id, &labels);
                let cidr_may_change =
                    may_be_cidr_identity(&labels) || old.as_ref().is_some_and(may_be_cidr_identity);
                self.identity_changed(id, cidr_may_change)
            }
            Change::RemoveIdentity(id) => {
                let Some(old) = self.identities.remove(id) else {
                    return ResolverDiff::new();
                };
                self.cache.remove_identity(id);
                self.identity_changed(id, may_be_cidr_identity(&old))
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
            let change = st.recompile(&self.repo, &self.options, &mut self.cache, &self.identities);
            if !change.is_empty() {
                out.insert(*id, change);
            }
        }
        out
    }

    /// The identity's labels in the set (and the cache) are already updated.
    fn identity_changed(&mut self, id: Identity, cidr_may_change: bool) -> ResolverDiff {
        let mut out = ResolverDiff::new();
        for (ep, st) in self.endpoints.iter_mut() {
            let matched = st.matched(&self.cache, id);
            let old_cidr = cidr_may_change.then(|| st.policy.cidr_prefixes.clone());
            let (entries, l7_changed) = st.compiled.update_identity(
                &mut st.policy,
                id,
                &matched,
                cidr_may_change,
                &self.identities,
            );
            let change = EndpointChange {
                entries,
                l7_changed,
                enforcement_changed: false,
                cidr_changed: old_cidr.is_some_and(|c| c != st.policy.cidr_prefixes),
                removed: false,
            };
            if !change.is_empty() {
                out.insert(*ep, change);
            }
        }
        out
    }
}

/// False if `labels` cannot be the labels of a CIDR identity (`cidr:` labels, see
/// [`crate::cidr_identity_labels`]), so adding, relabelling or removing an identity with
/// them cannot change an endpoint's CIDR map (a lookup by exactly such labels).
fn may_be_cidr_identity(labels: &Labels) -> bool {
    labels.has_source(LabelSource::Cidr)
}

#[cfg(test)]
impl Resolver {
    /// Checks the selector cache against the identities and the endpoints' references.
    fn check_cache(&self) -> Result<(), String> {
        for (id, st) in &self.endpoints {
            if st.slots.len() != st.compiled.selectors().len() || st.local.len() != st.slots.len() {
                return Err(format!("endpoint {id}: slots do not match its selectors"));
            }
            if let Some(i) = (0..st.slots.len()).find(|i| st.local.get(&st.slots[*i]) != Some(i)) {
                return Err(format!(
                    "endpoint {id}: local index of selector {i} is wrong"
                ));
            }
        }
        self.cache.check(&self.identities, |slot| {
            self.endpoints
                .values()
                .filter(|st| st.slots.contains(&slot))
                .count()
        })
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
    endpoint_change_with(diff_entries(&old.entries, &new.entries), old, new)
}

/// The change from `old` to `new` given their entry diff (`old.entries` is not read).
fn endpoint_change_with(
    entries: EntryDiff,
    old: &EndpointPolicy,
    new: &EndpointPolicy,
) -> EndpointChange {
    EndpointChange {
        entries,
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
            if let Err(e) = r.check_cache() {
                return Err(TestCaseError::fail(format!(
                    "selector cache after {op:?}: {e}"
                )));
            }
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
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Incremental resolution always equals full resolution, and the emitted diffs
        /// reproduce the entries.
        #[test]
        fn incremental_equals_full(ops in proptest::collection::vec(op(), 1..25)) {
            check(&ops)?;
        }
    }

    /// Every endpoint, identity and policy of the pools (policy 1 is a replacement of
    /// policy 0, identity 4 a relabel of 0: left to the random ops).
    fn populated() -> Vec<Op> {
        let mut ops: Vec<Op> = (0..3).map(Op::UpsertEndpoint).collect();
        ops.extend([0, 1, 2, 3, 5, 6, 7, 8].map(Op::UpsertIdentity));
        ops.extend([0, 2, 3, 4, 5].map(Op::UpsertPolicy));
        ops
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// The same from a state where every selector is in use, so that random changes
        /// (relabels, removals, replacements) hit live selectors and buckets far more
        /// often than from an empty start.
        #[test]
        fn incremental_equals_full_from_populated(ops in proptest::collection::vec(op(), 1..25)) {
            let mut all = populated();
            all.extend(ops);
            check(&all)?;
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

    /// A relabelled identity leaves the selectors it matched before, and later
    /// materializations from the cache (a policy re-upsert, an endpoint re-upsert) see that.
    #[test]
    fn relabel_then_rematerialize() {
        use Op::*;
        check(&[
            UpsertEndpoint(0),
            UpsertPolicy(0),
            UpsertIdentity(0),
            UpsertIdentity(4),
            UpsertPolicy(0),
            UpsertEndpoint(0),
        ])
        .unwrap();
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
