//! Policy resolution at the scale of the design target (DESIGN.md §8: full resolve of 10k
//! identities × 1k rules < 1 s; an incremental change < 10 ms):
//!
//! - `full_resolve`: one endpoint selected by 1000 rules (L3/L4, port ranges, deny, HTTP
//!   L7, CIDR), resolved from scratch against 10k identities (`resolve_endpoint`); and
//!   against the reserved identities only, which isolates the rule-compilation share.
//! - `incremental/policy_add_remove`: a [`Resolver`] holding that state plus 9 endpoints
//!   the rules do not select; one policy selecting the big endpoint is added, then removed.
//!   A policy change recompiles the rules of exactly the endpoints the policy selects (so
//!   this is the worst case for one policy: all 1000 rules are recompiled) but
//!   recomputes only the entries of identities its peers select, looked up in the
//!   resolver's selector cache. Its peer selector is one other rules use too (cached).
//! - `incremental/policy_add_remove_new_selector`: the same with a peer selector no rule
//!   uses: adding it matches the selector against every identity once (and removing the
//!   policy drops it from the cache).
//! - `incremental/identity_add_remove`: one identity (a new pod) appears and disappears;
//!   only that identity's entries are recomputed in every endpoint.
//!
//! Run: `cargo bench -p membrane-policy` (add `-- --quick` for a short run). Numbers are
//! machine-dependent; compare runs on one machine (tests/perf does side-by-side runs).

use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use membrane_policy::{
    Change, EndpointInfo, Identity, IdentityAllocator, IdentitySet, Labels, LocalAllocator, Policy,
    Repository, ResolveOptions, Resolver, parse_documents, resolve_endpoint,
};

const RULES: usize = 1000;
const IDENTITIES: u32 = 10_000;
const CLIENT_APPS: usize = 2000;

/// 1000 single-rule policies selecting `app: server`, a mix of what real clusters use.
fn policies_yaml() -> String {
    let mut y = String::new();
    for i in 0..RULES {
        let peer = format!("[{{matchLabels: {{app: client-{}}}}}]", i % CLIENT_APPS);
        let body = match i % 10 {
            // HTTP L7 on a shared port: many peers, one proxied port
            0 => format!(
                "  ingress:\n  - fromEndpoints: {peer}\n    toPorts:\n    - ports: [{{port: '8080', protocol: TCP}}]\n      rules: {{http: [{{method: GET, path: '/api/{i}/.*'}}]}}\n"
            ),
            // deny
            1 => format!(
                "  ingressDeny:\n  - fromEndpoints: {peer}\n    toPorts: [{{ports: [{{port: '{}', protocol: TCP}}]}}]\n",
                9000 + i
            ),
            // port range (several LPM prefixes)
            2 => format!(
                "  ingress:\n  - fromEndpoints: {peer}\n    toPorts: [{{ports: [{{port: '{}', endPort: {}, protocol: TCP}}]}}]\n",
                20_000 + i,
                20_000 + i + 100
            ),
            // egress to a CIDR with an exception
            3 => format!(
                "  egress:\n  - toCIDRSet: [{{cidr: 10.{}.0.0/16, except: [10.{}.1.0/24]}}]\n    toPorts: [{{ports: [{{port: '443', protocol: TCP}}]}}]\n",
                i % 250,
                i % 250
            ),
            // plain L3/L4
            _ => format!(
                "  ingress:\n  - fromEndpoints: {peer}\n    toPorts: [{{ports: [{{port: '{}', protocol: TCP}}]}}]\n",
                1000 + i
            ),
        };
        y.push_str(&format!(
            "---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p{i}, namespace: default}}\nspec:\n  endpointSelector: {{matchLabels: {{app: server}}}}\n{body}"
        ));
    }
    y
}

fn labels(items: &[&str]) -> Labels {
    Labels::parse(items.iter().copied()).expect("static labels")
}

fn pod(app: &str, n: u32) -> Labels {
    labels(&[
        &format!("k8s:app={app}"),
        "k8s:io.kubernetes.pod.namespace=default",
        "k8s:io.cilium.k8s.policy.cluster=default",
        &format!("k8s:pod-name=p{n}"),
    ])
}

struct Setup {
    repo: Repository,
    ids: IdentitySet,
    server: EndpointInfo,
    others: Vec<EndpointInfo>,
    opts: ResolveOptions,
    /// Selects the server, from a peer selector rule p7 uses too.
    extra_policy: Policy,
    /// Selects the server, from a peer selector no rule uses (client apps ≥ RULES exist
    /// as identities but no rule names them).
    new_selector_policy: Policy,
}

