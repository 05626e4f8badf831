//! Resolution tests: Cilium's documented behaviour as case tables, checked through
//! [`EndpointPolicy::lookup`] (what the datapath would decide) and the L7 rule sets.

use super::*;
use crate::identity::{IdentityAllocator, LocalAllocator};
use crate::parse::parse_documents;

const HTTP_PORT: u16 = 15001;
const DNS_PORT: u16 = 15053;
const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;

const CLIENT: Identity = Identity(256);
const SERVER: Identity = Identity(257);
const OTHER_NS: Identity = Identity(258);
const KUBE_DNS: Identity = Identity(259);

fn labels(items: &[&str]) -> Labels {
    Labels::parse(items.iter().copied()).unwrap()
}

fn identities() -> IdentitySet {
    let mut s = IdentitySet::with_reserved();
    s.insert(
        CLIENT,
        labels(&[
            "k8s:app=client",
            "k8s:io.kubernetes.pod.namespace=default",
            "k8s:io.cilium.k8s.policy.cluster=default",
        ]),
    );
    s.insert(
        SERVER,
        labels(&[
            "k8s:app=server",
            "k8s:io.kubernetes.pod.namespace=default",
            "k8s:io.cilium.k8s.policy.cluster=default",
        ]),
    );
    s.insert(
        OTHER_NS,
        labels(&[
            "k8s:app=client",
            "k8s:io.kubernetes.pod.namespace=other",
            "k8s:io.cilium.k8s.policy.cluster=default",
        ]),
    );
    s.insert(
        KUBE_DNS,
        labels(&[
            "k8s:k8s-app=kube-dns",
            "k8s:io.kubernetes.pod.namespace=kube-system",
            "k8s:io.cilium.k8s.policy.cluster=default",
        ]),
    );
    s
}

fn server_ep() -> EndpointInfo {
    EndpointInfo::new(
        1,
        labels(&["k8s:app=server", "k8s:io.kubernetes.pod.namespace=default"]),
    )
}

fn client_ep() -> EndpointInfo {
    EndpointInfo::new(
        2,
        labels(&["k8s:app=client", "k8s:io.kubernetes.pod.namespace=default"]),
    )
}

fn repo(yaml: &str) -> Repository {
    let mut r = Repository::new();
    for p in parse_documents(yaml, "test.yaml").unwrap() {
        r.add(p).unwrap();
    }
    r
}

fn opts() -> ResolveOptions {
    ResolveOptions::new(HTTP_PORT, DNS_PORT)
}

fn resolve(yaml: &str, ep: &EndpointInfo) -> EndpointPolicy {
    resolve_endpoint(&repo(yaml), ep, &identities(), &opts())
}

/// "deny", "allow", "redirect" or "drop" (no entry: default deny).
fn verdict(
    p: &EndpointPolicy,
    remote: Identity,
    dir: Direction,
    proto: u8,
    port: u16,
) -> &'static str {
    match p.lookup(remote, dir, proto, port) {
        None => "drop",
        Some(e) => match e.action {
            Action::Deny => "deny",
            Action::Allow => "allow",
            Action::Redirect => "redirect",
        },
    }
}

const SERVER_ALLOWS: &str = "
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: allows}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: '80', protocol: TCP}]
      rules:
        http: [{method: GET, path: /}]
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: '80', protocol: TCP}]
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: '81', protocol: TCP}]
  - fromEndpoints: [{matchLabels: {app: client}}]
";

/// The deny truth table of reference §1.7 (language.rst "Deny Policies"): allows
/// {L7 HTTP on 80, L4 80, L4 81, L3 client}; varying denies; curl :80, curl :81, ping.
#[test]
fn deny_truth_table() {
    let denies: &[(&str, [&str; 3])] = &[
        ("", ["redirect", "allow", "allow"]),
        (
            "  ingressDeny:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n    toPorts:\n    - ports: [{port: '80', protocol: TCP}]\n",
            ["deny", "allow", "allow"],
        ),
        (
            "  ingressDeny:\n  - toPorts:\n    - ports: [{port: '80', protocol: TCP}]\n",
            ["deny", "allow", "allow"],
        ),
        (
            "  ingressDeny:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n",
            ["deny", "deny", "deny"],
        ),
        (
            "  ingressDeny:\n  - fromEntities: [all]\n",
            ["deny", "deny", "deny"],
        ),
        (
            "  ingressDeny:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n    toPorts:\n    - ports: [{port: '81', protocol: TCP}]\n",
            ["redirect", "deny", "allow"],
        ),
        (
            "  ingressDeny:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n    icmps: [{fields: [{type: 8}]}]\n",
            ["redirect", "allow", "deny"],
        ),
    ];
    for (deny, want) in denies {
        let p = resolve(&format!("{SERVER_ALLOWS}{deny}"), &server_ep());
        let got = [
            verdict(&p, CLIENT, Direction::Ingress, TCP, 80),
            verdict(&p, CLIENT, Direction::Ingress, TCP, 81),
            verdict(&p, CLIENT, Direction::Ingress, ICMP, 8),
        ];
        assert_eq!(&got, want, "deny section:\n{deny}");
        // other peers are default-denied; replies are conntrack's business
        let other = verdict(&p, OTHER_NS, Direction::Ingress, TCP, 81);
        assert!(other == "drop" || other == "deny", "{other}");
    }
}

