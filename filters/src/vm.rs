//! One instance ("VM"): a `Store<HostState>` with the instantiated module, its exports, the
//! root context and the context-id counter. Boots with Envoy's start sequence and runs every
//! callback under an epoch deadline; a failed callback (trap, deadline, memory cap) poisons
//! the instance, which is then discarded by its pool.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use wasmtime::{Engine, Store, Trap, TypedFunc, WasmBacktrace};

use crate::config::{FilterLimits, LogLevel};
use crate::error::FilterError;
use crate::hostcalls::ProcExit;
use crate::module::CompiledModule;
use crate::shared::SharedState;
use crate::state::{
    FilterSettings, FilterStreamState, HostState, Limiter, LoadedStream, StreamShared,
};

/// Why a callback (or boot step) failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VmFailure {
    pub kind: FailureKind,
    /// One-line reason (for decisions and errors); the full report with the backtrace goes to
    /// the log.
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureKind {
    Trap,
    Deadline,
    MemoryLimit,
    /// The guest called `proc_exit(code)`.
    Exit(u32),
    /// The instance was already poisoned by another stream's failure, or could not be booted.
    Unavailable,
}

macro_rules! exports {
    ($($field:ident : $name:literal => ($($p:ty),*) -> $r:ty;)*) => {
        #[derive(Clone)]
        pub(crate) struct Exports {
            $(pub $field: Option<TypedFunc<($($p,)*), $r>>,)*
        }

        impl Exports {
            fn load(
                store: &mut Store<HostState>,
                instance: &wasmtime::Instance,
            ) -> Result<Self, (&'static str, String)> {
                Ok(Self {
                    $($field: match instance.get_func(&mut *store, $name) {
                        None => None,
                        Some(f) => Some(f.typed(&*store).map_err(|e| ($name, format!("{e:#}")))?),
                    },)*
                })
            }
        }
    };
}

exports! {
    initialize: "_initialize" => () -> ();
    start: "_start" => () -> ();
    main: "main" => (u32, u32) -> u32;
    context_create: "proxy_on_context_create" => (u32, u32) -> ();
    vm_start: "proxy_on_vm_start" => (u32, u32) -> u32;
    configure: "proxy_on_configure" => (u32, u32) -> u32;
    tick: "proxy_on_tick" => (u32) -> ();
    request_headers: "proxy_on_request_headers" => (u32, u32, u32) -> u32;
    request_body: "proxy_on_request_body" => (u32, u32, u32) -> u32;
    response_headers: "proxy_on_response_headers" => (u32, u32, u32) -> u32;
    response_body: "proxy_on_response_body" => (u32, u32, u32) -> u32;
    http_call_response: "proxy_on_http_call_response" => (u32, u32, u32, u32, u32) -> ();
    grpc_initial_metadata: "proxy_on_grpc_receive_initial_metadata" => (u32, u32, u32) -> ();
    grpc_receive: "proxy_on_grpc_receive" => (u32, u32, u32) -> ();
    grpc_trailing_metadata: "proxy_on_grpc_receive_trailing_metadata" => (u32, u32, u32) -> ();
    grpc_close: "proxy_on_grpc_close" => (u32, u32, u32) -> ();
    new_connection: "proxy_on_new_connection" => (u32) -> u32;
    downstream_data: "proxy_on_downstream_data" => (u32, u32, u32) -> u32;
    upstream_data: "proxy_on_upstream_data" => (u32, u32, u32) -> u32;
    downstream_close: "proxy_on_downstream_connection_close" => (u32, u32) -> ();
    upstream_close: "proxy_on_upstream_connection_close" => (u32, u32) -> ();
    done: "proxy_on_done" => (u32) -> u32;
    log: "proxy_on_log" => (u32) -> ();
    delete: "proxy_on_delete" => (u32) -> ();
}

