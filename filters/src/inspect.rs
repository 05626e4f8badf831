//! `membrane filter check`: what a module declares and needs, without running it — and the
//! truth about how membrane answers each import: implemented, partly implemented (with what
//! answers instead), or missing. A stub is never reported as implemented.

use wasmtime::{ExternType, Linker, Module};

use crate::abi::AbiVersion;
use crate::error::FilterError;
use crate::hostcalls::WASI_FUNCTIONS;
use crate::module::detect_abi;
use crate::state::HostState;

/// How the host answers one import of a module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportStatus {
    /// Implemented as the ABI (and Envoy) describe it.
    Implemented,
    /// Links and answers, but not all of what the ABI describes: the text says what answers
    /// instead.
    Partial(&'static str),
    /// A WASI function the host does not provide: the module loads, a call traps.
    TrapsIfCalled,
    /// Not provided: the module is refused at load.
    Missing,
}

impl ImportStatus {
    /// `implemented`, `partial`, `traps if called`, `missing`.
    pub fn label(&self) -> &'static str {
        match self {
            ImportStatus::Implemented => "implemented",
            ImportStatus::Partial(_) => "partial",
            ImportStatus::TrapsIfCalled => "traps if called",
            ImportStatus::Missing => "missing",
        }
    }
}

/// One import and how the host answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportReport {
    pub module: String,
    pub name: String,
    pub status: ImportStatus,
}

/// The context types a module declares, from the callbacks it exports. (Modules built with
/// the upstream Rust SDK export every callback whatever they use, so they declare all three.)
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ContextTypes {
    /// HTTP stream callbacks (`proxy_on_request_headers` … `_response_body`).
    pub http: bool,
    /// TCP stream callbacks (`proxy_on_new_connection`, `_downstream_data`, `_upstream_data`).
    pub tcp: bool,
    /// Root / service callbacks (`proxy_on_vm_start`, `_configure`, `_tick`, `_queue_ready`).
    pub root: bool,
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
    pub contexts: ContextTypes,
    /// Whether it imports the gRPC callout functions.
    pub uses_grpc: bool,
    /// Callbacks it exports that membrane never calls, each with why.
    pub undelivered_callbacks: Vec<(String, &'static str)>,
    /// What linking still reports with every missing import stubbed (a provided function
    /// imported with another signature, a memory or table import).
    pub link_error: Option<String>,
}

impl ModuleReport {
    /// True if the host can load it (a supported ABI, nothing missing).
    pub fn loadable(&self) -> bool {
        self.refusal().is_none()
    }

    /// Why the host refuses it at load, or `None`.
    pub fn refusal(&self) -> Option<String> {
        if let Err(e) = &self.abi {
            return Some(format!("no supported proxy-wasm ABI version ({e})"));
        }
        let missing: Vec<String> = self
            .imports
            .iter()
            .filter(|i| i.status == ImportStatus::Missing)
            .map(|i| format!("{}::{}", i.module, i.name))
            .collect();
        if !missing.is_empty() {
            return Some(format!(
                "imports membrane does not provide: {}",
                missing.join(", ")
            ));
        }
        self.link_error.clone()
    }
}

/// What answers instead for imports membrane provides only in part. Everything else it
/// defines is implemented; everything it does not define is missing.
pub(crate) fn partial_note(module: &str, name: &str) -> Option<&'static str> {
    if matches!(module, "wasi_snapshot_preview1" | "wasi_unstable") {
        return match name {
            "fd_write" => Some("fd 1 and 2 go to the filter log; other descriptors: BADF"),
            "fd_read" | "fd_fdstat_set_flags" | "fd_prestat_dir_name" => {
                Some("no files: answers NOSYS")
            }
            "fd_seek" | "fd_prestat_get" | "fd_filestat_get" => Some("no files: answers BADF"),
            "fd_close" => Some("no files: answers SUCCESS and does nothing"),
            "fd_fdstat_get" => Some("fd 1 and 2 only; others: BADF"),
            "path_open" => Some("no filesystem: answers NOENT"),
            "path_filestat_get" => Some("no filesystem: answers NOTSUP"),
            "environ_get" | "environ_sizes_get" => {
                Some("the filter's configured environment only, never the host's")
            }
            "args_get" | "args_sizes_get" => Some("always empty"),
            "proc_exit" => Some("ends the instance: the call fails it (failure policy applies)"),
            "poll_oneoff" => Some("never waits: answers 0 events"),
            "sched_yield" => Some("returns at once"),
            _ => None,
        };
    }
    if module != "env" {
        return None;
    }
    match name {
        "proxy_http_call" => Some(
            "sent only while the phase that made the call is paused (as the SDK examples \
             do); a call made in a phase that goes on is not sent and fails before \
             proxy_on_done; only streams may call (root contexts: BAD_ARGUMENT)",
        ),
        "proxy_grpc_call" | "proxy_grpc_stream" => Some(
            "carried only while the phase that made the call is paused; a call made in a \
             phase that goes on is not sent and closes with UNAVAILABLE before proxy_on_done; \
             only streams may call (root contexts: INTERNAL_FAILURE)",
        ),
        "proxy_grpc_send" | "proxy_grpc_close" | "proxy_grpc_cancel" => {
            Some("acts while the call's phase is paused (see proxy_grpc_stream)")
        }
        "proxy_register_shared_queue"
        | "proxy_resolve_shared_queue"
        | "proxy_enqueue_shared_queue"
        | "proxy_dequeue_shared_queue" => {
            Some("queues work, but proxy_on_queue_ready is never delivered: poll with dequeue")
        }
        "proxy_call_foreign_function" => {
            Some("no foreign functions are registered: every name answers NOT_FOUND")
        }
        "proxy_done" => Some("proxy_on_done returning false is logged, not waited for"),
        "proxy_get_header_map_pairs"
        | "proxy_get_header_map_value"
        | "proxy_get_header_map_size"
        | "proxy_set_header_map_pairs"
        | "proxy_add_header_map_value"
        | "proxy_replace_header_map_value"
        | "proxy_remove_header_map_value" => Some(
            "trailer maps (1, 3) are empty and writes to them are ignored: trailers phases are not driven",
        ),
        "proxy_continue_stream" => Some(
            "UPSTREAM answers UNIMPLEMENTED (as Envoy); a pause resumes only from a callout \
             response, not from a timer or queue",
        ),
        "proxy_set_tick_period_milliseconds" => {
            Some("ticks are delivered where the proxy drives them (~100 ms granularity)")
        }
        _ => None,
    }
}

