//! "60 header operations per request" (DESIGN.md §8: ≤ 20 µs; Higress on V8 ≈ 200 µs).
//!
//! Drives whole streams through a `FilterChain` with the test-only `chaos` filter: `/h60`
//! does 20 × (get, add, remove) on request headers; `/noop` is the same stream with no header
//! operation (the fixed cost of a filter). Reports p50/p99/mean per stream and per
//! `on_request_headers` call. Run: `cargo bench -p membrane-filters --bench header_ops`.
//! Numbers only; nothing here asserts on time.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use membrane_filters::{
    Action, FilterChain, FilterHost, FilterSpec, Headers, HostConfig, StreamInfo,
};

const ITERATIONS: usize = 20_000;
const WARMUP: usize = 2_000;

fn request(path: &str) -> Headers {
    let mut headers: Vec<(String, String)> = (0..20)
        .map(|i| (format!("x-h{i}"), format!("value-{i}")))
        .collect();
    headers.push(("user-agent".into(), "bench".into()));
    Headers::request("GET", path, "bench.test", headers)
}

struct Sample {
    stream: Vec<Duration>,
    callback: Vec<Duration>,
}

fn run(chain: &FilterChain, path: &str) -> Sample {
    let response = Headers::response(200, [("content-type", "text/plain")]);
    let mut sample = Sample {
        stream: Vec::with_capacity(ITERATIONS),
        callback: Vec::with_capacity(ITERATIONS),
    };
    for i in 0..WARMUP + ITERATIONS {
        let req = request(path);
        let resp = response.clone();
        let start = Instant::now();
        let mut stream = chain.start_stream(StreamInfo::default());
        let cb_start = Instant::now();
        let action = stream.on_request_headers(req, true);
        let cb = cb_start.elapsed();
        assert_eq!(action, Action::Continue);
        stream.on_response_headers(resp, true);
        stream.finish();
        let total = start.elapsed();
        if i >= WARMUP {
            sample.stream.push(total);
            sample.callback.push(cb);
        }
    }
    sample
}

fn stats(mut v: Vec<Duration>) -> (Duration, Duration, Duration) {
    v.sort();
    let mean = v.iter().sum::<Duration>() / v.len() as u32;
    (v[v.len() / 2], v[v.len() * 99 / 100], mean)
}

fn main() {
    let wasm = common::guest("chaos-filter");
    let host = FilterHost::new(HostConfig::default()).expect("host");
    let filter = host
        .load(FilterSpec {
            instances: 1,
            ..FilterSpec::new("bench", wasm).with_config("bench")
        })
        .expect("load chaos filter");
    let chain = FilterChain::new(vec![filter]);
    println!("header_ops: {ITERATIONS} streams each (after {WARMUP} warm-up), 1 instance");
    for path in ["/noop", "/h60"] {
        let s = run(&chain, path);
        let (p50, p99, mean) = stats(s.stream);
        let (cp50, cp99, cmean) = stats(s.callback);
        println!(
            "{path:6} stream (create + req hdrs + resp hdrs + done/log/delete): \
             p50 {p50:?} p99 {p99:?} mean {mean:?} | on_request_headers: p50 {cp50:?} \
             p99 {cp99:?} mean {cmean:?}"
        );
    }
}
