//! Hostile or unlucky clients: input built to exhaust the broker's stack, memory
//! or time. Each test sends what an attacker would over a raw socket, checks the
//! answer RabbitMQ would give (or a clear connection close), and then checks that
//! the broker still serves a well-behaved client: one connection must never be
//! able to take the whole process down.

mod common;
mod raw;

use common::TestBroker;
use raw::*;

const CONNECTION_START_OK_ID: (u16, u16) = CONNECTION_START_OK;

/// A field table nested `depth` levels deep: {"a": {"a": ... {} }}.
fn nested_table(depth: usize) -> Vec<u8> {
    // Built inside out: each level wraps the previous one as the value of key "a".
    let mut inner: Vec<u8> = 0u32.to_be_bytes().to_vec();
    for _ in 1..depth {
        let mut entries = vec![1u8, b'a', b'F'];
        entries.extend_from_slice(&inner);
        let mut table = (entries.len() as u32).to_be_bytes().to_vec();
        table.extend_from_slice(&entries);
        inner = table;
    }
    inner
}

/// An array holding itself `depth` times: [[[...]]].
fn nested_array_table(depth: usize) -> Vec<u8> {
    let mut inner: Vec<u8> = 0u32.to_be_bytes().to_vec();
    for _ in 1..depth {
        let mut entries = vec![b'A'];
        entries.extend_from_slice(&inner);
        let mut array = (entries.len() as u32).to_be_bytes().to_vec();
        array.extend_from_slice(&entries);
        inner = array;
    }
    // The outermost value must sit in a table: {"a": [[...]]}.
    let mut entries = vec![1u8, b'a', b'A'];
    entries.extend_from_slice(&inner);
    let mut table = (entries.len() as u32).to_be_bytes().to_vec();
    table.extend_from_slice(&entries);
    table
}

fn start_ok_with_properties(properties: &[u8]) -> Vec<u8> {
    let mut args = properties.to_vec();
    shortstr(&mut args, "PLAIN");
    longstr(&mut args, b"\0guest\0guest");
    shortstr(&mut args, "en_US");
    method_frame(0, CONNECTION_START_OK_ID, &args)
}

async fn greeted(b: &TestBroker) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tcp(b).await;
    stream.write_all(PROTOCOL_HEADER).await.unwrap();
    expect_method(&mut stream, 0, CONNECTION_START).await;
    stream
}

/// Before any login, client-properties nested 3,000 levels deep used to overflow
/// the stack of the decoding thread and abort the process.
#[tokio::test]
async fn deeply_nested_client_properties_close_the_connection_only() {
    use tokio::io::AsyncWriteExt;
    let b = common::start().await;
    for table in [nested_table(3000), nested_array_table(3000)] {
        let mut stream = greeted(&b).await;
        let _ = stream.write_all(&start_ok_with_properties(&table)).await;
        let close = read_until_closed(&mut stream).await;
        if let Some(close) = close {
            assert_eq!(close.code, 502, "{close:?}");
            assert!(close.text.contains("nested deeper"), "{close:?}");
        }
    }
    assert_broker_still_serves(&b).await;
}

/// A table within the limit is fine: x-death style nesting is four levels.
#[tokio::test]
async fn modestly_nested_client_properties_are_accepted() {
    use tokio::io::AsyncWriteExt;
    let b = common::start().await;
    let mut stream = greeted(&b).await;
    stream
        .write_all(&start_ok_with_properties(&nested_table(8)))
        .await
        .unwrap();
    expect_method(&mut stream, 0, CONNECTION_TUNE).await;
}

/// 100,000 heartbeats before start-ok used to recurse once per heartbeat.
#[tokio::test]
async fn heartbeat_burst_before_start_ok_is_harmless() {
    use tokio::io::AsyncWriteExt;
    let b = common::start().await;
    let mut stream = greeted(&b).await;
    let beat = frame(FRAME_HEARTBEAT, 0, &[]);
    let burst: Vec<u8> = beat
        .iter()
        .copied()
        .cycle()
        .take(beat.len() * 100_000)
        .collect();
    stream.write_all(&burst).await.unwrap();
    stream
        .write_all(&start_ok_with_properties(&0u32.to_be_bytes()))
        .await
        .unwrap();
    expect_method(&mut stream, 0, CONNECTION_TUNE).await;
    assert_broker_still_serves(&b).await;
}

/// queue.declare whose arguments nest too deeply: 502 on the connection.
#[tokio::test]
async fn deeply_nested_queue_arguments_close_the_connection() {
    let b = common::start().await;
    let mut raw = handshake(&b).await;
    raw.open_channel(1).await;
    let mut args = Vec::new();
    args.extend_from_slice(&0u16.to_be_bytes());
    shortstr(&mut args, "deep");
    args.push(0);
    args.extend_from_slice(&nested_table(5000));
    raw.send_if_open(&method_frame(1, QUEUE_DECLARE, &args))
        .await;
    let close = raw.expect_connection_close().await;
    assert_eq!(close.code, 502, "{close:?}");
    assert_broker_still_serves(&b).await;
}

/// The headers property of a publish nested too deeply: 502 on the connection.
#[tokio::test]
async fn deeply_nested_message_headers_close_the_connection() {
    let b = common::start().await;
    let mut raw = handshake(&b).await;
    raw.open_channel(1).await;
    raw.send(&basic_publish(1, "nowhere")).await;
    let mut payload = Vec::new();
    payload.extend_from_slice(&60u16.to_be_bytes());
    payload.extend_from_slice(&0u16.to_be_bytes());
    payload.extend_from_slice(&0u64.to_be_bytes());
    payload.extend_from_slice(&(1u16 << 13).to_be_bytes()); // headers only
    payload.extend_from_slice(&nested_array_table(5000));
    raw.send_if_open(&frame(FRAME_HEADER, 1, &payload)).await;
    let close = raw.expect_connection_close().await;
    assert_eq!(close.code, 502, "{close:?}");
    assert!(close.text.contains("message headers"), "{close:?}");
    assert_broker_still_serves(&b).await;
}

/// A content header must be for class 60 with weight 0, as RabbitMQ's assembler checks.
#[tokio::test]
async fn content_header_for_another_class_is_unexpected_frame() {
    for (class, weight, text) in [
        (
            61u16,
            0u16,
            "UNEXPECTED_FRAME - expected content header for class 60, got one for class 61 instead",
        ),
        (
            60,
            1,
            "UNEXPECTED_FRAME - expected content header for class 60, got non content header frame instead",
        ),
    ] {
        let b = common::start().await;
        let mut raw = handshake(&b).await;
        raw.open_channel(1).await;
        raw.send(&basic_publish(1, "nowhere")).await;
        let mut payload = Vec::new();
        payload.extend_from_slice(&class.to_be_bytes());
        payload.extend_from_slice(&weight.to_be_bytes());
        payload.extend_from_slice(&0u64.to_be_bytes());
        payload.extend_from_slice(&0u16.to_be_bytes());
        raw.send(&frame(FRAME_HEADER, 1, &payload)).await;
        let close = raw.expect_connection_close().await;
        assert_eq!(close.code, 505, "{close:?}");
        assert_eq!(close.text, text);
        assert_eq!((close.class_id, close.method_id), (60, 40));
    }
}
