//! The `env.proxy_*` host functions (proxy-wasm ABI v0.2.1) and the WASI preview1 subset
//! filters import, registered once on the host's `Linker`.
//!
//! Rules every function here follows:
//! - Guest pointers and lengths are checked against the current memory size; a bad one gets
//!   `INVALID_MEMORY_ACCESS` (WASI: `FAULT`), never a host panic.
//! - Statuses are the ones Envoy returns, restricted to what the Rust SDK accepts (reference
//!   §1.5): writes that cannot apply (map absent in this phase, stream gone) return OK and
//!   log at debug level; reads return NOT_FOUND.
//! - Results are returned by allocating in the guest through its own allocator
//!   (`proxy_on_memory_allocate`, else `malloc`), which may re-enter hostcalls: no borrow of
//!   guest memory or host state is held across that call.
//! - Only a guest-caused failure that the ABI cannot express (a trapping allocator,
//!   `proc_exit`) turns into a trap.

use std::time::{SystemTime, UNIX_EPOCH};

use wasmtime::{Caller, Linker};

use crate::abi::{
    MAX_MAP_BYTES, MAX_MAP_PAIRS, MAX_RANDOM_BYTES, buffer, decode_pairs, encode_pairs, errno, map,
    split_property_path, status, stream,
};
use crate::config::LogLevel;
use crate::properties;
use crate::state::{GrpcToken, HostState, PendingCall, PendingGrpcOp, PendingLocalReply};

/// Most `proxy_http_call`s one callback may make (bounds what a guest makes the proxy do).
const MAX_CALLS_PER_CALLBACK: usize = 16;
/// Most gRPC operations (starts, sends, closes) one callback may queue.
const MAX_GRPC_OPS_PER_CALLBACK: usize = 64;
/// Largest gRPC message a guest may send (gRPC's default receive limit, 4 MiB).
pub(crate) const MAX_GRPC_MESSAGE: usize = 4 << 20;
use crate::types::Headers;

type C<'a> = Caller<'a, HostState>;
type R = wasmtime::Result<u32>;

/// A hostcall step's failure: a status to return, or a trap to propagate.
enum Fail {
    Status(u32),
    Trap(wasmtime::Error),
}

impl From<u32> for Fail {
    fn from(s: u32) -> Self {
        Fail::Status(s)
    }
}

fn done(r: Result<(), Fail>) -> R {
    match r {
        Ok(()) => Ok(status::OK),
        Err(Fail::Status(s)) => Ok(s),
        Err(Fail::Trap(e)) => Err(e),
    }
}

fn range(len: usize, ptr: u32, size: u32) -> Result<std::ops::Range<usize>, u32> {
    let start = ptr as usize;
    let end = start
        .checked_add(size as usize)
        .ok_or(status::INVALID_MEMORY_ACCESS)?;
    if end > len {
        return Err(status::INVALID_MEMORY_ACCESS);
    }
    Ok(start..end)
}

/// Copies `size` bytes at `ptr` out of guest memory.
fn read(c: &mut C<'_>, ptr: u32, size: u32) -> Result<Vec<u8>, u32> {
    let memory = c.data().memory.ok_or(status::INVALID_MEMORY_ACCESS)?;
    let data = memory.data(&*c);
    Ok(data[range(data.len(), ptr, size)?].to_vec())
}

fn write(c: &mut C<'_>, ptr: u32, bytes: &[u8]) -> Result<(), u32> {
    let memory = c.data().memory.ok_or(status::INVALID_MEMORY_ACCESS)?;
    let data = memory.data_mut(&mut *c);
    let r = range(data.len(), ptr, bytes.len() as u32)?;
    data[r].copy_from_slice(bytes);
    Ok(())
}

fn write_u32(c: &mut C<'_>, ptr: u32, v: u32) -> Result<(), u32> {
    write(c, ptr, &v.to_le_bytes())
}

fn write_u64(c: &mut C<'_>, ptr: u32, v: u64) -> Result<(), u32> {
    write(c, ptr, &v.to_le_bytes())
}

/// Allocates `bytes.len()` in the guest, copies `bytes` there and stores the pointer and size
/// at `ret_ptr`/`ret_size`. Empty data is returned as (NULL, 0) without allocating.
fn copy_out(c: &mut C<'_>, bytes: &[u8], ret_ptr: u32, ret_size: u32) -> Result<(), Fail> {
    if bytes.len() > u32::MAX as usize {
        return Err(status::INTERNAL_FAILURE.into());
    }
    let ptr = if bytes.is_empty() {
        0
    } else {
        let alloc = c.data().allocator.clone().ok_or(status::INTERNAL_FAILURE)?;
        let ptr = alloc
            .call(&mut *c, bytes.len() as u32)
            .map_err(Fail::Trap)?;
        if ptr == 0 {
            return Err(status::INTERNAL_FAILURE.into());
        }
        // The allocator may have grown (moved) memory: `write` re-reads the current size.
        write(c, ptr, bytes)?;
        ptr
    };
    write_u32(c, ret_ptr, ptr)?;
    write_u32(c, ret_size, bytes.len() as u32)?;
    Ok(())
}

