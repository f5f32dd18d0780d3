//! Exchanges, queues and bindings declared in the configuration file: applied at
//! start-up through the same path as a client's declarations, durable, applied
//! again at every start without change, and refused at the file's line when the
//! store holds an entity with other properties.

mod common;
mod support;

use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use support::{channel, connect_url, ok};
use warrenmq::{BrokerHandle, Config};

/// A configuration file: top-level keys, then the listener, vhost and user (ten
/// lines), then `topology`.
fn config_with(
    dir: &std::path::Path,
    top: &str,
    topology: &str,
) -> Result<Config, warrenmq::config::ConfigError> {
    let text = format!(
        "{top}listen = [\"127.0.0.1:0\"]\ndata_dir = {:?}\n\n[[vhosts]]\nname = \"/\"\n\n[[users]]\nname = \"guest\"\npassword = \"guest\"\n\n{topology}",
        dir.display().to_string()
    );
    Config::parse(&text, "topology.toml")
}

fn config(dir: &std::path::Path, topology: &str) -> Result<Config, warrenmq::config::ConfigError> {
    config_with(dir, "", topology)
}

async fn start_with(
    dir: &std::path::Path,
    top: &str,
    topology: &str,
) -> Result<BrokerHandle, String> {
    let config = config_with(dir, top, topology).map_err(|e| e.to_string())?;
    warrenmq::start(config).await.map_err(|e| e.to_string())
}

async fn start(dir: &std::path::Path, topology: &str) -> Result<BrokerHandle, String> {
    start_with(dir, "", topology).await
}

fn url(b: &BrokerHandle) -> String {
    format!("amqp://guest:guest@{}/%2f", b.local_addr())
}

const ORDERS: &str = r##"
[[exchanges]]
name = "orders"
type = "topic"

[[exchanges]]
name = "audit"
type = "fanout"

[[queues]]
name = "orders.eu"
arguments = { "x-max-length" = 100, "x-queue-type" = "classic" }

[[queues]]
name = "audit.all"

[[bindings]]
source = "orders"
destination = "orders.eu"
routing_key = "eu.#"

[[bindings]]
source = "orders"
destination = "audit"
destination_type = "exchange"
routing_key = "#"

[[bindings]]
source = "audit"
destination = "audit.all"
"##;

