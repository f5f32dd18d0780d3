//! The delayed-message exchange (`x-delayed-message`), as applications use
//! RabbitMQ's plugin: a message with a positive `x-delay` header waits that many
//! milliseconds, then is routed as the exchange's `x-delayed-type` routes, with
//! `x-delay` negated. Restarts are in tests/durability.rs.

mod common;
mod support;

use std::time::{Duration, Instant};

use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, ExchangeKind};
use support::*;

async fn delayed_exchange(ch: &Channel, inner: &str) -> String {
    let name = common::unique("delayed");
    ok(
        "exchange.declare",
        ch.exchange_declare(
            name.as_str().into(),
            ExchangeKind::Custom("x-delayed-message".into()),
            ExchangeDeclareOptions::default(),
            table(&[("x-delayed-type", s(inner))]),
        ),
    )
    .await;
    name
}

fn delayed_by(ms: AMQPValue) -> BasicProperties {
    BasicProperties::default().with_headers(table(&[("x-delay", ms)]))
}

async fn publish_delayed(ch: &Channel, x: &str, key: &str, body: &str, ms: AMQPValue) {
    publish_props(ch, x, key, body.as_bytes(), delayed_by(ms)).await;
}

fn x_delay(d: &lapin::message::Delivery) -> Option<AMQPValue> {
    d.properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-delay").cloned())
}

#[tokio::test]
async fn messages_wait_their_delay_and_arrive_in_due_order() {
    let b = common::start().await;
    let (_conn, ch) = open(&b).await;
    let x = delayed_exchange(&ch, "direct").await;
    let q = temp_queue(&ch, "dq").await;
    bind(&ch, &q, &x, "k").await;
    let mut sub = consume(&ch, &q, true).await;

    let start = Instant::now();
    publish_delayed(&ch, &x, "k", "third", AMQPValue::LongInt(900)).await;
    publish_delayed(&ch, &x, "k", "first", AMQPValue::LongInt(300)).await;
    publish_delayed(&ch, &x, "k", "second", AMQPValue::LongLongInt(600)).await;
    publish(&ch, &x, "k", b"now").await;

    let now = sub.next().await;
    assert_eq!(text(&now), "now", "no x-delay: routed at once");
    assert_eq!(x_delay(&now), None);
    for (body, ms) in [("first", 300i32), ("second", 600), ("third", 900)] {
        let d = sub.next().await;
        assert_eq!(text(&d), body);
        assert!(
            start.elapsed() >= Duration::from_millis(ms as u64),
            "{body} arrived after {:?}, before its {ms} ms",
            start.elapsed()
        );
        assert_eq!(
            d.exchange.as_str(),
            x,
            "delivered as published to the exchange"
        );
        assert_eq!(d.routing_key.as_str(), "k");
        assert_eq!(
            x_delay(&d),
            Some(AMQPValue::LongInt(-ms)),
            "x-delay is negated (signedint) once the delay is over"
        );
    }
}

#[tokio::test]
async fn zero_negative_and_unreadable_delays_route_at_once() {
    let b = common::start().await;
    let (_conn, ch) = open(&b).await;
    let x = delayed_exchange(&ch, "fanout").await;
    let q = temp_queue(&ch, "dq").await;
    bind(&ch, &q, &x, "").await;
    let mut sub = consume(&ch, &q, true).await;
    for (body, ms) in [
        ("zero", AMQPValue::LongInt(0)),
        ("negative", AMQPValue::LongInt(-500)),
        ("text", s("soon")),
        ("too-long", AMQPValue::LongLongInt(1 << 33)),
        ("table", AMQPValue::FieldTable(FieldTable::default())),
    ] {
        publish_delayed(&ch, &x, "", body, ms.clone()).await;
        let d = sub.next().await;
        assert_eq!(text(&d), body);
        assert_eq!(x_delay(&d), Some(ms), "{body}: the header is left as sent");
    }
    // Digits in a string and a double count, as the plugin reads them.
    publish_delayed(&ch, &x, "", "string", s("400")).await;
    publish_delayed(&ch, &x, "", "double", AMQPValue::Double(200.7)).await;
    sub.expect_nothing(Duration::from_millis(150)).await;
    assert_eq!(texts(&sub.take(2).await), strs(&["double", "string"]));
}

#[tokio::test]
async fn it_routes_as_its_delayed_type() {
    let b = common::start().await;
    let (_conn, ch) = open(&b).await;
    let topic = delayed_exchange(&ch, "topic").await;
    let (qa, qb) = (temp_queue(&ch, "a").await, temp_queue(&ch, "b").await);
    bind(&ch, &qa, &topic, "orders.*").await;
    bind(&ch, &qb, &topic, "#.eu").await;
    publish_delayed(&ch, &topic, "orders.eu", "both", AMQPValue::LongInt(100)).await;
    publish_delayed(&ch, &topic, "orders.us", "a", AMQPValue::LongInt(100)).await;
    let mut a = consume(&ch, &qa, true).await;
    let mut bq = consume(&ch, &qb, true).await;
    assert_eq!(texts(&a.take(2).await), strs(&["both", "a"]));
    assert_eq!(text(&bq.next().await), "both");

    // A headers type checks its bindings' x-match as a headers exchange does.
    let headers = delayed_exchange(&ch, "headers").await;
    let (code, text) = amqp_err(
        "queue.bind",
        ch.queue_bind(
            qa.as_str().into(),
            headers.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            table(&[("x-match", s("some"))]),
        ),
    )
    .await;
    assert_eq!(code, 406, "{text}");
}

