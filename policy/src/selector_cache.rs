//! The selector cache: every distinct peer selector in use by the [`crate::Resolver`]'s
//! endpoints, with the identities it selects, maintained incrementally (Cilium's
//! `SelectorCache`).
//!
//! Owns the selector × identity matching of incremental resolution: a selector is matched
//! against every identity once, when the first endpoint starts using it, and afterwards
//! only against identities that appear or change. That turns a policy change from
//! "re-match every selector against every identity" into lookups (see
//! `Resolver::policy_changed`). Selectors are reference-counted by the endpoints'
//! compiled policies and dropped with their last user.
//!
//! Invariant (checked by the resolver's property test against full resolution): for every
//! live slot, `matches` is exactly the set of identities in the resolver's
//! [`IdentitySet`] (other than [`Identity::ANY`], which is never a peer) whose labels the
//! selector matches, and `by_identity` is its inverse. The cache holds no identity labels
//! of its own: callers must report every identity change with the labels now in the set.
//! No I/O.

use std::collections::{BTreeSet, HashMap};

use crate::identity::{Identity, IdentitySet};
use crate::labels::Labels;
use crate::selector::EndpointSelector;

/// Index of a cached selector; stable while the selector has users (slots are reused
/// after the last user releases it).
pub(crate) type SlotId = usize;

#[derive(Debug)]
struct Slot {
    selector: EndpointSelector,
    /// Endpoints' compiled policies using the selector.
    users: usize,
    /// Identities the selector matches.
    matches: BTreeSet<Identity>,
}

/// Selector → matching identities, and identity → matching selectors.
#[derive(Debug, Default)]
pub(crate) struct SelectorCache {
    slots: Vec<Option<Slot>>,
    free: Vec<SlotId>,
    index: HashMap<EndpointSelector, SlotId>,
    /// Live slots matching each identity, sorted; identities matching no slot are absent.
    by_identity: HashMap<Identity, Vec<SlotId>>,
}

impl SelectorCache {
    /// Takes a reference on `selector`, matching it against `identities` if it is new.
    pub(crate) fn acquire(
        &mut self,
        selector: &EndpointSelector,
        identities: &IdentitySet,
    ) -> SlotId {
        if let Some(&id) = self.index.get(selector) {
            if let Some(slot) = self.slots[id].as_mut() {
                slot.users += 1;
            }
            return id;
        }
        let matches: BTreeSet<Identity> = identities
            .iter()
            .filter(|(id, labels)| *id != Identity::ANY && selector.matches(labels))
            .map(|(id, _)| id)
            .collect();
        let slot_id = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        for id in &matches {
            let v = self.by_identity.entry(*id).or_default();
            if let Err(pos) = v.binary_search(&slot_id) {
                v.insert(pos, slot_id);
            }
        }
        self.slots[slot_id] = Some(Slot {
            selector: selector.clone(),
            users: 1,
            matches,
        });
        self.index.insert(selector.clone(), slot_id);
        slot_id
    }

    /// Drops a reference taken by [`Self::acquire`]; the last one frees the slot.
    pub(crate) fn release(&mut self, slot_id: SlotId) {
        let Some(slot) = self.slots.get_mut(slot_id).and_then(Option::as_mut) else {
            return;
        };
        slot.users -= 1;
        if slot.users > 0 {
            return;
        }
        let Some(slot) = self.slots[slot_id].take() else {
            return;
        };
        for id in &slot.matches {
            if let Some(v) = self.by_identity.get_mut(id) {
                if let Ok(pos) = v.binary_search(&slot_id) {
                    v.remove(pos);
                }
                if v.is_empty() {
                    self.by_identity.remove(id);
                }
            }
        }
        self.index.remove(&slot.selector);
        self.free.push(slot_id);
    }

    /// Identities a live slot matches.
    pub(crate) fn matches(&self, slot_id: SlotId) -> &BTreeSet<Identity> {
        static EMPTY: BTreeSet<Identity> = BTreeSet::new();
        self.slots
            .get(slot_id)
            .and_then(Option::as_ref)
            .map_or(&EMPTY, |s| &s.matches)
    }

    /// Live slots matching an identity, sorted.
    pub(crate) fn selecting(&self, id: Identity) -> &[SlotId] {
        self.by_identity.get(&id).map_or(&[], Vec::as_slice)
    }

    /// An identity appeared or its labels changed to `labels`: re-matches it against every
    /// live selector. O(live selectors).
    pub(crate) fn upsert_identity(&mut self, id: Identity, labels: &Labels) {
        if id == Identity::ANY {
            return;
        }
        let old = self.by_identity.remove(&id).unwrap_or_default();
        let mut new = Vec::new();
        for (slot_id, slot) in self.slots.iter_mut().enumerate() {
            let Some(slot) = slot else { continue };
            if slot.selector.matches(labels) {
                new.push(slot_id);
                slot.matches.insert(id);
            } else if old.binary_search(&slot_id).is_ok() {
                slot.matches.remove(&id);
            }
        }
        if !new.is_empty() {
            self.by_identity.insert(id, new);
        }
    }

