//! Parsing and validation of `v1` `Service` and `discovery.k8s.io/v1` `EndpointSlice`
//! documents. Every field of `spec`, of the slice and of their items is checked against the
//! known fields (unknown ⇒ an error naming it); `metadata` is Kubernetes' generic object
//! metadata and only `name`, `namespace` and `labels` are read from it. Kubernetes'
//! validation rules are applied where they matter to the load balancer (ports and NodePorts
//! in range and unique per protocol, names on multi-port services, affinity timeout
//! bounds), with Kubernetes' wording where it has one.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use serde_json::Value;

use super::{
    AddressType, Endpoint, EndpointConditions, EndpointPort, EndpointSlice, L4Protocol, Service,
    ServiceError, ServiceName, ServicePort, ServiceResource, ServiceType, TargetPort,
    TrafficPolicy,
};
use crate::PolicyError;
use crate::error::FieldError;
use crate::parse::{Obj, as_bool, as_str, idx, join, load_values, string_map, type_name};

/// Kubernetes' default NodePort range (`--service-node-port-range`), inclusive.
pub const NODEPORT_RANGE_DEFAULT: (u16, u16) = (30000, 32767);
/// `sessionAffinityConfig.clientIP.timeoutSeconds` default (Kubernetes'
/// `DefaultClientIPServiceAffinitySeconds`, 3 h).
pub const DEFAULT_AFFINITY_TIMEOUT_SECS: u32 = 10_800;
/// Upper bound Kubernetes validates for the affinity timeout (1 day).
pub const MAX_AFFINITY_TIMEOUT_SECS: u32 = 86_400;
/// The label naming an EndpointSlice's service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Options for parsing.
#[derive(Debug, Clone)]
pub struct ServiceParseOptions {
    /// Namespace for documents without `metadata.namespace`. Default `default`.
    pub default_namespace: String,
    /// Accepted `nodePort` values, inclusive. Default 30000–32767.
    pub nodeport_range: (u16, u16),
}

impl Default for ServiceParseOptions {
    fn default() -> Self {
        ServiceParseOptions {
            default_namespace: "default".to_owned(),
            nodeport_range: NODEPORT_RANGE_DEFAULT,
        }
    }
}

/// Parses every Service and EndpointSlice in `text` (YAML, possibly multi-document, or
/// JSON; `kind: List` expanded). `source_name` only names the input in errors. Other kinds
/// are an error (a file given to `membrane service apply` holds services only).
pub fn parse_service_documents(
    text: &str,
    source_name: &str,
    opts: &ServiceParseOptions,
) -> Result<Vec<ServiceResource>, ServiceError> {
    let docs = load_values(text, source_name).map_err(|e| match e {
        PolicyError::Syntax {
            source_name,
            message,
        } => ServiceError::Syntax {
            source_name,
            message,
        },
        PolicyError::Invalid {
            source_name,
            message,
            ..
        } => ServiceError::Syntax {
            source_name,
            message,
        },
    })?;
    let mut out = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        parse_into(doc, i, "", source_name, opts, &mut out)?;
    }
    Ok(out)
}

/// Parses one decoded document (a `kind: List` yields several resources).
pub fn parse_service_value(
    value: &Value,
    document: usize,
    source_name: &str,
    opts: &ServiceParseOptions,
) -> Result<Vec<ServiceResource>, ServiceError> {
    let mut out = Vec::new();
    parse_into(value, document, "", source_name, opts, &mut out)?;
    Ok(out)
}

