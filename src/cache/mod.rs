//! The response cache: exact (keyed by a digest of the normalized request, [`key`]) and
//! semantic (opt-in per policy: the nearest cached prompt by embedding), always within a
//! namespace that includes the caller's tenant, so a key never receives another tenant's
//! reply.
//!
//! - [`CacheSettings`] is `[cache]`; [`CacheSpec`] is a policy's `cache` block.
//! - [`ResponseCache::begin`] decides, for one call, whether to look up and whether to
//!   store ([`CallCache`]); the engine (`server::engine`) asks it before execution and
//!   hands it a successful, complete answer after.
//! - Entries live in a [`store::CacheStore`]: in memory ([`store::MemoryStore`]) by default,
//!   in Redis ([`redis_store::RedisStore`]) when `[shared] redis_url` is set, so every
//!   replica serves every replica's replies.
//!
//! What is cacheable: a call whose policy (or, for a concrete `provider/model`,
//! `[cache].models`) has a mode other than `off`, whose temperature is at most the policy's
//! `max_temperature` (when set), without `cache-control: no-store`; what is stored: an
//! answer that finished normally (`STOP` or `TOOL_CALLS`), never a partial or failed stream.

mod hnsw;
pub mod key;
pub mod redis_store;
pub mod semantic;
pub mod store;

use std::{sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

pub use self::{
    key::{CacheKey, Scope},
    redis_store::RedisStore,
    semantic::{
        Attribution, EF_SEARCH, Embedder, Embedding, FIRST_EF, Indexed, Lookup, SemanticIndex,
        Vector, WIDEN_MARGIN,
    },
    store::{CacheStore, Entry, IndexedPrompt, Invalidate, MemoryStore, StoreUnavailable},
};
use crate::{
    error::FieldViolation,
    models::Cost,
    settings::Issues,
    types::{CacheOutcome, ChatRequest, ChatResponse, FinishReason},
};

/// Metric: cache events by outcome (`hit`, `miss`, `store`, `bypass`) and kind (`exact`,
/// `semantic`). A stored call counts a `miss` (when it was looked up) and a `store`. The
/// shared store counts `unavailable` (kind `get`, `put`, `sync`, `invalidate`) for each
/// operation Redis did not answer (a lookup then misses, a store is dropped).
pub const CACHE_EVENTS: &str = "llm_gateway_cache_events_total";

/// How a policy caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheMode {
    /// No caching.
    #[default]
    Off,
    /// Identical requests only.
    Exact,
    /// Identical requests, then the nearest cached prompt above the similarity threshold.
    Semantic,
}

impl CacheMode {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "off" => Some(CacheMode::Off),
            "exact" => Some(CacheMode::Exact),
            "semantic" => Some(CacheMode::Semantic),
            _ => None,
        }
    }
}

/// A policy's `cache` block.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSpec {
    /// Off (default), exact or semantic.
    #[serde(default)]
    pub mode: CacheMode,
    /// How long a reply stays (default `[cache].ttl`).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub ttl: Option<Duration>,
    /// Requests with a higher temperature are not cached (unset: any temperature; a request
    /// without a temperature counts as the provider default, 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_temperature: Option<f64>,
    /// Semantic mode: also for requests with tools (exact mode always keys on the tools).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_tools: bool,
    /// Semantic mode: the least cosine similarity served (default
    /// `[cache].semantic_threshold`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub similarity_threshold: Option<f64>,
}

impl CacheSpec {
    /// Whether nothing is set (left out of stored policy documents).
    pub fn is_default(&self) -> bool {
        *self == CacheSpec::default()
    }

    /// Problems with the block, under `path` (e.g. `policy.cache`).
    pub fn validate(&self, path: &str) -> Vec<FieldViolation> {
        let mut out = Vec::new();
        if self.ttl == Some(Duration::ZERO) {
            out.push(FieldViolation::new(
                format!("{path}.ttl"),
                "must be greater than zero",
            ));
        }
        if let Some(t) = self.max_temperature
            && !(0.0..=2.0).contains(&t)
        {
            out.push(FieldViolation::new(
                format!("{path}.max_temperature"),
                "must be between 0 and 2",
            ));
        }
        if let Some(t) = self.similarity_threshold
            && !(t > 0.0 && t <= 1.0)
        {
            out.push(FieldViolation::new(
                format!("{path}.similarity_threshold"),
                "must be greater than 0 and at most 1",
            ));
        }
        out
    }
}

