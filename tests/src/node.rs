//! [`TestNode`]: a node namespace with endpoints and a loaded datapath, all torn down on drop
//! (also when the test panics).

use std::net::Ipv4Addr;

use membrane_datapath::{Datapath, MapSizes, Netns, maps::EndpointEntry, plumbing::Node};

use crate::{NsGuard, PinGuard, require_root, sweep_stale, unique_name};

/// An endpoint of a [`TestNode`].
#[derive(Debug, Clone)]
pub struct TestPod {
    pub netns: Netns,
    pub ip: Ipv4Addr,
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub endpoint_id: u32,
}

/// A node namespace, its endpoints and the datapath attached to them.
///
/// Field order is drop order: links are released first (the datapath), then the endpoint
/// namespaces, the node namespace, and finally the private bpffs with the pinned maps.
pub struct TestNode {
    datapath: Datapath,
    pods: Vec<NsGuard>,
    node_ns: NsGuard,
    node: Node,
    _pins: PinGuard,
    next_endpoint_id: u32,
}

impl TestNode {
    pub fn new() -> Self {
        require_root();
        sweep_stale();
        let pins = PinGuard::new();
        let name = unique_name("node");
        let node = Node::create(&name).unwrap_or_else(|e| panic!("create node netns {name}: {e}"));
        let node_ns = NsGuard::adopt(node.netns().clone());
        let datapath = Datapath::load(pins.path(), MapSizes::default())
            .unwrap_or_else(|e| panic!("load datapath: {e}"));
        Self {
            datapath,
            pods: Vec::new(),
            node_ns,
            node,
            _pins: pins,
            next_endpoint_id: 100,
        }
    }

    /// Adds an endpoint called `short` with address `ip`, registers it in the endpoints map
    /// with the given enforcement, and attaches both programs to its host-side veth.
    pub fn add_pod(
        &mut self,
        short: &str,
        ip: Ipv4Addr,
        enforce_ingress: bool,
        enforce_egress: bool,
    ) -> TestPod {
        let ns_name = unique_name(short);
        let host_ifname: String = format!("lxc-{short}").chars().take(15).collect();
        let link = self
            .node
            .add_endpoint(&ns_name, &host_ifname, ip)
            .unwrap_or_else(|e| panic!("add endpoint {short}: {e}"));
        self.pods.push(NsGuard::adopt(link.netns.clone()));
        let endpoint_id = self.next_endpoint_id;
        self.next_endpoint_id += 1;
        self.datapath
            .endpoints()
            .upsert(EndpointEntry {
                ifindex: link.host_ifindex,
                endpoint_id,
                enforce_ingress,
                enforce_egress,
            })
            .unwrap_or_else(|e| panic!("register endpoint {short}: {e}"));
        self.datapath
            .attach_endpoint(self.node_ns.netns(), &link.host_ifname)
            .unwrap_or_else(|e| panic!("attach to {}: {e}", link.host_ifname));
        TestPod {
            netns: link.netns,
            ip,
            host_ifname: link.host_ifname,
            host_ifindex: link.host_ifindex,
            endpoint_id,
        }
    }

    pub fn datapath(&mut self) -> &mut Datapath {
        &mut self.datapath
    }

    pub fn node_netns(&self) -> &Netns {
        self.node_ns.netns()
    }
}

impl Default for TestNode {
    fn default() -> Self {
        Self::new()
    }
}
