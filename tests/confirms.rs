//! Publisher confirms through the lapin client.

mod common;
mod support;

use lapin::{
    options::*, types::FieldTable, BasicProperties, Channel, Confirmation, ExchangeKind,
    PublisherConfirm,
};
use support::*;

async fn start_publish(ch: &Channel, exchange: &str, key: &str, body: &[u8]) -> PublisherConfirm {
    ok(
        "basic.publish",
        ch.basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default(),
        ),
    )
    .await
}

/// Without confirm.select, publishes are not confirmed at all.
#[tokio::test]
async fn publishes_are_unconfirmed_without_confirm_select() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let q = temp_queue(&ch, "noconfirm").await;
    let pc = start_publish(&ch, "", &q, b"m").await;
    assert_eq!(ok("confirm", pc).await, Confirmation::NotRequested);
}

/// After confirm.select every publish is acked by the broker: routed or not.
#[tokio::test]
async fn every_publish_is_acked() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    confirm_mode(&ch).await;
    let q = temp_queue(&ch, "acked").await;
    let x = temp_exchange(&ch, ExchangeKind::Fanout, "fan").await;
    let q2 = temp_queue(&ch, "acked2").await;
    bind(&ch, &q, &x, "").await;
    bind(&ch, &q2, &x, "").await;

    let to_queue = start_publish(&ch, "", &q, b"direct").await;
    assert_eq!(ok("confirm", to_queue).await, Confirmation::Ack(None));
    let to_two = start_publish(&ch, &x, "", b"fanned").await;
    assert_eq!(ok("confirm", to_two).await, Confirmation::Ack(None));
    let unroutable = start_publish(&ch, "", &common::unique("nobody"), b"lost").await;
    assert_eq!(ok("confirm", unroutable).await, Confirmation::Ack(None));

    assert_eq!(drain(&ch, &q).await, strs(&["direct", "fanned"]));
    assert_eq!(drain(&ch, &q2).await, strs(&["fanned"]));
    delete_exchange(&ch, &x).await;
}

/// Many publishes in flight at once are all acked, and every confirmed
/// message is in the queue.
#[tokio::test]
async fn many_publishes_in_flight_are_all_acked() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    confirm_mode(&ch).await;
    let q = temp_queue(&ch, "inflight").await;
    const N: usize = 2000;
    let mut pending = Vec::with_capacity(N);
    for i in 0..N {
        pending.push(start_publish(&ch, "", &q, format!("m{i}").as_bytes()).await);
    }
    for (i, pc) in pending.into_iter().enumerate() {
        let c = ok("confirm", pc).await;
        assert!(c.is_ack(), "publish {i} not acked: {c:?}");
    }
    assert_eq!(counts(&ch, &q).await, (N as u32, 0));
    let all = drain(&ch, &q).await;
    assert_eq!(all.len(), N);
    assert!(
        all.iter().enumerate().all(|(i, m)| *m == format!("m{i}")),
        "messages out of order"
    );
}

/// wait_for_confirms returns once all outstanding publishes are confirmed,
/// on each confirm channel independently.
#[tokio::test]
async fn wait_for_confirms_on_several_channels() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let q = temp_queue(&ch, "multi").await;
    let mut chans = Vec::new();
    for _ in 0..3 {
        let c = channel(&conn).await;
        confirm_mode(&c).await;
        chans.push(c);
    }
    for (n, c) in chans.iter().enumerate() {
        for i in 0..100 {
            // Dropped confirms are tracked by wait_for_confirms.
            drop(start_publish(c, "", &q, format!("c{n}-{i}").as_bytes()).await);
        }
    }
    for c in &chans {
        settle(c).await;
    }
    assert_eq!(counts(&ch, &q).await.0, 300);
}

/// confirm.select is idempotent on a channel already in confirm mode.
#[tokio::test]
async fn confirm_select_twice_is_fine() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    confirm_mode(&ch).await;
    confirm_mode(&ch).await;
    let q = temp_queue(&ch, "twice").await;
    let pc = start_publish(&ch, "", &q, b"m").await;
    assert!(ok("confirm", pc).await.is_ack());
}

/// A channel cannot be both transactional and in confirm mode: confirm.select
/// on a tx channel fails with 406 PRECONDITION_FAILED.
#[tokio::test]
async fn confirm_select_on_tx_channel_is_refused() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    ok("tx.select", ch.tx_select()).await;
    let (code, text) = amqp_err(
        "confirm.select on tx channel",
        ch.confirm_select(ConfirmSelectOptions::default()),
    )
    .await;
    assert_eq!(code, 406, "{text}");
    assert!(text.starts_with("PRECONDITION_FAILED"), "{text}");
}

/// tx.select on a channel in confirm mode fails with 406 PRECONDITION_FAILED.
#[tokio::test]
async fn tx_select_on_confirm_channel_is_refused() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    confirm_mode(&ch).await;
    let (code, text) = amqp_err("tx.select on confirm channel", ch.tx_select()).await;
    assert_eq!(code, 406, "{text}");
    assert!(text.starts_with("PRECONDITION_FAILED"), "{text}");
}

/// Publishing to a missing exchange in confirm mode closes the channel with
/// 404 NOT_FOUND; the pending confirm fails instead of hanging.
#[tokio::test]
async fn publish_to_missing_exchange_fails_pending_confirm() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    confirm_mode(&ch).await;
    let missing = common::unique("missing-x");
    let pc = start_publish(&ch, &missing, "k", b"m").await;
    let (code, text) = amqp_err("confirm of publish to missing exchange", pc).await;
    assert_eq!(code, 404, "{text}");
    assert!(
        text.starts_with("NOT_FOUND") && text.contains(&missing),
        "{text}"
    );
    // The channel is gone; further calls fail.
    let r = tokio::time::timeout(
        WAIT,
        ch.queue_declare(
            "".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("call on closed channel timed out");
    assert!(r.is_err());
}
