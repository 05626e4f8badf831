//! Configuration of the cluster-store client: where etcd is, how to reach it (TLS with a
//! client certificate), and the timings of leases, requests and status checks.
//!
//! Every duration carries its unit in its name; defaults are Cilium's where Cilium has one
//! (reference `cluster.md` §1.4) and documented at the constant.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// Default lease TTL of a node's keys, seconds: Cilium's `KVstoreLeaseTTL` (15 min). A dead
/// node's `ip/`, `nodes/` and identity references disappear this long after its last
/// keep-alive. The lab and tests use seconds.
pub const DEFAULT_LEASE_TTL_SECS: i64 = 15 * 60;
/// Default TTL of the lease that holds distributed locks, seconds: Cilium's `LockLeaseTTL`.
/// Short so that a node dying while holding an allocation lock blocks others for at most
/// this long, independent of the (long) session lease.
pub const DEFAULT_LOCK_TTL_SECS: i64 = 25;
/// Smallest lease TTL etcd grants with its default election timeout (1 s): etcd raises
/// shorter TTLs to 1.5 × the election timeout, so asking for less is a configuration error.
pub const MIN_LEASE_TTL_SECS: i64 = 2;
/// Default bound on connecting to an endpoint, milliseconds.
pub const DEFAULT_DIAL_TIMEOUT_MS: u64 = 5_000;
/// Default bound on one etcd request (get, put, txn, lease grant, lock wait), milliseconds.
/// Cilium's status check timeout is 10 s; a request of ours is one round trip.
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 5_000;
/// Default interval of the status probe (a quorum read), milliseconds.
pub const DEFAULT_STATUS_INTERVAL_MS: u64 = 5_000;
/// Default interval at which a node re-creates its own keys that went missing, milliseconds:
/// Cilium's `DefaultSyncInterval` (5 min). Re-creation also happens on every reconnect and,
/// for ipcache and node keys, as soon as the watch shows them deleted.
pub const DEFAULT_SYNC_INTERVAL_MS: u64 = 5 * 60 * 1000;
/// Default cluster name (Cilium's `cluster-name` default).
pub const DEFAULT_CLUSTER: &str = "default";

/// Client configuration (`--kvstore etcd --kvstore-endpoints …` and the config file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StoreConfig {
    /// etcd client URLs (`http://10.0.0.1:2379`, `https://…` with [`StoreConfig::tls`]).
    pub endpoints: Vec<String>,
    /// TLS: CA to verify the servers, optionally a client certificate and key.
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    /// This node's name: the last path element of its leased keys. No `/`.
    pub node: String,
    /// Cluster name: a path element of `ip/`, `nodes/` and `podcidr/` keys. No `/`.
    #[serde(default = "default_cluster")]
    pub cluster: String,
    /// TTL of the session lease under which this node's keys live, seconds (≥ 2).
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl_secs: i64,
    /// TTL of the lease holding this node's distributed locks, seconds (≥ 2).
    #[serde(default = "default_lock_ttl")]
    pub lock_ttl_secs: i64,
    /// Bound on connecting to an endpoint, milliseconds.
    #[serde(default = "default_dial_timeout")]
    pub dial_timeout_ms: u64,
    /// Bound on one request, milliseconds.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_ms: u64,
    /// Interval of the status probe, milliseconds.
    #[serde(default = "default_status_interval")]
    pub status_interval_ms: u64,
    /// Interval of the periodic re-creation of own keys, milliseconds.
    #[serde(default = "default_sync_interval")]
    pub sync_interval_ms: u64,
}

/// TLS files (PEM).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TlsFiles {
    /// CA bundle that signs the etcd servers' certificates.
    pub ca: PathBuf,
    /// Client certificate (with `key`), for etcd's `--client-cert-auth`.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Client private key (with `cert`).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Name to verify in the server certificate, when it is not the endpoint's host.
    #[serde(default)]
    pub server_name: Option<String>,
}

fn default_cluster() -> String {
    DEFAULT_CLUSTER.to_owned()
}
fn default_lease_ttl() -> i64 {
    DEFAULT_LEASE_TTL_SECS
}
fn default_lock_ttl() -> i64 {
    DEFAULT_LOCK_TTL_SECS
}
fn default_dial_timeout() -> u64 {
    DEFAULT_DIAL_TIMEOUT_MS
}
fn default_request_timeout() -> u64 {
    DEFAULT_REQUEST_TIMEOUT_MS
}
fn default_status_interval() -> u64 {
    DEFAULT_STATUS_INTERVAL_MS
}
fn default_sync_interval() -> u64 {
    DEFAULT_SYNC_INTERVAL_MS
}

