//! Policies from the configuration, as RabbitMQ's: they apply to queues and
//! exchanges whose names match, those declared by clients included, take the
//! smaller of policy and argument for limits and let the argument win otherwise,
//! and a reload changes them on queues that already exist.

mod common;
mod support;

use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::ExchangeKind;

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
