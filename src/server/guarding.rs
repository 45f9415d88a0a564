//! The guard stage of the call engine ([`super::engine`]): which guardrail profiles apply to
//! a call (the key's forced profile first, then the policy's), and the reply stream passed
//! through [`crate::guard::stream::StreamScanner`]s (text, reasoning, and each tool call's
//! arguments apart), flushed before the finish event.

use std::{
    collections::{BTreeMap, VecDeque},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use futures_util::Stream;

use super::engine::Events;
use crate::{
    auth::Caller,
    error::GatewayError,
    executor::CallEvent,
    guard::{GuardSettings, Guarding, json_escaped, plain, stream::StreamScanner},
    routing::{Plan, RoutingTable},
    types::ToolCallDelta,
};

/// The configured profiles, looked up per call.
#[derive(Clone, Default)]
pub struct GuardStage {
    settings: Arc<GuardSettings>,
}

impl GuardStage {
    /// A stage over these profiles.
    pub fn new(settings: Arc<GuardSettings>) -> Self {
        Self { settings }
    }

    /// The guardrails of one call: the key's forced profile, then its policy's. A profile
    /// that is named but not configured fails the call closed.
    pub fn for_call(
        &self,
        caller: Option<&Caller>,
        table: &RoutingTable,
        plan: &Plan,
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
        Ok(Guarding::new(profiles))
    }
}

/// The committed stream with its reply scanned; unchanged when nothing watches replies.
pub fn guard_stream(events: Events, guarding: Guarding) -> Events {
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
