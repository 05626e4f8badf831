//! The agent's configuration: its command line ([`membrane_agent_api::args::AgentArgs`])
//! plus what only tests and embedders set.

use std::path::PathBuf;

use membrane_agent_api::{
    RunDir,
    args::{AgentArgs, ClusterArgs, DnsSettings, PodNetworkArgs},
};
use membrane_datapath::MapSizes;

/// Metrics port inside the node namespace (Hubble's default).
pub const METRICS_PORT: u16 = 9965;

/// First endpoint id the agent hands out (ids below are Cilium's reserved range for host
/// and health endpoints).
pub const FIRST_ENDPOINT_ID: u32 = 1001;

#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Run name: pins under `/sys/fs/bpf/membrane/NAME`, state under `/run/membrane/NAME`.
    pub name: String,
    /// The node network namespace the agent runs in and attaches programs inside.
    pub node_netns: String,
    /// Directory of policy files (YAML/JSON) to watch; `None` = API only.
    pub policy_dir: Option<PathBuf>,
    /// Proxy ports used for L7 redirects (egress; ingress is the next port).
    pub http_proxy_port: u16,
    pub dns_proxy_port: u16,
    /// Flow events kept in memory (Hubble's default ring is 4095).
    pub flow_capacity: usize,
    /// Hubble observer API on TCP inside the node namespace (`None` = Unix socket only).
    pub hubble_port: Option<u16>,
    /// Hubble's observer and Peer APIs also on this address of the host's namespace; the
    /// daemon replaces port 0 with the bound port before anything reads it.
    pub hubble_listen: Option<std::net::SocketAddr>,
    /// Prometheus `/metrics` on TCP inside the node namespace (`None` = off).
    pub metrics_port: Option<u16>,
    /// The flow page on this loopback address of the host (`None` = off; port 0 = any, the
    /// bound address is written to the run directory's `ui-addr`).
    pub ui_listen: Option<std::net::SocketAddr>,
    /// An inherited listening socket for the flow page instead of `ui_listen`.
    pub ui_listen_fd: Option<i32>,
    /// Run and supervise `membrane-proxy` (the L7 proxy) for this node.
    pub proxy: bool,
    /// The DNS proxy's knobs, passed to `membrane-proxy`.
    pub dns: DnsSettings,
    pub map_sizes: MapSizes,
    /// The cluster store (`--kvstore …`) and the cluster's and node's names. The cluster name
    /// is also the `cluster` entity's label value without a store.
    pub cluster: ClusterArgs,
    /// The node's pod CIDR and the runtime's CNI config directory (`crate::ipam`).
    pub pods: PodNetworkArgs,
}

impl AgentConfig {
    pub fn new(name: &str, node_netns: &str) -> Self {
        Self::from_args(AgentArgs::new(name, node_netns))
    }

    /// What `membrane-agent`'s command line says, with the defaults for the rest.
    pub fn from_args(args: AgentArgs) -> Self {
        Self {
            name: args.name,
            node_netns: args.node_netns,
            policy_dir: args.policy_dir,
            http_proxy_port: args.http_proxy_port,
            dns_proxy_port: args.dns_proxy_port,
            flow_capacity: args.flow_capacity,
            hubble_port: Some(membrane_observer::DEFAULT_TCP_PORT),
            hubble_listen: args.hubble_listen,
            metrics_port: Some(METRICS_PORT),
            ui_listen: args.ui_listen,
            ui_listen_fd: args.ui_listen_fd,
            proxy: !args.no_proxy,
            dns: args.dns,
            map_sizes: MapSizes::default(),
            cluster: args.cluster,
            pods: args.pods,
        }
    }

    /// This node's name in the cluster: `--node-name`, else the run name.
    pub fn node_name(&self) -> &str {
        self.cluster.node_name.as_deref().unwrap_or(&self.name)
    }

    /// Where other nodes' relays reach this node's observer: `--hubble-listen`, else
    /// `--node-ip` on the node namespace's Hubble port.
    pub fn hubble_address(&self) -> Option<std::net::SocketAddr> {
        self.hubble_listen.or_else(|| {
            Some(std::net::SocketAddr::new(
                self.cluster.node_ip?,
                self.hubble_port?,
            ))
        })
    }

    pub fn run_dir(&self) -> RunDir {
        RunDir::new(&self.name)
    }
}
