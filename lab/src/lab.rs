//! The lab: a node in a box (DESIGN §7).
//!
//! `membrane lab up [--topology FILE]` builds a topology ([`crate::topology`]; by default the
//! seed guide's: pods `frontend`, `backend`, `api`, `external-client` and `kube-system/kube-dns`,
//! world hosts standing in for `*.github.com`, `api.slack.com` and `*.amazonaws.com`, a cluster
//! DNS) inside a node network namespace; starts `membrane-agent` there (it loads the datapath
//! with its maps and links pinned under `/sys/fs/bpf/membrane/<lab>`, so enforcement outlives
//! the agent); registers the pods, which get identities from their labels and the programs on
//! their veths; applies the four seed policies of `examples/policies/` over the agent's API
//! (compiled in, so the binary works anywhere); and starts the pods' HTTP servers and the
//! cluster DNS as background processes. Progress is printed step by step. The agent serves
//! the flow page on the host's loopback ([`DEFAULT_UI_LISTEN`] unless told otherwise) and
//! `up` prints its URL.
//!
//! `membrane lab demo` brings the lab up if needed and shows the policies working with real
//! traffic: allowed and dropped connections, HTTP requests the proxy allows or answers 403,
//! the flows they produced and the datapath's counters. `membrane lab exec POD -- CMD...` runs
//! a command inside a pod (with the pod's resolv.conf); `membrane lab down` stops the processes
//! and removes every namespace, pin, state file and `/etc/netns` entry (idempotent). A failed
//! or interrupted `up` cleans up after itself.
//!
//! Everything lives in namespaces named `membrane-lab*` (or `$MEMBRANE_LAB_NAME*`); nothing
//! touches the root namespace.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use membrane_common::reason;
use membrane_datapath::{
    MetricsMap, Netns, PolicyMap,
    bpffs::{DEFAULT_BPFFS, PinDir},
    maps::protocol_name,
};

use membrane_agent_api::{
    Client, RunDir, api::FlowRow, args::AgentArgs, registry, run_dir::STATE_ROOT,
};

use crate::{
    topology::{self, ETC_NETNS, Topology},
    workload::{DnsServeArgs, ServeArgs},
};

/// The seed guide's four policies (`examples/policies/`), applied by `membrane lab up`.
///
/// `external-egress-policy` and `default-deny-external` have `rules.dns`: the pods' lookups
/// go through the node's DNS proxy, and the addresses of allowed names open `toFQDNs`.
pub const SEED_POLICIES: [(&str, &str); 4] = [
    (
        "backend-ingress.yaml",
        include_str!("../../examples/policies/backend-ingress.yaml"),
    ),
    (
        "api-l7.yaml",
        include_str!("../../examples/policies/api-l7.yaml"),
    ),
    (
        "external-egress-policy.yaml",
        include_str!("../../examples/policies/external-egress-policy.yaml"),
    ),
    (
        "default-deny-external.yaml",
        include_str!("../../examples/policies/default-deny-external.yaml"),
    ),
];

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

/// Bound on how long a lab server lives (`membrane lab down` stops it long before).
pub const SERVER_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Bound on concurrent connections per lab HTTP server; more are served one at a time.
const MAX_HTTP_CONNECTIONS: usize = 64;

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
    #[error(transparent)]
    Topology(#[from] topology::TopologyError),
    #[error(transparent)]
    Dns(#[from] crate::lab_dns::DnsServeError),
    #[error("policy: {0}")]
    Policy(String),
    #[error("interrupted")]
    Interrupted,
    #[error("the lab ran, but {0}")]
    Unexpected(String),
}

pub(crate) type Result<T> = std::result::Result<T, LabError>;

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

pub(crate) fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err(LabError::Interrupted)
    } else {
        Ok(())
    }
}

/// Makes Ctrl-C stop a build at the next step (which then tears down) instead of killing it
/// half-way.
pub(crate) fn catch_interrupt() {
    // SAFETY: installing a handler that only stores to an atomic is async-signal-safe.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
}

fn ok(line: &str) {
    println!("  \u{2713} {line}");
}

