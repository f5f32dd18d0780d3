#!/bin/sh
# How config/examples/rabbitmq-3.10-definitions.json was made: the commands run
# against a fresh RabbitMQ 3.10.8 node (only the default guest user and "/"),
# then `rabbitmqctl export_definitions`. Documentation of the test data used by
# tests/definitions.rs; CI does not run it. It ends by deleting what it created,
# so that the node is back to guest only.
#
# Passwords (tests/definitions.rs logs in with them):
#   app    app-secret   rabbit_password_hashing_sha256 (RabbitMQ's default)
#   ops    ops-s3cret   rabbit_password_hashing_sha512
#   legacy legacy-md5   rabbit_password_hashing_md5
#   nopass (none: its password is cleared, so it cannot log in with one)
#   guest  guest        (RabbitMQ's own default user)
set -eu
OUT=${1:-config/examples/rabbitmq-3.10-definitions.json}
ctl() { rabbitmqctl --quiet "$@"; }
ev() { rabbitmqctl --quiet eval "$1"; }

ctl add_vhost staging

# Users: one per hashing module RabbitMQ has. The hashing module is a node-wide
# setting used when a password is set; it is put back to the default after each.
ctl add_user app app-secret
ctl set_user_tags app monitoring management
ev 'application:set_env(rabbit, password_hashing_module, rabbit_password_hashing_sha512).'
ctl add_user ops ops-s3cret
ev 'application:set_env(rabbit, password_hashing_module, rabbit_password_hashing_md5).'
ctl add_user legacy legacy-md5
ev 'application:unset_env(rabbit, password_hashing_module).'
ctl set_user_tags ops administrator
ctl add_user nopass placeholder
ctl clear_password nopass

# Permissions: configure, write, read.
ctl set_permissions -p / app '^app\.' '^(app\.|orders$|events$)' '^(app\.|orders\.)'
ctl set_permissions -p / ops '.*' '.*' '.*'
ctl set_permissions -p staging ops '.*' '.*' '.*'
ctl set_permissions -p / legacy '' '^orders$' '^orders\.new$'
ctl set_permissions -p staging nopass '.*' '.*' '.*'
ctl set_topic_permissions -p / app events '^app\.' '.*'

# Limits.
ctl set_user_limits app '{"max-connections": 10, "max-channels": 20}'
ctl set_vhost_limits -p staging '{"max-connections": 50, "max-queues": 100}'

# A policy.
ctl set_policy -p / --apply-to queues --priority 1 orders-limits '^orders\.' \
  '{"message-ttl": 3600000, "max-length": 1000, "dead-letter-exchange": "dlx"}'

# Durable topology, declared through RabbitMQ's own functions (no management plugin
# needed): exchange(VHost, Name, Type, Internal, Args), queue(VHost, Name, Args),
# bind(VHost, Source, Key, DestKind, Dest, Args). Arguments are AMQP tables
# [{Key, Type, Value}]. No exchange is internal: RabbitMQ 3.10 leaves internal
# exchanges out of its export (while keeping their bindings).
ev '
X = fun(V, N, T, I, A) -> _ = rabbit_exchange:declare({resource, V, exchange, N}, T, true, false, I, A, <<"definitions">>), ok end,
Q = fun(V, N, A) -> {new, _} = rabbit_amqqueue:declare({resource, V, queue, N}, true, false, A, none, <<"definitions">>), ok end,
B = fun(V, S, K, DK, D, A) -> ok = rabbit_binding:add({binding, {resource, V, exchange, S}, K, {resource, V, DK, D}, A}, <<"definitions">>) end,
R = <<"/">>, St = <<"staging">>,
X(R, <<"orders">>, direct, false, [{<<"alternate-exchange">>, longstr, <<"unrouted">>}]),
X(R, <<"unrouted">>, fanout, false, []),
X(R, <<"events">>, topic, false, [{<<"alternate-exchange">>, longstr, <<"unrouted">>}]),
X(R, <<"audit">>, headers, false, []),
X(R, <<"dlx">>, fanout, false, []),
X(St, <<"staging.events">>, topic, false, []),
Q(R, <<"orders.new">>, [{<<"x-message-ttl">>, long, 3600000}, {<<"x-max-length">>, long, 1000}, {<<"x-dead-letter-exchange">>, longstr, <<"dlx">>}, {<<"x-dead-letter-routing-key">>, longstr, <<"expired">>}]),
Q(R, <<"orders.unrouted">>, []),
Q(R, <<"orders.quorum">>, [{<<"x-queue-type">>, longstr, <<"quorum">>}, {<<"x-single-active-consumer">>, bool, true}]),
Q(R, <<"events.all">>, [{<<"x-max-length">>, long, 500}]),
Q(R, <<"audit.eu">>, []),
Q(R, <<"dead">>, []),
Q(R, <<"app.in">>, []),
Q(St, <<"staging.q">>, [{<<"x-message-ttl">>, long, 60000}]),
B(R, <<"orders">>, <<"new">>, queue, <<"orders.new">>, []),
B(R, <<"orders">>, <<"new">>, queue, <<"orders.quorum">>, []),
B(R, <<"unrouted">>, <<>>, queue, <<"orders.unrouted">>, []),
B(R, <<"events">>, <<"#">>, queue, <<"events.all">>, []),
B(R, <<"events">>, <<"audit.#">>, exchange, <<"audit">>, []),
B(R, <<"audit">>, <<>>, queue, <<"audit.eu">>, [{<<"x-match">>, longstr, <<"all">>}, {<<"region">>, longstr, <<"eu">>}]),
B(R, <<"dlx">>, <<>>, queue, <<"dead">>, []),
B(R, <<"orders">>, <<"app">>, queue, <<"app.in">>, []),
B(St, <<"staging.events">>, <<"*.created">>, queue, <<"staging.q">>, []),
ok.'

ctl export_definitions - > "$OUT"

# Back to guest only: deleting the vhost "staging" deletes its topology too.
for q in orders.new orders.unrouted orders.quorum events.all audit.eu dead app.in; do
  ctl delete_queue -p / "$q"
done
ev '[ok = rabbit_exchange:delete({resource, <<"/">>, exchange, N}, false, <<"definitions">>)
     || N <- [<<"orders">>, <<"unrouted">>, <<"events">>, <<"audit">>, <<"dlx">>]], ok.'
ctl clear_policy -p / orders-limits
for u in app ops legacy nopass; do ctl delete_user "$u"; done
ctl delete_vhost staging
