//! The `WasmFilter` resource (`apiVersion: membrane.io/v1alpha1`): which Wasm filter runs, in
//! which order, on the traffic the proxy handles for the endpoints it selects: HTTP
//! requests (`protocol: http`, the default) or TCP connections (`protocol: tcp`).
//!
//! ```yaml
//! apiVersion: membrane.io/v1alpha1
//! kind: WasmFilter
//! metadata:
//!   name: deny-admin
//!   namespace: default          # selects endpoints of this namespace only
//! spec:
//!   endpointSelector:
//!     matchLabels: {app: api}
//!   direction: Ingress          # Ingress | Egress (the endpoint's traffic in or out)
//!   protocol: http              # http (default): HTTP requests | tcp: connections relayed at L4
//!   ports: [8080]               # optional: only these ports (default: every proxied port)
//!   module: /var/lib/membrane/filters/deny_path.wasm
//!   sha256: 3f5a…               # the module's SHA-256 (hex): a changed file is refused
//!   config: |                   # optional: the plugin configuration, as bytes
//!     /admin
//!   order: 10                   # optional: lower runs first (default 0; then by name)
//!   failurePolicy: FailClosed   # FailClosed (default) | FailOpen | Reload
//!   failureStatus: 503          # optional: the status of a failed-closed stream
//!   upstreams:                  # optional: the names proxy_http_call may use (Envoy: clusters)
//!   - name: auth
//!     address: 10.0.0.5:9001    # IP:PORT (no DNS: the proxy never resolves names)
//! ```
//!
//! A callout leaves the node proxy marked "from the egress proxy" with identity
//! `reserved:host` (`membrane_l7proxy::redirect::CALLOUT_MARK`): the datapath never
//! redirects it back to the proxy, and a pod serving callouts sees them from the host, which
//! `allow-localhost` admits. A name the filter calls that is not listed gets `BAD_ARGUMENT`
//! (Envoy's answer for an unknown cluster).
//!
//! HTTP filters run on requests the proxy handles — ports with HTTP rules, after the HTTP
//! policy allowed the request — as with Envoy's filters after Cilium's L7 policy. TCP
//! filters (the proxy-wasm stream context: `proxy_on_new_connection`, `_downstream_data`,
//! `_upstream_data`) run on the connections the proxy relays at L4 — ports with
//! `serverNames` rules (the TLS relay), after the policy allowed the connection — and see
//! every byte both ways. A module that declares only the other protocol's callbacks is
//! refused when the proxy loads it, with that reason. A selected port the proxy does not
//! handle is not redirected, so no filter sees its traffic (`membrane policy list` shows the
//! filter; the flows show no proxy). Resources come from the watched policy
//! directory and `membrane policy apply`, mixed with policies in one file if wanted; errors
//! name the file, the resource and the field, and a file with any error changes nothing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use membrane_policy::{EndpointSelector, LabelSource, Labels};
use serde::{Deserialize, Serialize};
use serde_yaml_ng::Value;
use sha2::Digest as _;

pub const API_VERSION: &str = "membrane.io/v1alpha1";

pub const KIND: &str = "WasmFilter";

/// Traffic into or out of the selected endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum FilterDirection {
    Ingress,
    Egress,
}

/// What a filter filters (`spec.protocol`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum FilterProtocol {
    /// HTTP requests of ports with HTTP rules.
    #[default]
    Http,
    /// TCP connections the proxy relays at L4 (ports with `serverNames` rules).
    Tcp,
}

impl FilterProtocol {
    pub fn is_http(&self) -> bool {
        *self == Self::Http
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Tcp => "tcp",
        }
    }
}

/// What happens to a stream when the filter fails (trap, deadline, memory cap).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailurePolicy {
    /// The stream is answered with the failure status.
    FailClosed,
    /// The filter is skipped for the stream.
    FailOpen,
    /// Like FailClosed, and replacement instances boot with backoff.
    Reload,
}

/// One named upstream of `spec.upstreams`: where the filter's `proxy_http_call(NAME, …)`
/// goes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CalloutUpstream {
    pub name: String,
    pub address: SocketAddr,
}

