//! End-to-end tests of the DNS proxy with a real authoritative test server behind it and
//! hickory-proto clients in front, all on loopback: policy verdicts, transports, IDs,
//! truncation and EDNS sizes, upstream timeouts, TCP connection reuse, FQDN learning and
//! records.

mod dns_harness;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use dns_harness::*;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use membrane_l7proxy::dns::{
    DenyResponse, DnsLog, DnsProxyConfig, DnsRecordKind, DnsTransport, DnsVerdict, FqdnCache,
    FqdnLearningConfig, StaticUpstream,
};

fn config(upstream: &AuthServer) -> DnsProxyConfig {
    DnsProxyConfig::new(
        "127.0.0.1:0".parse().expect("addr"),
        StaticUpstream(upstream.addr),
    )
}

fn github_zone() -> Zone {
    Zone::new()
        .a("api.github.com.", 60, "192.0.2.10")
        .a("www.github.com.", 60, "192.0.2.11")
        .a("a.b.github.com.", 60, "192.0.2.12")
        .a("github.com.", 60, "192.0.2.13")
        .a("xgithub.com.", 60, "192.0.2.14")
        .a("other.example.", 60, "192.0.2.15")
}

/// Asks `qname` over both transports and checks the verdict the client sees: the
/// upstream's answer when allowed, the deny rcode with the question echoed when denied;
/// the client's ID comes back either way.
async fn expect_verdict(
    proxy: &RunningProxy,
    qname: &str,
    allowed: bool,
    deny: ResponseCode,
    id: u16,
) -> Result<()> {
    let message = query(id, qname, RecordType::A, None);
    for (transport, reply) in [
        ("UDP", udp_ask(proxy.addr, &message).await?),
        ("TCP", tcp_ask(proxy.addr, &message).await?),
    ] {
        ensure!(
            reply.id() == id,
            "{transport} {qname}: id {} != {id}",
            reply.id()
        );
        ensure!(
            reply.message.queries == message.queries,
            "{transport} {qname}: question not echoed: {:?}",
            reply.message.queries
        );
        if allowed {
            ensure!(
                reply.rcode() == ResponseCode::NoError && !reply.ips().is_empty(),
                "{transport} {qname} should be allowed, got {} {:?}",
                reply.rcode(),
                reply.ips()
            );
        } else {
            ensure!(
                reply.rcode() == deny && reply.message.answers.is_empty(),
                "{transport} {qname} should be denied with {deny}, got {}",
                reply.rcode()
            );
        }
    }
    Ok(())
}

#[tokio::test]
async fn pattern_table_over_udp_and_tcp() -> Result<()> {
    let upstream = AuthServer::start(github_zone()).await?;
    let mut config = config(&upstream);
    config.policy = policy(&[match_name("api.github.com"), pattern("*.github.com")]);
    let proxy = start_proxy(config).await?;
    let refused = ResponseCode::Refused;
    let table: &[(&str, bool)] = &[
        ("api.github.com.", true),
        ("API.GitHub.COM.", true),
        ("www.github.com.", true),
        ("WWW.GITHUB.COM.", true),
        ("github.com.", false),
        ("a.b.github.com.", false),
        ("xgithub.com.", false),
        ("other.example.", false),
    ];
    for (i, (qname, allowed)) in table.iter().enumerate() {
        expect_verdict(&proxy, qname, *allowed, refused, 0x1000 + i as u16).await?;
    }

    // `**.` covers any depth but still not the bare domain; swapped in while serving.
    proxy.handle.set_policy(policy(&[pattern("**.github.com")]));
    let table: &[(&str, bool)] = &[
        ("www.github.com.", true),
        ("a.b.github.com.", true),
        ("github.com.", false),
        ("api.github.com.", true),
        ("xgithub.com.", false),
    ];
    for (i, (qname, allowed)) in table.iter().enumerate() {
        expect_verdict(&proxy, qname, *allowed, refused, 0x2000 + i as u16).await?;
    }
    let stats = proxy.handle.stats();
    ensure!(stats.denied == 2 * 6 && stats.allowed == 2 * 7, "{stats:?}");
    Ok(())
}

