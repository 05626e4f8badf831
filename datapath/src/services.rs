//! Service load balancing in the kernel, userspace side: typed handles over the service
//! maps ([`ServiceMaps`]), writing a desired state into them ([`ServiceMaps::apply`]), and
//! attaching the cgroup socket programs to a cgroup v2 directory
//! ([`crate::Datapath::attach_socket_lb`]).
//!
//! Ids are node-local and owned here: a backend's id is kept as long as some frontend uses
//! its (address, port, protocol), a frontend's service id as long as the frontend (address,
//! port, protocol, scope) exists, both recovered from the pinned maps when a new process
//! takes over. [`ServiceMaps::apply`] writes what is new first and removes what is stale
//! after, and for each frontend writes the slots before the entry that counts them, so the
//! programs never see a count larger than the slots behind it.
//!
//! Takes plain entries ([`ServiceFrontend`]); the agent converts the policy crate's
//! `LbState` (this crate must not depend on the model).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    net::Ipv4Addr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use membrane_common::{
    Lb4Affinity, Lb4AffinityKey, Lb4Backend, Lb4ReverseSk, Lb4ReverseSkKey, Lb4Service,
    Lb4ServiceKey, Lb4SlotKey, LbAffinityMatchKey, LbConfig, MAGLEV_TABLE_SIZE, MaglevTable,
    backend_state, lb_algorithm, lb_config_flags, lb_scope, names, service_flags, sock_lb_counter,
};

use crate::{
    error::{DatapathError, Result},
    maps::open_pinned,
    netns::Netns,
};

fn map_err(
    map: &'static str,
    op: &'static str,
) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { map, op, source }
}

/// Kubernetes' default NodePort range.
pub const NODEPORT_RANGE_DEFAULT: (u16, u16) = (30000, 32767);

/// Where a frontend comes from (sets its [`service_flags`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServiceKind {
    ClusterIp,
    /// Address 0.0.0.0: every address of the node.
    NodePort,
    ExternalIp,
    LoadBalancer,
}

/// Which clients a frontend entry serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServiceScope {
    External,
    Internal,
}

/// A backend's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BackendState {
    Active,
    Terminating,
    Quarantined,
    Maintenance,
}

impl BackendState {
    fn code(self) -> u8 {
        match self {
            BackendState::Active => backend_state::ACTIVE,
            BackendState::Terminating => backend_state::TERMINATING,
            BackendState::Quarantined => backend_state::QUARANTINED,
            BackendState::Maintenance => backend_state::MAINTENANCE,
        }
    }

    fn from_code(code: u8) -> Self {
        match code {
            backend_state::ACTIVE => BackendState::Active,
            backend_state::TERMINATING => BackendState::Terminating,
            backend_state::QUARANTINED => BackendState::Quarantined,
            _ => BackendState::Maintenance,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Active => "active",
            BackendState::Terminating => "terminating",
            BackendState::Quarantined => "quarantined",
            BackendState::Maintenance => "maintenance",
        }
    }
}

/// One backend of a frontend.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceBackend {
    pub address: Ipv4Addr,
    pub port: u16,
    pub state: BackendState,
}

/// One frontend entry of the desired state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceFrontend {
    pub address: Ipv4Addr,
    pub port: u16,
    /// IP protocol number (TCP 6 or UDP 17).
    pub protocol: u8,
    pub scope: ServiceScope,
    pub kind: ServiceKind,
    /// An internal-scope entry exists for the same frontend (set on the external one).
    pub two_scopes: bool,
    /// Node-local backends only (traffic policy `Local` in this scope).
    pub local_only: bool,
    pub affinity_timeout_secs: Option<u32>,
    /// In any order; active backends get slots `1..=count`, the others after them.
    pub backends: Vec<ServiceBackend>,
    /// Maglev table as indices into `backends` (exactly [`MAGLEV_TABLE_SIZE`] entries),
    /// for the per-packet path.
    pub maglev: Option<Vec<u32>>,
}

