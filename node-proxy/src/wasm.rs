//! Wasm filters on the proxy's data paths: adapts `membrane-filters` (the proxy-wasm host) to
//! `membrane-l7proxy`'s filter-chain traits — [`HttpFilters`] for HTTP streams (HTTP and gRPC
//! callouts included: the host's `HttpCall`s and `GrpcOp`s become the proxy's
//! [`Callout`]s and [`GrpcCalloutOp`]s, their outcomes go back to the chain) and
//! [`ConnectionFilters`] for TCP connections (the stream context) — and owns what the
//! standalone `membrane proxy [--tcp] --filter MODULE.wasm[=CONFIG] --filter-upstream
//! NAME=ADDR` needs: loading the modules from files, the callout upstream names,
//! `proxy_on_tick` delivery, and atomic hot reload (on SIGHUP or when a module or
//! configuration file changes).
//!
//! Reload is all-or-nothing for the whole chain: every filter is compiled, booted and
//! configured off the data path; only if all succeed is the new chain swapped in (one pointer
//! store). A failure leaves the last good chain serving and is returned (and logged) with the
//! filter and file named. Requests keep the chain they started with.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use membrane_filters::{
    Action, ChainStream, DecisionKind, FailureOutcome, FilterChain, FilterError, FilterHost,
    FilterProtocol, FilterSpec, GrpcCallId, GrpcEvent, GrpcOp, Headers, HostConfig, HttpCallId,
    HttpCallResponse, PeerInfo, PeerType, Phase, StreamInfo,
};
use membrane_l7proxy::access::{FilterOutcome, FilterRecord};
use membrane_l7proxy::filter::{
    Callout, CalloutResponse, FilterAction, FilterReply, FilterStream, GrpcCalloutOp, HeadPairs,
    HttpFilters, PeerMeta, StreamMeta,
};
use membrane_l7proxy::grpc_callout::{GrpcCalloutEvent, GrpcRequest};
use membrane_l7proxy::tcp_filter::{
    ConnectionFilterStream, ConnectionFilters, ConnectionMeta, L4Action,
};

/// How often `proxy_on_tick` is offered to the filters (each filter's own period applies).
const TICK_EVERY: Duration = Duration::from_millis(10);
/// How often the module and configuration files are checked for changes.
const WATCH_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum WasmFilterError {
    #[error("--filter {arg:?}: {reason}")]
    Argument { arg: String, reason: String },
    #[error("--filter-upstream {arg:?}: expected NAME=IP:PORT, e.g. auth=127.0.0.1:9001")]
    Upstream { arg: String },
    #[error("filter {filter}: cannot read {what} {path}: {source}")]
    Read {
        filter: String,
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("filter {filter} ({path}): {source}")]
    Load {
        filter: String,
        path: PathBuf,
        #[source]
        source: Box<FilterError>,
    },
    #[error(transparent)]
    Host(Box<FilterError>),
}

/// One `--filter MODULE.wasm[=CONFIG_FILE]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterSource {
    /// The module file's stem (made unique with `#2`, `#3`, ... when repeated).
    pub name: String,
    pub module: PathBuf,
    pub config: Option<PathBuf>,
    /// Callback deadline, memory cap and body buffer bound (defaults from `--filter`).
    pub limits: membrane_filters::FilterLimits,
    /// HTTP streams or TCP connections (`membrane proxy --tcp`); a module that declares only
    /// the other kind of stream callbacks is refused at load.
    pub protocol: FilterProtocol,
}

impl FilterSource {
    /// Parses `MODULE.wasm` or `MODULE.wasm=CONFIG_FILE`.
    pub fn parse(arg: &str) -> Result<Self, WasmFilterError> {
        let bad = |reason: &str| WasmFilterError::Argument {
            arg: arg.to_owned(),
            reason: reason.to_owned(),
        };
        let (module, config) = match arg.split_once('=') {
            Some((_, "")) => return Err(bad("empty CONFIG_FILE after '='")),
            Some((m, c)) => (m, Some(PathBuf::from(c))),
            None => (arg, None),
        };
        if module.is_empty() {
            return Err(bad("expected MODULE.wasm[=CONFIG_FILE]"));
        }
        let module = PathBuf::from(module);
        let name = module
            .file_stem()
            .and_then(|s| s.to_str())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad("the module path has no file name"))?
            .to_owned();
        Ok(Self {
            name,
            module,
            config,
            limits: membrane_filters::FilterLimits::default(),
            protocol: FilterProtocol::Http,
        })
    }

    /// The same filter attached to `protocol`'s streams.
    pub fn with_protocol(mut self, protocol: FilterProtocol) -> Self {
        self.protocol = protocol;
        self
    }
}

