//! Tests of the service model: parsing and validation errors naming the field, the
//! repository's conflict handling, and the desired state (ports, states, scopes, affinity).

use std::net::Ipv4Addr;

use super::*;

fn parse(text: &str) -> Result<Vec<ServiceResource>, ServiceError> {
    parse_service_documents(text, "test.yaml", &ServiceParseOptions::default())
}

fn parse_err(text: &str) -> (String, String) {
    match parse(text) {
        Err(ServiceError::Invalid { path, message, .. }) => (path, message),
        other => panic!("expected a validation error, got {other:?}"),
    }
}

const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  ports:
  - {name: http, port: 80, targetPort: web}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: [10.200.0.12]
  conditions: {ready: true}
  nodeName: node-a
- addresses: [10.200.0.11]
  nodeName: node-b
- addresses: [10.200.0.13]
  conditions: {ready: false, serving: true, terminating: true}
  nodeName: node-a
- addresses: [10.200.0.14]
  conditions: {ready: false}
  nodeName: node-a
"#;

fn repo(text: &str) -> ServiceRepository {
    let mut repo = ServiceRepository::new();
    repo.apply(parse(text).expect("parse")).expect("apply");
    repo
}

#[test]
fn cluster_ip_with_named_ports_and_states() {
    let state = repo(WEB).desired_state(&LbOptions::default());
    assert_eq!(state.frontends.len(), 2);
    let http = state
        .frontends
        .iter()
        .find(|f| f.protocol == L4Protocol::Tcp)
        .expect("http frontend");
    assert_eq!(
        (http.address, http.port),
        (Ipv4Addr::new(10, 96, 0, 20), 80)
    );
    assert_eq!(http.kind, FrontendKind::ClusterIP);
    assert_eq!(http.port_name.as_deref(), Some("http"));
    let backends: Vec<(Ipv4Addr, u16, BackendState)> = http
        .backends
        .iter()
        .map(|b| (b.address, b.port, b.state))
        .collect();
    assert_eq!(
        backends,
        vec![
            (Ipv4Addr::new(10, 200, 0, 11), 8080, BackendState::Active),
            (Ipv4Addr::new(10, 200, 0, 12), 8080, BackendState::Active),
            (
                Ipv4Addr::new(10, 200, 0, 13),
                8080,
                BackendState::Terminating
            ),
            (
                Ipv4Addr::new(10, 200, 0, 14),
                8080,
                BackendState::Quarantined
            ),
        ],
        "the slice port of the same name; active first; nil ready = active"
    );
    assert_eq!(http.active_count(), 2);
    let dns = state
        .frontends
        .iter()
        .find(|f| f.protocol == L4Protocol::Udp)
        .expect("dns frontend");
    assert_eq!(dns.backends[0].port, 5353);
}

#[test]
fn a_service_without_slices_has_frontends_without_backends() {
    let text = WEB.split("---").next().expect("service");
    let state = repo(text).desired_state(&LbOptions::default());
    assert_eq!(state.frontends.len(), 2);
    assert!(state.frontends.iter().all(|f| f.backends.is_empty()));
}

#[test]
fn nodeport_external_ip_load_balancer_and_traffic_policies() {
    let text = r#"
apiVersion: v1
kind: Service
metadata: {name: api}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.30
  externalIPs: [192.0.2.7]
  externalTrafficPolicy: Local
  sessionAffinity: ClientIP
  ports: [{port: 443, targetPort: 8443, nodePort: 30443}]
status:
  loadBalancer:
    ingress: [{ip: 198.51.100.1}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-1, labels: {kubernetes.io/service-name: api}}
addressType: IPv4
ports: [{port: 8443}]
endpoints:
- {addresses: [10.0.0.1], nodeName: node-a}
- {addresses: [10.0.0.2], nodeName: node-b}
"#;
    let opts = LbOptions {
        node_name: Some("node-a".into()),
    };
    let state = repo(text).desired_state(&opts);
    let describe: Vec<(String, FrontendKind, LbScope, bool, usize)> = state
        .frontends
        .iter()
        .map(|f| {
            (
                f.to_string(),
                f.kind,
                f.scope,
                f.two_scopes,
                f.backends.len(),
            )
        })
        .collect();
    assert_eq!(
        describe,
        vec![
            (
                "0.0.0.0:30443/TCP".into(),
                FrontendKind::NodePort,
                LbScope::External,
                true,
                1
            ),
            (
                "0.0.0.0:30443/TCP/i".into(),
                FrontendKind::NodePort,
                LbScope::Internal,
                false,
                2
            ),
            (
                "10.96.0.30:443/TCP".into(),
                FrontendKind::ClusterIP,
                LbScope::External,
                false,
                2
            ),
            (
                "192.0.2.7:443/TCP".into(),
                FrontendKind::ExternalIP,
                LbScope::External,
                true,
                1
            ),
            (
                "192.0.2.7:443/TCP/i".into(),
                FrontendKind::ExternalIP,
                LbScope::Internal,
                false,
                2
            ),
            (
                "198.51.100.1:443/TCP".into(),
                FrontendKind::LoadBalancer,
                LbScope::External,
                true,
                1
            ),
            (
                "198.51.100.1:443/TCP/i".into(),
                FrontendKind::LoadBalancer,
                LbScope::Internal,
                false,
                2
            ),
        ],
        "eTP=Local: external scopes hold node-a's backend, internal ones all"
    );
    assert!(
        state
            .frontends
            .iter()
            .all(|f| f.affinity_timeout_secs == Some(DEFAULT_AFFINITY_TIMEOUT_SECS))
    );
}

