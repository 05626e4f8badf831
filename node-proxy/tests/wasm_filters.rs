//! Acceptance tests of Wasm filters on the proxy's request path: the standalone proxy with a
//! filter chain (`membrane_node_proxy::wasm`, what `membrane proxy --filter` runs) between
//! real hyper clients and a real upstream on 127.0.0.1. The filter is written against the
//! upstream proxy-wasm SDK from crates.io (`tests/guests/upstream-sdk`), built for
//! wasm32-wasip1 from this test, and runs unmodified.
//!
//! No timing assertions: every wait is bounded (`WAIT`) only so a broken run cannot hang.

#[path = "../../l7proxy/tests/common/mod.rs"]
mod common;
#[path = "support/guest.rs"]
mod guest;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use common::*;
use guest::guest_module;
use http::{Request, StatusCode};
use http_body_util::Full;
use membrane_filters::HostConfig;
use membrane_l7proxy::access::{AccessRecord, FilterOutcome, RecordKind};
use membrane_l7proxy::policy::{HttpPolicy, HttpRuleSpec};
use membrane_node_proxy::wasm::{FilterSource, WasmFilterError, WasmFilterSet};

/// A temporary directory for configuration files, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "membrane-wasm-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).expect("write temp file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn filter_set(config: &Path, upstreams: &[(&str, SocketAddr)]) -> Result<Arc<WasmFilterSet>> {
    let source = FilterSource {
        name: "acceptance".into(),
        module: guest_module(),
        config: Some(config.to_owned()),
        // A wall-clock deadline a busy test machine cannot hit by descheduling a callback
        // (the load tests here are about traps and reloads); `/loop` still stops at it.
        limits: membrane_filters::FilterLimits {
            callback_deadline: std::time::Duration::from_millis(300),
            ..membrane_filters::FilterLimits::default()
        },
        protocol: membrane_filters::FilterProtocol::Http,
    };
    let upstreams: HashMap<String, SocketAddr> = upstreams
        .iter()
        .map(|(n, a)| ((*n).to_owned(), *a))
        .collect();
    let set = WasmFilterSet::load(
        vec![source],
        upstreams,
        HostConfig {
            max_instances: 32,
            ..HostConfig::default()
        },
    )?;
    set.spawn_ticker()?;
    Ok(set)
}

async fn start_filtered(
    upstream: SocketAddr,
    policy: Option<HttpPolicy>,
    set: &Arc<WasmFilterSet>,
) -> Result<Proxy> {
    let mut cfg = config(upstream, policy);
    cfg.filters = Some(set.clone());
    start_proxy_with(cfg).await
}

/// The `Response` record of the next request (skipping its `Request` record).
async fn response_record(proxy: &mut Proxy) -> Result<AccessRecord> {
    loop {
        let record = proxy.record().await?;
        if record.kind == RecordKind::Response {
            return Ok(record);
        }
    }
}

