//! Scale smoke test (ignored by default; run with `--release -- --ignored --nocapture`):
//! prints how long a full resolve of 10k identities × 1k rules and one incremental
//! identity change take. No timing asserts (measure in benches, not tests).

use std::time::Instant;

use membrane_policy::{
    Change, EndpointInfo, Identity, IdentitySet, Labels, ResolveOptions, Resolver, parse_documents,
};

#[test]
#[ignore = "scale smoke run, prints timings"]
fn full_and_incremental_at_scale() {
    let mut yaml = String::new();
    for i in 0..1000 {
        yaml.push_str(&format!(
            "---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p{i}, namespace: default}}\nspec:\n  endpointSelector: {{matchLabels: {{app: server}}}}\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: client-{}}}}}]\n    toPorts: [{{ports: [{{port: '{}', protocol: TCP}}]}}]\n",
            i % 500,
            1000 + i
        ));
    }
    let t = Instant::now();
    let policies = parse_documents(&yaml, "scale").unwrap();
    println!("parse 1000 policies: {:?}", t.elapsed());
    let mut ids = IdentitySet::with_reserved();
    for i in 0..10_000u32 {
        let l = Labels::parse([
            format!("k8s:app=client-{}", i % 2000).as_str(),
            "k8s:io.kubernetes.pod.namespace=default",
            format!("k8s:pod=p{i}").as_str(),
        ])
        .unwrap();
        ids.insert(Identity(256 + i), l);
    }
    let mut r = Resolver::new(ResolveOptions::new(15001, 15053), ids);
    for p in policies {
        r.apply(Change::UpsertPolicy(p));
    }
    let ep = EndpointInfo::new(
        1,
        Labels::parse(["k8s:app=server", "k8s:io.kubernetes.pod.namespace=default"]).unwrap(),
    );
    let t = Instant::now();
    r.apply(Change::UpsertEndpoint(ep));
    println!(
        "full resolve 10k identities x 1k rules: {:?}, {} entries",
        t.elapsed(),
        r.endpoint_policy(1).map(|p| p.entries.len()).unwrap_or(0)
    );
    let t = Instant::now();
    let d = r.apply(Change::UpsertIdentity(
        Identity(20_000),
        Labels::parse([
            "k8s:app=client-7",
            "k8s:io.kubernetes.pod.namespace=default",
        ])
        .unwrap(),
    ));
    println!(
        "incremental identity add: {:?}, {} endpoint(s) changed",
        t.elapsed(),
        d.len()
    );
}
