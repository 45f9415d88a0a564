//! Guardrails: what may leave the gateway for a provider, and what may come back.
//!
//! A **profile** (`[guardrails.NAME]`, owned here) says which entity types to look for
//! (built-in detectors in [`detect`], configured patterns and deny-list terms) and what to do
//! with each: `block` (the call fails with FAILED_PRECONDITION, reason `GUARDRAIL_BLOCKED`,
//! naming the entity types, never the text), `redact` (a typed placeholder such as
//! `[EMAIL]`), `mask` (keep the last `mask_keep` characters), `tokenize` (a placeholder such
//! as `[EMAIL_1]`, the same for the same value within a call, restored in the reply) or
//! `log` (count only). Policies attach a profile and keys force one; the server's call
//! engine runs [`Guarding`] over the request before it leaves and over the reply (unary, or
//! streamed through [`stream::StreamScanner`], which holds back only what may still become
//! a match).
//!
//! Every decision is counted ([`Tally`]): in metrics by direction, entity and action, and in
//! the call's ledger record.

pub mod detect;
pub mod external;
pub mod stream;

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use serde::Deserialize;

use crate::{
    error::GatewayError,
    types::{ChatRequest, ChatResponse, ContentPart, GuardVerdict, Role},
};
use detect::{Builtin, Detector, Extra, Finding};

/// `[guardrails.NAME]` as written.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProfile {
    /// The action for every built-in entity type not named in `actions` (unset: only the
    /// types in `actions` are detected).
    pub default_action: Option<String>,
    /// Entity type -> action, e.g. `credit_card = "block"`.
    #[serde(default)]
    pub actions: BTreeMap<String, String>,
    /// Characters `mask` keeps at the end (default 4).
    pub mask_keep: Option<usize>,
    /// Whether requests are scanned (default true; false makes a reply-only profile).
    pub requests: Option<bool>,
    /// Whether replies are scanned too (default true). Tokenized values are restored in
    /// replies either way.
    pub replies: Option<bool>,
    /// Configured patterns: `[[guardrails.NAME.patterns]]` with `name`, `regex`, `action`.
    #[serde(default)]
    pub patterns: Vec<RawPattern>,
    /// Deny-list terms, matched case-insensitively as whole words (entity `deny_list`).
    #[serde(default)]
    pub deny: Vec<String>,
    /// The action for deny-list terms (default `block`).
    pub deny_action: Option<String>,
    /// An external HTTP hook (see [`external`]).
    pub hook: Option<external::RawHook>,
    /// A provider's moderation endpoint (see [`external`]).
    pub moderation: Option<external::RawModeration>,
}

/// A configured pattern.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPattern {
    /// The entity type it reports (lowercase letters, digits, `_`), e.g. `employee_id`.
    pub name: String,
    /// The regex (regex crate syntax; bounded length, at most 1024 bytes).
    pub regex: String,
    /// What to do (default `redact`).
    pub action: Option<String>,
}

/// What to do with a detected entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// Refuse the call.
    Block,
    /// Replace with `[TYPE]`.
    Redact,
    /// Keep the last characters, replace the others' letters and digits with `*`.
    Mask,
    /// Replace with `[TYPE_N]`, restored in the reply.
    Tokenize,
    /// Count only.
    Log,
    /// An external check's decision (never configured on an entity type).
    External(crate::types::GuardDecision),
}

impl Action {
    /// Parses `block`, `redact`, `mask`, `tokenize`, `log`.
    pub fn parse(s: &str) -> Option<Action> {
        match s {
            "block" => Some(Action::Block),
            "redact" => Some(Action::Redact),
            "mask" => Some(Action::Mask),
            "tokenize" => Some(Action::Tokenize),
            "log" => Some(Action::Log),
            _ => None,
        }
    }

    /// The name (metric label).
    pub fn name(self) -> &'static str {
        match self {
            Action::Block => "block",
            Action::Redact => "redact",
            Action::Mask => "mask",
            Action::Tokenize => "tokenize",
            Action::Log => "log",
            Action::External(d) => d.name(),
        }
    }
}

/// Which way the text goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// To the provider (messages, tool calls and results).
    Request,
    /// Back to the caller.
    Reply,
}

impl Direction {
    /// The name (metric label).
    pub fn name(self) -> &'static str {
        match self {
            Direction::Request => "request",
            Direction::Reply => "reply",
        }
    }
}

