//! [`FlowInput`] → Hubble `flow.Flow`, filled the way Hubble's parsers fill it
//! (`pkg/hubble/parser/threefour` for datapath events, `pkg/hubble/parser/seven` for
//! access records), including the `Summary` string the CLI prints.

use std::net::{IpAddr, SocketAddr};

use crate::enrich::{Enricher, reserved_identity_label};
use crate::input::{
    DatapathEvent, DatapathEventKind, DatapathVerdict, Direction, DnsObservationSource, DnsRecord,
    FlowInput, HttpRecord, L7Kind, L7Verdict, ObservationPoint, PolicyRef,
};
use crate::names;
use crate::proto::flow::{
    self as pb, CiliumEventType, Endpoint, Flow, FlowType, IpVersion, L7FlowType, Layer4, Layer7,
    TraceObservationPoint, TrafficDirection, Verdict, layer4, layer7,
};
use crate::timefmt::timestamp;

/// Cilium monitor message types (`event_type.type`).
pub mod monitor_type {
    pub const DROP: i32 = 1;
    pub const DEBUG: i32 = 2;
    pub const CAPTURE: i32 = 3;
    pub const TRACE: i32 = 4;
    pub const POLICY_VERDICT: i32 = 5;
    pub const TRACE_SOCK: i32 = 7;
    pub const ACCESS_LOG: i32 = 129;
    pub const AGENT: i32 = 130;
}

/// The label that carries a pod's namespace in its identity labels.
pub const NAMESPACE_LABEL_PREFIX: &str = "k8s:io.kubernetes.pod.namespace=";

const PROTO_ICMP: u8 = 1;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_ICMPV6: u8 = 58;
const PROTO_SCTP: u8 = 132;

/// Builds the Hubble flow for one input.
pub fn to_flow(input: &FlowInput, enricher: &dyn Enricher, node_name: &str) -> Flow {
    match input {
        FlowInput::Datapath(ev) => datapath_flow(ev, enricher, node_name),
        FlowInput::Http(rec) => http_flow(rec, enricher, node_name),
        FlowInput::Dns(rec) => dns_flow(rec, enricher, node_name),
    }
}

fn traffic_direction(direction: Direction) -> TrafficDirection {
    match direction {
        Direction::Ingress => TrafficDirection::Ingress,
        Direction::Egress => TrafficDirection::Egress,
    }
}

fn ip(src: IpAddr, dst: IpAddr) -> pb::Ip {
    let ip_version = if src.is_ipv6() {
        IpVersion::IPv6
    } else {
        IpVersion::IPv4
    };
    pb::Ip {
        source: ip_text(src),
        destination: ip_text(dst),
        ip_version: ip_version as i32,
        // No transparent encryption (IPsec/WireGuard) on membrane's datapath.
        encrypted: false,
    }
}

/// `ip` as text (as `Display` writes it), without the formatting machinery for IPv4, which
/// every datapath flow needs twice.
fn ip_text(ip: IpAddr) -> String {
    let IpAddr::V4(v4) = ip else {
        return ip.to_string();
    };
    let mut out = String::with_capacity(15);
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        if octet >= 100 {
            out.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            out.push(char::from(b'0' + octet / 10 % 10));
        }
        out.push(char::from(b'0' + octet % 10));
    }
    out
}

/// Hubble's endpoint: the local endpoint id when known, the identity from the event, and
/// labels/namespace/pod from enrichment (identity labels when the address is unknown).
fn endpoint(enricher: &dyn Enricher, ip: IpAddr, identity: u32, local_id: u32) -> Endpoint {
    let meta = enricher.endpoint(ip).unwrap_or_default();
    let mut labels = meta.labels;
    if labels.is_empty() {
        labels = enricher.identity_labels(identity);
    }
    if labels.is_empty() {
        labels.extend(reserved_identity_label(identity));
    }
    labels.sort();
    labels.dedup();
    let namespace = if meta.namespace.is_empty() {
        labels
            .iter()
            .find_map(|l| l.strip_prefix(NAMESPACE_LABEL_PREFIX))
            .unwrap_or_default()
            .to_owned()
    } else {
        meta.namespace
    };
    Endpoint {
        id: if local_id != 0 { local_id } else { meta.id },
        identity,
        namespace,
        labels,
        pod_name: meta.pod_name,
    }
}

fn service(enricher: &dyn Enricher, ip: IpAddr, port: u16) -> Option<pb::Service> {
    enricher.service(ip, port).map(|s| pb::Service {
        name: s.name,
        namespace: s.namespace,
    })
}

