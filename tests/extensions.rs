//! RabbitMQ extensions to AMQP 0-9-1 as a RabbitMQ client sees them through
//! lapin: per-queue and per-message TTL, queue expiry, priority queues,
//! length limits and overflow behaviour, dead-lettering (with x-death),
//! alternate exchanges, consumer priorities, single active consumer,
//! validated user_id, headers-exchange argument checks, exclusive-queue
//! locking, quorum queues and queue-argument validation.
//!
//! Expected behaviour and reply texts are those of RabbitMQ 3.10.
//! TTL-based tests use short TTLs (100-300 ms) and short sleeps; every
//! receive is bounded by a timeout.

mod common;
mod support;

use std::time::{Duration, Instant};

use lapin::{
    message::{Delivery, DeliveryResult},
    options::*,
    types::{AMQPValue, FieldArray, FieldTable},
    BasicProperties, Channel, Confirmation, Connection, ExchangeKind,
};
use support::*;
use tokio::sync::mpsc;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A 32-bit integer argument value (what most clients send for numbers).
fn int(v: i32) -> AMQPValue {
    AMQPValue::LongInt(v)
}

fn exclusive() -> QueueDeclareOptions {
    QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    }
}

/// queue.declare returning the raw result, so error cases can be checked.
async fn declare(
    ch: &Channel,
    name: &str,
    options: QueueDeclareOptions,
    args: FieldTable,
) -> lapin::Result<lapin::Queue> {
    match tokio::time::timeout(WAIT, ch.queue_declare(name.into(), options, args)).await {
        Ok(r) => r,
        Err(_) => panic!("queue.declare {name} timed out"),
    }
}

/// An exclusive queue with a unique name and the given arguments.
async fn temp_queue_args(ch: &Channel, prefix: &str, args: FieldTable) -> String {
    let name = common::unique(prefix);
    ok("queue.declare", declare(ch, &name, exclusive(), args)).await;
    name
}

/// An auto-delete exchange: once the (exclusive) queues bound to it go away
/// with the test's connection, RabbitMQ deletes it too.
async fn auto_delete_exchange(
    ch: &Channel,
    kind: ExchangeKind,
    prefix: &str,
    args: FieldTable,
) -> String {
    let name = common::unique(prefix);
    ok(
        "exchange.declare",
        ch.exchange_declare(
            name.as_str().into(),
            kind,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            args,
        ),
    )
    .await;
    name
}

async fn delete_queue(ch: &Channel, name: &str) {
    ok(
        "queue.delete",
        ch.queue_delete(name.into(), QueueDeleteOptions::default()),
    )
    .await;
}

/// Publishes on a confirm-mode channel and waits for the broker's confirm.
async fn publish_confirmed(
    ch: &Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
    props: BasicProperties,
    mandatory: bool,
) -> Confirmation {
    ok("publish + confirm", async {
        ch.basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions {
                mandatory,
                ..Default::default()
            },
            body,
            props,
        )
        .await?
        .await
    })
    .await
}

/// Publishes on a confirm-mode channel; the broker must ack without a return.
async fn publish_acked(
    ch: &Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
    props: BasicProperties,
) {
    let conf = publish_confirmed(ch, exchange, key, body, props, false).await;
    assert_eq!(
        conf,
        Confirmation::Ack(None),
        "publish of {:?} to {exchange:?}/{key:?}",
        String::from_utf8_lossy(body)
    );
}

fn expiring(ms: &str) -> BasicProperties {
    BasicProperties::default().with_expiration(ms.into())
}

fn prio(p: u8) -> BasicProperties {
    BasicProperties::default().with_priority(p)
}

/// The reply code and text of an AMQP error.
fn reply(err: &lapin::Error) -> (u16, String) {
    match err.kind() {
        lapin::ErrorKind::ProtocolError(e) => (e.get_id(), e.get_message().to_string()),
        other => panic!("expected an AMQP close from the server, got {other:?}"),
    }
}

/// Asserts `result` is the server closing with `code` and exactly `text`.
#[track_caller]
fn assert_closed_with<T: std::fmt::Debug>(result: lapin::Result<T>, code: u16, text: &str) {
    let err = result.expect_err("the server should have refused this");
    assert_eq!(reply(&err), (code, text.to_string()), "full error: {err}");
}

/// A consumer (with consume arguments) whose deliveries are forwarded, in
/// order, into a channel we can await with timeouts.
struct ArgSub {
    tag: String,
    rx: mpsc::UnboundedReceiver<DeliveryResult>,
}

