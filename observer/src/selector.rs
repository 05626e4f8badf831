//! Kubernetes label selectors over Cilium labels, as Hubble's label filters use them.
//!
//! Grammar (comma-separated requirements, all must hold): `key`, `!key`, `key=value`,
//! `key==value`, `key!=value`, `key in (a,b)`, `key notin (a,b)`. A key may carry a Cilium
//! source prefix (`k8s:app`); without one (or with `any:`) it matches labels of every
//! source. Flow labels are `source:key=value` strings. As in Kubernetes, `!=` and `notin`
//! also hold when the key is absent.

use std::sync::LazyLock;

use regex::Regex;

/// One parsed flow label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Label<'a> {
    pub source: &'a str,
    pub key: &'a str,
    pub value: &'a str,
}

/// Splits `source:key=value` (a label without a source gets source `unspec`, like Cilium).
pub fn parse_label(label: &str) -> Label<'_> {
    let (kv_start, source) = match (label.find(':'), label.find('=')) {
        (Some(colon), Some(eq)) if colon < eq => (colon + 1, &label[..colon]),
        (Some(colon), None) => (colon + 1, &label[..colon]),
        _ => (0, "unspec"),
    };
    let kv = &label[kv_start..];
    let (key, value) = kv.split_once('=').unwrap_or((kv, ""));
    Label { source, key, value }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    Exists,
    NotExists,
    Equals(String),
    NotEquals(String),
    In(Vec<String>),
    NotIn(Vec<String>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Requirement {
    /// `None` matches any source.
    source: Option<String>,
    key: String,
    op: Op,
}

/// A parsed selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

static SET_OP: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(\S+)\s+(in|notin)\s*\((.*)\)$").unwrap_or_else(|e| unreachable!("{e}"))
});
static KEY: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^([A-Za-z0-9][-A-Za-z0-9_.]*:)?([A-Za-z0-9][-A-Za-z0-9_./]*)$")
        .unwrap_or_else(|e| unreachable!("{e}"))
});
static VALUE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[-A-Za-z0-9_./:]*$").unwrap_or_else(|e| unreachable!("{e}")));

fn split_requirements(selector: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                out.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&selector[start..]);
    out
}

fn key(raw: &str) -> Result<(Option<String>, String), String> {
    let raw = raw.trim();
    let caps = KEY
        .captures(raw)
        .ok_or_else(|| format!("invalid label key {raw:?}"))?;
    let source = caps
        .get(1)
        .map(|m| m.as_str().trim_end_matches(':').to_owned())
        .filter(|s| s != "any");
    Ok((source, caps[2].to_owned()))
}

fn value(raw: &str) -> Result<String, String> {
    let raw = raw.trim();
    if VALUE.is_match(raw) {
        Ok(raw.to_owned())
    } else {
        Err(format!("invalid label value {raw:?}"))
    }
}

fn requirement(raw: &str) -> Result<Requirement, String> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Err("empty requirement".to_owned());
    }
    if let Some(caps) = SET_OP.captures(raw) {
        let (source, key) = key(&caps[1])?;
        let values = caps[3]
            .split(',')
            .map(value)
            .collect::<Result<Vec<_>, _>>()?;
        let op = if &caps[2] == "in" {
            Op::In(values)
        } else {
            Op::NotIn(values)
        };
        return Ok(Requirement { source, key, op });
    }
    if let Some((k, v)) = raw.split_once("!=") {
        let (source, key) = key(k)?;
        return Ok(Requirement {
            source,
            key,
            op: Op::NotEquals(value(v)?),
        });
    }
    if let Some((k, v)) = raw.split_once("==").or_else(|| raw.split_once('=')) {
        let (source, key) = key(k)?;
        return Ok(Requirement {
            source,
            key,
            op: Op::Equals(value(v)?),
        });
    }
    if let Some(k) = raw.strip_prefix('!') {
        let (source, key) = key(k)?;
        return Ok(Requirement {
            source,
            key,
            op: Op::NotExists,
        });
    }
    let (source, key) = key(raw)?;
    Ok(Requirement {
        source,
        key,
        op: Op::Exists,
    })
}

impl Selector {
    /// Parses a selector; an empty string selects everything.
    pub fn parse(selector: &str) -> Result<Self, String> {
        if selector.trim().is_empty() {
            return Ok(Self {
                requirements: Vec::new(),
            });
        }
        let requirements = split_requirements(selector)
            .into_iter()
            .map(requirement)
            .collect::<Result<_, _>>()?;
        Ok(Self { requirements })
    }

    /// Whether the labels (`source:key=value` strings) satisfy every requirement.
    pub fn matches<S: AsRef<str>>(&self, labels: &[S]) -> bool {
        let parsed: Vec<Label<'_>> = labels.iter().map(|l| parse_label(l.as_ref())).collect();
        self.requirements.iter().all(|r| {
            let mut values = parsed
                .iter()
                .filter(|l| l.key == r.key && r.source.as_deref().is_none_or(|s| s == l.source))
                .map(|l| l.value);
            match &r.op {
                Op::Exists => values.next().is_some(),
                Op::NotExists => values.next().is_none(),
                Op::Equals(v) => values.any(|x| x == v),
                Op::NotEquals(v) => values.all(|x| x != v),
                Op::In(set) => values.any(|x| set.iter().any(|v| v == x)),
                Op::NotIn(set) => values.all(|x| set.iter().all(|v| v != x)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LABELS: [&str; 4] = [
        "k8s:app=frontend",
        "k8s:io.kubernetes.pod.namespace=default",
        "k8s:tier=web",
        "reserved:world",
    ];

    #[test]
    fn parses_cilium_labels() {
        assert_eq!(
            parse_label("k8s:app=frontend"),
            Label {
                source: "k8s",
                key: "app",
                value: "frontend"
            }
        );
        assert_eq!(
            parse_label("reserved:world"),
            Label {
                source: "reserved",
                key: "world",
                value: ""
            }
        );
        assert_eq!(
            parse_label("cidr:10.0.0.0/8"),
            Label {
                source: "cidr",
                key: "10.0.0.0/8",
                value: ""
            }
        );
        assert_eq!(parse_label("app=x").source, "unspec");
    }

    #[test]
    fn selector_table() {
        let cases: &[(&str, bool)] = &[
            ("app=frontend", true),
            ("app==frontend", true),
            ("k8s:app=frontend", true),
            ("any:app=frontend", true),
            ("reserved:app=frontend", false),
            ("app=backend", false),
            ("app!=backend", true),
            ("app!=frontend", false),
            ("missing!=x", true),
            ("app in (backend, frontend)", true),
            ("app in (backend)", false),
            ("app notin (backend)", true),
            ("app notin (frontend,backend)", false),
            ("missing notin (x)", true),
            ("app", true),
            ("!app", false),
            ("!missing", true),
            ("reserved:world", true),
            ("app=frontend,tier=web", true),
            ("app=frontend, tier=db", false),
            ("io.kubernetes.pod.namespace=default", true),
            ("", true),
        ];
        for (selector, want) in cases {
            let s = Selector::parse(selector).unwrap_or_else(|e| panic!("{selector}: {e}"));
            assert_eq!(s.matches(&LABELS), *want, "selector {selector:?}");
        }
    }

    #[test]
    fn bad_selectors_are_rejected() {
        for bad in ["app=", "=x", "app=a b", "app in (a", ",", "app=x,"] {
            if bad == "app=" {
                // An empty value is valid in Kubernetes.
                assert!(Selector::parse(bad).is_ok());
                continue;
            }
            assert!(Selector::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
