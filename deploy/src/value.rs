//! The values a chart's templates see, with Helm's data model: values files are read as
//! JSON would hold them (every number a float64, as `sigs.k8s.io/yaml` leaves them), maps
//! are ordered by key (Go's `range` and `toYaml` sort keys), and printing follows Go's `%v`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// A template value. `Int` only comes from literals in templates and from `int`/`len`;
/// numbers read from values files are `Float`, as in Helm.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<Value>),
    Map(BTreeMap<String, Value>),
}

impl Value {
    /// Go template truth: false, 0, nil, and empty strings, lists and maps are false.
    pub fn truthy(&self) -> bool {
        match self {
            Value::Null => false,
            Value::Bool(b) => *b,
            Value::Int(i) => *i != 0,
            Value::Float(f) => *f != 0.0,
            Value::Str(s) => !s.is_empty(),
            Value::List(l) => !l.is_empty(),
            Value::Map(m) => !m.is_empty(),
        }
    }

    /// Go's kind name (`kindOf`), used in messages and `kindIs`.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "invalid",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float64",
            Value::Str(_) => "string",
            Value::List(_) => "slice",
            Value::Map(_) => "map",
        }
    }

    /// How `{{ value }}` prints (Go's `%v`; nil prints nothing, as Helm replaces
    /// `<no value>` with an empty string).
    pub fn to_go_string(&self) -> String {
        let mut out = String::new();
        self.write_go(&mut out);
        out
    }

    fn write_go(&self, out: &mut String) {
        match self {
            Value::Null => {}
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Int(i) => {
                let _ = write!(out, "{i}");
            }
            Value::Float(f) => out.push_str(&go_float_v(*f)),
            Value::Str(s) => out.push_str(s),
            Value::List(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(' ');
                    }
                    item.write_go(out);
                }
                out.push(']');
            }
            Value::Map(map) => {
                out.push_str("map[");
                for (i, (k, v)) in map.iter().enumerate() {
                    if i > 0 {
                        out.push(' ');
                    }
                    out.push_str(k);
                    out.push(':');
                    v.write_go(out);
                }
                out.push(']');
            }
        }
    }

    /// The value at a dotted path of map keys (`["ipam", "mode"]`), if every step exists.
    pub fn get_path(&self, path: &[&str]) -> Option<&Value> {
        let mut cur = self;
        for key in path {
            match cur {
                Value::Map(m) => cur = m.get(*key)?,
                _ => return None,
            }
        }
        Some(cur)
    }
}

/// Go's `%v` of a float64: the shortest representation, in exponent form when the decimal
/// exponent is below -4 or at least 6 (`strconv.FormatFloat(f, 'g', -1, 64)` decides with
/// precision 6, so a value of 1000000 prints `1e+06` in Helm too).
pub fn go_float_v(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        };
    }
    if f == 0.0 {
        return if f.is_sign_negative() {
            "-0".into()
        } else {
            "0".into()
        };
    }
    let exp = f.abs().log10().floor() as i32;
    if !(-4..6).contains(&exp) {
        // Rust's `{:e}` is the shortest mantissa; Go writes the exponent signed, ≥ 2 digits.
        let s = format!("{f:e}");
        let (mantissa, e) = s.split_once('e').unwrap_or((&s, "0"));
        let e: i32 = e.parse().unwrap_or(0);
        let sign = if e < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", e.abs())
    } else {
        format!("{f}")
    }
}

/// How JSON (and so `toYaml`, `toJson`) writes a float64: integers without a fraction.
pub fn json_float(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 1e21 {
        format!("{}", f as i128)
    } else {
        format!("{f}")
    }
}

impl From<&serde_yaml_ng::Value> for Value {
    /// A values file as Helm reads it: numbers become float64, keys become strings.
    fn from(v: &serde_yaml_ng::Value) -> Self {
        use serde_yaml_ng::Value as Y;
        match v {
            Y::Null => Value::Null,
            Y::Bool(b) => Value::Bool(*b),
            Y::Number(n) => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            Y::String(s) => Value::Str(s.clone()),
            Y::Sequence(items) => Value::List(items.iter().map(Value::from).collect()),
            Y::Mapping(m) => Value::Map(
                m.iter()
                    .map(|(k, v)| (yaml_key(k), Value::from(v)))
                    .collect(),
            ),
            Y::Tagged(t) => Value::from(&t.value),
        }
    }
}

fn yaml_key(k: &serde_yaml_ng::Value) -> String {
    use serde_yaml_ng::Value as Y;
    match k {
        Y::String(s) => s.clone(),
        Y::Bool(b) => b.to_string(),
        Y::Number(n) => n.to_string(),
        Y::Null => "null".into(),
        other => serde_yaml_ng::to_string(other)
            .unwrap_or_default()
            .trim_end()
            .to_owned(),
    }
}

