//! The per-instance host state (`Store<HostState>`) and the per-stream data that is moved into
//! it for the duration of one callback.
//!
//! Streams own their data between callbacks (the chain holds it); a callback borrows nothing:
//! the data is moved into the store, the guest runs, and the data is moved back out. So a
//! stream's headers and bodies never live in an instance longer than a callback, and an
//! instance that traps cannot take another stream's data with it.

use std::collections::HashMap;
use std::sync::Arc;

use wasmtime::{Memory, ResourceLimiter, TypedFunc};

use crate::config::{FilterLog, LogLevel, LogSink};
use crate::shared::SharedState;
use crate::types::{Headers, StreamInfo};

/// A filter's settings as the instances see them (immutable for one generation).
pub(crate) struct FilterSettings {
    pub name: Arc<str>,
    pub vm_id: Arc<str>,
    pub root_id: String,
    pub plugin_config: Vec<u8>,
    pub vm_config: Vec<u8>,
    pub env: Vec<(String, String)>,
    pub log_level: LogLevel,
    pub log_sink: Option<LogSink>,
    /// Upstream names `proxy_http_call` and `proxy_grpc_call`/`_stream` may target (Envoy:
    /// cluster names); others get BAD_ARGUMENT (HTTP) or PARSE_FAILURE (gRPC), Envoy's
    /// answers for an unknown cluster.
    pub callout_upstreams: Vec<String>,
}

impl FilterSettings {
    pub fn log(&self, instance: u64, context_id: u32, level: LogLevel, message: String) {
        if level < self.log_level {
            return;
        }
        let filter = &*self.name;
        match level {
            LogLevel::Trace => tracing::trace!(filter, instance, context_id, "{message}"),
            LogLevel::Debug => tracing::debug!(filter, instance, context_id, "{message}"),
            LogLevel::Info => tracing::info!(filter, instance, context_id, "{message}"),
            LogLevel::Warn => tracing::warn!(filter, instance, context_id, "{message}"),
            LogLevel::Error | LogLevel::Critical => {
                tracing::error!(filter, instance, context_id, "{message}")
            }
        }
        if let Some(sink) = &self.log_sink {
            sink(&FilterLog {
                filter: self.name.clone(),
                instance,
                context_id,
                level,
                message,
            });
        }
    }
}

/// Request/response maps and stream facts shared by all filters of one chain stream.
#[derive(Default)]
pub(crate) struct StreamShared {
    pub info: Arc<StreamInfo>,
    pub request_headers: Headers,
    pub request_trailers: Headers,
    pub response_headers: Headers,
    pub response_trailers: Headers,
}

/// What one filter keeps for one stream between callbacks.
#[derive(Default)]
pub(crate) struct FilterStreamState {
    /// Body bytes this filter holds (buffered while it returns Pause).
    pub request_body: Vec<u8>,
    pub response_body: Vec<u8>,
    pub local_reply: Option<PendingLocalReply>,
    pub continue_requested: bool,
    pub close_requested: bool,
    pub headers_modified: bool,
    pub body_modified: bool,
    /// `proxy_set_property` values for this stream (Envoy: filter state `wasm.<path>`).
    pub properties: HashMap<Vec<u8>, Vec<u8>>,
    /// The callout response being delivered (`proxy_on_http_call_response`): map 6/7 and
    /// buffer 4 read it.
    pub call_response: Option<CallResponseData>,
    /// The gRPC event being delivered (`proxy_on_grpc_*`): maps 4/5, buffer 5 and
    /// `proxy_get_status` read it.
    pub grpc_delivery: Option<GrpcDelivery>,
    /// TCP filters: bytes this filter holds per direction (buffers 2 and 3), kept while it
    /// returns Pause, as Envoy keeps a network filter's read buffer.
    pub downstream_data: Vec<u8>,
    pub upstream_data: Vec<u8>,
}

/// One gRPC event as the guest reads it during its callback.
#[derive(Default)]
pub(crate) struct GrpcDelivery {
    pub initial_metadata: Headers,
    pub message: Vec<u8>,
    pub trailing_metadata: Headers,
    /// `proxy_get_status` during `proxy_on_grpc_close`.
    pub status: Option<(u32, String)>,
}