/// Callbacks a module may export that membrane never calls.
fn undelivered(name: &str) -> Option<&'static str> {
    Some(match name {
        "proxy_on_request_trailers" | "proxy_on_response_trailers" => {
            "trailers phases are not driven"
        }
        "proxy_on_queue_ready" => "queue notifications are not delivered",
        "proxy_on_foreign_function" => "no asynchronous foreign functions exist",
        _ => return None,
    })
}

/// The context types `exports` declare.
pub(crate) fn context_types<'a>(exports: impl IntoIterator<Item = &'a str>) -> ContextTypes {
    let mut c = ContextTypes::default();
    for name in exports {
        match name {
            "proxy_on_request_headers"
            | "proxy_on_request_body"
            | "proxy_on_response_headers"
            | "proxy_on_response_body" => c.http = true,
            "proxy_on_new_connection" | "proxy_on_downstream_data" | "proxy_on_upstream_data" => {
                c.tcp = true
            }
            "proxy_on_vm_start"
            | "proxy_on_configure"
            | "proxy_on_tick"
            | "proxy_on_queue_ready" => c.root = true,
            _ => {}
        }
    }
    c
}

/// Compiles `bytes` and checks every import against `linker`. An import is missing when
/// defining it on a copy of the host's linker succeeds (it was not there); each one found is
/// stubbed so that every problem is listed.
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
    Ok(report(&module, linker, crate::module::sha256_hex(bytes)))
}

pub(crate) fn report(module: &Module, linker: &Linker<HostState>, sha256: String) -> ModuleReport {
    let mut imports = Vec::new();
    let mut probe = linker.clone();
    probe.allow_shadowing(false);
    for import in module.imports() {
        let mut status = match partial_note(import.module(), import.name()) {
            Some(note) => ImportStatus::Partial(note),
            None => ImportStatus::Implemented,
        };
        if let ExternType::Func(ty) = import.ty() {
            let is_wasi = matches!(import.module(), "wasi_snapshot_preview1" | "wasi_unstable");
            let defined_now = probe
                .func_new(import.module(), import.name(), ty, |_, _, _| {
                    Err(wasmtime::Error::msg("stub"))
                })
                .is_ok();
            if defined_now {
                status = if is_wasi && !WASI_FUNCTIONS.contains(&import.name()) {
                    ImportStatus::TrapsIfCalled
                } else {
                    ImportStatus::Missing
                };
            }
        }
        imports.push(ImportReport {
            module: import.module().to_owned(),
            name: import.name().to_owned(),
            status,
        });
    }
    // With every missing one stubbed, what still fails to link is a signature mismatch.
    let link_error = probe
        .instantiate_pre(module)
        .err()
        .map(|e| format!("{e:#}"));
    let exports: Vec<String> = module
        .exports()
        .filter(|e| matches!(e.ty(), ExternType::Func(_)))
        .map(|e| e.name().to_owned())
        .collect();
    let undelivered_callbacks = exports
        .iter()
        .filter_map(|e| undelivered(e).map(|why| (e.clone(), why)))
        .collect();
    let uses_grpc = imports
        .iter()
        .any(|i| i.module == "env" && i.name.starts_with("proxy_grpc_"));
    ModuleReport {
        contexts: context_types(exports.iter().map(String::as_str)),
        link_error,
        abi: detect_abi(module),
        sha256,
        imports,
        exports,
        uses_grpc,
        undelivered_callbacks,
    }
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
        assert_eq!(status("proxy_log"), Some(ImportStatus::Implemented));
        assert_eq!(status("proxy_teleport"), Some(ImportStatus::Missing));
        assert_eq!(status("sock_accept"), Some(ImportStatus::TrapsIfCalled));
        assert_eq!(report.abi.as_ref().map(|a| a.as_str()), Ok("0.2.1"));
        assert!(
            report
                .exports
                .contains(&"proxy_on_memory_allocate".to_owned())
        );
        assert!(!report.loadable(), "a missing env import does not load");
        assert!(
            report.refusal().unwrap().contains("env::proxy_teleport"),
            "{:?}",
            report.refusal()
        );
        assert_eq!(
            report.contexts,
            crate::ContextTypes::default(),
            "no callbacks exported"
        );

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