#[test]
fn l4_and_l7_on_same_port_is_proxied_with_wildcard() {
    let p = resolve(SERVER_ALLOWS, &server_ep());
    let e = p.lookup(CLIENT, Direction::Ingress, TCP, 80).unwrap();
    assert_eq!(
        (e.action, e.proxy_port, e.precedence),
        (Action::Redirect, HTTP_PORT, PRECEDENCE_REDIRECT)
    );
    let sets: Vec<&L7RuleSet> = p.l7_for(Direction::Ingress, TCP, 80).collect();
    assert_eq!(sets.len(), 1);
    let set = sets[0];
    assert_eq!(
        (set.parser, set.proxy_port, set.port, set.end_port),
        (L7Parser::Http, HTTP_PORT, 80, 80)
    );
    // the GET rule and the wildcard from the L4-only rule, both for the client identity
    assert_eq!(set.rules.len(), 2);
    assert!(
        set.rules
            .iter()
            .all(|r| r.remote == RemoteIdentities::Set([CLIENT].into()))
    );
    assert!(set.rules.iter().any(|r| r.rules == L7Rules::Http(vec![])));
    assert!(
        set.rules
            .iter()
            .any(|r| matches!(&r.rules, L7Rules::Http(h) if h.len() == 1))
    );
    // cookies name the rules
    let origin = &p.cookies[&e.cookie];
    assert!(
        origin.starts_with("CiliumNetworkPolicy default/allows spec ingress["),
        "{origin}"
    );
}

#[test]
fn l7_from_any_peer_and_l4_from_client() {
    let p = resolve(
        "
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - toPorts:
    - ports: [{port: '8080', protocol: TCP}]
      rules: {http: [{path: /public}]}
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: '8080', protocol: TCP}]
",
        &server_ep(),
    );
    // both identity 0 (L7 rules) and client (wildcard) are redirected
    assert_eq!(
        verdict(&p, CLIENT, Direction::Ingress, TCP, 8080),
        "redirect"
    );
    assert_eq!(
        verdict(&p, OTHER_NS, Direction::Ingress, TCP, 8080),
        "redirect"
    );
    let set = p.l7_for(Direction::Ingress, TCP, 8080).next().unwrap();
    let any = set
        .rules
        .iter()
        .find(|r| r.remote == RemoteIdentities::Any)
        .unwrap();
    assert!(matches!(&any.rules, L7Rules::Http(h) if h.len() == 1));
    let client = set
        .rules
        .iter()
        .find(|r| r.remote.contains(CLIENT) && r.remote != RemoteIdentities::Any)
        .unwrap();
    assert_eq!(client.rules, L7Rules::Http(vec![]));
}

/// Cilium redirects per selector (cilium/cilium#7471): a peer that is only L4-allowed on a
/// port where another peer has L7 rules is not proxied; a peer with both is proxied and
/// passes through the L7 wildcard.
#[test]
fn l4_only_peer_on_l7_port_is_not_proxied() {
    let p = resolve(
        "
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: '8080', protocol: TCP}]
      rules: {http: [{method: GET}]}
  - fromEndpoints: [{matchLabels: {app: client, k8s:io.kubernetes.pod.namespace: other}}]
    toPorts:
    - ports: [{port: '8080', protocol: TCP}]
  - fromEntities: [cluster]
    toPorts:
    - ports: [{port: '8080', protocol: TCP}]
