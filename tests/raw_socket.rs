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

use std::time::Duration;

use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::TestBroker;

/// Upper bound for every read, so a broker that never answers fails the test
/// instead of hanging it.
const TIMEOUT: Duration = Duration::from_secs(10);

const PROTOCOL_HEADER: &[u8] = b"AMQP\x00\x00\x09\x01";

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;

// (class id, method id) pairs used here.
const CONNECTION_START: (u16, u16) = (10, 10);
const CONNECTION_START_OK: (u16, u16) = (10, 11);
const CONNECTION_TUNE: (u16, u16) = (10, 30);
const CONNECTION_TUNE_OK: (u16, u16) = (10, 31);
const CONNECTION_OPEN: (u16, u16) = (10, 40);
const CONNECTION_OPEN_OK: (u16, u16) = (10, 41);
const CONNECTION_CLOSE: (u16, u16) = (10, 50);
const CONNECTION_CLOSE_OK: (u16, u16) = (10, 51);
const CHANNEL_OPEN: (u16, u16) = (20, 10);
const CHANNEL_OPEN_OK: (u16, u16) = (20, 11);
const QUEUE_DECLARE: (u16, u16) = (50, 10);
const BASIC_PUBLISH: (u16, u16) = (60, 40);

// ---------------------------------------------------------------------------
// Frame building
// ---------------------------------------------------------------------------

/// A complete frame: header, payload and frame-end octet.
fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    frame_with_end(kind, channel, payload, FRAME_END)
}

fn frame_with_end(kind: u8, channel: u16, payload: &[u8], end: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.push(kind);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.push(end);
    out
}

/// A method frame payload: class id, method id, then the encoded arguments.
fn method((class, method): (u16, u16), args: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(args.len() + 4);
    out.extend_from_slice(&class.to_be_bytes());
    out.extend_from_slice(&method.to_be_bytes());
    out.extend_from_slice(args);
    out
}

fn method_frame(channel: u16, id: (u16, u16), args: &[u8]) -> Vec<u8> {
    frame(FRAME_METHOD, channel, &method(id, args))
}

