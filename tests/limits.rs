//! The configurable limits on what one client can make the broker hold or wait
//! for: each limit reached gets the reply RabbitMQ gives (or a 530 with a clear
//! text), never a crash, and time limits hold whatever the client sends.

mod common;
mod raw;
mod support;

use std::time::{Duration, Instant};

use lapin::options::*;
use lapin::types::FieldTable;
use raw::*;
use support::{amqp_err, channel, connect_url, ok};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use warrenmq::config::Limits;
use warrenmq::Config;

/// An in-process broker with some limits changed.
async fn broker(change: impl FnOnce(&mut Limits)) -> (common::TestBroker, warrenmq::BrokerHandle) {
    let mut limits = Limits::default();
    change(&mut limits);
    let config = Config {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        data_dir: common::temp_data_dir(),
        limits,
        ..Config::default()
    };
    let handle = warrenmq::start(config).await.expect("broker starts");
    let addr = handle.local_addr();
    (common::TestBroker::at(addr), handle)
}

fn url(b: &common::TestBroker) -> String {
    b.url()
}

/// Reads frames until connection.close; returns (code, text).
async fn close_reason(stream: &mut tokio::net::TcpStream) -> (u16, String) {
    let close = expect_connection_close(stream).await;
    (close.code, close.text)
}

#[tokio::test]
async fn connections_past_the_broker_limit_are_refused_with_530() {
    let (b, _h) = broker(|l| l.max_connections = 2).await;
    let _one = connect_url(&url(&b)).await;
    let _two = connect_url(&url(&b)).await;
    let mut third = tcp(&b).await;
    third.write_all(PROTOCOL_HEADER).await.unwrap();
    expect_method(&mut third, 0, CONNECTION_START).await;
    assert_eq!(
        close_reason(&mut third).await,
        (
            530,
            "NOT_ALLOWED - connection refused: node connection limit (2) is reached".into()
        )
    );
    drop(_two);
    // A slot is free again once a connection has gone.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _again = connect_url(&url(&b)).await;
}

#[tokio::test]
async fn connections_past_the_user_limit_are_refused_at_open() {
    let (b, _h) = broker(|l| l.max_connections_per_user = 1).await;
    let _one = connect_url(&url(&b)).await;
    let (mut second, _) = log_in(&b, &0u32.to_be_bytes()).await;
    assert_eq!(
        close_reason(&mut second).await,
        (
            530,
            "NOT_ALLOWED - connection refused for user 'guest': user connection limit (1) is reached"
                .into()
        )
    );
}

fn basic_consume(channel: u16, queue: &str, tag: &str) -> Vec<u8> {
    let mut args = Vec::new();
    args.extend_from_slice(&0u16.to_be_bytes());
    shortstr(&mut args, queue);
    shortstr(&mut args, tag);
    args.push(0);
    args.extend_from_slice(&0u32.to_be_bytes());
    method_frame(channel, (60, 20), &args)
}

#[tokio::test]
async fn consumers_past_the_channel_limit_close_the_connection() {
    let (b, _h) = broker(|l| l.max_consumers_per_channel = 2).await;
    let mut raw = handshake(&b).await;
    raw.open_channel(1).await;
    raw.send(&queue_declare(1)).await;
    let ok = expect_method(&mut raw.stream, 1, (50, 11)).await;
    let n = ok.args()[0] as usize;
    let q = String::from_utf8(ok.args()[1..1 + n].to_vec()).unwrap();
    for tag in ["c1", "c2"] {
        raw.send(&basic_consume(1, &q, tag)).await;
        expect_method(&mut raw.stream, 1, (60, 21)).await;
    }
    raw.send(&basic_consume(1, &q, "c3")).await;
    let close = raw.expect_connection_close().await;
    assert_eq!(
        (
            close.code,
            close.text.as_str(),
            close.class_id,
            close.method_id
        ),
        (
            530,
            "NOT_ALLOWED - reached maximum (2) of consumers per channel",
            60,
            20
        )
    );
}

