//! Compiling modules once: sha256 of the bytes, ABI version detection, linking against the
//! host's imports (`InstancePre`), and the cache that makes a second load of the same bytes
//! (another filter, a reload with an unchanged module) free.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use sha2::{Digest, Sha256};
use wasmtime::{Engine, ExternType, InstancePre, Linker, Module};

use crate::abi::AbiVersion;
use crate::error::FilterError;
use crate::hostcalls::WASI_FUNCTIONS;
use crate::shared::lock;
use crate::state::HostState;

/// A compiled, linked module. Shared by every filter and generation using the same bytes.
pub(crate) struct CompiledModule {
    pub sha256: String,
    pub abi: AbiVersion,
    pub pre: InstancePre<HostState>,
    /// The context types its exports declare (checked against a filter's protocol).
    pub contexts: crate::inspect::ContextTypes,
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Modules by sha256. Weak: a module no filter uses any more is freed.
#[derive(Default)]
pub(crate) struct ModuleCache {
    map: Mutex<HashMap<String, Weak<CompiledModule>>>,
}

impl ModuleCache {
    pub fn len(&self) -> usize {
        lock(&self.map)
            .values()
            .filter(|w| w.strong_count() > 0)
            .count()
    }

    /// Returns the cached module for these bytes, or compiles and links it. Compilation runs
    /// outside the cache lock (it takes ~100 ms per module on this class of machine).
    pub fn get_or_compile(
        &self,
        engine: &Engine,
        linker: &Linker<HostState>,
        filter: &str,
        bytes: &[u8],
    ) -> Result<Arc<CompiledModule>, FilterError> {
        let sha256 = sha256_hex(bytes);
        if let Some(m) = lock(&self.map).get(&sha256).and_then(Weak::upgrade) {
            return Ok(m);
        }
        let compiled = Arc::new(compile(engine, linker, filter, bytes, sha256.clone())?);
        let mut map = lock(&self.map);
        map.retain(|_, w| w.strong_count() > 0);
        map.insert(sha256, Arc::downgrade(&compiled));
        Ok(compiled)
    }
}

fn compile(
    engine: &Engine,
    linker: &Linker<HostState>,
    filter: &str,
    bytes: &[u8],
    sha256: String,
) -> Result<CompiledModule, FilterError> {
    let module = Module::from_binary(engine, bytes).map_err(|e| FilterError::Compile {
        filter: filter.to_owned(),
        sha256: sha256.clone(),
        reason: format!("{e:#}"),
    })?;
    let abi = detect_abi(&module).map_err(|found| FilterError::AbiVersion {
        filter: filter.to_owned(),
        sha256: sha256.clone(),
        found,
    })?;

    // A module that needs what membrane lacks is refused now, with the list, rather than
    // left to fail on a link error naming only the first one.
    let report = crate::inspect::report(&module, linker, sha256.clone());
    let missing: Vec<String> = report
        .imports
        .iter()
        .filter(|i| i.status == crate::inspect::ImportStatus::Missing)
        .map(|i| format!("{}::{}", i.module, i.name))
        .collect();
    if !missing.is_empty() {
        return Err(FilterError::Unsupported {
            filter: filter.to_owned(),
            sha256,
            reason: format!(
                "it imports what membrane does not provide: {}",
                missing.join(", ")
            ),
        });
    }
    let contexts = report.contexts;

    // WASI functions we do not provide (filesystem, sockets) link as traps with a message, so
    // a module that imports but never calls them still loads (cpp-host stubs them too).
    // Unknown `env` functions are a link error naming the import.
    let mut missing_wasi = Vec::new();
    for import in module.imports() {
        let is_wasi = matches!(import.module(), "wasi_snapshot_preview1" | "wasi_unstable");
        if is_wasi
            && !WASI_FUNCTIONS.contains(&import.name())
            && let ExternType::Func(ty) = import.ty()
        {
            missing_wasi.push((import.module().to_owned(), import.name().to_owned(), ty));
        }
    }
    let link_err = |e: wasmtime::Error| FilterError::Link {
        filter: filter.to_owned(),
        sha256: sha256.clone(),
        reason: format!("{e:#}"),
    };
    let pre = if missing_wasi.is_empty() {
        linker.instantiate_pre(&module).map_err(link_err)?
    } else {
        let mut linker = linker.clone();
        for (m, name, ty) in missing_wasi {
            let msg = format!("WASI function {m}::{name} is not provided by membrane");
            linker
                .func_new(&m, &name, ty, move |_, _, _| {
                    Err(wasmtime::Error::msg(msg.clone()))
                })
                .map_err(link_err)?;
        }
        linker.instantiate_pre(&module).map_err(link_err)?
    };
    Ok(CompiledModule {
        sha256,
        abi,
        pre,
        contexts,
    })
}

/// cpp-host's rule: the first *function* export named `proxy_abi_version_*` decides. 0.1.0 is
/// not supported (its callbacks have different signatures).
pub(crate) fn detect_abi(module: &Module) -> Result<AbiVersion, String> {
    let mut seen = Vec::new();
    for export in module.exports() {
        if !export.name().starts_with("proxy_abi_version_") {
            continue;
        }
        if !matches!(export.ty(), ExternType::Func(_)) {
            continue;
        }
        match export.name() {
            "proxy_abi_version_0_2_1" => return Ok(AbiVersion::V0_2_1),
            "proxy_abi_version_0_2_0" => return Ok(AbiVersion::V0_2_0),
            other => seen.push(other.to_owned()),
        }
    }
    Err(if seen.is_empty() {
        "no proxy_abi_version_* function".to_owned()
    } else {
        seen.join(", ")
    })
}
