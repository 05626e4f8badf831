//! Endpoints: registration (labels → identity, programs attached to the host-side veth),
//! removal, the registry saved in the run directory, and taking over a previous agent's
//! endpoints at start.

use membrane_agent_api::{
    api::EndpointSpec,
    registry::{self, RegisteredEndpoint},
    run_dir::write_atomically,
};
use membrane_observer::EndpointMeta;
use membrane_policy::{IdentityAllocator as _, Labels};

use crate::{
    config::CLUSTER_NAME,
    daemon::{Endpoint, State},
    error::{AgentError, dp_err, io_err},
};

impl State {
    /// A restart: takes over the endpoints the previous agent registered, in identity order
    /// so the deterministic allocator hands out the same numbers again.
    pub(crate) fn restore_endpoints(&mut self) {
        // A restart: take over the endpoints the previous agent registered, in identity order so
        // the deterministic allocator hands out the same numbers again.
        let mut saved_endpoints = registry::read(&self.config.run_dir());
        saved_endpoints.sort_by_key(|e| e.identity);
        for saved in saved_endpoints {
            let spec = EndpointSpec {
                name: saved.name.clone(),
                namespace: saved.namespace.clone(),
                labels: saved
                    .labels
                    .iter()
                    .filter_map(|l| l.strip_prefix("k8s:"))
                    .filter(|l| {
                        !l.starts_with("io.kubernetes.pod.namespace=")
                            && !l.starts_with("io.cilium.k8s.policy.cluster=")
                    })
                    .map(str::to_owned)
                    .collect(),
                ipv4: saved.ipv4,
                host_ifname: saved.host_ifname.clone(),
            };
            self.next_endpoint_id = self.next_endpoint_id.max(saved.endpoint_id + 1);
            match self.add_endpoint(spec, Some(saved.endpoint_id)) {
                Ok(_) => {
                    let restored = self
                        .endpoints
                        .get(&(saved.namespace.clone(), saved.name.clone()))
                        .map(|e| e.identity.0);
                    if restored != Some(saved.identity) {
                        tracing::warn!(endpoint = %saved.name, before = saved.identity, now = ?restored, "identity changed across the restart");
                    }
                }
                Err(e) => {
                    tracing::warn!(endpoint = %saved.name, error = %e, "could not restore endpoint")
                }
            }
        }
    }

    pub(crate) fn registry(&self) -> Vec<RegisteredEndpoint> {
        self.endpoints
            .values()
            .map(|e| RegisteredEndpoint {
                name: e.spec.name.clone(),
                namespace: e.spec.namespace.clone(),
                endpoint_id: e.id,
                identity: e.identity.0,
                ipv4: e.spec.ipv4,
                host_ifname: e.spec.host_ifname.clone(),
                labels: e.labels.iter().map(|l| l.to_string()).collect(),
            })
            .collect()
    }

    fn save_registry(&self) -> Result<(), AgentError> {
        let path = self.config.run_dir().endpoints();
        let bytes =
            serde_json::to_vec_pretty(&self.registry()).map_err(|source| AgentError::Encode {
                what: "the endpoint registry",
                source,
            })?;
        write_atomically(&path, &bytes).map_err(io_err(format!("write {}", path.display())))
    }

    pub(crate) fn add_endpoint(
        &mut self,
        spec: EndpointSpec,
        id: Option<u32>,
    ) -> Result<u32, AgentError> {
        if spec.name.is_empty() || spec.namespace.is_empty() {
            return Err(AgentError::EndpointUnnamed);
        }
        let key = (spec.namespace.clone(), spec.name.clone());
        if let Some(existing) = self.endpoints.get(&key) {
            if existing.spec == spec {
                return Ok(existing.id);
            }
            return Err(AgentError::EndpointConflict { id: existing.id });
        }
        if let Some(clash) = self
            .endpoints
            .values()
            .find(|e| e.spec.ipv4 == spec.ipv4 || e.spec.host_ifname == spec.host_ifname)
        {
            return Err(AgentError::EndpointClash {
                ipv4: spec.ipv4,
                ifname: spec.host_ifname.clone(),
                owner: format!("{}/{}", clash.spec.namespace, clash.spec.name),
            });
        }
        let mut texts: Vec<String> = Vec::new();
        for l in &spec.labels {
            if !l.contains('=') {
                return Err(AgentError::LabelNotKeyValue(l.clone()));
            }
            texts.push(if l.contains(':') && !l.starts_with("app.kubernetes.io") {
                l.clone()
            } else {
                format!("k8s:{l}")
            });
        }
        texts.push(format!(
            "k8s:io.kubernetes.pod.namespace={}",
            spec.namespace
        ));
        // The `cluster` entity selects pods by this label (Cilium adds it to every pod).
        texts.push(format!("k8s:io.cilium.k8s.policy.cluster={CLUSTER_NAME}"));
        let labels = Labels::parse(texts.iter().map(String::as_str)).map_err(AgentError::Labels)?;
        let labels = membrane_policy::filter_security_relevant(&labels);
        let identity = match self.identities.lookup(&labels) {
            Some(id) => id,
            None => {
                let id = self
                    .allocator
                    .allocate(&labels)
                    .map_err(AgentError::Identity)?;
                self.identities.insert(id, labels.clone());
                id
            }
        };
        let id = id.unwrap_or_else(|| {
            let id = self.next_endpoint_id;
            self.next_endpoint_id += 1;
            id
        });
        self.datapath
            .attach_endpoint(&self.node, &spec.host_ifname)
            .map_err(dp_err(format!("attach programs to {}", spec.host_ifname)))?;
        self.enricher.insert_endpoint(
            std::net::IpAddr::V4(spec.ipv4),
            EndpointMeta {
                id,
                namespace: spec.namespace.clone(),
                pod_name: spec.name.clone(),
                labels: labels.iter().map(|l| l.to_string()).collect(),
            },
        );
        self.endpoints.insert(
            key,
            Endpoint {
                spec,
                id,
                identity,
                labels,
            },
        );
        self.save_registry()?;
        Ok(id)
    }

    pub(crate) fn delete_endpoint(
        &mut self,
        namespace: &str,
        name: &str,
    ) -> Result<(), AgentError> {
        let key = (namespace.to_owned(), name.to_owned());
        let Some(endpoint) = self.endpoints.remove(&key) else {
            return Err(AgentError::NoSuchEndpoint);
        };
        self.datapath
            .detach_endpoint(&endpoint.spec.host_ifname)
            .map_err(dp_err("detach programs"))?;
        let _ = self.datapath.conntrack().flush_endpoint(endpoint.id);
        self.resolved.remove(&endpoint.id);
        self.save_registry()
    }

    pub(crate) fn node_ifindex(&self, ifname: &str) -> Result<u32, AgentError> {
        let name = std::ffi::CString::new(ifname)
            .map_err(|_| AgentError::InterfaceName(ifname.to_owned()))?;
        // SAFETY: `name` is NUL-terminated and outlives the call.
        let index = self
            .node
            .run(move || unsafe { libc::if_nametoindex(name.as_ptr()) })
            .map_err(dp_err("ifindex"))?;
        if index == 0 {
            return Err(AgentError::NoInterface {
                ifname: ifname.to_owned(),
                netns: self.node.name().to_owned(),
            });
        }
        Ok(index)
    }
}
