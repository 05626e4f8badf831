//! An in-memory FQDN cache: name → addresses with expiry, fed as an [`FqdnObserver`].
//!
//! Owns the node-wide view of what DNS taught (Cilium's global `DNSCache`, §3.5 "Caches"):
//! a lookup by any client adds to it, an address lives until its TTL runs out, a name
//! keeps at most `max_ips_per_name` addresses (those expiring first make room), and the
//! whole cache survives restarts as a JSON snapshot ([`FqdnCache::save`] /
//! [`FqdnCache::load`]), so a restarted proxy or agent does not forget the addresses that
//! established connections still use. Expiry uses wall-clock time (`SystemTime`) because
//! the snapshot must mean the same thing after a restart.
//!
//! Not here: zombie tracking (expired IPs kept while conntrack still sees connections) —
//! the agent owns conntrack and decides when to [`FqdnCache::expire`].

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::learn::{FqdnLearning, FqdnObserver, FqdnObserverError};

/// Version of the snapshot format written by [`FqdnCache::save`].
pub const SNAPSHOT_VERSION: u32 = 1;

/// One cached address of a name, as `membrane fqdn cache list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FqdnCacheEntry {
    /// Lower-case, fully qualified.
    pub name: String,
    pub ip: IpAddr,
    /// Expiry in seconds since the Unix epoch.
    pub expires_unix: u64,
}

impl FqdnCacheEntry {
    pub fn expires_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.expires_unix)
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Snapshot {
    version: u32,
    entries: Vec<FqdnCacheEntry>,
}

/// Why a snapshot could not be written or read; names the file.
#[derive(Debug, thiserror::Error)]
pub enum FqdnCacheError {
    #[error("FQDN cache snapshot {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("FQDN cache snapshot {path}: not valid JSON of the expected shape: {source}")]
    Format {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "FQDN cache snapshot {path}: format version {found}, this build reads version {SNAPSHOT_VERSION}"
    )]
    Version { path: PathBuf, found: u32 },
}

/// Name → address → expiry (Unix seconds).
type Table = HashMap<String, BTreeMap<IpAddr, u64>>;

/// The cache. Share it behind an `Arc` (which is itself an [`FqdnObserver`]).
#[derive(Debug)]
pub struct FqdnCache {
    table: Mutex<Table>,
    max_ips_per_name: usize,
}

impl Default for FqdnCache {
    fn default() -> Self {
        Self::new(1000)
    }
}

fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl FqdnCache {
    /// An empty cache keeping at most `max_ips_per_name` addresses per name (at least 1).
    pub fn new(max_ips_per_name: usize) -> Self {
        Self {
            table: Mutex::new(HashMap::new()),
            max_ips_per_name: max_ips_per_name.max(1),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        // Every mutation leaves the table consistent, so a panic elsewhere does not poison
        // its meaning.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds what an answer taught at time `now`: each address expires `ttl` seconds later,
    /// or keeps a later expiry it already had.
    pub fn insert(&self, learning: &FqdnLearning, now: SystemTime) {
        let now = unix_seconds(now);
        let mut table = self.table();
        let ips = table.entry(learning.name.clone()).or_default();
        for learned in &learning.ips {
            let expiry = now.saturating_add(u64::from(learned.ttl));
            let slot = ips.entry(learned.ip).or_insert(expiry);
            *slot = (*slot).max(expiry);
        }
        while ips.len() > self.max_ips_per_name {
            // Evict the address closest to expiry (ties: the lowest address).
            let Some(victim) = ips
                .iter()
                .min_by_key(|(ip, exp)| (**exp, **ip))
                .map(|(ip, _)| *ip)
            else {
                break;
            };
            ips.remove(&victim);
        }
    }

    /// Unexpired addresses of a name (any case, with or without the trailing dot) at `now`.
    pub fn lookup(&self, name: &str, now: SystemTime) -> Vec<IpAddr> {
        let name = membrane_policy::fqdn::normalize_name(name);
        let now = unix_seconds(now);
        self.table()
            .get(&name)
            .map(|ips| {
                ips.iter()
                    .filter(|(_, exp)| **exp > now)
                    .map(|(ip, _)| *ip)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every entry, sorted by name then address.
    pub fn list(&self) -> Vec<FqdnCacheEntry> {
        let mut entries: Vec<FqdnCacheEntry> = self
            .table()
            .iter()
            .flat_map(|(name, ips)| {
                ips.iter().map(move |(ip, exp)| FqdnCacheEntry {
                    name: name.clone(),
                    ip: *ip,
                    expires_unix: *exp,
                })
            })
            .collect();
        entries.sort();
        entries
    }

    /// Removes and returns the entries expired at `now` (expiry ≤ now); names left without
    /// addresses disappear.
    pub fn expire(&self, now: SystemTime) -> Vec<FqdnCacheEntry> {
        let now = unix_seconds(now);
        let mut expired = Vec::new();
        self.table().retain(|name, ips| {
            ips.retain(|ip, exp| {
                let keep = *exp > now;
                if !keep {
                    expired.push(FqdnCacheEntry {
                        name: name.clone(),
                        ip: *ip,
                        expires_unix: *exp,
                    });
                }
                keep
            });
            !ips.is_empty()
        });
        expired.sort();
        expired
    }

    /// Number of (name, address) entries.
    pub fn len(&self) -> usize {
        self.table().values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes a JSON snapshot atomically: a temporary file next to `path`, synced, then
    /// renamed over it, so a crash leaves the old snapshot or the new one, never half of
    /// one. Blocking file I/O: call it from `spawn_blocking` in async code.
    pub fn save(&self, path: &Path) -> Result<(), FqdnCacheError> {
        let io_error = |source| FqdnCacheError::Io {
            path: path.to_owned(),
            source,
        };
        let snapshot = Snapshot {
            version: SNAPSHOT_VERSION,
            entries: self.list(),
        };
        let json =
            serde_json::to_vec_pretty(&snapshot).map_err(|source| FqdnCacheError::Format {
                path: path.to_owned(),
                source,
            })?;
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        let mut file = fs::File::create(&tmp).map_err(io_error)?;
        file.write_all(&json).map_err(io_error)?;
        file.sync_all().map_err(io_error)?;
        drop(file);
        fs::rename(&tmp, path).map_err(io_error)
    }

    /// Reads a snapshot written by [`FqdnCache::save`]. Expired entries are kept: run
    /// [`FqdnCache::expire`] to drop them (and learn which they were). Blocking file I/O.
    pub fn load(path: &Path, max_ips_per_name: usize) -> Result<Self, FqdnCacheError> {
        let bytes = fs::read(path).map_err(|source| FqdnCacheError::Io {
            path: path.to_owned(),
            source,
        })?;
        let snapshot: Snapshot =
            serde_json::from_slice(&bytes).map_err(|source| FqdnCacheError::Format {
                path: path.to_owned(),
                source,
            })?;
        if snapshot.version != SNAPSHOT_VERSION {
            return Err(FqdnCacheError::Version {
                path: path.to_owned(),
                found: snapshot.version,
            });
        }
        let cache = Self::new(max_ips_per_name);
        {
            let mut table = cache.table();
            for entry in snapshot.entries {
                let name = membrane_policy::fqdn::normalize_name(&entry.name);
                let ips = table.entry(name).or_default();
                let slot = ips.entry(entry.ip).or_insert(entry.expires_unix);
                *slot = (*slot).max(entry.expires_unix);
            }
        }
        Ok(cache)
    }
}

impl FqdnObserver for FqdnCache {
    async fn learned(&self, learning: &FqdnLearning) -> Result<(), FqdnObserverError> {
        self.insert(learning, SystemTime::now());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::learn::LearnedIp;

    fn learning(name: &str, ips: &[(&str, u32)]) -> FqdnLearning {
        FqdnLearning {
            name: name.to_owned(),
            ips: ips
                .iter()
                .map(|(ip, ttl)| LearnedIp {
                    ip: ip.parse().expect("ip"),
                    ttl: *ttl,
                })
                .collect(),
            cnames: Vec::new(),
            endpoint: None,
        }
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn insert_lookup_expire() {
        let cache = FqdnCache::new(10);
        cache.insert(
            &learning("a.example.", &[("192.0.2.1", 30), ("192.0.2.2", 300)]),
            at(1000),
        );
        // A later answer extends an address, never shortens it.
        cache.insert(&learning("a.example.", &[("192.0.2.1", 10)]), at(1005));
        assert_eq!(cache.lookup("A.Example", at(1020)).len(), 2);
        assert_eq!(
            cache.lookup("a.example.", at(1030)),
            vec!["192.0.2.2".parse::<IpAddr>().expect("ip")]
        );
        let expired = cache.expire(at(1030));
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].expires_unix, 1030);
        assert_eq!(cache.len(), 1);
        assert!(cache.expire(at(2000)).len() == 1 && cache.is_empty());
    }

    #[test]
    fn per_name_cap_evicts_soonest_expiry() {
        let cache = FqdnCache::new(2);
        cache.insert(
            &learning(
                "b.example.",
                &[("192.0.2.1", 50), ("192.0.2.2", 10), ("192.0.2.3", 100)],
            ),
            at(0),
        );
        let ips: Vec<String> = cache.list().iter().map(|e| e.ip.to_string()).collect();
        assert_eq!(ips, ["192.0.2.1", "192.0.2.3"]);
    }

    #[test]
    fn snapshot_round_trip_and_errors() {
        let dir = std::env::temp_dir().join(format!("membrane-fqdn-cache-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("fqdn.json");
        let cache = FqdnCache::new(10);
        cache.insert(
            &learning("c.example.", &[("2001:db8::1", 60), ("192.0.2.9", 60)]),
            at(100),
        );
        cache.save(&path).expect("save");
        let loaded = FqdnCache::load(&path, 10).expect("load");
        assert_eq!(loaded.list(), cache.list());

        fs::write(&path, br#"{"version": 99, "entries": []}"#).expect("write");
        let error = FqdnCache::load(&path, 10).expect_err("version").to_string();
        assert!(
            error.contains("fqdn.json") && error.contains("99"),
            "{error}"
        );
        fs::write(&path, b"not json").expect("write");
        assert!(matches!(
            FqdnCache::load(&path, 10),
            Err(FqdnCacheError::Format { .. })
        ));
        let missing = dir.join("missing.json");
        assert!(matches!(
            FqdnCache::load(&missing, 10),
            Err(FqdnCacheError::Io { .. })
        ));
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
