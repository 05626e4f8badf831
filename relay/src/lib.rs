//! `membrane-relay`: Hubble Relay for membrane. One observer API (`observer.Observer` on
//! 4245) for the whole cluster: it discovers the nodes through a Hubble Peer service (every
//! agent serves one, from the cluster store's node registrations), keeps a connection to
//! every node's observer (plain, or mutual TLS when configured) and fans requests out,
//! merging GetFlows in time order with a bounded sort window (reference `cluster.md` §4).
//!
//! - [`args`]: the command line ([`RelayArgs`], rendered by whoever starts the relay);
//! - [`peers`]: discovery and the per-node connections and health;
//! - [`flows`]: GetFlows fan-out and merge;
//! - [`server`]: the observer service, health and metrics.
//!
//! A node that is down or slow never stalls the others: each node has its own stream into
//! the merge, a hung node is bounded by the idle timeout (without follow) or the sort
//! window's drain timeout (with follow), and every response says which nodes take part.
//!
//! Depends on `membrane-observer` for the protocol types and filter checks only; never on
//! the agent, the datapath or the lab.

pub mod args;
pub mod flows;
pub mod peers;
pub mod server;

use std::future::Future;
use std::sync::Arc;

pub use args::RelayArgs;
use tokio_stream::wrappers::TcpListenerStream;

use crate::flows::MergeConfig;
use crate::peers::{Dialer, Peers, PeersError, RelayMetrics};
use crate::server::RelayService;

/// Why the relay stopped.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Peers(#[from] PeersError),
    #[error("cannot bind {what} to {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the relay's gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Serves the relay on `listener` (and metrics, when asked) until `shutdown` completes.
pub async fn serve(
    args: RelayArgs,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RelayError> {
    let metrics = Arc::new(RelayMetrics::default());
    let dialer = Dialer::from_args(&args)?;
    let metrics_listener = match args.metrics_listen_address {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| RelayError::Bind {
                    what: "the metrics listener",
                    addr,
                    source,
                })?,
        ),
        None => None,
    };
    let (peers, discovery) = Peers::start(&args, dialer, metrics.clone());
    let metrics_task = metrics_listener
        .map(|l| tokio::spawn(server::serve_metrics(l, peers.clone(), metrics.clone())));
    let merge = MergeConfig {
        sort_len: args.sort_buffer_len_max.max(1),
        drain_timeout: args.sort_buffer_drain_timeout(),
        idle_timeout: args.request_idle_timeout(),
    };
    let service = RelayService::new(peers, metrics, merge);
    let result = tonic::transport::Server::builder()
        .add_service(membrane_observer::health_service().await)
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await;
    discovery.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    result?;
    Ok(())
}