",
        &server_ep(),
    );
    // client: L7 rules and (via `cluster`) an L4-only allow: proxied, wildcard passes all
    let e = p.lookup(CLIENT, Direction::Ingress, TCP, 8080).unwrap();
    assert_eq!((e.action, e.proxy_port), (Action::Redirect, HTTP_PORT));
    let set = p.l7_for(Direction::Ingress, TCP, 8080).next().unwrap();
    assert!(
        set.rules
            .iter()
            .any(|r| r.remote.contains(CLIENT) && r.rules == L7Rules::Http(vec![]))
    );
    // other-namespace client and kube-dns: L4-only, plain allow, never proxied
    for id in [OTHER_NS, KUBE_DNS] {
        let e = p.lookup(id, Direction::Ingress, TCP, 8080).unwrap();
        assert_eq!(
            (e.action, e.proxy_port, e.precedence),
            (Action::Allow, 0, PRECEDENCE_ALLOW),
            "{id}"
        );
    }
    assert_eq!(
        verdict(&p, Identity::WORLD, Direction::Ingress, TCP, 8080),
        "drop"
    );
}

#[test]
fn port_range_becomes_prefixes() {
    let p = resolve(
        "
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: '8000', endPort: 8100, protocol: TCP}]
",
        &server_ep(),
    );
    let keys: Vec<String> = p
        .entries
        .keys()
        .filter(|k| k.identity == CLIENT)
        .map(|k| k.to_string())
        .collect();
    assert_eq!(
        keys,
        vec![
            "ingress id=256 6/8000-8063",
            "ingress id=256 6/8064-8095",
            "ingress id=256 6/8096-8099",
            "ingress id=256 6/8100",
        ]
    );
    for port in 7990..8110 {
        let want = if (8000..=8100).contains(&port) {
            "allow"
        } else {
            "drop"
        };
        assert_eq!(
            verdict(&p, CLIENT, Direction::Ingress, TCP, port),
            want,
            "port {port}"
        );
    }
    assert_eq!(verdict(&p, CLIENT, Direction::Ingress, UDP, 8000), "drop");
}

#[test]
fn any_protocol_expands_to_tcp_udp_sctp() {
    let p = resolve(
        "
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - toPorts:
    - ports: [{port: '53'}]
  - toPorts:
    - ports: [{port: '0', protocol: UDP}]
",
        &server_ep(),
    );
    let keys: Vec<String> = p.entries.keys().map(|k| k.to_string()).collect();
    assert!(keys.contains(&"ingress id=0 6/53".to_string()), "{keys:?}");
    assert!(
        keys.contains(&"ingress id=0 132/53".to_string()),
        "{keys:?}"
    );
    assert!(
        keys.contains(&"ingress id=0 17/ANY".to_string()),
        "{keys:?}"
    );
    // UDP/53 is covered by UDP/ANY (same verdict), so no separate key is needed
    assert!(
        !keys.contains(&"ingress id=0 17/53".to_string()),
        "{keys:?}"
    );
    assert_eq!(verdict(&p, CLIENT, Direction::Ingress, UDP, 53), "allow");
    assert_eq!(verdict(&p, CLIENT, Direction::Ingress, UDP, 9999), "allow");
    assert_eq!(verdict(&p, CLIENT, Direction::Ingress, TCP, 9999), "drop");
}

#[test]
fn icmp_type_in_port_field() {
    let p = resolve(
        "
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    icmps:
    - fields: [{type: 8}, {family: IPv6, type: EchoRequest}]
",
        &server_ep(),
    );
    let k = PolicyKey {
        identity: CLIENT,
        direction: Direction::Ingress,
        protocol: 1,
        port: 8,
        port_prefix_len: 16,
    };
    assert!(p.entries.contains_key(&k));
    assert_eq!(k.proto_port_prefix_len(), 24);
    assert_eq!(verdict(&p, CLIENT, Direction::Ingress, 1, 8), "allow");
    assert_eq!(verdict(&p, CLIENT, Direction::Ingress, 58, 128), "allow");
    assert_eq!(verdict(&p, CLIENT, Direction::Ingress, 1, 0), "drop");
    assert_eq!(verdict(&p, CLIENT, Direction::Ingress, TCP, 8), "drop");
}

