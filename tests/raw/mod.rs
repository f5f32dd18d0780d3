//! Raw-socket AMQP helpers: frames built by hand (AMQP 0-9-1 section 4.2.3: type
//! octet, channel short, payload size long, payload, frame-end octet 0xCE), a
//! handshake, and readers that bound every wait, for tests of malformed and
//! hostile traffic that no client library would send.
#![allow(dead_code)]

use std::time::Duration;

use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::TestBroker;

/// Upper bound for every read, so a broker that never answers fails the test
/// instead of hanging it.
pub const TIMEOUT: Duration = Duration::from_secs(10);

pub const PROTOCOL_HEADER: &[u8] = b"AMQP\x00\x00\x09\x01";

pub const FRAME_METHOD: u8 = 1;
pub const FRAME_HEADER: u8 = 2;
pub const FRAME_BODY: u8 = 3;
pub const FRAME_HEARTBEAT: u8 = 8;
pub const FRAME_END: u8 = 0xCE;

// (class id, method id) pairs used here.
pub const CONNECTION_START: (u16, u16) = (10, 10);
pub const CONNECTION_START_OK: (u16, u16) = (10, 11);
pub const CONNECTION_TUNE: (u16, u16) = (10, 30);
pub const CONNECTION_TUNE_OK: (u16, u16) = (10, 31);
pub const CONNECTION_OPEN: (u16, u16) = (10, 40);
pub const CONNECTION_OPEN_OK: (u16, u16) = (10, 41);
pub const CONNECTION_CLOSE: (u16, u16) = (10, 50);
pub const CONNECTION_CLOSE_OK: (u16, u16) = (10, 51);
pub const CHANNEL_OPEN: (u16, u16) = (20, 10);
pub const CHANNEL_OPEN_OK: (u16, u16) = (20, 11);
pub const QUEUE_DECLARE: (u16, u16) = (50, 10);
pub const BASIC_PUBLISH: (u16, u16) = (60, 40);

// ---------------------------------------------------------------------------
// Frame building
// ---------------------------------------------------------------------------

/// A complete frame: header, payload and frame-end octet.
pub fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    frame_with_end(kind, channel, payload, FRAME_END)
}

pub fn frame_with_end(kind: u8, channel: u16, payload: &[u8], end: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.push(kind);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.push(end);
    out
}

/// A method frame payload: class id, method id, then the encoded arguments.
pub fn method((class, method): (u16, u16), args: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(args.len() + 4);
    out.extend_from_slice(&class.to_be_bytes());
    out.extend_from_slice(&method.to_be_bytes());
    out.extend_from_slice(args);
    out
}

pub fn method_frame(channel: u16, id: (u16, u16), args: &[u8]) -> Vec<u8> {
    frame(FRAME_METHOD, channel, &method(id, args))
}

