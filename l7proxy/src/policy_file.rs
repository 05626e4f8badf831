//! The standalone proxy's policy file: the HTTP rules of a CiliumNetworkPolicy in YAML.
//!
//! Owns reading and validating the file; compiling is `policy::HttpPolicy`'s job. A file
//! holds one or more YAML documents, each either
//! - a plain list of HTTP rules in `rules.http` syntax (`method`, `path`, `host`, `headers`,
//!   `headerMatches` with `name`, `value`, `mismatch`), or
//! - a whole `CiliumNetworkPolicy` / `CiliumClusterwideNetworkPolicy`, from which the
//!   `toPorts[].rules.http` lists of every ingress and egress rule (of `spec` and `specs`)
//!   are collected in order.
//!
//! The collected rules are OR'ed into one policy: standalone mode has one upstream and no
//! identities, so selectors and ports are not evaluated here (they are the agent's job,
//! through the full parser in `membrane-policy`, which this crate must not depend on).
//! Unknown keys anywhere on the walked path are errors naming the key and its line; a file
//! without any HTTP rule is an error too (see [`PolicyFileError::Empty`]).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::policy::{HeaderMatchSpec, HttpPolicy, HttpRuleSpec, MismatchAction, PolicyError};

#[derive(Debug, thiserror::Error)]
pub enum PolicyFileError {
    #[error("cannot read policy file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("policy file {origin}: document {document}: {source}")]
    Yaml {
        origin: String,
        document: usize,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error(
        "policy file {origin}: document {document}: kind {kind:?} is not CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy"
    )]
    Kind {
        origin: String,
        document: usize,
        kind: String,
    },
    #[error("policy file {origin}: {location}: {message}")]
    Invalid {
        origin: String,
        location: String,
        message: String,
    },
    #[error(
        "policy file {origin} holds no HTTP rules; without --policy every request is allowed, with it at least one rule is expected"
    )]
    Empty { origin: String },
    #[error("policy file {origin}: {location}: {source}")]
    Compile {
        origin: String,
        location: String,
        #[source]
        source: Box<PolicyError>,
    },
}

/// `PortRuleHTTP` as written in YAML.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpRuleYaml {
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    headers: Vec<String>,
    #[serde(default, rename = "headerMatches")]
    header_matches: Vec<HeaderMatchYaml>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderMatchYaml {
    name: String,
    #[serde(default)]
    value: String,
    #[serde(default)]
    mismatch: String,
    /// Kubernetes secrets are not reachable from the standalone proxy; accepted by the
    /// grammar so the error can say so instead of "unknown field".
    #[serde(default)]
    secret: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyYaml {
    #[serde(default, rename = "apiVersion")]
    _api_version: Option<IgnoredAny>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default, rename = "metadata")]
    _metadata: Option<IgnoredAny>,
    #[serde(default)]
    spec: Option<RuleYaml>,
    #[serde(default)]
    specs: Vec<RuleYaml>,
    #[serde(default, rename = "status")]
    _status: Option<IgnoredAny>,
}

/// A CNP `Rule`: only the L7-bearing sections are walked; the rest is checked for spelling
/// only.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleYaml {
    #[serde(default, rename = "endpointSelector")]
    _endpoint_selector: Option<IgnoredAny>,
    #[serde(default, rename = "nodeSelector")]
    _node_selector: Option<IgnoredAny>,
    #[serde(default)]
    ingress: Vec<DirectionRuleYaml>,
    #[serde(default, rename = "ingressDeny")]
    _ingress_deny: Option<IgnoredAny>,
    #[serde(default)]
    egress: Vec<DirectionRuleYaml>,
    #[serde(default, rename = "egressDeny")]
    _egress_deny: Option<IgnoredAny>,
    #[serde(default, rename = "labels")]
    _labels: Option<IgnoredAny>,
    #[serde(default, rename = "description")]
    _description: Option<IgnoredAny>,
    #[serde(default, rename = "enableDefaultDeny")]
    _enable_default_deny: Option<IgnoredAny>,
    #[serde(default, rename = "log")]
    _log: Option<IgnoredAny>,
}

