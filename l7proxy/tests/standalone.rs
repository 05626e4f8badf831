//! End-to-end tests of the standalone reverse proxy: real upstream, real proxy, real clients
//! (hyper HTTP/1.1 and HTTP/2, raw TCP, curl), all on 127.0.0.1.

mod common;

use std::time::Duration;

use anyhow::{Context as _, Result};
use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use membrane_l7proxy::access::RecordKind;
use membrane_l7proxy::policy::{
    HeaderMatchSpec, HttpPolicy, HttpRuleSpec, MismatchAction, RuleRef,
};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

#[tokio::test]
async fn allowed_and_denied_on_one_keep_alive_connection() -> Result<()> {
    let upstream = start_upstream().await?;
    let proxy = start_proxy(upstream.addr, Some(sample_policy())).await?;
    let mut client = h1_client(proxy.addr).await?;

    let (status, headers, body) = send_h1(&mut client, get("/public/a?x=1")).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "ok GET /public/a?x=1");
    assert_eq!(
        headers.get("x-upstream").map(|v| v.as_bytes()),
        Some(&b"yes"[..])
    );

    let (status, headers, body) = send_h1(&mut client, get("/private")).await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body, "Access denied\r\n");
    assert_eq!(
        headers.get("content-type").map(|v| v.as_bytes()),
        Some(&b"text/plain"[..])
    );

    // Denied with a body: drained, and the same connection still works afterwards.
    let post = Request::post("/public/a")
        .header("host", "svc.test")
        .body(Full::new(Bytes::from_static(b"some body")))?;
    let (status, _, _) = send_h1(&mut client, post).await?;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let (status, _, body) = send_h1(&mut client, get("/public/b")).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "ok GET /public/b");

    assert_eq!(upstream.count(), 2, "denied requests are never forwarded");
    proxy.stop().await
}

#[tokio::test]
async fn request_and_response_bodies_stream() -> Result<()> {
    let upstream = start_upstream().await?;
    let proxy = start_proxy(upstream.addr, Some(sample_policy())).await?;
    let mut client = h1_client(proxy.addr).await?;
    let (mut body_tx, body) =
        http_body_util::channel::Channel::<Bytes, std::convert::Infallible>::new(1);
    let request = Request::post("/echo")
        .header("host", "svc.test")
        .body(body)?;
    let response = tokio::time::timeout(WAIT, async {
        client.ready().await?;
        // The response head arrives before the request body has ended…
        let send = client.send_request(request);
        body_tx.send_data(Bytes::from_static(b"first")).await?;
        anyhow::Ok(send.await?)
    })
    .await??;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    // …and each chunk comes back before the next one is written: nothing is buffered.
    for chunk in ["first", "second", "third"] {
        if chunk != "first" {
            body_tx.send_data(Bytes::from(chunk)).await?;
        }
        let frame = tokio::time::timeout(WAIT, body.frame())
            .await
            .context("echo chunk")?
            .context("body ended early")??;
        assert_eq!(frame.into_data().ok().as_deref(), Some(chunk.as_bytes()));
    }
    drop(body_tx);
    let rest = tokio::time::timeout(WAIT, body.collect())
        .await??
        .to_bytes();
    assert!(rest.is_empty());
    let seen = upstream.seen();
    assert_eq!(
        seen[0]
            .headers
            .get("transfer-encoding")
            .map(|v| v.as_bytes()),
        Some(&b"chunked"[..]),
        "a chunked request stays chunked upstream"
    );
    proxy.stop().await
}

