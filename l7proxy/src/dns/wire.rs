//! DNS messages on the wire: parsing client queries, building the proxy's own replies,
//! fitting responses into the client's UDP size, and reading the answer's addresses.
//!
//! Owns every use of hickory-proto's message types, so the rest of the DNS proxy deals in
//! bytes, names and addresses. Forwarded messages stay the bytes the peer sent with only
//! the 16-bit ID rewritten: EDNS options, flags and record order pass through untouched,
//! and the common path costs no re-encoding. A response is re-encoded only when it must be
//! trimmed for the client's UDP size.
//!
//! Nothing here panics on input: every malformed message is an error value.

use std::borrow::Cow;
use std::collections::HashSet;
use std::net::IpAddr;

use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use membrane_policy::fqdn::normalize_name;

/// Size of the fixed DNS header.
pub(crate) const HEADER_LEN: usize = 12;

/// The UDP payload size a client without EDNS accepts (RFC 1035 §4.2.1).
pub(crate) const CLASSIC_UDP_LIMIT: usize = 512;

/// The EDNS payload size the proxy advertises in its own replies: the DNS flag day 2020
/// value, which avoids IP fragmentation on every common path.
const OWN_EDNS_PAYLOAD: u16 = 1232;

/// A client query that passed the checks, with what the proxy needs from it.
#[derive(Debug, Clone)]
pub(crate) struct ClientQuery {
    pub(crate) message: Message,
    /// The single question.
    pub(crate) question: Query,
    /// The question name, lower-cased and fully qualified (what policy matches and what
    /// learned IPs are keyed by).
    pub(crate) qname: String,
    /// The largest UDP reply the client accepts: its EDNS payload size (at least 512), or
    /// 512 without EDNS.
    pub(crate) udp_limit: usize,
}

impl ClientQuery {
    pub(crate) fn id(&self) -> u16 {
        self.message.metadata.id
    }

    pub(crate) fn qtype(&self) -> RecordType {
        self.question.query_type()
    }
}

/// Why a client message was not accepted as a query.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum QueryRejection {
    /// Too short for a header, or a response (QR set): answering could start a loop or
    /// reflect traffic, and there is no trustworthy ID. Dropped and counted.
    #[error("dropped {len}-byte message: {reason}")]
    Drop { len: usize, reason: &'static str },
    /// A header is present, the rest is not an acceptable query: the client gets `rcode`
    /// with its ID.
    #[error("query id {id}: {reason}")]
    Reply {
        id: u16,
        rcode: ResponseCode,
        reason: String,
        /// Header flags to echo.
        header: Header,
        /// The question, when it could be read (boxed: it is most of the variant's size).
        question: Option<Box<Query>>,
        /// Whether the query carried EDNS (the reply then carries it too).
        edns: bool,
    },
}

/// Parses and checks a client query. The checks are miekg/dns's default `MsgAcceptFunc`
/// (what Cilium's proxy runs behind): exactly one question, no answer or authority
/// records, opcode QUERY (else NOTIMP), and it must not be a response.
pub(crate) fn parse_query(bytes: &[u8]) -> Result<ClientQuery, QueryRejection> {
    let header = read_header(bytes).ok_or(QueryRejection::Drop {
        len: bytes.len(),
        reason: "shorter than a DNS header",
    })?;
    let meta = header.metadata;
    if meta.message_type == MessageType::Response {
        return Err(QueryRejection::Drop {
            len: bytes.len(),
            reason: "a response (QR set) sent to the proxy",
        });
    }
    let reply =
        |rcode, reason: String, question: Option<&Query>, edns: bool| QueryRejection::Reply {
            id: meta.id,
            rcode,
            reason,
            header,
            question: question.cloned().map(Box::new),
            edns,
        };
    let message = match Message::from_vec(bytes) {
        Ok(message) => message,
        Err(error) => {
            return Err(reply(
                ResponseCode::FormErr,
                format!("malformed message: {error}"),
                None,
                false,
            ));
        }
    };
    let edns = message.edns.is_some();
    if meta.op_code != OpCode::Query {
        return Err(reply(
            ResponseCode::NotImp,
            format!("opcode {:?} is not supported", meta.op_code),
            message.queries.first(),
            edns,
        ));
    }
    if message.queries.len() != 1 {
        return Err(reply(
            ResponseCode::FormErr,
            format!("{} questions, exactly 1 expected", message.queries.len()),
            None,
            edns,
        ));
    }
    let question = message.queries[0].clone();
    if !message.answers.is_empty() || !message.authorities.is_empty() {
        return Err(reply(
            ResponseCode::FormErr,
            "a query with answer or authority records".to_owned(),
            Some(&question),
            edns,
        ));
    }
    let qname = normalize_name(&question.name().to_ascii());
    let udp_limit = message
        .edns
        .as_ref()
        .map_or(CLASSIC_UDP_LIMIT, |e| usize::from(e.max_payload()))
        .max(CLASSIC_UDP_LIMIT);
    Ok(ClientQuery {
        message,
        question,
        qname,
        udp_limit,
    })
}

