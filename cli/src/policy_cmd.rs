//! `membrane policy …`: offline tools over policy files, for users and CI.
//!
//! - `validate FILE...`: every problem of every document of every file, one line each
//!   (`FILE: KIND/NAMESPACE/NAME: field.path: message`), exit 1 if there is any.
//! - `resolve --endpoints ENDPOINTS.yaml FILE...`: what the datapath (policy-map entries) and
//!   the proxy (L7 rule sets) would get for each endpoint, as a table or one JSON document.
//! - `trace --policy FILE... --src-labels … --dst-labels … --dport PORT/PROTO`: why one
//!   connection is allowed or denied: the rules that select each side, the entries the
//!   datapath's two lookups hit, the one that decides, and the proxy's L7 decision.
//!
//! Owns reading files and presenting results only. Every decision comes from
//! `membrane-policy` (parsing and validation, [`LocalAllocator`] identities,
//! [`resolve_endpoint`], [`EndpointPolicy::lookup`], compiled HTTP rules, [`DnsMatcher`]),
//! so what these commands say is what the agent enforces. No network, no privileges, no
//! running agent needed. Must not depend on the datapath or the proxy.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, anyhow, bail};
use clap::{ArgGroup, Args, Subcommand, ValueEnum};
use membrane_policy::{
    Action, Direction, DnsMatcher, EndpointInfo, EndpointPolicy, HttpRequestView, HttpRule,
    Identity, IdentityAllocator, IdentitySet, IpPrefix, L7Parser, L7RuleSet, L7Rules, Label,
    LabelSource, Labels, LocalAllocator, ParseOptions, Policy, PolicyEntry, PolicyError, PolicyKey,
    PolicyRef, Protocol, RemoteIdentities, Repository, ResolveOptions, cidr_identity_labels,
    filter_security_relevant, fqdn_identity_labels, parse_documents_with, parse_value,
    resolve_endpoint,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Label key of an endpoint's namespace.
const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// Label key of an endpoint's cluster (what the `cluster` entity selects).
const CLUSTER_LABEL: &str = "io.cilium.k8s.policy.cluster";

/// `membrane policy` subcommands.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Check policy files; one line per problem, exit 1 if there is any.
    ///
    /// Reads YAML or JSON (CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy,
    /// NetworkPolicy, List) and checks every document. Prints one line per problem on stdout:
    /// `FILE: KIND/NAMESPACE/NAME: field.path: message` (the namespace is empty for
    /// cluster-scoped kinds); warnings and a summary go to stderr. Exit 0 when every file
    /// is valid, 1 otherwise.
    Validate {
        /// Policy files.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Show what the datapath and the proxy get for a set of endpoints.
    ///
    /// Per endpoint: enforcement per direction, the policy-map entries (remote identity,
    /// protocol, port, verdict, precedence, the rule behind it) and the L7 rule sets.
    /// Identities are allocated deterministically: reserved ones, then the endpoints in file
    /// order, then policy CIDRs, then one per toFQDNs selector.
    Resolve(ResolveArgs),
    /// Explain why one connection is allowed or denied.
    ///
    /// Evaluates the source's egress policy and the destination's ingress policy (both must
    /// allow), down to the entry that decides and the proxy's L7 decision. The last line is
    /// `Final verdict: ALLOWED` or `Final verdict: DENIED`; the exit code is 0 either way.
    Trace(Box<TraceArgs>),
}

/// Engine parameters shared by `resolve` and `trace`.
#[derive(Debug, Args)]
pub struct EngineArgs {
    /// Cluster name (the `cluster` entity selects endpoints of this cluster).
    #[arg(long, default_value = "default")]
    pub cluster_name: String,
    /// Port of the HTTP proxy (the port redirect entries carry).
    #[arg(long, default_value_t = 15001)]
    pub http_proxy_port: u16,
    /// Port of the DNS proxy.
    #[arg(long, default_value_t = 15053)]
    pub dns_proxy_port: u16,
}

impl EngineArgs {
    fn options(&self) -> ResolveOptions {
        let mut o = ResolveOptions::new(self.http_proxy_port, self.dns_proxy_port);
        o.cluster_name.clone_from(&self.cluster_name);
        o
    }
}

/// Output format of `resolve`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Human-readable tables.
    Table,
    /// One JSON document.
    Json,
}

/// Arguments of `membrane policy resolve`.
#[derive(Debug, Args)]
pub struct ResolveArgs {
    /// YAML file listing the endpoints (`endpoints: [{name, namespace, labels, ips, ports}]`,
    /// see examples/policies/endpoints.yaml).
    #[arg(long, value_name = "ENDPOINTS.yaml")]
    pub endpoints: PathBuf,
    /// Policy files.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// Direction to trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TraceDirection {
    /// Only the destination's ingress policy.
    Ingress,
    /// Only the source's egress policy.
    Egress,
}

