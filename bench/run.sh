#!/usr/bin/env bash
# The load scenarios of issue 8: the gateway measured side by side with the bare baseline
# (`llm-gateway-baseline`, a minimal tonic -> reqwest forwarder), both in front of the mock
# upstream (`llm-gateway-mock`), driven by `llm-gateway-load`. Loopback only, bounded
# durations; every process it starts is stopped on exit. Writes BENCHMARKS.md.
#
#   bench/run.sh                 # full run (10-minute soak)
#   bench/run.sh --quick         # 60 s soak
#   bench/run.sh --soak 5m       # any soak duration (humantime: 90s, 5m, ...)
#   bench/run.sh --no-build      # use the binaries already in target/release
#   bench/run.sh --out FILE      # write the report elsewhere (default: BENCHMARKS.md)
#   bench/run.sh --rounds N      # scenario 1 rounds (default 2, 1 with --quick); the report
#                                # keeps each case's round with the most calls/s
#   bench/run.sh --before BIN    # also run an earlier revision's gateway binary (scenario 1
#                                # and callgrind), side by side in the same run
#   bench/run.sh --no-callgrind  # skip the instruction counts (valgrind)
#   bench/run.sh --overhead-only # scenario 1, instructions and allocations only (no 10,000
#                                # streams, tail, deadline or soak runs)
#   bench/run.sh --no-wait       # do not wait for idle cores before each run (a machine
#                                # that stays busy; the busy share is still recorded)
#   bench/run.sh --only LIST     # only these parts, comma-separated: overhead (scenario 1
#                                # and memory), callgrind, alloc, streams (scenario 2, both
#                                # variants), tail, deadlines, soak; the report marks the
#                                # rest not measured (use --out to keep BENCHMARKS.md)
#   bench/run.sh --upstream-h2c  # the gateway and the baseline talk HTTP/2 (h2c) to the mock,
#                                # as over TLS to providers that negotiate HTTP/2; default
#                                # HTTP/1.1, one upstream connection per call in flight
#
# Besides the load scenarios: instructions per call under callgrind (baseline, gateway, and
# the --before binary) and allocations per call and per stream chunk (benches/e2e.rs).
#
# Raw results (each load run's output and JSON line, the processes' logs, the gateway's
# config) go to target/bench/<timestamp>/.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

QUICK=0
BUILD=1
SOAK=""
ROUNDS=""
OUT="$ROOT/BENCHMARKS.md"
BEFORE=""
CALLGRIND=1
OVERHEAD_ONLY=0
WAIT=1
H2C=0
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --no-build) BUILD=0 ;;
    --soak) SOAK="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --rounds) ROUNDS="$2"; shift ;;
    --before) BEFORE="$2"; shift ;;
    --no-callgrind) CALLGRIND=0 ;;
    --overhead-only) OVERHEAD_ONLY=1 ;;
    --no-wait) WAIT=0 ;;
    --upstream-h2c) H2C=1 ;;
    --only) ONLY=",$2,"; shift ;;
    -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
    *) echo "bench/run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$SOAK" ]; then
  if [ "$QUICK" = 1 ]; then SOAK=60s; else SOAK=10m; fi
fi
if [ -z "$ROUNDS" ]; then
  if [ "$QUICK" = 1 ]; then ROUNDS=1; else ROUNDS=2; fi
