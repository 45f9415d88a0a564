//! How requests carry credentials: the pluggable half of the transport. An [`Auth`] sees the
//! final request (method, URL, headers, body) and the key the [`super::KeyRing`] picked, and
//! may be async (to sign, or to fetch a token). Rotation and rests on 401/403/429 stay in
//! the key ring, the same for every auth kind: an `authorize` error that
//! [`super::KeyRing::is_key_failure`] accepts rests the key and the call goes on with the
//! next one.
//!
//! Per-key state (a header value built once, parsed credentials, a cached token) lives on
//! the key itself ([`ProviderKey::state`]), so a reload that keeps a key keeps its state.

use async_trait::async_trait;
use bytes::Bytes;

use super::{ErrorClass, ProviderError, keys::ProviderKey};

/// Adds credentials to a request.
#[async_trait]
pub trait Auth: Send + Sync + 'static {
    /// Authorizes `request` (complete but for credentials; `body` is its body) with `key`,
    /// or `None` when the provider has no key (send it as is, or fail when credentials are
    /// required).
    async fn authorize(
        &self,
        key: Option<&ProviderKey>,
        request: &mut reqwest::Request,
        body: &Bytes,
    ) -> Result<(), ProviderError>;

    /// The provider refused `request`, which this auth authorized with `key`, with a 401.
    /// An auth whose credentials can go stale before their time (a revoked OAuth token)
    /// drops them and returns `true`: the request is then authorized and sent once more with
    /// the same key. The default keeps nothing to drop.
    async fn refused(&self, _key: &ProviderKey, _request: &reqwest::Request) -> bool {
        false
    }

    /// Whether [`Auth::refused`] may return `true`: only then does a request keep a copy of
    /// itself for the second send.
    fn renews(&self) -> bool {
        false
    }
}

/// A header carrying the key, optionally after a prefix: `Authorization: Bearer <key>`,
/// `x-api-key: <key>`, `api-key: <key>`, `x-goog-api-key: <key>`. The header value is
/// built once per key and marked sensitive.
#[derive(Debug, Clone)]
pub struct ApiKeyHeader {
    name: http::HeaderName,
    prefix: &'static str,
}

impl ApiKeyHeader {
    /// The key in header `name` after `prefix` (e.g. `"Bearer "`, or `""`).
    pub const fn new(name: http::HeaderName, prefix: &'static str) -> Self {
        Self { name, prefix }
    }

    /// `Authorization: Bearer <key>`.
    pub const fn bearer() -> Self {
        Self::new(http::header::AUTHORIZATION, "Bearer ")
    }

    /// The key as is in a custom header, e.g. `x-api-key`.
    pub const fn header(name: &'static str) -> Self {
        Self::new(http::HeaderName::from_static(name), "")
    }
}

/// The key's header value, once per key (`None`: the key is not a valid header value).
struct HeaderState(Option<http::HeaderValue>);

#[async_trait]
impl Auth for ApiKeyHeader {
    async fn authorize(
        &self,
        key: Option<&ProviderKey>,
        request: &mut reqwest::Request,
        _body: &Bytes,
    ) -> Result<(), ProviderError> {
        let Some(key) = key else {
            return Ok(());
        };
        let value = key
            .state(|secret| HeaderState(sensitive_header(&format!("{}{secret}", self.prefix))))
            .and_then(|s| s.0.clone())
            .ok_or_else(|| {
                ProviderError::new(
                    ErrorClass::Authentication,
                    "the configured api key is not a valid header value",
                )
            })?;
        request.headers_mut().insert(self.name.clone(), value);
        Ok(())
    }
}

/// The state an auth keeps for `key`, parsed from its secret by `parse` on first use (for
/// credentials that are more than a header: AWS credential sets, service-account keys). An
/// unusable secret fails every use with `parse`'s error.
pub fn parsed_state<T: Send + Sync + 'static>(
    key: &ProviderKey,
    parse: impl FnOnce(&str) -> Result<T, ProviderError>,
) -> Result<&T, ProviderError> {
    key.state(parse)
        .ok_or_else(|| {
            ProviderError::new(ErrorClass::Authentication, "the key's credentials failed")
        })?
        .as_ref()
        .map_err(Clone::clone)
}

/// A header value marked sensitive (never printed by `http`'s `Debug`); `None` when `value`
/// cannot be a header value.
pub fn sensitive_header(value: &str) -> Option<http::HeaderValue> {
    let mut value = http::HeaderValue::from_str(value).ok()?;
    value.set_sensitive(true);
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::KeyRing;

    async fn authorized(
        auth: &ApiKeyHeader,
        secret: &str,
    ) -> Result<reqwest::Request, ProviderError> {
        let ring = KeyRing::single("p", Some(secret.to_owned()));
        let crate::providers::keys::Pick::Key(key, _) = ring.pick(&[]) else {
            panic!("a key")
        };
        let mut request = reqwest::Request::new(
            http::Method::POST,
            reqwest::Url::parse("http://127.0.0.1/x").unwrap(),
        );
        auth.authorize(Some(&key), &mut request, &Bytes::new())
            .await?;
        // The value is built once per key.
        auth.authorize(Some(&key), &mut request, &Bytes::new())
            .await?;
        Ok(request)
    }

    #[tokio::test]
    async fn api_key_headers_are_sensitive() {
        let request = authorized(&ApiKeyHeader::bearer(), "sk-1").await.unwrap();
        let value = &request.headers()[http::header::AUTHORIZATION];
        assert_eq!(value, "Bearer sk-1");
        assert!(value.is_sensitive());
        assert!(!format!("{:?}", request.headers()).contains("sk-1"));
        let request = authorized(&ApiKeyHeader::header("x-api-key"), "k")
            .await
            .unwrap();
        assert_eq!(request.headers()["x-api-key"], "k");
        let err = authorized(&ApiKeyHeader::bearer(), "bad\nkey")
            .await
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::Authentication);
        assert!(!err.message.contains("bad"));
    }
}
