//! [`Filter`]: one configured filter, its current generation (module + configuration + pool of
//! instances) and atomic hot reload.
//!
//! A generation is immutable; reload builds a new one off the data path (compile, boot one
//! instance, `proxy_on_vm_start`, `proxy_on_configure`) and swaps it in only if all of that
//! succeeded, so a broken module or a rejected configuration leaves the last good generation
//! serving. Streams hold the generation they started on, so in-flight streams finish on the
//! old code and configuration while new streams get the new ones.
//!
//! Instances of a generation form a small pool (`FilterSpec::instances`). A stream is assigned
//! to one instance for its whole life (stream affinity: contexts live in guest memory); each
//! callback locks that instance. A failed instance is marked and dropped from the pool; only
//! the streams assigned to it are affected.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::abi::AbiVersion;
use crate::config::{FailurePolicy, FilterProtocol, FilterSpec, LogLevel};
use crate::error::FilterError;
use crate::host::HostInner;
use crate::shared::lock;
use crate::state::FilterSettings;
use crate::vm::{FailureKind, Vm, VmFailure};

/// A configured filter. Shared by every chain that uses it.
pub struct Filter {
    name: Arc<str>,
    host: Arc<HostInner>,
    current: RwLock<Arc<Generation>>,
    /// Serializes reloads (the swap itself is a pointer store under the write lock).
    reload: Mutex<()>,
}

pub(crate) struct Generation {
    pub settings: Arc<FilterSettings>,
    pub spec_policy: FailurePolicy,
    pub limits: crate::config::FilterLimits,
    pub abi: AbiVersion,
    module: Arc<crate::module::CompiledModule>,
    host: Arc<HostInner>,
    instances: usize,
    pool: Mutex<Pool>,
}

struct Pool {
    slots: Vec<Arc<VmSlot>>,
    next: usize,
    consecutive_failures: u32,
    backoff_until: Option<Instant>,
}

/// One pooled instance.
pub(crate) struct VmSlot {
    pub vm: Mutex<Vm>,
    pub failed: AtomicBool,
    pub streams: AtomicUsize,
}

