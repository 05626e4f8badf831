//! The agent's local API: JSON lines over a Unix socket (`/run/membrane/<name>/agent.sock`),
//! one request and one response per line. The CLI (`membrane status`, `endpoint list`,
//! `identity list`, `policy list|apply|delete`, `lab`) is its only client today.
//!
//! Every response is `{"ok": true, "data": ...}` or `{"ok": false, "error": "..."}`; errors
//! name the input that was wrong (file, resource, field) so the CLI can print them as they
//! are.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::Ipv4Addr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// File name of the API socket inside the agent's state directory.
pub const SOCKET_NAME: &str = "agent.sock";

/// An endpoint as the lab (or a CNI) registers it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    pub name: String,
    pub namespace: String,
    /// Pod labels, `key=value` (the agent adds the namespace label and the `k8s:` source).
    pub labels: Vec<String>,
    pub ipv4: Ipv4Addr,
    /// Host-side veth inside the node namespace.
    pub host_ifname: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    EndpointAdd {
        endpoint: EndpointSpec,
    },
    EndpointDelete {
        namespace: String,
        name: String,
    },
    EndpointList,
    IdentityList,
    PolicyList,
    /// Adds or replaces every policy in `text` (YAML or JSON, multi-document); `source`
    /// names it in errors.
    PolicyApply {
        text: String,
        source: String,
    },
    /// `kind` is CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy or NetworkPolicy.
    PolicyDelete {
        kind: String,
        namespace: Option<String>,
        name: String,
    },
    /// From the DNS proxy: an allowed answer gave `name` these addresses. Answered once
    /// the addresses' `fqdn:` identities are in the ipcache and policy maps (the proxy
    /// holds the answer until then).
    FqdnLearn {
        name: String,
        ips: Vec<crate::daemon::LearnedAddress>,
    },
    /// The FQDN cache: name, address, remaining TTL, identity.
    FqdnCacheList,
    /// The last `last` datapath flow events the agent kept.
    Flows {
        last: usize,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn ok(data: serde_json::Value) -> Self {
        Self {
            ok: true,
            data: Some(data),
            error: None,
        }
    }

    pub fn err(error: impl Into<String>) -> Self {
        Self {
            ok: false,
            data: None,
            error: Some(error.into()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "cannot reach the agent at {path}: {source} (is it running? `membrane lab up` starts one)"
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("agent API at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("agent API at {path}: malformed response: {detail}")]
    Protocol { path: PathBuf, detail: String },
    #[error("{0}")]
    Agent(String),
}

/// Sends one request and returns the response's data (or the agent's error).
pub fn call(socket: &Path, request: &Request) -> Result<serde_json::Value, ApiError> {
    let io = |source| ApiError::Io {
        path: socket.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| ApiError::Connect {
        path: socket.to_owned(),
        source,
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io)?;
    let mut line = serde_json::to_vec(request).map_err(|e| ApiError::Protocol {
        path: socket.to_owned(),
        detail: e.to_string(),
    })?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).map_err(io)?;
    let response: Response = serde_json::from_str(&reply).map_err(|e| ApiError::Protocol {
        path: socket.to_owned(),
        detail: e.to_string(),
    })?;
    if response.ok {
        Ok(response.data.unwrap_or(serde_json::Value::Null))
    } else {
        Err(ApiError::Agent(
            response.error.unwrap_or_else(|| "unknown error".into()),
        ))
    }
}
