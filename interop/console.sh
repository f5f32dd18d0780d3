#!/usr/bin/env bash
# The web console the management listener serves at /, in a real headless
# Chromium driven by Selenium: log in, read the overview, publish, get, purge and
# delete through the console, and close an AMQP client's connection (pika), each
# figure checked against the management API (interop/console/test_console.py).
# Chromium and ChromeDriver are Debian's packages, installed with apt-get when
# missing; selenium and pika come from PyPI, pinned, into interop/.venv/console.
# Usage: interop/console.sh [HOST [PORT]]; the API's port comes from
# INTEROP_MANAGEMENT_PORT (default 15672). Last line: "console: N passed, M failed".
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
SUITE=console
parse_host_port "$SUITE" "$@"
MPORT="${INTEROP_MANAGEMENT_PORT:-15672}"
# selenium and pika, and what they pull in, each pinned so that a release on PyPI
# cannot change the run (selenium 4.52.0 wants a certifi newer than PyPI had here).
REQUIREMENTS=(
    selenium==4.51.0 pika==1.4.4
    attrs==26.1.0 certifi==2026.10.19.post1 h11==0.16.0 idna==3.20 outcome==1.3.0.post0
    PySocks==1.7.1 sniffio==1.3.1 sortedcontainers==2.4.0 trio==0.35.0 trio-websocket==0.12.2
    typing_extensions==4.16.0 urllib3==2.8.0 websocket-client==1.9.2 wsproto==1.3.2
)

fail() { log "$SUITE: $*"; echo "$SUITE: 0 passed, 1 failed"; exit 1; }

check_broker "$SUITE"
if ! timeout 5 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$HOST" "$MPORT" 2>/dev/null; then
    log "no management API reachable at $HOST:$MPORT (set INTEROP_MANAGEMENT_PORT)"
    echo "$SUITE: 0 passed, 0 failed"
    exit 2
fi

# Debian's own builds, whose versions match each other: Selenium's habit of
# downloading a browser or driver at run time is of no use offline or on CI.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    command -v apt-get >/dev/null 2>&1 || fail "chromium and chromium-driver are needed (no apt-get to install them)"
    [ "$(id -u)" = 0 ] || fail "chromium and chromium-driver are needed; run as root or install them"
    log "installing chromium and chromium-driver with apt-get"
    mkdir -p "$INTEROP_CACHE/results"
    aptlog="$INTEROP_CACHE/results/$SUITE-apt.log"
    if ! { apt-get update -qq && apt-get install -y -qq chromium chromium-driver; } </dev/null >"$aptlog" 2>&1; then
        tail -n 20 "$aptlog"
        fail "apt-get install chromium chromium-driver failed (full log: $aptlog)"
    fi
fi
log "$(/usr/bin/chromium --version 2>/dev/null || echo 'chromium: no version')"

setup_venv "$SUITE"
install_requirements "$SUITE" "${REQUIREMENTS[@]}"

counts="$INTEROP_CACHE/results/$SUITE.counts"
mkdir -p "$INTEROP_CACHE/results"
rm -f "$counts"
log "running the console scenario against http://$HOST:$MPORT/ (AMQP $HOST:$PORT)"
start=$SECONDS rc=0
# Selenium must not look for drivers of its own; the paths are given explicitly.
SE_OFFLINE=true timeout -k 10 "$INTEROP_SUITE_TIMEOUT" \
    "$PY" "$INTEROP_DIR/console/test_console.py" "$HOST" "$PORT" "$MPORT" "$counts" </dev/null || rc=$?
log "$SUITE: the scenario exited with $rc after $((SECONDS - start))s"

if read -r passed failed <"$counts" 2>/dev/null \
    && [[ "$passed" =~ ^[0-9]+$ && "$failed" =~ ^[0-9]+$ ]]; then
    :
else
    # Killed by the timeout or crashed before counting: that is a failure too.
    passed=0 failed=1
fi
if [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then failed=1; fi
echo "$SUITE: $passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
