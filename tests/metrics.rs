//! Prometheus metrics with RabbitMQ's names, read by a Prometheus text-format
//! parser after real AMQP traffic: the counters count what the client did, the
//! queue gauges show what is in the queue, and every metric name is one that
//! RabbitMQ 3.10's rabbitmq_prometheus exposes (so its dashboards read them).

mod common;
mod support;

use std::collections::HashMap;
use std::net::SocketAddr;

use lapin::options::{BasicAckOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn scrape(addr: SocketAddr, path: &str) -> prometheus_parse::Scrape {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("chunked"),
        "expected a plain body"
    );
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("parses")
}

fn values(s: &prometheus_parse::Scrape) -> HashMap<String, f64> {
    s.samples
        .iter()
        .map(|x| {
            let v = match x.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            };
            let mut labels: Vec<String> = x
                .labels
                .iter()
                .filter(|(k, _)| *k == "queue")
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            labels.sort();
            (format!("{}{}", x.metric, labels.join(",")), v)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_clients_did_under_rabbitmqs_names() {
    let dir = common::temp_data_dir();
    let text = format!(
        "listen = [\"127.0.0.1:0\"]\ndata_dir = {:?}\n[prometheus]\nlisten = [\"127.0.0.1:0\"]\n[[vhosts]]\nname = \"/\"\n[[users]]\nname = \"guest\"\npassword = \"guest\"\n",
        dir.display().to_string()
    );
    let b = warrenmq::start(warrenmq::Config::parse(&text, "m.toml").unwrap())
        .await
        .unwrap();
    let metrics = b.prometheus_addrs()[0];

    let conn = support::connect_url(&format!("amqp://guest:guest@{}/%2f", b.local_addr())).await;
    let ch = support::channel(&conn).await;
    support::ok(
        "queue.declare",
        ch.queue_declare(
            "jobs".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    support::confirm_mode(&ch).await;
    for i in 0..5 {
        support::publish(&ch, "", "jobs", format!("job {i}").as_bytes()).await;
    }
    support::publish(&ch, "", "no-such-queue", b"lost").await;
    support::ok("confirms", ch.wait_for_confirms()).await;
    // Three delivered (prefetch 3), the consumer cancelled, two acked: one stays unacked.
    let consumer_ch = support::channel(&conn).await;
    support::ok(
        "basic.qos",
        consumer_ch.basic_qos(3, lapin::options::BasicQosOptions::default()),
    )
    .await;
    let mut consumer = support::consume(&consumer_ch, "jobs", false).await;
    let taken = consumer.take(3).await;
    let tag = consumer.tag();
    support::ok(
        "basic.cancel",
        consumer_ch.basic_cancel(tag.as_str().into(), Default::default()),
    )
    .await;
    for d in &taken[..2] {
        support::ok("basic.ack", d.ack(BasicAckOptions::default())).await;
    }
    // The third delivery stays unacked on the open channel until it closes.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;

    let m = values(&scrape(metrics, "/metrics").await);
    let get = |k: &str| *m.get(k).unwrap_or_else(|| panic!("no metric {k} in {m:?}"));
    assert_eq!(get("rabbitmq_connections"), 1.0);
    assert_eq!(get("rabbitmq_channels"), 2.0);
    assert_eq!(get("rabbitmq_queues"), 1.0);
    assert_eq!(get("rabbitmq_global_messages_received_total"), 6.0);
    assert_eq!(get("rabbitmq_global_messages_received_confirm_total"), 6.0);
    assert_eq!(get("rabbitmq_global_messages_routed_total"), 5.0);
    assert_eq!(
        get("rabbitmq_global_messages_unroutable_dropped_total"),
        1.0
    );
    assert_eq!(get("rabbitmq_global_messages_confirmed_total"), 6.0);
    assert_eq!(
        get("rabbitmq_global_messages_delivered_consume_manual_ack_total"),
        3.0
    );
    assert_eq!(get("rabbitmq_global_messages_acknowledged_total"), 2.0);
    assert_eq!(get("rabbitmq_queue_messages_ready"), 2.0);
    assert_eq!(get("rabbitmq_queue_messages_unacked"), 1.0);
    assert_eq!(get("rabbitmq_queue_messages"), 3.0);
    assert!(get("rabbitmq_process_resident_memory_bytes") > 1e6);

    let per = values(&scrape(metrics, "/metrics/per-object").await);
    assert_eq!(per["rabbitmq_queue_messages_readyqueue=jobs"], 2.0);

    // Counts survive the connection: closing it moves them to the broker's totals.
    conn.close(200, "bye".into()).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let m = values(&scrape(metrics, "/metrics").await);
    assert_eq!(m["rabbitmq_global_messages_received_total"], 6.0);
    assert_eq!(m["rabbitmq_connections_closed_total"], 1.0);
    assert_eq!(m["rabbitmq_channels_closed_total"], 2.0);
    // The unacked delivery went back to the queue.
    assert_eq!(m["rabbitmq_queue_messages_ready"], 3.0);

    // The sizes of the bodies published: five of 5 bytes, one of 4, one of 5,000.
    let conn = support::connect_url(&format!("amqp://guest:guest@{}/%2f", b.local_addr())).await;
    let ch = support::channel(&conn).await;
    support::confirm_mode(&ch).await;
    support::publish(&ch, "", "jobs", &[b'x'; 5000]).await;
    support::ok("confirms", ch.wait_for_confirms()).await;
    let scraped = scrape(metrics, "/metrics").await;
    let sizes = scraped
        .samples
        .iter()
        .find(|s| s.metric == "rabbitmq_message_size_bytes")
        .expect("the message size histogram");
    let prometheus_parse::Value::Histogram(buckets) = &sizes.value else {
        panic!("not a histogram: {:?}", sizes.value);
    };
    let at = |le: f64| buckets.iter().find(|b| b.less_than == le).map(|b| b.count);
    assert_eq!(at(100.0), Some(6.0), "{buckets:?}");
    assert_eq!(at(1000.0), Some(6.0), "{buckets:?}");
    assert_eq!(at(10000.0), Some(7.0), "{buckets:?}");
    assert_eq!(at(f64::INFINITY), Some(7.0), "{buckets:?}");
    let m = values(&scraped);
    assert_eq!(m["rabbitmq_message_size_bytes_sum"], 5029.0);
    assert_eq!(m["rabbitmq_message_size_bytes_count"], 7.0);

    // Every name is one RabbitMQ exposes.
    let recorded = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/rabbitmq-3.10-management/metrics.txt"
    ))
    .unwrap();
    let theirs: std::collections::HashSet<&str> = recorded
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let ours = scrape(metrics, "/metrics").await;
    for s in &ours.samples {
        // Per-queue figures appear in RabbitMQ's /metrics only once queues exist;
        // the message size histogram came with RabbitMQ 4.0.
        if s.metric.starts_with("rabbitmq_queue_")
            || s.metric.starts_with("rabbitmq_message_size_bytes")
        {
            continue;
        }
        assert!(
            theirs.contains(s.metric.as_str()),
            "RabbitMQ has no metric {}",
            s.metric
        );
    }
    b.shutdown().await;
}
