#!/usr/bin/env bash
# Overload protection (issue 17): the gateway with a bound of 20 chat calls in flight
# (`[admission] max_in_flight = 20, queue = 0`) in front of the mock upstream at a constant
# 100 ms, so its capacity is 20 calls in flight (200 calls/s). 4 connections: an unloaded run
# with 10 callers, an overload run with 200 callers in a closed loop (a refused caller calls
# again at once), and an open-loop run of 2,000 calls/s (10x the capacity); then the floor:
# the same open loop against the bare baseline answering every call with RESOURCE_EXHAUSTED
# (`llm-gateway-baseline --refuse-all`), what a refusal costs on this stack and machine.
# Goals: the admitted calls' p99 under overload within 2x of the unloaded p99;
# every refused call refused with a status (RESOURCE_EXHAUSTED), p99 and max < 1 ms.
# Writes the numbers into BENCHMARKS.md between the `<!-- overload -->` markers.
# Loopback only, bounded (about 30 s of load); stops everything it starts.
#
#   flock /work/coord/release.lock bench/overload.sh   # bench-profile binaries (builds them
#                                   # with `cargo bench --no-run`: the pre-built release deps)
#   bench/overload.sh --no-build    # the binaries already in target/release
#   bench/overload.sh --debug       # debug binaries as built by `cargo build`
#   bench/overload.sh --no-pin      # no CPU pinning (by default, with 2+ cores and taskset,
#                                   # the load generator runs on the last core and the gateway
#                                   # and the mock on the others, so the generator's 2,000
#                                   # calls/s do not queue the gateway's refusals behind it)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PROFILE=release
DURATION=8s
BUILD=1
PIN=1
while [ $# -gt 0 ]; do
  case "$1" in
    --debug) PROFILE=debug ;;
    --no-build) BUILD=0 ;;
    --no-pin) PIN=0 ;;
    --duration) DURATION="$2"; shift ;;
    *) echo "bench/overload.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE"
if [ "$BUILD" = 0 ]; then
  :
elif [ "$PROFILE" = release ]; then
  # The bench profile (never `cargo build --release`: another profile, a full rebuild).
  # Building a bench builds the crate's binaries too, into target/release.
  cargo bench --quiet --bench e2e --no-run
else
  cargo build --quiet --bin llm-gateway --bin llm-gateway-mock --bin llm-gateway-load
fi
CPUS=$(nproc)
GEN_PIN=(); SUT_PIN=(); PINNING="none"
if [ "$PIN" = 1 ] && [ "$CPUS" -ge 2 ] && command -v taskset >/dev/null; then
  GEN_PIN=(taskset -c "$((CPUS - 1))"); SUT_PIN=(taskset -c "0-$((CPUS - 2))")
  PINNING="load generator on cpu $((CPUS - 1)), gateway and mock on cpu 0-$((CPUS - 2))"
fi
RUN="$(mktemp -d)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$RUN"; }
trap cleanup EXIT
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
MOCK=$(free_port); GRPC=$(free_port)
cat >"$RUN/gateway.toml" <<TOML
[server]
listen = "127.0.0.1:$GRPC"
[http]
listen = "off"
[metrics]
listen = "off"
[store]
path = ":memory:"
[ledger]
enabled = false
[log]
level = "error"
[admission]
max_in_flight = 20
queue = 0
[providers.openai]
kind = "openai"
base_url = "http://127.0.0.1:$MOCK/v1"
api_key = "sk-bench"
TOML
"${SUT_PIN[@]}" "$BIN/llm-gateway-mock" --listen "127.0.0.1:$MOCK" --latency-ms 100 >"$RUN/mock.log" 2>&1 &
PIDS+=($!)
env -u OPENAI_API_KEY "${SUT_PIN[@]}" "$BIN/llm-gateway" --config "$RUN/gateway.toml" >"$RUN/gw.log" 2>&1 &
GW_PID=$!
PIDS+=($GW_PID)
for _ in $(seq 100); do
  python3 -c "import socket; socket.create_connection(('127.0.0.1',$GRPC),0.2)" 2>/dev/null && break
  sleep 0.1
