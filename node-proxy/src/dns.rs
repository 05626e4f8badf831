//! The DNS proxy on the node: what the agent hands it and how it reports back.
//!
//! - **Policy**: the agent sends every local endpoint's `rules.dns` as a snapshot over the
//!   proxy channel ([`membrane_agent_api::proxy_channel`]) when it changes; the proxy applies it to new
//!   queries, saves it (`/run/membrane/<name>/proxy-dns.json`, restored at its next start)
//!   and answers, which the agent waits for before a policy change returns.
//! - **Routing**: a redirected query is forwarded to its original destination; the client's
//!   endpoint comes from the snapshot (by address), identities from the pinned ipcache; the
//!   upstream socket carries `SO_MARK` = from-proxy magic + the client's identity, so the
//!   server's ingress policy judges the query as the client's.
//! - **Learning**: before an allowed answer with addresses is released, the proxy sends
//!   `FqdnLearn` over the agent's API socket (persistent connections, reused) and waits
//!   for the reply (the agent has written the ipcache and policy entries by then), up to
//!   the learning deadline. While the agent is away the answer is released after the
//!   failed attempt and the failure counted (a connection to the address may then be
//!   dropped; the client's retry after the agent is back succeeds).
//! - **Sockets**: the agent creates the transparent UDP and TCP listeners once and passes
//!   them to every proxy it starts (inherited file descriptors 3 and 4, announced with
//!   `--dns-fds`), so a restarting proxy never leaves the port unbound: queries queue in
//!   the socket while no proxy reads, and the next proxy answers them.

use std::{
    collections::HashMap,
    net::IpAddr,
    os::fd::FromRawFd as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use membrane_l7proxy::dns::{
    DnsPolicy, DnsPortMatch, DnsRequestInfo, DnsRoute, DnsTransport, EndpointScope, FqdnLearning,
    FqdnObserver, FqdnObserverError, RouteError,
};
use membrane_l7proxy::redirect::IdentitySource;
use membrane_policy::{FqdnSelector, RemoteIdentities};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::UnixStream;

use membrane_agent_api::LearnedAddress;
use membrane_agent_api::api::{Request, Response};

/// Inherited descriptors of the DNS listeners in a proxy the agent started.
pub use membrane_agent_api::args::{DNS_TCP_FD as TCP_FD, DNS_UDP_FD as UDP_FD};
use membrane_agent_api::snapshot::DnsSnapshot;

fn selector_of(text: &str) -> Result<FqdnSelector, String> {
    if let Some(n) = text.strip_prefix("name:") {
        FqdnSelector::name(n)
    } else if let Some(p) = text.strip_prefix("pattern:") {
        FqdnSelector::pattern(p)
    } else {
        Err(format!(
            "selector `{text}`: expected `name:` or `pattern:` first"
        ))
    }
}

/// The proxy's form of a snapshot: the compiled policy and the endpoints by address.
pub fn compile(snapshot: &DnsSnapshot) -> Result<(DnsPolicy, HashMap<IpAddr, u64>), String> {
    let mut policy = DnsPolicy::new();
    let mut by_ip = HashMap::new();
    for ep in &snapshot.endpoints {
        for ip in &ep.ips {
            by_ip.insert(IpAddr::V4(*ip), ep.id);
        }
        for (i, rule) in ep.rules.iter().enumerate() {
            let at = |e: String| format!("endpoint {} rule #{i}: {e}", ep.id);
            let transport = match rule.protocol {
                17 => DnsTransport::Udp,
                6 => DnsTransport::Tcp,
                other => return Err(at(format!("protocol {other} cannot carry DNS"))),
            };
            let selectors = rule
                .selectors
                .iter()
                .map(|s| selector_of(s))
                .collect::<Result<Vec<_>, _>>()
                .map_err(at)?;
            let servers = match &rule.servers {
                None => RemoteIdentities::Any,
                Some(ids) => RemoteIdentities::Set(
                    ids.iter().map(|i| membrane_policy::Identity(*i)).collect(),
                ),
            };
            policy
                .allow_servers(
                    EndpointScope::Endpoint(ep.id),
                    DnsPortMatch {
                        ports: rule.port..=rule.end_port.max(rule.port),
                        transport: Some(transport),
                    },
                    servers,
                    &selectors,
                    Some(rule.cookie),
                )
                .map_err(|e| at(e.to_string()))?;
        }
    }
    Ok((policy, by_ip))
}

pub fn load(path: &Path) -> Result<DnsSnapshot, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// The listeners a proxy inherited (`--dns-fds`).
///
/// # Safety
/// Descriptors [`UDP_FD`] and [`TCP_FD`] must be the inherited UDP socket and TCP listener,
/// owned by nobody else in this process.
pub unsafe fn inherited_listeners() -> (std::net::UdpSocket, std::net::TcpListener) {
    // SAFETY: per the caller.
    unsafe {
        (
            std::net::UdpSocket::from_raw_fd(UDP_FD),
            std::net::TcpListener::from_raw_fd(TCP_FD),
        )
    }
}

/// The proxy's routing of redirected queries: original destination, client endpoint,
/// identities, upstream mark.
pub struct NodeRouter {
    pub endpoints: RwLock<Arc<HashMap<IpAddr, u64>>>,
    pub identities: Arc<dyn IdentitySource>,
}

impl NodeRouter {
    pub fn route(&self, request: &DnsRequestInfo) -> Result<DnsRoute, RouteError> {
        if request.local.port() == 0 || request.local.ip().is_unspecified() {
            return Err(RouteError::new(
                request,
                "no original destination (not a redirected query)",
            ));
        }
        let endpoint = self
            .endpoints
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&request.client.ip())
            .copied();
        let client_identity = self.identities.identity_of(request.client.ip());
        Ok(DnsRoute {
            upstream: request.local,
            endpoint,
            server_identity: membrane_policy::Identity(
                self.identities.identity_of(request.local.ip()),
            ),
            mark: membrane_common::mark::encode_identity(
                membrane_common::mark::MAGIC_PROXY_EGRESS,
                client_identity,
            ),
        })
    }
}

