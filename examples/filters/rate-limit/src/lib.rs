//! `rate-limit`: a fixed-window request limit per client, counted in the host's shared data so
//! every instance of the filter (and every proxy worker) shares one budget per client.
//!
//! The client is its security identity (`source.identity`), or its address when the proxy
//! knows no identity (standalone mode). Over the limit: `429` + `retry-after` +
//! `rate limit exceeded\n`.
//!
//! Configuration: `<requests> per <seconds>s`, e.g. `100 per 60s`.

use membrane_filter_sdk::{
    Action, Error, Filter, Http, Reply, Status, StreamFilter, get_shared_data, now, register,
    set_shared_data, source_address, source_identity,
};

/// CAS retries before giving up on a hot key (then the request is let through: a counter
/// contended that hard is being updated, so the limit is enforced by the others).
const CAS_RETRIES: usize = 16;

struct RateLimit {
    limit: u64,
    window_secs: u64,
}

impl Filter for RateLimit {
    type Stream = RateLimitStream;

    fn configure(config: &[u8]) -> Result<Self, Error> {
        let text =
            std::str::from_utf8(config).map_err(|e| Error::Config(format!("not UTF-8: {e}")))?;
        let bad = || Error::Config(format!("expected `<requests> per <seconds>s`, got {text:?}"));
        let mut words = text.split_whitespace();
        let (Some(limit), Some("per"), Some(window), None) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            return Err(bad());
        };
        let limit: u64 = limit.parse().map_err(|_| bad())?;
        let window_secs: u64 = window
            .strip_suffix('s')
            .and_then(|w| w.parse().ok())
            .filter(|w| *w > 0)
            .ok_or_else(bad)?;
        Ok(RateLimit { limit, window_secs })
    }

    fn new_stream(&self) -> RateLimitStream {
        RateLimitStream {
            limit: self.limit,
            window_secs: self.window_secs,
        }
    }
}

struct RateLimitStream {
    limit: u64,
    window_secs: u64,
}

impl RateLimitStream {
    fn client() -> Result<String, Error> {
        if let Some(id) = source_identity()? {
            return Ok(format!("id:{id}"));
        }
        // The address without its port: one client, many connections.
        let addr = source_address()?.unwrap_or_default();
        let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
        Ok(format!("ip:{host}"))
    }
}

impl StreamFilter for RateLimitStream {
    fn on_request_headers(&mut self, _http: &Http, _eos: bool) -> Result<Action, Error> {
        let secs = now()?
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let window = secs / self.window_secs;
        let key = format!("rate-limit:{}:{window}", Self::client()?);
        for _ in 0..CAS_RETRIES {
            let (count, cas) = match get_shared_data(&key)? {
                Some((value, cas)) => (
                    std::str::from_utf8(&value)
                        .ok()
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0),
                    Some(cas),
                ),
                None => (0, None),
            };
            if count >= self.limit {
                let retry = (window + 1) * self.window_secs - secs;
                return Ok(Action::Reply(
                    Reply::new(429)
                        .header("content-type", "text/plain")
                        .header("retry-after", &retry.to_string())
                        .body("rate limit exceeded\n")
                        .details("rate_limited"),
                ));
            }
            match set_shared_data(&key, (count + 1).to_string().as_bytes(), cas) {
                Ok(()) => return Ok(Action::Continue),
                Err(Error::Host {
                    status: Status::CasMismatch,
                    ..
                }) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(Action::Continue)
    }
}

register!(RateLimit);