/// Most `spec.upstreams` one filter may name.
pub const MAX_UPSTREAMS: usize = 64;

/// One validated `WasmFilter`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WasmFilterResource {
    pub name: String,
    pub namespace: String,
    /// `endpointSelector.matchLabels`.
    pub match_labels: Vec<(String, String)>,
    /// `endpointSelector.matchExpressions` (key, operator, values).
    pub match_expressions: Vec<(String, String, Vec<String>)>,
    pub direction: FilterDirection,
    /// `spec.protocol`: HTTP requests (default) or TCP connections.
    pub protocol: FilterProtocol,
    /// Empty: every port the proxy handles.
    pub ports: Vec<u16>,
    pub module: PathBuf,
    /// Lower-case hex.
    pub sha256: String,
    pub config: String,
    pub order: i64,
    pub failure_policy: FailurePolicy,
    pub failure_status: u16,
    /// `spec.upstreams`, sorted by name (names are unique).
    pub upstreams: Vec<CalloutUpstream>,
}

impl WasmFilterResource {
    /// `WasmFilter NAMESPACE/NAME`, as policies are named in lists and applies.
    pub fn key(&self) -> String {
        format!("{KIND} {}/{}", self.namespace, self.name)
    }

    /// The endpoint selector, scoped to the resource's namespace.
    pub fn selector(&self) -> EndpointSelector {
        let mut selector = EndpointSelector::from_parts(
            self.match_labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
            self.match_expressions
                .iter()
                .map(|(k, op, vs)| (k.as_str(), op.as_str(), vs.clone())),
        )
        .expect("validated when parsed");
        selector.add_match(
            LabelSource::K8s,
            "io.kubernetes.pod.namespace",
            &self.namespace,
        );
        selector
    }

    /// True if it applies to an endpoint with these labels.
    pub fn selects(&self, labels: &Labels) -> bool {
        self.selector().matches(labels)
    }
}

/// A document's kind, for splitting mixed files.
fn kind_of(doc: &Value) -> Option<&str> {
    doc.get("kind").and_then(Value::as_str)
}

/// Splits `text` (YAML or JSON, multi-document) into the policies (returned as YAML text for
/// the policy parser) and the `WasmFilter` resources (validated; module files read and
/// checked against their sha256). `source` names the input in errors.
pub fn split_documents(
    text: &str,
    source: &str,
) -> Result<(String, Vec<WasmFilterResource>), String> {
    let mut policies = Vec::new();
    let mut filters = Vec::new();
    let mut has_filters = false;
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = match Value::deserialize(document) {
            Ok(v) => v,
            // Let the policy parser report YAML errors with its positions.
            Err(_) => return Ok((text.to_owned(), Vec::new())),
        };
        if value.is_null() {
            continue;
        }
        if kind_of(&value) == Some(KIND) {
            has_filters = true;
            filters.push(parse(&value, &format!("{source}: document {}", index + 1))?);
        } else {
            policies.push(value);
        }
    }
    if !has_filters {
        return Ok((text.to_owned(), filters));
    }
    let mut rest = String::new();
    for p in policies {
        rest.push_str("---\n");
        rest.push_str(&serde_yaml_ng::to_string(&p).map_err(|e| format!("{source}: {e}"))?);
    }
    Ok((rest, filters))
}

fn field<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null())
}

fn string(v: &Value, at: &str) -> Result<String, String> {
    v.as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("{at}: expected a string"))
}

