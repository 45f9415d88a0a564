//! The response cache in Redis (`[shared] redis_url`), so every replica serves every
//! replica's replies.
//!
//! - A reply is one string key `P:cache:e:NS:DIGEST` (`NS`: 16 hex digits of the SHA-256
//!   of the namespace, `DIGEST`: the exact key, [`CacheKey::hex`]), its value the reply
//!   encoded as JSON (the namespace, the reply, who made it, its cost, its policy, when it
//!   was stored), with the reply's TTL as the key's expiry (`SET PX`). There is no
//!   in-process copy in front: every lookup is one `GET`, so an invalidation through any
//!   replica is seen by the next lookup of every replica.
//! - The semantic index is per replica in memory, fed from the stream `P:cache:index`: a
//!   stored reply with a prompt embedding adds an `add` event (partition, key, policy,
//!   times, the vector as little-endian f32), an invalidation an `inv` event (its filter
//!   and time). Before each semantic lookup a replica reads the events it has not seen yet
//!   (`XREAD`, at most [`SYNC_BATCH`] x [`SYNC_ROUNDS`] per lookup) and applies the other
//!   replicas' in order. The stream is trimmed to about the index's bound (`MAXLEN ~`). A
//!   semantic hit is still a `GET` of the exact key, so a reply invalidated or expired in
//!   Redis is never served, whatever an index holds.
//! - Redis unreachable: a lookup is a miss, a store is dropped, the call goes on; the event
//!   counts in `llm_gateway_cache_events_total{outcome="unavailable"}` (and the shared
//!   client's own error counter and degraded gauge). `InvalidateCache` fails with
//!   UNAVAILABLE instead of claiming entries it could not remove.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use redis::Value;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{
    CacheKey, SemanticIndex, Vector,
    semantic::Indexed,
    store::{CacheStore, Entry, IndexedPrompt, Invalidate, StoreUnavailable},
};
use crate::{
    models::Cost,
    shared::{Shared, SharedError},
    types::{ChatResponse, ContentPart, FinishReason, ToolCall, Usage},
};

/// Index events read per `XREAD`.
pub const SYNC_BATCH: usize = 256;

/// Most `XREAD`s one lookup makes to catch up (a replica far behind catches up over
/// several lookups).
pub const SYNC_ROUNDS: usize = 8;

/// Keys scanned per `SCAN` step of an invalidation.
const SCAN_COUNT: usize = 500;

/// The cache store in Redis.
pub struct RedisStore {
    shared: Arc<Shared>,
    /// `P:cache:e:`.
    entries: String,
    /// `P:cache:index`.
    stream: String,
    /// The stream's approximate length bound.
    max_events: usize,
    /// The last index event applied.
    last_event: tokio::sync::Mutex<String>,
}