impl Value {
    /// The value as JSON (for `toJson` and for schema checks).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::Int(i) => serde_json::Value::from(*i),
            Value::Float(f) => {
                if f.fract() == 0.0 && f.abs() < 9.0e15 {
                    serde_json::Value::from(*f as i64)
                } else {
                    serde_json::Number::from_f64(*f)
                        .map(serde_json::Value::Number)
                        .unwrap_or(serde_json::Value::Null)
                }
            }
            Value::Str(s) => serde_json::Value::String(s.clone()),
            Value::List(l) => serde_json::Value::Array(l.iter().map(Value::to_json).collect()),
            Value::Map(m) => {
                serde_json::Value::Object(m.iter().map(|(k, v)| (k.clone(), v.to_json())).collect())
            }
        }
    }

    /// YAML as Helm's `toYaml` writes it (keys sorted, sequences not indented under their
    /// key, no trailing newline).
    pub fn to_yaml(&self) -> String {
        let mut out = String::new();
        match self {
            Value::Map(m) if !m.is_empty() => write_map(&mut out, m, 0),
            Value::List(l) if !l.is_empty() => write_list(&mut out, l, 0),
            scalar => {
                out.push_str(&yaml_scalar(scalar));
                out.push('\n');
            }
        }
        while out.ends_with('\n') {
            out.pop();
        }
        out
    }
}

fn indent(out: &mut String, n: usize) {
    out.extend(std::iter::repeat_n(' ', n));
}

fn is_block(v: &Value) -> bool {
    matches!(v, Value::Map(m) if !m.is_empty()) || matches!(v, Value::List(l) if !l.is_empty())
}

fn write_map(out: &mut String, m: &BTreeMap<String, Value>, level: usize) {
    for (k, v) in m {
        indent(out, level);
        out.push_str(&yaml_string(k));
        out.push(':');
        match v {
            Value::Map(inner) if !inner.is_empty() => {
                out.push('\n');
                write_map(out, inner, level + 2);
            }
            Value::List(items) if !items.is_empty() => {
                out.push('\n');
                write_list(out, items, level);
            }
            scalar => {
                out.push(' ');
                out.push_str(&yaml_scalar(scalar));
                out.push('\n');
            }
        }
    }
}

fn write_list(out: &mut String, items: &[Value], level: usize) {
    for item in items {
        indent(out, level);
        out.push_str("- ");
        if is_block(item) {
            // The item's first line goes after the dash; the rest is indented under it.
            let mut nested = String::new();
            match item {
                Value::Map(m) => write_map(&mut nested, m, 0),
                Value::List(l) => write_list(&mut nested, l, 0),
                _ => {}
            }
            for (i, line) in nested.lines().enumerate() {
                if i > 0 {
                    indent(out, level + 2);
                }
                out.push_str(line);
                out.push('\n');
            }
        } else {
            out.push_str(&yaml_scalar(item));
            out.push('\n');
        }
    }
}

fn yaml_scalar(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Int(i) => i.to_string(),
        Value::Float(f) => json_float(*f),
        Value::Str(s) => yaml_string(s),
        Value::List(_) => "[]".into(),
        Value::Map(_) => "{}".into(),
    }
}

/// A string as a YAML scalar: plain when that reads back as the same string, else
/// double-quoted with JSON escapes (valid YAML).
pub fn yaml_string(s: &str) -> String {
    if plain_is_safe(s) {
        s.to_owned()
    } else {
        serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
    }
}

fn plain_is_safe(s: &str) -> bool {
    let Some(first) = s.chars().next() else {
        return false;
    };
    if s.starts_with(' ') || s.ends_with(' ') || s.ends_with(':') {
        return false;
    }
    if "-?:,[]{}#&*!|>'\"%@`".contains(first) {
        return false;
    }
    if s.contains(": ") || s.contains(" #") || s.chars().any(|c| c.is_control()) {
        return false;
    }
    // Anything YAML 1.1 or 1.2 would read as another type keeps its quotes.
    let lower = s.to_ascii_lowercase();
    if matches!(
        lower.as_str(),
        "true" | "false" | "yes" | "no" | "on" | "off" | "y" | "n" | "null" | "~"
    ) {
        return false;
    }
    let numeric = s
        .trim_start_matches(['+', '-'])
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_digit() || c == '.');
    !numeric
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_as_go_does() {
        assert_eq!(go_float_v(2.0), "2");
        assert_eq!(go_float_v(100000.0), "100000");
        assert_eq!(go_float_v(1000000.0), "1e+06");
        assert_eq!(go_float_v(0.5), "0.5");
        assert_eq!(go_float_v(0.00001), "1e-05");
        assert_eq!(json_float(1000000.0), "1000000");
    }

    #[test]
    fn to_yaml_reads_back_the_same() {
        let text = "a: {b: [1, {c: 'x: y'}, [2, 3]], d: 'true', e: '', f: {}, g: []}\nh: \"-x\"\ni: '10'\n";
        let y: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).expect("yaml");
        let v = Value::from(&y);
        let back: serde_yaml_ng::Value = serde_yaml_ng::from_str(&v.to_yaml()).expect("reparse");
        assert_eq!(Value::from(&back), v, "{}", v.to_yaml());
        assert!(v.to_yaml().contains("b:\n  - 1"), "{}", v.to_yaml());
    }
}
