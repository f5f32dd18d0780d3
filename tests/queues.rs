//! Queue lifecycle through the lapin client: declaration (server-named,
//! passive, exclusive, auto-delete), declare-ok counts, bindings, purge and
//! conditional delete.

mod common;
mod support;

use lapin::{options::*, types::FieldTable, Channel, Connection, ExchangeKind};
use support::*;

async fn declare(ch: &Channel, name: &str, options: QueueDeclareOptions) -> lapin::Queue {
    ok(
        "queue.declare",
        ch.queue_declare(name.into(), options, FieldTable::default()),
    )
    .await
}

fn passive() -> QueueDeclareOptions {
    QueueDeclareOptions {
        passive: true,
        ..Default::default()
    }
}

/// Whether `queue` exists, probed with a passive declare on a throwaway
/// channel of `conn` (a failed passive declare closes its channel).
async fn queue_exists(conn: &Connection, queue: &str) -> bool {
    let ch = channel(conn).await;
    let r = tokio::time::timeout(
        WAIT,
        ch.queue_declare(queue.into(), passive(), FieldTable::default()),
    )
    .await
    .expect("passive queue.declare timed out");
    match r {
        Ok(_) => {
            let _ = ch.close(200, "bye".into()).await;
            true
        }
        Err(e) => match e.kind() {
            lapin::ErrorKind::ProtocolError(err) if err.get_id() == 404 => false,
            other => panic!("unexpected passive declare error {other:?}"),
        },
    }
}

/// Waits (polling, bounded by [`WAIT`]) for `queue` to disappear: some
/// deletions (auto-delete, exclusive) complete just after the triggering
/// reply in RabbitMQ.
async fn assert_gone_soon(conn: &Connection, queue: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while queue_exists(conn, queue).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "queue {queue} still exists after {WAIT:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Declaring a queue with an empty name makes the server pick a unique
/// "amq.gen-" name, returned in declare-ok, that is usable right away.
#[tokio::test]
async fn server_named_queues_get_unique_amq_gen_names() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let opts = QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    };
    let q1 = declare(&ch, "", opts).await;
    let q2 = declare(&ch, "", opts).await;
    assert!(
        q1.name().as_str().starts_with("amq.gen-"),
        "{:?}",
        q1.name()
    );
    assert!(
        q2.name().as_str().starts_with("amq.gen-"),
        "{:?}",
        q2.name()
    );
    assert_ne!(q1.name(), q2.name());
    assert_eq!((q1.message_count(), q1.consumer_count()), (0, 0));

    publish(&ch, "", q1.name().as_str(), b"hi").await;
    assert_eq!(
        get_body(&ch, q1.name().as_str()).await.as_deref(),
        Some(&b"hi"[..])
    );
}

/// A passive declare reports the counts of an existing queue and does not
/// create a missing one: it fails with 404 NOT_FOUND instead.
#[tokio::test]
async fn passive_declare_checks_existence_without_creating() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    confirm_mode(&ch).await;
    let q = temp_queue(&ch, "passive").await;
    publish(&ch, "", &q, b"1").await;
    publish(&ch, "", &q, b"2").await;
    settle(&ch).await;
    let p = declare(&ch, &q, passive()).await;
    assert_eq!(p.name().as_str(), q);
    assert_eq!((p.message_count(), p.consumer_count()), (2, 0));

    let missing = common::unique("missing");
    let bad = channel(&conn).await;
    let (code, text) = amqp_err(
        "passive declare of missing queue",
        bad.queue_declare(missing.as_str().into(), passive(), FieldTable::default()),
    )
    .await;
    assert_eq!(code, 404, "{text}");
    assert!(text.starts_with("NOT_FOUND"), "{text}");
    assert!(text.contains(&missing), "{text}");
    assert!(
        !queue_exists(&conn, &missing).await,
        "passive declare created it"
    );
}

/// Re-declaring an existing queue with the same properties succeeds and
/// returns its current counts; declaring it with different properties fails
/// with 406 PRECONDITION_FAILED.
#[tokio::test]
async fn redeclare_is_idempotent_but_must_match() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let q = common::unique("redeclare");
    let opts = QueueDeclareOptions {
        auto_delete: true,
        ..Default::default()
    };
    confirm_mode(&ch).await;
    declare(&ch, &q, opts).await;
    publish(&ch, "", &q, b"x").await;
    settle(&ch).await;
    let again = declare(&ch, &q, opts).await;
    assert_eq!((again.message_count(), again.consumer_count()), (1, 0));

    let bad = channel(&conn).await;
    let (code, text) = amqp_err(
        "declare with different auto_delete",
        bad.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_eq!(code, 406, "{text}");
    assert!(text.starts_with("PRECONDITION_FAILED"), "{text}");
    ok(
        "queue.delete",
        ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()),
    )
    .await;
}

