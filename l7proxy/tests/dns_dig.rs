//! The DNS proxy seen by a real client: `dig` (ISC BIND's dnsutils) against the proxy in
//! front of the harness's authoritative server, on loopback.
//!
//! These tests need `dig` on the PATH. Without it they fail with an instruction to install
//! `dnsutils` (Debian) — they never pass silently.

mod dns_harness;

use std::process::Command;
use std::sync::atomic::Ordering;

use anyhow::{Context as _, Result, bail, ensure};
use dns_harness::*;
use membrane_l7proxy::dns::{DnsProxyConfig, StaticUpstream};

/// Runs `dig` with `args` against `server` (on a blocking thread: the proxy shares the
/// test's runtime). dig's own `+time`/`+tries` bound it; [`WAIT`] bounds the test.
async fn dig(server: std::net::SocketAddr, args: &[&str]) -> Result<String> {
    let mut command = Command::new("dig");
    command
        .arg(format!("@{}", server.ip()))
        .arg("-p")
        .arg(server.port().to_string())
        .args(["+time=3", "+tries=1"])
        .args(args);
    let output = tokio::time::timeout(WAIT, tokio::task::spawn_blocking(move || command.output()))
        .await
        .context("dig did not finish")??;
    let output = match output {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "`dig` is not installed: install the `dnsutils` package (apt-get install dnsutils); \
             these tests must not be skipped"
        ),
        Err(e) => return Err(e).context("running dig"),
    };
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    ensure!(
        output.status.success(),
        "dig {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(stdout)
}

fn status(output: &str) -> Option<&str> {
    let rest = &output[output.find("status: ")? + "status: ".len()..];
    rest.split(',').next()
}

/// Addresses in dig's ANSWER SECTION.
fn answer_ips(output: &str) -> Vec<String> {
    let Some(start) = output.find(";; ANSWER SECTION:") else {
        return Vec::new();
    };
    output[start..]
        .lines()
        .skip(1)
        .take_while(|line| !line.trim().is_empty())
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                [_, _, _, "A" | "AAAA", ip] => Some((*ip).to_owned()),
                _ => None,
            }
        })
        .collect()
}

async fn setup(zone: Zone) -> Result<(AuthServer, RunningProxy)> {
    let upstream = AuthServer::start(zone).await?;
    let mut config = DnsProxyConfig::new("127.0.0.1:0".parse()?, StaticUpstream(upstream.addr));
    config.policy = policy(&[pattern("*.github.com"), match_name("big.example")]);
    let proxy = start_proxy(config).await?;
    Ok((upstream, proxy))
}

fn zone() -> Zone {
    Zone::new()
        .cname("www.github.com.", 300, "github.map.example.")
        .a("github.map.example.", 60, "192.0.2.80")
        .a("github.com.", 60, "192.0.2.81")
        .many_a("big.example.", 60, 150)
}

#[tokio::test]
async fn dig_sees_answers_and_refusals_over_udp_and_tcp() -> Result<()> {
    let (_upstream, proxy) = setup(zone()).await?;
    for transport in ["+notcp", "+tcp"] {
        let allowed = dig(proxy.addr, &[transport, "WWW.GitHub.com", "A"]).await?;
        ensure!(status(&allowed) == Some("NOERROR"), "{allowed}");
        ensure!(answer_ips(&allowed) == ["192.0.2.80"], "{allowed}");
        ensure!(
            allowed.contains("github.map.example."),
            "CNAME shown: {allowed}"
        );

        let denied = dig(proxy.addr, &[transport, "github.com", "A"]).await?;
        ensure!(status(&denied) == Some("REFUSED"), "{denied}");
        ensure!(answer_ips(&denied).is_empty(), "{denied}");
    }
    Ok(())
}

#[tokio::test]
async fn dig_retries_a_truncated_answer_over_tcp() -> Result<()> {
    let (upstream, proxy) = setup(zone()).await?;
    // 150 A records (~2.4 KiB) do not fit dig's default EDNS size of 1232: the proxy
    // truncates, dig retries over TCP on the same port and gets everything.
    let output = dig(proxy.addr, &["big.example", "A"]).await?;
    ensure!(
        output.contains("Truncated, retrying in TCP mode"),
        "{output}"
    );
    ensure!(status(&output) == Some("NOERROR"), "{output}");
    ensure!(answer_ips(&output).len() == 150, "{output}");
    ensure!(proxy.handle.stats().truncated_for_client == 1);

    // The upstream truncating by itself: passed through, and dig's TCP retry works too.
    upstream.state.truncate_udp.store(true, Ordering::SeqCst);
    let output = dig(proxy.addr, &["www.github.com", "A"]).await?;
    ensure!(
        output.contains("Truncated, retrying in TCP mode"),
        "{output}"
    );
    ensure!(answer_ips(&output) == ["192.0.2.80"], "{output}");
    ensure!(
        upstream.tcp_connections() == 1,
        "one upstream connection for both retries"
    );
    Ok(())
}

#[tokio::test]
async fn dig_without_edns_gets_at_most_512_bytes() -> Result<()> {
    let (_upstream, proxy) = setup(zone()).await?;
    let output = dig(proxy.addr, &["+noedns", "+ignore", "big.example", "A"]).await?;
    ensure!(
        output.contains("flags: qr") && output.contains(" tc"),
        "{output}"
    );
    let size = output
        .lines()
        .find_map(|line| line.strip_prefix(";; MSG SIZE  rcvd: "))
        .context("dig prints the message size")?;
    let size: usize = size.trim().parse()?;
    ensure!(size <= 512, "{size} bytes over UDP without EDNS");
    Ok(())
}
