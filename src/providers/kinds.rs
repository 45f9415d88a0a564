//! The provider kind registry: the one place that knows which `kind`s the config file
//! accepts, and for each its defaults (base URL, the environment variables read for a key,
//! whether a key is required), its own settings (parsed and validated by the kind), how the
//! zero-config start discovers it, and how its provider is built. Adding a provider is a new
//! file with a [`KindSpec`] plus one line in [`KINDS`]; `config` and `server` do not change.
//!
//! Every `[providers.NAME]` table has the common fields of [`RawProvider`] (`kind`,
//! `base_url`, `api_key`, `api_keys`, `api_key_file`, `api_key_files`, `models`); any other
//! field belongs to the kind, which lists it in [`KindSpec::fields`] and parses it.

use std::{any::Any, collections::BTreeMap, fmt, sync::Arc};

use serde::{Deserialize, de::DeserializeOwned};

use super::{KeyRing, Provider, anthropic, bedrock, compat, gemini, mock, openai, vertex};

/// Every kind with its own entry; the OpenAI-compatible presets of [`compat::PRESETS`] are
/// added to these by [`kinds`].
pub const KINDS: &[&KindSpec] = &[
    &openai::SPEC,
    &openai::COMPATIBLE_SPEC,
    &openai::AZURE_SPEC,
    &anthropic::SPEC,
    &gemini::SPEC,
    &mock::SPEC,
    &bedrock::SPEC,
    &vertex::SPEC,
];

/// Whether a provider of a kind needs an API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRequired {
    /// Never (local servers, proxies, the mock).
    Never,
    /// At the kind's default base URL (a hosted service); a proxy elsewhere may add its own.
    AtDefaultUrl,
    /// Always (the endpoint is always the customer's own service).
    Always,
}

/// The environment lookup config passes in (tests pass a map).
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Zero-config discovery: `None` when the environment says nothing about the kind, else the
/// provider found or what is wrong (the issue's field names the environment variable).
pub type Discover = fn(Env<'_>) -> Option<Result<Discovered, SettingsIssue>>;

/// One provider kind.
#[derive(Clone, Copy)]
pub struct KindSpec {
    /// The config `kind`.
    pub name: &'static str,
    /// The base URL when the config sets none; `None`: `base_url` is required.
    pub default_base_url: Option<&'static str>,
    /// What the issue says when `base_url` is required and missing.
    pub base_url_hint: &'static str,
    /// Whether `base_url` must be an http(s) URL.
    pub http: bool,
    /// The environment variables read, in order, for a key when the config sets none.
    pub key_env: &'static [&'static str],
    /// Whether a key is required.
    pub key_required: KeyRequired,
    /// The kind's own fields in `[providers.NAME]`.
    pub fields: &'static [&'static str],
    /// Parses and validates the kind's own settings.
    pub parse: fn(&KindInput<'_>) -> Result<ProviderSettings, Vec<SettingsIssue>>,
    /// Zero-config discovery from the environment (used when the file configures no
    /// provider).
    pub discover: Option<Discover>,
}

impl fmt::Debug for KindSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KindSpec")
            .field("name", &self.name)
            .finish()
    }
}

/// Every kind the config file accepts: [`KINDS`], then the presets.
pub fn kinds() -> impl Iterator<Item = KindSpec> {
    KINDS
        .iter()
        .map(|k| **k)
        .chain(compat::PRESETS.iter().map(compat::Preset::spec))
}

/// The kind called `name`.
pub fn kind(name: &str) -> Option<KindSpec> {
    kinds().find(|k| k.name == name)
}

/// What a kind's parser sees.
#[derive(Debug)]
pub struct KindInput<'a> {
    /// The provider's name.
    pub name: &'a str,
    /// The kind.
    pub kind: &'a KindSpec,
    /// The base URL (configured, else the kind's default; no trailing `/`).
    pub base_url: &'a str,
    /// The kind's own fields (only those in [`KindSpec::fields`]).
    pub extra: &'a toml::Table,
}

