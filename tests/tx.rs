//! AMQP transactions (tx.select / tx.commit / tx.rollback) through the lapin
//! client: publishes and acknowledgements on a transactional channel take
//! effect only at commit.

mod common;
mod support;

use lapin::options::*;
use support::*;

/// Messages published inside a transaction are invisible until tx.commit,
/// then all appear, in order.
#[tokio::test]
async fn publishes_appear_only_at_commit() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let q = temp_queue(&ch, "txpub").await;
    let tx = channel(&conn).await;
    ok("tx.select", tx.tx_select()).await;
    for i in 0..3 {
        publish(&tx, "", &q, format!("m{i}").as_bytes()).await;
    }
    // Neither another channel nor the publishing one sees them yet.
    assert_eq!(get_body(&tx, &q).await, None);
    assert_eq!(get_body(&ch, &q).await, None);
    ok("tx.commit", tx.tx_commit()).await;
    assert_eq!(drain(&tx, &q).await, strs(&["m0", "m1", "m2"]));
}

/// tx.rollback discards the publishes of the transaction.
#[tokio::test]
async fn rollback_discards_publishes() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let q = temp_queue(&ch, "txrb").await;
    ok("tx.select", ch.tx_select()).await;
    publish(&ch, "", &q, b"discarded").await;
    ok("tx.rollback", ch.tx_rollback()).await;
    ok("tx.commit", ch.tx_commit()).await;
    assert_eq!(get_body(&ch, &q).await, None);
}

/// The channel stays transactional after commit and rollback: each new
/// batch needs its own commit.
#[tokio::test]
async fn channel_stays_transactional_across_commits() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let q = temp_queue(&ch, "txmulti").await;
    ok("tx.select", ch.tx_select()).await;
    publish(&ch, "", &q, b"first").await;
    ok("tx.commit", ch.tx_commit()).await;
    publish(&ch, "", &q, b"rolled-back").await;
    ok("tx.rollback", ch.tx_rollback()).await;
    publish(&ch, "", &q, b"second").await;
    assert_eq!(drain(&ch, &q).await, strs(&["first"]));
    ok("tx.commit", ch.tx_commit()).await;
    assert_eq!(drain(&ch, &q).await, strs(&["second"]));
}

/// A commit covers publishes to several queues and exchanges at once.
#[tokio::test]
async fn commit_covers_several_queues() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let q1 = temp_queue(&ch, "txq1").await;
    let q2 = temp_queue(&ch, "txq2").await;
    bind(&ch, &q2, "amq.direct", &q2).await;
    ok("tx.select", ch.tx_select()).await;
    publish(&ch, "", &q1, b"a").await;
    publish(&ch, "amq.direct", &q2, b"b").await;
    publish(&ch, "", &q1, b"c").await;
    assert_eq!(get_body(&ch, &q1).await, None);
    assert_eq!(get_body(&ch, &q2).await, None);
    ok("tx.commit", ch.tx_commit()).await;
    assert_eq!(drain(&ch, &q1).await, strs(&["a", "c"]));
    assert_eq!(drain(&ch, &q2).await, strs(&["b"]));
}

/// Acks inside a transaction take effect at commit: rolled-back acks leave
/// the messages unacked (they come back when the channel closes), committed
/// acks remove them for good.
#[tokio::test]
async fn acks_take_effect_only_at_commit() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let q = temp_queue(&ch, "txack").await;
    publish(&ch, "", &q, b"m0").await;
    publish(&ch, "", &q, b"m1").await;

    let tx = channel(&conn).await;
    ok("tx.select", tx.tx_select()).await;
    let mut sub = consume(&tx, &q, false).await;
    let ds = sub.take(2).await;
    ok("ack m0", ds[0].ack(BasicAckOptions::default())).await;
    ok("tx.rollback", tx.tx_rollback()).await;
    ok("ack m1", ds[1].ack(BasicAckOptions::default())).await;
    ok("tx.commit", tx.tx_commit()).await;
    ok("channel.close", tx.close(200, "bye".into())).await;

    // m0's ack was rolled back, so it is requeued with the channel; m1's
    // committed ack removed it for good.
    let back = get(&ch, &q).await.expect("m0 requeued");
    assert_eq!(back.delivery.data, b"m0");
    assert!(back.delivery.redelivered);
    ok("ack", back.delivery.ack(BasicAckOptions::default())).await;
    assert_eq!(get_body(&ch, &q).await, None);
}

/// An uncommitted ack is undone when the channel closes without commit: the
/// message is requeued.
#[tokio::test]
async fn uncommitted_ack_is_discarded_on_close() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    confirm_mode(&ch).await;
    let q = temp_queue(&ch, "txclose").await;
    publish(&ch, "", &q, b"m").await;
    settle(&ch).await;
    let tx = channel(&conn).await;
    ok("tx.select", tx.tx_select()).await;
    let m = get(&tx, &q).await.expect("m");
    ok("ack", m.delivery.ack(BasicAckOptions::default())).await;
    ok("channel.close", tx.close(200, "bye".into())).await;
    let back = get(&ch, &q).await.expect("requeued after uncommitted ack");
    assert!(back.delivery.redelivered);
}

/// A requeueing reject inside a transaction only returns the message at commit.
#[tokio::test]
async fn reject_requeue_takes_effect_at_commit() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    confirm_mode(&ch).await;
    let q = temp_queue(&ch, "txreject").await;
    publish(&ch, "", &q, b"m").await;
    settle(&ch).await;
    let tx = channel(&conn).await;
    ok("tx.select", tx.tx_select()).await;
    let m = get(&tx, &q).await.expect("m");
    ok(
        "reject requeue",
        m.delivery.reject(BasicRejectOptions { requeue: true }),
    )
    .await;
    assert_eq!(get_body(&ch, &q).await, None, "requeued before commit");
    ok("tx.commit", tx.tx_commit()).await;
    let back = get(&ch, &q).await.expect("requeued at commit");
    assert_eq!(back.delivery.data, b"m");
    assert!(back.delivery.redelivered);
}

/// tx.commit and tx.rollback on a non-transactional channel fail with 406
/// PRECONDITION_FAILED.
#[tokio::test]
async fn commit_or_rollback_without_select_is_refused() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let (code, text) = amqp_err("tx.commit without select", ch.tx_commit()).await;
    assert_eq!(code, 406, "{text}");
    assert!(text.starts_with("PRECONDITION_FAILED"), "{text}");
    let ch2 = channel(&conn).await;
    let (code, text) = amqp_err("tx.rollback without select", ch2.tx_rollback()).await;
    assert_eq!(code, 406, "{text}");
    assert!(text.starts_with("PRECONDITION_FAILED"), "{text}");
}
