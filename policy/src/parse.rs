//! Parsing and validation of policy documents: `cilium.io/v2` CiliumNetworkPolicy and
//! CiliumClusterwideNetworkPolicy (`spec` and `specs`) and `networking.k8s.io/v1`
//! NetworkPolicy, from YAML (multi-document) or JSON text, including `kind: List`.
//!
//! Owns the walk from a generic JSON value to the typed model with field paths: every
//! object is checked against its known fields, so an unknown field is an error naming it
//! (`specs[1].egress[0].toPorts[0].rules.kafka: unsupported field`). Cilium's `Sanitize`
//! rules (reference §1.2–1.4, §1.7, §1.10) and the namespace scoping of selectors (§1.5)
//! are applied here. Pure: the caller reads files.

use std::collections::BTreeSet;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::cidr::IpPrefix;
use crate::error::{FieldError, PolicyError};
use crate::fqdn::FqdnSelector;
use crate::http::{HeaderMatch, HeaderRequirement, HttpRule, MismatchAction, SecretRef};
use crate::labels::{Label, LabelSource, Labels, keys};
use crate::model::{
    CidrRule, DefaultDeny, Entity, ICMPV4_TYPES, ICMPV6_TYPES, IcmpFamily, IcmpField, L7Rules,
    PeerRule, Peers, Policy, PolicyKind, Port, PortProtocol, PortRule, Protocol, Rule,
    ServiceSelector, Subject,
};
use crate::selector::{EndpointSelector, Operator, Requirement};
use crate::server_name::ServerName;

/// Maximum `ports` per `toPorts` entry and fields per `icmps` entry (CRD `MaxItems`).
const MAX_PORTS: usize = 40;
const MAX_ICMP_FIELDS: usize = 40;

/// Options for parsing.
#[derive(Debug, Clone)]
pub struct ParseOptions {
    /// Namespace for namespaced resources without `metadata.namespace` (kubectl's context
    /// namespace). Default `default`.
    pub default_namespace: String,
}

impl Default for ParseOptions {
    fn default() -> Self {
        ParseOptions {
            default_namespace: "default".to_owned(),
        }
    }
}

/// Parses every policy in `text` (YAML, possibly multi-document, or JSON). `source_name`
/// only names the input in errors. Empty documents are skipped.
pub fn parse_documents(text: &str, source_name: &str) -> Result<Vec<Policy>, PolicyError> {
    parse_documents_with(text, source_name, &ParseOptions::default())
}

/// [`parse_documents`] with options.
pub fn parse_documents_with(
    text: &str,
    source_name: &str,
    opts: &ParseOptions,
) -> Result<Vec<Policy>, PolicyError> {
    let docs = load_values(text, source_name)?;
    let mut out = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        parse_value_into(doc, i, "", source_name, opts, &mut out)?;
    }
    Ok(out)
}

/// Parses one already-decoded document (e.g. from a Kubernetes watch). `document` is the
/// index reported in errors.
pub fn parse_value(
    value: &Value,
    document: usize,
    source_name: &str,
    opts: &ParseOptions,
) -> Result<Vec<Policy>, PolicyError> {
    let mut out = Vec::new();
    parse_value_into(value, document, "", source_name, opts, &mut out)?;
    Ok(out)
}

fn syntax(source_name: &str, message: String) -> PolicyError {
    PolicyError::Syntax {
        source_name: source_name.to_owned(),
        message,
    }
}

/// Decodes the text into one value per document.
pub(crate) fn load_values(text: &str, source_name: &str) -> Result<Vec<Value>, PolicyError> {
    let trimmed = text.trim_start();
    let mut docs = Vec::new();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        // JSON (one or more concatenated values). A top-level array is a list of documents.
        for v in serde_json::Deserializer::from_str(text).into_iter::<Value>() {
            let v = v.map_err(|e| syntax(source_name, format!("invalid JSON: {e}")))?;
            match v {
                Value::Array(items) => docs.extend(items),
                other => docs.push(other),
            }
        }
        return Ok(docs);
    }
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let v = Value::deserialize(de)
            .map_err(|e| syntax(source_name, format!("document {i}: invalid YAML: {e}")))?;
        match v {
            Value::Null => {}
            Value::Array(items) => docs.extend(items),
            other => docs.push(other),
        }
    }
    Ok(docs)
}

/// Context of the resource being parsed (for scoping and rule labels).
struct Ctx<'a> {
    kind: PolicyKind,
    namespace: Option<&'a str>,
    name: &'a str,
    uid: Option<&'a str>,
    warnings: Vec<String>,
}

fn parse_value_into(
    doc: &Value,
    document: usize,
    prefix: &str,
    source_name: &str,
    opts: &ParseOptions,
    out: &mut Vec<Policy>,
) -> Result<(), PolicyError> {
    let invalid = |resource: String, e: FieldError| PolicyError::Invalid {
        source_name: source_name.to_owned(),
        document,
        resource,
        path: if e.path.is_empty() {
            "<root>".to_owned()
        } else {
            e.path
        },
        message: e.message,
    };
    let root = match doc {
        Value::Object(m) => m,
        other => {
            return Err(invalid(
                String::new(),
                FieldError::new(
                    prefix,
                    format!("expected an object, found {}", type_name(other)),
                ),
            ));
        }
    };
    let kind = match root.get("kind") {
        Some(Value::String(k)) => k.as_str(),
        Some(other) => {
            return Err(invalid(
                String::new(),
                FieldError::new(
                    join(prefix, "kind"),
                    format!("expected a string, found {}", type_name(other)),
                ),
            ));
        }
        None => {
            return Err(invalid(
                String::new(),
                FieldError::new(join(prefix, "kind"), "missing required field"),
            ));
        }
    };
    if kind == "List" || kind.ends_with("List") {
        let mut o = Obj::new(
            doc,
            prefix,
            &["apiVersion", "kind", "metadata", "items"],
            &[],
        )
        .map_err(|e| invalid(String::new(), e))?;
        let items = o.get("items");
        let items_path = o.path("items");
        let items = match items {
            None => return Ok(()),
            Some(v) => as_array(v, &items_path).map_err(|e| invalid(String::new(), e))?,
        };
        for (i, item) in items.iter().enumerate() {
            parse_value_into(item, document, &idx(&items_path, i), source_name, opts, out)?;
        }
        return Ok(());
    }
    let mut resource = format!(" ({kind})");
    let policy = parse_resource(doc, prefix, kind, opts, &mut resource)
        .map_err(|e| invalid(resource.clone(), e))?;
    out.push(policy);
    Ok(())
}

fn parse_resource(
    doc: &Value,
    prefix: &str,
    kind: &str,
    opts: &ParseOptions,
    resource: &mut String,
) -> Result<Policy, FieldError> {
    let (policy_kind, want_api) = match kind {
        "CiliumNetworkPolicy" => (PolicyKind::CiliumNetworkPolicy, "cilium.io/v2"),
        "CiliumClusterwideNetworkPolicy" => {
            (PolicyKind::CiliumClusterwideNetworkPolicy, "cilium.io/v2")
        }
        "NetworkPolicy" => (PolicyKind::NetworkPolicy, "networking.k8s.io/v1"),
        other => {
            return Err(FieldError::new(
                join(prefix, "kind"),
                format!(
                    "unsupported kind {other:?} (expected CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, NetworkPolicy or List)"
                ),
            ));
        }
    };
    let mut root = Obj::new(
        doc,
        prefix,
        &["apiVersion", "kind", "metadata", "spec", "specs", "status"],
        &[],
    )?;
    let api_path = root.path("apiVersion");
    match root.get("apiVersion") {
        Some(v) => {
            let api = as_str(v, &api_path)?;
            if api != want_api {
                return Err(FieldError::new(
                    api_path,
                    format!("{kind} must have apiVersion {want_api}, found {api:?}"),
                ));
            }
        }
        None => return Err(FieldError::new(api_path, "missing required field")),
    }

    // metadata
    let meta_path = root.path("metadata");
    let meta_v = root
        .get("metadata")
        .ok_or_else(|| FieldError::new(&meta_path, "missing required field"))?;
    let mut meta = Obj::new(
        meta_v,
        &meta_path,
        &[
            "name",
            "namespace",
            "labels",
            "annotations",
            "uid",
            "resourceVersion",
            "generation",
            "creationTimestamp",
            "managedFields",
            "finalizers",
            "ownerReferences",
            "generateName",
            "selfLink",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ],
        &[],
    )?;
    let name_path = meta.path("name");
    let name = meta
        .get("name")
        .map(|v| as_str(v, &name_path))
        .transpose()?
        .filter(|n| !n.is_empty())
        .ok_or_else(|| FieldError::new(&name_path, "missing required field"))?
        .to_owned();
    let ns_path = meta.path("namespace");
    let given_ns = meta
        .get("namespace")
        .map(|v| as_str(v, &ns_path))
        .transpose()?;
    let mut scope_warning = None;
    let namespace = if policy_kind.is_namespaced() {
        Some(
            given_ns
                .filter(|s| !s.is_empty())
                .unwrap_or(opts.default_namespace.as_str())
                .to_owned(),
        )
    } else {
        // Kubernetes drops the namespace of a cluster-scoped object (one of Cilium's own
        // CCNP examples carries one): accepted and ignored, with a warning.
        if let Some(ns) = given_ns.filter(|s| !s.is_empty()) {
            scope_warning = Some(format!(
                "{ns_path}: {ns:?} ignored: CiliumClusterwideNetworkPolicy is cluster-scoped (Kubernetes drops the namespace of cluster-scoped objects)"
            ));
        }
        None
    };
    *resource = match &namespace {
        Some(ns) => format!(" ({kind} {ns}/{name})"),
        None => format!(" ({kind} {name})"),
    };
    let uid_path = meta.path("uid");
    let uid = meta
        .get("uid")
        .map(|v| as_str(v, &uid_path))
        .transpose()?
        .map(str::to_owned);
    let labels_path = meta.path("labels");
    let mut resource_labels = Labels::new();
    if let Some(v) = meta.get("labels") {
        for (k, val) in string_map(v, &labels_path)? {
            resource_labels.insert(Label::new(LabelSource::K8s, k, val));
        }
    }

    let mut ctx = Ctx {
        kind: policy_kind,
        namespace: namespace.as_deref(),
        name: &name,
        uid: uid.as_deref(),
        warnings: scope_warning.into_iter().collect(),
    };
    let mut rules = Vec::new();
    if policy_kind == PolicyKind::NetworkPolicy {
        if root.get("specs").is_some() {
            return Err(FieldError::new(
                root.path("specs"),
                "unknown field (NetworkPolicy has only spec)",
            ));
        }
        let spec_path = root.path("spec");
        let spec = root
            .get("spec")
            .ok_or_else(|| FieldError::new(&spec_path, "missing required field"))?;
        rules.push(parse_knp_spec(spec, &spec_path, &mut ctx)?);
    } else {
        let spec_path = root.path("spec");
        let specs_path = root.path("specs");
        let spec = root.get("spec");
        let specs = root.get("specs");
        if spec.is_none() && specs.is_none() {
            return Err(FieldError::new(
                prefix,
                format!("{kind} must have spec or specs (empty policy)"),
            ));
        }
        if let Some(s) = spec {
            rules.push(parse_rule(s, &spec_path, &mut ctx)?);
        }
        if let Some(s) = specs {
            for (i, r) in as_array(s, &specs_path)?.iter().enumerate() {
                rules.push(parse_rule(r, &idx(&specs_path, i), &mut ctx)?);
            }
        }
        if rules.is_empty() {
            return Err(FieldError::new(
                specs_path,
                "specs is empty: the policy has no rules",
            ));
        }
    }
    let warnings = std::mem::take(&mut ctx.warnings);
    Ok(Policy {
        kind: policy_kind,
        namespace,
        name,
        uid,
        labels: resource_labels,
        rules,
        warnings,
    })
}