impl ArgSub {
    async fn next(&mut self) -> Delivery {
        match tokio::time::timeout(WAIT, self.rx.recv()).await {
            Ok(Some(Ok(Some(d)))) => d,
            Ok(Some(Ok(None))) => panic!("consumer {} was cancelled", self.tag),
            Ok(Some(Err(e))) => panic!("consumer {} errored: {e:?}", self.tag),
            Ok(None) => panic!("consumer {} stream ended", self.tag),
            Err(_) => panic!("no delivery to consumer {} within {WAIT:?}", self.tag),
        }
    }

    async fn take(&mut self, n: usize) -> Vec<Delivery> {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(self.next().await);
        }
        v
    }

    async fn expect_nothing(&mut self, d: Duration) {
        if let Ok(Some(r)) = tokio::time::timeout(d, self.rx.recv()).await {
            match r {
                Ok(Some(del)) => panic!(
                    "unexpected delivery to {}: {:?}",
                    self.tag,
                    String::from_utf8_lossy(&del.data)
                ),
                other => panic!("unexpected event on {}: {other:?}", self.tag),
            }
        }
    }
}

async fn consume_args(ch: &Channel, queue: &str, no_ack: bool, args: FieldTable) -> ArgSub {
    let consumer = ok(
        "basic.consume",
        ch.basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack,
                ..Default::default()
            },
            args,
        ),
    )
    .await;
    let tag = consumer.tag().as_str().to_string();
    let (tx, rx) = mpsc::unbounded_channel();
    consumer.set_delegate(move |d: DeliveryResult| {
        let _ = tx.send(d);
        async {}
    });
    ArgSub { tag, rx }
}

async fn qos(ch: &Channel, prefetch: u16) {
    ok(
        "basic.qos",
        ch.basic_qos(prefetch, BasicQosOptions::default()),
    )
    .await;
}

fn header<'a>(d: &'a Delivery, key: &str) -> Option<&'a AMQPValue> {
    d.properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(key))
}

/// What one x-death entry must say.
struct Death<'a> {
    reason: &'a str,
    queue: &'a str,
    exchange: &'a str,
    routing_keys: &'a [&'a str],
}

/// Checks a dead-lettered message's x-death header (a one-entry array, count
/// 1) and its x-first-death-* headers, with the types RabbitMQ uses.
#[track_caller]
fn assert_dead_lettered(d: &Delivery, want: &Death) -> FieldTable {
    let deaths = match header(d, "x-death") {
        Some(AMQPValue::FieldArray(a)) => a.as_slice().to_vec(),
        other => panic!("x-death must be an array, got {other:?}"),
    };
    assert_eq!(deaths.len(), 1, "one x-death entry: {deaths:?}");
    let entry = match &deaths[0] {
        AMQPValue::FieldTable(t) => t.clone(),
        other => panic!("x-death entries must be tables, got {other:?}"),
    };
    let e = entry.inner();
    assert_eq!(e.get("count"), Some(&AMQPValue::LongLongInt(1)), "{e:?}");
    assert_eq!(e.get("reason"), Some(&s(want.reason)), "{e:?}");
    assert_eq!(e.get("queue"), Some(&s(want.queue)), "{e:?}");
    assert_eq!(e.get("exchange"), Some(&s(want.exchange)), "{e:?}");
    let keys: Vec<AMQPValue> = want.routing_keys.iter().map(|k| s(k)).collect();
    assert_eq!(
        e.get("routing-keys"),
        Some(&AMQPValue::FieldArray(FieldArray::from(keys))),
        "{e:?}"
    );
    assert!(
        matches!(e.get("time"), Some(AMQPValue::Timestamp(_))),
        "x-death time must be a timestamp: {e:?}"
    );
    assert_eq!(
        header(d, "x-first-death-reason"),
        Some(&s(want.reason)),
        "x-first-death-reason"
    );
    assert_eq!(
        header(d, "x-first-death-queue"),
        Some(&s(want.queue)),
        "x-first-death-queue"
    );
    assert_eq!(
        header(d, "x-first-death-exchange"),
        Some(&s(want.exchange)),
        "x-first-death-exchange"
    );
    entry
}

/// A dead-letter setup on `conn`: an auto-delete direct exchange, an
/// exclusive queue bound to it with key "dead", and a consumer on that queue.
struct DeadLetters {
    exchange: String,
    sub: ArgSub,
}

async fn dead_letters(conn: &Connection) -> DeadLetters {
    let ch = channel(conn).await;
    let exchange =
        auto_delete_exchange(&ch, ExchangeKind::Direct, "dlx", FieldTable::default()).await;
    let q = temp_queue(&ch, "dlq").await;
    bind(&ch, &q, &exchange, "dead").await;
    let sub = consume_args(&ch, &q, true, FieldTable::default()).await;
    DeadLetters { exchange, sub }
}

