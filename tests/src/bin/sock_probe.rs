//! `membrane-sock-probe CGROUP NETNS OP ADDR:PORT [ARG]`: a socket client for the socket-LB
//! tests. It moves itself into the cgroup `CGROUP` (a directory the test created) and the
//! network namespace `NETNS` *before* creating any socket, so only this process is subject
//! to the programs under test, then runs one bounded operation and prints `key=value` lines:
//!
//! - `tcp ADDR:PORT` — connect, print `peer=` (getpeername), read the server's tag
//!   (`reply=`); a failed connect prints `errno=`.
//! - `tcp-many ADDR:PORT N` — N sequential connections, one `reply=` line each.
//! - `udp ADDR:PORT` — unconnected: sendto, recvfrom; prints `from=` and `reply=`.
//! - `udp-connected ADDR:PORT` — connect, print `peer=`, send, recv (`reply=`).
//! - `bind ADDR:PORT` — TCP bind; prints `bound` or `errno=`.
//!
//! Every socket has 2 s timeouts; the process never outlives them by much.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    time::Duration,
};

const TIMEOUT: Duration = Duration::from_secs(2);

fn fail(msg: String) -> ! {
    eprintln!("membrane-sock-probe: {msg}");
    std::process::exit(2)
}

fn enter(cgroup: &str, netns: &str) {
    let procs = format!("{cgroup}/cgroup.procs");
    if let Err(e) = std::fs::write(&procs, std::process::id().to_string()) {
        fail(format!("join cgroup {procs}: {e}"));
    }
    let path = format!("/run/netns/{netns}");
    let ns = std::fs::File::open(&path).unwrap_or_else(|e| fail(format!("open {path}: {e}")));
    // SAFETY: a valid namespace fd; this process is single-threaded.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        fail(format!("setns {path}: {}", std::io::Error::last_os_error()));
    }
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

fn tcp_once(addr: SocketAddrV4) {
    let stream = match TcpStream::connect_timeout(&SocketAddr::V4(addr), TIMEOUT) {
        Ok(s) => s,
        Err(e) => {
            println!("errno={}", errno(&e));
            return;
        }
    };
    match stream.peer_addr() {
        Ok(p) => println!("peer={p}"),
        Err(e) => println!("peer_errno={}", errno(&e)),
    }
    let _ = stream.set_read_timeout(Some(TIMEOUT));
    let mut stream = stream;
    let _ = stream.write_all(b"hi");
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(n) => println!("reply={}", String::from_utf8_lossy(&buf[..n])),
        Err(e) => println!("read_errno={}", errno(&e)),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        fail("usage: membrane-sock-probe CGROUP NETNS OP ADDR:PORT [ARG]".into());
    }
    enter(&args[1], &args[2]);
    let addr: SocketAddrV4 = args[4]
        .parse()
        .unwrap_or_else(|e| fail(format!("address {}: {e}", args[4])));
    match args[3].as_str() {
        "tcp" => tcp_once(addr),
        "tcp-many" => {
            let n: u32 = args
                .get(5)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| fail("tcp-many needs a count".into()));
            for _ in 0..n.min(1000) {
                tcp_once(addr);
            }
        }
        "udp" => {
            let socket =
                UdpSocket::bind("0.0.0.0:0").unwrap_or_else(|e| fail(format!("bind: {e}")));
            let _ = socket.set_read_timeout(Some(TIMEOUT));
            if let Err(e) = socket.send_to(b"hi", addr) {
                println!("errno={}", errno(&e));
                return;
            }
            let mut buf = [0u8; 64];
            match socket.recv_from(&mut buf) {
                Ok((n, from)) => {
                    println!("from={from}");
                    println!("reply={}", String::from_utf8_lossy(&buf[..n]));
                }
                Err(e) => println!("read_errno={}", errno(&e)),
            }
        }
        "udp-connected" => {
            let socket =
                UdpSocket::bind("0.0.0.0:0").unwrap_or_else(|e| fail(format!("bind: {e}")));
            let _ = socket.set_read_timeout(Some(TIMEOUT));
            if let Err(e) = socket.connect(addr) {
                println!("errno={}", errno(&e));
                return;
            }
            match socket.peer_addr() {
                Ok(p) => println!("peer={p}"),
                Err(e) => println!("peer_errno={}", errno(&e)),
            }
            let _ = socket.send(b"hi");
            let mut buf = [0u8; 64];
            match socket.recv(&mut buf) {
                Ok(n) => println!("reply={}", String::from_utf8_lossy(&buf[..n])),
                Err(e) => println!("read_errno={}", errno(&e)),
            }
        }
        "bind" => match std::net::TcpListener::bind(addr) {
            Ok(_) => println!("bound"),
            Err(e) => println!("errno={}", errno(&e)),
        },
        other => fail(format!("unknown op {other}")),
    }
}