/// One entity type of a profile.
#[derive(Debug, Clone)]
struct Entity {
    name: Arc<str>,
    /// The placeholder's type, e.g. `EMAIL`.
    label: String,
    action: Action,
}

/// A compiled profile.
#[derive(Debug)]
pub struct Profile {
    name: String,
    entities: Vec<Entity>,
    detector: Detector,
    mask_keep: usize,
    requests: bool,
    replies: bool,
    external: Vec<external::External>,
    raw: RawProfile,
}

impl PartialEq for Profile {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.raw == other.raw && self.external == other.external
    }
}

fn valid_entity_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 40
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

impl Profile {
    /// Compiles `[guardrails.NAME]` without providers (a moderation check names an
    /// unknown one); problems go to `issues` under `guardrails.NAME.`.
    pub fn from_raw(
        name: &str,
        raw: RawProfile,
        issues: &mut crate::settings::Issues,
    ) -> Option<Profile> {
        Self::from_raw_with(name, raw, &|_| None, issues)
    }

    /// Compiles `[guardrails.NAME]`, looking moderation providers up in `providers`.
    pub fn from_raw_with(
        name: &str,
        raw: RawProfile,
        providers: external::ProviderLookup<'_>,
        issues: &mut crate::settings::Issues,
    ) -> Option<Profile> {
        let at = format!("guardrails.{name}");
        let mut problems: Vec<(String, String)> = Vec::new();
        let action = |problems: &mut Vec<(String, String)>, field: String, value: &str| {
            let parsed = Action::parse(value);
            if parsed.is_none() {
                problems.push((
                    field,
                    format!("`{value}` is not one of block, redact, mask, tokenize, log"),
                ));
            }
            parsed
        };
        let default = raw
            .default_action
            .as_deref()
            .and_then(|a| action(&mut problems, format!("{at}.default_action"), a));
        let mut entities = Vec::new();
        let mut builtins = Vec::new();
        for b in Builtin::ALL {
            let chosen = match raw.actions.get(b.name()) {
                Some(a) => action(&mut problems, format!("{at}.actions.{}", b.name()), a),
                None => default,
            };
            if let Some(a) = chosen {
                builtins.push((b, entities.len()));
                entities.push(Entity {
                    name: b.name().into(),
                    label: b.name().to_ascii_uppercase(),
                    action: a,
                });
            }
        }
        for key in raw.actions.keys() {
            if Builtin::parse(key).is_none() {
                let known: Vec<&str> = Builtin::ALL.iter().map(|b| b.name()).collect();
                problems.push((
                    format!("{at}.actions.{key}"),
                    format!("not a built-in entity type (one of {})", known.join(", ")),
                ));
            }
        }
        let mut extra = Vec::new();
        for (i, p) in raw.patterns.iter().enumerate() {
            let field = format!("{at}.patterns[{i}]");
            if !valid_entity_name(&p.name)
                || Builtin::parse(&p.name).is_some()
                || p.name == "deny_list"
            {
                problems.push((
                    format!("{field}.name"),
                    "must be 1 to 40 lowercase letters, digits or `_`, starting with a letter, and not a built-in type".to_owned(),
                ));
                continue;
            }
            let a = match p.action.as_deref() {
                Some(a) => action(&mut problems, format!("{field}.action"), a),
                None => Some(Action::Redact),
            };
            let Some(a) = a else { continue };
            if let Err(e) = Detector::new(
                &[],
                &[Extra {
                    entity: 0,
                    regex: p.regex.clone(),
                }],
            ) {
                problems.push((format!("{field}.regex"), e));
                continue;
            }
            let entity = match entities.iter().position(|e: &Entity| *e.name == *p.name) {
                Some(i) => i,
                None => {
                    entities.push(Entity {
                        name: p.name.as_str().into(),
                        label: p.name.to_ascii_uppercase(),
                        action: a,
                    });
                    entities.len() - 1
                }
            };
            extra.push(Extra {
                entity,
                regex: p.regex.clone(),
            });
        }
        if !raw.deny.is_empty() {
            let a = match raw.deny_action.as_deref() {
                Some(a) => action(&mut problems, format!("{at}.deny_action"), a),
                None => Some(Action::Block),
            };
            let mut terms = Vec::new();
            for (i, term) in raw.deny.iter().enumerate() {
                let t = term.trim();
                if t.is_empty() || t.len() > 256 {
                    problems.push((
                        format!("{at}.deny[{i}]"),
                        "must be 1 to 256 bytes".to_owned(),
                    ));
                    continue;
                }
                let edge = |c: Option<char>| {
                    if c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                        r"(?-u:\b)"
                    } else {
                        ""
                    }
                };
                terms.push(format!(
                    "{}{}{}",
                    edge(t.chars().next()),
                    regex_syntax::escape(t),
                    edge(t.chars().last())
                ));
            }
            if let (Some(a), false) = (a, terms.is_empty()) {
                entities.push(Entity {
                    name: "deny_list".into(),
                    label: "DENY_LIST".to_owned(),
                    action: a,
                });
                extra.push(Extra {
                    entity: entities.len() - 1,
                    regex: format!("(?i:{})", terms.join("|")),
                });
            }
        }
        let mut externals = Vec::new();
        if let Some(hook) = &raw.hook {
            externals.extend(external::External::hook(
                &format!("{at}.hook"),
                hook,
                &mut problems,
            ));
        }
        if let Some(m) = &raw.moderation {
            externals.extend(external::External::moderation(
                &format!("{at}.moderation"),
                m,
                providers,
                &mut problems,
            ));
        }
        let detector = match Detector::new(&builtins, &extra) {
            Ok(d) => Some(d),
            Err(e) => {
                problems.push((at.clone(), e));
                None
            }
        };
        if !problems.is_empty() {
            for (field, message) in problems {
                issues.push(field, message);
            }
            return None;
        }
        Some(Profile {
            name: name.to_owned(),
            entities,
            detector: detector?,
            mask_keep: raw.mask_keep.unwrap_or(4),
            requests: raw.requests.unwrap_or(true),
            replies: raw.replies.unwrap_or(true),
            external: externals,
            raw,
        })
    }

    /// The profile's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The detectors (for benchmarks and the stream scanner).
    pub fn detector(&self) -> &Detector {
        &self.detector
    }

    /// Whether replies are scanned.
    pub fn scans_replies(&self) -> bool {
        self.replies
    }

    /// The action for a finding in this direction; `None` when the text stays as it is
    /// and nothing is counted (a tokenized type found in a reply is the caller's own data).
    fn action(&self, entity: usize, dir: Direction) -> Option<&Entity> {
        let e = self.entities.get(entity)?;
        (dir == Direction::Request || e.action != Action::Tokenize).then_some(e)
    }

    /// Writes `text[region]` with `findings` (inside the region, in order) replaced.
    pub(crate) fn render(
        &self,
        text: &str,
        region: std::ops::Range<usize>,
        findings: &[Finding],
        dir: Direction,
        state: &mut CallState,
    ) -> String {
        let mut out = String::with_capacity(region.end - region.start);
        let mut at = region.start;
        // Decisions per entity, counted (and put in the metrics) once per entity type at
        // the end rather than once per finding: no lock, key or label per finding.
        let mut decided = [0u64; LOCAL_COUNTS];
        for f in findings {
            let Some(e) = self.action(f.entity, dir) else {
                continue;
            };
            match decided.get_mut(f.entity) {
                Some(n) => *n += 1,
                None => state.tally.add(dir, &e.name, e.action, 1),
            }
            let value = &text[f.range.clone()];
            out.push_str(&text[at..f.range.start]);
            match e.action {
                Action::Block => {
                    state.blocked.insert(e.name.to_string());
                    out.push_str(value);
                }
                Action::Log | Action::External(_) => out.push_str(value),
                Action::Redact => {
                    out.push('[');
                    out.push_str(&e.label);
                    out.push(']');
                }
                Action::Mask if value.starts_with("-----BEGIN") => {
                    out.push('[');
                    out.push_str(&e.label);
                    out.push(']');
                }
                Action::Mask => mask(value, self.mask_keep, &mut out),
                Action::Tokenize => out.push_str(&state.vault.token(&e.label, value)),
            }
            at = f.range.end;
        }
        for (entity, n) in decided.into_iter().enumerate() {
            if n > 0
                && let Some(e) = self.action(entity, dir)
            {
                state.tally.add(dir, &e.name, e.action, n);
            }
        }
        out.push_str(&text[at..region.end]);
        out
    }

    /// Scans and rewrites one whole text.
    pub fn rewrite<'t>(
        &self,
        text: &'t str,
        dir: Direction,
        state: &mut CallState,
    ) -> Cow<'t, str> {
        let findings = self.detector.find(text, 0);
        if findings
            .iter()
            .all(|f| self.action(f.entity, dir).is_none())
        {
            return Cow::Borrowed(text);
        }
        Cow::Owned(self.render(text, 0..text.len(), &findings, dir, state))
    }
}

