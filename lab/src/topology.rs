//! Lab topologies: which pods, world hosts and cluster DNS a lab has (`membrane lab up
//! [--topology FILE]`, YAML; the built-in default is `examples/lab/seed-topology.yaml`), and the
//! builder that turns one into namespaces, veths, routes, servers and registered endpoints.
//! `membrane lab` and `membrane connectivity test` both build through [`build`].
//!
//! Layout of a built topology named `NAME` (nothing in the root namespace):
//!
//! ```text
//!  netns NAME (the node)        lxc-<pod> ─veth─ eth0 <pod ip>    netns NAME-<pod>
//!    default via 169.254.2.2    uplink 169.254.2.1/30 ─veth─ eth0 169.254.2.2/30  netns NAME-world (router)
//!                                  w-<host> ─veth─ eth0 <host ip>  netns NAME-world-<host>
//!                                     + pool routes: <cidr> via <host ip>; on the host: local <cidr> dev lo
//! ```
//!
//! Pods are endpoints of the agent (the datapath's programs sit on their `lxc-*` veths). World
//! hosts sit behind the node's `uplink`, which carries no endpoint programs, as traffic leaving a
//! real node does; pods reach them through the node's default route, the replies come back
//! through conntrack. A pool is an AnyIP route (`ip route add local CIDR dev lo`) inside the
//! world host's namespace, so the host answers on every address of it.
//!
//! Pod namespaces get `/etc/netns/NAME-<pod>/resolv.conf` (the cluster DNS pod's address, the
//! pod namespace's search path, `ndots:5`), which `ip netns exec` bind-mounts over
//! `/etc/resolv.conf` for commands run in the pod.
//!
//! Parsing never panics: a bad file is an error naming the file, the field path and the value.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    str::FromStr,
};

use membrane_agent_api::{
    Client, RunDir, api::EndpointSpec, args::RoutingModeArg, run_dir::STATE_ROOT,
};
use membrane_datapath::{Netns, plumbing::Node};
use serde::{Deserialize, Serialize};

use crate::{
    lab::{self, LabError},
    lab_dns::{DEFAULT_TTL, Zone, ZonePool},
};

/// The seed guide's topology, the default of `membrane lab up`.
pub const SEED_TOPOLOGY: &str = include_str!("../../examples/lab/seed-topology.yaml");

/// The cluster's DNS domain (Kubernetes' default).
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// Directory whose per-namespace files `ip netns exec` bind-mounts over `/etc`.
pub const ETC_NETNS: &str = "/etc/netns";
/// The node's end of the uplink, and the world router's.
pub const UPLINK_NODE: Ipv4Addr = Ipv4Addr::new(169, 254, 2, 1);
pub const UPLINK_ROUTER: Ipv4Addr = Ipv4Addr::new(169, 254, 2, 2);
/// The node's interface towards the world.
pub const UPLINK_IFNAME: &str = "uplink";

/// Most nodes a lab has.
pub const MAX_NODES: u32 = 16;

