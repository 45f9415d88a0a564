//! The wire-format half of the provider kit: what makes one provider API different from
//! another, as pure functions over bytes. [`super::http::HttpProvider`] is the other half, the
//! one transport every HTTP provider shares.
//!
//! A wire format says where a call goes ([`WireFormat::endpoint`]), what it sends
//! ([`WireFormat::build_request`], [`WireFormat::add_headers`]), how to read a reply
//! ([`WireFormat::parse_response`]) and a stream ([`WireFormat::stream_decoder`]), and what an
//! error payload says ([`WireFormat::error_body`]); the shared policy in [`super::error`] turns
//! that into a [`ProviderError`] ([`WireFormat::classify`]). Stream framing is pluggable: a
//! [`StreamDecoder`] turns body bytes into events, [`super::sse::Sse`] is the server-sent-events
//! framing, and a binary framing (e.g. AWS event streams) is another `StreamDecoder`.

use std::{
    collections::VecDeque,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use futures_util::Stream;

use super::{
    ErrorClass, ProviderError,
    error::{UpstreamError, classify_http},
};
use crate::types::{ChatRequest, ChatResponse, ContentPart, Message, Role, StreamEvent};

/// One provider API's wire format.
pub trait WireFormat: Send + Sync + 'static {
    /// The stream decoder (framing plus event decoding).
    type Decoder: StreamDecoder;

    /// The URL of a call to `model` (streaming or not). Refuses model names that would
    /// change the URL's meaning with [`ErrorClass::InvalidRequest`].
    fn endpoint(&self, model: &str, stream: bool) -> Result<reqwest::Url, ProviderError>;

    /// Fixed headers every request carries besides `content-type` and credentials (e.g.
    /// `anthropic-version`).
    fn add_headers(&self, _headers: &mut http::HeaderMap) {}

    /// The request body.
    fn build_request(
        &self,
        model: &str,
        request: &ChatRequest,
        stream: bool,
    ) -> Result<Vec<u8>, ProviderError>;

    /// Parses a 2xx non-streaming body; `model` is the one requested (for replies that do
    /// not name theirs).
    fn parse_response(&self, body: &[u8], model: &str) -> Result<ChatResponse, ProviderError>;

    /// A decoder for one streaming body.
    fn stream_decoder(&self, model: &str) -> Self::Decoder;

    /// What an error answer's payload says (code, message, retry hint). Pure parsing: the
    /// class arbitration and what callers may see belong to the shared policy.
    fn error_body(&self, status: u16, headers: &http::HeaderMap, body: &[u8]) -> UpstreamError;

    /// The API's embeddings operation, when it has one (errors are classified by
    /// [`WireFormat::classify`] like chat's). The default: none.
    fn embeddings(&self) -> Option<&dyn super::embed::EmbedWire> {
        None
    }

    /// Classifies an HTTP error answer with the one shared policy
    /// ([`super::error::classify_http`]).
    fn classify(&self, status: u16, headers: &http::HeaderMap, body: &[u8]) -> ProviderError {
        classify_http(status, headers, self.error_body(status, headers, body))
    }
}

/// Turns a streaming body into events: a framing (SSE, AWS event stream, ...) plus the
/// provider's event decoding.
pub trait StreamDecoder: Send + Unpin + 'static {
    /// Decodes the next bytes of the body (any split: events may span reads), pushing zero or
    /// more events. Returns `true` once the provider's terminal event has arrived (a `Finish`
    /// has been pushed; the rest of the body is ignored).
    fn feed(
        &mut self,
        bytes: &[u8],
        out: &mut VecDeque<StreamEvent>,
    ) -> Result<bool, ProviderError>;

    /// Called when the body ends before a terminal event. Formats that end with the body
    /// (after a finish marker) push their `Finish` here; otherwise the stream was truncated
    /// and this returns an error.
    fn end_of_body(&mut self, out: &mut VecDeque<StreamEvent>) -> Result<(), ProviderError>;
}

/// A streaming HTTP body.
pub type Body = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// A provider stream: drives a [`StreamDecoder`] over a body and enforces stream integrity (a
/// body that ends before the terminal event is an error, never a clean end; events decoded
/// before an error are delivered before it).
pub struct DecodedStream<D> {
    body: Option<Body>,
    decoder: D,
    queue: VecDeque<StreamEvent>,
    error: Option<ProviderError>,
}

impl<D: StreamDecoder> DecodedStream<D> {
    /// Wraps a successful (2xx) streaming response.
    pub fn new(response: reqwest::Response, decoder: D) -> Self {
        Self::from_body(Box::pin(response.bytes_stream()), decoder)
    }

    /// Wraps any byte stream (tests feed scripted pieces).
    pub fn from_body(body: Body, decoder: D) -> Self {
        Self {
            body: Some(body),
            decoder,
            queue: VecDeque::new(),
            error: None,
        }
    }

    fn fail(&mut self, err: ProviderError) {
        self.body = None;
        self.error = Some(err);
    }
}

