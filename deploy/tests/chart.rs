//! The chart rendered for the seed guide's values (`deploy/examples/cilium-values.yaml`):
//! every object deserializes strictly into the Kubernetes API types (k8s-openapi; decoded,
//! re-encoded and compared, so an unknown or mistyped field fails), the CRDs into
//! apiextensions v1; each value lands in the field it should; values membrane does not do
//! and bad values fail naming the key.

use std::collections::BTreeMap;

use clap::Parser as _;
use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment},
    core::v1::{ConfigMap, Service, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use membrane_agent_api::args::{AgentArgs, ClusterArgs, KvstoreKind};
use membrane_deploy::{InstallError, Release, Rendered, render};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value as Json;

const SEED: &str = include_str!("../examples/cilium-values.yaml");

fn render_seed() -> Rendered {
    render("cilium-values.yaml", Some(SEED), &Release::default())
        .unwrap_or_else(|e| panic!("the seed's values must render: {e}"))
}

/// The seed's values with `path` set to `value` (YAML).
fn seed_with(path: &str, value: &str) -> String {
    let mut doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(SEED).expect("seed");
    let mut cur = &mut doc;
    let keys: Vec<&str> = path.split('.').collect();
    for key in &keys[..keys.len() - 1] {
        let map = cur.as_mapping_mut().expect("mapping");
        cur = map
            .entry((*key).into())
            .or_insert_with(|| serde_yaml_ng::Value::Mapping(Default::default()));
    }
    let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(value).expect("value");
    cur.as_mapping_mut()
        .expect("mapping")
        .insert((*keys.last().expect("key")).into(), value);
    serde_yaml_ng::to_string(&doc).expect("yaml")
}

fn json_of(yaml: &serde_yaml_ng::Value) -> Json {
    serde_json::to_value(yaml).expect("yaml as json")
}

/// The first path where `a` and `b` differ.
fn diff(a: &Json, b: &Json, path: &str) -> Option<String> {
    match (a, b) {
        (Json::Object(x), Json::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let p = format!("{path}.{k}");
                match (x.get(k), y.get(k)) {
                    (Some(u), Some(v)) => {
                        if let Some(d) = diff(u, v, &p) {
                            return Some(d);
                        }
                    }
                    (Some(u), None) => return Some(format!("{p}: {u} is dropped by the API type")),
                    (None, Some(v)) => return Some(format!("{p}: {v} appears")),
                    (None, None) => {}
                }
            }
            None
        }
        (Json::Array(x), Json::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (u, v))| diff(u, v, &format!("{path}[{i}]"))),
        (x, y) if x == y => None,
        // JSON has one number type: 65535 and 65535.0 (a float64 field) are the same value.
        (Json::Number(x), Json::Number(y)) if x.as_f64() == y.as_f64() => None,
        (x, y) => Some(format!("{path}: {x} became {y}")),
    }
}

/// Decodes `doc` as `T` and encodes it again: anything the type does not know or reads
/// differently shows as a difference.
fn strict<T: DeserializeOwned + Serialize>(doc: &Json) -> Result<T, String> {
    let typed: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    match diff(doc, &back, "") {
        None => Ok(typed),
        Some(d) => Err(d),
    }
}

