//! A full disk: on a small file system made for the test (a 48 MiB tmpfs), with
//! the free-disk alarm off so that writes really fail, confirms turn into nacks,
//! nothing confirmed before is lost, the queue keeps serving what it holds, and
//! once space returns publishes are confirmed again, all of it through a kill -9.
//!
//! Mounting needs root (CAP_SYS_ADMIN), as CI and the development machines run.

mod common;
mod process;
mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
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
        let dir = std::env::temp_dir().join(format!("warrenmq-full-{}", std::process::id()));
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

struct Broker {
    child: Child,
    addr: SocketAddr,
}

impl Broker {
    fn start(config: &Path, data: &Path) -> Broker {
        let mut cmd = process::warrenmq();
        cmd.arg("--config")
            .arg(config)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--log-level",
                "info",
                "--data-dir",
            ])
            .arg(data);
        let (child, addr) = process::spawn(cmd);
        Broker { child, addr }
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

/// Publishes `n` persistent messages from `next`, 8 in flight; (acked, nacked) ids.
async fn publish(ch: &Channel, next: &mut u64, n: usize) -> (Vec<u64>, Vec<u64>) {
    let (mut acked, mut nacked) = (Vec::new(), Vec::new());
    for _ in 0..n.div_ceil(8) {
        let mut pending = Vec::new();
        for _ in 0..8 {
            let id = *next;
            *next += 1;
            let confirm = ok(
                "basic.publish",
                ch.basic_publish(
                    "".into(),
                    QUEUE.into(),
                    BasicPublishOptions::default(),
                    &body(id),
                    BasicProperties::default().with_delivery_mode(2),
                ),
            )
            .await;
            pending.push((id, confirm));
        }
        for (id, confirm) in pending {
            match ok("confirm", confirm).await {
                Confirmation::Ack(_) => acked.push(id),
                Confirmation::Nack(_) => nacked.push(id),
                other => panic!("message {id}: {other:?}"),
            }
        }
    }
    (acked, nacked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_nacks_publishes_loses_nothing_confirmed_and_recovers() {
    let fs = SmallFs::mount(48);
    let data = fs.0.join("data");
    // Space an operator can free later.
    let ballast = fs.0.join("ballast");
    std::fs::write(&ballast, vec![1u8; 16 * MIB as usize]).unwrap();
    let config = fs.0.join("warrenmq.toml");
    let text = warrenmq::config::DEFAULT_TOML
        .replace("disk_free_limit = 50000000", "disk_free_limit = 0")
        .replace("segment_size = 67108864", "segment_size = 1048576");
    assert!(text.contains("disk_free_limit = 0") && text.contains("segment_size = 1048576"));
    std::fs::write(&config, text).unwrap();

    let broker = Broker::start(&config, &data);
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
    ok(
        "confirm.select",
        ch.confirm_select(ConfirmSelectOptions::default()),
    )
    .await;

    // Fill the disk: about 30 MiB are left, so 1,000 bodies of 64 KiB cannot fit.
    let mut next = 0u64;
    let mut confirmed: HashSet<u64> = HashSet::new();
    let mut first_nack = None;
    while next < 1_000 {
        let (acked, nacked) = publish(&ch, &mut next, 8).await;
        confirmed.extend(acked);
        if !nacked.is_empty() {
            first_nack = Some(next);
            break;
        }
    }
    let first_nack = first_nack.expect("a full disk turns confirms into nacks");
    // While it stays full, every publish is nacked.
    let (acked, nacked) = publish(&ch, &mut next, 32).await;
    println!(
        "disk full after {} confirmed messages (first nack before id {first_nack}); then {} acked, {} nacked",
        confirmed.len(),
        acked.len(),
        nacked.len()
    );
    assert!(
        nacked.len() >= 24,
        "a full disk nacks publishes ({} acked, {} nacked)",
        acked.len(),
        nacked.len()
    );
    confirmed.extend(acked);

    // The queue still serves what it holds: read some, then give them back.
    {
        let reader = channel(&conn).await;
        for _ in 0..20 {
            let m = ok(
                "basic.get",
                reader.basic_get(QUEUE.into(), BasicGetOptions { no_ack: false }),
            )
            .await
            .expect("the queue serves messages while the disk is full");
            id_of(&m.delivery.data);
        }
        ok("channel.close", reader.close(200, "requeue".into())).await;
    }

    // Space returns: publishes are confirmed again.
    std::fs::remove_file(&ballast).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut after = Vec::new();
    while after.len() < 40 {
        assert!(
            Instant::now() < deadline,
            "publishes are still nacked 20 s after space returned"
        );
        let (acked, _) = publish(&ch, &mut next, 8).await;
        after.extend(acked);
        if after.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    println!("space returned: {} more confirmed", after.len());
    confirmed.extend(after);

    // kill -9, restart: everything confirmed is there, intact.
    drop(conn);
    drop(broker);
    let broker = Broker::start(&config, &data);
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
    let lost: Vec<_> = confirmed.iter().filter(|id| !seen.contains(id)).collect();
    assert!(lost.is_empty(), "confirmed messages lost: {lost:?}");
    println!(
        "after kill -9: {} messages, all {} confirmed among them",
        seen.len(),
        confirmed.len()
    );
}