fn header<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_and_configuration_of_an_upstream_sdk_filter() -> Result<()> {
    let dir = TempDir::new("headers");
    let cfg = dir.write("config", "café config 1");
    let upstream = start_upstream().await?;
    let set = filter_set(&cfg, &[])?;
    let mut proxy = start_filtered(upstream.addr, None, &set).await?;
    let mut client = h1_client(proxy.addr).await?;

    let request = Request::get("/plain")
        .header("host", "svc.test")
        .header("x-remove-me", "1")
        .header("x-replace-me", "original")
        .body(Full::new(Bytes::new()))?;
    let (status, headers, body) = send_h1(&mut client, request).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "ok GET /plain");
    assert_eq!(
        headers.get("x-config").map(|v| v.as_bytes()),
        Some("café config 1".as_bytes()),
        "the plugin configuration reaches the filter byte-exact"
    );
    let seen = upstream.seen().pop().context("upstream saw the request")?;
    assert_eq!(header(&seen.headers, "x-filter-added"), Some("1"));
    assert_eq!(header(&seen.headers, "x-replace-me"), Some("replaced"));
    assert!(!seen.headers.contains_key("x-remove-me"));
    assert_eq!(header(&seen.headers, "host"), Some("svc.test"));

    let record = response_record(&mut proxy).await?;
    assert_eq!(record.status, Some(200));
    let outcomes: Vec<_> = record
        .filters
        .iter()
        .map(|f| (f.filter.as_str(), f.phase, f.outcome.clone()))
        .collect();
    assert_eq!(
        outcomes,
        [
            (
                "acceptance",
                "request_headers",
                FilterOutcome::HeadersModified
            ),
            (
                "acceptance",
                "response_headers",
                FilterOutcome::HeadersModified
            ),
        ]
    );
    proxy.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_rewritten_in_both_directions() -> Result<()> {
    let dir = TempDir::new("bodies");
    let cfg = dir.write("config", "c");
    let upstream = start_upstream().await?;
    let set = filter_set(&cfg, &[])?;
    let mut proxy = start_filtered(upstream.addr, None, &set).await?;
    let mut client = h1_client(proxy.addr).await?;

    // Request body: buffered by the filter, upper-cased, re-framed (content-length removed).
    let request = Request::post("/upper")
        .header("host", "svc.test")
        .body(Full::new(Bytes::from_static(b"hello, body")))?;
    let (status, _, body) = send_h1(&mut client, request).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "HELLO, BODY");

    // Response body: streamed by the upstream in three chunks, buffered by the filter until
    // the end, redacted.
    let (status, headers, body) = send_h1(&mut client, get("/redact")).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "top ******|, more ******|, the end");
    assert!(
        !headers.contains_key("content-length")
            || body.len().to_string() == header(&headers, "content-length").unwrap_or_default()
    );

    // Untouched paths keep their bodies.
    let request = Request::post("/echo")
        .header("host", "svc.test")
        .body(Full::new(Bytes::from_static(b"as is")))?;
    let (_, _, body) = send_h1(&mut client, request).await?;
    assert_eq!(body, "as is");

    let mut body_modified = 0;
    for _ in 0..6 {
        let record = proxy.record().await?;
        body_modified += record
            .filters
            .iter()
            .filter(|f| f.outcome == FilterOutcome::BodyModified)
            .count();
    }
    assert!(body_modified >= 1, "records name the body rewrite");
    proxy.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_callouts_authorize_deny_and_fail() -> Result<()> {
    let dir = TempDir::new("callouts");
    let cfg = dir.write("config", "c");
    let upstream = start_upstream().await?;
    // A port nothing listens on: bind one, then drop it.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;

    let set = filter_set(&cfg, &[("authz", upstream.addr)])?;
    let mut proxy = start_filtered(upstream.addr, None, &set).await?;
    let mut client = h1_client(proxy.addr).await?;

    let allowed = Request::get("/auth/data")
        .header("host", "svc.test")
        .header("x-token", "good")
        .body(Full::new(Bytes::new()))?;
    let (status, _, body) = send_h1(&mut client, allowed).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "ok GET /auth/data");
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2, "one callout, then the request");
    assert_eq!(seen[0].uri, "/check?token=good");
    assert_eq!(header(&seen[0].headers, "x-token"), Some("good"));
    assert_eq!(header(&seen[1].headers, "x-auth"), Some("ok alice"));

    let denied = Request::get("/auth/data")
        .header("host", "svc.test")
        .header("x-token", "bad")
        .body(Full::new(Bytes::new()))?;
    let (status, headers, body) = send_h1(&mut client, denied).await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body, "denied by authz\n");
    assert_eq!(header(&headers, "x-denied-by"), Some("authz"));
    assert_eq!(
        upstream.count(),
        3,
        "the denied request never reached the upstream"
    );
    // The callouts' outcomes are in the records (flows show them as x-membrane-filter).
    let mut callouts = Vec::new();
    while let Ok(record) = proxy.records.try_recv() {
        callouts.extend(
            record
                .filters
                .into_iter()
                .filter(|f| matches!(f.outcome, FilterOutcome::Callout { .. }))
                .map(|f| (f.phase, f.outcome)),
        );
    }
    let callout = |status| {
        (
            "request_headers",
            FilterOutcome::Callout {
                upstream: "authz".into(),
                status,
            },
        )
    };
    assert!(callouts.contains(&callout(Some(200))), "{callouts:?}");
    assert!(callouts.contains(&callout(Some(401))), "{callouts:?}");
    proxy.stop().await?;

    // The authorization service is down: the filter sees a failed call (0 headers) and
    // answers 503 itself.
    let set = filter_set(&cfg, &[("authz", closed)])?;
    let mut proxy = start_filtered(upstream.addr, None, &set).await?;
    let mut client = h1_client(proxy.addr).await?;
    let request = Request::get("/auth/x")
        .header("host", "svc.test")
        .header("x-token", "good")
        .body(Full::new(Bytes::new()))?;
    let (status, _, body) = send_h1(&mut client, request).await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body, "authz unavailable\n");
    let record = response_record(&mut proxy).await?;
    assert!(
        record
            .filters
            .iter()
            .any(|f| f.outcome == FilterOutcome::LocalReply { status: 503 }),
        "{record}"
    );

    // An upstream name the proxy was not given: the SDK sees BAD_ARGUMENT.
    let set = filter_set(&cfg, &[])?;
    let proxy2 = start_filtered(upstream.addr, None, &set).await?;
    let mut client = h1_client(proxy2.addr).await?;
    let (status, _, body) = send_h1(&mut client, get("/auth/x")).await?;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(body, "callout refused\n");
    proxy2.stop().await?;
    proxy.stop().await
}

