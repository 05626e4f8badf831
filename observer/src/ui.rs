//! The flow page: a small HTTP/1.1 server for `/ui` (one self-contained HTML page: a live
//! flow table with filters and a service map drawn by its own script) and the JSON it polls
//! (`/api/flows`, `/api/map`), all read from the [`Observer`]'s ring.
//!
//! It is meant for a browser on the same machine (the agent binds it to loopback): there is
//! no authentication, so requests whose `Host` is not an IP literal or `localhost` are
//! refused (a DNS-rebinding page cannot read flows), no CORS header is sent, and the page's
//! Content-Security-Policy allows no fetch beyond its own origin. The page loads nothing
//! from the network: its HTML, CSS and script are compiled into the binary.
//!
//! The server is bounded: at most [`UiLimits::max_connections`] connections at once (the
//! accept loop waits for a free slot, so the kernel backlog absorbs bursts), a request head
//! of at most [`UiLimits::max_request_head`] bytes read within
//! [`UiLimits::read_timeout`], no request bodies, one request per connection.
//!
//! Filters use `hubble observe`'s flag semantics (the [`FilterBuilder`]): `namespace` and
//! `pod` match either side, values of one parameter are alternatives; `q` is a
//! case-insensitive substring of the flow's compact line, addresses and labels.
//!
//! Must not depend on the agent: it reads only the observer.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::cli::FilterBuilder;
use crate::filter::FlowFilters;
use crate::names;
use crate::pipeline::Observer;
use crate::printer::{self, PrintOptions};
use crate::proto::flow::{
    DropReason, Endpoint, Flow, FlowType, L7FlowType, TrafficDirection, Verdict, layer4, layer7,
};
use crate::ring::RingEvent;
use crate::timefmt;

/// The page: HTML, CSS and script assembled at compile time into one document.
pub const PAGE: &str = concat!(
    include_str!("../ui/head.html"),
    "<style>\n",
    include_str!("../ui/style.css"),
    "</style>\n</head>\n",
    include_str!("../ui/body.html"),
    "<script>\n",
    include_str!("../ui/app.js"),
    "</script>\n</body>\n</html>\n"
);

/// Colours of the verdict classes, as the page's CSS spells them (`--forwarded` …). The
/// headless-browser test counts pixels of these exact colours in a screenshot.
pub const CLASS_COLOURS: [(EdgeClass, [u8; 3]); 5] = [
    (EdgeClass::Forwarded, [0x1e, 0x8e, 0x3e]),
    (EdgeClass::Dropped, [0xd9, 0x30, 0x25]),
    (EdgeClass::L7Denied, [0xe3, 0x74, 0x00]),
    (EdgeClass::Redirected, [0x1a, 0x73, 0xe8]),
    (EdgeClass::Other, [0x80, 0x86, 0x8b]),
];

/// Flows `/api/flows` returns when `limit` is not given.
pub const DEFAULT_LIMIT: usize = 200;
/// The largest `limit` accepted (Hubble's default ring size).
pub const MAX_LIMIT: usize = 4095;

/// Bounds of the server.
#[derive(Clone, Copy, Debug)]
pub struct UiLimits {
    /// Connections served at once; further ones wait in the kernel's backlog.
    pub max_connections: usize,
    /// Largest request head (request line and headers) in bytes; larger ones get 431.
    pub max_request_head: usize,
    /// Time to receive the whole request head; slower clients get 408.
    pub read_timeout: Duration,
    /// Time to send the response before the connection is dropped.
    pub write_timeout: Duration,
}

impl Default for UiLimits {
    fn default() -> Self {
        Self {
            max_connections: 32,
            max_request_head: 8 * 1024,
            read_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// How the page groups verdicts (and colours map edges and table rows).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum EdgeClass {
    Forwarded,
    /// Dropped by the datapath (L3/L4 policy, invalid packets, …).
    Dropped,
    /// Denied by the L7 proxy (an HTTP 403, a DNS REFUSED).
    L7Denied,
    /// Redirected to the proxy.
    Redirected,
    /// Error, audit, traced, translated, unknown.
    Other,
}

impl EdgeClass {
    pub fn of(flow: &Flow) -> Self {
        match Verdict::try_from(flow.verdict).unwrap_or(Verdict::Unknown) {
            Verdict::Forwarded => Self::Forwarded,
            Verdict::Dropped if flow.l7.is_some() || flow.r#type == FlowType::L7 as i32 => {
                Self::L7Denied
            }
            Verdict::Dropped => Self::Dropped,
            Verdict::Redirected => Self::Redirected,
            _ => Self::Other,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Forwarded => "forwarded",
            Self::Dropped => "dropped",
            Self::L7Denied => "l7-denied",
            Self::Redirected => "redirected",
            Self::Other => "other",
        }
    }
}

/// Serves the page until `shutdown` completes. Errors accepting a connection are logged
/// and retried after a pause (e.g. out of file descriptors); they never end the server.
pub async fn serve_ui(
    observer: Observer,
    listener: TcpListener,
    limits: UiLimits,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => return,
            permit = Arc::clone(&slots).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((conn, _)) => {
                let observer = observer.clone();
                tokio::spawn(async move {
                    serve_connection(&observer, conn, limits).await;
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "flow page: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_connection(observer: &Observer, mut conn: TcpStream, limits: UiLimits) {
    let response = match read_head(&mut conn, limits).await {
        Ok(head) => match parse_request(&head) {
            Ok(request) => handle(observer, &request),
            Err(response) => response,
        },
        Err(response) => response,
    };
    let bytes = response.to_bytes();
    let _ = tokio::time::timeout(limits.write_timeout, async {
        conn.write_all(&bytes).await?;
        conn.shutdown().await
    })
    .await;
}

/// Reads up to the blank line that ends the head.
async fn read_head(conn: &mut TcpStream, limits: UiLimits) -> Result<Vec<u8>, Response> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 2048];
    let read = tokio::time::timeout(limits.read_timeout, async {
        loop {
            let n = conn.read(&mut buf).await.map_err(|_| None)?;
            if n == 0 {
                return Err(None);
            }
            head.extend_from_slice(&buf[..n]);
            let end = find(&head, b"\r\n\r\n");
            if end.unwrap_or(head.len()) > limits.max_request_head {
                return Err(Some(Response::error(
                    431,
                    &format!("request head larger than {} bytes", limits.max_request_head),
                )));
            }
            if let Some(end) = end {
                head.truncate(end);
                return Ok(());
            }
        }
    })
    .await;
    match read {
        Ok(Ok(())) => Ok(head),
        Ok(Err(Some(response))) => Err(response),
        // The client went away: whatever is written next is not read.
        Ok(Err(None)) => Err(Response::error(400, "incomplete request")),
        Err(_) => Err(Response::error(
            408,
            &format!("request head not received within {:?}", limits.read_timeout),
        )),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Decoded query parameters, in order.
    pub query: Vec<(String, String)>,
    pub host: Option<String>,
}

/// An answer ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    pub location: Option<String>,
    /// HEAD: headers only.
    pub head_only: bool,
}

impl Response {
    fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            content_type,
            body: body.into(),
            location: None,
            head_only: false,
        }
    }

