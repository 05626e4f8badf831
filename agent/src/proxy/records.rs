//! The proxy's access and DNS records (JSON datagrams on the run's record socket) in the
//! flow pipeline's form.

use std::{
    net::IpAddr,
    time::{Duration, SystemTime},
};

/// The header a flow carries per Wasm filter decision (`hubble observe -o json` shows it
/// with the request's other headers): `FILTER PHASE: OUTCOME`.
pub const FILTER_HEADER: &str = "x-membrane-filter";

/// The agent's form of a proxy record line, for the flow pipeline. `None` for lines that are
/// not records (the proxy's logs go to stderr, but be lenient).
pub fn record_to_flow(
    line: &str,
    endpoint_of: impl Fn(IpAddr) -> Option<u32>,
) -> Option<membrane_observer::HttpRecord> {
    use membrane_observer::{HttpRecord, L7Kind, L7Verdict};
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let source: std::net::SocketAddr = v["source"].as_str()?.parse().ok()?;
    let destination: std::net::SocketAddr = v["destination"].as_str()?.parse().ok()?;
    let (kind, verdict) = match v["kind"].as_str()? {
        "request" => (L7Kind::Request, L7Verdict::Forwarded),
        "denied" => (L7Kind::Request, L7Verdict::Denied),
        _ if !v["error"].is_null() => (L7Kind::Response, L7Verdict::Error),
        _ => (L7Kind::Response, L7Verdict::Forwarded),
    };
    let nanos: u64 = v["time_ns"].as_str()?.parse().ok()?;
    // Egress when the client is a local endpoint, else ingress.
    let (endpoint_id, direction) = match endpoint_of(source.ip()) {
        Some(id) => (id, membrane_observer::Direction::Egress),
        None => (
            endpoint_of(destination.ip()).unwrap_or(0),
            membrane_observer::Direction::Ingress,
        ),
    };
    let url = v["url"].as_str().unwrap_or_default();
    // A relayed TLS connection (`serverNames`) is one record with a `tls://` URL: it is not
    // HTTP, whatever version field the record carries.
    let protocol = match v["version"].as_str().unwrap_or_default() {
        _ if url.starts_with("tls://") => "TLS",
        "HTTP/1.0" => "HTTP/1.0",
        "HTTP/2.0" => "HTTP/2",
        _ => "HTTP/1.1",
    };
    Some(HttpRecord {
        time: SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos),
        kind,
        verdict,
        method: v["method"].as_str().unwrap_or_default().to_owned(),
        url: url.to_owned(),
        protocol: protocol.to_owned(),
        status: v["status"].as_u64().and_then(|s| u16::try_from(s).ok()),
        latency: v["latency_ns"].as_u64().map(Duration::from_nanos),
        headers: v["filters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| f.as_str())
            .map(|f| (FILTER_HEADER.to_owned(), f.to_owned()))
            .collect(),
        client: source,
        server: destination,
        client_identity: v["source_identity"]
            .as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .unwrap_or(0),
        server_identity: v["destination_identity"]
            .as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .unwrap_or(0),
        endpoint_id,
        direction,
        policy: None,
    })
}

/// A DNS type's number from its name (`A`, `AAAA`, `TYPE65`); `None` for unknown names.
fn dns_type_number(name: &str) -> Option<u16> {
    Some(match name {
        "A" => 1,
        "NS" => 2,
        "CNAME" => 5,
        "SOA" => 6,
        "PTR" => 12,
        "MX" => 15,
        "TXT" => 16,
        "AAAA" => 28,
        "SRV" => 33,
        "NAPTR" => 35,
        "OPT" => 41,
        "SVCB" => 64,
        "HTTPS" => 65,
        "CAA" => 257,
        "ANY" => 255,
        other => return other.strip_prefix("TYPE").and_then(|n| n.parse().ok()),
    })
}

/// The agent's form of a DNS record line (see [`dns_record_json`]); `None` for other lines.
/// `who(ip)` gives an address's endpoint id (0 = not local) and identity.
pub fn dns_record_to_flow(
    line: &str,
    who: impl Fn(IpAddr) -> (u32, u32),
) -> Option<membrane_observer::DnsRecord> {
    use membrane_observer::{DnsObservationSource, DnsRecord, L7Kind, L7Verdict};
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if v["type"].as_str()? != "dns" {
        return None;
    }
    let client: std::net::SocketAddr = v["source"].as_str()?.parse().ok()?;
    let server: std::net::SocketAddr = v["destination"].as_str()?.parse().ok()?;
    let nanos: u64 = v["time_ns"].as_str()?.parse().ok()?;
    let strings = |key: &str| -> Vec<String> {
        v[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (client_endpoint, client_identity) = who(client.ip());
    let (_, server_identity) = who(server.ip());
    Some(DnsRecord {
        time: SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos),
        kind: match v["kind"].as_str()? {
            "query" => L7Kind::Request,
            _ => L7Kind::Response,
        },
        verdict: match v["verdict"].as_str()? {
            "forwarded" => L7Verdict::Forwarded,
            "denied" => L7Verdict::Denied,
            _ => L7Verdict::Error,
        },
        query: v["qname"].as_str().unwrap_or_default().to_owned(),
        qtypes: strings("qtypes")
            .iter()
            .filter_map(|t| dns_type_number(t))
            .collect(),
        rrtypes: strings("rrtypes")
            .iter()
            .filter_map(|t| dns_type_number(t))
            .collect(),
        ips: strings("ips")
            .iter()
            .filter_map(|i| i.parse().ok())
            .collect(),
        cnames: strings("cnames"),
        ttl: v["ttl"]
            .as_u64()
            .and_then(|t| u32::try_from(t).ok())
            .unwrap_or(0),
        rcode: v["rcode"]
            .as_u64()
            .and_then(|r| u16::try_from(r).ok())
            .unwrap_or(0),
        observation_source: DnsObservationSource::Proxy,
        protocol: v["protocol"]
            .as_u64()
            .and_then(|p| u8::try_from(p).ok())
            .unwrap_or(17),
        client,
        server,
        client_identity,
        server_identity,
        endpoint_id: client_endpoint,
        direction: membrane_observer::Direction::Egress,
        latency: v["latency_ns"].as_u64().map(Duration::from_nanos),
        policy: None,
    })
}