/// Parses `NAME=IP:PORT`.
pub fn parse_upstream(arg: &str) -> Result<(String, SocketAddr), WasmFilterError> {
    let bad = || WasmFilterError::Upstream {
        arg: arg.to_owned(),
    };
    let (name, addr) = arg.split_once('=').ok_or_else(bad)?;
    if name.is_empty() {
        return Err(bad());
    }
    Ok((name.to_owned(), addr.parse().map_err(|_| bad())?))
}

/// The filters of a standalone proxy: an ordered chain built from files, swapped whole on
/// reload.
pub struct WasmFilterSet {
    host: FilterHost,
    sources: Vec<FilterSource>,
    upstreams: HashMap<String, SocketAddr>,
    chain: RwLock<FilterChain>,
    /// Modification times the current chain was built from (for the file watcher).
    stamps: RwLock<Vec<Option<SystemTime>>>,
}

impl WasmFilterSet {
    /// Loads every filter (in order) with `upstreams` as the callout names they may use.
    pub fn load(
        sources: Vec<FilterSource>,
        upstreams: HashMap<String, SocketAddr>,
        host_config: HostConfig,
    ) -> Result<Arc<Self>, WasmFilterError> {
        let mut sources = sources;
        let mut seen: HashMap<String, usize> = HashMap::new();
        for s in &mut sources {
            let n = seen.entry(s.name.clone()).or_insert(0);
            *n += 1;
            if *n > 1 {
                s.name = format!("{}#{n}", s.name);
            }
        }
        let host = FilterHost::new(host_config).map_err(|e| WasmFilterError::Host(Box::new(e)))?;
        let set = Self {
            host,
            sources,
            upstreams,
            chain: RwLock::new(FilterChain::default()),
            stamps: RwLock::new(Vec::new()),
        };
        let (chain, stamps) = set.build()?;
        *set.chain.write().unwrap_or_else(|e| e.into_inner()) = chain;
        *set.stamps.write().unwrap_or_else(|e| e.into_inner()) = stamps;
        Ok(Arc::new(set))
    }

    fn build(&self) -> Result<(FilterChain, Vec<Option<SystemTime>>), WasmFilterError> {
        let stamps = self.file_stamps();
        let mut filters = Vec::with_capacity(self.sources.len());
        let mut names: Vec<String> = self.upstreams.keys().cloned().collect();
        names.sort();
        for source in &self.sources {
            let read = |what, path: &Path| {
                std::fs::read(path).map_err(|e| WasmFilterError::Read {
                    filter: source.name.clone(),
                    what,
                    path: path.to_owned(),
                    source: e,
                })
            };
            let module = read("module", &source.module)?;
            let config = match &source.config {
                Some(path) => read("configuration", path)?,
                None => Vec::new(),
            };
            let spec = FilterSpec::new(&source.name, module)
                .with_protocol(source.protocol)
                .with_limits(source.limits)
                .with_config(config)
                .with_callout_upstreams(names.clone());
            let filter = self.host.load(spec).map_err(|e| WasmFilterError::Load {
                filter: source.name.clone(),
                path: source.module.clone(),
                source: Box::new(e),
            })?;
            filters.push(filter);
        }
        Ok((FilterChain::new(filters), stamps))
    }

    fn file_stamps(&self) -> Vec<Option<SystemTime>> {
        let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        self.sources
            .iter()
            .flat_map(|s| [Some(&s.module), s.config.as_ref()])
            .map(|p| p.and_then(|p| mtime(p)))
            .collect()
    }