/// Arguments of `membrane policy trace`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("dst").required(true).args(["dst_labels", "dst_fqdn", "dst_cidr"])))]
pub struct TraceArgs {
    /// Policy files.
    #[arg(long = "policy", required = true, num_args = 1.., value_name = "FILE")]
    pub policy: Vec<PathBuf>,
    /// Source labels, `k=v,...` (pod labels; `source:key=value` such as `reserved:world`
    /// or `reserved:host` for a non-pod peer).
    #[arg(long, value_name = "k=v,...")]
    pub src_labels: String,
    /// Namespace of a source pod.
    #[arg(long, default_value = "default", value_name = "NS")]
    pub src_namespace: String,
    /// Destination labels, `k=v,...` (as for --src-labels).
    #[arg(long, value_name = "k=v,...")]
    pub dst_labels: Option<String>,
    /// Destination is an IP of this DNS name, seen through the DNS proxy: it gets the
    /// `fqdn:` identity of the toFQDNs selectors that match the name (`world` if none).
    #[arg(long, value_name = "NAME")]
    pub dst_fqdn: Option<String>,
    /// Destination is this IP outside the cluster: it gets the identity of the most specific
    /// policy CIDR that contains it (`world` if none).
    #[arg(long, value_name = "IP")]
    pub dst_cidr: Option<IpAddr>,
    /// Namespace of a destination pod.
    #[arg(long, default_value = "default", value_name = "NS")]
    pub dst_namespace: String,
    /// Destination port and protocol: `8080/TCP`, `53/UDP`, `132/SCTP`, `8/ICMP` (ICMP type).
    #[arg(long, value_name = "PORT/PROTO", value_parser = parse_dport)]
    pub dport: (u8, u16),
    /// HTTP method, to evaluate HTTP rules when the connection is redirected to the proxy.
    #[arg(long, value_name = "M")]
    pub http_method: Option<String>,
    /// HTTP path (with query string), as the proxy sees `:path`.
    #[arg(long, value_name = "P")]
    pub http_path: Option<String>,
    /// HTTP host (`:authority`).
    #[arg(long, value_name = "H")]
    pub http_host: Option<String>,
    /// DNS query name, to evaluate DNS rules when the connection is redirected to the DNS proxy.
    #[arg(long, value_name = "NAME")]
    pub dns_name: Option<String>,
    /// TLS server name (the ClientHello's SNI), to evaluate `serverNames` when the connection
    /// is redirected to the proxy.
    #[arg(long, value_name = "NAME")]
    pub tls_sni: Option<String>,
    /// Trace only one side (default: the source's egress and the destination's ingress).
    #[arg(long, value_enum)]
    pub direction: Option<TraceDirection>,
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// Runs a `membrane policy` command. Errors are for inputs that cannot be read or used
/// (unreadable files, invalid policies for `resolve`/`trace`, bad flags); `validate`
/// reports invalid policies as output and exit code 1 instead.
pub fn run(cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCommand::Validate { files } => {
            let report = validate(&files);
            for line in &report.problems {
                println!("{line}");
            }
            for line in &report.warnings {
                eprintln!("{line}");
            }
            if report.problems.is_empty() {
                eprintln!(
                    "{} file(s) valid, {} policies",
                    files.len(),
                    report.policies
                );
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!(
                    "{} problem(s) in {} of {} file(s)",
                    report.problems.len(),
                    report.bad_files,
                    files.len()
                );
                Ok(ExitCode::FAILURE)
            }
        }
        PolicyCommand::Resolve(args) => {
            let out = resolve(&args)?;
            print!("{out}");
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Trace(args) => {
            let out = trace(&args)?;
            print!("{out}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

// ---------------------------------------------------------------------------------------
// validate

/// What `validate` found.
#[derive(Debug, Default)]
pub struct ValidateReport {
    /// One line per problem (`FILE: KIND/NAMESPACE/NAME: path: message`).
    pub problems: Vec<String>,
    /// Non-fatal findings (`FILE: KIND/NAMESPACE/NAME: warning: …`).
    pub warnings: Vec<String>,
    /// Valid policies found.
    pub policies: usize,
    /// Files with at least one problem.
    pub bad_files: usize,
}

/// Validates every document of every file separately, so that every broken document is
/// reported, and flags policies defined twice (same kind, namespace and name).
pub fn validate(files: &[PathBuf]) -> ValidateReport {
    let opts = ParseOptions::default();
    let mut report = ValidateReport::default();
    let mut seen: BTreeMap<PolicyRef, String> = BTreeMap::new();
    for file in files {
        let name = file.display().to_string();
        let before = report.problems.len();
        match std::fs::read_to_string(file) {
            Err(e) => report.problems.push(format!("{name}: cannot read: {e}")),
            Ok(text) => validate_text(&text, &name, &opts, &mut seen, &mut report),
        }
        if report.problems.len() > before {
            report.bad_files += 1;
        }
    }
    report
}

fn validate_text(
    text: &str,
    name: &str,
    opts: &ParseOptions,
    seen: &mut BTreeMap<PolicyRef, String>,
    report: &mut ValidateReport,
) {
    let (docs, syntax) = split_documents(text);
    for (index, doc) in docs.iter().enumerate() {
        if doc.get("kind").and_then(Value::as_str) == Some(membrane_agent_api::wasm_resource::KIND)
        {
            // A WasmFilter (membrane's own resource): its checks, module and sha256 included.
            let checked = serde_yaml_ng::to_value(doc)
                .map_err(|e| e.to_string())
                .and_then(|v| {
                    membrane_agent_api::wasm_resource::parse(
                        &v,
                        &format!("{name}: document {}", index + 1),
                    )
                });
            if let Err(e) = checked {
                report.problems.push(one_line(&e));
            }
            continue;
        }
        match parse_value(doc, index, name, opts) {
            Ok(policies) => {
                for p in policies {
                    accept(p, name, index, seen, report);
                }
            }
            Err(e) => {
                // A List stops at its first broken item: parse the items one by one to
                // report each broken one (items keep the document's index).
                let mut item_problems = 0;
                if let Some(items) = list_items(doc) {
                    for (i, item) in items.iter().enumerate() {
                        match parse_value(item, index, name, opts) {
                            Ok(policies) => {
                                for p in policies {
                                    accept(p, name, index, seen, report);
                                }
                            }
                            Err(e) => {
                                item_problems += 1;
                                report.problems.push(problem_line(
                                    name,
                                    &resource_of(item, opts),
                                    &e,
                                    &format!("items[{i}]"),
                                ));
                            }
                        }
                    }
                }
                if item_problems == 0 {
                    report
                        .problems
                        .push(problem_line(name, &resource_of(doc, opts), &e, ""));
                }
            }
        }
    }
    if let Some(s) = syntax {
        report.problems.push(one_line(&format!("{name}: {s}")));
    } else if docs.is_empty() {
        report
            .warnings
            .push(format!("{name}: warning: no policy documents in the file"));
    }
}

/// Records a valid policy: its warnings, and a problem if the same policy was seen before.
fn accept(
    p: Policy,
    file: &str,
    document: usize,
    seen: &mut BTreeMap<PolicyRef, String>,
    report: &mut ValidateReport,
) {
    let resource = resource_name(&p);
    for w in &p.warnings {
        report
            .warnings
            .push(one_line(&format!("{file}: {resource}: warning: {w}")));
    }
    let here = format!("{file} document {document}");
    match seen.get(&p.policy_ref()) {
        Some(first) => report.problems.push(format!(
            "{file}: {resource}: metadata.name: defined twice (first in {first}); the second would replace the first"
        )),
        None => {
            seen.insert(p.policy_ref(), here);
            report.policies += 1;
        }
    }
}

/// `KIND/NAMESPACE/NAME` of a parsed policy (empty namespace for cluster-scoped kinds).
fn resource_name(p: &Policy) -> String {
    format!(
        "{}/{}/{}",
        p.kind,
        p.namespace.as_deref().unwrap_or(""),
        p.name
    )
}

/// `KIND/NAMESPACE/NAME` read from a raw document (which may be broken): `?` for what is
/// missing, the default namespace for namespaced kinds without one.
fn resource_of(doc: &Value, opts: &ParseOptions) -> String {
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("?");
    let meta = doc.get("metadata");
    let field = |k: &str| {
        meta.and_then(|m| m.get(k))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let name = field("name").unwrap_or("?");
    let namespace = match (field("namespace"), kind) {
        (Some(ns), _) => ns,
        (None, "CiliumNetworkPolicy" | "NetworkPolicy") => opts.default_namespace.as_str(),
        (None, _) => "",
    };
    format!("{kind}/{namespace}/{name}")
}

/// One problem line; `prefix` is prepended to the field path (`items[3]`).
fn problem_line(file: &str, resource: &str, e: &PolicyError, prefix: &str) -> String {
    one_line(&match e {
        PolicyError::Invalid { path, message, .. } => {
            let path = match (prefix.is_empty(), path.as_str()) {
                (true, p) => p.to_owned(),
                (false, "<root>") => prefix.to_owned(),
                (false, p) => format!("{prefix}.{p}"),
            };
            format!("{file}: {resource}: {path}: {message}")
        }
        PolicyError::Syntax { message, .. } => format!("{file}: {resource}: {message}"),
    })
}

/// Keeps a report line on one line whatever a message contains.
fn one_line(s: &str) -> String {
    if s.contains(['\n', '\r']) {
        s.split(['\n', '\r'])
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    } else {
        s.to_owned()
    }
}

/// The items of a `kind: List` (or `…List`) document.
fn list_items(doc: &Value) -> Option<&Vec<Value>> {
    let kind = doc.get("kind")?.as_str()?;
    if !kind.ends_with("List") {
        return None;
    }
    doc.get("items")?.as_array()
}

/// Splits text into documents the way the engine does (JSON when it starts with `{`/`[`,
/// else a YAML stream; top-level lists are lists of documents; empty documents skipped),
/// keeping the documents before a syntax error. The error names the line.
fn split_documents(text: &str) -> (Vec<Value>, Option<String>) {
    let mut docs = Vec::new();
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        for v in serde_json::Deserializer::from_str(text).into_iter::<Value>() {
            match v {
                Ok(Value::Array(items)) => docs.extend(items),
                Ok(other) => docs.push(other),
                Err(e) => {
                    let msg = format!("line {} column {}: invalid JSON: {e}", e.line(), e.column());
                    return (docs, Some(msg));
                }
            }
        }
        return (docs, None);
    }
    // The stream iterator keeps yielding the same error after a syntax error: stop there.
    for de in serde_yaml_ng::Deserializer::from_str(text) {
        match Value::deserialize(de) {
            Ok(Value::Null) => {}
            Ok(Value::Array(items)) => docs.extend(items),
            Ok(other) => docs.push(other),
            Err(e) => {
                let at = e
                    .location()
                    .map(|l| format!("line {} column {}: ", l.line(), l.column()))
                    .unwrap_or_default();
                return (docs, Some(format!("{at}invalid YAML: {e}")));
            }
        }
    }
    (docs, None)
}

// ---------------------------------------------------------------------------------------
// shared: loading policies, labels, names

/// Reads and parses policy files into a repository. A policy defined twice is an error
/// (`validate` lists every problem at once).
fn load_repository(files: &[PathBuf]) -> anyhow::Result<(Repository, Vec<String>)> {
    let mut repo = Repository::new();
    let mut warnings = Vec::new();
    let mut origin: BTreeMap<PolicyRef, String> = BTreeMap::new();
    for file in files {
        let name = file.display().to_string();
        let text = std::fs::read_to_string(file).with_context(|| format!("{name}: cannot read"))?;
        // WasmFilter resources do not take part in policy resolution.
        let (text, _filters) = membrane_agent_api::wasm_resource::split_documents(&text, &name)
            .map_err(|e| anyhow!("{e} (run `membrane policy validate` to list every problem)"))?;
        let policies = parse_documents_with(&text, &name, &ParseOptions::default())
            .map_err(|e| anyhow!("{e} (run `membrane policy validate` to list every problem)"))?;
        for p in policies {
            for w in &p.warnings {
                warnings.push(format!("{name}: {}: {w}", resource_name(&p)));
            }
            let key = p.policy_ref();
            if let Some(first) = origin.get(&key) {
                bail!("{name}: {key} is also defined in {first}");
            }
            origin.insert(key, name.clone());
            repo.add(p).map_err(|e| anyhow!("{name}: {e}"))?;
        }
    }
    Ok((repo, warnings))
}

/// Labels of a pod as the agent derives them: pod labels (`k8s:` unless a source is
/// given), the namespace and cluster labels, filtered to the security-relevant ones.
fn pod_labels(labels: impl IntoIterator<Item = Label>, namespace: &str, cluster: &str) -> Labels {
    let mut out: Labels = labels.into_iter().collect();
    out.insert(Label::k8s(NAMESPACE_LABEL, namespace));
    out.insert(Label::k8s(CLUSTER_LABEL, cluster));
    filter_security_relevant(&out)
}

/// Parses `k=v,source:k=v,...`; a label without a source is a `k8s:` label.
fn parse_label_list(text: &str, flag: &str) -> anyhow::Result<Vec<Label>> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| {
            let mut l = Label::parse(item).map_err(|e| anyhow!("{flag}: {e}"))?;
            if l.source == LabelSource::Unspec {
                l.source = LabelSource::K8s;
            }
            Ok(l)
        })
        .collect()
}

/// Parses `PORT/PROTO` (`8080/TCP`, `53/udp`, `8/ICMP`); without `/PROTO`, TCP.
fn parse_dport(text: &str) -> Result<(u8, u16), String> {
    let (port, proto) = text.split_once('/').unwrap_or((text, "TCP"));
    let protocol = match proto.to_ascii_uppercase().as_str() {
        "TCP" => 6,
        "UDP" => 17,
        "SCTP" => 132,
        "ICMP" => 1,
        "ICMPV6" => 58,
        other => {
            return Err(format!(
                "unknown protocol {other:?} in {text:?} (expected TCP, UDP, SCTP, ICMP or ICMPv6)"
            ));
        }
    };
    let port: u16 = port.trim().parse().map_err(|_| {
        format!("invalid port {port:?} in {text:?} (expected PORT/PROTO such as 8080/TCP)")
    })?;
    if matches!(protocol, 1 | 58) && port > 255 {
        return Err(format!(
            "ICMP type {port} in {text:?} is out of range 0-255"
        ));
    }
    Ok((protocol, port))
}

fn proto_name(p: u8) -> String {
    match p {
        0 => "ANY".to_owned(),
        1 => "ICMP".to_owned(),
        6 => "TCP".to_owned(),
        17 => "UDP".to_owned(),
        58 => "ICMPv6".to_owned(),
        132 => "SCTP".to_owned(),
        n => format!("proto-{n}"),
    }
}

/// The port part of a key: `ANY`, `8080`, `type 8` (ICMP), or `8000-8063 (8000/10)`.
fn port_text(k: &PolicyKey) -> String {
    if k.protocol == 0 || k.port_prefix_len == 0 {
        return "ANY".to_owned();
    }
    let p = k.port_prefix();
    if k.port_prefix_len == 16 {
        if matches!(k.protocol, 1 | 58) {
            format!("type {}", k.port)
        } else {
            k.port.to_string()
        }
    } else {
        format!(
            "{}-{} ({}/{})",
            p.first(),
            p.last(),
            p.first(),
            k.port_prefix_len
        )
    }
}

fn verdict_text(e: &PolicyEntry) -> String {
    match e.action {
        Action::Allow => "allow".to_owned(),
        Action::Deny => "deny".to_owned(),
        Action::Redirect => format!("redirect:{}", e.proxy_port),
    }
}

/// The rule that produced an entry (cookie → origin), or why there is none.
fn rule_of(p: &EndpointPolicy, k: &PolicyKey, e: &PolicyEntry) -> String {
    if let Some(o) = p.cookies.get(&e.cookie) {
        return o.clone();
    }
    if e.cookie == 0 && k.identity == Identity::ANY {
        format!("(no rule: {} not enforced)", k.direction)
    } else if e.cookie == 0 {
        "(allow-localhost: the node reaches its pods)".to_owned()
    } else {
        format!("(cookie {:#010x})", e.cookie)
    }
}

fn describe_http(r: &HttpRule) -> String {
    let mut parts = Vec::new();
    if let Some(m) = &r.method {
        parts.push(format!("method={m}"));
    }
    if let Some(p) = &r.path {
        parts.push(format!("path={p}"));
    }
    if let Some(h) = &r.host {
        parts.push(format!("host={h}"));
    }
    for h in &r.headers {
        match &h.value {
            Some(v) => parts.push(format!("header {}={v}", h.name)),
            None => parts.push(format!("header {}", h.name)),
        }
    }
    for m in &r.header_matches {
        parts.push(format!(
            "headerMatch {}={} ({:?})",
            m.name,
            m.value.as_deref().unwrap_or(""),
            m.mismatch
        ));
    }
    if parts.is_empty() {
        "any request".to_owned()
    } else {
        parts.join(" ")
    }
}

fn describe_l7(rules: &L7Rules) -> String {
    match rules {
        L7Rules::Http(r) if r.is_empty() => "any request (L7 wildcard)".to_owned(),
        L7Rules::Http(r) => r.iter().map(describe_http).collect::<Vec<_>>().join(" | "),
        L7Rules::Dns(s) if s.is_empty() => "any name (L7 wildcard)".to_owned(),
        L7Rules::Dns(s) => s
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        L7Rules::Tls(s) if s.is_empty() => "any connection (L7 wildcard)".to_owned(),
        L7Rules::Tls(s) => format!(
            "server name {}",
            s.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn parser_name(p: L7Parser) -> &'static str {
    match p {
        L7Parser::Http => "HTTP",
        L7Parser::Dns => "DNS",
        L7Parser::Tls => "TLS",
    }
}

/// Pads columns to equal width (last column unpadded).
fn table(rows: &[Vec<String>], indent: &str) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0; cols];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let mut line = indent.to_owned();
        for (i, c) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                let _ = write!(line, "{c:<w$}  ", w = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

// ---------------------------------------------------------------------------------------
// resolve

/// The endpoints file of `resolve`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointsFile {
    endpoints: Vec<EndpointSpec>,
}

/// One endpoint (pod) of the endpoints file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointSpec {
    /// Pod name.
    name: String,
    /// Namespace (default `default`).
    #[serde(default = "default_namespace")]
    namespace: String,
    /// Pod labels (`key: value`; a `source:` prefix on the key is kept, else `k8s:`).
    #[serde(default)]
    labels: BTreeMap<String, String>,
    /// Pod IPs (shown; resolution is by identity).
    #[serde(default)]
    ips: Vec<IpAddr>,
    /// Named container ports (for policies that use named ports).
    #[serde(default)]
    ports: Vec<NamedPort>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NamedPort {
    name: String,
    port: u16,
    #[serde(default)]
    protocol: PortProtocolName,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
enum PortProtocolName {
    #[default]
    #[serde(rename = "TCP", alias = "tcp")]
    Tcp,
    #[serde(rename = "UDP", alias = "udp")]
    Udp,
    #[serde(rename = "SCTP", alias = "sctp")]
    Sctp,
}

impl PortProtocolName {
    fn protocol(self) -> Protocol {
        match self {
            PortProtocolName::Tcp => Protocol::Tcp,
            PortProtocolName::Udp => Protocol::Udp,
            PortProtocolName::Sctp => Protocol::Sctp,
        }
    }
}

fn default_namespace() -> String {
    "default".to_owned()
}

/// What kind of identity a row of the identity table is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum IdentityKind {
    Reserved,
    Endpoint,
    Cidr,
    Fqdn,
}

#[derive(Debug, Serialize)]
struct IdentityRow {
    id: u32,
    kind: IdentityKind,
    labels: Labels,
    /// `namespace/name` of the endpoints with this identity.
    endpoints: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Enforcement {
    ingress: bool,
    egress: bool,
}

#[derive(Debug, Serialize)]
struct EntryRow {
    direction: Direction,
    remote_identity: u32,
    /// Short name of the remote identity (endpoints, reserved name, CIDR, FQDN selectors).
    remote: String,
    remote_labels: Labels,
    protocol: String,
    /// `ANY`, a port, `type N` (ICMP) or a range with its prefix.
    port: String,
    port_first: u16,
    port_last: u16,
    port_prefix_len: u8,
    /// `allow`, `deny` or `redirect:PORT`.
    verdict: String,
    proxy_port: u16,
    precedence: u32,
    cookie: u32,
    /// The rule the cookie names.
    rule: String,
}

#[derive(Debug, Serialize)]
struct EndpointReport<'a> {
    name: &'a str,
    namespace: &'a str,
    endpoint_id: u64,
    identity: u32,
    ips: &'a [IpAddr],
    labels: &'a Labels,
    enforcement: Enforcement,
    entries: Vec<EntryRow>,
    l7: &'a [L7RuleSet],
    warnings: &'a [String],
}

#[derive(Debug, Serialize)]
struct ResolveReport<'a> {
    identities: Vec<IdentityRow>,
    endpoints: Vec<EndpointReport<'a>>,
    /// Policy warnings (namespace matches removed, …).
    warnings: &'a [String],
}

/// Identity → short display name.
struct IdentityNames {
    names: BTreeMap<Identity, String>,
}

impl IdentityNames {
    fn get(&self, id: Identity, ids: &IdentitySet) -> String {
        if id == Identity::ANY {
            return "any".to_owned();
        }
        if let Some(n) = self.names.get(&id) {
            return n.clone();
        }
        match id.reserved_name() {
            Some(n) => format!("reserved:{n}"),
            None => ids.get(id).map(ToString::to_string).unwrap_or_default(),
        }
    }
}

fn read_endpoints(path: &Path) -> anyhow::Result<Vec<EndpointSpec>> {
    let name = path.display();
    let text = std::fs::read_to_string(path).with_context(|| format!("{name}: cannot read"))?;
    let file: EndpointsFile = serde_yaml_ng::from_str(&text)
        .map_err(|e| anyhow!("{name}: invalid endpoints file: {e}"))?;
    let mut seen = BTreeSet::new();
    for (i, ep) in file.endpoints.iter().enumerate() {
        if ep.name.is_empty() {
            bail!("{name}: endpoints[{i}].name: must not be empty");
        }
        if !seen.insert((ep.namespace.as_str(), ep.name.as_str())) {
            bail!(
                "{name}: endpoints[{i}]: endpoint {}/{} is listed twice",
                ep.namespace,
                ep.name
            );
        }
    }
    Ok(file.endpoints)
}

/// Labels of an endpoint from the endpoints file.
fn endpoint_labels(
    ep: &EndpointSpec,
    index: usize,
    file: &Path,
    cluster: &str,
) -> anyhow::Result<Labels> {
    let mut labels = Vec::new();
    for (k, v) in &ep.labels {
        let l = if k.contains(':') {
            Label::parse(&format!("{k}={v}"))
                .map_err(|e| anyhow!("{}: endpoints[{index}].labels.{k}: {e}", file.display()))?
        } else {
            Label::k8s(k, v)
        };
        labels.push(l);
    }
    Ok(pod_labels(labels, &ep.namespace, cluster))
}

fn resolve(args: &ResolveArgs) -> anyhow::Result<String> {
    let (repo, warnings) = load_repository(&args.files)?;
    let specs = read_endpoints(&args.endpoints)?;
    let mut opts = args.engine.options();

    // Identities: reserved, then endpoints in file order, then policy CIDRs, then one per
    // toFQDNs selector (the agent allocates fqdn identities per DNS answer; one per
    // selector shows what each selector allows). LocalAllocator is deterministic.
    let mut ids = IdentitySet::with_reserved();
    let mut alloc = LocalAllocator::new();
    let mut kinds: BTreeMap<Identity, IdentityKind> = BTreeMap::new();
    let mut names: BTreeMap<Identity, String> = BTreeMap::new();
    let mut endpoints = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let labels = endpoint_labels(spec, i, &args.endpoints, &opts.cluster_name)?;
        let id = alloc
            .allocate(&labels)
            .with_context(|| format!("endpoint {}/{}", spec.namespace, spec.name))?;
        ids.insert(id, labels.clone());
        kinds.insert(id, IdentityKind::Endpoint);
        let name = format!("{}/{}", spec.namespace, spec.name);
        names
            .entry(id)
            .and_modify(|n| {
                n.push(',');
                n.push_str(&name);
            })
            .or_insert(name);
        let mut info = EndpointInfo::new(i as u64 + 1, labels);
        for p in &spec.ports {
            info = info.with_named_port(&p.name, p.protocol.protocol(), p.port);
            opts.egress_named_ports
                .entry(p.name.to_ascii_lowercase())
                .or_default()
                .insert((p.protocol.protocol(), p.port));
        }
        endpoints.push((spec, id, info));
    }
    let cidrs = ids
        .ensure_cidr_identities(repo.cidr_prefixes(), &mut alloc)
        .context("allocating CIDR identities")?;
    for (prefix, id) in &cidrs {
        kinds.insert(*id, IdentityKind::Cidr);
        names.insert(*id, format!("cidr:{prefix}"));
    }
    for sel in repo.fqdn_selectors() {
        let labels = fqdn_identity_labels([&sel]);
        let id = alloc
            .allocate(&labels)
            .with_context(|| format!("allocating the identity of toFQDNs {sel}"))?;
        ids.insert(id, labels);
        kinds.insert(id, IdentityKind::Fqdn);
        names.insert(id, format!("fqdn:{}", sel.text()));
    }
    let names = IdentityNames { names };

    let resolved: Vec<(&EndpointSpec, Identity, &Labels, EndpointPolicy)> = endpoints
        .iter()
        .map(|(spec, id, info)| {
            let p = resolve_endpoint(&repo, info, &ids, &opts);
            (*spec, *id, &info.labels, p)
        })
        .collect();

    let identity_rows: Vec<IdentityRow> = ids
        .iter()
        .map(|(id, labels)| IdentityRow {
            id: id.get(),
            kind: kinds.get(&id).copied().unwrap_or(IdentityKind::Reserved),
            labels: labels.clone(),
            endpoints: endpoints
                .iter()
                .filter(|(_, eid, _)| *eid == id)
                .map(|(s, _, _)| format!("{}/{}", s.namespace, s.name))
                .collect(),
        })
        .collect();
    let endpoint_reports: Vec<EndpointReport<'_>> = resolved
        .iter()
        .map(|(spec, id, labels, p)| {
            let mut entries: Vec<(&PolicyKey, &PolicyEntry)> = p.entries.iter().collect();
            // Group by direction (ingress first), then identity and port.
            entries.sort_by_key(|(k, _)| {
                (
                    k.direction,
                    k.identity,
                    k.protocol,
                    k.port,
                    k.port_prefix_len,
                )
            });
            EndpointReport {
                name: &spec.name,
                namespace: &spec.namespace,
                endpoint_id: p.endpoint_id,
                identity: id.get(),
                ips: &spec.ips,
                labels,
                enforcement: Enforcement {
                    ingress: p.enforce_ingress,
                    egress: p.enforce_egress,
                },
                entries: entries
                    .into_iter()
                    .map(|(k, e)| {
                        let pp = k.port_prefix();
                        EntryRow {
                            direction: k.direction,
                            remote_identity: k.identity.get(),
                            remote: names.get(k.identity, &ids),
                            remote_labels: ids.get(k.identity).cloned().unwrap_or_default(),
                            protocol: proto_name(k.protocol),
                            port: port_text(k),
                            port_first: if k.protocol == 0 { 0 } else { pp.first() },
                            port_last: if k.protocol == 0 { u16::MAX } else { pp.last() },
                            port_prefix_len: k.port_prefix_len,
                            verdict: verdict_text(e),
                            proxy_port: e.proxy_port,
                            precedence: e.precedence,
                            cookie: e.cookie,
                            rule: rule_of(p, k, e),
                        }
                    })
                    .collect(),
                l7: &p.l7,
                warnings: &p.warnings,
            }
        })
        .collect();
    let report = ResolveReport {
        identities: identity_rows,
        endpoints: endpoint_reports,
        warnings: &warnings,
    };
    match args.output {
        OutputFormat::Json => {
            let mut s = serde_json::to_string_pretty(&report).context("encoding JSON")?;
            s.push('\n');
            Ok(s)
        }
        OutputFormat::Table => Ok(render_resolve_table(&report, &names, &ids)),
    }
}

fn render_resolve_table(r: &ResolveReport<'_>, names: &IdentityNames, ids: &IdentitySet) -> String {
    let mut out = String::new();
    for w in r.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    out.push_str("Identities:\n");
    let mut rows = vec![vec![
        "ID".to_owned(),
        "KIND".to_owned(),
        "ENDPOINTS".to_owned(),
        "LABELS".to_owned(),
    ]];
    for i in &r.identities {
        let kind = match i.kind {
            IdentityKind::Reserved => "reserved",
            IdentityKind::Endpoint => "endpoint",
            IdentityKind::Cidr => "cidr",
            IdentityKind::Fqdn => "fqdn",
        };
        rows.push(vec![
            i.id.to_string(),
            kind.to_owned(),
            if i.endpoints.is_empty() {
                "-".to_owned()
            } else {
                i.endpoints.join(",")
            },
            i.labels.to_string(),
        ]);
    }
    out.push_str(&table(&rows, "  "));
    if r.identities.iter().any(|i| i.kind == IdentityKind::Fqdn) {
        out.push_str(
            "  (fqdn identities: one per toFQDNs selector here; the agent allocates them per DNS answer)\n",
        );
    }
    for ep in &r.endpoints {
        let ips: Vec<String> = ep.ips.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "\nEndpoint {}/{} (endpoint {}, identity {}{}{})",
            ep.namespace,
            ep.name,
            ep.endpoint_id,
            ep.identity,
            if ips.is_empty() { "" } else { ", " },
            ips.join(", ")
        );
        let mode = |on: bool| {
            if on {
                "default deny"
            } else {
                "not enforced (allow all)"
            }
        };
        let _ = writeln!(
            out,
            "  enforcement: ingress {}, egress {}",
            mode(ep.enforcement.ingress),
            mode(ep.enforcement.egress)
        );
        let _ = writeln!(out, "  policy-map entries ({}):", ep.entries.len());
        let mut rows = vec![vec![
            "DIRECTION".to_owned(),
            "REMOTE".to_owned(),
            "PROTO".to_owned(),
            "PORT".to_owned(),
            "VERDICT".to_owned(),
            "PRECEDENCE".to_owned(),
            "RULE".to_owned(),
        ]];
        for e in &ep.entries {
            rows.push(vec![
                e.direction.to_string(),
                format!("{} {}", e.remote_identity, e.remote),
                e.protocol.clone(),
                e.port.clone(),
                e.verdict.clone(),
                e.precedence.to_string(),
                if e.cookie == 0 {
                    e.rule.clone()
                } else {
                    format!("{:#010x} {}", e.cookie, e.rule)
                },
            ]);
        }
        out.push_str(&table(&rows, "    "));
        if ep.l7.is_empty() {
            out.push_str("  L7 rule sets: none\n");
        } else {
            let _ = writeln!(out, "  L7 rule sets ({}):", ep.l7.len());
        }
        for set in ep.l7 {
            out.push_str(&describe_rule_set(set, names, ids, "    "));
        }
        for w in ep.warnings {
            let _ = writeln!(out, "  warning: {w}");
        }
    }
    out
}

fn describe_rule_set(
    set: &L7RuleSet,
    names: &IdentityNames,
    ids: &IdentitySet,
    indent: &str,
) -> String {
    let mut out = String::new();
    let ports = if set.port == set.end_port {
        set.port.to_string()
    } else {
        format!("{}-{}", set.port, set.end_port)
    };
    let _ = writeln!(
        out,
        "{indent}{} {}/{ports} -> {} proxy port {}",
        set.direction,
        proto_name(set.protocol),
        parser_name(set.parser),
        set.proxy_port
    );
    let peer_word = match set.direction {
        Direction::Ingress => "from",
        Direction::Egress => "to",
    };
    for r in &set.rules {
        let peers = match &r.remote {
            RemoteIdentities::Any => "any peer".to_owned(),
            RemoteIdentities::Set(s) if s.is_empty() => "(no identity yet)".to_owned(),
            RemoteIdentities::Set(s) => s
                .iter()
                .map(|id| format!("{id} {}", names.get(*id, ids)))
                .collect::<Vec<_>>()
                .join(", "),
        };
        let _ = writeln!(
            out,
            "{indent}  {peer_word} {peers}: {}",
            describe_l7(&r.rules)
        );
    }
    out
}

// ---------------------------------------------------------------------------------------
// trace

/// One side of a traced connection.
struct Peer {
    labels: Labels,
    identity: Identity,
    /// Has its own policy here: a pod, or the host endpoint.
    local_endpoint: bool,
    /// Why the peer has this identity (DNS name / CIDR notes).
    note: Option<String>,
}

/// The identity labels a `--*-labels` value stands for, and whether it is a local endpoint.
fn peer_labels(list: Vec<Label>, namespace: &str, cluster: &str) -> (Labels, bool) {
    let non_pod = list.iter().any(|l| {
        matches!(
            l.source,
            LabelSource::Reserved | LabelSource::Cidr | LabelSource::Fqdn | LabelSource::CidrGroup
        )
    });
    if non_pod {
        let labels: Labels = list.into_iter().collect();
        let host = labels.get(LabelSource::Reserved, "host").is_some();
        (labels, host)
    } else {
        (pod_labels(list, namespace, cluster), true)
    }
}

/// The request the proxy would see, if the user gave one.
struct L7Request<'a> {
    http: Option<HttpRequestView<'a>>,
    dns: Option<&'a str>,
    tls: Option<&'a str>,
}