fn utf8_lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The header map `map_type` of the loaded stream (effective context only).
fn header_map(state: &HostState, map_type: u32) -> Option<&Headers> {
    if let map::HTTP_CALL_RESPONSE_HEADERS | map::HTTP_CALL_RESPONSE_TRAILERS = map_type {
        // The callout response belongs to the callback, whatever the effective context.
        let r = state.stream.as_ref()?.own.call_response.as_ref()?;
        return Some(if map_type == map::HTTP_CALL_RESPONSE_HEADERS {
            &r.headers
        } else {
            &r.trailers
        });
    }
    if let map::GRPC_INITIAL_METADATA | map::GRPC_TRAILING_METADATA = map_type {
        let d = state.stream.as_ref()?.own.grpc_delivery.as_ref()?;
        return Some(if map_type == map::GRPC_INITIAL_METADATA {
            &d.initial_metadata
        } else {
            &d.trailing_metadata
        });
    }
    let s = state.stream()?;
    Some(match map_type {
        map::HTTP_REQUEST_HEADERS => &s.shared.request_headers,
        map::HTTP_REQUEST_TRAILERS => &s.shared.request_trailers,
        map::HTTP_RESPONSE_HEADERS => &s.shared.response_headers,
        map::HTTP_RESPONSE_TRAILERS => &s.shared.response_trailers,
        _ => return None,
    })
}

fn header_map_mut(state: &mut HostState, map_type: u32) -> Option<&mut Headers> {
    if map_type > map::HTTP_RESPONSE_TRAILERS {
        return None;
    }
    let s = state.stream_mut()?;
    s.own.headers_modified = true;
    Some(match map_type {
        map::HTTP_REQUEST_HEADERS => &mut s.shared.request_headers,
        map::HTTP_REQUEST_TRAILERS => &mut s.shared.request_trailers,
        map::HTTP_RESPONSE_HEADERS => &mut s.shared.response_headers,
        _ => &mut s.shared.response_trailers,
    })
}

/// A readable buffer: `Ok(None)` when it does not exist in this callback (NOT_FOUND),
/// `Err(BAD_ARGUMENT)` for an unknown buffer type.
fn buffer_of(st: &HostState, kind: u32) -> Result<Option<&[u8]>, u32> {
    Ok(match kind {
        buffer::VM_CONFIGURATION => Some(&st.settings.vm_config),
        buffer::PLUGIN_CONFIGURATION => Some(&st.settings.plugin_config),
        buffer::HTTP_REQUEST_BODY => st.stream().map(|s| &s.own.request_body[..]),
        buffer::HTTP_RESPONSE_BODY => st.stream().map(|s| &s.own.response_body[..]),
        buffer::DOWNSTREAM_DATA => st.stream().map(|s| &s.own.downstream_data[..]),
        buffer::UPSTREAM_DATA => st.stream().map(|s| &s.own.upstream_data[..]),
        buffer::HTTP_CALL_RESPONSE_BODY => call_body(st),
        // The message being delivered (`proxy_on_grpc_receive`), whatever the effective
        // context, as the callout response body.
        buffer::GRPC_RECEIVE_BUFFER => st
            .stream
            .as_ref()
            .and_then(|s| s.own.grpc_delivery.as_ref())
            .map(|d| &d.message[..]),
        buffer::FOREIGN_FUNCTION_ARGUMENTS => None,
        _ => return Err(status::BAD_ARGUMENT),
    })
}

/// The body of the callout response being delivered.
fn call_body(state: &HostState) -> Option<&[u8]> {
    let r = state.stream.as_ref()?.own.call_response.as_ref()?;
    Some(&r.body)
}

fn valid_map_type(map_type: u32) -> bool {
    map_type <= map::HTTP_CALL_RESPONSE_TRAILERS
}

/// Registers every `env` and WASI function on `linker`.
pub(crate) fn register(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    register_env(linker)?;
    for module in ["wasi_snapshot_preview1", "wasi_unstable"] {
        register_wasi(linker, module)?;
    }
    Ok(())
}

