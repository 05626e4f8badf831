//! `membrane connectivity test`: scenarios in the spirit of `cilium connectivity test`, each a
//! policy (or none) plus expected verdicts, checked with real traffic (`curl`, `ping`) between
//! pods, world hosts and the node, and with the flows the datapath reported for that traffic.
//!
//! It builds a topology of its own with the lab's builder ([`crate::topology::build`]): a node
//! namespace `NAME-ct`, pods `client`, `client2`, `echo` and `kube-system/kube-dns` (the lab's
//! cluster DNS), world hosts `a` and `b` in 198.51.100.0/24 behind the node's uplink (with DNS
//! names and pools under `example.com` / `example.org`), and an HTTP server on the node. It runs
//! `membrane-agent` for it, applies each scenario's policies through the agent's API, and tears
//! everything down at the end. Prints ✅ or ❌ per scenario, then `N passed, N failed`.
//!
//! A check targets an address or a DNS name: a name is resolved inside the client pod (through
//! its resolv.conf, i.e. the cluster DNS, and the DNS proxy once policies redirect DNS), then
//! the resolved address is connected to (the `to-fqdns` scenario: the address must be open
//! right after the lookup). A DNS check runs `dig` in the pod and expects a status (NOERROR,
//! REFUSED) from the DNS proxy, plus the datapath's redirect of the query. The Wasm scenario
//! (`echo-ingress-wasm-local-reply`) attaches an example filter with a `WasmFilter`; Wasm
//! callouts and peer properties on the node are covered by `agent/tests/lab.rs`.

use std::{
    net::Ipv4Addr,
    process::Command,
    time::{Duration, Instant},
};

use membrane_agent_api::{Client, RunDir, api::FlowRow};

use crate::{
    lab::{self, LabError},
    topology::{self, Topology},
};

/// The connectivity test's topology; the constants below must match it (a unit test checks).
const TOPOLOGY: &str = r#"
podCIDR: 10.201.0.0/24
pods:
  - {name: client, labels: {app: client}, ip: 10.201.0.10}
  - {name: client2, labels: {app: client2}, ip: 10.201.0.11}
  - name: echo
    labels: {app: echo}
    ip: 10.201.0.20
    serve: [{port: 8080, body: echo}, {port: 8081, body: echo}, {port: 8082, body: echo}]
  - name: kube-dns
    namespace: kube-system
    labels: {k8s-app: kube-dns}
    ip: 10.201.0.53
    clusterDNS: true
world:
  - name: a
    ip: 198.51.100.10
    names: [a.example.com]
    pools: [{suffix: example.com, cidr: 198.18.0.0/16}]
    serve: [{port: 80, body: world-a}]
  - name: b
    ip: 198.51.100.20
    names: [b.example.org]
    pools: [{suffix: example.org, cidr: 198.19.0.0/16}]
    serve: [{port: 80, body: world-b}]
node:
  serve: [{port: 8090, body: node}]
"#;

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 10);
const ECHO: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 20);
const WORLD_A: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const WORLD_B: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
/// The node, as pods see it (their gateway).
const HOST: Ipv4Addr = membrane_datapath::plumbing::POD_GATEWAY;
const HOST_PORT: u16 = 8090;
const KUBE_DNS: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 53);
/// DNS to kube-dns through the DNS proxy with these `rules.dns` (YAML flow list), plus the
/// cluster's own names (the resolver's search path expands short names first).
fn dns_egress(rules: &str) -> String {
    format!(
        "  - toEndpoints:\n    - matchLabels: {{k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}}\n    toPorts:\n    - ports: [{{port: \"53\", protocol: ANY}}]\n      rules:\n        dns: [{rules}, {{matchPattern: \"**.cluster.local\"}}]\n"
    )
}

