//! The pod's veth: created from the runtime's network namespace (the node namespace the agent
//! manages) with its peer moved into the container's namespace, addressed and routed as
//! `membrane-datapath`'s plumbing does for the lab (`/32` on the pod, the link-local gateway
//! on every host-side veth, a host route to the pod). `ip` (iproute2) does the netlink work;
//! commands for the container's namespace run on a thread that entered it, so the plugin's
//! own thread never changes namespace.

use std::{
    fs::File,
    net::Ipv4Addr,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::Path,
    process::Command,
};

use sha2::{Digest as _, Sha256};

use crate::error::CniError;

/// The host-side veth of an attachment: `lxc` and 12 hex digits of the attachment's hash
/// (15 bytes, the kernel's limit), the same for every request about it (DEL and GC find it
/// without state).
pub fn host_ifname(owner: &str) -> String {
    let digest = Sha256::digest(owner.as_bytes());
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("lxc{hex}")
}

/// Where the command runs: this process's namespace or a container's.
#[derive(Clone, Copy)]
pub enum Where<'a> {
    Here,
    In(&'a Path),
}

fn plumbing(what: impl Into<String>, reason: impl Into<String>) -> CniError {
    CniError::Plumbing {
        what: what.into(),
        reason: reason.into(),
    }
}

/// Runs `f` on a thread that entered the network namespace at `netns`.
fn in_netns<R: Send>(netns: &Path, f: impl FnOnce() -> R + Send) -> Result<R, CniError> {
    let file = File::open(netns).map_err(|e| {
        plumbing(
            format!("open network namespace {}", netns.display()),
            e.to_string(),
        )
    })?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                // SAFETY: `file` is an open file; setns changes only this thread's namespace.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("thread panicked")))
    })
    .map_err(|e| {
        plumbing(
            format!("enter network namespace {}", netns.display()),
            e.to_string(),
        )
    })
}

/// `ip ARGS` (in `at`); stdout, or an error naming the command and carrying its stderr.
pub fn ip(at: Where<'_>, args: &[&str]) -> Result<String, CniError> {
    let run = || Command::new("ip").args(args).output();
    let output = match at {
        Where::Here => run(),
        Where::In(netns) => in_netns(netns, run)?,
    };
    let shown = format!("ip {}", args.join(" "));
    let output = output.map_err(|e| plumbing(&shown, format!("could not run: {e}")))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(plumbing(
            shown,
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ))
    }
}

/// Writes a sysctl of the namespace (`/proc/sys` is per namespace of the writing thread).
fn sysctl(at: Where<'_>, key: &str, value: &str) -> Result<(), CniError> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let write = || std::fs::write(&path, value);
    let written = match at {
        Where::Here => write(),
        Where::In(netns) => in_netns(netns, write)?,
    };
    written.map_err(|e| plumbing(format!("sysctl {key}={value}"), e.to_string()))
}

/// True if the interface exists (in `at`).
pub fn link_exists(at: Where<'_>, ifname: &str) -> Result<bool, CniError> {
    let check = || {
        let Ok(name) = std::ffi::CString::new(ifname) else {
            return false;
        };
        // SAFETY: `name` is NUL-terminated and outlives the call.
        unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
    };
    match at {
        Where::Here => Ok(check()),
        Where::In(netns) => in_netns(netns, check),
    }
}

/// The interface's MAC address.
pub fn mac(at: Where<'_>, ifname: &str) -> Result<String, CniError> {
    let out = ip(at, &["-o", "link", "show", "dev", ifname])?;
    out.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .map(str::to_owned)
        .ok_or_else(|| {
            plumbing(
                format!("MAC of {ifname}"),
                format!("no link/ether in `{out}`"),
            )
        })
}

/// The IPv4 addresses of an interface, `a.b.c.d/len`.
pub fn addresses(at: Where<'_>, ifname: &str) -> Result<Vec<String>, CniError> {
    let out = ip(at, &["-o", "-4", "addr", "show", "dev", ifname])?;
    let mut words = out.split_whitespace();
    let mut found = Vec::new();
    while let Some(w) = words.next() {
        if w == "inet"
            && let Some(a) = words.next()
        {
            found.push(a.to_owned());
        }
    }
    Ok(found)
}

/// Inode of a network namespace file (to compare namespaces).
pub fn netns_inode(path: &Path) -> Result<u64, CniError> {
    std::fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|e| plumbing(format!("stat {}", path.display()), e.to_string()))
}

/// Creates the veth `host` (here) ↔ `pod_ifname` (in `netns`), addresses and routes both
/// ends. On failure the host side (and with it the peer) is deleted again.
pub fn wire(
    host: &str,
    netns: &Path,
    pod_ifname: &str,
    ip4: Ipv4Addr,
    gateway: Ipv4Addr,
) -> Result<(), CniError> {
    let netns_text = netns.display().to_string();
    ip(
        Where::Here,
        &[
            "link",
            "add",
            host,
            "type",
            "veth",
            "peer",
            "name",
            pod_ifname,
            "netns",
            &netns_text,
        ],
    )?;
    let configured = (|| {
        let pod_addr = format!("{ip4}/32");
        let gw_addr = format!("{gateway}/32");
        let gw = gateway.to_string();
        let pod = Where::In(netns);
        // IPv4 only: the datapath drops IPv6 while enforcing; no autoconfiguration noise.
        let _ = sysctl(
            Where::Here,
            &format!("net.ipv6.conf.{host}.disable_ipv6"),
            "1",
        );
        let _ = sysctl(
            pod,
            &format!("net.ipv6.conf.{pod_ifname}.disable_ipv6"),
            "1",
        );
        ip(Where::Here, &["addr", "add", &gw_addr, "dev", host])?;
        ip(Where::Here, &["link", "set", host, "up"])?;
        ip(Where::Here, &["route", "replace", &pod_addr, "dev", host])?;
        ip(pod, &["addr", "add", &pod_addr, "dev", pod_ifname])?;
        ip(pod, &["link", "set", pod_ifname, "up"])?;
        ip(
            pod,
            &["route", "add", &gw, "dev", pod_ifname, "scope", "link"],
        )?;
        ip(
            pod,
            &["route", "add", "default", "via", &gw, "dev", pod_ifname],
        )?;
        Ok(())
    })();
    if configured.is_err() {
        let _ = delete_link(host);
    }
    configured
}

/// Deletes the host-side veth (its peer goes with it); nothing to do if it is gone.
pub fn delete_link(host: &str) -> Result<(), CniError> {
    if !link_exists(Where::Here, host)? {
        return Ok(());
    }
    ip(Where::Here, &["link", "del", host]).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ifnames_are_short_stable_and_distinct() {
        let a = host_ifname("abc/eth0");
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("lxc"));
        assert_eq!(a, host_ifname("abc/eth0"));
        assert_ne!(a, host_ifname("abc/eth1"));
    }
}
