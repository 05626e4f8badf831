//! Access records: what the proxy did with each request, for flows (Hubble L7 events) and logs.
//!
//! Owns the record type and the sink. The sink is a bounded `tokio::sync::mpsc` channel fed
//! with `try_send`: traffic never waits for a slow consumer; a record that does not fit is
//! dropped and counted (the agent reports the count as lost events, like Hubble's ring).
//!
//! Records follow Cilium's access log (cilium-semantics.md §1.9, §4.5): an allowed request
//! gives a `Request` record when it is forwarded and a `Response` record when the upstream's
//! response headers (or the proxy's own error reply) are sent; a denied request gives a
//! `Denied` record and a `Response` record with status 403; a request rejected as malformed
//! before the policy ran gives a single `Denied` record with status 400 and no rule.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use http::Version;
use tokio::sync::mpsc;

use crate::policy::{HeaderLog, RuleRef};

/// Default capacity of the record channel made by [`AccessLog::channel`] users that do not
/// care: a few seconds of records at a busy node's request rate, a few MiB at most.
pub const DEFAULT_CHANNEL_CAPACITY: usize = 4096;

/// Cilium's `EntryType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordKind {
    Request,
    Response,
    Denied,
}

impl fmt::Display for RecordKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Request => "request",
            Self::Response => "response",
            Self::Denied => "denied",
        })
    }
}

/// One access record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessRecord {
    pub kind: RecordKind,
    /// When the record was made.
    pub timestamp: SystemTime,
    pub version: Version,
    /// Request method; empty when a malformed request had none the proxy could read.
    pub method: String,
    /// `scheme://authority/path?query` as Hubble shows it (authority may be empty).
    pub url: String,
    /// Response status for `Response` records, 403/400 for `Denied` records.
    pub status: Option<u16>,
    /// Time from the request head to the response head (`Response` records only).
    pub latency: Option<Duration>,
    /// The client (downstream peer).
    pub source: SocketAddr,
    /// Where the request goes: the upstream in standalone mode, the original destination in
    /// transparent mode.
    pub destination: SocketAddr,
    /// Security identity of the source (transparent mode; `None` in standalone mode).
    pub source_identity: Option<u32>,
    /// Security identity of the destination (transparent mode; `None` in standalone mode).
    pub destination_identity: Option<u32>,
    /// The policy decision; `None` when the request was rejected before the policy ran.
    pub rule: Option<RuleRef>,
    /// Header mismatches recorded by LOG/ADD/DELETE/REPLACE actions.
    pub header_log: Vec<HeaderLog>,
    /// Why the proxy answered by itself: an upstream failure or a malformed request.
    pub error: Option<String>,
    /// What HTTP filters did to this request so far (empty without filters): a `Response`
    /// record lists the decisions made up to the response head.
    pub filters: Vec<FilterRecord>,
}

/// One filter decision: which filter, in which phase, did what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterRecord {
    /// The filter's name (the `WasmFilter` resource, or the module file stem standalone).
    pub filter: String,
    /// `request_headers`, `request_body`, `response_headers`, `response_body`, ...
    pub phase: &'static str,
    pub outcome: FilterOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterOutcome {
    /// The filter answered by itself with this status.
    LocalReply {
        status: u16,
    },
    HeadersModified,
    BodyModified,
    /// The filter reset the stream.
    Closed,
    /// A callout of the filter came back with this status (`None`: it failed).
    Callout {
        upstream: String,
        status: Option<u16>,
    },
    /// A gRPC callout of the filter finished with this gRPC status (0 OK).
    GrpcCallout {
        upstream: String,
        /// `package.Service/Method`.
        method: String,
        grpc_status: u32,
    },
    /// The filter failed (trap, deadline, memory cap); `action` is what its failure policy
    /// did (`rejected 503`, `bypassed`).
    Failed {
        reason: String,
        action: String,
    },
}

impl fmt::Display for FilterRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: ", self.filter, self.phase)?;
        match &self.outcome {
            FilterOutcome::LocalReply { status } => write!(f, "local reply {status}"),
            FilterOutcome::HeadersModified => f.write_str("headers modified"),
            FilterOutcome::BodyModified => f.write_str("body modified"),
            FilterOutcome::Closed => f.write_str("stream closed"),
            FilterOutcome::Callout {
                upstream,
                status: Some(status),
            } => write!(f, "callout {upstream} {status}"),
            FilterOutcome::Callout {
                upstream,
                status: None,
            } => write!(f, "callout {upstream} failed"),
            FilterOutcome::GrpcCallout {
                upstream,
                method,
                grpc_status,
            } => write!(f, "grpc callout {upstream} {method} status {grpc_status}"),
            FilterOutcome::Failed { reason, action } => write!(f, "failed ({reason}), {action}"),
        }
    }
}

