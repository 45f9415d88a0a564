//! AWS credentials and Signature Version 4 request signing (the `aws-sigv4` crate).
//!
//! A credential set (access key id, secret access key, optional session token) travels
//! through the provider's [`KeyRing`](super::KeyRing) as one opaque key string
//! ([`AwsCredentials::to_key`]), so Bedrock credentials rotate, rest after a refusal and
//! reload exactly like other providers' API keys. The secret never leaves this module except
//! inside the signature.

use std::time::SystemTime;

use async_trait::async_trait;
use aws_sigv4::{
    http_request::{SignableBody, SignableRequest, SigningSettings, sign},
    sign::v4,
};
use bytes::Bytes;

use super::{
    ErrorClass, ProviderError,
    auth::{Auth, parsed_state},
    keys::ProviderKey,
};

/// One AWS credential set.
#[derive(Clone, PartialEq, Eq)]
pub struct AwsCredentials {
    /// The access key id, e.g. `AKIA...` (not secret; named in logs as the key's index only).
    pub access_key_id: String,
    /// The secret access key.
    pub secret_access_key: String,
    /// The session token of temporary credentials (`ASIA...` key ids).
    pub session_token: Option<String>,
}

impl std::fmt::Debug for AwsCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AwsCredentials(<redacted>)")
    }
}

/// Separates the parts of a credential set inside a key string (never part of an AWS value:
/// key ids are alphanumeric, secrets and session tokens base64).
const SEP: char = ':';

impl AwsCredentials {
    /// A credential set; `None` when a part is empty or holds a `:` or a line break.
    pub fn new(
        access_key_id: &str,
        secret_access_key: &str,
        session_token: Option<&str>,
    ) -> Option<Self> {
        let ok = |s: &str| !s.trim().is_empty() && !s.contains([SEP, '\n', '\r']);
        let token = session_token.map(str::trim).filter(|t| !t.is_empty());
        (ok(access_key_id) && ok(secret_access_key) && token.is_none_or(ok)).then(|| Self {
            access_key_id: access_key_id.trim().to_owned(),
            secret_access_key: secret_access_key.trim().to_owned(),
            session_token: token.map(str::to_owned),
        })
    }

    /// The key string carrying this set through a key ring:
    /// `ACCESS_KEY_ID:SECRET_ACCESS_KEY[:SESSION_TOKEN]`.
    pub fn to_key(&self) -> String {
        let mut key = format!("{}{SEP}{}", self.access_key_id, self.secret_access_key);
        if let Some(token) = &self.session_token {
            key.push(SEP);
            key.push_str(token);
        }
        key
    }

    /// The set a key string carries.
    pub fn from_key(key: &str) -> Result<Self, ProviderError> {
        let mut parts = key.split(SEP);
        let (Some(id), Some(secret), token, None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(ProviderError::new(
                ErrorClass::Authentication,
                "the configured aws credentials are malformed",
            ));
        };
        Self::new(id, secret, token).ok_or_else(|| {
            ProviderError::new(
                ErrorClass::Authentication,
                "the configured aws credentials are malformed",
            )
        })
    }
}

