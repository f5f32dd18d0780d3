#!/usr/bin/env bash
# Durability figures: WarrenMQ's sled store against RabbitMQ on this machine.
# Usage: bench/durability.sh [RUNS] [SECONDS] [MESSAGES]   (default 5, 10, 1000000)
#
#   1. persistent 1 KiB messages with confirms (1 publisher, 1 consumer, confirm
#      window 256, prefetch 256, durable queue): rates and confirm latency, WarrenMQ
#      and RabbitMQ alternating, RUNS runs of SECONDS each; medians and ratio.
#   2. disk use after MESSAGES publish+ack cycles, and after a MESSAGES backlog is
#      built (no consumer) and then drained; WarrenMQ and RabbitMQ.
#   3. WarrenMQ start-up time and RSS with a MESSAGES backlog on disk, after SIGTERM
#      and after kill -9, in one queue and spread over 1,000 queues (a fanout);
#      RabbitMQ's stop_app/start_app time with the same backlog.
#   4. sync system calls (fsync, fdatasync, sync_file_range) counted by strace while
#      1000 persistent messages are confirmed one at a time (window 1), against
#      window 256. sled 0.34 on Linux makes a flush durable with sync_file_range on
#      the range it wrote; it calls fsync only from its periodic flusher thread
#      (flush_every_ms) and when it truncates or snapshots, so the two are listed apart.
#   5. bytes written to disk per payload byte (/proc/PID/io write_bytes), 20,000
#      persistent 1 KiB messages with confirms to one durable queue and to a fanout
#      exchange bound to three; WarrenMQ and RabbitMQ.
#   6. WarrenMQ's memory with a BIG (default 10,000,000) persistent 1 KiB backlog in
#      one queue: the highest RSS while it is built (sampled every second), RSS
#      after it, after a restart (SIGTERM, then kill -9) and after draining it;
#      start-up time, drain rate and disk use. Needs about 1.2 KiB of disk a message.
#      Not in the default SECTIONS (it takes a few minutes and ~12 GB).
#
# Environment: SECTIONS="1 2 3 4 5" picks parts; WORK (default /tmp/warrenmq-durability)
# holds WarrenMQ's data directories (fresh per experiment), logs and raw figures;
# WPORT (default 5690) is WarrenMQ's port; CONFIG is WarrenMQ's configuration file;
# RABBIT_RESTART=0 skips RabbitMQ's stop_app/start_app (it is skipped anyway while
# other clients are connected).
#
# WarrenMQ runs the release build copied to $WORK/bin, so a concurrent rebuild does
# not change the binary mid-series, with CONFIG (default config/warrenmq.toml: a
# durable queue pages its backlog out past limits.queue_memory_budget, so a 1M
# backlog stays under the default memory_high_watermark).
# RabbitMQ (installed and started as bench/compare.sh does) is used on 5672; only
# queues created here are deleted. Nothing here is a test: it only prints figures.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-5}
SECS=${2:-10}
N=${3:-1000000}
SECTIONS=${SECTIONS:-"1 2 3 4 5"}
WORK=${WORK:-/tmp/warrenmq-durability}
WPORT=${WPORT:-5690}
RPORT=5672
RABBIT_DIR=/var/lib/rabbitmq/mnesia
RABBIT_RESTART=${RABBIT_RESTART:-1}

wait_port() { for _ in $(seq 1 300); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }
want() { [[ " $SECTIONS " == *" $1 "* ]]; }

if ! command -v rabbitmq-server >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
fi
if ! (exec 3<>"/dev/tcp/127.0.0.1/$RPORT") 2>/dev/null; then
  echo "starting RabbitMQ"
  (rabbitmq-server >/tmp/bench-rabbitmq.log 2>&1 &)
  wait_port $RPORT
  sleep 3
fi
if want 4 && ! command -v strace >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq strace >/dev/null
fi

