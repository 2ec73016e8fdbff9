#!/bin/bash
# Where the kernel side's cost sits (docs/benchmarks.md, "Where the cost sits"): nginx (one
# process, core 0) under `wrk -t1 -c32 -d10s` (core 1) with the agent exporting to nowhere,
# kernel.bpf_stats_enabled on; prints each of the agent's programs' runs and average run time.
# As root, after `cargo build --release -p agent`:
#   bash scripts/bench/program-costs.sh [AGENT_BINARY]
# AGENT_ARGS adds the agent's flags, e.g. the cost of what selection leaves out:
#   AGENT_ARGS=--ignore-port=18777 bash scripts/bench/program-costs.sh
set -u
REPO=$(cd "$(dirname "$0")/../.." && pwd)
AGENT=${1:-$REPO/target/release/sockspan}
DIR=$(mktemp -d); PORT=18777
mkdir -p "$DIR/www"
python3 -c "print('<p>' + 'hello ' * 90 + '</p>')" > "$DIR/www/index.html"
cat > "$DIR/nginx.conf" <<CONF
daemon off; master_process off; worker_processes 1; pid $DIR/nginx.pid; error_log $DIR/error.log warn;
events { worker_connections 1024; }
http { access_log off; sendfile on; tcp_nopush on; default_type text/html;
  client_body_temp_path $DIR/b; proxy_temp_path $DIR/p; fastcgi_temp_path $DIR/f; uwsgi_temp_path $DIR/u; scgi_temp_path $DIR/s;
  server { listen 127.0.0.1:$PORT; root $DIR/www; } }
CONF
taskset -c 0 /usr/sbin/nginx -p "$DIR" -c "$DIR/nginx.conf" -e "$DIR/error.log" & NG=$!
OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:9 OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf \
  "$AGENT" ${AGENT_ARGS:-} > /dev/null 2> "$DIR/agent.err" & AG=$!
for _ in $(seq 150); do grep -q "sockspan ready" "$DIR/agent.err" && break; sleep 0.2; done
OLD=$(cat /proc/sys/kernel/bpf_stats_enabled); echo 1 > /proc/sys/kernel/bpf_stats_enabled
# The agent's programs, by the ids its descriptors hold.
IDS=$(cat /proc/$AG/fdinfo/* 2>/dev/null | awk '/^prog_id:/{print $2}' | sort -u | tr '\n' ' ')
snap() { bpftool -j prog show | python3 -c "
import json, sys
ids = set(int(x) for x in '$IDS'.split())
for p in json.load(sys.stdin):
    if p['id'] in ids: print(p['name'], p.get('run_time_ns', 0), p.get('run_cnt', 0))"; }
cpu() { awk '{print $14 + $15}' /proc/$AG/stat; }
snap > "$DIR/before"; CPU0=$(cpu)
taskset -c 1 wrk -t1 -c32 -d10s "http://127.0.0.1:$PORT/index.html" | tee "$DIR/wrk" | grep -E "Requests/sec"
snap > "$DIR/after"; CPU1=$(cpu)
echo "$OLD" > /proc/sys/kernel/bpf_stats_enabled
kill -INT $AG; wait $AG; kill $NG; wait $NG 2>/dev/null
REQ=$(awk '/requests in/{print $1}' "$DIR/wrk")
python3 - "$DIR" "$REQ" "$((CPU1 - CPU0))" "$(getconf CLK_TCK)" <<'PY'
import sys
d, req = sys.argv[1], int(sys.argv[2])
user_us = int(sys.argv[3]) / int(sys.argv[4]) * 1e6 / req
before = {l.split()[0]: (int(l.split()[1]), int(l.split()[2])) for l in open(d + "/before")}
rows = []
for l in open(d + "/after"):
    n, ns, c = l.split()
    ns, c = int(ns) - before[n][0], int(c) - before[n][1]
    if c:
        rows.append((ns, c, n))
rows.sort(reverse=True)
total, runs = sum(r[0] for r in rows), sum(r[1] for r in rows)
print(f"{'program':28s} {'runs/request':>12s} {'ns/run':>8s} {'share':>6s}")
for ns, c, n in rows:
    print(f"{n:28s} {c / req:12.2f} {ns / c:8.0f} {100 * ns / total:5.1f}%")
print(f"all: {runs / req:.1f} runs and {total / req / 1000:.2f} µs per request, {total / runs:.0f} ns per run")
print(f"agent process (userspace): {user_us:.2f} µs CPU per request")
PY
rm -rf "$DIR"
