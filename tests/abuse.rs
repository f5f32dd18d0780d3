//! Client values built to break the broker's arithmetic, its dead-letter
//! bookkeeping or its transactions, through a real client (lapin). Each test is a
//! finding of the hardening review: it failed before the fix it names.

mod common;
mod raw;
mod support;

use std::time::Duration;

use lapin::options::*;
use lapin::types::{AMQPValue, FieldArray, FieldTable};
use lapin::BasicProperties;
use support::*;

async fn declare(ch: &lapin::Channel, name: &str, args: FieldTable) {
    ok(
        "queue.declare",
        ch.queue_declare(
            name.into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            args,
        ),
    )
    .await;
}

/// Reply code and text of the error a closed channel reports.
async fn closed_with<T: std::fmt::Debug>(
    what: &str,
    fut: impl std::future::Future<Output = lapin::Result<T>>,
) -> (u16, String) {
    amqp_err(what, fut).await
}

/// `expiration` of u64::MAX used to overflow the expiry deadline (a panic in debug
/// builds, an instant expiry in release). RabbitMQ refuses anything above ten years.
#[tokio::test]
async fn expiration_beyond_ten_years_is_refused_as_rabbitmq_does() {
    let b = common::start().await;
    let conn = connect(&b).await;
    for (value, why) in [
        (
            "18446744073709551615",
            "{value_too_large,18446744073709551615}",
        ),
        ("315360000001", "{value_too_large,315360000001}"),
        ("abc", "no_integer"),
        ("12abc", "{leftover_string,\"abc\"}"),
        ("-5", "{value_negative,-5}"),
    ] {
        let ch = channel(&conn).await;
        let q = temp_queue(&ch, "exp").await;
        confirm_mode(&ch).await;
        let props = BasicProperties::default().with_expiration(value.into());
        let (code, text) = publish_refused(&ch, &q, props).await;
        assert_eq!(code, 406, "{value}: {text}");
        assert_eq!(
            text,
            format!("PRECONDITION_FAILED - invalid expiration '{value}': {why}")
        );
    }
    // Ten years exactly is accepted, kept in place and consumable.
    let ch = channel(&conn).await;
    let q = temp_queue(&ch, "exp-max").await;
    publish_props(
        &ch,
        "",
        &q,
        b"far",
        BasicProperties::default().with_expiration("315360000000".into()),
    )
    .await;
    publish(&ch, "", &q, b"after").await;
    assert_eq!(drain(&ch, &q).await, strs(&["far", "after"]));
}

/// x-message-ttl and x-expires near the top of their types used to overflow.
/// A timestamp is no integer argument for RabbitMQ; the largest long is too large.
#[tokio::test]
async fn queue_ttls_near_two_to_the_64_are_refused() {
    let b = common::start().await;
    let conn = connect(&b).await;
    for key in ["x-message-ttl", "x-expires"] {
        let q = common::unique("ttl");
        for (value, term) in [
            (
                AMQPValue::Timestamp(u64::MAX),
                "\"expected integer, got timestamp\"",
            ),
            (
                AMQPValue::LongLongInt(i64::MAX),
                "{value_too_large,9223372036854775807}",
            ),
        ] {
            let ch = channel(&conn).await;
            let args = table(&[(key, value)]);
            let (code, text) = closed_with(
                "queue.declare",
                ch.queue_declare(q.as_str().into(), QueueDeclareOptions::default(), args),
            )
            .await;
            assert_eq!(code, 406);
            assert_eq!(
                text,
                format!(
                    "PRECONDITION_FAILED - invalid arg '{key}' for queue '{q}' in vhost '/': {term}"
                )
            );
        }
    }
}

/// An x-death count of i64::MAX used to overflow when the message died again.
#[tokio::test]
async fn x_death_count_saturates() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let dlq = temp_queue(&ch, "dlq").await;
    let src = common::unique("src");
    declare(
        &ch,
        &src,
        table(&[
            ("x-message-ttl", AMQPValue::LongInt(0)),
            ("x-dead-letter-exchange", s("")),
            ("x-dead-letter-routing-key", s(&dlq)),
        ]),
    )
    .await;
    let mut keys = FieldArray::default();
    keys.push(s(&src));
    let death = table(&[
        ("count", AMQPValue::LongLongInt(i64::MAX)),
        ("reason", s("expired")),
        ("queue", s(&src)),
        ("exchange", s("")),
        ("routing-keys", AMQPValue::FieldArray(keys)),
    ]);
    let mut deaths = FieldArray::default();
    deaths.push(AMQPValue::FieldTable(death));
    let headers = table(&[("x-death", AMQPValue::FieldArray(deaths))]);
    publish_props(
        &ch,
        "",
        &src,
        b"old soul",
        BasicProperties::default().with_headers(headers),
    )
    .await;
    let mut got = None;
    for _ in 0..50 {
        got = get(&ch, &dlq).await;
        if got.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = got.expect("the message is dead-lettered and consumable");
    let headers = m.delivery.properties.headers().clone().expect("headers");
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        panic!("x-death: {headers:?}");
    };
    let AMQPValue::FieldTable(first) = &deaths.as_slice()[0] else {
        panic!("{deaths:?}");
    };
    assert_eq!(
        first.inner().get("count"),
        Some(&AMQPValue::LongLongInt(i64::MAX))
    );
}