#[tokio::test]
async fn queues_exchanges_and_bindings_past_their_limits_are_refused() {
    let (b, _h) = broker(|l| {
        l.max_queues_per_vhost = 2;
        // The six predeclared exchanges count: room for one more.
        l.max_exchanges_per_vhost = 7;
        l.max_bindings_per_exchange = 1;
    })
    .await;
    let conn = connect_url(&url(&b)).await;
    let declare = |ch: lapin::Channel, name: &'static str| async move {
        ch.queue_declare(
            name.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
    };
    let ch = channel(&conn).await;
    ok("q1", declare(ch.clone(), "q1")).await;
    ok("q2", declare(ch.clone(), "q2")).await;
    let (code, text) = amqp_err("q3", declare(ch.clone(), "q3")).await;
    assert_eq!(code, 406);
    assert_eq!(
        text,
        "PRECONDITION_FAILED - cannot declare queue 'q3': queue limit in vhost '/' (2) is reached"
    );
    let ch = channel(&conn).await;
    let exchange = |ch: lapin::Channel, name: &'static str| async move {
        ch.exchange_declare(
            name.into(),
            lapin::ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
    };
    ok("x1", exchange(ch.clone(), "x1")).await;
    let (code, text) = amqp_err("x2", exchange(ch.clone(), "x2")).await;
    assert_eq!(code, 406);
    assert_eq!(
        text,
        "PRECONDITION_FAILED - cannot declare exchange 'x2': exchange limit in vhost '/' (7) is reached"
    );
    let ch = channel(&conn).await;
    let bind = |ch: lapin::Channel, key: &'static str| async move {
        ch.queue_bind(
            "q1".into(),
            "x1".into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
    };
    ok("bind a", bind(ch.clone(), "a")).await;
    ok("bind a again (no new binding)", bind(ch.clone(), "a")).await;
    let (code, text) = amqp_err("bind b", bind(ch.clone(), "b")).await;
    assert_eq!(code, 406);
    assert_eq!(
        text,
        "PRECONDITION_FAILED - cannot bind to exchange 'x1' in vhost '/': binding limit (1) is reached"
    );
}

#[tokio::test]
async fn configured_header_depth_is_enforced() {
    let (b, _h) = broker(|l| l.max_header_depth = 3).await;
    let mut raw = handshake(&b).await;
    raw.open_channel(1).await;
    raw.send(&basic_publish(1, "nowhere")).await;
    // {"a": {"a": {"a": {}}}}: four levels.
    let mut table = 0u32.to_be_bytes().to_vec();
    for _ in 0..3 {
        let mut entries = vec![1u8, b'a', b'F'];
        entries.extend_from_slice(&table);
        table = (entries.len() as u32).to_be_bytes().to_vec();
        table.extend_from_slice(&entries);
    }
    let mut payload = Vec::new();
    payload.extend_from_slice(&60u16.to_be_bytes());
    payload.extend_from_slice(&0u16.to_be_bytes());
    payload.extend_from_slice(&0u64.to_be_bytes());
    payload.extend_from_slice(&(1u16 << 13).to_be_bytes());
    payload.extend_from_slice(&table);
    raw.send(&frame(FRAME_HEADER, 1, &payload)).await;
    let close = raw.expect_connection_close().await;
    assert_eq!(close.code, 502);
    assert_eq!(
        close.text,
        "SYNTAX_ERROR - field table in message headers is nested deeper than the limit of 3 levels"
    );
}

/// Waits until the broker closes the socket; returns how long that took.
async fn closed_after(stream: &mut tokio::net::TcpStream, start: Instant) -> Duration {
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("the broker kept the connection for 10 s"),
        }
    }
}