/// The stream callbacks the chain drives.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Callback {
    RequestHeaders {
        count: u32,
        end_of_stream: bool,
    },
    RequestBody {
        size: u32,
        end_of_stream: bool,
    },
    ResponseHeaders {
        count: u32,
        end_of_stream: bool,
    },
    ResponseBody {
        size: u32,
        end_of_stream: bool,
    },
    /// `proxy_on_http_call_response(root, token, headers, body_size, trailers)`; the response
    /// is in the stream's `call_response`. Runs with the root context current (as Envoy:
    /// calls are owned by the root context; the SDK switches to the stream itself).
    HttpCallResponse {
        token: u32,
        headers: u32,
        body_size: u32,
        trailers: u32,
    },
    /// `proxy_on_grpc_*(root, token, n)` (metadata count, message size or status); the event
    /// is in the stream's `grpc_delivery`. Root context current, as for HTTP calls.
    Grpc {
        kind: GrpcCallback,
        token: u32,
        n: u32,
    },
    /// TCP: `proxy_on_new_connection(ctx)`.
    NewConnection,
    /// TCP: `proxy_on_downstream_data(ctx, size, eos)` / `proxy_on_upstream_data`.
    DownstreamData {
        size: u32,
        end_of_stream: bool,
    },
    UpstreamData {
        size: u32,
        end_of_stream: bool,
    },
    /// TCP: `proxy_on_*_connection_close(ctx, peer_type)`.
    DownstreamClose {
        peer: u32,
    },
    UpstreamClose {
        peer: u32,
    },
}

/// The four gRPC callbacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GrpcCallback {
    InitialMetadata,
    Receive,
    TrailingMetadata,
    Close,
}

const ROOT_CONTEXT_ID: u32 = 1;

pub(crate) struct Vm {
    pub id: u64,
    store: Store<HostState>,
    /// Shared so a callback borrows a `TypedFunc` instead of cloning it (a clone copies its
    /// `FuncType`, which takes the engine's type registry: measurable per request).
    exports: Arc<Exports>,
    next_context: u32,
    callback_ticks: u64,
    /// Set when a callback failed: the instance must not run again.
    pub failed: bool,
    pub last_tick: Instant,
}

fn ticks(d: std::time::Duration, tick: std::time::Duration) -> u64 {
    let t = tick.as_nanos().max(1);
    (d.as_nanos().div_ceil(t)).max(1) as u64
}

impl Vm {
    /// Instantiates and runs Envoy's start sequence: `_initialize` (+ `main`) or `_start`,
    /// `proxy_on_context_create(root, 0)`, `proxy_on_vm_start`, `proxy_on_configure`.
    pub fn boot(
        engine: &Engine,
        module: &CompiledModule,
        settings: Arc<FilterSettings>,
        shared: Arc<SharedState>,
        limits: &FilterLimits,
        epoch_tick: std::time::Duration,
        id: u64,
    ) -> Result<Vm, FilterError> {
        let boot_err = |stage: &'static str, reason: String| FilterError::Boot {
            filter: settings.name.to_string(),
            sha256: module.sha256.clone(),
            stage,
            reason,
        };
        let state = HostState {
            settings: settings.clone(),
            shared,
            instance_id: id,
            limiter: Limiter {
                memory_limit: limits.memory_limit,
                grow_denied: false,
            },
            memory: None,
            allocator: None,
            contexts: HashMap::new(),
            current_context: 0,
            effective_context: 0,
            stream: None,
            max_body: limits.max_buffered_body,
            tick_period_ms: 0,
            pending_done: Vec::new(),
            root_properties: HashMap::new(),
            pending_calls: Vec::new(),
            next_call_token: 1,
            pending_grpc: Vec::new(),
            grpc_tokens: HashMap::new(),
        };
        let mut store = Store::new(engine, state);
        store.limiter(|s| &mut s.limiter);
        store.set_epoch_deadline(ticks(limits.boot_deadline, epoch_tick));
        let instance = module
            .pre
            .instantiate(&mut store)
            .map_err(|e| boot_err("instantiate", failure(&store, &e, limits).reason))?;
        let exports =
            Exports::load(&mut store, &instance)
                .map(Arc::new)
                .map_err(|(export, reason)| FilterError::Export {
                    filter: settings.name.to_string(),
                    sha256: module.sha256.clone(),
                    export,
                    reason,
                })?;
        let memory = instance.get_memory(&mut store, "memory");
        let allocator = ["proxy_on_memory_allocate", "malloc"]
            .into_iter()
            .find_map(|name| instance.get_typed_func::<u32, u32>(&mut store, name).ok());
        store.data_mut().memory = memory;
        store.data_mut().allocator = allocator.map(Arc::new);

