//! FQDN plumbing in the agent (DESIGN §4, cilium-semantics.md §1.10, §3.5).
//!
//! The DNS proxy reports every allowed answer (`FqdnLearn` on the API: a name, its
//! addresses with TTLs, the asking endpoint) and releases the answer only when the agent
//! replies. The agent records name → address → expiry, gives each address the identity
//! labelled with every toFQDNs selector that matches one of its names
//! (`fqdn:<selector>` + `reserved:world`), and writes it to the ipcache before replying:
//! - the identity already exists (another address of the same selectors was learned
//!   before): one ipcache write — the policy entries for it are already in the maps;
//! - the identity is new: it is allocated and a reconcile writes its policy entries and
//!   the ipcache entry.
//!
//! Addresses of names no toFQDNs selector matches get no identity (they stay `world`).
//! Expiry: an address leaves a name after its TTL unless the conntrack table still holds a
//! live connection to it, in which case it waits for the next pass; an address without
//! names leaves the ipcache, an identity without addresses is released. The cache is saved
//! to `fqdn-cache.json` in the agent's state directory, so a restarted agent keeps the
//! entries the datapath is enforcing.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use membrane_datapath::Ipv4Prefix;
use membrane_policy::{
    FqdnSelector, Identity, IdentityAllocator as _, Labels, fqdn::FqdnMatcher, fqdn_identity_labels,
};
use serde::{Deserialize, Serialize};

use membrane_agent_api::{
    LearnedAddress, RunDir,
    api::{FqdnCacheRow, FqdnLearned, FqdnStatus, LearnedIdentity},
    run_dir::write_atomically,
};

use crate::{
    daemon::State,
    error::{AgentError, dp_err, io_err},
};

/// Floor of a learned TTL: an address is kept at least this long (Cilium's
/// `tofqdns-min-ttl` default for the cache is 0; a zero TTL would expire an address before
/// the client connects).
pub const MIN_TTL_SECS: u64 = 1;

