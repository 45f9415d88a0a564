//! Authorization by construction: [`METHODS`] says, for every RPC the server answers, what
//! credential it requires, and [`AuthzLayer`] enforces it before any handler runs.
//!
//! The layer looks the request's path up in the table; a path that is not there is refused
//! with `UNIMPLEMENTED` without reaching a service (fail closed: an RPC added to a service but
//! not to the table cannot be called, and the descriptor-walking test fails). The verified
//! caller travels to the handlers as a [`Principal`] in the request extensions, so handlers
//! never look at credentials themselves.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use futures_util::future::{Either, Ready, ready};
use tower::{Layer, Service};

use super::{
    access::Access,
    meter::{CallMeter, MeterConfig, Outcome},
    request_id::RequestId,
};
use crate::{auth::Caller, error::GatewayError};

/// What an RPC requires of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requirement {
    /// Nothing: health checks and reflection (the API's schema is public). A credential that
    /// is sent is ignored.
    None,
    /// The data plane: a `chat` key when keys are required (`auth.require_keys`, or a
    /// non-loopback listen address); a key that is sent is verified either way.
    Chat,
    /// A `usage-read` or `admin` key, or the admin token.
    UsageRead,
    /// An `admin` key, or the admin token.
    Admin,
}

impl Requirement {
    /// The name used in the README's table and in logs.
    pub fn name(self) -> &'static str {
        match self {
            Requirement::None => "none",
            Requirement::Chat => "chat key",
            Requirement::UsageRead => "usage-read",
            Requirement::Admin => "admin",
        }
    }
}

/// One RPC: what it requires of its caller and what request it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Method {
    /// The HTTP/2 path, `/package.Service/Method`.
    pub path: &'static str,
    /// What the caller needs.
    pub requires: Requirement,
    /// The name calls are metered under (usage ledger `rpc`), for RPCs the gateway meters.
    pub metered_as: Option<&'static str>,
    /// The largest request message accepted (see [`super::framing`]).
    pub max_request_bytes: usize,
    /// Whether the client sends a stream of messages (otherwise exactly one).
    pub streaming_request: bool,
}

/// The request size limit of the services tonic builds for us (health, reflection): tonic's
/// default.
pub const LIBRARY_MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

const fn rpc(path: &'static str, requires: Requirement) -> Method {
    Method {
        path,
        requires,
        metered_as: None,
        max_request_bytes: super::MAX_REQUEST_BYTES,
        streaming_request: false,
    }
}

impl Method {
    const fn metered(mut self, name: &'static str) -> Self {
        self.metered_as = Some(name);
        self
    }

    const fn library(mut self) -> Self {
        self.max_request_bytes = LIBRARY_MAX_REQUEST_BYTES;
        self
    }

    const fn streaming_request(mut self) -> Self {
        self.streaming_request = true;
        self
    }
}

macro_rules! gateway {
    ($method:literal) => {
        concat!("/llmgateway.v1.LlmGateway/", $method)
    };
}

macro_rules! admin {
    ($method:literal) => {
        concat!("/llmgateway.v1.LlmGatewayAdmin/", $method)
    };
}

/// Every RPC the gateway serves, with what it requires. Keep in step with the README's
/// "Authorization" table; a test checks this table against the served descriptor sets.
pub const METHODS: &[Method] = &[
    rpc(gateway!("Chat"), Requirement::Chat).metered("Chat"),
    rpc(gateway!("ChatStream"), Requirement::Chat).metered("ChatStream"),
    rpc(gateway!("ListModels"), Requirement::Chat),
    rpc(gateway!("Embed"), Requirement::Chat).metered("Embed"),
    rpc(gateway!("CreateBatch"), Requirement::Chat),
    rpc(gateway!("GetBatch"), Requirement::Chat),
    rpc(gateway!("StreamBatchResults"), Requirement::Chat),
    rpc(gateway!("CancelBatch"), Requirement::Chat),
    rpc(gateway!("ListBatches"), Requirement::Chat),
    rpc(admin!("CreatePolicy"), Requirement::Admin),
    rpc(admin!("UpdatePolicy"), Requirement::Admin),
    rpc(admin!("GetPolicy"), Requirement::Admin),
    rpc(admin!("ListPolicies"), Requirement::Admin),
    rpc(admin!("DeletePolicy"), Requirement::Admin),
    rpc(admin!("ValidatePolicy"), Requirement::Admin),
    rpc(admin!("ExplainRoute"), Requirement::Admin),
    rpc(admin!("ListProviders"), Requirement::Admin),
    rpc(admin!("InvalidateCache"), Requirement::Admin),
    rpc(admin!("GetUsage"), Requirement::UsageRead),
    rpc(admin!("ExportUsage"), Requirement::UsageRead),
    rpc(admin!("GetExperiment"), Requirement::UsageRead),
    rpc(admin!("GetUsageContent"), Requirement::Admin),
    rpc(admin!("CreateKey"), Requirement::Admin),
    rpc(admin!("ListKeys"), Requirement::Admin),
    rpc(admin!("GetKey"), Requirement::Admin),
    rpc(admin!("UpdateKey"), Requirement::Admin),
    rpc(admin!("RevokeKey"), Requirement::Admin),
    rpc(admin!("ReloadConfig"), Requirement::Admin),
    rpc(admin!("ListAuditLog"), Requirement::Admin),
    rpc(admin!("GetRollout"), Requirement::Admin),
    rpc(admin!("PauseRollout"), Requirement::Admin),
    rpc(admin!("ResumeRollout"), Requirement::Admin),
    rpc(admin!("AbortRollout"), Requirement::Admin),
    rpc("/grpc.health.v1.Health/Check", Requirement::None).library(),
    rpc("/grpc.health.v1.Health/Watch", Requirement::None).library(),
    rpc(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        Requirement::None,
    )
    .library()
    .streaming_request(),
    rpc(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        Requirement::None,
    )
    .library()
    .streaming_request(),
];

