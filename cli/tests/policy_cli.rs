//! `membrane policy validate|resolve|trace` as a user runs them: the real binary on the
//! example policies (`examples/policies`) and on broken policies written to a per-test
//! temporary directory. Asserts exit codes, the exact one-line problem format and the
//! `Final verdict:` line. Needs no privileges.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const POLICIES: [&str; 4] = [
    "backend-ingress.yaml",
    "api-l7.yaml",
    "external-egress-policy.yaml",
    "default-deny-external.yaml",
];

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/policies")
}

fn example_policies() -> Vec<PathBuf> {
    POLICIES.iter().map(|f| examples().join(f)).collect()
}

fn membrane(args: &[&str], extra: &[PathBuf]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_membrane"))
        .args(args)
        .args(extra)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run membrane")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A directory unique to one test, removed when the test ends (also on failure).
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> TempDir {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("policy_cli-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).expect("write temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn display(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn validate_accepts_the_examples() {
    let o = membrane(&["policy", "validate"], &example_policies());
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert_eq!(stdout(&o), "", "no problem lines");
    assert!(
        stderr(&o).contains("4 file(s) valid, 4 policies"),
        "{}",
        stderr(&o)
    );
}

const BROKEN: &str = r#"# three documents: broken, valid, broken
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: api-broken
spec:
  endpointSelector:
    matchLabels:
      app: api
  ingress:
    - toPorts:
        - ports:
            - port: "8080"
              protocol: TCP
          rules:
            http:
              - method: GET
                path: "/api/v1/.*"
              - method: POST
                path: "/api/(v1"
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: fine
  namespace: shop
spec:
  endpointSelector: {}
  ingress:
    - fromEntities: [cluster]
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata:
  name: cluster-typo
spec:
  endpointSelector: {}
  egress:
    - toEntitiez: [world]
"#;

const SYNTAX: &str =
    "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: [oops\nspec: {}\n";

#[test]
fn validate_reports_every_problem_on_one_line() {
    let dir = TempDir::new("validate");
    let broken = dir.write("broken.yaml", BROKEN);
    let syntax = dir.write("syntax.yaml", SYNTAX);
    let mut files = vec![broken.clone()];
    files.extend(example_policies());
    files.push(syntax.clone());
    let o = membrane(&["policy", "validate"], &files);
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "one line per problem:\n{out}");
    assert_eq!(
        lines[0],
        format!(
            "{}: CiliumNetworkPolicy/default/api-broken: spec.ingress[0].toPorts[0].rules.http[1].path: invalid path regex \"/api/(v1\": unclosed group",
            display(&broken)
        )
    );
    assert!(
        lines[1].starts_with(&format!(
            "{}: CiliumClusterwideNetworkPolicy//cluster-typo: spec.egress[0].toEntitiez: unknown field (expected one of: ",
            display(&broken)
        )),
        "{}",
        lines[1]
    );
    assert!(
        lines[2].starts_with(&format!(
            "{}: line 5 column 5: invalid YAML: ",
            display(&syntax)
        )),
        "{}",
        lines[2]
    );
    assert!(
        stderr(&o).contains("3 problem(s) in 2 of 6 file(s)"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn validate_flags_unreadable_files_and_duplicates() {
    let dir = TempDir::new("duplicates");
    let copy = dir.write(
        "copy.yaml",
        &std::fs::read_to_string(examples().join("api-l7.yaml")).expect("read example"),
    );
    let missing = dir.0.join("missing.yaml");
    let o = membrane(
        &["policy", "validate"],
        &[
            examples().join("api-l7.yaml"),
            copy.clone(),
            missing.clone(),
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].starts_with(&format!(
            "{}: CiliumNetworkPolicy/default/api-l7: metadata.name: defined twice (first in ",
            display(&copy)
        )),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].starts_with(&format!("{}: cannot read: ", display(&missing))),
        "{}",
        lines[1]
    );
}

fn resolve_json() -> Value {
    let endpoints = examples().join("endpoints.yaml");
    let o = membrane(
        &[
            "policy",
            "resolve",
            "-o",
            "json",
            "--endpoints",
            &display(&endpoints),
        ],
        &example_policies(),
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).expect("resolve -o json prints one JSON document")
}

fn endpoint<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["endpoints"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["name"] == name))
        .unwrap_or_else(|| panic!("endpoint {name} in {doc}"))
}

fn identity_of(doc: &Value, name: &str) -> u64 {
    endpoint(doc, name)["identity"].as_u64().expect("identity")
}

#[test]
fn resolve_json_has_entries_and_l7_rules() {
    let doc = resolve_json();
    // deterministic identities, in endpoints.yaml order
    let ids: Vec<u64> = ["frontend", "backend", "api", "external-client", "kube-dns"]
        .iter()
        .map(|n| identity_of(&doc, n))
        .collect();
    assert_eq!(ids, [256, 257, 258, 259, 260]);

    let api = endpoint(&doc, "api");
    assert_eq!(api["enforcement"]["ingress"], true);
    let entries = api["entries"].as_array().expect("entries");
    let redirect = entries
        .iter()
        .find(|e| e["direction"] == "Ingress" && e["remote_identity"] == 256)
        .expect("frontend entry");
    assert_eq!(redirect["protocol"], "TCP");
    assert_eq!(redirect["port"], "8080");
    assert_eq!(redirect["verdict"], "redirect:15001");
    assert_eq!(redirect["precedence"], 254);
    assert_eq!(
        redirect["rule"],
        "CiliumNetworkPolicy default/api-l7 spec ingress[0]"
    );
    assert!(
        redirect["remote_labels"]
            .as_array()
            .expect("labels")
            .contains(&Value::from("k8s:app=frontend"))
    );
    let l7 = api["l7"].as_array().expect("l7");
    let http = l7
        .iter()
        .find(|s| s["parser"] == "Http")
        .expect("HTTP rule set");
    assert_eq!(http["port"], 8080);
    assert_eq!(
        http["rules"][0]["rules"]["Http"][1]["path"],
        "/api/v1/orders"
    );

    // external-client may reach the fqdn identities on 443/TCP, world not at all
    let client = endpoint(&doc, "external-client");
    let fqdn_443: Vec<&Value> = client["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["port"] == "443" && e["verdict"] == "allow")
        .collect();
    assert_eq!(
        fqdn_443.len(),
        3,
        "api.github.com, api.slack.com, *.github.com"
    );
    assert!(
        fqdn_443
            .iter()
            .all(|e| e["remote"].as_str().is_some_and(|r| r.starts_with("fqdn:")))
    );
    assert!(
        client["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .all(|e| e["remote_identity"] != 2),
        "no entry for world"
    );
}

#[test]
fn resolve_table_lists_endpoints() {
    let endpoints = examples().join("endpoints.yaml");
    let o = membrane(
        &["policy", "resolve", "--endpoints", &display(&endpoints)],
        &example_policies(),
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    for want in [
        "Endpoint default/backend (endpoint 2, identity 257, 10.200.0.11)",
        "Endpoint kube-system/kube-dns (endpoint 5, identity 260, 10.200.0.53)",
        "enforcement: ingress default deny, egress default deny",
        "ingress TCP/8080 -> HTTP proxy port 15001",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
    let backend_rule = out
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|w| w.starts_with(&["ingress", "256", "default/frontend", "TCP", "8080"]))
        .expect("backend's entry for frontend");
    assert_eq!(backend_rule[5], "allow");
}

/// Runs a trace and returns (stdout, last line).
fn trace(args: &[&str]) -> (String, String) {
    let mut full = vec!["policy", "trace", "--policy"];
    let files: Vec<String> = example_policies().iter().map(|p| display(p)).collect();
    full.extend(files.iter().map(String::as_str));
    full.extend(args);
    let o = membrane(&full, &[]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    let last = out.lines().last().unwrap_or_default().to_owned();
    (out, last)
}

const ALLOWED: &str = "Final verdict: ALLOWED";
const DENIED: &str = "Final verdict: DENIED";

#[test]
fn trace_l3_l4() {
    let (out, last) = trace(&[
        "--src-labels",
        "app=frontend",
        "--dst-labels",
        "app=backend",
        "--dport",
        "8080/TCP",
    ]);
    assert_eq!(last, ALLOWED, "{out}");
    assert!(out.contains("CiliumNetworkPolicy default/backend-ingress spec ingress[0]"));
    assert!(out.contains("Egress verdict: ALLOWED") && out.contains("Ingress verdict: ALLOWED"));

    let (out, last) = trace(&[
        "--src-labels",
        "app=frontend",
        "--dst-labels",
        "app=backend",
        "--dport",
        "9090/TCP",
    ]);
    assert_eq!(last, DENIED, "{out}");
    assert!(
        out.contains("no entry matches: dropped by default deny"),
        "{out}"
    );
}

#[test]
fn trace_http_rules() {
    let base = [
        "--src-labels",
        "app=frontend",
        "--dst-labels",
        "app=api",
        "--dport",
        "8080/TCP",
        "--http-path",
        "/api/v1/x",
        "--http-method",
    ];
    let (out, last) = trace(&[&base[..], &["GET"]].concat());
    assert_eq!(last, ALLOWED, "{out}");
    assert!(out.contains("method=GET path=/api/v1/.*: match"), "{out}");
    let (out, last) = trace(&[&base[..], &["DELETE"]].concat());
    assert_eq!(last, DENIED, "{out}");
    assert!(
        out.contains("DELETE /api/v1/x -> denied (403 Access denied)"),
        "{out}"
    );
}

#[test]
fn trace_external_egress() {
    let client = ["--src-labels", "app=external-client"];
    let dns = [
        "--dst-labels",
        "k8s-app=kube-dns",
        "--dst-namespace",
        "kube-system",
        "--dport",
        "53/UDP",
        "--direction",
        "egress",
        "--dns-name",
    ];
    let (out, last) = trace(&[&client[..], &dns[..], &["api.github.com"]].concat());
    assert_eq!(last, ALLOWED, "{out}");
    let (out, last) = trace(&[&client[..], &dns[..], &["example.com"]].concat());
    assert_eq!(last, DENIED, "{out}");
    assert!(
        out.contains("query example.com -> refused (REFUSED)"),
        "{out}"
    );

    let https = |dst: &[&str]| trace(&[&client[..], dst, &["--dport", "443/TCP"]].concat());
    let (out, last) = https(&["--dst-fqdn", "api.github.com"]);
    assert_eq!(last, ALLOWED, "{out}");
    assert!(out.contains("fqdn:api.github.com"), "{out}");
    let (out, last) = https(&["--dst-fqdn", "example.com"]);
    assert_eq!(last, DENIED, "{out}");
    let (out, last) = https(&["--dst-labels", "reserved:world"]);
    assert_eq!(last, DENIED, "{out}");
    // any other pod: world denied, the cluster allowed
    let (out, last) = trace(&[
        "--src-labels",
        "app=backend",
        "--dst-cidr",
        "192.0.2.10",
        "--dport",
        "443/TCP",
    ]);
    assert_eq!(last, DENIED, "{out}");
    let (out, last) = trace(&[
        "--src-labels",
        "app=backend",
        "--dst-labels",
        "app=external-client",
        "--dport",
        "5432/TCP",
    ]);
    assert_eq!(last, ALLOWED, "{out}");
}

#[test]
fn bad_input_is_an_error_that_names_it() {
    let files: Vec<String> = example_policies().iter().map(|p| display(p)).collect();
    let mut args = vec!["policy", "trace", "--policy"];
    args.extend(files.iter().map(String::as_str));
    args.extend([
        "--src-labels",
        "app=frontend",
        "--dst-labels",
        "app=backend",
        "--dport",
        "8080/QUIC",
    ]);
    let o = membrane(&args, &[]);
    assert_eq!(o.status.code(), Some(2), "usage error");
    assert!(
        stderr(&o).contains("unknown protocol \"QUIC\""),
        "{}",
        stderr(&o)
    );

    let dir = TempDir::new("bad-endpoints");
    let eps = dir.write(
        "endpoints.yaml",
        "endpoints:\n  - name: a\n    lables: {app: a}\n",
    );
    let o = membrane(
        &["policy", "resolve", "--endpoints", &display(&eps)],
        &example_policies(),
    );
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains(&format!("{}: invalid endpoints file: ", display(&eps)))
            && err.contains("unknown field `lables`"),
        "{err}"
    );
}

/// `serverNames`: `resolve` shows a TLS rule set on the HTTP proxy port, `trace --tls-sni`
/// evaluates it like the proxy (allowed names, a reset for the others).
#[test]
fn server_names_resolve_and_trace() {
    let dir = TempDir::new("server-names");
    let policy = dir.write(
        "tls.yaml",
        "\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: frontend-tls, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: frontend}}
  egress:
  - toEntities: [world]
    toPorts:
    - ports: [{port: '443', protocol: TCP}]
      serverNames: [api.example.com, '*.cdn.example.com']
",
    );
    let endpoints = examples().join("endpoints.yaml");
    let o = membrane(
        &["policy", "resolve", "--endpoints", &display(&endpoints)],
        std::slice::from_ref(&policy),
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    for want in [
        "egress TCP/443 -> TLS proxy port 15001",
        "server name api.example.com, *.cdn.example.com",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }

    let trace = |sni: &str| {
        let policy = display(&policy);
        let o = membrane(
            &[
                "policy",
                "trace",
                "--policy",
                &policy,
                "--src-labels",
                "app=frontend",
                "--dst-cidr",
                "192.0.2.10",
                "--dport",
                "443/TCP",
                "--direction",
                "egress",
                "--tls-sni",
                sni,
            ],
            &[],
        );
        assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
        let out = stdout(&o);
        let last = out.lines().last().unwrap_or_default().to_owned();
        (out, last)
    };
    let (out, last) = trace("API.example.com");
    assert_eq!(last, ALLOWED, "{out}");
    let (out, last) = trace("img.cdn.example.com");
    assert_eq!(last, ALLOWED, "{out}");
    let (out, last) = trace("evil.example.com");
    assert_eq!(last, DENIED, "{out}");
    assert!(
        out.contains("TLS server name evil.example.com -> denied (connection reset)"),
        "{out}"
    );
}

/// `membrane filter check`: the example filter the binary embeds loads (ABI 0.2.1, every
/// import provided, its sha256 printed); a file that is not Wasm is an error naming it.
#[test]
fn filter_check_reports_abi_imports_and_sha256() {
    let dir = std::env::temp_dir().join(format!("mb-filter-check-{}", std::process::id()));
    let (module, sha256) = membrane_lab::install_deny_path(&dir).expect("write the module");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_membrane"))
        .args(["filter", "check"])
        .arg(&module)
        .output()
        .expect("run membrane");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("ABI:      proxy-wasm 0.2.1"), "{text}");
    assert!(text.contains(&format!("sha256:   {sha256}")), "{text}");
    assert!(
        text.contains("env::proxy_send_local_response  implemented"),
        "{text}"
    );
    assert!(text.contains("contexts: http"), "{text}");
    assert!(
        !text.contains("provided"),
        "never `provided` for anything: {text}"
    );
    assert!(!text.contains("MISSING"), "{text}");
    assert!(text.ends_with("loads: yes\n"), "{text}");
    let json = std::process::Command::new(env!("CARGO_BIN_EXE_membrane"))
        .args(["filter", "check", "-o", "json"])
        .arg(&module)
        .output()
        .expect("run membrane");
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON");
    assert_eq!(v["loadable"], true);
    assert_eq!(v["abi"], "0.2.1");
    assert_eq!(v["refusal"], serde_json::Value::Null);
    assert!(
        v["contexts"]
            .as_array()
            .is_some_and(|c| c.iter().any(|x| x == "http")),
        "{v}"
    );

    let bogus = dir.join("not.wasm");
    std::fs::write(&bogus, b"not wasm").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_membrane"))
        .args(["filter", "check"])
        .arg(&bogus)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run membrane");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("not.wasm"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