/// Entity types whose decisions [`Profile::render`] counts locally (the rest, rare, are
/// counted one by one).
const LOCAL_COUNTS: usize = 16;

/// `*` for every letter and digit but the last `keep` characters.
fn mask(value: &str, keep: usize, out: &mut String) {
    let n = value.chars().count();
    for (i, c) in value.chars().enumerate() {
        if i + keep >= n || !c.is_alphanumeric() {
            out.push(c);
        } else {
            out.push('*');
        }
    }
}

/// Tokenized values of one call: the same value gets the same placeholder.
#[derive(Debug, Default)]
pub struct Vault {
    by_value: HashMap<(String, String), String>,
    by_token: HashMap<String, String>,
    next: HashMap<String, u32>,
}

impl Vault {
    fn token(&mut self, label: &str, value: &str) -> String {
        let key = (label.to_owned(), value.to_owned());
        if let Some(t) = self.by_value.get(&key) {
            return t.clone();
        }
        let n = self.next.entry(label.to_owned()).or_insert(0);
        *n += 1;
        let token = format!("[{label}_{n}]");
        self.by_token.insert(token.clone(), value.to_owned());
        self.by_value.insert(key, token.clone());
        token
    }

    /// Whether nothing was tokenized.
    pub fn is_empty(&self) -> bool {
        self.by_token.is_empty()
    }

