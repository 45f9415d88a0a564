//! The AWS event-stream framing (`application/vnd.amazon.eventstream`), used by Bedrock's
//! ConverseStream.
//!
//! Each message is a binary frame: a 12-byte prelude (total length, headers length, prelude
//! CRC32), typed headers (`:message-type`, `:event-type`, `:exception-type`, ...), a payload
//! and a message CRC32. [`FrameDecoder`] cuts frames out of the received bytes and checks
//! both checksums (`aws-smithy-eventstream`); [`EventStream`] is the kit's
//! [`StreamDecoder`] for this framing around a provider-specific [`MessageDecoder`], with the
//! same integrity rule as SSE streams: a body that ends inside a frame or before the
//! provider's terminal message is an error, never a clean end.

use std::collections::VecDeque;

use aws_smithy_types::event_stream::{HeaderValue, Message};
use bytes::{Bytes, BytesMut};

use super::{ProviderError, StreamDecoder};
use crate::types::StreamEvent;

/// The largest frame accepted (the format's own limit is 16 MiB).
const MAX_FRAME: usize = 16 * 1024 * 1024;

/// The smallest frame: prelude (12 bytes) plus message CRC (4 bytes).
const MIN_FRAME: usize = 16;

/// Cuts event-stream frames out of received bytes.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: BytesMut,
}

impl FrameDecoder {
    /// A new decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Whether bytes of an incomplete frame are buffered.
    pub fn has_partial(&self) -> bool {
        !self.buf.is_empty()
    }

    /// The next complete message, if the buffer holds one; an error for a frame whose
    /// length is impossible or whose checksums do not match.
    pub fn next_message(&mut self) -> Option<Result<Message, ProviderError>> {
        let prefix: [u8; 4] = self.buf.get(..4)?.try_into().ok()?;
        let total = usize::try_from(u32::from_be_bytes(prefix)).unwrap_or(usize::MAX);
        if !(MIN_FRAME..=MAX_FRAME).contains(&total) {
            return Some(Err(ProviderError::malformed_event(
                "an event-stream frame has an impossible length",
            )));
        }
        if self.buf.len() < total {
            return None;
        }
        let frame = self.buf.split_to(total).freeze();
        Some(
            aws_smithy_eventstream::frame::read_message_from(frame).map_err(|_| {
                ProviderError::malformed_event(
                    "an event-stream frame is corrupt (checksum or header mismatch)",
                )
            }),
        )
    }
}

/// The string value of header `name`, if present and a string.
pub fn header_str<'a>(message: &'a Message, name: &str) -> Option<&'a str> {
    message
        .headers()
        .iter()
        .find(|h| h.name().as_str() == name)
        .and_then(|h| match h.value() {
            HeaderValue::String(s) => Some(s.as_str()),
            _ => None,
        })
}

/// Encodes one message with string headers (the mock upstream and tests use it).
pub fn encode_message(headers: &[(&str, &str)], payload: impl Into<Bytes>) -> Vec<u8> {
    let mut message = Message::new(payload);
    for (name, value) in headers {
        message = message.add_header(aws_smithy_types::event_stream::Header::new(
            (*name).to_owned(),
            HeaderValue::String((*value).to_owned().into()),
        ));
    }
    let mut out = Vec::new();
    // Writing fails only for header names or values over the format's limits, which the
    // callers' fixed headers never reach; an empty frame then surfaces as a decode error.
    let _ = aws_smithy_eventstream::frame::write_message_to(&message, &mut out);
    out
}

/// Turns a provider's event-stream messages into stream events.
pub trait MessageDecoder: Send + Unpin + 'static {
    /// Decodes one message, pushing zero or more stream events. Returns `true` once the
    /// provider's terminal message has arrived (a `Finish` must have been pushed by then).
    fn decode(
        &mut self,
        message: &Message,
        out: &mut VecDeque<StreamEvent>,
    ) -> Result<bool, ProviderError>;

    /// Called when the body ends before a terminal message: push the `Finish` when the
    /// format allows ending there, else return the truncation error.
    fn end_of_body(&mut self, out: &mut VecDeque<StreamEvent>) -> Result<(), ProviderError>;
}

/// The event-stream framing around `messages`: the [`StreamDecoder`] of an event-stream API.
#[derive(Debug, Default)]
pub struct EventStream<D> {
    frames: FrameDecoder,
    messages: D,
}

impl<D: MessageDecoder> EventStream<D> {
    /// Event-stream framing around `messages`.
    pub fn new(messages: D) -> Self {
        Self {
            frames: FrameDecoder::new(),
            messages,
        }
    }
}

impl<D: MessageDecoder> StreamDecoder for EventStream<D> {
    fn feed(
        &mut self,
        bytes: &[u8],
        out: &mut VecDeque<StreamEvent>,
    ) -> Result<bool, ProviderError> {
        self.frames.push(bytes);
        while let Some(message) = self.frames.next_message() {
            if self.messages.decode(&message?, out)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn end_of_body(&mut self, out: &mut VecDeque<StreamEvent>) -> Result<(), ProviderError> {
        if self.frames.has_partial() {
            return Err(ProviderError::truncated());
        }
        self.messages.end_of_body(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_reassemble() {
        let mut bytes = encode_message(&[(":event-type", "a"), (":message-type", "event")], "{}");
        bytes.extend(encode_message(&[(":event-type", "b")], "{\"x\":1}"));
        let mut frames = FrameDecoder::new();
        let mut got = Vec::new();
        for piece in bytes.chunks(5) {
            frames.push(piece);
            while let Some(m) = frames.next_message() {
                got.push(m.unwrap());
            }
        }
        assert_eq!(got.len(), 2);
        assert_eq!(header_str(&got[0], ":event-type"), Some("a"));
        assert_eq!(header_str(&got[0], ":message-type"), Some("event"));
        assert_eq!(header_str(&got[1], ":event-type"), Some("b"));
        assert_eq!(got[1].payload().as_ref(), b"{\"x\":1}");
        assert!(!frames.has_partial());
    }

    #[test]
    fn corrupt_frames_are_errors() {
        let good = encode_message(&[(":event-type", "a")], "payload");
        // A flipped payload byte fails the message CRC.
        let mut bad = good.clone();
        let at = bad.len() - 6;
        bad[at] ^= 0x01;
        let mut frames = FrameDecoder::new();
        frames.push(&bad);
        let err = frames.next_message().unwrap().unwrap_err();
        assert_eq!(err.class, crate::providers::ErrorClass::StreamBroken);
        // A flipped header-length byte fails the prelude CRC.
        let mut bad = good.clone();
        bad[7] ^= 0x01;
        let mut frames = FrameDecoder::new();
        frames.push(&bad);
        assert!(frames.next_message().unwrap().is_err());
        // An impossible length is refused before buffering it.
        let mut frames = FrameDecoder::new();
        frames.push(&[0xff, 0xff, 0xff, 0xff]);
        assert!(frames.next_message().unwrap().is_err());
        let mut frames = FrameDecoder::new();
        frames.push(&[0, 0, 0, 3]);
        assert!(frames.next_message().unwrap().is_err());
    }
}