fn parse_into(
    doc: &Value,
    document: usize,
    prefix: &str,
    source_name: &str,
    opts: &ServiceParseOptions,
    out: &mut Vec<ServiceResource>,
) -> Result<(), ServiceError> {
    let invalid = |resource: String, e: FieldError| ServiceError::Invalid {
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
    let Some(root) = doc.as_object() else {
        return Err(invalid(
            String::new(),
            FieldError::new(
                prefix,
                format!("expected an object, found {}", type_name(doc)),
            ),
        ));
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
        let Some((items, items_path)) = o.list("items").map_err(|e| invalid(String::new(), e))?
        else {
            return Ok(());
        };
        for (i, item) in items.iter().enumerate() {
            parse_into(item, document, &idx(&items_path, i), source_name, opts, out)?;
        }
        return Ok(());
    }
    let (namespace, name) =
        metadata_name(doc, prefix, opts).map_err(|e| invalid(format!(" ({kind})"), e))?;
    let resource = format!(" ({kind} {namespace}/{name})");
    let parsed = match kind {
        "Service" => {
            parse_service(doc, prefix, namespace, name, opts).map(ServiceResource::Service)
        }
        "EndpointSlice" => {
            parse_slice(doc, prefix, namespace, name).map(ServiceResource::EndpointSlice)
        }
        other => Err(FieldError::new(
            join(prefix, "kind"),
            format!("unsupported kind `{other}` (expected Service or EndpointSlice)"),
        )),
    }
    .map_err(|e| invalid(resource, e))?;
    out.push(parsed);
    Ok(())
}

/// `metadata.namespace` (or the default) and `metadata.name`.
fn metadata_name(
    doc: &Value,
    prefix: &str,
    opts: &ServiceParseOptions,
) -> Result<(String, String), FieldError> {
    let path = join(prefix, "metadata");
    let meta = doc
        .get("metadata")
        .filter(|v| !v.is_null())
        .ok_or_else(|| FieldError::new(&path, "missing required field"))?;
    if !meta.is_object() {
        return Err(FieldError::new(
            &path,
            format!("expected an object, found {}", type_name(meta)),
        ));
    }
    let name_path = join(&path, "name");
    let name = match meta.get("name").filter(|v| !v.is_null()) {
        Some(v) => as_str(v, &name_path)?.to_owned(),
        None => return Err(FieldError::new(name_path, "missing required field")),
    };
    check_dns_label(&name, &name_path, 253, true)?;
    let ns_path = join(&path, "namespace");
    let namespace = match meta.get("namespace").filter(|v| !v.is_null()) {
        Some(v) => {
            let ns = as_str(v, &ns_path)?.to_owned();
            check_dns_label(&ns, &ns_path, 63, false)?;
            ns
        }
        None => opts.default_namespace.clone(),
    };
    Ok((namespace, name))
}

/// RFC 1123 label (or subdomain with `dots`): lowercase alphanumerics and `-` (and `.`),
/// starting and ending alphanumeric.
fn check_dns_label(s: &str, path: &str, max: usize, dots: bool) -> Result<(), FieldError> {
    let ok = !s.is_empty()
        && s.len() <= max
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (dots && b == b'.')
        })
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            path,
            format!(
                "`{s}` is not a valid name: lowercase letters, digits and '-'{}, at most {max} characters, starting and ending with a letter or digit",
                if dots { " and '.'" } else { "" }
            ),
        ))
    }
}

/// A port name (IANA service name rules: ≤ 15 characters, lowercase alphanumerics and '-',
/// at least one letter, no leading/trailing/double '-').
fn check_port_name(s: &str, path: &str) -> Result<(), FieldError> {
    let ok = !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--");
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            path,
            format!(
                "`{s}` is not a valid port name: at most 15 lowercase letters, digits and '-', with at least one letter"
            ),
        ))
    }
}

fn check_api_version(doc: &Value, prefix: &str, expected: &str) -> Result<(), FieldError> {
    let path = join(prefix, "apiVersion");
    match doc.get("apiVersion").filter(|v| !v.is_null()) {
        Some(v) => {
            let got = as_str(v, &path)?;
            if got == expected {
                Ok(())
            } else {
                Err(FieldError::new(
                    path,
                    format!("unsupported apiVersion `{got}` (expected `{expected}`)"),
                ))
            }
        }
        None => Err(FieldError::new(path, "missing required field")),
    }
}

fn as_u64(v: &Value, path: &str) -> Result<u64, FieldError> {
    v.as_u64().ok_or_else(|| {
        FieldError::new(
            path,
            format!("expected a non-negative integer, found {}", describe(v)),
        )
    })
}

fn describe(v: &Value) -> String {
    match v {
        Value::Number(n) => format!("`{n}`"),
        Value::String(s) => format!("the string `{s}`"),
        other => type_name(other).to_owned(),
    }
}

/// A port number 1..=65535.
fn port_number(v: &Value, path: &str) -> Result<u16, FieldError> {
    let n = as_u64(v, path)?;
    u16::try_from(n)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| FieldError::new(path, format!("port {n} out of range (1-65535)")))
}

