//! `membrane-filter-sdk`: write HTTP and TCP filters for membrane in Rust, compiled to `wasm32-wasip1`.
//!
//! Filters use the proxy-wasm ABI v0.2.1 imports, exactly as Envoy's SDKs do, so a filter
//! built with this crate also runs in Envoy. What this crate adds over the raw ABI:
//! - typed phases ([`Filter`] + [`StreamFilter`]) with [`Action`]s, including a local
//!   [`Reply`];
//! - **no panics on host statuses**: every host call returns `Result<_, Error>`; an error from a
//!   phase method is logged and answered by [`StreamFilter::on_error`] (default: 503), instead
//!   of trapping the whole instance;
//! - typed properties: [`source_identity`] / [`destination_identity`] (the node's numeric
//!   security identity, 8-byte little-endian on the wire) and [`source_labels`] /
//!   [`destination_labels`] (a decoded map), plus namespace, workload and address;
//! - [`Http::request_header_values`]: every value of a repeated header (the ABI's
//!   single-value getter returns only the first one);
//! - gRPC callouts ([`dispatch_grpc_call`], [`open_grpc_stream`]) answered in
//!   [`StreamFilter::on_grpc`] with a typed [`GrpcResponse`];
//! - TCP (stream) filters: [`TcpFilter`] / [`ConnectionFilter`], registered with
//!   [`register_tcp!`].
//!
//! Must not depend on any other crate of this workspace: it is published on its own.
//!
//! # Phase chart
//!
//! ```text
//!  instance start ─ Filter::configure(config bytes)        once per instance (Err ⇒ filter rejected)
//!  each request:
//!    Filter::new_stream(&self)                             a StreamFilter for this request
//!    StreamFilter::on_request_headers(http, eos)  ─┐
//!    StreamFilter::on_request_body(http, size, eos)│ request path, chain order
//!                                                  │   Continue ⇒ next filter / upstream
//!                                                  │   Pause    ⇒ body: buffer, call again with the next chunk
//!                                                  │   Reply    ⇒ answer now (the response phases still run on it)
//!    StreamFilter::on_response_headers(http, eos) ─┤ response path, reverse chain order
//!    StreamFilter::on_response_body(http, size, eos)┘
//!    StreamFilter::on_log(http)                      always, once (also after a Reply or a reset)
//! ```
//!
//! # Example
//!
//! ```no_run
//! use membrane_filter_sdk::{Action, Error, Filter, Http, StreamFilter};
//!
//! struct AddHeader { value: String }
//!
//! impl Filter for AddHeader {
//!     type Stream = AddHeaderStream;
//!     fn configure(config: &[u8]) -> Result<Self, Error> {
//!         Ok(Self { value: String::from_utf8_lossy(config).into_owned() })
//!     }
//!     fn new_stream(&self) -> AddHeaderStream { AddHeaderStream { value: self.value.clone() } }
//! }
//!
//! struct AddHeaderStream { value: String }
//!
//! impl StreamFilter for AddHeaderStream {
//!     fn on_response_headers(&mut self, http: &Http, _eos: bool) -> Result<Action, Error> {
//!         http.add_response_header("x-added", &self.value)?;
//!         Ok(Action::Continue)
//!     }
//! }
//!
//! membrane_filter_sdk::register!(AddHeader);
//! ```

mod dispatch;
mod grpc;
#[doc(hidden)]
pub mod hostcalls;
mod pairs;
mod tcp;

pub use grpc::{GrpcCall, GrpcResponse, GrpcStream, dispatch_grpc_call, open_grpc_stream};
pub use tcp::{Connection, ConnectionFilter, Peer, TcpAction, TcpFilter};

use std::fmt;

pub use pairs::{Pairs, decode_pairs, encode_pairs};

#[doc(hidden)]
pub mod __private {
    //! Used by [`crate::register!`]; not part of the API.
    pub use crate::dispatch::*;
    pub use crate::tcp::dispatch as tcp;
}

// ---------------------------------------------------------------------------------------------
// Errors

