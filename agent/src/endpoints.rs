//! Endpoints: registration (labels → identity, programs attached to the host-side veth),
//! removal, the registry saved in the run directory, and taking over a previous agent's
//! endpoints at start.

use membrane_agent_api::{
    api::EndpointSpec,
    registry::{self, RegisteredEndpoint},
    run_dir::write_atomically,
};
use membrane_observer::EndpointMeta;
use membrane_policy::{Identity, IdentityAllocator as _, Labels};

use crate::{
    daemon::{Endpoint, State},
    error::{AgentError, dp_err, io_err},
};

/// An endpoint's security labels: its pod labels (`k8s:` unless they name a source), the
/// namespace label, and the cluster label the `cluster` entity selects by (Cilium adds it
/// to every pod).
pub(crate) fn endpoint_labels(
    spec: &EndpointSpec,
    cluster_name: &str,
) -> Result<Labels, AgentError> {
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
    texts.push(format!("k8s:io.cilium.k8s.policy.cluster={cluster_name}"));
    let labels = Labels::parse(texts.iter().map(String::as_str)).map_err(AgentError::Labels)?;
    Ok(membrane_policy::filter_security_relevant(&labels))
}

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

    /// Checks `spec` against the registered endpoints: `Some(id)` if it is registered with
    /// exactly these settings, an error if its name, address or interface is taken.
    pub(crate) fn check_endpoint(&self, spec: &EndpointSpec) -> Result<Option<u32>, AgentError> {
        if spec.name.is_empty() || spec.namespace.is_empty() {
            return Err(AgentError::EndpointUnnamed);
        }
        let key = (spec.namespace.clone(), spec.name.clone());
        if let Some(existing) = self.endpoints.get(&key) {
            if existing.spec == *spec {
                return Ok(Some(existing.id));
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
        Ok(None)
    }

    /// The labels of `spec` on this node.
    pub(crate) fn endpoint_labels(&self, spec: &EndpointSpec) -> Result<Labels, AgentError> {
        endpoint_labels(spec, &self.config.cluster.cluster_name)
    }

    /// Registers an endpoint, its identity allocated here. With a cluster store this waits
    /// for the store while holding `&mut self`: only for start-up (restoring endpoints,
    /// before the state is shared); the API allocates without the state lock and calls
    /// [`State::insert_endpoint`].
    pub(crate) fn add_endpoint(
        &mut self,
        spec: EndpointSpec,
        id: Option<u32>,
    ) -> Result<u32, AgentError> {
        if let Some(existing) = self.check_endpoint(&spec)? {
            return Ok(existing);
        }
        let labels = self.endpoint_labels(&spec)?;
        let cluster_identity = match &self.cluster {
            Some(c) if !labels.is_local_scope() => {
                Some(c.allocate(&labels).map_err(AgentError::from)?)
            }
            _ => None,
        };
        let result = self.insert_endpoint(spec, id, labels.clone(), cluster_identity);
        if result.is_err()
            && cluster_identity.is_some()
            && let Some(c) = &self.cluster
        {
            c.release(labels);
        }
        result
    }

    /// Registers an endpoint with `labels`: its identity is `cluster_identity` (allocated
    /// from the cluster store by the caller) or, without one, from the node's allocator.
    /// Re-checks the registered endpoints: the caller may have let the state lock go.
    pub(crate) fn insert_endpoint(
        &mut self,
        spec: EndpointSpec,
        id: Option<u32>,
        labels: Labels,
        cluster_identity: Option<Identity>,
    ) -> Result<u32, AgentError> {
        if let Some(existing) = self.check_endpoint(&spec)? {
            if cluster_identity.is_some()
                && let Some(c) = &self.cluster
            {
                c.release(labels);
            }
            return Ok(existing);
        }
        let key = (spec.namespace.clone(), spec.name.clone());
        let identity = match cluster_identity {
            Some(id) => {
                self.identities.insert(id, labels.clone());
                id
            }
            None => match self.identities.lookup(&labels) {
                Some(id) => id,
                None => {
                    let id = self
                        .allocator
                        .allocate(&labels)
                        .map_err(AgentError::Identity)?;
                    self.identities.insert(id, labels.clone());
                    id
                }
            },
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
        self.reserve_endpoint_addresses();
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
        if let Some(c) = &self.cluster
            && !endpoint.labels.is_local_scope()
        {
            // Does not wait: the release runs on the runtime.
            c.release(endpoint.labels.clone());
        }
        self.datapath
            .detach_endpoint(&endpoint.spec.host_ifname)
            .map_err(dp_err("detach programs"))?;
        let _ = self.datapath.conntrack().flush_endpoint(endpoint.id);
        self.resolved.remove(&endpoint.id);
        self.release_endpoint_address(namespace, name);
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