/// An exclusive queue can only be used by its declaring connection (others
/// get 405 RESOURCE_LOCKED) and is deleted when that connection closes.
#[tokio::test]
async fn exclusive_queue_is_private_and_dies_with_its_connection() {
    let b = common::start().await;
    let (owner, ch) = open(&b).await;
    confirm_mode(&ch).await;
    let q = temp_queue(&ch, "exclusive").await;
    publish(&ch, "", &q, b"mine").await;
    settle(&ch).await;

    let other = connect(&b).await;
    let och = channel(&other).await;
    let (code, text) = amqp_err(
        "basic.get from another connection",
        och.basic_get(q.as_str().into(), BasicGetOptions::default()),
    )
    .await;
    assert_eq!(code, 405, "{text}");
    assert!(text.starts_with("RESOURCE_LOCKED"), "{text}");

    let och = channel(&other).await;
    let (code, _) = amqp_err(
        "basic.consume from another connection",
        och.basic_consume(
            q.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_eq!(code, 405);

    let och = channel(&other).await;
    let (code, _) = amqp_err(
        "declare from another connection",
        och.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
    assert_eq!(code, 405);

    // The owner still uses it freely.
    assert_eq!(counts(&ch, &q).await, (1, 0));
    ok("connection.close", owner.close(200, "bye".into())).await;
    assert_gone_soon(&other, &q).await;
}

/// An auto-delete queue lives until it has had a consumer and the last
/// consumer goes away; then it is deleted.
#[tokio::test]
async fn auto_delete_queue_deleted_after_last_consumer_cancels() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let q = common::unique("autodel");
    declare(
        &ch,
        &q,
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
    )
    .await;
    assert!(
        queue_exists(&conn, &q).await,
        "never-consumed queue must stay"
    );

    let c1 = consume(&ch, &q, false).await;
    let c2 = consume(&ch, &q, false).await;
    assert_eq!(counts(&ch, &q).await, (0, 2));
    ok(
        "basic.cancel",
        ch.basic_cancel(c1.tag().as_str().into(), BasicCancelOptions::default()),
    )
    .await;
    assert!(queue_exists(&conn, &q).await, "one consumer left");
    ok(
        "basic.cancel",
        ch.basic_cancel(c2.tag().as_str().into(), BasicCancelOptions::default()),
    )
    .await;
    assert_gone_soon(&conn, &q).await;
}

/// An auto-delete queue also goes away when its last consumer's channel closes.
#[tokio::test]
async fn auto_delete_queue_deleted_when_consumer_channel_closes() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let q = common::unique("autodel-close");
    declare(
        &ch,
        &q,
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
    )
    .await;
    let cch = channel(&conn).await;
    let _sub = consume(&cch, &q, false).await;
    assert_eq!(counts(&ch, &q).await, (0, 1));
    ok("channel.close", cch.close(200, "bye".into())).await;
    assert_gone_soon(&conn, &q).await;
}

/// declare-ok counts only ready messages (not those delivered and awaiting
/// ack) and the number of consumers.
#[tokio::test]
async fn declare_ok_counts_ready_messages_and_consumers() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    confirm_mode(&ch).await;
    let q = temp_queue(&ch, "counts").await;
    assert_eq!(counts(&ch, &q).await, (0, 0));
    for i in 0..3 {
        publish(&ch, "", &q, format!("m{i}").as_bytes()).await;
    }
    settle(&ch).await;
    assert_eq!(counts(&ch, &q).await, (3, 0));

    let cch = channel(&conn).await;
    ok("basic.qos", cch.basic_qos(1, BasicQosOptions::default())).await;
    let mut sub = consume(&cch, &q, false).await;
    let first = sub.next().await;
    assert_eq!(text(&first), "m0");
    // One delivered-but-unacked message is not "ready".
    assert_eq!(counts(&ch, &q).await, (2, 1));
    let _idle = consume(&cch, &q, false).await;
    assert_eq!(counts(&ch, &q).await.1, 2);
}