impl KindInput<'_> {
    /// Deserializes the kind's fields into `T` (`deny_unknown_fields` recommended).
    /// An issue names the first field that fails on its own.
    pub fn fields<T: DeserializeOwned>(&self) -> Result<T, Vec<SettingsIssue>> {
        toml::Value::Table(self.extra.clone())
            .try_into()
            .map_err(|e: toml::de::Error| {
                let field = self.extra.iter().find_map(|(name, value)| {
                    let alone = toml::Table::from_iter([(name.clone(), value.clone())]);
                    toml::Value::Table(alone)
                        .try_into::<T>()
                        .is_err()
                        .then(|| name.clone())
                });
                vec![SettingsIssue::new(
                    field.unwrap_or_default(),
                    e.message().to_owned(),
                )]
            })
    }
}

/// A problem with a provider's settings. `field` is relative to `providers.NAME` (empty for
/// the table itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsIssue {
    /// The field, e.g. `api_version`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl SettingsIssue {
    /// An issue with `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A provider the zero-config start found in the environment.
#[derive(Debug, Clone, Default)]
pub struct Discovered {
    /// The provider's name.
    pub name: String,
    /// Its raw settings, as if written in the file.
    pub raw: RawProvider,
}

/// What the build of a provider gets besides its settings.
pub struct BuildContext<'a> {
    /// The provider's name.
    pub name: &'a str,
    /// Its key ring (possibly empty), which a reload swaps in place.
    pub keys: Arc<KeyRing>,
    /// The shared HTTP clients (see [`super::lanes`]).
    pub client: &'a super::Upstream,
}

/// A kind's validated settings.
pub trait KindSettings: fmt::Debug + PartialEq + Send + Sync + 'static {
    /// Builds the provider.
    fn build(&self, ctx: BuildContext<'_>) -> Arc<dyn Provider>;

    /// The models a provider of this kind serves when the config lists none and the model
    /// registry does not say (the mock's); `None`: the registry's models, and any name.
    fn default_models(&self) -> Option<&'static [&'static str]> {
        None
    }
}

trait AnySettings: fmt::Debug + Send + Sync {
    fn build(&self, ctx: BuildContext<'_>) -> Arc<dyn Provider>;
    fn default_models(&self) -> Option<&'static [&'static str]>;
    fn as_any(&self) -> &dyn Any;
    fn same(&self, other: &dyn AnySettings) -> bool;
}

impl<T: KindSettings> AnySettings for T {
    fn build(&self, ctx: BuildContext<'_>) -> Arc<dyn Provider> {
        KindSettings::build(self, ctx)
    }

    fn default_models(&self) -> Option<&'static [&'static str]> {
        KindSettings::default_models(self)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn same(&self, other: &dyn AnySettings) -> bool {
        other.as_any().downcast_ref::<T>() == Some(self)
    }
}

/// A kind's validated settings, type-erased; compared by value.
#[derive(Clone)]
pub struct ProviderSettings(Arc<dyn AnySettings>);

impl ProviderSettings {
    /// Wraps a kind's settings.
    pub fn new(settings: impl KindSettings) -> Self {
        Self(Arc::new(settings))
    }

    /// Builds the provider.
    pub fn build(&self, ctx: BuildContext<'_>) -> Arc<dyn Provider> {
        self.0.build(ctx)
    }

    /// See [`KindSettings::default_models`].
    pub fn default_models(&self) -> Option<&'static [&'static str]> {
        self.0.default_models()
    }

    /// The settings as `T`, when they are a `T`.
    pub fn get<T: KindSettings>(&self) -> Option<&T> {
        self.0.as_any().downcast_ref()
    }
}

impl PartialEq for ProviderSettings {
    fn eq(&self, other: &Self) -> bool {
        self.0.same(&*other.0)
    }
}

impl Eq for ProviderSettings {}

impl fmt::Debug for ProviderSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A `[providers.NAME]` table as written.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawProvider {
    /// The kind; defaults to the provider's name.
    pub kind: Option<String>,
    /// The API's base URL.
    pub base_url: Option<String>,
    /// One key.
    pub api_key: Option<String>,
    /// Several keys, used in turn.
    pub api_keys: Option<Vec<String>>,
    /// A file holding a key (or one per line).
    pub api_key_file: Option<String>,
    /// Several key files.
    pub api_key_files: Option<Vec<String>>,
    /// When set, only these models may be called through this provider.
    pub models: Option<Vec<String>>,
    /// Each account's limits for outbound pacing (see [`crate::pacing`]).
    pub pacing: Option<crate::pacing::RawAccountLimits>,
    /// Speak HTTP/2 without negotiation to an `http://` base URL (h2c, e.g. a mesh sidecar).
    pub http2_prior_knowledge: Option<bool>,
    /// The kind's own fields.
    #[serde(flatten)]
    pub extra: toml::Table,
}