impl Filter {
    pub(crate) fn load(host: Arc<HostInner>, spec: FilterSpec) -> Result<Arc<Filter>, FilterError> {
        let name: Arc<str> = spec.name.as_str().into();
        let generation = Generation::build(&host, spec)?;
        Ok(Arc::new(Filter {
            name,
            host,
            current: RwLock::new(Arc::new(generation)),
            reload: Mutex::new(()),
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// sha256 (hex) of the module currently serving.
    pub fn sha256(&self) -> String {
        self.current().module.sha256.clone()
    }

    pub fn abi_version(&self) -> AbiVersion {
        self.current().abi
    }

    /// Instances alive in the current generation's pool.
    pub fn live_instances(&self) -> usize {
        lock(&self.current().pool)
            .slots
            .iter()
            .filter(|s| !s.failed.load(Ordering::Relaxed))
            .count()
    }

    pub(crate) fn current(&self) -> Arc<Generation> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Hot reload: builds a generation from `spec` (module, configuration, policies) off the
    /// data path and swaps it in atomically. On any error the current generation keeps
    /// serving and the error is returned. `spec.name` must be this filter's name.
    ///
    /// Returns whether the module changed (sha256 differs).
    pub fn reload(&self, spec: FilterSpec) -> Result<bool, FilterError> {
        if *spec.name != *self.name {
            return Err(FilterError::Setting {
                filter: self.name.to_string(),
                field: "name",
                reason: format!("reload must keep the name, got {:?}", spec.name),
            });
        }
        let _serial = lock(&self.reload);
        let generation = Generation::build(&self.host, spec)?;
        let changed = generation.module.sha256 != self.current().module.sha256;
        let old = {
            let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
            std::mem::replace(&mut *current, Arc::new(generation))
        };
        tracing::info!(
            filter = &*self.name,
            old = %old.module.sha256,
            new = %self.current().module.sha256,
            "filter reloaded"
        );
        Ok(changed)
    }

    /// Delivers `proxy_on_tick` to every instance whose root context set a tick period that
    /// has elapsed. The proxy calls this periodically (e.g. every 100 ms); a failing tick
    /// discards the instance like any other failure.
    pub fn tick(&self) {
        let generation = self.current();
        let slots: Vec<_> = lock(&generation.pool).slots.clone();
        for slot in slots {
            if slot.failed.load(Ordering::Relaxed) {
                continue;
            }
            let mut vm = lock(&slot.vm);
            let period = vm.tick_period_ms();
            if period == 0 || !vm.has_tick() || vm.failed {
                continue;
            }
            if vm.last_tick.elapsed() < Duration::from_millis(u64::from(period)) {
                continue;
            }
            if let Err(f) = vm.tick(&generation.limits) {
                slot.failed.store(true, Ordering::Relaxed);
                drop(vm);
                generation.record_failure(&f);
            }
        }
    }
}

impl Generation {
    fn build(host: &Arc<HostInner>, spec: FilterSpec) -> Result<Generation, FilterError> {
        let setting = |field, reason: String| FilterError::Setting {
            filter: spec.name.clone(),
            field,
            reason,
        };
        if spec.name.is_empty() {
            return Err(setting("name", "must not be empty".into()));
        }
        if spec.limits.memory_limit > host.config.max_memory_per_instance {
            return Err(setting(
                "limits.memory_limit",
                format!(
                    "{} bytes exceeds the host's max_memory_per_instance of {} bytes",
                    spec.limits.memory_limit, host.config.max_memory_per_instance
                ),
            ));
        }
        if spec.limits.callback_deadline.is_zero() {
            return Err(setting("limits.callback_deadline", "must be > 0".into()));
        }
        if spec.instances == 0 {
            return Err(setting("instances", "must be at least 1".into()));
        }
        let status_ok = |s: u16| (200..=599).contains(&s);
        match spec.failure_policy {
            FailurePolicy::FailClosed { status } | FailurePolicy::Reload { status, .. }
                if !status_ok(status) =>
            {
                return Err(setting(
                    "failure_policy.status",
                    format!("{status} is not an HTTP status in 200..=599"),
                ));
            }
            _ => {}
        }
        let module =
            host.cache
                .get_or_compile(&host.engine, &host.linker, &spec.name, &spec.module)?;
        let declared = match spec.protocol {
            FilterProtocol::Http => module.contexts.http,
            FilterProtocol::Tcp => module.contexts.tcp,
        };
        // A module that declares stream callbacks of the other protocol only is clearly
        // attached wrong; one that declares none (lifecycle or service only) has nothing to
        // run per stream and is accepted, as Envoy does.
        if !declared && (module.contexts.http || module.contexts.tcp) {
            let callbacks = match spec.protocol {
                FilterProtocol::Http => {
                    "proxy_on_request_headers/_request_body/_response_headers/_response_body"
                }
                FilterProtocol::Tcp => "proxy_on_new_connection/_downstream_data/_upstream_data",
            };
            return Err(FilterError::Unsupported {
                filter: spec.name.clone(),
                sha256: module.sha256.clone(),
                reason: format!(
                    "attached as a {} filter, but it exports none of {callbacks}",
                    spec.protocol.as_str()
                ),
            });
        }
        let settings = Arc::new(FilterSettings {
            name: spec.name.as_str().into(),
            vm_id: spec.vm_id.as_deref().unwrap_or(&spec.name).into(),
            root_id: spec.root_id,
            plugin_config: spec.config,
            vm_config: spec.vm_config,
            env: spec.env,
            log_level: spec.log_level,
            log_sink: host.config.log_sink.clone(),
            callout_upstreams: spec.callout_upstreams,
        });
        let generation = Generation {
            settings,
            spec_policy: spec.failure_policy,
            limits: spec.limits,
            abi: module.abi,
            module,
            host: host.clone(),
            instances: spec.instances,
            pool: Mutex::new(Pool {
                slots: Vec::new(),
                next: 0,
                consecutive_failures: 0,
                backoff_until: None,
            }),
        };
        // Boot and configure one instance now: that validates the module and configuration
        // before anything is swapped, and the instance serves the first streams.
        let vm = generation.boot()?;
        lock(&generation.pool).slots.push(Arc::new(VmSlot {
            vm: Mutex::new(vm),
            failed: AtomicBool::new(false),
            streams: AtomicUsize::new(0),
        }));
        Ok(generation)
    }

    fn boot(&self) -> Result<Vm, FilterError> {
        Vm::boot(
            &self.host.engine,
            &self.module,
            self.settings.clone(),
            self.host.shared.clone(),
            &self.limits,
            self.host.config.epoch_tick,
            self.host.next_instance_id(),
        )
    }

    /// Picks the instance for a new stream: boots one while the pool is below its size (unless
    /// backing off after failures), else round-robin over the live ones.
    pub fn acquire(&self) -> Result<Arc<VmSlot>, VmFailure> {
        let mut pool = lock(&self.pool);
        pool.slots.retain(|s| !s.failed.load(Ordering::Relaxed));
        let backing_off = pool.backoff_until.is_some_and(|t| Instant::now() < t);
        if pool.slots.len() < self.instances && !backing_off {
            match self.boot() {
                Ok(vm) => {
                    let slot = Arc::new(VmSlot {
                        vm: Mutex::new(vm),
                        failed: AtomicBool::new(false),
                        streams: AtomicUsize::new(0),
                    });
                    pool.slots.push(slot.clone());
                    slot.streams.fetch_add(1, Ordering::Relaxed);
                    return Ok(slot);
                }
                Err(e) => {
                    self.settings.log(0, 0, LogLevel::Error, format!("{e}"));
                    Self::note_failure(&mut pool, self.spec_policy);
                }
            }
        }
        if pool.slots.is_empty() {
            return Err(VmFailure {
                kind: FailureKind::Unavailable,
                reason: if backing_off {
                    "no instance: backing off after failures".into()
                } else {
                    "no instance could be booted".into()
                },
            });
        }
        let i = pool.next % pool.slots.len();
        pool.next = pool.next.wrapping_add(1);
        let slot = pool.slots[i].clone();
        slot.streams.fetch_add(1, Ordering::Relaxed);
        Ok(slot)
    }

    /// Called after an instance failed (it is already marked).
    pub fn record_failure(&self, f: &VmFailure) {
        if f.kind == FailureKind::Unavailable {
            return;
        }
        let mut pool = lock(&self.pool);
        pool.slots.retain(|s| !s.failed.load(Ordering::Relaxed));
        Self::note_failure(&mut pool, self.spec_policy);
    }

    fn note_failure(pool: &mut Pool, policy: FailurePolicy) {
        pool.consecutive_failures = pool.consecutive_failures.saturating_add(1);
        if let FailurePolicy::Reload {
            backoff_base,
            backoff_max,
            ..
        } = policy
        {
            let exp = pool.consecutive_failures.saturating_sub(1).min(20);
            let delay = backoff_base.saturating_mul(1 << exp).min(backoff_max);
            pool.backoff_until = Some(Instant::now() + delay);
        }
    }

    /// A stream finished cleanly: the crash-loop counter starts over.
    pub fn record_success(&self) {
        let mut pool = lock(&self.pool);
        if pool.consecutive_failures != 0 {
            pool.consecutive_failures = 0;
        }
    }
}
