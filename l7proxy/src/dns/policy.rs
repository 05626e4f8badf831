//! The DNS policy: which query names an endpoint may look up on which DNS server port.
//!
//! Owns the compiled form of Cilium `rules.dns` (cilium-semantics.md §1.10, §3.5 step 5):
//! per (endpoint or "any endpoint", port range, transport) a list of peer rules, each a
//! set of DNS-server identities plus one [`DnsMatcher`] built from the rule's
//! `matchName`/`matchPattern` selectors by `membrane-policy` (one `^(?:r1|r2|…)$` regex, or
//! match-anything for an empty list or a match-all pattern). A query is allowed if any
//! applicable peer rule selects the server's identity and its matcher accepts the query
//! name, lower-cased and made fully qualified first. The query type and every other field
//! of the message are ignored, as in Cilium. No applicable rule means denied: the proxy only
//! sees queries the datapath redirected because some DNS rule exists.
//!
//! Pure and immutable once built; the proxy swaps whole policies atomically
//! ([`crate::dns::DnsProxyHandle::set_policy`]).

use std::collections::HashMap;
use std::fmt;
use std::ops::RangeInclusive;

use membrane_policy::{
    Direction, DnsMatcher, FqdnSelector, Identity, L7Parser, L7RuleSet, L7Rules, RemoteIdentities,
};

/// The transport a query arrived on (and is forwarded over).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DnsTransport {
    Udp,
    Tcp,
}

impl DnsTransport {
    /// IANA protocol number (17 / 6), as policy rule sets carry it.
    pub fn protocol_number(self) -> u8 {
        match self {
            Self::Udp => 17,
            Self::Tcp => 6,
        }
    }
}

impl fmt::Display for DnsTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Udp => "UDP",
            Self::Tcp => "TCP",
        })
    }
}

/// Which endpoints a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EndpointScope {
    /// Every client (the standalone/test mode, or node-wide rules).
    Any,
    /// One endpoint by its numeric id.
    Endpoint(u64),
}

impl fmt::Display for EndpointScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("any endpoint"),
            Self::Endpoint(id) => write!(f, "endpoint {id}"),
        }
    }
}

/// The ports and transports a rule applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsPortMatch {
    /// Destination (DNS server) ports; `0..=65535` for any port.
    pub ports: RangeInclusive<u16>,
    /// `None` for both transports (Cilium's `protocol: ANY`).
    pub transport: Option<DnsTransport>,
}

impl DnsPortMatch {
    /// Any port, both transports.
    pub fn any() -> Self {
        Self {
            ports: 0..=u16::MAX,
            transport: None,
        }
    }

    /// One port, both transports (`port: "53"` with `protocol: ANY`).
    pub fn port(port: u16) -> Self {
        Self {
            ports: port..=port,
            transport: None,
        }
    }

    fn matches(&self, port: u16, transport: DnsTransport) -> bool {
        self.ports.contains(&port) && self.transport.is_none_or(|t| t == transport)
    }
}

/// Why a DNS rule could not be compiled; names the endpoint scope and the selectors.
#[derive(Debug, thiserror::Error)]
pub enum DnsPolicyError {
    #[error("dns rules of {scope}: cannot compile the selectors [{selectors}]: {source}")]
    Compile {
        scope: EndpointScope,
        selectors: String,
        #[source]
        source: regex::Error,
    },
    #[error("dns rules of {scope}: rule set #{index}: {message}")]
    RuleSet {
        scope: EndpointScope,
        index: usize,
        message: String,
    },
}

/// Identifies the rule that decided a query, for records: the scope it was written for and
/// its position in that scope's list (or the policy cookie when built from a rule set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DnsRuleRef {
    pub scope: EndpointScope,
    pub index: usize,
    /// The rule cookie from `membrane-policy`, when the rule came from a resolved rule set.
    pub cookie: Option<u32>,
}

#[derive(Debug, Clone)]
struct DnsRule {
    ports: DnsPortMatch,
    servers: RemoteIdentities,
    selectors: Vec<FqdnSelector>,
    matcher: DnsMatcher,
    cookie: Option<u32>,
}

/// What the policy needs to know about one query besides its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsQueryScope {
    /// The client's endpoint, if known (`None`: only [`EndpointScope::Any`] rules apply).
    pub endpoint: Option<u64>,
    /// The DNS server's port (the original destination port in transparent mode).
    pub port: u16,
    pub transport: DnsTransport,
    /// The DNS server's security identity (ipcache of the server IP; world when unknown,
    /// as Cilium defaults it).
    pub server_identity: Identity,
}

/// The compiled DNS policy of a node: immutable, cheap to share behind an `Arc`.
#[derive(Debug, Clone, Default)]
pub struct DnsPolicy {
    rules: HashMap<EndpointScope, Vec<DnsRule>>,
}

