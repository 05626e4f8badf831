//! HTTP L7 rules (`rules.http`): validation and a compiled matcher with Cilium/Envoy
//! semantics (reference §1.9).
//!
//! `path`, `method` and `host` are RE2-family regexes matched against the whole value
//! (compiled as `^(?:…)$` with the `regex` crate); `headers` are presence or exact matches;
//! `headerMatches` with the default mismatch action are exact (or presence) matches. All
//! matchers of one rule are ANDed; rules are ORed by the caller. No network code here.

use regex::{Regex, RegexBuilder};
use serde::Serialize;

/// Compiled-size limit per regex. Cilium/Envoy reject oversized RE2 programs; we reject the
/// rule at validation time instead of failing the whole endpoint later (§6.4).
pub const REGEX_SIZE_LIMIT: usize = 64 * 1024;

/// One `rules.http` entry.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct HttpRule {
    /// `method` regex (full match), if set.
    pub method: Option<String>,
    /// `path` regex (full match against `:path`, which includes the query string).
    pub path: Option<String>,
    /// `host` regex (full match against `:authority`).
    pub host: Option<String>,
    /// `headers`: `"Name"` (presence) or `"Name: value"` / `"Name value"` (exact).
    pub headers: Vec<HeaderRequirement>,
    /// `headerMatches`.
    pub header_matches: Vec<HeaderMatch>,
}

/// A `headers` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HeaderRequirement {
    /// Header name (as written; compared case-insensitively).
    pub name: String,
    /// Exact value, or `None` for a presence match.
    pub value: Option<String>,
}

impl HeaderRequirement {
    /// Parses Cilium's `headers` string: split on the first space, trailing `:` of the
    /// name trimmed; a single token is a presence match.
    pub fn parse(s: &str) -> Result<HeaderRequirement, String> {
        let s = s.trim();
        let (name, value) = match s.split_once(' ') {
            Some((n, v)) => (n.trim_end_matches(':'), Some(v.trim().to_owned())),
            None => (s.trim_end_matches(':'), None),
        };
        if name.is_empty() {
            return Err(format!("header {s:?} has an empty name"));
        }
        Ok(HeaderRequirement {
            name: name.to_owned(),
            value,
        })
    }
}

/// What happens when a `headerMatches` entry does not match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum MismatchAction {
    /// `""`: the request is denied.
    Fail,
    /// `LOG`: logged, request continues.
    Log,
    /// `ADD`: value added, request continues.
    Add,
    /// `DELETE`: header deleted, request continues.
    Delete,
    /// `REPLACE`: value replaced, request continues.
    Replace,
}

impl MismatchAction {
    /// Parses the CRD value.
    pub fn from_name(s: &str) -> Option<MismatchAction> {
        Some(match s {
            "" => MismatchAction::Fail,
            "LOG" => MismatchAction::Log,
            "ADD" => MismatchAction::Add,
            "DELETE" => MismatchAction::Delete,
            "REPLACE" => MismatchAction::Replace,
            _ => return None,
        })
    }
}

/// A reference to a Kubernetes secret holding a header value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SecretRef {
    /// Namespace of the secret.
    pub namespace: Option<String>,
    /// Name of the secret.
    pub name: String,
}

/// A `headerMatches` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HeaderMatch {
    /// Header name.
    pub name: String,
    /// Expected value (`None`/empty: presence).
    pub value: Option<String>,
    /// Secret with the expected value. This crate does no I/O: a secret-backed match never
    /// matches unless the caller resolved it into `value` (Cilium: a failed secret fetch
    /// never matches).
    pub secret: Option<SecretRef>,
    /// Mismatch action.
    pub mismatch: MismatchAction,
}

/// Compiles `^(?:re)$`, naming `field` in the error. The error is one line (validation
/// errors end up in one-line reports and logs).
pub(crate) fn compile_full_match(field: &str, re: &str) -> Result<Regex, String> {
    RegexBuilder::new(&format!("^(?:{re})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| format!("invalid {field} regex {re:?}: {}", regex_error_line(&e)))
}

/// The regex crate's syntax errors are multi-line (pattern, caret, `error: …`); the caret
/// points into the wrapped `^(?:…)$` form, so keep only the reason.
fn regex_error_line(e: &regex::Error) -> String {
    match e {
        regex::Error::Syntax(s) => s
            .lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix("error: "))
            .map(str::to_owned)
            .unwrap_or_else(|| s.split_whitespace().collect::<Vec<_>>().join(" ")),
        regex::Error::CompiledTooBig(limit) => {
            format!("compiled regex exceeds the size limit of {limit} bytes")
        }
        other => other
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
    }
}

impl HttpRule {
    /// Compiles the rule (validates the regexes).
    pub fn compile(&self) -> Result<CompiledHttpRule, String> {
        let opt = |field: &str, v: &Option<String>| -> Result<Option<Regex>, String> {
            v.as_deref()
                .map(|r| compile_full_match(field, r))
                .transpose()
        };
        Ok(CompiledHttpRule {
            method: opt("method", &self.method)?,
            path: opt("path", &self.path)?,
            host: opt("host", &self.host)?,
            headers: self.headers.clone(),
            header_matches: self.header_matches.clone(),
        })
    }
}

/// The parts of a request an HTTP rule looks at.
#[derive(Debug, Clone, Copy)]
pub struct HttpRequestView<'a> {
    /// `:method`.
    pub method: &'a str,
    /// `:path` (with query string).
    pub path: &'a str,
    /// `:authority`.
    pub host: &'a str,
    /// Request headers (names compared case-insensitively).
    pub headers: &'a [(&'a str, &'a str)],
}