/// One `WasmFilter` document. `at` names the document in errors.
pub fn parse(doc: &Value, at: &str) -> Result<WasmFilterResource, String> {
    let map = doc
        .as_mapping()
        .ok_or_else(|| format!("{at}: expected a mapping"))?;
    for key in map.keys() {
        let key = key.as_str().unwrap_or_default();
        if !matches!(key, "apiVersion" | "kind" | "metadata" | "spec") {
            return Err(format!("{at}: unknown field `{key}`"));
        }
    }
    let api = field(doc, "apiVersion")
        .map(|v| string(v, &format!("{at}: apiVersion")))
        .transpose()?
        .unwrap_or_default();
    if api != API_VERSION {
        return Err(format!(
            "{at}: apiVersion: a {KIND} is `{API_VERSION}`, not `{api}`"
        ));
    }
    let meta = field(doc, "metadata").ok_or_else(|| format!("{at}: metadata: required"))?;
    let name = field(meta, "name")
        .ok_or_else(|| format!("{at}: metadata.name: required"))
        .and_then(|v| string(v, &format!("{at}: metadata.name")))?;
    let namespace = field(meta, "namespace")
        .map(|v| string(v, &format!("{at}: metadata.namespace")))
        .transpose()?
        .unwrap_or_else(|| "default".to_owned());
    for (what, value) in [("name", &name), ("namespace", &namespace)] {
        let ok = !value.is_empty()
            && value.len() <= 253
            && value
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !ok {
            return Err(format!(
                "{at}: metadata.{what}: `{value}` is not a valid name (lower-case letters, digits, '-', '.')"
            ));
        }
    }
    let at = format!("{at} ({KIND}/{namespace}/{name})");
    let spec = field(doc, "spec").ok_or_else(|| format!("{at}: spec: required"))?;
    let spec_map = spec
        .as_mapping()
        .ok_or_else(|| format!("{at}: spec: expected a mapping"))?;
    for key in spec_map.keys() {
        let key = key.as_str().unwrap_or_default();
        if !matches!(
            key,
            "endpointSelector"
                | "direction"
                | "protocol"
                | "ports"
                | "module"
                | "sha256"
                | "config"
                | "order"
                | "failurePolicy"
                | "failureStatus"
                | "upstreams"
        ) {
            return Err(format!("{at}: spec.{key}: unknown field"));
        }
    }

    // endpointSelector
    let sel = field(spec, "endpointSelector").ok_or_else(|| {
        format!(
            "{at}: spec.endpointSelector: required ({{}} selects every endpoint of the namespace)"
        )
    })?;
    let mut match_labels = Vec::new();
    if let Some(labels) = field(sel, "matchLabels") {
        let labels = labels.as_mapping().ok_or_else(|| {
            format!("{at}: spec.endpointSelector.matchLabels: expected a mapping")
        })?;
        for (k, v) in labels {
            let k = k.as_str().unwrap_or_default().to_owned();
            let v = match v {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                _ => {
                    return Err(format!(
                        "{at}: spec.endpointSelector.matchLabels.{k}: expected a string"
                    ));
                }
            };
            match_labels.push((k, v));
        }
    }
    let mut match_expressions = Vec::new();
    if let Some(exprs) = field(sel, "matchExpressions") {
        let exprs = exprs.as_sequence().ok_or_else(|| {
            format!("{at}: spec.endpointSelector.matchExpressions: expected a list")
        })?;
        for (i, e) in exprs.iter().enumerate() {
            let p = format!("{at}: spec.endpointSelector.matchExpressions[{i}]");
            let key = field(e, "key")
                .ok_or_else(|| format!("{p}.key: required"))
                .and_then(|v| string(v, &format!("{p}.key")))?;
            let op = field(e, "operator")
                .ok_or_else(|| format!("{p}.operator: required"))
                .and_then(|v| string(v, &format!("{p}.operator")))?;
            let values = match field(e, "values") {
                None => Vec::new(),
                Some(v) => v
                    .as_sequence()
                    .ok_or_else(|| format!("{p}.values: expected a list"))?
                    .iter()
                    .map(|x| string(x, &format!("{p}.values")))
                    .collect::<Result<_, _>>()?,
            };
            match_expressions.push((key, op, values));
        }
    }
    EndpointSelector::from_parts(
        match_labels.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        match_expressions
            .iter()
            .map(|(k, op, vs)| (k.as_str(), op.as_str(), vs.clone())),
    )
    .map_err(|e| format!("{at}: spec.endpointSelector: {e}"))?;

    let direction = match field(spec, "direction")
        .ok_or_else(|| format!("{at}: spec.direction: required (Ingress or Egress)"))
        .and_then(|v| string(v, &format!("{at}: spec.direction")))?
        .as_str()
    {
        "Ingress" | "ingress" => FilterDirection::Ingress,
        "Egress" | "egress" => FilterDirection::Egress,
        other => {
            return Err(format!(
                "{at}: spec.direction: `{other}` is not Ingress or Egress"
            ));
        }
    };
    let protocol = match field(spec, "protocol")
        .map(|v| string(v, &format!("{at}: spec.protocol")))
        .transpose()?
        .as_deref()
    {
        None | Some("http") | Some("HTTP") => FilterProtocol::Http,
        Some("tcp") | Some("TCP") => FilterProtocol::Tcp,
        Some(other) => {
            return Err(format!(
                "{at}: spec.protocol: `{other}` is not http or tcp (http: HTTP requests; tcp: connections the proxy relays at L4)"
            ));
        }
    };
    let mut ports = Vec::new();
    if let Some(list) = field(spec, "ports") {
        let list = list
            .as_sequence()
            .ok_or_else(|| format!("{at}: spec.ports: expected a list of port numbers"))?;
        for (i, p) in list.iter().enumerate() {
            let n = p
                .as_u64()
                .or_else(|| p.as_str().and_then(|s| s.parse().ok()))
                .filter(|n| (1..=65535).contains(n))
                .ok_or_else(|| format!("{at}: spec.ports[{i}]: expected a port number 1-65535"))?;
            ports.push(n as u16);
        }
        ports.sort_unstable();
        ports.dedup();
    }
    let module = PathBuf::from(
        field(spec, "module")
            .ok_or_else(|| format!("{at}: spec.module: required (the .wasm file's absolute path)"))
            .and_then(|v| string(v, &format!("{at}: spec.module")))?,
    );
    if !module.is_absolute() {
        return Err(format!(
            "{at}: spec.module: `{}` must be an absolute path (the proxy reads it)",
            module.display()
        ));
    }
    let sha256 = field(spec, "sha256")
        .ok_or_else(|| format!("{at}: spec.sha256: required (`sha256sum MODULE.wasm`)"))
        .and_then(|v| string(v, &format!("{at}: spec.sha256")))?
        .to_ascii_lowercase();
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "{at}: spec.sha256: expected 64 hex digits, got `{sha256}`"
        ));
    }
    let actual = module_sha256(&module).map_err(|e| format!("{at}: spec.module: {e}"))?;
    if actual != sha256 {
        return Err(format!(
            "{at}: spec.sha256: {} has sha256 {actual}, not {sha256}",
            module.display()
        ));
    }
    let config = field(spec, "config")
        .map(|v| string(v, &format!("{at}: spec.config")))
        .transpose()?
        .unwrap_or_default();
    let order = match field(spec, "order") {
        None => 0,
        Some(v) => v
            .as_i64()
            .ok_or_else(|| format!("{at}: spec.order: expected an integer"))?,
    };
    let failure_policy = match field(spec, "failurePolicy")
        .map(|v| string(v, &format!("{at}: spec.failurePolicy")))
        .transpose()?
        .as_deref()
    {
        None | Some("FailClosed") => FailurePolicy::FailClosed,
        Some("FailOpen") => FailurePolicy::FailOpen,
        Some("Reload") => FailurePolicy::Reload,
        Some(other) => {
            return Err(format!(
                "{at}: spec.failurePolicy: `{other}` is not FailClosed, FailOpen or Reload"
            ));
        }
    };
    let failure_status = match field(spec, "failureStatus") {
        None => 503,
        Some(v) => v
            .as_u64()
            .filter(|s| (200..=599).contains(s))
            .ok_or_else(|| format!("{at}: spec.failureStatus: expected an HTTP status 200-599"))?
            as u16,
    };
    let upstreams = parse_upstreams(spec, &at)?;
    Ok(WasmFilterResource {
        name,
        namespace,
        match_labels,
        match_expressions,
        direction,
        protocol,
        ports,
        module,
        sha256,
        config,
        order,
        failure_policy,
        failure_status,
        upstreams,
    })
}

