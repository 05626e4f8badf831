//! `membrane proxy` (the L7 proxy standalone: a reverse proxy with HTTP rules and Wasm
//! filters, or with `--tcp` a TCP relay with TCP (stream) filters) and `membrane filter
//! check`.

#[derive(clap::Args)]
pub struct ProxyArgs {
    /// Address to listen on, e.g. 127.0.0.1:8080.
    #[arg(long)]
    pub listen: std::net::SocketAddr,
    /// Upstream to forward allowed requests (with --tcp: every connection) to, e.g.
    /// 127.0.0.1:9000.
    #[arg(long)]
    pub upstream: std::net::SocketAddr,
    /// YAML file with HTTP rules (a list in `rules.http` syntax, or CiliumNetworkPolicy
    /// documents whose `toPorts[].rules.http` are collected). Not with --tcp.
    #[arg(long, conflicts_with = "tcp")]
    pub policy: Option<std::path::PathBuf>,
    /// TCP mode: relay every connection to UPSTREAM byte for byte, through the --filter
    /// modules as TCP (stream) filters (`proxy_on_new_connection`, `_downstream_data`,
    /// `_upstream_data`, `_connection_close`): they may read, rewrite, hold or close the
    /// stream both ways. A module that declares only HTTP callbacks is refused at start.
    /// A connection with no byte moving either way for an hour is closed.
    #[arg(long)]
    pub tcp: bool,
    /// A proxy-wasm filter (ABI 0.2.1/0.2.0, e.g. built for wasm32-wasip1) every allowed
    /// request (with --tcp: every connection) runs through; repeatable, applied in the order
    /// given. `=CONFIG_FILE` passes the file's bytes as the plugin configuration
    /// (`proxy_on_configure`). On SIGHUP, or when a module or configuration file changes,
    /// the whole chain is rebuilt off the data path and swapped in only if every filter
    /// loads; otherwise the last good one keeps serving.
    #[arg(long = "filter", value_name = "MODULE.wasm[=CONFIG_FILE]")]
    pub filters: Vec<String>,
    /// Names an upstream filters may call with `proxy_http_call`, `proxy_grpc_call` or
    /// `proxy_grpc_stream` (Envoy's cluster name): NAME=IP:PORT, repeatable; gRPC goes over
    /// HTTP/2 without TLS (h2c). Calls to other names fail (HTTP: BAD_ARGUMENT, gRPC:
    /// PARSE_FAILURE, as Envoy). Not with --tcp (the TCP relay carries no callouts).
    #[arg(
        long = "filter-upstream",
        value_name = "NAME=IP:PORT",
        conflicts_with = "tcp"
    )]
    pub filter_upstreams: Vec<String>,
    /// Threads serving connections (tokio workers). Default: one per CPU this process may
    /// run on (its affinity mask, so `taskset -c 0 membrane proxy ...` gets one). 1 runs
    /// tokio's single-threaded scheduler, the cheapest per request on one core.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub workers: Option<u16>,
}

