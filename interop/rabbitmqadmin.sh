#!/usr/bin/env bash
# rabbitmqadmin, the management API's command-line client that RabbitMQ ships in
# Debian's rabbitmq-server package, against the broker's management API: list,
# declare, bind, publish, get, purge and delete, as an operator types them. The
# script is taken from the package (apt-get download + dpkg-deb -x, so neither
# Erlang nor RabbitMQ is installed) and run with the system's python3.
# Usage: interop/rabbitmqadmin.sh [HOST [PORT]]; the API's port comes from
# INTEROP_MANAGEMENT_PORT (default 15672). Last line: "rabbitmqadmin: N passed, M failed".
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
SUITE=rabbitmqadmin
parse_host_port "$SUITE" "$@"
MPORT="${INTEROP_MANAGEMENT_PORT:-15672}"
CACHE="$INTEROP_CACHE/rabbitmqadmin"
mkdir -p "$CACHE"

fail() { log "$SUITE: $*"; echo "$SUITE: 0 passed, 1 failed"; exit 1; }

ADMIN="$CACHE/root/usr/bin/rabbitmqadmin"
if [ ! -f "$ADMIN" ]; then
    if [ -x /usr/bin/rabbitmqadmin ] && [ -z "${CI:-}" ]; then
        ADMIN=/usr/bin/rabbitmqadmin
    else
        command -v apt-get >/dev/null 2>&1 || fail "apt-get is needed to fetch rabbitmq-server's package"
        if ! (cd "$CACHE" && apt-get download rabbitmq-server >/dev/null 2>&1); then
            apt-get update -qq </dev/null >/dev/null 2>&1 || true
            (cd "$CACHE" && apt-get download rabbitmq-server >/dev/null) || fail "apt-get download rabbitmq-server failed"
        fi
        deb=$(ls "$CACHE"/rabbitmq-server_*.deb | head -n 1)
        dpkg-deb -x "$deb" "$CACHE/root" || fail "cannot unpack $deb"
        [ -f "$ADMIN" ] || fail "no rabbitmqadmin in $deb"
        log "rabbitmqadmin from $(basename "$deb")"
    fi
fi
command -v python3 >/dev/null 2>&1 || ensure_python

admin() { python3 "$ADMIN" -H "$HOST" -P "$MPORT" -u guest -p guest "$@" 2>&1; }

passed=0 failed=0
# check NAME EXPECTED-REGEX COMMAND...: the command succeeds and prints a match.
check() {
    local name=$1 want=$2; shift 2
    local out rc
    out=$(admin "$@") && rc=0 || rc=$?
    if [ $rc -eq 0 ] && grep -Eq -- "$want" <<<"$out"; then
        passed=$((passed + 1)); log "ok   $name"
    else
        failed=$((failed + 1)); log "FAIL $name (exit $rc)"; sed 's/^/    /' <<<"$out"
    fi
}
# check_soon NAME EXPECTED-REGEX COMMAND...: as check, for figures a broker may
# refresh only every few seconds (RabbitMQ's statistics, every 5 s): retried for 12 s.
check_soon() {
    local name=$1 want=$2; shift 2
    local out rc tries=0
    while :; do
        out=$(admin "$@") && rc=0 || rc=$?
        if [ $rc -eq 0 ] && grep -Eq -- "$want" <<<"$out"; then
            passed=$((passed + 1)); log "ok   $name"; return
        fi
        tries=$((tries + 1))
        [ $tries -lt 12 ] || break
        sleep 1
    done
    failed=$((failed + 1)); log "FAIL $name (exit $rc)"; sed 's/^/    /' <<<"$out"
}
# refused NAME EXPECTED-REGEX COMMAND...: the command fails with a matching message.
refused() {
    local name=$1 want=$2; shift 2
    local out rc
    out=$(admin "$@") && rc=0 || rc=$?
    if [ $rc -ne 0 ] && grep -Eq -- "$want" <<<"$out"; then
        passed=$((passed + 1)); log "ok   $name"
    else
        failed=$((failed + 1)); log "FAIL $name (exit $rc)"; sed 's/^/    /' <<<"$out"
    fi
}

Q="interop-admin-q-$$" X="interop-admin-x-$$"
check "show overview" "rabbitmq_version" show overview
check "list vhosts" "^\| / " list vhosts name
check "list users" "guest" list users name tags
check "declare exchange" "exchange declared" declare exchange name="$X" type=topic durable=true
check "declare queue" "queue declared" declare queue name="$Q" durable=true arguments='{"x-max-length": 100}'
check "declare binding" "binding declared" declare binding source="$X" destination="$Q" routing_key="a.#"
check "list exchanges shows it" "$X +\| topic" list exchanges name type
check "list bindings shows it" "$X +\| $Q +\| a\.#" list bindings source destination routing_key
check "publish" "Message published" publish exchange="$X" routing_key=a.b payload=hello-admin
check_soon "list queues counts it" "$Q +\| 1 " list queues name messages
check "get (requeue)" "hello-admin" get queue="$Q" ackmode=ack_requeue_true
check "get again (redelivered, acked)" "hello-admin.*True" get queue="$Q" ackmode=ack_requeue_false
check_soon "the queue is empty" "$Q +\| 0 " list queues name messages
check "publish again" "Message published" publish exchange="$X" routing_key=a.c payload=second
check "purge" "queue purged" purge queue name="$Q"
check_soon "the purge emptied it" "$Q +\| 0 " list queues name messages
refused "a bad argument is refused" "x-overflow" declare queue name="$Q-bad" arguments='{"x-overflow": "bogus"}'
refused "an inequivalent redeclare is refused" "inequivalent arg 'type'" declare exchange name="$X" type=fanout
check "delete binding" "binding deleted" delete binding source="$X" destination_type=queue destination="$Q" properties_key="a.%23"
check "delete queue" "queue deleted" delete queue name="$Q"
check "delete exchange" "exchange deleted" delete exchange name="$X"
V="interop-admin-vhost-$$"
check "declare vhost" "vhost declared" declare vhost name="$V"
check "list vhosts shows it" "$V" list vhosts name
check "delete vhost" "vhost deleted" delete vhost name="$V"
U="interop-admin-user-$$"
check "declare user" "user declared" declare user name="$U" password=pw tags=monitoring
check "declare permission" "permission declared" declare permission vhost=/ user="$U" configure='.*' write='.*' read='.*'
check "list users shows it" "$U +\| monitoring" list users name tags
check "list permissions shows it" "$U" list permissions
check "declare policy" "policy declared" declare policy name="$U-ttl" pattern='^interop-ttl' definition='{"message-ttl": 60000}' apply-to=queues
check "list policies shows it" "$U-ttl" list policies
refused "a policy with an unknown key is refused" "unknown key|not recognised policy settings" declare policy name="$U-bad" pattern='.*' definition='{"colour": "blue"}'
check "delete policy" "policy deleted" delete policy name="$U-ttl"
check "delete permission" "permission deleted" delete permission vhost=/ user="$U"
check "delete user" "user deleted" delete user name="$U"
check "export definitions" "Exported definitions" export "$CACHE/exported.json"
check "import a RabbitMQ 3.10 export" "Uploaded definitions" import "$INTEROP_DIR/../config/examples/rabbitmq-3.10-definitions.json"
check "its vhost is there" "staging" list vhosts name
check "its queues are there" "orders.new" list queues name
check "list connections" "" list connections
check "list channels" "" list channels
check "list consumers" "" list consumers
check "list nodes" "\| [^ |]+@[^ |]+ +\|" list nodes name

echo "$SUITE: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
