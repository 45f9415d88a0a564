//! The HTTP front's request decoders (OpenAI `POST /v1/chat/completions`, Anthropic
//! `POST /v1/messages`): any bytes, generated JSON with the surfaces' real keys, and valid
//! bodies damaged, go through the body parser and the conversion to a domain request. No
//! input panics; every refusal is the caller's (InvalidArgument naming a field, a 4xx
//! status), never INTERNAL or a 5xx; the valid bodies convert.

use proptest::{collection::vec, prelude::*, sample::Index};
use serde_json::{Value, json};

use super::providers::{damage, damaged};
use crate::{
    error::GatewayError,
    server::http::{anthropic, openai, parse_json, status_of},
    types::ChatRequest,
};

/// One surface: its body bytes to a domain request.
type Decode = fn(&[u8]) -> Result<ChatRequest, GatewayError>;

fn openai_body(bytes: &[u8]) -> Result<ChatRequest, GatewayError> {
    openai::chat_request(parse_json(bytes)?)
}

fn anthropic_body(bytes: &[u8]) -> Result<ChatRequest, GatewayError> {
    anthropic::chat_request(parse_json(bytes)?)
}

const SURFACES: [(&str, Decode); 2] = [("openai", openai_body), ("anthropic", anthropic_body)];

/// Valid bodies of each surface, the seeds of the damaged ones.
fn valid_bodies(surface: &str) -> Vec<Value> {
    if surface == "openai" {
        vec![
            json!({"model": "mock/echo", "messages": [{"role": "user", "content": "hi"}]}),
            openai::tests::full_request(),
            json!({
                "model": "mock/echo", "stream": true, "stream_options": {"include_usage": true},
                "max_tokens": 16, "response_format": {"type": "json_object"}, "tool_choice": "auto",
                "messages": [{"role": "user", "content": [{"type": "text", "text": "json please"}]}]
            }),
        ]
    } else {
        vec![
            json!({"model": "mock/echo", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}),
            anthropic::tests::full_request(),
            json!({
                "model": "mock/echo", "max_tokens": 32, "stream": true, "temperature": 0.2,
                "system": "short answers", "stop_sequences": ["END"],
                "messages": [{"role": "user", "content": [
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                    {"type": "text", "text": "what is this?"}
                ]}]
            }),
        ]
    }
}

/// The verdict on one body is a clean one: a domain request, or the caller's error.
fn check(surface: &str, decode: Decode, bytes: &[u8]) -> Result<(), TestCaseError> {
    let Err(err) = decode(bytes) else {
        return Ok(());
    };
    let status = status_of(err.code());
    prop_assert!(status.is_client_error(), "{surface}: {status} for {err}");
    let GatewayError::InvalidArgument(violations) = &err else {
        return Err(TestCaseError::fail(format!(
            "{surface}: not InvalidArgument: {err:?}"
        )));
    };
    prop_assert!(!violations.is_empty(), "{surface}: {err}");
    for v in violations {
        prop_assert!(
            !v.field.is_empty() && !v.description.is_empty(),
            "{surface}: {v:?}"
        );
    }
    Ok(())
}

fn check_all(bytes: &[u8]) -> Result<(), TestCaseError> {
    for (surface, decode) in SURFACES {
        check(surface, decode, bytes)?;
    }
    Ok(())
}

