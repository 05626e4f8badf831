//! DNS names and patterns: `matchName`/`matchPattern` selectors (toFQDNs and `rules.dns`)
//! and their conversion to regexes exactly as Cilium's `pkg/fqdn/matchpattern` (reference §1.10).
//!
//! Owns validation of names/patterns, the anchored form (L3 toFQDNs), the unanchored form
//! (L7 DNS, combined into one `^(?:r1|r2|…)$` per rule set as the DNS proxy does), and the
//! `fqdn:` identity label of a selector. No DNS I/O here.

use std::fmt;

use regex::Regex;
use serde::{Serialize, Serializer};

use crate::labels::Label;

/// DNS label characters (`allowedDNSCharsREGroup`).
const LABEL_CHARS: &str = "[-a-zA-Z0-9_]";

/// Maximum length of a name or pattern (`MaxItems`/length limit in fqdn.go).
pub const MAX_FQDN_LEN: usize = 255;

/// A `matchName` or `matchPattern` selector. Text is lower-cased; no trailing dot is added
/// to the stored text (it is added when converting to a regex).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FqdnSelector {
    /// Exact name (`cilium.io`).
    Name(String),
    /// Pattern with `*` wildcards (`*.cilium.io`, `**.cilium.io`, `*`).
    Pattern(String),
}

impl FqdnSelector {
    /// Validates and builds a `matchName` selector.
    pub fn name(name: &str) -> Result<FqdnSelector, String> {
        let name = name.trim();
        check_len(name)?;
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(format!(
                "invalid characters in matchName {name:?}: only a-z, A-Z, 0-9, '-', '_' and '.' are allowed"
            ));
        }
        Ok(FqdnSelector::Name(name.to_ascii_lowercase()))
    }

    /// Validates and builds a `matchPattern` selector.
    pub fn pattern(pattern: &str) -> Result<FqdnSelector, String> {
        let pattern = pattern.trim();
        check_len(pattern)?;
        if pattern.is_empty()
            || !pattern
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'*'))
        {
            return Err(format!(
                "invalid characters in matchPattern {pattern:?}: only a-z, A-Z, 0-9, '-', '_', '.' and '*' are allowed"
            ));
        }
        Ok(FqdnSelector::Pattern(pattern.to_ascii_lowercase()))
    }

    /// The selector text (name or pattern, lower-case).
    pub fn text(&self) -> &str {
        match self {
            FqdnSelector::Name(s) | FqdnSelector::Pattern(s) => s,
        }
    }

    /// The label that identities of IPs learned for this selector carry:
    /// `fqdn:<matchName or matchPattern>` (`FQDNSelector.IdentityLabel`).
    pub fn identity_label(&self) -> Label {
        Label::fqdn(self.text())
    }

    /// True for `*`, `**`, `*.`, `**.` (match-all patterns).
    pub fn is_match_all(&self) -> bool {
        matches!(self, FqdnSelector::Pattern(p) if is_match_all(p))
    }

    /// Anchored regex (L3 toFQDNs form).
    pub fn anchored_regex(&self) -> String {
        to_anchored_regex(self.text())
    }

    /// Unanchored regex (L7 DNS form, to be combined by [`dns_rules_regex`]).
    pub fn unanchored_regex(&self) -> String {
        to_unanchored_regex(self.text())
    }

    /// Compiles the anchored form; matches names after [`normalize_name`].
    pub fn compile(&self) -> Result<FqdnMatcher, regex::Error> {
        Ok(FqdnMatcher {
            re: Regex::new(&self.anchored_regex())?,
        })
    }
}

impl fmt::Display for FqdnSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FqdnSelector::Name(s) => write!(f, "matchName: {s}"),
            FqdnSelector::Pattern(s) => write!(f, "matchPattern: {s}"),
        }
    }
}