/// prometheus-operator's ServiceMonitor (`monitoring.coreos.com/v1`), the fields the chart
/// uses, strictly (k8s-openapi does not have it).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceMonitor {
    api_version: String,
    kind: String,
    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    spec: ServiceMonitorSpec,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceMonitorSpec {
    selector: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    namespace_selector: NamespaceSelector,
    endpoints: Vec<MonitorEndpoint>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NamespaceSelector {
    match_names: Vec<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MonitorEndpoint {
    port: String,
    interval: String,
    path: String,
    honor_labels: bool,
}

/// The rendered objects, each decoded strictly into its API type.
#[derive(Default)]
struct Objects {
    config_maps: BTreeMap<String, ConfigMap>,
    services: BTreeMap<String, Service>,
    accounts: BTreeMap<String, ServiceAccount>,
    daemonsets: BTreeMap<String, DaemonSet>,
    deployments: BTreeMap<String, Deployment>,
    roles: BTreeMap<String, ClusterRole>,
    bindings: BTreeMap<String, ClusterRoleBinding>,
    crds: BTreeMap<String, CustomResourceDefinition>,
    monitors: BTreeMap<String, ServiceMonitor>,
}

fn decode_all(rendered: &Rendered) -> Objects {
    let mut objects = Objects::default();
    let mut problems = Vec::new();
    let all = rendered.objects();
    let docs: usize = rendered
        .crds
        .iter()
        .chain(&rendered.manifests)
        .map(|f| f.documents.len())
        .sum();
    assert_eq!(all.len(), docs, "every document parses as YAML");
    for (file, yaml) in all {
        let doc = json_of(&yaml);
        let api = doc["apiVersion"].as_str().unwrap_or_default().to_owned();
        let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
        let name = doc["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let result = match (api.as_str(), kind.as_str()) {
            ("v1", "ConfigMap") => strict(&doc).map(|o| {
                objects.config_maps.insert(name.clone(), o);
            }),
            ("v1", "Service") => strict(&doc).map(|o| {
                objects.services.insert(name.clone(), o);
            }),
            ("v1", "ServiceAccount") => strict(&doc).map(|o| {
                objects.accounts.insert(name.clone(), o);
            }),
            ("apps/v1", "DaemonSet") => strict(&doc).map(|o| {
                objects.daemonsets.insert(name.clone(), o);
            }),
            ("apps/v1", "Deployment") => strict(&doc).map(|o| {
                objects.deployments.insert(name.clone(), o);
            }),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => strict(&doc).map(|o| {
                objects.roles.insert(name.clone(), o);
            }),
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => strict(&doc).map(|o| {
                objects.bindings.insert(name.clone(), o);
            }),
            ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => strict(&doc).map(|o| {
                objects.crds.insert(name.clone(), o);
            }),
            ("monitoring.coreos.com/v1", "ServiceMonitor") => strict(&doc).map(|o| {
                objects.monitors.insert(name.clone(), o);
            }),
            _ => Err("no API type known to this test".to_owned()),
        };
        if let Err(e) = result {
            problems.push(format!("{file}: {api} {kind} {name}: {e}"));
        }
    }
    assert!(
        problems.is_empty(),
        "objects that are not strictly their API type:\n{}",
        problems.join("\n")
    );
    objects
}

#[test]
fn chart_files_are_the_folder() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("helm/membrane");
    let mut on_disk = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("chart folder") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path
                    .strip_prefix(&root)
                    .expect("inside")
                    .to_string_lossy()
                    .into_owned();
                on_disk.push(rel);
            }
        }
    }
    on_disk.sort();
    let mut compiled: Vec<String> = membrane_deploy::CHART_FILES
        .iter()
        .map(|(p, _)| (*p).to_owned())
        .collect();
    compiled.sort();
    assert_eq!(
        compiled, on_disk,
        "CHART_FILES must list every file of deploy/helm/membrane"
    );
    for (path, text) in membrane_deploy::CHART_FILES {
        let disk = std::fs::read_to_string(root.join(path)).expect("read");
        assert_eq!(&disk, text, "{path}: compiled copy differs from the file");
    }
}

fn names<T>(m: &BTreeMap<String, T>) -> Vec<String> {
    m.keys().cloned().collect()
}

#[test]
fn seed_values_render_into_strict_kubernetes_objects() {
    let rendered = render_seed();
    let objects = decode_all(&rendered);
    assert_eq!(
        names(&objects.crds),
        [
            "ciliumclusterwidenetworkpolicies.cilium.io",
            "ciliumnetworkpolicies.cilium.io",
            "wasmfilters.membrane.io"
        ]
    );
    assert_eq!(names(&objects.daemonsets), ["membrane"]);
    assert_eq!(names(&objects.deployments), ["hubble-ui", "membrane-relay"]);
    assert_eq!(
        names(&objects.services),
        ["hubble-metrics", "hubble-peer", "hubble-relay", "hubble-ui"]
    );
    assert_eq!(
        names(&objects.accounts),
        ["hubble-ui", "membrane", "membrane-relay"]
    );
    assert_eq!(names(&objects.roles), ["hubble-ui", "membrane"]);
    assert_eq!(names(&objects.bindings), ["hubble-ui", "membrane"]);
    assert_eq!(names(&objects.config_maps), ["membrane-config"]);
    assert_eq!(names(&objects.monitors), ["hubble"]);
    // The YAML stream `membrane install --dry-run` prints holds the same documents.
    let stream = rendered.to_yaml_stream();
    assert_eq!(
        stream.matches("---\n# Source: membrane/").count(),
        rendered.objects().len()
    );
}

