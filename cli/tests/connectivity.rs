//! `membrane connectivity test` through the real binaries, on a topology named for this test
//! run: every scenario passes, the closing line counts them, and nothing is left behind
//! (namespaces, /etc/netns entries, pins, state, processes).

use std::process::Command;

use membrane_tests::{require_root, unique_name};

#[test]
fn connectivity_test_passes_every_scenario_and_cleans_up() {
    require_root();
    let lab = unique_name("ct");
    let out = Command::new(env!("CARGO_BIN_EXE_membrane"))
        .args(["connectivity", "test"])
        .env("MEMBRANE_LAB_NAME", &lab)
        .output()
        .expect("run membrane connectivity test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "connectivity test failed:\n{stdout}\n{stderr}"
    );
    let last = stdout.lines().last().unwrap_or_default();
    let passed: usize = last
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        last.ends_with("passed, 0 failed") && passed >= 24,
        "{stdout}"
    );
    for scenario in [
        "client-egress-dns-only",
        "client-egress-to-fqdns",
        "echo-ingress-wasm-local-reply",
        "client-egress-tls-sni",
    ] {
        assert!(
            stdout.contains(&format!("\u{2705} {scenario} (")),
            "{scenario}: {stdout}"
        );
    }
    assert_eq!(stdout.matches('\u{2705}').count(), passed, "{stdout}");
    // Built by the lab's topology builder: world hosts behind the uplink and the cluster DNS,
    // and the no-policies scenario reached a pod, a world host and a pool name by name.
    assert!(
        stdout.contains("cluster DNS on kube-system/kube-dns 10.201.0.53:53"),
        "{stdout}"
    );
    assert!(stdout.contains("world host a"), "{stdout}");
    assert!(
        stdout.contains("\u{2705} no-policies (6 checks)"),
        "{stdout}"
    );

    let name = format!("{lab}-ct");
    let left: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        !left.iter().any(|n| n.starts_with(&name)),
        "namespaces left: {left:?}"
    );
    let etc: Vec<String> = std::fs::read_dir("/etc/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&name))
                .collect()
        })
        .unwrap_or_default();
    assert!(etc.is_empty(), "/etc/netns entries left: {etc:?}");
    assert!(
        !std::path::Path::new("/sys/fs/bpf/membrane")
            .join(&name)
            .exists(),
        "pins left"
    );
    assert!(
        !std::path::Path::new("/run/membrane").join(&name).exists(),
        "state left"
    );
    let stray = processes_mentioning(&format!("/run/membrane/{name}/"));
    assert!(stray.is_empty(), "processes left: {stray:?}");
}

/// Processes whose command line mentions `needle` (a run's own names), e.g. a stray proxy.
fn processes_mentioning(needle: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .chars()
                        .all(|c| c.is_ascii_digit())
                })
                .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .filter(|c| c.contains(needle))
                .collect()
        })
        .unwrap_or_default()
}