// ---------------------------------------------------------------------------------------
// Generic value helpers

pub(crate) fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

pub(crate) fn idx(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

pub(crate) fn as_str<'v>(v: &'v Value, path: &str) -> Result<&'v str, FieldError> {
    v.as_str()
        .ok_or_else(|| FieldError::new(path, format!("expected a string, found {}", type_name(v))))
}

pub(crate) fn as_array<'v>(v: &'v Value, path: &str) -> Result<&'v Vec<Value>, FieldError> {
    v.as_array()
        .ok_or_else(|| FieldError::new(path, format!("expected a list, found {}", type_name(v))))
}

pub(crate) fn as_bool(v: &Value, path: &str) -> Result<bool, FieldError> {
    v.as_bool()
        .ok_or_else(|| FieldError::new(path, format!("expected a boolean, found {}", type_name(v))))
}

pub(crate) fn string_map<'v>(
    v: &'v Value,
    path: &str,
) -> Result<Vec<(&'v str, &'v str)>, FieldError> {
    let m = v.as_object().ok_or_else(|| {
        FieldError::new(path, format!("expected an object, found {}", type_name(v)))
    })?;
    m.iter()
        .map(|(k, val)| Ok((k.as_str(), as_str(val, &join(path, k))?)))
        .collect()
}

/// An object being read: checks its keys against the known fields up front.
pub(crate) struct Obj<'v> {
    map: &'v Map<String, Value>,
    path: String,
}

impl<'v> Obj<'v> {
    /// `known`: accepted fields. `rejected`: fields Cilium knows but this crate (or this
    /// position) does not accept, with the message to give.
    pub(crate) fn new(
        v: &'v Value,
        path: &str,
        known: &[&str],
        rejected: &[(&str, &str)],
    ) -> Result<Obj<'v>, FieldError> {
        let map = v.as_object().ok_or_else(|| {
            FieldError::new(path, format!("expected an object, found {}", type_name(v)))
        })?;
        for k in map.keys() {
            if let Some((_, msg)) = rejected.iter().find(|(r, _)| r == k) {
                return Err(FieldError::new(join(path, k), *msg));
            }
            if !known.contains(&k.as_str()) {
                return Err(FieldError::new(
                    join(path, k),
                    format!("unknown field (expected one of: {})", known.join(", ")),
                ));
            }
        }
        Ok(Obj {
            map,
            path: path.to_owned(),
        })
    }

    /// The value of `key`; an explicit `null` counts as absent (Go's nil).
    pub(crate) fn get(&mut self, key: &str) -> Option<&'v Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub(crate) fn path(&self, key: &str) -> String {
        join(&self.path, key)
    }

    /// `key` as a list, if present.
    pub(crate) fn list(
        &mut self,
        key: &str,
    ) -> Result<Option<(&'v Vec<Value>, String)>, FieldError> {
        let p = self.path(key);
        self.get(key)
            .map(|v| as_array(v, &p).map(|a| (a, p.clone())))
            .transpose()
    }
}

const UNSUPPORTED: &str = "unsupported field";

// ---------------------------------------------------------------------------------------
// Selectors and namespace scoping

fn parse_label_selector(v: &Value, path: &str) -> Result<EndpointSelector, FieldError> {
    let mut o = Obj::new(v, path, &["matchLabels", "matchExpressions"], &[])?;
    let ml_path = o.path("matchLabels");
    let ml = match o.get("matchLabels") {
        Some(v) => string_map(v, &ml_path)?,
        None => Vec::new(),
    };
    let mut exprs = Vec::new();
    if let Some((list, lp)) = o.list("matchExpressions")? {
        for (i, e) in list.iter().enumerate() {
            let ep = idx(&lp, i);
            let mut eo = Obj::new(e, &ep, &["key", "operator", "values"], &[])?;
            let key_p = eo.path("key");
            let key = eo
                .get("key")
                .ok_or_else(|| FieldError::new(&key_p, "missing required field"))
                .and_then(|v| as_str(v, &key_p))?;
            let op_p = eo.path("operator");
            let op = eo
                .get("operator")
                .ok_or_else(|| FieldError::new(&op_p, "missing required field"))
                .and_then(|v| as_str(v, &op_p))?;
            let mut values = Vec::new();
            if let Some((vals, vp)) = eo.list("values")? {
                for (j, val) in vals.iter().enumerate() {
                    values.push(as_str(val, &idx(&vp, j))?.to_owned());
                }
            }
            exprs.push((key, op, values, ep));
        }
    }
    // Validate expressions one by one so that the error names the entry.
    for (key, op, values, ep) in &exprs {
        EndpointSelector::from_parts([], [(*key, *op, values.clone())])
            .map_err(|e| FieldError::new(ep, e.to_string()))?;
    }
    for (k, val) in &ml {
        EndpointSelector::from_parts([(*k, *val)], [])
            .map_err(|e| FieldError::new(join(&ml_path, k), e.to_string()))?;
    }
    EndpointSelector::from_parts(
        ml.iter().copied(),
        exprs.into_iter().map(|(k, o, v, _)| (k, o, v)),
    )
    .map_err(|e| FieldError::new(path, e.to_string()))
}

fn exists(source: LabelSource, key: &str) -> Requirement {
    Requirement {
        source,
        key: key.to_owned(),
        op: Operator::Exists,
    }
}

/// Namespace scoping of peer selectors (reference §1.5 points 2–4, Cilium's
/// `getEndpointSelector`).
fn scope_peer_selector(
    mut es: EndpointSelector,
    ctx: &Ctx<'_>,
    matches_init: bool,
) -> EndpointSelector {
    if es.has_reserved_key() {
        return es;
    }
    if es.has_key(LabelSource::K8s, keys::POD_NAMESPACE)
        || es.has_key(LabelSource::Any, keys::POD_NAMESPACE)
    {
        return es;
    }
    match ctx.namespace {
        None => {
            if !matches_init {
                es.push(exists(LabelSource::K8s, keys::POD_NAMESPACE));
            }
        }
        Some(ns) => {
            let prefix = keys::NAMESPACE_LABELS_PREFIX.trim_end_matches('.');
            if !es.has_key_prefix(LabelSource::K8s, prefix)
                && !es.has_key_prefix(LabelSource::Any, prefix)
            {
                es.add_match(LabelSource::K8s, keys::POD_NAMESPACE, ns);
            }
        }
    }
    es
}

// ---------------------------------------------------------------------------------------
// Cilium rules

fn policy_rule_labels(ctx: &Ctx<'_>) -> Vec<Label> {
    let mut l = vec![
        Label::k8s(keys::POLICY_DERIVED_FROM, ctx.kind.as_str()),
        Label::k8s(keys::POLICY_NAME, ctx.name),
    ];
    if let Some(ns) = ctx.namespace {
        l.push(Label::k8s(keys::POLICY_NAMESPACE, ns));
    }
    if let Some(uid) = ctx.uid {
        l.push(Label::k8s(keys::POLICY_UID, uid));
    }
    l
}

