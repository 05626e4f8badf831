//! Builds the kernel programs (`membrane-ebpf`, target bpfel-unknown-none, nightly toolchain,
//! bpf-linker) and leaves the object at `$OUT_DIR/membrane`, which `src/object.rs` embeds.
//! `cargo xtask bootstrap` installs the toolchain pieces this needs.

use aya_build::{Package, Toolchain};

fn main() {
    let ebpf_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf");
    let package = Package {
        name: "membrane-ebpf",
        root_dir: ebpf_dir,
        ..Default::default()
    };
    if let Err(err) = aya_build::build_ebpf([package], Toolchain::default()) {
        // A build script can only report through a panic; say what to do about it.
        panic!(
            "building the eBPF programs failed: {err:#}\n\
             hint: run `cargo xtask bootstrap` (needs the nightly toolchain with rust-src and \
             bpf-linker built against LLVM 22)"
        );
    }
}
