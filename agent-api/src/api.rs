//! The agent's local API: JSON lines over a Unix socket (`/run/membrane/<name>/agent.sock`),
//! one request and one response per line. Clients: the CLI (`membrane status`, `endpoint
//! list`, `identity list`, `policy list|apply|delete`, `fqdn cache list`), the lab, the node
//! proxy (`FqdnLearn`).
//!
//! Every response is `{"ok": true, "data": ...}` or `{"ok": false, "error": "..."}`; `data`
//! is the typed reply of its request ([`StatusReply`], [`EndpointAdded`], …), encoded and
//! decoded by the same types on both sides ([`Client`] on this one). Errors name the input
//! that was wrong (file, resource, field) so the CLI can print them as they are.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, Ipv4Addr},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::registry::RegisteredEndpoint;

/// How long a client waits for a reply. A policy change waits for the proxy's
/// acknowledgement (bounded by 10 s for filters), so this is well above that.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest request line the agent reads; a longer one is refused (policy texts are far
/// smaller).
pub const MAX_REQUEST_BYTES: usize = 16 << 20;

/// Requests one connection may carry before the agent closes it.
pub const MAX_REQUESTS_PER_CONNECTION: usize = 1000;

/// One address of one DNS answer, as the DNS proxy reports it to the agent.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LearnedAddress {
    pub ip: IpAddr,
    pub ttl: u32,
}