fn origin(ctx: &Ctx<'_>, path: &str) -> String {
    match ctx.namespace {
        Some(ns) => format!("{} {}/{} {}", ctx.kind, ns, ctx.name, path),
        None => format!("{} {} {}", ctx.kind, ctx.name, path),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Ingress,
    Egress,
}

fn parse_rule(v: &Value, path: &str, ctx: &mut Ctx<'_>) -> Result<Rule, FieldError> {
    let mut o = Obj::new(
        v,
        path,
        &[
            "endpointSelector",
            "nodeSelector",
            "ingress",
            "ingressDeny",
            "egress",
            "egressDeny",
            "labels",
            "description",
            "enableDefaultDeny",
            "log",
        ],
        &[],
    )?;
    let es_path = o.path("endpointSelector");
    let ns_path = o.path("nodeSelector");
    let es = o.get("endpointSelector");
    let nsel = o.get("nodeSelector");
    let subject = match (es, nsel) {
        (None, None) => {
            return Err(FieldError::new(
                path,
                "rule must have one of EndpointSelector or NodeSelector",
            ));
        }
        (Some(_), Some(_)) => {
            return Err(FieldError::new(
                path,
                "rule cannot have both EndpointSelector and NodeSelector",
            ));
        }
        (Some(v), None) => {
            let mut sel = parse_label_selector(v, &es_path)?;
            if let Some(ns) = ctx.namespace
                && let Some(old) = sel.add_match(LabelSource::K8s, keys::POD_NAMESPACE, ns)
                && old != ns
            {
                ctx.warnings.push(format!(
                    "{es_path}: namespace match {old:?} removed: EndpointSelector always applies in namespace of the policy resource ({ns:?})"
                ));
            }
            Subject::Endpoints(sel)
        }
        (None, Some(v)) => {
            if ctx.kind != PolicyKind::CiliumClusterwideNetworkPolicy {
                return Err(FieldError::new(
                    ns_path,
                    "nodeSelector is only allowed in CiliumClusterwideNetworkPolicy",
                ));
            }
            Subject::Nodes(parse_label_selector(v, &ns_path)?)
        }
    };
    let host_policy = matches!(subject, Subject::Nodes(_));
    // CCNP peer selectors skip the namespace-exists injection when the subject selects
    // initializing endpoints (`matchesInit`).
    let matches_init = match &subject {
        Subject::Endpoints(s) | Subject::Nodes(s) => s.has_key(LabelSource::Reserved, "init"),
    };

    let mut rule_dirs: [(Vec<PeerRule>, &str, Dir, bool); 4] = [
        (Vec::new(), "ingress", Dir::Ingress, false),
        (Vec::new(), "ingressDeny", Dir::Ingress, true),
        (Vec::new(), "egress", Dir::Egress, false),
        (Vec::new(), "egressDeny", Dir::Egress, true),
    ];
    for (out, key, dir, deny) in rule_dirs.iter_mut() {
        if let Some((list, lp)) = o.list(key)? {
            for (i, r) in list.iter().enumerate() {
                out.push(parse_peer_rule(
                    r,
                    &idx(&lp, i),
                    *dir,
                    *deny,
                    host_policy,
                    matches_init,
                    ctx,
                )?);
            }
        }
    }
    let [
        (ingress, ..),
        (ingress_deny, ..),
        (egress, ..),
        (egress_deny, ..),
    ] = rule_dirs;
    if ingress.is_empty() && ingress_deny.is_empty() && egress.is_empty() && egress_deny.is_empty()
    {
        return Err(FieldError::new(
            path,
            "rule must have at least one of Ingress, IngressDeny, Egress, EgressDeny",
        ));
    }

    let mut enable_default_deny = DefaultDeny {
        ingress: !ingress.is_empty() || !ingress_deny.is_empty(),
        egress: !egress.is_empty() || !egress_deny.is_empty(),
    };
    let edd_path = o.path("enableDefaultDeny");
    if let Some(v) = o.get("enableDefaultDeny") {
        let mut e = Obj::new(v, &edd_path, &["ingress", "egress"], &[])?;
        let ip = e.path("ingress");
        if let Some(b) = e.get("ingress") {
            enable_default_deny.ingress = as_bool(b, &ip)?;
        }
        let ep = e.path("egress");
        if let Some(b) = e.get("egress") {
            enable_default_deny.egress = as_bool(b, &ep)?;
        }
    }

    let mut labels: Labels = policy_rule_labels(ctx).into_iter().collect();
    if let Some((list, lp)) = o.list("labels")? {
        for (i, l) in list.iter().enumerate() {
            let p = idx(&lp, i);
            let mut lo = Obj::new(l, &p, &["key", "value", "source"], &[])?;
            let kp = lo.path("key");
            let key = lo
                .get("key")
                .ok_or_else(|| FieldError::new(&kp, "missing required field"))
                .and_then(|v| as_str(v, &kp))?;
            let vp = lo.path("value");
            let value = lo
                .get("value")
                .map(|v| as_str(v, &vp))
                .transpose()?
                .unwrap_or("");
            let sp = lo.path("source");
            let source = match lo.get("source").map(|v| as_str(v, &sp)).transpose()? {
                None | Some("") => LabelSource::Unspec,
                Some(s) => LabelSource::from_name(s)
                    .ok_or_else(|| FieldError::new(&sp, format!("unknown label source {s:?}")))?,
            };
            if key.is_empty() {
                return Err(FieldError::new(kp, "empty label key"));
            }
            labels.insert(Label::new(source, key, value));
        }
    }
    let dp = o.path("description");
    let description = o
        .get("description")
        .map(|v| as_str(v, &dp))
        .transpose()?
        .map(str::to_owned);
    let log_path = o.path("log");
    if let Some(v) = o.get("log") {
        let mut lo = Obj::new(v, &log_path, &["value"], &[])?;
        let vp = lo.path("value");
        if let Some(val) = lo.get("value") {
            let s = as_str(val, &vp)?;
            if s.len() > 32 || !s.chars().all(|c| c.is_ascii_graphic() || c == ' ') {
                return Err(FieldError::new(
                    vp,
                    "log value must be at most 32 printable characters",
                ));
            }
        }
    }
    Ok(Rule {
        subject,
        ingress,
        ingress_deny,
        egress,
        egress_deny,
        enable_default_deny,
        labels,
        description,
        origin: origin(ctx, path),
    })
}

/// Per-member bookkeeping for the mutual-exclusivity check.
struct Member<'v> {
    name: &'static str,
    value: Option<(&'v Vec<Value>, String)>,
}

fn parse_peer_rule(
    v: &Value,
    path: &str,
    dir: Dir,
    deny: bool,
    host_policy: bool,
    matches_init: bool,
    ctx: &mut Ctx<'_>,
) -> Result<PeerRule, FieldError> {
    const DENY_FQDN: &str =
        "toFQDNs is not allowed in deny rules (deny policies do not support toFQDNs)";
    let mut o = match (dir, deny) {
        (Dir::Ingress, _) => Obj::new(
            v,
            path,
            &[
                "fromEndpoints",
                "fromCIDR",
                "fromCIDRSet",
                "fromEntities",
                "toPorts",
                "icmps",
                "fromRequires",
            ],
            &[
                ("fromGroups", UNSUPPORTED),
                ("fromNodes", UNSUPPORTED),
                ("authentication", UNSUPPORTED),
            ],
        )?,
        (Dir::Egress, false) => Obj::new(
            v,
            path,
            &[
                "toEndpoints",
                "toCIDR",
                "toCIDRSet",
                "toEntities",
                "toServices",
                "toFQDNs",
                "toPorts",
                "icmps",
                "toRequires",
            ],
            &[
                ("toGroups", UNSUPPORTED),
                ("toNodes", UNSUPPORTED),
                ("authentication", UNSUPPORTED),
            ],
        )?,
        (Dir::Egress, true) => Obj::new(
            v,
            path,
            &[
                "toEndpoints",
                "toCIDR",
                "toCIDRSet",
                "toEntities",
                "toServices",
                "toPorts",
                "icmps",
                "toRequires",
            ],
            &[
                ("toFQDNs", DENY_FQDN),
                ("toGroups", UNSUPPORTED),
                ("toNodes", UNSUPPORTED),
                ("authentication", UNSUPPORTED),
            ],
        )?,
    };
    let names: &[(&'static str, &str)] = match dir {
        Dir::Ingress => &[
            ("FromEndpoints", "fromEndpoints"),
            ("FromCIDR", "fromCIDR"),
            ("FromCIDRSet", "fromCIDRSet"),
            ("FromEntities", "fromEntities"),
        ],
        Dir::Egress => &[
            ("ToCIDR", "toCIDR"),
            ("ToCIDRSet", "toCIDRSet"),
            ("ToEndpoints", "toEndpoints"),
            ("ToEntities", "toEntities"),
            ("ToServices", "toServices"),
            ("ToFQDNs", "toFQDNs"),
        ],
    };
    let requires = if dir == Dir::Ingress {
        "fromRequires"
    } else {
        "toRequires"
    };
    if let Some((list, lp)) = o.list(requires)?
        && !list.is_empty()
    {
        return Err(FieldError::new(
            lp,
            format!("{requires} is deprecated and no longer supported (CRD MaxItems=0)"),
        ));
    }
    let mut members = Vec::new();
    for (name, key) in names {
        members.push(Member {
            name,
            value: o.list(key)?,
        });
    }
    let nonempty: Vec<&Member<'_>> = members
        .iter()
        .filter(|m| m.value.as_ref().is_some_and(|(l, _)| !l.is_empty()))
        .collect();
    if nonempty.len() > 1 {
        return Err(FieldError::new(
            path,
            format!(
                "combining {} and {} is not supported yet",
                nonempty[0].name, nonempty[1].name
            ),
        ));
    }

    let peers = if members
        .iter()
        .any(|m| m.value.as_ref().is_some_and(|(l, _)| l.is_empty()))
    {
        // A non-nil empty L3 list selects nothing (reference §1.2), whatever else is set.
        Peers::Endpoints(Vec::new())
    } else if let Some(m) = nonempty.first() {
        let (list, lp) = m
            .value
            .as_ref()
            .ok_or_else(|| FieldError::new(path, "internal: member without value"))?;
        parse_peers(m.name, list, lp, matches_init, ctx)?
    } else {
        Peers::Unspecified
    };

    let mut to_ports = Vec::new();
    if let Some((list, lp)) = o.list("toPorts")? {
        for (i, p) in list.iter().enumerate() {
            to_ports.push(parse_port_rule(p, &idx(&lp, i), dir, deny, host_policy)?);
        }
    }
    let mut icmps = Vec::new();
    let icmps_path = o.path("icmps");
    if let Some((list, lp)) = o.list("icmps")? {
        for (i, p) in list.iter().enumerate() {
            icmps.extend(parse_icmp_rule(p, &idx(&lp, i))?);
        }
        if !list.is_empty() && !to_ports.is_empty() {
            return Err(FieldError::new(
                icmps_path,
                "the ICMPs block may only be present without ToPorts. Define a separate rule to use ToPorts.",
            ));
        }
    }
    Ok(PeerRule {
        peers,
        to_ports,
        icmps,
    })
}

fn parse_peers(
    member: &str,
    list: &[Value],
    lp: &str,
    matches_init: bool,
    ctx: &Ctx<'_>,
) -> Result<Peers, FieldError> {
    Ok(match member {
        "FromEndpoints" | "ToEndpoints" => {
            let mut out = Vec::new();
            for (i, v) in list.iter().enumerate() {
                let sel = parse_label_selector(v, &idx(lp, i))?;
                out.push(scope_peer_selector(sel, ctx, matches_init));
            }
            Peers::Endpoints(out)
        }
        "FromEntities" | "ToEntities" => {
            let mut out = Vec::new();
            for (i, v) in list.iter().enumerate() {
                let p = idx(lp, i);
                let s = as_str(v, &p)?;
                out.push(
                    Entity::from_name(s)
                        .ok_or_else(|| FieldError::new(&p, format!("unsupported entity: {s}")))?,
                );
            }
            Peers::Entities(out)
        }
        "FromCIDR" | "ToCIDR" => {
            let mut out = Vec::new();
            for (i, v) in list.iter().enumerate() {
                let p = idx(lp, i);
                let s = as_str(v, &p)?;
                if s.is_empty() {
                    return Err(FieldError::new(p, "IP must be specified"));
                }
                let cidr = IpPrefix::parse_addr_or_prefix(s)
                    .map_err(|e| FieldError::new(&p, format!("unable to parse CIDR: {e}")))?;
                out.push(CidrRule {
                    cidr,
                    except: Vec::new(),
                });
            }
            Peers::Cidrs(out)
        }
        "FromCIDRSet" | "ToCIDRSet" => {
            let mut out = Vec::new();
            for (i, v) in list.iter().enumerate() {
                out.push(parse_cidr_rule(v, &idx(lp, i))?);
            }
            Peers::Cidrs(out)
        }
        "ToFQDNs" => {
            let mut out = Vec::new();
            for (i, v) in list.iter().enumerate() {
                out.push(parse_fqdn_selector(v, &idx(lp, i))?);
            }
            Peers::Fqdns(out)
        }
        "ToServices" => {
            let mut out = Vec::new();
            for (i, v) in list.iter().enumerate() {
                out.push(parse_service(v, &idx(lp, i))?);
            }
            Peers::Services(out)
        }
        other => {
            return Err(FieldError::new(
                lp,
                format!("internal: unexpected member {other}"),
            ));
        }
    })
}

fn parse_cidr_rule(v: &Value, path: &str) -> Result<CidrRule, FieldError> {
    let mut o = Obj::new(
        v,
        path,
        &["cidr", "except"],
        &[
            ("cidrGroupRef", UNSUPPORTED),
            ("cidrGroupSelector", UNSUPPORTED),
        ],
    )?;
    let cp = o.path("cidr");
    let cidr_s = match o.get("cidr") {
        Some(v) => as_str(v, &cp)?,
        None => {
            return Err(FieldError::new(
                path,
                "one of cidr, cidrGroupRef, or cidrGroupSelector is required",
            ));
        }
    };
    if !cidr_s.contains('/') {
        return Err(FieldError::new(
            cp,
            format!("unable to parse CIDRRule {cidr_s:?}: cidr requires the IP/len form"),
        ));
    }
    let cidr: IpPrefix = cidr_s
        .parse()
        .map_err(|e| FieldError::new(&cp, format!("unable to parse CIDRRule {cidr_s:?}: {e}")))?;
    let mut except = Vec::new();
    if let Some((list, lp)) = o.list("except")? {
        for (i, e) in list.iter().enumerate() {
            let p = idx(&lp, i);
            let s = as_str(e, &p)?;
            let ex: IpPrefix = s.parse().map_err(|err| {
                FieldError::new(&p, format!("unable to parse except CIDR: {err}"))
            })?;
            if !cidr.contains_prefix(&ex) {
                return Err(FieldError::new(
                    p,
                    format!("allow CIDR prefix {cidr_s} does not contain exclude CIDR prefix {s}"),
                ));
            }
            except.push(ex);
        }
    }
    Ok(CidrRule { cidr, except })
}

fn parse_fqdn_selector(v: &Value, path: &str) -> Result<FqdnSelector, FieldError> {
    let mut o = Obj::new(v, path, &["matchName", "matchPattern"], &[])?;
    let np = o.path("matchName");
    let pp = o.path("matchPattern");
    let name = o
        .get("matchName")
        .map(|v| as_str(v, &np))
        .transpose()?
        .filter(|s| !s.is_empty());
    let pattern = o
        .get("matchPattern")
        .map(|v| as_str(v, &pp))
        .transpose()?
        .filter(|s| !s.is_empty());
    match (name, pattern) {
        (Some(_), Some(_)) => Err(FieldError::new(
            path,
            "only one of matchName or matchPattern is allowed in an FQDN selector",
        )),
        (None, None) => Err(FieldError::new(
            path,
            "one of matchName or matchPattern is required",
        )),
        (Some(n), None) => FqdnSelector::name(n).map_err(|e| FieldError::new(np, e)),
        (None, Some(p)) => FqdnSelector::pattern(p).map_err(|e| FieldError::new(pp, e)),
    }
}

fn parse_service(v: &Value, path: &str) -> Result<ServiceSelector, FieldError> {
    let mut o = Obj::new(v, path, &["k8sService", "k8sServiceSelector"], &[])?;
    let sp = o.path("k8sService");
    let ssp = o.path("k8sServiceSelector");
    match (o.get("k8sService"), o.get("k8sServiceSelector")) {
        (Some(s), None) => {
            let mut so = Obj::new(s, &sp, &["serviceName", "namespace"], &[])?;
            let np = so.path("serviceName");
            let name = so
                .get("serviceName")
                .ok_or_else(|| FieldError::new(&np, "missing required field"))
                .and_then(|v| as_str(v, &np))?
                .to_owned();
            let nsp = so.path("namespace");
            let namespace = so
                .get("namespace")
                .map(|v| as_str(v, &nsp))
                .transpose()?
                .map(str::to_owned);
            Ok(ServiceSelector::Named { name, namespace })
        }
        (None, Some(s)) => {
            let mut so = Obj::new(s, &ssp, &["selector", "namespace"], &[])?;
            let selp = so.path("selector");
            let selector = so
                .get("selector")
                .ok_or_else(|| FieldError::new(&selp, "missing required field"))
                .and_then(|v| parse_label_selector(v, &selp))?;
            let nsp = so.path("namespace");
            let namespace = so
                .get("namespace")
                .map(|v| as_str(v, &nsp))
                .transpose()?
                .map(str::to_owned);
            Ok(ServiceSelector::Selector {
                selector,
                namespace,
            })
        }
        (Some(_), Some(_)) => Err(FieldError::new(
            path,
            "only one of k8sService or k8sServiceSelector is allowed",
        )),
        (None, None) => Err(FieldError::new(
            path,
            "one of k8sService or k8sServiceSelector is required",
        )),
    }
}

fn parse_protocol(
    v: Option<&Value>,
    path: &str,
    default: Protocol,
) -> Result<Protocol, FieldError> {
    let Some(v) = v else { return Ok(default) };
    let s = as_str(v, path)?;
    Ok(match s.to_ascii_uppercase().as_str() {
        "" => default,
        "TCP" => Protocol::Tcp,
        "UDP" => Protocol::Udp,
        "SCTP" => Protocol::Sctp,
        "ANY" => Protocol::Any,
        "ICMP" | "ICMPV6" => {
            return Err(FieldError::new(
                path,
                "ICMP is not a port protocol: use the icmps field",
            ));
        }
        "VRRP" | "IGMP" => {
            return Err(FieldError::new(
                path,
                format!("protocol {s} needs extended IP protocols, which are not supported"),
            ));
        }
        _ => {
            return Err(FieldError::new(
                path,
                format!("invalid protocol {s:?} (expected TCP, UDP, SCTP or ANY)"),
            ));
        }
    })
}

/// RFC 6335 service name as Cilium's `iana.IsSvcName`.
fn is_svc_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
        && s.bytes().any(|b| b.is_ascii_alphabetic())
}

fn parse_port(v: &Value, path: &str) -> Result<Port, FieldError> {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => {
            return Err(FieldError::new(
                path,
                format!("expected a port number or name, found {}", type_name(other)),
            ));
        }
    };
    if s.is_empty() {
        return Err(FieldError::new(path, "port must be specified"));
    }
    if is_svc_name(&s) {
        return Ok(Port::Named(s.to_ascii_lowercase()));
    }
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(FieldError::new(path, format!("unable to parse port {s:?}")));
    }
    s.parse::<u16>().map(Port::Number).map_err(|_| {
        FieldError::new(
            path,
            format!("unable to parse port {s:?}: out of range 0-65535"),
        )
    })
}

