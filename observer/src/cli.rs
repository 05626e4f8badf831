//! `hubble observe` filter flags → `FlowFilter`s, for `membrane observe` (the CLI parses
//! the arguments; this module only maps them, `hubble/cmd/observe/flows_filter.go`).
//!
//! Flags are applied in command-line order. `--from-X` sets `source_*`, `--to-X` sets
//! `destination_*`, and an unprefixed `--X` fills two filters (source in one, destination
//! in the other) that are ORed. `--not` sends the next flag to the blacklist.

use crate::convert::monitor_type;
use crate::names;
use crate::proto::flow::{
    DropReason, EventTypeFilter, FlowFilter, IpVersion, TcpFlags, TrafficDirection, Verdict,
};

/// A flag the builder could not use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CliFilterError {
    #[error("unknown filter flag --{0}")]
    UnknownFlag(String),
    #[error("invalid --{flag} value {value:?}: {reason}")]
    InvalidValue {
        flag: String,
        value: String,
        reason: String,
    },
    #[error("filters --{0} and --{1} cannot be combined")]
    Conflict(String, String),
    #[error("consecutive --not statements")]
    ConsecutiveNot,
    #[error("--not must be followed by a filter flag")]
    DanglingNot,
}

/// The result: what GetFlows gets as whitelist and blacklist.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ObserveFilters {
    pub whitelist: Vec<FlowFilter>,
    pub blacklist: Vec<FlowFilter>,
}

/// Flags that may not be combined (Hubble's conflict groups).
const CONFLICTS: &[&[&str]] = &[
    &[
        "from-fqdn",
        "from-ip",
        "from-namespace",
        "from-pod",
        "fqdn",
        "ip",
        "namespace",
        "pod",
    ],
    &[
        "to-fqdn",
        "to-ip",
        "to-namespace",
        "to-pod",
        "fqdn",
        "ip",
        "namespace",
        "pod",
    ],
    &["label", "from-label"],
    &["label", "to-label"],
    &["port", "to-port"],
    &["port", "from-port"],
    &["identity", "to-identity"],
    &["identity", "from-identity"],
];

/// One side (whitelist or blacklist) being built: `left OR right`.
#[derive(Default)]
struct Tracker {
    left: Option<FlowFilter>,
    right: Option<FlowFilter>,
    changed: Vec<String>,
}

impl Tracker {
    fn apply(&mut self, update: impl Fn(&mut FlowFilter)) {
        update(self.left.get_or_insert_with(FlowFilter::default));
        update(self.right.get_or_insert_with(FlowFilter::default));
    }

    fn apply_split(
        &mut self,
        left: impl FnOnce(&mut FlowFilter),
        right: impl FnOnce(&mut FlowFilter),
    ) {
        left(self.left.get_or_insert_with(FlowFilter::default));
        right(self.right.get_or_insert_with(FlowFilter::default));
    }

    /// Records the flag; returns whether it is its first use.
    fn track(&mut self, flag: &str) -> Result<bool, CliFilterError> {
        if self.changed.iter().any(|c| c == flag) {
            return Ok(false);
        }
        for group in CONFLICTS {
            if group.contains(&flag)
                && let Some(other) = self
                    .changed
                    .iter()
                    .find(|c| c.as_str() != flag && group.contains(&c.as_str()))
            {
                return Err(CliFilterError::Conflict(other.clone(), flag.to_owned()));
            }
        }
        self.changed.push(flag.to_owned());
        Ok(true)
    }

    fn filters(self) -> Vec<FlowFilter> {
        match (self.left, self.right) {
            (None, None) => Vec::new(),
            (Some(l), Some(r)) if l == r => vec![l],
            (l, r) => l.into_iter().chain(r).collect(),
        }
    }
}

/// Builds filters flag by flag.
#[derive(Default)]
pub struct FilterBuilder {
    whitelist: Tracker,
    blacklist: Tracker,
    negate_next: bool,
}

fn invalid(flag: &str, value: &str, reason: impl ToString) -> CliFilterError {
    CliFilterError::InvalidValue {
        flag: flag.to_owned(),
        value: value.to_owned(),
        reason: reason.to_string(),
    }
}

/// `[namespace/]name`; a pod without a namespace is in `default`, as the CLI assumes.
fn pod_value(value: &str) -> String {
    if value.contains('/') {
        value.to_owned()
    } else {
        format!("default/{value}")
    }
}

