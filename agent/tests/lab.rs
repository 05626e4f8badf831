//! The lab end to end through the real binaries: `membrane lab demo` builds it (pods, the
//! agent, a policy) and shows an allowed and a dropped connection; the agent's CLI views and
//! the `bpf` views work; a bad policy changes nothing; enforcement survives the agent being
//! stopped and a restarted agent takes over; `lab down` leaves nothing behind. The lab gets a
//! unique name (`MEMBRANE_LAB_NAME`), so it never touches a developer's own lab.

use std::{
    process::{Command, Output},
    time::{Duration, Instant},
};

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

    fn curl(&self, port: u16, max_time: &str) -> Output {
        let url = format!("10.200.0.20:{port}");
        self.membrane(&[
            "lab",
            "exec",
            "frontend",
            "--",
            "curl",
            "-s",
            "--max-time",
            max_time,
            &url,
        ])
    }

    fn agent_pid(&self) -> i32 {
        let pids =
            std::fs::read_to_string(format!("/run/membrane/{}/pids", self.name)).expect("pids");
        pids.lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .expect("agent pid first")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Also on a failed assertion: stop processes, remove namespaces and pins.
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

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("json ({e}): {}", text(out)))
}

#[test]
fn lab_with_agent_end_to_end() {
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

    // Agent views.
    let status = json(&lab.membrane(&["status", "-o", "json"]));
    assert_eq!(status["endpoints"], 2, "{status}");
    assert_eq!(status["policies"], 1, "{status}");
    let endpoints = json(&lab.membrane(&["endpoint", "list", "-o", "json"]));
    let backend_identity = endpoints
        .as_array()
        .expect("array")
        .iter()
        .find(|e| e["name"] == "backend")
        .map(|e| e["identity"].clone())
        .expect("backend registered");
    let identities = text(&lab.membrane(&["identity", "list"]));
    assert!(identities.contains("k8s:app=backend"), "{identities}");
    assert!(
        text(&lab.membrane(&["policy", "list"]))
            .contains("CiliumNetworkPolicy default/backend-allow-frontend")
    );
    // Flows over the Hubble observer API (Hubble's compact and JSON output).
    let flows = text(&lab.membrane(&["observe", "--last", "50"]));
    assert!(flows.contains("default/frontend"), "{flows}");
    assert!(flows.contains("Policy denied DROPPED"), "{flows}");
    let dropped = lab.membrane(&[
        "observe",
        "--verdict",
        "DROPPED",
        "--to-pod",
        "default/backend",
        "-o",
        "json",
    ]);
    let line = String::from_utf8_lossy(&dropped.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    let flow: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {}", text(&dropped)));
    assert_eq!(flow["flow"]["verdict"], "DROPPED", "{flow}");
    assert_eq!(flow["flow"]["drop_reason_desc"], "POLICY_DENIED", "{flow}");
    assert_eq!(flow["flow"]["destination"]["pod_name"], "backend", "{flow}");

    // A broken policy is refused with the field named, and nothing already in force changes.
    let dir = std::env::temp_dir().join(unique_name("policy"));
    std::fs::create_dir_all(&dir).expect("tmp");
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: bad, namespace: default}\nspec:\n  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: \"80\", protocol: UDP}]\n      rules: {http: [{method: GET}]}\n",
    )
    .expect("write");
    let refused = lab.membrane(&["policy", "apply", "-f", bad.to_str().expect("utf8")]);
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("L7 rules can only apply to TCP"),
        "{}",
        text(&refused)
    );
    assert_eq!(
        json(&lab.membrane(&["status", "-o", "json"]))["policies"],
        1
    );
    let _ = std::fs::remove_dir_all(&dir);

    // Enforcement continues with the agent stopped (pinned programs and maps).
    let pid = lab.agent_pid();
    // SAFETY: kill has no memory arguments.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !lab.membrane(&["status"]).status.success(),
        "the agent is gone"
    );
    assert_eq!(
        String::from_utf8_lossy(&lab.curl(8080, "5").stdout),
        "hello from backend\n"
    );
    assert_eq!(
        lab.curl(9090, "1").status.code(),
        Some(28),
        "still dropped without the agent"
    );

    // A new agent takes over the endpoints and identities from its registry.
    let mut agent = Command::new(env!("CARGO_BIN_EXE_membrane-agent"))
        .args(["--name", &lab.name, "--node-netns", &lab.name])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start agent");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        let out = lab.membrane(&["status", "-o", "json"]);
        if out.status.success() {
            break json(&out);
        }
        assert!(
            Instant::now() < deadline,
            "restarted agent never answered: {}",
            text(&out)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status["endpoints"], 2, "{status}");
    let endpoints = json(&lab.membrane(&["endpoint", "list", "-o", "json"]));
    let restored = endpoints
        .as_array()
        .expect("array")
        .iter()
        .find(|e| e["name"] == "backend")
        .map(|e| e["identity"].clone());
    assert_eq!(
        restored,
        Some(backend_identity),
        "same identity after the restart"
    );
    // The policy applied over the API to the old agent is in force again.
    assert_eq!(status["policies"], 1, "{status}");
    assert_eq!(
        String::from_utf8_lossy(&lab.curl(8080, "5").stdout),
        "hello from backend\n"
    );
    assert_eq!(
        lab.curl(9090, "1").status.code(),
        Some(28),
        "still dropped under the new agent"
    );
    // Deleting it opens backend up, and that survives nothing: it is gone for good.
    let deleted = lab.membrane(&[
        "policy",
        "delete",
        "CiliumNetworkPolicy/default/backend-allow-frontend",
    ]);
    assert!(deleted.status.success(), "{}", text(&deleted));
    assert_eq!(
        String::from_utf8_lossy(&lab.curl(9090, "5").stdout),
        "backend admin page\n"
    );
    let _ = agent.kill();
    let _ = agent.wait();

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
    let stray = processes_mentioning(&format!("/run/membrane/{}/", lab.name));
    assert!(stray.is_empty(), "processes left: {stray:?}");
    assert!(text(&lab.membrane(&["lab", "down"])).contains("nothing to remove"));
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
