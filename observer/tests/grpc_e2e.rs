//! End to end: the observer served over gRPC on a Unix socket and on TCP, read with a
//! tonic client the way `hubble observe` and `hubble status` read it.
//!
//! Every wait is bounded by `WAIT`; no assertion depends on timing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, Result};
use hyper_util::rt::TokioIo;
use membrane_observer::proto::flow::{FlowFilter, LostEventSource, Verdict, layer4};
use membrane_observer::proto::observer::get_flows_request::Experimental;
use membrane_observer::proto::observer::observer_client::ObserverClient;
use membrane_observer::proto::observer::{
    GetFlowsRequest, GetFlowsResponse, GetNamespacesRequest, GetNodesRequest, ServerStatusRequest,
    get_flows_response::ResponseTypes,
};
use membrane_observer::{
    DatapathEvent, DatapathEventKind, DatapathVerdict, Direction, EndpointMeta, FlowInput,
    FlowSource, HEALTH_SERVICE_NAME, Observer, ObserverConfig, StaticEnricher, bind_unix,
    serve_tcp, serve_unix,
};
use tokio::sync::oneshot;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Streaming};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const WAIT: Duration = Duration::from_secs(10);

fn enricher() -> StaticEnricher {
    StaticEnricher::new("e2e-node")
        .with_endpoint(
            "10.0.0.1".parse().expect("ip"),
            EndpointMeta {
                id: 11,
                namespace: "default".into(),
                pod_name: "client-1".into(),
                labels: vec![
                    "k8s:app=client".into(),
                    "k8s:io.kubernetes.pod.namespace=default".into(),
                ],
            },
        )
        .with_endpoint(
            "10.0.0.2".parse().expect("ip"),
            EndpointMeta {
                id: 22,
                namespace: "prod".into(),
                pod_name: "server-1".into(),
                labels: vec![
                    "k8s:app=server".into(),
                    "k8s:io.kubernetes.pod.namespace=prod".into(),
                ],
            },
        )
}

/// A datapath event numbered by its source port, so tests can tell flows apart.
fn event(sport: u16, verdict: DatapathVerdict) -> FlowInput {
    let dropped = verdict == DatapathVerdict::Dropped;
    FlowInput::Datapath(DatapathEvent {
        time: SystemTime::now(),
        kind: if dropped {
            DatapathEventKind::Drop
        } else {
            DatapathEventKind::PolicyVerdict
        },
        verdict,
        drop_reason: dropped.then_some(133),
        direction: Direction::Egress,
        match_type: 2,
        protocol: 6,
        tcp_flags: 0x02,
        endpoint_id: 11,
        src_identity: 1001,
        dst_identity: 2002,
        src: "10.0.0.1".parse().expect("ip"),
        sport,
        dst: "10.0.0.2".parse().expect("ip"),
        dport: 8080,
        icmp_code: 0,
        proxy_port: None,
        ifindex: 3,
        is_reply: None,
        observation_point: None,
        policy: None,
    })
}

fn sport(resp: &GetFlowsResponse) -> Option<u32> {
    let Some(ResponseTypes::Flow(flow)) = resp.response_types.as_ref() else {
        return None;
    };
    match flow.l4.as_ref()?.protocol.as_ref()? {
        layer4::Protocol::Tcp(t) => Some(t.source_port),
        _ => None,
    }
}

/// An observer with flows 1..=6 (every third one dropped) in its ring.
async fn observer_with_flows() -> Result<Observer> {
    let observer = Observer::spawn(ObserverConfig::default(), Arc::new(enricher()))?;
    let sender = observer.sender();
    for n in 1..=6 {
        let verdict = if n % 3 == 0 {
            DatapathVerdict::Dropped
        } else {
            DatapathVerdict::Forwarded
        };
        assert!(sender.send(event(n, verdict)), "queue has room");
    }
    tokio::time::timeout(WAIT, observer.flush())
        .await
        .context("flush")?;
    Ok(observer)
}

