//! The lab end to end through the real binaries. `membrane lab up` builds the seed topology
//! (pods, world hosts, the cluster DNS, the agent, the four seed policies) and shows its
//! progress; `lab demo` shows allowed and dropped connections and L7 verdicts; the agent's CLI
//! views work; a bad policy changes nothing; enforcement survives the agent being stopped and a
//! restarted agent takes over; pods resolve each other and the world hosts by name; a bad
//! topology file is refused with the field named; `lab down` leaves nothing behind. Each lab
//! gets a unique name (`MEMBRANE_LAB_NAME`), so it never touches a developer's own lab.

use std::{
    path::Path,
    process::{Command, Output},
    time::{Duration, Instant},
};

use membrane_tests::{require_root, unique_name};

#[path = "../../node-proxy/tests/support/guest.rs"]
mod guest;

struct Lab {
    name: String,
}

impl Lab {
    fn new(what: &str) -> Self {
        Self {
            name: unique_name(what),
        }
    }

    fn membrane(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_membrane"))
            .args(args)
            .env("MEMBRANE_LAB_NAME", &self.name)
            .output()
            .expect("run membrane")
    }

    /// `membrane lab exec POD -- CMD...`, bounded by `timeout` so a hung command fails the test.
    fn exec(&self, pod: &str, cmd: &[&str]) -> Output {
        self.exec_for(20, pod, cmd)
    }

    /// `exec` with a longer bound, for command loops.
    fn exec_for(&self, seconds: u32, pod: &str, cmd: &[&str]) -> Output {
        let seconds = seconds.to_string();
        let mut args = vec!["lab", "exec", pod, "--", "timeout", &seconds];
        args.extend_from_slice(cmd);
        self.membrane(&args)
    }

    fn curl(&self, port: u16, max_time: &str) -> Output {
        let url = format!("10.200.0.11:{port}");
        self.exec("frontend", &["curl", "-s", "--max-time", max_time, &url])
    }

    fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(format!("/run/membrane/{}/pids", self.name))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    fn agent_pid(&self) -> i32 {
        *self.pids().first().expect("agent pid first")
    }

    /// `lab down`, then: no namespace, `/etc/netns` entry, pin, state file or process of the
    /// run is left, and a second `down` has nothing to do.
    fn down_and_check_nothing_left(&self) {
        let pids = self.pids();
        assert!(!pids.is_empty(), "the lab recorded its processes");
        let down = self.membrane(&["lab", "down"]);
        assert!(down.status.success(), "{}", text(&down));
        let left = |dir: &str| -> Vec<String> {
            std::fs::read_dir(dir)
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|n| n.starts_with(&self.name))
                        .collect()
                })
                .unwrap_or_default()
        };
        assert_eq!(left("/run/netns"), Vec::<String>::new(), "namespaces left");
        assert_eq!(left("/etc/netns"), Vec::<String>::new(), "/etc/netns left");
        assert!(
            !Path::new("/sys/fs/bpf/membrane").join(&self.name).exists(),
            "pins left"
        );
        assert!(
            !Path::new("/run/membrane").join(&self.name).exists(),
            "state left"
        );
        let alive: Vec<i32> = pids
            .into_iter()
            .filter(|p| Path::new(&format!("/proc/{p}")).exists())
            .collect();
        assert!(alive.is_empty(), "processes of the run alive: {alive:?}");
        let stray = processes_mentioning(&format!("/run/membrane/{}/", self.name));
        assert!(stray.is_empty(), "processes left: {stray:?}");
        assert!(text(&self.membrane(&["lab", "down"])).contains("nothing to remove"));
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

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("json ({e}): {}", text(out)))
}

