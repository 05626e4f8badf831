//! `WasmFilter` resources on the node: the agent resolves them per endpoint into a snapshot
//! sent over the proxy channel when it changes (`crate::proxy_channel`; the proxy saves it as
//! `/run/membrane/<name>/proxy-filters.json`); `membrane-proxy` loads the modules (checking each against its
//! sha256), builds one chain per (endpoint address, direction, port rule) and hands it to the
//! transparent proxy, which runs it on requests the HTTP policy allowed. A new snapshot is
//! compiled and booted off the data path and swapped in whole; if any filter fails to load,
//! the previous chains keep serving and the error is logged with the filter named.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use membrane_filters::{FailurePolicy, Filter, FilterChain, FilterHost, FilterSpec, HostConfig};
use membrane_l7proxy::{filter::HttpFilters, redirect::Direction};
use membrane_policy::Labels;
use serde::{Deserialize, Serialize};

use crate::wasm_resource::{self, FilterDirection, WasmFilterResource};

/// File name of the filter snapshot in the run's state directory.
pub const FILTER_SNAPSHOT_NAME: &str = "proxy-filters.json";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFilter {
    /// `WasmFilter NAMESPACE/NAME`.
    pub key: String,
    pub module: PathBuf,
    pub sha256: String,
    pub config: String,
    pub failure_policy: wasm_resource::FailurePolicy,
    pub failure_status: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotAttachment {
    pub endpoint: u64,
    pub ips: Vec<Ipv4Addr>,
    pub direction: FilterDirection,
    /// Empty: every port.
    pub ports: Vec<u16>,
    /// Filter keys, in the order they run.
    pub filters: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilterSnapshot {
    pub revision: u64,
    pub filters: Vec<SnapshotFilter>,
    pub attachments: Vec<SnapshotAttachment>,
}

/// The filters of every endpoint: for each endpoint and direction, the resources that select
/// it, grouped by their port list, each group's chain in `order` (then name) order. A
/// resource with ports joins the groups of those ports; one without joins every group.
pub fn snapshot_of<'a>(
    endpoints: impl IntoIterator<Item = (u64, Ipv4Addr, &'a Labels)>,
    resources: &[&WasmFilterResource],
) -> FilterSnapshot {
    let mut snapshot = FilterSnapshot::default();
    let mut used = std::collections::BTreeSet::new();
    for (id, ip, labels) in endpoints {
        for direction in [FilterDirection::Ingress, FilterDirection::Egress] {
            let mut selected: Vec<&WasmFilterResource> = resources
                .iter()
                .copied()
                .filter(|r| r.direction == direction && r.selects(labels))
                .collect();
            if selected.is_empty() {
                continue;
            }
            selected.sort_by(|a, b| a.order.cmp(&b.order).then_with(|| a.key().cmp(&b.key())));
            // One attachment per distinct port, plus one for "any other port".
            let mut ports: Vec<u16> = selected.iter().flat_map(|r| r.ports.clone()).collect();
            ports.sort_unstable();
            ports.dedup();
            for port in ports {
                let chain: Vec<String> = selected
                    .iter()
                    .filter(|r| r.ports.is_empty() || r.ports.contains(&port))
                    .map(|r| r.key())
                    .collect();
                used.extend(chain.iter().cloned());
                snapshot.attachments.push(SnapshotAttachment {
                    endpoint: id,
                    ips: vec![ip],
                    direction,
                    ports: vec![port],
                    filters: chain,
                });
            }
            let any: Vec<String> = selected
                .iter()
                .filter(|r| r.ports.is_empty())
                .map(|r| r.key())
                .collect();
            if !any.is_empty() {
                used.extend(any.iter().cloned());
                snapshot.attachments.push(SnapshotAttachment {
                    endpoint: id,
                    ips: vec![ip],
                    direction,
                    ports: Vec::new(),
                    filters: any,
                });
            }
        }
    }
    for r in resources {
        if used.contains(&r.key()) {
            snapshot.filters.push(SnapshotFilter {
                key: r.key(),
                module: r.module.clone(),
                sha256: r.sha256.clone(),
                config: r.config.clone(),
                failure_policy: r.failure_policy,
                failure_status: r.failure_status,
            });
        }
    }
    snapshot.filters.sort_by(|a, b| a.key.cmp(&b.key));
    snapshot
}

pub fn load(path: &Path) -> Result<FilterSnapshot, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// (endpoint address, direction, port; 0 = any other port) → chain.
type Table = HashMap<(IpAddr, Direction, u16), Arc<dyn HttpFilters>>;

/// The proxy's filters, swapped whole per snapshot.
pub struct NodeFilters {
    host: FilterHost,
    /// Loaded filters by (key, sha256, config, failure), reused across snapshots.
    loaded: RwLock<HashMap<String, (SnapshotFilter, Arc<Filter>)>>,
    table: RwLock<Arc<Table>>,
}

impl NodeFilters {
    pub fn new() -> Result<Arc<Self>, String> {
        let host = FilterHost::new(HostConfig::default()).map_err(|e| e.to_string())?;
        let filters = Arc::new(Self {
            host,
            loaded: RwLock::new(HashMap::new()),
            table: RwLock::new(Arc::new(HashMap::new())),
        });
        // proxy_on_tick for every loaded filter (each filter's own period applies).
        let weak = Arc::downgrade(&filters);
        std::thread::Builder::new()
            .name("membrane-wasm-tick".into())
            .spawn(move || {
                while let Some(filters) = weak.upgrade() {
                    let loaded: Vec<Arc<Filter>> = filters
                        .loaded
                        .read()
                        .unwrap_or_else(|e| e.into_inner())
                        .values()
                        .map(|(_, f)| f.clone())
                        .collect();
                    drop(filters);
                    for f in loaded {
                        f.tick();
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(filters)
    }

    /// Loads what the snapshot names (unchanged filters are kept) and swaps the table in.
    /// Blocking (compiles modules): call off the async runtime. On error nothing changes.
    pub fn install(&self, snapshot: &FilterSnapshot) -> Result<(), String> {
        let previous = self
            .loaded
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut loaded = HashMap::new();
        for f in &snapshot.filters {
            if let Some((spec, filter)) = previous.get(&f.key)
                && spec == f
            {
                loaded.insert(f.key.clone(), (spec.clone(), filter.clone()));
                continue;
            }
            let bytes = std::fs::read(&f.module)
                .map_err(|e| format!("{}: cannot read {}: {e}", f.key, f.module.display()))?;
            let sum = wasm_resource::hex(&<sha2::Sha256 as sha2::Digest>::digest(&bytes));
            if sum != f.sha256 {
                return Err(format!(
                    "{}: {} has sha256 {sum}, not {} (the file changed after the resource was applied)",
                    f.key,
                    f.module.display(),
                    f.sha256
                ));
            }
            let failure = match f.failure_policy {
                wasm_resource::FailurePolicy::FailClosed => FailurePolicy::FailClosed {
                    status: f.failure_status,
                },
                wasm_resource::FailurePolicy::FailOpen => FailurePolicy::FailOpen,
                wasm_resource::FailurePolicy::Reload => FailurePolicy::Reload {
                    status: f.failure_status,
                    backoff_base: Duration::from_millis(100),
                    backoff_max: Duration::from_secs(30),
                },
            };
            let spec = FilterSpec::new(&f.key, bytes)
                .with_config(f.config.as_bytes().to_vec())
                .with_failure_policy(failure);
            let filter = self
                .host
                .load(spec)
                .map_err(|e| format!("{} ({}): {e}", f.key, f.module.display()))?;
            loaded.insert(f.key.clone(), (f.clone(), filter));
        }
        let mut table: Table = HashMap::new();
        for a in &snapshot.attachments {
            let chain: Vec<Arc<Filter>> = a
                .filters
                .iter()
                .map(|k| {
                    loaded.get(k).map(|(_, f)| f.clone()).ok_or_else(|| {
                        format!(
                            "attachment of endpoint {} names unknown filter {k}",
                            a.endpoint
                        )
                    })
                })
                .collect::<Result<_, _>>()?;
            let filters: Arc<dyn HttpFilters> =
                Arc::new(crate::wasm_filters::ChainFilters(FilterChain::new(chain)));
            let direction = match a.direction {
                FilterDirection::Ingress => Direction::Ingress,
                FilterDirection::Egress => Direction::Egress,
            };
            let ports = if a.ports.is_empty() {
                vec![0]
            } else {
                a.ports.clone()
            };
            for ip in &a.ips {
                for port in &ports {
                    table.insert((IpAddr::V4(*ip), direction, *port), filters.clone());
                }
            }
        }
        *self.loaded.write().unwrap_or_else(|e| e.into_inner()) = loaded;
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
        Ok(())
    }

    /// The chain for a request to or from `endpoint_ip` on `port`.
    pub fn lookup(
        &self,
        endpoint_ip: IpAddr,
        direction: Direction,
        port: u16,
    ) -> Option<Arc<dyn HttpFilters>> {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner()).clone();
        table
            .get(&(endpoint_ip, direction, port))
            .or_else(|| table.get(&(endpoint_ip, direction, 0)))
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(name: &str, app: &str, ports: Vec<u16>, order: i64) -> WasmFilterResource {
        WasmFilterResource {
            name: name.into(),
            namespace: "default".into(),
            match_labels: vec![("app".into(), app.into())],
            match_expressions: Vec::new(),
            direction: FilterDirection::Ingress,
            ports,
            module: PathBuf::from("/m.wasm"),
            sha256: "0".repeat(64),
            config: String::new(),
            order,
            failure_policy: wasm_resource::FailurePolicy::FailClosed,
            failure_status: 503,
        }
    }

    #[test]
    fn chains_follow_selectors_ports_and_order() {
        let api =
            Labels::parse(["k8s:app=api", "k8s:io.kubernetes.pod.namespace=default"]).unwrap();
        let web =
            Labels::parse(["k8s:app=web", "k8s:io.kubernetes.pod.namespace=default"]).unwrap();
        let a = resource("a", "api", vec![8080], 20);
        let b = resource("b", "api", vec![], 10);
        let c = resource("c", "web", vec![], 0);
        let ip = Ipv4Addr::new(10, 0, 0, 1);
        let s = snapshot_of(
            [(1, ip, &api), (2, Ipv4Addr::new(10, 0, 0, 2), &web)],
            &[&a, &b, &c],
        );
        let api_chains: Vec<(Vec<u16>, Vec<String>)> = s
            .attachments
            .iter()
            .filter(|x| x.endpoint == 1)
            .map(|x| (x.ports.clone(), x.filters.clone()))
            .collect();
        assert_eq!(
            api_chains,
            vec![
                (
                    vec![8080],
                    vec![
                        "WasmFilter default/b".to_owned(),
                        "WasmFilter default/a".to_owned()
                    ]
                ),
                (vec![], vec!["WasmFilter default/b".to_owned()]),
            ]
        );
        assert_eq!(s.filters.len(), 3);
        // Nothing selects an endpoint in another namespace.
        let other = Labels::parse(["k8s:app=api", "k8s:io.kubernetes.pod.namespace=prod"]).unwrap();
        assert!(
            snapshot_of([(3, ip, &other)], &[&a, &b])
                .attachments
                .is_empty()
        );
    }
}
