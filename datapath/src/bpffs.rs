//! bpffs handling: where pinned maps live, per run.
//!
//! Rules of the house: pin under a per-run path and remove it afterwards. A [`PinDir`] is
//! either a directory under an existing bpffs mount (the lab and the agent use
//! `/sys/fs/bpf/membrane/<run>`) or a private bpffs instance mounted on a fresh directory
//! (tests: nothing is shared between concurrently running tests, and unmounting drops every
//! pin at once).

use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use crate::error::{DatapathError, Result};

/// `BPF_FS_MAGIC` from `<linux/magic.h>`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Default bpffs mount point.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

fn c_path(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| DatapathError::Invalid {
        what: "path",
        detail: format!("{} contains a NUL byte", path.display()),
    })
}

/// Whether `path` is the root of (or inside) a bpffs mount.
pub fn is_bpffs(path: &Path) -> Result<bool> {
    let c = c_path(path)?;
    // SAFETY: zeroed statfs is a valid out-parameter; `c` is a NUL-terminated path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the duration of the call.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(DatapathError::BpfFs {
            path: path.to_owned(),
            what: "statfs",
            source: std::io::Error::last_os_error(),
        });
    }
    // Only x86_64 and aarch64 glibc are supported hosts; there f_type is i64.
    Ok(st.f_type == BPF_FS_MAGIC)
}

fn mount_bpffs(path: &Path) -> Result<()> {
    let target = c_path(path)?;
    let fstype = c"bpf";
    // SAFETY: all strings are NUL-terminated and outlive the call; data is null.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(DatapathError::BpfFs {
            path: path.to_owned(),
            what: "mount -t bpf",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Mounts bpffs at `path` unless one is already there.
pub fn ensure_mounted(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|source| DatapathError::BpfFs {
        path: path.to_owned(),
        what: "create directory",
        source,
    })?;
    if !is_bpffs(path)? {
        mount_bpffs(path)?;
    }
    Ok(())
}

/// A per-run directory holding pinned maps; [`PinDir::remove`] deletes it (and unmounts a
/// private instance). Dropping without `remove` keeps the pins: that is what a restartable
/// agent wants, so removal is explicit.
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
    private_mount: bool,
}

impl PinDir {
    /// `<bpffs>/membrane/<run>` under the bpffs mounted at `bpffs_root` (mounted if needed).
    pub fn under(bpffs_root: &Path, run: &str) -> Result<Self> {
        if run.is_empty() || run.contains('/') || run.starts_with('.') {
            return Err(DatapathError::Invalid {
                what: "run name",
                detail: format!("`{run}` must be a single non-hidden path component"),
            });
        }
        ensure_mounted(bpffs_root)?;
        let path = bpffs_root.join("membrane").join(run);
        std::fs::create_dir_all(&path).map_err(|source| DatapathError::BpfFs {
            path: path.clone(),
            what: "create pin directory",
            source,
        })?;
        Ok(Self {
            path,
            private_mount: false,
        })
    }

    /// A private bpffs instance mounted at the new directory `dir` (which must not exist).
    pub fn private(dir: &Path) -> Result<Self> {
        std::fs::create_dir(dir).map_err(|source| DatapathError::BpfFs {
            path: dir.to_owned(),
            what: "create mount point",
            source,
        })?;
        if let Err(err) = mount_bpffs(dir) {
            let _ = std::fs::remove_dir(dir);
            return Err(err);
        }
        Ok(Self {
            path: dir.to_owned(),
            private_mount: true,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes every pin in the directory and the directory itself (unmounting a private
    /// instance first, which releases its pins).
    pub fn remove(self) -> Result<()> {
        if self.private_mount {
            let c = c_path(&self.path)?;
            // SAFETY: `c` is a NUL-terminated path that outlives the call.
            let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            if rc != 0 {
                return Err(DatapathError::BpfFs {
                    path: self.path.clone(),
                    what: "umount",
                    source: std::io::Error::last_os_error(),
                });
            }
        } else {
            let entries = std::fs::read_dir(&self.path).map_err(|source| DatapathError::BpfFs {
                path: self.path.clone(),
                what: "list pins",
                source,
            })?;
            for entry in entries.flatten() {
                let p = entry.path();
                let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    // Pinned links live one level down.
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
                removed.map_err(|source| DatapathError::BpfFs {
                    path: p.clone(),
                    what: "unpin",
                    source,
                })?;
            }
        }
        std::fs::remove_dir(&self.path).map_err(|source| DatapathError::BpfFs {
            path: self.path.clone(),
            what: "remove pin directory",
            source,
        })
    }
}
