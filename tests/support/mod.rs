//! Small lapin helpers shared by the client-driven integration tests
//! (connection, routing, queues, consume, qos, confirms, tx).
//!
//! Every receive is bounded by a timeout so a broken broker fails a test
//! quickly instead of hanging it.
#![allow(dead_code)]

use std::time::Duration;

use lapin::{
    message::{BasicGetMessage, Delivery, DeliveryResult},
    options::*,
    types::FieldTable,
    BasicProperties, Channel, Connection, ConnectionProperties, Consumer, ExchangeKind,
};
use tokio::sync::mpsc;

/// How long to wait for something that should happen.
pub const WAIT: Duration = Duration::from_secs(5);
/// How long to watch for something that should NOT happen.
pub const QUIET: Duration = Duration::from_millis(300);

pub async fn connect_url(url: &str) -> Connection {
    tokio::time::timeout(
        WAIT,
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .expect("connect timed out")
    .expect("connect")
}

pub async fn connect(b: &crate::common::TestBroker) -> Connection {
    connect_url(&b.url()).await
}

pub async fn channel(conn: &Connection) -> Channel {
    tokio::time::timeout(WAIT, conn.create_channel())
        .await
        .expect("channel.open timed out")
        .expect("channel.open")
}

/// Connection plus one channel: the common starting point of a test.
pub async fn open(b: &crate::common::TestBroker) -> (Connection, Channel) {
    let conn = connect(b).await;
    let ch = channel(&conn).await;
    (conn, ch)
}

/// Awaits an AMQP operation with a timeout and panics with context on failure.
pub async fn ok<T, F>(what: &str, fut: F) -> T
where
    F: std::future::Future<Output = lapin::Result<T>>,
{
    match tokio::time::timeout(WAIT, fut).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => panic!("{what} failed: {e:?}"),
        Err(_) => panic!("{what} timed out"),
    }
}

/// Awaits an AMQP operation that must fail with a channel/connection error;
/// returns (reply code, reply text).
pub async fn amqp_err<T: std::fmt::Debug, F>(what: &str, fut: F) -> (u16, String)
where
    F: std::future::Future<Output = lapin::Result<T>>,
{
    match tokio::time::timeout(WAIT, fut).await {
        Ok(Ok(v)) => panic!("{what} unexpectedly succeeded: {v:?}"),
        Ok(Err(e)) => match e.kind() {
            lapin::ErrorKind::ProtocolError(err) => {
                (err.get_id(), err.get_message().as_str().to_string())
            }
            other => panic!("{what}: expected an AMQP error, got {other:?}"),
        },
        Err(_) => panic!("{what} timed out"),
    }
}

/// A publish (on a confirm-mode channel) that the broker must refuse by closing
/// the channel; returns (reply code, reply text). The refusal may surface from the
/// publish itself or from its confirm, depending on timing.
pub async fn publish_refused(ch: &Channel, queue: &str, props: BasicProperties) -> (u16, String) {
    publish_to_refused(ch, "", queue, props).await
}

/// The same for a publish to `exchange` with `routing_key`.
pub async fn publish_to_refused(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    props: BasicProperties,
) -> (u16, String) {
    let published = ch
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            b"x",
            props,
        )
        .await;
    let err = match published {
        Err(e) => e,
        Ok(confirm) => match tokio::time::timeout(WAIT, confirm).await {
            Ok(Err(e)) => e,
            other => panic!("expected a channel error, got {other:?}"),
        },
    };
    match err.kind() {
        lapin::ErrorKind::ProtocolError(p) => (p.get_id(), p.get_message().as_str().to_string()),
        other => panic!("expected an AMQP error, got {other:?}"),
    }
}