/// `membrane filter check`; false when the module would not load.
pub fn filter_check(path: &std::path::Path, json: bool) -> anyhow::Result<bool> {
    use membrane_filters::{FilterHost, HostConfig, ImportStatus};
    let bytes =
        std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
    let host = FilterHost::new(HostConfig::default())?;
    let report = host
        .inspect(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    // Never "provided" for a stub: a partial import says what answers instead.
    let status = |s: ImportStatus| match s {
        ImportStatus::Implemented => "implemented".to_owned(),
        ImportStatus::Partial(note) => format!("partial ({note})"),
        ImportStatus::TrapsIfCalled => "not provided (traps if called)".to_owned(),
        ImportStatus::Missing => "MISSING (the module does not load)".to_owned(),
    };
    let contexts = {
        let c = &report.contexts;
        let mut names = Vec::new();
        if c.http {
            names.push("http");
        }
        if c.tcp {
            names.push("tcp");
        }
        if c.root {
            names.push("root");
        }
        names
    };
    if json {
        let value = serde_json::json!({
            "module": path.display().to_string(),
            "sha256": report.sha256,
            "abi": report.abi.as_ref().ok().map(|a| a.as_str()),
            "abi_error": report.abi.as_ref().err(),
            "imports": report.imports.iter().map(|i| serde_json::json!({
                "module": i.module, "name": i.name, "status": i.status.label(),
                "note": match i.status { ImportStatus::Partial(note) => Some(note), _ => None },
            })).collect::<Vec<_>>(),
            "exports": report.exports,
            "contexts": contexts,
            "uses_grpc": report.uses_grpc,
            "undelivered_callbacks": report.undelivered_callbacks.iter().map(|(name, why)| serde_json::json!({"name": name, "why": why})).collect::<Vec<_>>(),
            "link_error": report.link_error,
            "refusal": report.refusal(),
            "loadable": report.loadable(),
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!("module:   {}", path.display());
        println!("sha256:   {}", report.sha256);
        match &report.abi {
            Ok(abi) => println!("ABI:      proxy-wasm {}", abi.as_str()),
            Err(e) => println!("ABI:      unsupported ({e}; membrane runs 0.2.1 and 0.2.0)"),
        }
        println!("contexts: {}", contexts.join(", "));
        if report.uses_grpc {
            println!("gRPC:     calls gRPC services (upstreams by name, as HTTP callouts)");
        }
        println!("imports:");
        for i in &report.imports {
            println!("  {}::{}  {}", i.module, i.name, status(i.status));
        }
        println!("exports:  {}", report.exports.join(", "));
        for (name, why) in &report.undelivered_callbacks {
            println!("  never called: {name} ({why})");
        }
        if let Some(e) = &report.link_error {
            println!("link:     {e}");
        }
        match report.refusal() {
            None => println!("loads: yes"),
            Some(why) => println!("loads: NO ({why})"),
        }
    }
    Ok(report.loadable())
}

pub fn run_proxy(args: ProxyArgs) -> anyhow::Result<()> {
    use membrane_l7proxy::{access, policy_file, standalone};
    // Filter logs, reload results and proxy warnings go to stderr (records go to stdout).
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MEMBRANE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .try_init();
    if args.tcp {
        return run_tcp_proxy(args);
    }
    let mut config = standalone::StandaloneConfig::new(args.listen, args.upstream);
    if let Some(path) = &args.policy {
        config.policy = Some(policy_file::load_policy_file(path)?);
    }
    let (log, mut records) = access::AccessLog::channel(access::DEFAULT_CHANNEL_CAPACITY);
    config.access_log = log;
    let filters = membrane_node_proxy::wasm::from_args(
        &args.filters,
        &args.filter_upstreams,
        membrane_filters::FilterProtocol::Http,
    )?;
    if let Some(set) = &filters {
        config.filters = Some(set.clone());
    }
    let runtime = runtime(args.workers)?;
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
            membrane_node_proxy::wasm::reload_on_sighup(set)?;
        }
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        standalone::run(config, shutdown).await?;
        anyhow::Ok(())
    })?;
    Ok(())
}

/// `membrane proxy --tcp`: one listener, every connection relayed to the upstream through
/// the TCP filters (as is without any). Ends on Ctrl-C, letting open connections go on for
/// a few seconds.
fn run_tcp_proxy(args: ProxyArgs) -> anyhow::Result<()> {
    use membrane_l7proxy::tcp_filter::{TcpProxy, TcpProxyConfig};
    let filters = membrane_node_proxy::wasm::from_args(
        &args.filters,
        &args.filter_upstreams,
        membrane_filters::FilterProtocol::Tcp,
    )?;
    let mut config = TcpProxyConfig::new(args.listen, args.upstream);
    if let Some(set) = &filters {
        config.filters = Some(set.clone());
    }
    let runtime = runtime(args.workers)?;
    runtime.block_on(async move {
        if let Some(set) = filters {
            membrane_node_proxy::wasm::reload_on_sighup(set)?;
        }
        let proxy = TcpProxy::bind(config).await?;
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        proxy.serve(shutdown).await;
        anyhow::Ok(())
    })?;
    Ok(())
}

/// The runtime of `--workers N`.
fn runtime(workers: Option<u16>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut runtime = match workers {
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
    Ok(runtime.enable_all().build()?)
}