impl ServiceFrontend {
    fn key(&self) -> Lb4ServiceKey {
        Lb4ServiceKey {
            addr_be: u32::from_ne_bytes(self.address.octets()),
            port_be: self.port.to_be(),
            protocol: self.protocol,
            scope: match self.scope {
                ServiceScope::External => lb_scope::EXTERNAL,
                ServiceScope::Internal => lb_scope::INTERNAL,
            },
        }
    }

    fn flags(&self) -> u16 {
        let mut flags = match self.kind {
            ServiceKind::ClusterIp => service_flags::CLUSTER_IP,
            ServiceKind::NodePort => service_flags::NODEPORT,
            ServiceKind::ExternalIp => service_flags::EXTERNAL_IP,
            ServiceKind::LoadBalancer => service_flags::LOADBALANCER,
        };
        if self.two_scopes {
            flags |= service_flags::TWO_SCOPES;
        }
        if self.local_only {
            flags |= match self.scope {
                ServiceScope::External if self.kind != ServiceKind::ClusterIp => {
                    service_flags::EXT_LOCAL_SCOPE
                }
                _ => service_flags::INT_LOCAL_SCOPE,
            };
        }
        if self.affinity_timeout_secs.is_some() {
            flags |= service_flags::AFFINITY;
        }
        flags
    }
}

/// One frontend as read back from the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEntry {
    pub address: Ipv4Addr,
    pub port: u16,
    pub protocol: u8,
    pub scope: ServiceScope,
    pub service_id: u32,
    /// [`service_flags`] bits.
    pub flags: u16,
    pub affinity_timeout_secs: u32,
    /// `(slot, backend id, backend)` in slot order; the first `count` are active.
    pub backends: Vec<(u32, u32, ServiceBackend)>,
    pub count: u16,
    pub qcount: u16,
}

/// What [`ServiceMaps::apply`] changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub frontends_written: usize,
    pub frontends_removed: usize,
    pub backends_written: usize,
    pub backends_removed: usize,
}

/// Counters of the socket programs, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketLbCounters {
    pub xlate_fwd: u64,
    pub xlate_rev: u64,
    pub no_backend: u64,
    pub backend_missing: u64,
    pub revnat_update_failed: u64,
    pub revnat_stale: u64,
    pub bind_refused: u64,
    pub affinity_hit: u64,
    pub release_cleaned: u64,
}

/// The service maps.
pub struct ServiceMaps {
    services: HashMap<MapData, Lb4ServiceKey, Lb4Service>,
    backends: HashMap<MapData, u32, Lb4Backend>,
    slots: HashMap<MapData, Lb4SlotKey, u32>,
    maglev: HashMap<MapData, u32, MaglevTable>,
    reverse_sk: HashMap<MapData, Lb4ReverseSkKey, Lb4ReverseSk>,
    affinity: HashMap<MapData, Lb4AffinityKey, Lb4Affinity>,
    affinity_match: HashMap<MapData, LbAffinityMatchKey, u32>,
    config: Array<MapData, LbConfig>,
    metrics: PerCpuArray<MapData, u64>,
}

/// A backend's identity for id reuse.
type BackendKey = (u32, u16, u8);