/// A transient (non-durable) queue with a unique name, exclusive to this
/// connection so it disappears with the test's connection.
pub async fn temp_queue(ch: &Channel, prefix: &str) -> String {
    let name = crate::common::unique(prefix);
    ok(
        "queue.declare",
        ch.queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
    name
}

/// A transient exchange of `kind` with a unique name.
pub async fn temp_exchange(ch: &Channel, kind: ExchangeKind, prefix: &str) -> String {
    let name = crate::common::unique(prefix);
    ok(
        "exchange.declare",
        ch.exchange_declare(
            name.as_str().into(),
            kind,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    name
}

pub async fn delete_exchange(ch: &Channel, name: &str) {
    ok(
        "exchange.delete",
        ch.exchange_delete(name.into(), ExchangeDeleteOptions::default()),
    )
    .await;
}

pub async fn bind(ch: &Channel, queue: &str, exchange: &str, key: &str) {
    bind_args(ch, queue, exchange, key, FieldTable::default()).await;
}

pub async fn bind_args(ch: &Channel, queue: &str, exchange: &str, key: &str, args: FieldTable) {
    ok(
        "queue.bind",
        ch.queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            args,
        ),
    )
    .await;
}

pub async fn publish(ch: &Channel, exchange: &str, key: &str, body: &[u8]) {
    publish_props(ch, exchange, key, body, BasicProperties::default()).await;
}

pub async fn publish_props(
    ch: &Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
    props: BasicProperties,
) {
    ok(
        "basic.publish",
        ch.basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body,
            props,
        ),
    )
    .await;
}

/// basic.get with manual ack.
pub async fn get(ch: &Channel, queue: &str) -> Option<BasicGetMessage> {
    ok(
        "basic.get",
        ch.basic_get(queue.into(), BasicGetOptions { no_ack: false }),
    )
    .await
}

/// basic.get with no-ack; returns only the body.
pub async fn get_body(ch: &Channel, queue: &str) -> Option<Vec<u8>> {
    ok(
        "basic.get",
        ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }),
    )
    .await
    .map(|m| m.delivery.data)
}

/// Takes every message currently in the queue (no-ack) and returns the bodies as strings.
pub async fn drain(ch: &Channel, queue: &str) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(body) = get_body(ch, queue).await {
        out.push(String::from_utf8(body).expect("utf8 body"));
        assert!(out.len() < 10_000, "queue {queue} never drained");
    }
    out
}

/// Passive declare: (message count, consumer count).
pub async fn counts(ch: &Channel, queue: &str) -> (u32, u32) {
    let q = ok(
        "queue.declare passive",
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
    (q.message_count(), q.consumer_count())
}

/// A consumer whose deliveries are forwarded, in order, into a channel we
/// can await with timeouts.
pub struct Sub {
    pub consumer: Consumer,
    rx: mpsc::UnboundedReceiver<DeliveryResult>,
}

impl Sub {
    pub fn tag(&self) -> String {
        self.consumer.tag().as_str().to_string()
    }

    /// Next delivery; panics if none arrives within [`WAIT`].
    pub async fn next(&mut self) -> Delivery {
        match tokio::time::timeout(WAIT, self.rx.recv()).await {
            Ok(Some(Ok(Some(d)))) => d,
            Ok(Some(Ok(None))) => panic!("consumer {} was cancelled", self.tag()),
            Ok(Some(Err(e))) => panic!("consumer {} errored: {e:?}", self.tag()),
            Ok(None) => panic!("consumer {} stream ended", self.tag()),
            Err(_) => panic!("no delivery to consumer {} within {WAIT:?}", self.tag()),
        }
    }

    /// Next `n` deliveries.
    pub async fn take(&mut self, n: usize) -> Vec<Delivery> {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(self.next().await);
        }
        v
    }

    /// Panics if a delivery arrives within `d`.
    pub async fn expect_nothing(&mut self, d: Duration) {
        if let Ok(Some(r)) = tokio::time::timeout(d, self.rx.recv()).await {
            match r {
                Ok(Some(del)) => panic!(
                    "unexpected delivery to {}: {:?}",
                    self.tag(),
                    String::from_utf8_lossy(&del.data)
                ),
                other => panic!("unexpected event on {}: {other:?}", self.tag()),
            }
        }
    }

    /// Waits for the server to close the consumer's channel; its (code, text).
    pub async fn channel_closed(&mut self) -> (u16, String) {
        match tokio::time::timeout(WAIT, self.rx.recv()).await {
            Ok(Some(Err(e))) => match e.kind() {
                lapin::ErrorKind::ProtocolError(err) => {
                    (err.get_id(), err.get_message().as_str().to_string())
                }
                other => panic!("consumer {}: not a channel close: {other:?}", self.tag()),
            },
            Ok(other) => panic!(
                "consumer {}: expected a channel close, got {other:?}",
                self.tag()
            ),
            Err(_) => panic!("consumer {}: no channel close within {WAIT:?}", self.tag()),
        }
    }

    /// Waits for the consumer to be cancelled (by the server or by us).
    pub async fn cancelled(&mut self) {
        match tokio::time::timeout(WAIT, self.rx.recv()).await {
            Ok(Some(Ok(None))) | Ok(None) => {}
            Ok(Some(Ok(Some(d)))) => panic!(
                "expected cancellation of {}, got delivery {:?}",
                self.tag(),
                String::from_utf8_lossy(&d.data)
            ),
            Ok(Some(Err(e))) => panic!("consumer {} errored: {e:?}", self.tag()),
            Err(_) => panic!("consumer {} not cancelled within {WAIT:?}", self.tag()),
        }
    }
}

