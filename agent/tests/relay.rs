//! Hubble Relay in front of three real agents on one etcd (`--kvstore etcd`): the relay
//! discovers the nodes through one agent's Peer service (fed by the cluster store's node
//! registrations), and its GetFlows returns every node's flows (real pings between pods,
//! reported by each node's datapath) merged in time order. One agent stopped: a following
//! stream reports the node's error and keeps bringing the other nodes' flows, ServerStatus
//! says 2 of 3 connected and names the missing node. The agent back: 3 of 3, and its flows
//! come through the same stream again.
//!
//! Root only (netns, bpffs). The relay runs in this process (the library the
//! `membrane-relay` binary runs), the agents as processes.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use membrane_agent_api::{
    Client, RunDir,
    api::EndpointSpec,
    args::{AgentArgs, ClusterArgs, KvstoreKind},
};
use membrane_datapath::plumbing::Node;
use membrane_observer::proto::observer::{
    GetFlowsRequest, GetFlowsResponse, GetNodesRequest, ServerStatusRequest,
    get_flows_response::ResponseTypes, observer_client::ObserverClient,
};
use membrane_observer::proto::relay::NodeState;
use membrane_relay::RelayArgs;
use membrane_tests::{NsGuard, etcd::Etcd, require_root, sweep_stale, unique_name};
use tokio_stream::StreamExt as _;

/// Long enough that a stopped agent stays registered for the whole test (a stopped agent
/// does not revoke its lease; the relay must report the node unavailable, not forget it).
const LEASE_TTL_SECS: i64 = 120;
/// Bound on every wait.
const WAIT: Duration = Duration::from_secs(30);
const CLUSTER: &str = "relaytest";

struct TestNode {
    /// Pod namespaces first: dropped before the node's.
    pods: Vec<NsGuard>,
    pod_ns: Vec<String>,
    node: Node,
    _node_ns: NsGuard,
}

impl TestNode {
    fn create(what: &str) -> TestNode {
        let name = unique_name(what);
        let node = Node::create(&name).unwrap_or_else(|e| panic!("create node {name}: {e}"));
        TestNode {
            pods: Vec::new(),
            pod_ns: Vec::new(),
            _node_ns: NsGuard::adopt(node.netns().clone()),
            node,
        }
    }

    fn pod(&mut self, short: &str, ip: Ipv4Addr) -> EndpointSpec {
        let host_ifname: String = format!("lxc-{short}").chars().take(15).collect();
        let link = self
            .node
            .add_endpoint(&unique_name(short), &host_ifname, ip)
            .unwrap_or_else(|e| panic!("pod {short}: {e}"));
        self.pod_ns.push(link.netns.name().to_owned());
        self.pods.push(NsGuard::adopt(link.netns));
        EndpointSpec {
            name: short.to_owned(),
            namespace: "default".to_owned(),
            labels: vec![format!("app={short}")],
            ipv4: ip,
            host_ifname,
        }
    }

