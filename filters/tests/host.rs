//! End-to-end tests of the filter host with real guest modules: the example filters and the
//! test-only `chaos` filter are built for wasm32-wasip1 from this test (see `common`), loaded
//! into a `FilterHost` and driven through `FilterChain` as the proxy would.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use common::guest;
use membrane_filters::{
    Action, DecisionKind, FailureOutcome, FailurePolicy, FilterChain, FilterError, FilterHost,
    FilterLimits, FilterLog, FilterSpec, Headers, HostConfig, LogLevel, MetricKind, PeerInfo,
    StreamInfo,
};

fn host() -> FilterHost {
    FilterHost::new(HostConfig {
        max_instances: 16,
        ..HostConfig::default()
    })
    .expect("filter host")
}

/// A host whose filter logs are collected for assertions.
fn host_with_logs() -> (FilterHost, Arc<Mutex<Vec<FilterLog>>>) {
    let logs = Arc::new(Mutex::new(Vec::new()));
    let sink = logs.clone();
    let host = FilterHost::new(HostConfig {
        max_instances: 16,
        log_sink: Some(Arc::new(move |l: &FilterLog| {
            sink.lock().unwrap().push(l.clone())
        })),
        ..HostConfig::default()
    })
    .expect("filter host");
    (host, logs)
}

fn get(path: &str) -> Headers {
    Headers::request("GET", path, "example.test", [("user-agent", "test")])
}

fn ok_response() -> Headers {
    Headers::response(200, [("content-type", "text/plain")])
}

fn chaos(policy: FailurePolicy) -> FilterSpec {
    FilterSpec::new("chaos", guest("chaos-filter"))
        .with_config("cfg-1")
        .with_failure_policy(policy)
}

/// Runs request headers + response headers + finish; returns the request action and the
/// stream's final headers.
fn run_request(chain: &FilterChain, path: &str) -> (Action, Headers, Headers) {
    let mut stream = chain.start_stream(StreamInfo::default());
    let action = stream.on_request_headers(get(path), true);
    if action != Action::Continue {
        return (action, stream.request_headers().clone(), Headers::new());
    }
    let response_action = stream.on_response_headers(ok_response(), true);
    assert_eq!(response_action, Action::Continue);
    (
        action,
        stream.request_headers().clone(),
        stream.response_headers().clone(),
    )
}

#[test]
fn add_header_adds_the_configured_response_headers() -> Result<()> {
    let host = host();
    let filter = host.load(
        FilterSpec::new("add-header", guest("add-header"))
            .with_config("x-powered-by: membrane\ncache-control: no-store\n"),
    )?;
    let chain = FilterChain::new(vec![filter]);
    let mut stream = chain.start_stream(StreamInfo::default());
    assert_eq!(stream.on_request_headers(get("/"), true), Action::Continue);
    assert_eq!(
        stream.on_response_headers(ok_response(), false),
        Action::Continue
    );
    let mut body = b"payload".to_vec();
    assert_eq!(stream.on_response_body(&mut body, true), Action::Continue);
    assert_eq!(body, b"payload");
    let response = stream.response_headers();
    assert_eq!(response.get_str("x-powered-by"), Some("membrane"));
    assert_eq!(response.get_str("cache-control"), Some("no-store"));
    assert_eq!(response.get_str(":status"), Some("200"));
    let decisions = stream.finish();
    assert!(
        decisions
            .iter()
            .any(|d| d.kind == DecisionKind::HeadersModified)
    );
    Ok(())
}

#[test]
fn a_configuration_the_filter_rejects_fails_the_load() {
    let host = host();
    let err = host
        .load(FilterSpec::new("add-header", guest("add-header")).with_config("no colon here"))
        .err()
        .expect("rejected");
    assert!(
        matches!(&err, FilterError::Rejected { filter, stage: "configure", .. } if filter == "add-header"),
        "{err}"
    );
}