/// queue.bind makes matching messages flow into the queue; queue.unbind
/// stops them; unbinding a binding that does not exist is not an error.
#[tokio::test]
async fn bind_and_unbind_control_routing() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let x = temp_exchange(&ch, ExchangeKind::Direct, "bindx").await;
    let q = temp_queue(&ch, "bindq").await;
    publish(&ch, &x, "k", b"before-bind").await;
    bind(&ch, &q, &x, "k").await;
    publish(&ch, &x, "k", b"bound").await;
    ok(
        "queue.unbind",
        ch.queue_unbind(
            q.as_str().into(),
            x.as_str().into(),
            "k".into(),
            FieldTable::default(),
        ),
    )
    .await;
    publish(&ch, &x, "k", b"after-unbind").await;
    assert_eq!(drain(&ch, &q).await, strs(&["bound"]));
    ok(
        "queue.unbind of missing binding",
        ch.queue_unbind(
            q.as_str().into(),
            x.as_str().into(),
            "never".into(),
            FieldTable::default(),
        ),
    )
    .await;
    delete_exchange(&ch, &x).await;
}

/// As in RabbitMQ 3.10, unbinding what is already gone is not an error: a missing
/// queue or exchange at either end, or a pair never bound, even on another
/// connection's exclusive queue, answers unbind-ok. Teardown code (aio-pika's RPC
/// pattern, whose server-named reply queue is gone when it unbinds) relies on it.
/// The default exchange is still refused.
#[tokio::test]
async fn unbinding_what_is_gone_is_not_an_error() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let x = temp_exchange(&ch, ExchangeKind::Direct, "gonex").await;
    let unbind = |ch: Channel, q: String, x: String| async move {
        ch.queue_unbind(
            q.as_str().into(),
            x.as_str().into(),
            "k".into(),
            FieldTable::default(),
        )
        .await
    };
    ok(
        "unbind from a missing queue",
        unbind(ch.clone(), "no-such-queue".into(), x.clone()),
    )
    .await;
    let q = temp_queue(&ch, "goneq").await;
    ok(
        "unbind from a missing exchange",
        unbind(ch.clone(), q.clone(), "no-such-exchange".into()),
    )
    .await;
    ok(
        "exchange.unbind with both ends missing",
        ch.exchange_unbind(
            "no-dest".into(),
            "no-source".into(),
            "k".into(),
            ExchangeUnbindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    // Another connection's exclusive queue, never bound to x: nothing to remove.
    let other = channel(&connect(&b).await).await;
    ok(
        "unbind a never-bound pair",
        unbind(other.clone(), q.clone(), x.clone()),
    )
    .await;
    // But a real binding of an exclusive queue is only the owner's to remove.
    bind(&ch, &q, &x, "k").await;
    let (code, _) = amqp_err(
        "unbind another's exclusive binding",
        unbind(other, q.clone(), x.clone()),
    )
    .await;
    assert_eq!(code, 405);
    let ch2 = channel(&conn).await;
    let (code, text) = amqp_err(
        "unbind from the default exchange",
        unbind(ch2, q.clone(), "".into()),
    )
    .await;
    assert_eq!(code, 403);
    assert_eq!(
        text,
        "ACCESS_REFUSED - operation not permitted on the default exchange"
    );
}

/// Binding to an exchange or a queue that does not exist fails with 404 NOT_FOUND.
#[tokio::test]
async fn bind_to_missing_exchange_or_queue_is_not_found() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let q = temp_queue(&ch, "bind404").await;
    let missing_x = common::unique("nox");
    let (code, text) = amqp_err(
        "bind to missing exchange",
        ch.queue_bind(
            q.as_str().into(),
            missing_x.as_str().into(),
            "k".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_eq!(code, 404, "{text}");
    assert!(
        text.starts_with("NOT_FOUND") && text.contains(&missing_x),
        "{text}"
    );

    let ch2 = channel(&conn).await;
    let missing_q = common::unique("noq");
    let (code, text) = amqp_err(
        "bind missing queue",
        ch2.queue_bind(
            missing_q.as_str().into(),
            "amq.direct".into(),
            "k".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_eq!(code, 404, "{text}");
    assert!(
        text.starts_with("NOT_FOUND") && text.contains(&missing_q),
        "{text}"
    );
}

/// queue.purge removes the ready messages and reports how many; messages
/// delivered but not yet acked are not purged and come back when rejected.
#[tokio::test]
async fn purge_reports_count_and_spares_unacked() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let q = temp_queue(&ch, "purge").await;
    for i in 0..5 {
        publish(&ch, "", &q, format!("m{i}").as_bytes()).await;
    }
    let held = get(&ch, &q).await.expect("one message");
    assert_eq!(held.delivery.data, b"m0");
    let purged = ok(
        "queue.purge",
        ch.queue_purge(q.as_str().into(), QueuePurgeOptions::default()),
    )
    .await;
    assert_eq!(purged, 4);
    assert_eq!(counts(&ch, &q).await, (0, 0));
    ok(
        "basic.reject requeue",
        held.delivery.reject(BasicRejectOptions { requeue: true }),
    )
    .await;
    assert_eq!(drain(&ch, &q).await, strs(&["m0"]));
    let again = ok(
        "queue.purge",
        ch.queue_purge(q.as_str().into(), QueuePurgeOptions::default()),
    )
    .await;
    assert_eq!(again, 0);
}

/// queue.delete reports the number of messages deleted along with the queue;
/// its bindings go with it.
#[tokio::test]
async fn delete_reports_message_count_and_drops_bindings() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let x = temp_exchange(&ch, ExchangeKind::Fanout, "delx").await;
    let q = common::unique("del");
    declare(&ch, &q, QueueDeclareOptions::default()).await;
    bind(&ch, &q, &x, "").await;
    confirm_mode(&ch).await;
    for _ in 0..3 {
        publish(&ch, &x, "", b"m").await;
    }
    settle(&ch).await;
    let n = ok(
        "queue.delete",
        ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()),
    )
    .await;
    assert_eq!(n, 3);
    assert!(!queue_exists(&conn, &q).await);

    // A queue re-created under the same name starts empty and unbound.
    declare(
        &ch,
        &q,
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
    )
    .await;
    publish(&ch, &x, "", b"after").await;
    assert_eq!(counts(&ch, &q).await, (0, 0));
    delete_exchange(&ch, &x).await;
}

/// Deleting a queue that does not exist succeeds with a count of 0.
#[tokio::test]
async fn delete_missing_queue_is_ok() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let n = ok(
        "queue.delete missing",
        ch.queue_delete(
            common::unique("ghost").as_str().into(),
            QueueDeleteOptions::default(),
        ),
    )
    .await;
    assert_eq!(n, 0);
}

