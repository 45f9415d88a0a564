//! OAuth2 access tokens from a Google service-account key (RFC 7523 JWT bearer grant), for
//! Vertex AI.
//!
//! The key file's RSA private key signs an RS256 JWT assertion (`iss` = the account's email,
//! `aud` = the key's `token_uri`, scope `cloud-platform`, one hour), which the `token_uri`
//! exchanges for an access token. A [`TokenSource`] caches the token and fetches a new one
//! [`REFRESH_MARGIN`] before it expires; concurrent callers share one fetch (single-flight:
//! the fetch runs under the cache's lock, waiters then find the fresh token). A token the
//! API refused can be dropped ([`TokenSource::invalidate`]) so the next call fetches anew.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use base64::Engine as _;
use serde::Deserialize;
use tokio::time::Instant;

use super::{ErrorClass, ProviderError, error::short_message};

/// The OAuth scope requested for Vertex AI.
pub const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

/// The grant type of the JWT bearer flow.
pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// How long before expiry a cached token is replaced.
pub const REFRESH_MARGIN: Duration = Duration::from_secs(300);

/// The lifetime asked of an assertion (Google's maximum).
const ASSERTION_LIFETIME: u64 = 3600;

fn auth_error(msg: impl Into<String>) -> ProviderError {
    ProviderError::new(ErrorClass::Authentication, msg)
}

#[derive(Deserialize)]
struct RawKey {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    project_id: Option<String>,
    #[serde(default)]
    private_key_id: Option<String>,
    private_key: String,
    client_email: String,
    #[serde(default)]
    token_uri: Option<String>,
}

/// A parsed service-account key.
pub struct ServiceAccountKey {
    /// The account, e.g. `gateway@my-project.iam.gserviceaccount.com`.
    pub client_email: String,
    /// The project the account belongs to (the default Vertex project).
    pub project_id: Option<String>,
    /// Where assertions are exchanged for tokens.
    pub token_uri: String,
    private_key_id: Option<String>,
    key_pair: ring::signature::RsaKeyPair,
}

impl std::fmt::Debug for ServiceAccountKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccountKey")
            .field("client_email", &self.client_email)
            .field("token_uri", &self.token_uri)
            .finish_non_exhaustive()
    }
}

/// The DER bytes of the first PEM block labelled `label`.
fn pem_der(pem: &str, label: &str) -> Option<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem.find(&begin)? + begin.len();
    let stop = start + pem[start..].find(&end)?;
    let b64: String = pem[start..stop]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

impl ServiceAccountKey {
    /// Parses a service-account key file (JSON, as downloaded from Google Cloud).
    pub fn from_json(text: &str) -> Result<Self, ProviderError> {
        let raw: RawKey = serde_json::from_str(text).map_err(|_| {
            auth_error(
                "the vertex credentials are not a service-account key (json with client_email and private_key)",
            )
        })?;
        if raw.kind.as_deref().is_some_and(|k| k != "service_account") {
            return Err(auth_error(
                "the vertex credentials are not a service-account key (`type` is not service_account)",
            ));
        }
        let der = pem_der(&raw.private_key, "PRIVATE KEY").ok_or_else(|| {
            auth_error("the service-account key's private_key is not a PKCS#8 PEM block")
        })?;
        let key_pair = ring::signature::RsaKeyPair::from_pkcs8(&der)
            .map_err(|_| auth_error("the service-account key's private_key is not an RSA key"))?;
        Ok(Self {
            client_email: raw.client_email,
            project_id: raw.project_id.filter(|p| !p.is_empty()),
            token_uri: raw
                .token_uri
                .filter(|u| !u.is_empty())
                .unwrap_or_else(|| "https://oauth2.googleapis.com/token".to_owned()),
            private_key_id: raw.private_key_id.filter(|k| !k.is_empty()),
            key_pair,
        })
    }

    /// The signed JWT assertion for the time `now` (seconds since the Unix epoch).
    pub fn assertion(&self, now: u64) -> Result<String, ProviderError> {
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let mut header = serde_json::json!({"alg": "RS256", "typ": "JWT"});
        if let Some(kid) = &self.private_key_id {
            header["kid"] = kid.as_str().into();
        }
        let claims = serde_json::json!({
            "iss": self.client_email,
            "scope": SCOPE,
            "aud": self.token_uri,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME,
        });
        let signing_input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let mut signature = vec![0; self.key_pair.public().modulus_len()];
        self.key_pair
            .sign(
                &ring::signature::RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                signing_input.as_bytes(),
                &mut signature,
            )
            .map_err(|_| auth_error("the service-account assertion could not be signed"))?;
        Ok(format!("{signing_input}.{}", b64(&signature)))
    }