/// Callouts from other phases than request headers (Envoy allows them from every callback):
/// from the request body phase (the filter buffers the whole body and asks with it; the proxy
/// holds the body until the answer), from the response headers phase, and made in a phase
/// that goes on (never sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callouts_from_body_and_response_phases() -> Result<()> {
    let dir = TempDir::new("body-callouts");
    let cfg = dir.write("config", "c");
    let upstream = start_upstream().await?;
    let set = filter_set(&cfg, &[("authz", upstream.addr)])?;
    let mut proxy = start_filtered(upstream.addr, None, &set).await?;
    let mut client = h1_client(proxy.addr).await?;

    let post = |body: &'static str| {
        Request::post("/body-auth")
            .header("host", "svc.test")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
    };
    let (status, _, body) = send_h1(&mut client, post("good")?).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "good", "the held body reached the upstream whole");
    // The head went upstream first (as in Envoy), the callout when the body had ended.
    let mut seen: Vec<(String, String)> = upstream
        .seen()
        .into_iter()
        .map(|s| (s.method, s.uri))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("POST".to_owned(), "/body-auth".to_owned()),
            ("POST".to_owned(), "/check?token=good".to_owned())
        ]
    );
    let record = response_record(&mut proxy).await?;
    assert!(
        record.filters.iter().any(|f| f.phase == "request_body"
            && f.outcome
                == FilterOutcome::Callout {
                    upstream: "authz".into(),
                    status: Some(200)
                }),
        "{record}"
    );

    let (status, headers, body) = send_h1(&mut client, post("bad")?).await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body, "denied by authz\n");
    assert_eq!(header(&headers, "x-denied-by"), Some("authz"));

    // From the response headers phase: the answer decides whether the upstream's response
    // goes on.
    let resp = |token: &'static str| {
        Request::get("/resp-auth")
            .header("host", "svc.test")
            .header("x-token", token)
            .body(Full::new(Bytes::new()))
    };
    // (A local reply before the request body was read closes its connection: a new one.)
    let mut client = h1_client(proxy.addr).await?;
    let (status, headers, body) = send_h1(&mut client, resp("good")?).await?;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "ok GET /resp-auth")
    );
    assert_eq!(header(&headers, "x-auth"), Some("ok"));
    let (status, _, body) = send_h1(&mut client, resp("bad")?).await?;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::FORBIDDEN, "denied by authz\n")
    );

    // A callout made in a phase that goes on is never sent (documented: only a paused phase
    // waits for callouts); the filter is told it failed when the stream ends.
    let before = upstream.count();
    let mut client = h1_client(proxy.addr).await?;
    let (status, _, body) = send_h1(&mut client, get("/fire")).await?;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok GET /fire"));
    assert_eq!(upstream.count(), before + 1, "only the request itself");
    // As in Envoy, the head went upstream before the body phase ran; the body never
    // completed there, and the client got the filter's answer, not the upstream's echo.
    proxy.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_tick_while_the_proxy_runs() -> Result<()> {
    let dir = TempDir::new("ticks");
    let cfg = dir.write("config", "c");
    let upstream = start_upstream().await?;
    let set = filter_set(&cfg, &[])?;
    let proxy = start_filtered(upstream.addr, None, &set).await?;
    let mut client = h1_client(proxy.addr).await?;
    let mut ticks = 0u64;
    // Bounded: at 10 ms per tick this needs a few rounds; 500 rounds only stop a broken run.
    for _ in 0..500 {
        let (status, _, body) = send_h1(&mut client, get("/ticks")).await?;
        assert_eq!(status, StatusCode::OK);
        ticks = body.trim().parse()?;
        if ticks >= 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(ticks >= 3, "on_tick ran {ticks} times");
    assert_eq!(
        upstream.count(),
        0,
        "the filter answered every /ticks itself"
    );
    proxy.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_runs_before_filters() -> Result<()> {
    let dir = TempDir::new("policy");
    let cfg = dir.write("config", "c");
    let upstream = start_upstream().await?;
    let set = filter_set(&cfg, &[])?;
    let policy = HttpPolicy::compile(&[HttpRuleSpec {
        path: Some("/public.*".into()),
        ..HttpRuleSpec::default()
    }])?;
    let mut proxy = start_filtered(upstream.addr, Some(policy), &set).await?;
    let mut client = h1_client(proxy.addr).await?;
    // /ticks would be answered 200 by the filter: the policy's 403 comes first.
    let (status, headers, body) = send_h1(&mut client, get("/ticks")).await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body, "Access denied\r\n");
    assert!(!headers.contains_key("x-config"), "no filter saw it");
    let denied = proxy.record().await?;
    assert_eq!(denied.kind, RecordKind::Denied);
    assert!(denied.filters.is_empty());
    let (status, headers, _) = send_h1(&mut client, get("/public")).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(header(&headers, "x-config"), Some("c"));
    proxy.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_loop_and_a_memory_bomb_are_stopped() -> Result<()> {
    let dir = TempDir::new("limits");
    let cfg = dir.write("config", "c");
    let upstream = start_upstream().await?;
    let set = filter_set(&cfg, &[])?;
    let mut proxy = start_filtered(upstream.addr, None, &set).await?;
    let mut client = h1_client(proxy.addr).await?;

    for (path, reason) in [
        ("/loop", "exceeded its deadline"),
        ("/bomb", "memory limit"),
    ] {
        let (status, _, _) = send_h1(&mut client, get(path)).await?;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{path}");
        let record = response_record(&mut proxy).await?;
        let failed = record
            .filters
            .iter()
            .find_map(|f| match &f.outcome {
                FilterOutcome::Failed { reason, action } => Some((reason.clone(), action.clone())),
                _ => None,
            })
            .with_context(|| format!("{path}: no failure in {record}"))?;
        assert!(failed.0.contains(reason), "{path}: {failed:?}");
        assert_eq!(failed.1, "rejected 503");
        // The filter recovers: the next request gets a fresh instance.
        let (status, headers, _) = send_h1(&mut client, get("/after")).await?;
        assert_eq!(status, StatusCode::OK, "after {path}");
        assert_eq!(header(&headers, "x-config"), Some("c"));
        let _ = response_record(&mut proxy).await?;
    }
    assert_eq!(
        upstream.count(),
        2,
        "only the two healthy requests were forwarded"
    );
    proxy.stop().await
}

/// Sends `n` requests for `path` on one connection; returns the statuses.
async fn request_loop(addr: SocketAddr, path: &'static str, n: usize) -> Result<Vec<StatusCode>> {
    let mut client = h1_client(addr).await?;
    let mut statuses = Vec::with_capacity(n);
    for _ in 0..n {
        let (status, _, _) = send_h1(&mut client, get(path)).await?;
        statuses.push(status);
    }
    Ok(statuses)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_under_load_fails_only_its_instance_streams_and_recovers() -> Result<()> {
    let dir = TempDir::new("trap");
    let cfg = dir.write("config", "c");
    let upstream = start_upstream().await?;
    let set = filter_set(&cfg, &[])?;
    let mut proxy = start_filtered(upstream.addr, None, &set).await?;
    proxy.records.close();

    let load: Vec<_> = (0..4)
        .map(|_| tokio::spawn(request_loop(proxy.addr, "/load", 40)))
        .collect();
    let mut client = h1_client(proxy.addr).await?;
    for _ in 0..3 {
        let (status, _, _) = send_h1(&mut client, get("/trap")).await?;
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "fail-closed answers 503"
        );
    }
    let mut ok = 0;
    let mut failed = 0;
    for task in load {
        for status in task.await?? {
            match status {
                StatusCode::OK => ok += 1,
                // A stream that shared the trapping instance fails closed, as its policy says.
                StatusCode::SERVICE_UNAVAILABLE => failed += 1,
                other => panic!("unexpected status {other} under load"),
            }
        }
    }
    assert_eq!(ok + failed, 160, "every request got an answer");
    assert!(
        failed < 160 && ok > 0,
        "streams on other instances kept working ({ok} ok, {failed} failed)"
    );
    // Recovered: later requests all pass.
    let statuses = request_loop(proxy.addr, "/after", 20).await?;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    proxy.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_under_load_drops_no_request() -> Result<()> {
    let dir = TempDir::new("reload");
    let cfg = dir.write("config", "generation-1");
    let upstream = start_upstream().await?;
    let set = filter_set(&cfg, &[])?;
    let mut proxy = start_filtered(upstream.addr, None, &set).await?;
    proxy.records.close();

    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            let addr = proxy.addr;
            tokio::spawn(async move {
                let mut client = h1_client(addr).await?;
                let mut seen = Vec::new();
                // Bounded by the reloads below, and by a request count cap.
                for _ in 0..20_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let (status, headers, body) = send_h1(&mut client, get("/load")).await?;
                    if status != StatusCode::OK {
                        // Keep what the failure said (which filter, why) for the assertion.
                        seen.push((status, body));
                        continue;
                    }
                    seen.push((
                        status,
                        header(&headers, "x-config").unwrap_or_default().to_owned(),
                    ));
                }
                anyhow::Ok(seen)
            })
        })
        .collect();

    for generation in 2..=4 {
        dir.write("config", &format!("generation-{generation}"));
        let s = set.clone();
        tokio::task::spawn_blocking(move || s.reload()).await??;
    }
    // A configuration the filter rejects: the reload fails, naming the filter; the last good
    // chain keeps serving.
    dir.write("config", "reject");
    let s = set.clone();
    let error = tokio::task::spawn_blocking(move || s.reload())
        .await?
        .expect_err("a rejected configuration must fail the reload");
    assert!(matches!(error, WasmFilterError::Load { .. }), "{error}");
    assert!(error.to_string().contains("acceptance"), "{error}");
    assert!(
        error.to_string().contains("configuration rejected"),
        "{error}"
    );
    stop.store(true, Ordering::Relaxed);

    let mut configs = std::collections::BTreeSet::new();
    let mut total = 0;
    for task in load {
        for (status, config) in task.await?? {
            assert_eq!(
                status,
                StatusCode::OK,
                "no request fails during reloads: {config}"
            );
            configs.insert(config);
            total += 1;
        }
    }
    assert!(total > 0);
    assert!(
        configs.iter().all(|c| c.starts_with("generation-")),
        "{configs:?}"
    );
    let (_, headers, _) = send_h1(&mut h1_client(proxy.addr).await?, get("/x")).await?;
    assert_eq!(
        header(&headers, "x-config"),
        Some("generation-4"),
        "the last good generation serves"
    );
    proxy.stop().await
}

#[test]
fn bad_modules_and_arguments_are_named() {
    let dir = TempDir::new("bad");
    let not_wasm = dir.write("broken.wasm", "this is not wasm");
    let err = |sources: Vec<FilterSource>| {
        WasmFilterSet::load(sources, HashMap::new(), HostConfig::default())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let missing = err(vec![
        FilterSource::parse("/nonexistent/f.wasm").expect("parse"),
    ]);
    assert!(missing.contains("/nonexistent/f.wasm"), "{missing}");
    assert!(missing.contains("cannot read module"), "{missing}");
    let broken = err(vec![
        FilterSource::parse(not_wasm.to_str().expect("utf-8")).expect("parse"),
    ]);
    assert!(broken.contains("filter broken"), "{broken}");
    assert!(broken.contains("not valid WebAssembly"), "{broken}");
    let no_config = err(vec![
        FilterSource::parse(&format!("{}=/nonexistent/cfg", guest_module().display()))
            .expect("parse"),
    ]);
    assert!(
        no_config.contains("cannot read configuration /nonexistent/cfg"),
        "{no_config}"
    );
}