/// Two queues dead-lettering into each other by TTL form a cycle RabbitMQ drops.
/// A forged x-death entry with reason "rejected" used to switch that detection
/// off, and the message bounced between them for ever (the housekeeper spun).
#[tokio::test]
async fn forged_x_death_cannot_disable_cycle_detection() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let q1 = common::unique("cyc1");
    let q2 = common::unique("cyc2");
    for (me, other) in [(&q1, &q2), (&q2, &q1)] {
        declare(
            &ch,
            me,
            table(&[
                ("x-message-ttl", AMQPValue::LongInt(30)),
                ("x-dead-letter-exchange", s("")),
                ("x-dead-letter-routing-key", s(other)),
            ]),
        )
        .await;
    }
    let forged = table(&[("queue", s("elsewhere")), ("reason", s("rejected"))]);
    let mut deaths = FieldArray::default();
    deaths.push(AMQPValue::FieldTable(forged));
    publish_props(
        &ch,
        "",
        &q1,
        b"ping-pong",
        BasicProperties::default()
            .with_headers(table(&[("x-death", AMQPValue::FieldArray(deaths))])),
    )
    .await;
    // q1 -> q2 -> (back to q1: a cycle, dropped) within ~100 ms.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..5 {
        assert_eq!(counts(&ch, &q1).await.0 + counts(&ch, &q2).await.0, 0);
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
}

/// `tx.select; publish; basic.ack(999); tx.commit` used to route the publish and
/// then fail the commit: the ack is now refused when it arrives, as RabbitMQ does,
/// and nothing of the transaction happens.
#[tokio::test]
async fn tx_ack_of_unknown_tag_fails_before_anything_is_routed() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let q = temp_queue(&ch, "txack").await;
    let tx = channel(&conn).await;
    ok("tx.select", tx.tx_select()).await;
    publish(&tx, "", &q, b"must not appear").await;
    let _ = tx.basic_ack(999, BasicAckOptions::default()).await;
    let (code, text) = closed_with("tx.commit", tx.tx_commit()).await;
    assert_eq!(code, 406);
    assert_eq!(text, "PRECONDITION_FAILED - unknown delivery tag 999");
    assert_eq!(counts(&ch, &q).await.0, 0, "the publish was not routed");
}

/// Acks inside a rolled-back transaction leave their deliveries unacked; closing
/// the channel then requeues them.
#[tokio::test]
async fn tx_rollback_leaves_deliveries_unacked() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let q = temp_queue(&ch, "txrb").await;
    publish(&ch, "", &q, b"one").await;
    let tx = channel(&conn).await;
    ok("tx.select", tx.tx_select()).await;
    let m = get(&tx, &q).await.expect("the message");
    ok(
        "basic.ack",
        tx.basic_ack(m.delivery.delivery_tag, BasicAckOptions::default()),
    )
    .await;
    ok("tx.rollback", tx.tx_rollback()).await;
    // Still unacked: acking it again and committing works (no unknown tag).
    ok(
        "basic.ack",
        tx.basic_ack(m.delivery.delivery_tag, BasicAckOptions::default()),
    )
    .await;
    ok("tx.rollback", tx.tx_rollback()).await;
    ok("channel.close", tx.close(200, "bye".into())).await;
    assert_eq!(drain(&ch, &q).await, strs(&["one"]), "requeued on close");
}

/// A transactional publish to a missing exchange fails at the publish (404), as
/// in RabbitMQ, not halfway through the commit.
#[tokio::test]
async fn tx_publish_to_missing_exchange_fails_at_publish() {
    // Raw frames: the channel.close must come before the client says tx.commit,
    // which a client library cannot show without a race.
    let b = common::start().await;
    let mut raw = raw::handshake(&b).await;
    raw.open_channel(1).await;
    raw.send(&raw::queue_declare(1)).await;
    let ok = raw::expect_method(&mut raw.stream, 1, (50, 11)).await;
    let q = String::from_utf8_lossy(&ok.args()[1..1 + ok.args()[0] as usize]).into_owned();
    raw.send(&raw::method_frame(1, (90, 10), &[])).await;
    raw::expect_method(&mut raw.stream, 1, (90, 11)).await;
    for (exchange, body) in [("", b"first"), ("no-such-exchange", b"secnd")] {
        let mut args = 0u16.to_be_bytes().to_vec();
        raw::shortstr(&mut args, exchange);
        raw::shortstr(&mut args, if exchange.is_empty() { &q } else { "k" });
        args.push(0);
        raw.send(&raw::method_frame(1, raw::BASIC_PUBLISH, &args))
            .await;
        raw.send(&raw::content_header(1, body.len() as u64)).await;
        raw.send(&raw::body(1, body)).await;
    }
    let close = raw::expect_method(&mut raw.stream, 1, (20, 40)).await;
    let close = raw::Close::parse(close.args());
    assert_eq!(
        (close.code, close.text.as_str()),
        (
            404,
            "NOT_FOUND - no exchange 'no-such-exchange' in vhost '/'"
        )
    );
    raw.send(&raw::method_frame(1, (20, 41), &[])).await;

    raw.open_channel(2).await;
    let mut args = 0u16.to_be_bytes().to_vec();
    raw::shortstr(&mut args, &q);
    args.push(0b0000_0001); // passive
    raw::empty_table(&mut args);
    raw.send(&raw::method_frame(2, raw::QUEUE_DECLARE, &args))
        .await;
    let ok = raw::expect_method(&mut raw.stream, 2, (50, 11)).await;
    let rest = &ok.args()[1 + ok.args()[0] as usize..];
    let messages = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
    assert_eq!(messages, 0, "nothing of the transaction");
}
