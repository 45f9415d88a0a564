//! `server::convert`: what the handlers do before and after routing.

use std::{hint::black_box, time::Duration};

use criterion::{BatchSize, Criterion};
use llm_gateway::{
    executor::{Answer, CallEvent},
    models::Cost,
    server::convert,
    types::{
        AttemptKind, AttemptOutcome, AttemptRecord, ChatResponse, ContentPart, FinishReason, Route,
        Usage,
    },
};

use crate::fixtures;

fn route() -> Route {
    Route {
        policy: None,
        attempts: vec![AttemptRecord {
            provider: "openai".to_owned(),
            model: "gpt-4o-mini".to_owned(),
            kind: AttemptKind::Primary,
            outcome: AttemptOutcome::Succeeded,
            start_offset: Duration::from_micros(12),
            latency: Duration::from_millis(420),
            time_to_first_token: None,
        }],
        ..Route::default()
    }
}

fn usage() -> Usage {
    Usage {
        input_tokens: 64,
        output_tokens: 12,
        cached_input_tokens: Some(0),
        reasoning_tokens: Some(0),
        ..Usage::default()
    }
}

fn answer() -> Answer {
    Answer {
        response: ChatResponse {
            model: "gpt-4o-mini-2024-07-18".to_owned(),
            content: vec![ContentPart::Text(
                "Your order ships on Monday, Jane. You will get a tracking link by e-mail."
                    .to_owned(),
            )],
            finish_reason: FinishReason::Stop,
            usage: Some(usage()),
        },
        provider: "openai".to_owned(),
        cost: Some(Cost {
            input_usd: 0.000_009_6,
            output_usd: 0.000_007_2,
        }),
        route: route(),
        metrics: None,
        guardrails: Default::default(),
    }
}

pub fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("convert");
    g.bench_function("chat_request", |b| {
        b.iter_batched(
            fixtures::pb_request,
            |req| convert::chat_request(black_box(req)),
            BatchSize::SmallInput,
        );
    });
    g.bench_function("chat_response", |b| {
        b.iter_batched(
            answer,
            |a| convert::chat_response("4f9c2a1be07d3c55".to_owned(), black_box(a)),
            BatchSize::SmallInput,
        );
    });
    g.bench_function("stream_event_text", |b| {
        b.iter_batched(
            || CallEvent::Text(" Monday".to_owned()),
            |e| convert::stream_event("4f9c2a1be07d3c55", black_box(e)),
            BatchSize::SmallInput,
        );
    });
    g.bench_function("stream_event_finish", |b| {
        b.iter_batched(
            || CallEvent::Finish {
                reason: FinishReason::Stop,
                usage: Some(usage()),
                cost: None,
                route: route(),
                guardrails: Default::default(),
            },
            |e| convert::stream_event("4f9c2a1be07d3c55", black_box(e)),
            BatchSize::SmallInput,
        );
    });
    g.finish();
}
