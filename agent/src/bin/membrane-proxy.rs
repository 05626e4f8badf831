//! `membrane-proxy`: the node's transparent L7 proxy. Thin: parses flags, sets up logging
//! and signals, calls `membrane_agent::proxy_process::run`. The agent starts and supervises
//! it; see that module for how policy and identities reach it.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use clap::Parser;
use membrane_agent::proxy_process::{DnsListen, ProxySettings, run};

#[derive(Parser)]
#[command(
    name = "membrane-proxy",
    version,
    about = "membrane's transparent L7 proxy for the flows the datapath redirects"
)]
struct Args {
    /// The node network namespace (where redirected flows are delivered).
    #[arg(long)]
    node_netns: String,
    /// Pin directory of the datapath's maps (the ipcache is read for identities).
    #[arg(long)]
    pin_dir: PathBuf,
    /// Where the proxy keeps the last HTTP policy it applied: restored at start, so a
    /// proxy restarted while the agent is away serves by it; rewritten on every change.
    #[arg(long)]
    snapshot: PathBuf,
    /// The agent's proxy channel (a Unix socket): the proxy connects, says what it holds and
    /// is sent the policy (incrementally), the DNS rules and the filters. Without it the
    /// saved configuration is served unchanged.
    #[arg(long)]
    agent_channel: Option<PathBuf>,
    /// Port of the listener for flows leaving local endpoints.
    #[arg(long, default_value_t = 15001)]
    egress_port: u16,
    /// Port of the listener for flows entering local endpoints.
    #[arg(long, default_value_t = 15002)]
    ingress_port: u16,
    /// The agent's record socket (Unix datagram); without it, records go to stdout.
    #[arg(long)]
    records_socket: Option<PathBuf>,
    /// Serve DNS on the inherited descriptors 3 (UDP) and 4 (TCP): the transparent
    /// listeners the agent keeps open across proxy restarts.
    #[arg(long, conflicts_with = "dns_port")]
    dns_fds: bool,
    /// Serve DNS on this port (UDP and TCP, transparent) instead.
    #[arg(long)]
    dns_port: Option<u16>,
    /// Where the proxy keeps the last DNS rules it applied (restored at start).
    #[arg(long)]
    dns_snapshot: Option<PathBuf>,
    #[command(flatten)]
    dns: membrane_agent::daemon::DnsSettings,
    /// Where the proxy keeps the last `WasmFilter` attachments it applied (restored at start).
    #[arg(long)]
    filter_snapshot: Option<PathBuf>,
    /// The agent's API socket: answers with addresses are held until the agent has mapped
    /// them to `fqdn:` identities. Without it, nothing is learned.
    #[arg(long)]
    agent_socket: Option<PathBuf>,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
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
    let stop = Arc::new(AtomicBool::new(false));
    let mirror = stop.clone();
    std::thread::spawn(move || {
        while !STOP.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        mirror.store(true, Ordering::SeqCst);
    });
    run(
        ProxySettings {
            node_netns: args.node_netns,
            pin_dir: args.pin_dir,
            snapshot: args.snapshot,
            agent_channel: args.agent_channel,
            egress_port: args.egress_port,
            ingress_port: args.ingress_port,
            records_socket: args.records_socket,
            dns: match (args.dns_fds, args.dns_port) {
                (true, _) => DnsListen::Inherited,
                (false, Some(port)) => DnsListen::Port(port),
                (false, None) => DnsListen::None,
            },
            dns_snapshot: args.dns_snapshot,
            agent_socket: args.agent_socket,
            filter_snapshot: args.filter_snapshot,
            dns_settings: args.dns,
        },
        stop,
    )
}
