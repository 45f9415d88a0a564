//! Each provider's response parser, stream-event decoder and error-body classifier, fed
//! generated JSON, any bytes, and the conformance fixtures damaged: no panic; errors are
//! upstream classes (never INTERNAL); a stream decodes the same however its bytes are cut; a
//! transient HTTP status decides the class alone; a key echoed in an error body never
//! reaches the caller's message.

use std::collections::VecDeque;

use proptest::{collection::vec, prelude::*, sample::Index};

use crate::{
    error::upstream_code,
    providers::{
        ErrorClass, ProviderError, StreamDecoder, WireFormat, anthropic, bedrock,
        conformance::{FIXTURES, fixture},
        gemini,
        openai::{self, OpenAiConfig},
        vertex,
    },
    types::{ChatResponse, StreamEvent},
};

/// What a stream decoder yields for a body cut at `cuts`: events, and how it ended.
type Decoded = (Vec<StreamEvent>, Result<(), ErrorClass>);

/// A wire format, type-erased.
trait Wire {
    fn parse(&self, body: &[u8]) -> Result<ChatResponse, ProviderError>;
    fn decode(&self, body: &[u8], cuts: &[usize]) -> Decoded;
    fn classify(&self, status: u16, headers: &http::HeaderMap, body: &[u8]) -> ProviderError;
}

impl<W: WireFormat> Wire for W {
    fn parse(&self, body: &[u8]) -> Result<ChatResponse, ProviderError> {
        self.parse_response(body, "m")
    }

    fn decode(&self, body: &[u8], cuts: &[usize]) -> Decoded {
        let mut decoder = self.stream_decoder("m");
        let mut out = VecDeque::new();
        let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
        bounds.sort_unstable();
        bounds.push(body.len());
        let mut start = 0;
        let mut ended = Ok(false);
        for end in bounds {
            if end < start {
                continue;
            }
            ended = decoder.feed(&body[start..end], &mut out);
            start = end;
            if !matches!(ended, Ok(false)) {
                break;
            }
        }
        let ended = match ended {
            Ok(true) => Ok(()),
            Ok(false) => decoder.end_of_body(&mut out),
            Err(err) => Err(err),
        };
        (out.into_iter().collect(), ended.map_err(|e| e.class))
    }

    fn classify(&self, status: u16, headers: &http::HeaderMap, body: &[u8]) -> ProviderError {
        WireFormat::classify(self, status, headers, body)
    }
}

fn wires() -> Vec<(&'static str, Box<dyn Wire>)> {
    vec![
        (
            "openai",
            Box::new(openai::ChatCompletions::new(OpenAiConfig::new(
                openai::DEFAULT_BASE_URL,
            ))),
        ),
        (
            "anthropic",
            Box::new(anthropic::Messages::new(anthropic::AnthropicConfig::new(
                anthropic::DEFAULT_BASE_URL,
            ))),
        ),
        (
            "gemini",
            Box::new(gemini::GenerateContent::new(gemini::DEFAULT_BASE_URL)),
        ),
        (
            "bedrock",
            Box::new(bedrock::Converse::new(bedrock::default_endpoint(
                "us-east-1",
            ))),
        ),
        // Vertex speaks Gemini's payloads for Gemini models (the fixtures' model `m` is one).
        (
            "gemini",
            Box::new(vertex::VertexWire::new(
                "https://us-central1-aiplatform.googleapis.com",
                Some("p".into()),
                "us-central1",
            )),
        ),
    ]
}

/// One of the conformance fixtures whose names start with `prefix`.
fn pick(which: Index, prefix: &str) -> &'static str {
    let files: Vec<&'static str> = FIXTURES
        .iter()
        .copied()
        .filter(|f| f.starts_with(prefix))
        .collect();
    files[which.index(files.len())]
}

/// A damage to real bytes: overwrite, insert, delete, or cut.
#[derive(Debug, Clone)]
pub(super) enum Damage {
    Set(Index, u8),
    Insert(Index, Vec<u8>),
    Delete(Index, usize),
    Cut(Index),
}

pub(super) fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Damage::Set(i, b)),
        (
            any::<Index>(),
            prop_oneof![
                vec(any::<u8>(), 1..8),
                Just(b"\n\n".to_vec()),
                Just(b"\"".to_vec()),
                Just(b"null".to_vec()),
                Just(b"{}".to_vec()),
            ]
        )
            .prop_map(|(i, b)| Damage::Insert(i, b)),
        (any::<Index>(), 1..16usize).prop_map(|(i, n)| Damage::Delete(i, n)),
        any::<Index>().prop_map(Damage::Cut),
    ]
}

pub(super) fn damaged(mut bytes: Vec<u8>, damages: &[Damage]) -> Vec<u8> {
    for d in damages {
        let len = bytes.len();
        match d {
            Damage::Set(i, b) if len > 0 => bytes[i.index(len)] = *b,
            Damage::Insert(i, b) => {
                let at = i.index(len + 1);
                bytes.splice(at..at, b.iter().copied());
            }
            Damage::Delete(i, n) if len > 0 => {
                let at = i.index(len);
                bytes.drain(at..(at + n).min(len));
            }
            Damage::Cut(i) => bytes.truncate(i.index(len + 1)),
            Damage::Set(..) | Damage::Delete(..) => {}
        }
    }
    bytes
}

