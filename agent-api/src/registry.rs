//! The endpoint registry: every endpoint the agent manages, as it saves them in
//! `endpoints.json` of its run directory (what a restarted agent takes over) and as
//! `membrane endpoint list` and the `bpf` views read them.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::RunDir;

/// One endpoint of a run.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RegisteredEndpoint {
    pub name: String,
    pub namespace: String,
    pub endpoint_id: u32,
    pub identity: u32,
    pub ipv4: Ipv4Addr,
    pub host_ifname: String,
    /// Security-relevant labels, `source:key=value`.
    pub labels: Vec<String>,
}

/// The run's registry; empty when there is none or it does not parse (a registry is
/// rewritten whole on every change, so a partial one cannot be read).
pub fn read(run: &RunDir) -> Vec<RegisteredEndpoint> {
    std::fs::read(run.endpoints())
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}
