//! The lab end to end through the real `membrane` binary: `lab demo` builds it and shows an
//! allowed and a dropped connection, the `bpf` views read its pinned maps, `lab exec` runs
//! a real client in a pod, and `lab down` leaves nothing behind. The lab gets a unique name
//! (`MEMBRANE_LAB_NAME`), so it never touches a developer's own lab.

use std::process::{Command, Output};

use membrane_tests::{require_root, unique_name};

struct Lab {
    name: String,
}

impl Lab {
    fn membrane(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_membrane"))
            .args(args)
            .env("MEMBRANE_LAB_NAME", &self.name)
            .output()
            .expect("run membrane")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Also on a failed assertion: stop servers, remove namespaces and pins.
        let _ = self.membrane(&["lab", "down"]);
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn lab_demo_shows_allowed_and_dropped_and_down_cleans_up() {
    require_root();
    let lab = Lab {
        name: unique_name("lab"),
    };

    let demo = lab.membrane(&["lab", "demo"]);
    let out = text(&demo);
    assert!(demo.status.success(), "lab demo failed:\n{out}");
    assert!(
        out.contains("frontend -> backend:8080  FORWARDED  HTTP 200 \"hello from backend\""),
        "{out}"
    );
    assert!(out.contains("frontend -> backend:9090  DROPPED"), "{out}");
    assert!(
        out.contains("policy-verdict:L3-L4 INGRESS FORWARDED"),
        "{out}"
    );
    assert!(
        out.contains("drop INGRESS DROPPED (Policy denied)"),
        "{out}"
    );

    // Enforcement continues after the command exited: the pinned programs still run.
    let allowed = lab.membrane(&[
        "lab",
        "exec",
        "frontend",
        "--",
        "curl",
        "-s",
        "--max-time",
        "5",
        "10.200.0.20:8080",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&allowed.stdout),
        "hello from backend\n",
        "{}",
        text(&allowed)
    );
    let denied = lab.membrane(&[
        "lab",
        "exec",
        "default/frontend",
        "--",
        "curl",
        "-s",
        "--max-time",
        "1",
        "10.200.0.20:9090",
    ]);
    assert_eq!(
        denied.status.code(),
        Some(28),
        "curl timed out (dropped): {}",
        text(&denied)
    );
    let unknown = lab.membrane(&["lab", "exec", "nosuchpod", "--", "true"]);
    assert!(!unknown.status.success());
    assert!(
        text(&unknown)
            .contains("no pod default/nosuchpod; pods: default/frontend, default/backend"),
        "{}",
        text(&unknown)
    );

    let policy = lab.membrane(&["bpf", "policy", "get", "backend", "-o", "json"]);
    let rows: serde_json::Value = serde_json::from_slice(&policy.stdout).expect("json");
    let rows = rows.as_array().expect("array");
    assert!(
        rows.iter().any(|r| r["direction"] == "ingress"
            && r["ports"] == "8080"
            && r["protocol"] == "TCP"
            && r["verdict"] == "allow"),
        "{rows:?}"
    );
    let ct = text(&lab.membrane(&["bpf", "ct", "list"]));
    assert!(ct.contains("10.200.0.20:8080"), "{ct}");
    let metrics = lab.membrane(&["bpf", "metrics", "-o", "json"]);
    let metrics: serde_json::Value = serde_json::from_slice(&metrics.stdout).expect("json");
    assert!(
        metrics["counters"]
            .as_array()
            .expect("counters")
            .iter()
            .any(|c| c["reason"] == 133 && c["packets"].as_u64() >= Some(1)),
        "{metrics}"
    );

    // `up` is idempotent.
    let again = lab.membrane(&["lab", "up"]);
    assert!(
        again.status.success() && text(&again).contains("is up"),
        "{}",
        text(&again)
    );

    let down = lab.membrane(&["lab", "down"]);
    assert!(down.status.success(), "{}", text(&down));
    let names = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    assert!(
        !names.iter().any(|n| n.starts_with(&lab.name)),
        "namespaces left: {names:?}"
    );
    assert!(
        !std::path::Path::new("/sys/fs/bpf/membrane")
            .join(&lab.name)
            .exists(),
        "pins left"
    );
    assert!(
        !std::path::Path::new("/run/membrane")
            .join(&lab.name)
            .exists(),
        "state left"
    );
    assert!(text(&lab.membrane(&["lab", "down"])).contains("nothing to remove"));
}