#[test]
fn lab_with_agent_end_to_end() {
    require_root();
    let lab = Lab::new("lab");

    let up = lab.membrane(&["lab", "up", "--nodes", "1"]);
    let out = text(&up);
    assert!(up.status.success(), "lab up failed:\n{out}");
    for step in [
        "\u{2713} pod default/frontend",
        "\u{2713} pod kube-system/kube-dns     10.200.0.53",
        "\u{2713} world host github   192.0.2.10 (github.com, api.github.com), *.github.com from 198.18.0.0/16",
        "\u{2713} 5 endpoints registered",
        "\u{2713} cluster DNS on kube-system/kube-dns 10.200.0.53:53",
        "\u{2713} policy CiliumNetworkPolicy default/backend-ingress applied",
        "\u{2713} policy CiliumNetworkPolicy default/api-l7 applied",
        "\u{2713} policy CiliumNetworkPolicy default/external-egress-policy applied",
        "\u{2713} policy CiliumClusterwideNetworkPolicy default-deny-external applied",
    ] {
        assert!(out.contains(step), "missing `{step}` in:\n{out}");
    }
    let again = lab.membrane(&["lab", "up", "--nodes", "1"]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(text(&again).contains("is up"), "{}", text(&again));
    for dir in ["frontend", "kube-dns"] {
        let resolv = std::fs::read_to_string(format!("/etc/netns/{}-{dir}/resolv.conf", lab.name))
            .expect("resolv.conf");
        assert!(resolv.contains("nameserver 10.200.0.53"), "{resolv}");
    }

    let demo = lab.membrane(&["lab", "demo"]);
    let out = text(&demo);
    assert!(demo.status.success(), "lab demo failed:\n{out}");
    for line in [
        "frontend -> backend:8080 GET /                       HTTP 200 \"hello from backend\"",
        "frontend -> backend:9090 GET /                       DROPPED",
        "external-client -> backend:8080 GET /                DROPPED",
        "frontend -> api:8080 GET /api/v1/orders              HTTP 200 \"hello from api\"",
        "frontend -> api:8080 DELETE /api/v1/orders/42        HTTP 403 \"Access denied\"",
        "frontend -> world/github:443 GET /                   DROPPED",
        "policy-verdict:L3-L4 INGRESS FORWARDED",
        "-> backend:9090 (ID:257) TCP drop INGRESS DROPPED (Policy denied)",
        "-> world/github:443 (ID:2) TCP drop EGRESS DROPPED (Policy denied)",
        "policy-verdict:L3-L4 INGRESS REDIRECTED",
        "http-request DROPPED (HTTP/1.1 DELETE http://10.200.1.12:8080/api/v1/orders/42)",
    ] {
        assert!(out.contains(line), "missing `{line}` in:\n{out}");
    }

    // Agent views.
    let status = json(&lab.membrane(&["status", "-o", "json"]));
    assert_eq!(status["endpoints"], 5, "{status}");
    assert_eq!(status["policies"], 4, "{status}");
    // The seed's DNS rules reached the proxy, and `membrane status` says which revision it
    // applied (it printed `-` forever when the CLI read the number as a string).
    let dns_revision = status["dns_proxy"]["revision_applied"]
        .as_u64()
        .expect("a number");
    assert!(dns_revision > 0, "{status}");
    let status_text = text(&lab.membrane(&["status"]));
    assert!(
        status_text.contains(&format!("revision {dns_revision} applied")),
        "{status_text}"
    );
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
    assert!(identities.contains("k8s:k8s-app=kube-dns"), "{identities}");
    let policies = text(&lab.membrane(&["policy", "list"]));
    for p in [
        "CiliumNetworkPolicy default/backend-ingress",
        "CiliumNetworkPolicy default/api-l7",
        "CiliumClusterwideNetworkPolicy default-deny-external",
    ] {
        assert!(policies.contains(p), "{policies}");
    }
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
    let l7 = text(&lab.membrane(&["observe", "--type", "l7", "--pod", "default/api"]));
    assert!(l7.contains("http-response FORWARDED (HTTP/1.1 403"), "{l7}");

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
        4
    );
    let _ = std::fs::remove_dir_all(&dir);

    // A name learned through the DNS proxy before the agent stops.
    let github = lab.exec(
        "external-client",
        &["curl", "-s", "--max-time", "5", "http://api.github.com/"],
    );
    assert_eq!(stdout(&github), "hello from github", "{}", text(&github));

    // Enforcement continues with the agent stopped (pinned programs and maps).
    let pid = lab.agent_pid();
    // SAFETY: kill has no memory arguments.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !lab.membrane(&["status"]).status.success(),
        "the agent is gone"
    );
    assert_eq!(stdout(&lab.curl(8080, "5")), "hello from backend");
    assert_eq!(
        lab.curl(9090, "1").status.code(),
        Some(28),
        "still dropped without the agent"
    );

    // A new agent takes over the endpoints, identities and policies.
    // The agent is a program of its own, built beside `membrane` (same target directory).
    let agent_bin = Path::new(env!("CARGO_BIN_EXE_membrane")).with_file_name("membrane-agent");
    let mut agent = Command::new(agent_bin)
        .args(membrane_agent_api::args::AgentArgs::new(&lab.name, &lab.name).to_args())
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
    assert_eq!(status["endpoints"], 5, "{status}");
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
    assert_eq!(status["policies"], 4, "{status}");
    assert_eq!(stdout(&lab.curl(8080, "5")), "hello from backend");
    assert_eq!(
        lab.curl(9090, "1").status.code(),
        Some(28),
        "still dropped under the new agent"
    );
    // The FQDN cache survived, and the new agent took the DNS listeners over from the
    // running proxy: learning works, also through a proxy it starts itself.
    let cache = json(&lab.membrane(&["fqdn", "cache", "list", "-o", "json"]));
    assert!(
        cache
            .as_array()
            .expect("array")
            .iter()
            .any(|e| e["name"] == "api.github.com." && e["identity"].is_u64()),
        "{cache}"
    );
    let proxy_pid_file = format!("/run/membrane/{}/proxy.pid", lab.name);
    let proxy_pid = || -> i32 {
        std::fs::read_to_string(&proxy_pid_file)
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(0)
    };
    for round in ["adopted proxy", "proxy started by the new agent"] {
        let url = format!("http://after-restart-{}.github.com/", round.len());
        let fresh = lab.exec("external-client", &["curl", "-s", "--max-time", "5", &url]);
        assert_eq!(
            stdout(&fresh),
            "hello from github",
            "{round}: {}",
            text(&fresh)
        );
        let old = proxy_pid();
        // SAFETY: kill has no memory arguments.
        assert_eq!(unsafe { libc::kill(old, libc::SIGTERM) }, 0);
        let deadline = Instant::now() + Duration::from_secs(10);
        while (proxy_pid() == old || proxy_pid() == 0) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_ne!(
            proxy_pid(),
            old,
            "{round}: the new agent restarts its proxy"
        );
    }

    // Without the two policies with DNS rules (no DNS proxy in the path), pods resolve
    // through the cluster DNS directly: each other by short and full name,
    // the world hosts, and fresh names from a world host's pool, over UDP and TCP.
    for policy in [
        "CiliumClusterwideNetworkPolicy/default-deny-external",
        "CiliumNetworkPolicy/default/external-egress-policy",
    ] {
        let deleted = lab.membrane(&["policy", "delete", policy]);
        assert!(deleted.status.success(), "{}", text(&deleted));
    }
    let by_name = lab.exec(
        "frontend",
        &["curl", "-s", "--max-time", "5", "http://backend:8080/"],
    );
    assert_eq!(stdout(&by_name), "hello from backend", "{}", text(&by_name));
    let full = lab.exec(
        "frontend",
        &[
            "curl",
            "-s",
            "--max-time",
            "5",
            "http://backend.default.svc.cluster.local:9090/",
        ],
    );
    assert_eq!(
        full.status.code(),
        Some(28),
        "resolved, then dropped by backend-ingress: {}",
        text(&full)
    );
    let dig = |pod: &str, args: &[&str]| {
        let mut cmd = vec!["dig", "+tries=1", "+time=3"];
        cmd.extend_from_slice(args);
        let out = lab.exec(pod, &cmd);
        assert!(out.status.success(), "dig {args:?}: {}", text(&out));
        stdout(&out)
    };
    assert_eq!(dig("frontend", &["+short", "api.github.com"]), "192.0.2.10");
    assert_eq!(
        dig("kube-system/kube-dns", &["+short", "+tcp", "api.slack.com"]),
        "198.51.100.10"
    );
    assert_eq!(
        dig(
            "external-client",
            &["+short", "+search", "kube-dns.kube-system"]
        ),
        "10.200.0.53"
    );
    let unknown = dig("frontend", &["api.example.com"]);
    assert!(unknown.contains("status: NXDOMAIN"), "{unknown}");
    let mut pool_ips = Vec::new();
    for i in 0..3 {
        let name = format!("fresh-{i}.github.com");
        let ip = dig("external-client", &["+short", &name]);
        assert!(ip.starts_with("198.18."), "{name} -> {ip}");
        assert!(!pool_ips.contains(&ip), "{name} -> {ip} again");
        let url = format!("http://{name}/");
        let got = lab.exec(
            "external-client",
            &["curl", "-s", "--max-time", "5", "-w", " %{remote_ip}", &url],
        );
        assert_eq!(stdout(&got), format!("hello from github\n {ip}"), "{name}");
        pool_ips.push(ip);
    }
    let aws = lab.exec(
        "external-client",
        &[
            "curl",
            "-s",
            "--max-time",
            "5",
            "http://x.s3.amazonaws.com:443/",
        ],
    );
    assert_eq!(stdout(&aws), "hello from aws", "{}", text(&aws));
    let _ = agent.kill();
    let _ = agent.wait();

    // The proxy killed while the agent is away: L7-policed connections fail (never a
    // bypass); a proxy started again serves from the policy it saved, with nobody to send
    // it one.
    let api = |method: &str| {
        lab.exec(
            "frontend",
            &[
                "curl",
                "-s",
                "--max-time",
                "3",
                "-X",
                method,
                "-w",
                " %{http_code}",
                "http://10.200.1.12:8080/api/v1/orders",
            ],
        )
    };
    assert_eq!(stdout(&api("GET")), "hello from api\n 200");
    let old = proxy_pid();
    let cmdline = std::fs::read(format!("/proc/{old}/cmdline")).expect("proxy command line");
    // SAFETY: kill has no memory arguments.
    assert_eq!(unsafe { libc::kill(old, libc::SIGKILL) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{old}/cmdline")).exists()
        && std::fs::read(format!("/proc/{old}/cmdline")).is_ok_and(|c| !c.is_empty())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let without_proxy = api("GET");
    assert_ne!(
        stdout(&without_proxy),
        "hello from api\n 200",
        "no bypass without the proxy"
    );
    assert!(!without_proxy.status.success(), "{}", text(&without_proxy));
    // Its own command line, without the DNS listeners only an agent hands over.
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .filter(|a| a != "--dns-fds")
        .collect();
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _proxy = Killed(
        Command::new(&args[0])
            .args(&args[1..])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start membrane-proxy"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = api("GET");
    while stdout(&got) != "hello from api\n 200" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        got = api("GET");
    }
    assert_eq!(stdout(&got), "hello from api\n 200", "{}", text(&got));
    assert_eq!(stdout(&api("DELETE")), "Access denied\r\n 403");
    drop(_proxy);

    lab.down_and_check_nothing_left();
}

/// A topology file: a bad one is refused before anything is built, with the file and field
/// named; a good one is built as written (pods, world host and pool, cluster DNS), without
/// policies when asked, and torn down completely.
#[test]
fn lab_up_with_a_topology_file() {
    require_root();
    let lab = Lab::new("topo");
    let dir = std::env::temp_dir().join(unique_name("topology"));
    std::fs::create_dir_all(&dir).expect("tmp");

    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "podCIDR: 10.77.0.0/24\npods:\n  - {name: web, ip: 10.77.1.5}\n  - {name: web, ip: 10.77.0.6, servee: []}\n",
    )
    .expect("write");
    let refused = lab.membrane(&["lab", "up", "--topology", bad.to_str().expect("utf8")]);
    let out = text(&refused);
    assert!(!refused.status.success(), "{out}");
    assert!(
        out.contains(&format!("topology {}", bad.display())),
        "{out}"
    );
    assert!(out.contains("pods[1]") && out.contains("servee"), "{out}");
    std::fs::write(
        &bad,
        "podCIDR: 10.77.0.0/24\npods:\n  - {name: web, ip: 10.77.1.5}\n  - {name: web, ip: 10.77.0.6}\n",
    )
    .expect("write");
    let out = text(&lab.membrane(&["lab", "up", "--topology", bad.to_str().expect("utf8")]));
    assert!(
        out.contains("pods[0].ip: 10.77.1.5 is outside podCIDR 10.77.0.0/24"),
        "{out}"
    );
    assert!(
        out.contains("pods[1].name: `web` is also pods[0].name"),
        "{out}"
    );
    assert!(
        !Path::new("/run/netns").join(&lab.name).exists(),
        "nothing built"
    );

    let good = dir.join("good.yaml");
    std::fs::write(
        &good,
        r#"podCIDR: 10.77.0.0/24
dns: {ttl: 7}
pods:
  - name: web
    namespace: shop
    labels: {app: web, tier: front}
    ip: 10.77.0.5
    serve: [{port: 8000, body: shop front, paths: [/shop]}]
  - {name: dns, namespace: infra, ip: 10.77.0.53, clusterDNS: true}
world:
  - name: partner
    ip: 203.0.113.77
    names: [api.partner.example]
    pools: [{suffix: cdn.example, cidr: 198.18.64.0/20}]
    serve: [{port: 80, body: partner}]
"#,
    )
    .expect("write");
    let up = lab.membrane(&[
        "lab",
        "up",
        "--nodes",
        "1",
        "--topology",
        good.to_str().expect("utf8"),
        "--no-policies",
    ]);
    assert!(up.status.success(), "{}", text(&up));
    assert!(text(&up).contains("no policies applied"), "{}", text(&up));
    let status = json(&lab.membrane(&["status", "-o", "json"]));
    assert_eq!(status["endpoints"], 2, "{status}");
    assert_eq!(status["policies"], 0, "{status}");
    // Namespace-qualified pod names, the pod's own search path, path prefixes, the TTL.
    let get = |url: &str| {
        stdout(&lab.exec(
            "shop/web",
            &["curl", "-s", "--max-time", "5", "-w", " %{http_code}", url],
        ))
    };
    assert_eq!(get("http://web:8000/shop/cart"), "shop front\n 200");
    assert_eq!(
        get("http://web.shop.svc.cluster.local:8000/"),
        "not found\n 404"
    );
    assert_eq!(get("http://api.partner.example/"), "partner\n 200");
    assert_eq!(get("http://img.cdn.example/"), "partner\n 200");
    let answer = stdout(&lab.exec(
        "infra/dns",
        &["dig", "+noall", "+answer", "img.cdn.example"],
    ));
    let fields: Vec<&str> = answer.split_whitespace().collect();
    assert_eq!(
        fields.get(1..4),
        Some(&["7", "IN", "A"][..]),
        "ttl 7: {answer}"
    );
    let ip: std::net::Ipv4Addr = fields[4].parse().expect("an address");
    let [a, b, c, _] = ip.octets();
    assert!(
        (a, b) == (198, 18) && (64..80).contains(&c),
        "{ip} is in 198.18.64.0/20"
    );
    let wrong = lab.membrane(&["lab", "exec", "web", "--", "true"]);
    assert!(!wrong.status.success());
    assert!(
        text(&wrong).contains("no pod default/web; pods: "),
        "{}",
        text(&wrong)
    );
    let _ = std::fs::remove_dir_all(&dir);

    lab.down_and_check_nothing_left();
}

