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
    /// Inspect the datapath's pinned maps (policy, conntrack, ipcache, endpoints, metrics).
    Bpf(membrane_agent::bpf_cmd::BpfArgs),
    /// The node in a box: network namespaces with pods, the datapath, real traffic.
    Lab {
        #[command(subcommand)]
        command: LabCommand,
    },
}

#[derive(Subcommand)]
enum LabCommand {
    /// Build the node in a box: a node namespace with pods `frontend` and `backend`, the
    /// datapath (pinned, so it keeps enforcing after this command exits), one policy
    /// (backend accepts only frontend on 8080/TCP) and HTTP servers on backend :8080 and
    /// :9090. Idempotent. Needs root.
    Up,
    /// Bring the lab up if needed, then show an allowed (frontend -> backend:8080) and a
    /// dropped (frontend -> backend:9090) connection with the flow events and counters
    /// they produced. The lab stays up.
    Demo,
    /// Run a command inside a pod: `membrane lab exec frontend -- curl -s 10.200.0.20:8080`.
    /// POD is `name` (namespace default) or `namespace/name`.
    Exec {
        pod: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Stop the lab's servers and remove every lab namespace, pin and state file
    /// (idempotent).
    Down,
    /// The lab's HTTP server (started inside a pod by `lab up`).
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        body: String,
    },
}

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Bpf(args) => membrane_agent::bpf_cmd::run(args)?,
        Command::Lab { command } => match command {
            LabCommand::Up => membrane_agent::lab::up()?,
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
            LabCommand::Serve { port, body } => membrane_agent::lab::serve(port, &body)?,
        },
    }
    Ok(ExitCode::SUCCESS)
}
