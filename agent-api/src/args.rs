//! The command lines of `membrane-agent` and `membrane-proxy`. Each binary parses its struct;
//! whoever starts the program (the lab starts agents, the agent starts its proxy) builds the
//! same struct and renders it with `to_args()`, so a spawn cannot drift from the parser (a
//! test parses every rendering back).

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use clap::{Args, Parser, ValueEnum};

/// Default HTTP proxy port for egress redirects; ingress redirects use the next one.
pub const DEFAULT_HTTP_PROXY_PORT: u16 = 15001;
/// Default transparent DNS proxy port.
pub const DEFAULT_DNS_PROXY_PORT: u16 = 15053;
/// Flows kept in the agent's ring by default (Hubble's default ring size).
pub const DEFAULT_FLOW_CAPACITY: usize = 4095;
/// Run name of the lab (and of an agent given no `--name`).
pub const DEFAULT_RUN_NAME: &str = "membrane-lab";
/// Cluster name by default (Cilium's `cluster-name` default).
pub const DEFAULT_CLUSTER_NAME: &str = "default";
/// Lease TTL of a node's keys in the cluster store by default, seconds: Cilium's
/// `KVstoreLeaseTTL` (15 min). A dead node's entries leave the other nodes this long after
/// its last keep-alive; the lab and tests use seconds.
pub const DEFAULT_KVSTORE_LEASE_TTL_SECS: i64 = 15 * 60;

/// `membrane-agent`.
#[derive(Parser, Clone, Debug, PartialEq, Eq)]
#[command(
    name = "membrane-agent",
    version,
    about = "membrane's node agent: endpoints, identities, policy and flows for one node's datapath"
)]
pub struct AgentArgs {
    /// Run name: maps and links are pinned under /sys/fs/bpf/membrane/NAME, state and the API
    /// socket live under /run/membrane/NAME.
    #[arg(long, default_value = DEFAULT_RUN_NAME)]
    pub name: String,
    /// The node network namespace the agent runs in (programs are attached inside it).
    #[arg(long)]
    pub node_netns: String,
    /// Directory of policy files (YAML or JSON, multi-document) to watch, like Cilium's static
    /// policy path. A file that does not parse keeps its previous version in force.
    #[arg(long)]
    pub policy_dir: Option<PathBuf>,
    /// Proxy port for HTTP redirects (egress; ingress uses the next port).
    #[arg(long, default_value_t = DEFAULT_HTTP_PROXY_PORT)]
    pub http_proxy_port: u16,
    /// Proxy port for DNS redirects.
    #[arg(long, default_value_t = DEFAULT_DNS_PROXY_PORT)]
    pub dns_proxy_port: u16,
    /// Flow events kept in memory.
    #[arg(long, default_value_t = DEFAULT_FLOW_CAPACITY)]
    pub flow_capacity: usize,
    #[command(flatten)]
    pub dns: DnsSettings,
    /// Serve the flow page (http://ADDR/ui: live flow table with filters, service map) and its
    /// JSON (/api/flows, /api/map) on this loopback address of the host, e.g. 127.0.0.1:9966
    /// (port 0 picks one; the address is written to /run/membrane/NAME/ui-addr). Off unless
    /// given; `membrane lab up` turns it on.
    #[arg(long, value_name = "ADDR", conflicts_with = "ui_listen_fd")]
    pub ui_listen: Option<SocketAddr>,
    /// The flow page on an inherited listening socket (how `membrane lab up` hands over the
    /// one it bound).
    #[arg(long, value_name = "FD", hide = true)]
    pub ui_listen_fd: Option<i32>,
    /// Also serve Hubble's observer and Peer APIs on this address of the host's network
    /// namespace (where the agent process runs; TCP 4244 inside the node namespace is always
    /// served). In cluster mode this is the address the node registers for the relay; port 0
    /// picks one. Without it the node registers `--node-ip`:4244.
    #[arg(long, value_name = "ADDR")]
    pub hubble_listen: Option<SocketAddr>,
    /// Run without the node proxy (`membrane-proxy`): L7 rules and DNS rules then have no
    /// proxy socket and their flows are dropped, never let through. For tests of L3/L4 and
    /// of the cluster store.
    #[arg(long)]
    pub no_proxy: bool,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub pods: PodNetworkArgs,
}

