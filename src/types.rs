//! Provider-neutral domain types: the request, messages, content parts, the complete answer,
//! stream events and usage. Providers and the executor speak only these; the conversion from
//! and to the generated protobuf types lives in `server::convert`.

use std::collections::BTreeMap;

use bytes::Bytes;

/// A chat request as the gateway understands it, validated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatRequest {
    /// The model or policy name the caller asked for.
    pub model: String,
    /// The conversation, oldest first; never empty.
    pub messages: Vec<Message>,
    /// Sampling parameters; `None` means the provider's default.
    pub params: SamplingParams,
    /// Tools the model may call.
    pub tools: Vec<Tool>,
    /// How the model may use the tools.
    pub tool_choice: Option<ToolChoice>,
    /// The format of the reply.
    pub response_format: Option<ResponseFormat>,
    /// Attribution tags (never sent upstream).
    pub tags: BTreeMap<String, String>,
    /// Opaque end-user id.
    pub user: Option<String>,
}

/// Sampling parameters; each `None` means the provider's default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingParams {
    /// Temperature, 0 to 2.
    pub temperature: Option<f64>,
    /// Nucleus sampling mass, (0, 1].
    pub top_p: Option<f64>,
    /// Maximum output tokens.
    pub max_tokens: Option<u32>,
    /// Stop sequences.
    pub stop: Vec<String>,
    /// Sampling seed.
    pub seed: Option<i64>,
    /// Presence penalty, -2 to 2.
    pub presence_penalty: Option<f64>,
    /// Frequency penalty, -2 to 2.
    pub frequency_penalty: Option<f64>,
    /// Whether several tool calls may come in one turn.
    pub parallel_tool_calls: Option<bool>,
}

/// Who authored a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Application instructions.
    System,
    /// Developer instructions (treated as system where the provider has no such role).
    Developer,
    /// The end user.
    User,
    /// The model.
    Assistant,
    /// Tool results.
    Tool,
}

/// One message of the conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Author.
    pub role: Role,
    /// Content parts in order.
    pub content: Vec<ContentPart>,
    /// Optional participant name.
    pub name: Option<String>,
}

impl Message {
    /// A message with a single text part.
    pub fn text(role: Role, text: impl Into<String>) -> Self {
        Self {
            role,
            content: vec![ContentPart::Text(text.into())],
            name: None,
        }
    }

    /// The concatenated text parts of the message.
    pub fn joined_text(&self) -> String {
        let mut out = String::new();
        for part in &self.content {
            if let ContentPart::Text(t) = part {
                out.push_str(t);
            }
        }
        out
    }
}

/// One piece of message content.
#[derive(Debug, Clone, PartialEq)]
pub enum ContentPart {
    /// Plain text.
    Text(String),
    /// An image.
    Image(Image),
    /// A tool call by the assistant.
    ToolCall(ToolCall),
    /// A tool result.
    ToolResult(ToolResult),
}

/// An image, by URL or inline bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    /// Where the image comes from.
    pub source: ImageSource,
    /// MIME type; always set for inline data.
    pub mime_type: Option<String>,
    /// Requested detail level.
    pub detail: ImageDetail,
}

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageSource {
    /// A URL the provider fetches (`https:` or `data:`).
    Url(String),
    /// Inline bytes.
    Data(Bytes),
}

/// Image detail level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageDetail {
    /// The provider's default.
    #[default]
    Default,
    /// Let the provider decide.
    Auto,
    /// Low resolution.
    Low,
    /// High resolution.
    High,
}

/// A tool call made by the model.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ToolCall {
    /// Provider call id.
    pub id: String,
    /// Tool name.
    pub name: String,
    /// Raw JSON arguments text, exactly as the model wrote it.
    pub arguments: String,
}

/// The result of a tool call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolResult {
    /// The call this answers.
    pub tool_call_id: String,
    /// Tool name, when known (filled from the conversation when the caller left it empty).
    pub name: Option<String>,
    /// Result text.
    pub content: String,
    /// Whether the tool failed.
    pub is_error: bool,
}

/// A function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    /// Function name.
    pub name: String,
    /// Description for the model.
    pub description: Option<String>,
    /// JSON Schema of the parameters (an object).
    pub parameters: serde_json::Value,
    /// Strict schema adherence, where supported.
    pub strict: bool,
}

/// How the model may use tools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model decides.
    Auto,
    /// No tool calls.
    None,
    /// At least one tool call.
    Required,
    /// This tool must be called.
    Named(String),
}

/// The format of the reply.
#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    /// Free text.
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON matching a schema.
    JsonSchema {
        /// Schema name.
        name: String,
        /// The schema.
        schema: serde_json::Value,
        /// Strict adherence.
        strict: bool,
    },
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FinishReason {
    /// Not reported.
    #[default]
    Unspecified,
    /// Natural stop or stop sequence.
    Stop,
    /// Token limit.
    Length,
    /// The model called tools.
    ToolCalls,
    /// Content filter.
    ContentFilter,
    /// Something else.
    Other,
}

