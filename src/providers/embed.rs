//! The embeddings half of a wire format: where an embedding call goes, what it sends and how
//! its answer reads, as pure functions over bytes, beside the chat half in [`super::wire`].
//!
//! A [`super::WireFormat`] whose API has embeddings returns its [`EmbedWire`] from
//! [`super::WireFormat::embeddings`]; [`super::HttpProvider`] then serves
//! [`super::Provider::embed`] with the same transport, keys and error policy as chat. A batch
//! larger than [`EmbedWire::max_batch`] goes out as several requests (a few at a time) whose
//! vectors are joined in input order. Kinds without embeddings keep the default answer,
//! which the executor turns into `FAILED_PRECONDITION` (`EMBEDDINGS_UNSUPPORTED`) before any
//! request is sent.

use base64::Engine as _;

use super::{ErrorClass, ProviderError};
use crate::types::{EmbedRequest, EmbedResponse, Usage};

/// The ErrorInfo reason of a call whose targets serve no embeddings.
pub const UNSUPPORTED_REASON: &str = "EMBEDDINGS_UNSUPPORTED";

/// How many requests of one split batch are in flight at once.
pub const MAX_PARALLEL_REQUESTS: usize = 8;

/// One provider API's embeddings operation.
pub trait EmbedWire: Send + Sync + 'static {
    /// The most inputs one request to `model` may carry.
    fn max_batch(&self, model: &str) -> usize;

    /// The URL of an embedding call to `model`. Refuses model names that would change the
    /// URL's meaning with [`ErrorClass::InvalidRequest`].
    fn embed_endpoint(&self, model: &str) -> Result<reqwest::Url, ProviderError>;

    /// The body of a request embedding `inputs` (at most [`EmbedWire::max_batch`] of
    /// `request.inputs`) with the request's settings.
    fn build_embed(
        &self,
        model: &str,
        request: &EmbedRequest,
        inputs: &[String],
    ) -> Result<Vec<u8>, ProviderError>;

    /// Parses a 2xx body answering `count` inputs; a body with another number of vectors is
    /// [`ErrorClass::InvalidResponse`] (see [`check_count`]).
    fn parse_embed(
        &self,
        body: &[u8],
        model: &str,
        count: usize,
    ) -> Result<EmbedResponse, ProviderError>;
}

/// The answer of a provider kind without embeddings (the executor checks
/// [`super::Provider::supports_embeddings`] first, so callers see
/// [`UNSUPPORTED_REASON`] instead).
pub fn unsupported(kind: &str) -> ProviderError {
    ProviderError::new(
        ErrorClass::InvalidRequest,
        format!("provider kind `{kind}` serves no embeddings"),
    )
}

/// Fails unless a reply holds exactly `expected` vectors.
pub fn check_count(got: usize, expected: usize) -> Result<(), ProviderError> {
    if got == expected {
        Ok(())
    } else {
        Err(ProviderError::new(
            ErrorClass::InvalidResponse,
            format!("the provider returned {got} embeddings for {expected} inputs"),
        ))
    }
}

/// Decodes a base64 vector of little-endian float32 values (OpenAI's
/// `encoding_format: base64`).
pub fn decode_base64_f32(text: &str) -> Result<Vec<f32>, ProviderError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()
        .filter(|b| b.len() % 4 == 0)
        .ok_or_else(|| {
            ProviderError::new(
                ErrorClass::InvalidResponse,
                "the provider's base64 embedding is not a list of float32 values",
            )
        })?;
    Ok(from_le_bytes(&bytes))
}

/// Little-endian float32 bytes as floats (a trailing partial value is ignored).
pub fn from_le_bytes(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Floats as little-endian float32 bytes.
pub fn to_le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Joins the answers of a split batch, in order: the vectors concatenated, the usage summed
/// (unknown when one part reported none), the model of the first part.
pub fn join(parts: Vec<EmbedResponse>, requested_model: &str) -> EmbedResponse {
    let mut out = EmbedResponse {
        model: String::new(),
        embeddings: Vec::new(),
        usage: Some(Usage::default()),
    };
    for part in parts {
        if out.model.is_empty() {
            out.model = part.model;
        }
        out.embeddings.extend(part.embeddings);
        out.usage = match (out.usage, part.usage) {
            (Some(total), Some(u)) => Some(Usage {
                input_tokens: total.input_tokens.saturating_add(u.input_tokens),
                ..Usage::default()
            }),
            _ => None,
        };
    }
    if out.model.is_empty() {
        requested_model.clone_into(&mut out.model);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_vectors_round_trip() {
        let values = [0.5f32, -1.25, 3.0];
        let text = base64::engine::general_purpose::STANDARD.encode(to_le_bytes(&values));
        assert_eq!(decode_base64_f32(&text).unwrap(), values);
        // 0.5 is 0x3f000000: bytes 00 00 00 3f.
        assert!((decode_base64_f32("AAAAPw==").unwrap()[0] - 0.5).abs() < f32::EPSILON);
        for bad in ["not base64!", "AAAA/w"] {
            assert_eq!(
                decode_base64_f32(bad).unwrap_err().class,
                ErrorClass::InvalidResponse,
                "{bad}"
            );
        }
    }

    #[test]
    fn split_answers_join_in_order() {
        let part = |v: f32, tokens: Option<u64>| EmbedResponse {
            model: "m-1".into(),
            embeddings: vec![vec![v]],
            usage: tokens.map(|t| Usage {
                input_tokens: t,
                ..Usage::default()
            }),
        };
        let joined = join(vec![part(1.0, Some(2)), part(2.0, Some(3))], "m");
        assert_eq!(joined.embeddings, [vec![1.0], vec![2.0]]);
        assert_eq!(joined.usage.unwrap().input_tokens, 5);
        assert_eq!(joined.model, "m-1");
        assert_eq!(
            join(vec![part(1.0, Some(2)), part(2.0, None)], "m").usage,
            None
        );
        assert_eq!(
            check_count(2, 3).unwrap_err().class,
            ErrorClass::InvalidResponse
        );
    }
}