/// A configured provider.
#[derive(Clone, PartialEq, Eq)]
pub struct ProviderConfig {
    /// Name callers use before the `/`.
    pub name: String,
    /// The configured kind (`openai`, `openai-compatible`, `azure`, a preset, ...).
    pub kind: &'static str,
    /// Base URL of the API (empty for the mock).
    pub base_url: String,
    /// API keys, used in turn (never logged: `Debug` shows only how many). Empty when the
    /// provider needs none.
    pub api_keys: Vec<String>,
    /// When set, only these models may be called through this provider.
    pub models: Option<Vec<String>>,
    /// The kind's own settings.
    pub settings: ProviderSettings,
    /// Each account's (key's, and model's) limits for outbound pacing.
    pub pacing: crate::pacing::AccountLimits,
    /// Calls go over HTTP/2 without negotiation (h2c) to an `http://` base URL; `https://`
    /// URLs negotiate HTTP/2 through TLS (ALPN) anyway.
    pub http2_prior_knowledge: bool,
}

impl ProviderConfig {
    /// The first API key, if any.
    pub fn api_key(&self) -> Option<&str> {
        self.api_keys.first().map(String::as_str)
    }

    /// The built-in mock, for a start without providers.
    pub fn mock() -> Self {
        Self {
            name: mock::KIND.to_owned(),
            kind: mock::KIND,
            base_url: String::new(),
            api_keys: Vec::new(),
            models: None,
            settings: ProviderSettings::new(mock::MockSettings),
            pacing: crate::pacing::AccountLimits::default(),
            http2_prior_knowledge: false,
        }
    }

    /// Builds the provider with `keys`.
    pub fn build(&self, keys: Arc<KeyRing>, client: &super::Upstream) -> Arc<dyn Provider> {
        self.settings.build(BuildContext {
            name: &self.name,
            keys,
            client,
        })
    }

    /// The models callers may use through this provider when restricted: the configured
    /// list, else the kind's default models; `None`: any.
    pub fn allowed_models(&self) -> Option<Vec<String>> {
        match (&self.models, self.settings.default_models()) {
            (Some(models), _) => Some(models.clone()),
            (None, Some(models)) => Some(models.iter().map(|m| (*m).to_owned()).collect()),
            (None, None) => None,
        }
    }
}

impl fmt::Debug for ProviderConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderConfig")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("base_url", &self.base_url)
            .field(
                "api_keys",
                &format_args!("<{} redacted>", self.api_keys.len()),
            )
            .field("models", &self.models)
            .field("settings", &self.settings)
            .field("pacing", &self.pacing)
            .field("http2_prior_knowledge", &self.http2_prior_knowledge)
            .finish()
    }
}

/// Whether `name` is a valid provider name (lowercase letters, digits, `-`, `_`; 1 to 64).
pub fn valid_provider_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// The kinds the config file accepts, for error messages.
fn known_kinds() -> String {
    kinds().map(|k| k.name).collect::<Vec<_>>().join(", ")
}