/// An endpoint as the lab (or a CNI) registers it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    pub name: String,
    pub namespace: String,
    /// Pod labels, `key=value` (the agent adds the namespace label and the `k8s:` source).
    pub labels: Vec<String>,
    pub ipv4: Ipv4Addr,
    /// Host-side veth inside the node namespace.
    pub host_ifname: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    EndpointAdd {
        endpoint: EndpointSpec,
    },
    EndpointDelete {
        namespace: String,
        name: String,
    },
    EndpointList,
    IdentityList,
    PolicyList,
    /// Adds or replaces every policy in `text` (YAML or JSON, multi-document); `source`
    /// names it in errors.
    PolicyApply {
        text: String,
        source: String,
    },
    /// `kind` is CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy or NetworkPolicy.
    PolicyDelete {
        kind: String,
        namespace: Option<String>,
        name: String,
    },
    /// From the DNS proxy: an allowed answer gave `name` these addresses. Answered once
    /// the addresses' `fqdn:` identities are in the ipcache and policy maps (the proxy
    /// holds the answer until then).
    FqdnLearn {
        name: String,
        ips: Vec<LearnedAddress>,
    },
    /// The FQDN cache: name, address, remaining TTL, identity.
    FqdnCacheList,
    /// The last `last` datapath flow events the agent kept.
    Flows {
        last: usize,
    },
    /// From the CNI plugin: an address of the node's pod CIDR for `owner` (a CNI attachment,
    /// `CONTAINERID/IFNAME`). The same owner gets the same address again.
    IpamAllocate {
        owner: String,
    },
    /// Gives `owner`'s address back; nothing to do if it holds none.
    IpamRelease {
        owner: String,
    },
    /// The node's pod CIDR and every address handed out.
    IpamList,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn ok(data: serde_json::Value) -> Self {
        Self {
            ok: true,
            data: Some(data),
            error: None,
        }
    }

    /// A typed reply.
    pub fn reply<T: Serialize>(data: &T) -> Result<Self, serde_json::Error> {
        Ok(Self::ok(serde_json::to_value(data)?))
    }

    pub fn err(error: impl Into<String>) -> Self {
        Self {
            ok: false,
            data: None,
            error: Some(error.into()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "cannot reach the agent at {path}: {source} (is it running? `membrane lab up` starts one)"
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("agent API at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("agent API at {path}: cannot encode the request: {source}")]
    Encode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("agent API at {path}: malformed {what}: {source}")]
    Decode {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0}")]
    Agent(String),
}

/// A blocking client of one agent's API. Each call opens a connection (the agent serves each
/// on a task of its own), sends one request and reads its typed reply.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    /// The client of the agent of run directory `run`.
    pub fn of_run(run: &crate::RunDir) -> Self {
        Self::new(run.agent_socket())
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn status(&self) -> Result<StatusReply, ApiError> {
        self.call(&Request::Status)
    }

    pub fn endpoint_add(&self, endpoint: EndpointSpec) -> Result<EndpointAdded, ApiError> {
        self.call(&Request::EndpointAdd { endpoint })
    }

    pub fn endpoint_delete(&self, namespace: &str, name: &str) -> Result<(), ApiError> {
        self.call::<Option<()>>(&Request::EndpointDelete {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
        .map(|_| ())
    }

    pub fn endpoints(&self) -> Result<Vec<RegisteredEndpoint>, ApiError> {
        self.call(&Request::EndpointList)
    }

    pub fn identities(&self) -> Result<Vec<IdentityRow>, ApiError> {
        self.call(&Request::IdentityList)
    }

    pub fn policies(&self) -> Result<Vec<PolicyRow>, ApiError> {
        self.call(&Request::PolicyList)
    }

    pub fn policy_apply(&self, text: &str, source: &str) -> Result<PolicyApplied, ApiError> {
        self.call(&Request::PolicyApply {
            text: text.to_owned(),
            source: source.to_owned(),
        })
    }

    pub fn policy_delete(
        &self,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<PolicyDeleted, ApiError> {
        self.call(&Request::PolicyDelete {
            kind: kind.to_owned(),
            namespace: namespace.map(str::to_owned),
            name: name.to_owned(),
        })
    }

    pub fn fqdn_learn(
        &self,
        name: &str,
        ips: Vec<LearnedAddress>,
    ) -> Result<FqdnLearned, ApiError> {
        self.call(&Request::FqdnLearn {
            name: name.to_owned(),
            ips,
        })
    }

    pub fn fqdn_cache(&self) -> Result<Vec<FqdnCacheRow>, ApiError> {
        self.call(&Request::FqdnCacheList)
    }

    pub fn flows(&self, last: usize) -> Result<Vec<FlowRow>, ApiError> {
        self.call(&Request::Flows { last })
    }

    pub fn ipam_allocate(&self, owner: &str) -> Result<IpamAllocated, ApiError> {
        self.call(&Request::IpamAllocate {
            owner: owner.to_owned(),
        })
    }

    pub fn ipam_release(&self, owner: &str) -> Result<IpamReleased, ApiError> {
        self.call(&Request::IpamRelease {
            owner: owner.to_owned(),
        })
    }

    pub fn ipam(&self) -> Result<IpamState, ApiError> {
        self.call(&Request::IpamList)
    }

    /// Sends one request and decodes its reply as `R`.
    pub fn call<R: DeserializeOwned>(&self, request: &Request) -> Result<R, ApiError> {
        let socket = &self.socket;
        let io = |source| ApiError::Io {
            path: socket.to_owned(),
            source,
        };
        let mut stream = UnixStream::connect(socket).map_err(|source| ApiError::Connect {
            path: socket.to_owned(),
            source,
        })?;
        stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(io)?;
        let mut line = encode(request).map_err(|source| ApiError::Encode {
            path: socket.to_owned(),
            source,
        })?;
        line.push(b'\n');
        stream.write_all(&line).map_err(io)?;
        let mut reply = String::new();
        BufReader::new(&stream).read_line(&mut reply).map_err(io)?;
        let response: Response =
            serde_json::from_str(&reply).map_err(|source| ApiError::Decode {
                path: socket.to_owned(),
                what: "response",
                source,
            })?;
        if !response.ok {
            return Err(ApiError::Agent(
                response.error.unwrap_or_else(|| "unknown error".into()),
            ));
        }
        serde_json::from_value(response.data.unwrap_or(serde_json::Value::Null)).map_err(|source| {
            ApiError::Decode {
                path: socket.to_owned(),
                what: "reply",
                source,
            }
        })
    }
}

/// The codec: one request per line, JSON.
pub fn encode(request: &Request) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(request)
}

/// Decodes one request line (the agent's side). Errors name what was wrong.
pub fn decode_request(line: &[u8]) -> Result<Request, RequestError> {
    if line.len() > MAX_REQUEST_BYTES {
        return Err(RequestError::TooLong {
            len: line.len(),
            max: MAX_REQUEST_BYTES,
        });
    }
    serde_json::from_slice(line).map_err(RequestError::Malformed)
}

/// A request line the agent could not take.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("bad request: {0}")]
    Malformed(#[source] serde_json::Error),
    #[error("bad request: {len} bytes, more than the {max} a request may have")]
    TooLong { len: usize, max: usize },
}

/// `Status`: the node's agent at a glance (`membrane status`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatusReply {
    pub node: String,
    pub uptime_secs: u64,
    pub datapath: DatapathStatus,
    pub endpoints: usize,
    pub identities: usize,
    pub policies: usize,
    pub policy_dir: Option<String>,
    /// Policy files rejected by the last scan, `file: problem`.
    pub policy_errors: Vec<String>,
    pub reconciles: u64,
    pub flows: FlowStatus,
    /// One line about the L7 proxy.
    pub proxy: String,
    pub dns_proxy: DnsProxyStatus,
    pub fqdn: FqdnStatus,
    pub filters: FilterStatus,
    /// The cluster store and the nodes known; `None` when the agent runs without
    /// `--kvstore`.
    #[serde(default)]
    pub cluster: Option<ClusterStatus>,
}

/// `membrane status`'s cluster block (an agent with `--kvstore`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterStatus {
    pub cluster: String,
    /// This node's name in the cluster.
    pub node: String,
    /// Whether this node's registration is written (it needs `--node-ip`).
    pub registered: bool,
    pub store: StoreHealth,
    /// Every node registered in the store, by name.
    pub nodes: Vec<ClusterNodeRow>,
    /// Cluster identities known (the store's `id/` mirrored).
    pub identities: usize,
    /// Other nodes' endpoint addresses in this node's ipcache.
    pub remote_endpoints: usize,
    /// This node's endpoints published to the cluster ipcache.
    pub published_endpoints: usize,
    /// Policy documents in the store.
    pub policies: usize,
    /// Stored policy documents that do not parse on this node, `name: problem` (they
    /// change nothing here).
    pub policy_errors: Vec<String>,
}

/// Health of the connection to the store.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoreHealth {
    /// `etcd`.
    pub kind: String,
    pub endpoints: Vec<String>,
    pub connected: bool,
    /// The last error (names endpoint and key), with its time in ms since the Unix epoch.
    pub last_error: Option<String>,
    pub last_error_at_unix_ms: Option<u64>,
    /// Highest store revision seen.
    pub revision: i64,
    /// The session lease TTL, seconds.
    pub lease_ttl_secs: i64,
    /// Bumped on each new lease and each reconnect (own keys are re-published then).
    pub session_generation: u64,
    /// Stored values that did not parse (skipped).
    pub bad_values: u64,
    /// Addresses claimed by two nodes.
    pub ip_conflicts: u64,
}

/// One node of the cluster.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterNodeRow {
    pub name: String,
    pub underlay_ip: String,
    pub pod_cidr: Option<String>,
    /// True for the node answering.
    pub this_node: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DatapathStatus {
    pub pin_dir: String,
    pub abi_version: u32,
    pub attached_interfaces: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FlowStatus {
    pub kept: usize,
    pub capacity: usize,
    pub seen: u64,
    pub lost_in_kernel: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DnsProxyStatus {
    pub port: u16,
    /// `refused` or `nxdomain`.
    pub deny_response: String,
    pub endpoints_with_dns_rules: usize,
    /// The DNS rules' revision the proxy said it applied (0: none known).
    pub revision_applied: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FqdnStatus {
    /// (name, address) pairs cached.
    pub entries: usize,
    pub addresses: usize,
    pub identities: usize,
    pub learns: u64,
    /// Learns that needed no policy change.
    pub fast_path: u64,
    pub plumbing_us_p50: Option<u64>,
    pub plumbing_us_p99: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FilterStatus {
    pub resources: usize,
    pub attachments: usize,
    /// The attachments' revision the agent holds.
    pub revision: u64,
    /// The revision the proxy said it applied (0: none known).
    pub revision_applied: u64,
}

/// `EndpointAdd`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndpointAdded {
    pub endpoint_id: u32,
}

/// One identity of `IdentityList`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct IdentityRow {
    pub identity: u32,
    /// `source:key=value`.
    pub labels: Vec<String>,
}

/// One policy (or `WasmFilter`) of `PolicyList`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PolicyRow {
    /// `Kind namespace/name`.
    pub policy: String,
    pub rules: usize,
    /// `WasmFilter` only: the module, direction, ports and order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<FilterRow>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FilterRow {
    pub module: String,
    pub direction: String,
    pub ports: Vec<u16>,
    pub order: i64,
}

/// `PolicyApply`: every policy and filter of the text, now in force.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PolicyApplied {
    pub applied: Vec<String>,
}

/// `PolicyDelete`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PolicyDeleted {
    pub deleted: String,
}