/// The seed journey's DNS part with all four policies in force (issue #6's acceptance in the
/// lab): external-client resolves only its allowed names, and reaches the IPs those answers
/// gave it (`toFQDNs`) and nothing else; every pod resolves in-cluster names.
///
/// Issue #6's journey under the four seed policies: names through the DNS proxy, `fqdn:`
/// identities plumbed before each answer is released (1000 fresh names, each connected to
/// right after its lookup), REFUSED names and closed ports.
#[test]
fn seed_policies_with_the_dns_proxy() {
    require_root();
    let lab = Lab::new("dnsp");
    let up = lab.membrane(&["lab", "up", "--nodes", "1"]);
    assert!(up.status.success(), "{}", text(&up));
    let run = |pod: &str, cmd: &[&str]| {
        let out = lab.exec(pod, cmd);
        (out.status.code(), stdout(&out))
    };
    // In-cluster names: every pod (default-deny-external's DNS rule).
    assert_eq!(
        run(
            "frontend",
            &["curl", "-s", "--max-time", "5", "http://backend:8080/"]
        ),
        (Some(0), "hello from backend".to_owned())
    );
    // external-client: allowed names resolve and their IPs open on 80 and 443.
    assert_eq!(
        run("external-client", &["dig", "+short", "api.github.com"]).1,
        "192.0.2.10"
    );
    assert_eq!(
        run(
            "external-client",
            &[
                "curl",
                "-s",
                "--max-time",
                "5",
                "http://api.github.com:443/"
            ]
        ),
        (Some(0), "hello from github".to_owned())
    );
    // A fresh name and IP each time: the first connection after the lookup succeeds, 1000
    // times out of 1000 (one shell in the pod runs them; each curl resolves through the
    // pod's resolver, then connects at once).
    let script = "ok=0; for i in $(seq 1 1000); do \
        if curl -s --max-time 5 -o /dev/null -w '%{http_code}' http://fresh$i.github.com/ | grep -q 200; \
        then ok=$((ok+1)); else echo \"failed: fresh$i.github.com\"; fi; done; echo \"$ok/1000\"";
    // Bounded at 180 s: a busy machine slows the loop, it must not fail it.
    let out = lab.exec_for(180, "external-client", &["sh", "-c", script]);
    let (code, out) = (out.status.code(), stdout(&out));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.ends_with("1000/1000"), "{out}");
    // What the agent measured: request from the DNS proxy received -> maps written.
    let status = lab.membrane(&["status", "-o", "json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status is JSON");
    let fqdn = &status["fqdn"];
    println!(
        "FQDN plumbing after 1000 fresh names: {} learns ({} without a policy change), p50 {} us, p99 {} us",
        fqdn["learns"], fqdn["fast_path"], fqdn["plumbing_us_p50"], fqdn["plumbing_us_p99"]
    );
    assert!(fqdn["learns"].as_u64().unwrap_or(0) >= 1000, "{fqdn}");
    // A port not in the policy is dropped (a timeout, not a reset from the host).
    assert_eq!(
        run(
            "external-client",
            &["curl", "-s", "--max-time", "2", "http://api.github.com:22/"]
        )
        .0,
        Some(28)
    );
    // A name not allowed is REFUSED, and its address stays closed.
    let refused = run("external-client", &["dig", "s3.amazonaws.com"]).1;
    assert!(refused.contains("status: REFUSED"), "{refused}");
    assert_eq!(
        run(
            "external-client",
            &["curl", "-s", "--max-time", "2", "http://203.0.113.10/"]
        )
        .0,
        Some(28)
    );
    // frontend may only resolve in-cluster names.
    let refused = run("frontend", &["dig", "api.github.com"]).1;
    assert!(refused.contains("status: REFUSED"), "{refused}");
    lab.down_and_check_nothing_left();
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

/// A DNS query for `name` (type A, class IN, recursion desired) with message ID `id`.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(u8::try_from(label.len()).expect("short label"));
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// Issue #6 item 5: the proxy restarts (SIGTERM; the agent starts the next one) while a pod
/// sends a steady stream of lookups through the DNS proxy, and no query is lost: the agent
/// holds the listening sockets, so queries queue while no proxy reads them, the old proxy
/// answers what it already read, and the new one answers the rest by the same rules.
#[test]
fn dns_proxy_restart_loses_no_query() {
    require_root();
    let lab = Lab::new("dnsr");
    let up = lab.membrane(&["lab", "up", "--nodes", "1"]);
    assert!(up.status.success(), "{}", text(&up));
    let pid_file = format!("/run/membrane/{}/proxy.pid", lab.name);
    let proxy_pid = || -> i32 {
        std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(0)
    };
    let old = proxy_pid();
    assert!(old > 0, "the agent started a proxy");

    let pod = membrane_datapath::Netns::open(&format!("{}-external-client", lab.name))
        .expect("external-client namespace");
    // A socket made inside the pod keeps its namespace on any thread.
    let socket = pod
        .run(|| std::net::UdpSocket::bind("0.0.0.0:0"))
        .expect("enter the pod")
        .expect("bind");
    socket.connect("10.200.0.53:53").expect("connect");
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    const TOTAL: u16 = 3000;
    let sent_at: std::sync::Arc<std::sync::Mutex<Vec<Option<Instant>>>> =
        std::sync::Arc::new(std::sync::Mutex::new(vec![None; usize::from(TOTAL)]));
    let receiver = {
        let socket = socket.try_clone().unwrap();
        let sent_at = sent_at.clone();
        std::thread::spawn(move || {
            // id -> (rcode, latency)
            let mut answers = std::collections::BTreeMap::new();
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut buf = [0u8; 1500];
            while answers.len() < usize::from(TOTAL) && Instant::now() < deadline {
                let Ok(n) = socket.recv(&mut buf) else {
                    continue;
                };
                if n < 4 {
                    continue;
                }
                let id = u16::from_be_bytes([buf[0], buf[1]]);
                let sent = sent_at.lock().unwrap()[usize::from(id)];
                let latency = sent.map(|s| s.elapsed()).unwrap_or_default();
                answers.entry(id).or_insert((buf[3] & 0x0f, latency));
            }
            answers
        })
    };
    let started = Instant::now();
    let mut restarted_at = None;
    for id in 0..TOTAL {
        if id == TOTAL / 3 {
            // SAFETY: signalling a process of this run by pid.
            assert_eq!(unsafe { libc::kill(old, libc::SIGTERM) }, 0);
            restarted_at = Some(Instant::now());
        }
        sent_at.lock().unwrap()[usize::from(id)] = Some(Instant::now());
        socket.send(&dns_query(id, "api.github.com")).expect("send");
        std::thread::sleep(Duration::from_micros(500));
    }
    let answers = receiver.join().unwrap();
    let lost: Vec<u16> = (0..TOTAL).filter(|id| !answers.contains_key(id)).collect();
    let not_noerror = answers.values().filter(|(rcode, _)| *rcode != 0).count();
    let worst = answers.values().map(|(_, l)| *l).max().unwrap_or_default();
    let new = proxy_pid();
    println!(
        "{TOTAL} queries in {:?} across a proxy restart (pid {old} -> {new}, SIGTERM at {:?}): {} answered, {} lost, {not_noerror} not NOERROR, slowest answer {worst:?}",
        started.elapsed(),
        restarted_at.map(|t| t - started),
        answers.len(),
        lost.len()
    );
    assert!(new > 0 && new != old, "the agent started a new proxy");
    assert!(lost.is_empty(), "lost queries: {lost:?}");
    assert_eq!(not_noerror, 0, "every answer is the allowed name's");
    lab.down_and_check_nothing_left();
}

/// Issue #7 on the node: a `WasmFilter` (the upstream-SDK acceptance guest) on `shop/web`'s
/// ingress calls out to an authorization server in the lab pod `infra/authz` through its
/// `spec.upstreams` — from the request headers phase and from the request body phase — and
/// answers `/peek` with the peer properties the proxy filled from the agent's snapshot. The
/// callouts carry the proxy's mark: `authz`'s ingress has L7 rules for every peer, yet no
/// callout is redirected to the proxy (no L7 flow towards `authz`) while a pod's own request
/// to it is. The callouts' outcomes are in `web`'s L7 flows (`x-membrane-filter`).
#[test]
fn wasm_filter_callouts_and_peer_properties_on_the_node() {
    require_root();
    let module = guest::guest_module();
    let sha256 = membrane_agent_api::wasm_resource::module_sha256(&module).expect("sha256");
    let lab = Lab::new("wasmn");
    let dir = std::env::temp_dir().join(unique_name("wasm-node"));
    std::fs::create_dir_all(&dir).expect("tmp");
    let topology = dir.join("topology.yaml");
    std::fs::write(
        &topology,
        r#"podCIDR: 10.78.0.0/24
pods:
  - {name: client, namespace: default, labels: {app: client}, ip: 10.78.0.10}
  - name: web
    namespace: shop
    labels: {app: web}
    ip: 10.78.0.20
    serve: [{port: 8080, body: hello from web}]
  - name: authz
    namespace: infra
    labels: {app: authz}
    ip: 10.78.0.30
    serve: [{port: 9001, body: alice, paths: ["/check?token=good"]}]
"#,
    )
    .expect("write topology");
    let up = lab.membrane(&[
        "lab",
        "up",
        "--nodes",
        "1",
        "--topology",
        topology.to_str().expect("utf8"),
        "--no-policies",
    ]);
    assert!(up.status.success(), "{}", text(&up));

    let policies = dir.join("wasm.yaml");
    std::fs::write(
        &policies,
        format!(
            r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: web-l7, namespace: shop}}
spec:
  endpointSelector: {{matchLabels: {{app: web}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{"k8s:io.kubernetes.pod.namespace": default, app: client}}}}]
    toPorts:
    - ports: [{{port: "8080", protocol: TCP}}]
      rules: {{http: [{{}}]}}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: authz-l7, namespace: infra}}
