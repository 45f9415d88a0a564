//! Gateway API keys: who may call what.
//!
//! A key's secret is `lgw_<id>_<random>`, made from the operating system's secure random
//! source and shown once; the store keeps only its SHA-256. Verifying a call is one hash and
//! a constant-time comparison against an in-memory cache of keys (no store round trip); the
//! cache is rebuilt whenever a key changes.
//!
//! When auth is required: always for admin calls (an `admin` key, or the break-glass admin
//! token); for data-plane calls when `auth.require_keys` is set or the gateway listens on a
//! non-loopback address. A key that is presented is always checked, even where none is
//! required, so its limits, budgets and forced tags apply.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

use crate::error::GatewayError;

/// `[auth]` as written in the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    /// `auth.require_keys`.
    pub require_keys: Option<bool>,
}

/// The validated `[auth]` section.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuthSettings {
    /// Whether data-plane calls need a gateway key. The config loader also sets it when the
    /// listen address is not loopback.
    pub require_keys: bool,
}

impl AuthSettings {
    /// `[auth]`.
    pub fn from_raw(raw: RawAuth) -> Self {
        Self {
            require_keys: raw.require_keys.unwrap_or(false),
        }
    }
}

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    /// The data plane: Chat, ChatStream, ListModels.
    Chat,
    /// The admin API.
    Admin,
    /// GetUsage and ExportUsage.
    UsageRead,
}

impl Scope {
    /// Parses `chat`, `admin`, `usage-read`.
    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "chat" => Some(Scope::Chat),
            "admin" => Some(Scope::Admin),
            "usage-read" => Some(Scope::UsageRead),
            _ => None,
        }
    }

    /// The name.
    pub fn name(self) -> &'static str {
        match self {
            Scope::Chat => "chat",
            Scope::Admin => "admin",
            Scope::UsageRead => "usage-read",
        }
    }
}

/// A key's settings, as stored (JSON) and exchanged through the admin API.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    /// Unique name.
    pub name: String,
    /// Owning team.
    #[serde(default)]
    pub owner: String,
    /// Scopes.
    pub scopes: Vec<Scope>,
    /// Allowed policy patterns (empty: any).
    #[serde(default)]
    pub allowed_policies: Vec<String>,
    /// Allowed `provider/model` patterns (empty: any).
    #[serde(default)]
    pub allowed_models: Vec<String>,
    /// Tags forced onto every request.
    #[serde(default)]
    pub forced_tags: BTreeMap<String, String>,
    /// Expiry, Unix ms.
    #[serde(default)]
    pub expires_ms: Option<i64>,
    /// Requests per minute (0: unlimited).
    #[serde(default)]
    pub requests_per_minute: u32,
    /// Tokens per minute (0: unlimited).
    #[serde(default)]
    pub tokens_per_minute: u64,
    /// Concurrent streams (0: unlimited).
    #[serde(default)]
    pub max_concurrent_streams: u32,
    /// Daily budget in USD (0: none).
    #[serde(default)]
    pub daily_budget_usd: f64,
    /// Monthly budget in USD (0: none).
    #[serde(default)]
    pub monthly_budget_usd: f64,
    /// Policy to route to once a budget is spent (empty: reject).
    #[serde(default)]
    pub budget_fallback_policy: String,
    /// Guardrail profile forced on every call of the key, whatever the policy (empty: none).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub guardrails: String,
    /// Whether the ledger keeps the calls' prompts and replies (redacted).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_content: bool,
    /// How long kept content stays, in milliseconds (0: the default, 30 days).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub content_retention_ms: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// How long kept content stays when a key does not say.
pub const DEFAULT_CONTENT_RETENTION_MS: u64 = 30 * 86_400_000;

/// The longest a key may keep content.
pub const MAX_CONTENT_RETENTION_MS: u64 = 400 * 86_400_000;

impl KeySpec {
    /// How long the key's calls' content is kept, when it keeps any.
    pub fn content_retention(&self) -> Option<std::time::Duration> {
        self.keep_content.then(|| {
            std::time::Duration::from_millis(if self.content_retention_ms == 0 {
                DEFAULT_CONTENT_RETENTION_MS
            } else {
                self.content_retention_ms
            })
        })
    }
}

/// A stored key.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRecord {
    /// Id (part of the secret).
    pub id: String,
    /// Settings.
    pub spec: KeySpec,
    /// SHA-256 of the secret.
    pub secret_hash: Vec<u8>,
    /// Revoked?
    pub revoked: bool,
    /// Version for etags.
    pub version: u64,
    /// Creation time, Unix ms.
    pub created_ms: i64,
}

