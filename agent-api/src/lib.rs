//! Every contract between membrane's processes, declared once, in the crate both sides use:
//!
//! - [`api`]: the agent's local API (JSON lines on a Unix socket): requests, typed replies,
//!   one codec and a blocking [`api::Client`];
//! - [`proxy_channel`]: the agent ↔ `membrane-proxy` channel, its messages and both ends'
//!   framing; [`snapshot`]: what travels on it and what the proxy saves (HTTP/TLS policy,
//!   DNS rules, `WasmFilter` attachments);
//! - [`run_dir::RunDir`]: the name of every file under `/run/membrane/<name>/`;
//! - [`registry`]: the endpoint registry record (`endpoints.json`);
//! - [`wasm_resource`]: the `WasmFilter` resource model;
//! - [`args`]: the command lines of `membrane-agent` and `membrane-proxy` as clap structs that
//!   whoever starts them renders (`to_args()`), so a spawn cannot drift from the parser;
//! - [`shutdown::Shutdown`]: the one shutdown signal of a process;
//! - [`cni`]: the CNI network configuration the agent writes and `membrane-cni` reads.
//!
//! Must not depend on aya, wasmtime or tokio: the CLI, the CNI plugin and the lab link it.

pub mod api;
pub mod args;
pub mod cni;
pub mod proxy_channel;
pub mod registry;
pub mod run_dir;
pub mod shutdown;
pub mod snapshot;
pub mod wasm_resource;

pub use api::{Client, LearnedAddress};
pub use run_dir::RunDir;
