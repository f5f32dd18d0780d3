//! Malformed and out-of-order traffic on a raw TCP socket.
//!
//! Clients never send these bytes on purpose, so only a hand-built stream can
//! check that the broker answers protocol violations the way RabbitMQ does:
//! a `connection.close` with the right reply code, then closing the socket,
//! and that one broken client never takes the broker down for everyone else.
//!
//! Frames are built by hand (AMQP 0-9-1 section 4.2.3): type octet, channel
//! short, payload size long, payload, frame-end octet 0xCE.

mod common;
mod raw;

use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use tokio::io::AsyncWriteExt;

use common::TestBroker;
use raw::*;

// ---------------------------------------------------------------------------
// Protocol header
// ---------------------------------------------------------------------------

/// Asserts the broker answers `header` with its own AMQP 0-9-1 header and closes the socket.
async fn assert_header_rejected(b: &TestBroker, header: &[u8]) {
    let mut stream = tcp(b).await;
    stream.write_all(header).await.unwrap();
    let mut reply = [0u8; 8];
    read_exact_timed(&mut stream, &mut reply)
        .await
        .expect("the broker answers with its protocol header");
    assert_eq!(&reply, PROTOCOL_HEADER);
    expect_eof(&mut stream).await;
}

/// An AMQP 0-8 protocol header gets the 0-9-1 header back and the socket closed.
#[tokio::test]
async fn amqp_0_8_header_gets_supported_version_and_close() {
    let b = common::start().await;
    assert_header_rejected(&b, b"AMQP\x00\x00\x08\x00").await;
    assert_broker_still_serves(&b).await;
}

