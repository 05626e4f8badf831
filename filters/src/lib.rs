//! membrane's Wasm filter host: the wasmtime engine, the proxy-wasm ABI (v0.2.1, accepting
//! 0.2.0), instance pools with stream affinity, per-callback deadlines, memory caps, failure
//! policies and atomic hot reload. The proxy drives it through [`FilterChain`] /
//! [`ChainStream`] with plain Rust types (no wasmtime types cross this crate's API), and the
//! agent (`membrane_agent::wasm_filters`) adapts that to `membrane-l7proxy`'s filter-chain
//! trait; HTTP callouts leave as [`HttpCall`]s and gRPC callouts as [`GrpcOp`]s for the proxy
//! to send (it answers with [`GrpcEvent`]s). The same [`ChainStream`] also runs TCP (stream)
//! filters: [`FilterChain::start_connection`], then the connection callbacks.
//!
//! The only crate allowed to depend on `wasmtime`. Must not depend on the datapath, the agent
//! or the proxy.
//!
//! Layout:
//! - [`FilterHost`] (`host`): engine (Cranelift, pooling allocator, epoch interruption), linker,
//!   epoch ticker thread, module cache (sha256), shared data/queues/metrics.
//! - [`Filter`] (`filter`): a configured filter; generations, instance pool, hot reload, backoff.
//! - [`FilterChain`], [`ChainStream`] (`chain`): the per-request phase API and its phase chart.
//! - `vm`: one instance — Envoy's start sequence, callbacks under deadlines, failure naming.
//! - `hostcalls`: every `env.proxy_*` function and the WASI subset; `properties`: the
//!   attribute tree; [`abi`]: statuses, enums and the pairs/path encodings.
//!
//! Usage:
//!
//! ```no_run
//! use membrane_filters::{Action, FilterChain, FilterHost, FilterSpec, Headers, HostConfig, StreamInfo};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let host = FilterHost::new(HostConfig::default())?;
//! let wasm = std::fs::read("add_header.wasm")?;
//! let filter = host.load(FilterSpec::new("add-header", wasm).with_config(r#"{"name":"x-a","value":"1"}"#))?;
//! let chain = FilterChain::new(vec![filter]);
//! let mut stream = chain.start_stream(StreamInfo::default());
//! match stream.on_request_headers(Headers::request("GET", "/", "example", [("accept", "*/*")]), true) {
//!     Action::Continue => { /* forward stream.request_headers() upstream */ }
//!     Action::LocalReply(reply) => { /* answer reply.status / reply.headers / reply.body */ }
//!     Action::Pause | Action::Close => { /* hold or reset */ }
//! }
//! let decisions = stream.finish(); // done/log/delete; decisions go into the flow record
//! # let _ = decisions; Ok(()) }
//! ```

pub mod abi;
mod chain;
mod config;
mod error;
mod filter;
mod host;
mod hostcalls;
mod inspect;
mod module;
mod properties;
mod shared;
mod state;
mod types;
mod vm;

pub use chain::{ChainStream, FilterChain};
pub use config::{
    FailurePolicy, FilterLimits, FilterLog, FilterProtocol, FilterSpec, HostConfig, LogLevel,
    LogSink,
};
pub use error::FilterError;
pub use filter::Filter;
pub use host::FilterHost;
pub use inspect::{ContextTypes, ImportReport, ImportStatus, ModuleReport};
pub use shared::{MetricKind, MetricSnapshot};
pub use types::{
    Action, DecisionKind, FailureOutcome, FilterDecision, GrpcCallId, GrpcEvent, GrpcOp, GrpcStart,
    Headers, HttpCall, HttpCallId, HttpCallResponse, LocalReply, PeerInfo, PeerType, Phase,
    StreamInfo, grpc_status,
};