        let mut vm = Vm {
            id,
            store,
            exports: exports.clone(),
            next_context: ROOT_CONTEXT_ID + 1,
            callback_ticks: ticks(limits.callback_deadline, epoch_tick),
            failed: false,
            last_tick: Instant::now(),
        };
        let boot_ticks = ticks(limits.boot_deadline, epoch_tick);
        let fail = |stage, f: VmFailure| boot_err(stage, f.reason);
        if let Some(init) = &exports.initialize {
            vm.call(init, (), 0, boot_ticks, limits)
                .map_err(|f| fail("_initialize", f))?;
            if let Some(main) = &exports.main {
                vm.call(main, (0, 0), 0, boot_ticks, limits)
                    .map_err(|f| fail("main", f))?;
            }
        } else if let Some(start) = &exports.start {
            match vm.call(start, (), 0, boot_ticks, limits) {
                Ok(()) => {}
                // A command module's `_start` may end with proc_exit(0): a clean start.
                Err(f) if f.kind == FailureKind::Exit(0) => vm.failed = false,
                Err(f) => return Err(fail("_start", f)),
            }
        }
        vm.store.data_mut().contexts.insert(ROOT_CONTEXT_ID, 0);
        if let Some(create) = &exports.context_create {
            vm.call(
                create,
                (ROOT_CONTEXT_ID, 0),
                ROOT_CONTEXT_ID,
                boot_ticks,
                limits,
            )
            .map_err(|f| fail("proxy_on_context_create", f))?;
        }
        let rejected = |stage| FilterError::Rejected {
            filter: settings.name.to_string(),
            sha256: module.sha256.clone(),
            stage,
        };
        if let Some(start) = &exports.vm_start {
            let len = settings.vm_config.len() as u32;
            let ok = vm
                .call(
                    start,
                    (ROOT_CONTEXT_ID, len),
                    ROOT_CONTEXT_ID,
                    boot_ticks,
                    limits,
                )
                .map_err(|f| fail("proxy_on_vm_start", f))?;
            if ok == 0 {
                return Err(rejected("vm_start"));
            }
        }
        if let Some(configure) = &exports.configure {
            let len = settings.plugin_config.len() as u32;
            let ok = vm
                .call(
                    configure,
                    (ROOT_CONTEXT_ID, len),
                    ROOT_CONTEXT_ID,
                    boot_ticks,
                    limits,
                )
                .map_err(|f| fail("proxy_on_configure", f))?;
            if ok == 0 {
                return Err(rejected("configure"));
            }
        }
        Ok(vm)
    }

    pub fn tick_period_ms(&self) -> u32 {
        self.store.data().tick_period_ms
    }

    pub fn has_tick(&self) -> bool {
        self.exports.tick.is_some()
    }

    /// Runs `f` with `deadline_ticks` epochs, `ctx` as the current and effective context.
    /// Any error poisons the instance.
    fn call<P, R>(
        &mut self,
        f: &TypedFunc<P, R>,
        args: P,
        ctx: u32,
        deadline_ticks: u64,
        limits: &FilterLimits,
    ) -> Result<R, VmFailure>
    where
        P: wasmtime::WasmParams,
        R: wasmtime::WasmResults,
    {
        if self.failed {
            return Err(VmFailure {
                kind: FailureKind::Unavailable,
                reason: "instance failed earlier".into(),
            });
        }
        {
            let st = self.store.data_mut();
            st.current_context = ctx;
            st.effective_context = ctx;
        }
        // A refused grow the guest survived must not name a later, unrelated trap.
        self.store.data_mut().limiter.grow_denied = false;
        self.store.set_epoch_deadline(deadline_ticks);
        let result = f.call(&mut self.store, args);
        let st = self.store.data_mut();
        st.current_context = 0;
        st.effective_context = 0;
        match result {
            Ok(r) => Ok(r),
            Err(e) => {
                self.failed = true;
                let f = failure(&self.store, &e, limits);
                if f.kind == FailureKind::Exit(0) {
                    return Err(f);
                }
                self.store.data().settings.log(
                    self.id,
                    ctx,
                    LogLevel::Error,
                    format!(
                        "instance {} failed in context {ctx}: {}\n{e:?}",
                        self.id, f.reason
                    ),
                );
                Err(f)
            }
        }
    }

    /// Creates a stream context (`proxy_on_context_create(id, root)`).
    pub fn create_stream_context(&mut self, limits: &FilterLimits) -> Result<u32, VmFailure> {
        let ctx = self.next_context;
        self.next_context = self.next_context.wrapping_add(1).max(ROOT_CONTEXT_ID + 1);
        self.store.data_mut().contexts.insert(ctx, ROOT_CONTEXT_ID);
        let ex = self.exports.clone();
        if let Some(create) = &ex.context_create {
            self.call(
                create,
                (ctx, ROOT_CONTEXT_ID),
                ctx,
                self.callback_ticks,
                limits,
            )?;
        }
        Ok(ctx)
    }

    /// Moves the stream's data into the store, runs `body`, and moves it back out (also on
    /// failure: the store still holds it).
    fn with_stream<R>(
        &mut self,
        ctx: u32,
        shared: &mut StreamShared,
        own: &mut FilterStreamState,
        body: impl FnOnce(&mut Self) -> Result<R, VmFailure>,
    ) -> Result<R, VmFailure> {
        self.store.data_mut().stream = Some(LoadedStream {
            context_id: ctx,
            shared: std::mem::take(shared),
            own: std::mem::take(own),
        });
        let r = body(self);
        if let Some(loaded) = self.store.data_mut().stream.take() {
            *shared = loaded.shared;
            *own = loaded.own;
        }
        r
    }

    /// Runs one stream callback; returns the guest's action (0 continue, 1 pause). A module
    /// that does not export the callback continues.
    pub fn run(
        &mut self,
        ctx: u32,
        cb: Callback,
        shared: &mut StreamShared,
        own: &mut FilterStreamState,
        limits: &FilterLimits,
    ) -> Result<u32, VmFailure> {
        let ticks = self.callback_ticks;
        let ex = self.exports.clone();
        self.with_stream(ctx, shared, own, |vm| {
            if let Callback::Grpc { kind, token, n } = cb {
                let f = match kind {
                    GrpcCallback::InitialMetadata => &ex.grpc_initial_metadata,
                    GrpcCallback::Receive => &ex.grpc_receive,
                    GrpcCallback::TrailingMetadata => &ex.grpc_trailing_metadata,
                    GrpcCallback::Close => &ex.grpc_close,
                };
                return match f {
                    Some(f) => vm
                        .call(
                            f,
                            (ROOT_CONTEXT_ID, token, n),
                            ROOT_CONTEXT_ID,
                            ticks,
                            limits,
                        )
                        .map(|()| crate::abi::action::PAUSE as u32),
                    None => Ok(crate::abi::action::PAUSE as u32),
                };
            }
            match cb {
                Callback::NewConnection => {
                    return match &ex.new_connection {
                        Some(f) => vm.call(f, (ctx,), ctx, ticks, limits),
                        None => Ok(0),
                    };
                }
                Callback::DownstreamClose { peer } | Callback::UpstreamClose { peer } => {
                    let f = if matches!(cb, Callback::DownstreamClose { .. }) {
                        &ex.downstream_close
                    } else {
                        &ex.upstream_close
                    };
                    return match f {
                        Some(f) => vm.call(f, (ctx, peer), ctx, ticks, limits).map(|()| 0),
                        None => Ok(0),
                    };
                }
                _ => {}
            }
            if let Callback::HttpCallResponse {
                token,
                headers,
                body_size,
                trailers,
            } = cb
            {
                return match &ex.http_call_response {
                    Some(f) => vm
                        .call(
                            f,
                            (ROOT_CONTEXT_ID, token, headers, body_size, trailers),
                            ROOT_CONTEXT_ID,
                            ticks,
                            limits,
                        )
                        // A call response returns nothing: the stream stays as it was
                        // (paused) unless the guest continued, replied or closed it.
                        .map(|()| crate::abi::action::PAUSE as u32),
                    None => Ok(crate::abi::action::PAUSE as u32),
                };
            }
            let (f, a, b) = match cb {
                Callback::RequestHeaders {
                    count,
                    end_of_stream,
                } => (&ex.request_headers, count, end_of_stream),
                Callback::RequestBody {
                    size,
                    end_of_stream,
                } => (&ex.request_body, size, end_of_stream),
                Callback::ResponseHeaders {
                    count,
                    end_of_stream,
                } => (&ex.response_headers, count, end_of_stream),
                Callback::ResponseBody {
                    size,
                    end_of_stream,
                } => (&ex.response_body, size, end_of_stream),
                Callback::DownstreamData {
                    size,
                    end_of_stream,
                } => (&ex.downstream_data, size, end_of_stream),
                Callback::UpstreamData {
                    size,
                    end_of_stream,
                } => (&ex.upstream_data, size, end_of_stream),
                // Delivered above; kept exhaustive so a new callback kind is not forgotten.
                Callback::HttpCallResponse { .. }
                | Callback::Grpc { .. }
                | Callback::NewConnection
                | Callback::DownstreamClose { .. }
                | Callback::UpstreamClose { .. } => return Ok(crate::abi::action::PAUSE as u32),
            };
            match f {
                Some(f) => vm.call(f, (ctx, a, u32::from(b)), ctx, ticks, limits),
                None => Ok(0),
            }
        })
    }

    /// `proxy_on_done` → `proxy_on_log` → `proxy_on_delete`, with the stream's maps readable
    /// (access-log phase).
    pub fn finish_stream(
        &mut self,
        ctx: u32,
        shared: &mut StreamShared,
        own: &mut FilterStreamState,
        limits: &FilterLimits,
    ) -> Result<(), VmFailure> {
        let ticks = self.callback_ticks;
        let ex = self.exports.clone();
        let r = self.with_stream(ctx, shared, own, |vm| {
            if let Some(done) = &ex.done {
                let finished = vm.call(done, (ctx,), ctx, ticks, limits)?;
                if finished == 0 {
                    // The context asked to finish later (proxy_done); we have no later for a
                    // finished stream, so we log it and proceed (documented).
                    vm.store.data_mut().pending_done.push(ctx);
                }
            }
            if let Some(log) = &ex.log {
                vm.call(log, (ctx,), ctx, ticks, limits)?;
            }
            if let Some(delete) = &ex.delete {
                vm.call(delete, (ctx,), ctx, ticks, limits)?;
            }
            Ok(())
        });
        let st = self.store.data_mut();
        st.contexts.remove(&ctx);
        st.pending_done.retain(|c| *c != ctx);
        // The context's calls die with it (Envoy cancels a context's calls on delete).
        st.grpc_tokens.retain(|_, t| t.context != ctx);
        r
    }

    /// The gRPC operations made since the last take.
    pub fn take_grpc_ops(&mut self) -> Vec<crate::state::PendingGrpcOp> {
        std::mem::take(&mut self.store.data_mut().pending_grpc)
    }

    /// Forgets a gRPC token (its call ended).
    pub fn end_grpc_token(&mut self, token: u32) {
        self.store.data_mut().grpc_tokens.remove(&token);
    }

    /// The `proxy_http_call`s made since the last take.
    pub fn take_calls(&mut self) -> Vec<crate::state::PendingCall> {
        std::mem::take(&mut self.store.data_mut().pending_calls)
    }

    /// Delivers `proxy_on_tick` to the root context.
    pub fn tick(&mut self, limits: &FilterLimits) -> Result<(), VmFailure> {
        self.last_tick = Instant::now();
        let ex = self.exports.clone();
        match &ex.tick {
            Some(t) => self.call(
                t,
                (ROOT_CONTEXT_ID,),
                ROOT_CONTEXT_ID,
                self.callback_ticks,
                limits,
            ),
            None => Ok(()),
        }
    }
}