#[tokio::test]
async fn deny_can_answer_nxdomain() -> Result<()> {
    let upstream = AuthServer::start(github_zone()).await?;
    let mut config = config(&upstream);
    config.policy = policy(&[match_name("api.github.com")]);
    config.deny_response = DenyResponse::NameError;
    let proxy = start_proxy(config).await?;
    expect_verdict(&proxy, "www.github.com.", false, ResponseCode::NXDomain, 77).await?;
    expect_verdict(&proxy, "api.github.com.", true, ResponseCode::NXDomain, 78).await?;
    ensure!(
        upstream.udp_queries() == 1,
        "denied queries never reach the upstream"
    );
    Ok(())
}

#[tokio::test]
async fn client_ids_are_preserved_and_upstream_ids_rewritten() -> Result<()> {
    let upstream = AuthServer::start(github_zone()).await?;
    let mut config = config(&upstream);
    config.policy = policy(&[pattern("*")]);
    let proxy = start_proxy(config).await?;
    let client_ids = [0u16, 1, 0xBEEF, 0xFFFF, 0x1234, 0x4321];
    for id in client_ids {
        let reply = udp_ask(
            proxy.addr,
            &query(id, "www.github.com.", RecordType::A, None),
        )
        .await?;
        ensure!(
            reply.id() == id && reply.rcode() == ResponseCode::NoError,
            "{reply:?}"
        );
        let reply = tcp_ask(
            proxy.addr,
            &query(id, "www.github.com.", RecordType::A, None),
        )
        .await?;
        ensure!(
            reply.id() == id && reply.rcode() == ResponseCode::NoError,
            "{reply:?}"
        );
    }
    let seen = upstream.ids();
    ensure!(seen.len() == 2 * client_ids.len(), "upstream saw {seen:?}");
    // The proxy draws its own IDs: that the upstream saw the client's sequence unchanged
    // would mean the IDs leak through (chance: 2^-192).
    ensure!(
        seen.iter().step_by(2).copied().collect::<Vec<_>>() != client_ids,
        "upstream IDs are the client's: {seen:?}"
    );
    Ok(())
}

#[tokio::test]
async fn malformed_queries_get_formerr_or_are_dropped() -> Result<()> {
    let upstream = AuthServer::start(github_zone()).await?;
    let mut config = config(&upstream);
    config.policy = policy(&[pattern("*")]);
    let proxy = start_proxy(config).await?;
    let wait = Duration::from_millis(300);

    // Too short for a header: no ID to answer with.
    ensure!(
        udp_raw(proxy.addr, &[0xAB, 0xCD, 0x01], wait)
            .await?
            .is_none()
    );
    // A header announcing a question that is cut off: FORMERR with the ID.
    let mut cut = query(0xC0DE, "www.github.com.", RecordType::A, None).to_vec()?;
    cut.truncate(15);
    let reply = udp_raw(proxy.addr, &cut, WAIT)
        .await?
        .context("FORMERR expected")?;
    let reply = hickory_proto::op::Message::from_vec(&reply)?;
    ensure!(reply.metadata.id == 0xC0DE, "{reply:?}");
    ensure!(
        reply.metadata.response_code == ResponseCode::FormErr,
        "{reply:?}"
    );
    // Two questions: FORMERR (miekg's default acceptance rules).
    let mut two = query(0xC0DF, "www.github.com.", RecordType::A, None);
    two.add_query(hickory_proto::op::Query::query(
        name("api.github.com."),
        RecordType::A,
    ));
    let reply = udp_ask(proxy.addr, &two).await?;
    ensure!(
        reply.id() == 0xC0DF && reply.rcode() == ResponseCode::FormErr,
        "{reply:?}"
    );
    // The same over TCP.
    let mut client = TcpClient::connect(proxy.addr).await?;
    client.send(&two).await?;
    let reply = client.recv().await?;
    ensure!(reply.rcode() == ResponseCode::FormErr, "{reply:?}");
    // A response sent to the proxy is dropped (no reflection).
    let mut response = query(0x0BAD, "www.github.com.", RecordType::A, None).to_vec()?;
    response[2] |= 0x80;
    ensure!(udp_raw(proxy.addr, &response, wait).await?.is_none());

    let stats = proxy.handle.stats();
    ensure!(stats.malformed_dropped == 2, "{stats:?}");
    ensure!(stats.malformed_answered == 3, "{stats:?}");
    ensure!(upstream.udp_queries() + upstream.tcp_queries() == 0);
    // The proxy still serves after all that.
    let reply = udp_ask(
        proxy.addr,
        &query(5, "www.github.com.", RecordType::A, None),
    )
    .await?;
    ensure!(reply.rcode() == ResponseCode::NoError);
    Ok(())
}

