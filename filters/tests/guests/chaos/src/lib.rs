//! Test-only filter for `membrane-filters`' suite: misbehaves on request, by path.
//!
//! | path | behaviour |
//! |---|---|
//! | `/trap` | panics (a trap) |
//! | `/loop` | loops forever (deadline) |
//! | `/oom` | allocates 512 MiB (memory cap) |
//! | `/tier-b` | calls Tier B functions, reports their statuses in request headers |
//! | `/props` | copies properties into request headers |
//! | `/upper` | buffers the request body and upper-cases it |
//! | `/noop` | nothing (benchmark baseline) |
//! | `/h60` | 60 header operations (benchmark) |
//! | other | counts the request in a counter and a histogram |
//!
//! Every response gets `x-chaos-config: <plugin config>`.

use membrane_filter_sdk as sdk;
use sdk::{Action, Error, Filter, Http, Metric, StreamFilter, register};

const HEADER_NAMES: [&str; 20] = [
    "x-h0", "x-h1", "x-h2", "x-h3", "x-h4", "x-h5", "x-h6", "x-h7", "x-h8", "x-h9", "x-h10",
    "x-h11", "x-h12", "x-h13", "x-h14", "x-h15", "x-h16", "x-h17", "x-h18", "x-h19",
];
const BENCH_NAMES: [&str; 20] = [
    "x-b0", "x-b1", "x-b2", "x-b3", "x-b4", "x-b5", "x-b6", "x-b7", "x-b8", "x-b9", "x-b10",
    "x-b11", "x-b12", "x-b13", "x-b14", "x-b15", "x-b16", "x-b17", "x-b18", "x-b19",
];

struct Chaos {
    config: String,
}

impl Filter for Chaos {
    type Stream = ChaosStream;

    fn configure(config: &[u8]) -> Result<Self, Error> {
        let config = String::from_utf8_lossy(config).into_owned();
        if config == "reject" {
            return Err(Error::Config("asked to reject".into()));
        }
        Ok(Chaos { config })
    }

    fn new_stream(&self) -> ChaosStream {
        ChaosStream {
            config: self.config.clone(),
            upper: false,
        }
    }
}

struct ChaosStream {
    config: String,
    upper: bool,
}

fn status_name(r: Result<impl Sized, Error>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(Error::Host { status, .. }) => format!("{status:?}"),
        Err(e) => e.to_string(),
    }
}

impl StreamFilter for ChaosStream {
    fn on_request_headers(&mut self, http: &Http, _eos: bool) -> Result<Action, Error> {
        let path = http.path()?.unwrap_or_default();
        match path.as_str() {
            "/trap" => panic!("chaos: trap requested"),
            "/loop" => {
                let mut n = 0u64;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "/oom" => {
                let v = vec![1u8; 512 << 20];
                http.add_request_header("x-oom", &v.len().to_string())?;
            }
            "/tier-b" => {
                let call = sdk::dispatch_http_call(
                    "no-such-upstream",
                    &[(":method", "GET"), (":path", "/"), (":authority", "x")],
                    b"",
                    std::time::Duration::from_secs(1),
                );
                http.add_request_header("x-http-call", &status_name(call))?;
                let prop = sdk::property(&["no", "such", "property"]);
                http.add_request_header(
                    "x-property",
                    &match prop {
                        Ok(None) => "none".into(),
                        other => status_name(other),
                    },
                )?;
                let hist = Metric::histogram("chaos_latency")?;
                http.add_request_header("x-histogram-increment", &status_name(hist.increment(1)))?;
            }
            "/props" => {
                let id = sdk::source_identity()?.map_or("none".into(), |i| i.to_string());
                http.add_request_header("x-source-identity", &id)?;
                let did = sdk::destination_identity()?.map_or("none".into(), |i| i.to_string());
                http.add_request_header("x-destination-identity", &did)?;
                let labels = sdk::source_labels()?
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",");
                http.add_request_header("x-source-labels", &labels)?;
                let addr = sdk::source_address()?.unwrap_or_default();
                http.add_request_header("x-source-address", &addr)?;
                let ns = sdk::source_namespace()?.unwrap_or_default();
                let wl = sdk::source_workload()?.unwrap_or_default();
                http.add_request_header("x-source-workload", &format!("{ns}/{wl}"))?;
                let method = sdk::property(&["request", "method"])?.unwrap_or_default();
                http.add_request_header("x-request-method", &String::from_utf8_lossy(&method))?;
                let name = sdk::property(&["plugin_name"])?.unwrap_or_default();
                http.add_request_header("x-plugin-name", &String::from_utf8_lossy(&name))?;
            }
            "/upper" => self.upper = true,
            "/noop" => {}
            "/h60" => {
                // 60 header operations: 20 × (get, add, remove).
                for i in 0..20 {
                    let name = HEADER_NAMES[i];
                    let _ = http.request_header(name)?;
                    http.add_request_header(BENCH_NAMES[i], "v")?;
                    http.remove_request_header(name)?;
                }
            }
            _ => {
                Metric::counter("chaos_requests")?.increment(1)?;
                Metric::histogram("chaos_latency")?.record(42)?;
            }
        }
        Ok(Action::Continue)
    }

    fn on_request_body(&mut self, http: &Http, _size: usize, eos: bool) -> Result<Action, Error> {
        if !self.upper {
            return Ok(Action::Continue);
        }
        if !eos {
            return Ok(Action::Pause);
        }
        let body = http.request_body()?;
        http.set_request_body(&body.to_ascii_uppercase())?;
        Ok(Action::Continue)
    }

    fn on_response_headers(&mut self, http: &Http, _eos: bool) -> Result<Action, Error> {
        http.set_response_header("x-chaos-config", &self.config)?;
        Ok(Action::Continue)
    }
}

register!(Chaos);