fn policy(p: &PolicyRef) -> pb::Policy {
    pb::Policy {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        labels: p.labels.clone(),
        revision: p.revision,
        kind: p.kind.clone(),
    }
}

/// Files the policy under `{egress,ingress}_{allowed,denied}_by`.
fn attach_policy(flow: &mut Flow, p: Option<&PolicyRef>, direction: Direction, denied: bool) {
    let Some(p) = p else { return };
    let list = match (direction, denied) {
        (Direction::Egress, false) => &mut flow.egress_allowed_by,
        (Direction::Ingress, false) => &mut flow.ingress_allowed_by,
        (Direction::Egress, true) => &mut flow.egress_denied_by,
        (Direction::Ingress, true) => &mut flow.ingress_denied_by,
    };
    list.push(policy(p));
}

fn tcp_flags(raw: u8) -> pb::TcpFlags {
    pb::TcpFlags {
        fin: raw & 0x01 != 0,
        syn: raw & 0x02 != 0,
        rst: raw & 0x04 != 0,
        psh: raw & 0x08 != 0,
        ack: raw & 0x10 != 0,
        urg: raw & 0x20 != 0,
        ece: raw & 0x40 != 0,
        cwr: raw & 0x80 != 0,
        ns: false,
    }
}

/// The flag list of Hubble's `TCP Flags: …` summary, in Hubble's order.
pub fn tcp_flags_text(f: &pb::TcpFlags) -> String {
    let flags = [
        (f.syn, "SYN"),
        (f.ack, "ACK"),
        (f.rst, "RST"),
        (f.fin, "FIN"),
        (f.psh, "PSH"),
        (f.urg, "URG"),
        (f.ece, "ECE"),
        (f.cwr, "CWR"),
        (f.ns, "NS"),
    ];
    flags
        .iter()
        .filter(|(set, _)| *set)
        .map(|(_, name)| *name)
        .collect::<Vec<_>>()
        .join(", ")
}