fn protocol(v: Option<&Value>, path: &str) -> Result<L4Protocol, FieldError> {
    match v {
        None => Ok(L4Protocol::Tcp),
        Some(v) => match as_str(v, path)? {
            "TCP" => Ok(L4Protocol::Tcp),
            "UDP" => Ok(L4Protocol::Udp),
            "SCTP" => Err(FieldError::new(
                path,
                "SCTP is not supported by the load balancer (TCP and UDP are)",
            )),
            other => Err(FieldError::new(
                path,
                format!("unknown protocol `{other}` (expected TCP or UDP)"),
            )),
        },
    }
}

/// An address: IPv4 kept, IPv6 reported as a warning, anything else an error.
fn address(
    v: &Value,
    path: &str,
    warnings: &mut Vec<String>,
) -> Result<Option<Ipv4Addr>, FieldError> {
    let s = as_str(v, path)?;
    match s.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => Ok(Some(a)),
        Ok(IpAddr::V6(_)) => {
            warnings.push(format!(
                "{path}: IPv6 address {s} skipped (IPv4 only for now)"
            ));
            Ok(None)
        }
        Err(_) => Err(FieldError::new(path, format!("`{s}` is not an IP address"))),
    }
}

const SERVICE_FIELDS: &[&str] = &["apiVersion", "kind", "metadata", "spec", "status"];
const SPEC_FIELDS: &[&str] = &[
    "type",
    "clusterIP",
    "clusterIPs",
    "ports",
    "selector",
    "externalIPs",
    "sessionAffinity",
    "sessionAffinityConfig",
    "externalTrafficPolicy",
    "internalTrafficPolicy",
    "ipFamilies",
    "ipFamilyPolicy",
    "publishNotReadyAddresses",
    "allocateLoadBalancerNodePorts",
    "loadBalancerClass",
    "loadBalancerIP",
    "healthCheckNodePort",
    "externalName",
    "trafficDistribution",
];
const SPEC_REJECTED: &[(&str, &str)] = &[(
    "loadBalancerSourceRanges",
    "not supported yet: membrane would not enforce the ranges, so it refuses the service rather than expose it wider than asked",
)];

