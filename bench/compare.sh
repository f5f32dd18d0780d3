#!/usr/bin/env bash
# Side-by-side benchmark: WarrenMQ and RabbitMQ on this machine, in one run.
# Usage: bench/compare.sh [RUNS] [SECONDS]     (default 5 runs of 10 s per scenario)
#
# Starts RabbitMQ (installing rabbitmq-server with apt-get if needed) on 5672 and
# the release WarrenMQ on 5673, then runs examples/perf.rs against each broker in
# turn, RUNS times per scenario, and prints the median of each figure and the
# WarrenMQ/RabbitMQ ratio. Nothing here is a test: it only prints figures.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-5}
SECS=${2:-10}
WPORT=5673
RPORT=5672

wait_port() { for _ in $(seq 1 300); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }

if ! command -v rabbitmq-server >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
fi
if ! (exec 3<>"/dev/tcp/127.0.0.1/$RPORT") 2>/dev/null; then
  echo "starting RabbitMQ"
  (rabbitmq-server >/tmp/bench-rabbitmq.log 2>&1 &)
  wait_port $RPORT
  sleep 3
fi
cargo build --release --quiet --bin warrenmq --example perf
./target/release/warrenmq --listen 127.0.0.1:$WPORT --log-level warn &
WPID=$!
trap 'kill $WPID 2>/dev/null || true' EXIT
wait_port $WPORT

rabbit_rss() { ps -C beam.smp -o rss= | awk '{s+=$1} END {print s}'; }
warren_rss() { ps -p $WPID -o rss= | awk '{print $1}'; }

scenarios=(
  "confirms-1KiB|--size 1024 --publishers 1 --consumers 1 --confirm 256 --prefetch 256"
  "confirms-16B-4x4|--size 16 --publishers 4 --consumers 4 --confirm 256 --prefetch 256"
  "confirms-64KiB|--size 65536 --publishers 1 --consumers 1 --confirm 64 --prefetch 64"
)
out=$(mktemp)
for s in "${scenarios[@]}"; do
  name=${s%%|*}; args=${s#*|}
  for r in $(seq 1 "$RUNS"); do
    for b in warrenmq rabbitmq; do
      port=$WPORT; [ $b = rabbitmq ] && port=$RPORT
      line=$(./target/release/examples/perf --port $port --seconds "$SECS" $args)
      rss=$([ $b = rabbitmq ] && rabbit_rss || warren_rss)
      echo "$name $b $line rss_kib=$rss" | tee -a "$out"
    done
  done
done

python3 - "$out" <<'PY'
import sys, statistics, collections
rows = collections.defaultdict(lambda: collections.defaultdict(list))
for line in open(sys.argv[1]):
    parts = line.split()
    name, broker = parts[0], parts[1]
    for kv in parts[2:]:
        k, v = kv.split("=")
        rows[name][(broker, k)].append(float(v))
keys = ["publish_rate", "consume_rate", "confirm_p50_ms", "confirm_p99_ms", "e2e_p50_ms", "e2e_p99_ms", "rss_kib"]
print()
print("| scenario | figure | WarrenMQ (median) | RabbitMQ (median) | WarrenMQ / RabbitMQ |")
print("|---|---|---|---|---|")
for name, d in rows.items():
    for k in keys:
        w = statistics.median(d[("warrenmq", k)]); r = statistics.median(d[("rabbitmq", k)])
        ratio = f"{w / r:.2f}" if r else "-"
        print(f"| {name} | {k} | {w:,.2f} | {r:,.2f} | {ratio} |")
PY
