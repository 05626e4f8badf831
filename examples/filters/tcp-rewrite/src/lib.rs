//! `tcp-rewrite`: a TCP (stream) filter with membrane's SDK. Client lines are buffered until
//! complete and every configured `from=to` replacement is applied; a line that is exactly a
//! configured blocked word closes the connection; server bytes get the configured prefix.
//!
//! Configuration, one per line: `from=to` (replace), `block=<word>`, `prefix=<text>`.

use membrane_filter_sdk::{
    Connection, ConnectionFilter, Error, Peer, TcpAction, TcpFilter, info, register_tcp,
};

#[derive(Clone, Default)]
struct TcpRewrite {
    replace: Vec<(String, String)>,
    block: Vec<String>,
    prefix: String,
}

impl TcpFilter for TcpRewrite {
    type Connection = TcpRewrite;

    fn configure(config: &[u8]) -> Result<Self, Error> {
        let text = std::str::from_utf8(config).map_err(|e| Error::Config(e.to_string()))?;
        let mut out = TcpRewrite::default();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let Some((key, value)) = line.split_once('=') else {
                return Err(Error::Config(format!("expected from=to, got {line:?}")));
            };
            match key {
                "block" => out.block.push(value.to_owned()),
                "prefix" => out.prefix = value.to_owned(),
                from => out.replace.push((from.to_owned(), value.to_owned())),
            }
        }
        Ok(out)
    }

    fn new_connection(&self) -> TcpRewrite {
        self.clone()
    }
}

impl ConnectionFilter for TcpRewrite {
    fn on_new_connection(&mut self, conn: &Connection) -> Result<TcpAction, Error> {
        info!(
            "connection from {}",
            conn.source_address()?.unwrap_or_default()
        );
        Ok(TcpAction::Continue)
    }

    fn on_downstream_data(
        &mut self,
        conn: &Connection,
        _size: usize,
        end_of_stream: bool,
    ) -> Result<TcpAction, Error> {
        let data = conn.downstream_data()?;
        if !data.ends_with(b"\n") && !end_of_stream {
            return Ok(TcpAction::Pause); // wait for the rest of the line
        }
        let mut text = String::from_utf8_lossy(&data).into_owned();
        if text.lines().any(|l| self.block.iter().any(|b| b == l)) {
            info!("blocked line: closing");
            return Ok(TcpAction::Close);
        }
        for (from, to) in &self.replace {
            text = text.replace(from.as_str(), to);
        }
        conn.set_downstream_data(text.as_bytes())?;
        Ok(TcpAction::Continue)
    }

    fn on_upstream_data(
        &mut self,
        conn: &Connection,
        size: usize,
        _end_of_stream: bool,
    ) -> Result<TcpAction, Error> {
        if size > 0 && !self.prefix.is_empty() {
            conn.prepend_upstream_data(self.prefix.as_bytes())?;
        }
        Ok(TcpAction::Continue)
    }

    fn on_downstream_close(&mut self, _conn: &Connection, peer: Peer) {
        info!("client side closed ({peer:?})");
    }
}

register_tcp!(TcpRewrite);
