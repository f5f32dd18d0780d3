//! basic.qos prefetch limits through the lapin client, with RabbitMQ's
//! semantics: global=false limits each consumer created afterwards,
//! global=true limits the whole channel.

mod common;
mod support;

use lapin::{options::*, Channel};
use support::*;

async fn qos(ch: &Channel, count: u16, global: bool) {
    ok("basic.qos", ch.basic_qos(count, BasicQosOptions { global })).await;
}

/// Publishes m0..m{n-1} to `q` and waits until they are all enqueued.
async fn fill(ch: &Channel, q: &str, n: usize) {
    confirm_mode(ch).await;
    for i in 0..n {
        publish(ch, "", q, format!("m{i}").as_bytes()).await;
    }
    settle(ch).await;
}

/// With prefetch-count N (global=false) a consumer holds at most N unacked
/// messages; each ack lets exactly one more through.
#[tokio::test]
async fn prefetch_limits_unacked_deliveries_per_consumer() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let q = temp_queue(&ch, "prefetch").await;
    fill(&ch, &q, 6).await;
    let cch = channel(&conn).await;
    qos(&cch, 2, false).await;
    let mut sub = consume(&cch, &q, false).await;
    let first = sub.take(2).await;
    assert_eq!(texts(&first), strs(&["m0", "m1"]));
    sub.expect_nothing(QUIET).await;

    ok("ack", first[0].ack(BasicAckOptions::default())).await;
    let m2 = sub.next().await;
    assert_eq!(text(&m2), "m2");
    sub.expect_nothing(QUIET).await;

    // A multiple ack (m1 and m2) frees two slots at once.
    ok("ack multiple", m2.ack(BasicAckOptions { multiple: true })).await;
    assert_eq!(texts(&sub.take(2).await), strs(&["m3", "m4"]));
    sub.expect_nothing(QUIET).await;
}

/// Per-consumer prefetch (global=false) applies to every consumer on the
/// channel separately.
#[tokio::test]
async fn per_consumer_prefetch_applies_to_each_consumer() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let q1 = temp_queue(&ch, "pc1").await;
    let q2 = temp_queue(&ch, "pc2").await;
    fill(&ch, &q1, 3).await;
    fill(&ch, &q2, 3).await;
    let cch = channel(&conn).await;
    qos(&cch, 1, false).await;
    let mut s1 = consume(&cch, &q1, false).await;
    let mut s2 = consume(&cch, &q2, false).await;
    assert_eq!(text(&s1.next().await), "m0");
    assert_eq!(text(&s2.next().await), "m0");
    s1.expect_nothing(QUIET).await;
    s2.expect_nothing(QUIET).await;
    assert_eq!(counts(&ch, &q1).await.0, 2);
}

/// With global=true the prefetch count is shared by all consumers on the
/// channel.
#[tokio::test]
async fn global_prefetch_is_shared_across_channel_consumers() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let q1 = temp_queue(&ch, "g1").await;
    let q2 = temp_queue(&ch, "g2").await;
    fill(&ch, &q1, 3).await;
    fill(&ch, &q2, 3).await;
    let cch = channel(&conn).await;
    qos(&cch, 3, true).await;
    let mut s1 = consume(&cch, &q1, false).await;
    // s1 takes the whole channel budget of 3 ...
    let held = s1.take(3).await;
    let mut s2 = consume(&cch, &q2, false).await;
    // ... so s2 gets nothing until s1 acks.
    s2.expect_nothing(QUIET).await;
    ok(
        "ack multiple",
        held[1].ack(BasicAckOptions { multiple: true }),
    )
    .await;
    let freed = s2.take(2).await;
    assert_eq!(texts(&freed), strs(&["m0", "m1"]));
    s2.expect_nothing(QUIET).await;
}

/// Per-consumer and channel-wide limits combine: each consumer is capped by
/// its own limit and all of them together by the channel's. (Set the
/// per-consumer limit first: see the next test.)
#[tokio::test]
async fn per_consumer_and_global_limits_combine() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let qs = [
        temp_queue(&ch, "c1").await,
        temp_queue(&ch, "c2").await,
        temp_queue(&ch, "c3").await,
    ];
    for q in &qs {
        fill(&ch, q, 3).await;
    }
    let cch = channel(&conn).await;
    qos(&cch, 1, false).await;
    qos(&cch, 2, true).await;
    let mut subs = Vec::new();
    for q in &qs {
        subs.push(consume(&cch, q, false).await);
    }
    // Consumer limit 1 each, channel limit 2 overall: exactly two
    // deliveries in total, to two different consumers.
    let mut got = Vec::new();
    for s in subs.iter_mut() {
        if let Ok(d) = tokio::time::timeout(QUIET, s.next()).await {
            got.push(d);
        }
    }
    eprintln!(
        "DEBUG {:?}",
        got.iter()
            .map(|d| (d.delivery_tag, text(d), d.routing_key.to_string()))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        got.len(),
        2,
        "channel limit 2 must allow exactly two deliveries"
    );
    for s in subs.iter_mut() {
        s.expect_nothing(QUIET).await;
    }
    // Acking one frees a slot: exactly one more message flows.
    ok("ack", got[0].ack(BasicAckOptions::default())).await;
    let mut more = 0;
    for s in subs.iter_mut() {
        if tokio::time::timeout(QUIET, s.next()).await.is_ok() {
            more += 1;
        }
    }
    assert_eq!(more, 1);
}

