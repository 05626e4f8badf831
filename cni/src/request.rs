//! A CNI request: the verb and parameters from the environment (`CNI_*`), the network
//! configuration from stdin. Everything is checked before anything is done, and every
//! problem names the variable or key it is about.

use std::{collections::BTreeMap, path::PathBuf};

use membrane_agent_api::cni::{
    LABELS_ANNOTATION, MembranePlugin, PLUGIN_TYPE, POD_ANNOTATIONS_CAPABILITY, SUPPORTED_VERSIONS,
};
use serde::Deserialize;

use crate::{error::CniError, result::AddResult};

/// The spec's verbs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Add,
    Del,
    Check,
    Version,
    Gc,
    Status,
}

impl Verb {
    fn parse(text: &str) -> Result<Verb, CniError> {
        Ok(match text {
            "ADD" => Verb::Add,
            "DEL" => Verb::Del,
            "CHECK" => Verb::Check,
            "VERSION" => Verb::Version,
            "GC" => Verb::Gc,
            "STATUS" => Verb::Status,
            other => {
                return Err(CniError::BadEnv {
                    var: "CNI_COMMAND",
                    value: other.to_owned(),
                    why: "not a CNI verb (ADD, DEL, CHECK, VERSION, GC, STATUS)".into(),
                });
            }
        })
    }

    /// True for the verbs that act on one attachment (container id and interface).
    fn has_attachment(self) -> bool {
        matches!(self, Verb::Add | Verb::Del | Verb::Check)
    }
}

/// The `CNI_*` variables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Env {
    pub verb: Verb,
    /// `CNI_COMMAND` as given (for messages).
    pub command: String,
    pub container_id: String,
    /// The container's network namespace (optional for DEL).
    pub netns: Option<PathBuf>,
    pub ifname: String,
    /// `CNI_ARGS`, `K=V;K=V`.
    pub args: BTreeMap<String, String>,
}

impl Env {
    /// Reads the variables through `var` (the process environment in the binary).
    pub fn parse(var: impl Fn(&str) -> Option<String>) -> Result<Env, CniError> {
        let command = var("CNI_COMMAND").ok_or(CniError::MissingEnv {
            var: "CNI_COMMAND",
            command: "any request".into(),
        })?;
        let verb = Verb::parse(&command)?;
        let required = |name: &'static str| -> Result<Option<String>, CniError> {
            match var(name).filter(|v| !v.is_empty()) {
                Some(v) => Ok(Some(v)),
                None if verb.has_attachment() => Err(CniError::MissingEnv {
                    var: name,
                    command: command.clone(),
                }),
                None => Ok(None),
            }
        };
        let container_id = required("CNI_CONTAINERID")?.unwrap_or_default();
        if verb.has_attachment() {
            check_container_id(&container_id)?;
        }
        let ifname = required("CNI_IFNAME")?.unwrap_or_default();
        if verb.has_attachment() {
            check_ifname(&ifname)?;
        }
        let netns = match verb {
            Verb::Add | Verb::Check => required("CNI_NETNS")?,
            _ => var("CNI_NETNS").filter(|v| !v.is_empty()),
        }
        .map(PathBuf::from);
        if let Some(path) = &netns
            && !path.is_absolute()
        {
            return Err(CniError::BadEnv {
                var: "CNI_NETNS",
                value: path.display().to_string(),
                why: "not an absolute path".into(),
            });
        }
        let args = parse_cni_args(&var("CNI_ARGS").unwrap_or_default())?;
        Ok(Env {
            verb,
            command,
            container_id,
            netns,
            ifname,
            args,
        })
    }

    /// The CNI attachment this request is about: `CONTAINERID/IFNAME`, the agent's IPAM owner.
    pub fn owner(&self) -> String {
        attachment_owner(&self.container_id, &self.ifname)
    }

    /// `K8S_POD_NAMESPACE` and `K8S_POD_NAME` from `CNI_ARGS`.
    pub fn pod(&self) -> Result<(String, String), CniError> {
        let get = |key: &'static str| {
            self.args
                .get(key)
                .filter(|v| !v.is_empty())
                .cloned()
                .ok_or(CniError::MissingPodArg { key })
        };
        Ok((get("K8S_POD_NAMESPACE")?, get("K8S_POD_NAME")?))
    }
}

