//! Request framing checks, so that no malformed request reaches tonic's decoder (which calls
//! most framing faults INTERNAL and an oversized message OUT_OF_RANGE).
//!
//! [`FramingLayer`] wraps each request body in a checker that reads the gRPC length-prefixed
//! frames as they stream past (nothing is buffered): a message longer than the RPC's
//! [`Method::max_request_bytes`](super::authz::Method) is `RESOURCE_EXHAUSTED`
//! (`MESSAGE_TOO_LARGE`, the limit in the message) before its bytes arrive; an unknown
//! compressed flag, a body that ends inside a frame, or a unary request without a message is
//! `INVALID_ARGUMENT`. The checker reports by failing the body with the status, which tonic
//! passes to the caller unchanged. Bytes that are framed well but are no valid message are
//! the codec's to refuse ([`crate::codec`]).

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tower::{Layer, Service};

use super::authz;
use crate::error::GatewayError;

/// gRPC's frame header: a compressed flag and a big-endian length.
const HEADER: usize = 5;

/// What is wrong with a request's frames.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// A message is longer than the limit.
    #[error("the request message is {len} bytes; at most {limit} bytes are accepted")]
    TooLarge {
        /// The declared length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The compressed flag is neither 0 nor 1, or 1 without a `grpc-encoding`.
    #[error("the message's compressed flag is {0}, which this request cannot carry")]
    Flag(u8),
    /// The body ended inside a frame.
    #[error("the request ends inside a message ({got} of {want} bytes)")]
    Truncated {
        /// Bytes of the frame received.
        got: usize,
        /// Bytes the frame needs.
        want: usize,
    },
    /// A unary request without a message.
    #[error("the request has no message")]
    Empty,
}

impl From<FramingError> for GatewayError {
    fn from(err: FramingError) -> Self {
        match err {
            FramingError::TooLarge { .. } => GatewayError::ResourceExhausted {
                reason: "MESSAGE_TOO_LARGE",
                subject: "request".to_owned(),
                message: err.to_string(),
                retry_after: None,
            },
            FramingError::Flag(_) | FramingError::Truncated { .. } | FramingError::Empty => {
                GatewayError::invalid("request", err.to_string())
            }
        }
    }
}

/// Reads gRPC frames incrementally; see the module docs.
#[derive(Debug, Clone)]
pub struct Frames {
    limit: usize,
    single: bool,
    compression: bool,
    header: [u8; HEADER],
    header_len: usize,
    /// Payload bytes still to come of the current message, and its length.
    payload: Option<(usize, usize)>,
    messages: usize,
}

impl Frames {
    /// A reader for messages of at most `limit` bytes; `single` when the RPC takes exactly
    /// one message; `compression` when the request declares a `grpc-encoding`.
    pub fn new(limit: usize, single: bool, compression: bool) -> Self {
        Self {
            limit,
            single,
            compression,
            header: [0; HEADER],
            header_len: 0,
            payload: None,
            messages: 0,
        }
    }

    /// Reads the next bytes of the body.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), FramingError> {
        while !data.is_empty() {
            if let Some((left, len)) = self.payload {
                let n = left.min(data.len());
                data = &data[n..];
                self.payload = (left > n).then_some((left - n, len));
                if self.payload.is_none() {
                    self.messages += 1;
                }
                continue;
            }
            let n = (HEADER - self.header_len).min(data.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&data[..n]);
            self.header_len += n;
            data = &data[n..];
            if self.header_len < HEADER {
                continue;
            }
            self.header_len = 0;
            let [flag, a, b, c, d] = self.header;
            if !(flag == 0 || flag == 1 && self.compression) {
                return Err(FramingError::Flag(flag));
            }
            let len = usize::try_from(u32::from_be_bytes([a, b, c, d])).unwrap_or(usize::MAX);
            if len > self.limit {
                return Err(FramingError::TooLarge {
                    len,
                    limit: self.limit,
                });
            }
            if len == 0 {
                self.messages += 1;
            } else {
                self.payload = Some((len, len));
            }
        }
        Ok(())
    }

    /// The body ended: checks that it ended between messages (and held one, for unary RPCs).
    pub fn finish(&self) -> Result<(), FramingError> {
        if let Some((left, len)) = self.payload {
            return Err(FramingError::Truncated {
                got: HEADER + len - left,
                want: HEADER + len,
            });
        }
        if self.header_len > 0 {
            return Err(FramingError::Truncated {
                got: self.header_len,
                want: HEADER,
            });
        }
        if self.single && self.messages == 0 {
            return Err(FramingError::Empty);
        }
        Ok(())
    }
}

