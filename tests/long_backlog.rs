//! Backlogs long enough that a queue keeps their middle encoded (a few bytes a
//! message instead of a 32-byte entry): what a client sees must not change.
//! Messages come out in publish order with their flags, requeued ones go back
//! to their places, expiry, length limits and purge act on the whole backlog,
//! and a restart brings it all back in order.

mod common;
mod support;

use std::path::{Path, PathBuf};

use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use support::{channel, connect_url, ok};

/// Enough messages for several encoded blocks (a level encodes 4,096 entries at
/// a time once 8,192 wait behind its head).
const N: usize = 20_000;

fn data_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("warrenmq-long-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A broker with a small per-queue memory budget: all but the first few dozen
/// bodies of a durable backlog live on disk only.
async fn broker(dir: &Path) -> warrenmq::BrokerHandle {
    warrenmq::start(support::budget_config(dir, 16 * 1024))
        .await
        .unwrap()
}

fn body(i: usize) -> String {
    format!("{i:06}-{}", "z".repeat(200))
}

fn index(d: &[u8]) -> usize {
    std::str::from_utf8(&d[..6]).unwrap().parse().unwrap()
}

/// A client connection to the broker, with a channel open on it.
async fn open(broker: &warrenmq::BrokerHandle) -> (lapin::Connection, lapin::Channel) {
    let url = format!("amqp://guest:guest@{}/%2f", broker.local_addr());
    let conn = connect_url(&url).await;
    let ch = channel(&conn).await;
    (conn, ch)
}

async fn declare(ch: &lapin::Channel, queue: &str, args: FieldTable) {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ok(
        "queue.declare",
        ch.queue_declare(queue.into(), durable, args),
    )
    .await;
}

/// Publishes `body(i)` for every i in `range` with confirms, with the
/// properties `props(i)` gives.
async fn publish_all(
    ch: &lapin::Channel,
    queue: &str,
    range: std::ops::Range<usize>,
    props: impl Fn(usize) -> BasicProperties,
) {
    for i in range {
        support::publish_props(ch, "", queue, body(i).as_bytes(), props(i)).await;
    }
    assert!(ok("confirms", ch.wait_for_confirms()).await.is_empty());
}

/// Persistent and transient messages, some with a TTL long enough to outlive
/// the test and some already expired by the time a consumer reaches them, are
/// consumed in publish order; a consumer's requeued messages come back first,
/// marked redelivered, and the expired ones never arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_mixed_backlog_is_consumed_in_order_with_requeues() {
    let dir = data_dir("mixed");
    let broker = broker(&dir).await;
    let (conn, ch) = open(&broker).await;
    declare(&ch, "long-mixed", FieldTable::default()).await;
    support::confirm_mode(&ch).await;
    let expired = |i: usize| i % 1000 == 500;
    publish_all(&ch, "long-mixed", 0..N, |i| {
        let mut p =
            BasicProperties::default().with_delivery_mode(if i.is_multiple_of(3) { 1 } else { 2 });
        if expired(i) {
            p = p.with_expiration("1".into());
        } else if i.is_multiple_of(5) {
            p = p.with_expiration("600000".into());
        }
        p
    })
    .await;

    ok("basic.qos", ch.basic_qos(100, BasicQosOptions::default())).await;
    let mut sub = support::consume(&ch, "long-mixed", false).await;
    let first = sub.take(100).await;
    assert_eq!(
        first.iter().map(|d| index(&d.data)).collect::<Vec<_>>(),
        (0..100).collect::<Vec<_>>()
    );
    // The even ones are acked: their room goes to the next fifty.
    for d in first.iter().filter(|d| index(&d.data).is_multiple_of(2)) {
        ok("ack", d.acker.ack(BasicAckOptions::default())).await;
    }
    let next = sub.take(50).await;
    assert_eq!(
        next.iter().map(|d| index(&d.data)).collect::<Vec<_>>(),
        (100..150).collect::<Vec<_>>()
    );
    // The odd ones are requeued: they go back to the head, before everything
    // still waiting, and come next.
    for d in first.iter().filter(|d| index(&d.data) % 2 == 1) {
        ok(
            "nack",
            d.acker.nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            }),
        )
        .await;
    }
    for d in &next {
        ok("ack", d.acker.ack(BasicAckOptions::default())).await;
    }
    let mut want: Vec<(usize, bool)> = (1..100).step_by(2).map(|i| (i, true)).collect();
    want.extend((150..N).filter(|&i| !expired(i)).map(|i| (i, false)));
    let mut got = Vec::with_capacity(want.len());
    for _ in 0..want.len() {
        let d = sub.next().await;
        let i = index(&d.data);
        assert_eq!(
            std::str::from_utf8(&d.data).unwrap(),
            body(i),
            "message {i} intact"
        );
        got.push((i, d.redelivered));
        ok("ack", d.acker.ack(BasicAckOptions::default())).await;
    }
    sub.expect_nothing(support::QUIET).await;
    assert_eq!(got, want);
    drop(conn);
    broker.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// x-max-length with drop-head keeps the newest messages of a long backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_length_limit_drops_the_head_of_a_long_backlog() {
    let dir = data_dir("maxlen");
    let broker = broker(&dir).await;
    let (conn, ch) = open(&broker).await;
    let args = support::table(&[("x-max-length", AMQPValue::LongInt(12_000))]);
    declare(&ch, "long-maxlen", args).await;
    support::confirm_mode(&ch).await;
    publish_all(&ch, "long-maxlen", 0..N, |_| {
        BasicProperties::default().with_delivery_mode(2)
    })
    .await;
    assert_eq!(support::counts(&ch, "long-maxlen").await.0, 12_000);
    let mut sub = support::consume(&ch, "long-maxlen", true).await;
    for want in N - 12_000..N {
        assert_eq!(index(&sub.next().await.data), want);
    }
    sub.expect_nothing(support::QUIET).await;
    drop(conn);
    broker.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A long persistent backlog comes back after a restart in order (marked
/// redelivered); a purge of what is left empties it on disk too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_backlog_survives_a_restart_in_order_and_a_purge_empties_it() {
    let dir = data_dir("restart");
    let broker1 = broker(&dir).await;
    {
        let (_conn, ch) = open(&broker1).await;
        declare(&ch, "long-restart", FieldTable::default()).await;
        support::confirm_mode(&ch).await;
        publish_all(&ch, "long-restart", 0..N, |_| {
            BasicProperties::default().with_delivery_mode(2)
        })
        .await;
    }
    broker1.shutdown().await;

    let broker2 = broker(&dir).await;
    {
        let (conn, ch) = open(&broker2).await;
        assert_eq!(support::counts(&ch, "long-restart").await.0, N as u32);
        ok("basic.qos", ch.basic_qos(500, BasicQosOptions::default())).await;
        let mut sub = support::consume(&ch, "long-restart", false).await;
        for want in 0..N / 2 {
            let d = sub.next().await;
            assert_eq!(std::str::from_utf8(&d.data).unwrap(), body(want));
            assert!(d.redelivered, "recovered messages are marked redelivered");
            ok("ack", d.acker.ack(BasicAckOptions::default())).await;
        }
        // Closing the channel requeues what the prefetch held beyond the first half.
        drop(sub);
        ok("channel.close", ch.close(200, "done".into())).await;
        let ch = channel(&conn).await;
        let purged = ok(
            "queue.purge",
            ch.queue_purge("long-restart".into(), QueuePurgeOptions::default()),
        )
        .await;
        assert_eq!(purged, (N / 2) as u32);
    }
    broker2.shutdown().await;

    let broker3 = broker(&dir).await;
    let (conn, ch) = open(&broker3).await;
    assert_eq!(support::counts(&ch, "long-restart").await.0, 0);
    drop(conn);
    broker3.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A long backlog whose TTL runs out while the broker is down is dropped at
/// start-up, and its stored copies with it: the next start finds none of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_backlog_that_expired_while_down_is_gone_for_good() {
    let dir = data_dir("expired");
    let broker1 = broker(&dir).await;
    {
        let (_conn, ch) = open(&broker1).await;
        let args = support::table(&[("x-message-ttl", AMQPValue::LongInt(1_500))]);
        declare(&ch, "long-ttl", args).await;
        support::confirm_mode(&ch).await;
        publish_all(&ch, "long-ttl", 0..N, |_| {
            BasicProperties::default().with_delivery_mode(2)
        })
        .await;
    }
    broker1.shutdown().await;
    tokio::time::sleep(std::time::Duration::from_millis(1_600)).await;

    let broker2 = broker(&dir).await;
    let (conn, ch) = open(&broker2).await;
    assert_eq!(support::counts(&ch, "long-ttl").await.0, 0);
    drop(conn);
    broker2.shutdown().await;
    // Expired again at every start would look the same to a client: the
    // store's index must hold none of them.
    let left: usize = support::open_db(&dir)
        .open_tree("index")
        .unwrap()
        .iter()
        .map(|kv| {
            let chunk = warrenmq::store::disk_format::decode_chunk(&kv.unwrap().1);
            chunk.expect("a readable chunk").len()
        })
        .sum();
    assert_eq!(left, 0, "stored entries of expired messages");
    let _ = std::fs::remove_dir_all(&dir);
}
