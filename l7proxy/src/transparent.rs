//! Transparent listener sockets for flows the datapath redirects to the proxy.
//!
//! Owns the socket setup only: `IP_TRANSPARENT` (so the kernel hands us connections whose
//! destination is not a local address, after `bpf_sk_assign` or TPROXY picked our
//! listener) and reading the original destination back, which for a transparent socket is
//! simply the accepted socket's local address (cilium-semantics.md §3.3, Envoy's
//! `bpf_metadata.cc`). Setting `IP_TRANSPARENT` needs CAP_NET_ADMIN.
//!
//! Serving the connections these listeners accept (policy, identities, `SO_MARK`ed
//! upstream connections) is [`crate::redirect`]'s job.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpStream};

/// Listen backlog for transparent listeners: redirected connections arrive in bursts (a
/// whole node's pods behind one port).
const BACKLOG: i32 = 1024;

/// Binds a non-blocking TCP listener with `IP_TRANSPARENT` (IPv4 or IPv6 by `addr`) and
/// `SO_REUSEADDR` (a restarted proxy must get its port back while old connections linger in
/// TIME_WAIT). Must be called inside a tokio runtime.
pub fn bind_transparent(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    let with_context = |what: &str, error: io::Error| {
        io::Error::new(
            error.kind(),
            format!("transparent listener {addr}: {what}: {error}"),
        )
    };
    match addr {
        SocketAddr::V4(_) => socket.set_ip_transparent_v4(true),
        SocketAddr::V6(_) => socket.set_ip_transparent_v6(true),
    }
    .map_err(|e| with_context("setting IP_TRANSPARENT (needs CAP_NET_ADMIN)", e))?;
    socket
        .set_reuse_address(true)
        .map_err(|e| with_context("setting SO_REUSEADDR", e))?;
    socket
        .bind(&addr.into())
        .map_err(|e| with_context("bind", e))?;
    socket
        .listen(BACKLOG)
        .map_err(|e| with_context("listen", e))?;
    socket
        .set_nonblocking(true)
        .map_err(|e| with_context("setting O_NONBLOCK", e))?;
    TcpListener::from_std(socket.into())
}

/// The destination the client originally connected to: on a transparent socket, the
/// accepted connection's local address.
pub fn original_destination(stream: &TcpStream) -> io::Result<SocketAddr> {
    stream.local_addr()
}

/// Whether `IP_TRANSPARENT` is set on a listener (for diagnostics and tests).
pub fn is_transparent(listener: &TcpListener) -> io::Result<bool> {
    let socket = SockRef::from(listener);
    match listener.local_addr()? {
        SocketAddr::V4(_) => socket.ip_transparent_v4(),
        SocketAddr::V6(_) => socket.ip_transparent_v6(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs CAP_NET_ADMIN (the suite runs as root); fails loudly otherwise, never skips.
    #[tokio::test]
    async fn transparent_listener_has_the_option_and_reports_the_destination() {
        let listener = bind_transparent("127.0.0.1:0".parse().expect("addr")).unwrap_or_else(|e| {
            panic!("bind_transparent needs CAP_NET_ADMIN (run the suite as root): {e}")
        });
        assert!(is_transparent(&listener).expect("getsockopt IP_TRANSPARENT"));
        let addr = listener.local_addr().expect("local addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (accepted, peer) = listener.accept().await.expect("accept");
        assert_eq!(peer, client.local_addr().expect("client addr"));
        assert_eq!(original_destination(&accepted).expect("original dst"), addr);
    }

    #[tokio::test]
    async fn plain_listeners_are_not_transparent() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        assert!(!is_transparent(&listener).expect("getsockopt IP_TRANSPARENT"));
    }
}
