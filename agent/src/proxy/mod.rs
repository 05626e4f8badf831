//! The agent's side of its node proxy (`membrane-proxy`, a process of its own so an agent
//! restart never breaks DNS or L7 traffic): supervision (one proxy per node, adopted across
//! agent restarts through its pid file; the DNS listeners it inherits outlive every proxy),
//! the snapshots it is sent over the proxy channel ([`snapshots`]), and its access and DNS
//! records turned into flows ([`records`]).

pub mod records;
pub mod snapshots;

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use membrane_agent_api::{
    RunDir,
    args::{DNS_TCP_FD, DNS_UDP_FD, ProxyArgs},
    proxy_channel::{AgentChannel, Kind, Outcome, Pending, first_revision},
    shutdown::Shutdown,
    snapshot::{DnsSnapshot, FilterSnapshot, PolicySnapshot},
    wasm_resource::WasmFilterResource,
};
use membrane_datapath::Netns;
use membrane_observer::{FlowInput, Observer};
use membrane_policy::EndpointPolicy;

use crate::{
    config::AgentConfig,
    daemon::{State, lock},
    error::{AgentError, io_err},
};

/// How long a change waits for the proxy to apply the HTTP policy or DNS rules.
const POLICY_WAIT: Duration = Duration::from_secs(2);
/// … and the filters: compiling modules takes a moment.
const FILTER_WAIT: Duration = Duration::from_secs(10);

/// A snapshot sent and not yet confirmed.
pub(crate) struct PendingPublish {
    pending: Pending,
    what: &'static str,
    wait: Duration,
}

impl PendingPublish {
    /// Waits (bounded) for the proxy's answer and logs what it was.
    pub(crate) fn wait(&self, channel: &AgentChannel, proxy_expected: bool) {
        let revision = self.pending.revision;
        let what = self.what;
        match channel.wait_for(&self.pending, self.wait, proxy_expected) {
            Outcome::Applied | Outcome::NoProxy => {}
            Outcome::TimedOut => tracing::warn!(
                revision,
                "the proxy has not applied the {what} configuration within {:?} (see proxy.log)",
                self.wait
            ),
            Outcome::Refused(error) => tracing::error!(
                revision,
                %error,
                "the proxy refused the {what} configuration; it keeps its previous one"
            ),
        }
    }
}

/// The supervised proxy's pid, when it is alive.
pub(crate) fn running_proxy(run_dir: &RunDir) -> Option<u32> {
    std::fs::read_to_string(run_dir.proxy_pid())
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        .filter(|pid| Path::new(&format!("/proc/{pid}")).exists())
}

/// Creates the transparent DNS listeners (UDP and TCP on `port`, all addresses, with
/// `IP_TRANSPARENT`) in the current network namespace, for handing to every proxy the agent
/// starts as descriptors 3 and 4; the UDP socket gets a large receive buffer so queries queue
/// while a proxy restarts.
pub(crate) fn bind_dns_listeners(
    port: u16,
) -> std::io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let addr: std::net::SocketAddr = (std::net::Ipv4Addr::UNSPECIFIED, port).into();
    let udp = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    udp.set_reuse_address(true)?;
    udp.set_ip_transparent_v4(true)?;
    // Queries keep arriving while a proxy restarts: give them room. As root past
    // `net.core.rmem_max` (SO_RCVBUFFORCE); the plain request is the fallback.
    let _ = udp.set_recv_buffer_size(8 << 20);
    let size: libc::c_int = 8 << 20;
    // SAFETY: a valid socket fd, a pointer to a c_int and its size; failure is harmless.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&udp),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const size).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    udp.bind(&addr.into())?;
    let tcp = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    tcp.set_reuse_address(true)?;
    tcp.set_ip_transparent_v4(true)?;
    tcp.bind(&addr.into())?;
    tcp.listen(1024)?;
    Ok((udp.into(), tcp.into()))
}

