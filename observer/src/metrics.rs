//! Prometheus metrics with Hubble's names and labels (`pkg/hubble/metrics/*/handler.go`),
//! computed on every flow as it enters the ring, rendered as Prometheus text for the
//! agent's `/metrics`.
//!
//! Implemented handlers (no context options, so no extra labels):
//! - `flow`: `hubble_flows_processed_total{protocol,type,subtype,verdict}`
//! - `drop`: `hubble_drop_total{reason,protocol}`
//! - `httpV2`: `hubble_http_requests_total{method,protocol,status,reporter}` and
//!   `hubble_http_request_duration_seconds{method,reporter}`, both on response flows
//! - `dns`: `hubble_dns_queries_total`, `hubble_dns_responses_total`
//!   `{rcode,qtypes,ips_returned}` and `hubble_dns_response_types_total{type,qtypes}`
//! - `tcp`: `hubble_tcp_flags_total{flag,family}`
//! - `policy`: `hubble_policy_verdicts_total{direction,match,action}`
//! - always: `hubble_lost_events_total{source}`
//!
//! plus `membrane_flows_lost_total{source}` per producer (datapath, proxy, dns).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Mutex, MutexGuard};

use crate::convert::monitor_type;
use crate::names;
use crate::proto::flow::{
    DropReason, Flow, IpVersion, L7FlowType, TrafficDirection, Verdict, layer4, layer7,
};

/// Prometheus' default histogram buckets, which Hubble's duration histogram uses.
const DURATION_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Clone, Debug, Default)]
struct Histogram {
    buckets: [u64; DURATION_BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, value: f64) {
        for (bucket, bound) in self.buckets.iter_mut().zip(DURATION_BUCKETS) {
            if value <= bound {
                *bucket += 1;
            }
        }
        self.sum += value;
        self.count += 1;
    }
}

/// Counters by label values. Looked up with borrowed values ([`LabelsRef`]), so counting a
/// flow allocates only the first time a label combination is seen; sorted when rendered.
type Counters<const N: usize> = hashbrown::HashMap<Labels<N>, u64>;

/// Owned label values (hashes as `[String; N]` does, like [`LabelsRef`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Labels<const N: usize>([String; N]);

/// Borrowed label values, for lookups.
#[derive(Hash)]
struct LabelsRef<'a, const N: usize>([&'a str; N]);

impl<const N: usize> hashbrown::Equivalent<Labels<N>> for LabelsRef<'_, N> {
    fn equivalent(&self, key: &Labels<N>) -> bool {
        self.0.iter().zip(&key.0).all(|(a, b)| *a == b.as_str())
    }
}

#[derive(Default)]
struct State {
    flows_processed: Counters<4>,
    drops: Counters<2>,
    http_requests: Counters<4>,
    http_duration: BTreeMap<[String; 2], Histogram>,
    dns_queries: Counters<3>,
    dns_responses: Counters<3>,
    dns_response_types: Counters<2>,
    tcp_flags: Counters<2>,
    policy_verdicts: Counters<3>,
}

fn bump<const N: usize>(map: &mut Counters<N>, labels: [&str; N]) {
    if let Some(count) = map.get_mut(&LabelsRef(labels)) {
        *count += 1;
    } else {
        map.insert(Labels(labels.map(str::to_owned)), 1);
    }
}

/// Loss counts the renderer needs from the pipeline.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LostTotals {
    /// Hubble's `perf_event_ring_buffer` source.
    pub perf_event_ring_buffer: u64,
    /// Hubble's `observer_events_queue` source.
    pub observer_events_queue: u64,
    /// Per producer: datapath, proxy, dns.
    pub by_producer: [u64; 3],
}

#[derive(Default)]
pub struct Metrics {
    state: Mutex<State>,
}

/// `v1.FlowProtocol`: the L7 protocol for access-log flows, else the L4 protocol.
pub fn flow_protocol(flow: &Flow) -> &'static str {
    let event_type = flow.event_type.as_ref().map_or(0, |e| e.r#type);
    match event_type {
        monitor_type::ACCESS_LOG => match flow.l7.as_ref().and_then(|l| l.record.as_ref()) {
            Some(layer7::Record::Dns(_)) => "DNS",
            Some(layer7::Record::Http(_)) => "HTTP",
            None => "Unknown L7",
        },
        monitor_type::DROP
        | monitor_type::TRACE
        | monitor_type::POLICY_VERDICT
        | monitor_type::CAPTURE => match flow.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
            Some(layer4::Protocol::Tcp(_)) => "TCP",
            Some(layer4::Protocol::Udp(_)) => "UDP",
            Some(layer4::Protocol::IcmPv4(_)) => "ICMPv4",
            Some(layer4::Protocol::IcmPv6(_)) => "ICMPv6",
            Some(layer4::Protocol::Sctp(_)) => "SCTP",
            None => "Unknown L4",
        },
        _ => "Unknown flow",
    }
}

