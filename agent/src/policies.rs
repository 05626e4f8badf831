//! Where policies come from on one node: the watched directory (Cilium's static policy path:
//! a file that does not parse keeps its previous version in force and is reported) and the
//! API (`policy apply|delete`; what is applied is saved in the run directory and restored by
//! a restarted agent). Both hold policies of the three kinds and `WasmFilter` resources.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use membrane_agent_api::{
    run_dir::write_atomically,
    wasm_resource::{self, WasmFilterResource},
};
use membrane_policy::{Policy, PolicyKind, PolicyRef, parse_documents};

use crate::{
    daemon::State,
    error::{AgentError, PolicyInputError, io_err},
};

/// How often the watched directory is scanned for changed files.
pub const DIR_SCAN_INTERVAL: Duration = Duration::from_secs(1);

/// A policy file as last read successfully.
pub(crate) struct PolicyFile {
    modified: SystemTime,
    len: u64,
    refs: Vec<PolicyRef>,
    /// Keys of the `WasmFilter` resources it holds.
    wasm: Vec<String>,
}

/// Policies and `WasmFilter` resources of one input (file or API text).
pub(crate) fn parse_all(
    text: &str,
    source: &str,
) -> Result<(Vec<Policy>, Vec<WasmFilterResource>), PolicyInputError> {
    let (rest, filters) =
        wasm_resource::split_documents(text, source).map_err(PolicyInputError::Filter)?;
    let policies = parse_documents(&rest, source).map_err(PolicyInputError::Policy)?;
    Ok((policies, filters))
}

/// One `policy apply`: its text and which of its policies are still in force (later
/// applies replace, deletes remove).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct AppliedPolicies {
    source: String,
    text: String,
    live: Vec<String>,
}

pub(crate) fn kind_from_str(kind: &str) -> Option<PolicyKind> {
    match kind {
        "CiliumNetworkPolicy" | "cnp" => Some(PolicyKind::CiliumNetworkPolicy),
        "CiliumClusterwideNetworkPolicy" | "ccnp" => {
            Some(PolicyKind::CiliumClusterwideNetworkPolicy)
        }
        "NetworkPolicy" | "netpol" => Some(PolicyKind::NetworkPolicy),
        _ => None,
    }
}

impl State {
    /// Adds or replaces every policy and filter of `text`; nothing of a text with any
    /// problem is applied (the repository is untouched). Returns what is now in force.
    pub(crate) fn apply_text(
        &mut self,
        text: &str,
        source: &str,
    ) -> Result<Vec<String>, AgentError> {
        let (policies, filters) = parse_all(text, source).map_err(AgentError::PolicyInput)?;
        let mut names: Vec<String> = policies
            .iter()
            .map(|p| p.policy_ref().to_string())
            .collect();
        names.extend(filters.iter().map(|f| f.key()));
        for p in policies {
            self.repo.replace(p);
        }
        for f in filters {
            self.wasm_filters.insert(f.key(), f);
        }
        for entry in &mut self.applied {
            entry.live.retain(|r| !names.contains(r));
        }
        self.applied.retain(|e| !e.live.is_empty());
        self.applied.push(AppliedPolicies {
            source: source.to_owned(),
            text: text.to_owned(),
            live: names.clone(),
        });
        self.save_applied()
            .map_err(|e| AgentError::NotSaved(Box::new(e)))?;
        self.reconcile()?;
        Ok(names)
    }

    fn applied_path(&self) -> PathBuf {
        self.config.run_dir().applied_policies()
    }

    fn save_applied(&self) -> Result<(), AgentError> {
        let path = self.applied_path();
        let bytes =
            serde_json::to_vec_pretty(&self.applied).map_err(|source| AgentError::Encode {
                what: "applied policies",
                source,
            })?;
        write_atomically(&path, &bytes).map_err(io_err(format!("write {}", path.display())))
    }

    /// Re-applies what earlier agents accepted over the API (only the policies still live).
    pub(crate) fn restore_applied(&mut self) {
        let Ok(bytes) = std::fs::read(self.applied_path()) else {
            return;
        };
        let Ok(applied) = serde_json::from_slice::<Vec<AppliedPolicies>>(&bytes) else {
            tracing::error!(file = %self.applied_path().display(), "unreadable; API-applied policies not restored");
            return;
        };
        for entry in &applied {
            match parse_all(&entry.text, &entry.source) {
                Ok((policies, filters)) => {
                    for p in policies {
                        if entry.live.contains(&p.policy_ref().to_string()) {
                            self.repo.replace(p);
                        }
                    }
                    for f in filters {
                        if entry.live.contains(&f.key()) {
                            self.wasm_filters.insert(f.key(), f);
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(source = %entry.source, error = %e, "saved policy no longer parses")
                }
            }
        }
        self.applied = applied;
    }

    pub(crate) fn forget_applied(&mut self, policy: &str) -> Result<(), AgentError> {
        for entry in &mut self.applied {
            entry.live.retain(|r| r != policy);
        }
        self.applied.retain(|e| !e.live.is_empty());
        self.save_applied()
    }

    /// Re-reads changed policy files. Returns whether the repository changed. A file that does
    /// not parse keeps its previous policies in force and is reported in `status`.
    pub(crate) fn scan_policy_dir(&mut self) -> bool {
        let Some(dir) = self.config.policy_dir.clone() else {
            return false;
        };
        let mut seen = BTreeSet::new();
        let mut changed = false;
        let entries: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        for path in entries {
            let ext = path
                .extension()
                .and_then(|e| e.to_str())
                .unwrap_or_default();
            if !matches!(ext, "yaml" | "yml" | "json") {
                continue;
            }
            seen.insert(path.clone());
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            if let Some(known) = self.files.get(&path)
                && known.modified == modified
                && known.len == meta.len()
            {
                continue;
            }
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    self.file_errors.insert(path.clone(), e.to_string());
                    continue;
                }
            };
            match parse_all(&text, &path.display().to_string()) {
                Ok((policies, filters)) => {
                    if let Some(old) = self.files.remove(&path) {
                        for r in old.refs {
                            self.repo.remove(&r);
                        }
                        for k in old.wasm {
                            self.wasm_filters.remove(&k);
                        }
                    }
                    let refs = policies.iter().map(|p| p.policy_ref()).collect();
                    for p in policies {
                        self.repo.replace(p);
                    }
                    let wasm = filters.iter().map(|f| f.key()).collect();
                    for f in filters {
                        self.wasm_filters.insert(f.key(), f);
                    }
                    self.files.insert(
                        path.clone(),
                        PolicyFile {
                            modified,
                            len: meta.len(),
                            refs,
                            wasm,
                        },
                    );
                    self.file_errors.remove(&path);
                    changed = true;
                }
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "policy file rejected; its previous version stays in force");
                    self.file_errors.insert(path.clone(), e.to_string());
                }
            }
        }
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !seen.contains(*p))
            .cloned()
            .collect();
        for path in gone {
            if let Some(old) = self.files.remove(&path) {
                for r in old.refs {
                    self.repo.remove(&r);
                }
                for k in old.wasm {
                    self.wasm_filters.remove(&k);
                }
                changed = true;
            }
            self.file_errors.remove(&path);
        }
        changed
    }
}
