//! The guard stage of the call engine ([`super::engine`]): which guardrail profiles apply to
//! a call (the key's forced profile first, then the policy's), and the reply stream passed
//! through [`crate::guard::stream::StreamScanner`]s (text, reasoning, and each tool call's
//! arguments apart), flushed before the finish event; and the profiles' external checks
//! ([`crate::guard::external`]): on the request after its detectors, on a unary reply, and
//! on a stream's whole reply text before its finish event, their verdicts in the route.

use std::{
    collections::{BTreeMap, VecDeque},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use futures_util::{Stream, StreamExt};
use tokio::time::Instant;

use super::engine::Events;
use crate::{
    auth::Caller,
    error::GatewayError,
    executor::Answer,
    executor::CallEvent,
    guard::{
        ExternalContext, GuardSettings, Guarding, external::CallInfo, json_escaped, plain,
        stream::StreamScanner,
    },
    routing::{Plan, RoutingTable},
    types::{ChatRequest, ToolCallDelta},
};

/// The configured profiles, looked up per call.
#[derive(Clone, Default)]
pub struct GuardStage {
    settings: Arc<GuardSettings>,
    /// For external checks.
    client: reqwest::Client,
}

impl GuardStage {
    /// A stage over these profiles; external checks use `client`.
    pub fn new(settings: Arc<GuardSettings>, client: reqwest::Client) -> Self {
        Self { settings, client }
    }

    /// Runs the request's external checks (after the detectors ran).
    pub async fn request(
        &self,
        guarding: &mut Guarding,
        req: &mut ChatRequest,
        deadline: Instant,
    ) -> Result<(), GatewayError> {
        let Some(info) = guarding.info.clone() else {
            return Ok(());
        };
        let cx = ExternalContext {
            client: &self.client,
            info: &info,
            deadline,
        };
        guarding.external_request(req, cx).await
    }

    /// Runs a unary reply's external checks (after the detectors ran) and puts every
    /// verdict of the call in its route.
    pub async fn reply(
        &self,
        guarding: &mut Guarding,
        answer: &mut Answer,
        deadline: Instant,
    ) -> Result<(), GatewayError> {
        if let Some(info) = guarding.info.clone() {
            let cx = ExternalContext {
                client: &self.client,
                info: &info,
                deadline,
            };
            guarding.external_reply(&mut answer.response, cx).await?;
        }
        answer
            .guardrails
            .extend(std::mem::take(&mut guarding.verdicts));
        Ok(())
    }

    /// The guardrails of one call: the key's forced profile, then its policy's. A profile
    /// that is named but not configured fails the call closed.
    pub fn for_call(
        &self,
        caller: Option<&Caller>,
        table: &RoutingTable,
        plan: &Plan,
        req: &ChatRequest,
        request_id: &str,
    ) -> Result<Guarding, GatewayError> {
        let mut names: Vec<&str> = Vec::new();
        if let Some(caller) = caller
            && !caller.key.spec.guardrails.is_empty()
        {
            names.push(&caller.key.spec.guardrails);
        }
        if let Some(policy) = &plan.policy
            && let Some(record) = table.policies().get(&**policy)
            && let Some(profile) = &record.spec.guardrails
            && !names.contains(&profile.as_str())
        {
            names.push(profile);
        }
        let mut profiles = Vec::with_capacity(names.len());
        for name in names {
            match self.settings.get(name) {
                Some(p) => profiles.push(p.clone()),
                None => {
                    return Err(GatewayError::FailedPrecondition {
                        reason: "GUARDRAIL_NOT_CONFIGURED",
                        message: format!("guardrail profile `{name}` is not configured"),
                    });
                }
            }
        }
        let mut guarding = Guarding::new(profiles);
        if guarding.has_external(true) || guarding.has_external(false) {
            guarding.info = Some(Arc::new(CallInfo {
                request_id: request_id.to_owned(),
                policy: plan.policy.clone(),
                model: req.model.clone(),
                key: caller.map(|c| c.name().to_owned()),
                tenant: caller
                    .map(|c| c.key.spec.owner.clone())
                    .filter(|o| !o.is_empty()),
            }));
        }
        Ok(guarding)
    }
}

/// The most reply text a stream keeps for its response-phase external checks; what comes
/// after is not checked.
const MAX_CHECKED_REPLY: usize = 1 << 20;

/// The committed stream with its reply scanned; unchanged when nothing watches replies.
/// With external checks, their verdicts go into the finish event's route, and those of the
/// response phase run over the whole reply text before it.
pub fn guard_stream(
    events: Events,
    mut guarding: Guarding,
    stage: &GuardStage,
    deadline: Instant,
) -> Events {
    if !guarding.is_active() {
        return events;
    }
    let external = guarding.info.is_some().then(|| guarding.split_external());
    let events = scan_stream(events, guarding);
    match external {
        Some(external) => external_stream(events, external, stage.client.clone(), deadline),
        None => events,
    }
}

struct ExternalState {
    inner: Events,
    guarding: Guarding,
    client: reqwest::Client,
    deadline: Instant,
    text: String,
    reasoning: String,
    done: bool,
}

fn keep(into: &mut String, text: &str) {
    if into.len() + text.len() <= MAX_CHECKED_REPLY {
        into.push_str(text);
    }
}

/// Runs the response phase's external checks at the finish event; every verdict goes into
/// its route.
fn external_stream(
    inner: Events,
    guarding: Guarding,
    client: reqwest::Client,
    deadline: Instant,
) -> Events {
    let state = ExternalState {
        inner,
        guarding,
        client,
        deadline,
        text: String::new(),
        reasoning: String::new(),
        done: false,
    };
    Box::pin(futures_util::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        let event = match st.inner.next().await? {
            Ok(CallEvent::Text(t)) => {
                keep(&mut st.text, &t);
                Ok(CallEvent::Text(t))
            }
            Ok(CallEvent::Reasoning(t)) => {
                keep(&mut st.reasoning, &t);
                Ok(CallEvent::Reasoning(t))
            }
            Ok(CallEvent::Finish {
                reason,
                usage,
                cost,
                route,
                mut guardrails,
            }) => {
                let checked = match st.guarding.info.clone() {
                    Some(info) if st.guarding.has_external(false) => {
                        let cx = ExternalContext {
                            client: &st.client,
                            info: &info,
                            deadline: st.deadline,
                        };
                        st.guarding
                            .external_streamed(&mut st.text, &mut st.reasoning, cx)
                            .await
                    }
                    _ => Ok(()),
                };
                guardrails.extend(std::mem::take(&mut st.guarding.verdicts));
                checked.map(|()| CallEvent::Finish {
                    reason,
                    usage,
                    cost,
                    route,
                    guardrails,
                })
            }
            other => other,
        };
        st.done = event.is_err();
        Some((event, st))
    }))
}

