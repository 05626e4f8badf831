//! membrane's Kubernetes deployment: the Helm chart `deploy/helm/membrane` (CRDs in its
//! `crds/`, templates, `values.yaml`, `values.schema.json`) and its renderer.
//!
//! Helm cannot run on our machines, so the chart is rendered here by a Go `text/template`
//! interpreter ([`template`]) with Helm's functions, after Helm's steps: the user's values
//! are merged over the chart's, checked against `values.schema.json` ([`schema`]), then
//! every template is executed with `.Values`, `.Release`, `.Chart`. The chart's files are
//! compiled into this crate, so `membrane install --dry-run` prints exactly what the tests
//! rendered and checked; a test keeps [`CHART_FILES`] equal to the folder.
//!
//! After rendering, each document must be a YAML mapping with `apiVersion`, `kind` and
//! `metadata.name`, and the DaemonSet's agent arguments must parse as `AgentArgs` and render
//! back identically (`AgentArgs::to_args()`): the chart cannot drift from the agent's parser.
//!
//! Must not depend on aya, wasmtime, tokio or kube (the CLI links it).

pub mod schema;
pub mod template;
pub mod value;

use std::collections::BTreeMap;

use clap::Parser as _;
use membrane_agent_api::args::AgentArgs;

pub use schema::ValuesError;
pub use template::TemplateError;
pub use value::Value;

/// The chart's name (as in `Chart.yaml`).
pub const CHART_NAME: &str = "membrane";

macro_rules! chart_files {
    ($($path:literal),* $(,)?) => {
        /// Every file of `deploy/helm/membrane`, by its path in the chart, compiled in.
        pub const CHART_FILES: &[(&str, &str)] = &[
            $(($path, include_str!(concat!("../helm/membrane/", $path))),)*
        ];
    };
}

chart_files!(
    "Chart.yaml",
    "values.yaml",
    "values.schema.json",
    "crds/ciliumnetworkpolicies.yaml",
    "crds/ciliumclusterwidenetworkpolicies.yaml",
    "crds/wasmfilters.yaml",
    "templates/_helpers.tpl",
    "templates/NOTES.txt",
    "templates/validate.yaml",
    "templates/configmap.yaml",
    "templates/serviceaccounts.yaml",
    "templates/rbac.yaml",
    "templates/daemonset.yaml",
    "templates/hubble/peer-service.yaml",
    "templates/hubble/metrics-service.yaml",
    "templates/hubble/servicemonitor.yaml",
    "templates/hubble/relay.yaml",
    "templates/hubble/ui.yaml",
);

/// Why an installation could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{file}: not valid YAML: {source}")]
    ValuesYaml {
        file: String,
        source: serde_yaml_ng::Error,
    },
    #[error("{file}: the values must be a mapping at the top level")]
    ValuesNotMapping { file: String },
    #[error("values don't meet the chart's schema (values.schema.json):\n{}", list(.0))]
    Values(Vec<ValuesError>),
    /// A template refused the values (`fail`/`required`): the message names the key.
    #[error("execution error at ({CHART_NAME}/{}:{}:{}): {}", .0.file, .0.line, .0.col, .0.message)]
    Refused(TemplateError),
    #[error("template error in {CHART_NAME}/{0}")]
    Template(TemplateError),
    #[error("{CHART_NAME}/{file}: rendered document {index} is not a Kubernetes object: {problem}")]
    Manifest {
        file: String,
        index: usize,
        problem: String,
    },
    #[error(
        "{CHART_NAME}/{file}: the agent's args do not make membrane-agent's command line: {problem}"
    )]
    AgentArgs { file: String, problem: String },
    #[error("the chart itself is broken: {0}")]
    Chart(String),
}

