//! The example filters added for attachment (`examples/filters/rate-limit`, `body-redact`,
//! `api-key`, `authz-callout`), built for wasm32-wasip1 from this test (see `common`) and
//! driven through `FilterChain` as the proxy drives them.

mod common;

use anyhow::Result;
use common::guest;
use membrane_filters::{
    Action, DecisionKind, FilterChain, FilterHost, FilterSpec, Headers, HostConfig,
    HttpCallResponse, PeerInfo, StreamInfo,
};

fn host() -> FilterHost {
    FilterHost::new(HostConfig {
        max_instances: 16,
        ..HostConfig::default()
    })
    .expect("filter host")
}

fn get(path: &str, headers: &[(&str, &str)]) -> Headers {
    Headers::request("GET", path, "svc.test", headers.iter().copied())
}

fn from_identity(identity: Option<u64>) -> StreamInfo {
    StreamInfo {
        source: PeerInfo {
            identity,
            address: Some("10.0.0.9:40000".parse().expect("addr")),
            ..PeerInfo::default()
        },
        ..StreamInfo::default()
    }
}

fn reply(action: Action) -> (u16, Headers, String) {
    match action {
        Action::LocalReply(r) => (r.status, r.headers, String::from_utf8_lossy(&r.body).into()),
        other => panic!("expected a local reply, got {other:?}"),
    }
}

#[test]
fn rate_limit_counts_per_client_across_instances() -> Result<()> {
    let host = host();
    // A window of ~31 years: no window boundary can fall inside this test.
    let mut spec =
        FilterSpec::new("rate-limit", guest("rate-limit")).with_config("3 per 1000000000s");
    spec.instances = 2;
    let chain = FilterChain::new(vec![host.load(spec)?]);
    for i in 1..=3 {
        let mut s = chain.start_stream(from_identity(Some(7)));
        assert_eq!(
            s.on_request_headers(get("/", &[]), true),
            Action::Continue,
            "request {i}"
        );
    }
    let mut s = chain.start_stream(from_identity(Some(7)));
    let (status, headers, body) = reply(s.on_request_headers(get("/", &[]), true));
    assert_eq!(status, 429);
    assert_eq!(body, "rate limit exceeded\n");
    assert!(
        headers
            .get_str("retry-after")
            .is_some_and(|v| v.parse::<u64>().is_ok())
    );
    // Another client has its own budget; a client without identity is keyed by address.
    let mut s = chain.start_stream(from_identity(Some(8)));
    assert_eq!(s.on_request_headers(get("/", &[]), true), Action::Continue);
    let mut s = chain.start_stream(from_identity(None));
    assert_eq!(s.on_request_headers(get("/", &[]), true), Action::Continue);

    let bad = host
        .load(FilterSpec::new("rate-limit", guest("rate-limit")).with_config("3 per minute"))
        .err()
        .expect("a bad configuration is rejected");
    assert!(bad.to_string().contains("rate-limit"), "{bad}");
    Ok(())
}

#[test]
fn body_redact_masks_words_split_across_chunks() -> Result<()> {
    let host = host();
    let spec = FilterSpec::new("body-redact", guest("body-redact")).with_config("password\n# c\n");
    let chain = FilterChain::new(vec![host.load(spec)?]);
    let mut s = chain.start_stream(StreamInfo::default());
    assert_eq!(s.on_request_headers(get("/", &[]), true), Action::Continue);
    let response = Headers::response(200, [("content-length", "27")]);
    assert_eq!(s.on_response_headers(response, false), Action::Continue);
    let mut chunk = b"the pass".to_vec();
    assert_eq!(s.on_response_body(&mut chunk, false), Action::Pause);
    assert!(chunk.is_empty(), "the filter holds the first chunk");
    let mut chunk = b"word is: password!!".to_vec();
    assert_eq!(s.on_response_body(&mut chunk, true), Action::Continue);
    assert_eq!(
        String::from_utf8_lossy(&chunk),
        "the ******** is: ********!!"
    );
    assert_eq!(
        chunk.len(),
        27,
        "the length (and content-length) is unchanged"
    );
    assert!(
        s.decisions()
            .iter()
            .any(|d| d.kind == DecisionKind::BodyModified)
    );
    Ok(())
}

