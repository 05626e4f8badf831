//! `membrane`: the command-line interface. One module per command group; it talks to a
//! running agent only through `membrane-agent-api`, runs the lab through `membrane-lab` and
//! the standalone proxy through `membrane-node-proxy`.

mod agent_cmd;
mod bpf_cmd;
mod install_cmd;
mod policy_cmd;
mod proxy_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "membrane",
    version,
    about = "membrane: identity-aware L3-L7 network security node"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The agent's health summary: datapath, endpoints, identities, policies, flows, proxy,
    /// FQDN learning.
    Status(agent_cmd::AgentTarget),
    /// Endpoints registered with the agent.
    Endpoint {
        #[command(flatten)]
        target: agent_cmd::AgentTarget,
        #[command(subcommand)]
        command: agent_cmd::ListCommand,
    },
    /// Security identities the agent allocated (and the reserved ones).
    Identity {
        #[command(flatten)]
        target: agent_cmd::AgentTarget,
        #[command(subcommand)]
        command: agent_cmd::ListCommand,
    },
    /// Wasm filters: `membrane filter check MODULE.wasm` prints the proxy-wasm ABI version a
    /// module declares, every import with whether membrane provides it (missing ones keep it
    /// from loading; WASI functions membrane lacks trap if called), its exported functions
    /// and its sha256 (for a WasmFilter's `sha256`). Exits 1 when it would not load.
    Filter {
        #[command(subcommand)]
        command: FilterCommand,
    },
    /// Names the DNS proxy learned: `membrane fqdn cache list` shows each name's addresses,
    /// their remaining TTL and the `fqdn:` identity they were given (`-` when no toFQDNs
    /// selector matches the name).
    Fqdn {
        #[command(flatten)]
        target: agent_cmd::AgentTarget,
        #[command(subcommand)]
        command: agent_cmd::FqdnCommand,
    },
    /// Flows from a Hubble observer API, with Hubble's flags: --last N, --first N, --all,
    /// -f/--follow, -o compact|dict|json|table, --print-node-name, and filters --namespace,
    /// --pod, --from-pod, --to-pod, --from-all-namespaces, --to-all-namespaces, --from-ip,
    /// --to-ip, --label, --from-label, --to-label, --identity, --verdict, -t/--type,
    /// --protocol, --port, --from-port, --to-port, --http-method, --http-path, --http-status,
    /// --traffic-direction, --encrypted, --unencrypted, --not ... (in order; --not negates
    /// the next filter). --server HOST:PORT reads from a node's TCP port or the relay (4245),
    /// --socket PATH from an agent's Unix socket (default: the lab agent's).
    #[command(disable_help_flag = false)]
    Observe {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Scenarios like `cilium connectivity test`, each checked with real traffic and with the
    /// flows it produced, on a topology of their own (torn down afterwards).
    Connectivity {
        #[command(subcommand)]
        command: ConnectivityCommand,
    },
    /// Inspect the datapath's pinned maps (policy, conntrack, ipcache, endpoints, metrics).
    Bpf(bpf_cmd::BpfArgs),
    /// Run the L7 proxy in standalone reverse-proxy mode (no eBPF needed): every request to
    /// LISTEN is checked against the HTTP rules of --policy (CiliumNetworkPolicy
    /// `rules.http` syntax, or a whole CNP) and forwarded to UPSTREAM, or answered
    /// `403 Access denied`. Without --policy every request is allowed. Allowed requests
    /// then run through the --filter Wasm modules (proxy-wasm), in order. One access record
    /// per request is printed to stdout, naming what each filter did. With --tcp it relays
    /// every TCP connection to UPSTREAM through the --filter modules as TCP (stream) filters.
    Proxy(proxy_cmd::ProxyArgs),
    /// Policies: validate, resolve and trace files offline; list, apply and delete the
    /// agent's policies.
    Policy {
        #[command(flatten)]
        agent: agent_cmd::AgentSocket,
        #[command(subcommand)]
        command: PolicyCli,
    },
    /// The Kubernetes manifests for Cilium-style Helm values (`--values FILE --dry-run`):
    /// CRDs, the agent DaemonSet, relay, RBAC, ConfigMap, Services, ServiceMonitor.
    Install(install_cmd::InstallArgs),
    /// The node in a box: network namespaces with pods, the datapath, real traffic.
    Lab {
        #[command(subcommand)]
        command: LabCommand,
    },
}

#[derive(Subcommand)]
enum FilterCommand {
    /// Check a module without running it.
    Check {
        module: std::path::PathBuf,
        /// Print JSON instead of text.
        #[arg(short = 'o', long = "output", value_parser = ["text", "json"], default_value = "text")]
        output: String,
    },
}

#[derive(Subcommand)]
enum ConnectivityCommand {
    /// Run every scenario; prints one line per scenario and `N passed, N failed`; exits 1 on
    /// any failure.
    Test {
        /// Leave the topology up afterwards (remove it with `membrane lab down` using
        /// MEMBRANE_LAB_NAME=<name>-ct, or the next run).
        #[arg(long)]
        keep: bool,
    },
}

/// `membrane policy ...`: the offline tools and the agent's repository, one command group.
#[derive(Subcommand)]
enum PolicyCli {
    #[command(flatten)]
    Offline(policy_cmd::PolicyCommand),
    #[command(flatten)]
    Agent(agent_cmd::PolicyAgentCommand),
}

