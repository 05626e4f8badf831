//! The node's L7 proxy process (`membrane-proxy`) and the agent's side of it.
//!
//! The proxy is a separate process (DESIGN §1): an agent restart must not break L7 traffic.
//! The agent writes the HTTP rules of every local endpoint as a policy snapshot file
//! (`/run/membrane/<name>/proxy-policy.json`, written atomically whenever the resolution
//! changes); the proxy watches it, applies a new snapshot to new requests without dropping
//! connections, and after a restart serves from the last snapshot while the agent is away.
//! Source and destination identities come from the pinned ipcache, read directly. The proxy
//! prints one JSON line per access record on stdout; the agent turns them into Hubble flows.
//!
//! The proxy enters the node network namespace on its main thread before it starts its
//! runtime, so every thread and socket it creates lives there (its transparent listeners,
//! its marked upstream connections), while it stays in the host's mount namespace where the
//! bpffs pins are.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use membrane_datapath::{IpcacheMap, Netns};
use membrane_l7proxy::{
    access::{AccessLog, AccessRecord, RecordKind},
    redirect::{
        self, Direction as ProxyDirection, IdentitySource, TransparentConfig,
        store::{
            PolicySnapshot, PolicyStore, Remotes, SnapshotEndpoint, SnapshotHeaderMatch,
            SnapshotHttpRule, SnapshotPeer, SnapshotPort, read_snapshot, write_snapshot,
        },
    },
};
use membrane_policy::{EndpointPolicy, L7Parser, L7Rules, RemoteIdentities};

/// File name of the proxy policy snapshot in the run's state directory.
pub const SNAPSHOT_NAME: &str = "proxy-policy.json";

/// The proxy's HTTP rules from the endpoints' resolved policies (HTTP rule sets only; DNS
/// rule sets belong to the DNS proxy).
pub fn snapshot_of<'a>(
    endpoints: impl IntoIterator<Item = (u64, Ipv4Addr, &'a EndpointPolicy)>,
    revision: u64,
) -> PolicySnapshot {
    let mut snapshot = PolicySnapshot {
        revision,
        ..PolicySnapshot::default()
    };
    for (id, ip, policy) in endpoints {
        let mut ports = Vec::new();
        for set in policy.l7.iter().filter(|s| s.parser == L7Parser::Http) {
            let direction = match set.direction {
                membrane_policy::Direction::Ingress => ProxyDirection::Ingress,
                membrane_policy::Direction::Egress => ProxyDirection::Egress,
            };
            let peers = set
                .rules
                .iter()
                .map(|peer| SnapshotPeer {
                    remotes: match &peer.remote {
                        RemoteIdentities::Any => Remotes::Any,
                        RemoteIdentities::Set(ids) => {
                            Remotes::Identities(ids.iter().map(|i| i.0).collect())
                        }
                    },
                    http: match &peer.rules {
                        L7Rules::Http(rules) => rules.iter().filter_map(http_rule).collect(),
                        L7Rules::Dns(_) => Vec::new(),
                    },
                })
                .collect();
            ports.push(SnapshotPort {
                direction,
                port: set.port,
                end_port: set.end_port,
                peers,
            });
        }
        if !ports.is_empty() {
            snapshot.endpoints.push(SnapshotEndpoint {
                id,
                ips: vec![IpAddr::V4(ip)],
                ports,
            });
        }
    }
    snapshot
}

/// One engine rule in the snapshot's form. A rule with a secret-backed header match cannot be
/// evaluated here (no secrets are fetched) and is left out, which only narrows what is allowed
/// (Cilium: a failed secret fetch never matches).
fn http_rule(rule: &membrane_policy::HttpRule) -> Option<SnapshotHttpRule> {
    if rule.header_matches.iter().any(|m| m.secret.is_some()) {
        return None;
    }
    Some(SnapshotHttpRule {
        method: rule.method.clone(),
        path: rule.path.clone(),
        host: rule.host.clone(),
        headers: rule
            .headers
            .iter()
            .map(|h| match &h.value {
                Some(v) => format!("{}: {v}", h.name),
                None => h.name.clone(),
            })
            .collect(),
        header_matches: rule
            .header_matches
            .iter()
            .map(|m| SnapshotHeaderMatch {
                name: m.name.clone(),
                value: m.value.clone().unwrap_or_default(),
                mismatch: match m.mismatch {
                    membrane_policy::http::MismatchAction::Fail => String::new(),
                    membrane_policy::http::MismatchAction::Log => "LOG".into(),
                    membrane_policy::http::MismatchAction::Add => "ADD".into(),
                    membrane_policy::http::MismatchAction::Delete => "DELETE".into(),
                    membrane_policy::http::MismatchAction::Replace => "REPLACE".into(),
                },
            })
            .collect(),
    })
}

