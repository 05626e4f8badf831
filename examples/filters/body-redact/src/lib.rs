//! `body-redact`: masks configured words in response bodies (each character becomes `*`, so
//! the length is unchanged). The body is buffered until its end (Pause on each chunk), so a
//! word split across chunks is still found; `content-length` stays valid.
//!
//! Configuration: one word per line (blank lines and `#` comments ignored), e.g.
//!
//! ```text
//! password
//! 4111-1111-1111-1111
//! ```

use membrane_filter_sdk::{Action, Error, Filter, Http, StreamFilter, register};

struct BodyRedact {
    words: Vec<Vec<u8>>,
}

impl Filter for BodyRedact {
    type Stream = BodyRedactStream;

    fn configure(config: &[u8]) -> Result<Self, Error> {
        let text =
            std::str::from_utf8(config).map_err(|e| Error::Config(format!("not UTF-8: {e}")))?;
        let words: Vec<Vec<u8>> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| l.as_bytes().to_vec())
            .collect();
        if words.is_empty() {
            return Err(Error::Config("no word to redact".into()));
        }
        Ok(BodyRedact { words })
    }

    fn new_stream(&self) -> BodyRedactStream {
        BodyRedactStream {
            words: self.words.clone(),
        }
    }
}

struct BodyRedactStream {
    words: Vec<Vec<u8>>,
}

/// Replaces every occurrence of each word in `body` with `*`s; returns whether any was found.
fn redact(body: &mut [u8], words: &[Vec<u8>]) -> bool {
    let mut changed = false;
    for word in words {
        let mut i = 0;
        while i + word.len() <= body.len() {
            if body[i..i + word.len()] == word[..] {
                body[i..i + word.len()].fill(b'*');
                changed = true;
                i += word.len();
            } else {
                i += 1;
            }
        }
    }
    changed
}

impl StreamFilter for BodyRedactStream {
    fn on_response_body(&mut self, http: &Http, _size: usize, eos: bool) -> Result<Action, Error> {
        if !eos {
            return Ok(Action::Pause);
        }
        let mut body = http.response_body()?;
        if redact(&mut body, &self.words) {
            http.set_response_body(&body)?;
        }
        Ok(Action::Continue)
    }
}

register!(BodyRedact);