fn l3l4_summary(l4: Option<&Layer4>, has_ip: bool, ipv6: bool) -> String {
    match l4.and_then(|l4| l4.protocol.as_ref()) {
        Some(layer4::Protocol::Tcp(tcp)) => format!(
            "TCP Flags: {}",
            tcp.flags.as_ref().map(tcp_flags_text).unwrap_or_default()
        ),
        Some(layer4::Protocol::Udp(_)) => "UDP".to_owned(),
        Some(layer4::Protocol::Sctp(_)) => "SCTP".to_owned(),
        Some(layer4::Protocol::IcmPv4(icmp)) => format!(
            "ICMPv4 {}",
            names::icmpv4_type_code(
                u8::try_from(icmp.r#type).unwrap_or(u8::MAX),
                u8::try_from(icmp.code).unwrap_or(u8::MAX)
            )
        ),
        Some(layer4::Protocol::IcmPv6(icmp)) => format!(
            "ICMPv6 {}",
            names::icmpv6_type_code(
                u8::try_from(icmp.r#type).unwrap_or(u8::MAX),
                u8::try_from(icmp.code).unwrap_or(u8::MAX)
            )
        ),
        // Hubble summarises by the last decoded layer.
        None if has_ip && ipv6 => "IPv6".to_owned(),
        None if has_ip => "IPv4".to_owned(),
        None => String::new(),
    }
}

fn datapath_l4(ev: &DatapathEvent) -> Option<Layer4> {
    let protocol = match ev.protocol {
        PROTO_TCP => layer4::Protocol::Tcp(pb::Tcp {
            source_port: ev.sport.into(),
            destination_port: ev.dport.into(),
            flags: Some(tcp_flags(ev.tcp_flags)),
        }),
        PROTO_UDP => layer4::Protocol::Udp(pb::Udp {
            source_port: ev.sport.into(),
            destination_port: ev.dport.into(),
        }),
        PROTO_SCTP => layer4::Protocol::Sctp(pb::Sctp {
            source_port: ev.sport.into(),
            destination_port: ev.dport.into(),
        }),
        PROTO_ICMP => layer4::Protocol::IcmPv4(pb::IcmPv4 {
            r#type: ev.dport.into(),
            code: ev.icmp_code.into(),
        }),
        PROTO_ICMPV6 => layer4::Protocol::IcmPv6(pb::IcmPv6 {
            r#type: ev.dport.into(),
            code: ev.icmp_code.into(),
        }),
        _ => return None,
    };
    Some(Layer4 {
        protocol: Some(protocol),
    })
}

fn trace_point(point: ObservationPoint) -> TraceObservationPoint {
    match point {
        ObservationPoint::ToEndpoint => TraceObservationPoint::ToEndpoint,
        ObservationPoint::ToProxy => TraceObservationPoint::ToProxy,
        ObservationPoint::ToHost => TraceObservationPoint::ToHost,
        ObservationPoint::ToStack => TraceObservationPoint::ToStack,
        ObservationPoint::ToOverlay => TraceObservationPoint::ToOverlay,
        ObservationPoint::FromEndpoint => TraceObservationPoint::FromEndpoint,
        ObservationPoint::FromProxy => TraceObservationPoint::FromProxy,
        ObservationPoint::FromHost => TraceObservationPoint::FromHost,
        ObservationPoint::FromStack => TraceObservationPoint::FromStack,
        ObservationPoint::FromOverlay => TraceObservationPoint::FromOverlay,
        ObservationPoint::FromNetwork => TraceObservationPoint::FromNetwork,
        ObservationPoint::ToNetwork => TraceObservationPoint::ToNetwork,
    }
}

fn datapath_flow(ev: &DatapathEvent, enricher: &dyn Enricher, node_name: &str) -> Flow {
    let verdict = match ev.verdict {
        DatapathVerdict::Forwarded => Verdict::Forwarded,
        DatapathVerdict::Dropped => Verdict::Dropped,
        DatapathVerdict::Redirected => Verdict::Redirected,
    };
    let dropped = verdict == Verdict::Dropped;
    let drop_reason = if dropped {
        ev.drop_reason.map_or(0, u32::from)
    } else {
        0
    };
    let has_ip = !(ev.src.is_unspecified() && ev.dst.is_unspecified());
    let l4 = datapath_l4(ev);
    let (src_local, dst_local) = match ev.direction {
        Direction::Egress => (ev.endpoint_id, 0),
        Direction::Ingress => (0, ev.endpoint_id),
    };
    let observation_point = ev.observation_point.unwrap_or(match ev.direction {
        Direction::Egress => ObservationPoint::FromEndpoint,
        Direction::Ingress => ObservationPoint::ToEndpoint,
    });
    let (event_type, sub_type) = match ev.kind {
        DatapathEventKind::Drop => (
            monitor_type::DROP,
            i32::try_from(drop_reason).unwrap_or_default(),
        ),
        DatapathEventKind::Trace => (monitor_type::TRACE, observation_point.monitor_sub_type()),
        DatapathEventKind::PolicyVerdict => (monitor_type::POLICY_VERDICT, 0),
    };
    // Hubble: forwarded policy verdicts are first packets, so not replies; other events
    // are only known when the datapath says so.
    let is_reply = ev
        .is_reply
        .or((ev.kind == DatapathEventKind::PolicyVerdict && !dropped).then_some(false));

    let mut flow = Flow {
        time: Some(timestamp(ev.time)),
        verdict: verdict as i32,
        drop_reason,
        drop_reason_desc: i32::try_from(drop_reason).unwrap_or_default(),
        ip: has_ip.then(|| ip(ev.src, ev.dst)),
        source: Some(endpoint(enricher, ev.src, ev.src_identity, src_local)),
        destination: Some(endpoint(enricher, ev.dst, ev.dst_identity, dst_local)),
        r#type: FlowType::L3L4 as i32,
        node_name: node_name.to_owned(),
        source_names: if has_ip {
            enricher.dns_names(ev.endpoint_id, ev.src)
        } else {
            Vec::new()
        },
        destination_names: if has_ip {
            enricher.dns_names(ev.endpoint_id, ev.dst)
        } else {
            Vec::new()
        },
        reply: is_reply.unwrap_or(false),
        event_type: Some(CiliumEventType {
            r#type: event_type,
            sub_type,
        }),
        source_service: has_ip
            .then(|| service(enricher, ev.src, ev.sport))
            .flatten(),
        destination_service: has_ip
            .then(|| service(enricher, ev.dst, ev.dport))
            .flatten(),
        traffic_direction: traffic_direction(ev.direction) as i32,
        policy_match_type: if ev.kind == DatapathEventKind::PolicyVerdict {
            ev.match_type.into()
        } else {
            0
        },
        trace_observation_point: if ev.kind == DatapathEventKind::Trace {
            trace_point(observation_point) as i32
        } else {
            0
        },
        is_reply,
        interface: (ev.kind == DatapathEventKind::Trace && ev.ifindex != 0).then(|| {
            pb::NetworkInterface {
                index: ev.ifindex,
                name: String::new(),
            }
        }),
        proxy_port: ev.proxy_port.map_or(0, u32::from),
        summary: l3l4_summary(l4.as_ref(), has_ip, ev.src.is_ipv6()),
        l4,
        ..Flow::default()
    };
    if ev.kind == DatapathEventKind::PolicyVerdict {
        attach_policy(&mut flow, ev.policy.as_ref(), ev.direction, dropped);
    }
    flow
}

fn l7_verdict(v: L7Verdict) -> Verdict {
    match v {
        L7Verdict::Forwarded => Verdict::Forwarded,
        L7Verdict::Denied => Verdict::Dropped,
        L7Verdict::Redirected => Verdict::Redirected,
        L7Verdict::Error => Verdict::Error,
    }
}

/// Source and destination of an L7 flow: requests go client → server; responses are
/// reported server → client, as Cilium's access log does (the CLI flips replies back).
fn l7_endpoints(
    kind: L7Kind,
    client: SocketAddr,
    server: SocketAddr,
    client_identity: u32,
    server_identity: u32,
) -> ((SocketAddr, u32), (SocketAddr, u32)) {
    match kind {
        L7Kind::Request => ((client, client_identity), (server, server_identity)),
        L7Kind::Response => ((server, server_identity), (client, client_identity)),
    }
}

struct L7Common<'a> {
    time: std::time::SystemTime,
    kind: L7Kind,
    verdict: L7Verdict,
    client: SocketAddr,
    server: SocketAddr,
    client_identity: u32,
    server_identity: u32,
    endpoint_id: u32,
    direction: Direction,
    policy: Option<&'a PolicyRef>,
}

fn l7_flow(c: &L7Common<'_>, l4: Layer4, enricher: &dyn Enricher, node_name: &str) -> Flow {
    let ((src, src_id), (dst, dst_id)) = l7_endpoints(
        c.kind,
        c.client,
        c.server,
        c.client_identity,
        c.server_identity,
    );
    // The local endpoint is the client on egress and the server on ingress.
    let local = match c.direction {
        Direction::Egress => c.client,
        Direction::Ingress => c.server,
    };
    let local_id = |addr: SocketAddr| if addr == local { c.endpoint_id } else { 0 };
    let is_reply = c.kind == L7Kind::Response;
    let verdict = l7_verdict(c.verdict);
    let mut flow = Flow {
        time: Some(timestamp(c.time)),
        verdict: verdict as i32,
        ip: Some(ip(src.ip(), dst.ip())),
        l4: Some(l4),
        source: Some(endpoint(enricher, src.ip(), src_id, local_id(src))),
        destination: Some(endpoint(enricher, dst.ip(), dst_id, local_id(dst))),
        r#type: FlowType::L7 as i32,
        node_name: node_name.to_owned(),
        source_names: enricher.dns_names(c.endpoint_id, src.ip()),
        destination_names: enricher.dns_names(c.endpoint_id, dst.ip()),
        reply: is_reply,
        event_type: Some(CiliumEventType {
            r#type: monitor_type::ACCESS_LOG,
            sub_type: 0,
        }),
        source_service: service(enricher, src.ip(), src.port()),
        destination_service: service(enricher, dst.ip(), dst.port()),
        traffic_direction: traffic_direction(c.direction) as i32,
        is_reply: Some(is_reply),
        ..Flow::default()
    };
    attach_policy(
        &mut flow,
        c.policy,
        c.direction,
        verdict == Verdict::Dropped,
    );
    flow
}

fn l7_type(kind: L7Kind) -> L7FlowType {
    match kind {
        L7Kind::Request => L7FlowType::Request,
        L7Kind::Response => L7FlowType::Response,
    }
}

fn latency_ns(latency: Option<std::time::Duration>) -> u64 {
    latency.map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Replaces the password of a URL's userinfo with `HUBBLE_REDACTED`, as Hubble does.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let authority_start = scheme_end + 3;
    let rest = &url[authority_start..];
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_len];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &authority[..at];
    let Some(colon) = userinfo.find(':') else {
        return url.to_owned();
    };
    format!(
        "{}{}:HUBBLE_REDACTED{}",
        &url[..authority_start],
        &userinfo[..colon],
        &url[authority_start + at..]
    )
}

