//! Durable state behind a trait. The default is an embedded SQLite file in WAL mode with
//! schema migrations ([`sqlite::SqliteStore`]); several replicas share one PostgreSQL
//! database instead ([`postgres::PgStore`], `store.url`), and learn of each other's writes
//! through [`Store::follow_changes`].
//!
//! What returns OK is on disk: writes commit with `synchronous = FULL` (SQLite) or a
//! committed transaction (PostgreSQL), so a policy whose Create/Update returned OK survives
//! `kill -9` and restart.

pub mod postgres;
pub mod sqlite;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    audit::{AuditError, AuditSink},
    auth::{KeyRecord, KeySpec},
    ledger::{SinkError, UsageSink},
    routing::{PolicyRecord, policy::PolicySpec},
    settings::Issues,
};

/// The default store file, relative to the working directory.
pub const DEFAULT_STORE_PATH: &str = ".llm-gateway/llm-gateway.db";

/// `[store]` as written in the config file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    /// `store.path`.
    pub path: Option<String>,
    /// `store.url`: a `postgres://` URL; exclusive with `store.path`.
    pub url: Option<String>,
}

/// The validated `[store]` section.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreSettings {
    /// The store file (`:memory:` for none). With a `url` it only places the generated
    /// admin token file.
    pub path: std::path::PathBuf,
    /// The shared PostgreSQL database, when set (it may hold a password: `Debug` hides it).
    pub url: Option<String>,
}

impl std::fmt::Debug for StoreSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSettings")
            .field("path", &self.path)
            .field("url", &self.url.as_deref().map(redacted_url))
            .finish()
    }
}

/// `url` without its password (for logs and `--check-config`).
pub fn redacted_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<unparsable url>".to_owned();
    };
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((user, host)) => match user.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => format!("{scheme}://{user}@{host}{tail}"),
        },
        None => url.to_owned(),
    }
}

impl StoreSettings {
    /// `[store]`: the path, or [`DEFAULT_STORE_PATH`]; or a PostgreSQL URL.
    pub fn from_raw(raw: RawStore, issues: &mut Issues) -> Self {
        if let Some(url) = &raw.url {
            if raw.path.is_some() {
                issues.push(
                    "store.url",
                    "set either store.path (an embedded SQLite file) or store.url (a shared PostgreSQL database), not both",
                );
            } else if let Err(e) = postgres::parse_url(url) {
                issues.push("store.url", e);
            }
        }
        Self {
            path: raw
                .path
                .unwrap_or_else(|| DEFAULT_STORE_PATH.to_owned())
                .into(),
            url: raw.url,
        }
    }
}

/// What another replica changed, as [`Store::follow_changes`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A policy was created or updated to `version`, or deleted (`None`).
    Policy {
        /// The policy.
        name: String,
        /// Its new version; `None` when it was deleted.
        version: Option<u64>,
    },
    /// A key was created, updated or revoked.
    Key {
        /// The key.
        name: String,
    },
    /// A policy's rollout document changed.
    Rollout {
        /// The policy.
        policy: String,
    },
    /// Changes may have been missed (the feed (re)connected, or the periodic safety net):
    /// reload everything.
    Resync,
}

/// A policy's latest rollout, as stored: the rollout module's JSON document and the
/// row's version (compare-and-set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutRow {
    /// The policy.
    pub policy: String,
    /// The document.
    pub doc: String,
    /// Incremented on every write; 1 after the first.
    pub version: u64,
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

impl From<StoreError> for AuditError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Backend(message) => AuditError(message),
            other => AuditError(other.to_string()),
        }
    }
}

impl From<AuditError> for StoreError {
    fn from(err: AuditError) -> Self {
        StoreError::Backend(err.0)
    }
}

/// Durable storage of policies and keys, the usage ledger's sink and the audit log's.
#[async_trait]
pub trait Store: UsageSink + AuditSink + Send + Sync + 'static {
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

    /// Every policy's latest rollout.
    async fn list_rollouts(&self) -> Result<Vec<RolloutRow>, StoreError>;

    /// One policy's latest rollout.
    async fn get_rollout(&self, policy: &str) -> Result<Option<RolloutRow>, StoreError>;

    /// Writes `policy`'s rollout document if the stored row's version is `expected` (0:
    /// none is stored) and returns the new row version; with `replace`, also replaces
    /// the policy (if its version is the given one) in the same transaction and returns
    /// it. A version mismatch of either is [`StoreError::Conflict`].
    async fn put_rollout(
        &self,
        policy: &str,
        doc: String,
        expected: u64,
        replace: Option<(PolicySpec, u64)>,
    ) -> Result<(u64, Option<PolicyRecord>), StoreError>;

    /// Sends what other processes change to `changes` until `stop`. A store that only this
    /// process writes (SQLite) has nothing to report and returns at once.
    async fn follow_changes(&self, changes: mpsc::Sender<Change>, stop: CancellationToken) {
        let _ = (changes, stop);
    }

    /// GetExperiment: the report of experiment `name` over `[from_ms, to_ms)`, computed in
    /// the database ([`crate::experiments::report::run`]); `defined` are the arms of the
    /// policy running it now. `None` when it has neither arms nor records.
    async fn experiment_report(
        &self,
        name: &str,
        from_ms: i64,
        to_ms: i64,
        defined: Option<Vec<String>>,
    ) -> Result<Option<crate::experiments::report::ExperimentReport>, StoreError> {
        let _ = (name, from_ms, to_ms, defined);
        Err(StoreError::Backend(
            "this store cannot report experiments".to_owned(),
        ))
    }
}