fn verdict_name(flow: &Flow) -> &'static str {
    Verdict::try_from(flow.verdict).map_or("VERDICT_UNKNOWN", |v| v.as_str_name())
}

/// `name` in lower case, without allocating for the names the policy metric uses.
fn lowercase(name: &'static str) -> std::borrow::Cow<'static, str> {
    std::borrow::Cow::Borrowed(match name {
        "INGRESS" => "ingress",
        "EGRESS" => "egress",
        "TRAFFIC_DIRECTION_UNKNOWN" => "traffic_direction_unknown",
        "FORWARDED" => "forwarded",
        "DROPPED" => "dropped",
        "ERROR" => "error",
        "AUDIT" => "audit",
        "REDIRECTED" => "redirected",
        "TRACED" => "traced",
        "TRANSLATED" => "translated",
        "VERDICT_UNKNOWN" => "verdict_unknown",
        "L3-Only" => "l3-only",
        "L3-L4" => "l3-l4",
        "L4-Only" => "l4-only",
        "L3-Proto" => "l3-proto",
        "Proto-Only" => "proto-only",
        other if !other.bytes().any(|b| b.is_ascii_uppercase()) => other,
        other => return std::borrow::Cow::Owned(other.to_lowercase()),
    })
}

fn direction_name(flow: &Flow) -> &'static str {
    TrafficDirection::try_from(flow.traffic_direction)
        .map_or("TRAFFIC_DIRECTION_UNKNOWN", |d| d.as_str_name())
}

impl Metrics {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Counters stay consistent even if a panic interrupted an update (each is one add).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one flow in every handler it concerns.
    pub fn observe(&self, flow: &Flow) {
        let mut s = self.lock();
        let protocol = flow_protocol(flow);
        let verdict = verdict_name(flow);
        let event_type = flow.event_type.as_ref().map_or(0, |e| e.r#type);
        let sub_type = flow.event_type.as_ref().map_or(0, |e| e.sub_type);
        let l7 = flow.l7.as_ref();
        let record = l7.and_then(|l| l.record.as_ref());

        // flow
        let unknown_type;
        let (type_name, subtype): (&str, &str) = match event_type {
            monitor_type::ACCESS_LOG => (
                "L7",
                match record {
                    Some(layer7::Record::Dns(_)) => "DNS",
                    Some(layer7::Record::Http(_)) => "HTTP",
                    None => "",
                },
            ),
            monitor_type::DROP => ("Drop", ""),
            monitor_type::CAPTURE => ("Capture", ""),
            monitor_type::TRACE => (
                "Trace",
                names::observation_point_name(sub_type).unwrap_or_default(),
            ),
            monitor_type::POLICY_VERDICT => ("PolicyVerdict", ""),
            other => {
                unknown_type = other.to_string();
                ("Unknown", unknown_type.as_str())
            }
        };
        bump(
            &mut s.flows_processed,
            [protocol, type_name, subtype, verdict],
        );

        // drop
        if flow.verdict == Verdict::Dropped as i32 {
            let reason = DropReason::try_from(flow.drop_reason_desc)
                .map_or("DROP_REASON_UNKNOWN", |r| r.as_str_name());
            bump(&mut s.drops, [reason, protocol]);
        }

        // httpV2: counted on responses, latency from the flow.
        if let (Some(layer7::Record::Http(http)), Some(l7)) = (record, l7)
            && l7.r#type == L7FlowType::Response as i32
        {
            let reporter = match TrafficDirection::try_from(flow.traffic_direction) {
                Ok(TrafficDirection::Egress) => "client",
                Ok(TrafficDirection::Ingress) => "server",
                _ => "unknown",
            };
            let status = http.code.to_string();
            bump(
                &mut s.http_requests,
                [&http.method, &http.protocol, &status, reporter],
            );
            // Nanoseconds to seconds; f64 precision is ample for a latency.
            #[expect(
                clippy::cast_precision_loss,
                reason = "latency in seconds for a histogram"
            )]
            let seconds = l7.latency_ns as f64 / 1e9;
            s.http_duration
                .entry([http.method.clone(), reporter.to_owned()])
                .or_default()
                .observe(seconds);
        }

