//! The console: pages served at `/console` on the listener that carries the Admin API, and
//! the JSON mapping of the API ([`api`]) they call, which `curl` users can call too.
//!
//! Both speak HTTP/1.1 on that listener: [`super::conn::incoming`] hands connections that
//! start an HTTP/1.x request (instead of the HTTP/2 preface) to this router, so gRPC and the
//! console share one port.
//!
//! Credentials are the Admin API's: the admin token or an `admin` / `usage-read` key. A
//! JSON call presents one as `authorization: Bearer ...`; the console's login exchanges it for
//! a random session id in an `HttpOnly`, `SameSite=Strict` cookie, so the page never holds the
//! secret (the secret stays in this process's memory, for the session's lifetime). Calls
//! authenticated by the cookie must send `content-type: application/json`, which a cross-site
//! form cannot (with `SameSite=Strict`, the CSRF defence).

pub mod api;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::{Path, State},
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
};
use http::{HeaderMap, HeaderValue, StatusCode, header};

use super::{access::Access, authz::Requirement};

/// How long a console session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);

/// Sessions kept at most; the oldest go first.
const MAX_SESSIONS: usize = 1024;

/// The session cookie.
const COOKIE: &str = "lgw_console";

const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/console.js");
const STYLE: &str = include_str!("assets/console.css");

struct Session {
    secret: String,
    expires: Instant,
}

/// What the console's handlers share.
#[derive(Clone)]
pub struct Console {
    grpc: api::Grpc,
    access: Arc<Access>,
    sessions: Arc<Mutex<HashMap<String, Session>>>,
}

impl Console {
    /// A console calling `grpc` (the in-process, layered gRPC services) and checking logins
    /// with `access`.
    pub fn new(grpc: api::Grpc, access: Arc<Access>) -> Self {
        Self {
            grpc,
            access,
            sessions: Arc::default(),
        }
    }

    /// The routes: the pages, the login, and the JSON mapping.
    pub fn router(self) -> Router {
        Router::new()
            .route("/", get(|| async { Redirect::to("/console") }))
            .route("/console", get(page))
            .route("/console/", get(page))
            .route("/console/console.js", get(script))
            .route("/console/console.css", get(style))
            .route("/console/login", post(login))
            .route("/console/logout", post(logout))
            .route("/{service}/{method}", post(rpc))
            .fallback(|| async {
                api::error_response(&tonic::Status::not_found(
                    "no such page: the console is at /console and the JSON API at POST /<package>.<Service>/<Method>",
                ))
            })
            .with_state(self)
    }

    fn session_secret(&self, headers: &HeaderMap) -> Option<String> {
        let id = cookie(headers, COOKIE)?;
        let mut sessions = self
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match sessions.get(id) {
            Some(s) if s.expires > Instant::now() => Some(s.secret.clone()),
            Some(_) => {
                sessions.remove(id);
                None
            }
            None => None,
        }
    }
}

/// The value of cookie `name`.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find_map(|(k, v)| (k == name).then_some(v))
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            // Nothing is loaded from anywhere but this listener.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; style-src 'self'; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

async fn page() -> Response {
    asset(INDEX, "text/html; charset=utf-8")
}

async fn script() -> Response {
    asset(SCRIPT, "text/javascript; charset=utf-8")
}

async fn style() -> Response {
    asset(STYLE, "text/css; charset=utf-8")
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    token: String,
}

fn json_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::json!({"code": code, "message": message}).to_string(),
    )
        .into_response()
}

async fn login(State(console): State<Console>, body: Bytes) -> Response {
    let Ok(Login { token }) = serde_json::from_slice::<Login>(&body) else {
        return json_error(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            "the body must be {\"token\": \"<admin token or admin key>\"}",
        );
    };
    let mut headers = HeaderMap::new();
    let Ok(bearer) = HeaderValue::from_str(&format!("Bearer {}", token.trim())) else {
        return json_error(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "the token has characters no token has",
        );
    };
    headers.insert(header::AUTHORIZATION, bearer);
    // The weakest console credential; each API call is checked again for its own scope.
    if let Err(err) = console.access.authorize(Requirement::UsageRead, &headers) {
        let status = err.into_status();
        return api::error_response(&status);
    }
    let mut raw = [0u8; 32];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw).is_err() {
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "no randomness for a session id; try again",
        );
    }
    let id = crate::auth::hex(&raw);
    {
        let mut sessions = console
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        sessions.retain(|_, s| s.expires > now);
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
        {
            sessions.remove(&oldest);
        }
        sessions.insert(
            id.clone(),
            Session {
                secret: token.trim().to_owned(),
                expires: now + SESSION_TTL,
            },
        );
    }
    let cookie = format!(
        "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        SESSION_TTL.as_secs()
    );
    (
        [
            (header::SET_COOKIE, cookie),
            (header::CONTENT_TYPE, "application/json".to_owned()),
        ],
        "{}",
    )
        .into_response()
}

async fn logout(State(console): State<Console>, headers: HeaderMap) -> Response {
    if let Some(id) = cookie(&headers, COOKIE) {
        console
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(id);
    }
    (
        [
            (
                header::SET_COOKIE,
                format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
            ),
            (header::CONTENT_TYPE, "application/json".to_owned()),
        ],
        "{}",
    )
        .into_response()
}

async fn rpc(
    State(console): State<Console>,
    Path((service, method)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(descriptor) = api::method(&service, &method) else {
        return api::error_response(&tonic::Status::unimplemented(format!(
            "no method `{service}/{method}`: the JSON API maps {}",
            api::SERVICES.join(" and ")
        )));
    };
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json {
        return api::error_response(&tonic::Status::invalid_argument(
            "send the request message as JSON with `content-type: application/json`",
        ));
    }
    let authorization = match headers.get(header::AUTHORIZATION) {
        Some(v) => Some(v.clone()),
        // The session's admin credential is for the Admin API only: data-plane calls (the
        // playground's) go as the chat key the caller sends, or as no one.
        None if service == api::SERVICES[0] => console
            .session_secret(&headers)
            .and_then(|s| HeaderValue::from_str(&format!("Bearer {s}")).ok()),
        None => None,
    };
    api::call(
        console.grpc.clone(),
        descriptor,
        authorization,
        &headers,
        body,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; lgw_console=abc; b=2"),
        );
        assert_eq!(cookie(&h, COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "c"), None);
    }
}
