//! Transparent UDP for the DNS proxy: the original destination of each redirected datagram
//! (`IP_ORIGDSTADDR`), and replies sent from that address.
//!
//! The datapath assigns a pod's DNS datagram (to, say, kube-dns at 10.200.0.53:53) to the
//! proxy's listening socket; the kernel reports where the datagram was going in an
//! `IP_ORIGDSTADDR` control message. The client expects the answer from that address and
//! port, so the proxy sends it from a socket bound there (`IP_TRANSPARENT` allows binding an
//! address that is not local; `SO_REUSEADDR` lets a restarting proxy bind it while the old
//! one still holds it). Such sockets never receive: the datapath assigns every redirected
//! UDP packet to the listener, and forwarded traffic to that address is routed, not
//! delivered locally. IPv4 only (the node is IPv4 today); other datagrams keep the
//! listener's address.

use std::collections::HashMap;
use std::io;
use std::mem::{MaybeUninit, size_of};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Receive buffer of a transparent UDP listener: a burst (or a proxy restart, while the
/// socket is held by the agent) queues here instead of being dropped. Root may exceed
/// `rmem_max` (`SO_RCVBUFFORCE`); otherwise the kernel caps it.
pub(crate) const LISTENER_RCVBUF: usize = 8 << 20;

/// At most this many reply sockets (one per DNS server address the pods use); past it the
/// table is cleared, which only costs re-binding.
const MAX_REPLY_SOCKETS: usize = 1024;

fn with_context(what: &str, error: io::Error) -> io::Error {
    io::Error::new(error.kind(), format!("{what}: {error}"))
}

/// Turns on `IP_RECVORIGDSTADDR` (and `IP_TRANSPARENT`) on a UDP socket.
pub(crate) fn enable_orig_dst(socket: &(impl AsRawFd + std::os::fd::AsFd)) -> io::Result<()> {
    let sock = SockRef::from(socket);
    sock.set_ip_transparent_v4(true)
        .map_err(|e| with_context("setting IP_TRANSPARENT (needs CAP_NET_ADMIN)", e))?;
    let one: libc::c_int = 1;
    // SAFETY: a valid fd, a pointer to a c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_IP,
            libc::IP_RECVORIGDSTADDR,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(with_context(
            "setting IP_RECVORIGDSTADDR",
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// A transparent UDP listener on `addr` (not yet registered with tokio).
pub(crate) fn bind_transparent_udp(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket
        .set_reuse_address(true)
        .map_err(|e| with_context("setting SO_REUSEADDR", e))?;
    enable_orig_dst(&socket)?;
    if socket.set_recv_buffer_size(LISTENER_RCVBUF).is_err() {
        tracing::debug!("SO_RCVBUF not raised; the kernel default stays");
    }
    force_rcvbuf(&socket);
    socket
        .bind(&addr.into())
        .map_err(|e| with_context("bind", e))?;
    socket
        .set_nonblocking(true)
        .map_err(|e| with_context("setting O_NONBLOCK", e))?;
    Ok(socket.into())
}

/// `SO_RCVBUFFORCE` as root, so the buffer is not capped by `net.core.rmem_max`.
fn force_rcvbuf(socket: &impl AsRawFd) {
    let size = LISTENER_RCVBUF as libc::c_int;
    // SAFETY: a valid fd, a pointer to a c_int and its size. Failure is harmless.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const size).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Receives one datagram: its length, the sender, and where it was going (when the
/// kernel reported it).
pub(crate) async fn recv_with_orig_dst(
    socket: &UdpSocket,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr, Option<SocketAddr>)> {
    socket
        .async_io(Interest::READABLE, || recvmsg_orig(socket.as_raw_fd(), buf))
        .await
}

fn recvmsg_orig(
    fd: libc::c_int,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr, Option<SocketAddr>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut name = MaybeUninit::<libc::sockaddr_storage>::zeroed();
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; 16];
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = name.as_mut_ptr().cast();
    msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<[u64; 16]>();
    // SAFETY: `msg` describes valid buffers of the sizes given.
    let n = unsafe { libc::recvmsg(fd, &raw mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled `name` (msg_namelen bytes) with the sender's address.
    let sender = unsafe { sockaddr_to_std(name.as_ptr().cast(), msg.msg_namelen) }
        .ok_or_else(|| io::Error::other("datagram from an address that is not IP"))?;
    let mut orig = None;
    // SAFETY: CMSG_* walk the control buffer the kernel filled (msg_controllen bytes).
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_IP && (*cmsg).cmsg_type == libc::IP_ORIGDSTADDR {
                let data = libc::CMSG_DATA(cmsg).cast::<libc::sockaddr_in>();
                let sin = std::ptr::read_unaligned(data);
                orig = Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                    u16::from_be(sin.sin_port),
                )));
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
    }
    Ok((n as usize, sender, orig))
}

/// # Safety
/// `addr` points to `len` readable bytes of a socket address.
unsafe fn sockaddr_to_std(addr: *const libc::sockaddr, len: libc::socklen_t) -> Option<SocketAddr> {
    // SAFETY: per the caller; the family decides the layout read.
    unsafe {
        match i32::from((*addr).sa_family) {
            libc::AF_INET if len as usize >= size_of::<libc::sockaddr_in>() => {
                let sin = std::ptr::read_unaligned(addr.cast::<libc::sockaddr_in>());
                Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                    u16::from_be(sin.sin_port),
                )))
            }
            libc::AF_INET6 if len as usize >= size_of::<libc::sockaddr_in6>() => {
                let sin6 = std::ptr::read_unaligned(addr.cast::<libc::sockaddr_in6>());
                Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                    sin6.sin6_addr.s6_addr.into(),
                    u16::from_be(sin6.sin6_port),
                    sin6.sin6_flowinfo,
                    sin6.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

/// Sockets bound to the original destinations, to send UDP replies from them.
#[derive(Default)]
pub(crate) struct ReplySockets {
    sockets: Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>,
}

impl ReplySockets {
    /// The reply socket for `from`, bound on first use. Must run inside a tokio runtime.
    pub(crate) fn get(&self, from: SocketAddr) -> io::Result<Arc<UdpSocket>> {
        let mut sockets = self.sockets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(socket) = sockets.get(&from) {
            return Ok(socket.clone());
        }
        if sockets.len() >= MAX_REPLY_SOCKETS {
            sockets.clear();
        }
        let socket = Socket::new(Domain::for_address(from), Type::DGRAM, Some(Protocol::UDP))?;
        socket
            .set_reuse_address(true)
            .map_err(|e| with_context("reply socket: SO_REUSEADDR", e))?;
        match from {
            SocketAddr::V4(_) => socket.set_ip_transparent_v4(true),
            SocketAddr::V6(_) => socket.set_ip_transparent_v6(true),
        }
        .map_err(|e| with_context("reply socket: IP_TRANSPARENT", e))?;
        socket
            .bind(&from.into())
            .map_err(|e| with_context(&format!("reply socket: bind {from}"), e))?;
        socket.set_nonblocking(true)?;
        let socket = Arc::new(UdpSocket::from_std(socket.into())?);
        sockets.insert(from, socket.clone());
        Ok(socket)
    }
}