/// Queue arguments dead-lettering into `dl` with routing key "dead".
fn dlx_args(dl: &DeadLetters, more: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = table(more);
    t.insert("x-dead-letter-exchange".into(), s(&dl.exchange));
    t.insert("x-dead-letter-routing-key".into(), s("dead"));
    t
}

// ---------------------------------------------------------------------------
// Message TTL
// ---------------------------------------------------------------------------

/// With x-message-ttl on the queue, messages nobody consumes expire: the
/// declare-ok message count drops to zero and basic.get finds nothing.
#[tokio::test]
async fn queue_message_ttl_expires_messages() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    confirm_mode(&ch).await;
    let q = temp_queue_args(&ch, "ttl", table(&[("x-message-ttl", int(300))])).await;
    for i in 0..3 {
        publish_acked(
            &ch,
            "",
            &q,
            format!("m{i}").as_bytes(),
            BasicProperties::default(),
        )
        .await;
    }
    assert_eq!(counts(&ch, &q).await.0, 3, "not yet expired");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(counts(&ch, &q).await.0, 0, "all expired");
    assert!(get(&ch, &q).await.is_none());
}

/// The per-message `expiration` property (milliseconds, as a string) expires
/// just that message; messages without it stay.
#[tokio::test]
async fn per_message_expiration_expires_that_message() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    confirm_mode(&ch).await;
    let q = temp_queue(&ch, "msgttl").await;
    publish_acked(&ch, "", &q, b"short-lived", expiring("200")).await;
    publish_acked(&ch, "", &q, b"keeper", BasicProperties::default()).await;
    assert_eq!(counts(&ch, &q).await.0, 2);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(counts(&ch, &q).await.0, 1, "the expiring message is gone");
    let m = get(&ch, &q).await.expect("the message without expiration");
    assert_eq!(m.delivery.data, b"keeper");
    assert_eq!(m.delivery.properties.expiration(), &None);
}

/// When both the queue's x-message-ttl and the message's expiration apply,
/// the lower of the two wins, whichever side it is on.
#[tokio::test]
async fn lower_of_queue_and_message_ttl_wins() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    confirm_mode(&ch).await;
    // Long queue TTL, short message TTL.
    let q1 = temp_queue_args(&ch, "ttl-long-q", table(&[("x-message-ttl", int(60_000))])).await;
    // Short queue TTL, long message TTL.
    let q2 = temp_queue_args(&ch, "ttl-short-q", table(&[("x-message-ttl", int(150))])).await;
    publish_acked(&ch, "", &q1, b"msg-ttl-wins", expiring("150")).await;
    publish_acked(&ch, "", &q2, b"queue-ttl-wins", expiring("60000")).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        counts(&ch, &q1).await.0,
        0,
        "message expiration 150 < queue TTL"
    );
    assert_eq!(
        counts(&ch, &q2).await.0,
        0,
        "queue TTL 150 < message expiration"
    );
    assert!(get(&ch, &q1).await.is_none());
    assert!(get(&ch, &q2).await.is_none());
}

/// A message with expiration "0" is delivered if a consumer is waiting for
/// it, and dropped at once if not.
#[tokio::test]
async fn expiration_zero_reaches_waiting_consumer_only() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    confirm_mode(&ch).await;

    let idle = temp_queue(&ch, "ttl0-idle").await;
    publish_acked(&ch, "", &idle, b"nobody-home", expiring("0")).await;
    assert_eq!(counts(&ch, &idle).await.0, 0, "expired on arrival");
    assert!(get(&ch, &idle).await.is_none());

    let q = temp_queue(&ch, "ttl0").await;
    let cch = channel(&conn).await;
    let mut sub = consume(&cch, &q, false).await;
    publish_acked(&ch, "", &q, b"just-in-time", expiring("0")).await;
    let d = sub.next().await;
    assert_eq!(text(&d), "just-in-time");
    ok("basic.ack", d.ack(BasicAckOptions::default())).await;
}

// ---------------------------------------------------------------------------
// Queue expiry
// ---------------------------------------------------------------------------

/// A queue declared with x-expires is deleted once it has gone unused for that
/// long; a passive declare afterwards fails with 404.
#[tokio::test]
async fn x_expires_deletes_unused_queue() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let q = common::unique("expires");
    ok(
        "queue.declare",
        declare(
            &ch,
            &q,
            QueueDeclareOptions::default(),
            table(&[("x-expires", int(200))]),
        ),
    )
    .await;
    assert_eq!(counts(&ch, &q).await, (0, 0), "exists right after declare");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let result = declare(
        &ch,
        &q,
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await;
    assert_closed_with(
        result,
        404,
        &format!("NOT_FOUND - no queue '{q}' in vhost '/'"),
    );
    // The connection is fine; only the channel was closed.
    let ch2 = channel(&conn).await;
    temp_queue(&ch2, "still-alive").await;
}