#[test]
fn internal_traffic_policy_local_filters_the_cluster_ip() {
    let text = WEB.replace(
        "  clusterIP: 10.96.0.20\n",
        "  clusterIP: 10.96.0.20\n  internalTrafficPolicy: Local\n",
    );
    let opts = LbOptions {
        node_name: Some("node-b".into()),
    };
    let state = repo(&text).desired_state(&opts);
    let http = &state.frontends[0];
    assert!(http.local_only);
    assert_eq!(http.backends.len(), 1);
    assert_eq!(http.backends[0].address, Ipv4Addr::new(10, 200, 0, 11));
}

#[test]
fn affinity_timeout_is_read_and_bounded() {
    let svc = |extra: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s}}\nspec:\n  clusterIP: 10.96.0.1\n  ports: [{{port: 80}}]\n{extra}"
        )
    };
    let parsed = parse(&svc(
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n",
    ))
    .expect("parse");
    let ServiceResource::Service(s) = &parsed[0] else {
        panic!("service")
    };
    assert_eq!(s.affinity_timeout_secs, Some(60));
    let (path, _) = parse_err(&svc(
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 90000}}\n",
    ));
    assert_eq!(path, "spec.sessionAffinityConfig.clientIP.timeoutSeconds");
    let (path, _) = parse_err(&svc(
        "  sessionAffinityConfig: {clientIP: {timeoutSeconds: 5}}\n",
    ));
    assert_eq!(path, "spec.sessionAffinityConfig");
}

#[test]
fn errors_name_the_field() {
    let base = |ports: &str, extra: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s}}\nspec:\n  clusterIP: 10.96.0.1\n{extra}  ports:\n{ports}"
        )
    };
    let cases: Vec<(String, &str, &str)> = vec![
        (
            base("  - {name: a, port: 80}\n  - {name: b, port: 80}\n", ""),
            "spec.ports[1].port",
            "duplicate frontend port 80/TCP",
        ),
        (
            base("  - {port: 70000}\n", ""),
            "spec.ports[0].port",
            "out of range",
        ),
        (
            base("  - {port: 80, nodePort: 8080}\n", "  type: NodePort\n"),
            "spec.ports[0].nodePort",
            "outside the NodePort range 30000-32767",
        ),
        (
            base("  - {port: 80, nodePort: 30080}\n", ""),
            "spec.ports[0].nodePort",
            "may not be used",
        ),
        (
            base("  - {port: 80}\n", "  type: Balanced\n"),
            "spec.type",
            "unknown type `Balanced`",
        ),
        (
            base("  - {port: 80}\n  - {port: 81}\n", ""),
            "spec.ports[0].name",
            "required when the service has more than one port",
        ),
        (
            base("  - {port: 80, protocol: SCTP}\n", ""),
            "spec.ports[0].protocol",
            "SCTP",
        ),
        (
            base("  - {port: 80}\n", "  loadBalancerSourceRanges: [10.0.0.0/8]\n"),
            "spec.loadBalancerSourceRanges",
            "not supported",
        ),
        (
            base("  - {port: 80, colour: red}\n", ""),
            "spec.ports[0].colour",
            "unknown field",
        ),
        (
            base(
                "  - {name: a, port: 80, nodePort: 30001}\n  - {name: b, port: 81, nodePort: 30001}\n",
                "  type: NodePort\n",
            ),
            "spec.ports[1].nodePort",
            "duplicate nodePort 30001/TCP",
        ),
        (
            base("  - {port: 80}\n", "  type: NodePort\n"),
            "spec.ports[0].nodePort",
            "required for type NodePort",
        ),
        (
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: x}\naddressType: IPv4\nendpoints: []\n".into(),
            "metadata.labels.kubernetes.io/service-name",
            "missing",
        ),
        (
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: x, labels: {kubernetes.io/service-name: s}}\naddressType: IPv4\nendpoints: [{addresses: [10.0.0.300]}]\n".into(),
            "endpoints[0].addresses[0]",
            "not an IPv4 address",
        ),
        (
            "apiVersion: v2\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80}]}\n".into(),
            "apiVersion",
            "unsupported apiVersion",
        ),
    ];
    for (text, want_path, want_msg) in cases {
        let (path, message) = parse_err(&text);
        assert_eq!(path, want_path, "for {text}");
        assert!(
            message.contains(want_msg),
            "{message:?} should contain {want_msg:?}"
        );
    }
}