    /// Rebuilds the whole chain from the files and swaps it in; on error the last good chain
    /// keeps serving. Blocking (compiles): call off the async runtime.
    pub fn reload(&self) -> Result<(), WasmFilterError> {
        let (chain, stamps) = self.build()?;
        *self.chain.write().unwrap_or_else(|e| e.into_inner()) = chain;
        *self.stamps.write().unwrap_or_else(|e| e.into_inner()) = stamps;
        tracing::info!(filters = self.sources.len(), "filter chain reloaded");
        Ok(())
    }

    /// The chain serving now.
    pub fn chain(&self) -> FilterChain {
        self.chain.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The host (metrics of every filter).
    pub fn host(&self) -> &FilterHost {
        &self.host
    }

    /// Starts the background thread that delivers `proxy_on_tick` (ends with the set).
    pub fn spawn_ticker(self: &Arc<Self>) -> std::io::Result<()> {
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("membrane-wasm-tick".into())
            .spawn(move || {
                while let Some(set) = weak.upgrade() {
                    for filter in set.chain().filters() {
                        filter.tick();
                    }
                    drop(set);
                    std::thread::sleep(TICK_EVERY);
                }
            })
            .map(drop)
    }

    /// Starts the background thread that reloads when a module or configuration file's
    /// modification time changes (ends with the set).
    pub fn spawn_file_watcher(self: &Arc<Self>) -> std::io::Result<()> {
        let weak: Weak<Self> = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("membrane-wasm-watch".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(WATCH_EVERY);
                    let Some(set) = weak.upgrade() else { return };
                    let now = set.file_stamps();
                    let changed = *set.stamps.read().unwrap_or_else(|e| e.into_inner()) != now;
                    if changed {
                        match set.reload() {
                            Ok(()) => tracing::info!("filter files changed: chain reloaded"),
                            Err(error) => {
                                // Do not retry the same broken files every tick.
                                *set.stamps.write().unwrap_or_else(|e| e.into_inner()) = now;
                                tracing::error!(%error, "filter reload failed; the last good chain keeps serving");
                            }
                        }
                    }
                }
            })
            .map(drop)
    }
}

/// `membrane proxy [--tcp] --filter ... --filter-upstream ...`: loads the chain (`None`
/// without filters) for `protocol`'s streams and starts its tick and file-watch threads.
pub fn from_args(
    filters: &[String],
    upstreams: &[String],
    protocol: FilterProtocol,
) -> Result<Option<Arc<WasmFilterSet>>, WasmFilterError> {
    let upstreams = upstreams
        .iter()
        .map(|u| parse_upstream(u))
        .collect::<Result<HashMap<_, _>, _>>()?;
    if filters.is_empty() {
        return Ok(None);
    }
    let sources = filters
        .iter()
        .map(|f| FilterSource::parse(f).map(|s| s.with_protocol(protocol)))
        .collect::<Result<Vec<_>, _>>()?;
    let set = WasmFilterSet::load(sources, upstreams, HostConfig::default())?;
    let io =
        |e: std::io::Error| WasmFilterError::Host(Box::new(FilterError::Engine(e.to_string())));
    set.spawn_ticker().map_err(io)?;
    set.spawn_file_watcher().map_err(io)?;
    Ok(Some(set))
}

/// Reloads `set` on every SIGHUP (compiling on a blocking thread). Call inside a tokio runtime.
pub fn reload_on_sighup(set: Arc<WasmFilterSet>) -> std::io::Result<()> {
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            let set = set.clone();
            match tokio::task::spawn_blocking(move || set.reload()).await {
                Ok(Ok(())) => tracing::info!("SIGHUP: filter chain reloaded"),
                Ok(Err(error)) => {
                    tracing::error!(%error, "SIGHUP: filter reload failed; the last good chain keeps serving")
                }
                Err(error) => tracing::error!(%error, "SIGHUP: filter reload task failed"),
            }
        }
    });
    Ok(())
}

impl HttpFilters for WasmFilterSet {
    fn start(&self, meta: StreamMeta) -> Option<Box<dyn FilterStream>> {
        start_stream(&self.chain(), meta)
    }

    /// Every filter of the standalone chain shares the `--filter-upstream` names.
    fn callout_upstream(&self, _filter: &str, name: &str) -> Option<SocketAddr> {
        self.upstreams.get(name).copied()
    }
}

