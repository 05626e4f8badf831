//! Loading the eBPF object, pinning its maps, attaching the tc programs to endpoint
//! interfaces and detaching them.
//!
//! Attachment uses tcx (bpf links on the interface's tc ingress/egress hooks, kernel ≥ 6.6:
//! the successor of the clsact qdisc hook). A tcx link is released by closing its fd, which
//! is independent of the caller's network namespace, so detaching can never touch an
//! interface of the same index in another namespace. Attaching resolves the interface
//! *inside* the node namespace ([`Netns::run`]).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        tc::{SchedClassifierLinkId, TcAttachOptions},
    },
};
use membrane_common::names;

use crate::{
    error::{DatapathError, Result},
    maps::{CtMap, EndpointsMap, MetricsMap, PolicyMap},
    netns::Netns,
    object::EBPF_OBJECT,
};

/// Map capacities. Defaults follow Cilium's where one exists (policy map 16384 entries);
/// conntrack defaults to 65536 entries (Cilium: 512k TCP + 256k other, sized for a whole
/// node; raise it with the agent's configuration on busy nodes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    pub endpoints: u32,
    pub policy: u32,
    pub conntrack: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            endpoints: 1024,
            policy: 16384,
            conntrack: 65536,
        }
    }
}

/// The loaded datapath: programs, typed map handles and the attachments it made.
pub struct Datapath {
    ebpf: aya::Ebpf,
    pin_dir: PathBuf,
    endpoints: EndpointsMap,
    policy: PolicyMap,
    conntrack: CtMap,
    metrics: MetricsMap,
    /// Host interface name → (ingress link, egress link).
    attached: BTreeMap<String, (SchedClassifierLinkId, SchedClassifierLinkId)>,
}

impl Datapath {
    /// Loads the programs and creates (or reuses) the maps pinned under `pin_dir`.
    pub fn load(pin_dir: &Path, sizes: MapSizes) -> Result<Self> {
        for (name, size) in [
            (names::MAP_ENDPOINTS, sizes.endpoints),
            (names::MAP_POLICY_V4, sizes.policy),
            (names::MAP_CT_V4, sizes.conntrack),
        ] {
            if size == 0 {
                return Err(DatapathError::Invalid {
                    what: "map size",
                    detail: format!("`{name}` must have at least one entry"),
                });
            }
        }
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .map_max_entries(names::MAP_ENDPOINTS, sizes.endpoints)
            .map_max_entries(names::MAP_POLICY_V4, sizes.policy)
            .map_max_entries(names::MAP_CT_V4, sizes.conntrack)
            .load(EBPF_OBJECT)
            .map_err(|source| DatapathError::Load {
                pin_dir: pin_dir.to_owned(),
                source: Box::new(source),
            })?;

        for name in names::ALL_PROGRAMS {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(DatapathError::Missing {
                    kind: "program",
                    name,
                })?
                .try_into()
                .map_err(|source| DatapathError::Program {
                    program: name,
                    op: "type check".into(),
                    source,
                })?;
            program.load().map_err(|source| DatapathError::Program {
                program: name,
                op: "load (verifier)".into(),
                source,
            })?;
        }

        let mut take = |name: &'static str| {
            ebpf.take_map(name)
                .ok_or(DatapathError::Missing { kind: "map", name })
        };
        let endpoints = EndpointsMap::new(take(names::MAP_ENDPOINTS)?)?;
        let policy = PolicyMap::new(take(names::MAP_POLICY_V4)?)?;
        let conntrack = CtMap::new(take(names::MAP_CT_V4)?)?;
        let metrics = MetricsMap::new(take(names::MAP_METRICS)?)?;