// ---------------------------------------------------------------------------
// Priority queues
// ---------------------------------------------------------------------------

async fn publish_priority_mix(ch: &Channel, q: &str) {
    publish_acked(ch, "", q, b"low", prio(1)).await;
    publish_acked(ch, "", q, b"none", BasicProperties::default()).await;
    publish_acked(ch, "", q, b"high", prio(9)).await;
    publish_acked(ch, "", q, b"mid", prio(5)).await;
    publish_acked(ch, "", q, b"high-2", prio(9)).await;
}

/// In a queue with x-max-priority, higher-priority messages are delivered
/// first (FIFO within a priority; no priority counts as 0), and messages
/// requeued in any order go back to their place in priority order.
#[tokio::test]
async fn priority_queue_orders_by_priority_and_requeue_keeps_it() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    confirm_mode(&ch).await;
    let q = temp_queue_args(&ch, "prio", table(&[("x-max-priority", int(10))])).await;
    let expected = strs(&["high", "high-2", "mid", "low", "none"]);

    // A consumer attached after the messages are queued gets them by priority.
    publish_priority_mix(&ch, &q).await;
    let cch = channel(&conn).await;
    let mut sub = consume(&cch, &q, true).await;
    assert_eq!(texts(&sub.take(5).await), expected);
    ok(
        "basic.cancel",
        cch.basic_cancel(sub.tag().as_str().into(), BasicCancelOptions::default()),
    )
    .await;

    // Take everything with basic.get, requeue in a scrambled order: the queue
    // hands them out by priority again.
    publish_priority_mix(&ch, &q).await;
    let gch = channel(&conn).await;
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(get(&gch, &q).await.expect("a message"));
    }
    assert_eq!(
        got.iter()
            .map(|m| String::from_utf8(m.delivery.data.clone()).unwrap())
            .collect::<Vec<_>>(),
        expected
    );
    for i in [3, 4, 1, 0, 2] {
        ok(
            "basic.reject requeue",
            got[i].reject(BasicRejectOptions { requeue: true }),
        )
        .await;
    }
    let mut again = Vec::new();
    for _ in 0..5 {
        let m = get(&gch, &q).await.expect("a requeued message");
        assert!(m.delivery.redelivered, "requeued messages are redelivered");
        again.push(String::from_utf8(m.delivery.data.clone()).unwrap());
        ok("basic.ack", m.ack(BasicAckOptions::default())).await;
    }
    assert_eq!(again, expected);
    assert!(get(&gch, &q).await.is_none());
}

// ---------------------------------------------------------------------------
// Length limits
// ---------------------------------------------------------------------------

/// x-max-length with the default overflow (drop-head): once the queue is
/// full, the oldest messages are dropped to make room for new ones.
#[tokio::test]
async fn max_length_drops_oldest() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    confirm_mode(&ch).await;
    let q = temp_queue_args(&ch, "maxlen", table(&[("x-max-length", int(2))])).await;
    for i in 0..5 {
        publish_acked(
            &ch,
            "",
            &q,
            format!("m{i}").as_bytes(),
            BasicProperties::default(),
        )
        .await;
    }
    assert_eq!(counts(&ch, &q).await.0, 2);
    assert_eq!(drain(&ch, &q).await, strs(&["m3", "m4"]));
}

/// x-max-length-bytes limits the total body size: the oldest messages are
/// dropped until the bodies fit.
#[tokio::test]
async fn max_length_bytes_drops_oldest() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    confirm_mode(&ch).await;
    let q = temp_queue_args(&ch, "maxbytes", table(&[("x-max-length-bytes", int(10))])).await;
    for body in ["aaaa", "bbbb", "cccc"] {
        publish_acked(&ch, "", &q, body.as_bytes(), BasicProperties::default()).await;
    }
    assert_eq!(counts(&ch, &q).await.0, 2, "12 bytes > 10: the oldest went");
    assert_eq!(drain(&ch, &q).await, strs(&["bbbb", "cccc"]));
}

/// x-overflow=reject-publish: a publish into a full queue is nacked (with
/// publisher confirms) and not enqueued; once there is room again publishes
/// are accepted.
#[tokio::test]
async fn overflow_reject_publish_nacks_when_full() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    confirm_mode(&ch).await;
    let q = temp_queue_args(
        &ch,
        "rejectpub",
        table(&[
            ("x-max-length", int(2)),
            ("x-overflow", s("reject-publish")),
        ]),
    )
    .await;
    publish_acked(&ch, "", &q, b"m0", BasicProperties::default()).await;
    publish_acked(&ch, "", &q, b"m1", BasicProperties::default()).await;
    let conf = publish_confirmed(&ch, "", &q, b"m2", BasicProperties::default(), false).await;
    assert_eq!(
        conf,
        Confirmation::Nack(None),
        "full queue rejects the publish"
    );
    assert_eq!(counts(&ch, &q).await.0, 2);
    assert_eq!(drain(&ch, &q).await, strs(&["m0", "m1"]));
    publish_acked(&ch, "", &q, b"m3", BasicProperties::default()).await;
    assert_eq!(drain(&ch, &q).await, strs(&["m3"]));
}

