//! Field masks for GetFlows: only the requested fields of each flow are sent.
//!
//! Paths use Hubble's proto field names (`source.pod_name`, `IP`, `Type`, `Summary`).
//! Every field of Hubble's `Flow` is accepted, including ones membrane never fills (such
//! as `ethernet` or `ip_trace_id`, which the CLI's default mask asks for); a name that is not
//! a `Flow` field is refused, as Hubble refuses it. Masks select at two levels: a top-level
//! field or a field of a nested message (`source.identity`, `l7.http`); a deeper path
//! copies its second-level field whole.

use std::collections::BTreeMap;

use crate::proto::flow::{Endpoint, Flow, Ip, Layer4, Layer7, layer4, layer7};

/// Every top-level field name of Hubble's `flow.Flow` (v1.19).
const FLOW_FIELDS: &[&str] = &[
    "time",
    "uuid",
    "emitter",
    "verdict",
    "drop_reason",
    "auth_type",
    "ethernet",
    "IP",
    "l4",
    "tunnel",
    "source",
    "destination",
    "Type",
    "node_name",
    "node_labels",
    "source_names",
    "destination_names",
    "l7",
    "reply",
    "event_type",
    "source_service",
    "destination_service",
    "traffic_direction",
    "policy_match_type",
    "trace_observation_point",
    "trace_reason",
    "file",
    "drop_reason_desc",
    "is_reply",
    "debug_capture_point",
    "interface",
    "proxy_port",
    "trace_context",
    "sock_xlate_point",
    "socket_cookie",
    "cgroup_id",
    "ip_trace_id",
    "Summary",
    "extensions",
    "egress_allowed_by",
    "ingress_allowed_by",
    "egress_denied_by",
    "ingress_denied_by",
    "policy_log",
    "aggregate",
];

const ENDPOINT_FIELDS: &[&str] = &[
    "ID",
    "identity",
    "cluster_name",
    "namespace",
    "labels",
    "pod_name",
    "workloads",
];
const IP_FIELDS: &[&str] = &[
    "source",
    "source_xlated",
    "destination",
    "ipVersion",
    "encrypted",
];
const L4_FIELDS: &[&str] = &["TCP", "UDP", "ICMPv4", "ICMPv6", "SCTP", "VRRP", "IGMP"];
const L7_FIELDS: &[&str] = &["type", "latency_ns", "dns", "http", "kafka"];
const EVENT_TYPE_FIELDS: &[&str] = &["type", "sub_type"];
const SERVICE_FIELDS: &[&str] = &["name", "namespace"];
const INTERFACE_FIELDS: &[&str] = &["index", "name"];
const POLICY_FIELDS: &[&str] = &["name", "namespace", "labels", "revision", "kind"];

fn sub_fields(field: &str) -> Option<&'static [&'static str]> {
    Some(match field {
        "source" | "destination" => ENDPOINT_FIELDS,
        "IP" => IP_FIELDS,
        "l4" => L4_FIELDS,
        "l7" => L7_FIELDS,
        "event_type" => EVENT_TYPE_FIELDS,
        "source_service" | "destination_service" => SERVICE_FIELDS,
        "interface" => INTERFACE_FIELDS,
        "egress_allowed_by" | "ingress_allowed_by" | "egress_denied_by" | "ingress_denied_by" => {
            POLICY_FIELDS
        }
        _ => return None,
    })
}

/// An invalid field-mask path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid field mask path {path:?}: {reason}")]
pub struct FieldMaskError {
    pub path: String,
    pub reason: &'static str,
}

/// What a mask selects of one top-level field.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Selection {
    Whole,
    Fields(Vec<String>),
}

/// A compiled mask: top-level field → what of it is selected.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowMask {
    fields: BTreeMap<String, Selection>,
}

impl FlowMask {
    /// Compiles mask paths; no paths means no mask (whole flows).
    pub fn new<S: AsRef<str>>(paths: &[S]) -> Result<Self, FieldMaskError> {
        let mut fields: BTreeMap<String, Selection> = BTreeMap::new();
        for path in paths {
            let path = path.as_ref();
            let err = |reason| FieldMaskError {
                path: path.to_owned(),
                reason,
            };
            let mut parts = path.split('.');
            let top = parts.next().unwrap_or_default();
            if !FLOW_FIELDS.contains(&top) {
                return Err(err("not a field of flow.Flow"));
            }
            match parts.next() {
                None => {
                    fields.insert(top.to_owned(), Selection::Whole);
                }
                Some(sub) => {
                    let known = sub_fields(top).ok_or_else(|| err("field has no sub-fields"))?;
                    if !known.contains(&sub) {
                        return Err(err("not a field of the nested message"));
                    }
                    let entry = fields
                        .entry(top.to_owned())
                        .or_insert_with(|| Selection::Fields(Vec::new()));
                    if let Selection::Fields(subs) = entry {
                        subs.push(sub.to_owned());
                    }
                }
            }
        }
        Ok(Self { fields })
    }

