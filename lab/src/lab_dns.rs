//! The lab's cluster DNS: a small authoritative server (hickory-proto wire format) that the
//! lab runs in its `kube-dns` pod (`membrane lab dns-serve --zone FILE`), so pods resolve each
//! other and the world hosts by name as they would in a cluster.
//!
//! It answers, over UDP and TCP (RFC 7766 framing), from a [`Zone`] that `membrane lab up`
//! derives from the topology:
//! - `A` for explicit names: `<pod>.<namespace>.svc.cluster.local` for every pod, and the
//!   world hosts' names (`api.github.com`, `api.slack.com`, …);
//! - `A` for any other name under a pool suffix (`<label>.github.com`, `x.y.amazonaws.com`):
//!   a distinct address from the pool, chosen by a hash of the name (linear probing on a
//!   collision) and kept for the server's lifetime, so a test can ask for a fresh name and get
//!   a fresh IP every time. The world host that owns the pool answers on all of it (an AnyIP
//!   route, see `topology.rs`);
//! - `NOERROR` with no answer (NODATA) for other types of a known name, `NXDOMAIN` for unknown
//!   names, `REFUSED` for anything but a standard query of class IN, `SERVFAIL` when a pool is
//!   exhausted.
//!
//! Pure resolution ([`Resolver`]) is separate from the sockets ([`serve`]) so it is unit
//! tested without a network. This module must not depend on the agent's daemon or the datapath:
//! it is a workload of the lab, not part of the node.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, ResponseCode},
    rr::{DNSClass, RData, Record, RecordType, rdata::A},
};
use serde::{Deserialize, Serialize};

use crate::topology::Cidr;

/// Default TTL of the lab's answers, in seconds.
pub const DEFAULT_TTL: u32 = 30;
/// Largest UDP answer to a client without EDNS (RFC 1035 §4.2.1).
const CLASSIC_UDP_LIMIT: usize = 512;
/// Our EDNS payload size (the DNS flag day 2020 value).
const OWN_EDNS_PAYLOAD: u16 = 1232;
/// Bound on concurrent TCP connections; more wait in the listen backlog.
const MAX_TCP_CONNECTIONS: usize = 32;
/// A TCP connection idle this long is closed (RFC 7766 §6.2.3 suggests seconds).
const TCP_IDLE: Duration = Duration::from_secs(10);

/// What the lab DNS knows. Written by `membrane lab up` as YAML, read by `lab dns-serve`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Zone {
    /// TTL of every answer, in seconds.
    pub ttl: u32,
    /// Explicit names (lower case, no trailing dot) and their addresses.
    pub records: BTreeMap<String, Vec<Ipv4Addr>>,
    /// Suffixes whose other names get an address from a pool.
    #[serde(default)]
    pub pools: Vec<ZonePool>,
}

/// Names under `suffix` (one or more labels before it) get addresses from `cidr`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZonePool {
    pub suffix: String,
    pub cidr: Cidr,
}

#[derive(Debug, thiserror::Error)]
pub enum DnsServeError {
    #[error("zone file {file}: {detail}")]
    Zone { file: String, detail: String },
    #[error("lab DNS: {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Answers queries from a [`Zone`]; keeps the pool addresses it handed out.
#[derive(Debug)]
pub struct Resolver {
    ttl: u32,
    records: HashMap<String, Vec<Ipv4Addr>>,
    pools: Vec<PoolState>,
}

#[derive(Debug)]
struct PoolState {
    suffix: String,
    base: u32,
    size: u32,
    by_name: HashMap<String, Ipv4Addr>,
    used: HashSet<u32>,
}

impl PoolState {
    /// Offsets handed out: all but the first and the last address of the block (some
    /// clients refuse a network or broadcast-looking address), or all of a tiny block.
    fn usable(&self) -> (u32, u32) {
        if self.size >= 4 {
            (1, self.size - 2)
        } else {
            (0, self.size)
        }
    }