// ---------------------------------------------------------------------------
// Dead-lettering
// ---------------------------------------------------------------------------

/// basic.reject with requeue=false dead-letters the message to the queue's
/// x-dead-letter-exchange under x-dead-letter-routing-key, with an x-death
/// entry (reason "rejected") and x-first-death-* headers; the original
/// properties are kept.
#[tokio::test]
async fn reject_without_requeue_dead_letters() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let mut dl = dead_letters(&conn).await;
    let q = temp_queue_args(&ch, "dl-reject", dlx_args(&dl, &[])).await;
    let props = BasicProperties::default()
        .with_message_id("id-1".into())
        .with_headers(table(&[("app", s("kept"))]));
    publish_props(&ch, "", &q, b"bad", props).await;
    let m = get(&ch, &q).await.expect("the message");
    ok(
        "basic.reject",
        m.reject(BasicRejectOptions { requeue: false }),
    )
    .await;

    let d = dl.sub.next().await;
    assert_eq!(d.data, b"bad");
    assert_eq!(d.exchange.as_str(), dl.exchange);
    assert_eq!(d.routing_key.as_str(), "dead");
    assert_eq!(d.properties.message_id().as_ref().unwrap().as_str(), "id-1");
    assert_eq!(header(&d, "app"), Some(&s("kept")));
    assert_dead_lettered(
        &d,
        &Death {
            reason: "rejected",
            queue: &q,
            exchange: "",
            routing_keys: &[&q],
        },
    );
    assert!(get(&ch, &q).await.is_none(), "not requeued");
}

/// basic.nack with requeue=false dead-letters too (reason "rejected"); the
/// x-death entry names the exchange and routing key the message was
/// originally published with.
#[tokio::test]
async fn nack_without_requeue_dead_letters() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let mut dl = dead_letters(&conn).await;
    let q = temp_queue_args(&ch, "dl-nack", dlx_args(&dl, &[])).await;
    bind(&ch, &q, "amq.direct", &q).await;
    publish(&ch, "amq.direct", &q, b"n1").await;
    publish(&ch, "amq.direct", &q, b"n2").await;
    let cch = channel(&conn).await;
    let mut sub = consume(&cch, &q, false).await;
    let ds = sub.take(2).await;
    ok(
        "basic.nack multiple",
        ds[1].nack(BasicNackOptions {
            multiple: true,
            requeue: false,
        }),
    )
    .await;

    let got = dl.sub.take(2).await;
    assert_eq!(texts(&got), strs(&["n1", "n2"]));
    for d in &got {
        assert_dead_lettered(
            d,
            &Death {
                reason: "rejected",
                queue: &q,
                exchange: "amq.direct",
                routing_keys: &[&q],
            },
        );
    }
    sub.expect_nothing(QUIET).await;
}

/// Messages that expire (queue TTL or per-message expiration) are
/// dead-lettered with reason "expired"; a per-message expiration is removed
/// from the dead letter and recorded as x-death original-expiration.
#[tokio::test]
async fn expired_messages_are_dead_lettered() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let mut dl = dead_letters(&conn).await;

    let q = temp_queue_args(&ch, "dl-ttl", dlx_args(&dl, &[("x-message-ttl", int(100))])).await;
    publish(&ch, "", &q, b"stale").await;
    let d = dl.sub.next().await;
    assert_eq!(d.data, b"stale");
    assert_eq!(d.routing_key.as_str(), "dead");
    let entry = assert_dead_lettered(
        &d,
        &Death {
            reason: "expired",
            queue: &q,
            exchange: "",
            routing_keys: &[&q],
        },
    );
    assert!(!entry.contains_key("original-expiration"), "{entry:?}");

    let q2 = temp_queue_args(&ch, "dl-msgttl", dlx_args(&dl, &[])).await;
    publish_props(&ch, "", &q2, b"stale-msg", expiring("100")).await;
    let d = dl.sub.next().await;
    assert_eq!(d.data, b"stale-msg");
    assert_eq!(d.properties.expiration(), &None, "expiration is removed");
    let entry = assert_dead_lettered(
        &d,
        &Death {
            reason: "expired",
            queue: &q2,
            exchange: "",
            routing_keys: &[&q2],
        },
    );
    assert_eq!(
        entry.inner().get("original-expiration"),
        Some(&s("100")),
        "{entry:?}"
    );
}

