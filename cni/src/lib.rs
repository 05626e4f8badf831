//! `membrane-cni`, the CNI plugin (spec 1.0.0 and 1.1.0: ADD, DEL, CHECK, VERSION, GC,
//! STATUS) the container runtime runs for every pod sandbox. It wires the pod's veth from
//! the runtime's network namespace (the node namespace the agent manages) into the
//! container's, and asks the node's agent, over its local API, for the pod's address (the
//! agent's node IPAM) and to register the endpoint with the pod's labels; the agent answers
//! once the endpoint's programs enforce its policy.
//!
//! Modules: [`request`] (environment and stdin, checked), [`verbs`], [`plumbing`] (veth,
//! addresses, routes), [`result`] (what ADD prints), [`error`] (the spec's error codes).
//! Talks to the agent only through `membrane-agent-api`; no aya, no async runtime.

pub mod error;
pub mod plumbing;
pub mod request;
pub mod result;
pub mod verbs;

use error::CniError;
use request::{Env, NetConf, Verb};
use verbs::Output;

/// Runs one request: `var` reads the environment, `stdin` is the configuration. Returns
/// what to print on stdout and whether it is an error.
pub fn run(var: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> (String, bool) {
    let version_hint = request::requested_version(stdin)
        .unwrap_or_else(|| membrane_agent_api::cni::CONFLIST_CNI_VERSION.to_owned());
    let outcome = (|| -> Result<Output, CniError> {
        let env = Env::parse(&var)?;
        if env.verb == Verb::Version {
            return Ok(verbs::version(request::requested_version(stdin)));
        }
        let conf = NetConf::parse(stdin)?;
        match env.verb {
            Verb::Add => verbs::add(&env, &conf),
            Verb::Del => verbs::del(&env, &conf),
            Verb::Check => verbs::check(&env, &conf),
            Verb::Gc => verbs::gc(&conf),
            Verb::Status => verbs::status(&conf),
            Verb::Version => unreachable!("answered above"),
        }
    })();
    match outcome {
        Ok(Output::Add(r)) => (serde_json::to_string(&r).unwrap_or_default(), false),
        Ok(Output::Version(v)) => (serde_json::to_string(&v).unwrap_or_default(), false),
        Ok(Output::Nothing) => (String::new(), false),
        Err(e) => (
            serde_json::to_string(&e.to_result(&version_hint)).unwrap_or_default(),
            true,
        ),
    }
}
