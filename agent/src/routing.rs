//! Traffic between nodes (`--routing-mode`, DESIGN §4): what the node's ipcache holds about
//! other nodes and their endpoints, and the node's routes to their pod CIDRs.
//!
//! - [`remote_entries`] (pure): the ipcache entries the cluster store implies — other
//!   nodes' endpoints (/32, with their node's underlay address as tunnel endpoint in tunnel
//!   mode), other nodes' underlay and router addresses (`remote-node`), other nodes' pod
//!   CIDRs (`world` with the tunnel endpoint: Cilium's fallback for addresses the ipcache
//!   does not know yet), and this node's own addresses (`host`).
//! - [`NodeRouting`]: with `--routing-mode`, set up once at start (tunnel: the VXLAN device
//!   with the node's router address and the tunnel programs) and synced on every reconcile
//!   whose node list changed (`membrane_datapath::routing::sync_routes`, which owns only the
//!   routes it tagged).
//!
//! Without `--routing-mode` the agent never touches the node's routes or devices.

use std::{collections::BTreeMap, net::Ipv4Addr};

use membrane_agent_api::args::RoutingModeArg;
use membrane_common::identity;
use membrane_datapath::{
    Datapath, IpcacheInfo, Ipv4Prefix, Netns,
    routing::{self, NodeRoute, RoutingMode},
};

use crate::{
    cluster::{ClusterClient, RemoteEndpoint, RemoteNode},
    config::AgentConfig,
    error::{AgentError, dp_err},
};

/// The node's cross-node routing, as set up at start.
#[derive(Debug, Clone)]
pub struct NodeRouting {
    pub mode: RoutingMode,
    pub node_ip: Ipv4Addr,
    pub pod_cidr: Ipv4Prefix,
    /// The node's own address in its pod CIDR (the first host address): on the tunnel
    /// device, the source towards other nodes' pods.
    pub router_ip: Ipv4Addr,
    /// Route MTU into the tunnel (the underlay's minus the tunnel overhead).
    pub tunnel_mtu: u32,
    /// The routes last written (a reconcile with the same nodes writes nothing).
    synced: Option<Vec<NodeRoute>>,
}

impl NodeRouting {
    /// `None` without `--routing-mode`. Refuses a mode without what it needs: the cluster
    /// store (other nodes), an IPv4 `--node-ip` and a pod CIDR.
    pub fn setup(
        config: &AgentConfig,
        cluster: Option<&ClusterClient>,
        node: &Netns,
        datapath: &mut Datapath,
    ) -> Result<Option<NodeRouting>, AgentError> {
        let Some(arg) = config.cluster.routing_mode else {
            return Ok(None);
        };
        let mode = match arg {
            RoutingModeArg::Native => RoutingMode::Native,
            RoutingModeArg::Tunnel => RoutingMode::Tunnel,
        };
        let needs = |what: &str| AgentError::Config {
            what: "--routing-mode".into(),
            detail: format!("`{}` needs {what}", mode.as_str()),
        };
        let cluster = cluster.ok_or_else(|| needs("the cluster store (--kvstore)"))?;
        let node_ip = match config.cluster.node_ip {
            Some(std::net::IpAddr::V4(ip)) => ip,
            _ => return Err(needs("an IPv4 --node-ip")),
        };
        let cidr = cluster
            .pod_cidr()
            .ok_or_else(|| needs("a pod CIDR (--pod-cidr or --cluster-pool-ipv4-cidr)"))?;
        let pod_cidr = Ipv4Prefix::new(cidr.addr(), cidr.prefix_len())
            .map_err(dp_err("the node's pod CIDR"))?;
        let router_ip = Ipv4Addr::from(u32::from(cidr.addr()) + 1);
        let underlay =
            routing::route_device(node, node_ip).map_err(dp_err("find the underlay interface"))?;
        let underlay_mtu =
            routing::link_mtu(node, &underlay).map_err(dp_err("read the underlay MTU"))?;
        if mode == RoutingMode::Tunnel {
            routing::ensure_tunnel_device(node, router_ip, underlay_mtu)
                .map_err(dp_err("create the tunnel device"))?;
            datapath
                .attach_tunnel(node, routing::TUNNEL_IFNAME)
                .map_err(dp_err("attach the tunnel programs"))?;
        } else {
            // A node switched from tunnel to native keeps no tunnel behind.
            datapath
                .detach_endpoint(routing::TUNNEL_IFNAME)
                .map_err(dp_err("detach the tunnel programs"))?;
            routing::remove_tunnel_device(node).map_err(dp_err("remove the tunnel device"))?;
        }
        tracing::info!(
            mode = mode.as_str(),
            %node_ip,
            %pod_cidr,
            %router_ip,
            underlay = %underlay,
            underlay_mtu,
            "cross-node routing set up"
        );
        Ok(Some(NodeRouting {
            mode,
            node_ip,
            pod_cidr,
            router_ip,
            tunnel_mtu: underlay_mtu.saturating_sub(routing::TUNNEL_OVERHEAD),
            synced: None,
        }))
    }

