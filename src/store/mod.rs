//! Durable state behind a trait. The default is an embedded SQLite file in WAL mode with
//! schema migrations ([`sqlite::SqliteStore`]); a shared database for several replicas can
//! implement the same trait later.
//!
//! What returns OK is on disk: writes commit with `synchronous = FULL`, so a policy whose
//! Create/Update returned OK survives `kill -9` and restart.

pub mod sqlite;

use async_trait::async_trait;

use crate::{
    auth::{KeyRecord, KeySpec},
    ledger::{SinkError, UsageSink},
    routing::{PolicyRecord, policy::PolicySpec},
};

/// The default store file, relative to the working directory.
pub const DEFAULT_STORE_PATH: &str = ".llm-gateway/llm-gateway.db";

/// `[store]` as written in the config file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    /// `store.path`.
    pub path: Option<String>,
}

/// The validated `[store]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSettings {
    /// The store file (`:memory:` for none).
    pub path: std::path::PathBuf,
}

impl StoreSettings {
    /// `[store]`: the path, or [`DEFAULT_STORE_PATH`].
    pub fn from_raw(raw: RawStore) -> Self {
        Self {
            path: raw
                .path
                .unwrap_or_else(|| DEFAULT_STORE_PATH.to_owned())
                .into(),
        }
    }
}

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StoreError {
    /// The name is taken.
    #[error("a policy named `{0}` already exists")]
    AlreadyExists(String),
    /// No such record.
    #[error("no policy named `{0}`")]
    NotFound(String),
    /// The expected version is not the current one.
    #[error("policy `{name}` was changed concurrently: current etag is v{current}")]
    Conflict {
        /// The policy.
        name: String,
        /// Its current version.
        current: u64,
    },
    /// No such key, or a key with that name exists.
    #[error("{0}")]
    Key(String),
    /// The backend failed.
    #[error("store failure: {0}")]
    Backend(String),
}

impl From<StoreError> for SinkError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Backend(message) => SinkError(message),
            other => SinkError(other.to_string()),
        }
    }
}

impl From<SinkError> for StoreError {
    fn from(err: SinkError) -> Self {
        StoreError::Backend(err.0)
    }
}

/// Durable storage of policies and keys, and the usage ledger's sink.
#[async_trait]
pub trait Store: UsageSink + Send + Sync + 'static {
    /// Every stored policy, sorted by name.
    async fn list_policies(&self) -> Result<Vec<PolicyRecord>, StoreError>;

    /// One policy.
    async fn get_policy(&self, name: &str) -> Result<Option<PolicyRecord>, StoreError>;

    /// Creates a policy at version 1.
    async fn create_policy(&self, spec: PolicySpec) -> Result<PolicyRecord, StoreError>;

    /// Replaces a policy if its version is `expected_version`.
    async fn update_policy(
        &self,
        spec: PolicySpec,
        expected_version: u64,
    ) -> Result<PolicyRecord, StoreError>;

    /// Deletes a policy (if its version is `expected_version`, when given).
    async fn delete_policy(
        &self,
        name: &str,
        expected_version: Option<u64>,
    ) -> Result<(), StoreError>;

    /// Every key, sorted by name.
    async fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError>;

    /// Creates a key at version 1.
    async fn create_key(
        &self,
        id: String,
        spec: KeySpec,
        secret_hash: Vec<u8>,
    ) -> Result<KeyRecord, StoreError>;

    /// Replaces a key's settings if its version is `expected_version`.
    async fn update_key(
        &self,
        spec: KeySpec,
        expected_version: u64,
    ) -> Result<KeyRecord, StoreError>;

    /// Marks a key revoked.
    async fn revoke_key(&self, name: &str) -> Result<(), StoreError>;
}
