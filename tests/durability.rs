//! Durability through crashes of the real binary: what a confirm or a tx.commit-ok
//! promised survives `kill -9`, and a restart brings back exactly the durable state.
//!
//! One crash round runs by default. For many rounds (outside CI's fast path):
//!   WARRENMQ_CRASH_ROUNDS=50 cargo test --release --test durability -- --nocapture

mod common;
mod process;
mod support;

use std::collections::{HashMap, HashSet};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation, ExchangeKind};
use support::{channel, connect_url, ok};

/// The real `warrenmq` process on a data directory.
struct Broker {
    child: Child,
    addr: SocketAddr,
}

impl Broker {
    fn start(dir: &Path) -> Broker {
        let mut cmd = process::warrenmq();
        cmd.args([
            "--listen",
            "127.0.0.1:0",
            "--log-level",
            "info",
            "--data-dir",
        ])
        .arg(dir);
        let (child, addr) = process::spawn(cmd);
        Broker { child, addr }
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    /// SIGKILL: no shutdown path runs.
    fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn data_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("warrenmq-dur-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn persistent(publisher: usize, seq: u64) -> BasicProperties {
    let mut h = FieldTable::default();
    h.insert("publisher".into(), AMQPValue::LongLongInt(publisher as i64));
    h.insert("seq".into(), AMQPValue::LongLongInt(seq as i64));
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(h)
}

fn header(d: &FieldTable, k: &str) -> u64 {
    match d.inner().get(k) {
        Some(AMQPValue::LongLongInt(n)) => *n as u64,
        other => panic!("header {k}: {other:?}"),
    }
}

/// Publishes persistent messages with confirms until the broker dies; returns the
/// sequence numbers the broker confirmed.
async fn publish_until_killed(url: String, publisher: usize, queue: String) -> Vec<u64> {
    let conn = connect_url(&url).await;
    let ch = channel(&conn).await;
    ok(
        "confirm.select",
        ch.confirm_select(ConfirmSelectOptions::default()),
    )
    .await;
    let mut confirmed = Vec::new();
    let mut seq = 0u64;
    loop {
        // A window of 64 publishes in flight, then collect their confirms.
        let mut pending = Vec::new();
        for _ in 0..64 {
            let body = format!("p{publisher}-{seq}");
            let sent = ch
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    persistent(publisher, seq),
                )
                .await;
            match sent {
                Ok(confirm) => pending.push((seq, confirm)),
                Err(_) => return confirmed,
            }
            seq += 1;
        }
        for (s, confirm) in pending {
            match tokio::time::timeout(Duration::from_secs(10), confirm).await {
                Ok(Ok(Confirmation::Ack(_))) => confirmed.push(s),
                _ => return confirmed,
            }
        }
    }
}

/// Consumes with acks in transactions. Returns the (publisher, seq) of messages
/// whose ack was committed (tx.commit-ok received) before the broker died, and of
/// those whose commit was in flight when it died: those may or may not be gone.
async fn consume_until_killed(
    url: String,
    queue: String,
) -> (Vec<(usize, u64)>, Vec<(usize, u64)>) {
    let conn = connect_url(&url).await;
    let ch = channel(&conn).await;
    ok("tx.select", ch.tx_select()).await;
    let mut committed = Vec::new();
    loop {
        let mut batch = Vec::new();
        for _ in 0..20 {
            match tokio::time::timeout(
                Duration::from_secs(10),
                ch.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false }),
            )
            .await
            {
                Ok(Ok(Some(m))) => {
                    let h = m.delivery.properties.headers().clone().unwrap_or_default();
                    let id = (header(&h, "publisher") as usize, header(&h, "seq"));
                    batch.push(id);
                    if ch
                        .basic_ack(m.delivery.delivery_tag, BasicAckOptions::default())
                        .await
                        .is_err()
                    {
                        return (committed, batch);
                    }
                }
                Ok(Ok(None)) => break,
                _ => return (committed, batch),
            }
        }
        match tokio::time::timeout(Duration::from_secs(10), ch.tx_commit()).await {
            Ok(Ok(())) => committed.extend(batch),
            _ => return (committed, batch),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn crash_round(round: usize) {
    let dir = data_dir(&format!("crash{round}"));
    let queue = "crash-test".to_string();
    let broker = Broker::start(&dir);
    {
        let conn = connect_url(&broker.url()).await;
        let ch = channel(&conn).await;
        ok(
            "queue.declare",
            ch.queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            ),
        )
        .await;
    }
    let publishers: Vec<_> = (0..3)
        .map(|p| tokio::spawn(publish_until_killed(broker.url(), p, queue.clone())))
        .collect();
    let consumer = tokio::spawn(consume_until_killed(broker.url(), queue.clone()));
    tokio::time::sleep(Duration::from_millis(700 + 97 * (round as u64 % 7))).await;
    broker.kill9();

    let mut confirmed: HashMap<usize, Vec<u64>> = HashMap::new();
    for (p, h) in publishers.into_iter().enumerate() {
        confirmed.insert(p, h.await.unwrap());
    }
    let (acked, in_doubt) = consumer.await.unwrap();
    let acked: HashSet<(usize, u64)> = acked.into_iter().collect();
    let in_doubt: HashSet<(usize, u64)> = in_doubt.into_iter().collect();
    let total_confirmed: usize = confirmed.values().map(|v| v.len()).sum();
    assert!(
        total_confirmed > 0,
        "the publishers got confirms before the crash"
    );

    // Restart on the same data and drain.
    let broker = Broker::start(&dir);
    let conn = connect_url(&broker.url()).await;
    let ch = channel(&conn).await;
    let mut seen: HashMap<(usize, u64), usize> = HashMap::new();
    let mut last_seq: HashMap<usize, u64> = HashMap::new();
    while let Some(m) = ok(
        "basic.get",
        ch.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true }),
    )
    .await
    {
        let h = m.delivery.properties.headers().clone().unwrap_or_default();
        let id = (header(&h, "publisher") as usize, header(&h, "seq"));
        assert!(!acked.contains(&id), "acked message {id:?} came back");
        let n = seen.entry(id).or_default();
        *n += 1;
        if *n > 1 {
            assert!(
                m.delivery.redelivered,
                "duplicate {id:?} without redelivered"
            );
        }
        let last = last_seq.entry(id.0).or_insert(0);
        assert!(
            id.1 >= *last,
            "publisher {} out of order: {} after {}",
            id.0,
            id.1,
            last
        );
        *last = id.1;
    }
    for (p, seqs) in &confirmed {
        for s in seqs {
            let id = (*p, *s);
            assert!(
                seen.contains_key(&id) || acked.contains(&id) || in_doubt.contains(&id),
                "confirmed message {id:?} was lost"
            );
        }
    }
    println!(
        "crash round {round}: {total_confirmed} confirmed, {} acked in committed transactions, {} recovered, none lost",
        acked.len(),
        seen.len()
    );
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Confirmed persistent messages survive kill -9, in order per publisher, and no
/// message whose ack was committed comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_messages_survive_kill_9() {
    let rounds: usize = std::env::var("WARRENMQ_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    for round in 0..rounds {
        crash_round(round).await;
    }
}