/// `[cache]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheSettings {
    /// The whole cache on or off (default on; each policy still opts in).
    pub enabled: bool,
    /// Approximate bytes of replies kept in memory (default 256 MiB).
    pub max_bytes: u64,
    /// Most replies kept in memory (default 100,000).
    pub max_entries: u64,
    /// TTL of a reply when its policy sets none (default 1 h).
    pub ttl: Duration,
    /// The mode for calls that name a concrete `provider/model` (default off).
    pub models: CacheMode,
    /// The embedding model of the semantic cache (`provider/model`).
    pub embedding_model: String,
    /// Least cosine similarity a semantic hit needs (default 0.95).
    pub semantic_threshold: f64,
    /// Most prompts in the semantic index, all partitions together (default 100,000).
    pub semantic_max_entries: usize,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            max_bytes: 256 << 20,
            max_entries: 100_000,
            ttl: Duration::from_secs(3600),
            models: CacheMode::Off,
            embedding_model: String::new(),
            semantic_threshold: 0.95,
            semantic_max_entries: 100_000,
        }
    }
}

/// `[cache]` as written in the config file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    /// `cache.enabled`.
    pub enabled: Option<bool>,
    /// `cache.max_bytes`.
    pub max_bytes: Option<u64>,
    /// `cache.max_entries`.
    pub max_entries: Option<u64>,
    /// `cache.ttl`.
    pub ttl: Option<String>,
    /// `cache.models`: `off`, `exact` or `semantic`.
    pub models: Option<String>,
    /// `cache.embedding_model`.
    pub embedding_model: Option<String>,
    /// `cache.semantic_threshold`.
    pub semantic_threshold: Option<f64>,
    /// `cache.semantic_max_entries`.
    pub semantic_max_entries: Option<usize>,
}

impl CacheSettings {
    /// Validates `[cache]`; unset fields keep their defaults.
    pub fn from_raw(raw: RawCache, issues: &mut Issues) -> Self {
        let d = CacheSettings::default();
        let models = match raw.models.as_deref() {
            None => d.models,
            Some(m) => CacheMode::parse(m).unwrap_or_else(|| {
                issues.push("cache.models", "must be `off`, `exact` or `semantic`");
                d.models
            }),
        };
        let semantic_threshold = match raw.semantic_threshold {
            Some(t) if !(t > 0.0 && t <= 1.0) => {
                issues.push(
                    "cache.semantic_threshold",
                    "must be greater than 0 and at most 1",
                );
                d.semantic_threshold
            }
            Some(t) => t,
            None => d.semantic_threshold,
        };
        let positive = |issues: &mut Issues, field: &str, v: Option<u64>, default: u64| match v {
            Some(0) => {
                issues.push(field, "must be greater than zero");
                default
            }
            Some(v) => v,
            None => default,
        };
        let max_bytes = positive(issues, "cache.max_bytes", raw.max_bytes, d.max_bytes);
        let max_entries = positive(issues, "cache.max_entries", raw.max_entries, d.max_entries);
        let semantic_max_entries = positive(
            issues,
            "cache.semantic_max_entries",
            raw.semantic_max_entries.map(|v| v as u64),
            d.semantic_max_entries as u64,
        ) as usize;
        let embedding_model = raw.embedding_model.unwrap_or_default();
        if !embedding_model.is_empty() && !embedding_model.contains('/') {
            issues.push("cache.embedding_model", "must be `provider/model`");
        }
        CacheSettings {
            enabled: raw.enabled.unwrap_or(d.enabled),
            max_bytes,
            max_entries,
            ttl: issues.duration("cache.ttl", raw.ttl.as_deref(), d.ttl),
            models,
            embedding_model,
            semantic_threshold,
            semantic_max_entries,
        }
    }
}

/// The caller's `cache-control` directives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheControl {
    /// Skip the lookup (still store the answer).
    pub no_cache: bool,
    /// Neither look up nor store.
    pub no_store: bool,
}

impl CacheControl {
    /// Parses a `cache-control` value: comma-separated directives, case-insensitive;
    /// unknown ones are ignored (as in HTTP).
    pub fn parse(value: Option<&str>) -> Self {
        let mut out = CacheControl::default();
        for d in value.unwrap_or("").split(',') {
            let d = d.trim();
            if d.eq_ignore_ascii_case("no-cache") {
                out.no_cache = true;
            } else if d.eq_ignore_ascii_case("no-store") {
                out.no_store = true;
            }
        }
        out
    }
}

/// The namespace of a caller: its key's owner (team), the key itself when it has no owner,
/// or the fixed anonymous namespace for calls without a key.
pub fn namespace(owner: Option<&str>, key: Option<&str>) -> Arc<str> {
    match (owner, key) {
        (Some(owner), _) if !owner.is_empty() => format!("team:{owner}").into(),
        (_, Some(key)) => format!("key:{key}").into(),
        _ => "anonymous".into(),
    }
}