/// Connections to the agent's API kept for reuse (each carries one request at a time).
const MAX_IDLE_CONNECTIONS: usize = 8;

/// The agent, as the DNS proxy's FQDN observer.
pub struct AgentObserver {
    socket: PathBuf,
    idle: Mutex<Vec<BufReader<UnixStream>>>,
    timeout: Duration,
}

impl AgentObserver {
    pub fn new(socket: PathBuf, timeout: Duration) -> Self {
        Self {
            socket,
            idle: Mutex::new(Vec::new()),
            timeout,
        }
    }

    async fn exchange(
        &self,
        conn: &mut BufReader<UnixStream>,
        line: &[u8],
    ) -> std::io::Result<String> {
        conn.get_mut().write_all(line).await?;
        let mut reply = String::new();
        let n = conn.read_line(&mut reply).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the agent closed the connection",
            ));
        }
        Ok(reply)
    }

    async fn call(&self, line: &[u8]) -> Result<String, FqdnObserverError> {
        let pooled = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        // A pooled connection may have been closed by the agent (restart, request limit):
        // then one more try on a fresh connection.
        if let Some(mut conn) = pooled
            && let Ok(reply) = self.exchange(&mut conn, line).await
        {
            self.give_back(conn);
            return Ok(reply);
        }
        let stream = UnixStream::connect(&self.socket).await.map_err(|e| {
            FqdnObserverError::new(format!("agent API {}: {e}", self.socket.display()))
        })?;
        let mut conn = BufReader::new(stream);
        let reply = self
            .exchange(&mut conn, line)
            .await
            .map_err(|e| FqdnObserverError::new(format!("agent API: {e}")))?;
        self.give_back(conn);
        Ok(reply)
    }

    fn give_back(&self, conn: BufReader<UnixStream>) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE_CONNECTIONS {
            idle.push(conn);
        }
    }
}