/// RabbitMQ quirk: basic.qos with global=false also removes any channel-wide
/// limit set earlier, so afterwards only the per-consumer limit applies.
#[tokio::test]
async fn per_consumer_qos_clears_earlier_global_limit() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let qs = [
        temp_queue(&ch, "x1").await,
        temp_queue(&ch, "x2").await,
        temp_queue(&ch, "x3").await,
    ];
    for q in &qs {
        fill(&ch, q, 3).await;
    }
    let cch = channel(&conn).await;
    qos(&cch, 2, true).await;
    qos(&cch, 1, false).await;
    let mut subs = Vec::new();
    for q in &qs {
        subs.push(consume(&cch, q, false).await);
    }
    for s in subs.iter_mut() {
        assert_eq!(text(&s.next().await), "m0");
    }
    for s in subs.iter_mut() {
        s.expect_nothing(QUIET).await;
    }
}

/// A prefetch count of 0 means unlimited.
#[tokio::test]
async fn prefetch_zero_is_unlimited() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let q = temp_queue(&ch, "unlimited").await;
    fill(&ch, &q, 20).await;
    let cch = channel(&conn).await;
    qos(&cch, 5, false).await;
    qos(&cch, 0, false).await;
    let mut sub = consume(&cch, &q, false).await;
    assert_eq!(sub.take(20).await.len(), 20);
}

/// Prefetch limits do not apply to no-ack consumers.
#[tokio::test]
async fn prefetch_does_not_limit_no_ack_consumers() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let q = temp_queue(&ch, "noack").await;
    fill(&ch, &q, 10).await;
    let cch = channel(&conn).await;
    qos(&cch, 1, false).await;
    let mut sub = consume(&cch, &q, true).await;
    assert_eq!(sub.take(10).await.len(), 10);
}

/// A per-consumer basic.qos only affects consumers created after it; earlier
/// consumers keep the limit they started with.
#[tokio::test]
async fn per_consumer_qos_applies_to_later_consumers_only() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let q1 = temp_queue(&ch, "early").await;
    let q2 = temp_queue(&ch, "late").await;
    fill(&ch, &q1, 5).await;
    fill(&ch, &q2, 5).await;
    let cch = channel(&conn).await;
    qos(&cch, 1, false).await;
    let mut early = consume(&cch, &q1, false).await;
    early.next().await;
    qos(&cch, 3, false).await;
    let mut late = consume(&cch, &q2, false).await;
    assert_eq!(late.take(3).await.len(), 3);
    late.expect_nothing(QUIET).await;
    early.expect_nothing(QUIET).await;
}

/// Requeueing a message (nack) frees its prefetch slot, and the requeued
/// message is the next one delivered.
#[tokio::test]
async fn nack_requeue_frees_slot_and_redelivers_first() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let q = temp_queue(&ch, "nackslot").await;
    fill(&ch, &q, 3).await;
    let cch = channel(&conn).await;
    qos(&cch, 1, false).await;
    let mut sub = consume(&cch, &q, false).await;
    let d = sub.next().await;
    assert_eq!(text(&d), "m0");
    ok(
        "nack requeue",
        d.nack(BasicNackOptions {
            multiple: false,
            requeue: true,
        }),
    )
    .await;
    let again = sub.next().await;
    assert_eq!(text(&again), "m0");
    assert!(again.redelivered);
    sub.expect_nothing(QUIET).await;
}

/// basic.get is not limited by the channel's prefetch count.
#[tokio::test]
async fn basic_get_ignores_prefetch() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let q = temp_queue(&ch, "getqos").await;
    fill(&ch, &q, 3).await;
    qos(&ch, 1, true).await;
    let a = get(&ch, &q).await.expect("first");
    let b2 = get(&ch, &q).await.expect("second despite prefetch 1");
    let c = get(&ch, &q).await.expect("third");
    assert_eq!(
        [&a, &b2, &c].map(|m| String::from_utf8(m.delivery.data.clone()).unwrap()),
        ["m0", "m1", "m2"]
    );
}