    /// Whether a mask is in effect.
    pub fn is_active(&self) -> bool {
        !self.fields.is_empty()
    }

    /// A copy of `flow` with only the masked fields set (the whole flow without a mask).
    pub fn apply(&self, flow: &Flow) -> Flow {
        if !self.is_active() {
            return flow.clone();
        }
        let mut out = Flow::default();
        for (field, selection) in &self.fields {
            let subs: &[String] = match selection {
                Selection::Whole => &[],
                Selection::Fields(subs) => subs,
            };
            copy_field(&mut out, flow, field, subs);
        }
        out
    }
}

/// Whether sub-field `name` is selected (an empty list selects the whole message).
fn has(subs: &[String], name: &str) -> bool {
    subs.is_empty() || subs.iter().any(|s| s == name)
}

fn mask_endpoint(ep: &Endpoint, subs: &[String]) -> Endpoint {
    Endpoint {
        id: if has(subs, "ID") { ep.id } else { 0 },
        identity: if has(subs, "identity") {
            ep.identity
        } else {
            0
        },
        namespace: if has(subs, "namespace") {
            ep.namespace.clone()
        } else {
            String::new()
        },
        labels: if has(subs, "labels") {
            ep.labels.clone()
        } else {
            Vec::new()
        },
        pod_name: if has(subs, "pod_name") {
            ep.pod_name.clone()
        } else {
            String::new()
        },
    }
}

fn mask_ip(ip: &Ip, subs: &[String]) -> Ip {
    Ip {
        source: if has(subs, "source") {
            ip.source.clone()
        } else {
            String::new()
        },
        destination: if has(subs, "destination") {
            ip.destination.clone()
        } else {
            String::new()
        },
        ip_version: if has(subs, "ipVersion") {
            ip.ip_version
        } else {
            0
        },
        encrypted: has(subs, "encrypted") && ip.encrypted,
    }
}

fn mask_l4(l4: &Layer4, subs: &[String]) -> Layer4 {
    let keep = match &l4.protocol {
        Some(layer4::Protocol::Tcp(_)) => has(subs, "TCP"),
        Some(layer4::Protocol::Udp(_)) => has(subs, "UDP"),
        Some(layer4::Protocol::IcmPv4(_)) => has(subs, "ICMPv4"),
        Some(layer4::Protocol::IcmPv6(_)) => has(subs, "ICMPv6"),
        Some(layer4::Protocol::Sctp(_)) => has(subs, "SCTP"),
        None => false,
    };
    Layer4 {
        protocol: if keep { l4.protocol } else { None },
    }
}

fn mask_l7(l7: &Layer7, subs: &[String]) -> Layer7 {
    let keep = match &l7.record {
        Some(layer7::Record::Dns(_)) => has(subs, "dns"),
        Some(layer7::Record::Http(_)) => has(subs, "http"),
        None => false,
    };
    Layer7 {
        r#type: if has(subs, "type") { l7.r#type } else { 0 },
        latency_ns: if has(subs, "latency_ns") {
            l7.latency_ns
        } else {
            0
        },
        record: if keep { l7.record.clone() } else { None },
    }
}

