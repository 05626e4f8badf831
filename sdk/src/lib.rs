//! `membrane-filter-sdk`: the published crate users write proxy-wasm filters with, compiled
//! to `wasm32-wasip1`. It targets the same ABI as Envoy, so its filters also run there.
//!
//! Must not depend on any other crate of this workspace: it is published on its own and
//! builds for the guest target only.
//!
//! Status: empty. The SDK is built by the Wasm filters issue.
#![no_std]