fn parse_port_protocol(v: &Value, path: &str, knp: bool) -> Result<PortProtocol, FieldError> {
    let mut o = Obj::new(v, path, &["port", "endPort", "protocol"], &[])?;
    let pp = o.path("port");
    let port = match o.get("port") {
        Some(p) => parse_port(p, &pp)?,
        None if knp => Port::Number(0),
        None => return Err(FieldError::new(pp, "port must be specified")),
    };
    let ep = o.path("endPort");
    let end_port = match o.get("endPort") {
        None => None,
        Some(e) => {
            let n = e.as_i64().ok_or_else(|| {
                FieldError::new(&ep, format!("expected an integer, found {}", type_name(e)))
            })?;
            let n = u16::try_from(n).map_err(|_| {
                FieldError::new(&ep, format!("endPort {n} is out of range 0-65535"))
            })?;
            if matches!(port, Port::Named(_)) && n != 0 {
                return Err(FieldError::new(
                    &ep,
                    "endPort cannot be used with a named port",
                ));
            }
            Some(n)
        }
    };
    let prp = o.path("protocol");
    let protocol = parse_protocol(
        o.get("protocol"),
        &prp,
        if knp { Protocol::Tcp } else { Protocol::Any },
    )?;
    Ok(PortProtocol {
        port,
        end_port,
        protocol,
    })
}

fn parse_port_rule(
    v: &Value,
    path: &str,
    dir: Dir,
    deny: bool,
    host_policy: bool,
) -> Result<PortRule, FieldError> {
    const DENY_L7: &str = "not allowed in deny rules (deny policies do not support L7)";
    const TLS_UNSUPPORTED: &str = "unsupported field: membrane does not terminate or originate TLS (serverNames is enforced on the ClientHello without it)";
    let mut o = if deny {
        Obj::new(
            v,
            path,
            &["ports"],
            &[
                ("rules", DENY_L7),
                ("terminatingTLS", DENY_L7),
                ("originatingTLS", DENY_L7),
                ("serverNames", DENY_L7),
                ("listener", DENY_L7),
            ],
        )?
    } else {
        Obj::new(
            v,
            path,
            &["ports", "rules", "serverNames"],
            &[
                ("terminatingTLS", TLS_UNSUPPORTED),
                ("originatingTLS", TLS_UNSUPPORTED),
                ("listener", UNSUPPORTED),
            ],
        )?
    };
    let mut ports = Vec::new();
    let ports_path = o.path("ports");
    if let Some((list, lp)) = o.list("ports")? {
        if list.len() > MAX_PORTS {
            return Err(FieldError::new(
                lp,
                format!("too many ports, the max is {MAX_PORTS}"),
            ));
        }
        for (i, p) in list.iter().enumerate() {
            ports.push(parse_port_protocol(p, &idx(&lp, i), false)?);
        }
    }
    let rules_path = o.path("rules");
    let mut rules = match o.get("rules") {
        None => None,
        Some(r) => parse_l7_rules(r, &rules_path)?,
    };
    let names_path = o.path("serverNames");
    if let Some((list, lp)) = o.list("serverNames")?
        // Cilium: "If not empty, then TLS must be present": an empty list restricts nothing.
        && !list.is_empty()
    {
        // Stricter than Cilium, which accepts empty rule lists (`http: []`) here.
        if rules.is_some() {
            return Err(FieldError::new(
                names_path,
                "serverNames together with L7 rules requires terminatingTLS, which membrane does not support",
            ));
        }
        if dir == Dir::Ingress {
            return Err(FieldError::new(
                names_path,
                "serverNames on ingress is not supported yet (egress only)",
            ));
        }
        if host_policy {
            return Err(FieldError::new(
                names_path,
                "host policies do not support serverNames",
            ));
        }
        let mut names = Vec::with_capacity(list.len());
        for (i, n) in list.iter().enumerate() {
            let p = idx(&lp, i);
            let name = ServerName::parse(as_str(n, &p)?).map_err(|e| FieldError::new(&p, e))?;
            if !names.contains(&name) {
                names.push(name);
            }
        }
        if ports.is_empty() {
            return Err(FieldError::new(
                ports_path,
                "serverNames require at least one port",
            ));
        }
        for (i, pp) in ports.iter().enumerate() {
            let p = idx(&ports_path, i);
            if pp.protocol != Protocol::Tcp {
                return Err(FieldError::new(
                    join(&p, "protocol"),
                    format!(
                        "serverNames can only apply to TCP (not {})",
                        pp.protocol.as_str()
                    ),
                ));
            }
            if pp.port == Port::Number(0) {
                return Err(FieldError::new(
                    join(&p, "port"),
                    "serverNames can not be used when a port is 0",
                ));
            }
        }
        rules = Some(L7Rules::Tls(names));
        return Ok(PortRule { ports, rules });
    }
    if let Some(rules) = &rules {
        let is_dns = matches!(rules, L7Rules::Dns(_));
        if dir == Dir::Ingress && is_dns {
            return Err(FieldError::new(
                rules_path,
                "DNS rules are not allowed on ingress",
            ));
        }
        if host_policy && (dir == Dir::Ingress || !is_dns) {
            return Err(FieldError::new(
                rules_path,
                "host policies do not support L7 rules yet (only DNS rules on egress)",
            ));
        }
        if ports.is_empty() {
            let msg = if is_dns {
                "port 53 must be specified for DNS rules"
            } else {
                "L7 rules require at least one port"
            };
            return Err(FieldError::new(ports_path, msg));
        }
        for (i, pp) in ports.iter().enumerate() {
            let p = idx(&ports_path, i);
            if is_dns {
                if let (Port::Number(n), Some(e)) = (&pp.port, pp.end_port)
                    && e > *n
                {
                    return Err(FieldError::new(p, "DNS rules do not support port ranges"));
                }
            } else if pp.protocol != Protocol::Tcp {
                return Err(FieldError::new(
                    join(&p, "protocol"),
                    format!(
                        "L7 rules can only apply to TCP (not {}) except for DNS rules",
                        pp.protocol.as_str()
                    ),
                ));
            }
            if pp.port == Port::Number(0) {
                return Err(FieldError::new(
                    join(&p, "port"),
                    "L7 rules can not be used when a port is 0",
                ));
            }
        }
    }
    Ok(PortRule { ports, rules })
}

