//! Loading the eBPF object, pinning its maps and links, attaching the tc programs to
//! endpoint interfaces and detaching them.
//!
//! Attachment uses tcx (bpf links on the interface's tc ingress/egress hooks, kernel ≥ 6.6:
//! the successor of the clsact qdisc hook). Each link is pinned under `<pin_dir>/links/`, so
//! it outlives the process: when the agent exits, enforcement continues from the pinned maps
//! and links. A new process loading from the same pin directory reuses the maps (after an ABI
//! version check) and atomically swaps its freshly loaded programs into the pinned links
//! (`bpf_link_update`). Detaching an endpoint unpins its links; closing a tcx link's fd is
//! independent of the caller's network namespace, so it can never touch an interface of the
//! same index elsewhere. Attaching resolves the interface *inside* the node namespace
//! ([`Netns::run`]).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
};
use membrane_common::{ABI_VERSION, names};

use crate::{
    error::{DatapathError, Result},
    events::EventReader,
    maps::{
        AbiMap, CtMap, EndpointsMap, IpcacheMap, MetricsMap, PolicyMap, RevisionCounter,
        open_pinned,
    },
    netns::Netns,
    object::EBPF_OBJECT,
    services::{ServiceMaps, open_cgroup},
};

/// Map capacities. Defaults follow Cilium's where one exists (policy map 16384 entries,
/// ipcache 512000); conntrack defaults to 65536 entries (Cilium: 512k TCP + 256k other,
/// sized for a whole node; raise it on busy nodes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    pub endpoints: u32,
    pub ipcache: u32,
    pub policy: u32,
    pub conntrack: u32,
    /// Service frontend entries (one per frontend and scope; Cilium: 64Ki).
    pub lb_services: u32,
    /// Backends, and separately the backend slots of all services (Cilium: 64Ki each).
    pub lb_backends: u32,
    pub lb_slots: u32,
    /// Services with a Maglev table (64 KiB each, allocated on use).
    pub lb_maglev: u32,
    /// Socket reverse-translation entries (LRU) and affinity entries (LRU).
    pub lb_reverse_sk: u32,
    pub lb_affinity: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            endpoints: 1024,
            ipcache: 512_000,
            policy: 16384,
            conntrack: 65536,
            lb_services: 65536,
            lb_backends: 65536,
            lb_slots: 65536,
            lb_maglev: 1024,
            lb_reverse_sk: 65536,
            lb_affinity: 65536,
        }
    }
}

/// Sub-directory of the pin directory holding pinned links.
const LINKS_DIR: &str = "links";

/// The loaded datapath: programs, typed map handles and the attachments it holds.
pub struct Datapath {
    ebpf: aya::Ebpf,
    pin_dir: PathBuf,
    endpoints: EndpointsMap,
    ipcache: IpcacheMap,
    policy: PolicyMap,
    conntrack: CtMap,
    metrics: MetricsMap,
    events: Option<EventReader>,
    services: ServiceMaps,
    /// Host interface name → (ingress link, egress link), both pinned.
    attached: BTreeMap<String, (PinnedLink, PinnedLink)>,
    /// cgroup inode → the socket LB links attached there, pinned.
    socket_lb: BTreeMap<u64, Vec<PinnedLink>>,
}

