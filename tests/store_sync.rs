//! What the broker syncs before a publisher confirm, seen from the system calls of
//! the real binary under strace.
//!
//! Message bodies and their index changes go to the body log's segment files
//! (`msgs/*.seg`), entities to sled; kill -9 keeps the page cache, so only the
//! sync calls themselves show whether a confirm would survive a power cut: the
//! segment is fdatasynced before each confirm, and sled's file before a durable
//! queue's declare-ok.
//!
//! Needs `strace` (Debian/Ubuntu package `strace`) and ptrace permission; without
//! them the test prints why and passes without checking anything.

mod common;
mod process;
mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation};
use support::{channel, connect_url, ok};

/// `warrenmq` running under `strace -f`, its system calls going to `trace`.
struct Traced {
    strace: Child,
    addr: SocketAddr,
    trace: PathBuf,
}

impl Traced {
    fn start(dir: &Path, trace: &Path) -> Traced {
        let mut cmd = Command::new("strace");
        cmd.args([
            "-f",
            "-ttt",
            "-y",
            "-e",
            "trace=openat,fsync,fdatasync",
            "-o",
        ])
        .arg(trace)
        .arg(env!("CARGO_BIN_EXE_warrenmq"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--log-level",
            "info",
            "--data-dir",
        ])
        .arg(dir)
        .env("RUST_LOG_STYLE", "never")
        .env("NO_COLOR", "1");
        let (strace, addr) = process::spawn(cmd);
        Traced {
            strace,
            addr,
            trace: trace.to_path_buf(),
        }
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    /// Kills the broker (strace's child) and waits for strace to finish its output.
    fn stop(mut self) -> String {
        let children = format!("/proc/{0}/task/{0}/children", self.strace.id());
        let children = std::fs::read_to_string(children).unwrap_or_default();
        for pid in children.split_whitespace() {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
        let _ = self.strace.wait();
        std::fs::read_to_string(&self.trace).expect("strace output")
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        let _ = self.strace.kill();
        let _ = self.strace.wait();
    }
}

fn strace_usable() -> bool {
    match Command::new("strace")
        .args(["-f", "-e", "trace=fsync", "-o", "/dev/null", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => true,
        Ok(_) => {
            println!("SKIPPED: strace is installed but cannot trace here (ptrace not permitted?)");
            false
        }
        Err(_) => {
            println!("SKIPPED: strace is not installed (Debian/Ubuntu package `strace`)");
            false
        }
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// One traced call: when, what, and the path strace's `-y` showed for it.
#[derive(Debug)]
struct Call {
    at: f64,
    name: String,
    path: String,
    create: bool,
}

/// Parses `PID SECONDS.MICROS name(args) = result` lines; a call split by a
/// thread switch (`<unfinished ...>` / `<... resumed>`) is taken from its first half
/// for openat (the path) and from its last for fsync (the return).
fn calls(trace: &str) -> Vec<Call> {
    let mut out = Vec::new();
    for line in trace.lines() {
        // strace pads the pid column (`%-5d`): split on runs of spaces.
        let mut parts = line.trim_start().splitn(2, ' ');
        let (Some(_pid), Some(tail)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Some((at, rest)) = tail.trim_start().split_once(' ') else {
            continue;
        };
        let Ok(at) = at.parse::<f64>() else {
            continue;
        };
        let (name, args) = match rest.split_once('(') {
            Some((n, a)) if !n.starts_with('<') => (n.to_string(), a),
            _ => continue,
        };
        // The first `<path>` after the call name: openat's dirfd is AT_FDCWD<cwd> and
        // its path is the quoted string, so openat reads the quoted string instead.
        let path = if name == "openat" {
            args.split('"').nth(1).unwrap_or("").to_string()
        } else {
            args.split_once('<')
                .and_then(|(_, p)| p.split_once('>'))
                .map(|(p, _)| p.to_string())
                .unwrap_or_default()
        };
        let failed = rest.contains(" = -1 ");
        if failed {
            continue;
        }
        out.push(Call {
            at,
            create: name == "openat" && args.contains("O_CREAT"),
            name,
            path,
        });
    }
    out
}

fn is_segment(path: &str) -> bool {
    path.ends_with(".seg")
        && Path::new(path)
            .parent()
            .is_some_and(|p| p.ends_with("msgs"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_bodies_are_fdatasynced_before_their_confirms() {
    if !strace_usable() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("warrenmq-sync-log-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let trace =
        std::env::temp_dir().join(format!("warrenmq-sync-log-{}.strace", std::process::id()));
    let broker = Traced::start(&dir, &trace);

    let conn = connect_url(&broker.url()).await;
    let ch = channel(&conn).await;
    ok(
        "confirm.select",
        ch.confirm_select(ConfirmSelectOptions::default()),
    )
    .await;
    let declared = now();
    ok(
        "queue.declare",
        ch.queue_declare(
            "bodies".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
    let declare_window = (declared, now());
    let persistent = BasicProperties::default().with_delivery_mode(2);

    // Small messages, then a 1 MiB one (which sled would have put in a file of
    // its own): each confirmed before the next is published.
    let mut windows = Vec::new();
    let large = vec![0x5a_u8; 1024 * 1024];
    for i in 0..21u32 {
        let small = i.to_be_bytes();
        let body: &[u8] = if i == 20 { &large } else { &small };
        let published = now();
        let confirm = ok(
            "basic.publish",
            ch.basic_publish(
                "".into(),
                "bodies".into(),
                BasicPublishOptions::default(),
                body,
                persistent.clone(),
            ),
        )
        .await;
        let confirmation = ok("confirm", confirm).await;
        windows.push((published, now()));
        assert!(
            matches!(confirmation, Confirmation::Ack(_)),
            "{confirmation:?}"
        );
    }
    let _ = conn.close(200, "bye".into()).await;

    let trace = broker.stop();
    let calls = calls(&trace);
    let _ = std::fs::remove_file(dir.with_extension("strace"));

    let is_sync = |c: &Call| c.name == "fsync" || c.name == "fdatasync";
    assert!(
        calls.iter().any(|c| is_sync(c)
            && c.path.ends_with("db/db")
            && c.at >= declare_window.0
            && c.at <= declare_window.1),
        "sled's file was not synced before the durable queue's declare-ok; trace:\n{trace}"
    );
    // In each window: the segment holding the body and its index change is synced.
    for (i, (from, until)) in windows.iter().enumerate() {
        let within = |pred: &dyn Fn(&Call) -> bool| -> Vec<f64> {
            calls
                .iter()
                .filter(|c| c.at >= *from && c.at <= *until && is_sync(c) && pred(c))
                .map(|c| c.at)
                .collect()
        };
        let segs = within(&|c| is_segment(&c.path));
        assert!(
            !segs.is_empty(),
            "confirm {i}: no fdatasync of the body log before it; trace:\n{trace}"
        );
    }
    // Each segment file created before a confirm: its directory entry is synced
    // after its creation and before that confirm.
    let last_confirm = windows.last().map(|w| w.1).unwrap_or(0.0);
    let created: Vec<f64> = calls
        .iter()
        .filter(|c| c.create && is_segment(&c.path) && c.at <= last_confirm)
        .map(|c| c.at)
        .collect();
    assert!(
        !created.is_empty(),
        "no segment file was created; trace:\n{trace}"
    );
    for at in created {
        let next_confirm = windows
            .iter()
            .map(|w| w.1)
            .find(|c| *c >= at)
            .unwrap_or(last_confirm);
        assert!(
            calls.iter().any(|c| c.name == "fsync"
                && c.path.ends_with("msgs")
                && c.at >= at
                && c.at <= next_confirm),
            "the msgs directory was not fsynced after a segment's creation and before the next confirm"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
