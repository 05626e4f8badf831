//! The lab: a node in a box (DESIGN §7), first cut.
//!
//! `membrane lab up` builds a node network namespace (no uplink) with two pods, `frontend`
//! and `backend`; starts `membrane-agent` inside the node namespace (it loads the datapath
//! with its maps and links pinned under `/sys/fs/bpf/membrane/<lab>`, so enforcement outlives
//! the agent); registers the pods with the agent, which allocates identities from their labels
//! and attaches the programs; applies one CiliumNetworkPolicy — backend accepts only
//! frontend, only on 8080/TCP — through the agent's watched policy directory and API; and
//! starts HTTP servers on backend's :8080 (app) and :9090 (admin) as background processes.
//!
//! `membrane lab demo` brings the lab up if needed and shows the policy working with real
//! traffic: `curl` from frontend to backend:8080 (answered) and to backend:9090 (dropped in
//! the kernel), the flow events the datapath emitted for them, and its counters.
//! `membrane lab exec POD -- CMD...` runs a command inside a pod; `membrane lab down` stops the
//! servers and removes every namespace, pin and state file (idempotent). A failed or
//! interrupted `up` cleans up after itself.
//!
//! Everything lives in namespaces named `membrane-lab*` (or `$MEMBRANE_LAB_NAME*`); nothing
//! touches the root namespace.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use membrane_common::reason;
use membrane_datapath::{
    MetricsMap, Netns, PolicyMap,
    bpffs::{DEFAULT_BPFFS, PinDir},
    maps::protocol_name,
    plumbing::Node,
};

use crate::{
    api::{self, EndpointSpec, Request},
    bpf_cmd::{STATE_ROOT, read_registry, registry_path},
};

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

/// Default name of the lab: its node namespace, and the run name of its pins
/// (`/sys/fs/bpf/membrane/NAME`) and state (`/run/membrane/NAME`); pods are `NAME-POD`.
pub const DEFAULT_LAB_NAME: &str = "membrane-lab";
/// Environment variable that names the lab instead (tests run labs of their own).
pub const LAB_NAME_ENV: &str = "MEMBRANE_LAB_NAME";

/// The lab's name: `$MEMBRANE_LAB_NAME` or [`DEFAULT_LAB_NAME`].
pub fn lab_name() -> String {
    std::env::var(LAB_NAME_ENV)
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| DEFAULT_LAB_NAME.to_owned())
}

const FRONTEND_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
const BACKEND_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 20);
const APP_PORT: u16 = 8080;
const ADMIN_PORT: u16 = 9090;
/// Bound on how long a lab HTTP server lives (`membrane lab down` stops it long before).
const SERVER_LIFETIME: Duration = Duration::from_secs(24 * 3600);

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
    #[error("policy: {0}")]
    Policy(String),
    #[error("interrupted")]
    Interrupted,
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

fn step_err(step: &str) -> impl FnOnce(std::io::Error) -> LabError + '_ {
    move |e| LabError::Step {
        step: step.to_owned(),
        detail: e.to_string(),
    }
}

struct Pod {
    name: &'static str,
    ip: Ipv4Addr,
    labels: &'static [&'static str],
}

const PODS: [Pod; 2] = [
    Pod {
        name: "frontend",
        ip: FRONTEND_IP,
        labels: &[
            "k8s:app=frontend",
            "k8s:io.kubernetes.pod.namespace=default",
        ],
    },
    Pod {
        name: "backend",
        ip: BACKEND_IP,
        labels: &["k8s:app=backend", "k8s:io.kubernetes.pod.namespace=default"],
    },
];

fn pod_netns(pod: &str) -> String {
    format!("{}-{pod}", lab_name())
}

fn host_ifname(pod: &str) -> String {
    format!("lxc-{pod}").chars().take(15).collect()
}

/// Where the lab's maps and links are pinned.
pub fn pin_path() -> PathBuf {
    Path::new(DEFAULT_BPFFS).join("membrane").join(lab_name())
}

