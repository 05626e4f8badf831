//! What the agent sends its node proxy, built from the endpoints' resolved policies: the
//! HTTP/TLS rules ([`policy_snapshot`]), the DNS rules ([`dns_snapshot`]) and the
//! `WasmFilter` attachments with the peer tables filters read ([`filter_snapshot`],
//! [`peers_of`]). Pure: the types are the API crate's (`membrane_agent_api::snapshot`), the
//! proxy compiles them.

use std::net::{IpAddr, Ipv4Addr};

use membrane_agent_api::snapshot::{
    Direction as ProxyDirection, DnsSnapshot, DnsSnapshotEndpoint, DnsSnapshotRule, FilterSnapshot,
    L7Protocol, PolicySnapshot, Remotes, SnapshotAttachment, SnapshotEndpoint,
    SnapshotEndpointMeta, SnapshotFilter, SnapshotHeaderMatch, SnapshotHttpRule, SnapshotIdentity,
    SnapshotPeer, SnapshotPeers, SnapshotPort,
};
use membrane_agent_api::wasm_resource::{FilterDirection, WasmFilterResource};
use membrane_policy::{
    EndpointPolicy, FqdnSelector, L7Parser, L7Rules, LabelSource, Labels, RemoteIdentities,
};

/// Most identities the snapshot carries labels for (the rest answer `source.identity` but no
/// labels); far above a node's endpoint and CIDR identities.
pub const MAX_SNAPSHOT_IDENTITIES: usize = 16_384;

/// The proxy's rules from the endpoints' resolved policies: HTTP rule sets, and TLS
/// (`serverNames`) rule sets, which share the HTTP proxy port (the proxy tells them apart per
/// connection by the port's `l7`). DNS rule sets belong to the DNS proxy.
pub fn policy_snapshot<'a>(
    endpoints: impl IntoIterator<Item = (u64, Ipv4Addr, &'a EndpointPolicy)>,
    revision: u64,
) -> PolicySnapshot {
    let mut snapshot = PolicySnapshot {
        revision,
        ..PolicySnapshot::default()
    };
    for (id, ip, policy) in endpoints {
        let mut ports = Vec::new();
        for set in &policy.l7 {
            let l7 = match set.parser {
                L7Parser::Http => L7Protocol::Http,
                L7Parser::Tls => L7Protocol::Tls,
                L7Parser::Dns => continue,
            };
            let direction = match set.direction {
                membrane_policy::Direction::Ingress => ProxyDirection::Ingress,
                membrane_policy::Direction::Egress => ProxyDirection::Egress,
            };
            let peers = set
                .rules
                .iter()
                .filter_map(|peer| {
                    let http: Vec<SnapshotHttpRule> = match &peer.rules {
                        L7Rules::Http(rules) => rules.iter().filter_map(http_rule).collect(),
                        L7Rules::Dns(_) | L7Rules::Tls(_) => Vec::new(),
                    };
                    // Every rule left out: the peer allows nothing, so it is left out too
                    // (with an empty `http` it would be the wildcard).
                    if matches!(&peer.rules, L7Rules::Http(rules) if !rules.is_empty())
                        && http.is_empty()
                    {
                        return None;
                    }
                    Some(SnapshotPeer {
                        remotes: match &peer.remote {
                            RemoteIdentities::Any => Remotes::Any,
                            RemoteIdentities::Set(ids) => {
                                Remotes::Identities(ids.iter().map(|i| i.0).collect())
                            }
                        },
                        http,
                        server_names: match &peer.rules {
                            L7Rules::Tls(names) => names.iter().map(ToString::to_string).collect(),
                            L7Rules::Http(_) | L7Rules::Dns(_) => Vec::new(),
                        },
                    })
                })
                .collect();
            ports.push(SnapshotPort {
                direction,
                port: set.port,
                end_port: set.end_port,
                l7,
                peers,
            });
        }
        if !ports.is_empty() {
            snapshot.endpoints.push(SnapshotEndpoint {
                id,
                ips: vec![IpAddr::V4(ip)],
                ports,
            });
        }
    }
    snapshot
}

/// One engine rule in the snapshot's form. A rule with a secret-backed header match cannot be
/// evaluated here (no secrets are fetched) and is left out, which only narrows what is allowed
/// (Cilium: a failed secret fetch never matches).
fn http_rule(rule: &membrane_policy::HttpRule) -> Option<SnapshotHttpRule> {
    if rule.header_matches.iter().any(|m| m.secret.is_some()) {
        return None;
    }
    Some(SnapshotHttpRule {
        method: rule.method.clone(),
        path: rule.path.clone(),
        host: rule.host.clone(),
        headers: rule
            .headers
            .iter()
            .map(|h| match &h.value {
                Some(v) => format!("{}: {v}", h.name),
                None => h.name.clone(),
            })
            .collect(),
        header_matches: rule
            .header_matches
            .iter()
            .map(|m| SnapshotHeaderMatch {
                name: m.name.clone(),
                value: m.value.clone().unwrap_or_default(),
                mismatch: match m.mismatch {
                    membrane_policy::http::MismatchAction::Fail => String::new(),
                    membrane_policy::http::MismatchAction::Log => "LOG".into(),
                    membrane_policy::http::MismatchAction::Add => "ADD".into(),
                    membrane_policy::http::MismatchAction::Delete => "DELETE".into(),
                    membrane_policy::http::MismatchAction::Replace => "REPLACE".into(),
                },
            })
            .collect(),
    })
}

