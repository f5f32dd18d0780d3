//! Topic bindings chosen to make a backtracking matcher explode: `#` between
//! repeated words, published against keys of 100 to 128 words that almost match.
//!
//! The broker runs on its own two-worker runtime, apart from the clients', so
//! that a matcher pinning the broker's threads shows up here as timeouts (and
//! the test fails) instead of freezing the test's own timers along with it.

mod common;
mod support;

use std::time::{Duration, Instant};

use lapin::{options::*, BasicProperties, Confirmation, ExchangeKind};
use support::*;

/// `#` before each of eight `a`s and a final `b`: a backtracking matcher tries
/// every way of splitting a key of `a`s among the `#`s before failing.
const HASH_A: &str = "#.a.#.a.#.a.#.a.#.a.#.a.#.a.#.a.#.b";
/// The same with `*`, which also matches empty words.
const HASH_STAR: &str = "#.*.#.*.#.*.#.*.#.*.#.*.#.*.#.*.#.x";
/// `*` before each `#`: at least eight words, then `z`.
const STAR_HASH: &str = "*.#.*.#.*.#.*.#.*.#.*.#.*.#.*.#.z";

/// A 255-byte binding key, the longest queue.bind allows: 63 `a`s, each after a
/// `#`, then `#.b`.
fn long_hash_a() -> String {
    format!("{}#.b", "#.a.".repeat(63))
}

fn words(parts: &[(&str, usize)]) -> String {
    let mut v: Vec<&str> = Vec::new();
    for (w, n) in parts {
        v.extend(std::iter::repeat_n(*w, *n));
    }
    v.join(".")
}

/// (label, routing key, queues it must reach among hash_a, hash_star, star_hash, long).
fn cases() -> Vec<(&'static str, String, [bool; 4])> {
    vec![
        ("a100", words(&[("a", 100)]), [false, false, false, false]),
        ("a127", words(&[("a", 127)]), [false, false, false, false]),
        ("empty128", ".".repeat(127), [false, false, false, false]),
        (
            "a126x",
            words(&[("a", 126), ("x", 1)]),
            [false, true, false, false],
        ),
        (
            "a99b",
            words(&[("a", 99), ("b", 1)]),
            [true, false, false, true],
        ),
        (
            "a126b",
            words(&[("a", 126), ("b", 1)]),
            [true, false, false, true],
        ),
        (
            "empty126x",
            format!("{}x", ".".repeat(126)),
            [false, true, false, false],
        ),
        (
            "a126z",
            words(&[("a", 126), ("z", 1)]),
            [false, false, true, false],
        ),
        (
            "a62c64b",
            words(&[("a", 62), ("c", 64), ("b", 1)]),
            [true, false, false, false],
        ),
        (
            "c64a63b",
            words(&[("c", 64), ("a", 63), ("b", 1)]),
            [true, false, false, true],
        ),
        (
            "a7b",
            words(&[("a", 7), ("b", 1)]),
            [false, false, false, false],
        ),
        (
            "a8b",
            words(&[("a", 8), ("b", 1)]),
            [true, false, false, false],
        ),
        (
            "a7x",
            words(&[("a", 7), ("x", 1)]),
            [false, false, false, false],
        ),
        (
            "a8x",
            words(&[("a", 8), ("x", 1)]),
            [false, true, false, false],
        ),
        (
            "a7z",
            words(&[("a", 7), ("z", 1)]),
            [false, false, false, false],
        ),
        (
            "a8z",
            words(&[("a", 8), ("z", 1)]),
            [false, false, true, false],
        ),
    ]
}

struct IsolatedBroker {
    rt: Option<tokio::runtime::Runtime>,
    broker: Option<common::TestBroker>,
}

impl IsolatedBroker {
    fn start() -> IsolatedBroker {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("broker runtime");
        let broker = rt.block_on(common::start());
        IsolatedBroker {
            rt: Some(rt),
            broker: Some(broker),
        }
    }

    fn broker(&self) -> &common::TestBroker {
        self.broker.as_ref().expect("broker is running")
    }
}