fn parse_l7_rules(v: &Value, path: &str) -> Result<Option<L7Rules>, FieldError> {
    let mut o = Obj::new(
        v,
        path,
        &["http", "dns"],
        &[
            ("kafka", UNSUPPORTED),
            ("l7proto", UNSUPPORTED),
            ("l7", UNSUPPORTED),
        ],
    )?;
    let hp = o.path("http");
    let dp = o.path("dns");
    let http = o.list("http")?;
    let dns = o.list("dns")?;
    match (http, dns) {
        (Some(_), Some(_)) => Err(FieldError::new(
            path,
            "multiple L7 protocol rule types specified in single rule",
        )),
        (None, None) => Ok(None),
        (Some((list, _)), None) => {
            let mut out = Vec::new();
            for (i, r) in list.iter().enumerate() {
                out.push(parse_http_rule(r, &idx(&hp, i))?);
            }
            Ok(Some(L7Rules::Http(out)))
        }
        (None, Some((list, _))) => {
            let mut out = Vec::new();
            for (i, r) in list.iter().enumerate() {
                out.push(parse_fqdn_selector(r, &idx(&dp, i))?);
            }
            Ok(Some(L7Rules::Dns(out)))
        }
    }
}

fn parse_http_rule(v: &Value, path: &str) -> Result<HttpRule, FieldError> {
    let mut o = Obj::new(
        v,
        path,
        &["method", "path", "host", "headers", "headerMatches"],
        &[],
    )?;
    let mut rule = HttpRule::default();
    for (field, slot) in [
        ("method", &mut rule.method),
        ("path", &mut rule.path),
        ("host", &mut rule.host),
    ] {
        let p = o.path(field);
        if let Some(s) = o
            .get(field)
            .map(|v| as_str(v, &p))
            .transpose()?
            .filter(|s| !s.is_empty())
        {
            crate::http::compile_full_match(field, s).map_err(|e| FieldError::new(&p, e))?;
            *slot = Some(s.to_owned());
        }
    }
    if let Some((list, lp)) = o.list("headers")? {
        for (i, h) in list.iter().enumerate() {
            let p = idx(&lp, i);
            let s = as_str(h, &p)?;
            rule.headers
                .push(HeaderRequirement::parse(s).map_err(|e| FieldError::new(&p, e))?);
        }
    }
    if let Some((list, lp)) = o.list("headerMatches")? {
        for (i, h) in list.iter().enumerate() {
            let p = idx(&lp, i);
            let mut ho = Obj::new(h, &p, &["name", "value", "secret", "mismatch"], &[])?;
            let np = ho.path("name");
            let name = ho
                .get("name")
                .ok_or_else(|| FieldError::new(&np, "missing required field"))
                .and_then(|v| as_str(v, &np))?;
            if name.is_empty() {
                return Err(FieldError::new(np, "header name must not be empty"));
            }
            let vp = ho.path("value");
            let value = ho
                .get("value")
                .map(|v| as_str(v, &vp))
                .transpose()?
                .map(str::to_owned);
            let sp = ho.path("secret");
            let secret = match ho.get("secret") {
                None => None,
                Some(s) => {
                    let mut so = Obj::new(s, &sp, &["namespace", "name"], &[])?;
                    let snp = so.path("name");
                    let sname = so
                        .get("name")
                        .ok_or_else(|| FieldError::new(&snp, "missing required field"))
                        .and_then(|v| as_str(v, &snp))?
                        .to_owned();
                    let snsp = so.path("namespace");
                    let namespace = so
                        .get("namespace")
                        .map(|v| as_str(v, &snsp))
                        .transpose()?
                        .map(str::to_owned);
                    Some(SecretRef {
                        namespace,
                        name: sname,
                    })
                }
            };
            let mp = ho.path("mismatch");
            let mm = ho
                .get("mismatch")
                .map(|v| as_str(v, &mp))
                .transpose()?
                .unwrap_or("");
            let mismatch = MismatchAction::from_name(mm).ok_or_else(|| {
                FieldError::new(
                    &mp,
                    format!(
                        "invalid mismatch action {mm:?} (expected LOG, ADD, DELETE or REPLACE)"
                    ),
                )
            })?;
            rule.header_matches.push(HeaderMatch {
                name: name.to_owned(),
                value,
                secret,
                mismatch,
            });
        }
    }
    Ok(rule)
}