fn read_header(bytes: &[u8]) -> Option<Header> {
    if bytes.len() < HEADER_LEN {
        return None;
    }
    Header::read(&mut BinDecoder::new(bytes)).ok()
}

/// Overwrites the ID of an encoded message. Messages shorter than a header are left alone
/// (the callers only pass parsed messages).
pub(crate) fn set_id(bytes: &mut [u8], id: u16) {
    if bytes.len() >= HEADER_LEN {
        bytes[..2].copy_from_slice(&id.to_be_bytes());
    }
}

/// The header and first question of an upstream response, read without decoding records:
/// the upstream multiplexer uses it to route a response to its waiting query.
pub(crate) fn response_key(bytes: &[u8]) -> Option<(u16, Query)> {
    let mut decoder = BinDecoder::new(bytes);
    let header = Header::read(&mut decoder).ok()?;
    if header.metadata.message_type != MessageType::Response || header.counts.queries != 1 {
        return None;
    }
    let query = Query::read(&mut decoder).ok()?;
    Some((header.metadata.id, query))
}

/// True if a response's question is the one that was asked: same type and class, name
/// equal ignoring ASCII case (resolvers may randomize case, RFC draft "0x20").
pub(crate) fn same_question(asked: &Query, answered: &Query) -> bool {
    asked.query_type() == answered.query_type()
        && asked.query_class() == answered.query_class()
        && asked.name().eq_ignore_root_case(answered.name())
}

/// The proxy's own reply to a query it will not forward (REFUSED/NXDOMAIN on deny,
/// SERVFAIL on processing errors): the client's ID, opcode, RD and CD, its question
/// echoed, and an OPT record when the query had EDNS (RFC 6891 §6.1.1).
pub(crate) fn error_reply(query: &ClientQuery, rcode: ResponseCode) -> Result<Vec<u8>, String> {
    reply_bytes(
        &query.message.metadata,
        Some(&query.question),
        query.message.edns.is_some(),
        rcode,
    )
}

/// The reply to a rejected message that still had a header.
pub(crate) fn rejection_reply(rejection: &QueryRejection) -> Option<Vec<u8>> {
    match rejection {
        QueryRejection::Drop { .. } => None,
        QueryRejection::Reply {
            rcode,
            header,
            question,
            edns,
            ..
        } => reply_bytes(&header.metadata, question.as_deref(), *edns, *rcode).ok(),
    }
}

fn reply_bytes(
    request: &hickory_proto::op::Metadata,
    question: Option<&Query>,
    edns: bool,
    rcode: ResponseCode,
) -> Result<Vec<u8>, String> {
    let mut reply = Message::error_msg(request.id, request.op_code, rcode);
    reply.metadata.recursion_desired = request.recursion_desired;
    reply.metadata.checking_disabled = request.checking_disabled;
    // The proxy stands in for a recursive server; without RA, stub resolvers and dig warn
    // that recursion is unavailable, which is not what a policy denial means.
    reply.metadata.recursion_available = true;
    if let Some(question) = question {
        reply.add_query(question.clone());
    }
    if edns {
        let mut opt = Edns::new();
        opt.set_max_payload(OWN_EDNS_PAYLOAD);
        reply.set_edns(opt);
    }
    reply
        .to_vec()
        .map_err(|e| format!("cannot encode a {rcode} reply: {e}"))
}

