//! membrane's cluster in a box: a topology ([`topology`], the seed guide's by default) built
//! in network namespaces the run creates, the lab's workloads ([`workload`]: an HTTP server
//! per pod port, the cluster DNS [`lab_dns`]), `membrane-agent` started as a program and
//! driven through its API as a user would ([`lab`]), and the connectivity test built on the
//! same builder ([`connectivity`]).
//!
//! Builds the `deny-path` example filter for wasm32-wasip1 (`build.rs`) and embeds it
//! ([`DENY_PATH_WASM`]); the agent never does.

pub mod connectivity;
pub mod etcd;
pub mod lab;
pub mod lab_dns;
pub mod topology;
pub mod workload;

use std::path::{Path, PathBuf};

use sha2::Digest as _;

/// `examples/filters/deny-path` built for wasm32-wasip1 (by `lab/build.rs`): answers `403`
/// and `Access to <path> is denied by policy` for paths under the prefixes of its
/// configuration (one per line). The connectivity test and the lab attach it.
pub const DENY_PATH_WASM: &[u8] = include_bytes!(env!("MEMBRANE_DENY_PATH_WASM"));

/// Writes [`DENY_PATH_WASM`] to `dir/deny_path.wasm`; returns the path and its sha256.
pub fn install_deny_path(dir: &Path) -> std::io::Result<(PathBuf, String)> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("deny_path.wasm");
    std::fs::write(&path, DENY_PATH_WASM)?;
    Ok((
        path,
        membrane_agent_api::wasm_resource::hex(&sha2::Sha256::digest(DENY_PATH_WASM)),
    ))
}
