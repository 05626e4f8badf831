//! `membrane-cni`'s errors: one variant per failure, each with the CNI spec's error code and
//! a message naming what failed (printed as the spec's error result on stdout).

use std::path::PathBuf;

use serde::Serialize;

/// CNI spec error codes (SPEC.md §"Error"); 100 and up are this plugin's.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot serve ADD.
    pub const NOT_AVAILABLE: u32 = 50;
    /// The agent refused a request (the message has its reason).
    pub const AGENT_REFUSED: u32 = 100;
    /// The pod's label annotation is malformed.
    pub const BAD_POD_LABELS: u32 = 101;
    /// CHECK found the attachment not as ADD left it.
    pub const CHECK_FAILED: u32 = 102;
}

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("CNI version `{version}` is not supported (membrane-cni speaks {supported})")]
    UnsupportedVersion { version: String, supported: String },
    #[error("environment variable {var} is required for {command}")]
    MissingEnv { var: &'static str, command: String },
    #[error("environment variable {var}=`{value}`: {why}")]
    BadEnv {
        var: &'static str,
        value: String,
        why: String,
    },
    #[error("CNI_ARGS: {key} is required (the runtime passes the pod's namespace and name)")]
    MissingPodArg { key: &'static str },
    #[error("network configuration on stdin is not JSON: {0}")]
    Decode(#[source] serde_json::Error),
    #[error("network configuration: {what}")]
    Config { what: String },
    #[error("network configuration: `{key}` is not supported by membrane-cni ({why})")]
    Unsupported { key: String, why: &'static str },
    #[error("the membrane agent at {socket} is not reachable ({reason}); try again once it runs")]
    AgentUnreachable { socket: PathBuf, reason: String },
    #[error("the membrane agent is not ready: {why}")]
    AgentNotReady { why: String },
    #[error("{what}: the agent refused: {message}")]
    AgentRefused { what: String, message: String },
    #[error("{what}: {reason}")]
    Plumbing { what: String, reason: String },
    #[error("annotation {annotation}: `{item}` is not key=value")]
    PodLabels {
        annotation: &'static str,
        item: String,
    },
    #[error("CHECK: {0}")]
    Check(String),
    #[error("STATUS: {0}")]
    NotAvailable(String),
}

impl CniError {
    pub fn code(&self) -> u32 {
        use code::*;
        match self {
            CniError::UnsupportedVersion { .. } => INCOMPATIBLE_VERSION,
            CniError::MissingEnv { .. }
            | CniError::BadEnv { .. }
            | CniError::MissingPodArg { .. } => INVALID_ENV,
            CniError::Decode(_) => DECODE_FAILURE,
            CniError::Config { .. } => INVALID_CONFIG,
            CniError::Unsupported { .. } => UNSUPPORTED_FIELD,
            CniError::AgentUnreachable { .. } | CniError::AgentNotReady { .. } => TRY_AGAIN_LATER,
            CniError::AgentRefused { .. } => AGENT_REFUSED,
            CniError::Plumbing { .. } => IO_FAILURE,
            CniError::PodLabels { .. } => BAD_POD_LABELS,
            CniError::Check(_) => CHECK_FAILED,
            CniError::NotAvailable(_) => NOT_AVAILABLE,
        }
    }

    /// The spec's error result.
    pub fn to_result(&self, cni_version: &str) -> ErrorResult {
        ErrorResult {
            cni_version: cni_version.to_owned(),
            code: self.code(),
            msg: self.to_string(),
            details: std::error::Error::source(self)
                .map(|s| s.to_string())
                .unwrap_or_default(),
        }
    }
}

/// `{cniVersion, code, msg, details}`.
#[derive(Debug, Serialize)]
pub struct ErrorResult {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}
