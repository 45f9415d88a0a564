#!/usr/bin/env bash
# Generates the Go stubs from proto/ and builds the example, GOPATH-style against Debian's
# packaged Go libraries (/usr/share/gocode: golang-google-grpc-dev, golang-google-protobuf-dev,
# golang-google-genproto-dev), so no module proxy is needed. protoc-gen-go is built from
# the packaged google.golang.org/protobuf sources; protoc-gen-go-grpc and protoc are Debian's.
# Usage: examples/go/build.sh OUT_DIR   (then OUT_DIR/client HOST:PORT)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
export GO111MODULE=off GOPATH="$OUT/gopath:/usr/share/gocode" GOCACHE="$OUT/cache" GOFLAGS=
GEN="$OUT/gopath/src/llmgateway.local/gen/llmgatewayv1"
APP="$OUT/gopath/src/llmgateway.local/example"
mkdir -p "$GEN" "$APP" "$OUT/bin"
[ -x "$OUT/bin/protoc-gen-go" ] ||
  go build -o "$OUT/bin/protoc-gen-go" google.golang.org/protobuf/cmd/protoc-gen-go
# The protos carry no go_package; map them to the stub package here.
MAP="Mllmgateway/v1/gateway.proto=llmgateway.local/gen/llmgatewayv1"
MAP="$MAP,Mllmgateway/v1/admin.proto=llmgateway.local/gen/llmgatewayv1"
rm -f "$GEN"/*.go
PATH="$OUT/bin:$PATH" protoc -I proto -I /usr/include \
  --go_out="$GEN" --go_opt=paths=source_relative,"$MAP" \
  --go-grpc_out="$GEN" --go-grpc_opt=paths=source_relative,"$MAP" \
  proto/llmgateway/v1/gateway.proto proto/llmgateway/v1/admin.proto
# source_relative puts them under llmgateway/v1/; the package is the directory itself.
mv "$GEN"/llmgateway/v1/*.go "$GEN"/ && rm -rf "$GEN/llmgateway"
cp examples/go/main.go "$APP/main.go"
go build -o "$OUT/client" llmgateway.local/example