/// name → address → expiry (seconds since the epoch).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FqdnCache {
    names: BTreeMap<String, BTreeMap<Ipv4Addr, u64>>,
    /// address → names: the reverse of `names`, so a learn looks an address up instead of
    /// scanning every name (rebuilt on load).
    #[serde(skip)]
    by_ip: BTreeMap<Ipv4Addr, BTreeSet<String>>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Lower-case, with the trailing dot (the DNS proxy's form).
pub fn normalize(name: &str) -> String {
    let mut n = name.trim().to_ascii_lowercase();
    if !n.ends_with('.') {
        n.push('.');
    }
    n
}

impl FqdnCache {
    /// Reads the saved cache; a missing file is an empty cache, an unreadable one is
    /// reported and replaced (the datapath entries it named are removed by the next
    /// reconcile, which only narrows what is allowed).
    pub fn load(path: &Path) -> Self {
        let mut cache: Self = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::error!(file = %path.display(), error = %e, "FQDN cache unreadable; starting empty");
                Self::default()
            }),
            Err(_) => Self::default(),
        };
        for (name, ips) in &cache.names {
            for ip in ips.keys() {
                cache.by_ip.entry(*ip).or_default().insert(name.clone());
            }
        }
        cache
    }

    pub fn save(&self, path: &Path) -> Result<(), AgentError> {
        let bytes = serde_json::to_vec(self).map_err(|source| AgentError::Encode {
            what: "the FQDN cache",
            source,
        })?;
        write_atomically(path, &bytes).map_err(io_err(format!("write {}", path.display())))
    }

    /// Records `name` → `ips`; an address already known keeps the later expiry. IPv6
    /// addresses are ignored (the datapath is IPv4). Returns the IPv4 addresses.
    pub fn learn(&mut self, name: &str, ips: &[LearnedAddress], now: u64) -> Vec<Ipv4Addr> {
        let name = normalize(name);
        let entry = self.names.entry(name.clone()).or_default();
        let mut out = Vec::new();
        for a in ips {
            let IpAddr::V4(ip) = a.ip else { continue };
            let expires = now + u64::from(a.ttl).max(MIN_TTL_SECS);
            let e = entry.entry(ip).or_insert(expires);
            *e = (*e).max(expires);
            self.by_ip.entry(ip).or_default().insert(name.clone());
            out.push(ip);
        }
        if entry.is_empty() {
            self.names.remove(&name);
        }
        out
    }

    /// The names of every address.
    pub fn names_by_ip(&self) -> BTreeMap<Ipv4Addr, BTreeSet<&str>> {
        self.by_ip
            .iter()
            .map(|(ip, names)| (*ip, names.iter().map(String::as_str).collect()))
            .collect()
    }

    /// The names of one address.
    pub fn names_of(&self, ip: Ipv4Addr) -> BTreeSet<&str> {
        self.by_ip
            .get(&ip)
            .map(|names| names.iter().map(String::as_str).collect())
            .unwrap_or_default()
    }

    /// (name, address) pairs past their expiry.
    pub fn expired(&self, now: u64) -> Vec<(String, Ipv4Addr)> {
        self.names
            .iter()
            .flat_map(|(n, ips)| {
                ips.iter()
                    .filter(move |(_, e)| **e <= now)
                    .map(move |(ip, _)| (n.clone(), *ip))
            })
            .collect()
    }

    pub fn remove(&mut self, name: &str, ip: Ipv4Addr) {
        if let Some(ips) = self.names.get_mut(name) {
            ips.remove(&ip);
            if ips.is_empty() {
                self.names.remove(name);
            }
        }
        if let Some(names) = self.by_ip.get_mut(&ip) {
            names.remove(name);
            if names.is_empty() {
                self.by_ip.remove(&ip);
            }
        }
    }

    /// (name, address, expiry) rows.
    pub fn rows(&self) -> impl Iterator<Item = (&str, Ipv4Addr, u64)> {
        self.names
            .iter()
            .flat_map(|(n, ips)| ips.iter().map(move |(ip, e)| (n.as_str(), *ip, *e)))
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn len(&self) -> usize {
        self.names.values().map(BTreeMap::len).sum()
    }
}

/// The agent's FQDN state.
#[derive(Default)]
pub struct FqdnState {
    pub cache: FqdnCache,
    /// Address → identity, as written to the ipcache.
    pub ips: BTreeMap<Ipv4Addr, Identity>,
    /// Identities the agent allocated for FQDN addresses (one allocator reference each).
    pub identities: BTreeMap<Identity, Labels>,
    /// The toFQDNs selectors of the policies, compiled (rebuilt when they change).
    matchers: Vec<(FqdnSelector, FqdnMatcher)>,
    pub dirty: bool,
    pub learns: u64,
    pub fast_path: u64,
    /// Plumbing latency (request received → maps written), microseconds, last 1024.
    pub latencies_us: std::collections::VecDeque<u64>,
}

impl FqdnState {
    pub fn load(run: &RunDir) -> Self {
        Self {
            cache: FqdnCache::load(&run.fqdn_cache()),
            ..Self::default()
        }
    }

    /// Recompiles the selectors when the policies' set changed.
    fn set_selectors(&mut self, selectors: BTreeSet<FqdnSelector>) {
        if self.matchers.len() == selectors.len()
            && self.matchers.iter().map(|(s, _)| s).eq(selectors.iter())
        {
            return;
        }
        self.matchers = selectors
            .into_iter()
            .filter_map(|s| match s.compile() {
                Ok(m) => Some((s, m)),
                Err(e) => {
                    tracing::error!(selector = %s.text(), error = %e, "toFQDNs selector does not compile; it matches nothing");
                    None
                }
            })
            .collect();
    }