impl ServiceMaps {
    pub(crate) fn new(mut take: impl FnMut(&'static str) -> Result<Map>) -> Result<Self> {
        Ok(Self {
            services: HashMap::try_from(take(names::MAP_LB4_SERVICES)?)
                .map_err(map_err(names::MAP_LB4_SERVICES, "open"))?,
            backends: HashMap::try_from(take(names::MAP_LB4_BACKENDS)?)
                .map_err(map_err(names::MAP_LB4_BACKENDS, "open"))?,
            slots: HashMap::try_from(take(names::MAP_LB4_SLOTS)?)
                .map_err(map_err(names::MAP_LB4_SLOTS, "open"))?,
            maglev: HashMap::try_from(take(names::MAP_LB4_MAGLEV)?)
                .map_err(map_err(names::MAP_LB4_MAGLEV, "open"))?,
            reverse_sk: HashMap::try_from(take(names::MAP_LB4_REVERSE_SK)?)
                .map_err(map_err(names::MAP_LB4_REVERSE_SK, "open"))?,
            affinity: HashMap::try_from(take(names::MAP_LB4_AFFINITY)?)
                .map_err(map_err(names::MAP_LB4_AFFINITY, "open"))?,
            affinity_match: HashMap::try_from(take(names::MAP_LB_AFFINITY_MATCH)?)
                .map_err(map_err(names::MAP_LB_AFFINITY_MATCH, "open"))?,
            config: Array::try_from(take(names::MAP_LB_CONFIG)?)
                .map_err(map_err(names::MAP_LB_CONFIG, "open"))?,
            metrics: PerCpuArray::try_from(take(names::MAP_LB_METRICS)?)
                .map_err(map_err(names::MAP_LB_METRICS, "open"))?,
        })
    }

    /// Opens the pinned service maps (another process: the CLI).
    pub fn open_pinned(pin_dir: &Path) -> Result<Self> {
        Self::new(|name| open_pinned(pin_dir, name))
    }

    /// Sets the node's network namespace (by cookie, see [`netns_cookie`]) and the NodePort
    /// range (inclusive).
    pub fn set_config(&mut self, host_netns_cookie: u64, nodeport_range: (u16, u16)) -> Result<()> {
        if nodeport_range.0 > nodeport_range.1 {
            return Err(DatapathError::Invalid {
                what: "NodePort range",
                detail: format!("{}-{} is empty", nodeport_range.0, nodeport_range.1),
            });
        }
        let value = LbConfig {
            host_netns_cookie,
            nodeport_min: nodeport_range.0,
            nodeport_max: nodeport_range.1,
            flags: self.config()?.flags,
        };
        self.config
            .set(0, value, 0)
            .map_err(map_err(names::MAP_LB_CONFIG, "update"))
    }

    /// Turns the tc programs' per-packet service translation on or off (for endpoints
    /// whose sockets are not under socket LB; see `lb_config_flags::PER_PACKET`).
    pub fn set_per_packet(&mut self, enabled: bool) -> Result<()> {
        let mut value = self.config()?;
        if enabled {
            value.flags |= lb_config_flags::PER_PACKET;
        } else {
            value.flags &= !lb_config_flags::PER_PACKET;
        }
        self.config
            .set(0, value, 0)
            .map_err(map_err(names::MAP_LB_CONFIG, "update"))
    }

    /// The current configuration (zeroes until [`ServiceMaps::set_config`]).
    pub fn config(&self) -> Result<LbConfig> {
        self.config
            .get(&0, 0)
            .map_err(map_err(names::MAP_LB_CONFIG, "lookup"))
    }

    fn current_services(&self) -> Result<BTreeMap<Lb4ServiceKey, Lb4Service>> {
        let mut out = BTreeMap::new();
        for item in self.services.iter() {
            let (k, v) = item.map_err(map_err(names::MAP_LB4_SERVICES, "iterate"))?;
            out.insert(k, v);
        }
        Ok(out)
    }

    fn current_backends(&self) -> Result<BTreeMap<u32, Lb4Backend>> {
        let mut out = BTreeMap::new();
        for item in self.backends.iter() {
            let (k, v) = item.map_err(map_err(names::MAP_LB4_BACKENDS, "iterate"))?;
            out.insert(k, v);
        }
        Ok(out)
    }

    /// Makes the maps hold exactly `desired` (module docs for the order of writes).
    pub fn apply(&mut self, desired: &[ServiceFrontend]) -> Result<ApplyStats> {
        let mut stats = ApplyStats::default();
        // Validate first: nothing is written for a desired state that cannot be.
        let mut seen = BTreeSet::new();
        for f in desired {
            if !seen.insert(f.key()) {
                return Err(DatapathError::Invalid {
                    what: "service frontend",
                    detail: format!(
                        "{}:{}/{} ({:?} scope) is listed twice",
                        f.address, f.port, f.protocol, f.scope
                    ),
                });
            }
            if let Some(table) = &f.maglev
                && (table.len() != MAGLEV_TABLE_SIZE
                    || table.iter().any(|&i| i as usize >= f.backends.len()))
            {
                return Err(DatapathError::Invalid {
                    what: "maglev table",
                    detail: format!(
                        "{}:{}: needs {MAGLEV_TABLE_SIZE} indices below {} (has {})",
                        f.address,
                        f.port,
                        f.backends.len(),
                        table.len()
                    ),
                });
            }
        }

        let services = self.current_services()?;
        let backends = self.current_backends()?;

        // Backend ids: keep the ones in use, allocate the lowest free for new ones.
        let mut backend_ids: BTreeMap<BackendKey, u32> = backends
            .iter()
            .map(|(id, b)| ((b.addr_be, b.port_be, b.protocol), *id))
            .collect();
        let mut used_backend_ids: BTreeSet<u32> = backends.keys().copied().collect();
        let mut next_backend = 1u32;
        let mut wanted_backends: BTreeMap<u32, Lb4Backend> = BTreeMap::new();

        let mut used_service_ids: BTreeSet<u32> = services.values().map(|s| s.service_id).collect();
        let mut next_service = 1u32;

        // Plan every frontend: (key, value, slot backend ids, maglev ids).
        let mut plans = Vec::with_capacity(desired.len());
        for f in desired {
            let mut ordered: Vec<&ServiceBackend> = f.backends.iter().collect();
            ordered.sort_by_key(|b| (b.state != BackendState::Active, b.address, b.port));
            let mut slot_ids = Vec::with_capacity(ordered.len());
            for b in &ordered {
                let bkey = (
                    u32::from_ne_bytes(b.address.octets()),
                    b.port.to_be(),
                    f.protocol,
                );
                let id = match backend_ids.get(&bkey) {
                    Some(id) => *id,
                    None => {
                        while used_backend_ids.contains(&next_backend) {
                            next_backend += 1;
                        }
                        let id = next_backend;
                        used_backend_ids.insert(id);
                        backend_ids.insert(bkey, id);
                        id
                    }
                };
                let value = Lb4Backend {
                    addr_be: bkey.0,
                    port_be: bkey.1,
                    protocol: f.protocol,
                    state: b.state.code(),
                };
                // A backend in two frontends with different states: the better one.
                wanted_backends
                    .entry(id)
                    .and_modify(|v| v.state = v.state.min(value.state))
                    .or_insert(value);
                slot_ids.push(id);
            }
            let count = ordered
                .iter()
                .take_while(|b| b.state == BackendState::Active)
                .count();
            let too_many = |what| DatapathError::Invalid {
                what: "service frontend",
                detail: format!("{}:{}: more than 65535 {what} backends", f.address, f.port),
            };
            let count = u16::try_from(count).map_err(|_| too_many("active"))?;
            let qcount =
                u16::try_from(ordered.len() - usize::from(count)).map_err(|_| too_many("other"))?;
            let key = f.key();
            let service_id = match services.get(&key) {
                Some(existing) => existing.service_id,
                None => {
                    while used_service_ids.contains(&next_service) {
                        next_service += 1;
                    }
                    used_service_ids.insert(next_service);
                    next_service
                }
            };
            let value = Lb4Service {
                service_id,
                count,
                qcount,
                flags: f.flags(),
                algorithm: if f.maglev.is_some() {
                    lb_algorithm::MAGLEV
                } else {
                    lb_algorithm::RANDOM
                },
                _pad: 0,
                affinity_timeout_secs: f.affinity_timeout_secs.unwrap_or(0),
            };
            let maglev = f.maglev.as_ref().map(|table| {
                // Indices into `f.backends` → ids (via the backend's key).
                let ids: Vec<u32> = f
                    .backends
                    .iter()
                    .map(|b| {
                        backend_ids[&(
                            u32::from_ne_bytes(b.address.octets()),
                            b.port.to_be(),
                            f.protocol,
                        )]
                    })
                    .collect();
                table.iter().map(|&i| ids[i as usize]).collect::<Vec<u32>>()
            });
            plans.push((key, value, slot_ids, maglev));
        }

        // 1. Backends first: every slot written below points at an existing backend.
        for (id, value) in &wanted_backends {
            if backends.get(id) != Some(value) {
                self.backends
                    .insert(id, value, 0)
                    .map_err(map_err(names::MAP_LB4_BACKENDS, "insert"))?;
                stats.backends_written += 1;
            }
        }

        // 2. Frontends: slots, affinity members, maglev, then the entry; shrink after.
        let mut wanted_members = BTreeSet::new();
        for (key, value, slot_ids, maglev) in &plans {
            let old = services.get(key);
            for (i, id) in slot_ids.iter().enumerate() {
                let slot = Lb4SlotKey {
                    service_id: value.service_id,
                    slot: i as u32 + 1,
                };
                self.slots
                    .insert(slot, id, 0)
                    .map_err(map_err(names::MAP_LB4_SLOTS, "insert"))?;
                let member = LbAffinityMatchKey {
                    backend_id: *id,
                    service_id: value.service_id,
                };
                if value.flags & service_flags::AFFINITY != 0 {
                    self.affinity_match
                        .insert(member, 1, 0)
                        .map_err(map_err(names::MAP_LB_AFFINITY_MATCH, "insert"))?;
                    wanted_members.insert(member);
                }
            }
            match maglev {
                Some(ids) => {
                    let mut table = MaglevTable {
                        backend_ids: [0; MAGLEV_TABLE_SIZE],
                    };
                    table.backend_ids.copy_from_slice(ids);
                    self.maglev
                        .insert(value.service_id, table, 0)
                        .map_err(map_err(names::MAP_LB4_MAGLEV, "insert"))?;
                }
                None => {
                    if old.is_some_and(|o| o.algorithm == lb_algorithm::MAGLEV) {
                        remove_if_present(
                            &mut self.maglev,
                            &value.service_id,
                            names::MAP_LB4_MAGLEV,
                        )?;
                    }
                }
            }
            if old != Some(value) {
                self.services
                    .insert(key, value, 0)
                    .map_err(map_err(names::MAP_LB4_SERVICES, "insert"))?;
                stats.frontends_written += 1;
            }
            if let Some(old) = old {
                let old_total = u32::from(old.count) + u32::from(old.qcount);
                for slot in slot_ids.len() as u32 + 1..=old_total {
                    remove_if_present(
                        &mut self.slots,
                        &Lb4SlotKey {
                            service_id: value.service_id,
                            slot,
                        },
                        names::MAP_LB4_SLOTS,
                    )?;
                }
            }
        }

        // 3. Stale frontends: the entry first (the programs stop using it), then its slots.
        let wanted_keys: BTreeSet<Lb4ServiceKey> = plans.iter().map(|p| p.0).collect();
        for (key, old) in &services {
            if wanted_keys.contains(key) {
                continue;
            }
            remove_if_present(&mut self.services, key, names::MAP_LB4_SERVICES)?;
            stats.frontends_removed += 1;
            for slot in 1..=u32::from(old.count) + u32::from(old.qcount) {
                remove_if_present(
                    &mut self.slots,
                    &Lb4SlotKey {
                        service_id: old.service_id,
                        slot,
                    },
                    names::MAP_LB4_SLOTS,
                )?;
            }
            if old.algorithm == lb_algorithm::MAGLEV {
                remove_if_present(&mut self.maglev, &old.service_id, names::MAP_LB4_MAGLEV)?;
            }
        }

        // 4. Affinity members no longer wanted.
        let mut stale_members = Vec::new();
        for item in self.affinity_match.keys() {
            let k = item.map_err(map_err(names::MAP_LB_AFFINITY_MATCH, "iterate"))?;
            if !wanted_members.contains(&k) {
                stale_members.push(k);
            }
        }
        for k in stale_members {
            remove_if_present(&mut self.affinity_match, &k, names::MAP_LB_AFFINITY_MATCH)?;
        }

        // 5. Backends no frontend uses any more.
        for id in backends.keys() {
            if !wanted_backends.contains_key(id) {
                remove_if_present(&mut self.backends, id, names::MAP_LB4_BACKENDS)?;
                stats.backends_removed += 1;
            }
        }
        Ok(stats)
    }

    /// Every frontend entry with its backends, as the programs see them.
    pub fn list(&self) -> Result<Vec<ServiceEntry>> {
        let backends = self.current_backends()?;
        let mut out = Vec::new();
        for (key, svc) in self.current_services()? {
            let mut list = Vec::new();
            for slot in 1..=u32::from(svc.count) + u32::from(svc.qcount) {
                let slot_key = Lb4SlotKey {
                    service_id: svc.service_id,
                    slot,
                };
                let id = match self.slots.get(&slot_key, 0) {
                    Ok(id) => id,
                    Err(aya::maps::MapError::KeyNotFound) => continue,
                    Err(source) => {
                        return Err(DatapathError::Map {
                            map: names::MAP_LB4_SLOTS,
                            op: "lookup",
                            source,
                        });
                    }
                };
                if let Some(b) = backends.get(&id) {
                    list.push((
                        slot,
                        id,
                        ServiceBackend {
                            address: Ipv4Addr::from(b.addr_be.to_ne_bytes()),
                            port: u16::from_be(b.port_be),
                            state: BackendState::from_code(b.state),
                        },
                    ));
                }
            }
            out.push(ServiceEntry {
                address: Ipv4Addr::from(key.addr_be.to_ne_bytes()),
                port: u16::from_be(key.port_be),
                protocol: key.protocol,
                scope: if key.scope == lb_scope::INTERNAL {
                    ServiceScope::Internal
                } else {
                    ServiceScope::External
                },
                service_id: svc.service_id,
                flags: svc.flags,
                affinity_timeout_secs: svc.affinity_timeout_secs,
                backends: list,
                count: svc.count,
                qcount: svc.qcount,
            });
        }
        out.sort_by_key(|e| e.service_id);
        Ok(out)
    }

    /// Backend ids of a frontend's Maglev table, if it has one.
    pub fn maglev_table(&self, service_id: u32) -> Result<Option<Vec<u32>>> {
        match self.maglev.get(&service_id, 0) {
            Ok(t) => Ok(Some(t.backend_ids.to_vec())),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(DatapathError::Map {
                map: names::MAP_LB4_MAGLEV,
                op: "lookup",
                source,
            }),
        }
    }

    /// Entries in the socket reverse-translation map (tests, `bpf lb` views).
    pub fn reverse_sk_len(&self) -> Result<usize> {
        let mut n = 0;
        for item in self.reverse_sk.keys() {
            item.map_err(map_err(names::MAP_LB4_REVERSE_SK, "iterate"))?;
            n += 1;
        }
        Ok(n)
    }

    /// Entries in the affinity map.
    pub fn affinity_len(&self) -> Result<usize> {
        let mut n = 0;
        for item in self.affinity.keys() {
            item.map_err(map_err(names::MAP_LB4_AFFINITY, "iterate"))?;
            n += 1;
        }
        Ok(n)
    }

    /// The socket programs' counters, summed over CPUs.
    pub fn counters(&self) -> Result<SocketLbCounters> {
        let read = |slot: u32| -> Result<u64> {
            let values = self
                .metrics
                .get(&slot, 0)
                .map_err(map_err(names::MAP_LB_METRICS, "lookup"))?;
            Ok(values.iter().sum())
        };
        Ok(SocketLbCounters {
            xlate_fwd: read(sock_lb_counter::XLATE_FWD)?,
            xlate_rev: read(sock_lb_counter::XLATE_REV)?,
            no_backend: read(sock_lb_counter::NO_BACKEND)?,
            backend_missing: read(sock_lb_counter::BACKEND_MISSING)?,
            revnat_update_failed: read(sock_lb_counter::REVNAT_UPDATE_FAILED)?,
            revnat_stale: read(sock_lb_counter::REVNAT_STALE)?,
            bind_refused: read(sock_lb_counter::BIND_REFUSED)?,
            affinity_hit: read(sock_lb_counter::AFFINITY_HIT)?,
            release_cleaned: read(sock_lb_counter::RELEASE_CLEANED)?,
        })
    }
}

fn remove_if_present<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    key: &K,
    name: &'static str,
) -> Result<()> {
    match map.remove(key) {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        // aya reports a missing key on delete as the syscall's ENOENT.
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(source) => Err(DatapathError::Map {
            map: name,
            op: "remove",
            source,
        }),
    }
}

