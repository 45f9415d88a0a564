#!/usr/bin/env python3
"""The paraphrase benchmark's driver (run by bench/semantic.sh): prints a Markdown section.

1. The model alone: the cosine of each pair of bench/paraphrases.tsv through the local
   embedding server, and the hit rate on paraphrases / false-hit rate on unrelated pairs
   at a range of thresholds.
2. Through the gateway (its OpenAI-compatible HTTP front, policy `semantic` with the
   semantic cache on, the mock upstream answering `Mock reply to: PROMPT`): every first
   prompt is sent (and stored), then every second prompt. The reply says what happened:
   its own text is a miss, the first prompt's is a right hit, any other a wrong hit.

    semantic_report.py GATEWAY_URL EMBED_URL PAIRS THRESHOLD
"""

import json
import sys
import time
import urllib.request


def post(url, body, timeout=60):
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def pairs(path):
    out = []
    for line in open(path, encoding="utf-8"):
        if line.startswith("#") or not line.strip():
            continue
        kind, a, b = line.rstrip("\n").split("\t")
        out.append((kind, a, b))
    return out


def main():
    gateway, embed, path, threshold = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    rows = pairs(path)
    texts = sorted({t for _, a, b in rows for t in (a, b)})
    started = time.monotonic()
    vectors = {}
    for t in texts:
        vectors[t] = post(f"{embed}/v1/embeddings", {"model": "all-MiniLM-L6-v2", "input": t})["data"][0]["embedding"]
    embed_s = time.monotonic() - started

    def cos(a, b):
        return sum(x * y for x, y in zip(vectors[a], vectors[b]))

    sims = {"para": [], "unrelated": []}
    for kind, a, b in rows:
        sims[kind].append(cos(a, b))
    n_para, n_unrel = len(sims["para"]), len(sims["unrelated"])

    # Through the gateway.
    def chat(text):
        r = post(
            f"{gateway}/v1/chat/completions",
            {"model": "semantic", "messages": [{"role": "user", "content": text}]},
        )
        return r["choices"][0]["message"]["content"]

    for a in dict.fromkeys(a for _, a, _ in rows):
        chat(a)
    outcome = {"para": {"right": 0, "wrong": 0, "miss": 0}, "unrelated": {"right": 0, "wrong": 0, "miss": 0}}
    wrong = []
    for kind, a, b in rows:
        reply = chat(b)
        if reply == f"Mock reply to: {b}":
            outcome[kind]["miss"] += 1
        elif reply == f"Mock reply to: {a}":
            outcome[kind]["right"] += 1
            if kind == "unrelated":
                wrong.append((b, reply))
        else:
            outcome[kind]["wrong"] += 1
            wrong.append((b, reply))

    def pct(n, d):
        return f"{100.0 * n / d:.0f}% ({n}/{d})"

    print("| threshold | hit rate on paraphrases | false-hit rate on unrelated |")
    print("|---|---|---|")
    for t in (0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.90, 0.95):
        hits = sum(s >= t for s in sims["para"])
        false = sum(s >= t for s in sims["unrelated"])
        mark = " **(chosen)**" if abs(t - threshold) < 1e-9 else ""
        print(f"| {t:.2f}{mark} | {pct(hits, n_para)} | {pct(false, n_unrel)} |")
    print()
    near = sims["unrelated"][n_unrel // 2 :]
    far = sims["unrelated"][: n_unrel // 2]
    print(
        f"Cosine of the pairs: paraphrases min {min(sims['para']):.3f} / median "
        f"{sorted(sims['para'])[n_para // 2]:.3f}; unrelated (different topic) max {max(far):.3f}; "
        f"near misses (same topic, other question) median {sorted(near)[len(near) // 2]:.3f} / max {max(near):.3f}. "
        f"{len(texts)} prompts embedded in {embed_s:.1f} s."
    )
    print()
    p, u = outcome["para"], outcome["unrelated"]
    print(f"Through the gateway at threshold {threshold:.2f} (first prompts stored, then the second ones asked; a miss is stored too):")
    print()
    print("| pairs | right hit | wrong hit (another stored prompt) | miss |")
    print("|---|---|---|---|")
    print(f"| paraphrases | {pct(p['right'], n_para)} | {pct(p['wrong'], n_para)} | {pct(p['miss'], n_para)} |")
    print(f"| unrelated | - | {pct(u['right'] + u['wrong'], n_unrel)} | {pct(u['miss'], n_unrel)} |")
    if wrong:
        print()
        print("Wrong hits (asked -> served):")
        print()
        for b, reply in wrong:
            print(f"- \"{b}\" -> \"{reply.removeprefix('Mock reply to: ')}\"")


if __name__ == "__main__":
    main()