#[test]
fn default_deny_per_direction() {
    // ingress rule only: ingress enforced, egress allow-all
    let p = resolve(SERVER_ALLOWS, &server_ep());
    assert!(p.enforce_ingress && !p.enforce_egress);
    assert_eq!(verdict(&p, OTHER_NS, Direction::Egress, TCP, 1234), "allow");
    assert_eq!(verdict(&p, OTHER_NS, Direction::Ingress, TCP, 1234), "drop");
    // allow-localhost: the host may reach the endpoint
    assert_eq!(
        verdict(&p, Identity::HOST, Direction::Ingress, TCP, 1234),
        "allow"
    );
    let mut o = opts();
    o.allow_localhost = false;
    let p2 = resolve_endpoint(&repo(SERVER_ALLOWS), &server_ep(), &identities(), &o);
    assert_eq!(
        verdict(&p2, Identity::HOST, Direction::Ingress, TCP, 1234),
        "drop"
    );

    // enableDefaultDeny false: a deny rule without default deny
    let p = resolve(
        "
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {app: server}}
  enableDefaultDeny: {ingress: false}
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: client}}]
",
        &server_ep(),
    );
    assert!(!p.enforce_ingress);
    assert_eq!(verdict(&p, CLIENT, Direction::Ingress, TCP, 80), "deny");
    assert_eq!(verdict(&p, OTHER_NS, Direction::Ingress, TCP, 80), "allow");

    // no policy selects the endpoint: nothing enforced
    let p = resolve(SERVER_ALLOWS, &client_ep());
    assert!(!p.enforce_ingress && !p.enforce_egress);
    assert_eq!(p.entries.len(), 2);

    // `egress: [{}]` is default deny egress with nothing allowed
    let p = resolve(
        "
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {}
  egress: [{}]
",
        &server_ep(),
    );
    assert!(p.enforce_egress);
    assert_eq!(verdict(&p, CLIENT, Direction::Egress, TCP, 80), "drop");
    assert!(p.entries.keys().all(|k| k.direction == Direction::Ingress));

    // enforcement modes
    let mut o = opts();
    o.enforcement = EnforcementMode::Always;
    let p = resolve_endpoint(&Repository::new(), &server_ep(), &identities(), &o);
    assert!(p.enforce_ingress && p.enforce_egress);
    assert_eq!(verdict(&p, CLIENT, Direction::Egress, TCP, 80), "drop");
    o.enforcement = EnforcementMode::Never;
    let p = resolve_endpoint(&repo(SERVER_ALLOWS), &server_ep(), &identities(), &o);
    assert_eq!(verdict(&p, OTHER_NS, Direction::Ingress, TCP, 80), "allow");
}

#[test]
fn nil_empty_wildcard_peers_resolve() {
    let base = "
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
";
    // (ingress rule, client verdict :80, other-namespace verdict :80)
    let cases: &[(&str, &str, &str)] = &[
        // nil L3 + toPorts: any peer
        (
            "  - toPorts: [{ports: [{port: '80', protocol: TCP}]}]\n",
            "allow",
            "allow",
        ),
        // empty list: nothing
        (
            "  - fromEndpoints: []\n    toPorts: [{ports: [{port: '80', protocol: TCP}]}]\n",
            "drop",
            "drop",
        ),
        // [{}] in a CNP: same namespace only
        ("  - fromEndpoints: [{}]\n", "allow", "drop"),
        // {} rule: nothing (default deny only)
        ("  - {}\n", "drop", "drop"),
        // all entity
        ("  - fromEntities: [all]\n", "allow", "allow"),
        // cluster entity: pods of this cluster
        ("  - fromEntities: [cluster]\n", "allow", "allow"),
        ("  - fromEntities: [world]\n", "drop", "drop"),
    ];
    for (rule, c, o) in cases {
        let p = resolve(&format!("{base}{rule}"), &server_ep());
        assert_eq!(
            verdict(&p, CLIENT, Direction::Ingress, TCP, 80),
            *c,
            "{rule}"
        );
        assert_eq!(
            verdict(&p, OTHER_NS, Direction::Ingress, TCP, 80),
            *o,
            "{rule}"
        );
    }
    let p = resolve(
        &format!("{base}  - fromEntities: [cluster]\n"),
        &server_ep(),
    );
    assert_eq!(
        verdict(&p, Identity::REMOTE_NODE, Direction::Ingress, TCP, 80),
        "allow"
    );
    assert_eq!(
        verdict(&p, Identity::WORLD, Direction::Ingress, TCP, 80),
        "drop"
    );
    let mut o = opts();
    o.cluster_name = "east".into();
    let p = resolve_endpoint(
        &repo(&format!("{base}  - fromEntities: [cluster]\n")),
        &server_ep(),
        &identities(),
        &o,
    );
    assert_eq!(verdict(&p, CLIENT, Direction::Ingress, TCP, 80), "drop");
}

#[test]
fn ccnp_peer_selectors_match_only_pods() {
    let p = resolve(
        "
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: cw}
spec:
  endpointSelector: {}
  ingress:
  - fromEndpoints: [{}]
",
        &server_ep(),
    );
    assert_eq!(verdict(&p, CLIENT, Direction::Ingress, TCP, 80), "allow");
    assert_eq!(verdict(&p, OTHER_NS, Direction::Ingress, TCP, 80), "allow");
    assert_eq!(
        verdict(&p, Identity::WORLD, Direction::Ingress, TCP, 80),
        "drop"
    );
    assert_eq!(
        verdict(&p, Identity::REMOTE_NODE, Direction::Ingress, TCP, 80),
        "drop"
    );
}

