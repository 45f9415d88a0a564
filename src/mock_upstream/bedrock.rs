//! The mock's AWS Bedrock runtime: `POST /model/{modelId}/converse` (JSON) and
//! `/converse-stream` (`application/vnd.amazon.eventstream` frames with the real event
//! sequence: `messageStart`, `contentBlockStart`/`Delta`/`Stop`..., `messageStop`,
//! `metadata`), InvokeModel of Titan and Cohere embedding models (`/model/{modelId}/invoke`),
//! Bedrock's error shape (`x-amzn-ErrorType` and `{"message": ...}`).
//!
//! Every request must carry a valid AWS Signature Version 4: the mock recomputes the
//! signature from the request as received (its own implementation, on `ring`) with the
//! secret of the access key id named in the credential scope, and answers AWS's 403s
//! (`MissingAuthenticationTokenException`, `IncompleteSignatureException`,
//! `UnrecognizedClientException`, `InvalidSignatureException`, signature expired after
//! 15 minutes) otherwise. Known credentials start as [`MOCK_AWS_ACCESS_KEY_ID`] /
//! [`MOCK_AWS_SECRET_ACCESS_KEY`]; tests add more with `MockUpstream::add_aws_credentials`.

use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, SystemTime},
};

use axum::{
    Router,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, Method, Uri, header},
    response::{IntoResponse, Response},
    routing::post,
};
use serde_json::{Value, json};

use super::{
    MockState, ResponseGuard, Scenario, TOOL_ARGUMENTS, broken_json, count_tokens,
    inject_faults_in, paced_response, reply_for, split_chunks,
};
use crate::providers::{eventstream::encode_message, mock::text_embedding, sigv4::uri_encode};

/// The access key id the mock knows from the start (test credentials, not a real key).
pub const MOCK_AWS_ACCESS_KEY_ID: &str = "AKIDMOCKEXAMPLE";

/// The secret of [`MOCK_AWS_ACCESS_KEY_ID`] (test credentials, not a real key).
pub const MOCK_AWS_SECRET_ACCESS_KEY: &str = "mockSecretAccessKey/K7MDENG+bPxRfiCYEXAMPLEKEY";

/// How far a request's `x-amz-date` may be from the mock's clock (AWS allows 15 minutes).
const MAX_CLOCK_SKEW: Duration = Duration::from_secs(15 * 60);

/// Known credentials: access key id -> (secret, session token).
#[derive(Debug)]
pub(crate) struct AwsCredentialStore(Mutex<BTreeMap<String, (String, Option<String>)>>);

impl Default for AwsCredentialStore {
    fn default() -> Self {
        let mut known = BTreeMap::new();
        known.insert(
            MOCK_AWS_ACCESS_KEY_ID.to_owned(),
            (MOCK_AWS_SECRET_ACCESS_KEY.to_owned(), None),
        );
        Self(Mutex::new(known))
    }
}

impl AwsCredentialStore {
    /// Adds (or replaces) a credential set.
    pub fn add(&self, access_key_id: &str, secret: &str, session_token: Option<&str>) {
        if let Ok(mut known) = self.0.lock() {
            known.insert(
                access_key_id.to_owned(),
                (secret.to_owned(), session_token.map(str::to_owned)),
            );
        }
    }

    fn get(&self, access_key_id: &str) -> Option<(String, Option<String>)> {
        self.0.lock().ok()?.get(access_key_id).cloned()
    }
}

pub(super) fn routes() -> Router<MockState> {
    Router::new().route("/model/{model}/{action}", post(converse))
}

/// The access key id of a SigV4 `Authorization` header.
pub(super) fn access_key_id(authorization: &str) -> Option<&str> {
    let (_, rest) = authorization.split_once("Credential=")?;
    rest.split('/').next()
}

fn aws_error(status: u16, kind: &str, message: &str) -> Response {
    let mut response = (
        axum::http::StatusCode::from_u16(status)
            .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR),
        axum::Json(json!({"message": message})),
    )
        .into_response();
    if let Ok(v) = format!("{kind}:http://internal.amazon.com/coral/com.amazon.bedrock/").parse() {
        response.headers_mut().insert("x-amzn-errortype", v);
    }
    response
}

