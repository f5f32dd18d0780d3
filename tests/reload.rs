//! SIGHUP re-reads the configuration file: new users may log in and new exchanges,
//! queues and bindings exist, without a restart and without touching what runs.

mod common;
mod process;
mod support;

use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

fn write(file: &std::path::Path, data: &std::path::Path, extra: &str) {
    let text = format!(
        "listen = [\"127.0.0.1:0\"]\ndata_dir = {:?}\n\n[[vhosts]]\nname = \"/\"\n\n[[users]]\nname = \"guest\"\npassword = \"guest\"\n\n[[queues]]\nname = \"first\"\n{extra}",
        data.display().to_string()
    );
    std::fs::write(file, text).unwrap();
}

fn passive() -> QueueDeclareOptions {
    QueueDeclareOptions {
        passive: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_users_and_topology_from_the_file() {
    let dir = common::temp_data_dir();
    let (file, data) = (dir.join("warrenmq.toml"), dir.join("data"));
    write(&file, &data, "");
    let mut cmd = process::warrenmq();
    cmd.arg("--config").arg(&file);
    let (mut child, addr) = process::spawn(cmd);
    let url = |user: &str, pass: &str| format!("amqp://{user}:{pass}@{addr}/%2f");

    let conn = support::connect_url(&url("guest", "guest")).await;
    let ch = support::channel(&conn).await;
    support::ok(
        "queue.declare",
        ch.queue_declare("first".into(), passive(), FieldTable::default()),
    )
    .await;

    write(
        &file,
        &data,
        "\n[[queues]]\nname = \"second\"\n\n[[bindings]]\nsource = \"amq.direct\"\ndestination = \"second\"\nrouting_key = \"k\"\n\n[[users]]\nname = \"late\"\npassword = \"comer\"\n",
    );
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());

    // The new user can log in once the broker has re-read the file.
    let started = Instant::now();
    let late = loop {
        match lapin::Connection::connect(&url("late", "comer"), Default::default()).await {
            Ok(c) => break c,
            Err(_) if started.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("the new user cannot log in after SIGHUP: {e}"),
        }
    };
    let ch2 = support::channel(&late).await;
    support::ok(
        "queue.declare",
        ch2.queue_declare("second".into(), passive(), FieldTable::default()),
    )
    .await;
    support::publish(&ch2, "amq.direct", "k", b"routed").await;
    assert_eq!(
        support::get_body(&ch2, "second").await.as_deref(),
        Some(&b"routed"[..])
    );
    // The connection opened before the reload was not disturbed.
    support::ok(
        "queue.declare",
        ch.queue_declare("first".into(), passive(), FieldTable::default()),
    )
    .await;

    // A broken file changes nothing: the broker keeps running on what it has.
    std::fs::write(&file, "this is not toml [").unwrap();
    let _ = std::process::Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again = support::connect_url(&url("late", "comer")).await;
    drop((again, late, conn));
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
