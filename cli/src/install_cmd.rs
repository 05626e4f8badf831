//! `membrane install --values FILE --dry-run`: the Kubernetes manifests of an installation
//! (as `cilium install --dry-run` and `helm template --include-crds` print them), rendered
//! from the chart compiled into `membrane-deploy` — the chart in `deploy/helm/membrane`,
//! checked by that crate's tests. Values take Cilium's Helm keys; an unknown key or a value
//! membrane does not do fails naming the key. Owns reading files and printing only.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::Args;

#[derive(Args)]
pub struct InstallArgs {
    /// A values file (Cilium's Helm value names, e.g. the seed guide's cilium-values.yaml);
    /// repeat to merge several, later ones winning. Without it: the chart's defaults.
    #[arg(short = 'f', long = "values", value_name = "FILE")]
    pub values: Vec<PathBuf>,
    /// The namespace the objects go to.
    #[arg(short = 'n', long, default_value = "kube-system")]
    pub namespace: String,
    /// Print the manifests (CRDs first) to stdout instead of installing; the chart's notes
    /// go to stderr. Apply them with `kubectl apply --server-side -f -`.
    #[arg(long)]
    pub dry_run: bool,
}

pub fn run(args: &InstallArgs) -> anyhow::Result<()> {
    if !args.dry_run {
        bail!(
            "membrane install talks to no cluster yet: use --dry-run and apply its output \
             (membrane install --values FILE --dry-run | kubectl apply --server-side -f -)"
        );
    }
    let mut files = Vec::new();
    for path in &args.values {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read values file {}", path.display()))?;
        files.push((path.display().to_string(), text));
    }
    let named: Vec<(&str, &str)> = files
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    let release = membrane_deploy::Release {
        name: "membrane".into(),
        namespace: args.namespace.clone(),
    };
    let rendered = membrane_deploy::render_files(&named, &release)?;
    print!("{}", rendered.to_yaml_stream());
    eprint!("{}", rendered.notes);
    Ok(())
}