/// A compiled [`HttpRule`].
#[derive(Debug, Clone)]
pub struct CompiledHttpRule {
    method: Option<Regex>,
    path: Option<Regex>,
    host: Option<Regex>,
    headers: Vec<HeaderRequirement>,
    header_matches: Vec<HeaderMatch>,
}

impl CompiledHttpRule {
    /// True if the request satisfies every matcher of the rule. Non-failing
    /// `headerMatches` (LOG/ADD/DELETE/REPLACE) never deny; applying their side effects is
    /// the proxy's job.
    pub fn matches(&self, req: &HttpRequestView<'_>) -> bool {
        let re_ok = |re: &Option<Regex>, v: &str| re.as_ref().is_none_or(|r| r.is_match(v));
        if !re_ok(&self.method, req.method)
            || !re_ok(&self.path, req.path)
            || !re_ok(&self.host, req.host)
        {
            return false;
        }
        fn header<'r>(
            headers: &'r [(&'r str, &'r str)],
            name: &'r str,
        ) -> impl Iterator<Item = &'r str> + 'r {
            headers
                .iter()
                .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| *v)
        }
        let header = |name| header(req.headers, name);
        for h in &self.headers {
            let ok = match &h.value {
                None => header(&h.name).next().is_some(),
                Some(v) => header(&h.name).any(|x| x == v),
            };
            if !ok {
                return false;
            }
        }
        for m in &self.header_matches {
            if m.mismatch != MismatchAction::Fail {
                continue;
            }
            let ok = match (&m.value, &m.secret) {
                (_, Some(_)) if m.value.is_none() => false,
                (Some(v), _) if !v.is_empty() => header(&m.name).any(|x| x == v),
                _ => header(&m.name).next().is_some(),
            };
            if !ok {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req<'a>(
        method: &'a str,
        path: &'a str,
        headers: &'a [(&'a str, &'a str)],
    ) -> HttpRequestView<'a> {
        HttpRequestView {
            method,
            path,
            host: "example.com",
            headers,
        }
    }

    #[test]
    fn full_match_semantics() {
        let r = HttpRule {
            method: Some("GET".into()),
            path: Some("/public".into()),
            ..Default::default()
        }
        .compile()
        .unwrap();
        assert!(r.matches(&req("GET", "/public", &[])));
        assert!(!r.matches(&req("GET", "/public/x", &[])));
        assert!(!r.matches(&req("GET", "/public?x=1", &[])));
        assert!(!r.matches(&req("POST", "/public", &[])));
        assert!(!r.matches(&req("XGET", "/public", &[])));
        let suffix = HttpRule {
            path: Some(".*public$".into()),
            ..Default::default()
        }
        .compile()
        .unwrap();
        assert!(suffix.matches(&req("GET", "/a/public", &[])));
    }

    #[test]
    fn headers() {
        let r = HttpRule {
            headers: vec![
                HeaderRequirement::parse("X-My-Header: true").unwrap(),
                HeaderRequirement::parse("X-Present").unwrap(),
            ],
            ..Default::default()
        }
        .compile()
        .unwrap();
        assert!(r.matches(&req(
            "GET",
            "/",
            &[("x-my-header", "true"), ("X-Present", "")]
        )));
        assert!(!r.matches(&req(
            "GET",
            "/",
            &[("x-my-header", "false"), ("X-Present", "")]
        )));
        assert!(!r.matches(&req("GET", "/", &[("x-my-header", "true")])));
    }

    #[test]
    fn header_matches() {
        let hm = |value: Option<&str>, mismatch, secret: bool| HeaderMatch {
            name: "token".into(),
            value: value.map(str::to_owned),
            secret: secret.then(|| SecretRef {
                namespace: None,
                name: "s".into(),
            }),
            mismatch,
        };
        let rule = |m| {
            HttpRule {
                header_matches: vec![m],
                ..Default::default()
            }
            .compile()
            .unwrap()
        };
        let ok = rule(hm(Some("abc"), MismatchAction::Fail, false));
        assert!(ok.matches(&req("GET", "/", &[("Token", "abc")])));
        assert!(!ok.matches(&req("GET", "/", &[("Token", "x")])));
        let log = rule(hm(Some("abc"), MismatchAction::Log, false));
        assert!(log.matches(&req("GET", "/", &[])));
        let secret = rule(hm(None, MismatchAction::Fail, true));
        assert!(!secret.matches(&req("GET", "/", &[("Token", "abc")])));
    }

    #[test]
    fn bad_regex_names_field() {
        let e = HttpRule {
            path: Some("/a(".into()),
            ..Default::default()
        }
        .compile()
        .unwrap_err();
        assert_eq!(e, "invalid path regex \"/a(\": unclosed group");
        let huge = format!("({})", "a{1000}".repeat(20));
        let e = compile_full_match("path", &huge).unwrap_err();
        assert!(!e.contains('\n'), "{e}");
        assert!(e.contains("exceeds the size limit"), "{e}");
    }
}