fn list(errors: &[ValuesError]) -> String {
    errors
        .iter()
        .map(|e| format!("- {e}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The release being installed (Helm's `.Release`).
#[derive(Clone, Debug)]
pub struct Release {
    pub name: String,
    pub namespace: String,
}

impl Default for Release {
    fn default() -> Self {
        Self {
            name: "membrane".into(),
            namespace: "kube-system".into(),
        }
    }
}

/// One rendered file: its path in the chart and its documents (each a YAML text).
#[derive(Clone, Debug)]
pub struct RenderedFile {
    pub path: String,
    pub documents: Vec<String>,
}

/// What an installation consists of.
#[derive(Clone, Debug)]
pub struct Rendered {
    /// The chart's `crds/`, installed first and never templated (as Helm does).
    pub crds: Vec<RenderedFile>,
    /// The templates' objects, in file order.
    pub manifests: Vec<RenderedFile>,
    /// The rendered `NOTES.txt`.
    pub notes: String,
    /// The values the templates saw (chart defaults with the user's merged over them).
    pub values: Value,
}

impl Rendered {
    /// All objects as one YAML stream with Helm's `# Source:` comments (`helm template
    /// --include-crds` / `cilium install --dry-run`).
    pub fn to_yaml_stream(&self) -> String {
        let mut out = String::new();
        for file in self.crds.iter().chain(&self.manifests) {
            for doc in &file.documents {
                out.push_str("---\n");
                out.push_str(&format!("# Source: {CHART_NAME}/{}\n", file.path));
                out.push_str(doc.trim_end());
                out.push('\n');
            }
        }
        out
    }

    /// Every object (CRDs first) as parsed YAML, with the file it came from.
    pub fn objects(&self) -> Vec<(String, serde_yaml_ng::Value)> {
        let mut out = Vec::new();
        for file in self.crds.iter().chain(&self.manifests) {
            for doc in &file.documents {
                if let Ok(v) = serde_yaml_ng::from_str(doc) {
                    out.push((file.path.clone(), v));
                }
            }
        }
        out
    }
}

fn chart_file(path: &str) -> Result<&'static str, InstallError> {
    CHART_FILES
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, text)| *text)
        .ok_or_else(|| InstallError::Chart(format!("{path} missing")))
}

fn parse_values(file: &str, text: &str) -> Result<Value, InstallError> {
    let yaml: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(text).map_err(|source| InstallError::ValuesYaml {
            file: file.to_owned(),
            source,
        })?;
    match Value::from(&yaml) {
        Value::Map(m) => Ok(Value::Map(m)),
        // An empty file is no values.
        Value::Null => Ok(Value::Map(BTreeMap::new())),
        _ => Err(InstallError::ValuesNotMapping {
            file: file.to_owned(),
        }),
    }
}

