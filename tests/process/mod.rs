//! The real `warrenmq` binary as a child process, for tests that kill it, trace it
//! or measure it from outside: spawns a prepared command and reads the address the
//! broker logs it listens on, keeping its log drained so it never blocks on a pipe.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The broker binary with the flags every test uses, ready for more arguments.
pub fn warrenmq() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_warrenmq"));
    cmd.env("RUST_LOG_STYLE", "never").env("NO_COLOR", "1");
    cmd
}

/// Spawns `cmd` (the broker, or a tracer running it) and waits for the broker to
/// log where it listens.
pub fn spawn(mut cmd: Command) -> (Child, SocketAddr) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the broker");
    let out = BufReader::new(child.stdout.take().expect("piped stdout"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in out.lines().map_while(Result::ok) {
            // Shown with a failing test's output (the harness captures it otherwise);
            // WARRENMQ_TEST_ECHO=1 shows every line.
            if line.contains(" WARN ")
                || line.contains("ERROR")
                || std::env::var_os("WARRENMQ_TEST_ECHO").is_some()
            {
                eprintln!("broker: {line}");
            }
            if !sent {
                if let Some(rest) = line.split("listening for AMQP 0-9-1 on ").nth(1) {
                    let _ = tx.send(rest.to_string());
                    sent = true;
                }
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the broker logs where it listens");
    let addr = addr
        .split(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':'))
        .find(|s| s.contains(':'))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the address from {addr:?}"));
    (child, addr)
}

/// The broker on `--config CONFIG --data-dir DATA`, on an ephemeral port; killed
/// with SIGKILL (no shutdown path runs) when dropped.
pub struct Broker {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Broker {
    pub fn start(config: &std::path::Path, data: &std::path::Path) -> Broker {
        Broker::start_with(config, data, |_| {})
    }

    /// `start`, with `adjust` given the command first (environment, more flags).
    pub fn start_with(
        config: &std::path::Path,
        data: &std::path::Path,
        adjust: impl FnOnce(&mut Command),
    ) -> Broker {
        let mut cmd = warrenmq();
        cmd.arg("--config")
            .arg(config)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--log-level",
                "info",
                "--data-dir",
            ])
            .arg(data);
        adjust(&mut cmd);
        let (child, addr) = spawn(cmd);
        Broker { child, addr }
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