    /// `text` with this call's placeholders replaced by their values; `escape` writes each
    /// value (e.g. as a JSON string's content inside tool-call arguments).
    pub fn restore(&self, text: &str, escape: fn(&str, &mut String)) -> Option<String> {
        if self.by_token.is_empty() || !text.contains('[') {
            return None;
        }
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        let mut changed = false;
        while let Some(open) = text[at..].find('[').map(|i| at + i) {
            let close = text[open..]
                .char_indices()
                .take(MAX_TOKEN_LEN)
                .find(|(_, c)| *c == ']')
                .map(|(i, _)| open + i);
            match close.and_then(|c| self.by_token.get(&text[open..=c]).map(|v| (c, v))) {
                Some((c, value)) => {
                    out.push_str(&text[at..open]);
                    escape(value, &mut out);
                    at = c + 1;
                    changed = true;
                }
                None => {
                    out.push_str(&text[at..=open]);
                    at = open + 1;
                }
            }
        }
        out.push_str(&text[at..]);
        changed.then_some(out)
    }
}

/// The longest placeholder, in characters (`[` + label + `_` + number + `]`).
pub const MAX_TOKEN_LEN: usize = 56;

/// Every built-in detector with `redact`: what kept content goes through.
static REDACT_ALL: std::sync::LazyLock<Option<Profile>> = std::sync::LazyLock::new(|| {
    let raw = RawProfile {
        default_action: Some("redact".to_owned()),
        ..RawProfile::default()
    };
    Profile::from_raw("redact-all", raw, &mut crate::settings::Issues::new())
});

/// `text` with every built-in entity type redacted (`[EMAIL]`, ...), not counted as a
/// decision; empty if the detectors cannot be built (never: they are fixed), so nothing
/// unredacted is ever kept.
pub fn redact_all(text: &str) -> String {
    let Some(p) = &*REDACT_ALL else {
        return String::new();
    };
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for f in p.detector.find(text, 0) {
        let Some(e) = p.entities.get(f.entity) else {
            continue;
        };
        out.push_str(&text[at..f.range.start]);
        out.push('[');
        out.push_str(&e.label);
        out.push(']');
        at = f.range.end;
    }
    out.push_str(&text[at..]);
    out
}

/// The request's messages as kept content: `role: text` per message (text parts, tool-call
/// arguments and tool results).
pub fn transcript(req: &ChatRequest) -> String {
    let mut out = String::new();
    for m in &req.messages {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(role_name(m.role));
        out.push_str(": ");
        for part in &m.content {
            match part {
                ContentPart::Text(t) => out.push_str(t),
                ContentPart::ToolCall(c) => out.push_str(&c.arguments),
                ContentPart::ToolResult(r) => out.push_str(&r.content),
                ContentPart::Image(_) => out.push_str("[image]"),
            }
        }
    }
    out
}