    /// The identity labels for an address with these names; `None` when no selector
    /// matches any of them.
    fn labels_for<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Option<Labels> {
        let names: Vec<&str> = names.into_iter().collect();
        let matching: Vec<&FqdnSelector> = self
            .matchers
            .iter()
            .filter(|(_, m)| names.iter().any(|n| m.matches(n)))
            .map(|(s, _)| s)
            .collect();
        (!matching.is_empty()).then(|| fqdn_identity_labels(matching))
    }
}

impl State {
    /// Makes `fqdn.ips` and `fqdn.identities` match the cache and the policies' toFQDNs
    /// selectors: allocates identities that are needed (inserting them into the identity
    /// set, so the following resolve writes their policy entries) and releases the unused.
    /// Part of every reconcile.
    pub(crate) fn refresh_fqdn(&mut self) -> Result<(), AgentError> {
        self.fqdn.set_selectors(self.repo.fqdn_selectors());
        let mut ips = BTreeMap::new();
        let mut used: BTreeMap<Identity, Labels> = BTreeMap::new();
        let wanted: Vec<(Ipv4Addr, Labels)> = self
            .fqdn
            .cache
            .names_by_ip()
            .into_iter()
            .filter_map(|(ip, names)| self.fqdn.labels_for(names).map(|l| (ip, l)))
            .collect();
        for (ip, labels) in wanted {
            let id = self.fqdn_identity(&labels)?;
            ips.insert(ip, id);
            used.insert(id, labels);
        }
        let stale: Vec<Identity> = self
            .fqdn
            .identities
            .keys()
            .filter(|id| !used.contains_key(id))
            .copied()
            .collect();
        for id in stale {
            self.fqdn.identities.remove(&id);
            self.allocator.release(id);
            self.identities.remove(id);
        }
        self.fqdn.ips = ips;
        Ok(())
    }

    /// The identity of an FQDN label set, allocated (and added to the identity set) if new.
    fn fqdn_identity(&mut self, labels: &Labels) -> Result<Identity, AgentError> {
        if let Some(id) = self.identities.lookup(labels) {
            if !self.fqdn.identities.contains_key(&id) {
                // Allocated by someone else (never for fqdn labels today): take our ref.
                self.allocator
                    .allocate(labels)
                    .map_err(AgentError::Identity)?;
                self.fqdn.identities.insert(id, labels.clone());
            }
            return Ok(id);
        }
        let id = self
            .allocator
            .allocate(labels)
            .map_err(AgentError::Identity)?;
        self.identities.insert(id, labels.clone());
        self.fqdn.identities.insert(id, labels.clone());
        Ok(id)
    }

    /// The DNS proxy learned `name` → `ips`: make the addresses' identities visible in the
    /// maps, then return (the proxy releases the answer).
    pub(crate) fn fqdn_learn(
        &mut self,
        name: &str,
        ips: &[LearnedAddress],
    ) -> Result<FqdnLearned, AgentError> {
        let started = Instant::now();
        let learned = self.fqdn.cache.learn(name, ips, unix_now());
        self.fqdn.dirty = true;
        self.fqdn.learns += 1;
        // The compiled selectors are current: every policy change reconciles, which refreshes
        // them (`refresh_fqdn`), so the hot path does not walk the policy repository.
        // Fast path: every address's identity exists already (its policy entries are in
        // the maps): write the ipcache entries and nothing else.
        let mut writes = Vec::new();
        let mut slow = false;
        for ip in &learned {
            let names = self.fqdn.cache.names_of(*ip);
            let Some(labels) = self.fqdn.labels_for(names) else {
                continue;
            };
            match self.identities.lookup(&labels) {
                Some(id) if self.fqdn.identities.contains_key(&id) => {
                    if self.fqdn.ips.get(ip) != Some(&id) {
                        writes.push((*ip, id));
                    }
                }
                _ => slow = true,
            }
        }
        if slow {
            self.reconcile()?;
        } else {
            self.fqdn.fast_path += 1;
            for (ip, id) in writes {
                self.datapath
                    .ipcache()
                    .upsert(Ipv4Prefix::host(ip), id.0)
                    .map_err(dp_err("write ipcache entry"))?;
                self.fqdn.ips.insert(ip, id);
            }
        }
        for ip in &learned {
            let names = self.fqdn.cache.names_of(*ip);
            self.enricher.insert_dns_names(
                IpAddr::V4(*ip),
                names.into_iter().map(str::to_owned).collect(),
            );
        }
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        if self.fqdn.latencies_us.len() >= 1024 {
            self.fqdn.latencies_us.pop_front();
        }
        self.fqdn.latencies_us.push_back(micros);
        Ok(FqdnLearned {
            name: normalize(name),
            ips: learned
                .iter()
                .map(|ip| LearnedIdentity {
                    ip: ip.to_string(),
                    identity: self.fqdn.ips.get(ip).map(|i| i.0),
                })
                .collect(),
            plumbing_us: micros,
        })
    }

