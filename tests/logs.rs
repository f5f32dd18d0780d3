//! `log_format = "json"`: every line the broker logs is one JSON object, and a
//! connection's events carry its span (connection id and peer), so log shippers
//! can follow one client.

mod common;
mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_with_the_connection_span() {
    let dir = common::temp_data_dir();
    let file = dir.join("w.toml");
    std::fs::write(
        &file,
        format!(
            "listen = [\"127.0.0.1:0\"]\ndata_dir = {:?}\nlog_format = \"json\"\n[[vhosts]]\nname = \"/\"\n[[users]]\nname = \"guest\"\npassword = \"guest\"\n",
            dir.join("data").display().to_string()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_warrenmq"))
        .arg("--config")
        .arg(&file)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let out = BufReader::new(child.stdout.take().unwrap());
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    let wait_for = |needle: &str| {
        let started = Instant::now();
        loop {
            if let Some(l) = lines.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no log line with {needle}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let listening: serde_json::Value =
        serde_json::from_str(&wait_for("listening for AMQP")).expect("JSON");
    let message = listening["fields"]["message"].as_str().unwrap();
    let addr = message.rsplit(' ').next().unwrap();
    // Once everything is recovered and bound, one line says what is served where.
    let ready: serde_json::Value = serde_json::from_str(&wait_for("ready in")).expect("JSON");
    let summary = ready["fields"]["message"].as_str().unwrap();
    assert!(summary.contains(&format!("amqp {addr}")), "{summary}");
    assert!(summary.contains("1 vhosts, 0 queues"), "{summary}");
    assert!(summary.contains("memory high watermark"), "{summary}");

    let conn = support::connect_url(&format!("amqp://guest:guest@{addr}/%2f")).await;
    let opened: serde_json::Value =
        serde_json::from_str(&wait_for("connection opened")).expect("JSON");
    assert_eq!(opened["fields"]["user"], "guest");
    assert_eq!(opened["span"]["name"], "conn");
    assert!(opened["span"]["id"].as_u64().is_some(), "{opened}");
    assert!(opened["span"]["peer"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    conn.close(200, "bye".into()).await.unwrap();

    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    for l in lines.lock().unwrap().iter() {
        serde_json::from_str::<serde_json::Value>(l)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"));
    }
}
