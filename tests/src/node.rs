//! [`TestNode`]: a node namespace with endpoints and a loaded datapath, all torn down on drop
//! (also when the test panics).

use std::net::Ipv4Addr;

use membrane_datapath::{Datapath, EndpointEntry, Ipv4Prefix, MapSizes, Netns, plumbing::Node};

use crate::{NsGuard, PinGuard, require_root, sweep_stale, unique_name};

/// An endpoint of a [`TestNode`].
#[derive(Debug, Clone)]
pub struct TestPod {
    pub netns: Netns,
    pub ip: Ipv4Addr,
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub endpoint_id: u32,
    pub identity: u32,
}

/// A node namespace, its endpoints and the datapath attached to them.
///
/// Field order is drop order: the datapath handle first, then the endpoint namespaces (their
/// veths and so the links on them go too), the node namespace, and finally the private
/// bpffs with the pinned maps and links.
pub struct TestNode {
    datapath: Option<Datapath>,
    host_ifnames: Vec<String>,
    pods: Vec<NsGuard>,
    node_ns: NsGuard,
    node: Node,
    pins: PinGuard,
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
            datapath: Some(datapath),
            host_ifnames: Vec::new(),
            pods: Vec::new(),
            node_ns,
            node,
            pins,
            next_endpoint_id: 100,
        }
    }

    /// Adds an endpoint called `short` with address `ip` and security identity `identity`,
    /// registers it in the endpoints map (with the given enforcement) and the ipcache, and
    /// attaches both programs to its host-side veth.
    pub fn add_pod(
        &mut self,
        short: &str,
        ip: Ipv4Addr,
        identity: u32,
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
        self.datapath()
            .endpoints()
            .upsert(EndpointEntry {
                ifindex: link.host_ifindex,
                endpoint_id,
                identity,
                enforce_ingress,
                enforce_egress,
            })
            .unwrap_or_else(|e| panic!("register endpoint {short}: {e}"));
        self.datapath()
            .ipcache()
            .upsert(Ipv4Prefix::host(ip), identity)
            .unwrap_or_else(|e| panic!("ipcache entry for {short}: {e}"));
        self.host_ifnames.push(link.host_ifname.clone());
        let node_ns = self.node_ns.netns().clone();
        self.datapath()
            .attach_endpoint(&node_ns, &link.host_ifname)
            .unwrap_or_else(|e| panic!("attach to {}: {e}", link.host_ifname));
        TestPod {
            netns: link.netns,
            ip,
            host_ifname: link.host_ifname,
            host_ifindex: link.host_ifindex,
            endpoint_id,
            identity,
        }
    }

    /// Adds a host without datapath programs (a "world" host behind the node), reachable
    /// from the pods through the node's routing.
    pub fn add_external_host(&mut self, short: &str, ip: Ipv4Addr) -> Netns {
        let ns_name = unique_name(short);
        let host_ifname: String = format!("ext-{short}").chars().take(15).collect();
        let link = self
            .node
            .add_endpoint(&ns_name, &host_ifname, ip)
            .unwrap_or_else(|e| panic!("add external host {short}: {e}"));
        self.pods.push(NsGuard::adopt(link.netns.clone()));
        link.netns
    }

    /// What an agent restart does to the datapath: this process's handle goes away (links
    /// and maps stay pinned, so enforcement continues), then a new handle loads the programs
    /// again from the same pins and swaps them into the pinned links.
    pub fn restart_datapath(&mut self, between: impl FnOnce()) {
        let pins = self.pins.path().to_owned();
        // The old handle goes first: `between` runs while no process holds the datapath.
        self.datapath = None;
        between();
        let mut datapath = Datapath::load(&pins, MapSizes::default())
            .unwrap_or_else(|e| panic!("reload datapath: {e}"));
        for ifname in &self.host_ifnames {
            datapath
                .attach_endpoint(self.node_ns.netns(), ifname)
                .unwrap_or_else(|e| panic!("re-attach {ifname}: {e}"));
        }
        self.datapath = Some(datapath);
    }

    pub fn datapath(&mut self) -> &mut Datapath {
        self.datapath
            .as_mut()
            .expect("a datapath is loaded outside restart_datapath")
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
