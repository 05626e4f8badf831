//! membrane's per-node L7 proxy (`membrane-proxy`): transparent listeners for flows the
//! datapath redirects, HTTP policy enforcement (hyper), the DNS proxy for FQDN policy
//! (hickory-proto), upstream connections, access records, and the filter chain as a trait
//! (so it carries no wasmtime types). It also has a standalone reverse-proxy mode.
//!
//! Must not depend on `membrane-datapath` (the proxy and the datapath meet in
//! `membrane-agent`), nor on `aya`, nor on `wasmtime` (filters plug in through the
//! filter-chain trait).
//!
//! Modules, in request order:
//! - [`transparent`]: `IP_TRANSPARENT` listeners and the original destination (library only;
//!   nothing serves transparent connections yet).
//! - [`strict`]: HTTP/1 framing checks on the raw client bytes (request smuggling → 400).
//! - [`policy`]: the compiled HTTP policy (Cilium `rules.http` semantics).
//! - `proxy` (private): per-request handling shared by all listener modes: policy, 403,
//!   hop-by-hop headers, pooled upstream, upstream failure replies, upgrade tunnels.
//! - [`access`]: access records on a bounded channel that never blocks traffic.
//! - [`standalone`]: the reverse-proxy mode (`membrane proxy --listen --upstream --policy`).
//! - [`policy_file`]: the standalone mode's YAML policy file.
//!
//! Not yet: the DNS proxy, the filter-chain trait, serving transparent listeners with
//! per-endpoint policy, `SO_MARK` on upstream sockets, TLS.

pub mod access;
pub mod policy;
pub mod policy_file;
mod proxy;
pub mod standalone;
pub mod strict;
pub mod transparent;

pub use proxy::ACCESS_DENIED_BODY;
