//! Compiles `proto/` with protox (a pure-Rust protobuf compiler, so no `protoc` is needed)
//! and generates the prost messages plus the tonic servers and clients for `observer.Observer`
//! and `peer.Peer`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/flow/flow.proto",
        "proto/relay/relay.proto",
        "proto/observer/observer.proto",
        "proto/peer/peer.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // RPCs membrane does not serve (agent/debug events, nodes) answer UNIMPLEMENTED.
        .generate_default_stubs(true)
        .compile_fds(descriptors)?;
    Ok(())
}
