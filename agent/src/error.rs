//! The agent's errors: one variant per failure, each naming what it was about and keeping
//! its source.

use std::net::{Ipv4Addr, SocketAddr};

use membrane_datapath::DatapathError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{what}: {source}")]
    Datapath {
        what: String,
        #[source]
        source: Box<DatapathError>,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {detail}")]
    Config { what: String, detail: String },
    #[error("flow pipeline: {0}")]
    FlowPipeline(#[source] membrane_observer::ConfigError),
    #[error("Hubble API on {path}: {source}")]
    Hubble {
        path: std::path::PathBuf,
        #[source]
        source: membrane_observer::ServeError,
    },
    #[error("name and namespace are required")]
    EndpointUnnamed,
    #[error("already registered with different settings (endpoint {id}); delete it first")]
    EndpointConflict { id: u32 },
    #[error("address {ipv4} or interface {ifname} already belongs to {owner}")]
    EndpointClash {
        ipv4: Ipv4Addr,
        ifname: String,
        owner: String,
    },
    #[error("no such endpoint")]
    NoSuchEndpoint,
    #[error("label `{0}` is not key=value")]
    LabelNotKeyValue(String),
    #[error("labels: {0}")]
    Labels(#[source] membrane_policy::LabelError),
    #[error("identity: {0}")]
    Identity(#[source] membrane_policy::IdentityError),
    #[error("interface name `{0}` has a NUL byte")]
    InterfaceName(String),
    #[error("no interface {ifname} in {netns}")]
    NoInterface { ifname: String, netns: String },
    #[error("policy map entry: {0}")]
    PolicyEntry(#[source] crate::datapath_sync::SyncError),
    #[error("encode {what}: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0}")]
    PolicyInput(#[source] PolicyInputError),
    #[error("applied, but not saved for restarts: {0}")]
    NotSaved(#[source] Box<AgentError>),
    #[error(
        "flow page on {0}: it has no authentication; give a loopback address such as 127.0.0.1:9966"
    )]
    UiNotLoopback(SocketAddr),
    /// Boxed: the store's errors carry etcd's, and every `Result` of the agent pays for
    /// the largest variant.
    #[error("{0}")]
    Cluster(#[source] Box<crate::cluster::ClusterError>),
}

impl From<crate::cluster::ClusterError> for AgentError {
    fn from(e: crate::cluster::ClusterError) -> Self {
        AgentError::Cluster(Box::new(e))
    }
}

pub(crate) fn dp_err(what: impl Into<String>) -> impl FnOnce(DatapathError) -> AgentError {
    let what = what.into();
    move |source| AgentError::Datapath {
        what,
        source: Box::new(source),
    }
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
    let what = what.into();
    move |source| AgentError::Io { what, source }
}

/// Why a policy text (a file of the watched directory, or an API apply) was refused whole.
#[derive(Debug, thiserror::Error)]
pub enum PolicyInputError {
    #[error("{0}")]
    Policy(#[source] membrane_policy::PolicyError),
    /// A `WasmFilter` document; the message names the document and field.
    #[error("{0}")]
    Filter(String),
    #[error("{path}: {source}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}
