//! membrane's per-node L7 proxy (`membrane-proxy`): transparent listeners for flows the
//! datapath redirects, HTTP policy enforcement (hyper), the DNS proxy for FQDN policy
//! (hickory-proto), upstream connections, access records, and the filter chain as a trait
//! (so it carries no wasmtime types). It also has a standalone reverse-proxy mode.
//!
//! Must not depend on `membrane-datapath` (the proxy and the datapath meet in
//! `membrane-agent`) nor on `wasmtime` (filters plug in through the filter-chain trait).
//!
//! Status: empty. The proxy is built by the L7 proxy issue; nothing here is wired yet.
