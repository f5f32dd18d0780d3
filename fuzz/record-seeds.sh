#!/usr/bin/env bash
# Rebuilds the seed corpora in fuzz/corpus/: runs integration tests (lapin clients
# and raw sockets) against a broker through a recording proxy (seeds.py record),
# adds the hand-made sessions (seeds.py handmade), then keeps only the seeds that
# add coverage (libFuzzer -merge=1, so run.sh's build must work here).
# Usage: fuzz/record-seeds.sh [TEST ...]   (default: a set of client-driven tests)
set -euo pipefail
cd "$(dirname "$0")/.."
tests=("$@")
[ ${#tests[@]} -gt 0 ] || tests=(connection consume confirms tx routing queues rpc qos extensions errors raw_socket)
raw=$(mktemp -d)
data=$(mktemp -d)
port=5692
proxy=5693
cargo build --locked --bin warrenmq
./target/debug/warrenmq --listen "127.0.0.1:$port" --data-dir "$data" >"$raw/broker.log" 2>&1 &
broker=$!
python3 fuzz/seeds.py record "$proxy" "127.0.0.1:$port" "$raw" &
rec=$!
cleanup() { kill "$rec" "$broker" 2>/dev/null || true; rm -rf "$data"; }
trap cleanup EXIT
sleep 1
for t in "${tests[@]}"; do
  WARRENMQ_TEST_EXTERNAL="127.0.0.1:$proxy" cargo test --locked --test "$t" -- --test-threads=2 >"$raw/test-$t.log" 2>&1 \
    || echo "note: some $t tests failed against the external broker (seeds are still recorded)"
done
sleep 1
cleanup
trap - EXIT
python3 fuzz/seeds.py handmade "$raw"
for target in frame connection; do
  echo "recorded $(ls "$raw/$target" | wc -l) $target seeds"
  mkdir -p "fuzz/corpus/$target"
  (cd fuzz && cargo fuzz run -s none -O -a "$target" "corpus/$target" "$raw/$target" -- -merge=1 -max_len=16384) 2>&1 | grep -E "MERGE-OUTER|ERROR" || true
  echo "fuzz/corpus/$target: $(ls "fuzz/corpus/$target" | wc -l) seeds"
done
rm -rf "$raw"
