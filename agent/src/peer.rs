//! Hubble's Peer service on this node: the set of nodes whose observers a relay should
//! dial, kept from the cluster store's node registrations (`membrane_cluster::NodeRegistry`)
//! and served by `membrane_observer::PeerService` beside the observer.
//!
//! In cluster mode every registered node with a Hubble address is a peer (nodes that
//! registered none cannot be dialled and are left out); the set is rebuilt from the
//! registry's mirror on every node event, so a lagging event channel loses nothing. On a
//! node of its own the set is this node alone, when it has an address to announce.

use std::sync::Arc;

use membrane_observer::peer::{PeerInfo, PeerSet, peer_name};
use tokio::sync::{broadcast, watch};

use crate::{cluster::ClusterClient, config::AgentConfig};

/// The peer set for the Peer service, kept current on `runtime` while the process runs.
pub(crate) fn peer_set(
    runtime: &tokio::runtime::Runtime,
    config: &AgentConfig,
    cluster: Option<&Arc<ClusterClient>>,
) -> watch::Receiver<PeerSet> {
    let Some(cluster) = cluster else {
        let mut set = PeerSet::new();
        if let Some(address) = config.hubble_address() {
            let name = peer_name(&config.cluster.cluster_name, config.node_name());
            set.insert(
                name.clone(),
                PeerInfo {
                    name,
                    address: address.to_string(),
                    tls_server_name: None,
                },
            );
        }
        // The sender is dropped: the set never changes, and streams end only with the client.
        return watch::channel(set).1;
    };
    let cluster = Arc::clone(cluster);
    // Subscribe before the first read, so no change falls between the two.
    let mut events = cluster.nodes().subscribe();
    let (tx, rx) = watch::channel(from_registry(&cluster));
    runtime.spawn(async move {
        loop {
            match events.recv().await {
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            }
            let set = from_registry(&cluster);
            tx.send_if_modified(|current| {
                let changed = *current != set;
                *current = set;
                changed
            });
        }
    });
    rx
}

/// Every registered node with a Hubble address, by peer name.
fn from_registry(cluster: &ClusterClient) -> PeerSet {
    cluster
        .nodes()
        .nodes()
        .into_values()
        .filter_map(|node| {
            let address = node.hubble_address?;
            let name = peer_name(&node.cluster, &node.name);
            Some((
                name.clone(),
                PeerInfo {
                    name,
                    address: address.to_string(),
                    tls_server_name: None,
                },
            ))
        })
        .collect()
}