#[test]
fn deny_path_replies_403_with_a_body_and_the_reply_runs_the_response_path() -> Result<()> {
    let host = host();
    let add = host.load(
        FilterSpec::new("add-header", guest("add-header")).with_config("x-seen-by: add-header"),
    )?;
    let deny =
        host.load(FilterSpec::new("deny-path", guest("deny-path")).with_config("/admin\n"))?;
    // add-header first: the local reply from deny-path travels back through it.
    let chain = FilterChain::new(vec![add, deny]);

    let mut stream = chain.start_stream(StreamInfo::default());
    let Action::LocalReply(reply) = stream.on_request_headers(get("/admin/users"), true) else {
        panic!("expected a local reply");
    };
    assert_eq!(reply.status, 403);
    assert_eq!(reply.body, b"Access to /admin/users is denied by policy\n");
    assert_eq!(reply.headers.get_str("content-type"), Some("text/plain"));
    assert_eq!(reply.headers.get_str("content-length"), Some("43"));
    assert_eq!(reply.headers.get_str("x-seen-by"), Some("add-header"));
    assert_eq!(reply.details, "deny_path");
    assert_eq!(&*reply.filter, "deny-path");
    let decisions = stream.finish();
    assert!(
        decisions.iter().any(
            |d| &*d.filter == "deny-path" && d.kind == DecisionKind::LocalReply { status: 403 }
        )
    );

    let (action, _, response) = run_request(&chain, "/public");
    assert_eq!(action, Action::Continue);
    assert_eq!(response.get_str("x-seen-by"), Some("add-header"));
    Ok(())
}

fn stream_from(identity: Option<u64>) -> StreamInfo {
    StreamInfo {
        source: PeerInfo {
            identity,
            ..PeerInfo::default()
        },
        ..StreamInfo::default()
    }
}

#[test]
fn identity_gate_admits_only_configured_source_identities() -> Result<()> {
    let host = host();
    let gate = host.load(
        FilterSpec::new("identity-gate", guest("identity-gate")).with_config("1234, 70000\n"),
    )?;
    let chain = FilterChain::new(vec![gate]);
    for (identity, allowed) in [
        (Some(1234), true),
        (Some(70000), true),
        (Some(1235), false),
        (None, false),
    ] {
        let mut stream = chain.start_stream(stream_from(identity));
        let action = stream.on_request_headers(get("/"), true);
        if allowed {
            assert_eq!(action, Action::Continue, "identity {identity:?}");
        } else {
            let Action::LocalReply(reply) = action else {
                panic!("identity {identity:?} should be denied, got {action:?}");
            };
            assert_eq!(reply.status, 403);
            let who = identity.map_or("unknown".to_owned(), |i| i.to_string());
            assert_eq!(
                String::from_utf8_lossy(&reply.body),
                format!("identity {who} is not allowed\n")
            );
        }
    }
    Ok(())
}

#[test]
fn properties_expose_identity_labels_addresses_and_request_attributes() -> Result<()> {
    let host = host();
    let filter = host.load(chaos(FailurePolicy::default()))?;
    let chain = FilterChain::new(vec![filter]);
    let source: SocketAddr = "10.200.0.10:40123".parse()?;
    let info = StreamInfo {
        source: PeerInfo {
            address: Some(source),
            identity: Some(0x0102_0304_0506),
            labels: vec![
                ("app".into(), "frontend".into()),
                ("k8s:io.kubernetes.pod.namespace".into(), "shop".into()),
            ],
            namespace: Some("shop".into()),
            workload: Some("frontend".into()),
            principal: None,
        },
        destination: PeerInfo {
            identity: Some(9),
            ..PeerInfo::default()
        },
        protocol: Some("HTTP/1.1".into()),
        connection_id: Some(7),
    };
    let mut stream = chain.start_stream(info);
    assert_eq!(
        stream.on_request_headers(get("/props"), true),
        Action::Continue
    );
    let h = stream.request_headers();
    assert_eq!(
        h.get_str("x-source-identity"),
        Some(&*0x0102_0304_0506u64.to_string())
    );
    assert_eq!(h.get_str("x-destination-identity"), Some("9"));
    assert_eq!(
        h.get_str("x-source-labels"),
        Some("app=frontend,k8s:io.kubernetes.pod.namespace=shop")
    );
    assert_eq!(h.get_str("x-source-address"), Some("10.200.0.10:40123"));
    assert_eq!(h.get_str("x-source-workload"), Some("shop/frontend"));
    assert_eq!(h.get_str("x-request-method"), Some("GET"));
    assert_eq!(h.get_str("x-plugin-name"), Some("chaos"));
    Ok(())
}

