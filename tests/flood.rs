//! Floods from clients that never read, against the real broker process, while
//! a well-behaved client goes on publishing and consuming with confirms. The
//! broker's resident memory (from /proc) must stay under the configured watermark
//! plus 64 MiB the whole time, and the well-behaved client must lose nothing.
//!
//! The floods run for `WARRENMQ_FLOOD_SECS` seconds (15 by default); each would
//! send 256 MiB or more if the broker let it:
//! - a publisher of 64 KiB messages into a queue capped at 1,000 messages, in
//!   confirm mode, never reading its confirms;
//! - a consumer of that queue that never reads its deliveries;
//! - one message whose body arrives one byte per frame;
//! - a basic.get / basic.recover loop that never reads its get-ok frames.

mod common;
mod process;
mod raw;
mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::*;
use lapin::types::FieldTable;
use lapin::BasicProperties;
use raw::*;
use support::{channel, connect_url, ok};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const MIB: u64 = 1 << 20;
const WATERMARK: u64 = 256 * MIB;

struct Broker {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_broker(dir: &std::path::Path) -> Broker {
    std::fs::create_dir_all(dir).unwrap();
    let config = dir.join("warrenmq.toml");
    let mut f = std::fs::File::create(&config).unwrap();
    write!(
        f,
        "listen = [\"127.0.0.1:0\"]\ndata_dir = {:?}\n[limits]\nmemory_high_watermark = {WATERMARK}\n\
         queue_memory_budget = {}\n[[users]]\nname = \"guest\"\npassword = \"guest\"\n\
         loopback_only = true\nvhosts = [\"/\"]\n[[vhosts]]\nname = \"/\"\n",
        dir.join("data"),
        64 * MIB
    )
    .unwrap();
    let mut cmd = process::warrenmq();
    cmd.arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn,warrenmq::broker=info");
    let (child, addr) = process::spawn(cmd);
    Broker { child, addr }
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A raw connection with one open channel, on the broker process.
async fn raw_channel(addr: SocketAddr) -> Raw {
    let b = common::TestBroker::at(addr);
    let mut raw = handshake(&b).await;
    raw.open_channel(1).await;
    raw
}

/// Writes `next()` until the deadline, as fast as the broker reads; never reads.
async fn flood(
    mut stream: TcpStream,
    until: Instant,
    sent: Arc<AtomicU64>,
    mut next: impl FnMut() -> Vec<u8>,
) {
    while Instant::now() < until {
        let chunk = next();
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.write_all(&chunk)).await {
            Ok(Ok(())) => {
                sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
            _ => break,
        }
    }
    // Keep the socket open (unread) until the end of the test.
    tokio::time::sleep(until.saturating_duration_since(Instant::now())).await;
    drop(stream);
}

fn declare(channel: u16, name: &str, durable: bool) -> Vec<u8> {
    let mut args = Vec::new();
    args.extend_from_slice(&0u16.to_be_bytes());
    shortstr(&mut args, name);
    args.push(if durable { 0b10 } else { 0 });
    args.extend_from_slice(&0u32.to_be_bytes());
    method_frame(channel, QUEUE_DECLARE, &args)
}

/// A queue that drops its oldest messages past `max`.
fn capped(channel: u16, name: &str, max: i64) -> Vec<u8> {
    let mut table = Vec::new();
    shortstr(&mut table, "x-max-length");
    table.push(b'l');
    table.extend_from_slice(&max.to_be_bytes());
    let mut args = Vec::new();
    args.extend_from_slice(&0u16.to_be_bytes());
    shortstr(&mut args, name);
    args.push(0);
    args.extend_from_slice(&(table.len() as u32).to_be_bytes());
    args.extend_from_slice(&table);
    method_frame(channel, QUEUE_DECLARE, &args)
}

fn transient(channel: u16, queue: &str, body: &[u8], frame_max: u32) -> Vec<u8> {
    let mut out = basic_publish(channel, queue);
    out.extend_from_slice(&content_header(channel, body.len() as u64));
    for chunk in body.chunks(frame_max as usize - 8) {
        out.extend_from_slice(&frame(FRAME_BODY, channel, chunk));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn floods_from_clients_that_never_read_stay_within_the_watermark() {
    let secs: u64 = std::env::var("WARRENMQ_FLOOD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let dir = std::env::temp_dir().join(format!("warrenmq-flood-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let broker = start_broker(&dir);
    let addr = broker.addr;
    let pid = broker.child.id();
    let until = Instant::now() + Duration::from_secs(secs);
    let sent = Arc::new(AtomicU64::new(0));
    let mut floods = Vec::new();
    // WARRENMQ_FLOOD_ONLY=1..4 runs one flood alone (to see what each costs).
    let only: Option<u32> = std::env::var("WARRENMQ_FLOOD_ONLY")
        .ok()
        .and_then(|s| s.parse().ok());
    let on = |n: u32| only.is_none_or(|o| o == n);

    // 1. A publisher in confirm mode that never reads its confirms. (Persistent
    // messages would measure the store's own memory instead: see the store issue.)
    let mut p = raw_channel(addr).await;
    p.send(&capped(1, "flood-capped", 1000)).await;
    expect_method(&mut p.stream, 1, (50, 11)).await;
    p.send(&method_frame(1, (85, 10), &[0])).await;
    expect_method(&mut p.stream, 1, (85, 11)).await;
    let body = vec![7u8; 64 * 1024];
    let frame_max = p.frame_max;
    if on(1) {
        floods.push(tokio::spawn(flood(
            p.stream,
            until,
            sent.clone(),
            move || transient(1, "flood-capped", &body, frame_max),
        )));
    }

    // 2. A consumer of that queue that never reads its deliveries.
    let mut c = raw_channel(addr).await;
    let mut consume = Vec::new();
    consume.extend_from_slice(&0u16.to_be_bytes());
    shortstr(&mut consume, "flood-capped");
    shortstr(&mut consume, "deaf");
    consume.push(0b10); // no-ack
    consume.extend_from_slice(&0u32.to_be_bytes());
    if on(2) {
        c.send(&method_frame(1, (60, 20), &consume)).await;
    }
    let deaf = c.stream;

    // 3. One 100 MiB message whose body comes one byte per frame.
    let mut t = raw_channel(addr).await;
    t.send(&declare(1, "flood-trickle", false)).await;
    expect_method(&mut t.stream, 1, (50, 11)).await;
    let mut first = basic_publish(1, "flood-trickle");
    first.extend_from_slice(&content_header(1, 100 * MIB));
    t.send(&first).await;
    let one_byte_frames: Vec<u8> = (0..8192).flat_map(|_| raw::body(1, b"x")).collect();
    if on(3) {
        floods.push(tokio::spawn(flood(
            t.stream,
            until,
            sent.clone(),
            move || one_byte_frames.clone(),
        )));
    }

    // 4. basic.get + basic.recover in a loop, never reading the get-ok frames.
    let mut g = raw_channel(addr).await;
    g.send(&declare(1, "flood-get", false)).await;
    expect_method(&mut g.stream, 1, (50, 11)).await;
    let mut put = basic_publish(1, "flood-get");
    put.extend_from_slice(&content_header(1, 3000));
    put.extend_from_slice(&raw::body(1, &[1u8; 3000]));
    g.send(&put).await;
    let mut get = Vec::new();
    get.extend_from_slice(&0u16.to_be_bytes());
    shortstr(&mut get, "flood-get");
    get.push(0); // ack required, so recover puts it back
    let mut cycle = method_frame(1, (60, 70), &get);
    cycle.extend_from_slice(&method_frame(1, (60, 110), &[1])); // recover requeue=true
    let cycles: Vec<u8> = (0..512).flat_map(|_| cycle.clone()).collect();
    if on(4) {
        floods.push(tokio::spawn(flood(
            g.stream,
            until,
            sent.clone(),
            move || cycles.clone(),
        )));
    }

    // Meanwhile, RSS is watched.
    let peak = Arc::new(AtomicU64::new(0));
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (peak, watching) = (peak.clone(), watching.clone());
        std::thread::spawn(move || {
            let verbose = std::env::var("WARRENMQ_FLOOD_VERBOSE").is_ok();
            while watching.load(Ordering::Relaxed) {
                let rss = rss_bytes(pid);
                if verbose {
                    eprintln!("rss {} MiB", rss / MIB);
                }
                peak.fetch_max(rss, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    // And a well-behaved client publishes and consumes with confirms.
    let url = format!("amqp://guest:guest@{addr}/%2f");
    let conn = connect_url(&url).await;
    let pubch = channel(&conn).await;
    ok(
        "confirm.select",
        pubch.confirm_select(ConfirmSelectOptions::default()),
    )
    .await;
    ok(
        "queue.declare",
        pubch.queue_declare(
            "polite".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    let consumer_conn = connect_url(&url).await;
    let subch = channel(&consumer_conn).await;
    let mut consumer = support::consume(&subch, "polite", false).await;
    let mut published = 0u64;
    let mut received = 0u64;
    while Instant::now() < until {
        let body = published.to_be_bytes();
        let confirm = ok(
            "basic.publish",
            pubch.basic_publish(
                "".into(),
                "polite".into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default(),
            ),
        )
        .await;
        let confirmation = tokio::time::timeout(Duration::from_secs(10), confirm)
            .await
            .expect("a confirm within 10 s, floods or not")
            .expect("confirm");
        assert!(confirmation.is_ack(), "{confirmation:?}");
        published += 1;
        let d = consumer.next().await;
        assert_eq!(d.data, (received).to_be_bytes(), "in order, nothing lost");
        received += 1;
        ok("basic.ack", d.ack(BasicAckOptions::default())).await;
    }
    watching.store(false, Ordering::Relaxed);
    let _ = watcher.join();
    for f in floods {
        let _ = f.await;
    }
    drop(deaf);
    let peak = peak.load(Ordering::Relaxed);
    println!(
        "floods sent {} MiB in {secs} s; broker peak RSS {} MiB (watermark {} MiB); \
         the polite client published and consumed {published} messages",
        sent.load(Ordering::Relaxed) / MIB,
        peak / MIB,
        WATERMARK / MIB
    );
    assert!(
        published >= 10,
        "the polite client made progress: {published}"
    );
    assert_eq!(published, received);
    assert!(
        peak < WATERMARK + 64 * MIB,
        "peak RSS {} MiB is over the watermark + 64 MiB",
        peak / MIB
    );
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}
