#!/usr/bin/env bash
# Scaling figures: WarrenMQ and RabbitMQ on this machine, in one run.
# Usage: bench/scale.sh [SECONDS] [SCENARIO...]
#   SECONDS   measured seconds of each publish/consume run (default 10)
#   SCENARIO  idle, topology, fanout, consumers (default: all four, in that order)
#
# Starts RabbitMQ (installing rabbitmq-server with apt-get if needed) on $RPORT (5672)
# if nothing listens there, then for each scenario starts a fresh release WarrenMQ on
# $WPORT (5673, empty data directory under $OUT) and runs examples/scale.rs against
# each broker in turn, passing the broker's pid so that the client can read its CPU
# time and RSS. Prints each figure line and a table with the WarrenMQ/RabbitMQ ratio.
# Nothing here is a test: it only prints figures.
#
# Sizes (environment): QUEUES (100000) queues and bindings of the topology scenario;
# RABBIT_QUEUES (20000) the same for RabbitMQ, which declares about 600 queues/s and
# deletes about 550/s here, so 100000 takes it about 7 minutes (the line says which
# count was used; compare the per-second rates, not the totals); FANOUT_QUEUES (1000);
# CONNECTIONS (10000) idle connections; CONSUMERS (10000) consumers on one queue.
# Raw lines are kept in $OUT (default /tmp/warrenmq-scale).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
shift || true
SCENARIOS=${*:-idle topology fanout consumers}
WPORT=${WPORT:-5673}
RPORT=${RPORT:-5672}
QUEUES=${QUEUES:-100000}
RABBIT_QUEUES=${RABBIT_QUEUES:-20000}
FANOUT_QUEUES=${FANOUT_QUEUES:-1000}
CONNECTIONS=${CONNECTIONS:-10000}
CONSUMERS=${CONSUMERS:-10000}
OUT=${OUT:-/tmp/warrenmq-scale}
mkdir -p "$OUT"

# One file descriptor per connection on each side: raise the limit before starting
# either broker (children inherit it), as far as the hard limit allows.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
echo "open files limit: $(ulimit -n)"

wait_port() { for _ in $(seq 1 300); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }
listener_pid() { ss -Hltnp "sport = :$1" | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2; }

if ! command -v rabbitmq-server >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
fi
if ! (exec 3<>"/dev/tcp/127.0.0.1/$RPORT") 2>/dev/null; then
  echo "starting RabbitMQ"
  if [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] && [ "$(id -u)" = 0 ] && id rabbitmq >/dev/null 2>&1; then
    # Debian's wrapper runs it through su, which resets the soft fd limit to 1024.
    (su rabbitmq -s /bin/sh -c "ulimit -n $(ulimit -n); exec /usr/lib/rabbitmq/bin/rabbitmq-server" \
      >"$OUT/rabbitmq.log" 2>&1 &)
  else
    (rabbitmq-server >"$OUT/rabbitmq.log" 2>&1 &)
  fi
  wait_port $RPORT
  sleep 3
fi
RPID=$(listener_pid $RPORT)
[ -n "$RPID" ] || RPID=$(pgrep -x beam.smp | head -1)
RFD=$(awk '/Max open files/ {print $4}' "/proc/$RPID/limits")
RCONNECTIONS=$CONNECTIONS
if [ "$RFD" -lt $((CONNECTIONS + 1000)) ]; then
  RCONNECTIONS=$((RFD - 1000))
  echo "note: RabbitMQ (pid $RPID) may open $RFD files; its idle run uses $RCONNECTIONS connections, not $CONNECTIONS"
fi

cargo build --release --quiet --bin warrenmq --example scale
TARGET=${CARGO_TARGET_DIR:-target}
# Copies, so that a rebuild during the run does not change them.
cp "$TARGET/release/warrenmq" "$OUT/warrenmq"
cp "$TARGET/release/examples/scale" "$OUT/scale"
WPID=
stop_warren() { if [ -n "$WPID" ]; then kill "$WPID" 2>/dev/null || true; wait "$WPID" 2>/dev/null || true; WPID=; fi; }
start_warren() {
  stop_warren
  rm -rf "$OUT/warren-data"
  "$OUT/warrenmq" --listen 127.0.0.1:$WPORT --log-level warn --data-dir "$OUT/warren-data" \
    2>>"$OUT/warrenmq.log" &
  WPID=$!
  wait_port $WPORT
}
trap stop_warren EXIT

lines="$OUT/lines.txt"
: >"$lines"
for s in $SCENARIOS; do
  case $s in
    topology) wargs="--queues $QUEUES"; rargs="--queues $RABBIT_QUEUES"
      [ "$RABBIT_QUEUES" = "$QUEUES" ] || echo "note: RabbitMQ's topology uses $RABBIT_QUEUES queues (RABBIT_QUEUES), WarrenMQ's $QUEUES" ;;
    fanout) wargs="--queues $FANOUT_QUEUES"; rargs=$wargs ;;
    idle) wargs="--connections $CONNECTIONS"; rargs="--connections $RCONNECTIONS" ;;
    consumers) wargs="--consumers $CONSUMERS"; rargs=$wargs ;;
    *) echo "unknown scenario $s"; exit 2 ;;
  esac
  for b in warrenmq rabbitmq; do
    if [ $b = warrenmq ]; then start_warren; port=$WPORT; pid=$WPID; args=$wargs
    else port=$RPORT; pid=$RPID; args=$rargs; fi
    echo "== $s $b: scale $s --port $port --seconds $SECS $args --broker-pid $pid" >&2
    line=$("$OUT/scale" "$s" --port "$port" --seconds "$SECS" $args --broker-pid "$pid")
    echo "$b $line" | tee -a "$lines"
  done
  stop_warren
done

python3 - "$lines" <<'PY'
import sys
rows = {}
for line in open(sys.argv[1]):
    parts = line.split()
    broker, kv = parts[0], dict(p.split("=", 1) for p in parts[1:])
    rows.setdefault(kv["scenario"], {})[broker] = kv
print()
print("| scenario | figure | WarrenMQ | RabbitMQ | WarrenMQ / RabbitMQ |")
print("|---|---|---|---|---|")
for name, d in rows.items():
    w, r = d.get("warrenmq", {}), d.get("rabbitmq", {})
    for k, v in w.items():
        if k == "scenario":
            continue
        rv = r.get(k, "")
        try:
            ratio = f"{float(v) / float(rv):.2f}" if rv and float(rv) else "-"
        except ValueError:
            ratio = "-"
        print(f"| {name} | {k} | {v} | {rv} | {ratio} |")
PY
