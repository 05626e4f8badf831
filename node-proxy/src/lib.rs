//! The node proxy, `membrane-proxy` ([`process::run`]): one per node, started and supervised
//! by the agent but a process of its own, so an agent restart never breaks DNS or L7 traffic
//! (DESIGN §1). It is the proxy channel's client (`membrane_agent_api::proxy_channel`), the
//! transparent HTTP/TLS proxy of redirected flows, the DNS proxy with FQDN learning
//! ([`dns`]), and the host of `WasmFilter` chains per endpoint ([`node_filters`]) through the
//! Wasm adapter ([`wasm`]) that the CLI's standalone proxy shares.
//!
//! May depend on the data-plane libraries (`membrane-l7proxy`, `membrane-filters`) and the
//! API crate; never on the agent, the lab or the CLI.

pub mod dns;
pub mod node_filters;
pub mod process;
pub mod wasm;