/// `spec.upstreams`: a list of `{name, address}`; names unique, addresses `IP:PORT`.
fn parse_upstreams(spec: &Value, at: &str) -> Result<Vec<CalloutUpstream>, String> {
    let Some(list) = field(spec, "upstreams") else {
        return Ok(Vec::new());
    };
    let list = list
        .as_sequence()
        .ok_or_else(|| format!("{at}: spec.upstreams: expected a list of {{name, address}}"))?;
    if list.len() > MAX_UPSTREAMS {
        return Err(format!(
            "{at}: spec.upstreams: {} entries, at most {MAX_UPSTREAMS}",
            list.len()
        ));
    }
    let mut upstreams: Vec<CalloutUpstream> = Vec::with_capacity(list.len());
    for (i, u) in list.iter().enumerate() {
        let p = format!("{at}: spec.upstreams[{i}]");
        let map = u
            .as_mapping()
            .ok_or_else(|| format!("{p}: expected a mapping with name and address"))?;
        for key in map.keys() {
            let key = key.as_str().unwrap_or_default();
            if !matches!(key, "name" | "address") {
                return Err(format!("{p}.{key}: unknown field"));
            }
        }
        let name = field(u, "name")
            .ok_or_else(|| {
                format!("{p}.name: required (what the filter passes to proxy_http_call)")
            })
            .and_then(|v| string(v, &format!("{p}.name")))?;
        let valid = !name.is_empty()
            && name.len() <= 253
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'|'));
        if !valid {
            return Err(format!(
                "{p}.name: `{name}` is not a valid upstream name (letters, digits, '-', '_', '.', '|'; at most 253)"
            ));
        }
        if let Some(first) = upstreams.iter().position(|x| x.name == name) {
            return Err(format!(
                "{p}.name: `{name}` is also spec.upstreams[{first}].name"
            ));
        }
        let address = field(u, "address")
            .ok_or_else(|| format!("{p}.address: required (IP:PORT)"))
            .and_then(|v| string(v, &format!("{p}.address")))?;
        let address: SocketAddr = address.parse().map_err(|_| {
            format!("{p}.address: `{address}` is not IP:PORT (e.g. 10.0.0.5:9001; names are not resolved)")
        })?;
        if address.port() == 0 || address.ip().is_unspecified() {
            return Err(format!(
                "{p}.address: `{address}` needs a real address and a port other than 0"
            ));
        }
        upstreams.push(CalloutUpstream { name, address });
    }
    upstreams.sort();
    Ok(upstreams)
}