/// An ingress or egress rule; peer selectors of both directions are accepted (and ignored)
/// in both, the full parser checks which belongs where.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DirectionRuleYaml {
    #[serde(default, rename = "toPorts")]
    to_ports: Vec<PortRuleYaml>,
    #[serde(default, rename = "fromEndpoints")]
    _from_endpoints: Option<IgnoredAny>,
    #[serde(default, rename = "fromRequires")]
    _from_requires: Option<IgnoredAny>,
    #[serde(default, rename = "fromCIDR")]
    _from_cidr: Option<IgnoredAny>,
    #[serde(default, rename = "fromCIDRSet")]
    _from_cidr_set: Option<IgnoredAny>,
    #[serde(default, rename = "fromEntities")]
    _from_entities: Option<IgnoredAny>,
    #[serde(default, rename = "fromGroups")]
    _from_groups: Option<IgnoredAny>,
    #[serde(default, rename = "fromNodes")]
    _from_nodes: Option<IgnoredAny>,
    #[serde(default, rename = "toEndpoints")]
    _to_endpoints: Option<IgnoredAny>,
    #[serde(default, rename = "toRequires")]
    _to_requires: Option<IgnoredAny>,
    #[serde(default, rename = "toCIDR")]
    _to_cidr: Option<IgnoredAny>,
    #[serde(default, rename = "toCIDRSet")]
    _to_cidr_set: Option<IgnoredAny>,
    #[serde(default, rename = "toEntities")]
    _to_entities: Option<IgnoredAny>,
    #[serde(default, rename = "toServices")]
    _to_services: Option<IgnoredAny>,
    #[serde(default, rename = "toFQDNs")]
    _to_fqdns: Option<IgnoredAny>,
    #[serde(default, rename = "toGroups")]
    _to_groups: Option<IgnoredAny>,
    #[serde(default, rename = "toNodes")]
    _to_nodes: Option<IgnoredAny>,
    #[serde(default, rename = "icmps")]
    _icmps: Option<IgnoredAny>,
    #[serde(default, rename = "authentication")]
    _authentication: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PortRuleYaml {
    #[serde(default, rename = "ports")]
    _ports: Option<IgnoredAny>,
    #[serde(default, rename = "terminatingTLS")]
    _terminating_tls: Option<IgnoredAny>,
    #[serde(default, rename = "originatingTLS")]
    _originating_tls: Option<IgnoredAny>,
    #[serde(default, rename = "serverNames")]
    _server_names: Option<IgnoredAny>,
    #[serde(default, rename = "listener")]
    _listener: Option<IgnoredAny>,
    #[serde(default)]
    rules: Option<L7RulesYaml>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct L7RulesYaml {
    #[serde(default)]
    http: Vec<HttpRuleYaml>,
    #[serde(default, rename = "kafka")]
    _kafka: Option<IgnoredAny>,
    #[serde(default, rename = "dns")]
    _dns: Option<IgnoredAny>,
    #[serde(default, rename = "l7proto")]
    _l7proto: Option<IgnoredAny>,
    #[serde(default, rename = "l7")]
    _l7: Option<IgnoredAny>,
}

/// One YAML document: a rule list or a policy object, told apart by its first token so
/// serde keeps line numbers in its errors (an untagged enum would lose them).
enum Document {
    Rules(Vec<HttpRuleYaml>),
    Policy(Box<PolicyYaml>),
}

impl<'de> Deserialize<'de> for Document {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DocumentVisitor;
        impl<'de> Visitor<'de> for DocumentVisitor {
            type Value = Document;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of HTTP rules or a CiliumNetworkPolicy")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Document, A::Error> {
                Vec::deserialize(de::value::SeqAccessDeserializer::new(seq)).map(Document::Rules)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Document, A::Error> {
                PolicyYaml::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(|policy| Document::Policy(Box::new(policy)))
            }
            fn visit_none<E: de::Error>(self) -> Result<Document, E> {
                self.visit_unit()
            }
            fn visit_unit<E: de::Error>(self) -> Result<Document, E> {
                // An empty document (e.g. a trailing `---`) holds no rules.
                Ok(Document::Rules(Vec::new()))
            }
        }
        deserializer.deserialize_any(DocumentVisitor)
    }
}

