//! `membrane filter check`: what a module declares and needs, without running it.

use wasmtime::{ExternType, Linker, Module};

use crate::abi::AbiVersion;
use crate::error::FilterError;
use crate::hostcalls::WASI_FUNCTIONS;
use crate::module::detect_abi;
use crate::state::HostState;

/// How the host answers one import of a module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportStatus {
    /// The host provides it.
    Provided,
    /// A WASI function the host does not provide: the module loads, a call traps.
    TrapsIfCalled,
    /// Not provided: the module does not load.
    Missing,
}

/// One import and how the host answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportReport {
    pub module: String,
    pub name: String,
    pub status: ImportStatus,
}

/// What `membrane filter check` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleReport {
    /// The declared proxy-wasm ABI, or why none is usable (no export, an unsupported one).
    pub abi: Result<AbiVersion, String>,
    pub sha256: String,
    pub imports: Vec<ImportReport>,
    /// Exported function names.
    pub exports: Vec<String>,
    /// What linking still reports with every missing import stubbed (a provided function
    /// imported with another signature, a memory or table import).
    pub link_error: Option<String>,
}

impl ModuleReport {
    /// True if the host can load it (a supported ABI, nothing missing).
    pub fn loadable(&self) -> bool {
        self.abi.is_ok()
            && self.link_error.is_none()
            && self
                .imports
                .iter()
                .all(|i| i.status != ImportStatus::Missing)
    }
}

/// Compiles `bytes` and checks every import against `linker`. An import is missing when
/// instantiating reports it undefined; each one found is stubbed and the check repeated, so
/// all of them are listed (bounded by the number of imports).
pub(crate) fn inspect(
    engine: &wasmtime::Engine,
    linker: &Linker<HostState>,
    bytes: &[u8],
) -> Result<ModuleReport, FilterError> {
    let module = Module::new(engine, bytes).map_err(|e| FilterError::Compile {
        filter: "check".to_owned(),
        sha256: crate::module::sha256_hex(bytes),
        reason: format!("{e:#}"),
    })?;
    let mut imports: Vec<ImportReport> = module
        .imports()
        .map(|i| ImportReport {
            module: i.module().to_owned(),
            name: i.name().to_owned(),
            status: ImportStatus::Provided,
        })
        .collect();
    // An import is missing when defining it on the host's linker succeeds (it was not
    // there). WASI functions the host lacks are stubbed as traps when loading.
    let mut probe = linker.clone();
    probe.allow_shadowing(false);
    for (import, report) in module.imports().zip(imports.iter_mut()) {
        let ExternType::Func(ty) = import.ty() else {
            continue;
        };
        let is_wasi = matches!(import.module(), "wasi_snapshot_preview1" | "wasi_unstable");
        let defined_now = probe
            .func_new(import.module(), import.name(), ty, |_, _, _| {
                Err(wasmtime::Error::msg("stub"))
            })
            .is_ok();
        if defined_now {
            report.status = if is_wasi && !WASI_FUNCTIONS.contains(&import.name()) {
                ImportStatus::TrapsIfCalled
            } else {
                ImportStatus::Missing
            };
        }
    }
    // With every missing one stubbed, what still fails to link is a signature mismatch.
    let link = probe
        .instantiate_pre(&module)
        .err()
        .map(|e| format!("{e:#}"));
    let exports = module
        .exports()
        .filter(|e| matches!(e.ty(), ExternType::Func(_)))
        .map(|e| e.name().to_owned())
        .collect();
    Ok(ModuleReport {
        link_error: link,
        abi: detect_abi(&module),
        sha256: crate::module::sha256_hex(bytes),
        imports,
        exports,
    })
}

#[cfg(test)]
mod tests {
    use crate::{FilterHost, HostConfig, ImportStatus};

    #[test]
    fn imports_are_classified_and_exports_listed() {
        let wasm = wat::parse_str(
            r#"(module
                (import "env" "proxy_log" (func (param i32 i32 i32) (result i32)))
                (import "env" "proxy_teleport" (func (param i32) (result i32)))
                (import "wasi_snapshot_preview1" "fd_close" (func (param i32) (result i32)))
                (import "wasi_snapshot_preview1" "sock_accept" (func (param i32 i32 i32) (result i32)))
                (memory (export "memory") 1)
                (func (export "proxy_abi_version_0_2_1"))
                (func (export "proxy_on_memory_allocate") (param i32) (result i32) i32.const 0))"#,
        )
        .expect("valid wat");
        let host = FilterHost::new(HostConfig::default()).expect("host");
        let report = host.inspect(&wasm).expect("inspect");
        let status = |name: &str| {
            report
                .imports
                .iter()
                .find(|i| i.name == name)
                .map(|i| i.status)
        };
        assert_eq!(status("proxy_log"), Some(ImportStatus::Provided));
        assert_eq!(status("proxy_teleport"), Some(ImportStatus::Missing));
        assert_eq!(status("sock_accept"), Some(ImportStatus::TrapsIfCalled));
        assert_eq!(report.abi.as_ref().map(|a| a.as_str()), Ok("0.2.1"));
        assert!(
            report
                .exports
                .contains(&"proxy_on_memory_allocate".to_owned())
        );
        assert!(!report.loadable(), "a missing env import does not load");

        // A provided function imported with the wrong signature is a link error.
        let wrong = wat::parse_str(
            r#"(module (import "env" "proxy_log" (func (param i32)))
                (func (export "proxy_abi_version_0_2_0")))"#,
        )
        .unwrap();
        let report = host.inspect(&wrong).unwrap();
        assert!(report.link_error.is_some(), "{report:?}");
        // No ABI export.
        let none = wat::parse_str("(module)").unwrap();
        let report = host.inspect(&none).unwrap();
        assert!(report.abi.is_err() && !report.loadable());
    }
}