mkdir -p "$WORK/bin"
avail_kib=$(df -Pk "$WORK" | awk 'NR==2 {print $4}')
need_kib=$((N * 4 + 2 * 1024 * 1024))
BIG=${BIG:-10000000}
if want 6; then need_kib=$((need_kib + BIG * 5 / 4)); fi
if [ "$avail_kib" -lt "$need_kib" ]; then
  echo "only $((avail_kib / 1024)) MiB free under $WORK; need about $((need_kib / 1024)) MiB" >&2
  exit 1
fi
cargo build --release --quiet --bin warrenmq --example perf
cp target/release/warrenmq target/release/examples/perf "$WORK/bin/"
W=$WORK/bin/warrenmq
P=$WORK/bin/perf
CFG=$WORK/warrenmq.toml
cp "${CONFIG:-config/warrenmq.toml}" "$CFG"
RES=$WORK/results.txt
: >"$RES"
echo "commit: $(git log --oneline -1)"
echo "uncommitted changes: $(git status --porcelain -- src Cargo.toml Cargo.lock examples | tr '\n' ' ')"
echo "machine: $(nproc) cores, $(free -g | awk '/^Mem/ {print $2}') GiB, $(uname -r); N=$N"

note() { echo "$1 $2" >>"$RES"; printf '  %-44s %s\n' "$1" "$2"; }
kib() { du -sk "$1" | cut -f1; }
apparent_kib() { du -sk --apparent-size "$1" | cut -f1; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.3f", (b - a) / 1e9}'; }
plain() { sed 's/\x1b\[[0-9;]*m//g' "$1"; }

WPID=""   # what we launched (the broker, or strace running it)
BPID=""   # the broker itself
cleanup() { [ -n "$WPID" ] && kill "$WPID" 2>/dev/null || true; }
trap cleanup EXIT

# start_warren DIR [QUEUE [PREFIX...]]: starts the broker on DIR, waits until it
# completes an AMQP handshake (and answers a passive declare of QUEUE), and sets
# START_S (launch to ready, seconds), READY (the probe's line), WPID and BPID.
start_warren() {
  local dir=$1 queue=${2:-}
  shift 2 || shift $#
  local log="$dir.log"
  local t0 t1
  t0=$(date +%s%N)
  "$@" "$W" --config "$CFG" --listen 127.0.0.1:$WPORT --data-dir "$dir" --log-level info >>"$log" 2>&1 &
  WPID=$!
  READY=$("$P" --port $WPORT --probe --seconds 900 ${queue:+--queue "$queue"})
  t1=$(date +%s%N)
  START_S=$(secs "$t0" "$t1")
  BPID=$WPID
  if [ $# -gt 0 ]; then BPID=$(pgrep -P "$WPID" -x warrenmq | head -1); fi
}

# stop_warren SIGNAL: sends it to the broker, waits for what we launched; STOP_S.
stop_warren() {
  local t0 t1
  t0=$(date +%s%N)
  kill -"$1" "$BPID"
  wait "$WPID" || true
  t1=$(date +%s%N)
  STOP_S=$(secs "$t0" "$t1")
  WPID=""
}

recovered_line() { plain "$1" | grep -o 'recovered .*' | tail -1; }
rss_kib() { ps -o rss= -p "$1" | tr -d ' '; }
# sample_peak FILE: from now on, the broker's highest RSS (KiB) in FILE, sampled
# every second while it runs; SAMPLER is the sampling job.
sample_peak() {
  echo 0 >"$1"
  ( while kill -0 "$BPID" 2>/dev/null; do
      r=$(rss_kib "$BPID" || echo 0)
      [ "${r:-0}" -gt "$(cat "$1")" ] && echo "$r" >"$1"
      sleep 1
    done ) &
  SAMPLER=$!
}
rabbit_rss() { ps -C beam.smp -o rss= | awk '{s+=$1} END {print s}'; }
rabbit_clients() { rabbitmqctl -q list_connections --no-table-headers name 2>/dev/null | grep -c . || true; }

# ---------------------------------------------------------------------------
if want 1; then
  echo
  echo "== 1. persistent 1 KiB, confirms (window 256, prefetch 256), ${RUNS} x ${SECS}s"
  dir=$WORK/s1
  rm -rf "$dir" "$dir.log"
  start_warren "$dir"
  out=$WORK/s1.txt
  : >"$out"
  args="--seconds $SECS --size 1024 --publishers 1 --consumers 1 --confirm 256 --prefetch 256 --persistent"
  for r in $(seq 1 "$RUNS"); do
    for b in warrenmq rabbitmq; do
      port=$WPORT
      [ $b = rabbitmq ] && port=$RPORT
      line=$("$P" --port $port $args)
      rss=$([ $b = rabbitmq ] && rabbit_rss || rss_kib "$BPID")
      echo "persistent-confirms-1KiB $b $line rss_kib=$rss" | tee -a "$out"
    done
  done
  stop_warren TERM
  rm -rf "$dir"
  python3 - "$out" <<'PY'
import sys, statistics, collections
rows = collections.defaultdict(lambda: collections.defaultdict(list))
for line in open(sys.argv[1]):
    parts = line.split()
    name, broker = parts[0], parts[1]
    for kv in parts[2:]:
        k, v = kv.split("=")
        rows[name][(broker, k)].append(float(v))
keys = ["publish_rate", "consume_rate", "confirm_p50_ms", "confirm_p99_ms", "e2e_p50_ms", "e2e_p99_ms", "rss_kib"]
print()
print("| scenario | figure | WarrenMQ (median) | RabbitMQ (median) | WarrenMQ / RabbitMQ |")
print("|---|---|---|---|---|")
for name, d in rows.items():
    for k in keys:
        w = statistics.median(d[("warrenmq", k)]); r = statistics.median(d[("rabbitmq", k)])
        ratio = f"{w / r:.2f}" if r else "-"
        print(f"| {name} | {k} | {w:,.2f} | {r:,.2f} | {ratio} |")
PY
fi

# ---------------------------------------------------------------------------
if want 2; then
  echo
  echo "== 2. disk use, $N persistent 1 KiB messages (KiB: du -sk, and apparent size)"
  # 2a. publish + consume + ack, N cycles.
  dir=$WORK/s2a
  rm -rf "$dir" "$dir.log"
  start_warren "$dir"
  note warren.cycle.empty_kib "$(kib "$dir") apparent=$(apparent_kib "$dir")"
  line=$("$P" --port $WPORT --count "$N" --consumers 1 --confirm 256 --prefetch 256 --persistent --queue dur-cycle --no-delete)
  note warren.cycle.run "$line"
  note warren.cycle.after_kib "$(kib "$dir") apparent=$(apparent_kib "$dir")"
  sleep 5
  note warren.cycle.after_5s_kib "$(kib "$dir") apparent=$(apparent_kib "$dir")"
  stop_warren TERM
  note warren.cycle.after_stop_kib "$(kib "$dir") apparent=$(apparent_kib "$dir")"
  ls -la "$dir" "$dir/db" >"$dir.files"
  rm -rf "$dir"

  # 2b. backlog of N, then drain it.
  dir=$WORK/s2b
  rm -rf "$dir" "$dir.log"
  start_warren "$dir"
  line=$("$P" --port $WPORT --count "$N" --consumers 0 --confirm 256 --persistent --queue dur-backlog --no-delete)
  note warren.backlog.run "$line"
  note warren.backlog.after_kib "$(kib "$dir") apparent=$(apparent_kib "$dir")"
  note warren.backlog.rss_kib "$(rss_kib "$BPID")"
  sleep 5
  note warren.backlog.after_5s_kib "$(kib "$dir") apparent=$(apparent_kib "$dir")"
  line=$("$P" --port $WPORT --drain --persistent --queue dur-backlog --no-delete)
  note warren.drain.run "$line"
  note warren.drain.after_kib "$(kib "$dir") apparent=$(apparent_kib "$dir")"
  sleep 5
  note warren.drain.after_5s_kib "$(kib "$dir") apparent=$(apparent_kib "$dir")"
  note warren.drain.rss_kib "$(rss_kib "$BPID")"
  stop_warren TERM
  note warren.drain.after_stop_kib "$(kib "$dir") apparent=$(apparent_kib "$dir")"
  start_warren "$dir" dur-backlog
  note warren.drain.restart "start_s=$START_S $READY; $(recovered_line "$dir.log")"
  note warren.drain.after_restart_kib "$(kib "$dir") apparent=$(apparent_kib "$dir")"
  stop_warren TERM
  ls -la "$dir" "$dir/db" >"$dir.files"
  rm -rf "$dir"

  # The same against RabbitMQ: growth of its whole data directory.
  q=dur-cycle-$$
  note rabbit.cycle.before_kib "$(kib $RABBIT_DIR)"
  line=$("$P" --port $RPORT --count "$N" --consumers 1 --confirm 256 --prefetch 256 --persistent --queue "$q" --no-delete)
  note rabbit.cycle.run "$line"
  note rabbit.cycle.after_kib "$(kib $RABBIT_DIR)"
  sleep 5
  note rabbit.cycle.after_5s_kib "$(kib $RABBIT_DIR)"
  "$P" --port $RPORT --drain --persistent --queue "$q" >/dev/null # deletes the (empty) queue
  q=dur-backlog-$$
  note rabbit.backlog.before_kib "$(kib $RABBIT_DIR)"
  line=$("$P" --port $RPORT --count "$N" --consumers 0 --confirm 256 --persistent --queue "$q" --no-delete)
  note rabbit.backlog.run "$line"
  note rabbit.backlog.after_kib "$(kib $RABBIT_DIR)"
  note rabbit.backlog.rss_kib "$(rabbit_rss)"
  sleep 5
  note rabbit.backlog.after_5s_kib "$(kib $RABBIT_DIR)"
  line=$("$P" --port $RPORT --drain --persistent --queue "$q" --no-delete)
  note rabbit.drain.run "$line"
  note rabbit.drain.after_kib "$(kib $RABBIT_DIR)"
  sleep 5
  note rabbit.drain.after_5s_kib "$(kib $RABBIT_DIR)"
  "$P" --port $RPORT --drain --persistent --queue "$q" >/dev/null
  note rabbit.drain.after_delete_kib "$(kib $RABBIT_DIR)"
fi

# ---------------------------------------------------------------------------
if want 3; then
  echo
  echo "== 3. start-up with $N persistent 1 KiB messages on disk"
  dir=$WORK/s3
  rm -rf "$dir" "$dir.log"
  start_warren "$dir"
  note warren.empty.start_s "$START_S"
  note warren.empty.rss_kib "$(rss_kib "$BPID")"
  line=$("$P" --port $WPORT --count "$N" --consumers 0 --confirm 256 --persistent --queue dur-restart --no-delete)
  note warren.restart.backlog_run "$line"
  note warren.restart.rss_before_kib "$(rss_kib "$BPID")"
  note warren.restart.disk_kib "$(kib "$dir") apparent=$(apparent_kib "$dir")"
  stop_warren TERM
  note warren.sigterm.stop_s "$STOP_S"
  start_warren "$dir" dur-restart
  note warren.sigterm.start_s "$START_S"
  note warren.sigterm.probe "$READY"
  note warren.sigterm.log "$(recovered_line "$dir.log")"
  note warren.sigterm.rss_kib "$(rss_kib "$BPID")"
  sleep 5
  note warren.sigterm.rss_5s_kib "$(rss_kib "$BPID")"
  stop_warren 9
  start_warren "$dir" dur-restart
  note warren.kill9.start_s "$START_S"
  note warren.kill9.probe "$READY"
  note warren.kill9.log "$(recovered_line "$dir.log")"
  note warren.kill9.rss_kib "$(rss_kib "$BPID")"
  sleep 5
  note warren.kill9.rss_5s_kib "$(rss_kib "$BPID")"
  line=$("$P" --port $WPORT --drain --persistent --queue dur-restart --no-delete)
  note warren.kill9.drain_run "$line"
  note warren.kill9.rss_after_drain_kib "$(rss_kib "$BPID")"
  stop_warren TERM
  rm -rf "$dir"

  # The same number of entries over 1,000 durable queues: N/1000 messages fanned
  # out to all of them (each body is written once; each queue has N/1000 entries).
  dir=$WORK/s3q
  rm -rf "$dir" "$dir.log"
  start_warren "$dir"
  line=$("$P" --port $WPORT --count $((N / 1000)) --consumers 0 --confirm 256 --persistent --fanout 1000 --queue dur-q1k --no-delete)
  note warren.q1000.backlog_run "$line"
  stop_warren TERM
  start_warren "$dir"
  note warren.q1000.sigterm.start_s "$START_S"
  note warren.q1000.sigterm.log "$(recovered_line "$dir.log")"
  note warren.q1000.sigterm.rss_kib "$(rss_kib "$BPID")"
  stop_warren 9
  start_warren "$dir"
  note warren.q1000.kill9.start_s "$START_S"
  note warren.q1000.kill9.log "$(recovered_line "$dir.log")"
  note warren.q1000.kill9.rss_kib "$(rss_kib "$BPID")"
  stop_warren TERM
  rm -rf "$dir"

  if [ "$RABBIT_RESTART" = 1 ] && [ "$(rabbit_clients)" = 0 ]; then
    q=dur-restart-$$
    line=$("$P" --port $RPORT --count "$N" --consumers 0 --confirm 256 --persistent --queue "$q" --no-delete)
    note rabbit.restart.backlog_run "$line"
    note rabbit.restart.rss_before_kib "$(rabbit_rss)"
    t0=$(date +%s%N)
    rabbitmqctl -q stop_app
    t1=$(date +%s%N)
    note rabbit.stop_app_s "$(secs "$t0" "$t1")"
    t0=$(date +%s%N)
    rabbitmqctl -q start_app
    t1=$(date +%s%N)
    ready=$("$P" --port $RPORT --probe --seconds 900 --queue "$q")
    t2=$(date +%s%N)
    note rabbit.start_app_s "$(secs "$t0" "$t1")"
    note rabbit.start_to_queue_ready_s "$(secs "$t0" "$t2") $ready"
    note rabbit.restart.rss_kib "$(rabbit_rss)"
    rabbitmqctl -q delete_queue "$q" >/dev/null
  else
    note rabbit.restart "skipped (RABBIT_RESTART=$RABBIT_RESTART, $(rabbit_clients) clients connected)"
  fi
fi

# ---------------------------------------------------------------------------
if want 4; then
  echo
  echo "== 4. sync calls (strace -f -c -e trace=fsync,fdatasync,sync_file_range)"
  for c in "idle|" "window1-1000|--count 1000 --confirm 1" "window256-1000|--count 1000 --confirm 256" \
    "window256-100000|--count 100000 --confirm 256"; do
    name=${c%%|*}
    args=${c#*|}
    dir=$WORK/s4-$name
    rm -rf "$dir" "$dir.log"
    st=$WORK/strace-$name.txt
    start_warren "$dir" "" strace -f --seccomp-bpf -e trace=fsync,fdatasync,sync_file_range -c -o "$st"
    line="(no publishing: start, handshake, stop)"
    if [ -n "$args" ]; then
      line=$("$P" --port $WPORT $args --consumers 0 --persistent --queue strace-q --no-delete)
    fi
    stop_warren TERM
    calls=$(awk '$NF ~ /^(fsync|fdatasync|sync_file_range)$/ {printf "%s=%s ", $NF, $4} $NF == "total" {printf "total=%s", $4}' "$st")
    note "sync.$name" "$calls | $line"
    rm -rf "$dir"
  done
fi

# ---------------------------------------------------------------------------
if want 5; then
  echo
  echo "== 5. bytes written to disk per payload byte (write_bytes of /proc/PID/io)"
  # 20,000 persistent 1 KiB messages with confirms (window 256) to 1 durable queue
  # and to a fanout exchange bound to 3, no consumer; counted from before the first
  # publish until 3 s after the last confirm, so that the checkpoint after a quiet
  # second (which moves the index into sled) is counted too.
  wb() { awk '/^write_bytes/ {print $2}' "/proc/$1/io"; }
  for fan in 1 3; do
    fargs="--fanout $fan"
    dir=$WORK/s5-$fan
    rm -rf "$dir" "$dir.log"
    start_warren "$dir"
    before=$(wb "$BPID")
    line=$("$P" --port $WPORT --count 20000 --consumers 0 --confirm 256 --persistent $fargs --queue wa-$fan --no-delete)
    sleep 3
    after=$(wb "$BPID")
    note "warren.written_per_payload_byte.fanout$fan" "$(awk -v a="$before" -v b="$after" 'BEGIN {printf "%.2f", (b - a) / (20000 * 1024)}') | $line"
    stop_warren TERM
    rm -rf "$dir"
    rpid=$(pgrep -x beam.smp | head -1)
    if [ -n "$rpid" ] && [ -r "/proc/$rpid/io" ]; then
      before=$(wb "$rpid")
      line=$("$P" --port $RPORT --count 20000 --consumers 0 --confirm 256 --persistent $fargs --queue wa-$fan-$$)
      sleep 3
      after=$(wb "$rpid")
      note "rabbit.written_per_payload_byte.fanout$fan" "$(awk -v a="$before" -v b="$after" 'BEGIN {printf "%.2f", (b - a) / (20000 * 1024)}') | $line"
    fi
  done
fi

# ---------------------------------------------------------------------------
if want 6; then
  echo
  echo "== 6. memory with $BIG persistent 1 KiB messages in one queue"
  dir=$WORK/s6
  rm -rf "$dir" "$dir.log"
  start_warren "$dir"
  note warren.big.empty_rss_kib "$(rss_kib "$BPID")"
  peak=$WORK/s6.peak
  sample_peak "$peak"
  line=$("$P" --port $WPORT --count "$BIG" --consumers 0 --confirm 256 --persistent --queue big --no-delete)
  note warren.big.backlog_run "$line"
  note warren.big.rss_after_build_kib "$(rss_kib "$BPID")"
  sleep 5
  note warren.big.rss_after_build_5s_kib "$(rss_kib "$BPID")"
  note warren.big.peak_rss_during_build_kib "$(cat "$peak")"
  note warren.big.disk_kib "$(kib "$dir")"
  stop_warren TERM
  kill "$SAMPLER" 2>/dev/null || true
  note warren.big.sigterm.stop_s "$STOP_S"
  start_warren "$dir" big
  note warren.big.sigterm.start_s "$START_S"
  note warren.big.sigterm.log "$(recovered_line "$dir.log")"
  note warren.big.sigterm.rss_kib "$(rss_kib "$BPID")"
  stop_warren 9
  start_warren "$dir" big
  note warren.big.kill9.start_s "$START_S"
  note warren.big.kill9.log "$(recovered_line "$dir.log")"
  note warren.big.kill9.rss_kib "$(rss_kib "$BPID")"
  sleep 5
  note warren.big.kill9.rss_5s_kib "$(rss_kib "$BPID")"
  sample_peak "$peak"
  line=$("$P" --port $WPORT --drain --persistent --queue big --no-delete)
  note warren.big.drain_run "$line"
  note warren.big.peak_rss_during_drain_kib "$(cat "$peak")"
  note warren.big.rss_after_drain_kib "$(rss_kib "$BPID")"
  sleep 5
  note warren.big.disk_after_drain_kib "$(kib "$dir")"
  stop_warren TERM
  kill "$SAMPLER" 2>/dev/null || true
  rm -rf "$dir"
fi

echo
echo "raw figures: $RES; logs: $WORK/*.log"