    /// Removes expired addresses that no live connection uses; reconciles if anything
    /// left. Returns how many (name, address) pairs were removed.
    pub(crate) fn fqdn_expire(&mut self) -> Result<usize, AgentError> {
        let expired = self.fqdn.cache.expired(unix_now());
        if expired.is_empty() {
            return Ok(0);
        }
        // Addresses a live connection still uses (Cilium keeps them while conntrack does).
        let live: BTreeSet<Ipv4Addr> = self
            .datapath
            .conntrack()
            .list()
            .map_err(dp_err("list conntrack"))?
            .into_iter()
            .filter(|c| !c.closing && c.idle_secs < CT_LIVE_SECS)
            .flat_map(|c| [c.src, c.dst])
            .collect();
        let mut removed = 0;
        for (name, ip) in expired {
            if !live.contains(&ip) {
                self.fqdn.cache.remove(&name, ip);
                removed += 1;
            }
        }
        if removed > 0 {
            self.fqdn.dirty = true;
            self.reconcile()?;
        }
        Ok(removed)
    }

    /// `membrane fqdn cache list`.
    pub(crate) fn fqdn_rows(&self) -> Vec<FqdnCacheRow> {
        let now = unix_now();
        self.fqdn
            .cache
            .rows()
            .map(|(name, ip, expires)| FqdnCacheRow {
                name: name.to_owned(),
                ip: ip.to_string(),
                ttl_remaining: expires.saturating_sub(now),
                identity: self.fqdn.ips.get(&ip).map(|i| i.0),
                labels: self
                    .fqdn
                    .ips
                    .get(&ip)
                    .and_then(|i| self.fqdn.identities.get(i))
                    .map(|l| l.iter().map(|l| l.to_string()).collect()),
            })
            .collect()
    }

    /// Counters for `membrane status`.
    pub(crate) fn fqdn_status(&self) -> FqdnStatus {
        let mut sorted: Vec<u64> = self.fqdn.latencies_us.iter().copied().collect();
        sorted.sort_unstable();
        let pct = |p: usize| {
            (!sorted.is_empty()).then(|| sorted[(sorted.len() * p / 100).min(sorted.len() - 1)])
        };
        FqdnStatus {
            entries: self.fqdn.cache.len(),
            addresses: self.fqdn.ips.len(),
            identities: self.fqdn.identities.len(),
            learns: self.fqdn.learns,
            fast_path: self.fqdn.fast_path,
            plumbing_us_p50: pct(50),
            plumbing_us_p99: pct(99),
        }
    }

    /// Saves the cache if it changed.
    pub(crate) fn fqdn_save(&mut self) {
        if !self.fqdn.dirty {
            return;
        }
        match self.fqdn.cache.save(&self.config.run_dir().fqdn_cache()) {
            Ok(()) => self.fqdn.dirty = false,
            Err(e) => tracing::warn!(error = %e, "FQDN cache not saved"),
        }
    }
}

/// A conntrack entry idle for longer than this no longer keeps an address alive.
const CT_LIVE_SECS: u64 = 60;

