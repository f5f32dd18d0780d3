//! Publisher confirms that must never lie: a confirm means the message is in its
//! queues (and on disk when persistent), and confirms arrive in order. These run
//! on raw sockets, because a client library hides exactly the frame order and the
//! duplicate confirms these tests look for.

mod common;
mod raw;

use std::time::Duration;

use raw::*;
use tokio::io::AsyncWriteExt;

const CHANNEL_CLOSE: (u16, u16) = (20, 40);
const CONFIRM_SELECT: (u16, u16) = (85, 10);
const CONFIRM_SELECT_OK: (u16, u16) = (85, 11);
const BASIC_ACK: (u16, u16) = (60, 80);
const BASIC_NACK: (u16, u16) = (60, 120);

fn confirm_select(channel: u16) -> Vec<u8> {
    method_frame(channel, CONFIRM_SELECT, &[0])
}

fn channel_open(channel: u16) -> Vec<u8> {
    let mut args = Vec::new();
    shortstr(&mut args, "");
    method_frame(channel, CHANNEL_OPEN, &args)
}

fn channel_close(channel: u16) -> Vec<u8> {
    let mut args = Vec::new();
    args.extend_from_slice(&200u16.to_be_bytes());
    shortstr(&mut args, "bye");
    args.extend_from_slice(&[0, 0, 0, 0]);
    method_frame(channel, CHANNEL_CLOSE, &args)
}

/// queue.declare of a durable queue with the given raw arguments table entries.
fn durable_queue(channel: u16, name: &str, entries: &[u8]) -> Vec<u8> {
    let mut args = Vec::new();
    args.extend_from_slice(&0u16.to_be_bytes());
    shortstr(&mut args, name);
    args.push(0b0000_0010); // durable
    args.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    args.extend_from_slice(entries);
    method_frame(channel, QUEUE_DECLARE, &args)
}

/// basic.publish + a persistent content header + the body in frames of `frame_max`.
fn persistent_publish(channel: u16, queue: &str, body: &[u8], frame_max: u32) -> Vec<u8> {
    let mut out = basic_publish(channel, queue);
    let mut payload = Vec::new();
    payload.extend_from_slice(&60u16.to_be_bytes());
    payload.extend_from_slice(&0u16.to_be_bytes());
    payload.extend_from_slice(&(body.len() as u64).to_be_bytes());
    payload.extend_from_slice(&(1u16 << 12).to_be_bytes()); // delivery-mode only
    payload.push(2);
    out.extend_from_slice(&frame(FRAME_HEADER, channel, &payload));
    for chunk in body.chunks(frame_max as usize - 8) {
        out.extend_from_slice(&frame(FRAME_BODY, channel, chunk));
    }
    out
}

fn passive_declare(channel: u16, name: &str) -> Vec<u8> {
    let mut args = Vec::new();
    args.extend_from_slice(&0u16.to_be_bytes());
    shortstr(&mut args, name);
    args.push(0b0000_0001); // passive
    args.extend_from_slice(&0u32.to_be_bytes());
    method_frame(channel, QUEUE_DECLARE, &args)
}

fn long_arg(out: &mut Vec<u8>, key: &str, v: i64) {
    shortstr(out, key);
    out.push(b'l');
    out.extend_from_slice(&v.to_be_bytes());
}

fn str_arg(out: &mut Vec<u8>, key: &str, v: &str) {
    shortstr(out, key);
    out.push(b'S');
    longstr(out, v.as_bytes());
}

