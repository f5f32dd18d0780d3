//! Consuming through the lapin client: deliveries, acknowledgements
//! (ack/nack/reject, single and multiple), requeueing, round-robin,
//! basic.get, cancellation, message properties and mandatory returns.

mod common;
mod support;

use lapin::{
    options::*,
    types::{AMQPValue, DecimalValue, FieldArray, FieldTable, LongString},
    BasicProperties, Confirmation,
};
use support::*;

/// Consumer deliveries arrive in publish order with delivery tags 1, 2, 3...
/// and acked messages are gone for good.
#[tokio::test]
async fn consumer_receives_in_order_and_acks_remove_messages() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let q = temp_queue(&ch, "order").await;
    let cch = channel(&conn).await;
    let mut sub = consume(&cch, &q, false).await;
    for i in 0..5 {
        publish(&ch, "", &q, format!("m{i}").as_bytes()).await;
    }
    let ds = sub.take(5).await;
    assert_eq!(texts(&ds), strs(&["m0", "m1", "m2", "m3", "m4"]));
    assert_eq!(
        ds.iter().map(|d| d.delivery_tag).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    assert!(ds.iter().all(|d| !d.redelivered));
    assert!(ds
        .iter()
        .all(|d| d.routing_key.as_str() == q && d.exchange.as_str().is_empty()));
    for d in &ds {
        ok("basic.ack", d.ack(BasicAckOptions::default())).await;
    }
    // Had any ack been lost, closing the channel would requeue the message.
    ok("channel.close", cch.close(200, "bye".into())).await;
    assert_eq!(get_body(&ch, &q).await, None);
}

/// Delivery tags are per channel: each channel numbers its deliveries from 1.
#[tokio::test]
async fn delivery_tags_are_per_channel() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let q1 = temp_queue(&ch, "tag1").await;
    let q2 = temp_queue(&ch, "tag2").await;
    let c1 = channel(&conn).await;
    let c2 = channel(&conn).await;
    let mut s1 = consume(&c1, &q1, false).await;
    let mut s2 = consume(&c2, &q2, false).await;
    publish(&ch, "", &q1, b"a").await;
    publish(&ch, "", &q2, b"b").await;
    publish(&ch, "", &q1, b"c").await;
    assert_eq!(s1.next().await.delivery_tag, 1);
    assert_eq!(s2.next().await.delivery_tag, 1);
    assert_eq!(s1.next().await.delivery_tag, 2);
}

/// basic.ack with multiple=true acknowledges every outstanding delivery up
/// to and including the given tag, and nothing after it.
#[tokio::test]
async fn ack_multiple_acks_up_to_tag() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let q = temp_queue(&ch, "ackmulti").await;
    let cch = channel(&conn).await;
    let mut sub = consume(&cch, &q, false).await;
    for i in 0..5 {
        publish(&ch, "", &q, format!("m{i}").as_bytes()).await;
    }
    let ds = sub.take(5).await;
    ok(
        "basic.ack multiple",
        ds[2].ack(BasicAckOptions { multiple: true }),
    )
    .await;
    ok("channel.close", cch.close(200, "bye".into())).await;
    // Only the two messages after tag 3 were still unacked.
    let rest = get(&ch, &q).await.expect("m3 requeued");
    assert_eq!(rest.delivery.data, b"m3");
    assert!(rest.delivery.redelivered);
    assert_eq!(drain(&ch, &q).await, strs(&["m4"]));
}

/// basic.nack with multiple=true and requeue=true puts every outstanding
/// delivery back, in original order, flagged as redelivered.
#[tokio::test]
async fn nack_multiple_requeues_in_original_order() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let q = temp_queue(&ch, "nackmulti").await;
    let cch = channel(&conn).await;
    ok("basic.qos", cch.basic_qos(3, BasicQosOptions::default())).await;
    let mut sub = consume(&cch, &q, false).await;
    for i in 0..3 {
        publish(&ch, "", &q, format!("m{i}").as_bytes()).await;
    }
    let ds = sub.take(3).await;
    ok(
        "basic.nack multiple requeue",
        ds[2].nack(BasicNackOptions {
            multiple: true,
            requeue: true,
        }),
    )
    .await;
    let again = sub.take(3).await;
    assert_eq!(texts(&again), strs(&["m0", "m1", "m2"]));
    assert!(again.iter().all(|d| d.redelivered));
    assert_eq!(
        again.iter().map(|d| d.delivery_tag).collect::<Vec<_>>(),
        vec![4, 5, 6],
        "redeliveries get fresh delivery tags"
    );
    for d in &again {
        ok("basic.ack", d.ack(BasicAckOptions::default())).await;
    }
}