fn unavailable(op: &'static str) {
    metrics::counter!(super::CACHE_EVENTS, "outcome" => "unavailable", "kind" => op).increment(1);
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The wall-clock milliseconds of `at` (a Tokio instant).
fn to_wall(at: Instant, now: Instant, wall: u64) -> u64 {
    if at <= now {
        wall.saturating_sub(ms(now - at))
    } else {
        wall.saturating_add(ms(at - now))
    }
}

/// The Tokio instant of wall-clock milliseconds `at`.
fn from_wall(at: u64, now: Instant, wall: u64) -> Instant {
    if at <= wall {
        now.checked_sub(Duration::from_millis(wall - at))
            .unwrap_or(now)
    } else {
        now + Duration::from_millis(at - wall)
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// 16 hex digits of the namespace's SHA-256 (a key part safe in `SCAN` patterns).
fn namespace_hash(namespace: &str) -> String {
    use std::fmt::Write as _;
    let digest = ring::digest::digest(&ring::digest::SHA256, namespace.as_bytes());
    let mut out = String::with_capacity(16);
    for b in &digest.as_ref()[..8] {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// A reply as stored in Redis.
#[derive(Serialize, Deserialize)]
struct Wire {
    /// Format version (1).
    v: u8,
    ns: String,
    model: String,
    finish: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    usage: Option<WireUsage>,
    content: Vec<WirePart>,
    provider: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cost: Option<[f64; 2]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    policy: Option<String>,
    stored_ms: u64,
    expires_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct WireUsage {
    input: u64,
    output: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cached_input: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cache_write: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reasoning: Option<u64>,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WirePart {
    Text {
        text: String,
    },
    ToolCall {
        id: String,
        name: String,
        arguments: String,
    },
}

fn finish_name(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Unspecified => "unspecified",
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::ToolCalls => "tool_calls",
        FinishReason::ContentFilter => "content_filter",
        FinishReason::Other => "other",
    }
}

fn finish_reason(name: &str) -> FinishReason {
    match name {
        "stop" => FinishReason::Stop,
        "length" => FinishReason::Length,
        "tool_calls" => FinishReason::ToolCalls,
        "content_filter" => FinishReason::ContentFilter,
        "other" => FinishReason::Other,
        _ => FinishReason::Unspecified,
    }
}

/// The stored form of `entry` (images and tool results, which replies do not carry, are
/// left out).
fn encode(key: &CacheKey, entry: &Entry, now: Instant, wall: u64) -> Vec<u8> {
    let r = &entry.response;
    let wire = Wire {
        v: 1,
        ns: key.namespace.to_string(),
        model: r.model.clone(),
        finish: finish_name(r.finish_reason).to_owned(),
        usage: r.usage.map(|u| WireUsage {
            input: u.input_tokens,
            output: u.output_tokens,
            cached_input: u.cached_input_tokens,
            cache_write: u.cache_write_tokens,
            reasoning: u.reasoning_tokens,
        }),
        content: r
            .content
            .iter()
            .filter_map(|part| match part {
                ContentPart::Text(text) => Some(WirePart::Text { text: text.clone() }),
                ContentPart::ToolCall(c) => Some(WirePart::ToolCall {
                    id: c.id.clone(),
                    name: c.name.clone(),
                    arguments: c.arguments.clone(),
                }),
                ContentPart::Image(_) | ContentPart::ToolResult(_) => None,
            })
            .collect(),
        provider: entry.provider.clone(),
        cost: entry.cost.map(|c| [c.input_usd, c.output_usd]),
        policy: entry.policy.as_deref().map(str::to_owned),
        stored_ms: to_wall(entry.stored, now, wall),
        expires_ms: to_wall(entry.expires, now, wall),
    };
    serde_json::to_vec(&wire).unwrap_or_default()
}

/// The entry (and its key) stored as `bytes`, when it is live and readable.
fn decode(digest: [u8; 32], bytes: &[u8], now: Instant, wall: u64) -> Option<(CacheKey, Entry)> {
    let wire: Wire = match serde_json::from_slice(bytes) {
        Ok(wire) => wire,
        Err(err) => {
            tracing::warn!(error = %err, "shared cache: an entry could not be read; ignored");
            return None;
        }
    };
    if wire.v != 1 || wire.expires_ms <= wall {
        return None;
    }
    let entry = Entry {
        response: ChatResponse {
            model: wire.model,
            content: wire
                .content
                .into_iter()
                .map(|part| match part {
                    WirePart::Text { text } => ContentPart::Text(text),
                    WirePart::ToolCall {
                        id,
                        name,
                        arguments,
                    } => ContentPart::ToolCall(ToolCall {
                        id,
                        name,
                        arguments,
                    }),
                })
                .collect(),
            finish_reason: finish_reason(&wire.finish),
            usage: wire.usage.map(|u| Usage {
                input_tokens: u.input,
                output_tokens: u.output,
                cached_input_tokens: u.cached_input,
                cache_write_tokens: u.cache_write,
                reasoning_tokens: u.reasoning,
            }),
        },
        provider: wire.provider,
        cost: wire.cost.map(|[input_usd, output_usd]| Cost {
            input_usd,
            output_usd,
        }),
        policy: wire.policy.map(Into::into),
        stored: from_wall(wire.stored_ms, now, wall),
        expires: from_wall(wire.expires_ms, now, wall),
    };
    let key = CacheKey {
        namespace: wire.ns.into(),
        digest,
    };
    Some((key, entry))
}

/// The digest at the end of an entry key.
fn digest_of(redis_key: &str) -> Option<[u8; 32]> {
    let hex = redis_key.rsplit(':').next()?;
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// The pairs of a flat `[k, v, k, v, ...]` array or a map.
fn pairs(v: &Value) -> Vec<(&Value, &Value)> {
    match v {
        Value::Array(items) => items.chunks_exact(2).map(|c| (&c[0], &c[1])).collect(),
        Value::Map(items) => items.iter().map(|(k, v)| (k, v)).collect(),
        _ => Vec::new(),
    }
}

/// The fields of one stream event, name and value.
type Fields<'a> = Vec<(&'a [u8], &'a [u8])>;

/// The events of an `XREAD` reply of one stream: id and fields.
fn stream_events(reply: &Value) -> Vec<(String, Fields<'_>)> {
    let streams: Vec<&Value> = match reply {
        Value::Array(streams) => streams
            .iter()
            .filter_map(|s| match s {
                Value::Array(kv) if kv.len() == 2 => Some(&kv[1]),
                _ => None,
            })
            .collect(),
        Value::Map(streams) => streams.iter().map(|(_, v)| v).collect(),
        _ => Vec::new(),
    };
    let mut out = Vec::new();
    for events in streams {
        let Value::Array(events) = events else {
            continue;
        };
        for event in events {
            let Value::Array(parts) = event else {
                continue;
            };
            let (Some(id), Some(fields)) = (parts.first().and_then(bytes), parts.get(1)) else {
                continue;
            };
            let fields = pairs(fields)
                .into_iter()
                .filter_map(|(k, v)| Some((bytes(k)?, bytes(v)?)))
                .collect();
            out.push((String::from_utf8_lossy(id).into_owned(), fields));
        }
    }
    out
}

fn field<'a>(fields: &[(&[u8], &'a [u8])], name: &str) -> Option<&'a [u8]> {
    fields
        .iter()
        .find(|(k, _)| *k == name.as_bytes())
        .map(|(_, v)| *v)
}

fn text<'a>(fields: &[(&[u8], &'a [u8])], name: &str) -> Option<&'a str> {
    std::str::from_utf8(field(fields, name)?).ok()
}