/// A reply's text as kept content (text parts and tool-call arguments).
pub fn reply_transcript(response: &ChatResponse) -> String {
    let mut out = String::new();
    for part in &response.content {
        match part {
            ContentPart::Text(t) => out.push_str(t),
            ContentPart::ToolCall(c) => out.push_str(&c.arguments),
            ContentPart::ToolResult(r) => out.push_str(&r.content),
            ContentPart::Image(_) => {}
        }
    }
    out
}

/// Writes `value` as is.
pub fn plain(value: &str, out: &mut String) {
    out.push_str(value);
}

/// Writes `value` as the content of a JSON string.
pub fn json_escaped(value: &str, out: &mut String) {
    let quoted = serde_json::Value::String(value.to_owned()).to_string();
    out.push_str(&quoted[1..quoted.len() - 1]);
}

/// Guardrail decisions of one call, by direction, entity type and action. Clones share
/// the counts: the call's meter keeps one and reads what the request and reply stages
/// decided when the call ends, however it ends.
#[derive(Debug, Default, Clone)]
pub struct Tally(Arc<std::sync::Mutex<Counts>>);

/// Decisions by direction, entity type and action (the entity's name shared with its
/// profile: counting allocates nothing once a key is there).
type Counts = BTreeMap<(Direction, Arc<str>, Action), u64>;

impl Tally {
    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts `n` decisions of one kind, in the tally and the metrics.
    fn add(&mut self, dir: Direction, entity: &Arc<str>, action: Action, n: u64) {
        *self
            .counts()
            .entry((dir, entity.clone(), action))
            .or_insert(0) += n;
        metrics::counter!(
            crate::telemetry::names::GUARDRAIL_DECISIONS,
            "direction" => dir.name(),
            "entity" => entity.clone(),
            "action" => action.name(),
        )
        .increment(n);
    }

    /// Whether nothing was decided.
    pub fn is_empty(&self) -> bool {
        self.counts().is_empty()
    }

    /// The ledger's form: `direction:entity:action=count`, comma-separated, requests first,
    /// then by entity and action.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        for ((dir, entity, action), n) in self.counts().iter() {
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(&format!("{}:{entity}:{}={n}", dir.name(), action.name()));
        }
        out
    }
}

/// The state of one call across its profiles: tokens, decisions, blocked types.
#[derive(Debug, Default)]
pub struct CallState {
    /// Tokenized values.
    pub vault: Vault,
    /// Decisions so far.
    pub tally: Tally,
    blocked: BTreeSet<String>,
}

impl CallState {
    /// The blocked entity types found since the last call, as an error naming them.
    pub fn take_blocked(
        &mut self,
        profiles: &[Arc<Profile>],
        dir: Direction,
    ) -> Option<GatewayError> {
        if self.blocked.is_empty() {
            return None;
        }
        let entities: Vec<String> = std::mem::take(&mut self.blocked).into_iter().collect();
        Some(GatewayError::GuardrailBlocked {
            profiles: profiles.iter().map(|p| p.name.clone()).collect(),
            entities,
            reply: dir == Direction::Reply,
        })
    }
}

/// The validated `[guardrails.*]` sections: profiles by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GuardSettings {
    /// The profiles.
    pub profiles: BTreeMap<String, Arc<Profile>>,
}

impl GuardSettings {
    /// `[guardrails.*]`; moderation checks look their provider up in `providers`.
    pub fn from_raw(
        raw: BTreeMap<String, RawProfile>,
        providers: external::ProviderLookup<'_>,
        issues: &mut crate::settings::Issues,
    ) -> Self {
        let mut profiles = BTreeMap::new();
        for (name, profile) in raw {
            if !crate_name_ok(&name) {
                issues.push(
                    format!("guardrails.{name}"),
                    "a profile name is 1 to 63 lowercase letters, digits, `.`, `_` or `-`, starting with a letter",
                );
                continue;
            }
            let mut own = crate::settings::Issues::new();
            let compiled = Profile::from_raw_with(&name, profile, providers, &mut own);
            for issue in own.into_vec() {
                issues.push(issue.field, issue.message);
            }
            if let Some(p) = compiled {
                profiles.insert(name, Arc::new(p));
            }
        }
        Self { profiles }
    }

    /// The profile named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Profile>> {
        self.profiles.get(name)
    }
}

fn crate_name_ok(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && name.len() <= 63
        && chars
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
}