fn parse_service(
    doc: &Value,
    prefix: &str,
    namespace: String,
    name: String,
    opts: &ServiceParseOptions,
) -> Result<Service, FieldError> {
    check_api_version(doc, prefix, "v1")?;
    let mut root = Obj::new(doc, prefix, SERVICE_FIELDS, &[])?;
    let spec_path = root.path("spec");
    let spec_value = root
        .get("spec")
        .ok_or_else(|| FieldError::new(&spec_path, "missing required field"))?;
    let mut spec = Obj::new(spec_value, &spec_path, SPEC_FIELDS, SPEC_REJECTED)?;
    let mut warnings = Vec::new();

    let type_path = spec.path("type");
    let service_type = match spec.get("type") {
        None => ServiceType::ClusterIP,
        Some(v) => match as_str(v, &type_path)? {
            "ClusterIP" => ServiceType::ClusterIP,
            "NodePort" => ServiceType::NodePort,
            "LoadBalancer" => ServiceType::LoadBalancer,
            "ExternalName" => ServiceType::ExternalName,
            other => {
                return Err(FieldError::new(
                    type_path,
                    format!(
                        "unknown type `{other}` (expected ClusterIP, NodePort, LoadBalancer or ExternalName)"
                    ),
                ));
            }
        },
    };

    // clusterIP / clusterIPs: "None" = headless, "" = not allocated.
    let mut headless = false;
    let mut cluster_ips = Vec::new();
    let cip_path = spec.path("clusterIP");
    let cluster_ip = spec
        .get("clusterIP")
        .map(|v| as_str(v, &cip_path))
        .transpose()?;
    let cips_path = spec.path("clusterIPs");
    let listed: Vec<(&str, String)> = match spec.list("clusterIPs")? {
        Some((items, p)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let ip_path = idx(&p, i);
                as_str(v, &ip_path).map(|s| (s, ip_path))
            })
            .collect::<Result<_, _>>()?,
        None => Vec::new(),
    };
    if let (Some(first), Some((listed_first, _))) = (cluster_ip, listed.first())
        && first != *listed_first
    {
        return Err(FieldError::new(
            &cips_path,
            format!("must start with spec.clusterIP `{first}`, found `{listed_first}`"),
        ));
    }
    let all: Vec<(&str, String)> = if listed.is_empty() {
        cluster_ip
            .map(|s| (s, cip_path.clone()))
            .into_iter()
            .collect()
    } else {
        listed
    };
    for (s, path) in all {
        match s {
            "None" => headless = true,
            "" => {}
            _ => {
                if let Some(a) = address(&Value::String(s.to_owned()), &path, &mut warnings)? {
                    if cluster_ips.contains(&a) {
                        return Err(FieldError::new(path, format!("duplicate address {a}")));
                    }
                    cluster_ips.push(a);
                }
            }
        }
    }
    if headless && !cluster_ips.is_empty() {
        return Err(FieldError::new(
            cip_path,
            "`None` (headless) cannot be combined with addresses",
        ));
    }
    if headless && service_type != ServiceType::ClusterIP {
        return Err(FieldError::new(
            cip_path,
            "`None` (headless) is only valid for type ClusterIP",
        ));
    }

    // Ports.
    let mut ports = Vec::new();
    if let Some((items, ports_path)) = spec.list("ports")? {
        for (i, item) in items.iter().enumerate() {
            let p = idx(&ports_path, i);
            ports.push(parse_service_port(item, &p, service_type, opts)?);
        }
        validate_ports(&ports, &ports_path)?;
    }
    if ports.is_empty() && !headless && service_type != ServiceType::ExternalName {
        return Err(FieldError::new(
            spec.path("ports"),
            "at least one port is required (except for headless and ExternalName services)",
        ));
    }
    if service_type == ServiceType::NodePort
        && let Some(i) = ports.iter().position(|p| p.node_port.is_none())
    {
        return Err(FieldError::new(
            format!("{}[{i}].nodePort", spec.path("ports")),
            "required for type NodePort: membrane allocates no NodePorts, give the port",
        ));
    }
    if service_type == ServiceType::ExternalName {
        let p = spec.path("externalName");
        match spec.get("externalName") {
            Some(v) => {
                as_str(v, &p)?;
            }
            None => return Err(FieldError::new(p, "required for type ExternalName")),
        }
    }

    // externalIPs.
    let mut external_ips = Vec::new();
    if let Some((items, p)) = spec.list("externalIPs")? {
        for (i, v) in items.iter().enumerate() {
            let ip_path = idx(&p, i);
            if let Some(a) = address(v, &ip_path, &mut warnings)? {
                if external_ips.contains(&a) {
                    return Err(FieldError::new(ip_path, format!("duplicate address {a}")));
                }
                external_ips.push(a);
            }
        }
    }

    // Session affinity.
    let sa_path = spec.path("sessionAffinity");
    let client_ip = match spec.get("sessionAffinity") {
        None => false,
        Some(v) => match as_str(v, &sa_path)? {
            "None" => false,
            "ClientIP" => true,
            other => {
                return Err(FieldError::new(
                    sa_path,
                    format!("unknown value `{other}` (expected None or ClientIP)"),
                ));
            }
        },
    };
    let sac_path = spec.path("sessionAffinityConfig");
    let mut timeout = DEFAULT_AFFINITY_TIMEOUT_SECS;
    if let Some(v) = spec.get("sessionAffinityConfig") {
        if !client_ip {
            return Err(FieldError::new(
                &sac_path,
                "may only be set when sessionAffinity is ClientIP",
            ));
        }
        let mut sac = Obj::new(v, &sac_path, &["clientIP"], &[])?;
        if let Some(c) = sac.get("clientIP") {
            let mut c = Obj::new(c, &sac.path("clientIP"), &["timeoutSeconds"], &[])?;
            let tp = c.path("timeoutSeconds");
            if let Some(t) = c.get("timeoutSeconds") {
                let t = as_u64(t, &tp)?;
                timeout = u32::try_from(t)
                    .ok()
                    .filter(|t| (1..=MAX_AFFINITY_TIMEOUT_SECS).contains(t))
                    .ok_or_else(|| {
                        FieldError::new(
                            &tp,
                            format!("{t} out of range (1-{MAX_AFFINITY_TIMEOUT_SECS} seconds)"),
                        )
                    })?;
            }
        }
    }
    let affinity_timeout_secs = client_ip.then_some(timeout);

    let external_traffic_policy = traffic_policy(&mut spec, "externalTrafficPolicy")?;
    let internal_traffic_policy = traffic_policy(&mut spec, "internalTrafficPolicy")?;

    for (field, note) in [
        ("healthCheckNodePort", "not served yet"),
        (
            "trafficDistribution",
            "topology-aware routing is not implemented",
        ),
        (
            "loadBalancerIP",
            "deprecated request field; the frontends come from status.loadBalancer.ingress",
        ),
    ] {
        if spec.get(field).is_some() {
            warnings.push(format!("{}: ignored ({note})", spec.path(field)));
        }
    }
    if let Some(v) = spec.get("publishNotReadyAddresses") {
        as_bool(v, &spec.path("publishNotReadyAddresses"))?;
    }
    if let Some(v) = spec.get("selector") {
        string_map(v, &spec.path("selector"))?;
    }

    // status.loadBalancer.ingress[].ip
    let mut load_balancer_ips = Vec::new();
    if let Some(status) = root.get("status") {
        let status_path = root.path("status");
        let mut status = Obj::new(status, &status_path, &["loadBalancer", "conditions"], &[])?;
        if let Some(lb) = status.get("loadBalancer") {
            let mut lb = Obj::new(lb, &status.path("loadBalancer"), &["ingress"], &[])?;
            if let Some((items, p)) = lb.list("ingress")? {
                for (i, item) in items.iter().enumerate() {
                    let ip = idx(&p, i);
                    let mut ing = Obj::new(item, &ip, &["ip", "hostname", "ipMode", "ports"], &[])?;
                    if let Some(v) = ing.get("ip") {
                        if let Some(a) = address(v, &ing.path("ip"), &mut warnings)?
                            && !load_balancer_ips.contains(&a)
                        {
                            load_balancer_ips.push(a);
                        }
                    } else if ing.get("hostname").is_some() {
                        warnings.push(format!("{ip}.hostname: ignored (no address)"));
                    }
                }
            }
        }
    }
    if service_type != ServiceType::LoadBalancer && !load_balancer_ips.is_empty() {
        warnings.push(
            "status.loadBalancer.ingress: ignored (the service is not of type LoadBalancer)"
                .to_owned(),
        );
        load_balancer_ips.clear();
    }

    Ok(Service {
        name: ServiceName { namespace, name },
        service_type,
        cluster_ips,
        headless,
        ports,
        external_ips,
        load_balancer_ips,
        affinity_timeout_secs,
        external_traffic_policy,
        internal_traffic_policy,
        warnings,
    })
}

