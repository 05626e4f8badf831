//! `membrane-agent`: the node agent. Thin: parses its command line
//! (`membrane_agent_api::args::AgentArgs`, which the lab renders when it starts one), sets up
//! logging and the shutdown signal, calls `membrane_agent::run`.

use clap::Parser as _;
use membrane_agent::{AgentConfig, run};
use membrane_agent_api::{args::AgentArgs, shutdown::Shutdown};

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MEMBRANE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .json()
        .init();
    let args = AgentArgs::parse();
    let shutdown = Shutdown::on_signals()?;
    run(AgentConfig::from_args(args), shutdown)?;
    Ok(())
}