fi
# Warm-up before the soak's measured part: a tenth of it, at least 10 s.
SOAK_SECS=$(python3 -c "import re,sys
m=re.fullmatch(r'(\d+)(ms|s|m|h)?','$SOAK'); n=int(m[1]); u=m[2] or 's'
print(max(1, n*{'ms':0.001,'s':1,'m':60,'h':3600}[u]))")
SOAK_WARMUP=$(python3 -c "print(max(10, int($SOAK_SECS/10)))")

TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
RUN_DIR="$TARGET_DIR/bench/$(date -u +%Y%m%dT%H%M%SZ)"
BIN="$RUN_DIR/bin"
RUNS="$RUN_DIR/runs"
mkdir -p "$BIN" "$RUNS"

# Logging, processes (start/stop, all stopped on exit), free_port, wait_port.
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# The share (percent) of all cores busy over one second.
busy_pct() {
  local a b
  a=($(head -1 /proc/stat)); sleep 1; b=($(head -1 /proc/stat))
  python3 -c "
a=list(map(int,'${a[*]:1}'.split())); b=list(map(int,'${b[*]:1}'.split()))
d=[y-x for x,y in zip(a,b)]; idle=d[3]+d[4]; total=sum(d[:8]) or 1
print(round(100*(total-idle)/total))"
}

# Other work on the machine (other users' builds) skews latency and throughput: wait up to
# two minutes for the cores to be mostly idle before a run, then go ahead anyway.
wait_quiet() {
  local busy
  if [ "$WAIT" = 0 ]; then busy_pct; return; fi
  for _ in $(seq 24); do
    busy=$(busy_pct)
    [ "$busy" -le 20 ] && { echo "$busy"; return; }
    sleep 4
  done
  echo "$busy"
}

# --- build ----------------------------------------------------------------------------------

if [ "$BUILD" = 1 ]; then
  log "building release binaries"
  cargo build --release --bins --quiet
fi
# Private copies: a concurrent build cannot swap a binary under a running scenario.
for b in llm-gateway llm-gateway-mock llm-gateway-baseline llm-gateway-load; do
  cp "$TARGET_DIR/release/$b" "$BIN/$b"
done
if [ -n "$BEFORE" ]; then
  cp "$BEFORE" "$BIN/llm-gateway-before"
fi

# Many streams need many sockets: 10,000 calls mean 10,000 upstream connections.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt 12000 ]; then
  log "warning: ulimit -n is $(ulimit -n); the 10,000-stream scenario needs about 11,000"
fi

# --- machine --------------------------------------------------------------------------------

{
  echo "nproc=$(nproc)"
  echo "cpu=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
  echo "mem_kib=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
  echo "kernel=$(uname -sr)"
  echo "loadavg_start=$(cut -d' ' -f1-3 /proc/loadavg)"
  echo "rustc=$(rustc --version 2>/dev/null || echo unknown)"
  echo "revision=${BENCH_REVISION:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  echo "dirty=$(git status --porcelain --untracked-files=no 2>/dev/null | wc -l)"
  echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "soak=$SOAK"
  echo "soak_warmup=${SOAK_WARMUP}s"
  echo "rounds=$ROUNDS"
  echo "overhead_only=$OVERHEAD_ONLY"
  echo "waited_for_quiet=$WAIT"
  echo "upstream_h2c=$H2C"
  echo "only=$ONLY"
  echo "ulimit_n=$(ulimit -n)"
  echo "before=${BEFORE_REVISION:-$([ -n "$BEFORE" ] && echo "$BEFORE")}"
} >"$RUN_DIR/machine.env"

# --- the servers ----------------------------------------------------------------------------

MOCK_PORT=$(free_port)
start mock "$BIN/llm-gateway-mock" --listen "127.0.0.1:$MOCK_PORT"
MOCK_PID=$STARTED
wait_port "$MOCK_PORT"

GW_CONFIG="$RUN_DIR/gateway.toml"
start_gateway() {
  GW_PORT=$(free_port)
  local metrics_port
  metrics_port=$(free_port)
  cat >"$GW_CONFIG" <<EOF
# Written by bench/run.sh: the gateway in front of the mock, default settings otherwise
# (info logs, Prometheus metrics and the usage ledger on), with its store and metrics
# listener moved out of the way.
[server]
listen = "127.0.0.1:$GW_PORT"
shutdown_grace = "1s"

[log]
level = "info"

[store]
path = "$RUN_DIR/gateway-$1.db"

[metrics]
listen = "127.0.0.1:$metrics_port"

# The HTTP front is off: scenario 1 runs two gateways at once with --before.
[http]
listen = "off"

# Scenario 2 opens 10,000 streams at once to one target: the bound on calls in flight (2,048
# by default) and the adaptive concurrency limit (which a burst's own latency rise on these 2
# cores engages) would refuse most of them, and the scenario measures what 10,000 cost.
[admission]
max_in_flight = 0
[pacing]
adaptive_concurrency = false

[providers.openai]
kind = "openai"
api_key = "bench-not-a-key"
base_url = "http://127.0.0.1:$MOCK_PORT/v1"
http2_prior_knowledge = $([ "$H2C" = 1 ] && echo true || echo false)

# Scenario 3: two targets on the heavy-tailed mock, without and with hedging.
[providers.tail-a]
kind = "openai-compatible"
base_url = "http://127.0.0.1:${TAIL_PORT:-$MOCK_PORT}/v1"
[providers.tail-b]
kind = "openai-compatible"
base_url = "http://127.0.0.1:${TAIL_PORT:-$MOCK_PORT}/v1"
[policies.tail-nohedge]
targets = [{ provider = "tail-a", model = "gpt-4o-mini" }, { provider = "tail-b", model = "gpt-4o-mini" }]
execution = { max_attempts = 2 }
[policies.tail-hedge]
targets = [{ provider = "tail-a", model = "gpt-4o-mini" }, { provider = "tail-b", model = "gpt-4o-mini" }]
execution = { max_attempts = 2, hedging = { mode = "fixed", delay = "100ms" } }

# Scenario 4: a hanging primary and a healthy fallback.
[policies.deadline-failover]
targets = [{ provider = "openai", model = "gpt-4o-mini+hang" }, { provider = "openai", model = "gpt-4o-mini" }]
execution = { attempt_timeout = "100ms", max_attempts = 2 }
EOF
  start "gateway-$1" ${GW_WRAP:-} "$BIN/${GW_BIN:-llm-gateway}" --config "$GW_CONFIG"
  GW_PID=$STARTED
  wait_port "$GW_PORT"
}

start_baseline() {
  BL_PORT=$(free_port)
  start "baseline-$1" ${GW_WRAP:-} "$BIN/llm-gateway-baseline" --listen "127.0.0.1:$BL_PORT" \
    --upstream "http://127.0.0.1:$MOCK_PORT/v1" $([ "$H2C" = 1 ] && echo --upstream-h2c)
  BL_PID=$STARTED
  wait_port "$BL_PORT"
}

# load NAME ARGS...: one load run; keeps its command, output and JSON line under runs/.
load() {
  local name="$1"; shift
  { printf 'llm-gateway-load --label %q' "$name"; printf ' %q' "$@"; echo; } >"$RUNS/$name.cmd"
  local busy
  busy=$(wait_quiet)
  echo "busy_pct_before=$busy loadavg_before=$(cut -d' ' -f1-3 /proc/loadavg)" >"$RUNS/$name.env"
  log "run $name (cores busy before: $busy%)"
  # Every run is bounded by its own flags; this is a last resort.
  timeout 900 "$BIN/llm-gateway-load" --label "$name" "$@" >"$RUNS/$name.out" 2>&1 || true
  tail -n 1 "$RUNS/$name.out" >"$RUNS/$name.json"
  echo "loadavg_after=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$RUNS/$name.env"
  sed '$d' "$RUNS/$name.out" >&2
}

# --- scenario 1: overhead -------------------------------------------------------------------

# Each case runs for the baseline, then the gateway, `ROUNDS` times; the report takes the
# best round per metric, for both alike.
PROMPT="hello"
SERVERS="baseline gateway"
[ -n "$BEFORE" ] && SERVERS="baseline before gateway"
scenario_overhead() {
  local t port pid round
  for round in $(seq "$ROUNDS"); do
    for rpc in chat stream; do
      for t in $SERVERS; do
        case "$t" in
          baseline) port=$BL_PORT; pid=$BL_PID ;;
          before) port=$BF_PORT; pid=$BF_PID ;;
          *) port=$GW_PORT; pid=$GW_PID ;;
        esac
        load "s1-$rpc-c1-$t-r$round" --target "http://127.0.0.1:$port" --rpc "$rpc" \
          --prompt "$PROMPT" --concurrency 1 --requests 5000 --duration 15s --warmup 2s \
          --pid "$pid"
        load "s1-$rpc-c64-$t-r$round" --target "http://127.0.0.1:$port" --rpc "$rpc" \
          --prompt "$PROMPT" --concurrency 64 --connections 4 --requests 40000 --duration 15s \
          --warmup 2s --pid "$pid"
      done
    done
  done
}

