//! A full disk: on a small file system made for the test (a 64 MiB tmpfs), with
//! the free-disk alarm off so that writes really fail, publishes are nacked or
//! the publisher held back, nothing confirmed is lost, the queue keeps serving
//! what it holds, and once it is drained the broker gives the space back and
//! confirms publishes again by itself, all of it through a kill -9.
//!
//! Mounting needs root (CAP_SYS_ADMIN), as CI and the development machines run.

mod common;
mod process;
mod support;

use process::Broker;

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation};
use support::{channel, connect_url, ok};

const QUEUE: &str = "disk-full";
const BODY: usize = 64 * 1024;
const MIB: u64 = 1024 * 1024;

/// A tmpfs of `mib` MiB, unmounted on drop.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(mib: u64) -> SmallFs {
        let dir = std::env::temp_dir().join(format!("warrenmq-full-{}-{mib}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={}", mib * MIB), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a {mib} MiB tmpfs at {} failed: this test needs root",
            dir.display()
        );
        SmallFs(dir)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn body(id: u64) -> Vec<u8> {
    let mut b = id.to_be_bytes().to_vec();
    b.extend((0..BODY - 8).map(|i| (id as usize * 13 + i) as u8));
    b
}

fn id_of(b: &[u8]) -> u64 {
    let id = u64::from_be_bytes(b[..8].try_into().expect("8 bytes of id"));
    assert_eq!(
        b,
        body(id).as_slice(),
        "the body of message {id} came back damaged"
    );
    id
}

#[derive(Default)]
struct Published {
    next: u64,
    acked: Vec<u64>,
    nacked: Vec<u64>,
    /// When the last confirm or nack arrived.
    last: Option<Instant>,
}

/// Publishes persistent messages, 8 in flight, until `stop` or an error.
async fn publisher(ch: Channel, state: Arc<Mutex<Published>>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let mut pending = Vec::new();
        for _ in 0..8 {
            let id = {
                let mut st = state.lock().unwrap();
                st.next += 1;
                st.next - 1
            };
            let Ok(confirm) = ch
                .basic_publish(
                    "".into(),
                    QUEUE.into(),
                    BasicPublishOptions::default(),
                    &body(id),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
            else {
                return;
            };
            pending.push((id, confirm));
        }
        for (id, confirm) in pending {
            let Ok(c) = confirm.await else { return };
            let mut st = state.lock().unwrap();
            match c {
                Confirmation::Ack(_) => st.acked.push(id),
                Confirmation::Nack(_) => st.nacked.push(id),
                other => panic!("message {id}: {other:?}"),
            }
            st.last = Some(Instant::now());
        }
    }
}

/// Waits until `done` holds, for at most `secs`.
async fn until(secs: u64, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    done()
}