/// Validates `[providers.NAME]`. Issues name their field relative to `providers.NAME`;
/// `None` when the provider cannot be built.
pub fn validate(
    name: &str,
    raw: RawProvider,
    env: Env<'_>,
    issues: &mut Vec<SettingsIssue>,
) -> Option<ProviderConfig> {
    if !valid_provider_name(name) {
        issues.push(SettingsIssue::new(
            "",
            "provider names use lowercase letters, digits, `-` and `_` (at most 64)",
        ));
        return None;
    }
    let kind_name = raw.kind.clone().unwrap_or_else(|| name.to_owned());
    let Some(spec) = kind(&kind_name) else {
        issues.push(SettingsIssue::new(
            "kind",
            format!(
                "unknown provider kind `{kind_name}`; known kinds: {}",
                known_kinds()
            ),
        ));
        return None;
    };
    let mut extra = raw.extra.clone();
    extra.retain(|field, _| {
        let field: &str = field;
        if spec.fields.contains(&field) {
            return true;
        }
        let owners: Vec<&str> = kinds()
            .filter(|k| k.fields.contains(&field))
            .map(|k| k.name)
            .collect();
        issues.push(SettingsIssue::new(
            field,
            if owners.is_empty() {
                "is not a provider setting".to_owned()
            } else {
                format!(
                    "does not apply to kind `{}`; it is a setting of: {}",
                    spec.name,
                    owners.join(", ")
                )
            },
        ));
        false
    });
    let base_url = match (raw.base_url.as_deref(), spec.default_base_url) {
        (Some(url), _) => url.trim_end_matches('/').to_owned(),
        (None, Some(default)) => default.to_owned(),
        (None, None) if !spec.http => String::new(),
        (None, None) => {
            issues.push(SettingsIssue::new("base_url", spec.base_url_hint));
            return None;
        }
    };
    if spec.http && !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
        issues.push(SettingsIssue::new(
            "base_url",
            format!("`{base_url}` must start with http:// or https://"),
        ));
    }
    let http2_prior_knowledge = raw.http2_prior_knowledge.unwrap_or(false);
    if http2_prior_knowledge && !base_url.starts_with("http://") {
        issues.push(SettingsIssue::new(
            "http2_prior_knowledge",
            if spec.http {
                "applies only to an http:// base_url: over https, HTTP/2 is negotiated through TLS (ALPN) already"
            } else {
                "applies only to a provider with an http:// base_url"
            },
        ));
    }
    let mut api_keys = provider_keys(&raw, issues);
    if api_keys.is_empty()
        && let Some(key) = spec
            .key_env
            .iter()
            .find_map(|var| env(var).filter(|k| !k.is_empty()))
    {
        api_keys.push(key);
    }
    let key_required = match spec.key_required {
        KeyRequired::Never => false,
        KeyRequired::AtDefaultUrl => spec.default_base_url == Some(base_url.as_str()),
        KeyRequired::Always => true,
    };
    if api_keys.is_empty() && key_required {
        issues.push(SettingsIssue::new(
            "api_key",
            if spec.key_env.is_empty() {
                format!("is required for kind `{}`", spec.name)
            } else {
                format!(
                    "is required for kind `{}`; set it, or {}",
                    spec.name,
                    spec.key_env.join(" or ")
                )
            },
        ));
    }
    if let Some(models) = &raw.models {
        for (i, m) in models.iter().enumerate() {
            if m.trim().is_empty() {
                issues.push(SettingsIssue::new(
                    format!("models[{i}]"),
                    "must not be empty",
                ));
            }
        }
    }
    let pacing = crate::pacing::AccountLimits::from_raw(raw.pacing.clone())
        .map_err(|problems| {
            for (field, message) in problems {
                issues.push(SettingsIssue::new(field, message));
            }
        })
        .unwrap_or_default();
    let settings = (spec.parse)(&KindInput {
        name,
        kind: &spec,
        base_url: &base_url,
        extra: &extra,
    })
    .map_err(|e| issues.extend(e))
    .ok()?;
    Some(ProviderConfig {
        name: name.to_owned(),
        kind: spec.name,
        base_url,
        api_keys,
        models: raw.models,
        settings,
        pacing,
        http2_prior_knowledge,
    })
}

/// A provider's keys from `api_key`, `api_keys`, `api_key_file` and `api_key_files`, in that
/// order, without empties and duplicates. A key file holds one key, or one per line (blank
/// lines and lines starting with `#` are skipped); keys are trimmed.
fn provider_keys(p: &RawProvider, issues: &mut Vec<SettingsIssue>) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    let mut add = |key: &str| {
        let key = key.trim();
        if !key.is_empty() && !keys.iter().any(|k| k == key) {
            keys.push(key.to_owned());
        }
    };
    for key in p.api_key.iter().chain(p.api_keys.iter().flatten()) {
        add(key);
    }
    let files = p
        .api_key_file
        .iter()
        .map(|f| ("api_key_file".to_owned(), f))
        .chain(
            p.api_key_files
                .iter()
                .flatten()
                .enumerate()
                .map(|(i, f)| (format!("api_key_files[{i}]"), f)),
        );
    for (field, path) in files {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let mut found = false;
                for line in text.lines() {
                    let line = line.trim();
                    if !line.is_empty() && !line.starts_with('#') {
                        found = true;
                        add(line);
                    }
                }
                if !found {
                    issues.push(SettingsIssue::new(field, format!("`{path}` holds no key")));
                }
            }
            Err(e) => issues.push(SettingsIssue::new(
                field,
                format!("cannot read `{path}`: {e}"),
            )),
        }
    }
    keys
}

