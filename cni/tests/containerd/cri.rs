//! A small blocking CRI client: tonic over containerd's Unix socket, on a runtime of its own.

use std::{collections::BTreeMap, path::Path, time::Duration};

pub mod proto {
    tonic::include_proto!("runtime.v1");
}

use proto::runtime_service_client::RuntimeServiceClient;

/// Bound on every CRI call (sandbox creation runs the CNI plugin, which waits for the agent).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Cri {
    runtime: tokio::runtime::Runtime,
    client: RuntimeServiceClient<tonic::transport::Channel>,
}

/// What the test reads of a sandbox.
#[derive(Debug)]
pub struct SandboxStatus {
    pub ready: bool,
    pub ip: String,
    /// The sandbox's (pause) process.
    pub pid: u32,
}

impl Cri {
    pub fn connect(socket: &Path) -> anyhow::Result<Cri> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let path = socket.to_owned();
        let channel = runtime.block_on(
            tonic::transport::Endpoint::from_static("http://localhost")
                .timeout(CALL_TIMEOUT)
                .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                })),
        )?;
        Ok(Cri {
            runtime,
            client: RuntimeServiceClient::new(channel),
        })
    }

    pub fn version(&mut self) -> anyhow::Result<proto::VersionResponse> {
        let mut c = self.client.clone();
        Ok(self
            .runtime
            .block_on(c.version(proto::VersionRequest {
                version: "v1".into(),
            }))?
            .into_inner())
    }

    /// `NetworkReady` of the runtime's status (false until a CNI config is loaded).
    pub fn network_ready(&mut self) -> anyhow::Result<bool> {
        let mut c = self.client.clone();
        let status = self
            .runtime
            .block_on(c.status(proto::StatusRequest { verbose: false }))?
            .into_inner();
        Ok(status
            .status
            .map(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.r#type == "NetworkReady" && c.status)
            })
            .unwrap_or(false))
    }

    pub fn run_pod(
        &mut self,
        namespace: &str,
        name: &str,
        cgroup_parent: &str,
        annotations: BTreeMap<String, String>,
    ) -> Result<String, tonic::Status> {
        let config = proto::PodSandboxConfig {
            metadata: Some(proto::PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{namespace}-{name}"),
                namespace: namespace.into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: String::new(),
            labels: BTreeMap::new().into_iter().collect(),
            annotations: annotations.into_iter().collect(),
            linux: Some(proto::LinuxPodSandboxConfig {
                cgroup_parent: cgroup_parent.into(),
                security_context: Some(proto::LinuxSandboxSecurityContext {
                    namespace_options: Some(proto::NamespaceOption {
                        network: proto::NamespaceMode::Pod as i32,
                        pid: proto::NamespaceMode::Container as i32,
                        ipc: proto::NamespaceMode::Pod as i32,
                    }),
                }),
            }),
        };
        let mut c = self.client.clone();
        Ok(self
            .runtime
            .block_on(c.run_pod_sandbox(proto::RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            }))?
            .into_inner()
            .pod_sandbox_id)
    }

    pub fn pod_status(&mut self, id: &str) -> anyhow::Result<SandboxStatus> {
        let mut c = self.client.clone();
        let reply = self
            .runtime
            .block_on(c.pod_sandbox_status(proto::PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: true,
            }))?
            .into_inner();
        let status = reply
            .status
            .ok_or_else(|| anyhow::anyhow!("sandbox {id}: no status"))?;
        // containerd's verbose `info` is a JSON document with the sandbox process's pid.
        let info: serde_json::Value =
            serde_json::from_str(reply.info.get("info").map(String::as_str).unwrap_or("{}"))?;
        Ok(SandboxStatus {
            ready: status.state == proto::PodSandboxState::SandboxReady as i32,
            ip: status.network.map(|n| n.ip).unwrap_or_default(),
            pid: info
                .get("pid")
                .and_then(serde_json::Value::as_u64)
                .and_then(|p| u32::try_from(p).ok())
                .unwrap_or(0),
        })
    }

    pub fn stop_pod(&mut self, id: &str) -> Result<(), tonic::Status> {
        let mut c = self.client.clone();
        self.runtime
            .block_on(c.stop_pod_sandbox(proto::StopPodSandboxRequest {
                pod_sandbox_id: id.into(),
            }))
            .map(|_| ())
    }

    pub fn remove_pod(&mut self, id: &str) -> Result<(), tonic::Status> {
        let mut c = self.client.clone();
        self.runtime
            .block_on(c.remove_pod_sandbox(proto::RemovePodSandboxRequest {
                pod_sandbox_id: id.into(),
            }))
            .map(|_| ())
    }
}