/// A proxy-wasm status other than OK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    NotFound,
    BadArgument,
    SerializationFailure,
    ParseFailure,
    InvalidMemoryAccess,
    Empty,
    CasMismatch,
    InternalFailure,
    Unimplemented,
    Other(u32),
}

impl Status {
    pub fn from_code(code: u32) -> Option<Status> {
        Some(match code {
            0 => return None,
            1 => Status::NotFound,
            2 => Status::BadArgument,
            3 => Status::SerializationFailure,
            4 => Status::ParseFailure,
            6 => Status::InvalidMemoryAccess,
            7 => Status::Empty,
            8 => Status::CasMismatch,
            10 => Status::InternalFailure,
            12 => Status::Unimplemented,
            other => Status::Other(other),
        })
    }
}

/// Errors of SDK calls. Nothing in this crate panics on a host answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A host call answered a status other than OK.
    Host { call: &'static str, status: Status },
    /// A value from the host did not decode (e.g. an identity that is not 8 bytes).
    Decode { what: String, reason: String },
    /// The filter's configuration is invalid.
    Config(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Host { call, status } => write!(f, "{call} failed: {status:?}"),
            Error::Decode { what, reason } => write!(f, "cannot decode {what}: {reason}"),
            Error::Config(reason) => write!(f, "invalid configuration: {reason}"),
        }
    }
}

impl std::error::Error for Error {}

pub(crate) fn check(call: &'static str, code: u32) -> Result<(), Error> {
    match Status::from_code(code) {
        None => Ok(()),
        Some(status) => Err(Error::Host { call, status }),
    }
}

/// Takes ownership of a buffer the host allocated through `proxy_on_memory_allocate`.
///
/// # Safety
/// `ptr`/`len` must come from a host call that just returned OK (the host allocated `len`
/// bytes with this module's allocator, or returned NULL).
pub(crate) unsafe fn take_buffer(ptr: *mut u8, len: usize) -> Vec<u8> {
    if ptr.is_null() || len == 0 {
        return Vec::new();
    }
    // SAFETY: per the contract, the host allocated exactly `len` bytes through
    // `proxy_on_memory_allocate` (a `Vec<u8>` of capacity `len` that we leaked) and filled them.
    unsafe { Vec::from_raw_parts(ptr, len, len) }
}

// ---------------------------------------------------------------------------------------------
// Logging and time

/// proxy-wasm log levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

/// Logs through the host (tagged there with the filter name and context id).
pub fn log(level: Level, message: &str) {
    // SAFETY: pointer and length describe `message`, valid for the call.
    let _ = unsafe { hostcalls::proxy_log(level as u32, message.as_ptr(), message.len()) };
}

/// `info!("x = {}", x)`-style logging at each level.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log($crate::Level::Info, &::std::format!($($arg)*)) };
}
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => { $crate::log($crate::Level::Debug, &::std::format!($($arg)*)) };
}
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::log($crate::Level::Warn, &::std::format!($($arg)*)) };
}
#[macro_export]
macro_rules! error {
    ($($arg:tt)*) => { $crate::log($crate::Level::Error, &::std::format!($($arg)*)) };
}

/// The host's wall clock (`proxy_get_current_time_nanoseconds`).
pub fn now() -> Result<std::time::SystemTime, Error> {
    let mut nanos = 0u64;
    // SAFETY: `nanos` is a valid u64 for the host to write.
    check("proxy_get_current_time_nanoseconds", unsafe {
        hostcalls::proxy_get_current_time_nanoseconds(&mut nanos)
    })?;
    Ok(std::time::UNIX_EPOCH + std::time::Duration::from_nanos(nanos))
}

// ---------------------------------------------------------------------------------------------
// Shared data