        // dns
        if let Some(layer7::Record::Dns(dns)) = record {
            let qtypes = dns.qtypes.join(",");
            let ips = dns.ips.len().to_string();
            if flow.verdict == Verdict::Dropped as i32 {
                bump(&mut s.dns_queries, ["Policy denied", &qtypes, &ips]);
            } else if flow.is_reply != Some(true) {
                bump(&mut s.dns_queries, ["", &qtypes, &ips]);
            } else {
                let rcode = names::dns_rcode_name(dns.rcode).unwrap_or_default();
                bump(&mut s.dns_responses, [rcode, &qtypes, &ips]);
                for rrtype in &dns.rrtypes {
                    bump(&mut s.dns_response_types, [rrtype, &qtypes]);
                }
            }
        }

        // tcp: forwarded/redirected packets only.
        if (flow.verdict == Verdict::Forwarded as i32 || flow.verdict == Verdict::Redirected as i32)
            && let (Some(ip), Some(layer4::Protocol::Tcp(tcp))) = (
                flow.ip.as_ref(),
                flow.l4.as_ref().and_then(|l| l.protocol.as_ref()),
            )
            && let Some(flags) = tcp.flags.as_ref()
        {
            let family =
                IpVersion::try_from(ip.ip_version).map_or("IP_NOT_USED", |v| v.as_str_name());
            if flags.fin {
                bump(&mut s.tcp_flags, ["FIN", family]);
            }
            if flags.syn {
                let flag = if flags.ack { "SYN-ACK" } else { "SYN" };
                bump(&mut s.tcp_flags, [flag, family]);
            }
            if flags.rst {
                bump(&mut s.tcp_flags, ["RST", family]);
            }
        }

        // policy: L3/L4 verdicts (not from the host, which may reach any local endpoint)
        // and L7 access-log verdicts.
        let direction = lowercase(direction_name(flow));
        let action = lowercase(verdict);
        if event_type == monitor_type::POLICY_VERDICT {
            let from_host = flow.source.as_ref().is_some_and(|e| e.identity == 1);
            if !from_host {
                let matched = lowercase(names::match_type_name(flow.policy_match_type));
                bump(&mut s.policy_verdicts, [&direction, &matched, &action]);
            }
        } else if event_type == monitor_type::ACCESS_LOG {
            let matched = match record {
                Some(layer7::Record::Dns(_)) => "l7/dns",
                Some(layer7::Record::Http(_)) => "l7/http",
                None => "l7/",
            };
            bump(&mut s.policy_verdicts, [&direction, matched, &action]);
        }
    }

    /// Prometheus text exposition of every metric with at least one sample, plus the lost
    /// event counters (always present).
    pub fn render(&self, lost: &LostTotals) -> String {
        let s = self.lock();
        let mut out = String::new();
        counter(
            &mut out,
            "hubble_flows_processed_total",
            "Total number of flows processed",
            ["protocol", "type", "subtype", "verdict"],
            &s.flows_processed,
        );
        counter(
            &mut out,
            "hubble_drop_total",
            "Number of drops",
            ["reason", "protocol"],
            &s.drops,
        );
        counter(
            &mut out,
            "hubble_http_requests_total",
            "Count of HTTP requests",
            ["method", "protocol", "status", "reporter"],
            &s.http_requests,
        );
        histogram(
            &mut out,
            "hubble_http_request_duration_seconds",
            "Quantiles of HTTP request duration in seconds",
            ["method", "reporter"],
            &s.http_duration,
        );
        counter(
            &mut out,
            "hubble_dns_queries_total",
            "Number of DNS queries observed",
            ["rcode", "qtypes", "ips_returned"],
            &s.dns_queries,
        );
        counter(
            &mut out,
            "hubble_dns_responses_total",
            "Number of DNS responses observed",
            ["rcode", "qtypes", "ips_returned"],
            &s.dns_responses,
        );
        counter(
            &mut out,
            "hubble_dns_response_types_total",
            "Number of DNS response types",
            ["type", "qtypes"],
            &s.dns_response_types,
        );
        counter(
            &mut out,
            "hubble_tcp_flags_total",
            "TCP flag occurrences",
            ["flag", "family"],
            &s.tcp_flags,
        );
        counter(
            &mut out,
            "hubble_policy_verdicts_total",
            "Total number of Cilium network policy verdicts",
            ["direction", "match", "action"],
            &s.policy_verdicts,
        );
        drop(s);

        let hubble_lost: Counters<1> = [
            (
                Labels(["observer_events_queue".to_owned()]),
                lost.observer_events_queue,
            ),
            (
                Labels(["perf_event_ring_buffer".to_owned()]),
                lost.perf_event_ring_buffer,
            ),
        ]
        .into_iter()
        .collect();
        counter(
            &mut out,
            "hubble_lost_events_total",
            "Number of lost events",
            ["source"],
            &hubble_lost,
        );
        let producer_lost: Counters<1> = crate::input::FlowSource::ALL
            .iter()
            .map(|s| (Labels([s.as_str().to_owned()]), lost.by_producer[s.index()]))
            .collect();
        counter(
            &mut out,
            "membrane_flows_lost_total",
            "Flow events lost before the flow ring, by producer (queue overflow or upstream loss)",
            ["source"],
            &producer_lost,
        );
        out
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn label_set<const N: usize>(
    names: [&str; N],
    values: &[String; N],
    extra: Option<(&str, &str)>,
) -> String {
    let mut parts: Vec<String> = names
        .iter()
        .zip(values)
        .map(|(n, v)| format!("{n}=\"{}\"", escape(v)))
        .collect();
    if let Some((n, v)) = extra {
        parts.push(format!("{n}=\"{v}\""));
    }
    parts.join(",")
}

fn counter<const N: usize>(
    out: &mut String,
    name: &str,
    help: &str,
    labels: [&str; N],
    samples: &Counters<N>,
) {
    if samples.is_empty() {
        return;
    }
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} counter");
    let mut sorted: Vec<(&Labels<N>, &u64)> = samples.iter().collect();
    sorted.sort_unstable();
    for (values, count) in sorted {
        let _ = writeln!(
            out,
            "{name}{{{}}} {count}",
            label_set(labels, &values.0, None)
        );
    }
}