/// basic.reject and basic.nack with requeue=false discard the message.
#[tokio::test]
async fn reject_and_nack_without_requeue_discard() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let q = temp_queue(&ch, "discard").await;
    let cch = channel(&conn).await;
    let mut sub = consume(&cch, &q, false).await;
    for i in 0..4 {
        publish(&ch, "", &q, format!("m{i}").as_bytes()).await;
    }
    let ds = sub.take(4).await;
    ok(
        "basic.reject",
        ds[0].reject(BasicRejectOptions { requeue: false }),
    )
    .await;
    ok(
        "basic.nack multiple",
        ds[2].nack(BasicNackOptions {
            multiple: true,
            requeue: false,
        }),
    )
    .await;
    ok(
        "basic.nack",
        ds[3].nack(BasicNackOptions {
            multiple: false,
            requeue: false,
        }),
    )
    .await;
    sub.expect_nothing(QUIET).await;
    ok("channel.close", cch.close(200, "bye".into())).await;
    assert_eq!(get_body(&ch, &q).await, None);
}

/// A requeued message goes back to its original place in the queue (ahead
/// of messages published after it), marked redelivered.
#[tokio::test]
async fn requeue_keeps_original_position_and_sets_redelivered() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let q = temp_queue(&ch, "position").await;
    for i in 0..4 {
        publish(&ch, "", &q, format!("m{i}").as_bytes()).await;
    }
    let m0 = get(&ch, &q).await.expect("m0");
    let m1 = get(&ch, &q).await.expect("m1");
    assert_eq!(m0.delivery.data, b"m0");
    assert_eq!(m1.delivery.data, b"m1");
    ok(
        "reject m1",
        m1.delivery.reject(BasicRejectOptions { requeue: true }),
    )
    .await;
    ok(
        "reject m0",
        m0.delivery.reject(BasicRejectOptions { requeue: true }),
    )
    .await;
    let mut seen = Vec::new();
    while let Some(m) = get(&ch, &q).await {
        seen.push((
            String::from_utf8(m.delivery.data.clone()).unwrap(),
            m.delivery.redelivered,
        ));
        ok("ack", m.delivery.ack(BasicAckOptions::default())).await;
    }
    assert_eq!(
        seen,
        vec![
            ("m0".to_string(), true),
            ("m1".to_string(), true),
            ("m2".to_string(), false),
            ("m3".to_string(), false),
        ]
    );
}

/// Several consumers on one queue share its messages round-robin.
#[tokio::test]
async fn consumers_on_one_queue_share_round_robin() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let q = temp_queue(&ch, "rr").await;
    let c1 = channel(&conn).await;
    let c2 = channel(&conn).await;
    let c3 = channel(&conn).await;
    let mut s1 = consume(&c1, &q, true).await;
    let mut s2 = consume(&c2, &q, true).await;
    let mut s3 = consume(&c3, &q, true).await;
    for i in 0..9 {
        publish(&ch, "", &q, format!("m{i}").as_bytes()).await;
    }
    let a = texts(&s1.take(3).await);
    let b2 = texts(&s2.take(3).await);
    let c = texts(&s3.take(3).await);
    assert_eq!(a, strs(&["m0", "m3", "m6"]));
    assert_eq!(b2, strs(&["m1", "m4", "m7"]));
    assert_eq!(c, strs(&["m2", "m5", "m8"]));
    s1.expect_nothing(QUIET).await;
}

