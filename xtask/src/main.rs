//! `cargo xtask`: build orchestration for membrane.
//!
//! - `bootstrap`: install what the build needs, idempotently (each step checks first and
//!   skips what is present). A failing step says which one and how to do it by hand.
//! - `test`: bootstrap, then format check, clippy (host crates, then the bpf crate in its own
//!   pass), the whole test suite (nextest, or cargo test when nextest is absent), and a check
//!   that the suite left no namespaces or bpffs mounts behind.
//! - `lab [ARGS...]`: bootstrap, build, and run `membrane lab demo ARGS...`.
//!
//! The eBPF crate is excluded from host-side `--workspace` runs: it only builds for
//! `bpfel-unknown-none` (its own clippy pass uses that target).
//!
//! This crate has no dependencies on purpose (see Cargo.toml) and must not grow any on the
//! rest of the workspace.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

type Result<T = ()> = std::result::Result<T, String>;

const APT_PACKAGES: &[&str] = &[
    // bpf-linker links against Debian's LLVM 22.
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    // Endpoint plumbing (`ip netns`, veth) and the lab's and tests' real clients.
    "iproute2",
    "curl",
    "iputils-ping",
    // `dig`, the real DNS client of the DNS proxy tests.
    "dnsutils",
    // TLS servers and clients of the serverNames (SNI) tests.
    "openssl",
    // Headless browser that renders the agent's flow page in `agent/tests/ui.rs`.
    "chromium",
    // The cluster store: `membrane-cluster`'s tests start their own etcd 3.4 processes.
    "etcd-server",
    // `protoc` for etcd-client's build script (etcd's gRPC protos).
    "protobuf-compiler",
    // The CNI plugin's test runs pods under a real runtime: containerd 1.6 with its CRI
    // plugin and runc, the `loopback` CNI plugin CRI also calls, and a static C compiler for
    // the pause image the test builds (nothing is pulled).
    "containerd",
    "runc",
    "containernetworking-plugins",
    "gcc",
    "libc6-dev",
];
const BPF_LINKER_VERSION: &str = "0.13.0";

fn main() -> ExitCode {
    let mut args = env::args().skip(1);
    let cmd = args.next().unwrap_or_default();
    let rest: Vec<String> = args.collect();
    let result = match cmd.as_str() {
        "bootstrap" => bootstrap(),
        "test" => test(),
        "lab" => lab(&rest),
        "deps" => check_dependency_rules(&workspace_root()),
        "" | "-h" | "--help" | "help" => {
            print_help();
            Ok(())
        }
        other => Err(format!("unknown xtask `{other}`; see `cargo xtask --help`")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask {cmd}: {message}");
            ExitCode::FAILURE
        }
    }
}

fn print_help() {
    println!(
        "cargo xtask <command>\n\n\
         commands:\n  \
         bootstrap      install the toolchain pieces the build needs (idempotent)\n  \
         test           bootstrap, fmt check, clippy, the whole test suite, leftover check\n  \
         lab [ARGS...]  bootstrap, build, run `membrane lab demo ARGS...` (the lab stays up)\n  \
         deps           check the crate dependency rules of ARCHITECTURE.md (part of `test`)"
    );
}

fn workspace_root() -> PathBuf {
    // xtask lives at <root>/xtask.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> String {
    env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Runs a command with inherited stdio; Err names it.
fn run(cmd: &mut Command) -> Result {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .map_err(|e| format!("could not start {shown}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{shown} failed ({status})"))
    }
}

