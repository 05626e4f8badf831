//! `membrane bpf ...`: tables (or JSON) of the datapath's pinned maps, read straight from
//! bpffs, so they work whether or not the agent runs.
//!
//! Endpoints may be named by id or by pod name (`name` in `default`, or `namespace/name`)
//! when the run's endpoint registry (written by `membrane lab up`) names them.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand, ValueEnum};
use membrane_agent_api::{
    RunDir,
    registry::{self, RegisteredEndpoint},
};
use membrane_common::{Direction, reason};
use membrane_datapath::{
    CtMap, EndpointsMap, IpcacheMap, MetricsMap, PolicyMap, PolicyVerdict, maps::protocol_name,
};
use serde::Serialize;

#[derive(Args, Debug)]
pub struct BpfArgs {
    /// Pin directory of the datapath's maps [default: the lab's first node's,
    /// /sys/fs/bpf/membrane/$MEMBRANE_LAB_NAME or /sys/fs/bpf/membrane/membrane-lab].
    #[arg(long, global = true)]
    pub pin_dir: Option<PathBuf>,
    /// The lab node whose maps to read (`node1`, `node2`, …) [default: the first].
    #[arg(long, global = true, value_name = "NAME", conflicts_with = "pin_dir")]
    pub node: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(subcommand)]
    pub command: BpfCommand,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum BpfCommand {
    /// Policy map entries of one endpoint.
    Policy {
        #[command(subcommand)]
        command: PolicyGet,
    },
    /// Connection tracking.
    Ct {
        #[command(subcommand)]
        command: ListOnly,
    },
    /// IP/prefix → identity cache.
    Ipcache {
        #[command(subcommand)]
        command: ListOnly,
    },
    /// Endpoints known to the datapath.
    Endpoint {
        #[command(subcommand)]
        command: ListOnly,
    },
    /// Packet and byte counters by direction and verdict, and lost flow events.
    Metrics,
}

#[derive(Subcommand, Debug)]
pub enum PolicyGet {
    /// Entries of ENDPOINT (endpoint id, or pod name as `name` or `namespace/name`).
    Get { endpoint: String },
}

#[derive(Subcommand, Debug)]
pub enum ListOnly {
    /// List the entries.
    List,
}

fn pin_dir_of(args: &BpfArgs) -> anyhow::Result<PathBuf> {
    if let Some(dir) = &args.pin_dir {
        return Ok(dir.clone());
    }
    let run = membrane_lab::lab::node_run_name(args.node.as_deref())?;
    Ok(membrane_lab::lab::node_pin_path(&run))
}

fn registry_path(pin_dir: &Path) -> PathBuf {
    RunDir::of_pin_dir(pin_dir).endpoints()
}

fn read_registry(pin_dir: &Path) -> Vec<RegisteredEndpoint> {
    registry::read(&RunDir::of_pin_dir(pin_dir))
}

fn resolve_endpoint(pin_dir: &Path, spec: &str) -> anyhow::Result<u32> {
    if let Ok(id) = spec.parse::<u32>() {
        return Ok(id);
    }
    let (namespace, name) = spec.split_once('/').unwrap_or(("default", spec));
    let registry = read_registry(pin_dir);
    registry
        .iter()
        .find(|e| e.name == name && e.namespace == namespace)
        .map(|e| e.endpoint_id)
        .ok_or_else(|| {
            let known: Vec<String> = registry
                .iter()
                .map(|e| format!("{}/{}", e.namespace, e.name))
                .collect();
            anyhow::anyhow!(
                "no endpoint `{namespace}/{name}` in {} (known: {}); give an endpoint id instead",
                registry_path(pin_dir).display(),
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            )
        })
}

fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn verdict_text(v: PolicyVerdict) -> String {
    match v {
        PolicyVerdict::Allow => "allow".into(),
        PolicyVerdict::Deny => "deny".into(),
        PolicyVerdict::Redirect(p) => format!("redirect:{p}"),
    }
}

