#!/bin/bash
# sockspan against the OpenTelemetry zero-code agent for Node.js (docs/benchmarks.md, "Against
# the OpenTelemetry Node.js agent"): a Node.js `http` hello server pinned to core 0, loaded by
# `wrk -t1 -c32 -d10s` on core 1, with nothing, with sockspan exporting OTLP/HTTP to
# scripts/otlp-sink.py, and with @opentelemetry/auto-instrumentations-node (pinned below)
# exporting to the same sink; ROUNDS rounds. As root, after `cargo build --release -p agent`:
#   bash scripts/bench/node-vs-otel.sh [ROUNDS]
set -u
ROUNDS=${1:-3}; PORT=18790
REPO=$(cd "$(dirname "$0")/../.." && pwd)
DIR=$(mktemp -d); cd "$DIR"
npm init -y > /dev/null
npm install --no-audit --no-fund @opentelemetry/auto-instrumentations-node@0.67.0 @opentelemetry/api@1.9.0 > npm.log 2>&1 \
  || { echo "npm install failed: $(tail -3 npm.log)"; exit 1; }
cat > hello.js <<'JS'
const http = require('http');
http.createServer((req, res) => { res.writeHead(200, {'Content-Type': 'text/plain'}); res.end('hello world\n'); })
  .listen(+process.argv[2], '127.0.0.1', () => console.log('listening'));
JS
mkdir sink; python3 "$REPO/scripts/otlp-sink.py" serve sink > sink.out 2>&1 & SK=$!
for _ in $(seq 50); do grep -q "[0-9]$" sink.out && break; sleep 0.1; done
SINK=http://127.0.0.1:$(grep -o "[0-9]*$" sink.out | head -1)
# run NAME NODE_ARGS... : one wrk run against a fresh server; prints req/s and p99.
run() {
  local name=$1; shift
  taskset -c 0 node "$@" hello.js $PORT > node.out 2>&1 & local N=$!
  for _ in $(seq 100); do grep -q listening node.out && break; sleep 0.1; done
  taskset -c 1 wrk -t1 -c32 -d2s "http://127.0.0.1:$PORT/" > /dev/null
  echo "$name $(taskset -c 1 wrk -t1 -c32 -d10s --latency "http://127.0.0.1:$PORT/" \
    | awk '/Requests\/sec/{rps=$2} / 99%/{p99=$2} END{print rps, p99}')"
  kill -9 $N; wait $N 2>/dev/null
}
for r in $(seq "$ROUNDS"); do
  run off
  OTEL_EXPORTER_OTLP_ENDPOINT=$SINK OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf \
    "$REPO/target/release/sockspan" > /dev/null 2> agent.err & AG=$!
  for _ in $(seq 150); do grep -q "sockspan ready" agent.err && break; sleep 0.2; done
  run sockspan
  kill -INT $AG; wait $AG
  OTEL_SERVICE_NAME=hello OTEL_TRACES_EXPORTER=otlp OTEL_METRICS_EXPORTER=none OTEL_LOGS_EXPORTER=none \
  OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf OTEL_EXPORTER_OTLP_ENDPOINT=$SINK OTEL_NODE_RESOURCE_DETECTORS=none \
    run otel-node --require @opentelemetry/auto-instrumentations-node/register
done | tee runs.txt
kill $SK
python3 - runs.txt <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    name, rps, p99 = line.split()
    rows.setdefault(name, []).append((float(rps), p99))
off = statistics.median(r for r, _ in rows["off"])
loss = {n: 1 - statistics.median(r for r, _ in v) / off for n, v in rows.items()}
for n, v in rows.items():
    print(f"{n:10s} req/s median {statistics.median(r for r, _ in v):9.0f}  loss {100 * loss[n]:5.1f} %  p99 {[p for _, p in v]}")
print(f"sockspan loss / otel-node loss: {loss['sockspan'] / loss['otel-node']:.2f} (target <= 0.20)")
PY
cd /; rm -rf "$DIR"
