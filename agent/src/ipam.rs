//! Node IPAM: the node's pod CIDR block and the addresses handed out of it, to the CNI
//! plugin (`IpamAllocate`/`IpamRelease`, one address per CNI attachment, the same one again
//! for a retried request) and reserved for endpoints registered with an address of the
//! block. Also the announcement to the container runtime: `05-membrane.conflist` in the
//! CNI config directory while the agent serves the API and has a block.
//!
//! The block comes from `--pod-cidr`, else (cluster mode) from the block the cluster pool gave
//! the node (`ClusterClient::pod_cidr`), read at start. Addresses: the network address,
//! the first address (the router's, as Cilium reserves it for `cilium_host`) and the
//! broadcast address are never handed out; the lowest free address goes first. Handed-out
//! addresses are saved in the run directory (`ipam.json`) on every change, and a restarted
//! agent also reserves the address of every endpoint it takes over, so no address is handed
//! out twice across restarts.
//!
//! Self-contained: [`NodeIpam`] is pure bookkeeping (no I/O); the `State` methods at the end
//! do the saving, the conflist and the API.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use membrane_agent_api::{
    api::{IpamAllocated, IpamAllocation, IpamReleased, IpamState},
    cni::{CONFLIST_FILE, NetworkConfigList},
    run_dir::write_atomically,
};
use membrane_cluster::Ipv4Cidr;
use serde::{Deserialize, Serialize};

use crate::daemon::State;

/// Owner prefix of an address reserved for an endpoint registered with it directly.
const ENDPOINT_OWNER_PREFIX: &str = "endpoint:";

/// Why an address could not be handed out or reserved.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IpamError {
    #[error("the node has no pod CIDR yet (--pod-cidr, or the cluster pool)")]
    NoBlock,
    #[error("pod CIDR {block} is full: all {usable} addresses are handed out")]
    Exhausted { block: Ipv4Cidr, usable: u64 },
    #[error("an address owner must not be empty")]
    EmptyOwner,
    #[error("{ip} is not a pod address of {block}")]
    OutsideBlock { ip: Ipv4Addr, block: Ipv4Cidr },
    #[error("{ip} already belongs to {owner}")]
    Taken { ip: Ipv4Addr, owner: String },
}

/// The node's block and who holds which address.
#[derive(Debug, Default, Clone)]
pub struct NodeIpam {
    block: Option<Ipv4Cidr>,
    by_ip: BTreeMap<Ipv4Addr, String>,
    by_owner: BTreeMap<String, Ipv4Addr>,
}

impl NodeIpam {
    pub fn new(block: Option<Ipv4Cidr>) -> Self {
        Self {
            block,
            ..Self::default()
        }
    }

    pub fn block(&self) -> Option<Ipv4Cidr> {
        self.block
    }

    /// Sets (or clears) the block. Addresses outside the new block are forgotten and
    /// returned with their owners.
    pub fn set_block(&mut self, block: Option<Ipv4Cidr>) -> Vec<(Ipv4Addr, String)> {
        self.block = block;
        let gone: Vec<(Ipv4Addr, String)> = self
            .by_ip
            .iter()
            .filter(|(ip, _)| !self.usable(**ip))
            .map(|(ip, owner)| (*ip, owner.clone()))
            .collect();
        for (ip, owner) in &gone {
            self.by_ip.remove(ip);
            self.by_owner.remove(owner);
        }
        gone
    }

    /// True if `ip` may be handed out: inside the block, neither its network, first nor
    /// broadcast address.
    pub fn usable(&self, ip: Ipv4Addr) -> bool {
        let Some(block) = self.block else {
            return false;
        };
        if !block.contains(ip) {
            return false;
        }
        let offset = u64::from(u32::from(ip) - u32::from(block.addr()));
        offset >= 2 && offset + 1 < block.size()
    }

    /// How many addresses the block has for pods.
    pub fn usable_count(&self) -> u64 {
        self.block.map_or(0, |b| b.size().saturating_sub(3))
    }