#[test]
fn crds_cover_the_policy_kinds_membrane_accepts() {
    let objects = decode_all(&render_seed());
    let kinds: BTreeMap<String, (String, Vec<String>, String)> = objects
        .crds
        .values()
        .map(|c| {
            (
                c.spec.names.kind.clone(),
                (
                    c.spec.group.clone(),
                    c.spec.versions.iter().map(|v| v.name.clone()).collect(),
                    c.spec.scope.clone(),
                ),
            )
        })
        .collect();
    assert_eq!(
        kinds["CiliumNetworkPolicy"],
        ("cilium.io".into(), vec!["v2".into()], "Namespaced".into())
    );
    assert_eq!(
        kinds["CiliumClusterwideNetworkPolicy"],
        ("cilium.io".into(), vec!["v2".into()], "Cluster".into())
    );
    assert_eq!(
        kinds["WasmFilter"],
        (
            membrane_agent_api::wasm_resource::API_VERSION
                .split('/')
                .next()
                .expect("group")
                .into(),
            vec![
                membrane_agent_api::wasm_resource::API_VERSION
                    .split('/')
                    .nth(1)
                    .expect("version")
                    .into()
            ],
            "Namespaced".into()
        )
    );
    // Every example policy is one of these kinds (or Kubernetes' own NetworkPolicy) and is
    // valid against its CRD's schema, as an apiserver would check it.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/policies") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml")
            || path.ends_with("endpoints.yaml")
        {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read");
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v = serde_yaml_ng::Value::deserialize(doc).expect("yaml");
            if v.is_null() {
                continue;
            }
            let doc = json_of(&v);
            let kind = doc["kind"].as_str().expect("kind");
            if kind == "NetworkPolicy" {
                continue;
            }
            let crd = objects
                .crds
                .values()
                .find(|c| c.spec.names.kind == kind)
                .unwrap_or_else(|| panic!("{}: no CRD for kind {kind}", path.display()));
            let want_api = format!("{}/{}", crd.spec.group, crd.spec.versions[0].name);
            assert_eq!(
                doc["apiVersion"],
                Json::String(want_api),
                "{}",
                path.display()
            );
            let schema = serde_json::to_value(
                crd.spec.versions[0]
                    .schema
                    .as_ref()
                    .and_then(|s| s.open_api_v3_schema.as_ref())
                    .expect("schema"),
            )
            .expect("schema json");
            let mut problems = Vec::new();
            check_against_crd(&schema, &doc, "", &mut problems);
            assert!(problems.is_empty(), "{}: {problems:?}", path.display());
            checked += 1;
        }
    }
    assert!(checked >= 4, "only {checked} example policies checked");
}

