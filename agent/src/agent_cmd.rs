//! CLI commands that talk to a running agent over its local API: `membrane status`,
//! `endpoint list`, `identity list`, `policy list|apply|delete`, `observe`.

use std::{io::Write as _, path::PathBuf};

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
        let d = &s["dns_proxy"];
        println!(
            "DNS proxy:   port {} (UDP, TCP; denied names get {}), {} endpoint(s) with DNS rules, revision {} applied",
            d["port"],
            d["deny_response"]
                .as_str()
                .unwrap_or_default()
                .to_uppercase(),
            d["endpoints_with_dns_rules"],
            d["revision_applied"]
                .as_str()
                .filter(|r| !r.is_empty())
                .unwrap_or("-")
        );
        let w = &s["filters"];
        println!(
            "Filters:     {} WasmFilter resource(s), {} attachment(s), revision {} ({} applied by the proxy)",
            w["resources"],
            w["attachments"],
            w["revision"],
            w["revision_applied"]
                .as_str()
                .filter(|r| !r.is_empty())
                .unwrap_or("-")
        );
        let f = &s["fqdn"];
        let us = |v: &serde_json::Value| v.as_u64().map_or("-".to_owned(), |n| format!("{n} µs"));
        println!(
            "FQDN:        {} names/addresses, {} identities; {} learned ({} without a policy change), plumbing p50 {} p99 {}",
            f["entries"],
            f["identities"],
            f["learns"],
            f["fast_path"],
            us(&f["plumbing_us_p50"]),
            us(&f["plumbing_us_p99"])
        );
    });
    Ok(())
}

/// `membrane fqdn cache list`: what the DNS proxy learned.
pub fn fqdn_cache(target: &AgentTarget) -> anyhow::Result<()> {
    let rows = api::call(&target.socket(), &Request::FqdnCacheList)?;
    print(target, &rows, |rows| {
        println!(
            "{:<40} {:<15} {:>8} {:>10}",
            "NAME", "IP", "TTL", "IDENTITY"
        );
        for r in rows.as_array().into_iter().flatten() {
            println!(
                "{:<40} {:<15} {:>8} {:>10}",
                r["name"].as_str().unwrap_or_default(),
                r["ip"].as_str().unwrap_or_default(),
                format!("{}s", r["ttl_remaining"]),
                r["identity"]
                    .as_u64()
                    .map_or("-".to_owned(), |i| i.to_string()),
            );
        }
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

/// `membrane observe [OPTIONS] [FILTER FLAGS...]`: flows from the agent's Hubble observer API,
/// Hubble's flags and output formats. Filter flags keep their command-line order (it
/// matters for `--not`), so they are parsed here rather than by clap.
pub fn observe_hubble(args: &[String]) -> anyhow::Result<std::process::ExitCode> {
    use membrane_observer::{
        PrintOptions, filters_from_flags, printer,
        proto::observer::{GetFlowsRequest, observer_client::ObserverClient},
    };

    let mut socket: Option<PathBuf> = None;
    let mut number: Option<u64> = None;
    let (mut follow, mut first, mut all) = (false, false, false);
    let mut output = "compact".to_owned();
    let mut filters: Vec<(String, String)> = Vec::new();
    // Filter flags that take no value.
    const BARE: &[&str] = &[
        "--not",
        "--ipv4",
        "--ipv6",
        "-4",
        "-6",
        "-A",
        "--all-namespaces",
    ];
    let mut it = args.iter().peekable();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with('-') => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = |what: &str| -> anyhow::Result<String> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => it
                    .next()
                    .cloned()
                    .ok_or_else(|| anyhow::anyhow!("{what} needs a value")),
            }
        };
        match flag.as_str() {
            "--socket" => socket = Some(PathBuf::from(value("--socket")?)),
            "--last" => {
                number = Some(
                    value("--last")?
                        .parse()
                        .map_err(|e| anyhow::anyhow!("--last: {e}"))?,
                )
            }
            "--first" => {
                first = true;
                number = Some(
                    value("--first")?
                        .parse()
                        .map_err(|e| anyhow::anyhow!("--first: {e}"))?,
                );
            }
            "--all" => all = true,
            "-f" | "--follow" => follow = true,
            "-o" | "--output" => output = value("--output")?,
            f if BARE.contains(&f) => filters.push((f.to_owned(), String::new())),
            f if f.starts_with('-') => {
                let v = value(f)?;
                filters.push((f.to_owned(), v));
            }
            other => anyhow::bail!(
                "unexpected argument `{other}` (filters are flags, e.g. --pod default/frontend)"
            ),
        }
    }
    if !matches!(output.as_str(), "compact" | "dict" | "json" | "jsonpb") {
        anyhow::bail!("--output `{output}`: expected compact, dict, json or jsonpb");
    }
    let observe_filters = filters_from_flags(filters.iter().map(|(f, v)| (f.as_str(), v.as_str())))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let number = if all {
        u64::MAX
    } else if follow && number.is_none() {
        0
    } else {
        number.unwrap_or(20)
    };
    let path = socket.unwrap_or_else(|| {
        crate::lab::agent_socket().with_file_name(crate::daemon::HUBBLE_SOCKET_NAME)
    });

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let connect_path = path.clone();
        let channel = tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = connect_path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot reach the Hubble API at {}: {e} (is the agent running?)",
                    path.display()
                )
            })?;
        let mut client = ObserverClient::new(channel);
        let request = GetFlowsRequest {
            number,
            first,
            follow,
            whitelist: observe_filters.whitelist,
            blacklist: observe_filters.blacklist,
            ..GetFlowsRequest::default()
        };
        let mut stream = client
            .get_flows(request)
            .await
            .map_err(|e| anyhow::anyhow!("GetFlows: {}", e.message()))?
            .into_inner();
        let opts = PrintOptions::default();
        let mut out = std::io::stdout().lock();
        while let Some(response) = tokio_stream::StreamExt::next(&mut stream).await {
            let response = response.map_err(|e| anyhow::anyhow!("GetFlows: {}", e.message()))?;
            let written = match output.as_str() {
                "json" | "jsonpb" => writeln!(out, "{}", printer::json_line(&response)),
                "dict" => {
                    if let Some(
                        membrane_observer::proto::observer::get_flows_response::ResponseTypes::Flow(
                            flow,
                        ),
                    ) = &response.response_types
                    {
                        writeln!(out, "{}", printer::dict(flow, opts))
                    } else {
                        Ok(())
                    }
                }
                _ => {
                    if let Some(line) = printer::compact_response(&response, opts) {
                        writeln!(out, "{line}")
                    } else {
                        Ok(())
                    }
                }
            };
            // A closed pipe (`| head`) ends the output quietly.
            if written.is_err() {
                break;
            }
        }
        anyhow::Ok(())
    })?;
    Ok(std::process::ExitCode::SUCCESS)
}