/// The table entry for a request path.
pub fn method(path: &str) -> Option<&'static Method> {
    METHODS.iter().find(|m| m.path == path)
}

/// Who is calling, as the layer verified it; in the request extensions of every call that
/// reaches a handler.
#[derive(Debug, Clone)]
pub enum Principal {
    /// No credential (where none is required), or an RPC that requires none.
    Anonymous,
    /// A verified gateway key that has the required scope.
    Key(Caller),
    /// The break-glass admin token.
    AdminToken,
}

impl Principal {
    /// Who the caller is, for the audit log: `admin-token`, `key:NAME` or `anonymous`
    /// (never a secret).
    pub fn actor(&self) -> String {
        match self {
            Principal::Anonymous => "anonymous".to_owned(),
            Principal::Key(caller) => format!("key:{}", caller.name()),
            Principal::AdminToken => "admin-token".to_owned(),
        }
    }

    /// The verified key, if the caller used one.
    pub fn key(&self) -> Option<&Caller> {
        match self {
            Principal::Key(caller) => Some(caller),
            Principal::Anonymous | Principal::AdminToken => None,
        }
    }
}

/// The principal of a call that passed the layer. A handler reached without one was served
/// without [`AuthzLayer`]: a bug, refused rather than served.
pub fn principal(extensions: &tonic::Extensions) -> Result<&Principal, GatewayError> {
    extensions.get::<Principal>().ok_or_else(|| {
        GatewayError::Internal("the call reached a handler without authorization".to_owned())
    })
}

/// Enforces [`METHODS`]; see the module docs.
#[derive(Clone)]
pub struct AuthzLayer {
    access: Arc<Access>,
    meter: MeterConfig,
}

impl AuthzLayer {
    /// Checks calls with `access`; refused metered calls are accounted with `meter`.
    pub fn new(access: Arc<Access>, meter: MeterConfig) -> Self {
        Self { access, meter }
    }
}

impl<S> Layer<S> for AuthzLayer {
    type Service = Authz<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authz {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`AuthzLayer`].
#[derive(Clone)]
pub struct Authz<S> {
    inner: S,
    layer: AuthzLayer,
}

impl<S, B> Service<http::Request<B>> for Authz<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let path = req.uri().path();
        let Some(method) = method(path) else {
            tracing::debug!(path, "refused a call to an unknown method");
            let status = tonic::Status::unimplemented(format!("unknown method `{path}`"));
            return Either::Right(ready(Ok(status.into_http())));
        };
        match self.layer.access.authorize(method.requires, req.headers()) {
            Ok(principal) => {
                req.extensions_mut().insert(principal);
                Either::Left(self.inner.call(req))
            }
            Err(err) => {
                err.log("call refused");
                if let Some(rpc) = method.metered_as {
                    let id = req
                        .extensions()
                        .get::<RequestId>()
                        .map_or_else(String::new, |id| id.as_str().to_owned());
                    CallMeter::start(&self.layer.meter, rpc, id).finish(Outcome::failed(&err));
                }
                Either::Right(ready(Ok(err.into_status().into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_unique_and_well_formed() {
        let mut seen = std::collections::HashSet::new();
        for m in METHODS {
            assert!(seen.insert(m.path), "{} twice", m.path);
            let mut parts = m.path.split('/');
            assert_eq!(parts.next(), Some(""), "{}", m.path);
            assert!(parts.next().is_some_and(|s| s.contains('.')), "{}", m.path);
            assert!(parts.next().is_some_and(|s| !s.is_empty()), "{}", m.path);
            assert_eq!(parts.next(), None, "{}", m.path);
        }
        assert_eq!(method("/llmgateway.v1.LlmGateway/Nope"), None);
        assert_eq!(
            method("/llmgateway.v1.LlmGatewayAdmin/ReloadConfig").map(|m| m.requires),
            Some(Requirement::Admin)
        );
    }
}
