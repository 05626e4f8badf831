//! `identity-gate`: lets a request through only when the client's security identity
//! (`source.identity`, the node's numeric identity of the sending endpoint) is in the
//! configured set; otherwise answers `403`. A request without a known identity is denied.
//!
//! Configuration: identities separated by commas, spaces or newlines, e.g. `1234, 5678`.

use std::collections::BTreeSet;

use membrane_filter_sdk::{
    Action, Error, Filter, Http, Reply, StreamFilter, register, source_identity,
};

struct IdentityGate {
    allowed: BTreeSet<u64>,
}

impl Filter for IdentityGate {
    type Stream = IdentityGateStream;

    fn configure(config: &[u8]) -> Result<Self, Error> {
        let text =
            std::str::from_utf8(config).map_err(|e| Error::Config(format!("not UTF-8: {e}")))?;
        let allowed = text
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<u64>()
                    .map_err(|e| Error::Config(format!("identity {s:?}: {e}")))
            })
            .collect::<Result<BTreeSet<u64>, Error>>()?;
        if allowed.is_empty() {
            return Err(Error::Config("no identity configured".into()));
        }
        Ok(IdentityGate { allowed })
    }

    fn new_stream(&self) -> IdentityGateStream {
        IdentityGateStream {
            allowed: self.allowed.clone(),
        }
    }
}

struct IdentityGateStream {
    allowed: BTreeSet<u64>,
}

impl StreamFilter for IdentityGateStream {
    fn on_request_headers(&mut self, _http: &Http, _end_of_stream: bool) -> Result<Action, Error> {
        match source_identity()? {
            Some(id) if self.allowed.contains(&id) => Ok(Action::Continue),
            other => {
                let who = other.map_or_else(|| "unknown".to_owned(), |id| id.to_string());
                Ok(Action::Reply(
                    Reply::new(403)
                        .header("content-type", "text/plain")
                        .body(format!("identity {who} is not allowed\n"))
                        .details("identity_gate"),
                ))
            }
        }
    }
}

register!(IdentityGate);