/// `CONTAINERID/IFNAME`.
pub fn attachment_owner(container_id: &str, ifname: &str) -> String {
    format!("{container_id}/{ifname}")
}

/// The spec: alphanumeric first, then `[A-Za-z0-9_.-]`.
fn check_container_id(id: &str) -> Result<(), CniError> {
    let mut bytes = id.bytes();
    let ok = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(CniError::BadEnv {
            var: "CNI_CONTAINERID",
            value: id.to_owned(),
            why: "must start alphanumeric and continue with [A-Za-z0-9_.-]".into(),
        })
    }
}

/// A Linux interface name: 1–15 bytes, no `/`, whitespace or `:`, not `.` or `..`.
fn check_ifname(name: &str) -> Result<(), CniError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0);
    if ok {
        Ok(())
    } else {
        Err(CniError::BadEnv {
            var: "CNI_IFNAME",
            value: name.to_owned(),
            why: "not an interface name (1-15 bytes, no '/', ':' or whitespace)".into(),
        })
    }
}

fn parse_cni_args(text: &str) -> Result<BTreeMap<String, String>, CniError> {
    let mut out = BTreeMap::new();
    for pair in text.split(';').filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=').filter(|(k, _)| !k.is_empty()) else {
            return Err(CniError::BadEnv {
                var: "CNI_ARGS",
                value: text.to_owned(),
                why: format!("`{pair}` is not KEY=VALUE"),
            });
        };
        out.insert(k.to_owned(), v.to_owned());
    }
    Ok(out)
}

/// One entry of `cni.dev/valid-attachments` (GC).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The network configuration on stdin, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub plugin: MembranePlugin,
    /// The pod's annotations (`runtimeConfig`, capability [`POD_ANNOTATIONS_CAPABILITY`]).
    pub pod_annotations: BTreeMap<String, String>,
    /// CHECK: what ADD returned.
    pub prev_result: Option<AddResult>,
    /// GC: the attachments to keep.
    pub valid_attachments: Option<Vec<Attachment>>,
}

/// Keys the runtime adds to the plugin's entry of the list.
const RUNTIME_KEYS: &[&str] = &["cniVersion", "name", "runtimeConfig", "args", "prevResult"];

impl NetConf {
    /// Parses and checks stdin. Keys the runtime adds (`cniVersion`, `name`,
    /// `runtimeConfig`, `args`, `prevResult`, `cni.dev/*`) are taken apart; the rest must be
    /// `membrane-cni`'s own entry, exactly (a misspelt key is an error, not ignored).
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        let value: serde_json::Value = serde_json::from_slice(stdin).map_err(CniError::Decode)?;
        let serde_json::Value::Object(mut map) = value else {
            return Err(CniError::Config {
                what: "not a JSON object".into(),
            });
        };
        let cni_version = take_string(&mut map, "cniVersion")?;
        check_version(&cni_version)?;
        let name = take_string(&mut map, "name")?;
        let runtime_config = map.remove("runtimeConfig");
        let prev_result = map
            .remove("prevResult")
            .map(|v| {
                serde_json::from_value::<AddResult>(v).map_err(|e| CniError::Config {
                    what: format!("prevResult: {e}"),
                })
            })
            .transpose()?;
        let valid_attachments = map
            .remove("cni.dev/valid-attachments")
            .map(|v| {
                serde_json::from_value::<Vec<Attachment>>(v).map_err(|e| CniError::Config {
                    what: format!("cni.dev/valid-attachments: {e}"),
                })
            })
            .transpose()?;
        map.remove("args");
        map.retain(|k, _| !k.starts_with("cni.dev/") && !RUNTIME_KEYS.contains(&k.as_str()));
        for key in ["ipam", "dns"] {
            if map.contains_key(key) {
                return Err(CniError::Unsupported {
                    key: key.into(),
                    why: "addresses come from the membrane agent's IPAM",
                });
            }
        }
        let plugin: MembranePlugin = serde_json::from_value(serde_json::Value::Object(map))
            .map_err(|e| CniError::Config {
                what: format!("the {PLUGIN_TYPE} entry: {e}"),
            })?;
        if plugin.plugin_type != PLUGIN_TYPE {
            return Err(CniError::Config {
                what: format!(
                    "type is `{}`, this plugin is `{PLUGIN_TYPE}`",
                    plugin.plugin_type
                ),
            });
        }
        let pod_annotations = match runtime_config
            .as_ref()
            .and_then(|rc| rc.get(POD_ANNOTATIONS_CAPABILITY))
        {
            None | Some(serde_json::Value::Null) => BTreeMap::new(),
            Some(v) => serde_json::from_value(v.clone()).map_err(|e| CniError::Config {
                what: format!("runtimeConfig.{POD_ANNOTATIONS_CAPABILITY}: {e}"),
            })?,
        };
        Ok(NetConf {
            cni_version,
            name,
            plugin,
            pod_annotations,
            prev_result,
            valid_attachments,
        })
    }

    /// The pod's labels from its [`LABELS_ANNOTATION`] annotation (none without it).
    pub fn pod_labels(&self) -> Result<Vec<String>, CniError> {
        let Some(text) = self.pod_annotations.get(LABELS_ANNOTATION) else {
            return Ok(Vec::new());
        };
        text.split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(|item| match item.split_once('=') {
                Some((k, _)) if !k.trim().is_empty() && !k.contains(char::is_whitespace) => {
                    Ok(item.to_owned())
                }
                _ => Err(CniError::PodLabels {
                    annotation: LABELS_ANNOTATION,
                    item: item.to_owned(),
                }),
            })
            .collect()
    }
}

