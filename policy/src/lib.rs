//! membrane's pure policy engine: Cilium's policy language (`cilium.io/v2`
//! CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy and `networking.k8s.io/v1`
//! NetworkPolicy) parsed and validated, labels and selectors, security identities, and
//! per-endpoint resolution into datapath policy-map entries and L7 rule sets.
//!
//! **Must not depend on** aya, tokio, wasmtime, kube, or anything doing I/O: no files, no
//! network, no async, no clocks. Callers read files and watch resources; this crate takes
//! `&str` / `serde_json::Value` and returns values. That keeps it cheap to unit- and
//! property-test, and usable from the agent, the proxy and the CLI alike.
//!
//! Semantics follow `shared/reference/cilium-semantics.md` §1–2 (Cilium v1.19).
//!
//! # API
//!
//! Parsing ([`parse`]):
//! - [`parse_documents`]`(text, source_name) -> Result<Vec<Policy>, PolicyError>`: YAML
//!   (multi-document) or JSON, `kind: List` expanded; [`parse_documents_with`] takes
//!   [`ParseOptions`] (default namespace); [`parse_value`] takes a decoded document.
//! - [`Policy`] { kind, namespace, name, uid, labels, rules: Vec<[`Rule`]>, warnings }.
//!   Rules hold [`PeerRule`]s with [`Peers`] (nil/empty distinctions explicit),
//!   [`PortRule`]s, [`L7Rules`] ([`HttpRule`] / [`FqdnSelector`] / TLS [`ServerName`]s
//!   from `serverNames`) and [`IcmpField`]s.
//! - Errors: [`PolicyError`] names source, document index, `Kind namespace/name` and the
//!   field path (`specs[1].egress[0].toPorts[0].rules.kafka: unsupported field`).
//!
//! Labels and selectors ([`labels`], [`selector`]):
//! - [`Label`] / [`Labels`] / [`LabelSource`]; `source:key=value` parsing; `cidr:` labels
//!   match by containment; [`filter_security_relevant`].
//! - [`EndpointSelector::matches`]; keys extended as Cilium (`k8s:foo` vs `foo` = any source).
//!
//! Identities ([`identity`]):
//! - [`Identity`] with the reserved constants (host 1 … world-ipv6 10), the
//!   [`IdentityAllocator`] trait and the deterministic [`LocalAllocator`] (cluster ids from
//!   256, local scope `0x01000000 | n` for CIDR/FQDN label sets), [`IdentitySet`],
//!   [`cidr_identity_labels`], [`fqdn_identity_labels`].
//!
//! Resolution ([`resolve`], [`resolver`]):
//! - [`Repository`]: add/replace/remove by [`PolicyRef`] (kind, namespace, name).
//! - [`resolve_endpoint`]`(&Repository, &EndpointInfo, &IdentitySet, &ResolveOptions) ->`
//!   [`EndpointPolicy`] { entries: BTreeMap<[`PolicyKey`], [`PolicyEntry`]>, l7:
//!   Vec<[`L7RuleSet`]>, enforce_ingress, enforce_egress, cidr_prefixes, cookies, … }.
//! - [`diff`]`(&old, &new) -> `[`EntryDiff`] (added / changed / removed keys).
//! - [`Resolver::apply`]`(`[`Change`]`) -> `[`ResolverDiff`]: incremental resolution over
//!   policy, endpoint and identity changes; which identities each peer selector matches
//!   is kept in a selector cache (Cilium's `SelectorCache`), so a policy change re-matches
//!   no selector against every identity and recomputes only the affected identities'
//!   entries.
//! - DNS matching ([`fqdn`]): [`DnsMatcher`] (L7) and [`FqdnSelector::compile`] (toFQDNs)
//!   with Cilium's `matchName`/`matchPattern` regex construction; HTTP matching ([`http`]):
//!   [`HttpRule::compile`].
//! - Port ranges: [`range_to_prefixes`].
//!
//! Services ([`service`]): Kubernetes `Service` + `EndpointSlice` parsed and validated
//! ([`service::parse_service_documents`]), the [`service::ServiceRepository`] (conflicting
//! frontends refused) and its load-balancer desired state ([`service::LbState`]), Maglev
//! tables ([`service::maglev`]).
//!
//! # Not implemented (rejected or reported, never silently ignored)
//! `toServices` resolution (parsed and validated; resolves to nothing with a warning),
//! `fromNodes`/`toNodes`, `fromGroups`/`toGroups`, `cidrGroupRef`/`cidrGroupSelector`,
//! Kafka and generic `l7proto` rules, TLS termination and origination (`terminatingTLS`,
//! `originatingTLS`, hence `serverNames` together with `rules`), `serverNames` on ingress
//! and in host policies, `listener`, `authentication`, extended IP protocols (VRRP/IGMP), the
//! clustermesh cluster filter (§1.5 point 5) and policy priorities/tiers (the high 24
//! bits of [`PolicyEntry::precedence`] are always 0).
//!
//! # Deliberate deviations from Cilium (stricter or simpler; all documented at the site)
//! - Integer `port` values are accepted (the CRD wants strings); `endPort` on a named port,
//!   L7 rules without ports, and an `except` not fully inside its `cidr` (Cilium checks
//!   only the address) are errors; a CCNP with `metadata.namespace` is an error.
//! - `serverNames` wildcards: only a leading `*.` label (one label, as a `matchPattern` `*`);
//!   `serverNames` next to an empty rule list (`rules: {http: []}`) is an error.
//! - `rules.dns: []` is an allow-all DNS rule set on any of TCP/UDP/ANY (Cilium's nil-based
//!   checks make it TCP-only by accident).
//! - A CIDR identity is labelled `cidr:<prefix>` + `reserved:world` (no dual-stack
//!   world-ipv4/ipv6 split); `0.0.0.0/0` / `::/0` also select `reserved:world` and the
//!   family's world identity.
//! - Named ports resolve to numbers per endpoint (ingress: the endpoint's ports; egress:
//!   [`ResolveOptions::egress_named_ports`]) before L7 merging.
//! - The label filter matches key prefixes (Cilium uses regexes with the same effect for
//!   the default configuration).

