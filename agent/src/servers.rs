//! The agent's servers besides its API: Hubble's observer and Peer APIs (a Unix socket in
//! the run directory, TCP 4244 inside the node namespace and, with `--hubble-listen`, an
//! address of the host's namespace), the flow page on the host's loopback,
//! and Prometheus metrics (9965 inside the node namespace). Each stops with the process's
//! shutdown signal.

use std::{io::Write as _, time::Duration};

use membrane_agent_api::shutdown::Shutdown;
use membrane_datapath::Netns;
use membrane_observer::{Observer, PeerService, PeerSet};
use tokio::sync::watch;

use crate::{
    config::AgentConfig,
    error::{AgentError, dp_err, io_err},
};

/// Starts every server `config` asks for on `runtime` (metrics on a thread of its own).
pub(crate) fn start(
    runtime: &tokio::runtime::Runtime,
    config: &AgentConfig,
    observer: &Observer,
    listeners: Listeners,
    peers: watch::Receiver<PeerSet>,
    shutdown: &Shutdown,
) -> Result<(), AgentError> {
    let Listeners {
        ui: ui_listener,
        hubble: hubble_listener,
    } = listeners;
    let peers = PeerService::new(peers);
    // Hubble's observer API: a Unix socket, and TCP inside the node namespace.
    let stopped = |shutdown: Shutdown| async move {
        let _ = tokio::task::spawn_blocking(move || shutdown.wait()).await;
    };
    {
        let _context = runtime.enter();
        let hubble_socket = config.run_dir().hubble_socket();
        let listener =
            membrane_observer::bind_unix(&hubble_socket).map_err(|source| AgentError::Hubble {
                path: hubble_socket.clone(),
                source,
            })?;
        let (obs, done, p) = (observer.clone(), stopped(shutdown.clone()), peers.clone());
        runtime.spawn(async move {
            if let Err(e) =
                membrane_observer::serve_unix_with_peers(&obs, Some(p), listener, done).await
            {
                tracing::error!(error = %e, "Hubble API on the Unix socket stopped");
            }
        });
        if let Some(bound) = hubble_listener {
            let listener = tokio::net::TcpListener::from_std(bound)
                .map_err(io_err("Hubble listener (--hubble-listen)"))?;
            let (obs, done, p) = (observer.clone(), stopped(shutdown.clone()), peers.clone());
            runtime.spawn(async move {
                if let Err(e) =
                    membrane_observer::serve_tcp_with_peers(&obs, Some(p), listener, done).await
                {
                    tracing::error!(error = %e, "Hubble API on --hubble-listen stopped");
                }
            });
        }
        if let Some(port) = config.hubble_port {
            let bound = node_listener(&config.node_netns, port)?;
            let listener =
                tokio::net::TcpListener::from_std(bound).map_err(io_err("Hubble TCP listener"))?;
            let (obs, done, p) = (observer.clone(), stopped(shutdown.clone()), peers.clone());
            runtime.spawn(async move {
                if let Err(e) =
                    membrane_observer::serve_tcp_with_peers(&obs, Some(p), listener, done).await
                {
                    tracing::error!(error = %e, "Hubble API on TCP stopped");
                }
            });
        }
    }
    if let Some(listener) = ui_listener {
        let _context = runtime.enter();
        let listener =
            tokio::net::TcpListener::from_std(listener).map_err(io_err("UI listener"))?;
        let (obs, done) = (observer.clone(), stopped(shutdown.clone()));
        runtime.spawn(membrane_observer::serve_ui(
            obs,
            listener,
            membrane_observer::UiLimits::default(),
            done,
        ));
    }
    if let Some(port) = config.metrics_port {
        let listener = node_listener(&config.node_netns, port)?;
        let (obs, shutdown) = (observer.clone(), shutdown.clone());
        std::thread::spawn(move || serve_metrics(listener, &obs, &shutdown));
    }
    Ok(())
}

/// Listeners bound before the datapath is touched, so a taken port fails the start early.
pub(crate) struct Listeners {
    /// The flow page ([`bind_ui`]).
    pub ui: Option<std::net::TcpListener>,
    /// Hubble on the host's namespace ([`bind_hubble`]).
    pub hubble: Option<std::net::TcpListener>,
}

