//! Connection and channel lifecycle through the lapin client: handshake,
//! tuning, authentication, vhosts, many channels, heartbeats and close.

mod common;
mod support;

use std::time::Duration;

use lapin::{options::*, types::FieldTable, Connection, ConnectionProperties};
use support::*;

/// Tries to connect to `url` and returns the AMQP (reply code, text) the
/// broker refused it with.
async fn refused(url: &str) -> (u16, String) {
    let r = tokio::time::timeout(
        WAIT,
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .expect("connect timed out");
    match r {
        Ok(_) => panic!("connection to {url} unexpectedly succeeded"),
        Err(e) => match e.kind() {
            lapin::ErrorKind::ProtocolError(err) => {
                (err.get_id(), err.get_message().as_str().to_string())
            }
            other => panic!("expected an AMQP connection.close, got {other:?}"),
        },
    }
}

/// A client connects with guest/guest on "/", opens a channel, uses it and
/// closes the connection cleanly.
#[tokio::test]
async fn connect_use_and_close_cleanly() {
    let b = common::start().await;
    let conn = connect(&b).await;
    assert!(conn.status().connected());
    assert_eq!(conn.status().vhost().as_str(), "/");
    let ch = channel(&conn).await;
    let q = temp_queue(&ch, "hello").await;
    publish(&ch, "", &q, b"hi").await;
    assert_eq!(drain(&ch, &q).await, strs(&["hi"]));
    ok("connection.close", conn.close(200, "bye".into())).await;
    // The close handshake completes cleanly: the client must not see an IO
    // error. (RabbitMQ keeps the socket open after close-ok until the client
    // closes it; a broker that drops it at once can leave lapin in Error.)
    assert!(
        conn.status().closed(),
        "status after close: {:?}",
        conn.status()
    );
    assert!(
        ch.queue_declare(
            "".into(),
            QueueDeclareOptions::default(),
            FieldTable::default()
        )
        .await
        .is_err(),
        "channel usable after connection close"
    );
}

/// Without client preferences the connection uses the broker's tuning
/// (RabbitMQ defaults: frame-max 131072, channel-max 2047, heartbeat 60s).
#[tokio::test]
async fn default_tuning_matches_rabbitmq() {
    let b = common::start().await;
    let conn = connect(&b).await;
    let cfg = conn.configuration();
    assert_eq!(cfg.frame_max(), 131_072);
    assert_eq!(cfg.channel_max(), 2047);
    assert_eq!(cfg.heartbeat(), 60);
}

/// A client asking for smaller limits gets them, and messages larger than
/// the small frame size still travel intact (split into many body frames).
#[tokio::test]
async fn client_can_negotiate_smaller_limits() {
    let b = common::start().await;
    let url = format!("{}?frame_max=4096&channel_max=8&heartbeat=5", b.url());
    let conn = connect_url(&url).await;
    let cfg = conn.configuration();
    assert_eq!(cfg.frame_max(), 4096);
    assert_eq!(cfg.channel_max(), 8);
    assert_eq!(cfg.heartbeat(), 5);

    let ch = channel(&conn).await;
    let q = temp_queue(&ch, "smallframes").await;
    let body: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 256) as u8).collect();
    publish(&ch, "", &q, &body).await;
    let got = get_body(&ch, &q).await.expect("big message");
    assert_eq!(got.len(), body.len());
    assert!(got == body, "body corrupted across frames");
}

/// The AMQPLAIN mechanism is accepted as well as PLAIN.
#[tokio::test]
async fn amqplain_authentication_works() {
    let b = common::start().await;
    let url = format!("{}?auth_mechanism=amqplain", b.url());
    let conn = connect_url(&url).await;
    let ch = channel(&conn).await;
    temp_queue(&ch, "amqplain").await;
}

/// A wrong password is refused with 403 ACCESS_REFUSED.
#[tokio::test]
async fn wrong_password_is_refused() {
    let b = common::start().await;
    let url = b.url().replace("guest:guest@", "guest:not-the-password@");
    let (code, text) = refused(&url).await;
    assert_eq!(code, 403, "{text}");
    assert!(text.starts_with("ACCESS_REFUSED"), "{text}");
}

/// An unknown user is refused with 403 ACCESS_REFUSED.
#[tokio::test]
async fn unknown_user_is_refused() {
    let b = common::start().await;
    let url = b.url().replace("guest:guest@", "nobody-here:guest@");
    let (code, text) = refused(&url).await;
    assert_eq!(code, 403, "{text}");
    assert!(text.starts_with("ACCESS_REFUSED"), "{text}");
}