impl KeyRecord {
    /// The etag.
    pub fn etag(&self) -> String {
        format!("v{}", self.version)
    }
}

/// Fills `buf` from the operating system's secure random source.
pub fn secure_random(buf: &mut [u8]) -> Result<(), GatewayError> {
    use ring::rand::SecureRandom as _;
    ring::rand::SystemRandom::new()
        .fill(buf)
        .map_err(|_| GatewayError::Internal("the secure random source failed".to_owned()))
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new key id and secret: `lgw_<id>_<secret part>`.
pub fn new_secret() -> Result<(String, String), GatewayError> {
    let mut id = [0u8; 8];
    let mut secret = [0u8; 24];
    secure_random(&mut id)?;
    secure_random(&mut secret)?;
    let id = hex(&id);
    Ok((id.clone(), format!("lgw_{id}_{}", hex(&secret))))
}

/// SHA-256 of a secret.
pub fn hash_secret(secret: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, secret.as_bytes())
        .as_ref()
        .to_vec()
}

/// The id part of a presented secret.
fn secret_id(secret: &str) -> Option<&str> {
    let rest = secret.strip_prefix("lgw_")?;
    let (id, _) = rest.split_once('_')?;
    (id.len() == 16).then_some(id)
}

/// Compares in time that depends only on the lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `value` matches `pattern`, where `*` matches any run of characters.
pub fn glob_match(pattern: &str, value: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == value;
    }
    let mut rest = value;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            let Some(r) = rest.strip_prefix(part) else {
                return false;
            };
            rest = r;
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(pos) => rest = &rest[pos + part.len()..],
                None => return false,
            }
        }
    }
    true
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The key.
    pub key: Arc<KeyRecord>,
}

impl Caller {
    /// The key's name (for attribution).
    pub fn name(&self) -> &str {
        &self.key.spec.name
    }

    /// Requires a scope.
    pub fn require(&self, scope: Scope) -> Result<(), GatewayError> {
        if self.key.spec.scopes.contains(&scope) {
            Ok(())
        } else {
            Err(GatewayError::PermissionDenied(format!(
                "key `{}` lacks the `{}` scope",
                self.key.spec.name,
                scope.name()
            )))
        }
    }

    /// Checks that the key may call `model` (a policy name or a `provider/model`).
    pub fn may_call(&self, model: &str, is_policy: bool) -> Result<(), GatewayError> {
        let spec = &self.key.spec;
        let (patterns, what) = if is_policy {
            (&spec.allowed_policies, "policy")
        } else {
            (&spec.allowed_models, "model")
        };
        if patterns.is_empty() || patterns.iter().any(|p| glob_match(p, model)) {
            Ok(())
        } else {
            Err(GatewayError::PermissionDenied(format!(
                "key `{}` may not call {what} `{model}`",
                spec.name
            )))
        }
    }

    /// Applies the key's forced tags (and `team` from its owner) over the request's tags.
    pub fn force_tags(&self, tags: &mut BTreeMap<String, String>) {
        if !self.key.spec.owner.is_empty() {
            tags.insert("team".to_owned(), self.key.spec.owner.clone());
        }
        for (k, v) in &self.key.spec.forced_tags {
            tags.insert(k.clone(), v.clone());
        }
    }
}

/// The in-memory key cache, swapped atomically when keys change.
#[derive(Default)]
pub struct KeyRing {
    by_id: ArcSwap<HashMap<String, Arc<KeyRecord>>>,
}

impl KeyRing {
    /// An empty ring.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the cached keys.
    pub fn replace(&self, keys: Vec<KeyRecord>) {
        let map = keys
            .into_iter()
            .map(|k| (k.id.clone(), Arc::new(k)))
            .collect();
        self.by_id.store(Arc::new(map));
    }

    /// The key with this id, as cached (revoked and expired ones included).
    pub fn get(&self, id: &str) -> Option<Arc<KeyRecord>> {
        self.by_id.load().get(id).cloned()
    }

    /// Verifies a presented secret at `now_ms`.
    pub fn verify(&self, secret: &str, now_ms: i64) -> Result<Caller, GatewayError> {
        let bad = || GatewayError::Unauthenticated("the api key is not valid".to_owned());
        let id = secret_id(secret).ok_or_else(bad)?;
        let keys = self.by_id.load();
        let key = keys.get(id).ok_or_else(bad)?;
        if !constant_time_eq(&hash_secret(secret), &key.secret_hash) {
            return Err(bad());
        }
        if key.revoked {
            return Err(GatewayError::Unauthenticated(
                "the api key was revoked".to_owned(),
            ));
        }
        if key.spec.expires_ms.is_some_and(|e| e <= now_ms) {
            return Err(GatewayError::Unauthenticated(
                "the api key has expired".to_owned(),
            ));
        }
        Ok(Caller { key: key.clone() })
    }
}

