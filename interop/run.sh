#!/usr/bin/env bash
# Run every third-party client suite against the broker at HOST:PORT.
# Usage: interop/run.sh [HOST [PORT]]   (default 127.0.0.1 5672)
# Prints each suite's output, then one "<suite>: N passed, M failed" line per
# suite and, last, the total "interop: N passed, M failed". Exits non-zero if
# any suite failed (or could not run).
set -uo pipefail
exec 2>&1
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SUITES=(py-amqp kombu lapin rabbitmqadmin console flower)

if [ $# -gt 2 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    echo "usage: interop/run.sh [HOST [PORT]]   (default 127.0.0.1 5672)"
    exit 2
fi

total_passed=0 total_failed=0 status=0 summaries=()
for suite in "${SUITES[@]}"; do
    echo "[interop] ===== $suite ====="
    out="$(mktemp)"
    start=$SECONDS
    bash "$DIR/$suite.sh" "$@" </dev/null | tee "$out"
    rc=${PIPESTATUS[0]}
    last="$(tail -n 1 "$out")"
    rm -f "$out"
    if [[ "$last" =~ ^$suite:\ ([0-9]+)\ passed,\ ([0-9]+)\ failed$ ]]; then
        p=${BASH_REMATCH[1]} f=${BASH_REMATCH[2]}
    else
        p=0 f=1
        last="$suite: 0 passed, 1 failed"
    fi
    [ "$rc" -eq 0 ] || status=1
    total_passed=$((total_passed + p))
    total_failed=$((total_failed + f))
    summaries+=("$last   (exit $rc, $((SECONDS - start))s)")
done

echo "[interop] ===== summary ====="
for line in "${summaries[@]}"; do echo "[interop] $line"; done
echo "interop: $total_passed passed, $total_failed failed"
exit "$status"