fn event_type(flag: &str, value: &str) -> Result<EventTypeFilter, CliFilterError> {
    let (name, sub) = match value.split_once(':') {
        Some((n, s)) => (n, Some(s)),
        None => (value, None),
    };
    let r#type = match name {
        "drop" => monitor_type::DROP,
        "debug" => monitor_type::DEBUG,
        "capture" => monitor_type::CAPTURE,
        "trace" => monitor_type::TRACE,
        "policy-verdict" => monitor_type::POLICY_VERDICT,
        "trace-sock" => monitor_type::TRACE_SOCK,
        "l7" => monitor_type::ACCESS_LOG,
        "agent" => monitor_type::AGENT,
        other => other
            .parse()
            .map_err(|_| invalid(flag, value, "not a known type name nor a number"))?,
    };
    let mut filter = EventTypeFilter {
        r#type,
        match_sub_type: false,
        sub_type: 0,
    };
    if let Some(sub) = sub {
        let sub_type = (r#type == monitor_type::TRACE)
            .then(|| names::observation_point_by_name(sub))
            .flatten()
            .map_or_else(
                || {
                    sub.parse()
                        .map_err(|_| invalid(flag, value, "not a known sub-type nor a number"))
                },
                Ok,
            )?;
        filter.match_sub_type = true;
        filter.sub_type = sub_type;
    }
    Ok(filter)
}

fn tcp_flags(flag: &str, value: &str) -> Result<TcpFlags, CliFilterError> {
    let mut f = TcpFlags::default();
    for name in value.split(',') {
        match name.to_uppercase().as_str() {
            "SYN" => f.syn = true,
            "FIN" => f.fin = true,
            "RST" => f.rst = true,
            "PSH" => f.psh = true,
            "ACK" => f.ack = true,
            "URG" => f.urg = true,
            "ECE" => f.ece = true,
            "CWR" => f.cwr = true,
            "NS" => f.ns = true,
            _ => return Err(invalid(flag, value, format!("unknown tcp flag {name:?}"))),
        }
    }
    Ok(f)
}