/// Whether the lab is up (its node namespace and endpoint registry exist).
pub fn is_up() -> bool {
    Netns::exists(&lab_name()) && RunDir::of_pin_dir(&pin_path()).endpoints().exists()
}

/// Stops the lab's agent and servers and removes every lab namespace, pin and state file.
/// Idempotent; returns what it removed.
pub fn down() -> Result<Vec<String>> {
    teardown(&lab_name())
}

/// Tears down the run `name`: stops the processes recorded in `/run/membrane/NAME/pids`,
/// deletes the namespaces `NAME` and `NAME-*` and their `/etc/netns` entries, the pins under
/// `/sys/fs/bpf/membrane/NAME` and the state in `/run/membrane/NAME`. Idempotent; returns what
/// it removed.
pub(crate) fn teardown(name: &str) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let state = Path::new(STATE_ROOT).join(name);
    // The other nodes' run names (`NAME-nodeK`): their run directories and pins.
    let is_node = |n: &str| {
        n.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix("-node"))
            .is_some_and(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()))
    };
    let mut node_runs: Vec<String> = [
        Path::new(STATE_ROOT).to_owned(),
        Path::new(DEFAULT_BPFFS).join("membrane"),
    ]
    .iter()
    .flat_map(|dir| {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    })
    .filter(|n| is_node(n))
    .collect();
    node_runs.sort();
    node_runs.dedup();
    // The processes the run started (the agents first, etcd among them), then the proxies
    // the agents started: only once an agent is gone can it no longer start a new one.
    if let Ok(recorded) = std::fs::read_to_string(state.join("pids")) {
        removed.extend(stop_processes(&recorded));
    }
    for run in std::iter::once(name.to_owned()).chain(node_runs.iter().cloned()) {
        let pid_file = Path::new(STATE_ROOT).join(&run).join("proxy.pid");
        if let Ok(recorded) = std::fs::read_to_string(pid_file) {
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
    // `ip netns exec` configuration of the run's namespaces (also of namespaces already gone).
    let mut etc: Vec<PathBuf> = std::fs::read_dir(ETC_NETNS)
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    n == name || n.starts_with(&prefix)
                })
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    etc.sort();
    for dir in etc {
        std::fs::remove_dir_all(&dir).map_err(step_err("remove /etc/netns entry"))?;
        removed.push(format!("{}", dir.display()));
    }
    // The directory itself only when nothing else uses it.
    let _ = std::fs::remove_dir(ETC_NETNS);
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
    for run in &node_runs {
        let pins = Path::new(DEFAULT_BPFFS).join("membrane").join(run);
        if pins.exists() {
            PinDir::under(Path::new(DEFAULT_BPFFS), run)
                .and_then(PinDir::remove)
                .map_err(at("remove pinned maps and links"))?;
            removed.push(format!("pins {}", pins.display()));
        }
        let dir = Path::new(STATE_ROOT).join(run);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(step_err("remove run state"))?;
            removed.push(format!("state {}", dir.display()));
        }
    }
    if state.exists() {
        std::fs::remove_dir_all(&state).map_err(step_err("remove run state"))?;
        removed.push(format!("state {}", state.display()));
    }
    let _ = std::fs::remove_dir(Path::new(DEFAULT_BPFFS).join("membrane"));
    let _ = std::fs::remove_dir(STATE_ROOT);
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

/// Where `membrane lab up` has the agent serve the flow page by default.
pub const DEFAULT_UI_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9966));

/// Where the lab's flow page listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UiListen {
    /// [`DEFAULT_UI_LISTEN`], or any free loopback port when another process (another lab)
    /// holds it.
    Default,
    /// Exactly this address (port 0: any); `up` fails if it is taken.
    Addr(SocketAddr),
    /// No flow page.
    Off,
}

/// Nodes of `membrane lab up` without `--nodes`.
pub const DEFAULT_NODES: u32 = 2;

/// How `membrane lab up` builds the lab.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// A topology file; `None` is the built-in seed topology.
    pub topology: Option<PathBuf>,
    /// Apply the four seed policies (`--no-policies` turns this off).
    pub policies: bool,
    /// Nodes, and how they route to each other (`--nodes`, `--routing`).
    pub shape: topology::Shape,
    /// The flow page (`--ui-listen`, `--no-ui`).
    pub ui: UiListen,
}

