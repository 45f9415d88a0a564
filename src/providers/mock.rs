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
    ChatRequest, ChatResponse, ContentPart, EmbedRequest, EmbedResponse, FinishReason, Role,
    StreamEvent, Usage,
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

/// The number of dimensions of [`text_embedding`] vectors when a request sets none.
pub const EMBEDDING_DIMENSIONS: usize = 256;

/// The mock's embedding of `text` (the in-process mock's and the mock upstream's, for every
/// wire format): deterministic, so the same text always gets the same vector, and texts
/// sharing words are closer (cosine) than unrelated ones.
///
/// Signed feature hashing: `text` is lowercased and split into words (runs of letters and
/// digits); every word adds 1.0, and every character trigram of the word padded with a space
/// on each side (`" ca"`, `"cat"`, `"at "`) adds 0.5, at dimension `h % dimensions` with the
/// sign of `h`'s top bit, where `h` is the 64-bit FNV-1a hash of the feature (a `w` or `t`
/// byte, then its UTF-8). The vector is then L2-normalised. A text without words is its
/// trimmed self as one word; an empty one is the first unit vector. `dimensions` 0 is 1.
pub fn text_embedding(text: &str, dimensions: usize) -> Vec<f32> {
    let dimensions = dimensions.max(1);
    let mut vector = vec![0.0f32; dimensions];
    let mut add = |kind: u8, feature: &str, weight: f32| {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in std::iter::once(kind).chain(feature.bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        let sign = if h >> 63 == 1 { -1.0 } else { 1.0 };
        // The remainder is below `dimensions`, a usize.
        vector[usize::try_from(h % dimensions as u64).unwrap_or(0)] += sign * weight;
    };
    let lower = text.to_lowercase();
    let mut words: Vec<&str> = lower
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    if words.is_empty() && !lower.trim().is_empty() {
        words.push(lower.trim());
    }
    for word in words {
        add(b'w', word, 1.0);
        let padded: Vec<char> = std::iter::once(' ')
            .chain(word.chars())
            .chain(std::iter::once(' '))
            .collect();
        for trigram in padded.windows(3) {
            add(b't', &trigram.iter().collect::<String>(), 0.5);
        }
    }
    let norm = vector.iter().map(|v| v * v).sum::<f32>().sqrt();
    if norm > 0.0 {
        vector.iter_mut().for_each(|v| *v /= norm);
    } else {
        vector[0] = 1.0;
    }
    vector
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

    fn supports_embeddings(&self) -> bool {
        true
    }

    /// [`text_embedding`] of every input; one token per word.
    async fn embed(
        &self,
        model: &str,
        request: &EmbedRequest,
    ) -> Result<EmbedResponse, ProviderError> {
        let dimensions = request
            .dimensions
            .map_or(EMBEDDING_DIMENSIONS, |d| d as usize);
        Ok(EmbedResponse {
            model: model.to_owned(),
            embeddings: request
                .inputs
                .iter()
                .map(|text| text_embedding(text, dimensions))
                .collect(),
            usage: Some(Usage {
                input_tokens: request.inputs.iter().map(|t| count_words(t)).sum(),
                ..Usage::default()
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cosine(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn embeddings_are_deterministic_unit_vectors_closer_for_shared_words() {
        let a = text_embedding("How do I reset my password?", 256);
        assert_eq!(a, text_embedding("How do I reset my password?", 256));
        assert_eq!(a.len(), 256);
        assert!((cosine(&a, &a) - 1.0).abs() < 1e-5);
        let near = text_embedding("how can I reset the password", 256);
        let far = text_embedding("Quarterly revenue grew in Europe", 256);
        assert!(cosine(&a, &near) > 0.5, "{}", cosine(&a, &near));
        assert!(cosine(&a, &near) > cosine(&a, &far) + 0.3);
        assert_eq!(text_embedding("", 4), [1.0, 0.0, 0.0, 0.0]);
        assert_eq!(text_embedding("!!", 3).len(), 3);
        assert_eq!(text_embedding("x", 0).len(), 1);
    }
}