/// What the cache needs to know about the policy a call names.
pub struct PolicyScope<'a> {
    /// Policy name.
    pub name: &'a str,
    /// Its version (a changed policy misses).
    pub version: u64,
    /// Its cache block.
    pub spec: &'a CacheSpec,
    /// The tags its variants match on, with the request's values.
    pub tags: Vec<(&'a str, Option<&'a str>)>,
}

/// The response cache of one gateway.
pub struct ResponseCache {
    settings: CacheSettings,
    store: Arc<dyn CacheStore>,
    semantic: Option<(SemanticIndex, Arc<dyn Embedder>)>,
}

impl ResponseCache {
    /// A cache with the in-memory store.
    pub fn new(settings: CacheSettings) -> Self {
        let store = Arc::new(MemoryStore::new(settings.max_bytes, settings.max_entries));
        Self::with_store(settings, store)
    }

    /// A cache over `store`.
    pub fn with_store(settings: CacheSettings, store: Arc<dyn CacheStore>) -> Self {
        Self {
            settings,
            store,
            semantic: None,
        }
    }

    /// Turns the semantic cache on (for policies in semantic mode), embedding prompts with
    /// `embedder`.
    pub fn with_embedder(mut self, embedder: Arc<dyn Embedder>) -> Self {
        self.semantic = Some((
            SemanticIndex::new(self.settings.semantic_max_entries),
            embedder,
        ));
        self
    }

    /// The semantic index, when the semantic cache is on.
    pub fn semantic_index(&self) -> Option<&SemanticIndex> {
        self.semantic.as_ref().map(|(index, _)| index)
    }

    /// The settings.
    pub fn settings(&self) -> &CacheSettings {
        &self.settings
    }

    /// Decides what the cache does for one call.
    pub fn begin(
        self: &Arc<Self>,
        namespace: &Arc<str>,
        req: &ChatRequest,
        policy: Option<PolicyScope<'_>>,
        control: CacheControl,
    ) -> CallCache {
        let off = CallCache {
            active: None,
            outcome: CacheOutcome::Off,
            embedding_usd: 0.0,
        };
        if !self.settings.enabled {
            return off;
        }
        let default_spec = CacheSpec {
            mode: self.settings.models,
            ..CacheSpec::default()
        };
        let spec = policy.as_ref().map_or(&default_spec, |p| p.spec);
        if spec.mode == CacheMode::Off {
            return off;
        }
        let temperature = req.params.temperature.unwrap_or(1.0);
        let too_random = spec.max_temperature.is_some_and(|max| temperature > max);
        if control.no_store || too_random {
            counter("bypass", "exact");
            return CallCache {
                active: None,
                outcome: CacheOutcome::Bypass,
                embedding_usd: 0.0,
            };
        }
        let scope = Scope {
            namespace,
            version: policy.as_ref().map_or(0, |p| p.version),
            tags: policy.as_ref().map_or(&[], |p| &p.tags),
        };
        let key = key::key(&scope, req);
        let semantic = (spec.mode == CacheMode::Semantic
            && self.semantic.is_some()
            && (req.tools.is_empty() || spec.allow_tools))
            .then(|| SemanticCall {
                partition: key::partition(&scope, req),
                text: prompt_text(req),
                threshold: spec
                    .similarity_threshold
                    .unwrap_or(self.settings.semantic_threshold) as f32,
                vector: None,
            });
        CallCache {
            active: Some(Active {
                cache: self.clone(),
                key,
                lookup: !control.no_cache,
                ttl: spec.ttl.unwrap_or(self.settings.ttl),
                policy: policy.map(|p| p.name.into()),
                semantic,
            }),
            outcome: CacheOutcome::Miss,
            embedding_usd: 0.0,
        }
    }

    /// Removes the matching replies, and tombstones their prompts in the semantic index;
    /// returns how many replies.
    pub async fn invalidate(&self, filter: &Invalidate) -> Result<u64, StoreUnavailable> {
        let now = Instant::now();
        if let Some(index) = self.semantic_index() {
            if *filter == Invalidate::default() {
                index.clear();
            } else {
                index.invalidate(filter, now);
            }
        }
        self.store.invalidate(filter, now).await
    }
}

/// The text the semantic cache embeds: every message's text, one per line.
fn prompt_text(req: &ChatRequest) -> String {
    let mut out = String::new();
    for m in &req.messages {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&m.joined_text());
    }
    out
}

