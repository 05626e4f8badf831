//! The lab's workloads as programs: the `membrane` CLI runs them (`membrane lab serve`,
//! `membrane lab dns-serve`) inside pod and world namespaces; the lab starts them by
//! rendering these argument structs, which the CLI embeds in its parser, so the two cannot
//! drift.

use std::{net::SocketAddr, path::PathBuf};

use clap::Args;

/// `membrane lab serve`: the lab's HTTP server.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct ServeArgs {
    #[arg(long)]
    pub port: u16,
    #[arg(long)]
    pub body: String,
    /// Answer 200 only under these path prefixes (404 otherwise).
    #[arg(long = "path-prefix")]
    pub paths: Vec<String>,
}

impl ServeArgs {
    /// The `membrane` arguments that run this server.
    pub fn to_args(&self) -> Vec<String> {
        let mut out = vec![
            "lab".into(),
            "serve".into(),
            "--port".into(),
            self.port.to_string(),
            "--body".into(),
            self.body.clone(),
        ];
        for p in &self.paths {
            out.extend(["--path-prefix".into(), p.clone()]);
        }
        out
    }
}

/// `membrane lab dns-serve`: the lab's cluster DNS.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct DnsServeArgs {
    #[arg(long)]
    pub zone: PathBuf,
    #[arg(long, default_value = "0.0.0.0:53")]
    pub listen: SocketAddr,
}

impl DnsServeArgs {
    /// The `membrane` arguments that run this server.
    pub fn to_args(&self) -> Vec<String> {
        vec![
            "lab".into(),
            "dns-serve".into(),
            "--zone".into(),
            self.zone.display().to_string(),
            "--listen".into(),
            self.listen.to_string(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Parser, Subcommand};

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Top,
    }
    #[derive(Subcommand)]
    enum Top {
        Lab {
            #[command(subcommand)]
            command: Lab,
        },
    }
    #[derive(Subcommand)]
    enum Lab {
        Serve(ServeArgs),
        DnsServe(DnsServeArgs),
    }

    #[test]
    fn renderings_parse_back() {
        let serve = ServeArgs {
            port: 8080,
            body: "hello from api".into(),
            paths: vec!["/public".into(), "/v1".into()],
        };
        let parsed =
            Cli::try_parse_from(std::iter::once("membrane".to_owned()).chain(serve.to_args()))
                .expect("parses");
        assert!(matches!(parsed.command, Top::Lab { command: Lab::Serve(s) } if s == serve));
        let dns = DnsServeArgs {
            zone: "/run/membrane/x/zone.json".into(),
            listen: "0.0.0.0:53".parse().expect("addr"),
        };
        let parsed =
            Cli::try_parse_from(std::iter::once("membrane".to_owned()).chain(dns.to_args()))
                .expect("parses");
        assert!(matches!(parsed.command, Top::Lab { command: Lab::DnsServe(d) } if d == dns));
    }
}