/// JSON built from both surfaces' keys and the values they take.
fn json_value() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        prop::sample::select(vec![
            "model",
            "messages",
            "role",
            "content",
            "type",
            "text",
            "image_url",
            "url",
            "detail",
            "image",
            "source",
            "media_type",
            "data",
            "tools",
            "tool_choice",
            "tool_calls",
            "tool_call_id",
            "function",
            "name",
            "arguments",
            "parameters",
            "input_schema",
            "input",
            "id",
            "response_format",
            "json_schema",
            "schema",
            "strict",
            "stream",
            "stream_options",
            "include_usage",
            "max_tokens",
            "max_completion_tokens",
            "temperature",
            "top_p",
            "top_k",
            "stop",
            "stop_sequences",
            "seed",
            "n",
            "system",
            "tool_use",
            "tool_result",
            "tool_use_id",
            "is_error",
            "metadata",
            "user",
            "user_id",
            "parallel_tool_calls",
            "disable_parallel_tool_use",
        ])
        .prop_map(str::to_owned),
        "[a-z_]{1,10}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        (0u64..5).prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        prop::sample::select(vec![
            "mock/echo",
            "user",
            "assistant",
            "system",
            "tool",
            "developer",
            "text",
            "image_url",
            "image",
            "tool_use",
            "tool_result",
            "function",
            "auto",
            "any",
            "none",
            "required",
            "json_object",
            "json_schema",
            "base64",
            "url",
            "image/png",
            "https://x.test/a.png",
            "data:image/png;base64,iVBORw0KGgo=",
            "{}",
            "",
        ])
        .prop_map(|s| Value::String(s.to_owned())),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 64, 6, move |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(key.clone(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A message: mostly a role and content of the surfaces' shapes, with generated extras.
fn message() -> impl Strategy<Value = Value> {
    let role = prop::sample::select(vec!["user", "assistant", "system", "tool", "developer"]);
    let kind = prop::sample::select(vec![
        "text",
        "image_url",
        "image",
        "tool_use",
        "tool_result",
    ]);
    let part = (kind, "[ -~]{0,12}", json_value()).prop_map(|(kind, text, extra)| {
        let mut part = match extra {
            Value::Object(m) => m,
            _ => serde_json::Map::new(),
        };
        part.insert("type".into(), Value::from(kind));
        part.insert("text".into(), Value::from(text));
        Value::Object(part)
    });
    let content = prop_oneof![
        "[ -~]{0,12}".prop_map(Value::String),
        vec(part, 0..3).prop_map(Value::Array),
        json_value(),
    ];
    prop_oneof![
        3 => (role, content).prop_map(|(role, content)| json!({"role": role, "content": content})),
        1 => json_value(),
    ]
}

/// A top-level body: an object with a model, messages and `max_tokens`, and generated
/// extras, so that conversion is reached.
fn body() -> impl Strategy<Value = Value> {
    (
        json_value(),
        vec(message(), 0..4),
        prop::option::of(json_value()),
    )
        .prop_map(|(rest, messages, model)| {
            let mut object = match rest {
                Value::Object(m) => m,
                other => [("extra".to_owned(), other)].into_iter().collect(),
            };
            object.insert(
                "model".into(),
                model.unwrap_or_else(|| Value::from("mock/echo")),
            );
            object.insert("messages".into(), Value::Array(messages));
            object.entry("max_tokens").or_insert(Value::from(16));
            Value::Object(object)
        })
}

#[test]
fn the_valid_bodies_convert() {
    for (surface, decode) in SURFACES {
        for body in valid_bodies(surface) {
            let bytes = serde_json::to_vec(&body).unwrap();
            if let Err(err) = decode(&bytes) {
                panic!("{surface}: {body} is refused: {err}");
            }
        }
    }
}

proptest! {
    #![proptest_config(super::config())]

    #[test]
    fn any_bytes_are_refused_cleanly(bytes in vec(any::<u8>(), 0..256)) {
        check_all(&bytes)?;
    }

    #[test]
    fn any_json_converts_or_is_refused_cleanly(value in json_value()) {
        check_all(&serde_json::to_vec(&value).unwrap())?;
    }

    #[test]
    fn request_shaped_json_converts_or_is_refused_cleanly(value in body()) {
        check_all(&serde_json::to_vec(&value).unwrap())?;
    }

    #[test]
    fn damaged_valid_bodies_are_refused_cleanly(
        which in any::<Index>(),
        damages in vec(damage(), 1..4),
    ) {
        for (surface, decode) in SURFACES {
            let bodies = valid_bodies(surface);
            let body = &bodies[which.index(bodies.len())];
            let bytes = damaged(serde_json::to_vec(body).unwrap(), &damages);
            check(surface, decode, &bytes)?;
        }
    }
}