fn http_flow(rec: &HttpRecord, enricher: &dyn Enricher, node_name: &str) -> Flow {
    let ((src, _), (dst, _)) = l7_endpoints(
        rec.kind,
        rec.client,
        rec.server,
        rec.client_identity,
        rec.server_identity,
    );
    let l4 = Layer4 {
        protocol: Some(layer4::Protocol::Tcp(pb::Tcp {
            source_port: src.port().into(),
            destination_port: dst.port().into(),
            flags: None,
        })),
    };
    let common = L7Common {
        time: rec.time,
        kind: rec.kind,
        verdict: rec.verdict,
        client: rec.client,
        server: rec.server,
        client_identity: rec.client_identity,
        server_identity: rec.server_identity,
        endpoint_id: rec.endpoint_id,
        direction: rec.direction,
        policy: rec.policy.as_ref(),
    };
    let mut flow = l7_flow(&common, l4, enricher, node_name);
    let url = redact_url(&rec.url);
    let code = match rec.kind {
        L7Kind::Request => 0,
        L7Kind::Response => rec.status.map_or(0, u32::from),
    };
    let latency = match rec.kind {
        L7Kind::Request => 0,
        L7Kind::Response => latency_ns(rec.latency),
    };
    flow.summary = match rec.kind {
        L7Kind::Request => format!("{} {} {}", rec.protocol, rec.method, url),
        L7Kind::Response => format!(
            "{} {} {}ms ({} {})",
            rec.protocol,
            code,
            latency / 1_000_000,
            rec.method,
            url
        ),
    };
    flow.l7 = Some(Layer7 {
        r#type: l7_type(rec.kind) as i32,
        latency_ns: latency,
        record: Some(layer7::Record::Http(pb::Http {
            code,
            method: rec.method.clone(),
            url,
            protocol: rec.protocol.clone(),
            headers: rec
                .headers
                .iter()
                .map(|(key, value)| pb::HttpHeader {
                    key: key.clone(),
                    value: value.clone(),
                })
                .collect(),
        })),
    });
    flow
}