impl FqdnObserver for AgentObserver {
    async fn learned(&self, learning: &FqdnLearning) -> Result<(), FqdnObserverError> {
        let request = Request::FqdnLearn {
            name: learning.name.clone(),
            ips: learning
                .ips
                .iter()
                .map(|l| LearnedAddress {
                    ip: l.ip,
                    ttl: l.ttl,
                })
                .collect(),
        };
        let mut line = serde_json::to_vec(&request).map_err(FqdnObserverError::new)?;
        line.push(b'\n');
        let reply = tokio::time::timeout(self.timeout, self.call(&line))
            .await
            .map_err(|_| FqdnObserverError::new("the agent did not answer in time"))??;
        let response: Response = serde_json::from_str(&reply)
            .map_err(|e| FqdnObserverError::new(format!("agent reply: {e}")))?;
        if response.ok {
            Ok(())
        } else {
            Err(FqdnObserverError::new(
                response.error.unwrap_or_else(|| "agent error".into()),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use membrane_agent_api::snapshot::{DnsSnapshotEndpoint, DnsSnapshotRule};
    use std::net::Ipv4Addr;

    #[test]
    fn snapshot_round_trip_and_compile() {
        let snapshot = DnsSnapshot {
            revision: 3,
            endpoints: vec![DnsSnapshotEndpoint {
                id: 1001,
                ips: vec![Ipv4Addr::new(10, 200, 0, 13)],
                rules: vec![DnsSnapshotRule {
                    protocol: 17,
                    port: 53,
                    end_port: 53,
                    servers: Some(vec![300]),
                    selectors: vec!["name:api.github.com".into(), "pattern:*.github.com".into()],
                    cookie: 7,
                }],
            }],
        };
        let text = serde_json::to_string(&snapshot).unwrap();
        let back: DnsSnapshot = serde_json::from_str(&text).unwrap();
        assert_eq!(back, snapshot);
        let (policy, by_ip) = compile(&back).unwrap();
        assert_eq!(by_ip[&IpAddr::V4(Ipv4Addr::new(10, 200, 0, 13))], 1001);
        let scope = |server, transport| membrane_l7proxy::dns::DnsQueryScope {
            endpoint: Some(1001),
            port: 53,
            transport,
            server_identity: membrane_policy::Identity(server),
        };
        assert!(
            policy
                .check(&scope(300, DnsTransport::Udp), "uploads.github.com.")
                .is_some()
        );
        assert!(
            policy
                .check(&scope(300, DnsTransport::Udp), "example.com.")
                .is_none()
        );
        // Another server, or TCP (not in the rule), is denied.
        assert!(
            policy
                .check(&scope(301, DnsTransport::Udp), "api.github.com.")
                .is_none()
        );
        assert!(
            policy
                .check(&scope(300, DnsTransport::Tcp), "api.github.com.")
                .is_none()
        );
    }

    #[test]
    fn bad_snapshots_name_the_rule() {
        let mut snapshot = DnsSnapshot {
            revision: 1,
            endpoints: vec![DnsSnapshotEndpoint {
                id: 5,
                ips: vec![],
                rules: vec![DnsSnapshotRule {
                    protocol: 1,
                    port: 53,
                    end_port: 53,
                    servers: None,
                    selectors: vec![],
                    cookie: 0,
                }],
            }],
        };
        let e = compile(&snapshot).unwrap_err();
        assert!(
            e.contains("endpoint 5 rule #0") && e.contains("protocol 1"),
            "{e}"
        );
        snapshot.endpoints[0].rules[0].protocol = 17;
        snapshot.endpoints[0].rules[0].selectors = vec!["glob:*".into()];
        let e = compile(&snapshot).unwrap_err();
        assert!(e.contains("`glob:*`"), "{e}");
    }
}