fn number(fields: &[(&[u8], &[u8])], name: &str) -> Option<u64> {
    text(fields, name)?.parse().ok()
}

fn array32(b: &[u8]) -> Option<[u8; 32]> {
    b.try_into().ok()
}

impl RedisStore {
    /// The store over `shared`; its index stream keeps about `max_prompts` prompts.
    pub fn new(shared: Arc<Shared>, max_prompts: usize) -> Self {
        Self {
            entries: shared.key("cache:e:"),
            stream: shared.key("cache:index"),
            max_events: max_prompts.max(1),
            shared,
            last_event: tokio::sync::Mutex::new("0-0".to_owned()),
        }
    }

    /// `XADD` of an index event of `kind` by this replica (its fields to be added).
    fn event(&self, kind: &str) -> redis::Cmd {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&self.stream)
            .arg("MAXLEN")
            .arg("~")
            .arg(self.max_events)
            .arg("*")
            .arg("r")
            .arg(self.shared.replica_id())
            .arg("t")
            .arg(kind);
        cmd
    }

    fn entry_key(&self, key: &CacheKey) -> String {
        format!(
            "{}{}:{}",
            self.entries,
            namespace_hash(&key.namespace),
            key.hex()
        )
    }

    /// Applies one index event of another replica.
    fn apply(&self, index: &SemanticIndex, fields: &[(&[u8], &[u8])], now: Instant, wall: u64) {
        if text(fields, "r") == Some(self.shared.replica_id()) {
            return;
        }
        match text(fields, "t") {
            Some("add") => {
                let (Some(partition), Some(digest), Some(ns), Some(stored), Some(expires)) = (
                    field(fields, "p").and_then(array32),
                    field(fields, "d").and_then(array32),
                    text(fields, "n"),
                    number(fields, "s"),
                    number(fields, "x"),
                ) else {
                    return;
                };
                let floats: Vec<f32> = field(fields, "v")
                    .unwrap_or_default()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                if expires <= wall {
                    return;
                }
                let Some(vector) = Vector::unit(&floats) else {
                    return;
                };
                index.insert_indexed(
                    partition,
                    vector,
                    Indexed {
                        key: CacheKey {
                            namespace: ns.into(),
                            digest,
                        },
                        policy: text(fields, "o").filter(|p| !p.is_empty()).map(Into::into),
                        stored: from_wall(stored, now, wall),
                        expires: from_wall(expires, now, wall),
                    },
                );
            }
            Some("inv") => {
                let Some(at) = number(fields, "w") else {
                    return;
                };
                let filter = Invalidate {
                    namespace: text(fields, "n")
                        .filter(|n| !n.is_empty())
                        .map(str::to_owned),
                    policy: text(fields, "o")
                        .filter(|p| !p.is_empty())
                        .map(str::to_owned),
                    older_than: number(fields, "a").map(Duration::from_millis),
                };
                index.invalidate(&filter, from_wall(at, now, wall));
            }
            _ => {}
        }
    }

    /// One `SCAN` step of an invalidation: the matching keys it found removed.
    async fn invalidate_step(
        &self,
        cursor: u64,
        pattern: &str,
        filter: &Invalidate,
        now: Instant,
    ) -> Result<(u64, u64), SharedError> {
        let (next, keys): (u64, Vec<String>) = self
            .shared
            .run("cache_invalidate", |mut conn| async move {
                Ok(redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(SCAN_COUNT)
                    .query_async(&mut conn)
                    .await?)
            })
            .await?;
        if keys.is_empty() {
            return Ok((next, 0));
        }
        let doomed = if filter.policy.is_none() && filter.older_than.is_none() {
            keys
        } else {
            let mget = redis::cmd("MGET").arg(&keys).clone();
            let values: Vec<Option<Vec<u8>>> = self
                .shared
                .run("cache_invalidate", |mut conn| async move {
                    Ok(mget.query_async(&mut conn).await?)
                })
                .await?;
            let wall = wall_ms();
            keys.into_iter()
                .zip(values)
                .filter(|(k, v)| {
                    let decoded = v
                        .as_deref()
                        .zip(digest_of(k))
                        .and_then(|(v, digest)| decode(digest, v, now, wall));
                    decoded.is_some_and(|(key, entry)| filter.matches(&key, &entry, now))
                })
                .map(|(k, _)| k)
                .collect()
        };
        if doomed.is_empty() {
            return Ok((next, 0));
        }
        let removed: u64 = self
            .shared
            .run("cache_invalidate", |mut conn| async move {
                Ok(redis::cmd("DEL")
                    .arg(&doomed)
                    .query_async(&mut conn)
                    .await?)
            })
            .await?;
        Ok((next, removed))
    }
}