#[tokio::test]
async fn a_delayed_message_is_confirmed_at_once_and_never_returned() {
    let b = common::start().await;
    let (_conn, ch) = open(&b).await;
    confirm_mode(&ch).await;
    let x = delayed_exchange(&ch, "direct").await;
    let confirm = ok(
        "basic.publish",
        ch.basic_publish(
            x.as_str().into(),
            "nowhere".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"later",
            delayed_by(AMQPValue::LongInt(200)),
        ),
    )
    .await;
    let confirmation = ok("publisher confirm", confirm).await;
    assert!(
        matches!(confirmation, Confirmation::Ack(None)),
        "acked, not returned: {confirmation:?}"
    );
    // Without a delay, the same publish is unroutable and returned.
    let confirm = ok(
        "basic.publish",
        ch.basic_publish(
            x.as_str().into(),
            "nowhere".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"now",
            BasicProperties::default(),
        ),
    )
    .await;
    let confirmation = ok("publisher confirm", confirm).await;
    assert!(
        matches!(confirmation, Confirmation::Ack(Some(_))),
        "returned: {confirmation:?}"
    );
}

#[tokio::test]
async fn what_waits_goes_with_a_deleted_exchange() {
    let b = common::start().await;
    let (_conn, ch) = open(&b).await;
    let x = delayed_exchange(&ch, "direct").await;
    let q = temp_queue(&ch, "dq").await;
    bind(&ch, &q, &x, "k").await;
    publish_delayed(&ch, &x, "k", "dropped", AMQPValue::LongInt(300)).await;
    delete_exchange(&ch, &x).await;
    // The same name again, bound the same way: the old message must not come out of it.
    ok(
        "exchange.declare",
        ch.exchange_declare(
            x.as_str().into(),
            ExchangeKind::Custom("x-delayed-message".into()),
            ExchangeDeclareOptions::default(),
            table(&[("x-delayed-type", s("direct"))]),
        ),
    )
    .await;
    bind(&ch, &q, &x, "k").await;
    publish_delayed(&ch, &x, "k", "kept", AMQPValue::LongInt(400)).await;
    let mut sub = consume(&ch, &q, true).await;
    assert_eq!(text(&sub.next().await), "kept");
    sub.expect_nothing(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn dead_letters_and_exchange_bindings_reach_the_delay_too() {
    let b = common::start().await;
    let (_conn, ch) = open(&b).await;
    let x = delayed_exchange(&ch, "fanout").await;
    let q = temp_queue(&ch, "dq").await;
    bind(&ch, &q, &x, "").await;
    // An exchange-to-exchange binding: the delay happens at the delayed exchange.
    let front = temp_exchange(&ch, ExchangeKind::Fanout, "front").await;
    ok(
        "exchange.bind",
        ch.exchange_bind(
            x.as_str().into(),
            front.as_str().into(),
            "".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    let mut sub = consume(&ch, &q, true).await;
    let start = Instant::now();
    publish_delayed(&ch, &front, "", "via-binding", AMQPValue::LongInt(300)).await;
    let d = sub.next().await;
    assert_eq!(text(&d), "via-binding");
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert_eq!(
        d.exchange.as_str(),
        front,
        "the exchange it was published to"
    );

    // A rejected message dead-lettered to the delayed exchange waits as well.
    let source = common::unique("dlx-src");
    ok(
        "queue.declare",
        ch.queue_declare(
            source.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            table(&[("x-dead-letter-exchange", s(&x))]),
        ),
    )
    .await;
    publish_props(
        &ch,
        "",
        &source,
        b"dead",
        delayed_by(AMQPValue::LongInt(300)),
    )
    .await;
    let m = get(&ch, &source).await.expect("the message is there");
    let start = Instant::now();
    ok(
        "basic.reject",
        m.reject(BasicRejectOptions { requeue: false }),
    )
    .await;
    sub.expect_nothing(Duration::from_millis(150)).await;
    let d = sub.next().await;
    assert_eq!(text(&d), "dead");
    assert!(start.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn declaring_one_needs_an_existing_x_delayed_type() {
    let b = common::start().await;
    let conn = connect(&b).await;
    for (args, text) in [
        (
            FieldTable::default(),
            "PRECONDITION_FAILED - Invalid argument, 'x-delayed-type' must be an existing exchange type",
        ),
        (
            table(&[("x-delayed-type", AMQPValue::LongInt(1))]),
            "PRECONDITION_FAILED - Invalid argument, 'x-delayed-type' must be an existing exchange type",
        ),
        (
            table(&[("x-delayed-type", s("x-delayed-message"))]),
            "PRECONDITION_FAILED - Invalid argument, 'x-delayed-message' can't be used for 'x-delayed-type'",
        ),
    ] {
        let ch = channel(&conn).await;
        let (code, got) = amqp_err(
            "exchange.declare",
            ch.exchange_declare(
                common::unique("bad").as_str().into(),
                ExchangeKind::Custom("x-delayed-message".into()),
                ExchangeDeclareOptions::default(),
                args,
            ),
        )
        .await;
        assert_eq!((code, got.as_str()), (406, text));
    }
    // An unknown type is a connection error, as for the declared type itself.
    let ch = channel(&conn).await;
    let closed = closing_error(&conn);
    let _ = ch
        .exchange_declare(
            common::unique("bad").as_str().into(),
            ExchangeKind::Custom("x-delayed-message".into()),
            ExchangeDeclareOptions::default(),
            table(&[("x-delayed-type", s("nope"))]),
        )
        .await;
    assert_eq!(
        closed.await.expect("close reason"),
        (503, "COMMAND_INVALID - unknown exchange type 'nope'".into())
    );
}