#[test]
fn cidr_except_and_ipcache_prefixes() {
    let yaml = "
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toCIDRSet:
    - cidr: 10.0.0.0/8
      except: [10.1.0.0/16]
    toPorts: [{ports: [{port: '443', protocol: TCP}]}]
  - toCIDR: [192.0.2.1]
";
    let r = repo(yaml);
    let mut ids = identities();
    // before allocation: prefixes reported missing, nothing allowed
    let p = resolve_endpoint(&r, &client_ep(), &ids, &opts());
    assert_eq!(p.missing_cidr_identities.len(), 3);
    let mut alloc = LocalAllocator::new();
    let m = ids
        .ensure_cidr_identities(r.cidr_prefixes(), &mut alloc)
        .unwrap();
    let p = resolve_endpoint(&r, &client_ep(), &ids, &opts());
    assert!(p.missing_cidr_identities.is_empty());
    assert_eq!(p.cidr_prefixes, m);
    let id8 = m[&"10.0.0.0/8".parse().unwrap()];
    let id16 = m[&"10.1.0.0/16".parse().unwrap()];
    let id32 = m[&"192.0.2.1/32".parse().unwrap()];
    assert!(id8.is_local() && id16.is_local());
    assert_eq!(verdict(&p, id8, Direction::Egress, TCP, 443), "allow");
    assert_eq!(verdict(&p, id8, Direction::Egress, TCP, 80), "drop");
    assert_eq!(verdict(&p, id16, Direction::Egress, TCP, 443), "drop");
    assert_eq!(verdict(&p, id32, Direction::Egress, UDP, 53), "allow");
    assert_eq!(
        verdict(&p, Identity::WORLD, Direction::Egress, TCP, 443),
        "drop"
    );
    // a more specific prefix learned later (e.g. another policy) inside 10/8 is selected
    let id24 = alloc
        .allocate(&cidr_identity_labels("10.2.3.0/24".parse().unwrap()))
        .unwrap();
    ids.insert(id24, cidr_identity_labels("10.2.3.0/24".parse().unwrap()));
    let p = resolve_endpoint(&r, &client_ep(), &ids, &opts());
    assert_eq!(verdict(&p, id24, Direction::Egress, TCP, 443), "allow");
    // CIDR rules never match cluster identities
    assert_eq!(verdict(&p, SERVER, Direction::Egress, TCP, 443), "drop");
}

#[test]
fn world_cidr_default_route() {
    let p = resolve(
        "
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toCIDR: [0.0.0.0/0]
",
        &client_ep(),
    );
    assert_eq!(
        verdict(&p, Identity::WORLD, Direction::Egress, TCP, 1),
        "allow"
    );
    assert_eq!(
        verdict(&p, Identity::WORLD_IPV4, Direction::Egress, TCP, 1),
        "allow"
    );
    assert_eq!(verdict(&p, SERVER, Direction::Egress, TCP, 1), "drop");
}

#[test]
fn fqdn_policy_and_dns_proxy() {
    let yaml = "
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: fqdn}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints:
    - matchLabels:
        k8s:io.kubernetes.pod.namespace: kube-system
        k8s:k8s-app: kube-dns
    toPorts:
    - ports: [{port: '53', protocol: ANY}]
      rules:
        dns: [{matchPattern: '*.cilium.io'}]
  - toFQDNs: [{matchPattern: '*.cilium.io'}, {matchName: api.example.com}]
    toPorts: [{ports: [{port: '443', protocol: TCP}]}]
";
    let mut ids = identities();
    let sel = FqdnSelectorAlias::pattern("*.cilium.io").unwrap();
    let learned = Identity(0x0100_0001);
    ids.insert(learned, crate::identity::fqdn_identity_labels([&sel]));
    let p = resolve_endpoint(&repo(yaml), &client_ep(), &ids, &opts());
    assert_eq!(
        verdict(&p, KUBE_DNS, Direction::Egress, UDP, 53),
        "redirect"
    );
    assert_eq!(
        verdict(&p, KUBE_DNS, Direction::Egress, TCP, 53),
        "redirect"
    );
    assert_eq!(
        p.lookup(KUBE_DNS, Direction::Egress, UDP, 53)
            .unwrap()
            .proxy_port,
        DNS_PORT
    );
    assert_eq!(verdict(&p, learned, Direction::Egress, TCP, 443), "allow");
    assert_eq!(verdict(&p, learned, Direction::Egress, TCP, 80), "drop");
    assert_eq!(
        verdict(&p, Identity::WORLD, Direction::Egress, TCP, 443),
        "drop"
    );
    let dns: Vec<&L7RuleSet> = p.l7_for(Direction::Egress, UDP, 53).collect();
    assert_eq!(dns.len(), 1);
    assert_eq!(dns[0].parser, L7Parser::Dns);
    assert_eq!(
        dns[0].rules[0].remote,
        RemoteIdentities::Set([KUBE_DNS].into())
    );
    let L7Rules::Dns(pats) = &dns[0].rules[0].rules else {
        panic!()
    };
    let m = crate::fqdn::DnsMatcher::new(pats).unwrap();
    assert!(m.allows("www.cilium.io"));
    assert!(!m.allows("cilium.io"));
}

