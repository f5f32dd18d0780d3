#!/usr/bin/env bash
# Celery Flower's broker tab against the broker at HOST:PORT and its management
# API: Flower (PyPI, pinned with the celery it runs on) is started with
# --broker=amqp://guest:guest@HOST:PORT// and --broker_api pointing at the
# management API, queues with known depths are filled over AMQP, and the depths
# Flower shows (its /broker page and its /api/queues/length JSON) must be exactly
# those, before and after the depths change (get/ack, purge, a consumer with
# prefetch 1, deletion). Flower reads them with GET /api/queues/ (all vhosts,
# trailing slash) for the default vhost, GET /api/queues/<vhost> otherwise.
# Usage: interop/flower.sh [HOST [PORT]]; the API's port comes from
# INTEROP_MANAGEMENT_PORT (default 15672). INTEROP_FLOWER_WAIT (default 15) is
# how many seconds a check waits for Flower to show the expected numbers
# (RabbitMQ's management API refreshes its queue statistics every 5 s); after
# one check has timed out, the later ones wait at most 6 s.
# Last line: "flower: N passed, M failed".
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
SUITE=flower
parse_host_port "$SUITE" "$@"
MPORT="${INTEROP_MANAGEMENT_PORT:-15672}"
case "$MPORT" in (''|*[!0-9]*) die "INTEROP_MANAGEMENT_PORT must be a number, got '$MPORT'";; esac

FLOWER_VERSION=2.2.0
CELERY_VERSION=5.7.0

setup_venv "$SUITE"
# flower and celery pinned, and everything they pull in pinned to what pip
# resolved for these two (pip freeze of a fresh venv), so a re-run installs the
# same set. amqp/kombu/vine are the versions kombu.sh and py-amqp.sh test.
install_requirements "$SUITE" \
    flower=="$FLOWER_VERSION" celery=="$CELERY_VERSION" \
    kombu==5.7.0 amqp==5.4.2 vine==5.1.0 billiard==4.3.2 \
    click==8.5.1 click-didyoumean==0.3.1 click-plugins==1.1.1.2 click-repl==0.4.1 \
    prompt_toolkit==3.0.53 wcwidth==0.9.4 python-dateutil==2.9.0.post0 six==1.17.0 \
    tzlocal==5.4.5 tornado==6.6.1 humanize==4.17.0 prometheus_client==0.26.0 \
    pytz==2026.6 typing_extensions==4.16.0

check_broker "$SUITE"

WORK="$(mktemp -d)"
QPREFIX="interop-flower-$$"
FLOWER_PID="" SCENARIO_PID=""
FLOWER_LOG="$INTEROP_CACHE/results/flower-server.log"
mkdir -p "$INTEROP_CACHE/results"
stop_flower() {
    if [ -n "$FLOWER_PID" ] && kill -0 "$FLOWER_PID" 2>/dev/null; then
        kill "$FLOWER_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$FLOWER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$FLOWER_PID" 2>/dev/null || true
    fi
    if [ -n "$FLOWER_PID" ]; then wait "$FLOWER_PID" 2>/dev/null || true; fi
    FLOWER_PID=""
}
stop_scenario() {
    if [ -n "$SCENARIO_PID" ] && kill -0 "$SCENARIO_PID" 2>/dev/null; then
        kill "$SCENARIO_PID" 2>/dev/null || true
    fi
    SCENARIO_PID=""
}
# Leave the broker as found: the suite's queues (normally deleted by the
# scenario itself) and the control and event exchanges Flower declared, which
# are unused once Flower is gone (if-unused: a real Celery user's stay).
CLEANED=0
cleanup_broker() {
    CLEANED=1
    "$PY" - "$HOST" "$PORT" "$QPREFIX" <<'PYEOF' || log "warning: broker cleanup failed (continuing)"
import sys
import amqp

host, port, prefix = sys.argv[1:4]
with amqp.Connection(host=f"{host}:{port}", connect_timeout=10) as conn:
    for name in (f"{prefix}-a", f"{prefix}-b", f"{prefix}-c"):
        conn.channel().queue_delete(name)
    for name in ("celeryev", "celery.pidbox", "reply.celery.pidbox"):
        try:
            conn.channel().exchange_delete(name, if_unused=True)
        except amqp.exceptions.AMQPError:
            pass
PYEOF
}
trap 'stop_scenario; stop_flower; [ "$CLEANED" = 1 ] || cleanup_broker >/dev/null 2>&1; rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM

