//! The cluster store against a real etcd (one per test, see `common`): several `Store`s in
//! one process play the nodes.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::Result;
use common::{CutProxy, Etcd, config_for, eventually};
use membrane_cluster::keys;
use membrane_cluster::{
    AllocError, ClusterPoolConfig, IdentityAllocator, IdentityRange, IpamError, IpcacheEntry,
    IpcacheError, IpcacheEvent, IpcacheSync, NodeRegistry, Operator, OperatorConfig,
    PodCidrAllocator, PolicyFormat, PolicyName, PolicyStore, Store, StoreError, TlsFiles,
};
use membrane_policy::{Identity, Labels};

const WAIT: Duration = Duration::from_secs(10);

fn labels(app: &str) -> Labels {
    Labels::parse([
        format!("k8s:app={app}").as_str(),
        "k8s:io.kubernetes.pod.namespace=default",
    ])
    .unwrap()
}

fn entry(store: &Store, ip: [u8; 4], id: u32) -> IpcacheEntry {
    IpcacheEntry {
        ip: IpAddr::V4(Ipv4Addr::from(ip)),
        identity: Identity(id),
        node: store.node().to_owned(),
        host_ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
        namespace: Some("default".into()),
        pod: Some(format!("pod-{}", ip[3])),
    }
}