    /// `owner`'s address: the one it holds, else the lowest free one.
    pub fn allocate(&mut self, owner: &str) -> Result<Ipv4Addr, IpamError> {
        if owner.is_empty() {
            return Err(IpamError::EmptyOwner);
        }
        let block = self.block.ok_or(IpamError::NoBlock)?;
        if let Some(ip) = self.by_owner.get(owner) {
            return Ok(*ip);
        }
        let first = u32::from(block.addr()) + 2;
        let last = u32::from(block.addr()) + u32::try_from(block.size() - 2).unwrap_or(u32::MAX);
        let ip = (first..=last)
            .map(Ipv4Addr::from)
            .find(|ip| !self.by_ip.contains_key(ip))
            .ok_or(IpamError::Exhausted {
                block,
                usable: self.usable_count(),
            })?;
        self.by_ip.insert(ip, owner.to_owned());
        self.by_owner.insert(owner.to_owned(), ip);
        Ok(ip)
    }

    /// Marks `ip` as `owner`'s (an address that is already in use: a restored endpoint, a
    /// saved allocation). Holding it already is fine.
    pub fn reserve(&mut self, ip: Ipv4Addr, owner: &str) -> Result<(), IpamError> {
        if owner.is_empty() {
            return Err(IpamError::EmptyOwner);
        }
        let block = self.block.ok_or(IpamError::NoBlock)?;
        if !self.usable(ip) {
            return Err(IpamError::OutsideBlock { ip, block });
        }
        match self.by_ip.get(&ip) {
            Some(o) if o == owner => return Ok(()),
            Some(o) => {
                return Err(IpamError::Taken {
                    ip,
                    owner: o.clone(),
                });
            }
            None => {}
        }
        if let Some(previous) = self.by_owner.insert(owner.to_owned(), ip) {
            self.by_ip.remove(&previous);
        }
        self.by_ip.insert(ip, owner.to_owned());
        Ok(())
    }

    /// Gives `owner`'s address back.
    pub fn release(&mut self, owner: &str) -> Option<Ipv4Addr> {
        let ip = self.by_owner.remove(owner)?;
        self.by_ip.remove(&ip);
        Some(ip)
    }

    /// Who holds `ip`.
    pub fn owner_of(&self, ip: Ipv4Addr) -> Option<&str> {
        self.by_ip.get(&ip).map(String::as_str)
    }

    pub fn allocations(&self) -> impl Iterator<Item = (Ipv4Addr, &str)> {
        self.by_ip.iter().map(|(ip, o)| (*ip, o.as_str()))
    }

    pub fn state(&self) -> IpamState {
        IpamState {
            pod_cidr: self.block.map(|b| b.to_string()),
            allocations: self
                .allocations()
                .map(|(ip, owner)| IpamAllocation {
                    ip,
                    owner: owner.to_owned(),
                })
                .collect(),
            free: self.usable_count() - self.by_ip.len() as u64,
        }
    }
}

/// The owner of an address reserved for the endpoint `namespace/name`.
pub fn endpoint_owner(namespace: &str, name: &str) -> String {
    format!("{ENDPOINT_OWNER_PREFIX}{namespace}/{name}")
}

/// `ipam.json`: what was handed out, for a restarted agent.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedIpam {
    pod_cidr: Option<Ipv4Cidr>,
    allocations: Vec<IpamAllocation>,
}

/// The file the runtime reads, in `dir`.
fn conflist_path(dir: &Path) -> PathBuf {
    dir.join(CONFLIST_FILE)
}

