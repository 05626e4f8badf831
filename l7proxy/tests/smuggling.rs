//! Request-smuggling vectors against the standalone proxy, written as exact bytes on a raw
//! TCP connection: each must be answered 400 and closed, and the upstream (which counts
//! requests) must never see it.

mod common;

use anyhow::Result;
use common::*;
use membrane_l7proxy::access::RecordKind;

/// (name, request bytes). Every one is malformed in a way some HTTP parser reads
/// differently from another.
fn vectors() -> Vec<(&'static str, Vec<u8>)> {
    let mut v: Vec<(&'static str, Vec<u8>)> = vec![
        ("CL then TE", b"POST /public HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG".to_vec()),
        ("TE then CL", b"POST /public HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n0\r\n\r\nG".to_vec()),
        ("duplicate CL, same value", b"POST /public HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello".to_vec()),
        ("duplicate CL, different values", b"POST /public HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".to_vec()),
        ("CL list", b"POST /public HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello".to_vec()),
        ("CL with sign", b"POST /public HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello".to_vec()),
        ("TE not chunked", b"POST /public HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n".to_vec()),
        ("TE chunked twice", b"POST /public HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec()),
        ("TE in HTTP/1.0", b"POST /public HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec()),
        ("obs-fold", b"GET /public HTTP/1.1\r\nHost: a\r\nX-Folded: one\r\n two\r\n\r\n".to_vec()),
        ("obs-fold with tab", b"GET /public HTTP/1.1\r\nHost: a\r\nX-Folded: one\r\n\ttwo\r\n\r\n".to_vec()),
        ("bare LF everywhere", b"GET /public HTTP/1.1\nHost: a\n\n".to_vec()),
        ("bare LF in one header", b"GET /public HTTP/1.1\r\nHost: a\nX-A: b\r\n\r\n".to_vec()),
        ("bare CR in a value", b"GET /public HTTP/1.1\r\nHost: a\r\nX-A: b\rX-B: c\r\n\r\n".to_vec()),
        ("NUL in a value", b"GET /public HTTP/1.1\r\nHost: a\r\nX-A: b\0\r\n\r\n".to_vec()),
        ("control byte in a value", b"GET /public HTTP/1.1\r\nHost: a\r\nX-A: b\x01\r\n\r\n".to_vec()),
        ("space before colon", b"GET /public HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n".to_vec()),
        ("invalid header name", b"GET /public HTTP/1.1\r\nHost: a\r\nX\"A: b\r\n\r\n".to_vec()),
        ("missing Host", b"GET /public HTTP/1.1\r\n\r\n".to_vec()),
        ("two Hosts", b"GET /public HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".to_vec()),
        ("bad request line", b"GET /public HTTP/1.1 extra\r\nHost: a\r\n\r\n".to_vec()),
    ];
    // Oversized: one header of 70 KiB (> 64 KiB), and 101 headers (> 100).
    let mut big = b"GET /public HTTP/1.1\r\nHost: a\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 70 * 1024));
    big.extend_from_slice(b"\r\n\r\n");
    v.push(("70 KiB header", big));
    let mut many = b"GET /public HTTP/1.1\r\nHost: a\r\n".to_vec();
    for i in 0..100 {
        many.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    v.push(("101 headers", many));
    v
}

#[tokio::test]
async fn every_vector_is_400_and_never_forwarded() -> Result<()> {
    let upstream = start_upstream().await?;
    let proxy = start_proxy(upstream.addr, None).await?;
    for (name, bytes) in vectors() {
        let reply = raw_exchange(proxy.addr, &bytes).await?;
        assert!(reply.starts_with("HTTP/1.1 400 "), "{name}: {reply:?}");
        assert_eq!(
            reply.matches("HTTP/1.1 ").count(),
            1,
            "{name}: one reply only: {reply:?}"
        );
        assert_eq!(upstream.count(), 0, "{name}: reached the upstream");
    }
    proxy.stop().await
}

#[tokio::test]
async fn limits_are_configurable() -> Result<()> {
    let upstream = start_upstream().await?;
    let mut config = config(upstream.addr, None);
    config.header_limits.max_headers = 200;
    config.header_limits.max_header_bytes = 128 * 1024;
    let proxy = start_proxy_with(config).await?;
    // What the defaults reject passes with raised limits…
    for (name, bytes) in vectors()
        .into_iter()
        .filter(|(n, _)| *n == "70 KiB header" || *n == "101 headers")
    {
        let mut bytes = bytes;
        // …as the first of two requests, so the reply does not wait for an idle timeout.
        bytes.extend_from_slice(b"GET /end HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        let reply = raw_exchange(proxy.addr, &bytes).await?;
        assert!(reply.starts_with("HTTP/1.1 200 "), "{name}: {reply:?}");
    }
    assert_eq!(upstream.count(), 4);
    proxy.stop().await
}

#[tokio::test]
async fn pipelined_requests_before_a_bad_one_are_served() -> Result<()> {
    let upstream = start_upstream().await?;
    let mut proxy = start_proxy(upstream.addr, None).await?;
    let reply = raw_exchange(
        proxy.addr,
        b"POST /first HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
          POST /second HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n\
          GET /smuggled HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n\
          GET /never HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .await?;
    let statuses: Vec<&str> = reply
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &reply[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["200", "200", "400"], "{reply:?}");
    let seen: Vec<String> = upstream.seen().into_iter().map(|s| s.uri).collect();
    assert_eq!(seen, ["/first", "/second"]);

    // The rejection is recorded: Denied, 400, no policy rule, and why.
    let mut violation = None;
    for _ in 0..5 {
        let record = proxy.record().await?;
        if record.status == Some(400) {
            violation = Some(record);
            break;
        }
    }
    let violation = violation.expect("a record for the rejected request");
    assert_eq!(violation.kind, RecordKind::Denied);
    assert_eq!(violation.rule, None);
    assert_eq!(
        violation.error.as_deref(),
        Some("more than one Content-Length header")
    );
    proxy.stop().await
}

#[tokio::test]
async fn well_formed_pipelines_and_slow_clients_work() -> Result<()> {
    let upstream = start_upstream().await?;
    let proxy = start_proxy(upstream.addr, None).await?;
    let request = b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /last HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    // All at once…
    let reply = raw_exchange(proxy.addr, request).await?;
    assert_eq!(reply.matches("HTTP/1.1 200 ").count(), 2, "{reply:?}");
    // …and one byte per write, as a slow client sends it.
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await?;
    for byte in request {
        tokio::io::AsyncWriteExt::write_all(&mut stream, std::slice::from_ref(byte)).await?;
    }
    let reply = read_to_close(&mut stream).await?;
    assert_eq!(reply.matches("HTTP/1.1 200 ").count(), 2, "{reply:?}");
    assert!(reply.contains("abc"), "{reply:?}");
    assert_eq!(upstream.count(), 4);
    proxy.stop().await
}