impl Datapath {
    /// Loads the programs and creates (or reuses, if their ABI version matches) the maps
    /// pinned under `pin_dir`.
    pub fn load(pin_dir: &Path, sizes: MapSizes) -> Result<Self> {
        for (name, size) in [
            (names::MAP_ENDPOINTS, sizes.endpoints),
            (names::MAP_IPCACHE_V4, sizes.ipcache),
            (names::MAP_POLICY, sizes.policy),
            (names::MAP_CT_V4, sizes.conntrack),
            (names::MAP_LB4_SERVICES, sizes.lb_services),
            (names::MAP_LB4_BACKENDS, sizes.lb_backends),
            (names::MAP_LB4_SLOTS, sizes.lb_slots),
            (names::MAP_LB4_MAGLEV, sizes.lb_maglev),
            (names::MAP_LB4_REVERSE_SK, sizes.lb_reverse_sk),
            (names::MAP_LB4_AFFINITY, sizes.lb_affinity),
            (names::MAP_LB_AFFINITY_MATCH, sizes.lb_slots),
        ] {
            if size == 0 {
                return Err(DatapathError::Invalid {
                    what: "map size",
                    detail: format!("`{name}` must have at least one entry"),
                });
            }
        }
        check_pinned_abi(pin_dir)?;

        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .map_max_entries(names::MAP_ENDPOINTS, sizes.endpoints)
            .map_max_entries(names::MAP_IPCACHE_V4, sizes.ipcache)
            .map_max_entries(names::MAP_POLICY, sizes.policy)
            .map_max_entries(names::MAP_CT_V4, sizes.conntrack)
            .map_max_entries(names::MAP_LB4_SERVICES, sizes.lb_services)
            .map_max_entries(names::MAP_LB4_BACKENDS, sizes.lb_backends)
            .map_max_entries(names::MAP_LB4_SLOTS, sizes.lb_slots)
            .map_max_entries(names::MAP_LB4_MAGLEV, sizes.lb_maglev)
            .map_max_entries(names::MAP_LB4_REVERSE_SK, sizes.lb_reverse_sk)
            .map_max_entries(names::MAP_LB4_AFFINITY, sizes.lb_affinity)
            .map_max_entries(names::MAP_LB_AFFINITY_MATCH, sizes.lb_slots)
            .load(EBPF_OBJECT)
            .map_err(|source| DatapathError::Load {
                pin_dir: pin_dir.to_owned(),
                source: Box::new(source),
            })?;

        for name in names::ALL_PROGRAMS {
            classifier(&mut ebpf, name)?
                .load()
                .map_err(|source| DatapathError::Program {
                    program: name,
                    op: "load (verifier)".into(),
                    source,
                })?;
        }
        // The socket programs are verified now too: a kernel that refuses them fails the
        // load, not a later attach.
        for (name, _) in names::SOCK_ADDR_PROGRAMS {
            sock_addr_program(&mut ebpf, name)?
                .load()
                .map_err(|source| DatapathError::Program {
                    program: name,
                    op: "load (verifier)".into(),
                    source,
                })?;
        }
        for (name, _) in names::SOCK_PROGRAMS {
            sock_program(&mut ebpf, name)?
                .load()
                .map_err(|source| DatapathError::Program {
                    program: name,
                    op: "load (verifier)".into(),
                    source,
                })?;
        }

        let mut take = |name: &'static str| {
            ebpf.take_map(name)
                .ok_or(DatapathError::Missing { kind: "map", name })
        };
        let mut abi = AbiMap::new(take(names::MAP_ABI)?)?;
        abi.set(ABI_VERSION)?;
        let revision = RevisionCounter::new(take(names::MAP_REVISION)?)?;
        // A fresh map holds 0; start at 1 so no cached verdict matches an unset revision.
        revision.bump()?;
        let endpoints = EndpointsMap::new(take(names::MAP_ENDPOINTS)?, revision.clone())?;
        let ipcache = IpcacheMap::new(take(names::MAP_IPCACHE_V4)?, revision.clone())?;
        let policy = PolicyMap::new(take(names::MAP_POLICY)?, revision)?;
        let conntrack = CtMap::new(take(names::MAP_CT_V4)?)?;
        let metrics = MetricsMap::new(take(names::MAP_METRICS)?)?;
        let events = Some(EventReader::new(take(names::MAP_EVENTS)?)?);
        let mut services = ServiceMaps::new(&mut take)?;
        // Fresh maps: the default NodePort range and no host namespace yet (pinned maps of
        // a previous process keep what it set).
        if services.config()?.nodeport_max == 0 {
            services.set_config(0, crate::services::NODEPORT_RANGE_DEFAULT)?;
        }