/// An HTTP request instead of a protocol header gets the AMQP header back and the socket closed.
#[tokio::test]
async fn http_request_gets_amqp_header_and_close() {
    let b = common::start().await;
    assert_header_rejected(&b, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert_broker_still_serves(&b).await;
}

/// Garbage right after a valid protocol header (where start-ok belongs) gets the socket closed.
#[tokio::test]
async fn garbage_instead_of_start_ok_closes_socket() {
    let b = common::start().await;
    let mut stream = tcp(&b).await;
    stream.write_all(PROTOCOL_HEADER).await.unwrap();
    stream
        .write_all(b"this is not an amqp frame, just garbage bytes")
        .await
        .unwrap();
    expect_method(&mut stream, 0, CONNECTION_START).await;

    // RabbitMQ closes the socket without connection.close here: frame_max is
    // not negotiated yet. A close, if sent, must be a frame error.
    if let Some(close) = read_until_closed(&mut stream).await {
        assert_eq!(close.code, 501, "{close:?}");
    }
    assert_broker_still_serves(&b).await;
}

/// A protocol header cut short and followed by closing the write side gets the socket closed.
#[tokio::test]
async fn truncated_protocol_header_then_eof_closes_socket() {
    let b = common::start().await;
    let mut stream = tcp(&b).await;
    stream.write_all(&PROTOCOL_HEADER[..4]).await.unwrap();
    stream.shutdown().await.unwrap();

    expect_eof(&mut stream).await;
    assert_broker_still_serves(&b).await;
}

// ---------------------------------------------------------------------------
// Framing errors: 501 FRAME_ERROR
// ---------------------------------------------------------------------------

/// Garbage bytes after the handshake close the connection with 501.
#[tokio::test]
async fn garbage_after_handshake_is_frame_error() {
    let b = common::start().await;
    let mut raw = handshake(&b).await;

    raw.send(b"this is not an amqp frame, just garbage bytes")
        .await;

    let close = raw.expect_connection_close().await;
    assert_eq!(close.code, 501, "{close:?}");
    assert_text_starts_with(&close, "FRAME_ERROR");
    assert_broker_still_serves(&b).await;
}

/// A frame header announcing more than the negotiated frame_max closes the connection with 501.
#[tokio::test]
async fn frame_larger_than_frame_max_is_frame_error() {
    let b = common::start().await;
    let mut raw = handshake(&b).await;
    raw.open_channel(1).await;

    // Only the header and a few payload bytes: the size alone must be refused.
    let mut bytes = vec![FRAME_METHOD];
    bytes.extend_from_slice(&1u16.to_be_bytes());
    bytes.extend_from_slice(&(raw.frame_max + 1).to_be_bytes());
    bytes.extend_from_slice(&method(BASIC_PUBLISH, &[0, 0]));
    raw.send(&bytes).await;

    let close = raw.expect_connection_close().await;
    assert_eq!(close.code, 501, "{close:?}");
    // RabbitMQ's text: the limit without the frame's 8 bytes of overhead.
    assert_eq!(
        close.text,
        format!(
            "FRAME_ERROR - type 1, all octets = <<>>: {{frame_too_large,{},{}}}",
            raw.frame_max + 1,
            raw.frame_max - 8
        )
    );
    assert_broker_still_serves(&b).await;
}

/// A frame whose frame-end octet is not 0xCE closes the connection with 501.
#[tokio::test]
async fn bad_frame_end_is_frame_error() {
    let b = common::start().await;
    let mut raw = handshake(&b).await;
    raw.open_channel(1).await;

    let declare = method(QUEUE_DECLARE, &[0, 0, 0, 0, 0, 0, 0, 0]);
    raw.send(&frame_with_end(FRAME_METHOD, 1, &declare, 0x00))
        .await;

    let close = raw.expect_connection_close().await;
    assert_eq!(close.code, 501, "{close:?}");
    // RabbitMQ shows the payload as Erlang prints a binary.
    assert_eq!(
        close.text,
        "FRAME_ERROR - type 1, all octets = <<0,50,0,10,0,0,0,0,0,0,0,0>>: {invalid_frame_end_marker,0}"
    );
    assert_broker_still_serves(&b).await;
}

/// A frame of an undefined type (7) closes the connection with 501.
#[tokio::test]
async fn unknown_frame_type_is_frame_error() {
    let b = common::start().await;
    let mut raw = handshake(&b).await;
    raw.open_channel(1).await;

    raw.send(&frame(7, 1, b"abc")).await;

    let close = raw.expect_connection_close().await;
    assert_eq!(close.code, 501, "{close:?}");
    assert_eq!(
        close.text,
        "FRAME_ERROR - type 7, all octets = <<\"abc\">>: unknown_frame"
    );
    assert_broker_still_serves(&b).await;
}

/// A heartbeat frame carrying a payload closes the connection with 501.
#[tokio::test]
async fn heartbeat_with_payload_is_frame_error() {
    let b = common::start().await;
    let mut raw = handshake(&b).await;

    raw.send(&frame(FRAME_HEARTBEAT, 0, &[1, 2])).await;

    let close = raw.expect_connection_close().await;
    assert_eq!(close.code, 501, "{close:?}");
    assert_text_starts_with(&close, "FRAME_ERROR");
    assert_broker_still_serves(&b).await;
}

/// A frame cut short, followed by closing the write side, makes the broker close the socket.
#[tokio::test]
async fn truncated_frame_then_eof_closes_socket() {
    let b = common::start().await;
    let mut raw = handshake(&b).await;
    raw.open_channel(1).await;

    let declare = queue_declare(1);
    raw.send(&declare[..declare.len() - 3]).await;
    raw.stream.shutdown().await.unwrap();

    // RabbitMQ just closes the socket; a close, if sent, must be a frame error.
    if let Some(close) = read_until_closed(&mut raw.stream).await {
        assert_eq!(close.code, 501, "{close:?}");
    }
    assert_broker_still_serves(&b).await;
}

/// A frame header cut short, followed by closing the write side, makes the broker close the socket.
#[tokio::test]
async fn truncated_frame_header_then_eof_closes_socket() {
    let b = common::start().await;
    let mut raw = handshake(&b).await;
    raw.open_channel(1).await;

    raw.send(&queue_declare(1)[..5]).await;
    raw.stream.shutdown().await.unwrap();

    if let Some(close) = read_until_closed(&mut raw.stream).await {
        assert_eq!(close.code, 501, "{close:?}");
    }
    assert_broker_still_serves(&b).await;
}

// ---------------------------------------------------------------------------
// Channel errors at connection level: 504 CHANNEL_ERROR
// ---------------------------------------------------------------------------

/// A method on a channel that was never opened closes the connection with 504.
#[tokio::test]
async fn method_on_unopened_channel_is_channel_error() {
    let b = common::start().await;
    let mut raw = handshake(&b).await;

    raw.send(&queue_declare(7)).await;

    let close = raw.expect_connection_close().await;
    assert_eq!(
        close,
        Close {
            code: 504,
            text: "CHANNEL_ERROR - expected 'channel.open'".into(),
            class_id: QUEUE_DECLARE.0,
            method_id: QUEUE_DECLARE.1,
        }
    );
    assert_broker_still_serves(&b).await;
}

/// Opening a channel that is already open closes the connection with 504.
#[tokio::test]
async fn second_channel_open_is_channel_error() {
    let b = common::start().await;
    let mut raw = handshake(&b).await;
    raw.open_channel(1).await;

    raw.send(&method_frame(1, CHANNEL_OPEN, &[0])).await;

    let close = raw.expect_connection_close().await;
    assert_eq!(
        close,
        Close {
            code: 504,
            text: "CHANNEL_ERROR - second 'channel.open' seen".into(),
            class_id: CHANNEL_OPEN.0,
            method_id: CHANNEL_OPEN.1,
        }
    );
    assert_broker_still_serves(&b).await;
}

/// A channel-class method such as queue.declare on channel 0 closes the connection with 504.
#[tokio::test]
async fn queue_declare_on_channel_zero_is_channel_error() {
    let b = common::start().await;
    let mut raw = handshake(&b).await;

    raw.send(&queue_declare(0)).await;

    let close = raw.expect_connection_close().await;
    assert_eq!(
        close,
        Close {
            code: 504,
            text: "CHANNEL_ERROR - unexpected method in connection state running".into(),
            class_id: QUEUE_DECLARE.0,
            method_id: QUEUE_DECLARE.1,
        }
    );
    assert_broker_still_serves(&b).await;
}

// ---------------------------------------------------------------------------
// Content out of place: 505 UNEXPECTED_FRAME
// ---------------------------------------------------------------------------

fn expected_method_frame() -> Close {
    Close {
        code: 505,
        text: "UNEXPECTED_FRAME - expected method frame, got non method frame instead".into(),
        class_id: 0,
        method_id: 0,
    }
}

/// A content header with no basic.publish before it closes the connection with 505.
#[tokio::test]
async fn content_header_without_publish_is_unexpected_frame() {
    let b = common::start().await;
    let mut raw = handshake(&b).await;
    raw.open_channel(1).await;

    raw.send(&content_header(1, 3)).await;

    assert_eq!(raw.expect_connection_close().await, expected_method_frame());
    assert_broker_still_serves(&b).await;
}

/// A content body with no basic.publish before it closes the connection with 505.
#[tokio::test]
async fn content_body_without_publish_is_unexpected_frame() {
    let b = common::start().await;
    let mut raw = handshake(&b).await;
    raw.open_channel(1).await;

    raw.send(&body(1, b"abc")).await;

    assert_eq!(raw.expect_connection_close().await, expected_method_frame());
    assert_broker_still_serves(&b).await;
}

/// A basic.publish followed by a body frame instead of a content header closes the connection with 505.
#[tokio::test]
async fn publish_followed_by_body_is_unexpected_frame() {
    let b = common::start().await;
    let mut raw = handshake(&b).await;
    raw.open_channel(1).await;

    raw.send(&basic_publish(1, "nowhere")).await;
    raw.send(&body(1, b"abc")).await;

    assert_eq!(
        raw.expect_connection_close().await,
        Close {
            code: 505,
            text: "UNEXPECTED_FRAME - expected content header for class 60, got non content header frame instead".into(),
            class_id: BASIC_PUBLISH.0,
            method_id: BASIC_PUBLISH.1,
        }
    );
    assert_broker_still_serves(&b).await;
}

/// A heartbeat frame on a non-zero channel closes the connection with 505.
#[tokio::test]
async fn heartbeat_on_nonzero_channel_is_unexpected_frame() {
    let b = common::start().await;
    let mut raw = handshake(&b).await;
    raw.open_channel(1).await;

    raw.send(&frame(FRAME_HEARTBEAT, 1, &[])).await;

    let close = raw.expect_connection_close().await;
    assert_eq!(
        (close.code, close.class_id, close.method_id),
        (505, 0, 0),
        "{close:?}"
    );
    assert_text_starts_with(&close, "UNEXPECTED_FRAME");
    assert_broker_still_serves(&b).await;
}

/// A body frame larger than the content header announced closes the connection, message undelivered.
#[tokio::test]
async fn body_larger_than_announced_is_refused() {
    // Current RabbitMQ refuses the body frame itself with 501 FRAME_ERROR
    // ("content body frame exceeds remaining content size"); 3.10 keeps waiting
    // for the rest of the body and fails at the next method frame with 505
    // UNEXPECTED_FRAME. Either close is accepted; the message must not arrive.
    let b = common::start().await;
    let conn = tokio::time::timeout(
        TIMEOUT,
        Connection::connect(&b.url(), ConnectionProperties::default()),
    )
    .await
    .expect("timed out connecting with lapin")
    .expect("lapin connects");
    let ch = tokio::time::timeout(TIMEOUT, conn.create_channel())
        .await
        .expect("timed out opening a channel")
        .expect("channel.open");
    let q = tokio::time::timeout(
        TIMEOUT,
        ch.queue_declare(
            "".into(),
            QueueDeclareOptions::exclusive(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("timed out declaring a queue")
    .expect("queue.declare");
    let mut raw = handshake(&b).await;
    raw.open_channel(1).await;

    raw.send(&basic_publish(1, q.name().as_str())).await;
    raw.send(&content_header(1, 5)).await;
    raw.send(&body(1, b"0123456789")).await;
    raw.send_if_open(&basic_publish(1, q.name().as_str())).await;

    let close = raw.expect_connection_close().await;
    match close.code {
        501 => assert_text_starts_with(&close, "FRAME_ERROR"),
        505 => assert_text_starts_with(&close, "UNEXPECTED_FRAME"),
        _ => panic!("expected 501 or 505, got {close:?}"),
    }
    let got = tokio::time::timeout(
        TIMEOUT,
        ch.basic_get(q.name().clone(), BasicGetOptions { no_ack: true }),
    )
    .await
    .expect("timed out on basic.get")
    .expect("basic.get");
    assert!(got.is_none(), "the oversized message must not be delivered");
    assert_broker_still_serves(&b).await;
}

// ---------------------------------------------------------------------------
// Wrong class for the channel: 503 COMMAND_INVALID
// ---------------------------------------------------------------------------

/// A connection-class method (connection.open) on channel 1 closes the connection with 503.
#[tokio::test]
async fn connection_method_on_nonzero_channel_is_command_invalid() {
    let b = common::start().await;
    let mut raw = handshake(&b).await;
    raw.open_channel(1).await;

    raw.send(&method_frame(1, CONNECTION_OPEN, &[1, b'/', 0, 0]))
        .await;

    assert_eq!(
        raw.expect_connection_close().await,
        Close {
            code: 503,
            text: "COMMAND_INVALID - unimplemented method".into(),
            class_id: CONNECTION_OPEN.0,
            method_id: CONNECTION_OPEN.1,
        }
    );
    assert_broker_still_serves(&b).await;
}

/// RabbitMQ does not implement a prefetch size: basic.qos with one closes the
/// connection with 540 (clients' "not implemented" tests expect exactly this).
#[tokio::test]
async fn qos_prefetch_size_is_not_implemented() {
    let b = common::start().await;
    let mut raw = handshake(&b).await;
    raw.open_channel(1).await;
    let mut args = Vec::new();
    args.extend_from_slice(&1u32.to_be_bytes()); // prefetch-size
    args.extend_from_slice(&0u16.to_be_bytes()); // prefetch-count
    args.push(0); // global
    raw.send(&method_frame(1, (60, 10), &args)).await;
    let close = raw.expect_connection_close().await;
    assert_eq!(
        (
            close.code,
            close.text.as_str(),
            close.class_id,
            close.method_id
        ),
        (540, "NOT_IMPLEMENTED - prefetch_size!=0 (1)", 60, 10)
    );

    // On a channel that was never opened, that comes first, as in RabbitMQ.
    let mut raw = handshake(&b).await;
    raw.send(&method_frame(7, (60, 10), &args)).await;
    let close = raw.expect_connection_close().await;
    assert_eq!(
        (
            close.code,
            close.text.as_str(),
            close.class_id,
            close.method_id
        ),
        (504, "CHANNEL_ERROR - expected 'channel.open'", 60, 10)
    );
}

/// channel.flow active=false is not implemented by RabbitMQ 3.x: 540.
#[tokio::test]
async fn channel_flow_off_is_not_implemented() {
    let b = common::start().await;
    let mut raw = handshake(&b).await;
    raw.open_channel(1).await;
    raw.send(&method_frame(1, (20, 20), &[0])).await;
    let close = raw.expect_connection_close().await;
    assert_eq!(
        (
            close.code,
            close.text.as_str(),
            close.class_id,
            close.method_id
        ),
        (540, "NOT_IMPLEMENTED - active=false", 20, 20)
    );
}

/// A known method whose arguments do not decode closes the connection with 501,
/// naming the bytes as RabbitMQ does (rabbit_misc:frame_error).
#[tokio::test]
async fn undecodable_method_arguments_are_a_frame_error() {
    let b = common::start().await;
    let mut raw = handshake(&b).await;
    raw.open_channel(1).await;
    raw.send(&method_frame(1, QUEUE_DECLARE, &[0])).await;
    let close = raw.expect_connection_close().await;
    assert_eq!(close.code, 501, "{close:?}");
    assert_eq!(close.text, "FRAME_ERROR - cannot decode <<0>>");
    assert_eq!((close.class_id, close.method_id), (50, 10));
    assert_broker_still_serves(&b).await;
}

/// channel_max bounds how many channels are open at once, not their numbers, as
/// in RabbitMQ: with 2 negotiated, channels 1 and 5000 open, a third is refused.
#[tokio::test]
async fn channel_max_counts_open_channels_not_their_numbers() {
    let b = common::start().await;
    let mut raw = handshake_channel_max(&b, 2).await;
    raw.open_channel(1).await;
    raw.open_channel(5000).await;
    raw.send(&method_frame(3, (20, 10), &[0])).await;
    let close = raw.expect_connection_close().await;
    assert_eq!(close.code, 530, "{close:?}");
    assert_eq!(
        close.text,
        "NOT_ALLOWED - number of channels opened (2) has reached the negotiated channel_max (2)"
    );
    assert_broker_still_serves(&b).await;
}

/// tune-ok values outside the server's bounds are refused with RabbitMQ's texts
/// (naming connection.tune); 0, "no limit", is above any maximum.
#[tokio::test]
async fn tune_ok_outside_the_bounds_is_refused_as_rabbitmq_refuses_it() {
    let b = common::start().await;
    for (channel_max, frame_max, text) in [
        (
            0,
            131072,
            "NOT_ALLOWED - negotiated channel_max = 0 (no limit) is higher than the maximum allowed value (2047)",
        ),
        (
            2048,
            131072,
            "NOT_ALLOWED - negotiated channel_max = 2048 is higher than the maximum allowed value (2047)",
        ),
        (
            10,
            0,
            "NOT_ALLOWED - negotiated frame_max = 0 is higher than the maximum allowed value (131072)",
        ),
        (
            10,
            4095,
            "NOT_ALLOWED - negotiated frame_max = 4095 is lower than the minimum allowed value (4096)",
        ),
        (
            10,
            131073,
            "NOT_ALLOWED - negotiated frame_max = 131073 is higher than the maximum allowed value (131072)",
        ),
    ] {
        let mut stream = tcp(&b).await;
        stream.write_all(PROTOCOL_HEADER).await.unwrap();
        expect_method(&mut stream, 0, CONNECTION_START).await;
        stream
            .write_all(&start_ok(&0u32.to_be_bytes(), "guest", "guest"))
            .await
            .unwrap();
        expect_method(&mut stream, 0, CONNECTION_TUNE).await;
        stream
            .write_all(&tune_ok(channel_max, frame_max))
            .await
            .unwrap();
        let close = expect_connection_close(&mut stream).await;
        assert_eq!((close.code, close.text.as_str()), (530, text));
        assert_eq!((close.class_id, close.method_id), (10, 30));
    }
    assert_broker_still_serves(&b).await;
}

/// A failed login is told with connection.close only to a client that says it
/// takes one (the authentication_failure_close capability); others see the
/// socket closed, as the spec and RabbitMQ have it.
#[tokio::test]
async fn a_failed_login_closes_silently_without_the_capability() {
    let b = common::start().await;
    let mut stream = tcp(&b).await;
    stream.write_all(PROTOCOL_HEADER).await.unwrap();
    expect_method(&mut stream, 0, CONNECTION_START).await;
    stream
        .write_all(&start_ok(&0u32.to_be_bytes(), "guest", "wrong"))
        .await
        .unwrap();
    assert_eq!(
        read_until_closed(&mut stream).await,
        None,
        "no connection.close"
    );

    let mut caps = Vec::new();
    shortstr(&mut caps, "authentication_failure_close");
    caps.push(b't');
    caps.push(1);
    let mut props = Vec::new();
    shortstr(&mut props, "capabilities");
    props.push(b'F');
    props.extend_from_slice(&(caps.len() as u32).to_be_bytes());
    props.extend_from_slice(&caps);
    let mut table = (props.len() as u32).to_be_bytes().to_vec();
    table.extend_from_slice(&props);
    let mut stream = tcp(&b).await;
    stream.write_all(PROTOCOL_HEADER).await.unwrap();
    expect_method(&mut stream, 0, CONNECTION_START).await;
    stream
        .write_all(&start_ok(&table, "guest", "wrong"))
        .await
        .unwrap();
    let close = expect_connection_close(&mut stream).await;
    assert_eq!(
        (close.code, close.text.as_str(), close.class_id, close.method_id),
        (
            403,
            "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. For details see the broker logfile.",
            0,
            0
        )
    );
}

/// Out of order before tune-ok, RabbitMQ answers nothing and closes the socket
/// after a pause; once only connection.open may come, it says what was wrong.
#[tokio::test]
async fn handshake_steps_out_of_order_are_answered_as_rabbitmq_answers_them() {
    let b = common::start().await;
    let mut open = Vec::new();
    shortstr(&mut open, "/");
    shortstr(&mut open, "");
    open.push(0);
    let mut stream = tcp(&b).await;
    stream.write_all(PROTOCOL_HEADER).await.unwrap();
    expect_method(&mut stream, 0, CONNECTION_START).await;
    stream
        .write_all(&method_frame(0, CONNECTION_OPEN, &open))
        .await
        .unwrap();
    assert_eq!(
        read_until_closed(&mut stream).await,
        None,
        "before start-ok"
    );

    for (frame, code, text, ids) in [
        (
            method_frame(1, CHANNEL_OPEN, &[0]),
            505,
            "UNEXPECTED_FRAME - type 1, all octets = <<0,20,0,10,0>>",
            (0, 0),
        ),
        (
            queue_declare(0),
            504,
            "CHANNEL_ERROR - unexpected method in connection state opening",
            (50, 10),
        ),
        (
            tune_ok(10, 4096),
            504,
            "CHANNEL_ERROR - unexpected method in connection state opening",
            (10, 31),
        ),
    ] {
        let mut stream = tcp(&b).await;
        stream.write_all(PROTOCOL_HEADER).await.unwrap();
        expect_method(&mut stream, 0, CONNECTION_START).await;
        stream
            .write_all(&start_ok(&0u32.to_be_bytes(), "guest", "guest"))
            .await
            .unwrap();
        expect_method(&mut stream, 0, CONNECTION_TUNE).await;
        stream.write_all(&tune_ok(10, 131072)).await.unwrap();
        stream.write_all(&frame).await.unwrap();
        let close = expect_connection_close(&mut stream).await;
        assert_eq!((close.code, close.text.as_str()), (code, text));
        assert_eq!((close.class_id, close.method_id), ids);
    }
    assert_broker_still_serves(&b).await;
}