#[derive(Subcommand)]
enum LabCommand {
    /// Build the cluster in a box: node namespaces (two by default) with the topology's pods
    /// (by default the seed guide's: frontend, backend and kube-system/kube-dns on node1, api
    /// and external-client on node2), an underlay between the nodes, etcd (the cluster store,
    /// on the host's loopback), one agent and proxy per node, world hosts behind each node's
    /// uplink (github, slack, aws in the
    /// documentation ranges), the cluster DNS (pods resolve `backend`,
    /// `backend.default.svc.cluster.local`, `api.github.com`; under the seed policies only once
    /// the DNS proxy is on the node, see the README), the datapath (pinned, so it keeps
    /// enforcing after this command exits), the four seed policies of examples/policies/ and
    /// the flow page (its URL printed last). Idempotent. Needs root.
    Up {
        /// A topology file (YAML) instead of the built-in seed topology; see
        /// examples/lab/seed-topology.yaml for the format.
        #[arg(long, value_name = "FILE")]
        topology: Option<std::path::PathBuf>,
        /// Apply no policy (everything is allowed until you apply some).
        #[arg(long)]
        no_policies: bool,
        /// Nodes of the lab (1-16). With one there is no cluster store: the node allocates
        /// identities itself. Pods of nodes beyond the count run on the last node.
        #[arg(long, value_name = "N", default_value_t = membrane_lab::lab::DEFAULT_NODES,
              value_parser = clap::value_parser!(u32).range(1..=16))]
        nodes: u32,
        /// How pod traffic crosses between nodes: `tunnel` (VXLAN, the source identity in the
        /// VNI) or `native` (routes to each node's pod CIDR over the underlay).
        #[arg(long, value_enum, value_name = "MODE", default_value = "tunnel")]
        routing: membrane_agent_api::args::RoutingModeArg,
        /// Where the agent serves the flow page (live flow table with filters, service map)
        /// on this host's loopback; `up` prints its URL. Default 127.0.0.1:9966 (another free
        /// loopback port when that one is taken, e.g. by another lab); an ADDR given here must
        /// be free; port 0 picks one.
        #[arg(long, value_name = "ADDR", conflicts_with = "no_ui")]
        ui_listen: Option<std::net::SocketAddr>,
        /// Serve no flow page.
        #[arg(long)]
        no_ui: bool,
    },
    /// Bring the lab up if needed, then show what the seed policies do to real traffic:
    /// connections allowed and dropped, HTTP requests the proxy allows or answers 403, the
    /// flows and counters they produced. The lab stays up.
    Demo,
    /// Run a command inside a pod, with the pod's resolver configuration (the lab's cluster
    /// DNS): `membrane lab exec frontend -- curl -s 10.200.0.11:8080`,
    /// `membrane lab exec kube-system/kube-dns -- dig +short api.github.com`.
    /// POD is `name` (namespace default) or `namespace/name`.
    Exec {
        pod: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Stop the lab's agent and servers and remove every lab namespace, pin, state file and
    /// /etc/netns entry (idempotent).
    Down,
    /// The lab's HTTP server (started inside a pod or world host by `lab up`).
    #[command(hide = true)]
    Serve(membrane_lab::workload::ServeArgs),
    /// The lab's cluster DNS (started inside the DNS pod by `lab up`).
    #[command(hide = true)]
    DnsServe(membrane_lab::workload::DnsServeArgs),
}

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Bpf(args) => bpf_cmd::run(args)?,
        Command::Install(args) => install_cmd::run(&args)?,
        Command::Proxy(args) => proxy_cmd::run_proxy(args)?,
        Command::Connectivity {
            command: ConnectivityCommand::Test { keep },
        } => {
            let (_, failed) = membrane_lab::connectivity::run(keep)?;
            if failed > 0 {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Status(target) => agent_cmd::status(&target)?,
        Command::Endpoint { target, .. } => agent_cmd::endpoints(&target)?,
        Command::Identity { target, .. } => agent_cmd::identities(&target)?,
        Command::Filter {
            command: FilterCommand::Check { module, output },
        } => {
            if !proxy_cmd::filter_check(&module, output == "json")? {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Fqdn { target, .. } => agent_cmd::fqdn_cache(&target)?,
        Command::Observe { args } => {
            membrane_observer::client::observe(&args, &membrane_lab::lab::hubble_socket())?
        }
        Command::Policy { agent, command } => match command {
            PolicyCli::Offline(command) => return policy_cmd::run(command),
            PolicyCli::Agent(command) => agent_cmd::policy(&agent, command)?,
        },
        Command::Lab { command } => match command {
            LabCommand::Up {
                topology,
                no_policies,
                nodes,
                routing,
                ui_listen,
                no_ui,
            } => membrane_lab::lab::up(&membrane_lab::lab::UpOptions {
                topology,
                policies: !no_policies,
                shape: membrane_lab::topology::Shape { nodes, routing },
                ui: match (ui_listen, no_ui) {
                    (_, true) => membrane_lab::lab::UiListen::Off,
                    (Some(addr), false) => membrane_lab::lab::UiListen::Addr(addr),
                    (None, false) => membrane_lab::lab::UiListen::Default,
                },
            })?,
            LabCommand::Demo => membrane_lab::lab::demo()?,
            LabCommand::Exec { pod, command } => {
                let code = membrane_lab::lab::exec(&pod, &command)?;
                return Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)));
            }
            LabCommand::Down => {
                let removed = membrane_lab::lab::down()?;
                if removed.is_empty() {
                    println!("nothing to remove");
                }
                for r in removed {
                    println!("removed {r}");
                }
            }
            LabCommand::Serve(a) => membrane_lab::lab::serve(a.port, &a.body, &a.paths)?,
            LabCommand::DnsServe(a) => membrane_lab::lab::dns_serve(&a.zone, a.listen)?,
        },
    }
    Ok(ExitCode::SUCCESS)
}
