//! CLI commands that talk to a running agent over its local API: `membrane status`,
//! `endpoint list`, `identity list`, `fqdn cache list`, `policy list|apply|delete`; only
//! through `membrane-agent-api`'s typed client.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use membrane_agent_api::{
    Client,
    api::{ClusterStatus, StatusReply},
};

/// Which agent to talk to.
#[derive(Args, Debug, Clone)]
pub struct AgentSocket {
    /// The agent's API socket [default: the lab agent's,
    /// /run/membrane/$MEMBRANE_LAB_NAME/agent.sock or /run/membrane/membrane-lab/agent.sock].
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    /// The lab node whose agent to ask (`node1`, `node2`, …) [default: the first].
    #[arg(long, global = true, value_name = "NAME", conflicts_with = "socket")]
    pub node: Option<String>,
}

impl AgentSocket {
    fn path(&self) -> anyhow::Result<PathBuf> {
        if let Some(s) = &self.socket {
            return Ok(s.clone());
        }
        let run = membrane_lab::lab::node_run_name(self.node.as_deref())?;
        Ok(membrane_agent_api::RunDir::new(&run).agent_socket())
    }
}

/// Which agent to talk to, and how to print its answer.
#[derive(Args, Debug, Clone)]
pub struct AgentTarget {
    #[command(flatten)]
    pub agent: AgentSocket,
    /// Print JSON instead of a table.
    #[arg(short = 'o', long = "output", global = true, value_parser = ["table", "json"], default_value = "table")]
    pub output: String,
}

impl AgentTarget {
    fn client(&self) -> anyhow::Result<Client> {
        Ok(Client::new(self.agent.path()?))
    }

    fn json(&self) -> bool {
        self.output == "json"
    }
}

#[derive(Subcommand, Debug)]
pub enum ListCommand {
    /// List them.
    List,
}