struct SemanticCall {
    partition: [u8; 32],
    text: String,
    threshold: f32,
    /// The prompt's embedding, once computed (for storing).
    vector: Option<Vector>,
}

fn counter(outcome: &'static str, kind: &'static str) {
    metrics::counter!(CACHE_EVENTS, "outcome" => outcome, "kind" => kind).increment(1);
}

struct Active {
    cache: Arc<ResponseCache>,
    key: CacheKey,
    lookup: bool,
    ttl: Duration,
    policy: Option<Arc<str>>,
    semantic: Option<SemanticCall>,
}

/// What the cache does for one call: look up, then store the answer.
pub struct CallCache {
    active: Option<Active>,
    outcome: CacheOutcome,
    /// What the semantic lookup's embedding call cost.
    embedding_usd: f64,
}

impl CallCache {
    /// A call the cache does nothing for.
    pub fn off() -> Self {
        CallCache {
            active: None,
            outcome: CacheOutcome::Off,
            embedding_usd: 0.0,
        }
    }

    /// What the semantic lookup's embedding call cost (0 without one): charged to the
    /// call's budget with the call's own cost.
    pub fn embedding_cost_usd(&self) -> f64 {
        self.embedding_usd
    }

    /// What the cache did so far.
    pub fn outcome(&self) -> CacheOutcome {
        self.outcome
    }

    /// The cached reply, when there is a live one (and the caller allowed the lookup);
    /// a semantic lookup's embedding call is made for `call`.
    pub async fn lookup(&mut self, call: Attribution<'_>) -> Option<Arc<Entry>> {
        let active = self.active.as_mut()?;
        if active.lookup {
            if let Some(entry) = active.cache.store.get(&active.key, Instant::now()).await {
                counter("hit", "exact");
                self.outcome = CacheOutcome::Hit { similarity: None };
                self.active = None;
                return Some(entry);
            }
            counter("miss", "exact");
        }
        // The semantic cache: embed the prompt (also with `no-cache`, to store it), then
        // the nearest cached prompt of the partition.
        let (Some(sem), Some((index, embedder))) =
            (active.semantic.as_mut(), active.cache.semantic.as_ref())
        else {
            return None;
        };
        let vector = match embedder.embed(&sem.text, call).await {
            Ok(embedding) => {
                self.embedding_usd += embedding.cost_usd.unwrap_or(0.0);
                Vector::unit(&embedding.vector)
            }
            Err(err) => {
                tracing::warn!(error = %err, "semantic cache: the prompt could not be embedded");
                None
            }
        };
        let Some(vector) = vector else {
            active.semantic = None;
            return None;
        };
        let found = if active.lookup {
            active.cache.store.sync_index(index).await;
            index
                .lookup(&sem.partition, &vector, sem.threshold, Instant::now())
                .best
        } else {
            None
        };
        sem.vector = Some(vector);
        if let Some((key, similarity)) = found.filter(|(_, s)| *s >= sem.threshold)
            && let Some(entry) = active.cache.store.get(&key, Instant::now()).await
        {
            counter("hit", "semantic");
            self.outcome = CacheOutcome::Hit {
                similarity: Some(similarity),
            };
            self.active = None;
            return Some(entry);
        }
        if active.lookup {
            counter("miss", "semantic");
        }
        None
    }

    /// Stores a complete answer when it finished normally; returns the call's outcome.
    pub async fn store(
        &mut self,
        response: &ChatResponse,
        provider: &str,
        cost: Option<Cost>,
    ) -> CacheOutcome {
        let Some(active) = self.active.take() else {
            return self.outcome;
        };
        if !matches!(
            response.finish_reason,
            FinishReason::Stop | FinishReason::ToolCalls
        ) {
            return self.outcome;
        }
        let now = Instant::now();
        let mut prompt = None;
        if let (Some(sem), Some((index, _))) = (active.semantic, active.cache.semantic.as_ref())
            && let Some(vector) = sem.vector
        {
            index.insert_indexed(
                sem.partition,
                vector.clone(),
                Indexed {
                    key: active.key.clone(),
                    policy: active.policy.clone(),
                    stored: now,
                    expires: now + active.ttl,
                },
            );
            prompt = Some(IndexedPrompt {
                partition: sem.partition,
                vector,
            });
            counter("store", "semantic");
        }
        let entry = Arc::new(Entry {
            response: response.clone(),
            provider: provider.to_owned(),
            cost,
            policy: active.policy,
            stored: now,
            expires: now + active.ttl,
        });
        if active.cache.store.put(active.key, entry, prompt).await {
            counter("store", "exact");
            self.outcome = CacheOutcome::Stored;
        }
        self.outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{ContentPart, Message, Role};

    fn cache(models: CacheMode) -> Arc<ResponseCache> {
        Arc::new(ResponseCache::new(CacheSettings {
            models,
            ..CacheSettings::default()
        }))
    }

    fn req(text: &str) -> ChatRequest {
        ChatRequest {
            model: "mock/echo".into(),
            messages: vec![Message::text(Role::User, text)],
            ..ChatRequest::default()
        }
    }

    fn who() -> Attribution<'static> {
        static TAGS: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();
        Attribution {
            request_id: "r",
            key: "",
            tags: &TAGS,
        }
    }

