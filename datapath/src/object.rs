//! The eBPF object, compiled by `build.rs` and embedded in the binary so that the agent, the
//! CLI and the tests always load the programs that match this build's ABI crate.

/// ELF bytes of `membrane-ebpf` (bpfel), 8-byte aligned as the ELF parser needs.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/membrane"));
