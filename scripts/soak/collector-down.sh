#!/bin/bash
# The collector down under load (docs/reliability.md, "One memory budget"): the agent exports to
# an endpoint where nothing listens, with --memory-limit, while 50 connections at a time each
# write 60 pipelined requests to tests/fixtures/hold_server.py, for SECONDS. As root, after
# `cargo build --release -p agent`:
#   bash scripts/soak/collector-down.sh [SECONDS] [LIMIT]     (defaults 600 s, 144MiB)
# Writes to $OUT (default /tmp/sockspan-collector-down): rss.txt (agent VmRSS in KiB every
# second), metrics.txt, summary.txt.
set -u
SECS=${1:-600}; LIMIT=${2:-144MiB}
HERE=$(cd "$(dirname "$0")" && pwd); REPO=$(cd "$HERE/../.." && pwd)
OUT=${OUT:-/tmp/sockspan-collector-down}; rm -rf "$OUT"; mkdir -p "$OUT"
python3 "$REPO/tests/fixtures/hold_server.py" 18480 answer & SV=$!
sleep 1
OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:18489 OTEL_EXPORTER_OTLP_PROTOCOL=grpc \
  "$REPO/target/release/sockspan" --memory-limit "$LIMIT" --metrics-addr 127.0.0.1:18491 \
  > "$OUT/agent.out" 2> "$OUT/agent.err" & AG=$!
sleep 4
( while kill -0 $AG 2>/dev/null; do echo "$(date +%s) $(awk '/VmRSS/{print $2}' /proc/$AG/status)"; sleep 1; done ) > "$OUT/rss.txt" &
END=$(( $(date +%s) + SECS )); REQ=0
while [ "$(date +%s)" -lt $END ]; do
  N=$(python3 "$REPO/tests/fixtures/hostile_client.py" pipeline 18480 50 60 300 | python3 -c 'import json,sys; print(json.load(sys.stdin)["ok"])')
  REQ=$((REQ + N))
done
sleep 2
curl -s 127.0.0.1:18491/metrics > "$OUT/metrics.txt"
kill -INT $AG; wait $AG; EXIT=$?
kill $SV
{
  echo "seconds $SECS limit $LIMIT requests $REQ agent_exit $EXIT"
  awk '$2 != "" {n++; s=$2; if ($2 > m) m = $2; if (n == 1) f = $2} END {printf "rss_kib first %d peak %d last %d samples %d\n", f, m, s, n}' "$OUT/rss.txt"
  grep -E '^sockspan_(spans_created_total|spans_exported_total|spans_dropped_total|memory_shed_total|events_dropped_total)' "$OUT/metrics.txt" | grep -v ' 0$'
} | tee "$OUT/summary.txt"
