//! `hubble observe` output for `membrane observe`: compact, dict and JSON lines
//! (`hubble/pkg/printer`). Times print in UTC (no time-zone database here); otherwise the
//! lines follow the CLI with IP translation on (pod names instead of addresses).

use serde_json::{Map, Value, json};

use crate::convert::monitor_type;
use crate::names;
use crate::proto::flow::{
    DropReason, Endpoint, Flow, FlowType, IpVersion, L7FlowType, LostEvent, LostEventSource,
    TraceObservationPoint, TrafficDirection, Verdict, layer4, layer7,
};
use crate::proto::observer::{GetFlowsResponse, get_flows_response::ResponseTypes};
use crate::proto::relay::{NodeState, NodeStatusEvent};
use crate::timefmt;

/// Separator the CLI prints between dict records.
pub const DICT_SEPARATOR: &str = "------------";

/// Printing options (the CLI's `--print-node-name` and `--ip-translation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrintOptions {
    pub node_name: bool,
    pub ip_translation: bool,
}

impl Default for PrintOptions {
    fn default() -> Self {
        Self {
            node_name: false,
            ip_translation: true,
        }
    }
}

fn ports(flow: &Flow) -> (Option<u32>, Option<u32>) {
    match flow.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(layer4::Protocol::Tcp(t)) => (Some(t.source_port), Some(t.destination_port)),
        Some(layer4::Protocol::Udp(u)) => (Some(u.source_port), Some(u.destination_port)),
        _ => (None, None),
    }
}

fn host(
    ip: &str,
    port: Option<u32>,
    ep: Option<&Endpoint>,
    svc: Option<(&str, &str)>,
    names: &[String],
    opts: PrintOptions,
) -> String {
    let mut host = ip.to_owned();
    if opts.ip_translation {
        let ns = ep.map_or("", |e| e.namespace.as_str());
        let pod = ep.map_or("", |e| e.pod_name.as_str());
        let join = |ns: &str, name: &str| {
            if ns.is_empty() {
                name.to_owned()
            } else {
                format!("{ns}/{name}")
            }
        };
        if !pod.is_empty() {
            host = join(ns, pod);
        } else if let Some((svc_ns, svc_name)) = svc.filter(|(_, n)| !n.is_empty()) {
            host = join(svc_ns, svc_name);
        } else if !names.is_empty() {
            host = names.join(",");
        }
    }
    match port {
        Some(p) if p != 0 => {
            if host.contains(':') {
                format!("[{host}]:{p}")
            } else {
                format!("{host}:{p}")
            }
        }
        _ => host,
    }
}

/// Source and destination as the CLI shows them (`default/pod:port`, names, or addresses).
pub fn host_names(flow: &Flow, opts: PrintOptions) -> (String, String) {
    let Some(ip) = flow.ip.as_ref() else {
        return (String::new(), String::new());
    };
    let (sport, dport) = ports(flow);
    let svc = |s: &Option<crate::proto::flow::Service>| {
        s.as_ref().map(|s| (s.namespace.clone(), s.name.clone()))
    };
    let (ssvc, dsvc) = (svc(&flow.source_service), svc(&flow.destination_service));
    (
        host(
            &ip.source,
            sport,
            flow.source.as_ref(),
            ssvc.as_ref().map(|(n, s)| (n.as_str(), s.as_str())),
            &flow.source_names,
            opts,
        ),
        host(
            &ip.destination,
            dport,
            flow.destination.as_ref(),
            dsvc.as_ref().map(|(n, s)| (n.as_str(), s.as_str())),
            &flow.destination_names,
            opts,
        ),
    )
}

/// `(ID:1234)`, or `(world)` for a reserved identity.
pub fn identity_text(identity: u32) -> String {
    names::reserved_identity_name(identity)
        .map_or_else(|| format!("(ID:{identity})"), |name| format!("({name})"))
}

fn direction_name(flow: &Flow) -> &'static str {
    TrafficDirection::try_from(flow.traffic_direction)
        .map_or("TRAFFIC_DIRECTION_UNKNOWN", |d| d.as_str_name())
}