FPORT="${INTEROP_FLOWER_PORT:-$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"

# The Celery app Flower monitors. With no worker online, Flower's broker tab
# lists task_default_queue and task_queues, so the suite's queues go there.
cat >"$WORK/flower_interop_app.py" <<'PYEOF'
import os

from celery import Celery
from kombu import Queue

names = os.environ["FLOWER_INTEROP_QUEUES"].split()
app = Celery("flower_interop")
app.conf.task_default_queue = names[0]
app.conf.task_queues = [Queue(name) for name in names]
PYEOF

# The scenario. It prints "ok   <check>" or "FAIL <check>" (+ indented detail)
# per check and "done" at the very end; the loop below counts those lines.
cat >"$WORK/scenario.py" <<'PYEOF'
import base64
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser

import amqp

host, port, mport, fport, prefix = sys.argv[1:6]
WAIT = float(os.environ.get("INTEROP_FLOWER_WAIT", "15"))
# Once a check has timed out the broker or Flower is evidently not keeping up,
# so later checks wait at most 6 s (still more than one RabbitMQ refresh).
wait = {"s": WAIT}
FLOWER = f"http://127.0.0.1:{fport}"
QA, QB, QC = f"{prefix}-a", f"{prefix}-b", f"{prefix}-c"


def say(line):
    print(line, flush=True)


def ok(name):
    say(f"ok   {name}")


def fail(name, detail=""):
    say(f"FAIL {name}")
    for line in str(detail).splitlines():
        say(f"    {line}")


def http_get(url, auth=None):
    req = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(auth.encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, resp.read().decode()


class BrokerPage(HTMLParser):
    """The rows of Flower's queue table (table#queue-table tbody) and the
    broker URL line (p.broker-url)."""

    def __init__(self):
        super().__init__()
        self.rows, self.row, self.cell = [], None, None
        self.in_table = self.in_tbody = self.in_url = False
        self.broker_url = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and attrs.get("id") == "queue-table":
            self.in_table = True
        elif tag == "tbody" and self.in_table:
            self.in_tbody = True
        elif tag == "tr" and self.in_tbody:
            self.row = []
        elif tag == "td" and self.row is not None:
            self.cell = []
        elif tag == "p" and "broker-url" in (attrs.get("class") or "").split():
            self.in_url, self.broker_url = True, ""

    def handle_endtag(self, tag):
        if tag == "td" and self.cell is not None:
            self.row.append("".join(self.cell).strip())
            self.cell = None
        elif tag == "tr" and self.row is not None:
            self.rows.append(self.row)
            self.row = None
        elif tag == "tbody":
            self.in_tbody = False
        elif tag == "table":
            self.in_table = False
        elif tag == "p":
            self.in_url = False

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)
        if self.in_url:
            self.broker_url += data


COLUMNS = ("messages", "unacked", "ready", "consumers")


def broker_page():
    """Flower's /broker page: ({queue: {column: text}}, broker URL)."""
    status, body = http_get(FLOWER + "/broker")
    if status != 200:
        raise RuntimeError(f"GET /broker: HTTP {status}")
    page = BrokerPage()
    page.feed(body)
    queues = {}
    for row in page.rows:
        if len(row) >= 5:  # Queue, Messages, Unacked, Ready, Consumers, Idle since
            queues[row[0]] = dict(zip(COLUMNS, row[1:5]))
    return queues, (page.broker_url or "").strip()


def queue_lengths():
    """Flower's GET /api/queues/length: {queue: messages}."""
    status, body = http_get(FLOWER + "/api/queues/length")
    if status != 200:
        raise RuntimeError(f"GET /api/queues/length: HTTP {status}")
    return {q["name"]: q.get("messages") for q in json.loads(body)["active_queues"]}