spec:
  endpointSelector: {{matchLabels: {{app: authz}}}}
  ingress:
  - fromEntities: [all]
    toPorts:
    - ports: [{{port: "9001", protocol: TCP}}]
      rules: {{http: [{{}}]}}
---
apiVersion: membrane.io/v1alpha1
kind: WasmFilter
metadata: {{name: gate, namespace: shop}}
spec:
  endpointSelector: {{matchLabels: {{app: web}}}}
  direction: Ingress
  ports: [8080]
  module: {module}
  sha256: {sha256}
  config: on the node
  upstreams:
  - {{name: authz, address: "10.78.0.30:9001"}}
"#,
            module = module.display()
        ),
    )
    .expect("write policies");
    let applied = lab.membrane(&["policy", "apply", "-f", policies.to_str().expect("utf8")]);
    assert!(applied.status.success(), "{}", text(&applied));
    // `policy apply` waits (bounded) for the proxy; on a loaded machine compiling the module
    // can take longer, so wait until the proxy says it applied the filters.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = json(&lab.membrane(&["status", "-o", "json"]));
        let filters = &status["filters"];
        if filters["revision"] == filters["revision_applied"] && filters["attachments"] != 0 {
            break;
        }
        assert!(Instant::now() < deadline, "filters never applied: {status}");
        std::thread::sleep(Duration::from_millis(200));
    }

    let curl = |args: &[&str]| {
        let mut cmd = vec!["curl", "-s", "--max-time", "5", "-w", " %{http_code}"];
        cmd.extend_from_slice(args);
        stdout(&lab.exec("client", &cmd))
    };
    let web = "http://10.78.0.20:8080";
    // Request headers phase: the callout's answer decides.
    assert_eq!(
        curl(&["-H", "x-token: good", &format!("{web}/auth/orders")]),
        "hello from web\n 200"
    );
    assert_eq!(
        curl(&["-H", "x-token: bad", &format!("{web}/auth/orders")]),
        "denied by authz\n 403"
    );
    // Request body phase: the whole body is the token.
    assert_eq!(
        curl(&["--data", "good", &format!("{web}/body-auth")]),
        "hello from web\n 200"
    );
    assert_eq!(
        curl(&["--data", "bad", &format!("{web}/body-auth")]),
        "denied by authz\n 403"
    );

    // Properties: identities from the ipcache, labels/namespace/pod from the agent (the
    // identity's labels, as Cilium derives them from the pod's).
    let endpoints = json(&lab.membrane(&["endpoint", "list", "-o", "json"]));
    let identity_of = |name: &str| {
        endpoints
            .as_array()
            .expect("array")
            .iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["identity"].as_u64())
            .unwrap_or_else(|| panic!("{name} registered: {endpoints}"))
    };
    let peek = curl(&[&format!("{web}/peek")]);
    let want = format!(
        "source.identity={}\nsource.labels=app=client,io.cilium.k8s.policy.cluster=default,\
         io.kubernetes.pod.namespace=default\nsource.namespace=default\nsource.workload=client\n\
         destination.identity={}\ndestination.labels=app=web,io.cilium.k8s.policy.cluster=default,\
         io.kubernetes.pod.namespace=shop\n\
         destination.namespace=shop\ndestination.workload=web\n 200",
        identity_of("client"),
        identity_of("web"),
    );
    assert_eq!(peek, want);

    // The callouts' outcomes in web's flows.
    let flows = text(&lab.membrane(&[
        "observe", "--type", "l7", "--pod", "shop/web", "--last", "100", "-o", "json",
    ]));
    for outcome in [
        "WasmFilter shop/gate request_headers: callout authz 200",
        "WasmFilter shop/gate request_headers: callout authz 404",
        "WasmFilter shop/gate request_body: callout authz 200",
        "WasmFilter shop/gate request_body: callout authz 404",
    ] {
        assert!(flows.contains(outcome), "missing `{outcome}` in:\n{flows}");
    }
    // The callouts were never redirected to the proxy (marked from the proxy as the host)...
    let to_authz = |what: &str| {
        text(&lab.membrane(&[
            "observe",
            "--type",
            "l7",
            "--to-pod",
            "infra/authz",
            "--last",
            "100",
        ]))
        .lines()
        .filter(|l| l.contains(what))
        .count()
    };
    assert_eq!(to_authz("http-request"), 0, "callouts bypass the redirect");
    // ...while a pod's own request to the same port is.
    assert_eq!(
        curl(&["http://10.78.0.30:9001/check?token=good"]),
        "alice\n 200"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while to_authz("http-request") == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        to_authz("http-request") > 0,
        "the pod's request is redirected"
    );

    let _ = std::fs::remove_dir_all(&dir);
    lab.down_and_check_nothing_left();
}