#[tokio::test]
async fn http2_prior_knowledge() -> Result<()> {
    let upstream = start_upstream().await?;
    let proxy = start_proxy(upstream.addr, Some(sample_policy())).await?;
    let mut client = h2_client(proxy.addr).await?;
    for (path, want_status, want_body) in [
        ("/public/x", StatusCode::OK, "ok GET /public/x"),
        ("/secret", StatusCode::FORBIDDEN, "Access denied\r\n"),
        ("/public/y", StatusCode::OK, "ok GET /public/y"),
    ] {
        let request =
            Request::get(format!("http://svc.test{path}")).body(Full::new(Bytes::new()))?;
        let response = tokio::time::timeout(WAIT, client.send_request(request)).await??;
        assert_eq!(response.status(), want_status, "{path}");
        assert_eq!(response.version(), http::Version::HTTP_2);
        let body = tokio::time::timeout(WAIT, response.into_body().collect())
            .await??
            .to_bytes();
        assert_eq!(body, want_body.as_bytes(), "{path}");
    }
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    // Forwarded as HTTP/1.1 with the :authority as Host.
    assert_eq!(seen[0].version, http::Version::HTTP_11);
    assert_eq!(
        seen[0].headers.get("host").map(|v| v.as_bytes()),
        Some(&b"svc.test"[..])
    );
    proxy.stop().await
}

#[tokio::test]
async fn access_records_for_allowed_denied_and_failed_requests() -> Result<()> {
    let upstream = start_upstream().await?;
    let mut proxy = start_proxy(upstream.addr, Some(sample_policy())).await?;
    let mut client = h1_client(proxy.addr).await?;
    send_h1(&mut client, get("/public/1")).await?;
    send_h1(&mut client, get("/nope")).await?;

    let request = proxy.record().await?;
    assert_eq!(request.kind, RecordKind::Request);
    assert_eq!(request.method, "GET");
    assert_eq!(request.url, "http://svc.test/public/1");
    assert_eq!(request.rule, Some(RuleRef::Rule(0)));
    assert_eq!(request.destination, upstream.addr);
    assert_eq!(request.status, None);
    let response = proxy.record().await?;
    assert_eq!(response.kind, RecordKind::Response);
    assert_eq!(response.status, Some(200));
    assert!(response.latency.is_some());

    let denied = proxy.record().await?;
    assert_eq!(denied.kind, RecordKind::Denied);
    assert_eq!(denied.status, Some(403));
    assert_eq!(denied.rule, Some(RuleRef::DefaultDeny));
    assert_eq!(denied.url, "http://svc.test/nope");
    assert_eq!(denied.source.ip(), request.source.ip());
    let denied_response = proxy.record().await?;
    assert_eq!(denied_response.kind, RecordKind::Response);
    assert_eq!(denied_response.status, Some(403));
    assert_eq!(proxy.access.dropped(), 0);
    proxy.stop().await?;

    // Upstream gone: connection refused → 503, with records.
    let dead = {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        listener.local_addr()?
    };
    let mut proxy = start_proxy(dead, None).await?;
    let mut client = h1_client(proxy.addr).await?;
    let (status, _, body) = send_h1(&mut client, get("/anything")).await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body, "upstream connect error\r\n");
    let request = proxy.record().await?;
    assert_eq!(
        (request.kind, request.rule),
        (RecordKind::Request, Some(RuleRef::AllowAll))
    );
    let response = proxy.record().await?;
    assert_eq!(response.kind, RecordKind::Response);
    assert_eq!(response.status, Some(503));
    let error = response.error.context("failure records carry the error")?;
    assert!(error.to_lowercase().contains("refused"), "{error}");
    // The client connection survives an upstream failure.
    let (status, _, _) = send_h1(&mut client, get("/again")).await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    proxy.stop().await
}

#[tokio::test]
async fn upstream_connect_timeout_is_504() -> Result<()> {
    // A listener with a backlog of 1 that never accepts: once its queue is full the kernel
    // drops further SYNs, so the proxy's connect hangs until its own timeout. Loopback only.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>()?.into())?;
    socket.listen(0)?;
    let addr = socket.local_addr()?.as_socket().context("inet address")?;
    let mut fillers = Vec::new();
    for _ in 0..4 {
        // Bounded: each attempt either completes into the queue or times out quickly.
        if let Ok(Ok(stream)) =
            tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await
        {
            fillers.push(stream);
        }
    }
    let mut config = config(addr, None);
    config.connect_timeout = Duration::from_millis(300);
    let mut proxy = start_proxy_with(config).await?;
    let mut client = h1_client(proxy.addr).await?;
    let (status, _, body) = send_h1(&mut client, get("/slow")).await?;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(body, "upstream connect timeout\r\n");
    proxy.record().await?;
    assert_eq!(proxy.record().await?.status, Some(504));
    drop(fillers);
    proxy.stop().await
}