/// The error a scripted `status=N` answers with.
fn scripted_error(status: u16, retry_after: Option<u64>) -> Response {
    let (kind, message) = match status {
        400 => ("ValidationException", "Malformed input request (mock)"),
        403 => (
            "AccessDeniedException",
            "You don't have access to the model with the specified model ID. (mock)",
        ),
        404 => (
            "ResourceNotFoundException",
            "The provided model identifier is invalid. (mock)",
        ),
        408 => ("ModelTimeoutException", "Model timed out (mock)"),
        424 => ("ModelErrorException", "The model failed (mock)"),
        429 => (
            "ThrottlingException",
            "Too many requests, please wait before trying again.",
        ),
        503 => ("ServiceUnavailableException", "Service unavailable (mock)"),
        _ => ("InternalServerException", "Internal server error (mock)"),
    };
    let mut response = aws_error(status, kind, message);
    if let Some(secs) = retry_after
        && let Ok(v) = secs.to_string().parse()
    {
        response.headers_mut().insert(header::RETRY_AFTER, v);
    }
    response
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(data: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

fn hmac(key: &[u8], data: &str) -> Vec<u8> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    ring::hmac::sign(&key, data.as_bytes()).as_ref().to_vec()
}

/// Why a signature was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SignatureError {
    /// No `Authorization` header.
    Missing,
    /// The header or the signed headers are incomplete.
    Incomplete(&'static str),
    /// The access key id (or its session token) is unknown.
    UnknownKey,
    /// `x-amz-date` is too far from now.
    Expired,
    /// The signature does not match.
    Mismatch,
}

impl SignatureError {
    fn response(&self) -> Response {
        match self {
            SignatureError::Missing => aws_error(
                403,
                "MissingAuthenticationTokenException",
                "Missing Authentication Token",
            ),
            SignatureError::Incomplete(what) => aws_error(
                403,
                "IncompleteSignatureException",
                &format!("Authorization header requires {what}."),
            ),
            SignatureError::UnknownKey => aws_error(
                403,
                "UnrecognizedClientException",
                "The security token included in the request is invalid.",
            ),
            SignatureError::Expired => aws_error(
                403,
                "InvalidSignatureException",
                "Signature expired: the request date is more than 15 minutes from the server's time.",
            ),
            SignatureError::Mismatch => aws_error(
                403,
                "InvalidSignatureException",
                "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method. Consult the service documentation for details.",
            ),
        }
    }
}

/// The request parts a SigV4 signature covers.
pub(crate) struct SignedRequest<'a> {
    pub method: &'a str,
    /// The path exactly as received (percent-encoded).
    pub path: &'a str,
    pub query: &'a str,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
}

/// `20150830T123600Z` as a time.
fn parse_amz_date(value: &str) -> Option<SystemTime> {
    let b = value.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let rfc3339 = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &value[0..4],
        &value[4..6],
        &value[6..8],
        &value[9..11],
        &value[11..13],
        &value[13..15]
    );
    humantime::parse_rfc3339(&rfc3339).ok()
}

