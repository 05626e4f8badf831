//! Security identities: numeric ids for label sets, Cilium's reserved identities
//! (reference §2.1), the allocator interface and a deterministic in-memory allocator, and
//! [`IdentitySet`], the view of known identities that resolution runs against.
//!
//! Owns the numbering scheme (reserved 1–10, cluster ids from 256, local scope
//! `0x01000000 | n` for CIDR/FQDN label sets) and the label sets of CIDR and FQDN
//! identities. It does not talk to a kvstore or CRDs: a cluster-wide allocator is an
//! implementation of [`IdentityAllocator`] elsewhere.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;

use crate::cidr::IpPrefix;
use crate::error::IdentityError;
use crate::fqdn::FqdnSelector;
use crate::labels::{Label, LabelSource, Labels};

/// A numeric security identity (24 significant bits, plus the scope byte for local ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Identity(pub u32);

impl Identity {
    /// Unknown identity; in policy keys, "any remote identity".
    pub const ANY: Identity = Identity(0);
    /// `reserved:host`.
    pub const HOST: Identity = Identity(1);
    /// `reserved:world`.
    pub const WORLD: Identity = Identity(2);
    /// `reserved:unmanaged`.
    pub const UNMANAGED: Identity = Identity(3);
    /// `reserved:health`.
    pub const HEALTH: Identity = Identity(4);
    /// `reserved:init`.
    pub const INIT: Identity = Identity(5);
    /// `reserved:remote-node`.
    pub const REMOTE_NODE: Identity = Identity(6);
    /// `reserved:kube-apiserver`.
    pub const KUBE_APISERVER: Identity = Identity(7);
    /// `reserved:ingress`.
    pub const INGRESS: Identity = Identity(8);
    /// `reserved:world-ipv4`.
    pub const WORLD_IPV4: Identity = Identity(9);
    /// `reserved:world-ipv6`.
    pub const WORLD_IPV6: Identity = Identity(10);
    /// First cluster-scope identity.
    pub const FIRST_CLUSTER: u32 = 256;
    /// Last cluster-scope identity of cluster 0 with the default 255 clusters (shift 16).
    pub const LAST_CLUSTER: u32 = 65535;
    /// Scope bit of local identities (CIDR, FQDN, cidrgroup label sets).
    pub const LOCAL_SCOPE: u32 = 0x0100_0000;
    /// Last local identity.
    pub const LAST_LOCAL: u32 = 0x01FF_FFFF;

    /// The number.
    pub fn get(self) -> u32 {
        self.0
    }

    /// True for the reserved range 1..=255.
    pub fn is_reserved(self) -> bool {
        (1..Self::FIRST_CLUSTER).contains(&self.0)
    }

    /// True for local-scope identities.
    pub fn is_local(self) -> bool {
        self.0 & 0xFF00_0000 == Self::LOCAL_SCOPE
    }