/// Runs a command quietly and returns its stdout if it succeeded.
fn probe(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn step(name: &str, manual: &str, f: impl FnOnce() -> Result<bool>) -> Result {
    match f() {
        Ok(true) => {
            println!("bootstrap: {name}: installed");
            Ok(())
        }
        Ok(false) => {
            println!("bootstrap: {name}: present");
            Ok(())
        }
        Err(e) => Err(format!(
            "bootstrap step `{name}` failed: {e}\n  to do it by hand: {manual}"
        )),
    }
}

fn bootstrap() -> Result {
    // SAFETY-free check of root: `id -u`.
    let uid = probe("id", &["-u"]).unwrap_or_default();
    if uid.trim() != "0" {
        return Err(
            "run as root: the build installs Debian packages and the tests create network namespaces and load eBPF programs"
                .into(),
        );
    }

    step(
        "Debian packages",
        &format!(
            "apt-get update && apt-get install -y {}",
            APT_PACKAGES.join(" ")
        ),
        || {
            let missing: Vec<&str> = APT_PACKAGES
                .iter()
                .copied()
                .filter(|p| {
                    probe("dpkg-query", &["-W", "-f=${Status}", p])
                        .is_none_or(|s| !s.contains("install ok installed"))
                })
                .collect();
            if missing.is_empty() {
                return Ok(false);
            }
            println!("bootstrap: installing {}", missing.join(" "));
            run(Command::new("apt-get").args(["update", "-qq"]))?;
            run(Command::new("apt-get")
                .args(["install", "-y", "-qq"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"))?;
            Ok(true)
        },
    )?;

    step(
        "nightly toolchain",
        "rustup toolchain install nightly --profile minimal",
        || {
            let list = probe("rustup", &["toolchain", "list"]).ok_or("rustup not found")?;
            if list.lines().any(|l| l.starts_with("nightly")) {
                return Ok(false);
            }
            run(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
            ]))?;
            Ok(true)
        },
    )?;

    for (component, manual) in [
        (
            "rust-src",
            "rustup component add rust-src --toolchain nightly",
        ),
        ("clippy", "rustup component add clippy --toolchain nightly"),
    ] {
        step(&format!("nightly {component}"), manual, || {
            let installed = probe(
                "rustup",
                &["component", "list", "--toolchain", "nightly", "--installed"],
            )
            .ok_or("rustup component list failed")?;
            if installed.lines().any(|l| l.starts_with(component)) {
                return Ok(false);
            }
            run(Command::new("rustup").args([
                "component",
                "add",
                component,
                "--toolchain",
                "nightly",
            ]))?;
            Ok(true)
        })?;
    }

    for (component, manual) in [
        ("clippy", "rustup component add clippy"),
        ("rustfmt", "rustup component add rustfmt"),
    ] {
        step(&format!("stable {component}"), manual, || {
            let installed = probe("rustup", &["component", "list", "--installed"])
                .ok_or("rustup component list failed")?;
            if installed.lines().any(|l| l.starts_with(component)) {
                return Ok(false);
            }
            run(Command::new("rustup").args(["component", "add", component]))?;
            Ok(true)
        })?;
    }

    step(
        "wasm32-wasip1 target",
        "rustup target add wasm32-wasip1",
        || {
            let installed = probe("rustup", &["target", "list", "--installed"])
                .ok_or("rustup target list failed")?;
            if installed.lines().any(|l| l.trim() == "wasm32-wasip1") {
                return Ok(false);
            }
            run(Command::new("rustup").args(["target", "add", "wasm32-wasip1"]))?;
            Ok(true)
        },
    )?;

    step(
        "bpf-linker",
        &format!(
            "LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --version {BPF_LINKER_VERSION} --no-default-features --features llvm-22"
        ),
        || {
            if probe("bpf-linker", &["--version"]).is_some() {
                return Ok(false);
            }
            run(Command::new(cargo())
                .args([
                    "install",
                    "bpf-linker",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ])
                .env("LLVM_PREFIX", "/usr/lib/llvm-22"))?;
            Ok(true)
        },
    )?;
    Ok(())
}

fn has_nextest() -> bool {
    probe(&cargo(), &["nextest", "--version"]).is_some()
}

const NETNS_DIR: &str = "/run/netns";
const TEST_BPFFS_DIR: &str = "/run/membrane-tests";
const TEST_PREFIX: &str = "mbt-";

/// Namespaces and bpffs mount points the test harness created and did not remove.
fn test_leftovers() -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(NETNS_DIR) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(TEST_PREFIX) {
                out.push(format!("netns {name}"));
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(TEST_BPFFS_DIR) {
        for e in entries.flatten() {
            out.push(format!("bpffs mount {}", e.path().display()));
        }
    }
    // Labs that tests bring up under their own names.
    for dir in ["/sys/fs/bpf/membrane", "/run/membrane"] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(TEST_PREFIX) {
                    out.push(format!("lab state {}", e.path().display()));
                }
            }
        }
    }
    out
}

