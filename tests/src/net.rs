//! Bounded real-socket clients and servers running inside a network namespace.
//!
//! Servers bind inside the namespace (the socket is created on a thread that entered it) and
//! then serve from an ordinary thread until their guard is dropped or their lifetime
//! ([`SERVER_LIFETIME`]) runs out. Every loop is bounded in count and time.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use membrane_datapath::Netns;

/// Upper bound on how long a test server runs.
pub const SERVER_LIFETIME: Duration = Duration::from_secs(120);
/// Upper bound on requests one server answers.
pub const SERVER_MAX_REQUESTS: u64 = 10_000;

/// A server thread; stopped and joined on drop.
pub struct ServerGuard {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
    pub addr: SocketAddrV4,
}

impl ServerGuard {
    /// Requests answered so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// Binds a TCP listener in `ns` (`prepare` may set socket options on it there) and serves
/// each accepted connection with `handle` on the server thread, until the guard is dropped or
/// the bounds ([`SERVER_LIFETIME`], [`SERVER_MAX_REQUESTS`]) are reached. `handle` returns
/// whether the connection counts as served.
fn tcp_server(
    ns: &Netns,
    addr: SocketAddrV4,
    prepare: impl FnOnce(&TcpListener) -> std::io::Result<()> + Send,
    handle: impl Fn(TcpStream, &AtomicBool) -> bool + Send + 'static,
) -> ServerGuard {
    let listener = ns
        .run(move || -> std::io::Result<TcpListener> {
            let listener = TcpListener::bind(addr)?;
            prepare(&listener)?;
            Ok(listener)
        })
        .and_then(|r| {
            r.map_err(|e| membrane_datapath::DatapathError::Invalid {
                what: "bind",
                detail: e.to_string(),
            })
        })
        .unwrap_or_else(|e| panic!("bind tcp {addr} in {}: {e}", ns.name()));
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let (stop2, served2) = (stop.clone(), served.clone());
    let handle = std::thread::spawn(move || {
        let deadline = Instant::now() + SERVER_LIFETIME;
        while !stop2.load(Ordering::Relaxed)
            && Instant::now() < deadline
            && served2.load(Ordering::Relaxed) < SERVER_MAX_REQUESTS
        {
            match listener.accept() {
                Ok((conn, _)) => {
                    let _ = conn.set_nonblocking(false);
                    if handle(conn, &stop2) {
                        served2.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    ServerGuard {
        stop,
        served,
        handle: Some(handle),
        addr,
    }
}

/// A TCP server in `ns` on `addr` that answers each connection's first message with
/// `"echo:" + message` and closes it.
pub fn tcp_echo_server(ns: &Netns, addr: SocketAddrV4) -> ServerGuard {
    tcp_server(
        ns,
        addr,
        |_| Ok(()),
        |mut conn, _| {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 512];
            match conn.read(&mut buf) {
                Ok(n) => {
                    let mut reply = b"echo:".to_vec();
                    reply.extend_from_slice(&buf[..n]);
                    let _ = conn.write_all(&reply);
                    true
                }
                Err(_) => false,
            }
        },
    )
}

/// A UDP server in `ns` on `addr` that answers each datagram with `"echo:" + datagram`.
pub fn udp_echo_server(ns: &Netns, addr: SocketAddrV4) -> ServerGuard {
    let socket = ns
        .run(move || UdpSocket::bind(addr))
        .and_then(|r| {
            r.map_err(|e| membrane_datapath::DatapathError::Invalid {
                what: "bind",
                detail: e.to_string(),
            })
        })
        .unwrap_or_else(|e| panic!("bind udp {addr} in {}: {e}", ns.name()));
    socket
        .set_read_timeout(Some(Duration::from_millis(20)))
        .expect("udp timeout");
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let (stop2, served2) = (stop.clone(), served.clone());
    let handle = std::thread::spawn(move || {
        let deadline = Instant::now() + SERVER_LIFETIME;
        let mut buf = [0u8; 512];
        while !stop2.load(Ordering::Relaxed)
            && Instant::now() < deadline
            && served2.load(Ordering::Relaxed) < SERVER_MAX_REQUESTS
        {
            if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                let mut reply = b"echo:".to_vec();
                reply.extend_from_slice(&buf[..n]);
                let _ = socket.send_to(&reply, peer);
                served2.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    ServerGuard {
        stop,
        served,
        handle: Some(handle),
        addr,
    }
}

/// Outcome of one client exchange.
#[derive(Debug, PartialEq, Eq)]
pub enum Exchange {
    /// The server's reply.
    Reply(Vec<u8>),
    /// No reply (connect or read timed out): what a dropped packet looks like.
    TimedOut,
    /// Any other error (refused, reset, ...), as text.
    Failed(String),
}

impl Exchange {
    pub fn is_reply(&self, expected: &[u8]) -> bool {
        matches!(self, Exchange::Reply(r) if r == expected)
    }
}

fn classify(e: &std::io::Error) -> Exchange {
    match e.kind() {
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => Exchange::TimedOut,
        _ => Exchange::Failed(e.to_string()),
    }
}

/// Connects from `ns` to `dst`, sends `msg`, reads the reply; all within `timeout`.
pub fn tcp_exchange(ns: &Netns, dst: SocketAddrV4, msg: &[u8], timeout: Duration) -> Exchange {
    let stream = match ns.run(move || TcpStream::connect_timeout(&SocketAddr::V4(dst), timeout)) {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return classify(&e),
        Err(e) => return Exchange::Failed(e.to_string()),
    };
    let mut stream = stream;
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    if let Err(e) = stream.write_all(msg) {
        return classify(&e);
    }
    let mut reply = Vec::new();
    match stream.read_to_end(&mut reply) {
        Ok(_) => Exchange::Reply(reply),
        Err(e) if !reply.is_empty() => {
            let _ = e;
            Exchange::Reply(reply)
        }
        Err(e) => classify(&e),
    }
}

/// Sends one datagram from `ns` to `dst` and waits up to `timeout` for the reply.
pub fn udp_exchange(ns: &Netns, dst: SocketAddrV4, msg: &[u8], timeout: Duration) -> Exchange {
    let socket = match ns.run(|| UdpSocket::bind("0.0.0.0:0")) {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Exchange::Failed(e.to_string()),
        Err(e) => return Exchange::Failed(e.to_string()),
    };
    let _ = socket.set_read_timeout(Some(timeout));
    if let Err(e) = socket.send_to(msg, dst) {
        return classify(&e);
    }
    let mut buf = [0u8; 512];
    match socket.recv_from(&mut buf) {
        Ok((n, _)) => Exchange::Reply(buf[..n].to_vec()),
        Err(e) => classify(&e),
    }
}

/// A transparent TCP listener in `ns` on `addr` (IP_TRANSPARENT, as the proxy's listeners
/// are): it accepts connections the datapath assigned to it whatever their destination, and
/// answers each with `"proxied to " + <the accepted socket's local address>`, which is the
/// connection's original destination.
pub fn transparent_tcp_server(ns: &Netns, addr: SocketAddrV4) -> ServerGuard {
    use std::os::fd::AsRawFd as _;
    let transparent = |listener: &TcpListener| {
        let one: libc::c_int = 1;
        // SAFETY: valid fd and a c_int option value of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                listener.as_raw_fd(),
                libc::SOL_IP,
                libc::IP_TRANSPARENT,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    tcp_server(ns, addr, transparent, |mut conn, _| {
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        let original = conn.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let mut buf = [0u8; 512];
        if conn.read(&mut buf).is_err() {
            return false;
        }
        let _ = conn.write_all(format!("proxied to {original}").as_bytes());
        true
    })
}

/// A TCP server in `ns` that streams `chunks` chunks of `chunk` bytes to each client, one
/// every `interval`, then closes.
pub fn tcp_stream_server(
    ns: &Netns,
    addr: SocketAddrV4,
    chunks: usize,
    chunk: usize,
    interval: Duration,
) -> ServerGuard {
    tcp_server(
        ns,
        addr,
        |_| Ok(()),
        move |mut conn, stop| {
            let data = vec![0x5a; chunk];
            for _ in 0..chunks {
                if stop.load(Ordering::Relaxed) || conn.write_all(&data).is_err() {
                    break;
                }
                std::thread::sleep(interval);
            }
            true
        },
    )
}
