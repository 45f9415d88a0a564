//! Conversion and validation of embedding calls between the generated protobuf types and the
//! domain types (the embedding half of [`super::convert`]), and the checks every surface's
//! embedding request shares.

use std::collections::BTreeMap;

use super::convert::{check_common, cost, route, usage};
use crate::{
    error::{FieldViolation, GatewayError},
    executor::EmbedAnswer,
    pb,
    providers::embed::to_le_bytes,
    types::{self, EmbeddingEncoding},
};

/// The most texts one embedding call may carry (OpenAI's limit per request).
pub const MAX_INPUTS: usize = 2048;

/// The most dimensions a call may ask for.
pub const MAX_DIMENSIONS: u32 = 16_384;

/// The checks every surface's embedding request shares; `inputs_field` is the surface's name
/// of the texts (`inputs` on gRPC, `input` on the OpenAI-compatible API).
pub fn check_embed(
    model: &str,
    inputs_field: &str,
    inputs: &[String],
    dimensions: Option<u32>,
    tags: &BTreeMap<String, String>,
    user: &str,
) -> Vec<FieldViolation> {
    let mut v = check_common(model, true, &types::SamplingParams::default(), tags, user);
    if inputs.is_empty() {
        v.push(FieldViolation::new(
            inputs_field,
            "must hold at least one text to embed",
        ));
    } else if inputs.len() > MAX_INPUTS {
        v.push(FieldViolation::new(
            inputs_field,
            format!(
                "at most {MAX_INPUTS} texts per call, got {}; split the batch",
                inputs.len()
            ),
        ));
    }
    for (i, text) in inputs.iter().enumerate().take(MAX_INPUTS) {
        if text.is_empty() {
            v.push(FieldViolation::new(
                format!("{inputs_field}[{i}]"),
                "must not be empty",
            ));
        }
    }
    if let Some(d) = dimensions
        && !(1..=MAX_DIMENSIONS).contains(&d)
    {
        v.push(FieldViolation::new(
            "dimensions",
            format!("must be greater than 0 and at most {MAX_DIMENSIONS}, got {d}"),
        ));
    }
    v
}

/// Validates and converts an `EmbedRequest`. Every problem is reported.
pub fn embed_request(req: pb::EmbedRequest) -> Result<types::EmbedRequest, GatewayError> {
    let tags: BTreeMap<String, String> = req.tags.into_iter().collect();
    let mut v = check_embed(
        &req.model,
        "inputs",
        &req.inputs,
        req.dimensions,
        &tags,
        &req.user,
    );
    let encoding = match pb::EmbeddingEncoding::try_from(req.encoding) {
        Ok(pb::EmbeddingEncoding::Unspecified | pb::EmbeddingEncoding::Float) => {
            EmbeddingEncoding::Float
        }
        Ok(pb::EmbeddingEncoding::Base64) => EmbeddingEncoding::Base64,
        Err(_) => {
            v.push(FieldViolation::new(
                "encoding",
                format!("unknown encoding {}; use FLOAT or BASE64", req.encoding),
            ));
            EmbeddingEncoding::Float
        }
    };
    if !v.is_empty() {
        return Err(GatewayError::InvalidArgument(v));
    }
    Ok(types::EmbedRequest {
        model: req.model,
        inputs: req.inputs,
        dimensions: req.dimensions,
        encoding,
        tags,
        user: Some(req.user).filter(|u| !u.is_empty()),
    })
}

/// Converts an embedding answer, each vector in `encoding`.
pub fn embed_response(
    id: String,
    answer: EmbedAnswer,
    encoding: EmbeddingEncoding,
) -> pb::EmbedResponse {
    let EmbedAnswer {
        response,
        provider,
        cost: call_cost,
        route: call_route,
        metrics: _,
    } = answer;
    pb::EmbedResponse {
        id,
        provider,
        model: response.model,
        embeddings: response
            .embeddings
            .into_iter()
            .enumerate()
            .map(|(index, values)| {
                let index = u32::try_from(index).unwrap_or(u32::MAX);
                match encoding {
                    EmbeddingEncoding::Float => pb::Embedding {
                        index,
                        values,
                        packed: Vec::new(),
                    },
                    EmbeddingEncoding::Base64 => pb::Embedding {
                        index,
                        values: Vec::new(),
                        packed: to_le_bytes(&values),
                    },
                }
            })
            .collect(),
        usage: Some(usage(response.usage.as_ref())),
        cost: cost(call_cost),
        route: Some(route(call_route)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(req: pb::EmbedRequest) -> Vec<String> {
        match embed_request(req).unwrap_err() {
            GatewayError::InvalidArgument(v) => v.into_iter().map(|f| f.field).collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_problem_names_its_field() {
        let ok = pb::EmbedRequest {
            model: "openai/text-embedding-3-small".into(),
            inputs: vec!["a".into(), "b".into()],
            dimensions: Some(64),
            encoding: pb::EmbeddingEncoding::Base64 as i32,
            ..Default::default()
        };
        let req = embed_request(ok.clone()).unwrap();
        assert_eq!(req.encoding, EmbeddingEncoding::Base64);
        assert_eq!(req.inputs, ["a", "b"]);
        assert_eq!(
            fields(pb::EmbedRequest {
                model: String::new(),
                inputs: Vec::new(),
                dimensions: Some(0),
                encoding: 9,
                ..Default::default()
            }),
            ["model", "inputs", "dimensions", "encoding"]
        );
        assert_eq!(
            fields(pb::EmbedRequest {
                inputs: vec!["a".into(), String::new()],
                ..ok.clone()
            }),
            ["inputs[1]"]
        );
        assert_eq!(
            fields(pb::EmbedRequest {
                inputs: vec!["a".into(); MAX_INPUTS + 1],
                ..ok
            }),
            ["inputs"]
        );
    }
}