/// The stream with its reply scanned by the profiles' detectors; unchanged when nothing
/// watches replies.
fn scan_stream(events: Events, guarding: Guarding) -> Events {
    if !guarding.is_active() || !guarding.watches_replies() {
        return events;
    }
    Box::pin(GuardedStream {
        text: StreamScanner::new(&guarding, plain),
        reasoning: StreamScanner::new(&guarding, plain),
        tools: BTreeMap::new(),
        guarding,
        inner: events,
        out: VecDeque::new(),
        done: false,
    })
}

struct GuardedStream {
    inner: Events,
    guarding: Guarding,
    text: StreamScanner,
    reasoning: StreamScanner,
    tools: BTreeMap<u32, StreamScanner>,
    out: VecDeque<Result<CallEvent, GatewayError>>,
    done: bool,
}

impl GuardedStream {
    fn on_event(&mut self, event: CallEvent) -> Result<(), GatewayError> {
        let g = &mut self.guarding;
        match event {
            CallEvent::Text(t) => {
                let s = self.text.push(&t, g)?;
                if !s.is_empty() {
                    self.out.push_back(Ok(CallEvent::Text(s)));
                }
            }
            CallEvent::Reasoning(t) => {
                let s = self.reasoning.push(&t, g)?;
                if !s.is_empty() {
                    self.out.push_back(Ok(CallEvent::Reasoning(s)));
                }
            }
            CallEvent::ToolCall(d) => {
                let scanner = self
                    .tools
                    .entry(d.index)
                    .or_insert_with(|| StreamScanner::new(g, json_escaped));
                let arguments = scanner.push(&d.arguments, g)?;
                if !arguments.is_empty() || d.id.is_some() || d.name.is_some() {
                    self.out
                        .push_back(Ok(CallEvent::ToolCall(ToolCallDelta { arguments, ..d })));
                }
            }
            finish @ CallEvent::Finish { .. } => {
                let s = self.reasoning.finish(g)?;
                if !s.is_empty() {
                    self.out.push_back(Ok(CallEvent::Reasoning(s)));
                }
                let s = self.text.finish(g)?;
                if !s.is_empty() {
                    self.out.push_back(Ok(CallEvent::Text(s)));
                }
                for (index, scanner) in &mut self.tools {
                    let arguments = scanner.finish(g)?;
                    if !arguments.is_empty() {
                        self.out.push_back(Ok(CallEvent::ToolCall(ToolCallDelta {
                            index: *index,
                            arguments,
                            ..ToolCallDelta::default()
                        })));
                    }
                }
                self.out.push_back(Ok(finish));
            }
            start @ CallEvent::Start { .. } => self.out.push_back(Ok(start)),
        }
        Ok(())
    }
}

impl Stream for GuardedStream {
    type Item = Result<CallEvent, GatewayError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(item) = this.out.pop_front() {
                return Poll::Ready(Some(item));
            }
            if this.done {
                return Poll::Ready(None);
            }
            match ready!(this.inner.as_mut().poll_next(cx)) {
                None => this.done = true,
                Some(Err(err)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(err)));
                }
                Some(Ok(event)) => {
                    if let Err(err) = this.on_event(event) {
                        this.done = true;
                        this.out.clear();
                        // Close the upstream now.
                        this.inner = Box::pin(futures_util::stream::empty());
                        return Poll::Ready(Some(Err(err)));
                    }
                }
            }
        }
    }
}