pub fn run(args: BpfArgs) -> anyhow::Result<()> {
    let pin_dir = &pin_dir_of(&args)?;
    if !pin_dir.exists() {
        anyhow::bail!(
            "no datapath pinned at {} (is the lab up? `membrane lab up`, or pass --pin-dir)",
            pin_dir.display()
        );
    }
    let json = args.output == Output::Json;
    match args.command {
        BpfCommand::Policy {
            command: PolicyGet::Get { endpoint },
        } => {
            let id = resolve_endpoint(pin_dir, &endpoint)?;
            let rows: Vec<_> = PolicyMap::open_pinned(pin_dir)?
                .list()?
                .into_iter()
                .filter(|r| r.endpoint_id == id)
                .collect();
            if json {
                let out: Vec<_> = rows
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "endpoint_id": r.endpoint_id,
                            "direction": r.direction.as_str(),
                            "remote_identity": r.remote_identity,
                            "protocol": protocol_name(r.protocol),
                            "ports": r.ports.to_string(),
                            "verdict": verdict_text(r.verdict),
                            "precedence": r.precedence,
                            "cookie": r.cookie,
                        })
                    })
                    .collect();
                return print_json(&out);
            }
            println!(
                "{:<9} {:>10} {:<6} {:<12} {:<14} {:>10} {:>10}",
                "DIRECTION", "IDENTITY", "PROTO", "PORTS", "VERDICT", "PRECEDENCE", "COOKIE"
            );
            for r in rows {
                let identity = if r.remote_identity == 0 {
                    "ANY".to_owned()
                } else {
                    r.remote_identity.to_string()
                };
                println!(
                    "{:<9} {:>10} {:<6} {:<12} {:<14} {:>10} {:>10}",
                    r.direction.as_str(),
                    identity,
                    protocol_name(r.protocol),
                    r.ports.to_string(),
                    verdict_text(r.verdict),
                    r.precedence,
                    r.cookie
                );
            }
        }
        BpfCommand::Ct {
            command: ListOnly::List,
        } => {
            let rows = CtMap::open_pinned(pin_dir)?.list()?;
            if json {
                let out: Vec<_> = rows
                    .iter()
                    .map(|e| {
                        serde_json::json!({
                            "endpoint_id": e.endpoint_id,
                            "direction": e.direction.as_str(),
                            "protocol": protocol_name(e.protocol),
                            "src": format!("{}:{}", e.src, e.sport),
                            "dst": format!("{}:{}", e.dst, e.dport),
                            "packets_fwd": e.packets_fwd,
                            "packets_rev": e.packets_rev,
                            "src_identity": e.src_identity,
                            "proxy_port": e.proxy_port,
                            "closing": e.closing,
                            "seen_reply": e.seen_reply,
                            "idle_secs": e.idle_secs,
                            "rule_cookie": e.rule_cookie,
                        })
                    })
                    .collect();
                return print_json(&out);
            }
            println!(
                "{:>8} {:<8} {:<5} {:<21} {:<21} {:>8} {:>8} {:>10} {:>6} {:>6} FLAGS",
                "ENDPOINT",
                "DIR",
                "PROTO",
                "SOURCE",
                "DESTINATION",
                "FWD",
                "REV",
                "SRC-ID",
                "PROXY",
                "IDLE"
            );
            for e in rows {
                let mut flags = Vec::new();
                if e.seen_reply {
                    flags.push("seen-reply");
                }
                if e.closing {
                    flags.push("closing");
                }
                println!(
                    "{:>8} {:<8} {:<5} {:<21} {:<21} {:>8} {:>8} {:>10} {:>6} {:>5}s {}",
                    e.endpoint_id,
                    e.direction.as_str(),
                    protocol_name(e.protocol),
                    format!("{}:{}", e.src, e.sport),
                    format!("{}:{}", e.dst, e.dport),
                    e.packets_fwd,
                    e.packets_rev,
                    e.src_identity,
                    e.proxy_port
                        .map_or_else(|| "-".to_owned(), |p| p.to_string()),
                    e.idle_secs,
                    flags.join(",")
                );
            }
        }
        BpfCommand::Ipcache {
            command: ListOnly::List,
        } => {
            let rows = IpcacheMap::open_pinned(pin_dir)?.list_info()?;
            if json {
                let out: Vec<_> = rows
                    .iter()
                    .map(|(prefix, info)| {
                        serde_json::json!({
                            "prefix": prefix.to_string(),
                            "identity": info.identity,
                            "tunnel_endpoint": info.tunnel_endpoint.map(|ip| ip.to_string()),
                        })
                    })
                    .collect();
                return print_json(&out);
            }
            println!("{:<20} {:>10}  TUNNEL ENDPOINT", "PREFIX", "IDENTITY");
            for (prefix, info) in rows {
                println!(
                    "{:<20} {:>10}  {}",
                    prefix.to_string(),
                    info.identity,
                    info.tunnel_endpoint
                        .map_or_else(|| "-".to_owned(), |ip| ip.to_string())
                );
            }
        }
        BpfCommand::Endpoint {
            command: ListOnly::List,
        } => {
            let rows = EndpointsMap::open_pinned(pin_dir)?.list()?;
            let registry = read_registry(pin_dir);
            let name_of = |id: u32| {
                registry
                    .iter()
                    .find(|r| r.endpoint_id == id)
                    .map(|r| format!("{}/{}", r.namespace, r.name))
                    .unwrap_or_default()
            };
            if json {
                let out: Vec<_> = rows
                    .iter()
                    .map(|e| {
                        serde_json::json!({
                            "endpoint_id": e.endpoint_id,
                            "name": name_of(e.endpoint_id),
                            "ifindex": e.ifindex,
                            "identity": e.identity,
                            "enforce_ingress": e.enforce_ingress,
                            "enforce_egress": e.enforce_egress,
                        })
                    })
                    .collect();
                return print_json(&out);
            }
            println!(
                "{:>8} {:<28} {:>8} {:>10} {:<9} {:<9}",
                "ENDPOINT", "NAME", "IFINDEX", "IDENTITY", "INGRESS", "EGRESS"
            );
            let enforced = |b: bool| if b { "enforced" } else { "open" };
            for e in rows {
                println!(
                    "{:>8} {:<28} {:>8} {:>10} {:<9} {:<9}",
                    e.endpoint_id,
                    name_of(e.endpoint_id),
                    e.ifindex,
                    e.identity,
                    enforced(e.enforce_ingress),
                    enforced(e.enforce_egress)
                );
            }
        }
        BpfCommand::Metrics => {
            let metrics = MetricsMap::open_pinned(pin_dir)?;
            let rows = metrics.snapshot()?;
            let lost = metrics.events_lost()?;
            if json {
                let out: Vec<_> = rows
                    .iter()
                    .map(|s| {
                        serde_json::json!({
                            "direction": s.direction.as_str(),
                            "reason": s.reason,
                            "description": reason::describe(s.reason),
                            "packets": s.packets,
                            "bytes": s.bytes,
                        })
                    })
                    .collect();
                return print_json(&serde_json::json!({"counters": out, "events_lost": lost}));
            }
            println!(
                "{:<9} {:<46} {:>10} {:>12}",
                "DIRECTION", "REASON", "PACKETS", "BYTES"
            );
            for s in rows {
                let what = if s.reason == reason::FORWARDED {
                    "Forwarded".to_owned()
                } else {
                    format!("{} ({})", reason::describe(s.reason), s.reason)
                };
                println!(
                    "{:<9} {:<46} {:>10} {:>12}",
                    s.direction.as_str(),
                    what,
                    s.packets,
                    s.bytes
                );
            }
            println!("flow events lost: {lost}");
            let _ = Direction::Ingress;
        }
    }
    Ok(())
}
