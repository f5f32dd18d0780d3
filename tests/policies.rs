//! Policies from the configuration, as RabbitMQ's: they apply to queues and
//! exchanges whose names match, those declared by clients included, take the
//! smaller of policy and argument for limits and let the argument win otherwise,
//! and a reload changes them on queues that already exist.

mod common;
mod support;

use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::ExchangeKind;
use std::time::Duration;

const BASE: &str = r#"
listen = ["127.0.0.1:0"]
data_dir = "DATA"

[[vhosts]]
name = "/"

[[users]]
name = "guest"
password = "guest"
"#;

fn config(data: &std::path::Path, policies: &str) -> warrenmq::Config {
    let text = BASE.replace("DATA", &data.display().to_string()) + policies;
    warrenmq::Config::parse(&text, "policies.toml").expect("configuration parses")
}

async fn start(policies: &str) -> (warrenmq::BrokerHandle, std::path::PathBuf) {
    let data = common::temp_data_dir();
    let handle = warrenmq::start(config(&data, policies))
        .await
        .expect("broker starts");
    (handle, data)
}

async fn declare(ch: &lapin::Channel, name: &str, args: FieldTable) {
    support::ok(
        "queue.declare",
        ch.queue_declare(name.into(), QueueDeclareOptions::default(), args),
    )
    .await;
}

fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

