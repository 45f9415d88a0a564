//! `providers::sse::SseDecoder` + `providers::openai::ChunkDecoder` on a realistic stream:
//! 200 one-token chunks with OpenAI's real envelope, fed in network-sized reads.

use std::{collections::VecDeque, hint::black_box};

use criterion::{Criterion, Throughput};
use llm_gateway::{
    providers::{
        openai::ChunkDecoder,
        sse::{EventDecoder, SseDecoder},
    },
    types::StreamEvent,
};

use crate::fixtures;

const CHUNKS: usize = 200;

/// Decodes a whole body fed in `read`-byte pieces; returns the number of stream events.
fn decode(body: &[u8], read: usize) -> usize {
    let mut sse = SseDecoder::new();
    let mut chunks = ChunkDecoder::default();
    let mut out = VecDeque::new();
    let mut events = 0;
    let mut done = false;
    for piece in body.chunks(read) {
        sse.push(piece);
        while let Some(event) = sse.next_event() {
            let event = event.expect("the fixture stream is well-formed");
            done |= chunks
                .decode(event, &mut out)
                .expect("the fixture stream decodes");
            events += out
                .drain(..)
                .filter(|e: &StreamEvent| e.is_content())
                .count();
        }
    }
    assert!(done, "the fixture stream ends with [DONE]");
    events
}

pub fn bench(c: &mut Criterion) {
    let body = fixtures::sse_body(CHUNKS);
    assert_eq!(decode(&body, 1024), CHUNKS);
    let mut g = c.benchmark_group("sse");
    g.throughput(Throughput::Elements(CHUNKS as u64));
    // Paced streams arrive one event per read; bursts arrive in larger reads.
    for read in [256, 16 * 1024] {
        g.bench_function(format!("openai_200_chunks_read_{read}"), |b| {
            b.iter(|| decode(black_box(&body), read));
        });
    }
    g.finish();
}