#[test]
fn plugin_configuration_reaches_the_filter() -> Result<()> {
    let host = host();
    let filter = host.load(chaos(FailurePolicy::default()).with_config("héllo wörld"))?;
    let chain = FilterChain::new(vec![filter]);
    let (_, _, response) = run_request(&chain, "/noop");
    assert_eq!(response.get_str("x-chaos-config"), Some("héllo wörld"));
    Ok(())
}

const MINIMAL_FILTER_BODY: &str = r#"
    (memory (export "memory") 1)
    (func (export "proxy_on_memory_allocate") (param i32) (result i32) i32.const 1024)
    (func (export "proxy_on_context_create") (param i32 i32))
    (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) i32.const 0)
"#;

#[test]
fn abi_versions_other_than_0_2_x_are_rejected_with_the_module_named() -> Result<()> {
    let host = host();
    for (marker, accepted) in [
        ("proxy_abi_version_0_2_1", true),
        ("proxy_abi_version_0_2_0", true),
        ("proxy_abi_version_0_1_0", false),
        ("proxy_abi_version_9_9_9", false),
        ("", false),
    ] {
        let export = if marker.is_empty() {
            String::new()
        } else {
            format!(r#"(func (export "{marker}"))"#)
        };
        let wasm = wat::parse_str(format!(
            r#"(module
                (import "env" "proxy_log" (func (param i32 i32 i32) (result i32)))
                {export} {MINIMAL_FILTER_BODY})"#
        ))?;
        let result = host.load(FilterSpec::new("wat-abi", wasm));
        if accepted {
            let filter = result.map_err(|e| anyhow::anyhow!("{marker}: {e}"))?;
            let chain = FilterChain::new(vec![filter]);
            let mut stream = chain.start_stream(StreamInfo::default());
            assert_eq!(stream.on_request_headers(get("/"), true), Action::Continue);
        } else {
            let err = result.err().expect("rejected");
            let text = err.to_string();
            assert!(matches!(err, FilterError::AbiVersion { .. }), "{text}");
            assert!(text.contains("filter wat-abi"), "{text}");
            assert!(text.contains("module "), "{text}");
            if !marker.is_empty() {
                assert!(text.contains(marker), "{text}");
            }
        }
    }
    // A module importing a function the host does not have is refused at load, naming it.
    let wasm = wat::parse_str(format!(
        r#"(module (import "env" "proxy_no_such_call" (func))
            (func (export "proxy_abi_version_0_2_1")) {MINIMAL_FILTER_BODY})"#
    ))?;
    let err = host
        .load(FilterSpec::new("wat-link", wasm))
        .err()
        .expect("refused");
    assert!(
        matches!(&err, FilterError::Unsupported { reason, .. } if reason.contains("env::proxy_no_such_call")),
        "{err}"
    );
    Ok(())
}

#[test]
fn bad_guest_pointers_get_statuses_never_host_panics() -> Result<()> {
    // Each call passes an out-of-bounds pointer and traps (unreachable) unless the host
    // answers INVALID_MEMORY_ACCESS (6); WASI answers FAULT (21).
    let wasm = wat::parse_str(
        r#"(module
            (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
            (import "env" "proxy_get_header_map_value"
                (func $get (param i32 i32 i32 i32 i32) (result i32)))
            (import "env" "proxy_set_header_map_pairs" (func $set (param i32 i32 i32) (result i32)))
            (import "env" "proxy_get_property" (func $prop (param i32 i32 i32 i32) (result i32)))
            (import "wasi_snapshot_preview1" "fd_write"
                (func $fd_write (param i32 i32 i32 i32) (result i32)))
            (func (export "proxy_abi_version_0_2_1"))
            (memory (export "memory") 1)
            (data (i32.const 16) ":path")
            (func (export "proxy_on_memory_allocate") (param i32) (result i32) i32.const 1024)
            (func (export "proxy_on_context_create") (param i32 i32))
            (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
                (if (i32.ne (call $log (i32.const 2) (i32.const 0xfffffff0) (i32.const 100)) (i32.const 6))
                    (then unreachable))
                (if (i32.ne (call $log (i32.const 2) (i32.const 65530) (i32.const 100)) (i32.const 6))
                    (then unreachable))
                ;; valid key, return pointers out of bounds
                (if (i32.ne (call $get (i32.const 0) (i32.const 16) (i32.const 5)
                                (i32.const 70000) (i32.const 70004)) (i32.const 6))
                    (then unreachable))
                ;; a map whose header claims 0x7fffffff pairs
                (i32.store (i32.const 200) (i32.const 0x7fffffff))
                (if (i32.ne (call $set (i32.const 0) (i32.const 200) (i32.const 12)) (i32.const 2))
                    (then unreachable))
                (if (i32.ne (call $prop (i32.const 0xffffff00) (i32.const 0x200)
                                (i32.const 300) (i32.const 304)) (i32.const 6))
                    (then unreachable))
                (if (i32.ne (call $fd_write (i32.const 1) (i32.const 0xfffffff0) (i32.const 4)
                                (i32.const 400)) (i32.const 21))
                    (then unreachable))
                i32.const 0)
            )"#,
    )?;
    let host = host();
    let filter = host.load(FilterSpec::new("wat-pointers", wasm))?;
    let chain = FilterChain::new(vec![filter]);
    let mut stream = chain.start_stream(StreamInfo::default());
    assert_eq!(stream.on_request_headers(get("/"), true), Action::Continue);
    assert!(stream.finish().is_empty());
    Ok(())
}

