//! `membrane`: the command-line interface. Thin: parses arguments, calls `membrane_agent`.

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
    /// The node in a box: network namespaces with pods, the datapath, real traffic.
    Lab {
        #[command(subcommand)]
        command: LabCommand,
    },
}

#[derive(Subcommand)]
enum LabCommand {
    /// Build a node namespace with pods `frontend` and `backend`, enforce one policy
    /// (backend accepts only frontend on 8080/TCP), show an allowed and a dropped
    /// connection with the datapath's counters, then tear everything down. Needs root.
    Demo,
    /// Remove every lab namespace and the lab's pinned maps (idempotent).
    Down,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Lab {
            command: LabCommand::Demo,
        } => membrane_agent::lab::demo()?,
        Command::Lab {
            command: LabCommand::Down,
        } => {
            let removed = membrane_agent::lab::down()?;
            if removed.is_empty() {
                println!("nothing to remove");
            }
            for r in removed {
                println!("removed {r}");
            }
        }
    }
    Ok(())
}