    /// The reserved name (`host`, `world`, …) if this is a reserved identity.
    pub fn reserved_name(self) -> Option<&'static str> {
        RESERVED_IDENTITIES
            .iter()
            .find(|(id, _)| *id == self)
            .map(|(_, n)| *n)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Reserved identities and their `reserved:` label names (Cilium's numbers).
pub const RESERVED_IDENTITIES: &[(Identity, &str)] = &[
    (Identity::HOST, "host"),
    (Identity::WORLD, "world"),
    (Identity::UNMANAGED, "unmanaged"),
    (Identity::HEALTH, "health"),
    (Identity::INIT, "init"),
    (Identity::REMOTE_NODE, "remote-node"),
    (Identity::KUBE_APISERVER, "kube-apiserver"),
    (Identity::INGRESS, "ingress"),
    (Identity::WORLD_IPV4, "world-ipv4"),
    (Identity::WORLD_IPV6, "world-ipv6"),
];

/// The reserved identity for a label set that is exactly one `reserved:` label.
pub fn reserved_identity_for(labels: &Labels) -> Option<Identity> {
    if labels.len() != 1 {
        return None;
    }
    let l = labels.iter().next()?;
    if l.source != LabelSource::Reserved || !l.value.is_empty() {
        return None;
    }
    RESERVED_IDENTITIES
        .iter()
        .find(|(_, n)| *n == l.key)
        .map(|(id, _)| *id)
}

/// The labels of a reserved identity.
pub fn reserved_labels(id: Identity) -> Option<Labels> {
    id.reserved_name()
        .map(|n| [Label::reserved(n)].into_iter().collect())
}

/// Labels of the identity for a policy CIDR prefix: `cidr:<prefix>` + `reserved:world`.
pub fn cidr_identity_labels(prefix: IpPrefix) -> Labels {
    [Label::cidr(prefix), Label::reserved("world")]
        .into_iter()
        .collect()
}

/// Labels of the identity of IPs learned for a set of toFQDNs selectors (all selectors
/// whose pattern matches the name): `fqdn:<selector>` each + `reserved:world`.
pub fn fqdn_identity_labels<'a>(selectors: impl IntoIterator<Item = &'a FqdnSelector>) -> Labels {
    let mut l: Labels = selectors.into_iter().map(|s| s.identity_label()).collect();
    l.insert(Label::reserved("world"));
    l
}

/// Allocates numeric identities for label sets.
pub trait IdentityAllocator {
    /// Returns the identity of `labels`, allocating it if new (and taking a reference).
    /// Reserved label sets give the reserved ids; local-scope sets (see
    /// [`Labels::is_local_scope`]) get `0x01000000 | n`; others cluster ids from 256.
    fn allocate(&mut self, labels: &Labels) -> Result<Identity, IdentityError>;
    /// Drops a reference; returns true if the identity was freed.
    fn release(&mut self, id: Identity) -> bool;
    /// The identity of a label set, if allocated.
    fn lookup(&self, labels: &Labels) -> Option<Identity>;
    /// The labels of an identity, if allocated (or reserved).
    fn labels_of(&self, id: Identity) -> Option<Labels>;
}

#[derive(Debug, Clone)]
struct Slot {
    labels: Labels,
    refs: u64,
}

/// In-memory allocator: the same label set always maps to the same id while referenced;
/// ids are handed out lowest-free-first, so a given sequence of calls always yields the
/// same numbers (deterministic tests, single-node mode).
#[derive(Debug, Clone, Default)]
pub struct LocalAllocator {
    by_labels: BTreeMap<Labels, Identity>,
    by_id: BTreeMap<Identity, Slot>,
    free_cluster: BTreeSet<u32>,
    next_cluster: u32,
    free_local: BTreeSet<u32>,
    next_local: u32,
}

impl LocalAllocator {
    /// An empty allocator.
    pub fn new() -> LocalAllocator {
        LocalAllocator {
            next_cluster: Identity::FIRST_CLUSTER,
            next_local: Identity::LOCAL_SCOPE | 1,
            ..Default::default()
        }
    }

    /// All allocated (non-reserved) identities with their labels.
    pub fn iter(&self) -> impl Iterator<Item = (Identity, &Labels)> {
        self.by_id.iter().map(|(id, s)| (*id, &s.labels))
    }

