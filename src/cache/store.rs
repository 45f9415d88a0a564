//! Where cached replies live: [`CacheStore`], and the in-memory store
//! ([`MemoryStore`], a `quick_cache` CLOCK-Pro cache bounded by bytes and entries).
//!
//! Expiry is checked on every read against the entry's own deadline (each policy has its
//! own TTL), on the Tokio clock, so paused-time tests see it; an expired entry is removed
//! when it is read, and otherwise ages out through the eviction policy.

use std::sync::Arc;

use tokio::time::Instant;

use super::{key::CacheKey, semantic::Indexed};
use crate::{models::Cost, types::ChatResponse};

/// One cached reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The reply as the provider gave it (its usage is what the call originally used).
    pub response: ChatResponse,
    /// The configured provider that answered.
    pub provider: String,
    /// What the original call cost (what a hit saves), when prices were known.
    pub cost: Option<Cost>,
    /// The policy the reply was made for, if any (for invalidation).
    pub policy: Option<Arc<str>>,
    /// When it was stored.
    pub stored: Instant,
    /// When it expires.
    pub expires: Instant,
}

impl Entry {
    /// Approximate bytes held (for the size bound).
    pub fn weight(&self) -> u64 {
        let mut n = 256 + self.provider.len() + self.response.model.len();
        for part in &self.response.content {
            n += match part {
                crate::types::ContentPart::Text(t) => t.len(),
                crate::types::ContentPart::ToolCall(c) => {
                    c.id.len() + c.name.len() + c.arguments.len()
                }
                _ => 64,
            } + 32;
        }
        n as u64
    }
}

/// What to invalidate; every set condition must hold (an empty filter matches everything).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Invalidate {
    /// Only this namespace.
    pub namespace: Option<String>,
    /// Only replies made for this policy.
    pub policy: Option<String>,
    /// Only replies stored at least this long ago.
    pub older_than: Option<std::time::Duration>,
}

impl Invalidate {
    /// Whether `entry` (under `key`) matches.
    pub fn matches(&self, key: &CacheKey, entry: &Entry, now: Instant) -> bool {
        self.holds(&key.namespace, entry.policy.as_deref(), entry.stored, now)
    }

    /// Whether a semantic index's prompt matches.
    pub fn matches_prompt(&self, prompt: &Indexed, now: Instant) -> bool {
        self.holds(
            &prompt.key.namespace,
            prompt.policy.as_deref(),
            prompt.stored,
            now,
        )
    }

    fn holds(&self, namespace: &str, policy: Option<&str>, stored: Instant, now: Instant) -> bool {
        self.namespace.as_deref().is_none_or(|n| namespace == n)
            && self.policy.as_deref().is_none_or(|p| policy == Some(p))
            && self
                .older_than
                .is_none_or(|age| now.saturating_duration_since(stored) >= age)
    }
}

/// A shared store could not be reached (an invalidation that may have left entries).
#[derive(Debug, thiserror::Error)]
#[error("the shared cache store is unreachable: {0}")]
pub struct StoreUnavailable(pub String);

/// A prompt of the semantic index that goes with a stored reply (shared stores publish it
/// to the other replicas' indexes).
#[derive(Debug, Clone)]
pub struct IndexedPrompt {
    /// The index partition.
    pub partition: [u8; 32],
    /// The prompt's embedding.
    pub vector: super::Vector,
}

/// Storage of cached replies, in memory or shared between replicas.
#[async_trait::async_trait]
pub trait CacheStore: Send + Sync + 'static {
    /// The live entry under `key` (`None` also when the store cannot be reached).
    async fn get(&self, key: &CacheKey, now: Instant) -> Option<Arc<Entry>>;
    /// Stores `entry` under `key`, with the semantic prompt that points to it, if any;
    /// whether it was stored (`false`: the store could not be reached).
    async fn put(&self, key: CacheKey, entry: Arc<Entry>, prompt: Option<IndexedPrompt>) -> bool;
    /// Removes the matching entries; returns how many.
    async fn invalidate(&self, filter: &Invalidate, now: Instant) -> Result<u64, StoreUnavailable>;
    /// Brings `index` up to date with the prompts and invalidations of other replicas
    /// (nothing to do for a store only this replica uses).
    async fn sync_index(&self, _index: &super::SemanticIndex) {}
}

#[derive(Clone)]
struct Weigh {
    /// Each entry weighs at least this, so `max_bytes / min_weight` bounds the entries.
    min_weight: u64,
}

impl quick_cache::Weighter<CacheKey, Arc<Entry>> for Weigh {
    fn weight(&self, key: &CacheKey, entry: &Arc<Entry>) -> u64 {
        (entry.weight() + key.namespace.len() as u64).max(self.min_weight)
    }
}