/// The cluster store (Cilium's `kvstore` flags). Without `--kvstore` the agent runs one
/// node on its own: identities are allocated locally and nothing is shared.
#[derive(Clone, Debug, PartialEq, Eq, Args)]
pub struct ClusterArgs {
    /// The cluster store: `etcd`. With it, endpoint identities are allocated cluster-wide,
    /// endpoints are published to (and other nodes' read from) the cluster ipcache, the node
    /// registers, and `policy apply|delete` go through the store.
    #[arg(long, value_enum, requires = "kvstore_endpoints")]
    pub kvstore: Option<KvstoreKind>,
    /// etcd client URLs, comma-separated (`http://10.0.0.1:2379`, `https://…` with TLS).
    #[arg(
        long,
        value_name = "URL,...",
        value_delimiter = ',',
        requires = "kvstore"
    )]
    pub kvstore_endpoints: Vec<String>,
    /// CA bundle (PEM) that signs the etcd servers' certificates; turns TLS on.
    #[arg(long, value_name = "FILE", requires = "kvstore")]
    pub kvstore_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's `--client-cert-auth`.
    #[arg(long, value_name = "FILE", requires_all = ["kvstore_ca", "kvstore_key"])]
    pub kvstore_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "kvstore_cert")]
    pub kvstore_key: Option<PathBuf>,
    /// Lease TTL of this node's keys in the store, seconds (≥ 2): a node that dies leaves
    /// the others' ipcache this long after its last keep-alive.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_KVSTORE_LEASE_TTL_SECS)]
    pub kvstore_lease_ttl: i64,
    /// Cluster name: a path element of the store's keys, and the `cluster` entity's label.
    #[arg(long, value_name = "NAME", default_value = DEFAULT_CLUSTER_NAME)]
    pub cluster_name: String,
    /// This node's name in the cluster (default: the run name).
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,
    /// This node's underlay address (how other nodes reach its pods). The node registers in
    /// the store only with it; ipcache entries name it as their host.
    #[arg(long, value_name = "IP")]
    pub node_ip: Option<IpAddr>,
    /// The cluster's pod address pool, comma-separated CIDRs (Helm's
    /// `ipam.operator.clusterPoolIPv4PodCIDRList`): each node gets a block of it.
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',', value_parser = parse_ipv4_cidr)]
    pub cluster_pool_ipv4_cidr: Vec<String>,
    /// Prefix length of each node's block of the pool (Helm's
    /// `ipam.operator.clusterPoolIPv4MaskSize`).
    #[arg(long, value_name = "LEN", default_value_t = DEFAULT_CLUSTER_POOL_MASK_SIZE)]
    pub cluster_pool_ipv4_mask_size: u8,
    /// How pod traffic reaches other nodes (Cilium's `routing-mode`): `tunnel` (VXLAN on UDP
    /// 8472, the source identity in the VNI) or `native` (routes to each node's pod CIDR via
    /// its underlay address). Needs `--kvstore`, `--node-ip` and a pod CIDR. Without it the
    /// agent leaves the node's routes and devices alone (single node, or routing done by
    /// someone else).
    #[arg(long, value_enum, value_name = "MODE", requires = "kvstore")]
    pub routing_mode: Option<RoutingModeArg>,
}

/// Default block size of the cluster pool: a /24 per node (Cilium's default).
pub const DEFAULT_CLUSTER_POOL_MASK_SIZE: u8 = 24;

/// Values of `--routing-mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RoutingModeArg {
    /// VXLAN between nodes, the source identity in the VNI.
    Tunnel,
    /// Plain routes between nodes; identities from the ipcache.
    Native,
}

impl RoutingModeArg {
    pub fn as_str(self) -> &'static str {
        match self {
            RoutingModeArg::Tunnel => "tunnel",
            RoutingModeArg::Native => "native",
        }
    }
}

