//! The response cache's stage of the call engine ([`super::engine`]): which namespace and
//! policy scope a call has, a cached reply as an answer or as a replayed stream, and the
//! collection of a streamed reply for storing.

use std::{sync::Arc, time::Duration};

use crate::{
    auth::Caller,
    cache::{
        self, Attribution, CacheControl, CallCache, Embedder, Embedding, Entry, PolicyScope,
        ResponseCache,
    },
    error::GatewayError,
    executor::{Answer, CallEvent, Executor},
    models::Cost,
    routing::{Router, RoutingTable},
    server::meter::{CallMeter, MeterConfig, Outcome},
    types::{
        CacheOutcome, ChatRequest, ChatResponse, ContentPart, EmbedRequest, FinishReason, Message,
        Role, Route, ToolCall, ToolCallDelta, Usage,
    },
};

/// How long the semantic cache waits for a prompt's embedding.
pub const EMBED_TIMEOUT: Duration = Duration::from_secs(5);

/// The ledger's `rpc` of a semantic lookup's embedding call.
pub const CACHE_EMBED_RPC: &str = "CacheEmbed";

/// The semantic cache's embedder: `[cache].embedding_model` through the routing table and
/// the executor (fallback and health like any call), metered as a call of its own
/// (`rpc` [`CACHE_EMBED_RPC`]: its metrics and a ledger record with its tokens and cost,
/// under the chat call's request id, key and tags); the chat call charges its cost to
/// the key's budget ([`CallCache::embedding_cost_usd`]).
pub struct GatewayEmbedder {
    /// The routing table.
    pub router: Arc<Router>,
    /// Runs the embedding call.
    pub executor: Executor,
    /// `[cache].embedding_model`.
    pub model: String,
    /// Where the call is accounted.
    pub meter: MeterConfig,
}

#[async_trait::async_trait]
impl Embedder for GatewayEmbedder {
    async fn embed(&self, text: &str, call: Attribution<'_>) -> Result<Embedding, GatewayError> {
        let mut meter = CallMeter::start(&self.meter, CACHE_EMBED_RPC, call.request_id.to_owned());
        if !call.key.is_empty() {
            meter.set_key(call.key);
        }
        meter.set_tags(call.tags);
        let result = async {
            let view = ChatRequest {
                model: self.model.clone(),
                messages: vec![Message::text(Role::User, text)],
                ..ChatRequest::default()
            };
            let plan = self.router.load().plan(&view)?;
            let req = EmbedRequest {
                model: self.model.clone(),
                inputs: vec![text.to_owned()],
                dimensions: None,
                encoding: Default::default(),
                tags: call.tags.clone(),
                user: None,
            };
            let deadline = tokio::time::Instant::now() + EMBED_TIMEOUT;
            self.executor.embed(&plan, &req, deadline, None).await
        }
        .await;
        let answer = match result {
            Ok(answer) => answer,
            Err(err) => {
                meter.finish(Outcome::failed(&err));
                return Err(err);
            }
        };
        super::engine::embed::finish(&mut meter, &answer);
        let vector = answer
            .response
            .embeddings
            .into_iter()
            .next()
            .ok_or_else(|| GatewayError::Internal("the embedding answer holds no vector".into()))?;
        Ok(Embedding {
            vector,
            cost_usd: answer.cost.map(|c| c.total_usd()),
        })
    }
}

/// The caller's namespace: its key's owner (team), or the key when it has none, or the
/// anonymous namespace.
pub fn namespace(caller: Option<&Caller>) -> Arc<str> {
    cache::namespace(
        caller.map(|c| c.key.spec.owner.as_str()),
        caller.map(Caller::name),
    )
}

/// What the cache does for `req` (its `model` final: after any budget fallback).
pub fn begin(
    cache: &Arc<ResponseCache>,
    table: &RoutingTable,
    namespace: &Arc<str>,
    req: &ChatRequest,
    control: CacheControl,
) -> CallCache {
    let scope = table.policies().get(&req.model).map(|record| {
        let mut tags: Vec<(&str, Option<&str>)> = record
            .spec
            .variants
            .iter()
            .flat_map(|v| v.match_tags.keys())
            .map(|name| (name.as_str(), req.tags.get(name).map(String::as_str)))
            .collect();
        tags.sort_unstable();
        tags.dedup();
        PolicyScope {
            name: &record.spec.name,
            version: record.version,
            spec: &record.spec.cache,
            tags,
        }
    });
    cache.begin(namespace, req, scope, control)
}

/// The route of a reply served from the cache: no attempts.
pub fn hit_route(req: &ChatRequest, table: &RoutingTable, outcome: CacheOutcome) -> Route {
    Route {
        policy: table
            .is_policy(&req.model)
            .then(|| std::sync::Arc::from(req.model.as_str())),
        attempts: Vec::new(),
        cache: outcome,
        revision: None,
        arm: None,
    }
}