#[async_trait::async_trait]
impl CacheStore for RedisStore {
    async fn get(&self, key: &CacheKey, now: Instant) -> Option<Arc<Entry>> {
        let redis_key = self.entry_key(key);
        let value: Result<Option<Vec<u8>>, _> = self
            .shared
            .run("cache_get", |mut conn| async move {
                Ok(redis::cmd("GET")
                    .arg(&redis_key)
                    .query_async(&mut conn)
                    .await?)
            })
            .await;
        match value {
            Ok(value) => {
                let (found, entry) = decode(key.digest, &value?, now, wall_ms())?;
                // A digest collision across namespaces is impossible (the namespace is in
                // the digest), but the stored namespace is checked all the same.
                (found.namespace == key.namespace).then(|| Arc::new(entry))
            }
            Err(_) => {
                unavailable("get");
                None
            }
        }
    }

    async fn put(&self, key: CacheKey, entry: Arc<Entry>, prompt: Option<IndexedPrompt>) -> bool {
        let now = Instant::now();
        let ttl = ms(entry.expires.saturating_duration_since(now)).max(1);
        let wall = wall_ms();
        let value = encode(&key, &entry, now, wall);
        let redis_key = self.entry_key(&key);
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(&redis_key)
            .arg(value)
            .arg("PX")
            .arg(ttl)
            .ignore();
        if let Some(prompt) = prompt {
            let vector: Vec<u8> = prompt
                .vector
                .as_slice()
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect();
            let mut event = self.event("add");
            event
                .arg("p")
                .arg(&prompt.partition[..])
                .arg("n")
                .arg(&*key.namespace)
                .arg("d")
                .arg(&key.digest[..])
                .arg("o")
                .arg(entry.policy.as_deref().unwrap_or(""))
                .arg("s")
                .arg(to_wall(entry.stored, now, wall))
                .arg("x")
                .arg(to_wall(entry.expires, now, wall))
                .arg("v")
                .arg(vector);
            pipe.add_command(event).ignore();
        }
        let written = self
            .shared
            .run("cache_put", |mut conn| async move {
                pipe.exec_async(&mut conn).await?;
                Ok(())
            })
            .await;
        if written.is_err() {
            unavailable("put");
        }
        written.is_ok()
    }