impl DnsPolicy {
    /// A policy that denies every query.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an allow rule: queries from `scope` to a server on `ports` whose name matches any
    /// of `selectors` (an empty list allows every name, Cilium's L7 wildcard), whatever the
    /// server's identity.
    pub fn allow(
        &mut self,
        scope: EndpointScope,
        ports: DnsPortMatch,
        selectors: &[FqdnSelector],
    ) -> Result<&mut Self, DnsPolicyError> {
        self.allow_servers(scope, ports, RemoteIdentities::Any, selectors, None)
    }

    /// Adds an allow rule restricted to DNS servers of the given identities (a `toEndpoints`
    /// / `toCIDR` peer of the `rules.dns` entry).
    pub fn allow_servers(
        &mut self,
        scope: EndpointScope,
        ports: DnsPortMatch,
        servers: RemoteIdentities,
        selectors: &[FqdnSelector],
        cookie: Option<u32>,
    ) -> Result<&mut Self, DnsPolicyError> {
        let matcher = DnsMatcher::new(selectors).map_err(|source| DnsPolicyError::Compile {
            scope,
            selectors: selectors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            source,
        })?;
        self.rules.entry(scope).or_default().push(DnsRule {
            ports,
            servers,
            selectors: selectors.to_vec(),
            matcher,
            cookie,
        });
        Ok(self)
    }

