//! Reconcile, in two halves:
//!
//! - [`desired_state`] (pure, no I/O): from every local endpoint's resolved policy, its
//!   interface index and address, other nodes' endpoints (the cluster ipcache), the CIDR
//!   prefixes policies reference and the addresses the DNS proxy learned, the exact contents the endpoints map, the ipcache and the policy map
//!   must have;
//! - [`apply`]: makes the kernel maps equal to it — missing entries written first (no window
//!   without them), stale ones removed after.
//!
//! Reconciling from the full desired state rather than remembered diffs is what makes a
//! restart safe: a new agent computes the same state and removes whatever changed while it
//! was away.

use std::{collections::BTreeMap, net::Ipv4Addr};

use membrane_common::Direction;
use membrane_datapath::{
    Datapath, EndpointEntry, IpcacheInfo, Ipv4Prefix, PolicyRule, PolicyVerdict, PortMatch,
    plumbing::POD_GATEWAY,
};
use membrane_policy::{EndpointPolicy, Identity, IpPrefix};

use crate::{
    datapath_sync,
    error::{AgentError, dp_err},
};

/// One local endpoint as reconcile needs it.
#[derive(Clone, Debug)]
pub struct LocalEndpoint<'a> {
    pub id: u32,
    pub ifindex: u32,
    pub ipv4: Ipv4Addr,
    pub identity: u32,
    pub policy: &'a EndpointPolicy,
}

/// A policy map entry's key: (endpoint, direction, remote identity, protocol, ports).
pub type RuleKey = (u32, Direction, u32, u8, PortMatch);

/// What the maps must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// By interface index.
    pub endpoints: BTreeMap<u32, EndpointEntry>,
    pub ipcache: BTreeMap<Ipv4Prefix, IpcacheInfo>,
    pub rules: BTreeMap<RuleKey, PolicyRule>,
    /// Rule cookie → the policy rule it came from (for flows).
    pub cookies: BTreeMap<u32, String>,
}