fn traffic_policy(spec: &mut Obj<'_>, field: &str) -> Result<TrafficPolicy, FieldError> {
    let p = spec.path(field);
    match spec.get(field) {
        None => Ok(TrafficPolicy::Cluster),
        Some(v) => match as_str(v, &p)? {
            "Cluster" => Ok(TrafficPolicy::Cluster),
            "Local" => Ok(TrafficPolicy::Local),
            other => Err(FieldError::new(
                p,
                format!("unknown value `{other}` (expected Cluster or Local)"),
            )),
        },
    }
}

fn parse_service_port(
    v: &Value,
    path: &str,
    service_type: ServiceType,
    opts: &ServiceParseOptions,
) -> Result<ServicePort, FieldError> {
    let mut o = Obj::new(
        v,
        path,
        &[
            "name",
            "protocol",
            "port",
            "targetPort",
            "nodePort",
            "appProtocol",
        ],
        &[],
    )?;
    let name = match o.get("name") {
        Some(v) => {
            let p = o.path("name");
            let s = as_str(v, &p)?;
            if s.is_empty() {
                None
            } else {
                check_port_name(s, &p)?;
                Some(s.to_owned())
            }
        }
        None => None,
    };
    let protocol = protocol(o.get("protocol"), &o.path("protocol"))?;
    let port_path = o.path("port");
    let port = match o.get("port") {
        Some(v) => port_number(v, &port_path)?,
        None => return Err(FieldError::new(port_path, "missing required field")),
    };
    let tp_path = o.path("targetPort");
    let target_port = match o.get("targetPort") {
        None => TargetPort::Number(port),
        Some(Value::String(s)) => match s.parse::<u64>() {
            // IntOrString: a numeric string is a number.
            Ok(n) => TargetPort::Number(port_number(&Value::from(n), &tp_path)?),
            Err(_) => {
                check_port_name(s, &tp_path)?;
                TargetPort::Name(s.clone())
            }
        },
        Some(v) => TargetPort::Number(port_number(v, &tp_path)?),
    };
    let np_path = o.path("nodePort");
    let node_port = match o.get("nodePort") {
        None => None,
        Some(v) => {
            let n = as_u64(v, &np_path)?;
            if n == 0 {
                // Kubernetes' "unset".
                None
            } else {
                if !matches!(
                    service_type,
                    ServiceType::NodePort | ServiceType::LoadBalancer
                ) {
                    return Err(FieldError::new(
                        np_path,
                        "may not be used when `type` is not NodePort or LoadBalancer",
                    ));
                }
                let (lo, hi) = opts.nodeport_range;
                let np = u16::try_from(n)
                    .ok()
                    .filter(|p| (lo..=hi).contains(p))
                    .ok_or_else(|| {
                        FieldError::new(
                            &np_path,
                            format!("{n} is outside the NodePort range {lo}-{hi}"),
                        )
                    })?;
                Some(np)
            }
        }
    };
    if let Some(v) = o.get("appProtocol") {
        as_str(v, &o.path("appProtocol"))?;
    }
    Ok(ServicePort {
        name,
        protocol,
        port,
        target_port,
        node_port,
    })
}