impl<D: StreamDecoder> Stream for DecodedStream<D> {
    type Item = Result<StreamEvent, ProviderError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(event) = this.queue.pop_front() {
                return Poll::Ready(Some(Ok(event)));
            }
            if let Some(err) = this.error.take() {
                return Poll::Ready(Some(Err(err)));
            }
            let Some(body) = this.body.as_mut() else {
                return Poll::Ready(None);
            };
            match body.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(bytes))) => match this.decoder.feed(&bytes, &mut this.queue) {
                    Ok(true) => this.body = None,
                    Ok(false) => {}
                    Err(e) => this.fail(e),
                },
                Poll::Ready(Some(Err(e))) => {
                    let mut err = ProviderError::from_transport(&e);
                    if err.class != ErrorClass::Timeout {
                        err = ProviderError::new(
                            ErrorClass::StreamBroken,
                            "the provider's stream broke off",
                        );
                    }
                    this.fail(err);
                }
                Poll::Ready(None) => {
                    this.body = None;
                    if let Err(e) = this.decoder.end_of_body(&mut this.queue) {
                        this.fail(e);
                    }
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Runs `decoder` over `body` delivered in `piece`-byte reads, collecting every item: the
/// stream harness of the provider and conformance tests.
#[cfg(test)]
pub(crate) async fn decode_in_pieces<D: StreamDecoder>(
    body: &[u8],
    piece: usize,
    decoder: D,
) -> Vec<Result<StreamEvent, ProviderError>> {
    use futures_util::StreamExt as _;
    let pieces: Vec<reqwest::Result<Bytes>> = body
        .chunks(piece.max(1))
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    DecodedStream::from_body(Box::pin(futures_util::stream::iter(pieces)), decoder)
        .collect()
        .await
}

/// The model a reply names, or the one requested when it names none.
pub fn reply_model(named: Option<String>, requested: &str) -> String {
    named
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| requested.to_owned())
}

/// Decodes a JSON body, mapping failures to [`ErrorClass::InvalidResponse`].
pub fn decode_json<'a, T: serde::Deserialize<'a>>(body: &'a [u8]) -> Result<T, ProviderError> {
    serde_json::from_slice(body).map_err(|e| {
        ProviderError::new(
            ErrorClass::InvalidResponse,
            format!(
                "the provider's response is not valid: {}",
                json_error_kind(&e)
            ),
        )
    })
}

/// Decodes one JSON stream event, mapping failures to a malformed event.
pub fn decode_event<'a, T: serde::Deserialize<'a>>(data: &'a [u8]) -> Result<T, ProviderError> {
    serde_json::from_slice(data).map_err(|e| ProviderError::malformed_event(&json_error_kind(&e)))
}

/// A description of a JSON error that never quotes the input.
pub fn json_error_kind(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Io => {
            format!("malformed json at line {} column {}", e.line(), e.column())
        }
        Category::Eof => "json ended early".to_owned(),
        // Data errors can quote values from the body; say only where.
        Category::Data => format!(
            "unexpected value at line {} column {}",
            e.line(),
            e.column()
        ),
    }
}

/// Parses `url`, an endpoint built from configured parts, as [`ErrorClass::InvalidRequest`]
/// when it is not a URL (the model name made it invalid).
pub fn parse_url(url: &str) -> Result<reqwest::Url, ProviderError> {
    reqwest::Url::parse(url).map_err(|_| {
        ProviderError::new(
            ErrorClass::InvalidRequest,
            "the model name does not make a valid provider url",
        )
    })
}

/// Whether `name` can be one URL path segment as it is (no `/`, `?`, `#`, `%`, `\`, `&`,
/// whitespace or control characters, not empty): model and deployment names in URLs.
pub fn is_path_segment(name: &str) -> bool {
    !name.is_empty()
        && !name.chars().any(|c| {
            matches!(c, '/' | '?' | '#' | '%' | '\\' | '&') || c.is_whitespace() || c.is_control()
        })
}

/// One turn of an API that keeps the system prompt apart from the conversation (Anthropic,
/// Gemini): a role and its parts.
pub trait Turn {
    /// A part of the turn.
    type Part;

    /// The API's role name.
    fn role(&self) -> &str;

    /// The parts.
    fn parts(&mut self) -> &mut Vec<Self::Part>;
}

/// Splits `messages` the way APIs with a separate system prompt want them: the non-empty
/// texts of system and developer messages, in order (anything else there is refused, naming
/// `api`), and the other messages as turns made by `convert`, empty turns dropped and
/// consecutive turns of one role merged (such APIs want alternating turns, and every tool
/// result answering one turn in the single turn after it).
pub fn split_system<'a, T: Turn>(
    messages: &'a [Message],
    api: &str,
    convert: impl Fn(&'a Message) -> Result<T, ProviderError>,
) -> Result<(Vec<&'a str>, Vec<T>), ProviderError> {
    let mut system = Vec::new();
    let mut turns: Vec<T> = Vec::with_capacity(messages.len());
    for message in messages {
        match message.role {
            Role::System | Role::Developer => {
                for part in &message.content {
                    match part {
                        ContentPart::Text(text) if !text.is_empty() => system.push(text.as_str()),
                        ContentPart::Text(_) => {}
                        _ => {
                            return Err(ProviderError::new(
                                ErrorClass::InvalidRequest,
                                format!("{api} accepts only text in system and developer messages"),
                            ));
                        }
                    }
                }
            }
            Role::User | Role::Tool | Role::Assistant => {
                let mut turn = convert(message)?;
                if turn.parts().is_empty() {
                    continue;
                }
                match turns.last_mut() {
                    Some(last) if last.role() == turn.role() => {
                        let parts = std::mem::take(turn.parts());
                        last.parts().extend(parts);
                    }
                    _ => turns.push(turn),
                }
            }
        }
    }
    Ok((system, turns))
}