    /// One ping from the first pod to `dst` (a new ICMP id each time: a new flow).
    fn ping(&self, dst: Ipv4Addr) {
        let _ = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.pod_ns[0],
                "ping",
                "-c",
                "1",
                "-W",
                "1",
            ])
            .arg(dst.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// One `membrane-agent` process in cluster mode, serving Hubble on the host's loopback.
struct Agent {
    args: AgentArgs,
    node_name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Agent {
    fn start(node: &TestNode, node_name: &str, node_ip: Ipv4Addr, etcd: &Etcd) -> Agent {
        let name = unique_name(node_name);
        let mut args = AgentArgs::new(&name, node.node.netns().name());
        args.no_proxy = true;
        args.hubble_listen = Some("127.0.0.1:0".parse().expect("addr"));
        args.cluster = ClusterArgs {
            kvstore: Some(KvstoreKind::Etcd),
            kvstore_endpoints: vec![etcd.endpoint()],
            kvstore_lease_ttl: LEASE_TTL_SECS,
            cluster_name: CLUSTER.to_owned(),
            node_name: Some(node_name.to_owned()),
            node_ip: Some(node_ip.into()),
            ..ClusterArgs::default()
        };
        let log = std::env::temp_dir().join(format!("{name}.log"));
        let mut agent = Agent {
            args,
            node_name: node_name.to_owned(),
            child: None,
            log,
        };
        agent.spawn();
        agent
    }

    fn spawn(&mut self) {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("agent log");
        let child = Command::new(env!("CARGO_BIN_EXE_membrane-agent"))
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
                panic!(
                    "agent {} exited ({status}): {}",
                    self.node_name,
                    self.log_tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "agent {} never answered: {}",
                self.node_name,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn client(&self) -> Client {
        Client::of_run(&RunDir::new(&self.args.name))
    }

    fn peer_name(&self) -> String {
        format!("{CLUSTER}/{}", self.node_name)
    }

    fn hubble_socket(&self) -> PathBuf {
        RunDir::new(&self.args.name).hubble_socket()
    }

    /// SIGTERM and wait: the agent's lease and registration stay (a restart takes them over).
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid; no memory is involved.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + WAIT;
            while c.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
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
        let pins = PathBuf::from(membrane_datapath::bpffs::DEFAULT_BPFFS)
            .join("membrane")
            .join(&self.args.name);
        let _ = std::fs::remove_dir_all(pins);
        let _ = std::fs::remove_dir_all(RunDir::new(&self.args.name).path());
        let _ = std::fs::remove_file(&self.log);
    }
}

fn flow_node(response: &GetFlowsResponse) -> Option<String> {
    match &response.response_types {
        Some(ResponseTypes::Flow(f)) => Some(f.node_name.clone()),
        _ => None,
    }
}

fn nanos(response: &GetFlowsResponse) -> i128 {
    response
        .time
        .as_ref()
        .and_then(membrane_observer::timefmt::nanos)
        .unwrap_or_default()
}

#[test]
fn relay_merges_every_nodes_flows_and_survives_a_node_going_away() {
    require_root();
    sweep_stale();
    let started = Instant::now();
    // Declared first, dropped last: the agents go before the namespaces, etcd after both.
    let etcd = Etcd::start();
    let mut nodes: Vec<TestNode> = (1..=3)
        .map(|i| TestNode::create(&format!("rn{i}")))
        .collect();
    let specs: Vec<Vec<EndpointSpec>> = nodes
        .iter_mut()
        .enumerate()
        .map(|(i, node)| {
            let net = 220 + i as u8;
            vec![
                node.pod(&format!("c{i}"), Ipv4Addr::new(10, net, 1, 10)),
                node.pod(&format!("s{i}"), Ipv4Addr::new(10, net, 1, 11)),
            ]
        })
        .collect();
    let mut agents: Vec<Agent> = nodes
        .iter()
        .enumerate()
        .map(|(i, node)| {
            Agent::start(
                node,
                &format!("node-{}", i + 1),
                Ipv4Addr::new(192, 0, 2, 1 + i as u8),
                &etcd,
            )
        })
        .collect();
    for (agent, specs) in agents.iter().zip(&specs) {
        for spec in specs {
            agent
                .client()
                .endpoint_add(spec.clone())
                .expect("endpoint add");
        }
    }
    let servers: Vec<Ipv4Addr> = specs.iter().map(|s| s[1].ipv4).collect();
    let ping_all = |nodes: &[TestNode], which: &[usize]| {
        for &i in which {
            nodes[i].ping(servers[i]);
        }
    };
    let all_names: BTreeSet<String> = agents.iter().map(Agent::peer_name).collect();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // The relay follows node-1's Peer service (its Unix socket); short retry and health
    // intervals so the test sees changes in seconds.
    let mut relay_args = RelayArgs::new(&format!("unix://{}", agents[0].hubble_socket().display()));
    relay_args.retry_timeout_ms = 300;
    relay_args.health_interval_ms = 300;
    relay_args.dial_timeout_ms = 2_000;
    relay_args.sort_buffer_drain_timeout_ms = 200;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind the relay");
    let relay_addr = listener.local_addr().expect("addr");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let relay = runtime.spawn(membrane_relay::serve(relay_args, listener, async {
        let _ = stop_rx.await;
    }));

    runtime.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{relay_addr}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect to the relay");
        let mut client = ObserverClient::new(channel);
        let status = async |client: &mut ObserverClient<tonic::transport::Channel>| {
            client
                .server_status(ServerStatusRequest {})
                .await
                .expect("ServerStatus")
                .into_inner()
        };

        // All three nodes connected.
        let deadline = Instant::now() + WAIT;
        loop {
            let s = status(&mut client).await;
            if s.num_connected_nodes == Some(3) && s.num_unavailable_nodes == Some(0) {
                break;
            }
            assert!(Instant::now() < deadline, "never 3 of 3 connected: {s:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let nodes_reply = client
            .get_nodes(GetNodesRequest {})
            .await
            .expect("GetNodes")
            .into_inner();
        let listed: BTreeSet<String> = nodes_reply.nodes.iter().map(|n| n.name.clone()).collect();
        assert_eq!(listed, all_names, "GetNodes lists every node");
        assert!(
            nodes_reply
                .nodes
                .iter()
                .all(|n| n.state == NodeState::NodeConnected as i32 && n.max_flows > 0),
            "{nodes_reply:?}"
        );

        // Without follow: flows of every node, in time order.
        let deadline = Instant::now() + WAIT;
        loop {
            ping_all(&nodes, &[0, 1, 2]);
            let responses: Vec<GetFlowsResponse> = client
                .get_flows(GetFlowsRequest {
                    number: 1000,
                    ..GetFlowsRequest::default()
                })
                .await
                .expect("GetFlows")
                .into_inner()
                .map(|r| r.expect("response"))
                .collect()
                .await;
            let flows: Vec<&GetFlowsResponse> = responses
                .iter()
                .filter(|r| flow_node(r).is_some())
                .collect();
            let seen: BTreeSet<String> = flows.iter().filter_map(|r| flow_node(r)).collect();
            let times: Vec<i128> = flows.iter().map(|r| nanos(r)).collect();
            assert!(
                times.windows(2).all(|w| w[0] <= w[1]),
                "flows through the relay are in time order: {times:?}"
            );
            if seen == all_names {
                // --last across nodes: the newest 2 flows of the cluster, not 2 per node.
                let last2: Vec<GetFlowsResponse> = client
                    .get_flows(GetFlowsRequest {
                        number: 2,
                        ..GetFlowsRequest::default()
                    })
                    .await
                    .expect("GetFlows")
                    .into_inner()
                    .map(|r| r.expect("response"))
                    .collect()
                    .await;
                assert_eq!(
                    last2.iter().filter(|r| flow_node(r).is_some()).count(),
                    2,
                    "--last 2 through the relay"
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "flows of every node never came through the relay: saw {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // A following stream; it starts by naming the connected nodes.
        let mut follow = client
            .get_flows(GetFlowsRequest {
                follow: true,
                ..GetFlowsRequest::default()
            })
            .await
            .expect("GetFlows follow")
            .into_inner();
        let first = tokio::time::timeout(WAIT, follow.next())
            .await
            .expect("a first response")
            .expect("open")
            .expect("ok");
        match first.response_types {
            Some(ResponseTypes::NodeStatus(s)) => {
                assert_eq!(s.state_change, NodeState::NodeConnected as i32);
                assert_eq!(s.node_names.into_iter().collect::<BTreeSet<_>>(), all_names);
            }
            other => panic!("expected NODE_CONNECTED first, got {other:?}"),
        }

        // Node 3's agent stops.
        let gone = agents[2].peer_name();
        tokio::task::block_in_place(|| agents[2].stop());
        let deadline = Instant::now() + WAIT;
        let (mut error_seen, mut after_stop) = (false, BTreeSet::new());
        while !(error_seen && after_stop.len() == 2) {
            assert!(
                Instant::now() < deadline,
                "after node 3 stopped: NODE_ERROR seen {error_seen}, flows from {after_stop:?}"
            );
            tokio::task::block_in_place(|| ping_all(&nodes, &[0, 1, 2]));
            let next = tokio::time::timeout(Duration::from_secs(2), follow.next()).await;
            let Ok(Some(Ok(response))) = next else {
                continue;
            };
            match &response.response_types {
                Some(ResponseTypes::NodeStatus(s))
                    if s.state_change == NodeState::NodeError as i32 =>
                {
                    assert_eq!(s.node_names, std::slice::from_ref(&gone));
                    error_seen = true;
                }
                Some(ResponseTypes::Flow(f)) if error_seen => {
                    assert_ne!(f.node_name, gone, "no flow of a stopped node");
                    after_stop.insert(f.node_name.clone());
                }
                _ => {}
            }
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let s = status(&mut client).await;
            if s.num_connected_nodes == Some(2) && s.num_unavailable_nodes == Some(1) {
                assert_eq!(s.unavailable_nodes, std::slice::from_ref(&gone));
                break;
            }
            assert!(Instant::now() < deadline, "never 2 of 3: {s:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // Back: 3 of 3, and its flows come through the same stream again.
        tokio::task::block_in_place(|| agents[2].spawn());
        let deadline = Instant::now() + WAIT;
        loop {
            let s = status(&mut client).await;
            if s.num_connected_nodes == Some(3) && s.num_unavailable_nodes == Some(0) {
                break;
            }
            assert!(Instant::now() < deadline, "never 3 of 3 again: {s:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let deadline = Instant::now() + WAIT;
        let (mut reconnected, mut back) = (false, false);
        while !(reconnected && back) {
            assert!(
                Instant::now() < deadline,
                "node 3 back: NODE_CONNECTED {reconnected}, its flows {back}"
            );
            tokio::task::block_in_place(|| ping_all(&nodes, &[2]));
            let next = tokio::time::timeout(Duration::from_secs(2), follow.next()).await;
            let Ok(Some(Ok(response))) = next else {
                continue;
            };
            match &response.response_types {
                Some(ResponseTypes::NodeStatus(s))
                    if s.state_change == NodeState::NodeConnected as i32 =>
                {
                    reconnected |= s.node_names.contains(&gone);
                }
                Some(ResponseTypes::Flow(f)) => back |= f.node_name == gone,
                _ => {}
            }
        }
    });
    let _ = stop_tx.send(());
    let _ = runtime.block_on(relay);
    eprintln!("relay test took {:?}", started.elapsed());
    drop(agents);
    drop(nodes);
    drop(etcd);
}