fn register_env(l: &mut Linker<HostState>) -> wasmtime::Result<()> {
    // ---- logging, clock, timers, lifecycle ----
    l.func_wrap(
        "env",
        "proxy_log",
        |mut c: C<'_>, level: u32, ptr: u32, size: u32| -> R {
            let Some(level) = LogLevel::from_abi(level) else {
                return Ok(status::BAD_ARGUMENT);
            };
            match read(&mut c, ptr, size) {
                Ok(msg) => {
                    c.data().log(level, utf8_lossy(&msg));
                    Ok(status::OK)
                }
                Err(s) => Ok(s),
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_log_level",
        |mut c: C<'_>, ret: u32| -> R {
            let level = c.data().settings.log_level as u32;
            done(write_u32(&mut c, ret, level).map_err(Fail::from))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut c: C<'_>, ret: u32| -> R {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            done(write_u64(&mut c, ret, now).map_err(Fail::from))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |mut c: C<'_>, ms: u32| -> R {
            // Recorded per instance (one root context each); ticks are delivered by
            // `Filter::tick` (see the crate docs).
            c.data_mut().tick_period_ms = ms;
            Ok(status::OK)
        },
    )?;
    l.func_wrap("env", "proxy_done", |mut c: C<'_>| -> R {
        let ctx = c.data().effective_context;
        let pending = &mut c.data_mut().pending_done;
        match pending.iter().position(|p| *p == ctx) {
            Some(i) => {
                pending.swap_remove(i);
                Ok(status::OK)
            }
            None => Ok(status::NOT_FOUND),
        }
    })?;
    l.func_wrap(
        "env",
        "proxy_set_effective_context",
        |mut c: C<'_>, ctx: u32| -> R {
            if !c.data().contexts.contains_key(&ctx) {
                return Ok(status::BAD_ARGUMENT);
            }
            c.data_mut().effective_context = ctx;
            Ok(status::OK)
        },
    )?;

    // ---- buffers ----
    l.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut c: C<'_>, kind: u32, start: u32, max: u32, ret_ptr: u32, ret_size: u32| -> R {
            let data = {
                let st = c.data();
                let buf = match buffer_of(st, kind) {
                    Ok(b) => b,
                    Err(s) => return Ok(s),
                };
                let Some(buf) = buf else {
                    return Ok(status::NOT_FOUND);
                };
                // The SDK passes max = usize::MAX: clamp in 64-bit.
                let start = (start as usize).min(buf.len());
                let end = (start as u64 + u64::from(max)).min(buf.len() as u64) as usize;
                buf[start..end].to_vec()
            };
            done(copy_out(&mut c, &data, ret_ptr, ret_size))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_buffer_status",
        |mut c: C<'_>, kind: u32, ret_size: u32, ret_flags: u32| -> R {
            let st = c.data();
            let len = match buffer_of(st, kind) {
                Ok(b) => b.map(<[u8]>::len),
                Err(s) => return Ok(s),
            };
            let Some(len) = len else {
                return Ok(status::NOT_FOUND);
            };
            done(
                write_u32(&mut c, ret_size, len as u32)
                    .and_then(|()| write_u32(&mut c, ret_flags, 0))
                    .map_err(Fail::from),
            )
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut c: C<'_>, kind: u32, start: u32, size: u32, ptr: u32, len: u32| -> R {
            let data = match read(&mut c, ptr, len) {
                Ok(d) => d,
                Err(s) => return Ok(s),
            };
            let st = c.data_mut();
            let max_body = st.max_body;
            let Some(s) = st.stream_mut() else {
                return Ok(if kind <= buffer::FOREIGN_FUNCTION_ARGUMENTS {
                    status::OK
                } else {
                    status::BAD_ARGUMENT
                });
            };
            let buf = match kind {
                buffer::HTTP_REQUEST_BODY => &mut s.own.request_body,
                buffer::HTTP_RESPONSE_BODY => &mut s.own.response_body,
                buffer::DOWNSTREAM_DATA => &mut s.own.downstream_data,
                buffer::UPSTREAM_DATA => &mut s.own.upstream_data,
                k if k <= buffer::FOREIGN_FUNCTION_ARGUMENTS => return Ok(status::OK),
                _ => return Ok(status::BAD_ARGUMENT),
            };
            // Replace `size` bytes at `start`: (0,0) prepends, start >= len appends.
            let start = (start as usize).min(buf.len());
            let end = (start as u64 + u64::from(size)).min(buf.len() as u64) as usize;
            // A guest must not grow host memory without bound (the same limit as buffering).
            if buf.len() - (end - start) + data.len() > max_body {
                return Ok(status::BAD_ARGUMENT);
            }
            buf.splice(start..end, data);
            s.own.body_modified = true;
            Ok(status::OK)
        },
    )?;

    // ---- header maps ----
    l.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut c: C<'_>, map_type: u32, ret_ptr: u32, ret_size: u32| -> R {
            if !valid_map_type(map_type) {
                return Ok(status::BAD_ARGUMENT);
            }
            // The SDK accepts only OK here (a missing map would panic it): absent ⇒ empty.
            let bytes = match header_map(c.data(), map_type) {
                Some(h) => encode_pairs(h.entries().iter().map(|(k, v)| (k, v))),
                None => Vec::new(),
            };
            done(copy_out(&mut c, &bytes, ret_ptr, ret_size))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_header_map_pairs",
        |mut c: C<'_>, map_type: u32, ptr: u32, size: u32| -> R {
            if !valid_map_type(map_type) {
                return Ok(status::BAD_ARGUMENT);
            }
            if size as usize > MAX_MAP_BYTES {
                return Ok(status::BAD_ARGUMENT);
            }
            let bytes = match read(&mut c, ptr, size) {
                Ok(b) => b,
                Err(s) => return Ok(s),
            };
            let pairs = match decode_pairs(&bytes) {
                Ok(p) => p,
                Err(e) => {
                    c.data()
                        .log(LogLevel::Debug, format!("proxy_set_header_map_pairs: {e}"));
                    return Ok(status::BAD_ARGUMENT);
                }
            };
            if let Some(h) = header_map_mut(c.data_mut(), map_type) {
                h.set_all(pairs);
            }
            Ok(status::OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_header_map_size",
        |mut c: C<'_>, map_type: u32, ret: u32| -> R {
            if !valid_map_type(map_type) {
                return Ok(status::BAD_ARGUMENT);
            }
            let size = header_map(c.data(), map_type).map_or(0, |h| {
                encode_pairs(h.entries().iter().map(|(k, v)| (k, v))).len() as u32
            });
            done(write_u32(&mut c, ret, size).map_err(Fail::from))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut c: C<'_>, map_type: u32, kp: u32, kl: u32, ret_ptr: u32, ret_size: u32| -> R {
            if !valid_map_type(map_type) {
                return Ok(status::BAD_ARGUMENT);
            }
            let key = match read(&mut c, kp, kl) {
                Ok(k) => k,
                Err(s) => return Ok(s),
            };
            let Some(value) = header_map(c.data(), map_type).and_then(|h| h.get(&key)) else {
                return Ok(status::NOT_FOUND);
            };
            let value = value.to_vec();
            done(copy_out(&mut c, &value, ret_ptr, ret_size))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_add_header_map_value",
        |mut c: C<'_>, map_type: u32, kp: u32, kl: u32, vp: u32, vl: u32| -> R {
            map_write(&mut c, map_type, kp, kl, Some((vp, vl)), |h, k, v| {
                h.add(k, v)
            })
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_replace_header_map_value",
        |mut c: C<'_>, map_type: u32, kp: u32, kl: u32, vp: u32, vl: u32| -> R {
            map_write(&mut c, map_type, kp, kl, Some((vp, vl)), |h, k, v| {
                h.replace(k, v)
            })
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut c: C<'_>, map_type: u32, kp: u32, kl: u32| -> R {
            map_write(&mut c, map_type, kp, kl, None, |h, k, _| h.remove(k))
        },
    )?;

    // ---- stream control ----
    l.func_wrap(
        "env",
        "proxy_continue_stream",
        |mut c: C<'_>, kind: u32| -> R {
            match kind {
                stream::HTTP_REQUEST | stream::HTTP_RESPONSE | stream::DOWNSTREAM => {
                    if let Some(s) = c.data_mut().stream_mut() {
                        s.own.continue_requested = true;
                    }
                    Ok(status::OK)
                }
                // Envoy: continuing the upstream side is not supported.
                stream::UPSTREAM => Ok(status::UNIMPLEMENTED),
                _ => Ok(status::BAD_ARGUMENT),
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_close_stream",
        |mut c: C<'_>, kind: u32| -> R {
            if kind > stream::UPSTREAM {
                return Ok(status::BAD_ARGUMENT);
            }
            if let Some(s) = c.data_mut().stream_mut() {
                s.own.close_requested = true;
            }
            Ok(status::OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut c: C<'_>,
         code: u32,
         dp: u32,
         dl: u32,
         bp: u32,
         bl: u32,
         hp: u32,
         hl: u32,
         grpc: i32|
         -> R {
            let (details, body, headers) = match (
                read(&mut c, dp, dl),
                read(&mut c, bp, bl),
                read(&mut c, hp, hl),
            ) {
                (Ok(d), Ok(b), Ok(h)) => (d, b, h),
                (Err(s), _, _) | (_, Err(s), _) | (_, _, Err(s)) => return Ok(s),
            };
            let headers = match decode_pairs(&headers) {
                Ok(h) => h,
                Err(e) => {
                    c.data().log(
                        LogLevel::Debug,
                        format!("proxy_send_local_response headers: {e}"),
                    );
                    return Ok(status::BAD_ARGUMENT);
                }
            };
            // Envoy maps out-of-range codes to 500-ish failures; we accept 100..=599.
            let status_code = u16::try_from(code)
                .ok()
                .filter(|c| (100..=599).contains(c))
                .unwrap_or(500);
            // -1 (or anything out of gRPC's 0..=16) means "no grpc-status".
            let grpc_status = u32::try_from(grpc).ok().filter(|g| *g <= 16);
            let st = c.data_mut();
            match st.stream_mut() {
                Some(s) => {
                    s.own.local_reply = Some(PendingLocalReply {
                        status: status_code,
                        details: utf8_lossy(&details),
                        body,
                        headers,
                        grpc_status,
                    });
                }
                None => st.log(
                    LogLevel::Debug,
                    "proxy_send_local_response outside a stream: ignored".into(),
                ),
            }
            Ok(status::OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_status",
        |mut c: C<'_>, ret_code: u32, ret_ptr: u32, ret_size: u32| -> R {
            // During proxy_on_grpc_close: the call's gRPC status and message (Envoy's
            // status_code_/status_message_); otherwise OK, 0, "".
            let (code, message) = c
                .data()
                .stream
                .as_ref()
                .and_then(|s| s.own.grpc_delivery.as_ref())
                .and_then(|d| d.status.clone())
                .unwrap_or((0, String::new()));
            done(
                write_u32(&mut c, ret_code, code)
                    .map_err(Fail::from)
                    .and_then(|()| copy_out(&mut c, message.as_bytes(), ret_ptr, ret_size)),
            )
        },
    )?;

    // ---- HTTP and gRPC callouts ----
    l.func_wrap(
        "env",
        "proxy_http_call",
        |mut c: C<'_>,
         up: u32,
         ul: u32,
         hp: u32,
         hl: u32,
         bp: u32,
         bl: u32,
         tp: u32,
         tl: u32,
         timeout_ms: u32,
         ret: u32|
         -> R {
            let (upstream, headers, body, trailers) = match (
                read(&mut c, up, ul),
                read(&mut c, hp, hl),
                read(&mut c, bp, bl),
                read(&mut c, tp, tl),
            ) {
                (Ok(u), Ok(h), Ok(b), Ok(t)) => (utf8_lossy(&u), h, b, t),
                (Err(s), _, _, _) | (_, Err(s), _, _) | (_, _, Err(s), _) | (_, _, _, Err(s)) => {
                    return Ok(s);
                }
            };
            let st = c.data();
            let refuse = |why: String| {
                st.log(LogLevel::Debug, format!("proxy_http_call: {why}"));
                Ok(status::BAD_ARGUMENT)
            };
            // Envoy answers BAD_ARGUMENT for an upstream (cluster) it does not know.
            if !st.settings.callout_upstreams.contains(&upstream) {
                return refuse(format!("upstream {upstream:?} is not configured"));
            }
            // Calls are dispatched by the proxy for a stream; a root context (on_tick,
            // on_configure) has no stream to carry one.
            if st.stream.is_none() {
                return refuse("only streams can make callouts in this host".into());
            }
            if st.pending_calls.len() >= MAX_CALLS_PER_CALLBACK {
                return refuse(format!(
                    "more than {MAX_CALLS_PER_CALLBACK} calls in one callback"
                ));
            }
            let (headers, trailers) = match (decode_pairs(&headers), decode_pairs(&trailers)) {
                (Ok(h), Ok(t)) => (Headers::from_pairs(h), Headers::from_pairs(t)),
                (Err(e), _) | (_, Err(e)) => return refuse(format!("pairs: {e}")),
            };
            // Envoy requires these three (and answers BAD_ARGUMENT without them).
            for required in [":method", ":path", ":authority"] {
                if headers.get(required).is_none_or(|v| v.is_empty()) {
                    return refuse(format!("header {required} is missing"));
                }
            }
            let st = c.data_mut();
            let token = st.next_call_token;
            st.next_call_token = st.next_call_token.wrapping_add(1).max(1);
            st.pending_calls.push(PendingCall {
                token,
                upstream,
                headers,
                body,
                trailers,
                timeout_ms,
            });
            if let Err(s) = write_u32(&mut c, ret, token) {
                c.data_mut().pending_calls.pop();
                return Ok(s);
            }
            Ok(status::OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_grpc_call",
        |mut c: C<'_>,
         up: u32,
         ul: u32,
         sp: u32,
         sl: u32,
         mp: u32,
         ml: u32,
         ip: u32,
         il: u32,
         msgp: u32,
         msgl: u32,
         timeout_ms: u32,
         ret: u32|
         -> R {
            let message = match read(&mut c, msgp, msgl) {
                Ok(m) => m,
                Err(s) => return Ok(s),
            };
            grpc_start(
                &mut c,
                GrpcTarget {
                    upstream: (up, ul),
                    service: (sp, sl),
                    method: (mp, ml),
                    metadata: (ip, il),
                },
                Some(message),
                timeout_ms,
                ret,
            )
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_grpc_stream",
        |mut c: C<'_>,
         up: u32,
         ul: u32,
         sp: u32,
         sl: u32,
         mp: u32,
         ml: u32,
         ip: u32,
         il: u32,
         ret: u32|
         -> R {
            grpc_start(
                &mut c,
                GrpcTarget {
                    upstream: (up, ul),
                    service: (sp, sl),
                    method: (mp, ml),
                    metadata: (ip, il),
                },
                None,
                0,
                ret,
            )
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_grpc_send",
        |mut c: C<'_>, token: u32, p: u32, len: u32, end: u32| -> R {
            let message = match read(&mut c, p, len) {
                Ok(m) => m,
                Err(s) => return Ok(s),
            };
            let st = c.data_mut();
            // Envoy: a unary call's token ⇒ BAD_ARGUMENT; unknown ⇒ NOT_FOUND.
            let Some(t) = st.grpc_tokens.get_mut(&token) else {
                return Ok(status::NOT_FOUND);
            };
            if !t.stream {
                return Ok(status::BAD_ARGUMENT);
            }
            if t.local_closed {
                // Sending after a half-close: Envoy's stream ignores it; so do we.
                return Ok(status::OK);
            }
            if message.len() > MAX_GRPC_MESSAGE
                || st.pending_grpc.len() >= MAX_GRPC_OPS_PER_CALLBACK
            {
                return Ok(status::BAD_ARGUMENT);
            }
            t.local_closed = end != 0;
            st.pending_grpc.push(PendingGrpcOp::Send {
                token,
                message,
                end_stream: end != 0,
            });
            Ok(status::OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_grpc_cancel",
        |mut c: C<'_>, token: u32| -> R {
            // Envoy: cancel a call / reset a stream; no callback follows.
            let st = c.data_mut();
            if st.grpc_tokens.remove(&token).is_none() {
                return Ok(status::NOT_FOUND);
            }
            st.pending_grpc.push(PendingGrpcOp::Cancel { token });
            Ok(status::OK)
        },
    )?;
    l.func_wrap("env", "proxy_grpc_close", |mut c: C<'_>, token: u32| -> R {
        // Envoy: closing a unary call cancels it (no callback follows); closing a stream
        // half-closes it (the server's answer still arrives).
        let st = c.data_mut();
        let Some(t) = st.grpc_tokens.get_mut(&token) else {
            return Ok(status::NOT_FOUND);
        };
        if !t.stream {
            st.grpc_tokens.remove(&token);
            st.pending_grpc.push(PendingGrpcOp::Cancel { token });
            return Ok(status::OK);
        }
        if !t.local_closed {
            t.local_closed = true;
            st.pending_grpc.push(PendingGrpcOp::Close { token });
        }
        Ok(status::OK)
    })?;

    // ---- shared data and queues ----
    l.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut c: C<'_>, kp: u32, kl: u32, ret_ptr: u32, ret_size: u32, ret_cas: u32| -> R {
            let key = match read(&mut c, kp, kl) {
                Ok(k) => k,
                Err(s) => return Ok(s),
            };
            let st = c.data();
            let Some((value, cas)) = st.shared.get_data(&st.settings.vm_id, &key) else {
                return Ok(status::NOT_FOUND);
            };
            done(
                copy_out(&mut c, &value, ret_ptr, ret_size)
                    .and_then(|()| write_u32(&mut c, ret_cas, cas).map_err(Fail::from)),
            )
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_shared_data",
        |mut c: C<'_>, kp: u32, kl: u32, vp: u32, vl: u32, cas: u32| -> R {
            let (key, value) = match (read(&mut c, kp, kl), read(&mut c, vp, vl)) {
                (Ok(k), Ok(v)) => (k, v),
                (Err(s), _) | (_, Err(s)) => return Ok(s),
            };
            let st = c.data();
            Ok(st.shared.set_data(&st.settings.vm_id, &key, &value, cas))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_register_shared_queue",
        |mut c: C<'_>, np: u32, nl: u32, ret: u32| -> R {
            let name = match read(&mut c, np, nl) {
                Ok(n) => n,
                Err(s) => return Ok(s),
            };
            let st = c.data();
            let id = st.shared.register_queue(&st.settings.vm_id, &name);
            done(write_u32(&mut c, ret, id).map_err(Fail::from))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_resolve_shared_queue",
        |mut c: C<'_>, vp: u32, vl: u32, np: u32, nl: u32, ret: u32| -> R {
            let (vm, name) = match (read(&mut c, vp, vl), read(&mut c, np, nl)) {
                (Ok(v), Ok(n)) => (v, n),
                (Err(s), _) | (_, Err(s)) => return Ok(s),
            };
            let Some(id) = c.data().shared.resolve_queue(&vm, &name) else {
                return Ok(status::NOT_FOUND);
            };
            done(write_u32(&mut c, ret, id).map_err(Fail::from))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_enqueue_shared_queue",
        |mut c: C<'_>, id: u32, vp: u32, vl: u32| -> R {
            let value = match read(&mut c, vp, vl) {
                Ok(v) => v,
                Err(s) => return Ok(s),
            };
            Ok(c.data().shared.enqueue(id, &value))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_dequeue_shared_queue",
        |mut c: C<'_>, id: u32, ret_ptr: u32, ret_size: u32| -> R {
            match c.data().shared.dequeue(id) {
                Ok(v) => done(copy_out(&mut c, &v, ret_ptr, ret_size)),
                Err(s) => Ok(s),
            }
        },
    )?;

    // ---- metrics ----
    l.func_wrap(
        "env",
        "proxy_define_metric",
        |mut c: C<'_>, kind: u32, np: u32, nl: u32, ret: u32| -> R {
            let name = match read(&mut c, np, nl) {
                Ok(n) => n,
                Err(s) => return Ok(s),
            };
            let st = c.data();
            match st
                .shared
                .define_metric(&st.settings.name, kind, &utf8_lossy(&name))
            {
                Ok(id) => done(write_u32(&mut c, ret, id).map_err(Fail::from)),
                Err(s) => Ok(s),
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_increment_metric",
        |c: C<'_>, id: u32, delta: i64| -> R {
            let st = c.data();
            Ok(st.shared.increment_metric(&st.settings.name, id, delta))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_record_metric",
        |c: C<'_>, id: u32, value: u64| -> R {
            let st = c.data();
            Ok(st.shared.record_metric(&st.settings.name, id, value))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_metric",
        |mut c: C<'_>, id: u32, ret: u32| -> R {
            let st = c.data();
            match st.shared.get_metric(&st.settings.name, id) {
                Ok(v) => done(write_u64(&mut c, ret, v).map_err(Fail::from)),
                Err(s) => Ok(s),
            }
        },
    )?;

    // ---- properties ----
    l.func_wrap(
        "env",
        "proxy_get_property",
        |mut c: C<'_>, pp: u32, pl: u32, ret_ptr: u32, ret_size: u32| -> R {
            let raw = match read(&mut c, pp, pl) {
                Ok(p) => p,
                Err(s) => return Ok(s),
            };
            let path = split_property_path(&raw);
            match properties::get(c.data(), &path, &raw) {
                Ok(value) => done(copy_out(&mut c, &value, ret_ptr, ret_size)),
                Err(s) => Ok(s),
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_property",
        |mut c: C<'_>, pp: u32, pl: u32, vp: u32, vl: u32| -> R {
            let (path, value) = match (read(&mut c, pp, pl), read(&mut c, vp, vl)) {
                (Ok(p), Ok(v)) => (p, v),
                (Err(s), _) | (_, Err(s)) => return Ok(s),
            };
            let path = path.strip_suffix(&[0]).map(<[u8]>::to_vec).unwrap_or(path);
            let st = c.data_mut();
            // Envoy stores these as filter state; the SDK accepts only OK here.
            match st.stream_mut() {
                Some(s) => {
                    s.own.properties.insert(path, value);
                }
                None => {
                    st.root_properties.insert(path, value);
                }
            }
            Ok(status::OK)
        },
    )?;

    // ---- foreign functions ----
    l.func_wrap(
        "env",
        "proxy_call_foreign_function",
        |mut c: C<'_>, np: u32, nl: u32, ap: u32, al: u32, _ret_ptr: u32, _ret_size: u32| -> R {
            let name = match read(&mut c, np, nl) {
                Ok(n) => n,
                Err(s) => return Ok(s),
            };
            if let Err(s) = read(&mut c, ap, al) {
                return Ok(s);
            }
            c.data().log(
                LogLevel::Debug,
                format!(
                    "proxy_call_foreign_function: {:?} is not registered",
                    utf8_lossy(&name)
                ),
            );
            Ok(status::NOT_FOUND)
        },
    )?;
    Ok(())
}

/// Pointer/length pairs naming a gRPC call's target.
struct GrpcTarget {
    upstream: (u32, u32),
    service: (u32, u32),
    method: (u32, u32),
    metadata: (u32, u32),
}

/// `proxy_grpc_call` (with its message) and `proxy_grpc_stream` (without).
fn grpc_start(
    c: &mut C<'_>,
    target: GrpcTarget,
    message: Option<Vec<u8>>,
    timeout_ms: u32,
    ret: u32,
) -> R {
    let read_all = |c: &mut C<'_>| -> Result<_, u32> {
        Ok((
            read(c, target.upstream.0, target.upstream.1)?,
            read(c, target.service.0, target.service.1)?,
            read(c, target.method.0, target.method.1)?,
            read(c, target.metadata.0, target.metadata.1)?,
        ))
    };
    let (upstream, service, method, metadata) = match read_all(c) {
        Ok(v) => v,
        Err(s) => return Ok(s),
    };
    let upstream = utf8_lossy(&upstream);
    let st = c.data();
    let refuse = |code: u32, why: String| {
        st.log(LogLevel::Debug, format!("proxy_grpc_call/stream: {why}"));
        Ok(code)
    };
    // Envoy: an upstream (cluster) it does not know ⇒ PARSE_FAILURE (the grpc_service
    // argument did not parse as a service config nor name a cluster).
    if !st.settings.callout_upstreams.contains(&upstream) {
        return refuse(
            status::PARSE_FAILURE,
            format!("upstream {upstream:?} is not configured"),
        );
    }
    // The statuses the Rust SDK accepts here are OK, PARSE_FAILURE and INTERNAL_FAILURE.
    if st.stream.is_none() {
        return refuse(
            status::INTERNAL_FAILURE,
            "only streams can make callouts in this host".into(),
        );
    }
    if st.pending_grpc.len() >= MAX_GRPC_OPS_PER_CALLBACK
        || st.pending_calls.len() >= MAX_CALLS_PER_CALLBACK
    {
        return refuse(
            status::INTERNAL_FAILURE,
            format!("more than {MAX_GRPC_OPS_PER_CALLBACK} gRPC operations in one callback"),
        );
    }
    let (Ok(service), Ok(method)) = (String::from_utf8(service), String::from_utf8(method)) else {
        return refuse(
            status::PARSE_FAILURE,
            "service or method is not UTF-8".into(),
        );
    };
    // They become the HTTP/2 :path `/service/method`.
    let valid = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_graphic() && b != b'/' && b != b'?' && b != b'#')
    };
    if !valid(&service) || !valid(&method) {
        return refuse(
            status::PARSE_FAILURE,
            format!("invalid service {service:?} or method {method:?}"),
        );
    }
    if message.as_ref().is_some_and(|m| m.len() > MAX_GRPC_MESSAGE) {
        return refuse(
            status::INTERNAL_FAILURE,
            format!("message larger than {MAX_GRPC_MESSAGE} bytes"),
        );
    }
    let metadata = match decode_pairs(&metadata) {
        Ok(m) => Headers::from_pairs(m),
        Err(e) => return refuse(status::PARSE_FAILURE, format!("initial metadata: {e}")),
    };
    let st = c.data_mut();
    let context = st.effective_context;
    let token = st.next_call_token;
    st.next_call_token = st.next_call_token.wrapping_add(1).max(1);
    if let Err(s) = write_u32(c, ret, token) {
        return Ok(s);
    }
    let st = c.data_mut();
    let stream = message.is_none();
    st.grpc_tokens.insert(
        token,
        GrpcToken {
            context,
            stream,
            local_closed: !stream,
        },
    );
    st.pending_grpc.push(PendingGrpcOp::Start {
        token,
        upstream,
        service,
        method,
        metadata,
        message,
        timeout_ms,
    });
    Ok(status::OK)
}

