#!/usr/bin/env bash
# Runs one fuzz target for a bounded time: fuzz/run.sh TARGET SECONDS
#   TARGET: frame | connection | store (fuzz/fuzz_targets/)
# Installs cargo-fuzz if missing, builds on stable Rust (no sanitizer, so no -Z flags;
# debug assertions and overflow checks on), then runs libFuzzer on the committed seeds
# (fuzz/corpus/TARGET, read only) plus a local working corpus (fuzz/corpus-work/TARGET,
# not committed, where new inputs go). Prints executions, coverage and crashes; a crash
# leaves its input under fuzz/artifacts/TARGET/ and makes the exit status non-zero.
# Environment: FUZZ_ARGS adds libFuzzer flags.
set -euo pipefail
cd "$(dirname "$0")"
target=${1:?usage: fuzz/run.sh TARGET SECONDS}
seconds=${2:?usage: fuzz/run.sh TARGET SECONDS}
CARGO_FUZZ_VERSION=0.13.2
if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  echo "installing cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo install --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi
flags=(-s none -O -a)
cargo fuzz build "${flags[@]}" "$target"
mkdir -p "corpus/$target" "corpus-work/$target" "artifacts/$target"
# The connection target's broker keeps its data under TMPDIR: one per run, removed
# after; in memory where there is a tmpfs, so that its fsyncs cost nothing.
tmp=$(mktemp -d -p /dev/shm 2>/dev/null || mktemp -d)
log=$(mktemp)
trap 'rm -rf "$tmp" "$log"' EXIT
# shellcheck disable=SC2086
{
  TMPDIR=$tmp cargo fuzz run "${flags[@]}" "$target" "corpus-work/$target" "corpus/$target" -- \
    -max_total_time="$seconds" -max_len=16384 -timeout=30 -rss_limit_mb=4096 \
    -print_final_stats=1 ${FUZZ_ARGS:-} 2>&1
  echo "$?" >"$tmp/status"
} | tee "$log" | grep -aE --line-buffered \
  '^#[0-9]+[[:space:]]+(INITED|DONE|pulse)|^ERROR|^==[0-9]+==|panicked|overflowed|SUMMARY|Test unit written|Running' || true
status=$(cat "$tmp/status" 2>/dev/null || echo 1)
echo
echo "=== fuzz $target: ${seconds}s"
grep -aE '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb|new_units_added)' "$log" || true
last=$(grep -aE '^#[0-9]+[[:space:]]' "$log" | tail -n 1 || true)
echo "last status: ${last:-none}"
if grep -aq 'Test unit written' "$log"; then
  echo "CRASH:"
  grep -aE 'panicked|overflowed|deadly signal|SUMMARY|Test unit written' "$log"
  status=1
fi
exit "$status"