/// Every confirm (ack or nack) that arrives on `channel` within `wait`, as
/// (method, tag, multiple); channel.open-ok shows as ((20, 11), 0, false).
async fn confirms(raw: &mut Raw, channel: u16, wait: Duration) -> Vec<((u16, u16), u64, bool)> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(frame) = tokio::time::timeout_at(deadline, read_frame(&mut raw.stream)).await {
        let frame = frame.expect("the broker keeps the connection");
        let id = frame.method_id();
        if frame.channel == channel && (id == Some(BASIC_ACK) || id == Some(BASIC_NACK)) {
            let a = frame.args();
            let tag = u64::from_be_bytes(a[0..8].try_into().unwrap());
            out.push((id.unwrap(), tag, a[8] & 1 == 1));
        } else if frame.channel == channel && id == Some(CHANNEL_OPEN_OK) {
            out.push((CHANNEL_OPEN_OK, 0, false));
        }
    }
    out
}

/// A channel closed and opened again under the same number is a new channel: the
/// store flush that the old one's confirm waited for must not confirm the new one's
/// publishes (which are not on disk yet), nor confirm anything twice.
#[tokio::test]
async fn reopened_channel_never_gets_the_old_channels_confirm() {
    let b = common::start().await;
    for round in 0..5 {
        let mut raw = handshake(&b).await;
        raw.open_channel(1).await;
        raw.open_channel(2).await;
        let q = format!("generations-{round}-{}", std::process::id());
        raw.send(&durable_queue(1, &q, &[])).await;
        expect_method(&mut raw.stream, 1, (50, 11)).await;
        raw.send(&confirm_select(1)).await;
        expect_method(&mut raw.stream, 1, CONFIRM_SELECT_OK).await;
        // A message large enough that its flush takes a while (sled writes it as a blob).
        let big = vec![b'a'; 512 * 1024];
        // A declare on another channel behind it: its answer means the publish was
        // handled and its flush has begun, but not necessarily finished.
        let mut first = persistent_publish(1, &q, &big, raw.frame_max);
        first.extend_from_slice(&passive_declare(2, &q));
        raw.send(&first).await;
        expect_method(&mut raw.stream, 2, (50, 11)).await;
        let mut again = channel_close(1);
        again.extend_from_slice(&channel_open(1));
        again.extend_from_slice(&confirm_select(1));
        again.extend_from_slice(&persistent_publish(1, &q, b"b", raw.frame_max));
        raw.stream.write_all(&again).await.unwrap();
        let got = confirms(&mut raw, 1, Duration::from_millis(1500)).await;
        // The old channel's ack may come before the reopen; after it, exactly one
        // confirm: tag 1 of the new channel, once its own message is on disk.
        let reopened = got
            .iter()
            .position(|c| c.0 == CHANNEL_OPEN_OK)
            .expect("channel.open-ok");
        assert_eq!(
            &got[reopened + 1..],
            // One publish settled: multiple=false, as RabbitMQ's.
            &[(BASIC_ACK, 1, false)],
            "round {round}: {got:?}"
        );
    }
}

/// A publish rejected by a full queue is nacked; when the ack of an earlier publish
/// still waits for the disk, the nack must wait behind it: confirms arrive in order.
#[tokio::test]
async fn nack_never_overtakes_a_pending_ack() {
    let b = common::start().await;
    let mut raw = handshake(&b).await;
    raw.open_channel(1).await;
    let q = format!("overflow-{}", std::process::id());
    let mut entries = Vec::new();
    long_arg(&mut entries, "x-max-length", 1);
    str_arg(&mut entries, "x-overflow", "reject-publish");
    raw.send(&durable_queue(1, &q, &entries)).await;
    expect_method(&mut raw.stream, 1, (50, 11)).await;
    raw.send(&confirm_select(1)).await;
    expect_method(&mut raw.stream, 1, CONFIRM_SELECT_OK).await;
    let mut both = persistent_publish(1, &q, b"kept", raw.frame_max);
    both.extend_from_slice(&persistent_publish(1, &q, b"refused", raw.frame_max));
    raw.send(&both).await;
    let got = confirms(&mut raw, 1, Duration::from_millis(1000)).await;
    assert_eq!(
        got,
        vec![(BASIC_ACK, 1, false), (BASIC_NACK, 2, false)],
        "the ack of 1 (after fsync) comes before the nack of 2"
    );
}
