//! membrane's flow pipeline and Hubble-compatible observer API.
//!
//! Owns everything between "an event happened" and "`hubble observe` shows it":
//! - [`input`]: what producers hand over ([`FlowInput`]: datapath events, HTTP access
//!   records, DNS records); the agent converts the datapath's `FlowEventView` and the
//!   proxy's `AccessRecord` into these;
//! - [`enrich`]: the [`Enricher`] the agent implements (labels, namespaces, pods, DNS
//!   names, services, node name) and an in-memory one;
//! - conversion into Hubble's `flow.Flow`, filled as Hubble's parsers fill it;
//! - [`pipeline`]: a bounded, never-blocking ingest queue and a ring of the last
//!   `max_flows` flows with per-producer lost-event accounting ([`Observer`]);
//! - [`server`]: the `observer.Observer` gRPC service (GetFlows with filters, follow, time
//!   bounds and field masks; ServerStatus; GetNamespaces) and gRPC health, on a Unix socket
//!   or TCP, with [`peer`]'s `peer.Peer` (the cluster's nodes, for the relay) beside it;
//! - [`metrics`]: Prometheus text with Hubble's metric names and labels;
//! - [`printer`] and [`cli`]: `hubble observe` output formats and flag → filter mapping for
//!   `membrane observe`;
//! - [`ui`]: the flow page (`/ui`, a live flow table with filters and a service map) and the
//!   JSON it polls, over a small bounded HTTP server.
//!
//! Must not depend on aya or membrane-datapath, membrane-l7proxy, wasmtime or kube: it
//! defines its own inputs, so it builds and tests without a kernel or a proxy.
//!
//! Data path: producers → [`FlowSender::send`] (`try_send`; a full queue drops and counts)
//! → ingest task (enrich, convert, count metrics) → ring (overwrites the oldest) → GetFlows
//! readers (each with its own cursor; followers wait on a watch channel).

pub mod cli;
mod convert;
pub mod enrich;
pub mod fieldmask;
pub mod filter;
pub mod input;
pub mod metrics;
pub mod names;
pub mod peer;
pub mod pipeline;
pub mod printer;
pub mod proto;
mod ring;
mod selector;
pub mod server;
pub mod timefmt;
pub mod ui;

pub mod client;
pub use cli::{CliFilterError, FilterBuilder, ObserveFilters, filters_from_flags};
pub use convert::{monitor_type, redact_url};
pub use enrich::{EndpointMeta, Enricher, ServiceMeta, StaticEnricher};
pub use fieldmask::{FieldMaskError, FlowMask};
pub use filter::{FilterError, FlowFilters};
pub use input::{
    DatapathEvent, DatapathEventKind, DatapathVerdict, Direction, DnsObservationSource, DnsRecord,
    FlowInput, FlowSource, HttpRecord, L7Kind, L7Verdict, ObservationPoint, PolicyRef,
};
pub use peer::{PeerInfo, PeerService, PeerSet};
pub use pipeline::{ConfigError, FlowSender, Ingest, LostCounts, Observer, ObserverConfig};
pub use printer::PrintOptions;
pub use server::{
    DEFAULT_TCP_PORT, DEFAULT_UNIX_SOCKET, HEALTH_SERVICE_NAME, ObserverService, ServeError,
    bind_unix, health_service, serve_tcp, serve_tcp_with_peers, serve_unix, serve_unix_with_peers,
};
pub use ui::{UiLimits, serve_ui};