impl Serialize for FqdnSelector {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

fn check_len(s: &str) -> Result<(), String> {
    if s.len() > MAX_FQDN_LEN {
        return Err(format!(
            "name or pattern is {} characters long, the maximum is {MAX_FQDN_LEN}",
            s.len()
        ));
    }
    Ok(())
}

/// `^[*]{1,}[.]?$`: patterns that match every name.
fn is_match_all(p: &str) -> bool {
    let body = p.strip_suffix('.').unwrap_or(p);
    !body.is_empty() && body.bytes().all(|b| b == b'*')
}

/// Cilium's `Sanitize`: lower-case and add the trailing dot (except for `*`).
pub fn sanitize_pattern(p: &str) -> String {
    let p = p.trim().to_ascii_lowercase();
    if p == "*" {
        return p;
    }
    normalize_name(&p)
}

/// Lower-cases a name and makes it fully qualified (trailing dot), as the DNS proxy does
/// with query names before matching.
pub fn normalize_name(name: &str) -> String {
    let mut n = name.to_ascii_lowercase();
    if !n.ends_with('.') {
        n.push('.');
    }
    n
}

fn escape(p: &str) -> String {
    let dotted = p.replace('.', "[.]");
    // A leading run of two or more `*` followed by `.` means "one or more whole labels".
    let stars = dotted.bytes().take_while(|b| *b == b'*').count();
    let (head, rest) = if stars >= 2 && dotted[stars..].starts_with("[.]") {
        (
            format!("({LABEL_CHARS}+([.]{LABEL_CHARS}+){{0,}})[.]"),
            &dotted[stars + 3..],
        )
    } else {
        (String::new(), dotted.as_str())
    };
    // Any other run of `*` is zero or more characters within one label.
    let mut out = head;
    let mut in_stars = false;
    for c in rest.chars() {
        if c == '*' {
            if !in_stars {
                out.push_str(LABEL_CHARS);
                out.push('*');
            }
            in_stars = true;
        } else {
            in_stars = false;
            out.push(c);
        }
    }
    out
}

/// Anchored regex of a pattern (`ToAnchoredRegexp`).
pub fn to_anchored_regex(pattern: &str) -> String {
    let p = pattern.trim().to_ascii_lowercase();
    if is_match_all(&p) {
        return format!("(^({LABEL_CHARS}+[.])+$)|(^[.]$)");
    }
    format!("^{}$", escape(&sanitize_pattern(&p)))
}

/// Unanchored regex of a pattern (`ToUnAnchoredRegexp`); `.*` for match-all.
pub fn to_unanchored_regex(pattern: &str) -> String {
    let p = pattern.trim().to_ascii_lowercase();
    if is_match_all(&p) {
        return ".*".to_owned();
    }
    escape(&sanitize_pattern(&p))
}

/// The regex the DNS proxy uses for one rule set (`GeneratePattern`): `^(?:r1|r2|…)$`, or
/// `(?:)` (match anything) if the set is empty or any selector is match-all.
pub fn dns_rules_regex(rules: &[FqdnSelector]) -> String {
    if rules.is_empty() || rules.iter().any(FqdnSelector::is_match_all) {
        return "(?:)".to_owned();
    }
    let alts: Vec<String> = rules.iter().map(FqdnSelector::unanchored_regex).collect();
    format!("^(?:{})$", alts.join("|"))
}

/// A compiled toFQDNs selector.
#[derive(Debug, Clone)]
pub struct FqdnMatcher {
    re: Regex,
}

impl FqdnMatcher {
    /// True if `name` (lower-cased and made fully qualified first) matches.
    pub fn matches(&self, name: &str) -> bool {
        self.re.is_match(&normalize_name(name))
    }

    /// Matches `name` exactly as given (no normalization): for the L3 match-all edge cases.
    pub fn matches_raw(&self, name: &str) -> bool {
        self.re.is_match(name)
    }
}

/// A compiled L7 DNS rule set (what the DNS proxy evaluates per endpoint, port and peer).
#[derive(Debug, Clone)]
pub struct DnsMatcher {
    re: Regex,
}

impl DnsMatcher {
    /// Compiles the rule set per [`dns_rules_regex`].
    pub fn new(rules: &[FqdnSelector]) -> Result<DnsMatcher, regex::Error> {
        Ok(DnsMatcher {
            re: Regex::new(&dns_rules_regex(rules))?,
        })
    }