/// A restart brings back durable exchanges, queues and bindings and persistent
/// messages; non-durable, exclusive and auto-delete entities and transient
/// messages are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_durable_state_only() {
    let dir = data_dir("meta");
    let broker = Broker::start(&dir);
    {
        let conn = connect_url(&broker.url()).await;
        let ch = channel(&conn).await;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let dq = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ok(
            "x",
            ch.exchange_declare(
                "d.x".into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            ),
        )
        .await;
        ok(
            "x",
            ch.exchange_declare(
                "t.x".into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            ),
        )
        .await;
        ok(
            "q",
            ch.queue_declare("d.q".into(), dq, FieldTable::default()),
        )
        .await;
        ok(
            "q",
            ch.queue_declare(
                "t.q".into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            ),
        )
        .await;
        ok(
            "q",
            ch.queue_declare(
                "ad.q".into(),
                QueueDeclareOptions {
                    durable: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            ),
        )
        .await;
        ok(
            "q",
            ch.queue_declare(
                "ex.q".into(),
                QueueDeclareOptions {
                    durable: true,
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            ),
        )
        .await;
        ok(
            "bind",
            ch.queue_bind(
                "d.q".into(),
                "d.x".into(),
                "a.*".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await;
        ok(
            "confirm.select",
            ch.confirm_select(ConfirmSelectOptions::default()),
        )
        .await;
        for (body, mode) in [("kept", 2u8), ("dropped", 1u8)] {
            let c = ok(
                "publish",
                ch.basic_publish(
                    "d.x".into(),
                    "a.b".into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    BasicProperties::default().with_delivery_mode(mode),
                ),
            )
            .await;
            assert_eq!(ok("confirm", c).await, Confirmation::Ack(None));
        }
        broker.kill9();
    }
    let broker = Broker::start(&dir);
    let conn = connect_url(&broker.url()).await;
    let passive_q = |name: &'static str| {
        let conn = &conn;
        async move {
            let ch = channel(conn).await;
            ch.queue_declare(
                name.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map(|q| q.message_count())
        }
    };
    assert_eq!(passive_q("d.q").await.expect("durable queue is back"), 1);
    assert!(passive_q("t.q").await.is_err(), "non-durable queue is gone");
    assert!(
        passive_q("ad.q").await.is_err(),
        "auto-delete queue is gone"
    );
    assert!(passive_q("ex.q").await.is_err(), "exclusive queue is gone");
    let ch = channel(&conn).await;
    let passive_x = ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    ok(
        "durable exchange is back",
        ch.exchange_declare(
            "d.x".into(),
            ExchangeKind::Topic,
            passive_x,
            FieldTable::default(),
        ),
    )
    .await;
    assert!(ch
        .exchange_declare(
            "t.x".into(),
            ExchangeKind::Fanout,
            passive_x,
            FieldTable::default()
        )
        .await
        .is_err());
    // The binding came back too: routing through d.x still reaches d.q.
    let ch = channel(&conn).await;
    ok(
        "publish",
        ch.basic_publish(
            "d.x".into(),
            "a.c".into(),
            BasicPublishOptions::default(),
            b"routed",
            BasicProperties::default(),
        ),
    )
    .await;
    let mut bodies = Vec::new();
    while let Some(m) = ok(
        "get",
        ch.basic_get("d.q".into(), BasicGetOptions { no_ack: true }),
    )
    .await
    {
        bodies.push((
            String::from_utf8(m.delivery.data).unwrap(),
            m.delivery.redelivered,
        ));
    }
    assert_eq!(
        bodies,
        vec![("kept".to_string(), true), ("routed".to_string(), false)]
    );
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A second broker on the same data directory refuses to start, saying why.
#[test]
fn second_broker_on_same_data_dir_refuses_to_start() {
    let dir = data_dir("lock");
    let _first = Broker::start(&dir);
    let out = Command::new(env!("CARGO_BIN_EXE_warrenmq"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("in use by another WarrenMQ process"),
        "{text}"
    );
}

/// A durable queue whose backlog exceeds its memory budget keeps the rest on disk
/// and reads it back for delivery: every message arrives intact and in order,
/// also after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_beyond_memory_budget_is_paged_and_delivered_in_order() {
    let dir = data_dir("paging");
    let config = |dir: &Path| warrenmq::Config {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        data_dir: dir.to_path_buf(),
        limits: warrenmq::config::Limits {
            queue_memory_budget: 64 * 1024,
            ..Default::default()
        },
        ..warrenmq::Config::default()
    };
    let body = |i: usize| format!("{i:06}-{}", "x".repeat(1000));
    let broker = warrenmq::start(config(&dir)).await.unwrap();
    let url = format!("amqp://guest:guest@{}/%2f", broker.local_addr());
    {
        let conn = connect_url(&url).await;
        let ch = channel(&conn).await;
        let dq = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ok(
            "queue.declare",
            ch.queue_declare("paged".into(), dq, FieldTable::default()),
        )
        .await;
        ok(
            "confirm.select",
            ch.confirm_select(ConfirmSelectOptions::default()),
        )
        .await;
        for i in 0..1000 {
            ok(
                "publish",
                ch.basic_publish(
                    "".into(),
                    "paged".into(),
                    BasicPublishOptions::default(),
                    body(i).as_bytes(),
                    BasicProperties::default().with_delivery_mode(2),
                ),
            )
            .await;
        }
        ok("confirms", ch.wait_for_confirms()).await;
        // The first half is delivered from memory and disk alike, in order.
        for i in 0..500 {
            let m = ok(
                "get",
                ch.basic_get("paged".into(), BasicGetOptions { no_ack: true }),
            )
            .await
            .expect("a message");
            assert_eq!(String::from_utf8(m.delivery.data).unwrap(), body(i));
        }
    }
    broker.shutdown().await;

    let broker = warrenmq::start(config(&dir)).await.unwrap();
    let url = format!("amqp://guest:guest@{}/%2f", broker.local_addr());
    let conn = connect_url(&url).await;
    let ch = channel(&conn).await;
    let mut got = Vec::new();
    while let Some(m) = ok(
        "get",
        ch.basic_get("paged".into(), BasicGetOptions { no_ack: true }),
    )
    .await
    {
        got.push(String::from_utf8(m.delivery.data).unwrap());
    }
    // Deliveries before a clean shutdown were flushed; whatever came back is in order and intact.
    let first: usize = got[0][..6].parse().unwrap();
    assert!(first >= 500, "acked messages came back: {first}");
    let expected: Vec<String> = (first..1000).map(body).collect();
    assert_eq!(got, expected);
    drop(conn);
    broker.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A data directory whose database cannot be read stops start-up with a message
/// naming the directory and what to do, instead of starting empty.
#[test]
fn corrupt_data_directory_stops_start_up() {
    let dir = data_dir("corrupt");
    std::fs::create_dir_all(dir.join("db")).unwrap();
    let garbage: Vec<u8> = (0..100_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(dir.join("db").join("db"), garbage).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_warrenmq"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains(&dir.display().to_string()), "{text}");
    assert!(text.contains("Move the directory aside"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A message's TTL keeps running while the broker is down: one that expired during
/// the outage is gone after the restart; one without a TTL is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_keeps_running_across_a_restart() {
    let dir = data_dir("ttl");
    let broker = Broker::start(&dir);
    {
        let conn = connect_url(&broker.url()).await;
        let ch = channel(&conn).await;
        let dq = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ok(
            "queue.declare",
            ch.queue_declare("ttl.q".into(), dq, FieldTable::default()),
        )
        .await;
        ok(
            "confirm.select",
            ch.confirm_select(ConfirmSelectOptions::default()),
        )
        .await;
        for (body, props) in [
            (
                "short-lived",
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_expiration("1000".into()),
            ),
            ("kept", BasicProperties::default().with_delivery_mode(2)),
        ] {
            let c = ok(
                "publish",
                ch.basic_publish(
                    "".into(),
                    "ttl.q".into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    props,
                ),
            )
            .await;
            assert_eq!(ok("confirm", c).await, Confirmation::Ack(None));
        }
        broker.kill9();
    }
    std::thread::sleep(Duration::from_millis(1500));
    let broker = Broker::start(&dir);
    let conn = connect_url(&broker.url()).await;
    let ch = channel(&conn).await;
    let mut bodies = Vec::new();
    while let Some(m) = ok(
        "get",
        ch.basic_get("ttl.q".into(), BasicGetOptions { no_ack: true }),
    )
    .await
    {
        bodies.push(String::from_utf8(m.delivery.data).unwrap());
    }
    assert_eq!(bodies, vec!["kept".to_string()]);
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

/// What a durable delayed-message exchange holds survives `kill -9` once
/// confirmed: a message whose delay ran out while the broker was down comes out
/// at start, one still waiting comes out when its delay (counted from the
/// publish) is over, and neither comes out twice after another crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_messages_survive_kill_9() {
    let dir = data_dir("delayed");
    let broker = Broker::start(&dir);
    let delayed_type = {
        let mut t = FieldTable::default();
        t.insert(
            "x-delayed-type".into(),
            AMQPValue::LongString("direct".into()),
        );
        t
    };
    let published;
    {
        let conn = connect_url(&broker.url()).await;
        let ch = channel(&conn).await;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ok(
            "exchange.declare",
            ch.exchange_declare(
                "later".into(),
                ExchangeKind::Custom("x-delayed-message".into()),
                durable,
                delayed_type.clone(),
            ),
        )
        .await;
        let dq = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ok(
            "queue.declare",
            ch.queue_declare("later.q".into(), dq, FieldTable::default()),
        )
        .await;
        ok(
            "queue.bind",
            ch.queue_bind(
                "later.q".into(),
                "later".into(),
                "k".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await;
        ok(
            "confirm.select",
            ch.confirm_select(ConfirmSelectOptions::default()),
        )
        .await;
        published = std::time::Instant::now();
        for (body, delay) in [("late", 4000), ("early", 300)] {
            let mut h = FieldTable::default();
            h.insert("x-delay".into(), AMQPValue::LongInt(delay));
            let c = ok(
                "publish",
                ch.basic_publish(
                    "later".into(),
                    "k".into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_headers(h),
                ),
            )
            .await;
            assert_eq!(ok("confirm", c).await, Confirmation::Ack(None));
        }
        broker.kill9();
    }
    std::thread::sleep(Duration::from_millis(500));
    let broker = Broker::start(&dir);
    {
        let conn = connect_url(&broker.url()).await;
        let ch = channel(&conn).await;
        let next = |ch: lapin::Channel| async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                let m = ok(
                    "get",
                    ch.basic_get("later.q".into(), BasicGetOptions { no_ack: true }),
                )
                .await;
                if let Some(m) = m {
                    return m;
                }
                assert!(std::time::Instant::now() < deadline, "nothing came out");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let early = next(ch.clone()).await;
        assert_eq!(early.delivery.data, b"early");
        let late = next(ch.clone()).await;
        assert_eq!(late.delivery.data, b"late");
        assert!(
            published.elapsed() >= Duration::from_millis(4000),
            "late came out {:?} after its publish",
            published.elapsed()
        );
        let delay = late
            .delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-delay").cloned());
        assert_eq!(delay, Some(AMQPValue::LongInt(-4000)));
        // A declare waits for the store's sync, which covers the released copies' removal.
        ok(
            "queue.declare",
            ch.queue_declare(
                "later.sync".into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            ),
        )
        .await;
        broker.kill9();
    }
    let broker = Broker::start(&dir);
    let conn = connect_url(&broker.url()).await;
    let ch = channel(&conn).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let again = ok(
        "get",
        ch.basic_get("later.q".into(), BasicGetOptions { no_ack: true }),
    )
    .await;
    assert!(again.is_none(), "a released message came out twice");
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A broker in this process with a tiny per-queue memory budget, so that a
/// durable backlog of a few hundred 1 KiB messages lives mostly on disk.
async fn small_budget_broker(dir: &Path) -> warrenmq::BrokerHandle {
    warrenmq::start(support::budget_config(dir, 16 * 1024))
        .await
        .unwrap()
}

/// A consumer of a backlog that is mostly on disk gets every message, in order,
/// while the broker reads the rest back as it goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_of_a_paged_backlog_gets_it_all_in_order() {
    let dir = data_dir("paged-consume");
    let broker = small_budget_broker(&dir).await;
    let url = format!("amqp://guest:guest@{}/%2f", broker.local_addr());
    let conn = connect_url(&url).await;
    let ch = channel(&conn).await;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ok(
        "queue.declare",
        ch.queue_declare("paged-consume".into(), durable, FieldTable::default()),
    )
    .await;
    support::confirm_mode(&ch).await;
    let body = |i: usize| format!("{i:06}-{}", "y".repeat(1000));
    for i in 0..600 {
        support::publish_props(
            &ch,
            "",
            "paged-consume",
            body(i).as_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await;
    }
    ok("confirms", ch.wait_for_confirms()).await;
    ok("basic.qos", ch.basic_qos(20, BasicQosOptions::default())).await;
    let mut sub = support::consume(&ch, "paged-consume", false).await;
    for i in 0..600 {
        let d = sub.next().await;
        assert_eq!(String::from_utf8_lossy(&d.data), body(i), "message {i}");
        ok("ack", d.acker.ack(BasicAckOptions::default())).await;
    }
    sub.expect_nothing(support::QUIET).await;
    drop(conn);
    broker.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Messages that expire while paged out to disk are read back and dead-lettered
/// like any other: none is lost on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paged_out_messages_that_expire_are_dead_lettered() {
    let dir = data_dir("paged-dlx");
    let broker = small_budget_broker(&dir).await;
    let url = format!("amqp://guest:guest@{}/%2f", broker.local_addr());
    let conn = connect_url(&url).await;
    let ch = channel(&conn).await;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ok(
        "queue.declare",
        ch.queue_declare("paged-dlq".into(), durable, FieldTable::default()),
    )
    .await;
    let args = support::table(&[
        ("x-message-ttl", AMQPValue::LongInt(300)),
        ("x-dead-letter-exchange", support::s("")),
        ("x-dead-letter-routing-key", support::s("paged-dlq")),
    ]);
    ok(
        "queue.declare",
        ch.queue_declare("paged-ttl".into(), durable, args),
    )
    .await;
    support::confirm_mode(&ch).await;
    let body = |i: usize| format!("{i:06}-{}", "z".repeat(1000));
    for i in 0..300 {
        support::publish_props(
            &ch,
            "",
            "paged-ttl",
            body(i).as_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await;
    }
    ok("confirms", ch.wait_for_confirms()).await;
    let mut sub = support::consume(&ch, "paged-dlq", true).await;
    let mut got: Vec<String> = Vec::new();
    for _ in 0..300 {
        got.push(String::from_utf8_lossy(&sub.next().await.data).into_owned());
    }
    got.sort();
    let expected: Vec<String> = (0..300).map(body).collect();
    assert_eq!(got, expected);
    sub.expect_nothing(support::QUIET).await;
    let (left, _) = support::counts(&ch, "paged-ttl").await;
    assert_eq!(left, 0);
    drop(conn);
    broker.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Between checkpoints the index changes live only in the body log: confirmed
/// messages and acks made just before a kill -9 are found in sled only after the
/// restart replays the log. The acked ones stay gone, the rest come back in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_changes_since_the_last_checkpoint_are_replayed_after_kill_9() {
    let dir = data_dir("replay");
    let broker = Broker::start(&dir);
    let body = |i: usize| format!("m{i:04}");
    {
        let conn = connect_url(&broker.url()).await;
        let ch = channel(&conn).await;
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ok(
            "queue.declare",
            ch.queue_declare("replay.q".into(), durable, FieldTable::default()),
        )
        .await;
        ok(
            "confirm.select",
            ch.confirm_select(ConfirmSelectOptions::default()),
        )
        .await;
        let publish = |i: usize| {
            let ch = ch.clone();
            async move {
                let c = ok(
                    "basic.publish",
                    ch.basic_publish(
                        "".into(),
                        "replay.q".into(),
                        BasicPublishOptions::default(),
                        body(i).as_bytes(),
                        BasicProperties::default().with_delivery_mode(2),
                    ),
                )
                .await;
                assert_eq!(ok("confirm", c).await, Confirmation::Ack(None));
            }
        };
        for i in 0..300 {
            publish(i).await;
        }
        // The first 100 are acked; one more confirm's sync covers those acks.
        for i in 0..100 {
            let m = ok(
                "basic.get",
                ch.basic_get("replay.q".into(), BasicGetOptions { no_ack: false }),
            )
            .await
            .expect("a message");
            assert_eq!(m.delivery.data, body(i).as_bytes());
            ok(
                "basic.ack",
                m.delivery.acker.ack(BasicAckOptions::default()),
            )
            .await;
        }
        publish(300).await;
        broker.kill9();
    }
    // No checkpoint came between the publishes and the kill: sled has not seen
    // the last of them.
    {
        let db = sled::Config::new()
            .path(dir.join("db"))
            .open()
            .expect("the broker's sled database opens");
        let in_sled: usize = db
            .open_tree("index")
            .unwrap()
            .iter()
            .map(|kv| {
                let items = warrenmq::store::disk_format::decode_chunk(&kv.unwrap().1);
                items.expect("a readable chunk").len()
            })
            .sum();
        assert!(
            in_sled < 201,
            "sled holds {in_sled} entries before the replay"
        );
    }
    let broker = Broker::start(&dir);
    let conn = connect_url(&broker.url()).await;
    let ch = channel(&conn).await;
    let mut got = Vec::new();
    while let Some(m) = ok(
        "basic.get",
        ch.basic_get("replay.q".into(), BasicGetOptions { no_ack: true }),
    )
    .await
    {
        got.push(String::from_utf8(m.delivery.data).unwrap());
    }
    let expected: Vec<String> = (100..301).map(body).collect();
    assert_eq!(got, expected);
    drop(conn);
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}