/// Fits an upstream response into `limit` bytes for a UDP client. A response that fits is
/// returned as is. Otherwise (RFC 2181 §9) the additional section is dropped first (the OPT
/// record stays), which needs no TC bit; if that is still too large, the client gets the
/// header with TC set, its question and OPT, and retries over TCP (RFC 7766 §5).
pub(crate) fn fit_udp<'a>(
    bytes: &'a [u8],
    response: &Message,
    limit: usize,
) -> Result<(Cow<'a, [u8]>, bool), String> {
    if bytes.len() <= limit {
        return Ok((Cow::Borrowed(bytes), false));
    }
    let mut trimmed = response.clone();
    trimmed.additionals.clear();
    trimmed.signature = None;
    let encoded = trimmed
        .to_vec()
        .map_err(|e| format!("cannot re-encode a response to trim it: {e}"))?;
    if encoded.len() <= limit {
        return Ok((Cow::Owned(encoded), false));
    }
    let mut truncated = response.truncate();
    truncated.metadata.id = response.metadata.id;
    let encoded = truncated
        .to_vec()
        .map_err(|e| format!("cannot encode a truncated response: {e}"))?;
    if encoded.len() > limit {
        // Only a question longer than the client's own limit gets here; the client could
        // not have sent it. Refuse to send an oversized datagram.
        return Err(format!(
            "even the truncated response is {} bytes, over the client's {limit}",
            encoded.len()
        ));
    }
    Ok((Cow::Owned(encoded), true))
}

/// What a response says about the question name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct AnswerDetails {
    /// A and AAAA addresses of the question name or of a name on its CNAME chain, in answer
    /// order, without duplicates.
    pub(crate) ips: Vec<IpAddr>,
    /// Minimum TTL over the CNAMEs of the chain and the A/AAAA records taken (`None` without
    /// addresses).
    pub(crate) ttl: Option<u32>,
    /// The CNAME targets followed, lower-cased and fully qualified.
    pub(crate) cnames: Vec<String>,
    /// Types of all answer records, in order (`A`, `CNAME`, …) for records.
    pub(crate) rrtypes: Vec<String>,
    /// Answer records whose owner is not on the chain (ignored for learning; an upstream
    /// must not get IPs allowed for names nobody asked about).
    pub(crate) unrelated: usize,
}

/// Bound on CNAME hops, as recursive servers bound them (BIND follows at most 16).
const MAX_CNAME_HOPS: usize = 16;

