#!/usr/bin/env bash
# A/B of two WarrenMQ binaries on the hot path: the same perf run against each,
# alternating (so that the machine's slow spells fall on both), several rounds.
# Prints every run's figures, then each binary's median publish rate and median
# broker CPU seconds. Nothing here is a test: it only prints figures.
# Usage: bench/ab.sh OLD_BINARY NEW_BINARY [ROUNDS] [PERF ARGS...]
#   ROUNDS     alternated runs of each binary (default 5)
#   PERF ARGS  for examples/perf (default: --size 1024 --publishers 1 --consumers 1
#              --confirm 256 --prefetch 256 --seconds 8)
# Build the client first: cargo build --release --examples
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n 2,10p "$0"; exit 2; }
old=$1 new=$2 rounds=${3:-5}
shift $(( $# >= 3 ? 3 : 2 ))
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--size 1024 --publishers 1 --consumers 1 --confirm 256 --prefetch 256 --seconds 8)
perf=target/release/examples/perf
[ -x "$perf" ] || { echo "build the client first: cargo build --release --examples"; exit 2; }
tck=$(getconf CLK_TCK)
port=5697
out=$(mktemp)

run() { # binary label
  local data; data=$(mktemp -d)
  "$1" --listen "127.0.0.1:$port" --data-dir "$data" >/dev/null 2>&1 &
  local pid=$!
  for _ in $(seq 1 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
  local rate; rate=$("$perf" --port "$port" "${args[@]}" 2>/dev/null | grep -o 'publish_rate=[0-9]*' | cut -d= -f2)
  local ut st; read -r ut st <<<"$(awk '{print $14, $15}' "/proc/$pid/stat")"
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rm -rf "$data"
  local cpu; cpu=$(awk -v t=$((ut + st)) -v h="$tck" 'BEGIN { printf "%.2f", t / h }')
  echo "$2 publish_rate=$rate broker_cpu_s=$cpu" | tee -a "$out"
}

for _ in $(seq 1 "$rounds"); do
  run "$old" old
  run "$new" new
done
median() { sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
for who in old new; do
  rate=$(grep "^$who " "$out" | sed 's/.*publish_rate=\([0-9]*\).*/\1/' | median)
  cpu=$(grep "^$who " "$out" | sed 's/.*broker_cpu_s=\([0-9.]*\).*/\1/' | median)
  echo "$who: median publish_rate=$rate msg/s, median broker CPU $cpu s per run"
done
rm -f "$out"