/// The bearer token of a request's metadata, if any.
pub fn bearer(metadata: &tonic::metadata::MetadataMap) -> Option<&str> {
    bearer_header(metadata.as_ref())
}

/// The bearer token of a request's `authorization` header, if any.
pub fn bearer_header(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get("authorization")?.to_str().ok()?;
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
}

/// Validates a key's settings; returns every problem with its field path.
pub fn validate(spec: &KeySpec, prefix: &str) -> Vec<crate::error::FieldViolation> {
    use crate::error::FieldViolation;
    let mut v = Vec::new();
    if !crate::routing::policy::valid_policy_name(&spec.name) {
        v.push(FieldViolation::new(
            format!("{prefix}.name"),
            "must be 1 to 63 lowercase letters, digits, `.`, `_` or `-`, starting with a letter",
        ));
    }
    if spec.scopes.is_empty() {
        v.push(FieldViolation::new(
            format!("{prefix}.scopes"),
            "must hold at least one of chat, admin, usage-read",
        ));
    }
    for (name, value) in [
        ("daily_budget_usd", spec.daily_budget_usd),
        ("monthly_budget_usd", spec.monthly_budget_usd),
    ] {
        if !value.is_finite() || value < 0.0 {
            v.push(FieldViolation::new(
                format!("{prefix}.{name}"),
                "must be zero or more",
            ));
        }
    }
    if spec.content_retention_ms != 0
        && !(3_600_000..=MAX_CONTENT_RETENTION_MS).contains(&spec.content_retention_ms)
    {
        v.push(FieldViolation::new(
            format!("{prefix}.content_retention"),
            "must be 1 hour to 400 days",
        ));
    }
    if spec.forced_tags.len() > 16 {
        v.push(FieldViolation::new(
            format!("{prefix}.forced_tags"),
            "at most 16 tags",
        ));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(secret: &str, id: &str) -> KeyRecord {
        KeyRecord {
            id: id.into(),
            spec: KeySpec {
                name: "k".into(),
                owner: "search".into(),
                scopes: vec![Scope::Chat],
                allowed_models: vec!["openai/gpt-4o*".into()],
                forced_tags: [("project".to_owned(), "x".to_owned())].into(),
                expires_ms: Some(1_000),
                ..KeySpec::default()
            },
            secret_hash: hash_secret(secret),
            revoked: false,
            version: 1,
            created_ms: 0,
        }
    }

    #[test]
    fn secrets_verify_and_fail_closed() {
        let (id, secret) = new_secret().unwrap();
        assert!(secret.starts_with(&format!("lgw_{id}_")));
        let ring = KeyRing::new();
        ring.replace(vec![record(&secret, &id)]);
        let caller = ring.verify(&secret, 0).unwrap();
        assert_eq!(caller.name(), "k");
        let mut wrong = secret.clone();
        wrong.pop();
        wrong.push('x');
        assert!(matches!(
            ring.verify(&wrong, 0),
            Err(GatewayError::Unauthenticated(_))
        ));
        assert!(ring.verify("lgw_0000000000000000_abc", 0).is_err());
        assert!(ring.verify("not-a-key", 0).is_err());
        assert!(
            ring.verify(&secret, 2_000)
                .unwrap_err()
                .to_string()
                .contains("expired")
        );
        let mut revoked = record(&secret, &id);
        revoked.revoked = true;
        ring.replace(vec![revoked]);
        assert!(
            ring.verify(&secret, 0)
                .unwrap_err()
                .to_string()
                .contains("revoked")
        );
    }

    #[test]
    fn scopes_patterns_and_forced_tags() {
        let caller = Caller {
            key: Arc::new(record("s", "i")),
        };
        assert!(caller.require(Scope::Chat).is_ok());
        assert!(matches!(
            caller.require(Scope::Admin),
            Err(GatewayError::PermissionDenied(_))
        ));
        assert!(caller.may_call("openai/gpt-4o-mini", false).is_ok());
        assert!(caller.may_call("anthropic/claude", false).is_err());
        assert!(caller.may_call("any-policy", true).is_ok());
        let mut tags: BTreeMap<String, String> = [("team".to_owned(), "spoofed".to_owned())].into();
        caller.force_tags(&mut tags);
        assert_eq!(tags["team"], "search");
        assert_eq!(tags["project"], "x");
    }

    #[test]
    fn globs() {
        assert!(glob_match("chat-*", "chat-eu"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("a*c*e", "abcde"));
        assert!(!glob_match("a*c*e", "abcdf"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
    }
}