done
TARGET_PORT=$GRPC; TARGET_PID=$GW_PID
load() {
  "${GEN_PIN[@]}" "$BIN/llm-gateway-load" --target "http://127.0.0.1:$TARGET_PORT" --model openai/gpt-4o-mini \
    --connections 4 --duration "$DURATION" --warmup 2s --pid "$TARGET_PID" "$@" | tail -1 || true
}
load --concurrency 10 --label unloaded >"$RUN/unloaded.json"
load --concurrency 200 --label overload-closed >"$RUN/closed.json"
# The open loop in rounds, each beside the floor: the bare baseline answering every call at
# once with RESOURCE_EXHAUSTED (pinned like the gateway), what a refusal costs on this stack
# and machine (tonic + hyper + the kernel's wake-ups). Alternating rounds, since this VM's
# wake-up noise moves the tail from minute to minute.
FLOOR=$(free_port)
"${SUT_PIN[@]}" "$BIN/llm-gateway-baseline" --listen "127.0.0.1:$FLOOR" --refuse-all >"$RUN/floor.log" 2>&1 &
FLOOR_PID=$!
PIDS+=($FLOOR_PID)
for _ in $(seq 100); do
  python3 -c "import socket; socket.create_connection(('127.0.0.1',$FLOOR),0.2)" 2>/dev/null && break
  sleep 0.1
done
for round in 1 2 3; do
  TARGET_PORT=$GRPC; TARGET_PID=$GW_PID
  load --rate 2000 --label overload-open >"$RUN/open-$round.json"
  TARGET_PORT=$FLOOR; TARGET_PID=$FLOOR_PID
  load --rate 2000 --label floor-open >"$RUN/floor-$round.json"
done
python3 - "$RUN" "$PROFILE" "$DURATION" "$(git rev-parse --short HEAD)" "$(cut -d' ' -f1-3 /proc/loadavg)" "$PINNING" <<'PY'
import json, re, sys, os, datetime
run = sys.argv[1]
rd = lambda name: json.load(open(os.path.join(run, name)))
unloaded, closed = rd("unloaded.json"), rd("closed.json")
opens = [rd(f"open-{i}.json") for i in (1, 2, 3)]
floors = [rd(f"floor-{i}.json") for i in (1, 2, 3)]
p99 = lambda r: (r.get("error_latency_us") or {}).get("p99") or 10**9
# The gateway's round with the median refused p99 stands for the open loop below.
opened = sorted(opens, key=p99)[1]
profile, duration, rev, load, pinning = sys.argv[2:7]
u99 = unloaded["latency_us"]["p99"]
fmt = lambda us: "-" if us is None else f"{us/1000:.3f} ms"
lines = [
    "<!-- overload -->",
    "### Overload protection (bench/overload.sh)",
    "",
    f"{datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC, revision `{rev}`, "
    f"{'bench-profile (release)' if profile == 'release' else profile} binaries, {os.cpu_count()} cores "
    f"shared with other work (load average {load} at the end), `[admission] max_in_flight = 20, queue = 0`, "
    f"mock at 100 ms (capacity 20 in flight = 200 calls/s), 4 connections, {duration} measured after 2 s warm-up. "
    "Closed loop: each caller calls again at once, also after a refusal. Open loop: calls on a fixed "
    "schedule of 2,000/s (10x the capacity), whatever the answers. "
    f"CPU pinning: {pinning}. Latency is counted from each call's intended time (open loop) or "
    "its send (closed loop); \"from send\" counts a refusal from when the generator sent it, "
    "without the open loop's send lag (tokio's timer ticks every 1 ms).",
    "",
    "| run | load | ok | refused (RESOURCE_EXHAUSTED) | other errors | ok p50 | ok p99 | refused p50 | refused p99 | refused max | refused p99 from send | send lag p99 | gateway CPU per call |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
]
rows = [("unloaded", unloaded), ("10x, closed loop", closed)]
for i, (o, f) in enumerate(zip(opens, floors), 1):
    rows += [(f"10x, open loop, round {i}", o), (f"floor: bare tonic refusing every call, round {i}", f)]