/// Reads `key` from the host's shared data (shared by every instance of the filter, and of
/// other filters with the same VM id): `(value, cas)`, `None` when the key is absent. Pass
/// the `cas` to [`set_shared_data`] to update only if nobody wrote in between.
pub fn get_shared_data(key: &str) -> Result<Option<(Vec<u8>, u32)>, Error> {
    let mut ptr = std::ptr::null_mut();
    let mut len = 0usize;
    let mut cas = 0u32;
    // SAFETY: pointer/length describe `key`; out-pointers are valid locals.
    let code = unsafe {
        hostcalls::proxy_get_shared_data(key.as_ptr(), key.len(), &mut ptr, &mut len, &mut cas)
    };
    if code == 1 {
        return Ok(None); // NOT_FOUND
    }
    check("proxy_get_shared_data", code)?;
    // SAFETY: the call returned OK with a host-allocated buffer.
    Ok(Some((unsafe { take_buffer(ptr, len) }, cas)))
}

/// Writes `key`. With `cas: Some(c)` the write happens only if the value's cas is still `c`
/// (else `Err(Error::Host { status: Status::CasMismatch, .. })`); `None` writes
/// unconditionally.
pub fn set_shared_data(key: &str, value: &[u8], cas: Option<u32>) -> Result<(), Error> {
    // SAFETY: pointer/length pairs describe `key` and `value`.
    check("proxy_set_shared_data", unsafe {
        hostcalls::proxy_set_shared_data(
            key.as_ptr(),
            key.len(),
            value.as_ptr(),
            value.len(),
            cas.unwrap_or(0),
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Buffers, configuration

const BUFFER_REQUEST_BODY: u32 = 0;
const BUFFER_RESPONSE_BODY: u32 = 1;
pub(crate) const BUFFER_DOWNSTREAM_DATA: u32 = 2;
pub(crate) const BUFFER_UPSTREAM_DATA: u32 = 3;
pub(crate) const BUFFER_GRPC_RECEIVE: u32 = 5;
const BUFFER_VM_CONFIGURATION: u32 = 6;
pub(crate) const BUFFER_PLUGIN_CONFIGURATION: u32 = 7;

pub(crate) fn get_buffer(kind: u32, start: usize, max: usize) -> Result<Vec<u8>, Error> {
    let mut ptr = std::ptr::null_mut();
    let mut len = 0usize;
    // SAFETY: out-pointers are valid locals.
    let code = unsafe { hostcalls::proxy_get_buffer_bytes(kind, start, max, &mut ptr, &mut len) };
    if code == 1 {
        return Ok(Vec::new()); // NOT_FOUND: no such buffer in this phase
    }
    check("proxy_get_buffer_bytes", code)?;
    // SAFETY: the call returned OK with a host-allocated buffer.
    Ok(unsafe { take_buffer(ptr, len) })
}

pub(crate) fn set_buffer(kind: u32, start: usize, size: usize, data: &[u8]) -> Result<(), Error> {
    // SAFETY: pointer and length describe `data`.
    check("proxy_set_buffer_bytes", unsafe {
        hostcalls::proxy_set_buffer_bytes(kind, start, size, data.as_ptr(), data.len())
    })
}

/// The VM configuration (`VM_CONFIGURATION`).
pub fn vm_config() -> Result<Vec<u8>, Error> {
    get_buffer(BUFFER_VM_CONFIGURATION, 0, usize::MAX)
}

// ---------------------------------------------------------------------------------------------
// Properties

/// Reads a property by path segments (`&["request", "path"]`); `None` when the host has none.
pub fn property(path: &[&str]) -> Result<Option<Vec<u8>>, Error> {
    let joined = path.join("\0");
    let mut ptr = std::ptr::null_mut();
    let mut len = 0usize;
    // SAFETY: pointer/length describe `joined`; out-pointers are valid locals.
    let code =
        unsafe { hostcalls::proxy_get_property(joined.as_ptr(), joined.len(), &mut ptr, &mut len) };
    if code == 1 {
        return Ok(None);
    }
    check("proxy_get_property", code)?;
    // SAFETY: the call returned OK with a host-allocated buffer.
    Ok(Some(unsafe { take_buffer(ptr, len) }))
}

fn property_string(path: &[&str]) -> Result<Option<String>, Error> {
    property(path)?
        .map(|v| {
            String::from_utf8(v).map_err(|e| Error::Decode {
                what: path.join("."),
                reason: e.to_string(),
            })
        })
        .transpose()
}

fn property_u64(path: &[&str]) -> Result<Option<u64>, Error> {
    property(path)?
        .map(|v| {
            <[u8; 8]>::try_from(v.as_slice())
                .map(u64::from_le_bytes)
                .map_err(|_| Error::Decode {
                    what: path.join("."),
                    reason: format!("expected 8 bytes (little-endian uint), got {}", v.len()),
                })
        })
        .transpose()
}

fn property_map(path: &[&str]) -> Result<Option<Vec<(String, String)>>, Error> {
    property(path)?
        .map(|v| {
            decode_pairs(&v)
                .map(|pairs| {
                    pairs
                        .into_iter()
                        .map(|(k, v)| {
                            (
                                String::from_utf8_lossy(&k).into_owned(),
                                String::from_utf8_lossy(&v).into_owned(),
                            )
                        })
                        .collect()
                })
                .map_err(|reason| Error::Decode {
                    what: path.join("."),
                    reason,
                })
        })
        .transpose()
}

/// The client's numeric security identity (property `source.identity`).
pub fn source_identity() -> Result<Option<u64>, Error> {
    property_u64(&["source", "identity"])
}

/// The server's numeric security identity (property `destination.identity`).
pub fn destination_identity() -> Result<Option<u64>, Error> {
    property_u64(&["destination", "identity"])
}

/// Labels of the client's identity (property `source.labels`).
pub fn source_labels() -> Result<Option<Vec<(String, String)>>, Error> {
    property_map(&["source", "labels"])
}

/// Labels of the server's identity (property `destination.labels`).
pub fn destination_labels() -> Result<Option<Vec<(String, String)>>, Error> {
    property_map(&["destination", "labels"])
}

/// Client `ip:port` (property `source.address`).
pub fn source_address() -> Result<Option<String>, Error> {
    property_string(&["source", "address"])
}

/// Server `ip:port` (property `destination.address`).
pub fn destination_address() -> Result<Option<String>, Error> {
    property_string(&["destination", "address"])
}

/// The client's namespace (property `source.namespace`).
pub fn source_namespace() -> Result<Option<String>, Error> {
    property_string(&["source", "namespace"])
}

/// The client's workload name (property `source.workload`).
pub fn source_workload() -> Result<Option<String>, Error> {
    property_string(&["source", "workload"])
}

/// The server's namespace (property `destination.namespace`).
pub fn destination_namespace() -> Result<Option<String>, Error> {
    property_string(&["destination", "namespace"])
}

/// The server's workload name (property `destination.workload`).
pub fn destination_workload() -> Result<Option<String>, Error> {
    property_string(&["destination", "workload"])
}

// ---------------------------------------------------------------------------------------------
// Metrics and callouts

/// A filter-defined metric (exported by the host, shared by all instances of the filter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metric(u32);

impl Metric {
    fn define(kind: u32, name: &str) -> Result<Metric, Error> {
        let mut id = 0u32;
        // SAFETY: pointer/length describe `name`; `id` is a valid out-pointer.
        check("proxy_define_metric", unsafe {
            hostcalls::proxy_define_metric(kind, name.as_ptr(), name.len(), &mut id)
        })?;
        Ok(Metric(id))
    }

    pub fn counter(name: &str) -> Result<Metric, Error> {
        Self::define(0, name)
    }

    pub fn gauge(name: &str) -> Result<Metric, Error> {
        Self::define(1, name)
    }

    pub fn histogram(name: &str) -> Result<Metric, Error> {
        Self::define(2, name)
    }

    /// Counters: `delta > 0`; gauges: any.
    pub fn increment(self, delta: i64) -> Result<(), Error> {
        // SAFETY: plain integer arguments.
        check("proxy_increment_metric", unsafe {
            hostcalls::proxy_increment_metric(self.0, delta)
        })
    }

    /// Counter: add; gauge: set; histogram: record.
    pub fn record(self, value: u64) -> Result<(), Error> {
        // SAFETY: plain integer arguments.
        check("proxy_record_metric", unsafe {
            hostcalls::proxy_record_metric(self.0, value)
        })
    }

    pub fn value(self) -> Result<u64, Error> {
        let mut v = 0u64;
        // SAFETY: `v` is a valid out-pointer.
        check("proxy_get_metric", unsafe {
            hostcalls::proxy_get_metric(self.0, &mut v)
        })?;
        Ok(v)
    }
}

/// Starts an HTTP callout to a named upstream; returns the call token. Hosts answer
/// `BadArgument` for an upstream they do not know (membrane: the names given with
/// `membrane proxy --filter-upstream NAME=IP:PORT`). This SDK has no callout-response phase
/// yet; filters that pause and resume on a callout use the upstream `proxy-wasm` crate.
pub fn dispatch_http_call(
    upstream: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: std::time::Duration,
) -> Result<u32, Error> {
    let headers = encode_pairs(headers.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())));
    let mut token = 0u32;
    // SAFETY: every pointer/length pair describes a live local buffer.
    check("proxy_http_call", unsafe {
        hostcalls::proxy_http_call(
            upstream.as_ptr(),
            upstream.len(),
            headers.as_ptr(),
            headers.len(),
            body.as_ptr(),
            body.len(),
            std::ptr::null(),
            0,
            u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
            &mut token,
        )
    })?;
    Ok(token)
}

// ---------------------------------------------------------------------------------------------
// HTTP access

const MAP_REQUEST_HEADERS: u32 = 0;
const MAP_RESPONSE_HEADERS: u32 = 2;
pub(crate) const MAP_GRPC_INITIAL_METADATA: u32 = 4;
pub(crate) const MAP_GRPC_TRAILING_METADATA: u32 = 5;

/// Access to the current stream's headers and bodies, valid inside a phase method.
#[derive(Debug)]
pub struct Http {
    _private: (),
}

fn map_get(map: u32, name: &str) -> Result<Option<Vec<u8>>, Error> {
    let mut ptr = std::ptr::null_mut();
    let mut len = 0usize;
    // SAFETY: pointer/length describe `name`; out-pointers are valid locals.
    let code = unsafe {
        hostcalls::proxy_get_header_map_value(map, name.as_ptr(), name.len(), &mut ptr, &mut len)
    };
    if code == 1 {
        return Ok(None);
    }
    check("proxy_get_header_map_value", code)?;
    // SAFETY: the call returned OK with a host-allocated buffer (or NULL for empty).
    Ok(Some(unsafe { take_buffer(ptr, len) }))
}

pub(crate) fn map_pairs(map: u32) -> Result<Vec<(String, Vec<u8>)>, Error> {
    let mut ptr = std::ptr::null_mut();
    let mut len = 0usize;
    // SAFETY: out-pointers are valid locals.
    check("proxy_get_header_map_pairs", unsafe {
        hostcalls::proxy_get_header_map_pairs(map, &mut ptr, &mut len)
    })?;
    // SAFETY: the call returned OK with a host-allocated buffer.
    let bytes = unsafe { take_buffer(ptr, len) };
    let pairs = decode_pairs(&bytes).map_err(|reason| Error::Decode {
        what: "header map".into(),
        reason,
    })?;
    Ok(pairs
        .into_iter()
        .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), v))
        .collect())
}

