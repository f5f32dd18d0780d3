//! Users with RabbitMQ's password hashes: made by `warrenmq hash-password`, read from
//! the configuration file, checked at login; and refused at their line when wrong.

mod common;
mod support;

use std::io::Write;
use std::process::{Command, Stdio};

use warrenmq::Config;

fn hash_password(password: &str) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_warrenmq"))
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{password}\n").as_bytes())
        .expect("writes");
    let out = child.wait_with_output().expect("finishes");
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_string()
}

fn config(users: &str) -> Result<Config, warrenmq::config::ConfigError> {
    let dir = std::env::temp_dir().join(format!("warrenmq-users-{}", std::process::id()));
    let text = format!(
        "listen = [\"127.0.0.1:0\"]\ndata_dir = {:?}\n\n[[vhosts]]\nname = \"/\"\n\n{users}",
        dir.display().to_string()
    );
    Config::parse(&text, "users.toml")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_with_a_password_hash_logs_in_with_its_password_only() {
    let hash = hash_password("correct horse");
    assert_ne!(
        hash,
        hash_password("correct horse"),
        "each hash has its own salt"
    );
    let users = format!(
        "[[users]]\nname = \"app\"\npassword_hash = \"{hash}\"\ntags = [\"monitoring\"]\n\n\
         [[users]]\nname = \"ops\"\n\
         password_hash = \"u2mb4WSjDs5t6AXU4rD6rX5kuwv9d7MbaXXDRyCoQctCoWJShf2io3F/uwixXWFOmRiunZgrIxeFbdmJFLKak4B8uoM=\"\n\
         hashing_algorithm = \"rabbit_password_hashing_sha512\"\n"
    );
    let broker = warrenmq::start(config(&users).expect("valid"))
        .await
        .expect("starts");
    let addr = broker.local_addr();
    let url = |user: &str, pass: &str| format!("amqp://{user}:{pass}@{addr}/%2f");
    let conn = support::connect_url(&url("app", "correct%20horse")).await;
    let ch = support::channel(&conn).await;
    let q = support::temp_queue(&ch, "users").await;
    support::publish(&ch, "", &q, b"hello").await;
    assert_eq!(
        support::get_body(&ch, &q).await.as_deref(),
        Some(&b"hello"[..])
    );
    drop(conn);
    // A hash RabbitMQ made (sha512) logs in the same way.
    let conn = support::connect_url(&url("ops", "s3cret")).await;
    drop(conn);
    let refused = lapin::Connection::connect(&url("app", "wrong"), Default::default()).await;
    assert!(refused.is_err(), "a wrong password is refused");
    broker.shutdown().await;
}

#[test]
fn bad_user_entries_are_refused_at_their_line() {
    let both = "[[users]]\nname = \"a\"\npassword = \"x\"\npassword_hash = \"g5yG+4dO1v7yUOBOIKUzgRa5/I161I7l+fe6JdUVOgg5KQbo\"\n";
    let err = config(both).expect_err("refused").to_string();
    assert_eq!(
        err,
        "users.toml:10:1: users.a: give either password or password_hash, not both"
    );
    let neither = "[[users]]\nname = \"a\"\n";
    let err = config(neither).expect_err("refused").to_string();
    assert!(err.contains("not neither"), "{err}");
    let short = "[[users]]\nname = \"a\"\npassword_hash = \"AAAA\"\n";
    let err = config(short).expect_err("refused").to_string();
    assert!(
        err.starts_with("users.toml:9:1: users.a: password_hash is 3 bytes long"),
        "{err}"
    );
    // RabbitMQ's legacy md5 hashes are read (tests/definitions.rs logs in with one);
    // a module RabbitMQ does not ship is refused.
    let md5 = "[[users]]\nname = \"a\"\npassword_hash = \"BgrHsjf/bQLZPr70EbhI17jzNVo=\"\nhashing_algorithm = \"rabbit_password_hashing_md5\"\n";
    assert!(config(md5).is_ok());
    let other = md5.replace("_md5", "_bcrypt");
    let err = config(&other).expect_err("refused").to_string();
    assert!(
        err.contains("unsupported hashing_algorithm 'rabbit_password_hashing_bcrypt'"),
        "{err}"
    );
    // The secret never shows in a configuration's debug output.
    let ok = config("[[users]]\nname = \"a\"\npassword = \"hunter2\"\n").expect("valid");
    assert!(!format!("{ok:?}").contains("hunter2"));
}