fn trace(args: &TraceArgs) -> anyhow::Result<String> {
    let (repo, warnings) = load_repository(&args.policy)?;
    let opts = args.engine.options();
    let cluster = opts.cluster_name.as_str();
    let mut ids = IdentitySet::with_reserved();
    let mut alloc = LocalAllocator::new();
    let mut allocate = |labels: &Labels| -> anyhow::Result<Identity> {
        let id = alloc
            .allocate(labels)
            .with_context(|| format!("allocating an identity for {labels}"))?;
        ids.insert(id, labels.clone());
        Ok(id)
    };

    let (src_labels, src_local) = peer_labels(
        parse_label_list(&args.src_labels, "--src-labels")?,
        &args.src_namespace,
        cluster,
    );
    let src = Peer {
        identity: allocate(&src_labels)?,
        labels: src_labels,
        local_endpoint: src_local,
        note: None,
    };
    let (dst_labels, dst_local, note) = if let Some(l) = &args.dst_labels {
        let (labels, local) = peer_labels(
            parse_label_list(l, "--dst-labels")?,
            &args.dst_namespace,
            cluster,
        );
        (labels, local, None)
    } else if let Some(name) = &args.dst_fqdn {
        let mut matching = Vec::new();
        for sel in repo.fqdn_selectors() {
            let m = sel
                .compile()
                .map_err(|e| anyhow!("toFQDNs {sel}: cannot compile: {e}"))?;
            if m.matches(name) {
                matching.push(sel);
            }
        }
        if matching.is_empty() {
            let labels: Labels = [Label::reserved("world")].into_iter().collect();
            let note = format!(
                "no toFQDNs selector matches {name}: its IPs get no fqdn identity and stay world"
            );
            (labels, false, Some(note))
        } else {
            let sels: Vec<String> = matching.iter().map(ToString::to_string).collect();
            let note = format!("IPs of {name} (selected by {})", sels.join(", "));
            (fqdn_identity_labels(&matching), false, Some(note))
        }
    } else if let Some(ip) = args.dst_cidr {
        let prefix = repo
            .cidr_prefixes()
            .into_iter()
            .filter(|p| p.contains_addr(ip))
            .max_by_key(IpPrefix::prefix_len);
        match prefix {
            Some(p) => (
                cidr_identity_labels(p),
                false,
                Some(format!("{ip} is in policy CIDR {p}")),
            ),
            None => (
                [Label::reserved("world")].into_iter().collect(),
                false,
                Some(format!("{ip} is in no policy CIDR: world")),
            ),
        }
    } else {
        bail!("one of --dst-labels, --dst-fqdn or --dst-cidr is required");
    };
    let dst = Peer {
        identity: allocate(&dst_labels)?,
        labels: dst_labels,
        local_endpoint: dst_local,
        note,
    };

    let (protocol, port) = args.dport;
    let http = (args.http_method.is_some() || args.http_path.is_some() || args.http_host.is_some())
        .then(|| HttpRequestView {
            method: args.http_method.as_deref().unwrap_or("GET"),
            path: args.http_path.as_deref().unwrap_or("/"),
            host: args.http_host.as_deref().unwrap_or(""),
            headers: &[],
        });
    let request = L7Request {
        http,
        dns: args.dns_name.as_deref(),
        tls: args.tls_sni.as_deref(),
    };

    let mut out = String::new();
    for w in &warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    let _ = writeln!(
        out,
        "Tracing {}/{} from identity {} to identity {}",
        port_of(protocol, port),
        proto_name(protocol),
        src.identity,
        dst.identity
    );
    let _ = writeln!(out, "  source:      {} ({})", src.identity, src.labels);
    let _ = writeln!(out, "  destination: {} ({})", dst.identity, dst.labels);
    if let Some(n) = &dst.note {
        let _ = writeln!(out, "               {n}");
    }
    if let Some(h) = &request.http {
        let _ = writeln!(
            out,
            "  HTTP request: {} {}{}",
            h.method,
            h.path,
            if h.host.is_empty() {
                String::new()
            } else {
                format!(" (host {})", h.host)
            }
        );
    }
    if let Some(n) = request.dns {
        let _ = writeln!(out, "  DNS query: {n}");
    }

    // Which sides to evaluate: a side exists only where that peer is a local endpoint
    // (world, CIDR and FQDN peers have no policy of their own here).
    let wanted = |d: TraceDirection| args.direction.is_none_or(|w| w == d);
    let mut sides = Vec::new();
    for (dir, want, peer, who) in [
        (Direction::Egress, TraceDirection::Egress, &src, "source"),
        (
            Direction::Ingress,
            TraceDirection::Ingress,
            &dst,
            "destination",
        ),
    ] {
        if !wanted(want) {
            continue;
        }
        if peer.local_endpoint {
            sides.push(dir);
        } else if args.direction.is_some() {
            bail!(
                "--direction {dir}: the {who} ({}) is not a local endpoint and has no {dir} policy here",
                peer.labels
            );
        } else {
            sides.push(dir);
        }
    }
    if !src.local_endpoint && !dst.local_endpoint {
        bail!("neither the source nor the destination is a local endpoint: nothing to trace");
    }

    let mut allowed = true;
    for dir in sides {
        let (subject, remote) = match dir {
            Direction::Egress => (&src, &dst),
            Direction::Ingress => (&dst, &src),
        };
        if !subject.local_endpoint {
            let (title, who) = match dir {
                Direction::Egress => ("Egress", "source"),
                Direction::Ingress => ("Ingress", "destination"),
            };
            let _ = writeln!(
                out,
                "\n{title}: skipped: the {who} is not a local endpoint (no {dir} policy applies)"
            );
            continue;
        }
        allowed &= trace_side(
            &mut out, &repo, &ids, &opts, dir, subject, remote, protocol, port, &request,
        )?;
    }
    let _ = writeln!(
        out,
        "\nFinal verdict: {}",
        if allowed { "ALLOWED" } else { "DENIED" }
    );
    Ok(out)
}

