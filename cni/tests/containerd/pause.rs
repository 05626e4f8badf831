//! A pause image built here, without a registry: a static C program that waits for signals
//! (exits on SIGINT/SIGTERM, reaps children), packed as an OCI image layout archive with one
//! uncompressed layer and an index annotation naming the image, for `ctr images import`.

use std::{path::Path, process::Command};

use sha2::{Digest as _, Sha256};

const PAUSE_C: &str = r#"
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
static void stop(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, NULL, WNOHANG) > 0) {} }
int main(void) {
    signal(SIGINT, stop);
    signal(SIGTERM, stop);
    signal(SIGCHLD, reap);
    for (;;) pause();
}
"#;

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn blob(dir: &Path, bytes: &[u8]) -> anyhow::Result<(String, usize)> {
    let digest = format!("sha256:{:x}", Sha256::digest(bytes));
    let path = dir
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    std::fs::write(path, bytes)?;
    Ok((digest, bytes.len()))
}

/// Builds `<work>/pause.tar` holding the image `reference`; returns its path.
pub fn build(work: &Path, reference: &str) -> anyhow::Result<std::path::PathBuf> {
    let src = work.join("pause.c");
    let root = work.join("pause-root");
    std::fs::create_dir_all(&root)?;
    std::fs::write(&src, PAUSE_C)?;
    run(Command::new("gcc")
        .args(["-static", "-Os", "-s", "-o"])
        .arg(root.join("pause"))
        .arg(&src))?;
    let layer = work.join("layer.tar");
    run(Command::new("tar")
        .args([
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--mtime=@0",
            "--mode=0755",
            "-cf",
        ])
        .arg(&layer)
        .arg("-C")
        .arg(&root)
        .arg("pause"))?;
    let layout = work.join("pause-oci");
    std::fs::create_dir_all(layout.join("blobs/sha256"))?;
    let layer_bytes = std::fs::read(&layer)?;
    let (layer_digest, layer_size) = blob(&layout, &layer_bytes)?;
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/pause"]},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    let (config_digest, config_size) = blob(&layout, config.to_string().as_bytes())?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest, "size": layer_size}],
    });
    let (manifest_digest, manifest_size) = blob(&layout, manifest.to_string().as_bytes())?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest_size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": reference},
        }],
    });
    std::fs::write(layout.join("index.json"), index.to_string())?;
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let archive = work.join("pause.tar");
    run(Command::new("tar")
        .arg("-cf")
        .arg(&archive)
        .arg("-C")
        .arg(&layout)
        .args(["oci-layout", "index.json", "blobs"]))?;
    Ok(archive)
}
