//! Errors of the filter host. Every variant names the filter (and module digest where one
//! exists) so an operator can tell which `WasmFilter` resource to fix.

/// Errors loading, booting or reloading a filter.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error(
        "filter {filter}: module {sha256} is not valid WebAssembly or failed to compile: {reason}"
    )]
    Compile {
        filter: String,
        sha256: String,
        reason: String,
    },
    #[error(
        "filter {filter}: module {sha256} declares no supported proxy-wasm ABI version \
         (exports {found}; supported: proxy_abi_version_0_2_1, proxy_abi_version_0_2_0)"
    )]
    AbiVersion {
        filter: String,
        sha256: String,
        found: String,
    },
    #[error("filter {filter}: module {sha256} is refused: {reason}")]
    Unsupported {
        filter: String,
        sha256: String,
        reason: String,
    },
    #[error("filter {filter}: module {sha256} cannot be linked: {reason}")]
    Link {
        filter: String,
        sha256: String,
        reason: String,
    },
    #[error("filter {filter}: module {sha256} export {export} has the wrong signature: {reason}")]
    Export {
        filter: String,
        sha256: String,
        export: &'static str,
        reason: String,
    },
    #[error("filter {filter}: instance of module {sha256} failed to start in {stage}: {reason}")]
    Boot {
        filter: String,
        sha256: String,
        stage: &'static str,
        reason: String,
    },
    #[error(
        "filter {filter}: proxy_on_{stage} returned false (configuration rejected by module {sha256})"
    )]
    Rejected {
        filter: String,
        sha256: String,
        stage: &'static str,
    },
    #[error("filter {filter}: invalid setting {field}: {reason}")]
    Setting {
        filter: String,
        field: &'static str,
        reason: String,
    },
    #[error("filter host: cannot create the wasmtime engine: {0}")]
    Engine(String),
}