fn parse_icmp_rule(v: &Value, path: &str) -> Result<Vec<IcmpField>, FieldError> {
    let mut o = Obj::new(v, path, &["fields"], &[])?;
    let mut out = Vec::new();
    if let Some((list, lp)) = o.list("fields")? {
        if list.len() > MAX_ICMP_FIELDS {
            return Err(FieldError::new(
                lp,
                format!("too many types, the max is {MAX_ICMP_FIELDS}"),
            ));
        }
        for (i, f) in list.iter().enumerate() {
            let p = idx(&lp, i);
            let mut fo = Obj::new(f, &p, &["family", "type"], &[])?;
            let fp = fo.path("family");
            let family = match fo.get("family").map(|v| as_str(v, &fp)).transpose()? {
                None | Some("") | Some("IPv4") => IcmpFamily::IPv4,
                Some("IPv6") => IcmpFamily::IPv6,
                Some(other) => return Err(FieldError::new(fp, format!("wrong family: {other}"))),
            };
            let tp = fo.path("type");
            let t = fo
                .get("type")
                .ok_or_else(|| FieldError::new(&tp, "missing required field"))?;
            let icmp_type = match t {
                Value::Number(n) => {
                    n.as_u64()
                        .and_then(|n| u8::try_from(n).ok())
                        .ok_or_else(|| {
                            FieldError::new(&tp, format!("ICMP type {n} is out of range 0-255"))
                        })?
                }
                Value::String(s) => {
                    let table = match family {
                        IcmpFamily::IPv4 => ICMPV4_TYPES,
                        IcmpFamily::IPv6 => ICMPV6_TYPES,
                    };
                    match s.parse::<u8>() {
                        Ok(n) => n,
                        Err(_) => table
                            .iter()
                            .find(|(name, _)| name == s)
                            .map(|(_, n)| *n)
                            .ok_or_else(|| {
                                FieldError::new(
                                    &tp,
                                    format!("unknown ICMP type name {s:?} for family {family:?}"),
                                )
                            })?,
                    }
                }
                other => {
                    return Err(FieldError::new(
                        tp,
                        format!(
                            "expected an ICMP type number or name, found {}",
                            type_name(other)
                        ),
                    ));
                }
            };
            out.push(IcmpField { family, icmp_type });
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Kubernetes NetworkPolicy

fn parse_knp_spec(v: &Value, path: &str, ctx: &mut Ctx<'_>) -> Result<Rule, FieldError> {
    let mut o = Obj::new(
        v,
        path,
        &["podSelector", "ingress", "egress", "policyTypes"],
        &[],
    )?;
    let ns = ctx.namespace.unwrap_or("default").to_owned();
    let psp = o.path("podSelector");
    let mut subject = match o.get("podSelector") {
        Some(s) => parse_label_selector(s, &psp)?,
        None => return Err(FieldError::new(psp, "missing required field")),
    };
    subject.add_match(LabelSource::K8s, keys::POD_NAMESPACE, &ns);

    let ingress_v = o.list("ingress")?;
    let egress_v = o.list("egress")?;
    let mut types = BTreeSet::new();
    match o.list("policyTypes")? {
        Some((list, lp)) if !list.is_empty() => {
            for (i, t) in list.iter().enumerate() {
                let p = idx(&lp, i);
                match as_str(t, &p)? {
                    "Ingress" => types.insert(Dir::Ingress as u8),
                    "Egress" => types.insert(Dir::Egress as u8),
                    other => {
                        return Err(FieldError::new(
                            p,
                            format!("invalid policy type {other:?} (expected Ingress or Egress)"),
                        ));
                    }
                };
            }
        }
        _ => {
            types.insert(Dir::Ingress as u8);
            if egress_v.is_some() {
                types.insert(Dir::Egress as u8);
            }
        }
    }
    let ingress_on = types.contains(&(Dir::Ingress as u8));
    let egress_on = types.contains(&(Dir::Egress as u8));
    let mut ingress = Vec::new();
    let mut egress = Vec::new();
    for (dir, on, list, out) in [
        (Dir::Ingress, ingress_on, ingress_v, &mut ingress),
        (Dir::Egress, egress_on, egress_v, &mut egress),
    ] {
        let Some((list, lp)) = list else { continue };
        if !on {
            if !list.is_empty() {
                ctx.warnings.push(format!(
                    "{lp}: rules ignored because policyTypes does not include {}",
                    if dir == Dir::Ingress {
                        "Ingress"
                    } else {
                        "Egress"
                    }
                ));
            }
            continue;
        }
        for (i, r) in list.iter().enumerate() {
            out.extend(parse_knp_rule(r, &idx(&lp, i), dir, &ns)?);
        }
    }
    let mut labels: Labels = policy_rule_labels(ctx).into_iter().collect();
    labels.insert(Label::k8s(
        keys::POLICY_DERIVED_FROM,
        PolicyKind::NetworkPolicy.as_str(),
    ));
    Ok(Rule {
        subject: Subject::Endpoints(subject),
        ingress,
        ingress_deny: Vec::new(),
        egress,
        egress_deny: Vec::new(),
        enable_default_deny: DefaultDeny {
            ingress: ingress_on,
            egress: egress_on,
        },
        labels,
        description: None,
        origin: origin(ctx, path),
    })
}

/// One KNP ingress/egress rule. Peers of different kinds become separate [`PeerRule`]s
/// with the same ports (ORed, so equivalent).
fn parse_knp_rule(v: &Value, path: &str, dir: Dir, ns: &str) -> Result<Vec<PeerRule>, FieldError> {
    let peer_key = if dir == Dir::Ingress { "from" } else { "to" };
    let mut o = Obj::new(v, path, &[peer_key, "ports"], &[])?;
    let mut ports = Vec::new();
    if let Some((list, lp)) = o.list("ports")? {
        for (i, p) in list.iter().enumerate() {
            ports.push(parse_port_protocol(p, &idx(&lp, i), true)?);
        }
    }
    let to_ports = if ports.is_empty() {
        Vec::new()
    } else {
        vec![PortRule { ports, rules: None }]
    };
    let mut endpoints = Vec::new();
    let mut cidrs = Vec::new();
    match o.list(peer_key)? {
        None => endpoints.push(EndpointSelector::wildcard()),
        Some((list, _)) if list.is_empty() => endpoints.push(EndpointSelector::wildcard()),
        Some((list, lp)) => {
            for (i, peer) in list.iter().enumerate() {
                let p = idx(&lp, i);
                let mut po = Obj::new(
                    peer,
                    &p,
                    &["podSelector", "namespaceSelector", "ipBlock"],
                    &[],
                )?;
                let psp = po.path("podSelector");
                let nsp = po.path("namespaceSelector");
                let ibp = po.path("ipBlock");
                let pod = po.get("podSelector");
                let nsel = po.get("namespaceSelector");
                let ipb = po.get("ipBlock");
                if let Some(ipb) = ipb {
                    if pod.is_some() || nsel.is_some() {
                        return Err(FieldError::new(
                            p,
                            "ipBlock cannot be combined with podSelector or namespaceSelector",
                        ));
                    }
                    cidrs.push(parse_cidr_rule(ipb, &ibp)?);
                    continue;
                }
                let mut sel = match pod {
                    Some(s) => parse_label_selector(s, &psp)?,
                    None => EndpointSelector::wildcard(),
                };
                match nsel {
                    None => {
                        if pod.is_none() {
                            return Err(FieldError::new(
                                p,
                                "peer must have one of podSelector, namespaceSelector or ipBlock",
                            ));
                        }
                        sel.add_match(LabelSource::K8s, keys::POD_NAMESPACE, ns);
                    }
                    Some(n) => {
                        let nsel = parse_label_selector(n, &nsp)?;
                        if nsel.is_wildcard() {
                            sel.push(exists(LabelSource::K8s, keys::POD_NAMESPACE));
                        }
                        for r in nsel.requirements() {
                            sel.push(Requirement {
                                source: LabelSource::K8s,
                                key: format!("{}{}", keys::NAMESPACE_LABELS_PREFIX, r.key),
                                op: r.op.clone(),
                            });
                        }
                    }
                }
                endpoints.push(sel);
            }
        }
    }
    let mut out = Vec::new();
    if !endpoints.is_empty() {
        out.push(PeerRule {
            peers: Peers::Endpoints(endpoints),
            to_ports: to_ports.clone(),
            icmps: Vec::new(),
        });
    }
    if !cidrs.is_empty() {
        out.push(PeerRule {
            peers: Peers::Cidrs(cidrs),
            to_ports,
            icmps: Vec::new(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cnp(spec: Value) -> Value {
        json!({
            "apiVersion": "cilium.io/v2",
            "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "p", "namespace": "ns1"},
            "spec": spec,
        })
    }

    fn ccnp(spec: Value) -> Value {
        json!({
            "apiVersion": "cilium.io/v2",
            "kind": "CiliumClusterwideNetworkPolicy",
            "metadata": {"name": "cp"},
            "spec": spec,
        })
    }

    fn parse1(v: &Value) -> Result<Policy, PolicyError> {
        let mut p = parse_value(v, 0, "test", &ParseOptions::default())?;
        assert_eq!(p.len(), 1);
        Ok(p.remove(0))
    }

    fn err(v: &Value) -> (String, String) {
        let e = parse1(v).expect_err("expected a validation error");
        (e.path().unwrap_or("").to_owned(), e.message().to_owned())
    }

    fn web() -> Value {
        json!({"matchLabels": {"app": "web"}})
    }

    /// Validation cases: (spec, expected path, expected message start). Messages are
    /// Cilium's where Cilium has one (rule_validation.go, cidr.go, entity.go, l4.go).
    #[test]
    fn validation_table() {
        let cases: Vec<(Value, &str, &str)> = vec![
            (
                json!({"endpointSelector": web()}),
                "spec",
                "rule must have at least one of Ingress, IngressDeny, Egress, EgressDeny",
            ),
            (
                json!({"ingress": [{}]}),
                "spec",
                "rule must have one of EndpointSelector or NodeSelector",
            ),
            (
                json!({"endpointSelector": web(), "nodeSelector": {}, "ingress": [{}]}),
                "spec",
                "rule cannot have both EndpointSelector and NodeSelector",
            ),
            (
                json!({"nodeSelector": {}, "ingress": [{}]}),
                "spec.nodeSelector",
                "nodeSelector is only allowed in CiliumClusterwideNetworkPolicy",
            ),
            (
                json!({"endpointSelector": web(), "ingress": [{"fromEndpoints": [{}], "fromCIDR": ["10.0.0.0/8"]}]}),
                "spec.ingress[0]",
                "combining FromEndpoints and FromCIDR is not supported yet",
            ),
            (
                json!({"endpointSelector": web(), "egress": [{"toFQDNs": [{"matchName": "a.io"}], "toEndpoints": [{}]}]}),
                "spec.egress[0]",
                "combining ToEndpoints and ToFQDNs is not supported yet",
            ),
            (
                json!({"endpointSelector": web(), "egress": [{"toCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}]}]}),
                "spec.egress[0].toCIDRSet[0].except[0]",
                "allow CIDR prefix 10.0.0.0/8 does not contain exclude CIDR prefix 11.0.0.0/16",
            ),
            (
                json!({"endpointSelector": web(), "egress": [{"toCIDRSet": [{"except": ["10.0.0.0/16"]}]}]}),
                "spec.egress[0].toCIDRSet[0]",
                "one of cidr, cidrGroupRef, or cidrGroupSelector is required",
            ),
            (
                json!({"endpointSelector": web(), "egress": [{"toCIDRSet": [{"cidr": "10.0.0.1"}]}]}),
                "spec.egress[0].toCIDRSet[0].cidr",
                "unable to parse CIDRRule",
            ),
            (
                json!({"endpointSelector": web(), "egress": [{"toCIDR": ["10.0.0.300"]}]}),
                "spec.egress[0].toCIDR[0]",
                "unable to parse CIDR",
            ),
            (
                json!({"endpointSelector": web(), "egress": [{"toEntities": ["galaxy"]}]}),
                "spec.egress[0].toEntities[0]",
                "unsupported entity: galaxy",
            ),
            (
                json!({"endpointSelector": web(), "ingress": [{"toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}], "rules": {"dns": [{"matchPattern": "*"}]}}]}]}),
                "spec.ingress[0].toPorts[0].rules",
                "DNS rules are not allowed on ingress",
            ),
            (
                json!({"endpointSelector": web(), "egress": [{"toPorts": [{"ports": [{"port": "80", "protocol": "UDP"}], "rules": {"http": [{}]}}]}]}),
                "spec.egress[0].toPorts[0].ports[0].protocol",
                "L7 rules can only apply to TCP (not UDP) except for DNS rules",
            ),
            (
                json!({"endpointSelector": web(), "egress": [{"toPorts": [{"ports": [{"port": "80"}], "rules": {"http": [{}]}}]}]}),
                "spec.egress[0].toPorts[0].ports[0].protocol",
                "L7 rules can only apply to TCP (not ANY) except for DNS rules",
            ),
            (
                json!({"endpointSelector": web(), "egress": [{"toPorts": [{"ports": [{"port": "0", "protocol": "TCP"}], "rules": {"http": [{}]}}]}]}),
                "spec.egress[0].toPorts[0].ports[0].port",
                "L7 rules can not be used when a port is 0",
            ),
            (
                json!({"endpointSelector": web(), "egress": [{"toPorts": [{"ports": [{"port": "53", "endPort": 60, "protocol": "UDP"}], "rules": {"dns": [{"matchName": "a.io"}]}}]}]}),
                "spec.egress[0].toPorts[0].ports[0]",
                "DNS rules do not support port ranges",
            ),
            (
                json!({"endpointSelector": web(), "egress": [{"toPorts": [{"rules": {"dns": [{"matchName": "a.io"}]}}]}]}),
                "spec.egress[0].toPorts[0].ports",
                "port 53 must be specified for DNS rules",
            ),
            (
                json!({"endpointSelector": web(), "egress": [{"toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}], "rules": {"http": [{}], "dns": []}}]}]}),
                "spec.egress[0].toPorts[0].rules",
                "multiple L7 protocol rule types specified in single rule",
            ),
            (
                json!({"endpointSelector": web(), "egress": [{"toPorts": [{"ports": [{"port": "9092", "protocol": "TCP"}], "rules": {"kafka": [{}]}}]}]}),
                "spec.egress[0].toPorts[0].rules.kafka",
                "unsupported field",
            ),
            (
                json!({"endpointSelector": web(), "egress": [{"toPorts": [{"ports": [{"port": "80"}]}], "icmps": [{"fields": [{"type": 8}]}]}]}),
                "spec.egress[0].icmps",
                "the ICMPs block may only be present without ToPorts. Define a separate rule to use ToPorts.",
            ),
            (
                json!({"endpointSelector": web(), "egressDeny": [{"toFQDNs": [{"matchName": "a.io"}]}]}),
                "spec.egressDeny[0].toFQDNs",
                "toFQDNs is not allowed in deny rules",
            ),
            (
                json!({"endpointSelector": web(), "ingressDeny": [{"toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}], "rules": {"http": [{}]}}]}]}),
                "spec.ingressDeny[0].toPorts[0].rules",
                "not allowed in deny rules (deny policies do not support L7)",
            ),
            (
                json!({"endpointSelector": web(), "ingress": [{"fromEndpoints": [{}], "bogus": 1}]}),
                "spec.ingress[0].bogus",
                "unknown field",
            ),
            (
                json!({"endpointSelector": web(), "ingress": [{"fromRequires": [{}]}]}),
                "spec.ingress[0].fromRequires",
                "fromRequires is deprecated and no longer supported",
            ),
            (
                json!({"endpointSelector": web(), "ingress": [{"toPorts": [{"ports": [{"port": "80", "protocol": "ICMP"}]}]}]}),
                "spec.ingress[0].toPorts[0].ports[0].protocol",
                "ICMP is not a port protocol",
            ),
            (
                json!({"endpointSelector": web(), "ingress": [{"toPorts": [{"ports": [{"port": "70000"}]}]}]}),
                "spec.ingress[0].toPorts[0].ports[0].port",
                "unable to parse port \"70000\"",
            ),
            (
                json!({"endpointSelector": web(), "ingress": [{"toPorts": [{"ports": [{"protocol": "TCP"}]}]}]}),
                "spec.ingress[0].toPorts[0].ports[0].port",
                "port must be specified",
            ),
            (
                json!({"endpointSelector": web(), "ingress": [{"toPorts": [{"ports": (0..41).map(|p| json!({"port": p.to_string()})).collect::<Vec<_>>()}]}]}),
                "spec.ingress[0].toPorts[0].ports",
                "too many ports, the max is 40",
            ),
            (
                json!({"endpointSelector": web(), "ingress": [{"icmps": [{"fields": [{"family": "IPv5", "type": 8}]}]}]}),
                "spec.ingress[0].icmps[0].fields[0].family",
                "wrong family: IPv5",
            ),
            (
                json!({"endpointSelector": web(), "ingress": [{"toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}], "rules": {"http": [{"path": "/a("}]}}]}]}),
                "spec.ingress[0].toPorts[0].rules.http[0].path",
                "invalid path regex",
            ),
            (
                json!({"endpointSelector": web(), "egress": [{"toFQDNs": [{"matchName": "a.io", "matchPattern": "*.a.io"}]}]}),
                "spec.egress[0].toFQDNs[0]",
                "only one of matchName or matchPattern",
            ),
            (
                json!({"endpointSelector": web(), "egress": [{"toFQDNs": [{"matchPattern": "a b"}]}]}),
                "spec.egress[0].toFQDNs[0].matchPattern",
                "invalid characters in matchPattern",
            ),
            (
                json!({"endpointSelector": {"matchExpressions": [{"key": "app", "operator": "In"}]}, "ingress": [{}]}),
                "spec.endpointSelector.matchExpressions[0]",
                "operator In on key `app` requires at least one value",
            ),
            (
                json!({"endpointSelector": {"matchLabels": {"bogus:app": "x"}}, "ingress": [{}]}),
                "spec.endpointSelector.matchLabels.bogus:app",
                "invalid label `bogus:app`: unknown label source `bogus`",
            ),
            (
                json!({"endpointSelector": web(), "ingress": [{"fromNodes": [{}]}]}),
                "spec.ingress[0].fromNodes",
                "unsupported field",
            ),
        ];
        for (i, (spec, path, msg)) in cases.into_iter().enumerate() {
            let (p, m) = err(&cnp(spec));
            assert_eq!(p, path, "case {i}: {m}");
            assert!(
                m.starts_with(msg),
                "case {i}: got {m:?}, want prefix {msg:?}"
            );
        }
    }

    #[test]
    fn host_policy_l7_rules() {
        let (p, m) = err(&ccnp(json!({
            "nodeSelector": {},
            "ingress": [{"toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}], "rules": {"http": [{}]}}]}]
        })));
        assert_eq!(p, "spec.ingress[0].toPorts[0].rules");
        assert!(m.starts_with("host policies do not support L7 rules yet"));
        // egress DNS is allowed on host policies
        parse1(&ccnp(json!({
            "nodeSelector": {},
            "egress": [{"toPorts": [{"ports": [{"port": "53", "protocol": "ANY"}], "rules": {"dns": [{"matchPattern": "*"}]}}]}]
        })))
        .unwrap();
    }

    #[test]
    fn error_names_document_and_resource() {
        let text = "\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: ok, namespace: a}
spec:
  endpointSelector: {}
  ingress: [{}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: bad, namespace: b}
specs:
- endpointSelector: {}
  ingress: [{}]
- endpointSelector: {}
  egress:
  - toPorts:
    - ports: [{port: '9092', protocol: TCP}]
      rules:
        kafka: [{topic: x}]
";
        let e = parse_documents(text, "policies.yaml").unwrap_err();
        assert_eq!(
            e.to_string(),
            "policies.yaml: document 1 (CiliumNetworkPolicy b/bad): specs[1].egress[0].toPorts[0].rules.kafka: unsupported field"
        );
    }

    #[test]
    fn syntax_errors() {
        let e = parse_documents("a: [unclosed", "x.yaml").unwrap_err();
        assert!(matches!(e, PolicyError::Syntax { .. }), "{e}");
        let e = parse_documents("{\"a\": ", "x.json").unwrap_err();
        assert!(e.to_string().contains("invalid JSON"), "{e}");
        let e = parse_documents("kind: Deployment\napiVersion: apps/v1\n", "x.yaml").unwrap_err();
        assert!(
            e.to_string().contains("unsupported kind \"Deployment\""),
            "{e}"
        );
        let e = parse_documents(
            "kind: CiliumNetworkPolicy\napiVersion: cilium.io/v1\nmetadata: {name: x}\nspec: {}\n",
            "x.yaml",
        )
        .unwrap_err();
        assert_eq!(e.path(), Some("apiVersion"));
    }

    #[test]
    fn nil_empty_and_wildcard_peers() {
        let rule = |ingress: Value| {
            let p = parse1(&cnp(
                json!({"endpointSelector": web(), "ingress": [ingress]}),
            ))
            .unwrap();
            p.rules[0].ingress[0].clone()
        };
        // no L3 member: Unspecified (wildcard only together with L4)
        assert_eq!(rule(json!({})).peers, Peers::Unspecified);
        assert!(!rule(json!({})).has_l4());
        // explicit null is nil
        assert_eq!(
            rule(json!({"fromEndpoints": null})).peers,
            Peers::Unspecified
        );
        // empty list selects nothing
        assert_eq!(
            rule(json!({"fromEndpoints": []})).peers,
            Peers::Endpoints(vec![])
        );
        assert_eq!(
            rule(json!({"fromEntities": []})).peers,
            Peers::Endpoints(vec![])
        );
        assert_eq!(
            rule(json!({"fromCIDR": []})).peers,
            Peers::Endpoints(vec![])
        );
        // [{}] in a CNP: all pods of the policy namespace
        match rule(json!({"fromEndpoints": [{}]})).peers {
            Peers::Endpoints(v) => {
                assert_eq!(v.len(), 1);
                assert_eq!(v[0].to_string(), "k8s:io.kubernetes.pod.namespace=ns1");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn namespace_scoping() {
        let peers = |policy: Value| -> Vec<String> {
            let p = parse1(&policy).unwrap();
            match &p.rules[0].ingress[0].peers {
                Peers::Endpoints(v) => v.iter().map(|s| s.to_string()).collect(),
                other => panic!("{other:?}"),
            }
        };
        let ing = |sel: Value| json!([{"fromEndpoints": [sel]}]);
        // CNP: namespace added unless a namespace or namespace-label key is present
        assert_eq!(
            peers(cnp(
                json!({"endpointSelector": {}, "ingress": ing(json!({"matchLabels": {"app": "db"}}))})
            )),
            vec!["k8s:io.kubernetes.pod.namespace=ns1,any:app=db"]
        );
        assert_eq!(
            peers(cnp(
                json!({"endpointSelector": {}, "ingress": ing(json!({"matchLabels": {"k8s:io.kubernetes.pod.namespace": "other"}}))})
            )),
            vec!["k8s:io.kubernetes.pod.namespace=other"]
        );
        assert_eq!(
            peers(cnp(
                json!({"endpointSelector": {}, "ingress": ing(json!({"matchLabels": {"io.kubernetes.pod.namespace": "other"}}))})
            )),
            vec!["any:io.kubernetes.pod.namespace=other"]
        );
        assert_eq!(
            peers(cnp(
                json!({"endpointSelector": {}, "ingress": ing(json!({"matchLabels": {"k8s:io.cilium.k8s.namespace.labels.team": "a"}}))})
            )),
            vec!["k8s:io.cilium.k8s.namespace.labels.team=a"]
        );
        // reserved keys are left untouched
        assert_eq!(
            peers(cnp(
                json!({"endpointSelector": {}, "ingress": ing(json!({"matchLabels": {"reserved:host": ""}}))})
            )),
            vec!["reserved:host="]
        );
        // CCNP: namespace Exists added
        assert_eq!(
            peers(ccnp(
                json!({"endpointSelector": {}, "ingress": ing(json!({}))})
            )),
            vec!["k8s:io.kubernetes.pod.namespace"]
        );
        // CCNP whose subject selects reserved:init: nothing added
        assert_eq!(
            peers(ccnp(
                json!({"endpointSelector": {"matchLabels": {"reserved:init": ""}}, "ingress": ing(json!({}))})
            )),
            vec!["{}"]
        );
    }

    #[test]
    fn subject_scoping_and_policy_labels() {
        let p = parse1(&cnp(json!({
            "endpointSelector": {"matchLabels": {"app": "web", "k8s:io.kubernetes.pod.namespace": "evil"}},
            "ingress": [{}],
            "labels": [{"key": "team", "value": "a", "source": "k8s"}]
        })))
        .unwrap();
        match &p.rules[0].subject {
            Subject::Endpoints(s) => {
                assert_eq!(
                    s.to_string(),
                    "k8s:io.kubernetes.pod.namespace=ns1,any:app=web"
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(p.warnings.len(), 1);
        assert!(
            p.warnings[0]
                .contains("EndpointSelector always applies in namespace of the policy resource")
        );
        let labels: Vec<String> = p.rules[0].labels.iter().map(|l| l.to_string()).collect();
        assert_eq!(
            labels,
            vec![
                "k8s:io.cilium.k8s.policy.derived-from=CiliumNetworkPolicy",
                "k8s:io.cilium.k8s.policy.name=p",
                "k8s:io.cilium.k8s.policy.namespace=ns1",
                "k8s:team=a",
            ]
        );
        assert_eq!(p.rules[0].origin, "CiliumNetworkPolicy ns1/p spec");
    }

    #[test]
    fn default_deny_defaults() {
        let dd = |spec: Value| parse1(&cnp(spec)).unwrap().rules[0].enable_default_deny;
        assert_eq!(
            dd(json!({"endpointSelector": {}, "ingress": [{}]})),
            DefaultDeny {
                ingress: true,
                egress: false
            }
        );
        assert_eq!(
            dd(json!({"endpointSelector": {}, "egressDeny": [{"toEntities": ["world"]}]})),
            DefaultDeny {
                ingress: false,
                egress: true
            }
        );
        assert_eq!(
            dd(
                json!({"endpointSelector": {}, "ingress": [{}], "enableDefaultDeny": {"ingress": false, "egress": true}})
            ),
            DefaultDeny {
                ingress: false,
                egress: true
            }
        );
    }

    #[test]
    fn ports_and_icmp() {
        let p = parse1(&cnp(json!({
            "endpointSelector": {},
            "ingress": [
                {"toPorts": [{"ports": [
                    {"port": "8000", "endPort": 8100, "protocol": "tcp"},
                    {"port": 53, "protocol": "UDP"},
                    {"port": "HTTP-alt"},
                ]}]},
                {"icmps": [{"fields": [{"type": 8}, {"family": "IPv6", "type": "EchoRequest"}]}]},
            ]
        })))
        .unwrap();
        let r = &p.rules[0].ingress;
        assert_eq!(
            r[0].to_ports[0].ports,
            vec![
                PortProtocol {
                    port: Port::Number(8000),
                    end_port: Some(8100),
                    protocol: Protocol::Tcp
                },
                PortProtocol {
                    port: Port::Number(53),
                    end_port: None,
                    protocol: Protocol::Udp
                },
                PortProtocol {
                    port: Port::Named("http-alt".into()),
                    end_port: None,
                    protocol: Protocol::Any
                },
            ]
        );
        assert_eq!(
            r[1].icmps,
            vec![
                IcmpField {
                    family: IcmpFamily::IPv4,
                    icmp_type: 8
                },
                IcmpField {
                    family: IcmpFamily::IPv6,
                    icmp_type: 128
                },
            ]
        );
    }

    /// `toPorts[].serverNames`: accepted on egress TCP ports alone; every misuse is an error
    /// naming the field.
    #[test]
    fn server_names() {
        let egress = |port_rule: Value| {
            cnp(
                json!({"endpointSelector": web(), "egress": [{"toEntities": ["world"], "toPorts": [port_rule]}]}),
            )
        };
        let tcp443 = json!([{"port": "443", "protocol": "TCP"}]);
        let p = parse1(&egress(json!({
            "ports": tcp443,
            "serverNames": ["API.example.com.", "*.cdn.example.com", "api.example.com"]
        })))
        .unwrap();
        assert_eq!(
            p.rules[0].egress[0].to_ports[0].rules,
            Some(L7Rules::Tls(vec![
                ServerName::Exact("api.example.com".into()),
                ServerName::Wildcard("cdn.example.com".into()),
            ])),
            "lower-cased, trailing dot dropped, duplicates merged"
        );
        // An empty list restricts nothing (Cilium: "if not empty, then TLS must be present").
        let p = parse1(&egress(json!({"ports": tcp443, "serverNames": []}))).unwrap();
        assert_eq!(p.rules[0].egress[0].to_ports[0].rules, None);
        // `rules: {}` has no rule type: allowed next to serverNames.
        let p = parse1(&egress(
            json!({"ports": tcp443, "rules": {}, "serverNames": ["a.io"]}),
        ))
        .unwrap();
        assert!(matches!(
            p.rules[0].egress[0].to_ports[0].rules,
            Some(L7Rules::Tls(_))
        ));

        let cases: Vec<(Value, &str, &str)> = vec![
            (
                egress(json!({"ports": tcp443, "serverNames": ["a.io"], "rules": {"http": [{}]}})),
                "spec.egress[0].toPorts[0].serverNames",
                "serverNames together with L7 rules requires terminatingTLS, which membrane does not support",
            ),
            (
                cnp(
                    json!({"endpointSelector": web(), "ingress": [{"toPorts": [{"ports": tcp443, "serverNames": ["a.io"]}]}]}),
                ),
                "spec.ingress[0].toPorts[0].serverNames",
                "serverNames on ingress is not supported yet",
            ),
            (
                cnp(
                    json!({"endpointSelector": web(), "egressDeny": [{"toPorts": [{"ports": tcp443, "serverNames": ["a.io"]}]}]}),
                ),
                "spec.egressDeny[0].toPorts[0].serverNames",
                "not allowed in deny rules",
            ),
            (
                ccnp(
                    json!({"nodeSelector": {}, "egress": [{"toPorts": [{"ports": tcp443, "serverNames": ["a.io"]}]}]}),
                ),
                "spec.egress[0].toPorts[0].serverNames",
                "host policies do not support serverNames",
            ),
            (
                egress(
                    json!({"ports": [{"port": "443", "protocol": "UDP"}], "serverNames": ["a.io"]}),
                ),
                "spec.egress[0].toPorts[0].ports[0].protocol",
                "serverNames can only apply to TCP (not UDP)",
            ),
            (
                egress(json!({"ports": [{"port": "443"}], "serverNames": ["a.io"]})),
                "spec.egress[0].toPorts[0].ports[0].protocol",
                "serverNames can only apply to TCP (not ANY)",
            ),
            (
                egress(
                    json!({"ports": [{"port": "0", "protocol": "TCP"}], "serverNames": ["a.io"]}),
                ),
                "spec.egress[0].toPorts[0].ports[0].port",
                "serverNames can not be used when a port is 0",
            ),
            (
                egress(json!({"serverNames": ["a.io"]})),
                "spec.egress[0].toPorts[0].ports",
                "serverNames require at least one port",
            ),
            (
                egress(json!({"ports": tcp443, "serverNames": ["a.io", "a b.io"]})),
                "spec.egress[0].toPorts[0].serverNames[1]",
                "invalid characters in server name \"a b.io\"",
            ),
            (
                egress(json!({"ports": tcp443, "serverNames": ["**.a.io"]})),
                "spec.egress[0].toPorts[0].serverNames[0]",
                "server name \"**.a.io\": a wildcard is only supported as the whole first label",
            ),
            (
                egress(json!({"ports": tcp443, "serverNames": [7]})),
                "spec.egress[0].toPorts[0].serverNames[0]",
                "expected a string",
            ),
            (
                egress(json!({"ports": tcp443, "serverNames": "a.io"})),
                "spec.egress[0].toPorts[0].serverNames",
                "expected a list",
            ),
            (
                egress(json!({"ports": tcp443, "terminatingTLS": {"secret": {"name": "x"}}})),
                "spec.egress[0].toPorts[0].terminatingTLS",
                "unsupported field: membrane does not terminate or originate TLS",
            ),
            (
                egress(json!({"ports": tcp443, "originatingTLS": {"secret": {"name": "x"}}})),
                "spec.egress[0].toPorts[0].originatingTLS",
                "unsupported field",
            ),
        ];
        for (i, (doc, path, msg)) in cases.into_iter().enumerate() {
            let (p, m) = err(&doc);
            assert_eq!(p, path, "case {i}: {m}");
            assert!(
                m.starts_with(msg),
                "case {i}: got {m:?}, want prefix {msg:?}"
            );
        }
    }

    #[test]
    fn l7_nil_vs_empty() {
        let rules = |r: Value| {
            let p = parse1(&cnp(json!({
                "endpointSelector": {},
                "egress": [{"toPorts": [{"ports": [{"port": "53", "protocol": "ANY"}], "rules": r}]}]
            })))
            .unwrap();
            p.rules[0].egress[0].to_ports[0].rules.clone()
        };
        assert_eq!(rules(json!({})), None);
        assert_eq!(rules(json!({"dns": []})), Some(L7Rules::Dns(vec![])));
        assert_eq!(
            rules(json!({"dns": [{"matchPattern": "*"}]})),
            Some(L7Rules::Dns(vec![FqdnSelector::pattern("*").unwrap()]))
        );
    }

    #[test]
    fn list_and_json_and_multidoc() {
        let list = json!({
            "apiVersion": "v1", "kind": "List",
            "items": [cnp(json!({"endpointSelector": {}, "ingress": [{}]})), ccnp(json!({"endpointSelector": {}, "egress": [{}]}))]
        });
        let text = serde_json::to_string(&list).unwrap();
        let ps = parse_documents(&text, "list.json").unwrap();
        assert_eq!(ps.len(), 2);
        assert_eq!(ps[1].kind, PolicyKind::CiliumClusterwideNetworkPolicy);
        assert_eq!(ps[1].namespace, None);
        // error inside a list item names the item path
        let bad = json!({"apiVersion": "v1", "kind": "List", "items": [cnp(json!({"endpointSelector": {}}))]});
        let e = parse_value(&bad, 3, "l", &ParseOptions::default()).unwrap_err();
        assert_eq!(e.path(), Some("items[0].spec"));
        assert!(
            e.to_string()
                .starts_with("l: document 3 (CiliumNetworkPolicy ns1/p): items[0].spec:")
        );
        // empty documents are skipped, default namespace applies
        let yaml = "---\n---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec: {endpointSelector: {}, ingress: [{}]}\n---\n";
        let ps = parse_documents(yaml, "y").unwrap();
        assert_eq!(ps.len(), 1);
        assert_eq!(ps[0].namespace.as_deref(), Some("default"));
    }

    #[test]
    fn ccnp_namespace_is_ignored_with_a_warning() {
        let mut v = ccnp(json!({"endpointSelector": {}, "ingress": [{}]}));
        v["metadata"]["namespace"] = json!("x");
        let ps = parse_value(&v, 0, "ccnp.yaml", &ParseOptions::default()).expect("accepted");
        let p = &ps[0];
        assert_eq!(p.namespace, None);
        assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
        assert!(p.warnings[0].starts_with("metadata.namespace: \"x\" ignored"));
        assert!(p.warnings[0].contains("cluster-scoped"));
    }

    #[test]
    fn knp_translation() {
        let v = json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "k", "namespace": "prod"},
            "spec": {
                "podSelector": {"matchLabels": {"app": "db"}},
                "ingress": [{
                    "from": [
                        {"podSelector": {"matchLabels": {"app": "web"}}},
                        {"namespaceSelector": {"matchLabels": {"team": "a"}}},
                        {"namespaceSelector": {}, "podSelector": {"matchLabels": {"role": "mon"}}},
                        {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}
                    ],
                    "ports": [{"port": 5432}, {"port": "metrics", "protocol": "TCP"}]
                }]
            }
        });
        let p = parse1(&v).unwrap();
        let r = &p.rules[0];
        assert_eq!(
            r.enable_default_deny,
            DefaultDeny {
                ingress: true,
                egress: false
            }
        );
        assert_eq!(r.ingress.len(), 2);
        match &r.ingress[0].peers {
            Peers::Endpoints(v) => {
                let s: Vec<String> = v.iter().map(|s| s.to_string()).collect();
                assert_eq!(
                    s,
                    vec![
                        "k8s:io.kubernetes.pod.namespace=prod,any:app=web",
                        "k8s:io.cilium.k8s.namespace.labels.team=a",
                        "k8s:io.kubernetes.pod.namespace,any:role=mon",
                    ]
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(&r.ingress[1].peers, Peers::Cidrs(c) if c[0].except.len() == 1));
        assert_eq!(r.ingress[0].to_ports[0].ports[0].protocol, Protocol::Tcp);
        // policyTypes: Egress only, no rules → egress default deny, ingress untouched
        let v = json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "deny-egress"},
            "spec": {"podSelector": {}, "policyTypes": ["Egress"]}
        });
        let p = parse1(&v).unwrap();
        assert_eq!(
            p.rules[0].enable_default_deny,
            DefaultDeny {
                ingress: false,
                egress: true
            }
        );
        // unknown field in KNP
        let v = json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "x"},
            "spec": {"podSelector": {}, "ingress": [{"from": [{"serviceSelector": {}}]}]}
        });
        assert_eq!(err(&v).0, "spec.ingress[0].from[0].serviceSelector");
    }
}
