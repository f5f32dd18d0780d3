//! Corners where clients see RabbitMQ 3.10.8's exact behaviour, texts included.
//! Each test names the rule behind its case, and each runs unchanged against the
//! real thing, which is how they were checked:
//!
//!     WARRENMQ_TEST_EXTERNAL=127.0.0.1:5672 cargo test --test parity --test header_order
//!
//! runs them against a RabbitMQ on that port (guest/guest) instead of an
//! in-process WarrenMQ; both must pass. Waits are for a broker's asynchrony
//! (confirms before counting, a get retried until the message is there), never
//! for WarrenMQ's. The consumer-timeout test needs a configured timeout, so it
//! runs on WarrenMQ only (RabbitMQ's default is 30 minutes).

mod common;
mod support;

use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicQosOptions, ExchangeBindOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, ExchangeKind};

use support::{amqp_err, table};

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v))
}

/// basic.get until a message comes (a broker may take a moment to requeue, or,
/// as RabbitMQ's quorum queues, to commit).
async fn get_soon(ch: &lapin::Channel, q: &str) -> lapin::message::BasicGetMessage {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if let Some(m) = support::get(ch, q).await {
            return m;
        }
        assert!(std::time::Instant::now() < deadline, "nothing in {q}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Publishes on a confirm-mode channel and waits for the confirm: the message
/// is in its queues when this returns, on any broker.
async fn publish_confirmed(
    ch: &lapin::Channel,
    x: &str,
    key: &str,
    body: &[u8],
    props: BasicProperties,
) {
    support::publish_props(ch, x, key, body, props).await;
    support::ok("confirms", ch.wait_for_confirms()).await;
}

async fn declare_with(ch: &lapin::Channel, name: &str, args: FieldTable) -> lapin::Result<()> {
    ch.queue_declare(name.into(), QueueDeclareOptions::default(), args)
        .await
        .map(|_| ())
}

/// A binding names its source first: with both ends missing, RabbitMQ's 404 is
/// about the exchange bound from (rabbit_binding looks the source up first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binding_with_both_ends_missing_names_the_source() {
    let b = common::start().await;
    let conn = support::connect(&b).await;
    let ch = support::channel(&conn).await;
    let err = amqp_err(
        "exchange.bind",
        ch.exchange_bind(
            "p-nodest".into(),
            "p-nosrc".into(),
            "".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_eq!(
        err,
        (404, "NOT_FOUND - no exchange 'p-nosrc' in vhost '/'".into())
    );
    let ch = support::channel(&conn).await;
    let err = amqp_err(
        "queue.bind",
        ch.queue_bind(
            "p-noq".into(),
            "p-nox".into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_eq!(
        err,
        (404, "NOT_FOUND - no exchange 'p-nox' in vhost '/'".into())
    );
}

/// Integer arguments are checked by type as RabbitMQ's check_int_arg does (a
/// timestamp is no integer), and its error terms are printed as Erlang prints
/// them: a string in double quotes, a tuple or an atom bare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_arguments_are_refused_with_rabbitmqs_terms() {
    let b = common::start().await;
    let conn = support::connect(&b).await;
    let cases: Vec<(&str, AMQPValue, String)> = vec![
        (
            "x-max-length",
            s("ten"),
            "\"expected integer, got longstr\"".into(),
        ),
        (
            "x-message-ttl",
            AMQPValue::Double(1.5),
            "\"expected integer, got double\"".into(),
        ),
        (
            "x-max-length",
            AMQPValue::Timestamp(5),
            "\"expected integer, got timestamp\"".into(),
        ),
        (
            "x-max-priority",
            AMQPValue::LongInt(300),
            "{max_value_exceeded,300}".into(),
        ),
        ("x-overflow", s("bogus"), "invalid_overflow".into()),
        (
            "x-queue-mode",
            s("bogus"),
            "\"unsupported queue mode 'bogus'\"".into(),
        ),
    ];
    for (key, value, term) in cases {
        let ch = support::channel(&conn).await;
        let err = amqp_err(key, declare_with(&ch, "p-args", table(&[(key, value)]))).await;
        assert_eq!(
            err,
            (
                406,
                format!("PRECONDITION_FAILED - invalid arg '{key}' for queue 'p-args' in vhost '/': {term}")
            )
        );
    }
    // The dead-letter exchange's type is rabbit_channel's check, with its own text.
    let ch = support::channel(&conn).await;
    let err = amqp_err(
        "x-dead-letter-exchange",
        declare_with(
            &ch,
            "p-args",
            table(&[("x-dead-letter-exchange", AMQPValue::LongInt(1))]),
        ),
    )
    .await;
    assert_eq!(
        err,
        (
            406,
            "PRECONDITION_FAILED - invalid type 'signedint' for arg 'x-dead-letter-exchange' in queue 'p-args' in vhost '/'".into()
        )
    );
}

/// Inequivalent booleans read as Erlang writes them: 'true', not a Rust value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inequivalent_single_active_consumer_is_named_as_rabbitmq_names_it() {
    let b = common::start().await;
    let conn = support::connect(&b).await;
    let ch = support::channel(&conn).await;
    let sac = |on: bool| table(&[("x-single-active-consumer", AMQPValue::Boolean(on))]);
    declare_with(&ch, "p-sac", sac(true))
        .await
        .expect("declare");
    let err = amqp_err("redeclare", declare_with(&ch, "p-sac", sac(false))).await;
    assert_eq!(
        err,
        (
            406,
            "PRECONDITION_FAILED - inequivalent arg 'x-single-active-consumer' for queue 'p-sac' in vhost '/': received 'false' but current is 'true'".into()
        )
    );
    let ch = support::channel(&conn).await;
    let err = amqp_err(
        "redeclare",
        declare_with(&ch, "p-sac", FieldTable::default()),
    )
    .await;
    assert_eq!(
        err,
        (
            406,
            "PRECONDITION_FAILED - inequivalent arg 'x-single-active-consumer' for queue 'p-sac' in vhost '/': received none but current is the value 'true' of type 'bool'".into()
        )
    );
}

/// Consume arguments are checked (rabbit_amqqueue's consume_args), and an
/// exchange's alternate-exchange must be a string (rabbit_channel).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_and_exchange_arguments_of_the_wrong_type_are_refused() {
    let b = common::start().await;
    let conn = support::connect(&b).await;
    let ch = support::channel(&conn).await;
    let q = support::temp_queue(&ch, "p-prio").await;
    let err = amqp_err(
        "basic.consume",
        ch.basic_consume(
            q.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            table(&[("x-priority", s("high"))]),
        ),
    )
    .await;
    assert_eq!(
        err,
        (
            406,
            format!("PRECONDITION_FAILED - invalid arg 'x-priority' for queue '{q}' in vhost '/': \"expected integer, got longstr\"")
        )
    );
    let ch = support::channel(&conn).await;
    let err = amqp_err(
        "basic.consume",
        ch.basic_consume(
            q.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            table(&[("x-stream-offset", s("first"))]),
        ),
    )
    .await;
    assert_eq!(
        err,
        (
            406,
            format!("PRECONDITION_FAILED - invalid arg 'x-stream-offset' for queue '{q}' in vhost '/' of queue type rabbit_classic_queue")
        )
    );
    let ch = support::channel(&conn).await;
    let err = amqp_err(
        "exchange.declare",
        ch.exchange_declare(
            "p-ae".into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            table(&[("alternate-exchange", AMQPValue::LongInt(7))]),
        ),
    )
    .await;
    assert_eq!(
        err,
        (
            406,
            "PRECONDITION_FAILED - invalid type 'signedint' for arg 'alternate-exchange' in exchange 'p-ae' in vhost '/'".into()
        )
    );
    // Refused means not created.
    let ch = support::channel(&conn).await;
    let err = amqp_err(
        "passive declare",
        ch.exchange_declare(
            "p-ae".into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
    assert_eq!(err.0, 404);
    let ch = support::channel(&conn).await;
    let x = support::temp_exchange(&ch, ExchangeKind::Headers, "p-hx").await;
    let err = amqp_err(
        "queue.bind",
        ch.queue_bind(
            q.as_str().into(),
            x.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            table(&[("x-match", AMQPValue::LongInt(1))]),
        ),
    )
    .await;
    assert_eq!(
        err,
        (
            406,
            "PRECONDITION_FAILED - Invalid x-match field type signedint (value 1); expected longstr".into()
        )
    );
}

/// RabbitMQ attempts delivery before applying x-max-length: with a limit of 0 a
/// waiting consumer still gets each message; without one it is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_length_limit_still_feeds_a_waiting_consumer() {
    let b = common::start().await;
    let conn = support::connect(&b).await;
    let ch = support::channel(&conn).await;
    let q = common::unique("p-zero");
    declare_with(&ch, &q, table(&[("x-max-length", AMQPValue::LongInt(0))]))
        .await
        .expect("declare");
    support::publish(&ch, "", &q, b"nobody waits").await;
    assert_eq!(
        support::counts(&ch, &q).await.0,
        0,
        "dropped without a consumer"
    );
    let mut sub = support::consume(&ch, &q, true).await;
    support::publish(&ch, "", &q, b"someone waits").await;
    assert_eq!(support::text(&sub.next().await), "someone waits");
}

/// Messages put back under a drop-head length limit count against it at once:
/// the oldest, those just requeued, are dropped, as in RabbitMQ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeued_messages_count_against_a_drop_head_limit() {
    let b = common::start().await;
    let conn = support::connect(&b).await;
    let ch = support::channel(&conn).await;
    let q = common::unique("p-requeue");
    declare_with(&ch, &q, table(&[("x-max-length", AMQPValue::LongInt(2))]))
        .await
        .expect("declare");
    support::ok("basic.qos", ch.basic_qos(2, BasicQosOptions::default())).await;
    let mut sub = support::consume(&ch, &q, false).await;
    for m in ["m1", "m2"] {
        support::publish(&ch, "", &q, m.as_bytes()).await;
    }
    let held = sub.take(2).await;
    for m in ["m3", "m4"] {
        support::publish(&ch, "", &q, m.as_bytes()).await;
    }
    support::ok(
        "basic.nack",
        held[1].nack(BasicNackOptions {
            multiple: true,
            requeue: true,
        }),
    )
    .await;
    let next = sub.take(2).await;
    assert_eq!(support::texts(&next), ["m3", "m4"]);
    assert!(next.iter().all(|d| !d.redelivered));
}

/// basic.get-ok's message_count leaves out expired messages now at the head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_ok_counts_what_is_left_after_expired_heads_are_dropped() {
    let b = common::start().await;
    let conn = support::connect(&b).await;
    let ch = support::channel(&conn).await;
    let q = support::temp_queue(&ch, "p-ttl").await;
    support::publish(&ch, "", &q, b"lasting").await;
    support::publish_props(
        &ch,
        "",
        &q,
        b"fleeting",
        BasicProperties::default().with_expiration("10".into()),
    )
    .await;
    support::publish(&ch, "", &q, b"last").await;
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let got = support::ok(
        "basic.get",
        ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: true }),
    )
    .await
    .expect("a message");
    assert_eq!(got.delivery.data, b"lasting");
    assert_eq!(got.message_count, 1);
}