    fn json(value: &Value) -> Self {
        Self::new(200, "application/json", value.to_string())
    }

    /// A 4xx/5xx with a JSON body `{"error": message}` (the page shows it as is).
    pub fn error(status: u16, message: &str) -> Self {
        Self::new(
            status,
            "application/json",
            json!({ "error": message }).to_string(),
        )
    }

    fn reason(&self) -> &'static str {
        match self.status {
            200 => "OK",
            302 => "Found",
            400 => "Bad Request",
            403 => "Forbidden",
            404 => "Not Found",
            405 => "Method Not Allowed",
            408 => "Request Timeout",
            413 => "Content Too Large",
            414 => "URI Too Long",
            431 => "Request Header Fields Too Large",
            _ => "Error",
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncontent-length: {}\r\ncache-control: no-store\r\nx-content-type-options: nosniff\r\nconnection: close\r\n",
            self.status,
            self.reason(),
            self.content_type,
            self.body.len()
        );
        if self.content_type.starts_with("text/html") {
            // Inline style and script only; fetches to this origin only; nothing else.
            head.push_str(
                "content-security-policy: default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'\r\n",
            );
        }
        if self.status == 405 {
            head.push_str("allow: GET, HEAD\r\n");
        }
        if let Some(location) = &self.location {
            head.push_str(&format!("location: {location}\r\n"));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        if !self.head_only {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }
}

/// Parses a request head (without the final blank line). Errors are ready answers.
pub fn parse_request(head: &[u8]) -> Result<Request, Response> {
    let head =
        std::str::from_utf8(head).map_err(|_| Response::error(400, "request head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Response::error(
            400,
            &format!("malformed request line {line:?}"),
        ));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(Response::error(
            400,
            &format!("unsupported protocol version {version:?}"),
        ));
    }
    let mut host = None;
    for header in lines {
        let Some((name, value)) = header.split_once(':') else {
            return Err(Response::error(
                400,
                &format!("malformed header line {header:?}"),
            ));
        };
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "host" => host = Some(value.to_owned()),
            "content-length" if value != "0" => {
                return Err(Response::error(413, "requests here carry no body"));
            }
            "transfer-encoding" => {
                return Err(Response::error(413, "requests here carry no body"));
            }
            _ => {}
        }
    }
    if method != "GET" && method != "HEAD" {
        return Err(Response::error(
            405,
            &format!("method {method} not allowed (GET or HEAD)"),
        ));
    }
    if !target.starts_with('/') {
        return Err(Response::error(
            400,
            &format!("request target {target:?} must be a path"),
        ));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = parse_query(query)?;
    Ok(Request {
        method: method.to_owned(),
        path: path.to_owned(),
        query,
        host,
    })
}

fn parse_query(query: &str) -> Result<Vec<(String, String)>, Response> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((percent_decode(k)?, percent_decode(v)?))
        })
        .collect()
}

/// `application/x-www-form-urlencoded` decoding (`+` is a space).
fn percent_decode(s: &str) -> Result<String, Response> {
    let bad = || Response::error(400, &format!("bad percent-encoding in {s:?}"));
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or_else(bad)?;
                let hex = std::str::from_utf8(hex).map_err(|_| bad())?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| bad())
}

/// Whether `host` (a `Host` header) names this machine by address or as `localhost`:
/// anything else may be a DNS name rebound to loopback by a web page.
fn host_allowed(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest.split_once(']').is_some_and(|(addr, port)| {
            addr.parse::<std::net::Ipv6Addr>().is_ok()
                && (port.is_empty()
                    || port
                        .strip_prefix(':')
                        .is_some_and(|p| p.parse::<u16>().is_ok()))
        });
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.parse::<u16>().is_ok() => name,
            Some(_) => return false,
            None => host,
        }
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::Ipv4Addr>().is_ok()
}

