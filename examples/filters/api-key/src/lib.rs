//! `api-key`: API-key authentication keyed by the client's security identity. Each identity
//! has its own key; a request passes only if its `x-api-key` header equals the key of its
//! `source.identity`. A key presented from another identity is refused (a stolen key is
//! useless elsewhere). The header is removed before the request goes upstream.
//!
//! Missing or wrong key: `401` + `www-authenticate: ApiKey` + `invalid API key\n`; an identity
//! without a key (or an unknown identity): `403` + `identity <id> has no API key\n`.
//!
//! Configuration: one `<identity> <key>` per line, e.g. `1234 s3cr3t`.

use std::collections::HashMap;

use membrane_filter_sdk::{Action, Error, Filter, Http, Reply, StreamFilter, register, source_identity};

struct ApiKey {
    keys: HashMap<u64, String>,
}

impl Filter for ApiKey {
    type Stream = ApiKeyStream;

    fn configure(config: &[u8]) -> Result<Self, Error> {
        let text =
            std::str::from_utf8(config).map_err(|e| Error::Config(format!("not UTF-8: {e}")))?;
        let mut keys = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = || Error::Config(format!("line {}: expected `<identity> <key>`", i + 1));
            let (id, key) = line.split_once(char::is_whitespace).ok_or_else(bad)?;
            let id: u64 = id.parse().map_err(|_| bad())?;
            let key = key.trim();
            if key.is_empty() {
                return Err(bad());
            }
            keys.insert(id, key.to_owned());
        }
        if keys.is_empty() {
            return Err(Error::Config("no key configured".into()));
        }
        Ok(ApiKey { keys })
    }

    fn new_stream(&self) -> ApiKeyStream {
        ApiKeyStream {
            keys: self.keys.clone(),
        }
    }
}

struct ApiKeyStream {
    keys: HashMap<u64, String>,
}

/// Compares without an early exit, so the time taken does not reveal a key's prefix.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl StreamFilter for ApiKeyStream {
    fn on_request_headers(&mut self, http: &Http, _eos: bool) -> Result<Action, Error> {
        let identity = source_identity()?;
        let Some(expected) = identity.and_then(|id| self.keys.get(&id)) else {
            let who = identity.map_or_else(|| "unknown".to_owned(), |id| id.to_string());
            return Ok(Action::Reply(
                Reply::new(403)
                    .header("content-type", "text/plain")
                    .body(format!("identity {who} has no API key\n"))
                    .details("api_key_no_identity"),
            ));
        };
        let presented = http.request_header_bytes("x-api-key")?.unwrap_or_default();
        if !same(&presented, expected.as_bytes()) {
            return Ok(Action::Reply(
                Reply::new(401)
                    .header("content-type", "text/plain")
                    .header("www-authenticate", "ApiKey")
                    .body("invalid API key\n")
                    .details("api_key_invalid"),
            ));
        }
        http.remove_request_header("x-api-key")?;
        Ok(Action::Continue)
    }
}

register!(ApiKey);
