//! Parses the realistic policy documents under `tests/data/` and resolves a few endpoints
//! end to end. (Tests read files; the crate itself does no I/O.)

use std::path::PathBuf;

use membrane_policy::{
    Action, Direction, EndpointInfo, Identity, IdentitySet, Labels, LocalAllocator, Peers,
    PolicyKind, Protocol, Repository, ResolveOptions, Subject, parse_documents, resolve_endpoint,
};

fn data(name: &str) -> (String, String) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (text, name.to_owned())
}

fn parse(name: &str) -> Vec<membrane_policy::Policy> {
    let (text, src) = data(name);
    parse_documents(&text, &src).unwrap_or_else(|e| panic!("{e}"))
}

fn labels(items: &[&str]) -> Labels {
    Labels::parse(items.iter().copied()).unwrap()
}

#[test]
fn shop_cnp() {
    let ps = parse("shop-cnp.yaml");
    assert_eq!(ps.len(), 2);
    assert!(ps.iter().all(
        |p| p.kind == PolicyKind::CiliumNetworkPolicy && p.namespace.as_deref() == Some("shop")
    ));
    let ingress = &ps[0].rules[0];
    assert_eq!(ingress.ingress.len(), 2);
    assert_eq!(
        ps[0].labels.get(membrane_policy::LabelSource::K8s, "team"),
        Some("catalog")
    );
    // explicit namespace in the peer selector is kept, not overwritten
    match &ingress.ingress[1].peers {
        Peers::Endpoints(v) => assert!(
            v[0].to_string()
                .contains("k8s:io.kubernetes.pod.namespace=monitoring")
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn shop_resolves_end_to_end() {
    let mut repo = Repository::new();
    for p in parse("shop-cnp.yaml") {
        repo.add(p).unwrap();
    }
    let mut ids = IdentitySet::with_reserved();
    let mut alloc = LocalAllocator::new();
    use membrane_policy::IdentityAllocator;
    let mut pod = |l: &[&str]| {
        let labels = labels(l);
        let id = alloc.allocate(&labels).unwrap();
        ids.insert(id, labels);
        id
    };
    let storefront = pod(&["k8s:app=storefront", "k8s:io.kubernetes.pod.namespace=shop"]);
    let postgres = pod(&["k8s:app=postgres", "k8s:io.kubernetes.pod.namespace=shop"]);
    let dns = pod(&[
        "k8s:k8s-app=kube-dns",
        "k8s:io.kubernetes.pod.namespace=kube-system",
    ]);
    let prom = pod(&[
        "k8s:app.kubernetes.io/name=prometheus",
        "k8s:io.kubernetes.pod.namespace=monitoring",
    ]);
    let payments = {
        let sel = membrane_policy::FqdnSelector::name("api.payments.example").unwrap();
        let l = membrane_policy::fqdn_identity_labels([&sel]);
        let id = alloc.allocate(&l).unwrap();
        ids.insert(id, l);
        id
    };
    let prefixes = repo.cidr_prefixes();
    assert_eq!(prefixes.len(), 1);
    let cidrs = ids.ensure_cidr_identities(prefixes, &mut alloc).unwrap();
    let link_local = *cidrs.values().next().unwrap();

    let catalog = EndpointInfo::new(
        7,
        labels(&["k8s:app=catalog", "k8s:io.kubernetes.pod.namespace=shop"]),
    );
    let p = resolve_endpoint(&repo, &catalog, &ids, &ResolveOptions::new(15001, 15053));
    assert!(p.enforce_ingress && p.enforce_egress);
    let act = |id: Identity, dir, proto, port| p.lookup(id, dir, proto, port).map(|e| e.action);
    assert_eq!(
        act(storefront, Direction::Ingress, 6, 8080),
        Some(Action::Redirect)
    );
    assert_eq!(act(postgres, Direction::Ingress, 6, 8080), None);
    assert_eq!(act(prom, Direction::Ingress, 6, 9090), Some(Action::Allow));
    assert_eq!(
        act(postgres, Direction::Egress, 6, 5432),
        Some(Action::Allow)
    );
    assert_eq!(act(dns, Direction::Egress, 17, 53), Some(Action::Redirect));
    assert_eq!(
        act(payments, Direction::Egress, 6, 443),
        Some(Action::Allow)
    );
    assert_eq!(act(Identity::WORLD, Direction::Egress, 6, 443), None);
    assert_eq!(
        act(link_local, Direction::Egress, 6, 80),
        Some(Action::Deny)
    );
    assert_eq!(p.cidr_prefixes.len(), 1);
    // the proxy sees the HTTP rules for the storefront only
    let http = p.l7_for(Direction::Ingress, 6, 8080).next().unwrap();
    assert!(
        http.rules
            .iter()
            .all(|r| r.remote.contains(storefront) && !r.remote.contains(postgres))
    );
    let compiled = match &http.rules[0].rules {
        membrane_policy::L7Rules::Http(rules) => rules
            .iter()
            .map(|r| r.compile().unwrap())
            .collect::<Vec<_>>(),
        other => panic!("{other:?}"),
    };
    let req = |method, path, headers: &'static [(&'static str, &'static str)]| {
        membrane_policy::HttpRequestView {
            method,
            path,
            host: "catalog",
            headers,
        }
    };
    let allowed = |r: &membrane_policy::HttpRequestView<'_>| compiled.iter().any(|c| c.matches(r));
    assert!(allowed(&req("GET", "/v1/products", &[])));
    assert!(allowed(&req("GET", "/v1/products/42", &[])));
    assert!(!allowed(&req("DELETE", "/v1/products/42", &[])));
    assert!(!allowed(&req("GET", "/v1/products/abc", &[])));
    assert!(allowed(&req(
        "GET",
        "/healthz",
        &[("x-shop-client", "storefront")]
    )));
    assert!(!allowed(&req("GET", "/healthz", &[])));
}

#[test]
fn cluster_ccnp() {
    let ps = parse("cluster-ccnp.yaml");
    assert_eq!(ps.len(), 2);
    assert!(ps.iter().all(|p| p.namespace.is_none()));
    assert_eq!(ps[0].rules.len(), 2);
    assert!(!ps[0].rules[0].enable_default_deny.ingress);
    assert!(matches!(ps[1].rules[0].subject, Subject::Nodes(_)));
    let mut repo = Repository::new();
    for p in ps {
        repo.add(p).unwrap();
    }
    let ids = IdentitySet::with_reserved();
    let opts = ResolveOptions::new(15001, 15053);
    let pod = EndpointInfo::new(
        1,
        labels(&["k8s:app=shop", "k8s:io.kubernetes.pod.namespace=a"]),
    );
    let p = resolve_endpoint(&repo, &pod, &ids, &opts);
    assert!(!p.enforce_ingress && !p.enforce_egress);
    let act = |p: &membrane_policy::EndpointPolicy, id, dir, proto, port| {
        p.lookup(id, dir, proto, port).map(|e| e.action)
    };
    assert_eq!(
        act(&p, Identity::WORLD, Direction::Ingress, 6, 80),
        Some(Action::Deny)
    );
    assert_eq!(
        act(&p, Identity::REMOTE_NODE, Direction::Ingress, 6, 80),
        Some(Action::Allow)
    );
    assert_eq!(
        act(&p, Identity::WORLD, Direction::Egress, 6, 25),
        Some(Action::Deny)
    );
    for port in [465, 500, 587] {
        assert_eq!(
            act(&p, Identity::WORLD, Direction::Egress, 6, port),
            Some(Action::Deny),
            "{port}"
        );
    }
    assert_eq!(
        act(&p, Identity::WORLD, Direction::Egress, 6, 588),
        Some(Action::Allow)
    );
    let gw = EndpointInfo::new(2, labels(&["k8s:app.kubernetes.io/component=gateway"]));
    let p = resolve_endpoint(&repo, &gw, &ids, &opts);
    assert_eq!(
        act(&p, Identity::WORLD, Direction::Ingress, 6, 443),
        Some(Action::Allow)
    );
    let host = EndpointInfo::new(
        3,
        labels(&["reserved:host", "k8s:node-role.kubernetes.io/worker="]),
    );
    let p = resolve_endpoint(&repo, &host, &ids, &opts);
    assert!(p.enforce_ingress && p.enforce_egress);
    assert_eq!(act(&p, Identity::WORLD, Direction::Ingress, 6, 22), None);
    assert_eq!(
        act(&p, Identity::WORLD, Direction::Ingress, 1, 8),
        Some(Action::Allow)
    );
    assert_eq!(
        act(&p, Identity::HEALTH, Direction::Ingress, 6, 4240),
        Some(Action::Allow)
    );
}

#[test]
fn knp() {
    let ps = parse("knp.yaml");
    assert_eq!(ps.len(), 2);
    assert!(
        ps[0].rules[0].enable_default_deny.ingress && ps[0].rules[0].enable_default_deny.egress
    );
    let api = &ps[1].rules[0];
    assert_eq!(api.ingress.len(), 2);
    assert_eq!(api.egress[0].to_ports[0].ports[0].protocol, Protocol::Udp);
    let mut repo = Repository::new();
    for p in ps {
        repo.add(p).unwrap();
    }
    let mut ids = IdentitySet::with_reserved();
    let web = Identity(300);
    ids.insert(
        web,
        labels(&[
            "k8s:app=web",
            "k8s:io.kubernetes.pod.namespace=frontend",
            "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=frontend",
        ]),
    );
    let mut alloc = LocalAllocator::new();
    let cidrs = ids
        .ensure_cidr_identities(repo.cidr_prefixes(), &mut alloc)
        .unwrap();
    let office = cidrs[&"203.0.113.0/24".parse().unwrap()];
    let excluded = cidrs[&"203.0.113.128/25".parse().unwrap()];
    let ep = EndpointInfo::new(1, labels(&["k8s:app=billing-api"])).with_namespace("billing");
    let p = resolve_endpoint(&repo, &ep, &ids, &ResolveOptions::new(15001, 15053));
    let act = |id, dir, proto, port| p.lookup(id, dir, proto, port).map(|e| e.action);
    assert_eq!(act(web, Direction::Ingress, 6, 8443), Some(Action::Allow));
    assert_eq!(act(web, Direction::Ingress, 6, 9005), Some(Action::Allow));
    assert_eq!(act(web, Direction::Ingress, 17, 8443), None);
    assert_eq!(
        act(office, Direction::Ingress, 6, 8443),
        Some(Action::Allow)
    );
    assert_eq!(act(excluded, Direction::Ingress, 6, 8443), None);
    assert_eq!(act(Identity::WORLD, Direction::Egress, 17, 53), None);
}

#[test]
fn list_json() {
    let ps = parse("list.json");
    assert_eq!(ps.len(), 1);
    let p = &ps[0];
    assert_eq!(
        p.uid.as_deref(),
        Some("6f1c1a0e-0000-4000-8000-000000000001")
    );
    assert_eq!(p.rules.len(), 2);
    assert_eq!(p.rules[0].ingress[0].icmps.len(), 1);
    assert!(
        p.rules[1].labels.iter().any(|l| l.to_string()
            == "k8s:io.cilium.k8s.policy.uid=6f1c1a0e-0000-4000-8000-000000000001")
    );
    assert!(
        p.rules[1]
            .labels
            .iter()
            .any(|l| l.to_string() == "k8s:purpose=ops")
    );
}

#[test]
fn invalid_documents_name_the_field() {
    let cases = [
        (
            "invalid/kafka.yaml",
            "invalid/kafka.yaml: document 0 (CiliumNetworkPolicy streams/kafka): specs[1].egress[0].toPorts[0].rules.kafka: unsupported field",
        ),
        (
            "invalid/deny-fqdn.yaml",
            "invalid/deny-fqdn.yaml: document 0 (CiliumNetworkPolicy default/deny-fqdn): spec.egressDeny[0].toFQDNs: toFQDNs is not allowed in deny rules (deny policies do not support toFQDNs)",
        ),
        (
            "invalid/http-on-udp.yaml",
            "invalid/http-on-udp.yaml: document 0 (CiliumNetworkPolicy web/quic): spec.egress[0].toPorts[0].ports[0].protocol: L7 rules can only apply to TCP (not UDP) except for DNS rules",
        ),
    ];
    for (file, want) in cases {
        let (text, src) = data(file);
        let e = parse_documents(&text, &src).unwrap_err();
        assert_eq!(e.to_string(), want);
    }
    let (text, src) = data("invalid/typo.yaml");
    let e = parse_documents(&text, &src).unwrap_err().to_string();
    assert!(
        e.contains("spec.ingress[0].fromEndpoint: unknown field (expected one of: fromEndpoints"),
        "{e}"
    );
}