pin_project_lite::pin_project! {
    /// A request body checked by [`Frames`].
    pub struct CheckedBody<B> {
        #[pin]
        inner: B,
        frames: Frames,
        done: bool,
    }
}

impl<B> Body for CheckedBody<B>
where
    B: Body<Data = Bytes, Error = tonic::Status>,
{
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        let checked = match std::task::ready!(this.inner.poll_frame(cx)) {
            Some(Ok(frame)) => match frame.data_ref() {
                Some(data) => this.frames.feed(data).map(|()| Some(Ok(frame))),
                None => Ok(Some(Ok(frame))),
            },
            Some(Err(status)) => Ok(Some(Err(status))),
            None => this.frames.finish().map(|()| None),
        };
        Poll::Ready(match checked {
            Ok(None) => {
                *this.done = true;
                None
            }
            Ok(Some(frame)) => Some(frame),
            Err(err) => {
                *this.done = true;
                let err = GatewayError::from(err);
                err.log("request refused");
                Some(Err(err.into_status()))
            }
        })
    }

    fn is_end_stream(&self) -> bool {
        // Not before the end has been checked (an empty unary body is an error).
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Checks the framing of every request; see the module docs.
#[derive(Debug, Clone, Copy, Default)]
pub struct FramingLayer;

impl<S> Layer<S> for FramingLayer {
    type Service = Framing<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Framing { inner }
    }
}

/// See [`FramingLayer`].
#[derive(Debug, Clone)]
pub struct Framing<S> {
    inner: S,
}

impl<S> Service<http::Request<tonic::body::Body>> for Framing<S>
where
    S: Service<http::Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        // Unknown paths never get here (the authorization layer refuses them); should one,
        // the strictest limits apply.
        let (limit, single) = authz::method(req.uri().path())
            .map_or((authz::LIBRARY_MAX_REQUEST_BYTES, true), |m| {
                (m.max_request_bytes, !m.streaming_request)
            });
        let compression = req.headers().contains_key("grpc-encoding");
        let req = req.map(|inner| {
            tonic::body::Body::new(CheckedBody {
                inner,
                frames: Frames::new(limit, single, compression),
                done: false,
            })
        });
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(flag: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![flag];
        out.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn check(bytes: &[u8], piece: usize, single: bool) -> Result<(), FramingError> {
        let mut frames = Frames::new(16, single, false);
        for chunk in bytes.chunks(piece.max(1)) {
            frames.feed(chunk)?;
        }
        frames.finish()
    }

    #[test]
    fn well_framed_bodies_pass_in_any_pieces() {
        let mut two = frame(0, b"hello");
        two.extend(frame(0, b""));
        for piece in 1..=two.len() {
            assert_eq!(check(&frame(0, b"hello"), piece, true), Ok(()));
            assert_eq!(check(&two, piece, false), Ok(()));
            assert_eq!(check(&frame(0, &[7; 16]), piece, true), Ok(()));
        }
        assert_eq!(check(b"", 1, false), Ok(()));
    }

    #[test]
    fn faults_are_named() {
        assert_eq!(
            check(&frame(0, &[0; 17]), 3, true),
            Err(FramingError::TooLarge { len: 17, limit: 16 })
        );
        // Refused from the header alone, before any payload arrives.
        assert_eq!(
            check(&[0, 0xff, 0xff, 0xff, 0xff], 5, true),
            Err(FramingError::TooLarge {
                len: 0xffff_ffff,
                limit: 16
            })
        );
        assert_eq!(check(&frame(2, b"x"), 2, true), Err(FramingError::Flag(2)));
        assert_eq!(check(&frame(1, b"x"), 2, true), Err(FramingError::Flag(1)));
        assert_eq!(
            check(&frame(0, b"hello")[..7], 2, true),
            Err(FramingError::Truncated { got: 7, want: 10 })
        );
        assert_eq!(
            check(&[0, 0], 1, true),
            Err(FramingError::Truncated { got: 2, want: 5 })
        );
        assert_eq!(check(b"", 1, true), Err(FramingError::Empty));
        let mut frames = Frames::new(16, true, true);
        assert_eq!(frames.feed(&frame(1, b"x")), Ok(()));
    }
}