/// Checks `a.b.c.d/len` (no host bits) and returns it as written.
pub fn parse_ipv4_cidr(s: &str) -> Result<String, String> {
    let (addr, len) = s
        .split_once('/')
        .ok_or_else(|| format!("`{s}` is not a.b.c.d/len"))?;
    let addr: std::net::Ipv4Addr = addr
        .parse()
        .map_err(|_| format!("`{s}`: `{addr}` is not an IPv4 address"))?;
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| *l <= 32)
        .ok_or_else(|| format!("`{s}`: the prefix length must be 0-32"))?;
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    };
    if u32::from(addr) & !mask != 0 {
        return Err(format!(
            "`{s}` has host bits set; did you mean {}/{len}?",
            std::net::Ipv4Addr::from(u32::from(addr) & mask)
        ));
    }
    Ok(s.to_owned())
}

/// Kinds of cluster store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KvstoreKind {
    /// etcd v3.
    Etcd,
}

impl Default for ClusterArgs {
    fn default() -> Self {
        Self {
            kvstore: None,
            kvstore_endpoints: Vec::new(),
            kvstore_ca: None,
            kvstore_cert: None,
            kvstore_key: None,
            kvstore_lease_ttl: DEFAULT_KVSTORE_LEASE_TTL_SECS,
            cluster_name: DEFAULT_CLUSTER_NAME.to_owned(),
            node_name: None,
            node_ip: None,
            cluster_pool_ipv4_cidr: Vec::new(),
            cluster_pool_ipv4_mask_size: DEFAULT_CLUSTER_POOL_MASK_SIZE,
            routing_mode: None,
        }
    }
}

impl ClusterArgs {
    /// The arguments that parse back into `self`.
    pub fn to_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(KvstoreKind::Etcd) = self.kvstore {
            out.extend(["--kvstore".into(), "etcd".into()]);
        }
        if !self.kvstore_endpoints.is_empty() {
            out.extend([
                "--kvstore-endpoints".into(),
                self.kvstore_endpoints.join(","),
            ]);
        }
        for (flag, file) in [
            ("--kvstore-ca", &self.kvstore_ca),
            ("--kvstore-cert", &self.kvstore_cert),
            ("--kvstore-key", &self.kvstore_key),
        ] {
            if let Some(f) = file {
                out.extend([flag.to_owned(), f.display().to_string()]);
            }
        }
        out.extend([
            "--kvstore-lease-ttl".into(),
            self.kvstore_lease_ttl.to_string(),
            "--cluster-name".into(),
            self.cluster_name.clone(),
        ]);
        if let Some(n) = &self.node_name {
            out.extend(["--node-name".into(), n.clone()]);
        }
        if let Some(ip) = self.node_ip {
            out.extend(["--node-ip".into(), ip.to_string()]);
        }
        if !self.cluster_pool_ipv4_cidr.is_empty() {
            out.extend([
                "--cluster-pool-ipv4-cidr".into(),
                self.cluster_pool_ipv4_cidr.join(","),
            ]);
        }
        // Only when it says something: a command line without a pool keeps its short form
        // (the Helm chart's DaemonSet args are compared with this rendering).
        if !self.cluster_pool_ipv4_cidr.is_empty()
            || self.cluster_pool_ipv4_mask_size != DEFAULT_CLUSTER_POOL_MASK_SIZE
        {
            out.extend([
                "--cluster-pool-ipv4-mask-size".into(),
                self.cluster_pool_ipv4_mask_size.to_string(),
            ]);
        }
        if let Some(m) = self.routing_mode {
            out.extend(["--routing-mode".into(), m.as_str().into()]);
        }
        out
    }
}

impl AgentArgs {
    /// The defaults for a node namespace.
    pub fn new(name: &str, node_netns: &str) -> Self {
        Self {
            name: name.to_owned(),
            node_netns: node_netns.to_owned(),
            policy_dir: None,
            http_proxy_port: DEFAULT_HTTP_PROXY_PORT,
            dns_proxy_port: DEFAULT_DNS_PROXY_PORT,
            flow_capacity: DEFAULT_FLOW_CAPACITY,
            dns: DnsSettings::default(),
            ui_listen: None,
            ui_listen_fd: None,
            hubble_listen: None,
            no_proxy: false,
            cluster: ClusterArgs::default(),
            pods: PodNetworkArgs::default(),
        }
    }

