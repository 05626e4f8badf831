//! The policy repository: the set of parsed policies keyed by (kind, namespace, name).
//!
//! Owns add/replace/remove with a revision counter, iteration in a deterministic order,
//! and the queries resolution needs across all policies (CIDR prefixes that need
//! identities, toFQDNs selectors the DNS proxy must watch). No I/O, no watching.

use std::collections::{BTreeMap, BTreeSet};

use crate::cidr::IpPrefix;
use crate::fqdn::FqdnSelector;
use crate::model::{L7Rules, PeerRule, Peers, Policy, PolicyRef, Rule};

/// Policies by key, with a revision bumped on every change.
#[derive(Debug, Clone, Default)]
pub struct Repository {
    policies: BTreeMap<PolicyRef, Policy>,
    revision: u64,
}

/// Adding a policy whose key already exists.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("policy {0} already exists (use replace to update it)")]
pub struct AlreadyExists(pub PolicyRef);

impl Repository {
    /// An empty repository.
    pub fn new() -> Repository {
        Repository::default()
    }

    /// Adds a new policy; fails if one with the same key exists.
    pub fn add(&mut self, policy: Policy) -> Result<(), AlreadyExists> {
        let key = policy.policy_ref();
        if self.policies.contains_key(&key) {
            return Err(AlreadyExists(key));
        }
        self.policies.insert(key, policy);
        self.revision += 1;
        Ok(())
    }

    /// Adds or replaces a policy; returns the previous one.
    pub fn replace(&mut self, policy: Policy) -> Option<Policy> {
        self.revision += 1;
        self.policies.insert(policy.policy_ref(), policy)
    }

    /// Removes a policy; returns it.
    pub fn remove(&mut self, key: &PolicyRef) -> Option<Policy> {
        let old = self.policies.remove(key);
        if old.is_some() {
            self.revision += 1;
        }
        old
    }

    /// A policy by key.
    pub fn get(&self, key: &PolicyRef) -> Option<&Policy> {
        self.policies.get(key)
    }

    /// All policies in key order.
    pub fn iter(&self) -> impl Iterator<Item = &Policy> {
        self.policies.values()
    }

    /// All rules of all policies, in key order.
    pub fn rules(&self) -> impl Iterator<Item = (&Policy, &Rule)> {
        self.policies
            .values()
            .flat_map(|p| p.rules.iter().map(move |r| (p, r)))
    }

    /// Number of policies.
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    /// True if empty.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// Revision, incremented on every change.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Every CIDR prefix (allowed and excepted) referenced by any rule: each needs a
    /// `cidr:` local identity and an ipcache entry.
    pub fn cidr_prefixes(&self) -> BTreeSet<IpPrefix> {
        let mut out = BTreeSet::new();
        for (_, r) in self.rules() {
            for pr in all_peer_rules(r) {
                if let Peers::Cidrs(c) = &pr.peers {
                    for c in c {
                        out.insert(c.cidr);
                        out.extend(c.except.iter().copied());
                    }
                }
            }
        }
        out
    }

    /// Every toFQDNs selector (L3) in any rule: names the DNS proxy must map to `fqdn:`
    /// identities. (DNS L7 rules are per endpoint, see `EndpointPolicy::l7`.)
    pub fn fqdn_selectors(&self) -> BTreeSet<FqdnSelector> {
        let mut out = BTreeSet::new();
        for (_, r) in self.rules() {
            for pr in all_peer_rules(r) {
                if let Peers::Fqdns(f) = &pr.peers {
                    out.extend(f.iter().cloned());
                }
            }
        }
        out
    }

    /// True if any rule has L7 DNS rules (so a DNS proxy is needed).
    pub fn has_dns_rules(&self) -> bool {
        self.rules().any(|(_, r)| {
            all_peer_rules(r).any(|pr| {
                pr.to_ports
                    .iter()
                    .any(|p| matches!(p.rules, Some(L7Rules::Dns(_))))
            })
        })
    }
}

pub(crate) fn all_peer_rules(r: &Rule) -> impl Iterator<Item = &PeerRule> {
    r.ingress
        .iter()
        .chain(&r.ingress_deny)
        .chain(&r.egress)
        .chain(&r.egress_deny)
}