# --- scenario 2: many streams ---------------------------------------------------------------

# As specified: the mock paces a chunk every 100 ms (per-call directives on the model name);
# a 35-byte prompt makes a 50-character reply, one character per chunk, so each stream lasts
# ~5.3 s. 10,000 callers start over 3 s: all of them are open together for ~2 s.
STREAM_MODEL='openai/gpt-4o-mini+chunk_delay=100+chunks=50'
STREAM_PROMPT='Write a haiku about the sea, please'
# The same 10,000 streams with a chunk every second (7 chunks, ~10 s per stream, started over
# 5 s): a tenth of the chunk rate, for TTFT on a machine that is not saturated.
SLOW_MODEL='openai/gpt-4o-mini+chunk_delay=1000+chunks=8'
scenario_many_streams() {
  local t="$1" port="$2" pid="$3"
  load "s2-streams-10k-$t" --target "http://127.0.0.1:$port" --rpc stream \
    --model "$STREAM_MODEL" --prompt "$STREAM_PROMPT" --concurrency 10000 \
    --requests 10000 --duration 60s --ramp 3s --connections 100 --drain 60s --pid "$pid"
}
scenario_many_slow_streams() {
  local t="$1" port="$2" pid="$3"
  load "s2b-streams-10k-1s-$t" --target "http://127.0.0.1:$port" --rpc stream \
    --model "$SLOW_MODEL" --prompt "$PROMPT" --concurrency 10000 \
    --requests 10000 --duration 60s --ramp 5s --connections 100 --drain 60s --pid "$pid"
}

