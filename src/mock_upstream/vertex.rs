//! The mock's Google Vertex AI: an OAuth2 token endpoint (`POST /token`, the JWT bearer
//! grant) and the prediction endpoints
//! `POST /v1/projects/{project}/locations/{region}/publishers/{publisher}/models/{model}:{action}`
//! for Gemini (`google`: `generateContent`, `streamGenerateContent`) and Claude
//! (`anthropic`: `rawPredict`, `streamRawPredict`).
//!
//! The token endpoint verifies each assertion's RS256 signature against the test service
//! account's public key (`testdata/vertex-test-key.pem`, test-only) and its claims (issuer,
//! audience, scope, a lifetime of at most an hour around now), then issues an opaque token;
//! refusals are Google's `invalid_grant` answers. The prediction endpoints accept only
//! tokens it issued and that have not expired or been revoked (else Google's 401
//! `UNAUTHENTICATED`), only the account's project (else 403 `PERMISSION_DENIED`), and for
//! Claude only Vertex's body shape (`anthropic_version: "vertex-2023-10-16"`, no `model`).
//! Then Gemini requests are answered like the Gemini API, Claude requests like Anthropic's.

use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use axum::{
    Router,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, Uri},
    response::{IntoResponse, Response},
    routing::post,
};
use base64::Engine as _;
use serde_json::{Value, json};

use super::{MockState, anthropic, gemini, json_error};
use crate::providers::google_auth::{GRANT_TYPE, SCOPE, ServiceAccountKey};

/// The test service account's private key (a throwaway key; see `testdata/README.md`).
pub const TEST_PRIVATE_KEY_PEM: &str = include_str!("testdata/vertex-test-key.pem");

/// The test service account's email.
pub const TEST_CLIENT_EMAIL: &str = "gateway@mock-project.iam.gserviceaccount.com";

/// The test service account's project (the only one the mock serves).
pub const TEST_PROJECT: &str = "mock-project";

/// The `anthropic_version` Vertex requires in Claude request bodies.
const VERTEX_ANTHROPIC_VERSION: &str = "vertex-2023-10-16";

/// A service-account key file for the test account whose `token_uri` is `token_uri`.
pub fn service_account_json(token_uri: &str) -> String {
    json!({
        "type": "service_account",
        "project_id": TEST_PROJECT,
        "private_key_id": "mock-key-1",
        "private_key": TEST_PRIVATE_KEY_PEM,
        "client_email": TEST_CLIENT_EMAIL,
        "client_id": "100000000000000000001",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
    })
    .to_string()
}

/// Token endpoint state: issued tokens and their expiry.
#[derive(Debug)]
pub(crate) struct VertexAuth {
    /// DER `RSAPublicKey` of the trusted account; `None` if the fixture did not parse.
    public_key: Option<Vec<u8>>,
    issued: Mutex<BTreeMap<String, SystemTime>>,
    token_requests: AtomicU64,
    lifetime_secs: AtomicU64,
}

impl Default for VertexAuth {
    fn default() -> Self {
        let public_key = ServiceAccountKey::from_json(&service_account_json("http://unused"))
            .ok()
            .map(|k| k.public_key_der().to_vec());
        Self {
            public_key,
            issued: Mutex::new(BTreeMap::new()),
            token_requests: AtomicU64::new(0),
            lifetime_secs: AtomicU64::new(3600),
        }
    }
}

impl VertexAuth {
    /// Token requests received (accepted or not).
    pub fn token_requests(&self) -> u64 {
        self.token_requests.load(Ordering::SeqCst)
    }

    /// Sets the `expires_in` of tokens issued from now on.
    pub fn set_lifetime(&self, lifetime: Duration) {
        self.lifetime_secs
            .store(lifetime.as_secs(), Ordering::SeqCst);
    }

    /// Revokes every token issued so far.
    pub fn revoke_all(&self) {
        if let Ok(mut issued) = self.issued.lock() {
            issued.clear();
        }
    }

    fn valid(&self, token: &str) -> bool {
        self.issued
            .lock()
            .ok()
            .and_then(|issued| issued.get(token).copied())
            .is_some_and(|expiry| expiry > SystemTime::now())
    }
}

