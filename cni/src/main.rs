//! `membrane-cni`: run by the container runtime with the CNI environment and the network
//! configuration on stdin; prints the result (or the spec's error result) on stdout. Logs a
//! line per request on stderr (the runtime keeps or drops it).

use std::io::{Read as _, Write as _};

fn main() -> std::process::ExitCode {
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().take(1 << 20).read_to_end(&mut stdin) {
        eprintln!("membrane-cni: reading stdin: {e}");
    }
    let (out, failed) = membrane_cni::run(|k| std::env::var(k).ok(), &stdin);
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    let id = std::env::var("CNI_CONTAINERID").unwrap_or_default();
    if failed {
        eprintln!("membrane-cni {command} {id}: {out}");
    }
    let mut stdout = std::io::stdout();
    let _ = stdout.write_all(out.as_bytes());
    let _ = stdout.flush();
    if failed {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}