fn map_write(replace: bool, map: u32, name: &str, value: &[u8]) -> Result<(), Error> {
    // SAFETY: pointer/length pairs describe `name` and `value`.
    let code = unsafe {
        if replace {
            hostcalls::proxy_replace_header_map_value(
                map,
                name.as_ptr(),
                name.len(),
                value.as_ptr(),
                value.len(),
            )
        } else {
            hostcalls::proxy_add_header_map_value(
                map,
                name.as_ptr(),
                name.len(),
                value.as_ptr(),
                value.len(),
            )
        }
    };
    let call = if replace {
        "proxy_replace_header_map_value"
    } else {
        "proxy_add_header_map_value"
    };
    check(call, code)
}

fn map_remove(map: u32, name: &str) -> Result<(), Error> {
    // SAFETY: pointer/length describe `name`.
    check("proxy_remove_header_map_value", unsafe {
        hostcalls::proxy_remove_header_map_value(map, name.as_ptr(), name.len())
    })
}

fn lossy(v: Option<Vec<u8>>) -> Option<String> {
    v.map(|v| String::from_utf8_lossy(&v).into_owned())
}

impl Http {
    pub(crate) const fn new() -> Http {
        Http { _private: () }
    }

    /// First value of a request header (names are case-insensitive, pseudo-headers such as
    /// `:path` included).
    pub fn request_header(&self, name: &str) -> Result<Option<String>, Error> {
        map_get(MAP_REQUEST_HEADERS, name).map(lossy)
    }

