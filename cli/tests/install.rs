//! `membrane install --values FILE --dry-run` through the binary: the seed guide's values
//! print the manifests (every document a Kubernetes object, CRDs first, the chart's notes on
//! stderr); values membrane does not do, unknown keys and a missing --dry-run fail with a
//! message naming what was wrong. (What each object holds is `membrane-deploy`'s tests.)

use std::path::PathBuf;
use std::process::{Command, Output};

fn seed() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/cilium-values.yaml")
}

fn install(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_membrane"))
        .arg("install")
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run membrane")
}

fn values_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("membrane-install-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write values");
    path
}

#[test]
fn seed_values_print_the_manifests() {
    let seed = seed();
    let out = install(&[
        "--values",
        seed.to_str().expect("path"),
        "--dry-run",
        "-n",
        "net",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    let mut kinds = Vec::new();
    for doc in stdout.split("---\n").filter(|d| !d.trim().is_empty()) {
        let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(doc).expect("each document parses");
        let kind = v["kind"].as_str().expect("kind").to_owned();
        if kind != "CustomResourceDefinition"
            && kind != "ClusterRole"
            && kind != "ClusterRoleBinding"
        {
            assert_eq!(
                v["metadata"]["namespace"].as_str(),
                Some("net"),
                "{kind} in -n's namespace"
            );
        }
        kinds.push(kind);
    }
    assert_eq!(&kinds[..3], ["CustomResourceDefinition"; 3], "CRDs first");
    for want in [
        "DaemonSet",
        "Deployment",
        "ConfigMap",
        "Service",
        "ServiceMonitor",
        "ClusterRole",
    ] {
        assert!(kinds.iter().any(|k| k == want), "no {want} in {kinds:?}");
    }
    assert!(String::from_utf8_lossy(&out.stderr).contains("rollout status daemonset/membrane"));
}

#[test]
fn what_membrane_does_not_do_fails_naming_the_key() {
    let wireguard = std::fs::read_to_string(seed()).expect("seed").replace(
        "  enabled: false\n  type: wireguard",
        "  enabled: true\n  type: wireguard",
    );
    let path = values_file("wireguard.yaml", &wireguard);
    let out = install(&["-f", path.to_str().expect("path"), "--dry-run"]);
    assert!(!out.status.success());
    assert!(
        out.stdout.is_empty(),
        "nothing printed when the values are refused"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("encryption.enabled (encryption.type: wireguard)"),
        "{stderr}"
    );

    let path = values_file("unknown.yaml", "hubble:\n  relay:\n    enabeld: true\n");
    let out = install(&["-f", path.to_str().expect("path"), "--dry-run"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("hubble.relay.enabeld: unknown key"),
        "{stderr}"
    );

    let out = install(&["-f", seed().to_str().expect("path")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("use --dry-run"));
    let out = install(&["-f", "/nonexistent/values.yaml", "--dry-run"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("read values file /nonexistent/values.yaml")
    );
}
