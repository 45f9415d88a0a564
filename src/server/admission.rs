//! Overload protection at the front: a bound on chat calls in flight, globally and per
//! gateway key, with a short admission queue (`[admission]`, [`AdmissionSettings`]).
//!
//! - A call takes a slot before any work (for gRPC right after authorization, before its
//!   message is decoded; for the HTTP front before its body is read) and holds it until its
//!   response ends (the last message of a stream).
//! - With every slot taken, a call may wait in the queue (at most `queue` calls, each at most
//!   `queue_timeout`); past that it is refused at once with `RESOURCE_EXHAUSTED`
//!   (`IN_FLIGHT_LIMIT`, a `QuotaFailure` naming `gateway` or `key:NAME`, and `RetryInfo`),
//!   a status and never a transport error. Admitted calls run as before, so their latency
//!   stays flat however many are refused.
//! - A key at `max_in_flight_per_key` is refused at once (no queue): one key cannot take
//!   every slot.
//! - Per connection, the gRPC listeners announce `max_concurrent_streams` in their HTTP/2
//!   SETTINGS; clients queue streams beyond it on their side.
//!
//! Refusals are counted in `llm_gateway_limited_calls_total{reason="IN_FLIGHT_LIMIT"}` and,
//! as any failed call, in `llm_gateway_calls_total` and the usage ledger.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use super::settings::AdmissionSettings;
use super::{
    authz::{self, Principal},
    meter::{CallMeter, MeterConfig, Outcome},
    request_id::RequestId,
};
use crate::error::GatewayError;

/// The reason of a refusal.
pub const REASON: &str = "IN_FLIGHT_LIMIT";

/// The calls in flight and the bounds on them.
#[derive(Debug)]
pub struct Admission {
    settings: AdmissionSettings,
    slots: Option<Arc<Semaphore>>,
    queued: AtomicUsize,
    per_key: Mutex<HashMap<String, usize>>,
}

/// A call's place; dropping it frees the slot.
#[derive(Debug)]
pub struct Permit {
    _slot: Option<OwnedSemaphorePermit>,
    key: Option<(Arc<Admission>, String)>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some((admission, key)) = self.key.take() {
            let mut per_key = admission.lock_keys();
            if let Some(n) = per_key.get_mut(&key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    per_key.remove(&key);
                }
            }
        }
    }
}

/// Leaves the queue count when dropped (also when the waiting call is cancelled).
struct Queued<'a>(&'a AtomicUsize);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Admission {
    /// Bounds from `settings`.
    pub fn new(settings: AdmissionSettings) -> Arc<Self> {
        Arc::new(Self {
            slots: (settings.max_in_flight > 0)
                .then(|| Arc::new(Semaphore::new(settings.max_in_flight))),
            settings,
            queued: AtomicUsize::new(0),
            per_key: Mutex::default(),
        })
    }