fn state_dir() -> PathBuf {
    Path::new(STATE_ROOT).join(lab_name())
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

fn ok(line: &str) {
    println!("  \u{2713} {line}");
}

/// Whether the lab is up (its node namespace and endpoint registry exist).
pub fn is_up() -> bool {
    Netns::exists(&lab_name()) && registry_path(&pin_path()).exists()
}

/// Stops the lab's agent and servers and removes every lab namespace, pin and state file.
/// Idempotent; returns what it removed.
pub fn down() -> Result<Vec<String>> {
    teardown(&lab_name())
}

/// Tears down the run `name`: stops the processes recorded in `/run/membrane/NAME/pids`,
/// deletes the namespaces `NAME` and `NAME-*`, the pins under `/sys/fs/bpf/membrane/NAME` and
/// the state in `/run/membrane/NAME`. Idempotent; returns what it removed.
pub(crate) fn teardown(name: &str) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let state = Path::new(STATE_ROOT).join(name);
    // The processes the run started (the agent first), then the proxy the agent started:
    // only once the agent is gone can it no longer start a new one.
    for file in ["pids", "proxy.pid"] {
        if let Ok(recorded) = std::fs::read_to_string(state.join(file)) {
            removed.extend(stop_processes(&recorded));
        }
    }
    let prefix = format!("{name}-");
    let mut namespaces: Vec<String> = Netns::list()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    namespaces.sort();
    if Netns::exists(name) {
        // The node last: pods first, so no veth outlives its peer's namespace for long.
        namespaces.push(name.to_owned());
    }
    for ns in namespaces {
        Netns::open(&ns)
            .and_then(Netns::delete)
            .map_err(at("delete namespace"))?;
        removed.push(format!("netns {ns}"));
    }
    let pins = Path::new(DEFAULT_BPFFS).join("membrane").join(name);
    if pins.exists() {
        PinDir::under(Path::new(DEFAULT_BPFFS), name)
            .and_then(PinDir::remove)
            .map_err(at("remove pinned maps and links"))?;
        removed.push(format!("pins {}", pins.display()));
    }
    // The shared parent stays if another run pins there; remove it only when empty.
    if let Some(parent) = pins.parent() {
        let _ = std::fs::remove_dir(parent);
    }
    if state.exists() {
        std::fs::remove_dir_all(&state).map_err(step_err("remove run state"))?;
        removed.push(format!("state {}", state.display()));
        let _ = std::fs::remove_dir(STATE_ROOT);
    }
    Ok(removed)
}