/// A headers binding matches as Erlang's `==` compares the decoded values:
/// numbers by value across widths and kinds, a long string and a byte array by
/// their bytes, a boolean never equal to a number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_match_numbers_and_strings_by_value_across_types() {
    use lapin::types::ByteArray;
    let b = common::start().await;
    let conn = support::connect(&b).await;
    let ch = support::channel(&conn).await;
    let x = support::temp_exchange(&ch, ExchangeKind::Headers, "p-hdr").await;
    support::confirm_mode(&ch).await;
    let cases: Vec<(&str, AMQPValue, AMQPValue, bool)> = vec![
        (
            "int-double",
            AMQPValue::LongInt(1),
            AMQPValue::Double(1.0),
            true,
        ),
        (
            "double-int",
            AMQPValue::Double(2.0),
            AMQPValue::ShortShortInt(2),
            true,
        ),
        (
            "float-double",
            AMQPValue::Float(1.5),
            AMQPValue::Double(1.5),
            true,
        ),
        (
            "short-long",
            AMQPValue::ShortInt(7),
            AMQPValue::LongLongInt(7),
            true,
        ),
        (
            "string-bytes",
            s("1"),
            AMQPValue::ByteArray(ByteArray::from(b"1".to_vec())),
            true,
        ),
        (
            "bool-int",
            AMQPValue::Boolean(true),
            AMQPValue::LongInt(1),
            false,
        ),
        (
            "int-double-other",
            AMQPValue::LongInt(1),
            AMQPValue::Double(1.25),
            false,
        ),
    ];
    for (name, bound, sent, routed) in cases {
        let q = support::temp_queue(&ch, name).await;
        support::bind_args(&ch, &q, &x, "", table(&[("k", bound)])).await;
        publish_confirmed(
            &ch,
            &x,
            "",
            name.as_bytes(),
            BasicProperties::default().with_headers(table(&[("k", sent)])),
        )
        .await;
        let held = support::counts(&ch, &q).await.0;
        assert_eq!(held == 1, routed, "{name}: {held} message(s) routed");
        support::ok(
            "queue.delete",
            ch.queue_delete(q.as_str().into(), Default::default()),
        )
        .await;
    }
}