    fn lock_keys(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.per_key
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn refused(&self, subject: String, message: &str) -> GatewayError {
        metrics::counter!(crate::telemetry::names::LIMITED, "reason" => REASON).increment(1);
        GatewayError::ResourceExhausted {
            reason: REASON,
            subject,
            message: message.to_owned(),
            retry_after: Some(self.settings.retry_after),
        }
    }

    /// Admits a call of `key` (the gateway key's name, when the caller used one): at once
    /// when a slot is free, after a short wait in the queue when there is room, else refused.
    pub async fn admit(self: &Arc<Self>, key: Option<&str>) -> Result<Permit, GatewayError> {
        let key = match key {
            Some(name) if self.settings.max_in_flight_per_key > 0 => {
                let mut per_key = self.lock_keys();
                let n = per_key.entry(name.to_owned()).or_default();
                if *n >= self.settings.max_in_flight_per_key {
                    drop(per_key);
                    return Err(self.refused(
                        format!("key:{name}"),
                        "this key has too many calls in flight; retry shortly",
                    ));
                }
                *n += 1;
                Some((self.clone(), name.to_owned()))
            }
            _ => None,
        };
        // From here on, dropping `permit` gives the key's count back.
        let mut permit = Permit { _slot: None, key };
        let Some(slots) = &self.slots else {
            return Ok(permit);
        };
        if let Ok(slot) = slots.clone().try_acquire_owned() {
            permit._slot = Some(slot);
            return Ok(permit);
        }
        let overloaded = || {
            self.refused(
                "gateway".to_owned(),
                "the gateway has too many calls in flight; retry shortly",
            )
        };
        if self.queued.fetch_add(1, Ordering::SeqCst) >= self.settings.queue {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(overloaded());
        }
        let _queued = Queued(&self.queued);
        match tokio::time::timeout(self.settings.queue_timeout, slots.clone().acquire_owned()).await
        {
            Ok(Ok(slot)) => {
                permit._slot = Some(slot);
                Ok(permit)
            }
            Ok(Err(_)) | Err(_) => Err(overloaded()),
        }
    }

    /// Calls in flight now (admitted, not yet finished).
    pub fn in_flight(&self) -> usize {
        self.slots.as_ref().map_or(0, |s| {
            self.settings
                .max_in_flight
                .saturating_sub(s.available_permits())
        })
    }
}

/// Whether a gRPC path is a chat call the bound applies to (the data plane but
/// `ListModels`).
fn bounded(path: &str) -> bool {
    path.strip_prefix("/llmgateway.v1.LlmGateway/")
        .is_some_and(|rpc| rpc != "ListModels")
}

/// The gRPC side: a layer inside [`authz::AuthzLayer`] (it reads the [`Principal`]).
#[derive(Clone)]
pub struct AdmissionLayer {
    admission: Arc<Admission>,
    meter: MeterConfig,
}

impl AdmissionLayer {
    /// Admits gRPC chat calls with `admission`; refusals are accounted with `meter`.
    pub fn new(admission: Arc<Admission>, meter: MeterConfig) -> Self {
        Self { admission, meter }
    }
}

impl<S> tower::Layer<S> for AdmissionLayer {
    type Service = AdmissionService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AdmissionService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`AdmissionLayer`].
#[derive(Clone)]
pub struct AdmissionService<S> {
    inner: S,
    layer: AdmissionLayer,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for AdmissionService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if !bounded(req.uri().path()) {
            return Box::pin(self.inner.call(req));
        }
        // The service that was polled ready serves this call; a fresh clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let key = req
                .extensions()
                .get::<Principal>()
                .and_then(Principal::key)
                .map(|caller| caller.name().to_owned());
            let permit = match layer.admission.admit(key.as_deref()).await {
                Ok(permit) => permit,
                Err(err) => {
                    err.log("call refused");
                    if let Some(rpc) = authz::method(req.uri().path()).and_then(|m| m.metered_as) {
                        let id = req
                            .extensions()
                            .get::<RequestId>()
                            .map_or_else(String::new, |id| id.as_str().to_owned());
                        let mut meter = CallMeter::start(&layer.meter, rpc, id);
                        if let Some(key) = &key {
                            meter.set_key(key);
                        }
                        meter.finish(Outcome::failed(&err));
                    }
                    return Ok(err.into_status().into_http());
                }
            };
            let response = inner.call(req).await?;
            Ok(response.map(|body| {
                tonic::body::Body::new(Held {
                    body,
                    _permit: permit,
                })
            }))
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that holds its call's admission permit until it ends.
    pub struct Held<B> {
        #[pin]
        body: B,
        _permit: Permit,
    }
}

impl<B> Held<B> {
    /// `body`, holding `permit` while it is sent.
    pub fn new(body: B, permit: Permit) -> Self {
        Self {
            body,
            _permit: permit,
        }
    }
}

impl<B> HttpBody for Held<B>
where
    B: HttpBody<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn admission(max: usize, per_key: usize, queue: usize) -> Arc<Admission> {
        Admission::new(AdmissionSettings {
            max_in_flight: max,
            max_in_flight_per_key: per_key,
            queue,
            queue_timeout: Duration::from_millis(20),
            ..AdmissionSettings::default()
        })
    }

    fn subject(err: &GatewayError) -> String {
        match err {
            GatewayError::ResourceExhausted {
                reason,
                subject,
                retry_after,
                ..
            } => {
                assert_eq!(*reason, REASON);
                assert_eq!(*retry_after, Some(Duration::from_secs(1)));
                subject.clone()
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_bound_and_the_queue_calls_are_refused_at_once() {
        let a = admission(2, 0, 1);
        let first = a.admit(None).await.unwrap();
        let _second = a.admit(None).await.unwrap();
        assert_eq!(a.in_flight(), 2);
        // One may queue; it gets the slot the first frees.
        let queued = {
            let a = a.clone();
            tokio::spawn(async move { a.admit(None).await.map(|_| ()) })
        };
        tokio::task::yield_now().await;
        // The queue is full: refused without waiting.
        let err = a.admit(None).await.unwrap_err();
        assert_eq!(subject(&err), "gateway");
        drop(first);
        queued.await.unwrap().unwrap();
        let _third = a.admit(None).await.unwrap();
        // A queued call that gets no slot within the timeout is refused.
        let err = a.admit(None).await.unwrap_err();
        assert_eq!(subject(&err), "gateway");
    }

    #[tokio::test(start_paused = true)]
    async fn one_key_cannot_take_every_slot() {
        let a = admission(10, 1, 0);
        let held = a.admit(Some("k")).await.unwrap();
        let err = a.admit(Some("k")).await.unwrap_err();
        assert_eq!(subject(&err), "key:k");
        let _other = a.admit(Some("other")).await.unwrap();
        drop(held);
        let _again = a.admit(Some("k")).await.unwrap();
        assert_eq!(a.in_flight(), 2);
        // Unbounded admission admits everything.
        let open = admission(0, 0, 0);
        let _permits: Vec<Permit> =
            futures_util::future::join_all((0..100).map(|_| open.admit(None)))
                .await
                .into_iter()
                .map(Result::unwrap)
                .collect();
    }

    #[test]
    fn only_chat_calls_are_bounded() {
        assert!(bounded("/llmgateway.v1.LlmGateway/Chat"));
        assert!(bounded("/llmgateway.v1.LlmGateway/ChatStream"));
        assert!(!bounded("/llmgateway.v1.LlmGateway/ListModels"));
        assert!(!bounded("/llmgateway.v1.LlmGatewayAdmin/ListKeys"));
        assert!(!bounded("/grpc.health.v1.Health/Check"));
    }
}