fn map_write(
    c: &mut C<'_>,
    map_type: u32,
    kp: u32,
    kl: u32,
    value: Option<(u32, u32)>,
    op: impl FnOnce(&mut Headers, &[u8], &[u8]),
) -> R {
    if !valid_map_type(map_type) {
        return Ok(status::BAD_ARGUMENT);
    }
    let key = match read(c, kp, kl) {
        Ok(k) => k,
        Err(s) => return Ok(s),
    };
    let grows = value.is_some();
    let value = match value {
        Some((vp, vl)) => match read(c, vp, vl) {
            Ok(v) => v,
            Err(s) => return Ok(s),
        },
        None => Vec::new(),
    };
    match header_map_mut(c.data_mut(), map_type) {
        // cpp-host's pair limit bounds what a guest can make the host hold.
        Some(h) if grows && (value.len() > MAX_MAP_BYTES || h.len() >= MAX_MAP_PAIRS) => {
            return Ok(status::BAD_ARGUMENT);
        }
        Some(h) => op(h, &key, &value),
        None => c.data().log(
            LogLevel::Debug,
            format!("header map {map_type} is not writable here: write ignored"),
        ),
    }
    Ok(status::OK)
}

// ---------------------------------------------------------------------------------------------
// WASI preview1: only what proxy-wasm guests import (cpp-host's list), with no filesystem, no
// preopens and no host environment.

