//! The Hubble client: `membrane observe` and the lab's demo read flows through it from an
//! observer API (the agent's Unix socket by default), with Hubble's flags and output
//! formats.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use crate::CliFilterError;

/// Why `observe` could not show flows; each names the flag or the server.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error("{0} needs a value")]
    MissingValue(String),
    #[error("{flag}: {source}")]
    Number {
        flag: &'static str,
        #[source]
        source: std::num::ParseIntError,
    },
    #[error("unexpected argument `{0}` (filters are flags, e.g. --pod default/frontend)")]
    Unexpected(String),
    #[error("--output `{0}`: expected compact, dict, json or jsonpb")]
    Output(String),
    #[error("{0}")]
    Filter(#[source] CliFilterError),
    #[error("cannot start the client's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot reach the Hubble API at {}: {source} (is the agent running?)", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("GetFlows: {0}")]
    GetFlows(String),
}

/// `membrane observe [OPTIONS] [FILTER FLAGS...]`: flows from the agent's Hubble observer API,
/// Hubble's flags and output formats. Filter flags keep their command-line order (it
/// matters for `--not`), so they are parsed here rather than by clap.
/// `default_socket` is used without `--socket`.
pub fn observe(args: &[String], default_socket: &Path) -> Result<(), ObserveError> {
    use crate::{
        PrintOptions, filters_from_flags, printer,
        proto::observer::{GetFlowsRequest, observer_client::ObserverClient},
    };

    let mut socket: Option<PathBuf> = None;
    let mut number: Option<u64> = None;
    let (mut follow, mut first, mut all) = (false, false, false);
    let mut output = "compact".to_owned();
    let mut filters: Vec<(String, String)> = Vec::new();
    // Filter flags that take no value.
    const BARE: &[&str] = &[
        "--not",
        "--ipv4",
        "--ipv6",
        "-4",
        "-6",
        "-A",
        "--all-namespaces",
    ];
    let mut it = args.iter().peekable();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with('-') => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = |what: &str| -> Result<String, ObserveError> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => it
                    .next()
                    .cloned()
                    .ok_or_else(|| ObserveError::MissingValue(what.to_owned())),
            }
        };
        match flag.as_str() {
            "--socket" => socket = Some(PathBuf::from(value("--socket")?)),
            "--last" => {
                number = Some(
                    value("--last")?
                        .parse()
                        .map_err(|source| ObserveError::Number {
                            flag: "--last",
                            source,
                        })?,
                )
            }
            "--first" => {
                first = true;
                number =
                    Some(
                        value("--first")?
                            .parse()
                            .map_err(|source| ObserveError::Number {
                                flag: "--first",
                                source,
                            })?,
                    );
            }
            "--all" => all = true,
            "-f" | "--follow" => follow = true,
            "-o" | "--output" => output = value("--output")?,
            f if BARE.contains(&f) => filters.push((f.to_owned(), String::new())),
            f if f.starts_with('-') => {
                let v = value(f)?;
                filters.push((f.to_owned(), v));
            }
            other => return Err(ObserveError::Unexpected(other.to_owned())),
        }
    }
    if !matches!(output.as_str(), "compact" | "dict" | "json" | "jsonpb") {
        return Err(ObserveError::Output(output));
    }
    let observe_filters = filters_from_flags(filters.iter().map(|(f, v)| (f.as_str(), v.as_str())))
        .map_err(ObserveError::Filter)?;
    let number = if all {
        u64::MAX
    } else if follow && number.is_none() {
        0
    } else {
        number.unwrap_or(20)
    };
    let path = socket.unwrap_or_else(|| default_socket.to_owned());

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ObserveError::Runtime)?;
    runtime.block_on(async move {
        let connect_path = path.clone();
        let channel = tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = connect_path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .map_err(|source| ObserveError::Connect {
                path: path.clone(),
                source,
            })?;
        let mut client = ObserverClient::new(channel);
        let request = GetFlowsRequest {
            number,
            first,
            follow,
            whitelist: observe_filters.whitelist,
            blacklist: observe_filters.blacklist,
            ..GetFlowsRequest::default()
        };
        let mut stream = client
            .get_flows(request)
            .await
            .map_err(|e| ObserveError::GetFlows(e.message().to_owned()))?
            .into_inner();
        let opts = PrintOptions::default();
        let mut out = std::io::stdout().lock();
        while let Some(response) = tokio_stream::StreamExt::next(&mut stream).await {
            let response = response.map_err(|e| ObserveError::GetFlows(e.message().to_owned()))?;
            let written = match output.as_str() {
                "json" | "jsonpb" => writeln!(out, "{}", printer::json_line(&response)),
                "dict" => {
                    if let Some(crate::proto::observer::get_flows_response::ResponseTypes::Flow(
                        flow,
                    )) = &response.response_types
                    {
                        writeln!(out, "{}", printer::dict(flow, opts))
                    } else {
                        Ok(())
                    }
                }
                _ => {
                    if let Some(line) = printer::compact_response(&response, opts) {
                        writeln!(out, "{line}")
                    } else {
                        Ok(())
                    }
                }
            };
            // A closed pipe (`| head`) ends the output quietly.
            if written.is_err() {
                break;
            }
        }
        Ok::<(), ObserveError>(())
    })
}