/// basic.get returns one message at a time with the count of messages left,
/// and get-empty (None) once the queue is empty.
#[tokio::test]
async fn basic_get_returns_remaining_count_then_empty() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let q = temp_queue(&ch, "get").await;
    assert!(get(&ch, &q).await.is_none(), "fresh queue is empty");
    for i in 0..3 {
        publish(&ch, "", &q, format!("m{i}").as_bytes()).await;
    }
    for (i, left) in [(0, 2), (1, 1), (2, 0)] {
        let m = get(&ch, &q).await.expect("message");
        assert_eq!(m.delivery.data, format!("m{i}").as_bytes());
        assert_eq!(m.message_count, left);
        assert_eq!(m.delivery.delivery_tag, i as u64 + 1);
        ok("ack", m.delivery.ack(BasicAckOptions::default())).await;
    }
    assert!(get(&ch, &q).await.is_none());
}

/// basic.get without no-ack leaves the message unacked; closing the channel
/// returns it to the queue as redelivered. With no-ack it is gone at once.
#[tokio::test]
async fn basic_get_ack_modes() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    confirm_mode(&ch).await;
    let q = temp_queue(&ch, "getack").await;
    publish(&ch, "", &q, b"kept").await;
    publish(&ch, "", &q, b"taken").await;
    settle(&ch).await;
    let g = channel(&conn).await;
    let m = get(&g, &q).await.expect("kept");
    assert_eq!(m.delivery.data, b"kept");
    assert_eq!(get_body(&g, &q).await.as_deref(), Some(&b"taken"[..]));
    ok("channel.close", g.close(200, "bye".into())).await;
    let back = get(&ch, &q).await.expect("unacked get requeued on close");
    assert_eq!(back.delivery.data, b"kept");
    assert!(back.delivery.redelivered);
    ok("ack", back.delivery.ack(BasicAckOptions::default())).await;
    assert!(get(&ch, &q).await.is_none(), "no-ack get must not requeue");
}

/// A no-ack consumer's deliveries count as acknowledged on sending: nothing
/// comes back when its channel closes.
#[tokio::test]
async fn no_ack_consumer_messages_are_not_requeued() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let q = temp_queue(&ch, "noack").await;
    let cch = channel(&conn).await;
    let mut sub = consume(&cch, &q, true).await;
    for i in 0..3 {
        publish(&ch, "", &q, format!("m{i}").as_bytes()).await;
    }
    assert_eq!(texts(&sub.take(3).await), strs(&["m0", "m1", "m2"]));
    ok("channel.close", cch.close(200, "bye".into())).await;
    assert_eq!(counts(&ch, &q).await, (0, 0));
    assert!(get(&ch, &q).await.is_none());
}

/// basic.cancel stops deliveries to that consumer; later messages stay in
/// the queue, and messages already delivered can still be acked.
#[tokio::test]
async fn cancel_stops_deliveries() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let q = temp_queue(&ch, "cancel").await;
    let cch = channel(&conn).await;
    let mut sub = consume_opts(&cch, &q, "my-tag", BasicConsumeOptions::default()).await;
    assert_eq!(sub.tag(), "my-tag");
    publish(&ch, "", &q, b"before").await;
    let d = sub.next().await;
    ok(
        "basic.cancel",
        cch.basic_cancel("my-tag".into(), BasicCancelOptions::default()),
    )
    .await;
    sub.cancelled().await;
    ok("ack after cancel", d.ack(BasicAckOptions::default())).await;
    publish(&ch, "", &q, b"after").await;
    assert_eq!(drain(&ch, &q).await, strs(&["after"]));
    assert_eq!(counts(&ch, &q).await, (0, 0));
}

/// Without a consumer tag the server picks one ("amq.ctag-...").
#[tokio::test]
async fn server_generates_consumer_tags() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let q = temp_queue(&ch, "ctag").await;
    let s1 = consume(&ch, &q, false).await;
    let s2 = consume(&ch, &q, false).await;
    assert!(s1.tag().starts_with("amq.ctag-"), "{}", s1.tag());
    assert!(s2.tag().starts_with("amq.ctag-"), "{}", s2.tag());
    assert_ne!(s1.tag(), s2.tag());
}