#[test]
fn a_trap_fails_only_its_own_stream_and_is_logged_symbolized() -> Result<()> {
    let (host, logs) = host_with_logs();
    let filter = host.load(FilterSpec {
        instances: 2,
        ..chaos(FailurePolicy::FailClosed { status: 503 })
    })?;
    let chain = FilterChain::new(vec![filter.clone()]);

    // A stream on the other instance, in flight while the trap happens.
    let mut bystander = chain.start_stream(StreamInfo::default());
    assert_eq!(
        bystander.on_request_headers(get("/noop"), true),
        Action::Continue
    );

    let mut victim = chain.start_stream(StreamInfo::default());
    let Action::LocalReply(reply) = victim.on_request_headers(get("/trap"), true) else {
        panic!("trap must fail closed");
    };
    assert_eq!(reply.status, 503);
    assert_eq!(reply.details, "wasm_fail_stream");
    let decisions = victim.finish();
    assert!(decisions.iter().any(|d| matches!(
        &d.kind,
        DecisionKind::Failed { outcome: FailureOutcome::Rejected { status: 503 }, reason }
            if reason.contains("unreachable")
    )));

    // The bystander keeps running on its own instance.
    assert_eq!(
        bystander.on_response_headers(ok_response(), true),
        Action::Continue
    );
    assert_eq!(
        bystander.response_headers().get_str("x-chaos-config"),
        Some("cfg-1")
    );
    drop(bystander);

    // The next streams work (a fresh instance replaces the failed one).
    for _ in 0..3 {
        let (action, _, response) = run_request(&chain, "/noop");
        assert_eq!(action, Action::Continue);
        assert_eq!(response.get_str("x-chaos-config"), Some("cfg-1"));
    }
    assert_eq!(filter.live_instances(), 2);

    let logs = logs.lock().unwrap();
    let report = logs
        .iter()
        .find(|l| l.level == LogLevel::Error && l.message.contains("failed in context"))
        .expect("a trap report");
    assert_eq!(&*report.filter, "chaos");
    assert_ne!(report.context_id, 0);
    // Symbolized: the backtrace names guest functions.
    assert!(
        report.message.contains("proxy_on_request_headers"),
        "{}",
        report.message
    );
    // The SDK's panic hook logged the panic message first, at CRITICAL.
    assert!(
        logs.iter()
            .any(|l| l.level == LogLevel::Critical && l.message.contains("chaos: trap requested"))
    );
    Ok(())
}

#[test]
fn fail_open_skips_the_failed_filter_for_that_stream() -> Result<()> {
    let host = host();
    let filter = host.load(chaos(FailurePolicy::FailOpen))?;
    let chain = FilterChain::new(vec![filter]);
    let mut stream = chain.start_stream(StreamInfo::default());
    assert_eq!(
        stream.on_request_headers(get("/trap"), true),
        Action::Continue
    );
    assert_eq!(
        stream.on_response_headers(ok_response(), true),
        Action::Continue
    );
    // The filter was bypassed: no header from it.
    assert_eq!(stream.response_headers().get_str("x-chaos-config"), None);
    let decisions = stream.finish();
    assert!(decisions.iter().any(|d| matches!(
        d.kind,
        DecisionKind::Failed {
            outcome: FailureOutcome::Bypassed,
            ..
        }
    )));
    let (_, _, response) = run_request(&chain, "/noop");
    assert_eq!(response.get_str("x-chaos-config"), Some("cfg-1"));
    Ok(())
}