impl Default for UpOptions {
    fn default() -> Self {
        Self {
            topology: None,
            policies: true,
            shape: topology::Shape {
                nodes: DEFAULT_NODES,
                routing: membrane_agent_api::args::RoutingModeArg::Tunnel,
            },
            ui: UiListen::Default,
        }
    }
}

/// The flow page's listening socket, bound by `up` before anything is built and handed to
/// the agent (`--ui-listen-fd`), so two labs coming up at once never race for the port.
fn ui_listener(ui: UiListen) -> Result<Option<TcpListener>> {
    match ui {
        UiListen::Off => Ok(None),
        UiListen::Default => match TcpListener::bind(DEFAULT_UI_LISTEN) {
            Ok(listener) => Ok(Some(listener)),
            Err(e) => {
                println!(
                    "{DEFAULT_UI_LISTEN} is taken ({e}; another lab's flow page?): the flow page gets another loopback port"
                );
                TcpListener::bind(SocketAddr::new(DEFAULT_UI_LISTEN.ip(), 0))
                    .map(Some)
                    .map_err(step_err("bind the flow page to a loopback port"))
            }
        },
        UiListen::Addr(addr) => {
            if !addr.ip().is_loopback() {
                return Err(LabError::Step {
                    step: format!("serve the flow page on {addr}"),
                    detail: "the flow page has no authentication: give a loopback address".into(),
                });
            }
            TcpListener::bind(addr)
                .map(Some)
                .map_err(|e| LabError::Step {
                    step: format!("serve the flow page on {addr}"),
                    detail: format!("{e} (choose another with --ui-listen ADDR, or --no-ui)"),
                })
        }
    }
}

/// The flow page's URL if the lab's agent serves one.
pub fn ui_url() -> Option<String> {
    let addr = std::fs::read_to_string(RunDir::new(&lab_name()).ui_addr()).ok()?;
    Some(format!("http://{}/ui", addr.trim()))
}

fn print_ui_url() {
    if let Some(url) = ui_url() {
        println!(
            "flow page: {url} (live flows and the service map; open it in a browser on this machine)"
        );
    }
}

/// Builds the lab unless it is up. A failed or interrupted build is torn down.
pub fn up(options: &UpOptions) -> Result<()> {
    catch_interrupt();
    // A bad topology file is reported before anything is touched.
    let (topology, text) = match &options.topology {
        Some(path) => {
            let topology = Topology::load(path)?;
            let text = std::fs::read_to_string(path).map_err(step_err("read the topology"))?;
            (topology, text)
        }
        None => (Topology::seed(), topology::SEED_TOPOLOGY.to_owned()),
    };
    if is_up() {
        println!(
            "membrane lab {} is up (membrane lab down to remove it, e.g. to build another topology)",
            lab_name()
        );
        print_ui_url();
        return Ok(());
    }
    let ui = ui_listener(options.ui)?;
    let stale = down()?;
    if !stale.is_empty() {
        println!("removed what an earlier lab run left: {}", stale.join(", "));
    }
    println!(
        "membrane lab {}: building a node in a box ({})",
        lab_name(),
        options.topology.as_ref().map_or_else(
            || "the seed topology".to_owned(),
            |p| p.display().to_string()
        )
    );
    match build(
        &topology,
        &text,
        options.policies,
        options.shape,
        ui.as_ref(),
    ) {
        Ok(()) => {
            println!(
                "the lab is up: membrane lab exec POD -- CMD, membrane observe, membrane lab down"
            );
            print_ui_url();
            Ok(())
        }
        Err(e) => {
            eprintln!("lab up failed ({e}); cleaning up");
            let _ = down();
            Err(e)
        }
    }
}