struct Running {
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), membrane_observer::ServeError>>,
}

impl Running {
    async fn stop(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(WAIT, self.task)
            .await
            .context("server stops")???;
        Ok(())
    }
}

async fn start_tcp(observer: &Observer) -> Result<(Running, Channel)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr: SocketAddr = listener.local_addr()?;
    let (tx, rx) = oneshot::channel();
    let server = observer.clone();
    let task = tokio::spawn(async move {
        serve_tcp(&server, listener, async {
            let _ = rx.await;
        })
        .await
    });
    let channel = tokio::time::timeout(
        WAIT,
        Endpoint::from_shared(format!("http://{addr}"))?.connect(),
    )
    .await
    .context("connect over TCP")??;
    Ok((
        Running {
            shutdown: Some(tx),
            task,
        },
        channel,
    ))
}

fn unique_dir() -> Result<PathBuf> {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "membrane-observer-e2e-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

async fn start_unix(observer: &Observer, path: &Path) -> Result<(Running, Channel)> {
    let listener = bind_unix(path)?;
    let (tx, rx) = oneshot::channel();
    let server = observer.clone();
    let task = tokio::spawn(async move {
        serve_unix(&server, listener, async {
            let _ = rx.await;
        })
        .await
    });
    let path = path.to_owned();
    // The URI is required by the API but unused: the connector dials the socket.
    let channel = tokio::time::timeout(
        WAIT,
        Endpoint::from_static("http://localhost").connect_with_connector(tower::service_fn(
            move |_: Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            },
        )),
    )
    .await
    .context("connect over the Unix socket")??;
    Ok((
        Running {
            shutdown: Some(tx),
            task,
        },
        channel,
    ))
}

/// Reads a finite stream to its end.
async fn collect(mut stream: Streaming<GetFlowsResponse>) -> Result<Vec<GetFlowsResponse>> {
    let mut out = Vec::new();
    // Bounded: the ring holds at most a few flows here.
    for _ in 0..10_000 {
        match tokio::time::timeout(WAIT, stream.message())
            .await
            .context("stream message")??
        {
            Some(resp) => out.push(resp),
            None => return Ok(out),
        }
    }
    anyhow::bail!("stream did not end")
}

async fn get_flows(
    client: &mut ObserverClient<Channel>,
    req: GetFlowsRequest,
) -> Result<Vec<GetFlowsResponse>> {
    let stream = client.get_flows(req).await?.into_inner();
    collect(stream).await
}

fn sports(responses: &[GetFlowsResponse]) -> Vec<u32> {
    responses.iter().filter_map(sport).collect()
}