/// The standalone TCP mode's connections run through the same chain (loaded for TCP).
impl ConnectionFilters for WasmFilterSet {
    fn start(&self, meta: ConnectionMeta) -> Option<Box<dyn ConnectionFilterStream>> {
        start_connection(&self.chain(), meta)
    }
}

fn peer_info(p: PeerMeta) -> PeerInfo {
    PeerInfo {
        address: p.address,
        identity: p.identity.map(u64::from),
        labels: p.labels,
        namespace: p.namespace,
        workload: p.workload,
        principal: None,
    }
}

/// One request through `chain` (`None` when the chain is empty).
pub fn start_stream(chain: &FilterChain, meta: StreamMeta) -> Option<Box<dyn FilterStream>> {
    if chain.is_empty() {
        return None;
    }
    let info = StreamInfo {
        source: peer_info(meta.source),
        destination: peer_info(meta.destination),
        protocol: Some(meta.protocol.to_owned()),
        connection_id: None,
    };
    Some(Box::new(WasmStream {
        stream: chain.start_stream(info),
        calls: HashMap::new(),
        grpc_calls: HashMap::new(),
        grpc_ids: HashMap::new(),
        next_call: 0,
        paused_response: false,
    }))
}

/// One TCP connection through `chain`, a proxy-wasm stream context per filter (`None` when
/// the chain is empty).
pub fn start_connection(
    chain: &FilterChain,
    meta: ConnectionMeta,
) -> Option<Box<dyn ConnectionFilterStream>> {
    if chain.is_empty() {
        return None;
    }
    let info = StreamInfo {
        source: peer_info(meta.source),
        destination: peer_info(meta.destination),
        protocol: None,
        connection_id: None,
    };
    Some(Box::new(WasmConnection {
        stream: chain.start_connection(info),
    }))
}

/// One request through the Wasm chain.
struct WasmStream {
    stream: ChainStream,
    /// Callout ids handed to the proxy → the chain's ids.
    calls: HashMap<u64, HttpCallId>,
    /// gRPC call ids handed to the proxy → the chain's ids, and back.
    grpc_calls: HashMap<u64, GrpcCallId>,
    grpc_ids: HashMap<GrpcCallId, u64>,
    /// Last id handed to the proxy (HTTP and gRPC callouts share the sequence).
    next_call: u64,
    /// Which headers phase is paused (for writing the head back on resume).
    paused_response: bool,
}

impl WasmStream {
    /// After an outcome resumed a paused headers phase: that phase's head as the filters
    /// left it.
    fn resumed_head(&self, head: &mut HeadPairs) {
        *head = to_pairs(if self.paused_response {
            self.stream.response_headers()
        } else {
            self.stream.request_headers()
        });
    }
}

/// One TCP connection through the Wasm chain.
struct WasmConnection {
    stream: ChainStream,
}

fn l4(action: Action) -> L4Action {
    match action {
        Action::Continue => L4Action::Continue,
        Action::Pause => L4Action::Pause,
        // A stream context has no local reply: a failure policy's reply closes instead.
        Action::LocalReply(_) | Action::Close => L4Action::Close,
    }
}

fn peer_type(local: bool) -> PeerType {
    if local {
        PeerType::Local
    } else {
        PeerType::Remote
    }
}

impl ConnectionFilterStream for WasmConnection {
    fn on_new_connection(&mut self) -> L4Action {
        l4(self.stream.on_new_connection())
    }

    fn on_downstream_data(&mut self, data: &mut Vec<u8>, end_of_stream: bool) -> L4Action {
        l4(self.stream.on_downstream_data(data, end_of_stream))
    }

    fn on_upstream_data(&mut self, data: &mut Vec<u8>, end_of_stream: bool) -> L4Action {
        l4(self.stream.on_upstream_data(data, end_of_stream))
    }

    fn on_downstream_close(&mut self, local: bool) {
        self.stream.on_downstream_close(peer_type(local));
    }

    fn on_upstream_close(&mut self, local: bool) {
        self.stream.on_upstream_close(peer_type(local));
    }
}

fn to_headers(head: &HeadPairs) -> Headers {
    Headers::from_pairs(head.iter().map(|(k, v)| (k.as_bytes(), v)))
}

fn to_pairs(headers: &Headers) -> HeadPairs {
    headers
        .iter()
        .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), v.to_vec()))
        .collect()
}