#[derive(Subcommand, Debug)]
pub enum FqdnCommand {
    /// The FQDN cache.
    Cache {
        #[command(subcommand)]
        command: ListCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum PolicyAgentCommand {
    /// Policies in force in the agent's repository.
    List {
        /// Print JSON instead of a table.
        #[arg(short = 'o', long = "output", value_parser = ["table", "json"], default_value = "table")]
        output: String,
    },
    /// Add or replace every policy in FILE (YAML or JSON, multi-document). A file with any
    /// problem changes nothing.
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Delete the policy KIND/NAMESPACE/NAME (or KIND/NAME for clusterwide policies), e.g.
    /// CiliumNetworkPolicy/default/backend-allow-frontend.
    Delete { policy: String },
}

fn print<T: serde::Serialize>(target: &AgentTarget, value: &T, table: impl FnOnce(&T)) {
    if target.json() {
        println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_default()
        );
    } else {
        table(value);
    }
}

/// The status lines, from the typed reply (a revision is a number on both sides).
pub fn render_status(s: &StatusReply) -> String {
    let now_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    render_status_at(s, now_unix_ms)
}

/// [`render_status`] with the current time given (ages of errors are relative to it).
pub fn render_status_at(s: &StatusReply, now_unix_ms: u64) -> String {
    let mut out = String::new();
    let mut line = |l: String| {
        out.push_str(&l);
        out.push('\n');
    };
    line(format!("Node:        {}", s.node));
    line(format!("Uptime:      {} s", s.uptime_secs));
    line(format!(
        "Datapath:    Ok   ABI {}, {} interfaces attached, pinned at {}",
        s.datapath.abi_version, s.datapath.attached_interfaces, s.datapath.pin_dir
    ));
    line(format!("Endpoints:   {}", s.endpoints));
    line(format!("Identities:  {}", s.identities));
    line(format!(
        "Policies:    {} in force{}",
        s.policies,
        if s.policy_errors.is_empty() {
            String::new()
        } else {
            format!(", {} file(s) rejected", s.policy_errors.len())
        }
    ));
    for e in &s.policy_errors {
        line(format!("             rejected: {e}"));
    }
    line(format!(
        "Flows:       {}/{} kept, {} seen, {} lost in the kernel",
        s.flows.kept, s.flows.capacity, s.flows.seen, s.flows.lost_in_kernel
    ));
    line(format!("Proxy:       {}", s.proxy));
    let revision = |r: u64| {
        if r == 0 {
            "-".to_owned()
        } else {
            r.to_string()
        }
    };
    let d = &s.dns_proxy;
    line(format!(
        "DNS proxy:   port {} (UDP, TCP; denied names get {}), {} endpoint(s) with DNS rules, revision {} applied",
        d.port,
        d.deny_response.to_uppercase(),
        d.endpoints_with_dns_rules,
        revision(d.revision_applied)
    ));
    let w = &s.filters;
    line(format!(
        "Filters:     {} WasmFilter resource(s), {} attachment(s), revision {} ({} applied by the proxy)",
        w.resources,
        w.attachments,
        w.revision,
        revision(w.revision_applied)
    ));
    let f = &s.fqdn;
    let us = |v: Option<u64>| v.map_or("-".to_owned(), |n| format!("{n} µs"));
    line(format!(
        "FQDN:        {} names/addresses, {} identities; {} learned ({} without a policy change), plumbing p50 {} p99 {}",
        f.entries,
        f.identities,
        f.learns,
        f.fast_path,
        us(f.plumbing_us_p50),
        us(f.plumbing_us_p99)
    ));
    if let Some(c) = &s.cluster {
        render_cluster(c, now_unix_ms, &mut line);
    }
    out
}

/// The cluster block of `membrane status`.
fn render_cluster(c: &ClusterStatus, now_unix_ms: u64, line: &mut impl FnMut(String)) {
    let st = &c.store;
    line(format!(
        "Cluster:     {} (this node: {}{})",
        c.cluster,
        c.node,
        if c.registered {
            ""
        } else {
            ", not registered: no --node-ip"
        }
    ));
    line(format!(
        "  Store:     {} {} at {}, revision {}, lease TTL {} s, session {}",
        st.kind,
        if st.connected { "Ok" } else { "FAILING" },
        st.endpoints.join(","),
        st.revision,
        st.lease_ttl_secs,
        st.session_generation
    ));
    if let Some(e) = &st.last_error {
        let age = st.last_error_at_unix_ms.map_or("-".to_owned(), |at| {
            format!("{} s ago", now_unix_ms.saturating_sub(at) / 1000)
        });
        line(format!("  Last error ({age}): {e}"));
    }
    if st.bad_values > 0 || st.ip_conflicts > 0 {
        line(format!(
            "  Problems:  {} stored value(s) that do not parse, {} address(es) claimed by two nodes",
            st.bad_values, st.ip_conflicts
        ));
    }
    line(format!(
        "  Contents:  {} identities, {} endpoint(s) published, {} remote endpoint(s) in the ipcache, {} policy document(s)",
        c.identities, c.published_endpoints, c.remote_endpoints, c.policies
    ));
    for e in &c.policy_errors {
        line(format!("             rejected here: {e}"));
    }
    line(format!("  Nodes:     {}", c.nodes.len()));
    for n in &c.nodes {
        line(format!(
            "    {:<20} {:<16} {}{}",
            n.name,
            n.underlay_ip,
            n.pod_cidr.as_deref().unwrap_or("-"),
            if n.this_node { "  (this node)" } else { "" }
        ));
    }
}

pub fn status(target: &AgentTarget) -> anyhow::Result<()> {
    let s = target.client()?.status()?;
    print(target, &s, |s| print!("{}", render_status(s)));
    Ok(())
}

/// `membrane fqdn cache list`: what the DNS proxy learned.
pub fn fqdn_cache(target: &AgentTarget) -> anyhow::Result<()> {
    let rows = target.client()?.fqdn_cache()?;
    print(target, &rows, |rows| {
        println!(
            "{:<40} {:<15} {:>8} {:>10}",
            "NAME", "IP", "TTL", "IDENTITY"
        );
        for r in rows {
            println!(
                "{:<40} {:<15} {:>8} {:>10}",
                r.name,
                r.ip,
                format!("{}s", r.ttl_remaining),
                r.identity.map_or("-".to_owned(), |i| i.to_string()),
            );
        }
    });
    Ok(())
}

pub fn endpoints(target: &AgentTarget) -> anyhow::Result<()> {
    let rows = target.client()?.endpoints()?;
    print(target, &rows, |rows| {
        println!(
            "{:>8} {:<24} {:>10} {:<15} {:<14} LABELS",
            "ENDPOINT", "NAME", "IDENTITY", "IPV4", "INTERFACE"
        );
        for r in rows {
            println!(
                "{:>8} {:<24} {:>10} {:<15} {:<14} {}",
                r.endpoint_id,
                format!("{}/{}", r.namespace, r.name),
                r.identity,
                r.ipv4.to_string(),
                r.host_ifname,
                r.labels.join(" ")
            );
        }
    });
    Ok(())
}

pub fn identities(target: &AgentTarget) -> anyhow::Result<()> {
    let rows = target.client()?.identities()?;
    print(target, &rows, |rows| {
        println!("{:>10}  LABELS", "ID");
        for r in rows {
            println!("{:>10}  {}", r.identity, r.labels.join(" "));
        }
    });
    Ok(())
}

pub fn policy(agent: &AgentSocket, command: PolicyAgentCommand) -> anyhow::Result<()> {
    let client = Client::new(agent.path()?);
    let target = &AgentTarget {
        agent: agent.clone(),
        output: "table".into(),
    };
    match command {
        PolicyAgentCommand::List { output } => {
            let target = &AgentTarget {
                agent: agent.clone(),
                output,
            };
            let rows = client.policies()?;
            print(target, &rows, |rows| {
                for r in rows {
                    println!("{}  ({} rules)", r.policy, r.rules);
                }
            });
        }
        PolicyAgentCommand::Apply { file } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let out = client.policy_apply(&text, &file.display().to_string())?;
            print(target, &out, |out| {
                for p in &out.applied {
                    println!("applied {p}");
                }
            });
        }
        PolicyAgentCommand::Delete { policy } => {
            let parts: Vec<&str> = policy.split('/').collect();
            let (kind, namespace, name) = match parts.as_slice() {
                [kind, ns, name] => (*kind, Some(*ns), *name),
                [kind, name] => (*kind, None, *name),
                _ => anyhow::bail!("`{policy}`: expected KIND/NAMESPACE/NAME or KIND/NAME"),
            };
            let out = client.policy_delete(kind, namespace, name)?;
            print(target, &out, |out| println!("deleted {}", out.deleted));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `membrane status` used to print "revision - applied" forever for DNS and filters: the
    /// agent sent numbers, the CLI read strings. The typed reply renders what was applied.
    #[test]
    fn status_shows_the_revisions_the_proxy_applied() {
        let reply: StatusReply = serde_json::from_value(serde_json::json!({
            "node": "lab", "uptime_secs": 3,
            "datapath": {"pin_dir": "/sys/fs/bpf/membrane/lab", "abi_version": 3, "attached_interfaces": 5},
            "endpoints": 5, "identities": 12, "policies": 4, "policy_dir": null, "policy_errors": [],
            "reconciles": 9,
            "flows": {"kept": 1, "capacity": 4095, "seen": 1, "lost_in_kernel": 0},
            "proxy": "running",
            "dns_proxy": {"port": 15053, "deny_response": "refused", "endpoints_with_dns_rules": 2, "revision_applied": 1765120000000001u64},
            "fqdn": {"entries": 0, "addresses": 0, "identities": 0, "learns": 0, "fast_path": 0, "plumbing_us_p50": null, "plumbing_us_p99": null},
            "filters": {"resources": 1, "attachments": 2, "revision": 1765120000000007u64, "revision_applied": 1765120000000007u64}
        }))
        .expect("the agent's reply decodes");
        let text = render_status(&reply);
        assert!(
            text.contains("2 endpoint(s) with DNS rules, revision 1765120000000001 applied"),
            "{text}"
        );
        assert!(
            text.contains("revision 1765120000000007 (1765120000000007 applied by the proxy)"),
            "{text}"
        );
        assert!(
            !text.contains("Cluster:"),
            "no store, no cluster block: {text}"
        );
    }

    #[test]
    fn status_shows_the_store_failing_with_its_last_error_and_the_nodes() {
        let mut reply: StatusReply = serde_json::from_value(serde_json::json!({
            "node": "lab", "uptime_secs": 3,
            "datapath": {"pin_dir": "/sys/fs/bpf/membrane/lab", "abi_version": 3, "attached_interfaces": 5},
            "endpoints": 5, "identities": 12, "policies": 4, "policy_dir": null, "policy_errors": [],
            "reconciles": 9,
            "flows": {"kept": 1, "capacity": 4095, "seen": 1, "lost_in_kernel": 0},
            "proxy": "running",
            "dns_proxy": {"port": 15053, "deny_response": "refused", "endpoints_with_dns_rules": 2, "revision_applied": 1},
            "fqdn": {"entries": 0, "addresses": 0, "identities": 0, "learns": 0, "fast_path": 0, "plumbing_us_p50": null, "plumbing_us_p99": null},
            "filters": {"resources": 0, "attachments": 0, "revision": 0, "revision_applied": 0},
            "cluster": {
                "cluster": "default", "node": "node-1", "registered": true,
                "store": {"kind": "etcd", "endpoints": ["http://127.0.0.1:2379"], "connected": false,
                          "last_error": "etcd get `membrane/.heartbeat` at http://127.0.0.1:2379 failed: connection refused",
                          "last_error_at_unix_ms": 1_000_000, "revision": 57, "lease_ttl_secs": 900,
                          "session_generation": 2, "bad_values": 1, "ip_conflicts": 0},
                "nodes": [
                    {"name": "node-1", "underlay_ip": "192.168.0.11", "pod_cidr": null, "this_node": true},
                    {"name": "node-2", "underlay_ip": "192.168.0.12", "pod_cidr": "10.0.2.0/24", "this_node": false}
                ],
                "identities": 7, "remote_endpoints": 3, "published_endpoints": 2, "policies": 1,
                "policy_errors": ["CiliumNetworkPolicy default/x: spec: unknown field"]
            }
        }))
        .expect("the agent's reply decodes");
        let text = render_status_at(&reply, 1_042_000);
        for want in [
            "Cluster:     default (this node: node-1)",
            "Store:     etcd FAILING at http://127.0.0.1:2379, revision 57",
            "Last error (42 s ago): etcd get `membrane/.heartbeat` at http://127.0.0.1:2379 failed: connection refused",
            "1 stored value(s) that do not parse",
            "7 identities, 2 endpoint(s) published, 3 remote endpoint(s) in the ipcache, 1 policy document(s)",
            "rejected here: CiliumNetworkPolicy default/x: spec: unknown field",
            "Nodes:     2",
            "node-1               192.168.0.11     -  (this node)",
            "node-2               192.168.0.12     10.0.2.0/24",
        ] {
            assert!(text.contains(want), "missing `{want}` in:\n{text}");
        }
        let c = reply.cluster.as_mut().expect("cluster");
        c.store.connected = true;
        c.store.last_error = None;
        c.store.bad_values = 0;
        c.registered = false;
        let text = render_status_at(&reply, 1_042_000);
        assert!(text.contains("etcd Ok at"), "{text}");
        assert!(text.contains("not registered: no --node-ip"), "{text}");
        assert!(
            !text.contains("Last error") && !text.contains("Problems"),
            "{text}"
        );
    }
}