use crate::fqdn::FqdnSelector as FqdnSelectorAlias;

#[test]
fn named_ports() {
    let yaml = "
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {}
  ingress:
  - toPorts: [{ports: [{port: http-alt, protocol: TCP}]}]
  egress:
  - toPorts: [{ports: [{port: dns}]}]
";
    let ep = server_ep().with_named_port("http-alt", Protocol::Tcp, 8080);
    let mut o = opts();
    o.egress_named_ports.insert(
        "dns".into(),
        [(Protocol::Udp, 53), (Protocol::Tcp, 53)].into(),
    );
    let p = resolve_endpoint(&repo(yaml), &ep, &identities(), &o);
    assert_eq!(verdict(&p, CLIENT, Direction::Ingress, TCP, 8080), "allow");
    assert_eq!(verdict(&p, CLIENT, Direction::Egress, UDP, 53), "allow");
    assert_eq!(verdict(&p, CLIENT, Direction::Egress, TCP, 53), "allow");
    // unresolvable: warning, nothing allowed
    let p = resolve_endpoint(&repo(yaml), &server_ep(), &identities(), &opts());
    assert_eq!(verdict(&p, CLIENT, Direction::Ingress, TCP, 8080), "drop");
    assert_eq!(p.warnings.len(), 2, "{:?}", p.warnings);
}

#[test]
fn host_policy_applies_to_host_endpoint_only() {
    let yaml = "
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: host}
spec:
  nodeSelector: {}
  ingress:
  - fromEntities: [remote-node]
";
    let host = EndpointInfo::new(
        9,
        labels(&["reserved:host", "k8s:kubernetes.io/hostname=n1"]),
    );
    let p = resolve(yaml, &host);
    assert!(p.enforce_ingress);
    assert_eq!(
        verdict(&p, Identity::REMOTE_NODE, Direction::Ingress, TCP, 22),
        "allow"
    );
    assert_eq!(
        verdict(&p, Identity::WORLD, Direction::Ingress, TCP, 22),
        "drop"
    );
    let p = resolve(yaml, &server_ep());
    assert!(!p.enforce_ingress);
}

#[test]
fn broader_higher_precedence_wins_within_bucket() {
    // a redirect on 80-81 and a plain allow on 80 for the same peer: proxied
    let p = resolve(
        "
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: '80', endPort: 81, protocol: TCP}]
      rules: {http: [{}]}
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: '80', protocol: TCP}]}]
  - fromEndpoints: [{matchLabels: {app: client}}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: '9000', endPort: 9999, protocol: TCP}]}]
",
        &server_ep(),
    );
    assert_eq!(verdict(&p, CLIENT, Direction::Ingress, TCP, 80), "redirect");
    assert_eq!(verdict(&p, CLIENT, Direction::Ingress, TCP, 81), "redirect");
    assert_eq!(verdict(&p, CLIENT, Direction::Ingress, TCP, 82), "allow");
    assert_eq!(verdict(&p, CLIENT, Direction::Ingress, TCP, 9500), "deny");
    // the narrower plain allow on 80 is redundant and not emitted
    assert!(!p.entries.keys().any(|k| k.identity == CLIENT
        && k.protocol == TCP
        && k.port_prefix_len == 16
        && k.port == 80));
}