/// Helm's coalescing: the user's maps merge into the chart's key by key; any other value
/// replaces; a null deletes the chart's key.
fn merge(base: &mut BTreeMap<String, Value>, over: BTreeMap<String, Value>) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (_, Value::Null) => {
                base.remove(&k);
            }
            (Some(Value::Map(b)), Value::Map(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// The chart's values with the user's values files (`(name, text)`, later ones win, as
/// Helm's repeated `--values`) merged over them, checked against `values.schema.json`.
pub fn values(files: &[(&str, &str)]) -> Result<Value, InstallError> {
    let Value::Map(mut merged) = parse_values("values.yaml", chart_file("values.yaml")?)? else {
        return Err(InstallError::Chart("values.yaml is not a mapping".into()));
    };
    for (file, text) in files {
        let Value::Map(over) = parse_values(file, text)? else {
            return Err(InstallError::ValuesNotMapping {
                file: (*file).to_owned(),
            });
        };
        merge(&mut merged, over);
    }
    let merged = Value::Map(merged);
    let schema: serde_json::Value = serde_json::from_str(chart_file("values.schema.json")?)
        .map_err(|e| InstallError::Chart(format!("values.schema.json: {e}")))?;
    schema::check_schema(&schema, "").map_err(InstallError::Chart)?;
    let mut problems = Vec::new();
    schema::validate(&schema, &merged.to_json(), "", &mut problems);
    if problems.is_empty() {
        Ok(merged)
    } else {
        Err(InstallError::Values(problems))
    }
}

/// Renders the chart for one values file `user` named `file` (`None`: the chart's defaults).
pub fn render(file: &str, user: Option<&str>, release: &Release) -> Result<Rendered, InstallError> {
    match user {
        Some(text) => render_files(&[(file, text)], release),
        None => render_files(&[], release),
    }
}

/// Renders the chart for values files `(name, text)` merged in order.
pub fn render_files(files: &[(&str, &str)], release: &Release) -> Result<Rendered, InstallError> {
    let values = values(files)?;
    let chart: serde_yaml_ng::Value = serde_yaml_ng::from_str(chart_file("Chart.yaml")?)
        .map_err(|e| InstallError::Chart(format!("Chart.yaml: {e}")))?;
    let chart_field = |k: &str| {
        chart
            .get(k)
            .and_then(|v| v.as_str())
            .map(|s| Value::Str(s.to_owned()))
            .unwrap_or(Value::Null)
    };
    let map = |pairs: Vec<(&str, Value)>| {
        Value::Map(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
    };
    let root = map(vec![
        ("Values", values.clone()),
        (
            "Release",
            map(vec![
                ("Name", Value::Str(release.name.clone())),
                ("Namespace", Value::Str(release.namespace.clone())),
                ("Service", Value::Str("Helm".into())),
                ("Revision", Value::Int(1)),
                ("IsInstall", Value::Bool(true)),
                ("IsUpgrade", Value::Bool(false)),
            ]),
        ),
        (
            "Chart",
            map(vec![
                ("Name", chart_field("name")),
                ("Version", chart_field("version")),
                ("AppVersion", chart_field("appVersion")),
            ]),
        ),
    ]);

    let mut set = template::TemplateSet::default();
    let templates: Vec<&(&str, &str)> = CHART_FILES
        .iter()
        .filter(|(p, _)| p.starts_with("templates/"))
        .collect();
    for (path, text) in &templates {
        set.add_file(path, text).map_err(InstallError::Template)?;
    }
    let fail = |e: TemplateError| {
        if e.refused {
            InstallError::Refused(e)
        } else {
            InstallError::Template(e)
        }
    };
    let mut manifests = Vec::new();
    let mut notes = String::new();
    for (path, _) in &templates {
        let name = path.rsplit('/').next().unwrap_or(path);
        if name.starts_with('_') {
            continue;
        }
        let text = set.render(path, &root).map_err(fail)?;
        if *path == "templates/NOTES.txt" {
            notes = text;
            continue;
        }
        let documents = split_documents(path, &text)?;
        if !documents.is_empty() {
            manifests.push(RenderedFile {
                path: (*path).to_owned(),
                documents,
            });
        }
    }
    let mut crds = Vec::new();
    for (path, text) in CHART_FILES.iter().filter(|(p, _)| p.starts_with("crds/")) {
        crds.push(RenderedFile {
            path: (*path).to_owned(),
            documents: split_documents(path, text)?,
        });
    }
    let rendered = Rendered {
        crds,
        manifests,
        notes,
        values,
    };
    check_agent_args(&rendered)?;
    Ok(rendered)
}

/// The non-empty documents of a rendered file, each checked to be a Kubernetes object.
fn split_documents(path: &str, text: &str) -> Result<Vec<String>, InstallError> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let flush = |current: &mut String, docs: &mut Vec<String>| -> Result<(), InstallError> {
        let doc = std::mem::take(current);
        let meaningful = doc
            .lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
        if !meaningful {
            return Ok(());
        }
        let index = docs.len();
        let bad = |problem: String| InstallError::Manifest {
            file: path.to_owned(),
            index,
            problem,
        };
        let v: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(&doc).map_err(|e| bad(format!("YAML parse error: {e}")))?;
        for key in ["apiVersion", "kind"] {
            if !v.get(key).is_some_and(|k| k.is_string()) {
                return Err(bad(format!("no {key}")));
            }
        }
        if !v
            .get("metadata")
            .and_then(|m| m.get("name"))
            .is_some_and(|n| n.is_string())
        {
            return Err(bad("no metadata.name".into()));
        }
        docs.push(doc);
        Ok(())
    };
    for line in text.lines() {
        if line.trim_end() == "---" {
            flush(&mut current, &mut docs)?;
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    flush(&mut current, &mut docs)?;
    Ok(docs)
}

/// The values kubelet gives the `$(VAR)` references of the agent's args, for the check:
/// what the field references resolve to on a node (`spec.nodeName`, `status.hostIP`).
fn sample_env(field_path: &str) -> Option<&'static str> {
    match field_path {
        "spec.nodeName" => Some("node-1"),
        "status.hostIP" => Some("192.0.2.1"),
        _ => None,
    }
}

/// Expands `$(VAR)` as kubelet does with the container's env (`$$` escapes a dollar).
pub fn expand_env(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(t) = tail.strip_prefix("$$") {
            out.push('$');
            rest = t;
        } else if let Some(close) = tail.strip_prefix("$(").and_then(|t| t.find(')')) {
            let name = &tail[2..2 + close];
            match env.get(name) {
                Some(v) => out.push_str(v),
                None => out.push_str(&tail[..close + 3]),
            }
            rest = &tail[close + 3..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// The agent container of the rendered DaemonSet: its args with `$(VAR)` expanded the way
/// kubelet would on a node.
pub fn agent_container_args(rendered: &Rendered) -> Option<(String, Vec<String>)> {
    for file in &rendered.manifests {
        for doc in &file.documents {
            let Ok(v) = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(doc) else {
                continue;
            };
            if v.get("kind").and_then(|k| k.as_str()) != Some("DaemonSet") {
                continue;
            }
            let containers = v
                .get("spec")
                .and_then(|s| s.get("template"))
                .and_then(|t| t.get("spec"))
                .and_then(|s| s.get("containers"))
                .and_then(|c| c.as_sequence())?;
            let agent = containers
                .iter()
                .find(|c| c.get("name").and_then(|n| n.as_str()) == Some("agent"))?;
            let mut env = BTreeMap::new();
            for e in agent
                .get("env")
                .and_then(|e| e.as_sequence())
                .into_iter()
                .flatten()
            {
                let name = e.get("name").and_then(|n| n.as_str()).unwrap_or_default();
                let value = e.get("value").and_then(|v| v.as_str()).or_else(|| {
                    e.get("valueFrom")
                        .and_then(|f| f.get("fieldRef"))
                        .and_then(|f| f.get("fieldPath"))
                        .and_then(|p| p.as_str())
                        .and_then(sample_env)
                });
                if let Some(value) = value {
                    env.insert(name.to_owned(), value.to_owned());
                }
            }
            let args = agent
                .get("args")
                .and_then(|a| a.as_sequence())
                .map(|a| {
                    a.iter()
                        .map(|s| match s {
                            serde_yaml_ng::Value::String(s) => expand_env(s, &env),
                            other => serde_yaml_ng::to_string(other)
                                .unwrap_or_default()
                                .trim_end()
                                .to_owned(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            return Some((file.path.clone(), args));
        }
    }
    None
}

fn check_agent_args(rendered: &Rendered) -> Result<(), InstallError> {
    let Some((file, args)) = agent_container_args(rendered) else {
        return Err(InstallError::Chart(
            "no DaemonSet with an `agent` container".into(),
        ));
    };
    let parsed =
        AgentArgs::try_parse_from(std::iter::once("membrane-agent".to_owned()).chain(args.clone()))
            .map_err(|e| InstallError::AgentArgs {
                file: file.clone(),
                problem: e.to_string().lines().next().unwrap_or_default().to_owned(),
            })?;
    if parsed.to_args() != args {
        return Err(InstallError::AgentArgs {
            file,
            problem: format!(
                "they parse, but AgentArgs::to_args() renders them as {:?}, not {:?}",
                parsed.to_args(),
                args
            ),
        });
    }
    Ok(())
}