/// The CLI's TYPE column (`GetFlowType`).
pub fn flow_type(flow: &Flow) -> String {
    if let Some(l7) = flow.l7.as_ref() {
        let l7_type = L7FlowType::try_from(l7.r#type)
            .map_or("unknown_l7_type", |t| t.as_str_name())
            .to_lowercase();
        return match l7.record.as_ref() {
            Some(layer7::Record::Http(_)) => format!("http-{l7_type}"),
            Some(layer7::Record::Dns(d)) => format!("dns-{l7_type} {}", d.observation_source),
            None => format!("l7-{l7_type}"),
        };
    }
    let (t, sub) = flow
        .event_type
        .as_ref()
        .map_or((0, 0), |e| (e.r#type, e.sub_type));
    match t {
        monitor_type::TRACE => {
            names::observation_point_name(sub).map_or_else(|| sub.to_string(), str::to_owned)
        }
        monitor_type::DROP => names::drop_reason_display(u32::try_from(sub).unwrap_or_default()),
        monitor_type::POLICY_VERDICT => format!(
            "policy-verdict:{} {}",
            names::match_type_name(flow.policy_match_type),
            direction_name(flow)
        ),
        _ => "UNKNOWN".to_owned(),
    }
}

/// The CLI's VERDICT column: policy verdicts read ALLOWED / DENIED / AUDITED.
pub fn verdict_text(flow: &Flow) -> String {
    let verdict = Verdict::try_from(flow.verdict).unwrap_or(Verdict::Unknown);
    let policy = flow.event_type.as_ref().map(|e| e.r#type) == Some(monitor_type::POLICY_VERDICT);
    match verdict {
        Verdict::Forwarded | Verdict::Redirected if policy => "ALLOWED".to_owned(),
        Verdict::Dropped | Verdict::Error if policy => "DENIED".to_owned(),
        Verdict::Audit if policy => "AUDITED".to_owned(),
        v => v.as_str_name().to_owned(),
    }
}

/// One compact line: `TIME [NODE]: SRC (ID) -> DST (ID) TYPE VERDICT (SUMMARY)`; the arrow is
/// `<-` (with source and destination swapped) for replies and `<>` when unknown.
pub fn compact(flow: &Flow, opts: PrintOptions) -> String {
    let (mut src, mut dst) = host_names(flow, opts);
    let mut src_id = identity_text(flow.source.as_ref().map_or(0, |e| e.identity));
    let mut dst_id = identity_text(flow.destination.as_ref().map_or(0, |e| e.identity));
    let arrow = match flow.is_reply {
        None => "<>",
        Some(true) => {
            std::mem::swap(&mut src, &mut dst);
            std::mem::swap(&mut src_id, &mut dst_id);
            "<-"
        }
        Some(false) => "->",
    };
    let node = if opts.node_name {
        format!(" [{}]", flow.node_name)
    } else {
        String::new()
    };
    format!(
        "{}{node}: {src} {src_id} {arrow} {dst} {dst_id} {} {} ({})",
        timefmt::stamp_milli(flow.time.as_ref()),
        flow_type(flow),
        verdict_text(flow),
        flow.summary
    )
}

/// The header of `-o table` (Hubble's columns; NODE with `--print-node-name`).
pub fn table_header(opts: PrintOptions) -> Vec<String> {
    let mut cols = vec!["TIMESTAMP"];
    if opts.node_name {
        cols.push("NODE");
    }
    cols.extend(["SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"]);
    cols.into_iter().map(str::to_owned).collect()
}

/// One `-o table` row, the cells of [`table_header`].
pub fn table_row(flow: &Flow, opts: PrintOptions) -> Vec<String> {
    let (src, dst) = host_names(flow, opts);
    let mut row = vec![timefmt::stamp_milli(flow.time.as_ref())];
    if opts.node_name {
        row.push(flow.node_name.clone());
    }
    row.extend([
        src,
        dst,
        flow_type(flow),
        verdict_text(flow),
        flow.summary.clone(),
    ]);
    row
}

/// Rows as aligned columns (each padded to its widest cell, two spaces apart; the last
/// column is not padded), one line per row.
pub fn align_table(rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = Vec::new();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            let w = cell.chars().count();
            match widths.get_mut(i) {
                Some(max) => *max = (*max).max(w),
                None => widths.push(w),
            }
        }
    }
    let mut out = String::new();
    for row in rows {
        let last = row.len().saturating_sub(1);
        for (i, cell) in row.iter().enumerate() {
            out.push_str(cell);
            if i < last {
                let pad = widths[i] - cell.chars().count() + 2;
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push('\n');
    }
    out
}

/// One dict record (without the separator the CLI prints between records).
pub fn dict(flow: &Flow, opts: PrintOptions) -> String {
    let (src, dst) = host_names(flow, opts);
    let mut out = format!(
        "  TIMESTAMP: {}\n",
        timefmt::stamp_milli(flow.time.as_ref())
    );
    if opts.node_name {
        out.push_str(&format!("       NODE: {}\n", flow.node_name));
    }
    out.push_str(&format!(
        "     SOURCE: {src}\nDESTINATION: {dst}\n       TYPE: {}\n    VERDICT: {}\n    SUMMARY: {}\n",
        flow_type(flow),
        verdict_text(flow),
        flow.summary
    ));
    out
}

/// The line for a lost-event notice.
pub fn lost_line(lost: &LostEvent) -> String {
    let source = LostEventSource::try_from(lost.source)
        .map_or("UNKNOWN_LOST_EVENT_SOURCE", |s| s.as_str_name());
    format!("EVENTS LOST: {source} {}", lost.num_events_lost)
}

/// Compact output for any GetFlows response.
pub fn compact_response(resp: &GetFlowsResponse, opts: PrintOptions) -> Option<String> {
    match resp.response_types.as_ref()? {
        ResponseTypes::Flow(flow) => Some(compact(flow, opts)),
        ResponseTypes::LostEvents(lost) => Some(lost_line(lost)),
        ResponseTypes::NodeStatus(status) => node_status_line(status),
    }
}

/// The line `hubble observe` prints for a relay's node status event: only failures are
/// shown (connected nodes are not news).
pub fn node_status_line(status: &NodeStatusEvent) -> Option<String> {
    let state = NodeState::try_from(status.state_change).unwrap_or(NodeState::UnknownNodeState);
    let names = status.node_names.join(", ");
    match state {
        NodeState::NodeUnavailable => Some(format!("NODES UNAVAILABLE: {names}")),
        NodeState::NodeError => Some(format!("NODE ERROR ({names}): {}", status.message)),
        NodeState::NodeGone => Some(format!("NODES GONE: {names}")),
        NodeState::NodeConnected | NodeState::UnknownNodeState => None,
    }
}

// --- JSON: protojson with proto field names (cilium generates its JSON marshallers with
// `orig_name=true`), enums by name, 64-bit integers as strings, zero values omitted.

fn put(map: &mut Map<String, Value>, key: &str, value: Value) {
    let empty = match &value {
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Number(n) => n.as_u64() == Some(0) || n.as_i64() == Some(0),
        Value::Bool(b) => !b,
        Value::Null => true,
        Value::Object(_) => false,
    };
    if !empty {
        map.insert(key.to_owned(), value);
    }
}

fn put_enum(map: &mut Map<String, Value>, key: &str, value: i32, name: Option<&'static str>) {
    if value != 0 {
        // protojson prints an unknown enum value as its number.
        map.insert(
            key.to_owned(),
            name.map_or_else(|| json!(value), |n| json!(n)),
        );
    }
}

fn endpoint_json(ep: &Endpoint) -> Value {
    let mut m = Map::new();
    put(&mut m, "ID", json!(ep.id));
    put(&mut m, "identity", json!(ep.identity));
    put(&mut m, "namespace", json!(ep.namespace));
    put(&mut m, "labels", json!(ep.labels));
    put(&mut m, "pod_name", json!(ep.pod_name));
    Value::Object(m)
}

fn ports_json(src: u32, dst: u32) -> Map<String, Value> {
    let mut m = Map::new();
    put(&mut m, "source_port", json!(src));
    put(&mut m, "destination_port", json!(dst));
    m
}

fn l4_json(l4: &crate::proto::flow::Layer4) -> Value {
    let mut m = Map::new();
    match l4.protocol.as_ref() {
        Some(layer4::Protocol::Tcp(t)) => {
            let mut tcp = ports_json(t.source_port, t.destination_port);
            if let Some(f) = t.flags.as_ref() {
                let mut flags = Map::new();
                for (set, name) in [
                    (f.fin, "FIN"),
                    (f.syn, "SYN"),
                    (f.rst, "RST"),
                    (f.psh, "PSH"),
                    (f.ack, "ACK"),
                    (f.urg, "URG"),
                    (f.ece, "ECE"),
                    (f.cwr, "CWR"),
                    (f.ns, "NS"),
                ] {
                    put(&mut flags, name, json!(set));
                }
                tcp.insert("flags".to_owned(), Value::Object(flags));
            }
            m.insert("TCP".to_owned(), Value::Object(tcp));
        }
        Some(layer4::Protocol::Udp(u)) => {
            m.insert(
                "UDP".to_owned(),
                Value::Object(ports_json(u.source_port, u.destination_port)),
            );
        }
        Some(layer4::Protocol::Sctp(s)) => {
            m.insert(
                "SCTP".to_owned(),
                Value::Object(ports_json(s.source_port, s.destination_port)),
            );
        }
        Some(layer4::Protocol::IcmPv4(i)) => {
            let mut icmp = Map::new();
            put(&mut icmp, "type", json!(i.r#type));
            put(&mut icmp, "code", json!(i.code));
            m.insert("ICMPv4".to_owned(), Value::Object(icmp));
        }
        Some(layer4::Protocol::IcmPv6(i)) => {
            let mut icmp = Map::new();
            put(&mut icmp, "type", json!(i.r#type));
            put(&mut icmp, "code", json!(i.code));
            m.insert("ICMPv6".to_owned(), Value::Object(icmp));
        }
        None => {}
    }
    Value::Object(m)
}

fn l7_json(l7: &crate::proto::flow::Layer7) -> Value {
    let mut m = Map::new();
    put_enum(
        &mut m,
        "type",
        l7.r#type,
        L7FlowType::try_from(l7.r#type)
            .ok()
            .map(|t| t.as_str_name()),
    );
    if l7.latency_ns != 0 {
        m.insert("latency_ns".to_owned(), json!(l7.latency_ns.to_string()));
    }
    match l7.record.as_ref() {
        Some(layer7::Record::Dns(d)) => {
            let mut dns = Map::new();
            put(&mut dns, "query", json!(d.query));
            put(&mut dns, "ips", json!(d.ips));
            put(&mut dns, "ttl", json!(d.ttl));
            put(&mut dns, "cnames", json!(d.cnames));
            put(&mut dns, "observation_source", json!(d.observation_source));
            put(&mut dns, "rcode", json!(d.rcode));
            put(&mut dns, "qtypes", json!(d.qtypes));
            put(&mut dns, "rrtypes", json!(d.rrtypes));
            m.insert("dns".to_owned(), Value::Object(dns));
        }
        Some(layer7::Record::Http(h)) => {
            let mut http = Map::new();
            put(&mut http, "code", json!(h.code));
            put(&mut http, "method", json!(h.method));
            put(&mut http, "url", json!(h.url));
            put(&mut http, "protocol", json!(h.protocol));
            let headers: Vec<Value> = h
                .headers
                .iter()
                .map(|hd| {
                    let mut m = Map::new();
                    put(&mut m, "key", json!(hd.key));
                    put(&mut m, "value", json!(hd.value));
                    Value::Object(m)
                })
                .collect();
            put(&mut http, "headers", Value::Array(headers));
            m.insert("http".to_owned(), Value::Object(http));
        }
        None => {}
    }
    Value::Object(m)
}

fn policies_json(list: &[crate::proto::flow::Policy]) -> Value {
    Value::Array(
        list.iter()
            .map(|p| {
                let mut m = Map::new();
                put(&mut m, "name", json!(p.name));
                put(&mut m, "namespace", json!(p.namespace));
                put(&mut m, "labels", json!(p.labels));
                if p.revision != 0 {
                    m.insert("revision".to_owned(), json!(p.revision.to_string()));
                }
                put(&mut m, "kind", json!(p.kind));
                Value::Object(m)
            })
            .collect(),
    )
}

/// A flow as protojson (proto field names, in declaration order).
pub fn flow_json(f: &Flow) -> Value {
    let mut m = Map::new();
    if let Some(t) = f.time.as_ref() {
        m.insert("time".to_owned(), json!(timefmt::rfc3339(t)));
    }
    put_enum(
        &mut m,
        "verdict",
        f.verdict,
        Verdict::try_from(f.verdict).ok().map(|v| v.as_str_name()),
    );
    put(&mut m, "drop_reason", json!(f.drop_reason));
    if let Some(ip) = f.ip.as_ref() {
        let mut o = Map::new();
        put(&mut o, "source", json!(ip.source));
        put(&mut o, "destination", json!(ip.destination));
        put_enum(
            &mut o,
            "ipVersion",
            ip.ip_version,
            IpVersion::try_from(ip.ip_version)
                .ok()
                .map(|v| v.as_str_name()),
        );
        m.insert("IP".to_owned(), Value::Object(o));
    }
    if let Some(l4) = f.l4.as_ref() {
        m.insert("l4".to_owned(), l4_json(l4));
    }
    if let Some(ep) = f.source.as_ref() {
        m.insert("source".to_owned(), endpoint_json(ep));
    }
    if let Some(ep) = f.destination.as_ref() {
        m.insert("destination".to_owned(), endpoint_json(ep));
    }
    put_enum(
        &mut m,
        "Type",
        f.r#type,
        FlowType::try_from(f.r#type).ok().map(|t| t.as_str_name()),
    );
    put(&mut m, "node_name", json!(f.node_name));
    put(&mut m, "source_names", json!(f.source_names));
    put(&mut m, "destination_names", json!(f.destination_names));
    if let Some(l7) = f.l7.as_ref() {
        m.insert("l7".to_owned(), l7_json(l7));
    }
    put(&mut m, "reply", json!(f.reply));
    if let Some(e) = f.event_type.as_ref() {
        let mut o = Map::new();
        put(&mut o, "type", json!(e.r#type));
        put(&mut o, "sub_type", json!(e.sub_type));
        m.insert("event_type".to_owned(), Value::Object(o));
    }
    for (key, svc) in [
        ("source_service", &f.source_service),
        ("destination_service", &f.destination_service),
    ] {
        if let Some(s) = svc.as_ref() {
            let mut o = Map::new();
            put(&mut o, "name", json!(s.name));
            put(&mut o, "namespace", json!(s.namespace));
            m.insert(key.to_owned(), Value::Object(o));
        }
    }
    put_enum(
        &mut m,
        "traffic_direction",
        f.traffic_direction,
        TrafficDirection::try_from(f.traffic_direction)
            .ok()
            .map(|d| d.as_str_name()),
    );
    put(&mut m, "policy_match_type", json!(f.policy_match_type));
    put_enum(
        &mut m,
        "trace_observation_point",
        f.trace_observation_point,
        TraceObservationPoint::try_from(f.trace_observation_point)
            .ok()
            .map(|p| p.as_str_name()),
    );
    put_enum(
        &mut m,
        "drop_reason_desc",
        f.drop_reason_desc,
        DropReason::try_from(f.drop_reason_desc)
            .ok()
            .map(|r| r.as_str_name()),
    );
    if let Some(reply) = f.is_reply {
        m.insert("is_reply".to_owned(), json!(reply));
    }
    if let Some(i) = f.interface.as_ref() {
        let mut o = Map::new();
        put(&mut o, "index", json!(i.index));
        put(&mut o, "name", json!(i.name));
        m.insert("interface".to_owned(), Value::Object(o));
    }
    put(&mut m, "proxy_port", json!(f.proxy_port));
    put(&mut m, "Summary", json!(f.summary));
    for (key, list) in [
        ("egress_allowed_by", &f.egress_allowed_by),
        ("ingress_allowed_by", &f.ingress_allowed_by),
        ("egress_denied_by", &f.egress_denied_by),
        ("ingress_denied_by", &f.ingress_denied_by),
    ] {
        put(&mut m, key, policies_json(list));
    }
    Value::Object(m)
}

/// A GetFlows response as `hubble observe -o json` prints it (one object per line:
/// `{"flow":{...},"node_name":...,"time":...}`).
pub fn response_json(resp: &GetFlowsResponse) -> Value {
    let mut m = Map::new();
    match resp.response_types.as_ref() {
        Some(ResponseTypes::Flow(f)) => {
            m.insert("flow".to_owned(), flow_json(f));
        }
        Some(ResponseTypes::LostEvents(l)) => {
            let mut o = Map::new();
            put_enum(
                &mut o,
                "source",
                l.source,
                LostEventSource::try_from(l.source)
                    .ok()
                    .map(|s| s.as_str_name()),
            );
            if l.num_events_lost != 0 {
                o.insert(
                    "num_events_lost".to_owned(),
                    json!(l.num_events_lost.to_string()),
                );
            }
            if let Some(cpu) = l.cpu {
                o.insert("cpu".to_owned(), json!(cpu));
            }
            m.insert("lost_events".to_owned(), Value::Object(o));
        }
        Some(ResponseTypes::NodeStatus(status)) => {
            let mut o = Map::new();
            put_enum(
                &mut o,
                "state_change",
                status.state_change,
                NodeState::try_from(status.state_change)
                    .ok()
                    .map(|s| s.as_str_name()),
            );
            put(&mut o, "node_names", json!(status.node_names));
            put(&mut o, "message", json!(status.message));
            m.insert("node_status".to_owned(), Value::Object(o));
        }
        None => {}
    }
    put(&mut m, "node_name", json!(resp.node_name));
    if let Some(t) = resp.time.as_ref() {
        m.insert("time".to_owned(), json!(timefmt::rfc3339(t)));
    }
    Value::Object(m)
}

/// [`response_json`] as one line.
pub fn json_line(resp: &GetFlowsResponse) -> String {
    response_json(resp).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::tests::{datapath, dns, enricher, http};
    use crate::convert::to_flow;
    use crate::input::{DatapathEventKind, DatapathVerdict, FlowInput, L7Kind, L7Verdict};

    fn conv(input: FlowInput) -> Flow {
        to_flow(&input, &enricher(), "node-1")
    }

    #[test]
    fn compact_lines() {
        let verdict = conv(FlowInput::Datapath(datapath(
            DatapathEventKind::PolicyVerdict,
            DatapathVerdict::Forwarded,
        )));
        assert_eq!(
            compact(&verdict, PrintOptions::default()),
            "Jun  1 12:00:00.000: default/frontend-7d9f:40000 (ID:1001) -> \
             prod/backend-5c4b:8080 (ID:2002) policy-verdict:L3-L4 EGRESS ALLOWED \
             (TCP Flags: SYN)"
        );
        let mut ev = datapath(DatapathEventKind::Drop, DatapathVerdict::Dropped);
        ev.dst = "203.0.113.7".parse().expect("ip");
        ev.dst_identity = 2;
        let drop = conv(FlowInput::Datapath(ev));
        assert_eq!(
            compact(
                &drop,
                PrintOptions {
                    node_name: true,
                    ip_translation: true
                }
            ),
            "Jun  1 12:00:00.000 [node-1]: default/frontend-7d9f:40000 (ID:1001) <> \
             api.example.com:8080 (world) Policy denied DROPPED (TCP Flags: SYN)"
        );
        let resp = conv(FlowInput::Http(http(
            L7Kind::Response,
            L7Verdict::Forwarded,
            Some(200),
        )));
        assert_eq!(
            compact(&resp, PrintOptions::default()),
            "Jun  1 12:00:01.000: default/frontend-7d9f:40000 (ID:1001) <- \
             prod/backend-5c4b:8080 (ID:2002) http-response FORWARDED \
             (HTTP/1.1 200 12ms (GET http://backend.prod:8080/api/v1/items?id=3))"
        );
        let query = conv(FlowInput::Dns(dns(L7Kind::Request, L7Verdict::Forwarded)));
        assert!(
            compact(
                &query,
                PrintOptions {
                    node_name: false,
                    ip_translation: false
                }
            )
            .contains("10.0.0.1:53000 (ID:1001) -> 10.96.0.10:53 (ID:102) dns-request proxy FORWARDED (DNS Query api.example.com. A)")
        );
    }

    #[test]
    fn dict_block() {
        let flow = conv(FlowInput::Datapath(datapath(
            DatapathEventKind::Trace,
            DatapathVerdict::Forwarded,
        )));
        assert_eq!(
            dict(&flow, PrintOptions::default()),
            "  TIMESTAMP: Jun  1 12:00:00.000\n     SOURCE: default/frontend-7d9f:40000\n\
             DESTINATION: prod/backend-5c4b:8080\n       TYPE: from-endpoint\n\
             \x20   VERDICT: FORWARDED\n    SUMMARY: TCP Flags: SYN\n"
        );
    }

    #[test]
    fn json_uses_proto_names_and_enum_names() {
        let mut ev = datapath(DatapathEventKind::Drop, DatapathVerdict::Dropped);
        ev.drop_reason = Some(133);
        let flow = conv(FlowInput::Datapath(ev));
        let resp = GetFlowsResponse {
            time: flow.time,
            node_name: flow.node_name.clone(),
            response_types: Some(ResponseTypes::Flow(flow)),
        };
        let line = json_line(&resp);
        assert!(!line.contains('\n'));
        let v: Value = serde_json::from_str(&line).expect("valid JSON");
        let f = &v["flow"];
        assert_eq!(f["verdict"], "DROPPED");
        assert_eq!(f["drop_reason_desc"], "POLICY_DENIED");
        assert_eq!(f["drop_reason"], 133);
        assert_eq!(f["Type"], "L3_L4");
        assert_eq!(f["IP"]["ipVersion"], "IPv4");
        assert_eq!(f["l4"]["TCP"]["destination_port"], 8080);
        assert_eq!(f["l4"]["TCP"]["flags"]["SYN"], true);
        assert_eq!(f["source"]["pod_name"], "frontend-7d9f");
        assert_eq!(f["source"]["ID"], 11);
        assert_eq!(f["event_type"]["type"], 1);
        assert_eq!(f["event_type"]["sub_type"], 133);
        assert_eq!(f["traffic_direction"], "EGRESS");
        assert_eq!(f["Summary"], "TCP Flags: SYN");
        assert_eq!(f["time"], "2024-06-01T12:00:00Z");
        assert!(f.get("is_reply").is_none(), "unknown reply is absent");
        assert!(
            f.get("policy_match_type").is_none(),
            "zero values are omitted"
        );
        assert_eq!(v["node_name"], "node-1");
        assert_eq!(v["time"], "2024-06-01T12:00:00Z");

        let http = conv(FlowInput::Http(http(
            L7Kind::Response,
            L7Verdict::Forwarded,
            Some(200),
        )));
        let v = flow_json(&http);
        assert_eq!(v["l7"]["type"], "RESPONSE");
        assert_eq!(
            v["l7"]["latency_ns"], "12000000",
            "uint64 is a string in protojson"
        );
        assert_eq!(v["l7"]["http"]["code"], 200);
        assert_eq!(v["is_reply"], true);
    }
}
