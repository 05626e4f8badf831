//! `membrane-relay`: parses [`RelayArgs`], binds, serves until SIGTERM or SIGINT.

use anyhow::Context as _;
use clap::Parser as _;
use membrane_relay::RelayArgs;

fn main() -> anyhow::Result<()> {
    let args = RelayArgs::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MEMBRANE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("membrane-relay")
        .enable_all()
        .build()
        .context("start the async runtime")?;
    runtime.block_on(async move {
        let addr = args.listen_address;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("bind the relay to {addr} (--listen-address)"))?;
        let bound = listener.local_addr().context("the relay's bound address")?;
        // The one line on stdout: where the relay serves (port 0 picks one), for whoever
        // started it.
        println!("membrane-relay: serving observer.Observer on {bound}");
        tracing::info!(%bound, peers = %args.peer_service.join(","), "relay serving");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("install the SIGTERM handler")?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        membrane_relay::serve(args, listener, shutdown).await?;
        Ok(())
    })
}