    fn answer() -> ChatResponse {
        ChatResponse {
            model: "echo".into(),
            content: vec![ContentPart::Text("hi".into())],
            finish_reason: FinishReason::Stop,
            usage: None,
        }
    }

    #[tokio::test]
    async fn a_stored_answer_is_found_only_in_its_namespace() {
        let c = cache(CacheMode::Exact);
        let (a, b) = (namespace(Some("a"), None), namespace(Some("b"), None));
        let mut call = c.begin(&a, &req("x"), None, CacheControl::default());
        assert!(call.lookup(who()).await.is_none());
        assert_eq!(
            call.store(&answer(), "mock", None).await,
            CacheOutcome::Stored
        );
        let mut again = c.begin(&a, &req("x"), None, CacheControl::default());
        assert!(again.lookup(who()).await.is_some());
        assert_eq!(again.outcome(), CacheOutcome::Hit { similarity: None });
        let mut other = c.begin(&b, &req("x"), None, CacheControl::default());
        assert!(other.lookup(who()).await.is_none());
    }

    #[tokio::test]
    async fn incomplete_answers_and_no_store_are_not_kept() {
        let c = cache(CacheMode::Exact);
        let ns = namespace(None, None);
        let mut call = c.begin(&ns, &req("x"), None, CacheControl::default());
        let truncated = ChatResponse {
            finish_reason: FinishReason::Length,
            ..answer()
        };
        assert_eq!(
            call.store(&truncated, "mock", None).await,
            CacheOutcome::Miss
        );
        let no_store = CacheControl::parse(Some("No-Store"));
        let mut call = c.begin(&ns, &req("x"), None, no_store);
        assert_eq!(call.outcome(), CacheOutcome::Bypass);
        assert_eq!(
            call.store(&answer(), "mock", None).await,
            CacheOutcome::Bypass
        );
        let mut call = c.begin(&ns, &req("x"), None, CacheControl::default());
        assert!(call.lookup(who()).await.is_none());
    }

    #[test]
    fn temperature_bound_and_off_mode() {
        let c = cache(CacheMode::Off);
        let ns = namespace(None, Some("k"));
        let call = c.begin(&ns, &req("x"), None, CacheControl::default());
        assert_eq!(call.outcome(), CacheOutcome::Off);
        let spec = CacheSpec {
            mode: CacheMode::Exact,
            max_temperature: Some(0.5),
            ..CacheSpec::default()
        };
        let scope = || PolicyScope {
            name: "chat",
            version: 1,
            spec: &spec,
            tags: Vec::new(),
        };
        let mut hot = req("x");
        hot.params.temperature = Some(0.7);
        let call = c.begin(&ns, &hot, Some(scope()), CacheControl::default());
        assert_eq!(call.outcome(), CacheOutcome::Bypass);
        hot.params.temperature = Some(0.0);
        let call = c.begin(&ns, &hot, Some(scope()), CacheControl::default());
        assert_eq!(call.outcome(), CacheOutcome::Miss);
    }

    #[test]
    fn settings_and_specs_are_validated() {
        let mut issues = Issues::new();
        let raw: RawCache = toml::from_str(
            "models = \"sometimes\"\nsemantic_threshold = 1.5\nmax_entries = 0\nttl = \"0s\"",
        )
        .unwrap();
        CacheSettings::from_raw(raw, &mut issues);
        let text = format!("{issues:?}");
        for field in [
            "cache.models",
            "cache.semantic_threshold",
            "cache.max_entries",
            "cache.ttl",
        ] {
            assert!(text.contains(field), "{field} in {text}");
        }
        let spec = CacheSpec {
            ttl: Some(Duration::ZERO),
            max_temperature: Some(3.0),
            similarity_threshold: Some(0.0),
            ..CacheSpec::default()
        };
        assert_eq!(spec.validate("policy.cache").len(), 3);
        assert!(CacheControl::parse(Some("max-age=5, no-cache")).no_cache);
    }
}
