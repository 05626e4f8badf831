//! `membrane`: the command-line interface. Thin: parses arguments, calls `membrane_agent`.

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
    Status(membrane_agent::agent_cmd::AgentTarget),
    /// Endpoints registered with the agent.
    Endpoint {
        #[command(flatten)]
        target: membrane_agent::agent_cmd::AgentTarget,
        #[command(subcommand)]
        command: membrane_agent::agent_cmd::ListCommand,
    },
    /// Security identities the agent allocated (and the reserved ones).
    Identity {
        #[command(flatten)]
        target: membrane_agent::agent_cmd::AgentTarget,
        #[command(subcommand)]
        command: membrane_agent::agent_cmd::ListCommand,
    },
    /// Wasm filters: `membrane filter check MODULE.wasm` prints the proxy-wasm ABI version a
    /// module declares, every import with whether membrane provides it (missing ones keep it
    /// from loading; WASI functions membrane lacks trap if called), its exported functions
    /// and its sha256 (for a WasmFilter's `sha256`). Exits 1 when it would not load.
    #[cfg(feature = "proxy")]
    Filter {
        #[command(subcommand)]
        command: FilterCommand,
    },
    /// Names the DNS proxy learned: `membrane fqdn cache list` shows each name's addresses,
    /// their remaining TTL and the `fqdn:` identity they were given (`-` when no toFQDNs
    /// selector matches the name).
    Fqdn {
        #[command(flatten)]
        target: membrane_agent::agent_cmd::AgentTarget,
        #[command(subcommand)]
        command: membrane_agent::agent_cmd::FqdnCommand,
    },
    /// Flows from the agent's Hubble observer API, with Hubble's flags: --last N, --first N,
    /// --all, -f/--follow, -o compact|dict|json, and filters --namespace, --pod, --from-pod,
    /// --to-pod, --from-ip, --to-ip, --label, --from-label, --to-label, --identity,
    /// --verdict, -t/--type, --protocol, --port, --from-port, --to-port, --http-method,
    /// --http-path, --http-status, --traffic-direction, --not ... (in order; --not negates the
    /// next filter). --socket PATH selects the API socket (default: the lab agent's).
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
    Bpf(membrane_agent::bpf_cmd::BpfArgs),
    #[cfg(feature = "proxy")]
    /// Run the L7 proxy in standalone reverse-proxy mode (no eBPF needed): every request to
    /// LISTEN is checked against the HTTP rules of --policy (CiliumNetworkPolicy
    /// `rules.http` syntax, or a whole CNP) and forwarded to UPSTREAM, or answered
    /// `403 Access denied`. Without --policy every request is allowed. Allowed requests
    /// then run through the --filter Wasm modules (proxy-wasm), in order. One access record
    /// per request is printed to stdout, naming what each filter did.
    Proxy(ProxyArgs),
    /// Policies: validate, resolve and trace files offline; list, apply and delete the
    /// agent's policies.
    Policy {
        #[command(flatten)]
        agent: membrane_agent::agent_cmd::AgentSocket,
        #[command(subcommand)]
        command: PolicyCli,
    },
    /// The node in a box: network namespaces with pods, the datapath, real traffic.
    Lab {
        #[command(subcommand)]
        command: LabCommand,
    },
}

#[cfg(feature = "proxy")]
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
    Offline(membrane_agent::policy_cmd::PolicyCommand),
    #[command(flatten)]
    Agent(membrane_agent::agent_cmd::PolicyAgentCommand),
}