/// Answers one request.
pub fn handle(observer: &Observer, request: &Request) -> Response {
    match &request.host {
        None => return Response::error(400, "missing Host header"),
        Some(host) if !host_allowed(host) => {
            return Response::error(
                403,
                &format!(
                    "Host {host:?} refused: the flow page answers only to an IP address or localhost"
                ),
            );
        }
        Some(_) => {}
    }
    let mut response = match request.path.as_str() {
        "/" => {
            let mut r = Response::new(302, "text/plain", "see /ui\n");
            r.location = Some("/ui".to_owned());
            r
        }
        "/ui" | "/ui/" => Response::new(200, "text/html; charset=utf-8", PAGE),
        "/api/flows" => match UiQuery::parse(&request.query, true) {
            Ok(q) => Response::json(&flows_json(observer, &q)),
            Err(message) => Response::error(400, &message),
        },
        "/api/map" => match UiQuery::parse(&request.query, false) {
            Ok(q) => Response::json(&map_json(observer, &q)),
            Err(message) => Response::error(400, &message),
        },
        other => Response::error(
            404,
            &format!("no page {other:?} here (/ui, /api/flows, /api/map)"),
        ),
    };
    response.head_only = request.method == "HEAD";
    response
}

/// Filter parameters and their `hubble observe` flags.
const FILTER_PARAMS: &[(&str, &str)] = &[
    ("namespace", "namespace"),
    ("pod", "pod"),
    ("from_pod", "from-pod"),
    ("to_pod", "to-pod"),
    ("verdict", "verdict"),
    ("protocol", "protocol"),
    ("type", "type"),
    ("port", "port"),
    ("http_method", "http-method"),
    ("http_path", "http-path"),
    ("http_status", "http-status"),
    ("traffic_direction", "traffic-direction"),
];

/// A parsed `/api/flows` or `/api/map` query.
pub struct UiQuery {
    pub since: Option<u64>,
    pub limit: usize,
    pub filters: FlowFilters,
    /// Lower-cased free text.
    pub text: Option<String>,
}

impl UiQuery {
    /// Parses the parameters; the error names the parameter and value.
    pub fn parse(params: &[(String, String)], paged: bool) -> Result<Self, String> {
        let mut since = None;
        let mut limit = DEFAULT_LIMIT;
        let mut text = None;
        let mut flags: Vec<(&'static str, String)> = Vec::new();
        for (key, value) in params {
            let value = value.trim();
            match key.as_str() {
                "since" if paged => {
                    since = Some(value.parse::<u64>().map_err(|_| {
                        format!("since={value:?}: expected a flow sequence number")
                    })?);
                }
                "limit" if paged => {
                    limit = value
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| {
                            format!("limit={value:?}: expected a number from 1 to {MAX_LIMIT}")
                        })?;
                }
                "q" => {
                    if !value.is_empty() {
                        text = Some(value.to_lowercase());
                    }
                }
                key => {
                    let Some((_, flag)) = FILTER_PARAMS.iter().find(|(p, _)| *p == key) else {
                        let known: Vec<&str> = FILTER_PARAMS
                            .iter()
                            .map(|(p, _)| *p)
                            .chain(["q"])
                            .chain(
                                if paged { &["since", "limit"][..] } else { &[] }
                                    .iter()
                                    .copied(),
                            )
                            .collect();
                        return Err(format!(
                            "unknown parameter {key:?} (known: {})",
                            known.join(", ")
                        ));
                    };
                    // An empty value is an unset form field.
                    if !value.is_empty() {
                        let value = match *flag {
                            "verdict" | "http-method" => value.to_uppercase(),
                            "protocol" | "type" | "traffic-direction" => value.to_lowercase(),
                            _ => value.to_owned(),
                        };
                        flags.push((flag, value));
                    }
                }
            }
        }
        // The page's namespace and pod fields together mean one pod; Hubble's flags would
        // call that a conflict.
        let namespace: Vec<String> = flags
            .iter()
            .filter(|(f, _)| *f == "namespace")
            .map(|(_, v)| v.clone())
            .collect();
        if let [ns] = namespace.as_slice()
            && flags.iter().any(|(f, _)| *f == "pod")
        {
            let ns = ns.clone();
            flags.retain(|(f, _)| *f != "namespace");
            for (f, v) in &mut flags {
                if *f == "pod" && !v.contains('/') {
                    *v = format!("{ns}/{v}");
                }
            }
        }
        let mut builder = FilterBuilder::new();
        for (flag, value) in &flags {
            let param = FILTER_PARAMS
                .iter()
                .find(|(_, f)| f == flag)
                .map_or(*flag, |(p, _)| *p);
            builder
                .set(flag, value)
                .map_err(|e| format!("{param}={value:?}: {e}"))?;
        }
        let built = builder.finish().map_err(|e| e.to_string())?;
        let filters = FlowFilters::new(&built.whitelist, &built.blacklist)
            .map_err(|e| format!("filter: {e}"))?;
        Ok(Self {
            since,
            limit,
            filters,
            text,
        })
    }

    fn matches(&self, flow: &Flow) -> bool {
        self.filters.matches(flow)
            && self
                .text
                .as_ref()
                .is_none_or(|t| search_text(flow).contains(t.as_str()))
    }
}

