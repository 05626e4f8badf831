//! The seed guide's example policies (`examples/policies/*.yaml`) behave as a Cilium user
//! expects: they validate, resolve for the lab's workloads, and give the verdicts the guide
//! promises, including the L7 (HTTP and DNS) decisions of the proxy.
//!
//! The lab is built the way the agent builds it: pod labels plus the namespace and cluster
//! labels, identities from the deterministic [`LocalAllocator`], `fqdn:` identities labelled
//! with every toFQDNs selector that matches the name. Verdicts come from
//! [`EndpointPolicy::lookup`] (the datapath's two lookups) and the L7 rule sets.

use std::collections::BTreeMap;
use std::path::PathBuf;

use membrane_policy::{
    Action, Change, Direction, DnsMatcher, EndpointInfo, EndpointPolicy, HttpRequestView, Identity,
    IdentityAllocator, IdentitySet, L7Rules, Label, Labels, LocalAllocator, Policy, PolicyKind,
    Repository, ResolveOptions, Resolver, fqdn_identity_labels, parse_documents, resolve_endpoint,
};

const TCP: u8 = 6;
const UDP: u8 = 17;
const HTTP_PROXY: u16 = 15001;
const DNS_PROXY: u16 = 15053;

const FILES: [&str; 4] = [
    "backend-ingress.yaml",
    "api-l7.yaml",
    "external-egress-policy.yaml",
    "default-deny-external.yaml",
];

fn parse_example(file: &str) -> Vec<Policy> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/policies")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    parse_documents(&text, file).unwrap_or_else(|e| panic!("{e}"))
}

/// What a packet gets, from one endpoint's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// No entry matched (default deny) or a deny entry matched.
    Dropped,
    /// Allowed without the proxy.
    Allowed,
    /// Redirected to the proxy on this port.
    Proxied(u16),
}

/// The lab of `examples/policies/endpoints.yaml` with the four policies loaded.
struct Lab {
    repo: Repository,
    ids: IdentitySet,
    alloc: LocalAllocator,
    opts: ResolveOptions,
    pods: BTreeMap<&'static str, (Labels, Identity)>,
}

impl Lab {
    fn new() -> Lab {
        let mut repo = Repository::new();
        for f in FILES {
            for p in parse_example(f) {
                repo.add(p).unwrap();
            }
        }
        let mut lab = Lab {
            repo,
            ids: IdentitySet::with_reserved(),
            alloc: LocalAllocator::new(),
            opts: ResolveOptions::new(HTTP_PROXY, DNS_PROXY),
            pods: BTreeMap::new(),
        };
        for (name, ns, key, value) in [
            ("frontend", "default", "app", "frontend"),
            ("backend", "default", "app", "backend"),
            ("api", "default", "app", "api"),
            ("external-client", "default", "app", "external-client"),
            ("kube-dns", "kube-system", "k8s-app", "kube-dns"),
        ] {
            let labels: Labels = [
                Label::k8s(key, value),
                Label::k8s("io.kubernetes.pod.namespace", ns),
                Label::k8s("io.cilium.k8s.policy.cluster", "default"),
            ]
            .into_iter()
            .collect();
            let id = lab.identity(labels.clone());
            lab.pods.insert(name, (labels, id));
        }
        lab
    }

    fn identity(&mut self, labels: Labels) -> Identity {
        let id = self.alloc.allocate(&labels).unwrap();
        self.ids.insert(id, labels);
        id
    }

    /// The identity the DNS proxy gives the IPs of `name`: `fqdn:` labels of every toFQDNs
    /// selector that matches, plus `reserved:world`.
    fn fqdn_identity(&mut self, name: &str) -> Identity {
        let selectors = self.repo.fqdn_selectors();
        let matching: Vec<_> = selectors
            .iter()
            .filter(|s| s.compile().unwrap().matches(name))
            .collect();
        assert!(!matching.is_empty(), "no toFQDNs selector matches {name}");
        self.identity(fqdn_identity_labels(matching))
    }

    fn pod(&self, name: &str) -> Identity {
        self.pods[name].1
    }