/// Reads and compiles the policy file at `path`.
pub fn load_policy_file(path: impl AsRef<Path>) -> Result<HttpPolicy, PolicyFileError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|source| PolicyFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_policy_yaml(&text, &path.display().to_string())
}

/// Parses and compiles policy YAML; `origin` names the source in errors (a path).
pub fn parse_policy_yaml(text: &str, origin: &str) -> Result<HttpPolicy, PolicyFileError> {
    let rules = parse_http_rules(text, origin)?;
    // Cilium reads an empty `http: []` as allow-all; a policy *file* without rules is far more
    // likely a mistake (wrong file, wrong kind of policy), so say so instead of opening up.
    if rules.is_empty() {
        return Err(PolicyFileError::Empty {
            origin: origin.to_owned(),
        });
    }
    let specs: Vec<HttpRuleSpec> = rules.iter().map(|(_, spec)| spec.clone()).collect();
    HttpPolicy::compile(&specs).map_err(|source| {
        let index = match &source {
            PolicyError::Regex { rule, .. }
            | PolicyError::RegexTooBig { rule, .. }
            | PolicyError::HeaderName { rule, .. }
            | PolicyError::HeaderValue { rule, .. }
            | PolicyError::PseudoHeaderAction { rule, .. } => *rule,
        };
        PolicyFileError::Compile {
            origin: origin.to_owned(),
            location: rules
                .get(index)
                .map_or_else(|| format!("rule {index}"), |(location, _)| location.clone()),
            source: Box::new(source),
        }
    })
}

