//! Sender-selected distribution, as RabbitMQ does it: the `CC` and `BCC` headers
//! (arrays of strings) are extra routing keys; `BCC` is removed before the message
//! is kept or delivered, so no consumer learns of the other recipients; dead
//! letters go by every key, or by x-dead-letter-routing-key alone (without CC).
//! The other checks of RabbitMQ's make_message (delivery mode) are here too.

mod common;
mod support;

use std::time::Duration;

use lapin::options::*;
use lapin::types::{AMQPValue, FieldArray, LongString, ShortString};
use lapin::{BasicProperties, ExchangeKind};
use support::*;

fn keys(v: &[&str]) -> AMQPValue {
    let mut a = FieldArray::default();
    for k in v {
        a.push(AMQPValue::LongString(LongString::from(*k)));
    }
    AMQPValue::FieldArray(a)
}

async fn get_soon(ch: &lapin::Channel, q: &str) -> lapin::message::BasicGetMessage {
    for _ in 0..100 {
        if let Some(m) = get(ch, q).await {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("nothing arrived in {q}");
}

#[tokio::test]
async fn cc_and_bcc_add_routing_keys_and_bcc_never_reaches_consumers() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let x = temp_exchange(&ch, ExchangeKind::Direct, "ssd").await;
    let (qa, qb, qc) = (
        temp_queue(&ch, "to").await,
        temp_queue(&ch, "cc").await,
        temp_queue(&ch, "bcc").await,
    );
    bind(&ch, &qa, &x, "a").await;
    bind(&ch, &qb, &x, "b").await;
    bind(&ch, &qc, &x, "c").await;
    let props = BasicProperties::default().with_headers(table(&[
        ("CC", keys(&["b"])),
        ("BCC", keys(&["c"])),
        ("kept", s("yes")),
    ]));
    publish_props(&ch, &x, "a", b"memo", props).await;
    for q in [&qa, &qb, &qc] {
        let m = get_soon(&ch, q).await;
        assert_eq!(m.delivery.data, b"memo");
        let h = m.delivery.properties.headers().clone().expect("headers");
        assert_eq!(h.inner().get("CC"), Some(&keys(&["b"])), "{q}: CC stays");
        assert!(!h.contains_key("BCC"), "{q}: BCC is removed: {h:?}");
        assert_eq!(h.inner().get("kept"), Some(&s("yes")));
    }
}

#[tokio::test]
async fn cc_of_the_wrong_type_is_refused_as_rabbitmq_refuses_it() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let q = temp_queue(&ch, "badcc").await;
    confirm_mode(&ch).await;
    let props = BasicProperties::default().with_headers(table(&[("CC", s("b"))]));
    assert_eq!(
        publish_refused(&ch, &q, props).await,
        (
            406,
            "PRECONDITION_FAILED - invalid message: {unacceptable_type_in_header,\"CC\",longstr}"
                .to_string()
        )
    );
}

#[tokio::test]
async fn dead_letters_go_by_every_key_or_by_the_dead_letter_key_alone() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let src = temp_exchange(&ch, ExchangeKind::Direct, "ssd-src").await;
    let dlx = temp_exchange(&ch, ExchangeKind::Direct, "ssd-dlx").await;
    let (q_d, q_b, q_c) = (
        temp_queue(&ch, "dl-d").await,
        temp_queue(&ch, "dl-b").await,
        temp_queue(&ch, "dl-c").await,
    );
    bind(&ch, &q_d, &dlx, "d").await;
    bind(&ch, &q_b, &dlx, "b").await;
    bind(&ch, &q_c, &dlx, "c").await;
    for (dl_key, want) in [(None, vec![&q_d, &q_b, &q_c]), (Some("b"), vec![&q_b])] {
        let dying = common::unique("dying");
        let mut args = table(&[
            ("x-message-ttl", AMQPValue::LongInt(0)),
            ("x-dead-letter-exchange", s(&dlx)),
        ]);
        if let Some(k) = dl_key {
            args.insert(ShortString::from("x-dead-letter-routing-key"), s(k));
        }
        ok(
            "queue.declare",
            ch.queue_declare(
                dying.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..Default::default()
                },
                args,
            ),
        )
        .await;
        bind(&ch, &dying, &src, "d").await;
        let props = BasicProperties::default()
            .with_headers(table(&[("CC", keys(&["b"])), ("BCC", keys(&["c"]))]));
        publish_props(&ch, &src, "d", b"short-lived", props).await;
        for q in &want {
            let m = get_soon(&ch, q).await;
            let h = m.delivery.properties.headers().clone().expect("headers");
            assert!(!h.contains_key("BCC"));
            assert_eq!(
                h.contains_key("CC"),
                dl_key.is_none(),
                "CC goes only with a dead-letter routing key: {h:?}"
            );
            let Some(AMQPValue::FieldArray(deaths)) = h.inner().get("x-death") else {
                panic!("{h:?}");
            };
            let AMQPValue::FieldTable(death) = &deaths.as_slice()[0] else {
                panic!("{deaths:?}");
            };
            assert_eq!(
                death.inner().get("routing-keys"),
                Some(&keys(&["d", "b"])),
                "the publish's key and the CC keys, never BCC"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        for q in [&q_d, &q_b, &q_c] {
            assert_eq!(counts(&ch, q).await.0, 0, "{q}: nothing more");
        }
        ok(
            "queue.delete",
            ch.queue_delete(dying.as_str().into(), QueueDeleteOptions::default()),
        )
        .await;
    }
}

/// delivery_mode must be 1 or 2 (or absent), as rabbit_basic:is_message_persistent says.
#[tokio::test]
async fn delivery_mode_other_than_1_or_2_is_refused() {
    let b = common::start().await;
    let conn = connect(&b).await;
    for mode in [0u8, 3] {
        let ch = channel(&conn).await;
        let q = temp_queue(&ch, "mode").await;
        confirm_mode(&ch).await;
        let props = BasicProperties::default().with_delivery_mode(mode);
        assert_eq!(
            publish_refused(&ch, &q, props).await,
            (
                406,
                format!("PRECONDITION_FAILED - invalid message: {{delivery_mode_unknown,{mode}}}")
            )
        );
    }
}