/// Every key's verdict equals the maximum over all contributions that cover it, for a mix
/// of rules (checks the propagation invariant by brute force over ports).
#[test]
fn lookup_matches_brute_force_maximum() {
    let yaml = "
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: '100', endPort: 300, protocol: TCP}]}]
  - toPorts: [{ports: [{port: '150', endPort: 160, protocol: TCP}], rules: {http: [{path: /x}]}}]
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: '155', protocol: TCP}], rules: {http: [{}]}}]
  ingressDeny:
  - toPorts: [{ports: [{port: '158', endPort: 170, protocol: TCP}]}]
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: '290', endPort: 400, protocol: TCP}]}]
";
    let p = resolve(yaml, &server_ep());
    for port in 90..410u16 {
        let want = if (158..=170).contains(&port) || (290..=400).contains(&port) {
            "deny"
        } else if (150..=160).contains(&port) {
            "redirect"
        } else if (100..=300).contains(&port) {
            "allow"
        } else {
            "drop"
        };
        assert_eq!(
            verdict(&p, CLIENT, Direction::Ingress, TCP, port),
            want,
            "client port {port}"
        );
        let other = if (158..=170).contains(&port) {
            "deny"
        } else if (150..=160).contains(&port) {
            "redirect"
        } else {
            "drop"
        };
        assert_eq!(
            verdict(&p, OTHER_NS, Direction::Ingress, TCP, port),
            other,
            "other port {port}"
        );
    }
}

#[test]
fn diff_reports_added_changed_removed() {
    let old = resolve(SERVER_ALLOWS, &server_ep());
    let with_deny = format!(
        "{SERVER_ALLOWS}  ingressDeny:\n  - fromEndpoints: [{{matchLabels: {{app: client}}}}]\n    toPorts:\n    - ports: [{{port: '81', protocol: TCP}}]\n"
    );
    let new = resolve(&with_deny, &server_ep());
    let d = diff(&old, &new);
    assert!(!d.is_empty());
    let mut applied = old.entries.clone();
    d.apply_to(&mut applied);
    assert_eq!(applied, new.entries);
    assert!(diff(&new, &new).is_empty());
    // the allow on 81 became a deny
    let k81 = PolicyKey {
        identity: CLIENT,
        direction: Direction::Ingress,
        protocol: TCP,
        port: 81,
        port_prefix_len: 16,
    };
    assert_eq!(
        d.added.get(&k81).or(d.changed.get(&k81)).map(|e| e.action),
        Some(Action::Deny)
    );
}

#[test]
fn entities_map_to_reserved_identities() {
    let ids = identities();
    let selected = |e: Entity, cluster: &str| -> BTreeSet<u32> {
        let sels = entity_selectors(e, cluster);
        ids.iter()
            .filter(|(_, l)| sels.iter().any(|s| s.matches(l)))
            .map(|(id, _)| id.0)
            .collect()
    };
    assert_eq!(selected(Entity::World, "default"), [2, 9, 10].into());
    assert_eq!(selected(Entity::Host, "default"), [1].into());
    assert_eq!(selected(Entity::RemoteNode, "default"), [6].into());
    assert_eq!(selected(Entity::KubeApiserver, "default"), [7].into());
    assert_eq!(selected(Entity::Ingress, "default"), [8].into());
    assert_eq!(selected(Entity::Health, "default"), [4].into());
    assert_eq!(selected(Entity::Init, "default"), [5].into());
    assert_eq!(selected(Entity::Unmanaged, "default"), [3].into());
    assert_eq!(selected(Entity::None, "default"), BTreeSet::new());
    assert_eq!(selected(Entity::All, "default").len(), ids.len());
    assert_eq!(
        selected(Entity::Cluster, "default"),
        [1, 3, 4, 5, 6, 7, 8, 256, 257, 258, 259].into()
    );
    assert_eq!(
        selected(Entity::Cluster, "east"),
        [1, 3, 4, 5, 6, 7, 8].into()
    );
}

mod diff_props {
    use super::*;
    use proptest::prelude::*;

    fn entries() -> impl Strategy<Value = BTreeMap<PolicyKey, PolicyEntry>> {
        proptest::collection::btree_map(
            (0u32..3, 0u16..4).prop_map(|(id, port)| PolicyKey {
                identity: Identity(id),
                direction: Direction::Ingress,
                protocol: 6,
                port,
                port_prefix_len: 16,
            }),
            prop::sample::select(vec![
                PolicyEntry::allow(1),
                PolicyEntry::deny(1),
                PolicyEntry::redirect(15001, 2),
            ]),
            0..8,
        )
    }

    proptest! {
        /// diff(a, b) applied to a gives b; merged diffs compose.
        #[test]
        fn diff_apply_and_merge(a in entries(), b in entries(), c in entries()) {
            let d1 = diff_entries(&a, &b);
            let mut x = a.clone();
            d1.apply_to(&mut x);
            prop_assert_eq!(&x, &b);
            let mut m = d1.clone();
            m.merge(diff_entries(&b, &c));
            let mut y = a.clone();
            m.apply_to(&mut y);
            prop_assert_eq!(&y, &c);
            // a merged diff never lists a key twice
            for k in m.added.keys() {
                prop_assert!(!m.changed.contains_key(k) && !m.removed.contains_key(k));
            }
            for k in m.changed.keys() {
                prop_assert!(!m.removed.contains_key(k));
            }
        }
    }
}