/// Pins and run directories of every node of the lab (node 1 has the lab's own name).
fn node_dirs_left(name: &str) -> Vec<String> {
    ["/sys/fs/bpf/membrane", "/run/membrane"]
        .iter()
        .flat_map(|dir| {
            std::fs::read_dir(dir)
                .map(|d| {
                    d.flatten()
                        .map(|e| e.path().display().to_string())
                        .filter(|p| p.contains(&format!("/{name}")))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        })
        .collect()
}

/// The seed guide's demo across two nodes over the VXLAN tunnel: frontend, backend and
/// kube-dns on node1, api and external-client on node2; one etcd, two agents and proxies.
#[test]
fn two_node_lab_over_the_tunnel_runs_the_demo_across_nodes() {
    require_root();
    let lab = Lab::new("lab2t");
    let up = lab.membrane(&["lab", "up", "--nodes", "2", "--routing", "tunnel"]);
    let out = text(&up);
    assert!(up.status.success(), "lab up failed:\n{out}");
    for step in [
        "\u{2713} node node2 namespace",
        "routing tunnel",
        "\u{2713} etcd at http://127.0.0.1:",
        "10.200.1.12   netns",
        " on node2",
        "(cluster-wide, on etcd)",
        "\u{2713} policy CiliumNetworkPolicy default/api-l7 applied",
    ] {
        assert!(out.contains(step), "missing `{step}` in:\n{out}");
    }

    let demo = lab.membrane(&["lab", "demo"]);
    let out = text(&demo);
    assert!(demo.status.success(), "lab demo failed:\n{out}");
    for line in [
        "frontend -> backend:8080 GET /                       HTTP 200 \"hello from backend\"",
        "external-client -> backend:8080 GET /                DROPPED",
        "frontend -> api:8080 GET /api/v1/orders              HTTP 200 \"hello from api\"",
        "frontend -> api:8080 DELETE /api/v1/orders/42        HTTP 403 \"Access denied\"",
        "http-request DROPPED (HTTP/1.1 DELETE http://10.200.1.12:8080/api/v1/orders/42)",
    ] {
        assert!(out.contains(line), "missing `{line}` in:\n{out}");
    }
    // external-client (node2) -> backend (node1) is dropped at backend's node, which knows
    // the sender from the identity the tunnel carried.
    let ext = json(&lab.membrane(&["endpoint", "list", "--node", "node2", "-o", "json"]));
    let ext_identity = ext
        .as_array()
        .expect("array")
        .iter()
        .find(|e| e["name"] == "external-client")
        .map(|e| e["identity"].as_u64().expect("identity"))
        .expect("external-client on node2");
    let node1_hubble = format!("/run/membrane/{}/hubble.sock", lab.name);
    let drops = lab.membrane(&[
        "observe",
        "--socket",
        &node1_hubble,
        "--verdict",
        "DROPPED",
        "--to-pod",
        "default/backend",
        "-o",
        "json",
    ]);
    let drops = text(&drops);
    assert!(
        drops.contains(&format!("\"identity\":{ext_identity}"))
            && drops.contains("app=external-client"),
        "node1's drop names the sender's identity {ext_identity} and labels:\n{drops}"
    );

    // The cluster in the agents' views.
    let status = json(&lab.membrane(&["status", "--node", "node2", "-o", "json"]));
    assert_eq!(status["endpoints"], 2, "{status}");
    let nodes = status["cluster"]["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 2, "{status}");
    assert_eq!(status["cluster"]["store"]["connected"], true, "{status}");
    let ipcache = json(&lab.membrane(&["bpf", "ipcache", "list", "--node", "node1", "-o", "json"]));
    let api = ipcache
        .as_array()
        .expect("array")
        .iter()
        .find(|e| e["prefix"] == "10.200.1.12/32")
        .unwrap_or_else(|| panic!("api in node1's ipcache: {ipcache}"));
    assert_eq!(api["tunnel_endpoint"], "10.199.0.12", "{ipcache}");

    let down = lab.membrane(&["lab", "down"]);
    assert!(down.status.success(), "{}", text(&down));
    assert_eq!(node_dirs_left(&lab.name), Vec::<String>::new());
}

/// Two nodes routed natively: the receiving node takes the sender's identity from its
/// ipcache (the cluster store's), so the same policies hold across nodes.
#[test]
fn two_node_lab_with_native_routing_enforces_across_nodes() {
    require_root();
    let lab = Lab::new("lab2n");
    let up = lab.membrane(&["lab", "up", "--nodes", "2", "--routing", "native"]);
    assert!(up.status.success(), "lab up failed:\n{}", text(&up));
    let curl = |pod: &str, url: &str, max: &str| {
        stdout(&lab.exec(pod, &["curl", "-s", "--max-time", max, url]))
    };
    // frontend (node1) -> api (node2): L7 allowed by api's node's proxy.
    assert_eq!(
        curl("frontend", "http://10.200.1.12:8080/api/v1/orders", "10"),
        "hello from api"
    );
    // external-client (node2) -> backend (node1): dropped by backend's ingress policy.
    let dropped = lab.exec(
        "external-client",
        &["curl", "-s", "--max-time", "2", "http://10.200.0.11:8080/"],
    );
    assert!(!dropped.status.success(), "{}", text(&dropped));
    // Routes to the other node's pod CIDR via its underlay address, no tunnel device.
    let routes = Command::new("ip")
        .args(["-n", &lab.name, "route", "show", "10.200.1.0/24"])
        .output()
        .expect("ip route");
    assert!(
        text(&routes).contains("via 10.199.0.12"),
        "{}",
        text(&routes)
    );
    let down = lab.membrane(&["lab", "down"]);
    assert!(down.status.success(), "{}", text(&down));
    assert_eq!(node_dirs_left(&lab.name), Vec::<String>::new());
}