fn json() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let key = prop_oneof![
        Just("choices".to_owned()),
        Just("content".to_owned()),
        Just("candidates".to_owned()),
        Just("usage".to_owned()),
        Just("type".to_owned()),
        Just("message".to_owned()),
        Just("error".to_owned()),
        Just("parts".to_owned()),
        Just("text".to_owned()),
        Just("tool_calls".to_owned()),
        Just("output".to_owned()),
        Just("stopReason".to_owned()),
        Just("toolUse".to_owned()),
        "[a-z_]{1,10}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "[ -~]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 48, 5, move |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(key.clone(), inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// The error is an upstream class a caller can be told about.
fn classified(err: &ProviderError) -> Result<(), TestCaseError> {
    prop_assert_ne!(upstream_code(err.class, false), tonic::Code::Internal);
    prop_assert!(!err.message.is_empty());
    Ok(())
}

fn check_parse(body: &[u8]) -> Result<(), TestCaseError> {
    for (_, wire) in wires() {
        if let Err(err) = wire.parse(body) {
            classified(&err)?;
        }
    }
    Ok(())
}

fn check_stream(body: &[u8], cuts: &[usize]) -> Result<(), TestCaseError> {
    for (name, wire) in wires() {
        let whole = wire.decode(body, &[]);
        let pieces = wire.decode(body, cuts);
        prop_assert_eq!(&whole, &pieces, "{}", name);
        if let Err(class) = whole.1 {
            prop_assert_ne!(upstream_code(class, false), tonic::Code::Internal);
        }
    }
    Ok(())
}

/// The secrets `error_secret_echo.json` echoes, each with the context redaction knows it by
/// (an `sk-` key; a token after `Bearer `). A damaged body that loses the context is not
/// checked: redaction is by shape (the adapter also scrubs the key it sent, which these
/// pure functions never see).
const SECRETS: [(&str, &str); 2] = [
    ("sk-proj-ABCDEFGH12345678", "sk-proj-ABCDEFGH12345678"),
    ("Bearer ya29.SECRETTOKEN123456", "ya29.SECRETTOKEN123456"),
];

proptest! {
    #![proptest_config(super::config())]

    #[test]
    fn response_parsers_take_any_json(value in json()) {
        check_parse(&serde_json::to_vec(&value).unwrap_or_default())?;
    }

    #[test]
    fn response_parsers_take_any_bytes(bytes in vec(any::<u8>(), 0..128)) {
        check_parse(&bytes)?;
    }

    #[test]
    fn response_parsers_take_damaged_responses(
        which in any::<Index>(),
        damages in vec(damage(), 1..4),
    ) {
        for (name, _) in wires() {
            check_parse(&damaged(fixture(name, pick(which, "response_")), &damages))?;
        }
    }

    #[test]
    fn streams_decode_the_same_however_cut(
        which in any::<Index>(),
        damages in vec(damage(), 0..4),
        cuts in vec(any::<usize>(), 0..12),
    ) {
        for (name, _) in wires() {
            check_stream(&damaged(fixture(name, pick(which, "stream_")), &damages), &cuts)?;
        }
    }

    #[test]
    fn stream_decoders_take_any_bytes(
        bytes in vec(any::<u8>(), 0..128),
        cuts in vec(any::<usize>(), 0..6),
    ) {
        check_stream(&bytes, &cuts)?;
    }

    #[test]
    fn error_bodies_are_classified_by_status_first(
        status in prop_oneof![400..=599u16, Just(429u16), Just(529u16), Just(503u16)],
        which in any::<Index>(),
        damages in vec(damage(), 0..3),
        retry_after in proptest::option::of(prop_oneof!["[0-9]{1,4}", "[ -~]{0,8}"]),
    ) {
        let mut headers = http::HeaderMap::new();
        if let Some(value) = retry_after.and_then(|v| http::HeaderValue::from_str(&v).ok()) {
            headers.insert("retry-after", value);
        }
        for (name, wire) in wires() {
            let body = damaged(fixture(name, pick(which, "error_")), &damages);
            let err = wire.classify(status, &headers, &body);
            classified(&err)?;
            prop_assert_eq!(err.http_status, Some(status));
            let transient = matches!(status, 408 | 429 | 500..=599);
            if transient {
                prop_assert_eq!(err.class, ErrorClass::from_http_status(status), "{}", name);
            }
            if !err.class.is_retryable() {
                prop_assert_eq!(err.retry_after, None);
            }
            for (context, secret) in SECRETS {
                if body.windows(context.len()).any(|w| w == context.as_bytes()) {
                    prop_assert!(!err.message.contains(secret), "{}: {}", name, err.message);
                }
            }
        }
    }
}