fn build(
    topology: &Topology,
    text: &str,
    policies: bool,
    shape: topology::Shape,
    ui: Option<&TcpListener>,
) -> Result<()> {
    let name = lab_name();
    let built = topology::build(&name, topology, shape, ui, &mut |line| ok(&line))?;
    std::fs::write(state_dir().join("topology.yaml"), text)
        .map_err(step_err("keep the topology"))?;
    if policies {
        for (file, text) in SEED_POLICIES {
            let out = Client::new(&built.socket)
                .policy_apply(text, &format!("examples/policies/{file}"))
                .map_err(|e| LabError::Policy(format!("{file}: {e}")))?;
            let names = &out.applied;
            ok(&format!(
                "policy {} applied (examples/policies/{file})",
                names.join(", ")
            ));
        }
    } else {
        ok("no policies applied (--no-policies): every connection is allowed");
    }
    let filter = write_example_filter(&state_dir())?;
    ok(&format!(
        "example Wasm filter ready, not applied: membrane policy apply -f {}",
        filter.display()
    ));
    check_interrupt()
}

/// File name of the lab's example `WasmFilter` in its state directory.
pub const EXAMPLE_FILTER: &str = "filters/deny-internal.yaml";

/// Writes the example filter (`examples/filters/deny-path`, compiled in) and a `WasmFilter`
/// resource attaching it to `api`'s ingress on 8080 with the prefix `/api/v1/internal`: paths
/// `api-l7` allows (`GET /api/v1/...`) that the filter then answers with its own 403.
fn write_example_filter(state: &Path) -> Result<PathBuf> {
    let dir = state.join("filters");
    let (module, sha256) = crate::install_deny_path(&dir).map_err(|e| LabError::Step {
        step: "write the example Wasm filter".into(),
        detail: e.to_string(),
    })?;
    let resource = format!(
        "# The example filter examples/filters/deny-path on api's ingress (8080): requests the\n\
         # HTTP policy allowed whose path starts with /api/v1/internal get the filter's own 403.\n\
         apiVersion: membrane.io/v1alpha1\n\
         kind: WasmFilter\n\
         metadata:\n  name: deny-internal\n  namespace: default\n\
         spec:\n  endpointSelector:\n    matchLabels:\n      app: api\n  direction: Ingress\n  ports: [8080]\n\
         \x20 module: {}\n  sha256: {sha256}\n  config: \"/api/v1/internal\"\n  failurePolicy: FailClosed\n",
        module.display()
    );
    let path = state.join(EXAMPLE_FILTER);
    std::fs::write(&path, resource).map_err(step_err("write the example WasmFilter"))?;
    Ok(path)
}

/// The topology the lab was built from (the seed if it left no copy).
pub fn current_topology() -> Result<Topology> {
    let kept = state_dir().join("topology.yaml");
    if kept.exists() {
        Ok(Topology::load(&kept)?)
    } else {
        Ok(Topology::seed())
    }
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
    RunDir::new(&lab_name()).agent_socket()
}

/// The run names of the running lab's nodes (node 1's alone for a single-node lab).
pub fn node_runs() -> Vec<String> {
    let runs: Vec<String> = nodes().into_iter().map(|n| n.run_name).collect();
    if runs.is_empty() {
        vec![lab_name()]
    } else {
        runs
    }
}

/// The pin directory of the lab node `run`.
pub fn node_pin_path(run: &str) -> PathBuf {
    pin_path().with_file_name(run)
}

/// The endpoints registered on every node of the running lab.
pub fn lab_endpoints() -> Vec<registry::RegisteredEndpoint> {
    node_runs()
        .iter()
        .flat_map(|r| registry::read(&RunDir::of_pin_dir(&node_pin_path(r))))
        .collect()
}

