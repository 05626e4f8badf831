//! In-process harness for the proxy's end-to-end tests: a real upstream HTTP server that
//! counts and remembers what reached it, the standalone proxy in front of it, a raw TCP
//! client for byte-exact requests, and hyper HTTP/1 and HTTP/2 clients. Everything binds
//! 127.0.0.1 port 0; every wait is bounded by [`WAIT`].

#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use membrane_l7proxy::access::{AccessLog, AccessRecord};
use membrane_l7proxy::policy::{HttpPolicy, HttpRuleSpec};
use membrane_l7proxy::standalone::{StandaloneConfig, StandaloneProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Upper bound of every wait in these tests. Not a timing assertion: a healthy run finishes
/// each step in milliseconds; the bound only keeps a broken run from hanging.
pub const WAIT: Duration = Duration::from_secs(10);

/// What the upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub version: http::Version,
    pub headers: http::HeaderMap,
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub count: Arc<AtomicUsize>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen lock").clone()
    }
}

type UpBody = BoxBody<Bytes, hyper::Error>;

fn full(text: impl Into<Bytes>) -> UpBody {
    Full::new(text.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// Upstream behaviour by path: `/body-auth...` reads the whole request body, then echoes it
/// (an upstream that answers only after the body, so a filter can still answer instead);
/// `/echo` (and `/upper...`) streams the request body back frame
/// by frame, `/ws` accepts an upgrade and echoes bytes, `/redact...` answers
/// `top secret|, more secret|, the end` in three frames, `/check` answers 200 `alice` when
/// `x-token: good` and 401 otherwise (an authorization service for filter callouts), anything
/// else answers `ok METHOD TARGET`.
async fn upstream_service(
    count: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    mut request: Request<Incoming>,
) -> Result<Response<UpBody>, Infallible> {
    count.fetch_add(1, Ordering::SeqCst);
    seen.lock().expect("seen lock").push(Seen {
        method: request.method().to_string(),
        uri: request.uri().to_string(),
        version: request.version(),
        headers: request.headers().clone(),
    });
    let path = request.uri().path().to_owned();
    match path.as_str() {
        p if p.starts_with("/body-auth") => {
            let body = match request.into_body().collect().await {
                Ok(body) => body.to_bytes(),
                Err(_) => Bytes::from_static(b"body failed"),
            };
            Ok(Response::new(full(body)))
        }
        p if p == "/echo" || p.starts_with("/upper") => {
            Ok(Response::new(request.into_body().boxed()))
        }
        p if p.starts_with("/redact") => {
            let (mut tx, body) = http_body_util::channel::Channel::<Bytes, hyper::Error>::new(1);
            tokio::spawn(async move {
                for chunk in ["top secret|", ", more secret|", ", the end"] {
                    if tx.send_data(Bytes::from(chunk)).await.is_err() {
                        return;
                    }
                }
            });
            Ok(Response::new(body.boxed()))
        }
        "/check" => {
            let good = request
                .headers()
                .get("x-token")
                .is_some_and(|t| t.as_bytes() == b"good");
            Ok(Response::builder()
                .status(if good {
                    StatusCode::OK
                } else {
                    StatusCode::UNAUTHORIZED
                })
                .body(full(if good { "alice" } else { "no" }))
                .expect("check response"))
        }
        "/ws" if request.headers().contains_key(http::header::UPGRADE) => {
            let upgrade = hyper::upgrade::on(&mut request);
            tokio::spawn(async move {
                let Ok(upgraded) = upgrade.await else { return };
                let mut io = TokioIo::new(upgraded);
                let mut buf = [0u8; 1024];
                // Echo until the peer closes; bounded by the test's own lifetime.
                loop {
                    match io.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if io.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
            Ok(Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "Upgrade")
                .header("upgrade", "websocket")
                .body(full(""))
                .expect("101 response"))
        }
        _ => {
            let text = format!("ok {} {}", request.method(), request.uri());
            Ok(Response::builder()
                .header("x-upstream", "yes")
                .body(full(text))
                .expect("ok response"))
        }
    }
}

/// Starts the upstream (HTTP/1.1 only, like most backends behind a proxy).
pub async fn start_upstream() -> Result<Upstream> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let count = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (c, s) = (count.clone(), seen.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (c, s) = (c.clone(), s.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req| upstream_service(c.clone(), s.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    // Above the proxy's configurable limits, so those are what is tested.
                    .max_headers(500)
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    Ok(Upstream {
        addr,
        count,
        seen,
        task,
    })
}

pub struct Proxy {
    pub addr: SocketAddr,
    pub records: mpsc::Receiver<AccessRecord>,
    pub access: AccessLog,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Stops the proxy and waits (bounded) for `serve` to return.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .context("proxy did not stop")??;
        }
        Ok(())
    }

    /// Receives the next access record (bounded wait).
    pub async fn record(&mut self) -> Result<AccessRecord> {
        tokio::time::timeout(WAIT, self.records.recv())
            .await
            .context("no access record")?
            .context("record channel closed")
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

pub fn config(upstream: SocketAddr, policy: Option<HttpPolicy>) -> StandaloneConfig {
    let mut config = StandaloneConfig::new("127.0.0.1:0".parse().expect("addr"), upstream);
    config.policy = policy;
    config.connect_timeout = Duration::from_millis(500);
    config
}

pub async fn start_proxy_with(config: StandaloneConfig) -> Result<Proxy> {
    start_proxy_with_capacity(config, 256).await
}

/// Starts the proxy with an access-record channel of `capacity`.
pub async fn start_proxy_with_capacity(
    mut config: StandaloneConfig,
    capacity: usize,
) -> Result<Proxy> {
    let (access, records) = AccessLog::channel(capacity);
    config.access_log = access.clone();
    let proxy = StandaloneProxy::bind(config).await?;
    let addr = proxy.local_addr();
    let (shutdown, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(proxy.serve(async move {
        let _ = stopped.await;
    }));
    Ok(Proxy {
        addr,
        records,
        access,
        shutdown: Some(shutdown),
        task: Some(task),
    })
}

pub async fn start_proxy(upstream: SocketAddr, policy: Option<HttpPolicy>) -> Result<Proxy> {
    start_proxy_with(config(upstream, policy)).await
}

/// A policy allowing `GET /public.*` and anything under `/echo` or `/ws`.
pub fn sample_policy() -> HttpPolicy {
    HttpPolicy::compile(&[
        HttpRuleSpec {
            method: Some("GET".into()),
            path: Some("/public.*".into()),
            ..HttpRuleSpec::default()
        },
        HttpRuleSpec {
            path: Some("/(echo|ws)".into()),
            ..HttpRuleSpec::default()
        },
    ])
    .expect("sample policy compiles")
}

/// An HTTP/1.1 client connection (one TCP connection, reused across requests).
pub async fn h1_client<B>(addr: SocketAddr) -> Result<hyper::client::conn::http1::SendRequest<B>>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// An HTTP/2 prior-knowledge client connection.
pub async fn h2_client(
    addr: SocketAddr,
) -> Result<hyper::client::conn::http2::SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(addr).await?;
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

pub fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", "svc.test")
        .body(Full::new(Bytes::new()))
        .expect("request")
}

/// Sends a request and collects the response body (bounded).
pub async fn send_h1(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    request: Request<Full<Bytes>>,
) -> Result<(StatusCode, http::HeaderMap, String)> {
    tokio::time::timeout(WAIT, async {
        sender.ready().await?;
        let response = sender.send_request(request).await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok((
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&body).into_owned(),
        ))
    })
    .await
    .context("h1 request timed out")?
}

/// Writes `bytes` on a fresh connection and reads until the proxy closes it (bounded).
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(bytes).await?;
    read_to_close(&mut stream).await
}

pub async fn read_to_close(stream: &mut TcpStream) -> Result<String> {
    let mut out = Vec::new();
    let read = tokio::time::timeout(WAIT, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                // A reset after the reply still counts as "closed".
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    match read {
        Ok(result) => result?,
        Err(_) => bail!(
            "connection not closed; got so far: {:?}",
            String::from_utf8_lossy(&out)
        ),
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Reads until `needle` has arrived (bounded).
pub async fn read_until(stream: &mut TcpStream, needle: &str) -> Result<String> {
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&out).contains(needle) {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                bail!(
                    "closed before {needle:?}: {:?}",
                    String::from_utf8_lossy(&out)
                );
            }
            out.extend_from_slice(&buf[..n]);
        }
        Ok(())
    })
    .await
    .with_context(|| format!("waiting for {needle:?}"))??;
    Ok(String::from_utf8_lossy(&out).into_owned())
}
