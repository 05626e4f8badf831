//! `membrane-relay`'s command line. Whoever starts the relay (the lab, tests) fills this
//! struct and renders it with [`RelayArgs::to_args`], so a spawn cannot drift from the
//! parser. Option names follow Hubble Relay's configuration keys where one exists
//! (`peer-service`, `listen-address`, `sort-buffer-len-max`, `dial-timeout`, …), with the
//! unit in the name.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Hubble Relay's port.
pub const DEFAULT_LISTEN_ADDRESS: &str = "127.0.0.1:4245";
/// Flows held for ordering (Hubble Relay's `sort-buffer-len-max`).
pub const DEFAULT_SORT_BUFFER_LEN: usize = 100;
/// With nothing new for this long, held flows older than it are sent (Hubble Relay's
/// `sort-buffer-drain-timeout`, 1 s).
pub const DEFAULT_SORT_BUFFER_DRAIN_TIMEOUT_MS: u64 = 1_000;
/// Bound on connecting to a node or the Peer service (Hubble Relay's `dial-timeout`, 5 s).
pub const DEFAULT_DIAL_TIMEOUT_MS: u64 = 5_000;
/// Wait between reconnection attempts to an unreachable node (Hubble Relay's
/// `retry-timeout`, 30 s).
pub const DEFAULT_RETRY_TIMEOUT_MS: u64 = 30_000;
/// How often a connected node is asked for its status (Hubble Relay's health check, 5 s).
pub const DEFAULT_HEALTH_INTERVAL_MS: u64 = 5_000;
/// A node that sends nothing for this long in a request without `follow` is given up for
/// that request (NODE_ERROR), so one hung node never holds the answer back.
pub const DEFAULT_REQUEST_IDLE_TIMEOUT_MS: u64 = 10_000;

/// `membrane-relay`.
#[derive(Parser, Clone, Debug, PartialEq, Eq)]
#[command(
    name = "membrane-relay",
    version,
    about = "Hubble Relay for membrane: every node's flows through one observer API (4245)"
)]
pub struct RelayArgs {
    /// Hubble Peer services to discover the nodes through, tried in order until one answers:
    /// `host:port` or `unix:///path/hubble.sock` (every agent serves one).
    #[arg(long, value_name = "ADDR", value_delimiter = ',', required = true)]
    pub peer_service: Vec<String>,
    /// Where the relay serves `observer.Observer` and gRPC health.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_LISTEN_ADDRESS)]
    pub listen_address: SocketAddr,
    /// Prometheus metrics (`GET /metrics`) on this address; off unless given.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen_address: Option<SocketAddr>,
    /// Flows held to order the merged stream by time.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_SORT_BUFFER_LEN)]
    pub sort_buffer_len_max: usize,
    /// With nothing new for this long (milliseconds), held flows older than it are sent.
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_SORT_BUFFER_DRAIN_TIMEOUT_MS)]
    pub sort_buffer_drain_timeout_ms: u64,
    /// Bound on connecting to a node or a Peer service, milliseconds.
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_DIAL_TIMEOUT_MS)]
    pub dial_timeout_ms: u64,
    /// Wait between reconnection attempts to an unreachable node or Peer service, ms.
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_RETRY_TIMEOUT_MS)]
    pub retry_timeout_ms: u64,
    /// How often a connected node is asked for its status, milliseconds.
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_HEALTH_INTERVAL_MS)]
    pub health_interval_ms: u64,
    /// A node silent for this long (ms) in a request without follow is left out of it.
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_REQUEST_IDLE_TIMEOUT_MS)]
    pub request_idle_timeout_ms: u64,
    /// CA certificates (PEM) the nodes' observer certificates must chain to; turns on TLS
    /// to the nodes (each verified as `<node>.<cluster>.hubble-grpc.cilium.io` or the name
    /// its peer entry carries).
    #[arg(long, value_name = "FILE", value_delimiter = ',')]
    pub tls_hubble_server_ca_files: Vec<PathBuf>,
    /// The relay's client certificate (PEM) for mutual TLS to the nodes.
    #[arg(
        long,
        value_name = "FILE",
        requires_all = ["tls_client_key_file", "tls_hubble_server_ca_files"]
    )]
    pub tls_client_cert_file: Option<PathBuf>,
    /// The key of `--tls-client-cert-file` (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_client_cert_file")]
    pub tls_client_key_file: Option<PathBuf>,
}

