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
    pub allocator: Option<TypedFunc<u32, u32>>,
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