/// The guardrails of one call: its profiles (the key's forced one first, then the
/// policy's) and its state.
#[derive(Debug, Default)]
pub struct Guarding {
    /// The profiles that apply, in order.
    pub profiles: Vec<Arc<Profile>>,
    /// Tokens and decisions.
    pub state: CallState,
    /// The external checks' verdicts so far (for the route).
    pub verdicts: Vec<GuardVerdict>,
    /// The call, when a profile has external checks.
    pub info: Option<Arc<external::CallInfo>>,
}

/// What external checks need besides the texts.
#[derive(Debug, Clone, Copy)]
pub struct ExternalContext<'a> {
    /// The client they use.
    pub client: &'a reqwest::Client,
    /// The call.
    pub info: &'a external::CallInfo,
    /// When the call's time runs out.
    pub deadline: tokio::time::Instant,
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::System => "system",
        Role::Developer => "developer",
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::Tool => "tool",
    }
}

/// The checked slot of a content part: its kind and text.
fn slot(part: &mut ContentPart) -> Option<(&'static str, &mut String)> {
    match part {
        ContentPart::Text(t) => Some(("text", t)),
        ContentPart::ToolCall(c) => Some(("tool_call", &mut c.arguments)),
        ContentPart::ToolResult(r) => Some(("tool_result", &mut r.content)),
        ContentPart::Image(_) => None,
    }
}

impl Guarding {
    /// Guarding with these profiles.
    pub fn new(profiles: Vec<Arc<Profile>>) -> Self {
        Self {
            profiles,
            state: CallState::default(),
            verdicts: Vec::new(),
            info: None,
        }
    }

    /// A guarding for a stream's external checks beside this one (which goes on scanning):
    /// the same profiles, decisions counted in the same tally; it takes the verdicts and
    /// the call's info.
    pub fn split_external(&mut self) -> Guarding {
        Guarding {
            profiles: self.profiles.clone(),
            state: CallState {
                tally: self.state.tally.clone(),
                ..CallState::default()
            },
            verdicts: std::mem::take(&mut self.verdicts),
            info: self.info.take(),
        }
    }

    /// Whether an external check runs in this phase (`true`: the request).
    pub fn has_external(&self, request: bool) -> bool {
        self.profiles
            .iter()
            .any(|p| p.external.iter().any(|e| e.runs(request)))
    }

    /// Runs every external check of this phase over `texts` (role, kind, text), in profile
    /// order; a rewrite replaces the texts for the next check. `streamed`: the reply went
    /// out already.
    async fn external(
        &mut self,
        request: bool,
        streamed: bool,
        texts: &mut [(&'static str, &'static str, &mut String)],
        cx: ExternalContext<'_>,
    ) -> Result<(), GatewayError> {
        let dir = if request {
            Direction::Request
        } else {
            Direction::Reply
        };
        for profile in &self.profiles {
            for ext in profile.external.iter().filter(|e| e.runs(request)) {
                let view: Vec<external::Text<'_>> = texts
                    .iter()
                    .map(|(role, kind, text)| external::Text {
                        role,
                        kind,
                        text: text.as_str(),
                    })
                    .collect();
                let (outcome, verdict) = external::run(
                    ext,
                    &profile.name,
                    request,
                    streamed,
                    &view,
                    cx.info,
                    cx.client,
                    cx.deadline,
                )
                .await;
                self.state.tally.add(
                    dir,
                    &Arc::from(verdict.check.name()),
                    Action::External(verdict.decision),
                    1,
                );
                self.verdicts.push(verdict);
                match outcome {
                    external::Outcome::Pass => {}
                    external::Outcome::Rewrite(new) => {
                        for ((_, _, slot), new) in texts.iter_mut().zip(new) {
                            **slot = new;
                        }
                    }
                    external::Outcome::Refuse(err) => return Err(err),
                }
            }
        }
        Ok(())
    }

    /// Runs the external checks of the request phase over the request's texts (after the
    /// profiles' own detectors rewrote them).
    pub async fn external_request(
        &mut self,
        req: &mut ChatRequest,
        cx: ExternalContext<'_>,
    ) -> Result<(), GatewayError> {
        if !self.has_external(true) {
            return Ok(());
        }
        let mut texts: Vec<(&'static str, &'static str, &mut String)> = Vec::new();
        for message in &mut req.messages {
            let role = role_name(message.role);
            for part in &mut message.content {
                if let Some((kind, text)) = slot(part) {
                    texts.push((role, kind, text));
                }
            }
        }
        self.external(true, false, &mut texts, cx).await
    }