#[test]
fn conflicting_frontends_are_refused_and_change_nothing() {
    let mut repo = repo(WEB);
    let other = r#"
apiVersion: v1
kind: Service
metadata: {name: copy, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  ports: [{port: 80}]
"#;
    let before = repo.desired_state(&LbOptions::default());
    let err = repo
        .apply(parse(other).expect("parse"))
        .expect_err("conflict");
    match &err {
        ServiceError::FrontendConflict {
            field,
            frontend,
            other,
            ..
        } => {
            assert_eq!(field, "spec.ports[0] with spec.clusterIP 10.96.0.20");
            assert_eq!(frontend, "10.96.0.20:80/TCP");
            assert_eq!(other, "shop/web");
        }
        e => panic!("unexpected {e}"),
    }
    assert_eq!(repo.desired_state(&LbOptions::default()), before);
    // Replacing the same service is not a conflict.
    repo.apply(parse(WEB).expect("parse")).expect("re-apply");
}

#[test]
fn json_and_lists_parse() {
    let text = r#"{"apiVersion":"v1","kind":"List","items":[
      {"apiVersion":"v1","kind":"Service","metadata":{"name":"kube-dns","namespace":"kube-system"},
       "spec":{"clusterIP":"10.96.0.10","ports":[{"name":"dns","port":53,"protocol":"UDP"},{"name":"dns-tcp","port":53}]}}]}"#;
    let parsed = parse(text).expect("parse");
    let ServiceResource::Service(s) = &parsed[0] else {
        panic!("service")
    };
    assert_eq!(s.name.to_string(), "kube-system/kube-dns");
    assert_eq!(s.ports.len(), 2);
}

#[test]
fn headless_and_external_name_have_no_frontends() {
    let text = r#"
apiVersion: v1
kind: Service
metadata: {name: db}
spec: {clusterIP: None, ports: [{port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext}
spec: {type: ExternalName, externalName: example.com}
"#;
    assert!(
        repo(text)
            .desired_state(&LbOptions::default())
            .frontends
            .is_empty()
    );
}

#[test]
fn maglev_table_over_the_active_backends() {
    let state = repo(WEB).desired_state(&LbOptions::default());
    let http = &state.frontends[0];
    let table = http
        .maglev_table(&maglev::MaglevConfig::default())
        .expect("table");
    assert_eq!(table.len(), maglev::DEFAULT_TABLE_SIZE as usize);
    assert!(table.iter().all(|&i| (i as usize) < http.active_count()));
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Any port, nodePort and timeout numbers: either accepted with the same values
        /// inside their ranges, or refused with an error that names the field. Never a panic.
        #[test]
        fn numbers_are_range_checked(
            port in any::<i64>(),
            node_port in any::<i64>(),
            timeout in any::<i64>(),
        ) {
            let text = format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.1\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {timeout}}}}}\n  ports: [{{port: {port}, nodePort: {node_port}}}]\n"
            );
            match parse(&text) {
                Ok(parsed) => {
                    let ServiceResource::Service(s) = &parsed[0] else { panic!("service") };
                    prop_assert!((1..=65535).contains(&port));
                    prop_assert_eq!(i64::from(s.ports[0].port), port);
                    prop_assert!((30000..=32767).contains(&node_port));
                    prop_assert_eq!(s.ports[0].node_port.map(i64::from), Some(node_port));
                    prop_assert!((1..=86400).contains(&timeout));
                }
                Err(ServiceError::Invalid { path, .. }) => {
                    prop_assert!(
                        path == "spec.ports[0].port"
                            || path == "spec.ports[0].nodePort"
                            || path == "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        "unexpected path {}", path
                    );
                }
                Err(other) => prop_assert!(false, "unexpected error {}", other),
            }
        }

        /// Arbitrary text never panics the parser.
        #[test]
        fn arbitrary_text_does_not_panic(text in ".{0,200}") {
            let _ = parse(&text);
        }
    }
}
