//! `deny-path`: answers `403` with a short body for requests whose path starts with one of the
//! configured prefixes; everything else passes.
//!
//! Configuration: one path prefix per line (blank lines and `#` comments ignored), e.g.
//!
//! ```text
//! /admin
//! /internal/
//! ```

use membrane_filter_sdk::{Action, Error, Filter, Http, Reply, StreamFilter, info, register};

struct DenyPath {
    prefixes: Vec<String>,
}

impl Filter for DenyPath {
    type Stream = DenyPathStream;

    fn configure(config: &[u8]) -> Result<Self, Error> {
        let text =
            std::str::from_utf8(config).map_err(|e| Error::Config(format!("not UTF-8: {e}")))?;
        let prefixes: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect();
        if let Some(bad) = prefixes.iter().find(|p| !p.starts_with('/')) {
            return Err(Error::Config(format!("prefix {bad:?} must start with '/'")));
        }
        if prefixes.is_empty() {
            return Err(Error::Config("no path prefix configured".into()));
        }
        Ok(DenyPath { prefixes })
    }

    fn new_stream(&self) -> DenyPathStream {
        DenyPathStream {
            prefixes: self.prefixes.clone(),
        }
    }
}

struct DenyPathStream {
    prefixes: Vec<String>,
}

impl StreamFilter for DenyPathStream {
    fn on_request_headers(&mut self, http: &Http, _end_of_stream: bool) -> Result<Action, Error> {
        let path = http.path()?.unwrap_or_default();
        let Some(prefix) = self.prefixes.iter().find(|p| path.starts_with(p.as_str())) else {
            return Ok(Action::Continue);
        };
        info!("denied {path} (prefix {prefix})");
        Ok(Action::Reply(
            Reply::new(403)
                .header("content-type", "text/plain")
                .body(format!("Access to {path} is denied by policy\n"))
                .details("deny_path"),
        ))
    }
}

register!(DenyPath);
