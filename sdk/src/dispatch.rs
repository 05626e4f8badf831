//! Glue between the ABI callbacks (exported by [`crate::register!`]) and a [`Filter`]: root and
//! stream contexts by id, phase dispatch, error handling, and the allocator the host uses to
//! return data.
//!
//! State lives in a `thread_local` the macro declares in the filter crate (a Wasm instance is
//! single-threaded). No callback re-enters another, so the `RefCell` borrow cannot conflict.

use std::cell::RefCell;
use std::collections::HashMap;

use crate::{Action, BUFFER_PLUGIN_CONFIGURATION, Error, Filter, Http, Level, StreamFilter, log};

const CONTINUE: u32 = 0;
const PAUSE: u32 = 1;

/// Per-instance state of one filter type.
pub struct State<F: Filter> {
    roots: HashMap<u32, Option<F>>,
    streams: HashMap<u32, F::Stream>,
}

impl<F: Filter> Default for State<F> {
    fn default() -> Self {
        State {
            roots: HashMap::new(),
            streams: HashMap::new(),
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

fn phase<F: Filter>(
    state: &RefCell<State<F>>,
    ctx: u32,
    name: &str,
    run: impl FnOnce(&mut F::Stream, &Http) -> Result<Action, Error>,
) -> u32 {
    let mut s = state.borrow_mut();
    let Some(stream) = s.streams.get_mut(&ctx) else {
        return CONTINUE;
    };
    let http = Http::new();
    let action = match run(stream, &http) {
        Ok(a) => a,
        Err(e) => {
            log(Level::Error, &format!("{name}: {e}"));
            stream.on_error(&e)
        }
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