#[test]
fn reload_policy_backs_off_before_booting_a_replacement() -> Result<()> {
    let host = host();
    let filter = host.load(FilterSpec {
        instances: 1,
        ..chaos(FailurePolicy::Reload {
            status: 502,
            backoff_base: Duration::from_millis(300),
            backoff_max: Duration::from_secs(5),
        })
    })?;
    let chain = FilterChain::new(vec![filter]);
    let (action, _, _) = run_request(&chain, "/trap");
    assert!(matches!(action, Action::LocalReply(ref r) if r.status == 502));
    // Within the backoff there is no instance: new streams get the policy's status.
    let start = Instant::now();
    let mut stream = chain.start_stream(StreamInfo::default());
    let action = stream.on_request_headers(get("/noop"), true);
    if start.elapsed() < Duration::from_millis(300) {
        assert!(
            matches!(action, Action::LocalReply(ref r) if r.status == 502),
            "{action:?}"
        );
        assert!(stream.decisions().iter().any(|d| matches!(
            &d.kind, DecisionKind::Failed { reason, .. } if reason.contains("backing off"))));
    }
    drop(stream);
    std::thread::sleep(Duration::from_millis(350));
    let (action, _, _) = run_request(&chain, "/noop");
    assert_eq!(action, Action::Continue);
    Ok(())
}

#[test]
fn an_infinite_loop_is_interrupted_by_the_epoch_deadline() -> Result<()> {
    let host = host();
    let filter = host.load(
        chaos(FailurePolicy::FailClosed { status: 504 }).with_limits(FilterLimits {
            callback_deadline: Duration::from_millis(20),
            ..FilterLimits::default()
        }),
    )?;
    let chain = FilterChain::new(vec![filter]);
    let mut stream = chain.start_stream(StreamInfo::default());
    let Action::LocalReply(reply) = stream.on_request_headers(get("/loop"), true) else {
        panic!("the loop must be interrupted");
    };
    assert_eq!(reply.status, 504);
    assert!(stream.decisions().iter().any(|d| matches!(
        &d.kind, DecisionKind::Failed { reason, .. } if reason.contains("deadline"))));
    drop(stream);
    let (action, _, _) = run_request(&chain, "/noop");
    assert_eq!(action, Action::Continue);
    Ok(())
}

#[test]
fn the_memory_cap_stops_a_growing_filter() -> Result<()> {
    let host = host();
    let filter = host.load(chaos(FailurePolicy::default()).with_limits(FilterLimits {
        memory_limit: 16 << 20,
        ..FilterLimits::default()
    }))?;
    let chain = FilterChain::new(vec![filter]);
    let mut stream = chain.start_stream(StreamInfo::default());
    let Action::LocalReply(reply) = stream.on_request_headers(get("/oom"), true) else {
        panic!("allocation beyond the cap must fail the stream");
    };
    assert_eq!(reply.status, 503);
    assert!(
        stream.decisions().iter().any(|d| matches!(
            &d.kind, DecisionKind::Failed { reason, .. } if reason.contains("memory limit of 16777216 bytes"))),
        "{:?}",
        stream.decisions()
    );
    drop(stream);
    let (action, _, _) = run_request(&chain, "/noop");
    assert_eq!(action, Action::Continue);
    // A cap above the host's pool maximum is refused up front.
    let err = host
        .load(chaos(FailurePolicy::default()).with_limits(FilterLimits {
            memory_limit: 1 << 40,
            ..FilterLimits::default()
        }))
        .err()
        .expect("refused");
    assert!(
        matches!(
            err,
            FilterError::Setting {
                field: "limits.memory_limit",
                ..
            }
        ),
        "{err}"
    );
    Ok(())
}