# --- scenario 3: tail cutting ----------------------------------------------------------------

# A heavy-tailed upstream (50 ms, 2% of calls 2 s) behind two targets; open-loop load through a
# policy without hedging, then one that hedges after 100 ms. Extra upstream requests are counted
# at the mock (GET /mock/stats) against the calls sent.
mock_requests() {
  curl -s "http://127.0.0.1:$1/mock/stats" | python3 -c "import json,sys; print(json.load(sys.stdin)['requests'])"
}

scenario_tail_cutting() {
  local port before after policy
  port=$(free_port)
  start tail-mock "$BIN/llm-gateway-mock" --listen "127.0.0.1:$port" \
    --latency-ms 50 --tail-ratio 0.02 --tail-ms 2000
  local tail_pid=$STARTED
  wait_port "$port"
  TAIL_PORT=$port start_gateway s3
  for policy in tail-nohedge tail-hedge; do
    before=$(mock_requests "$port")
    load "s3-$policy" --target "http://127.0.0.1:$GW_PORT" --rpc chat --prompt "$PROMPT" \
      --model "$policy" --rate 200 --connections 2 --max-inflight 2000 --duration 20s \
      --warmup 0s --drain 10s --pid "$GW_PID"
    after=$(mock_requests "$port")
    echo "$((after - before))" >"$RUNS/s3-$policy.upstream"
  done
  stop "$GW_PID"
  stop "$tail_pid"
}

# --- scenario 4: deadlines -------------------------------------------------------------------

# The primary hangs, the fallback is healthy; callers set a 300 ms deadline.
scenario_deadlines() {
  start_gateway s4
  load "s4-deadlines" --target "http://127.0.0.1:$GW_PORT" --rpc chat --prompt "$PROMPT" \
    --model deadline-failover --rate 100 --connections 2 --max-inflight 2000 --duration 20s \
    --warmup 0s --drain 5s --deadline 300ms --pid "$GW_PID"
  stop "$GW_PID"
}

# --- scenario 5: memory ---------------------------------------------------------------------