/// `FqdnLearn`: the name's addresses with the identities they now have in the ipcache.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FqdnLearned {
    pub name: String,
    pub ips: Vec<LearnedIdentity>,
    /// How long writing the maps took.
    pub plumbing_us: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LearnedIdentity {
    pub ip: String,
    pub identity: Option<u32>,
}

/// One (name, address) of `FqdnCacheList`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FqdnCacheRow {
    pub name: String,
    pub ip: String,
    pub ttl_remaining: u64,
    pub identity: Option<u32>,
    pub labels: Option<Vec<String>>,
}

/// One datapath event of `Flows`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FlowRow {
    /// `Drop`, `Trace` or `PolicyVerdict`.
    pub kind: String,
    /// `Forwarded`, `Dropped` or `Redirected`.
    pub verdict: String,
    pub drop_reason: Option<u8>,
    pub drop_reason_desc: Option<String>,
    /// `ingress` or `egress`.
    pub direction: String,
    pub match_type: u8,
    pub protocol: String,
    /// `address:port`.
    pub src: String,
    pub dst: String,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub endpoint_id: u32,
    pub proxy_port: Option<u16>,
    pub rule_cookie: u32,
}

/// `IpamAllocate`: the owner's address and how the pod reaches the node.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct IpamAllocated {
    pub ip: Ipv4Addr,
    /// The node's pod CIDR the address is from, `a.b.c.d/len`.
    pub pod_cidr: String,
    /// The pod's next hop: the link-local address every host-side veth carries.
    pub gateway: Ipv4Addr,
}