impl FilterBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one flag (with or without leading dashes; `-n`, `-t`, `-l`, `-4`, `-6`
    /// accepted). Flags without a value (`--not`, `--ipv4`) ignore `value`.
    pub fn set(&mut self, flag: &str, value: &str) -> Result<(), CliFilterError> {
        let flag = flag.trim_start_matches('-');
        let flag = match flag {
            "n" => "namespace",
            "t" => "type",
            "l" => "label",
            "4" => "ipv4",
            "6" => "ipv6",
            "A" => "all-namespaces",
            other => other,
        };
        if flag == "not" {
            if self.negate_next {
                return Err(CliFilterError::ConsecutiveNot);
            }
            self.negate_next = true;
            return Ok(());
        }
        if flag == "all-namespaces" {
            return Ok(());
        }
        let tracker = if std::mem::take(&mut self.negate_next) {
            &mut self.blacklist
        } else {
            &mut self.whitelist
        };
        let first_use = tracker.track(flag)?;
        let v = value.to_owned();
        match flag {
            "ip" => tracker.apply_split(
                |f| f.source_ip.push(v.clone()),
                |f| f.destination_ip.push(v.clone()),
            ),
            "from-ip" => tracker.apply(|f| f.source_ip.push(v.clone())),
            "to-ip" => tracker.apply(|f| f.destination_ip.push(v.clone())),
            "pod" => {
                let p = pod_value(value);
                tracker.apply_split(
                    |f| f.source_pod.push(p.clone()),
                    |f| f.destination_pod.push(p.clone()),
                );
            }
            "from-pod" => {
                let p = pod_value(value);
                tracker.apply(|f| f.source_pod.push(p.clone()));
            }
            "to-pod" => {
                let p = pod_value(value);
                tracker.apply(|f| f.destination_pod.push(p.clone()));
            }
            "namespace" => {
                let p = format!("{value}/");
                tracker.apply_split(
                    |f| f.source_pod.push(p.clone()),
                    |f| f.destination_pod.push(p.clone()),
                );
            }
            "from-namespace" => {
                let p = format!("{value}/");
                tracker.apply(|f| f.source_pod.push(p.clone()));
            }
            "to-namespace" => {
                let p = format!("{value}/");
                tracker.apply(|f| f.destination_pod.push(p.clone()));
            }
            // Hubble sends these as the pod filter "/": a pod of any namespace.
            "from-all-namespaces" => tracker.apply(|f| f.source_pod.push("/".to_owned())),
            "to-all-namespaces" => tracker.apply(|f| f.destination_pod.push("/".to_owned())),
            "encrypted" => tracker.apply(|f| f.encrypted.push(true)),
            "unencrypted" => tracker.apply(|f| f.encrypted.push(false)),
            "fqdn" => tracker.apply_split(
                |f| f.source_fqdn.push(v.clone()),
                |f| f.destination_fqdn.push(v.clone()),
            ),
            "from-fqdn" => tracker.apply(|f| f.source_fqdn.push(v.clone())),
            "to-fqdn" => tracker.apply(|f| f.destination_fqdn.push(v.clone())),
            "label" => tracker.apply_split(
                |f| f.source_label.push(v.clone()),
                |f| f.destination_label.push(v.clone()),
            ),
            "from-label" => tracker.apply(|f| f.source_label.push(v.clone())),
            "to-label" => tracker.apply(|f| f.destination_label.push(v.clone())),
            "port" => tracker.apply_split(
                |f| f.source_port.push(v.clone()),
                |f| f.destination_port.push(v.clone()),
            ),
            "from-port" => tracker.apply(|f| f.source_port.push(v.clone())),
            "to-port" => tracker.apply(|f| f.destination_port.push(v.clone())),
            "identity" | "from-identity" | "to-identity" => {
                let id = names::identity_by_name(value).ok_or_else(|| {
                    invalid(flag, value, "expected a reserved identity name or a number")
                })?;
                match flag {
                    "identity" => tracker.apply_split(
                        |f| f.source_identity.push(id),
                        |f| f.destination_identity.push(id),
                    ),
                    "from-identity" => tracker.apply(|f| f.source_identity.push(id)),
                    _ => tracker.apply(|f| f.destination_identity.push(id)),
                }
            }
            "verdict" => {
                let verdict = Verdict::from_str_name(value)
                    .ok_or_else(|| invalid(flag, value, "not a verdict name"))?;
                if first_use {
                    tracker.apply(|f| f.verdict.clear());
                }
                tracker.apply(|f| f.verdict.push(verdict as i32));
            }
            "drop-reason-desc" => {
                let reason = DropReason::from_str_name(value)
                    .ok_or_else(|| invalid(flag, value, "not a drop reason name"))?;
                tracker.apply(|f| f.drop_reason_desc.push(reason as i32));
            }
            "type" => {
                let filter = event_type(flag, value)?;
                if first_use {
                    tracker.apply(|f| f.event_type.clear());
                }
                tracker.apply(|f| f.event_type.push(filter));
            }
            "protocol" => tracker.apply(|f| f.protocol.push(v.clone())),
            "http-status" => tracker.apply(|f| f.http_status_code.push(v.clone())),
            "http-method" => tracker.apply(|f| f.http_method.push(v.clone())),
            "http-path" => tracker.apply(|f| f.http_path.push(v.clone())),
            "http-url" => tracker.apply(|f| f.http_url.push(v.clone())),
            "node-name" => tracker.apply(|f| f.node_name.push(v.clone())),
            "tcp-flags" => {
                let flags = tcp_flags(flag, value)?;
                tracker.apply(|f| f.tcp_flags.push(flags));
            }
            "traffic-direction" => {
                let direction = match value.to_lowercase().as_str() {
                    "ingress" => TrafficDirection::Ingress,
                    "egress" => TrafficDirection::Egress,
                    _ => return Err(invalid(flag, value, "expected ingress or egress")),
                };
                tracker.apply(|f| f.traffic_direction.push(direction as i32));
            }
            "ipv4" => tracker.apply(|f| f.ip_version.push(IpVersion::IPv4 as i32)),
            "ipv6" => tracker.apply(|f| f.ip_version.push(IpVersion::IPv6 as i32)),
            "ip-version" => {
                let version = match value.to_lowercase().as_str() {
                    "4" | "v4" | "ipv4" | "ip4" => IpVersion::IPv4,
                    "6" | "v6" | "ipv6" | "ip6" => IpVersion::IPv6,
                    _ => return Err(invalid(flag, value, "expected 4 or 6")),
                };
                tracker.apply(|f| f.ip_version.push(version as i32));
            }
            _ => return Err(CliFilterError::UnknownFlag(flag.to_owned())),
        }
        Ok(())
    }

    /// The whitelist and blacklist.
    pub fn finish(self) -> Result<ObserveFilters, CliFilterError> {
        if self.negate_next {
            return Err(CliFilterError::DanglingNot);
        }
        Ok(ObserveFilters {
            whitelist: self.whitelist.filters(),
            blacklist: self.blacklist.filters(),
        })
    }
}