fn copy_field(out: &mut Flow, f: &Flow, field: &str, subs: &[String]) {
    use crate::proto::flow::{CiliumEventType, NetworkInterface, Policy, Service};
    let svc = |s: &Option<Service>| {
        s.as_ref().map(|s| Service {
            name: if has(subs, "name") {
                s.name.clone()
            } else {
                String::new()
            },
            namespace: if has(subs, "namespace") {
                s.namespace.clone()
            } else {
                String::new()
            },
        })
    };
    let policies = |list: &[Policy]| -> Vec<Policy> {
        list.iter()
            .map(|p| Policy {
                name: if has(subs, "name") {
                    p.name.clone()
                } else {
                    String::new()
                },
                namespace: if has(subs, "namespace") {
                    p.namespace.clone()
                } else {
                    String::new()
                },
                labels: if has(subs, "labels") {
                    p.labels.clone()
                } else {
                    Vec::new()
                },
                revision: if has(subs, "revision") { p.revision } else { 0 },
                kind: if has(subs, "kind") {
                    p.kind.clone()
                } else {
                    String::new()
                },
            })
            .collect()
    };
    match field {
        "time" => out.time = f.time,
        "verdict" => out.verdict = f.verdict,
        "drop_reason" => out.drop_reason = f.drop_reason,
        "IP" => out.ip = f.ip.as_ref().map(|ip| mask_ip(ip, subs)),
        "l4" => out.l4 = f.l4.as_ref().map(|l4| mask_l4(l4, subs)),
        "source" => out.source = f.source.as_ref().map(|e| mask_endpoint(e, subs)),
        "destination" => out.destination = f.destination.as_ref().map(|e| mask_endpoint(e, subs)),
        "Type" => out.r#type = f.r#type,
        "node_name" => out.node_name.clone_from(&f.node_name),
        "source_names" => out.source_names.clone_from(&f.source_names),
        "destination_names" => out.destination_names.clone_from(&f.destination_names),
        "l7" => out.l7 = f.l7.as_ref().map(|l7| mask_l7(l7, subs)),
        "reply" => out.reply = f.reply,
        "event_type" => {
            out.event_type = f.event_type.as_ref().map(|e| CiliumEventType {
                r#type: if has(subs, "type") { e.r#type } else { 0 },
                sub_type: if has(subs, "sub_type") { e.sub_type } else { 0 },
            });
        }
        "source_service" => out.source_service = svc(&f.source_service),
        "destination_service" => out.destination_service = svc(&f.destination_service),
        "traffic_direction" => out.traffic_direction = f.traffic_direction,
        "policy_match_type" => out.policy_match_type = f.policy_match_type,
        "trace_observation_point" => out.trace_observation_point = f.trace_observation_point,
        "drop_reason_desc" => out.drop_reason_desc = f.drop_reason_desc,
        "is_reply" => out.is_reply = f.is_reply,
        "interface" => {
            out.interface = f.interface.as_ref().map(|i| NetworkInterface {
                index: if has(subs, "index") { i.index } else { 0 },
                name: if has(subs, "name") {
                    i.name.clone()
                } else {
                    String::new()
                },
            });
        }
        "proxy_port" => out.proxy_port = f.proxy_port,
        "Summary" => out.summary.clone_from(&f.summary),
        "egress_allowed_by" => out.egress_allowed_by = policies(&f.egress_allowed_by),
        "ingress_allowed_by" => out.ingress_allowed_by = policies(&f.ingress_allowed_by),
        "egress_denied_by" => out.egress_denied_by = policies(&f.egress_denied_by),
        "ingress_denied_by" => out.ingress_denied_by = policies(&f.ingress_denied_by),
        // Hubble fields membrane never fills: nothing to copy.
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::tests::{datapath, enricher, http};
    use crate::convert::to_flow;
    use crate::input::{DatapathEventKind, DatapathVerdict, FlowInput, L7Kind, L7Verdict};

    /// The mask `hubble observe` sends by default for compact/dict/table output.
    const CLI_DEFAULT_MASK: [&str; 20] = [
        "time",
        "verdict",
        "ethernet",
        "IP",
        "l4",
        "source.identity",
        "source.namespace",
        "source.pod_name",
        "destination.identity",
        "destination.namespace",
        "destination.pod_name",
        "Type",
        "node_name",
        "l7",
        "event_type",
        "source_service",
        "destination_service",
        "is_reply",
        "Summary",
        "ip_trace_id",
    ];

    fn flow() -> Flow {
        to_flow(
            &FlowInput::Datapath(datapath(
                DatapathEventKind::PolicyVerdict,
                DatapathVerdict::Forwarded,
            )),
            &enricher(),
            "node-1",
        )
    }

    #[test]
    fn cli_default_mask_is_accepted_and_copies_only_its_fields() {
        let mask = FlowMask::new(&CLI_DEFAULT_MASK).expect("the CLI's default mask is valid");
        let full = flow();
        let masked = mask.apply(&full);
        assert_eq!(masked.time, full.time);
        assert_eq!(masked.summary, full.summary);
        assert_eq!(masked.ip, full.ip);
        assert_eq!(masked.is_reply, full.is_reply);
        let src = masked.source.as_ref().expect("source");
        assert_eq!(src.identity, 1001);
        assert_eq!(src.pod_name, "frontend-7d9f");
        assert_eq!(src.id, 0, "ID was not requested");
        assert!(src.labels.is_empty(), "labels were not requested");
        assert_eq!(masked.traffic_direction, 0, "not requested");
        assert_eq!(masked.policy_match_type, 0, "not requested");
    }

    #[test]
    fn nested_selection_and_whole_field_win() {
        let full = to_flow(
            &FlowInput::Http(http(L7Kind::Response, L7Verdict::Forwarded, Some(200))),
            &enricher(),
            "n",
        );
        let mask = FlowMask::new(&["l7.latency_ns", "source.labels", "source"]).expect("valid");
        let masked = mask.apply(&full);
        let l7 = masked.l7.as_ref().expect("l7");
        assert_eq!(l7.latency_ns, 12_000_000);
        assert!(l7.record.is_none(), "only latency_ns was requested");
        assert_eq!(
            masked.source, full.source,
            "`source` selects the whole endpoint"
        );
        assert!(masked.destination.is_none());
    }

    #[test]
    fn no_paths_means_no_mask() {
        let mask = FlowMask::new::<&str>(&[]).expect("valid");
        assert!(!mask.is_active());
        assert_eq!(mask.apply(&flow()), flow());
    }

    #[test]
    fn unknown_paths_are_refused() {
        for bad in ["nonsense", "source.nonsense", "verdict.x", "Ip", ""] {
            assert!(FlowMask::new(&[bad]).is_err(), "{bad:?} should be refused");
        }
    }
}