    /// True if the query name is allowed (lower-cased and made fully qualified first).
    pub fn allows(&self, qname: &str) -> bool {
        self.re.is_match(&normalize_name(qname))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pat(p: &str) -> FqdnSelector {
        FqdnSelector::pattern(p).unwrap()
    }

    /// Reference §1.10 table: (pattern, matches, does not match). Checked with both the L3
    /// (anchored, toFQDNs) and the L7 (DNS proxy) forms.
    #[test]
    fn pattern_table() {
        let table: &[(&str, &[&str], &[&str])] = &[
            (
                "cilium.io",
                &["cilium.io.", "CILIUM.io."],
                &["www.cilium.io."],
            ),
            (
                "*.cilium.io",
                &["www.cilium.io.", ".cilium.io."],
                &["cilium.io.", "a.b.cilium.io."],
            ),
            (
                "*cilium.io",
                &["cilium.io.", "subcilium.io."],
                &["www.cilium.io."],
            ),
            (
                "sub*.cilium.io",
                &["sub.cilium.io.", "subdomain.cilium.io."],
                &["www.cilium.io."],
            ),
            (
                "**.cilium.io",
                &["a.cilium.io.", "a.b.cilium.io."],
                &["cilium.io."],
            ),
            (
                "*.*.svc.cluster.local",
                &["svc.ns.svc.cluster.local."],
                &["a.b.c.svc.cluster.local."],
            ),
        ];
        for (p, yes, no) in table {
            let l3 = pat(p).compile().unwrap();
            let l7 = DnsMatcher::new(&[pat(p)]).unwrap();
            for n in *yes {
                assert!(l3.matches(n), "L3 {p} should match {n}");
                assert!(l7.allows(n), "L7 {p} should match {n}");
            }
            for n in *no {
                assert!(!l3.matches(n), "L3 {p} should not match {n}");
                assert!(!l7.allows(n), "L7 {p} should not match {n}");
            }
        }
    }

    #[test]
    fn match_all_patterns() {
        for p in ["*", "*.", "**", "**."] {
            let s = pat(p);
            assert!(s.is_match_all(), "{p}");
            let l3 = s.compile().unwrap();
            for n in ["cilium.io.", "a.b.c.", "x.", "."] {
                assert!(l3.matches_raw(n), "L3 {p} should match {n}");
            }
            // (L3) empty string, names without a trailing dot, `..` sequences
            for n in ["", "cilium.io", "a..b."] {
                assert!(!l3.matches_raw(n), "L3 {p} should not match {n:?}");
            }
            assert_eq!(s.unanchored_regex(), ".*");
            assert_eq!(dns_rules_regex(&[pat("cilium.io"), s]), "(?:)");
        }
    }

    #[test]
    fn regex_forms() {
        assert_eq!(to_anchored_regex("cilium.io"), "^cilium[.]io[.]$");
        assert_eq!(
            to_anchored_regex("*.cilium.io"),
            "^[-a-zA-Z0-9_]*[.]cilium[.]io[.]$"
        );
        assert_eq!(
            to_anchored_regex("**.cilium.io"),
            "^([-a-zA-Z0-9_]+([.][-a-zA-Z0-9_]+){0,})[.]cilium[.]io[.]$"
        );
        assert_eq!(to_anchored_regex("*"), "(^([-a-zA-Z0-9_]+[.])+$)|(^[.]$)");
        assert_eq!(to_unanchored_regex("Cilium.IO."), "cilium[.]io[.]");
        assert_eq!(
            dns_rules_regex(&[pat("cilium.io"), pat("*.cilium.io")]),
            "^(?:cilium[.]io[.]|[-a-zA-Z0-9_]*[.]cilium[.]io[.])$"
        );
        assert_eq!(dns_rules_regex(&[]), "(?:)");
    }

    #[test]
    fn validation() {
        assert!(FqdnSelector::name("cilium.io").is_ok());
        assert!(FqdnSelector::name("*.cilium.io").is_err());
        assert!(FqdnSelector::name("").is_err());
        assert!(FqdnSelector::pattern("a b").is_err());
        assert!(FqdnSelector::pattern(&"a".repeat(256)).is_err());
        assert_eq!(FqdnSelector::name("Cilium.IO").unwrap().text(), "cilium.io");
        assert_eq!(
            FqdnSelector::pattern("*.cilium.io")
                .unwrap()
                .identity_label()
                .to_string(),
            "fqdn:*.cilium.io"
        );
    }

    #[test]
    fn match_name_is_literal() {
        let m = DnsMatcher::new(&[FqdnSelector::name("api.cilium.io").unwrap()]).unwrap();
        assert!(m.allows("API.cilium.io"));
        assert!(!m.allows("apixcilium.io."));
    }
}