    pub fn request_header_bytes(&self, name: &str) -> Result<Option<Vec<u8>>, Error> {
        map_get(MAP_REQUEST_HEADERS, name)
    }

    /// Every value of a (possibly repeated) request header, in order.
    pub fn request_header_values(&self, name: &str) -> Result<Vec<Vec<u8>>, Error> {
        Ok(map_pairs(MAP_REQUEST_HEADERS)?
            .into_iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
            .collect())
    }

    /// All request headers, in order.
    pub fn request_headers(&self) -> Result<Vec<(String, Vec<u8>)>, Error> {
        map_pairs(MAP_REQUEST_HEADERS)
    }

    pub fn add_request_header(&self, name: &str, value: &str) -> Result<(), Error> {
        map_write(false, MAP_REQUEST_HEADERS, name, value.as_bytes())
    }

    /// Sets (replaces every value of) a request header.
    pub fn set_request_header(&self, name: &str, value: &str) -> Result<(), Error> {
        map_write(true, MAP_REQUEST_HEADERS, name, value.as_bytes())
    }

    pub fn remove_request_header(&self, name: &str) -> Result<(), Error> {
        map_remove(MAP_REQUEST_HEADERS, name)
    }

    /// `:path` (with query).
    pub fn path(&self) -> Result<Option<String>, Error> {
        self.request_header(":path")
    }