/// An apiserver's structural-schema check, for the keywords the CRDs use.
fn check_against_crd(schema: &Json, v: &Json, path: &str, out: &mut Vec<String>) {
    if schema.get("x-kubernetes-int-or-string") == Some(&Json::Bool(true)) {
        if !(v.is_string() || v.is_i64() || v.is_u64()) {
            out.push(format!("{path}: expected an int or a string"));
        }
        return;
    }
    let ty = schema.get("type").and_then(Json::as_str).unwrap_or("");
    let ok = match ty {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "boolean" => v.is_boolean(),
        "" => true,
        _ => false,
    };
    if !ok {
        out.push(format!("{path}: expected {ty}, found {v}"));
        return;
    }
    if let Some(Json::Array(allowed)) = schema.get("enum")
        && !allowed.contains(v)
    {
        out.push(format!("{path}: {v} not in {allowed:?}"));
    }
    if let (Some(items), Json::Array(list)) = (schema.get("items"), v) {
        for (i, item) in list.iter().enumerate() {
            check_against_crd(items, item, &format!("{path}[{i}]"), out);
        }
    }
    if let Json::Object(map) = v {
        for r in schema
            .get("required")
            .and_then(Json::as_array)
            .into_iter()
            .flatten()
        {
            if !map.contains_key(r.as_str().unwrap_or_default()) {
                out.push(format!("{path}.{r}: required"));
            }
        }
        let props = schema.get("properties").and_then(Json::as_object);
        for (k, item) in map {
            let p = format!("{path}.{k}");
            if let Some(sub) = props.and_then(|p| p.get(k)) {
                check_against_crd(sub, item, &p, out);
            } else if let Some(sub @ Json::Object(_)) = schema.get("additionalProperties") {
                check_against_crd(sub, item, &p, out);
            } else if props.is_some()
                && schema.get("x-kubernetes-preserve-unknown-fields") != Some(&Json::Bool(true))
                && path != ".metadata"
            {
                out.push(format!("{p}: unknown field (the apiserver would prune it)"));
            }
        }
    }
}

fn data(o: &Objects) -> &BTreeMap<String, String> {
    o.config_maps["membrane-config"]
        .data
        .as_ref()
        .expect("data")
}