/// Where the proxy records the snapshot revision it applied.
pub fn applied_path(snapshot: &Path) -> PathBuf {
    snapshot.with_extension("applied")
}

/// Waits (bounded) until the proxy applied `revision`; false on timeout or when no proxy
/// runs. Never fails the caller: a slow proxy only delays.
pub fn wait_applied(snapshot: &Path, revision: u64, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let applied = std::fs::read_to_string(applied_path(snapshot))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        if applied == Some(revision) {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes the snapshot atomically.
pub fn save(path: &Path, snapshot: &PolicySnapshot) -> Result<(), String> {
    write_snapshot(path, snapshot).map_err(|e| format!("{}: {e}", path.display()))
}

/// Identities from the pinned ipcache (longest prefix; unknown = world).
struct PinnedIpcache(Mutex<IpcacheMap>);

impl IdentitySource for PinnedIpcache {
    fn identity_of(&self, ip: IpAddr) -> u32 {
        let IpAddr::V4(v4) = ip else {
            return membrane_common::identity::WORLD;
        };
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.lookup(v4)
            .ok()
            .flatten()
            .unwrap_or(membrane_common::identity::WORLD)
    }
}

/// `membrane-proxy` settings.
#[derive(Clone, Debug)]
pub struct ProxySettings {
    pub node_netns: String,
    pub pin_dir: PathBuf,
    pub snapshot: PathBuf,
    pub egress_port: u16,
    pub ingress_port: u16,
    /// Unix datagram socket of the agent's flow pipeline; each access record is sent there
    /// as one JSON datagram (dropped, never waited for, when the agent is away).
    pub records_socket: Option<PathBuf>,
}

/// Runs the proxy until SIGTERM/SIGINT (`stop`).
pub fn run(
    settings: ProxySettings,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<()> {
    use std::sync::atomic::Ordering;
    let node = Netns::open(&settings.node_netns)?;
    let file = std::fs::File::open(node.path())?;
    // SAFETY: `file` is an open namespace file; setns affects this thread, and the threads
    // it starts from now on (the runtime's) inherit the namespace.
    if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) } != 0 {
        anyhow::bail!(
            "enter {}: {}",
            settings.node_netns,
            std::io::Error::last_os_error()
        );
    }
    let ipcache = IpcacheMap::open_pinned(&settings.pin_dir)?;
    let store = Arc::new(PolicyStore::new());
    let snapshot_path = settings.snapshot.clone();
    let mut loaded: Option<SystemTime> = None;
    let mut reload = move |store: &PolicyStore| {
        let modified = std::fs::metadata(&snapshot_path)
            .and_then(|m| m.modified())
            .ok();
        if modified.is_none() || modified == loaded {
            return;
        }
        match read_snapshot(&snapshot_path).and_then(|s| store.install(s)) {
            Ok(rejected) => {
                loaded = modified;
                // Tell the agent which revision is in force (it waits for this before
                // answering a policy change, as Cilium waits for Envoy's ACK).
                let _ = std::fs::write(applied_path(&snapshot_path), store.revision().to_string());
                for r in rejected {
                    tracing::warn!(rule = ?r, "HTTP rule rejected; it allows nothing");
                }
                tracing::info!(revision = store.revision(), "policy snapshot applied");
            }
            Err(e) => {
                tracing::error!(error = %e, "policy snapshot not applied; the previous one stays")
            }
        }
    };
    reload(&store);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (log, mut records) = AccessLog::channel(membrane_l7proxy::access::DEFAULT_CHANNEL_CAPACITY);
    let config = TransparentConfig {
        egress_listen: Some((Ipv4Addr::UNSPECIFIED, settings.egress_port).into()),
        ingress_listen: Some((Ipv4Addr::UNSPECIFIED, settings.ingress_port).into()),
        access_log: log,
        ..TransparentConfig::default()
    };
    let policies: Arc<dyn redirect::PolicySource> = store.clone();
    let identities: Arc<dyn IdentitySource> = Arc::new(PinnedIpcache(Mutex::new(ipcache)));
    runtime.block_on(async move {
        let records_socket = settings.records_socket.clone();
        tokio::spawn(async move {
            let sender = std::os::unix::net::UnixDatagram::unbound().ok();
            if let Some(s) = &sender {
                let _ = s.set_nonblocking(true);
            }
            while let Some(record) = records.recv().await {
                let line = record_json(&record);
                match (&sender, &records_socket) {
                    (Some(s), Some(path)) => {
                        // The agent may be restarting: records are dropped, traffic never waits.
                        let _ = s.send_to(line.as_bytes(), path);
                    }
                    _ => println!("{line}"),
                }
            }
        });
        let stop_watch = stop.clone();
        let watcher_store = store.clone();
        tokio::spawn(async move {
            while !stop_watch.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(50)).await;
                reload(&watcher_store);
            }
        });
        let shutdown = async move {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        redirect::run(config, policies, identities, shutdown).await
    })?;
    Ok(())
}

