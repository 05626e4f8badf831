//! Cluster-pool IPAM: pod CIDR blocks for nodes out of `clusterPoolIPv4PodCIDRList` in
//! blocks of `clusterPoolIPv4MaskSize` (Cilium's Helm keys, reference `cluster.md` §3.2),
//! and addresses for endpoints inside a node's block.
//!
//! Blocks are claimed in etcd with a create-only transaction per block
//! (`podcidr/v1/<cluster>/<cidr>`), so two nodes racing for blocks never get the same one,
//! whoever runs the allocation (a node for itself or the operator role for it). Claims have
//! no lease: a block stays with its node across agent restarts and etcd outages until it is
//! released explicitly. Endpoint addresses are allocated locally and deterministically
//! (lowest free first, so freed addresses are reused); the agent restores them from its
//! endpoint registry with [`EndpointAddressAllocator::allocate_specific`] after a restart.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::IpamError;
use crate::keys::{self, PodCidrClaim, StoreValue};
use crate::store::Store;

/// Bound on claim attempts for one node when other nodes keep taking the block it picked.
pub const MAX_CIDR_CLAIM_ATTEMPTS: u32 = 16;

/// An IPv4 network (`10.244.1.0/24`), host bits zero. Stored and shown as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    len: u8,
}

impl Ipv4Cidr {
    /// A network; `None` if `len > 32` or host bits are set.
    pub fn new(addr: Ipv4Addr, len: u8) -> Option<Ipv4Cidr> {
        if len > 32 || u32::from(addr) & !mask(len) != 0 {
            return None;
        }
        Some(Ipv4Cidr { addr, len })
    }

    /// The network address.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// Number of addresses (2^(32-len)).
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.len))
    }

    /// True if `ip` is inside.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.len) == u32::from(self.addr)
    }

    /// The `index`-th block of prefix length `len` inside this network.
    fn block(&self, len: u8, index: u64) -> Option<Ipv4Cidr> {
        if len < self.len || len > 32 || index >= 1u64 << (len - self.len) {
            return None;
        }
        let step = 1u64 << (32 - u32::from(len));
        let start = u64::from(u32::from(self.addr)) + index * step;
        Ipv4Cidr::new(Ipv4Addr::from(u32::try_from(start).ok()?), len)
    }

    /// The address at `offset` from the network address, if inside.
    fn nth(&self, offset: u64) -> Option<Ipv4Addr> {
        if offset >= self.size() {
            return None;
        }
        u32::try_from(u64::from(u32::from(self.addr)) + offset)
            .ok()
            .map(Ipv4Addr::from)
    }
}

fn mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len.min(32)))
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = IpamError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || IpamError::BadCidr { text: s.to_owned() };
        let (a, l) = s.split_once('/').ok_or_else(bad)?;
        let addr = Ipv4Addr::from_str(a).map_err(|_| bad())?;
        if l.is_empty() || !l.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let len = l.parse::<u8>().map_err(|_| bad())?;
        Ipv4Cidr::new(addr, len).ok_or_else(bad)
    }
}

impl Serialize for Ipv4Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ipv4Cidr::from_str(&s).map_err(serde::de::Error::custom)
    }
}

/// The cluster pool (Helm `ipam.operator.clusterPoolIPv4PodCIDRList` /
/// `clusterPoolIPv4MaskSize`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterPoolConfig {
    /// Pools, in the order blocks are handed out. Cilium's default is `["10.0.0.0/8"]`.
    #[serde(rename = "clusterPoolIPv4PodCIDRList")]
    pub pod_cidr_list: Vec<Ipv4Cidr>,
    /// Prefix length of each node's block. Cilium's default is 24.
    #[serde(rename = "clusterPoolIPv4MaskSize")]
    pub mask_size: u8,
}

impl ClusterPoolConfig {
    /// Checks that every pool can hold blocks of the mask size, each with room for
    /// endpoints (at most /30: network, router, one endpoint, broadcast).
    pub fn validate(&self) -> Result<(), IpamError> {
        if self.pod_cidr_list.is_empty() {
            return Err(IpamError::NoPool);
        }
        for pool in &self.pod_cidr_list {
            if self.mask_size < pool.prefix_len() || self.mask_size > 30 {
                return Err(IpamError::BadMask {
                    pool: pool.to_string(),
                    mask: self.mask_size,
                    min: pool.prefix_len(),
                });
            }
        }
        Ok(())
    }

