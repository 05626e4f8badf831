//! Generates the CRI client (`proto/cri_runtime_v1.proto`, tonic) for the containerd test
//! (`tests/containerd.rs` includes it). The plugin itself uses none of it: tonic and prost
//! are dev-dependencies, and the binary links neither.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/cri_runtime_v1.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
