//! The body log gives the disk back: a message body is written once however many
//! durable queues it reaches, and once a backlog is drained its segments are
//! deleted while the broker runs, with nothing coming back after a restart.

mod common;
mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, ExchangeKind};
use support::{channel, connect_url, ok};

fn config(dir: &Path) -> warrenmq::Config {
    warrenmq::Config {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        data_dir: dir.to_path_buf(),
        ..warrenmq::Config::default()
    }
}

/// Bytes of the body log's segment files.
fn log_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir.join("msgs"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

const MIB: u64 = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fanout_backlog_is_written_once_and_its_space_returns_when_drained() {
    let dir: PathBuf = common::temp_data_dir();
    let broker = warrenmq::start(config(&dir)).await.expect("starts");
    let url = format!("amqp://guest:guest@{}/%2f", broker.local_addr());
    let conn = connect_url(&url).await;
    let ch = channel(&conn).await;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ok(
        "exchange.declare",
        ch.exchange_declare(
            "space.fan".into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
    let queues = ["space.a", "space.b", "space.c"];
    for q in queues {
        ok(
            "queue.declare",
            ch.queue_declare(q.into(), durable, FieldTable::default()),
        )
        .await;
        ok(
            "queue.bind",
            ch.queue_bind(
                q.into(),
                "space.fan".into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await;
    }
    support::confirm_mode(&ch).await;
    // 96 MiB of bodies to three queues: one copy each, in two segments.
    let body = vec![b'x'; MIB as usize];
    for _ in 0..96 {
        ok(
            "publish",
            ch.basic_publish(
                "space.fan".into(),
                "".into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_delivery_mode(2),
            ),
        )
        .await;
    }
    ok("confirms", ch.wait_for_confirms()).await;
    let full = log_bytes(&dir);
    assert!(
        (96 * MIB..100 * MIB).contains(&full),
        "each body once, not once per queue: {full} bytes"
    );

    for q in queues {
        let mut n = 0;
        while let Some(m) = ok(
            "basic.get",
            ch.basic_get(q.into(), BasicGetOptions::default()),
        )
        .await
        {
            ok("ack", m.delivery.ack(BasicAckOptions::default())).await;
            n += 1;
        }
        assert_eq!(n, 96, "{q}");
    }
    // The acks' removal is synced soon after them; then the segments go.
    let deadline = Instant::now() + Duration::from_secs(10);
    while log_bytes(&dir) > 8 * MIB {
        assert!(
            Instant::now() < deadline,
            "the body log still holds {} bytes after the backlog was drained",
            log_bytes(&dir)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = conn.close(200, "bye".into()).await;
    broker.shutdown().await;

    let broker = warrenmq::start(config(&dir)).await.expect("restarts");
    let conn = connect_url(&format!("amqp://guest:guest@{}/%2f", broker.local_addr())).await;
    let ch = channel(&conn).await;
    for q in queues {
        let got = ok(
            "basic.get",
            ch.basic_get(q.into(), BasicGetOptions::default()),
        )
        .await;
        assert!(got.is_none(), "{q}: an acked message came back");
    }
    assert!(
        log_bytes(&dir) < MIB,
        "nothing left to keep after a restart"
    );
    let _ = conn.close(200, "bye".into()).await;
    broker.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
