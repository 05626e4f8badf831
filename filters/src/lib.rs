//! membrane's Wasm filter host: the wasmtime engine, the proxy-wasm ABI (v0.2.1, accepting
//! 0.2.0), instance pools with stream affinity, per-callback deadlines, memory caps, failure
//! policies and atomic hot reload. It implements `membrane-l7proxy`'s filter-chain trait.
//!
//! The only crate allowed to depend on `wasmtime`. Must not depend on the datapath or agent.
//!
//! Status: empty. The host is built by the Wasm filters issue.
