//! Two agents on one etcd (`--kvstore etcd`), each managing a node namespace the test
//! creates, with real kernel maps read back from their pins: cluster-wide identities, the
//! cluster ipcache (publish, withdraw, a dead node's entries leaving with its lease), etcd
//! killed and restarted (nothing loosened, known labels still added, new ones refused with
//! an error naming the store, resync), and a policy applied through one agent enforced in the
//! other's policy map.
//!
//! Root only (netns, bpffs); the agents pin under `/sys/fs/bpf/membrane/<run>` with run
//! names unique to the test process (`mbt-<pid>-…`, swept by the harness if a run dies).

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use membrane_agent_api::{
    Client, RunDir,
    api::{EndpointSpec, StatusReply},
    args::{AgentArgs, ClusterArgs, KvstoreKind},
};
use membrane_common::Direction;
use membrane_datapath::{
    IpcacheMap, Ipv4Prefix, PolicyMap, PolicyVerdict, bpffs::DEFAULT_BPFFS, plumbing::Node,
};
use membrane_tests::{NsGuard, etcd::Etcd, require_root, sweep_stale, unique_name};

/// Lease TTL of the agents' keys: a killed agent's entries leave within about this long
/// (etcd expires a lease up to one more TTL late in the worst case).
const LEASE_TTL_SECS: i64 = 3;
/// Bound on every wait for something to propagate.
const PROPAGATION: Duration = Duration::from_secs(15);

/// A node namespace with its pods, deleted on drop (pods first).
struct TestNodeNs {
    pods: Vec<NsGuard>,
    node: Node,
    _node_ns: NsGuard,
}

impl TestNodeNs {
    fn create(what: &str) -> TestNodeNs {
        let name = unique_name(what);
        let node = Node::create(&name).unwrap_or_else(|e| panic!("create node {name}: {e}"));
        TestNodeNs {
            pods: Vec::new(),
            _node_ns: NsGuard::adopt(node.netns().clone()),
            node,
        }
    }

    fn name(&self) -> String {
        self.node.netns().name().to_owned()
    }

    /// A pod behind a veth; returns the spec to register it with.
    fn pod(&mut self, short: &str, ip: Ipv4Addr, labels: &[&str]) -> EndpointSpec {
        let host_ifname: String = format!("lxc-{short}").chars().take(15).collect();
        let link = self
            .node
            .add_endpoint(&unique_name(short), &host_ifname, ip)
            .unwrap_or_else(|e| panic!("pod {short}: {e}"));
        self.pods.push(NsGuard::adopt(link.netns));
        EndpointSpec {
            name: short.to_owned(),
            namespace: "default".to_owned(),
            labels: labels.iter().map(|l| (*l).to_owned()).collect(),
            ipv4: ip,
            host_ifname,
        }
    }
}