/// The cookie of a network namespace (`SO_NETNS_COOKIE`), as the socket programs see it.
pub fn netns_cookie(ns: &Netns) -> Result<u64> {
    let cookie = ns.run(|| -> std::io::Result<u64> {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let mut cookie = 0u64;
        let mut len = size_of::<u64>() as libc::socklen_t;
        // SAFETY: valid fd, out-pointer to a u64 with its length.
        let rc = unsafe {
            libc::getsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                libc::SOL_SOCKET,
                libc::SO_NETNS_COOKIE,
                (&raw mut cookie).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(cookie)
    })?;
    cookie.map_err(|source| DatapathError::Netns {
        netns: ns.name().to_owned(),
        what: "getsockopt(SO_NETNS_COOKIE)".into(),
        source,
    })
}

/// The cgroup v2 mount point, from `/proc/mounts` (hybrid systems mount it at
/// `/sys/fs/cgroup/unified`, unified ones at `/sys/fs/cgroup`).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(|source| DatapathError::Io {
        what: "read /proc/mounts".into(),
        source,
    })?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(target))
        })
        .next()
        .ok_or_else(|| DatapathError::Io {
            what: "find the cgroup2 mount".into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no cgroup2 in /proc/mounts"),
        })
}

/// Opens a cgroup v2 directory for attaching, refusing a cgroup2 mount's root (programs
/// on the root cgroup would see every socket of the machine). Returns the directory and its
/// inode number (names its link pins).
pub(crate) fn open_cgroup(cgroup: &Path) -> Result<(File, u64)> {
    let io = |what: String| move |source| DatapathError::Io { what, source };
    let canonical = cgroup
        .canonicalize()
        .map_err(io(format!("resolve cgroup {}", cgroup.display())))?;
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(io("read /proc/mounts".into()))?;
    let mut in_cgroup2 = false;
    for line in mounts.lines() {
        let mut fields = line.split_whitespace();
        if let (Some(_), Some(target), Some("cgroup2")) =
            (fields.next(), fields.next(), fields.next())
        {
            let target = Path::new(target);
            if canonical == target {
                return Err(DatapathError::Invalid {
                    what: "cgroup",
                    detail: format!(
                        "{} is the root of a cgroup2 mount; attach socket LB to a cgroup of its own",
                        cgroup.display()
                    ),
                });
            }
            in_cgroup2 |= canonical.starts_with(target);
        }
    }
    if !in_cgroup2 {
        return Err(DatapathError::Invalid {
            what: "cgroup",
            detail: format!("{} is not inside a cgroup2 mount", cgroup.display()),
        });
    }
    let file =
        File::open(&canonical).map_err(io(format!("open cgroup {}", canonical.display())))?;
    let ino = file
        .metadata()
        .map_err(io(format!("stat cgroup {}", canonical.display())))?
        .ino();
    Ok((file, ino))
}
