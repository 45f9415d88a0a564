//! Server-sent events, shared by every streaming adapter.
//!
//! [`SseDecoder`] turns bytes into events following the WHATWG event-stream rules (`\n`,
//! `\r\n` or `\r` line ends, `:` comments, multi-line `data`, events dispatched on a blank
//! line). [`Sse`] is the SSE framing of a [`StreamDecoder`]: it feeds the events to a
//! provider-specific [`EventDecoder`]; [`super::wire::DecodedStream`] drives it over a body and
//! enforces stream integrity.

use std::collections::VecDeque;

use super::{ProviderError, StreamEvent, wire::StreamDecoder};

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The `event:` field; empty when absent (the default type `message`).
    pub event: String,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// Incremental SSE parser. It reuses its buffers: the event it hands out is borrowed, and
/// its strings keep their capacity for the next one.
#[derive(Debug, Default)]
pub struct SseDecoder {
    buf: Vec<u8>,
    pos: usize,
    current: SseEvent,
    has_data: bool,
    /// `current` was handed out: cleared when the next event starts.
    dispatched: bool,
    skip_lf: bool,
}

/// Upper bound of one buffered, undispatched event (protects memory from a peer that never
/// sends a line end).
const MAX_PENDING_BYTES: usize = 8 * 1024 * 1024;

impl SseDecoder {
    /// A new decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 4096 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete event, if the buffer holds one (borrowed until the next call).
    pub fn next_event(&mut self) -> Option<Result<&SseEvent, ProviderError>> {
        if self.dispatched {
            self.dispatched = false;
            self.current.event.clear();
            self.current.data.clear();
        }
        loop {
            if self.skip_lf && self.pos < self.buf.len() {
                if self.buf[self.pos] == b'\n' {
                    self.pos += 1;
                }
                self.skip_lf = false;
            }
            let rest = &self.buf[self.pos..];
            let Some(end) = memchr::memchr2(b'\n', b'\r', rest) else {
                if rest.len() + self.current.data.len() > MAX_PENDING_BYTES {
                    return Some(Err(ProviderError::malformed_event(
                        "an event exceeded the size limit",
                    )));
                }
                return None;
            };
            let line_end = self.pos + end;
            if self.buf[line_end] == b'\r' {
                self.skip_lf = true;
            }
            let line_start = self.pos;
            self.pos = line_end + 1;
            if line_end == line_start {
                // Blank line: dispatch.
                if self.has_data {
                    self.has_data = false;
                    self.dispatched = true;
                    return Some(Ok(&self.current));
                }
                self.current.event.clear();
                continue;
            }
            if let Err(e) = self.field(line_start, line_end) {
                return Some(Err(e));
            }
        }
    }

    fn field(&mut self, start: usize, end: usize) -> Result<(), ProviderError> {
        let line = std::str::from_utf8(&self.buf[start..end])
            .map_err(|_| ProviderError::malformed_event("invalid utf-8"))?;
        if line.starts_with(':') {
            return Ok(());
        }
        let (name, value) = match line.split_once(':') {
            Some((name, value)) => (name, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match name {
            "data" => {
                if self.has_data {
                    self.current.data.push('\n');
                }
                self.current.data.push_str(value);
                self.has_data = true;
            }
            "event" => {
                self.current.event.clear();
                self.current.event.push_str(value);
            }
            // `id`, `retry` and unknown fields carry nothing the gateway uses.
            _ => {}
        }
        Ok(())
    }
}

/// Turns a provider's SSE events into stream events.
pub trait EventDecoder: Send + Unpin + 'static {
    /// Decodes one event, pushing zero or more stream events. Returns `true` once the
    /// provider's terminal event has arrived (the stream is complete; a `Finish` must have been
    /// pushed by then).
    fn decode(
        &mut self,
        event: &SseEvent,
        out: &mut VecDeque<StreamEvent>,
    ) -> Result<bool, ProviderError>;

    /// Called when the body ends before a terminal event. Providers whose format ends with
    /// the body (after a finish marker) push their `Finish` here; otherwise the stream was
    /// truncated and this returns an error.
    fn end_of_body(&mut self, out: &mut VecDeque<StreamEvent>) -> Result<(), ProviderError>;
}

/// The SSE framing of a [`StreamDecoder`]: bytes -> [`SseEvent`]s -> the provider's
/// [`EventDecoder`].
#[derive(Debug, Default)]
pub struct Sse<D> {
    sse: SseDecoder,
    events: D,
}

impl<D: EventDecoder> Sse<D> {
    /// SSE framing around `events`.
    pub fn new(events: D) -> Self {
        Self {
            sse: SseDecoder::new(),
            events,
        }
    }
}

impl<D: EventDecoder> StreamDecoder for Sse<D> {
    fn feed(
        &mut self,
        bytes: &[u8],
        out: &mut VecDeque<StreamEvent>,
    ) -> Result<bool, ProviderError> {
        self.sse.push(bytes);
        while let Some(event) = self.sse.next_event() {
            if self.events.decode(event?, out)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn end_of_body(&mut self, out: &mut VecDeque<StreamEvent>) -> Result<(), ProviderError> {
        self.events.end_of_body(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(dec: &mut SseDecoder) -> Vec<SseEvent> {
        let mut out = Vec::new();
        while let Some(ev) = dec.next_event() {
            out.push(ev.unwrap().clone());
        }
        out
    }

    #[test]
    fn parses_events_split_across_chunks() {
        let mut dec = SseDecoder::new();
        dec.push(b"event: message_start\nda");
        assert!(all(&mut dec).is_empty());
        dec.push(b"ta: {\"a\":1}\n\n: comment\ndata: x\ndata: y\n\n");
        let evs = all(&mut dec);
        assert_eq!(
            evs,
            vec![
                SseEvent {
                    event: "message_start".into(),
                    data: "{\"a\":1}".into()
                },
                SseEvent {
                    event: String::new(),
                    data: "x\ny".into()
                },
            ]
        );
    }

    #[test]
    fn handles_crlf_and_cr_line_ends() {
        let mut dec = SseDecoder::new();
        dec.push(b"data: one\r\n\r\ndata: two\r\rdata:three\r");
        dec.push(b"\n\r\n");
        let data: Vec<_> = all(&mut dec).into_iter().map(|e| e.data).collect();
        assert_eq!(data, vec!["one", "two", "three"]);
    }

    #[test]
    fn event_without_data_is_not_dispatched() {
        let mut dec = SseDecoder::new();
        dec.push(b"event: ping\n\ndata: x\n\n");
        let evs = all(&mut dec);
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].event, "");
    }

    #[test]
    fn invalid_utf8_is_an_error() {
        let mut dec = SseDecoder::new();
        dec.push(b"data: \xff\xfe\n\n");
        assert!(dec.next_event().unwrap().is_err());
    }
}
