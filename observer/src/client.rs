//! The Hubble client: `membrane observe` and the lab's demo read flows through it from an
//! observer API (the agent's Unix socket by default), with Hubble's flags and output
//! formats.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use crate::{CliFilterError, PrintOptions};

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
    #[error("--output `{0}`: expected compact, dict, json, jsonpb or table")]
    Output(String),
    #[error("--server `{0}`: expected host:port or unix:///path/to/hubble.sock")]
    Server(String),
    #[error("{0}")]
    Filter(#[source] CliFilterError),
    #[error("cannot start the client's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot reach the Hubble API at {target}: {source} (is the agent or relay running?)")]
    Connect {
        target: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("GetFlows: {0}")]
    GetFlows(String),
}

/// Where `observe` reads flows from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Server {
    /// The agent's Unix socket.
    Unix(PathBuf),
    /// `host:port` over TCP (a node's 4244, the relay's 4245).
    Tcp(String),
}

impl Server {
    /// `unix:///path`, `/path` or `host:port`.
    pub fn parse(text: &str) -> Result<Server, ObserveError> {
        if let Some(path) = text.strip_prefix("unix://") {
            return Ok(Server::Unix(PathBuf::from(path)));
        }
        if text.starts_with('/') {
            return Ok(Server::Unix(PathBuf::from(text)));
        }
        match text.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(Server::Tcp(text.to_owned()))
            }
            _ => Err(ObserveError::Server(text.to_owned())),
        }
    }

    fn describe(&self) -> String {
        match self {
            Server::Unix(p) => format!("unix://{}", p.display()),
            Server::Tcp(a) => a.clone(),
        }
    }
}

/// The command line of `observe`, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct ObserveArgs {
    pub server: Option<Server>,
    pub request: crate::proto::observer::GetFlowsRequest,
    pub output: String,
    pub print: PrintOptions,
}

/// Hubble's flags that take no value (the rest take one; a value-less flag must be listed
/// here or it would swallow the next argument).
const BARE: &[&str] = &[
    "--not",
    "--ipv4",
    "--ipv6",
    "-4",
    "-6",
    "-A",
    "--all-namespaces",
    "--from-all-namespaces",
    "--to-all-namespaces",
    "--encrypted",
    "--unencrypted",
];

/// Parses `observe`'s arguments: Hubble's flags, filter flags in command-line order (it
/// matters for `--not`), so they are parsed here rather than by clap.
pub fn parse_args(args: &[String]) -> Result<ObserveArgs, ObserveError> {
    use crate::{filters_from_flags, proto::observer::GetFlowsRequest};

    let mut server: Option<Server> = None;
    let mut number: Option<u64> = None;
    let (mut follow, mut first, mut all) = (false, false, false);
    let mut output = "compact".to_owned();
    let mut print = PrintOptions::default();
    let mut filters: Vec<(String, String)> = Vec::new();
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
        let mut count = |what: &'static str| -> Result<u64, ObserveError> {
            value(what)?
                .parse()
                .map_err(|source| ObserveError::Number { flag: what, source })
        };
        match flag.as_str() {
            "--socket" => server = Some(Server::Unix(PathBuf::from(value("--socket")?))),
            "--server" => server = Some(Server::parse(&value("--server")?)?),
            "--last" => number = Some(count("--last")?),
            "--first" => {
                first = true;
                number = Some(count("--first")?);
            }
            "--all" => all = true,
            "-f" | "--follow" => follow = true,
            "-o" | "--output" => output = value("--output")?,
            // Hubble's boolean flags also take `=true`/`=false`.
            "--print-node-name" => print.node_name = inline.as_deref() != Some("false"),
            f if BARE.contains(&f) => filters.push((f.to_owned(), String::new())),
            f if f.starts_with('-') => {
                let v = value(f)?;
                filters.push((f.to_owned(), v));
            }
            other => return Err(ObserveError::Unexpected(other.to_owned())),
        }
    }
    if !matches!(
        output.as_str(),
        "compact" | "dict" | "json" | "jsonpb" | "table"
    ) {
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
    Ok(ObserveArgs {
        server,
        request: GetFlowsRequest {
            number,
            first,
            follow,
            whitelist: observe_filters.whitelist,
            blacklist: observe_filters.blacklist,
            ..GetFlowsRequest::default()
        },
        output,
        print,
    })
}