fn werr(e: u32) -> u32 {
    if e == status::INVALID_MEMORY_ACCESS {
        errno::FAULT
    } else {
        e
    }
}

fn wdone(r: Result<(), u32>) -> R {
    Ok(r.map_or_else(werr, |()| errno::SUCCESS))
}

/// Every WASI function [`register_wasi`] defines (others link as traps, see `module.rs`).
pub(crate) const WASI_FUNCTIONS: &[&str] = &[
    "fd_write",
    "fd_read",
    "fd_seek",
    "fd_close",
    "fd_fdstat_get",
    "fd_fdstat_set_flags",
    "fd_prestat_get",
    "fd_prestat_dir_name",
    "fd_filestat_get",
    "path_open",
    "path_filestat_get",
    "clock_time_get",
    "clock_res_get",
    "random_get",
    "environ_sizes_get",
    "environ_get",
    "args_sizes_get",
    "args_get",
    "proc_exit",
    "sched_yield",
    "poll_oneoff",
];

/// The error `proc_exit` traps with (a `_start` that exits 0 is a clean finish).
#[derive(Debug, thiserror::Error)]
#[error("guest called proc_exit({0})")]
pub(crate) struct ProcExit(pub u32);

fn register_wasi(l: &mut Linker<HostState>, m: &str) -> wasmtime::Result<()> {
    l.func_wrap(
        m,
        "fd_write",
        |mut c: C<'_>, fd: u32, iovs: u32, iovs_len: u32, nwritten: u32| -> R {
            let level = match fd {
                1 => LogLevel::Info,
                2 => LogLevel::Error,
                _ => return Ok(errno::BADF),
            };
            // IOV_MAX: the loop below runs in host time, outside the epoch deadline.
            if iovs_len > 1024 {
                return Ok(errno::INVAL);
            }
            let r = (|| {
                let mut out = Vec::new();
                for i in 0..iovs_len {
                    let iov = read(&mut c, iovs.wrapping_add(i.wrapping_mul(8)), 8)?;
                    let ptr = u32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
                    let len = u32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
                    out.extend(read(&mut c, ptr, len)?);
                    if out.len() > MAX_MAP_BYTES {
                        return Err(errno::INVAL);
                    }
                }
                write_u32(&mut c, nwritten, out.len() as u32)?;
                let text = utf8_lossy(&out);
                let text = text.strip_suffix('\n').unwrap_or(&text);
                if !text.is_empty() {
                    c.data().log(level, text.to_owned());
                }
                Ok(())
            })();
            wdone(r)
        },
    )?;
    l.func_wrap(
        m,
        "fd_read",
        |_c: C<'_>, _fd: u32, _iovs: u32, _len: u32, _nread: u32| -> R { Ok(errno::NOSYS) },
    )?;
    l.func_wrap(
        m,
        "fd_seek",
        |_c: C<'_>, _fd: u32, _off: i64, _whence: u32, _ret: u32| -> R { Ok(errno::BADF) },
    )?;
    l.func_wrap(m, "fd_close", |_c: C<'_>, _fd: u32| -> R {
        Ok(errno::SUCCESS)
    })?;
    l.func_wrap(m, "fd_fdstat_get", |mut c: C<'_>, fd: u32, ret: u32| -> R {
        if fd != 1 && fd != 2 {
            return Ok(errno::BADF);
        }
        // fdstat: filetype u8 (2 = character device), flags u16, rights_base u64 (FD_WRITE =
        // 1 << 6), rights_inheriting u64.
        let mut stat = [0u8; 24];
        stat[0] = 2;
        stat[8..16].copy_from_slice(&(1u64 << 6).to_le_bytes());
        wdone(write(&mut c, ret, &stat))
    })?;
    l.func_wrap(
        m,
        "fd_fdstat_set_flags",
        |_c: C<'_>, _fd: u32, _f: u32| -> R { Ok(errno::NOSYS) },
    )?;
    l.func_wrap(m, "fd_prestat_get", |_c: C<'_>, _fd: u32, _ret: u32| -> R {
        Ok(errno::BADF)
    })?;
    l.func_wrap(
        m,
        "fd_prestat_dir_name",
        |_c: C<'_>, _fd: u32, _p: u32, _l: u32| -> R { Ok(errno::NOSYS) },
    )?;
    l.func_wrap(
        m,
        "fd_filestat_get",
        |_c: C<'_>, _fd: u32, _ret: u32| -> R { Ok(errno::BADF) },
    )?;
    l.func_wrap(
        m,
        "path_open",
        |_c: C<'_>,
         _fd: u32,
         _dirflags: u32,
         _p: u32,
         _l: u32,
         _oflags: u32,
         _rb: u64,
         _ri: u64,
         _fdflags: u32,
         _ret: u32|
         -> R { Ok(errno::NOENT) },
    )?;
    l.func_wrap(
        m,
        "path_filestat_get",
        |_c: C<'_>, _fd: u32, _flags: u32, _p: u32, _l: u32, _ret: u32| -> R { Ok(errno::NOTSUP) },
    )?;
    l.func_wrap(
        m,
        "clock_time_get",
        |mut c: C<'_>, id: u32, _precision: u64, ret: u32| -> R {
            let now = match id {
                0 => SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64),
                1 => monotonic_nanos(),
                _ => return Ok(errno::NOTSUP),
            };
            wdone(write_u64(&mut c, ret, now))
        },
    )?;
    l.func_wrap(m, "clock_res_get", |mut c: C<'_>, id: u32, ret: u32| -> R {
        if id > 1 {
            return Ok(errno::NOTSUP);
        }
        wdone(write_u64(&mut c, ret, 1))
    })?;
    l.func_wrap(m, "random_get", |mut c: C<'_>, ptr: u32, len: u32| -> R {
        if len as usize > MAX_RANDOM_BYTES {
            return Ok(errno::INVAL);
        }
        let mut bytes = vec![0u8; len as usize];
        if getrandom::fill(&mut bytes).is_err() {
            return Ok(errno::NOSYS);
        }
        wdone(write(&mut c, ptr, &bytes))
    })?;
    l.func_wrap(
        m,
        "environ_sizes_get",
        |mut c: C<'_>, count: u32, size: u32| -> R {
            let env = &c.data().settings.env;
            let n = env.len() as u32;
            let bytes: usize = env.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
            wdone(write_u32(&mut c, count, n).and_then(|()| write_u32(&mut c, size, bytes as u32)))
        },
    )?;
    l.func_wrap(
        m,
        "environ_get",
        |mut c: C<'_>, environ: u32, buf: u32| -> R {
            let strings: Vec<Vec<u8>> = c
                .data()
                .settings
                .env
                .iter()
                .map(|(k, v)| format!("{k}={v}\0").into_bytes())
                .collect();
            let r = (|| {
                let mut at = buf;
                for (i, s) in strings.iter().enumerate() {
                    write_u32(&mut c, environ.wrapping_add(i as u32 * 4), at)?;
                    write(&mut c, at, s)?;
                    at = at.wrapping_add(s.len() as u32);
                }
                Ok(())
            })();
            wdone(r)
        },
    )?;
    l.func_wrap(
        m,
        "args_sizes_get",
        |mut c: C<'_>, argc: u32, size: u32| -> R {
            wdone(write_u32(&mut c, argc, 0).and_then(|()| write_u32(&mut c, size, 0)))
        },
    )?;
    l.func_wrap(m, "args_get", |_c: C<'_>, _argv: u32, _buf: u32| -> R {
        Ok(errno::SUCCESS)
    })?;
    l.func_wrap(
        m,
        "proc_exit",
        |_c: C<'_>, code: u32| -> wasmtime::Result<()> {
            Err(wasmtime::Error::new(ProcExit(code)))
        },
    )?;
    l.func_wrap(m, "sched_yield", |_c: C<'_>| -> R { Ok(errno::SUCCESS) })?;
    l.func_wrap(
        m,
        "poll_oneoff",
        |mut c: C<'_>, _in: u32, _out: u32, _n: u32, nevents: u32| -> R {
            wdone(write_u32(&mut c, nevents, 0))
        },
    )?;
    Ok(())
}

fn monotonic_nanos() -> u64 {
    use std::sync::OnceLock;
    use std::time::Instant;
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}