/// The providers the zero-config start registers from the environment, each kind's
/// [`KindSpec::discover`] in turn. Issues name an environment variable as their field.
pub fn discover(env: Env<'_>, issues: &mut Vec<SettingsIssue>) -> BTreeMap<String, RawProvider> {
    let mut out = BTreeMap::new();
    for spec in kinds() {
        match spec.discover.and_then(|d| d(env)) {
            Some(Ok(found)) => {
                out.insert(found.name, found.raw);
            }
            Some(Err(issue)) => issues.push(issue),
            None => {}
        }
    }
    out
}

/// The value of `var` in `env`, when set and not empty.
pub fn env_var(env: Env<'_>, var: &str) -> Option<String> {
    env(var).filter(|v| !v.is_empty())
}

/// A discovered provider of kind `name` with `api_key` (and `base_url`).
pub fn discovered(name: &str, base_url: Option<String>, api_key: String) -> Discovered {
    Discovered {
        name: name.to_owned(),
        raw: RawProvider {
            kind: Some(name.to_owned()),
            base_url,
            api_key: Some(api_key),
            ..RawProvider::default()
        },
    }
}

/// The configured base URL, which must be an http(s) URL, else `default()`: for kinds whose
/// default depends on their own settings (a region) and so have no
/// [`KindSpec::default_base_url`] (they set `http: false` and check here).
pub fn base_url_or(
    input: &KindInput<'_>,
    default: impl FnOnce() -> String,
) -> Result<String, SettingsIssue> {
    let url = input.base_url;
    if url.is_empty() {
        Ok(default())
    } else if url.starts_with("http://") || url.starts_with("https://") {
        Ok(url.to_owned())
    } else {
        Err(SettingsIssue::new(
            "base_url",
            format!("`{url}` must start with http:// or https://"),
        ))
    }
}

/// Parses nothing: for kinds without settings of their own.
pub fn no_fields<T: KindSettings>(settings: T) -> Result<ProviderSettings, Vec<SettingsIssue>> {
    Ok(ProviderSettings::new(settings))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_unique_and_discoverable() {
        let all: Vec<KindSpec> = kinds().collect();
        for (i, k) in all.iter().enumerate() {
            assert!(
                all[..i].iter().all(|o| o.name != k.name),
                "duplicate {}",
                k.name
            );
            assert_eq!(kind(k.name).map(|s| s.name), Some(k.name));
            if let Some(url) = k.default_base_url {
                assert!(!url.ends_with('/'), "{url}");
            }
        }
        assert!(kind("nope").is_none());
    }

    #[test]
    fn a_badly_typed_kind_field_is_named() {
        let mut issues = Vec::new();
        let mut raw = RawProvider::default();
        raw.extra.insert("stream_usage".into(), true.into());
        raw.extra.insert("developer_role".into(), "yes".into());
        assert!(validate("openai", raw, &|_| None, &mut issues).is_none());
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].field, "developer_role");
        assert!(issues[0].message.contains("boolean"), "{issues:?}");
    }

    #[test]
    fn settings_compare_by_value_across_kinds() {
        let a = ProviderConfig::mock();
        assert_eq!(a.settings, a.clone().settings);
        let openai =
            validate("openai", RawProvider::default(), &|_| None, &mut Vec::new()).unwrap();
        assert_ne!(a.settings, openai.settings);
        assert_eq!(a.allowed_models(), Some(vec!["echo".to_owned()]));
        assert_eq!(openai.allowed_models(), None);
    }

    #[test]
    fn http2_prior_knowledge_is_only_for_plain_http() {
        let with = |url: &str| {
            let raw = RawProvider {
                base_url: Some(url.to_owned()),
                api_key: Some("sk-1".into()),
                http2_prior_knowledge: Some(true),
                ..RawProvider::default()
            };
            let mut issues = Vec::new();
            let config = validate("openai", raw, &|_| None, &mut issues);
            (config.map(|c| c.http2_prior_knowledge), issues)
        };
        let (plain, issues) = with("http://127.0.0.1:8000/v1");
        assert_eq!((plain, issues.len()), (Some(true), 0), "{issues:?}");
        let (_, issues) = with("https://api.openai.com/v1");
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].field, "http2_prior_knowledge");
        assert!(issues[0].message.contains("ALPN"), "{issues:?}");
    }
}
