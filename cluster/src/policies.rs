//! Policy documents in the store (`policies/v1/<kind>/<namespace>/<name>`): put, delete,
//! get, list and watch, so `membrane policy apply` in cluster mode can go through the store
//! and every node's agent picks the documents up. The store keeps the text as applied plus
//! who applied it and when; parsing and validation stay with the agent (`membrane-policy`),
//! which also reports a document that fails to parse.

use std::collections::BTreeMap;

use crate::error::{DecodeError, StoreError};
use crate::keys::{self, PolicyDocument, PolicyFormat, PolicyName, StoreValue};
use crate::store::{Store, now_unix_ms};
use crate::watch::SyncedMap;

/// A policy operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PolicyStoreError {
    /// Talking to etcd failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A kind, namespace or name that cannot be a key path element.
    #[error(
        "policy `{name}` cannot be stored: kind, namespace and name must be non-empty, without `/` (and the namespace not `_`)"
    )]
    BadName {
        /// The name.
        name: String,
    },
}

/// Policy documents of the cluster.
#[derive(Clone)]
pub struct PolicyStore {
    store: Store,
}

impl PolicyStore {
    /// Policy operations over `store`.
    pub fn new(store: &Store) -> PolicyStore {
        PolicyStore {
            store: store.clone(),
        }
    }

    fn key(name: &PolicyName) -> Result<String, PolicyStoreError> {
        keys::policy_key(name).ok_or_else(|| PolicyStoreError::BadName {
            name: name.to_string(),
        })
    }

    /// Stores (or replaces) a document; returns the store revision of the write.
    pub async fn put(
        &self,
        name: &PolicyName,
        text: String,
        format: PolicyFormat,
        applied_by: &str,
    ) -> Result<i64, PolicyStoreError> {
        let key = Self::key(name)?;
        let doc = PolicyDocument {
            text,
            format,
            applied_by: applied_by.to_owned(),
            applied_at_unix_ms: now_unix_ms(),
        };
        Ok(self.store.inner().put(&key, doc.encode(), false).await?)
    }

    /// Deletes a document; true if it existed.
    pub async fn delete(&self, name: &PolicyName) -> Result<bool, PolicyStoreError> {
        let key = Self::key(name)?;
        Ok(self.store.inner().delete(&key).await?)
    }

    /// One document.
    pub async fn get(&self, name: &PolicyName) -> Result<Option<PolicyDocument>, PolicyStoreError> {
        let key = Self::key(name)?;
        let Some(kv) = self.store.inner().get(&key).await? else {
            return Ok(None);
        };
        Ok(Some(
            PolicyDocument::decode(&key, kv.value()).map_err(StoreError::from)?,
        ))
    }

    /// Every document (values that do not parse are counted and left out).
    pub async fn list(&self) -> Result<BTreeMap<PolicyName, PolicyDocument>, PolicyStoreError> {
        let (kvs, _) = self
            .store
            .inner()
            .get_prefix(keys::POLICIES_PREFIX, false)
            .await?;
        let mut out = BTreeMap::new();
        for kv in kvs {
            let decoded = keys::key_str(kv.key()).and_then(|k| {
                Ok::<_, DecodeError>((
                    keys::parse_policy_key(k)?,
                    PolicyDocument::decode(k, kv.value())?,
                ))
            });
            match decoded {
                Ok((n, d)) => {
                    out.insert(n, d);
                }
                Err(e) => self.store.inner().metrics.bad_value(&e),
            }
        }
        Ok(out)
    }

    /// Mirrors every document and streams changes (keys are store keys:
    /// [`keys::parse_policy_key`] gives the name).
    pub fn watch(&self) -> SyncedMap<PolicyDocument> {
        SyncedMap::start(&self.store, keys::POLICIES_PREFIX.to_owned(), None)
    }
}