fn port_of(protocol: u8, port: u16) -> String {
    if matches!(protocol, 1 | 58) {
        format!("type {port}")
    } else {
        port.to_string()
    }
}

/// Traces one side; returns true if it allows the connection.
#[expect(
    clippy::too_many_arguments,
    reason = "one call site; a struct would only rename the parameters"
)]
fn trace_side(
    out: &mut String,
    repo: &Repository,
    ids: &IdentitySet,
    opts: &ResolveOptions,
    dir: Direction,
    subject: &Peer,
    remote: &Peer,
    protocol: u8,
    port: u16,
    request: &L7Request<'_>,
) -> anyhow::Result<bool> {
    let (title, who) = match dir {
        Direction::Egress => ("Egress", "source"),
        Direction::Ingress => ("Ingress", "destination"),
    };
    let _ = writeln!(
        out,
        "\n{title}: the {who}'s {dir} policy (endpoint identity {}, remote identity {})",
        subject.identity, remote.identity
    );
    let ep = EndpointInfo::new(1, subject.labels.clone());
    let selecting: Vec<_> = repo.rules().filter(|(_, r)| ep.selected_by(r)).collect();
    if selecting.is_empty() {
        let _ = writeln!(out, "  rules selecting the {who}: none");
    } else {
        let _ = writeln!(out, "  rules selecting the {who}:");
    }
    for (_, r) in &selecting {
        let (allows, denies, default_deny) = match dir {
            Direction::Ingress => (
                r.ingress.len(),
                r.ingress_deny.len(),
                r.enable_default_deny.ingress,
            ),
            Direction::Egress => (
                r.egress.len(),
                r.egress_deny.len(),
                r.enable_default_deny.egress,
            ),
        };
        if allows + denies == 0 && !default_deny {
            let _ = writeln!(out, "    {}: no {dir} rules", r.origin);
            continue;
        }
        let _ = writeln!(
            out,
            "    {}: {allows} {dir} allow, {denies} {dir} deny rule(s){}",
            r.origin,
            if default_deny {
                format!(", requests {dir} default deny")
            } else {
                String::new()
            }
        );
    }
    let policy = resolve_endpoint(repo, &ep, ids, opts);
    let enforced = match dir {
        Direction::Ingress => policy.enforce_ingress,
        Direction::Egress => policy.enforce_egress,
    };
    let _ = writeln!(
        out,
        "  enforcement: {}",
        if enforced {
            format!("{dir} default deny: only what an entry allows passes")
        } else {
            format!("{dir} not enforced: everything passes unless denied")
        }
    );

    // The datapath looks up (remote identity, dir, proto, port) and (0, dir, proto, port),
    // each a longest-prefix match; show every entry either lookup could hit.
    let candidates: Vec<(&PolicyKey, &PolicyEntry)> = policy
        .entries
        .iter()
        .filter(|(k, _)| {
            (k.identity == remote.identity || k.identity == Identity::ANY)
                && k.direction == dir
                && k.matches_l4(protocol, port)
        })
        .collect();
    let best = |id: Identity| {
        candidates
            .iter()
            .filter(|(k, _)| k.identity == id)
            .max_by_key(|(k, _)| k.proto_port_prefix_len())
            .map(|(k, _)| **k)
    };
    let l3_hit = best(remote.identity).filter(|_| remote.identity != Identity::ANY);
    let l4_hit = best(Identity::ANY);
    let peer_word = match dir {
        Direction::Egress => "destination",
        Direction::Ingress => "source",
    };
    let entry_line = |k: &PolicyKey, e: &PolicyEntry| {
        format!(
            "{dir} remote {} {}/{} -> {} (precedence {}) by {}",
            if k.identity == Identity::ANY {
                "any".to_owned()
            } else {
                format!("{} ({peer_word})", k.identity)
            },
            proto_name(k.protocol),
            port_text(k),
            verdict_text(e),
            e.precedence,
            rule_of(&policy, k, e)
        )
    };
    if candidates.is_empty() {
        let _ = writeln!(out, "  matching entries: none");
    } else {
        let _ = writeln!(out, "  matching entries:");
    }
    for (k, e) in &candidates {
        let mark = if Some(**k) == l3_hit {
            "identity lookup hit"
        } else if Some(**k) == l4_hit {
            "any-identity lookup hit"
        } else {
            "shadowed by a longer prefix"
        };
        let _ = writeln!(out, "    {}  [{mark}]", entry_line(k, e));
    }

    // `lookup` is the datapath's decision; find which of the two hits it returned (it
    // returns a reference into `entries`).
    let decided = policy.lookup(remote.identity, dir, protocol, port);
    let decided_key = decided.and_then(|d| {
        [l3_hit, l4_hit]
            .into_iter()
            .flatten()
            .find(|k| policy.entries.get(k).is_some_and(|e| std::ptr::eq(e, d)))
    });
    let Some((e, k)) = decided.zip(decided_key) else {
        let _ = writeln!(
            out,
            "  decision: no entry matches: dropped by default deny (Policy denied)"
        );
        let _ = writeln!(out, "  {title} verdict: DENIED");
        return Ok(false);
    };
    let hit = |k: Option<PolicyKey>| k.and_then(|k| policy.entries.get(&k));
    let why = match (hit(l3_hit), hit(l4_hit)) {
        (Some(a), Some(b)) if a.precedence != b.precedence => {
            "both lookups hit; the higher precedence wins"
        }
        (Some(_), Some(_)) => {
            "both lookups hit with equal precedence; the longer prefix wins, then the identity's own entry"
        }
        _ => "the only lookup hit",
    };
    let _ = writeln!(
        out,
        "  decision: {} by {} ({why})",
        verdict_text(e),
        rule_of(&policy, &k, e)
    );
    let allowed = match e.action {
        Action::Deny => {
            let _ = writeln!(out, "  {title} verdict: DENIED (Policy denied by denylist)");
            return Ok(false);
        }
        Action::Allow => true,
        Action::Redirect => trace_l7(out, &policy, dir, protocol, port, remote, ids, request)?,
    };
    let _ = writeln!(
        out,
        "  {title} verdict: {}",
        if allowed { "ALLOWED" } else { "DENIED" }
    );
    Ok(allowed)
}

