//! What the fuzz targets check, without the fuzzer.
//!
//! `fuzz/fuzz_targets/*.rs` call these for each input; `tests/fuzz_regressions.rs`
//! includes this file by path and replays every file under `fuzz/regressions/` through
//! the same functions, so a crash found by fuzzing stays a plain `cargo test` failure.
//! It only uses crates the broker itself depends on (plus tokio's runtime).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use amq_protocol::frame::WriteContext;
use amq_protocol::protocol::{gen_class, parse_class};
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warrenmq::protocol::{check_protocol_header, read_frame, Frame, PROTOCOL_HEADER};

// ---------------------------------------------------------------------------
// frame: the codec alone
// ---------------------------------------------------------------------------

/// The smallest and largest frame_max the frame target tries.
pub const FRAME_MAX_MIN: u32 = 4096;
pub const FRAME_MAX_MAX: u32 = 1024 * 1024;

/// Splits a frame-target input into the frame_max it uses (from its first 4 bytes,
/// folded into 4096..=1 MiB) and the bytes fed to the codec.
pub fn split_frame_max(data: &[u8]) -> (u32, &[u8]) {
    if data.len() < 4 {
        return (131072, data);
    }
    let v = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
    let span = FRAME_MAX_MAX - FRAME_MAX_MIN + 1;
    (FRAME_MAX_MIN + v % span, &data[4..])
}

/// The 4 bytes that make `split_frame_max` choose `frame_max` (in 4096..=1 MiB).
pub fn frame_max_prefix(frame_max: u32) -> [u8; 4] {
    (frame_max - FRAME_MAX_MIN).to_be_bytes()
}

/// Runs the codec over one input: `check_protocol_header` on its prefixes, then
/// `read_frame` until it wants more bytes or fails. Panics when a property breaks:
/// every frame consumes bytes and no more than frame_max of them, `Ok(None)` consumes
/// nothing, errors are connection errors, and every method frame re-encodes to bytes
/// that parse and re-encode to the same bytes.
pub fn check_frames(data: &[u8]) {
    let (frame_max, stream) = split_frame_max(data);
    for n in 0..=stream.len().min(PROTOCOL_HEADER.len() + 1) {
        let _ = check_protocol_header(&BytesMut::from(&stream[..n]));
    }
    let mut buf = BytesMut::from(stream);
    loop {
        let before = buf.len();
        match read_frame(&mut buf, frame_max) {
            Ok(Some(frame)) => {
                let used = before - buf.len();
                assert!(
                    used >= 8,
                    "read_frame returned a frame but consumed {used} bytes"
                );
                assert!(
                    used <= frame_max as usize,
                    "read_frame accepted a {used}-byte frame with frame_max {frame_max}"
                );
                check_frame(&frame);
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "Ok(None) consumed bytes");
                return;
            }
            Err(e) => {
                assert!(
                    !e.is_channel_error(),
                    "read_frame returned a channel error: {e}"
                );
                return;
            }
        }
    }
}

fn check_frame(frame: &Frame) {
    if let Frame::Method(_, class) = frame {
        let first = match gen_class(class)(WriteContext::from(Vec::new())) {
            Ok(ctx) => ctx.write,
            Err(e) => panic!("a parsed method does not encode: {e:?}: {class:?}"),
        };
        let again = match parse_class(&first[..]) {
            Ok(([], c)) => c,
            other => panic!("an encoded method does not parse back: {other:?}"),
        };
        let second = match gen_class(&again)(WriteContext::from(Vec::new())) {
            Ok(ctx) => ctx.write,
            Err(e) => panic!("a re-parsed method does not encode: {e:?}"),
        };
        assert_eq!(first, second, "method encoding is not stable: {class:?}");
    }
}

// ---------------------------------------------------------------------------
// connection: the broker over TCP
// ---------------------------------------------------------------------------

/// Bit 0 of a connection-target input's first byte: send a valid handshake (start-ok,
/// tune-ok, open as guest/guest on vhost `/`) and channel.open on channel 1 first.
pub const OPEN_CHANNEL: u8 = 1;
/// Bits 1 to 3 all set: keep our side open and wait (up to `LINGER_TIME`) for the
/// broker to close, instead of shutting our side down after the input, which ends
/// the session at once. Waiting costs up to 200 ms an input, hence 1 in 8.
pub const LINGER: u8 = 0b1110;
pub const LINGER_TIME: Duration = Duration::from_millis(200);

fn put_frame(out: &mut Vec<u8>, kind: u8, channel: u16, payload: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.push(0xCE);
}

fn put_short(out: &mut Vec<u8>, s: &[u8]) {
    out.push(s.len() as u8);
    out.extend_from_slice(s);
}