/// The nodes of the running lab (empty when it is down).
pub fn nodes() -> Vec<topology::BuiltNode> {
    std::fs::read_to_string(state_dir().join(topology::NODES_FILE))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

/// The run name (namespace, run directory, pin directory) of the lab's node `node` — its
/// cluster name (`node2`) or its run name; `None` is the first node.
pub fn node_run_name(node: Option<&str>) -> Result<String> {
    let lab = lab_name();
    let Some(node) = node else {
        return Ok(lab);
    };
    let nodes = nodes();
    if let Some(n) = nodes.iter().find(|n| n.name == node || n.run_name == node) {
        return Ok(n.run_name.clone());
    }
    if node == topology::node_name(1) || node == lab {
        return Ok(lab);
    }
    let known: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    Err(LabError::Step {
        step: format!("find lab node `{node}`"),
        detail: if known.is_empty() {
            "the lab is down or has a single node (node1)".into()
        } else {
            format!("the lab's nodes are {}", known.join(", "))
        },
    })
}

/// The lab agent's Hubble socket.
pub fn hubble_socket() -> PathBuf {
    RunDir::new(&lab_name()).hubble_socket()
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

/// The log file of the agent of node `run_name` in the lab's state directory (node 1's
/// is `agent.log`).
pub fn agent_log(lab: &str, run_name: &str) -> PathBuf {
    let state = Path::new(STATE_ROOT).join(lab);
    if run_name == lab {
        state.join("agent.log")
    } else {
        state.join(format!("agent-{run_name}.log"))
    }
}

/// Starts `membrane-agent` with `args` (its node namespace and run name in them), logging to
/// the lab's state directory.
pub(crate) fn spawn_agent(name: &str, args: &AgentArgs) -> Result<u32> {
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
    let log =
        std::fs::File::create(agent_log(name, &args.name)).map_err(step_err("create agent log"))?;
    let log2 = log.try_clone().map_err(step_err("agent log"))?;
    // Not under `ip netns exec`: that gives the process a private mount namespace with a
    // fresh /sys, so its bpffs pins would vanish with it. The agent enters the node
    // namespace per operation instead (Netns::run).
    let mut command = Command::new(agent);
    command.args(args.to_args());
    if let Some(fd) = args.ui_listen_fd {
        // SAFETY: runs in the child between fork and exec and only calls fcntl, which is
        // async-signal-safe; it clears close-on-exec on the child's copy of the fd, so the
        // agent inherits the socket under the same number (the parent's stays close-on-exec).
        unsafe {
            command.pre_exec(move || {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let child = command
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .spawn()
        .map_err(step_err("start membrane-agent"))?;
    Ok(child.id())
}

/// Starts `membrane lab serve` inside `netns` as a background process of its own.
pub(crate) fn spawn_server(netns: &str, port: u16, body: &str, paths: &[String]) -> Result<u32> {
    let exe = std::env::current_exe().map_err(step_err("find the membrane binary"))?;
    let serve = ServeArgs {
        port,
        body: body.to_owned(),
        paths: paths.to_vec(),
    };
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns])
        .arg(exe)
        .args(serve.to_args());
    let child = cmd
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

/// Starts `membrane lab dns-serve` inside `netns`, logging one line per query to `log`.
pub(crate) fn spawn_dns(netns: &str, zone: &Path, log: &Path) -> Result<u32> {
    let exe = std::env::current_exe().map_err(step_err("find the membrane binary"))?;
    let log = std::fs::File::create(log).map_err(step_err("create the DNS log"))?;
    let log2 = log.try_clone().map_err(step_err("DNS log"))?;
    let child = Command::new("ip")
        .args(["netns", "exec", netns])
        .arg(exe)
        .args(
            DnsServeArgs {
                zone: zone.to_owned(),
                listen: (std::net::Ipv4Addr::UNSPECIFIED, 53).into(),
            }
            .to_args(),
        )
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .spawn()
        .map_err(step_err("start the lab DNS"))?;
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
                    step: format!("start lab server on {ip}:{port} in {}", ns.name()),
                    detail: "not listening after 10 s".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// `membrane lab serve`: a small HTTP/1.1 server for lab pods and world hosts (run inside
/// their namespace by `lab up`). Answers `200` with `body` (one line), or `404 not found`
/// when `paths` is not empty and the request path starts with none of them. Every response
/// closes the connection. Runs for [`SERVER_LIFETIME`].
pub fn serve(port: u16, body: &str, paths: &[String]) -> Result<()> {
    let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
        .map_err(step_err("bind lab server"))?;
    let body: Arc<str> = Arc::from(format!("{body}\n"));
    let paths: Arc<[String]> = Arc::from(paths.to_vec());
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            if active.load(Ordering::Acquire) >= MAX_HTTP_CONNECTIONS {
                // Backpressure: serve this one on the accept thread.
                respond(conn, &body, &paths);
                continue;
            }
            active.fetch_add(1, Ordering::AcqRel);
            let (body, paths, active) =
                (Arc::clone(&body), Arc::clone(&paths), Arc::clone(&active));
            std::thread::spawn(move || {
                respond(conn, &body, &paths);
                active.fetch_sub(1, Ordering::AcqRel);
            });
        }
    });
    std::thread::sleep(SERVER_LIFETIME);
    Ok(())
}

/// Largest request head the lab server reads; a request body is read and discarded up to
/// [`MAX_BODY`] so the client (or the L7 proxy) sees its whole request consumed.
const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 1024 * 1024;

fn respond(mut conn: TcpStream, body: &str, paths: &[String]) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(2)));
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break Some(end + 4);
        }
        if head.len() > MAX_HEAD {
            break None;
        }
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    };
    let Some(head_end) = head_end else {
        let _ = conn.write_all(
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 12\r\nconnection: close\r\n\r\nbad request\n",
        );
        return;
    };
    let text = String::from_utf8_lossy(&head[..head_end]).into_owned();
    let path = text
        .lines()
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or("/")
        .to_owned();
    let content_length = text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0)
        .min(MAX_BODY);
    let mut remaining = content_length.saturating_sub(head.len() - head_end);
    while remaining > 0 {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => remaining = remaining.saturating_sub(n),
        }
    }
    let (status, body) = if paths.is_empty() || paths.iter().any(|p| path.starts_with(p.as_str())) {
        ("200 OK", body)
    } else {
        ("404 Not Found", "not found\n")
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.write_all(response.as_bytes());
}