#[test]
fn each_seed_value_lands_where_it_should() {
    let rendered = render_seed();
    let o = decode_all(&rendered);
    let cm = data(&o);
    let ds = &o.daemonsets["membrane"];
    let pod = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec");
    let agent = pod
        .containers
        .iter()
        .find(|c| c.name == "agent")
        .expect("agent container");
    let port = |c: &k8s_openapi::api::core::v1::Container, name: &str| {
        c.ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port)
    };

    // hubble.enabled: true → ConfigMap enable-hubble, the agent's 4244 and the hubble-peer Service.
    assert_eq!(
        cm["enable-hubble"], "true",
        "hubble.enabled → membrane-config enable-hubble"
    );
    assert_eq!(
        port(agent, "hubble-grpc"),
        Some(4244),
        "hubble.enabled → agent port hubble-grpc"
    );
    let peer = o.services["hubble-peer"].spec.as_ref().expect("spec");
    assert_eq!(
        peer.ports.as_ref().expect("ports")[0].target_port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(4244)),
        "hubble.enabled → Service hubble-peer targetPort"
    );

    // hubble.metrics.enabled → ConfigMap hubble-metrics, the agent's 9965, Service hubble-metrics.
    assert_eq!(
        cm["hubble-metrics"], "dns drop tcp flow httpV2",
        "hubble.metrics.enabled → hubble-metrics"
    );
    assert_eq!(
        cm["hubble-metrics-server"], ":9965",
        "hubble.metrics.enabled → hubble-metrics-server"
    );
    assert_eq!(
        port(agent, "hubble-metrics"),
        Some(9965),
        "hubble.metrics.enabled → agent port hubble-metrics"
    );
    assert_eq!(
        o.services["hubble-metrics"]
            .spec
            .as_ref()
            .and_then(|s| s.selector.clone()),
        Some(BTreeMap::from([(
            "k8s-app".to_owned(),
            "membrane".to_owned()
        )])),
        "hubble.metrics.enabled → Service hubble-metrics selects the agents"
    );
    // hubble.metrics.serviceMonitor.enabled → ServiceMonitor hubble scraping that Service's port.
    let sm = &o.monitors["hubble"].spec;
    assert_eq!(
        sm.endpoints[0].port, "hubble-metrics",
        "serviceMonitor → spec.endpoints[0].port"
    );
    assert_eq!(sm.endpoints[0].interval, "10s");
    assert_eq!(
        sm.selector
            .match_labels
            .as_ref()
            .and_then(|m| m.get("k8s-app"))
            .map(String::as_str),
        Some("hubble"),
        "serviceMonitor → spec.selector matches Service hubble-metrics"
    );
    assert_eq!(
        o.services["hubble-metrics"]
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("k8s-app"))
            .map(String::as_str),
        Some("hubble")
    );

    // hubble.relay.enabled → Deployment membrane-relay on 4245, Service hubble-relay.
    let relay = &o.deployments["membrane-relay"];
    let relay_pod = relay
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("relay pod");
    assert_eq!(
        relay_pod.containers[0].command.as_deref(),
        Some(&["membrane-relay".to_owned()][..])
    );
    assert_eq!(
        port(&relay_pod.containers[0], "grpc"),
        Some(4245),
        "hubble.relay.enabled → relay port 4245"
    );
    assert_eq!(
        relay.spec.as_ref().and_then(|s| s.replicas),
        Some(1),
        "hubble.relay.replicas → spec.replicas"
    );
    assert!(
        o.services.contains_key("hubble-relay"),
        "hubble.relay.enabled → Service hubble-relay"
    );

    // hubble.ui.enabled → Deployment hubble-ui reading the relay.
    let ui_pod = o.deployments["hubble-ui"]
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("ui pod");
    let backend = ui_pod
        .containers
        .iter()
        .find(|c| c.name == "backend")
        .expect("backend");
    let flows_addr = backend
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "FLOWS_API_ADDR")
        .and_then(|e| e.value.clone());
    assert_eq!(
        flows_addr.as_deref(),
        Some("hubble-relay:80"),
        "hubble.ui.enabled → backend FLOWS_API_ADDR"
    );

    // operator.replicas: 0 → no operator Deployment.
    assert!(
        !o.deployments.keys().any(|k| k.contains("operator")),
        "operator.replicas: 0 → no operator"
    );

    // routingMode, ipv4NativeRoutingCIDR, bandwidthManager, ipam, kubeProxyReplacement,
    // loadBalancer, localRedirectPolicy, encryption → membrane-config (Cilium's keys).
    for (key, field, want) in [
        ("routingMode", "routing-mode", "native"),
        (
            "ipv4NativeRoutingCIDR",
            "ipv4-native-routing-cidr",
            "10.0.0.0/8",
        ),
        (
            "bandwidthManager.enabled",
            "enable-bandwidth-manager",
            "false",
        ),
        ("ipam.mode", "ipam", "cluster-pool"),
        (
            "ipam.operator.clusterPoolIPv4PodCIDRList",
            "cluster-pool-ipv4-cidr",
            "10.0.0.0/8",
        ),
        (
            "ipam.operator.clusterPoolIPv4MaskSize",
            "cluster-pool-ipv4-mask-size",
            "24",
        ),
        ("kubeProxyReplacement", "kube-proxy-replacement", "true"),
        ("loadBalancer.mode", "bpf-lb-mode", "snat"),
        ("loadBalancer.algorithm", "bpf-lb-algorithm", "maglev"),
        (
            "localRedirectPolicy",
            "enable-local-redirect-policy",
            "false",
        ),
        ("encryption.enabled", "enable-wireguard", "false"),
        ("encryption.enabled", "enable-ipsec", "false"),
    ] {
        assert_eq!(
            cm.get(field).map(String::as_str),
            Some(want),
            "{key} → membrane-config {field}"
        );
    }

    // resources → the agent container's resources.
    let res = agent.resources.as_ref().expect("resources");
    let q =
        |m: &Option<BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>,
         k: &str| { m.as_ref().and_then(|m| m.get(k)).map(|q| q.0.clone()) };
    assert_eq!(
        q(&res.limits, "cpu").as_deref(),
        Some("1000m"),
        "resources.limits.cpu → agent resources"
    );
    assert_eq!(
        q(&res.limits, "memory").as_deref(),
        Some("1Gi"),
        "resources.limits.memory"
    );
    assert_eq!(
        q(&res.requests, "cpu").as_deref(),
        Some("100m"),
        "resources.requests.cpu"
    );
    assert_eq!(
        q(&res.requests, "memory").as_deref(),
        Some("512Mi"),
        "resources.requests.memory"
    );

    // The agent's command line is AgentArgs rendered (no etcd in the seed: one node's store).
    let mut want = AgentArgs::new("membrane", "membrane-node");
    want.cluster.node_name = Some("node-1".into());
    let (_, args) = membrane_deploy::agent_container_args(&rendered).expect("agent args");
    assert_eq!(
        args,
        want.to_args(),
        "the DaemonSet's agent args are AgentArgs::to_args()"
    );
    // The CNI plugin's init container installs into cni.binPath.
    let init = pod.init_containers.as_ref().expect("init containers");
    assert!(init.iter().any(|c| c.name == "install-cni-plugin"));
    let cni_bin = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "cni-bin")
        .and_then(|v| v.host_path.clone());
    assert_eq!(
        cni_bin.map(|h| h.path).as_deref(),
        Some("/opt/cni/bin"),
        "cni.binPath → volume cni-bin"
    );
}

