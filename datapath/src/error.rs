//! Errors of the datapath crate. Each names the object it was acting on (map, program,
//! interface, namespace, path) so the message is actionable on its own.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object failed (pinned maps under {pin_dir}): {source}")]
    Load {
        pin_dir: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("the eBPF object has no {kind} named `{name}` (build and ABI crate out of sync?)")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("map `{map}`: {op} failed: {source}")]
    Map {
        map: &'static str,
        op: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("program `{program}`: {op} failed: {source}")]
    Program {
        program: &'static str,
        op: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("bpffs at {path}: {what}: {source}")]
    BpfFs {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("network namespace `{netns}`: {what}: {source}")]
    Netns {
        netns: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("command `{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error(
        "pinned maps at {pin_dir} have ABI version {found}, this build uses {expected}; \
             detach the old datapath and remove the pins (`membrane lab down` for the lab) before loading this build"
    )]
    AbiMismatch {
        pin_dir: PathBuf,
        found: String,
        expected: u32,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid {what}: {detail}")]
    Invalid { what: &'static str, detail: String },
}

pub type Result<T, E = DatapathError> = std::result::Result<T, E>;
