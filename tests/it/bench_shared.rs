//! Benchmark (ignored by `cargo test`; run with
//! `cargo test --test it -- --ignored bench_shared --nocapture`): what shared limits and
//! budgets on Redis add to a call at concurrency 64 and at concurrency 1 (each call
//! spending 20 ms upstream between admission and settlement), beside the in-memory limits,
//! the Redis commands the scripts run per call,
//! and the Redis round trips per call (counted with `INFO commandstats`, asserted: one
//! admission and one settlement script call per call, nothing else). Results go to
//! BENCHMARKS.md by hand; this never asserts a time. That first part runs with
//! `shared.credit_window = 0s` (every admission asks Redis); the same patterns then run
//! with credit (the default window), where most calls are admitted out of the replica's
//! block and the scripts per call are counted.
//!
//! The same run measures the floor: a bare round trip (`PING`, and an `EVALSHA` of a
//! script that returns at once) on the gateway's own connection type at concurrency 1 and
//! 64, printed beside what our scripts add, since on a shared machine most of the added
//! time is processes waking each other, not our scripts.
//!
//! Pinning (opt-in): `LLMGW_BENCH_REDIS_CPU=1` starts the test's redis-server under
//! `taskset -c 1`, so that Redis has a core of its own as on its own host; run the test
//! binary itself on the other core, e.g.
//! `LLMGW_BENCH_REDIS_CPU=1 taskset -c 0 cargo test --test it -- --ignored bench_shared --nocapture`
//! (cargo's child processes inherit the affinity; the value is any `taskset -c` CPU list).
//!
//! `bench_three_replicas_on_one_redis`: calls/s of one and of three gateway replicas (in
//! this process, gRPC over loopback, a gateway key with rate limits and a budget) against
//! one Redis, with the Redis commands per call (`INFO commandstats` deltas).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use llm_gateway::{
    limits::{Ask, BudgetCheck, Limits, SubjectLimits},
    shared::{Shared, SharedSettings},
};

use crate::{redis_server::RedisServer, scale_redis};

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
    run_at(limits, CONCURRENCY, PER_TASK, false).await
}

