//! RabbitMQ definitions in and out, with a real RabbitMQ 3.10.8 export
//! (config/examples/rabbitmq-3.10-definitions.json, made by
//! config/examples/make-rabbitmq-definitions.sh): the `definitions` key loads it
//! into a broker that real clients use, `import-definitions` turns it into TOML,
//! `export-definitions` writes it back out.
//!
//! The export's users and their passwords (set with rabbitmqctl):
//!   app    / app-secret  rabbit_password_hashing_sha256
//!   ops    / ops-s3cret  rabbit_password_hashing_sha512
//!   legacy / legacy-md5  rabbit_password_hashing_md5
//!   guest  / guest       RabbitMQ's default user
//!   nopass               password cleared: no password logs in

mod common;
mod process;
mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use serde_json::Value as Json;
use support::{amqp_err, channel, connect_url, get_body, ok, publish, publish_props, s, table};
use warrenmq::{BrokerHandle, Config};

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/rabbitmq-3.10-definitions.json")
}

/// A temporary directory for one test, removed when the test ends.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Dir {
        Dir(common::temp_data_dir())
    }

    /// `warrenmq.toml` here: a loopback listener, `data` here as data directory,
    /// and `extra`.
    fn toml(&self, name: &str, extra: &str) -> PathBuf {
        let text = format!(
            "listen = [\"127.0.0.1:0\"]\ndata_dir = {:?}\n{extra}",
            self.0.join("data").display().to_string()
        );
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The binary with these arguments: (success, stdout, stderr).
fn warrenmq(args: &[&std::ffi::OsStr]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_warrenmq"))
        .args(args)
        .output()
        .expect("runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn export(config: &Path) -> Json {
    let (ok, out, err) = warrenmq(&[
        "export-definitions".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
    ]);
    assert!(ok, "export-definitions failed: {err}");
    serde_json::from_str(&out).expect("export-definitions prints JSON")
}

/// A broker on the real export, named by a relative `definitions` path.
async fn broker_on_the_export(dir: &Dir) -> (BrokerHandle, Config) {
    std::fs::copy(example(), dir.0.join("defs.json")).unwrap();
    let file = dir.toml("warrenmq.toml", "definitions = \"defs.json\"\n");
    let config = Config::load(&file).expect("the export is a valid configuration");
    let broker = warrenmq::start(config.clone()).await.expect("starts");
    (broker, config)
}

fn url(b: &BrokerHandle, user: &str, password: &str, vhost: &str) -> String {
    format!("amqp://{user}:{password}@{}/{vhost}", b.local_addr())
}

async fn refused(url: &str) -> bool {
    let tried = tokio::time::timeout(
        Duration::from_secs(15),
        lapin::Connection::connect(url, Default::default()),
    )
    .await
    .expect("an answer");
    tried.is_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_exported_user_logs_in_with_its_rabbitmq_password() {
    let dir = Dir::new();
    let (b, config) = broker_on_the_export(&dir).await;
    // sha256, sha512 and md5 hashes, all made by RabbitMQ itself.
    for (user, password) in [
        ("app", "app-secret"),
        ("ops", "ops-s3cret"),
        ("legacy", "legacy-md5"),
        ("guest", "guest"),
    ] {
        let conn = connect_url(&url(&b, user, password, "%2f")).await;
        drop(conn);
    }
    assert!(refused(&url(&b, "ops", "app-secret", "%2f")).await);
    // A user whose password RabbitMQ cleared cannot log in with any.
    assert!(refused(&url(&b, "nopass", "", "staging")).await);
    assert!(refused(&url(&b, "nopass", "placeholder", "staging")).await);
    // What the export holds that WarrenMQ does not use is said, in one line.
    assert_eq!(config.warnings.len(), 1, "{:?}", config.warnings);
    assert!(
        config.warnings[0]
            .ends_with("defs.json: not supported, ignored: rabbit_version, rabbitmq_version"),
        "{:?}",
        config.warnings
    );
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exported_topology_routes_messages() {
    let dir = Dir::new();
    let (b, _) = broker_on_the_export(&dir).await;
    let conn = connect_url(&url(&b, "ops", "ops-s3cret", "%2f")).await;
    let ch = channel(&conn).await;

    // A direct exchange to a classic and a quorum queue.
    publish(&ch, "orders", "new", b"order 1").await;
    for q in ["orders.new", "orders.quorum"] {
        assert_eq!(
            get_body(&ch, q).await.as_deref(),
            Some(&b"order 1"[..]),
            "{q}"
        );
    }
    // Its alternate exchange, a fanout, takes what it cannot route.
    publish(&ch, "orders", "elsewhere", b"stray").await;
    assert_eq!(
        get_body(&ch, "orders.unrouted").await.as_deref(),
        Some(&b"stray"[..])
    );
    // A topic exchange, bound on to a headers exchange (exchange-to-exchange), whose
    // binding arguments match on a header.
    let eu = BasicProperties::default().with_headers(table(&[("region", s("eu"))]));
    let us = BasicProperties::default().with_headers(table(&[("region", s("us"))]));
    publish_props(&ch, "events", "audit.login", b"eu login", eu).await;
    publish_props(&ch, "events", "audit.login", b"us login", us).await;
    assert_eq!(
        support::drain(&ch, "events.all").await,
        ["eu login", "us login"]
    );
    assert_eq!(support::drain(&ch, "audit.eu").await, ["eu login"]);
    drop(conn);

    // The other vhost has its own topology.
    let conn = connect_url(&url(&b, "ops", "ops-s3cret", "staging")).await;
    let ch = channel(&conn).await;
    publish(&ch, "staging.events", "user.created", b"welcome").await;
    assert_eq!(
        get_body(&ch, "staging.q").await.as_deref(),
        Some(&b"welcome"[..])
    );
    drop(conn);
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exported_permissions_are_enforced() {
    let dir = Dir::new();
    let (b, _) = broker_on_the_export(&dir).await;
    // app: configure '^app\.', write '^(app\.|orders$|events$)', read '^(app\.|orders\.)'.
    let conn = connect_url(&url(&b, "app", "app-secret", "%2f")).await;
    let ch = channel(&conn).await;
    publish(&ch, "orders", "app", b"for app").await;
    assert_eq!(
        get_body(&ch, "app.in").await.as_deref(),
        Some(&b"for app"[..])
    );
    let (code, text) = amqp_err(
        "queue.declare",
        ch.queue_declare(
            "orders.mine".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_eq!(
        (code, text.as_str()),
        (
            403,
            "ACCESS_REFUSED - access to queue 'orders.mine' in vhost '/' refused for user 'app'"
        )
    );
    drop(conn);
    // app has no permissions in staging.
    assert!(refused(&url(&b, "app", "app-secret", "staging")).await);

    // legacy: configure nothing, write 'orders', read 'orders.new'.
    let conn = connect_url(&url(&b, "legacy", "legacy-md5", "%2f")).await;
    let ch = channel(&conn).await;
    publish(&ch, "orders", "new", b"from legacy").await;
    assert_eq!(
        get_body(&ch, "orders.new").await.as_deref(),
        Some(&b"from legacy"[..])
    );
    let (code, _) = amqp_err(
        "exchange.declare",
        ch.exchange_declare(
            "legacy.x".into(),
            lapin::ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_eq!(code, 403);
    drop(conn);
    b.shutdown().await;
}

/// Sorts a JSON array's entries, for comparing lists whose order means nothing.
fn sorted(v: &Json) -> Vec<Json> {
    let mut entries = v.as_array().cloned().unwrap_or_default();
    entries.sort_by_key(|e| e.to_string());
    entries
}

#[test]
fn import_definitions_prints_toml_that_check_config_accepts_as_the_same_configuration() {
    let dir = Dir::new();
    let (ok, toml, err) = warrenmq(&["import-definitions".as_ref(), example().as_os_str()]);
    assert!(ok, "{err}");
    // The unsupported keys are on standard error, in one line; stdout is TOML only.
    let warnings: Vec<&str> = err.lines().collect();
    assert_eq!(warnings.len(), 1, "{err}");
    assert!(warnings[0].contains("not supported, ignored: rabbit_version, rabbitmq_version"));
    let file = dir.write("imported.toml", &toml);
    let (ok, out, err) = warrenmq(&["check-config".as_ref(), file.as_os_str()]);
    assert!(ok, "check-config refused the imported TOML: {err}");
    assert!(out.contains("users: 5"), "{out}");
    assert!(
        out.contains("exchanges: 6, queues: 8, bindings: 9"),
        "{out}"
    );

    // The TOML is the same configuration as the JSON it came from, whether the JSON
    // stands alone or is named by a configuration's `definitions` key.
    let from_toml = Config::load(&file).expect("loads");
    let alone = Config::from_definitions(&example()).expect("loads");
    let keyed = Config::load(&dir.toml(
        "keyed.toml",
        &format!("definitions = {:?}\n", example().display().to_string()),
    ))
    .expect("loads");
    for c in [&alone, &keyed] {
        assert_eq!(from_toml.users, c.users);
        assert_eq!(from_toml.vhosts, c.vhosts);
        assert_eq!(from_toml.permissions, c.permissions);
        assert_eq!(from_toml.topic_permissions, c.topic_permissions);
        assert_eq!(from_toml.policies, c.policies);
        assert_eq!(from_toml.exchanges, c.exchanges);
        assert_eq!(from_toml.queues, c.queues);
        assert_eq!(from_toml.bindings, c.bindings);
    }
    assert_eq!(from_toml.users.len(), 5);
    assert_eq!(from_toml.policies[0].definition.len(), 3);
    assert_eq!(from_toml.topic_permissions[0].exchange, "events");
}

#[test]
fn export_then_import_round_trips() {
    let dir = Dir::new();
    let original: Json =
        serde_json::from_str(&std::fs::read_to_string(example()).unwrap()).unwrap();
    let first = export(&dir.toml(
        "first.toml",
        &format!("definitions = {:?}\n", example().display().to_string()),
    ));
    // What RabbitMQ exported comes back out as it was, entry for entry.
    for key in [
        "users",
        "permissions",
        "topic_permissions",
        "parameters",
        "global_parameters",
        "policies",
        "queues",
        "bindings",
    ] {
        assert_eq!(sorted(&first[key]), sorted(&original[key]), "{key}");
    }
    // Exchanges say whether they are internal (3.10 leaves that out).
    let mut exchanges = sorted(&original["exchanges"]);
    for x in &mut exchanges {
        x["internal"] = Json::Bool(false);
    }
    assert_eq!(sorted(&first["exchanges"]), exchanges);
    let vhosts = |v: &Json| -> Vec<(Json, Json)> {
        sorted(v)
            .iter()
            .map(|v| (v["name"].clone(), v["limits"].clone()))
            .collect()
    };
    assert_eq!(vhosts(&first["vhosts"]), vhosts(&original["vhosts"]));

    // Our export, loaded and exported again, is the same file.
    let first_file = dir.write("first.json", &first.to_string());
    let second = export(&dir.toml("second.toml", "definitions = \"first.json\"\n"));
    assert_eq!(first, second);

    // And it imports as TOML that check-config accepts.
    let (ok, toml, err) = warrenmq(&["import-definitions".as_ref(), first_file.as_os_str()]);
    assert!(ok, "{err}");
    assert!(
        err.is_empty(),
        "our own export has nothing unsupported: {err}"
    );
    let file = dir.write("again.toml", &toml);
    let (ok, _, err) = warrenmq(&["check-config".as_ref(), file.as_os_str()]);
    assert!(ok, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_adds_what_clients_declared_once_the_broker_is_stopped() {
    let dir = Dir::new();
    let (b, _) = broker_on_the_export(&dir).await;
    let file = dir.0.join("warrenmq.toml");
    let conn = connect_url(&url(&b, "ops", "ops-s3cret", "%2f")).await;
    let ch = channel(&conn).await;
    ok(
        "queue.declare",
        ch.queue_declare(
            "client.q".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            table(&[("x-max-length", lapin::types::AMQPValue::LongInt(42))]),
        ),
    )
    .await;
    ok(
        "queue.bind",
        ch.queue_bind(
            "client.q".into(),
            "orders".into(),
            "client".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    drop(conn);

    // The running broker holds the data directory.
    let (ok, _, err) = warrenmq(&[
        "export-definitions".as_ref(),
        "--config".as_ref(),
        file.as_os_str(),
    ]);
    assert!(!ok);
    assert!(
        err.contains("is in use by a running broker: stop it"),
        "{err}"
    );

    b.shutdown().await;
    let exported = export(&file);
    let queues = exported["queues"].as_array().unwrap();
    let client = queues
        .iter()
        .find(|q| q["name"] == "client.q")
        .expect("the declared queue is exported");
    assert_eq!(client["arguments"], serde_json::json!({"x-max-length": 42}));
    assert_eq!(queues.len(), 9, "the export's 8 queues and the client's");
    assert!(exported["bindings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|b| b["destination"] == "client.q" && b["routing_key"] == "client"));
    // The predeclared exchanges are the broker's own, as in RabbitMQ's export.
    assert!(exported["exchanges"]
        .as_array()
        .unwrap()
        .iter()
        .all(|x| !x["name"].as_str().unwrap().starts_with("amq.")));
}

#[test]
fn a_malformed_definitions_file_is_refused_at_its_line_and_column() {
    let dir = Dir::new();
    dir.write(
        "defs.json",
        "{\n  \"vhosts\": [{\"name\": \"/\"}],\n  \"queues\": [{\"name\": \"q\",}]\n}\n",
    );
    let file = dir.toml("c.toml", "definitions = \"defs.json\"\n");
    let (ok, _, err) = warrenmq(&["check-config".as_ref(), file.as_os_str()]);
    assert!(!ok);
    let at = format!("{}:3:27: trailing comma", dir.0.join("defs.json").display());
    assert!(err.contains(&at), "{err}");
    // A value of the wrong type, at its place.
    let defs = dir.write(
        "typed.json",
        "{\"vhosts\": [{\"name\": \"/\"}],\n\"exchanges\": [{\"name\": \"x\", \"vhost\": \"/\", \"type\": \"topic\", \"durable\": 1}]}",
    );
    let (ok, _, err) = warrenmq(&["import-definitions".as_ref(), defs.as_os_str()]);
    assert!(!ok);
    assert!(
        err.contains("typed.json:2:71: invalid type: integer `1`, expected a boolean"),
        "{err}"
    );
}

#[test]
fn errors_in_the_definitions_name_the_file_and_the_entity() {
    let dir = Dir::new();
    let load = |json: &str, toml_extra: &str| {
        dir.write("defs.json", json);
        let file = dir.toml(
            "c.toml",
            &format!("definitions = \"defs.json\"\n{toml_extra}"),
        );
        Config::load(&file).map(|_| ()).map_err(|e| e.to_string())
    };
    let defs = dir.0.join("defs.json").display().to_string();
    let vhost = r#""vhosts": [{"name": "/"}]"#;

    let err = load(
        &format!(r#"{{{vhost}, "queues": [{{"name": "q1", "vhost": "nope"}}]}}"#),
        "",
    )
    .unwrap_err();
    assert_eq!(
        err,
        format!("{defs}: queue 'q1' in vhost 'nope': unknown vhost 'nope'")
    );
    let err = load(
        &format!(
            r#"{{{vhost}, "permissions": [{{"user": "ghost", "vhost": "/", "configure": "", "write": "", "read": ""}}]}}"#
        ),
        "",
    )
    .unwrap_err();
    assert_eq!(
        err,
        format!("{defs}: permissions of user 'ghost' in vhost '/': unknown user 'ghost'")
    );
    let err = load(
        &format!(r#"{{{vhost}, "users": [{{"name": "u", "password_hash": "AAAA"}}]}}"#),
        "",
    )
    .unwrap_err();
    assert!(
        err.starts_with(&format!("{defs}: user 'u': password_hash is 3 bytes long")),
        "{err}"
    );

    // An entity in both files: the same is fine, another is refused, naming both.
    let queue = r#""queues": [{"name": "q", "vhost": "/", "durable": true, "arguments": {"x-max-length": 5}}]"#;
    let same = "\n[[queues]]\nname = \"q\"\narguments = { x-max-length = 5 }\n";
    assert_eq!(load(&format!("{{{vhost}, {queue}}}"), same), Ok(()));
    let other = "\n[[queues]]\nname = \"q\"\narguments = { x-max-length = 6 }\n";
    let err = load(&format!("{{{vhost}, {queue}}}"), other).unwrap_err();
    assert_eq!(
        err,
        format!(
            "{}:5:1: queue 'q' in vhost '/' is also in {defs}, with other properties: keep one of the two",
            dir.0.join("c.toml").display()
        )
    );

    // What start-up refuses when it declares an entry is named the same way.
    dir.write(
        "defs.json",
        &format!(
            r#"{{{vhost}, "exchanges": [{{"name": "x", "vhost": "/", "type": "nonsense"}}]}}"#
        ),
    );
    let (ok, _, err) = warrenmq(&["check-config".as_ref(), dir.0.join("c.toml").as_os_str()]);
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "{defs}: exchange 'x' in vhost '/': 503 COMMAND_INVALID - unknown exchange type 'nonsense'"
        )),
        "{err}"
    );
}

/// What the binary logs, line by line, and the address it listens on.
fn spawn_logged(
    config: &Path,
) -> (
    std::process::Child,
    std::net::SocketAddr,
    std::sync::mpsc::Receiver<String>,
) {
    let mut child = process::warrenmq()
        .arg("--config")
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawns");
    let out = BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let addr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("the broker did not start: {seen:?}"));
        if let Some(rest) = line.split("listening for AMQP 0-9-1 on ").nth(1) {
            break rest.trim().parse().expect("an address");
        }
        seen.push(line);
    };
    let (again_tx, again) = std::sync::mpsc::channel();
    for line in seen {
        let _ = again_tx.send(line);
    }
    std::thread::spawn(move || {
        for line in rx {
            if again_tx.send(line).is_err() {
                return;
            }
        }
    });
    (child, addr, again)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_definitions_are_warned_about_and_sighup_rereads_the_file() {
    let dir = Dir::new();
    let original: Json =
        serde_json::from_str(&std::fs::read_to_string(example()).unwrap()).unwrap();
    let user = |name: &str| {
        original["users"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["name"] == name)
            .unwrap()
            .clone()
    };
    let all = |user: &str| serde_json::json!({"user": user, "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"});
    let write = |users: Vec<Json>, permissions: Vec<Json>| {
        let defs = serde_json::json!({
            "rabbit_version": "3.10.8",
            "global_parameters": [{"name": "cluster_name", "value": "rabbit@prod"}],
            "parameters": [{"vhost": "/", "component": "federation-upstream", "name": "up",
                            "value": {"uri": "amqp://elsewhere"}}],
            "vhosts": [{"name": "/"}],
            "users": users,
            "permissions": permissions,
        });
        dir.write("defs.json", &serde_json::to_string_pretty(&defs).unwrap());
    };
    write(vec![user("ops")], vec![all("ops")]);
    let file = dir.toml("warrenmq.toml", "definitions = \"defs.json\"\n");

    // check-config prints the unsupported parts in one warning line.
    let (ok, _, err) = warrenmq(&["check-config".as_ref(), file.as_os_str()]);
    assert!(ok, "{err}");
    let expected = "not supported, ignored: rabbit_version, parameters: federation-upstream 'up' in vhost '/', global_parameters 'cluster_name'";
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(expected), "{err}");

    // The broker logs the same line as it starts.
    let (mut child, addr, log) = spawn_logged(&file);
    let mut logged = Vec::new();
    while let Ok(line) = log.recv_timeout(Duration::from_millis(200)) {
        logged.push(line);
    }
    assert!(
        logged
            .iter()
            .any(|l| l.contains("WARN") && l.contains(expected)),
        "{logged:?}"
    );
    let url = |user: &str, password: &str| format!("amqp://{user}:{password}@{addr}/%2f");
    drop(connect_url(&url("ops", "ops-s3cret")).await);

    // SIGHUP re-reads the definitions too: a user added there can log in.
    write(vec![user("ops"), user("app")], vec![all("ops"), all("app")]);
    let hup = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let started = Instant::now();
    loop {
        match lapin::Connection::connect(&url("app", "app-secret"), Default::default()).await {
            Ok(c) => {
                drop(c);
                break;
            }
            Err(_) if started.elapsed() < Duration::from_secs(20) => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("the user added to the definitions cannot log in after SIGHUP: {e}"),
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}