impl Drop for IsolatedBroker {
    fn drop(&mut self) {
        let (Some(rt), Some(broker)) = (self.rt.take(), self.broker.take()) else {
            return;
        };
        if !std::thread::panicking() {
            rt.block_on(async {
                let _ = tokio::time::timeout(WAIT, broker.stop()).await;
            });
        } else {
            drop(broker);
        }
        // A worker stuck in a match would make an ordinary drop wait for it.
        rt.shutdown_background();
    }
}

/// Publishes every case on its own connection and waits for each confirm.
async fn abuse(url: String, exchange: String, tag: &'static str) -> Duration {
    let conn = connect_url(&url).await;
    let ch = channel(&conn).await;
    confirm_mode(&ch).await;
    let started = Instant::now();
    for (label, key, _) in cases() {
        let confirm = ok(
            "basic.publish",
            ch.basic_publish(
                exchange.as_str().into(),
                key.as_str().into(),
                BasicPublishOptions::default(),
                format!("{tag}:{label}").as_bytes(),
                BasicProperties::default(),
            ),
        )
        .await;
        match tokio::time::timeout(WAIT, confirm).await {
            Ok(Ok(Confirmation::Ack(_))) => {}
            Ok(other) => panic!("{tag}: publish {label}: unexpected confirm {other:?}"),
            Err(_) => panic!("{tag}: no confirm for {label} within {WAIT:?}: the broker is stuck"),
        }
    }
    let spent = started.elapsed();
    let _ = conn.close(200, "bye".into()).await;
    spent
}

/// What a client that has nothing to do with the topic exchange should still get done.
async fn bystander(url: String) {
    let conn = connect_url(&url).await;
    let ch = channel(&conn).await;
    let q = temp_queue(&ch, "bystander").await;
    publish(&ch, "", &q, b"still here").await;
    assert_eq!(get_body(&ch, &q).await.as_deref(), Some(&b"still here"[..]));
    let _ = conn.close(200, "bye".into()).await;
}

/// The labels `tag` published, in the order they reached the queue.
fn tagged(bodies: &[String], tag: &str) -> Vec<String> {
    bodies
        .iter()
        .filter_map(|b| b.strip_prefix(&format!("{tag}:")).map(str::to_string))
        .collect()
}

#[test]
fn pathological_topic_bindings_neither_stall_nor_misroute() {
    let broker = IsolatedBroker::start();
    let url = broker.broker().url();
    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("client runtime");
    client.block_on(async {
        let (_setup_conn, ch) = open(broker.broker()).await;
        let x = temp_exchange(&ch, ExchangeKind::Topic, "abuse").await;
        let long = long_hash_a();
        assert_eq!(long.len(), 255);
        let patterns = [HASH_A, HASH_STAR, STAR_HASH, long.as_str()];
        let mut queues = Vec::new();
        for p in patterns {
            let q = temp_queue(&ch, "abused").await;
            bind(&ch, &q, &x, p).await;
            queues.push(q);
        }

        // Two publishers at once: enough, with the old matcher, to occupy both
        // of the broker's workers.
        let a = tokio::spawn(abuse(url.clone(), x.clone(), "A"));
        let b = tokio::spawn(abuse(url.clone(), x.clone(), "B"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let by = tokio::time::timeout(2 * WAIT, bystander(url.clone())).await;
        let spent_a = a.await;
        let spent_b = b.await;
        assert!(
            by.is_ok(),
            "a second connection stalled while topic publishes ran"
        );
        let spent_a = spent_a.expect("publisher A");
        let spent_b = spent_b.expect("publisher B");
        println!(
            "{} pathological publishes, confirmed: A in {spent_a:?}, B in {spent_b:?}",
            cases().len()
        );

        for (i, q) in queues.iter().enumerate() {
            let want: Vec<String> = cases()
                .into_iter()
                .filter(|(_, _, hits)| hits[i])
                .map(|(label, _, _)| label.to_string())
                .collect();
            let got = drain(&ch, q).await;
            for tag in ["A", "B"] {
                assert_eq!(
                    tagged(&got, tag),
                    want,
                    "queue bound with {} (publisher {tag})",
                    patterns[i]
                );
            }
        }
        delete_exchange(&ch, &x).await;
    });
    client.shutdown_timeout(Duration::from_secs(1));
    drop(broker);
}