#[test]
fn hot_reload_swaps_on_success_and_keeps_the_last_good_on_failure() -> Result<()> {
    let host = host();
    let spec = FilterSpec::new("hdr", guest("add-header")).with_config("x-version: one");
    let filter = host.load(spec.clone())?;
    let chain = FilterChain::new(vec![filter.clone()]);
    let original_sha = filter.sha256();

    // In flight across the reload: finishes on the old generation.
    let mut in_flight = chain.start_stream(StreamInfo::default());
    assert_eq!(
        in_flight.on_request_headers(get("/"), true),
        Action::Continue
    );

    let changed = filter.reload(spec.clone().with_config("x-version: two"))?;
    assert!(!changed, "same module, new configuration");
    assert_eq!(host.compiled_modules(), 1, "module compiled once");

    in_flight.on_response_headers(ok_response(), true);
    assert_eq!(
        in_flight.response_headers().get_str("x-version"),
        Some("one")
    );
    drop(in_flight);
    let (_, _, response) = run_request(&chain, "/");
    assert_eq!(response.get_str("x-version"), Some("two"));

    // Broken module: compile error, old generation keeps serving.
    let err = filter
        .reload(FilterSpec::new("hdr", b"\0asm garbage".to_vec()).with_config("x-version: three"))
        .expect_err("broken module refused");
    assert!(matches!(err, FilterError::Compile { .. }), "{err}");
    // Valid module, configuration rejected by the module: old generation keeps serving.
    let err = filter
        .reload(spec.clone().with_config("not a header line"))
        .expect_err("rejected configuration");
    assert!(matches!(err, FilterError::Rejected { .. }), "{err}");
    assert_eq!(filter.sha256(), original_sha);
    let (_, _, response) = run_request(&chain, "/");
    assert_eq!(response.get_str("x-version"), Some("two"));

    // A different module: swapped, sha256 follows.
    let changed = filter.reload(FilterSpec::new("hdr", guest("chaos-filter")).with_config("c"))?;
    assert!(changed);
    assert_ne!(filter.sha256(), original_sha);
    let (_, _, response) = run_request(&chain, "/noop");
    assert_eq!(response.get_str("x-chaos-config"), Some("c"));
    assert_eq!(response.get_str("x-version"), None);
    Ok(())
}

#[test]
fn tier_b_calls_return_envoys_statuses() -> Result<()> {
    let host = host();
    let filter = host.load(chaos(FailurePolicy::default()))?;
    let chain = FilterChain::new(vec![filter]);
    let mut stream = chain.start_stream(StreamInfo::default());
    assert_eq!(
        stream.on_request_headers(get("/tier-b"), true),
        Action::Continue
    );
    let h = stream.request_headers();
    // Envoy: unknown callout upstream ⇒ BAD_ARGUMENT; unknown property ⇒ NOT_FOUND;
    // incrementing a histogram ⇒ BAD_ARGUMENT.
    assert_eq!(h.get_str("x-http-call"), Some("BadArgument"));
    assert_eq!(h.get_str("x-property"), Some("none"));
    assert_eq!(h.get_str("x-histogram-increment"), Some("BadArgument"));
    Ok(())
}

#[test]
fn metrics_are_recorded_across_instances() -> Result<()> {
    let host = host();
    let filter = host.load(FilterSpec {
        instances: 2,
        ..chaos(FailurePolicy::default())
    })?;
    let chain = FilterChain::new(vec![filter]);
    for _ in 0..3 {
        run_request(&chain, "/count");
    }
    let metrics = host.metrics();
    let counter = metrics
        .iter()
        .find(|m| m.name == "chaos_requests")
        .expect("counter defined");
    assert_eq!(counter.kind, MetricKind::Counter);
    assert_eq!(&*counter.filter, "chaos");
    assert_eq!(counter.value, 3);
    let histogram = metrics
        .iter()
        .find(|m| m.name == "chaos_latency")
        .expect("histogram defined");
    assert_eq!((histogram.count, histogram.sum), (3, 126));
    Ok(())
}

#[test]
fn request_bodies_are_buffered_while_paused_and_rewritten() -> Result<()> {
    let host = host();
    let filter = host.load(chaos(FailurePolicy::default()))?;
    let chain = FilterChain::new(vec![filter]);
    let mut stream = chain.start_stream(StreamInfo::default());
    assert_eq!(
        stream.on_request_headers(get("/upper"), false),
        Action::Continue
    );
    let mut chunk = b"hello ".to_vec();
    assert_eq!(stream.on_request_body(&mut chunk, false), Action::Pause);
    assert!(chunk.is_empty(), "held back while paused");
    let mut chunk = b"world".to_vec();
    assert_eq!(stream.on_request_body(&mut chunk, true), Action::Continue);
    assert_eq!(chunk, b"HELLO WORLD");
    assert!(
        stream
            .finish()
            .iter()
            .any(|d| d.kind == DecisionKind::BodyModified)
    );
    Ok(())
}