/// An IPv4 prefix, written `a.b.c.d/len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Cidr {
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }

    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    /// Number of addresses (saturating at `u32::MAX` for /0).
    pub fn size(&self) -> u32 {
        1u32.checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(u32::MAX)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network())
    }

    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.contains(other.network()) || other.contains(self.network())
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network(), self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not a CIDR (a.b.c.d/len)"))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("`{s}`: `{addr}` is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("`{s}`: the prefix length must be 0-32"))?;
        let cidr = Self { addr, prefix };
        if cidr.network() != addr {
            return Err(format!("`{s}` has host bits set (the network is {})", cidr));
        }
        Ok(cidr)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A lab topology file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Topology {
    /// Every pod address is in this prefix (the `cluster` side of `toEntities`): the
    /// cluster pool, of which node N has the N-th block of `podCIDRMaskSize`.
    #[serde(rename = "podCIDR")]
    pub pod_cidr: Cidr,
    /// Prefix length of each node's block of `podCIDR` (default 24, or podCIDR's own
    /// length when that is longer).
    #[serde(rename = "podCIDRMaskSize", default)]
    pub pod_cidr_mask_size: Option<u8>,
    #[serde(default)]
    pub dns: DnsSettings,
    pub pods: Vec<PodSpec>,
    #[serde(default)]
    pub world: Vec<WorldHost>,
    /// Servers in the node namespace itself (the `host` entity).
    #[serde(default)]
    pub node: NodeSpec,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsSettings {
    /// TTL of the lab DNS's answers, in seconds (default 30).
    #[serde(default = "default_ttl")]
    pub ttl: u32,
}

impl Default for DnsSettings {
    fn default() -> Self {
        Self { ttl: DEFAULT_TTL }
    }
}

fn default_ttl() -> u32 {
    DEFAULT_TTL
}

fn default_node() -> u32 {
    1
}

fn default_namespace() -> String {
    "default".to_owned()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PodSpec {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub ip: Ipv4Addr,
    #[serde(default)]
    pub serve: Vec<Serve>,
    /// This pod runs the lab's cluster DNS on 53/UDP and 53/TCP.
    #[serde(default, rename = "clusterDNS")]
    pub cluster_dns: bool,
    /// The node the pod runs on, 1-based (default 1); its address is in that node's block.
    /// With fewer nodes (`lab up --nodes`), pods of the missing nodes run on the last one,
    /// keeping their addresses.
    #[serde(default = "default_node")]
    pub node: u32,
}

/// An HTTP server on one port.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Serve {
    pub port: u16,
    /// Body of the 200 answers (default: `hello from <name>`).
    pub body: Option<String>,
    /// Path prefixes answered 200; others get 404 (default: every path).
    #[serde(default)]
    pub paths: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorldHost {
    pub name: String,
    pub ip: Ipv4Addr,
    /// DNS names answered with `ip`.
    #[serde(default)]
    pub names: Vec<String>,
    #[serde(default)]
    pub pools: Vec<ZonePool>,
    #[serde(default)]
    pub serve: Vec<Serve>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    #[serde(default)]
    pub serve: Vec<Serve>,
}

#[derive(Debug, thiserror::Error)]
#[error("topology {source_name}: {detail}")]
pub struct TopologyError {
    pub source_name: String,
    pub detail: String,
}

impl Topology {
    /// The built-in seed topology.
    pub fn seed() -> Self {
        // The seed is compiled in and checked by a unit test; failing here is a build defect.
        Self::parse(SEED_TOPOLOGY, "built-in seed topology")
            .unwrap_or_else(|e| unreachable!("the seed topology is valid: {e}"))
    }

    /// Reads and validates a topology file.
    pub fn load(path: &Path) -> Result<Self, TopologyError> {
        let text = std::fs::read_to_string(path).map_err(|e| TopologyError {
            source_name: path.display().to_string(),
            detail: e.to_string(),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates topology YAML; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<Self, TopologyError> {
        let err = |detail: String| TopologyError {
            source_name: source.to_owned(),
            detail,
        };
        let topology: Topology = serde_yaml_ng::from_str(text).map_err(|e| err(e.to_string()))?;
        let problems = topology.problems();
        if problems.is_empty() {
            Ok(topology)
        } else {
            Err(err(problems.join("; ")))
        }
    }

    /// Everything wrong with the topology, each as `field.path: message`.
    fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut p = |field: String, msg: String| out.push(format!("{field}: {msg}"));
        if self.pods.is_empty() {
            p("pods".into(), "at least one pod is needed".into());
        }
        if self.pod_cidr.prefix() < 8 || self.pod_cidr.prefix() > 30 {
            p(
                "podCIDR".into(),
                format!("{}: use a prefix length of 8-30", self.pod_cidr),
            );
        }
        if self.mask_size() < self.pod_cidr.prefix() || self.mask_size() > 30 {
            p(
                "podCIDRMaskSize".into(),
                format!(
                    "{}: use {}-30 (a block of podCIDR {} per node)",
                    self.mask_size(),
                    self.pod_cidr.prefix(),
                    self.pod_cidr
                ),
            );
        }
        if self.dns.ttl > 604_800 {
            p(
                "dns.ttl".into(),
                format!("{} s is over a week", self.dns.ttl),
            );
        }
        let mut ips: HashMap<Ipv4Addr, String> = HashMap::new();
        let mut pod_names: HashMap<&str, String> = HashMap::new();
        let mut ifnames: HashMap<String, String> = HashMap::new();
        let mut dns_pods = Vec::new();
        for (i, pod) in self.pods.iter().enumerate() {
            let at = format!("pods[{i}]");
            if let Err(e) = check_label(&pod.name) {
                p(format!("{at}.name"), e);
            } else if pod.name == "underlay"
                || pod
                    .name
                    .strip_prefix("node")
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            {
                p(
                    format!("{at}.name"),
                    format!(
                        "`{}`: `underlay` and `nodeN` name the lab's node namespaces",
                        pod.name
                    ),
                );
            } else if pod.name == "world" || pod.name.starts_with("world-") {
                p(
                    format!("{at}.name"),
                    format!(
                        "`{}`: `world` and `world-*` name the world's namespaces",
                        pod.name
                    ),
                );
            }
            if let Some(other) = pod_names.insert(&pod.name, at.clone()) {
                p(
                    format!("{at}.name"),
                    format!(
                        "`{}` is also {other}.name (pod names are unique across namespaces)",
                        pod.name
                    ),
                );
            }
            if let Some(other) = ifnames.insert(host_ifname(&pod.name), at.clone()) {
                p(
                    format!("{at}.name"),
                    format!(
                        "`{}` and {other}.name give the same interface name {} (15 characters at most)",
                        pod.name,
                        host_ifname(&pod.name)
                    ),
                );
            }
            if let Err(e) = check_label(&pod.namespace) {
                p(format!("{at}.namespace"), e);
            }
            for (k, v) in &pod.labels {
                if let Err(e) = check_label_pair(k, v) {
                    p(format!("{at}.labels.{k}"), e);
                }
            }
            if !self.pod_cidr.contains(pod.ip) {
                p(
                    format!("{at}.ip"),
                    format!("{} is outside podCIDR {}", pod.ip, self.pod_cidr),
                );
            } else if pod.ip == self.pod_cidr.network() {
                p(
                    format!("{at}.ip"),
                    format!("{} is podCIDR's network address", pod.ip),
                );
            }
            if pod.node == 0 || pod.node > MAX_NODES {
                p(
                    format!("{at}.node"),
                    format!("{}: nodes are numbered 1-{MAX_NODES}", pod.node),
                );
            } else if let Some(block) = self.node_block(pod.node)
                && self.pod_cidr.contains(pod.ip)
            {
                if !block.contains(pod.ip) {
                    p(
                        format!("{at}.ip"),
                        format!(
                            "{} is outside node {}'s block {block} of podCIDR",
                            pod.ip, pod.node
                        ),
                    );
                } else if pod.ip == block.network()
                    || u32::from(pod.ip) == u32::from(block.network()) + 1
                {
                    p(
                        format!("{at}.ip"),
                        format!(
                            "{} is node {}'s network or router address",
                            pod.ip, pod.node
                        ),
                    );
                }
            }
            if let Some(other) = ips.insert(pod.ip, at.clone()) {
                p(format!("{at}.ip"), format!("{} is also {other}'s", pod.ip));
            }
            check_serves(&pod.serve, &format!("{at}.serve"), &mut p);
            if pod.cluster_dns {
                dns_pods.push(at.clone());
                if let Some(s) = pod.serve.iter().position(|s| s.port == 53) {
                    p(
                        format!("{at}.serve[{s}].port"),
                        "53 is the cluster DNS's port on this pod".into(),
                    );
                }
            }
        }
        if dns_pods.len() > 1 {
            p(
                format!("{}.clusterDNS", dns_pods[1]),
                format!("{} is the cluster DNS already (one at most)", dns_pods[0]),
            );
        }
        let mut world_names: HashMap<&str, String> = HashMap::new();
        let mut world_ifnames: HashMap<String, String> = HashMap::new();
        let mut dns_names: HashMap<String, String> = HashMap::new();
        let mut pools: Vec<(Cidr, String)> = Vec::new();
        for (i, host) in self.world.iter().enumerate() {
            let at = format!("world[{i}]");
            if let Err(e) = check_label(&host.name) {
                p(format!("{at}.name"), e);
            }
            if let Some(other) = world_names.insert(&host.name, at.clone()) {
                p(
                    format!("{at}.name"),
                    format!("`{}` is also {other}.name", host.name),
                );
            }
            if let Some(other) = world_ifnames.insert(world_ifname(&host.name), at.clone()) {
                p(
                    format!("{at}.name"),
                    format!(
                        "`{}` and {other}.name give the same interface name {}",
                        host.name,
                        world_ifname(&host.name)
                    ),
                );
            }
            if self.pod_cidr.contains(host.ip) {
                p(
                    format!("{at}.ip"),
                    format!(
                        "{} is inside podCIDR {} (world hosts are outside the cluster)",
                        host.ip, self.pod_cidr
                    ),
                );
            }
            if host.ip.is_loopback() || host.ip.is_link_local() || host.ip.is_unspecified() {
                p(
                    format!("{at}.ip"),
                    format!("{} is not a routable host address", host.ip),
                );
            }
            if let Some(other) = ips.insert(host.ip, at.clone()) {
                p(format!("{at}.ip"), format!("{} is also {other}'s", host.ip));
            }
            for (j, name) in host.names.iter().enumerate() {
                let field = format!("{at}.names[{j}]");
                let lower = name.trim_end_matches('.').to_ascii_lowercase();
                if let Err(e) = check_dns_name(&lower) {
                    p(field, e);
                } else if lower == CLUSTER_DOMAIN || lower.ends_with(".cluster.local") {
                    p(
                        field,
                        format!("`{name}` is in the cluster's domain (pods get those names)"),
                    );
                } else if let Some(other) = dns_names.insert(lower, field.clone()) {
                    p(field, format!("`{name}` is also {other}"));
                }
            }
            for (j, pool) in host.pools.iter().enumerate() {
                let field = format!("{at}.pools[{j}]");
                if let Err(e) = check_dns_name(&pool.suffix) {
                    p(format!("{field}.suffix"), e);
                } else if pool.suffix == CLUSTER_DOMAIN || pool.suffix.ends_with(".cluster.local") {
                    p(
                        format!("{field}.suffix"),
                        format!("`{}` is in the cluster's domain", pool.suffix),
                    );
                }
                if pool.cidr.prefix() < 12 || pool.cidr.prefix() > 30 {
                    p(
                        format!("{field}.cidr"),
                        format!("{}: use a prefix length of 12-30", pool.cidr),
                    );
                }
                if pool.cidr.overlaps(&self.pod_cidr) {
                    p(
                        format!("{field}.cidr"),
                        format!("{} overlaps podCIDR {}", pool.cidr, self.pod_cidr),
                    );
                }
                for (other, other_at) in &pools {
                    if pool.cidr.overlaps(other) {
                        p(
                            format!("{field}.cidr"),
                            format!("{} overlaps {other_at}'s {other}", pool.cidr),
                        );
                    }
                }
                pools.push((pool.cidr, field));
            }
            check_serves(&host.serve, &format!("{at}.serve"), &mut p);
        }
        for (ip, owner) in &ips {
            if let Some((cidr, field)) = pools.iter().find(|(c, _)| c.contains(*ip)) {
                p(
                    format!("{field}.cidr"),
                    format!("{cidr} contains {owner}'s address {ip}"),
                );
            }
        }
        check_serves(&self.node.serve, "node.serve", &mut p);
        out.sort();
        out
    }

    /// The prefix length of each node's block.
    pub fn mask_size(&self) -> u8 {
        self.pod_cidr_mask_size
            .unwrap_or(self.pod_cidr.prefix().max(24))
    }

    /// Node `node`'s block of `podCIDR` (1-based), if the pool has that many.
    pub fn node_block(&self, node: u32) -> Option<Cidr> {
        let len = self.mask_size();
        if node == 0 || len < self.pod_cidr.prefix() || len > 32 {
            return None;
        }
        let blocks = 1u64 << (len - self.pod_cidr.prefix());
        let index = u64::from(node - 1);
        if index >= blocks {
            return None;
        }
        let size = 1u64 << (32 - len);
        let base = u64::from(u32::from(self.pod_cidr.network())) + index * size;
        Some(Cidr {
            addr: Ipv4Addr::from(u32::try_from(base).ok()?),
            prefix: len,
        })
    }

    /// The node (1-based) pod `pod` runs on when the lab has `nodes` nodes.
    pub fn placement(pod: &PodSpec, nodes: u32) -> u32 {
        pod.node.min(nodes.max(1))
    }

    /// The pod running the cluster DNS, if any.
    pub fn cluster_dns(&self) -> Option<&PodSpec> {
        self.pods.iter().find(|p| p.cluster_dns)
    }

    /// What the lab DNS answers: every pod as `<name>.<namespace>.svc.cluster.local`, the
    /// world hosts' names and pools.
    pub fn zone(&self) -> Zone {
        let mut records = BTreeMap::new();
        for pod in &self.pods {
            records.insert(
                format!("{}.{}.svc.{CLUSTER_DOMAIN}", pod.name, pod.namespace),
                vec![pod.ip],
            );
        }
        let mut pools = Vec::new();
        for host in &self.world {
            for name in &host.names {
                records.insert(
                    name.trim_end_matches('.').to_ascii_lowercase(),
                    vec![host.ip],
                );
            }
            pools.extend(host.pools.iter().cloned());
        }
        Zone {
            ttl: self.dns.ttl,
            records,
            pools,
        }
    }

    /// Every address a name could point at, with who owns it (for flow and demo output).
    pub fn names(&self) -> Vec<(Ipv4Addr, String)> {
        let mut out: Vec<(Ipv4Addr, String)> =
            self.pods.iter().map(|p| (p.ip, p.name.clone())).collect();
        out.extend(
            self.world
                .iter()
                .map(|w| (w.ip, format!("world/{}", w.name))),
        );
        out
    }

    pub fn pod(&self, name: &str) -> Option<&PodSpec> {
        self.pods.iter().find(|p| p.name == name)
    }

    pub fn world_host(&self, name: &str) -> Option<&WorldHost> {
        self.world.iter().find(|w| w.name == name)
    }
}

fn check_serves(serves: &[Serve], at: &str, p: &mut impl FnMut(String, String)) {
    let mut ports = BTreeSet::new();
    for (i, s) in serves.iter().enumerate() {
        if s.port == 0 {
            p(format!("{at}[{i}].port"), "0 is not a port".into());
        } else if !ports.insert(s.port) {
            p(
                format!("{at}[{i}].port"),
                format!("{} is served twice", s.port),
            );
        }
        if let Some(body) = &s.body
            && (body.contains('\n') || body.len() > 1024)
        {
            p(
                format!("{at}[{i}].body"),
                "one line of at most 1024 bytes".into(),
            );
        }
        for (j, path) in s.paths.iter().enumerate() {
            if !path.starts_with('/') || path.contains(char::is_whitespace) {
                p(
                    format!("{at}[{i}].paths[{j}]"),
                    format!("`{path}` must start with / and have no spaces"),
                );
            }
        }
    }
}

/// A DNS label that is also a safe namespace and interface name part (RFC 1123).
fn check_label(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 40
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{s}`: use 1-40 characters from [a-z0-9-], not starting or ending with -"
        ))
    }
}

fn check_label_pair(k: &str, v: &str) -> Result<(), String> {
    let key_ok = !k.is_empty()
        && k.len() <= 253
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'/'));
    let value_ok = v.len() <= 63
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    match (key_ok, value_ok) {
        (true, true) => Ok(()),
        (false, _) => Err(format!(
            "label key `{k}`: use [A-Za-z0-9._/-] (a Kubernetes label key)"
        )),
        (_, false) => Err(format!(
            "label value `{v}`: at most 63 characters from [A-Za-z0-9._-]"
        )),
    }
}

fn check_dns_name(name: &str) -> Result<(), String> {
    let name = name.trim_end_matches('.');
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("`{name}` is not a DNS name"))
    }
}

/// The network namespace of pod `pod` in the lab `lab`.
pub fn pod_netns(lab: &str, pod: &str) -> String {
    format!("{lab}-{pod}")
}

/// The world router's namespace.
pub fn world_router_netns(lab: &str) -> String {
    format!("{lab}-world")
}

/// A world host's namespace.
pub fn world_netns(lab: &str, host: &str) -> String {
    format!("{lab}-world-{host}")
}

/// Host-side veth of a pod in the node namespace.
pub fn host_ifname(pod: &str) -> String {
    format!("lxc-{pod}").chars().take(15).collect()
}

fn world_ifname(host: &str) -> String {
    format!("w-{host}").chars().take(15).collect()
}

/// `/etc/netns/NETNS/resolv.conf` for a pod in `namespace`, resolving through `dns`.
pub fn resolv_conf(namespace: &str, dns: Ipv4Addr) -> String {
    format!(
        "# written by membrane lab up: the lab's cluster DNS\n\
         nameserver {dns}\n\
         search {namespace}.svc.{CLUSTER_DOMAIN} svc.{CLUSTER_DOMAIN} {CLUSTER_DOMAIN}\n\
         options ndots:5\n"
    )
}

/// How many nodes a lab has and how they reach each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// 1: a single node without a cluster store (the agent allocates identities itself).
    pub nodes: u32,
    /// Between nodes (two or more).
    pub routing: RoutingModeArg,
}

impl Shape {
    pub const SINGLE: Shape = Shape {
        nodes: 1,
        routing: RoutingModeArg::Tunnel,
    };
}

/// The underlay: node N is `10.199.0.(10+N)/24` on a bridge in the lab's underlay namespace.
pub const UNDERLAY_NET: [u8; 3] = [10, 199, 0];
/// The node's interface on the underlay.
pub const UNDERLAY_IFNAME: &str = "underlay";
/// Lease TTL of the lab agents' keys in the store: a stopped node leaves the others' ipcache
/// within seconds, not Cilium's 15 minutes.
pub const LAB_LEASE_TTL_SECS: i64 = 10;

/// Node `k`'s (1-based) run name: its network namespace, run directory and pin directory.
/// Node 1 keeps the lab's own name, so a single-node lab is what it always was.
pub fn node_run_name(lab: &str, k: u32) -> String {
    if k <= 1 {
        lab.to_owned()
    } else {
        format!("{lab}-node{k}")
    }
}

/// Node `k`'s name in the cluster (`membrane status --node node2`).
pub fn node_name(k: u32) -> String {
    format!("node{k}")
}

/// Node `k`'s underlay address.
pub fn node_underlay_ip(k: u32) -> Ipv4Addr {
    let [a, b, c] = UNDERLAY_NET;
    Ipv4Addr::new(a, b, c, 10 + k as u8)
}

/// The underlay's namespace (a bridge, nothing else).
pub fn underlay_netns(lab: &str) -> String {
    format!("{lab}-underlay")
}

/// Node `k`'s end of its uplink to the world router, and the router's: `169.254.2.0/24` in
/// /30s (node 1: .1 and .2, as a single-node lab always had).
fn uplink_addresses(k: u32) -> (Ipv4Addr, Ipv4Addr) {
    let base = 4 * (k - 1) as u8;
    (
        Ipv4Addr::new(169, 254, 2, base + 1),
        Ipv4Addr::new(169, 254, 2, base + 2),
    )
}

/// One node of a built lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuiltNode {
    /// The cluster's name for it (`node1`, …).
    pub name: String,
    /// Its namespace, run directory and pin directory name.
    pub run_name: String,
    /// Its underlay address (two or more nodes).
    pub underlay_ip: Option<Ipv4Addr>,
    /// Its block of the pod CIDR (two or more nodes).
    pub pod_cidr: Option<String>,
}

/// The lab's nodes file in its state directory (`membrane … --node NAME` reads it).
pub const NODES_FILE: &str = "nodes.json";

/// What [`build`] started.
pub(crate) struct Built {
    /// The first node's agent API socket.
    pub socket: PathBuf,
}

fn dp(step: &str) -> impl FnOnce(membrane_datapath::DatapathError) -> LabError + '_ {
    move |source| LabError::Datapath {
        step: step.to_owned(),
        source: Box::new(source),
    }
}

fn io(step: &str) -> impl FnOnce(std::io::Error) -> LabError + '_ {
    move |e| LabError::Step {
        step: step.to_owned(),
        detail: e.to_string(),
    }
}

/// Builds `topology` as the run `name` with `shape.nodes` nodes: the node namespaces (and,
/// for two or more, the underlay and etcd), pods, world, one agent per node (with the pods
/// registered), the servers and the cluster DNS. Every process started is recorded in
/// `/run/membrane/NAME/pids` as soon as it runs, so [`lab::teardown`] stops it whatever
/// fails later; the caller tears down on error. `progress` gets one line per finished step.
pub(crate) fn build(
    name: &str,
    topology: &Topology,
    shape: Shape,
    ui: Option<&std::net::TcpListener>,
    progress: &mut dyn FnMut(String),
) -> Result<Built, LabError> {
    let state = Path::new(STATE_ROOT).join(name);
    let policy_dir = state.join("policies");
    std::fs::create_dir_all(&policy_dir).map_err(io("create the state directory"))?;
    let mut pids = Vec::new();
    let count = shape.nodes.clamp(1, MAX_NODES);
    let cluster = count > 1;
    let tunnel = cluster && shape.routing == RoutingModeArg::Tunnel;

    let mut nodes = Vec::new();
    let mut built_nodes = Vec::new();
    for k in 1..=count {
        let run_name = node_run_name(name, k);
        let node = Node::create(&run_name).map_err(dp("create a node namespace"))?;
        progress(format!(
            "node {} namespace {run_name} (forwarding on; its uplink leads only to the lab's world hosts)",
            node_name(k)
        ));
        built_nodes.push(BuiltNode {
            name: node_name(k),
            run_name,
            underlay_ip: cluster.then(|| node_underlay_ip(k)),
            pod_cidr: if cluster {
                topology.node_block(k).map(|b| b.to_string())
            } else {
                None
            },
        });
        nodes.push(node);
    }
    let mut etcd_endpoint = None;
    if cluster {
        build_underlay(name, &nodes)?;
        progress(format!(
            "underlay {} (bridge; nodes at {}..{}, MTU 1500), routing {}",
            underlay_netns(name),
            node_underlay_ip(1),
            node_underlay_ip(count),
            shape.routing.as_str()
        ));
        let etcd = crate::etcd::start(&state, &mut |pid| {
            pids.push(pid);
            lab::record_pids_in(&state, &pids)
        })?;
        progress(format!(
            "etcd at {} (data {}, log {})",
            etcd.endpoint,
            etcd.data_dir.display(),
            etcd.log.display()
        ));
        etcd_endpoint = Some(etcd.endpoint);
    }
    lab::check_interrupt()?;

    let dns_ip = topology.cluster_dns().map(|p| p.ip);
    let mut links = Vec::new();
    for pod in &topology.pods {
        let k = Topology::placement(pod, count);
        let node = &nodes[(k - 1) as usize];
        let netns = pod_netns(name, &pod.name);
        let link = node
            .add_endpoint(&netns, &host_ifname(&pod.name), pod.ip)
            .map_err(dp(&format!("create pod {}", pod.name)))?;
        if tunnel {
            // Pods see the tunnel's MTU, so nothing they send needs fragmenting on the way.
            let mtu = (1500 - membrane_datapath::routing::TUNNEL_OVERHEAD).to_string();
            link.netns
                .ip(&[
                    "link",
                    "set",
                    "dev",
                    membrane_datapath::plumbing::POD_IFNAME,
                    "mtu",
                    &mtu,
                ])
                .map_err(dp(&format!("set pod {}'s MTU", pod.name)))?;
        }
        if let Some(dns) = dns_ip {
            let dir = Path::new(ETC_NETNS).join(&netns);
            std::fs::create_dir_all(&dir).map_err(io("create /etc/netns entry"))?;
            std::fs::write(dir.join("resolv.conf"), resolv_conf(&pod.namespace, dns))
                .map_err(io("write the pod's resolv.conf"))?;
        }
        let on = if cluster {
            format!(" on {}", node_name(k))
        } else {
            String::new()
        };
        progress(format!(
            "pod {:<24} {:<13} netns {netns}, host veth {}{on}",
            format!("{}/{}", pod.namespace, pod.name),
            pod.ip,
            link.host_ifname
        ));
        links.push((k, link));
    }
    lab::check_interrupt()?;

    if !topology.world.is_empty() {
        build_world(name, &nodes, topology, count)?;
        for host in &topology.world {
            let mut what = format!("{}", host.ip);
            if !host.names.is_empty() {
                what.push_str(&format!(" ({})", host.names.join(", ")));
            }
            for pool in &host.pools {
                what.push_str(&format!(", *.{} from {}", pool.suffix, pool.cidr));
            }
            progress(format!("world host {:<8} {what}", host.name));
        }
        progress(format!(
            "uplink {UPLINK_NODE} -> world router {} (no endpoint programs)",
            world_router_netns(name)
        ));
    }
    lab::check_interrupt()?;

    // The agents own the datapath from here on, one per node namespace.
    let mut sockets = Vec::new();
    for (i, node) in built_nodes.iter().enumerate() {
        let k = i as u32 + 1;
        let mut args = membrane_agent_api::args::AgentArgs::new(&node.run_name, &node.run_name);
        args.policy_dir = Some(policy_dir.clone());
        if k == 1 {
            args.ui_listen_fd = ui.map(std::os::fd::AsRawFd::as_raw_fd);
        }
        if let Some(endpoint) = &etcd_endpoint {
            let c = &mut args.cluster;
            c.kvstore = Some(membrane_agent_api::args::KvstoreKind::Etcd);
            c.kvstore_endpoints = vec![endpoint.clone()];
            c.kvstore_lease_ttl = LAB_LEASE_TTL_SECS;
            c.node_name = Some(node.name.clone());
            c.node_ip = node.underlay_ip.map(std::net::IpAddr::V4);
            c.routing_mode = Some(shape.routing);
            args.pods.pod_cidr = match &node.pod_cidr {
                Some(text) => Some(text.parse().map_err(|e| LabError::Step {
                    step: format!("pod CIDR of {}", node.name),
                    detail: format!("{text}: {e}"),
                })?),
                None => None,
            };
        }
        pids.push(lab::spawn_agent(name, &args)?);
        lab::record_pids_in(&state, &pids)?;
        sockets.push(RunDir::new(&node.run_name).agent_socket());
    }
    for (node, socket) in built_nodes.iter().zip(&sockets) {
        lab::wait_for(&format!("agent API at {}", socket.display()), || {
            socket.exists()
        })?;
        progress(format!(
            "membrane-agent running for {} (API {}, log {})",
            node.run_name,
            socket.display(),
            lab::agent_log(name, &node.run_name).display()
        ));
    }
    for (pod, (k, link)) in topology.pods.iter().zip(&links) {
        let endpoint = EndpointSpec {
            name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            labels: pod.labels.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            ipv4: pod.ip,
            host_ifname: link.host_ifname.clone(),
        };
        Client::new(&sockets[(*k - 1) as usize])
            .endpoint_add(endpoint)
            .map_err(|e| LabError::Step {
                step: format!("register pod {}", pod.name),
                detail: e.to_string(),
            })?;
    }
    progress(format!(
        "{} endpoints registered: identities from their labels{}, tc programs attached (tcx, pinned)",
        topology.pods.len(),
        if cluster {
            " (cluster-wide, on etcd)"
        } else {
            ""
        }
    ));
    std::fs::write(
        state.join(NODES_FILE),
        serde_json::to_string_pretty(&built_nodes).map_err(|e| LabError::Step {
            step: "record the nodes".into(),
            detail: e.to_string(),
        })?,
    )
    .map_err(io("record the nodes"))?;
    lab::check_interrupt()?;

    // Servers: (namespace, address to probe, serve) for pods, world hosts and the node.
    let mut servers: Vec<(String, Ipv4Addr, &Serve, &str)> = Vec::new();
    for pod in &topology.pods {
        for s in &pod.serve {
            servers.push((pod_netns(name, &pod.name), pod.ip, s, &pod.name));
        }
    }
    for host in &topology.world {
        for s in &host.serve {
            servers.push((world_netns(name, &host.name), host.ip, s, &host.name));
        }
    }
    for s in &topology.node.serve {
        servers.push((name.to_owned(), Ipv4Addr::LOCALHOST, s, "node"));
    }
    for (netns, _, s, owner) in &servers {
        let body = s
            .body
            .clone()
            .unwrap_or_else(|| format!("hello from {owner}"));
        pids.push(lab::spawn_server(netns, s.port, &body, &s.paths)?);
        lab::record_pids_in(&state, &pids)?;
    }
    if let Some(dns) = topology.cluster_dns() {
        let zone_file = state.join("dns-zone.yaml");
        let zone = serde_yaml_ng::to_string(&topology.zone()).map_err(|e| LabError::Step {
            step: "write the DNS zone".into(),
            detail: e.to_string(),
        })?;
        std::fs::write(&zone_file, zone).map_err(io("write the DNS zone"))?;
        pids.push(lab::spawn_dns(
            &pod_netns(name, &dns.name),
            &zone_file,
            &state.join("dns.log"),
        )?);
        lab::record_pids_in(&state, &pids)?;
    }
    for (netns, ip, s, _) in &servers {
        let ns = Netns::open(netns).map_err(dp("open a server's namespace"))?;
        lab::wait_listening(&ns, *ip, &[s.port])?;
    }
    let mut served: Vec<String> = servers
        .iter()
        .map(|(_, _, s, owner)| format!("{owner}:{}", s.port))
        .collect();
    served.dedup();
    if !served.is_empty() {
        progress(format!("HTTP servers: {}", served.join(" ")));
    }
    if let Some(dns) = topology.cluster_dns() {
        let ns = Netns::open(&pod_netns(name, &dns.name)).map_err(dp("open the DNS pod"))?;
        // UDP is bound before TCP, so a TCP answer means both are up.
        lab::wait_listening(&ns, dns.ip, &[53])?;
        progress(format!(
            "cluster DNS on {}/{} {}:53 (UDP, TCP; ttl {} s; zone {})",
            dns.namespace,
            dns.name,
            dns.ip,
            topology.dns.ttl,
            state.join("dns-zone.yaml").display()
        ));
    }
    lab::check_interrupt()?;
    Ok(Built {
        socket: sockets[0].clone(),
    })
}

/// The underlay: a bridge in its own namespace, each node's `underlay` veth on it.
fn build_underlay(name: &str, nodes: &[Node]) -> Result<(), LabError> {
    let ns = Netns::create(&underlay_netns(name)).map_err(dp("create the underlay"))?;
    let wire = || -> Result<(), membrane_datapath::DatapathError> {
        ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
        ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        ns.ip(&["link", "add", "br0", "type", "bridge"])?;
        ns.ip(&["link", "set", "br0", "up"])?;
        for (i, node) in nodes.iter().enumerate() {
            let k = i as u32 + 1;
            let port = format!("n{k}");
            node.netns().ip(&[
                "link",
                "add",
                UNDERLAY_IFNAME,
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                ns.name(),
            ])?;
            ns.ip(&["link", "set", &port, "master", "br0"])?;
            ns.ip(&["link", "set", &port, "up"])?;
            let addr = format!("{}/24", node_underlay_ip(k));
            node.netns()
                .ip(&["addr", "add", &addr, "dev", UNDERLAY_IFNAME])?;
            node.netns().ip(&["link", "set", UNDERLAY_IFNAME, "up"])?;
        }
        Ok(())
    };
    wire().map_err(dp("wire the underlay"))
}

/// The world: a router namespace behind the node's uplink, and one namespace per host behind
/// the router, with the pools' AnyIP routes.
fn build_world(
    name: &str,
    nodes: &[Node],
    topology: &Topology,
    count: u32,
) -> Result<(), LabError> {
    let router_name = world_router_netns(name);
    let router = Netns::create(&router_name).map_err(dp("create the world router"))?;
    for (key, value) in [
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv6.conf.all.disable_ipv6", "1"),
        ("net.ipv6.conf.default.disable_ipv6", "1"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
    ] {
        router
            .sysctl(key, value)
            .map_err(dp("configure the world router"))?;
    }
    // One uplink per node; the router sends each node's block (and any pod living outside
    // its node's block) back through that node's uplink, everything else to node 1.
    let wire = || -> Result<(), membrane_datapath::DatapathError> {
        for (i, node) in nodes.iter().enumerate() {
            let k = i as u32 + 1;
            let (node_end, router_end) = uplink_addresses(k);
            let router_if = format!("eth{}", k - 1);
            let node_ns = node.netns();
            node_ns.ip(&[
                "link",
                "add",
                UPLINK_IFNAME,
                "type",
                "veth",
                "peer",
                "name",
                &router_if,
                "netns",
                &router_name,
            ])?;
            node_ns.ip(&[
                "addr",
                "add",
                &format!("{node_end}/30"),
                "dev",
                UPLINK_IFNAME,
            ])?;
            node_ns.ip(&["link", "set", UPLINK_IFNAME, "up"])?;
            router.ip(&[
                "addr",
                "add",
                &format!("{router_end}/30"),
                "dev",
                &router_if,
            ])?;
            router.ip(&["link", "set", &router_if, "up"])?;
            // Like a real node: whatever is not a pod (or another node's) leaves through
            // the uplink.
            node_ns.ip(&[
                "route",
                "add",
                "default",
                "via",
                &router_end.to_string(),
                "dev",
                UPLINK_IFNAME,
            ])?;
            let via = node_end.to_string();
            if k == 1 {
                router.ip(&["route", "add", "default", "via", &via, "dev", &router_if])?;
            } else if let Some(block) = topology.node_block(k) {
                let block = block.to_string();
                router.ip(&["route", "add", &block, "via", &via, "dev", &router_if])?;
            }
            for pod in &topology.pods {
                let home = topology.node_block(pod.node);
                if Topology::placement(pod, count) == k
                    && k > 1
                    && !home.is_some_and(|b| b.contains(pod.ip) && pod.node == k)
                {
                    let ip = pod.ip.to_string();
                    router.ip(&["route", "add", &ip, "via", &via, "dev", &router_if])?;
                }
            }
        }
        Ok(())
    };
    wire().map_err(dp("wire the uplinks"))?;
    let router_node = Node::open(&router_name).map_err(dp("open the world router"))?;
    for host in &topology.world {
        let ifname = world_ifname(&host.name);
        let link = router_node
            .add_endpoint(&world_netns(name, &host.name), &ifname, host.ip)
            .map_err(dp(&format!("create world host {}", host.name)))?;
        for pool in &host.pools {
            let cidr = pool.cidr.to_string();
            link.netns
                .ip(&["route", "add", "local", &cidr, "dev", "lo"])
                .map_err(dp(&format!("pool {cidr} on world host {}", host.name)))?;
            router
                .ip(&[
                    "route",
                    "add",
                    &cidr,
                    "via",
                    &host.ip.to_string(),
                    "dev",
                    &ifname,
                ])
                .map_err(dp(&format!("route pool {cidr} to {}", host.name)))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_topology_is_the_seed_guide() {
        let t = Topology::seed();
        let pods: Vec<(&str, &str, Ipv4Addr)> = t
            .pods
            .iter()
            .map(|p| (p.namespace.as_str(), p.name.as_str(), p.ip))
            .collect();
        assert_eq!(
            pods,
            vec![
                ("default", "frontend", Ipv4Addr::new(10, 200, 0, 10)),
                ("default", "backend", Ipv4Addr::new(10, 200, 0, 11)),
                ("default", "api", Ipv4Addr::new(10, 200, 1, 12)),
                ("default", "external-client", Ipv4Addr::new(10, 200, 1, 13)),
                ("kube-system", "kube-dns", Ipv4Addr::new(10, 200, 0, 53)),
            ]
        );
        assert_eq!(t.cluster_dns().map(|p| p.name.as_str()), Some("kube-dns"));
        let zone = t.zone();
        assert_eq!(
            zone.records["backend.default.svc.cluster.local"],
            vec![Ipv4Addr::new(10, 200, 0, 11)]
        );
        assert_eq!(
            zone.records["kube-dns.kube-system.svc.cluster.local"],
            vec![Ipv4Addr::new(10, 200, 0, 53)]
        );
        assert_eq!(
            zone.records["api.github.com"],
            vec![Ipv4Addr::new(192, 0, 2, 10)]
        );
        assert_eq!(
            zone.records["api.slack.com"],
            vec![Ipv4Addr::new(198, 51, 100, 10)]
        );
        assert_eq!(zone.ttl, 30);
        let suffixes: Vec<&str> = zone.pools.iter().map(|p| p.suffix.as_str()).collect();
        assert_eq!(suffixes, ["github.com", "amazonaws.com"]);
    }

    /// `examples/policies/endpoints.yaml` (for `membrane policy resolve`) describes the same
    /// workloads as the lab: names, namespaces, labels and addresses.
    #[test]
    fn endpoints_yaml_agrees_with_the_seed() {
        #[derive(Deserialize)]
        struct File {
            endpoints: Vec<Endpoint>,
        }
        #[derive(Deserialize)]
        struct Endpoint {
            name: String,
            namespace: String,
            labels: BTreeMap<String, String>,
            ips: Vec<Ipv4Addr>,
        }
        let file: File =
            serde_yaml_ng::from_str(include_str!("../../examples/policies/endpoints.yaml"))
                .expect("endpoints.yaml");
        let from_file: Vec<_> = file
            .endpoints
            .into_iter()
            .map(|e| (e.namespace, e.name, e.labels, e.ips))
            .collect();
        let from_seed: Vec<_> = Topology::seed()
            .pods
            .into_iter()
            .map(|p| (p.namespace, p.name, p.labels, vec![p.ip]))
            .collect();
        assert_eq!(from_file, from_seed);
    }

    fn problems(yaml: &str) -> String {
        Topology::parse(yaml, "t.yaml")
            .expect_err("invalid")
            .to_string()
    }

    #[test]
    fn bad_topologies_name_the_field() {
        let base = "podCIDR: 10.9.0.0/24\npods:\n- {name: a, ip: 10.9.0.2}\n";
        assert!(Topology::parse(base, "t.yaml").is_ok());
        let e = problems("podCIDR: 10.9.0.0/24\npods:\n- {name: a, ip: 10.9.0.300}\n");
        assert!(e.starts_with("topology t.yaml: pods[0].ip"), "{e}");
        let e = problems("podCIDR: 10.9.0.0/24\npods:\n- {name: a, ip: 10.9.0.2, color: red}\n");
        assert!(
            e.contains("unknown field `color`") && e.contains("pods[0]"),
            "{e}"
        );
        let e = problems("podCIDR: 10.9.0.1/24\npods: []\n");
        assert!(e.contains("host bits"), "{e}");
        let e = problems(&format!(
            "{base}- {{name: A_b, ip: 10.8.0.2}}\n- {{name: a, ip: 10.9.0.2, clusterDNS: true}}\n"
        ));
        assert!(e.contains("pods[1].name: `A_b`"), "{e}");
        assert!(e.contains("pods[1].ip: 10.8.0.2 is outside podCIDR"), "{e}");
        assert!(e.contains("pods[2].name: `a` is also pods[0].name"), "{e}");
        assert!(e.contains("pods[2].ip: 10.9.0.2 is also pods[0]'s"), "{e}");
        let e = problems(&format!(
            "{base}world:\n- name: w\n  ip: 10.9.0.7\n  pools: [{{suffix: x.com, cidr: 10.9.0.0/25}}]\n  serve: [{{port: 80}}, {{port: 80}}]\n"
        ));
        assert!(e.contains("world[0].ip: 10.9.0.7 is inside podCIDR"), "{e}");
        assert!(
            e.contains("world[0].pools[0].cidr: 10.9.0.0/25 overlaps podCIDR"),
            "{e}"
        );
        assert!(
            e.contains("world[0].serve[1].port: 80 is served twice"),
            "{e}"
        );
        let e = problems(&format!(
            "{base}world:\n- {{name: w, ip: 192.0.2.1, names: [backend.default.svc.cluster.local]}}\n"
        ));
        assert!(e.contains("world[0].names[0]"), "{e}");
        let e = problems(&format!("{base}- {{name: world, ip: 10.9.0.3}}\n"));
        assert!(e.contains("pods[1].name: `world`"), "{e}");
        // Nodes: a pod's address is in its node's block, never the block's router address.
        let pool = "podCIDR: 10.9.0.0/16\npodCIDRMaskSize: 24\npods:\n";
        let e = problems(&format!(
            "{pool}- {{name: a, ip: 10.9.0.2, node: 2}}\n- {{name: b, ip: 10.9.1.1, node: 2}}\n- {{name: c, ip: 10.9.2.2, node: 0}}\n"
        ));
        assert!(
            e.contains("pods[0].ip: 10.9.0.2 is outside node 2's block 10.9.1.0/24"),
            "{e}"
        );
        assert!(
            e.contains("pods[1].ip: 10.9.1.1 is node 2's network or router address"),
            "{e}"
        );
        assert!(e.contains("pods[2].node: 0: nodes are numbered"), "{e}");
        let e = problems(
            "podCIDR: 10.9.0.0/16\npodCIDRMaskSize: 12\npods:\n- {name: a, ip: 10.9.0.2}\n",
        );
        assert!(e.contains("podCIDRMaskSize: 12: use 16-30"), "{e}");
    }

    #[test]
    fn nodes_have_consecutive_blocks_of_the_pool() {
        let t = Topology::seed();
        assert_eq!(
            t.node_block(1).map(|c| c.to_string()),
            Some("10.200.0.0/24".into())
        );
        assert_eq!(
            t.node_block(2).map(|c| c.to_string()),
            Some("10.200.1.0/24".into())
        );
        assert_eq!(
            t.node_block(256),
            Some("10.200.255.0/24".parse().expect("cidr"))
        );
        assert_eq!(t.node_block(257), None);
        assert_eq!(t.node_block(0), None);
        let api = t.pod("api").expect("api");
        assert_eq!((api.node, Topology::placement(api, 2)), (2, 2));
        assert_eq!(Topology::placement(api, 1), 1, "one node runs every pod");
        assert_eq!(node_run_name("lab", 1), "lab");
        assert_eq!(node_run_name("lab", 3), "lab-node3");
        assert_eq!(node_underlay_ip(2), Ipv4Addr::new(10, 199, 0, 12));
        // A /25 pool without a mask size is one node's block.
        let small = Topology::parse(
            "podCIDR: 10.9.0.0/25\npods:\n- {name: a, ip: 10.9.0.2}\n",
            "t",
        )
        .expect("valid");
        assert_eq!(small.mask_size(), 25);
    }

    #[test]
    fn cidr_arithmetic() {
        let c: Cidr = "198.18.0.0/15".parse().expect("cidr");
        assert_eq!(c.size(), 131_072);
        assert!(c.contains(Ipv4Addr::new(198, 19, 255, 255)));
        assert!(!c.contains(Ipv4Addr::new(198, 20, 0, 0)));
        assert!(c.overlaps(&"198.19.0.0/16".parse().expect("cidr")));
        assert!(!c.overlaps(&"198.20.0.0/16".parse().expect("cidr")));
        assert!("198.18.0.0/33".parse::<Cidr>().is_err());
        assert!("198.18.0.0".parse::<Cidr>().is_err());
        assert_eq!("0.0.0.0/0".parse::<Cidr>().expect("cidr").size(), u32::MAX);
    }

    #[test]
    fn resolv_conf_has_the_search_path() {
        assert_eq!(
            resolv_conf("kube-system", Ipv4Addr::new(10, 200, 0, 53)),
            "# written by membrane lab up: the lab's cluster DNS\nnameserver 10.200.0.53\nsearch kube-system.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
        );
    }
}