fn dns_observation_source(source: DnsObservationSource) -> &'static str {
    match source {
        DnsObservationSource::Proxy => "proxy",
    }
}

/// Hubble's DNS summary (`pkg/hubble/parser/seven/dns.go`).
fn dns_summary(rec: &DnsRecord) -> String {
    let qtypes = rec
        .qtypes
        .iter()
        .map(|&t| names::dns_type_name(t))
        .collect::<Vec<_>>()
        .join(",");
    match rec.kind {
        L7Kind::Request => format!("DNS Query {} {}", rec.query, qtypes),
        L7Kind::Response => {
            let answer = if rec.rcode != 0 {
                let rcode = u32::from(rec.rcode);
                format!(
                    "RCode: {}",
                    names::dns_rcode_name(rcode).map_or_else(|| rcode.to_string(), str::to_owned)
                )
            } else {
                let mut parts = Vec::new();
                if !rec.ips.is_empty() {
                    let ips = rec
                        .ips
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(",");
                    parts.push(format!("{ips:?}"));
                }
                if !rec.cnames.is_empty() {
                    parts.push(format!("CNAMEs: {:?}", rec.cnames.join(",")));
                }
                parts.join(" ")
            };
            let source = match rec.observation_source {
                DnsObservationSource::Proxy => "Proxy",
            };
            format!(
                "DNS Answer {answer} TTL: {} ({source} {} {qtypes})",
                rec.ttl, rec.query
            )
        }
    }
}

