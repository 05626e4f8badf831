//! Hubble's flow filters (`pkg/hubble/filters`), compiled once per request.
//!
//! Semantics: inside one `FlowFilter` every set field must match (AND); the values of one
//! field are alternatives (OR); a flow passes a list of filters when any filter matches
//! (an empty whitelist passes everything); the result is `whitelist − blacklist`.
//!
//! Fields membrane cannot evaluate (workloads, clusters, node labels, trace ids, IP trace ids, uuids,
//! interfaces, translated addresses, CEL) are refused with [`FilterError::Unsupported`]
//! rather than ignored, so a query never silently returns more than asked.

use std::net::IpAddr;
use std::sync::LazyLock;

use regex::Regex;

use crate::convert::monitor_type;
use crate::proto::flow::{Endpoint, Flow, FlowFilter, TcpFlags, layer4, layer7};
use crate::selector::Selector;

/// Why a filter could not be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("invalid FlowFilter.{field} value {value:?}: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("FlowFilter.{field} is not supported by membrane")]
    Unsupported { field: &'static str },
}

type Check = Box<dyn Fn(&Flow) -> bool + Send + Sync>;

/// One compiled `FlowFilter` (all checks must pass).
pub struct CompiledFilter {
    checks: Vec<Check>,
}

impl CompiledFilter {
    pub fn matches(&self, flow: &Flow) -> bool {
        self.checks.iter().all(|check| check(flow))
    }
}

/// A request's whitelist and blacklist.
#[derive(Default)]
pub struct FlowFilters {
    whitelist: Vec<CompiledFilter>,
    blacklist: Vec<CompiledFilter>,
}

impl FlowFilters {
    pub fn new(whitelist: &[FlowFilter], blacklist: &[FlowFilter]) -> Result<Self, FilterError> {
        Ok(Self {
            whitelist: whitelist.iter().map(compile).collect::<Result<_, _>>()?,
            blacklist: blacklist.iter().map(compile).collect::<Result<_, _>>()?,
        })
    }

    /// `whitelist − blacklist`.
    pub fn matches(&self, flow: &Flow) -> bool {
        (self.whitelist.is_empty() || self.whitelist.iter().any(|f| f.matches(flow)))
            && !self.blacklist.iter().any(|f| f.matches(flow))
    }
}

fn invalid(field: &'static str, value: &str, reason: impl ToString) -> FilterError {
    FilterError::Invalid {
        field,
        value: value.to_owned(),
        reason: reason.to_string(),
    }
}

#[derive(Clone, Copy)]
enum Side {
    Source,
    Destination,
}

impl Side {
    fn endpoint(self, flow: &Flow) -> Option<&Endpoint> {
        match self {
            Side::Source => flow.source.as_ref(),
            Side::Destination => flow.destination.as_ref(),
        }
    }

    fn ip(self, flow: &Flow) -> Option<&str> {
        let ip = flow.ip.as_ref()?;
        Some(match self {
            Side::Source => &ip.source,
            Side::Destination => &ip.destination,
        })
    }

    fn port(self, flow: &Flow) -> Option<u32> {
        let (src, dst) = match flow.l4.as_ref()?.protocol.as_ref()? {
            layer4::Protocol::Tcp(p) => (p.source_port, p.destination_port),
            layer4::Protocol::Udp(p) => (p.source_port, p.destination_port),
            layer4::Protocol::Sctp(p) => (p.source_port, p.destination_port),
            _ => return None,
        };
        Some(match self {
            Side::Source => src,
            Side::Destination => dst,
        })
    }

    fn names(self, flow: &Flow) -> &[String] {
        match self {
            Side::Source => &flow.source_names,
            Side::Destination => &flow.destination_names,
        }
    }
}

/// An address or a CIDR.
enum IpMatch {
    Exact(IpAddr),
    Cidr(IpAddr, u8),
}