pub(super) fn routes() -> Router<MockState> {
    Router::new().route("/token", post(token)).route(
        "/v1/projects/{project}/locations/{location}/publishers/{publisher}/models/{model_and_action}",
        post(predict),
    )
}

fn invalid_grant(description: &str) -> Response {
    json_error(
        400,
        json!({"error": "invalid_grant", "error_description": description}),
        None,
    )
}

/// Decodes `application/x-www-form-urlencoded` text (a `%` not followed by two hex digits
/// stays as it is).
fn form_decode(s: &str) -> String {
    let hex = |b: u8| {
        char::from(b)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push(hi * 16 + lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn form_field(body: &str, name: &str) -> Option<String> {
    body.split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| form_decode(k) == name)
        .map(|(_, v)| form_decode(v))
}

/// Checks an assertion; `Err` is the `error_description` to answer with.
fn check_assertion(
    auth: &VertexAuth,
    assertion: &str,
    audience: &str,
    now: u64,
) -> Result<(), &'static str> {
    let decode = |s: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .ok()
    };
    let parts: Vec<&str> = assertion.split('.').collect();
    let [header, claims, signature] = parts.as_slice() else {
        return Err("Invalid JWT: not three dot-separated parts.");
    };
    let header: Value = decode(header)
        .and_then(|h| serde_json::from_slice(&h).ok())
        .ok_or("Invalid JWT: the header is not base64url json.")?;
    if header["alg"] != "RS256" {
        return Err("Invalid JWT: only RS256 is accepted.");
    }
    let public_key = auth.public_key.as_deref().ok_or("Invalid JWT Signature.")?;
    let signature = decode(signature).ok_or("Invalid JWT Signature.")?;
    let signed = &assertion[..assertion.rfind('.').unwrap_or(0)];
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        public_key,
    )
    .verify(signed.as_bytes(), &signature)
    .map_err(|_| "Invalid JWT Signature.")?;
    let claims: Value = decode(claims)
        .and_then(|c| serde_json::from_slice(&c).ok())
        .ok_or("Invalid JWT: the claims are not base64url json.")?;
    if claims["iss"] != TEST_CLIENT_EMAIL {
        return Err("Invalid grant: account not found");
    }
    if claims["aud"] != audience {
        return Err("Invalid JWT: the audience is not this token endpoint.");
    }
    if !claims["scope"]
        .as_str()
        .is_some_and(|s| s.split(' ').any(|s| s == SCOPE))
    {
        return Err("Invalid JWT: the scope does not include cloud-platform.");
    }
    let (Some(iat), Some(exp)) = (claims["iat"].as_u64(), claims["exp"].as_u64()) else {
        return Err("Invalid JWT: iat and exp are required.");
    };
    if exp <= now || iat > now + 60 || exp.saturating_sub(iat) > 3600 {
        return Err(
            "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe.",
        );
    }
    Ok(())
}

async fn token(State(state): State<MockState>, headers: HeaderMap, body: Bytes) -> Response {
    let auth = &state.vertex;
    auth.token_requests.fetch_add(1, Ordering::SeqCst);
    let body = String::from_utf8_lossy(&body);
    if form_field(&body, "grant_type").as_deref() != Some(GRANT_TYPE) {
        return json_error(
            400,
            json!({"error": "unsupported_grant_type", "error_description": "Invalid grant_type."}),
            None,
        );
    }
    let Some(assertion) = form_field(&body, "assertion") else {
        return invalid_grant("Missing required parameter: assertion");
    };
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if let Err(description) =
        check_assertion(auth, &assertion, &format!("http://{host}/token"), now)
    {
        return invalid_grant(description);
    }
    let n = auth.token_requests();
    let token = format!("ya29.mock-token-{n}-{}", fastrand::u64(..));
    let lifetime = auth.lifetime_secs.load(Ordering::SeqCst);
    if let Ok(mut issued) = auth.issued.lock() {
        issued.insert(
            token.clone(),
            SystemTime::now() + Duration::from_secs(lifetime),
        );
    }
    axum::Json(json!({"access_token": token, "expires_in": lifetime, "token_type": "Bearer"}))
        .into_response()
}