    fn take(
        free: &mut BTreeSet<u32>,
        next: &mut u32,
        last: u32,
        scope: &'static str,
        first: u32,
    ) -> Result<u32, IdentityError> {
        if let Some(n) = free.pop_first() {
            return Ok(n);
        }
        if *next > last {
            return Err(IdentityError::Exhausted { scope, first, last });
        }
        let n = *next;
        *next += 1;
        Ok(n)
    }
}

impl IdentityAllocator for LocalAllocator {
    fn allocate(&mut self, labels: &Labels) -> Result<Identity, IdentityError> {
        if labels.is_empty() {
            return Err(IdentityError::EmptyLabels);
        }
        if let Some(id) = reserved_identity_for(labels) {
            return Ok(id);
        }
        if let Some(id) = self.by_labels.get(labels).copied() {
            if let Some(slot) = self.by_id.get_mut(&id) {
                slot.refs += 1;
            }
            return Ok(id);
        }
        let n = if labels.is_local_scope() {
            Self::take(
                &mut self.free_local,
                &mut self.next_local,
                Identity::LAST_LOCAL,
                "local",
                Identity::LOCAL_SCOPE | 1,
            )?
        } else {
            Self::take(
                &mut self.free_cluster,
                &mut self.next_cluster,
                Identity::LAST_CLUSTER,
                "cluster",
                Identity::FIRST_CLUSTER,
            )?
        };
        let id = Identity(n);
        self.by_labels.insert(labels.clone(), id);
        self.by_id.insert(
            id,
            Slot {
                labels: labels.clone(),
                refs: 1,
            },
        );
        Ok(id)
    }

    fn release(&mut self, id: Identity) -> bool {
        let Some(slot) = self.by_id.get_mut(&id) else {
            return false;
        };
        slot.refs = slot.refs.saturating_sub(1);
        if slot.refs > 0 {
            return false;
        }
        if let Some(slot) = self.by_id.remove(&id) {
            self.by_labels.remove(&slot.labels);
        }
        if id.is_local() {
            self.free_local.insert(id.0);
        } else {
            self.free_cluster.insert(id.0);
        }
        true
    }

    fn lookup(&self, labels: &Labels) -> Option<Identity> {
        reserved_identity_for(labels).or_else(|| self.by_labels.get(labels).copied())
    }

    fn labels_of(&self, id: Identity) -> Option<Labels> {
        reserved_labels(id).or_else(|| self.by_id.get(&id).map(|s| s.labels.clone()))
    }
}

/// The identities known to resolution (id → labels), with a reverse index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentitySet {
    by_id: BTreeMap<Identity, Labels>,
    by_labels: BTreeMap<Labels, Identity>,
}

impl IdentitySet {
    /// An empty set (not even reserved identities).
    pub fn new() -> IdentitySet {
        IdentitySet::default()
    }

    /// A set holding the reserved identities 1–10.
    pub fn with_reserved() -> IdentitySet {
        let mut s = IdentitySet::new();
        for (id, _) in RESERVED_IDENTITIES {
            if let Some(l) = reserved_labels(*id) {
                s.insert(*id, l);
            }
        }
        s
    }

    /// Adds or replaces an identity. Returns the previous labels.
    pub fn insert(&mut self, id: Identity, labels: Labels) -> Option<Labels> {
        let old = self.by_id.insert(id, labels.clone());
        if let Some(o) = &old {
            self.by_labels.remove(o);
        }
        self.by_labels.insert(labels, id);
        old
    }

    /// Removes an identity.
    pub fn remove(&mut self, id: Identity) -> Option<Labels> {
        let old = self.by_id.remove(&id);
        if let Some(o) = &old {
            self.by_labels.remove(o);
        }
        old
    }

    /// Labels of an identity.
    pub fn get(&self, id: Identity) -> Option<&Labels> {
        self.by_id.get(&id)
    }

    /// Identity of a label set.
    pub fn lookup(&self, labels: &Labels) -> Option<Identity> {
        self.by_labels.get(labels).copied()
    }

    /// All identities in id order.
    pub fn iter(&self) -> impl Iterator<Item = (Identity, &Labels)> {
        self.by_id.iter().map(|(i, l)| (*i, l))
    }