/// Kubernetes' rules across `spec.ports`: names required (and unique) with more than one
/// port; `port`/`protocol` and `nodePort`/`protocol` unique.
fn validate_ports(ports: &[ServicePort], path: &str) -> Result<(), FieldError> {
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    let mut frontends: BTreeMap<(u16, L4Protocol), usize> = BTreeMap::new();
    let mut node_ports: BTreeMap<(u16, L4Protocol), usize> = BTreeMap::new();
    for (i, p) in ports.iter().enumerate() {
        let here = idx(path, i);
        match &p.name {
            Some(n) => {
                if let Some(first) = names.insert(n, i) {
                    return Err(FieldError::new(
                        join(&here, "name"),
                        format!("duplicate port name `{n}` (also {path}[{first}])"),
                    ));
                }
            }
            None if ports.len() > 1 => {
                return Err(FieldError::new(
                    join(&here, "name"),
                    "required when the service has more than one port",
                ));
            }
            None => {}
        }
        if let Some(first) = frontends.insert((p.port, p.protocol), i) {
            return Err(FieldError::new(
                join(&here, "port"),
                format!(
                    "duplicate frontend port {}/{} (also {path}[{first}])",
                    p.port, p.protocol
                ),
            ));
        }
        if let Some(np) = p.node_port
            && let Some(first) = node_ports.insert((np, p.protocol), i)
        {
            return Err(FieldError::new(
                join(&here, "nodePort"),
                format!(
                    "duplicate nodePort {np}/{} (also {path}[{first}])",
                    p.protocol
                ),
            ));
        }
    }
    Ok(())
}

const SLICE_FIELDS: &[&str] = &[
    "apiVersion",
    "kind",
    "metadata",
    "addressType",
    "endpoints",
    "ports",
];
const ENDPOINT_FIELDS: &[&str] = &[
    "addresses",
    "conditions",
    "hostname",
    "targetRef",
    "nodeName",
    "zone",
    "hints",
    "deprecatedTopology",
];

