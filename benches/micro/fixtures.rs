//! Realistic inputs shared by the benchmarks.

use llm_gateway::{pb, server::convert, types};

/// A non-streaming Chat Completions answer, as OpenAI sends it.
pub const CHAT_COMPLETION: &[u8] =
    include_bytes!("../../tests/fixtures/openai/chat_completion.json");

/// A typical call: a system prompt, two turns of history and a question, some sampling
/// parameters and attribution tags.
pub fn pb_request() -> pb::ChatRequest {
    let text = |role: pb::Role, text: &str| pb::Message {
        role: role as i32,
        content: vec![pb::ContentPart {
            part: Some(pb::content_part::Part::Text(text.to_owned())),
        }],
        name: String::new(),
    };
    pb::ChatRequest {
        model: "openai/gpt-4o-mini".to_owned(),
        messages: vec![
            text(
                pb::Role::System,
                "You are a helpful assistant for an online shop. Answer briefly and politely, \
                 and never invent order numbers.",
            ),
            text(
                pb::Role::User,
                "Where is my order? I ordered it last Tuesday.",
            ),
            text(
                pb::Role::Assistant,
                "I can help with that. Could you tell me the e-mail address you ordered with?",
            ),
            text(pb::Role::User, "It is jane@example.com, thanks."),
        ],
        temperature: Some(0.2),
        max_tokens: Some(512),
        tags: [("team", "support"), ("feature", "order-status")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        user: "user-1234".to_owned(),
        ..pb::ChatRequest::default()
    }
}

/// The same call as a validated domain request.
pub fn request() -> types::ChatRequest {
    convert::chat_request(pb_request()).expect("the fixture request is valid")
}

/// A realistic SSE body: a role chunk, `n` content chunks of a few characters each (one
/// token per chunk, as OpenAI streams), a finish chunk, a usage chunk and `[DONE]`.
pub fn sse_body(n: usize) -> Vec<u8> {
    let head = r#"{"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk","created":1741569952,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_06737a9306","#;
    let mut out = String::new();
    let mut event = |body: &str| {
        out.push_str("data: ");
        out.push_str(head);
        out.push_str(body);
        out.push_str("}\n\n");
    };
    event(
        r#""choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null"#,
    );
    let words = [
        "Your", " order", " ships", " on", " Monday", ",", " Jane", ".",
    ];
    for i in 0..n {
        let word = words[i % words.len()];
        event(&format!(
            r#""choices":[{{"index":0,"delta":{{"content":"{word}"}},"logprobs":null,"finish_reason":null}}],"usage":null"#
        ));
    }
    event(
        r#""choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null"#,
    );
    event(&format!(
        r#""choices":[],"usage":{{"prompt_tokens":64,"completion_tokens":{n},"total_tokens":{},"prompt_tokens_details":{{"cached_tokens":0,"audio_tokens":0}},"completion_tokens_details":{{"reasoning_tokens":0,"audio_tokens":0}}}}"#,
        64 + n
    ));
    out.push_str("data: [DONE]\n\n");
    out.into_bytes()
}