async fn count_prefix(store: &Store, prefix: &str) -> Result<usize> {
    let resp = store
        .etcd()
        .get(
            prefix,
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_count_only(),
            ),
        )
        .await?;
    Ok(usize::try_from(resp.count())?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_labels_same_identity_on_three_nodes() -> Result<()> {
    let etcd = Etcd::start()?;
    let mut nodes = Vec::new();
    for n in ["n1", "n2", "n3"] {
        let store = etcd.connect(n, 10).await?;
        let alloc = IdentityAllocator::start(&store, IdentityRange::default());
        assert!(alloc.wait_synced(WAIT).await);
        nodes.push((store, alloc));
    }
    let sets: Vec<Labels> = (0..30).map(|i| labels(&format!("app-{i}"))).collect();
    // 3 nodes × 100 allocations over 30 label sets, all at once; each node walks the sets
    // from a different offset so the same set is contended from several nodes.
    let mut tasks = Vec::new();
    for (n, (_, alloc)) in nodes.iter().enumerate() {
        for i in 0..100 {
            let alloc = alloc.clone();
            let l = sets[(i + n * 7) % 30].clone();
            tasks.push(tokio::spawn(async move {
                let id = alloc.allocate(&l).await?;
                Ok::<_, AllocError>((n, l, id))
            }));
        }
    }
    let mut seen: BTreeMap<Labels, BTreeSet<Identity>> = BTreeMap::new();
    for t in tasks {
        let (_, l, id) = t.await??;
        assert!(IdentityRange::default().contains(id), "{id}");
        seen.entry(l).or_default().insert(id);
    }
    assert_eq!(seen.len(), 30);
    for (l, ids) in &seen {
        assert_eq!(ids.len(), 1, "labels {l} got several ids: {ids:?}");
    }
    let distinct: BTreeSet<Identity> = seen.values().flatten().copied().collect();
    assert_eq!(distinct.len(), 30, "30 label sets, 30 identities");

    // Every node's cache agrees.
    for (_, alloc) in &nodes {
        assert!(
            eventually(WAIT, || sets
                .iter()
                .all(|l| alloc.lookup(l) == seen[l].first().copied()))
            .await
        );
    }
    let store = &nodes[0].0;
    assert_eq!(count_prefix(store, keys::IDENTITY_ID_PREFIX).await?, 30);
    // Each node references each set it allocated; each walked all 30 sets.
    assert_eq!(count_prefix(store, keys::IDENTITY_VALUE_PREFIX).await?, 90);

    // Reserved and local-scope label sets never touch the store.
    let world = Labels::parse(["reserved:world"])?;
    assert_eq!(nodes[0].1.allocate(&world).await?, Identity::WORLD);
    let cidr = Labels::parse(["cidr:10.0.0.0/8", "reserved:world"])?;
    assert!(matches!(
        nodes[0].1.allocate(&cidr).await,
        Err(AllocError::LocalScope { .. })
    ));

    // n1 drops all its references: its reference keys go, the master keys stay.
    let (_, a1) = &nodes[0];
    for (id, (l, refs)) in a1.local_references() {
        for _ in 0..refs {
            a1.release(&l).await?;
        }
        assert_eq!(a1.lookup(&l), Some(id));
    }
    assert!(a1.local_references().is_empty());
    assert_eq!(count_prefix(store, keys::IDENTITY_VALUE_PREFIX).await?, 60);
    assert_eq!(count_prefix(store, keys::IDENTITY_ID_PREFIX).await?, 30);
    // Allocating again reuses the number others still reference.
    assert_eq!(
        a1.allocate(&sets[3]).await?,
        *seen[&sets[3]].first().unwrap()
    );
    for (s, _) in &nodes {
        s.close().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_collects_only_unreferenced_identities_after_two_phases() -> Result<()> {
    let etcd = Etcd::start()?;
    let s1 = etcd.connect("n1", 10).await?;
    let s2 = etcd.connect("n2", 10).await?;
    let s3 = etcd.connect("n3", 10).await?;
    let a1 = IdentityAllocator::start(&s1, IdentityRange::default());
    let a3 = IdentityAllocator::start(&s3, IdentityRange::default());
    assert!(a1.wait_synced(WAIT).await && a3.wait_synced(WAIT).await);
    let (used, unused, revived) = (labels("used"), labels("unused"), labels("revived"));
    let id_used = a1.allocate(&used).await?;
    let id_unused = a1.allocate(&unused).await?;
    let id_revived = a1.allocate(&revived).await?;
    a1.release(&unused).await?;
    a1.release(&revived).await?;

    let cfg = OperatorConfig {
        gc_interval_ms: 60_000,
        grace_ms: 0,
        max_deletes_per_round: 100,
    };
    let op2 = Operator::new(&s2, cfg.clone(), IdentityRange::default());
    let op3 = Operator::new(&s3, cfg, IdentityRange::default());
    assert!(op2.campaign().await?);
    assert!(!op3.campaign().await?, "one leader");
    assert!(!op3.gc_round().await?.leader);

    // Phase 1: marks only.
    let r1 = op2.gc_round().await?;
    assert_eq!(r1.in_use, 1);
    assert_eq!(
        r1.marked.iter().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([id_unused, id_revived])
    );
    assert!(r1.deleted.is_empty());
    let id_key = |id| keys::identity_id_key(id);
    assert!(s2.etcd().get(id_key(id_unused), None).await?.kvs().len() == 1);

    // Between the rounds another node references `revived` again (same number).
    assert_eq!(a3.allocate(&revived).await?, id_revived);

    // Phase 2: only the identity still unreferenced goes.
    let r2 = op2.gc_round().await?;
    assert_eq!(r2.deleted, vec![id_unused]);
    assert!(
        s2.etcd()
            .get(id_key(id_unused), None)
            .await?
            .kvs()
            .is_empty()
    );
    assert_eq!(s2.etcd().get(id_key(id_used), None).await?.kvs().len(), 1);
    assert_eq!(
        s2.etcd().get(id_key(id_revived), None).await?.kvs().len(),
        1
    );
    assert!(eventually(WAIT, || a1.labels_of(id_unused).is_none()).await);
    assert_eq!(s2.status().metrics.identities_collected, 1);

    // The leader's lease goes: another node takes over.
    s2.close().await;
    assert!(op3.campaign().await?);
    s1.close().await;
    s3.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_nodes_ipcache_entries_and_registration_go_with_its_lease() -> Result<()> {
    let etcd = Etcd::start()?;
    let s1 = etcd.connect("n1", 2).await?;
    let s2 = etcd.connect("n2", 2).await?;
    let ip1 = IpcacheSync::start(&s1);
    let ip2 = IpcacheSync::start(&s2);
    let nodes1 = NodeRegistry::start(&s1);
    let nodes2 = NodeRegistry::start(&s2);
    assert!(ip1.wait_synced(WAIT).await && ip2.wait_synced(WAIT).await);
    assert!(nodes2.wait_synced(WAIT).await);
    nodes1
        .register(
            "192.0.2.1".parse()?,
            Some("10.0.1.0/24".parse()?),
            Some("192.0.2.1:4244".parse()?),
        )
        .await?;
    let mut events = ip2.subscribe();
    for i in 1..=3 {
        ip1.publish(entry(&s1, [10, 0, 1, i], 300 + u32::from(i)))
            .await?;
    }
    ip2.publish(entry(&s2, [10, 0, 2, 1], 400)).await?;
    assert!(eventually(WAIT, || ip2.snapshot().len() == 4).await);
    assert!(
        eventually(WAIT, || nodes2.nodes().get("n1").is_some_and(|n| n
            .hubble_address
            == Some("192.0.2.1:4244".parse().unwrap())))
        .await
    );
    let got = ip2.get("10.0.1.2".parse()?).unwrap();
    assert_eq!((got.identity, got.node.as_str()), (Identity(302), "n1"));
    assert_eq!(got.pod.as_deref(), Some("pod-2"));

    // n1 dies (no revoke): after its 2 s lease its entries leave n2's view.
    s1.halt();
    assert!(
        eventually(Duration::from_secs(8), || ip2.snapshot().len() == 1).await,
        "n1's entries still there: {:?}",
        ip2.snapshot()
    );
    let mut deleted = BTreeSet::new();
    while let Ok(ev) = events.try_recv() {
        if let IpcacheEvent::Delete { ip, node } = ev {
            assert_eq!(node, "n1");
            deleted.insert(ip);
        }
    }
    assert_eq!(deleted.len(), 3);
    // Its registration goes with the same lease.
    assert!(
        eventually(Duration::from_secs(4), || !nodes2
            .nodes()
            .contains_key("n1"))
        .await
    );
    assert!(ip2.get("10.0.2.1".parse()?).is_some());
    s2.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_keys_deleted_by_someone_are_recreated() -> Result<()> {
    let etcd = Etcd::start()?;
    let s1 = etcd.connect("n1", 10).await?;
    let s2 = etcd.connect("n2", 10).await?;
    let ip1 = IpcacheSync::start(&s1);
    let ip2 = IpcacheSync::start(&s2);
    let nodes1 = NodeRegistry::start(&s1);
    let nodes2 = NodeRegistry::start(&s2);
    assert!(ip1.wait_synced(WAIT).await && nodes1.wait_synced(WAIT).await);
    let e = entry(&s1, [10, 0, 1, 7], 300);
    ip1.publish(e.clone()).await?;
    nodes1
        .register("192.0.2.1".parse()?, Some("10.244.1.0/24".parse()?), None)
        .await?;
    assert!(
        eventually(WAIT, || ip2.get(e.ip).is_some()
            && nodes2.nodes().contains_key("n1"))
        .await
    );

    let mut raw = s2.etcd();
    let ip_key = keys::ip_key("default", e.ip);
    let node_key = keys::node_key("default", "n1");
    raw.delete(ip_key.as_str(), None).await?;
    raw.delete(node_key.as_str(), None).await?;
    let back = async {
        for _ in 0..100 {
            let a = raw.get(ip_key.as_str(), None).await?.kvs().len();
            let b = raw.get(node_key.as_str(), None).await?.kvs().len();
            if a == 1 && b == 1 {
                return Ok::<_, anyhow::Error>(true);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(false)
    };
    assert!(back.await?, "own keys not re-created");
    assert!(eventually(WAIT, || ip2.get(e.ip) == Some(e.clone())).await);
    // Re-created under n1's lease.
    let kv = raw.get(ip_key.as_str(), None).await?;
    assert_eq!(Some(kv.kvs()[0].lease()), s1.session().lease);
    // Overwritten by someone else: n1 puts its (older) claim back and reports the conflict.
    let forged = IpcacheEntry {
        node: "intruder".into(),
        ..e.clone()
    };
    raw.put(ip_key.as_str(), serde_json::to_vec(&forged)?, None)
        .await?;
    assert!(eventually(WAIT, || ip2.get(e.ip).is_some_and(|x| x.node == "n1")).await);
    assert!(eventually(WAIT, || !ip1.conflicts().is_empty()).await);
    let c = &ip1.conflicts()[0];
    assert_eq!((c.owner.as_str(), c.claimant.as_str()), ("n1", "intruder"));
    s1.close().await;
    s2.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_claimed_by_two_nodes_keeps_the_older_claim() -> Result<()> {
    let etcd = Etcd::start()?;
    let s1 = etcd.connect("n1", 10).await?;
    let s2 = etcd.connect("n2", 10).await?;
    let ip1 = IpcacheSync::start(&s1);
    let ip2 = IpcacheSync::start(&s2);
    assert!(ip1.wait_synced(WAIT).await && ip2.wait_synced(WAIT).await);
    ip1.publish(entry(&s1, [10, 0, 0, 5], 300)).await?;
    assert!(eventually(WAIT, || ip2.get("10.0.0.5".parse().unwrap()).is_some()).await);
    let err = ip2
        .publish(entry(&s2, [10, 0, 0, 5], 301))
        .await
        .unwrap_err();
    match &err {
        IpcacheError::Conflict {
            owner, claimant, ..
        } => assert_eq!((owner.as_str(), claimant.as_str()), ("n1", "n2")),
        other => panic!("unexpected {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("n1") && msg.contains("n2") && msg.contains("10.0.0.5"),
        "{msg}"
    );
    assert!(s2.status().metrics.ip_conflicts >= 1);
    assert!(
        eventually(WAIT, || ip1
            .get("10.0.0.5".parse().unwrap())
            .is_some_and(|e| e.node == "n1"))
        .await
    );
    // n2 cannot withdraw n1's entry.
    assert!(!ip2.withdraw("10.0.0.5".parse()?).await?);
    ip2.publish(entry(&s2, [10, 0, 0, 5], 301))
        .await
        .unwrap_err();
    // When n1 lets go, n2's wanted entry takes the address.
    assert!(ip1.withdraw("10.0.0.5".parse()?).await?);
    assert!(
        eventually(WAIT, || ip1
            .get("10.0.0.5".parse().unwrap())
            .is_some_and(|e| e.node == "n2"))
        .await
    );
    s1.close().await;
    s2.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_stored_values_are_named_counted_and_skipped() -> Result<()> {
    let etcd = Etcd::start()?;
    let s1 = etcd.connect("n1", 10).await?;
    let mut raw = s1.etcd();
    let bad_ip_key = keys::ip_key("default", "10.0.0.9".parse()?);
    raw.put(bad_ip_key.as_str(), "{not json", None).await?;
    raw.put(
        keys::identity_id_key(Identity(999)),
        "nosuchsource:x=y;",
        None,
    )
    .await?;
    raw.put(format!("{}default/not-an-ip", keys::IP_PREFIX), "{}", None)
        .await?;
    let ip = IpcacheSync::start(&s1);
    let alloc = IdentityAllocator::start(&s1, IdentityRange::default());
    assert!(ip.wait_synced(WAIT).await && alloc.wait_synced(WAIT).await);
    ip.publish(entry(&s1, [10, 0, 0, 10], 300)).await?;
    let id = alloc.allocate(&labels("web")).await?;
    assert!(eventually(WAIT, || ip.snapshot().len() == 1).await);
    assert!(alloc.labels_of(Identity(999)).is_none());
    assert_eq!(alloc.identities().get(&id), Some(&labels("web")));
    let st = s1.status();
    assert!(st.metrics.bad_values >= 3, "{:?}", st.metrics);
    // A corrupt value written later is named too, and keeps nothing else from working.
    raw.put(bad_ip_key.as_str(), "[]", None).await?;
    assert!(
        eventually(WAIT, || s1
            .status()
            .metrics
            .last_bad_value
            .is_some_and(|m| m.contains(&bad_ip_key)))
        .await,
        "{:?}",
        s1.status().metrics
    );
    ip.publish(entry(&s1, [10, 0, 0, 11], 300)).await?;
    assert!(eventually(WAIT, || ip.snapshot().len() == 2).await);
    s1.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_pool_never_hands_a_block_twice_and_reports_exhaustion() -> Result<()> {
    let etcd = Etcd::start()?;
    let pool = ClusterPoolConfig {
        pod_cidr_list: vec!["10.10.0.0/23".parse()?, "10.20.0.0/24".parse()?],
        mask_size: 24,
    };
    let mut allocs = Vec::new();
    for n in 0..4 {
        let s = etcd.connect(&format!("n{n}"), 10).await?;
        allocs.push((s.clone(), PodCidrAllocator::new(&s, pool.clone())?));
    }
    // Four nodes race for three blocks (each asks for itself).
    let mut tasks = Vec::new();
    for (s, a) in &allocs {
        let (a, node) = (a.clone(), s.node().to_owned());
        tasks.push(tokio::spawn(async move {
            (node.clone(), a.allocate(&node).await)
        }));
    }
    let mut got = BTreeMap::new();
    let mut exhausted = Vec::new();
    for t in tasks {
        match t.await? {
            (node, Ok(block)) => {
                assert!(got.insert(block, node).is_none(), "block handed twice");
            }
            (
                node,
                Err(IpamError::PoolExhausted {
                    node: n,
                    pools,
                    mask,
                }),
            ) => {
                assert_eq!((n.as_str(), mask), (node.as_str(), 24));
                assert_eq!(pools, "10.10.0.0/23 10.20.0.0/24");
                exhausted.push(node);
            }
            (_, Err(e)) => panic!("{e}"),
        }
    }
    assert_eq!(got.len(), 3);
    assert_eq!(exhausted.len(), 1);
    let (_, a0) = &allocs[0];
    assert_eq!(a0.claims().await?, got);
    // Asking again gives the same block.
    let (block, holder) = got.iter().next().unwrap();
    assert_eq!(a0.allocate(holder).await?, *block);
    // A released block goes to the node that had none.
    assert_eq!(a0.release(holder).await?, Some(*block));
    assert_eq!(a0.allocate(&exhausted[0]).await?, *block);
    for (s, _) in &allocs {
        s.close().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_documents_put_list_watch_delete() -> Result<()> {
    let etcd = Etcd::start()?;
    let s1 = etcd.connect("n1", 10).await?;
    let s2 = etcd.connect("n2", 10).await?;
    let p1 = PolicyStore::new(&s1);
    let watched = PolicyStore::new(&s2).watch();
    assert!(watched.wait_synced(WAIT).await);
    let name = PolicyName {
        kind: "CiliumNetworkPolicy".into(),
        namespace: Some("default".into()),
        name: "allow-web".into(),
    };
    let text = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n".to_owned();
    p1.put(&name, text.clone(), PolicyFormat::Yaml, "tester")
        .await?;
    let key = keys::policy_key(&name).unwrap();
    assert!(
        eventually(WAIT, || watched
            .get(&key)
            .is_some_and(|d| d.value.text == text))
        .await
    );
    let listed = p1.list().await?;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[&name].applied_by, "tester");
    let bad = PolicyName {
        name: "a/b".into(),
        ..name.clone()
    };
    assert!(p1.put(&bad, text, PolicyFormat::Yaml, "t").await.is_err());
    assert!(p1.delete(&name).await?);
    assert!(eventually(WAIT, || watched.get(&key).is_none()).await);
    s1.close().await;
    s2.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restart_reports_failure_then_resyncs() -> Result<()> {
    let mut etcd = Etcd::start()?;
    let s1 = etcd.connect("n1", 5).await?;
    let s2 = etcd.connect("n2", 5).await?;
    let s3 = etcd.connect("n3", 3).await?;
    let ip1 = IpcacheSync::start(&s1);
    let ip2 = IpcacheSync::start(&s2);
    let ip3 = IpcacheSync::start(&s3);
    let a1 = IdentityAllocator::start(&s1, IdentityRange::default());
    assert!(
        ip1.wait_synced(WAIT).await && ip2.wait_synced(WAIT).await && a1.wait_synced(WAIT).await
    );
    let web = labels("web");
    let id = a1.allocate(&web).await?;
    ip1.publish(entry(&s1, [10, 0, 1, 1], id.get())).await?;
    ip3.publish(entry(&s3, [10, 0, 3, 1], id.get())).await?;
    assert!(eventually(WAIT, || ip2.snapshot().len() == 2).await);
    let generation = s1.session().generation;
    assert!(s1.status().connected);

    etcd.kill();
    assert!(
        eventually(WAIT, || !s1.status().connected).await,
        "still connected: {:?}",
        s1.status()
    );
    let st = s1.status();
    let err = st.last_error.expect("an error is recorded");
    assert!(err.message.contains(&etcd.endpoint()), "{}", err.message);
    // Known labels still resolve during the outage (local reference); new ones fail, in
    // bounded time.
    assert_eq!(a1.allocate(&web).await?, id);
    let started = std::time::Instant::now();
    assert!(a1.allocate(&labels("new")).await.is_err());
    assert!(started.elapsed() < Duration::from_secs(10));
    // n3 dies while etcd is down: its entry is stale once etcd is back.
    s3.halt();

    etcd.restart()?;
    assert!(
        eventually(WAIT, || s1.status().connected
            && s1.session().generation > generation)
        .await,
        "{:?}",
        s1.status()
    );
    // Own keys are in place, n3's stale entry is reported as deleted after its lease.
    assert!(
        eventually(WAIT, || {
            let snap = ip2.snapshot();
            snap.len() == 1 && snap.values().all(|e| e.node == "n1")
        })
        .await,
        "{:?}",
        ip2.snapshot()
    );
    let mut raw = s2.etcd();
    let refs = raw
        .get(
            keys::identity_value_key(&keys::LabelsKey::encode(&web)?, "n1"),
            None,
        )
        .await?;
    assert_eq!(refs.kvs().len(), 1);
    // The store works again for new labels.
    let id2 = a1.allocate(&labels("new")).await?;
    assert_ne!(id2, id);
    s1.close().await;
    s2.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates() -> Result<()> {
    let etcd = Etcd::start_tls()?;
    let pki = etcd.pki().unwrap().clone();
    let mut cfg = etcd.config("n1", 10);
    cfg.tls = Some(TlsFiles {
        ca: pki.ca(),
        cert: Some(pki.cert("client")),
        key: Some(pki.key("client")),
        server_name: None,
    });
    let s1 = Store::connect(cfg.clone()).await?;
    let ip1 = IpcacheSync::start(&s1);
    assert!(ip1.wait_synced(WAIT).await);
    ip1.publish(entry(&s1, [10, 0, 0, 1], 300)).await?;
    assert!(eventually(WAIT, || ip1.snapshot().len() == 1).await);
    assert!(s1.status().connected);

    // Without a client certificate etcd refuses the client; the error names the endpoint.
    let mut no_cert = cfg.clone();
    no_cert.node = "n2".into();
    if let Some(t) = &mut no_cert.tls {
        t.cert = None;
        t.key = None;
    }
    let err = Store::connect(no_cert).await.err().expect("refused");
    assert!(
        matches!(
            err,
            StoreError::Connect { .. } | StoreError::ConnectTimeout { .. }
        ),
        "{err}"
    );
    assert!(err.to_string().contains(&etcd.endpoint()), "{err}");
    // A missing CA file is named.
    let mut missing = cfg;
    if let Some(t) = &mut missing.tls {
        t.ca = pki.dir.join("nope.crt");
    }
    let err = Store::connect(missing).await.err().expect("no CA");
    assert!(matches!(err, StoreError::TlsFile { .. }), "{err}");
    assert!(err.to_string().contains("nope.crt"), "{err}");
    s1.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_node_relists_after_compaction_and_drains_stale_entries() -> Result<()> {
    let etcd = Etcd::start()?;
    let proxy = CutProxy::start(etcd.client_port()).await?;
    // n1 reaches etcd through the proxy; n2 directly.
    let s1 = Store::connect(config_for(proxy.endpoint(), "n1", 10)).await?;
    let s2 = etcd.connect("n2", 10).await?;
    let ip1 = IpcacheSync::start(&s1);
    let ip2 = IpcacheSync::start(&s2);
    assert!(ip1.wait_synced(WAIT).await && ip2.wait_synced(WAIT).await);
    let (a, b, c) = (
        entry(&s2, [10, 0, 2, 1], 300),
        entry(&s2, [10, 0, 2, 2], 301),
        entry(&s2, [10, 0, 2, 3], 302),
    );
    ip2.publish(a.clone()).await?;
    ip2.publish(b.clone()).await?;
    assert!(eventually(WAIT, || ip1.snapshot().len() == 2).await);
    let relists = s1.status().metrics.relists;
    let mut events = ip1.subscribe();

    proxy.cut();
    assert!(
        eventually(WAIT, || !s1.status().connected).await,
        "{:?}",
        s1.status()
    );
    // Meanwhile: a goes, c comes, and etcd compacts the history n1 would resume from.
    assert!(ip2.withdraw(a.ip).await?);
    ip2.publish(c.clone()).await?;
    let rev = s2
        .etcd()
        .get(keys::HEARTBEAT_KEY, None)
        .await?
        .header()
        .unwrap()
        .revision();
    s2.etcd().compact(rev, None).await?;

    proxy.restore();
    assert!(
        eventually(WAIT, || {
            let snap = ip1.snapshot();
            snap.len() == 2 && snap.contains_key(&b.ip) && snap.contains_key(&c.ip)
        })
        .await,
        "{:?}",
        ip1.snapshot()
    );
    assert!(
        s1.status().metrics.relists > relists,
        "{:?}",
        s1.status().metrics
    );
    let mut saw = Vec::new();
    while let Ok(ev) = events.try_recv() {
        saw.push(ev);
    }
    assert!(
        saw.contains(&IpcacheEvent::Delete {
            ip: a.ip,
            node: "n2".into()
        }),
        "{saw:?}"
    );
    assert!(saw.contains(&IpcacheEvent::Upsert(c.clone())), "{saw:?}");
    assert!(eventually(WAIT, || s1.status().connected).await);
    s1.close().await;
    s2.close().await;
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Latency measurement, not a test (no timing asserts): run with
/// `cargo test -p membrane-cluster --test store -- --ignored --nocapture latency`.
/// Prints p50/p99 of a new identity's allocation, of another node's allocation of the same
/// labels (reuse path), and of ipcache propagation (publish on n1 → event on n2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; prints latencies"]
async fn latency_identity_allocation_and_ipcache_propagation() -> Result<()> {
    const N: usize = 500;
    let etcd = Etcd::start()?;
    let s1 = etcd.connect("n1", 30).await?;
    let s2 = etcd.connect("n2", 30).await?;
    let a1 = IdentityAllocator::start(&s1, IdentityRange::default());
    let a2 = IdentityAllocator::start(&s2, IdentityRange::default());
    let ip1 = IpcacheSync::start(&s1);
    let ip2 = IpcacheSync::start(&s2);
    assert!(a1.wait_synced(WAIT).await && a2.wait_synced(WAIT).await);
    assert!(ip1.wait_synced(WAIT).await && ip2.wait_synced(WAIT).await);
    let (mut new, mut reuse, mut prop) = (Vec::new(), Vec::new(), Vec::new());
    let mut events = ip2.subscribe();
    for i in 0..N {
        let l = labels(&format!("lat-{i}"));
        let t = std::time::Instant::now();
        let id = a1.allocate(&l).await?;
        new.push(t.elapsed());
        let t = std::time::Instant::now();
        assert_eq!(a2.allocate(&l).await?, id);
        reuse.push(t.elapsed());
        let i = u8::try_from(i % 250)?;
        let e = entry(&s1, [10, 1, u8::try_from(prop.len() / 250)?, i], id.get());
        let t = std::time::Instant::now();
        ip1.publish(e.clone()).await?;
        loop {
            match tokio::time::timeout(WAIT, events.recv()).await?? {
                IpcacheEvent::Upsert(got) if got == e => break,
                _ => {}
            }
        }
        prop.push(t.elapsed());
    }
    for (name, v) in [
        ("identity allocation, new labels", &mut new),
        ("identity allocation, labels of another node", &mut reuse),
        ("ipcache publish on n1 -> event on n2", &mut prop),
    ] {
        v.sort();
        println!(
            "{name}: n={} p50={:?} p99={:?} max={:?}",
            v.len(),
            percentile(v, 0.5),
            percentile(v, 0.99),
            v[v.len() - 1]
        );
    }
    s1.close().await;
    s2.close().await;
    Ok(())
}