fn convert(action: Action) -> FilterAction {
    match action {
        Action::Continue => FilterAction::Continue,
        Action::Pause => FilterAction::Pause,
        Action::Close => FilterAction::Close,
        Action::LocalReply(reply) => {
            let mut headers = HeaderMap::with_capacity(reply.headers.len());
            for (name, value) in reply.headers.iter() {
                // A header HTTP cannot carry is dropped (logged), not sent broken.
                match (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
                    (Ok(n), Ok(v)) => {
                        headers.append(n, v);
                    }
                    _ => tracing::debug!(
                        filter = &*reply.filter,
                        name = %String::from_utf8_lossy(name),
                        "local reply header dropped: not valid HTTP"
                    ),
                }
            }
            FilterAction::LocalReply(FilterReply {
                status: StatusCode::from_u16(reply.status)
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                headers,
                body: Bytes::from(reply.body),
            })
        }
    }
}

impl FilterStream for WasmStream {
    fn on_request_headers(&mut self, head: &mut HeadPairs, end_of_stream: bool) -> FilterAction {
        let action = self
            .stream
            .on_request_headers(to_headers(head), end_of_stream);
        if action == Action::Continue {
            *head = to_pairs(self.stream.request_headers());
        }
        self.paused_response = false;
        convert(action)
    }

    fn on_request_body(&mut self, data: &mut Vec<u8>, end_of_stream: bool) -> FilterAction {
        convert(self.stream.on_request_body(data, end_of_stream))
    }

    fn on_response_headers(&mut self, head: &mut HeadPairs, end_of_stream: bool) -> FilterAction {
        let action = self
            .stream
            .on_response_headers(to_headers(head), end_of_stream);
        if action == Action::Continue {
            *head = to_pairs(self.stream.response_headers());
        }
        self.paused_response = true;
        convert(action)
    }

    fn on_response_body(&mut self, data: &mut Vec<u8>, end_of_stream: bool) -> FilterAction {
        convert(self.stream.on_response_body(data, end_of_stream))
    }

    fn take_callouts(&mut self) -> Vec<Callout> {
        self.stream
            .take_http_calls()
            .into_iter()
            .map(|call| {
                self.next_call += 1;
                self.calls.insert(self.next_call, call.id);
                Callout {
                    id: self.next_call,
                    filter: call.filter.to_string(),
                    upstream: call.upstream,
                    head: to_pairs(&call.headers),
                    body: Bytes::from(call.body),
                    timeout: Some(call.timeout).filter(|t| !t.is_zero()),
                }
            })
            .collect()
    }

    fn on_callout_response(
        &mut self,
        id: u64,
        response: Option<CalloutResponse>,
        head: &mut HeadPairs,
    ) -> FilterAction {
        let Some(call) = self.calls.remove(&id) else {
            return FilterAction::Pause;
        };
        let response = response.map(|r| HttpCallResponse {
            headers: to_headers(&r.head),
            body: r.body.to_vec(),
            trailers: Headers::new(),
        });
        let action = self.stream.on_http_call_response(call, response);
        if action == Action::Continue {
            self.resumed_head(head);
        }
        convert(action)
    }

    fn take_grpc_ops(&mut self) -> Vec<GrpcCalloutOp> {
        let mut out = Vec::new();
        for op in self.stream.take_grpc_ops() {
            match op {
                GrpcOp::Start(start) => {
                    self.next_call += 1;
                    let id = self.next_call;
                    self.grpc_calls.insert(id, start.id);
                    self.grpc_ids.insert(start.id, id);
                    out.push(GrpcCalloutOp::Start {
                        id,
                        filter: start.filter.to_string(),
                        request: GrpcRequest {
                            // Envoy sends the cluster name as :authority.
                            authority: start.upstream.clone(),
                            path: start.path(),
                            metadata: to_pairs(&start.initial_metadata),
                            timeout: Some(start.timeout).filter(|t| !t.is_zero()),
                        },
                        upstream: start.upstream,
                        message: start.message.map(Bytes::from),
                    });
                }
                GrpcOp::Send {
                    id,
                    message,
                    end_stream,
                } => {
                    if let Some(&id) = self.grpc_ids.get(&id) {
                        out.push(GrpcCalloutOp::Send {
                            id,
                            message: Bytes::from(message),
                            end_stream,
                        });
                    }
                }
                GrpcOp::Close { id } => {
                    if let Some(&id) = self.grpc_ids.get(&id) {
                        out.push(GrpcCalloutOp::Close { id });
                    }
                }
                GrpcOp::Cancel { id } => {
                    if let Some(id) = self.grpc_ids.remove(&id) {
                        self.grpc_calls.remove(&id);
                        out.push(GrpcCalloutOp::Cancel { id });
                    }
                }
            }
        }
        out
    }