for name, r in rows:
    e = r.get("error_latency_us") or {}
    es = r.get("error_service_us") or {}
    lag = r.get("send_lag_us") or {}
    rex = r["errors"].get("ResourceExhausted", 0)
    oth = sum(v for k, v in r["errors"].items() if k != "ResourceExhausted")
    shape = f"{r['concurrency']} callers" if r.get("concurrency") else f"{r['rate']:.0f} calls/s"
    lines.append(
        f"| {name} | {shape} | {r['ok']} | {rex} | {oth} | {fmt((r['latency_us'] or {}).get('p50'))} "
        f"| {fmt((r['latency_us'] or {}).get('p99'))} | {fmt(e.get('p50'))} | {fmt(e.get('p99'))} | {fmt(e.get('max'))} "
        f"| {fmt(es.get('p99'))} | {fmt(lag.get('p99'))} "
        f"| {(r.get('cpu') or {}).get('us_per_call', '-')} us |"
    )
met = lambda b: "met" if b else "MISSED"
lines.append("")
for name, r in (("closed loop", closed), ("open loop", opened)):
    o99 = r["latency_us"]["p99"]
    ratio = o99 / u99 if u99 else float("inf")
    err = r.get("error_latency_us") or {}
    refused = r["errors"].get("ResourceExhausted", 0)
    other = {k: v for k, v in r["errors"].items() if k != "ResourceExhausted"}
    lines += [
        f"- {name}: admitted p99 / unloaded p99 = {ratio:.2f} (goal <= 2): {met(ratio <= 2)}; "
        f"refused with a status: {refused}, other errors: {other or 'none'}: {met(refused > 0 and not other)}; "
        f"refused p99 {err.get('p99', 0)/1000:.3f} ms (goal < 1 ms): {met(err.get('p99', 10**9) < 1000)}; "
        f"from send {(r.get('error_service_us') or {}).get('p99', 0)/1000:.3f} ms: "
        f"{met((r.get('error_service_us') or {}).get('p99', 10**9) < 1000)}",
    ]
# CPU of one refusal: the open-loop run's gateway CPU less its admitted calls at the
# unloaded CPU per call, over its refusals.
ucpu, ocpu = (unloaded.get("cpu") or {}), (opened.get("cpu") or {})
orefused = opened["errors"].get("ResourceExhausted", 0)
if ucpu and ocpu and orefused:
    per_refusal = (ocpu["seconds"] - opened["ok"] * ucpu["us_per_call"] / 1e6) * 1e6 / orefused
    lines.append(f"- gateway CPU per refusal (open loop, admitted calls at the unloaded CPU per call taken out): {per_refusal:.1f} us")
med = lambda xs: sorted(xs)[len(xs) // 2]
svc = lambda r: (r.get("error_service_us") or {}).get("p99") or 10**9
g99, f99 = med([p99(r) for r in opens]), med([p99(r) for r in floors])
gs99, fs99 = med([svc(r) for r in opens]), med([svc(r) for r in floors])
fcpu = med([(r.get("cpu") or {}).get("us_per_call", 0) for r in floors])
lines.append(
    f"- the floor (a bare tonic server refusing every call at once, the same open loop and pinning, "
    f"rounds alternating with the gateway's): median of the rounds' refused p99 {fmt(f99)} "
    f"({fmt(fs99)} from send), CPU {fcpu} us per refusal; the gateway's median {fmt(g99)} ({fmt(gs99)} "
    f"from send): gateway / floor = {g99 / f99:.2f}x ({gs99 / fs99:.2f}x from send)"
)
lines += ["<!-- /overload -->"]
section = "\n".join(lines)
print(section)
path = "BENCHMARKS.md"
text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
if "<!-- overload -->" in text:
    text = re.sub(r"<!-- overload -->.*?<!-- /overload -->", lambda m: section, text, flags=re.S)
else:
    text = text.rstrip("\n") + "\n\n" + section + "\n"
open(path, "w").write(text)
PY