impl StoreConfig {
    /// A configuration with the defaults for `endpoints` and `node`.
    pub fn new(endpoints: Vec<String>, node: impl Into<String>) -> StoreConfig {
        StoreConfig {
            endpoints,
            tls: None,
            node: node.into(),
            cluster: default_cluster(),
            lease_ttl_secs: DEFAULT_LEASE_TTL_SECS,
            lock_ttl_secs: DEFAULT_LOCK_TTL_SECS,
            dial_timeout_ms: DEFAULT_DIAL_TIMEOUT_MS,
            request_timeout_ms: DEFAULT_REQUEST_TIMEOUT_MS,
            status_interval_ms: DEFAULT_STATUS_INTERVAL_MS,
            sync_interval_ms: DEFAULT_SYNC_INTERVAL_MS,
        }
    }

    /// Checks names, TTLs and timeouts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.endpoints.is_empty() {
            return Err(ConfigError::NoEndpoints);
        }
        for e in &self.endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(ConfigError::EndpointScheme {
                    endpoint: e.clone(),
                });
            }
            if e.starts_with("http://") && self.tls.is_some() {
                return Err(ConfigError::TlsWithHttp {
                    endpoint: e.clone(),
                });
            }
        }
        check_path_element("node", &self.node)?;
        check_path_element("cluster", &self.cluster)?;
        for (field, ttl) in [
            ("leaseTtlSecs", self.lease_ttl_secs),
            ("lockTtlSecs", self.lock_ttl_secs),
        ] {
            if ttl < MIN_LEASE_TTL_SECS {
                return Err(ConfigError::TtlTooShort {
                    field,
                    secs: ttl,
                    min: MIN_LEASE_TTL_SECS,
                });
            }
        }
        for (field, ms) in [
            ("dialTimeoutMs", self.dial_timeout_ms),
            ("requestTimeoutMs", self.request_timeout_ms),
            ("statusIntervalMs", self.status_interval_ms),
            ("syncIntervalMs", self.sync_interval_ms),
        ] {
            if ms == 0 {
                return Err(ConfigError::ZeroDuration { field });
            }
        }
        if let Some(tls) = &self.tls
            && tls.cert.is_some() != tls.key.is_some()
        {
            return Err(ConfigError::CertWithoutKey);
        }
        Ok(())
    }

    /// [`StoreConfig::dial_timeout_ms`] as a duration.
    pub fn dial_timeout(&self) -> Duration {
        Duration::from_millis(self.dial_timeout_ms)
    }

    /// [`StoreConfig::request_timeout_ms`] as a duration.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// [`StoreConfig::status_interval_ms`] as a duration.
    pub fn status_interval(&self) -> Duration {
        Duration::from_millis(self.status_interval_ms)
    }

    /// [`StoreConfig::sync_interval_ms`] as a duration.
    pub fn sync_interval(&self) -> Duration {
        Duration::from_millis(self.sync_interval_ms)
    }
}

/// A name used as one element of a key path: non-empty, no `/`, no control characters.
pub(crate) fn check_path_element(field: &'static str, value: &str) -> Result<(), ConfigError> {
    if value.is_empty() || value.contains('/') || value.chars().any(char::is_control) {
        return Err(ConfigError::BadName {
            field,
            value: value.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_validation() {
        let c = StoreConfig::new(vec!["http://127.0.0.1:2379".into()], "n1");
        c.validate().unwrap();
        assert_eq!(c.lease_ttl_secs, 900);

        let mut bad = c.clone();
        bad.node = "a/b".into();
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::BadName { field: "node", .. })
        ));
        let mut bad = c.clone();
        bad.lease_ttl_secs = 1;
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::TtlTooShort { .. })
        ));
        let mut bad = c.clone();
        bad.endpoints = vec!["127.0.0.1:2379".into()];
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::EndpointScheme { .. })
        ));
    }

    #[test]
    fn config_is_strict() {
        let ok: StoreConfig =
            serde_json::from_str(r#"{"endpoints":["http://e:2379"],"node":"n1","leaseTtlSecs":5}"#)
                .unwrap();
        assert_eq!(ok.lease_ttl_secs, 5);
        assert_eq!(ok.cluster, "default");
        let err = serde_json::from_str::<StoreConfig>(
            r#"{"endpoints":["http://e:2379"],"node":"n1","leaseTTL":5}"#,
        );
        assert!(err.is_err());
    }
}
