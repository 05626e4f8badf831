//! gRPC callouts: unary calls ([`dispatch_grpc_call`]) and streams ([`open_grpc_stream`]) to
//! a named upstream, with what comes back delivered to the stream that made them
//! ([`crate::StreamFilter::on_grpc`]) as a typed [`GrpcResponse`].
//!
//! The host delivers gRPC events to the root context with a token; this module remembers
//! which stream context made each token and switches to it
//! (`proxy_set_effective_context`) before calling the filter, as the upstream SDK does.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::time::Duration;

use crate::{Error, check, encode_pairs, hostcalls, take_buffer};

thread_local! {
    /// The stream context whose phase method is running (0 outside one).
    static CURRENT: Cell<u32> = const { Cell::new(0) };
    /// Live tokens → the context that made them, and whether it is a unary call.
    static OWNERS: RefCell<HashMap<u32, (u32, bool)>> = RefCell::new(HashMap::new());
}

pub(crate) fn set_current(ctx: u32) {
    CURRENT.with(|c| c.set(ctx));
}

pub(crate) fn owner(token: u32) -> Option<(u32, bool)> {
    OWNERS.with(|o| o.borrow().get(&token).copied())
}

pub(crate) fn forget(token: u32) {
    OWNERS.with(|o| o.borrow_mut().remove(&token));
}

/// Forgets every token of a context that is going away.
pub(crate) fn forget_context(ctx: u32) {
    OWNERS.with(|o| o.borrow_mut().retain(|_, (c, _)| *c != ctx));
}

fn remember(token: u32, unary: bool) -> Result<(), Error> {
    let ctx = CURRENT.with(Cell::get);
    if ctx == 0 {
        // Outside a stream's phase the answer would have nowhere to go.
        return Err(Error::Config(
            "gRPC calls can only be made from a stream's phase methods".into(),
        ));
    }
    OWNERS.with(|o| o.borrow_mut().insert(token, (ctx, unary)));
    Ok(())
}

/// What came back on a gRPC call or stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrpcResponse {
    /// A unary call's response message (the call is over), or one message of a stream.
    Message(Vec<u8>),
    /// A stream's response headers.
    InitialMetadata(Vec<(String, Vec<u8>)>),
    /// A stream's trailers.
    TrailingMetadata(Vec<(String, Vec<u8>)>),
    /// The call ended: for a unary call only when it failed (status ≠ 0: unreachable server
    /// UNAVAILABLE 14, timeout DEADLINE_EXCEEDED 4, or the server's error status); for a
    /// stream always, with the server's status.
    Close { status: u32, message: String },
}

/// A unary call in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcCall {
    token: u32,
}

impl GrpcCall {
    /// The token [`crate::StreamFilter::on_grpc`] receives for it.
    pub fn token(&self) -> u32 {
        self.token
    }

    /// Abandons the call: nothing more is delivered for it.
    pub fn cancel(&self) -> Result<(), Error> {
        forget(self.token);
        // SAFETY: plain integer argument.
        check("proxy_grpc_cancel", unsafe {
            hostcalls::proxy_grpc_cancel(self.token)
        })
    }
}

/// A gRPC stream in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcStream {
    token: u32,
}

impl GrpcStream {
    pub fn token(&self) -> u32 {
        self.token
    }

    /// Sends one message (the host adds the gRPC length prefix); `end_stream` half-closes.
    pub fn send(&self, message: &[u8], end_stream: bool) -> Result<(), Error> {
        // SAFETY: pointer/length describe `message`.
        check("proxy_grpc_send", unsafe {
            hostcalls::proxy_grpc_send(
                self.token,
                message.as_ptr(),
                message.len(),
                u32::from(end_stream),
            )
        })
    }

    /// Half-closes: no more messages; the server's answer still arrives.
    pub fn close(&self) -> Result<(), Error> {
        // SAFETY: plain integer argument.
        check("proxy_grpc_close", unsafe {
            hostcalls::proxy_grpc_close(self.token)
        })
    }

    /// Resets the stream: nothing more is delivered for it.
    pub fn cancel(&self) -> Result<(), Error> {
        forget(self.token);
        // SAFETY: plain integer argument.
        check("proxy_grpc_cancel", unsafe {
            hostcalls::proxy_grpc_cancel(self.token)
        })
    }
}

fn millis(timeout: Duration) -> u32 {
    u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX)
}

/// Calls `/{service}/{method}` on the named upstream with one request `message` (protobuf
/// bytes). Return `Action::Pause` from the phase to wait for the answer, delivered to
/// [`crate::StreamFilter::on_grpc`]. Hosts answer `ParseFailure` for an upstream they do not
/// know (membrane: the filter's `--filter-upstream` / `spec.upstreams` names).
pub fn dispatch_grpc_call(
    upstream: &str,
    service: &str,
    method: &str,
    metadata: &[(&str, &[u8])],
    message: &[u8],
    timeout: Duration,
) -> Result<GrpcCall, Error> {
    let metadata = encode_pairs(metadata.iter().map(|(k, v)| (k.as_bytes(), *v)));
    let mut token = 0u32;
    // SAFETY: every pointer/length pair describes a live local buffer; `token` is a valid
    // out-pointer.
    check("proxy_grpc_call", unsafe {
        hostcalls::proxy_grpc_call(
            upstream.as_ptr(),
            upstream.len(),
            service.as_ptr(),
            service.len(),
            method.as_ptr(),
            method.len(),
            metadata.as_ptr(),
            metadata.len(),
            message.as_ptr(),
            message.len(),
            millis(timeout),
            &mut token,
        )
    })?;
    remember(token, true)?;
    Ok(GrpcCall { token })
}

/// Opens a stream to `/{service}/{method}` on the named upstream; feed it with
/// [`GrpcStream::send`].
pub fn open_grpc_stream(
    upstream: &str,
    service: &str,
    method: &str,
    metadata: &[(&str, &[u8])],
) -> Result<GrpcStream, Error> {
    let metadata = encode_pairs(metadata.iter().map(|(k, v)| (k.as_bytes(), *v)));
    let mut token = 0u32;
    // SAFETY: as in `dispatch_grpc_call`.
    check("proxy_grpc_stream", unsafe {
        hostcalls::proxy_grpc_stream(
            upstream.as_ptr(),
            upstream.len(),
            service.as_ptr(),
            service.len(),
            method.as_ptr(),
            method.len(),
            metadata.as_ptr(),
            metadata.len(),
            &mut token,
        )
    })?;
    remember(token, false)?;
    Ok(GrpcStream { token })
}

/// `proxy_get_status` during `proxy_on_grpc_close`: (status, message).
pub(crate) fn status() -> Result<(u32, String), Error> {
    let mut code = 0u32;
    let mut ptr = std::ptr::null_mut();
    let mut len = 0usize;
    // SAFETY: out-pointers are valid locals.
    check("proxy_get_status", unsafe {
        hostcalls::proxy_get_status(&mut code, &mut ptr, &mut len)
    })?;
    // SAFETY: the call returned OK with a host-allocated buffer (or NULL).
    let message = unsafe { take_buffer(ptr, len) };
    Ok((code, String::from_utf8_lossy(&message).into_owned()))
}