#[tokio::test]
async fn upstream_truncation_passes_through_and_tcp_retry_works() -> Result<()> {
    let upstream = AuthServer::start(github_zone()).await?;
    upstream.state.truncate_udp.store(true, Ordering::SeqCst);
    let mut config = config(&upstream);
    config.policy = policy(&[pattern("*.github.com")]);
    let proxy = start_proxy(config).await?;
    let message = query(0x7C7C, "www.github.com.", RecordType::A, Some(1232));
    let udp = udp_ask(proxy.addr, &message).await?;
    ensure!(udp.truncated() && udp.id() == 0x7C7C, "{udp:?}");
    ensure!(
        udp.message.answers.is_empty(),
        "the upstream's TC answer is passed as is"
    );
    ensure!(
        proxy.handle.stats().truncated_for_client == 0,
        "not our truncation"
    );
    // What a client does next: the same question over TCP, which is answered in full.
    let tcp = tcp_ask(proxy.addr, &message).await?;
    ensure!(!tcp.truncated() && tcp.id() == 0x7C7C, "{tcp:?}");
    ensure!(
        tcp.ips() == vec!["192.0.2.11".parse::<IpAddr>()?],
        "{tcp:?}"
    );
    Ok(())
}

#[tokio::test]
async fn udp_answers_fit_the_clients_edns_size() -> Result<()> {
    // 100 A records: ~1.6 KiB, over 512 and over 1232, under 4096.
    let upstream = AuthServer::start(Zone::new().many_a("big.example.", 60, 100)).await?;
    let mut config = config(&upstream);
    config.policy = policy(&[match_name("big.example")]);
    let proxy = start_proxy(config).await?;

    let no_edns = udp_ask(proxy.addr, &query(1, "big.example.", RecordType::A, None)).await?;
    ensure!(
        no_edns.len <= 512 && no_edns.truncated(),
        "{} bytes",
        no_edns.len
    );
    ensure!(no_edns.id() == 1 && no_edns.message.queries.len() == 1);

    let small = udp_ask(
        proxy.addr,
        &query(2, "big.example.", RecordType::A, Some(1232)),
    )
    .await?;
    ensure!(
        small.len <= 1232 && small.truncated(),
        "{} bytes",
        small.len
    );
    ensure!(
        small.message.edns.is_some(),
        "OPT kept in the truncated answer"
    );

    let large = udp_ask(
        proxy.addr,
        &query(3, "big.example.", RecordType::A, Some(4096)),
    )
    .await?;
    ensure!(
        !large.truncated() && large.ips().len() == 100,
        "{} ips",
        large.ips().len()
    );
    ensure!(large.len > 1232 && large.len <= 4096);

    let tcp = tcp_ask(proxy.addr, &query(4, "big.example.", RecordType::A, None)).await?;
    ensure!(!tcp.truncated() && tcp.ips().len() == 100);
    ensure!(proxy.handle.stats().truncated_for_client == 2);
    Ok(())
}

#[tokio::test]
async fn upstream_timeout_is_silent_over_udp_and_servfail_over_tcp() -> Result<()> {
    let upstream = AuthServer::start(github_zone()).await?;
    upstream.state.silent.store(true, Ordering::SeqCst);
    let mut config = config(&upstream);
    config.policy = policy(&[pattern("*")]);
    config.upstream_timeout = Duration::from_millis(200);
    let proxy = start_proxy(config).await?;

    let message = query(0x0501, "www.github.com.", RecordType::A, None);
    // The client would retry; give the proxy well over its timeout to (not) answer.
    let reply = udp_query(proxy.addr, &message, Duration::from_secs(2)).await?;
    ensure!(
        reply.is_none(),
        "UDP upstream timeout must not be answered: {reply:?}"
    );
    let handle = proxy.handle.clone();
    eventually("UDP timeout counted", || {
        handle.stats().upstream_timeouts == 1
    })
    .await?;

    let reply = tcp_ask(proxy.addr, &message).await?;
    ensure!(
        reply.rcode() == ResponseCode::ServFail && reply.id() == 0x0501,
        "{reply:?}"
    );
    let stats = proxy.handle.stats();
    ensure!(
        stats.upstream_timeouts == 2 && stats.servfail == 1,
        "{stats:?}"
    );

    // Once the upstream answers again, so does the proxy.
    upstream.state.silent.store(false, Ordering::SeqCst);
    let reply = udp_ask(proxy.addr, &message).await?;
    ensure!(reply.rcode() == ResponseCode::NoError);
    Ok(())
}