async fn check_observer_api(channel: Channel) -> Result<()> {
    let mut client = ObserverClient::new(channel.clone());

    // `hubble status`: health first, then ServerStatus.
    let mut health = HealthClient::new(channel);
    for service in [HEALTH_SERVICE_NAME, ""] {
        let status = health
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await?
            .into_inner()
            .status;
        assert_eq!(
            status,
            ServingStatus::Serving as i32,
            "health of {service:?}"
        );
    }
    let status = client
        .server_status(ServerStatusRequest {})
        .await?
        .into_inner();
    assert_eq!(status.num_flows, 6);
    assert_eq!(status.seen_flows, 6);
    assert_eq!(status.max_flows, 4095);
    assert!(status.uptime_ns > 0);
    assert!(!status.version.is_empty());

    // Last 2, first 2, everything.
    let last = get_flows(
        &mut client,
        GetFlowsRequest {
            number: 2,
            ..GetFlowsRequest::default()
        },
    )
    .await?;
    assert_eq!(sports(&last), [5, 6]);
    let resp = &last[0];
    assert_eq!(resp.node_name, "e2e-node");
    assert!(resp.time.is_some());
    let first = get_flows(
        &mut client,
        GetFlowsRequest {
            number: 2,
            first: true,
            ..GetFlowsRequest::default()
        },
    )
    .await?;
    assert_eq!(sports(&first), [1, 2]);
    let all = get_flows(&mut client, GetFlowsRequest::default()).await?;
    assert_eq!(sports(&all), [1, 2, 3, 4, 5, 6]);

    // Filters: whitelist OR, blacklist excludes, number counts matching flows.
    let dropped = get_flows(
        &mut client,
        GetFlowsRequest {
            number: 20,
            whitelist: vec![FlowFilter {
                verdict: vec![Verdict::Dropped as i32],
                ..FlowFilter::default()
            }],
            ..GetFlowsRequest::default()
        },
    )
    .await?;
    assert_eq!(sports(&dropped), [3, 6]);
    let not_dropped_from_prod = get_flows(
        &mut client,
        GetFlowsRequest {
            whitelist: vec![FlowFilter {
                destination_pod: vec!["prod/server-".into()],
                ..FlowFilter::default()
            }],
            blacklist: vec![FlowFilter {
                verdict: vec![Verdict::Dropped as i32],
                ..FlowFilter::default()
            }],
            ..GetFlowsRequest::default()
        },
    )
    .await?;
    assert_eq!(sports(&not_dropped_from_prod), [1, 2, 4, 5]);
    let last_forwarded = get_flows(
        &mut client,
        GetFlowsRequest {
            number: 1,
            blacklist: vec![FlowFilter {
                verdict: vec![Verdict::Dropped as i32],
                ..FlowFilter::default()
            }],
            ..GetFlowsRequest::default()
        },
    )
    .await?;
    assert_eq!(sports(&last_forwarded), [5]);

    // Field masks, also through the old experimental field.
    for (field_mask, experimental) in [
        (
            Some(prost_types::FieldMask {
                paths: vec!["verdict".into(), "source.pod_name".into()],
            }),
            None,
        ),
        (
            None,
            Some(Experimental {
                field_mask: Some(prost_types::FieldMask {
                    paths: vec!["verdict".into(), "source.pod_name".into()],
                }),
            }),
        ),
    ] {
        let masked = get_flows(
            &mut client,
            GetFlowsRequest {
                number: 1,
                field_mask,
                experimental,
                ..GetFlowsRequest::default()
            },
        )
        .await?;
        let Some(ResponseTypes::Flow(flow)) = masked[0].response_types.as_ref() else {
            anyhow::bail!("expected a flow");
        };
        assert_eq!(flow.verdict, Verdict::Dropped as i32);
        let source = flow.source.as_ref().context("source")?;
        assert_eq!(source.pod_name, "client-1");
        assert_eq!(source.identity, 0, "identity was masked out");
        assert!(flow.l4.is_none() && flow.ip.is_none() && flow.summary.is_empty());
        assert!(
            masked[0].time.is_none(),
            "like Hubble, the response time follows the mask"
        );
    }

    // Errors the CLI can trigger.
    let err = client
        .get_flows(GetFlowsRequest {
            first: true,
            follow: true,
            ..GetFlowsRequest::default()
        })
        .await
        .expect_err("first with follow");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = client
        .get_flows(GetFlowsRequest {
            whitelist: vec![FlowFilter {
                source_cluster_name: vec!["c1".into()],
                ..FlowFilter::default()
            }],
            ..GetFlowsRequest::default()
        })
        .await
        .expect_err("unsupported filter");
    assert_eq!(err.code(), Code::Unimplemented);
    let err = client
        .get_flows(GetFlowsRequest {
            field_mask: Some(prost_types::FieldMask {
                paths: vec!["no_such_field".into()],
            }),
            ..GetFlowsRequest::default()
        })
        .await
        .expect_err("bad mask");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = client
        .get_nodes(GetNodesRequest {})
        .await
        .expect_err("GetNodes is relay-only");
    assert_eq!(err.code(), Code::Unimplemented);

    let namespaces = client
        .get_namespaces(GetNamespacesRequest {})
        .await?
        .into_inner()
        .namespaces;
    let names: Vec<&str> = namespaces.iter().map(|n| n.namespace.as_str()).collect();
    assert_eq!(names, ["default", "prod"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_serves_hubble_api() -> Result<()> {
    let observer = observer_with_flows().await?;
    let (server, channel) = start_tcp(&observer).await?;
    check_observer_api(channel).await?;
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_serves_hubble_api() -> Result<()> {
    let observer = observer_with_flows().await?;
    let dir = unique_dir()?;
    let path = dir.join("hubble.sock");
    let result = async {
        let (server, channel) = start_unix(&observer, &path).await?;
        check_observer_api(channel).await?;
        server.stop().await?;
        // A stale socket from a previous run is replaced.
        let (server, _channel) = start_unix(&observer, &path).await?;
        server.stop().await
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_streams_new_flows() -> Result<()> {
    let observer = observer_with_flows().await?;
    let (server, channel) = start_tcp(&observer).await?;
    let mut client = ObserverClient::new(channel);

    // `hubble observe -f --last 1`: the newest stored flow, then new ones as they come.
    let mut stream = client
        .get_flows(GetFlowsRequest {
            number: 1,
            follow: true,
            ..GetFlowsRequest::default()
        })
        .await?
        .into_inner();
    let first = tokio::time::timeout(WAIT, stream.message())
        .await
        .context("backlog")??
        .context("stream open")?;
    assert_eq!(sport(&first), Some(6));

    // Only dropped flows, following from now.
    let mut drops = client
        .get_flows(GetFlowsRequest {
            follow: true,
            whitelist: vec![FlowFilter {
                verdict: vec![Verdict::Dropped as i32],
                ..FlowFilter::default()
            }],
            ..GetFlowsRequest::default()
        })
        .await?
        .into_inner();

    let sender = observer.sender();
    assert!(sender.send(event(100, DatapathVerdict::Forwarded)));
    assert!(sender.send(event(101, DatapathVerdict::Dropped)));
    let next = tokio::time::timeout(WAIT, stream.message())
        .await
        .context("followed flow")??
        .context("stream open")?;
    assert_eq!(sport(&next), Some(100));
    let next = tokio::time::timeout(WAIT, stream.message())
        .await
        .context("followed flow")??
        .context("stream open")?;
    assert_eq!(sport(&next), Some(101));
    let dropped = tokio::time::timeout(WAIT, drops.message())
        .await
        .context("followed drop")??
        .context("stream open")?;
    assert_eq!(
        sport(&dropped),
        Some(101),
        "the forwarded flow was filtered out"
    );

    drop(stream);
    drop(drops);
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_events_reach_the_client() -> Result<()> {
    let config = ObserverConfig {
        queue_capacity: 2,
        ..ObserverConfig::default()
    };
    let (observer, ingest) = Observer::new(config, Arc::new(enricher()))?;
    let sender = observer.sender();
    // The ingest task is not running yet, so the third input does not fit.
    let accepted = (1..=3)
        .filter(|&n| sender.send(event(n, DatapathVerdict::Forwarded)))
        .count();
    assert_eq!(accepted, 2);
    assert_eq!(observer.lost().total(FlowSource::Datapath), 1);
    tokio::spawn(ingest.run());
    tokio::time::timeout(WAIT, observer.flush())
        .await
        .context("flush")?;

    let (server, channel) = start_tcp(&observer).await?;
    let mut client = ObserverClient::new(channel);
    let all = get_flows(&mut client, GetFlowsRequest::default()).await?;
    assert_eq!(sports(&all), [1, 2]);
    let lost: Vec<(i32, u64)> = all
        .iter()
        .filter_map(|r| match r.response_types.as_ref() {
            Some(ResponseTypes::LostEvents(l)) => Some((l.source, l.num_events_lost)),
            _ => None,
        })
        .collect();
    assert_eq!(lost, [(LostEventSource::ObserverEventsQueue as i32, 1)]);
    assert!(
        observer
            .render_metrics()
            .contains("hubble_lost_events_total{source=\"observer_events_queue\"} 1")
    );
    server.stop().await
}