/// What a check expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Allowed,
    /// Answered with this HTTP status (through the L7 proxy: 200 allowed, 403 denied).
    Status(u16),
    /// Dropped by the datapath with this Cilium drop reason description.
    Dropped(&'static str),
    /// A DNS lookup answered with this status (`NOERROR`, `REFUSED`) through the DNS proxy.
    Rcode(&'static str),
    /// Redirected to the proxy, which reset the connection (a TLS server name not allowed).
    Reset,
}

const DENIED: Expect = Expect::Dropped("Policy denied");
const DENYLIST: Expect = Expect::Dropped("Policy denied by denylist");

#[derive(Clone, Copy, Debug)]
enum Probe {
    Http {
        port: u16,
    },
    /// An HTTP request with a method, a path and optionally one header.
    Request {
        port: u16,
        method: &'static str,
        path: &'static str,
        header: Option<&'static str>,
        /// Text the response body must contain (who answered).
        body: Option<&'static str>,
    },
    Ping,
    /// `dig NAME` in the pod (its resolv.conf: the cluster DNS), UDP.
    Dns {
        name: &'static str,
    },
    /// `curl https://SNI:port/` to the target's address (TLS with that server name; the
    /// self-signed certificate is not checked).
    Tls {
        port: u16,
        sni: &'static str,
    },
}

/// Where a check goes.
#[derive(Clone, Copy, Debug)]
enum Target {
    Ip(Ipv4Addr),
    /// A DNS name, resolved inside the client pod first (`getent ahostsv4`, i.e. its
    /// resolv.conf and the cluster DNS); the check then connects to the address it got.
    Name(&'static str),
}

#[derive(Clone, Copy, Debug)]
struct Check {
    from: &'static str,
    to: Target,
    probe: Probe,
    expect: Expect,
}

const fn http(from: &'static str, to: Ipv4Addr, port: u16, expect: Expect) -> Check {
    Check {
        from,
        to: Target::Ip(to),
        probe: Probe::Http { port },
        expect,
    }
}

/// HTTP to a name: resolved in the pod, then connected to.
const fn http_name(from: &'static str, name: &'static str, port: u16, expect: Expect) -> Check {
    Check {
        from,
        to: Target::Name(name),
        probe: Probe::Http { port },
        expect,
    }
}

const fn request(
    from: &'static str,
    to: Ipv4Addr,
    method: &'static str,
    path: &'static str,
    header: Option<&'static str>,
    status: u16,
) -> Check {
    Check {
        from,
        to: Target::Ip(to),
        probe: Probe::Request {
            port: 8080,
            method,
            path,
            header,
            body: None,
        },
        expect: Expect::Status(status),
    }
}

/// [`request`] whose response body must contain `body`.
const fn request_body(
    from: &'static str,
    to: Ipv4Addr,
    method: &'static str,
    path: &'static str,
    status: u16,
    body: &'static str,
) -> Check {
    Check {
        from,
        to: Target::Ip(to),
        probe: Probe::Request {
            port: 8080,
            method,
            path,
            header: None,
            body: Some(body),
        },
        expect: Expect::Status(status),
    }
}

/// TLS from `from` to echo's TLS server with server name `sni`.
const fn tls(from: &'static str, sni: &'static str, expect: Expect) -> Check {
    Check {
        from,
        to: Target::Ip(ECHO),
        probe: Probe::Tls {
            port: TLS_PORT,
            sni,
        },
        expect,
    }
}

/// A lookup of `name` in pod `from`, answered `rcode` (through the DNS proxy).
const fn dns(from: &'static str, name: &'static str, rcode: &'static str) -> Check {
    Check {
        from,
        to: Target::Ip(KUBE_DNS),
        probe: Probe::Dns { name },
        expect: Expect::Rcode(rcode),
    }
}

const fn ping(from: &'static str, to: Ipv4Addr, expect: Expect) -> Check {
    Check {
        from,
        to: Target::Ip(to),
        probe: Probe::Ping,
        expect,
    }
}

struct Scenario {
    name: &'static str,
    policy: &'static str,
    checks: Vec<Check>,
}

fn cnp(name: &str, selector: &str, body: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  endpointSelector:\n    matchLabels:\n      app: {selector}\n{body}"
    )
}

fn scenarios() -> Vec<Scenario> {
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    vec![
        Scenario {
            name: "no-policies",
            policy: "",
            checks: vec![
                http("client", ECHO, 8080, Expect::Allowed),
                http("client", WORLD_A, 80, Expect::Allowed),
                ping("client", ECHO, Expect::Allowed),
                // Names through the cluster DNS: a pod by its short name (search path), a
                // world host, and a pool name the world host answers on.
                http_name("client", "echo", 8080, Expect::Allowed),
                http_name("client", "a.example.com", 80, Expect::Allowed),
                http_name("client", "fresh-name.example.org", 80, Expect::Allowed),
            ],
        },
        Scenario {
            name: "client-egress-allow-echo",
            policy: leak(cnp(
                "client-egress",
                "client",
                "  egress:\n  - toEndpoints:\n    - matchLabels: {app: echo}\n    toPorts:\n    - ports: [{port: \"8080\", protocol: TCP}]\n",
            )),
            checks: vec![
                http("client", ECHO, 8080, Expect::Allowed),
                http("client", ECHO, 8081, DENIED),
                http("client", WORLD_A, 80, DENIED),
                http("client2", WORLD_A, 80, Expect::Allowed),
            ],
        },
        Scenario {
            name: "client-egress-deny-echo",
            policy: leak(cnp(
                "client-egress-deny",
                "client",
                "  egress:\n  - toEntities: [all]\n  egressDeny:\n  - toEndpoints:\n    - matchLabels: {app: echo}\n",
            )),
            checks: vec![
                http("client", ECHO, 8080, DENYLIST),
                http("client", WORLD_A, 80, Expect::Allowed),
                http("client2", ECHO, 8080, Expect::Allowed),
            ],
        },
        Scenario {
            name: "echo-ingress-allow-client",
            policy: leak(cnp(
                "echo-ingress",
                "echo",
                "  ingress:\n  - fromEndpoints:\n    - matchLabels: {app: client}\n    toPorts:\n    - ports: [{port: \"8080\", protocol: TCP}]\n",
            )),
            checks: vec![
                http("client", ECHO, 8080, Expect::Allowed),
                http("client2", ECHO, 8080, DENIED),
                http("client", ECHO, 8081, DENIED),
            ],
        },
        Scenario {
            name: "echo-ingress-deny-client",
            policy: leak(cnp(
                "echo-ingress-deny",
                "echo",
                "  ingress:\n  - fromEntities: [all]\n  ingressDeny:\n  - fromEndpoints:\n    - matchLabels: {app: client}\n",
            )),
            checks: vec![
                http("client", ECHO, 8080, DENYLIST),
                http("client2", ECHO, 8080, Expect::Allowed),
            ],
        },
        Scenario {
            name: "all-ingress-deny",
            policy: "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata:\n  name: all-ingress-deny\nspec:\n  endpointSelector: {}\n  ingress:\n  - {}\n",
            checks: vec![
                http("client", ECHO, 8080, DENIED),
                http("client", WORLD_A, 80, Expect::Allowed),
            ],
        },
        Scenario {
            name: "all-egress-deny",
            policy: "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata:\n  name: all-egress-deny\nspec:\n  endpointSelector: {}\n  egress:\n  - {}\n",
            checks: vec![
                http("client", ECHO, 8080, DENIED),
                http("client", WORLD_A, 80, DENIED),
            ],
        },
        Scenario {
            name: "client-egress-to-cidr",
            policy: leak(cnp(
                "client-egress-cidr",
                "client",
                "  egress:\n  - toCIDR: [198.51.100.10/32]\n    toPorts:\n    - ports: [{port: \"80\", protocol: TCP}]\n",
            )),
            checks: vec![
                http("client", WORLD_A, 80, Expect::Allowed),
                http("client", WORLD_B, 80, DENIED),
            ],
        },
        Scenario {
            name: "client-egress-to-cidr-except",
            policy: leak(cnp(
                "client-egress-cidr-except",
                "client",
                "  egress:\n  - toCIDRSet:\n    - cidr: 198.51.100.0/24\n      except: [198.51.100.20/32]\n",
            )),
            checks: vec![
                http("client", WORLD_A, 80, Expect::Allowed),
                http("client", WORLD_B, 80, DENIED),
            ],
        },
        Scenario {
            name: "client-egress-to-entities-world",
            policy: leak(cnp(
                "client-egress-world",
                "client",
                "  egress:\n  - toEntities: [world]\n",
            )),
            checks: vec![
                http("client", WORLD_A, 80, Expect::Allowed),
                http("client", ECHO, 8080, DENIED),
            ],
        },
        Scenario {
            name: "client-egress-to-entities-cluster",
            policy: leak(cnp(
                "client-egress-cluster",
                "client",
                "  egress:\n  - toEntities: [cluster]\n",
            )),
            checks: vec![
                http("client", ECHO, 8080, Expect::Allowed),
                http("client", WORLD_A, 80, DENIED),
            ],
        },
        Scenario {
            name: "client-egress-to-entities-host",
            policy: leak(cnp(
                "client-egress-host",
                "client",
                "  egress:\n  - toEntities: [host]\n",
            )),
            checks: vec![
                http("client", HOST, HOST_PORT, Expect::Allowed),
                http("client", ECHO, 8080, DENIED),
            ],
        },
        Scenario {
            name: "client-egress-port-range",
            policy: leak(cnp(
                "client-egress-range",
                "client",
                "  egress:\n  - toEndpoints:\n    - matchLabels: {app: echo}\n    toPorts:\n    - ports: [{port: \"8080\", endPort: 8081, protocol: TCP}]\n",
            )),
            checks: vec![
                http("client", ECHO, 8080, Expect::Allowed),
                http("client", ECHO, 8081, Expect::Allowed),
                http("client", ECHO, 8082, DENIED),
            ],
        },
        Scenario {
            name: "client-egress-icmp",
            policy: leak(cnp(
                "client-egress-icmp",
                "client",
                "  egress:\n  - toEndpoints:\n    - matchLabels: {app: echo}\n    icmps:\n    - fields: [{type: 8, family: IPv4}]\n",
            )),
            checks: vec![
                ping("client", ECHO, Expect::Allowed),
                http("client", ECHO, 8080, DENIED),
                ping("client", WORLD_A, DENIED),
            ],
        },
        Scenario {
            name: "deny-beats-allow",
            policy: leak(cnp(
                "deny-beats-allow",
                "client",
                "  egress:\n  - toEndpoints:\n    - matchLabels: {app: echo}\n  egressDeny:\n  - toPorts:\n    - ports: [{port: \"8080\", protocol: TCP}]\n",
            )),
            checks: vec![
                http("client", ECHO, 8080, DENYLIST),
                http("client", ECHO, 8081, Expect::Allowed),
            ],
        },
        Scenario {
            name: "clusterwide-default-deny-external",
            policy: "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata:\n  name: default-deny-external\nspec:\n  endpointSelector: {}\n  egress:\n  - toEntities: [cluster]\n",
            checks: vec![
                http("client", WORLD_A, 80, DENIED),
                http("client2", WORLD_B, 80, DENIED),
                http("client", ECHO, 8080, Expect::Allowed),
            ],
        },
        Scenario {
            name: "client-egress-l7-http-method",
            policy: leak(cnp(
                "client-egress-l7-method",
                "client",
                "  egress:\n  - toEndpoints:\n    - matchLabels: {app: echo}\n    toPorts:\n    - ports: [{port: \"8080\", protocol: TCP}]\n      rules:\n        http: [{method: GET}]\n",
            )),
            checks: vec![
                request("client", ECHO, "GET", "/", None, 200),
                request("client", ECHO, "POST", "/", None, 403),
                http("client", ECHO, 8081, DENIED),
            ],
        },
        Scenario {
            name: "client-egress-l7-http-path",
            policy: leak(cnp(
                "client-egress-l7-path",
                "client",
                "  egress:\n  - toEndpoints:\n    - matchLabels: {app: echo}\n    toPorts:\n    - ports: [{port: \"8080\", protocol: TCP}]\n      rules:\n        http: [{method: GET, path: \"/public/.*\"}]\n",
            )),
            checks: vec![
                request("client", ECHO, "GET", "/public/index.html", None, 200),
                request("client", ECHO, "GET", "/private", None, 403),
            ],
        },
        Scenario {
            name: "client-egress-l7-http-header",
            policy: leak(cnp(
                "client-egress-l7-header",
                "client",
                "  egress:\n  - toEndpoints:\n    - matchLabels: {app: echo}\n    toPorts:\n    - ports: [{port: \"8080\", protocol: TCP}]\n      rules:\n        http: [{headers: [\"X-Token: s3cret\"]}]\n",
            )),
            checks: vec![
                request("client", ECHO, "GET", "/", Some("X-Token: s3cret"), 200),
                request("client", ECHO, "GET", "/", Some("X-Token: wrong"), 403),
                request("client", ECHO, "GET", "/", None, 403),
            ],
        },
        Scenario {
            name: "echo-ingress-l7-http",
            policy: leak(cnp(
                "echo-ingress-l7",
                "echo",
                "  ingress:\n  - fromEndpoints:\n    - matchLabels: {app: client}\n    toPorts:\n    - ports: [{port: \"8080\", protocol: TCP}]\n      rules:\n        http: [{method: GET, path: \"/\"}]\n",
            )),
            checks: vec![
                request("client", ECHO, "GET", "/", None, 200),
                request("client", ECHO, "DELETE", "/", None, 403),
                http("client2", ECHO, 8080, DENIED),
            ],
        },
        Scenario {
            // A Wasm filter on echo's ingress answers /admin itself (deny-path, an example
            // filter); the HTTP policy allows every request, so only the filter can say 403.
            name: "echo-ingress-wasm-local-reply",
            policy: leak(format!(
                "{}---\napiVersion: membrane.io/v1alpha1\nkind: WasmFilter\nmetadata:\n  name: echo-deny-admin\n  namespace: default\nspec:\n  endpointSelector:\n    matchLabels: {{app: echo}}\n  direction: Ingress\n  ports: [8080]\n  module: {{MODULE}}\n  sha256: {{SHA256}}\n  config: \"/admin\"\n",
                cnp(
                    "echo-ingress-l7-any",
                    "echo",
                    "  ingress:\n  - fromEndpoints:\n    - matchLabels: {app: client}\n    toPorts:\n    - ports: [{port: \"8080\", protocol: TCP}]\n      rules:\n        http: [{}]\n",
                )
            )),
            checks: vec![
                request_body("client", ECHO, "GET", "/", 200, "echo"),
                request_body(
                    "client",
                    ECHO,
                    "GET",
                    "/admin/users",
                    403,
                    "Access to /admin/users is denied by policy",
                ),
                request_body(
                    "client",
                    ECHO,
                    "POST",
                    "/admin",
                    403,
                    "Access to /admin is denied by policy",
                ),
            ],
        },
        Scenario {
            // TLS to echo:8443 only with the server name api.example.com (checked on the
            // ClientHello, not terminated); other names are reset by the proxy.
            name: "client-egress-tls-sni",
            policy: leak(cnp(
                "client-tls-sni",
                "client",
                "  egress:\n  - toEndpoints:\n    - matchLabels: {app: echo}\n    toPorts:\n    - ports: [{port: \"8443\", protocol: TCP}]\n      serverNames: [api.example.com]\n",
            )),
            checks: vec![
                tls("client", "api.example.com", Expect::Allowed),
                tls("client", "other.example.com", Expect::Reset),
                http("client", ECHO, 8080, DENIED),
            ],
        },
        Scenario {
            // DNS allowed (every name, through the proxy), nothing else.
            name: "client-egress-dns-only",
            policy: leak(cnp(
                "client-dns-only",
                "client",
                &format!("  egress:\n{}", dns_egress("{matchPattern: \"*\"}")),
            )),
            checks: vec![
                dns("client", "a.example.com", "NOERROR"),
                http_name("client", "a.example.com", 80, DENIED),
                http("client", ECHO, 8080, DENIED),
            ],
        },
        Scenario {
            // Names under example.com resolve and their addresses open on 80; others are
            // REFUSED and stay closed.
            name: "client-egress-to-fqdns",
            policy: leak(cnp(
                "client-to-fqdns",
                "client",
                &format!(
                    "  egress:\n{}  - toFQDNs:\n    - matchPattern: \"*.example.com\"\n    toPorts:\n    - ports: [{{port: \"80\", protocol: TCP}}]\n",
                    dns_egress("{matchPattern: \"*.example.com\"}")
                ),
            )),
            checks: vec![
                http_name("client", "a.example.com", 80, Expect::Allowed),
                // A name (and address) never seen before: open right after the lookup.
                http_name("client", "fresh-fqdn.example.com", 80, Expect::Allowed),
                dns("client", "b.example.org", "REFUSED"),
                http("client", WORLD_B, 80, DENIED),
                // The learned address, on a port the policy does not name.
                http_name("client", "a.example.com", 81, DENIED),
            ],
        },
    ]
}

/// Topology and agent of one run.
struct Run {
    name: String,
    socket: std::path::PathBuf,
    names: Vec<(Ipv4Addr, String)>,
    /// The example filter's module (written into the run's state) and its sha256, for the
    /// `{MODULE}` and `{SHA256}` of the Wasm scenario.
    module: (std::path::PathBuf, String),
}

fn topology() -> Topology {
    // Compiled in and checked by a unit test; failing here is a build defect.
    Topology::parse(TOPOLOGY, "connectivity topology")
        .unwrap_or_else(|e| unreachable!("the connectivity topology is valid: {e}"))
}

fn build(name: &str) -> Result<Run, LabError> {
    let topology = topology();
    let built = topology::build(
        name,
        &topology,
        topology::Shape::SINGLE,
        None,
        &mut |line| println!("  \u{2713} {line}"),
    )?;
    let mut names = topology.names();
    names.push((HOST, "host".to_owned()));
    let module =
        crate::install_deny_path(&RunDir::new(name).path().join("filters")).map_err(|e| {
            LabError::Step {
                step: "install the example filter".into(),
                detail: e.to_string(),
            }
        })?;
    start_tls_server(name)?;
    println!("  \u{2713} TLS server (openssl s_server, self-signed) on echo:{TLS_PORT}");
    Ok(Run {
        name: name.to_owned(),
        socket: built.socket,
        names,
        module,
    })
}

impl Run {
    fn flows_seen(&self) -> u64 {
        Client::new(&self.socket)
            .status()
            .map(|s| s.flows.seen)
            .unwrap_or(0)
    }

    fn recent_flows(&self, since: u64) -> Vec<FlowRow> {
        let new = self.flows_seen().saturating_sub(since);
        Client::new(&self.socket)
            .flows(usize::try_from(new).unwrap_or(usize::MAX))
            .unwrap_or_default()
    }

    /// Runs one check; `Err` says what differed from the expectation.
    fn check(&self, c: &Check) -> Result<(), String> {
        let from_ip = self
            .names
            .iter()
            .find(|(_, n)| n == c.from)
            .map(|(ip, _)| *ip)
            .unwrap_or(CLIENT);
        let to = match c.to {
            Target::Ip(ip) => ip,
            Target::Name(name) => self.resolve(c.from, name)?,
        };
        let before = self.flows_seen();
        let (connected, what, dport) = match c.probe {
            Probe::Http { port } => {
                let max_time = if c.expect == Expect::Allowed {
                    "5"
                } else {
                    "1"
                };
                let out = Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &topology::pod_netns(&self.name, c.from),
                        "curl",
                        "-s",
                        "-o",
                        "/dev/null",
                        "--max-time",
                        max_time,
                    ])
                    .arg(format!("http://{to}:{port}/"))
                    .output()
                    .map_err(|e| format!("run curl: {e}"))?;
                (
                    out.status.success(),
                    format!("{} -> {}:{port}/TCP", c.from, self.target_name(c.to, to)),
                    port,
                )
            }
            Probe::Request {
                port,
                method,
                path,
                header,
                body,
            } => {
                let mut cmd = Command::new("ip");
                cmd.args([
                    "netns",
                    "exec",
                    &topology::pod_netns(&self.name, c.from),
                    "curl",
                    "-s",
                ])
                .args(["-w", "\n%{http_code}", "--max-time", "5", "-X", method]);
                if let Some(h) = header {
                    cmd.args(["-H", h]);
                }
                let out = cmd
                    .arg(format!("http://{to}:{port}{path}"))
                    .output()
                    .map_err(|e| format!("run curl: {e}"))?;
                let text = String::from_utf8_lossy(&out.stdout);
                let (answer, code) = text.rsplit_once('\n').unwrap_or(("", &text));
                let code: u16 = code.trim().parse().unwrap_or(0);
                let what = format!(
                    "{} -> {}:{port} {method} {path}{}",
                    c.from,
                    self.target_name(c.to, to),
                    header.map(|h| format!(" [{h}]")).unwrap_or_default()
                );
                if Expect::Status(code) != c.expect {
                    return Err(format!("{what}: expected {:?}, got HTTP {code}", c.expect));
                }
                if let Some(body) = body
                    && !answer.contains(body)
                {
                    return Err(format!(
                        "{what}: HTTP {code} without {body:?} in the body: {answer:?}"
                    ));
                }
                (true, what, port)
            }
            Probe::Dns { name } => {
                let out = Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &topology::pod_netns(&self.name, c.from),
                        "dig",
                        "+time=2",
                        "+tries=1",
                        name,
                    ])
                    .output()
                    .map_err(|e| format!("run dig: {e}"))?;
                let text = String::from_utf8_lossy(&out.stdout);
                let status = text
                    .split("status: ")
                    .nth(1)
                    .and_then(|s| s.split(',').next())
                    .unwrap_or("no answer")
                    .to_owned();
                let what = format!("{} -> DNS {name}", c.from);
                if !matches!(c.expect, Expect::Rcode(want) if want == status) {
                    return Err(format!("{what}: expected {:?}, got {status}", c.expect));
                }
                (true, what, 53)
            }
            Probe::Tls { port, sni } => {
                let out = Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &topology::pod_netns(&self.name, c.from),
                        "curl",
                        "-sk",
                        "-o",
                        "/dev/null",
                        "--max-time",
                        "5",
                        "--resolve",
                    ])
                    .arg(format!("{sni}:{port}:{to}"))
                    .arg(format!("https://{sni}:{port}/"))
                    .output()
                    .map_err(|e| format!("run curl: {e}"))?;
                (
                    out.status.success(),
                    format!(
                        "{} -> {}:{port} TLS server name {sni}",
                        c.from,
                        self.target_name(c.to, to)
                    ),
                    port,
                )
            }
            Probe::Ping => {
                let out = Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &topology::pod_netns(&self.name, c.from),
                        "ping",
                        "-c",
                        "1",
                        "-W",
                        "1",
                    ])
                    .arg(to.to_string())
                    .output()
                    .map_err(|e| format!("run ping: {e}"))?;
                (
                    out.status.success(),
                    format!("{} -> {} ICMP echo", c.from, self.target_name(c.to, to)),
                    8,
                )
            }
        };
        match (c.expect, connected) {
            (Expect::Status(_) | Expect::Rcode(_), _) => {}
            (Expect::Allowed, false) => {
                return Err(format!("{what}: expected allowed, got no answer"));
            }
            (Expect::Dropped(_), true) => {
                return Err(format!("{what}: expected dropped, got an answer"));
            }
            (Expect::Reset, true) => {
                return Err(format!("{what}: expected a reset, got an answer"));
            }
            _ => {}
        }
        // The flows: the agent reads the ring buffer every 200 ms.
        let src = from_ip.to_string();
        let dst = to.to_string();
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let flows = self.recent_flows(before);
            let matching: Vec<&FlowRow> = flows
                .iter()
                .filter(|f| {
                    f.src.starts_with(&format!("{src}:")) && f.dst == format!("{dst}:{dport}")
                })
                .collect();
            let found = match c.expect {
                Expect::Allowed => matching.iter().any(|f| f.verdict != "Dropped"),
                // Through the proxy: the datapath redirected the connection.
                Expect::Status(_) | Expect::Rcode(_) | Expect::Reset => {
                    matching.iter().any(|f| f.verdict == "Redirected")
                }
                Expect::Dropped(reason) => matching.iter().any(|f| {
                    f.verdict == "Dropped" && f.drop_reason_desc.as_deref() == Some(reason)
                }),
            };
            if found {
                return Ok(());
            }
            if Instant::now() > deadline {
                let seen: Vec<String> = matching
                    .iter()
                    .map(|f| format!("{} {:?}", f.verdict, f.drop_reason_desc))
                    .collect();
                return Err(format!(
                    "{what}: traffic as expected, but no matching flow ({:?} expected; flows seen: {seen:?})",
                    c.expect
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn name_of(&self, ip: Ipv4Addr) -> String {
        self.names
            .iter()
            .find(|(a, _)| *a == ip)
            .map_or_else(|| ip.to_string(), |(_, n)| n.clone())
    }

    fn target_name(&self, target: Target, ip: Ipv4Addr) -> String {
        match target {
            Target::Ip(_) => self.name_of(ip),
            Target::Name(name) => format!("{name} ({ip})"),
        }
    }

    /// Resolves `name` inside pod `from` the way its applications do (glibc, its
    /// resolv.conf: the cluster DNS with the pod's search path), bounded to a few seconds.
    fn resolve(&self, from: &str, name: &str) -> Result<Ipv4Addr, String> {
        let out = Command::new("timeout")
            .args(["5", "ip", "netns", "exec"])
            .arg(topology::pod_netns(&self.name, from))
            .args(["getent", "ahostsv4", name])
            .output()
            .map_err(|e| format!("run getent: {e}"))?;
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .and_then(|ip| ip.parse().ok())
            .ok_or_else(|| {
                format!(
                    "{from}: {name} did not resolve (getent exit {:?}{})",
                    out.status.code(),
                    String::from_utf8_lossy(&out.stderr).trim()
                )
            })
    }

    fn apply(&self, policy: &str, scenario: &str) -> Result<Vec<String>, String> {
        if policy.is_empty() {
            return Ok(Vec::new());
        }
        let text = policy
            .replace("{MODULE}", &self.module.0.display().to_string())
            .replace("{SHA256}", &self.module.1);
        let out = Client::new(&self.socket)
            .policy_apply(&text, &format!("scenario {scenario}"))
            .map_err(|e| e.to_string())?;
        Ok(out.applied)
    }

    fn remove(&self, applied: &[String]) -> Result<(), String> {
        for policy in applied {
            // "Kind ns/name" or "Kind name"
            let (kind, rest) = policy
                .split_once(' ')
                .ok_or_else(|| format!("unexpected policy name {policy}"))?;
            let (namespace, name) = match rest.split_once('/') {
                Some((ns, name)) => (Some(ns.to_owned()), name.to_owned()),
                None => (None, rest.to_owned()),
            };
            Client::new(&self.socket)
                .policy_delete(kind, namespace.as_deref(), &name)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// Port of the echo pod's TLS server (for the serverNames scenario).
const TLS_PORT: u16 = 8443;

/// A self-signed certificate and `openssl s_server` on echo's [`TLS_PORT`], recorded with
/// the run's processes so the teardown stops it.
fn start_tls_server(name: &str) -> Result<(), LabError> {
    let step = |what: &str, detail: String| LabError::Step {
        step: what.to_owned(),
        detail,
    };
    let state = RunDir::new(name).path().to_owned();
    let (cert, key) = (state.join("tls-cert.pem"), state.join("tls-key.pem"));
    let made = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=echo.example.com", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .map_err(|e| step("make a TLS certificate (openssl)", e.to_string()))?;
    if !made.status.success() {
        return Err(step(
            "make a TLS certificate (openssl)",
            String::from_utf8_lossy(&made.stderr).into_owned(),
        ));
    }
    let child = Command::new("ip")
        .args(["netns", "exec", &topology::pod_netns(name, "echo")])
        .args(["openssl", "s_server", "-quiet", "-www", "-accept"])
        .arg(TLS_PORT.to_string())
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| step("start openssl s_server", e.to_string()))?;
    let mut pids: Vec<u32> = std::fs::read_to_string(state.join("pids"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    pids.push(child.id());
    lab::record_pids_in(&state, &pids)?;
    let echo = membrane_datapath::Netns::open(&topology::pod_netns(name, "echo"))
        .map_err(|e| step("open echo", e.to_string()))?;
    lab::wait_listening(&echo, ECHO, &[TLS_PORT])
}

/// Runs every scenario; returns (passed, failed).
pub fn run(keep: bool) -> Result<(usize, usize), LabError> {
    let name = format!("{}-ct", lab::lab_name());
    let _ = lab::teardown(&name);
    println!(
        "membrane connectivity test: building {name} (pods client, client2, echo; world hosts; the node)"
    );
    let result = build(&name).map(|run| {
        let (mut passed, mut failed) = (0, 0);
        for scenario in scenarios() {
            let outcome = run
                .apply(scenario.policy, scenario.name)
                .and_then(|applied| {
                    let mut problems = Vec::new();
                    for c in &scenario.checks {
                        if let Err(e) = run.check(c) {
                            problems.push(e);
                        }
                    }
                    run.remove(&applied)?;
                    if problems.is_empty() {
                        Ok(scenario.checks.len())
                    } else {
                        Err(problems.join("; "))
                    }
                });
            match outcome {
                Ok(checks) => {
                    passed += 1;
                    println!("\u{2705} {} ({checks} checks)", scenario.name);
                }
                Err(e) => {
                    failed += 1;
                    println!("\u{274c} {}: {e}", scenario.name);
                }
            }
        }
        (passed, failed)
    });
    if !keep {
        let _ = lab::teardown(&name);
    }
    let (passed, failed) = result?;
    println!("{passed} passed, {failed} failed");
    Ok((passed, failed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_match_the_topology() {
        let t = topology();
        assert_eq!(t.pod("client").map(|p| p.ip), Some(CLIENT));
        assert_eq!(t.pod("echo").map(|p| p.ip), Some(ECHO));
        assert_eq!(t.world_host("a").map(|w| w.ip), Some(WORLD_A));
        assert_eq!(t.world_host("b").map(|w| w.ip), Some(WORLD_B));
        assert!(t.node.serve.iter().any(|s| s.port == HOST_PORT));
        assert!(t.cluster_dns().is_some());
        // Every pod a check starts from exists, and every scenario has checks.
        for s in scenarios() {
            assert!(!s.checks.is_empty(), "{}", s.name);
            for c in &s.checks {
                assert!(t.pod(c.from).is_some(), "{}: {}", s.name, c.from);
            }
        }
    }
}