fn put_long(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

/// start-ok (PLAIN guest/guest), tune-ok (2047 channels, 128 KiB frames, no heartbeat),
/// open of vhost `/`, channel.open on channel 1.
pub fn handshake_prefix() -> Vec<u8> {
    let mut out = Vec::new();
    let mut p = vec![0, 10, 0, 11];
    put_long(&mut p, b""); // client-properties: empty table
    put_short(&mut p, b"PLAIN");
    put_long(&mut p, b"\0guest\0guest");
    put_short(&mut p, b"en_US");
    put_frame(&mut out, 1, 0, &p);
    let mut p = vec![0, 10, 0, 31];
    p.extend_from_slice(&2047u16.to_be_bytes());
    p.extend_from_slice(&131072u32.to_be_bytes());
    p.extend_from_slice(&0u16.to_be_bytes());
    put_frame(&mut out, 1, 0, &p);
    let mut p = vec![0, 10, 0, 40];
    put_short(&mut p, b"/");
    put_short(&mut p, b"");
    p.push(0);
    put_frame(&mut out, 1, 0, &p);
    let mut p = vec![0, 20, 0, 10];
    put_short(&mut p, b"");
    put_frame(&mut out, 1, 1, &p);
    out
}

/// What the connection target writes for one input: the protocol header, the
/// handshake prefix if the first byte asks for it, then the rest of the input.
pub fn session_bytes(data: &[u8]) -> Vec<u8> {
    let mut out = PROTOCOL_HEADER.to_vec();
    let Some((&mode, rest)) = data.split_first() else {
        return out;
    };
    if mode & OPEN_CHANNEL != 0 {
        out.extend_from_slice(&handshake_prefix());
    }
    out.extend_from_slice(rest);
    out
}

/// Plays one input against the broker at `addr`: connect, write the session bytes,
/// then read whatever comes back until the broker closes (or `LINGER_TIME` passes).
/// Socket errors are the broker's right (it may reset a connection it refused).
pub async fn play(addr: SocketAddr, data: &[u8]) {
    let linger = data.first().is_some_and(|m| m & LINGER == LINGER);
    let mut s = match connect(addr).await {
        Ok(s) => s,
        Err(e) => panic!("cannot connect to the broker: {e}"),
    };
    let bytes = session_bytes(data);
    let deadline = tokio::time::Instant::now() + LINGER_TIME;
    let mut sink = vec![0u8; 64 * 1024];
    // Write and read together: a broker that answers a lot must not block our write.
    let (mut r, mut w) = s.split();
    let write = async {
        if w.write_all(&bytes).await.is_ok() && !linger {
            let _ = w.shutdown().await;
        }
    };
    let read = async {
        loop {
            match tokio::time::timeout_at(deadline, r.read(&mut sink)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
                Ok(Ok(_)) => {}
            }
        }
    };
    tokio::join!(write, read);
}

/// Connects, waiting out a shortage of local ports (thousands of connections a
/// second leave many in TIME_WAIT), which says nothing about the broker.
async fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let mut tries = 0;
    loop {
        match TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable && tries < 100 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            r => return r,
        }
    }
}

/// A fresh connection gets connection.start: the broker is still serving.
pub async fn check_alive(addr: SocketAddr) -> Result<(), String> {
    let attempt = async {
        let mut s = connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        s.write_all(PROTOCOL_HEADER)
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut head = [0u8; 7];
        s.read_exact(&mut head)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
        let mut payload = vec![0u8; size + 1];
        s.read_exact(&mut payload)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if head[0] != 1
            || head[1..3] != [0, 0]
            || payload.len() < 4
            || payload[..4] != [0, 10, 0, 10]
        {
            return Err(format!(
                "expected connection.start, got {head:?} {payload:?}"
            ));
        }
        Ok(())
    };
    match tokio::time::timeout(Duration::from_secs(10), attempt).await {
        Ok(r) => r,
        Err(_) => Err("no connection.start within 10 s".into()),
    }
}

// ---------------------------------------------------------------------------
// store: what start-up and page-in reads back from the data directory
// ---------------------------------------------------------------------------

/// Runs one input through a parser of the store's records, chosen by its first
/// byte: an index chunk (sled's `index` tree), an index record (the body log's
/// write-ahead records, replayed at start-up) or a message record (the body
/// log's, then its content header decoded as for delivery). Panics when a
/// property breaks: no parser panics, and a chunk that decodes has its entries
/// in order and re-encodes, in either version, to a value that decodes to the
/// same entries.
pub fn check_store(data: &[u8]) {
    use warrenmq::store::disk_format;
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            let Ok(items) = disk_format::decode_chunk(rest) else {
                return;
            };
            assert!(
                items.windows(2).all(|w| w[0].0 < w[1].0),
                "a decoded chunk's entries are out of order"
            );
            for v in [
                disk_format::encode_chunk(&items),
                disk_format::encode_chunk_v1(&items),
            ] {
                assert_eq!(
                    disk_format::decode_chunk(&v).as_ref(),
                    Ok(&items),
                    "a chunk re-encoded decodes to other entries"
                );
            }
        }
        1 => {
            let _ = disk_format::replay_index_record(rest);
        }
        _ => {
            let record = bytes::Bytes::copy_from_slice(rest);
            if let Ok(m) = disk_format::parse_message_record(record) {
                let gauge =
                    std::sync::Arc::new(warrenmq::model::message::MemoryGauge::new(1 << 30));
                let _ = warrenmq::model::message::Message::from_stored(m, &gauge);
            }
        }
    }
}