#[tokio::test]
async fn upstream_protocol_errors_are_502() -> Result<()> {
    // An "upstream" that answers garbage, and one that closes without answering.
    for reply in [&b"NOT HTTP AT ALL\r\n\r\n"[..], b""] {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            // Serve a bounded number of connections (the pool may retry once).
            for _ in 0..4 {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await;
                let _ = stream.write_all(reply).await;
            }
        });
        let mut proxy = start_proxy(addr, None).await?;
        let mut client = h1_client(proxy.addr).await?;
        let (status, _, body) = send_h1(&mut client, get("/x")).await?;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "reply {reply:?}");
        assert_eq!(body, "upstream protocol error or reset\r\n");
        assert_eq!(proxy.record().await?.kind, RecordKind::Request);
        let response = proxy.record().await?;
        assert_eq!(response.status, Some(502));
        assert!(response.error.is_some());
        proxy.stop().await?;
        server.abort();
    }
    Ok(())
}

#[tokio::test]
async fn websocket_upgrade_passes_through_once_allowed() -> Result<()> {
    let upstream = start_upstream().await?;
    let proxy = start_proxy(upstream.addr, Some(sample_policy())).await?;
    let mut stream = TcpStream::connect(proxy.addr).await?;
    stream
        .write_all(b"GET /ws HTTP/1.1\r\nHost: svc.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .await?;
    let head = read_until(&mut stream, "\r\n\r\n").await?;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(head.to_lowercase().contains("upgrade: websocket"), "{head}");
    // Raw bytes (not HTTP, bare LFs included) now flow both ways.
    stream.write_all(b"ping\n\n\x00").await?;
    let echoed = read_until(&mut stream, "ping\n\n\0").await?;
    assert!(echoed.ends_with("ping\n\n\0"));
    let seen = upstream.seen();
    assert_eq!(
        seen[0]
            .headers
            .get("sec-websocket-key")
            .map(|v| v.as_bytes()),
        Some(&b"dGhlIHNhbXBsZSBub25jZQ=="[..])
    );
    drop(stream);

    // A denied upgrade gets the 403 and the connection closes (never a tunnel).
    let reply = raw_exchange(
        proxy.addr,
        b"GET /chat HTTP/1.1\r\nHost: svc.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nGET /public HTTP/1.1\r\nHost: svc.test\r\n\r\n",
    )
    .await?;
    assert!(reply.starts_with("HTTP/1.1 403 "), "{reply}");
    assert!(reply.ends_with("Access denied\r\n"), "{reply}");
    assert_eq!(
        reply.matches("HTTP/1.1").count(),
        1,
        "nothing after the denied upgrade is served: {reply}"
    );
    assert_eq!(upstream.count(), 1);
    proxy.stop().await
}

#[tokio::test]
async fn h2c_upgrade_is_not_tunnelled() -> Result<()> {
    let upstream = start_upstream().await?;
    let proxy = start_proxy(upstream.addr, None).await?;
    let reply = raw_exchange(
        proxy.addr,
        b"GET /public HTTP/1.1\r\nHost: svc.test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
    )
    .await?;
    assert!(reply.starts_with("HTTP/1.1 200 "), "{reply}");
    let seen = upstream.seen();
    assert!(seen[0].headers.get("upgrade").is_none());
    assert!(seen[0].headers.get("http2-settings").is_none());
    proxy.stop().await
}

#[tokio::test]
async fn header_actions_rewrite_what_the_upstream_sees() -> Result<()> {
    let upstream = start_upstream().await?;
    let policy = HttpPolicy::compile(&[HttpRuleSpec {
        headers: vec!["X-Team: blue".into()],
        header_matches: vec![
            HeaderMatchSpec {
                name: "X-Env".into(),
                value: "prod".into(),
                mismatch: MismatchAction::Replace,
            },
            HeaderMatchSpec {
                name: "X-Debug".into(),
                value: "off".into(),
                mismatch: MismatchAction::Delete,
            },
            HeaderMatchSpec {
                name: "X-Tag".into(),
                value: "t".into(),
                mismatch: MismatchAction::Add,
            },
        ],
        ..HttpRuleSpec::default()
    }])?;
    let mut proxy = start_proxy(upstream.addr, Some(policy)).await?;
    let mut client = h1_client(proxy.addr).await?;
    let request = Request::get("/h")
        .header("host", "svc.test")
        .header("x-team", "blue")
        .header("x-env", "dev")
        .header("x-debug", "on")
        .body(Full::new(Bytes::new()))?;
    let (status, _, _) = send_h1(&mut client, request).await?;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = send_h1(&mut client, get("/h")).await?;
    assert_eq!(status, StatusCode::FORBIDDEN, "X-Team is required");
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    let h = &seen[0].headers;
    assert_eq!(h.get("x-env").map(|v| v.as_bytes()), Some(&b"prod"[..]));
    assert!(h.get("x-debug").is_none());
    assert_eq!(h.get("x-tag").map(|v| v.as_bytes()), Some(&b"t"[..]));
    proxy.record().await?;
    let response = proxy.record().await?;
    assert_eq!(response.header_log.len(), 4, "{:?}", response.header_log);
    proxy.stop().await
}

#[tokio::test]
async fn policy_file_drives_the_proxy() -> Result<()> {
    let upstream = start_upstream().await?;
    let dir = std::env::temp_dir().join(format!("membrane-l7proxy-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("cnp.yaml");
    std::fs::write(
        &path,
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: web}\nspec:\n  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: \"80\", protocol: TCP}]\n      rules:\n        http:\n        - method: GET\n          path: /allowed\n",
    )?;
    let policy = membrane_l7proxy::policy_file::load_policy_file(&path)?;
    std::fs::remove_dir_all(&dir)?;
    let proxy = start_proxy(upstream.addr, Some(policy)).await?;
    let mut client = h1_client(proxy.addr).await?;
    assert_eq!(
        send_h1(&mut client, get("/allowed")).await?.0,
        StatusCode::OK
    );
    assert_eq!(
        send_h1(&mut client, get("/allowed/not")).await?.0,
        StatusCode::FORBIDDEN
    );
    proxy.stop().await
}

#[tokio::test]
async fn idle_connections_are_closed() -> Result<()> {
    let upstream = start_upstream().await?;
    let mut config = config(upstream.addr, None);
    config.idle_timeout = Duration::from_millis(200);
    let proxy = start_proxy_with(config).await?;
    let mut stream = TcpStream::connect(proxy.addr).await?;
    stream
        .write_all(b"GET /a HTTP/1.1\r\nHost: svc.test\r\n\r\n")
        .await?;
    // The reply arrives, then the connection is closed by the proxy once idle (bounded wait).
    let reply = read_to_close(&mut stream).await?;
    assert!(reply.starts_with("HTTP/1.1 200 "), "{reply}");
    assert!(reply.ends_with("ok GET /a"), "{reply}");
    proxy.stop().await
}

/// An idle HTTP/1.1 connection is put to rest between requests (hyper's state is dropped,
/// the socket kept): later requests on it, a head split over two writes, and pipelined
/// requests are all still answered, in order, on the same connection.
#[tokio::test]
async fn kept_alive_connections_serve_requests_after_idling() -> Result<()> {
    let upstream = start_upstream().await?;
    let proxy = start_proxy(upstream.addr, Some(sample_policy())).await?;
    let mut stream = TcpStream::connect(proxy.addr).await?;
    stream
        .write_all(b"GET /public/1 HTTP/1.1\r\nHost: svc.test\r\n\r\n")
        .await?;
    read_until(&mut stream, "ok GET /public/1").await?;
    // Idle for a while, then a head that arrives in two parts.
    tokio::time::sleep(Duration::from_millis(100)).await;
    stream.write_all(b"GET /public/2 HTTP/1.1\r\nHo").await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    stream.write_all(b"st: svc.test\r\n\r\n").await?;
    read_until(&mut stream, "ok GET /public/2").await?;
    // Two pipelined requests in one write, one denied, then one more allowed.
    tokio::time::sleep(Duration::from_millis(50)).await;
    stream
        .write_all(
            b"GET /private HTTP/1.1\r\nHost: svc.test\r\n\r\nGET /public/3 HTTP/1.1\r\nHost: svc.test\r\n\r\n",
        )
        .await?;
    let replies = read_until(&mut stream, "ok GET /public/3").await?;
    let denied = replies.find("403 Forbidden").context("the 403")?;
    let allowed = replies.find("ok GET /public/3").context("the 200")?;
    assert!(denied < allowed, "answered in order: {replies}");
    assert!(!replies.contains("connection: close"), "{replies}");
    assert_eq!(upstream.count(), 3);
    proxy.stop().await
}

/// Bytes the strict reader judged to be a request body are never parsed as a request, even
/// when the upstream answers without reading that body.
#[tokio::test]
async fn an_unread_body_is_never_a_request() -> Result<()> {
    let upstream = start_upstream().await?;
    let proxy = start_proxy(upstream.addr, None).await?;
    let smuggled = b"GET /smuggled HTTP/1.1\r\nHost: svc.test\r\n\r\n";
    let mut stream = TcpStream::connect(proxy.addr).await?;
    let mut request = format!(
        "POST /not-echo HTTP/1.1\r\nHost: svc.test\r\ncontent-length: {}\r\n\r\n",
        smuggled.len()
    )
    .into_bytes();
    request.extend_from_slice(smuggled);
    stream.write_all(&request).await?;
    read_until(&mut stream, "ok POST /not-echo").await?;
    // Whether the connection stays open or not, the next request is a real one.
    tokio::time::sleep(Duration::from_millis(100)).await;
    if stream
        .write_all(b"GET /after HTTP/1.1\r\nHost: svc.test\r\n\r\n")
        .await
        .is_ok()
    {
        let _ = read_to_close_or(&mut stream, "ok GET /after").await;
    }
    assert!(
        upstream.seen().iter().all(|seen| seen.uri != "/smuggled"),
        "{:?}",
        upstream.seen()
    );
    proxy.stop().await
}

/// Reads until `needle` arrives or the connection closes (bounded).
async fn read_to_close_or(stream: &mut TcpStream, needle: &str) -> Result<String> {
    use tokio::io::AsyncReadExt as _;
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&out).contains(needle) {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test]
async fn run_returns_after_shutdown() -> Result<()> {
    let upstream = start_upstream().await?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    drop(listener);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let config = membrane_l7proxy::standalone::StandaloneConfig::new(addr, upstream.addr);
    let server = tokio::spawn(membrane_l7proxy::standalone::run(config, rx));
    // Bounded wait for the listener to come up.
    let mut client = None;
    for _ in 0..100 {
        if let Ok(c) = h1_client::<Full<Bytes>>(addr).await {
            client = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut client = client.context("proxy did not come up")?;
    assert_eq!(send_h1(&mut client, get("/a")).await?.0, StatusCode::OK);
    let _ = tx.send(());
    tokio::time::timeout(WAIT, server).await???;
    // The listener is gone.
    assert!(TcpStream::connect(addr).await.is_err());
    Ok(())
}

#[tokio::test]
async fn bind_errors_name_the_address() -> Result<()> {
    let taken = TcpListener::bind("127.0.0.1:0").await?;
    let addr = taken.local_addr()?;
    let config = membrane_l7proxy::standalone::StandaloneConfig::new(addr, addr);
    let err = membrane_l7proxy::standalone::run(config, std::future::ready(()))
        .await
        .expect_err("address in use");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
    Ok(())
}

fn curl(args: &[&str]) -> Result<(String, String)> {
    let output = std::process::Command::new("curl")
        .args([
            "--silent",
            "--show-error",
            "--max-time",
            "10",
            "--write-out",
            "\n%{http_code} %{http_version}",
        ])
        .args(args)
        .output()
        .context("running curl")?;
    anyhow::ensure!(
        output.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout)?;
    let (body, status) = text.rsplit_once('\n').context("curl output")?;
    Ok((body.to_owned(), status.to_owned()))
}

#[tokio::test]
async fn curl_sees_allowed_and_denied() -> Result<()> {
    let upstream = start_upstream().await?;
    let proxy = start_proxy(upstream.addr, Some(sample_policy())).await?;
    let base = format!("http://{}", proxy.addr);
    let allowed = format!("{base}/public/curl");
    let denied = format!("{base}/admin");
    // curl blocks; run it off the runtime's worker.
    let results = tokio::task::spawn_blocking(move || -> Result<_> {
        Ok((
            curl(&[&allowed])?,
            curl(&[&denied])?,
            curl(&["--http2-prior-knowledge", &allowed])?,
            curl(&["--http2-prior-knowledge", &denied])?,
            curl(&[
                "-X",
                "POST",
                "--data-binary",
                "hello",
                &format!("{base}/echo"),
            ])?,
        ))
    })
    .await??;
    assert_eq!(results.0, ("ok GET /public/curl".into(), "200 1.1".into()));
    assert_eq!(results.1, ("Access denied\r\n".into(), "403 1.1".into()));
    assert_eq!(results.2, ("ok GET /public/curl".into(), "200 2".into()));
    assert_eq!(results.3, ("Access denied\r\n".into(), "403 2".into()));
    assert_eq!(results.4, ("hello".into(), "200 1.1".into()));
    assert_eq!(upstream.count(), 3);
    proxy.stop().await
}

#[tokio::test]
async fn a_full_record_channel_never_blocks_traffic() -> Result<()> {
    let upstream = start_upstream().await?;
    // Room for one record, and nobody reads them.
    let proxy = start_proxy_with_capacity(config(upstream.addr, Some(sample_policy())), 1).await?;
    let mut client = h1_client(proxy.addr).await?;
    for i in 0..5 {
        let path = if i % 2 == 0 { "/public/x" } else { "/denied" };
        let (status, _, _) = send_h1(&mut client, get(path)).await?;
        assert!(status == StatusCode::OK || status == StatusCode::FORBIDDEN);
    }
    // 5 requests × 2 records each, one fits.
    assert_eq!(proxy.access.dropped(), 9);
    proxy.stop().await
}

#[tokio::test]
async fn http2_header_count_limit() -> Result<()> {
    let upstream = start_upstream().await?;
    let proxy = start_proxy(upstream.addr, None).await?;
    let mut client = h2_client(proxy.addr).await?;
    let mut request = Request::get("http://svc.test/many");
    for i in 0..101 {
        request = request.header(format!("x-h{i}"), "v");
    }
    let response = tokio::time::timeout(
        WAIT,
        client.send_request(request.body(Full::new(Bytes::new()))?),
    )
    .await??;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(upstream.count(), 0);
    proxy.stop().await
}

#[tokio::test]
async fn absolute_form_authority_is_the_host_the_upstream_sees() -> Result<()> {
    let upstream = start_upstream().await?;
    let policy = HttpPolicy::compile(&[HttpRuleSpec {
        host: Some("allowed\\.test".into()),
        ..HttpRuleSpec::default()
    }])?;
    let proxy = start_proxy(upstream.addr, Some(policy)).await?;
    // The policy judges the absolute-form authority; a different Host header must not be
    // what reaches the upstream.
    let reply = raw_exchange(
        proxy.addr,
        b"GET http://allowed.test/p HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert!(reply.starts_with("HTTP/1.1 200 "), "{reply}");
    let seen = upstream.seen();
    assert_eq!(
        seen[0].headers.get("host").map(|v| v.as_bytes()),
        Some(&b"allowed.test"[..])
    );
    assert_eq!(seen[0].uri, "/p");
    let reply = raw_exchange(
        proxy.addr,
        b"GET http://other.test/p HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert!(reply.starts_with("HTTP/1.1 403 "), "{reply}");
    assert_eq!(upstream.count(), 1);
    proxy.stop().await
}
