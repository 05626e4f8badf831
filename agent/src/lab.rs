//! The minimal lab: a node in a box (DESIGN §7, first step).
//!
//! `membrane lab demo` builds a node network namespace (no uplink) with two pods, `frontend`
//! and `backend`, gives them security identities from their labels, loads the datapath with
//! its maps pinned under a lab-specific bpffs path, attaches the tc programs to both
//! host-side veths, and applies one CiliumNetworkPolicy — backend accepts only frontend, only
//! on 8080/TCP — through the policy engine (parse, resolve, write the entries). It then shows
//! the policy working with real traffic: `curl` from frontend to backend:8080 (answered) and
//! to backend:9090 (dropped in the kernel), followed by the flow events the datapath emitted,
//! its counters and its conntrack table. It tears everything down at the end, also
//! after Ctrl-C or a failed step; `membrane lab down` removes what an killed run left.
//!
//! Everything lives in namespaces named `membrane-lab*`; nothing touches the root namespace.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use membrane_common::reason;
use membrane_datapath::{
    Datapath, EndpointEntry, EventKind, EventVerdict, FlowEventView, Ipv4Prefix, MapSizes, Netns,
    bpffs::{DEFAULT_BPFFS, PinDir},
    maps::protocol_name,
    plumbing::Node,
};
use membrane_policy::{
    EndpointInfo, Identity, IdentityAllocator as _, IdentitySet, Labels, LocalAllocator,
    Repository, ResolveOptions, parse_documents, resolve_endpoint,
};

use crate::datapath_sync;

/// The lab's one policy, as a Cilium user writes it.
pub const LAB_POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: backend-allow-frontend
  namespace: default
spec:
  endpointSelector:
    matchLabels:
      app: backend
  ingress:
    - fromEndpoints:
        - matchLabels:
            app: frontend
      toPorts:
        - ports:
            - port: "8080"
              protocol: TCP
"#;

/// Node namespace of the lab.
pub const LAB_NODE: &str = "membrane-lab";
/// Run name of the lab's pinned maps (`/sys/fs/bpf/membrane/lab`).
pub const LAB_PIN_RUN: &str = "lab";

const FRONTEND_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
const BACKEND_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 20);
const APP_PORT: u16 = 8080;
const ADMIN_PORT: u16 = 9090;
/// Bound on how long the lab's HTTP servers live.
const SERVER_LIFETIME: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("{step}: {source}")]
    Datapath {
        step: String,
        #[source]
        source: Box<membrane_datapath::DatapathError>,
    },
    #[error("{step}: {detail}")]
    Step { step: String, detail: String },
    #[error("interrupted")]
    Interrupted,
    #[error("policy: {0}")]
    Policy(String),
    #[error("the lab ran, but {0}")]
    Unexpected(String),
}

type Result<T> = std::result::Result<T, LabError>;

fn at(step: &str) -> impl FnOnce(membrane_datapath::DatapathError) -> LabError + '_ {
    move |source| LabError::Datapath {
        step: step.to_owned(),
        source: Box::new(source),
    }
}

struct Pod {
    name: &'static str,
    ip: Ipv4Addr,
    endpoint_id: u32,
    labels: &'static [&'static str],
}

const PODS: [Pod; 2] = [
    Pod {
        name: "frontend",
        ip: FRONTEND_IP,
        endpoint_id: 1001,
        labels: &[
            "k8s:app=frontend",
            "k8s:io.kubernetes.pod.namespace=default",
        ],
    },
    Pod {
        name: "backend",
        ip: BACKEND_IP,
        endpoint_id: 1002,
        labels: &["k8s:app=backend", "k8s:io.kubernetes.pod.namespace=default"],
    },
];

fn pod_netns(pod: &str) -> String {
    format!("{LAB_NODE}-{pod}")
}

fn host_ifname(pod: &str) -> String {
    format!("lxc-{pod}").chars().take(15).collect()
}

fn pin_path() -> PathBuf {
    Path::new(DEFAULT_BPFFS).join("membrane").join(LAB_PIN_RUN)
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err(LabError::Interrupted)
    } else {
        Ok(())
    }
}