/// A message dropped from the head of a full x-max-length queue is
/// dead-lettered with reason "maxlen".
#[tokio::test]
async fn max_length_drop_dead_letters() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let mut dl = dead_letters(&conn).await;
    let q = temp_queue_args(&ch, "dl-maxlen", dlx_args(&dl, &[("x-max-length", int(1))])).await;
    publish(&ch, "", &q, b"first").await;
    publish(&ch, "", &q, b"second").await;
    let d = dl.sub.next().await;
    assert_eq!(d.data, b"first");
    assert_dead_lettered(
        &d,
        &Death {
            reason: "maxlen",
            queue: &q,
            exchange: "",
            routing_keys: &[&q],
        },
    );
    dl.sub.expect_nothing(QUIET).await;
    assert_eq!(drain(&ch, &q).await, strs(&["second"]));
}

/// The classic delay-queue pattern: publish into a queue with a TTL and no
/// consumers whose dead-letter exchange is the default exchange routing to a
/// work queue; the message shows up on the work queue once the TTL has passed.
#[tokio::test]
async fn delay_queue_pattern() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let work = temp_queue(&ch, "work").await;
    let delay = temp_queue_args(
        &ch,
        "delay",
        table(&[
            ("x-message-ttl", int(250)),
            ("x-dead-letter-exchange", s("")),
            ("x-dead-letter-routing-key", s(&work)),
        ]),
    )
    .await;
    let cch = channel(&conn).await;
    let mut sub = consume(&cch, &work, true).await;
    let start = Instant::now();
    publish(&ch, "", &delay, b"later").await;
    sub.expect_nothing(Duration::from_millis(150)).await;
    let d = sub.next().await;
    let elapsed = start.elapsed();
    assert_eq!(d.data, b"later");
    assert!(
        elapsed >= Duration::from_millis(240),
        "arrived after {elapsed:?}, before the 250 ms TTL"
    );
    assert_eq!(d.exchange.as_str(), "");
    assert_eq!(d.routing_key.as_str(), work);
    assert_dead_lettered(
        &d,
        &Death {
            reason: "expired",
            queue: &delay,
            exchange: "",
            routing_keys: &[&delay],
        },
    );
}

// ---------------------------------------------------------------------------
// Alternate exchanges
// ---------------------------------------------------------------------------

/// An exchange with an alternate-exchange argument hands messages it cannot
/// route to the alternate exchange; a mandatory publish routed that way is
/// not returned. Routable messages are unaffected. Redeclaring the exchange
/// with a different alternate-exchange fails with 406.
#[tokio::test]
async fn alternate_exchange_takes_unroutable_messages() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    confirm_mode(&ch).await;
    let ae = auto_delete_exchange(&ch, ExchangeKind::Fanout, "ae", FieldTable::default()).await;
    let ae_q = temp_queue(&ch, "ae-q").await;
    bind(&ch, &ae_q, &ae, "").await;
    let x = auto_delete_exchange(
        &ch,
        ExchangeKind::Direct,
        "with-ae",
        table(&[("alternate-exchange", s(&ae))]),
    )
    .await;
    let routed_q = temp_queue(&ch, "routed-q").await;
    bind(&ch, &routed_q, &x, "routed").await;

    publish_acked(&ch, &x, "routed", b"normal", BasicProperties::default()).await;
    publish_acked(&ch, &x, "nowhere", b"stray", BasicProperties::default()).await;
    let conf = publish_confirmed(
        &ch,
        &x,
        "nowhere",
        b"stray-mandatory",
        BasicProperties::default(),
        true,
    )
    .await;
    assert_eq!(
        conf,
        Confirmation::Ack(None),
        "routed via the AE, so not returned"
    );
    assert_eq!(drain(&ch, &routed_q).await, strs(&["normal"]));
    assert_eq!(drain(&ch, &ae_q).await, strs(&["stray", "stray-mandatory"]));

    let other = common::unique("other-ae");
    let ch2 = channel(&conn).await;
    let result = tokio::time::timeout(
        WAIT,
        ch2.exchange_declare(
            x.as_str().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            table(&[("alternate-exchange", s(&other))]),
        ),
    )
    .await
    .expect("exchange.declare timed out");
    assert_closed_with(
        result,
        406,
        &format!(
            "PRECONDITION_FAILED - inequivalent arg 'alternate-exchange' for exchange '{x}' \
             in vhost '/': received '{other}' but current is '{ae}'"
        ),
    );
}

// ---------------------------------------------------------------------------
// Consumer priorities
// ---------------------------------------------------------------------------

