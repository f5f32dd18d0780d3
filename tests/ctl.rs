//! `warrenmqctl` as an operator uses it: the built binary run against a broker's
//! management API, next to clients that use the broker over AMQP. Each test reads
//! as a scenario: what clients did, what the tool shows and changes, and how it
//! exits (rabbitmqctl's and rabbitmq-diagnostics' exit codes).

mod common;
mod support;

use std::process::Stdio;
use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

const CONFIG: &str = r#"
listen = ["127.0.0.1:0"]
data_dir = "DATA"

[management]
listen = ["127.0.0.1:0"]

[[vhosts]]
name = "/"

[[users]]
name = "guest"
password = "guest"
tags = ["administrator"]
vhosts = ["/"]

[[users]]
name = "plain"
password = "p"
vhosts = ["/"]
"#;

async fn broker() -> warrenmq::BrokerHandle {
    let text = CONFIG.replace("DATA", &common::temp_data_dir().display().to_string());
    let config = warrenmq::Config::parse(&text, "ctl.toml").expect("valid");
    warrenmq::start(config).await.expect("starts")
}

fn api_url(b: &warrenmq::BrokerHandle) -> String {
    format!("http://{}", b.management_addrs()[0])
}

/// What one run of the tool did.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }

    #[track_caller]
    fn ok(&self) -> &Run {
        assert_eq!(
            self.code, 0,
            "stdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }

    #[track_caller]
    fn failed(&self, code: i32, reason: &str) {
        assert_eq!(
            self.code, code,
            "stdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        assert!(
            self.stderr.starts_with("Error: ") && self.stderr.contains(reason),
            "expected '{reason}' in: {}",
            self.stderr
        );
    }
}

/// Runs `warrenmqctl --url URL ARGS...`, with `stdin` as its standard input.
async fn ctl_with(url: &str, args: &[&str], stdin: &[u8]) -> Run {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_warrenmqctl"))
        .arg("--url")
        .arg(url)
        .args(args)
        .env_remove("WARRENMQCTL_URL")
        .env_remove("WARRENMQCTL_USER")
        .env_remove("WARRENMQCTL_PASSWORD")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("warrenmqctl starts");
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin).await.expect("stdin written");
    drop(input);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("warrenmqctl finishes")
        .expect("warrenmqctl ran");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn ctl(url: &str, args: &[&str]) -> Run {
    ctl_with(url, args, b"").await
}

/// Runs the tool until it prints `expected` (for what the broker does after answering).
async fn wait_for(url: &str, args: &[&str], expected: &str) {
    let mut last = String::new();
    for _ in 0..100 {
        last = ctl(url, args).await.ok().stdout.clone();
        if last == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{args:?} printed {last:?}, not {expected:?}");
}

async fn declare(ch: &lapin::Channel, name: &str) {
    support::ok(
        "queue.declare",
        ch.queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_show_what_clients_did() {
    let b = broker().await;
    let url = api_url(&b);
    let conn = support::connect_url(&format!("amqp://guest:guest@{}/%2f", b.local_addr())).await;
    let ch = support::channel(&conn).await;
    declare(&ch, "orders").await;
    declare(&ch, "jobs").await;
    for _ in 0..3 {
        support::publish(&ch, "", "orders", b"order").await;
    }
    // The passive declare's answer comes after the publishes were taken in.
    assert_eq!(support::counts(&ch, "orders").await, (3, 0));
    let consumer_ch = support::channel(&conn).await;
    let _consumer = support::ok(
        "basic.consume",
        consumer_ch.basic_consume(
            "jobs".into(),
            "the-worker".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;

    // rabbitmqctl's default output: an informational line, a header, tab-separated rows.
    let run = ctl(&url, &["list_queues"]).await;
    assert_eq!(
        run.ok().lines(),
        vec![
            "Listing queues for vhost / ...",
            "name\tmessages",
            "jobs\t0",
            "orders\t3"
        ]
    );
    let run = ctl(
        &url,
        &[
            "-q",
            "list_queues",
            "name",
            "messages",
            "consumers",
            "durable",
        ],
    )
    .await;
    assert_eq!(
        run.ok().lines(),
        vec![
            "name\tmessages\tconsumers\tdurable",
            "jobs\t0\t1\ttrue",
            "orders\t3\t0\ttrue"
        ]
    );
    let run = ctl(
        &url,
        &["--formatter", "tsv", "list_queues", "name", "messages"],
    )
    .await;
    assert_eq!(run.ok().lines(), vec!["jobs\t0", "orders\t3"]);

    // JSON: the API's objects, or only the columns asked for.
    let run = ctl(&url, &["--formatter", "json", "list_queues"]).await;
    let queues: Value = serde_json::from_str(&run.ok().stdout).expect("JSON");
    let orders = queues
        .as_array()
        .and_then(|a| a.iter().find(|q| q["name"] == "orders"))
        .expect("orders listed");
    assert_eq!(
        (orders["messages"].clone(), orders["vhost"].clone()),
        (3.into(), "/".into())
    );
    let run = ctl(
        &url,
        &["--formatter", "json", "list_queues", "name", "consumers"],
    )
    .await;
    let picked: Value = serde_json::from_str(&run.ok().stdout).expect("JSON");
    assert_eq!(
        picked,
        serde_json::json!([{"name": "jobs", "consumers": 1}, {"name": "orders", "consumers": 0}])
    );

    let run = ctl(
        &url,
        &[
            "-q",
            "list_connections",
            "user",
            "vhost",
            "client_properties.product",
        ],
    )
    .await;
    assert_eq!(
        run.ok().lines(),
        vec!["user\tvhost\tclient_properties.product", "guest\t/\tlapin"]
    );
    let run = ctl(
        &url,
        &[
            "-q",
            "list_consumers",
            "queue_name",
            "consumer_tag",
            "ack_required",
        ],
    )
    .await;
    assert_eq!(
        run.ok().lines(),
        vec![
            "queue_name\tconsumer_tag\tack_required",
            "jobs\tthe-worker\ttrue"
        ]
    );
    let run = ctl(&url, &["-s", "list_channels", "consumer_count"]).await;
    let mut counts = run.ok().lines();
    counts.sort();
    assert_eq!(counts, vec!["0", "1"]);
    let run = ctl(
        &url,
        &[
            "-q",
            "list_bindings",
            "source_name",
            "destination_name",
            "routing_key",
        ],
    )
    .await;
    assert!(
        run.ok().lines().contains(&"\torders\torders"),
        "{}",
        run.stdout
    );
    let run = ctl(&url, &["-q", "list_exchanges"]).await;
    assert!(
        run.ok().lines().contains(&"amq.topic\ttopic"),
        "{}",
        run.stdout
    );
    let run = ctl(&url, &["-q", "list_users"]).await;
    assert_eq!(
        run.ok().lines(),
        vec!["user\ttags", "guest\t[administrator]", "plain\t[]"]
    );
    assert_eq!(
        ctl(&url, &["-q", "list_vhosts"]).await.ok().lines(),
        vec!["name", "/"]
    );
    let run = ctl(&url, &["-q", "list_permissions"]).await;
    assert_eq!(
        run.ok().lines(),
        vec![
            "user\tconfigure\twrite\tread",
            "guest\t.*\t.*\t.*",
            "plain\t.*\t.*\t.*"
        ]
    );

    // An unknown column is a usage error, as in rabbitmqctl; an unknown vhost a data error.
    ctl(&url, &["list_queues", "name", "colour"])
        .await
        .failed(64, "Info key(s) colour are not supported by list_queues");
    ctl(&url, &["-p", "nowhere", "list_queues"])
        .await
        .failed(65, "Virtual host 'nowhere' does not exist");
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_describes_the_broker() {
    let b = broker().await;
    let url = api_url(&b);
    let run = ctl(&url, &["status"]).await;
    let out = &run.ok().stdout;
    for expected in [
        format!("Status of the broker at {url} ..."),
        "Product name: WarrenMQ".to_string(),
        "Node name: warrenmq@localhost".to_string(),
        "Alarms\n\n(none)".to_string(),
        "Queue count: 0".to_string(),
        format!(
            "Interface: 127.0.0.1, port: {}, protocol: amqp, purpose: AMQP 0-9-1",
            b.local_addr().port()
        ),
    ] {
        assert!(out.contains(&expected), "'{expected}' missing from:\n{out}");
    }
    let run = ctl(&url, &["--formatter", "json", "status"]).await;
    let status: Value = serde_json::from_str(&run.ok().stdout).expect("JSON");
    assert_eq!(status["overview"]["product_name"], "WarrenMQ");
    assert_eq!(status["node"]["running"], true);
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_go_in_and_out_through_the_cli() {
    let b = broker().await;
    let url = api_url(&b);

    let run = ctl(&url, &["declare_queue", "eu"]).await;
    assert_eq!(run.ok().lines(), vec!["Queue 'eu' declared in vhost '/'"]);
    let run = ctl(&url, &["declare_queue", "eu"]).await;
    assert_eq!(
        run.ok().lines(),
        vec!["Queue 'eu' already exists in vhost '/' (unchanged)"]
    );
    let run = ctl(&url, &["declare_exchange", "orders", "topic"]).await;
    assert_eq!(
        run.ok().lines(),
        vec!["Exchange 'orders' declared in vhost '/'"]
    );
    ctl(&url, &["declare_exchange", "orders", "fanout"])
        .await
        .failed(65, "inequivalent arg 'type' for exchange 'orders'");

    // Published through the CLI: from an argument, and from standard input.
    let run = ctl(&url, &["publish", "", "eu", "hello from the cli"]).await;
    assert_eq!(run.ok().lines(), vec!["Message published"]);
    let run = ctl_with(&url, &["publish", "", "eu", "-"], b"from stdin").await;
    assert_eq!(run.ok().lines(), vec!["Message published"]);
    let run = ctl(&url, &["publish", "orders", "no.binding", "lost"]).await;
    assert_eq!(run.ok().lines(), vec!["Message published but NOT routed"]);
    let run = ctl(&url, &["-q", "list_queues", "name", "messages"]).await;
    assert_eq!(run.ok().lines(), vec!["name\tmessages", "eu\t2"]);

    // Got through the CLI (requeued by default), then by an AMQP client.
    let run = ctl(
        &url,
        &[
            "-q",
            "get",
            "eu",
            "--count",
            "5",
            "payload",
            "message_count",
            "redelivered",
        ],
    )
    .await;
    assert_eq!(
        run.ok().lines(),
        vec![
            "payload\tmessage_count\tredelivered",
            "hello from the cli\t1\tfalse",
            "from stdin\t0\tfalse"
        ]
    );
    let conn = support::connect_url(&format!("amqp://guest:guest@{}/%2f", b.local_addr())).await;
    let ch = support::channel(&conn).await;
    let m = support::get(&ch, "eu").await.expect("still in the queue");
    assert_eq!(m.delivery.data, b"hello from the cli");
    assert!(m.delivery.redelivered);
    support::ok("basic.ack", m.delivery.ack(BasicAckOptions::default())).await;

    // Purged: the queue is empty; a non-empty queue is kept by --if-empty.
    ctl(&url, &["purge_queue", "eu"]).await.ok();
    let run = ctl(&url, &["-q", "list_queues", "name", "messages"]).await;
    assert_eq!(run.ok().lines(), vec!["name\tmessages", "eu\t0"]);
    ctl(&url, &["publish", "", "eu", "one more"]).await.ok();
    ctl(&url, &["delete_queue", "eu", "--if-empty"])
        .await
        .failed(65, "eu");
    let run = ctl(&url, &["delete_queue", "eu"]).await;
    assert_eq!(
        run.ok().lines(),
        vec![
            "Deleting queue 'eu' on vhost '/' ...",
            "Queue was successfully deleted with 1 messages"
        ]
    );
    assert_eq!(ctl(&url, &["-q", "list_queues"]).await.ok().stdout, "");
    ctl(&url, &["purge_queue", "eu"])
        .await
        .failed(65, "Queue 'eu' in vhost '/' does not exist");
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_connections_reaches_the_clients() {
    let b = broker().await;
    let url = api_url(&b);
    let amqp = format!("amqp://guest:guest@{}/%2f", b.local_addr());
    let conn = support::connect_url(&amqp).await;
    let closed = support::closing_error(&conn);

    let run = ctl(&url, &["-s", "list_connections", "name"]).await;
    let names = run.ok().lines();
    assert_eq!(names.len(), 1, "{}", run.stdout);
    ctl(&url, &["close_connection", names[0], "maintenance window"])
        .await
        .ok();
    assert_eq!(
        closed.await.expect("closed"),
        (320, "CONNECTION_FORCED - maintenance window".to_string())
    );
    ctl(
        &url,
        &["close_connection", "127.0.0.1:1 -> 127.0.0.1:2", "x"],
    )
    .await
    .failed(65, "Connection '127.0.0.1:1 -> 127.0.0.1:2' does not exist");

    // Every connection of the vhost, once the closed one is gone.
    wait_for(&url, &["-s", "list_connections", "name"], "").await;
    let a = support::connect_url(&amqp).await;
    let b2 = support::connect_url(&amqp).await;
    let (a_closed, b2_closed) = (support::closing_error(&a), support::closing_error(&b2));
    let run = ctl(&url, &["close_all_connections", "bye"]).await;
    assert!(
        run.ok().stdout.contains("Closed 2 connection(s)"),
        "{}",
        run.stdout
    );
    for closed in [a_closed, b2_closed] {
        assert_eq!(
            closed.await.expect("closed"),
            (320, "CONNECTION_FORCED - bye".to_string())
        );
    }
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_pass_and_fail_as_rabbitmq_diagnostics() {
    let b = broker().await;
    let url = api_url(&b);
    let amqp_port = b.local_addr().port().to_string();
    for (args, says) in [
        (vec!["ping"], "Ping succeeded".to_string()),
        (
            vec!["check_running"],
            "WarrenMQ on node warrenmq@localhost is fully booted and running".to_string(),
        ),
        (
            vec!["check_local_alarms"],
            format!("The broker at {url} reported no local alarms"),
        ),
        (
            vec!["check_virtual_hosts"],
            format!("The broker at {url} reported all vhosts as running"),
        ),
        (
            vec!["check_port_listener", &amqp_port],
            format!("A listener for port {amqp_port} is running on the broker at {url}."),
        ),
        (
            vec!["check_protocol_listener", "amqp"],
            format!("A listener for protocol amqp is running on the broker at {url}."),
        ),
        (
            vec!["check_port_connectivity"],
            format!("Successfully connected to ports {amqp_port}, "),
        ),
    ] {
        let mut quiet = vec!["-q"];
        quiet.extend(&args);
        let run = ctl(&url, &quiet).await;
        assert!(
            run.ok().stdout.starts_with(&says),
            "{args:?}: {}",
            run.stdout
        );
    }
    ctl(&url, &["check_port_listener", "1"])
        .await
        .failed(69, "No active listener on port 1");
    ctl(&url, &["check_protocol_listener", "stomp"])
        .await
        .failed(69, "No active listener for protocol stomp");
    b.shutdown().await;
}

#[tokio::test]
async fn an_unreachable_or_silent_broker_is_reported_with_its_own_code() {
    // A port that nothing listens on: EX_UNAVAILABLE, as rabbitmq-diagnostics ping.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    ctl(&url, &["ping"])
        .await
        .failed(69, &format!("unable to connect to {url}: "));
    ctl(&url, &["list_queues"])
        .await
        .failed(69, "unable to connect");

    // A listener that never answers: EX_TEMPFAIL after --timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    ctl(&url, &["--timeout", "1", "ping"])
        .await
        .failed(75, "timed out after 1 s");

    ctl("https://127.0.0.1:15671", &["ping"])
        .await
        .failed(64, "https is not supported");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_exit_with_the_apis_reason() {
    let b = broker().await;
    let url = api_url(&b);
    ctl(&url, &["--password", "wrong", "ping"])
        .await
        .failed(77, "Login failed");
    ctl(&url, &["--password", "wrong", "list_queues"])
        .await
        .failed(77, "Login failed (HTTP 401 for user 'guest'");
    // A user without a management tag may not use the API at all.
    ctl(&url, &["--user", "plain", "--password", "p", "ping"])
        .await
        .failed(77, "Not management user");

    // Credentials from the environment, out of the process list.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_warrenmqctl"))
        .args(["-q", "ping"])
        .env("WARRENMQCTL_URL", &url)
        .env("WARRENMQCTL_USER", "guest")
        .env("WARRENMQCTL_PASSWORD", "guest")
        .output()
        .await
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "Ping succeeded\n");
    b.shutdown().await;
}

/// Opens an AMQP connection as `user` to `vhost`: whether the broker lets them in.
async fn amqp_login(b: &warrenmq::BrokerHandle, user: &str, password: &str, vhost: &str) -> bool {
    let uri = format!(
        "amqp://{user}:{password}@{}/{}",
        b.local_addr(),
        vhost.replace('/', "%2f")
    );
    match lapin::Connection::connect(&uri, lapin::ConnectionProperties::default()).await {
        Ok(c) => {
            let _ = c.close(200, "bye".into()).await;
            true
        }
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_vhosts_and_policies_are_managed_and_survive_an_export_and_import() {
    let b = broker().await;
    let url = api_url(&b);
    ctl(&url, &["add_vhost", "ops"]).await.ok();
    ctl(&url, &["add_user", "carol", "pw1", "--tags", "monitoring"])
        .await
        .ok();
    assert!(
        !amqp_login(&b, "carol", "pw1", "ops").await,
        "no permissions yet"
    );
    ctl(
        &url,
        &["-p", "ops", "set_permissions", "carol", ".*", ".*", ".*"],
    )
    .await
    .ok();
    assert!(amqp_login(&b, "carol", "pw1", "ops").await);
    ctl(
        &url,
        &[
            "-p",
            "ops",
            "set_policy",
            "short",
            "^t\\.",
            r#"{"message-ttl": 60000}"#,
            "--apply-to",
            "queues",
        ],
    )
    .await
    .ok();

    // The password is replaced; the tags are kept, then replaced in turn.
    ctl(&url, &["change_password", "carol", "pw2"]).await.ok();
    assert!(!amqp_login(&b, "carol", "pw1", "ops").await);
    assert!(amqp_login(&b, "carol", "pw2", "ops").await);
    let users = ctl(&url, &["-q", "list_users"]).await;
    assert!(
        users.ok().lines().contains(&"carol\t[monitoring]"),
        "{}",
        users.stdout
    );
    ctl(&url, &["set_user_tags", "carol", "policymaker"])
        .await
        .ok();
    let users = ctl(&url, &["-q", "list_users"]).await;
    assert!(
        users.ok().lines().contains(&"carol\t[policymaker]"),
        "{}",
        users.stdout
    );
    assert!(
        amqp_login(&b, "carol", "pw2", "ops").await,
        "tags keep the password"
    );

    // Exported, deleted, imported back from the file: everything returns.
    let policies_before = ctl(&url, &["-q", "-p", "ops", "list_policies"]).await;
    assert!(
        policies_before.ok().stdout.contains("\tshort\t"),
        "{}",
        policies_before.stdout
    );
    let file = common::temp_data_dir().join("definitions.json");
    let path = file.display().to_string();
    ctl(&url, &["export_definitions", &path]).await.ok();
    let exported = std::fs::read(&file).expect("written");
    ctl(&url, &["-p", "ops", "clear_policy", "short"])
        .await
        .ok();
    ctl(&url, &["delete_user", "carol"]).await.ok();
    ctl(&url, &["delete_vhost", "ops"]).await.ok();
    assert!(!amqp_login(&b, "carol", "pw2", "ops").await);
    let vhosts = ctl(&url, &["-q", "list_vhosts"]).await;
    assert_eq!(vhosts.ok().lines(), ["name", "/"]);

    let run = ctl(&url, &["import_definitions", &path]).await;
    assert_eq!(
        run.ok().lines(),
        [
            format!("Importing definitions in JSON from a file at \"{path}\" ...").as_str(),
            "Successfully imported definitions."
        ]
    );
    assert!(amqp_login(&b, "carol", "pw2", "ops").await);
    let policies = ctl(&url, &["-q", "-p", "ops", "list_policies"]).await;
    assert_eq!(policies.ok().stdout, policies_before.stdout);

    // From standard input too; a second import of the same file changes nothing.
    ctl(&url, &["delete_user", "carol"]).await.ok();
    ctl_with(&url, &["import_definitions"], &exported)
        .await
        .ok();
    assert!(amqp_login(&b, "carol", "pw2", "ops").await);

    // rabbitmqctl's refusals of a file it cannot use, before anything is sent.
    let empty = common::temp_data_dir().join("empty.json");
    std::fs::write(&empty, b"").expect("written");
    let empty = empty.display().to_string();
    ctl(&url, &["import_definitions", &empty])
        .await
        .failed(65, &format!("File {empty} is zero-sized"));
    let broken = common::temp_data_dir().join("broken.json");
    std::fs::write(&broken, b"{\"users\": [").expect("written");
    ctl(&url, &["import_definitions", &broken.display().to_string()])
        .await
        .failed(65, "Failed to deserialise input (format: JSON)");
    ctl(&url, &["import_definitions", "/nonexistent/defs.json"])
        .await
        .failed(
            65,
            "Parent directory or file /nonexistent/defs.json does not exist",
        );
    b.shutdown().await;
}
