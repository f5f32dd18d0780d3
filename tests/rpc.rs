//! Direct reply-to (`amq.rabbitmq.reply-to`): RPC replies go straight to the
//! requesting channel's consumer without a reply queue.

mod common;
mod support;

use lapin::options::*;
use lapin::types::FieldTable;
use lapin::BasicProperties;
use support::*;

/// A client consumes from amq.rabbitmq.reply-to (no-ack), publishes a request
/// with reply_to = amq.rabbitmq.reply-to; the server sees a generated reply
/// address and its reply reaches the client's consumer.
#[tokio::test]
async fn rpc_reply_reaches_the_requesting_channel() {
    let b = common::start().await;
    let conn = connect(&b).await;
    let server = channel(&conn).await;
    let client = channel(&conn).await;
    let requests = temp_queue(&server, "rpc-requests").await;
    let mut replies = consume(&client, "amq.rabbitmq.reply-to", true).await;
    let mut incoming = consume(&server, &requests, false).await;

    publish_props(
        &client,
        "",
        &requests,
        b"ping",
        BasicProperties::default()
            .with_reply_to("amq.rabbitmq.reply-to".into())
            .with_correlation_id("c-1".into()),
    )
    .await;
    let request = incoming.next().await;
    let reply_to = request
        .properties
        .reply_to()
        .clone()
        .expect("reply_to is set")
        .to_string();
    assert!(
        reply_to.starts_with("amq.rabbitmq.reply-to."),
        "the broker rewrote reply_to into a reply address: {reply_to}"
    );
    publish_props(
        &server,
        "",
        &reply_to,
        b"pong",
        BasicProperties::default().with_correlation_id("c-1".into()),
    )
    .await;
    ok("ack", request.ack(BasicAckOptions::default())).await;
    let reply = replies.next().await;
    assert_eq!(text(&reply), "pong");
    assert_eq!(
        reply
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str()),
        Some("c-1")
    );
}

/// Publishing with reply_to = amq.rabbitmq.reply-to without consuming from it
/// first closes the channel with 406.
#[tokio::test]
async fn reply_to_without_reply_consumer_is_refused() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let q = temp_queue(&ch, "rpc-noconsumer").await;
    let pub_ch = channel(&conn).await;
    confirm_mode(&pub_ch).await;
    let sent = pub_ch
        .basic_publish(
            "".into(),
            q.as_str().into(),
            BasicPublishOptions::default(),
            b"req",
            BasicProperties::default().with_reply_to("amq.rabbitmq.reply-to".into()),
        )
        .await;
    let err = match sent {
        Err(e) => e,
        Ok(confirm) => tokio::time::timeout(WAIT, confirm)
            .await
            .expect("the confirm settles")
            .expect_err("the publish must fail with a channel error"),
    };
    let code = match err.kind() {
        lapin::ErrorKind::ProtocolError(e) => e.get_id(),
        other => panic!("expected a channel close, got {other:?}"),
    };
    assert_eq!(code, 406);
}

/// The reply consumer must be no-ack.
#[tokio::test]
async fn reply_consumer_must_be_no_ack() {
    let b = common::start().await;
    let (_conn, ch) = open(&b).await;
    let (code, text) = amqp_err(
        "basic.consume",
        ch.basic_consume(
            "amq.rabbitmq.reply-to".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_eq!(code, 406);
    assert!(text.starts_with("PRECONDITION_FAILED - "), "{text}");
}
