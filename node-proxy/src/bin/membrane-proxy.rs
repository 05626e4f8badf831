//! `membrane-proxy`: the node's transparent L7 proxy. Thin: parses its command line
//! (`membrane_agent_api::args::ProxyArgs`, which the agent renders when it starts one), sets up
//! logging and the shutdown signal, calls `membrane_node_proxy::process::run`.

use clap::Parser as _;
use membrane_agent_api::{args::ProxyArgs, shutdown::Shutdown};
use membrane_node_proxy::process::{ProxySettings, run};

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MEMBRANE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .json()
        .init();
    let args = ProxyArgs::parse();
    let shutdown = Shutdown::on_signals()?;
    run(ProxySettings::from_args(args), shutdown)
}
