//! Builds the upstream-SDK acceptance guest (`tests/guests/upstream-sdk`, wasm32-wasip1) once
//! per test binary. Shared by the standalone filter tests and the lab tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub const TARGET: &str = "wasm32-wasip1";

/// The guest module's path (built on first use).
pub fn guest_module() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../node-proxy/tests/guests/upstream-sdk");
            let target_dir = match option_env!("CARGO_TARGET_TMPDIR") {
                Some(t) => PathBuf::from(t).join("wasm-guests"),
                None => std::env::temp_dir().join("membrane-wasm-guests"),
            };
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .current_dir(&dir)
                .args(["build", "--release", "--quiet", "--target", TARGET])
                .arg("--target-dir")
                .arg(&target_dir)
                .env_remove("RUSTFLAGS")
                .env_remove("CARGO_ENCODED_RUSTFLAGS")
                .env_remove("CARGO_BUILD_TARGET")
                .status()
                .expect("run cargo for the guest filter");
            assert!(
                status.success(),
                "building {} for {TARGET} failed (is the target installed? \
                 `rustup target add {TARGET}`)",
                dir.display()
            );
            target_dir
                .join(TARGET)
                .join("release")
                .join("upstream_sdk_filter.wasm")
        })
        .clone()
}
