//! The conformance suite: one table of cases run against every wire format, so that every
//! provider meets the same contract (the same status gives the same class, a broken stream
//! is never a clean end, tool-call fragments reassemble, usage normalizes the same way, no
//! secret reaches a caller).
//!
//! Adding a wire format is one line in [`WIRES`] plus its fixtures in
//! `tests/fixtures/<name>/conformance/`, one per [`FIXTURES`] entry, each its API's real
//! envelope around the same content:
//! - `response_text.json`: the reply `Hello there.`, finish stop, usage 10 in / 5 out, no cache
//! - `response_cached.json`: `Hi.`, usage 100 in (60 of them cache reads) / 5 out
//! - `response_tool_call.json`: one call `get_weather` with `{"city":"Paris"}`
//! - `stream_text.txt`, `stream_cached.txt`, `stream_tool_call.txt`: the same as streams (the
//!   text in several deltas, the arguments in fragments where the API fragments them)
//! - `stream_error_overloaded.txt`: the delta `Hel`, then the API's in-stream overload error
//! - `error_server.json`, `error_context_length.json`, `error_auth.json`,
//!   `error_rate_limited.json`, `error_not_found.json`: the API's error bodies
//! - `error_secret_echo.json`: an invalid-request body whose message echoes an API key
//!   (`sk-proj-ABCDEFGH12345678`) and a bearer token (`ya29.SECRETTOKEN123456`)

use std::{future::Future, pin::Pin, time::Duration};

use super::{
    ErrorClass, ProviderError, WireFormat, anthropic, bedrock, gemini,
    openai::{self, OpenAiConfig},
    vertex,
    wire::decode_in_pieces,
};
use crate::types::{ChatResponse, ContentPart, FinishReason, StreamEvent, ToolCall, Usage};

type Events = Vec<Result<StreamEvent, ProviderError>>;

/// A wire format, type-erased for the table.
trait Wire {
    fn parse(&self, body: &[u8]) -> Result<ChatResponse, ProviderError>;
    fn classify(&self, status: u16, headers: &http::HeaderMap, body: &[u8]) -> ProviderError;
    fn decode<'a>(
        &'a self,
        body: &'a [u8],
        piece: usize,
    ) -> Pin<Box<dyn Future<Output = Events> + 'a>>;
}

impl<W: WireFormat> Wire for W {
    fn parse(&self, body: &[u8]) -> Result<ChatResponse, ProviderError> {
        self.parse_response(body, "m")
    }

    fn classify(&self, status: u16, headers: &http::HeaderMap, body: &[u8]) -> ProviderError {
        WireFormat::classify(self, status, headers, body)
    }

    fn decode<'a>(
        &'a self,
        body: &'a [u8],
        piece: usize,
    ) -> Pin<Box<dyn Future<Output = Events> + 'a>> {
        Box::pin(decode_in_pieces(body, piece, self.stream_decoder("m")))
    }
}

/// Makes a wire format with its defaults.
type MakeWire = fn() -> Box<dyn Wire>;

/// Every wire format: its fixture directory and how to make it.
const WIRES: &[(&str, MakeWire)] = &[
    ("openai", || {
        Box::new(openai::ChatCompletions::new(OpenAiConfig::new(
            openai::DEFAULT_BASE_URL,
        )))
    }),
    ("anthropic", || {
        Box::new(anthropic::Messages::new(anthropic::AnthropicConfig::new(
            anthropic::DEFAULT_BASE_URL,
        )))
    }),
    ("gemini", || {
        Box::new(gemini::GenerateContent::new(gemini::DEFAULT_BASE_URL))
    }),
    ("bedrock", || {
        Box::new(bedrock::Converse::new(bedrock::default_endpoint(
            "us-east-1",
        )))
    }),
    // Vertex speaks Gemini's payloads for Gemini models (the table's model `m` is one).
    ("gemini", || {
        Box::new(vertex::VertexWire::new(
            "https://us-central1-aiplatform.googleapis.com",
            Some("p".into()),
            "us-central1",
        ))
    }),
];

/// The fixture files every wire format provides.
pub(crate) const FIXTURES: &[&str] = &[
    "response_text.json",
    "response_cached.json",
    "response_tool_call.json",
    "stream_text.txt",
    "stream_cached.txt",
    "stream_tool_call.txt",
    "stream_error_overloaded.txt",
    "error_server.json",
    "error_context_length.json",
    "error_auth.json",
    "error_rate_limited.json",
    "error_not_found.json",
    "error_secret_echo.json",
];

