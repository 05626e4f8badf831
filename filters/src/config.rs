//! Host-wide and per-filter settings, with their units and defaults. Plain structs: the lead
//! maps the `WasmFilter` resource (and the proxy's command line) onto them.

use std::time::Duration;

/// Settings shared by every filter of one [`crate::FilterHost`] (one engine).
#[derive(Clone)]
pub struct HostConfig {
    /// Period of the epoch ticker thread that drives callback deadlines. Default 1 ms: a
    /// deadline of `d` fires after between `d - tick` and `d`.
    pub epoch_tick: Duration,
    /// Pooling allocator: how many instances (and linear memories) may live at once across all
    /// filters. Each slot reserves address space (not memory). Default 128.
    pub max_instances: u32,
    /// Pooling allocator: the largest linear memory any instance may grow to, in bytes. A
    /// filter's `memory_limit` must not exceed it. Default 256 MiB.
    pub max_memory_per_instance: usize,
    /// Where filter logs (`proxy_log`, WASI stdout/stderr, trap reports) go besides `tracing`.
    pub log_sink: Option<LogSink>,
}

impl std::fmt::Debug for HostConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostConfig")
            .field("epoch_tick", &self.epoch_tick)
            .field("max_instances", &self.max_instances)
            .field("max_memory_per_instance", &self.max_memory_per_instance)
            .field("log_sink", &self.log_sink.is_some())
            .finish()
    }
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            epoch_tick: Duration::from_millis(1),
            max_instances: 128,
            max_memory_per_instance: 256 << 20,
            log_sink: None,
        }
    }
}

/// A callback receiving every filter log record (tests and the access log use it).
pub type LogSink = std::sync::Arc<dyn Fn(&FilterLog) + Send + Sync>;

/// One log line produced by or about a filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterLog {
    pub filter: std::sync::Arc<str>,
    /// The instance (VM) that produced it.
    pub instance: u64,
    /// The context that was running (0 when none).
    pub context_id: u32,
    pub level: LogLevel,
    pub message: String,
}

/// proxy-wasm log levels (`proxy_log_level_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

impl LogLevel {
    pub fn from_abi(level: u32) -> Option<Self> {
        Some(match level {
            0 => LogLevel::Trace,
            1 => LogLevel::Debug,
            2 => LogLevel::Info,
            3 => LogLevel::Warn,
            4 => LogLevel::Error,
            5 => LogLevel::Critical,
            _ => return None,
        })
    }
}

/// What happens to a stream when its filter instance fails (trap, deadline, memory cap,
/// failed boot). In every case only the streams of the failed instance are affected: the
/// instance is discarded and later streams get a fresh one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Answer the affected streams with `status` (Envoy's FAIL_CLOSED uses 503). Replacement
    /// instances boot on demand.
    FailClosed { status: u16 },
    /// Skip the filter for the affected streams (Envoy's FAIL_OPEN).
    FailOpen,
    /// Like `FailClosed`, but replacement instances boot with exponential backoff (Envoy's
    /// FAIL_RELOAD): after `n` consecutive failures no instance is booted for
    /// `min(base × 2^(n-1), max)`, and streams arriving meanwhile get `status`.
    Reload {
        status: u16,
        backoff_base: Duration,
        backoff_max: Duration,
    },
}

impl Default for FailurePolicy {
    fn default() -> Self {
        FailurePolicy::FailClosed { status: 503 }
    }
}

/// Resource limits of one filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilterLimits {
    /// Wall-clock budget of one callback (epoch deadline). Default 10 ms.
    pub callback_deadline: Duration,
    /// Budget for booting an instance (`_initialize`, root context, `proxy_on_vm_start`,
    /// `proxy_on_configure`). Default 1 s.
    pub boot_deadline: Duration,
    /// Linear memory cap of one instance, in bytes. Default 64 MiB.
    pub memory_limit: usize,
    /// Most bytes a filter may buffer per body direction by returning Pause; beyond it the
    /// stream gets a 413 local reply (Envoy's buffer limit behaviour). Default 1 MiB.
    pub max_buffered_body: usize,
}

impl Default for FilterLimits {
    fn default() -> Self {
        Self {
            callback_deadline: Duration::from_millis(10),
            boot_deadline: Duration::from_secs(1),
            memory_limit: 64 << 20,
            max_buffered_body: 1 << 20,
        }
    }
}

/// What a filter filters: HTTP streams (the `WasmFilter` default) or TCP connections (the
/// proxy-wasm stream context: L4 relays, the TLS relay).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FilterProtocol {
    #[default]
    Http,
    Tcp,
}

impl FilterProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            FilterProtocol::Http => "http",
            FilterProtocol::Tcp => "tcp",
        }
    }
}

/// One filter as configured: its module, configuration and policies.
#[derive(Debug, Clone)]
pub struct FilterSpec {
    /// Name used in logs, metrics and errors (the `WasmFilter` resource name).
    pub name: String,
    /// The module bytes (binary Wasm).
    pub module: Vec<u8>,
    /// Plugin configuration (`PLUGIN_CONFIGURATION` buffer, `proxy_on_configure`).
    pub config: Vec<u8>,
    /// VM configuration (`VM_CONFIGURATION` buffer, `proxy_on_vm_start`).
    pub vm_config: Vec<u8>,
    /// `plugin_root_id` property. Default empty.
    pub root_id: String,
    /// Namespace of shared data and queues (`plugin_vm_id`). Default: the filter name.
    pub vm_id: Option<String>,
    pub failure_policy: FailurePolicy,
    pub limits: FilterLimits,
    /// Instances kept per filter; streams are spread over them (a stream stays on one).
    /// Default: the number of CPUs.
    pub instances: usize,
    /// Environment the guest sees through WASI `environ_get` (never the host's).
    pub env: Vec<(String, String)>,
    /// Lowest level forwarded from `proxy_log` (also what `proxy_get_log_level` returns).
    pub log_level: LogLevel,
    /// Upstream names this filter may call with `proxy_http_call` (the proxy maps each name
    /// to an address). Calls to other names get BAD_ARGUMENT, as Envoy answers for an unknown
    /// cluster. Default: none.
    pub callout_upstreams: Vec<String>,
    /// HTTP or TCP. A module whose exports declare stream callbacks of the other kind only
    /// is refused at load. Default: HTTP.
    pub protocol: FilterProtocol,
}

impl FilterSpec {
    pub fn new(name: impl Into<String>, module: Vec<u8>) -> Self {
        Self {
            name: name.into(),
            module,
            config: Vec::new(),
            vm_config: Vec::new(),
            root_id: String::new(),
            vm_id: None,
            failure_policy: FailurePolicy::default(),
            limits: FilterLimits::default(),
            instances: std::thread::available_parallelism().map_or(2, |n| n.get()),
            env: Vec::new(),
            log_level: LogLevel::Info,
            callout_upstreams: Vec::new(),
            protocol: FilterProtocol::Http,
        }
    }

    pub fn with_protocol(mut self, protocol: FilterProtocol) -> Self {
        self.protocol = protocol;
        self
    }

    pub fn with_callout_upstreams(mut self, names: impl IntoIterator<Item = String>) -> Self {
        self.callout_upstreams = names.into_iter().collect();
        self
    }

    pub fn with_config(mut self, config: impl Into<Vec<u8>>) -> Self {
        self.config = config.into();
        self
    }

    pub fn with_failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.failure_policy = policy;
        self
    }

    pub fn with_limits(mut self, limits: FilterLimits) -> Self {
        self.limits = limits;
        self
    }
}