/// Token usage as reported by a provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Input tokens, cached ones included.
    pub input_tokens: u64,
    /// Output tokens, reasoning included.
    pub output_tokens: u64,
    /// Input tokens read from cache, where reported.
    pub cached_input_tokens: Option<u64>,
    /// Input tokens written to cache, where reported.
    pub cache_write_tokens: Option<u64>,
    /// Reasoning tokens, where reported.
    pub reasoning_tokens: Option<u64>,
}

impl Usage {
    /// Input plus output tokens.
    pub fn total_tokens(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }
}

/// A complete answer from one provider.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChatResponse {
    /// The model as the provider named it (falls back to the requested one).
    pub model: String,
    /// Text parts and tool calls, in order.
    pub content: Vec<ContentPart>,
    /// Why generation stopped.
    pub finish_reason: FinishReason,
    /// Usage; `None` when the provider reported none.
    pub usage: Option<Usage>,
}

/// One event of a provider stream.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// More reply text.
    Text(String),
    /// More reasoning text.
    Reasoning(String),
    /// A piece of a tool call.
    ToolCall(ToolCallDelta),
    /// The provider reported usage (may come before or with the finish).
    Usage(Usage),
    /// The terminal event: the provider finished the reply. A stream without it is broken.
    Finish(FinishReason),
}

impl StreamEvent {
    /// Whether this event carries reply content (what counts as a first token).
    pub fn is_content(&self) -> bool {
        matches!(
            self,
            StreamEvent::Text(_) | StreamEvent::Reasoning(_) | StreamEvent::ToolCall(_)
        )
    }
}

/// A piece of a streamed tool call.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ToolCallDelta {
    /// Index of the tool call within the reply.
    pub index: u32,
    /// Call id (first piece only).
    pub id: Option<String>,
    /// Tool name (first piece only).
    pub name: Option<String>,
    /// More arguments text.
    pub arguments: String,
}

/// Why an attempt was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptKind {
    /// First choice.
    Primary,
    /// The next target of the plan, after the ones before it failed or were skipped.
    Fallback,
    /// In parallel, because an earlier attempt was slow.
    Hedge,
    /// A target of the plan again, after every target had its turn.
    Retry,
}

impl AttemptKind {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            AttemptKind::Primary => "primary",
            AttemptKind::Fallback => "fallback",
            AttemptKind::Hedge => "hedge",
            AttemptKind::Retry => "retry",
        }
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// It produced the answer.
    Succeeded,
    /// It failed with this error class (`ErrorClass::reason`).
    Failed(&'static str),
    /// Cancelled because another attempt won or the call ended.
    Cancelled,
    /// Never started, for this reason.
    Skipped(&'static str),
}

/// One attempt (or skipped target) of a call.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptRecord {
    /// Configured provider name.
    pub provider: String,
    /// Model at the provider.
    pub model: String,
    /// Why it was made.
    pub kind: AttemptKind,
    /// How it ended.
    pub outcome: AttemptOutcome,
    /// Start, from the start of the call.
    pub start_offset: std::time::Duration,
    /// Duration of the attempt.
    pub latency: std::time::Duration,
    /// Time to first content chunk, for streams.
    pub time_to_first_token: Option<std::time::Duration>,
}

/// The route of one call.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Route {
    /// The policy used, if any (shared with the plan: no copy per call).
    pub policy: Option<std::sync::Arc<str>>,
    /// Attempts and skipped targets in order.
    pub attempts: Vec<AttemptRecord>,
    /// What the response cache did for the call.
    pub cache: CacheOutcome,
    /// The experiment arm the call was assigned to, if its policy runs an experiment.
    pub arm: Option<std::sync::Arc<ArmRef>>,
    /// The version of the policy that served the call (none for a concrete model).
    pub revision: Option<PolicyRevision>,
}

/// The external guardrail checks (HTTP hooks, moderation calls) of a call, in the order they
/// ran; shown in the call's route. One pointer while there are none (it travels in every
/// answer and finish event).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GuardVerdicts(Option<Box<VerdictList>>);

#[derive(Debug, Clone, PartialEq, Default)]
struct VerdictList(Vec<GuardVerdict>);

impl GuardVerdicts {
    /// Appends `more`.
    pub fn extend(&mut self, more: impl IntoIterator<Item = GuardVerdict>) {
        let mut more = more.into_iter().peekable();
        if more.peek().is_some() {
            self.0.get_or_insert_with(Box::default).0.extend(more);
        }
    }

    /// The verdicts in order.
    pub fn iter(&self) -> std::slice::Iter<'_, GuardVerdict> {
        self.0.as_ref().map_or(&[][..], |v| &v.0[..]).iter()
    }

    /// The verdicts, owned.
    pub fn into_vec(self) -> Vec<GuardVerdict> {
        self.0.map(|v| v.0).unwrap_or_default()
    }
}

