//! `membrane-cni` under a real container runtime: Debian's containerd with its CRI plugin
//! (root, state and sockets under the test's directory, running in a node namespace the
//! test creates), pointed at the CNI bin directory holding `membrane-cni` (and the
//! `loopback` plugin CRI also runs) and at the config directory the agent writes
//! `05-membrane.conflist` into. The pause image is built here and imported with `ctr`;
//! nothing is pulled. Pod sandboxes are created through CRI with a small tonic client.
//!
//! Checks: the conflist appears when the agent is ready and goes when it stops; pods get
//! addresses of the node's pod CIDR and are endpoints with their labels; policy between
//! them is enforced (a real TCP server and clients in the pods' namespaces); restarting
//! containerd, and stopping and restarting the agent, leaves running pods working and
//! enforced; a pod added after the agent's restart gets an address no running pod has;
//! stopping and removing the sandboxes leaves no endpoint, veth or address behind.
//!
//! Root only. Every name is unique to the test process (`mbt-<pid>-…`); everything is
//! removed on drop, also when the test fails.

mod cri;
mod pause;
mod runtime;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use membrane_agent_api::{
    Client, RunDir,
    args::AgentArgs,
    cni::{CONFLIST_FILE, LABELS_ANNOTATION},
};
use membrane_datapath::{Netns, bpffs::DEFAULT_BPFFS, plumbing::Node};
use membrane_tests::{
    NsGuard,
    net::{Exchange, tcp_echo_server, tcp_exchange},
    require_root, sweep_stale, unique_name,
};

use cri::Cri;
use runtime::Containerd;

/// Bound on every wait for something to happen (a file, a process, a sandbox).
const WAIT: Duration = Duration::from_secs(30);
/// A client's exchange: long enough for a reply, short enough that a drop is quick.
const EXCHANGE: Duration = Duration::from_millis(1500);
const POD_CIDR: &str = "10.213.7.0/24";
const WEB_PORT: u16 = 8080;

const WEB_FROM_CLIENT: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-from-client, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"#;

/// The test's directory (short: containerd's socket paths must fit in 108 bytes).
struct TestDir(PathBuf);

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One `membrane-agent`; SIGKILLed on drop, its pins and run directory removed.
struct Agent {
    args: AgentArgs,
    child: Option<Child>,
    log: PathBuf,
}

impl Agent {
    fn start(args: AgentArgs, log: PathBuf) -> Agent {
        let mut agent = Agent {
            args,
            child: None,
            log,
        };
        agent.restart();
        agent
    }

    fn restart(&mut self) {
        let exe = Path::new(env!("CARGO_BIN_EXE_membrane-cni")).with_file_name("membrane-agent");
        assert!(
            exe.exists(),
            "{} not found: build it first (cargo build -p membrane-agent; `cargo xtask test` does)",
            exe.display()
        );
        let out = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("agent log");
        let child = Command::new(exe)
            .args(self.args.to_args())
            .env("MEMBRANE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("start membrane-agent");
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while self.client().status().is_err() {
            if let Some(c) = &mut self.child
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("agent exited ({status}): {}", self.log_tail());
            }
            assert!(
                Instant::now() < deadline,
                "agent never answered: {}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM: the agent stops as it would on a node (maps and programs stay pinned).
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) of our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + WAIT;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
            panic!("agent did not stop on SIGTERM: {}", self.log_tail());
        }
    }

    fn client(&self) -> Client {
        Client::of_run(&RunDir::new(&self.args.name))
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = log.len().saturating_sub(3000);
        log.get(start..).unwrap_or_default().to_owned()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(
            PathBuf::from(DEFAULT_BPFFS)
                .join("membrane")
                .join(&self.args.name),
        );
        let _ = std::fs::remove_dir_all(RunDir::new(&self.args.name).path());
    }
}

/// The sandboxes the test created: stopped and removed through CRI on drop (a failing test
/// too), before containerd goes; their cgroup parent directories removed after.
struct Pods {
    cri: Option<Cri>,
    ids: Vec<String>,
    cgroup_parent: String,
}

impl Pods {
    fn cri(&mut self) -> &mut Cri {
        self.cri.as_mut().expect("connected")
    }
}

impl Drop for Pods {
    fn drop(&mut self) {
        if let Some(cri) = &mut self.cri {
            for id in &self.ids {
                let _ = cri.stop_pod(id);
                let _ = cri.remove_pod(id);
            }
        }
        // runc removes each sandbox's cgroup, not their parent: every hierarchy's copy.
        let parent = self.cgroup_parent.trim_start_matches('/');
        if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
            for e in entries.flatten() {
                for dir in [e.path().join(parent), e.path().join("unified").join(parent)] {
                    let _ = std::fs::remove_dir(dir);
                }
            }
        }
        let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(parent));
    }
}

