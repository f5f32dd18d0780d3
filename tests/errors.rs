//! AMQP error semantics as a RabbitMQ client sees them through lapin.
//!
//! Channel errors (soft errors) close only the offending channel: each test
//! checks the reply code and RabbitMQ's reply text, then proves the connection
//! still works by opening a fresh channel on it. Connection errors (hard errors)
//! close the whole connection; those tests check the code and text too.
//!
//! The expected texts are exactly what RabbitMQ 3.10 sends.

mod common;

use std::future::Future;
use std::time::Duration;

use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ErrorKind, ExchangeKind};
use tokio::sync::mpsc;

use common::TestBroker;

/// Upper bound for any single broker interaction, so a broken broker fails the
/// test instead of hanging it.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Awaits `fut`, failing the test if it takes longer than [`TIMEOUT`].
async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

async fn connect(b: &TestBroker) -> Connection {
    within(
        "connection",
        Connection::connect(&b.url(), ConnectionProperties::default()),
    )
    .await
    .expect("connect")
}

async fn channel(conn: &Connection) -> Channel {
    within("channel.open", conn.create_channel())
        .await
        .expect("channel.open")
}

/// The reply code and text of the AMQP error the server closed with.
fn reply(err: &lapin::Error) -> (u16, String) {
    match err.kind() {
        ErrorKind::ProtocolError(e) => (e.get_id(), e.get_message().to_string()),
        other => panic!("expected an AMQP close from the server, got {other:?}"),
    }
}

/// Asserts `result` is the server closing with `code` and exactly `text`.
#[track_caller]
fn assert_closed_with<T: std::fmt::Debug>(result: lapin::Result<T>, code: u16, text: &str) {
    let err = result.expect_err("the server should have refused this");
    assert_eq!(reply(&err), (code, text.to_string()), "full error: {err}");
}

/// Asserts a soft error: the channel is gone but the connection is not.
async fn assert_only_channel_closed(conn: &Connection, ch: &Channel) {
    assert!(
        !ch.status().connected(),
        "the failed channel must be closed"
    );
    assert!(conn.status().connected(), "the connection must survive");
    assert_connection_usable(conn).await;
}

