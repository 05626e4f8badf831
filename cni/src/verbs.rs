//! The verbs. ADD wires the veth, asks the agent for the pod's address and registers the
//! endpoint; the agent answers `EndpointAdd` only once the endpoint's programs are attached
//! and its policy is in the maps, so the result goes out when the pod is enforced. A failure
//! part-way undoes what was done (endpoint, veth, address). DEL, and GC for attachments the
//! runtime no longer knows, undo the same three, each step a no-op if already done.

use std::{collections::BTreeSet, path::Path};

use membrane_agent_api::{
    Client,
    api::{ApiError, EndpointSpec},
    cni::SUPPORTED_VERSIONS,
};

use crate::{
    error::CniError,
    plumbing::{self, Where},
    request::{Env, NetConf, attachment_owner},
    result::{AddResult, Interface, IpConfig, Route, VersionResult},
};

/// What a verb prints on success (nothing for DEL, CHECK, GC and STATUS).
pub enum Output {
    Add(AddResult),
    Version(VersionResult),
    Nothing,
}

fn agent(conf: &NetConf) -> Client {
    Client::new(&conf.plugin.agent_socket)
}

/// An API error: the agent's own refusal keeps its message; not reaching it means "try
/// again later".
fn api_err(client: &Client, what: impl Into<String>) -> impl FnOnce(ApiError) -> CniError {
    let what = what.into();
    let socket = client.socket().to_owned();
    move |e| match e {
        ApiError::Agent(message) => CniError::AgentRefused { what, message },
        ApiError::Connect { source, .. } => CniError::AgentUnreachable {
            socket,
            reason: source.to_string(),
        },
        other => CniError::AgentUnreachable {
            socket,
            reason: format!("{what}: {other}"),
        },
    }
}

/// The agent answers, has a pod CIDR, and manages the namespace this plugin runs in (the
/// runtime's): otherwise the veth would end up where no program watches it.
fn ready_agent(conf: &NetConf) -> Result<Client, CniError> {
    let client = agent(conf);
    let status = client.status().map_err(api_err(&client, "status"))?;
    let ipam = client.ipam().map_err(api_err(&client, "IPAM state"))?;
    if ipam.pod_cidr.is_none() {
        return Err(CniError::AgentNotReady {
            why: "it has no pod CIDR yet".into(),
        });
    }
    let agent_ns = Path::new("/run/netns").join(&status.node);
    if plumbing::netns_inode(Path::new("/proc/self/ns/net"))? != plumbing::netns_inode(&agent_ns)? {
        return Err(CniError::Config {
            what: format!(
                "the runtime runs membrane-cni outside the agent's node namespace {} (start the runtime in it)",
                status.node
            ),
        });
    }
    Ok(client)
}

/// ADD.
pub fn add(env: &Env, conf: &NetConf) -> Result<Output, CniError> {
    let (namespace, name) = env.pod()?;
    let labels = conf.pod_labels()?;
    let netns = env.netns.as_deref().ok_or(CniError::MissingEnv {
        var: "CNI_NETNS",
        command: env.command.clone(),
    })?;
    let client = ready_agent(conf)?;
    let owner = env.owner();
    let host = plumbing::host_ifname(&owner);
    let allocated = client.ipam_allocate(&owner).map_err(api_err(
        &client,
        format!("pod address for {namespace}/{name}"),
    ))?;
    let undo = |registered: bool| {
        if registered {
            let _ = client.endpoint_delete(&namespace, &name);
        }
        let _ = plumbing::delete_link(&host);
        let _ = client.ipam_release(&owner);
    };
    // A leftover of an ADD that died half-way (same attachment, same name).
    if let Err(e) = plumbing::delete_link(&host) {
        undo(false);
        return Err(e);
    }
    if let Err(e) = plumbing::wire(&host, netns, &env.ifname, allocated.ip, allocated.gateway) {
        undo(false);
        return Err(e);
    }
    let spec = EndpointSpec {
        name: name.clone(),
        namespace: namespace.clone(),
        labels,
        ipv4: allocated.ip,
        host_ifname: host.clone(),
    };
    if let Err(e) = client
        .endpoint_add(spec)
        .map_err(api_err(&client, format!("endpoint {namespace}/{name}")))
    {
        // Registered or not (a lost reply), the endpoint of this name and veth goes.
        undo(matches!(e, CniError::AgentUnreachable { .. }));
        return Err(e);
    }
    let result = (|| {
        Ok(AddResult {
            cni_version: conf.cni_version.clone(),
            interfaces: vec![
                Interface {
                    name: host.clone(),
                    mac: plumbing::mac(Where::Here, &host)?,
                    sandbox: None,
                },
                Interface {
                    name: env.ifname.clone(),
                    mac: plumbing::mac(Where::In(netns), &env.ifname)?,
                    sandbox: Some(netns.display().to_string()),
                },
            ],
            ips: vec![IpConfig {
                address: format!("{}/32", allocated.ip),
                gateway: Some(allocated.gateway.to_string()),
                interface: Some(1),
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".into(),
                gw: Some(allocated.gateway.to_string()),
            }],
        })
    })();
    match result {
        Ok(r) => Ok(Output::Add(r)),
        Err(e) => {
            undo(true);
            Err(e)
        }
    }
}

