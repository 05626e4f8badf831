//! The HTTP policy engine: compiles Cilium `rules.http` entries (`PortRuleHTTP`) into an
//! immutable [`HttpPolicy`] and decides each request against it.
//!
//! Owns the matching semantics of cilium-semantics.md §1.8/§1.9: rules are OR'ed, every
//! field inside one rule is AND'ed; `method`, `path` and `host` are RE2-style *full-match*
//! regexes (compiled as `^(?:…)$`); `headers` entries are exact-value or presence matches;
//! `headerMatches` either fail the rule on mismatch or run a mismatch action (LOG, ADD,
//! DELETE, REPLACE) that may rewrite the request headers. An empty rule list is Cilium's L7
//! wildcard: every request is allowed (it still goes through the proxy).
//!
//! Pure: no I/O, no async, no hyper types beyond the `http` crate's request parts, so the
//! same engine serves the standalone and the transparent listeners.

use std::borrow::Cow;
use std::fmt;

use http::header::HOST;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use regex::{Regex, RegexBuilder};

/// Default cap on the compiled size of one rule regex, in bytes (`RegexBuilder::size_limit`).
///
/// Envoy rejects RE2 programs above a "program size" of 100 and then NACKs the whole policy
/// update (cilium#41314). We reject only the offending rule at compile time instead, with a
/// limit generous enough for realistic path and host patterns (a Unicode `\w+` is ~10 KiB)
/// but far below the `regex` crate's 10 MiB default, so one rule cannot make the proxy spend
/// megabytes per policy.
pub const DEFAULT_REGEX_SIZE_LIMIT: usize = 256 * 1024;

/// One HTTP rule as written in a policy (`PortRuleHTTP`): every present field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpRuleSpec {
    /// Regex over the request method (`:method`). `None` or empty matches any method.
    pub method: Option<String>,
    /// Regex over the request target including the query string (`:path`).
    pub path: Option<String>,
    /// Regex over the Host header / `:authority` (which may carry `:port`).
    pub host: Option<String>,
    /// `"Name: value"` (exact value) or `"Name"` (presence) header requirements.
    pub headers: Vec<String>,
    /// Header matches with mismatch actions (`headerMatches`).
    pub header_matches: Vec<HeaderMatchSpec>,
}

/// One `headerMatches` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderMatchSpec {
    pub name: String,
    /// Expected value; empty means "the header is present".
    pub value: String,
    pub mismatch: MismatchAction,
}

/// What to do when a `headerMatches` entry does not match (Cilium `MismatchAction`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum MismatchAction {
    /// `""`: the rule does not match.
    #[default]
    Fail,
    /// `LOG`: record the mismatch in the access record, the rule still matches.
    Log,
    /// `ADD`: add the header with the expected value.
    Add,
    /// `DELETE`: remove the header carrying the wrong value.
    Delete,
    /// `REPLACE`: set the header to the expected value.
    Replace,
}

impl MismatchAction {
    /// Parses the policy spelling (`""`, `LOG`, `ADD`, `DELETE`, `REPLACE`; case-sensitive
    /// like Cilium's CRD enum).
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "" => Some(Self::Fail),
            "LOG" => Some(Self::Log),
            "ADD" => Some(Self::Add),
            "DELETE" => Some(Self::Delete),
            "REPLACE" => Some(Self::Replace),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fail => "",
            Self::Log => "LOG",
            Self::Add => "ADD",
            Self::Delete => "DELETE",
            Self::Replace => "REPLACE",
        }
    }
}

/// Why a rule list could not be compiled. Every variant names the rule (0-based index in
/// the list) and the field, so a user can find the line in the policy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("http rule {rule}: {field}: invalid regex {pattern:?}: {source}")]
    Regex {
        rule: usize,
        field: &'static str,
        pattern: String,
        #[source]
        source: regex::Error,
    },
    #[error(
        "http rule {rule}: {field}: regex {pattern:?} compiles larger than the limit of {limit} bytes; simplify it or split the rule"
    )]
    RegexTooBig {
        rule: usize,
        field: &'static str,
        pattern: String,
        limit: usize,
    },
    #[error("http rule {rule}: {field}: {name:?} is not a valid HTTP header name")]
    HeaderName {
        rule: usize,
        field: String,
        name: String,
    },
    #[error("http rule {rule}: {field}: {value:?} is not a valid HTTP header value")]
    HeaderValue {
        rule: usize,
        field: String,
        value: String,
    },
    #[error(
        "http rule {rule}: {field}: mismatch action {action} cannot rewrite the pseudo-header {name:?}"
    )]
    PseudoHeaderAction {
        rule: usize,
        field: String,
        name: String,
        action: &'static str,
    },
}