#[test]
fn etcd_values_become_the_agents_cluster_args() {
    let values = "etcd:\n  enabled: true\n  endpoints: [https://10.0.0.1:2379, https://10.0.0.2:2379]\ncluster:\n  name: east\n";
    let rendered = render("v.yaml", Some(values), &Release::default()).expect("render");
    let (_, args) = membrane_deploy::agent_container_args(&rendered).expect("args");
    let mut want = AgentArgs::new("membrane", "membrane-node");
    want.cluster = ClusterArgs {
        kvstore: Some(KvstoreKind::Etcd),
        kvstore_endpoints: vec![
            "https://10.0.0.1:2379".into(),
            "https://10.0.0.2:2379".into(),
        ],
        cluster_name: "east".into(),
        node_name: Some("node-1".into()),
        node_ip: Some("192.0.2.1".parse().expect("ip")),
        ..ClusterArgs::default()
    };
    assert_eq!(
        args,
        want.to_args(),
        "etcd.endpoints, cluster.name → the agent's --kvstore-*, --cluster-name"
    );
    let parsed =
        AgentArgs::try_parse_from(std::iter::once("membrane-agent".to_owned()).chain(args))
            .expect("parse");
    assert_eq!(parsed, want);
    assert_eq!(
        data(&decode_all(&rendered))["kvstore-endpoints"],
        "https://10.0.0.1:2379,https://10.0.0.2:2379"
    );
}

#[test]
fn the_charts_defaults_render() {
    let rendered = render("values.yaml", None, &Release::default()).expect("defaults");
    let o = decode_all(&rendered);
    assert!(
        o.deployments.is_empty(),
        "no relay, UI or operator by default"
    );
    assert!(!o.services.contains_key("hubble-metrics"));
    assert!(o.monitors.is_empty());
    assert!(
        rendered.notes.contains("Without etcd"),
        "{}",
        rendered.notes
    );
    let other = render(
        "values.yaml",
        None,
        &Release {
            name: "m".into(),
            namespace: "net".into(),
        },
    )
    .expect("ns");
    let o = decode_all(&other);
    assert_eq!(
        o.daemonsets["membrane"].metadata.namespace.as_deref(),
        Some("net"),
        "the release namespace"
    );
}