/// `IpamRelease`: the address given back, if the owner held one.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct IpamReleased {
    pub ip: Option<Ipv4Addr>,
}

/// `IpamList`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct IpamState {
    /// `None` until the node has a block (`--pod-cidr`, or the cluster pool): the agent cannot
    /// serve pods yet.
    pub pod_cidr: Option<String>,
    /// Addresses handed out, by address.
    pub allocations: Vec<IpamAllocation>,
    /// Addresses still free.
    pub free: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct IpamAllocation {
    pub ip: Ipv4Addr,
    /// A CNI attachment (`CONTAINERID/IFNAME`) or `endpoint:NAMESPACE/NAME` for an address an
    /// endpoint was registered with directly.
    pub owner: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipam_requests_and_replies_round_trip() {
        let line = encode(&Request::IpamAllocate {
            owner: "abc/eth0".into(),
        })
        .expect("encode");
        assert_eq!(
            std::str::from_utf8(&line).expect("utf8"),
            r#"{"cmd":"ipam_allocate","owner":"abc/eth0"}"#
        );
        assert!(matches!(
            decode_request(&line).expect("decode"),
            Request::IpamAllocate { owner } if owner == "abc/eth0"
        ));
        assert!(decode_request(br#"{"cmd":"ipam_allocate"}"#).is_err());
        let reply = IpamAllocated {
            ip: Ipv4Addr::new(10, 0, 1, 2),
            pod_cidr: "10.0.1.0/24".into(),
            gateway: Ipv4Addr::new(169, 254, 1, 1),
        };
        let back: IpamAllocated =
            serde_json::from_value(serde_json::to_value(&reply).expect("to")).expect("from");
        assert_eq!(back, reply);
    }

    /// The bug this type ended: the agent sent revisions as numbers, the CLI read strings
    /// and printed `-` forever. A reply decodes only into the type it was encoded from.
    #[test]
    fn status_revisions_survive_the_wire() {
        let status = StatusReply {
            node: "n".into(),
            uptime_secs: 1,
            datapath: DatapathStatus {
                pin_dir: "/sys/fs/bpf/membrane/x".into(),
                abi_version: 3,
                attached_interfaces: 2,
            },
            endpoints: 2,
            identities: 9,
            policies: 1,
            policy_dir: None,
            policy_errors: vec![],
            reconciles: 4,
            flows: FlowStatus {
                kept: 0,
                capacity: 4095,
                seen: 0,
                lost_in_kernel: 0,
            },
            proxy: "running".into(),
            dns_proxy: DnsProxyStatus {
                port: 15053,
                deny_response: "refused".into(),
                endpoints_with_dns_rules: 1,
                revision_applied: 1_733_000_000_000_001,
            },
            fqdn: FqdnStatus {
                entries: 0,
                addresses: 0,
                identities: 0,
                learns: 0,
                fast_path: 0,
                plumbing_us_p50: None,
                plumbing_us_p99: Some(12),
            },
            filters: FilterStatus {
                resources: 1,
                attachments: 1,
                revision: 7,
                revision_applied: 7,
            },
            cluster: Some(ClusterStatus {
                cluster: "default".into(),
                node: "n1".into(),
                registered: true,
                store: StoreHealth {
                    kind: "etcd".into(),
                    endpoints: vec!["http://127.0.0.1:2379".into()],
                    connected: false,
                    last_error: Some("etcd get `membrane/.heartbeat` failed".into()),
                    last_error_at_unix_ms: Some(1_733_000_000_123),
                    revision: 42,
                    lease_ttl_secs: 900,
                    session_generation: 3,
                    bad_values: 0,
                    ip_conflicts: 0,
                },
                nodes: vec![ClusterNodeRow {
                    name: "n1".into(),
                    underlay_ip: "192.168.0.11".into(),
                    pod_cidr: None,
                    this_node: true,
                }],
                identities: 4,
                remote_endpoints: 2,
                published_endpoints: 1,
                policies: 1,
                policy_errors: vec![],
            }),
        };
        let wire = serde_json::to_value(Response::reply(&status).expect("encode")).expect("json");
        let back: StatusReply =
            serde_json::from_value(wire["data"].clone()).expect("decodes as it was encoded");
        assert_eq!(back, status);
        assert_eq!(back.dns_proxy.revision_applied, 1_733_000_000_000_001);
    }

    #[test]
    fn requests_decode_strictly() {
        let line = encode(&Request::Flows { last: 3 }).expect("encode");
        assert!(matches!(
            decode_request(&line),
            Ok(Request::Flows { last: 3 })
        ));
        let err = decode_request(br#"{"cmd":"flows","last":"many"}"#).expect_err("wrong type");
        assert!(err.to_string().contains("bad request"), "{err}");
        let err = decode_request(br#"{"cmd":"reboot"}"#).expect_err("unknown command");
        assert!(err.to_string().contains("reboot"), "{err}");
        let long = vec![b' '; MAX_REQUEST_BYTES + 1];
        assert!(matches!(
            decode_request(&long),
            Err(RequestError::TooLong { .. })
        ));
    }
}