/// One external guardrail check of a call and what it decided.
#[derive(Debug, Clone, PartialEq)]
pub struct GuardVerdict {
    /// The guardrail profile it belongs to.
    pub profile: String,
    /// What kind of check: an HTTP hook or a moderation call.
    pub check: GuardCheck,
    /// Whether it looked at the request (false: the reply).
    pub request: bool,
    /// What it decided.
    pub decision: GuardDecision,
    /// How long it took (zero when it did not start).
    pub latency: std::time::Duration,
    /// For a block: the moderation categories over their thresholds, or the hook's reason;
    /// for a failed check: what failed (`timeout`, `status 500`, ...). Never the text.
    pub detail: String,
}

/// The kind of an external guardrail check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardCheck {
    /// An HTTP hook.
    Hook,
    /// A provider's moderation endpoint.
    Moderation,
}

/// What an external guardrail check decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GuardDecision {
    /// The text may pass.
    Allow,
    /// The call is refused.
    Block,
    /// The hook rewrote the text.
    Rewrite,
    /// The check failed (or could not start in the call's time) and its profile fails
    /// open: the text passed unchecked.
    FailedOpen,
    /// The check failed (or could not start in the call's time) and its profile fails
    /// closed: the call is refused.
    FailedClosed,
}

impl GuardDecision {
    /// The name (metric label and ledger action).
    pub fn name(self) -> &'static str {
        match self {
            GuardDecision::Allow => "allow",
            GuardDecision::Block => "block",
            GuardDecision::Rewrite => "rewrite",
            GuardDecision::FailedOpen => "fail_open",
            GuardDecision::FailedClosed => "fail_closed",
        }
    }
}

impl GuardCheck {
    /// The name (metric label and ledger entity).
    pub fn name(self) -> &'static str {
        match self {
            GuardCheck::Hook => "hook",
            GuardCheck::Moderation => "moderation",
        }
    }
}

/// The version of a policy that served a call, and its side of a staged rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyRevision {
    /// The policy version (its etag is `v{version}`; 32 bits keep a route, and with it
    /// every error that carries one, small).
    pub version: u32,
    /// The side of a rollout, when one runs.
    pub arm: RolloutArm,
}

/// A side of a staged policy rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RolloutArm {
    /// No rollout runs.
    #[default]
    None,
    /// The old version.
    Baseline,
    /// The new version being rolled out.
    Canary,
}

impl RolloutArm {
    /// Ledger label; empty without a rollout.
    pub fn label(self) -> &'static str {
        match self {
            RolloutArm::None => "",
            RolloutArm::Baseline => "baseline",
            RolloutArm::Canary => "canary",
        }
    }
}

/// An experiment and one of its arms.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ArmRef {
    /// The experiment's name.
    pub experiment: String,
    /// The arm's name.
    pub arm: String,
}

/// What the response cache did for one call.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum CacheOutcome {
    /// The cache is off for this call (the policy, the model, or `[cache]`).
    #[default]
    Off,
    /// Served from the cache: `similarity` is set for a semantic hit.
    Hit {
        /// Cosine similarity of the cached prompt, for a semantic hit.
        similarity: Option<f32>,
    },
    /// Looked up, not found, and the answer was not stored (not cacheable, or `no-store`).
    Miss,
    /// The answer was stored (after a miss, or a `no-cache` call that skipped the lookup).
    Stored,
    /// Neither looked up nor stored: `no-store`, or the request is not cacheable.
    Bypass,
}

impl CacheOutcome {
    /// Metric and ledger label; empty when the cache is off.
    pub fn label(self) -> &'static str {
        match self {
            CacheOutcome::Off => "",
            CacheOutcome::Hit { .. } => "hit",
            CacheOutcome::Miss => "miss",
            CacheOutcome::Stored => "stored",
            CacheOutcome::Bypass => "bypass",
        }
    }
}

/// How an embedding request wants its vectors back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EmbeddingEncoding {
    /// A list of floats.
    #[default]
    Float,
    /// Little-endian float32 bytes (base64 text on JSON surfaces).
    Base64,
}

/// An embedding request as the gateway understands it, validated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EmbedRequest {
    /// The model or policy name the caller asked for.
    pub model: String,
    /// The texts to embed, in order; never empty, no text empty.
    pub inputs: Vec<String>,
    /// The number of dimensions wanted; `None` means the model's default.
    pub dimensions: Option<u32>,
    /// How the caller wants the vectors (providers may use either on their wire).
    pub encoding: EmbeddingEncoding,
    /// Attribution tags (never sent upstream).
    pub tags: BTreeMap<String, String>,
    /// Opaque end-user id.
    pub user: Option<String>,
}

/// The embeddings of one request from one provider.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EmbedResponse {
    /// The model as the provider named it (falls back to the requested one).
    pub model: String,
    /// One vector per input, in input order.
    pub embeddings: Vec<Vec<f32>>,
    /// Usage (input tokens only); `None` when the provider reported none.
    pub usage: Option<Usage>,
}