/// The version a request asks for must be one this plugin speaks.
pub fn check_version(version: &str) -> Result<(), CniError> {
    if SUPPORTED_VERSIONS.contains(&version) {
        Ok(())
    } else {
        Err(CniError::UnsupportedVersion {
            version: version.to_owned(),
            supported: SUPPORTED_VERSIONS.join(", "),
        })
    }
}

fn take_string(
    map: &mut serde_json::Map<String, serde_json::Value>,
    key: &str,
) -> Result<String, CniError> {
    match map.remove(key) {
        Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(s),
        Some(other) => Err(CniError::Config {
            what: format!("`{key}` must be a non-empty string, not {other}"),
        }),
        None => Err(CniError::Config {
            what: format!("`{key}` is missing"),
        }),
    }
}

/// VERSION's stdin: only `cniVersion` matters (any version may ask which ones we speak).
pub fn requested_version(stdin: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct V {
        #[serde(rename = "cniVersion")]
        cni_version: String,
    }
    serde_json::from_slice::<V>(stdin)
        .ok()
        .map(|v| v.cni_version)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::code;

    fn env(vars: &[(&str, &str)]) -> Result<Env, CniError> {
        let vars: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Env::parse(|k| vars.get(k).cloned())
    }

    const ADD: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_UID=u",
        ),
        ("CNI_PATH", "/opt/cni/bin"),
    ];

    fn with(over: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
        let mut v: Vec<_> = ADD
            .iter()
            .filter(|(k, _)| !over.iter().any(|(o, _)| o == k))
            .copied()
            .collect();
        v.extend(over.iter().filter(|(_, val)| !val.is_empty()).copied());
        v
    }

    #[test]
    fn a_containerd_add_parses() {
        let e = env(ADD).expect("parses");
        assert_eq!(e.verb, Verb::Add);
        assert_eq!(e.owner(), "abc123/eth0");
        assert_eq!(e.pod().expect("pod"), ("default".into(), "web-0".into()));
    }

    #[test]
    fn bad_environments_name_the_variable() {
        for (over, var, want_code) in [
            (&[("CNI_COMMAND", "")][..], "CNI_COMMAND", code::INVALID_ENV),
            (
                &[("CNI_COMMAND", "UPDATE")],
                "CNI_COMMAND",
                code::INVALID_ENV,
            ),
            (
                &[("CNI_CONTAINERID", "")],
                "CNI_CONTAINERID",
                code::INVALID_ENV,
            ),
            (
                &[("CNI_CONTAINERID", "-x")],
                "CNI_CONTAINERID",
                code::INVALID_ENV,
            ),
            (
                &[("CNI_CONTAINERID", "a/b")],
                "CNI_CONTAINERID",
                code::INVALID_ENV,
            ),
            (&[("CNI_NETNS", "")], "CNI_NETNS", code::INVALID_ENV),
            (&[("CNI_NETNS", "relative")], "CNI_NETNS", code::INVALID_ENV),
            (&[("CNI_IFNAME", "")], "CNI_IFNAME", code::INVALID_ENV),
            (
                &[("CNI_IFNAME", "a-very-long-ifname")],
                "CNI_IFNAME",
                code::INVALID_ENV,
            ),
            (
                &[("CNI_ARGS", "K8S_POD_NAME")],
                "CNI_ARGS",
                code::INVALID_ENV,
            ),
        ] {
            let e = env(&with(over)).expect_err(var);
            assert_eq!(e.code(), want_code, "{e}");
            assert!(e.to_string().contains(var), "{var}: {e}");
        }
        let e = env(&with(&[("CNI_ARGS", "K8S_POD_NAMESPACE=default")]))
            .expect("env parses")
            .pod()
            .expect_err("no pod name");
        assert!(e.to_string().contains("K8S_POD_NAME"), "{e}");
        assert_eq!(e.code(), code::INVALID_ENV);
    }

    #[test]
    fn del_needs_no_netns_and_version_needs_only_the_command() {
        let e = env(&with(&[("CNI_COMMAND", "DEL"), ("CNI_NETNS", "")])).expect("DEL");
        assert_eq!(e.netns, None);
        for verb in ["VERSION", "GC", "STATUS"] {
            assert!(env(&[("CNI_COMMAND", verb)]).is_ok(), "{verb}");
        }
    }

    const CONF: &str = r#"{
        "cniVersion": "1.0.0", "name": "membrane", "type": "membrane-cni",
        "agent-socket": "/run/membrane/n/agent.sock",
        "capabilities": {"io.kubernetes.cri.pod-annotations": true},
        "runtimeConfig": {"io.kubernetes.cri.pod-annotations": {"membrane.io/labels": "app=web, tier=front"}},
        "cni.dev/attachments": []
    }"#;

    #[test]
    fn a_runtime_config_parses_with_the_pod_labels() {
        let conf = NetConf::parse(CONF.as_bytes()).expect("parses");
        assert_eq!(conf.name, "membrane");
        assert_eq!(
            conf.pod_labels().expect("labels"),
            vec!["app=web", "tier=front"]
        );
    }

    #[test]
    fn malformed_configurations_are_refused_with_the_key() {
        let patch = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v: serde_json::Value = serde_json::from_str(CONF).expect("json");
            f(&mut v);
            NetConf::parse(v.to_string().as_bytes())
        };
        let e = NetConf::parse(b"{\"cniVersion\": ").expect_err("truncated");
        assert_eq!(e.code(), code::DECODE_FAILURE);
        let e = NetConf::parse(b"[]").expect_err("array");
        assert_eq!(e.code(), code::INVALID_CONFIG);
        let e = patch(&|v| v["cniVersion"] = "0.3.1".into()).expect_err("old version");
        assert_eq!(e.code(), code::INCOMPATIBLE_VERSION);
        assert!(e.to_string().contains("0.3.1"), "{e}");
        let e = patch(&|v| {
            v.as_object_mut().expect("obj").remove("name");
        })
        .expect_err("no name");
        assert!(e.to_string().contains("`name`"), "{e}");
        let e = patch(&|v| v["agent-sokcet"] = "/x".into()).expect_err("typo");
        assert_eq!(e.code(), code::INVALID_CONFIG);
        assert!(e.to_string().contains("agent-sokcet"), "{e}");
        let e = patch(&|v| v["type"] = "bridge".into()).expect_err("type");
        assert!(e.to_string().contains("bridge"), "{e}");
        let e =
            patch(&|v| v["ipam"] = serde_json::json!({"type": "host-local"})).expect_err("ipam");
        assert_eq!(e.code(), code::UNSUPPORTED_FIELD);
        let e = patch(&|v| {
            v["runtimeConfig"]["io.kubernetes.cri.pod-annotations"] = serde_json::json!([1])
        })
        .expect_err("annotations");
        assert!(e.to_string().contains("pod-annotations"), "{e}");
        let bad_labels = patch(&|v| {
            v["runtimeConfig"]["io.kubernetes.cri.pod-annotations"]["membrane.io/labels"] =
                "app=web,oops".into()
        })
        .expect("parses");
        let e = bad_labels.pod_labels().expect_err("label");
        assert_eq!(e.code(), code::BAD_POD_LABELS);
        assert!(e.to_string().contains("oops"), "{e}");
    }
}