    fn address_for(&mut self, name: &str) -> Option<Ipv4Addr> {
        if let Some(ip) = self.by_name.get(name) {
            return Some(*ip);
        }
        let (first, count) = self.usable();
        if self.used.len() >= count as usize {
            return None;
        }
        let start = (fnv1a(name.as_bytes()) % u64::from(count)) as u32;
        // Bounded: at most `count` probes, and a free offset exists (checked above).
        let offset = (0..count)
            .map(|i| first + (start + i) % count)
            .find(|o| !self.used.contains(o))?;
        self.used.insert(offset);
        let ip = Ipv4Addr::from(self.base + offset);
        self.by_name.insert(name.to_owned(), ip);
        Some(ip)
    }
}

/// FNV-1a: a stable hash (unlike std's), so a name maps to the same pool address in every run
/// unless another name took it first.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Lower case, without the trailing dot.
fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// What a name resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Found(Vec<Ipv4Addr>),
    NxDomain,
    /// The name is under a pool suffix, but the pool has no free address.
    PoolExhausted,
}

impl Resolver {
    pub fn new(zone: &Zone) -> Self {
        Self {
            ttl: zone.ttl,
            records: zone
                .records
                .iter()
                .map(|(n, ips)| (normalize(n), ips.clone()))
                .collect(),
            pools: zone
                .pools
                .iter()
                .map(|p| PoolState {
                    suffix: normalize(&p.suffix),
                    base: u32::from(p.cidr.network()),
                    size: p.cidr.size(),
                    by_name: HashMap::new(),
                    used: HashSet::new(),
                })
                .collect(),
        }
    }

    /// The addresses of `name` (any case, with or without the trailing dot).
    pub fn lookup(&mut self, name: &str) -> Lookup {
        let name = normalize(name);
        if let Some(ips) = self.records.get(&name) {
            return Lookup::Found(ips.clone());
        }
        // The longest matching suffix wins, so `x.s3.amazonaws.com` can have a pool of its own.
        let pool = self
            .pools
            .iter_mut()
            .filter(|p| {
                name.len() > p.suffix.len() + 1
                    && name.ends_with(&p.suffix)
                    && name.as_bytes()[name.len() - p.suffix.len() - 1] == b'.'
            })
            .max_by_key(|p| p.suffix.len());
        match pool {
            Some(pool) => pool
                .address_for(&name)
                .map_or(Lookup::PoolExhausted, |ip| Lookup::Found(vec![ip])),
            None => Lookup::NxDomain,
        }
    }