/// Every declare of a direct reply-to name is passive, as in RabbitMQ: the
/// pseudo-queue exists with one consumer whoever asks; a live reply queue's full
/// name exists with its one consumer; any other name under the prefix is a 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_reply_to_names_declare_as_rabbitmq_declares_them() {
    let b = common::start().await;
    let conn = support::connect(&b).await;
    let ch = support::channel(&conn).await;
    for passive in [true, false] {
        let ok = support::ok(
            "queue.declare",
            ch.queue_declare(
                "amq.rabbitmq.reply-to".into(),
                QueueDeclareOptions {
                    passive,
                    ..Default::default()
                },
                FieldTable::default(),
            ),
        )
        .await;
        assert_eq!((ok.message_count(), ok.consumer_count()), (0, 1));
    }
    // A requester consumes its replies; the server learns the full name.
    let requester = support::channel(&conn).await;
    let mut replies = support::consume(&requester, "amq.rabbitmq.reply-to", true).await;
    let work = support::temp_queue(&ch, "p-rpc").await;
    support::publish_props(
        &requester,
        "",
        &work,
        b"ask",
        BasicProperties::default().with_reply_to("amq.rabbitmq.reply-to".into()),
    )
    .await;
    let asked = get_soon(&ch, &work).await;
    let full = asked
        .delivery
        .properties
        .reply_to()
        .clone()
        .expect("a reply-to name")
        .to_string();
    assert!(full.starts_with("amq.rabbitmq.reply-to."), "{full}");
    let ok = support::ok(
        "queue.declare",
        ch.queue_declare(
            full.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
    assert_eq!(ok.consumer_count(), 1);
    // Replies carry the channel's next delivery tag without taking it: two
    // replies are both tag 1; a delivery from a queue then takes 1, and the next
    // reply is 2.
    let other = support::temp_queue(&ch, "p-rpc-other").await;
    let mut others = support::consume(&requester, &other, true).await;
    for body in [&b"one"[..], b"two"] {
        support::publish(&ch, "", &full, body).await;
        assert_eq!(replies.next().await.delivery_tag, 1);
    }
    support::publish(&ch, "", &other, b"from a queue").await;
    assert_eq!(others.next().await.delivery_tag, 1);
    support::publish(&ch, "", &full, b"three").await;
    assert_eq!(replies.next().await.delivery_tag, 2);
    let err = amqp_err(
        "queue.declare",
        ch.queue_declare(
            "amq.rabbitmq.reply-to.bogus".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_eq!(
        err,
        (
            404,
            "NOT_FOUND - no queue 'amq.rabbitmq.reply-to.bogus' in vhost '/'".into()
        )
    );
}

/// RabbitMQ's consumer_timeout: a delivery left unacknowledged longer than the
/// timeout closes its channel with 406 and RabbitMQ's text, and the delivery goes
/// back to its queue for another consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overdue_acknowledgement_closes_the_channel_and_requeues() {
    let mut config = warrenmq::Config {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        data_dir: common::temp_data_dir(),
        ..warrenmq::Config::default()
    };
    config.limits.consumer_timeout = 1000;
    let b = warrenmq::start(config).await.expect("starts");
    let conn = support::connect_url(&format!("amqp://guest:guest@{}/%2f", b.local_addr())).await;
    let ch = support::channel(&conn).await;
    let q = common::unique("p-timeout");
    declare_with(&ch, &q, FieldTable::default())
        .await
        .expect("declare");
    let slow = support::channel(&conn).await;
    let mut sub = support::consume(&slow, &q, false).await;
    support::publish(&ch, "", &q, b"take your time").await;
    let held = sub.next().await;
    assert!(!held.redelivered);
    // Held past the timeout: the channel closes (checked twice a timeout).
    let err = sub.channel_closed().await;
    assert_eq!(
        err,
        (
            406,
            format!(
                "PRECONDITION_FAILED - delivery acknowledgement on channel {} timed out. Timeout value used: 1000 ms. This timeout value can be configured, see consumers doc guide to learn more",
                slow.id()
            )
        )
    );
    let again = support::get(&ch, &q)
        .await
        .expect("the delivery went back to the queue");
    assert!(again.delivery.redelivered);
    b.shutdown().await;
}

/// Quorum queues' delivery limit (rabbit_fifo): each time a delivery comes back
/// its count grows and shows as x-delivery-count (basic.get shows it from 0);
/// past x-delivery-limit the message is dead-lettered with reason
/// delivery_limit. A classic queue refuses the argument as RabbitMQ does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_queue_dead_letters_past_its_delivery_limit() {
    let b = common::start().await;
    let conn = support::connect(&b).await;
    let ch = support::channel(&conn).await;
    let dead = support::temp_queue(&ch, "p-dl-dead").await;
    let q = common::unique("p-dl");
    support::ok(
        "queue.declare",
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            table(&[
                ("x-queue-type", s("quorum")),
                ("x-delivery-limit", AMQPValue::LongInt(2)),
                ("x-dead-letter-exchange", s("")),
                ("x-dead-letter-routing-key", s(&dead)),
            ]),
        ),
    )
    .await;
    support::confirm_mode(&ch).await;
    publish_confirmed(&ch, "", &q, b"poison", BasicProperties::default()).await;
    let count = |m: &lapin::message::BasicGetMessage| {
        m.delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-delivery-count").cloned())
    };
    for expected in 0..=2i64 {
        let m = get_soon(&ch, &q).await;
        assert_eq!(count(&m), Some(AMQPValue::LongLongInt(expected)));
        support::ok(
            "basic.nack",
            m.nack(BasicNackOptions {
                multiple: false,
                requeue: true,
            }),
        )
        .await;
    }
    // The third return is past the limit of 2.
    let m = get_soon(&ch, &dead).await;
    assert!(support::get(&ch, &q).await.is_none(), "left the queue");
    let headers = m.delivery.properties.headers().clone().expect("headers");
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        panic!("no x-death: {headers:?}");
    };
    let AMQPValue::FieldTable(first) = &deaths.as_slice()[0] else {
        panic!("{deaths:?}");
    };
    assert_eq!(first.inner().get("reason"), Some(&s("delivery_limit")));
    support::ok(
        "queue.delete",
        ch.queue_delete(q.as_str().into(), Default::default()),
    )
    .await;

    // rabbit_quorum_queue's property checks: auto-delete, then exclusive-owner.
    for (exclusive, auto_delete, prop) in [
        (true, false, "exclusive-owner"),
        (true, true, "auto-delete"),
    ] {
        let ch = support::channel(&conn).await;
        let err = amqp_err(
            "quorum queue.declare",
            ch.queue_declare(
                "p-q-props".into(),
                QueueDeclareOptions {
                    durable: true,
                    exclusive,
                    auto_delete,
                    ..Default::default()
                },
                table(&[("x-queue-type", s("quorum"))]),
            ),
        )
        .await;
        assert_eq!(
            err,
            (
                406,
                format!("PRECONDITION_FAILED - invalid property '{prop}' for queue 'p-q-props' in vhost '/'")
            )
        );
    }
    let ch = support::channel(&conn).await;
    let err = amqp_err(
        "classic queue.declare",
        declare_with(
            &ch,
            "p-dl-classic",
            table(&[("x-delivery-limit", AMQPValue::LongInt(2))]),
        ),
    )
    .await;
    assert_eq!(
        err,
        (
            406,
            "PRECONDITION_FAILED - invalid arg 'x-delivery-limit' for queue 'p-dl-classic' in vhost '/' of queue type rabbit_classic_queue".into()
        )
    );
}