    fn on_grpc_event(
        &mut self,
        id: u64,
        event: GrpcCalloutEvent,
        head: &mut HeadPairs,
    ) -> FilterAction {
        let Some(&call) = self.grpc_calls.get(&id) else {
            return FilterAction::Pause;
        };
        let event = match event {
            GrpcCalloutEvent::InitialMetadata(h) => GrpcEvent::InitialMetadata(to_headers(&h)),
            GrpcCalloutEvent::Message(m) => GrpcEvent::Message(m.to_vec()),
            GrpcCalloutEvent::TrailingMetadata(h) => GrpcEvent::TrailingMetadata(to_headers(&h)),
            GrpcCalloutEvent::Close { status, message } => {
                // The last event of the call.
                self.grpc_calls.remove(&id);
                self.grpc_ids.remove(&call);
                GrpcEvent::Close { status, message }
            }
        };
        let action = self.stream.on_grpc_event(call, event);
        if action == Action::Continue {
            self.resumed_head(head);
        }
        convert(action)
    }

    fn resumed_body(&mut self) -> Vec<u8> {
        self.stream.take_resumed_body().unwrap_or_default()
    }

    fn records(&self) -> Vec<FilterRecord> {
        self.stream
            .decisions()
            .iter()
            .map(|d| FilterRecord {
                filter: d.filter.to_string(),
                phase: phase_name(d.phase),
                outcome: match &d.kind {
                    DecisionKind::LocalReply { status } => {
                        FilterOutcome::LocalReply { status: *status }
                    }
                    DecisionKind::HeadersModified => FilterOutcome::HeadersModified,
                    DecisionKind::BodyModified => FilterOutcome::BodyModified,
                    DecisionKind::Closed => FilterOutcome::Closed,
                    DecisionKind::Callout { upstream, status } => FilterOutcome::Callout {
                        upstream: upstream.clone(),
                        status: *status,
                    },
                    DecisionKind::GrpcCallout {
                        upstream,
                        service,
                        method,
                        grpc_status,
                    } => FilterOutcome::GrpcCallout {
                        upstream: upstream.clone(),
                        method: format!("{service}/{method}"),
                        grpc_status: *grpc_status,
                    },
                    DecisionKind::Failed { reason, outcome } => FilterOutcome::Failed {
                        reason: reason.clone(),
                        action: match outcome {
                            FailureOutcome::Rejected { status } => format!("rejected {status}"),
                            FailureOutcome::Bypassed => "bypassed".into(),
                        },
                    },
                },
            })
            .collect()
    }
}

fn phase_name(phase: Phase) -> &'static str {
    phase.as_str()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_arguments_parse_with_and_without_configuration() {
        let f = FilterSource::parse("/x/add_header.wasm=/x/cfg.json").expect("parse");
        assert_eq!(f.name, "add_header");
        assert_eq!(f.module, PathBuf::from("/x/add_header.wasm"));
        assert_eq!(f.config, Some(PathBuf::from("/x/cfg.json")));
        assert_eq!(FilterSource::parse("f.wasm").expect("parse").config, None);
        assert!(FilterSource::parse("f.wasm=").is_err());
        assert!(FilterSource::parse("=cfg").is_err());
        assert_eq!(
            parse_upstream("auth=127.0.0.1:9001").expect("parse"),
            ("auth".to_owned(), "127.0.0.1:9001".parse().expect("addr"))
        );
        let err = parse_upstream("auth:9001").expect_err("no =");
        assert!(err.to_string().contains("NAME=IP:PORT"), "{err}");
        assert!(parse_upstream("=127.0.0.1:1").is_err());
        assert!(parse_upstream("a=localhost:1").is_err());
    }
}
