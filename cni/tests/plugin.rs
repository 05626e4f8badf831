//! `membrane-cni` as the runtime runs it, on bad input and without an agent: each answer is
//! the spec's error result on stdout with its code and a message naming what was wrong, and
//! a non-zero exit. No root needed; nothing is created.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

fn plugin(env: &[(&str, &str)], stdin: &str) -> (bool, serde_json::Value) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_membrane-cni"))
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run membrane-cni");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    let value = if out.stdout.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", out.stdout))
    };
    (out.status.success(), value)
}

fn conf(socket: &str) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0", "name": "membrane", "type": "membrane-cni",
        "agent-socket": socket,
    })
    .to_string()
}

const DEAD_SOCKET: &str = "/nonexistent/membrane-cni-test/agent.sock";

fn add_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c0ffee"),
        ("CNI_NETNS", "/nonexistent/netns"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web"),
        ("CNI_PATH", "/opt/cni/bin"),
    ]
}

fn assert_error(ok: bool, v: &serde_json::Value, code: u64, mentions: &str) {
    assert!(!ok, "must fail: {v}");
    assert_eq!(v["code"], code, "{v}");
    let msg = v["msg"].as_str().unwrap_or_default();
    assert!(
        msg.contains(mentions),
        "message should name `{mentions}`: {msg}"
    );
}

#[test]
fn version_lists_both_spec_versions() {
    let (ok, v) = plugin(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"1.1.0"}"#);
    assert!(ok, "{v}");
    assert_eq!(v["cniVersion"], "1.1.0");
    assert_eq!(
        v["supportedVersions"],
        serde_json::json!(["1.0.0", "1.1.0"])
    );
}

#[test]
fn an_unknown_command_or_missing_variable_is_invalid_env() {
    let (ok, v) = plugin(&[("CNI_COMMAND", "UPDATE")], &conf(DEAD_SOCKET));
    assert_error(ok, &v, 4, "CNI_COMMAND");
    let (ok, v) = plugin(&[], &conf(DEAD_SOCKET));
    assert_error(ok, &v, 4, "CNI_COMMAND");
    let env: Vec<_> = add_env()
        .into_iter()
        .filter(|(k, _)| *k != "CNI_NETNS")
        .collect();
    let (ok, v) = plugin(&env, &conf(DEAD_SOCKET));
    assert_error(ok, &v, 4, "CNI_NETNS");
    let mut env = add_env();
    env.retain(|(k, _)| *k != "CNI_ARGS");
    let (ok, v) = plugin(&env, &conf(DEAD_SOCKET));
    assert_error(ok, &v, 4, "K8S_POD_NAMESPACE");
}

#[test]
fn a_malformed_configuration_is_refused() {
    let (ok, v) = plugin(&add_env(), "{\"cniVersion\": \"1.0.0\", ");
    assert_error(ok, &v, 6, "not JSON");
    let (ok, v) = plugin(
        &add_env(),
        r#"{"cniVersion":"1.0.0","name":"m","type":"membrane-cni"}"#,
    );
    assert_error(ok, &v, 7, "agent-socket");
    let (ok, v) = plugin(
        &add_env(),
        r#"{"cniVersion":"0.2.0","name":"m","type":"membrane-cni","agent-socket":"/x"}"#,
    );
    assert_error(ok, &v, 1, "0.2.0");
}

#[test]
fn without_an_agent_add_and_del_say_try_again_later_and_status_not_available() {
    let (ok, v) = plugin(&add_env(), &conf(DEAD_SOCKET));
    assert_error(ok, &v, 11, DEAD_SOCKET);
    let mut del = add_env();
    del[0] = ("CNI_COMMAND", "DEL");
    let (ok, v) = plugin(&del, &conf(DEAD_SOCKET));
    assert_error(ok, &v, 11, DEAD_SOCKET);
    let (ok, v) = plugin(&[("CNI_COMMAND", "STATUS")], &conf(DEAD_SOCKET));
    assert_error(ok, &v, 50, DEAD_SOCKET);
}
