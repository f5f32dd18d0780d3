//! RabbitMQ's permissions from the configuration file: configure, write and read
//! regular expressions per user and vhost, checked on every operation as RabbitMQ
//! checks them, refused with 403 ACCESS_REFUSED and its text; a vhost the user has
//! no permissions for refuses connection.open with 530.

mod common;
mod support;

use lapin::options::*;
use lapin::types::FieldTable;
use lapin::BasicProperties;
use support::{amqp_err, channel, connect_url, ok};
use warrenmq::{BrokerHandle, Config};

async fn broker() -> BrokerHandle {
    let dir = common::temp_data_dir();
    let text = format!(
        r#"listen = ["127.0.0.1:0"]
data_dir = {:?}

[[vhosts]]
name = "/"

[[vhosts]]
name = "other"

[[users]]
name = "app"
password = "app"
vhosts = []

[[permissions]]
user = "app"
vhost = "/"
configure = "^app\\."
write = "^(app\\.|amq\\.direct$)"
read = "^(app\\.in|amq\\.direct)$"
"#,
        dir.display().to_string()
    );
    let config = Config::parse(&text, "perms.toml").expect("valid");
    warrenmq::start(config).await.expect("starts")
}

fn url(b: &BrokerHandle, vhost: &str) -> String {
    format!("amqp://app:app@{}/{vhost}", b.local_addr())
}

fn refused(user_text: &str, kind: &str, name: &str) -> String {
    format!(
        "ACCESS_REFUSED - access to {kind} '{name}' in vhost '/' refused for user '{user_text}'"
    )
}

