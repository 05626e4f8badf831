//! [`FilterHost`]: the wasmtime engine (Cranelift, pooling allocator, epoch interruption), the
//! linker with every proxy-wasm and WASI import, the epoch ticker thread, the module cache and
//! the host-wide shared state. Filters are loaded through it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, Linker, OptLevel, PoolingAllocationConfig,
};

use crate::config::{FilterSpec, HostConfig};
use crate::error::FilterError;
use crate::filter::Filter;
use crate::hostcalls;
use crate::module::ModuleCache;
use crate::shared::{MetricSnapshot, SharedState};
use crate::state::HostState;

pub(crate) struct HostInner {
    pub engine: Engine,
    pub linker: Linker<HostState>,
    pub shared: Arc<SharedState>,
    pub cache: ModuleCache,
    pub config: HostConfig,
    next_instance: AtomicU64,
}

impl HostInner {
    pub fn next_instance_id(&self) -> u64 {
        self.next_instance.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// The filter host. Cheap to clone; filters keep it alive.
#[derive(Clone)]
pub struct FilterHost {
    inner: Arc<HostInner>,
}

impl FilterHost {
    /// Creates the engine and starts the epoch ticker thread (it stops when the last filter
    /// and the host are dropped).
    pub fn new(config: HostConfig) -> Result<Self, FilterError> {
        let mut cfg = Config::new();
        cfg.epoch_interruption(true);
        cfg.wasm_backtrace_max_frames(std::num::NonZeroUsize::new(20));
        cfg.cranelift_opt_level(OptLevel::Speed);
        let mut pool = PoolingAllocationConfig::new();
        pool.total_core_instances(config.max_instances)
            .total_memories(config.max_instances)
            .total_tables(config.max_instances)
            .max_memory_size(config.max_memory_per_instance);
        cfg.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&cfg).map_err(|e| FilterError::Engine(format!("{e:#}")))?;
        let mut linker = Linker::new(&engine);
        hostcalls::register(&mut linker).map_err(|e| FilterError::Engine(format!("{e:#}")))?;
        spawn_epoch_ticker(&engine, config.epoch_tick)?;
        Ok(Self {
            inner: Arc::new(HostInner {
                engine,
                linker,
                shared: Arc::new(SharedState::default()),
                cache: ModuleCache::default(),
                config,
                next_instance: AtomicU64::new(0),
            }),
        })
    }

    /// Compiles (or reuses) the module, boots one instance and runs `proxy_on_vm_start` and
    /// `proxy_on_configure`; the filter is returned only if all of that succeeded. Call off
    /// the data path (compiling takes ~100 ms).
    pub fn load(&self, spec: FilterSpec) -> Result<Arc<Filter>, FilterError> {
        Filter::load(self.inner.clone(), spec)
    }

    /// What a module declares and needs (`membrane filter check`): its ABI version, its
    /// imports and whether the host provides them, its exports. Compiles, never runs it.
    pub fn inspect(&self, bytes: &[u8]) -> Result<crate::inspect::ModuleReport, FilterError> {
        crate::inspect::inspect(&self.inner.engine, &self.inner.linker, bytes)
    }

    /// Values of every metric filters defined (`proxy_define_metric`).
    pub fn metrics(&self) -> Vec<MetricSnapshot> {
        self.inner.shared.metrics()
    }

    /// Number of distinct compiled modules alive (modules are cached by sha256).
    pub fn compiled_modules(&self) -> usize {
        self.inner.cache.len()
    }
}

/// One thread per engine advancing the epoch every `tick`; holds only a weak engine reference.
fn spawn_epoch_ticker(engine: &Engine, tick: Duration) -> Result<(), FilterError> {
    if tick.is_zero() {
        return Err(FilterError::Engine("epoch_tick must be > 0".into()));
    }
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("membrane-wasm-epoch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(tick);
                match weak.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => return,
                }
            }
        })
        .map_err(|e| FilterError::Engine(format!("cannot start the epoch ticker: {e}")))?;
    Ok(())
}
