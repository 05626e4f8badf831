//! `membrane-agent`: the node agent. Thin: parses flags, sets up logging and signals, calls
//! `membrane_agent::daemon::run`.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use clap::Parser;
use membrane_agent::daemon::{AgentConfig, run};

#[derive(Parser)]
#[command(
    name = "membrane-agent",
    version,
    about = "membrane's node agent: endpoints, identities, policy and flows for one node's datapath"
)]
struct Args {
    /// Run name: maps and links are pinned under /sys/fs/bpf/membrane/NAME, state and the API
    /// socket live under /run/membrane/NAME.
    #[arg(long, default_value = "membrane-lab")]
    name: String,
    /// The node network namespace the agent runs in (programs are attached inside it).
    #[arg(long)]
    node_netns: String,
    /// Directory of policy files (YAML or JSON, multi-document) to watch, like Cilium's static
    /// policy path. A file that does not parse keeps its previous version in force.
    #[arg(long)]
    policy_dir: Option<PathBuf>,
    /// Proxy port for HTTP redirects.
    #[arg(long, default_value_t = 15001)]
    http_proxy_port: u16,
    /// Proxy port for DNS redirects.
    #[arg(long, default_value_t = 15053)]
    dns_proxy_port: u16,
    /// Flow events kept in memory.
    #[arg(long, default_value_t = 4095)]
    flow_capacity: usize,
    #[command(flatten)]
    dns: membrane_agent::daemon::DnsSettings,
    /// Serve the flow page (http://ADDR/ui: live flow table with filters, service map) and its
    /// JSON (/api/flows, /api/map) on this loopback address of the host, e.g. 127.0.0.1:9966
    /// (port 0 picks one; the address is written to /run/membrane/NAME/ui-addr). Off unless
    /// given; `membrane lab up` turns it on.
    #[arg(long, value_name = "ADDR", conflicts_with = "ui_listen_fd")]
    ui_listen: Option<std::net::SocketAddr>,
    /// The flow page on an inherited listening socket (how `membrane lab up` hands over the
    /// one it bound).
    #[arg(long, value_name = "FD", hide = true)]
    ui_listen_fd: Option<i32>,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MEMBRANE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .json()
        .init();
    let args = Args::parse();
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    let mut config = AgentConfig::new(&args.name, &args.node_netns);
    config.policy_dir = args.policy_dir;
    config.http_proxy_port = args.http_proxy_port;
    config.dns_proxy_port = args.dns_proxy_port;
    config.flow_capacity = args.flow_capacity;
    config.dns = args.dns;
    config.ui_listen = args.ui_listen;
    config.ui_listen_fd = args.ui_listen_fd;
    // The flag is a static; hand the loop an Arc that mirrors it.
    let stop = Arc::new(AtomicBool::new(false));
    let mirror = stop.clone();
    std::thread::spawn(move || {
        while !STOP.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        mirror.store(true, Ordering::SeqCst);
    });
    run(config, stop)?;
    Ok(())
}
