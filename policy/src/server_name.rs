//! TLS server names: the entries of `toPorts[].serverNames` (Cilium's `ServerName`), their
//! validation, and matching against the server name (SNI) a client sends in its TLS
//! ClientHello. The proxy enforces them without terminating TLS (cilium-semantics.md §1.4).
//!
//! Accepted forms (lower-cased; one trailing dot is dropped):
//! - an exact DNS name, `api.example.com`: labels of 1–63 characters from `a-z`, `0-9`, `-`
//!   and `_` (the characters of Cilium's CRD pattern), at most 253 characters in all;
//! - a leading wildcard label, `*.example.com`: matches exactly one more label
//!   (`a.example.com`, not `example.com` nor `a.b.example.com`), as one `*` in a toFQDNs
//!   `matchPattern` does. A `*` anywhere else (`a*.example.com`, `**.example.com`, a bare
//!   `*`) is rejected rather than guessed at: to allow every name, allow the port without
//!   `serverNames`.
//!
//! Matching is case-insensitive (DNS names are; RFC 6066 §3 puts the SNI in ASCII).
//! Pure: no I/O.

use std::fmt;

use serde::{Serialize, Serializer};

/// Longest DNS name in presentation form without the trailing dot (RFC 1035 §2.3.4).
pub const MAX_SERVER_NAME_LEN: usize = 253;
/// Longest DNS label (RFC 1035 §2.3.4).
const MAX_LABEL_LEN: usize = 63;

/// One `serverNames` entry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ServerName {
    /// This name exactly (lower-case, no trailing dot).
    Exact(String),
    /// `*.<suffix>`: one label, then this suffix (lower-case, no trailing dot).
    Wildcard(String),
}

impl ServerName {
    /// Validates one entry; the error says what is wrong with it (the caller adds the field).
    pub fn parse(text: &str) -> Result<ServerName, String> {
        let name = text.strip_suffix('.').unwrap_or(text);
        if name.is_empty() {
            return Err(format!("server name {text:?} is empty"));
        }
        if name.len() > MAX_SERVER_NAME_LEN {
            return Err(format!(
                "server name {text:?} is {} characters long, the max is {MAX_SERVER_NAME_LEN}",
                name.len()
            ));
        }
        let lower = name.to_ascii_lowercase();
        let (wildcard, rest) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None if lower == "*" => (true, ""),
            None => (false, lower.as_str()),
        };
        if rest.is_empty() {
            return Err(format!(
                "server name {text:?} has a wildcard and nothing after it (to allow every name, leave serverNames out)"
            ));
        }
        for label in rest.split('.') {
            if label.is_empty() {
                return Err(format!("server name {text:?} has an empty label"));
            }
            if label.len() > MAX_LABEL_LEN {
                return Err(format!(
                    "server name {text:?} has a label longer than {MAX_LABEL_LEN} characters"
                ));
            }
            if label.contains('*') {
                return Err(format!(
                    "server name {text:?}: a wildcard is only supported as the whole first label (\"*.example.com\")"
                ));
            }
            if !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
            {
                return Err(format!(
                    "invalid characters in server name {text:?}: only a-z, A-Z, 0-9, '-', '_' and '.' are allowed (and a leading \"*.\")"
                ));
            }
        }
        let rest = rest.to_owned();
        Ok(if wildcard {
            ServerName::Wildcard(rest)
        } else {
            ServerName::Exact(rest)
        })
    }

    /// Whether the client's server name (as sent: any case, maybe a trailing dot) matches.
    pub fn matches(&self, sni: &str) -> bool {
        let sni = sni.strip_suffix('.').unwrap_or(sni);
        match self {
            ServerName::Exact(name) => sni.eq_ignore_ascii_case(name),
            ServerName::Wildcard(suffix) => {
                // `<label>.<suffix>` with a non-empty label that has no dot. Slicing at a
                // char boundary: `suffix` is ASCII, so a byte-wise case-insensitive match
                // ends on one.
                let Some(split) = sni.len().checked_sub(suffix.len() + 1) else {
                    return false;
                };
                let (label, dotted) = sni.as_bytes().split_at(split);
                dotted[0] == b'.'
                    && dotted[1..].eq_ignore_ascii_case(suffix.as_bytes())
                    && !label.is_empty()
                    && !label.contains(&b'.')
            }
        }
    }
}

impl fmt::Display for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerName::Exact(name) => f.write_str(name),
            ServerName::Wildcard(suffix) => write!(f, "*.{suffix}"),
        }
    }
}

impl Serialize for ServerName {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> ServerName {
        ServerName::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn parses_names_and_leading_wildcards() {
        assert_eq!(
            name("Api.Example.COM."),
            ServerName::Exact("api.example.com".into())
        );
        assert_eq!(
            name("*.example.com"),
            ServerName::Wildcard("example.com".into())
        );
        assert_eq!(name("*.example.com").to_string(), "*.example.com");
        assert_eq!(name("a_b-c.d").to_string(), "a_b-c.d");
        let longest = format!("{}.{}", "a".repeat(63), "b".repeat(63));
        assert_eq!(name(&longest).to_string(), longest);
    }

    #[test]
    fn rejects_what_it_cannot_match_faithfully() {
        for (text, needle) in [
            ("", "empty"),
            (".", "empty"),
            ("*", "wildcard and nothing after it"),
            ("*.", "wildcard and nothing after it"),
            ("**.example.com", "whole first label"),
            ("a*.example.com", "whole first label"),
            ("a.*.example.com", "whole first label"),
            ("a..b", "empty label"),
            (".a", "empty label"),
            ("exa mple.com", "invalid characters"),
            ("example.com:443", "invalid characters"),
            ("bücher.de", "invalid characters"),
        ] {
            let error = ServerName::parse(text).expect_err(text);
            assert!(error.contains(needle), "{text:?}: {error}");
        }
        let long_label = format!("{}.com", "a".repeat(64));
        assert!(ServerName::parse(&long_label).is_err());
        let long_name = ["abcdefghi"; 26].join(".");
        assert_eq!(long_name.len(), 259);
        assert!(
            ServerName::parse(&long_name)
                .expect_err("too long")
                .contains("max is 253")
        );
    }

    #[test]
    fn matches_case_insensitively_and_one_label_for_a_wildcard() {
        let exact = name("api.example.com");
        assert!(exact.matches("api.example.com"));
        assert!(exact.matches("API.Example.Com"));
        assert!(exact.matches("api.example.com."));
        assert!(!exact.matches("api.example.com.evil"));
        assert!(!exact.matches("xapi.example.com"));
        assert!(!exact.matches(""));

        let wildcard = name("*.example.com");
        assert!(wildcard.matches("a.example.com"));
        assert!(wildcard.matches("WWW.EXAMPLE.COM"));
        assert!(!wildcard.matches("example.com"));
        assert!(!wildcard.matches(".example.com"));
        assert!(!wildcard.matches("a.b.example.com"));
        assert!(!wildcard.matches("aexample.com"));
        assert!(!wildcard.matches("a.example.com.evil"));
        // Multi-byte input never panics (slicing is byte-wise and checked).
        assert!(!wildcard.matches("é.example.com.é"));
        assert!(!wildcard.matches("é"));
    }
}
