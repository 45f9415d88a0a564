#!/usr/bin/env python3
"""Writes the batch scenario's section of BENCHMARKS.md from a bench/batch.sh run directory.

The section sits between `<!-- batch:begin -->` and `<!-- batch:end -->` (replaced in
place, or appended when the file has none); bench/report.py keeps it when it rewrites the
file. Usage: batch_report.py RUN_DIR BENCHMARKS.md
"""

import json
import os
import sys
from collections import Counter
from datetime import datetime

BEGIN = "<!-- batch:begin -->"
END = "<!-- batch:end -->"


def env(run_dir):
    out = {}
    with open(os.path.join(run_dir, "run.env")) as f:
        for line in f:
            if "=" in line:
                k, v = line.rstrip("\n").split("=", 1)
                out[k] = v
    return out


def objects(path):
    """The JSON objects buf curl printed one after another."""
    text = open(path).read()
    dec = json.JSONDecoder()
    i, out = 0, []
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return out
        obj, i = dec.raw_decode(text, i)
        out.append(obj)


def ts(s):
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def section(run_dir):
    e = env(run_dir)
    n, rpm_a, rpm_b = int(e["requests"]), int(e["rpm_a"]), int(e["rpm_b"])
    lines = [BEGIN, "## Batch jobs (issue 17)", ""]
    lines.append(
        f"Written by `bench/batch.sh` ({e['profile']} build), run of {e['date']}, revision "
        f"`{e['revision']}`"
        + (f" with {e['dirty']} modified tracked file(s)" if e.get("dirty", "0") != "0" else "")
        + f", {e['nproc']} cores, load average at start {e['load_start']}."
    )
    lines.append("")
    lines.append(
        f"One batch job of {n:,} requests (`CreateBatch`, then `StreamBatchResults` to its end) "
        f"through a weighted policy over two mock accounts (two `llm-gateway-mock` processes, "
        f"20 ms latency) limited to {rpm_a:,} and {rpm_b:,} requests per minute, each "
        "provider's `pacing` set to its account's limit, `[batch]` defaults. The mock's "
        "buckets hold one minute's requests and start full, so in a run of T seconds the "
        f"limits permit at most {rpm_a + rpm_b:,} + {(rpm_a + rpm_b) / 60:g}·T requests; the "
        f"ideal wall time for {n:,} is "
        f"max(0, {n:,} - {rpm_a + rpm_b:,}) / {(rpm_a + rpm_b) / 60:g} = "
        f"{max(0, n - rpm_a - rpm_b) / ((rpm_a + rpm_b) / 60):g} s. Times are the "
        "gateway's own (the job's create and end times)."
    )
    lines.append("")
    if "missing" in e:
        lines += [f"**Not run**: {e['missing']}. The script runs once both are there.", "", END]
        return "\n".join(lines)

    created = json.load(open(os.path.join(run_dir, "created.json")))["batch"]
    final = json.load(open(os.path.join(run_dir, "final.json")))["batch"]
    results = [o["result"] for o in objects(os.path.join(run_dir, "results.json"))]
    wall = ts(final["endTime"]) - ts(created["createTime"]) if "endTime" in final else None
    combined = rpm_a + rpm_b
    rate = combined / 60
    ideal = max(0.0, (n - combined) / rate)
    errors = Counter(r["error"]["reason"] for r in results if "error" in r)
    ids = Counter(r["customId"] for r in results)
    retried = sum(1 for r in results if r.get("runs", 1) > 1)
    rate_limited_attempts = sum(
        1 for r in results for a in r.get("route", {}).get("attempts", [])
        if a.get("reason") == "RATE_LIMITED")
    by_provider = Counter(
        a["provider"] for r in results for a in r.get("route", {}).get("attempts", [])
        if a.get("outcome") == "ATTEMPT_OUTCOME_SUCCEEDED")
    upstream = {}
    for name in ("a", "b"):
        try:
            upstream[name] = json.load(open(os.path.join(run_dir, f"mock-{name}.json")))
        except (OSError, ValueError):
            upstream[name] = {}
    up_requests = sum(u.get("requests", 0) for u in upstream.values())

    def status(ok):
        return "met" if ok else "**missed**"

    lines += ["| goal | measured | status |", "|---|---|---|"]
    if wall:
        permitted = combined + rate * wall
        share = n / permitted
        lines.append(f"| throughput >= 95% of what the combined limit permits | {n:,} of "
                     f"{permitted:,.0f} permitted in {wall:.1f} s = {share:.1%} "
                     f"({n / wall * 60:,.0f} requests/min) | {status(share >= 0.95)} |")
        lines.append(f"| wall time within 10% of the ideal ({ideal:.1f} s) | {wall:.1f} s "
                     f"({wall / ideal if ideal else float('inf'):.2f}x) | "
                     f"{status(ideal > 0 and wall <= 1.1 * ideal)} |")
    else:
        lines.append(f"| the job ended | state {final.get('state')} | **missed** |")
    lines.append(f"| zero 429s in the results | {errors.get('RATE_LIMITED', 0)} results "
                 f"RATE_LIMITED, {sum(errors.values())} errors in all | "
                 f"{status(sum(errors.values()) == 0)} |")
    lines.append(f"| every request answered exactly once | {len(ids):,} ids, "
                 f"{len(results):,} results, {sum(1 for c in ids.values() if c > 1)} "
                 f"duplicated | {status(len(ids) == n and len(results) == n)} |")
    lines.append("")
    lines.append(
        f"Upstream requests: {up_requests:,} for {n:,} batch requests (acct-a "
        f"{upstream['a'].get('requests', 0):,}, acct-b {upstream['b'].get('requests', 0):,}); "
        f"answers by account {dict(by_provider)}; {retried} requests ran more than once; "
        f"{rate_limited_attempts} attempts in the results' routes were rate limited (429) "
        f"and moved on inside their call; errors {dict(errors) or 'none'}; final counts "
        f"{final.get('counts')}; cost {final.get('cost', {}).get('totalUsd', 0):.6f} USD. "
        f"Load average at the end {e.get('load_end', '?')}."
    )
    split = [(by_provider.get(name, 0), rpm) for name, rpm in (("acct-a", rpm_a), ("acct-b", rpm_b))]
    split_ideal = max(max(0, k - rpm) / (rpm / 60) for k, rpm in split)
    lines.append("")
    lines.append(
        f"The weighted policy splits the requests at random ({split[0][0]:,} and "
        f"{split[1][0]:,} here, not exactly 2:1): with this split the accounts' limits allow "
        f"{split_ideal:.1f} s at best" + (f", so the runner took {wall / split_ideal:.2f}x of that."
                                          if wall and split_ideal else ".")
    )
    lines += ["", END]
    return "\n".join(lines)


def main():
    run_dir, out = sys.argv[1], sys.argv[2]
    new = section(run_dir)
    try:
        old = open(out).read()
    except OSError:
        old = ""
    if BEGIN in old and END in old:
        text = old[: old.index(BEGIN)] + new + old[old.index(END) + len(END):]
    else:
        text = old.rstrip("\n") + "\n\n" + new + "\n"
    with open(out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
