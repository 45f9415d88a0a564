//! The request id layer: takes `x-request-id` from the caller's metadata (when it is a sane
//! value) or generates one, puts it in the request extensions for handlers and logs, and
//! returns it in the response metadata of every call, successful or not.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use http::HeaderValue;
use tower::{Layer, Service};

/// The metadata key.
pub const HEADER: &str = "x-request-id";

/// The id of one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub HeaderValue);

impl RequestId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        // Only visible ASCII ids are accepted or generated.
        self.0.to_str().unwrap_or("")
    }
}

/// Generates a fresh id: 16 lowercase hex digits.
pub fn generate() -> HeaderValue {
    let mut buf = [0u8; 16];
    let n = fastrand::u64(..);
    for (i, b) in buf.iter_mut().enumerate() {
        let nibble = ((n >> (60 - 4 * i)) & 0xf) as u8;
        *b = if nibble < 10 {
            b'0' + nibble
        } else {
            b'a' + nibble - 10
        };
    }
    HeaderValue::from_bytes(&buf).unwrap_or(HeaderValue::from_static("0"))
}

/// Whether a caller-sent id is usable: 1 to 128 visible ASCII characters.
pub fn acceptable(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty() && bytes.len() <= 128 && bytes.iter().all(|b| b.is_ascii_graphic())
}

/// Adds [`RequestId`] handling to a service.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestIdLayer;

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestIdService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestIdService { inner }
    }
}

/// See [`RequestIdLayer`].
#[derive(Debug, Clone)]
pub struct RequestIdService<S> {
    inner: S,
}

impl<S, B, RB> Service<http::Request<B>> for RequestIdService<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let id = match req.headers().get(HEADER) {
            Some(v) if acceptable(v) => v.clone(),
            _ => generate(),
        };
        req.extensions_mut().insert(RequestId(id.clone()));
        ResponseFuture {
            inner: self.inner.call(req),
            id: Some(id),
        }
    }
}

pin_project_lite::pin_project! {
    /// Adds the id to the response headers.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        id: Option<HeaderValue>,
    }
}

impl<F, RB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = std::task::ready!(this.inner.poll(cx))?;
        if let Some(id) = this.id.take() {
            response.headers_mut().insert(HEADER, id);
        }
        Poll::Ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_hex_and_distinct() {
        let a = generate();
        let b = generate();
        assert_eq!(a.len(), 16);
        assert!(a.to_str().unwrap().chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn rejects_odd_ids() {
        assert!(acceptable(&HeaderValue::from_static("abc-123")));
        assert!(!acceptable(&HeaderValue::from_static("")));
        assert!(!acceptable(&HeaderValue::from_static("has space")));
        assert!(!acceptable(
            &HeaderValue::from_str(&"x".repeat(129)).unwrap()
        ));
    }
}