/// An exclusive consumer excludes others: a second consume on the queue fails
/// with 403 ACCESS_REFUSED, and an exclusive consume on a queue that already
/// has a consumer fails likewise.
#[tokio::test]
async fn exclusive_consumer_excludes_others() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let q = temp_queue(&ch, "exclusive-consumer").await;
    let _only = consume_opts(
        &ch,
        &q,
        "",
        BasicConsumeOptions {
            exclusive: true,
            ..Default::default()
        },
    )
    .await;
    let other = channel(&conn).await;
    let (code, text) = amqp_err(
        "second consumer",
        other.basic_consume(
            q.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_eq!(code, 403, "{text}");
    assert!(text.starts_with("ACCESS_REFUSED"), "{text}");

    let q2 = temp_queue(&ch, "shared").await;
    let _plain = consume(&ch, &q2, false).await;
    let other = channel(&conn).await;
    let (code, text) = amqp_err(
        "exclusive consume on used queue",
        other.basic_consume(
            q2.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
    assert_eq!(code, 403, "{text}");
    assert!(text.starts_with("ACCESS_REFUSED"), "{text}");
}

/// Deleting a queue that has consumers sends them basic.cancel from the
/// server (consumer_cancel_notify); their channel stays open.
#[tokio::test]
async fn deleting_consumed_queue_cancels_consumer() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let q = common::unique("doomed");
    ok(
        "queue.declare",
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    let cch = channel(&conn).await;
    let mut sub = consume(&cch, &q, false).await;
    ok(
        "queue.delete",
        ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()),
    )
    .await;
    sub.cancelled().await;
    // The consumer's channel is still usable.
    let q2 = temp_queue(&cch, "still-open").await;
    publish(&cch, "", &q2, b"ok").await;
    assert_eq!(drain(&cch, &q2).await, strs(&["ok"]));
}

/// Closing a channel requeues its unacked deliveries, in their original
/// order and flagged redelivered, for other consumers.
#[tokio::test]
async fn unacked_messages_requeued_when_channel_closes() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let q = temp_queue(&ch, "requeue-close").await;
    for i in 0..4 {
        publish(&ch, "", &q, format!("m{i}").as_bytes()).await;
    }
    let first = channel(&conn).await;
    let mut s1 = consume(&first, &q, false).await;
    let got = s1.take(4).await;
    ok("ack m1", got[1].ack(BasicAckOptions::default())).await;
    ok("channel.close", first.close(200, "bye".into())).await;

    let second = channel(&conn).await;
    let mut s2 = consume(&second, &q, false).await;
    let again = s2.take(3).await;
    assert_eq!(texts(&again), strs(&["m0", "m2", "m3"]));
    assert!(again.iter().all(|d| d.redelivered));
    s2.expect_nothing(QUIET).await;
}

/// Every basic property and every field-table value type in the headers
/// reaches the consumer exactly as published; empty and multi-frame bodies
/// arrive intact.
#[tokio::test]
async fn properties_headers_and_bodies_arrive_as_published() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let q = temp_queue(&ch, "props").await;
    let mut sub = consume(&ch, &q, true).await;

    let mut nested = FieldTable::default();
    nested.insert(
        "inner".into(),
        AMQPValue::LongString(LongString::from("deep")),
    );
    nested.insert("n".into(), AMQPValue::LongInt(-7));
    let mut headers = FieldTable::default();
    let entries: Vec<(&str, AMQPValue)> = vec![
        ("bool", AMQPValue::Boolean(true)),
        ("i8", AMQPValue::ShortShortInt(-8)),
        ("u8", AMQPValue::ShortShortUInt(200)),
        ("i16", AMQPValue::ShortInt(-1600)),
        ("u16", AMQPValue::ShortUInt(60000)),
        ("i32", AMQPValue::LongInt(-320_000)),
        ("u32", AMQPValue::LongUInt(4_000_000_000)),
        ("i64", AMQPValue::LongLongInt(-6_400_000_000)),
        ("f32", AMQPValue::Float(1.5)),
        ("f64", AMQPValue::Double(-2.25)),
        (
            "decimal",
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 12345,
            }),
        ),
        (
            "string",
            AMQPValue::LongString(LongString::from("héllo wörld")),
        ),
        (
            "array",
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::LongInt(1),
                AMQPValue::LongString(LongString::from("two")),
                AMQPValue::Boolean(false),
            ])),
        ),
        ("timestamp", AMQPValue::Timestamp(1_700_000_000)),
        ("table", AMQPValue::FieldTable(nested)),
        ("bytes", AMQPValue::ByteArray(vec![0u8, 1, 2, 255].into())),
        ("void", AMQPValue::Void),
    ];
    for (k, v) in entries {
        headers.insert(k.into(), v);
    }
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("gzip".into())
        .with_headers(headers)
        .with_delivery_mode(2)
        .with_priority(5)
        .with_correlation_id("corr-1".into())
        .with_reply_to("reply-queue".into())
        .with_expiration("600000".into())
        .with_message_id("msg-1".into())
        .with_timestamp(1_600_000_000)
        .with_type("order.created".into())
        .with_user_id("guest".into())
        .with_app_id("warren-tests".into());
    publish_props(&ch, "", &q, b"{\"k\":1}", props.clone()).await;
    let d = sub.next().await;
    assert_eq!(d.data, b"{\"k\":1}");
    assert_eq!(d.properties, props);

    // No properties at all stay absent.
    publish(&ch, "", &q, b"bare").await;
    let d = sub.next().await;
    assert_eq!(d.properties, BasicProperties::default());

    // Empty body.
    publish(&ch, "", &q, b"").await;
    assert!(sub.next().await.data.is_empty());

    // A body much larger than the negotiated frame size.
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    publish(&ch, "", &q, &big).await;
    let d = sub.next().await;
    assert_eq!(d.data.len(), big.len());
    assert!(d.data == big, "large body corrupted");
}