        Ok(Self {
            ebpf,
            pin_dir: pin_dir.to_owned(),
            endpoints,
            ipcache,
            policy,
            conntrack,
            metrics,
            events,
            services,
            attached: BTreeMap::new(),
            socket_lb: BTreeMap::new(),
        })
    }

    /// The service maps (socket LB, and the per-packet path when it comes).
    pub fn services(&mut self) -> &mut ServiceMaps {
        &mut self.services
    }

    fn socket_lb_pin_dir(&self, cgroup_ino: u64) -> PathBuf {
        self.pin_dir
            .join(LINKS_DIR)
            .join(format!("cgroup-{cgroup_ino}"))
    }

    /// Attaches the socket LB programs (connect4, sendmsg4, recvmsg4, getpeername4,
    /// post_bind4, sock_release) to the cgroup v2 directory `cgroup` and pins the links under
    /// `<pin dir>/links/cgroup-<inode>/`. A cgroup2 mount's root is refused. Programs are
    /// attached as bpf links (the kernel takes no attach flags for them; links always run
    /// next to the cgroup's other programs, so others' programs keep running). If a previous
    /// process's links are pinned there, the new ones are attached before the old ones are
    /// released, so sockets are never without translation (for that moment both run; the
    /// second sees an already translated address and leaves it alone).
    pub fn attach_socket_lb(&mut self, cgroup: &Path) -> Result<()> {
        let (cgroup_fd, ino) = open_cgroup(cgroup)?;
        if self.socket_lb.contains_key(&ino) {
            return Ok(());
        }
        let dir = self.socket_lb_pin_dir(ino);
        std::fs::create_dir_all(&dir).map_err(|source| DatapathError::BpfFs {
            path: dir.clone(),
            what: "create link pin directory",
            source,
        })?;
        let mut fresh: Vec<(PathBuf, FdLink)> = Vec::new();
        let op = |what: &str| format!("{what} cgroup {}", cgroup.display());
        let result = (|| -> Result<()> {
            for (name, _) in names::SOCK_ADDR_PROGRAMS {
                let prog = sock_addr_program(&mut self.ebpf, name)?;
                let id = prog
                    .attach(&cgroup_fd, CgroupAttachMode::Single)
                    .map_err(|source| DatapathError::Program {
                        program: name,
                        op: op("attach to"),
                        source,
                    })?;
                let link = prog
                    .take_link(id)
                    .map_err(|source| DatapathError::Program {
                        program: name,
                        op: op("take link of"),
                        source,
                    })?;
                let fd = FdLink::try_from(link).map_err(|e| DatapathError::Io {
                    what: op("bpf link expected for"),
                    source: std::io::Error::other(e.to_string()),
                })?;
                fresh.push((dir.join(name), fd));
            }
            for (name, _) in names::SOCK_PROGRAMS {
                let prog = sock_program(&mut self.ebpf, name)?;
                let id = prog
                    .attach(&cgroup_fd, CgroupAttachMode::Single)
                    .map_err(|source| DatapathError::Program {
                        program: name,
                        op: op("attach to"),
                        source,
                    })?;
                let link = prog
                    .take_link(id)
                    .map_err(|source| DatapathError::Program {
                        program: name,
                        op: op("take link of"),
                        source,
                    })?;
                let fd = FdLink::try_from(link).map_err(|e| DatapathError::Io {
                    what: op("bpf link expected for"),
                    source: std::io::Error::other(e.to_string()),
                })?;
                fresh.push((dir.join(name), fd));
            }
            Ok(())
        })();
        // On failure the fresh links drop here (detached); the old pins stay.
        result?;
        let mut pinned = Vec::new();
        for (pin, link) in fresh {
            if pin.exists() {
                // The previous process's link: ours runs already, release it.
                std::fs::remove_file(&pin).map_err(|source| DatapathError::BpfFs {
                    path: pin.clone(),
                    what: "unpin the previous link",
                    source,
                })?;
            }
            pinned.push(link.pin(&pin).map_err(|e| DatapathError::Io {
                what: format!("pin link at {}", pin.display()),
                source: std::io::Error::other(e.to_string()),
            })?);
        }
        self.socket_lb.insert(ino, pinned);
        Ok(())
    }

    /// Detaches the socket LB programs from `cgroup` and removes their pins (also those a
    /// previous process left).
    pub fn detach_socket_lb(&mut self, cgroup: &Path) -> Result<()> {
        let (_, ino) = open_cgroup(cgroup)?;
        self.detach_socket_lb_ino(ino)
    }

    fn detach_socket_lb_ino(&mut self, ino: u64) -> Result<()> {
        if let Some(links) = self.socket_lb.remove(&ino) {
            for link in links {
                link.unpin().map_err(|source| DatapathError::Io {
                    what: format!("unpin socket LB link of cgroup inode {ino}"),
                    source,
                })?;
            }
        }
        let dir = self.socket_lb_pin_dir(ino);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|source| DatapathError::BpfFs {
                path: dir.clone(),
                what: "remove socket LB link pins",
                source,
            })?;
        }
        Ok(())
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn endpoints(&mut self) -> &mut EndpointsMap {
        &mut self.endpoints
    }

    pub fn ipcache(&mut self) -> &mut IpcacheMap {
        &mut self.ipcache
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

    /// The flow event reader (there is one per ring buffer consumer; take it to move it to
    /// a reader thread).
    pub fn take_events(&mut self) -> Option<EventReader> {
        self.events.take()
    }

    fn link_pin(&self, ifname: &str, hook: &str) -> PathBuf {
        self.pin_dir
            .join(LINKS_DIR)
            .join(format!("{ifname}-{hook}"))
    }

    /// Attaches `from_endpoint` to the tc ingress hook and `to_endpoint` to the tc egress
    /// hook of `host_ifname` inside `node`, pinning both links. If links for the interface
    /// are already pinned (a previous process attached them), the freshly loaded programs
    /// replace the old ones in those links atomically: enforcement never pauses.
    pub fn attach_endpoint(&mut self, node: &Netns, host_ifname: &str) -> Result<()> {
        self.attach_pair(
            node,
            host_ifname,
            names::PROG_FROM_ENDPOINT,
            names::PROG_TO_ENDPOINT,
        )
    }

    /// Attaches `from_tunnel` (tc ingress) and `to_tunnel` (tc egress) to the node's
    /// flow-based VXLAN device `ifname` inside `node`, pinned like an endpoint's (and detached
    /// with [`Datapath::detach_endpoint`]).
    pub fn attach_tunnel(&mut self, node: &Netns, ifname: &str) -> Result<()> {
        self.attach_pair(node, ifname, names::PROG_FROM_TUNNEL, names::PROG_TO_TUNNEL)
    }

    fn attach_pair(
        &mut self,
        node: &Netns,
        host_ifname: &str,
        ingress_program: &'static str,
        egress_program: &'static str,
    ) -> Result<()> {
        if self.attached.contains_key(host_ifname) {
            return Ok(());
        }
        let links_dir = self.pin_dir.join(LINKS_DIR);
        std::fs::create_dir_all(&links_dir).map_err(|source| DatapathError::BpfFs {
            path: links_dir.clone(),
            what: "create link pin directory",
            source,
        })?;
        let ingress = self.attach_one(node, ingress_program, host_ifname, TcAttachType::Ingress)?;
        let egress = match self.attach_one(node, egress_program, host_ifname, TcAttachType::Egress)
        {
            Ok(link) => link,
            Err(err) => {
                // Leave nothing half-attached.
                let _ = ingress.unpin();
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
    ) -> Result<PinnedLink> {
        let hook_name = match hook {
            TcAttachType::Ingress => "ingress",
            _ => "egress",
        };
        let pin = self.link_pin(ifname, hook_name);
        let op = |what: &str| format!("{what} {ifname} ({hook_name}) in netns {}", node.name());
        let classifier = classifier(&mut self.ebpf, program)?;

        let link_id = if pin.exists() {
            // A previous process's link: swap our program into it.
            let pinned = PinnedLink::from_pin(&pin).map_err(|e| DatapathError::Io {
                what: format!("open pinned link {}", pin.display()),
                source: std::io::Error::other(e.to_string()),
            })?;
            let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|e| {
                DatapathError::Io {
                    what: format!("pinned link {} is not a tcx link", pin.display()),
                    source: std::io::Error::other(e.to_string()),
                }
            })?;
            classifier
                .attach_to_link(link)
                .map_err(|source| DatapathError::Program {
                    program,
                    op: op("replace program of pinned link on"),
                    source,
                })?
        } else {
            let attached = node.run(move || {
                classifier.attach_with_options(
                    ifname,
                    hook,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
            })?;
            attached.map_err(|source| DatapathError::Program {
                program,
                op: op("attach to"),
                source,
            })?
        };

        let classifier = self::classifier(&mut self.ebpf, program)?;
        let link = classifier
            .take_link(link_id)
            .map_err(|source| DatapathError::Program {
                program,
                op: op("take link of"),
                source,
            })?;
        let fd_link = FdLink::try_from(link).map_err(|e| DatapathError::Io {
            what: op("tcx link expected for"),
            source: std::io::Error::other(e.to_string()),
        })?;
        if pin.exists() {
            // Same kernel link as the pin: keep the pin, hold a handle.
            return PinnedLink::from_pin(&pin).map_err(|e| DatapathError::Io {
                what: format!("reopen pinned link {}", pin.display()),
                source: std::io::Error::other(e.to_string()),
            });
        }
        fd_link.pin(&pin).map_err(|e| DatapathError::Io {
            what: format!("pin link at {}", pin.display()),
            source: std::io::Error::other(e.to_string()),
        })
    }

    /// Detaches both programs from `host_ifname` and removes their pins. An interface this
    /// instance does not hold but whose links are pinned is detached too.
    pub fn detach_endpoint(&mut self, host_ifname: &str) -> Result<()> {
        if let Some((ingress, egress)) = self.attached.remove(host_ifname) {
            for link in [ingress, egress] {
                link.unpin().map_err(|source| DatapathError::Io {
                    what: format!("unpin link of {host_ifname}"),
                    source,
                })?;
            }
            return Ok(());
        }
        for hook in ["ingress", "egress"] {
            let pin = self.link_pin(host_ifname, hook);
            if pin.exists() {
                std::fs::remove_file(&pin).map_err(|source| DatapathError::Io {
                    what: format!("unpin {}", pin.display()),
                    source,
                })?;
            }
        }
        Ok(())
    }

    /// Interfaces with attached programs held by this instance.
    pub fn attached_interfaces(&self) -> impl Iterator<Item = &str> {
        self.attached.keys().map(String::as_str)
    }

    /// Runs `program` once on `packet` (an Ethernet frame) with `BPF_PROG_TEST_RUN` and
    /// returns the tc verdict. The packet's interface is the caller's loopback (ifindex 1).
    pub fn test_run(&mut self, program: &'static str, packet: &[u8]) -> Result<i32> {
        self.test_run_with_mark(program, packet, 0)
    }

    /// Runs `program` `repeat` times on `packet` and returns the kernel-measured average
    /// duration of one run (for benchmarks).
    pub fn test_run_repeat(
        &mut self,
        program: &'static str,
        packet: &[u8],
        repeat: u32,
    ) -> Result<std::time::Duration> {
        use aya::programs::{TestRun as _, TestRunOptions};
        let classifier = classifier(&mut self.ebpf, program)?;
        let mut out = vec![0u8; packet.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            repeat: repeat.max(1),
            ..TestRunOptions::new()
        };
        let result = classifier
            .test_run(opts)
            .map_err(|source| DatapathError::Program {
                program,
                op: "BPF_PROG_TEST_RUN".into(),
                source,
            })?;
        Ok(result.duration)
    }

    /// Runs `program` once on `packet` and returns the tc verdict and the packet as the
    /// program left it (for programs that rewrite, such as the per-packet service
    /// translation).
    pub fn test_run_packet(
        &mut self,
        program: &'static str,
        packet: &[u8],
    ) -> Result<(i32, Vec<u8>)> {
        use aya::programs::{TestRun as _, TestRunOptions};
        let classifier = classifier(&mut self.ebpf, program)?;
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
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value as i32, out))
    }

    /// [`Datapath::test_run`] with the skb mark preset (as the proxy's sockets set it).
    pub fn test_run_with_mark(
        &mut self,
        program: &'static str,
        packet: &[u8],
        mark: u32,
    ) -> Result<i32> {
        use aya::programs::{TestRun as _, TestRunOptions};
        let classifier = classifier(&mut self.ebpf, program)?;
        let mut out = vec![0u8; packet.len() + 256];
        // struct __sk_buff up to and including `mark` (offset 8); the kernel accepts a
        // shorter context and requires the fields it does not allow to be zero.
        let mut ctx = [0u8; 12];
        ctx[8..12].copy_from_slice(&mark.to_ne_bytes());
        let opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
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

    /// The kernel's run statistics of `program` (cumulative; counted only while run-time
    /// statistics are enabled, see [`enable_run_time_stats`]).
    pub fn program_stats(&self, program: &'static str) -> Result<ProgramStats> {
        let info = self
            .ebpf
            .program(program)
            .ok_or(DatapathError::Missing {
                kind: "program",
                name: program,
            })?
            .info()
            .map_err(|source| DatapathError::Program {
                program,
                op: "BPF_OBJ_GET_INFO_BY_FD".into(),
                source,
            })?;
        Ok(ProgramStats {
            run_time_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
            run_count: info.run_count(),
        })
    }

    /// Detaches everything this instance attached and removes those pins. (Dropping a
    /// `Datapath` instead leaves links and maps pinned: that is a restart, not a teardown.)
    pub fn detach_all(&mut self) -> Result<()> {
        let ifnames: Vec<String> = self.attached.keys().cloned().collect();
        for ifname in ifnames {
            self.detach_endpoint(&ifname)?;
        }
        let cgroups: Vec<u64> = self.socket_lb.keys().copied().collect();
        for ino in cgroups {
            self.detach_socket_lb_ino(ino)?;
        }
        Ok(())
    }
}

/// Cumulative run statistics of one program as the kernel keeps them (`bpf_prog_info`'s
/// `run_time_ns` and `run_cnt`): the time inside the program itself, without the hook's or
/// `BPF_PROG_TEST_RUN`'s own overhead.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgramStats {
    pub run_time_ns: u64,
    pub run_count: u64,
}