fn selector_text(s: &FqdnSelector) -> String {
    match s {
        FqdnSelector::Name(n) => format!("name:{n}"),
        FqdnSelector::Pattern(p) => format!("pattern:{p}"),
    }
}

/// The DNS rules of the endpoints' resolved policies.
pub fn dns_snapshot<'a>(
    endpoints: impl IntoIterator<Item = (u64, Ipv4Addr, &'a EndpointPolicy)>,
) -> DnsSnapshot {
    let mut snapshot = DnsSnapshot::default();
    for (id, ip, policy) in endpoints {
        let mut rules = Vec::new();
        for set in policy
            .l7
            .iter()
            .filter(|s| {
                s.parser == L7Parser::Dns && s.direction == membrane_policy::Direction::Egress
            })
            // `protocol: ANY` also gives an SCTP set; DNS runs over UDP and TCP only (the
            // datapath drops redirected SCTP with 180).
            .filter(|s| matches!(s.protocol, 6 | 17))
        {
            for peer in &set.rules {
                let L7Rules::Dns(selectors) = &peer.rules else {
                    continue;
                };
                rules.push(DnsSnapshotRule {
                    protocol: set.protocol,
                    port: set.port,
                    end_port: set.end_port.max(set.port),
                    servers: match &peer.remote {
                        RemoteIdentities::Any => None,
                        RemoteIdentities::Set(ids) => Some(ids.iter().map(|i| i.0).collect()),
                    },
                    selectors: selectors.iter().map(selector_text).collect(),
                    cookie: peer.cookie,
                });
            }
        }
        if !rules.is_empty() {
            snapshot.endpoints.push(DnsSnapshotEndpoint {
                id,
                ips: vec![ip],
                rules,
            });
        }
    }
    snapshot
}

/// One local endpoint as the filter snapshot needs it.
pub struct EndpointView<'a> {
    pub id: u64,
    pub ip: Ipv4Addr,
    pub namespace: &'a str,
    pub pod: &'a str,
    pub labels: &'a Labels,
}

/// Labels as the filters' `*.labels` properties show them: Kubernetes labels as the pod's
/// (`app` → `web`), others with their source (`reserved:world` → ``).
pub fn property_labels(labels: &Labels) -> Vec<(String, String)> {
    labels
        .iter()
        .map(|l| match l.source {
            LabelSource::K8s => (l.key, l.value),
            other => (format!("{}:{}", other.as_str(), l.key), l.value),
        })
        .collect()
}

/// The peer tables: every identity but `fqdn:` ones (at most
/// [`MAX_SNAPSHOT_IDENTITIES`], lowest ids first; returns how many were left out) and every
/// endpoint.
pub fn peers_of<'a>(
    endpoints: &[EndpointView<'a>],
    identities: impl IntoIterator<Item = (u32, &'a Labels)>,
) -> (SnapshotPeers, usize) {
    let mut ids: Vec<SnapshotIdentity> = identities
        .into_iter()
        .filter(|(_, labels)| !labels.has_source(LabelSource::Fqdn))
        .map(|(id, labels)| SnapshotIdentity {
            id,
            labels: property_labels(labels),
        })
        .collect();
    ids.sort_by_key(|i| i.id);
    ids.dedup_by_key(|i| i.id);
    let dropped = ids.len().saturating_sub(MAX_SNAPSHOT_IDENTITIES);
    ids.truncate(MAX_SNAPSHOT_IDENTITIES);
    let mut eps: Vec<SnapshotEndpointMeta> = endpoints
        .iter()
        .map(|e| SnapshotEndpointMeta {
            ip: e.ip,
            namespace: e.namespace.to_owned(),
            pod: e.pod.to_owned(),
        })
        .collect();
    eps.sort_by_key(|e| e.ip);
    (
        SnapshotPeers {
            identities: ids,
            endpoints: eps,
        },
        dropped,
    )
}

/// The filters of every endpoint: for each endpoint and direction, the resources that select
/// it, grouped by their port list, each group's chain in `order` (then name) order. A
/// resource with ports joins the groups of those ports; one without joins every group.
/// `peers` is kept only when some filter is attached.
pub fn filter_snapshot(
    endpoints: &[EndpointView<'_>],
    resources: &[&WasmFilterResource],
    peers: SnapshotPeers,
) -> FilterSnapshot {
    let mut snapshot = FilterSnapshot::default();
    let mut used = std::collections::BTreeSet::new();
    for &EndpointView { id, ip, labels, .. } in endpoints {
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
                protocol: r.protocol,
                failure_policy: r.failure_policy,
                failure_status: r.failure_status,
                upstreams: r.upstreams.clone(),
            });
        }
    }
    snapshot.filters.sort_by(|a, b| a.key.cmp(&b.key));
    if !snapshot.attachments.is_empty() {
        snapshot.peers = peers;
    }
    snapshot
}
