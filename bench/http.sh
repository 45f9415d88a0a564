#!/usr/bin/env bash
# The HTTP front under wrk (issue 15): OpenAI Chat Completions, unary and stream, c=32, the
# mock upstream at 0 ms, beside the mock called directly with the same requests, in one
# run. Reports calls/s and the gateway's CPU time per call (utime+stime of its process over
# the measured run / calls), and writes them into BENCHMARKS.md between the
# `<!-- http-front -->` markers. Loopback only, bounded; stops everything it starts.
#
#   bench/http.sh                # 10 s per case after a 2 s warm-up
#   bench/http.sh --duration 30  # seconds per case
#   bench/http.sh --no-build     # use target/release as built
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
DURATION=10
BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) DURATION="$2"; shift ;;
    --no-build) BUILD=0 ;;
    *) echo "bench/http.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
command -v wrk >/dev/null || { echo "bench/http.sh: needs wrk (apt-get install wrk)" >&2; exit 2; }
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
[ "$BUILD" = 0 ] || cargo build --release --quiet --bin llm-gateway --bin llm-gateway-mock
RUN="$(mktemp -d)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$RUN"; }
trap cleanup EXIT
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
MOCK=$(free_port); GRPC=$(free_port); HTTP=$(free_port)
cat >"$RUN/gateway.toml" <<TOML
[server]
listen = "127.0.0.1:$GRPC"
[http]
listen = "127.0.0.1:$HTTP"
[metrics]
listen = "off"
[store]
path = ":memory:"
[log]
level = "warn"
[providers.openai]
kind = "openai"
base_url = "http://127.0.0.1:$MOCK/v1"
api_key = "sk-bench"
TOML
"$BIN/llm-gateway-mock" --listen "127.0.0.1:$MOCK" >"$RUN/mock.log" 2>&1 &
PIDS+=($!)
env -u OPENAI_API_KEY "$BIN/llm-gateway" --config "$RUN/gateway.toml" >"$RUN/gw.log" 2>&1 &
GW=$!
PIDS+=($GW)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$HTTP/v1/models" >/dev/null && break; sleep 0.1; done

body() {
  printf '{"model":"%s","messages":[{"role":"user","content":"say hello to the benchmark"}]%s}' "$1" "$2"
}
lua() { # $1 body file
  cat <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("$1"); wrk.body = f:read("*a"); f:close()
LUA
}
body gpt-4o-mini "" >"$RUN/mock-unary.json"
body gpt-4o-mini ',"stream":true' >"$RUN/mock-stream.json"
body openai/gpt-4o-mini "" >"$RUN/gw-unary.json"
body openai/gpt-4o-mini ',"stream":true,"stream_options":{"include_usage":true}' >"$RUN/gw-stream.json"
for f in mock-unary mock-stream gw-unary gw-stream; do lua "$RUN/$f.json" >"$RUN/$f.lua"; done

TCK=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
ROWS=()
measure() { # name port script
  local name=$1 port=$2 script=$3 out before after calls rps errors cpu
  wrk -t2 -c32 -d2s -s "$RUN/$script.lua" "http://127.0.0.1:$port/v1/chat/completions" >/dev/null
  before=$(cpu_ticks "$GW")
  out=$(wrk -t2 -c32 -d"${DURATION}s" -s "$RUN/$script.lua" "http://127.0.0.1:$port/v1/chat/completions")
  after=$(cpu_ticks "$GW")
  echo "$out" >"$RUN/$name.txt"
  calls=$(echo "$out" | awk '/requests in/ {print $1}')
  rps=$(echo "$out" | awk '/Requests\/sec/ {printf "%.0f", $2}')
  errors=$(echo "$out" | awk '/Non-2xx/ {print $5}')
  if [ "$port" = "$HTTP" ]; then
    cpu=$(python3 -c "print(f'{($after-$before)/$TCK*1e6/$calls:.1f}')")
  else
    cpu="-"
  fi
  ROWS+=("| $name | $rps | ${errors:-0} | $cpu |")
  echo "$name: $rps calls/s, errors ${errors:-0}, gateway cpu/call ${cpu} us" >&2
}
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
measure "mock direct, unary" "$MOCK" mock-unary
measure "mock direct, stream" "$MOCK" mock-stream
measure "gateway http, unary" "$HTTP" gw-unary
measure "gateway http, stream" "$HTTP" gw-stream
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

SECTION="$RUN/section.md"
{
  echo "<!-- http-front -->"
  echo "## HTTP front under wrk (bench/http.sh)"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores ($(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)),"
  echo "load average before/after: $LOAD_BEFORE / $LOAD_AFTER. \`wrk -t2 -c32 -d${DURATION}s\` after a 2 s"
  echo "warm-up; the mock at 0 ms; POST /v1/chat/completions (stream: with \`include_usage\`)."
  echo "Gateway CPU per call = the gateway process's utime+stime over the run / calls."
  echo "Goals (issue 15): <= 45 us unary and <= 75 us stream per call, >= 28.6k calls/s."
  echo
  echo "| case | calls/s | non-2xx | gateway CPU us/call |"
  echo "|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
  echo "<!-- /http-front -->"
} >"$SECTION"
python3 - "$ROOT/BENCHMARKS.md" "$SECTION" <<'PY'
import re, sys
path, section = sys.argv[1], open(sys.argv[2]).read().rstrip() + "\n"
text = open(path).read() if __import__("os").path.exists(path) else ""
pattern = re.compile(r"<!-- http-front -->.*?<!-- /http-front -->\n?", re.S)
text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section
open(path, "w").write(text)
PY
cat "$SECTION"