pub fn shortstr(out: &mut Vec<u8>, s: &str) {
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

pub fn longstr(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

pub fn empty_table(out: &mut Vec<u8>) {
    out.extend_from_slice(&0u32.to_be_bytes());
}

/// basic.publish to the default exchange with routing key `routing_key`.
pub fn basic_publish(channel: u16, routing_key: &str) -> Vec<u8> {
    let mut args = Vec::new();
    args.extend_from_slice(&0u16.to_be_bytes()); // reserved-1
    shortstr(&mut args, ""); // exchange
    shortstr(&mut args, routing_key);
    args.push(0); // mandatory, immediate
    method_frame(channel, BASIC_PUBLISH, &args)
}

/// A basic-class content header announcing `body_size` bytes, no properties.
pub fn content_header(channel: u16, body_size: u64) -> Vec<u8> {
    let mut payload = Vec::new();
    payload.extend_from_slice(&BASIC_PUBLISH.0.to_be_bytes()); // class id
    payload.extend_from_slice(&0u16.to_be_bytes()); // weight
    payload.extend_from_slice(&body_size.to_be_bytes());
    payload.extend_from_slice(&0u16.to_be_bytes()); // property flags
    frame(FRAME_HEADER, channel, &payload)
}

pub fn body(channel: u16, data: &[u8]) -> Vec<u8> {
    frame(FRAME_BODY, channel, data)
}

/// queue.declare of a server-named, exclusive queue.
pub fn queue_declare(channel: u16) -> Vec<u8> {
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
pub struct Frame {
    pub kind: u8,
    pub channel: u16,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn method_id(&self) -> Option<(u16, u16)> {
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
    pub fn args(&self) -> &[u8] {
        &self.payload[4..]
    }
}

/// What the broker said when it closed the connection.
#[derive(Debug, PartialEq)]
pub struct Close {
    pub code: u16,
    pub text: String,
    pub class_id: u16,
    pub method_id: u16,
}

impl Close {
    pub fn parse(args: &[u8]) -> Close {
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

pub async fn read_exact_timed(stream: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<()> {
    match tokio::time::timeout(TIMEOUT, stream.read_exact(buf)).await {
        Ok(result) => result.map(|_| ()),
        Err(_) => panic!("timed out reading from the broker"),
    }
}

/// Reads one frame, checking its frame-end octet.
pub async fn read_frame(stream: &mut TcpStream) -> std::io::Result<Frame> {
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
pub async fn expect_method(stream: &mut TcpStream, channel: u16, expected: (u16, u16)) -> Frame {
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
pub async fn read_until_closed(stream: &mut TcpStream) -> Option<Close> {
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
pub async fn expect_connection_close(stream: &mut TcpStream) -> Close {
    read_until_closed(stream)
        .await
        .expect("the broker closed the socket without sending connection.close")
}

/// Asserts the broker closes the socket, discarding anything it still sends.
pub async fn expect_eof(stream: &mut TcpStream) {
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
pub struct Raw {
    pub stream: TcpStream,
    pub frame_max: u32,
}

pub async fn tcp(b: &TestBroker) -> TcpStream {
    tokio::time::timeout(TIMEOUT, TcpStream::connect(b.addr))
        .await
        .expect("timed out connecting")
        .expect("TCP connect")
}

/// Protocol header, start-ok (PLAIN guest/guest), tune-ok, open vhost `/`.
pub async fn handshake(b: &TestBroker) -> Raw {
    handshake_with(b, &0u32.to_be_bytes()).await
}

/// `handshake` with these client properties (an encoded field table).
pub async fn handshake_with(b: &TestBroker, client_properties: &[u8]) -> Raw {
    let (mut stream, frame_max) = log_in(b, client_properties).await;
    expect_method(&mut stream, 0, CONNECTION_OPEN_OK).await;
    Raw { stream, frame_max }
}

/// Everything a handshake sends, up to and including connection.open of `/`, but
/// not the broker's answer to it; returns the socket and the frame_max agreed.
pub async fn log_in(b: &TestBroker, client_properties: &[u8]) -> (TcpStream, u32) {
    log_in_with(b, client_properties, None).await
}

/// connection.start-ok with these client properties (an encoded field table),
/// PLAIN with `user` and `password`.
pub fn start_ok(client_properties: &[u8], user: &str, password: &str) -> Vec<u8> {
    let mut args = client_properties.to_vec();
    shortstr(&mut args, "PLAIN");
    longstr(&mut args, format!("\0{user}\0{password}").as_bytes());
    shortstr(&mut args, "en_US");
    method_frame(0, CONNECTION_START_OK, &args)
}

/// connection.tune-ok with these values and no heartbeats.
pub fn tune_ok(channel_max: u16, frame_max: u32) -> Vec<u8> {
    let mut args = Vec::new();
    args.extend_from_slice(&channel_max.to_be_bytes());
    args.extend_from_slice(&frame_max.to_be_bytes());
    args.extend_from_slice(&0u16.to_be_bytes());
    method_frame(0, CONNECTION_TUNE_OK, &args)
}

/// `handshake` asking for at most `channel_max` channels in tune-ok.
pub async fn handshake_channel_max(b: &TestBroker, channel_max: u16) -> Raw {
    let (mut stream, frame_max) = log_in_with(b, &0u32.to_be_bytes(), Some(channel_max)).await;
    expect_method(&mut stream, 0, CONNECTION_OPEN_OK).await;
    Raw { stream, frame_max }
}

/// `log_in`, with tune-ok's channel_max chosen instead of the broker's.
pub async fn log_in_with(
    b: &TestBroker,
    client_properties: &[u8],
    wanted_channel_max: Option<u16>,
) -> (TcpStream, u32) {
    let mut stream = tcp(b).await;
    stream.write_all(PROTOCOL_HEADER).await.unwrap();
    expect_method(&mut stream, 0, CONNECTION_START).await;

    let mut args = client_properties.to_vec();
    shortstr(&mut args, "PLAIN");
    longstr(&mut args, b"\0guest\0guest");
    shortstr(&mut args, "en_US");
    stream
        .write_all(&method_frame(0, CONNECTION_START_OK, &args))
        .await
        .unwrap();

    let tune = expect_method(&mut stream, 0, CONNECTION_TUNE).await;
    let t = tune.args();
    let channel_max = wanted_channel_max.unwrap_or(u16::from_be_bytes([t[0], t[1]]));
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
    (stream, frame_max)
}

impl Raw {
    pub async fn send(&mut self, bytes: &[u8]) {
        tokio::time::timeout(TIMEOUT, self.stream.write_all(bytes))
            .await
            .expect("timed out writing to the broker")
            .expect("write to broker");
    }

    /// Sends `bytes` when the broker may already have closed the socket.
    pub async fn send_if_open(&mut self, bytes: &[u8]) {
        let _ = tokio::time::timeout(TIMEOUT, self.stream.write_all(bytes)).await;
    }

    pub async fn open_channel(&mut self, channel: u16) {
        let mut args = Vec::new();
        shortstr(&mut args, ""); // reserved-1
        self.send(&method_frame(channel, CHANNEL_OPEN, &args)).await;
        expect_method(&mut self.stream, channel, CHANNEL_OPEN_OK).await;
    }

    pub async fn expect_connection_close(&mut self) -> Close {
        expect_connection_close(&mut self.stream).await
    }
}

/// The broker still serves a well-behaved client: a fresh lapin connection can
/// declare a queue, publish to it and get the message back.
pub async fn assert_broker_still_serves(b: &TestBroker) {
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
pub fn assert_text_starts_with(close: &Close, name: &str) {
    assert!(
        close.text.starts_with(&format!("{name} - ")),
        "reply text {:?} should start with {name:?}",
        close.text
    );
}
