//! Errors of the cluster store. Each names what failed: the endpoint, the key, the node or
//! the block; each keeps its source.

use std::net::IpAddr;
use std::path::PathBuf;

use membrane_policy::{Identity, LabelError};

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No etcd endpoint given.
    #[error("no etcd endpoint configured")]
    NoEndpoints,
    /// An endpoint without `http://` or `https://`.
    #[error("etcd endpoint `{endpoint}` must start with http:// or https://")]
    EndpointScheme {
        /// The endpoint as given.
        endpoint: String,
    },
    /// TLS files given for a plain-text endpoint.
    #[error("etcd endpoint `{endpoint}` is http:// but TLS is configured; use https://")]
    TlsWithHttp {
        /// The endpoint as given.
        endpoint: String,
    },
    /// A node or cluster name that cannot be a key path element.
    #[error("{field} name `{value}` is not usable in a key (empty, `/` or control characters)")]
    BadName {
        /// `node`, `cluster`, `namespace`, ….
        field: &'static str,
        /// The name as given.
        value: String,
    },
    /// A lease TTL below what etcd grants.
    #[error("{field} = {secs} s is below etcd's minimum lease TTL of {min} s")]
    TtlTooShort {
        /// The config field.
        field: &'static str,
        /// The value, seconds.
        secs: i64,
        /// The minimum, seconds.
        min: i64,
    },
    /// A zero timeout or interval.
    #[error("{field} must be greater than 0")]
    ZeroDuration {
        /// The config field.
        field: &'static str,
    },
    /// A client certificate without its key or the reverse.
    #[error("TLS client certificate and key must be given together")]
    CertWithoutKey,
}

/// A stored value (or key) that does not parse. Counted in the store's metrics; the entry is
/// skipped, others are unaffected.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Key or value not UTF-8.
    #[error("{what} of key `{key}` is not UTF-8")]
    NotUtf8 {
        /// The key (lossily decoded).
        key: String,
        /// `key` or `value`.
        what: &'static str,
    },
    /// A JSON value that does not match its type.
    #[error("value of key `{key}` is not a valid {type_name}: {source}")]
    Json {
        /// The key.
        key: String,
        /// The value type expected.
        type_name: &'static str,
        /// The JSON error (line, column, field).
        #[source]
        source: serde_json::Error,
    },
    /// A key that is not of the shape its prefix promises.
    #[error("key `{key}` is not a valid {expected} key")]
    Key {
        /// The key.
        key: String,
        /// What was expected (`identity id`, `ipcache`, …).
        expected: &'static str,
    },
    /// An identity number that does not parse or is 0.
    #[error("identity `{text}` in `{key}` is not a numeric identity")]
    IdentityNumber {
        /// The key holding it.
        key: String,
        /// The text found.
        text: String,
    },
    /// A label string that does not parse.
    #[error("labels in `{key}` do not parse: {source}")]
    Labels {
        /// The key holding them.
        key: String,
        /// The label error.
        #[source]
        source: LabelError,
    },
    /// The value disagrees with its key (an ipcache value for another IP, a node value for
    /// another node).
    #[error("value of key `{key}` has {field} `{in_value}`, the key says `{in_key}`")]
    Mismatch {
        /// The key.
        key: String,
        /// The field.
        field: &'static str,
        /// What the key says.
        in_key: String,
        /// What the value says.
        in_value: String,
    },
}

/// Talking to etcd failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The configuration is invalid.
    #[error("cluster store configuration: {0}")]
    Config(#[from] ConfigError),
    /// A TLS file could not be read.
    #[error("cannot read TLS file {path}: {source}")]
    TlsFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The client could not be set up or the first contact failed.
    #[error("cannot connect to etcd at {endpoints}: {source}")]
    Connect {
        /// The endpoints, comma-separated.
        endpoints: String,
        /// The client error.
        #[source]
        source: etcd_client::Error,
    },
    /// The first contact did not complete in time.
    #[error("etcd at {endpoints} did not answer within {timeout_ms} ms")]
    ConnectTimeout {
        /// The endpoints, comma-separated.
        endpoints: String,
        /// The bound, milliseconds.
        timeout_ms: u64,
    },
    /// A request failed.
    #[error("etcd {op} `{key}` at {endpoints} failed: {source}")]
    Request {
        /// `get`, `put`, `txn`, `delete`, `lock`, `lease grant`, ….
        op: &'static str,
        /// The key or prefix.
        key: String,
        /// The endpoints, comma-separated.
        endpoints: String,
        /// The client error.
        #[source]
        source: etcd_client::Error,
    },
    /// A request did not complete in time.
    #[error("etcd {op} `{key}` at {endpoints} timed out after {timeout_ms} ms")]
    Timeout {
        /// The operation.
        op: &'static str,
        /// The key or prefix.
        key: String,
        /// The endpoints, comma-separated.
        endpoints: String,
        /// The bound, milliseconds.
        timeout_ms: u64,
    },
    /// A leased write was asked for while this node has no lease (etcd unreachable).
    #[error("no session lease with etcd at {endpoints}: cannot write leased key `{key}`")]
    NoLease {
        /// The key.
        key: String,
        /// The endpoints, comma-separated.
        endpoints: String,
    },
    /// A stored value that does not parse, on a path that needs it.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The store handle was closed.
    #[error("the cluster store client is closed")]
    Closed,
}

