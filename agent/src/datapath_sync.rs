//! Writing the policy model's resolution into the kernel maps: each
//! [`membrane_policy::PolicyKey`]/[`membrane_policy::PolicyEntry`] becomes a datapath
//! [`PolicyRule`], and an [`EntryDiff`] becomes inserts and removals, so a change touches only
//! the entries it changed.

use std::net::IpAddr;

use membrane_common::Direction;
use membrane_datapath::{
    DatapathError, Ipv4Prefix, PolicyMap, PolicyRule, PolicyVerdict, PortMatch,
};
use membrane_policy::{Action, EndpointPolicy, EntryDiff, IpPrefix, PolicyEntry, PolicyKey};

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("endpoint {endpoint}: entry {key:?}: {detail}")]
    Entry {
        endpoint: u64,
        key: String,
        detail: String,
    },
    #[error("endpoint {endpoint}: {source}")]
    Datapath {
        endpoint: u64,
        #[source]
        source: Box<DatapathError>,
    },
}

/// The datapath form of one resolved entry.
pub fn to_datapath_rule(
    endpoint_id: u64,
    key: &PolicyKey,
    entry: &PolicyEntry,
) -> Result<PolicyRule, SyncError> {
    let bad = |detail: String| SyncError::Entry {
        endpoint: endpoint_id,
        key: format!("{key:?}"),
        detail,
    };
    let endpoint =
        u32::try_from(endpoint_id).map_err(|_| bad("endpoint id exceeds 32 bits".into()))?;
    let direction = match key.direction {
        membrane_policy::Direction::Ingress => Direction::Ingress,
        membrane_policy::Direction::Egress => Direction::Egress,
    };
    let ports = match key.port_prefix_len {
        0 => PortMatch::Any,
        16 => PortMatch::Exact(key.port),
        len @ 1..=15 => PortMatch::Prefix {
            port: key.port,
            len,
        },
        other => return Err(bad(format!("port prefix length {other} is over 16"))),
    };
    let verdict = match entry.action {
        Action::Allow => PolicyVerdict::Allow,
        Action::Deny => PolicyVerdict::Deny,
        Action::Redirect => PolicyVerdict::Redirect(entry.proxy_port),
    };
    Ok(PolicyRule {
        endpoint_id: endpoint,
        direction,
        remote_identity: key.identity.0,
        protocol: key.protocol,
        ports,
        verdict,
        precedence: entry.precedence,
        cookie: entry.cookie,
    })
}

fn datapath_err(endpoint: u64) -> impl FnOnce(DatapathError) -> SyncError {
    move |source| SyncError::Datapath {
        endpoint,
        source: Box::new(source),
    }
}

/// Writes every entry of an endpoint's resolved policy.
pub fn install(map: &mut PolicyMap, policy: &EndpointPolicy) -> Result<usize, SyncError> {
    for (key, entry) in &policy.entries {
        let rule = to_datapath_rule(policy.endpoint_id, key, entry)?;
        map.insert(&rule)
            .map_err(datapath_err(policy.endpoint_id))?;
    }
    Ok(policy.entries.len())
}

/// Applies a diff: removals first would open a window where neither the old nor the new
/// entry exists (a drop), so inserts and replacements go first, then removals.
pub fn apply_diff(
    map: &mut PolicyMap,
    endpoint_id: u64,
    diff: &EntryDiff,
) -> Result<(), SyncError> {
    for (key, entry) in diff.added.iter().chain(&diff.changed) {
        let rule = to_datapath_rule(endpoint_id, key, entry)?;
        map.insert(&rule).map_err(datapath_err(endpoint_id))?;
    }
    for (key, entry) in &diff.removed {
        let rule = to_datapath_rule(endpoint_id, key, entry)?;
        map.remove(&rule).map_err(datapath_err(endpoint_id))?;
    }
    Ok(())
}

/// An IPv4 policy prefix as an ipcache key; `None` for IPv6 (the datapath is IPv4 only).
pub fn ipv4_prefix(prefix: &IpPrefix) -> Option<Ipv4Prefix> {
    match prefix.addr() {
        IpAddr::V4(addr) => Ipv4Prefix::new(addr, prefix.prefix_len()).ok(),
        IpAddr::V6(_) => None,
    }
}