impl State {
    /// At start: the block of `--pod-cidr` and what the previous agent handed out of it
    /// (allocations outside the block are dropped, with a warning).
    pub(crate) fn restore_ipam(&mut self) {
        // `--pod-cidr`, else (cluster mode) the block the cluster pool gave this node.
        let block = self
            .config
            .pods
            .pod_cidr
            .as_ref()
            .and_then(|p| {
                p.to_string()
                    .parse::<Ipv4Cidr>()
                    .inspect_err(|e| tracing::error!(error = %e, "pod CIDR"))
                    .ok()
            })
            .or_else(|| self.cluster.as_ref().and_then(|c| c.pod_cidr()));
        self.ipam = NodeIpam::new(block);
        let path = self.config.run_dir().ipam();
        let Ok(bytes) = std::fs::read(&path) else {
            return;
        };
        let saved: SavedIpam = match serde_json::from_slice(&bytes) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "unreadable IPAM state; starting empty");
                return;
            }
        };
        for a in saved.allocations {
            if let Err(e) = self.ipam.reserve(a.ip, &a.owner) {
                tracing::warn!(ip = %a.ip, owner = %a.owner, error = %e, "saved pod address not restored");
            }
        }
    }

    /// Reserves the address of every registered endpoint inside the block (after the
    /// endpoints were taken over at start, or one was registered over the API).
    pub(crate) fn reserve_endpoint_addresses(&mut self) {
        let wanted: Vec<(Ipv4Addr, String)> = self
            .endpoints
            .values()
            .filter(|e| self.ipam.usable(e.spec.ipv4) && self.ipam.owner_of(e.spec.ipv4).is_none())
            .map(|e| (e.spec.ipv4, endpoint_owner(&e.spec.namespace, &e.spec.name)))
            .collect();
        if wanted.is_empty() {
            return;
        }
        for (ip, owner) in wanted {
            if let Err(e) = self.ipam.reserve(ip, &owner) {
                tracing::warn!(%ip, %owner, error = %e, "endpoint address not reserved");
            }
        }
        self.save_ipam();
    }

    /// An endpoint left: an address reserved for it (not one a CNI attachment holds) is free
    /// again.
    pub(crate) fn release_endpoint_address(&mut self, namespace: &str, name: &str) {
        if self
            .ipam
            .release(&endpoint_owner(namespace, name))
            .is_some()
        {
            self.save_ipam();
        }
    }

    fn save_ipam(&self) {
        let saved = SavedIpam {
            pod_cidr: self.ipam.block(),
            allocations: self.ipam.state().allocations,
        };
        let path = self.config.run_dir().ipam();
        let written = serde_json::to_vec_pretty(&saved)
            .map_err(std::io::Error::other)
            .and_then(|bytes| write_atomically(&path, &bytes));
        if let Err(e) = written {
            // The addresses stay handed out in memory; a restart re-reserves those of the
            // endpoints it takes over.
            tracing::error!(file = %path.display(), error = %e, "could not save the IPAM state");
        }
    }

    /// `IpamAllocate`.
    pub(crate) fn ipam_allocate(&mut self, owner: &str) -> Result<IpamAllocated, IpamError> {
        let ip = self.ipam.allocate(owner)?;
        self.save_ipam();
        Ok(IpamAllocated {
            ip,
            pod_cidr: self.ipam.block().map(|b| b.to_string()).unwrap_or_default(),
            gateway: membrane_datapath::plumbing::POD_GATEWAY,
        })
    }

    /// `IpamRelease`.
    pub(crate) fn ipam_release(&mut self, owner: &str) -> IpamReleased {
        let ip = self.ipam.release(owner);
        if ip.is_some() {
            self.save_ipam();
        }
        IpamReleased { ip }
    }

    /// Writes the conflist into `--cni-conf-dir` if the node has a block (removes it if it
    /// has none): the runtime starts calling `membrane-cni` when the file appears. Called
    /// once the API serves.
    pub(crate) fn announce_to_runtime(&mut self) {
        let Some(dir) = self.config.pods.cni_conf_dir.clone() else {
            return;
        };
        let path = conflist_path(&dir);
        self.cni_announced = Some(path.clone());
        if self.ipam.block().is_none() {
            let _ = std::fs::remove_file(&path);
            tracing::info!(dir = %dir.display(), "no pod CIDR: the CNI configuration is not written");
            return;
        }
        let list = NetworkConfigList::for_agent(self.config.run_dir().agent_socket());
        let written = serde_json::to_vec_pretty(&list)
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                std::fs::create_dir_all(&dir)?;
                write_atomically(&path, &bytes)
            });
        match written {
            Ok(()) => tracing::info!(file = %path.display(), "CNI configuration written"),
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "could not write the CNI configuration")
            }
        }
    }

    /// At stop: the runtime must not call a plugin whose agent is gone.
    pub(crate) fn withdraw_from_runtime(&mut self) {
        if let Some(path) = self.cni_announced.take() {
            match std::fs::remove_file(&path) {
                Ok(()) => tracing::info!(file = %path.display(), "CNI configuration removed"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "could not remove the CNI configuration")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipam(cidr: &str) -> NodeIpam {
        NodeIpam::new(Some(cidr.parse().expect("cidr")))
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("ip")
    }

    #[test]
    fn skips_network_router_and_broadcast_and_reuses_the_lowest_free() {
        let mut ipam = ipam("10.1.0.0/29");
        assert_eq!(ipam.usable_count(), 5);
        let got: Vec<Ipv4Addr> = (0..5)
            .map(|i| ipam.allocate(&format!("c{i}/eth0")).expect("free"))
            .collect();
        assert_eq!(got.first(), Some(&ip("10.1.0.2")));
        assert_eq!(got.last(), Some(&ip("10.1.0.6")));
        assert_eq!(
            ipam.allocate("c5/eth0"),
            Err(IpamError::Exhausted {
                block: "10.1.0.0/29".parse().expect("cidr"),
                usable: 5
            })
        );
        assert_eq!(ipam.release("c2/eth0"), Some(ip("10.1.0.4")));
        assert_eq!(ipam.release("c2/eth0"), None, "release is idempotent");
        assert_eq!(ipam.allocate("c6/eth0"), Ok(ip("10.1.0.4")));
        assert_eq!(ipam.state().free, 0);
    }

    #[test]
    fn the_same_owner_gets_the_same_address() {
        let mut ipam = ipam("10.1.0.0/24");
        let a = ipam.allocate("abc/eth0").expect("a");
        assert_eq!(ipam.allocate("abc/eth0"), Ok(a));
        assert_ne!(ipam.allocate("abd/eth0").expect("b"), a);
        assert_eq!(ipam.allocate(""), Err(IpamError::EmptyOwner));
    }

    #[test]
    fn reserved_addresses_are_never_handed_out_again() {
        let mut ipam = ipam("10.1.0.0/24");
        ipam.reserve(ip("10.1.0.2"), "endpoint:default/a")
            .expect("reserve");
        ipam.reserve(ip("10.1.0.2"), "endpoint:default/a")
            .expect("again is fine");
        assert_eq!(ipam.allocate("x/eth0"), Ok(ip("10.1.0.3")));
        assert_eq!(
            ipam.reserve(ip("10.1.0.3"), "y/eth0"),
            Err(IpamError::Taken {
                ip: ip("10.1.0.3"),
                owner: "x/eth0".into()
            })
        );
        for outside in ["10.1.0.0", "10.1.0.1", "10.1.0.255", "10.2.0.5"] {
            assert!(matches!(
                ipam.reserve(ip(outside), "z/eth0"),
                Err(IpamError::OutsideBlock { .. })
            ));
        }
    }

    #[test]
    fn without_a_block_nothing_is_handed_out_and_a_new_block_drops_what_is_outside() {
        let mut ipam = NodeIpam::new(None);
        assert_eq!(ipam.allocate("a/eth0"), Err(IpamError::NoBlock));
        assert_eq!(ipam.state().pod_cidr, None);
        ipam.set_block(Some("10.1.0.0/24".parse().expect("cidr")));
        let a = ipam.allocate("a/eth0").expect("a");
        let gone = ipam.set_block(Some("10.9.0.0/24".parse().expect("cidr")));
        assert_eq!(gone, vec![(a, "a/eth0".to_owned())]);
        assert_eq!(ipam.allocate("a/eth0"), Ok(ip("10.9.0.2")));
    }

    #[test]
    fn a_slash_30_has_one_pod_address() {
        let mut ipam = ipam("10.1.0.4/30");
        assert_eq!(ipam.allocate("a/eth0"), Ok(ip("10.1.0.6")));
        assert!(matches!(
            ipam.allocate("b/eth0"),
            Err(IpamError::Exhausted { usable: 1, .. })
        ));
    }
}