fn refused(values: &str) -> String {
    match render("cilium-values.yaml", Some(values), &Release::default()) {
        Ok(_) => panic!("rendered, but should have failed:\n{values}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn seed_values_membrane_does_not_do_fail_naming_the_key() {
    for (key, value, says) in [
        (
            "encryption.enabled",
            "true",
            "encryption.enabled (encryption.type: wireguard)",
        ),
        (
            "encryption.nodeEncryption",
            "true",
            "encryption.nodeEncryption",
        ),
        ("bgp.enabled", "true", "bgp.enabled"),
        ("bgpControlPlane.enabled", "true", "bgpControlPlane.enabled"),
        (
            "bandwidthManager.enabled",
            "true",
            "bandwidthManager.enabled",
        ),
        ("loadBalancer.mode", "dsr", "loadBalancer.mode: \"dsr\""),
        ("localRedirectPolicy", "true", "localRedirectPolicy"),
        ("operator.replicas", "2", "operator.replicas"),
        ("hubble.enabled", "false", "hubble.enabled"),
        (
            "hubble.metrics.enabled",
            "[dns, drop, tcp, flow, port-distribution, icmp]",
            "hubble.metrics.enabled[4]: \"port-distribution\"",
        ),
        (
            "hubble.metrics.enabled",
            "[dns, \"httpV2:exemplars=true;labelsContext=source_ip\"]",
            "hubble.metrics.enabled[1]",
        ),
        ("hubble.relay.enabled", "false", "hubble.ui.enabled"),
        ("ipam.mode", "kubernetes", "ipam.mode: \"kubernetes\""),
        (
            "ipv4NativeRoutingCIDR",
            "\"\"",
            "ipv4NativeRoutingCIDR: required with routingMode: native",
        ),
        ("tunnelProtocol", "geneve", "tunnelProtocol"),
    ] {
        let message = refused(&seed_with(key, value));
        assert!(message.contains(says), "{key}: {value} → {message}");
        assert!(
            message.starts_with("execution error at (membrane/templates/"),
            "{message}"
        );
    }
}

#[test]
fn bad_values_name_the_key() {
    let e = refused(&seed_with(
        "encryption.wireguard",
        "{userspaceFallback: true}",
    ));
    assert!(
        e.contains("encryption.wireguard: unknown key")
            && e.contains("enabled, nodeEncryption, type"),
        "{e}"
    );
    let e = refused(&format!("{SEED}\nhubbel:\n  enabled: true\n"));
    assert!(e.contains("- hubbel: unknown key"), "{e}");
    let e = refused(&seed_with("operator.replicas", "two"));
    assert!(
        e.contains("operator.replicas: expected integer, found string \"two\""),
        "{e}"
    );
    let e = refused(&seed_with("ipam.operator.clusterPoolIPv4MaskSize", "40"));
    assert!(
        e.contains("ipam.operator.clusterPoolIPv4MaskSize: 40 is above the maximum 30"),
        "{e}"
    );
    let e = refused(&seed_with("kubeProxyReplacement", "partial"));
    assert!(
        e.contains("kubeProxyReplacement: \"partial\" is not one of"),
        "{e}"
    );
    let e = refused(&seed_with("loadBalancer.algorithm", "round-robin"));
    assert!(e.contains("loadBalancer.algorithm"), "{e}");
    let e = refused(&seed_with("hubble.metrics.enabled", "[1]"));
    assert!(
        e.contains("hubble.metrics.enabled[0]: expected string"),
        "{e}"
    );
    let e = refused("hubble: [unclosed\n");
    assert!(e.starts_with("cilium-values.yaml: not valid YAML"), "{e}");
    let e = refused("- a\n- b\n");
    assert!(e.contains("must be a mapping"), "{e}");
    // A null removes a chart default (Helm's coalescing); the schema then names the key.
    match render("v.yaml", Some("ipam:\n  mode: null\n"), &Release::default()) {
        Err(InstallError::Values(problems)) => {
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert_eq!(
                (problems[0].key.as_str(), problems[0].problem.as_str()),
                ("ipam.mode", "required")
            );
        }
        other => panic!("expected ipam.mode: required, got {other:?}"),
    }
}

#[test]
fn args_expand_as_kubelet_expands_them() {
    let env = BTreeMap::from([("NODE_NAME".to_owned(), "node-1".to_owned())]);
    assert_eq!(
        membrane_deploy::expand_env("$(NODE_NAME)/$$(NODE_NAME)/$$/$(MISSING)/$x", &env),
        "node-1/$(NODE_NAME)/$/$(MISSING)/$x"
    );
    // No container command or arg of the seed's rendering is changed by kubelet's expansion
    // except the agent's $(NODE_NAME)/$(NODE_IP) (a `$$` meant for a shell would be).
    let rendered = render_seed();
    let empty = BTreeMap::new();
    for (file, obj) in rendered.objects() {
        let doc = json_of(&obj);
        let pod = &doc["spec"]["template"]["spec"];
        for list in ["containers", "initContainers"] {
            for c in pod[list].as_array().into_iter().flatten() {
                for s in ["command", "args"]
                    .iter()
                    .flat_map(|k| c[*k].as_array().into_iter().flatten())
                {
                    let s = s.as_str().expect("string");
                    if s.starts_with("$(NODE_") {
                        continue;
                    }
                    assert_eq!(membrane_deploy::expand_env(s, &empty), s, "{file}: {s}");
                }
            }
        }
    }
}