/// Sends SIGTERM to every pid listed (one per line), waits up to 5 s for them to exit, then
/// SIGKILLs what is left. Returns what it stopped.
fn stop_processes(recorded: &str) -> Vec<String> {
    let pids: Vec<libc::pid_t> = recorded
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let mut stopped = Vec::new();
    for &pid in &pids {
        // SAFETY: kill has no memory arguments; a stale pid at worst gets ESRCH.
        if unsafe { libc::kill(pid, libc::SIGTERM) } == 0 {
            stopped.push(format!("process {pid}"));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids
        .iter()
        .any(|p| Path::new(&format!("/proc/{p}")).exists())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    for &pid in &pids {
        if Path::new(&format!("/proc/{pid}")).exists() {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    stopped
}

/// Builds the lab unless it is up. A failed or interrupted build is torn down.
pub fn up() -> Result<()> {
    // SAFETY: installing a handler that only stores to an atomic is async-signal-safe.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    if is_up() {
        println!("membrane lab is up (membrane lab down to remove it)");
        return Ok(());
    }
    let stale = down()?;
    if !stale.is_empty() {
        println!("removed what an earlier lab run left: {}", stale.join(", "));
    }
    println!("membrane lab: building a node in a box");
    match build() {
        Ok(()) => Ok(()),
        Err(e) => {
            eprintln!("lab up failed ({e}); cleaning up");
            let _ = down();
            Err(e)
        }
    }
}

fn build() -> Result<()> {
    let node_name = lab_name();
    let node = Node::create(&node_name).map_err(at("create node namespace"))?;
    ok(&format!(
        "node namespace {node_name} (forwarding on, no uplink)"
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

    // The agent owns the datapath from here on; it runs inside the node namespace.
    let policy_dir = state_dir().join("policies");
    std::fs::create_dir_all(&policy_dir).map_err(step_err("create the policy directory"))?;
    let mut pids = vec![spawn_agent(&node_name, &node_name, &policy_dir)?];
    record_pids(&pids)?;
    let socket = agent_socket();
    wait_for(&format!("agent API at {}", socket.display()), || {
        socket.exists()
    })?;
    ok(&format!(
        "membrane-agent running in {node_name} (API {}, log {})",
        socket.display(),
        state_dir().join("agent.log").display()
    ));

    for (pod, link) in PODS.iter().zip(&links) {
        let labels: Vec<String> = pod
            .labels
            .iter()
            .filter_map(|l| l.strip_prefix("k8s:"))
            .filter(|l| !l.starts_with("io.kubernetes.pod.namespace="))
            .map(str::to_owned)
            .collect();
        let endpoint = EndpointSpec {
            name: pod.name.to_owned(),
            namespace: "default".to_owned(),
            labels,
            ipv4: pod.ip,
            host_ifname: link.host_ifname.clone(),
        };
        api::call(&socket, &Request::EndpointAdd { endpoint }).map_err(|e| LabError::Step {
            step: format!("register pod {}", pod.name),
            detail: e.to_string(),
        })?;
    }
    ok(
        "endpoints registered: the agent allocated identities from their labels and attached the tc programs (tcx, pinned)",
    );

    // The policy goes where the agent watches, and through the API so it is in force now.
    let policy_file = policy_dir.join("backend-allow-frontend.yaml");
    std::fs::write(&policy_file, LAB_POLICY).map_err(step_err("write the lab policy"))?;
    api::call(
        &socket,
        &Request::PolicyApply {
            text: LAB_POLICY.to_owned(),
            source: policy_file.display().to_string(),
        },
    )
    .map_err(|e| LabError::Policy(e.to_string()))?;
    ok(&format!(
        "policy backend-allow-frontend applied ({})",
        policy_file.display()
    ));

    let backend_ns = links[1].netns.name().to_owned();
    for (port, body) in [
        (APP_PORT, "hello from backend"),
        (ADMIN_PORT, "backend admin page"),
    ] {
        pids.push(spawn_server(&backend_ns, port, body)?);
    }
    record_pids(&pids)?;
    wait_listening(&links[1].netns, BACKEND_IP, &[APP_PORT, ADMIN_PORT])?;
    ok(&format!(
        "backend serves HTTP on :{APP_PORT} (app) and :{ADMIN_PORT} (admin)"
    ));
    check_interrupt()
}

fn record_pids(pids: &[u32]) -> Result<()> {
    record_pids_in(&state_dir(), pids)
}

/// Records the processes a run started, so its teardown stops them.
pub(crate) fn record_pids_in(state: &Path, pids: &[u32]) -> Result<()> {
    std::fs::write(
        state.join("pids"),
        pids.iter().map(|p| format!("{p}\n")).collect::<String>(),
    )
    .map_err(step_err("record process ids"))
}

/// The lab agent's API socket.
pub fn agent_socket() -> PathBuf {
    state_dir().join(crate::api::SOCKET_NAME)
}

pub(crate) fn wait_for(what: &str, mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ready() {
        if Instant::now() > deadline {
            return Err(LabError::Step {
                step: what.to_owned(),
                detail: "not ready after 15 s".into(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Starts `membrane-agent` for the node namespace, logging to the lab's state directory.
pub(crate) fn spawn_agent(name: &str, node: &str, policy_dir: &Path) -> Result<u32> {
    let exe = std::env::current_exe().map_err(step_err("find the membrane binary"))?;
    let agent = exe.with_file_name("membrane-agent");
    if !agent.exists() {
        return Err(LabError::Step {
            step: "start membrane-agent".into(),
            detail: format!(
                "{} not found (build it: cargo build -p membrane-agent)",
                agent.display()
            ),
        });
    }
    let log = std::fs::File::create(Path::new(STATE_ROOT).join(name).join("agent.log"))
        .map_err(step_err("create agent log"))?;
    let log2 = log.try_clone().map_err(step_err("agent log"))?;
    // Not under `ip netns exec`: that gives the process a private mount namespace with a
    // fresh /sys, so its bpffs pins would vanish with it. The agent enters the node
    // namespace per operation instead (Netns::run).
    let child = Command::new(agent)
        .args(["--name", name, "--node-netns", node, "--policy-dir"])
        .arg(policy_dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .spawn()
        .map_err(step_err("start membrane-agent"))?;
    Ok(child.id())
}

/// Starts `membrane lab serve` inside `netns` as a background process of its own.
pub(crate) fn spawn_server(netns: &str, port: u16, body: &str) -> Result<u32> {
    let exe = std::env::current_exe().map_err(step_err("find the membrane binary"))?;
    let child = Command::new("ip")
        .args(["netns", "exec", netns])
        .arg(exe)
        .args(["lab", "serve", "--port", &port.to_string(), "--body", body])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Its own process group: Ctrl-C in the user's terminal does not stop the lab.
        .process_group(0)
        .spawn()
        .map_err(step_err("start lab server"))?;
    // `ip netns exec` execs the command, so this pid is the server's.
    Ok(child.id())
}

pub(crate) fn wait_listening(ns: &Netns, ip: Ipv4Addr, ports: &[u16]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    for &port in ports {
        loop {
            let addr = SocketAddrV4::new(ip, port);
            let up = ns
                .run(move || {
                    std::net::TcpStream::connect_timeout(&addr.into(), Duration::from_millis(200))
                        .is_ok()
                })
                .map_err(at("probe server"))?;
            if up {
                break;
            }
            if Instant::now() > deadline {
                return Err(LabError::Step {
                    step: format!("start lab server on :{port}"),
                    detail: "not listening after 10 s".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// `membrane lab serve`: a small HTTP/1.1 responder for lab pods (run inside the pod's
/// namespace by `lab up`). Answers every request with 200 and `body`.
pub fn serve(port: u16, body: &str) -> Result<()> {
    let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
        .map_err(step_err("bind lab server"))?;
    let deadline = Instant::now() + SERVER_LIFETIME;
    let body = format!("{body}\n");
    for conn in listener.incoming() {
        if Instant::now() > deadline {
            break;
        }
        let Ok(mut conn) = conn else { continue };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        let mut buf = [0u8; 4096];
        let _ = conn.read(&mut buf);
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = conn.write_all(response.as_bytes());
    }
    Ok(())
}

/// `membrane lab exec POD -- CMD...`: runs CMD inside the pod's namespace and returns its
/// exit code. POD is `name` (namespace `default`) or `namespace/name`.
pub fn exec(pod: &str, command: &[String]) -> Result<i32> {
    let (namespace, name) = pod.split_once('/').unwrap_or(("default", pod));
    let known = read_registry(&pin_path());
    if !known
        .iter()
        .any(|e| e.name == name && e.namespace == namespace)
    {
        let names: Vec<String> = known
            .iter()
            .map(|e| format!("{}/{}", e.namespace, e.name))
            .collect();
        return Err(LabError::Step {
            step: format!("lab exec {pod}"),
            detail: if names.is_empty() {
                "the lab is not up (membrane lab up)".into()
            } else {
                format!("no pod {namespace}/{name}; pods: {}", names.join(", "))
            },
        });
    }
    let Some((program, args)) = command.split_first() else {
        return Err(LabError::Step {
            step: format!("lab exec {pod}"),
            detail: "no command given (membrane lab exec POD -- CMD...)".into(),
        });
    };
    let status = Command::new("ip")
        .args(["netns", "exec", &pod_netns(name), program])
        .args(args)
        .status()
        .map_err(step_err("run command in pod"))?;
    Ok(status.code().unwrap_or(1))
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

/// Brings the lab up if needed, then shows an allowed and a dropped connection with the
/// flow events and counters they produced. The lab stays up.
pub fn demo() -> Result<()> {
    up()?;
    let pins = pin_path();
    let registry = read_registry(&pins);
    let socket = agent_socket();
    let seen = |socket: &Path| -> u64 {
        api::call(socket, &Request::Status)
            .ok()
            .and_then(|s| s["flows"]["seen"].as_u64())
            .unwrap_or(0)
    };
    let seen_before = seen(&socket);

    println!("\nidentities (from pod labels):");
    for e in &registry {
        println!("  {:<6} {:<9} {}", e.identity, e.name, e.labels.join(" "));
    }
    println!("\npolicy:");
    for line in LAB_POLICY.lines() {
        println!("  | {line}");
    }
    println!("\nbackend's entries in the policy map (membrane bpf policy get backend):");
    let name_of = |id: u32| {
        registry.iter().find(|e| e.identity == id).map_or_else(
            || {
                if id == 0 {
                    "any".to_owned()
                } else {
                    id.to_string()
                }
            },
            |e| format!("{id} ({})", e.name),
        )
    };
    let backend = registry
        .iter()
        .find(|e| e.name == "backend")
        .map(|e| e.endpoint_id);
    for r in PolicyMap::open_pinned(&pins)
        .and_then(|m| m.list())
        .map_err(at("read policy map"))?
        .into_iter()
        .filter(|r| Some(r.endpoint_id) == backend)
    {
        println!(
            "  {:<7} peer {:<16} {}/{}  {:?}",
            r.direction.as_str(),
            name_of(r.remote_identity),
            r.ports,
            protocol_name(r.protocol),
            r.verdict
        );
    }

    println!("\nconnections (curl from frontend):");
    let frontend_ns = pod_netns("frontend");
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

    println!("\nflows (the datapath's events for those connections, from the agent):");
    let names: Vec<(Ipv4Addr, &str)> = registry.iter().map(|e| (e.ipv4, e.name.as_str())).collect();
    // The agent reads the ring buffer every 200 ms.
    std::thread::sleep(Duration::from_millis(500));
    let new = seen(&socket).saturating_sub(seen_before);
    let flows = api::call(
        &socket,
        &Request::Flows {
            last: usize::try_from(new).unwrap_or(usize::MAX),
        },
    )
    .map_err(|e| LabError::Step {
        step: "read flows from the agent".into(),
        detail: e.to_string(),
    })?;
    for flow in flows.as_array().into_iter().flatten() {
        println!("  {}", describe_flow(flow, &names));
    }

    println!("\ndatapath counters (membrane bpf metrics):");
    let metrics = MetricsMap::open_pinned(&pins).map_err(at("read metrics"))?;
    for s in metrics.snapshot().map_err(at("read metrics"))? {
        let verdict = if s.reason == reason::FORWARDED {
            "forwarded".to_owned()
        } else {
            format!("dropped: {} ({})", reason::describe(s.reason), s.reason)
        };
        println!(
            "  {:<8} {:<40} {:>8} packets",
            s.direction.as_str(),
            verdict,
            s.packets
        );
    }

    println!(
        "\nthe lab stays up; try:\n  \
         membrane lab exec frontend -- curl -s {BACKEND_IP}:{APP_PORT}\n  \
         membrane bpf ct list        membrane bpf ipcache list        membrane bpf endpoint list\n  \
         membrane lab down"
    );
    if unexpected.is_empty() {
        Ok(())
    } else {
        Err(LabError::Unexpected(unexpected.join("; ")))
    }
}
/// One flow (as the agent's API returns it) in the shape of Hubble's compact output.
pub fn describe_flow(f: &serde_json::Value, names: &[(Ipv4Addr, &str)]) -> String {
    let endpoint = |addr: &str| {
        let (ip, port) = addr.rsplit_once(':').unwrap_or((addr, ""));
        let who = ip
            .parse::<Ipv4Addr>()
            .ok()
            .and_then(|ip| {
                names
                    .iter()
                    .find(|(a, _)| *a == ip)
                    .map(|(_, n)| (*n).to_owned())
            })
            .unwrap_or_else(|| ip.to_owned());
        format!("{who}:{port}")
    };
    let kind = match f["kind"].as_str().unwrap_or_default() {
        "Drop" => "drop".to_owned(),
        "Trace" => "trace".to_owned(),
        _ => format!(
            "policy-verdict:{}",
            match_type_name(f["match_type"].as_u64().unwrap_or(0) as u8)
        ),
    };
    let verdict = match f["verdict"].as_str().unwrap_or_default() {
        "Dropped" => format!("DROPPED ({})", f["drop_reason_desc"].as_str().unwrap_or("")),
        "Redirected" => "REDIRECTED".to_owned(),
        _ => "FORWARDED".to_owned(),
    };
    format!(
        "{} (ID:{}) -> {} (ID:{}) {} {} {} {}",
        endpoint(f["src"].as_str().unwrap_or_default()),
        f["src_identity"],
        endpoint(f["dst"].as_str().unwrap_or_default()),
        f["dst_identity"],
        f["protocol"].as_str().unwrap_or_default(),
        kind,
        f["direction"].as_str().unwrap_or_default().to_uppercase(),
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