/// Starts the record reader and the proxy's supervisor.
pub(crate) fn start(
    config: &AgentConfig,
    state: &Arc<Mutex<State>>,
    observer: &Observer,
    pins: &Path,
    shutdown: &Shutdown,
) -> Result<(), AgentError> {
    let records = config.run_dir().proxy_records();
    let _ = std::fs::remove_file(&records);
    let socket = std::os::unix::net::UnixDatagram::bind(&records)
        .map_err(io_err(format!("bind {}", records.display())))?;
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(io_err("record socket"))?;
    let (state2, shutdown2, sender) = (state.clone(), shutdown.clone(), observer.sender());
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        while !shutdown2.is_triggered() {
            let Ok(n) = socket.recv(&mut buf) else {
                continue;
            };
            let line = String::from_utf8_lossy(&buf[..n]);
            let endpoints: Vec<(std::net::IpAddr, u32)> = lock(&state2)
                .endpoints
                .values()
                .map(|e| (std::net::IpAddr::V4(e.spec.ipv4), e.id))
                .collect();
            let endpoint_of = |ip| endpoints.iter().find(|(a, _)| *a == ip).map(|(_, id)| *id);
            if let Some(record) = records::dns_record_to_flow(&line, |ip| identity_of(&state2, ip))
            {
                sender.send(FlowInput::Dns(record));
            } else if let Some(record) = records::record_to_flow(&line, endpoint_of) {
                sender.send(FlowInput::Http(record));
            }
        }
    });
    let (config2, shutdown3) = (config.clone(), shutdown.clone());
    let pins = pins.to_owned();
    std::thread::spawn(move || supervise_proxy(&config2, &pins, &shutdown3));
    Ok(())
}

/// A proxy snapshot with a revision number.
trait Revisioned: Clone + PartialEq {
    fn revision(&self) -> u64;
    fn revision_mut(&mut self) -> &mut u64;
}

impl Revisioned for PolicySnapshot {
    fn revision(&self) -> u64 {
        self.revision
    }
    fn revision_mut(&mut self) -> &mut u64 {
        &mut self.revision
    }
}

impl Revisioned for DnsSnapshot {
    fn revision(&self) -> u64 {
        self.revision
    }
    fn revision_mut(&mut self) -> &mut u64 {
        &mut self.revision
    }
}

impl Revisioned for FilterSnapshot {
    fn revision(&self) -> u64 {
        self.revision
    }
    fn revision_mut(&mut self) -> &mut u64 {
        &mut self.revision
    }
}

/// Endpoint id and identity of an address, for proxy records.
fn identity_of(state: &Mutex<State>, ip: std::net::IpAddr) -> (u32, u32) {
    let s = lock(state);
    if let Some(e) = s
        .endpoints
        .values()
        .find(|e| std::net::IpAddr::V4(e.spec.ipv4) == ip)
    {
        return (e.id, e.identity.0);
    }
    let std::net::IpAddr::V4(v4) = ip else {
        return (0, membrane_common::identity::WORLD);
    };
    let id = s
        .fqdn
        .ips
        .get(&v4)
        .map(|i| i.0)
        .unwrap_or(membrane_common::identity::WORLD);
    (0, id)
}

impl State {
    /// Sends the proxy its snapshots (HTTP/TLS policy, DNS rules, filters) that changed.
    pub(crate) fn send_proxy_snapshots(
        &mut self,
        desired: &BTreeMap<u32, EndpointPolicy>,
    ) -> Result<(), AgentError> {
        let endpoints: Vec<(u64, std::net::Ipv4Addr, &EndpointPolicy)> = self
            .endpoints
            .values()
            .filter_map(|e| {
                desired
                    .get(&e.id)
                    .map(|p| (u64::from(e.id), e.spec.ipv4, p))
            })
            .collect();
        self.write_dns_snapshot(&endpoints)?;
        self.write_filter_snapshot()?;
        let snapshot = snapshots::policy_snapshot(endpoints, 0);
        let mut previous = self.proxy_snapshot.take();
        self.publish(&mut previous, snapshot, "policy", POLICY_WAIT, |c, s| {
            c.publish_policy(s)
        });
        self.proxy_snapshot = previous;
        Ok(())
    }

    /// Sends the DNS proxy's rules when they changed, and waits (bounded) for a running
    /// proxy to apply them.
    fn write_dns_snapshot(
        &mut self,
        endpoints: &[(u64, std::net::Ipv4Addr, &EndpointPolicy)],
    ) -> Result<(), AgentError> {
        let snapshot = snapshots::dns_snapshot(endpoints.iter().copied());
        let mut previous = self.dns_snapshot.take();
        self.publish(&mut previous, snapshot, "DNS", POLICY_WAIT, |c, s| {
            c.publish_dns(s)
        });
        self.dns_snapshot = previous;
        Ok(())
    }