/// A fresh channel on `conn` can declare a queue, publish to it and get the message back.
async fn assert_connection_usable(conn: &Connection) {
    let ch = channel(conn).await;
    let q = within(
        "queue.declare",
        ch.queue_declare(
            "".into(),
            QueueDeclareOptions::exclusive(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("queue.declare on a fresh channel");
    publish(&ch, "", q.name().as_str(), b"still alive").await;
    let got = within(
        "basic.get",
        ch.basic_get(q.name().clone(), BasicGetOptions { no_ack: true }),
    )
    .await
    .expect("basic.get")
    .expect("the message just published");
    assert_eq!(got.delivery.data, b"still alive");
}

async fn publish(ch: &Channel, exchange: &str, routing_key: &str, body: &[u8]) {
    within(
        "basic.publish",
        ch.basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default(),
        ),
    )
    .await
    .expect("basic.publish is sent");
}

async fn declare_queue(ch: &Channel, name: &str, options: QueueDeclareOptions) {
    within(
        "queue.declare",
        ch.queue_declare(name.into(), options, FieldTable::default()),
    )
    .await
    .expect("queue.declare");
}

async fn declare_exchange(ch: &Channel, name: &str, kind: ExchangeKind) {
    within(
        "exchange.declare",
        ch.exchange_declare(
            name.into(),
            kind,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("exchange.declare");
}

/// Starts a consumer on a throwaway queue of `ch`, so the error the server
/// closes `ch` with is observable even after methods that have no reply
/// (basic.ack): lapin hands that error to every consumer of the channel.
async fn watch_channel(ch: &Channel) -> mpsc::UnboundedReceiver<lapin::Error> {
    let q = within(
        "queue.declare",
        ch.queue_declare(
            "".into(),
            QueueDeclareOptions::exclusive(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("queue.declare for the watcher");
    let consumer = within(
        "basic.consume",
        ch.basic_consume(
            q.name().clone(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("basic.consume for the watcher");
    let (tx, rx) = mpsc::unbounded_channel();
    consumer.set_delegate(move |delivery: lapin::message::DeliveryResult| {
        let tx = tx.clone();
        async move {
            if let Err(e) = delivery {
                let _ = tx.send(e);
            }
        }
    });
    rx
}

fn queue_not_found(name: &str) -> String {
    format!("NOT_FOUND - no queue '{name}' in vhost '/'")
}

fn exchange_not_found(name: &str) -> String {
    format!("NOT_FOUND - no exchange '{name}' in vhost '/'")
}

// ---------------------------------------------------------------------------
// 404 NOT_FOUND
// ---------------------------------------------------------------------------

/// A passive declare of a queue that does not exist closes the channel with 404.
#[tokio::test]
async fn passive_declare_of_missing_queue_is_not_found() {
    let b = common::start().await;
    let conn = connect(&b).await;
    let ch = channel(&conn).await;
    let name = common::unique("missing-q");

    let result = within(
        "queue.declare",
        ch.queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;

    assert_closed_with(result, 404, &queue_not_found(&name));
    assert_only_channel_closed(&conn, &ch).await;
}

/// A passive declare of an exchange that does not exist closes the channel with 404.
#[tokio::test]
async fn passive_declare_of_missing_exchange_is_not_found() {
    let b = common::start().await;
    let conn = connect(&b).await;
    let ch = channel(&conn).await;
    let name = common::unique("missing-x");

    let result = within(
        "exchange.declare",
        ch.exchange_declare(
            name.as_str().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;

    assert_closed_with(result, 404, &exchange_not_found(&name));
    assert_only_channel_closed(&conn, &ch).await;
}

/// Publishing to an exchange that does not exist closes the channel with 404
/// (seen through the publisher confirm, since basic.publish has no reply).
#[tokio::test]
async fn publish_to_missing_exchange_is_not_found() {
    let b = common::start().await;
    let conn = connect(&b).await;
    let ch = channel(&conn).await;
    within(
        "confirm.select",
        ch.confirm_select(ConfirmSelectOptions::default()),
    )
    .await
    .expect("confirm.select");
    let name = common::unique("missing-x");

    let confirm = within(
        "basic.publish",
        ch.basic_publish(
            name.as_str().into(),
            "rk".into(),
            BasicPublishOptions::default(),
            b"lost",
            BasicProperties::default(),
        ),
    )
    .await
    .expect("basic.publish is sent");
    let result = within("publisher confirm", confirm).await;

    assert_closed_with(result, 404, &exchange_not_found(&name));
    assert_only_channel_closed(&conn, &ch).await;
}

/// Binding a queue that does not exist closes the channel with 404.
#[tokio::test]
async fn bind_of_missing_queue_is_not_found() {
    let b = common::start().await;
    let conn = connect(&b).await;
    let ch = channel(&conn).await;
    let name = common::unique("missing-q");

    let result = within(
        "queue.bind",
        ch.queue_bind(
            name.as_str().into(),
            "amq.direct".into(),
            "rk".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;

    assert_closed_with(result, 404, &queue_not_found(&name));
    assert_only_channel_closed(&conn, &ch).await;
}

/// Binding an existing queue to an exchange that does not exist closes the channel with 404.
#[tokio::test]
async fn bind_to_missing_exchange_is_not_found() {
    let b = common::start().await;
    let conn = connect(&b).await;
    let ch = channel(&conn).await;
    let queue = common::unique("q");
    declare_queue(&ch, &queue, QueueDeclareOptions::exclusive()).await;
    let exchange = common::unique("missing-x");

    let result = within(
        "queue.bind",
        ch.queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "rk".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;

    assert_closed_with(result, 404, &exchange_not_found(&exchange));
    assert_only_channel_closed(&conn, &ch).await;
}

// ---------------------------------------------------------------------------
// 406 PRECONDITION_FAILED
// ---------------------------------------------------------------------------

/// Redeclaring a queue with a different `durable` flag closes the channel with 406.
#[tokio::test]
async fn redeclaring_queue_with_different_durability_fails_precondition() {
    let b = common::start().await;
    let conn = connect(&b).await;
    let ch = channel(&conn).await;
    let name = common::unique("q");
    declare_queue(
        &ch,
        &name,
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
    )
    .await;
    // Keep the auto-delete queue alive by consuming from another channel.
    let holder = channel(&conn).await;
    let _consumer = within(
        "basic.consume",
        holder.basic_consume(
            name.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("basic.consume");

    let result = within(
        "queue.declare",
        ch.queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;

    assert_closed_with(
        result,
        406,
        &format!(
            "PRECONDITION_FAILED - inequivalent arg 'durable' for queue '{name}' in vhost '/': received 'true' but current is 'false'"
        ),
    );
    assert_only_channel_closed(&conn, &ch).await;
}

/// Redeclaring a queue with a different `x-max-length` argument closes the channel with 406.
#[tokio::test]
async fn redeclaring_queue_with_different_arguments_fails_precondition() {
    let b = common::start().await;
    let conn = connect(&b).await;
    let ch = channel(&conn).await;
    let name = common::unique("q");
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(10));
    within(
        "queue.declare",
        ch.queue_declare(name.as_str().into(), QueueDeclareOptions::exclusive(), args),
    )
    .await
    .expect("queue.declare");

    let mut other_args = FieldTable::default();
    other_args.insert("x-max-length".into(), AMQPValue::LongInt(20));
    let result = within(
        "queue.declare",
        ch.queue_declare(
            name.as_str().into(),
            QueueDeclareOptions::exclusive(),
            other_args,
        ),
    )
    .await;

    assert_closed_with(
        result,
        406,
        &format!(
            "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue '{name}' in vhost '/': received '20' but current is '10'"
        ),
    );
    assert_only_channel_closed(&conn, &ch).await;
}

/// Redeclaring an exchange with a different type closes the channel with 406.
#[tokio::test]
async fn redeclaring_exchange_with_different_type_fails_precondition() {
    let b = common::start().await;
    let conn = connect(&b).await;
    let ch = channel(&conn).await;
    let name = common::unique("x");
    declare_exchange(&ch, &name, ExchangeKind::Direct).await;
    // An auto-delete exchange lives until its last binding goes: give it one.
    let queue = common::unique("q");
    declare_queue(&ch, &queue, QueueDeclareOptions::exclusive()).await;
    within(
        "queue.bind",
        ch.queue_bind(
            queue.as_str().into(),
            name.as_str().into(),
            "rk".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("queue.bind");

    let result = within(
        "exchange.declare",
        ch.exchange_declare(
            name.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;

    assert_closed_with(
        result,
        406,
        &format!(
            "PRECONDITION_FAILED - inequivalent arg 'type' for exchange '{name}' in vhost '/': received 'fanout' but current is 'direct'"
        ),
    );
    assert_only_channel_closed(&conn, &ch).await;
}

/// Redeclaring an exchange with a different `durable` flag closes the channel with 406.
#[tokio::test]
async fn redeclaring_exchange_with_different_durability_fails_precondition() {
    let b = common::start().await;
    let conn = connect(&b).await;
    let ch = channel(&conn).await;
    let name = common::unique("x");
    declare_exchange(&ch, &name, ExchangeKind::Topic).await;
    let queue = common::unique("q");
    declare_queue(&ch, &queue, QueueDeclareOptions::exclusive()).await;
    within(
        "queue.bind",
        ch.queue_bind(
            queue.as_str().into(),
            name.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("queue.bind");

    let result = within(
        "exchange.declare",
        ch.exchange_declare(
            name.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;

    assert_closed_with(
        result,
        406,
        &format!(
            "PRECONDITION_FAILED - inequivalent arg 'durable' for exchange '{name}' in vhost '/': received 'true' but current is 'false'"
        ),
    );
    assert_only_channel_closed(&conn, &ch).await;
}

/// Acking a delivery tag the channel never handed out closes the channel with 406.
#[tokio::test]
async fn ack_of_unknown_delivery_tag_fails_precondition() {
    let b = common::start().await;
    let conn = connect(&b).await;
    let ch = channel(&conn).await;
    let mut closed = watch_channel(&ch).await;

    within("basic.ack", ch.basic_ack(42, BasicAckOptions::default()))
        .await
        .expect("basic.ack is sent");
    let err = within("the channel to be closed", closed.recv())
        .await
        .expect("the consumer hears why the channel closed");

    assert_eq!(
        reply(&err),
        (
            406,
            "PRECONDITION_FAILED - unknown delivery tag 42".to_string()
        )
    );
    within("channel close to complete", async {
        while ch.status().connected() || ch.status().closing() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_only_channel_closed(&conn, &ch).await;
}

/// Deleting a queue with if-unused while it has a consumer closes the channel with 406.
#[tokio::test]
async fn delete_if_unused_of_consumed_queue_fails_precondition() {
    let b = common::start().await;
    let conn = connect(&b).await;
    let ch = channel(&conn).await;
    let name = common::unique("q");
    declare_queue(&ch, &name, QueueDeclareOptions::exclusive()).await;
    let consuming = channel(&conn).await;
    let _consumer = within(
        "basic.consume",
        consuming.basic_consume(
            name.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("basic.consume");

    let result = within(
        "queue.delete",
        ch.queue_delete(
            name.as_str().into(),
            QueueDeleteOptions {
                if_unused: true,
                ..Default::default()
            },
        ),
    )
    .await;

    assert_closed_with(
        result,
        406,
        &format!("PRECONDITION_FAILED - queue '{name}' in vhost '/' in use"),
    );
    assert_only_channel_closed(&conn, &ch).await;
}

/// Deleting a queue with if-empty while it holds a message closes the channel with 406.
#[tokio::test]
async fn delete_if_empty_of_nonempty_queue_fails_precondition() {
    let b = common::start().await;
    let conn = connect(&b).await;
    let ch = channel(&conn).await;
    let name = common::unique("q");
    declare_queue(&ch, &name, QueueDeclareOptions::exclusive()).await;
    // Wait for the publisher confirm so the message is surely in the queue.
    within(
        "confirm.select",
        ch.confirm_select(ConfirmSelectOptions::default()),
    )
    .await
    .expect("confirm.select");
    let confirm = within(
        "basic.publish",
        ch.basic_publish(
            "".into(),
            name.as_str().into(),
            BasicPublishOptions::default(),
            b"keep me",
            BasicProperties::default(),
        ),
    )
    .await
    .expect("basic.publish is sent");
    let confirmation = within("publisher confirm", confirm)
        .await
        .expect("publisher confirm");
    assert!(confirmation.is_ack(), "the broker must take the message");

    let result = within(
        "queue.delete",
        ch.queue_delete(
            name.as_str().into(),
            QueueDeleteOptions {
                if_empty: true,
                ..Default::default()
            },
        ),
    )
    .await;

    assert_closed_with(
        result,
        406,
        &format!("PRECONDITION_FAILED - queue '{name}' in vhost '/' not empty"),
    );
    assert_only_channel_closed(&conn, &ch).await;
}

/// Deleting an exchange with if-unused while it has a binding closes the channel with 406.
#[tokio::test]
async fn delete_if_unused_of_bound_exchange_fails_precondition() {
    let b = common::start().await;
    let conn = connect(&b).await;
    let ch = channel(&conn).await;
    let name = common::unique("x");
    declare_exchange(&ch, &name, ExchangeKind::Fanout).await;
    let queue = common::unique("q");
    declare_queue(&ch, &queue, QueueDeclareOptions::exclusive()).await;
    within(
        "queue.bind",
        ch.queue_bind(
            queue.as_str().into(),
            name.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("queue.bind");

    let result = within(
        "exchange.delete",
        ch.exchange_delete(
            name.as_str().into(),
            ExchangeDeleteOptions {
                if_unused: true,
                ..Default::default()
            },
        ),
    )
    .await;

    assert_closed_with(
        result,
        406,
        &format!("PRECONDITION_FAILED - exchange '{name}' in vhost '/' in use"),
    );
    assert_only_channel_closed(&conn, &ch).await;
}

/// Switching a transactional channel into confirm mode closes the channel with 406.
#[tokio::test]
async fn confirm_select_on_transactional_channel_fails_precondition() {
    let b = common::start().await;
    let conn = connect(&b).await;
    let ch = channel(&conn).await;
    within("tx.select", ch.tx_select())
        .await
        .expect("tx.select");

    let result = within(
        "confirm.select",
        ch.confirm_select(ConfirmSelectOptions::default()),
    )
    .await;

    assert_closed_with(
        result,
        406,
        "PRECONDITION_FAILED - cannot switch from tx to confirm mode",
    );
    assert_only_channel_closed(&conn, &ch).await;
}

/// Switching a confirm-mode channel into transactional mode closes the channel with 406.
#[tokio::test]
async fn tx_select_on_confirm_channel_fails_precondition() {
    let b = common::start().await;
    let conn = connect(&b).await;
    let ch = channel(&conn).await;
    within(
        "confirm.select",
        ch.confirm_select(ConfirmSelectOptions::default()),
    )
    .await
    .expect("confirm.select");

    let result = within("tx.select", ch.tx_select()).await;

    assert_closed_with(
        result,
        406,
        "PRECONDITION_FAILED - cannot switch from confirm to tx mode",
    );
    assert_only_channel_closed(&conn, &ch).await;
}

// ---------------------------------------------------------------------------
// 403 ACCESS_REFUSED (channel level)
// ---------------------------------------------------------------------------

/// Declaring an exchange whose name starts with `amq.` closes the channel with 403.
#[tokio::test]
async fn declaring_amq_prefixed_exchange_is_refused() {
    let b = common::start().await;
    let conn = connect(&b).await;
    let ch = channel(&conn).await;
    let name = format!("amq.{}", common::unique("x"));

    let result = within(
        "exchange.declare",
        ch.exchange_declare(
            name.as_str().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;

    assert_closed_with(
        result,
        403,
        &format!("ACCESS_REFUSED - exchange name '{name}' contains reserved prefix 'amq.*'"),
    );
    assert_only_channel_closed(&conn, &ch).await;
}

/// Binding a queue to the default exchange closes the channel with 403.
#[tokio::test]
async fn binding_to_default_exchange_is_refused() {
    let b = common::start().await;
    let conn = connect(&b).await;
    let ch = channel(&conn).await;
    let queue = common::unique("q");
    declare_queue(&ch, &queue, QueueDeclareOptions::exclusive()).await;

    let result = within(
        "queue.bind",
        ch.queue_bind(
            queue.as_str().into(),
            "".into(),
            "rk".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;

    assert_closed_with(
        result,
        403,
        "ACCESS_REFUSED - operation not permitted on the default exchange",
    );
    assert_only_channel_closed(&conn, &ch).await;
}

/// Deleting the default exchange closes the channel with 403.
#[tokio::test]
async fn deleting_default_exchange_is_refused() {
    let b = common::start().await;
    let conn = connect(&b).await;
    let ch = channel(&conn).await;

    let result = within(
        "exchange.delete",
        ch.exchange_delete("".into(), ExchangeDeleteOptions::default()),
    )
    .await;

    assert_closed_with(
        result,
        403,
        "ACCESS_REFUSED - operation not permitted on the default exchange",
    );
    assert_only_channel_closed(&conn, &ch).await;
}

/// A passive declare of the default exchange closes the channel with 403, as
/// RabbitMQ checks the default exchange before it looks the name up.
#[tokio::test]
async fn passive_declare_of_default_exchange_is_refused() {
    let b = common::start().await;
    let conn = connect(&b).await;
    let ch = channel(&conn).await;

    let result = within(
        "exchange.declare passive",
        ch.exchange_declare(
            "".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;

    assert_closed_with(
        result,
        403,
        "ACCESS_REFUSED - operation not permitted on the default exchange",
    );
    assert_only_channel_closed(&conn, &ch).await;
}

/// An exclusive consume on a queue that already has a consumer closes the channel with 403.
#[tokio::test]
async fn exclusive_consume_on_consumed_queue_is_refused() {
    let b = common::start().await;
    let conn = connect(&b).await;
    let first = channel(&conn).await;
    let name = common::unique("q");
    declare_queue(&first, &name, QueueDeclareOptions::exclusive()).await;
    let _consumer = within(
        "basic.consume",
        first.basic_consume(
            name.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("basic.consume");
    let ch = channel(&conn).await;

    let result = within(
        "basic.consume",
        ch.basic_consume(
            name.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;

    assert_closed_with(
        result,
        403,
        &format!("ACCESS_REFUSED - queue '{name}' in vhost '/' in exclusive use"),
    );
    assert_only_channel_closed(&conn, &ch).await;
}

/// A plain consume on a queue that already has an exclusive consumer closes the channel with 403.
#[tokio::test]
async fn consume_on_exclusively_consumed_queue_is_refused() {
    let b = common::start().await;
    let conn = connect(&b).await;
    let first = channel(&conn).await;
    let name = common::unique("q");
    declare_queue(&first, &name, QueueDeclareOptions::exclusive()).await;
    let _consumer = within(
        "basic.consume",
        first.basic_consume(
            name.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("basic.consume");
    let ch = channel(&conn).await;

    let result = within(
        "basic.consume",
        ch.basic_consume(
            name.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;

    assert_closed_with(
        result,
        403,
        &format!("ACCESS_REFUSED - queue '{name}' in vhost '/' in exclusive use"),
    );
    assert_only_channel_closed(&conn, &ch).await;
}

// ---------------------------------------------------------------------------
// 405 RESOURCE_LOCKED
// ---------------------------------------------------------------------------

fn locked_text(name: &str) -> String {
    format!(
        "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{name}' in vhost '/'. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration."
    )
}

/// Consuming from another connection's exclusive queue closes the channel with 405.
#[tokio::test]
async fn consuming_another_connections_exclusive_queue_is_locked() {
    let b = common::start().await;
    let owner = connect(&b).await;
    let owner_ch = channel(&owner).await;
    let name = common::unique("excl");
    declare_queue(&owner_ch, &name, QueueDeclareOptions::exclusive()).await;
    let conn = connect(&b).await;
    let ch = channel(&conn).await;

    let result = within(
        "basic.consume",
        ch.basic_consume(
            name.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;

    assert_closed_with(result, 405, &locked_text(&name));
    assert_only_channel_closed(&conn, &ch).await;
}

/// Redeclaring another connection's exclusive queue closes the channel with 405.
#[tokio::test]
async fn declaring_another_connections_exclusive_queue_is_locked() {
    let b = common::start().await;
    let owner = connect(&b).await;
    let owner_ch = channel(&owner).await;
    let name = common::unique("excl");
    declare_queue(&owner_ch, &name, QueueDeclareOptions::exclusive()).await;
    let conn = connect(&b).await;
    let ch = channel(&conn).await;

    let result = within(
        "queue.declare",
        ch.queue_declare(
            name.as_str().into(),
            QueueDeclareOptions::exclusive(),
            FieldTable::default(),
        ),
    )
    .await;

    assert_closed_with(result, 405, &locked_text(&name));
    assert_only_channel_closed(&conn, &ch).await;
}

/// Deleting another connection's exclusive queue closes the channel with 405.
#[tokio::test]
async fn deleting_another_connections_exclusive_queue_is_locked() {
    let b = common::start().await;
    let owner = connect(&b).await;
    let owner_ch = channel(&owner).await;
    let name = common::unique("excl");
    declare_queue(&owner_ch, &name, QueueDeclareOptions::exclusive()).await;
    let conn = connect(&b).await;
    let ch = channel(&conn).await;

    let result = within(
        "queue.delete",
        ch.queue_delete(name.as_str().into(), QueueDeleteOptions::default()),
    )
    .await;

    assert_closed_with(result, 405, &locked_text(&name));
    assert_only_channel_closed(&conn, &ch).await;
}

// ---------------------------------------------------------------------------
// Connection errors
// ---------------------------------------------------------------------------

/// Opening a vhost that does not exist is refused with 530 at connection.open.
#[tokio::test]
async fn unknown_vhost_is_not_allowed() {
    let b = common::start().await;
    let vhost = common::unique("no-such-vhost");
    let url = format!("amqp://guest:guest@{}/{}", b.addr, vhost);

    let result = within(
        "connection",
        Connection::connect(&url, ConnectionProperties::default()),
    )
    .await;

    assert_closed_with(
        result,
        530,
        &format!("NOT_ALLOWED - vhost {vhost} not found"),
    );
    assert_connection_usable(&connect(&b).await).await;
}

/// A wrong password is refused with 403 ACCESS_REFUSED.
#[tokio::test]
async fn wrong_password_is_refused() {
    let b = common::start().await;
    let url = format!("amqp://guest:not-the-password@{}/%2f", b.addr);

    let result = within(
        "connection",
        Connection::connect(&url, ConnectionProperties::default()),
    )
    .await;

    assert_closed_with(
        result,
        403,
        "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. For details see the broker logfile.",
    );
    assert_connection_usable(&connect(&b).await).await;
}

/// Declaring an exchange of an unknown type closes the whole connection with 503.
#[tokio::test]
async fn unknown_exchange_type_is_a_connection_error() {
    let b = common::start().await;
    let conn = connect(&b).await;
    let ch = channel(&conn).await;
    let name = common::unique("x");

    let result = within(
        "exchange.declare",
        ch.exchange_declare(
            name.as_str().into(),
            ExchangeKind::Custom("no-such-type".into()),
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;

    assert_closed_with(
        result,
        503,
        "COMMAND_INVALID - unknown exchange type 'no-such-type'",
    );
    assert_connection_closed(&conn).await;
    assert_connection_usable(&connect(&b).await).await;
}

/// Reusing a consumer tag on the same channel closes the whole connection with 530.
#[tokio::test]
async fn duplicate_consumer_tag_is_a_connection_error() {
    let b = common::start().await;
    let conn = connect(&b).await;
    let ch = channel(&conn).await;
    let name = common::unique("q");
    declare_queue(&ch, &name, QueueDeclareOptions::exclusive()).await;
    let tag = common::unique("tag");
    let consume = || {
        ch.basic_consume(
            name.as_str().into(),
            ShortString::from(tag.as_str()),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
    };
    let _first = within("basic.consume", consume())
        .await
        .expect("first basic.consume");

    let result = within("basic.consume", consume()).await;

    assert_closed_with(
        result,
        530,
        &format!("NOT_ALLOWED - attempt to reuse consumer tag '{tag}'"),
    );
    assert_connection_closed(&conn).await;
    assert_connection_usable(&connect(&b).await).await;
}

/// After a hard error the connection is closed and refuses new channels.
async fn assert_connection_closed(conn: &Connection) {
    within("connection to close", async {
        while conn.status().connected() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        within("channel.open", conn.create_channel()).await.is_err(),
        "a closed connection must not open channels"
    );
}