/// Percent-encodes `s` as SigV4 does (RFC 3986: everything but `A-Z a-z 0-9 - . _ ~`),
/// keeping `/` when `keep_slash`.
pub fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Signs a request: returns the headers to add (`authorization`, `x-amz-date`, and
/// `x-amz-security-token` for temporary credentials). `url` must already be percent-encoded;
/// `headers` are the ones to sign besides `host` (taken from the URL).
pub fn sign_request(
    credentials: &AwsCredentials,
    region: &str,
    service: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    time: SystemTime,
) -> Result<Vec<(&'static str, http::HeaderValue)>, ProviderError> {
    let failed = |_| {
        ProviderError::new(
            ErrorClass::Authentication,
            "the request could not be signed with the configured aws credentials",
        )
    };
    let identity = aws_credential_types::Credentials::new(
        &credentials.access_key_id,
        &credentials.secret_access_key,
        credentials.session_token.clone(),
        None,
        "llm-gateway",
    )
    .into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(time)
        .settings(SigningSettings::default())
        .build()
        .map_err(|_| {
            ProviderError::new(
                ErrorClass::Authentication,
                "the request could not be signed: incomplete signing parameters",
            )
        })?
        .into();
    let request = SignableRequest::new(
        "POST",
        url,
        headers.iter().copied(),
        SignableBody::Bytes(body),
    )
    .map_err(failed)?;
    let (instructions, _signature) = sign(request, &params).map_err(failed)?.into_parts();
    let (signed, _params) = instructions.into_parts();
    signed
        .into_iter()
        .map(|h| {
            let mut value = http::HeaderValue::from_str(h.value()).map_err(|_| {
                ProviderError::new(
                    ErrorClass::Authentication,
                    "the configured aws credentials are not valid header values",
                )
            })?;
            value.set_sensitive(h.sensitive() || h.name() == "authorization");
            Ok((h.name(), value))
        })
        .collect()
}

/// Signs every request with the key's AWS credentials (the key string is
/// [`AwsCredentials::to_key`]'s form), for `service` in `region`.
#[derive(Debug, Clone)]
pub struct SigV4 {
    region: String,
    service: &'static str,
}

impl SigV4 {
    /// Signing for `service` (e.g. `bedrock`) in `region`.
    pub fn new(region: impl Into<String>, service: &'static str) -> Self {
        Self {
            region: region.into(),
            service,
        }
    }
}

#[async_trait]
impl Auth for SigV4 {
    async fn authorize(
        &self,
        key: Option<&ProviderKey>,
        request: &mut reqwest::Request,
        body: &Bytes,
    ) -> Result<(), ProviderError> {
        let key = key.ok_or_else(|| {
            ProviderError::new(
                ErrorClass::Authentication,
                "no aws credentials are configured for this provider",
            )
        })?;
        let credentials = parsed_state(key, AwsCredentials::from_key)?;
        // The content type is signed with the request; host comes from the URL.
        let content_type = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
            .to_owned();
        let signed = sign_request(
            credentials,
            &self.region,
            self.service,
            request.url().as_str(),
            &[("content-type", &content_type)],
            body,
            SystemTime::now(),
        )?;
        for (name, value) in signed {
            request.headers_mut().insert(name, value);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_round_trip_through_a_key_string() {
        let c = AwsCredentials::new("AKIDEXAMPLE", "secret/+=", Some("token")).unwrap();
        assert_eq!(AwsCredentials::from_key(&c.to_key()).unwrap(), c);
        let c = AwsCredentials::new("AKIDEXAMPLE", "secret", None).unwrap();
        assert_eq!(AwsCredentials::from_key(&c.to_key()).unwrap(), c);
        assert!(AwsCredentials::new("", "secret", None).is_none());
        assert!(AwsCredentials::new("id", "a\nb", None).is_none());
        assert!(AwsCredentials::new("id", "a:b", None).is_none());
        assert_eq!(c.to_key(), "AKIDEXAMPLE:secret");
        assert!(AwsCredentials::from_key("only-one-part").is_err());
        assert!(AwsCredentials::from_key("a:b:c:d").is_err());
        assert_eq!(format!("{c:?}"), "AwsCredentials(<redacted>)");
    }

    #[test]
    fn uri_encoding_follows_rfc_3986() {
        assert_eq!(
            uri_encode("anthropic.claude-3-haiku-20240307-v1:0", false),
            "anthropic.claude-3-haiku-20240307-v1%3A0"
        );
        assert_eq!(uri_encode("a/b c~", true), "a/b%20c~");
        assert_eq!(uri_encode("a/b", false), "a%2Fb");
    }

    #[test]
    fn signing_adds_date_token_and_authorization() {
        let c = AwsCredentials::new("AKIDEXAMPLE", "secret", Some("session")).unwrap();
        let time = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_440_938_160);
        let headers = sign_request(
            &c,
            "us-east-1",
            "bedrock",
            "https://bedrock-runtime.us-east-1.amazonaws.com/model/m%3A0/converse",
            &[("content-type", "application/json")],
            b"{}",
            time,
        )
        .unwrap();
        let get = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_str().unwrap().to_owned())
        };
        assert_eq!(get("x-amz-date").as_deref(), Some("20150830T123600Z"));
        assert_eq!(get("x-amz-security-token").as_deref(), Some("session"));
        let auth = get("authorization").unwrap();
        assert!(
            auth.starts_with(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/bedrock/aws4_request, SignedHeaders=content-type;host;x-amz-date;x-amz-security-token, Signature="
            ),
            "{auth}"
        );
        assert!(
            headers
                .iter()
                .any(|(n, v)| *n == "authorization" && v.is_sensitive())
        );
    }
}