    /// The encoded answer to one query message, or `None` when the bytes are not worth an
    /// answer (too short for a header, or a response). `limit` is the transport's size limit
    /// (`None` for TCP); a UDP answer over the client's limit is truncated (TC set).
    pub fn answer(&mut self, bytes: &[u8], udp: bool) -> Option<Vec<u8>> {
        let request = match Message::from_vec(bytes) {
            Ok(m) => m,
            Err(_) => {
                // Answer FORMERR when at least the ID is readable, as servers do.
                if bytes.len() < 12 || bytes[2] & 0x80 != 0 {
                    return None;
                }
                let id = u16::from_be_bytes([bytes[0], bytes[1]]);
                return Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
                    .to_vec()
                    .ok();
            }
        };
        if request.metadata.message_type != MessageType::Query {
            return None;
        }
        let mut response = Message::response(request.metadata.id, request.metadata.op_code);
        response.metadata.recursion_desired = request.metadata.recursion_desired;
        response.metadata.checking_disabled = request.metadata.checking_disabled;
        // Pods use this server as their resolver: without RA, stub resolvers and dig warn.
        response.metadata.recursion_available = true;
        response.metadata.authoritative = true;
        let limit = request
            .edns
            .as_ref()
            .map_or(CLASSIC_UDP_LIMIT, |e| usize::from(e.max_payload()))
            .max(CLASSIC_UDP_LIMIT);
        if request.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(OWN_EDNS_PAYLOAD);
            response.set_edns(edns);
        }
        response.metadata.response_code = match (request.metadata.op_code, &request.queries[..]) {
            (OpCode::Query, [query]) => {
                response.add_query(query.clone());
                if query.query_class() != DNSClass::IN {
                    ResponseCode::Refused
                } else {
                    match self.lookup(&query.name().to_ascii()) {
                        Lookup::Found(ips) => {
                            if query.query_type() == RecordType::A {
                                for ip in ips {
                                    response.add_answer(Record::from_rdata(
                                        query.name().clone(),
                                        self.ttl,
                                        RData::A(A(ip)),
                                    ));
                                }
                            }
                            // Other types of a known name: NOERROR without answers (NODATA).
                            ResponseCode::NoError
                        }
                        Lookup::NxDomain => ResponseCode::NXDomain,
                        Lookup::PoolExhausted => ResponseCode::ServFail,
                    }
                }
            }
            (OpCode::Query, _) => ResponseCode::FormErr,
            _ => ResponseCode::NotImp,
        };
        let encoded = response.to_vec().ok()?;
        if udp && encoded.len() > limit {
            let mut truncated = response.truncate();
            truncated.metadata.id = response.metadata.id;
            return truncated.to_vec().ok();
        }
        Some(encoded)
    }
}

/// Reads a zone file (YAML, as `membrane lab up` writes it).
pub fn load_zone(path: &Path) -> Result<Zone, DnsServeError> {
    let zone_err = |detail: String| DnsServeError::Zone {
        file: path.display().to_string(),
        detail,
    };
    let text = std::fs::read_to_string(path).map_err(|e| zone_err(e.to_string()))?;
    serde_yaml_ng::from_str(&text).map_err(|e| zone_err(e.to_string()))
}

/// `membrane lab dns-serve`: answers on UDP and TCP `listen` (inside the kube-dns pod's
/// namespace) until `lifetime` has passed. One line per query goes to stdout.
pub fn serve(zone: &Zone, listen: SocketAddr, lifetime: Duration) -> Result<(), DnsServeError> {
    let io = |what: &str| {
        let what = format!("{what} {listen}");
        move |source| DnsServeError::Io { what, source }
    };
    let udp = UdpSocket::bind(listen).map_err(io("bind UDP"))?;
    let tcp = TcpListener::bind(listen).map_err(io("bind TCP"))?;
    let resolver = Arc::new(Mutex::new(Resolver::new(zone)));
    println!(
        "lab DNS on {listen} (UDP, TCP): {} names, {} pools, ttl {} s",
        zone.records.len(),
        zone.pools.len(),
        zone.ttl
    );

    let udp_resolver = Arc::clone(&resolver);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            let Ok((len, peer)) = udp.recv_from(&mut buf) else {
                continue;
            };
            let reply = lock(&udp_resolver).answer(&buf[..len], true);
            if let Some(reply) = reply {
                log_query(&buf[..len], &reply, "udp", peer);
                let _ = udp.send_to(&reply, peer);
            }
        }
    });

    let active = Arc::new(AtomicUsize::new(0));
    std::thread::spawn(move || {
        for conn in tcp.incoming() {
            let Ok(conn) = conn else { continue };
            // Bounded: wait for a slot rather than spawn without limit.
            while active.load(Ordering::Acquire) >= MAX_TCP_CONNECTIONS {
                std::thread::sleep(Duration::from_millis(5));
            }
            active.fetch_add(1, Ordering::AcqRel);
            let resolver = Arc::clone(&resolver);
            let active = Arc::clone(&active);
            std::thread::spawn(move || {
                serve_tcp(conn, &resolver);
                active.fetch_sub(1, Ordering::AcqRel);
            });
        }
    });

    std::thread::sleep(lifetime);
    Ok(())
}

