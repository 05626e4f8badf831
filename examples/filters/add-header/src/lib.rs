//! `add-header`: adds response headers taken from its configuration.
//!
//! Configuration: one `name: value` per line (blank lines and `#` comments ignored), e.g.
//!
//! ```text
//! x-powered-by: membrane
//! cache-control: no-store
//! ```

use membrane_filter_sdk::{Action, Error, Filter, Http, StreamFilter, register};

struct AddHeader {
    headers: Vec<(String, String)>,
}

impl Filter for AddHeader {
    type Stream = AddHeaderStream;

    fn configure(config: &[u8]) -> Result<Self, Error> {
        let text =
            std::str::from_utf8(config).map_err(|e| Error::Config(format!("not UTF-8: {e}")))?;
        let mut headers = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| Error::Config(format!("line {}: expected `name: value`", i + 1)))?;
            let name = name.trim();
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return Err(Error::Config(format!(
                    "line {}: bad header name {name:?}",
                    i + 1
                )));
            }
            headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
        }
        if headers.is_empty() {
            return Err(Error::Config("no header configured".into()));
        }
        Ok(AddHeader { headers })
    }

    fn new_stream(&self) -> AddHeaderStream {
        AddHeaderStream {
            headers: self.headers.clone(),
        }
    }
}

struct AddHeaderStream {
    headers: Vec<(String, String)>,
}

impl StreamFilter for AddHeaderStream {
    fn on_response_headers(&mut self, http: &Http, _end_of_stream: bool) -> Result<Action, Error> {
        for (name, value) in &self.headers {
            http.add_response_header(name, value)?;
        }
        Ok(Action::Continue)
    }
}

register!(AddHeader);
