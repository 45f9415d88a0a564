//! The built-in `mock` provider: answers in-process, with no network and no key, so the
//! zero-config quick start works offline. Every reply says it comes from the mock.

use async_trait::async_trait;

use super::{
    EventStream, Provider, ProviderError,
    kinds::{
        BuildContext, KeyRequired, KindInput, KindSettings, KindSpec, ProviderSettings,
        SettingsIssue, no_fields,
    },
};
use crate::types::{
    ChatRequest, ChatResponse, ContentPart, FinishReason, Role, StreamEvent, Usage,
};

/// The provider kind and default name.
pub const KIND: &str = "mock";

/// The models the mock serves.
pub const MODELS: &[&str] = &["echo"];

/// The settings of `kind = "mock"` (none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MockSettings;

impl KindSettings for MockSettings {
    fn build(&self, ctx: BuildContext<'_>) -> std::sync::Arc<dyn Provider> {
        std::sync::Arc::new(Mock::new(ctx.name))
    }

    fn default_models(&self) -> Option<&'static [&'static str]> {
        Some(MODELS)
    }
}

fn parse(_input: &KindInput<'_>) -> Result<ProviderSettings, Vec<SettingsIssue>> {
    no_fields(MockSettings)
}

/// `kind = "mock"`: no URL, no key.
pub const SPEC: KindSpec = KindSpec {
    name: KIND,
    default_base_url: None,
    base_url_hint: "",
    http: false,
    key_env: &[],
    key_required: KeyRequired::Never,
    fields: &[],
    parse,
    discover: None,
};

/// The built-in mock provider.
#[derive(Debug, Clone)]
pub struct Mock {
    name: String,
}

impl Mock {
    /// A mock provider called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }
}

/// The mock's reply to `request`.
pub fn reply_text(request: &ChatRequest) -> String {
    let last_user = request
        .messages
        .iter()
        .rev()
        .find(|m| m.role == Role::User)
        .map(|m| m.joined_text())
        .unwrap_or_default();
    format!("This is a mock reply from llm-gateway's built-in mock provider. You said: {last_user}")
}

fn count_words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

fn usage(request: &ChatRequest, reply: &str) -> Usage {
    let input = request
        .messages
        .iter()
        .map(|m| count_words(&m.joined_text()))
        .sum();
    Usage {
        input_tokens: input,
        output_tokens: count_words(reply),
        ..Usage::default()
    }
}

#[async_trait]
impl Provider for Mock {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        KIND
    }

    async fn chat(
        &self,
        model: &str,
        request: &ChatRequest,
    ) -> Result<ChatResponse, ProviderError> {
        let text = reply_text(request);
        let usage = usage(request, &text);
        Ok(ChatResponse {
            model: model.to_owned(),
            content: vec![ContentPart::Text(text)],
            finish_reason: FinishReason::Stop,
            usage: Some(usage),
        })
    }

    async fn chat_stream(
        &self,
        _model: &str,
        request: &ChatRequest,
    ) -> Result<EventStream, ProviderError> {
        let text = reply_text(request);
        let usage = usage(request, &text);
        let mut events: Vec<Result<StreamEvent, ProviderError>> = text
            .split_inclusive(' ')
            .map(|word| Ok(StreamEvent::Text(word.to_owned())))
            .collect();
        events.push(Ok(StreamEvent::Usage(usage)));
        events.push(Ok(StreamEvent::Finish(FinishReason::Stop)));
        Ok(Box::pin(futures_util::stream::iter(events)))
    }
}