/// One access record as a JSON line (the agent's reader turns it into a Hubble flow).
pub fn record_json(r: &AccessRecord) -> String {
    let kind = match r.kind {
        RecordKind::Request => "request",
        RecordKind::Response => "response",
        RecordKind::Denied => "denied",
    };
    let time = r
        .timestamp
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    serde_json::json!({
        "kind": kind,
        "time_ns": time.to_string(),
        "version": format!("{:?}", r.version),
        "method": r.method,
        "url": r.url,
        "status": r.status,
        "latency_ns": r.latency.map(|l| l.as_nanos() as u64),
        "source": r.source.to_string(),
        "destination": r.destination.to_string(),
        "source_identity": r.source_identity,
        "destination_identity": r.destination_identity,
        "rule": r.rule.as_ref().map(|rule| rule.to_string()),
        "error": r.error,
    })
    .to_string()
}

/// The agent's form of a proxy record line, for the flow pipeline. `None` for lines that are
/// not records (the proxy's logs go to stderr, but be lenient).
pub fn record_to_flow(
    line: &str,
    endpoint_of: impl Fn(IpAddr) -> Option<u32>,
) -> Option<membrane_observer::HttpRecord> {
    use membrane_observer::{HttpRecord, L7Kind, L7Verdict};
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let source: std::net::SocketAddr = v["source"].as_str()?.parse().ok()?;
    let destination: std::net::SocketAddr = v["destination"].as_str()?.parse().ok()?;
    let (kind, verdict) = match v["kind"].as_str()? {
        "request" => (L7Kind::Request, L7Verdict::Forwarded),
        "denied" => (L7Kind::Request, L7Verdict::Denied),
        _ if !v["error"].is_null() => (L7Kind::Response, L7Verdict::Error),
        _ => (L7Kind::Response, L7Verdict::Forwarded),
    };
    let nanos: u64 = v["time_ns"].as_str()?.parse().ok()?;
    // Egress when the client is a local endpoint, else ingress.
    let (endpoint_id, direction) = match endpoint_of(source.ip()) {
        Some(id) => (id, membrane_observer::Direction::Egress),
        None => (
            endpoint_of(destination.ip()).unwrap_or(0),
            membrane_observer::Direction::Ingress,
        ),
    };
    let protocol = match v["version"].as_str().unwrap_or_default() {
        "HTTP/1.0" => "HTTP/1.0",
        "HTTP/2.0" => "HTTP/2",
        _ => "HTTP/1.1",
    };
    Some(HttpRecord {
        time: SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos),
        kind,
        verdict,
        method: v["method"].as_str().unwrap_or_default().to_owned(),
        url: v["url"].as_str().unwrap_or_default().to_owned(),
        protocol: protocol.to_owned(),
        status: v["status"].as_u64().and_then(|s| u16::try_from(s).ok()),
        latency: v["latency_ns"].as_u64().map(Duration::from_nanos),
        headers: Vec::new(),
        client: source,
        server: destination,
        client_identity: v["source_identity"]
            .as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .unwrap_or(0),
        server_identity: v["destination_identity"]
            .as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .unwrap_or(0),
        endpoint_id,
        direction,
        policy: None,
    })
}