fn lock(resolver: &Mutex<Resolver>) -> std::sync::MutexGuard<'_, Resolver> {
    // A panic in one answer must not stop the server: the state is a cache of allocations.
    resolver.lock().unwrap_or_else(|p| p.into_inner())
}

/// Queries on one TCP connection (2-byte length prefix), answered in order, until the peer
/// closes it or it is idle for [`TCP_IDLE`].
fn serve_tcp(mut conn: TcpStream, resolver: &Mutex<Resolver>) {
    let peer = conn
        .peer_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let _ = conn.set_read_timeout(Some(TCP_IDLE));
    let _ = conn.set_write_timeout(Some(TCP_IDLE));
    let mut len = [0u8; 2];
    while conn.read_exact(&mut len).is_ok() {
        let mut message = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if conn.read_exact(&mut message).is_err() {
            return;
        }
        let Some(reply) = lock(resolver).answer(&message, false) else {
            return;
        };
        log_query(&message, &reply, "tcp", peer);
        let Ok(reply_len) = u16::try_from(reply.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&reply_len.to_be_bytes());
        framed.extend_from_slice(&reply);
        if conn.write_all(&framed).is_err() {
            return;
        }
    }
}

fn log_query(query: &[u8], reply: &[u8], transport: &str, peer: SocketAddr) {
    let (Ok(q), Ok(r)) = (Message::from_vec(query), Message::from_vec(reply)) else {
        return;
    };
    let Some(question) = q.queries.first() else {
        return;
    };
    let ips: Vec<String> = r
        .answers
        .iter()
        .filter_map(|a| match &a.data {
            RData::A(A(ip)) => Some(ip.to_string()),
            _ => None,
        })
        .collect();
    println!(
        "{transport} {peer} {} {} -> {} {}",
        question.name(),
        question.query_type(),
        r.metadata.response_code,
        ips.join(",")
    );
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use hickory_proto::{
        op::Query,
        rr::{Name, RecordType},
    };

    use super::*;

    fn zone() -> Zone {
        Zone {
            ttl: 30,
            records: BTreeMap::from([
                (
                    "backend.default.svc.cluster.local".to_owned(),
                    vec![Ipv4Addr::new(10, 200, 0, 11)],
                ),
                (
                    "api.github.com".to_owned(),
                    vec![Ipv4Addr::new(192, 0, 2, 10)],
                ),
            ]),
            pools: vec![
                ZonePool {
                    suffix: "github.com".into(),
                    cidr: "198.18.0.0/16".parse().expect("cidr"),
                },
                ZonePool {
                    suffix: "tiny.example".into(),
                    cidr: "198.19.0.0/30".parse().expect("cidr"),
                },
            ],
        }
    }

    fn query(name: &str, rtype: RecordType, edns: bool) -> Vec<u8> {
        let mut m = Message::new(0x4242, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).expect("name"), rtype));
        if edns {
            m.set_edns(Edns::new());
        }
        m.to_vec().expect("encode")
    }

    fn ask(r: &mut Resolver, name: &str, rtype: RecordType) -> Message {
        Message::from_vec(&r.answer(&query(name, rtype, true), true).expect("answer"))
            .expect("decode")
    }

    fn ips(m: &Message) -> Vec<Ipv4Addr> {
        m.answers
            .iter()
            .filter_map(|a| match &a.data {
                RData::A(A(ip)) => Some(*ip),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn explicit_names_any_case_with_ttl_and_id() {
        let mut r = Resolver::new(&zone());
        let m = ask(&mut r, "Backend.Default.svc.cluster.local.", RecordType::A);
        assert_eq!(m.metadata.id, 0x4242);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative && m.metadata.recursion_desired);
        assert_eq!(ips(&m), vec![Ipv4Addr::new(10, 200, 0, 11)]);
        assert_eq!(m.answers[0].ttl, 30);
        assert!(m.edns.is_some(), "EDNS answered with EDNS");
        assert_eq!(
            ips(&ask(&mut r, "api.github.com", RecordType::A)),
            vec![Ipv4Addr::new(192, 0, 2, 10)],
            "an explicit name wins over its pool"
        );
    }

    #[test]
    fn unknown_names_nxdomain_other_types_nodata() {
        let mut r = Resolver::new(&zone());
        for name in [
            "backend.svc.cluster.local",
            "api.github.com.default.svc.cluster.local",
            "github.com",
            "example.com",
            "xgithub.com",
        ] {
            let m = ask(&mut r, name, RecordType::A);
            assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name}");
            assert!(m.answers.is_empty());
        }
        let m = ask(
            &mut r,
            "backend.default.svc.cluster.local",
            RecordType::AAAA,
        );
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
    }

    #[test]
    fn pool_names_get_distinct_stable_addresses() {
        let mut r = Resolver::new(&zone());
        let net: Cidr = "198.18.0.0/16".parse().expect("cidr");
        let mut seen = HashSet::new();
        for i in 0..2000 {
            let name = format!("t{i}.github.com");
            let got = ips(&ask(&mut r, &name, RecordType::A));
            assert_eq!(got.len(), 1, "{name}");
            assert!(net.contains(got[0]), "{name} -> {}", got[0]);
            assert!(seen.insert(got[0]), "{name} got a taken address {}", got[0]);
            assert_eq!(
                ips(&ask(&mut r, &name.to_uppercase(), RecordType::A)),
                got,
                "stable"
            );
        }
        // Several labels under the suffix are fine too.
        assert_eq!(
            ask(&mut r, "a.b.github.com", RecordType::A).answers.len(),
            1
        );
    }

    #[test]
    fn exhausted_pool_is_servfail() {
        let mut r = Resolver::new(&zone());
        // A /30 hands out its two middle addresses, never .0 or .3.
        let mut got = BTreeSet::new();
        for i in 0..2 {
            let m = ask(&mut r, &format!("n{i}.tiny.example"), RecordType::A);
            got.extend(ips(&m));
        }
        assert_eq!(
            got,
            BTreeSet::from([Ipv4Addr::new(198, 19, 0, 1), Ipv4Addr::new(198, 19, 0, 2)])
        );
        let m = ask(&mut r, "n2.tiny.example", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        let again = ask(&mut r, "n0.tiny.example", RecordType::A);
        assert_eq!(ips(&again).len(), 1, "known names keep their address");
    }

    #[test]
    fn malformed_and_odd_queries() {
        let mut r = Resolver::new(&zone());
        assert_eq!(r.answer(&[1, 2, 3], true), None, "no header: no answer");
        let garbage = [0x12, 0x34, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xff];
        let m = Message::from_vec(&r.answer(&garbage, true).expect("formerr")).expect("decode");
        assert_eq!(m.metadata.id, 0x1234);
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        let mut response =
            Message::from_vec(&query("a.github.com", RecordType::A, false)).expect("decode");
        response.metadata.message_type = MessageType::Response;
        assert_eq!(
            r.answer(&response.to_vec().expect("encode"), true),
            None,
            "responses are not answered"
        );
        let without_edns = Message::from_vec(
            &r.answer(&query("api.github.com", RecordType::A, false), true)
                .expect("answer"),
        )
        .expect("decode");
        assert!(without_edns.edns.is_none());
    }

    #[test]
    fn zone_round_trips_through_yaml() {
        let text = serde_yaml_ng::to_string(&zone()).expect("yaml");
        let back: Zone = serde_yaml_ng::from_str(&text).expect("parse");
        assert_eq!(back, zone());
        let err = serde_yaml_ng::from_str::<Zone>("ttl: 3\nrecords: {}\nextra: 1\n")
            .expect_err("unknown field");
        assert!(err.to_string().contains("extra"), "{err}");
    }
}