/// A running pod as the test sees it.
struct Pod {
    id: String,
    ip: Ipv4Addr,
    /// A name for the pod's network namespace (`ip netns attach`), removed on drop.
    netns: NsGuard,
}

fn run_pod(pods: &mut Pods, name: &str, labels: &str) -> Pod {
    let annotations = BTreeMap::from([(LABELS_ANNOTATION.to_owned(), labels.to_owned())]);
    let parent = pods.cgroup_parent.clone();
    let id = pods
        .cri()
        .run_pod("default", name, &parent, annotations)
        .unwrap_or_else(|e| panic!("RunPodSandbox {name}: {e}"));
    pods.ids.push(id.clone());
    let status = pods.cri().pod_status(&id).expect("PodSandboxStatus");
    assert!(status.ready, "{name} not ready: {status:?}");
    let ip: Ipv4Addr = status
        .ip
        .parse()
        .unwrap_or_else(|_| panic!("{name}: no IPv4 address in {status:?}"));
    assert!(status.pid > 0, "{name}: no sandbox pid: {status:?}");
    let ns_name = unique_name(name);
    let pid = status.pid.to_string();
    let out = Command::new("ip")
        .args(["netns", "attach", &ns_name, &pid])
        .output()
        .expect("ip netns attach");
    assert!(
        out.status.success(),
        "ip netns attach {ns_name} {pid}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Pod {
        id,
        ip,
        netns: NsGuard::adopt(Netns::open(&ns_name).expect("attached netns")),
    }
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn exchange(from: &Pod, to: &Pod) -> Exchange {
    tcp_exchange(
        from.netns.netns(),
        SocketAddrV4::new(to.ip, WEB_PORT),
        b"hello",
        EXCHANGE,
    )
}

/// client → web answered, other → web dropped (no reply at all, not refused).
fn assert_enforced(client: &Pod, other: &Pod, web: &Pod, when: &str) {
    let allowed = exchange(client, web);
    assert!(
        allowed.is_reply(b"echo:hello"),
        "{when}: client → web should be answered, got {allowed:?}"
    );
    let denied = exchange(other, web);
    assert_eq!(
        denied,
        Exchange::TimedOut,
        "{when}: other → web should be dropped by policy"
    );
}

fn lxc_links(node: &Netns) -> Vec<String> {
    node.ip(&["-o", "link", "show"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .filter(|n| n.starts_with("lxc"))
        .collect()
}

#[test]
fn pods_from_containerd_get_addresses_policy_and_survive_restarts() {
    require_root();
    sweep_stale();
    let dir = TestDir(PathBuf::from("/tmp").join(unique_name("cri")));
    std::fs::create_dir_all(&dir.0).expect("test dir");
    let (bin_dir, conf_dir) = (dir.0.join("cni-bin"), dir.0.join("net.d"));
    std::fs::create_dir_all(&bin_dir).expect("bin dir");
    std::fs::create_dir_all(&conf_dir).expect("conf dir");
    std::os::unix::fs::symlink(
        env!("CARGO_BIN_EXE_membrane-cni"),
        bin_dir.join("membrane-cni"),
    )
    .expect("plugin link");
    std::os::unix::fs::symlink("/usr/lib/cni/loopback", bin_dir.join("loopback"))
        .expect("loopback link");

    // Declared in drop order reversed: pods go first, then containerd, the agent, the node.
    let node = Node::create(&unique_name("cni-node")).expect("node namespace");
    let _node_ns = NsGuard::adopt(node.netns().clone());
    let mut args = AgentArgs::new(&unique_name("cni-agent"), node.netns().name());
    args.no_proxy = true;
    args.pods.pod_cidr = Some(POD_CIDR.parse().expect("cidr"));
    args.pods.cni_conf_dir = Some(conf_dir.clone());
    let mut agent = Agent::start(args, dir.0.join("agent.log"));
    let conflist = conf_dir.join(CONFLIST_FILE);
    eventually("the agent writes its conflist once it serves", || {
        conflist.exists()
    });

    let image = format!("localhost/{}/pause:1", unique_name("img"));
    let archive = pause::build(&dir.0, &image).expect("pause image");
    let mut containerd = Containerd::start(
        &dir.0.join("containerd"),
        node.netns().name(),
        &bin_dir,
        &conf_dir,
        &image,
    )
    .unwrap_or_else(|e| panic!("containerd: {e}"));
    containerd.import(&archive).expect("import the pause image");
    let mut pods = Pods {
        cri: Some(Cri::connect(&containerd.socket()).expect("CRI")),
        ids: Vec::new(),
        cgroup_parent: format!("/{}", unique_name("pods")),
    };
    let version = pods.cri().version().expect("CRI version");
    assert_eq!(version.runtime_api_version, "v1", "{version:?}");
    eventually("CRI reports NetworkReady with the conflist", || {
        pods.cri().network_ready().unwrap_or(false)
    });
    agent
        .client()
        .policy_apply(WEB_FROM_CLIENT, "test")
        .expect("policy");

    let web = run_pod(&mut pods, "web", "app=web");
    let client = run_pod(&mut pods, "client", "app=client");
    let other = run_pod(&mut pods, "other", "app=other");

    // Addresses from the pod CIDR, distinct, each held by its CNI attachment.
    let network = u32::from(Ipv4Addr::new(10, 213, 7, 0));
    for p in [&web, &client, &other] {
        assert_eq!(
            u32::from(p.ip) >> 8,
            network >> 8,
            "{} outside {POD_CIDR}",
            p.ip
        );
    }
    assert!(web.ip != client.ip && client.ip != other.ip && web.ip != other.ip);
    let ipam = agent.client().ipam().expect("IPAM");
    assert_eq!(ipam.pod_cidr.as_deref(), Some(POD_CIDR));
    for p in [&web, &client, &other] {
        assert!(
            ipam.allocations
                .iter()
                .any(|a| a.ip == p.ip && a.owner == format!("{}/eth0", p.id)),
            "{} not held by {}/eth0: {ipam:?}",
            p.ip,
            p.id
        );
    }
    // Endpoints with the pods' labels and their own veths.
    let endpoints = agent.client().endpoints().expect("endpoints");
    let web_ep = endpoints
        .iter()
        .find(|e| e.ipv4 == web.ip)
        .expect("web is an endpoint");
    assert_eq!(
        (web_ep.namespace.as_str(), web_ep.name.as_str()),
        ("default", "web")
    );
    assert!(
        web_ep.labels.contains(&"k8s:app=web".to_owned()),
        "{web_ep:?}"
    );
    assert_eq!(lxc_links(node.netns()).len(), 3, "one veth per pod");

    let server = tcp_echo_server(web.netns.netns(), SocketAddrV4::new(web.ip, WEB_PORT));
    assert_enforced(&client, &other, &web, "after ADD");

    // containerd restarted: the sandboxes keep running, with their addresses and policy.
    containerd.stop();
    assert_enforced(&client, &other, &web, "while containerd is down");
    containerd
        .restart()
        .unwrap_or_else(|e| panic!("containerd restart: {e}"));
    pods.cri = Some(Cri::connect(&containerd.socket()).expect("CRI after restart"));
    let again = pods.cri().pod_status(&web.id).expect("web after restart");
    assert!(again.ready && again.ip == web.ip.to_string(), "{again:?}");
    assert_enforced(&client, &other, &web, "after containerd restarted");

    // The agent stopped: no conflist (no new pods), pods keep working from the pinned maps.
    agent.stop();
    assert!(!conflist.exists(), "the conflist must go with the agent");
    assert_enforced(&client, &other, &web, "while the agent is down");
    agent.restart();
    eventually("the restarted agent writes its conflist", || {
        conflist.exists()
    });
    assert_enforced(&client, &other, &web, "after the agent restarted");
    // A new pod gets an address none of the running pods has.
    eventually("CRI NetworkReady again", || {
        pods.cri().network_ready().unwrap_or(false)
    });
    let late = run_pod(&mut pods, "late", "app=client");
    assert!(
        ![web.ip, client.ip, other.ip].contains(&late.ip),
        "{} handed out twice",
        late.ip
    );
    let late_exchange = exchange(&late, &web);
    assert!(
        late_exchange.is_reply(b"echo:hello"),
        "late → web: {late_exchange:?}"
    );
    drop(server);

    // Stop and remove every sandbox: DEL leaves no endpoint, veth or address.
    for p in [&web, &client, &other, &late] {
        pods.cri().stop_pod(&p.id).expect("StopPodSandbox");
        pods.cri()
            .stop_pod(&p.id)
            .expect("StopPodSandbox again (idempotent DEL)");
        pods.cri().remove_pod(&p.id).expect("RemovePodSandbox");
    }
    pods.ids.clear();
    assert_eq!(agent.client().endpoints().expect("endpoints"), vec![]);
    assert_eq!(agent.client().ipam().expect("IPAM").allocations, vec![]);
    assert_eq!(lxc_links(node.netns()), Vec::<String>::new());
    drop(pods);
    drop(containerd);
}