pub mod cidr;
pub mod error;
pub mod fqdn;
pub mod http;
pub mod identity;
pub mod labels;
pub mod model;
pub mod parse;
pub mod ports;
pub mod repository;
pub mod resolve;
pub mod resolver;
pub mod selector;
mod selector_cache;
pub mod server_name;
pub mod service;

pub use cidr::IpPrefix;
pub use error::{IdentityError, LabelError, PolicyError, SelectorError};
pub use fqdn::{DnsMatcher, FqdnMatcher, FqdnSelector};
pub use http::{CompiledHttpRule, HttpRequestView, HttpRule};
pub use identity::{
    Identity, IdentityAllocator, IdentitySet, LocalAllocator, cidr_identity_labels,
    fqdn_identity_labels,
};
pub use labels::{Label, LabelSource, Labels, filter_security_relevant};
pub use model::{
    CidrRule, DefaultDeny, Entity, IcmpFamily, IcmpField, L7Rules, PeerRule, Peers, Policy,
    PolicyKind, PolicyRef, Port, PortProtocol, PortRule, Protocol, Rule, ServiceSelector, Subject,
};
pub use parse::{ParseOptions, parse_documents, parse_documents_with, parse_value};
pub use ports::{PortPrefix, range_to_prefixes};
pub use repository::Repository;
pub use resolve::{
    Action, Direction, EndpointInfo, EndpointPolicy, EnforcementMode, EntryDiff, L7Parser,
    L7PeerRule, L7RuleSet, PolicyEntry, PolicyKey, RemoteIdentities, ResolveOptions, diff,
    diff_entries, entity_selectors, resolve_endpoint,
};
pub use resolver::{Change, EndpointChange, Resolver, ResolverDiff};
pub use selector::EndpointSelector;
pub use server_name::ServerName;