    fn policy(&self, name: &str) -> EndpointPolicy {
        let ep = EndpointInfo::new(1, self.pods[name].0.clone());
        resolve_endpoint(&self.repo, &ep, &self.ids, &self.opts)
    }
}

fn verdict(p: &EndpointPolicy, remote: Identity, dir: Direction, proto: u8, port: u16) -> Verdict {
    match p.lookup(remote, dir, proto, port) {
        None => Verdict::Dropped,
        Some(e) => match e.action {
            Action::Deny => Verdict::Dropped,
            Action::Allow => Verdict::Allowed,
            Action::Redirect => Verdict::Proxied(e.proxy_port),
        },
    }
}

/// The HTTP proxy's decision for a request from/to `remote` on a redirected port.
fn http_allows(
    p: &EndpointPolicy,
    remote: Identity,
    dir: Direction,
    port: u16,
    method: &str,
    path: &str,
) -> bool {
    let req = HttpRequestView {
        method,
        path,
        host: "api.default.svc.cluster.local:8080",
        headers: &[],
    };
    p.l7_for(dir, TCP, port)
        .flat_map(|set| &set.rules)
        .filter(|r| r.remote.contains(remote))
        .any(|r| match &r.rules {
            L7Rules::Http(rules) => {
                rules.is_empty()
                    || rules
                        .iter()
                        .any(|h| h.compile().is_ok_and(|c| c.matches(&req)))
            }
            L7Rules::Dns(_) | L7Rules::Tls(_) => false,
        })
}

/// The DNS proxy's decision for a query to `server` on 53/`proto`.
fn dns_allows(p: &EndpointPolicy, server: Identity, proto: u8, qname: &str) -> bool {
    p.l7_for(Direction::Egress, proto, 53)
        .flat_map(|set| &set.rules)
        .filter(|r| r.remote.contains(server))
        .any(|r| match &r.rules {
            L7Rules::Dns(sels) => DnsMatcher::new(sels).is_ok_and(|m| m.allows(qname)),
            L7Rules::Http(_) | L7Rules::Tls(_) => false,
        })
}

#[test]
fn examples_validate_without_warnings() {
    let mut kinds = Vec::new();
    for f in FILES {
        let ps = parse_example(f);
        assert_eq!(ps.len(), 1, "{f}: one policy per file");
        let p = &ps[0];
        assert!(p.warnings.is_empty(), "{f}: {:?}", p.warnings);
        kinds.push((p.kind, p.namespace.clone(), p.name.clone()));
    }
    let ns = Some("default".to_owned());
    assert_eq!(
        kinds,
        vec![
            (
                PolicyKind::CiliumNetworkPolicy,
                ns.clone(),
                "backend-ingress".to_owned()
            ),
            (
                PolicyKind::CiliumNetworkPolicy,
                ns.clone(),
                "api-l7".to_owned()
            ),
            (
                PolicyKind::CiliumNetworkPolicy,
                ns,
                "external-egress-policy".to_owned()
            ),
            (
                PolicyKind::CiliumClusterwideNetworkPolicy,
                None,
                "default-deny-external".to_owned()
            ),
        ]
    );
}

#[test]
fn backend_accepts_frontend_on_8080_only() {
    let lab = Lab::new();
    let backend = lab.policy("backend");
    let frontend = lab.policy("frontend");
    assert!(backend.enforce_ingress);
    let fe = lab.pod("frontend");
    let be = lab.pod("backend");
    // frontend's egress (the cluster-wide policy allows the cluster) and backend's ingress
    assert_eq!(
        verdict(&frontend, be, Direction::Egress, TCP, 8080),
        Verdict::Allowed
    );
    assert_eq!(
        verdict(&backend, fe, Direction::Ingress, TCP, 8080),
        Verdict::Allowed
    );
    // other ports, protocols and peers are dropped at backend's ingress
    assert_eq!(
        verdict(&backend, fe, Direction::Ingress, TCP, 8081),
        Verdict::Dropped
    );
    assert_eq!(
        verdict(&backend, fe, Direction::Ingress, UDP, 8080),
        Verdict::Dropped
    );
    for other in ["api", "external-client", "kube-dns"] {
        assert_eq!(
            verdict(&backend, lab.pod(other), Direction::Ingress, TCP, 8080),
            Verdict::Dropped,
            "{other}"
        );
    }
    assert_eq!(
        verdict(&backend, Identity::WORLD, Direction::Ingress, TCP, 8080),
        Verdict::Dropped
    );
    // the node itself may still reach its pods (allow-localhost)
    assert_eq!(
        verdict(&backend, Identity::HOST, Direction::Ingress, TCP, 9999),
        Verdict::Allowed
    );
}

