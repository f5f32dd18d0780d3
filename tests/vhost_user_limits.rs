//! RabbitMQ's vhost limits (max-connections, max-queues) and user limits
//! (max-connections, max-channels) from the configuration: each refusal is the
//! one RabbitMQ gives, and closing what is open frees its place.

mod common;
mod support;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use support::{amqp_err, channel, connect_url};
use warrenmq::{BrokerHandle, Config};

async fn broker() -> BrokerHandle {
    let text = format!(
        r#"listen = ["127.0.0.1:0"]
data_dir = {:?}

[[vhosts]]
name = "/"
max_connections = 2
max_queues = 1

[[vhosts]]
name = "closed"
max_connections = 0

[[users]]
name = "guest"
password = "guest"
vhosts = ["/", "closed"]

[[users]]
name = "frugal"
password = "f"
max_connections = 1
max_channels = 2
"#,
        common::temp_data_dir().display().to_string()
    );
    warrenmq::start(Config::parse(&text, "limits.toml").expect("valid"))
        .await
        .expect("starts")
}

fn url(b: &BrokerHandle, user: &str, vhost: &str) -> String {
    let pass = if user == "guest" { "guest" } else { "f" };
    format!("amqp://{user}:{pass}@{}/{vhost}", b.local_addr())
}

async fn refused(uri: &str) -> String {
    let err = lapin::Connection::connect(uri, Default::default())
        .await
        .expect_err("the connection is refused");
    format!("{err:?}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vhost_takes_no_more_connections_than_its_limit() {
    let b = broker().await;
    let first = connect_url(&url(&b, "guest", "%2f")).await;
    let second = connect_url(&url(&b, "guest", "%2f")).await;
    let err = refused(&url(&b, "guest", "%2f")).await;
    assert!(
        err.contains(
            "access to vhost '/' refused for user 'guest': connection limit (2) is reached"
        ),
        "{err}"
    );
    // A limit of 0 allows none.
    let err = refused(&url(&b, "guest", "closed")).await;
    assert!(err.contains("connection limit (0) is reached"), "{err}");

    // A closed connection frees its place.
    second.close(200, "bye".into()).await.unwrap();
    let again = connect_url(&url(&b, "guest", "%2f")).await;
    drop((first, again));
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vhost_takes_no_more_queues_than_its_limit() {
    let b = broker().await;
    let conn = connect_url(&url(&b, "guest", "%2f")).await;
    let ch = channel(&conn).await;
    support::ok(
        "queue.declare",
        ch.queue_declare(
            "one".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    let (code, text) = amqp_err(
        "queue.declare",
        ch.queue_declare(
            "two".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_eq!(code, 406);
    assert_eq!(
        text,
        "PRECONDITION_FAILED - cannot declare queue 'two': queue limit in vhost '/' (1) is reached"
    );
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_takes_no_more_connections_or_channels_than_its_limits() {
    let b = broker().await;
    let conn = connect_url(&url(&b, "frugal", "%2f")).await;
    let err = refused(&url(&b, "frugal", "%2f")).await;
    assert!(
        err.contains("connection refused for user 'frugal': user connection limit (1) is reached"),
        "{err}"
    );

    let one = channel(&conn).await;
    let two = channel(&conn).await;
    let third = conn.create_channel().await;
    let err = format!("{:?}", third.expect_err("a third channel is refused"));
    assert!(
        err.contains(
            "number of channels opened for user 'frugal' has reached the maximum allowed user limit of (2)"
        ),
        "{err}"
    );
    drop((one, two));

    // The refusal closed the connection (530, as RabbitMQ): its places are free
    // again once the broker has seen it go.
    let started = std::time::Instant::now();
    let conn = loop {
        match lapin::Connection::connect(&url(&b, "frugal", "%2f"), Default::default()).await {
            Ok(c) => break c,
            Err(_) if started.elapsed() < std::time::Duration::from_secs(5) => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            Err(e) => panic!("the user's connection place was not freed: {e}"),
        }
    };
    let ch = channel(&conn).await;
    ch.close(200, "bye".into()).await.unwrap();
    let _a = channel(&conn).await;
    let _b = channel(&conn).await;
    b.shutdown().await;
}