    /// Sends the filter snapshot (`WasmFilter` resources per endpoint) when it changed, and
    /// waits (bounded) for a running proxy to apply it. Compiling modules takes a moment: a
    /// longer bound than the policy snapshots'.
    fn write_filter_snapshot(&mut self) -> Result<(), AgentError> {
        let endpoints: Vec<snapshots::EndpointView<'_>> = self
            .endpoints
            .values()
            .map(|e| snapshots::EndpointView {
                id: u64::from(e.id),
                ip: e.spec.ipv4,
                namespace: &e.spec.namespace,
                pod: &e.spec.name,
                labels: &e.labels,
            })
            .collect();
        let resources: Vec<&WasmFilterResource> = self.wasm_filters.values().collect();
        // Peer tables only matter with filters; skip building them otherwise.
        let peers = if resources.is_empty() {
            membrane_agent_api::snapshot::SnapshotPeers::default()
        } else {
            let (peers, dropped) = snapshots::peers_of(
                &endpoints,
                self.identities.iter().map(|(id, labels)| (id.0, labels)),
            );
            if dropped > 0 {
                tracing::warn!(
                    dropped,
                    max = snapshots::MAX_SNAPSHOT_IDENTITIES,
                    "filter snapshot: identities past the bound carry no labels for filters"
                );
            }
            peers
        };
        let snapshot = snapshots::filter_snapshot(&endpoints, &resources, peers);
        let mut previous = self.filter_snapshot.take();
        self.publish(&mut previous, snapshot, "filter", FILTER_WAIT, |c, s| {
            c.publish_filters(s)
        });
        self.filter_snapshot = previous;
        Ok(())
    }

    /// A snapshot for the proxy: unchanged ⇒ nothing; changed ⇒ the next revision (the
    /// first one from [`first_revision`]) sent over the proxy channel, and a [`PendingPublish`]
    /// that [`crate::daemon::confirm`] waits for once the state lock is released. A proxy that
    /// refuses keeps its previous configuration of that kind (logged; the agent's state is
    /// unaffected).
    fn publish<T: Revisioned>(
        &mut self,
        previous: &mut Option<T>,
        mut snapshot: T,
        what: &'static str,
        wait: Duration,
        send: impl FnOnce(&AgentChannel, T) -> Pending,
    ) {
        let revision = match previous.as_ref() {
            Some(previous) => {
                *snapshot.revision_mut() = previous.revision();
                if previous == &snapshot {
                    return;
                }
                previous.revision() + 1
            }
            None => first_revision(),
        };
        *snapshot.revision_mut() = revision;
        *previous = Some(snapshot.clone());
        let pending = send(&self.channel, snapshot);
        self.pending.push(PendingPublish {
            pending,
            what,
            wait,
        });
    }

    pub(crate) fn proxy_running(&self) -> bool {
        running_proxy(&self.config.run_dir()).is_some()
    }