#[test]
fn api_filters_http_requests_from_frontend() {
    let lab = Lab::new();
    let api = lab.policy("api");
    let fe = lab.pod("frontend");
    assert_eq!(
        verdict(&api, fe, Direction::Ingress, TCP, 8080),
        Verdict::Proxied(HTTP_PROXY)
    );
    let allowed = |m, p| http_allows(&api, fe, Direction::Ingress, 8080, m, p);
    assert!(allowed("GET", "/api/v1/x"));
    assert!(allowed("GET", "/api/v1/orders/42?page=2"));
    assert!(allowed("POST", "/api/v1/orders"));
    assert!(!allowed("DELETE", "/api/v1/x"));
    assert!(!allowed("POST", "/api/v1/users"));
    assert!(!allowed("POST", "/api/v1/orders?dry-run=1"));
    assert!(!allowed("GET", "/admin"));
    assert!(!allowed("GET", "/api/v2/x"));
    // other peers never reach the proxy
    assert_eq!(
        verdict(&api, lab.pod("backend"), Direction::Ingress, TCP, 8080),
        Verdict::Dropped
    );
    assert_eq!(
        verdict(&api, fe, Direction::Ingress, TCP, 9090),
        Verdict::Dropped
    );
}

#[test]
fn external_client_resolves_and_reaches_allowed_names_only() {
    let mut lab = Lab::new();
    let github = lab.fqdn_identity("api.github.com");
    let uploads = lab.fqdn_identity("uploads.github.com");
    let slack = lab.fqdn_identity("api.slack.com");
    let client = lab.policy("external-client");
    let dns = lab.pod("kube-dns");
    assert!(client.enforce_egress);

    for proto in [UDP, TCP] {
        assert_eq!(
            verdict(&client, dns, Direction::Egress, proto, 53),
            Verdict::Proxied(DNS_PROXY)
        );
        for name in [
            "api.github.com",
            "API.GitHub.com.",
            "uploads.github.com",
            "api.slack.com",
            "backend.default.svc.cluster.local",
            // the resolver's search-path expansion (allowed by the cluster-wide policy)
            "api.github.com.default.svc.cluster.local",
        ] {
            assert!(dns_allows(&client, dns, proto, name), "{name}/{proto}");
        }
        for name in ["example.com", "github.com", "a.b.github.com", "slack.com"] {
            assert!(!dns_allows(&client, dns, proto, name), "{name}/{proto}");
        }
    }

    // the `fqdn:` identity of api.github.com carries both matching selectors
    let labels = lab.ids.get(github).unwrap().to_string();
    assert_eq!(
        labels,
        "reserved:world,fqdn:*.github.com,fqdn:api.github.com"
    );
    for id in [github, uploads, slack] {
        for port in [443, 80] {
            assert_eq!(
                verdict(&client, id, Direction::Egress, TCP, port),
                Verdict::Allowed,
                "{id} {port}"
            );
        }
        assert_eq!(
            verdict(&client, id, Direction::Egress, TCP, 22),
            Verdict::Dropped
        );
        assert_eq!(
            verdict(&client, id, Direction::Egress, UDP, 443),
            Verdict::Dropped
        );
    }
    // an IP without an fqdn identity is world: dropped
    assert_eq!(
        verdict(&client, Identity::WORLD, Direction::Egress, TCP, 443),
        Verdict::Dropped
    );
}