/// With heartbeats off, a client that sends part of a frame and then a byte now
/// and then used to hold the connection for ever.
#[tokio::test]
async fn a_frame_trickled_byte_by_byte_times_out() {
    let (b, _h) = broker(|l| l.frame_timeout = 1).await;
    let mut raw = handshake(&b).await; // heartbeat 0
    raw.open_channel(1).await;
    let publish = basic_publish(1, "slow");
    let start = Instant::now();
    let trickle = async {
        for byte in &publish[..publish.len() - 1] {
            if raw.stream.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(3), trickle).await;
    let took = closed_after(&mut raw.stream, start).await;
    assert!(took < Duration::from_secs(5), "closed after {took:?}");
}

/// The handshake deadline holds however the client keeps the connection busy.
#[tokio::test]
async fn handshake_deadline_holds_against_a_heartbeat_trickle() {
    let (b, _h) = broker(|l| l.handshake_timeout = 1).await;
    let mut stream = tcp(&b).await;
    stream.write_all(PROTOCOL_HEADER).await.unwrap();
    expect_method(&mut stream, 0, CONNECTION_START).await;
    let start = Instant::now();
    let beat = frame(FRAME_HEARTBEAT, 0, &[]);
    for _ in 0..10 {
        if stream.write_all(&beat).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let took = closed_after(&mut stream, start).await;
    assert!(took < Duration::from_secs(3), "closed after {took:?}");
}

/// A publisher blocked on the memory watermark that hangs up used to stay blocked
/// for ever, holding its exclusive queue and everything in it.
#[tokio::test]
async fn blocked_publisher_that_hangs_up_is_torn_down() {
    let (b, _h) = broker(|l| {
        l.memory_high_watermark = 1 << 20;
        // The bodies alone: the test process itself is resident far above 1 MiB.
        l.memory_calculation_strategy = warrenmq::config::MemoryStrategy::Bodies;
        l.queue_memory_budget = 1 << 20;
    })
    .await;
    let q = common::unique("held");
    {
        let mut raw = handshake(&b).await;
        raw.open_channel(1).await;
        let mut args = Vec::new();
        args.extend_from_slice(&0u16.to_be_bytes());
        shortstr(&mut args, &q);
        args.push(0b0000_0100); // exclusive
        args.extend_from_slice(&0u32.to_be_bytes());
        raw.send(&method_frame(1, QUEUE_DECLARE, &args)).await;
        expect_method(&mut raw.stream, 1, (50, 11)).await;
        let body = vec![0u8; 64 * 1024];
        let mut burst = Vec::new();
        for _ in 0..48 {
            burst.extend_from_slice(&basic_publish(1, &q));
            burst.extend_from_slice(&content_header(1, body.len() as u64));
            burst.extend_from_slice(&raw::body(1, &body));
        }
        raw.send(&burst).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The client dies while blocked. An orderly FIN would queue behind the bytes
        // the broker is not reading, so a dead client shows as a reset (what its
        // kernel sends once it gives up on an orphaned socket): model that directly.
        socket2::SockRef::from(&raw.stream)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    }
    let conn = connect_url(&url(&b)).await;
    let mut gone = false;
    for _ in 0..30 {
        let ch = channel(&conn).await;
        let r = ch
            .queue_declare(
                q.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        if let Err(e) = r {
            if let lapin::ErrorKind::ProtocolError(p) = e.kind() {
                if p.get_id() == 404 {
                    gone = true;
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        gone,
        "the exclusive queue of the vanished publisher is deleted"
    );
}

/// A raw connection whose client properties ask for connection.blocked.
async fn blockable(b: &common::TestBroker) -> Raw {
    // {"capabilities": {"connection.blocked": true}}
    let mut caps = Vec::new();
    shortstr(&mut caps, "connection.blocked");
    caps.extend_from_slice(&[b't', 1]);
    let mut props = Vec::new();
    shortstr(&mut props, "capabilities");
    props.push(b'F');
    props.extend_from_slice(&(caps.len() as u32).to_be_bytes());
    props.extend_from_slice(&caps);
    let mut table = (props.len() as u32).to_be_bytes().to_vec();
    table.extend_from_slice(&props);
    let mut raw = handshake_with(b, &table).await;
    raw.open_channel(1).await;
    raw
}

/// Waits for connection.blocked on channel 0, skipping other frames.
async fn blocked_within(raw: &mut Raw, wait: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(frame) = tokio::time::timeout_at(deadline, read_frame(&mut raw.stream)).await {
        let Ok(frame) = frame else { return false };
        if frame.channel == 0 && frame.method_id() == Some((10, 60)) {
            return true;
        }
    }
    false
}

/// Publishes inside an uncommitted transaction are memory the client makes the
/// broker hold: they count against the watermark, and the publisher is blocked.
#[tokio::test]
async fn uncommitted_transaction_counts_against_the_watermark() {
    let (b, _h) = broker(|l| {
        l.memory_high_watermark = 1 << 20;
        // The bodies alone: the test process itself is resident far above 1 MiB.
        l.memory_calculation_strategy = warrenmq::config::MemoryStrategy::Bodies;
        l.queue_memory_budget = 1 << 20;
    })
    .await;
    let mut raw = blockable(&b).await;
    raw.send(&method_frame(1, (90, 10), &[])).await; // tx.select
    expect_method(&mut raw.stream, 1, (90, 11)).await;
    let body = vec![0u8; 64 * 1024];
    let mut burst = Vec::new();
    for _ in 0..24 {
        burst.extend_from_slice(&basic_publish(1, "nowhere"));
        burst.extend_from_slice(&content_header(1, body.len() as u64));
        burst.extend_from_slice(&raw::body(1, &body));
    }
    raw.send(&burst).await;
    assert!(
        blocked_within(&mut raw, Duration::from_secs(3)).await,
        "1.5 MiB held by a transaction blocks the publisher at a 1 MiB watermark"
    );
}

/// Decoded header tables cost far more than their wire size; that cost counts.
#[tokio::test]
async fn decoded_headers_count_against_the_watermark() {
    let (b, _h) = broker(|l| {
        l.memory_high_watermark = 1 << 20;
        // The bodies alone: the test process itself is resident far above 1 MiB.
        l.memory_calculation_strategy = warrenmq::config::MemoryStrategy::Bodies;
        l.queue_memory_budget = 1 << 20;
    })
    .await;
    let mut raw = blockable(&b).await;
    raw.send(&queue_declare(1)).await;
    let ok = expect_method(&mut raw.stream, 1, (50, 11)).await;
    let n = ok.args()[0] as usize;
    let q = String::from_utf8(ok.args()[1..1 + n].to_vec()).unwrap();
    // 4,000 void values: 16 KB on the wire, hundreds of KB once decoded.
    let mut table = Vec::new();
    for i in 0..4000u32 {
        shortstr(&mut table, &format!("{i:x}"));
        table.push(b'V');
    }
    let mut payload = Vec::new();
    payload.extend_from_slice(&60u16.to_be_bytes());
    payload.extend_from_slice(&0u16.to_be_bytes());
    payload.extend_from_slice(&0u64.to_be_bytes());
    payload.extend_from_slice(&(1u16 << 13).to_be_bytes());
    payload.extend_from_slice(&(table.len() as u32).to_be_bytes());
    payload.extend_from_slice(&table);
    let mut burst = Vec::new();
    for _ in 0..8 {
        burst.extend_from_slice(&basic_publish(1, &q));
        burst.extend_from_slice(&frame(FRAME_HEADER, 1, &payload));
    }
    raw.send(&burst).await;
    assert!(
        blocked_within(&mut raw, Duration::from_secs(3)).await,
        "8 messages of 4,000 decoded headers each pass a 1 MiB watermark"
    );
}

#[tokio::test]
async fn low_free_disk_space_blocks_publishers_with_low_on_disk() {
    // A limit no disk meets: the alarm is on from the start.
    let (b, handle) = broker(|l| l.disk_free_limit = u64::MAX / 2).await;
    let mut raw = blockable(&b).await;
    let mut publish = basic_publish(1, "anywhere");
    publish.extend(content_header(1, 1));
    publish.extend(body(1, b"x"));
    raw.stream.write_all(&publish).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let reason = loop {
        let frame = tokio::time::timeout_at(deadline, read_frame(&mut raw.stream))
            .await
            .expect("connection.blocked within 5 s")
            .expect("a frame");
        if frame.channel == 0 && frame.method_id() == Some((10, 60)) {
            let args = frame.args();
            let n = args[0] as usize;
            break String::from_utf8_lossy(&args[1..1 + n]).into_owned();
        }
    };
    assert_eq!(reason, "low on disk");
    handle.shutdown().await;
}