pub async fn consume(ch: &Channel, queue: &str, no_ack: bool) -> Sub {
    consume_opts(
        ch,
        queue,
        "",
        BasicConsumeOptions {
            no_ack,
            ..Default::default()
        },
    )
    .await
}

pub async fn consume_opts(
    ch: &Channel,
    queue: &str,
    tag: &str,
    options: BasicConsumeOptions,
) -> Sub {
    let consumer = ok(
        "basic.consume",
        ch.basic_consume(queue.into(), tag.into(), options, FieldTable::default()),
    )
    .await;
    let (tx, rx) = mpsc::unbounded_channel();
    // The send happens synchronously inside the delegate call, so deliveries
    // keep the order in which the client library received them.
    consumer.set_delegate(move |d: DeliveryResult| {
        let _ = tx.send(d);
        async {}
    });
    Sub { consumer, rx }
}

/// A field table from (key, value) pairs: arguments and headers.
pub fn table(entries: &[(&str, lapin::types::AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(lapin::types::ShortString::from(*k), v.clone());
    }
    t
}

/// A long string value (what clients send for text arguments and headers).
pub fn s(v: &str) -> lapin::types::AMQPValue {
    lapin::types::AMQPValue::LongString(lapin::types::LongString::from(v))
}

pub fn text(d: &Delivery) -> String {
    String::from_utf8(d.data.clone()).expect("utf8 body")
}

pub fn texts(ds: &[Delivery]) -> Vec<String> {
    ds.iter().map(text).collect()
}

/// `["m0", "m1", ...]`-style expectations.
pub fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Puts the channel in publisher-confirm mode.
pub async fn confirm_mode(ch: &Channel) {
    ok(
        "confirm.select",
        ch.confirm_select(ConfirmSelectOptions::default()),
    )
    .await;
}

/// Waits until every publish so far on this confirm-mode channel has been
/// confirmed, i.e. the messages really are in their queues. (RabbitMQ answers
/// queue.declare's message count out of band, so counts taken right after an
/// unconfirmed publish may not include it yet.)
pub async fn settle(ch: &Channel) {
    let returned = ok("wait_for_confirms", ch.wait_for_confirms()).await;
    assert!(returned.is_empty(), "unexpected basic.return: {returned:?}");
}

/// The reply code and text a connection will be closed with, as its client sees them.
pub fn closing_error(conn: &lapin::Connection) -> tokio::task::JoinHandle<(u16, String)> {
    use futures_lite::StreamExt;
    let mut events = Box::pin(conn.events_listener());
    tokio::spawn(async move {
        let wait = async {
            while let Some(event) = events.next().await {
                if let lapin::Event::Error(e) = event {
                    if let lapin::ErrorKind::ProtocolError(p) = e.kind() {
                        return (p.get_id(), p.get_message().as_str().to_string());
                    }
                }
            }
            panic!("the connection's events ended without an error");
        };
        tokio::time::timeout(WAIT, wait)
            .await
            .expect("the connection is closed")
    })
}

/// A broker configuration on `dir` (any free port) whose durable queues keep at
/// most `queue_memory_budget` bytes of persistent bodies in memory.
pub fn budget_config(dir: &std::path::Path, queue_memory_budget: u64) -> warrenmq::Config {
    warrenmq::Config {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        data_dir: dir.to_path_buf(),
        limits: warrenmq::config::Limits {
            queue_memory_budget,
            ..Default::default()
        },
        ..warrenmq::Config::default()
    }
}

/// The sled database of a broker's data directory, once the broker's sled
/// threads have let go of its lock (a moment after it shut down).
pub fn open_db(dir: &std::path::Path) -> sled::Db {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match sled::Config::new().path(dir.join("db")).open() {
            Ok(db) => return db,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("open the broker's sled database: {e:?}"),
        }
    }
}