    /// Every block, in hand-out order (pools in list order, blocks by address).
    pub fn blocks(&self) -> impl Iterator<Item = Ipv4Cidr> + '_ {
        self.pod_cidr_list.iter().flat_map(move |pool| {
            let count = 1u64 << (self.mask_size.saturating_sub(pool.prefix_len()));
            (0..count).filter_map(move |i| pool.block(self.mask_size, i))
        })
    }

    fn pools_text(&self) -> String {
        self.pod_cidr_list
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Claims pod CIDR blocks for nodes in the store.
#[derive(Clone)]
pub struct PodCidrAllocator {
    store: Store,
    pool: ClusterPoolConfig,
}

impl PodCidrAllocator {
    /// An allocator over `pool` (validated).
    pub fn new(store: &Store, pool: ClusterPoolConfig) -> Result<PodCidrAllocator, IpamError> {
        pool.validate()?;
        Ok(PodCidrAllocator {
            store: store.clone(),
            pool,
        })
    }

    /// Every claim of the cluster: block → node. Values that do not parse are counted and
    /// left out (their blocks stay taken: [`Self::allocate`] never creates over them).
    pub async fn claims(&self) -> Result<BTreeMap<Ipv4Cidr, String>, IpamError> {
        let prefix = keys::podcidr_prefix(self.store.cluster());
        let (kvs, _) = self.store.inner().get_prefix(&prefix, false).await?;
        let mut out = BTreeMap::new();
        for kv in kvs {
            let decoded = keys::key_str(kv.key()).and_then(|key| {
                let cidr = keys::parse_podcidr_key(key)?;
                let claim = PodCidrClaim::decode(key, kv.value())?;
                Ok((cidr, claim.node))
            });
            match decoded {
                Ok((cidr, node)) => {
                    out.insert(cidr, node);
                }
                Err(e) => self.store.inner().metrics.bad_value(&e),
            }
        }
        Ok(out)
    }

    /// The block `node` holds, if any.
    pub async fn lookup(&self, node: &str) -> Result<Option<Ipv4Cidr>, IpamError> {
        Ok(self
            .claims()
            .await?
            .into_iter()
            .find(|(_, n)| n == node)
            .map(|(c, _)| c))
    }

    /// The block of `node`: the one it already holds, else the first free block of the pool,
    /// claimed with a create-only transaction. [`IpamError::PoolExhausted`] when every block
    /// is claimed.
    pub async fn allocate(&self, node: &str) -> Result<Ipv4Cidr, IpamError> {
        let cluster = self.store.cluster().to_owned();
        let mut claims = self.claims().await?;
        if let Some((c, _)) = claims.iter().find(|(_, n)| *n == node) {
            return Ok(*c);
        }
        // Keys that exist but did not decode are taken too.
        let taken_raw: BTreeSet<String> = {
            let (kvs, _) = self
                .store
                .inner()
                .get_prefix(&keys::podcidr_prefix(&cluster), true)
                .await?;
            kvs.iter()
                .filter_map(|kv| keys::key_str(kv.key()).ok().map(str::to_owned))
                .collect()
        };
        let value = PodCidrClaim {
            node: node.to_owned(),
        }
        .encode();
        for _ in 0..MAX_CIDR_CLAIM_ATTEMPTS {
            let Some(block) = self.pool.blocks().find(|b| {
                !claims.contains_key(b) && !taken_raw.contains(&keys::podcidr_key(&cluster, *b))
            }) else {
                return Err(IpamError::PoolExhausted {
                    pools: self.pool.pools_text(),
                    mask: self.pool.mask_size,
                    node: node.to_owned(),
                });
            };
            let key = keys::podcidr_key(&cluster, block);
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key.clone(), value.clone(), None::<PutOptions>)]);
            let resp = self.store.inner().txn(&key, txn).await?;
            if resp.succeeded() {
                return Ok(block);
            }
            // Someone else took it meanwhile: remember and try the next free one.
            claims.insert(block, String::new());
        }
        Err(IpamError::Contended {
            node: node.to_owned(),
            attempts: MAX_CIDR_CLAIM_ATTEMPTS,
        })
    }

    /// Releases the block `node` holds (only if it still holds it); returns it.
    pub async fn release(&self, node: &str) -> Result<Option<Ipv4Cidr>, IpamError> {
        let Some(block) = self.lookup(node).await? else {
            return Ok(None);
        };
        let key = keys::podcidr_key(self.store.cluster(), block);
        let value = PodCidrClaim {
            node: node.to_owned(),
        }
        .encode();
        let txn = Txn::new()
            .when([Compare::value(key.clone(), CompareOp::Equal, value)])
            .and_then([TxnOp::delete(key.clone(), None)]);
        let resp = self.store.inner().txn(&key, txn).await?;
        Ok(resp.succeeded().then_some(block))
    }
}

/// Endpoint addresses inside a node's block: the network address, the first host address
/// (the node's router, Cilium's `cilium_host` address) and the broadcast address are never
/// handed out; the lowest free address is.
#[derive(Debug, Clone)]
pub struct EndpointAddressAllocator {
    block: Ipv4Cidr,
    used: BTreeSet<Ipv4Addr>,
}