#[tokio::test]
async fn unreachable_upstream_gives_servfail() -> Result<()> {
    // A port nobody listens on: TCP connect is refused at once.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let mut config = DnsProxyConfig::new("127.0.0.1:0".parse()?, StaticUpstream(closed));
    config.policy = policy(&[pattern("*")]);
    let proxy = start_proxy(config).await?;
    let reply = tcp_ask(
        proxy.addr,
        &query(9, "www.github.com.", RecordType::A, None),
    )
    .await?;
    ensure!(
        reply.rcode() == ResponseCode::ServFail && reply.id() == 9,
        "{reply:?}"
    );
    ensure!(proxy.handle.stats().upstream_errors == 1);
    Ok(())
}

#[tokio::test]
async fn tcp_upstream_connection_is_reused_and_pipelined() -> Result<()> {
    let upstream = AuthServer::start(github_zone()).await?;
    let mut config = config(&upstream);
    config.policy = policy(&[pattern("*")]);
    let proxy = start_proxy(config).await?;

    // Ten clients at once, each on its own connection.
    let mut tasks = Vec::new();
    for i in 0..10u16 {
        let addr = proxy.addr;
        tasks.push(tokio::spawn(async move {
            tcp_ask(
                addr,
                &query(100 + i, "www.github.com.", RecordType::A, None),
            )
            .await
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        let reply = task.await??;
        ensure!(reply.id() == 100 + i as u16 && reply.rcode() == ResponseCode::NoError);
    }
    // Twenty queries pipelined on one client connection before reading any answer; the
    // answers may come in any order (RFC 7766), each with its own ID.
    let mut client = TcpClient::connect(proxy.addr).await?;
    let names = ["www.github.com.", "api.github.com.", "other.example."];
    for i in 0..20u16 {
        client
            .send(&query(
                200 + i,
                names[usize::from(i) % 3],
                RecordType::A,
                None,
            ))
            .await?;
    }
    let mut ids = Vec::new();
    for _ in 0..20 {
        let reply = client.recv().await?;
        let expected = names[usize::from(reply.id() - 200) % 3];
        ensure!(
            reply.message.queries[0].name().to_ascii() == expected,
            "answer {} for the wrong question",
            reply.id()
        );
        ids.push(reply.id());
    }
    ids.sort_unstable();
    ensure!(ids == (200..220).collect::<Vec<u16>>(), "{ids:?}");

    ensure!(upstream.tcp_queries() == 30, "{}", upstream.tcp_queries());
    ensure!(
        upstream.tcp_connections() == 1,
        "30 TCP queries used {} upstream connections",
        upstream.tcp_connections()
    );
    ensure!(proxy.handle.stats().upstream_tcp_connects == 1);
    Ok(())
}

#[tokio::test]
async fn idle_upstream_connection_is_closed_and_replaced() -> Result<()> {
    let upstream = AuthServer::start(github_zone()).await?;
    let mut config = config(&upstream);
    config.policy = policy(&[pattern("*")]);
    config.upstream_idle_timeout = Duration::from_millis(50);
    let proxy = start_proxy(config).await?;
    let message = query(1, "www.github.com.", RecordType::A, None);
    tcp_ask(proxy.addr, &message).await?;
    udp_ask(proxy.addr, &message).await?;
    let handle = proxy.handle.clone();
    eventually("idle channels closed", || {
        handle.open_upstream_channels() == 0
    })
    .await?;
    let reply = tcp_ask(proxy.addr, &message).await?;
    ensure!(reply.rcode() == ResponseCode::NoError);
    ensure!(
        upstream.tcp_connections() == 2,
        "a new connection after the idle close"
    );
    Ok(())
}

fn cdn_zone() -> Zone {
    Zone::new()
        .cname("www.shop.example.", 120, "shop.cdn.example.")
        .cname("shop.cdn.example.", 90, "edge.cdn.example.")
        .a("edge.cdn.example.", 300, "192.0.2.50")
        .a("edge.cdn.example.", 300, "192.0.2.51")
        .aaaa("edge.cdn.example.", 30, "2001:db8::50")
        .a("plain.example.", 600, "192.0.2.60")
        .a("plain.example.", 600, "192.0.2.61")
        .a("plain.example.", 600, "192.0.2.62")
        .inject("plain.example.", 600, "victim.example.", "203.0.113.66")
}

#[tokio::test]
async fn cname_chain_is_learned_with_min_ttl_before_release() -> Result<()> {
    let upstream = AuthServer::start(cdn_zone()).await?;
    let recorder = Arc::new(RecordingObserver::default());
    let cache = Arc::new(FqdnCache::default());
    let mut config = config(&upstream).with_observer((recorder.clone(), cache.clone()));
    config.policy = policy(&[pattern("*.shop.example"), match_name("plain.example")]);
    config.fqdn = FqdnLearningConfig {
        min_ttl: 60,
        max_ips_per_name: 2,
        ..FqdnLearningConfig::default()
    };
    let proxy = start_proxy(config).await?;

    // The A answer has CNAME 120 → CNAME 90 → A 300: the chain minimum is 90.
    let reply = udp_ask(
        proxy.addr,
        &query(1, "WWW.Shop.Example.", RecordType::A, None),
    )
    .await?;
    ensure!(reply.rcode() == ResponseCode::NoError && reply.ips().len() == 2);
    let learned = recorder.learned();
    ensure!(
        learned.len() == 1,
        "learned before the answer was released: {learned:?}"
    );
    ensure!(learned[0].name == "www.shop.example.", "{learned:?}");
    ensure!(
        learned[0].cnames == ["shop.cdn.example.", "edge.cdn.example."],
        "{learned:?}"
    );
    let ips: Vec<(String, u32)> = learned[0]
        .ips
        .iter()
        .map(|l| (l.ip.to_string(), l.ttl))
        .collect();
    ensure!(
        ips == [("192.0.2.50".into(), 90), ("192.0.2.51".into(), 90)],
        "{ips:?}"
    );

    // AAAA: the 30 s record is below the chain's CNAMEs and is raised to the 60 s minimum.
    udp_ask(
        proxy.addr,
        &query(2, "www.shop.example.", RecordType::AAAA, None),
    )
    .await?;
    let learned = recorder.learned();
    ensure!(learned.len() == 2);
    ensure!(
        learned[1].ips.len() == 1 && learned[1].ips[0].ttl == 60,
        "{learned:?}"
    );

    // Three addresses, a cap of two; the injected record for another name is not learned.
    let reply = tcp_ask(proxy.addr, &query(3, "plain.example.", RecordType::A, None)).await?;
    ensure!(
        reply.ips().len() == 4,
        "the client still gets the whole answer"
    );
    let learned = recorder.learned();
    ensure!(
        learned.len() == 3 && learned[2].ips.len() == 2,
        "{learned:?}"
    );
    ensure!(
        learned[2]
            .ips
            .iter()
            .all(|l| l.ip.to_string() != "203.0.113.66"),
        "{learned:?}"
    );
    ensure!(proxy.handle.stats().ips_over_cap == 1);

    // The cache saw the same and survives a save/load.
    let now = std::time::SystemTime::now();
    ensure!(cache.lookup("www.shop.example", now).len() == 3);
    ensure!(cache.lookup("victim.example", now).is_empty());
    let dir = std::env::temp_dir().join(format!("membrane-dns-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("fqdn-cache.json");
    cache.save(&path)?;
    let restored = FqdnCache::load(&path, 1000)?;
    std::fs::remove_dir_all(&dir)?;
    ensure!(restored.list() == cache.list());

    // NXDOMAIN and denied names teach nothing.
    udp_ask(
        proxy.addr,
        &query(4, "nope.shop.example.", RecordType::A, None),
    )
    .await?;
    udp_ask(
        proxy.addr,
        &query(5, "denied.example.", RecordType::A, None),
    )
    .await?;
    ensure!(recorder.learned().len() == 3);
    Ok(())
}

#[tokio::test]
async fn answer_waits_for_the_observer() -> Result<()> {
    let upstream = AuthServer::start(cdn_zone()).await?;
    let gate = Arc::new(GateObserver::default());
    let mut config = config(&upstream).with_observer(gate.clone());
    config.policy = policy(&[pattern("*")]);
    config.fqdn.deadline = WAIT;
    let proxy = start_proxy(config).await?;

    let addr = proxy.addr;
    let pending = tokio::spawn(async move {
        udp_ask(addr, &query(1, "plain.example.", RecordType::A, None)).await
    });
    eventually("observer entered", || {
        gate.entered.load(Ordering::SeqCst) == 1
    })
    .await?;
    // While the observer has not returned the answer is held, however long that takes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    ensure!(
        !pending.is_finished(),
        "answer released before the datapath update"
    );
    gate.open();
    let reply = tokio::time::timeout(WAIT, pending).await???;
    ensure!(reply.rcode() == ResponseCode::NoError && reply.ips().len() == 4);
    ensure!(proxy.handle.stats().observer_overruns == 0);
    Ok(())
}

#[tokio::test]
async fn deadline_overrun_is_counted_and_the_answer_released() -> Result<()> {
    let upstream = AuthServer::start(cdn_zone()).await?;
    let gate = Arc::new(GateObserver::default());
    let (records, mut receiver) = DnsLog::channel(64);
    let mut config = config(&upstream).with_observer(gate.clone());
    config.policy = policy(&[pattern("*")]);
    config.fqdn.deadline = Duration::from_millis(50);
    config.records = records;
    let proxy = start_proxy(config).await?;

    // The gate stays closed: the answer must come anyway, after the deadline.
    let reply = udp_ask(proxy.addr, &query(1, "plain.example.", RecordType::A, None)).await?;
    ensure!(reply.rcode() == ResponseCode::NoError && reply.ips().len() == 4);
    let stats = proxy.handle.stats();
    ensure!(
        stats.observer_calls == 1 && stats.observer_overruns == 1,
        "{stats:?}"
    );
    ensure!(
        gate.finished.load(Ordering::SeqCst) == 0,
        "observer still running"
    );
    // The observer is not cancelled by the overrun: it finishes when it can.
    gate.open();
    eventually("observer finished", || {
        gate.finished.load(Ordering::SeqCst) == 1
    })
    .await?;
    let handle = proxy.handle.clone();
    eventually("name lock released", || handle.fqdn_names_in_flight() == 0).await?;

    let mut response = None;
    while let Ok(record) = receiver.try_recv() {
        if record.kind == DnsRecordKind::Response {
            response = Some(record);
        }
    }
    let response = response.context("response record")?;
    ensure!(
        response
            .error
            .as_deref()
            .is_some_and(|e| e.contains("deadline")),
        "{response}"
    );
    Ok(())
}

#[tokio::test]
async fn observer_calls_are_serialized_per_name() -> Result<()> {
    let upstream = AuthServer::start(cdn_zone()).await?;
    let observer = Arc::new(ConcurrencyObserver::default());
    let mut config = config(&upstream).with_observer(observer.clone());
    config.policy = policy(&[pattern("*")]);
    // Long enough that no answer is released early: every call runs to its end.
    config.fqdn.deadline = WAIT;
    let proxy = start_proxy(config).await?;

    let mut tasks = Vec::new();
    for i in 0..8u16 {
        let addr = proxy.addr;
        // Same name over both transports, plus another name in between.
        let qname = if i == 4 {
            "www.shop.example."
        } else {
            "plain.example."
        };
        tasks.push(tokio::spawn(async move {
            let message = query(i, qname, RecordType::A, None);
            if i % 2 == 0 {
                udp_ask(addr, &message).await
            } else {
                tcp_ask(addr, &message).await
            }
        }));
    }
    for task in tasks {
        let reply = task.await??;
        ensure!(reply.rcode() == ResponseCode::NoError);
    }
    let (calls, max) = observer.seen("plain.example.");
    ensure!(calls == 7, "{calls} calls");
    ensure!(max == 1, "{max} observer calls for one name ran at once");
    ensure!(observer.seen("www.shop.example.").0 == 1);
    ensure!(
        proxy.handle.fqdn_names_in_flight() == 0,
        "name locks cleaned up"
    );
    ensure!(proxy.handle.stats().observer_overruns == 0);
    Ok(())
}

#[tokio::test]
async fn records_for_queries_and_responses() -> Result<()> {
    let upstream = AuthServer::start(cdn_zone()).await?;
    let (records, mut receiver) = DnsLog::channel(64);
    let mut config = config(&upstream);
    config.policy = policy(&[pattern("*.shop.example")]);
    config.records = records;
    let proxy = start_proxy(config).await?;

    udp_ask(
        proxy.addr,
        &query(11, "www.shop.example.", RecordType::A, None),
    )
    .await?;
    tcp_ask(
        proxy.addr,
        &query(12, "denied.example.", RecordType::AAAA, None),
    )
    .await?;

    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(
            tokio::time::timeout(WAIT, receiver.recv())
                .await?
                .context("record channel closed")?,
        );
    }
    let (query_rec, response_rec, denied_rec) = (&got[0], &got[1], &got[2]);
    ensure!(
        query_rec.kind == DnsRecordKind::Query
            && query_rec.verdict == DnsVerdict::Forwarded
            && query_rec.qname == "www.shop.example."
            && query_rec.qtypes == ["A"]
            && query_rec.id == 11
            && query_rec.rule.is_some()
            && query_rec.destination == upstream.addr,
        "{query_rec:?}"
    );
    ensure!(
        response_rec.kind == DnsRecordKind::Response
            && response_rec.verdict == DnsVerdict::Forwarded
            && response_rec.rcode == Some(0)
            && response_rec.ips.len() == 2
            && response_rec.ttl == Some(90)
            && response_rec.rrtypes == ["CNAME", "CNAME", "A", "A"]
            && response_rec.latency.is_some()
            && response_rec.transport == DnsTransport::Udp,
        "{response_rec:?}"
    );
    ensure!(
        denied_rec.kind == DnsRecordKind::Query
            && denied_rec.verdict == DnsVerdict::Denied
            && denied_rec.rcode == Some(5)
            && denied_rec.qtypes == ["AAAA"]
            && denied_rec.transport == DnsTransport::Tcp,
        "{denied_rec:?}"
    );
    ensure!(
        receiver.try_recv().is_err(),
        "a denied query has no response record"
    );
    ensure!(proxy.handle.stats().records_dropped == 0);
    Ok(())
}

#[tokio::test]
async fn overload_gets_servfail_and_extra_tcp_clients_are_closed() -> Result<()> {
    let upstream = AuthServer::start(github_zone()).await?;
    upstream.state.silent.store(true, Ordering::SeqCst);
    let mut config = config(&upstream);
    config.policy = policy(&[pattern("*")]);
    config.max_concurrent_queries = 1;
    config.max_tcp_clients = 1;
    let proxy = start_proxy(config).await?;

    // The first query occupies the only slot while the upstream stays silent.
    let addr = proxy.addr;
    let first = tokio::spawn(async move {
        udp_query(
            addr,
            &query(1, "www.github.com.", RecordType::A, None),
            Duration::from_millis(100),
        )
        .await
    });
    eventually("first query upstream", || upstream.ids().len() == 1).await?;
    let second = udp_ask(
        proxy.addr,
        &query(2, "www.github.com.", RecordType::A, None),
    )
    .await?;
    ensure!(
        second.rcode() == ResponseCode::ServFail && second.id() == 2,
        "{second:?}"
    );
    ensure!(proxy.handle.stats().overloaded == 1);
    first.await??;

    // One TCP client is served; a second connection is closed without an answer.
    let mut kept = TcpClient::connect(proxy.addr).await?;
    kept.send(&query(3, "www.github.com.", RecordType::A, None))
        .await?;
    eventually("first TCP query upstream", || upstream.ids().len() == 2).await?;
    let mut extra = TcpClient::connect(proxy.addr).await?;
    let _ = extra
        .send(&query(4, "www.github.com.", RecordType::A, None))
        .await;
    ensure!(
        extra.recv().await.is_err(),
        "the extra connection is closed"
    );
    ensure!(proxy.handle.stats().tcp_clients_rejected == 1);
    Ok(())
}

#[tokio::test]
async fn shutdown_stops_serving() -> Result<()> {
    let upstream = AuthServer::start(github_zone()).await?;
    let mut config = config(&upstream);
    config.policy = policy(&[pattern("*")]);
    let proxy = membrane_l7proxy::dns::DnsProxy::bind(config).await?;
    let addr = proxy.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(proxy.serve(async move {
        let _ = stopped.await;
    }));
    let reply = udp_ask(addr, &query(1, "www.github.com.", RecordType::A, None)).await?;
    ensure!(reply.rcode() == ResponseCode::NoError);
    // An idle TCP client must not hold the shutdown up.
    let _idle = TcpClient::connect(addr).await?;
    let _ = stop.send(());
    tokio::time::timeout(WAIT, serving).await??;
    Ok(())
}