/// Maps `(flag, value)` pairs, in command-line order, to GetFlows filters.
pub fn filters_from_flags<I, F, V>(flags: I) -> Result<ObserveFilters, CliFilterError>
where
    I: IntoIterator<Item = (F, V)>,
    F: AsRef<str>,
    V: AsRef<str>,
{
    let mut builder = FilterBuilder::new();
    for (flag, value) in flags {
        builder.set(flag.as_ref(), value.as_ref())?;
    }
    builder.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(flags: &[(&str, &str)]) -> Result<ObserveFilters, CliFilterError> {
        filters_from_flags(flags.iter().copied())
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn all_namespaces_and_encryption_flags() {
        let f = build(&[("--from-all-namespaces", ""), ("--to-pod", "prod/web")]).expect("valid");
        assert_eq!(f.whitelist.len(), 1);
        assert_eq!(f.whitelist[0].source_pod, s(&["/"]));
        assert_eq!(f.whitelist[0].destination_pod, s(&["prod/web"]));
        let f = build(&[("--to-all-namespaces", "")]).expect("valid");
        assert_eq!(f.whitelist[0].destination_pod, s(&["/"]));
        let f = build(&[("--unencrypted", "")]).expect("valid");
        assert_eq!(f.whitelist[0].encrypted, [false]);
        let f = build(&[("--not", ""), ("--encrypted", "")]).expect("valid");
        assert_eq!(f.blacklist[0].encrypted, [true]);
    }

    #[test]
    fn unprefixed_flags_make_two_ored_filters() {
        let f = build(&[("--namespace", "prod"), ("--verdict", "DROPPED")]).expect("valid");
        assert_eq!(
            f.whitelist,
            vec![
                FlowFilter {
                    source_pod: s(&["prod/"]),
                    verdict: vec![Verdict::Dropped as i32],
                    ..FlowFilter::default()
                },
                FlowFilter {
                    destination_pod: s(&["prod/"]),
                    verdict: vec![Verdict::Dropped as i32],
                    ..FlowFilter::default()
                },
            ]
        );
        assert!(f.blacklist.is_empty());
    }

    #[test]
    fn prefixed_flags_make_one_filter() {
        let f = build(&[
            ("from-pod", "frontend"),
            ("to-port", "8080"),
            ("--http-method", "GET"),
            ("--http-path", "/api/.*"),
            ("--http-status", "4+"),
            ("-t", "l7"),
            ("--protocol", "http"),
        ])
        .expect("valid");
        assert_eq!(f.whitelist.len(), 1);
        let w = &f.whitelist[0];
        assert_eq!(w.source_pod, ["default/frontend"]);
        assert_eq!(w.destination_port, ["8080"]);
        assert_eq!(w.http_method, ["GET"]);
        assert_eq!(w.http_path, ["/api/.*"]);
        assert_eq!(w.http_status_code, ["4+"]);
        assert_eq!(w.protocol, ["http"]);
        assert_eq!(
            w.event_type,
            [EventTypeFilter {
                r#type: 129,
                match_sub_type: false,
                sub_type: 0
            }]
        );
    }

    #[test]
    fn not_moves_one_flag_to_the_blacklist() {
        let f = build(&[
            ("--from-namespace", "prod"),
            ("--not", ""),
            ("--to-ip", "10.0.0.1"),
            ("--type", "trace:to-endpoint"),
        ])
        .expect("valid");
        assert_eq!(f.blacklist.len(), 1);
        assert_eq!(f.blacklist[0].destination_ip, ["10.0.0.1"]);
        assert!(f.blacklist[0].event_type.is_empty());
        assert_eq!(f.whitelist.len(), 1);
        assert_eq!(f.whitelist[0].source_pod, ["prod/"]);
        assert_eq!(
            f.whitelist[0].event_type,
            [EventTypeFilter {
                r#type: 4,
                match_sub_type: true,
                sub_type: 0
            }]
        );
    }

    #[test]
    fn identities_directions_and_flags() {
        let f = build(&[
            ("--to-identity", "world"),
            ("--traffic-direction", "egress"),
            ("--tcp-flags", "syn,ack"),
            ("--drop-reason-desc", "POLICY_DENIED"),
            ("-4", ""),
        ])
        .expect("valid");
        let w = &f.whitelist[0];
        assert_eq!(w.destination_identity, [2]);
        assert_eq!(w.traffic_direction, [TrafficDirection::Egress as i32]);
        assert!(w.tcp_flags[0].syn && w.tcp_flags[0].ack && !w.tcp_flags[0].fin);
        assert_eq!(w.drop_reason_desc, [133]);
        assert_eq!(w.ip_version, [IpVersion::IPv4 as i32]);
    }

    #[test]
    fn errors() {
        assert_eq!(
            build(&[("--ip", "1.1.1.1"), ("--from-ip", "2.2.2.2")]),
            Err(CliFilterError::Conflict("ip".into(), "from-ip".into()))
        );
        assert_eq!(
            build(&[("--not", ""), ("--not", "")]),
            Err(CliFilterError::ConsecutiveNot)
        );
        assert_eq!(build(&[("--not", "")]), Err(CliFilterError::DanglingNot));
        assert!(matches!(
            build(&[("--verdict", "MAYBE")]),
            Err(CliFilterError::InvalidValue { .. })
        ));
        assert!(matches!(
            build(&[("--type", "nonsense")]),
            Err(CliFilterError::InvalidValue { .. })
        ));
        assert_eq!(
            build(&[("--bogus", "x")]),
            Err(CliFilterError::UnknownFlag("bogus".into()))
        );
    }
}