    async fn invalidate(&self, filter: &Invalidate, now: Instant) -> Result<u64, StoreUnavailable> {
        let pattern = match &filter.namespace {
            Some(ns) => format!("{}{}:*", self.entries, namespace_hash(ns)),
            None => format!("{}*", self.entries),
        };
        let fail = |err: SharedError| {
            unavailable("invalidate");
            StoreUnavailable(err.to_string())
        };
        let mut removed = 0;
        let mut cursor = 0;
        loop {
            let (next, n) = self
                .invalidate_step(cursor, &pattern, filter, now)
                .await
                .map_err(fail)?;
            removed += n;
            if next == 0 {
                break;
            }
            cursor = next;
        }
        // The other replicas' indexes tombstone the same prompts.
        let mut cmd = self.event("inv");
        cmd.arg("n")
            .arg(filter.namespace.as_deref().unwrap_or(""))
            .arg("o")
            .arg(filter.policy.as_deref().unwrap_or(""))
            .arg("w")
            .arg(wall_ms());
        if let Some(age) = filter.older_than {
            cmd.arg("a").arg(ms(age));
        }
        self.shared
            .run("cache_invalidate", |mut conn| async move {
                let _: String = cmd.query_async(&mut conn).await?;
                Ok(())
            })
            .await
            .map_err(fail)?;
        Ok(removed)
    }

    async fn sync_index(&self, index: &SemanticIndex) {
        let mut last = self.last_event.lock().await;
        for _ in 0..SYNC_ROUNDS {
            let from = last.clone();
            let stream = self.stream.clone();
            let reply: Result<Value, _> = self
                .shared
                .run("cache_sync", |mut conn| async move {
                    Ok(redis::cmd("XREAD")
                        .arg("COUNT")
                        .arg(SYNC_BATCH)
                        .arg("STREAMS")
                        .arg(&stream)
                        .arg(&from)
                        .query_async(&mut conn)
                        .await?)
                })
                .await;
            let Ok(reply) = reply else {
                unavailable("sync");
                return;
            };
            let events = stream_events(&reply);
            let (now, wall) = (Instant::now(), wall_ms());
            for (id, fields) in &events {
                self.apply(index, fields, now, wall);
                last.clone_from(id);
            }
            if events.len() < SYNC_BATCH {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_round_trips_through_its_stored_form() {
        let now = Instant::now();
        let wall = 1_800_000_000_000;
        let key = CacheKey {
            namespace: "team:a".into(),
            digest: [7; 32],
        };
        let entry = Entry {
            response: ChatResponse {
                model: "gpt".into(),
                content: vec![
                    ContentPart::Text("hi".into()),
                    ContentPart::ToolCall(ToolCall {
                        id: "c".into(),
                        name: "f".into(),
                        arguments: "{}".into(),
                    }),
                ],
                finish_reason: FinishReason::ToolCalls,
                usage: Some(Usage {
                    input_tokens: 3,
                    output_tokens: 4,
                    cached_input_tokens: Some(1),
                    ..Usage::default()
                }),
            },
            provider: "openai".into(),
            cost: Some(Cost {
                input_usd: 0.5,
                output_usd: 0.25,
            }),
            policy: Some("chat".into()),
            stored: now - Duration::from_secs(5),
            expires: now + Duration::from_secs(60),
        };
        let bytes = encode(&key, &entry, now, wall);
        let (back_key, back) = decode(key.digest, &bytes, now, wall).unwrap();
        assert_eq!(back_key, key);
        assert_eq!(back, entry);
        // Expired by the wall clock: gone.
        assert!(decode(key.digest, &bytes, now, wall + 60_000).is_none());
        assert!(decode(key.digest, b"not json", now, wall).is_none());
        let redis_key = format!("llmgw:cache:e:{}:{}", namespace_hash("team:a"), key.hex());
        assert_eq!(digest_of(&redis_key), Some(key.digest));
    }

    #[test]
    fn xread_replies_are_read_in_both_protocols() {
        let event = |id: &str| {
            Value::Array(vec![
                Value::BulkString(id.into()),
                Value::Array(vec![
                    Value::BulkString(b"t".to_vec()),
                    Value::BulkString(b"add".to_vec()),
                ]),
            ])
        };
        let resp2 = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"llmgw:cache:index".to_vec()),
            Value::Array(vec![event("1-0"), event("2-0")]),
        ])]);
        let resp3 = Value::Map(vec![(
            Value::BulkString(b"llmgw:cache:index".to_vec()),
            Value::Array(vec![event("3-0")]),
        )]);
        let read = stream_events(&resp2);
        assert_eq!(read.len(), 2);
        assert_eq!(read[1].0, "2-0");
        assert_eq!(text(&read[0].1, "t"), Some("add"));
        assert_eq!(stream_events(&resp3)[0].0, "3-0");
        assert!(stream_events(&Value::Nil).is_empty());
    }
}