#[tokio::test]
async fn each_operation_is_checked_against_the_users_permissions() {
    let b = broker().await;
    let conn = connect_url(&url(&b, "%2f")).await;
    let durable = QueueDeclareOptions::default();

    // configure: declare and delete.
    let ch = channel(&conn).await;
    ok(
        "queue.declare",
        ch.queue_declare("app.in".into(), durable, FieldTable::default()),
    )
    .await;
    ok(
        "queue.declare",
        ch.queue_declare("app.out".into(), durable, FieldTable::default()),
    )
    .await;
    let (code, text) = amqp_err(
        "queue.declare",
        ch.queue_declare("orders".into(), durable, FieldTable::default()),
    )
    .await;
    assert_eq!(
        (code, text.as_str()),
        (403, refused("app", "queue", "orders").as_str())
    );

    let ch = channel(&conn).await;
    let (code, text) = amqp_err(
        "exchange.declare",
        ch.exchange_declare(
            "orders".into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_eq!(
        (code, text.as_str()),
        (403, refused("app", "exchange", "orders").as_str())
    );

    // write on the destination and read on the source of a binding.
    let ch = channel(&conn).await;
    ok(
        "queue.bind",
        ch.queue_bind(
            "app.in".into(),
            "amq.direct".into(),
            "k".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    let (code, text) = amqp_err(
        "queue.bind",
        ch.queue_bind(
            "app.in".into(),
            "amq.topic".into(),
            "k".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_eq!(
        (code, text.as_str()),
        (403, refused("app", "exchange", "amq.topic").as_str())
    );

    // write: publish (checked before the exchange is looked up).
    let ch = channel(&conn).await;
    support::confirm_mode(&ch).await;
    support::publish_props(&ch, "amq.direct", "k", b"in", BasicProperties::default()).await;
    ok("confirms", ch.wait_for_confirms()).await;
    let (code, text) = support::publish_refused(&ch, "app.out", BasicProperties::default()).await;
    assert_eq!(
        (code, text.as_str()),
        (403, refused("app", "exchange", "").as_str())
    );

    // read: get and consume.
    let ch = channel(&conn).await;
    assert_eq!(
        support::get_body(&ch, "app.in").await.as_deref(),
        Some(&b"in"[..])
    );
    let (code, text) = amqp_err(
        "basic.get",
        ch.basic_get("app.out".into(), BasicGetOptions::default()),
    )
    .await;
    assert_eq!(
        (code, text.as_str()),
        (403, refused("app", "queue", "app.out").as_str())
    );
    let ch = channel(&conn).await;
    let (code, text) = amqp_err(
        "basic.consume",
        ch.basic_consume(
            "app.out".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_eq!(
        (code, text.as_str()),
        (403, refused("app", "queue", "app.out").as_str())
    );

    // A vhost without permissions (and not in the user's vhosts) refuses the login's open.
    let other = lapin::Connection::connect(&url(&b, "other"), Default::default()).await;
    let err = format!("{:?}", other.expect_err("refused"));
    assert!(
        err.contains("access to vhost 'other' refused for user 'app'"),
        "{err}"
    );
    drop(conn);
    b.shutdown().await;
}

#[test]
fn a_bad_regular_expression_is_refused_at_its_line() {
    let text = "listen = [\"127.0.0.1:0\"]\ndata_dir = \"/tmp/x\"\n\n[[vhosts]]\nname = \"/\"\n\n[[users]]\nname = \"a\"\npassword = \"a\"\n\n[[permissions]]\nuser = \"a\"\nconfigure = \"(\"\nwrite = \".*\"\nread = \".*\"\n";
    let err = Config::parse(text, "p.toml")
        .expect_err("refused")
        .to_string();
    assert!(
        err.starts_with("p.toml:13:1: permissions: configure: not a regular expression"),
        "{err}"
    );
}

#[tokio::test]
async fn topic_permissions_restrict_routing_keys_on_topic_exchanges() {
    let dir = common::temp_data_dir();
    let text = format!(
        r#"listen = ["127.0.0.1:0"]
data_dir = {:?}

[[vhosts]]
name = "/"

[[users]]
name = "sensor"
password = "s"

[[topic_permissions]]
user = "sensor"
exchange = "amq.topic"
write = "^readings\\.{{username}}\\."
read = "^alerts\\."
"#,
        dir.display().to_string()
    );
    let b = warrenmq::start(Config::parse(&text, "topics.toml").expect("valid"))
        .await
        .expect("starts");
    let conn = connect_url(&format!("amqp://sensor:s@{}/%2f", b.local_addr())).await;
    let ch = channel(&conn).await;
    let q = support::temp_queue(&ch, "topics").await;

    // read: the routing key of a binding to the topic exchange.
    support::bind(&ch, &q, "amq.topic", "alerts.#").await;
    let (code, text) = amqp_err(
        "queue.bind",
        ch.queue_bind(
            q.as_str().into(),
            "amq.topic".into(),
            "readings.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_eq!(code, 403);
    assert_eq!(
        text,
        "ACCESS_REFUSED - access to topic 'readings.#' in exchange 'amq.topic' in vhost '/' refused for user 'sensor'"
    );

    // write: the routing key of a publish; {username} stands for the user.
    let ch = channel(&conn).await;
    support::confirm_mode(&ch).await;
    support::publish_props(
        &ch,
        "amq.topic",
        "readings.sensor.temp",
        b"21C",
        BasicProperties::default(),
    )
    .await;
    ok("confirms", ch.wait_for_confirms()).await;
    let (code, text) = support::publish_to_refused(
        &ch,
        "amq.topic",
        "readings.other.temp",
        BasicProperties::default(),
    )
    .await;
    assert_eq!(code, 403);
    assert_eq!(
        text,
        "ACCESS_REFUSED - access to topic 'readings.other.temp' in exchange 'amq.topic' in vhost '/' refused for user 'sensor'"
    );

    // Other exchanges, and topic exchanges without an entry, are not restricted.
    let ch = channel(&conn).await;
    support::confirm_mode(&ch).await;
    support::publish_props(
        &ch,
        "amq.direct",
        "anything",
        b"x",
        BasicProperties::default(),
    )
    .await;
    ok("confirms", ch.wait_for_confirms()).await;
    drop(conn);
    b.shutdown().await;
}