#[cfg(feature = "proxy")]
#[derive(clap::Args)]
struct ProxyArgs {
    /// Address to listen on, e.g. 127.0.0.1:8080.
    #[arg(long)]
    listen: std::net::SocketAddr,
    /// Upstream to forward allowed requests to, e.g. 127.0.0.1:9000.
    #[arg(long)]
    upstream: std::net::SocketAddr,
    /// YAML file with HTTP rules (a list in `rules.http` syntax, or CiliumNetworkPolicy
    /// documents whose `toPorts[].rules.http` are collected).
    #[arg(long)]
    policy: Option<std::path::PathBuf>,
    /// A proxy-wasm filter (ABI 0.2.1/0.2.0, e.g. built for wasm32-wasip1) every allowed
    /// request runs through; repeatable, applied in the order given. `=CONFIG_FILE` passes
    /// the file's bytes as the plugin configuration (`proxy_on_configure`). On SIGHUP, or
    /// when a module or configuration file changes, the whole chain is rebuilt off the data
    /// path and swapped in only if every filter loads; otherwise the last good one keeps
    /// serving.
    #[arg(long = "filter", value_name = "MODULE.wasm[=CONFIG_FILE]")]
    filters: Vec<String>,
    /// Names an upstream filters may call with `proxy_http_call` (Envoy's cluster name):
    /// NAME=IP:PORT, repeatable. Calls to other names fail with BAD_ARGUMENT.
    #[arg(long = "filter-upstream", value_name = "NAME=IP:PORT")]
    filter_upstreams: Vec<String>,
    /// Threads serving connections (tokio workers). Default: one per CPU this process may
    /// run on (its affinity mask, so `taskset -c 0 membrane proxy ...` gets one). 1 runs
    /// tokio's single-threaded scheduler, the cheapest per request on one core.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    workers: Option<u16>,
}

#[derive(Subcommand)]
enum LabCommand {
    /// Build the node in a box: a node namespace with the topology's pods (by default the
    /// seed guide's: frontend, backend and api serving HTTP on 8080, external-client,
    /// kube-system/kube-dns), world hosts behind an uplink (github, slack, aws in the
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
    Serve {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        body: String,
        /// Answer 200 only under these path prefixes (404 otherwise).
        #[arg(long = "path-prefix")]
        paths: Vec<String>,
    },
    /// The lab's cluster DNS (started inside the DNS pod by `lab up`).
    #[command(hide = true)]
    DnsServe {
        #[arg(long)]
        zone: std::path::PathBuf,
        #[arg(long, default_value = "0.0.0.0:53")]
        listen: std::net::SocketAddr,
    },
}

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Bpf(args) => membrane_agent::bpf_cmd::run(args)?,
        #[cfg(feature = "proxy")]
        Command::Proxy(args) => run_proxy(args)?,
        Command::Connectivity {
            command: ConnectivityCommand::Test { keep },
        } => {
            let (_, failed) = membrane_agent::connectivity::run(keep)?;
            if failed > 0 {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Status(target) => membrane_agent::agent_cmd::status(&target)?,
        Command::Endpoint { target, .. } => membrane_agent::agent_cmd::endpoints(&target)?,
        Command::Identity { target, .. } => membrane_agent::agent_cmd::identities(&target)?,
        #[cfg(feature = "proxy")]
        Command::Filter {
            command: FilterCommand::Check { module, output },
        } => {
            if !filter_check(&module, output == "json")? {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Fqdn { target, .. } => membrane_agent::agent_cmd::fqdn_cache(&target)?,
        Command::Observe { args } => return membrane_agent::agent_cmd::observe_hubble(&args),
        Command::Policy { agent, command } => match command {
            PolicyCli::Offline(command) => return membrane_agent::policy_cmd::run(command),
            PolicyCli::Agent(command) => membrane_agent::agent_cmd::policy(&agent, command)?,
        },
        Command::Lab { command } => match command {
            LabCommand::Up {
                topology,
                no_policies,
                ui_listen,
                no_ui,
            } => membrane_agent::lab::up(&membrane_agent::lab::UpOptions {
                topology,
                policies: !no_policies,
                ui: match (ui_listen, no_ui) {
                    (_, true) => membrane_agent::lab::UiListen::Off,
                    (Some(addr), false) => membrane_agent::lab::UiListen::Addr(addr),
                    (None, false) => membrane_agent::lab::UiListen::Default,
                },
            })?,
            LabCommand::Demo => membrane_agent::lab::demo()?,
            LabCommand::Exec { pod, command } => {
                let code = membrane_agent::lab::exec(&pod, &command)?;
                return Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)));
            }
            LabCommand::Down => {
                let removed = membrane_agent::lab::down()?;
                if removed.is_empty() {
                    println!("nothing to remove");
                }
                for r in removed {
                    println!("removed {r}");
                }
            }
            LabCommand::Serve { port, body, paths } => {
                membrane_agent::lab::serve(port, &body, &paths)?
            }
            LabCommand::DnsServe { zone, listen } => membrane_agent::lab::dns_serve(&zone, listen)?,
        },
    }
    Ok(ExitCode::SUCCESS)
}