/// Opening a vhost that does not exist fails with 530 NOT_ALLOWED.
#[tokio::test]
async fn unknown_vhost_is_not_allowed() {
    let b = common::start().await;
    let vhost = common::unique("no-such-vhost");
    let url = b.url().replace("/%2f", &format!("/{vhost}"));
    let (code, text) = refused(&url).await;
    assert_eq!(code, 530, "{text}");
    assert!(text.starts_with("NOT_ALLOWED"), "{text}");
    assert!(text.contains(&vhost), "{text}");
}

/// Many channels on one connection work independently, each with its own
/// channel id.
#[tokio::test]
async fn many_channels_work_independently() {
    let b = common::start().await;
    let conn = connect(&b).await;
    let mut chans = Vec::new();
    for _ in 0..50 {
        chans.push(channel(&conn).await);
    }
    let mut ids: Vec<u16> = chans.iter().map(|c| c.id()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 50);
    let mut queues = Vec::new();
    for (i, c) in chans.iter().enumerate() {
        let q = temp_queue(c, "perchan").await;
        publish(c, "", &q, format!("from-{i}").as_bytes()).await;
        queues.push(q);
    }
    for (i, (c, q)) in chans.iter().zip(&queues).enumerate() {
        assert_eq!(drain(c, q).await, vec![format!("from-{i}")]);
    }
}

/// Closing one channel, or one channel failing with an error, leaves the
/// other channels of the connection working.
#[tokio::test]
async fn channel_close_or_error_does_not_affect_siblings() {
    let b = common::start().await;
    let conn = connect(&b).await;
    let keep = channel(&conn).await;
    let q = temp_queue(&keep, "sibling").await;

    let closing = channel(&conn).await;
    ok("channel.close", closing.close(200, "done".into())).await;

    let failing = channel(&conn).await;
    let (code, _) = amqp_err(
        "passive declare of missing queue",
        failing.queue_declare(
            common::unique("missing").as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
    assert_eq!(code, 404);

    publish(&keep, "", &q, b"still-here").await;
    assert_eq!(drain(&keep, &q).await, strs(&["still-here"]));
    // And the connection can still open new channels.
    let fresh = channel(&conn).await;
    publish(&fresh, "", &q, b"fresh").await;
    assert_eq!(drain(&fresh, &q).await, strs(&["fresh"]));
    assert!(conn.status().connected());
}

/// Closing a connection requeues its unacked messages (as redelivered) and
/// ends its consumers, while other connections carry on.
#[tokio::test]
async fn connection_close_requeues_unacked_and_ends_consumers() {
    let b = common::start().await;
    let (_owner, ch) = open(&b).await;
    let q = common::unique("shared");
    ok(
        "queue.declare",
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                auto_delete: false,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
    publish(&ch, "", &q, b"m0").await;
    publish(&ch, "", &q, b"m1").await;

    let worker = connect(&b).await;
    let wch = channel(&worker).await;
    let mut sub = consume(&wch, &q, false).await;
    let got = sub.take(2).await;
    assert!(got.iter().all(|d| !d.redelivered));
    ok("connection.close", worker.close(200, "bye".into())).await;
    sub.cancelled().await;

    let other = connect(&b).await;
    let och = channel(&other).await;
    let mut s2 = consume(&och, &q, false).await;
    let again = s2.take(2).await;
    assert_eq!(texts(&again), strs(&["m0", "m1"]));
    assert!(again.iter().all(|d| d.redelivered));
    ok(
        "queue.delete",
        ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()),
    )
    .await;
}

/// Messages flow between separate connections.
#[tokio::test]
async fn messages_flow_between_connections() {
    let b = common::start().await;
    let (_c1, consumer_ch) = open(&b).await;
    let q = common::unique("between");
    ok(
        "queue.declare",
        consumer_ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
    let mut sub = consume(&consumer_ch, &q, true).await;
    let (_c2, producer_ch) = open(&b).await;
    for i in 0..10 {
        publish(&producer_ch, "", &q, format!("m{i}").as_bytes()).await;
    }
    let got = texts(&sub.take(10).await);
    assert_eq!(got, (0..10).map(|i| format!("m{i}")).collect::<Vec<_>>());
}

/// With a short heartbeat an idle connection stays open: client and broker
/// keep exchanging heartbeats.
#[tokio::test]
async fn idle_connection_survives_with_heartbeats() {
    let b = common::start().await;
    let url = format!("{}?heartbeat=1", b.url());
    let conn = connect_url(&url).await;
    assert_eq!(conn.configuration().heartbeat(), 1);
    let ch = channel(&conn).await;
    // Idle for several heartbeat intervals; a broker that misses or fails to
    // send heartbeats drops the connection in this time.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert!(conn.status().connected(), "connection dropped while idle");
    let q = temp_queue(&ch, "heartbeat").await;
    publish(&ch, "", &q, b"alive").await;
    assert_eq!(drain(&ch, &q).await, strs(&["alive"]));
}