fn prefix_matches(net: IpAddr, bits: u8, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

impl IpMatch {
    fn parse(field: &'static str, s: &str) -> Result<Self, FilterError> {
        if let Some((net, bits)) = s.split_once('/') {
            let net: IpAddr = net.parse().map_err(|e| invalid(field, s, e))?;
            let bits: u8 = bits.parse().map_err(|e| invalid(field, s, e))?;
            let max = if net.is_ipv4() { 32 } else { 128 };
            if bits > max {
                return Err(invalid(field, s, format!("prefix length above {max}")));
            }
            Ok(Self::Cidr(net, bits))
        } else {
            s.parse().map(Self::Exact).map_err(|e| invalid(field, s, e))
        }
    }

    fn matches(&self, ip: IpAddr) -> bool {
        match *self {
            Self::Exact(want) => want == ip,
            Self::Cidr(net, bits) => prefix_matches(net, bits, ip),
        }
    }
}

fn ip_check(field: &'static str, values: &[String], side: Side) -> Result<Check, FilterError> {
    let matchers = values
        .iter()
        .map(|v| IpMatch::parse(field, v))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Box::new(move |flow| {
        side.ip(flow)
            .and_then(|ip| ip.parse::<IpAddr>().ok())
            .is_some_and(|ip| matchers.iter().any(|m| m.matches(ip)))
    }))
}

