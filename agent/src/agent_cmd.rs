//! CLI commands that talk to a running agent over its local API: `membrane status`,
//! `endpoint list`, `identity list`, `policy list|apply|delete`, `observe`.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::api::{self, Request};

/// Which agent to talk to.
#[derive(Args, Debug, Clone)]
pub struct AgentSocket {
    /// The agent's API socket [default: the lab agent's,
    /// /run/membrane/$MEMBRANE_LAB_NAME/agent.sock or /run/membrane/membrane-lab/agent.sock].
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
}

impl AgentSocket {
    fn path(&self) -> PathBuf {
        self.socket.clone().unwrap_or_else(crate::lab::agent_socket)
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
    fn socket(&self) -> PathBuf {
        self.agent.path()
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

fn print(target: &AgentTarget, value: &serde_json::Value, table: impl FnOnce(&serde_json::Value)) {
    if target.json() {
        println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_default()
        );
    } else {
        table(value);
    }
}

pub fn status(target: &AgentTarget) -> anyhow::Result<()> {
    let s = api::call(&target.socket(), &Request::Status)?;
    print(target, &s, |s| {
        println!("Node:        {}", s["node"].as_str().unwrap_or_default());
        println!("Uptime:      {} s", s["uptime_secs"]);
        println!(
            "Datapath:    Ok   ABI {}, {} interfaces attached, pinned at {}",
            s["datapath"]["abi_version"],
            s["datapath"]["attached_interfaces"],
            s["datapath"]["pin_dir"].as_str().unwrap_or_default()
        );
        println!("Endpoints:   {}", s["endpoints"]);
        println!("Identities:  {}", s["identities"]);
        let errors = s["policy_errors"].as_array().cloned().unwrap_or_default();
        println!(
            "Policies:    {} in force{}",
            s["policies"],
            if errors.is_empty() {
                String::new()
            } else {
                format!(", {} file(s) rejected", errors.len())
            }
        );
        for e in errors {
            println!("             rejected: {}", e.as_str().unwrap_or_default());
        }
        println!(
            "Flows:       {}/{} kept, {} seen, {} lost in the kernel",
            s["flows"]["kept"],
            s["flows"]["capacity"],
            s["flows"]["seen"],
            s["flows"]["lost_in_kernel"]
        );
        println!("Proxy:       {}", s["proxy"].as_str().unwrap_or_default());
    });
    Ok(())
}

pub fn endpoints(target: &AgentTarget) -> anyhow::Result<()> {
    let rows = api::call(&target.socket(), &Request::EndpointList)?;
    print(target, &rows, |rows| {
        println!(
            "{:>8} {:<24} {:>10} {:<15} {:<14} LABELS",
            "ENDPOINT", "NAME", "IDENTITY", "IPV4", "INTERFACE"
        );
        for r in rows.as_array().into_iter().flatten() {
            let labels: Vec<&str> = r["labels"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|l| l.as_str())
                .collect();
            println!(
                "{:>8} {:<24} {:>10} {:<15} {:<14} {}",
                r["endpoint_id"],
                format!(
                    "{}/{}",
                    r["namespace"].as_str().unwrap_or_default(),
                    r["name"].as_str().unwrap_or_default()
                ),
                r["identity"],
                r["ipv4"].as_str().unwrap_or_default(),
                r["host_ifname"].as_str().unwrap_or_default(),
                labels.join(" ")
            );
        }
    });
    Ok(())
}

pub fn identities(target: &AgentTarget) -> anyhow::Result<()> {
    let rows = api::call(&target.socket(), &Request::IdentityList)?;
    print(target, &rows, |rows| {
        println!("{:>10}  LABELS", "ID");
        for r in rows.as_array().into_iter().flatten() {
            let labels: Vec<&str> = r["labels"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|l| l.as_str())
                .collect();
            println!("{:>10}  {}", r["identity"], labels.join(" "));
        }
    });
    Ok(())
}

pub fn policy(agent: &AgentSocket, command: PolicyAgentCommand) -> anyhow::Result<()> {
    let socket = agent.path();
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
            let rows = api::call(&socket, &Request::PolicyList)?;
            print(target, &rows, |rows| {
                for r in rows.as_array().into_iter().flatten() {
                    println!(
                        "{}  ({} rules)",
                        r["policy"].as_str().unwrap_or_default(),
                        r["rules"]
                    );
                }
            });
        }
        PolicyAgentCommand::Apply { file } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let out = api::call(
                &socket,
                &Request::PolicyApply {
                    text,
                    source: file.display().to_string(),
                },
            )?;
            print(target, &out, |out| {
                for p in out["applied"].as_array().into_iter().flatten() {
                    println!("applied {}", p.as_str().unwrap_or_default());
                }
            });
        }
        PolicyAgentCommand::Delete { policy } => {
            let parts: Vec<&str> = policy.split('/').collect();
            let (kind, namespace, name) = match parts.as_slice() {
                [kind, ns, name] => (*kind, Some((*ns).to_owned()), *name),
                [kind, name] => (*kind, None, *name),
                _ => anyhow::bail!("`{policy}`: expected KIND/NAMESPACE/NAME or KIND/NAME"),
            };
            let out = api::call(
                &socket,
                &Request::PolicyDelete {
                    kind: kind.to_owned(),
                    namespace,
                    name: name.to_owned(),
                },
            )?;
            print(target, &out, |out| {
                println!("deleted {}", out["deleted"].as_str().unwrap_or_default())
            });
        }
    }
    Ok(())
}

/// `membrane observe --last N`: the datapath flows the agent kept, oldest first.
pub fn observe(target: &AgentTarget, last: usize) -> anyhow::Result<()> {
    let flows = api::call(&target.socket(), &Request::Flows { last })?;
    let names: Vec<(std::net::Ipv4Addr, String)> =
        api::call(&target.socket(), &Request::EndpointList)
            .ok()
            .and_then(|rows| rows.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|r| {
                Some((
                    r["ipv4"].as_str()?.parse().ok()?,
                    r["name"].as_str()?.to_owned(),
                ))
            })
            .collect();
    let names: Vec<(std::net::Ipv4Addr, &str)> =
        names.iter().map(|(ip, n)| (*ip, n.as_str())).collect();
    for f in flows.as_array().into_iter().flatten() {
        if target.json() {
            println!("{f}");
        } else {
            println!("{}", crate::lab::describe_flow(f, &names));
        }
    }
    Ok(())
}