/// `membrane lab dns-serve --zone FILE`: the lab's cluster DNS (run inside the DNS pod's
/// namespace by `lab up`) on 53/UDP and 53/TCP, for [`SERVER_LIFETIME`].
pub fn dns_serve(zone: &Path, listen: SocketAddr) -> Result<()> {
    let zone = crate::lab_dns::load_zone(zone)?;
    crate::lab_dns::serve(&zone, listen, SERVER_LIFETIME)?;
    Ok(())
}

/// `membrane lab exec POD -- CMD...`: runs CMD inside the pod's namespace (with its
/// resolv.conf: `ip netns exec` mounts `/etc/netns/<netns>/resolv.conf`) and returns its exit
/// code. POD is `name` (namespace `default`) or `namespace/name`.
pub fn exec(pod: &str, command: &[String]) -> Result<i32> {
    let (namespace, name) = pod.split_once('/').unwrap_or(("default", pod));
    let known = lab_endpoints();
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
        .args([
            "netns",
            "exec",
            &topology::pod_netns(&lab_name(), name),
            program,
        ])
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

fn curl(ns: &str, method: &str, url: &str, timeout_secs: u32) -> Result<Outcome> {
    let output = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "curl",
            "-sS",
            "-X",
            method,
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

/// One connection the demo makes and what the seed policies make of it.
struct DemoCheck {
    from: &'static str,
    /// Pod or world host (`world/NAME`) it goes to.
    to: &'static str,
    port: u16,
    method: &'static str,
    path: &'static str,
    /// `Some(status)`: answered with it; `None`: dropped by the datapath.
    expect: Option<u16>,
    why: &'static str,
}

const DEMO: [DemoCheck; 6] = [
    DemoCheck {
        from: "frontend",
        to: "backend",
        port: 8080,
        method: "GET",
        path: "/",
        expect: Some(200),
        why: "backend-ingress allows frontend on 8080/TCP",
    },
    DemoCheck {
        from: "frontend",
        to: "backend",
        port: 9090,
        method: "GET",
        path: "/",
        expect: None,
        why: "backend-ingress: 9090 is not allowed (dropped at backend's ingress)",
    },
    DemoCheck {
        from: "external-client",
        to: "backend",
        port: 8080,
        method: "GET",
        path: "/",
        expect: None,
        why: "backend-ingress: only frontend may connect",
    },
    DemoCheck {
        from: "frontend",
        to: "api",
        port: 8080,
        method: "GET",
        path: "/api/v1/orders",
        expect: Some(200),
        why: "api-l7: the proxy allows GET /api/v1/.*",
    },
    DemoCheck {
        from: "frontend",
        to: "api",
        port: 8080,
        method: "DELETE",
        path: "/api/v1/orders/42",
        expect: Some(403),
        why: "api-l7: the proxy answers 403 to anything else",
    },
    DemoCheck {
        from: "frontend",
        to: "world/github",
        port: 443,
        method: "GET",
        path: "/",
        expect: None,
        why: "default-deny-external: pods may not leave the cluster",
    },
];

/// Brings the lab up if needed, then shows allowed and dropped connections and HTTP
/// requests with the flows and counters they produced. The lab stays up.
pub fn demo() -> Result<()> {
    up(&UpOptions::default())?;
    let topology = current_topology()?;
    let socket = agent_socket();
    let applied: Vec<String> = Client::new(&socket)
        .policies()
        .unwrap_or_default()
        .into_iter()
        .map(|p| p.policy)
        .collect();
    let address = |who: &str| -> Option<Ipv4Addr> {
        match who.strip_prefix("world/") {
            Some(host) => topology.world_host(host).map(|h| h.ip),
            None => topology.pod(who).map(|p| p.ip),
        }
    };
    if DEMO
        .iter()
        .any(|c| address(c.from).is_none() || address(c.to).is_none())
        || applied.len() != SEED_POLICIES.len()
    {
        return Err(LabError::Step {
            step: "lab demo".into(),
            detail: format!(
                "the demo needs the seed topology with its four policies (this lab has {} policies: {}); \
                 membrane lab down, then membrane lab demo",
                applied.len(),
                applied.join(", ")
            ),
        });
    }
    // Every node of the lab: (run name, pin directory, agent socket, registry).
    let runs = node_runs();
    let node_pins = |run: &str| node_pin_path(run);
    let registries: Vec<(String, Vec<registry::RegisteredEndpoint>)> = runs
        .iter()
        .map(|r| {
            (
                r.clone(),
                registry::read(&RunDir::of_pin_dir(&node_pins(r))),
            )
        })
        .collect();
    let registry: Vec<registry::RegisteredEndpoint> = registries
        .iter()
        .flat_map(|(_, r)| r.iter().cloned())
        .collect();
    let seen = |socket: &Path| -> u64 {
        Client::new(socket)
            .status()
            .map(|s| s.flows.seen)
            .unwrap_or(0)
    };
    let seen_before: Vec<u64> = runs
        .iter()
        .map(|r| seen(&RunDir::new(r).agent_socket()))
        .collect();

    println!("\nidentities (from pod labels):");
    for e in &registry {
        println!(
            "  {:<6} {:<24} {}",
            e.identity,
            format!("{}/{}", e.namespace, e.name),
            e.labels.join(" ")
        );
    }
    println!("\npolicies (examples/policies/, applied over the agent's API):");
    for p in &applied {
        println!("  {p}");
    }
    println!("\nbackend's ingress entries in the policy map (membrane bpf policy get backend):");
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
    let (backend_run, backend) = registries
        .iter()
        .find_map(|(run, r)| {
            r.iter()
                .find(|e| e.name == "backend")
                .map(|e| (run.clone(), Some(e.endpoint_id)))
        })
        .unwrap_or_else(|| (lab_name(), None));
    for r in PolicyMap::open_pinned(&node_pins(&backend_run))
        .and_then(|m| m.list())
        .map_err(at("read policy map"))?
        .into_iter()
        .filter(|r| Some(r.endpoint_id) == backend && r.direction.as_str() == "ingress")
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

    println!("\nconnections (curl in the pods):");
    let mut unexpected = Vec::new();
    for c in &DEMO {
        check_interrupt()?;
        let (Some(to_ip), from_ns) = (address(c.to), topology::pod_netns(&lab_name(), c.from))
        else {
            continue;
        };
        let url = format!("http://{to_ip}:{}{}", c.port, c.path);
        let timeout = if c.expect.is_some() { 5 } else { 2 };
        let outcome = curl(&from_ns, c.method, &url, timeout)?;
        let what = format!("{} -> {}:{} {} {}", c.from, c.to, c.port, c.method, c.path);
        let (shown, as_expected) = match (&outcome, c.expect) {
            (Outcome::Answered { status, body }, Some(want)) => (
                format!("HTTP {status} \"{body}\""),
                status.parse::<u16>().ok() == Some(want),
            ),
            (Outcome::Answered { status, .. }, None) => (format!("ANSWERED HTTP {status}"), false),
            (Outcome::NoAnswer(e), None) => (format!("DROPPED ({e})"), true),
            (Outcome::NoAnswer(e), Some(_)) => (format!("NO ANSWER ({e})"), false),
        };
        println!("  {what:<52} {shown}\n  {:<52} {}", "", c.why);
        if !as_expected {
            unexpected.push(format!(
                "{what}: expected {}",
                c.expect
                    .map_or_else(|| "a drop".to_owned(), |s| format!("HTTP {s}"))
            ));
        }
    }

    println!("\nflows (the datapath's events for those connections, from the agent):");
    let names = topology.names();
    let names: Vec<(Ipv4Addr, &str)> = names.iter().map(|(ip, n)| (*ip, n.as_str())).collect();
    // The agents read the ring buffer every 200 ms.
    std::thread::sleep(Duration::from_millis(500));
    let several = runs.len() > 1;
    for (run, before) in runs.iter().zip(&seen_before) {
        let socket = RunDir::new(run).agent_socket();
        let new = seen(&socket).saturating_sub(*before);
        let flows = Client::new(&socket)
            .flows(usize::try_from(new).unwrap_or(usize::MAX))
            .map_err(|e| LabError::Step {
                step: format!("read flows from the agent of {run}"),
                detail: e.to_string(),
            })?;
        if several {
            println!("  on {run}:");
        }
        for flow in &flows {
            println!("  {}", describe_flow(flow, &names));
        }
    }
    println!("\nL7 verdicts (membrane observe --type l7 --last 4):");
    for run in &runs {
        if several {
            println!("  on {run}:");
        }
        let _ = std::io::stdout().flush();
        if let Err(e) = membrane_observer::client::observe(
            &[
                "--type".to_owned(),
                "l7".to_owned(),
                "--last".to_owned(),
                "4".to_owned(),
            ],
            &RunDir::new(run).hubble_socket(),
        ) {
            unexpected.push(format!("reading L7 flows of {run}: {e}"));
        }
    }

    println!("\ndatapath counters (membrane bpf metrics):");
    for run in &runs {
        if several {
            println!("  on {run}:");
        }
        let metrics = MetricsMap::open_pinned(&node_pins(run)).map_err(at("read metrics"))?;
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
    }

    println!(
        "\nthe lab stays up; try:\n  \
         membrane lab exec frontend -- curl -s 10.200.0.11:8080\n  \
         membrane observe --verdict DROPPED        membrane observe --type l7 --to-pod default/api\n  \
         membrane bpf policy get backend          membrane bpf ct list\n  \
         membrane lab down"
    );
    if unexpected.is_empty() {
        Ok(())
    } else {
        Err(LabError::Unexpected(unexpected.join("; ")))
    }
}
/// One flow (as the agent's API returns it) in the shape of Hubble's compact output.
pub fn describe_flow(f: &FlowRow, names: &[(Ipv4Addr, &str)]) -> String {
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
    let kind = match f.kind.as_str() {
        "Drop" => "drop".to_owned(),
        "Trace" => "trace".to_owned(),
        _ => format!("policy-verdict:{}", match_type_name(f.match_type)),
    };
    let verdict = match f.verdict.as_str() {
        "Dropped" => format!(
            "DROPPED ({})",
            f.drop_reason_desc.as_deref().unwrap_or_default()
        ),
        "Redirected" => "REDIRECTED".to_owned(),
        _ => "FORWARDED".to_owned(),
    };
    format!(
        "{} (ID:{}) -> {} (ID:{}) {} {} {} {}",
        endpoint(&f.src),
        f.src_identity,
        endpoint(&f.dst),
        f.dst_identity,
        f.protocol,
        kind,
        f.direction.to_uppercase(),
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