/// `membrane filter check`; false when the module would not load.
#[cfg(feature = "proxy")]
fn filter_check(path: &std::path::Path, json: bool) -> anyhow::Result<bool> {
    use membrane_filters::{FilterHost, HostConfig, ImportStatus};
    let bytes =
        std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
    let host = FilterHost::new(HostConfig::default())?;
    let report = host
        .inspect(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let status = |s: ImportStatus| match s {
        ImportStatus::Provided => "provided",
        ImportStatus::TrapsIfCalled => "not provided (traps if called)",
        ImportStatus::Missing => "MISSING (the module does not load)",
    };
    if json {
        let value = serde_json::json!({
            "module": path.display().to_string(),
            "sha256": report.sha256,
            "abi": report.abi.as_ref().ok().map(|a| a.as_str()),
            "abi_error": report.abi.as_ref().err(),
            "imports": report.imports.iter().map(|i| serde_json::json!({
                "module": i.module, "name": i.name, "status": status(i.status),
            })).collect::<Vec<_>>(),
            "exports": report.exports,
            "link_error": report.link_error,
            "loadable": report.loadable(),
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!("module:  {}", path.display());
        println!("sha256:  {}", report.sha256);
        match &report.abi {
            Ok(abi) => println!("ABI:     proxy-wasm {}", abi.as_str()),
            Err(e) => println!("ABI:     unsupported ({e}; membrane runs 0.2.1 and 0.2.0)"),
        }
        println!("imports:");
        for i in &report.imports {
            println!("  {}::{}  {}", i.module, i.name, status(i.status));
        }
        println!("exports: {}", report.exports.join(", "));
        if let Some(e) = &report.link_error {
            println!("link:    {e}");
        }
        println!(
            "{}",
            if report.loadable() {
                "loads: yes"
            } else {
                "loads: NO"
            }
        );
    }
    Ok(report.loadable())
}

#[cfg(feature = "proxy")]
fn run_proxy(args: ProxyArgs) -> anyhow::Result<()> {
    use membrane_l7proxy::{access, policy_file, standalone};
    // Filter logs, reload results and proxy warnings go to stderr (records go to stdout).
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MEMBRANE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .try_init();
    let mut config = standalone::StandaloneConfig::new(args.listen, args.upstream);
    if let Some(path) = &args.policy {
        config.policy = Some(policy_file::load_policy_file(path)?);
    }
    let (log, mut records) = access::AccessLog::channel(access::DEFAULT_CHANNEL_CAPACITY);
    config.access_log = log;
    let filters = membrane_agent::wasm_filters::from_args(&args.filters, &args.filter_upstreams)?;
    if let Some(set) = &filters {
        config.filters = Some(set.clone());
    }
    let mut runtime = match args.workers {
        // One worker: the single-threaded scheduler, without the multi-threaded one's
        // work-stealing queues and cross-thread wake-ups (nothing here blocks in place).
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(workers) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(usize::from(workers));
            builder
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = runtime.enable_all().build()?;
    runtime.block_on(async move {
        tokio::spawn(async move {
            use std::io::Write as _;
            // Whatever is queued is written as one batch, then flushed: one write(2) per
            // batch instead of one per line (stdout's line buffering), and nothing waits
            // once the queue is empty.
            let mut out = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout());
            while let Some(record) = records.recv().await {
                let _ = writeln!(out, "{record}");
                while let Ok(record) = records.try_recv() {
                    let _ = writeln!(out, "{record}");
                }
                let _ = out.flush();
            }
        });
        if let Some(set) = filters {
            membrane_agent::wasm_filters::reload_on_sighup(set)?;
        }
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        standalone::run(config, shutdown).await?;
        anyhow::Ok(())
    })?;
    Ok(())
}
