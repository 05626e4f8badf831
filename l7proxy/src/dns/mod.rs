//! The DNS proxy for FQDN policy (DESIGN.md §4, cilium-semantics.md §1.10, §3.5, §6.1–6.3).
//!
//! Queries the datapath redirects (port 53, UDP and TCP) are parsed with hickory-proto,
//! checked against Cilium `rules.dns` semantics, answered REFUSED (or NXDOMAIN) when
//! denied, and forwarded to the original server over the client's transport when allowed.
//! Before an allowed answer is released, the addresses it gives for the question name
//! (following CNAMEs) are handed to an [`FqdnObserver`] — the agent, which maps them to
//! `fqdn:` identities in the ipcache and policy maps — and the answer waits until that is
//! done or a deadline passes, serialized per name, so the first connection after a lookup
//! is not dropped. Every query and response yields a [`DnsRecord`].
//!
//! Modules:
//! - [`policy`]: [`DnsPolicy`], compiled `rules.dns` per endpoint, port and transport.
//! - `wire` (private): parsing, the proxy's own replies, UDP size fitting, CNAME chains.
//! - `frame` (private): DNS-over-TCP length framing.
//! - `upstream` (private): one UDP socket / one pipelined TCP connection per server, with
//!   rewritten message IDs.
//! - [`learn`]: [`FqdnObserver`], per-name serialization, the release deadline.
//! - [`cache`]: [`FqdnCache`], an in-memory observer with expiry and a JSON snapshot.
//! - [`record`]: [`DnsRecord`] and its bounded sink [`DnsLog`].
//! - `server` (private, re-exported): [`DnsProxy`], its configuration, routing trait and
//!   counters.
//!
//! Must not depend on the datapath: the observer and the upstream resolver are traits the
//! agent implements. Transparent mode (`DnsProxyConfig::transparent`, `origdst`): the
//! listeners take redirected queries with their original destination (per datagram for
//! UDP), replies leave from that address, and upstream sockets carry the route's `SO_MARK`.
//! Not yet: DNS over TLS/HTTPS.

pub mod cache;
mod frame;
pub mod learn;
mod origdst;
pub mod policy;
pub mod record;
mod server;
mod upstream;
mod wire;

pub use cache::{FqdnCache, FqdnCacheEntry, FqdnCacheError};
pub use learn::{FqdnLearning, FqdnLearningConfig, FqdnObserver, FqdnObserverError, LearnedIp};
pub use policy::{
    DnsPolicy, DnsPolicyError, DnsPortMatch, DnsQueryScope, DnsRuleRef, DnsTransport, EndpointScope,
};
pub use record::{DnsLog, DnsRecord, DnsRecordKind, DnsVerdict};
pub use server::{
    DenyResponse, DnsProxy, DnsProxyConfig, DnsProxyError, DnsProxyHandle, DnsProxyStats,
    DnsRequestInfo, DnsRoute, RouteError, StaticUpstream, UpstreamResolver,
};