/// Which rule decided a request; goes into access records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuleRef {
    /// The policy has no rules: the L7 wildcard allows everything.
    AllowAll,
    /// The first rule (0-based) that matched.
    Rule(usize),
    /// No rule matched.
    DefaultDeny,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AllowAll => f.write_str("allow-all"),
            Self::Rule(index) => write!(f, "rule {index}"),
            Self::DefaultDeny => f.write_str("default-deny"),
        }
    }
}

/// A header mismatch that a non-failing `headerMatches` entry recorded (Cilium's access-log
/// `rejected_headers` / `missing_headers`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderLog {
    pub kind: HeaderLogKind,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderLogKind {
    /// The request carried a wrong value (LOG, DELETE, REPLACE) or was missing it (LOG).
    Rejected,
    /// The proxy added or replaced the header with the expected value (ADD, REPLACE).
    Missing,
}

/// The decision for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    pub rule: RuleRef,
    /// Mismatches recorded by LOG/ADD/DELETE/REPLACE actions (empty in the common case, so
    /// no allocation).
    pub header_log: Vec<HeaderLog>,
}

/// A compiled, immutable HTTP policy: the OR of its rules.
#[derive(Debug, Clone, Default)]
pub struct HttpPolicy {
    rules: Vec<CompiledRule>,
    /// Envoy (cilium network_policy.cc) stops at the first matching rule unless some rule has
    /// header actions; then every matching rule runs its actions. We keep that behaviour.
    has_header_actions: bool,
}

#[derive(Debug, Clone)]
struct CompiledRule {
    method: Option<Regex>,
    path: Option<Regex>,
    host: Option<Regex>,
    /// AND'ed header requirements (`headers` and failing `headerMatches`).
    matchers: Vec<HeaderMatcher>,
    /// Non-failing `headerMatches`, run only when the rule otherwise matches.
    actions: Vec<HeaderAction>,
}

#[derive(Debug, Clone)]
enum HeaderKey {
    Regular(HeaderName),
    /// Envoy matches pseudo-headers by name too, so `headers: [":authority: x"]` works there.
    Pseudo(Pseudo),
}

#[derive(Debug, Clone, Copy)]
enum Pseudo {
    Method,
    Path,
    Authority,
    Scheme,
}

#[derive(Debug, Clone)]
enum Expect {
    Present,
    Exact(HeaderValue),
}

#[derive(Debug, Clone)]
struct HeaderMatcher {
    key: HeaderKey,
    expect: Expect,
}

#[derive(Debug, Clone)]
struct HeaderAction {
    name: HeaderName,
    /// Empty means a presence match.
    value: HeaderValue,
    action: MismatchAction,
}

/// The request parts a policy looks at. `headers` is mutable because mismatch actions may
/// rewrite it.
pub struct RequestParts<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a mut HeaderMap,
}

impl HttpPolicy {
    /// The L7 wildcard: no rules, every request allowed.
    pub fn allow_all() -> Self {
        Self::default()
    }

    /// Compiles `rules` with [`DEFAULT_REGEX_SIZE_LIMIT`].
    pub fn compile(rules: &[HttpRuleSpec]) -> Result<Self, PolicyError> {
        Self::compile_with_limit(rules, DEFAULT_REGEX_SIZE_LIMIT)
    }

    /// Compiles `rules`, rejecting any regex whose compiled program exceeds
    /// `regex_size_limit` bytes.
    pub fn compile_with_limit(
        rules: &[HttpRuleSpec],
        regex_size_limit: usize,
    ) -> Result<Self, PolicyError> {
        let rules = rules
            .iter()
            .enumerate()
            .map(|(index, spec)| CompiledRule::compile(index, spec, regex_size_limit))
            .collect::<Result<Vec<_>, _>>()?;
        let has_header_actions = rules.iter().any(|rule| !rule.actions.is_empty());
        Ok(Self {
            rules,
            has_header_actions,
        })
    }

    /// Number of rules; 0 means allow-all.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Decides one request and applies the mismatch actions of the matching rules to its
    /// headers.
    pub fn check(&self, request: &mut RequestParts<'_>) -> Verdict {
        if self.rules.is_empty() {
            return Verdict {
                allowed: true,
                rule: RuleRef::AllowAll,
                header_log: Vec::new(),
            };
        }
        let mut first_match = None;
        let mut header_log = Vec::new();
        for (index, rule) in self.rules.iter().enumerate() {
            if !rule.matches(request) {
                continue;
            }
            if !self.has_header_actions {
                first_match = Some(index);
                break;
            }
            rule.run_actions(request.headers, &mut header_log);
            first_match.get_or_insert(index);
        }
        match first_match {
            Some(index) => Verdict {
                allowed: true,
                rule: RuleRef::Rule(index),
                header_log,
            },
            None => Verdict {
                allowed: false,
                rule: RuleRef::DefaultDeny,
                header_log,
            },
        }
    }
}