/// The maps' contents for these endpoints. `remote` are the entries the cluster store
/// implies (`routing::remote_entries`: other nodes' endpoints, nodes' addresses and pod
/// CIDRs with their tunnel endpoints, this node's own addresses; empty without a store); `prefixes` the CIDR identities policies
/// reference; `learned` the addresses the DNS proxy learned with their `fqdn:` identities.
/// Precedence in the ipcache, highest first: the node's own address is the host; local
/// endpoints' addresses (what this node registered wins over whatever another node claims
/// for the same address); remote endpoints' addresses; CIDR prefixes; learned addresses
/// (a pod's address, local or remote, is never relabelled by a CIDR rule or a DNS answer).
/// Ingress HTTP redirects go to the proxy's ingress listener, the port after
/// `http_proxy_port`.
pub fn desired_state(
    endpoints: &[LocalEndpoint<'_>],
    remote: &BTreeMap<Ipv4Prefix, IpcacheInfo>,
    prefixes: &BTreeMap<IpPrefix, Identity>,
    learned: &BTreeMap<Ipv4Addr, Identity>,
    http_proxy_port: u16,
) -> Result<DesiredState, datapath_sync::SyncError> {
    let mut state = DesiredState::default();
    for e in endpoints {
        state.endpoints.insert(
            e.ifindex,
            EndpointEntry {
                ifindex: e.ifindex,
                endpoint_id: e.id,
                identity: e.identity,
                enforce_ingress: e.policy.enforce_ingress,
                enforce_egress: e.policy.enforce_egress,
            },
        );
    }
    let plain = |identity| IpcacheInfo {
        identity,
        tunnel_endpoint: None,
    };
    state.ipcache.insert(
        Ipv4Prefix::host(POD_GATEWAY),
        plain(membrane_common::identity::HOST),
    );
    for e in endpoints {
        state
            .ipcache
            .insert(Ipv4Prefix::host(e.ipv4), plain(e.identity));
    }
    for (prefix, info) in remote {
        // This node's own addresses (host) win over a local endpoint claiming them.
        if info.identity == membrane_common::identity::HOST {
            state.ipcache.insert(*prefix, *info);
        } else {
            state.ipcache.entry(*prefix).or_insert(*info);
        }
    }
    for (prefix, id) in prefixes {
        if let Some(v4) = datapath_sync::ipv4_prefix(prefix) {
            state
                .ipcache
                .entry(v4)
                // A policy's CIDR that is exactly another node's pod CIDR names the
                // identity; the tunnel endpoint stays.
                .and_modify(|info| {
                    if info.identity == membrane_common::identity::WORLD {
                        info.identity = id.0;
                    }
                })
                .or_insert(plain(id.0));
        }
    }
    for (ip, id) in learned {
        state
            .ipcache
            .entry(Ipv4Prefix::host(*ip))
            .or_insert(plain(id.0));
    }
    for e in endpoints {
        let policy = e.policy;
        for (key, entry) in &policy.entries {
            let mut rule = datapath_sync::to_datapath_rule(policy.endpoint_id, key, entry)?;
            if rule.direction == Direction::Ingress
                && rule.verdict == PolicyVerdict::Redirect(http_proxy_port)
            {
                rule.verdict = PolicyVerdict::Redirect(http_proxy_port + 1);
            }
            state.rules.insert(
                (
                    rule.endpoint_id,
                    rule.direction,
                    rule.remote_identity,
                    rule.protocol,
                    rule.ports,
                ),
                rule,
            );
        }
        state
            .cookies
            .extend(policy.cookies.iter().map(|(c, r)| (*c, r.clone())));
    }
    Ok(state)
}

/// Makes the datapath's maps equal `desired`: endpoints first (stale ones removed, changed
/// ones rewritten), then the ipcache, then policy entries — written before the stale ones
/// are removed, so a changed policy never has a moment without its entries.
pub fn apply(datapath: &mut Datapath, desired: &DesiredState) -> Result<(), AgentError> {
    let have_endpoints = datapath
        .endpoints()
        .list()
        .map_err(dp_err("list endpoints"))?;
    for e in &have_endpoints {
        if !desired.endpoints.contains_key(&e.ifindex) {
            datapath
                .endpoints()
                .remove(e.ifindex)
                .map_err(dp_err("remove endpoint"))?;
        }
    }
    for (ifindex, e) in &desired.endpoints {
        if !have_endpoints
            .iter()
            .any(|h| h.ifindex == *ifindex && h == e)
        {
            datapath
                .endpoints()
                .upsert(*e)
                .map_err(dp_err("write endpoint"))?;
        }
    }

    // A map, not the listed vector: with other nodes' endpoints the ipcache holds thousands of
    // entries and every reconcile compares each of them.
    let have_ipcache: BTreeMap<Ipv4Prefix, IpcacheInfo> = datapath
        .ipcache()
        .list_info()
        .map_err(dp_err("list ipcache"))?
        .into_iter()
        .collect();
    for (prefix, info) in &desired.ipcache {
        if have_ipcache.get(prefix) != Some(info) {
            datapath
                .ipcache()
                .upsert_info(*prefix, *info)
                .map_err(dp_err("write ipcache entry"))?;
        }
    }
    for prefix in have_ipcache.keys() {
        if !desired.ipcache.contains_key(prefix) {
            datapath
                .ipcache()
                .remove(*prefix)
                .map_err(dp_err("remove ipcache entry"))?;
        }
    }

    let have_rules = datapath.policy().list().map_err(dp_err("list policy"))?;
    for rule in desired.rules.values() {
        if !have_rules.contains(rule) {
            datapath
                .policy()
                .insert(rule)
                .map_err(dp_err("write policy entry"))?;
        }
    }
    for rule in &have_rules {
        let key = (
            rule.endpoint_id,
            rule.direction,
            rule.remote_identity,
            rule.protocol,
            rule.ports,
        );
        if !desired.rules.contains_key(&key) {
            datapath
                .policy()
                .remove(rule)
                .map_err(dp_err("remove policy entry"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use membrane_policy::{
        EndpointInfo, IdentitySet, Labels, Repository, ResolveOptions, parse_documents,
        resolve_endpoint,
    };

    const HTTP_PORT: u16 = 15001;

    fn labels(app: &str) -> Labels {
        Labels::parse([
            format!("k8s:app={app}").as_str(),
            "k8s:io.kubernetes.pod.namespace=default",
        ])
        .expect("labels")
    }

    /// Resolves `yaml` for an endpoint labelled `app`, with identities 1000 (client) and
    /// 2000 (server) known.
    fn resolved(yaml: &str, id: u64, app: &str) -> EndpointPolicy {
        let mut repo = Repository::new();
        for p in parse_documents(yaml, "test.yaml").expect("parse") {
            repo.add(p).expect("add");
        }
        let mut identities = IdentitySet::with_reserved();
        identities.insert(Identity(1000), labels("client"));
        identities.insert(Identity(2000), labels("server"));
        resolve_endpoint(
            &repo,
            &EndpointInfo::new(id, labels(app)),
            &identities,
            &ResolveOptions::new(HTTP_PORT, 15053),
        )
    }

    const SERVER_INGRESS_HTTP: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: server-in, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}], rules: {http: [{method: GET}]}}]
"#;

    #[test]
    fn no_policy_means_no_enforcement_and_no_entries() {
        let policy = resolved("", 1001, "client");
        let eps = [LocalEndpoint {
            id: 1001,
            ifindex: 7,
            ipv4: Ipv4Addr::new(10, 0, 0, 1),
            identity: 1000,
            policy: &policy,
        }];
        let s = desired_state(
            &eps,
            &BTreeMap::new(),
            &BTreeMap::new(),
            &BTreeMap::new(),
            HTTP_PORT,
        )
        .expect("ok");
        let e = s.endpoints[&7];
        assert_eq!((e.endpoint_id, e.identity), (1001, 1000));
        assert!(!e.enforce_ingress && !e.enforce_egress);
        assert_eq!(
            s.rules.len(),
            policy.entries.len(),
            "one map entry per resolved entry"
        );
        assert!(s.rules.values().all(|r| r.endpoint_id == 1001));
        assert_eq!(
            s.ipcache
                .iter()
                .map(|(p, i)| (*p, i.identity, i.tunnel_endpoint))
                .collect::<Vec<_>>(),
            [
                (Ipv4Prefix::host(Ipv4Addr::new(10, 0, 0, 1)), 1000, None),
                (
                    Ipv4Prefix::host(POD_GATEWAY),
                    membrane_common::identity::HOST,
                    None
                ),
            ]
        );
    }

    #[test]
    fn ingress_http_redirects_go_to_the_ingress_listener() {
        let policy = resolved(SERVER_INGRESS_HTTP, 1002, "server");
        let eps = [LocalEndpoint {
            id: 1002,
            ifindex: 8,
            ipv4: Ipv4Addr::new(10, 0, 0, 2),
            identity: 2000,
            policy: &policy,
        }];
        let s = desired_state(
            &eps,
            &BTreeMap::new(),
            &BTreeMap::new(),
            &BTreeMap::new(),
            HTTP_PORT,
        )
        .expect("ok");
        assert!(s.endpoints[&8].enforce_ingress);
        let redirect = s
            .rules
            .values()
            .find(|r| r.remote_identity == 1000 && r.direction == Direction::Ingress)
            .expect("an entry for the client");
        assert_eq!(redirect.verdict, PolicyVerdict::Redirect(HTTP_PORT + 1));
        assert!(
            s.rules
                .values()
                .all(|r| r.verdict != PolicyVerdict::Redirect(HTTP_PORT)),
            "no ingress entry may point at the egress listener"
        );
        assert!(
            !s.cookies.is_empty(),
            "the entry's origin is kept for flows"
        );
    }

    #[test]
    fn an_endpoint_address_is_never_relabelled_by_a_cidr_or_a_dns_answer() {
        let policy = resolved("", 1001, "client");
        let ip = Ipv4Addr::new(10, 0, 0, 1);
        let eps = [LocalEndpoint {
            id: 1001,
            ifindex: 7,
            ipv4: ip,
            identity: 1000,
            policy: &policy,
        }];
        let prefixes = BTreeMap::from([
            (
                "10.0.0.1/32".parse::<IpPrefix>().expect("prefix"),
                Identity(0x0100_0001),
            ),
            (
                "192.0.2.0/24".parse::<IpPrefix>().expect("prefix"),
                Identity(0x0100_0002),
            ),
        ]);
        let learned = BTreeMap::from([
            (ip, Identity(0x0100_0003)),
            (Ipv4Addr::new(192, 0, 2, 9), Identity(0x0100_0004)),
            (Ipv4Addr::new(198, 51, 100, 1), Identity(0x0100_0005)),
        ]);
        let s = desired_state(&eps, &BTreeMap::new(), &prefixes, &learned, HTTP_PORT).expect("ok");
        assert_eq!(
            s.ipcache[&Ipv4Prefix::host(ip)].identity,
            1000,
            "the pod wins"
        );
        let block =
            datapath_sync::ipv4_prefix(&"192.0.2.0/24".parse().expect("prefix")).expect("v4");
        assert_eq!(s.ipcache[&block].identity, 0x0100_0002);
        assert_eq!(
            s.ipcache[&Ipv4Prefix::host(Ipv4Addr::new(192, 0, 2, 9))].identity,
            0x0100_0004,
            "a learned host inside a CIDR block keeps its own /32"
        );
        assert_eq!(
            s.ipcache[&Ipv4Prefix::host(Ipv4Addr::new(198, 51, 100, 1))].identity,
            0x0100_0005
        );
    }

    #[test]
    fn remote_endpoints_come_after_local_ones_and_before_cidrs_and_dns() {
        let policy = resolved("", 1001, "client");
        let local = Ipv4Addr::new(10, 0, 1, 1);
        let eps = [LocalEndpoint {
            id: 1001,
            ifindex: 7,
            ipv4: local,
            identity: 1000,
            policy: &policy,
        }];
        let remote_ip = Ipv4Addr::new(10, 0, 2, 1);
        let learned_ip = Ipv4Addr::new(10, 0, 2, 2);
        let remote_info = |identity| IpcacheInfo {
            identity,
            tunnel_endpoint: Some(Ipv4Addr::new(10, 199, 0, 12)),
        };
        let remote = BTreeMap::from([
            (Ipv4Prefix::host(remote_ip), remote_info(2000)),
            // Another node claims a local endpoint's address: the local registration wins.
            (Ipv4Prefix::host(local), remote_info(3000)),
        ]);
        let prefixes = BTreeMap::from([(
            "10.0.2.1/32".parse::<IpPrefix>().expect("prefix"),
            Identity(0x0100_0001),
        )]);
        let learned = BTreeMap::from([
            (remote_ip, Identity(0x0100_0002)),
            (learned_ip, Identity(0x0100_0003)),
        ]);
        let s = desired_state(&eps, &remote, &prefixes, &learned, HTTP_PORT).expect("ok");
        assert_eq!(
            s.ipcache[&Ipv4Prefix::host(local)].identity,
            1000,
            "local wins"
        );
        assert_eq!(
            s.ipcache[&Ipv4Prefix::host(remote_ip)].identity,
            2000,
            "a remote pod is never relabelled by a CIDR rule or a DNS answer"
        );
        assert_eq!(
            s.ipcache[&Ipv4Prefix::host(remote_ip)].tunnel_endpoint,
            Some(Ipv4Addr::new(10, 199, 0, 12)),
            "its tunnel endpoint is kept"
        );
        assert_eq!(s.ipcache[&Ipv4Prefix::host(local)].tunnel_endpoint, None);
        assert_eq!(
            s.ipcache[&Ipv4Prefix::host(learned_ip)].identity,
            0x0100_0003
        );
        let without =
            desired_state(&eps, &BTreeMap::new(), &prefixes, &learned, HTTP_PORT).expect("ok");
        assert_eq!(
            without.ipcache[&Ipv4Prefix::host(remote_ip)].identity,
            0x0100_0001,
            "a remote entry that went leaves the address to the rest"
        );
    }

    #[test]
    fn the_same_input_gives_the_same_state() {
        let server = resolved(SERVER_INGRESS_HTTP, 1002, "server");
        let client = resolved(SERVER_INGRESS_HTTP, 1001, "client");
        let eps = [
            LocalEndpoint {
                id: 1001,
                ifindex: 7,
                ipv4: Ipv4Addr::new(10, 0, 0, 1),
                identity: 1000,
                policy: &client,
            },
            LocalEndpoint {
                id: 1002,
                ifindex: 8,
                ipv4: Ipv4Addr::new(10, 0, 0, 2),
                identity: 2000,
                policy: &server,
            },
        ];
        let a = desired_state(
            &eps,
            &BTreeMap::new(),
            &BTreeMap::new(),
            &BTreeMap::new(),
            HTTP_PORT,
        )
        .expect("ok");
        let mut reversed = eps.to_vec();
        reversed.reverse();
        let b = desired_state(
            &reversed,
            &BTreeMap::new(),
            &BTreeMap::new(),
            &BTreeMap::new(),
            HTTP_PORT,
        )
        .expect("ok");
        assert_eq!(a, b, "endpoint order does not matter");
        assert_eq!(a.endpoints.len(), 2);
    }
}
