#!/usr/bin/env bash
# The batch scenario of issue 17, bounded (about a minute by design): one 3,000-request
# batch job (CreateBatch, then StreamBatchResults to its end) through a policy over two mock
# accounts limited to 1,200 and 600 requests per minute (two mock processes, each with
# `--requests-per-minute`, one provider each, `pacing` set to the same limits, weighted 2:1).
# Writes its section of BENCHMARKS.md (between `<!-- batch:begin -->` and
# `<!-- batch:end -->`, which bench/report.py keeps).
#
#   bench/batch.sh               # build release binaries, run, write BENCHMARKS.md
#   bench/batch.sh --no-build    # use the binaries already in target/release
#   bench/batch.sh --debug       # build and use debug binaries
#   bench/batch.sh --requests N  # another job size (default 3000)
#   bench/batch.sh --out FILE    # write the section into FILE instead
#
# It needs the mock's per-key limit (`llm-gateway-mock --requests-per-minute`) and outbound
# pacing (`[providers.NAME] pacing = { requests_per_minute = N }`); without them it writes
# a section saying so and stops. The client is `buf curl` (installed from npm under
# target/ci-tools, as .ci/run does). Raw results go to target/bench/batch-<timestamp>/.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
BUILD=1
PROFILE=release
OUT="$ROOT/BENCHMARKS.md"
REQUESTS=3000
RPM_A=1200
RPM_B=600
while [ $# -gt 0 ]; do
  case "$1" in
    --no-build) BUILD=0 ;;
    --debug) PROFILE=debug ;;
    --requests) REQUESTS="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "bench/batch.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
RUN_DIR="$TARGET_DIR/bench/batch-$(date -u +%Y%m%dT%H%M%SZ)"
BIN="$RUN_DIR/bin"
mkdir -p "$BIN"
# Logging, processes (start/stop, all stopped on exit), free_port, wait_port.
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

TOOLS="${TOOLS_DIR:-$TARGET_DIR/ci-tools}"
BUF="$TOOLS/node_modules/.bin/buf"
if [ ! -x "$BUF" ]; then
  log "installing buf from npm into $TOOLS"
  mkdir -p "$TOOLS"
  npm install --silent --no-audit --no-fund --prefix "$TOOLS" @bufbuild/buf@1.75.0 >/dev/null
fi

if [ "$BUILD" = 1 ]; then
  log "building $PROFILE binaries"
  if [ "$PROFILE" = release ]; then FLAG=--release; else FLAG=; fi
  cargo build $FLAG --quiet --bin llm-gateway --bin llm-gateway-mock
fi
for b in llm-gateway llm-gateway-mock; do cp "$TARGET_DIR/$PROFILE/$b" "$BIN/$b"; done
{
  echo "profile=$PROFILE"
  echo "requests=$REQUESTS"
  echo "rpm_a=$RPM_A"
  echo "rpm_b=$RPM_B"
  echo "revision=$(git rev-parse --short HEAD)"
  echo "dirty=$(git status --porcelain --untracked-files=no | wc -l)"
  echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "nproc=$(nproc)"
  echo "load_start=$(cut -d' ' -f1-3 /proc/loadavg)"
} >"$RUN_DIR/run.env"

report() {
  python3 "$ROOT/bench/batch_report.py" "$RUN_DIR" "$OUT"
  log "wrote $OUT (raw results in $RUN_DIR)"
}

if ! "$BIN/llm-gateway-mock" --help | grep -q -- --requests-per-minute; then
  log "the mock has no --requests-per-minute (outbound pacing has not landed): not run"
  echo "missing=the mock upstream has no per-key requests-per-minute limit yet (llm-gateway-mock --requests-per-minute), and the gateway no outbound pacing" >>"$RUN_DIR/run.env"
  report
  exit 0
fi

port_a=$(free_port)
port_b=$(free_port)
start mock-a "$BIN/llm-gateway-mock" --listen "127.0.0.1:$port_a" --latency-ms 20 \
  --requests-per-minute "$RPM_A"
start mock-b "$BIN/llm-gateway-mock" --listen "127.0.0.1:$port_b" --latency-ms 20 \
  --requests-per-minute "$RPM_B"
wait_port "$port_a"
wait_port "$port_b"

GW_PORT=$(free_port)
cat >"$RUN_DIR/gateway.toml" <<EOF
[server]
listen = "127.0.0.1:$GW_PORT"
shutdown_grace = "5s"
[log]
level = "warn"
[store]
path = "$RUN_DIR/gateway.db"
[metrics]
listen = "off"
[http]
listen = "off"
[providers.acct-a]
kind = "openai"
base_url = "http://127.0.0.1:$port_a/v1"
api_key = "key-a"
pacing = { requests_per_minute = $RPM_A }
[providers.acct-b]
kind = "openai"
base_url = "http://127.0.0.1:$port_b/v1"
api_key = "key-b"
pacing = { requests_per_minute = $RPM_B }
[policies.bulk]
strategy = "weighted"
targets = [
  { provider = "acct-a", model = "gpt-4o-mini", weight = $RPM_A },
  { provider = "acct-b", model = "gpt-4o-mini", weight = $RPM_B },
]
EOF
start gateway "$BIN/llm-gateway" --config "$RUN_DIR/gateway.toml"
wait_port "$GW_PORT"

call() {
  "$BUF" curl --http2-prior-knowledge --protocol grpc "$@"
}
URL="http://127.0.0.1:$GW_PORT/llmgateway.v1.LlmGateway"

python3 - "$REQUESTS" >"$RUN_DIR/create.json" <<'PY'
import json, sys
n = int(sys.argv[1])
print(json.dumps({"requests": [
    {"customId": f"r{i}", "request": {"model": "bulk", "maxTokens": 16,
        "messages": [{"role": "ROLE_USER", "content": [{"text": f"item {i}"}]}]}}
    for i in range(n)], "tags": {"bench": "batch"}}))
PY
log "CreateBatch: $REQUESTS requests"
call -d @"$RUN_DIR/create.json" "$URL/CreateBatch" >"$RUN_DIR/created.json"
ID=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["batch"]["id"])' "$RUN_DIR/created.json")
log "job $ID: streaming its results"
timeout 600 "$BUF" curl --http2-prior-knowledge --protocol grpc --timeout 590s \
  -d "{\"batchId\":\"$ID\"}" "$URL/StreamBatchResults" >"$RUN_DIR/results.json"
call -d "{\"batchId\":\"$ID\"}" "$URL/GetBatch" >"$RUN_DIR/final.json"
curl -s "http://127.0.0.1:$port_a/mock/stats" >"$RUN_DIR/mock-a.json"
curl -s "http://127.0.0.1:$port_b/mock/stats" >"$RUN_DIR/mock-b.json"
echo "load_end=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$RUN_DIR/run.env"
cleanup
report
