//! Routing between nodes, inside the node namespace (`routingMode`, DESIGN §4):
//!
//! - `native`: a route per other node, its pod CIDR via its underlay address; packets cross
//!   the underlay as they are and the receiving node takes the source's identity from its
//!   ipcache.
//! - `tunnel`: a flow-based VXLAN device ([`TUNNEL_IFNAME`], UDP [`TUNNEL_PORT`], Cilium's
//!   default port) carrying the programs of `ebpf/src/tunnel.rs`, and a route per other node,
//!   its pod CIDR into that device with the route MTU lowered by [`TUNNEL_OVERHEAD`]; the
//!   outer destination and the VNI (the source identity) come from the program.
//!
//! The device is NOARP, so a neighbour resolves to the device's own MAC and no ARP crosses
//! the tunnel; the receiving program re-types the frame as addressed to its host. Each node's
//! MAC is its own ([`tunnel_mac`], from its router address): the kernel drops a VXLAN frame
//! whose inner source MAC equals the receiving device's as a loop. The device's address is
//! the node's router address (the first of its pod CIDR), the source the node uses towards
//! other nodes' pods.
//!
//! Routes this module installs carry [`ROUTE_PROTOCOL`], so a sync (and a restarted agent)
//! finds exactly its own and removes the stale ones without touching anyone else's. Like
//! the rest of the crate it works through `ip -n NODE`, never in the namespace of the caller.

use std::net::Ipv4Addr;

use crate::{
    error::{DatapathError, Result},
    maps::Ipv4Prefix,
    netns::Netns,
};

/// The node's VXLAN device.
pub const TUNNEL_IFNAME: &str = "membrane_vxlan";
/// UDP port of the VXLAN underlay: Cilium's default (the Linux default, not IANA's 4789).
pub const TUNNEL_PORT: u16 = 8472;
/// Bytes the tunnel adds: outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14.
pub const TUNNEL_OVERHEAD: u32 = 50;
/// MAC of a node's tunnel device: locally administered, `02:6d:62` and the last three bytes
/// of the node's router address (unique per node; see the module doc).
pub fn tunnel_mac(router_ip: Ipv4Addr) -> String {
    let [_, b, c, d] = router_ip.octets();
    format!("02:6d:62:{b:02x}:{c:02x}:{d:02x}")
}
/// `rtm_protocol` of the routes to other nodes' pod CIDRs (an unassigned number in
/// `/etc/iproute2/rt_protos`; the kernel keeps it so `ip route show proto` finds them).
pub const ROUTE_PROTOCOL: &str = "211";

/// How pod traffic crosses to other nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RoutingMode {
    Native,
    Tunnel,
}

impl RoutingMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RoutingMode::Native => "native",
            RoutingMode::Tunnel => "tunnel",
        }
    }
}

/// One other node as routing needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeRoute {
    pub pod_cidr: Ipv4Prefix,
    pub underlay_ip: Ipv4Addr,
}

/// Creates (or adopts) the tunnel device in `node` with `router_ip` on it, up, NOARP, with
/// the node's MAC ([`tunnel_mac`]). `underlay_mtu` is the MTU of the node's underlay interface; the device's
/// is that minus [`TUNNEL_OVERHEAD`].
pub fn ensure_tunnel_device(node: &Netns, router_ip: Ipv4Addr, underlay_mtu: u32) -> Result<()> {
    let exists = node.ip(&["link", "show", "dev", TUNNEL_IFNAME]).is_ok();
    if !exists {
        let port = TUNNEL_PORT.to_string();
        node.ip(&[
            "link",
            "add",
            TUNNEL_IFNAME,
            "type",
            "vxlan",
            "external",
            "dstport",
            &port,
        ])?;
    }
    let mtu = underlay_mtu.saturating_sub(TUNNEL_OVERHEAD).to_string();
    node.ip(&[
        "link",
        "set",
        "dev",
        TUNNEL_IFNAME,
        "address",
        &tunnel_mac(router_ip),
        "arp",
        "off",
        "mtu",
        &mtu,
    ])?;
    let addr = format!("{router_ip}/32");
    node.ip(&["addr", "replace", &addr, "dev", TUNNEL_IFNAME])?;
    node.ip(&["link", "set", "dev", TUNNEL_IFNAME, "up"])?;
    node.sysctl(&format!("net.ipv4.conf.{TUNNEL_IFNAME}.rp_filter"), "0")?;
    Ok(())
}

