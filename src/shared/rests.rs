//! Rest state shared by replicas: when one replica rests a target after a rate limit (429,
//! Retry-After, overload), or rests one provider API key of several after a refusal or a
//! key-scoped rate limit, every replica rests it for the same time.
//!
//! A rest is published twice: a key holding the rest's fields (tab-separated) with the rest
//! as its expiry (`PX`), and a message on a channel (`REPLICA\tFIELDS...\tREST_MS`). Each
//! replica subscribes to the channel and applies every message from another replica; after
//! each (re)connect it reads the live rest keys (`SCAN`, `PTTL`), so a rest published while
//! it was disconnected is not missed. Publishing is off the call path (a queue and a
//! background task); when Redis is unreachable, rests stay per replica until it answers
//! again. A rest may also end early ([`Rests::end`]: its key deleted, a message with a rest
//! of 0 ms). Two kinds ([`Kind`]), each with its own keys and channel:
//!
//! - [`TARGETS`]: key `P:rest:PROVIDER/MODEL`, fields `PROVIDER`, `MODEL`, channel `P:rests`.
//! - [`KEYS`]: key `P:key-rest:PROVIDER/FINGERPRINT`, fields `PROVIDER`, `FINGERPRINT` (16
//!   hex digits of the key secret's SHA-256, never the secret) and `REASON` (`refused` or
//!   `rate_limited`), channel `P:key-rests`.

use std::{sync::Arc, time::Duration};

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Shared, SharedError};

/// What is rested: the names of its keys and channel, and how many fields a rest has (the
/// first two name what rests; the key is `P:KEY_NAME` + `FIELD1/FIELD2`).
#[derive(Debug, Clone, Copy)]
pub struct Kind {
    /// The channel's name after the prefix.
    channel: &'static str,
    /// The rest keys' name after the prefix, before the fields.
    key: &'static str,
    /// Fields per rest (at least 2).
    fields: usize,
}

/// Target rests: provider, model.
pub const TARGETS: Kind = Kind {
    channel: "rests",
    key: "rest:",
    fields: 2,
};

/// Provider API key rests: provider, key fingerprint (hex), reason.
pub const KEYS: Kind = Kind {
    channel: "key-rests",
    key: "key-rest:",
    fields: 3,
};

/// Applies a peer's rest: its fields (as many as the kind has) and how long.
pub type Apply = Arc<dyn Fn(&[&str], Duration) + Send + Sync>;

struct Rest {
    fields: Vec<String>,
    rest: Duration,
    /// The rest ends now (its key is deleted; peers are told with a rest of 0 ms).
    end: bool,
}

/// The rest publisher and subscriber of one replica, for one [`Kind`].
pub struct Rests {
    shared: Arc<Shared>,
    kind: Kind,
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
    /// Rests of `kind` over `shared` (run [`Rests::run`] for them to flow).
    pub fn new(shared: Arc<Shared>, kind: Kind) -> Arc<Self> {
        let (queue, receiver) = mpsc::unbounded_channel();
        Arc::new(Self {
            channel: shared.key(kind.channel),
            key_prefix: shared.key(kind.key),
            kind,
            shared,
            queue,
            receiver: std::sync::Mutex::new(Some(receiver)),
        })
    }

    /// Queues a rest of this replica for publication (never blocks). `fields` must be as
    /// many as the kind has, none with a tab; otherwise the rest stays local.
    pub fn publish(&self, fields: &[&str], rest: Duration) {
        if fields.len() != self.kind.fields || fields.iter().any(|f| f.contains('\t')) {
            return;
        }
        let _ = self.queue.send(Rest {
            fields: fields.iter().map(|f| (*f).to_owned()).collect(),
            rest,
            end: false,
        });
    }

    /// Queues the end of a rest of this replica for publication: its key is deleted, and
    /// the other replicas' `apply` is called with a rest of zero (the kind's apply decides
    /// what that ends).
    pub fn end(&self, fields: &[&str]) {
        if fields.len() != self.kind.fields || fields.iter().any(|f| f.contains('\t')) {
            return;
        }
        let _ = self.queue.send(Rest {
            fields: fields.iter().map(|f| (*f).to_owned()).collect(),
            rest: Duration::ZERO,
            end: true,
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
            let ms = if rest.end {
                0
            } else {
                u64::try_from(rest.rest.as_millis())
                    .unwrap_or(u64::MAX)
                    .max(1)
            };
            let key = format!("{}{}/{}", self.key_prefix, rest.fields[0], rest.fields[1]);
            let value = rest.fields.join("\t");
            let message = format!("{}\t{value}\t{ms}", self.shared.replica_id());
            let channel = self.channel.clone();
            // A failure is counted and marks the connection degraded; the rest stays local.
            let _ = self
                .shared
                .run("rest", |mut conn| async move {
                    let mut pipe = redis::pipe();
                    if rest.end {
                        pipe.cmd("DEL").arg(&key).ignore();
                    } else {
                        pipe.cmd("SET")
                            .arg(&key)
                            .arg(&value)
                            .arg("PX")
                            .arg(ms)
                            .ignore();
                    }
                    pipe.cmd("PUBLISH")
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
            let fields: Vec<&str> = payload.split('\t').collect();
            let [replica, rest @ .., ms] = fields.as_slice() else {
                continue;
            };
            if *replica == self.shared.replica_id() || rest.len() != self.kind.fields {
                continue;
            }
            if let Ok(ms) = ms.parse::<u64>() {
                apply(rest, Duration::from_millis(ms));
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
                let Some(value) = value else { continue };
                let fields: Vec<&str> = value.split('\t').collect();
                if let Ok(ms) = u64::try_from(ttl)
                    && fields.len() == self.kind.fields
                {
                    apply(&fields, Duration::from_millis(ms));
                }
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }
}