    /// The DER `RSAPublicKey` of the key (what a verifier checks assertions with).
    pub fn public_key_der(&self) -> &[u8] {
        use ring::signature::KeyPair as _;
        self.key_pair.public_key().as_ref()
    }
}

/// An access token and when it expires.
#[derive(Clone)]
struct CachedToken {
    token: Arc<str>,
    expires_at: Instant,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

#[derive(Deserialize, Default)]
struct TokenError {
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    error_description: Option<String>,
}

/// Access tokens of one service account, cached.
pub struct TokenSource {
    key: ServiceAccountKey,
    cached: tokio::sync::Mutex<Option<CachedToken>>,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl TokenSource {
    /// A source for `key`, with nothing cached.
    pub fn new(key: ServiceAccountKey) -> Self {
        Self {
            key,
            cached: tokio::sync::Mutex::new(None),
        }
    }

    /// The service-account key.
    pub fn key(&self) -> &ServiceAccountKey {
        &self.key
    }

    /// A valid access token: the cached one while more than [`REFRESH_MARGIN`] remains, else
    /// a new one from the token endpoint (one fetch however many callers wait).
    pub async fn token(&self, client: &reqwest::Client) -> Result<Arc<str>, ProviderError> {
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref()
            && c.expires_at > Instant::now() + REFRESH_MARGIN
        {
            return Ok(c.token.clone());
        }
        let fresh = self.fetch(client).await?;
        let token = fresh.token.clone();
        *cached = Some(fresh);
        Ok(token)
    }

    /// Drops `token` from the cache (the API refused it), unless a newer one replaced it.
    pub async fn invalidate(&self, token: &str) {
        let mut cached = self.cached.lock().await;
        if cached.as_ref().is_some_and(|c| &*c.token == token) {
            *cached = None;
        }
    }

    async fn fetch(&self, client: &reqwest::Client) -> Result<CachedToken, ProviderError> {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let assertion = self.key.assertion(now)?;
        let body = format!(
            "grant_type={}&assertion={assertion}",
            form_encode(GRANT_TYPE)
        );
        let sent_at = Instant::now();
        let response = client
            .post(&self.key.token_uri)
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body)
            .send()
            .await
            .map_err(|e| {
                let err = ProviderError::from_transport(&e);
                ProviderError::new(
                    err.class,
                    format!("the oauth token endpoint failed: {}", err.message),
                )
            })?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await.map_err(|_| {
            ProviderError::new(
                ErrorClass::Connect,
                "the oauth token endpoint's answer was cut off",
            )
        })?;
        if !(200..300).contains(&status) {
            return Err(token_error(status, &bytes));
        }
        let parsed: TokenResponse = serde_json::from_slice(&bytes).map_err(|_| {
            ProviderError::new(
                ErrorClass::InvalidResponse,
                "the oauth token endpoint sent no access token",
            )
        })?;
        if parsed.access_token.is_empty() {
            return Err(ProviderError::new(
                ErrorClass::InvalidResponse,
                "the oauth token endpoint sent an empty access token",
            ));
        }
        Ok(CachedToken {
            token: parsed.access_token.into(),
            expires_at: sent_at + Duration::from_secs(parsed.expires_in.unwrap_or(3600)),
        })
    }
}

/// The error for a refused token request.
fn token_error(status: u16, body: &[u8]) -> ProviderError {
    let wire: TokenError = serde_json::from_slice(body).unwrap_or_default();
    let class = match status {
        429 => ErrorClass::RateLimited,
        500..=599 => ErrorClass::from_http_status(status),
        // 400 invalid_grant / unauthorized_client, 401: the credentials are the problem.
        _ => ErrorClass::Authentication,
    };
    let detail = match (wire.error, wire.error_description) {
        (Some(e), Some(d)) => format!("{e}: {}", short_message(&d)),
        (Some(e), None) => e,
        _ => format!("http {status}"),
    };
    ProviderError::new(
        class,
        format!("the oauth token endpoint refused the service account: {detail}"),
    )
    .with_status(status)
}

/// `application/x-www-form-urlencoded` encoding of a value.
fn form_encode(s: &str) -> String {
    super::sigv4::uri_encode(s, false)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The mock upstream's test service account (a throwaway key, see its README).
    pub(crate) fn test_key_json(token_uri: &str) -> String {
        serde_json::json!({
            "type": "service_account",
            "project_id": "mock-project",
            "private_key_id": "test-key-1",
            "private_key": include_str!("../mock_upstream/testdata/vertex-test-key.pem"),
            "client_email": "gateway@mock-project.iam.gserviceaccount.com",
            "token_uri": token_uri,
        })
        .to_string()
    }

    #[test]
    fn assertion_is_a_verifiable_rs256_jwt() {
        let key =
            ServiceAccountKey::from_json(&test_key_json("https://oauth2.example/token")).unwrap();
        assert_eq!(key.project_id.as_deref(), Some("mock-project"));
        let jwt = key.assertion(1_700_000_000).unwrap();
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let decode = |s: &str| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(s)
                .unwrap()
        };
        let header: serde_json::Value = serde_json::from_slice(&decode(parts[0])).unwrap();
        assert_eq!(header["alg"], "RS256");
        assert_eq!(header["kid"], "test-key-1");
        let claims: serde_json::Value = serde_json::from_slice(&decode(parts[1])).unwrap();
        assert_eq!(
            claims["iss"],
            "gateway@mock-project.iam.gserviceaccount.com"
        );
        assert_eq!(claims["aud"], "https://oauth2.example/token");
        assert_eq!(claims["scope"], SCOPE);
        assert_eq!(claims["exp"], 1_700_003_600);
        let public = ring::signature::UnparsedPublicKey::new(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            key.public_key_der(),
        );
        let signed = format!("{}.{}", parts[0], parts[1]);
        assert!(public.verify(signed.as_bytes(), &decode(parts[2])).is_ok());
        assert!(public.verify(b"tampered", &decode(parts[2])).is_err());
    }