fn shortstr(out: &mut Vec<u8>, s: &str) {
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

fn longstr(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

fn empty_table(out: &mut Vec<u8>) {
    out.extend_from_slice(&0u32.to_be_bytes());
}

/// basic.publish to the default exchange with routing key `routing_key`.
fn basic_publish(channel: u16, routing_key: &str) -> Vec<u8> {
    let mut args = Vec::new();
    args.extend_from_slice(&0u16.to_be_bytes()); // reserved-1
    shortstr(&mut args, ""); // exchange
    shortstr(&mut args, routing_key);
    args.push(0); // mandatory, immediate
    method_frame(channel, BASIC_PUBLISH, &args)
}

/// A basic-class content header announcing `body_size` bytes, no properties.
fn content_header(channel: u16, body_size: u64) -> Vec<u8> {
    let mut payload = Vec::new();
    payload.extend_from_slice(&BASIC_PUBLISH.0.to_be_bytes()); // class id
    payload.extend_from_slice(&0u16.to_be_bytes()); // weight
    payload.extend_from_slice(&body_size.to_be_bytes());
    payload.extend_from_slice(&0u16.to_be_bytes()); // property flags
    frame(FRAME_HEADER, channel, &payload)
}

fn body(channel: u16, data: &[u8]) -> Vec<u8> {
    frame(FRAME_BODY, channel, data)
}

/// queue.declare of a server-named, exclusive queue.
fn queue_declare(channel: u16) -> Vec<u8> {
    let mut args = Vec::new();
    args.extend_from_slice(&0u16.to_be_bytes()); // reserved-1
    shortstr(&mut args, "");
    args.push(0b0000_0100); // exclusive
    empty_table(&mut args);
    method_frame(channel, QUEUE_DECLARE, &args)
}

// ---------------------------------------------------------------------------
// Frame reading
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct Frame {
    kind: u8,
    channel: u16,
    payload: Vec<u8>,
}

impl Frame {
    fn method_id(&self) -> Option<(u16, u16)> {
        if self.kind != FRAME_METHOD || self.payload.len() < 4 {
            return None;
        }
        let p = &self.payload;
        Some((
            u16::from_be_bytes([p[0], p[1]]),
            u16::from_be_bytes([p[2], p[3]]),
        ))
    }

    /// The method arguments, after class and method ids.
    fn args(&self) -> &[u8] {
        &self.payload[4..]
    }
}

/// What the broker said when it closed the connection.
#[derive(Debug, PartialEq)]
struct Close {
    code: u16,
    text: String,
    class_id: u16,
    method_id: u16,
}

impl Close {
    fn parse(args: &[u8]) -> Close {
        let code = u16::from_be_bytes([args[0], args[1]]);
        let len = args[2] as usize;
        let text = String::from_utf8_lossy(&args[3..3 + len]).into_owned();
        let rest = &args[3 + len..];
        Close {
            code,
            text,
            class_id: u16::from_be_bytes([rest[0], rest[1]]),
            method_id: u16::from_be_bytes([rest[2], rest[3]]),
        }
    }
}

async fn read_exact_timed(stream: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<()> {
    match tokio::time::timeout(TIMEOUT, stream.read_exact(buf)).await {
        Ok(result) => result.map(|_| ()),
        Err(_) => panic!("timed out reading from the broker"),
    }
}

/// Reads one frame, checking its frame-end octet.
async fn read_frame(stream: &mut TcpStream) -> std::io::Result<Frame> {
    let mut header = [0u8; 7];
    read_exact_timed(stream, &mut header).await?;
    let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]) as usize;
    let mut payload = vec![0u8; size + 1];
    read_exact_timed(stream, &mut payload).await?;
    assert_eq!(
        payload.pop(),
        Some(FRAME_END),
        "broker sent a bad frame end"
    );
    Ok(Frame {
        kind: header[0],
        channel: u16::from_be_bytes([header[1], header[2]]),
        payload,
    })
}

/// Reads frames until a method with id `expected` arrives on `channel`.
async fn expect_method(stream: &mut TcpStream, channel: u16, expected: (u16, u16)) -> Frame {
    loop {
        let frame = read_frame(stream).await.expect("broker closed the socket");
        if frame.kind == FRAME_HEARTBEAT {
            continue;
        }
        assert_eq!(
            (frame.channel, frame.method_id()),
            (channel, Some(expected)),
            "unexpected frame {frame:?}"
        );
        return frame;
    }
}

/// Reads until the broker closes the socket. If it sends connection.close
/// first, answers with close-ok (the broker must then close the socket) and
/// returns the close reason. A reset counts as closed.
async fn read_until_closed(stream: &mut TcpStream) -> Option<Close> {
    loop {
        let Ok(frame) = read_frame(stream).await else {
            return None;
        };
        if frame.method_id() == Some(CONNECTION_CLOSE) {
            assert_eq!(frame.channel, 0, "connection.close must be on channel 0");
            let close = Close::parse(frame.args());
            // The broker may already have torn the socket down; a failed write is fine.
            let _ = stream
                .write_all(&method_frame(0, CONNECTION_CLOSE_OK, &[]))
                .await;
            expect_eof(stream).await;
            return Some(close);
        }
    }
}

/// Reads until connection.close arrives and the socket closes; returns the reason.
async fn expect_connection_close(stream: &mut TcpStream) -> Close {
    read_until_closed(stream)
        .await
        .expect("the broker closed the socket without sending connection.close")
}

/// Asserts the broker closes the socket, discarding anything it still sends.
async fn expect_eof(stream: &mut TcpStream) {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(TIMEOUT, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => continue,
            Err(_) => panic!("timed out waiting for the broker to close the socket"),
        }
    }
}

// ---------------------------------------------------------------------------
// Connection set-up
// ---------------------------------------------------------------------------

/// An open AMQP connection on a raw socket.
struct Raw {
    stream: TcpStream,
    frame_max: u32,
}

async fn tcp(b: &TestBroker) -> TcpStream {
    tokio::time::timeout(TIMEOUT, TcpStream::connect(b.addr))
        .await
        .expect("timed out connecting")
        .expect("TCP connect")
}