def eventually(name, fetch, want):
    """Pass when fetch() == want within WAIT seconds; else fail showing the
    last value seen."""
    deadline = time.monotonic() + wait["s"]
    while True:
        try:
            got = fetch()
        except Exception as exc:  # noqa: BLE001 - shown in the failure
            got = f"error: {exc!r}"
        if got == want:
            ok(name)
            return True
        if time.monotonic() >= deadline:
            fail(name, f"want {want!r}\ngot  {got!r}")
            wait["s"] = min(WAIT, 6.0)
            return False
        time.sleep(0.5)


def row(messages, unacked, ready, consumers):
    return dict(zip(COLUMNS, map(str, (messages, unacked, ready, consumers))))


def check_depths(label, want_rows):
    """One page check and one JSON check per queue."""
    for queue, want in want_rows.items():
        eventually(f"{label}: /broker shows {queue} with messages={want['messages']} "
                   f"unacked={want['unacked']} ready={want['ready']} consumers={want['consumers']}",
                   lambda q=queue: broker_page()[0].get(q), want)
    for queue, want in want_rows.items():
        eventually(f"{label}: /api/queues/length gives {queue} {want['messages']} messages",
                   lambda q=queue: queue_lengths().get(q), int(want["messages"]))


def publish(ch, queue, count, tag):
    for i in range(count):
        ch.basic_publish(amqp.Message(f"{tag}-{i}", delivery_mode=1),
                         exchange="", routing_key=queue)


def main():
    # Flower is up when its /healthcheck answers OK.
    deadline = time.monotonic() + 60
    while True:
        try:
            if http_get(FLOWER + "/healthcheck") == (200, "OK"):
                ok(f"Flower answers on 127.0.0.1:{fport}")
                break
        except (OSError, urllib.error.URLError):
            pass
        if time.monotonic() >= deadline:
            fail(f"Flower answers on 127.0.0.1:{fport}", "no OK from /healthcheck within 60 s")
            return
        time.sleep(0.5)

    conn = amqp.Connection(host=f"{host}:{port}", userid="guest", password="guest",
                           virtual_host="/", connect_timeout=10, confirm_publish=True)
    conn.connect()
    try:
        ch = conn.channel()
        for queue in (QA, QB, QC):
            ch.queue_declare(queue, durable=False, auto_delete=False)
        publish(ch, QA, 3, "a")
        publish(ch, QB, 7, "b")
        counts = [ch.queue_declare(q, passive=True).message_count for q in (QA, QB, QC)]
        if counts == [3, 7, 0]:
            ok(f"3, 7 and 0 messages published to {QA}, {QB}, {QC} over AMQP")
        else:
            fail("3, 7 and 0 messages published over AMQP", f"queue.declare-ok counts {counts}")

        check_depths("filled", {QA: row(3, 0, 3, 0), QB: row(7, 0, 7, 0), QC: row(0, 0, 0, 0)})

        want_url = f"amqp://guest:**@{host}:{port}//"
        eventually(f"/broker shows the broker URL {want_url}", lambda: broker_page()[1], want_url)

        # Flower's own AMQP side: its event receiver consumes from a
        # celeryev.<uuid> queue, which the management API lists.
        def celeryev_consumers():
            _, body = http_get(f"http://{host}:{mport}/api/queues/%2F", auth="guest:guest")
            return sorted(q.get("consumers") for q in json.loads(body)
                          if q["name"].startswith("celeryev."))
        eventually("Flower's event receiver consumes from a celeryev.* queue",
                   celeryev_consumers, [1])

        # Two messages of QA fetched and not yet acked: still 3, 2 of them unacked.
        got = [ch.basic_get(QA, no_ack=False) for _ in range(2)]
        if all(m is not None for m in got):
            ok(f"basic.get took 2 messages from {QA}")
        else:
            fail(f"basic.get took 2 messages from {QA}", f"got {got}")
        check_depths("2 unacked", {QA: row(3, 2, 1, 0)})

        for m in got:
            if m is not None:
                ch.basic_ack(m.delivery_tag)
        check_depths("acked", {QA: row(1, 0, 1, 0)})

        purged = ch.queue_purge(QB)
        if purged == 7:
            ok(f"queue.purge of {QB} removed 7")
        else:
            fail(f"queue.purge of {QB} removed 7", f"purge-ok message_count {purged}")
        check_depths("purged", {QA: row(1, 0, 1, 0), QB: row(0, 0, 0, 0)})

        # A consumer with prefetch 1 on QC holds one of its 4 messages.
        publish(ch, QC, 4, "c")
        delivered = []
        cch = conn.channel()
        cch.basic_qos(0, 1, False)
        cch.basic_consume(QC, callback=delivered.append, no_ack=False)
        check_depths("consumed", {QC: row(4, 1, 3, 1)})
        try:
            while True:
                conn.drain_events(timeout=1)
        except socket.timeout:
            pass
        if [m.body for m in delivered] == ["c-0"]:
            ok(f"the consumer on {QC} got exactly 1 message (prefetch 1)")
        else:
            fail(f"the consumer on {QC} got exactly 1 message (prefetch 1)",
                 f"got {[m.body for m in delivered]}")

        cch.close()  # the unacked delivery goes back to the queue
        check_depths("consumer gone", {QC: row(4, 0, 4, 0)})

        # Deleted queues drop out of the table; the one left still shows.
        for queue in (QA, QB):
            ch.queue_delete(queue)
        eventually(f"after deleting {QA} and {QB}, /broker lists only {QC} (4 messages)",
                   lambda: {q: r for q, r in broker_page()[0].items() if q in (QA, QB, QC)},
                   {QC: row(4, 0, 4, 0)})
    finally:
        try:
            ch = conn.channel()
            for queue in (QA, QB, QC):
                ch.queue_delete(queue)
        except Exception:  # noqa: BLE001 - best effort
            pass
        conn.close()


