//! The proxy channel end to end: the agent's end ([`AgentChannel`]) serving a proxy end
//! ([`run_proxy_side`]) that applies what it gets to the proxy's real policy store
//! (`membrane_l7proxy::redirect::store::PolicyStore`): whole policy, deltas, a resync when the
//! proxy diverged, a refusal, and a restarted proxy sent only what it lacks.

use std::{
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use membrane_agent_api::{
    RunDir,
    proxy_channel::{AgentChannel, Held, Kind, Outcome, ProxyHandler, ToProxy, run_proxy_side},
    shutdown::Shutdown,
    snapshot::{DnsSnapshot, SnapshotHttpRule},
};
use membrane_l7proxy::redirect::{
    Direction,
    store::{
        PolicySnapshot, PolicyStore, Remotes, SNAPSHOT_FORMAT, SnapshotEndpoint, SnapshotPeer,
        SnapshotPort,
    },
};

/// A proxy end that applies the policy to a real store and keeps a log of what it got.
struct TestProxy {
    store: Arc<PolicyStore>,
    dns: u64,
    filters: u64,
    refuse_dns: bool,
    log: Arc<Mutex<Vec<String>>>,
}

impl ProxyHandler for TestProxy {
    fn held(&self) -> Held {
        Held {
            policy: self.store.revision(),
            dns: self.dns,
            filters: self.filters,
        }
    }

    fn apply(&mut self, message: ToProxy) -> Result<(), (String, bool)> {
        let entry = match &message {
            ToProxy::PolicyFull(s) => format!("policy {}", s.revision),
            ToProxy::PolicyDelta(d) => format!(
                "delta {}->{} +{} -{}",
                d.base,
                d.revision,
                d.upsert.len(),
                d.remove.len()
            ),
            ToProxy::Dns(s) => format!("dns {}", s.revision),
            ToProxy::Filters(s) => format!("filters {}", s.revision),
        };
        self.log.lock().unwrap().push(entry);
        match message {
            ToProxy::PolicyFull(s) => self
                .store
                .install(s)
                .map(drop)
                .map_err(|e| (e.to_string(), false)),
            ToProxy::PolicyDelta(d) => self
                .store
                .apply_delta(d)
                .map(drop)
                .map_err(|e| (e.to_string(), true)),
            ToProxy::Dns(_) if self.refuse_dns => Err(("bad DNS rules".into(), false)),
            ToProxy::Dns(s) => {
                self.dns = s.revision;
                Ok(())
            }
            ToProxy::Filters(s) => {
                self.filters = s.revision;
                Ok(())
            }
        }
    }
}

fn endpoint(id: u64, method: &str) -> SnapshotEndpoint {
    SnapshotEndpoint {
        id,
        ips: vec![std::net::IpAddr::V4(std::net::Ipv4Addr::new(
            10, 0, 0, id as u8,
        ))],
        ports: vec![SnapshotPort {
            direction: Direction::Egress,
            port: 80,
            end_port: 0,
            l7: Default::default(),
            peers: vec![SnapshotPeer {
                remotes: Remotes::Any,
                http: vec![SnapshotHttpRule {
                    method: Some(method.into()),
                    ..Default::default()
                }],
                server_names: vec![],
            }],
        }],
    }
}

fn policy(revision: u64, endpoints: Vec<SnapshotEndpoint>) -> PolicySnapshot {
    PolicySnapshot {
        format: SNAPSHOT_FORMAT,
        revision,
        endpoints,
    }
}

struct Proxy {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn start_proxy(path: &Path, mut handler: TestProxy) -> Proxy {
    let stop = Arc::new(AtomicBool::new(false));
    let (path, flag) = (path.to_owned(), stop.clone());
    let thread = std::thread::spawn(move || run_proxy_side(&path, &mut handler, &flag));
    Proxy {
        stop,
        thread: Some(thread),
    }
}

fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn the_proxy_gets_the_policy_whole_then_as_deltas_and_resyncs_when_it_diverges() {
    let dir = std::env::temp_dir().join(format!("membrane-channel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = RunDir::at(&dir).proxy_channel();
    let shutdown = Shutdown::new();
    let channel = AgentChannel::new();
    channel.serve(&path, shutdown.clone()).unwrap();
    // Send, then wait for the proxy's answer (as the agent does, outside its state lock).
    let publish_policy = |snapshot: PolicySnapshot, wait: Duration, expected: bool| {
        let pending = channel.publish_policy(snapshot);
        channel.wait_for(&pending, wait, expected)
    };
    let wait = Duration::from_secs(5);

    // No proxy yet and none expected: nothing to wait for.
    assert_eq!(
        publish_policy(policy(10, vec![endpoint(1, "GET")]), wait, false),
        Outcome::NoProxy
    );
    let store = Arc::new(PolicyStore::new());
    let log = Arc::new(Mutex::new(Vec::new()));
    let proxy = start_proxy(
        &path,
        TestProxy {
            store: store.clone(),
            dns: 0,
            filters: 0,
            refuse_dns: true,
            log: log.clone(),
        },
    );
    // The proxy applies, then acknowledges: the agent side sees the revision a moment later.
    wait_for("the whole policy, acknowledged", || {
        store.revision() == 10 && channel.applied(Kind::Policy) == 10
    });

    // One endpoint changes, one appears: only those two travel.
    let next = policy(11, vec![endpoint(1, "PUT"), endpoint(2, "GET")]);
    assert_eq!(publish_policy(next.clone(), wait, true), Outcome::Applied);
    assert_eq!(store.snapshot(), next);
    let removed = policy(12, vec![endpoint(2, "GET")]);
    assert_eq!(
        publish_policy(removed.clone(), wait, true),
        Outcome::Applied
    );
    assert_eq!(store.snapshot(), removed);

    // The proxy's store diverged (as if it restored something else): the delta is
    // refused on its base and the whole policy follows.
    store.install(policy(99, vec![])).unwrap();
    let after = policy(13, vec![endpoint(2, "GET"), endpoint(3, "HEAD")]);
    assert_eq!(publish_policy(after.clone(), wait, true), Outcome::Applied);
    assert_eq!(store.snapshot(), after);

    // A refusal comes back with the proxy's reason; what it held stays.
    let pending = channel.publish_dns(DnsSnapshot {
        revision: 5,
        endpoints: vec![],
    });
    let refused = channel.wait_for(&pending, wait, true);
    assert_eq!(refused, Outcome::Refused("bad DNS rules".into()));
    assert_eq!(channel.applied(Kind::Dns), 0);
    assert_eq!(
        *log.lock().unwrap(),
        [
            "policy 10",
            "delta 10->11 +2 -0",
            "delta 11->12 +0 -1",
            "delta 12->13 +1 -0",
            "policy 13",
            "dns 5"
        ]
    );
    let stats = channel.stats();
    assert_eq!((stats.deltas_sent, stats.refused), (3, 2));
    drop(proxy);

    // A proxy restarted with what the agent has is sent nothing; one without a policy is
    // sent it whole.
    let sent_before = channel.stats().full_sent;
    let log = Arc::new(Mutex::new(Vec::new()));
    let restored = Arc::new(PolicyStore::new());
    restored.install(after.clone()).unwrap();
    let proxy = start_proxy(
        &path,
        TestProxy {
            store: restored,
            dns: 0,
            filters: 0,
            refuse_dns: false,
            log: log.clone(),
        },
    );
    wait_for("the second connection", || channel.stats().connections == 2);
    // Only the DNS rules it does not hold are sent.
    wait_for("the DNS rules", || channel.applied(Kind::Dns) == 5);
    assert_eq!(*log.lock().unwrap(), ["dns 5"]);
    assert_eq!(channel.stats().full_sent, sent_before + 1);
    drop(proxy);
    shutdown.trigger();
    let _ = std::fs::remove_dir_all(&dir);
}