/// queue.delete with if-unused refuses (406 PRECONDITION_FAILED) while the
/// queue has consumers, and succeeds once they are gone.
#[tokio::test]
async fn delete_if_unused_refuses_queue_with_consumers() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let q = temp_queue(&ch, "ifunused").await;
    let cch = channel(&conn).await;
    let sub = consume(&cch, &q, false).await;
    let bad = channel(&conn).await;
    let (code, text) = amqp_err(
        "delete if-unused",
        bad.queue_delete(
            q.as_str().into(),
            QueueDeleteOptions {
                if_unused: true,
                ..Default::default()
            },
        ),
    )
    .await;
    assert_eq!(code, 406, "{text}");
    assert!(text.starts_with("PRECONDITION_FAILED"), "{text}");
    assert!(queue_exists(&conn, &q).await);

    ok(
        "basic.cancel",
        cch.basic_cancel(sub.tag().as_str().into(), BasicCancelOptions::default()),
    )
    .await;
    ok(
        "delete if-unused",
        ch.queue_delete(
            q.as_str().into(),
            QueueDeleteOptions {
                if_unused: true,
                ..Default::default()
            },
        ),
    )
    .await;
    assert!(!queue_exists(&conn, &q).await);
}

/// queue.delete with if-empty refuses (406 PRECONDITION_FAILED) while the
/// queue holds messages, and succeeds once it is empty.
#[tokio::test]
async fn delete_if_empty_refuses_queue_with_messages() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    confirm_mode(&ch).await;
    let q = temp_queue(&ch, "ifempty").await;
    publish(&ch, "", &q, b"m").await;
    settle(&ch).await;
    let bad = channel(&conn).await;
    let (code, text) = amqp_err(
        "delete if-empty",
        bad.queue_delete(
            q.as_str().into(),
            QueueDeleteOptions {
                if_empty: true,
                ..Default::default()
            },
        ),
    )
    .await;
    assert_eq!(code, 406, "{text}");
    assert!(text.starts_with("PRECONDITION_FAILED"), "{text}");
    assert_eq!(counts(&ch, &q).await, (1, 0));

    assert_eq!(drain(&ch, &q).await, strs(&["m"]));
    let n = ok(
        "delete if-empty",
        ch.queue_delete(
            q.as_str().into(),
            QueueDeleteOptions {
                if_empty: true,
                ..Default::default()
            },
        ),
    )
    .await;
    assert_eq!(n, 0);
    assert!(!queue_exists(&conn, &q).await);
}

/// Queue names starting with "amq." are reserved: declaring one fails with
/// 403 ACCESS_REFUSED.
#[tokio::test]
async fn amq_prefixed_queue_names_are_reserved() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let (code, text) = amqp_err(
        "declare amq.* queue",
        ch.queue_declare(
            common::unique("amq.mine").as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_eq!(code, 403, "{text}");
    assert!(text.starts_with("ACCESS_REFUSED"), "{text}");
}
