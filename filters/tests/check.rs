//! `membrane filter check`'s truth (`FilterHost::inspect`) on real modules: an HTTP-only
//! filter, a gRPC one, a TCP one (each built with membrane's SDK, so their exports declare
//! exactly their context type), an upstream-SDK module, and a module with a missing import,
//! which the host also refuses at load with the same reason.

mod common;

use anyhow::Result;
use common::guest_at;
use membrane_filters::{
    ContextTypes, FilterError, FilterHost, FilterProtocol, FilterSpec, HostConfig, ImportStatus,
    ModuleReport,
};

fn host() -> FilterHost {
    FilterHost::new(HostConfig {
        max_instances: 8,
        ..HostConfig::default()
    })
    .expect("filter host")
}

fn status<'a>(report: &'a ModuleReport, name: &str) -> Option<&'a ImportStatus> {
    report
        .imports
        .iter()
        .find(|i| i.name == name)
        .map(|i| &i.status)
}

#[test]
fn http_only_filter() -> Result<()> {
    let report = host().inspect(&guest_at("examples/filters/add-header", "add-header"))?;
    assert!(report.loadable(), "{:?}", report.refusal());
    assert_eq!(
        report.contexts,
        ContextTypes {
            http: true,
            tcp: false,
            root: true
        }
    );
    assert!(!report.uses_grpc);
    assert_eq!(
        status(&report, "proxy_log"),
        Some(&ImportStatus::Implemented)
    );
    // Nothing is "implemented" that answers with a stand-in.
    for i in &report.imports {
        assert_ne!(i.status, ImportStatus::Missing, "{i:?}");
    }
    Ok(())
}

#[test]
fn grpc_filter() -> Result<()> {
    let host = host();
    let report = host.inspect(&guest_at("examples/filters/grpc-authz", "grpc-authz"))?;
    assert!(report.loadable(), "{:?}", report.refusal());
    assert!(report.uses_grpc);
    assert!(report.contexts.http && !report.contexts.tcp);
    match status(&report, "proxy_grpc_call") {
        Some(ImportStatus::Partial(note)) => assert!(note.contains("paused"), "{note}"),
        other => panic!("proxy_grpc_call: {other:?}"),
    }
    assert_eq!(
        status(&report, "proxy_get_status"),
        Some(&ImportStatus::Implemented)
    );
    Ok(())
}

#[test]
fn tcp_filter_and_protocol_checked_at_load() -> Result<()> {
    let host = host();
    let wasm = guest_at("examples/filters/tcp-rewrite", "tcp-rewrite");
    let report = host.inspect(&wasm)?;
    assert!(report.loadable(), "{:?}", report.refusal());
    assert_eq!(
        report.contexts,
        ContextTypes {
            http: false,
            tcp: true,
            root: true
        }
    );
    // Attached as a TCP filter it loads; as an HTTP filter it is refused with the reason.
    host.load(FilterSpec::new("tcp", wasm.clone()).with_protocol(FilterProtocol::Tcp))?;
    let err = host
        .load(FilterSpec::new("tcp-as-http", wasm))
        .err()
        .expect("refused");
    assert!(
        matches!(&err, FilterError::Unsupported { reason, .. } if reason.contains("as a http filter")),
        "{err}"
    );
    // And an HTTP-only filter cannot be attached to TCP connections.
    let err = host
        .load(
            FilterSpec::new(
                "http-as-tcp",
                guest_at("examples/filters/add-header", "add-header"),
            )
            .with_protocol(FilterProtocol::Tcp),
        )
        .err()
        .expect("refused");
    assert!(err.to_string().contains("proxy_on_new_connection"), "{err}");
    Ok(())
}

#[test]
fn upstream_sdk_module_lists_partial_imports_and_undelivered_callbacks() -> Result<()> {
    let report = host().inspect(&guest_at(
        "filters/tests/guests/grpc-auth-upstream",
        "grpc-auth-upstream",
    ))?;
    assert!(report.loadable(), "{:?}", report.refusal());
    // The upstream SDK exports every callback: all three context types.
    assert!(report.contexts.http && report.contexts.tcp && report.contexts.root);
    for name in [
        "proxy_call_foreign_function",
        "proxy_enqueue_shared_queue",
        "proxy_http_call",
    ] {
        assert!(
            matches!(status(&report, name), Some(ImportStatus::Partial(_))),
            "{name}: {:?}",
            status(&report, name)
        );
    }
    let undelivered: Vec<&str> = report
        .undelivered_callbacks
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    assert!(
        undelivered.contains(&"proxy_on_queue_ready"),
        "{undelivered:?}"
    );
    assert!(
        undelivered.contains(&"proxy_on_request_trailers"),
        "{undelivered:?}"
    );
    Ok(())
}

#[test]
fn missing_import_is_reported_and_refused_at_load() -> Result<()> {
    let host = host();
    let wasm = wat::parse_str(
        r#"(module
            (import "env" "proxy_log" (func (param i32 i32 i32) (result i32)))
            (import "env" "proxy_get_header_map_values" (func (param i32 i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (func (export "proxy_abi_version_0_2_1"))
            (func (export "proxy_on_memory_allocate") (param i32) (result i32) i32.const 0)
            (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) i32.const 0))"#,
    )?;
    let report = host.inspect(&wasm)?;
    assert_eq!(
        status(&report, "proxy_get_header_map_values"),
        Some(&ImportStatus::Missing)
    );
    let refusal = report.refusal().expect("refused");
    assert!(
        refusal.contains("env::proxy_get_header_map_values"),
        "{refusal}"
    );
    let err = host
        .load(FilterSpec::new("needs-more", wasm))
        .err()
        .expect("refused at load");
    assert!(
        matches!(&err, FilterError::Unsupported { reason, .. } if reason.contains("env::proxy_get_header_map_values")),
        "{err}"
    );
    Ok(())
}
