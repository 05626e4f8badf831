//! Endpoint plumbing inside a node network namespace.
//!
//! A node is a network namespace that plays the host: it routes between its endpoints and
//! carries the tc programs on the host side of each endpoint's veth. An endpoint (a pod) is
//! its own network namespace whose `eth0` is the peer of a veth in the node namespace:
//!
//! ```text
//!   pod netns               node netns
//!   eth0 10.200.0.10/32 <-> lxc-a (169.254.1.1/32)  route 10.200.0.10/32 dev lxc-a
//!   default via 169.254.1.1 dev eth0 (onlink)
//! ```
//!
//! Every host-side veth carries the same link-local gateway address, so a pod's default
//! route resolves to its own veth peer and all pod-to-pod traffic is routed by the node
//! (and seen by both endpoints' programs). IPv6 is disabled on every interface created here:
//! the datapath enforces IPv4 only (see ARCHITECTURE.md), and silent IPv6 autoconfiguration
//! traffic would only add drops to the counters.
//!
//! The node namespace also carries the policy-routing rule for proxy redirects: packets with
//! the to-proxy mark are routed by table 2004, which delivers everything locally.
//!
//! Nothing here touches the root namespace: links are created directly inside the node
//! namespace (`ip -n NODE link add ... peer ... netns POD`).

use std::net::Ipv4Addr;

use crate::{
    error::{DatapathError, Result},
    netns::Netns,
};

/// Gateway address every pod routes through (carried by each host-side veth).
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// `fwmark/mask` of packets assigned to a proxy socket (Cilium's to-proxy magic).
pub const PROXY_FWMARK: &str = "0x200/0xf00";
/// Routing table delivering them locally (Cilium uses the same number).
pub const PROXY_ROUTE_TABLE: &str = "2004";

/// Interface name of an endpoint inside its own namespace.
pub const POD_IFNAME: &str = "eth0";

/// The node namespace.
#[derive(Debug, Clone)]
pub struct Node {
    netns: Netns,
}

/// One endpoint's plumbing: its namespace, address and host-side interface.
#[derive(Debug, Clone)]
pub struct EndpointLink {
    pub netns: Netns,
    pub ipv4: Ipv4Addr,
    /// Host-side veth name inside the node namespace.
    pub host_ifname: String,
    /// Interface index of `host_ifname` inside the node namespace (the endpoints map key).
    pub host_ifindex: u32,
}

impl Node {
    /// Creates the node namespace `name` with forwarding on and IPv6 off.
    pub fn create(name: &str) -> Result<Self> {
        let netns = Netns::create(name)?;
        let node = Self { netns };
        if let Err(err) = node.configure() {
            let _ = node.netns.clone().delete();
            return Err(err);
        }
        Ok(node)
    }

    /// An existing node namespace.
    pub fn open(name: &str) -> Result<Self> {
        Ok(Self {
            netns: Netns::open(name)?,
        })
    }

    fn configure(&self) -> Result<()> {
        let ns = &self.netns;
        // Packets the datapath assigned to a proxy socket carry the to-proxy mark; this rule
        // makes the node deliver them locally whatever their destination address (the
        // socket is transparent), instead of forwarding them.
        ns.ip(&[
            "rule",
            "add",
            "fwmark",
            PROXY_FWMARK,
            "lookup",
            PROXY_ROUTE_TABLE,
            "pref",
            "9",
        ])?;
        ns.ip(&[
            "route",
            "add",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            PROXY_ROUTE_TABLE,
        ])?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        // Early demux would attach the later packets of an ingress-redirected connection
        // (which the node forwards to the pod's veth first) to the proxy's transparent socket
        // while they are still being forwarded, and forwarding drops packets that carry a
        // socket. The datapath assigns the socket itself (bpf_sk_assign).
        ns.sysctl("net.ipv4.tcp_early_demux", "0")?;
        ns.sysctl("net.ipv4.udp_early_demux", "0")?;
        ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
        ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        ns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        ns.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        Ok(())
    }

    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// Creates endpoint namespace `pod_netns` with address `ipv4`, wired to the node through
    /// the veth `host_ifname` (at most 15 characters).
    pub fn add_endpoint(
        &self,
        pod_netns: &str,
        host_ifname: &str,
        ipv4: Ipv4Addr,
    ) -> Result<EndpointLink> {
        if host_ifname.is_empty() || host_ifname.len() > 15 || host_ifname.contains('/') {
            return Err(DatapathError::Invalid {
                what: "interface name",
                detail: format!("`{host_ifname}` must be 1-15 characters without '/'"),
            });
        }
        let pod = Netns::create(pod_netns)?;
        match self.wire(&pod, host_ifname, ipv4) {
            Ok(host_ifindex) => Ok(EndpointLink {
                netns: pod,
                ipv4,
                host_ifname: host_ifname.to_owned(),
                host_ifindex,
            }),
            Err(err) => {
                let _ = pod.delete();
                Err(err)
            }
        }
    }

    fn wire(&self, pod: &Netns, host_ifname: &str, ipv4: Ipv4Addr) -> Result<u32> {
        pod.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
        pod.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        let node = &self.netns;
        node.ip(&[
            "link",
            "add",
            host_ifname,
            "type",
            "veth",
            "peer",
            "name",
            POD_IFNAME,
            "netns",
            pod.name(),
        ])?;
        let gateway = format!("{POD_GATEWAY}/32");
        let pod_addr = format!("{ipv4}/32");
        node.ip(&["addr", "add", &gateway, "dev", host_ifname])?;
        node.ip(&["link", "set", host_ifname, "up"])?;
        node.ip(&["route", "add", &pod_addr, "dev", host_ifname])?;

        pod.ip(&["addr", "add", &pod_addr, "dev", POD_IFNAME])?;
        pod.ip(&["link", "set", POD_IFNAME, "up"])?;
        pod.ip(&[
            "route",
            "add",
            &POD_GATEWAY.to_string(),
            "dev",
            POD_IFNAME,
            "scope",
            "link",
        ])?;
        pod.ip(&[
            "route",
            "add",
            "default",
            "via",
            &POD_GATEWAY.to_string(),
            "dev",
            POD_IFNAME,
        ])?;

        self.ifindex(host_ifname)
    }

    /// Interface index of `ifname` inside the node namespace.
    pub fn ifindex(&self, ifname: &str) -> Result<u32> {
        let name = std::ffi::CString::new(ifname).map_err(|_| DatapathError::Invalid {
            what: "interface name",
            detail: format!("`{ifname}` contains a NUL byte"),
        })?;
        // SAFETY: `name` is NUL-terminated and outlives the call.
        let index = self
            .netns
            .run(move || unsafe { libc::if_nametoindex(name.as_ptr()) })?;
        if index == 0 {
            return Err(DatapathError::Netns {
                netns: self.netns.name().to_owned(),
                what: format!("interface {ifname} not found"),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        Ok(index)
    }

    /// Deletes the node namespace (its veth ends, and so the pairs, go with it).
    pub fn delete(self) -> Result<()> {
        self.netns.delete()
    }
}