    /// The arguments that make `membrane-agent` parse exactly `self`.
    pub fn to_args(&self) -> Vec<String> {
        let mut out = vec![
            "--name".into(),
            self.name.clone(),
            "--node-netns".into(),
            self.node_netns.clone(),
        ];
        if let Some(dir) = &self.policy_dir {
            out.extend(["--policy-dir".into(), dir.display().to_string()]);
        }
        out.extend([
            "--http-proxy-port".into(),
            self.http_proxy_port.to_string(),
            "--dns-proxy-port".into(),
            self.dns_proxy_port.to_string(),
            "--flow-capacity".into(),
            self.flow_capacity.to_string(),
        ]);
        out.extend(self.dns.to_args());
        if let Some(addr) = self.ui_listen {
            out.extend(["--ui-listen".into(), addr.to_string()]);
        }
        if let Some(fd) = self.ui_listen_fd {
            out.extend(["--ui-listen-fd".into(), fd.to_string()]);
        }
        if let Some(addr) = self.hubble_listen {
            out.extend(["--hubble-listen".into(), addr.to_string()]);
        }
        if self.no_proxy {
            out.push("--no-proxy".into());
        }
        out.extend(self.cluster.to_args());
        out.extend(self.pods.to_args());
        out
    }
}

/// Pods on this node: the block their addresses come from and where the agent announces
/// itself to the container runtime (the CNI plugin `membrane-cni` asks the agent for both).
#[derive(Clone, Debug, Default, PartialEq, Eq, Args)]
pub struct PodNetworkArgs {
    /// The node's pod CIDR (IPv4, at most /30): `membrane-cni` gets pod addresses from it,
    /// the network, first (router) and broadcast addresses excepted.
    #[arg(long, value_name = "CIDR", value_parser = parse_pod_cidr)]
    pub pod_cidr: Option<membrane_policy::IpPrefix>,
    /// The container runtime's CNI config directory: the agent writes
    /// `05-membrane.conflist` there once it serves the API and has a pod CIDR, and removes it
    /// when it stops.
    #[arg(long, value_name = "DIR")]
    pub cni_conf_dir: Option<PathBuf>,
}

impl PodNetworkArgs {
    pub fn to_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(cidr) = &self.pod_cidr {
            out.extend(["--pod-cidr".into(), cidr.to_string()]);
        }
        if let Some(dir) = &self.cni_conf_dir {
            out.extend(["--cni-conf-dir".into(), dir.display().to_string()]);
        }
        out
    }
}

/// `--pod-cidr`: an IPv4 network without host bits, with room for a pod (≤ /30).
fn parse_pod_cidr(text: &str) -> Result<membrane_policy::IpPrefix, String> {
    let prefix = membrane_policy::IpPrefix::parse_strict(text).map_err(|e| e.to_string())?;
    if !prefix.is_ipv4() {
        return Err(format!(
            "`{text}` is not IPv4 (pods get IPv4 addresses only)"
        ));
    }
    if prefix.prefix_len() > 30 {
        return Err(format!(
            "`{text}` has no room for a pod besides its network, router and broadcast addresses (use /30 or shorter)"
        ));
    }
    Ok(prefix)
}

/// DNS proxy settings (Cilium's `tofqdns-*` flags), the same flags on `membrane-agent` and
/// `membrane-proxy`.
#[derive(Clone, Debug, PartialEq, Eq, Args)]
pub struct DnsSettings {
    /// The DNS proxy's reply to a denied query: `refused` (Cilium's default) or `nxdomain`
    /// (musl resolvers stop walking the search list on REFUSED).
    #[arg(long = "dns-deny-response", default_value = "refused", value_parser = ["refused", "nxdomain"])]
    pub deny_response: String,
    /// Lower bound of the TTL an address learned from a DNS answer is kept for, seconds
    /// (Cilium's tofqdns-min-ttl).
    #[arg(long = "fqdn-min-ttl", default_value_t = 0)]
    pub min_ttl: u32,
    /// At most this many addresses of one answer are learned
    /// (tofqdns-endpoint-max-ip-per-hostname).
    #[arg(long = "fqdn-max-ips-per-name", default_value_t = 1000)]
    pub max_ips_per_name: usize,
    /// How long an allowed answer is held for its addresses to reach the maps, milliseconds;
    /// an overrun releases it and is counted (tofqdns-proxy-response-max-delay).
    #[arg(long = "fqdn-response-max-delay-ms", default_value_t = 100)]
    pub response_max_delay_ms: u64,
}