/// One `membrane-agent` process; SIGKILLed on drop, its pins and run directory removed.
struct Agent {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Agent {
    fn start(node: &TestNodeNs, node_name: &str, node_ip: Ipv4Addr, etcd: &Etcd) -> Agent {
        let name = unique_name(node_name);
        let mut args = AgentArgs::new(&name, &node.name());
        args.no_proxy = true;
        args.cluster = ClusterArgs {
            kvstore: Some(KvstoreKind::Etcd),
            kvstore_endpoints: vec![etcd.endpoint()],
            kvstore_lease_ttl: LEASE_TTL_SECS,
            node_name: Some(node_name.to_owned()),
            node_ip: Some(node_ip.into()),
            ..ClusterArgs::default()
        };
        let log = std::env::temp_dir().join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("agent log");
        let child = Command::new(env!("CARGO_BIN_EXE_membrane-agent"))
            .args(args.to_args())
            .env("MEMBRANE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("start membrane-agent");
        let mut agent = Agent {
            name,
            child: Some(child),
            log,
        };
        let deadline = Instant::now() + PROPAGATION;
        while agent.client().status().is_err() {
            if let Some(c) = &mut agent.child
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("agent {node_name} exited ({status}): {}", agent.log_tail());
            }
            assert!(
                Instant::now() < deadline,
                "agent {node_name} never answered: {}",
                agent.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        agent
    }

    fn client(&self) -> Client {
        Client::of_run(&RunDir::new(&self.name))
    }

    fn status(&self) -> StatusReply {
        self.client().status().expect("status")
    }

    fn pins(&self) -> PathBuf {
        PathBuf::from(DEFAULT_BPFFS)
            .join("membrane")
            .join(&self.name)
    }

    /// The agent's ipcache map as the kernel holds it.
    fn ipcache(&self) -> Vec<(Ipv4Prefix, u32)> {
        IpcacheMap::open_pinned(&self.pins())
            .and_then(|m| m.list())
            .unwrap_or_else(|e| panic!("ipcache of {}: {e}", self.name))
    }

    fn ipcache_of(&self, ip: Ipv4Addr) -> Option<u32> {
        self.ipcache()
            .into_iter()
            .find(|(p, _)| *p == Ipv4Prefix::host(ip))
            .map(|(_, id)| id)
    }

    fn identity_of(&self, endpoint: &str) -> u32 {
        self.client()
            .endpoints()
            .expect("endpoint list")
            .into_iter()
            .find(|e| e.name == endpoint)
            .unwrap_or_else(|| panic!("no endpoint {endpoint}"))
            .identity
    }

    fn log_tail(&self) -> String {
        tail(&self.log)
    }

    /// SIGKILL: no shutdown, no lease revoked (a crashed node).
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(self.pins());
        let _ = std::fs::remove_dir_all(RunDir::new(&self.name).path());
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The end of a log file.
fn tail(path: &std::path::Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let start = log.len().saturating_sub(3000);
    log.get(start..).unwrap_or_default().to_owned()
}

/// Polls `f` every 50 ms until true or [`PROPAGATION`] passes; then fails with `what`.
fn eventually(what: &str, mut f: impl FnMut() -> bool, context: impl Fn() -> String) {
    let deadline = Instant::now() + PROPAGATION;
    while !f() {
        assert!(Instant::now() < deadline, "{what}\n{}", context());
        std::thread::sleep(Duration::from_millis(50));
    }
}

const WEB_INGRESS: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-from-client, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"#;

#[test]
fn two_agents_share_identities_ipcache_and_policies_through_etcd() {
    require_root();
    sweep_stale();
    let started = Instant::now();
    // Declared first, dropped last: the agents go before the namespaces, etcd after both.
    let mut etcd = Etcd::start();
    let mut node_a = TestNodeNs::create("na");
    let mut node_b = TestNodeNs::create("nb");
    let web_a = node_a.pod("web-a", Ipv4Addr::new(10, 210, 1, 10), &["app=web"]);
    let client_a = node_a.pod("client-a", Ipv4Addr::new(10, 210, 1, 11), &["app=client"]);
    let web_a2 = node_a.pod("web-a2", Ipv4Addr::new(10, 210, 1, 12), &["app=web"]);
    let db_a = node_a.pod("db-a", Ipv4Addr::new(10, 210, 1, 13), &["app=db"]);
    let web_b = node_b.pod("web-b", Ipv4Addr::new(10, 210, 2, 10), &["app=web"]);
    let a = Agent::start(&node_a, "node-a", Ipv4Addr::new(192, 0, 2, 1), &etcd);
    let mut b = Agent::start(&node_b, "node-b", Ipv4Addr::new(192, 0, 2, 2), &etcd);
    let (log_a, log_b) = (a.log.clone(), b.log.clone());
    let logs = move || format!("agent A:\n{}\nagent B:\n{}", tail(&log_a), tail(&log_b));

    // Same labels, same number on both nodes.
    a.client().endpoint_add(web_a.clone()).expect("web-a");
    a.client().endpoint_add(client_a.clone()).expect("client-a");
    let web_b_id = b
        .client()
        .endpoint_add(web_b.clone())
        .expect("web-b")
        .endpoint_id;
    let web = a.identity_of("web-a");
    let client = a.identity_of("client-a");
    assert_eq!(b.identity_of("web-b"), web, "same labels → same identity");
    assert_ne!(web, client);
    assert!(
        web >= 256 && client >= 256,
        "cluster identities: {web} {client}"
    );

    // Each node's ipcache map gets the other's endpoints.
    eventually(
        "A's ipcache gets B's endpoint",
        || a.ipcache_of(web_b.ipv4) == Some(web),
        &logs,
    );
    eventually(
        "B's ipcache gets A's endpoints",
        || b.ipcache_of(web_a.ipv4) == Some(web) && b.ipcache_of(client_a.ipv4) == Some(client),
        &logs,
    );
    let status = a.status();
    let cluster = status.cluster.expect("a cluster block");
    assert!(cluster.store.connected, "{cluster:?}");
    let nodes: Vec<&str> = cluster.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(nodes, ["node-a", "node-b"], "both nodes registered");

    // A policy applied through A is enforced in B's policy map, with the identity A
    // allocated for the client (B knows its labels from the store).
    let applied = a.client().policy_apply(WEB_INGRESS, "test").expect("apply");
    assert_eq!(
        applied.applied,
        ["CiliumNetworkPolicy default/web-from-client"]
    );
    let b_has_rule = |web_b_id: u32| {
        PolicyMap::open_pinned(&b.pins())
            .and_then(|m| m.list())
            .expect("B's policy map")
            .iter()
            .any(|r| {
                r.endpoint_id == web_b_id
                    && r.direction == Direction::Ingress
                    && r.remote_identity == client
                    && r.verdict == PolicyVerdict::Allow
            })
    };
    eventually(
        "B enforces the policy applied through A",
        || b_has_rule(web_b_id),
        &logs,
    );
    // A text with any problem is refused whole, before anything is stored.
    let broken = format!(
        "{WEB_INGRESS}---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: bad, namespace: default}}\nspec: {{endpointSelector: {{}}, ingress: [{{fromNowhere: []}}]}}\n"
    );
    assert!(a.client().policy_apply(&broken, "broken").is_err());
    assert_eq!(b.status().cluster.expect("cluster").policies, 1);

    // Deleting B's endpoint withdraws it from A's map.
    b.client()
        .endpoint_delete("default", "web-b")
        .expect("delete web-b");
    eventually(
        "B's deleted endpoint leaves A's ipcache",
        || a.ipcache_of(web_b.ipv4).is_none(),
        &logs,
    );
    let web_b_id = b
        .client()
        .endpoint_add(web_b.clone())
        .expect("web-b again")
        .endpoint_id;
    eventually(
        "B's endpoint is back in A's ipcache",
        || a.ipcache_of(web_b.ipv4) == Some(web),
        &logs,
    );

    // etcd killed: nothing enforced is loosened; known labels are still added; new ones
    // fail with an error naming the store.
    etcd.kill();
    eventually(
        "A reports the store failing",
        || {
            a.status()
                .cluster
                .is_some_and(|c| !c.store.connected && c.store.last_error.is_some())
        },
        &logs,
    );
    assert_eq!(a.ipcache_of(web_b.ipv4), Some(web), "A keeps B's entry");
    assert!(b_has_rule(web_b_id), "B keeps the policy");
    a.client()
        .endpoint_add(web_a2.clone())
        .expect("an endpoint with known labels is added while etcd is down");
    assert_eq!(a.identity_of("web-a2"), web);
    assert_eq!(a.ipcache_of(web_a2.ipv4), Some(web));
    let err = a
        .client()
        .endpoint_add(db_a.clone())
        .expect_err("new labels need the store")
        .to_string();
    assert!(err.contains("cluster store"), "{err}");

    // etcd back: the agents resync without a restart (A's endpoint added during the
    // outage reaches B), and new labels work again.
    etcd.restart();
    eventually(
        "A reconnects",
        || a.status().cluster.is_some_and(|c| c.store.connected),
        &logs,
    );
    eventually(
        "the endpoint added during the outage reaches B",
        || b.ipcache_of(web_a2.ipv4) == Some(web),
        &logs,
    );
    a.client()
        .endpoint_add(db_a.clone())
        .expect("new labels once etcd is back");
    let db = a.identity_of("db-a");
    eventually(
        "B learns the new endpoint",
        || b.ipcache_of(db_a.ipv4) == Some(db),
        &logs,
    );

    // A node dies (SIGKILL, no lease revoked): its entries leave A's map after its lease.
    b.kill();
    eventually(
        "the dead node's endpoint leaves A's ipcache after the lease TTL",
        || a.ipcache_of(web_b.ipv4).is_none(),
        &logs,
    );
    eventually(
        "the dead node leaves A's node list",
        || {
            a.status()
                .cluster
                .is_some_and(|c| c.nodes.iter().all(|n| n.name != "node-b"))
        },
        &logs,
    );
    assert_eq!(a.ipcache_of(web_a.ipv4), Some(web), "A's own entries stay");
    eprintln!("cluster test took {:?}", started.elapsed());
}