        Ok(Self {
            ebpf,
            pin_dir: pin_dir.to_owned(),
            endpoints,
            policy,
            conntrack,
            metrics,
            attached: BTreeMap::new(),
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn endpoints(&mut self) -> &mut EndpointsMap {
        &mut self.endpoints
    }

    pub fn policy(&mut self) -> &mut PolicyMap {
        &mut self.policy
    }

    pub fn conntrack(&mut self) -> &mut CtMap {
        &mut self.conntrack
    }

    pub fn metrics(&self) -> &MetricsMap {
        &self.metrics
    }

    fn classifier(&mut self, name: &'static str) -> Result<&mut SchedClassifier> {
        self.ebpf
            .program_mut(name)
            .ok_or(DatapathError::Missing {
                kind: "program",
                name,
            })?
            .try_into()
            .map_err(|source| DatapathError::Program {
                program: name,
                op: "type check".into(),
                source,
            })
    }

    /// Attaches `from_endpoint` to the tc ingress hook and `to_endpoint` to the tc egress
    /// hook of `host_ifname` inside `node`.
    pub fn attach_endpoint(&mut self, node: &Netns, host_ifname: &str) -> Result<()> {
        if self.attached.contains_key(host_ifname) {
            return Ok(());
        }
        let ingress = self.attach_one(
            node,
            names::PROG_FROM_ENDPOINT,
            host_ifname,
            TcAttachType::Ingress,
        )?;
        let egress = match self.attach_one(
            node,
            names::PROG_TO_ENDPOINT,
            host_ifname,
            TcAttachType::Egress,
        ) {
            Ok(link) => link,
            Err(err) => {
                // Leave nothing half-attached.
                let _ = self.classifier(names::PROG_FROM_ENDPOINT)?.detach(ingress);
                return Err(err);
            }
        };
        self.attached
            .insert(host_ifname.to_owned(), (ingress, egress));
        Ok(())
    }

    fn attach_one(
        &mut self,
        node: &Netns,
        program: &'static str,
        ifname: &str,
        hook: TcAttachType,
    ) -> Result<SchedClassifierLinkId> {
        let classifier = self.classifier(program)?;
        let attached = node.run(move || {
            classifier.attach_with_options(
                ifname,
                hook,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
        })?;
        attached.map_err(|source| DatapathError::Program {
            program,
            op: format!("attach to {ifname} ({hook:?}) in netns {}", node.name()),
            source,
        })
    }

    /// Detaches both programs from `host_ifname`. Unknown interfaces are not an error: the
    /// interface may have disappeared with its namespace, which releases the links anyway.
    pub fn detach_endpoint(&mut self, host_ifname: &str) -> Result<()> {
        let Some((ingress, egress)) = self.attached.remove(host_ifname) else {
            return Ok(());
        };
        self.classifier(names::PROG_FROM_ENDPOINT)?
            .detach(ingress)
            .map_err(|source| DatapathError::Program {
                program: names::PROG_FROM_ENDPOINT,
                op: format!("detach from {host_ifname}"),
                source,
            })?;
        self.classifier(names::PROG_TO_ENDPOINT)?
            .detach(egress)
            .map_err(|source| DatapathError::Program {
                program: names::PROG_TO_ENDPOINT,
                op: format!("detach from {host_ifname}"),
                source,
            })
    }

    /// Interfaces with attached programs.
    pub fn attached_interfaces(&self) -> impl Iterator<Item = &str> {
        self.attached.keys().map(String::as_str)
    }

    /// Runs `program` once on `packet` (an Ethernet frame) with `BPF_PROG_TEST_RUN` and
    /// returns the tc verdict. The packet's interface is the caller's loopback (ifindex 1).
    pub fn test_run(&mut self, program: &'static str, packet: &[u8]) -> Result<i32> {
        use aya::programs::{TestRun as _, TestRunOptions};
        let classifier = self.classifier(program)?;
        let mut out = vec![0u8; packet.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ..TestRunOptions::new()
        };
        let result = classifier
            .test_run(opts)
            .map_err(|source| DatapathError::Program {
                program,
                op: "BPF_PROG_TEST_RUN".into(),
                source,
            })?;
        Ok(result.return_value as i32)
    }

    /// Detaches everything this instance attached. Pinned maps stay (see
    /// [`crate::bpffs::PinDir::remove`]).
    pub fn detach_all(&mut self) -> Result<()> {
        let names: Vec<String> = self.attached.keys().cloned().collect();
        for ifname in names {
            self.detach_endpoint(&ifname)?;
        }
        Ok(())
    }
}