#[test]
fn api_key_is_checked_against_the_source_identity() -> Result<()> {
    let host = host();
    let spec = FilterSpec::new("api-key", guest("api-key")).with_config("1234 k-one\n5678 k-two\n");
    let chain = FilterChain::new(vec![host.load(spec)?]);

    let mut s = chain.start_stream(from_identity(Some(1234)));
    let action = s.on_request_headers(get("/", &[("x-api-key", "k-one")]), true);
    assert_eq!(action, Action::Continue);
    assert_eq!(
        s.request_headers().get("x-api-key"),
        None,
        "the key never goes upstream"
    );

    // Identity 1234 presenting identity 5678's key: refused.
    for key in ["k-two", "wrong", ""] {
        let mut s = chain.start_stream(from_identity(Some(1234)));
        let (status, headers, body) =
            reply(s.on_request_headers(get("/", &[("x-api-key", key)]), true));
        assert_eq!(
            (status, body.as_str()),
            (401, "invalid API key\n"),
            "key {key:?}"
        );
        assert_eq!(headers.get_str("www-authenticate"), Some("ApiKey"));
    }
    for identity in [Some(9), None] {
        let mut s = chain.start_stream(from_identity(identity));
        let (status, _, body) =
            reply(s.on_request_headers(get("/", &[("x-api-key", "k-one")]), true));
        assert_eq!(status, 403);
        assert!(body.contains("has no API key"), "{body}");
    }
    Ok(())
}

#[test]
fn authz_callout_pauses_asks_and_resumes_or_denies() -> Result<()> {
    let host = host();
    let spec = FilterSpec::new("authz-callout", guest("authz-callout"))
        .with_config("upstream=authz\npath=/check\ntimeout_ms=500\n")
        .with_callout_upstreams(["authz".to_owned()]);
    let chain = FilterChain::new(vec![host.load(spec)?]);

    let ask = |response: Option<HttpCallResponse>| {
        let mut s = chain.start_stream(StreamInfo::default());
        let request = get(
            "/orders",
            &[("authorization", "Bearer t"), ("x-authz-user", "forged")],
        );
        assert_eq!(s.on_request_headers(request, true), Action::Pause);
        let calls = s.take_http_calls();
        assert_eq!(calls.len(), 1);
        let call = &calls[0];
        assert_eq!(call.upstream, "authz");
        assert_eq!(call.headers.get_str(":path"), Some("/check"));
        assert_eq!(call.headers.get_str("authorization"), Some("Bearer t"));
        assert_eq!(call.headers.get_str("x-original-path"), Some("/orders"));
        assert_eq!(call.timeout, std::time::Duration::from_millis(500));
        let action = s.on_http_call_response(call.id, response);
        (action, s.request_headers().clone())
    };

    let ok = HttpCallResponse {
        headers: Headers::response(200, [("content-type", "text/plain")]),
        body: b"alice\n".to_vec(),
        trailers: Headers::new(),
    };
    let (action, headers) = ask(Some(ok));
    assert_eq!(action, Action::Continue);
    assert_eq!(
        headers.get_str("x-authz-user"),
        Some("alice"),
        "the forged value is replaced"
    );

    let no = HttpCallResponse {
        headers: Headers::response(401, [("content-type", "text/plain")]),
        body: Vec::new(),
        trailers: Headers::new(),
    };
    let (status, _, body) = reply(ask(Some(no)).0);
    assert_eq!((status, body.as_str()), (403, "forbidden by authz\n"));

    let (status, _, body) = reply(ask(None).0);
    assert_eq!(
        (status, body.as_str()),
        (503, "authorization service unavailable\n")
    );

    // Without the upstream configured, the call is refused (BAD_ARGUMENT) and answered 503.
    let spec =
        FilterSpec::new("authz-callout", guest("authz-callout")).with_config("upstream=authz");
    let chain = FilterChain::new(vec![host.load(spec)?]);
    let mut s = chain.start_stream(StreamInfo::default());
    let (status, _, _) = reply(s.on_request_headers(get("/", &[]), true));
    assert_eq!(status, 503);
    assert!(s.take_http_calls().is_empty());
    Ok(())
}
