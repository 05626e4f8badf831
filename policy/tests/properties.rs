//! Property tests over randomly generated policy sets (issue 3 acceptance):
//! - resolution does not depend on the order policies were added in;
//! - no allow overrides a matching deny, whatever the specificity of either.

use membrane_policy::{
    Action, Direction, EndpointInfo, IdentityAllocator as _, IdentitySet, Labels, LocalAllocator,
    Repository, ResolveOptions, parse_documents, resolve_endpoint,
};
use proptest::prelude::*;

const PORTS: [u16; 3] = [80, 443, 8080];
const PEERS: [&str; 3] = ["peer0", "peer1", "peer2"];

/// One generated rule: allow or deny, from one peer (or all peers of the namespace), on one
/// port (or every port).
#[derive(Clone, Debug)]
struct GenRule {
    deny: bool,
    peer: Option<usize>,
    port: Option<usize>,
}

fn rule() -> impl Strategy<Value = GenRule> {
    (
        any::<bool>(),
        proptest::option::of(0..PEERS.len()),
        proptest::option::of(0..PORTS.len()),
    )
        .prop_map(|(deny, peer, port)| GenRule { deny, peer, port })
}

fn policy_yaml(name: &str, rules: &[GenRule]) -> String {
    let mut allow = String::new();
    let mut deny = String::new();
    for r in rules {
        let peer = match r.peer {
            Some(p) => format!("    - matchLabels: {{app: {}}}\n", PEERS[p]),
            None => "    - {}\n".to_owned(),
        };
        let ports = match r.port {
            Some(p) => format!(
                "    toPorts:\n    - ports: [{{port: \"{}\", protocol: TCP}}]\n",
                PORTS[p]
            ),
            None => String::new(),
        };
        let item = format!("  - fromEndpoints:\n{peer}{ports}");
        if r.deny {
            deny.push_str(&item);
        } else {
            allow.push_str(&item);
        }
    }
    let mut yaml = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  endpointSelector:\n    matchLabels: {{app: target}}\n"
    );
    if !allow.is_empty() {
        yaml.push_str("  ingress:\n");
        yaml.push_str(&allow);
    }
    if !deny.is_empty() {
        yaml.push_str("  ingressDeny:\n");
        yaml.push_str(&deny);
    }
    yaml
}

struct World {
    identities: IdentitySet,
    target: Labels,
    peers: Vec<membrane_policy::Identity>,
}

fn world() -> World {
    let mut alloc = LocalAllocator::new();
    let mut identities = IdentitySet::with_reserved();
    let labels = |app: &str| {
        Labels::parse([
            format!("k8s:app={app}").as_str(),
            "k8s:io.kubernetes.pod.namespace=default",
        ])
        .expect("labels")
    };
    let target = labels("target");
    let id = alloc.allocate(&target).expect("allocate");
    identities.insert(id, target.clone());
    let mut peers = Vec::new();
    for p in PEERS {
        let l = labels(p);
        let id = alloc.allocate(&l).expect("allocate");
        identities.insert(id, l);
        peers.push(id);
    }
    World {
        identities,
        target,
        peers,
    }
}

fn resolve(world: &World, policies: &[String]) -> membrane_policy::EndpointPolicy {
    let mut repo = Repository::new();
    for text in policies {
        for p in parse_documents(text, "generated").expect("generated policies are valid") {
            repo.add(p).expect("distinct names");
        }
    }
    resolve_endpoint(
        &repo,
        &EndpointInfo::new(1, world.target.clone()),
        &world.identities,
        &ResolveOptions::new(15001, 15053),
    )
}

fn policy_set() -> impl Strategy<Value = Vec<Vec<GenRule>>> {
    proptest::collection::vec(proptest::collection::vec(rule(), 1..4), 1..4)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn resolution_does_not_depend_on_policy_order(set in policy_set(), seed in any::<u64>()) {
        let world = world();
        let texts: Vec<String> = set.iter().enumerate().map(|(i, rules)| policy_yaml(&format!("p{i}"), rules)).collect();
        let mut shuffled = texts.clone();
        // A deterministic permutation from the seed.
        let n = shuffled.len();
        for i in (1..n).rev() {
            let j = (seed.wrapping_mul(6364136223846793005).wrapping_add(i as u64) % (i as u64 + 1)) as usize;
            shuffled.swap(i, j);
        }
        shuffled.reverse();
        let a = resolve(&world, &texts);
        let b = resolve(&world, &shuffled);
        prop_assert_eq!(a.entries, b.entries);
        prop_assert_eq!(a.enforce_ingress, b.enforce_ingress);
    }

    #[test]
    fn no_allow_overrides_a_matching_deny(set in policy_set()) {
        let world = world();
        let texts: Vec<String> = set.iter().enumerate().map(|(i, rules)| policy_yaml(&format!("p{i}"), rules)).collect();
        let resolved = resolve(&world, &texts);
        for (peer_index, peer) in world.peers.iter().enumerate() {
            for (port_index, port) in PORTS.iter().enumerate() {
                let denied = set.iter().flatten().any(|r| {
                    r.deny
                        && r.peer.is_none_or(|p| p == peer_index)
                        && r.port.is_none_or(|p| p == port_index)
                });
                let allowed = set.iter().flatten().any(|r| {
                    !r.deny
                        && r.peer.is_none_or(|p| p == peer_index)
                        && r.port.is_none_or(|p| p == port_index)
                });
                let verdict = resolved.lookup(*peer, Direction::Ingress, 6, *port).map(|e| e.action);
                if denied {
                    prop_assert_eq!(verdict, Some(Action::Deny), "peer {} port {}", PEERS[peer_index], port);
                } else if allowed {
                    prop_assert_eq!(verdict, Some(Action::Allow), "peer {} port {}", PEERS[peer_index], port);
                } else {
                    // Default deny (some rule selects the endpoint): no entry at all.
                    prop_assert!(verdict.is_none() || verdict == Some(Action::Deny), "peer {} port {}: {:?}", PEERS[peer_index], port, verdict);
                }
            }
        }
    }
}
