//! The CNI network configuration list the agent writes into the container runtime's CNI
//! config directory (`--cni-conf-dir`) once it can serve pods, and removes when it stops;
//! the runtime hands its plugin entry to `membrane-cni` on stdin. Declared once here: the
//! agent renders it, the plugin parses its own entry with [`MembranePlugin`].
//!
//! Format: CNI spec 1.0.0 (`cniVersion`, `name`, `plugins`), the version containerd 1.6's
//! libcni speaks; the plugin accepts 1.0.0 and 1.1.0 requests.

use std::{collections::BTreeMap, path::PathBuf};

use serde::{Deserialize, Serialize};

/// The file name: `05-` sorts it before the usual bridge configurations, and a runtime with
/// `max_conf_num = 1` loads only the first file (Cilium writes `05-cilium.conflist`).
pub const CONFLIST_FILE: &str = "05-membrane.conflist";

/// The plugin's `type`: the executable the runtime looks up in its CNI bin directory.
pub const PLUGIN_TYPE: &str = "membrane-cni";

/// The network's name.
pub const NETWORK_NAME: &str = "membrane";

/// `cniVersion` of the list the agent writes.
pub const CONFLIST_CNI_VERSION: &str = "1.0.0";

/// Spec versions `membrane-cni` serves.
pub const SUPPORTED_VERSIONS: &[&str] = &["1.0.0", "1.1.0"];

/// The capability under which containerd's CRI passes a pod's annotations in
/// `runtimeConfig` (only to plugins that declare it).
pub const POD_ANNOTATIONS_CAPABILITY: &str = "io.kubernetes.cri.pod-annotations";

/// The pod annotation `membrane-cni` takes the pod's labels from, `key=value,key=value`
/// (the runtime passes annotations, not labels, to CNI plugins).
pub const LABELS_ANNOTATION: &str = "membrane.io/labels";

/// A CNI network configuration list (spec §"Configuration format").
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfigList {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub name: String,
    pub plugins: Vec<MembranePlugin>,
}

/// `membrane-cni`'s entry of the list: what the runtime passes it on stdin, next to the keys
/// the runtime adds (`cniVersion`, `name`, `runtimeConfig`, `args`, `prevResult`, `cni.dev/*`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MembranePlugin {
    /// [`PLUGIN_TYPE`].
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// The agent's API socket (`/run/membrane/<name>/agent.sock`).
    #[serde(rename = "agent-socket")]
    pub agent_socket: PathBuf,
    /// Capabilities the runtime should fill into `runtimeConfig`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub capabilities: BTreeMap<String, bool>,
}

impl NetworkConfigList {
    /// The list an agent serving `agent_socket` writes.
    pub fn for_agent(agent_socket: PathBuf) -> Self {
        Self {
            cni_version: CONFLIST_CNI_VERSION.to_owned(),
            name: NETWORK_NAME.to_owned(),
            plugins: vec![MembranePlugin {
                plugin_type: PLUGIN_TYPE.to_owned(),
                agent_socket,
                capabilities: BTreeMap::from([(POD_ANNOTATIONS_CAPABILITY.to_owned(), true)]),
            }],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_written_list_reads_back() {
        let list = NetworkConfigList::for_agent("/run/membrane/x/agent.sock".into());
        let text = serde_json::to_string_pretty(&list).expect("encode");
        assert!(text.contains(r#""type": "membrane-cni""#), "{text}");
        assert!(text.contains(r#""agent-socket": "/run/membrane/x/agent.sock""#));
        let back: NetworkConfigList = serde_json::from_str(&text).expect("decode");
        assert_eq!(back, list);
    }
}
