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
//! - [`transparent`]: `IP_TRANSPARENT` listener sockets and the original destination.
//! - [`redirect`]: the transparent mode: egress and ingress listeners for flows the datapath
//!   redirects, identities and per-endpoint policy looked up per request, upstream pools per
//!   source identity with `SO_MARK`; [`redirect::store`]: the policy snapshot, its file form;
//!   [`redirect::tls_sni`]: `serverNames` ports, the ClientHello's SNI checked without
//!   terminating TLS, then a byte relay (or a reset).
//! - [`strict`]: HTTP/1 framing checks on the raw client bytes (request smuggling → 400).
//! - [`policy`]: the compiled HTTP policy (Cilium `rules.http` semantics).
//! - `proxy` (private): per-request handling shared by all listener modes: policy, 403,
//!   hop-by-hop headers, pooled upstream, upstream failure replies, upgrade tunnels.
//! - [`filter`]: the HTTP filter-chain trait ([`filter::HttpFilters`]) with its phase chart;
//!   `filter_path` (private) drives it: head conversions, the callout loop, filtered bodies.
//! - [`grpc_callout`]: the HTTP/2 client that carries the filters' gRPC calls and streams
//!   (plain types; the filter host's `GrpcOp`s are adapted to it by the node proxy).
//! - [`tcp_filter`]: TCP (stream) filters on L4 relays: the chain trait
//!   ([`tcp_filter::ConnectionFilters`]), the filtered relay (also used by the TLS relay), and
//!   the standalone proxy's TCP mode ([`tcp_filter::TcpProxy`]).
//! - [`access`]: access records on a bounded channel that never blocks traffic.
//! - [`standalone`]: the reverse-proxy mode (`membrane proxy --listen --upstream --policy`).
//! - [`policy_file`]: the standalone mode's YAML policy file.
//!
//! The DNS proxy ([`dns`]) is its own pipeline on tokio and hickory-proto (message parsing
//! only): UDP and TCP listeners on one port, Cilium `rules.dns` matching through
//! `membrane-policy`'s `DnsMatcher`, REFUSED/NXDOMAIN on deny, forwarding over the client's
//! transport (one UDP socket and one pipelined TCP connection per server, IDs rewritten and
//! restored), and an async `FqdnObserver` that must confirm an answer's addresses (CNAME
//! chain followed, minimum TTL, per-name cap) before the answer is released — serialized per
//! name, bounded by a deadline whose overruns are counted. Its records (`DnsRecord`) use
//! their own bounded, never-blocking channel in the style of [`access`].
//!
//! Not yet: TLS termination and origination (`terminatingTLS`/`originatingTLS`).

pub mod access;
pub mod dns;
pub mod filter;
mod filter_path;
pub mod grpc_callout;
pub mod policy;
pub mod policy_file;
mod proxy;
pub mod redirect;
pub mod standalone;
pub mod strict;
pub mod tcp_filter;
pub mod transparent;
mod upstream;

pub use proxy::ACCESS_DENIED_BODY;