/// Evaluates the proxy's decision for a redirected connection. Without request details
/// (`--http-*` / `--dns-name` / `--tls-sni`) the L7 rules are listed, not evaluated, and the connection
/// counts as allowed (it reaches the proxy).
#[expect(
    clippy::too_many_arguments,
    reason = "one call site; a struct would only rename the parameters"
)]
fn trace_l7(
    out: &mut String,
    policy: &EndpointPolicy,
    dir: Direction,
    protocol: u8,
    port: u16,
    remote: &Peer,
    ids: &IdentitySet,
    request: &L7Request<'_>,
) -> anyhow::Result<bool> {
    let sets: Vec<&L7RuleSet> = policy.l7_for(dir, protocol, port).collect();
    if sets.is_empty() {
        let _ = writeln!(
            out,
            "  L7: no rule set for this port: the proxy denies every request"
        );
        return Ok(false);
    }
    let peer_word = match dir {
        Direction::Egress => "(destination)",
        Direction::Ingress => "(source)",
    };
    let names = IdentityNames {
        names: [(remote.identity, peer_word.to_owned())].into(),
    };
    let mut allowed = false;
    for set in sets {
        out.push_str("  L7 rule set:\n");
        out.push_str(&describe_rule_set(set, &names, ids, "    "));
        let applicable: Vec<_> = set
            .rules
            .iter()
            .filter(|r| r.remote.contains(remote.identity))
            .collect();
        if applicable.is_empty() {
            let _ = writeln!(
                out,
                "  L7: no rule applies to identity {}: the proxy denies every request",
                remote.identity
            );
            continue;
        }
        match set.parser {
            L7Parser::Http => {
                let Some(req) = &request.http else {
                    let _ = writeln!(
                        out,
                        "  L7: not evaluated: pass --http-method/--http-path to evaluate the HTTP rules (counted as allowed: the connection reaches the proxy)"
                    );
                    allowed = true;
                    continue;
                };
                let _ = writeln!(
                    out,
                    "  L7 evaluation of {} {} (rules that apply to identity {}):",
                    req.method, req.path, remote.identity
                );
                for r in applicable {
                    let L7Rules::Http(rules) = &r.rules else {
                        continue;
                    };
                    if rules.is_empty() {
                        let _ = writeln!(out, "    any request (L7 wildcard): match");
                        allowed = true;
                    }
                    for h in rules {
                        let compiled = h
                            .compile()
                            .map_err(|e| anyhow!("HTTP rule {}: {e}", describe_http(h)))?;
                        let m = compiled.matches(req);
                        allowed |= m;
                        let _ = writeln!(
                            out,
                            "    {}: {}",
                            describe_http(h),
                            if m { "match" } else { "no match" }
                        );
                    }
                }
                let _ = writeln!(
                    out,
                    "  L7: {} {} -> {}",
                    req.method,
                    req.path,
                    if allowed {
                        "allowed"
                    } else {
                        "denied (403 Access denied)"
                    }
                );
            }
            L7Parser::Dns => {
                let Some(name) = request.dns else {
                    let _ = writeln!(
                        out,
                        "  L7: not evaluated: pass --dns-name to evaluate the DNS rules (counted as allowed: the query reaches the DNS proxy)"
                    );
                    allowed = true;
                    continue;
                };
                let _ = writeln!(
                    out,
                    "  L7 evaluation of query {name} (rules that apply to identity {}):",
                    remote.identity
                );
                for r in applicable {
                    let L7Rules::Dns(sels) = &r.rules else {
                        continue;
                    };
                    let m = DnsMatcher::new(sels)
                        .map_err(|e| anyhow!("DNS rules {}: {e}", describe_l7(&r.rules)))?
                        .allows(name);
                    allowed |= m;
                    let _ = writeln!(
                        out,
                        "    {}: {}",
                        describe_l7(&r.rules),
                        if m { "match" } else { "no match" }
                    );
                }
                let _ = writeln!(
                    out,
                    "  L7: query {name} -> {}",
                    if allowed {
                        "allowed"
                    } else {
                        "refused (REFUSED)"
                    }
                );
            }
            L7Parser::Tls => {
                let Some(sni) = request.tls else {
                    let _ = writeln!(
                        out,
                        "  L7: not evaluated: pass --tls-sni to evaluate the server names (counted as allowed: the connection reaches the proxy)"
                    );
                    allowed = true;
                    continue;
                };
                let _ = writeln!(
                    out,
                    "  L7 evaluation of TLS server name {sni} (rules that apply to identity {}):",
                    remote.identity
                );
                for r in applicable {
                    let L7Rules::Tls(names) = &r.rules else {
                        continue;
                    };
                    let m = names.is_empty() || names.iter().any(|n| n.matches(sni));
                    allowed |= m;
                    let _ = writeln!(
                        out,
                        "    {}: {}",
                        describe_l7(&r.rules),
                        if m { "match" } else { "no match" }
                    );
                }
                let _ = writeln!(
                    out,
                    "  L7: TLS server name {sni} -> {}",
                    if allowed {
                        "allowed"
                    } else {
                        "denied (connection reset)"
                    }
                );
            }
        }
    }
    Ok(allowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dport_forms() {
        assert_eq!(parse_dport("8080/TCP"), Ok((6, 8080)));
        assert_eq!(parse_dport("53/udp"), Ok((17, 53)));
        assert_eq!(parse_dport("443"), Ok((6, 443)));
        assert_eq!(parse_dport("8/ICMP"), Ok((1, 8)));
        assert!(parse_dport("8080/ANY").is_err());
        assert!(parse_dport("http/TCP").is_err());
        assert!(parse_dport("70000/TCP").is_err());
        assert!(parse_dport("300/ICMP").is_err());
    }

    #[test]
    fn label_lists_default_to_k8s() {
        let l = parse_label_list("app=web, tier=front,reserved:world,", "--x").unwrap();
        let s: Vec<String> = l.iter().map(ToString::to_string).collect();
        assert_eq!(s, ["k8s:app=web", "k8s:tier=front", "reserved:world"]);
        let e = parse_label_list("bogus:x=y", "--src-labels").unwrap_err();
        assert!(
            e.to_string().starts_with("--src-labels: invalid label"),
            "{e}"
        );
        let (labels, local) = peer_labels(l, "shop", "c1");
        assert!(!local, "reserved:world is not a local endpoint");
        assert_eq!(
            labels.len(),
            3,
            "no namespace label added to a non-pod peer"
        );
        let (labels, local) = peer_labels(parse_label_list("app=web", "-").unwrap(), "shop", "c1");
        assert!(local);
        assert_eq!(
            labels.to_string(),
            "k8s:app=web,k8s:io.cilium.k8s.policy.cluster=c1,k8s:io.kubernetes.pod.namespace=shop"
        );
    }

    #[test]
    fn documents_split_like_the_engine() {
        let (docs, err) = split_documents("a: 1\n---\n---\n[{b: 2}, {c: 3}]\n");
        assert_eq!(docs.len(), 3);
        assert!(err.is_none());
        let (docs, err) = split_documents("a: 1\n---\nb: [1, 2\n---\nc: 3\n");
        assert_eq!(docs.len(), 1, "documents before the error are kept");
        let err = err.unwrap();
        assert!(err.starts_with("line 4 column 1: invalid YAML: "), "{err}");
        let (docs, err) = split_documents("{\"a\": 1}\n{\"b\": ");
        assert_eq!(docs.len(), 1);
        assert!(err.unwrap().contains("invalid JSON"));
    }

    #[test]
    fn resource_names_of_broken_documents() {
        let opts = ParseOptions::default();
        let v: Value =
            serde_json::json!({"kind": "CiliumNetworkPolicy", "metadata": {"name": "x"}});
        assert_eq!(resource_of(&v, &opts), "CiliumNetworkPolicy/default/x");
        let v: Value = serde_json::json!({"kind": "CiliumClusterwideNetworkPolicy", "metadata": {"name": "x"}});
        assert_eq!(resource_of(&v, &opts), "CiliumClusterwideNetworkPolicy//x");
        let v: Value = serde_json::json!({"metadata": {"namespace": "a"}});
        assert_eq!(resource_of(&v, &opts), "?/a/?");
    }

    #[test]
    fn port_texts() {
        let k = |protocol, port, port_prefix_len| PolicyKey {
            identity: Identity::ANY,
            direction: Direction::Ingress,
            protocol,
            port,
            port_prefix_len,
        };
        assert_eq!(port_text(&k(0, 0, 0)), "ANY");
        assert_eq!(port_text(&k(6, 0, 0)), "ANY");
        assert_eq!(port_text(&k(6, 8080, 16)), "8080");
        assert_eq!(port_text(&k(1, 8, 16)), "type 8");
        assert_eq!(port_text(&k(6, 64, 10)), "64-127 (64/10)");
    }
}
