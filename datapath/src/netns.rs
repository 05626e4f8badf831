//! Named network namespaces (`/run/netns/NAME`, the `ip netns` convention) and running code
//! inside one.
//!
//! [`Netns::run`] executes a closure on a fresh thread that has `setns(2)`-ed into the
//! namespace: sockets created there belong to that namespace and may then be used from any
//! thread; netlink and bpf-link attachments resolve interface indexes there. The calling
//! thread never changes namespace, so nothing here can touch the root namespace by accident.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Command, Output},
};

use crate::error::{DatapathError, Result};

/// Directory where `ip netns` keeps its bind mounts.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// A named network namespace. Dropping it does not delete it; call [`Netns::delete`]
/// (test code wraps it in an RAII guard).
#[derive(Debug, Clone)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace `name` (fails if it exists) and brings its loopback up.
    pub fn create(name: &str) -> Result<Self> {
        validate_name(name)?;
        run_command("ip", &["netns", "add", name])?;
        let ns = Self {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// An existing namespace.
    pub fn open(name: &str) -> Result<Self> {
        validate_name(name)?;
        let ns = Self {
            name: name.to_owned(),
        };
        if !ns.path().exists() {
            return Err(DatapathError::Netns {
                netns: name.to_owned(),
                what: "open".into(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        Ok(ns)
    }

    pub fn exists(name: &str) -> bool {
        PathBuf::from(NETNS_RUN_DIR).join(name).exists()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_RUN_DIR).join(&self.name)
    }

    /// Runs `f` on a thread inside this namespace and returns its result.
    pub fn run<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let file = File::open(self.path()).map_err(|source| DatapathError::Netns {
            netns: self.name.clone(),
            what: "open".into(),
            source,
        })?;
        std::thread::scope(|scope| {
            let handle = scope.spawn(move || {
                // SAFETY: `file` is an open namespace file; setns only affects this thread.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(f())
            });
            match handle.join() {
                Ok(result) => result.map_err(|source| DatapathError::Netns {
                    netns: self.name.clone(),
                    what: "setns".into(),
                    source,
                }),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// `ip -n NAME ARGS...`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run_command("ip", &full)
    }

    /// Writes a sysctl inside the namespace (`/proc/sys/...` is per network namespace for
    /// the reading thread).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let value = value.to_owned();
        let written = self.run(move || std::fs::write(&path, value))?;
        written.map_err(|source| DatapathError::Netns {
            netns: self.name.clone(),
            what: format!("sysctl {key}"),
            source,
        })
    }

    /// A command to run inside the namespace (`ip netns exec NAME PROGRAM ARGS...`).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Deletes the namespace. Interfaces inside go with it (a veth's peer too).
    pub fn delete(self) -> Result<()> {
        run_command("ip", &["netns", "delete", &self.name]).map(|_| ())
    }

    /// Names of all namespaces under `/run/netns`.
    pub fn list() -> Vec<String> {
        std::fs::read_dir(NETNS_RUN_DIR)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(DatapathError::Invalid {
            what: "network namespace name",
            detail: format!("`{name}`: use 1-64 characters from [A-Za-z0-9._-]"),
        })
    }
}

/// Runs a command to completion and returns its stdout; a non-zero exit is an error that
/// carries the command line and its stderr.
pub fn run_command(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| DatapathError::Command {
            command: format!("{program} {}", args.join(" ")),
            status: "could not start".into(),
            stderr: source.to_string(),
        })?;
    check_output(program, args, output)
}

fn check_output(program: &str, args: &[&str], output: Output) -> Result<String> {
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(DatapathError::Command {
            command: format!("{program} {}", args.join(" ")),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}
