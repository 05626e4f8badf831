//! Glue between the ABI callbacks (exported by [`crate::register!`]) and a [`Filter`]: root and
//! stream contexts by id, phase dispatch, error handling, and the allocator the host uses to
//! return data.
//!
//! State lives in a `thread_local` the macro declares in the filter crate (a Wasm instance is
//! single-threaded). No callback re-enters another, so the `RefCell` borrow cannot conflict.

use std::cell::RefCell;
use std::collections::HashMap;

use crate::{
    Action, BUFFER_PLUGIN_CONFIGURATION, Error, Filter, GrpcResponse, Http, Level, StreamFilter,
    log,
};

const CONTINUE: u32 = 0;
const PAUSE: u32 = 1;

/// Per-instance state of one filter type.
pub struct State<F: Filter> {
    roots: HashMap<u32, Option<F>>,
    streams: HashMap<u32, F::Stream>,
    /// The direction of each stream's last phase (`proxy_stream_type_t`: 0 request, 1
    /// response): what a callout answer resumes.
    direction: HashMap<u32, u32>,
}

impl<F: Filter> Default for State<F> {
    fn default() -> Self {
        State {
            roots: HashMap::new(),
            streams: HashMap::new(),
            direction: HashMap::new(),
        }
    }
}

/// The host allocates returned data with this; the SDK frees it as a `Vec<u8>`.
pub fn allocate(size: usize) -> *mut u8 {
    let mut buf: Vec<u8> = Vec::with_capacity(size);
    let ptr = buf.as_mut_ptr();
    std::mem::forget(buf);
    ptr
}

fn install_panic_hook() {
    use std::sync::Once;
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            log(Level::Critical, &format!("filter panicked: {info}"));
        }));
    });
}

pub fn on_context_create<F: Filter>(state: &RefCell<State<F>>, ctx: u32, parent: u32) {
    let mut s = state.borrow_mut();
    if parent == 0 {
        install_panic_hook();
        s.roots.insert(ctx, None);
        return;
    }
    let stream = match s.roots.get(&parent) {
        Some(Some(root)) => root.new_stream(),
        _ => {
            log(
                Level::Error,
                &format!("context {ctx}: root context {parent} is not configured"),
            );
            return;
        }
    };
    s.streams.insert(ctx, stream);
}

pub fn on_vm_start(_ctx: u32, _size: usize) -> u32 {
    1
}

pub fn on_configure<F: Filter>(state: &RefCell<State<F>>, ctx: u32, size: usize) -> u32 {
    let config = match crate::get_buffer(BUFFER_PLUGIN_CONFIGURATION, 0, size) {
        Ok(c) => c,
        Err(e) => {
            log(Level::Error, &format!("reading the configuration: {e}"));
            return 0;
        }
    };
    match F::configure(&config) {
        Ok(root) => {
            state.borrow_mut().roots.insert(ctx, Some(root));
            1
        }
        Err(e) => {
            log(Level::Error, &format!("configuration rejected: {e}"));
            0
        }
    }
}

/// Runs a stream's method with errors answered by `on_error`; `None` when the context has no
/// stream (an unconfigured root, or a context already deleted).
fn run<F: Filter>(
    state: &RefCell<State<F>>,
    ctx: u32,
    name: &str,
    direction: Option<u32>,
    run: impl FnOnce(&mut F::Stream, &Http) -> Result<Action, Error>,
) -> Option<Action> {
    let mut s = state.borrow_mut();
    if let Some(d) = direction {
        s.direction.insert(ctx, d);
    }
    let stream = s.streams.get_mut(&ctx)?;
    let http = Http::new();
    crate::grpc::set_current(ctx);
    let result = run(stream, &http);
    crate::grpc::set_current(0);
    Some(match result {
        Ok(a) => a,
        Err(e) => {
            log(Level::Error, &format!("{name}: {e}"));
            stream.on_error(&e)
        }
    })
}

fn phase<F: Filter>(
    state: &RefCell<State<F>>,
    ctx: u32,
    name: &str,
    run_phase: impl FnOnce(&mut F::Stream, &Http) -> Result<Action, Error>,
) -> u32 {
    let direction = if name.starts_with("on_request") { 0 } else { 1 };
    let Some(action) = run(state, ctx, name, Some(direction), run_phase) else {
        return CONTINUE;
    };
    match action {
        Action::Continue => CONTINUE,
        Action::Pause => PAUSE,
        Action::Reply(reply) => {
            if let Err(e) = reply.send() {
                log(Level::Error, &format!("{name}: sending the reply: {e}"));
            }
            PAUSE
        }
    }
}

pub fn on_request_headers<F: Filter>(
    state: &RefCell<State<F>>,
    ctx: u32,
    _n: usize,
    eos: u32,
) -> u32 {
    phase(state, ctx, "on_request_headers", |s, h| {
        s.on_request_headers(h, eos != 0)
    })
}

pub fn on_request_body<F: Filter>(
    state: &RefCell<State<F>>,
    ctx: u32,
    size: usize,
    eos: u32,
) -> u32 {
    phase(state, ctx, "on_request_body", |s, h| {
        s.on_request_body(h, size, eos != 0)
    })
}

pub fn on_response_headers<F: Filter>(
    state: &RefCell<State<F>>,
    ctx: u32,
    _n: usize,
    eos: u32,
) -> u32 {
    phase(state, ctx, "on_response_headers", |s, h| {
        s.on_response_headers(h, eos != 0)
    })
}

pub fn on_response_body<F: Filter>(
    state: &RefCell<State<F>>,
    ctx: u32,
    size: usize,
    eos: u32,
) -> u32 {
    phase(state, ctx, "on_response_body", |s, h| {
        s.on_response_body(h, size, eos != 0)
    })
}

