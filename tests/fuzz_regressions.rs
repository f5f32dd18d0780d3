//! Inputs found by fuzzing (fuzz/, see fuzz/README.md), replayed without the fuzzer.
//!
//! Every file under `fuzz/regressions/frame/` goes through the frame codec checks of
//! the `frame` target, every file under `fuzz/regressions/store/` through the store
//! record parsers of the `store` target, and every file under `fuzz/regressions/connection/` is played
//! against an in-process broker over TCP as the `connection` target does, after which
//! the broker must still answer a fresh connection with connection.start. The checks
//! themselves are fuzz/src/harness.rs, shared with the fuzz targets.
//!
//! Each input runs in a child process (this test binary, running only `replay_one`),
//! because what fuzzing finds is often a stack overflow, which aborts the process:
//! so one bad input cannot hide the others, and the failure lists all of them.

mod common;

#[path = "../fuzz/src/harness.rs"]
mod harness;

use std::path::PathBuf;
use std::process::Command;

/// Set in a child: `target/file` of the one input it replays.
const ONE: &str = "WARRENMQ_FUZZ_REGRESSION";

fn dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target)
}

/// The file names of one fuzz target's regression inputs, sorted.
fn inputs(target: &str) -> Vec<String> {
    let dir = dir(target);
    let mut out: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            e.expect("directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no inputs in {}", dir.display());
    out
}

fn replay_all(target: &str) {
    let exe = std::env::current_exe().expect("test binary");
    let mut failed = Vec::new();
    for name in inputs(target) {
        let out = Command::new(&exe)
            .args(["replay_one", "--exact", "--nocapture", "--test-threads=1"])
            .env(ONE, format!("{target}/{name}"))
            .output()
            .expect("run the test binary");
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let why: Vec<&str> = stderr
                .lines()
                .filter(|l| !l.trim().is_empty() && !l.starts_with("note:"))
                .take(3)
                .collect();
            failed.push(format!(
                "{target}/{name}: {} {}",
                out.status,
                why.join(" | ")
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of the {target} regression inputs fail:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

#[test]
fn frame_regressions() {
    replay_all("frame");
}

#[test]
fn connection_regressions() {
    replay_all("connection");
}

#[test]
fn store_regressions() {
    replay_all("store");
}

/// Replays the one input named by `WARRENMQ_FUZZ_REGRESSION`; does nothing without it.
#[test]
fn replay_one() {
    let Ok(which) = std::env::var(ONE) else {
        return;
    };
    let (target, name) = which.split_once('/').expect("target/name");
    let data = std::fs::read(dir(target).join(name)).expect("readable input");
    match target {
        "frame" => harness::check_frames(&data),
        "store" => harness::check_store(&data),
        "connection" => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let broker = common::start().await;
                harness::play(broker.addr, &data).await;
                if let Err(e) = harness::check_alive(broker.addr).await {
                    panic!("the broker stopped serving after {name}: {e}");
                }
                broker.stop().await;
            });
        }
        other => panic!("unknown fuzz target {other}"),
    }
}
