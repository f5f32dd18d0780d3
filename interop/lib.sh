# Shared helpers for the third-party client interop suites.
# Sourced by interop/<suite>.sh; not meant to be run directly.
#
# Everything downloaded or built lives in git-ignored directories:
#   interop/.cache/sdist/    the pinned sdist tarballs from PyPI (sha256-checked)
#   interop/.cache/src/      the unpacked sdists (the suites run from here)
#   interop/.cache/results/  pytest junit XML and setup logs
#   interop/.venv/<suite>/   one Python venv per suite
#
# Environment knobs (all optional):
#   INTEROP_TEST_TIMEOUT   per-test timeout in seconds (pytest-timeout), default 60
#   INTEROP_SUITE_TIMEOUT  wall-clock limit for one whole pytest run, default 1800
#   INTEROP_PYTEST_ARGS    extra pytest arguments, e.g. "-x" or "-k publish"
#   INTEROP_PYTHON         interpreter used to create the venvs, default python3

set -euo pipefail

# Keep stdout and stderr in one ordered stream so that the summary printed by
# run_suite really is the last line of output.
exec 2>&1

INTEROP_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
INTEROP_CACHE="$INTEROP_DIR/.cache"
INTEROP_VENVS="$INTEROP_DIR/.venv"
INTEROP_TEST_TIMEOUT="${INTEROP_TEST_TIMEOUT:-60}"
INTEROP_SUITE_TIMEOUT="${INTEROP_SUITE_TIMEOUT:-1800}"
INTEROP_PYTHON="${INTEROP_PYTHON:-python3}"

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_NO_WARN_SCRIPT_LOCATION=1
export DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1
# Never let a user-site or a parent virtualenv leak into the suites.
export PYTHONNOUSERSITE=1
unset PYTHONPATH VIRTUAL_ENV PIP_REQUIRE_VIRTUALENV 2>/dev/null || true

log() { echo "[interop] $*"; }
die() { echo "[interop] error: $*"; exit 2; }

