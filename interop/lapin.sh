#!/usr/bin/env bash
# lapin's own integration tests (tests/ in the lapin crate as published on
# crates.io) against the AMQP 0-9-1 broker at HOST:PORT (guest/guest, vhost "/").
# The crate is fetched by cargo itself, through a throwaway package that depends
# on the pinned version, then built and tested from a copy under interop/.cache.
# Usage: interop/lapin.sh [HOST [PORT]]   (default 127.0.0.1 5672)
# Last line of output: "lapin: N passed, M failed".
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
SUITE=lapin
parse_host_port "$SUITE" "$@"

LAPIN_VERSION=4.12.3
CACHE="$INTEROP_CACHE/lapin"
FETCH="$CACHE/fetch"
SRC="$CACHE/lapin-$LAPIN_VERSION"
LOG="$INTEROP_CACHE/results/lapin.log"
mkdir -p "$FETCH/src" "$INTEROP_CACHE/results"

fail() { log "$SUITE: $*"; echo "$SUITE: 0 passed, 1 failed"; exit 1; }

if [ ! -f "$SRC/Cargo.toml" ]; then
    cat > "$FETCH/Cargo.toml" <<TOML
[package]
name = "lapin-fetch"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
lapin = { version = "=$LAPIN_VERSION", default-features = false }
TOML
    : > "$FETCH/src/lib.rs"
    cargo fetch --manifest-path "$FETCH/Cargo.toml" || fail "cargo fetch of lapin $LAPIN_VERSION failed"
    manifest=$(cargo metadata --format-version 1 --manifest-path "$FETCH/Cargo.toml" \
        | python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="lapin"))') \
        || fail "cannot locate the lapin crate"
    rm -rf "$SRC"
    cp -r "$(dirname "$manifest")" "$SRC" || fail "cannot copy the lapin crate"
fi

check_broker "$SUITE"

# The tests read AMQP_ADDR; conn_refused.rs expects nothing on localhost:5673.
# --tests builds what runs by default (the smol example test needs a feature).
export AMQP_ADDR="amqp://$HOST:$PORT/%2f"
log "running lapin $LAPIN_VERSION's tests against $AMQP_ADDR"
set +e
CARGO_TARGET_DIR="$CACHE/target" timeout "${INTEROP_SUITE_TIMEOUT}" \
    cargo test --manifest-path "$SRC/Cargo.toml" --tests 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
set -e

# Count only the integration test binaries (tests/*.rs): the library's own unit
# tests never reach a broker.
read -r passed failed < <(awk '
    /Running tests\// { integ = 1; next }
    /Running /        { integ = 0; next }
    integ && /^test result:/ { p += $4; f += $6 }
    END { print p + 0, f + 0 }' "$LOG")
if [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then
    failed=1   # it did not build or run: count that as a failure
fi
log "$SUITE: cargo test exited with $rc (log: $LOG)"
echo "$SUITE: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
