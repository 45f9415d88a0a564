//! Guardrail scanning (`guard`): the cost per KiB of prompt with every built-in detector on
//! (goal: at most 5 us/KiB), and the stream scanner's cost per chunk of a streamed reply,
//! which is what it adds to the time to first token (goal: at most 1 ms p99).

use std::{hint::black_box, sync::Arc};

use criterion::{Criterion, Throughput};
use llm_gateway::guard::{
    CallState, Direction, Guarding, Profile, RawProfile, plain, stream::StreamScanner,
};

/// A prompt of prose with a few entities, `kib` KiB long.
fn prompt(kib: usize) -> String {
    let para = "The customer wrote in about their order and asked us to update the shipping \
        address before Friday. They can be reached at jane.doe@example.com or on \
        +44 20 7946 0958, and paid with 4111 1111 1111 1111. Please check the logs on host \
        10.0.0.12 (request id 7f3a9c21, version 2.14.3) and summarize the issue in three \
        short bullet points, keeping a friendly tone for the reply to the customer. ";
    let mut text = String::new();
    while text.len() < kib * 1024 {
        text.push_str(para);
    }
    text.truncate(kib * 1024);
    text
}

fn profile() -> Arc<Profile> {
    let raw = RawProfile {
        default_action: Some("redact".to_owned()),
        ..RawProfile::default()
    };
    let mut issues = llm_gateway::settings::Issues::new();
    Arc::new(Profile::from_raw("bench", raw, &mut issues).expect("a valid profile"))
}

#[expect(
    clippy::print_stderr,
    reason = "the per-chunk tail goes to stderr beside criterion's report"
)]
pub fn bench(c: &mut Criterion) {
    let p = profile();
    let mut group = c.benchmark_group("guard");
    for kib in [1, 16] {
        let text = prompt(kib);
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_function(format!("scan_{kib}kib_all_detectors"), |b| {
            b.iter(|| {
                let mut state = CallState::default();
                black_box(
                    p.rewrite(black_box(&text), Direction::Request, &mut state)
                        .len(),
                )
            })
        });
    }
    // A reply streamed in 4-byte chunks (about one token each): the cost of one chunk is
    // what scanning adds before that chunk's text can go out.
    let reply = prompt(2);
    let chunks: Vec<&str> = {
        let mut out = Vec::new();
        let mut at = 0;
        while at < reply.len() {
            let mut end = (at + 4).min(reply.len());
            while !reply.is_char_boundary(end) {
                end += 1;
            }
            out.push(&reply[at..end]);
            at = end;
        }
        out
    };
    group.throughput(Throughput::Elements(chunks.len() as u64));
    group.bench_function("stream_per_chunk", |b| {
        b.iter(|| {
            let mut g = Guarding::new(vec![p.clone()]);
            let mut s = StreamScanner::new(&g, plain);
            let mut sent = 0;
            for chunk in &chunks {
                sent += s
                    .push(black_box(chunk), &mut g)
                    .expect("nothing blocked")
                    .len();
            }
            sent += s.finish(&mut g).expect("nothing blocked").len();
            black_box(sent)
        })
    });
    group.throughput(Throughput::Elements(1));
    group.bench_function("stream_first_chunk", |b| {
        b.iter(|| {
            let mut g = Guarding::new(vec![p.clone()]);
            let mut s = StreamScanner::new(&g, plain);
            black_box(
                s.push(black_box("Hello! "), &mut g)
                    .expect("nothing blocked"),
            )
        })
    });
    group.finish();

    // The tail criterion does not report: every chunk of 500 streams of the same reply,
    // timed one by one (the scanner's cost before that chunk's text can go out), and the
    // start of a stream (a new scanner and its first chunk), which is what scanning adds
    // to the time to first token.
    let mut per_chunk = hdrhistogram::Histogram::<u64>::new(3).expect("a histogram");
    let mut first = hdrhistogram::Histogram::<u64>::new(3).expect("a histogram");
    for _ in 0..500 {
        let started = std::time::Instant::now();
        let mut g = Guarding::new(vec![p.clone()]);
        let mut s = StreamScanner::new(&g, plain);
        for (i, chunk) in chunks.iter().enumerate() {
            let at = std::time::Instant::now();
            let out = s.push(black_box(chunk), &mut g).expect("nothing blocked");
            let now = std::time::Instant::now();
            let _ = per_chunk.record((now - at).as_nanos() as u64);
            if i == 0 {
                let _ = first.record((now - started).as_nanos() as u64);
            }
            black_box(out);
        }
        black_box(s.finish(&mut g).expect("nothing blocked"));
    }
    eprintln!(
        "guard/stream: per chunk p50 {:.2} us, p99 {:.2} us, max {:.1} us; stream start (scanner + first chunk) p50 {:.2} us, p99 {:.2} us ({} chunks x 500 streams)",
        per_chunk.value_at_quantile(0.5) as f64 / 1e3,
        per_chunk.value_at_quantile(0.99) as f64 / 1e3,
        per_chunk.max() as f64 / 1e3,
        first.value_at_quantile(0.5) as f64 / 1e3,
        first.value_at_quantile(0.99) as f64 / 1e3,
        chunks.len(),
    );
}