fn canonical_query(query: &str) -> String {
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (uri_encode(k, false), uri_encode(v, false))
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// Checks the SigV4 signature of `request` for `service` against the credentials in `store`
/// and the clock `now`; returns the access key id on success.
pub(crate) fn verify_signature(
    request: &SignedRequest<'_>,
    service: &str,
    store: &AwsCredentialStore,
    now: SystemTime,
) -> Result<String, SignatureError> {
    let header = |name: &str| {
        request
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let auth = header("authorization").ok_or(SignatureError::Missing)?;
    let rest = auth
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or(SignatureError::Incomplete("the AWS4-HMAC-SHA256 algorithm"))?;
    let mut credential = None;
    let mut signed_headers = None;
    let mut signature = None;
    for part in rest.split(',') {
        match part.trim().split_once('=') {
            Some(("Credential", v)) => credential = Some(v),
            Some(("SignedHeaders", v)) => signed_headers = Some(v),
            Some(("Signature", v)) => signature = Some(v),
            _ => {}
        }
    }
    let credential = credential.ok_or(SignatureError::Incomplete("a Credential"))?;
    let signed_headers = signed_headers.ok_or(SignatureError::Incomplete("SignedHeaders"))?;
    let signature = signature.ok_or(SignatureError::Incomplete("a Signature"))?;
    let scope: Vec<&str> = credential.split('/').collect();
    let [key_id, date, region, scope_service, "aws4_request"] = scope.as_slice() else {
        return Err(SignatureError::Incomplete("a well-formed credential scope"));
    };
    let names: Vec<&str> = signed_headers.split(';').collect();
    if !names.contains(&"host") || !names.contains(&"x-amz-date") {
        return Err(SignatureError::Incomplete(
            "host and x-amz-date to be signed",
        ));
    }
    let amz_date = header("x-amz-date").ok_or(SignatureError::Incomplete("an x-amz-date"))?;
    let time = parse_amz_date(amz_date).ok_or(SignatureError::Incomplete("a valid x-amz-date"))?;
    if !amz_date.starts_with(date) || *scope_service != service {
        return Err(SignatureError::Mismatch);
    }
    let skew = now
        .duration_since(time)
        .or_else(|_| time.duration_since(now))
        .unwrap_or_default();
    if skew > MAX_CLOCK_SKEW {
        return Err(SignatureError::Expired);
    }
    let (secret, token) = store.get(key_id).ok_or(SignatureError::UnknownKey)?;
    if let Some(token) = token
        && (header("x-amz-security-token") != Some(token.as_str())
            || !names.contains(&"x-amz-security-token"))
    {
        return Err(SignatureError::UnknownKey);
    }
    let mut canonical_headers = String::new();
    for name in &names {
        let values: Vec<String> = request
            .headers
            .get_all(*name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        if values.is_empty() {
            return Err(SignatureError::Incomplete(
                "every signed header to be present",
            ));
        }
        canonical_headers.push_str(&format!("{name}:{}\n", values.join(",")));
    }
    let canonical_request = format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        request.method,
        // Services other than S3 encode the (already encoded) path once more.
        uri_encode(request.path, true),
        canonical_query(request.query),
        canonical_headers,
        signed_headers,
        sha256_hex(request.body)
    );
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        sha256_hex(canonical_request.as_bytes())
    );
    let mut key = hmac(format!("AWS4{secret}").as_bytes(), date);
    for part in [*region, service, "aws4_request"] {
        key = hmac(&key, part);
    }
    if hex(&hmac(&key, &string_to_sign)) != signature {
        return Err(SignatureError::Mismatch);
    }
    Ok((*key_id).to_owned())
}

/// Records the request and checks its signature; `Err` holds the answer to send.
fn admit(
    state: &MockState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(Value, ResponseGuard), Box<Response>> {
    admit_with(state, method, uri, headers, body, "messages")
}

/// [`admit`] for a body that must have the array or string field `required`.
fn admit_with(
    state: &MockState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
    required: &str,
) -> Result<(Value, ResponseGuard), Box<Response>> {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    state.stats.record(headers, parsed.clone());
    let guard = ResponseGuard::new(state.stats.clone());
    let request = SignedRequest {
        method: method.as_str(),
        path: uri.path(),
        query: uri.query().unwrap_or_default(),
        headers,
        body,
    };
    if let Err(e) = verify_signature(&request, "bedrock", &state.aws, SystemTime::now()) {
        guard.complete();
        return Err(Box::new(e.response()));
    }
    if state.refuses(headers) {
        guard.complete();
        return Err(Box::new(SignatureError::UnknownKey.response()));
    }
    let Some(body) = parsed.filter(|b| b[required].is_array() || b[required].is_string()) else {
        guard.complete();
        return Err(Box::new(aws_error(
            400,
            "ValidationException",
            &format!("Malformed input request: {required} is required (mock)"),
        )));
    };
    Ok((body, guard))
}

fn block_text(block: &Value) -> Option<&str> {
    block["text"].as_str()
}

fn last_user_text(body: &Value) -> String {
    body["messages"]
        .as_array()
        .and_then(|ms| {
            ms.iter()
                .rev()
                .filter(|m| m["role"] == "user")
                .filter_map(|m| m["content"].as_array())
                .map(|c| {
                    c.iter()
                        .filter_map(block_text)
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .find(|t| !t.is_empty())
        })
        .unwrap_or_default()
}

fn input_tokens(body: &Value) -> u64 {
    let count = |v: &Value| -> u64 {
        v.as_array()
            .map(|blocks| blocks.iter().filter_map(block_text).map(count_tokens).sum())
            .unwrap_or(0)
    };
    let messages: u64 = body["messages"]
        .as_array()
        .map(|ms| ms.iter().map(|m| count(&m["content"])).sum())
        .unwrap_or(0);
    count(&body["system"]) + messages
}

/// Usage as Converse reports it: `inputTokens` excludes the cache reads.
fn usage(scenario: &Scenario, input: u64, output: u64) -> Value {
    let cached = scenario.cached.unwrap_or(0).min(input);
    let mut usage = json!({
        "inputTokens": input - cached,
        "outputTokens": output,
        "totalTokens": input + output,
    });
    if scenario.cached.is_some() {
        usage["cacheReadInputTokens"] = json!(cached);
        usage["cacheWriteInputTokens"] = json!(0);
    }
    usage
}

fn first_tool(body: &Value, scenario: &Scenario) -> Option<String> {
    scenario
        .tools
        .then(|| body["toolConfig"]["tools"][0]["toolSpec"]["name"].as_str())
        .flatten()
        .map(str::to_owned)
}

/// `converse` and `converse-stream`.
async fn converse(
    State(state): State<MockState>,
    Path((model, action)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let stream = match action.as_str() {
        "converse" => false,
        "converse-stream" => true,
        "invoke" => return invoke_embed(&state, &model, &method, &uri, &headers, &body).await,
        _ => return aws_error(404, "UnknownOperationException", "Unknown operation (mock)"),
    };
    let (body, guard) = match admit(&state, &method, &uri, &headers, &body) {
        Ok(admitted) => admitted,
        Err(response) => return *response,
    };
    let scenario = Scenario::parse(&model, &state.settings);
    scenario.wait().await;
    if let Some(status) = scenario.status {
        guard.complete();
        return scripted_error(status, scenario.retry_after);
    }
    if stream {
        return converse_stream(&scenario, &body, guard);
    }
    if scenario.malformed {
        guard.complete();
        return broken_json("{\"output\": {\"message\": {\"role\": \"assistant\", \"content\": [");
    }
    let reply = reply_for(&last_user_text(&body));
    let (content, stop_reason) = match first_tool(&body, &scenario) {
        Some(name) => (
            json!([{"toolUse": {
                "toolUseId": "tooluse_mock_1",
                "name": name,
                "input": serde_json::from_str::<Value>(TOOL_ARGUMENTS).unwrap_or_default()
            }}]),
            "tool_use",
        ),
        None => (json!([{"text": reply}]), "end_turn"),
    };
    let mut response = json!({
        "output": {"message": {"role": "assistant", "content": content}},
        "stopReason": stop_reason,
        "metrics": {"latencyMs": 1},
    });
    if !scenario.no_usage {
        response["usage"] = usage(&scenario, input_tokens(&body), count_tokens(&reply));
    }
    guard.complete();
    axum::Json(response).into_response()
}

/// InvokeModel of an embedding model, signature checked: Titan (`amazon.titan-embed-*`:
/// `{"inputText", "dimensions"}` -> `{"embedding", "inputTextTokenCount"}`) or Cohere
/// (`cohere.embed-*`: `{"texts", "input_type"}` -> `{"embeddings", "id", "response_type",
/// "texts"}`), with [`text_embedding`] vectors (Titan: `dimensions`, else 1024; Cohere: 1024).
async fn invoke_embed(
    state: &MockState,
    model: &str,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response {
    let cohere = model.contains("cohere.embed");
    let required = if cohere { "texts" } else { "inputText" };
    let (body, guard) = match admit_with(state, method, uri, headers, body, required) {
        Ok(admitted) => admitted,
        Err(response) => return *response,
    };
    let scenario = Scenario::parse(model, &state.settings);
    scenario.wait().await;
    if let Some(status) = scenario.status {
        guard.complete();
        return scripted_error(status, scenario.retry_after);
    }
    let response = if cohere {
        let texts: Vec<&str> = body["texts"]
            .as_array()
            .map(|t| t.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if texts.len() > 96 || body["input_type"].as_str().is_none() {
            guard.complete();
            return aws_error(400, "ValidationException", "Malformed input request (mock)");
        }
        let embeddings: Vec<Vec<f32>> = texts.iter().map(|t| text_embedding(t, 1024)).collect();
        json!({"embeddings": embeddings, "id": "mock-embed-id", "response_type": "embeddings_floats", "texts": texts})
    } else {
        let text = body["inputText"].as_str().unwrap_or_default();
        let dimensions = body["dimensions"]
            .as_u64()
            .and_then(|d| usize::try_from(d).ok())
            .unwrap_or(1024);
        let mut response = json!({"embedding": text_embedding(text, dimensions)});
        if !scenario.no_usage {
            response["inputTextTokenCount"] = json!(count_tokens(text));
        }
        response
    };
    guard.complete();
    axum::Json(response).into_response()
}

fn event(kind: &str, payload: &Value) -> Bytes {
    // Bedrock pads event payloads with a `p` field of varying length.
    let mut payload = payload.clone();
    payload["p"] = json!("abcdefghij");
    Bytes::from(encode_message(
        &[
            (":event-type", kind),
            (":content-type", "application/json"),
            (":message-type", "event"),
        ],
        payload.to_string(),
    ))
}

fn stream_events(scenario: &Scenario, reply: &str, tool: Option<&str>, input: u64) -> Vec<Bytes> {
    let mut events = vec![event("messageStart", &json!({"role": "assistant"}))];
    let stop_reason = match tool {
        Some(name) => {
            events.push(event(
                "contentBlockStart",
                &json!({"contentBlockIndex": 0, "start": {"toolUse": {"toolUseId": "tooluse_mock_1", "name": name}}}),
            ));
            for piece in split_chunks(TOOL_ARGUMENTS, scenario.chunks) {
                events.push(event(
                    "contentBlockDelta",
                    &json!({"contentBlockIndex": 0, "delta": {"toolUse": {"input": piece}}}),
                ));
            }
            "tool_use"
        }
        None => {
            for piece in split_chunks(reply, scenario.chunks) {
                events.push(event(
                    "contentBlockDelta",
                    &json!({"contentBlockIndex": 0, "delta": {"text": piece}}),
                ));
            }
            "end_turn"
        }
    };
    events.push(event("contentBlockStop", &json!({"contentBlockIndex": 0})));
    events.push(event("messageStop", &json!({"stopReason": stop_reason})));
    let mut metadata = json!({"metrics": {"latencyMs": 1}});
    if !scenario.no_usage {
        metadata["usage"] = usage(scenario, input, count_tokens(reply));
    }
    events.push(event("metadata", &metadata));
    events
}

fn converse_stream(scenario: &Scenario, body: &Value, guard: ResponseGuard) -> Response {
    let reply = reply_for(&last_user_text(body));
    let tool = first_tool(body, scenario);
    let mut events = stream_events(scenario, &reply, tool.as_deref(), input_tokens(body));
    let mut terminal = event("messageStop", &json!({"stopReason": "end_turn"})).to_vec();
    terminal.extend_from_slice(&event("metadata", &json!({"metrics": {"latencyMs": 1}})));
    inject_faults_in(
        &mut events,
        scenario,
        // A well-framed event whose payload is not JSON.
        Bytes::from(encode_message(
            &[
                (":event-type", "contentBlockDelta"),
                (":content-type", "application/json"),
                (":message-type", "event"),
            ],
            "{\"contentBlockIndex\": 0, \"delta\": {\"text\": \"x\"",
        )),
        Some(Bytes::from(terminal)),
        Bytes::from(encode_message(
            &[
                (":exception-type", "internalServerException"),
                (":content-type", "application/json"),
                (":message-type", "exception"),
            ],
            "{\"message\":\"The server encountered an internal error (mock)\"}",
        )),
    );
    // messageStart, then the first delta (or the tool call's contentBlockStart).
    paced_response(
        events,
        "application/vnd.amazon.eventstream",
        1,
        scenario,
        guard,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked example of AWS's SigV4 documentation (IAM `ListUsers`, 2015-08-30).
    #[test]
    fn verifies_the_documented_example() {
        let store = AwsCredentialStore::default();
        store.add(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            None,
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            "content-type",
            "application/x-www-form-urlencoded; charset=utf-8"
                .parse()
                .unwrap(),
        );
        headers.insert("host", "iam.amazonaws.com".parse().unwrap());
        headers.insert("x-amz-date", "20150830T123600Z".parse().unwrap());
        headers.insert(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"
                .parse()
                .unwrap(),
        );
        let request = SignedRequest {
            method: "GET",
            path: "/",
            query: "Action=ListUsers&Version=2010-05-08",
            headers: &headers,
            body: b"",
        };
        let then = parse_amz_date("20150830T123600Z").unwrap();
        assert_eq!(
            verify_signature(&request, "iam", &store, then),
            Ok("AKIDEXAMPLE".to_owned())
        );
        // Too late, a wrong service, an unknown key.
        assert_eq!(
            verify_signature(&request, "iam", &store, then + Duration::from_secs(16 * 60)),
            Err(SignatureError::Expired)
        );
        assert_eq!(
            verify_signature(&request, "bedrock", &store, then),
            Err(SignatureError::Mismatch)
        );
        let other = AwsCredentialStore::default();
        assert_eq!(
            verify_signature(&request, "iam", &other, then),
            Err(SignatureError::UnknownKey)
        );
    }

    /// What the gateway signs (with `aws-sigv4`) the mock accepts, and nothing else.
    #[test]
    fn accepts_the_gateways_signature_and_refuses_tampering() {
        use crate::providers::sigv4::{AwsCredentials, sign_request};
        let store = AwsCredentialStore::default();
        let creds =
            AwsCredentials::new(MOCK_AWS_ACCESS_KEY_ID, MOCK_AWS_SECRET_ACCESS_KEY, None).unwrap();
        let url = "http://127.0.0.1:4000/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse";
        let body = br#"{"messages":[]}"#;
        let now = SystemTime::now();
        let signed = sign_request(
            &creds,
            "us-east-1",
            "bedrock",
            url,
            &[("content-type", "application/json")],
            body,
            now,
        )
        .unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("host", "127.0.0.1:4000".parse().unwrap());
        headers.insert("content-type", "application/json".parse().unwrap());
        for (name, value) in signed {
            headers.insert(name, value);
        }
        fn request<'a>(headers: &'a HeaderMap, body: &'a [u8], path: &'a str) -> SignedRequest<'a> {
            SignedRequest {
                method: "POST",
                path,
                query: "",
                headers,
                body,
            }
        }
        let path = "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse";
        assert!(verify_signature(&request(&headers, body, path), "bedrock", &store, now).is_ok());
        assert_eq!(
            verify_signature(&request(&headers, b"{}", path), "bedrock", &store, now),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_signature(
                &request(&headers, body, "/model/other/converse"),
                "bedrock",
                &store,
                now
            ),
            Err(SignatureError::Mismatch)
        );
        // The same request signed with another secret.
        let wrong = AwsCredentials::new(MOCK_AWS_ACCESS_KEY_ID, "not-the-secret", None).unwrap();
        let signed = sign_request(
            &wrong,
            "us-east-1",
            "bedrock",
            url,
            &[("content-type", "application/json")],
            body,
            now,
        )
        .unwrap();
        for (name, value) in signed {
            headers.insert(name, value);
        }
        assert_eq!(
            verify_signature(&request(&headers, body, path), "bedrock", &store, now),
            Err(SignatureError::Mismatch)
        );
        headers.remove("authorization");
        assert_eq!(
            verify_signature(&request(&headers, body, path), "bedrock", &store, now),
            Err(SignatureError::Missing)
        );
    }
}