/// A gRPC operation the guest asked for during the current callback, collected by the chain.
pub(crate) enum PendingGrpcOp {
    Start {
        token: u32,
        upstream: String,
        service: String,
        method: String,
        metadata: Headers,
        message: Option<Vec<u8>>,
        timeout_ms: u32,
    },
    Send {
        token: u32,
        message: Vec<u8>,
        end_stream: bool,
    },
    Close {
        token: u32,
    },
    Cancel {
        token: u32,
    },
}

/// A live gRPC token of this instance (Envoy's `grpc_call_request_` / `grpc_stream_`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct GrpcToken {
    /// The stream context that made it.
    pub context: u32,
    /// `proxy_grpc_stream` (else a unary `proxy_grpc_call`).
    pub stream: bool,
    /// The guest half-closed it (`proxy_grpc_close` of a stream).
    pub local_closed: bool,
}

/// A callout's response as the guest reads it during `proxy_on_http_call_response`.
#[derive(Default)]
pub(crate) struct CallResponseData {
    pub headers: Headers,
    pub body: Vec<u8>,
    pub trailers: Headers,
}

/// A `proxy_http_call` the guest made, waiting for the proxy to dispatch it.
pub(crate) struct PendingCall {
    pub token: u32,
    pub upstream: String,
    pub headers: Headers,
    pub body: Vec<u8>,
    pub trailers: Headers,
    pub timeout_ms: u32,
}

pub(crate) struct PendingLocalReply {
    pub status: u16,
    pub details: String,
    pub body: Vec<u8>,
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    pub grpc_status: Option<u32>,
}

/// The stream whose data is inside the store for the current callback.
pub(crate) struct LoadedStream {
    pub context_id: u32,
    pub shared: StreamShared,
    pub own: FilterStreamState,
}

/// Memory cap enforcement, remembering whether a grow was refused (to name the failure).
pub(crate) struct Limiter {
    pub memory_limit: usize,
    pub grow_denied: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_limit {
            self.grow_denied = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }

    fn instances(&self) -> usize {
        1
    }

    fn memories(&self) -> usize {
        1
    }

    fn tables(&self) -> usize {
        4
    }
}

/// Everything a hostcall can reach. One per instance.
pub(crate) struct HostState {
    pub settings: Arc<FilterSettings>,
    pub shared: Arc<SharedState>,
    pub instance_id: u64,
    pub limiter: Limiter,
    pub memory: Option<Memory>,
    /// Behind an `Arc`: hostcalls clone it per call, and cloning a `TypedFunc` itself copies
    /// its `FuncType` through the engine's type registry.
    pub allocator: Option<Arc<TypedFunc<u32, u32>>>,
    /// Live context ids → their root (0 for the root itself).
    pub contexts: HashMap<u32, u32>,
    /// The context whose callback is running, and the one `proxy_set_effective_context` chose.
    pub current_context: u32,
    pub effective_context: u32,
    pub stream: Option<LoadedStream>,
    /// Largest body a guest may build with `proxy_set_buffer_bytes` (the buffering limit).
    pub max_body: usize,
    pub tick_period_ms: u32,
    /// Contexts whose `proxy_on_done` returned false (waiting for `proxy_done`).
    pub pending_done: Vec<u32>,
    /// `proxy_set_property` outside a stream (per instance).
    pub root_properties: HashMap<Vec<u8>, Vec<u8>>,
    /// `proxy_http_call`s made during the current callback, collected by the chain after it.
    pub pending_calls: Vec<PendingCall>,
    /// Next callout token, HTTP and gRPC alike (unique per instance: the SDK panics on a
    /// token it does not know).
    pub next_call_token: u32,
    /// gRPC operations made during the current callback, collected by the chain after it.
    pub pending_grpc: Vec<PendingGrpcOp>,
    /// Live gRPC calls and streams by token.
    pub grpc_tokens: HashMap<u32, GrpcToken>,
}

impl HostState {
    pub fn log(&self, level: LogLevel, message: String) {
        self.settings
            .log(self.instance_id, self.effective_context, level, message);
    }

    /// The loaded stream, if the effective context is that stream.
    pub fn stream(&self) -> Option<&LoadedStream> {
        self.stream
            .as_ref()
            .filter(|s| s.context_id == self.effective_context)
    }

    pub fn stream_mut(&mut self) -> Option<&mut LoadedStream> {
        let ctx = self.effective_context;
        self.stream.as_mut().filter(|s| s.context_id == ctx)
    }
}