/// What free text searches: the compact line (names, identities, type, verdict, summary),
/// addresses, labels, DNS names and the drop reason, lower-cased.
fn search_text(flow: &Flow) -> String {
    let mut text = printer::compact(flow, PrintOptions::default());
    if let Some(ip) = &flow.ip {
        text.push(' ');
        text.push_str(&ip.source);
        text.push(' ');
        text.push_str(&ip.destination);
    }
    for ep in [&flow.source, &flow.destination].into_iter().flatten() {
        for label in &ep.labels {
            text.push(' ');
            text.push_str(label);
        }
    }
    for name in flow.source_names.iter().chain(&flow.destination_names) {
        text.push(' ');
        text.push_str(name);
    }
    if let Some(reason) = drop_reason_name(flow) {
        text.push(' ');
        text.push_str(reason);
    }
    text.to_lowercase()
}

fn drop_reason_name(flow: &Flow) -> Option<&'static str> {
    (flow.drop_reason_desc != 0)
        .then(|| DropReason::try_from(flow.drop_reason_desc).ok())
        .flatten()
        .map(|r| r.as_str_name())
}

/// `/api/flows`: the newest `limit` matching flows after `since` (newest last), where to
/// continue, and how much was lost.
fn flows_json(observer: &Observer, q: &UiQuery) -> Value {
    let ring = &observer.shared().ring;
    let read = ring.read(q.since.unwrap_or(0), usize::MAX);
    let mut lost = 0u64;
    let mut matching = Vec::new();
    for entry in &read.entries {
        match &entry.event {
            RingEvent::Flow(flow) if q.matches(flow) => matching.push((entry.seq, flow)),
            RingEvent::Flow(_) => {}
            RingEvent::Lost(l, _) => lost += l.num_events_lost,
        }
    }
    let skipped = matching.len().saturating_sub(q.limit);
    let flows: Vec<Value> = matching[skipped..]
        .iter()
        .map(|(seq, flow)| flow_json(*seq, flow))
        .collect();
    let status = observer.server_status();
    json!({
        "next": read.next,
        // Flows after `since` that the ring no longer held, and matching flows left out
        // by `limit`: the page says so instead of pretending it saw everything.
        "overwritten": if q.since.is_some() { read.overwritten } else { 0 },
        "skipped": skipped,
        "lost_events": lost,
        "flows": flows,
        "status": {
            "num_flows": status.num_flows,
            "max_flows": status.max_flows,
            "seen_flows": status.seen_flows,
            "version": status.version,
        },
    })
}

fn ports(flow: &Flow) -> (Option<u32>, Option<u32>, &'static str) {
    match flow.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(layer4::Protocol::Tcp(t)) => (Some(t.source_port), Some(t.destination_port), "TCP"),
        Some(layer4::Protocol::Udp(u)) => (Some(u.source_port), Some(u.destination_port), "UDP"),
        Some(layer4::Protocol::Sctp(s)) => (Some(s.source_port), Some(s.destination_port), "SCTP"),
        Some(layer4::Protocol::IcmPv4(_)) => (None, None, "ICMPv4"),
        Some(layer4::Protocol::IcmPv6(_)) => (None, None, "ICMPv6"),
        _ => (None, None, ""),
    }
}

/// A map node for one side of a flow: the pod (`namespace/name`), else a DNS name, an
/// `fqdn:`/`cidr:` label, a reserved identity's name, or the address.
fn peer(ep: Option<&Endpoint>, names: &[String], ip: &str) -> (String, &'static str) {
    if let Some(ep) = ep.filter(|e| !e.pod_name.is_empty()) {
        return (format!("{}/{}", ep.namespace, ep.pod_name), "pod");
    }
    if let Some(name) = names.first() {
        return (name.clone(), "fqdn");
    }
    if let Some(ep) = ep {
        if let Some(label) = ep.labels.iter().find_map(|l| l.strip_prefix("fqdn:")) {
            return (label.to_owned(), "fqdn");
        }
        if let Some(name) = names::reserved_identity_name(ep.identity) {
            return (name.to_owned(), "reserved");
        }
        // An address that is no pod but carries a pod's identity (the proxy speaking for
        // it, with the identity in its mark): the workload by its app label.
        let app = ep.labels.iter().find_map(|l| {
            l.strip_prefix("k8s:app=")
                .or_else(|| l.strip_prefix("k8s:k8s-app="))
        });
        if let (Some(app), false) = (app, ep.namespace.is_empty()) {
            return (format!("{}/{app}", ep.namespace), "pod");
        }
    }
    if ip.is_empty() {
        ("unknown".to_owned(), "reserved")
    } else {
        (ip.to_owned(), "ip")
    }
}

fn endpoint_json(ep: Option<&Endpoint>, ip: &str, port: Option<u32>, names: &[String]) -> Value {
    let (node, kind) = peer(ep, names, ip);
    let identity = ep.map_or(0, |e| e.identity);
    json!({
        "node": node,
        "kind": kind,
        "namespace": ep.map_or("", |e| e.namespace.as_str()),
        "pod": ep.map_or("", |e| e.pod_name.as_str()),
        "identity": identity,
        "identity_name": names::reserved_identity_name(identity),
        "labels": ep.map_or(&[][..], |e| e.labels.as_slice()),
        "ip": ip,
        "port": port,
        "names": names,
    })
}

/// The path of an HTTP URL (`http://host:port/a?b` → `/a?b`).
fn url_path(url: &str) -> &str {
    url.split_once("://")
        .map_or(url, |(_, rest)| rest.find('/').map_or("/", |i| &rest[i..]))
}