fn histogram<const N: usize>(
    out: &mut String,
    name: &str,
    help: &str,
    labels: [&str; N],
    samples: &BTreeMap<[String; N], Histogram>,
) {
    if samples.is_empty() {
        return;
    }
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (values, h) in samples {
        for (count, bound) in h.buckets.iter().zip(DURATION_BUCKETS) {
            let le = bound.to_string();
            let _ = writeln!(
                out,
                "{name}_bucket{{{}}} {count}",
                label_set(labels, values, Some(("le", &le)))
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{}}} {}",
            label_set(labels, values, Some(("le", "+Inf"))),
            h.count
        );
        let _ = writeln!(
            out,
            "{name}_sum{{{}}} {}",
            label_set(labels, values, None),
            h.sum
        );
        let _ = writeln!(
            out,
            "{name}_count{{{}}} {}",
            label_set(labels, values, None),
            h.count
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::tests::{datapath, dns, enricher, http};
    use crate::convert::to_flow;
    use crate::input::{DatapathEventKind, DatapathVerdict, FlowInput, L7Kind, L7Verdict};

    #[test]
    fn lowercase_names_match_to_lowercase() {
        for name in [
            "INGRESS",
            "EGRESS",
            "TRAFFIC_DIRECTION_UNKNOWN",
            "FORWARDED",
            "DROPPED",
            "ERROR",
            "AUDIT",
            "REDIRECTED",
            "TRACED",
            "TRANSLATED",
            "VERDICT_UNKNOWN",
            "L3-Only",
            "L3-L4",
            "L4-Only",
            "all",
            "L3-Proto",
            "Proto-Only",
            "none",
            "SOMETHING_NEW",
        ] {
            assert_eq!(lowercase(name), name.to_lowercase(), "{name}");
        }
    }

    fn observe(metrics: &Metrics, input: FlowInput) {
        metrics.observe(&to_flow(&input, &enricher(), "node-1"));
    }

    #[test]
    fn names_and_labels_follow_hubble() {
        let m = Metrics::default();
        observe(
            &m,
            FlowInput::Datapath(datapath(
                DatapathEventKind::PolicyVerdict,
                DatapathVerdict::Forwarded,
            )),
        );
        observe(
            &m,
            FlowInput::Datapath(datapath(DatapathEventKind::Drop, DatapathVerdict::Dropped)),
        );
        observe(
            &m,
            FlowInput::Datapath(datapath(
                DatapathEventKind::Trace,
                DatapathVerdict::Forwarded,
            )),
        );
        observe(
            &m,
            FlowInput::Http(http(L7Kind::Request, L7Verdict::Forwarded, None)),
        );
        observe(
            &m,
            FlowInput::Http(http(L7Kind::Response, L7Verdict::Forwarded, Some(200))),
        );
        observe(
            &m,
            FlowInput::Dns(dns(L7Kind::Request, L7Verdict::Forwarded)),
        );
        observe(
            &m,
            FlowInput::Dns(dns(L7Kind::Response, L7Verdict::Forwarded)),
        );
        observe(&m, FlowInput::Dns(dns(L7Kind::Request, L7Verdict::Denied)));
        let text = m.render(&LostTotals {
            perf_event_ring_buffer: 2,
            observer_events_queue: 5,
            by_producer: [2, 3, 2],
        });
        for line in [
            r#"hubble_flows_processed_total{protocol="TCP",type="PolicyVerdict",subtype="",verdict="FORWARDED"} 1"#,
            r#"hubble_flows_processed_total{protocol="TCP",type="Drop",subtype="",verdict="DROPPED"} 1"#,
            r#"hubble_flows_processed_total{protocol="TCP",type="Trace",subtype="from-endpoint",verdict="FORWARDED"} 1"#,
            r#"hubble_flows_processed_total{protocol="HTTP",type="L7",subtype="HTTP",verdict="FORWARDED"} 2"#,
            r#"hubble_flows_processed_total{protocol="DNS",type="L7",subtype="DNS",verdict="DROPPED"} 1"#,
            r#"hubble_drop_total{reason="POLICY_DENIED",protocol="TCP"} 1"#,
            // L7 denials carry no datapath drop reason.
            r#"hubble_drop_total{reason="DROP_REASON_UNKNOWN",protocol="DNS"} 1"#,
            r#"hubble_http_requests_total{method="GET",protocol="HTTP/1.1",status="200",reporter="client"} 1"#,
            r#"hubble_http_request_duration_seconds_bucket{method="GET",reporter="client",le="0.01"} 0"#,
            r#"hubble_http_request_duration_seconds_bucket{method="GET",reporter="client",le="0.025"} 1"#,
            r#"hubble_http_request_duration_seconds_bucket{method="GET",reporter="client",le="+Inf"} 1"#,
            r#"hubble_http_request_duration_seconds_count{method="GET",reporter="client"} 1"#,
            r#"hubble_dns_queries_total{rcode="",qtypes="A",ips_returned="0"} 1"#,
            r#"hubble_dns_queries_total{rcode="Policy denied",qtypes="A",ips_returned="0"} 1"#,
            r#"hubble_dns_responses_total{rcode="No Error",qtypes="A",ips_returned="1"} 1"#,
            r#"hubble_dns_response_types_total{type="A",qtypes="A"} 1"#,
            r#"hubble_tcp_flags_total{flag="SYN",family="IPv4"} 2"#,
            r#"hubble_policy_verdicts_total{direction="egress",match="l3-l4",action="forwarded"} 1"#,
            r#"hubble_policy_verdicts_total{direction="egress",match="l7/http",action="forwarded"} 2"#,
            r#"hubble_policy_verdicts_total{direction="egress",match="l7/dns",action="dropped"} 1"#,
            r#"hubble_lost_events_total{source="observer_events_queue"} 5"#,
            r#"hubble_lost_events_total{source="perf_event_ring_buffer"} 2"#,
            r#"membrane_flows_lost_total{source="proxy"} 3"#,
            "# TYPE hubble_http_request_duration_seconds histogram",
            "# TYPE hubble_flows_processed_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(
            !text.contains(
                "hubble_http_requests_total{method=\"GET\",protocol=\"HTTP/1.1\",status=\"0\""
            ),
            "requests are counted on responses only"
        );
    }

    #[test]
    fn host_sourced_verdicts_are_skipped() {
        let m = Metrics::default();
        let mut ev = datapath(DatapathEventKind::PolicyVerdict, DatapathVerdict::Forwarded);
        ev.src_identity = 1;
        ev.src = "192.0.2.1".parse().expect("ip");
        observe(&m, FlowInput::Datapath(ev));
        assert!(
            !m.render(&LostTotals::default())
                .contains("hubble_policy_verdicts_total")
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