fn test() -> Result {
    bootstrap()?;
    let root = workspace_root();
    let before = test_leftovers();
    if !before.is_empty() {
        println!(
            "note: leftovers of an earlier run (the harness sweeps those of dead processes): {before:?}"
        );
    }

    println!("== cargo fmt --check");
    run(Command::new(cargo())
        .current_dir(&root)
        .args(["fmt", "--all", "--check"]))?;

    println!("== crate dependency rules (ARCHITECTURE.md)");
    check_dependency_rules(&root)?;

    println!("== cargo clippy (host crates)");
    run(Command::new(cargo()).current_dir(&root).args([
        "clippy",
        "--workspace",
        "--exclude",
        "membrane-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;

    println!("== cargo clippy (bpf crate, nightly, bpfel-unknown-none)");
    run(Command::new("rustup")
        .current_dir(&root)
        .args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "--package",
            "membrane-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ])
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER"))?;

    // The lab and end-to-end tests run the programs (`membrane`, `membrane-agent`,
    // `membrane-proxy`), which live in different packages: cargo builds a package's binaries
    // only for its own integration tests, so build them all first (same profile).
    println!("== cargo build --workspace --bins");
    run(Command::new(cargo()).current_dir(&root).args([
        "build",
        "--workspace",
        "--exclude",
        "membrane-ebpf",
        "--bins",
    ]))?;

    println!("== test suite");
    let suite = if has_nextest() {
        run(Command::new(cargo()).current_dir(&root).args([
            "nextest",
            "run",
            "--workspace",
            "--exclude",
            "membrane-ebpf",
            "--no-fail-fast",
        ]))
    } else {
        println!("(cargo-nextest not found; using cargo test)");
        run(Command::new(cargo()).current_dir(&root).args([
            "test",
            "--workspace",
            "--exclude",
            "membrane-ebpf",
            "--no-fail-fast",
        ]))
    };

    let after: Vec<String> = test_leftovers()
        .into_iter()
        .filter(|l| !before.contains(l))
        .collect();
    suite?;
    if !after.is_empty() {
        return Err(format!("the suite left these behind: {after:?}"));
    }
    println!("== no namespaces or bpffs mounts left behind");
    Ok(())
}

/// ARCHITECTURE.md's dependency rules: (package, packages it must not depend on, normal or
/// build). A violation fails the test command.
const DEPENDENCY_RULES: &[(&str, &[&str])] = &[
    (
        "membrane-agent",
        &[
            "wasmtime",
            "membrane-filters",
            "membrane-lab",
            "membrane-cli",
            "membrane-node-proxy",
        ],
    ),
    ("membrane-cli", &["membrane-agent"]),
    (
        "membrane-agent-api",
        &[
            "aya",
            "wasmtime",
            "tokio",
            "membrane-datapath",
            "membrane-l7proxy",
        ],
    ),
    ("membrane-node-proxy", &["membrane-lab", "membrane-cli"]),
    (
        "membrane-cni",
        &[
            "aya",
            "tokio",
            "wasmtime",
            "membrane-agent",
            "membrane-datapath",
        ],
    ),
    (
        "membrane-lab",
        &["membrane-agent", "membrane-cli", "wasmtime"],
    ),
    (
        "membrane-l7proxy",
        &["membrane-datapath", "wasmtime", "aya"],
    ),
    ("membrane-datapath", &["membrane-l7proxy"]),
    ("membrane-policy", &["aya", "tokio", "wasmtime"]),
    (
        "membrane-cluster",
        &["aya", "wasmtime", "membrane-agent", "membrane-datapath"],
    ),
    (
        "membrane-deploy",
        &["aya", "wasmtime", "tokio", "kube", "membrane-agent"],
    ),
];

/// Packages allowed to depend on `membrane-lab`.
const LAB_DEPENDENTS: &[&str] = &["membrane-cli"];

fn check_dependency_rules(root: &Path) -> Result {
    let tree = |package: &str| -> std::result::Result<Vec<String>, String> {
        let out = Command::new(cargo())
            .current_dir(root)
            .args([
                "tree",
                "--quiet",
                "--package",
                package,
                "--edges",
                "normal,build",
                "--prefix",
                "none",
                "--format",
                "{p}",
            ])
            .output()
            .map_err(|e| format!("cargo tree: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "cargo tree -p {package}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect())
    };
    let mut violations = Vec::new();
    for (package, forbidden) in DEPENDENCY_RULES {
        let deps = tree(package)?;
        for f in *forbidden {
            if deps.iter().skip(1).any(|d| d == f) {
                violations.push(format!("{package} depends on {f}"));
            }
        }
    }
    // Who depends on the lab: `cargo tree --invert` over the workspace.
    let out = Command::new(cargo())
        .current_dir(root)
        .args([
            "tree",
            "--quiet",
            "--workspace",
            "--invert",
            "membrane-lab",
            "--edges",
            "normal,build",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .output()
        .map_err(|e| format!("cargo tree: {e}"))?;
    for dependent in String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|p| *p != "membrane-lab")
        .collect::<std::collections::BTreeSet<_>>()
    {
        if !LAB_DEPENDENTS.contains(&dependent) {
            violations.push(format!(
                "{dependent} depends on membrane-lab (only the CLI may)"
            ));
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "crate dependency rules broken (ARCHITECTURE.md, \"Crates\"): {}",
            violations.join("; ")
        ))
    }
}

fn lab(args: &[String]) -> Result {
    bootstrap()?;
    let root = workspace_root();
    // The lab's programs: the CLI, the agent it starts, the proxy the agent starts.
    run(Command::new(cargo()).current_dir(&root).args([
        "build",
        "--quiet",
        "--package",
        "membrane-cli",
        "--package",
        "membrane-agent",
        "--package",
        "membrane-node-proxy",
        "--bins",
    ]))?;
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let bin = target_dir.join("debug").join("membrane");
    run(Command::new(bin).arg("lab").arg("demo").args(args))
}