fn google_error(status: u16, code: &str, message: &str) -> Response {
    json_error(
        status,
        json!({"error": {"code": status, "message": message, "status": code}}),
        None,
    )
}

async fn predict(
    State(state): State<MockState>,
    Path((project, _location, publisher, model_and_action)): Path<(String, String, String, String)>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if !token.is_some_and(|t| state.vertex.valid(t)) {
        state
            .stats
            .record(&headers, serde_json::from_slice(&body).ok());
        return google_error(
            401,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential.",
        );
    }
    if project != TEST_PROJECT {
        state
            .stats
            .record(&headers, serde_json::from_slice(&body).ok());
        return google_error(
            403,
            "PERMISSION_DENIED",
            &format!("Permission denied on resource project {project}."),
        );
    }
    match publisher.as_str() {
        "google" => gemini::models(State(state), Path(model_and_action), uri, headers, body).await,
        "anthropic" => {
            let (model, action) = model_and_action
                .rsplit_once(':')
                .unwrap_or((&model_and_action, ""));
            let stream = match action {
                "rawPredict" => false,
                "streamRawPredict" => true,
                _ => {
                    return google_error(404, "NOT_FOUND", "Unknown method (mock).");
                }
            };
            let Some(mut parsed) = serde_json::from_slice::<Value>(&body).ok() else {
                return google_error(400, "INVALID_ARGUMENT", "Invalid JSON payload (mock).");
            };
            if parsed["anthropic_version"] != VERTEX_ANTHROPIC_VERSION
                || parsed.get("model").is_some()
                || (parsed["stream"] == true) != stream
            {
                state.stats.record(&headers, Some(parsed));
                return json_error(
                    400,
                    json!({"type": "error", "error": {"type": "invalid_request_error", "message": "vertex wants anthropic_version vertex-2023-10-16, no model field, and stream matching the method (mock)"}}),
                    None,
                );
            }
            // Answer as the Messages API would for the model in the path.
            if let Some(object) = parsed.as_object_mut() {
                object.remove("anthropic_version");
                object.insert("model".to_owned(), Value::String(model.to_owned()));
            }
            anthropic::messages(State(state), headers, Bytes::from(parsed.to_string())).await
        }
        _ => google_error(404, "NOT_FOUND", "Publisher model not found (mock)."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_values_decode() {
        assert_eq!(form_decode("urn%3Aietf%3Aparams"), "urn:ietf:params");
        assert_eq!(form_decode("a+b%2"), "a b%2");
        assert_eq!(
            form_field("grant_type=x%3Ay&assertion=a.b.c", "assertion").as_deref(),
            Some("a.b.c")
        );
    }

    #[test]
    fn assertions_are_checked() {
        let auth = VertexAuth::default();
        let aud = "http://127.0.0.1:9/token";
        let now = 1_700_000_000;
        let trusted = ServiceAccountKey::from_json(&service_account_json(aud)).unwrap();
        assert_eq!(
            check_assertion(&auth, &trusted.assertion(now).unwrap(), aud, now),
            Ok(())
        );
        // Expired, wrong audience.
        assert!(check_assertion(&auth, &trusted.assertion(now).unwrap(), aud, now + 3601).is_err());
        assert!(
            check_assertion(
                &auth,
                &trusted.assertion(now).unwrap(),
                "http://x/token",
                now
            )
            .is_err()
        );
        // Signed with a key the mock does not trust.
        let mut untrusted: Value = serde_json::from_str(&service_account_json(aud)).unwrap();
        untrusted["private_key"] = include_str!("testdata/vertex-untrusted-test-key.pem").into();
        let untrusted = ServiceAccountKey::from_json(&untrusted.to_string()).unwrap();
        assert_eq!(
            check_assertion(&auth, &untrusted.assertion(now).unwrap(), aud, now),
            Err("Invalid JWT Signature.")
        );
        assert!(check_assertion(&auth, "a.b", aud, now).is_err());
    }
}