/// With the x-priority consume argument, a higher-priority consumer with
/// prefetch room gets every message; the lower-priority one only gets
/// messages while the higher one has no room, and it gets them again once it
/// acks.
#[tokio::test]
async fn consumer_priority_prefers_higher_consumer_with_room() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let q = temp_queue(&ch, "cprio").await;
    let hch = channel(&conn).await;
    qos(&hch, 3).await;
    let mut high = consume_args(&hch, &q, false, table(&[("x-priority", int(10))])).await;
    let lch = channel(&conn).await;
    qos(&lch, 10).await;
    let mut low = consume_args(&lch, &q, false, table(&[("x-priority", int(1))])).await;

    for i in 0..3 {
        publish(&ch, "", &q, format!("m{i}").as_bytes()).await;
    }
    let h = high.take(3).await;
    assert_eq!(texts(&h), strs(&["m0", "m1", "m2"]));
    low.expect_nothing(QUIET).await;

    // The high-priority consumer is at its prefetch limit now.
    for i in 3..5 {
        publish(&ch, "", &q, format!("m{i}").as_bytes()).await;
    }
    let l = low.take(2).await;
    assert_eq!(texts(&l), strs(&["m3", "m4"]));
    high.expect_nothing(QUIET).await;

    ok(
        "basic.ack multiple",
        h[2].ack(BasicAckOptions { multiple: true }),
    )
    .await;
    publish(&ch, "", &q, b"m5").await;
    assert_eq!(text(&high.next().await), "m5");
    low.expect_nothing(QUIET).await;
}

// ---------------------------------------------------------------------------
// Single active consumer
// ---------------------------------------------------------------------------

/// With x-single-active-consumer only the first consumer receives messages;
/// when it cancels, the next consumer takes over.
#[tokio::test]
async fn single_active_consumer_fails_over_on_cancel() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let q = temp_queue_args(
        &ch,
        "sac",
        table(&[("x-single-active-consumer", AMQPValue::Boolean(true))]),
    )
    .await;
    let ach = channel(&conn).await;
    let mut first = consume(&ach, &q, false).await;
    let bch = channel(&conn).await;
    let mut second = consume(&bch, &q, false).await;

    for i in 0..3 {
        publish(&ch, "", &q, format!("m{i}").as_bytes()).await;
    }
    let ds = first.take(3).await;
    assert_eq!(texts(&ds), strs(&["m0", "m1", "m2"]));
    second.expect_nothing(QUIET).await;
    ok(
        "basic.ack multiple",
        ds[2].ack(BasicAckOptions { multiple: true }),
    )
    .await;

    ok(
        "basic.cancel",
        ach.basic_cancel(first.tag().as_str().into(), BasicCancelOptions::default()),
    )
    .await;
    for i in 3..5 {
        publish(&ch, "", &q, format!("m{i}").as_bytes()).await;
    }
    let ds = second.take(2).await;
    assert_eq!(texts(&ds), strs(&["m3", "m4"]));
}

// ---------------------------------------------------------------------------
// Validated user_id
// ---------------------------------------------------------------------------

/// A user_id property equal to the authenticated user is accepted and
/// delivered; any other user_id closes the channel with 406.
#[tokio::test]
async fn user_id_must_match_authenticated_user() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    confirm_mode(&ch).await;
    let q = temp_queue(&ch, "userid").await;
    publish_acked(
        &ch,
        "",
        &q,
        b"honest",
        BasicProperties::default().with_user_id("guest".into()),
    )
    .await;
    let m = get(&ch, &q).await.expect("the message");
    assert_eq!(
        m.delivery.properties.user_id().as_ref().unwrap().as_str(),
        "guest"
    );
    ok("basic.ack", m.ack(BasicAckOptions::default())).await;

    // basic.publish has no reply: the refusal arrives as the channel closing,
    // which the pending publisher confirm reports.
    let result = tokio::time::timeout(WAIT, async {
        ch.basic_publish(
            "".into(),
            q.as_str().into(),
            BasicPublishOptions::default(),
            b"forged",
            BasicProperties::default().with_user_id("other".into()),
        )
        .await?
        .await
    })
    .await
    .expect("publisher confirm timed out");
    assert_closed_with(
        result,
        406,
        "PRECONDITION_FAILED - user_id property set to 'other' but authenticated user was 'guest'",
    );
    let ch2 = channel(&conn).await;
    assert_eq!(
        counts(&ch2, &q).await.0,
        0,
        "the forged message was not enqueued"
    );
}

// ---------------------------------------------------------------------------
// Headers exchange argument checks
// ---------------------------------------------------------------------------