fn parse_slice(
    doc: &Value,
    prefix: &str,
    namespace: String,
    name: String,
) -> Result<EndpointSlice, FieldError> {
    check_api_version(doc, prefix, "discovery.k8s.io/v1")?;
    let mut root = Obj::new(doc, prefix, SLICE_FIELDS, &[])?;
    let mut warnings = Vec::new();

    let label_path = format!("{}.labels.{SERVICE_NAME_LABEL}", root.path("metadata"));
    let labels = doc
        .get("metadata")
        .and_then(|m| m.get("labels"))
        .filter(|v| !v.is_null());
    let labels = match labels {
        Some(v) => string_map(v, &join(&root.path("metadata"), "labels"))?,
        None => Vec::new(),
    };
    let service = labels
        .iter()
        .find(|(k, _)| *k == SERVICE_NAME_LABEL)
        .map(|(_, v)| (*v).to_owned())
        .ok_or_else(|| {
            FieldError::new(&label_path, "missing: the label names the slice's service")
        })?;
    check_dns_label(&service, &label_path, 63, false)?;

    let at_path = root.path("addressType");
    let address_type = match root.get("addressType") {
        None => return Err(FieldError::new(at_path, "missing required field")),
        Some(v) => match as_str(v, &at_path)? {
            "IPv4" => AddressType::IPv4,
            "IPv6" => AddressType::IPv6,
            "FQDN" => AddressType::Fqdn,
            other => {
                return Err(FieldError::new(
                    at_path,
                    format!("unknown addressType `{other}` (expected IPv4, IPv6 or FQDN)"),
                ));
            }
        },
    };

    let mut ports = Vec::new();
    if let Some((items, ports_path)) = root.list("ports")? {
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for (i, item) in items.iter().enumerate() {
            let p = idx(&ports_path, i);
            let mut o = Obj::new(item, &p, &["name", "protocol", "port", "appProtocol"], &[])?;
            let pname = match o.get("name") {
                Some(v) => {
                    let np = o.path("name");
                    let s = as_str(v, &np)?;
                    if s.is_empty() {
                        None
                    } else {
                        check_port_name(s, &np)?;
                        Some(s.to_owned())
                    }
                }
                None => None,
            };
            let protocol = protocol(o.get("protocol"), &o.path("protocol"))?;
            let port = match o.get("port") {
                Some(v) => Some(port_number(v, &o.path("port"))?),
                None => None,
            };
            if let Some(v) = o.get("appProtocol") {
                as_str(v, &o.path("appProtocol"))?;
            }
            let key = format!("{}/{protocol}", pname.as_deref().unwrap_or(""));
            if let Some(first) = seen.insert(key, i) {
                return Err(FieldError::new(
                    join(&p, "name"),
                    format!(
                        "duplicate port `{}`/{protocol} (also {ports_path}[{first}])",
                        pname.as_deref().unwrap_or("")
                    ),
                ));
            }
            ports.push(EndpointPort {
                name: pname,
                protocol,
                port,
            });
        }
    }

    let ep_path = root.path("endpoints");
    let (items, ep_path) = root
        .list("endpoints")?
        .ok_or_else(|| FieldError::new(&ep_path, "missing required field"))?;
    let mut endpoints = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let p = idx(&ep_path, i);
        let mut o = Obj::new(item, &p, ENDPOINT_FIELDS, &[])?;
        let ap = o.path("addresses");
        let (addrs, ap) = o
            .list("addresses")?
            .ok_or_else(|| FieldError::new(&ap, "missing required field"))?;
        if addrs.is_empty() || addrs.len() > 100 {
            return Err(FieldError::new(
                &ap,
                format!("must hold 1 to 100 addresses, found {}", addrs.len()),
            ));
        }
        let mut addresses = Vec::new();
        for (j, a) in addrs.iter().enumerate() {
            let aj = idx(&ap, j);
            let s = as_str(a, &aj)?;
            match address_type {
                AddressType::IPv4 => match s.parse::<Ipv4Addr>() {
                    Ok(a) => addresses.push(a),
                    Err(_) => {
                        return Err(FieldError::new(aj, format!("`{s}` is not an IPv4 address")));
                    }
                },
                AddressType::IPv6 => {
                    if s.parse::<std::net::Ipv6Addr>().is_err() {
                        return Err(FieldError::new(aj, format!("`{s}` is not an IPv6 address")));
                    }
                }
                AddressType::Fqdn => {}
            }
        }
        let mut conditions = EndpointConditions::default();
        if let Some(c) = o.get("conditions") {
            let mut c = Obj::new(
                c,
                &o.path("conditions"),
                &["ready", "serving", "terminating"],
                &[],
            )?;
            for (field, slot) in [
                ("ready", &mut conditions.ready),
                ("serving", &mut conditions.serving),
                ("terminating", &mut conditions.terminating),
            ] {
                if let Some(v) = c.get(field) {
                    *slot = Some(as_bool(v, &c.path(field))?);
                }
            }
        }
        let node_name = o
            .get("nodeName")
            .map(|v| as_str(v, &o.path("nodeName")).map(str::to_owned))
            .transpose()?;
        let zone = o
            .get("zone")
            .map(|v| as_str(v, &o.path("zone")).map(str::to_owned))
            .transpose()?;
        if address_type == AddressType::IPv4 {
            endpoints.push(Endpoint {
                addresses,
                conditions,
                node_name,
                zone,
            });
        }
    }
    if address_type != AddressType::IPv4 && !items.is_empty() {
        warnings.push(format!(
            "addressType {address_type:?}: endpoints not served (IPv4 only for now)"
        ));
    }

    Ok(EndpointSlice {
        namespace,
        name,
        service,
        address_type,
        ports,
        endpoints,
        warnings,
    })
}