impl fmt::Display for AccessRecord {
    /// One line in the spirit of Hubble's L7 summary:
    /// `10.0.0.1:5000 -> 10.0.0.2:80 response HTTP/1.1 200 3ms (GET http://h/p) rule 0`,
    /// with ` (ID:<identity>)` after an address whose identity is known.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.source)?;
        if let Some(identity) = self.source_identity {
            write!(f, " (ID:{identity})")?;
        }
        write!(f, " -> {}", self.destination)?;
        if let Some(identity) = self.destination_identity {
            write!(f, " (ID:{identity})")?;
        }
        write!(f, " {} {:?}", self.kind, self.version)?;
        if let Some(status) = self.status {
            write!(f, " {status}")?;
        }
        if let Some(latency) = self.latency {
            write!(f, " {}ms", latency.as_millis())?;
        }
        write!(f, " ({} {})", self.method, self.url)?;
        if let Some(rule) = self.rule {
            write!(f, " {rule}")?;
        }
        for (i, filter) in self.filters.iter().enumerate() {
            f.write_str(if i == 0 { " [filter " } else { "; " })?;
            write!(f, "{filter}")?;
        }
        if !self.filters.is_empty() {
            f.write_str("]")?;
        }
        if let Some(error) = &self.error {
            write!(f, ": {error}")?;
        }
        Ok(())
    }
}

/// The sending side of a bounded record channel (HTTP access records, DNS records); cheap
/// to clone, shared by every connection. Traffic never waits on it: a full channel (or a gone
/// receiver) drops the record and counts the drop.
#[derive(Debug)]
pub struct RecordLog<T> {
    sender: Option<mpsc::Sender<T>>,
    dropped: Arc<AtomicU64>,
}

// Manual impls: the derives would demand `T: Clone` / `T: Default`.
impl<T> Clone for RecordLog<T> {
    fn clone(&self) -> Self {
        Self {
            sender: self.sender.clone(),
            dropped: self.dropped.clone(),
        }
    }
}

impl<T> Default for RecordLog<T> {
    fn default() -> Self {
        Self {
            sender: None,
            dropped: Arc::default(),
        }
    }
}

/// The HTTP access-record sink.
pub type AccessLog = RecordLog<AccessRecord>;

impl<T> RecordLog<T> {
    /// A sink with room for `capacity` records, and its receiver.
    pub fn channel(capacity: usize) -> (Self, mpsc::Receiver<T>) {
        let (sender, receiver) = mpsc::channel(capacity.max(1));
        (
            Self {
                sender: Some(sender),
                dropped: Arc::default(),
            },
            receiver,
        )
    }

    /// A sink that records nothing (and builds no records).
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Whether records are wanted; callers skip building them otherwise.
    pub fn is_enabled(&self) -> bool {
        self.sender.is_some()
    }

    /// Offers a record without waiting: a full channel (or a gone receiver) drops it and
    /// counts the drop.
    pub fn record(&self, record: T) {
        let Some(sender) = &self.sender else {
            return;
        };
        if sender.try_send(record).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records dropped because the channel was full or closed.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: RecordKind) -> AccessRecord {
        AccessRecord {
            kind,
            timestamp: SystemTime::UNIX_EPOCH,
            version: Version::HTTP_11,
            method: "GET".into(),
            url: "http://h/p".into(),
            status: Some(200),
            latency: Some(Duration::from_millis(3)),
            source: "10.0.0.1:5000".parse().expect("addr"),
            destination: "10.0.0.2:80".parse().expect("addr"),
            source_identity: None,
            destination_identity: None,
            rule: Some(RuleRef::Rule(0)),
            header_log: Vec::new(),
            error: None,
            filters: Vec::new(),
        }
    }

    #[test]
    fn overflow_is_counted_and_never_blocks() {
        let (log, mut receiver) = AccessLog::channel(2);
        for _ in 0..5 {
            log.record(record(RecordKind::Request));
        }
        assert_eq!(log.dropped(), 3);
        assert!(receiver.try_recv().is_ok());
        assert!(receiver.try_recv().is_ok());
        assert!(receiver.try_recv().is_err());
        drop(receiver);
        log.record(record(RecordKind::Response));
        assert_eq!(log.dropped(), 4, "a closed receiver counts as a drop");
    }

    #[test]
    fn disabled_sink_is_silent() {
        let log = AccessLog::disabled();
        assert!(!log.is_enabled());
        log.record(record(RecordKind::Denied));
        assert_eq!(log.dropped(), 0);
    }

    #[test]
    fn display_is_one_line_summary() {
        assert_eq!(
            record(RecordKind::Response).to_string(),
            "10.0.0.1:5000 -> 10.0.0.2:80 response HTTP/1.1 200 3ms (GET http://h/p) rule 0"
        );
        let mut with_identities = record(RecordKind::Denied);
        with_identities.source_identity = Some(1000);
        with_identities.destination_identity = Some(2000);
        assert_eq!(
            with_identities.to_string(),
            "10.0.0.1:5000 (ID:1000) -> 10.0.0.2:80 (ID:2000) denied HTTP/1.1 200 3ms (GET http://h/p) rule 0"
        );
        let mut filtered = record(RecordKind::Response);
        filtered.status = Some(403);
        filtered.filters = vec![
            FilterRecord {
                filter: "add-header".into(),
                phase: "request_headers",
                outcome: FilterOutcome::HeadersModified,
            },
            FilterRecord {
                filter: "deny-path".into(),
                phase: "request_headers",
                outcome: FilterOutcome::LocalReply { status: 403 },
            },
        ];
        assert_eq!(
            filtered.to_string(),
            "10.0.0.1:5000 -> 10.0.0.2:80 response HTTP/1.1 403 3ms (GET http://h/p) rule 0 \
             [filter add-header request_headers: headers modified; deny-path request_headers: local reply 403]"
        );
    }
}
