#!/usr/bin/env bash
# The executor's scenarios of issue 13, short and bounded (about a minute and a half): each
# runs the gateway with its default settings (except what the scenario names) in front of a
# mock upstream, driven open loop by `llm-gateway-load`; upstream requests and cancellations
# are counted at the mock (GET /mock/stats). Writes its section of BENCHMARKS.md (between
# `<!-- executor:begin -->` and `<!-- executor:end -->`, which bench/report.py keeps).
#
#   bench/executor.sh               # build release binaries, run, write BENCHMARKS.md
#   bench/executor.sh --no-build    # use the binaries already in target/release
#   bench/executor.sh --debug       # build and use debug binaries (quicker to build; the
#                                   # scenarios are dominated by the mock's latencies)
#   bench/executor.sh --out FILE    # write the section into FILE instead
#
# 6. Outlier tail: 2% of calls take 2 s, the rest 50 ms; without hedging, and with default
#    percentile hedging (`hedging = { mode = "percentile" }`).
# 7. Lognormal tail: median 50 ms, p99 2 s (sigma 1.586); percentile 95 hedging (a 5% budget
#    of extra requests; the executor's hedge cap at its default 10%), beside the best p99 a
#    5% budget allows (computed from the distribution).
# 8. Hanging primary, healthy fallback (50 ms), default policy settings, 1 s deadline.
#
# Raw results go to target/bench/executor-<timestamp>/.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
BUILD=1
PROFILE=release
OUT="$ROOT/BENCHMARKS.md"
while [ $# -gt 0 ]; do
  case "$1" in
    --no-build) BUILD=0 ;;
    --debug) PROFILE=debug ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "bench/executor.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
RUN_DIR="$TARGET_DIR/bench/executor-$(date -u +%Y%m%dT%H%M%SZ)"
BIN="$RUN_DIR/bin"
mkdir -p "$BIN"
# Logging, processes (start/stop, all stopped on exit), free_port, wait_port.
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

stats() { curl -s "http://127.0.0.1:$1/mock/stats"; }

if [ "$BUILD" = 1 ]; then
  log "building $PROFILE binaries"
  if [ "$PROFILE" = release ]; then FLAG=--release; else FLAG=; fi
  cargo build $FLAG --quiet --bin llm-gateway --bin llm-gateway-mock --bin llm-gateway-load
fi
for b in llm-gateway llm-gateway-mock llm-gateway-load; do cp "$TARGET_DIR/$PROFILE/$b" "$BIN/$b"; done
echo "$PROFILE" >"$RUN_DIR/profile"

# gateway NAME MOCK_PORT EXTRA_TOML: starts a gateway with providers `a` and `b` on the mock.
gateway() {
  local name="$1" mock_port="$2" extra="$3"
  GW_PORT=$(free_port)
  cat >"$RUN_DIR/$name.toml" <<EOF
[server]
listen = "127.0.0.1:$GW_PORT"
shutdown_grace = "1s"
[log]
level = "warn"
[store]
path = ":memory:"
[metrics]
listen = "off"
[ledger]
enabled = false
[providers.a]
kind = "openai-compatible"
base_url = "http://127.0.0.1:$mock_port/v1"
[providers.b]
kind = "openai-compatible"
base_url = "http://127.0.0.1:$mock_port/v1"
$extra
EOF
  start "gateway-$name" "$BIN/llm-gateway" --config "$RUN_DIR/$name.toml"
  GW_PID=$STARTED
  wait_port "$GW_PORT"
}

# load NAME ARGS...: one recorded load run, its JSON line in NAME.json.
load() {
  local name="$1"; shift
  log "run $name"
  timeout 300 "$BIN/llm-gateway-load" --label "$name" --target "http://127.0.0.1:$GW_PORT" \
    --rpc chat --prompt hello --connections 2 "$@" >"$RUN_DIR/$name.out" 2>&1 || true
  tail -n 1 "$RUN_DIR/$name.out" >"$RUN_DIR/$name.json"
}

# measure NAME MOCK_PORT ARGS...: a load run with the mock's counters before and after.
measure() {
  local name="$1" port="$2"; shift 2
  stats "$port" >"$RUN_DIR/$name.before"
  load "$name" "$@"
  stats "$port" >"$RUN_DIR/$name.after"
}

# --- 6: outlier tail -------------------------------------------------------------------------
port=$(free_port)
start mock-outlier "$BIN/llm-gateway-mock" --listen "127.0.0.1:$port" \
  --latency-ms 50 --tail-ratio 0.02 --tail-ms 2000
mock_pid=$STARTED
wait_port "$port"
gateway s6 "$port" '
[policies.nohedge]
targets = [{ provider = "a", model = "m" }, { provider = "b", model = "m" }]
[policies.hedge]
targets = [{ provider = "a", model = "m" }, { provider = "b", model = "m" }]
execution = { hedging = { mode = "percentile" } }'
for policy in nohedge hedge; do
  # Warm-up (unrecorded): the percentile estimate needs its samples.
  load "s6-$policy-warmup" --model "$policy" --rate 100 --requests 200 --drain 10s
  measure "s6-$policy" "$port" --model "$policy" --rate 100 --requests 800 --drain 10s
done
stop "$GW_PID"; stop "$mock_pid"

# --- 7: lognormal tail -----------------------------------------------------------------------
port=$(free_port)
start mock-lognormal "$BIN/llm-gateway-mock" --listen "127.0.0.1:$port" \
  --latency-ms 50 --latency-sigma 1.586
mock_pid=$STARTED
wait_port "$port"
gateway s7 "$port" '
[policies.nohedge]
targets = [{ provider = "a", model = "m" }, { provider = "b", model = "m" }]
[policies.hedge]
targets = [{ provider = "a", model = "m" }, { provider = "b", model = "m" }]
execution = { hedging = { mode = "percentile", percentile = 95.0 } }'
for policy in nohedge hedge; do
  load "s7-$policy-warmup" --model "$policy" --rate 100 --requests 300 --drain 10s
  measure "s7-$policy" "$port" --model "$policy" --rate 100 --requests 1000 --drain 10s
done
stop "$GW_PID"; stop "$mock_pid"

# --- 8: hanging primary ----------------------------------------------------------------------
port=$(free_port)
start mock-hang "$BIN/llm-gateway-mock" --listen "127.0.0.1:$port" --latency-ms 50
mock_pid=$STARTED
wait_port "$port"
gateway s8 "$port" '
[policies.failover]
targets = [{ provider = "a", model = "m+hang" }, { provider = "b", model = "m" }]'
measure s8 "$port" --model failover --rate 50 --requests 400 --deadline 1s --drain 5s
# The gateway drops what it abandoned at once; give the mock a moment to see the closes.
sleep 1
stats "$port" >"$RUN_DIR/s8.after"
stop "$GW_PID"; stop "$mock_pid"

python3 "$ROOT/bench/executor_report.py" "$RUN_DIR" "$OUT"
log "wrote the executor section of $OUT (raw results in $RUN_DIR)"