    /// Adds the egress DNS rule sets of one endpoint as `membrane-policy` resolved them
    /// (`EndpointPolicy::l7`); HTTP and ingress sets are skipped.
    pub fn add_rule_sets<'a>(
        &mut self,
        endpoint: u64,
        sets: impl IntoIterator<Item = &'a L7RuleSet>,
    ) -> Result<&mut Self, DnsPolicyError> {
        let scope = EndpointScope::Endpoint(endpoint);
        for (index, set) in sets.into_iter().enumerate() {
            if set.parser != L7Parser::Dns || set.direction != Direction::Egress {
                continue;
            }
            let transport = match set.protocol {
                17 => DnsTransport::Udp,
                6 => DnsTransport::Tcp,
                other => {
                    return Err(DnsPolicyError::RuleSet {
                        scope,
                        index,
                        message: format!(
                            "protocol {other} cannot carry DNS (only UDP 17 and TCP 6)"
                        ),
                    });
                }
            };
            for peer in &set.rules {
                let L7Rules::Dns(selectors) = &peer.rules else {
                    return Err(DnsPolicyError::RuleSet {
                        scope,
                        index,
                        message: "a DNS rule set holds HTTP rules".to_owned(),
                    });
                };
                self.allow_servers(
                    scope,
                    DnsPortMatch {
                        ports: set.port..=set.end_port,
                        transport: Some(transport),
                    },
                    peer.remote.clone(),
                    selectors,
                    Some(peer.cookie),
                )?;
            }
        }
        Ok(self)
    }

    /// True if no rule exists (every query is denied).
    pub fn is_empty(&self) -> bool {
        self.rules.values().all(Vec::is_empty)
    }

    /// Decides a query: `Some(rule)` if allowed. `qname` is lower-cased and made fully
    /// qualified before matching (Cilium's `CheckAllowed`).
    pub fn check(&self, scope: &DnsQueryScope, qname: &str) -> Option<DnsRuleRef> {
        let endpoint = scope.endpoint.map(EndpointScope::Endpoint);
        // Endpoint-specific rules first only to report the most specific rule; the verdict
        // is the same in either order (rules are OR'ed).
        for key in endpoint.into_iter().chain([EndpointScope::Any]) {
            let Some(rules) = self.rules.get(&key) else {
                continue;
            };
            for (index, rule) in rules.iter().enumerate() {
                if rule.ports.matches(scope.port, scope.transport)
                    && rule.servers.contains(scope.server_identity)
                    && rule.matcher.allows(qname)
                {
                    return Some(DnsRuleRef {
                        scope: key,
                        index,
                        cookie: rule.cookie,
                    });
                }
            }
        }
        None
    }

    /// The selectors of every rule, for status views (`scope`, ports, selectors).
    pub fn describe(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .rules
            .iter()
            .flat_map(|(scope, rules)| {
                rules.iter().map(move |rule| {
                    let transport = rule
                        .ports
                        .transport
                        .map_or_else(|| "ANY".to_owned(), |t| t.to_string());
                    let selectors = if rule.selectors.is_empty() {
                        "any name".to_owned()
                    } else {
                        rule.selectors
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    format!(
                        "{scope} ports {}-{}/{transport}: {selectors}",
                        rule.ports.ports.start(),
                        rule.ports.ports.end()
                    )
                })
            })
            .collect();
        lines.sort();
        lines
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use membrane_policy::L7PeerRule;

    use super::*;

    fn pattern(p: &str) -> FqdnSelector {
        FqdnSelector::pattern(p).expect("pattern")
    }

    fn name(n: &str) -> FqdnSelector {
        FqdnSelector::name(n).expect("name")
    }

    fn scope(endpoint: Option<u64>, port: u16, transport: DnsTransport) -> DnsQueryScope {
        DnsQueryScope {
            endpoint,
            port,
            transport,
            server_identity: Identity::WORLD,
        }
    }

    #[test]
    fn pattern_table_follows_cilium() {
        let table: &[(&[FqdnSelector], &[&str], &[&str])] = &[
            (
                &[name("api.github.com")],
                &["api.github.com", "API.GitHub.com.", "api.github.com."],
                &["www.github.com", "github.com", "apixgithub.com"],
            ),
            (
                &[pattern("*.github.com")],
                &["www.github.com", "WWW.GITHUB.COM.", "x-y_z.github.com"],
                &["github.com", "a.b.github.com", "www.github.com.evil.io"],
            ),
            (
                &[pattern("**.github.com")],
                &["www.github.com", "a.b.github.com"],
                &["github.com", "xgithub.com"],
            ),
            (&[pattern("*")], &["anything.at.all", "x"], &[]),
            (&[], &["empty.rules.allow.all"], &[]),
        ];
        for (selectors, allowed, denied) in table {
            let mut policy = DnsPolicy::new();
            policy
                .allow(EndpointScope::Any, DnsPortMatch::port(53), selectors)
                .expect("compiles");
            let s = scope(None, 53, DnsTransport::Udp);
            for n in *allowed {
                assert!(
                    policy.check(&s, n).is_some(),
                    "{selectors:?} must allow {n}"
                );
            }
            for n in *denied {
                assert!(policy.check(&s, n).is_none(), "{selectors:?} must deny {n}");
            }
        }
    }

    #[test]
    fn scope_port_and_transport_select_rules() {
        let mut policy = DnsPolicy::new();
        policy
            .allow(
                EndpointScope::Endpoint(7),
                DnsPortMatch {
                    ports: 53..=53,
                    transport: Some(DnsTransport::Udp),
                },
                &[name("seven.example")],
            )
            .expect("compiles")
            .allow(
                EndpointScope::Any,
                DnsPortMatch::port(53),
                &[name("all.example")],
            )
            .expect("compiles");
        let udp7 = scope(Some(7), 53, DnsTransport::Udp);
        let tcp7 = scope(Some(7), 53, DnsTransport::Tcp);
        let udp8 = scope(Some(8), 53, DnsTransport::Udp);
        let other_port = scope(Some(7), 5353, DnsTransport::Udp);
        assert_eq!(
            policy.check(&udp7, "seven.example").map(|r| r.scope),
            Some(EndpointScope::Endpoint(7))
        );
        assert!(policy.check(&tcp7, "seven.example").is_none());
        assert!(policy.check(&udp8, "seven.example").is_none());
        assert!(policy.check(&udp8, "all.example").is_some());
        assert!(policy.check(&other_port, "all.example").is_none());
        assert!(DnsPolicy::new().check(&udp7, "all.example").is_none());
    }

    #[test]
    fn server_identity_restricts_rules() {
        let mut policy = DnsPolicy::new();
        policy
            .allow_servers(
                EndpointScope::Any,
                DnsPortMatch::any(),
                RemoteIdentities::Set(BTreeSet::from([Identity(300)])),
                &[name("internal.example")],
                Some(4),
            )
            .expect("compiles");
        let mut s = scope(None, 53, DnsTransport::Udp);
        assert!(
            policy.check(&s, "internal.example").is_none(),
            "world server"
        );
        s.server_identity = Identity(300);
        assert_eq!(
            policy.check(&s, "internal.example").and_then(|r| r.cookie),
            Some(4)
        );
    }

    #[test]
    fn rule_sets_from_membrane_policy() {
        let set = |protocol, parser, direction| L7RuleSet {
            direction,
            protocol,
            port: 53,
            end_port: 53,
            parser,
            proxy_port: 10053,
            rules: vec![L7PeerRule {
                remote: RemoteIdentities::Any,
                rules: L7Rules::Dns(vec![pattern("*.example.com")]),
                cookie: 9,
            }],
        };
        let sets = [
            set(17, L7Parser::Dns, Direction::Egress),
            set(6, L7Parser::Dns, Direction::Ingress),
        ];
        let mut policy = DnsPolicy::new();
        policy.add_rule_sets(5, &sets).expect("converts");
        let udp = scope(Some(5), 53, DnsTransport::Udp);
        let tcp = scope(Some(5), 53, DnsTransport::Tcp);
        assert_eq!(
            policy.check(&udp, "www.example.com"),
            Some(DnsRuleRef {
                scope: EndpointScope::Endpoint(5),
                index: 0,
                cookie: Some(9)
            })
        );
        assert!(
            policy.check(&tcp, "www.example.com").is_none(),
            "ingress set skipped"
        );
        let bad = [set(132, L7Parser::Dns, Direction::Egress)];
        let error = DnsPolicy::new()
            .add_rule_sets(5, &bad)
            .expect_err("SCTP cannot carry DNS")
            .to_string();
        assert!(
            error.contains("endpoint 5") && error.contains("132"),
            "{error}"
        );
    }
}
