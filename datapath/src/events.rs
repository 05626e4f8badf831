//! Flow events from the kernel: the reader of `mb_events` (a BPF ring buffer) and the decoded
//! [`FlowEventView`].
//!
//! The programs emit an event for every drop and for the first packet of every new connection
//! (a policy verdict where policy applied, a trace where it did not). When the ring buffer is
//! full the kernel side counts the loss in the metrics map
//! ([`crate::MetricsMap::events_lost`]); the reader adds records it could not decode.

use std::{
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, RawFd},
    path::Path,
    time::Duration,
};

use aya::maps::{Map, MapData, RingBuf};
use membrane_common::{Direction, FlowEvent, event_kind, names, verdict};

use crate::{
    error::{DatapathError, Result},
    maps::open_pinned,
};

/// What kind of event (Cilium's monitor message types).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    Drop,
    Trace,
    PolicyVerdict,
}

/// Verdict of an event (Hubble's `Verdict`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventVerdict {
    Forwarded,
    Dropped,
    Redirected,
}

/// A decoded [`FlowEvent`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowEventView {
    pub timestamp_ns: u64,
    pub kind: EventKind,
    pub verdict: EventVerdict,
    /// Cilium drop reason when dropped.
    pub drop_reason: Option<u8>,
    pub direction: Direction,
    /// Cilium's policy match type (0 none, 1 L3-only, 2 L3-L4, 3 L4-only, 4 all, 5 L3-proto,
    /// 6 proto-only).
    pub match_type: u8,
    pub protocol: u8,
    pub tcp_flags: u8,
    pub endpoint_id: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub src: Ipv4Addr,
    pub sport: u16,
    pub dst: Ipv4Addr,
    /// Destination port (for ICMP: the type).
    pub dport: u16,
    pub proxy_port: Option<u16>,
    pub rule_cookie: u32,
    pub ifindex: u32,
    pub len: u32,
}

impl FlowEventView {
    /// Decodes one ring buffer record; `None` if it is not a well-formed event.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != size_of::<FlowEvent>() {
            return None;
        }
        // SAFETY: the length matches and FlowEvent is plain integers (any bit pattern is
        // valid); read_unaligned copes with the record's alignment.
        let e: FlowEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let kind = match e.kind {
            event_kind::DROP => EventKind::Drop,
            event_kind::TRACE => EventKind::Trace,
            event_kind::POLICY_VERDICT => EventKind::PolicyVerdict,
            _ => return None,
        };
        let verdict = match e.verdict {
            verdict::FORWARDED => EventVerdict::Forwarded,
            verdict::DROPPED => EventVerdict::Dropped,
            verdict::REDIRECTED => EventVerdict::Redirected,
            _ => return None,
        };
        let proxy_port = u16::from_be(e.proxy_port_be);
        Some(Self {
            timestamp_ns: e.timestamp_ns,
            kind,
            verdict,
            drop_reason: (verdict == EventVerdict::Dropped).then_some(e.reason),
            direction: Direction::from_u8(e.direction)?,
            match_type: e.match_type,
            protocol: e.protocol,
            tcp_flags: e.tcp_flags,
            endpoint_id: e.endpoint_id,
            src_identity: e.src_identity,
            dst_identity: e.dst_identity,
            src: Ipv4Addr::from(e.saddr_be.to_ne_bytes()),
            sport: u16::from_be(e.sport_be),
            dst: Ipv4Addr::from(e.daddr_be.to_ne_bytes()),
            dport: u16::from_be(e.dport_be),
            proxy_port: (proxy_port != 0).then_some(proxy_port),
            rule_cookie: e.rule_cookie,
            ifindex: e.ifindex,
            len: e.len,
        })
    }
}

/// Reads `mb_events`.
pub struct EventReader {
    ring: RingBuf<MapData>,
    undecodable: u64,
}

impl EventReader {
    pub(crate) fn new(map: Map) -> Result<Self> {
        let ring = RingBuf::try_from(map).map_err(|source| DatapathError::Map {
            map: names::MAP_EVENTS,
            op: "open",
            source,
        })?;
        Ok(Self {
            ring,
            undecodable: 0,
        })
    }

    pub fn open_pinned(pin_dir: &Path) -> Result<Self> {
        Self::new(open_pinned(pin_dir, names::MAP_EVENTS)?)
    }

    /// Records the reader could not decode (counted as lost, never silently skipped).
    pub fn undecodable(&self) -> u64 {
        self.undecodable
    }

    /// Every event queued now, without waiting.
    pub fn drain(&mut self) -> Vec<FlowEventView> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            match FlowEventView::decode(&item) {
                Some(event) => out.push(event),
                None => self.undecodable += 1,
            }
        }
        out
    }

    /// Waits up to `timeout` for events and returns what is queued then (possibly nothing).
    pub fn wait(&mut self, timeout: Duration) -> Result<Vec<FlowEventView>> {
        let ready = self.drain();
        if !ready.is_empty() {
            return Ok(ready);
        }
        poll_readable(self.ring.as_raw_fd(), timeout)?;
        Ok(self.drain())
    }
}

fn poll_readable(fd: RawFd, timeout: Duration) -> Result<()> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    let rc = unsafe { libc::poll(&mut pfd, 1, millis) };
    if rc < 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(DatapathError::Io {
                what: format!("poll {}", names::MAP_EVENTS),
                source: err,
            });
        }
    }
    Ok(())
}
