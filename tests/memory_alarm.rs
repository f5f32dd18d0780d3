//! The memory alarm counts the process's real memory, not only the bodies of the
//! messages it holds: memory taken by anything else in the process raises it, the
//! health check and /api/nodes say so, a publisher waits (no confirm) meanwhile,
//! and all clears once the memory is given back. Its own test binary: resident
//! memory is the whole process's, so nothing else may run beside it.

mod common;
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::BasicProperties;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: u64 = 1 << 20;

/// GET `path` as guest; the status and the JSON body.
async fn get(addr: SocketAddr, path: &str) -> (u16, Value) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Basic Z3Vlc3Q6Z3Vlc3Q=\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.expect("read");
    let status = raw[9..12].parse().expect("status");
    let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Polls the alarms health check until it gives `want`.
async fn alarm_check_becomes(api: SocketAddr, want: u16) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = get(api, "/api/health/checks/alarms").await;
        if status == want {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "alarms check still {status}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_held_outside_message_bodies_raises_the_alarm_until_it_is_freed() {
    let rss = warrenmq::memory::resident_bytes().expect("resident memory is readable");
    // Room for the broker and the test's own churn, not for 192 MiB more.
    let watermark = rss + 96 * MIB;
    let text = format!(
        "listen = [\"127.0.0.1:0\"]\ndata_dir = {:?}\n[management]\nlisten = [\"127.0.0.1:0\"]\n\
         [limits]\nmemory_high_watermark = {watermark}\n\
         [[users]]\nname = \"guest\"\npassword = \"guest\"\ntags = [\"administrator\"]\nvhosts = [\"/\"]\n\
         [[vhosts]]\nname = \"/\"\n",
        common::temp_data_dir()
    );
    let config = warrenmq::Config::parse(&text, "memory.toml").expect("valid");
    let b = warrenmq::start(config).await.expect("starts");
    let api = b.management_addrs()[0];
    let conn = support::connect_url(&format!("amqp://guest:guest@{}/%2f", b.local_addr())).await;
    let ch = support::channel(&conn).await;
    support::ok(
        "confirm.select",
        ch.confirm_select(ConfirmSelectOptions::default()),
    )
    .await;
    let q = support::temp_queue(&ch, "mem").await;
    let publish = |body: &'static [u8]| {
        let (ch, q) = (ch.clone(), q.clone());
        async move {
            ch.basic_publish(
                "".into(),
                q.as_str().into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default(),
            )
            .await
            .expect("basic.publish")
            .await
        }
    };
    tokio::time::timeout(Duration::from_secs(5), publish(b"before"))
        .await
        .expect("confirmed before the alarm")
        .expect("ack");
    alarm_check_becomes(api, 200).await;

    // 192 MiB that are no message at all, touched so that they are resident.
    let hog: Vec<u8> = vec![0x5a; (192 * MIB) as usize];
    let body = alarm_check_becomes(api, 503).await;
    assert_eq!(
        body["reason"],
        "resource alarm(s) in effect in the cluster: memory"
    );
    let (_, nodes) = get(api, "/api/nodes").await;
    assert_eq!(nodes[0]["mem_alarm"], true, "{nodes}");
    assert!(
        nodes[0]["mem_used"].as_u64().unwrap_or(0) > watermark,
        "{nodes}"
    );
    assert_eq!(nodes[0]["mem_limit"], watermark);

    // Blocked: as in RabbitMQ, the publish that finds the alarm on is the last
    // one read; the next is not read, so it is not confirmed...
    let first = tokio::spawn(publish(b"finds the alarm"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let waiting = tokio::spawn(publish(b"waits"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !waiting.is_finished(),
        "a publish was confirmed during the alarm"
    );

    // ...until the memory is given back.
    assert_eq!(
        hog.iter().step_by(4096).map(|&b| b as u64).sum::<u64>(),
        0x5a * 48 * 1024
    );
    drop(hog);
    alarm_check_becomes(api, 200).await;
    tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("confirmed once the alarm cleared")
        .expect("task")
        .expect("ack");
    first.await.expect("task").expect("ack");
    let (_, nodes) = get(api, "/api/nodes").await;
    assert_eq!(nodes[0]["mem_alarm"], false, "{nodes}");
    assert_eq!(support::counts(&ch, &q).await.0, 3);
    b.shutdown().await;
}