/// How often expiry runs.
pub const EXPIRY_INTERVAL: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    fn a(ip: [u8; 4], ttl: u32) -> LearnedAddress {
        LearnedAddress {
            ip: IpAddr::V4(Ipv4Addr::from(ip)),
            ttl,
        }
    }

    #[test]
    fn learn_keeps_the_later_expiry_and_ignores_ipv6() {
        let mut c = FqdnCache::default();
        let six = LearnedAddress {
            ip: "2001:db8::1".parse().unwrap(),
            ttl: 30,
        };
        let got = c.learn("API.github.com", &[a([192, 0, 2, 10], 30), six], 100);
        assert_eq!(got, vec![Ipv4Addr::new(192, 0, 2, 10)]);
        c.learn("api.github.com.", &[a([192, 0, 2, 10], 5)], 110);
        let rows: Vec<_> = c.rows().collect();
        assert_eq!(
            rows,
            vec![("api.github.com.", Ipv4Addr::new(192, 0, 2, 10), 130)]
        );
        // TTL 0 still lives for the floor.
        c.learn("zero.example.", &[a([192, 0, 2, 11], 0)], 200);
        let expired = |t| -> Vec<String> { c.expired(t).into_iter().map(|(n, _)| n).collect() };
        assert_eq!(expired(200), vec!["api.github.com.".to_owned()]);
        assert_eq!(expired(201).len(), 2);
    }

    #[test]
    fn an_address_of_two_names_has_both() {
        let mut c = FqdnCache::default();
        c.learn("a.example.", &[a([192, 0, 2, 1], 30)], 0);
        c.learn("b.example.", &[a([192, 0, 2, 1], 60)], 0);
        let names = c.names_of(Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            vec!["a.example.", "b.example."]
        );
        c.remove("a.example.", Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!(c.len(), 1);
        c.remove("b.example.", Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!(c.len(), 0);
        assert!(c.names_by_ip().is_empty());
    }

    #[test]
    fn saved_and_loaded() {
        let dir = std::env::temp_dir().join(format!("mb-fqdn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut c = FqdnCache::default();
        c.learn("a.example.", &[a([192, 0, 2, 1], 30)], 0);
        c.save(&RunDir::at(&dir).fqdn_cache()).unwrap();
        let loaded = FqdnCache::load(&RunDir::at(&dir).fqdn_cache());
        assert_eq!(loaded, c);
        assert_eq!(
            loaded
                .names_of(Ipv4Addr::new(192, 0, 2, 1))
                .into_iter()
                .collect::<Vec<_>>(),
            vec!["a.example."]
        );
        std::fs::write(RunDir::at(&dir).fqdn_cache(), b"not json").unwrap();
        assert_eq!(
            FqdnCache::load(&RunDir::at(&dir).fqdn_cache()),
            FqdnCache::default()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn labels_name_every_matching_selector() {
        let mut s = FqdnState::default();
        s.set_selectors(
            [
                FqdnSelector::name("api.github.com").unwrap(),
                FqdnSelector::pattern("*.github.com").unwrap(),
                FqdnSelector::name("api.slack.com").unwrap(),
            ]
            .into(),
        );
        let l = s.labels_for(["api.github.com."]).unwrap();
        let text: Vec<String> = l.iter().map(|l| l.to_string()).collect();
        assert!(
            text.iter().any(|t| t.contains("api.github.com")),
            "{text:?}"
        );
        assert!(text.iter().any(|t| t.contains("*.github.com")), "{text:?}");
        assert!(!text.iter().any(|t| t.contains("slack")), "{text:?}");
        assert!(text.iter().any(|t| t == "reserved:world"), "{text:?}");
        assert!(s.labels_for(["example.com."]).is_none());
        // uploads.github.com: only the pattern.
        let l = s.labels_for(["uploads.github.com."]).unwrap();
        assert_eq!(l.iter().count(), 2);
    }
}