impl Default for DnsSettings {
    fn default() -> Self {
        Self {
            deny_response: "refused".into(),
            min_ttl: 0,
            max_ips_per_name: 1000,
            response_max_delay_ms: 100,
        }
    }
}

impl DnsSettings {
    pub fn to_args(&self) -> Vec<String> {
        vec![
            "--dns-deny-response".into(),
            self.deny_response.clone(),
            "--fqdn-min-ttl".into(),
            self.min_ttl.to_string(),
            "--fqdn-max-ips-per-name".into(),
            self.max_ips_per_name.to_string(),
            "--fqdn-response-max-delay-ms".into(),
            self.response_max_delay_ms.to_string(),
        ]
    }
}

/// `membrane-proxy`, the node's transparent L7 proxy (started and supervised by the agent).
#[derive(Parser, Clone, Debug, PartialEq, Eq)]
#[command(
    name = "membrane-proxy",
    version,
    about = "membrane's transparent L7 proxy for the flows the datapath redirects"
)]
pub struct ProxyArgs {
    /// The node network namespace (where redirected flows are delivered).
    #[arg(long)]
    pub node_netns: String,
    /// Pin directory of the datapath's maps (the ipcache is read for identities).
    #[arg(long)]
    pub pin_dir: PathBuf,
    /// Where the proxy keeps the last HTTP policy it applied: restored at start, so a
    /// proxy restarted while the agent is away serves by it; rewritten on every change.
    #[arg(long)]
    pub snapshot: PathBuf,
    /// The agent's proxy channel (a Unix socket): the proxy connects, says what it holds and
    /// is sent the policy (incrementally), the DNS rules and the filters. Without it the
    /// saved configuration is served unchanged.
    #[arg(long)]
    pub agent_channel: Option<PathBuf>,
    /// Port of the listener for flows leaving local endpoints.
    #[arg(long, default_value_t = DEFAULT_HTTP_PROXY_PORT)]
    pub egress_port: u16,
    /// Port of the listener for flows entering local endpoints.
    #[arg(long, default_value_t = DEFAULT_HTTP_PROXY_PORT + 1)]
    pub ingress_port: u16,
    /// The agent's record socket (Unix datagram); without it, records go to stdout.
    #[arg(long)]
    pub records_socket: Option<PathBuf>,
    /// Serve DNS on the inherited descriptors 3 (UDP) and 4 (TCP): the transparent
    /// listeners the agent keeps open across proxy restarts.
    #[arg(long, conflicts_with = "dns_port")]
    pub dns_fds: bool,
    /// Serve DNS on this port (UDP and TCP, transparent) instead.
    #[arg(long)]
    pub dns_port: Option<u16>,
    /// Where the proxy keeps the last DNS rules it applied (restored at start).
    #[arg(long)]
    pub dns_snapshot: Option<PathBuf>,
    #[command(flatten)]
    pub dns: DnsSettings,
    /// Where the proxy keeps the last `WasmFilter` attachments it applied (restored at start).
    #[arg(long)]
    pub filter_snapshot: Option<PathBuf>,
    /// The agent's API socket: answers with addresses are held until the agent has mapped
    /// them to `fqdn:` identities. Without it, nothing is learned.
    #[arg(long)]
    pub agent_socket: Option<PathBuf>,
}

/// Inherited descriptor of the DNS proxy's UDP listener in a proxy started with `--dns-fds`.
pub const DNS_UDP_FD: i32 = 3;
/// Inherited descriptor of the DNS proxy's TCP listener.
pub const DNS_TCP_FD: i32 = 4;