/// A hit costs nothing.
pub const ZERO_COST: Cost = Cost {
    input_usd: 0.0,
    output_usd: 0.0,
};

/// A cached reply as a unary answer.
pub fn answer(entry: &Entry, route: Route) -> Answer {
    Answer {
        response: entry.response.clone(),
        provider: entry.provider.clone(),
        cost: Some(ZERO_COST),
        route,
        metrics: None,
        guardrails: Default::default(),
    }
}

/// A cached reply as the events of a normal stream: start, one delta per content part,
/// finish (with the original usage, zero cost and `route`).
pub fn replay(entry: &Entry, route: Route) -> Vec<Result<CallEvent, GatewayError>> {
    let mut events = Vec::with_capacity(entry.response.content.len() + 2);
    events.push(Ok(CallEvent::Start {
        provider: entry.provider.clone(),
        model: entry.response.model.clone(),
    }));
    let mut tool_index = 0u32;
    for part in &entry.response.content {
        match part {
            ContentPart::Text(t) => events.push(Ok(CallEvent::Text(t.clone()))),
            ContentPart::ToolCall(c) => {
                events.push(Ok(CallEvent::ToolCall(ToolCallDelta {
                    index: tool_index,
                    id: Some(c.id.clone()),
                    name: Some(c.name.clone()),
                    arguments: c.arguments.clone(),
                })));
                tool_index += 1;
            }
            ContentPart::Image(_) | ContentPart::ToolResult(_) => {}
        }
    }
    events.push(Ok(CallEvent::Finish {
        reason: entry.response.finish_reason,
        usage: entry.response.usage,
        cost: Some(ZERO_COST),
        route,
        guardrails: Default::default(),
    }));
    events
}

/// Collects a streamed reply, to store it once it finished.
#[derive(Default)]
pub struct Collector {
    provider: String,
    model: String,
    content: Vec<ContentPart>,
    /// Index in `content` of each tool call by its stream index.
    tools: Vec<(u32, usize)>,
}

impl Collector {
    /// Takes in one event (before it goes to the caller).
    pub fn push(&mut self, event: &CallEvent) {
        match event {
            CallEvent::Start { provider, model } => {
                provider.clone_into(&mut self.provider);
                model.clone_into(&mut self.model);
            }
            CallEvent::Text(t) => match self.content.last_mut() {
                Some(ContentPart::Text(last)) => last.push_str(t),
                _ => self.content.push(ContentPart::Text(t.clone())),
            },
            CallEvent::Reasoning(_) | CallEvent::Finish { .. } => {}
            CallEvent::ToolCall(d) => {
                let at = match self.tools.iter().find(|(i, _)| *i == d.index) {
                    Some((_, at)) => *at,
                    None => {
                        self.content
                            .push(ContentPart::ToolCall(ToolCall::default()));
                        self.tools.push((d.index, self.content.len() - 1));
                        self.content.len() - 1
                    }
                };
                if let Some(ContentPart::ToolCall(call)) = self.content.get_mut(at) {
                    if let Some(id) = &d.id {
                        id.clone_into(&mut call.id);
                    }
                    if let Some(name) = &d.name {
                        name.clone_into(&mut call.name);
                    }
                    call.arguments.push_str(&d.arguments);
                }
            }
        }
    }

    /// The complete reply, and who made it.
    pub fn finish(self, reason: FinishReason, usage: Option<Usage>) -> (ChatResponse, String) {
        (
            ChatResponse {
                model: self.model,
                content: self.content,
                finish_reason: reason,
                usage,
            },
            self.provider,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replayed_reply_collects_back_to_itself() {
        let response = ChatResponse {
            model: "echo".into(),
            content: vec![
                ContentPart::Text("hello".into()),
                ContentPart::ToolCall(ToolCall {
                    id: "c1".into(),
                    name: "f".into(),
                    arguments: "{}".into(),
                }),
            ],
            finish_reason: FinishReason::ToolCalls,
            usage: Some(Usage {
                input_tokens: 3,
                output_tokens: 4,
                ..Usage::default()
            }),
        };
        let now = tokio::time::Instant::now();
        let entry = Entry {
            response: response.clone(),
            provider: "mock".into(),
            cost: None,
            policy: None,
            stored: now,
            expires: now,
        };
        let mut c = Collector::default();
        let events = replay(&entry, Route::default());
        assert_eq!(events.len(), 4);
        for e in &events {
            c.push(e.as_ref().unwrap());
        }
        let (back, provider) = c.finish(response.finish_reason, response.usage);
        assert_eq!(back, response);
        assert_eq!(provider, "mock");
    }
}