impl RelayArgs {
    /// The defaults, discovering nodes through `peer_service`.
    pub fn new(peer_service: &str) -> Self {
        Self {
            peer_service: vec![peer_service.to_owned()],
            listen_address: DEFAULT_LISTEN_ADDRESS.parse().expect("a valid constant"),
            metrics_listen_address: None,
            sort_buffer_len_max: DEFAULT_SORT_BUFFER_LEN,
            sort_buffer_drain_timeout_ms: DEFAULT_SORT_BUFFER_DRAIN_TIMEOUT_MS,
            dial_timeout_ms: DEFAULT_DIAL_TIMEOUT_MS,
            retry_timeout_ms: DEFAULT_RETRY_TIMEOUT_MS,
            health_interval_ms: DEFAULT_HEALTH_INTERVAL_MS,
            request_idle_timeout_ms: DEFAULT_REQUEST_IDLE_TIMEOUT_MS,
            tls_hubble_server_ca_files: Vec::new(),
            tls_client_cert_file: None,
            tls_client_key_file: None,
        }
    }

    /// The arguments that make `membrane-relay` parse exactly `self`.
    pub fn to_args(&self) -> Vec<String> {
        let mut out = vec![
            "--peer-service".to_owned(),
            self.peer_service.join(","),
            "--listen-address".to_owned(),
            self.listen_address.to_string(),
            "--sort-buffer-len-max".to_owned(),
            self.sort_buffer_len_max.to_string(),
            "--sort-buffer-drain-timeout-ms".to_owned(),
            self.sort_buffer_drain_timeout_ms.to_string(),
            "--dial-timeout-ms".to_owned(),
            self.dial_timeout_ms.to_string(),
            "--retry-timeout-ms".to_owned(),
            self.retry_timeout_ms.to_string(),
            "--health-interval-ms".to_owned(),
            self.health_interval_ms.to_string(),
            "--request-idle-timeout-ms".to_owned(),
            self.request_idle_timeout_ms.to_string(),
        ];
        if let Some(addr) = self.metrics_listen_address {
            out.extend(["--metrics-listen-address".to_owned(), addr.to_string()]);
        }
        if !self.tls_hubble_server_ca_files.is_empty() {
            out.extend([
                "--tls-hubble-server-ca-files".to_owned(),
                self.tls_hubble_server_ca_files
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            ]);
        }
        for (flag, file) in [
            ("--tls-client-cert-file", &self.tls_client_cert_file),
            ("--tls-client-key-file", &self.tls_client_key_file),
        ] {
            if let Some(f) = file {
                out.extend([flag.to_owned(), f.display().to_string()]);
            }
        }
        out
    }

    pub fn sort_buffer_drain_timeout(&self) -> Duration {
        Duration::from_millis(self.sort_buffer_drain_timeout_ms)
    }

    pub fn dial_timeout(&self) -> Duration {
        Duration::from_millis(self.dial_timeout_ms)
    }

    pub fn retry_timeout(&self) -> Duration {
        Duration::from_millis(self.retry_timeout_ms)
    }

    pub fn health_interval(&self) -> Duration {
        Duration::from_millis(self.health_interval_ms)
    }

    pub fn request_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.request_idle_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: Vec<String>) -> RelayArgs {
        RelayArgs::try_parse_from(std::iter::once("membrane-relay".to_owned()).chain(args))
            .expect("parses")
    }

    #[test]
    fn to_args_parses_back() {
        let mut args = RelayArgs::new("127.0.0.1:4244");
        assert_eq!(parse(args.to_args()), args);
        args.peer_service
            .push("unix:///run/membrane/n2/hubble.sock".into());
        args.listen_address = "0.0.0.0:14245".parse().expect("addr");
        args.metrics_listen_address = Some("127.0.0.1:9966".parse().expect("addr"));
        args.sort_buffer_len_max = 7;
        args.retry_timeout_ms = 250;
        args.tls_hubble_server_ca_files = vec!["/a.pem".into(), "/b.pem".into()];
        args.tls_client_cert_file = Some("/c.pem".into());
        args.tls_client_key_file = Some("/k.pem".into());
        assert_eq!(parse(args.to_args()), args);
    }

    #[test]
    fn a_client_certificate_needs_its_key_and_a_ca() {
        let err = RelayArgs::try_parse_from([
            "membrane-relay",
            "--peer-service",
            "x:1",
            "--tls-client-cert-file",
            "/c.pem",
        ])
        .expect_err("refused");
        assert!(err.to_string().contains("--tls-client-key-file"), "{err}");
    }
}