pub(crate) fn fixture(wire: &str, file: &str) -> Vec<u8> {
    let path = format!(
        "{}/tests/fixtures/{wire}/conformance/{file}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("wire format {wire} lacks fixture {path}: {e}"))
}

/// Runs `check` for every wire format with its fixture loader, naming the wire on failure.
fn each_wire(mut check: impl FnMut(&str, &dyn Wire, &dyn Fn(&str) -> Vec<u8>)) {
    for (name, make) in WIRES {
        let wire = make();
        check(name, &*wire, &|file| fixture(name, file));
    }
}

const SECRETS: [&str; 2] = ["sk-proj-ABCDEFGH12345678", "ya29.SECRETTOKEN123456"];

fn usage(input: u64, output: u64, cached: Option<u64>) -> (u64, u64, Option<u64>) {
    (input, output, cached)
}

fn usage_of(u: &Usage) -> (u64, u64, Option<u64>) {
    (
        u.input_tokens,
        u.output_tokens,
        u.cached_input_tokens.filter(|c| *c > 0),
    )
}

#[test]
fn every_wire_has_every_fixture() {
    each_wire(|_, _, load| {
        for file in FIXTURES {
            assert!(!load(file).is_empty(), "{file}");
        }
    });
}

#[test]
fn responses() {
    each_wire(|name, wire, load| {
        let r = wire.parse(&load("response_text.json")).unwrap();
        assert_eq!(
            r.content,
            vec![ContentPart::Text("Hello there.".into())],
            "{name}"
        );
        assert_eq!(r.finish_reason, FinishReason::Stop, "{name}");
        assert_eq!(usage_of(&r.usage.unwrap()), usage(10, 5, None), "{name}");
        assert!(!r.model.is_empty(), "{name}");

        let r = wire.parse(&load("response_cached.json")).unwrap();
        assert_eq!(
            usage_of(&r.usage.unwrap()),
            usage(100, 5, Some(60)),
            "{name}"
        );

        let r = wire.parse(&load("response_tool_call.json")).unwrap();
        assert_eq!(r.finish_reason, FinishReason::ToolCalls, "{name}");
        match r.content.as_slice() {
            [
                ContentPart::ToolCall(ToolCall {
                    id,
                    name: tool,
                    arguments,
                }),
            ] => {
                assert!(!id.is_empty(), "{name}");
                assert_eq!(tool, "get_weather", "{name}");
                let args: serde_json::Value = serde_json::from_str(arguments).unwrap();
                assert_eq!(args, serde_json::json!({"city": "Paris"}), "{name}");
            }
            other => panic!("{name}: {other:?}"),
        }
    });
}

#[test]
fn malformed_responses_are_invalid_responses() {
    each_wire(|name, wire, _| {
        for body in [
            &b""[..],
            b"{",
            b"{\"content\": [{\"text\": \"no type\"}]}",
            b"not json",
            b"[]",
            b"{\"choices\": 3, \"candidates\": 3, \"content\": 3}",
        ] {
            let err = wire.parse(body).unwrap_err();
            assert_eq!(err.class, ErrorClass::InvalidResponse, "{name} {body:?}");
        }
    });
}

/// What a stream said, summarized.
#[derive(Debug, Default)]
struct Summary {
    text: String,
    tool: Option<(String, String)>,
    usage: Option<(u64, u64, Option<u64>)>,
    finish: Option<FinishReason>,
    error: Option<ProviderError>,
}

/// Summarizes `events`, checking the stream contract: nothing after a `Finish` or an error,
/// and a stream ends with exactly one of them.
fn summarize(name: &str, events: Events) -> Summary {
    let mut s = Summary::default();
    let n = events.len();
    for (i, e) in events.into_iter().enumerate() {
        assert!(
            s.finish.is_none() && s.error.is_none(),
            "{name}: item after the end"
        );
        match e {
            Ok(StreamEvent::Text(t)) => s.text.push_str(&t),
            Ok(StreamEvent::ToolCall(d)) => {
                assert_eq!(d.index, 0, "{name}");
                let tool = s.tool.get_or_insert_with(Default::default);
                if let Some(n) = d.name {
                    tool.0 = n;
                }
                tool.1.push_str(&d.arguments);
            }
            Ok(StreamEvent::Usage(u)) => s.usage = Some(usage_of(&u)),
            Ok(StreamEvent::Finish(f)) => s.finish = Some(f),
            Ok(_) => {}
            Err(err) => {
                assert_eq!(i + 1, n, "{name}: an error is the last item");
                s.error = Some(err);
            }
        }
    }
    assert!(
        s.finish.is_some() != s.error.is_some(),
        "{name}: a stream ends with exactly one Finish or one error: {s:?}"
    );
    s
}

/// Piece sizes: byte by byte, small network reads, and the whole body at once.
const PIECES: [usize; 3] = [1, 7, usize::MAX];

#[tokio::test]
async fn streams_in_any_split() {
    for (name, make) in WIRES {
        let wire = make();
        for piece in PIECES {
            let body = fixture(name, "stream_text.txt");
            let s = summarize(name, wire.decode(&body, piece).await);
            assert_eq!(s.text, "Hello there.", "{name} piece {piece}");
            assert_eq!(s.finish, Some(FinishReason::Stop), "{name}");
            assert_eq!(s.usage, Some(usage(10, 5, None)), "{name}");

            let body = fixture(name, "stream_cached.txt");
            let s = summarize(name, wire.decode(&body, piece).await);
            assert_eq!(s.usage, Some(usage(100, 5, Some(60))), "{name}");

            let body = fixture(name, "stream_tool_call.txt");
            let s = summarize(name, wire.decode(&body, piece).await);
            assert_eq!(s.finish, Some(FinishReason::ToolCalls), "{name}");
            let (tool, args) = s.tool.unwrap();
            assert_eq!(tool, "get_weather", "{name}");
            let args: serde_json::Value = serde_json::from_str(&args).unwrap();
            assert_eq!(args, serde_json::json!({"city": "Paris"}), "{name}");
        }
    }
}

#[tokio::test]
async fn a_truncated_stream_is_never_a_clean_end() {
    for (name, make) in WIRES {
        let wire = make();
        let body = fixture(name, "stream_text.txt");
        for cut in 0..body.len() {
            let s = summarize(name, wire.decode(&body[..cut], 7).await);
            assert!(
                "Hello there.".starts_with(&s.text),
                "{name} cut {cut}: {}",
                s.text
            );
            if let Some(err) = &s.error {
                assert_eq!(err.class, ErrorClass::StreamBroken, "{name} cut {cut}");
                assert!(err.is_retryable());
            }
        }
    }
}

#[tokio::test]
async fn a_garbled_stream_is_an_error_not_a_panic() {
    for (name, make) in WIRES {
        let wire = make();
        let body = fixture(name, "stream_tool_call.txt");
        for at in (0..body.len()).step_by(5) {
            for garbage in [&b"\xff\xfe"[..], b"{", b"\n\ndata: {\"x\n\n", b"\0"] {
                let mut garbled = body[..at].to_vec();
                garbled.extend_from_slice(garbage);
                garbled.extend_from_slice(&body[at..]);
                // The contract (one end, nothing after it) is checked by summarize.
                let s = summarize(name, wire.decode(&garbled, 7).await);
                if let Some(err) = s.error {
                    assert!(err.is_retryable(), "{name} at {at}: {err}");
                }
            }
        }
    }
}

#[tokio::test]
async fn in_stream_errors_follow_one_policy() {
    for (name, make) in WIRES {
        let wire = make();
        let body = fixture(name, "stream_error_overloaded.txt");
        let s = summarize(name, wire.decode(&body, 7).await);
        assert_eq!(
            s.text, "Hel",
            "{name}: events before the error are delivered"
        );
        let err = s.error.unwrap();
        assert!(err.is_retryable(), "{name}: {err}");
        assert!(
            matches!(err.class, ErrorClass::Overloaded | ErrorClass::StreamBroken),
            "{name}: {err}"
        );
    }
}

/// Every status a provider may answer with, and its class from every provider.
const STATUS_CLASSES: &[(u16, ErrorClass)] = &[
    (400, ErrorClass::InvalidRequest),
    (401, ErrorClass::Authentication),
    (402, ErrorClass::InvalidRequest),
    (403, ErrorClass::Permission),
    (404, ErrorClass::ModelNotFound),
    (408, ErrorClass::Timeout),
    (409, ErrorClass::InvalidRequest),
    (413, ErrorClass::InvalidRequest),
    (422, ErrorClass::InvalidRequest),
    (429, ErrorClass::RateLimited),
    (500, ErrorClass::ServerError),
    (502, ErrorClass::ServerError),
    (503, ErrorClass::Overloaded),
    (504, ErrorClass::Timeout),
    (529, ErrorClass::Overloaded),
];

#[test]
fn the_same_status_is_the_same_class_from_every_provider() {
    let none = http::HeaderMap::new();
    each_wire(|name, wire, load| {
        let server = load("error_server.json");
        for &(status, class) in STATUS_CLASSES {
            for body in [&b""[..], b"<html>bad gateway</html>", &server] {
                let err = wire.classify(status, &none, body);
                if class.is_retryable() || body.first() != Some(&b'{') {
                    assert_eq!(err.class, class, "{name} {status}");
                }
                // The body never turns a status transient or permanent.
                assert_eq!(err.is_retryable(), class.is_retryable(), "{name} {status}");
                assert_eq!(err.http_status, Some(status));
                if !err.class.shows_upstream_message() {
                    assert_eq!(err.message, format!("the provider answered http {status}"));
                }
            }
        }
    });
}

#[test]
fn bodies_refine_the_request_s_own_faults() {
    let none = http::HeaderMap::new();
    each_wire(|name, wire, load| {
        for (file, status, class) in [
            (
                "error_context_length.json",
                400,
                ErrorClass::ContextLengthExceeded,
            ),
            ("error_auth.json", 401, ErrorClass::Authentication),
            ("error_rate_limited.json", 429, ErrorClass::RateLimited),
            ("error_not_found.json", 404, ErrorClass::ModelNotFound),
            ("error_server.json", 500, ErrorClass::ServerError),
            ("error_server.json", 503, ErrorClass::Overloaded),
            ("error_secret_echo.json", 400, ErrorClass::InvalidRequest),
        ] {
            let err = wire.classify(status, &none, &load(file));
            assert_eq!(err.class, class, "{name} {file} {status}");
        }
        // A caller's fault shows the provider's message; transient failures and credential
        // problems do not.
        let err = wire.classify(400, &none, &load("error_context_length.json"));
        assert!(
            err.message
                .starts_with("the provider rejected the request: "),
            "{name}"
        );
        assert!(err.message.len() > 40, "{name}: {}", err.message);
        let err = wire.classify(401, &none, &load("error_auth.json"));
        assert_eq!(err.message, "the provider answered http 401", "{name}");
    });
}

#[test]
fn secrets_echoed_by_a_provider_never_reach_the_caller() {
    let none = http::HeaderMap::new();
    each_wire(|name, wire, load| {
        let err = wire.classify(400, &none, &load("error_secret_echo.json"));
        assert!(
            err.message.contains("temperature"),
            "{name}: {}",
            err.message
        );
        for secret in SECRETS {
            assert!(!err.message.contains(secret), "{name}: {}", err.message);
            assert!(!err.to_string().contains(secret), "{name}");
        }
        assert!(
            err.message.contains("[REDACTED]"),
            "{name}: {}",
            err.message
        );
    });
}

#[test]
fn retry_after_comes_from_the_header_for_retryable_classes() {
    let mut headers = http::HeaderMap::new();
    headers.insert("retry-after", http::HeaderValue::from_static("3"));
    let mut ms = http::HeaderMap::new();
    ms.insert("retry-after-ms", http::HeaderValue::from_static("1500"));
    each_wire(|name, wire, load| {
        let body = load("error_rate_limited.json");
        assert_eq!(
            wire.classify(429, &headers, &body).retry_after,
            Some(Duration::from_secs(3)),
            "{name}"
        );
        assert_eq!(
            wire.classify(429, &ms, &body).retry_after,
            Some(Duration::from_millis(1500)),
            "{name}"
        );
        assert_eq!(
            wire.classify(503, &headers, b"").retry_after,
            Some(Duration::from_secs(3)),
            "{name}"
        );
        assert_eq!(
            wire.classify(400, &headers, b"").retry_after,
            None,
            "{name}"
        );
    });
}

#[test]
fn the_readme_status_table_is_true() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let table = readme
        .split("| upstream status | class |")
        .nth(1)
        .expect("README has the provider error table");
    let mut seen = Vec::new();
    for row in table.lines().skip(2).take_while(|l| l.starts_with('|')) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let (statuses, class, retried) = (cells[1], cells[2], cells[3]);
        let reason = class.split('`').nth(1).unwrap();
        for status in statuses.split(", ").filter_map(|s| s.parse::<u16>().ok()) {
            let got = ErrorClass::from_http_status(status);
            assert_eq!(got.reason(), reason, "README row for {status}");
            assert_eq!(got.is_retryable(), retried.starts_with("yes"), "{status}");
            seen.push(status);
        }
        if !statuses.chars().next().is_some_and(|c| c.is_ascii_digit()) {
            let class = ErrorClass::ALL
                .iter()
                .find(|c| c.reason() == reason)
                .unwrap();
            assert_eq!(class.is_retryable(), retried.starts_with("yes"), "{reason}");
        }
    }
    // Every status of the conformance table has its README row.
    for (status, _) in STATUS_CLASSES {
        assert!(seen.contains(status), "README lacks status {status}");
    }
}
