//! The example in config/examples/topology.toml, as an operator would run it: the
//! orders user logs in to its vhost, routes by region, is held to its topic
//! permissions, and what no binding takes goes to the alternate exchange its
//! policy names.

mod common;
mod support;

use lapin::BasicProperties;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_topology_routes_and_guards_orders() {
    let file =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/topology.toml");
    let mut config = warrenmq::Config::load(&file).expect("the example loads");
    config.listen = vec!["127.0.0.1:0".parse().unwrap()];
    config.data_dir = common::temp_data_dir();
    let broker = warrenmq::start(config).await.expect("starts");
    let url = format!("amqp://orders:orders-secret@{}/shop", broker.local_addr());
    let conn = support::connect_url(&url).await;
    let ch = support::channel(&conn).await;

    support::publish(&ch, "orders", "eu.de.1001", b"eu order").await;
    support::publish(&ch, "orders", "us.ny.1002", b"us order").await;
    // Allowed by the topic permissions, bound nowhere: the policy's alternate
    // exchange takes it.
    support::publish(&ch, "orders", "asia.jp.1003", b"asia order").await;
    assert_eq!(support::drain(&ch, "orders.eu").await, vec!["eu order"]);
    assert_eq!(support::drain(&ch, "orders.us").await, vec!["us order"]);
    assert_eq!(
        support::drain(&ch, "orders.unrouted").await,
        vec!["asia order"]
    );

    // A routing key outside the user's topic permissions closes the channel.
    let ch = support::channel(&conn).await;
    support::confirm_mode(&ch).await;
    let (code, text) =
        support::publish_to_refused(&ch, "orders", "mars.1", BasicProperties::default()).await;
    assert_eq!(code, 403);
    assert!(text.contains("access to topic 'mars.1'"), "{text}");
    drop(conn);
    broker.shutdown().await;
}
