#!/usr/bin/env bash
# Memory of a tracker that touched N entitlements once and then went idle
# (RELIABILITY.md, "Scale"): RSS at start, after the load, and once every
# entitlement has left memory. Uses a private redis-server on a free port.
#
#   cargo build --release --workspace --bins
#   load-tests/scripts/idle-memory.sh 1000000            # N entitlements
#   TRACKER=path/to/headroom load-tests/scripts/idle-memory.sh 300000
set -euo pipefail
cd "$(dirname "$0")/../.."
n=${1:-1000000}
idle=${IDLE:-30s}
tracker=${TRACKER:-target/release/headroom}
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
redis_port=$(port)
http_port=$(port)
dir=$(mktemp -d)
redis-server --port "$redis_port" --save "" --appendonly no --dir "$dir" --daemonize yes \
  --logfile "$dir/redis.log" --pidfile "$dir/redis.pid"
cleanup() {
  kill "${pid:-0}" 2>/dev/null || true
  redis-cli -p "$redis_port" shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT
sleep 0.5
"$tracker" --listen "127.0.0.1:$http_port" --redis-url "redis://127.0.0.1:$redis_port" --no-auth \
  --hibernate-after 5s --idle-timeout "$idle" --sweep-interval 5s >"$dir/tracker.log" 2>&1 &
pid=$!
until curl -sf "http://127.0.0.1:$http_port/readyz" >/dev/null; do sleep 0.1; done
rss() { awk '/VmRSS/ {printf "%.0f MB", $2 / 1024}' "/proc/$pid/status"; }
echo "start: $(rss)"
started=$(date +%s)
target/release/load --addr "127.0.0.1:$http_port" --entitlements "$n" --connections 32 \
  --duration 2s --no-ledger --report "$dir/load.json" >"$dir/load.log" 2>&1
echo "after the load ($(( $(date +%s) - started )) s): $(rss), peak $(awk '/VmHWM/ {printf "%.0f MB", $2 / 1024}' "/proc/$pid/status")"
# Every entitlement leaves memory $idle after its last call; then idle workers trim.
for _ in $(seq 1 120); do
  resident=$(curl -s "http://127.0.0.1:$http_port/metrics" | awk '/^headroom_entitlements_in_memory / {print $2}')
  [ "$resident" = "0" ] && break
  sleep 1
done
sleep 12
echo "all left memory (resident $resident), idle: $(rss)"