# parse_host_port SUITE "$@": sets HOST and PORT from the script arguments.
parse_host_port() {
    local suite=$1; shift
    if [ $# -gt 2 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
        echo "usage: interop/$suite.sh [HOST [PORT]]   (default 127.0.0.1 5672)"
        exit 2
    fi
    HOST="${1:-127.0.0.1}"
    PORT="${2:-5672}"
    case "$PORT" in (''|*[!0-9]*) die "PORT must be a number, got '$PORT'";; esac
}

# ensure_python: make sure "$INTEROP_PYTHON -m venv" works, installing
# python3/python3-venv with apt-get on a bare Debian machine.
ensure_python() {
    if command -v "$INTEROP_PYTHON" >/dev/null 2>&1 \
        && "$INTEROP_PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 \
        || die "$INTEROP_PYTHON with the venv module is required (no apt-get to install it)"
    [ "$(id -u)" = 0 ] || die "$INTEROP_PYTHON -m venv is unavailable; run as root or install python3-venv"
    log "installing python3 and python3-venv with apt-get"
    apt-get update -qq </dev/null
    apt-get install -y -qq --no-install-recommends python3 python3-venv ca-certificates </dev/null >/dev/null
    "$INTEROP_PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1 \
        || die "python3 -m venv still unusable after apt-get install"
}

# setup_venv SUITE: create (or reuse) interop/.venv/SUITE; sets VENV and PY.
setup_venv() {
    local suite=$1
    VENV="$INTEROP_VENVS/$suite"
    PY="$VENV/bin/python"
    if [ -x "$PY" ] && "$PY" -c 'import sys' >/dev/null 2>&1; then
        return 0
    fi
    ensure_python
    log "creating venv $VENV"
    rm -rf "$VENV"
    mkdir -p "$INTEROP_VENVS"
    "$INTEROP_PYTHON" -m venv "$VENV"
}

# fetch_sdist NAME VERSION SHA256: download NAME==VERSION's source distribution
# from PyPI (never a wheel), check its sha256 and unpack it under .cache/src.
# Sets SDIST (the tarball) and SRC_DIR (the unpacked tree). Reuses the cache.
fetch_sdist() {
    local name=$1 version=$2 sha=$3
    local dl="$INTEROP_CACHE/sdist" srcroot="$INTEROP_CACHE/src"
    SDIST="$dl/$name-$version.tar.gz"
    SRC_DIR="$srcroot/$name-$version"
    if [ -f "$SRC_DIR/.interop-unpacked" ] && [ "$(cat "$SRC_DIR/.interop-unpacked")" = "$sha" ] \
        && [ -f "$SDIST" ]; then
        return 0
    fi
    mkdir -p "$dl" "$srcroot"
    if ! echo "$sha  $SDIST" | sha256sum -c --status 2>/dev/null; then
        log "downloading $name==$version sdist from PyPI"
        rm -f "$SDIST"
        local req="$dl/$name-$version.req"
        printf '%s==%s --hash=sha256:%s\n' "$name" "$version" "$sha" >"$req"
        "$PY" -m pip download -q --no-binary :all: --no-deps --require-hashes \
            -r "$req" -d "$dl" </dev/null
    fi
    echo "$sha  $SDIST" | sha256sum -c --status \
        || die "$SDIST missing or sha256 mismatch (expected $sha)"
    rm -rf "$SRC_DIR"
    tar -xzf "$SDIST" -C "$srcroot"
    [ -d "$SRC_DIR" ] || die "unpacking $SDIST did not produce $SRC_DIR"
    echo "$sha" >"$SRC_DIR/.interop-unpacked"
}

# install_requirements SUITE SPEC...: pip install the given specs (exact pins,
# tarball paths) into the suite's venv, skipping the work when the same list
# was installed before.
install_requirements() {
    local suite=$1; shift
    local stamp="$VENV/.interop-requirements" want
    want="$(printf '%s\n' "$@")"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    mkdir -p "$INTEROP_CACHE/results"
    local logf="$INTEROP_CACHE/results/$suite-pip.log"
    log "installing test requirements into $VENV"
    if ! "$PY" -m pip install --disable-pip-version-check "$@" </dev/null >"$logf" 2>&1; then
        tail -n 40 "$logf"
        die "pip install failed (full log: $logf)"
    fi
    printf '%s\n' "$want" >"$stamp"
}

# check_broker: fail fast (exit 2) when nothing listens on HOST:PORT.
check_broker() {
    local suite=$1
    if ! timeout 5 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$HOST" "$PORT" 2>/dev/null; then
        log "no broker reachable at $HOST:$PORT"
        echo "$suite: 0 passed, 0 failed"
        exit 2
    fi
}

# run_suite SUITE PYTEST_ARGS...: run pytest from SRC_DIR with per-test
# timeout and junit XML, call after_pytest if the suite defines it, then print the skipped count and, as the very last
# line, "<suite>: N passed, M failed". Exits 0 only if nothing failed and at
# least one test passed.
run_suite() {
    local suite=$1; shift
    local results="$INTEROP_CACHE/results"
    local junit="$results/$suite.xml"
    mkdir -p "$results"
    rm -f "$junit"
    log "running $suite suite against $HOST:$PORT (per-test timeout ${INTEROP_TEST_TIMEOUT}s)"
    local start=$SECONDS rc=0
    # shellcheck disable=SC2086
    (cd "$SRC_DIR" && exec timeout -k 10 "$INTEROP_SUITE_TIMEOUT" "$PY" -m pytest \
        -p no:cacheprovider -o addopts= -o console_output_style=classic \
        --timeout="$INTEROP_TEST_TIMEOUT" -rfEs -v \
        -W ignore::pytest.PytestUnknownMarkWarning \
        --junitxml="$junit" -o junit_family=xunit2 \
        "$@" ${INTEROP_PYTEST_ARGS:-}) </dev/null || rc=$?
    log "$suite: pytest exited with $rc after $((SECONDS - start))s (junit: $junit)"
    # Optional per-suite hook (e.g. broker cleanup), run before the summary.
    if declare -F after_pytest >/dev/null; then after_pytest || true; fi
    "$PY" - "$suite" "$junit" "$rc" <<'EOF'
import sys
import xml.etree.ElementTree as ET

suite, junit, rc = sys.argv[1], sys.argv[2], int(sys.argv[3])
passed = failed = skipped = 0
failed_names = []
try:
    root = ET.parse(junit).getroot()
except (OSError, ET.ParseError) as exc:
    print(f"[interop] {suite}: no usable junit XML ({exc})")
    root = None
if root is not None:
    for case in root.iter("testcase"):
        tags = {child.tag for child in case}
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if tags & {"failure", "error"}:
            failed += 1
            failed_names.append(name)
        elif "skipped" in tags:
            skipped += 1
        else:
            passed += 1
if rc not in (0, 1) and failed == 0:
    # pytest itself failed (usage/internal error, interrupted, whole-run
    # timeout): count the run as one failure so it cannot look green.
    print(f"[interop] {suite}: pytest exit status {rc} counted as 1 failure")
    failed = 1
for name in failed_names:
    print(f"[interop] {suite}: FAILED {name}")
print(f"{suite}: {skipped} skipped (not counted)")
print(f"{suite}: {passed} passed, {failed} failed")
sys.exit(0 if failed == 0 and passed > 0 else 1)
EOF
}