/// Removes the tunnel device (and so its routes and programs) if it exists.
pub fn remove_tunnel_device(node: &Netns) -> Result<()> {
    if node.ip(&["link", "show", "dev", TUNNEL_IFNAME]).is_ok() {
        node.ip(&["link", "del", "dev", TUNNEL_IFNAME])?;
    }
    Ok(())
}

/// The MTU of interface `ifname` in `node`.
pub fn link_mtu(node: &Netns, ifname: &str) -> Result<u32> {
    let out = node.ip(&["-o", "link", "show", "dev", ifname])?;
    let mut words = out.split_whitespace();
    while let Some(w) = words.next() {
        if w == "mtu"
            && let Some(Ok(mtu)) = words.next().map(str::parse)
        {
            return Ok(mtu);
        }
    }
    Err(DatapathError::Invalid {
        what: "ip link output",
        detail: format!("no mtu for {ifname} in `{}`", out.trim()),
    })
}

/// The interface `node` routes `dst` through (`ip route get`).
pub fn route_device(node: &Netns, dst: Ipv4Addr) -> Result<String> {
    let dst = dst.to_string();
    let out = node.ip(&["-o", "route", "get", &dst])?;
    let mut words = out.split_whitespace();
    while let Some(w) = words.next() {
        if w == "dev"
            && let Some(dev) = words.next()
        {
            return Ok(dev.to_owned());
        }
    }
    Err(DatapathError::Invalid {
        what: "ip route output",
        detail: format!("no device for {dst} in `{}`", out.trim()),
    })
}

/// The pod-CIDR routes this module installed in `node` (by [`ROUTE_PROTOCOL`]).
pub fn installed_routes(node: &Netns) -> Result<Vec<Ipv4Prefix>> {
    let out = node.ip(&["-o", "-4", "route", "show", "proto", ROUTE_PROTOCOL])?;
    let mut routes = Vec::new();
    for line in out.lines() {
        let Some(dst) = line.split_whitespace().next() else {
            continue;
        };
        if let Ok(p) = dst.parse::<Ipv4Prefix>() {
            routes.push(p);
        }
    }
    Ok(routes)
}

/// Makes `node`'s routes to other nodes' pod CIDRs exactly `routes`: each written (replace:
/// idempotent, and a node that moved gets its new next hop), then every route of ours not
/// wanted removed. `tunnel_src` is the router address on the tunnel device (tunnel mode).
pub fn sync_routes(
    node: &Netns,
    mode: RoutingMode,
    routes: &[NodeRoute],
    tunnel_mtu: u32,
    tunnel_src: Ipv4Addr,
) -> Result<()> {
    for r in routes {
        let dst = r.pod_cidr.to_string();
        let via = r.underlay_ip.to_string();
        let mtu = tunnel_mtu.to_string();
        let src = tunnel_src.to_string();
        let args: Vec<&str> = match mode {
            RoutingMode::Native => vec![
                "route",
                "replace",
                &dst,
                "via",
                &via,
                "proto",
                ROUTE_PROTOCOL,
            ],
            RoutingMode::Tunnel => vec![
                "route",
                "replace",
                &dst,
                "dev",
                TUNNEL_IFNAME,
                "src",
                &src,
                "mtu",
                &mtu,
                "proto",
                ROUTE_PROTOCOL,
            ],
        };
        node.ip(&args)?;
    }
    for have in installed_routes(node)? {
        if !routes.iter().any(|r| r.pod_cidr == have) {
            let dst = have.to_string();
            node.ip(&["route", "del", &dst, "proto", ROUTE_PROTOCOL])?;
        }
    }
    Ok(())
}