/// Largest module a `WasmFilter` may name, bytes (filters are tens to hundreds of KiB; this
/// bounds what reading `spec.module` can cost whatever the path names).
pub const MAX_MODULE_BYTES: u64 = 64 << 20;

/// The SHA-256 of a module file, lower-case hex. Only a regular file of at most
/// [`MAX_MODULE_BYTES`] is read: a path naming a device (`/dev/zero`), a FIFO or a directory
/// is refused by name instead of being read without bound.
pub fn module_sha256(path: &Path) -> Result<String, String> {
    use std::io::Read as _;
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    if meta.len() > MAX_MODULE_BYTES {
        return Err(format!(
            "{} has {} bytes, more than the {MAX_MODULE_BYTES} a module may have",
            path.display(),
            meta.len()
        ));
    }
    let mut bytes = Vec::new();
    // The size can change between the check and the read: the read is bounded too.
    file.take(MAX_MODULE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if bytes.len() as u64 > MAX_MODULE_BYTES {
        return Err(format!(
            "{} grew past the {MAX_MODULE_BYTES} bytes a module may have",
            path.display()
        ));
    }
    Ok(hex(&sha2::Sha256::digest(&bytes)))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod module_tests {
    use super::*;

    /// Found while writing the policy fuzz target: a `WasmFilter` naming `/dev/zero` made
    /// the agent read without end. Now it is refused by name.
    #[test]
    fn a_module_that_is_not_a_regular_file_is_refused() {
        let err = module_sha256(Path::new("/dev/zero")).expect_err("a device");
        assert!(err.contains("/dev/zero is not a regular file"), "{err}");
        let err = module_sha256(Path::new("/")).expect_err("a directory");
        assert!(err.contains("not a regular file"), "{err}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module() -> (PathBuf, String) {
        let dir = std::env::temp_dir().join(format!("mb-wasmres-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.wasm");
        std::fs::write(&path, b"\0asm\x01\0\0\0").unwrap();
        let sum = module_sha256(&path).unwrap();
        (path, sum)
    }

    fn doc(module: &Path, sha: &str, extra: &str) -> String {
        format!(
            "apiVersion: membrane.io/v1alpha1\nkind: WasmFilter\nmetadata:\n  name: deny-admin\nspec:\n  endpointSelector:\n    matchLabels: {{app: api}}\n  direction: Ingress\n  module: {}\n  sha256: {sha}\n{extra}",
            module.display()
        )
    }

    #[test]
    fn a_mixed_file_splits_and_defaults_apply() {
        let (m, sha) = module();
        let text = format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p, namespace: default}}\nspec:\n  endpointSelector: {{}}\n---\n{}",
            doc(
                &m,
                &sha,
                "  ports: [8080, \"8081\", 8080]\n  config: \"/admin\"\n"
            )
        );
        let (rest, filters) = split_documents(&text, "f.yaml").unwrap();
        assert!(rest.contains("CiliumNetworkPolicy") && !rest.contains("WasmFilter"));
        assert_eq!(filters.len(), 1);
        let f = &filters[0];
        assert_eq!(f.key(), "WasmFilter default/deny-admin");
        assert_eq!(f.ports, vec![8080, 8081]);
        assert_eq!(f.failure_policy, FailurePolicy::FailClosed);
        assert_eq!(f.failure_status, 503);
        assert_eq!(f.config, "/admin");
        assert_eq!(f.protocol, FilterProtocol::Http, "http by default");
        assert!(f.upstreams.is_empty());
        let labels =
            Labels::parse(["k8s:app=api", "k8s:io.kubernetes.pod.namespace=default"]).unwrap();
        assert!(f.selects(&labels));
        let other_ns =
            Labels::parse(["k8s:app=api", "k8s:io.kubernetes.pod.namespace=prod"]).unwrap();
        assert!(!f.selects(&other_ns), "namespace-scoped");
        // A file without filters is passed through untouched.
        let (same, none) = split_documents("kind: CiliumNetworkPolicy\n", "g").unwrap();
        assert_eq!(
            (same.as_str(), none.len()),
            ("kind: CiliumNetworkPolicy\n", 0)
        );
    }

    #[test]
    fn the_protocol_is_http_or_tcp() {
        let (m, sha) = module();
        for (value, want) in [
            ("tcp", FilterProtocol::Tcp),
            ("TCP", FilterProtocol::Tcp),
            ("http", FilterProtocol::Http),
        ] {
            let text = doc(&m, &sha, &format!("  protocol: {value}\n"));
            let (_, filters) = split_documents(&text, "f.yaml").unwrap();
            assert_eq!(filters[0].protocol, want, "{value}");
        }
        let text = doc(&m, &sha, "  protocol: udp\n");
        let err = split_documents(&text, "f.yaml").unwrap_err();
        assert!(
            err.contains(
                "(WasmFilter/default/deny-admin): spec.protocol: `udp` is not http or tcp"
            ),
            "{err}"
        );
        let text = doc(&m, &sha, "  protocol: [tcp]\n");
        let err = split_documents(&text, "f.yaml").unwrap_err();
        assert!(err.contains("spec.protocol: expected a string"), "{err}");
    }

    #[test]
    fn upstreams_are_parsed_and_sorted_by_name() {
        let (m, sha) = module();
        let text = doc(
            &m,
            &sha,
            "  upstreams:\n  - {name: ratelimit, address: '192.0.2.10:8081'}\n  - {name: auth, address: '10.0.0.5:9001'}\n",
        );
        let (_, filters) = split_documents(&text, "f.yaml").unwrap();
        assert_eq!(
            filters[0].upstreams,
            vec![
                CalloutUpstream {
                    name: "auth".into(),
                    address: "10.0.0.5:9001".parse().unwrap()
                },
                CalloutUpstream {
                    name: "ratelimit".into(),
                    address: "192.0.2.10:8081".parse().unwrap()
                },
            ]
        );
    }

    #[test]
    fn the_example_resource_with_upstreams_parses() {
        let (m, sha) = module();
        let text = include_str!("../../examples/policies/wasm-filter-callout.yaml")
            .replace(
                "/var/lib/membrane/filters/authz_callout.wasm",
                &m.display().to_string(),
            )
            .replace(&"0".repeat(64), &sha);
        let (_, filters) = split_documents(&text, "wasm-filter-callout.yaml").unwrap();
        assert_eq!(filters[0].key(), "WasmFilter default/api-authz");
        assert_eq!(
            filters[0].upstreams,
            vec![CalloutUpstream {
                name: "authz".into(),
                address: "198.51.100.10:9001".parse().unwrap()
            }]
        );
        assert!(filters[0].config.starts_with("upstream=authz\n"));
    }

    #[test]
    fn errors_name_the_field() {
        let (m, sha) = module();
        let cases = [
            (
                doc(&m, &sha, "  direction2: x\n"),
                "spec.direction2: unknown field",
            ),
            (doc(&m, &"0".repeat(64), ""), "spec.sha256:"),
            (doc(&m, "xyz", ""), "expected 64 hex digits"),
            (
                doc(Path::new("/nonexistent/m.wasm"), &sha, ""),
                "spec.module: cannot read",
            ),
            (
                doc(Path::new("rel.wasm"), &sha, ""),
                "must be an absolute path",
            ),
            (doc(&m, &sha, "  ports: [0]\n"), "spec.ports[0]"),
            (
                doc(&m, &sha, "  failurePolicy: Maybe\n"),
                "spec.failurePolicy",
            ),
            (doc(&m, &sha, "  failureStatus: 42\n"), "spec.failureStatus"),
            (
                doc(&m, &sha, "").replace(
                    "apiVersion: membrane.io/v1alpha1",
                    "apiVersion: cilium.io/v2",
                ),
                "apiVersion",
            ),
            (
                doc(&m, &sha, "").replace("direction: Ingress", "direction: Sideways"),
                "spec.direction",
            ),
            (
                doc(&m, &sha, "  upstreams: {auth: 1}\n"),
                "spec.upstreams: expected a list",
            ),
            (
                doc(
                    &m,
                    &sha,
                    "  upstreams:\n  - {name: auth, address: 10.0.0.5:9001}\n  - {name: auth, address: 10.0.0.6:9001}\n",
                ),
                "spec.upstreams[1].name: `auth` is also spec.upstreams[0].name",
            ),
            (
                doc(
                    &m,
                    &sha,
                    "  upstreams:\n  - {name: auth, address: auth.svc:9001}\n",
                ),
                "spec.upstreams[0].address: `auth.svc:9001` is not IP:PORT",
            ),
            (
                doc(
                    &m,
                    &sha,
                    "  upstreams:\n  - {name: auth, address: 10.0.0.5}\n",
                ),
                "spec.upstreams[0].address",
            ),
            (
                doc(&m, &sha, "  upstreams:\n  - {address: 10.0.0.5:1}\n"),
                "spec.upstreams[0].name: required",
            ),
            (
                doc(
                    &m,
                    &sha,
                    "  upstreams:\n  - {name: 'a b', address: 10.0.0.5:1}\n",
                ),
                "spec.upstreams[0].name: `a b` is not a valid upstream name",
            ),
            (
                doc(
                    &m,
                    &sha,
                    "  upstreams:\n  - {name: a, address: 10.0.0.5:1, port: 2}\n",
                ),
                "spec.upstreams[0].port: unknown field",
            ),
        ];
        for (text, want) in cases {
            let e = split_documents(&text, "f.yaml").unwrap_err();
            assert!(e.contains(want), "{e} (wanted {want})");
            assert!(e.starts_with("f.yaml: document 1"), "{e}");
        }
    }
}