/// Binds `--hubble-listen` in the host's namespace and records the bound address in
/// `config` (port 0 becomes the port the kernel chose), which the node then registers in
/// the cluster store for the relay.
pub(crate) fn bind_hubble(
    config: &mut AgentConfig,
) -> Result<Option<std::net::TcpListener>, AgentError> {
    let Some(addr) = config.hubble_listen else {
        return Ok(None);
    };
    let listener = std::net::TcpListener::bind(addr).map_err(io_err(format!(
        "bind the Hubble API to {addr} (--hubble-listen)"
    )))?;
    listener
        .set_nonblocking(true)
        .map_err(io_err("Hubble listener"))?;
    let bound = listener
        .local_addr()
        .map_err(io_err("the Hubble listener's address"))?;
    config.hubble_listen = Some(bound);
    tracing::info!(%bound, "Hubble API (observer and peers) serving on the host's namespace");
    Ok(Some(listener))
}

/// A TCP listener on `0.0.0.0:port` inside the node namespace (reachable from the node and
/// its pods, never from the host's own namespace).
fn node_listener(node: &str, port: u16) -> Result<std::net::TcpListener, AgentError> {
    let ns = Netns::open(node).map_err(dp_err("open the node namespace"))?;
    let listener = ns
        .run(move || std::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, port)))
        .map_err(dp_err("enter the node namespace"))?
        .map_err(io_err(format!("bind 0.0.0.0:{port} in {node}")))?;
    listener.set_nonblocking(true).map_err(io_err("listener"))?;
    Ok(listener)
}

/// The flow page's listener, bound (or taken over) first so a taken port fails the start
/// before the datapath is touched. Loopback only: the page has no authentication. The bound
/// address goes to `ui-addr` in the state directory (how `membrane lab up` finds its URL).
pub(crate) fn bind_ui(config: &AgentConfig) -> Result<Option<std::net::TcpListener>, AgentError> {
    use std::os::fd::FromRawFd as _;
    let file = config.run_dir().ui_addr();
    let _ = std::fs::remove_file(&file);
    let listener = match (config.ui_listen_fd, config.ui_listen) {
        (Some(fd), _) => {
            // SAFETY: the parent handed this descriptor over for the flow page and does not
            // use it; nothing else in this process owns it. A descriptor that is not a TCP
            // socket fails `local_addr` below.
            unsafe { std::net::TcpListener::from_raw_fd(fd) }
        }
        (None, Some(addr)) => std::net::TcpListener::bind(addr)
            .map_err(io_err(format!("bind the flow page to {addr}")))?,
        (None, None) => return Ok(None),
    };
    let bound = listener
        .local_addr()
        .map_err(io_err("the flow page's listener (--ui-listen-fd)"))?;
    if !bound.ip().is_loopback() {
        return Err(AgentError::UiNotLoopback(bound));
    }
    listener
        .set_nonblocking(true)
        .map_err(io_err("UI listener"))?;
    std::fs::write(&file, format!("{bound}\n"))
        .map_err(io_err(format!("write {}", file.display())))?;
    tracing::info!(url = %format!("http://{bound}/ui"), "flow page serving");
    Ok(Some(listener))
}

/// Prometheus text on `GET /metrics`, one short-lived connection at a time.
fn serve_metrics(listener: std::net::TcpListener, observer: &Observer, shutdown: &Shutdown) {
    use std::io::Read as _;
    while !shutdown.is_triggered() {
        let Ok((mut conn, _)) = listener.accept() else {
            // A scrape every few seconds: polling the nonblocking listener costs nothing,
            // and the wait ends at once on shutdown.
            shutdown.wait_timeout(Duration::from_millis(50));
            continue;
        };
        let _ = conn.set_nonblocking(false);
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        let mut buf = [0u8; 2048];
        let n = conn.read(&mut buf).unwrap_or(0);
        let request = String::from_utf8_lossy(&buf[..n]);
        let (status, body) = if request.starts_with("GET /metrics") {
            ("200 OK", observer.render_metrics())
        } else {
            ("404 Not Found", "only /metrics is served here\n".to_owned())
        };
        let _ = conn.write_all(
            format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
    }
}