#[test]
fn lifecycle_callbacks_run_for_every_stream_even_when_dropped_early() -> Result<()> {
    // Counts create/done/log/delete in guest memory and reports them through proxy_log.
    let wasm = wat::parse_str(
        r#"(module
            (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
            (func (export "proxy_abi_version_0_2_1"))
            (memory (export "memory") 1)
            (data (i32.const 0) "c") (data (i32.const 1) "d") (data (i32.const 2) "l") (data (i32.const 3) "x")
            (func (export "proxy_on_memory_allocate") (param i32) (result i32) i32.const 1024)
            (func (export "proxy_on_context_create") (param i32 i32)
                (drop (call $log (i32.const 2) (i32.const 0) (i32.const 1))))
            (func (export "proxy_on_done") (param i32) (result i32)
                (drop (call $log (i32.const 2) (i32.const 1) (i32.const 1))) i32.const 1)
            (func (export "proxy_on_log") (param i32)
                (drop (call $log (i32.const 2) (i32.const 2) (i32.const 1))))
            (func (export "proxy_on_delete") (param i32)
                (drop (call $log (i32.const 2) (i32.const 3) (i32.const 1))))
        )"#,
    )?;
    let (host, logs) = host_with_logs();
    let filter = host.load(FilterSpec {
        instances: 1,
        ..FilterSpec::new("lifecycle", wasm)
    })?;
    let chain = FilterChain::new(vec![filter]);
    {
        let mut s = chain.start_stream(StreamInfo::default());
        s.on_request_headers(get("/"), false);
        // dropped mid-request (client reset)
    }
    let s = chain.start_stream(StreamInfo::default());
    s.finish();
    let logs = logs.lock().unwrap();
    let seq: String = logs.iter().map(|l| l.message.as_str()).collect();
    // root create at boot, then two streams: create, done, log, delete each.
    assert_eq!(seq, "ccdlxcdlx");
    Ok(())
}

#[test]
fn a_filter_built_with_the_upstream_sdk_links_and_behaves_as_in_envoy() -> Result<()> {
    // Reference §8 check 3: the upstream SDK imports the env functions Envoy provides and
    // panics on any status it does not expect, so this checks both linking and statuses.
    let (host, logs) = host_with_logs();
    let filter = host.load(FilterSpec {
        instances: 1,
        log_level: LogLevel::Trace,
        ..FilterSpec::new("sdk-compat", guest("sdk-compat-filter"))
    })?;
    let chain = FilterChain::new(vec![filter]);

    let mut stream = chain.start_stream(StreamInfo::default());
    let Action::LocalReply(reply) = stream.on_request_headers(get("/teapot"), true) else {
        panic!("/teapot is answered locally");
    };
    assert_eq!(reply.status, 418);
    assert_eq!(reply.body, b"short and stout\n");
    // As in Envoy, the local reply runs through the filter's response phase, which
    // replaced the header the reply was sent with.
    assert_eq!(reply.headers.get_str("x-compat"), Some("ok"));
    stream.finish();

    let (action, _, _) = run_request(&chain, "/other");
    assert_eq!(action, Action::Continue);

    let logs = logs.lock().unwrap();
    let lines: Vec<&str> = logs.iter().map(|l| l.message.as_str()).collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("ctx 2: request /teapot with")),
        "{lines:#?}"
    );
    // The local reply went through the same filter's response path.
    assert!(lines.contains(&"ctx 2: response 418"), "{lines:#?}");
    assert_eq!(lines.iter().filter(|l| **l == "ctx 2: done").count(), 1);
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("ctx 3: request /other with")),
        "{lines:#?}"
    );
    assert_eq!(lines.iter().filter(|l| **l == "ctx 3: done").count(), 1);
    assert!(
        !logs.iter().any(|l| l.level >= LogLevel::Error),
        "no panic, no trap: {lines:#?}"
    );
    Ok(())
}
