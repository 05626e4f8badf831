//! The local API's server: JSON lines on the run directory's `agent.sock`, one task per
//! connection, each request decoded by the API crate's codec and answered with its typed
//! reply. A request runs on a blocking thread: it takes the state lock, changes the state,
//! releases the lock, then waits (bounded) for the proxy to confirm what was sent it.
//! Bounded per connection: request size, requests, and the time a request may take to
//! arrive.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use membrane_agent_api::{
    api::{
        self, DatapathStatus, DnsProxyStatus, EndpointAdded, EndpointSpec, FilterRow, FilterStatus,
        FlowStatus, IdentityRow, MAX_REQUEST_BYTES, MAX_REQUESTS_PER_CONNECTION, PolicyApplied,
        PolicyDeleted, PolicyRow, Request, Response, StatusReply,
    },
    shutdown::Shutdown,
    wasm_resource,
};
use membrane_cluster::PolicyName;
use membrane_policy::PolicyRef;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};

use crate::{
    cluster::{ClusterClient, split_for_store},
    daemon::{State, confirm, lock},
    error::AgentError,
    policies::{kind_from_str, parse_all},
};

/// How long a client may take to send a request line.
const REQUEST_IDLE: Duration = Duration::from_secs(30);

/// Accepts connections until `shutdown`.
pub(crate) async fn serve(
    listener: tokio::net::UnixListener,
    state: Arc<Mutex<State>>,
    shutdown: Shutdown,
) {
    let stopped = tokio::task::spawn_blocking(move || shutdown.wait());
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => match accepted {
                Ok((conn, _)) => {
                    tokio::spawn(serve_connection(conn, state.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept on the API socket failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

async fn serve_connection(conn: tokio::net::UnixStream, state: Arc<Mutex<State>>) {
    let (reader, mut writer) = conn.into_split();
    let mut reader = BufReader::new(reader);
    let mut line = Vec::new();
    for _ in 0..MAX_REQUESTS_PER_CONNECTION {
        line.clear();
        // At most one byte past the limit is read: a longer line is refused, not buffered.
        let mut limited = (&mut reader).take(MAX_REQUEST_BYTES as u64 + 1);
        let read = limited.read_until(b'\n', &mut line);
        let n = match tokio::time::timeout(REQUEST_IDLE, read).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) | Err(_) => return,
        };
        if n == 0 {
            return;
        }
        let too_long = line.len() > MAX_REQUEST_BYTES;
        let text = line.trim_ascii();
        if text.is_empty() && !too_long {
            continue;
        }
        let response = match api::decode_request(if too_long { &line } else { text }) {
            Ok(request) => {
                let state = state.clone();
                tokio::task::spawn_blocking(move || handle(&state, request))
                    .await
                    .unwrap_or_else(|e| Response::err(format!("internal error: {e}")))
            }
            Err(e) => Response::err(e.to_string()),
        };
        let mut out = serde_json::to_vec(&response).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
        out.push(b'\n');
        if writer.write_all(&out).await.is_err() || too_long {
            return;
        }
    }
}

/// One request: the state changed under its lock, then the proxy's confirmation awaited
/// without it. With a cluster store, the requests that talk to it (endpoint add, policy
/// apply and delete) make their store round trips without the state lock.
fn handle(state: &Mutex<State>, request: Request) -> Response {
    let cluster = lock(state).cluster.clone();
    let response = match (cluster, request) {
        (Some(c), Request::EndpointAdd { endpoint }) => {
            let name = format!("{}/{}", endpoint.namespace, endpoint.name);
            reply(
                add_endpoint_clustered(state, &c, endpoint)
                    .map(|endpoint_id| EndpointAdded { endpoint_id })
                    .map_err(|e| format!("endpoint {name}: {e}")),
            )
        }
        (Some(c), Request::PolicyApply { text, source }) => {
            reply(apply_clustered(state, &c, &text, &source).map_err(|e| e.to_string()))
        }
        (
            Some(c),
            Request::PolicyDelete {
                kind,
                namespace,
                name,
            },
        ) => reply(delete_clustered(state, &c, &kind, namespace, name)),
        (_, request) => lock(state).handle(request),
    };
    confirm(state);
    response
}

/// `EndpointAdd` with a cluster store: labels under the lock, the identity from the store
/// without it, then the endpoint under the lock again (re-checked: another request may
/// have registered it meanwhile).
fn add_endpoint_clustered(
    state: &Mutex<State>,
    cluster: &ClusterClient,
    spec: EndpointSpec,
) -> Result<u32, AgentError> {
    let labels = {
        let s = lock(state);
        if let Some(id) = s.check_endpoint(&spec)? {
            return Ok(id);
        }
        s.endpoint_labels(&spec)?
    };
    let identity = if labels.is_local_scope() {
        None
    } else {
        Some(cluster.allocate(&labels).map_err(AgentError::from)?)
    };
    let mut s = lock(state);
    let id = match s.insert_endpoint(spec, None, labels.clone(), identity) {
        Ok(id) => id,
        Err(e) => {
            if identity.is_some() {
                cluster.release(labels);
            }
            return Err(e);
        }
    };
    s.reconcile()?;
    Ok(id)
}

/// `PolicyApply` with a cluster store: the text is validated whole (a text with any problem
/// is refused before anything is stored), stored one document per policy, and put in force
/// here at once; every other node's agent takes it from its watch. If the store fails
/// midway, the documents stored before the failure stay (the error names the one that
/// failed).
fn apply_clustered(
    state: &Mutex<State>,
    cluster: &ClusterClient,
    text: &str,
    source: &str,
) -> Result<PolicyApplied, AgentError> {
    parse_all(text, source).map_err(AgentError::PolicyInput)?;
    let documents = split_for_store(text, source).map_err(AgentError::from)?;
    let mut stored = Vec::with_capacity(documents.len());
    for d in documents {
        let revision = cluster
            .put_policy(&d.name, d.text.clone())
            .map_err(AgentError::from)?;
        stored.push((d, revision));
    }
    let mut s = lock(state);
    let mut applied = Vec::with_capacity(stored.len());
    for (d, revision) in &stored {
        s.take_cluster_doc(&d.name, &d.text, *revision);
        applied.push(d.name.to_string());
    }
    s.reconcile()?;
    Ok(PolicyApplied { applied })
}

/// `PolicyDelete` with a cluster store: deleted from the store, and here at once.
fn delete_clustered(
    state: &Mutex<State>,
    cluster: &ClusterClient,
    kind: &str,
    namespace: Option<String>,
    name: String,
) -> Result<PolicyDeleted, String> {
    let stored = if kind == wasm_resource::KIND {
        PolicyName {
            kind: kind.to_owned(),
            namespace: Some(namespace.unwrap_or_else(|| "default".to_owned())),
            name,
        }
    } else {
        let Some(kind) = kind_from_str(kind) else {
            return Err(format!(
                "unknown policy kind `{kind}` (CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, NetworkPolicy, WasmFilter)"
            ));
        };
        PolicyName::from(&PolicyRef {
            kind,
            namespace,
            name,
        })
    };
    if !cluster.delete_policy(&stored).map_err(|e| e.to_string())? {
        return Err(format!("no {stored} in the cluster store"));
    }
    let mut s = lock(state);
    if s.drop_cluster_doc(&stored) {
        s.reconcile().map_err(|e| e.to_string())?;
    }
    Ok(PolicyDeleted {
        deleted: stored.to_string(),
    })
}

fn reply<T: serde::Serialize>(result: Result<T, String>) -> Response {
    match result {
        Ok(data) => Response::reply(&data).unwrap_or_else(|e| Response::err(e.to_string())),
        Err(e) => Response::err(e),
    }
}

impl State {
    fn handle(&mut self, request: Request) -> Response {
        match request {
            Request::Status => reply(Ok(self.status())),
            Request::EndpointAdd { endpoint } => {
                let name = format!("{}/{}", endpoint.namespace, endpoint.name);
                reply(
                    self.add_endpoint(endpoint, None)
                        .and_then(|id| self.reconcile().map(|()| id))
                        .map(|endpoint_id| EndpointAdded { endpoint_id })
                        .map_err(|e| format!("endpoint {name}: {e}")),
                )
            }
            Request::EndpointDelete { namespace, name } => reply(
                self.delete_endpoint(&namespace, &name)
                    .and_then(|()| self.reconcile())
                    .map_err(|e| format!("endpoint {namespace}/{name}: {e}")),
            ),
            Request::EndpointList => reply(Ok(self.registry())),
            Request::IdentityList => reply(Ok(self
                .identities
                .iter()
                .map(|(id, labels)| IdentityRow {
                    identity: id.0,
                    labels: labels.iter().map(|l| l.to_string()).collect(),
                })
                .collect::<Vec<_>>())),
            Request::PolicyList => {
                let mut rows: Vec<PolicyRow> = self
                    .repo
                    .iter()
                    .map(|p| PolicyRow {
                        policy: p.policy_ref().to_string(),
                        rules: p.rules.len(),
                        filter: None,
                    })
                    .collect();
                rows.extend(self.wasm_filters.values().map(|f| PolicyRow {
                    policy: f.key(),
                    rules: 1,
                    filter: Some(FilterRow {
                        module: f.module.display().to_string(),
                        direction: format!("{:?}", f.direction),
                        ports: f.ports.clone(),
                        order: f.order,
                    }),
                }));
                reply(Ok(rows))
            }
            Request::PolicyApply { text, source } => reply(
                self.apply_text(&text, &source)
                    .map(|applied| PolicyApplied { applied })
                    .map_err(|e| e.to_string()),
            ),
            Request::PolicyDelete {
                kind,
                namespace,
                name,
            } => reply(self.delete_policy(&kind, namespace, name)),
            Request::FqdnLearn { name, ips } => reply(
                self.fqdn_learn(&name, &ips)
                    .map_err(|e| format!("FQDN {name}: {e}")),
            ),
            Request::FqdnCacheList => reply(Ok(self.fqdn_rows())),
            Request::IpamAllocate { owner } => reply(
                self.ipam_allocate(&owner)
                    .map_err(|e| format!("pod address for {owner}: {e}")),
            ),
            Request::IpamRelease { owner } => reply(Ok(self.ipam_release(&owner))),
            Request::IpamList => reply(Ok(self.ipam.state())),
            Request::Flows { last } => {
                let skip = self.flows.len().saturating_sub(last);
                reply(Ok(self
                    .flows
                    .iter()
                    .skip(skip)
                    .map(crate::flows::flow_row)
                    .collect::<Vec<_>>()))
            }
        }
    }

    fn delete_policy(
        &mut self,
        kind: &str,
        namespace: Option<String>,
        name: String,
    ) -> Result<PolicyDeleted, String> {
        if kind == wasm_resource::KIND {
            let key = format!(
                "{kind} {}/{name}",
                namespace.as_deref().unwrap_or("default")
            );
            if self.wasm_filters.remove(&key).is_none() {
                return Err(format!("no {key}"));
            }
            self.forget_applied(&key)
                .and_then(|()| self.reconcile())
                .map_err(|e| e.to_string())?;
            return Ok(PolicyDeleted { deleted: key });
        }
        let Some(kind) = kind_from_str(kind) else {
            return Err(format!(
                "unknown policy kind `{kind}` (CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, NetworkPolicy)"
            ));
        };
        let key = PolicyRef {
            kind,
            namespace,
            name,
        };
        if self.repo.remove(&key).is_none() {
            return Err(format!("no policy {key}"));
        }
        self.forget_applied(&key.to_string())
            .and_then(|()| self.reconcile())
            .map_err(|e: AgentError| e.to_string())?;
        Ok(PolicyDeleted {
            deleted: key.to_string(),
        })
    }

    fn status(&mut self) -> StatusReply {
        let lost = self.datapath.metrics().events_lost().unwrap_or(0);
        StatusReply {
            node: self.config.node_netns.clone(),
            uptime_secs: self.started.elapsed().as_secs(),
            datapath: DatapathStatus {
                pin_dir: self.datapath.pin_dir().display().to_string(),
                abi_version: membrane_common::ABI_VERSION,
                attached_interfaces: self.datapath.attached_interfaces().count(),
            },
            endpoints: self.endpoints.len(),
            identities: self.identities.len(),
            policies: self.repo.len(),
            policy_dir: self
                .config
                .policy_dir
                .as_ref()
                .map(|d| d.display().to_string()),
            policy_errors: self
                .file_errors
                .iter()
                .map(|(f, e)| format!("{}: {e}", f.display()))
                .collect(),
            reconciles: self.reconciles,
            flows: FlowStatus {
                kept: self.flows.len(),
                capacity: self.config.flow_capacity,
                seen: self.flows_seen,
                lost_in_kernel: lost,
            },
            proxy: self.proxy_status(),
            dns_proxy: DnsProxyStatus {
                port: self.config.dns_proxy_port,
                deny_response: self.config.dns.deny_response.clone(),
                endpoints_with_dns_rules: self
                    .dns_snapshot
                    .as_ref()
                    .map_or(0, |s| s.endpoints.len()),
                revision_applied: self
                    .channel
                    .applied(membrane_agent_api::proxy_channel::Kind::Dns),
            },
            fqdn: self.fqdn_status(),
            filters: FilterStatus {
                resources: self.wasm_filters.len(),
                attachments: self
                    .filter_snapshot
                    .as_ref()
                    .map_or(0, |s| s.attachments.len()),
                revision: self.filter_snapshot.as_ref().map_or(0, |s| s.revision),
                revision_applied: self
                    .channel
                    .applied(membrane_agent_api::proxy_channel::Kind::Filters),
            },
            cluster: self.cluster.as_ref().map(|c| {
                c.status(
                    self.remote_ipcache.len(),
                    self.cluster_doc_errors
                        .iter()
                        .map(|(n, (_, e))| format!("{n}: {e}"))
                        .collect(),
                )
            }),
        }
    }
}
