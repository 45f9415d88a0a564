//! Provider rest state shared by replicas: when one replica rests a target after a rate
//! limit (429, Retry-After, overload), every replica rests it for the same time.
//!
//! A rest is published twice: a key `P:rest:PROVIDER/MODEL` holding `PROVIDER\tMODEL` with
//! the rest as its expiry (`PX`), and a message on the channel `P:rests`
//! (`REPLICA\tPROVIDER\tMODEL\tREST_MS`). Each replica subscribes to the channel and rests
//! the target on every message from another replica; after each (re)connect it reads the
//! live rest keys (`SCAN`, `PTTL`), so a rest published while it was disconnected is not
//! missed. Publishing is off the call path (a queue and a background task); when Redis is
//! unreachable, rests stay per replica until it answers again.

use std::{sync::Arc, time::Duration};

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Shared, SharedError};

/// Applies a peer's rest to a target: provider, model, rest.
pub type Apply = Arc<dyn Fn(&str, &str, Duration) + Send + Sync>;

struct Rest {
    provider: String,
    model: String,
    rest: Duration,
}

/// The rest publisher and subscriber of one replica.
pub struct Rests {
    shared: Arc<Shared>,
    channel: String,
    key_prefix: String,
    queue: mpsc::UnboundedSender<Rest>,
    receiver: std::sync::Mutex<Option<mpsc::UnboundedReceiver<Rest>>>,
}

impl std::fmt::Debug for Rests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rests")
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

/// Reconnect delay of the subscriber after a failure.
const RESUBSCRIBE_DELAY: Duration = Duration::from_millis(500);

impl Rests {
    /// Rests over `shared` (run [`Rests::run`] for them to flow).
    pub fn new(shared: Arc<Shared>) -> Arc<Self> {
        let (queue, receiver) = mpsc::unbounded_channel();
        Arc::new(Self {
            channel: shared.key("rests"),
            key_prefix: shared.key("rest:"),
            shared,
            queue,
            receiver: std::sync::Mutex::new(Some(receiver)),
        })
    }

    /// Queues a rest of this replica for publication (never blocks).
    pub fn publish(&self, provider: &str, model: &str, rest: Duration) {
        let _ = self.queue.send(Rest {
            provider: provider.to_owned(),
            model: model.to_owned(),
            rest,
        });
    }

    /// Publishes this replica's rests and applies the others' with `apply`, until `stop`.
    pub async fn run(self: Arc<Self>, apply: Apply, stop: CancellationToken) {
        let receiver = self
            .receiver
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let Some(receiver) = receiver else {
            return;
        };
        tokio::join!(
            self.publisher(receiver, stop.clone()),
            self.subscriber(apply, stop)
        );
    }

    async fn publisher(
        &self,
        mut receiver: mpsc::UnboundedReceiver<Rest>,
        stop: CancellationToken,
    ) {
        loop {
            let rest = tokio::select! {
                rest = receiver.recv() => rest,
                () = stop.cancelled() => None,
            };
            let Some(rest) = rest else { return };
            let ms = u64::try_from(rest.rest.as_millis())
                .unwrap_or(u64::MAX)
                .max(1);
            let key = format!("{}{}/{}", self.key_prefix, rest.provider, rest.model);
            let message = format!(
                "{}\t{}\t{}\t{ms}",
                self.shared.replica_id(),
                rest.provider,
                rest.model
            );
            let value = format!("{}\t{}", rest.provider, rest.model);
            let channel = self.channel.clone();
            // A failure is counted and marks the connection degraded; the rest stays local.
            let _ = self
                .shared
                .run("rest", |mut conn| async move {
                    redis::pipe()
                        .cmd("SET")
                        .arg(&key)
                        .arg(&value)
                        .arg("PX")
                        .arg(ms)
                        .ignore()
                        .cmd("PUBLISH")
                        .arg(&channel)
                        .arg(&message)
                        .ignore()
                        .exec_async(&mut conn)
                        .await?;
                    Ok(())
                })
                .await;
        }
    }

    async fn subscriber(&self, apply: Apply, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                result = self.subscribe_once(&apply) => {
                    if let Err(err) = result {
                        tracing::debug!(error = %err, "rest subscription ended; resubscribing");
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(RESUBSCRIBE_DELAY) => {}
            }
        }
    }

    /// Subscribes, catches up on live rests, then applies messages until the connection
    /// ends.
    async fn subscribe_once(&self, apply: &Apply) -> Result<(), SharedError> {
        let connect = self.shared.client().get_async_pubsub();
        let mut pubsub = tokio::time::timeout(self.shared.settings().connect_timeout, connect)
            .await
            .map_err(|_| SharedError::Timeout(self.shared.settings().connect_timeout))??;
        pubsub.subscribe(&self.channel).await?;
        self.catch_up(apply).await?;
        let mut messages = pubsub.on_message();
        while let Some(message) = messages.next().await {
            let Ok(payload) = message.get_payload::<String>() else {
                continue;
            };
            let mut fields = payload.split('\t');
            let (Some(replica), Some(provider), Some(model), Some(ms)) =
                (fields.next(), fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            if replica == self.shared.replica_id() {
                continue;
            }
            if let Ok(ms) = ms.parse::<u64>() {
                apply(provider, model, Duration::from_millis(ms));
            }
        }
        Ok(())
    }

    /// Applies every rest key still alive (rests published while this replica was not
    /// subscribed).
    async fn catch_up(&self, apply: &Apply) -> Result<(), SharedError> {
        let mut conn = self.shared.connection();
        let pattern = format!("{}*", self.key_prefix);
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(500)
                .query_async(&mut conn)
                .await?;
            for key in keys {
                let (value, ttl): (Option<String>, i64) = redis::pipe()
                    .cmd("GET")
                    .arg(&key)
                    .cmd("PTTL")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await?;
                if let (Some(value), Ok(ms)) = (value, u64::try_from(ttl))
                    && let Some((provider, model)) = value.split_once('\t')
                {
                    apply(provider, model, Duration::from_millis(ms));
                }
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }
}