/// A mandatory message that no queue takes is returned with basic.return
/// 312 NO_ROUTE, carrying its body and properties; a routable mandatory
/// message and an unroutable non-mandatory one are not returned.
#[tokio::test]
async fn mandatory_unroutable_message_is_returned_no_route() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    confirm_mode(&ch).await;
    let q = temp_queue(&ch, "mandatory").await;
    let nowhere = common::unique("nowhere");
    let props = BasicProperties::default().with_message_id("m-42".into());

    let conf = ok("publish mandatory unroutable", async {
        ch.basic_publish(
            "amq.direct".into(),
            nowhere.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"bounce",
            props.clone(),
        )
        .await?
        .await
    })
    .await;
    let ret = match conf {
        Confirmation::Ack(Some(ret)) => ret,
        other => panic!("expected an ack carrying the returned message, got {other:?}"),
    };
    assert_eq!(ret.reply_code, 312);
    assert_eq!(ret.reply_text.as_str(), "NO_ROUTE");
    assert_eq!(ret.delivery.exchange.as_str(), "amq.direct");
    assert_eq!(ret.delivery.routing_key.as_str(), nowhere);
    assert_eq!(ret.delivery.data, b"bounce");
    assert_eq!(ret.delivery.properties, props);

    for (key, mandatory) in [(q.as_str(), true), (nowhere.as_str(), false)] {
        let conf = ok("publish", async {
            ch.basic_publish(
                "".into(),
                key.into(),
                BasicPublishOptions {
                    mandatory,
                    ..Default::default()
                },
                b"x",
                BasicProperties::default(),
            )
            .await?
            .await
        })
        .await;
        assert_eq!(
            conf,
            Confirmation::Ack(None),
            "key {key} mandatory {mandatory}"
        );
    }
    assert_eq!(drain(&ch, &q).await, strs(&["x"]));
}

/// basic.recover with requeue=true redelivers all unacked messages of the
/// channel, flagged redelivered.
#[tokio::test]
async fn recover_requeues_unacked() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let q = temp_queue(&ch, "recover").await;
    let cch = channel(&conn).await;
    let mut sub = consume(&cch, &q, false).await;
    publish(&ch, "", &q, b"a").await;
    publish(&ch, "", &q, b"b").await;
    let first = sub.take(2).await;
    assert!(first.iter().all(|d| !d.redelivered));
    ok(
        "basic.recover",
        cch.basic_recover(BasicRecoverOptions { requeue: true }),
    )
    .await;
    let again = sub.take(2).await;
    assert_eq!(texts(&again), strs(&["a", "b"]));
    assert!(again.iter().all(|d| d.redelivered));
}