impl ProgramStats {
    /// What happened between `earlier` and `self`.
    pub fn since(self, earlier: ProgramStats) -> ProgramStats {
        ProgramStats {
            run_time_ns: self.run_time_ns.saturating_sub(earlier.run_time_ns),
            run_count: self.run_count.saturating_sub(earlier.run_count),
        }
    }

    /// Average ns per run, `None` before the first run.
    pub fn ns_per_run(self) -> Option<f64> {
        (self.run_count > 0).then(|| self.run_time_ns as f64 / self.run_count as f64)
    }
}

/// Keeps the kernel's run-time statistics of BPF programs on (`BPF_ENABLE_STATS`, the switch
/// behind the `kernel.bpf_stats_enabled` sysctl) while it lives. Dropping it, or the process
/// dying, turns them back off unless something else holds them on: the kernel counts the
/// holders, so this never overrides another user's setting.
///
/// While on, every BPF program on the machine pays two clock reads per run.
pub struct RunTimeStats(
    #[expect(
        dead_code,
        reason = "held for its drop: closing the fd disables the statistics"
    )]
    std::os::fd::OwnedFd,
);

/// Turns on run-time statistics for all BPF programs until the guard is dropped.
pub fn enable_run_time_stats() -> Result<RunTimeStats> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map(RunTimeStats)
        .map_err(|e| DatapathError::Io {
            what: "BPF_ENABLE_STATS (run time)".into(),
            source: std::io::Error::other(e.to_string()),
        })
}