/// Names a failure: deadline (epoch interrupt), memory cap (a refused grow before the trap),
/// or a trap with its symbolized top frames.
fn failure(store: &Store<HostState>, e: &wasmtime::Error, limits: &FilterLimits) -> VmFailure {
    if let Some(ProcExit(code)) = e.downcast_ref::<ProcExit>() {
        return VmFailure {
            kind: FailureKind::Exit(*code),
            reason: format!("guest called proc_exit({code})"),
        };
    }
    if let Some(Trap::Interrupt) = e.downcast_ref::<Trap>() {
        return VmFailure {
            kind: FailureKind::Deadline,
            reason: format!(
                "callback exceeded its deadline of {:?}",
                limits.callback_deadline
            ),
        };
    }
    let frames = e
        .downcast_ref::<WasmBacktrace>()
        .map(|bt| {
            bt.frames()
                .iter()
                .take(3)
                .map(|f| f.func_name().unwrap_or("<unnamed>").to_owned())
                .collect::<Vec<_>>()
                .join(" <- ")
        })
        .unwrap_or_default();
    let root = e.root_cause().to_string();
    let at = if frames.is_empty() {
        String::new()
    } else {
        format!(" at {frames}")
    };
    if store.data().limiter.grow_denied {
        return VmFailure {
            kind: FailureKind::MemoryLimit,
            reason: format!(
                "memory limit of {} bytes reached ({root}){at}",
                limits.memory_limit
            ),
        };
    }
    VmFailure {
        kind: FailureKind::Trap,
        reason: format!("{root}{at}"),
    }
}