impl ProxyArgs {
    /// The arguments that make `membrane-proxy` parse exactly `self`.
    pub fn to_args(&self) -> Vec<String> {
        let mut out = vec![
            "--node-netns".into(),
            self.node_netns.clone(),
            "--pin-dir".into(),
            self.pin_dir.display().to_string(),
            "--snapshot".into(),
            self.snapshot.display().to_string(),
        ];
        let path = |flag: &str, p: &Option<PathBuf>, out: &mut Vec<String>| {
            if let Some(p) = p {
                out.extend([flag.to_owned(), p.display().to_string()]);
            }
        };
        path("--agent-channel", &self.agent_channel, &mut out);
        out.extend([
            "--egress-port".into(),
            self.egress_port.to_string(),
            "--ingress-port".into(),
            self.ingress_port.to_string(),
        ]);
        path("--records-socket", &self.records_socket, &mut out);
        if self.dns_fds {
            out.push("--dns-fds".into());
        }
        if let Some(port) = self.dns_port {
            out.extend(["--dns-port".into(), port.to_string()]);
        }
        path("--dns-snapshot", &self.dns_snapshot, &mut out);
        out.extend(self.dns.to_args());
        path("--filter-snapshot", &self.filter_snapshot, &mut out);
        path("--agent-socket", &self.agent_socket, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse<P: Parser>(program: &str, args: Vec<String>) -> P {
        P::try_parse_from(std::iter::once(program.to_owned()).chain(args))
            .unwrap_or_else(|e| panic!("{program} does not parse its own rendering: {e}"))
    }

    #[test]
    fn agent_args_render_what_the_parser_reads() {
        let mut args = AgentArgs::new("lab-x", "lab-x-node");
        assert_eq!(parse::<AgentArgs>("membrane-agent", args.to_args()), args);
        args.policy_dir = Some("/run/membrane/lab-x/policies".into());
        args.http_proxy_port = 16001;
        args.dns_proxy_port = 16053;
        args.flow_capacity = 10;
        args.dns.deny_response = "nxdomain".into();
        args.dns.min_ttl = 7;
        args.ui_listen_fd = Some(9);
        assert_eq!(parse::<AgentArgs>("membrane-agent", args.to_args()), args);
        args.ui_listen_fd = None;
        args.ui_listen = Some("127.0.0.1:0".parse().expect("addr"));
        assert_eq!(parse::<AgentArgs>("membrane-agent", args.to_args()), args);
        args.hubble_listen = Some("127.0.0.1:4244".parse().expect("addr"));
        assert_eq!(parse::<AgentArgs>("membrane-agent", args.to_args()), args);
        args.no_proxy = true;
        args.cluster = ClusterArgs {
            kvstore: Some(KvstoreKind::Etcd),
            kvstore_endpoints: vec![
                "https://10.0.0.1:2379".into(),
                "https://10.0.0.2:2379".into(),
            ],
            kvstore_ca: Some("/etc/membrane/etcd/ca.crt".into()),
            kvstore_cert: Some("/etc/membrane/etcd/client.crt".into()),
            kvstore_key: Some("/etc/membrane/etcd/client.key".into()),
            kvstore_lease_ttl: 5,
            cluster_name: "east".into(),
            node_name: Some("node-1".into()),
            node_ip: Some("192.168.0.11".parse().expect("ip")),
            cluster_pool_ipv4_cidr: vec!["10.200.0.0/16".into(), "10.201.0.0/16".into()],
            cluster_pool_ipv4_mask_size: 26,
            routing_mode: Some(RoutingModeArg::Native),
        };
        assert_eq!(parse::<AgentArgs>("membrane-agent", args.to_args()), args);
        args.cluster.routing_mode = Some(RoutingModeArg::Tunnel);
        assert_eq!(parse::<AgentArgs>("membrane-agent", args.to_args()), args);
        args.cluster.kvstore_ca = None;
        args.cluster.kvstore_cert = None;
        args.cluster.kvstore_key = None;
        args.cluster.node_ip = None;
        assert_eq!(parse::<AgentArgs>("membrane-agent", args.to_args()), args);
        args.pods.pod_cidr = Some("10.244.1.0/24".parse().expect("cidr"));
        args.pods.cni_conf_dir = Some("/etc/cni/net.d".into());
        assert_eq!(parse::<AgentArgs>("membrane-agent", args.to_args()), args);
    }

    #[test]
    fn pod_cidr_is_checked() {
        let parse = |cidr: &str| {
            AgentArgs::try_parse_from(["membrane-agent", "--node-netns", "n", "--pod-cidr", cidr])
        };
        assert!(parse("10.244.1.0/24").is_ok());
        for bad in [
            "10.244.1.1/24",
            "10.244.1.0/31",
            "fd00::/64",
            "10.244.1.0",
            "x/24",
        ] {
            let e = parse(bad).expect_err(bad).to_string();
            assert!(e.contains("--pod-cidr") && e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn cidrs_are_checked_where_given() {
        assert_eq!(parse_ipv4_cidr("10.200.1.0/24"), Ok("10.200.1.0/24".into()));
        let host_bits = parse_ipv4_cidr("10.200.1.5/24").expect_err("host bits");
        assert!(
            host_bits.contains("did you mean 10.200.1.0/24"),
            "{host_bits}"
        );
        assert!(parse_ipv4_cidr("10.200.1.0").is_err());
        assert!(parse_ipv4_cidr("10.200.1.0/33").is_err());
        assert!(parse_ipv4_cidr("10.300.1.0/24").is_err());
        let e = AgentArgs::try_parse_from([
            "membrane-agent",
            "--node-netns",
            "n",
            "--pod-cidr",
            "10.1.1.1/16",
        ])
        .expect_err("bad pod CIDR");
        assert!(e.to_string().contains("--pod-cidr"), "{e}");
    }

    #[test]
    fn kvstore_flags_need_each_other() {
        let parse = |extra: &[&str]| {
            AgentArgs::try_parse_from(
                ["membrane-agent", "--node-netns", "n"]
                    .into_iter()
                    .chain(extra.iter().copied()),
            )
        };
        assert!(parse(&["--kvstore", "etcd"]).is_err(), "endpoints required");
        assert!(parse(&["--kvstore-endpoints", "http://e:2379"]).is_err());
        assert!(
            parse(&[
                "--kvstore",
                "consul",
                "--kvstore-endpoints",
                "http://e:2379"
            ])
            .is_err()
        );
        let ok = parse(&[
            "--kvstore",
            "etcd",
            "--kvstore-endpoints",
            "http://a:2379,http://b:2379",
        ])
        .expect("parses");
        assert_eq!(ok.cluster.kvstore_endpoints.len(), 2);
        assert!(
            parse(&[
                "--kvstore",
                "etcd",
                "--kvstore-endpoints",
                "http://e:2379",
                "--kvstore-cert",
                "c"
            ])
            .is_err(),
            "a certificate needs its key and a CA"
        );
    }

    #[test]
    fn proxy_args_render_what_the_parser_reads() {
        let run = crate::RunDir::new("lab-x");
        let mut args = ProxyArgs {
            node_netns: "lab-x".into(),
            pin_dir: "/sys/fs/bpf/membrane/lab-x".into(),
            snapshot: run.proxy_policy_snapshot(),
            agent_channel: None,
            egress_port: 15001,
            ingress_port: 15002,
            records_socket: None,
            dns_fds: false,
            dns_port: None,
            dns_snapshot: None,
            dns: DnsSettings::default(),
            filter_snapshot: None,
            agent_socket: None,
        };
        assert_eq!(parse::<ProxyArgs>("membrane-proxy", args.to_args()), args);
        args.agent_channel = Some(run.proxy_channel());
        args.records_socket = Some(run.proxy_records());
        args.dns_fds = true;
        args.dns_snapshot = Some(run.proxy_dns_snapshot());
        args.filter_snapshot = Some(run.proxy_filter_snapshot());
        args.agent_socket = Some(run.agent_socket());
        args.dns.max_ips_per_name = 3;
        assert_eq!(parse::<ProxyArgs>("membrane-proxy", args.to_args()), args);
        args.dns_fds = false;
        args.dns_port = Some(5353);
        assert_eq!(parse::<ProxyArgs>("membrane-proxy", args.to_args()), args);
    }
}
