//! Memory is given back once a backlog is gone: the freed buffers of drained
//! messages do not stay resident (the memory watcher hands freed heap back to
//! the system when resident memory far exceeds what the broker still holds).
//! The real binary, so that its resident memory is its own.

mod common;
mod process;
mod support;

use std::time::{Duration, Instant};

use lapin::options::*;
use lapin::types::FieldTable;
use lapin::BasicProperties;
use support::{channel, connect_url, ok};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_held_by_a_drained_backlog_is_given_back() {
    let dir = common::temp_data_dir();
    let mut cmd = process::warrenmq();
    cmd.args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir);
    let (mut child, addr) = process::spawn(cmd);
    let pid = child.id();
    let conn = connect_url(&format!("amqp://guest:guest@{addr}/%2f")).await;
    let ch = channel(&conn).await;
    ok(
        "queue.declare",
        ch.queue_declare(
            "backlog".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    support::confirm_mode(&ch).await;
    let idle = rss_kib(pid);
    // 150,000 small messages: about 150 MiB of bodies and their bookkeeping in
    // small allocations, which the allocator keeps unless asked to give them back.
    let body = vec![7u8; 1000];
    for _ in 0..150_000 {
        let _ = ch
            .basic_publish(
                "".into(),
                "backlog".into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default(),
            )
            .await;
    }
    ok("confirms", ch.wait_for_confirms()).await;
    let full = rss_kib(pid);
    assert!(
        full > idle + 100_000,
        "the backlog is resident: {idle} -> {full} KiB"
    );
    ok(
        "queue.purge",
        ch.queue_purge("backlog".into(), QueuePurgeOptions::default()),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(25);
    loop {
        let now = rss_kib(pid);
        if now < idle + (full - idle) / 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "resident memory stays at {now} KiB after the backlog went (idle {idle}, full {full})"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let _ = conn.close(200, "bye".into()).await;
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