pub fn on_done(_ctx: u32) -> u32 {
    1
}

pub fn on_log<F: Filter>(state: &RefCell<State<F>>, ctx: u32) {
    let mut s = state.borrow_mut();
    if let Some(stream) = s.streams.get_mut(&ctx) {
        stream.on_log(&Http::new());
    }
}

pub fn on_delete<F: Filter>(state: &RefCell<State<F>>, ctx: u32) {
    let mut s = state.borrow_mut();
    s.streams.remove(&ctx);
    s.roots.remove(&ctx);
    s.direction.remove(&ctx);
    crate::grpc::forget_context(ctx);
}

/// Which gRPC callback the host called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpcKind {
    InitialMetadata,
    Receive,
    TrailingMetadata,
    Close,
}

/// A gRPC event for `token` (delivered to the root context): read it, switch to the stream
/// that made the call, run its `on_grpc`, and apply the action: Continue resumes the paused
/// phase, Reply answers, Pause keeps waiting.
pub fn on_grpc<F: Filter>(state: &RefCell<State<F>>, token: u32, kind: GrpcKind, n: usize) {
    let Some((ctx, unary)) = crate::grpc::owner(token) else {
        return; // cancelled, or its stream is gone
    };
    let response =
        match kind {
            GrpcKind::Receive => {
                if unary {
                    crate::grpc::forget(token);
                }
                crate::get_buffer(crate::BUFFER_GRPC_RECEIVE, 0, n).map(GrpcResponse::Message)
            }
            GrpcKind::InitialMetadata => crate::map_pairs(crate::MAP_GRPC_INITIAL_METADATA)
                .map(GrpcResponse::InitialMetadata),
            GrpcKind::TrailingMetadata => crate::map_pairs(crate::MAP_GRPC_TRAILING_METADATA)
                .map(GrpcResponse::TrailingMetadata),
            GrpcKind::Close => {
                crate::grpc::forget(token);
                crate::grpc::status().map(|(status, message)| GrpcResponse::Close {
                    // The callback's own status wins if the host's get_status disagrees.
                    status: if status == 0 { n as u32 } else { status },
                    message,
                })
            }
        };
    // SAFETY: plain integer argument; the host accepts a live context id.
    if unsafe { crate::hostcalls::proxy_set_effective_context(ctx) } != 0 {
        return;
    }
    let direction = state.borrow().direction.get(&ctx).copied().unwrap_or(0);
    let action = run(state, ctx, "on_grpc", None, |s, h| {
        s.on_grpc(h, token, response?)
    });
    match action {
        Some(Action::Continue) => {
            // SAFETY: plain integer argument.
            let _ = unsafe { crate::hostcalls::proxy_continue_stream(direction) };
        }
        Some(Action::Reply(reply)) => {
            if let Err(e) = reply.send() {
                log(Level::Error, &format!("on_grpc: sending the reply: {e}"));
            }
        }
        Some(Action::Pause) | None => {}
    }
}

/// Exports the proxy-wasm ABI v0.2.1 entry points for a [`Filter`] type. Use once per crate:
///
/// ```ignore
/// membrane_filter_sdk::register!(MyFilter);
/// ```
#[macro_export]
macro_rules! register {
    ($filter:ty) => {
        const _: () = {
            use ::core::cell::RefCell;
            use $crate::__private as sdk;
            ::std::thread_local! {
                static STATE: RefCell<sdk::State<$filter>> = RefCell::new(sdk::State::default());
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_abi_version_0_2_1() {}
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
                sdk::allocate(size)
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_context_create(ctx: u32, parent: u32) {
                STATE.with(|s| sdk::on_context_create(s, ctx, parent))
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_vm_start(ctx: u32, size: usize) -> u32 {
                sdk::on_vm_start(ctx, size)
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_configure(ctx: u32, size: usize) -> u32 {
                STATE.with(|s| sdk::on_configure(s, ctx, size))
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_request_headers(ctx: u32, n: usize, eos: u32) -> u32 {
                STATE.with(|s| sdk::on_request_headers(s, ctx, n, eos))
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_request_body(ctx: u32, size: usize, eos: u32) -> u32 {
                STATE.with(|s| sdk::on_request_body(s, ctx, size, eos))
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_response_headers(ctx: u32, n: usize, eos: u32) -> u32 {
                STATE.with(|s| sdk::on_response_headers(s, ctx, n, eos))
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_response_body(ctx: u32, size: usize, eos: u32) -> u32 {
                STATE.with(|s| sdk::on_response_body(s, ctx, size, eos))
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_grpc_receive_initial_metadata(
                _root: u32,
                token: u32,
                n: usize,
            ) {
                STATE.with(|s| sdk::on_grpc(s, token, sdk::GrpcKind::InitialMetadata, n))
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_grpc_receive(_root: u32, token: u32, size: usize) {
                STATE.with(|s| sdk::on_grpc(s, token, sdk::GrpcKind::Receive, size))
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_grpc_receive_trailing_metadata(
                _root: u32,
                token: u32,
                n: usize,
            ) {
                STATE.with(|s| sdk::on_grpc(s, token, sdk::GrpcKind::TrailingMetadata, n))
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_grpc_close(_root: u32, token: u32, status: usize) {
                STATE.with(|s| sdk::on_grpc(s, token, sdk::GrpcKind::Close, status))
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_done(ctx: u32) -> u32 {
                sdk::on_done(ctx)
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_log(ctx: u32) {
                STATE.with(|s| sdk::on_log(s, ctx))
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_delete(ctx: u32) {
                STATE.with(|s| sdk::on_delete(s, ctx))
            }
        };
    };
}