/// A one-rule policy `name` allowing `app: <client>` to the server on TCP 7777.
fn extra(name: &str, client: &str) -> Policy {
    parse_documents(
        &format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  endpointSelector: {{matchLabels: {{app: server}}}}\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: {client}}}}}]\n    toPorts: [{{ports: [{{port: '7777', protocol: TCP}}]}}]\n"
        ),
        name,
    )
    .expect("extra policy parses")
    .remove(0)
}

fn setup() -> Setup {
    let mut repo = Repository::new();
    for p in parse_documents(&policies_yaml(), "bench").expect("bench policies parse") {
        repo.add(p).expect("unique names");
    }
    let mut alloc = LocalAllocator::new();
    let mut ids = IdentitySet::with_reserved();
    for n in 0..IDENTITIES {
        let l = pod(&format!("client-{}", n as usize % CLIENT_APPS), n);
        let id = alloc.allocate(&l).expect("cluster range");
        ids.insert(id, l);
    }
    ids.ensure_cidr_identities(repo.cidr_prefixes(), &mut alloc)
        .expect("local range");
    let server = EndpointInfo::new(1, pod("server", 0));
    let others = (2..=10)
        .map(|id| EndpointInfo::new(id, pod(&format!("other-{id}"), 0)))
        .collect();
    let extra_policy = extra("extra", "client-7");
    let new_selector_policy = extra("extra-new-selector", &format!("client-{}", RULES + 7));
    Setup {
        repo,
        ids,
        server,
        others,
        opts: ResolveOptions::new(15001, 15053),
        extra_policy,
        new_selector_policy,
    }
}

fn resolver(s: &Setup) -> Resolver {
    let mut r = Resolver::new(s.opts.clone(), s.ids.clone());
    for p in s.repo.iter() {
        r.apply(Change::UpsertPolicy(p.clone()));
    }
    r.apply(Change::UpsertEndpoint(s.server.clone()));
    for e in &s.others {
        r.apply(Change::UpsertEndpoint(e.clone()));
    }
    r
}

fn benches(c: &mut Criterion) {
    let s = setup();
    let entries = resolve_endpoint(&s.repo, &s.server, &s.ids, &s.opts)
        .entries
        .len();
    eprintln!(
        "setup: {RULES} rules, {} identities, {entries} policy-map entries for the server endpoint",
        s.ids.len()
    );

    let mut g = c.benchmark_group("full_resolve");
    g.sample_size(10);
    g.bench_function("10k_identities_x_1k_rules", |b| {
        b.iter(|| resolve_endpoint(black_box(&s.repo), &s.server, &s.ids, &s.opts));
    });
    // The same rules against the reserved identities only: the rule-compilation share of
    // the full resolve (the rest is matching selectors against every identity).
    let reserved = IdentitySet::with_reserved();
    g.bench_function("reserved_identities_x_1k_rules", |b| {
        b.iter(|| resolve_endpoint(black_box(&s.repo), &s.server, &reserved, &s.opts));
    });
    g.finish();

    let mut g = c.benchmark_group("incremental");
    g.sample_size(10);
    let mut r = resolver(&s);
    let key = s.extra_policy.policy_ref();
    g.bench_function("policy_add_remove", |b| {
        b.iter(|| {
            let added = r.apply(Change::UpsertPolicy(s.extra_policy.clone()));
            let removed = r.apply(Change::RemovePolicy(key.clone()));
            black_box((added, removed))
        });
    });
    let key = s.new_selector_policy.policy_ref();
    g.bench_function("policy_add_remove_new_selector", |b| {
        b.iter(|| {
            let added = r.apply(Change::UpsertPolicy(s.new_selector_policy.clone()));
            let removed = r.apply(Change::RemovePolicy(key.clone()));
            black_box((added, removed))
        });
    });
    let new_pod = pod("client-7", IDENTITIES + 1);
    let new_id = Identity(Identity::FIRST_CLUSTER + IDENTITIES + 1);
    g.bench_function("identity_add_remove", |b| {
        b.iter_batched(
            || new_pod.clone(),
            |l| {
                let added = r.apply(Change::UpsertIdentity(new_id, l));
                let removed = r.apply(Change::RemoveIdentity(new_id));
                black_box((added, removed))
            },
            BatchSize::SmallInput,
        );
    });
    g.finish();
}

criterion_group!(resolve, benches);
criterion_main!(resolve);