    pub fn method(&self) -> Result<Option<String>, Error> {
        self.request_header(":method")
    }

    pub fn authority(&self) -> Result<Option<String>, Error> {
        self.request_header(":authority")
    }

    pub fn response_header(&self, name: &str) -> Result<Option<String>, Error> {
        map_get(MAP_RESPONSE_HEADERS, name).map(lossy)
    }

    pub fn response_headers(&self) -> Result<Vec<(String, Vec<u8>)>, Error> {
        map_pairs(MAP_RESPONSE_HEADERS)
    }

    pub fn add_response_header(&self, name: &str, value: &str) -> Result<(), Error> {
        map_write(false, MAP_RESPONSE_HEADERS, name, value.as_bytes())
    }

    pub fn set_response_header(&self, name: &str, value: &str) -> Result<(), Error> {
        map_write(true, MAP_RESPONSE_HEADERS, name, value.as_bytes())
    }

    pub fn remove_response_header(&self, name: &str) -> Result<(), Error> {
        map_remove(MAP_RESPONSE_HEADERS, name)
    }

    /// The request body buffered so far (all of it when called in `on_request_body`).
    pub fn request_body(&self) -> Result<Vec<u8>, Error> {
        get_buffer(BUFFER_REQUEST_BODY, 0, usize::MAX)
    }

    /// Replaces the whole buffered request body.
    pub fn set_request_body(&self, body: &[u8]) -> Result<(), Error> {
        set_buffer(BUFFER_REQUEST_BODY, 0, usize::MAX, body)
    }

    pub fn response_body(&self) -> Result<Vec<u8>, Error> {
        get_buffer(BUFFER_RESPONSE_BODY, 0, usize::MAX)
    }

    pub fn set_response_body(&self, body: &[u8]) -> Result<(), Error> {
        set_buffer(BUFFER_RESPONSE_BODY, 0, usize::MAX, body)
    }
}

// ---------------------------------------------------------------------------------------------
// Filters