    /// Runs the external checks of the response phase over a complete reply.
    pub async fn external_reply(
        &mut self,
        response: &mut ChatResponse,
        cx: ExternalContext<'_>,
    ) -> Result<(), GatewayError> {
        if !self.has_external(false) {
            return Ok(());
        }
        let mut texts: Vec<(&'static str, &'static str, &mut String)> = response
            .content
            .iter_mut()
            .filter_map(slot)
            .map(|(kind, text)| ("assistant", kind, text))
            .collect();
        self.external(false, false, &mut texts, cx).await
    }

    /// Runs the external checks of the response phase over a streamed reply's text (sent
    /// already: a block ends the stream, a rewrite is a failure of the check).
    pub async fn external_streamed(
        &mut self,
        text: &mut String,
        reasoning: &mut String,
        cx: ExternalContext<'_>,
    ) -> Result<(), GatewayError> {
        let mut texts: Vec<(&'static str, &'static str, &mut String)> =
            vec![("assistant", "text", text)];
        if !reasoning.is_empty() {
            texts.push(("assistant", "reasoning", reasoning));
        }
        self.external(false, true, &mut texts, cx).await
    }

    /// Whether any profile applies.
    pub fn is_active(&self) -> bool {
        !self.profiles.is_empty()
    }

    /// Whether replies need a look (scanned, or tokens to restore).
    pub fn watches_replies(&self) -> bool {
        !self.state.vault.is_empty() || self.profiles.iter().any(|p| p.replies)
    }