/// Binding to a headers exchange with an x-match value other than all/any
/// fails with 406.
#[tokio::test]
async fn headers_binding_with_invalid_x_match_fails() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let q = temp_queue(&ch, "xmatch").await;
    let result = tokio::time::timeout(
        WAIT,
        ch.queue_bind(
            q.as_str().into(),
            "amq.headers".into(),
            "".into(),
            QueueBindOptions::default(),
            table(&[("x-match", s("most")), ("k", s("v"))]),
        ),
    )
    .await
    .expect("queue.bind timed out");
    assert_closed_with(
        result,
        406,
        "PRECONDITION_FAILED - Invalid x-match field value <<\"most\">>; \
         expected all, any, all-with-x, or any-with-x",
    );
    // No binding was made.
    let ch2 = channel(&conn).await;
    confirm_mode(&ch2).await;
    let props = BasicProperties::default().with_headers(table(&[("k", s("v"))]));
    publish_acked(&ch2, "amq.headers", "", b"x", props).await;
    assert_eq!(drain(&ch2, &q).await, Vec::<String>::new());
}

// ---------------------------------------------------------------------------
// Exclusive queues
// ---------------------------------------------------------------------------

/// Redeclaring an existing non-exclusive queue with exclusive=true, even on
/// the connection that declared it, fails with 405 RESOURCE_LOCKED.
#[tokio::test]
async fn redeclare_non_exclusive_queue_as_exclusive_is_locked() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let q = common::unique("lockme");
    // x-expires is only a safety net so the shared broker is cleaned up even
    // if this test fails halfway.
    let args = table(&[("x-expires", int(60_000))]);
    ok(
        "queue.declare",
        declare(&ch, &q, QueueDeclareOptions::default(), args.clone()),
    )
    .await;
    let result = declare(&ch, &q, exclusive(), args).await;
    assert_closed_with(
        result,
        405,
        &format!(
            "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{q}' in vhost '/'. \
             It could be originally declared on another connection or the exclusive property \
             value does not match that of the original declaration."
        ),
    );
    let ch2 = channel(&conn).await;
    delete_queue(&ch2, &q).await;
}

// ---------------------------------------------------------------------------
// Quorum queues
// ---------------------------------------------------------------------------

/// A durable queue declared with x-queue-type=quorum accepts publishes and
/// delivers to consumers; a non-durable one is refused with 406.
#[tokio::test]
async fn quorum_queue_must_be_durable_and_works() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let q = common::unique("quorum");
    let args = table(&[("x-queue-type", s("quorum"))]);
    ok(
        "queue.declare quorum",
        declare(
            &ch,
            &q,
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args.clone(),
        ),
    )
    .await;
    confirm_mode(&ch).await;
    publish_acked(&ch, "", &q, b"q1", BasicProperties::default()).await;
    publish_acked(&ch, "", &q, b"q2", BasicProperties::default()).await;
    let cch = channel(&conn).await;
    qos(&cch, 10).await;
    let mut sub = consume(&cch, &q, false).await;
    let ds = sub.take(2).await;
    assert_eq!(texts(&ds), strs(&["q1", "q2"]));
    ok(
        "basic.ack multiple",
        ds[1].ack(BasicAckOptions { multiple: true }),
    )
    .await;
    ok(
        "basic.cancel",
        cch.basic_cancel(sub.tag().as_str().into(), BasicCancelOptions::default()),
    )
    .await;
    delete_queue(&ch, &q).await;

    let q2 = common::unique("quorum-transient");
    let result = declare(&ch, &q2, QueueDeclareOptions::default(), args).await;
    assert_closed_with(
        result,
        406,
        &format!(
            "PRECONDITION_FAILED - invalid property 'non-durable' for queue '{q2}' in vhost '/'"
        ),
    );
}

// ---------------------------------------------------------------------------
// Queue argument validation
// ---------------------------------------------------------------------------

/// A negative x-message-ttl is refused with 406.
#[tokio::test]
async fn negative_message_ttl_is_refused() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let q = common::unique("badttl");
    let result = declare(&ch, &q, exclusive(), table(&[("x-message-ttl", int(-1))])).await;
    assert_closed_with(
        result,
        406,
        &format!(
            "PRECONDITION_FAILED - invalid arg 'x-message-ttl' for queue '{q}' in vhost '/': \
             {{value_negative,-1}}"
        ),
    );
}

/// x-dead-letter-routing-key without x-dead-letter-exchange is refused with 406.
#[tokio::test]
async fn dead_letter_routing_key_without_exchange_is_refused() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let q = common::unique("baddlrk");
    let result = declare(
        &ch,
        &q,
        exclusive(),
        table(&[("x-dead-letter-routing-key", s("somewhere"))]),
    )
    .await;
    assert_closed_with(
        result,
        406,
        &format!(
            "PRECONDITION_FAILED - invalid arg 'x-dead-letter-routing-key' for queue '{q}' \
             in vhost '/': routing_key_but_no_dlx_defined"
        ),
    );
}