/// Follows the CNAME chain from `qname` through the answer section and collects the
/// addresses at the names on it (Cilium's `ExtractMsgDetails`, but accepting records in any
/// order and ignoring, not failing on, records for other names).
pub(crate) fn answer_details(response: &Message, qname: &str) -> AnswerDetails {
    let lower = |name: &Name| normalize_name(&name.to_ascii());
    let mut details = AnswerDetails {
        rrtypes: response
            .answers
            .iter()
            .map(|r| r.record_type().to_string())
            .collect(),
        ..AnswerDetails::default()
    };
    let mut chain: Vec<String> = vec![qname.to_owned()];
    let mut min_ttl: Option<u32> = None;
    // Walk CNAMEs: each hop looks for a CNAME owned by the chain's last name.
    for _ in 0..MAX_CNAME_HOPS {
        let Some(last) = chain.last() else { break };
        let next = response.answers.iter().find_map(|r| match &r.data {
            RData::CNAME(target) if lower(&r.name) == *last => Some((lower(&target.0), r.ttl)),
            _ => None,
        });
        match next {
            Some((target, ttl)) if !chain.contains(&target) => {
                min_ttl = Some(min_ttl.map_or(ttl, |m| m.min(ttl)));
                details.cnames.push(target.clone());
                chain.push(target);
            }
            _ => break,
        }
    }
    let on_chain: HashSet<&str> = chain.iter().map(String::as_str).collect();
    let mut seen = HashSet::new();
    let mut address_ttl: Option<u32> = None;
    for record in &response.answers {
        let ip = match &record.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(aaaa) => IpAddr::V6(aaaa.0),
            RData::CNAME(_) => {
                if !on_chain.contains(lower(&record.name).as_str()) {
                    details.unrelated += 1;
                }
                continue;
            }
            _ => continue,
        };
        if !on_chain.contains(lower(&record.name).as_str()) {
            details.unrelated += 1;
            continue;
        }
        address_ttl = Some(address_ttl.map_or(record.ttl, |m| m.min(record.ttl)));
        if seen.insert(ip) {
            details.ips.push(ip);
        }
    }
    if let Some(address_ttl) = address_ttl {
        details.ttl = Some(min_ttl.map_or(address_ttl, |m| m.min(address_ttl)));
    }
    details
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::str::FromStr;

    use hickory_proto::rr::Record;
    use hickory_proto::rr::rdata::{A, AAAA, CNAME};

    use super::*;

    fn name(n: &str) -> Name {
        Name::from_str(n).expect("name")
    }

    fn query_bytes(id: u16, qname: &str, edns: Option<u16>) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = id;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(name(qname), RecordType::A));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            m.set_edns(e);
        }
        m.to_vec().expect("encode")
    }

    #[test]
    fn parses_a_query() {
        let q = parse_query(&query_bytes(0x1234, "WWW.Example.COM.", Some(4096))).expect("ok");
        assert_eq!(q.id(), 0x1234);
        assert_eq!(q.qname, "www.example.com.");
        assert_eq!(q.udp_limit, 4096);
        assert_eq!(q.qtype(), RecordType::A);
        let q = parse_query(&query_bytes(1, "a.example.", None)).expect("ok");
        assert_eq!(q.udp_limit, 512);
        let q = parse_query(&query_bytes(1, "a.example.", Some(100))).expect("ok");
        assert_eq!(q.udp_limit, 512, "EDNS sizes below 512 mean 512");
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        assert!(matches!(
            parse_query(&[1, 2, 3]),
            Err(QueryRejection::Drop { len: 3, .. })
        ));
        // A header claiming one question that is not there: FORMERR with the ID.
        let mut bytes = query_bytes(0xBEEF, "a.example.", None);
        bytes.truncate(HEADER_LEN + 3);
        let rejection = parse_query(&bytes).expect_err("truncated");
        let QueryRejection::Reply { id, rcode, .. } = &rejection else {
            panic!("expected a reply, got {rejection:?}");
        };
        assert_eq!((*id, *rcode), (0xBEEF, ResponseCode::FormErr));
        let reply = Message::from_vec(&rejection_reply(&rejection).expect("reply")).expect("ok");
        assert_eq!(reply.metadata.id, 0xBEEF);
        assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
        // A response sent to the proxy is dropped.
        let mut response = query_bytes(7, "a.example.", None);
        response[2] |= 0x80;
        assert!(matches!(
            parse_query(&response),
            Err(QueryRejection::Drop { .. })
        ));
        // Every prefix and a few bit flips of a valid query: no panic.
        let valid = query_bytes(9, "www.example.com.", Some(1232));
        for len in 0..valid.len() {
            let _ = parse_query(&valid[..len]);
        }
        for i in 0..valid.len() {
            let mut flipped = valid.clone();
            flipped[i] ^= 0xA5;
            let _ = parse_query(&flipped);
        }
    }

    #[test]
    fn error_reply_echoes_id_question_and_edns() {
        let q = parse_query(&query_bytes(0x4242, "Denied.Example.", Some(4096))).expect("ok");
        let reply = Message::from_vec(&error_reply(&q, ResponseCode::Refused).expect("encode"))
            .expect("decode");
        assert_eq!(reply.metadata.id, 0x4242);
        assert_eq!(reply.metadata.message_type, MessageType::Response);
        assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
        assert!(reply.metadata.recursion_desired);
        assert_eq!(reply.queries, vec![q.question.clone()]);
        assert!(reply.edns.is_some());
    }

    fn response_with(answers: Vec<Record>) -> Message {
        let mut m = Message::response(5, OpCode::Query);
        m.add_query(Query::query(name("www.example.com."), RecordType::A));
        m.add_answers(answers);
        m
    }

    #[test]
    fn follows_the_cname_chain_with_min_ttl() {
        let answers = vec![
            // Out of order on purpose, plus an unrelated record that must not be learned.
            Record::from_rdata(
                name("edge.cdn.example."),
                300,
                RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
            ),
            Record::from_rdata(
                name("WWW.example.com."),
                120,
                RData::CNAME(CNAME(name("edge.CDN.example."))),
            ),
            Record::from_rdata(
                name("edge.cdn.example."),
                30,
                RData::AAAA(AAAA(Ipv6Addr::LOCALHOST)),
            ),
            Record::from_rdata(
                name("evil.example."),
                5,
                RData::A(A(Ipv4Addr::new(203, 0, 113, 9))),
            ),
            Record::from_rdata(
                name("edge.cdn.example."),
                300,
                RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
            ),
        ];
        let details = answer_details(&response_with(answers), "www.example.com.");
        assert_eq!(
            details.ips,
            vec![
                IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
                IpAddr::V6(Ipv6Addr::LOCALHOST)
            ]
        );
        assert_eq!(details.ttl, Some(30));
        assert_eq!(details.cnames, vec!["edge.cdn.example.".to_owned()]);
        assert_eq!(details.unrelated, 1);
        assert_eq!(details.rrtypes, ["A", "CNAME", "AAAA", "A", "A"]);
    }

    #[test]
    fn cname_ttl_counts_and_loops_end() {
        let answers = vec![
            Record::from_rdata(
                name("www.example.com."),
                10,
                RData::CNAME(CNAME(name("a.example."))),
            ),
            Record::from_rdata(
                name("a.example."),
                600,
                RData::CNAME(CNAME(name("www.example.com."))),
            ),
            Record::from_rdata(
                name("a.example."),
                600,
                RData::A(A(Ipv4Addr::new(192, 0, 2, 7))),
            ),
        ];
        let details = answer_details(&response_with(answers), "www.example.com.");
        assert_eq!(details.ips, vec![IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))]);
        assert_eq!(details.ttl, Some(10), "the CNAME's TTL bounds the chain");
        let none = answer_details(&response_with(Vec::new()), "www.example.com.");
        assert_eq!(none, AnswerDetails::default());
    }

    #[test]
    fn fit_udp_trims_and_sets_tc() {
        let answers = (0..100u8)
            .map(|i| {
                Record::from_rdata(
                    name("www.example.com."),
                    60,
                    RData::A(A(Ipv4Addr::new(192, 0, 2, i))),
                )
            })
            .collect();
        let response = response_with(answers);
        let bytes = response.to_vec().expect("encode");
        assert!(bytes.len() > 512);
        let (fitted, truncated) = fit_udp(&bytes, &response, 512).expect("fits");
        assert!(truncated);
        assert!(fitted.len() <= 512);
        let decoded = Message::from_vec(&fitted).expect("decode");
        assert!(decoded.metadata.truncation);
        assert_eq!(decoded.metadata.id, 5);
        assert_eq!(decoded.queries.len(), 1);
        assert!(decoded.answers.is_empty());
        let (whole, truncated) = fit_udp(&bytes, &response, 65535).expect("fits");
        assert!(!truncated);
        assert_eq!(whole.as_ref(), bytes.as_slice());
    }

    #[test]
    fn response_key_and_ids() {
        let mut bytes = query_bytes(77, "www.example.com.", None);
        assert!(response_key(&bytes).is_none(), "a query is not a response");
        bytes[2] |= 0x80;
        let (id, q) = response_key(&bytes).expect("key");
        assert_eq!(id, 77);
        assert!(same_question(
            &Query::query(name("WWW.EXAMPLE.com."), RecordType::A),
            &q
        ));
        assert!(!same_question(
            &Query::query(name("www.example.com."), RecordType::AAAA),
            &q
        ));
        set_id(&mut bytes, 0xABCD);
        assert_eq!(&bytes[..2], &[0xAB, 0xCD]);
        let mut short = [1u8, 2, 3];
        set_id(&mut short, 0xFFFF);
        assert_eq!(short, [1, 2, 3], "too short for a header: untouched");
    }
}