/// `serverNames` on egress: a TLS rule set redirected to the HTTP proxy port; an L4-only
/// allow of the same port for the same peer is the L7 wildcard (any connection); a TLS
/// rule set and an HTTP rule set on one port follow the "different types" warning path.
#[test]
fn server_names_resolve_to_a_tls_rule_set_on_the_http_proxy_port() {
    let p = resolve(
        "
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: tls}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {app: server}}]
    toPorts:
    - ports: [{port: '443', protocol: TCP}]
      serverNames: [api.example.com, '*.cdn.example.com']
  - toEndpoints: [{matchLabels: {app: server}}]
    toPorts:
    - ports: [{port: '443', protocol: TCP}]
      serverNames: [other.example.com]
  - toEndpoints: [{matchLabels: {k8s-app: kube-dns, k8s:io.kubernetes.pod.namespace: kube-system}}]
    toPorts:
    - ports: [{port: '443', protocol: TCP}]
",
        &client_ep(),
    );
    let e = p.lookup(SERVER, Direction::Egress, TCP, 443).unwrap();
    assert_eq!(
        (e.action, e.proxy_port, e.precedence),
        (Action::Redirect, HTTP_PORT, PRECEDENCE_REDIRECT)
    );
    // An L4-only peer that no TLS rule names is a plain allow (never proxied).
    let e = p.lookup(KUBE_DNS, Direction::Egress, TCP, 443).unwrap();
    assert_eq!((e.action, e.proxy_port), (Action::Allow, 0));
    assert_eq!(verdict(&p, OTHER_NS, Direction::Egress, TCP, 443), "drop");
    let sets: Vec<&L7RuleSet> = p.l7_for(Direction::Egress, TCP, 443).collect();
    assert_eq!(sets.len(), 1);
    let set = sets[0];
    assert_eq!(
        (set.parser, set.proxy_port, set.port, set.end_port),
        (L7Parser::Tls, HTTP_PORT, 443, 443)
    );
    // Both name lists for the server (OR'ed by the proxy), the wildcard for kube-dns.
    let names = |id: Identity| -> Vec<String> {
        set.rules
            .iter()
            .filter(|r| r.remote.contains(id))
            .flat_map(|r| match &r.rules {
                L7Rules::Tls(names) if names.is_empty() => vec!["<any>".to_owned()],
                L7Rules::Tls(names) => names.iter().map(ToString::to_string).collect(),
                other => panic!("not a TLS rule: {other:?}"),
            })
            .collect()
    };
    assert_eq!(
        names(SERVER),
        ["api.example.com", "*.cdn.example.com", "other.example.com"]
    );
    assert_eq!(names(KUBE_DNS), ["<any>"]);
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);

    // The same peer with an L4-only allow too: it passes the proxy through the wildcard.
    let p = resolve(
        "
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: tls}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {app: server}}]
    toPorts:
    - ports: [{port: '443', protocol: TCP}]
      serverNames: [api.example.com]
  - toEntities: [cluster]
    toPorts:
    - ports: [{port: '443', protocol: TCP}]
",
        &client_ep(),
    );
    let e = p.lookup(SERVER, Direction::Egress, TCP, 443).unwrap();
    assert_eq!((e.action, e.proxy_port), (Action::Redirect, HTTP_PORT));
    let set = p.l7_for(Direction::Egress, TCP, 443).next().unwrap();
    assert!(
        set.rules
            .iter()
            .any(|r| r.remote.contains(SERVER) && r.rules == L7Rules::Tls(vec![]))
    );

    // TLS and HTTP rule sets on one port: one type wins, the other is dropped with a warning.
    let p = resolve(
        "
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: mixed}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {app: server}}]
    toPorts:
    - ports: [{port: '443', protocol: TCP}]
      serverNames: [api.example.com]
  - toEndpoints: [{matchLabels: {app: server}}]
    toPorts:
    - ports: [{port: '443', protocol: TCP}]
      rules: {http: [{method: GET}]}
",
        &client_ep(),
    );
    let set = p.l7_for(Direction::Egress, TCP, 443).next().unwrap();
    assert_eq!(set.parser, L7Parser::Http);
    assert!(
        set.rules
            .iter()
            .all(|r| matches!(r.rules, L7Rules::Http(_)))
    );
    assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
    assert!(
        p.warnings[0].contains("L7 rules of different types") && p.warnings[0].contains("Tls"),
        "{}",
        p.warnings[0]
    );
}