    /// Makes the node's routes to other nodes' pod CIDRs match `nodes`, if they changed.
    pub fn sync(&mut self, node: &Netns, nodes: &[RemoteNode]) -> Result<(), AgentError> {
        let want = node_routes(nodes, self.pod_cidr);
        if self.synced.as_ref() == Some(&want) {
            return Ok(());
        }
        routing::sync_routes(node, self.mode, &want, self.tunnel_mtu, self.router_ip)
            .map_err(dp_err("sync the routes to other nodes"))?;
        tracing::info!(routes = want.len(), "routes to other nodes synced");
        self.synced = Some(want);
        Ok(())
    }

    /// This node's own addresses, which are `host` in its ipcache.
    pub fn own_addresses(&self) -> [Ipv4Addr; 2] {
        [self.node_ip, self.router_ip]
    }
}

/// One route per other node with a pod CIDR, sorted; a node claiming this node's own CIDR
/// (a misconfiguration the store's IPAM prevents) gets none.
fn node_routes(nodes: &[RemoteNode], own: Ipv4Prefix) -> Vec<NodeRoute> {
    let mut routes: Vec<NodeRoute> = nodes
        .iter()
        .filter_map(|n| {
            let cidr = n.pod_cidr?;
            let pod_cidr = Ipv4Prefix::new(cidr.addr(), cidr.prefix_len()).ok()?;
            if pod_cidr == own {
                tracing::warn!(node = %n.name, %pod_cidr, "another node claims this node's pod CIDR; no route");
                return None;
            }
            Some(NodeRoute {
                pod_cidr,
                underlay_ip: n.underlay_ip,
            })
        })
        .collect();
    routes.sort();
    routes.dedup_by_key(|r| r.pod_cidr);
    routes
}