fn dns_flow(rec: &DnsRecord, enricher: &dyn Enricher, node_name: &str) -> Flow {
    let ((src, _), (dst, _)) = l7_endpoints(
        rec.kind,
        rec.client,
        rec.server,
        rec.client_identity,
        rec.server_identity,
    );
    let protocol = if rec.protocol == PROTO_TCP {
        layer4::Protocol::Tcp(pb::Tcp {
            source_port: src.port().into(),
            destination_port: dst.port().into(),
            flags: None,
        })
    } else {
        layer4::Protocol::Udp(pb::Udp {
            source_port: src.port().into(),
            destination_port: dst.port().into(),
        })
    };
    let common = L7Common {
        time: rec.time,
        kind: rec.kind,
        verdict: rec.verdict,
        client: rec.client,
        server: rec.server,
        client_identity: rec.client_identity,
        server_identity: rec.server_identity,
        endpoint_id: rec.endpoint_id,
        direction: rec.direction,
        policy: rec.policy.as_ref(),
    };
    let mut flow = l7_flow(
        &common,
        Layer4 {
            protocol: Some(protocol),
        },
        enricher,
        node_name,
    );
    let qtypes = rec
        .qtypes
        .iter()
        .map(|&t| names::dns_type_name(t).to_owned())
        .collect();
    let dns = match rec.kind {
        // Hubble sets only what a request has.
        L7Kind::Request => pb::Dns {
            query: rec.query.clone(),
            observation_source: dns_observation_source(rec.observation_source).to_owned(),
            qtypes,
            ..pb::Dns::default()
        },
        L7Kind::Response => pb::Dns {
            query: rec.query.clone(),
            ips: rec.ips.iter().map(ToString::to_string).collect(),
            ttl: rec.ttl,
            cnames: rec.cnames.clone(),
            observation_source: dns_observation_source(rec.observation_source).to_owned(),
            rcode: rec.rcode.into(),
            qtypes,
            rrtypes: rec
                .rrtypes
                .iter()
                .map(|&t| names::dns_type_name(t).to_owned())
                .collect(),
        },
    };
    flow.summary = dns_summary(rec);
    flow.l7 = Some(Layer7 {
        r#type: l7_type(rec.kind) as i32,
        latency_ns: match rec.kind {
            L7Kind::Request => 0,
            L7Kind::Response => latency_ns(rec.latency),
        },
        record: Some(layer7::Record::Dns(dns)),
    });
    flow
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::{Duration, SystemTime};

    #[test]
    fn ip_text_writes_what_display_writes() {
        for text in [
            "0.0.0.0",
            "10.200.0.11",
            "255.255.255.255",
            "192.0.2.100",
            "1.20.3.40",
            "::1",
            "fd00::a",
        ] {
            let ip: IpAddr = text.parse().expect("an address");
            assert_eq!(ip_text(ip), ip.to_string());
        }
    }

    use super::*;
    use crate::enrich::{EndpointMeta, StaticEnricher};

    pub(crate) fn enricher() -> StaticEnricher {
        StaticEnricher::new("node-1")
            .with_endpoint(
                "10.0.0.1".parse().expect("ip"),
                EndpointMeta {
                    id: 11,
                    namespace: "default".into(),
                    pod_name: "frontend-7d9f".into(),
                    labels: vec![
                        "k8s:io.kubernetes.pod.namespace=default".into(),
                        "k8s:app=frontend".into(),
                    ],
                },
            )
            .with_endpoint(
                "10.0.0.2".parse().expect("ip"),
                EndpointMeta {
                    id: 22,
                    namespace: "prod".into(),
                    pod_name: "backend-5c4b".into(),
                    labels: vec![
                        "k8s:io.kubernetes.pod.namespace=prod".into(),
                        "k8s:app=backend".into(),
                        "k8s:tier=api".into(),
                    ],
                },
            )
            .with_identity(
                16_777_217,
                vec!["cidr:203.0.113.0/24".into(), "reserved:world".into()],
            )
            .with_dns_names(
                "203.0.113.7".parse().expect("ip"),
                vec!["api.example.com".into()],
            )
    }

    pub(crate) fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_717_243_200 + secs)
    }

    pub(crate) fn datapath(kind: DatapathEventKind, verdict: DatapathVerdict) -> DatapathEvent {
        DatapathEvent {
            time: at(0),
            kind,
            verdict,
            drop_reason: (verdict == DatapathVerdict::Dropped).then_some(133),
            direction: Direction::Egress,
            match_type: 2,
            protocol: PROTO_TCP,
            tcp_flags: 0x02,
            endpoint_id: 11,
            src_identity: 1001,
            dst_identity: 2002,
            src: "10.0.0.1".parse().expect("ip"),
            sport: 40_000,
            dst: "10.0.0.2".parse().expect("ip"),
            dport: 8080,
            icmp_code: 0,
            proxy_port: None,
            ifindex: 7,
            is_reply: None,
            observation_point: None,
            policy: None,
        }
    }

    pub(crate) fn http(kind: L7Kind, verdict: L7Verdict, status: Option<u16>) -> HttpRecord {
        HttpRecord {
            time: at(1),
            kind,
            verdict,
            method: "GET".into(),
            url: "http://backend.prod:8080/api/v1/items?id=3".into(),
            protocol: "HTTP/1.1".into(),
            status,
            latency: (kind == L7Kind::Response).then(|| Duration::from_millis(12)),
            headers: vec![("X-Request-Id".into(), "abc".into())],
            client: "10.0.0.1:40000".parse().expect("addr"),
            server: "10.0.0.2:8080".parse().expect("addr"),
            client_identity: 1001,
            server_identity: 2002,
            endpoint_id: 11,
            direction: Direction::Egress,
            policy: None,
        }
    }

    pub(crate) fn dns(kind: L7Kind, verdict: L7Verdict) -> DnsRecord {
        DnsRecord {
            time: at(2),
            kind,
            verdict,
            query: "api.example.com.".into(),
            qtypes: vec![1],
            rrtypes: if kind == L7Kind::Response {
                vec![1]
            } else {
                vec![]
            },
            ips: if kind == L7Kind::Response {
                vec!["203.0.113.7".parse().expect("ip")]
            } else {
                vec![]
            },
            cnames: vec![],
            ttl: if kind == L7Kind::Response { 30 } else { 0 },
            rcode: 0,
            observation_source: DnsObservationSource::Proxy,
            protocol: PROTO_UDP,
            client: "10.0.0.1:53000".parse().expect("addr"),
            server: "10.96.0.10:53".parse().expect("addr"),
            client_identity: 1001,
            server_identity: 102,
            endpoint_id: 11,
            direction: Direction::Egress,
            latency: None,
            policy: None,
        }
    }

    #[test]
    fn policy_verdict_is_filled_like_hubble() {
        let mut ev = datapath(DatapathEventKind::PolicyVerdict, DatapathVerdict::Forwarded);
        ev.policy = Some(PolicyRef {
            name: "allow-backend".into(),
            namespace: "default".into(),
            kind: "CiliumNetworkPolicy".into(),
            ..PolicyRef::default()
        });
        let flow = to_flow(&FlowInput::Datapath(ev), &enricher(), "node-1");
        assert_eq!(flow.verdict, Verdict::Forwarded as i32);
        assert_eq!(flow.r#type, FlowType::L3L4 as i32);
        assert_eq!(
            flow.event_type,
            Some(CiliumEventType {
                r#type: 5,
                sub_type: 0
            })
        );
        assert_eq!(flow.policy_match_type, 2);
        assert_eq!(
            flow.is_reply,
            Some(false),
            "forwarded verdicts are first packets"
        );
        assert_eq!(flow.traffic_direction, TrafficDirection::Egress as i32);
        let src = flow.source.as_ref().expect("source");
        assert_eq!((src.id, src.identity), (11, 1001));
        assert_eq!(src.namespace, "default");
        assert_eq!(src.pod_name, "frontend-7d9f");
        assert_eq!(
            src.labels,
            [
                "k8s:app=frontend",
                "k8s:io.kubernetes.pod.namespace=default"
            ]
        );
        let dst = flow.destination.as_ref().expect("destination");
        assert_eq!((dst.id, dst.identity), (22, 2002));
        assert_eq!(flow.summary, "TCP Flags: SYN");
        assert_eq!(flow.node_name, "node-1");
        assert_eq!(flow.egress_allowed_by.len(), 1);
        assert_eq!(flow.egress_allowed_by[0].name, "allow-backend");
        let ip = flow.ip.as_ref().expect("ip");
        assert_eq!(
            (ip.source.as_str(), ip.destination.as_str()),
            ("10.0.0.1", "10.0.0.2")
        );
    }

    #[test]
    fn drop_carries_reason_in_desc_and_sub_type() {
        let mut ev = datapath(DatapathEventKind::Drop, DatapathVerdict::Dropped);
        ev.drop_reason = Some(181);
        ev.dst = "203.0.113.7".parse().expect("ip");
        ev.dst_identity = 16_777_217;
        let flow = to_flow(&FlowInput::Datapath(ev), &enricher(), "node-1");
        assert_eq!(flow.verdict, Verdict::Dropped as i32);
        assert_eq!(flow.drop_reason, 181);
        assert_eq!(flow.drop_reason_desc, pb::DropReason::PolicyDeny as i32);
        assert_eq!(flow.event_type.as_ref().map(|e| e.sub_type), Some(181));
        assert_eq!(flow.is_reply, None, "drops do not know the direction");
        let dst = flow.destination.as_ref().expect("destination");
        assert_eq!(dst.labels, ["cidr:203.0.113.0/24", "reserved:world"]);
        assert_eq!(flow.destination_names, ["api.example.com"]);
    }

    #[test]
    fn trace_uses_observation_point() {
        let mut ev = datapath(DatapathEventKind::Trace, DatapathVerdict::Forwarded);
        ev.direction = Direction::Ingress;
        ev.is_reply = Some(false);
        let flow = to_flow(&FlowInput::Datapath(ev), &enricher(), "n");
        assert_eq!(flow.event_type.as_ref().map(|e| e.r#type), Some(4));
        assert_eq!(flow.event_type.as_ref().map(|e| e.sub_type), Some(0));
        assert_eq!(
            flow.trace_observation_point,
            TraceObservationPoint::ToEndpoint as i32
        );
        assert_eq!(flow.destination.as_ref().map(|e| e.id), Some(11));
        assert_eq!(flow.interface.as_ref().map(|i| i.index), Some(7));
    }

    #[test]
    fn icmp_and_udp_summaries() {
        let mut ev = datapath(DatapathEventKind::Trace, DatapathVerdict::Forwarded);
        ev.protocol = PROTO_ICMP;
        ev.dport = 8;
        let flow = to_flow(&FlowInput::Datapath(ev.clone()), &enricher(), "n");
        assert_eq!(flow.summary, "ICMPv4 EchoRequest");
        ev.protocol = PROTO_UDP;
        let flow = to_flow(&FlowInput::Datapath(ev), &enricher(), "n");
        assert_eq!(flow.summary, "UDP");
    }

    #[test]
    fn http_request_and_response() {
        let req = to_flow(
            &FlowInput::Http(http(L7Kind::Request, L7Verdict::Forwarded, None)),
            &enricher(),
            "n",
        );
        assert_eq!(req.r#type, FlowType::L7 as i32);
        assert_eq!(req.event_type.as_ref().map(|e| e.r#type), Some(129));
        assert_eq!(req.is_reply, Some(false));
        assert_eq!(
            req.summary,
            "HTTP/1.1 GET http://backend.prod:8080/api/v1/items?id=3"
        );
        let Some(layer7::Record::Http(h)) = req.l7.as_ref().and_then(|l| l.record.as_ref()) else {
            panic!("http record expected");
        };
        assert_eq!(h.code, 0, "requests carry no code");

        let resp = to_flow(
            &FlowInput::Http(http(L7Kind::Response, L7Verdict::Forwarded, Some(200))),
            &enricher(),
            "n",
        );
        assert_eq!(resp.is_reply, Some(true));
        assert_eq!(
            resp.summary,
            "HTTP/1.1 200 12ms (GET http://backend.prod:8080/api/v1/items?id=3)"
        );
        assert_eq!(resp.l7.as_ref().map(|l| l.latency_ns), Some(12_000_000));
        // Reported from the server to the client.
        assert_eq!(resp.source.as_ref().map(|e| e.id), Some(22));
        assert_eq!(resp.destination.as_ref().map(|e| e.id), Some(11));
        let Some(layer4::Protocol::Tcp(tcp)) = resp.l4.as_ref().and_then(|l| l.protocol.as_ref())
        else {
            panic!("tcp expected");
        };
        assert_eq!((tcp.source_port, tcp.destination_port), (8080, 40_000));
    }

    #[test]
    fn denied_http_is_dropped_request() {
        let flow = to_flow(
            &FlowInput::Http(http(L7Kind::Request, L7Verdict::Denied, Some(403))),
            &enricher(),
            "n",
        );
        assert_eq!(flow.verdict, Verdict::Dropped as i32);
        assert_eq!(
            flow.l7.as_ref().map(|l| l.r#type),
            Some(L7FlowType::Request as i32)
        );
    }

    #[test]
    fn dns_summaries() {
        let q = to_flow(
            &FlowInput::Dns(dns(L7Kind::Request, L7Verdict::Forwarded)),
            &enricher(),
            "n",
        );
        assert_eq!(q.summary, "DNS Query api.example.com. A");
        let a = to_flow(
            &FlowInput::Dns(dns(L7Kind::Response, L7Verdict::Forwarded)),
            &enricher(),
            "n",
        );
        assert_eq!(
            a.summary,
            "DNS Answer \"203.0.113.7\" TTL: 30 (Proxy api.example.com. A)"
        );
        let Some(layer7::Record::Dns(d)) = a.l7.as_ref().and_then(|l| l.record.as_ref()) else {
            panic!("dns record expected");
        };
        assert_eq!(d.ips, ["203.0.113.7"]);
        assert_eq!(d.qtypes, ["A"]);
        assert_eq!(d.rrtypes, ["A"]);
        assert_eq!(d.observation_source, "proxy");
        let mut refused = dns(L7Kind::Response, L7Verdict::Forwarded);
        refused.rcode = 5;
        let r = to_flow(&FlowInput::Dns(refused), &enricher(), "n");
        assert_eq!(
            r.summary,
            "DNS Answer RCode: Query Refused TTL: 30 (Proxy api.example.com. A)"
        );
    }

    #[test]
    fn url_passwords_are_redacted() {
        assert_eq!(
            redact_url("http://user:secret@h:80/p?q=1"),
            "http://user:HUBBLE_REDACTED@h:80/p?q=1"
        );
        assert_eq!(redact_url("http://user@h/p"), "http://user@h/p");
        assert_eq!(redact_url("/relative"), "/relative");
    }
}