/// Allocating or releasing a cluster-wide identity failed.
#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    /// Talking to etcd failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The empty label set has no identity.
    #[error("cannot allocate an identity for an empty label set")]
    EmptyLabels,
    /// CIDR, `fqdn:` and `cidrgroup:` label sets get node-local identities, never stored.
    #[error(
        "labels `{labels}` have a node-local identity scope; they are not allocated in the cluster store"
    )]
    LocalScope {
        /// The labels.
        labels: String,
    },
    /// A label contains the `;` separator of the stored form.
    #[error("label `{label}` contains `;` and cannot be stored")]
    Unencodable {
        /// The label.
        label: String,
    },
    /// Every identity of the cluster range is taken.
    #[error("no free cluster identity left in {first}..={last}")]
    Exhausted {
        /// First id of the range.
        first: u32,
        /// Last id of the range.
        last: u32,
    },
    /// Lost the race for a new id on every attempt.
    #[error("allocating an identity for `{labels}` lost {attempts} races in a row")]
    Contended {
        /// The labels.
        labels: String,
        /// Attempts made.
        attempts: u32,
    },
    /// The identity's master key holds other labels (the store is inconsistent).
    #[error("identity {id} is stored with labels `{stored}`, not `{wanted}`")]
    Conflict {
        /// The identity.
        id: Identity,
        /// Labels in the master key.
        stored: String,
        /// Labels this node references it for.
        wanted: String,
    },
}

/// Publishing an ipcache entry failed.
#[derive(Debug, thiserror::Error)]
pub enum IpcacheError {
    /// Talking to etcd failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Another node holds the IP (the older claim is kept).
    #[error("IP {ip} is claimed by node `{owner}`; node `{claimant}` cannot publish it")]
    Conflict {
        /// The address.
        ip: IpAddr,
        /// The node whose claim is kept.
        owner: String,
        /// The node whose claim is refused.
        claimant: String,
    },
    /// The key kept changing under every attempt.
    #[error("publishing {ip} lost {attempts} races in a row")]
    Contended {
        /// The address.
        ip: IpAddr,
        /// Attempts made.
        attempts: u32,
    },
    /// An entry naming another node than this one.
    #[error("entry for {ip} names node `{entry_node}`, but this client is node `{node}`")]
    ForeignEntry {
        /// The address.
        ip: IpAddr,
        /// The node in the entry.
        entry_node: String,
        /// This node.
        node: String,
    },
}

/// Cluster-pool IPAM failed.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// Talking to etcd failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A CIDR that does not parse.
    #[error("`{text}` is not an IPv4 CIDR (a.b.c.d/len with no host bits)")]
    BadCidr {
        /// The text.
        text: String,
    },
    /// The block mask is shorter than a pool's prefix, or leaves no room for endpoints.
    #[error("clusterPoolIPv4MaskSize {mask} does not fit pool {pool} (must be in {min}..=30)")]
    BadMask {
        /// The pool.
        pool: String,
        /// The mask size.
        mask: u8,
        /// The pool's prefix length.
        min: u8,
    },
    /// No pool configured.
    #[error("clusterPoolIPv4PodCIDRList is empty")]
    NoPool,
    /// Every block of every pool is claimed.
    #[error(
        "pod CIDR pool exhausted: every /{mask} block of {pools} is claimed (node `{node}` gets none)"
    )]
    PoolExhausted {
        /// The pools, space-separated.
        pools: String,
        /// The block size.
        mask: u8,
        /// The node that asked.
        node: String,
    },
    /// Lost the race for a free block on every attempt.
    #[error("claiming a pod CIDR for node `{node}` lost {attempts} races in a row")]
    Contended {
        /// The node.
        node: String,
        /// Attempts made.
        attempts: u32,
    },
    /// The node's block has no free address left.
    #[error("pod CIDR {block} has no free address left")]
    BlockExhausted {
        /// The block.
        block: String,
    },
    /// An address outside the node's block or not assignable (network, broadcast, router).
    #[error("{ip} is not an assignable address of pod CIDR {block}")]
    NotInBlock {
        /// The address.
        ip: IpAddr,
        /// The block.
        block: String,
    },
    /// An address already in use.
    #[error("{ip} is already allocated in pod CIDR {block}")]
    InUse {
        /// The address.
        ip: IpAddr,
        /// The block.
        block: String,
    },
}