async fn publish_all(ch: &lapin::Channel, queue: &str, bodies: &[&str]) {
    for b in bodies {
        support::publish(ch, "", queue, b.as_bytes()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_max_length_policy_limits_queues_clients_declare() {
    let (broker, _data) = start(
        r#"
[[policies]]
name = "short"
pattern = "^short\\."
apply-to = "queues"
definition = { "max-length" = 2 }
"#,
    )
    .await;
    let conn =
        support::connect_url(&format!("amqp://guest:guest@{}/%2f", broker.local_addr())).await;
    let ch = support::channel(&conn).await;
    declare(&ch, "short.q", FieldTable::default()).await;
    declare(&ch, "long.q", FieldTable::default()).await;
    publish_all(&ch, "short.q", &["1", "2", "3", "4"]).await;
    publish_all(&ch, "long.q", &["1", "2", "3", "4"]).await;
    // Drop-head: the oldest went.
    assert_eq!(support::drain(&ch, "short.q").await, vec!["3", "4"]);
    assert_eq!(support::drain(&ch, "long.q").await.len(), 4);
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_take_the_smaller_of_policy_and_argument() {
    let (broker, _data) = start(
        r#"
[[policies]]
name = "three"
pattern = ".*"
definition = { "max-length" = 3 }
"#,
    )
    .await;
    let conn =
        support::connect_url(&format!("amqp://guest:guest@{}/%2f", broker.local_addr())).await;
    let ch = support::channel(&conn).await;
    declare(
        &ch,
        "arg-larger",
        table(&[("x-max-length", AMQPValue::LongInt(10))]),
    )
    .await;
    declare(
        &ch,
        "arg-smaller",
        table(&[("x-max-length", AMQPValue::LongInt(1))]),
    )
    .await;
    let five = ["a", "b", "c", "d", "e"];
    publish_all(&ch, "arg-larger", &five).await;
    publish_all(&ch, "arg-smaller", &five).await;
    assert_eq!(support::drain(&ch, "arg-larger").await, vec!["c", "d", "e"]);
    assert_eq!(support::drain(&ch, "arg-smaller").await, vec!["e"]);
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_dead_letters_expired_messages_unless_the_argument_says_otherwise() {
    let (broker, _data) = start(
        r#"
[[exchanges]]
name = "dlx"
type = "fanout"

[[queues]]
name = "dead"

[[queues]]
name = "elsewhere"

[[bindings]]
source = "dlx"
destination = "dead"

[[exchanges]]
name = "other-dlx"
type = "fanout"

[[bindings]]
source = "other-dlx"
destination = "elsewhere"

[[policies]]
name = "ttl"
pattern = "^work"
apply-to = "queues"
priority = 1
definition = { "message-ttl" = 50, "dead-letter-exchange" = "dlx" }
"#,
    )
    .await;
    let conn =
        support::connect_url(&format!("amqp://guest:guest@{}/%2f", broker.local_addr())).await;
    let ch = support::channel(&conn).await;
    declare(&ch, "work", FieldTable::default()).await;
    declare(
        &ch,
        "work-own-dlx",
        table(&[(
            "x-dead-letter-exchange",
            AMQPValue::LongString("other-dlx".into()),
        )]),
    )
    .await;
    support::publish(&ch, "", "work", b"late").await;
    support::publish(&ch, "", "work-own-dlx", b"late too").await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(support::drain(&ch, "work").await, Vec::<String>::new());
    assert_eq!(support::drain(&ch, "dead").await, vec!["late"]);
    // The policy's TTL applied, its dead-letter exchange did not: the argument won.
    assert_eq!(support::drain(&ch, "elsewhere").await, vec!["late too"]);
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alternate_exchange_policy_catches_unroutable_messages() {
    let (broker, _data) = start(
        r#"
[[exchanges]]
name = "unrouted"
type = "fanout"

[[queues]]
name = "caught"

[[bindings]]
source = "unrouted"
destination = "caught"

[[policies]]
name = "ae"
pattern = "^orders$"
apply-to = "exchanges"
definition = { "alternate-exchange" = "unrouted" }
"#,
    )
    .await;
    let conn =
        support::connect_url(&format!("amqp://guest:guest@{}/%2f", broker.local_addr())).await;
    let ch = support::channel(&conn).await;
    support::ok(
        "exchange.declare",
        ch.exchange_declare(
            "orders".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    support::publish(&ch, "orders", "nobody-binds-this", b"stray").await;
    assert_eq!(support::drain(&ch, "caught").await, vec!["stray"]);
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_a_new_policy_to_queues_that_exist() {
    let (broker, data) = start("").await;
    let conn =
        support::connect_url(&format!("amqp://guest:guest@{}/%2f", broker.local_addr())).await;
    let ch = support::channel(&conn).await;
    declare(&ch, "backlog", FieldTable::default()).await;
    publish_all(&ch, "backlog", &["1", "2", "3", "4", "5"]).await;
    assert_eq!(support::counts(&ch, "backlog").await.0, 5);

    broker.reload(config(
        &data,
        r#"
[[policies]]
name = "cap"
pattern = "^backlog$"
definition = { "max-length" = 2 }
"#,
    ));
    // The oldest are dropped at once, as RabbitMQ does on a policy change.
    assert_eq!(support::drain(&ch, "backlog").await, vec!["4", "5"]);

    // Removing the policy lifts the limit.
    broker.reload(config(&data, ""));
    publish_all(&ch, "backlog", &["6", "7", "8"]).await;
    assert_eq!(support::drain(&ch, "backlog").await, vec!["6", "7", "8"]);
    broker.shutdown().await;
}

#[test]
fn a_policy_with_an_unknown_key_stops_start_up_at_its_line() {
    let text = BASE.replace("DATA", "/tmp/unused")
        + "\n[[policies]]\nname = \"p\"\npattern = \".*\"\ndefinition = { colour = \"blue\" }\n";
    let err = warrenmq::Config::parse(&text, "policies.toml")
        .unwrap_err()
        .to_string();
    let line = text
        .lines()
        .position(|l| l.starts_with("definition"))
        .unwrap()
        + 1;
    assert_eq!(
        err,
        format!("policies.toml:{line}:1: policies: 'p': definition: unknown key 'colour'")
    );
}

#[test]
fn mirroring_keys_from_rabbitmq_are_accepted() {
    let text = BASE.replace("DATA", "/tmp/unused")
        + "\n[[policies]]\nname = \"ha\"\npattern = \".*\"\ndefinition = { \"ha-mode\" = \"all\", \"queue-mode\" = \"lazy\" }\n";
    assert!(warrenmq::Config::parse(&text, "policies.toml").is_ok());
}

/// A delivery-limit policy bounds quorum queues' redeliveries as x-delivery-limit
/// does (the smaller of the two), and only theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_limit_policy_dead_letters_quorum_queue_messages_past_it() {
    use lapin::options::{BasicGetOptions, BasicRejectOptions};
    let (broker, _data) = start(
        r#"
[[policies]]
name = "limited"
pattern = "^limited\\."
apply-to = "quorum_queues"
definition = { "delivery-limit" = 1, "dead-letter-exchange" = "", "dead-letter-routing-key" = "limited.dead" }
"#,
    )
    .await;
    let conn =
        support::connect_url(&format!("amqp://guest:guest@{}/%2f", broker.local_addr())).await;
    let ch = support::channel(&conn).await;
    let quorum = table(&[("x-queue-type", support::s("quorum"))]);
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for q in ["limited.q", "limited.dead"] {
        support::ok(
            "queue.declare",
            ch.queue_declare(q.into(), durable, quorum.clone()),
        )
        .await;
    }
    publish_all(&ch, "limited.q", &["m"]).await;
    // Delivered, returned once (within the limit), delivered, returned again: past it.
    for _ in 0..2 {
        let m = support::ok(
            "basic.get",
            ch.basic_get("limited.q".into(), BasicGetOptions::default()),
        )
        .await
        .expect("the message is there");
        support::ok(
            "basic.reject",
            m.delivery.reject(BasicRejectOptions { requeue: true }),
        )
        .await;
    }
    assert_eq!(support::drain(&ch, "limited.q").await, Vec::<String>::new());
    assert_eq!(support::drain(&ch, "limited.dead").await, vec!["m"]);
}

/// Per-queue acknowledgement timeouts, as RabbitMQ 3.12 has them: the queue's
/// x-consumer-timeout or its policy's consumer-timeout (the smaller), checked on
/// each channel's oldest delivery; here with no broker-wide timeout at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_s_consumer_timeout_closes_the_channel_holding_its_delivery() {
    let (broker, _data) = start(
        r#"
[limits]
consumer_timeout = 0
frame_timeout = 2

[[policies]]
name = "impatient"
pattern = "^impatient\\."
apply-to = "queues"
definition = { "consumer-timeout" = 1000 }
"#,
    )
    .await;
    let conn =
        support::connect_url(&format!("amqp://guest:guest@{}/%2f", broker.local_addr())).await;
    let ch = support::channel(&conn).await;
    declare(&ch, "impatient.q", FieldTable::default()).await;
    declare(
        &ch,
        "arg.q",
        table(&[("x-consumer-timeout", AMQPValue::LongInt(1000))]),
    )
    .await;
    declare(&ch, "patient.q", FieldTable::default()).await;
    let mut subs = Vec::new();
    for q in ["impatient.q", "arg.q", "patient.q"] {
        let c = support::channel(&conn).await;
        let mut sub = support::consume(&c, q, false).await;
        support::publish(&ch, "", q, b"held").await;
        sub.next().await;
        subs.push((c, sub));
    }
    for (c, sub) in &mut subs[..2] {
        let (code, text) = sub.channel_closed().await;
        assert_eq!(code, 406);
        assert_eq!(
            text,
            format!(
                "PRECONDITION_FAILED - delivery acknowledgement on channel {} timed out. Timeout value used: 1000 ms. This timeout value can be configured, see consumers doc guide to learn more",
                c.id()
            )
        );
    }
    // No timeout of its own and none for the broker: still open.
    assert!(subs[2].0.status().connected());
    subs[2].1.expect_nothing(Duration::from_millis(500)).await;
    assert!(subs[2].0.status().connected());
}