try:
    main()
except Exception as exc:  # noqa: BLE001 - counted as a failure
    fail("scenario", f"aborted: {exc!r}")
say("done")
PYEOF

log "starting Flower $FLOWER_VERSION (celery $CELERY_VERSION) on 127.0.0.1:$FPORT;" \
    "broker amqp://guest:**@$HOST:$PORT//, broker_api http://$HOST:$MPORT/api/"
(cd "$WORK" && exec env FLOWER_UNAUTHENTICATED_API=true FLOWER_INTEROP_QUEUES="$QPREFIX-a $QPREFIX-b $QPREFIX-c" \
    "$VENV/bin/celery" -A flower_interop_app --broker="amqp://guest:guest@$HOST:$PORT//" \
    flower --port="$FPORT" --address=127.0.0.1 \
    --broker_api="http://guest:guest@$HOST:$MPORT/api/") >"$FLOWER_LOG" 2>&1 </dev/null &
FLOWER_PID=$!

passed=0 failed=0 finished=0
exec 3< <(cd "$WORK" && exec "$PY" scenario.py "$HOST" "$PORT" "$MPORT" "$FPORT" "$QPREFIX" 2>&1 </dev/null)
SCENARIO_PID=$!
while IFS= read -r -u 3 line; do
    case "$line" in
        "ok   "*) passed=$((passed + 1)); log "$line" ;;
        "FAIL "*) failed=$((failed + 1)); log "$line" ;;
        done) finished=1 ;;
        *) log "$line" ;;
    esac
done
exec 3<&-
SCENARIO_PID=""

if [ "$finished" -ne 1 ]; then
    failed=$((failed + 1)); log "FAIL the scenario did not run to its end"
fi
stop_flower
cleanup_broker
if [ "$failed" -ne 0 ]; then
    log "last lines of Flower's log ($FLOWER_LOG):"
    tail -n 20 "$FLOWER_LOG" 2>/dev/null | sed 's/^/    /'
fi
echo "$SUITE: $passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