fn compile_regex(
    rule: usize,
    field: &'static str,
    pattern: Option<&String>,
    limit: usize,
) -> Result<Option<Regex>, PolicyError> {
    // Cilium treats an empty string like an absent field (`if h.Path != ""`).
    let Some(pattern) = pattern.filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(limit)
        // The lazy DFA cache is per search thread; bound it like the program itself.
        .dfa_size_limit(limit)
        .build()
        .map(Some)
        .map_err(|source| match source {
            regex::Error::CompiledTooBig(_) => PolicyError::RegexTooBig {
                rule,
                field,
                pattern: pattern.clone(),
                limit,
            },
            source => PolicyError::Regex {
                rule,
                field,
                pattern: pattern.clone(),
                source,
            },
        })
}

fn parse_key(rule: usize, field: &str, name: &str) -> Result<HeaderKey, PolicyError> {
    let pseudo = match name {
        ":method" => Some(Pseudo::Method),
        ":path" => Some(Pseudo::Path),
        ":authority" => Some(Pseudo::Authority),
        ":scheme" => Some(Pseudo::Scheme),
        _ => None,
    };
    if let Some(pseudo) = pseudo {
        return Ok(HeaderKey::Pseudo(pseudo));
    }
    // HeaderName::from_bytes lower-cases, so matching is case-insensitive on names as in HTTP.
    HeaderName::from_bytes(name.as_bytes())
        .map(HeaderKey::Regular)
        .map_err(|_| PolicyError::HeaderName {
            rule,
            field: field.to_owned(),
            name: name.to_owned(),
        })
}

fn parse_value(rule: usize, field: &str, value: &str) -> Result<HeaderValue, PolicyError> {
    HeaderValue::from_str(value).map_err(|_| PolicyError::HeaderValue {
        rule,
        field: field.to_owned(),
        value: value.to_owned(),
    })
}

impl CompiledRule {
    fn compile(rule: usize, spec: &HttpRuleSpec, limit: usize) -> Result<Self, PolicyError> {
        let method = compile_regex(rule, "method", spec.method.as_ref(), limit)?;
        let path = compile_regex(rule, "path", spec.path.as_ref(), limit)?;
        let host = compile_regex(rule, "host", spec.host.as_ref(), limit)?;
        let mut matchers = Vec::new();
        for (index, entry) in spec.headers.iter().enumerate() {
            let field = format!("headers[{index}]");
            // Cilium (pkg/envoy/server.go getHTTPRule) splits on the first space: "Name: v"
            // is an exact match of `v` with the trailing ':' trimmed off the name, a single
            // token is a presence match.
            let matcher = match entry.split_once(' ') {
                Some((name, value)) => HeaderMatcher {
                    key: parse_key(rule, &field, name.trim_end_matches(':'))?,
                    expect: Expect::Exact(parse_value(rule, &field, value)?),
                },
                None => HeaderMatcher {
                    key: parse_key(rule, &field, entry)?,
                    expect: Expect::Present,
                },
            };
            matchers.push(matcher);
        }
        let mut actions = Vec::new();
        for (index, entry) in spec.header_matches.iter().enumerate() {
            let field = format!("headerMatches[{index}]");
            let key = parse_key(rule, &format!("{field}.name"), &entry.name)?;
            let value = parse_value(rule, &format!("{field}.value"), &entry.value)?;
            if entry.mismatch == MismatchAction::Fail {
                let expect = if value.is_empty() {
                    Expect::Present
                } else {
                    Expect::Exact(value)
                };
                matchers.push(HeaderMatcher { key, expect });
                continue;
            }
            let HeaderKey::Regular(name) = key else {
                return Err(PolicyError::PseudoHeaderAction {
                    rule,
                    field: format!("{field}.mismatch"),
                    name: entry.name.clone(),
                    action: entry.mismatch.as_str(),
                });
            };
            actions.push(HeaderAction {
                name,
                value,
                action: entry.mismatch,
            });
        }
        Ok(Self {
            method,
            path,
            host,
            matchers,
            actions,
        })
    }

    fn matches(&self, request: &RequestParts<'_>) -> bool {
        if let Some(re) = &self.method
            && !re.is_match(request.method.as_str())
        {
            return false;
        }
        if let Some(re) = &self.path
            && !re.is_match(request_path(request.uri))
        {
            return false;
        }
        if let Some(re) = &self.host {
            match request_authority(request.uri, request.headers) {
                Some(host) if re.is_match(host) => {}
                _ => return false,
            }
        }
        self.matchers.iter().all(|matcher| matcher.matches(request))
    }

    fn run_actions(&self, headers: &mut HeaderMap, log: &mut Vec<HeaderLog>) {
        for action in &self.actions {
            action.run(headers, log);
        }
    }
}

/// `:path`: the request target with its query string, as Envoy sees it.
fn request_path(uri: &Uri) -> &str {
    match uri.path_and_query() {
        Some(path) => path.as_str(),
        // An absolute-form target without a path ("http://host") means "/".
        None if uri.authority().is_some() => "/",
        None => "",
    }
}

