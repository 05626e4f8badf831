//! Hubble's Peer service (`peer.Peer/Notify`): every node's name and observer address, then
//! the changes as nodes join, change and leave (reference `cluster.md` §4.1). The relay
//! discovers the cluster through it.
//!
//! The service reads a [`PeerSet`] (a `watch` of the whole set, kept by whoever knows the
//! nodes: the agent's cluster store client); each stream diffs the set it last sent against
//! the current one, so a burst of changes is never queued and never lost, only coalesced.

use std::collections::BTreeMap;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

use crate::proto::peer::peer_server::{self, PeerServer};
use crate::proto::peer::{ChangeNotification, ChangeNotificationType, NotifyRequest, Tls};

/// The cluster name under which peers are named by their node name alone (Cilium's default).
pub const DEFAULT_CLUSTER: &str = "default";

/// Notifications buffered per stream before the sender waits for the client.
const NOTIFY_BUFFER: usize = 64;

/// One node as the Peer service announces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// [`peer_name`] of the node.
    pub name: String,
    /// Where its observer listens (`host:port`).
    pub address: String,
    /// The name its observer's certificate carries, when it serves TLS.
    pub tls_server_name: Option<String>,
}

/// Every peer by name; the sender side is kept by whoever knows the nodes.
pub type PeerSet = BTreeMap<String, PeerInfo>;

/// Hubble's peer name: the node's name, `<cluster>/<node>` outside the default cluster.
pub fn peer_name(cluster: &str, node: &str) -> String {
    if cluster.is_empty() || cluster == DEFAULT_CLUSTER {
        node.to_owned()
    } else {
        format!("{cluster}/{node}")
    }
}

/// The TLS server name of a node's observer: `<node>.<cluster>.hubble-grpc.cilium.io`, dots
/// inside the names replaced by `-` (Cilium's `TLSServerName`).
pub fn tls_server_name(cluster: &str, node: &str) -> String {
    let cluster = if cluster.is_empty() {
        DEFAULT_CLUSTER
    } else {
        cluster
    };
    format!(
        "{}.{}.hubble-grpc.cilium.io",
        node.replace('.', "-"),
        cluster.replace('.', "-")
    )
}

/// The `peer.Peer` implementation over a [`PeerSet`].
#[derive(Clone)]
pub struct PeerService {
    peers: watch::Receiver<PeerSet>,
}

impl PeerService {
    pub fn new(peers: watch::Receiver<PeerSet>) -> Self {
        Self { peers }
    }

    pub fn into_server(self) -> PeerServer<PeerService> {
        PeerServer::new(self)
    }
}

fn notification(peer: &PeerInfo, kind: ChangeNotificationType) -> ChangeNotification {
    ChangeNotification {
        name: peer.name.clone(),
        address: peer.address.clone(),
        r#type: kind as i32,
        tls: peer.tls_server_name.as_ref().map(|server_name| Tls {
            server_name: server_name.clone(),
        }),
    }
}

/// What changed from `old` to `new`, in name order: deletions first, so that a client
/// applying them in order never holds two entries for one address.
pub fn changes(old: &PeerSet, new: &PeerSet) -> Vec<ChangeNotification> {
    let mut out = Vec::new();
    for (name, peer) in old {
        if !new.contains_key(name) {
            out.push(notification(peer, ChangeNotificationType::PeerDeleted));
        }
    }
    for (name, peer) in new {
        match old.get(name) {
            None => out.push(notification(peer, ChangeNotificationType::PeerAdded)),
            Some(before) if before != peer => {
                out.push(notification(peer, ChangeNotificationType::PeerUpdated));
            }
            Some(_) => {}
        }
    }
    out
}

async fn notify_loop(
    mut peers: watch::Receiver<PeerSet>,
    tx: mpsc::Sender<Result<ChangeNotification, Status>>,
) {
    let mut sent = PeerSet::new();
    loop {
        let now = peers.borrow_and_update().clone();
        for change in changes(&sent, &now) {
            if tx.send(Ok(change)).await.is_err() {
                return; // The client went away.
            }
        }
        sent = now;
        tokio::select! {
            changed = peers.changed() => {
                if changed.is_err() {
                    return; // Whoever kept the set is gone: end the stream.
                }
            }
            () = tx.closed() => return,
        }
    }
}

#[tonic::async_trait]
impl peer_server::Peer for PeerService {
    async fn notify(
        &self,
        _request: Request<NotifyRequest>,
    ) -> Result<Response<BoxStream<ChangeNotification>>, Status> {
        let (tx, rx) = mpsc::channel(NOTIFY_BUFFER);
        tokio::spawn(notify_loop(self.peers.clone(), tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio_stream::StreamExt as _;

    use super::*;
    use crate::proto::peer::peer_server::Peer as _;

    fn info(name: &str, address: &str) -> PeerInfo {
        PeerInfo {
            name: name.to_owned(),
            address: address.to_owned(),
            tls_server_name: None,
        }
    }

    #[test]
    fn names() {
        assert_eq!(peer_name("default", "n1"), "n1");
        assert_eq!(peer_name("", "n1"), "n1");
        assert_eq!(peer_name("prod", "n1"), "prod/n1");
        assert_eq!(
            tls_server_name("my.cluster", "node.a"),
            "node-a.my-cluster.hubble-grpc.cilium.io"
        );
    }

    #[tokio::test]
    async fn notify_sends_all_then_changes() {
        let (tx, rx) = watch::channel(PeerSet::from([
            ("a".to_owned(), info("a", "10.0.0.1:4244")),
            ("b".to_owned(), info("b", "10.0.0.2:4244")),
        ]));
        let mut stream = PeerService::new(rx)
            .notify(Request::new(NotifyRequest {}))
            .await
            .expect("stream")
            .into_inner();
        let mut next = async || {
            tokio::time::timeout(Duration::from_secs(5), stream.next())
                .await
                .expect("in time")
                .expect("open")
                .expect("ok")
        };
        let got = [next().await, next().await];
        assert_eq!(
            got.iter()
                .map(|c| (c.name.as_str(), c.r#type))
                .collect::<Vec<_>>(),
            [
                ("a", ChangeNotificationType::PeerAdded as i32),
                ("b", ChangeNotificationType::PeerAdded as i32)
            ]
        );
        tx.send_modify(|set| {
            set.remove("a");
            set.insert("b".to_owned(), info("b", "10.0.0.9:4244"));
            set.insert("c".to_owned(), info("c", "10.0.0.3:4244"));
        });
        let got = [next().await, next().await, next().await];
        assert_eq!(
            got.iter()
                .map(|c| (c.name.as_str(), c.r#type, c.address.as_str()))
                .collect::<Vec<_>>(),
            [
                (
                    "a",
                    ChangeNotificationType::PeerDeleted as i32,
                    "10.0.0.1:4244"
                ),
                (
                    "b",
                    ChangeNotificationType::PeerUpdated as i32,
                    "10.0.0.9:4244"
                ),
                (
                    "c",
                    ChangeNotificationType::PeerAdded as i32,
                    "10.0.0.3:4244"
                ),
            ]
        );
    }
}