    #[test]
    fn bad_keys_are_clear_errors() {
        for text in [
            "not json",
            r#"{"type":"authorized_user","client_email":"a","private_key":"x"}"#,
            r#"{"client_email":"a","private_key":"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----"}"#,
        ] {
            let err = ServiceAccountKey::from_json(text).unwrap_err();
            assert_eq!(err.class, ErrorClass::Authentication);
            assert!(!err.message.contains("AAAA"), "{}", err.message);
        }
    }

    #[test]
    fn token_endpoint_refusals_are_classified() {
        let err = token_error(
            400,
            br#"{"error":"invalid_grant","error_description":"Invalid JWT Signature."}"#,
        );
        assert_eq!(err.class, ErrorClass::Authentication);
        assert!(err.message.contains("invalid_grant"), "{}", err.message);
        assert_eq!(token_error(429, b"").class, ErrorClass::RateLimited);
        assert_eq!(token_error(503, b"").class, ErrorClass::Overloaded);
    }

    fn client() -> reqwest::Client {
        crate::providers::http_client(&crate::providers::HttpSettings::default()).unwrap()
    }

    async fn mock() -> crate::mock_upstream::MockUpstream {
        crate::mock_upstream::MockUpstream::start(Default::default())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_cached_token() {
        let mock = mock().await;
        let source = TokenSource::new(
            ServiceAccountKey::from_json(&mock.vertex_service_account_json()).unwrap(),
        );
        let client = client();
        let tokens = futures_util::future::join_all((0..8).map(|_| source.token(&client))).await;
        let first = tokens[0].as_ref().unwrap().clone();
        assert!(tokens.iter().all(|t| t.as_ref().unwrap() == &first));
        assert_eq!(mock.vertex_token_requests(), 1);
        assert_eq!(source.token(&client).await.unwrap(), first);
        assert_eq!(mock.vertex_token_requests(), 1);
        // A refused token is dropped: the next call fetches anew.
        source.invalidate(&first).await;
        assert_ne!(source.token(&client).await.unwrap(), first);
        assert_eq!(mock.vertex_token_requests(), 2);
    }

    #[tokio::test]
    async fn tokens_close_to_expiry_are_refreshed() {
        let mock = mock().await;
        // Tokens that live less than the refresh margin are replaced on every use.
        mock.set_vertex_token_lifetime(REFRESH_MARGIN - Duration::from_secs(1));
        let source = TokenSource::new(
            ServiceAccountKey::from_json(&mock.vertex_service_account_json()).unwrap(),
        );
        let client = client();
        let a = source.token(&client).await.unwrap();
        let b = source.token(&client).await.unwrap();
        assert_ne!(a, b);
        assert_eq!(mock.vertex_token_requests(), 2);
    }

    #[tokio::test]
    async fn an_untrusted_key_is_refused_by_the_token_endpoint() {
        let mock = mock().await;
        let mut json: serde_json::Value =
            serde_json::from_str(&mock.vertex_service_account_json()).unwrap();
        json["private_key"] =
            include_str!("../mock_upstream/testdata/vertex-untrusted-test-key.pem").into();
        let source = TokenSource::new(ServiceAccountKey::from_json(&json.to_string()).unwrap());
        let err = source.token(&client()).await.unwrap_err();
        assert_eq!(err.class, ErrorClass::Authentication);
        assert!(err.message.contains("invalid_grant"), "{}", err.message);
        assert!(
            err.message.contains("Invalid JWT Signature"),
            "{}",
            err.message
        );
    }
}