/// `:authority`: the URI's authority (HTTP/2, or an HTTP/1 absolute-form target, which takes
/// precedence over Host per RFC 9112 §3.2.2), else the Host header.
fn request_authority<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    match uri.authority() {
        Some(authority) => Some(authority.as_str()),
        None => headers.get(HOST).and_then(|value| value.to_str().ok()),
    }
}

/// All values of a header joined with "," (Envoy's `getAllOfHeaderAsString`), borrowing when
/// there is a single value.
fn joined_value<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<Cow<'a, [u8]>> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let Some(second) = values.next() else {
        return Some(Cow::Borrowed(first.as_bytes()));
    };
    let mut joined = first.as_bytes().to_vec();
    for value in std::iter::once(second).chain(values) {
        joined.push(b',');
        joined.extend_from_slice(value.as_bytes());
    }
    Some(Cow::Owned(joined))
}

impl HeaderMatcher {
    fn matches(&self, request: &RequestParts<'_>) -> bool {
        match &self.key {
            HeaderKey::Pseudo(pseudo) => {
                let value = match pseudo {
                    Pseudo::Method => Some(request.method.as_str()),
                    Pseudo::Path => Some(request_path(request.uri)),
                    Pseudo::Authority => request_authority(request.uri, request.headers),
                    Pseudo::Scheme => Some(request.uri.scheme_str().unwrap_or("http")),
                };
                match (&self.expect, value) {
                    (_, None) => false,
                    (Expect::Present, Some(_)) => true,
                    (Expect::Exact(want), Some(have)) => want.as_bytes() == have.as_bytes(),
                }
            }
            HeaderKey::Regular(name) => match (&self.expect, joined_value(request.headers, name)) {
                (_, None) => false,
                (Expect::Present, Some(_)) => true,
                (Expect::Exact(want), Some(have)) => want.as_bytes() == &*have,
            },
        }
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

impl HeaderAction {
    /// Mirrors cilium/proxy `HeaderMatch::allowed` for the non-failing actions.
    fn run(&self, headers: &mut HeaderMap, log: &mut Vec<HeaderLog>) {
        let presence = self.value.is_empty();
        let current = joined_value(headers, &self.name).map(Cow::into_owned);
        let matched = match &current {
            None => false,
            Some(_) if presence => true,
            Some(have) => have.as_slice() == self.value.as_bytes(),
        };
        if matched {
            return;
        }
        let expected = lossy(self.value.as_bytes());
        let entry = |kind, value| HeaderLog {
            kind,
            name: self.name.as_str().to_owned(),
            value,
        };
        match self.action {
            MismatchAction::Fail | MismatchAction::Log => {
                log.push(entry(HeaderLogKind::Rejected, expected));
            }
            MismatchAction::Add => {
                headers.append(self.name.clone(), self.value.clone());
                log.push(entry(HeaderLogKind::Missing, expected));
            }
            MismatchAction::Delete => {
                // A failed presence match has nothing to delete; neither has a missing header.
                if presence {
                    return;
                }
                if let Some(have) = current {
                    headers.remove(&self.name);
                    log.push(entry(HeaderLogKind::Rejected, lossy(&have)));
                }
            }
            MismatchAction::Replace => {
                if let Some(have) = current {
                    log.push(entry(HeaderLogKind::Rejected, lossy(&have)));
                }
                headers.insert(self.name.clone(), self.value.clone());
                log.push(entry(HeaderLogKind::Missing, expected));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> HttpRuleSpec {
        HttpRuleSpec::default()
    }

    fn s(text: &str) -> Option<String> {
        Some(text.to_owned())
    }

    fn hm(name: &str, value: &str, mismatch: MismatchAction) -> HeaderMatchSpec {
        HeaderMatchSpec {
            name: name.to_owned(),
            value: value.to_owned(),
            mismatch,
        }
    }

    struct Req {
        method: Method,
        uri: Uri,
        headers: HeaderMap,
    }

    fn req(method: &str, target: &str, headers: &[(&str, &str)]) -> Req {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).expect("test header name"),
                HeaderValue::from_str(value).expect("test header value"),
            );
        }
        Req {
            method: Method::from_bytes(method.as_bytes()).expect("test method"),
            uri: target.parse().expect("test uri"),
            headers: map,
        }
    }

    fn check(policy: &HttpPolicy, r: &mut Req) -> Verdict {
        policy.check(&mut RequestParts {
            method: &r.method,
            uri: &r.uri,
            headers: &mut r.headers,
        })
    }

    #[test]
    fn matching_table() {
        let get_public = HttpRuleSpec {
            method: s("GET"),
            path: s("/public"),
            ..rule()
        };
        let cases: Vec<(&str, HttpRuleSpec, Req, bool)> = vec![
            (
                "exact path",
                get_public.clone(),
                req("GET", "/public", &[]),
                true,
            ),
            (
                "full match: no prefix match",
                get_public.clone(),
                req("GET", "/public/x", &[]),
                false,
            ),
            (
                "full match: no suffix match",
                get_public.clone(),
                req("GET", "/x/public", &[]),
                false,
            ),
            (
                "query is part of :path",
                get_public.clone(),
                req("GET", "/public?x=1", &[]),
                false,
            ),
            (
                "query matched by regex",
                HttpRuleSpec {
                    path: s("/public(\\?.*)?"),
                    ..rule()
                },
                req("GET", "/public?x=1", &[]),
                true,
            ),
            (
                "method mismatch",
                get_public.clone(),
                req("POST", "/public", &[]),
                false,
            ),
            (
                "method regex alternation",
                HttpRuleSpec {
                    method: s("GET|HEAD"),
                    ..rule()
                },
                req("HEAD", "/", &[]),
                true,
            ),
            (
                "alternation stays anchored",
                HttpRuleSpec {
                    method: s("GET|HEAD"),
                    ..rule()
                },
                req("GETX", "/", &[]),
                false,
            ),
            (
                "method is case-sensitive",
                HttpRuleSpec {
                    method: s("GET"),
                    ..rule()
                },
                req("get", "/", &[]),
                false,
            ),
            (
                "redundant $ in path",
                HttpRuleSpec {
                    path: s("/path1$"),
                    ..rule()
                },
                req("GET", "/path1", &[]),
                true,
            ),
            (
                "suffix rule",
                HttpRuleSpec {
                    path: s(".*public$"),
                    ..rule()
                },
                req("GET", "/a/public", &[]),
                true,
            ),
            (
                "empty fields are absent",
                HttpRuleSpec {
                    method: s(""),
                    path: s(""),
                    host: s(""),
                    ..rule()
                },
                req("PUT", "/x", &[]),
                true,
            ),
            (
                "host from Host header",
                HttpRuleSpec {
                    host: s("api\\.example\\.com"),
                    ..rule()
                },
                req("GET", "/", &[("host", "api.example.com")]),
                true,
            ),
            (
                "host keeps its port",
                HttpRuleSpec {
                    host: s("api\\.example\\.com"),
                    ..rule()
                },
                req("GET", "/", &[("host", "api.example.com:8080")]),
                false,
            ),
            (
                "host with port regex",
                HttpRuleSpec {
                    host: s("api\\.example\\.com(:[0-9]+)?"),
                    ..rule()
                },
                req("GET", "/", &[("host", "api.example.com:8080")]),
                true,
            ),
            (
                "missing host never matches a host rule",
                HttpRuleSpec {
                    host: s(".*"),
                    ..rule()
                },
                req("GET", "/", &[]),
                false,
            ),
            (
                "absolute-form authority wins over Host",
                HttpRuleSpec {
                    host: s("a\\.test"),
                    ..rule()
                },
                req("GET", "http://a.test/x", &[("host", "b.test")]),
                true,
            ),
            (
                "absolute-form without path is /",
                HttpRuleSpec {
                    path: s("/"),
                    ..rule()
                },
                req("GET", "http://a.test", &[]),
                true,
            ),
            (
                "header exact",
                HttpRuleSpec {
                    headers: vec!["X-Key: v1".into()],
                    ..rule()
                },
                req("GET", "/", &[("x-key", "v1")]),
                true,
            ),
            (
                "header name case-insensitive",
                HttpRuleSpec {
                    headers: vec!["x-KEY: v1".into()],
                    ..rule()
                },
                req("GET", "/", &[("X-Key", "v1")]),
                true,
            ),
            (
                "header value case-sensitive",
                HttpRuleSpec {
                    headers: vec!["X-Key: v1".into()],
                    ..rule()
                },
                req("GET", "/", &[("x-key", "V1")]),
                false,
            ),
            (
                "header value is exact, not regex",
                HttpRuleSpec {
                    headers: vec!["X-Key: v.*".into()],
                    ..rule()
                },
                req("GET", "/", &[("x-key", "v1")]),
                false,
            ),
            (
                "header value keeps text after the first space",
                HttpRuleSpec {
                    headers: vec!["X-Key: a b".into()],
                    ..rule()
                },
                req("GET", "/", &[("x-key", "a b")]),
                true,
            ),
            (
                "header missing",
                HttpRuleSpec {
                    headers: vec!["X-Key: v1".into()],
                    ..rule()
                },
                req("GET", "/", &[]),
                false,
            ),
            (
                "header presence",
                HttpRuleSpec {
                    headers: vec!["X-Key".into()],
                    ..rule()
                },
                req("GET", "/", &[("x-key", "")]),
                true,
            ),
            (
                "header presence missing",
                HttpRuleSpec {
                    headers: vec!["X-Key".into()],
                    ..rule()
                },
                req("GET", "/", &[("x-other", "1")]),
                false,
            ),
            (
                "repeated header joined with comma",
                HttpRuleSpec {
                    headers: vec!["X-Key: a,b".into()],
                    ..rule()
                },
                req("GET", "/", &[("x-key", "a"), ("x-key", "b")]),
                true,
            ),
            (
                "pseudo-header :authority",
                HttpRuleSpec {
                    headers: vec![":authority: h.test".into()],
                    ..rule()
                },
                req("GET", "/", &[("host", "h.test")]),
                true,
            ),
            (
                "pseudo-header :method",
                HttpRuleSpec {
                    headers: vec![":method: DELETE".into()],
                    ..rule()
                },
                req("GET", "/", &[]),
                false,
            ),
            (
                "all fields ANDed",
                HttpRuleSpec {
                    method: s("GET"),
                    path: s("/a"),
                    host: s("h"),
                    headers: vec!["X-A".into()],
                    ..rule()
                },
                req("GET", "/a", &[("host", "h")]),
                false,
            ),
            (
                "all fields ANDed, all present",
                HttpRuleSpec {
                    method: s("GET"),
                    path: s("/a"),
                    host: s("h"),
                    headers: vec!["X-A".into()],
                    ..rule()
                },
                req("GET", "/a", &[("host", "h"), ("x-a", "1")]),
                true,
            ),
            (
                "headerMatches fail: exact",
                HttpRuleSpec {
                    header_matches: vec![hm("X-Token", "t1", MismatchAction::Fail)],
                    ..rule()
                },
                req("GET", "/", &[("x-token", "t1")]),
                true,
            ),
            (
                "headerMatches fail: wrong value",
                HttpRuleSpec {
                    header_matches: vec![hm("X-Token", "t1", MismatchAction::Fail)],
                    ..rule()
                },
                req("GET", "/", &[("x-token", "t2")]),
                false,
            ),
            (
                "headerMatches fail: empty value is presence",
                HttpRuleSpec {
                    header_matches: vec![hm("X-Token", "", MismatchAction::Fail)],
                    ..rule()
                },
                req("GET", "/", &[("x-token", "any")]),
                true,
            ),
            (
                "headerMatches fail: presence missing",
                HttpRuleSpec {
                    header_matches: vec![hm("X-Token", "", MismatchAction::Fail)],
                    ..rule()
                },
                req("GET", "/", &[]),
                false,
            ),
            (
                "headerMatches LOG never fails the rule",
                HttpRuleSpec {
                    header_matches: vec![hm("X-Token", "t1", MismatchAction::Log)],
                    ..rule()
                },
                req("GET", "/", &[]),
                true,
            ),
        ];
        for (name, spec, mut request, want) in cases {
            let policy = HttpPolicy::compile(&[spec]).unwrap_or_else(|e| panic!("{name}: {e}"));
            let verdict = check(&policy, &mut request);
            assert_eq!(verdict.allowed, want, "case {name:?}");
            let expected_rule = if want {
                RuleRef::Rule(0)
            } else {
                RuleRef::DefaultDeny
            };
            assert_eq!(verdict.rule, expected_rule, "case {name:?}");
        }
    }

    #[test]
    fn empty_policy_allows_all() {
        let policy = HttpPolicy::compile(&[]).expect("empty policy");
        let verdict = check(&policy, &mut req("DELETE", "/anything", &[]));
        assert!(verdict.allowed);
        assert_eq!(verdict.rule, RuleRef::AllowAll);
        assert!(policy.is_empty());
    }

    #[test]
    fn a_rule_with_no_fields_allows_all_and_is_reported() {
        let policy = HttpPolicy::compile(&[rule()]).expect("wildcard rule");
        let verdict = check(&policy, &mut req("PATCH", "/x", &[]));
        assert_eq!(verdict.rule, RuleRef::Rule(0));
    }

    #[test]
    fn rules_are_ored_and_the_first_match_is_reported() {
        let policy = HttpPolicy::compile(&[
            HttpRuleSpec {
                path: s("/a"),
                ..rule()
            },
            HttpRuleSpec {
                path: s("/b"),
                ..rule()
            },
            HttpRuleSpec {
                path: s("/.*"),
                ..rule()
            },
        ])
        .expect("policy");
        assert_eq!(
            check(&policy, &mut req("GET", "/b", &[])).rule,
            RuleRef::Rule(1)
        );
        assert_eq!(
            check(&policy, &mut req("GET", "/c", &[])).rule,
            RuleRef::Rule(2)
        );
        assert_eq!(
            check(&policy, &mut req("GET", "/a", &[])).rule,
            RuleRef::Rule(0)
        );
    }

    #[test]
    fn mismatch_actions_table() {
        use HeaderLogKind::{Missing, Rejected};
        // (name, action, expected value, request headers, headers after, log)
        type Case<'a> = (
            &'a str,
            MismatchAction,
            &'a str,
            Vec<(&'a str, &'a str)>,
            Vec<&'a str>,
            Vec<(HeaderLogKind, &'a str)>,
        );
        let cases: Vec<Case<'_>> = vec![
            (
                "log: match does nothing",
                MismatchAction::Log,
                "v",
                vec![("x-h", "v")],
                vec!["v"],
                vec![],
            ),
            (
                "log: wrong value is logged",
                MismatchAction::Log,
                "v",
                vec![("x-h", "w")],
                vec!["w"],
                vec![(Rejected, "v")],
            ),
            (
                "log: missing is logged",
                MismatchAction::Log,
                "v",
                vec![],
                vec![],
                vec![(Rejected, "v")],
            ),
            (
                "add: missing header is added",
                MismatchAction::Add,
                "v",
                vec![],
                vec!["v"],
                vec![(Missing, "v")],
            ),
            (
                "add: wrong value gets a second value",
                MismatchAction::Add,
                "v",
                vec![("x-h", "w")],
                vec!["w", "v"],
                vec![(Missing, "v")],
            ),
            (
                "add: match does nothing",
                MismatchAction::Add,
                "v",
                vec![("x-h", "v")],
                vec!["v"],
                vec![],
            ),
            (
                "delete: wrong value removed",
                MismatchAction::Delete,
                "v",
                vec![("x-h", "w")],
                vec![],
                vec![(Rejected, "w")],
            ),
            (
                "delete: missing stays missing",
                MismatchAction::Delete,
                "v",
                vec![],
                vec![],
                vec![],
            ),
            (
                "delete: presence mismatch does nothing",
                MismatchAction::Delete,
                "",
                vec![],
                vec![],
                vec![],
            ),
            (
                "delete: match kept",
                MismatchAction::Delete,
                "v",
                vec![("x-h", "v")],
                vec!["v"],
                vec![],
            ),
            (
                "replace: wrong value replaced",
                MismatchAction::Replace,
                "v",
                vec![("x-h", "w")],
                vec!["v"],
                vec![(Rejected, "w"), (Missing, "v")],
            ),
            (
                "replace: missing set",
                MismatchAction::Replace,
                "v",
                vec![],
                vec!["v"],
                vec![(Missing, "v")],
            ),
            (
                "replace: all values replaced",
                MismatchAction::Replace,
                "v",
                vec![("x-h", "a"), ("x-h", "b")],
                vec!["v"],
                vec![(Rejected, "a,b"), (Missing, "v")],
            ),
        ];
        for (name, action, value, headers, after, log) in cases {
            let policy = HttpPolicy::compile(&[HttpRuleSpec {
                header_matches: vec![hm("X-H", value, action)],
                ..rule()
            }])
            .expect("policy");
            let mut request = req("GET", "/", &headers);
            let verdict = check(&policy, &mut request);
            assert!(verdict.allowed, "case {name:?}: non-failing actions allow");
            let values: Vec<&str> = request
                .headers
                .get_all("x-h")
                .iter()
                .map(|v| v.to_str().expect("ascii"))
                .collect();
            assert_eq!(values, after, "case {name:?}: headers");
            let got: Vec<(HeaderLogKind, &str)> = verdict
                .header_log
                .iter()
                .map(|entry| (entry.kind, entry.value.as_str()))
                .collect();
            assert_eq!(got, log, "case {name:?}: log");
            assert!(verdict.header_log.iter().all(|entry| entry.name == "x-h"));
        }
    }

    #[test]
    fn header_actions_run_for_every_matching_rule() {
        let policy = HttpPolicy::compile(&[
            HttpRuleSpec {
                path: s("/a.*"),
                header_matches: vec![hm("X-One", "1", MismatchAction::Add)],
                ..rule()
            },
            HttpRuleSpec {
                path: s("/nope"),
                header_matches: vec![hm("X-Never", "1", MismatchAction::Add)],
                ..rule()
            },
            HttpRuleSpec {
                header_matches: vec![hm("X-Two", "2", MismatchAction::Replace)],
                ..rule()
            },
        ])
        .expect("policy");
        let mut request = req("GET", "/abc", &[]);
        let verdict = check(&policy, &mut request);
        assert_eq!(verdict.rule, RuleRef::Rule(0));
        assert_eq!(
            request.headers.get("x-one").map(|v| v.as_bytes()),
            Some(&b"1"[..])
        );
        assert_eq!(
            request.headers.get("x-two").map(|v| v.as_bytes()),
            Some(&b"2"[..])
        );
        assert!(request.headers.get("x-never").is_none());
    }

    #[test]
    fn a_denied_request_reports_default_deny() {
        let policy = HttpPolicy::compile(&[HttpRuleSpec {
            method: s("GET"),
            ..rule()
        }])
        .expect("policy");
        let verdict = check(&policy, &mut req("POST", "/", &[]));
        assert!(!verdict.allowed);
        assert_eq!(verdict.rule, RuleRef::DefaultDeny);
        assert_eq!(verdict.rule.to_string(), "default-deny");
        assert_eq!(RuleRef::Rule(3).to_string(), "rule 3");
    }

    #[test]
    fn compile_errors_name_the_rule_and_field() {
        let cases: Vec<(HttpRuleSpec, &str)> = vec![
            (
                HttpRuleSpec {
                    path: s("/(unclosed"),
                    ..rule()
                },
                "http rule 1: path: invalid regex",
            ),
            (
                HttpRuleSpec {
                    method: s("GET("),
                    ..rule()
                },
                "http rule 1: method: invalid regex",
            ),
            (
                HttpRuleSpec {
                    host: s("*.example.com"),
                    ..rule()
                },
                "http rule 1: host: invalid regex",
            ),
            (
                HttpRuleSpec {
                    path: s("(a)\\1"),
                    ..rule()
                },
                "http rule 1: path: invalid regex",
            ),
            (
                HttpRuleSpec {
                    headers: vec!["Bad Name: x".into(), "Bad\u{7f}".into()],
                    ..rule()
                },
                "http rule 1: headers[1]",
            ),
            (
                HttpRuleSpec {
                    headers: vec!["X-A: bad\nvalue".into()],
                    ..rule()
                },
                "http rule 1: headers[0]",
            ),
            (
                HttpRuleSpec {
                    header_matches: vec![hm("", "x", MismatchAction::Fail)],
                    ..rule()
                },
                "http rule 1: headerMatches[0].name",
            ),
            (
                HttpRuleSpec {
                    header_matches: vec![hm("x", "a\rb", MismatchAction::Add)],
                    ..rule()
                },
                "http rule 1: headerMatches[0].value",
            ),
            (
                HttpRuleSpec {
                    header_matches: vec![hm(":path", "/x", MismatchAction::Replace)],
                    ..rule()
                },
                "http rule 1: headerMatches[0].mismatch",
            ),
        ];
        for (spec, want) in cases {
            let err = HttpPolicy::compile(&[rule(), spec.clone()]).expect_err("must fail");
            let text = err.to_string();
            assert!(
                text.starts_with(want),
                "{spec:?}: got {text:?}, want prefix {want:?}"
            );
        }
    }

    #[test]
    fn oversized_regexes_are_rejected() {
        let spec = HttpRuleSpec {
            path: s("/(\\w+){20}"),
            ..rule()
        };
        let err = HttpPolicy::compile_with_limit(std::slice::from_ref(&spec), 4 * 1024)
            .expect_err("too big");
        assert!(
            matches!(
                err,
                PolicyError::RegexTooBig {
                    rule: 0,
                    field: "path",
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("larger than the limit of 4096 bytes"),
            "{err}"
        );
        // A realistic path fits the default.
        HttpPolicy::compile(&[HttpRuleSpec {
            path: s("/api/v[0-9]+/users/\\w+(/.*)?"),
            ..rule()
        }])
        .expect("default limit fits realistic rules");
    }

    #[test]
    fn mismatch_action_spellings() {
        for action in [
            MismatchAction::Fail,
            MismatchAction::Log,
            MismatchAction::Add,
            MismatchAction::Delete,
            MismatchAction::Replace,
        ] {
            assert_eq!(MismatchAction::parse(action.as_str()), Some(action));
        }
        assert_eq!(MismatchAction::parse("log"), None);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// A rule is a full match: an escaped literal path matches itself and nothing
            /// with anything before or after it.
            #[test]
            fn literal_paths_match_exactly(path in "/[a-zA-Z0-9._~%!$&'()*+,;=:@/?-]{0,40}", extra in "[a-z0-9/]{1,5}") {
                let policy = HttpPolicy::compile(&[HttpRuleSpec {
                    path: Some(regex::escape(&path)),
                    ..HttpRuleSpec::default()
                }]).expect("escaped literal compiles");
                let check_path = |target: &str| {
                    let Ok(uri) = target.parse::<Uri>() else { return None };
                    let mut headers = HeaderMap::new();
                    Some(policy.check(&mut RequestParts { method: &Method::GET, uri: &uri, headers: &mut headers }).allowed)
                };
                // Targets http::Uri refuses are irrelevant here (hyper would refuse them too).
                if let Some(allowed) = check_path(&path) {
                    prop_assert!(allowed, "{} must match itself", path);
                }
                if let Some(allowed) = check_path(&format!("{path}{extra}")) {
                    prop_assert!(!allowed, "{}{} must not match", path, extra);
                }
                if let Some(allowed) = check_path(&format!("/{extra}{path}")) {
                    prop_assert!(!allowed, "/{}{} must not match", extra, path);
                }
            }
        }
    }
}