fn classifier<'a>(ebpf: &'a mut aya::Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier> {
    ebpf.program_mut(name)
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

fn sock_addr_program<'a>(
    ebpf: &'a mut aya::Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr> {
    ebpf.program_mut(name)
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

fn sock_program<'a>(ebpf: &'a mut aya::Ebpf, name: &'static str) -> Result<&'a mut CgroupSock> {
    ebpf.program_mut(name)
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

/// Refuses pinned maps written by a build with another ABI version (or by one that predates
/// the version map), so a mismatched build never misreads them.
fn check_pinned_abi(pin_dir: &Path) -> Result<()> {
    let abi_pin = pin_dir.join(names::MAP_ABI);
    if abi_pin.exists() {
        let found = AbiMap::new(open_pinned(pin_dir, names::MAP_ABI)?)?.get()?;
        // 0: created but never stamped (a load that failed half-way); the maps are ours.
        if found != ABI_VERSION && found != 0 {
            return Err(DatapathError::AbiMismatch {
                pin_dir: pin_dir.to_owned(),
                found: found.to_string(),
                expected: ABI_VERSION,
            });
        }
        return Ok(());
    }
    let foreign: Vec<String> = std::fs::read_dir(pin_dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                // Every map of ours, in any version, is named `mb_*`; a fresh bpffs instance
                // also shows the kernel's own `maps.debug`/`progs.debug`.
                .filter(|name| name.starts_with("mb_"))
                .collect()
        })
        .unwrap_or_default();
    if !foreign.is_empty() {
        return Err(DatapathError::AbiMismatch {
            pin_dir: pin_dir.to_owned(),
            found: format!(
                "unknown (no {} map; pins: {})",
                names::MAP_ABI,
                foreign.join(", ")
            ),
            expected: ABI_VERSION,
        });
    }
    Ok(())
}