    /// An identity disappeared.
    pub(crate) fn remove_identity(&mut self, id: Identity) {
        for slot_id in self.by_identity.remove(&id).unwrap_or_default() {
            if let Some(slot) = self.slots[slot_id].as_mut() {
                slot.matches.remove(&id);
            }
        }
    }
}

#[cfg(test)]
impl SelectorCache {
    /// Checks the module invariant against `identities` and that each slot's reference
    /// count is `users(slot)` (the references the resolver's endpoints hold).
    pub(crate) fn check(
        &self,
        identities: &IdentitySet,
        users: impl Fn(SlotId) -> usize,
    ) -> Result<(), String> {
        let mut live = 0;
        for (slot_id, slot) in self.slots.iter().enumerate() {
            let Some(slot) = slot else {
                if !self.free.contains(&slot_id) {
                    return Err(format!("empty slot {slot_id} is not free"));
                }
                continue;
            };
            live += 1;
            if self.index.get(&slot.selector) != Some(&slot_id) {
                return Err(format!("slot {slot_id} ({}) is not indexed", slot.selector));
            }
            if slot.users != users(slot_id) {
                return Err(format!(
                    "slot {slot_id} ({}) has {} users, endpoints hold {}",
                    slot.selector,
                    slot.users,
                    users(slot_id)
                ));
            }
            let want: BTreeSet<Identity> = identities
                .iter()
                .filter(|(i, l)| *i != Identity::ANY && slot.selector.matches(l))
                .map(|(i, _)| i)
                .collect();
            if slot.matches != want {
                return Err(format!(
                    "slot {slot_id} ({}) matches {:?}, want {want:?}",
                    slot.selector, slot.matches
                ));
            }
            for i in &want {
                if !self.selecting(*i).contains(&slot_id) {
                    return Err(format!("{i} lacks slot {slot_id} in by_identity"));
                }
            }
        }
        if self.index.len() != live {
            return Err(format!(
                "{} indexed selectors, {live} live slots",
                self.index.len()
            ));
        }
        for (i, v) in &self.by_identity {
            if v.is_empty() || !v.is_sorted() {
                return Err(format!("by_identity[{i}] = {v:?}"));
            }
            if let Some(s) = v.iter().find(|s| !self.matches(**s).contains(i)) {
                return Err(format!(
                    "by_identity[{i}] has slot {s} that does not match it"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(items: &[&str]) -> Labels {
        Labels::parse(items.iter().copied()).unwrap()
    }

    fn sel(k: &str, v: &str) -> EndpointSelector {
        EndpointSelector::from_parts([(k, v)], []).unwrap()
    }

    #[test]
    fn acquire_release_and_identity_changes() {
        let mut ids = IdentitySet::with_reserved();
        ids.insert(Identity(256), l(&["k8s:app=a"]));
        ids.insert(Identity(257), l(&["k8s:app=b"]));
        let mut c = SelectorCache::default();
        let a = c.acquire(&sel("app", "a"), &ids);
        let b = c.acquire(&sel("app", "b"), &ids);
        let a2 = c.acquire(&sel("k8s:app", "a"), &ids);
        assert_eq!(c.acquire(&sel("app", "a"), &ids), a);
        assert_eq!(c.matches(a), &BTreeSet::from([Identity(256)]));
        assert_eq!(c.selecting(Identity(256)), &[a, a2]);
        c.check(&ids, |s| c.slots[s].as_ref().map_or(0, |s| s.users))
            .unwrap();

        // relabel 256 from a to b, add 258 as a, remove 257
        ids.insert(Identity(256), l(&["k8s:app=b"]));
        c.upsert_identity(Identity(256), &l(&["k8s:app=b"]));
        ids.insert(Identity(258), l(&["k8s:app=a"]));
        c.upsert_identity(Identity(258), &l(&["k8s:app=a"]));
        ids.remove(Identity(257));
        c.remove_identity(Identity(257));
        assert_eq!(c.matches(b), &BTreeSet::from([Identity(256)]));
        c.check(&ids, |s| c.slots[s].as_ref().map_or(0, |s| s.users))
            .unwrap();

        // a has two users: one release keeps it
        c.release(a);
        assert_eq!(c.matches(a), &BTreeSet::from([Identity(258)]));
        c.release(a);
        assert!(c.matches(a).is_empty());
        assert_eq!(c.selecting(Identity(258)), &[a2]);
        c.check(&ids, |s| c.slots[s].as_ref().map_or(0, |s| s.users))
            .unwrap();
        // the freed slot is reused, matched from scratch
        let w = c.acquire(&EndpointSelector::reserved("world"), &ids);
        assert_eq!(w, a);
        assert_eq!(c.matches(w), &BTreeSet::from([Identity::WORLD]));
        c.check(&ids, |s| c.slots[s].as_ref().map_or(0, |s| s.users))
            .unwrap();
    }
}