/// The in-memory store.
pub struct MemoryStore {
    cache: quick_cache::sync::Cache<CacheKey, Arc<Entry>, Weigh>,
}

impl MemoryStore {
    /// A store holding at most about `max_bytes` and `max_entries`.
    pub fn new(max_bytes: u64, max_entries: u64) -> Self {
        let max_entries = max_entries.max(1);
        let min_weight = (max_bytes / max_entries).max(1);
        Self {
            cache: quick_cache::sync::Cache::with_weighter(
                usize::try_from(max_entries).unwrap_or(usize::MAX),
                max_bytes.max(1),
                Weigh { min_weight },
            ),
        }
    }

    /// Entries held now (expired ones not yet removed included).
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }
}

impl MemoryStore {
    /// The live entry under `key`.
    pub fn get_now(&self, key: &CacheKey, now: Instant) -> Option<Arc<Entry>> {
        let entry = self.cache.get(key)?;
        if entry.expires <= now {
            self.cache.remove(key);
            return None;
        }
        Some(entry)
    }

    /// Stores `entry` under `key`.
    pub fn put_now(&self, key: CacheKey, entry: Arc<Entry>) {
        self.cache.insert(key, entry);
    }

    /// Removes the matching entries (and expired ones); returns how many matched.
    pub fn invalidate_now(&self, filter: &Invalidate, now: Instant) -> u64 {
        let before = self.cache.len();
        self.cache
            .retain(|k, e| e.expires > now && !filter.matches(k, e, now));
        before.saturating_sub(self.cache.len()) as u64
    }
}

#[async_trait::async_trait]
impl CacheStore for MemoryStore {
    async fn get(&self, key: &CacheKey, now: Instant) -> Option<Arc<Entry>> {
        self.get_now(key, now)
    }

    async fn put(&self, key: CacheKey, entry: Arc<Entry>, _prompt: Option<IndexedPrompt>) -> bool {
        self.put_now(key, entry);
        true
    }

    async fn invalidate(&self, filter: &Invalidate, now: Instant) -> Result<u64, StoreUnavailable> {
        Ok(self.invalidate_now(filter, now))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn key(ns: &str, n: u8) -> CacheKey {
        CacheKey {
            namespace: ns.into(),
            digest: [n; 32],
        }
    }

    fn entry(ttl: Duration) -> Arc<Entry> {
        let now = Instant::now();
        Arc::new(Entry {
            response: ChatResponse {
                model: "echo".into(),
                content: vec![crate::types::ContentPart::Text("hi".into())],
                ..ChatResponse::default()
            },
            provider: "mock".into(),
            cost: None,
            policy: Some("chat".into()),
            stored: now,
            expires: now + ttl,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expire_after_their_ttl() {
        let store = MemoryStore::new(1 << 20, 100);
        store.put_now(key("a", 1), entry(Duration::from_secs(60)));
        assert!(store.get_now(&key("a", 1), Instant::now()).is_some());
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(store.get_now(&key("a", 1), Instant::now()).is_some());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(store.get_now(&key("a", 1), Instant::now()).is_none());
        assert!(store.is_empty(), "an expired entry is removed when read");
    }

    #[tokio::test(start_paused = true)]
    async fn the_entry_bound_holds() {
        let store = MemoryStore::new(1 << 20, 10);
        for n in 0..50 {
            store.put_now(key("a", n), entry(Duration::from_secs(60)));
        }
        assert!(store.len() <= 10, "{} entries", store.len());
    }

    #[tokio::test(start_paused = true)]
    async fn invalidation_by_namespace_policy_and_age() {
        let store = MemoryStore::new(1 << 20, 100);
        store.put_now(key("a", 1), entry(Duration::from_secs(600)));
        tokio::time::advance(Duration::from_secs(100)).await;
        store.put_now(key("a", 2), entry(Duration::from_secs(600)));
        store.put_now(key("b", 3), entry(Duration::from_secs(600)));
        let now = Instant::now();
        let older = Invalidate {
            older_than: Some(Duration::from_secs(50)),
            ..Invalidate::default()
        };
        assert_eq!(store.invalidate_now(&older, now), 1);
        let other_policy = Invalidate {
            policy: Some("other".into()),
            ..Invalidate::default()
        };
        assert_eq!(store.invalidate_now(&other_policy, now), 0);
        let ns = Invalidate {
            namespace: Some("b".into()),
            policy: Some("chat".into()),
            ..Invalidate::default()
        };
        assert_eq!(store.invalidate_now(&ns, now), 1);
        assert!(store.get_now(&key("a", 2), now).is_some());
    }
}