/// The HTTP rules of `text` in policy order, each with where it was found
/// (`document 0: spec.ingress[1].toPorts[0].rules.http[2]`).
pub fn parse_http_rules(
    text: &str,
    origin: &str,
) -> Result<Vec<(String, HttpRuleSpec)>, PolicyFileError> {
    let mut rules = Vec::new();
    for (document, deserializer) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let parsed =
            Document::deserialize(deserializer).map_err(|source| PolicyFileError::Yaml {
                origin: origin.to_owned(),
                document,
                source,
            })?;
        match parsed {
            Document::Rules(list) => {
                for (index, rule) in list.into_iter().enumerate() {
                    let location = format!("document {document}: [{index}]");
                    let spec = convert(rule, origin, &location)?;
                    rules.push((location, spec));
                }
            }
            Document::Policy(policy) => {
                if let Some(kind) = &policy.kind
                    && kind != "CiliumNetworkPolicy"
                    && kind != "CiliumClusterwideNetworkPolicy"
                {
                    return Err(PolicyFileError::Kind {
                        origin: origin.to_owned(),
                        document,
                        kind: kind.clone(),
                    });
                }
                let sections = policy
                    .spec
                    .into_iter()
                    .map(|rule| ("spec".to_owned(), rule))
                    .chain(
                        policy
                            .specs
                            .into_iter()
                            .enumerate()
                            .map(|(i, rule)| (format!("specs[{i}]"), rule)),
                    );
                for (prefix, rule) in sections {
                    let directions = [("ingress", rule.ingress), ("egress", rule.egress)];
                    for (direction, list) in directions {
                        for (d, entry) in list.into_iter().enumerate() {
                            for (p, port_rule) in entry.to_ports.into_iter().enumerate() {
                                let Some(l7) = port_rule.rules else { continue };
                                for (h, rule) in l7.http.into_iter().enumerate() {
                                    let location = format!(
                                        "document {document}: {prefix}.{direction}[{d}].toPorts[{p}].rules.http[{h}]"
                                    );
                                    let spec = convert(rule, origin, &location)?;
                                    rules.push((location, spec));
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(rules)
}

fn convert(
    rule: HttpRuleYaml,
    origin: &str,
    location: &str,
) -> Result<HttpRuleSpec, PolicyFileError> {
    let mut header_matches = Vec::with_capacity(rule.header_matches.len());
    for (index, entry) in rule.header_matches.into_iter().enumerate() {
        let invalid = |message: String| PolicyFileError::Invalid {
            origin: origin.to_owned(),
            location: format!("{location}.headerMatches[{index}]"),
            message,
        };
        if entry.secret.is_some() {
            return Err(invalid(format!(
                "header {:?} takes its value from a Kubernetes secret, which the standalone proxy cannot read; put the value in `value`",
                entry.name
            )));
        }
        let mismatch = MismatchAction::parse(&entry.mismatch).ok_or_else(|| {
            invalid(format!(
                "mismatch {:?} is not one of \"\", LOG, ADD, DELETE, REPLACE",
                entry.mismatch
            ))
        })?;
        header_matches.push(HeaderMatchSpec {
            name: entry.name,
            value: entry.value,
            mismatch,
        });
    }
    Ok(HttpRuleSpec {
        method: rule.method,
        path: rule.path,
        host: rule.host,
        headers: rule.headers,
        header_matches,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(text: &str) -> Vec<(String, HttpRuleSpec)> {
        parse_http_rules(text, "test.yaml").unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn plain_rule_list() {
        let parsed = rules(
            r#"
- method: GET
  path: "/public.*"
- host: "api\\.example\\.com"
  headers: ["X-Key: v", "X-Present"]
  headerMatches:
  - name: X-Token
    value: abc
    mismatch: REPLACE
  - name: X-Any
"#,
        );
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].0, "document 0: [0]");
        assert_eq!(parsed[0].1.method.as_deref(), Some("GET"));
        assert_eq!(parsed[0].1.path.as_deref(), Some("/public.*"));
        let second = &parsed[1].1;
        assert_eq!(second.host.as_deref(), Some("api\\.example\\.com"));
        assert_eq!(second.headers, ["X-Key: v", "X-Present"]);
        assert_eq!(
            second.header_matches,
            [
                HeaderMatchSpec {
                    name: "X-Token".into(),
                    value: "abc".into(),
                    mismatch: MismatchAction::Replace
                },
                HeaderMatchSpec {
                    name: "X-Any".into(),
                    value: String::new(),
                    mismatch: MismatchAction::Fail
                },
            ]
        );
    }

    #[test]
    fn whole_cilium_network_policy() {
        let parsed = rules(
            r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: rule1
  namespace: default
spec:
  description: "L7 policy"
  endpointSelector:
    matchLabels: {app: service}
  ingress:
  - fromEndpoints:
    - matchLabels: {env: prod}
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
        - method: GET
          path: "/path1$"
        - method: PUT
          path: "/path2$"
          headers: ['X-My-Header: true']
  - toPorts:
    - ports: [{port: "8080", protocol: TCP}]
  egress:
  - toFQDNs: [{matchName: example.com}]
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchPattern: "*"}]
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http: [{method: POST}]
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: second}
specs:
- endpointSelector: {}
  ingress:
  - toPorts:
    - ports: [{port: "80"}]
      rules:
        http: [{path: "/cc"}]
"#,
        );
        let got: Vec<(&str, Option<&str>, Option<&str>)> = parsed
            .iter()
            .map(|(loc, spec)| (loc.as_str(), spec.method.as_deref(), spec.path.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "document 0: spec.ingress[0].toPorts[0].rules.http[0]",
                    Some("GET"),
                    Some("/path1$")
                ),
                (
                    "document 0: spec.ingress[0].toPorts[0].rules.http[1]",
                    Some("PUT"),
                    Some("/path2$")
                ),
                (
                    "document 0: spec.egress[0].toPorts[1].rules.http[0]",
                    Some("POST"),
                    None
                ),
                (
                    "document 1: specs[0].ingress[0].toPorts[0].rules.http[0]",
                    None,
                    Some("/cc")
                ),
            ]
        );
        assert_eq!(parsed[1].1.headers, ["X-My-Header: true"]);
    }

    #[test]
    fn errors_name_the_problem() {
        let cases = [
            ("- method: GET\n  pth: /x\n", "unknown field `pth`"),
            ("- method: GET\n  pth: /x\n", "line 2"),
            (
                "- headerMatches: [{name: a, mismatch: log}]\n",
                "document 0: [0].headerMatches[0]: mismatch \"log\"",
            ),
            (
                "- headerMatches: [{name: a, secret: {namespace: n, name: s}}]\n",
                "Kubernetes secret",
            ),
            (
                "- headerMatches: [{name: a, valeu: x}]\n",
                "unknown field `valeu`",
            ),
            (
                "kind: CiliumNetworkPolicy\nspec:\n  ingress:\n  - toPort: []\n",
                "unknown field `toPort`",
            ),
            (
                "kind: CiliumNetworkPolicy\nspec:\n  ingress:\n  - toPorts:\n    - rules: {htp: []}\n",
                "unknown field `htp`",
            ),
            (
                "kind: CiliumNetworkPolicy\nspecc: {}\n",
                "unknown field `specc`",
            ),
            (
                "kind: NetworkPolicy\nspec: {}\n",
                "kind \"NetworkPolicy\" is not CiliumNetworkPolicy",
            ),
            (
                "just a string\n",
                "a list of HTTP rules or a CiliumNetworkPolicy",
            ),
        ];
        for (text, want) in cases {
            let err = parse_http_rules(text, "p.yaml")
                .expect_err(text)
                .to_string();
            assert!(err.contains(want), "{text:?}: {err:?} lacks {want:?}");
            assert!(err.starts_with("policy file p.yaml"), "{err}");
        }
    }

    #[test]
    fn compile_errors_point_at_the_rule_in_the_file() {
        let text = "kind: CiliumNetworkPolicy\nspec:\n  egress:\n  - toPorts:\n    - rules:\n        http: [{path: /ok}, {path: \"/(bad\"}]\n";
        let err = parse_policy_yaml(text, "p.yaml")
            .expect_err("bad regex")
            .to_string();
        assert!(
            err.starts_with("policy file p.yaml: document 0: spec.egress[0].toPorts[0].rules.http[1]: http rule 1: path: invalid regex"),
            "{err}"
        );
    }

    #[test]
    fn load_from_disk() {
        let dir =
            std::env::temp_dir().join(format!("membrane-l7proxy-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("policy.yaml");
        std::fs::write(&path, "- method: GET\n").expect("write policy");
        let policy = load_policy_file(&path).expect("load");
        assert_eq!(policy.len(), 1);
        let missing = load_policy_file(dir.join("missing.yaml")).expect_err("missing file");
        assert!(missing.to_string().contains("missing.yaml"), "{missing}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
        // A file without rules is refused rather than read as allow-all.
        for text in [
            "",
            "---\n",
            "[]\n",
            "kind: CiliumNetworkPolicy\nspec: {ingress: [{toPorts: [{ports: [{port: \"80\"}]}]}]}\n",
        ] {
            let err = parse_policy_yaml(text, "empty.yaml").expect_err(text);
            assert!(
                matches!(err, PolicyFileError::Empty { .. }),
                "{text:?}: {err}"
            );
        }
    }
}