#[test]
fn world_egress_is_denied_by_default_cluster_allowed() {
    let mut lab = Lab::new();
    let github = lab.fqdn_identity("api.github.com");
    let dns = lab.pod("kube-dns");
    for pod in ["frontend", "backend", "api"] {
        let p = lab.policy(pod);
        assert!(p.enforce_egress, "{pod}");
        assert!(!p.enforce_ingress || pod != "frontend", "{pod}");
        for (remote, port) in [(Identity::WORLD, 443), (Identity::WORLD, 80), (github, 443)] {
            assert_eq!(
                verdict(&p, remote, Direction::Egress, TCP, port),
                Verdict::Dropped,
                "{pod} -> {remote}:{port}"
            );
        }
        // everything in the cluster, on any port
        for other in ["frontend", "backend", "api", "external-client"] {
            assert_eq!(
                verdict(&p, lab.pod(other), Direction::Egress, TCP, 5432),
                Verdict::Allowed,
                "{pod} -> {other}"
            );
        }
        for reserved in [
            Identity::HOST,
            Identity::REMOTE_NODE,
            Identity::KUBE_APISERVER,
        ] {
            assert_eq!(
                verdict(&p, reserved, Direction::Egress, TCP, 6443),
                Verdict::Allowed,
                "{pod} -> {reserved}"
            );
        }
        // cluster DNS through the DNS proxy, in-cluster names only
        assert_eq!(
            verdict(&p, dns, Direction::Egress, UDP, 53),
            Verdict::Proxied(DNS_PROXY)
        );
        assert!(dns_allows(
            &p,
            dns,
            UDP,
            "backend.default.svc.cluster.local"
        ));
        assert!(!dns_allows(&p, dns, UDP, "api.github.com"));
    }
    // frontend has no ingress policy: ingress stays open
    let frontend = lab.policy("frontend");
    assert!(!frontend.enforce_ingress);
    assert_eq!(
        verdict(&frontend, Identity::WORLD, Direction::Ingress, TCP, 8080),
        Verdict::Allowed
    );
    // the cluster DNS forwards upstream on 53 only
    let kube_dns = lab.policy("kube-dns");
    for proto in [UDP, TCP] {
        assert_eq!(
            verdict(&kube_dns, Identity::WORLD, Direction::Egress, proto, 53),
            Verdict::Allowed
        );
    }
    assert_eq!(
        verdict(&kube_dns, Identity::WORLD, Direction::Egress, TCP, 443),
        Verdict::Dropped
    );
}

#[test]
fn external_egress_policy_added_and_removed_incrementally() {
    let mut lab = Lab::new();
    let github = lab.fqdn_identity("api.github.com");
    let external = parse_example("external-egress-policy.yaml").remove(0);
    let key = external.policy_ref();
    lab.repo.remove(&key).unwrap();

    let mut r = Resolver::new(lab.opts.clone(), lab.ids.clone());
    for p in lab.repo.iter() {
        r.apply(Change::UpsertPolicy(p.clone()));
    }
    let mut ids = BTreeMap::new();
    for (i, (name, (labels, _))) in lab.pods.iter().enumerate() {
        let id = i as u64 + 1;
        ids.insert(*name, id);
        r.apply(Change::UpsertEndpoint(EndpointInfo::new(
            id,
            labels.clone(),
        )));
    }
    let client = ids["external-client"];
    let reach = |r: &Resolver| {
        verdict(
            r.endpoint_policy(client).unwrap(),
            github,
            Direction::Egress,
            TCP,
            443,
        )
    };
    assert_eq!(reach(&r), Verdict::Dropped);

    let d = r.apply(Change::UpsertPolicy(external));
    assert_eq!(d.keys().copied().collect::<Vec<_>>(), vec![client]);
    assert!(d[&client].l7_changed, "DNS rules changed");
    assert!(!d[&client].entries.added.is_empty());
    assert_eq!(reach(&r), Verdict::Allowed);

    let d = r.apply(Change::RemovePolicy(key));
    assert_eq!(d.keys().copied().collect::<Vec<_>>(), vec![client]);
    assert_eq!(reach(&r), Verdict::Dropped);
    // back to exactly what a full resolution gives
    let info = EndpointInfo::new(client, lab.pods["external-client"].0.clone());
    let full = resolve_endpoint(r.repository(), &info, r.identities(), &lab.opts);
    assert_eq!(r.endpoint_policy(client), Some(&full));
}
