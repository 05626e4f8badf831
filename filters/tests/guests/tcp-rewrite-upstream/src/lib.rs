//! A TCP (stream) filter written against the upstream proxy-wasm Rust SDK: it reads and
//! rewrites the bytes of a connection in both directions, as the SDK's stream contexts do in
//! Envoy's network filter chain.
//!
//! - On a new connection it logs `new connection from <source.address>`.
//! - Client → server: bytes are buffered until a line is complete (Pause keeps them, the
//!   callback sees them again with the next ones), then `ping` becomes `PING` (byte-wise:
//!   binary bytes before the lines pass unchanged); a line `quit` closes the connection
//!   (`proxy_close_stream`).
//! - Server → client: every chunk gets `[wasm]` prepended (`set_upstream_data(0, 0, ..)`).
//! - Closes are logged with the peer type.

use log::info;
use proxy_wasm::traits::{Context, StreamContext};
use proxy_wasm::types::{Action, LogLevel, PeerType};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_stream_context(|_, _| -> Box<dyn StreamContext> { Box::new(Rewrite) });
}}

struct Rewrite;

impl Context for Rewrite {}

impl StreamContext for Rewrite {
    fn on_new_connection(&mut self) -> Action {
        let source = self
            .get_property(vec!["source", "address"])
            .map(|a| String::from_utf8_lossy(&a).into_owned())
            .unwrap_or_default();
        info!("new connection from {source}");
        Action::Continue
    }

    fn on_downstream_data(&mut self, size: usize, end_of_stream: bool) -> Action {
        let data = self.get_downstream_data(0, size).unwrap_or_default();
        if !data.ends_with(b"\n") && !end_of_stream {
            return Action::Pause;
        }
        if data.split(|b| *b == b'\n').any(|line| line == b"quit") {
            info!("quit: closing");
            self.close_downstream();
            return Action::Continue;
        }
        // Byte-wise, so binary data (a TLS ClientHello before the lines) passes unchanged.
        let rewritten = replace(&data, b"ping", b"PING");
        self.set_downstream_data(0, size, &rewritten);
        Action::Continue
    }

    fn on_upstream_data(&mut self, size: usize, _end_of_stream: bool) -> Action {
        if size > 0 {
            self.set_upstream_data(0, 0, b"[wasm] ");
        }
        Action::Continue
    }

    fn on_downstream_close(&mut self, peer: PeerType) {
        info!("downstream closed by {}", peer_name(peer));
    }

    fn on_upstream_close(&mut self, peer: PeerType) {
        info!("upstream closed by {}", peer_name(peer));
    }
}

fn peer_name(peer: PeerType) -> &'static str {
    match peer {
        PeerType::Local => "local",
        PeerType::Remote => "remote",
        _ => "unknown",
    }
}

fn replace(data: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        if data[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(data[i]);
            i += 1;
        }
    }
    out
}
