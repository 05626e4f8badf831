//! membrane's agent library: the wiring between the datapath (`membrane-datapath`), the
//! policy model (`membrane-policy`) and the proxy (`membrane-l7proxy`), and everything the
//! `membrane` CLI does. Binaries in `src/bin` are thin: they parse arguments and call here.
//!
//! It owns the agent daemon ([`daemon`]) and its local API ([`api`]), the CLI's commands, and
//! the lab ([`lab`], built from a [`topology`], with its cluster DNS [`lab_dns`]) that
//! `membrane connectivity test` ([`connectivity`]) builds on.
//!
//! It may depend on every library crate of the workspace; none of them may depend on it.

pub mod agent_cmd;
pub mod api;
pub mod bpf_cmd;
pub mod connectivity;
pub mod daemon;
pub mod datapath_sync;
#[cfg(feature = "proxy")]
pub mod dns_node;
pub mod lab;
pub mod lab_dns;
pub mod policy_cmd;
#[cfg(feature = "proxy")]
pub mod proxy_channel;
#[cfg(feature = "proxy")]
pub mod proxy_process;
pub mod topology;
#[cfg(feature = "proxy")]
pub mod wasm_filters;
#[cfg(feature = "proxy")]
pub mod wasm_node;
pub mod wasm_resource;