/// `[namespace/][pod-name-prefix]`: an empty namespace matches any namespace, an empty
/// name any pod of the namespace.
fn pod_check(field: &'static str, values: &[String], side: Side) -> Result<Check, FilterError> {
    let matchers = values
        .iter()
        .map(|v| {
            let (ns, prefix) = v.split_once('/').unwrap_or(("", v.as_str()));
            // `"/"` (what `hubble observe --all-namespaces` sends) is any pod of any
            // namespace; only an empty value says nothing at all.
            if v.is_empty() {
                return Err(invalid(field, v, "must be [namespace/][<name>]"));
            }
            Ok((ns.to_owned(), prefix.to_owned()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Box::new(move |flow| {
        let Some(ep) = side.endpoint(flow) else {
            return false;
        };
        if ep.namespace.is_empty() && ep.pod_name.is_empty() {
            return false;
        }
        matchers.iter().any(|(ns, prefix)| {
            (ns.is_empty() || *ns == ep.namespace) && ep.pod_name.starts_with(prefix.as_str())
        })
    }))
}

fn label_check(field: &'static str, values: &[String], side: Side) -> Result<Check, FilterError> {
    let selectors = values
        .iter()
        .map(|v| Selector::parse(v).map_err(|e| invalid(field, v, e)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Box::new(move |flow| {
        let labels = side.endpoint(flow).map_or(&[][..], |e| &e.labels[..]);
        selectors.iter().any(|s| s.matches(labels))
    }))
}

fn identity_check(values: &[u32], side: Side) -> Check {
    let values = values.to_vec();
    Box::new(move |flow| {
        side.endpoint(flow)
            .is_some_and(|e| values.contains(&e.identity))
    })
}

fn port_check(field: &'static str, values: &[String], side: Side) -> Result<Check, FilterError> {
    let ports = values
        .iter()
        .map(|v| v.parse::<u16>().map_err(|e| invalid(field, v, e)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Box::new(move |flow| {
        side.port(flow)
            .is_some_and(|p| ports.iter().any(|&want| u32::from(want) == p))
    }))
}

/// Hubble's FQDN pattern: `*` matches `[-.0-9a-z]*`, case-insensitive, one trailing dot
/// ignored, anchored.
fn fqdn_regex(field: &'static str, patterns: &[String]) -> Result<Regex, FilterError> {
    let mut alternatives = Vec::new();
    for raw in patterns {
        let p = raw.trim();
        let p = p.strip_suffix('.').unwrap_or(p).to_lowercase();
        if p.is_empty() {
            return Err(invalid(field, raw, "empty pattern"));
        }
        if p.ends_with('.') {
            return Err(invalid(field, raw, "multiple trailing dots in pattern"));
        }
        let mut re = String::new();
        for c in p.chars() {
            match c {
                '.' => re.push_str(r"\."),
                '*' => re.push_str("[-.0-9a-z]*"),
                '-' | '_' | '0'..='9' | 'a'..='z' => re.push(c),
                _ => {
                    return Err(invalid(
                        field,
                        raw,
                        format!("{c:?}: invalid rune in pattern"),
                    ));
                }
            }
        }
        alternatives.push(re);
    }
    Regex::new(&format!(r"\A(?:{})\z", alternatives.join("|")))
        .map_err(|e| invalid(field, &patterns.join(","), e))
}

fn fqdn_check(field: &'static str, values: &[String], side: Side) -> Result<Check, FilterError> {
    let re = fqdn_regex(field, values)?;
    Ok(Box::new(move |flow| {
        side.names(flow).iter().any(|name| {
            let name = name.strip_suffix('.').unwrap_or(name);
            re.is_match(name)
        })
    }))
}

fn regexes(field: &'static str, values: &[String]) -> Result<Vec<Regex>, FilterError> {
    values
        .iter()
        .map(|v| Regex::new(v).map_err(|e| invalid(field, v, e)))
        .collect()
}

fn http(flow: &Flow) -> Option<&crate::proto::flow::Http> {
    match flow.l7.as_ref()?.record.as_ref()? {
        layer7::Record::Http(h) => Some(h),
        layer7::Record::Dns(_) => None,
    }
}

fn dns(flow: &Flow) -> Option<&crate::proto::flow::Dns> {
    match flow.l7.as_ref()?.record.as_ref()? {
        layer7::Record::Dns(d) => Some(d),
        layer7::Record::Http(_) => None,
    }
}

static STATUS_FULL: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[1-5][0-9]{2}$").unwrap_or_else(|e| unreachable!("{e}")));
static STATUS_PREFIX: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[1-5][0-9]?\+$").unwrap_or_else(|e| unreachable!("{e}")));

fn status_check(values: &[String]) -> Result<Check, FilterError> {
    let mut full = Vec::new();
    let mut prefixes = Vec::new();
    for v in values {
        if STATUS_FULL.is_match(v) {
            full.push(v.clone());
        } else if STATUS_PREFIX.is_match(v) {
            prefixes.push(v.trim_end_matches('+').to_owned());
        } else {
            return Err(invalid("http_status_code", v, "invalid status code prefix"));
        }
    }
    Ok(Box::new(move |flow| {
        // Only responses carry a code.
        let Some(code) = http(flow).map(|h| h.code).filter(|&c| c != 0) else {
            return false;
        };
        let code = format!("{code:03}");
        full.contains(&code) || prefixes.iter().any(|p| code.starts_with(p.as_str()))
    }))
}

/// The path of a request URI or absolute URL (Go's `url.ParseRequestURI(..).Path`).
fn url_path(url: &str) -> Option<&str> {
    let rest = if url.starts_with('/') {
        url
    } else {
        let after_scheme = &url[url.find("://")? + 3..];
        &after_scheme[after_scheme.find('/').unwrap_or(after_scheme.len())..]
    };
    let end = rest.find(['?', '#']).unwrap_or(rest.len());
    Some(&rest[..end])
}

fn protocol_check(values: &[String]) -> Result<Check, FilterError> {
    let protocols = values
        .iter()
        .map(|v| {
            let p = v.to_lowercase();
            match p.as_str() {
                "icmp" | "icmpv4" | "icmpv6" | "tcp" | "udp" | "sctp" | "dns" | "http"
                | "kafka" => Ok(p),
                _ => Err(invalid("protocol", v, "unknown protocol")),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Box::new(move |flow| {
        let l4 = flow.l4.as_ref().and_then(|l| l.protocol.as_ref());
        let l7 = flow.l7.as_ref().and_then(|l| l.record.as_ref());
        protocols.iter().any(|p| match p.as_str() {
            "icmp" => matches!(
                l4,
                Some(layer4::Protocol::IcmPv4(_) | layer4::Protocol::IcmPv6(_))
            ),
            "icmpv4" => matches!(l4, Some(layer4::Protocol::IcmPv4(_))),
            "icmpv6" => matches!(l4, Some(layer4::Protocol::IcmPv6(_))),
            "tcp" => matches!(l4, Some(layer4::Protocol::Tcp(_))),
            "udp" => matches!(l4, Some(layer4::Protocol::Udp(_))),
            "sctp" => matches!(l4, Some(layer4::Protocol::Sctp(_))),
            "dns" => matches!(l7, Some(layer7::Record::Dns(_))),
            "http" => matches!(l7, Some(layer7::Record::Http(_))),
            // membrane has no Kafka parser: no flow is Kafka.
            _ => false,
        })
    }))
}

fn tcp_flags_check(values: &[TcpFlags]) -> Check {
    let wanted = values.to_vec();
    Box::new(move |flow| {
        let Some(layer4::Protocol::Tcp(tcp)) = flow.l4.as_ref().and_then(|l| l.protocol.as_ref())
        else {
            return false;
        };
        let Some(f) = tcp.flags.as_ref() else {
            return false;
        };
        // A filter matches when every flag it sets is set on the packet.
        wanted.iter().any(|w| {
            !(w.fin && !f.fin
                || w.syn && !f.syn
                || w.rst && !f.rst
                || w.psh && !f.psh
                || w.ack && !f.ack
                || w.urg && !f.urg
                || w.ece && !f.ece
                || w.cwr && !f.cwr
                || w.ns && !f.ns)
        })
    })
}

/// Hubble's node-name patterns: `[cluster/]node`, each an FQDN pattern. membrane's node names
/// have no cluster part, so a cluster pattern only matches when it is empty or `*`.
fn node_name_check(values: &[String]) -> Result<Check, FilterError> {
    let mut node_patterns = Vec::new();
    for v in values {
        let (cluster, node) = match v.split('/').collect::<Vec<_>>()[..] {
            [node] => ("", node),
            [cluster, node] => (cluster, node),
            _ => return Err(invalid("node_name", v, "too many slashes in pattern")),
        };
        if cluster.is_empty() && node.is_empty() && !v.contains('/') {
            return Err(invalid("node_name", v, "empty pattern"));
        }
        if !(cluster.is_empty() || cluster == "*") {
            continue;
        }
        node_patterns.push(if node.is_empty() {
            "*".to_owned()
        } else {
            node.to_owned()
        });
    }
    let re = if node_patterns.is_empty() {
        None
    } else {
        Some(fqdn_regex("node_name", &node_patterns)?)
    };
    Ok(Box::new(move |flow| {
        re.as_ref().is_some_and(|re| {
            let name = flow.node_name.rsplit('/').next().unwrap_or_default();
            re.is_match(&name.to_lowercase())
        })
    }))
}

fn event_type_compatible_with_http(filter: &FlowFilter) -> bool {
    filter.event_type.is_empty()
        || filter
            .event_type
            .iter()
            .any(|t| t.r#type == monitor_type::ACCESS_LOG)
}

/// Compiles one `FlowFilter`.
pub fn compile(filter: &FlowFilter) -> Result<CompiledFilter, FilterError> {
    let f = filter;
    let unsupported: [(&'static str, bool); 13] = [
        ("uuid", !f.uuid.is_empty()),
        ("source_ip_xlated", !f.source_ip_xlated.is_empty()),
        ("source_service", !f.source_service.is_empty()),
        ("destination_service", !f.destination_service.is_empty()),
        ("source_workload", !f.source_workload.is_empty()),
        ("destination_workload", !f.destination_workload.is_empty()),
        ("source_cluster_name", !f.source_cluster_name.is_empty()),
        (
            "destination_cluster_name",
            !f.destination_cluster_name.is_empty(),
        ),
        ("interface", !f.interface.is_empty()),
        ("node_labels", !f.node_labels.is_empty()),
        ("trace_id", !f.trace_id.is_empty()),
        ("ip_trace_id", !f.ip_trace_id.is_empty()),
        (
            "experimental.cel_expression",
            f.experimental
                .as_ref()
                .is_some_and(|e| !e.cel_expression.is_empty()),
        ),
    ];
    if let Some((field, _)) = unsupported.iter().find(|(_, set)| *set) {
        return Err(FilterError::Unsupported { field });
    }

    let mut checks: Vec<Check> = Vec::new();
    if !f.encrypted.is_empty() {
        // Hubble: the flow's IP.encrypted is one of the values (no IP layer = false).
        let values = f.encrypted.clone();
        checks.push(Box::new(move |flow| {
            values.contains(&flow.ip.as_ref().is_some_and(|ip| ip.encrypted))
        }));
    }
    if !f.source_ip.is_empty() {
        checks.push(ip_check("source_ip", &f.source_ip, Side::Source)?);
    }
    if !f.destination_ip.is_empty() {
        checks.push(ip_check(
            "destination_ip",
            &f.destination_ip,
            Side::Destination,
        )?);
    }
    if !f.source_pod.is_empty() {
        checks.push(pod_check("source_pod", &f.source_pod, Side::Source)?);
    }
    if !f.destination_pod.is_empty() {
        checks.push(pod_check(
            "destination_pod",
            &f.destination_pod,
            Side::Destination,
        )?);
    }
    if !f.source_fqdn.is_empty() {
        checks.push(fqdn_check("source_fqdn", &f.source_fqdn, Side::Source)?);
    }
    if !f.destination_fqdn.is_empty() {
        checks.push(fqdn_check(
            "destination_fqdn",
            &f.destination_fqdn,
            Side::Destination,
        )?);
    }
    if !f.source_label.is_empty() {
        checks.push(label_check("source_label", &f.source_label, Side::Source)?);
    }
    if !f.destination_label.is_empty() {
        checks.push(label_check(
            "destination_label",
            &f.destination_label,
            Side::Destination,
        )?);
    }
    if !f.source_identity.is_empty() {
        checks.push(identity_check(&f.source_identity, Side::Source));
    }
    if !f.destination_identity.is_empty() {
        checks.push(identity_check(&f.destination_identity, Side::Destination));
    }
    if !f.traffic_direction.is_empty() {
        let wanted = f.traffic_direction.clone();
        checks.push(Box::new(move |flow| {
            wanted.contains(&flow.traffic_direction)
        }));
    }
    if !f.verdict.is_empty() {
        let wanted = f.verdict.clone();
        checks.push(Box::new(move |flow| wanted.contains(&flow.verdict)));
    }
    if !f.drop_reason_desc.is_empty() {
        let wanted = f.drop_reason_desc.clone();
        checks.push(Box::new(move |flow| {
            wanted.contains(&flow.drop_reason_desc)
        }));
    }
    if !f.event_type.is_empty() {
        let wanted = f.event_type.clone();
        checks.push(Box::new(move |flow| {
            let (t, st) = flow
                .event_type
                .as_ref()
                .map_or((0, 0), |e| (e.r#type, e.sub_type));
            wanted
                .iter()
                .any(|w| w.r#type == t && (!w.match_sub_type || w.sub_type == st))
        }));
    }
    if !f.protocol.is_empty() {
        checks.push(protocol_check(&f.protocol)?);
    }
    if !f.source_port.is_empty() {
        checks.push(port_check("source_port", &f.source_port, Side::Source)?);
    }
    if !f.destination_port.is_empty() {
        checks.push(port_check(
            "destination_port",
            &f.destination_port,
            Side::Destination,
        )?);
    }
    if !f.reply.is_empty() {
        let wanted = f.reply.clone();
        checks.push(Box::new(move |flow| {
            // Hubble treats an unknown direction as "not a reply" for drops only, for
            // clients that still filter on the deprecated `reply` field.
            let reply = match flow.is_reply {
                Some(r) => r,
                None if flow.verdict == crate::proto::flow::Verdict::Dropped as i32 => false,
                None => return false,
            };
            wanted.contains(&reply)
        }));
    }
    if !f.dns_query.is_empty() {
        let res = regexes("dns_query", &f.dns_query)?;
        checks.push(Box::new(move |flow| {
            dns(flow).is_some_and(|d| res.iter().any(|re| re.is_match(&d.query)))
        }));
    }
    let http_fields = !f.http_status_code.is_empty()
        || !f.http_method.is_empty()
        || !f.http_path.is_empty()
        || !f.http_url.is_empty()
        || !f.http_header.is_empty();
    if http_fields && !event_type_compatible_with_http(f) {
        return Err(invalid(
            "event_type",
            "",
            "filtering by http fields requires the event type filter to match 'l7' events",
        ));
    }
    if !f.http_status_code.is_empty() {
        checks.push(status_check(&f.http_status_code)?);
    }
    if !f.http_method.is_empty() {
        let wanted = f.http_method.clone();
        checks.push(Box::new(move |flow| {
            http(flow).is_some_and(|h| {
                !h.method.is_empty() && wanted.iter().any(|m| m.eq_ignore_ascii_case(&h.method))
            })
        }));
    }
    if !f.http_path.is_empty() {
        let res = regexes("http_path", &f.http_path)?;
        checks.push(Box::new(move |flow| {
            http(flow)
                .and_then(|h| url_path(&h.url))
                .is_some_and(|path| res.iter().any(|re| re.is_match(path)))
        }));
    }
    if !f.http_url.is_empty() {
        let res = regexes("http_url", &f.http_url)?;
        checks.push(Box::new(move |flow| {
            http(flow)
                .is_some_and(|h| !h.url.is_empty() && res.iter().any(|re| re.is_match(&h.url)))
        }));
    }
    if !f.http_header.is_empty() {
        let wanted: Vec<(String, String)> = f
            .http_header
            .iter()
            .map(|h| (h.key.clone(), h.value.clone()))
            .collect();
        checks.push(Box::new(move |flow| {
            http(flow).is_some_and(|h| {
                h.headers.iter().any(|have| {
                    wanted
                        .iter()
                        .any(|(k, v)| have.key.eq_ignore_ascii_case(k) && have.value == *v)
                })
            })
        }));
    }
    if !f.tcp_flags.is_empty() {
        checks.push(tcp_flags_check(&f.tcp_flags));
    }
    if !f.node_name.is_empty() {
        checks.push(node_name_check(&f.node_name)?);
    }
    if !f.ip_version.is_empty() {
        let wanted = f.ip_version.clone();
        checks.push(Box::new(move |flow| {
            flow.ip
                .as_ref()
                .is_some_and(|ip| wanted.contains(&ip.ip_version))
        }));
    }
    Ok(CompiledFilter { checks })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::tests::{datapath, dns as dns_record, enricher, http as http_record};
    use crate::convert::to_flow;
    use crate::input::{
        DatapathEventKind, DatapathVerdict, Direction, FlowInput, L7Kind, L7Verdict,
    };
    use crate::proto::flow::{EventTypeFilter, TrafficDirection, Verdict};

    /// A small, varied set of flows: name → flow.
    fn flows() -> Vec<(&'static str, Flow)> {
        let e = enricher();
        let conv = |i: FlowInput| to_flow(&i, &e, "node-1");
        let mut drop_world = datapath(DatapathEventKind::Drop, DatapathVerdict::Dropped);
        drop_world.dst = "203.0.113.7".parse().expect("ip");
        drop_world.dst_identity = 16_777_217;
        drop_world.dport = 443;
        let mut ingress_trace = datapath(DatapathEventKind::Trace, DatapathVerdict::Forwarded);
        ingress_trace.direction = Direction::Ingress;
        ingress_trace.is_reply = Some(true);
        ingress_trace.protocol = 17;
        vec![
            (
                "verdict",
                conv(FlowInput::Datapath(datapath(
                    DatapathEventKind::PolicyVerdict,
                    DatapathVerdict::Forwarded,
                ))),
            ),
            ("drop_world", conv(FlowInput::Datapath(drop_world))),
            ("ingress_trace", conv(FlowInput::Datapath(ingress_trace))),
            (
                "http_req",
                conv(FlowInput::Http(http_record(
                    L7Kind::Request,
                    L7Verdict::Forwarded,
                    None,
                ))),
            ),
            (
                "http_404",
                conv(FlowInput::Http(http_record(
                    L7Kind::Response,
                    L7Verdict::Forwarded,
                    Some(404),
                ))),
            ),
            (
                "dns_query",
                conv(FlowInput::Dns(dns_record(
                    L7Kind::Request,
                    L7Verdict::Forwarded,
                ))),
            ),
        ]
    }

    fn matching(whitelist: &[FlowFilter], blacklist: &[FlowFilter]) -> Vec<&'static str> {
        let filters = FlowFilters::new(whitelist, blacklist).expect("filters compile");
        flows()
            .into_iter()
            .filter(|(_, f)| filters.matches(f))
            .map(|(n, _)| n)
            .collect()
    }

    fn ff() -> FlowFilter {
        FlowFilter::default()
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    const ALL: [&str; 6] = [
        "verdict",
        "drop_world",
        "ingress_trace",
        "http_req",
        "http_404",
        "dns_query",
    ];

    /// Name, whitelist, blacklist, the flows that pass.
    type Case = (
        &'static str,
        Vec<FlowFilter>,
        Vec<FlowFilter>,
        Vec<&'static str>,
    );

    #[test]
    fn filter_table() {
        let cases: Vec<Case> = vec![
            ("empty whitelist passes all", vec![], vec![], ALL.to_vec()),
            (
                "source ip exact",
                vec![FlowFilter {
                    source_ip: s(&["10.0.0.2"]),
                    ..ff()
                }],
                vec![],
                vec!["http_404"],
            ),
            (
                "destination cidr",
                vec![FlowFilter {
                    destination_ip: s(&["203.0.113.0/24"]),
                    ..ff()
                }],
                vec![],
                vec!["drop_world"],
            ),
            (
                "OR within a field",
                vec![FlowFilter {
                    destination_ip: s(&["203.0.113.0/24", "10.96.0.10"]),
                    ..ff()
                }],
                vec![],
                vec!["drop_world", "dns_query"],
            ),
            (
                "AND across fields",
                vec![FlowFilter {
                    source_ip: s(&["10.0.0.1"]),
                    verdict: vec![Verdict::Dropped as i32],
                    ..ff()
                }],
                vec![],
                vec!["drop_world"],
            ),
            (
                "OR across filters",
                vec![
                    FlowFilter {
                        verdict: vec![Verdict::Dropped as i32],
                        ..ff()
                    },
                    FlowFilter {
                        protocol: s(&["dns"]),
                        ..ff()
                    },
                ],
                vec![],
                vec!["drop_world", "dns_query"],
            ),
            (
                "blacklist excludes",
                vec![],
                vec![FlowFilter {
                    protocol: s(&["http"]),
                    ..ff()
                }],
                vec!["verdict", "drop_world", "ingress_trace", "dns_query"],
            ),
            (
                "namespace via pod filter",
                vec![FlowFilter {
                    source_pod: s(&["prod/"]),
                    ..ff()
                }],
                vec![],
                vec!["http_404"],
            ),
            (
                "pod prefix",
                vec![FlowFilter {
                    destination_pod: s(&["prod/backend-"]),
                    ..ff()
                }],
                vec![],
                vec!["verdict", "ingress_trace", "http_req"],
            ),
            (
                "pod in any namespace",
                vec![FlowFilter {
                    source_pod: s(&["/frontend"]),
                    ..ff()
                }],
                vec![],
                vec![
                    "verdict",
                    "drop_world",
                    "ingress_trace",
                    "http_req",
                    "dns_query",
                ],
            ),
            (
                "`/` is any pod (hubble observe --all-namespaces)",
                vec![FlowFilter {
                    destination_pod: s(&["/"]),
                    ..ff()
                }],
                vec![],
                vec!["verdict", "ingress_trace", "http_req", "http_404"],
            ),
            (
                "encrypted: membrane's flows never are",
                vec![FlowFilter {
                    encrypted: vec![true],
                    ..ff()
                }],
                vec![],
                vec![],
            ),
            (
                "unencrypted: every flow",
                vec![FlowFilter {
                    encrypted: vec![false],
                    ..ff()
                }],
                vec![],
                ALL.to_vec(),
            ),
            (
                "labels selector",
                vec![FlowFilter {
                    destination_label: s(&["app=backend,tier in (api)"]),
                    ..ff()
                }],
                vec![],
                vec!["verdict", "ingress_trace", "http_req"],
            ),
            (
                "reserved label",
                vec![FlowFilter {
                    destination_label: s(&["reserved:world"]),
                    ..ff()
                }],
                vec![],
                vec!["drop_world"],
            ),
            (
                "identity",
                vec![FlowFilter {
                    destination_identity: vec![16_777_217],
                    ..ff()
                }],
                vec![],
                vec!["drop_world"],
            ),
            (
                "event type with sub type",
                vec![FlowFilter {
                    event_type: vec![EventTypeFilter {
                        r#type: 4,
                        match_sub_type: true,
                        sub_type: 0,
                    }],
                    ..ff()
                }],
                vec![],
                vec!["ingress_trace"],
            ),
            (
                "event type l7",
                vec![FlowFilter {
                    event_type: vec![EventTypeFilter {
                        r#type: 129,
                        ..EventTypeFilter::default()
                    }],
                    ..ff()
                }],
                vec![],
                vec!["http_req", "http_404", "dns_query"],
            ),
            (
                "tcp matches L7 http too",
                vec![FlowFilter {
                    protocol: s(&["TCP"]),
                    ..ff()
                }],
                vec![],
                vec!["verdict", "drop_world", "http_req", "http_404"],
            ),
            (
                "destination port",
                vec![FlowFilter {
                    destination_port: s(&["443", "53"]),
                    ..ff()
                }],
                vec![],
                vec!["drop_world", "dns_query"],
            ),
            (
                "http method case-insensitive",
                vec![FlowFilter {
                    http_method: s(&["get"]),
                    ..ff()
                }],
                vec![],
                vec!["http_req", "http_404"],
            ),
            (
                "http path regex",
                vec![FlowFilter {
                    http_path: s(&["^/api/v[0-9]+/items$"]),
                    ..ff()
                }],
                vec![],
                vec!["http_req", "http_404"],
            ),
            (
                "http status prefix",
                vec![FlowFilter {
                    http_status_code: s(&["4+"]),
                    ..ff()
                }],
                vec![],
                vec!["http_404"],
            ),
            (
                "http status exact miss",
                vec![FlowFilter {
                    http_status_code: s(&["200"]),
                    ..ff()
                }],
                vec![],
                vec![],
            ),
            (
                "dns query regex",
                vec![FlowFilter {
                    dns_query: s(&["example\\.com"]),
                    ..ff()
                }],
                vec![],
                vec!["dns_query"],
            ),
            (
                "traffic direction",
                vec![FlowFilter {
                    traffic_direction: vec![TrafficDirection::Ingress as i32],
                    ..ff()
                }],
                vec![],
                vec!["ingress_trace"],
            ),
            (
                "reply true",
                vec![FlowFilter {
                    reply: vec![true],
                    ..ff()
                }],
                vec![],
                vec!["ingress_trace", "http_404"],
            ),
            (
                "reply false includes drops with unknown direction",
                vec![FlowFilter {
                    reply: vec![false],
                    ..ff()
                }],
                vec![],
                vec!["verdict", "drop_world", "http_req", "dns_query"],
            ),
            (
                "fqdn wildcard",
                vec![FlowFilter {
                    destination_fqdn: s(&["*.example.com"]),
                    ..ff()
                }],
                vec![],
                vec!["drop_world"],
            ),
            (
                "node name",
                vec![FlowFilter {
                    node_name: s(&["node-*"]),
                    ..ff()
                }],
                vec![],
                ALL.to_vec(),
            ),
            (
                "tcp flags subset",
                vec![FlowFilter {
                    tcp_flags: vec![TcpFlags {
                        syn: true,
                        ..TcpFlags::default()
                    }],
                    ..ff()
                }],
                vec![],
                vec!["verdict", "drop_world"],
            ),
            (
                "drop reason desc",
                vec![FlowFilter {
                    drop_reason_desc: vec![133],
                    ..ff()
                }],
                vec![],
                vec!["drop_world"],
            ),
        ];
        for (name, whitelist, blacklist, want) in cases {
            assert_eq!(matching(&whitelist, &blacklist), want, "case {name:?}");
        }
    }

    #[test]
    fn invalid_and_unsupported_filters_are_refused() {
        let bad = [
            FlowFilter {
                source_ip: s(&["10.0.0.300"]),
                ..ff()
            },
            FlowFilter {
                source_ip: s(&["10.0.0.0/33"]),
                ..ff()
            },
            FlowFilter {
                source_port: s(&["http"]),
                ..ff()
            },
            FlowFilter {
                protocol: s(&["quic"]),
                ..ff()
            },
            FlowFilter {
                http_status_code: s(&["6+"]),
                ..ff()
            },
            FlowFilter {
                http_path: s(&["("]),
                ..ff()
            },
            FlowFilter {
                source_pod: s(&[""]),
                ..ff()
            },
            FlowFilter {
                source_label: s(&["app in (a"]),
                ..ff()
            },
            FlowFilter {
                http_method: s(&["GET"]),
                event_type: vec![EventTypeFilter {
                    r#type: 1,
                    ..EventTypeFilter::default()
                }],
                ..ff()
            },
        ];
        for filter in bad {
            assert!(
                matches!(compile(&filter), Err(FilterError::Invalid { .. })),
                "{filter:?} should be invalid"
            );
        }
        let unsupported = FlowFilter {
            source_workload: vec![crate::proto::flow::Workload::default()],
            ..ff()
        };
        assert_eq!(
            compile(&unsupported).err(),
            Some(FilterError::Unsupported {
                field: "source_workload"
            })
        );
    }

    #[test]
    fn url_paths() {
        assert_eq!(url_path("http://h:80/a/b?c#d"), Some("/a/b"));
        assert_eq!(url_path("http://h"), Some(""));
        assert_eq!(url_path("/x?y"), Some("/x"));
        assert_eq!(url_path("nonsense"), None);
    }
}
