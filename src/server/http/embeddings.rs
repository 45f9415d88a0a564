//! OpenAI's embeddings endpoint on the HTTP front: `POST /v1/embeddings`, on the engine's
//! embedding path (see `server::engine`), metered as `OpenAI.Embeddings`.
//!
//! `input` is one text or a list of texts (token arrays are refused: the gateway routes
//! across providers, whose tokenizers differ); `encoding_format` is `float` (the default) or
//! `base64` (what the official SDKs ask for unless told otherwise); `dimensions`, `user`, and
//! `metadata` (the call's tags, as on `/v1/chat/completions`).

use std::collections::BTreeMap;

use axum::{
    body::Body,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::Response,
};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Front, Head, json_response, openai::OpenAi, read_json};
use crate::{
    error::{FieldViolation, GatewayError},
    executor::EmbedAnswer,
    providers::embed::to_le_bytes,
    server::convert_embed::check_embed,
    types::{self, EmbeddingEncoding},
};

/// The `rpc` label of embedding calls on this surface.
pub const RPC: &str = "OpenAI.Embeddings";

/// An embeddings request. Unknown fields are ignored, as the real API does.
#[derive(Debug, Deserialize)]
pub struct EmbeddingsRequest {
    model: String,
    input: Input,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<u32>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Input {
    One(String),
    Many(Vec<String>),
    /// Token arrays, or anything else: refused with a message.
    Other(#[expect(dead_code, reason = "only its presence matters: it is refused")] Value),
}

/// Validates and converts a request; every problem names its field.
pub fn embed_request(req: EmbeddingsRequest) -> Result<types::EmbedRequest, GatewayError> {
    let tags = req.metadata.unwrap_or_default();
    let user = req.user.unwrap_or_default();
    let (inputs, mut v) = match req.input {
        Input::One(text) => (vec![text], Vec::new()),
        Input::Many(texts) => (texts, Vec::new()),
        Input::Other(_) => (
            vec![String::from("-")],
            vec![FieldViolation::new(
                "input",
                "must be a string or a list of strings (token arrays are not supported)",
            )],
        ),
    };
    v.extend(check_embed(
        &req.model,
        "input",
        &inputs,
        req.dimensions,
        &tags,
        &user,
    ));
    let encoding = match req.encoding_format.as_deref() {
        None | Some("float") => EmbeddingEncoding::Float,
        Some("base64") => EmbeddingEncoding::Base64,
        Some(other) => {
            v.push(FieldViolation::new(
                "encoding_format",
                format!("`{other}` is not one of: float, base64"),
            ));
            EmbeddingEncoding::Float
        }
    };
    if !v.is_empty() {
        return Err(GatewayError::InvalidArgument(v));
    }
    Ok(types::EmbedRequest {
        model: req.model,
        inputs,
        dimensions: req.dimensions,
        encoding,
        tags,
        user: Some(user).filter(|u| !u.is_empty()),
    })
}

/// The list object OpenAI answers with.
pub fn embeddings_json(answer: &EmbedAnswer, encoding: EmbeddingEncoding) -> Value {
    let data: Vec<Value> = answer
        .response
        .embeddings
        .iter()
        .enumerate()
        .map(|(index, vector)| {
            let embedding = match encoding {
                EmbeddingEncoding::Float => json!(vector),
                EmbeddingEncoding::Base64 => {
                    json!(base64::engine::general_purpose::STANDARD.encode(to_le_bytes(vector)))
                }
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let tokens = answer.response.usage.map_or(0, |u| u.input_tokens);
    json!({
        "object": "list",
        "data": data,
        "model": answer.response.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })
}

/// `POST /v1/embeddings`.
pub(super) async fn embeddings(
    State(front): State<Front>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let head = Head::read(&headers);
    let id = head.request_id.clone();
    let request: EmbeddingsRequest = match read_json(body, front.max_body_bytes).await {
        Ok(r) => r,
        Err(err) => return super::error_response::<OpenAi>(err, &id),
    };
    let call = match head.call(&front.engine, RPC) {
        Ok(c) => c,
        Err(err) => return super::error_response::<OpenAi>(err, &id),
    };
    let mut encoding = EmbeddingEncoding::Float;
    let answer = front
        .engine
        .embed(call, || {
            let req = embed_request(request)?;
            encoding = req.encoding;
            Ok(req)
        })
        .await;
    match answer {
        Ok(answer) => json_response(StatusCode::OK, &id, &embeddings_json(&answer, encoding)),
        Err(err) => super::error_response::<OpenAi>(err, &id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: Value) -> Result<types::EmbedRequest, GatewayError> {
        embed_request(serde_json::from_value(body).unwrap())
    }

    fn fields(body: Value) -> Vec<String> {
        match parse(body).unwrap_err() {
            GatewayError::InvalidArgument(v) => v.into_iter().map(|f| f.field).collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn requests_convert_and_every_problem_names_its_field() {
        let req = parse(json!({
            "model": "openai/text-embedding-3-small",
            "input": "one text",
            "encoding_format": "base64",
            "dimensions": 8,
            "user": "u",
            "metadata": {"team": "search"},
        }))
        .unwrap();
        assert_eq!(req.inputs, ["one text"]);
        assert_eq!(req.encoding, EmbeddingEncoding::Base64);
        assert_eq!(req.dimensions, Some(8));
        assert_eq!(req.tags["team"], "search");
        let req = parse(json!({"model": "m/x", "input": ["a", "b"]})).unwrap();
        assert_eq!(req.inputs, ["a", "b"]);
        assert_eq!(req.encoding, EmbeddingEncoding::Float);
        assert_eq!(fields(json!({"model": "m/x", "input": [1, 2]})), ["input"]);
        assert_eq!(fields(json!({"model": "m/x", "input": []})), ["input"]);
        assert_eq!(
            fields(json!({"model": "m/x", "input": ["a", ""]})),
            ["input[1]"]
        );
        assert_eq!(
            fields(json!({"model": "", "input": "a", "encoding_format": "int8", "dimensions": 0})),
            ["model", "dimensions", "encoding_format"]
        );
    }
}