    /// Applies every profile to the request's messages: text, tool calls' arguments and tool
    /// results. Blocked types fail the call (all of them named).
    pub fn request(&mut self, req: &mut ChatRequest) -> Result<(), GatewayError> {
        for profile in self.profiles.iter().filter(|p| p.requests) {
            for message in &mut req.messages {
                for part in &mut message.content {
                    let slot = match part {
                        ContentPart::Text(t) => t,
                        ContentPart::ToolCall(c) => &mut c.arguments,
                        ContentPart::ToolResult(r) => &mut r.content,
                        ContentPart::Image(_) => continue,
                    };
                    if let Cow::Owned(new) =
                        profile.rewrite(slot, Direction::Request, &mut self.state)
                    {
                        *slot = new;
                    }
                }
            }
        }
        match self.state.take_blocked(&self.profiles, Direction::Request) {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    /// Applies the profiles that scan replies to a complete reply, then restores tokens.
    pub fn reply(&mut self, response: &mut ChatResponse) -> Result<(), GatewayError> {
        for part in &mut response.content {
            let (slot, escape): (&mut String, fn(&str, &mut String)) = match part {
                ContentPart::Text(t) => (t, plain),
                ContentPart::ToolCall(c) => (&mut c.arguments, json_escaped),
                ContentPart::ToolResult(r) => (&mut r.content, plain),
                ContentPart::Image(_) => continue,
            };
            for profile in self.profiles.iter().rev().filter(|p| p.replies) {
                if let Cow::Owned(new) = profile.rewrite(slot, Direction::Reply, &mut self.state) {
                    *slot = new;
                }
            }
            if let Some(new) = self.state.vault.restore(slot, escape) {
                *slot = new;
            }
        }
        match self.state.take_blocked(&self.profiles, Direction::Reply) {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Message, Role, ToolCall};

    fn profile(toml_text: &str) -> Arc<Profile> {
        let raw: RawProfile = toml::from_str(toml_text).unwrap();
        let mut issues = crate::settings::Issues::new();
        let p = Profile::from_raw("p", raw, &mut issues);
        assert!(issues.is_empty(), "{:?}", issues.into_vec());
        Arc::new(p.unwrap())
    }

    fn request(text: &str) -> ChatRequest {
        ChatRequest {
            model: "mock/echo".into(),
            messages: vec![Message::text(Role::User, text)],
            ..ChatRequest::default()
        }
    }

    fn text_of(req: &ChatRequest) -> String {
        req.messages[0].joined_text()
    }

    #[test]
    fn redact_mask_and_log() {
        let p = profile(
            r#"
            actions = { email = "redact", credit_card = "mask", ip_address = "log" }
            "#,
        );
        let mut g = Guarding::new(vec![p]);
        let mut req = request("mail a.b@example.com, card 4111 1111 1111 1111, host 10.0.0.1");
        g.request(&mut req).unwrap();
        assert_eq!(
            text_of(&req),
            "mail [EMAIL], card **** **** **** 1111, host 10.0.0.1"
        );
        assert_eq!(
            g.state.tally.summary(),
            "request:credit_card:mask=1,request:email:redact=1,request:ip_address:log=1"
        );
    }

    #[test]
    fn block_names_types_never_text() {
        let p = profile(r#"default_action = "block""#);
        let mut g = Guarding::new(vec![p]);
        let mut req = request("ssn 536-22-1234 and card 4111111111111111");
        let err = g.request(&mut req).unwrap_err();
        assert_eq!(err.reason(), "GUARDRAIL_BLOCKED");
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        let msg = err.to_string();
        assert!(
            msg.contains("credit_card") && msg.contains("us_ssn"),
            "{msg}"
        );
        assert!(!msg.contains("4111") && !msg.contains("536"), "{msg}");
    }

    #[test]
    fn tokenize_round_trip_and_stable_tokens() {
        let p = profile(r#"actions = { email = "tokenize", phone = "tokenize" }"#);
        let mut g = Guarding::new(vec![p]);
        let mut req = request(
            "write to jo@example.com (or jo@example.com, or x@example.org), +44 20 7946 0958",
        );
        g.request(&mut req).unwrap();
        assert_eq!(
            text_of(&req),
            "write to [EMAIL_1] (or [EMAIL_1], or [EMAIL_2]), [PHONE_1]"
        );
        let mut reply = ChatResponse {
            content: vec![
                ContentPart::Text(
                    "Sent to [EMAIL_1] and [EMAIL_2]; call [PHONE_1]. [EMAIL_9] [x".into(),
                ),
                ContentPart::ToolCall(ToolCall {
                    id: "c".into(),
                    name: "send".into(),
                    arguments: r#"{"to":"[EMAIL_1]"}"#.into(),
                }),
            ],
            ..ChatResponse::default()
        };
        g.reply(&mut reply).unwrap();
        assert_eq!(
            reply.content[0],
            ContentPart::Text(
                "Sent to jo@example.com and x@example.org; call +44 20 7946 0958. [EMAIL_9] [x"
                    .into()
            )
        );
        let ContentPart::ToolCall(call) = &reply.content[1] else {
            panic!()
        };
        assert_eq!(call.arguments, r#"{"to":"jo@example.com"}"#);
    }

    #[test]
    fn replies_are_scanned_unless_turned_off() {
        let on = profile(r#"actions = { secret = "redact" }"#);
        let off = profile("actions = { secret = \"redact\" }\nreplies = false");
        let reply = || ChatResponse {
            content: vec![ContentPart::Text("key AKIAIOSFODNN7EXAMPLE".into())],
            ..ChatResponse::default()
        };
        let mut r = reply();
        Guarding::new(vec![on]).reply(&mut r).unwrap();
        assert_eq!(r.content[0], ContentPart::Text("key [SECRET]".into()));
        let mut r = reply();
        Guarding::new(vec![off]).reply(&mut r).unwrap();
        assert_eq!(r, reply());
    }

    #[test]
    fn custom_patterns_and_deny_list() {
        let p = profile(
            r#"
            deny = ["Project Titan"]
            deny_action = "redact"
            [[patterns]]
            name = "employee_id"
            regex = "EMP-[0-9]{6}"
            action = "mask"
            "#,
        );
        let mut g = Guarding::new(vec![p]);
        let mut req = request("project titan lead EMP-123456; titanic is fine");
        g.request(&mut req).unwrap();
        assert_eq!(
            text_of(&req),
            "[DENY_LIST] lead ***-**3456; titanic is fine"
        );
    }

    #[test]
    fn config_problems_name_their_field() {
        let raw: BTreeMap<String, RawProfile> = toml::from_str(
            r#"
            [p]
            default_action = "drop"
            actions = { emails = "redact" }
            [[p.patterns]]
            name = "x"
            regex = "a+"
            [Bad]
            "#,
        )
        .unwrap();
        let mut issues = crate::settings::Issues::new();
        let s = GuardSettings::from_raw(raw, &|_| None, &mut issues);
        assert!(s.profiles.is_empty());
        let fields: Vec<String> = issues.into_vec().into_iter().map(|i| i.field).collect();
        assert_eq!(
            fields,
            [
                "guardrails.Bad",
                "guardrails.p.default_action",
                "guardrails.p.actions.emails",
                "guardrails.p.patterns[0].regex"
            ]
        );
    }
}