scenario_soak() {
  local rps rate
  rps=$(python3 -c "import json,glob
print(max(json.load(open(f))['rps'] for f in glob.glob('$RUNS/s1-chat-c64-gateway-r*.json')))" \
    2>/dev/null || echo 0)
  rate=$(python3 -c "print(max(100, int(float('$rps') / 2)))")
  echo "$rate" >"$RUNS/s5-soak.rate"
  load "s5-soak-gateway" --target "http://127.0.0.1:$GW_PORT" --rpc chat --prompt "$PROMPT" \
    --rate "$rate" --connections 4 --max-inflight 1000 --duration "$SOAK" \
    --warmup "${SOAK_WARMUP}s" --drain 30s --pid "$GW_PID"
}

# --- instructions per call (callgrind) and allocations (benches/e2e.rs) ----------------------

# Each server under callgrind (user-space instructions, steady on a busy machine): 300 warm-up
# calls, counters zeroed, 1,000 calls at concurrency 4, dumped; the same for streams.
CG_CALLS=1000
callgrind_one() {
  local t="$1" port pid out="$RUN_DIR/callgrind-$1.out"
  GW_WRAP="valgrind --tool=callgrind --callgrind-out-file=$out"
  if [ "$t" = baseline ]; then
    start_baseline "cg"; port=$BL_PORT; pid=$BL_PID
  else
    if [ "$t" = before ]; then GW_BIN=llm-gateway-before start_gateway "cg-$t"
    else start_gateway "cg-$t"; fi
    port=$GW_PORT; pid=$GW_PID
  fi
  GW_WRAP=""
  for rpc in chat stream; do
    timeout 600 "$BIN/llm-gateway-load" --target "http://127.0.0.1:$port" --rpc "$rpc" \
      --prompt "$PROMPT" --concurrency 4 --requests 300 --duration 300s --warmup 0s \
      >"$RUNS/cg-$rpc-$t-warmup.out" 2>&1 || true
    callgrind_control -z "$pid" >/dev/null 2>&1 || true
    timeout 900 "$BIN/llm-gateway-load" --target "http://127.0.0.1:$port" --rpc "$rpc" \
      --prompt "$PROMPT" --concurrency 4 --requests "$CG_CALLS" --duration 600s --warmup 0s \
      >"$RUNS/cg-$rpc-$t.out" 2>&1 || true
    callgrind_control -d "cg-$rpc" "$pid" >/dev/null 2>&1 || true
    # The dump's totals line is the instructions since the zeroing.
    python3 - "$out" "$rpc" "$CG_CALLS" "$RUNS/cg-$rpc-$t.json" <<'PY' || true
import glob, json, sys
base, rpc, calls, dest = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
for path in sorted(glob.glob(base + "*")):
    text = open(path, errors="replace").read()
    if f"Trigger: dump cg-{rpc}\n" not in text[:4000]:
        continue
    for line in text.splitlines():
        if line.startswith("totals:") or line.startswith("summary:"):
            ir = int(line.split()[1])
            json.dump({"instructions": ir, "calls": calls, "per_call": ir / calls}, open(dest, "w"))
            break
PY
  done
  stop "$pid"
}

scenario_callgrind() {
  if ! command -v valgrind >/dev/null || ! command -v callgrind_control >/dev/null; then
    log "valgrind is not installed (Debian: apt-get install valgrind): no instruction counts"
    return
  fi
  local t
  for t in $SERVERS; do callgrind_one "$t"; done
}

# ALLOC_PROFILE=test counts in the unoptimized test build instead (no release build of the
# bench needed; the counts differ little, inlining aside).
scenario_allocations() {
  local cmd=bench
  [ "${ALLOC_PROFILE:-bench}" = test ] && cmd=test
  echo "$cmd" >"$RUNS/alloc.profile"
  log "allocations per call (cargo $cmd --bench e2e -- --alloc-only)"
  LLMGW_ALLOC_OUT="$RUNS/alloc.json" timeout 900 cargo "$cmd" --quiet --bench e2e -- --alloc-only \
    >"$RUNS/alloc.out" 2>&1 || log "the allocation benchmark failed: see $RUNS/alloc.out"
}

# --- run ------------------------------------------------------------------------------------

log "results in $RUN_DIR"

# want PART: whether this run includes PART (--only, --overhead-only).
want() {
  if [ -n "$ONLY" ]; then case "$ONLY" in *",$1,"*) return 0 ;; *) return 1 ;; esac; fi
  case "$1" in overhead|callgrind|alloc) return 0 ;; esac
  [ "$OVERHEAD_ONLY" = 0 ]
}

if want overhead; then
# Fresh processes per scenario, so that each one's RSS and CPU are its own.
start_gateway s1
sleep 1
rss_kib "$GW_PID" >"$RUNS/s5-idle-gateway.rss"
start_baseline s1
sleep 1
rss_kib "$BL_PID" >"$RUNS/s5-idle-baseline.rss"
if [ -n "$BEFORE" ]; then
  SAVED_PORT=$GW_PORT SAVED_PID=$GW_PID
  GW_BIN=llm-gateway-before start_gateway s1-before
  BF_PORT=$GW_PORT BF_PID=$GW_PID
  GW_PORT=$SAVED_PORT GW_PID=$SAVED_PID
fi
scenario_overhead
sleep 1
rss_kib "$GW_PID" >"$RUNS/s5-idle-after-load-gateway.rss"
stop "$GW_PID"; stop "$BL_PID"
[ -n "$BEFORE" ] && stop "$BF_PID"
fi

if [ "$CALLGRIND" = 1 ] && want callgrind; then scenario_callgrind; fi
if want alloc; then scenario_allocations; fi

if want streams; then
start_baseline s2
scenario_many_streams baseline "$BL_PORT" "$BL_PID"
stop "$BL_PID"
start_gateway s2
scenario_many_streams gateway "$GW_PORT" "$GW_PID"
stop "$GW_PID"
start_baseline s2b
scenario_many_slow_streams baseline "$BL_PORT" "$BL_PID"
stop "$BL_PID"
start_gateway s2b
scenario_many_slow_streams gateway "$GW_PORT" "$GW_PID"
stop "$GW_PID"
fi

if want tail; then scenario_tail_cutting; fi
if want deadlines; then scenario_deadlines; fi

if want soak; then
start_gateway s5
scenario_soak
stop "$GW_PID"
fi

stop "$MOCK_PID"
echo "loadavg_end=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$RUN_DIR/machine.env"

python3 "$ROOT/bench/report.py" "$RUN_DIR" "$OUT"
log "wrote $OUT"
