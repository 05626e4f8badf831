//! DNS records: what the DNS proxy did with each query and response, for flows (Hubble
//! L7 DNS events, cilium-semantics.md §4.5) and logs.
//!
//! A parallel type to [`crate::access::AccessRecord`] rather than a variant of it: DNS
//! records carry names, query types, rcodes and addresses, none of which fit the HTTP
//! record, and HTTP consumers should not have to match on DNS. The sink, [`DnsLog`],
//! behaves exactly like [`crate::access::AccessLog`]: a bounded `tokio::sync::mpsc`
//! channel fed with `try_send`, so DNS traffic never waits for a slow consumer; a record
//! that does not fit is dropped and counted.
//!
//! Per query (as Cilium's `NotifyOnDNSMsg`): a `Query` record when the policy decided
//! (verdict forwarded or denied, or error for a malformed query the proxy answered or
//! dropped), and for forwarded queries a `Response` record when the answer is released (or
//! the upstream failed).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use super::policy::{DnsRuleRef, DnsTransport};

/// Query or response (Hubble's `L7FlowType` REQUEST / RESPONSE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DnsRecordKind {
    Query,
    Response,
}

/// What the proxy did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DnsVerdict {
    /// Allowed by policy and sent upstream (query), or the upstream's answer released
    /// (response).
    Forwarded,
    /// Denied by policy; the client got REFUSED or NXDOMAIN.
    Denied,
    /// Not processed normally: malformed query, routing failure, upstream failure.
    Error,
}

impl fmt::Display for DnsVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Forwarded => "forwarded",
            Self::Denied => "denied",
            Self::Error => "error",
        })
    }
}

/// One DNS record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsRecord {
    pub kind: DnsRecordKind,
    pub verdict: DnsVerdict,
    pub timestamp: SystemTime,
    pub transport: DnsTransport,
    /// The client.
    pub source: SocketAddr,
    /// The DNS server (the original destination in transparent mode); the proxy's own
    /// address when no route was found.
    pub destination: SocketAddr,
    pub endpoint: Option<u64>,
    /// The client's message ID.
    pub id: u16,
    /// Question name, lower-cased and fully qualified; empty when unreadable.
    pub qname: String,
    /// Question types (`A`, `AAAA`, …).
    pub qtypes: Vec<String>,
    /// Response code sent to the client (`None`: no response was sent).
    pub rcode: Option<u16>,
    /// Addresses of the name and its CNAME chain (responses).
    pub ips: Vec<IpAddr>,
    /// Minimum TTL of the chain, before the configured minimum (responses with addresses).
    pub ttl: Option<u32>,
    pub cnames: Vec<String>,
    /// Types of the answer records (responses).
    pub rrtypes: Vec<String>,
    /// The rule that allowed the query.
    pub rule: Option<DnsRuleRef>,
    /// From receiving the query to releasing the response (responses).
    pub latency: Option<Duration>,
    /// Whether the proxy set TC to fit the client's UDP size (responses).
    pub truncated_by_proxy: bool,
    /// What went wrong, or the FQDN learning outcome when it was not clean.
    pub error: Option<String>,
}

impl fmt::Display for DnsRecord {
    /// One line: `127.0.0.1:5000 -> 127.0.0.1:53 UDP response forwarded www.example.com. A
    /// rcode 0 [192.0.2.1] ttl 60 2ms`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            DnsRecordKind::Query => "query",
            DnsRecordKind::Response => "response",
        };
        write!(
            f,
            "{} -> {} {} {kind} {} {} {}",
            self.source,
            self.destination,
            self.transport,
            self.verdict,
            self.qname,
            self.qtypes.join(",")
        )?;
        if let Some(rcode) = self.rcode {
            write!(f, " rcode {rcode}")?;
        }
        if !self.ips.is_empty() {
            let ips: Vec<String> = self.ips.iter().map(ToString::to_string).collect();
            write!(f, " [{}]", ips.join(" "))?;
        }
        if let Some(ttl) = self.ttl {
            write!(f, " ttl {ttl}")?;
        }
        if let Some(latency) = self.latency {
            write!(f, " {}ms", latency.as_millis())?;
        }
        if self.truncated_by_proxy {
            f.write_str(" truncated")?;
        }
        if let Some(error) = &self.error {
            write!(f, ": {error}")?;
        }
        Ok(())
    }
}

/// The DNS record sink (the same bounded, never-waiting channel as HTTP access records).
pub type DnsLog = crate::access::RecordLog<DnsRecord>;

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> DnsRecord {
        DnsRecord {
            kind: DnsRecordKind::Response,
            verdict: DnsVerdict::Forwarded,
            timestamp: SystemTime::UNIX_EPOCH,
            transport: DnsTransport::Udp,
            source: "127.0.0.1:5000".parse().expect("addr"),
            destination: "127.0.0.1:53".parse().expect("addr"),
            endpoint: None,
            id: 1,
            qname: "www.example.com.".into(),
            qtypes: vec!["A".into()],
            rcode: Some(0),
            ips: vec!["192.0.2.1".parse().expect("ip")],
            ttl: Some(60),
            cnames: Vec::new(),
            rrtypes: vec!["A".into()],
            rule: None,
            latency: Some(Duration::from_millis(2)),
            truncated_by_proxy: false,
            error: None,
        }
    }

    #[test]
    fn overflow_is_counted_and_never_blocks() {
        let (log, mut receiver) = DnsLog::channel(1);
        log.record(record());
        log.record(record());
        assert_eq!(log.dropped(), 1);
        assert!(receiver.try_recv().is_ok());
        drop(receiver);
        log.record(record());
        assert_eq!(log.dropped(), 2);
        let disabled = DnsLog::disabled();
        disabled.record(record());
        assert_eq!(disabled.dropped(), 0);
    }

    #[test]
    fn display_is_one_line() {
        assert_eq!(
            record().to_string(),
            "127.0.0.1:5000 -> 127.0.0.1:53 UDP response forwarded www.example.com. A rcode 0 [192.0.2.1] ttl 60 2ms"
        );
    }
}