    /// Number of identities.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// True if empty.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Allocates (via `alloc`) and inserts the identities of the given CIDR prefixes
    /// (see [`crate::Repository::cidr_prefixes`]); returns prefix → identity, which is also
    /// what the ipcache must contain.
    pub fn ensure_cidr_identities(
        &mut self,
        prefixes: impl IntoIterator<Item = IpPrefix>,
        alloc: &mut dyn IdentityAllocator,
    ) -> Result<BTreeMap<IpPrefix, Identity>, IdentityError> {
        let mut out = BTreeMap::new();
        for p in prefixes {
            let labels = cidr_identity_labels(p);
            let id = match self.lookup(&labels) {
                Some(id) => id,
                None => {
                    let id = alloc.allocate(&labels)?;
                    self.insert(id, labels);
                    id
                }
            };
            out.insert(p, id);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(items: &[&str]) -> Labels {
        Labels::parse(items.iter().copied()).unwrap()
    }

    #[test]
    fn reserved_numbers() {
        let want = [
            ("host", 1),
            ("world", 2),
            ("unmanaged", 3),
            ("health", 4),
            ("init", 5),
            ("remote-node", 6),
            ("kube-apiserver", 7),
            ("ingress", 8),
            ("world-ipv4", 9),
            ("world-ipv6", 10),
        ];
        let mut a = LocalAllocator::new();
        for (name, n) in want {
            let labels = l(&[&format!("reserved:{name}")]);
            assert_eq!(reserved_identity_for(&labels), Some(Identity(n)), "{name}");
            assert_eq!(a.allocate(&labels).unwrap(), Identity(n));
            assert_eq!(Identity(n).reserved_name(), Some(name));
        }
    }

    #[test]
    fn deterministic_allocation() {
        let mut a = LocalAllocator::new();
        let web = l(&["k8s:app=web", "k8s:io.kubernetes.pod.namespace=default"]);
        let db = l(&["k8s:app=db"]);
        let c = cidr_identity_labels("10.0.0.0/8".parse().unwrap());
        let f = fqdn_identity_labels([&FqdnSelector::name("cilium.io").unwrap()]);
        assert_eq!(a.allocate(&web).unwrap(), Identity(256));
        assert_eq!(a.allocate(&db).unwrap(), Identity(257));
        assert_eq!(a.allocate(&web).unwrap(), Identity(256));
        assert_eq!(a.allocate(&c).unwrap(), Identity(0x0100_0001));
        assert_eq!(a.allocate(&f).unwrap(), Identity(0x0100_0002));
        assert!(Identity(0x0100_0001).is_local());
        assert_eq!(a.lookup(&db), Some(Identity(257)));
        assert_eq!(a.labels_of(Identity(257)), Some(db.clone()));
        // web has two references
        assert!(!a.release(Identity(256)));
        assert!(a.release(Identity(256)));
        assert_eq!(a.lookup(&web), None);
        // freed ids are reused lowest-first
        assert_eq!(a.allocate(&l(&["k8s:app=x"])).unwrap(), Identity(256));
        assert_eq!(a.allocate(&Labels::new()), Err(IdentityError::EmptyLabels));
    }

    #[test]
    fn exhaustion() {
        let mut a = LocalAllocator::new();
        a.next_cluster = Identity::LAST_CLUSTER;
        assert!(a.allocate(&l(&["k8s:a=1"])).is_ok());
        let e = a.allocate(&l(&["k8s:a=2"])).unwrap_err();
        assert!(e.to_string().contains("no free cluster identity"));
    }

    #[test]
    fn identity_set_cidr() {
        let mut set = IdentitySet::with_reserved();
        let mut a = LocalAllocator::new();
        let p: IpPrefix = "192.0.2.0/24".parse().unwrap();
        let m = set.ensure_cidr_identities([p], &mut a).unwrap();
        assert_eq!(m[&p], Identity(0x0100_0001));
        assert_eq!(
            set.lookup(&cidr_identity_labels(p)),
            Some(Identity(0x0100_0001))
        );
        // idempotent
        let m2 = set.ensure_cidr_identities([p], &mut a).unwrap();
        assert_eq!(m, m2);
    }
}
