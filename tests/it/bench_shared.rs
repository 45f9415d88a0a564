//! Benchmark (ignored by `cargo test`; run with
//! `cargo test --test it -- --ignored bench_shared --nocapture`): what shared limits and
//! budgets on Redis add to a call at concurrency 64 (each call spending 20 ms upstream
//! between admission and settlement), beside the in-memory limits,
//! and the Redis round trips per call (counted with `INFO commandstats`, asserted: one
//! admission and one settlement script call per call, nothing else). Results go to
//! BENCHMARKS.md by hand; this never asserts a time.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use llm_gateway::{
    limits::{Ask, BudgetCheck, Limits, SubjectLimits},
    shared::{Shared, SharedSettings},
};

use crate::redis_server::RedisServer;

const CONCURRENCY: usize = 64;
const PER_TASK: usize = 100;
/// What each call spends upstream between its admission and its settlement.
const UPSTREAM: Duration = Duration::from_millis(20);

fn subjects() -> Vec<SubjectLimits> {
    vec![
        SubjectLimits {
            subject: "key:bench".into(),
            requests_per_minute: 100_000_000,
            tokens_per_minute: 1_000_000_000_000,
            max_concurrent_streams: 0,
            daily_budget_usd: 1e9,
            monthly_budget_usd: 1e9,
        },
        SubjectLimits {
            subject: "team:bench".into(),
            requests_per_minute: 100_000_000,
            tokens_per_minute: 1_000_000_000_000,
            max_concurrent_streams: 0,
            daily_budget_usd: 1e9,
            monthly_budget_usd: 0.0,
        },
    ]
}

/// CPU time (user + system) of this process so far.
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// Admission latencies at concurrency 64, each call holding its permit for [`UPSTREAM`]
/// (as a real call would) before it settles.
async fn run(limits: &Arc<Limits>) -> (Vec<Duration>, Duration, Duration) {
    let subjects = limits.subjects(subjects());
    let cpu = process_cpu();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (limits, subjects) = (limits.clone(), subjects.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(PER_TASK);
            for _ in 0..PER_TASK {
                let t = Instant::now();
                let ask = Ask {
                    subjects: subjects.clone(),
                    estimated_tokens: 300,
                    stream: false,
                    estimated_usd: 0.0002,
                    budget: BudgetCheck::Reserve,
                };
                let mut permit = limits.admit(ask, 1_797_314_400_000).await.unwrap();
                out.push(t.elapsed());
                tokio::time::sleep(UPSTREAM).await;
                permit.settle(Some(250), Some(0.00015), 1_797_314_400_000);
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    (all, started.elapsed(), process_cpu() - cpu)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p / 100.0) as usize).min(sorted.len() - 1)]
}

fn redis_cpu(redis: &RedisServer) -> f64 {
    let info = redis.command("INFO cpu");
    info.lines()
        .filter_map(|l| {
            l.strip_prefix("used_cpu_user:")
                .or_else(|| l.strip_prefix("used_cpu_sys:"))
        })
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run it on purpose (see the module docs)"]
async fn bench_shared_limits_at_concurrency_64() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let settings = SharedSettings {
        redis_url: Some(redis.url()),
        timeout: Duration::from_secs(5),
        // No renewal inside the run: only admissions and settlements reach Redis.
        lease_ttl: Duration::from_secs(600),
        ..SharedSettings::default()
    };
    let shared = Limits::with_shared(Shared::connect(&settings).unwrap());
    shared.prepare().await;
    let tracker = tokio_util::task::TaskTracker::new();
    let stop = tokio_util::sync::CancellationToken::new();
    shared.background(&tracker, &stop);
    let local = Limits::new();

    // Warm up both (and let the warm-up's settlements land), then measure.
    let calls = (CONCURRENCY * PER_TASK) as u64;
    run(&local).await;
    run(&shared).await;
    let evalsha = || redis.command_calls().get("evalsha").copied().unwrap_or(0);
    for _ in 0..500 {
        if evalsha() >= 2 * calls {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = evalsha();
    let redis_cpu_before = redis_cpu(&redis);
    let (mut l, l_wall, l_cpu) = run(&local).await;
    let (mut s, s_wall, s_cpu) = run(&shared).await;
    // Settlements land after the calls.
    let mut after = 0;
    for _ in 0..500 {
        after = evalsha();
        if after - before >= 2 * calls {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let redis_cpu_used = redis_cpu(&redis) - redis_cpu_before;
    assert_eq!(
        after - before,
        2 * calls,
        "one admission and one settlement per call, nothing else"
    );
    l.sort();
    s.sort();
    let per_call = |d: Duration| d.as_secs_f64() * 1e6 / calls as f64;
    #[expect(clippy::print_stderr, reason = "a benchmark reports its numbers")]
    {
        eprintln!(
            "calls {calls} at concurrency {CONCURRENCY}\nlocal: p50 {:?} p99 {:?}, {:.0} calls/s, cpu {:.1} us/call\nredis: p50 {:?} p99 {:?}, {:.0} calls/s, cpu {:.1} us/call here + {:.1} us/call in redis-server\nadded by redis: p50 {:?} p99 {:?}; redis round trips per call: 1 admission (+1 settlement off the call path)",
            pct(&l, 50.0),
            pct(&l, 99.0),
            calls as f64 / l_wall.as_secs_f64(),
            per_call(l_cpu),
            pct(&s, 50.0),
            pct(&s, 99.0),
            calls as f64 / s_wall.as_secs_f64(),
            per_call(s_cpu),
            redis_cpu_used * 1e6 / calls as f64,
            pct(&s, 50.0).saturating_sub(pct(&l, 50.0)),
            pct(&s, 99.0).saturating_sub(pct(&l, 99.0)),
        );
    }
    stop.cancel();
    tracker.close();
    tracker.wait().await;
}
