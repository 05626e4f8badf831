//! TCP (stream) filters through the host API the proxy's L4 relays call per chunk: a filter
//! written with the upstream proxy-wasm SDK reads and rewrites both directions, buffers
//! across chunks with Pause, closes the connection, and sees the closes.

mod common;

use std::sync::{Arc, Mutex};

use anyhow::Result;
use common::guest_at;
use membrane_filters::{
    Action, FilterChain, FilterHost, FilterLog, FilterProtocol, FilterSpec, HostConfig, PeerInfo,
    PeerType, StreamInfo,
};

fn rewrite_filter() -> Vec<u8> {
    guest_at(
        "filters/tests/guests/tcp-rewrite-upstream",
        "tcp-rewrite-upstream",
    )
}

fn host_with_logs() -> (FilterHost, Arc<Mutex<Vec<FilterLog>>>) {
    let logs = Arc::new(Mutex::new(Vec::new()));
    let sink = logs.clone();
    let host = FilterHost::new(HostConfig {
        max_instances: 8,
        log_sink: Some(Arc::new(move |l: &FilterLog| {
            sink.lock().unwrap().push(l.clone())
        })),
        ..HostConfig::default()
    })
    .expect("filter host");
    (host, logs)
}

fn info() -> StreamInfo {
    StreamInfo {
        source: PeerInfo {
            address: Some("10.0.0.7:40123".parse().unwrap()),
            ..PeerInfo::default()
        },
        ..StreamInfo::default()
    }
}

#[test]
fn upstream_sdk_stream_filter_rewrites_both_directions() -> Result<()> {
    let (host, logs) = host_with_logs();
    let filter = host.load(
        FilterSpec::new("tcp-rewrite", rewrite_filter()).with_protocol(FilterProtocol::Tcp),
    )?;
    let chain = FilterChain::new(vec![filter]);
    let mut conn = chain.start_connection(info());
    assert_eq!(conn.on_new_connection(), Action::Continue);

    // A line split over two chunks: the first is held (Pause), the second releases both.
    let mut data = b"say pi".to_vec();
    assert_eq!(conn.on_downstream_data(&mut data, false), Action::Pause);
    assert!(data.is_empty(), "paused bytes are held, not forwarded");
    let mut data = b"ng twice: ping\n".to_vec();
    assert_eq!(conn.on_downstream_data(&mut data, false), Action::Continue);
    assert_eq!(data, b"say PING twice: PING\n");

    let mut reply = b"pong\n".to_vec();
    assert_eq!(conn.on_upstream_data(&mut reply, false), Action::Continue);
    assert_eq!(reply, b"[wasm] pong\n");

    conn.on_upstream_close(PeerType::Remote);
    conn.on_downstream_close(PeerType::Local);
    let _ = conn.finish();
    let logs = logs.lock().unwrap();
    let lines: Vec<&str> = logs.iter().map(|l| l.message.as_str()).collect();
    assert!(
        lines.contains(&"new connection from 10.0.0.7:40123"),
        "{lines:?}"
    );
    assert!(lines.contains(&"upstream closed by remote"), "{lines:?}");
    assert!(lines.contains(&"downstream closed by local"), "{lines:?}");
    Ok(())
}

#[test]
fn a_stream_filter_closes_the_connection() -> Result<()> {
    let (host, _logs) = host_with_logs();
    let filter = host.load(
        FilterSpec::new("tcp-rewrite", rewrite_filter()).with_protocol(FilterProtocol::Tcp),
    )?;
    let chain = FilterChain::new(vec![filter]);
    let mut conn = chain.start_connection(info());
    assert_eq!(conn.on_new_connection(), Action::Continue);
    let mut data = b"quit\n".to_vec();
    assert_eq!(conn.on_downstream_data(&mut data, false), Action::Close);
    Ok(())
}

#[test]
fn two_stream_filters_see_each_others_output_in_envoy_order() -> Result<()> {
    let (host, _logs) = host_with_logs();
    let a = host.load(FilterSpec::new("a", rewrite_filter()).with_protocol(FilterProtocol::Tcp))?;
    let b = host.load(FilterSpec::new("b", rewrite_filter()).with_protocol(FilterProtocol::Tcp))?;
    let chain = FilterChain::new(vec![a, b]);
    let mut conn = chain.start_connection(info());
    assert_eq!(conn.on_new_connection(), Action::Continue);
    let mut data = b"ping\n".to_vec();
    assert_eq!(conn.on_downstream_data(&mut data, true), Action::Continue);
    assert_eq!(data, b"PING\n");
    // Upstream data runs last filter first; each prepends its tag.
    let mut reply = b"x".to_vec();
    assert_eq!(conn.on_upstream_data(&mut reply, true), Action::Continue);
    assert_eq!(reply, b"[wasm] [wasm] x");
    Ok(())
}
