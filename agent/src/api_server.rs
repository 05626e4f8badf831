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
        self, DatapathStatus, DnsProxyStatus, EndpointAdded, FilterRow, FilterStatus, FlowStatus,
        IdentityRow, MAX_REQUEST_BYTES, MAX_REQUESTS_PER_CONNECTION, PolicyApplied, PolicyDeleted,
        PolicyRow, Request, Response, StatusReply,
    },
    shutdown::Shutdown,
    wasm_resource,
};
use membrane_policy::PolicyRef;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};

use crate::{
    daemon::{State, confirm, lock},
    error::AgentError,
    policies::kind_from_str,
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
/// without it.
fn handle(state: &Mutex<State>, request: Request) -> Response {
    let response = lock(state).handle(request);
    confirm(state);
    response
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
        }
    }
}