impl SmallFs {
    /// The broker's configuration on this file system: the free-disk alarm off,
    /// so that writes really fail, and 1 MiB segments.
    fn config(&self) -> PathBuf {
        let text = warrenmq::config::DEFAULT_TOML
            .replace("disk_free_limit = 50000000", "disk_free_limit = 0")
            .replace("segment_size = 67108864", "segment_size = 1048576");
        assert!(text.contains("disk_free_limit = 0") && text.contains("segment_size = 1048576"));
        let path = self.0.join("warrenmq.toml");
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// A publisher at work on its own connection.
struct Publishing {
    _conn: lapin::Connection,
    state: Arc<Mutex<Published>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Publishing {
    /// Declares the durable queue and starts publishing to it with confirms.
    async fn start(broker: &Broker) -> Publishing {
        let conn = connect_url(&broker.url()).await;
        let ch = channel(&conn).await;
        ok(
            "queue.declare",
            ch.queue_declare(
                QUEUE.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            ),
        )
        .await;
        support::confirm_mode(&ch).await;
        let state = Arc::new(Mutex::new(Published::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(publisher(ch, state.clone(), stop.clone()));
        Publishing {
            _conn: conn,
            state,
            stop,
            task,
        }
    }

    fn confirmed(&self) -> usize {
        self.state.lock().unwrap().acked.len()
    }

    /// Waits for the disk to fill: a nack, or confirms stopping for 3 s (the
    /// publisher held back). Returns how many were confirmed by then.
    async fn until_full(&self) -> usize {
        let stalled = || {
            let st = self.state.lock().unwrap();
            !st.nacked.is_empty()
                || st
                    .last
                    .is_some_and(|t| t.elapsed() > Duration::from_secs(3))
        };
        assert!(until(60, stalled).await, "the disk never filled");
        let st = self.state.lock().unwrap();
        println!(
            "disk full: {} confirmed, {} nacked, the publisher held",
            st.acked.len(),
            st.nacked.len()
        );
        st.acked.len()
    }

    /// Waits for `more` confirms past `after`, then stops; the confirmed ids and
    /// the next id (never published).
    async fn until_confirmed(self, after: usize, more: usize, what: &str) -> (HashSet<u64>, u64) {
        let recovered = until(30, || self.confirmed() >= after + more).await;
        self.stop.store(true, Ordering::Relaxed);
        assert!(
            recovered,
            "publishes are not confirmed again 30 s after {what}"
        );
        self.task.abort();
        let st = self.state.lock().unwrap();
        println!("{what}: {} more confirmed", st.acked.len() - after);
        (st.acked.iter().copied().collect(), st.next)
    }
}

/// Restarts the broker after a kill -9 and takes every message; each intact,
/// published, and there once.
async fn after_kill_9(broker: Broker, fs: &SmallFs, next: u64) -> HashSet<u64> {
    drop(broker);
    let broker = Broker::start(&fs.config(), &fs.0.join("data"));
    let conn = connect_url(&broker.url()).await;
    let ch = channel(&conn).await;
    let mut seen = HashSet::new();
    while let Some(m) = ok(
        "basic.get",
        ch.basic_get(QUEUE.into(), BasicGetOptions { no_ack: true }),
    )
    .await
    {
        let id = id_of(&m.delivery.data);
        assert!(seen.insert(id), "message {id} came back twice");
        assert!(id < next, "message {id} was never published");
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_publishers_loses_nothing_confirmed_and_recovers_when_drained() {
    let fs = SmallFs::mount(64);
    let data = fs.0.join("data");
    let broker = Broker::start(&fs.config(), &data);
    assert!(
        data.join("reserve").exists(),
        "the store keeps space in reserve for a full disk"
    );
    let publishing = Publishing::start(&broker).await;
    // About 45 MiB are free besides the reserve: some 700 bodies of 64 KiB.
    let full_at = publishing.until_full().await;
    assert!(
        full_at < 1024,
        "{full_at} messages of 64 KiB confirmed on a 64 MiB file system"
    );

    // Another connection reads and acks everything: the emptied segments go, the
    // reserve comes back, and the publisher is let through again.
    let reading = connect_url(&broker.url()).await;
    let rch = channel(&reading).await;
    let mut drained = HashSet::new();
    while let Some(m) = ok(
        "basic.get",
        rch.basic_get(QUEUE.into(), BasicGetOptions { no_ack: false }),
    )
    .await
    {
        drained.insert(id_of(&m.delivery.data));
        ok(
            "basic.ack",
            m.delivery.acker.ack(BasicAckOptions::default()),
        )
        .await;
    }
    assert!(drained.len() >= full_at, "the queue served what it held");
    let (confirmed, next) = publishing
        .until_confirmed(full_at, 100, "the queue was drained")
        .await;

    // Every confirmed message the reader did not ack is there after a kill -9.
    let seen = after_kill_9(broker, &fs, next).await;
    let lost: Vec<_> = confirmed
        .iter()
        .filter(|id| !seen.contains(id) && !drained.contains(id))
        .collect();
    assert!(lost.is_empty(), "confirmed messages lost: {lost:?}");
    println!("after kill -9: {} messages, none lost", seen.len());
}

/// Without room for the reserve (a 40 MiB file system), a full disk holds the
/// publisher back (and nacks what a failed commit covered) until an operator
/// frees space; the records that could not be written are kept and written
/// then, and publishes are confirmed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_reserve_a_full_disk_holds_publishers_until_space_is_freed() {
    let fs = SmallFs::mount(40);
    let data = fs.0.join("data");
    // Space an operator can free later.
    let ballast = fs.0.join("ballast");
    std::fs::write(&ballast, vec![1u8; 8 * MIB as usize]).unwrap();
    let broker = Broker::start(&fs.config(), &data);
    assert!(!data.join("reserve").exists(), "no room for a reserve");
    let publishing = Publishing::start(&broker).await;
    let full_at = publishing.until_full().await;
    assert!(
        full_at < 640,
        "{full_at} messages of 64 KiB confirmed on a 40 MiB file system"
    );

    // The queue still serves what it holds: read some, then give them back.
    let reading = connect_url(&broker.url()).await;
    {
        let rch = channel(&reading).await;
        for _ in 0..20 {
            let m = ok(
                "basic.get",
                rch.basic_get(QUEUE.into(), BasicGetOptions { no_ack: false }),
            )
            .await
            .expect("the queue serves messages while the disk is full");
            id_of(&m.delivery.data);
        }
        ok("channel.close", rch.close(200, "requeue".into())).await;
    }

    std::fs::remove_file(&ballast).unwrap();
    let (confirmed, next) = publishing
        .until_confirmed(full_at, 40, "space returned")
        .await;
    let seen = after_kill_9(broker, &fs, next).await;
    let lost: Vec<_> = confirmed.iter().filter(|id| !seen.contains(id)).collect();
    assert!(lost.is_empty(), "confirmed messages lost: {lost:?}");
    println!(
        "after kill -9: {} messages, all {} confirmed among them",
        seen.len(),
        confirmed.len()
    );
}