/// The ipcache entries other nodes and this node's own addresses imply (see the module
/// doc). Local endpoints, CIDR and FQDN entries are added by `reconcile::desired_state`,
/// which gives these precedence as documented there.
pub fn remote_entries(
    routing: Option<&NodeRouting>,
    own_node_ip: Option<Ipv4Addr>,
    endpoints: &BTreeMap<Ipv4Addr, RemoteEndpoint>,
    nodes: &[RemoteNode],
) -> BTreeMap<Ipv4Prefix, IpcacheInfo> {
    let tunnel = routing.is_some_and(|r| r.mode == RoutingMode::Tunnel);
    let mut out = BTreeMap::new();
    let mut own: Vec<Ipv4Addr> = own_node_ip.into_iter().collect();
    if let Some(r) = routing {
        own.extend(r.own_addresses());
    }
    for ip in own {
        out.insert(
            Ipv4Prefix::host(ip),
            IpcacheInfo {
                identity: identity::HOST,
                tunnel_endpoint: None,
            },
        );
    }
    for n in nodes {
        out.entry(Ipv4Prefix::host(n.underlay_ip))
            .or_insert(IpcacheInfo {
                identity: identity::REMOTE_NODE,
                tunnel_endpoint: None,
            });
        let Some(cidr) = n.pod_cidr else { continue };
        let Ok(prefix) = Ipv4Prefix::new(cidr.addr(), cidr.prefix_len()) else {
            continue;
        };
        let endpoint = tunnel.then_some(n.underlay_ip);
        let router = Ipv4Addr::from(u32::from(cidr.addr()) + 1);
        out.entry(Ipv4Prefix::host(router)).or_insert(IpcacheInfo {
            identity: identity::REMOTE_NODE,
            tunnel_endpoint: endpoint,
        });
        out.entry(prefix).or_insert(IpcacheInfo {
            identity: identity::WORLD,
            tunnel_endpoint: endpoint,
        });
    }
    for (ip, e) in endpoints {
        out.entry(Ipv4Prefix::host(*ip)).or_insert(IpcacheInfo {
            identity: e.identity.0,
            tunnel_endpoint: if tunnel { e.node_ip } else { None },
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use membrane_policy::Identity;

    fn node(name: &str, underlay: [u8; 4], cidr: &str) -> RemoteNode {
        RemoteNode {
            name: name.into(),
            underlay_ip: Ipv4Addr::from(underlay),
            pod_cidr: Some(cidr.parse().expect("cidr")),
        }
    }

    fn routing(mode: RoutingMode) -> NodeRouting {
        NodeRouting {
            mode,
            node_ip: Ipv4Addr::new(10, 199, 0, 11),
            pod_cidr: "10.200.0.0/24".parse().expect("prefix"),
            router_ip: Ipv4Addr::new(10, 200, 0, 1),
            tunnel_mtu: 1450,
            synced: None,
        }
    }

    fn p(s: &str) -> Ipv4Prefix {
        s.parse().expect("prefix")
    }

    #[test]
    fn tunnel_entries_name_the_node_of_every_remote_address() {
        let nodes = [node("n2", [10, 199, 0, 12], "10.200.1.0/24")];
        let endpoints = BTreeMap::from([(
            Ipv4Addr::new(10, 200, 1, 12),
            RemoteEndpoint {
                identity: Identity(4242),
                node_ip: Some(Ipv4Addr::new(10, 199, 0, 12)),
            },
        )]);
        let r = routing(RoutingMode::Tunnel);
        let e = remote_entries(Some(&r), Some(r.node_ip), &endpoints, &nodes);
        let n2 = Some(Ipv4Addr::new(10, 199, 0, 12));
        let info = |identity, tunnel_endpoint| IpcacheInfo {
            identity,
            tunnel_endpoint,
        };
        assert_eq!(
            e,
            BTreeMap::from([
                (p("10.199.0.11/32"), info(identity::HOST, None)),
                (p("10.200.0.1/32"), info(identity::HOST, None)),
                (p("10.199.0.12/32"), info(identity::REMOTE_NODE, None)),
                (p("10.200.1.1/32"), info(identity::REMOTE_NODE, n2)),
                (p("10.200.1.0/24"), info(identity::WORLD, n2)),
                (p("10.200.1.12/32"), info(4242, n2)),
            ])
        );
    }

    #[test]
    fn native_entries_carry_no_tunnel_endpoint_and_own_addresses_win() {
        // A remote endpoint claiming this node's address does not relabel it.
        let nodes = [node("n2", [10, 199, 0, 12], "10.200.1.0/24")];
        let endpoints = BTreeMap::from([(
            Ipv4Addr::new(10, 199, 0, 11),
            RemoteEndpoint {
                identity: Identity(4242),
                node_ip: Some(Ipv4Addr::new(10, 199, 0, 12)),
            },
        )]);
        let r = routing(RoutingMode::Native);
        let e = remote_entries(Some(&r), Some(r.node_ip), &endpoints, &nodes);
        assert!(e.values().all(|i| i.tunnel_endpoint.is_none()));
        assert_eq!(e[&p("10.199.0.11/32")].identity, identity::HOST);
        // Without routing (a store but no --routing-mode) the entries are identities only.
        let e = remote_entries(None, None, &endpoints, &nodes);
        assert_eq!(e[&p("10.199.0.11/32")].identity, 4242);
        assert_eq!(e[&p("10.199.0.12/32")].identity, identity::REMOTE_NODE);
    }

    #[test]
    fn routes_skip_nodes_without_a_cidr_and_one_claiming_ours() {
        let mut nodes = vec![
            node("n3", [10, 199, 0, 13], "10.200.2.0/24"),
            node("n2", [10, 199, 0, 12], "10.200.1.0/24"),
            node("rogue", [10, 199, 0, 66], "10.200.0.0/24"),
        ];
        nodes.push(RemoteNode {
            name: "bare".into(),
            underlay_ip: Ipv4Addr::new(10, 199, 0, 14),
            pod_cidr: None,
        });
        let routes = node_routes(&nodes, p("10.200.0.0/24"));
        assert_eq!(
            routes,
            [
                NodeRoute {
                    pod_cidr: p("10.200.1.0/24"),
                    underlay_ip: Ipv4Addr::new(10, 199, 0, 12)
                },
                NodeRoute {
                    pod_cidr: p("10.200.2.0/24"),
                    underlay_ip: Ipv4Addr::new(10, 199, 0, 13)
                },
            ]
        );
    }
}