/// Removes one attachment: its endpoint (found by its veth, so a newer pod of the same name
/// is never touched), its veth, its address. Each step is skipped if already done; if the
/// agent cannot be reached the veth still goes and the error asks to try again.
fn remove_attachment(client: &Client, owner: &str) -> Result<(), CniError> {
    let host = plumbing::host_ifname(owner);
    let endpoints = client.endpoints().map_err(api_err(client, "endpoint list"));
    let endpoints = match endpoints {
        Ok(e) => e,
        Err(e) => {
            plumbing::delete_link(&host)?;
            return Err(e);
        }
    };
    if let Some(ep) = endpoints.iter().find(|e| e.host_ifname == host) {
        client
            .endpoint_delete(&ep.namespace, &ep.name)
            .map_err(api_err(
                client,
                format!("delete endpoint {}/{}", ep.namespace, ep.name),
            ))?;
    }
    plumbing::delete_link(&host)?;
    client
        .ipam_release(owner)
        .map_err(api_err(client, format!("release the address of {owner}")))?;
    Ok(())
}

/// DEL: idempotent.
pub fn del(env: &Env, conf: &NetConf) -> Result<Output, CniError> {
    remove_attachment(&agent(conf), &env.owner())?;
    Ok(Output::Nothing)
}

/// CHECK: the endpoint is registered with the address ADD returned, the veth is up on both
/// sides with that address inside.
pub fn check(env: &Env, conf: &NetConf) -> Result<Output, CniError> {
    let netns = env.netns.as_deref().ok_or(CniError::MissingEnv {
        var: "CNI_NETNS",
        command: env.command.clone(),
    })?;
    let client = agent(conf);
    let host = plumbing::host_ifname(&env.owner());
    let endpoints = client
        .endpoints()
        .map_err(api_err(&client, "endpoint list"))?;
    let Some(ep) = endpoints.iter().find(|e| e.host_ifname == host) else {
        return Err(CniError::Check(format!(
            "the agent has no endpoint on {host} for {}",
            env.owner()
        )));
    };
    let want = format!("{}/32", ep.ipv4);
    if let Some(prev) = &conf.prev_result
        && !prev.ips.iter().any(|i| i.address == want)
    {
        return Err(CniError::Check(format!(
            "endpoint {}/{} has {want}, prevResult says {:?}",
            ep.namespace,
            ep.name,
            prev.ips.iter().map(|i| &i.address).collect::<Vec<_>>()
        )));
    }
    if !plumbing::link_exists(Where::Here, &host)? {
        return Err(CniError::Check(format!("host-side veth {host} is gone")));
    }
    let inside = plumbing::addresses(Where::In(netns), &env.ifname)
        .map_err(|e| CniError::Check(format!("{} in {}: {e}", env.ifname, netns.display())))?;
    if !inside.contains(&want) {
        return Err(CniError::Check(format!(
            "{} in {} has {inside:?}, not {want}",
            env.ifname,
            netns.display()
        )));
    }
    Ok(Output::Nothing)
}

/// GC (1.1): every attachment holding an address that the runtime did not list is removed.
pub fn gc(conf: &NetConf) -> Result<Output, CniError> {
    let Some(valid) = &conf.valid_attachments else {
        return Err(CniError::Config {
            what: "GC needs cni.dev/valid-attachments".into(),
        });
    };
    let keep: BTreeSet<String> = valid
        .iter()
        .map(|a| attachment_owner(&a.container_id, &a.ifname))
        .collect();
    let client = agent(conf);
    let state = client.ipam().map_err(api_err(&client, "IPAM state"))?;
    let mut first_error = None;
    for a in state.allocations {
        // Addresses the agent reserved for endpoints registered without the CNI are not
        // attachments.
        if a.owner.starts_with("endpoint:") || keep.contains(&a.owner) {
            continue;
        }
        if let Err(e) = remove_attachment(&client, &a.owner) {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(Output::Nothing), Err)
}

/// STATUS (1.1): ADD can be served when the agent answers and has a pod CIDR.
pub fn status(conf: &NetConf) -> Result<Output, CniError> {
    let client = agent(conf);
    match client.ipam() {
        Ok(state) if state.pod_cidr.is_some() => Ok(Output::Nothing),
        Ok(_) => Err(CniError::NotAvailable(
            "the membrane agent has no pod CIDR yet".into(),
        )),
        Err(e) => Err(CniError::NotAvailable(format!(
            "the membrane agent at {} does not answer: {e}",
            client.socket().display()
        ))),
    }
}

/// VERSION.
pub fn version(requested: Option<String>) -> Output {
    let cni_version = requested
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1].to_owned());
    Output::Version(VersionResult {
        cni_version,
        supported_versions: SUPPORTED_VERSIONS.iter().map(|v| (*v).to_owned()).collect(),
    })
}
