#!/usr/bin/env bash
# kombu's own integration tests for its py-amqp transport
# (t/integration/test_py_amqp.py + the shared t/integration/common.py, from the
# kombu sdist on PyPI) against the AMQP 0-9-1 broker at HOST:PORT
# (guest/guest, vhost "/"). The redis/mongodb/kafka/sqs/pgmq tests in the same
# directory need other servers and are not run.
# Usage: interop/kombu.sh [HOST [PORT]]   (default 127.0.0.1 5672)
# Last line of output: "kombu: N passed, M failed".
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
SUITE=kombu
parse_host_port "$SUITE" "$@"

KOMBU_VERSION=5.7.0
KOMBU_SHA256=31e62fdfd2381caa3422f8e02b84a491d9a2180ddda74507b57f4cb1e1c2c2c9

setup_venv "$SUITE"
fetch_sdist kombu "$KOMBU_VERSION" "$KOMBU_SHA256"
# kombu is installed from the very sdist the tests come from; amqp/vine are
# pinned to what kombu 5.7.0 requires (requirements/default.txt), pytest to
# kombu's requirements/test.txt. pytest-rerunfailures is deliberately NOT
# installed (see py-amqp.sh): the @flaky(reruns=5) markers stay inert.
install_requirements "$SUITE" \
    "$SDIST" amqp==5.4.2 vine==5.1.0 \
    pytest==9.1.1 pytest-timeout==2.4.0 \
    iniconfig==2.1.0 packaging==25.0 pluggy==1.6.0 Pygments==2.19.2

check_broker "$SUITE"

# test_py_amqp.py reads RABBITMQ_HOST and RABBITMQ_5672_TCP (port). Its
# "invalid"/failover fixtures also use pyamqp://localhost:12345, which must
# stay closed on this machine.
export RABBITMQ_HOST="$HOST" RABBITMQ_5672_TCP="$PORT"

# The suite assumes a fresh broker (upstream runs it against a new RabbitMQ
# container): it declares durable, fixed-name queues and leaves some of them
# non-empty, e.g. priority_requeue_test keeps its 4 requeued messages, which
# makes test_PyAMQPPriority::test_publish_requeue_consume fail on the next run.
# So delete those queues/exchanges before (and, to leave the broker as found,
# after) the run. Plain AMQP queue.delete / exchange.delete, guest/guest, "/".
cleanup_broker() {
    "$PY" - "$HOST" "$PORT" <<'PYEOF' || log "warning: broker cleanup failed (continuing)"
import sys
import amqp

QUEUES = """test test_empty simple_queue_test simple_buffer_test direct1
rk_direct1 rk_direct2 fanout1 fanout2 topic1 topic2 topic3 ttl_test
ttl_simple_queue_test ttl_simple_buffer_test priority_test
priority_requeue_test priority_simple_queue_test priority_simple_buffer_test
test_ack test_reject_no_requeue test_reject_requeue test_requeue""".split()
EXCHANGES = """test_direct test_rk_direct test_fanout test_topic
test_empty_exchange simple_queue_test simple_buffer_test test_ack
test_reject_no_requeue test_reject_requeue test_requeue ttl_simple_queue_test
ttl_simple_buffer_test priority_simple_queue_test
priority_simple_buffer_test""".split()

host, port = sys.argv[1], sys.argv[2]
with amqp.Connection(host=f"{host}:{port}", connect_timeout=10) as conn:
    ch = conn.channel()
    for kind, names in (("queue", QUEUES), ("exchange", EXCHANGES)):
        for name in names:
            try:
                getattr(ch, f"{kind}_delete")(name)
            except amqp.exceptions.NotFound:
                ch = conn.channel()  # strict 0-9-1 brokers close the channel
PYEOF
}

cleanup_broker
# t/integration/__init__.py puts the cwd (the sdist root) on sys.path, so
# pytest runs from there (run_suite does that).
after_pytest() { cleanup_broker; }
run_suite "$SUITE" t/integration/test_py_amqp.py