/// `membrane observe [OPTIONS] [FILTER FLAGS...]`: flows from a Hubble observer API (the
/// agent's Unix socket by default; `--server host:port` for a node's TCP port or the
/// relay), Hubble's flags and output formats. `default_socket` is used without `--server`
/// or `--socket`.
pub fn observe(args: &[String], default_socket: &Path) -> Result<(), ObserveError> {
    use crate::{printer, proto::observer::observer_client::ObserverClient};

    let ObserveArgs {
        server,
        request,
        output,
        print: opts,
    } = parse_args(args)?;
    let server = server.unwrap_or_else(|| Server::Unix(default_socket.to_owned()));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ObserveError::Runtime)?;
    runtime.block_on(async move {
        let target = server.describe();
        let connected = match &server {
            Server::Unix(path) => {
                let path = path.clone();
                tonic::transport::Endpoint::from_static("http://localhost")
                    .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                                tokio::net::UnixStream::connect(path).await?,
                            ))
                        }
                    }))
                    .await
            }
            Server::Tcp(addr) => {
                match tonic::transport::Endpoint::from_shared(format!("http://{addr}")) {
                    Ok(endpoint) => endpoint.connect().await,
                    Err(_) => return Err(ObserveError::Server(addr.clone())),
                }
            }
        };
        let channel = connected.map_err(|source| ObserveError::Connect { target, source })?;
        let mut client = ObserverClient::new(channel);
        let follow = request.follow;
        let mut stream = client
            .get_flows(request)
            .await
            .map_err(|e| ObserveError::GetFlows(e.message().to_owned()))?
            .into_inner();
        let mut out = std::io::stdout().lock();
        // `-o table`: rows are aligned when the stream ends; a following stream prints each
        // row as it comes (aligned to the header only).
        let mut table = vec![printer::table_header(opts)];
        if output == "table" && follow {
            let _ = write!(out, "{}", printer::align_table(&table));
        }
        while let Some(response) = tokio_stream::StreamExt::next(&mut stream).await {
            let response = response.map_err(|e| ObserveError::GetFlows(e.message().to_owned()))?;
            let written = match output.as_str() {
                "json" | "jsonpb" => writeln!(out, "{}", printer::json_line(&response)),
                "table" => {
                    if let Some(crate::proto::observer::get_flows_response::ResponseTypes::Flow(
                        flow,
                    )) = &response.response_types
                    {
                        let row = printer::table_row(flow, opts);
                        if follow {
                            write!(
                                out,
                                "{}",
                                printer::align_table(&[table[0].clone(), row])
                                    .lines()
                                    .nth(1)
                                    .map(|l| format!("{l}\n"))
                                    .unwrap_or_default()
                            )
                        } else {
                            table.push(row);
                            Ok(())
                        }
                    } else {
                        Ok(())
                    }
                }
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
        if output == "table" && !follow {
            let _ = write!(out, "{}", printer::align_table(&table));
        }
        Ok::<(), ObserveError>(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn bare_flags_do_not_swallow_the_next_one() {
        let parsed = parse_args(&args(&[
            "--from-all-namespaces",
            "--verdict",
            "DROPPED",
            "--print-node-name",
            "-o",
            "table",
        ]))
        .expect("parses");
        assert!(parsed.print.node_name);
        assert_eq!(parsed.output, "table");
        assert_eq!(parsed.request.whitelist.len(), 1);
        assert_eq!(parsed.request.whitelist[0].source_pod, ["/"]);
        assert_eq!(parsed.request.whitelist[0].verdict, [2]);
        let parsed = parse_args(&args(&["--print-node-name=false", "--last", "3"])).expect("ok");
        assert!(!parsed.print.node_name);
        assert_eq!(parsed.request.number, 3);
    }

    #[test]
    fn servers() {
        assert_eq!(
            Server::parse("127.0.0.1:4245").expect("tcp"),
            Server::Tcp("127.0.0.1:4245".into())
        );
        assert_eq!(
            Server::parse("unix:///run/x.sock").expect("unix"),
            Server::Unix("/run/x.sock".into())
        );
        assert!(Server::parse("nonsense").is_err());
        let parsed = parse_args(&args(&["--server", "localhost:4245"])).expect("ok");
        assert_eq!(parsed.server, Some(Server::Tcp("localhost:4245".into())));
    }

    #[test]
    fn tables_align() {
        let rows = vec![
            vec!["A".to_owned(), "BB".to_owned(), "C".to_owned()],
            vec!["AAA".to_owned(), "B".to_owned(), "CCCC".to_owned()],
        ];
        assert_eq!(
            crate::printer::align_table(&rows),
            "A    BB  C\nAAA  B   CCCC\n"
        );
    }
}
