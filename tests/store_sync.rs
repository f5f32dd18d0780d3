//! What the broker syncs before a publisher confirm, seen from the system calls of
//! the real binary under strace.
//!
//! sled 0.34.7 writes values of about 128 KiB and more to their own files under
//! `db/blobs/` and never syncs them; kill -9 keeps the page cache, so only the sync
//! calls themselves show whether a confirm would survive a power cut.
//!
//! Needs `strace` (Debian/Ubuntu package `strace`) and ptrace permission; without
//! them the test prints why and passes without checking anything.

mod common;
mod process;
mod support;

use std::collections::{HashMap, HashSet};

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

fn is_blob(path: &str) -> bool {
    Path::new(path)
        .parent()
        .is_some_and(|p| p.ends_with("db/blobs"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_message_blob_is_fsynced_before_its_confirm() {
    if !strace_usable() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("warrenmq-sync-blob-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let trace =
        std::env::temp_dir().join(format!("warrenmq-sync-blob-{}.strace", std::process::id()));
    let broker = Traced::start(&dir, &trace);

    let conn = connect_url(&broker.url()).await;
    let ch = channel(&conn).await;
    ok(
        "confirm.select",
        ch.confirm_select(ConfirmSelectOptions::default()),
    )
    .await;
    ok(
        "queue.declare",
        ch.queue_declare(
            "blobs".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
    let persistent = BasicProperties::default().with_delivery_mode(2);

    // Small messages first: they never reach sled's blob threshold, so the blob
    // bookkeeping must add no sync to their commits.
    let small_from = now();
    for i in 0..20u32 {
        let confirm = ok(
            "basic.publish",
            ch.basic_publish(
                "".into(),
                "blobs".into(),
                BasicPublishOptions::default(),
                &i.to_be_bytes(),
                persistent.clone(),
            ),
        )
        .await;
        assert!(matches!(ok("confirm", confirm).await, Confirmation::Ack(_)));
    }
    let small_until = now();

    let body = vec![0x5a_u8; 1024 * 1024];
    let published = now();
    let confirm = ok(
        "basic.publish",
        ch.basic_publish(
            "".into(),
            "blobs".into(),
            BasicPublishOptions::default(),
            &body,
            persistent.clone(),
        ),
    )
    .await;
    let confirmation = ok("confirm", confirm).await;
    let confirmed = now();
    assert!(
        matches!(confirmation, Confirmation::Ack(_)),
        "{confirmation:?}"
    );
    let _ = conn.close(200, "bye".into()).await;

    let trace = broker.stop();
    let calls = calls(&trace);
    let _ = std::fs::remove_file(dir.with_extension("strace"));

    let syncs = |from: f64, until: f64, pred: &dyn Fn(&Call) -> bool| {
        calls
            .iter()
            .filter(|c| c.at >= from && c.at <= until)
            .filter(|c| c.name == "fsync" || c.name == "fdatasync")
            .filter(|c| pred(c))
            .count()
    };
    let db_file = |c: &Call| c.path.ends_with("db/db");
    let blob_file = |c: &Call| is_blob(&c.path);
    let blob_dir = |c: &Call| c.path.ends_with("db/blobs");
    println!(
        "20 small confirms: {} syncs of db/db, {} of blob files, {} of db/blobs",
        syncs(small_from, small_until, &db_file),
        syncs(small_from, small_until, &blob_file),
        syncs(small_from, small_until, &blob_dir),
    );
    println!(
        "one 1 MiB confirm: {} syncs of db/db, {} of blob files, {} of db/blobs",
        syncs(published, confirmed, &db_file),
        syncs(published, confirmed, &blob_file),
        syncs(published, confirmed, &blob_dir),
    );
    assert_eq!(
        syncs(small_from, small_until, &blob_file),
        0,
        "commits that wrote no blob must not sync blob files"
    );

    // Every blob file created before the confirm arrived must have been fsynced
    // after its creation and before the confirm, and the blobs directory with it.
    let created: HashMap<&str, f64> = calls
        .iter()
        .filter(|c| c.create && is_blob(&c.path) && c.at <= confirmed)
        .map(|c| (c.path.as_str(), c.at))
        .collect();
    assert!(
        !created.is_empty(),
        "a 1 MiB value should have gone to a file under db/blobs/; trace:\n{trace}"
    );
    let mut unsynced = HashSet::new();
    for (path, at) in &created {
        let synced = calls
            .iter()
            .any(|c| c.name == "fsync" && c.path == *path && c.at >= *at && c.at <= confirmed);
        if !synced {
            unsynced.insert(*path);
        }
    }
    assert!(
        unsynced.is_empty(),
        "blob files written before the confirm but never fsynced before it: {unsynced:?}"
    );
    let last_created = created.values().cloned().fold(0.0, f64::max);
    assert!(
        calls.iter().any(|c| c.name == "fsync"
            && c.path.ends_with("db/blobs")
            && c.at >= last_created
            && c.at <= confirmed),
        "the blobs directory was not fsynced after its new entries and before the confirm"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