impl EndpointAddressAllocator {
    /// An allocator for `block` (at most /30).
    pub fn new(block: Ipv4Cidr) -> Result<EndpointAddressAllocator, IpamError> {
        if block.prefix_len() > 30 {
            return Err(IpamError::BadMask {
                pool: block.to_string(),
                mask: block.prefix_len(),
                min: 0,
            });
        }
        Ok(EndpointAddressAllocator {
            block,
            used: BTreeSet::new(),
        })
    }

    /// The block.
    pub fn block(&self) -> Ipv4Cidr {
        self.block
    }

    /// The node's router address (first host address), never handed to an endpoint.
    pub fn router_ip(&self) -> Ipv4Addr {
        // `new` guarantees at least 4 addresses.
        self.block.nth(1).unwrap_or(self.block.addr())
    }

    fn assignable(&self, ip: Ipv4Addr) -> bool {
        let offset = u64::from(u32::from(ip)).wrapping_sub(u64::from(u32::from(self.block.addr())));
        self.block.contains(ip) && offset >= 2 && offset < self.block.size() - 1
    }

    /// The lowest free address.
    pub fn allocate(&mut self) -> Result<Ipv4Addr, IpamError> {
        let ip = (2..self.block.size() - 1)
            .filter_map(|o| self.block.nth(o))
            .find(|ip| !self.used.contains(ip))
            .ok_or_else(|| IpamError::BlockExhausted {
                block: self.block.to_string(),
            })?;
        self.used.insert(ip);
        Ok(ip)
    }

    /// Marks `ip` used (restoring endpoints after a restart).
    pub fn allocate_specific(&mut self, ip: Ipv4Addr) -> Result<(), IpamError> {
        if !self.assignable(ip) {
            return Err(IpamError::NotInBlock {
                ip: IpAddr::V4(ip),
                block: self.block.to_string(),
            });
        }
        if !self.used.insert(ip) {
            return Err(IpamError::InUse {
                ip: IpAddr::V4(ip),
                block: self.block.to_string(),
            });
        }
        Ok(())
    }

    /// Frees `ip`; false if it was not allocated.
    pub fn release(&mut self, ip: Ipv4Addr) -> bool {
        self.used.remove(&ip)
    }

    /// Allocated addresses.
    pub fn used(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.used.iter().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parsing_is_strict() {
        assert_eq!(
            "10.0.0.0/8".parse::<Ipv4Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        for bad in [
            "10.0.0.1/8",
            "10.0.0.0/33",
            "10.0.0.0",
            "x/8",
            "10.0.0.0/+8",
        ] {
            assert!(bad.parse::<Ipv4Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn blocks_in_order() {
        let pool = ClusterPoolConfig {
            pod_cidr_list: vec![
                "10.1.0.0/23".parse().unwrap(),
                "10.9.0.0/24".parse().unwrap(),
            ],
            mask_size: 24,
        };
        pool.validate().unwrap();
        let b: Vec<String> = pool.blocks().map(|b| b.to_string()).collect();
        assert_eq!(b, ["10.1.0.0/24", "10.1.1.0/24", "10.9.0.0/24"]);
        let bad = ClusterPoolConfig {
            pod_cidr_list: vec!["10.1.0.0/24".parse().unwrap()],
            mask_size: 23,
        };
        assert!(matches!(bad.validate(), Err(IpamError::BadMask { .. })));
    }

    #[test]
    fn endpoint_addresses_lowest_free_first() {
        let mut a = EndpointAddressAllocator::new("10.244.1.0/29".parse().unwrap()).unwrap();
        assert_eq!(a.router_ip(), Ipv4Addr::new(10, 244, 1, 1));
        let got: Vec<Ipv4Addr> = (0..5).map(|_| a.allocate().unwrap()).collect();
        assert_eq!(got.first(), Some(&Ipv4Addr::new(10, 244, 1, 2)));
        assert_eq!(got.last(), Some(&Ipv4Addr::new(10, 244, 1, 6)));
        assert!(matches!(
            a.allocate(),
            Err(IpamError::BlockExhausted { .. })
        ));
        assert!(a.release(Ipv4Addr::new(10, 244, 1, 4)));
        assert_eq!(a.allocate().unwrap(), Ipv4Addr::new(10, 244, 1, 4));
        assert!(matches!(
            a.allocate_specific(Ipv4Addr::new(10, 244, 1, 7)),
            Err(IpamError::NotInBlock { .. })
        ));
        assert!(matches!(
            a.allocate_specific(Ipv4Addr::new(10, 244, 1, 1)),
            Err(IpamError::NotInBlock { .. })
        ));
        assert!(matches!(
            a.allocate_specific(Ipv4Addr::new(10, 244, 1, 3)),
            Err(IpamError::InUse { .. })
        ));
    }
}
