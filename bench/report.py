#!/usr/bin/env python3
"""Writes BENCHMARKS.md from one run of bench/run.sh.

usage: report.py RUN_DIR OUT

RUN_DIR holds machine.env and runs/<name>.{cmd,json,...} as bench/run.sh leaves them. The
hand-written analysis between the `<!-- analysis:begin -->` and `<!-- analysis:end -->`
markers of an existing OUT is kept.
"""

import json
import os
import sys

BEGIN = "<!-- analysis:begin -->"
END = "<!-- analysis:end -->"
EXEC_BEGIN = "<!-- executor:begin -->"
EXEC_END = "<!-- executor:end -->"
BATCH_BEGIN = "<!-- batch:begin -->"
BATCH_END = "<!-- batch:end -->"


def main():
    run_dir, out = sys.argv[1], sys.argv[2]
    runs = os.path.join(run_dir, "runs")
    machine = {}
    with open(os.path.join(run_dir, "machine.env")) as f:
        for line in f:
            if "=" in line:
                k, v = line.rstrip("\n").split("=", 1)
                machine[k] = v

    def result(name):
        try:
            with open(os.path.join(runs, name + ".json")) as f:
                return json.loads(f.read())
        except (OSError, ValueError):
            return None

    def best(prefix):
        """The round of a scenario-1 case with the most calls/s (the least disturbed one)."""
        rounds = [result(n[: -len(".json")]) for n in sorted(os.listdir(runs))
                  if n.startswith(prefix + "-r") and n.endswith(".json")]
        rounds = [r for r in rounds if r is not None]
        return max(rounds, key=lambda r: r["rps"]) if rounds else None

    def text(name, ext):
        try:
            with open(os.path.join(runs, name + "." + ext)) as f:
                return f.read().strip()
        except OSError:
            return None

    lines = []
    w = lines.append
    goals = []  # (scenario, goal, measured, status)

    def goal(scenario, desc, value, ok, fmt):
        if value is None and machine.get("overhead_only") == "1" and scenario != "1":
            goals.append((scenario, desc, "not run (`--overhead-only`)", "not measured"))
        elif value is None:
            goals.append((scenario, desc, "not measured", "**missed** (no result)"))
        else:
            goals.append((scenario, desc, fmt(value), "met" if ok(value) else "**missed**"))

    def lat(r, key, q):
        try:
            return r[key][q]
        except (TypeError, KeyError):
            return None

    def cpu(r):
        try:
            return r["cpu"]["us_per_call"]
        except (TypeError, KeyError):
            return None

    def errors(r):
        if r is None:
            return None
        return sum(r["errors"].values())

    def errs_text(r):
        if r is None:
            return "-"
        if not r["errors"]:
            return "0"
        return ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items()))

    def us(v):
        return "-" if v is None else f"{v:,}"

    def mib(kib):
        return "-" if kib is None else f"{kib / 1024:.1f}"

    # --------------------------------------------------------------------------------------
    w("# Benchmarks")
    w("")
    w(
        "Written by `bench/run.sh` from one run; do not edit by hand except the analysis "
        "section, which the script keeps. Re-run with `bench/run.sh` (10-minute soak) or "
        "`bench/run.sh --quick` (60 s soak). Raw outputs stay in `target/bench/<timestamp>/`."
    )
    w("")
    dirty = machine.get("dirty", "0")
    w(
        f"Run of {machine.get('date', '?')}, revision `{machine.get('revision', '?')}`"
        + (f" with {dirty} modified tracked file(s)" if dirty not in ("", "0") else "")
        + f", soak {machine.get('soak', '?')} after a {machine.get('soak_warmup', '?')} warm-up."
    )
    w("")
    w("## Machine")
    w("")
    mem = int(machine.get("mem_kib", "0") or 0)
    w("| | |")
    w("|---|---|")
    w(f"| CPU | {machine.get('cpu', '?')}, {machine.get('nproc', '?')} cores (nproc) |")
    w(f"| Memory | {mem / 1024 / 1024:.1f} GiB |")
    w(f"| Kernel | {machine.get('kernel', '?')} |")
    w(f"| Rust | {machine.get('rustc', '?')} |")
    w(
        f"| Load average (1/5/15 min) | start {machine.get('loadavg_start', '?')}, "
        f"end {machine.get('loadavg_end', '?')} |"
    )
    w(f"| Open files limit | {machine.get('ulimit_n', '?')} |")
    upstream = "HTTP/2 (h2c)" if machine.get("upstream_h2c") == "1" else "HTTP/1.1"
    w(f"| Upstream protocol (gateway and baseline to the mock) | {upstream} |")
    w("")
    w(
        "Everything runs on this machine over 127.0.0.1: the mock upstream, the server under "
        "test (the bare baseline or the gateway, never both at once), and the load generator "
        "share the cores. The machine is shared with other work; the load average above shows "
        "how busy it was. CPU time per call is the server process's utime + stime "
        "(`/proc/PID/stat`) over the measured calls: it depends much less on other work than "
        "latency and throughput do, though it still varies with scheduling, most at "
        "concurrency 1."
    )
    w("")

    # --------------------------------------------------------------------------------------
    w("## Scenario 1: overhead")
    w("")
    w(
        "The mock answers at once (0 ms). Unary `Chat` and streaming `ChatStream` (4 content "
        "chunks), closed loop, at concurrency 1 (one connection) and 64 (four connections), "
        "after a 2 s warm-up; the baseline and the gateway in the same run, "
        f"{machine.get('rounds', '1')} round(s) each, alternating; each row is the round with "
        "the most calls/s. Latencies in microseconds; a stream's latency is the time to its "
        "`finish` event, TTFT the time to its first content."
    )
    w("")
    w(
        "| rpc | concurrency | server | calls | errors | calls/s | p50 | p90 | p99 | p99.9 "
        "| max | TTFT p50 | TTFT p99 | CPU us/call |"
    )
    w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    before_rev = machine.get("before", "")
    servers = ("baseline", "before", "gateway") if best("s1-chat-c64-before") else ("baseline", "gateway")
    for rpc in ("chat", "stream"):
        for c in ("c1", "c64"):
            for t in servers:
                r = best(f"s1-{rpc}-{c}-{t}")
                if r is None:
                    w(f"| {rpc} | {c[1:]} | {t} | no result | | | | | | | | | | |")
                    continue
                w(
                    f"| {rpc} | {c[1:]} | {t} | {r['calls']:,} | {errs_text(r)} | "
                    f"{r['rps']:,.0f} | {us(lat(r, 'latency_us', 'p50'))} | "
                    f"{us(lat(r, 'latency_us', 'p90'))} | {us(lat(r, 'latency_us', 'p99'))} | "
                    f"{us(lat(r, 'latency_us', 'p999'))} | {us(lat(r, 'latency_us', 'max'))} | "
                    f"{us(lat(r, 'ttft_us', 'p50'))} | {us(lat(r, 'ttft_us', 'p99'))} | "
                    f"{cpu(r) if cpu(r) is not None else '-'} |"
                )
    w("")
    if "before" in servers:
        w(f"`before` is the gateway binary of an earlier revision ({before_rev}), run in the same "
          "run for comparison.")
        w("")
    w("| rpc | gateway/baseline calls/s at 64 | added p50 at 1 | added p99 at 1 | CPU us/call at 64: gateway (baseline) | at 1: gateway (baseline) | CPU ratio at 64 | before: CPU at 64, ratio |")
    w("|---|---|---|---|---|---|---|---|")
    for rpc in ("chat", "stream"):
        b64, g64 = best(f"s1-{rpc}-c64-baseline"), best(f"s1-{rpc}-c64-gateway")
        b1, g1 = best(f"s1-{rpc}-c1-baseline"), best(f"s1-{rpc}-c1-gateway")
        ratio = g64["rps"] / b64["rps"] if g64 and b64 and b64["rps"] else None
        add50 = (
            lat(g1, "latency_us", "p50") - lat(b1, "latency_us", "p50")
            if lat(g1, "latency_us", "p50") is not None and lat(b1, "latency_us", "p50") is not None
            else None
        )
        add99 = (
            lat(g1, "latency_us", "p99") - lat(b1, "latency_us", "p99")
            if lat(g1, "latency_us", "p99") is not None and lat(b1, "latency_us", "p99") is not None
            else None
        )
        cpu_ratio = cpu(g64) / cpu(b64) if cpu(g64) and cpu(b64) else None
        f64 = best(f"s1-{rpc}-c64-before")
        before_ratio = cpu(f64) / cpu(b64) if cpu(f64) and cpu(b64) else None
        w(
            f"| {rpc} | {'-' if ratio is None else f'{ratio:.2f}x'} | {us(add50)} us | "
            f"{us(add99)} us | {cpu(g64)} ({cpu(b64)}) | {cpu(g1)} ({cpu(b1)}) | "
            f"{'-' if cpu_ratio is None else f'{cpu_ratio:.2f}x'} | "
            + ("-" if f64 is None else f"{cpu(f64)}, {'-' if before_ratio is None else f'{before_ratio:.2f}x'}")
            + " |"
        )
        name = "unary" if rpc == "chat" else "streaming"
        goal("1", f"{name}: max calls/s >= 0.8x baseline", ratio, lambda v: v >= 0.8,
             lambda v: f"{v:.2f}x")
        goal("1", f"{name}: added latency p50 at concurrency 1 <= 60 us", add50,
             lambda v: v <= 60, lambda v: f"{v:,} us")
        goal("1", f"{name}: added latency p99 at concurrency 1 <= 200 us", add99,
             lambda v: v <= 200, lambda v: f"{v:,} us")
        goal("1", f"{name}: gateway CPU per call (at concurrency 64) <= 1.3x baseline", cpu_ratio,
             lambda v: v <= 1.3,
             lambda v, g=g64, b=b64: f"{v:.2f}x ({cpu(g)} us, baseline {cpu(b)} us)")
    w("")

    # --------------------------------------------------------------------------------------
    cg = {(rpc, t): result(f"cg-{rpc}-{t}") for rpc in ("chat", "stream")
          for t in ("baseline", "before", "gateway")}
    alloc = result("alloc")
    if any(cg.values()) or alloc:
        w("## Instructions and allocations per call")
        w("")
        w(
            "Instructions: each server under callgrind (user space only, so steady on a busy "
            "machine), 300 warm-up calls, counters zeroed, then 1,000 calls at concurrency 4 "
            "(streams: 4 content chunks); the server's instructions over them per call."
        )
        w("")
        w("| rpc | baseline | before | gateway | gateway / baseline | before / baseline |")
        w("|---|---|---|---|---|---|")
        for rpc in ("chat", "stream"):
            vals = {t: (cg[(rpc, t)] or {}).get("per_call") for t in ("baseline", "before", "gateway")}
            k = lambda v: "-" if v is None else f"{v / 1000:,.0f}k"
            rr = lambda a, b: "-" if not a or not b else f"{a / b:.2f}x"
            w(f"| {rpc} | {k(vals['baseline'])} | {k(vals['before'])} | {k(vals['gateway'])} | "
              f"{rr(vals['gateway'], vals['baseline'])} | {rr(vals['before'], vals['baseline'])} |")
        w("")
        if alloc:
            w(
                f"Allocations: `cargo {text('alloc', 'profile') or 'bench'} --bench e2e -- --alloc-only` (the gateway in-process "
                "with the Prometheus recorder, the ledger and an info log subscriber; counted "
                "only on the gateway's runtime threads): "
                f"**{alloc['unary_allocs']:.1f} per unary call** ({alloc['unary_bytes']:,.0f} bytes), "
                f"{alloc['stream_allocs']:.1f} per stream of {alloc['stream_chunks']} chunks, "
                f"**{alloc['chunk_allocs']:.2f} per further stream chunk** ({alloc['chunk_bytes']:,.0f} bytes)."
            )
            w("")
        goal("1", "allocations per stream chunk <= 2", alloc and alloc.get("chunk_allocs"),
             lambda v: v <= 2, lambda v: f"{v:.2f} (unary call: {alloc['unary_allocs']:.1f})")

    # --------------------------------------------------------------------------------------
    w("## Scenario 2: many streams")
    w("")
    w(
        "10,000 `ChatStream` calls over 100 HTTP/2 connections; every stream must end with its "
        "`finish` event. RSS is the server's (peak: VmHWM); CPU is the server's per stream."
    )
    w("")
    w(
        "- **2, as specified**: the mock paces a chunk every 100 ms (50 one-character content "
        "chunks, ~5.3 s per stream by design), callers started over 3 s, so all 10,000 are "
        "open together. That is 100,000 chunks/s through the server under test while they are."
    )
    w(
        "- **2b, a chunk per second**: the same 10,000 streams with a chunk every 1 s (7 chunks, "
        "~10 s per stream), started over 5 s: 10,000 chunks/s, for time to first token on a "
        "machine that is not saturated. By design the first content arrives after 1 s."
    )
    w("")
    w("| variant | server | calls | completed with finish | errors | peak in flight | TTFT p50 | TTFT p99 | TTFT max | total p50 | total p99 | peak RSS MiB | CPU us/stream |")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    s2 = {}
    for variant, prefix in (("2", "s2-streams-10k"), ("2b", "s2b-streams-10k-1s")):
        for t in ("baseline", "gateway"):
            r = result(f"{prefix}-{t}")
            s2[(variant, t)] = r
            if r is None:
                w(f"| {variant} | {t} | no result | | | | | | | | | | |")
                continue
            w(
                f"| {variant} | {t} | {r['calls']:,} | {r['ok']:,} | {errs_text(r)} | "
                f"{r['peak_inflight']:,} | {us(lat(r, 'ttft_us', 'p50'))} | "
                f"{us(lat(r, 'ttft_us', 'p99'))} | {us(lat(r, 'ttft_us', 'max'))} | "
                f"{us(lat(r, 'latency_us', 'p50'))} | {us(lat(r, 'latency_us', 'p99'))} | "
                f"{mib((r.get('rss_kib') or {}).get('hwm'))} | "
                f"{cpu(r) if cpu(r) is not None else '-'} |"
            )
    w("")
    # The mock sends the first content one chunk delay after the request: 100 ms in 2.
    saturated = False
    b2 = s2[("2", "baseline")]
    if lat(b2, "ttft_us", "p50") is not None and lat(b2, "ttft_us", "p50") > 300_000:
        saturated = True
        w(
            f"In variant 2 even the baseline's median TTFT was {lat(b2, 'ttft_us', 'p50') / 1000:,.0f} ms "
            f"against the 100 ms the mock paces, and its streams took "
            f"{lat(b2, 'latency_us', 'p50') / 1e6:.1f} s instead of 5.3 s: this machine cannot "
            "carry 100,000 chunks/s through mock, server and load generator on its cores, so "
            "TTFT there measures queueing on a saturated machine, not the server. The TTFT "
            "goal is judged on variant 2b."
        )
        w("")
    for variant in ("2", "2b"):
        g = s2[(variant, "gateway")]
        goal("2", f"{variant}: all 10,000 streams complete with a finish event",
             None if g is None else (g["ok"], errors(g)),
             lambda v: v[0] == 10000 and v[1] == 0,
             lambda v: f"{v[0]:,} of 10,000, {v[1]:,} errors")
    hwms = [(s2[(v, "gateway")].get("rss_kib") or {}).get("hwm")
            for v in ("2", "2b") if s2[(v, "gateway")] is not None]
    hwms = [h for h in hwms if h is not None]
    goal("2", "gateway peak RSS <= 300 MiB (both variants)", max(hwms) if hwms else None,
         lambda v: v <= 300 * 1024, lambda v: f"{v / 1024:.1f} MiB")
    rss_ratios = []
    for v in ("2", "2b"):
        g, b = s2[(v, "gateway")], s2[(v, "baseline")]
        gh = ((g or {}).get("rss_kib") or {}).get("hwm")
        bh = ((b or {}).get("rss_kib") or {}).get("hwm")
        if gh and bh:
            rss_ratios.append(gh / bh)
    goal("2", "gateway peak RSS <= 1.1x the baseline's (both variants)",
         max(rss_ratios) if rss_ratios else None, lambda v: v <= 1.1, lambda v: f"{v:.2f}x")
    ttft_variant = "2b" if saturated else "2"
    g, b = s2[(ttft_variant, "gateway")], s2[(ttft_variant, "baseline")]
    add_ttft = (
        lat(g, "ttft_us", "p99") - lat(b, "ttft_us", "p99")
        if lat(g, "ttft_us", "p99") is not None and lat(b, "ttft_us", "p99") is not None
        else None
    )
    goal("2", f"added TTFT p99 over the baseline <= 1 ms (variant {ttft_variant})", add_ttft,
         lambda v: v <= 1000, lambda v: f"{v:,} us")

    # --------------------------------------------------------------------------------------
    w("## Scenario 3: tail cutting")
    w("")
    w(
        "A heavy-tailed upstream (50 ms; 2% of calls take 2 s) behind two targets, open-loop "
        "load at 200 calls/s for 20 s through a policy without hedging and one that hedges "
        "after 100 ms. Extra upstream requests are counted at the mock."
    )
    w("")
    w("| policy | calls ok | errors | p50 (us) | p90 (us) | p99 (us) | p99.9 (us) | upstream requests | extra |")
    w("|---|---|---|---|---|---|---|---|---|")
    s3 = {}
    for policy in ("tail-nohedge", "tail-hedge"):
        r = result("s3-" + policy)
        upstream = text("s3-" + policy, "upstream")
        if r is None or upstream is None:
            w(f"| {policy} | not measured | | | | | | | |")
            continue
        sent = r["ok"] + errors(r)
        extra = (int(upstream) - sent) / sent * 100 if sent else None
        s3[policy] = (r, extra)
        w(
            f"| {policy} | {r['ok']:,} | {errors(r):,} | {us(lat(r, 'latency_us', 'p50'))} | "
            f"{us(lat(r, 'latency_us', 'p90'))} | {us(lat(r, 'latency_us', 'p99'))} | "
            f"{us(lat(r, 'latency_us', 'p999'))} | {int(upstream):,} | "
            + (f"{extra:+.1f}%" if extra is not None else "") + " |"
        )
    w("")
    cut = None
    extra = None
    if "tail-nohedge" in s3 and "tail-hedge" in s3:
        p99_off = lat(s3["tail-nohedge"][0], "latency_us", "p99")
        p99_on = lat(s3["tail-hedge"][0], "latency_us", "p99")
        if p99_off and p99_on:
            cut = p99_off / p99_on
        extra = s3["tail-hedge"][1]
    goal("3", "hedging cuts p99 by >= 5x", cut, lambda v: v >= 5, lambda v: f"{v:.1f}x")
    goal("3", "with <= 5% extra upstream requests", extra, lambda v: v <= 5, lambda v: f"{v:+.1f}%")

    w("## Scenario 4: deadlines")
    w("")
    w(
        "The primary target hangs, the fallback is healthy (policy `deadline-failover`, "
        "attempt timeout 100 ms); callers set a 300 ms deadline, open loop at 100 calls/s for "
        "20 s."
    )
    w("")
    s4 = result("s4-deadlines")
    if s4 is None:
        w("Not measured.")
    else:
        sent = s4["ok"] + errors(s4)
        w(
            f"{s4['ok']:,} of {sent:,} calls succeeded; latency p50 {us(lat(s4, 'latency_us', 'p50'))}, "
            f"p99 {us(lat(s4, 'latency_us', 'p99'))}, max {us(lat(s4, 'latency_us', 'max'))}; "
            f"errors: {errs_text(s4)}; worst overrun past the deadline: "
            + (
                f"{s4['max_overrun_us']:,} us"
                if (s4.get("max_overrun_us") or 0) > 0
                else "none (every call ended before its deadline)"
            )
            + "."
        )
    w("")
    share = (s4["ok"] / (s4["ok"] + errors(s4)) * 100) if s4 and (s4["ok"] + errors(s4)) else None
    goal("4", "share of calls that succeed = 100%", share, lambda v: v >= 100, lambda v: f"{v:.2f}%")
    overrun = max(0, s4.get("max_overrun_us") or 0) if s4 else None
    goal("4", "worst overrun past the deadline <= 5 ms", overrun, lambda v: v <= 5000,
         lambda v: f"{v:,} us" if v > 0 else "0 (no call passed its deadline)")

    # --------------------------------------------------------------------------------------
    w("## Scenario 5: memory")
    w("")

    def rss_file(name):
        v = text(name, "rss")
        return int(v) if v and v.isdigit() else None

    idle_g, idle_b = rss_file("s5-idle-gateway"), rss_file("s5-idle-baseline")
    idle_after = rss_file("s5-idle-after-load-gateway")
    load_g = best("s1-chat-c64-gateway")
    load_rss = None if load_g is None else (load_g.get("rss_kib") or {}).get("max")
    soak = result("s5-soak-gateway")
    rate = text("s5-soak", "rate")
    w("| measure | gateway | baseline |")
    w("|---|---|---|")
    w(f"| idle RSS after start, MiB | {mib(idle_g)} | {mib(idle_b)} |")
    w(f"| idle RSS after scenario 1, MiB | {mib(idle_after)} | |")
    w(f"| RSS under load (unary, concurrency 64, max sampled), MiB | {mib(load_rss)} | "
      f"{mib(((best('s1-chat-c64-baseline') or {}).get('rss_kib') or {}).get('max'))} |")
    w("")
    growth = None
    if soak is not None:
        rk = soak.get("rss_kib") or {}
        start, end, mx = rk.get("start"), rk.get("end"), rk.get("max")
        if start and end:
            growth = (end - start) / start * 100
        timeline = soak.get("rss_timeline_kib") or []
        half = None
        if len(timeline) >= 4 and timeline[len(timeline) // 2]:
            mid = timeline[len(timeline) // 2]
            half = (timeline[-1] - mid) / mid * 100
        w(
            f"Soak: open loop at {rate} calls/s (half the gateway's maximum unary rate in "
            f"scenario 1) for {machine.get('soak', '?')} after a {machine.get('soak_warmup', '?')} "
            f"warm-up: {soak['calls']:,} calls, errors {errs_text(soak)}; latency p50 "
            f"{us(lat(soak, 'latency_us', 'p50'))} us, p99 {us(lat(soak, 'latency_us', 'p99'))} us, "
            f"p99.9 {us(lat(soak, 'latency_us', 'p999'))} us, max {us(lat(soak, 'latency_us', 'max'))} us "
            f"(from the intended send times). RSS after warm-up {mib(start)} MiB, at the end "
            f"{mib(end)} MiB, highest sample {mib(mx)} MiB"
            + ("" if half is None else f"; growth over the second half of the soak {half:+.1f}%")
            + f"; CPU {cpu(soak)} us per call."
        )
        if timeline:
            step = max(1, len(timeline) // 20)
            w("")
            w(
                "RSS during the soak (MiB, every "
                f"{step} s): " + ", ".join(f"{v / 1024:.1f}" for v in timeline[::step])
            )
    else:
        w("Soak: no result.")
    w("")
    goal("5", "idle RSS <= 30 MiB", idle_g, lambda v: v <= 30 * 1024, lambda v: f"{v / 1024:.1f} MiB")
    goal("5", "soak: RSS growth after warm-up <= 5%", growth, lambda v: v <= 5, lambda v: f"{v:+.1f}%")
    goal("5", "soak: zero errors", errors(soak), lambda v: v == 0, lambda v: f"{v:,} errors")

    # --------------------------------------------------------------------------------------
    summary = [
        "## Goals",
        "",
        "| scenario | goal | measured | status |",
        "|---|---|---|---|",
    ]
    for s, d, m, st in goals:
        summary.append(f"| {s} | {d} | {m} | {st} |")
    summary.append("")
    idx = lines.index("## Scenario 1: overhead")
    lines[idx:idx] = summary

    # --------------------------------------------------------------------------------------
    w("## Micro-benchmarks")
    w("")
    w(
        "`cargo bench --bench micro` (criterion, `benches/micro/`) measures the per-call "
        "work without the network: request validation and conversion (`convert`), OpenAI "
        "request building and response parsing (`openai`), SSE plus chunk decoding of a "
        "200-chunk stream (`sse`), and routing plus the executor around an instant fake "
        "provider (`executor`). They are not part of this script's run. Benchmarks of "
        "routing-policy selection are pending: not written yet."
    )
    w("")

    # --------------------------------------------------------------------------------------
    w("## Commands")
    w("")
    w("Each load run, as `bench/run.sh` ran it (ports are picked free per run; the gateway's "
      "config is in `target/bench/<timestamp>/gateway.toml`):")
    w("")
    w("```")
    for name in sorted(os.listdir(runs)):
        if name.endswith(".cmd"):
            with open(os.path.join(runs, name)) as f:
                w(f.read().strip())
    w("```")
    w("")
    w("How busy the machine was around each run (cores busy in the second before it, from "
      "`/proc/stat`; the script waits up to 2 minutes for them to fall under 20%; load "
      "averages before and after):")
    w("")
    w("| run | busy before | load average before | after |")
    w("|---|---|---|---|")
    for name in sorted(os.listdir(runs)):
        if name.endswith(".env"):
            env = {}
            for part in open(os.path.join(runs, name)).read().split():
                if "=" in part:
                    k, v = part.split("=", 1)
                    env[k] = v
            raw = open(os.path.join(runs, name)).read()
            before = raw.split("loadavg_before=")[1].split("\n")[0] if "loadavg_before=" in raw else "?"
            after = raw.split("loadavg_after=")[1].split("\n")[0] if "loadavg_after=" in raw else "?"
            w(f"| {name[:-4]} | {env.get('busy_pct_before', '?')}% | {before} | {after} |")
    w("")
    w("The gateway's config:")
    w("")
    w("```toml")
    try:
        with open(os.path.join(run_dir, "gateway.toml")) as f:
            w(f.read().strip())
    except OSError:
        w("# missing")
    w("```")
    w("")

    # --------------------------------------------------------------------------------------
    analysis = None
    old = ""
    try:
        with open(out) as f:
            old = f.read()
        if BEGIN in old and END in old:
            analysis = old[old.index(BEGIN) : old.index(END) + len(END)]
    except OSError:
        pass
    # The executor scenarios' section (bench/executor.sh writes it), kept as it is.
    executor = None
    if EXEC_BEGIN in old and EXEC_END in old:
        executor = old[old.index(EXEC_BEGIN) : old.index(EXEC_END) + len(EXEC_END)]
    if executor:
        w(executor)
        w("")
    # The batch scenario's section (bench/batch.sh writes it), kept as it is.
    if BATCH_BEGIN in old and BATCH_END in old:
        w(old[old.index(BATCH_BEGIN) : old.index(BATCH_END) + len(BATCH_END)])
        w("")
    w("## Analysis")
    w("")
    w(analysis or f"{BEGIN}\n_No analysis written yet._\n{END}")
    w("")

    with open(out, "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