    /// One line about the L7 proxy: supervised or not, its pid and the policy revision it
    /// applied.
    pub(crate) fn proxy_status(&self) -> String {
        if !self.config.proxy {
            return "disabled".into();
        }
        let channel = if self.channel.connected() {
            let stats = self.channel.stats();
            format!(
                "policy revision {} applied; channel connected, {} whole and {} incremental updates sent",
                self.channel.applied(Kind::Policy),
                stats.full_sent,
                stats.deltas_sent
            )
        } else {
            "not connected to the channel".to_owned()
        };
        match running_proxy(&self.config.run_dir()) {
            Some(pid) => format!(
                "running (pid {pid}; listeners {} egress, {} ingress; {channel})",
                self.config.http_proxy_port,
                self.config.http_proxy_port + 1,
            ),
            None => "not running (the agent restarts it)".into(),
        }
    }
}
/// Keeps one `membrane-proxy` running for the node. It is not the agent's child in any sense
/// that matters: it keeps serving when the agent stops, and a restarted agent adopts it
/// through its pid file instead of starting a second one.
fn supervise_proxy(config: &AgentConfig, pins: &Path, shutdown: &Shutdown) {
    let run_dir = config.run_dir();
    let pid_file = run_dir.proxy_pid();
    let running = || running_proxy(&run_dir);
    // The DNS listeners outlive every proxy: a running proxy's (after an agent restart),
    // else new ones. Without them the proxy runs without its DNS part.
    let dns = dns_listeners(config, running());
    if let Err(e) = &dns {
        tracing::error!(error = %e, "DNS proxy listeners unavailable; DNS redirects will be dropped");
    }
    let dns = dns.ok();
    // The reaper of a proxy we started tells us when it exits, so the next one starts at once.
    let (exited_tx, exited) = std::sync::mpsc::channel::<u32>();
    let mut backoff = Duration::from_millis(100);
    while !shutdown.is_triggered() {
        // Never start one while stopping: a teardown may just have stopped the old one.
        if running().is_none() && !shutdown.is_triggered() {
            match spawn_proxy(config, pins, dns.as_ref(), exited_tx.clone()) {
                Ok(pid) => {
                    let _ = std::fs::write(&pid_file, format!("{pid}\n"));
                    tracing::info!(pid, "membrane-proxy started");
                    backoff = Duration::from_millis(100);
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot start membrane-proxy; retrying");
                    shutdown.wait_timeout(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            }
        }
        // An adopted proxy (started by an earlier agent) is polled.
        let _ = exited.recv_timeout(Duration::from_millis(200));
    }
}

/// The DNS listeners: duplicated from the running proxy when there is one (it inherited
/// them from the previous agent), else bound in the node namespace.
fn dns_listeners(
    config: &AgentConfig,
    running: Option<u32>,
) -> Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd), String> {
    if let Some(pid) = running {
        match fds_of(pid, &[DNS_UDP_FD, DNS_TCP_FD]) {
            Ok(mut fds) if fds.len() == 2 => {
                let tcp = fds.pop().expect("two fds");
                let udp = fds.pop().expect("two fds");
                let port = |fd: &std::os::fd::OwnedFd| {
                    socket2::SockRef::from(fd)
                        .local_addr()
                        .ok()
                        .and_then(|a| a.as_socket())
                        .map(|a| a.port())
                };
                if port(&udp) == Some(config.dns_proxy_port)
                    && port(&tcp) == Some(config.dns_proxy_port)
                {
                    tracing::info!(pid, "DNS listeners taken over from the running proxy");
                    return Ok((udp, tcp));
                }
                tracing::warn!(
                    pid,
                    "the running proxy's descriptors 3/4 are not the DNS listeners"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(pid, error = %e, "cannot take the DNS listeners over"),
        }
    }
    let node = Netns::open(&config.node_netns).map_err(|e| e.to_string())?;
    let port = config.dns_proxy_port;
    node.run(move || bind_dns_listeners(port))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("bind the DNS listeners on port {port}: {e}"))
}

/// Duplicates descriptors of another process (`pidfd_getfd`, Linux 5.6).
fn fds_of(pid: u32, fds: &[i32]) -> std::io::Result<Vec<std::os::fd::OwnedFd>> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: plain syscalls; every returned descriptor is owned exactly once below.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0);
        if pidfd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let pidfd = std::os::fd::OwnedFd::from_raw_fd(pidfd as i32);
        let mut out = Vec::new();
        for fd in fds {
            let got = libc::syscall(
                libc::SYS_pidfd_getfd,
                std::os::fd::AsRawFd::as_raw_fd(&pidfd),
                *fd,
                0,
            );
            if got < 0 {
                return Err(std::io::Error::last_os_error());
            }
            out.push(std::os::fd::OwnedFd::from_raw_fd(got as i32));
        }
        Ok(out)
    }
}

fn spawn_proxy(
    config: &AgentConfig,
    pins: &Path,
    dns: Option<&(std::os::fd::OwnedFd, std::os::fd::OwnedFd)>,
    exited: std::sync::mpsc::Sender<u32>,
) -> std::io::Result<u32> {
    use std::os::{fd::AsRawFd as _, unix::process::CommandExt as _};
    let exe = std::env::current_exe()?.with_file_name("membrane-proxy");
    let run_dir = config.run_dir();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run_dir.proxy_log())?;
    let args = ProxyArgs {
        node_netns: config.node_netns.clone(),
        pin_dir: pins.to_owned(),
        snapshot: run_dir.proxy_policy_snapshot(),
        agent_channel: Some(run_dir.proxy_channel()),
        egress_port: config.http_proxy_port,
        ingress_port: config.http_proxy_port + 1,
        records_socket: Some(run_dir.proxy_records()),
        dns_fds: dns.is_some(),
        dns_port: None,
        dns_snapshot: Some(run_dir.proxy_dns_snapshot()),
        dns: config.dns.clone(),
        filter_snapshot: Some(run_dir.proxy_filter_snapshot()),
        agent_socket: Some(run_dir.agent_socket()),
    };
    let mut command = std::process::Command::new(exe);
    command
        .args(args.to_args())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    if let Some((udp, tcp)) = dns {
        let (udp, tcp) = (udp.as_raw_fd(), tcp.as_raw_fd());
        // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork and exec.
        unsafe {
            command.pre_exec(move || {
                // Move both out of the way first, so neither target clobbers the other.
                let high_udp = libc::fcntl(udp, libc::F_DUPFD_CLOEXEC, 10);
                let high_tcp = libc::fcntl(tcp, libc::F_DUPFD_CLOEXEC, 10);
                if high_udp < 0
                    || high_tcp < 0
                    || libc::dup2(high_udp, DNS_UDP_FD) < 0
                    || libc::dup2(high_tcp, DNS_TCP_FD) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let child = command.spawn()?;
    // Reap it when it exits (so the pid check sees it gone) and tell the supervisor.
    let pid = child.id();
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
        let _ = exited.send(pid);
    });
    Ok(pid)
}
