//! Datapath flow events: read from the kernel's ring buffer, kept in the agent's own bounded
//! ring (`membrane bpf`/API `Flows`) and fed into the Hubble pipeline with the rule cookie's
//! policy attached; losses (ring full in the kernel, undecodable records) reported to the
//! observer, never silent.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, SystemTime},
};

use membrane_agent_api::{api::FlowRow, shutdown::Shutdown};
use membrane_datapath::{EventReader, FlowEventView};
use membrane_observer::{
    DatapathEvent, DatapathEventKind, DatapathVerdict, FlowInput, FlowSource, Observer,
};

use crate::daemon::{State, lock};

/// How long the reader waits for events before it looks at the shutdown signal and the loss
/// counters again. The datapath wakes the reader at most every 10 ms per CPU (or when 64 KiB
/// wait), so events written in between wait for this timeout: it bounds how late a flow
/// reaches the observer.
const POLL: Duration = Duration::from_millis(50);

/// Starts the thread that reads the datapath's events until `shutdown`.
pub(crate) fn start_reader(
    mut reader: EventReader,
    state: Arc<Mutex<State>>,
    observer: Observer,
    shutdown: Shutdown,
) -> JoinHandle<()> {
    let sender = observer.sender();
    std::thread::spawn(move || {
        let (mut kernel_lost, mut undecodable) = (0u64, 0u64);
        while !shutdown.is_triggered() {
            let batch = reader.wait(POLL).unwrap_or_default();
            let mut s = lock(&state);
            for event in batch {
                s.flows_seen += 1;
                sender.send(FlowInput::Datapath(to_observer_event(&event, &s.cookies)));
                if s.flows.len() >= s.config.flow_capacity {
                    s.flows.pop_front();
                }
                s.flows.push_back(event);
            }
            // Losses the kernel counted (ring full) and records the reader could not decode.
            let now_lost = s.datapath.metrics().events_lost().unwrap_or(kernel_lost);
            let now_undecodable = reader.undecodable();
            let delta =
                now_lost.saturating_sub(kernel_lost) + now_undecodable.saturating_sub(undecodable);
            if delta > 0 {
                observer.report_lost(FlowSource::Datapath, delta);
            }
            (kernel_lost, undecodable) = (now_lost, now_undecodable);
        }
    })
}

/// A datapath event as the API's `Flows` reply shows it.
pub(crate) fn flow_row(e: &FlowEventView) -> FlowRow {
    FlowRow {
        kind: format!("{:?}", e.kind),
        verdict: format!("{:?}", e.verdict),
        drop_reason: e.drop_reason,
        drop_reason_desc: e
            .drop_reason
            .map(|r| membrane_common::reason::describe(r).to_owned()),
        direction: e.direction.as_str().to_owned(),
        match_type: e.match_type,
        protocol: membrane_datapath::maps::protocol_name(e.protocol).to_string(),
        src: format!("{}:{}", e.src, e.sport),
        dst: format!("{}:{}", e.dst, e.dport),
        src_identity: e.src_identity,
        dst_identity: e.dst_identity,
        endpoint_id: e.endpoint_id,
        proxy_port: e.proxy_port,
        rule_cookie: e.rule_cookie,
    }
}

/// The observer's form of a datapath event. The kernel stamps events with its monotonic
/// clock; wall time is now minus their age.
pub(crate) fn to_observer_event(
    e: &FlowEventView,
    cookies: &BTreeMap<u32, String>,
) -> DatapathEvent {
    let age = membrane_datapath::maps::monotonic_ns().saturating_sub(e.timestamp_ns);
    let time = SystemTime::now() - Duration::from_nanos(age);
    let kind = match e.kind {
        membrane_datapath::EventKind::Drop => DatapathEventKind::Drop,
        membrane_datapath::EventKind::Trace => DatapathEventKind::Trace,
        membrane_datapath::EventKind::PolicyVerdict => DatapathEventKind::PolicyVerdict,
    };
    let verdict = match e.verdict {
        membrane_datapath::EventVerdict::Forwarded => DatapathVerdict::Forwarded,
        membrane_datapath::EventVerdict::Dropped => DatapathVerdict::Dropped,
        membrane_datapath::EventVerdict::Redirected => DatapathVerdict::Redirected,
    };
    let direction = match e.direction {
        membrane_common::Direction::Ingress => membrane_observer::Direction::Ingress,
        membrane_common::Direction::Egress => membrane_observer::Direction::Egress,
    };
    // Cookie origins read "CiliumNetworkPolicy ns/name specs[0] egress[1]" or
    // "CiliumClusterwideNetworkPolicy name spec egress[0]".
    let policy = cookies.get(&e.rule_cookie).map(|origin| {
        let mut words = origin.split(' ');
        let kind = words.next().unwrap_or_default().to_owned();
        let target = words.next().unwrap_or_default();
        let (namespace, name) = match target.split_once('/') {
            Some((ns, name)) => (ns.to_owned(), name.to_owned()),
            None => (String::new(), target.to_owned()),
        };
        membrane_observer::PolicyRef {
            name,
            namespace,
            kind,
            labels: Vec::new(),
            revision: 0,
        }
    });
    DatapathEvent {
        time,
        kind,
        verdict,
        drop_reason: e.drop_reason,
        direction,
        match_type: e.match_type,
        protocol: e.protocol,
        tcp_flags: e.tcp_flags,
        endpoint_id: e.endpoint_id,
        src_identity: e.src_identity,
        dst_identity: e.dst_identity,
        src: std::net::IpAddr::V4(e.src),
        sport: e.sport,
        dst: std::net::IpAddr::V4(e.dst),
        dport: e.dport,
        icmp_code: 0,
        proxy_port: e.proxy_port,
        ifindex: e.ifindex,
        // The programs report first packets (traces, verdicts); drops may be either.
        is_reply: if kind == DatapathEventKind::Drop {
            None
        } else {
            Some(false)
        },
        observation_point: None,
        policy,
    }
}
