//! Builds the guest filters (the examples, the test-only `chaos` filter and the upstream-SDK
//! conformance filter) for wasm32-wasip1
//! with the same toolchain, once per test binary, into `<target>/tmp/wasm-guests`.
//! [`guest_at`] builds one guest crate on demand (other test crates include this file too).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const TARGET: &str = "wasm32-wasip1";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("filters/ has a parent")
        .to_path_buf()
}

fn guest_target_dir() -> PathBuf {
    match option_env!("CARGO_TARGET_TMPDIR") {
        Some(dir) => PathBuf::from(dir).join("wasm-guests"),
        None => std::env::temp_dir().join("membrane-wasm-guests"),
    }
}

/// Fails loudly when the wasm32-wasip1 target is not installed.
fn check_target() {
    let out = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .expect("run rustc --print sysroot");
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let lib = Path::new(&sysroot).join("lib/rustlib").join(TARGET);
    assert!(
        lib.is_dir(),
        "the {TARGET} target is not installed ({} missing): run `rustup target add {TARGET}` \
         (cargo xtask bootstrap does)",
        lib.display()
    );
}

fn build(manifest_dir: &Path) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(manifest_dir)
        .args([
            "build",
            "--release",
            "--quiet",
            "--target",
            TARGET,
            "--target-dir",
        ])
        .arg(guest_target_dir())
        // The outer build's flags are for the host target.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .status()
        .expect("run cargo for the guest filters");
    assert!(
        status.success(),
        "building the guest filter in {} for {TARGET} failed",
        manifest_dir.display()
    );
}

/// Returns the bytes of the guest crate in `dir` (relative to the workspace root), building
/// it the first time it is asked for in this test binary.
pub fn guest_at(dir: &str, crate_name: &str) -> Vec<u8> {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static BUILT: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    {
        let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
        let built = built.get_or_insert_with(HashSet::new);
        if !built.contains(dir) {
            check_target();
            build(&workspace_root().join(dir));
            built.insert(dir.to_owned());
        }
    }
    let path = guest_target_dir()
        .join(TARGET)
        .join("release")
        .join(format!("{}.wasm", crate_name.replace('-', "_")));
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Returns the bytes of a guest module, building all guests the first time.
pub fn guest(crate_name: &str) -> Vec<u8> {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        check_target();
        let root = workspace_root();
        for dir in [
            "examples/filters/add-header",
            "examples/filters/deny-path",
            "examples/filters/identity-gate",
            "examples/filters/rate-limit",
            "examples/filters/body-redact",
            "examples/filters/api-key",
            "examples/filters/authz-callout",
            "filters/tests/guests/chaos",
            "filters/tests/guests/sdk-compat",
        ] {
            build(&root.join(dir));
        }
    });
    let path = guest_target_dir()
        .join(TARGET)
        .join("release")
        .join(format!("{}.wasm", crate_name.replace('-', "_")));
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}