/// Removes every lab namespace and the lab's pinned maps. Idempotent; returns what it removed.
pub fn down() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for pod in &PODS {
        let name = pod_netns(pod.name);
        if Netns::exists(&name) {
            Netns::open(&name)
                .and_then(Netns::delete)
                .map_err(at("delete pod namespace"))?;
            removed.push(format!("netns {name}"));
        }
    }
    if Netns::exists(LAB_NODE) {
        Netns::open(LAB_NODE)
            .and_then(Netns::delete)
            .map_err(at("delete node namespace"))?;
        removed.push(format!("netns {LAB_NODE}"));
    }
    if pin_path().exists() {
        PinDir::under(Path::new(DEFAULT_BPFFS), LAB_PIN_RUN)
            .and_then(PinDir::remove)
            .map_err(at("remove pinned maps"))?;
        removed.push(format!("pins {}", pin_path().display()));
    }
    // The shared parent stays if another run pins there; remove it only when empty.
    if let Some(parent) = pin_path().parent() {
        let _ = std::fs::remove_dir(parent);
    }
    Ok(removed)
}

/// A tiny HTTP/1.1 responder inside a namespace, bounded in lifetime.
struct HttpServer {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl HttpServer {
    fn start(ns: &Netns, port: u16, body: &'static str) -> Result<Self> {
        let addr = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
        let listener = ns
            .run(move || TcpListener::bind(addr))
            .map_err(at("start HTTP server"))?
            .map_err(|e| LabError::Step {
                step: format!("bind :{port} in {}", ns.name()),
                detail: e.to_string(),
            })?;
        listener.set_nonblocking(true).map_err(|e| LabError::Step {
            step: "listener".into(),
            detail: e.to_string(),
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = std::thread::spawn(move || {
            let deadline = Instant::now() + SERVER_LIFETIME;
            while !stop2.load(Ordering::Relaxed) && Instant::now() < deadline {
                let Ok((mut conn, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 2048];
                let _ = conn.read(&mut buf);
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(response.as_bytes());
            }
        });
        Ok(Self {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// What curl saw.
enum Outcome {
    Answered { status: String, body: String },
    NoAnswer(String),
}

fn curl(ns: &str, url: &str, timeout_secs: u32) -> Result<Outcome> {
    let output = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "curl",
            "-sS",
            "--max-time",
            &timeout_secs.to_string(),
        ])
        .args(["-w", "\n%{http_code}", url])
        .output()
        .map_err(|e| LabError::Step {
            step: "run curl".into(),
            detail: format!("{e} (is curl installed?)"),
        })?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        let (body, status) = stdout.rsplit_once('\n').unwrap_or(("", stdout.as_str()));
        Ok(Outcome::Answered {
            status: status.trim().to_owned(),
            body: body.trim().to_owned(),
        })
    } else {
        Ok(Outcome::NoAnswer(
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ))
    }
}

fn ok(line: &str) {
    println!("  \u{2713} {line}");
}

/// Runs the demo; always tears down.
pub fn demo() -> Result<()> {
    // SAFETY: installing a handler that only stores to an atomic is async-signal-safe.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    let stale = down()?;
    if !stale.is_empty() {
        println!("removed what an earlier lab run left: {}", stale.join(", "));
    }
    println!("membrane lab: a node in a box");
    let result = run_demo();
    println!("\ncleaning up");
    let removed = down()?;
    for r in &removed {
        println!("  removed {r}");
    }
    result
}

fn run_demo() -> Result<()> {
    let node = Node::create(LAB_NODE).map_err(at("create node namespace"))?;
    ok(&format!(
        "node namespace {LAB_NODE} (forwarding on, no uplink)"
    ));
    let mut links = Vec::new();
    for pod in &PODS {
        let link = node
            .add_endpoint(&pod_netns(pod.name), &host_ifname(pod.name), pod.ip)
            .map_err(at(&format!("create pod {}", pod.name)))?;
        ok(&format!(
            "pod {:<9} {:<12} netns {}, host veth {}",
            pod.name,
            pod.ip,
            link.netns.name(),
            link.host_ifname
        ));
        links.push(link);
    }
    check_interrupt()?;

    // Identities from labels, the policy through the engine.
    let mut allocator = LocalAllocator::new();
    let mut identities = IdentitySet::with_reserved();
    let mut pod_identities = Vec::new();
    for pod in &PODS {
        let labels = Labels::parse(pod.labels.iter().copied())
            .map_err(|e| LabError::Policy(e.to_string()))?;
        let id = allocator
            .allocate(&labels)
            .map_err(|e| LabError::Policy(e.to_string()))?;
        identities.insert(id, labels.clone());
        pod_identities.push((id, labels));
    }
    let mut repo = Repository::new();
    for policy in
        parse_documents(LAB_POLICY, "lab policy").map_err(|e| LabError::Policy(e.to_string()))?
    {
        repo.add(policy)
            .map_err(|e| LabError::Policy(e.to_string()))?;
    }
    let options = ResolveOptions::new(0, 0);

    let pins =
        PinDir::under(Path::new(DEFAULT_BPFFS), LAB_PIN_RUN).map_err(at("create pin directory"))?;
    let mut datapath =
        Datapath::load(pins.path(), MapSizes::default()).map_err(at("load datapath"))?;
    let mut events = datapath.take_events();
    let mut resolved = Vec::new();
    for ((pod, link), (id, labels)) in PODS.iter().zip(&links).zip(&pod_identities) {
        let endpoint = EndpointInfo::new(u64::from(pod.endpoint_id), labels.clone());
        let policy = resolve_endpoint(&repo, &endpoint, &identities, &options);
        datapath
            .endpoints()
            .upsert(EndpointEntry {
                ifindex: link.host_ifindex,
                endpoint_id: pod.endpoint_id,
                identity: id.0,
                enforce_ingress: policy.enforce_ingress,
                enforce_egress: policy.enforce_egress,
            })
            .map_err(at("register endpoint"))?;
        datapath
            .ipcache()
            .upsert(Ipv4Prefix::host(pod.ip), id.0)
            .map_err(at("ipcache"))?;
        datapath_sync::install(datapath.policy(), &policy)
            .map_err(|e| LabError::Policy(e.to_string()))?;
        datapath
            .attach_endpoint(node.netns(), &link.host_ifname)
            .map_err(at("attach programs"))?;
        resolved.push(policy);
    }
    ok(&format!(
        "datapath loaded, maps and links pinned at {}, tc programs attached (tcx) to {}",
        pins.path().display(),
        links
            .iter()
            .map(|l| l.host_ifname.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ));

    let backend_ns = &links[1].netns;
    let _app = HttpServer::start(backend_ns, APP_PORT, "hello from backend\n")?;
    let _admin = HttpServer::start(backend_ns, ADMIN_PORT, "backend admin page\n")?;
    ok(&format!(
        "backend serves HTTP on :{APP_PORT} (app) and :{ADMIN_PORT} (admin)"
    ));
    check_interrupt()?;

    println!("\nidentities:");
    for (pod, (id, labels)) in PODS.iter().zip(&pod_identities) {
        let labels: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
        println!("  {:<6} {:<9} {}", id.0, pod.name, labels.join(" "));
    }
    println!("\npolicy:");
    for line in LAB_POLICY.lines() {
        println!("  | {line}");
    }
    println!("\nresolved into the datapath's policy map:");
    for (pod, policy) in PODS.iter().zip(&resolved) {
        println!(
            "  {} (endpoint {}): ingress {}, egress {}",
            pod.name,
            pod.endpoint_id,
            if policy.enforce_ingress {
                "default-deny"
            } else {
                "not enforced"
            },
            if policy.enforce_egress {
                "default-deny"
            } else {
                "not enforced"
            }
        );
    }
    for r in datapath.policy().list().map_err(at("list policy"))? {
        println!(
            "    endpoint {} {:<7} peer {:<16} {}/{}  {:?}  precedence {}  cookie {}",
            r.endpoint_id,
            r.direction.as_str(),
            identity_name(&identities, r.remote_identity),
            r.ports,
            protocol_name(r.protocol),
            r.verdict,
            r.precedence,
            r.cookie
        );
    }

    println!("\nconnections (curl from frontend):");
    let frontend_ns = links[0].netns.name().to_owned();
    let allowed = curl(&frontend_ns, &format!("http://{BACKEND_IP}:{APP_PORT}/"), 5)?;
    check_interrupt()?;
    let denied = curl(
        &frontend_ns,
        &format!("http://{BACKEND_IP}:{ADMIN_PORT}/"),
        2,
    )?;
    let mut unexpected = Vec::new();
    match &allowed {
        Outcome::Answered { status, body } => {
            println!("  frontend -> backend:{APP_PORT}  FORWARDED  HTTP {status} \"{body}\"")
        }
        Outcome::NoAnswer(e) => {
            println!("  frontend -> backend:{APP_PORT}  NO ANSWER  {e}");
            unexpected.push(format!("frontend -> backend:{APP_PORT} should be allowed"));
        }
    }
    match &denied {
        Outcome::NoAnswer(e) => println!("  frontend -> backend:{ADMIN_PORT}  DROPPED    {e}"),
        Outcome::Answered { status, .. } => {
            println!("  frontend -> backend:{ADMIN_PORT}  ANSWERED   HTTP {status}");
            unexpected.push(format!(
                "frontend -> backend:{ADMIN_PORT} should be dropped"
            ));
        }
    }

    if let Some(reader) = events.as_mut() {
        println!("\nflows (the datapath's events):");
        let names: Vec<(Ipv4Addr, &str)> = PODS.iter().map(|p| (p.ip, p.name)).collect();
        for e in reader.drain() {
            println!("  {}", describe_event(&e, &names));
        }
    }

    println!("\ndatapath counters (membrane bpf metrics):");
    println!(
        "  {:<9} {:<42} {:>8} {:>8}",
        "direction", "verdict", "packets", "bytes"
    );
    for s in datapath.metrics().snapshot().map_err(at("read metrics"))? {
        let verdict = if s.reason == reason::FORWARDED {
            "forwarded".to_owned()
        } else {
            format!("dropped: {} ({})", reason::describe(s.reason), s.reason)
        };
        println!(
            "  {:<9} {:<42} {:>8} {:>8}",
            s.direction.as_str(),
            verdict,
            s.packets,
            s.bytes
        );
    }
    println!("\nconntrack (membrane bpf ct list):");
    for e in datapath.conntrack().list().map_err(at("read conntrack"))? {
        println!(
            "  endpoint {} {:<7} {} {}:{} -> {}:{}  fwd {} rev {}{}",
            e.endpoint_id,
            e.direction.as_str(),
            protocol_name(e.protocol),
            e.src,
            e.sport,
            e.dst,
            e.dport,
            e.packets_fwd,
            e.packets_rev,
            if e.closing { "  closing" } else { "" }
        );
    }
    datapath.detach_all().map_err(at("detach programs"))?;
    drop(datapath);
    if unexpected.is_empty() {
        Ok(())
    } else {
        Err(LabError::Unexpected(unexpected.join("; ")))
    }
}

/// `ID (app=NAME)` for a known identity, `any` for 0.
fn identity_name(identities: &IdentitySet, id: u32) -> String {
    if id == 0 {
        return "any".into();
    }
    let app = identities.get(Identity(id)).and_then(|labels| {
        labels
            .iter()
            .find(|l| l.key == "app")
            .map(|l| l.value.clone())
    });
    match app {
        Some(app) => format!("{id} (app={app})"),
        None => id.to_string(),
    }
}

/// One event in the shape of Hubble's compact output.
fn describe_event(e: &FlowEventView, names: &[(Ipv4Addr, &str)]) -> String {
    let name = |ip: Ipv4Addr, port: u16| {
        let who = names
            .iter()
            .find(|(a, _)| *a == ip)
            .map_or_else(|| ip.to_string(), |(_, n)| (*n).to_owned());
        format!("{who}:{port}")
    };
    let kind = match e.kind {
        EventKind::Drop => "drop".to_owned(),
        EventKind::Trace => "trace".to_owned(),
        EventKind::PolicyVerdict => format!("policy-verdict:{}", match_type_name(e.match_type)),
    };
    let verdict = match (e.verdict, e.drop_reason) {
        (EventVerdict::Dropped, Some(r)) => format!("DROPPED ({})", reason::describe(r)),
        (EventVerdict::Dropped, None) => "DROPPED".into(),
        (EventVerdict::Forwarded, _) => "FORWARDED".into(),
        (EventVerdict::Redirected, _) => "REDIRECTED".into(),
    };
    format!(
        "{} (ID:{}) -> {} (ID:{}) {} {} {} {}",
        name(e.src, e.sport),
        e.src_identity,
        name(e.dst, e.dport),
        e.dst_identity,
        protocol_name(e.protocol),
        kind,
        e.direction.as_str().to_uppercase(),
        verdict
    )
}

/// Cilium's names for policy match types.
fn match_type_name(m: u8) -> &'static str {
    match m {
        1 => "L3-Only",
        2 => "L3-L4",
        3 => "L4-Only",
        4 => "all",
        5 => "L3-Proto",
        6 => "Proto-Only",
        _ => "none",
    }
}
