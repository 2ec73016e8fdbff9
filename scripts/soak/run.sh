#!/bin/bash
# 10-minute soak (docs/reliability.md): nginx and a Python server under paced keep-alive load, the
# agent exporting OTLP/HTTP to the benchmarks' sink (xtask/src/sink.rs). As root, after
# `cargo build --release -p agent -p xtask`:
#   bash scripts/soak/run.sh [SECONDS] [RATE]      (defaults 600 s, 400 requests/s asked)
# Writes its figures to $OUT (default /tmp/sockspan-soak): load.json, counts.json, metrics.txt,
# rss.txt (agent VmRSS in KiB every 15 s).
set -u
SECS=${1:-600}; RATE=${2:-400}
HERE=$(cd "$(dirname "$0")" && pwd); REPO=$(cd "$HERE/../.." && pwd)
OUT=${OUT:-/tmp/sockspan-soak}; rm -rf "$OUT"; mkdir -p "$OUT/www" "$OUT/sink"
echo "<p>soak</p>" > "$OUT/www/index.html"
cat > "$OUT/nginx.conf" <<CONF
daemon off; master_process off; worker_processes 1; pid $OUT/nginx.pid; error_log $OUT/error.log warn;
events { worker_connections 1024; }
http { access_log off; default_type text/html; client_body_temp_path $OUT/body; proxy_temp_path $OUT/proxy;
  fastcgi_temp_path $OUT/fcgi; uwsgi_temp_path $OUT/uwsgi; scgi_temp_path $OUT/scgi;
  server { listen 127.0.0.1:18380; root $OUT/www; } }
CONF
/usr/sbin/nginx -p "$OUT" -c "$OUT/nginx.conf" -e "$OUT/error.log" & NG=$!
python3 "$HERE/server.py" & PY=$!
"$REPO/target/release/xtask" otlp-sink "$OUT/sink" --port 18390 > "$OUT/sink.log" 2>&1 & SK=$!
sleep 1
OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:18390 OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf \
  "$REPO/target/release/sockspan" --metrics-addr 127.0.0.1:18391 > "$OUT/agent.out" 2> "$OUT/agent.err" & AG=$!
sleep 3
( while kill -0 $AG 2>/dev/null; do echo "$(date +%s) $(awk '/VmRSS/{print $2}' /proc/$AG/status)"; sleep 15; done ) > "$OUT/rss.txt" &
python3 "$HERE/load.py" "$RATE" "$SECS" > "$OUT/load.json"
sleep 5
curl -s 127.0.0.1:18391/metrics > "$OUT/metrics.txt"
kill -INT $AG; wait $AG; echo "agent exit $?" > "$OUT/agent.exit"
kill $NG $PY; sleep 1; kill $SK
python3 "$REPO/scripts/otlp-sink.py" count "$OUT/sink" > "$OUT/counts.json"
cat "$OUT/load.json" "$OUT/counts.json" "$OUT/agent.exit"