/// Protocol header, start-ok (PLAIN guest/guest), tune-ok, open vhost `/`.
async fn handshake(b: &TestBroker) -> Raw {
    let mut stream = tcp(b).await;
    stream.write_all(PROTOCOL_HEADER).await.unwrap();
    expect_method(&mut stream, 0, CONNECTION_START).await;

    let mut args = Vec::new();
    empty_table(&mut args); // client-properties
    shortstr(&mut args, "PLAIN");
    longstr(&mut args, b"\0guest\0guest");
    shortstr(&mut args, "en_US");
    stream
        .write_all(&method_frame(0, CONNECTION_START_OK, &args))
        .await
        .unwrap();

    let tune = expect_method(&mut stream, 0, CONNECTION_TUNE).await;
    let t = tune.args();
    let channel_max = u16::from_be_bytes([t[0], t[1]]);
    let frame_max = u32::from_be_bytes([t[2], t[3], t[4], t[5]]);
    let mut args = Vec::new();
    args.extend_from_slice(&channel_max.to_be_bytes());
    args.extend_from_slice(&frame_max.to_be_bytes());
    args.extend_from_slice(&0u16.to_be_bytes()); // no heartbeats
    stream
        .write_all(&method_frame(0, CONNECTION_TUNE_OK, &args))
        .await
        .unwrap();

    let mut args = Vec::new();
    shortstr(&mut args, "/");
    shortstr(&mut args, ""); // reserved-1
    args.push(0); // reserved-2
    stream
        .write_all(&method_frame(0, CONNECTION_OPEN, &args))
        .await
        .unwrap();
    expect_method(&mut stream, 0, CONNECTION_OPEN_OK).await;
    Raw { stream, frame_max }
}

impl Raw {
    async fn send(&mut self, bytes: &[u8]) {
        tokio::time::timeout(TIMEOUT, self.stream.write_all(bytes))
            .await
            .expect("timed out writing to the broker")
            .expect("write to broker");
    }

    /// Sends `bytes` when the broker may already have closed the socket.
    async fn send_if_open(&mut self, bytes: &[u8]) {
        let _ = tokio::time::timeout(TIMEOUT, self.stream.write_all(bytes)).await;
    }

    async fn open_channel(&mut self, channel: u16) {
        let mut args = Vec::new();
        shortstr(&mut args, ""); // reserved-1
        self.send(&method_frame(channel, CHANNEL_OPEN, &args)).await;
        expect_method(&mut self.stream, channel, CHANNEL_OPEN_OK).await;
    }

    async fn expect_connection_close(&mut self) -> Close {
        expect_connection_close(&mut self.stream).await
    }
}

/// The broker still serves a well-behaved client: a fresh lapin connection can
/// declare a queue, publish to it and get the message back.
async fn assert_broker_still_serves(b: &TestBroker) {
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
    tokio::time::timeout(
        TIMEOUT,
        ch.basic_publish(
            "".into(),
            q.name().clone(),
            BasicPublishOptions::default(),
            b"still serving",
            BasicProperties::default(),
        ),
    )
    .await
    .expect("timed out publishing")
    .expect("basic.publish");
    let got = tokio::time::timeout(
        TIMEOUT,
        ch.basic_get(q.name().clone(), BasicGetOptions { no_ack: true }),
    )
    .await
    .expect("timed out on basic.get")
    .expect("basic.get")
    .expect("the message just published");
    assert_eq!(got.delivery.data, b"still serving");
    let _ = conn.close(200, "bye".into()).await;
}

/// Asserts a reply text follows RabbitMQ's `NAME - detail` form for `name`.
#[track_caller]
fn assert_text_starts_with(close: &Close, name: &str) {
    assert!(
        close.text.starts_with(&format!("{name} - ")),
        "reply text {:?} should start with {name:?}",
        close.text
    );
}

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
    assert_text_starts_with(&close, "FRAME_ERROR");
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
    assert_text_starts_with(&close, "FRAME_ERROR");
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
    assert_text_starts_with(&close, "FRAME_ERROR");
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
