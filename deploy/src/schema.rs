//! The chart's `values.schema.json` (JSON Schema, as Helm checks it before rendering) and the
//! checker for it. Only the keywords below are understood; a schema using any other is
//! refused when loaded (so the schema can never say something this checker ignores):
//! `type`, `properties`, `additionalProperties`, `items`, `enum`, `minimum`, `maximum`,
//! `required`, and the annotations `$schema`, `title`, `description`, `default`.

use serde_json::Value as Json;

/// A problem with a values file, naming the key.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ValuesError {
    /// Dotted path of the key (`ipam.operator.clusterPoolIPv4MaskSize`, `hubble.metrics.enabled[2]`).
    pub key: String,
    pub problem: String,
}

const KEYWORDS: &[&str] = &[
    "type",
    "properties",
    "additionalProperties",
    "items",
    "enum",
    "minimum",
    "maximum",
    "required",
    "$schema",
    "title",
    "description",
    "default",
];

/// Refuses a schema that uses a keyword this checker does not implement.
pub fn check_schema(schema: &Json, path: &str) -> Result<(), String> {
    let Json::Object(map) = schema else {
        return Err(format!("schema at {path} is not an object"));
    };
    for (k, v) in map {
        if !KEYWORDS.contains(&k.as_str()) {
            return Err(format!("schema keyword {k:?} at {path} is not supported"));
        }
        match k.as_str() {
            "properties" => {
                let Json::Object(props) = v else {
                    return Err(format!("{path}.properties is not an object"));
                };
                for (name, sub) in props {
                    check_schema(sub, &join(path, name))?;
                }
            }
            "items" => check_schema(v, &format!("{path}[]"))?,
            "additionalProperties" if !v.is_boolean() => check_schema(v, &format!("{path}.*"))?,
            _ => {}
        }
    }
    Ok(())
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn type_name(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "boolean",
        Json::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Json::Number(_) => "number",
        Json::String(_) => "string",
        Json::Array(_) => "array",
        Json::Object(_) => "object",
    }
}

fn has_type(v: &Json, t: &str) -> bool {
    match t {
        "number" => v.is_number(),
        "integer" => v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|f| f.fract() == 0.0),
        other => type_name(v) == other,
    }
}

/// Every problem of `value` against `schema` (`path` is the key of `value`).
pub fn validate(schema: &Json, value: &Json, path: &str, out: &mut Vec<ValuesError>) {
    let problem = |p: String| ValuesError {
        key: if path.is_empty() {
            "(values)".into()
        } else {
            path.to_owned()
        },
        problem: p,
    };
    if let Some(t) = schema.get("type") {
        let types: Vec<&str> = match t {
            Json::String(s) => vec![s.as_str()],
            Json::Array(a) => a.iter().filter_map(Json::as_str).collect(),
            _ => Vec::new(),
        };
        if !types.iter().any(|t| has_type(value, t)) {
            out.push(problem(format!(
                "expected {}, found {} {}",
                types.join(" or "),
                type_name(value),
                value
            )));
            return;
        }
    }
    if let Some(Json::Array(allowed)) = schema.get("enum")
        && !allowed.contains(value)
    {
        let list: Vec<String> = allowed.iter().map(Json::to_string).collect();
        out.push(problem(format!(
            "{value} is not one of {}",
            list.join(", ")
        )));
    }
    if let (Some(min), Some(v)) = (schema.get("minimum").and_then(Json::as_f64), value.as_f64())
        && v < min
    {
        out.push(problem(format!("{value} is below the minimum {min}")));
    }
    if let (Some(max), Some(v)) = (schema.get("maximum").and_then(Json::as_f64), value.as_f64())
        && v > max
    {
        out.push(problem(format!("{value} is above the maximum {max}")));
    }
    if let Json::Array(items) = value
        && let Some(item_schema) = schema.get("items")
    {
        for (i, item) in items.iter().enumerate() {
            validate(item_schema, item, &format!("{path}[{i}]"), out);
        }
    }
    if let Json::Object(map) = value {
        let props = schema.get("properties").and_then(Json::as_object);
        if let Some(Json::Array(required)) = schema.get("required") {
            for r in required.iter().filter_map(Json::as_str) {
                if !map.contains_key(r) {
                    out.push(ValuesError {
                        key: join(path, r),
                        problem: "required".into(),
                    });
                }
            }
        }
        for (k, v) in map {
            let key = join(path, k);
            match props.and_then(|p| p.get(k)) {
                Some(sub) => validate(sub, v, &key, out),
                None => match schema.get("additionalProperties") {
                    Some(Json::Bool(false)) => {
                        // Sorted: serde_json's map keeps insertion order in some builds.
                        let mut known: Vec<&str> = props
                            .map(|p| p.keys().map(String::as_str).collect())
                            .unwrap_or_default();
                        known.sort_unstable();
                        out.push(ValuesError {
                            key,
                            problem: format!(
                                "unknown key (membrane's chart takes {} here{})",
                                if known.is_empty() {
                                    "no keys".to_owned()
                                } else {
                                    known.join(", ")
                                },
                                if path.is_empty() {
                                    String::new()
                                } else {
                                    format!(" under {path}")
                                }
                            ),
                        });
                    }
                    Some(sub @ Json::Object(_)) => validate(sub, v, &key, out),
                    _ => {}
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_the_key_of_each_problem() {
        let schema = json!({"type": "object", "additionalProperties": false, "properties": {
            "a": {"type": "object", "additionalProperties": false, "properties": {
                "n": {"type": "integer", "minimum": 1, "maximum": 32}}},
            "m": {"type": "string", "enum": ["x", "y"]},
            "l": {"type": "array", "items": {"type": "string"}}}});
        check_schema(&schema, "").expect("supported");
        let mut out = Vec::new();
        validate(
            &schema,
            &json!({"a": {"n": 40, "z": 1}, "m": "q", "l": ["s", 3], "b": 1}),
            "",
            &mut out,
        );
        let mut keys: Vec<&str> = out.iter().map(|e| e.key.as_str()).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["a.n", "a.z", "b", "l[1]", "m"], "{out:?}");
        let unknown = out.iter().find(|e| e.key == "a.z").expect("a.z");
        assert!(
            unknown.problem.contains("unknown key") && unknown.problem.contains("takes n"),
            "{out:?}"
        );
        assert!(check_schema(&json!({"pattern": "x"}), "").is_err());
    }
}
