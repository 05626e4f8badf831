//! Builds the `deny-path` example filter (`examples/filters/deny-path`, wasm32-wasip1) and
//! embeds it: `membrane connectivity test` and `membrane lab` attach it to pods as a
//! `WasmFilter` without needing a source tree or a toolchain at run time.

use std::{env, path::PathBuf, process::Command};

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let root = manifest_dir
        .parent()
        .expect("the lab is in the workspace")
        .to_owned();
    let example = root.join("examples/filters/deny-path");
    for watched in [
        example.join("src"),
        example.join("Cargo.toml"),
        root.join("sdk/src"),
        root.join("sdk/Cargo.toml"),
    ] {
        println!("cargo:rerun-if-changed={}", watched.display());
    }
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets it"));
    let target_dir = out.join("wasm");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&example)
        .args(["build", "--release", "--quiet", "--target", "wasm32-wasip1"])
        .arg("--target-dir")
        .arg(&target_dir)
        // Whatever this build was given (clippy's wrapper, host flags) is not for the guest.
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .expect("run cargo for the deny-path example filter");
    assert!(
        status.success(),
        "building examples/filters/deny-path for wasm32-wasip1 failed (rustup target add wasm32-wasip1)"
    );
    let module = target_dir.join("wasm32-wasip1/release/deny_path.wasm");
    assert!(module.exists(), "{} was not built", module.display());
    println!(
        "cargo:rustc-env=MEMBRANE_DENY_PATH_WASM={}",
        module.display()
    );
}