/// What a phase asks the proxy to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Go on with the (possibly modified) headers or body.
    Continue,
    /// Body phases: buffer this chunk and call again with the next one (cumulative size).
    Pause,
    /// Answer the client now; the request is not forwarded.
    Reply(Reply),
}

/// A local reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Response code details (shows up in access logs).
    pub details: String,
    /// For gRPC clients: a trailers-only reply with this `grpc-status`.
    pub grpc_status: Option<u32>,
}

impl Reply {
    pub fn new(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            details: String::new(),
            grpc_status: None,
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Reply {
        self.body = body.into();
        self
    }

    pub fn details(mut self, details: &str) -> Reply {
        self.details = details.to_owned();
        self
    }

    /// A gRPC error reply for gRPC clients: HTTP 200, trailers-only, with this
    /// `grpc-status` and `message` (as `grpc-message`).
    pub fn grpc(status: u32, message: &str) -> Reply {
        Reply {
            status: 200,
            headers: Vec::new(),
            body: message.as_bytes().to_vec(),
            details: message.to_owned(),
            grpc_status: Some(status),
        }
    }

    pub(crate) fn send(&self) -> Result<(), Error> {
        let headers = encode_pairs(
            self.headers
                .iter()
                .map(|(k, v)| (k.as_bytes(), v.as_bytes())),
        );
        let grpc = self
            .grpc_status
            .and_then(|g| i32::try_from(g).ok())
            .unwrap_or(-1);
        // SAFETY: every pointer/length pair describes a live buffer of `self` or a local.
        check("proxy_send_local_response", unsafe {
            hostcalls::proxy_send_local_response(
                u32::from(self.status),
                self.details.as_ptr(),
                self.details.len(),
                self.body.as_ptr(),
                self.body.len(),
                headers.as_ptr(),
                headers.len(),
                grpc,
            )
        })
    }
}

/// The plugin: built from the configuration once per instance; makes a [`StreamFilter`] per
/// request.
pub trait Filter: Sized + 'static {
    type Stream: StreamFilter;

    /// Parses the plugin configuration. An error rejects the configuration (the host keeps
    /// the previous one, or refuses to load the filter).
    fn configure(config: &[u8]) -> Result<Self, Error>;

    /// A per-request filter.
    fn new_stream(&self) -> Self::Stream;
}

/// Per-request phase methods. Every method has a default that continues.
pub trait StreamFilter: 'static {
    fn on_request_headers(&mut self, _http: &Http, _end_of_stream: bool) -> Result<Action, Error> {
        Ok(Action::Continue)
    }

    /// `body_size` is the total buffered so far; read it with [`Http::request_body`].
    fn on_request_body(
        &mut self,
        _http: &Http,
        _body_size: usize,
        _end_of_stream: bool,
    ) -> Result<Action, Error> {
        Ok(Action::Continue)
    }

    fn on_response_headers(&mut self, _http: &Http, _end_of_stream: bool) -> Result<Action, Error> {
        Ok(Action::Continue)
    }

    fn on_response_body(
        &mut self,
        _http: &Http,
        _body_size: usize,
        _end_of_stream: bool,
    ) -> Result<Action, Error> {
        Ok(Action::Continue)
    }

    /// An answer to a gRPC call or stream this stream made ([`dispatch_grpc_call`],
    /// [`open_grpc_stream`]; `token` is theirs). The returned action applies to the phase
    /// that paused for it: `Continue` resumes it, `Reply` answers the client, `Pause` keeps
    /// waiting (more stream events, another call). Default: resume.
    fn on_grpc(
        &mut self,
        _http: &Http,
        _token: u32,
        _response: GrpcResponse,
    ) -> Result<Action, Error> {
        Ok(Action::Continue)
    }

    /// After the stream ended (access-log phase); headers are still readable.
    fn on_log(&mut self, _http: &Http) {}

    /// What to do when a phase method returned an error (already logged). Default: fail closed
    /// with 503, like a crashed filter in Envoy, but without losing the instance.
    fn on_error(&mut self, _error: &Error) -> Action {
        Action::Reply(Reply::new(503).details("filter_error"))
    }
}