async fn publish(ch: &lapin::Channel, exchange: &str, key: &str, body: &[u8]) {
    support::confirm_mode(ch).await;
    support::publish_props(
        ch,
        exchange,
        key,
        body,
        BasicProperties::default().with_delivery_mode(2),
    )
    .await;
    ok("confirms", ch.wait_for_confirms()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_from_the_file_routes_and_survives_a_restart() {
    let dir = common::temp_data_dir();
    let broker = start(&dir, ORDERS).await.expect("starts");
    {
        let conn = connect_url(&url(&broker)).await;
        let ch = channel(&conn).await;
        publish(&ch, "orders", "eu.paris", b"first").await;
        publish(&ch, "orders", "us.nyc", b"second").await;
        assert_eq!(support::drain(&ch, "orders.eu").await, ["first"]);
        assert_eq!(support::drain(&ch, "audit.all").await, ["first", "second"]);
        publish(&ch, "orders", "eu.rome", b"kept").await;
        // The declared queue is durable: a passive declare finds it with its arguments.
        let (n, _) = support::counts(&ch, "orders.eu").await;
        assert_eq!(n, 1);
    }
    broker.shutdown().await;

    // Declared again from the same file: nothing changes, nothing is lost.
    let broker = start(&dir, ORDERS).await.expect("starts again");
    let conn = connect_url(&url(&broker)).await;
    let ch = channel(&conn).await;
    assert_eq!(support::drain(&ch, "orders.eu").await, ["kept"]);
    publish(&ch, "orders", "eu.oslo", b"after").await;
    assert_eq!(support::drain(&ch, "orders.eu").await, ["after"]);
    // A client's redeclare with the file's properties is equivalent.
    let args = support::table(&[
        ("x-max-length", AMQPValue::LongLongInt(100)),
        ("x-queue-type", support::s("classic")),
    ]);
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ok(
        "queue.declare",
        ch.queue_declare("orders.eu".into(), durable, args),
    )
    .await;
    drop(conn);
    broker.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_entity_with_other_properties_stops_start_up_at_its_line() {
    let dir = common::temp_data_dir();
    let broker = start(&dir, ORDERS).await.expect("starts");
    broker.shutdown().await;

    let changed = ORDERS.replace("\"x-max-length\" = 100", "\"x-max-length\" = 200");
    let err = start(&dir, &changed).await.err().expect("refused");
    // The file's first ten lines are the listener, vhost and user; `[[queues]]`
    // for orders.eu is line 20.
    assert!(err.starts_with("topology.toml:20:1: "), "{err}");
    assert!(err.contains("queue 'orders.eu' in vhost '/'"), "{err}");
    assert!(
        err.contains("inequivalent arg 'x-max-length' for queue 'orders.eu' in vhost '/': received '200' but current is '100'"),
        "{err}"
    );
    assert!(err.contains("on_conflict = \"keep-stored\""), "{err}");

    let changed = ORDERS.replace("type = \"fanout\"", "type = \"direct\"");
    let err = start(&dir, &changed).await.err().expect("refused");
    assert!(err.contains("exchange 'audit' in vhost '/'"), "{err}");
    assert!(err.contains("inequivalent arg 'type'"), "{err}");

    // RabbitMQ's behaviour on request: the stored entity stays, with a warning.
    let broker = start_with(&dir, "on_conflict = \"keep-stored\"\n", &changed)
        .await
        .expect("starts keeping the stored exchange");
    let conn = connect_url(&url(&broker)).await;
    let ch = channel(&conn).await;
    let fanout = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ok(
        "exchange.declare",
        ch.exchange_declare(
            "audit".into(),
            lapin::ExchangeKind::Fanout,
            fanout,
            FieldTable::default(),
        ),
    )
    .await;
    drop(conn);
    broker.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn bad_entries_are_refused_at_their_line() {
    let dir = common::temp_data_dir();
    let unknown_vhost = "[[queues]]\nname = \"q\"\nvhost = \"nowhere\"\n";
    let err = config(&dir, unknown_vhost)
        .expect_err("refused")
        .to_string();
    assert_eq!(err, "topology.toml:13:1: queues: unknown vhost 'nowhere'");

    let date = "[[queues]]\nname = \"q\"\narguments = { \"x-expires\" = 1979-05-27 }\n";
    let err = config(&dir, date).expect_err("refused").to_string();
    assert!(
        err.starts_with("topology.toml:13:1: queues: arguments: 1979-05-27"),
        "{err}"
    );

    let missing = "[[bindings]]\nsource = \"nope\"\ndestination = \"q\"\n";
    let err = start(&dir, missing).await.err().expect("refused");
    assert!(err.starts_with("topology.toml:11:1: "), "{err}");
    assert!(
        err.contains("NOT_FOUND - no exchange 'nope' in vhost '/'"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether a queue (or exchange) exists, by a passive declare on a fresh channel.
async fn exists(conn: &lapin::Connection, kind: &str, name: &str) -> bool {
    let ch = channel(conn).await;
    let passive = |r: lapin::Result<()>| r.is_ok();
    match kind {
        "queue" => ch
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .is_ok(),
        _ => passive(
            ch.exchange_declare(
                name.into(),
                lapin::ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await,
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_removes_only_what_the_file_created_and_never_a_queue_with_messages() {
    let dir = common::temp_data_dir();
    // A client's queue exists before the file names it: the file did not create it.
    let b = start(&dir, "").await.expect("starts");
    let conn = connect_url(&url(&b)).await;
    let ch = channel(&conn).await;
    for q in ["client.before", "client.only"] {
        ok(
            "queue.declare",
            ch.queue_declare(
                q.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            ),
        )
        .await;
    }
    drop(conn);
    b.shutdown().await;

    let first = r#"
[[exchanges]]
name = "events"
type = "fanout"

[[queues]]
name = "events.kept"

[[queues]]
name = "events.idle"

[[queues]]
name = "client.before"

[[bindings]]
source = "events"
destination = "events.kept"
"#;
    let b = start(&dir, first).await.expect("starts");
    let conn = connect_url(&url(&b)).await;
    let ch = channel(&conn).await;
    // A persistent message waits in a queue the file created.
    support::confirm_mode(&ch).await;
    support::publish_props(
        &ch,
        "events",
        "",
        b"pending",
        BasicProperties::default().with_delivery_mode(2),
    )
    .await;
    ok("confirms", ch.wait_for_confirms()).await;
    assert_eq!(support::counts(&ch, "events.kept").await.0, 1);
    drop(conn);
    b.shutdown().await;

    // Without prune, a file that lists nothing removes nothing.
    let b = start(&dir, "").await.expect("starts");
    let conn = connect_url(&url(&b)).await;
    assert!(exists(&conn, "exchange", "events").await);
    assert!(exists(&conn, "queue", "events.idle").await);
    drop(conn);
    b.shutdown().await;

    // With prune: the file's empty queue and exchange go (and the binding with
    // them), the queue holding a message stays, the clients' queues stay.
    let b = start_with(&dir, "prune = true\n", "")
        .await
        .expect("starts");
    let conn = connect_url(&url(&b)).await;
    assert!(!exists(&conn, "exchange", "events").await);
    assert!(!exists(&conn, "queue", "events.idle").await);
    assert!(exists(&conn, "queue", "events.kept").await);
    assert!(exists(&conn, "queue", "client.before").await);
    assert!(exists(&conn, "queue", "client.only").await);
    let ch = channel(&conn).await;
    assert_eq!(
        support::get_body(&ch, "events.kept").await.as_deref(),
        Some(&b"pending"[..])
    );
    drop(conn);
    b.shutdown().await;

    // Emptied, the kept queue is pruned at the next start: it was still recorded.
    let b = start_with(&dir, "prune = true\n", "")
        .await
        .expect("starts");
    let conn = connect_url(&url(&b)).await;
    assert!(!exists(&conn, "queue", "events.kept").await);
    assert!(exists(&conn, "queue", "client.before").await);
    drop(conn);
    b.shutdown().await;
}