/// [`run`] with `concurrency` callers making `per_task` calls each; `stagger`: caller `i`
/// starts `i / concurrency` of [`UPSTREAM`] late, so that admissions arrive spread out
/// (steady traffic) instead of all callers asking in the same instant (a burst every
/// [`UPSTREAM`], as they move in lockstep).
async fn run_at(
    limits: &Arc<Limits>,
    concurrency: usize,
    per_task: usize,
    stagger: bool,
) -> (Vec<Duration>, Duration, Duration) {
    let subjects = limits.subjects(subjects());
    let cpu = process_cpu();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..concurrency {
        let (limits, subjects) = (limits.clone(), subjects.clone());
        tasks.push(tokio::spawn(async move {
            if stagger {
                tokio::time::sleep(UPSTREAM * i as u32 / concurrency as u32).await;
            }
            let mut out = Vec::with_capacity(per_task);
            for _ in 0..per_task {
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

/// A bare round trip for the floor: what Redis and the connection cost with nothing of ours
/// in between.
#[derive(Debug, Clone, Copy)]
enum Bare {
    /// `PING`.
    Ping,
    /// `EVALSHA` of a script that returns at once, with the admission's two keys and 19
    /// arguments (so the request is as large as an admission's).
    Evalsha,
}

/// The floor, measured in the same run and in the same pattern as [`run_at`]
/// (`concurrency` callers, `per_task` round trips each, [`UPSTREAM`] between two), on the
/// gateway's own Redis connection type: [`Shared::run`] over its multiplexed
/// `ConnectionManager`. Sorted latencies.
async fn floor_at(
    shared: &Arc<Shared>,
    bare: Bare,
    concurrency: usize,
    per_task: usize,
) -> Vec<Duration> {
    let script = Arc::new(redis::Script::new("return 1"));
    script.load_async(&mut shared.connection()).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (shared, script) = (shared.clone(), script.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(per_task);
            for _ in 0..per_task {
                let t = Instant::now();
                match bare {
                    Bare::Ping => {
                        let pong: String = shared
                            .run("bench", |mut conn| async move {
                                Ok(redis::cmd("PING").query_async(&mut conn).await?)
                            })
                            .await
                            .unwrap();
                        assert_eq!(pong, "PONG");
                    }
                    Bare::Evalsha => {
                        let mut inv = script.key("llmgw:key:bench:limits");
                        inv.key("llmgw:team:bench:limits");
                        for i in 0..19 {
                            inv.arg(i);
                        }
                        let one: i64 = shared
                            .run("bench", |mut conn| async move {
                                Ok(inv.invoke_async(&mut conn).await?)
                            })
                            .await
                            .unwrap();
                        assert_eq!(one, 1);
                    }
                }
                out.push(t.elapsed());
                tokio::time::sleep(UPSTREAM).await;
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    all
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

/// Microseconds Redis spent in `EVALSHA` so far (`INFO commandstats`).
fn evalsha_usec(redis: &RedisServer) -> f64 {
    redis
        .command("INFO commandstats")
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:"))
        .and_then(|l| l.split(',').find_map(|f| f.strip_prefix("usec=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
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
        // First without credit: every call asks Redis (the credit run comes after).
        credit_window: Duration::ZERO,
        ..SharedSettings::default()
    };
    let connection = Shared::connect(&settings).unwrap().unwrap();
    let shared = Limits::with_shared(Some(connection.clone()));
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
    let stats_before = redis.command_calls();
    let usec_before = evalsha_usec(&redis);
    let redis_cpu_before = redis_cpu(&redis);
    let (mut l, l_wall, l_cpu) = run(&local).await;
    let (mut s, s_wall, s_cpu) = run(&shared).await;
    // Settlements land after the calls.
    let settled = |before: u64, calls: u64| async move {
        let mut after = 0;
        for _ in 0..500 {
            after = evalsha();
            if after - before >= 2 * calls {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        after
    };
    let after = settled(before, calls).await;
    let redis_cpu_used = redis_cpu(&redis) - redis_cpu_before;
    let stats_after = redis.command_calls();
    let commands = command_delta(&stats_before, &stats_after);
    let script_usec = (evalsha_usec(&redis) - usec_before) / (2 * calls) as f64;
    assert_eq!(
        after - before,
        2 * calls,
        "one admission and one settlement per call, nothing else"
    );
    l.sort();
    s.sort();
    // Concurrency 1: the round trip alone, no queue at Redis.
    let calls_c1 = PER_TASK as u64 * 2;
    let (mut l1, _, _) = run_at(&local, 1, PER_TASK * 2, false).await;
    let before_c1 = evalsha();
    let redis_cpu_c1 = redis_cpu(&redis);
    let (mut s1, _, _) = run_at(&shared, 1, PER_TASK * 2, false).await;
    settled(before_c1, calls_c1).await;
    let redis_cpu_c1 = redis_cpu(&redis) - redis_cpu_c1;
    l1.sort();
    s1.sort();
    // Concurrency 64, callers staggered over the upstream time.
    let (mut l2, _, _) = run_at(&local, CONCURRENCY, PER_TASK, true).await;
    let before_st = evalsha();
    let (mut s2, _, _) = run_at(&shared, CONCURRENCY, PER_TASK, true).await;
    settled(before_st, calls).await;
    l2.sort();
    s2.sort();
    // With credit (the default window), the same three patterns: most calls are admitted
    // out of this replica's block, and only their settlement goes to Redis.
    let credited = Limits::with_shared(Some(
        Shared::connect(&SharedSettings {
            credit_window: SharedSettings::default().credit_window,
            ..settings.clone()
        })
        .unwrap()
        .unwrap(),
    ));
    credited.prepare().await;
    credited.background(&tracker, &stop);
    let quiet = || async {
        let mut last = evalsha();
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = evalsha();
            if now == last {
                break;
            }
            last = now;
        }
        last
    };
    run(&credited).await;
    let mut credit = Vec::new();
    for (c, n, stagger) in [
        (CONCURRENCY, PER_TASK, false),
        (1, PER_TASK * 2, false),
        (CONCURRENCY, PER_TASK, true),
    ] {
        let before = quiet().await;
        let (local_lat, _, _) = run_at(&local, c, n, stagger).await;
        let (mut lat, wall, cpu) = run_at(&credited, c, n, stagger).await;
        let scripts = quiet().await - before;
        let calls = (c * n) as u64;
        let mut local_lat = local_lat;
        local_lat.sort();
        lat.sort();
        credit.push(format!(
            "  concurrency {c}{}: p50 {:?} p99 {:?} (local p50 {:?} p99 {:?}); added p50 {:?} p99 {:?}; {:.0} calls/s, cpu {:.1} us/call; scripts per call {:.3} (1 settlement + {:.4} admissions and give-backs)",
            if stagger { " staggered" } else { "" },
            pct(&lat, 50.0),
            pct(&lat, 99.0),
            pct(&local_lat, 50.0),
            pct(&local_lat, 99.0),
            pct(&lat, 50.0).saturating_sub(pct(&local_lat, 50.0)),
            pct(&lat, 99.0).saturating_sub(pct(&local_lat, 99.0)),
            calls as f64 / wall.as_secs_f64(),
            cpu.as_secs_f64() * 1e6 / calls as f64,
            scripts as f64 / calls as f64,
            scripts.saturating_sub(calls) as f64 / calls as f64,
        ));
    }
    // The floor, last (its EVALSHAs would disturb the counts above): a bare round trip on
    // the same connection type, at concurrency 1 and 64, in the same pattern.
    let floor_usec_before = evalsha_usec(&redis);
    let floor_evals_before = evalsha();
    let mut floors = Vec::new();
    for (bare, c, n) in [
        (Bare::Ping, 1, PER_TASK * 2),
        (Bare::Evalsha, 1, PER_TASK * 2),
        (Bare::Ping, CONCURRENCY, PER_TASK),
        (Bare::Evalsha, CONCURRENCY, PER_TASK),
    ] {
        floors.push(((bare, c), floor_at(&connection, bare, c, n).await));
    }
    let floor_script_usec =
        (evalsha_usec(&redis) - floor_usec_before) / (evalsha() - floor_evals_before).max(1) as f64;
    let floor = |bare: &str, c: usize| {
        &floors
            .iter()
            .find(|((b, cc), _)| format!("{b:?}") == bare && *cc == c)
            .unwrap()
            .1
    };
    let side_by_side = |added: Duration, bare: &[Duration]| {
        format!(
            "added p50 {added:?} beside a bare EVALSHA round trip p50 {:?} ({:.1}x)",
            pct(bare, 50.0),
            added.as_secs_f64() / pct(bare, 50.0).as_secs_f64().max(1e-9)
        )
    };
    let floor_report = format!(
        "floor (a bare round trip, same connection type, same pattern, measured in this run; redis-server pinned: {}):\n  concurrency 1: PING p50 {:?} p99 {:?}; EVALSHA (returns at once) p50 {:?} p99 {:?}\n  concurrency 64: PING p50 {:?} p99 {:?}; EVALSHA (returns at once) p50 {:?} p99 {:?}\n  redis's own time per bare EVALSHA: {floor_script_usec:.1} us (ours: {script_usec:.1} us)\nside by side: concurrency 64 lockstep: {}; staggered: {}; concurrency 1: {}",
        crate::redis_server::pinned_cpu().unwrap_or_else(|| "no".to_owned()),
        pct(floor("Ping", 1), 50.0),
        pct(floor("Ping", 1), 99.0),
        pct(floor("Evalsha", 1), 50.0),
        pct(floor("Evalsha", 1), 99.0),
        pct(floor("Ping", CONCURRENCY), 50.0),
        pct(floor("Ping", CONCURRENCY), 99.0),
        pct(floor("Evalsha", CONCURRENCY), 50.0),
        pct(floor("Evalsha", CONCURRENCY), 99.0),
        side_by_side(
            pct(&s, 50.0).saturating_sub(pct(&l, 50.0)),
            floor("Evalsha", CONCURRENCY)
        ),
        side_by_side(
            pct(&s2, 50.0).saturating_sub(pct(&l2, 50.0)),
            floor("Evalsha", CONCURRENCY)
        ),
        side_by_side(
            pct(&s1, 50.0).saturating_sub(pct(&l1, 50.0)),
            floor("Evalsha", 1)
        ),
    );
    let per_call = |d: Duration| d.as_secs_f64() * 1e6 / calls as f64;
    let total: u64 = commands
        .iter()
        .filter(|(name, _)| name != "evalsha")
        .map(|(_, n)| n)
        .sum();
    #[expect(clippy::print_stderr, reason = "a benchmark reports its numbers")]
    {
        eprintln!(
            "calls {calls} at concurrency {CONCURRENCY}\nlocal: p50 {:?} p99 {:?}, {:.0} calls/s, cpu {:.1} us/call\nredis: p50 {:?} p99 {:?}, {:.0} calls/s, cpu {:.1} us/call here + {:.1} us/call in redis-server\nadded by redis: p50 {:?} p99 {:?}; redis round trips per call: 1 admission (+1 settlement off the call path)\ncommands inside the scripts per call (admission + settlement): {:.2} ({commands:?}); redis's own time per script call (INFO commandstats usec_per_call of evalsha): {script_usec:.1} us\nconcurrency 1, {calls_c1} calls: local p50 {:?} p99 {:?}; redis p50 {:?} p99 {:?}, {:.1} us/call in redis-server; added p50 {:?} p99 {:?}\nconcurrency 64, callers staggered: local p50 {:?} p99 {:?}; redis p50 {:?} p99 {:?}; added p50 {:?} p99 {:?}",
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
            total as f64 / calls as f64,
            pct(&l1, 50.0),
            pct(&l1, 99.0),
            pct(&s1, 50.0),
            pct(&s1, 99.0),
            redis_cpu_c1 * 1e6 / calls_c1 as f64,
            pct(&s1, 50.0).saturating_sub(pct(&l1, 50.0)),
            pct(&s1, 99.0).saturating_sub(pct(&l1, 99.0)),
            pct(&l2, 50.0),
            pct(&l2, 99.0),
            pct(&s2, 50.0),
            pct(&s2, 99.0),
            pct(&s2, 50.0).saturating_sub(pct(&l2, 50.0)),
            pct(&s2, 99.0).saturating_sub(pct(&l2, 99.0)),
        );
        eprintln!("{floor_report}");
        eprintln!(
            "with credit (shared.credit_window {:?}):\n{}",
            SharedSettings::default().credit_window,
            credit.join("\n")
        );
    }
    stop.cancel();
    tracker.close();
    tracker.wait().await;
}

/// Calls of one round of the replica benchmark.
const REPLICA_CALLS: usize = 3_000;

/// One closed-loop round: [`CONCURRENCY`] callers spread round-robin over `replicas`, each
/// making its share of `calls` chat calls (gateway key with rate limits and a budget, so
/// each call is admitted and settled on Redis); the calls' latencies and the wall time.
async fn replica_round(
    replicas: &[crate::common::Gateway],
    secret: &str,
    calls: usize,
) -> (Vec<Duration>, Duration) {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..CONCURRENCY {
        let mut client = replicas[i % replicas.len()].client();
        let secret = secret.to_owned();
        let share = calls / CONCURRENCY + usize::from(i < calls % CONCURRENCY);
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(share);
            for _ in 0..share {
                let t = Instant::now();
                client
                    .chat(scale_redis::authed(scale_redis::small(), &secret))
                    .await
                    .unwrap();
                out.push(t.elapsed());
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    (all, started.elapsed())
}

/// Redis commands run between two `INFO commandstats` snapshots, by command (the
/// snapshots' own INFO left out).
fn command_delta(
    before: &std::collections::HashMap<String, u64>,
    after: &std::collections::HashMap<String, u64>,
) -> Vec<(String, u64)> {
    let mut delta: Vec<(String, u64)> = after
        .iter()
        .filter(|(name, _)| name.as_str() != "info")
        .map(|(name, n)| (name.clone(), n - before.get(name).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect();
    delta.sort();
    delta
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run it on purpose (see the module docs)"]
async fn bench_three_replicas_on_one_redis() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut key = scale_redis::key("bench3");
    key.requests_per_minute = 100_000_000;
    key.tokens_per_minute = 1_000_000_000_000;
    key.daily_budget_usd = 1e9;
    let c = scale_redis::cluster(&redis, key, "timeout = \"5s\"\nlease_ttl = \"600s\"").await;
    let evalsha = || redis.command_calls().get("evalsha").copied().unwrap_or(0);
    let settled = |from: u64, calls: usize| async move {
        for _ in 0..500 {
            if evalsha() - from >= 2 * calls as u64 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    // Warm-up (connections, scripts loaded), then one replica, then all three.
    let from = evalsha();
    replica_round(&c.replicas, &c.secret, REPLICA_CALLS / 10).await;
    settled(from, REPLICA_CALLS / 10).await;
    let mut report = Vec::new();
    for n in [1, 3] {
        let before = redis.command_calls();
        let (cpu, redis_cpu_before) = (process_cpu(), redis_cpu(&redis));
        let (lat, wall) = replica_round(&c.replicas[..n], &c.secret, REPLICA_CALLS).await;
        let cpu = process_cpu() - cpu;
        settled(before.get("evalsha").copied().unwrap_or(0), REPLICA_CALLS).await;
        let delta = command_delta(&before, &redis.command_calls());
        let total: u64 = delta.iter().map(|(_, n)| n).sum();
        report.push(format!(
            "{n} replica(s), {REPLICA_CALLS} calls at concurrency {CONCURRENCY}: {:.0} calls/s, p50 {:?} p99 {:?}, cpu {:.0} us/call (whole test process: client, mock, replicas) + {:.1} us/call in redis-server; redis commands per call {:.3} ({delta:?})",
            REPLICA_CALLS as f64 / wall.as_secs_f64(),
            pct(&lat, 50.0),
            pct(&lat, 99.0),
            cpu.as_secs_f64() * 1e6 / REPLICA_CALLS as f64,
            (redis_cpu(&redis) - redis_cpu_before) * 1e6 / REPLICA_CALLS as f64,
            total as f64 / REPLICA_CALLS as f64,
        ));
    }
    #[expect(clippy::print_stderr, reason = "a benchmark reports its numbers")]
    {
        eprintln!("{}", report.join("\n"));
    }
}