fn l7_json(flow: &Flow) -> Value {
    let Some(l7) = &flow.l7 else {
        return Value::Null;
    };
    let kind = L7FlowType::try_from(l7.r#type).map_or("UNKNOWN_L7_TYPE", |t| t.as_str_name());
    let mut out = json!({ "type": kind, "latency_ns": l7.latency_ns });
    match &l7.record {
        Some(layer7::Record::Http(h)) => {
            out["http"] = json!({
                "method": h.method,
                "url": h.url,
                "path": url_path(&h.url),
                "code": (h.code != 0).then_some(h.code),
                "protocol": h.protocol,
            });
        }
        Some(layer7::Record::Dns(d)) => {
            out["dns"] = json!({
                "query": d.query,
                "rcode": (kind == "RESPONSE").then(|| names::dns_rcode_name(d.rcode).unwrap_or("UNKNOWN")),
                "ips": d.ips,
                "qtypes": d.qtypes,
            });
        }
        _ => {}
    }
    out
}

/// One flow as the page shows it.
pub fn flow_json(seq: u64, flow: &Flow) -> Value {
    let (sport, dport, l4) = ports(flow);
    let (src_ip, dst_ip) = flow
        .ip
        .as_ref()
        .map_or(("", ""), |i| (i.source.as_str(), i.destination.as_str()));
    let time = flow.time.as_ref();
    let (src_text, dst_text) = printer::host_names(flow, PrintOptions::default());
    json!({
        "seq": seq,
        "time": time.map(timefmt::rfc3339),
        "time_ms": time.and_then(timefmt::nanos).and_then(|n| i64::try_from(n / 1_000_000).ok()),
        "verdict": Verdict::try_from(flow.verdict).unwrap_or(Verdict::Unknown).as_str_name(),
        "verdict_text": printer::verdict_text(flow),
        "class": EdgeClass::of(flow).name(),
        "drop_reason": drop_reason_name(flow),
        "drop_reason_text": (flow.drop_reason_desc != 0)
            .then(|| u32::try_from(flow.drop_reason_desc).ok())
            .flatten()
            .and_then(names::drop_reason_text),
        "flow_type": printer::flow_type(flow),
        "l7_flow": flow.r#type == FlowType::L7 as i32,
        "l4": l4,
        "source": endpoint_json(flow.source.as_ref(), src_ip, sport, &flow.source_names),
        "destination": endpoint_json(flow.destination.as_ref(), dst_ip, dport, &flow.destination_names),
        "source_text": src_text,
        "destination_text": dst_text,
        "l7": l7_json(flow),
        "traffic_direction": TrafficDirection::try_from(flow.traffic_direction)
            .map_or("TRAFFIC_DIRECTION_UNKNOWN", |d| d.as_str_name()),
        "is_reply": flow.is_reply,
        "summary": flow.summary,
        "node_name": flow.node_name,
    })
}

/// `/api/map`: every matching flow in the ring as workloads and verdict-coloured edges.
/// Replies count towards nothing (the connection's opening flow already did); L7
/// responses would otherwise add a "forwarded" edge beside every denied request.
fn map_json(observer: &Observer, q: &UiQuery) -> Value {
    let mut nodes: BTreeMap<String, (&'static str, String, u64)> = BTreeMap::new();
    let mut edges: BTreeMap<(String, String, EdgeClass), u64> = BTreeMap::new();
    let mut classes: BTreeMap<EdgeClass, u64> = BTreeMap::new();
    for flow in observer.flows() {
        if flow.is_reply == Some(true) || !q.matches(&flow) {
            continue;
        }
        let (src_ip, dst_ip) = flow
            .ip
            .as_ref()
            .map_or(("", ""), |i| (i.source.as_str(), i.destination.as_str()));
        let src = peer(flow.source.as_ref(), &flow.source_names, src_ip);
        let dst = peer(flow.destination.as_ref(), &flow.destination_names, dst_ip);
        let ns =
            |ep: &Option<Endpoint>| ep.as_ref().map_or("", |e| e.namespace.as_str()).to_owned();
        let class = EdgeClass::of(&flow);
        for ((id, kind), ns) in [(&src, ns(&flow.source)), (&dst, ns(&flow.destination))] {
            let node = nodes.entry(id.clone()).or_insert((
                *kind,
                if *kind == "pod" { ns } else { String::new() },
                0,
            ));
            node.2 += 1;
        }
        *edges.entry((src.0, dst.0, class)).or_default() += 1;
        *classes.entry(class).or_default() += 1;
    }
    json!({
        "nodes": nodes.into_iter().map(|(id, (kind, namespace, flows))| json!({
            "id": id, "kind": kind, "namespace": namespace, "flows": flows,
        })).collect::<Vec<_>>(),
        "edges": edges.into_iter().map(|((source, target, class), count)| json!({
            "source": source, "target": target, "class": class.name(), "count": count,
        })).collect::<Vec<_>>(),
        "classes": classes.into_iter().map(|(c, n)| (c.name().to_owned(), json!(n)))
            .collect::<serde_json::Map<_, _>>(),
    })
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::convert::tests::{datapath, dns, enricher, http};
    use crate::input::{DatapathEventKind, DatapathVerdict, FlowInput, L7Kind, L7Verdict};
    use crate::pipeline::ObserverConfig;

    fn get(target: &str) -> Request {
        parse_request(format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1:9966").as_bytes())
            .expect("valid request")
    }

    /// An observer holding: a forwarded trace, a dropped SYN to a world address, an L7
    /// denied request with its 403 response, and a DNS request/response.
    async fn observer() -> Observer {
        let observer =
            Observer::spawn(ObserverConfig::default(), Arc::new(enricher())).expect("config");
        let sender = observer.sender();
        let mut forwarded = datapath(DatapathEventKind::Trace, DatapathVerdict::Forwarded);
        forwarded.is_reply = Some(false);
        let mut dropped = datapath(DatapathEventKind::Drop, DatapathVerdict::Dropped);
        dropped.dst = "198.51.100.9".parse().expect("ip");
        dropped.dst_identity = 2;
        let mut reply = forwarded.clone();
        reply.is_reply = Some(true);
        for input in [
            FlowInput::Datapath(forwarded),
            FlowInput::Datapath(dropped),
            FlowInput::Datapath(reply),
            FlowInput::Http(http(L7Kind::Request, L7Verdict::Denied, None)),
            FlowInput::Http(http(L7Kind::Response, L7Verdict::Forwarded, Some(403))),
            FlowInput::Dns(dns(L7Kind::Request, L7Verdict::Forwarded)),
            FlowInput::Dns(dns(L7Kind::Response, L7Verdict::Forwarded)),
        ] {
            assert!(sender.send(input));
        }
        tokio::time::timeout(Duration::from_secs(10), observer.flush())
            .await
            .expect("flush in time");
        observer
    }

    fn body(response: &Response) -> Value {
        serde_json::from_slice(&response.body).expect("JSON body")
    }

    #[test]
    fn request_heads_are_parsed_strictly() {
        let r = get("/api/flows?verdict=DROPPED&q=a%20b+c&pod=");
        assert_eq!(r.path, "/api/flows");
        assert_eq!(
            r.query,
            [
                ("verdict".to_owned(), "DROPPED".to_owned()),
                ("q".to_owned(), "a b c".to_owned()),
                ("pod".to_owned(), String::new())
            ]
        );
        let status = |head: &str| parse_request(head.as_bytes()).map_or_else(|r| r.status, |_| 200);
        assert_eq!(status("POST /ui HTTP/1.1\r\nHost: localhost"), 405);
        assert_eq!(status("GET /ui HTTP/2.0\r\nHost: localhost"), 400);
        assert_eq!(status("GET /ui\r\nHost: localhost"), 400);
        assert_eq!(status("GET http://x/ui HTTP/1.1\r\nHost: localhost"), 400);
        assert_eq!(status("GET /ui HTTP/1.1\r\nHost localhost"), 400);
        assert_eq!(status("GET /ui?q=%zz HTTP/1.1\r\nHost: localhost"), 400);
        assert_eq!(status("GET /ui?q=%ff HTTP/1.1\r\nHost: localhost"), 400);
        assert_eq!(
            status("GET /ui HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5"),
            413
        );
        assert_eq!(
            status("GET /ui HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked"),
            413
        );
        assert_eq!(status("GET /ui HTTP/1.1\r\nhost: [::1]:80"), 200);
    }

    #[test]
    fn only_address_or_localhost_hosts_are_served() {
        for ok in [
            "127.0.0.1:9966",
            "127.0.0.1",
            "localhost:1",
            "LOCALHOST",
            "[::1]:9966",
            "[::1]",
        ] {
            assert!(host_allowed(ok), "{ok}");
        }
        for bad in [
            "evil.example:9966",
            "evil.example",
            "127.0.0.1:x",
            "[::1",
            "[zz]:1",
            "",
        ] {
            assert!(!host_allowed(bad), "{bad}");
        }
    }

    #[test]
    fn the_page_is_self_contained() {
        // No script, style, image or frame from elsewhere: the only URL is the SVG namespace.
        let urls: Vec<&str> = PAGE
            .match_indices("http")
            .map(|(i, _)| &PAGE[i..PAGE.len().min(i + 30)])
            .filter(|u| u.starts_with("http://") || u.starts_with("https://"))
            .filter(|u| !u.starts_with("http://www.w3.org/2000/svg"))
            .collect();
        assert_eq!(urls, Vec::<&str>::new());
        assert!(!PAGE.contains(" src="), "no external script or image");
        assert!(!PAGE.contains("@import"));
        assert!(PAGE.starts_with("<!doctype html>") && PAGE.trim_end().ends_with("</html>"));
        // The colours the test and the map rely on are the CSS's.
        for (class, [r, g, b]) in CLASS_COLOURS {
            let css = format!("--{}: #{r:02x}{g:02x}{b:02x};", class.name());
            assert!(PAGE.contains(&css), "{css} missing from the page's CSS");
        }
    }

    #[tokio::test]
    async fn routes_and_errors() {
        let observer = observer().await;
        let ui = handle(&observer, &get("/ui"));
        assert_eq!(
            (ui.status, ui.content_type),
            (200, "text/html; charset=utf-8")
        );
        assert!(
            String::from_utf8_lossy(&ui.to_bytes())
                .contains("content-security-policy: default-src 'none'")
        );
        let root = handle(&observer, &get("/"));
        assert_eq!((root.status, root.location.as_deref()), (302, Some("/ui")));
        let missing = handle(&observer, &get("/nope"));
        assert_eq!(missing.status, 404);
        assert!(
            body(&missing)["error"]
                .as_str()
                .expect("message")
                .contains("/nope")
        );
        let mut head = get("/ui");
        head.method = "HEAD".into();
        let bytes = handle(&observer, &head).to_bytes();
        assert!(
            String::from_utf8_lossy(&bytes).ends_with("\r\n\r\n"),
            "HEAD has no body"
        );
        let mut rebound = get("/api/flows");
        rebound.host = Some("attacker.example".into());
        assert_eq!(handle(&observer, &rebound).status, 403);
        rebound.host = None;
        assert_eq!(handle(&observer, &rebound).status, 400);

        for (target, needle) in [
            ("/api/flows?since=x", "since=\"x\""),
            ("/api/flows?limit=0", "limit=\"0\""),
            ("/api/flows?limit=5000", "1 to 4095"),
            ("/api/flows?verdict=MAYBE", "verdict=\"MAYBE\""),
            ("/api/flows?protocol=quic", "quic"),
            ("/api/flows?http_path=(", "http_path"),
            ("/api/flows?colour=red", "unknown parameter \"colour\""),
            ("/api/map?since=3", "unknown parameter \"since\""),
        ] {
            let r = handle(&observer, &get(target));
            assert_eq!(r.status, 400, "{target}");
            let message = body(&r)["error"].as_str().expect("message").to_owned();
            assert!(message.contains(needle), "{target}: {message}");
        }
    }

    #[tokio::test]
    async fn flows_are_enriched_filtered_and_paged() {
        let observer = observer().await;
        let all = body(&handle(&observer, &get("/api/flows")));
        let flows = all["flows"].as_array().expect("flows");
        assert_eq!(flows.len(), 7);
        assert_eq!(all["next"], 7);
        assert_eq!(all["status"]["seen_flows"], 7);

        let dropped = &flows[1];
        assert_eq!(dropped["verdict"], "DROPPED");
        assert_eq!(dropped["class"], "dropped");
        assert_eq!(dropped["drop_reason"], "POLICY_DENIED");
        assert_eq!(dropped["drop_reason_text"], "Policy denied");
        assert_eq!(dropped["source"]["pod"], "frontend-7d9f");
        assert_eq!(dropped["source"]["namespace"], "default");
        assert_eq!(dropped["source"]["identity"], 1001);
        assert_eq!(dropped["source"]["ip"], "10.0.0.1");
        assert_eq!(dropped["source"]["port"], 40_000);
        assert_eq!(dropped["destination"]["node"], "world");
        assert_eq!(dropped["destination"]["identity_name"], "world");
        assert_eq!(dropped["destination"]["port"], 8080);
        assert_eq!(dropped["l4"], "TCP");
        assert_eq!(dropped["traffic_direction"], "EGRESS");
        assert_eq!(dropped["source_text"], "default/frontend-7d9f:40000");
        assert!(
            dropped["summary"]
                .as_str()
                .expect("summary")
                .contains("SYN")
        );

        let denied = &flows[3];
        assert_eq!(denied["class"], "l7-denied");
        assert_eq!(denied["l7"]["type"], "REQUEST");
        assert_eq!(denied["l7"]["http"]["method"], "GET");
        assert_eq!(denied["l7"]["http"]["path"], "/api/v1/items?id=3");
        let response = &flows[4];
        assert_eq!(response["l7"]["http"]["code"], 403);
        assert_eq!(response["is_reply"], true);
        let dns_answer = &flows[6];
        assert!(
            dns_answer["l7"]["dns"]["query"]
                .as_str()
                .expect("query")
                .len()
                > 1
        );
        assert_eq!(dns_answer["l7"]["dns"]["rcode"], "No Error");

        let count = |target: &str| {
            body(&handle(&observer, &get(target)))["flows"]
                .as_array()
                .expect("flows")
                .len()
        };
        assert_eq!(count("/api/flows?verdict=dropped"), 2);
        assert_eq!(count("/api/flows?protocol=http"), 2);
        assert_eq!(count("/api/flows?protocol=dns"), 2);
        assert_eq!(count("/api/flows?http_method=get&http_path=/api/.*"), 2);
        assert_eq!(count("/api/flows?namespace=prod"), 4, "traces and HTTP");
        assert_eq!(count("/api/flows?namespace=prod&pod=backend"), 4);
        assert_eq!(count("/api/flows?namespace=prod&pod=frontend"), 0);
        assert_eq!(count("/api/flows?q=POLICY_DENIED"), 1);
        assert_eq!(count("/api/flows?q=198.51.100"), 1);
        assert_eq!(
            count("/api/flows?q=API.EXAMPLE.COM"),
            2,
            "DNS names and queries"
        );
        assert_eq!(count("/api/flows?q=nothing-like-this"), 0);
        assert_eq!(count("/api/flows?since=5"), 2);
        assert_eq!(count("/api/flows?since=7"), 0);
        assert_eq!(count("/api/flows?limit=3"), 3);
        let newest = body(&handle(&observer, &get("/api/flows?limit=1")));
        assert_eq!(newest["flows"][0]["seq"], 6, "limit keeps the newest");
        assert_eq!(newest["skipped"], 6);
    }

    #[tokio::test]
    async fn map_has_workloads_and_verdict_edges() {
        let observer = observer().await;
        let map = body(&handle(&observer, &get("/api/map")));
        let ids: Vec<&str> = map["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .map(|n| n["id"].as_str().expect("id"))
            .collect();
        assert_eq!(
            ids,
            [
                "10.96.0.10",
                "default/frontend-7d9f",
                "prod/backend-5c4b",
                "world"
            ]
        );
        let edges: Vec<(String, String, String, u64)> = map["edges"]
            .as_array()
            .expect("edges")
            .iter()
            .map(|e| {
                (
                    e["source"].as_str().expect("s").to_owned(),
                    e["target"].as_str().expect("t").to_owned(),
                    e["class"].as_str().expect("c").to_owned(),
                    e["count"].as_u64().expect("n"),
                )
            })
            .collect();
        let frontend = "default/frontend-7d9f".to_owned();
        let backend = "prod/backend-5c4b".to_owned();
        // Replies (the trace reply, the HTTP response, the DNS answer) count for nothing.
        assert_eq!(
            edges,
            [
                (frontend.clone(), "10.96.0.10".into(), "forwarded".into(), 1),
                (frontend.clone(), backend.clone(), "forwarded".into(), 1),
                (frontend.clone(), backend, "l7-denied".into(), 1),
                (frontend, "world".into(), "dropped".into(), 1),
            ]
        );
        assert_eq!(
            map["classes"],
            json!({"forwarded": 2, "dropped": 1, "l7-denied": 1})
        );
        let filtered = body(&handle(&observer, &get("/api/map?verdict=FORWARDED")));
        assert_eq!(filtered["edges"].as_array().expect("edges").len(), 2);
    }

    async fn raw(addr: SocketAddr, request: &[u8]) -> String {
        let mut conn = TcpStream::connect(addr).await.expect("connect");
        conn.write_all(request).await.expect("write");
        let mut out = Vec::new();
        let _ = conn.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    fn within<F: Future>(f: F) -> tokio::time::Timeout<F> {
        tokio::time::timeout(Duration::from_secs(10), f)
    }

    #[tokio::test]
    async fn the_server_is_bounded() {
        let observer = observer().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let limits = UiLimits {
            max_connections: 2,
            max_request_head: 256,
            read_timeout: Duration::from_millis(300),
            write_timeout: Duration::from_secs(5),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_ui(observer, listener, limits, async {
            let _ = stopped.await;
        }));

        let ok = within(raw(
            addr,
            b"GET /api/map HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        ))
        .await
        .expect("answered");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("\"edges\""), "{ok}");
        let big = format!(
            "GET /ui HTTP/1.1\r\nHost: 127.0.0.1\r\nX: {}\r\n\r\n",
            "a".repeat(300)
        );
        let answer = within(raw(addr, big.as_bytes())).await.expect("answered");
        assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
        // A client that never finishes its head gets 408 once the read timeout passes,
        // while two slow clients hold both slots the third waits, then is served.
        let slow = || async {
            let mut conn = TcpStream::connect(addr).await.expect("connect");
            conn.write_all(b"GET /ui HTTP/1.1\r\n")
                .await
                .expect("write");
            let mut out = Vec::new();
            let _ = conn.read_to_end(&mut out).await;
            String::from_utf8_lossy(&out).into_owned()
        };
        let (a, b, c) = within(async {
            tokio::join!(
                slow(),
                slow(),
                raw(addr, b"GET /ui HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            )
        })
        .await
        .expect("all answered");
        assert!(
            a.starts_with("HTTP/1.1 408 ") && b.starts_with("HTTP/1.1 408 "),
            "{a}{b}"
        );
        assert!(
            c.starts_with("HTTP/1.1 200 OK") && c.contains("<svg id=\"map\""),
            "{c}"
        );

        let _ = stop.send(());
        within(server).await.expect("stops").expect("no panic");
    }

    #[test]
    fn peers_are_named_by_pod_name_identity_or_address() {
        let ep = |pod: &str, identity: u32, labels: &[&str]| Endpoint {
            identity,
            namespace: if labels.is_empty() { "" } else { "default" }.to_owned(),
            pod_name: pod.to_owned(),
            labels: labels.iter().map(|l| (*l).to_owned()).collect(),
            ..Endpoint::default()
        };
        let frontend = ep("frontend", 256, &["k8s:app=frontend"]);
        assert_eq!(peer(Some(&frontend), &[], "10.0.0.1").0, "default/frontend");
        // The DNS proxy's upstream query: the node's address with frontend's identity.
        let proxied = ep("", 256, &["k8s:app=frontend"]);
        assert_eq!(
            peer(Some(&proxied), &[], "169.254.1.1"),
            ("default/frontend".to_owned(), "pod")
        );
        let names = ["api.github.com".to_owned()];
        assert_eq!(
            peer(Some(&ep("", 2, &[])), &names, "192.0.2.10").0,
            "api.github.com"
        );
        let fqdn = Endpoint {
            identity: 16_777_300,
            labels: vec!["fqdn:*.github.com".into()],
            ..Endpoint::default()
        };
        assert_eq!(peer(Some(&fqdn), &[], "192.0.2.10").0, "*.github.com");
        assert_eq!(peer(Some(&ep("", 1, &[])), &[], "169.254.1.1").0, "host");
        assert_eq!(
            peer(Some(&ep("", 16_777_301, &[])), &[], "192.0.2.9"),
            ("192.0.2.9".to_owned(), "ip")
        );
    }

    #[test]
    fn edge_classes() {
        let e = enricher();
        let class = |input: FlowInput| EdgeClass::of(&crate::convert::to_flow(&input, &e, "n"));
        assert_eq!(
            class(FlowInput::Http(http(
                L7Kind::Request,
                L7Verdict::Redirected,
                None
            ))),
            EdgeClass::Redirected
        );
        assert_eq!(
            class(FlowInput::Http(http(
                L7Kind::Request,
                L7Verdict::Error,
                None
            ))),
            EdgeClass::Other
        );
        assert_eq!(
            class(FlowInput::Dns(dns(L7Kind::Request, L7Verdict::Denied))),
            EdgeClass::L7Denied
        );
    }
}
