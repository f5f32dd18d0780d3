//! Power loss: what the broker acknowledged survives a power cut at any moment.
//!
//! The real binary runs with a recorder loaded (`tests/power_loss/shim.c`, through
//! LD_PRELOAD) that journals every write, truncation, creation, rename, unlink and
//! sync it makes under its data directory, in order, with the time. Clients
//! publish with confirms and in transactions, consume, ack in transactions,
//! declare, bind, purge and delete, noting when each answer arrived; then the
//! broker is killed. For many random moments of the run, the data directory is
//! rebuilt as a power cut then would have left it, and a broker started on it
//! must serve every confirmed message and every acknowledged declaration, and no
//! message whose ack a tx.commit-ok covered.
//!
//! Two models of what a cut leaves:
//! - `strict`: only what a completed fsync/fdatasync covered. A file's data
//!   needs a sync of the file; its name (creation, rename, unlink) a sync of
//!   its directory. sync_file_range counts for nothing.
//! - `torn`: what `strict` keeps, plus for each file a random prefix of the
//!   writes made after its last sync, the last one cut at a 512-byte boundary;
//!   every name change kept (as a metadata journal would have it).
//!
//! More moments: `WARRENMQ_POWER_CUTS=200 cargo test --release --test power_loss -- --nocapture`;
//! `WARRENMQ_POWER_SEED` repeats a run's choice of moments.

mod common;
mod process;
mod support;

use process::Broker;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, ExchangeKind};
use support::{channel, connect_url, ok};

/// Small segments, so that a run of a few seconds fills, rolls and deletes them.
const SEGMENT_SIZE: u64 = 256 * 1024;
const RUN: Duration = Duration::from_millis(2500);
const FANOUT: &str = "pl.fan";
const DIRECT: &str = "pl.direct";
/// Bound to FANOUT: a consumer acks from the first, a transaction from the second,
/// the third is purged once.
const FAN_QUEUES: [&str; 3] = ["pl.a", "pl.b", "pl.c"];
/// Bound to DIRECT with its own name as key; nobody consumes it.
const DIRECT_QUEUE: &str = "pl.d";

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for clock_gettime to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// xorshift64*: the moments and tears are chosen from a seed the test prints.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

fn build_shim() -> PathBuf {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("warrenmq-power-loss-shim.so");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/power_loss/shim.c");
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-Wall", "-o"])
        .arg(&out)
        .arg(&src)
        .arg("-ldl")
        .status()
        .expect("a C compiler (cc) builds the power-loss recorder");
    assert!(status.success(), "the power-loss recorder did not compile");
    out
}

fn config_file(dir: &Path) -> PathBuf {
    let text = warrenmq::config::DEFAULT_TOML.replace(
        "segment_size = 67108864",
        &format!("segment_size = {SEGMENT_SIZE}"),
    );
    assert!(text.contains(&format!("segment_size = {SEGMENT_SIZE}")));
    let path = dir.join("warrenmq.toml");
    std::fs::write(&path, text).expect("write the configuration");
    path
}

// ---------------------------------------------------------------------------
// What the clients saw, with the monotonic time of each answer.

#[derive(Default)]
struct History {
    /// id -> (queues it was routed to, time sent, time confirmed or committed).
    messages: HashMap<u64, (Vec<String>, u64, Option<u64>)>,
    /// (queue, id) -> the earliest moment it may have left the queue: its
    /// delivery, or the purge or delete sent while it was there.
    may_be_gone: HashMap<(String, u64), u64>,
    /// (queue, id) -> when the tx.commit-ok covering its ack arrived.
    committed_acks: HashMap<(String, u64), u64>,
    /// queue -> (declare sent, declare-ok).
    declared: HashMap<String, (u64, Option<u64>)>,
    /// queue -> (delete sent, delete-ok).
    deleted: HashMap<String, (u64, Option<u64>)>,
    /// (exchange, queue, key) -> bind-ok.
    bound: Vec<(String, String, String, u64)>,
    /// exchange -> (declare sent, declare-ok).
    exchanges: HashMap<String, (u64, Option<u64>)>,
    /// exchange -> (delete sent, delete-ok).
    exchanges_deleted: HashMap<String, (u64, Option<u64>)>,
    /// (exchange, queue, key) -> (unbind sent, unbind-ok).
    unbound: HashMap<(String, String, String), (u64, Option<u64>)>,
    next_id: u64,
}

type Shared = Arc<Mutex<History>>;

fn lock(h: &Shared) -> std::sync::MutexGuard<'_, History> {
    h.lock().unwrap_or_else(|p| p.into_inner())
}

/// Body of message `id`: its id, then bytes derived from it, so that a body that
/// comes back damaged or belonging to another message is seen.
fn body(id: u64, len: usize) -> Vec<u8> {
    let mut b = id.to_be_bytes().to_vec();
    b.extend((0..len.saturating_sub(8)).map(|i| (id as usize * 31 + i * 7) as u8));
    b
}

fn parse_body(b: &[u8]) -> Option<u64> {
    let id = u64::from_be_bytes(b.get(..8)?.try_into().ok()?);
    (body(id, b.len()) == b).then_some(id)
}

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

fn message_size(r: &mut Rng) -> usize {
    match r.below(100) {
        0 => 300_000 + r.below(800_000) as usize,
        1..=9 => 4_000 + r.below(60_000) as usize,
        _ => 8 + r.below(2_000) as usize,
    }
}

fn new_id(h: &Shared, queues: Vec<String>) -> u64 {
    let mut h = lock(h);
    let id = h.next_id;
    h.next_id += 1;
    h.messages.insert(id, (queues, now_ns(), None));
    id
}

async fn declare_queue(ch: &Channel, h: &Shared, name: &str) -> lapin::Result<()> {
    lock(h).declared.insert(name.to_string(), (now_ns(), None));
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    if let Some(d) = lock(h).declared.get_mut(name) {
        d.1 = Some(now_ns());
    }
    Ok(())
}

async fn declare_exchange(
    ch: &Channel,
    h: &Shared,
    name: &str,
    kind: ExchangeKind,
) -> lapin::Result<()> {
    lock(h).exchanges.insert(name.into(), (now_ns(), None));
    ch.exchange_declare(
        name.into(),
        kind,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    if let Some(x) = lock(h).exchanges.get_mut(name) {
        x.1 = Some(now_ns());
    }
    Ok(())
}

async fn bind(
    ch: &Channel,
    h: &Shared,
    exchange: &str,
    queue: &str,
    key: &str,
) -> lapin::Result<()> {
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    lock(h)
        .bound
        .push((exchange.into(), queue.into(), key.into(), now_ns()));
    Ok(())
}

async fn topology(url: &str, h: &Shared) {
    let conn = connect_url(url).await;
    let ch = channel(&conn).await;
    for (name, kind) in [
        (FANOUT, ExchangeKind::Fanout),
        (DIRECT, ExchangeKind::Direct),
    ] {
        declare_exchange(&ch, h, name, kind)
            .await
            .expect("exchange.declare");
    }
    for q in FAN_QUEUES {
        declare_queue(&ch, h, q).await.expect("queue.declare");
        bind(&ch, h, FANOUT, q, "").await.expect("queue.bind");
    }
    declare_queue(&ch, h, DIRECT_QUEUE)
        .await
        .expect("queue.declare");
    bind(&ch, h, DIRECT, DIRECT_QUEUE, DIRECT_QUEUE)
        .await
        .expect("queue.bind");
    let _ = conn.close(200, "done".into()).await;
}

/// Publishes with confirms, 32 in flight, to the fanout and the direct exchange.
async fn confirmed_publisher(url: String, h: Shared, seed: u64) -> lapin::Result<()> {
    let mut rng = Rng(seed);
    let conn = connect_url(&url).await;
    let ch = channel(&conn).await;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    loop {
        let mut pending = Vec::new();
        for _ in 0..32 {
            let (exchange, key, queues) = if rng.below(3) < 2 {
                (
                    FANOUT,
                    "",
                    FAN_QUEUES.iter().map(|q| q.to_string()).collect(),
                )
            } else {
                (DIRECT, DIRECT_QUEUE, vec![DIRECT_QUEUE.to_string()])
            };
            let id = new_id(&h, queues);
            let confirm = ch
                .basic_publish(
                    exchange.into(),
                    key.into(),
                    BasicPublishOptions::default(),
                    &body(id, message_size(&mut rng)),
                    persistent(),
                )
                .await?;
            pending.push((id, confirm));
        }
        for (id, confirm) in pending {
            if let Confirmation::Ack(_) = confirm.await? {
                if let Some(m) = lock(&h).messages.get_mut(&id) {
                    m.2 = Some(now_ns());
                }
            }
        }
    }
}

/// Publishes to the direct exchange in transactions of 10.
async fn tx_publisher(url: String, h: Shared, seed: u64) -> lapin::Result<()> {
    let mut rng = Rng(seed);
    let conn = connect_url(&url).await;
    let ch = channel(&conn).await;
    ch.tx_select().await?;
    loop {
        let mut ids = Vec::new();
        for _ in 0..10 {
            let id = new_id(&h, vec![DIRECT_QUEUE.to_string()]);
            ch.basic_publish(
                DIRECT.into(),
                DIRECT_QUEUE.into(),
                BasicPublishOptions::default(),
                &body(id, message_size(&mut rng)),
                persistent(),
            )
            .await?;
            ids.push(id);
        }
        ch.tx_commit().await?;
        let t = now_ns();
        let mut h = lock(&h);
        for id in ids {
            if let Some(m) = h.messages.get_mut(&id) {
                m.2 = Some(t);
            }
        }
    }
}

/// Consumes the first fanout queue with manual acks.
async fn acking_consumer(url: String, h: Shared) -> lapin::Result<()> {
    let conn = connect_url(&url).await;
    let ch = channel(&conn).await;
    ch.basic_qos(64, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            FAN_QUEUES[0].into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    while let Some(d) = consumer.next().await {
        let d = d?;
        if let Some(id) = parse_body(&d.data) {
            lock(&h)
                .may_be_gone
                .entry((FAN_QUEUES[0].to_string(), id))
                .or_insert_with(now_ns);
        }
        d.ack(BasicAckOptions::default()).await?;
    }
    Ok(())
}

/// Gets from the second fanout queue and acks in transactions.
async fn tx_acker(url: String, h: Shared) -> lapin::Result<()> {
    let queue = FAN_QUEUES[1];
    let conn = connect_url(&url).await;
    let ch = channel(&conn).await;
    ch.tx_select().await?;
    loop {
        let mut ids = Vec::new();
        for _ in 0..20 {
            let Some(m) = ch
                .basic_get(queue.into(), BasicGetOptions { no_ack: false })
                .await?
            else {
                break;
            };
            if let Some(id) = parse_body(&m.delivery.data) {
                lock(&h)
                    .may_be_gone
                    .entry((queue.to_string(), id))
                    .or_insert_with(now_ns);
                ids.push(id);
            }
            m.delivery.ack(BasicAckOptions::default()).await?;
        }
        ch.tx_commit().await?;
        let t = now_ns();
        {
            let mut h = lock(&h);
            for id in ids {
                h.committed_acks.insert((queue.to_string(), id), t);
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Marks every message that was sent towards `queue` as possibly gone from `at`.
fn all_may_be_gone(h: &Shared, queue: &str, at: u64) {
    let mut h = lock(h);
    let ids: Vec<u64> = h
        .messages
        .iter()
        .filter(|(_, m)| m.0.iter().any(|q| q == queue))
        .map(|(id, _)| *id)
        .collect();
    for id in ids {
        h.may_be_gone.entry((queue.to_string(), id)).or_insert(at);
    }
}

/// Declares, binds, fills and deletes short-lived durable queues and exchanges,
/// unbinds, and purges the third fanout queue once.
async fn churn(url: String, h: Shared, seed: u64) -> lapin::Result<()> {
    let mut rng = Rng(seed);
    let conn = connect_url(&url).await;
    let ch = channel(&conn).await;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut purged = false;
    for round in 0.. {
        let name = format!("pl.tmp{round}");
        let exchange = format!("pl.x{round}");
        declare_queue(&ch, &h, &name).await?;
        bind(&ch, &h, DIRECT, &name, &name).await?;
        declare_exchange(&ch, &h, &exchange, ExchangeKind::Fanout).await?;
        bind(&ch, &h, &exchange, &name, "").await?;
        let mut pending = Vec::new();
        for _ in 0..5 {
            let id = new_id(&h, vec![name.clone()]);
            let confirm = ch
                .basic_publish(
                    DIRECT.into(),
                    name.as_str().into(),
                    BasicPublishOptions::default(),
                    &body(id, message_size(&mut rng)),
                    persistent(),
                )
                .await?;
            pending.push((id, confirm));
        }
        for (id, confirm) in pending {
            if let Confirmation::Ack(_) = confirm.await? {
                if let Some(m) = lock(&h).messages.get_mut(&id) {
                    m.2 = Some(now_ns());
                }
            }
        }
        if round % 2 == 1 {
            let sent = now_ns();
            lock(&h).deleted.insert(name.clone(), (sent, None));
            all_may_be_gone(&h, &name, sent);
            ch.queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await?;
            if let Some(d) = lock(&h).deleted.get_mut(&name) {
                d.1 = Some(now_ns());
            }
        }
        if round % 2 == 0 {
            // The queue stays, bound through its own exchange only.
            let key = (DIRECT.to_string(), name.clone(), name.clone());
            lock(&h).unbound.insert(key.clone(), (now_ns(), None));
            ch.queue_unbind(
                name.as_str().into(),
                DIRECT.into(),
                name.as_str().into(),
                FieldTable::default(),
            )
            .await?;
            if let Some(u) = lock(&h).unbound.get_mut(&key) {
                u.1 = Some(now_ns());
            }
        } else {
            lock(&h)
                .exchanges_deleted
                .insert(exchange.clone(), (now_ns(), None));
            ch.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await?;
            if let Some(d) = lock(&h).exchanges_deleted.get_mut(&exchange) {
                d.1 = Some(now_ns());
            }
        }
        if round == 4 && !purged {
            purged = true;
            all_may_be_gone(&h, FAN_QUEUES[2], now_ns());
            ch.queue_purge(FAN_QUEUES[2].into(), QueuePurgeOptions::default())
                .await?;
            // What was published before the purge-ok may have been purged.
            all_may_be_gone(&h, FAN_QUEUES[2], now_ns());
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The journal, and the directory a power cut would leave.

#[derive(Debug)]
enum Op {
    Write {
        path: String,
        offset: u64,
        data: Vec<u8>,
    },
    Truncate {
        path: String,
        len: u64,
    },
    Sync {
        path: String,
        began: u64,
    },
    Create {
        path: String,
    },
    Unlink {
        path: String,
    },
    Rename {
        from: String,
        to: String,
    },
    Mkdir {
        path: String,
    },
    Rmdir {
        path: String,
    },
    RangeSync,
}

struct Record {
    index: u64,
    time: u64,
    op: Op,
}

fn read_journal(path: &Path) -> Vec<Record> {
    let bytes = std::fs::read(path).expect("read the journal");
    let mut at = 0usize;
    let mut out = Vec::new();
    let take = |at: &mut usize, n: usize| -> &[u8] {
        let s = &bytes[*at..*at + n];
        *at += n;
        s
    };
    let u64_at = |s: &[u8]| u64::from_ne_bytes(s.try_into().unwrap());
    while at < bytes.len() {
        let op = take(&mut at, 1)[0];
        let index = u64_at(take(&mut at, 8));
        let time = u64_at(take(&mut at, 8));
        let a = u64_at(take(&mut at, 8));
        let b = u64_at(take(&mut at, 8));
        let l1 = u16::from_ne_bytes(take(&mut at, 2).try_into().unwrap()) as usize;
        let p1 = String::from_utf8(take(&mut at, l1).to_vec()).unwrap();
        let l2 = u16::from_ne_bytes(take(&mut at, 2).try_into().unwrap()) as usize;
        let p2 = String::from_utf8(take(&mut at, l2).to_vec()).unwrap();
        let op = match op {
            1 => Op::Write {
                path: p1,
                offset: a,
                data: take(&mut at, b as usize).to_vec(),
            },
            2 => Op::Truncate { path: p1, len: a },
            3 => Op::Sync { path: p1, began: a },
            4 => Op::Create { path: p1 },
            5 => Op::Unlink { path: p1 },
            6 => Op::Rename { from: p1, to: p2 },
            7 => Op::Mkdir { path: p1 },
            8 => Op::Rmdir { path: p1 },
            9 => Op::RangeSync,
            other => panic!("journal record {index} has op {other}"),
        };
        assert_eq!(index, out.len() as u64, "journal records are consecutive");
        out.push(Record { index, time, op });
    }
    out
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Model {
    Strict,
    Torn,
}

#[derive(Default)]
struct Node {
    dir: bool,
    /// (journal index, offset or None for a truncation, data or the new length).
    changes: Vec<(u64, Change)>,
    synced_before: u64,
}

enum Change {
    Write(u64, usize),
    Truncate(u64),
}

fn parent(path: &str) -> &str {
    path.rfind('/').map_or("", |i| &path[..i])
}

/// Renames `from` and, for a directory, every name under it.
fn rename_tree(names: &mut HashMap<String, usize>, from: &str, to: &str) {
    let prefix = format!("{from}/");
    let moved: Vec<String> = names
        .keys()
        .filter(|k| *k == from || k.starts_with(&prefix))
        .cloned()
        .collect();
    for old in moved {
        if let Some(n) = names.remove(&old) {
            names.insert(format!("{to}{}", &old[from.len()..]), n);
        }
    }
}

/// Writes into `out` the directory a power cut after the first `upto` records
/// would leave under `model`.
fn rebuild(records: &[Record], upto: usize, model: Model, rng: &mut Rng, out: &Path) {
    // The watched directory itself existed, durably, before the broker started.
    let mut nodes: Vec<Node> = vec![Node {
        dir: true,
        synced_before: 0,
        ..Default::default()
    }];
    let mut names: HashMap<String, usize> = HashMap::from([(String::new(), 0)]);
    // (journal index, directory node, change to the names).
    let mut renames: Vec<(u64, usize, &Op, usize)> = Vec::new();
    for r in &records[..upto] {
        match &r.op {
            Op::Write { path, .. } | Op::Truncate { path, .. } => {
                let Some(&n) = names.get(path) else {
                    panic!("record {}: {path} changed before it was created", r.index)
                };
                let change = match &r.op {
                    Op::Write { offset, data, .. } => Change::Write(*offset, data.len()),
                    Op::Truncate { len, .. } => Change::Truncate(*len),
                    _ => unreachable!(),
                };
                nodes[n].changes.push((r.index, change));
            }
            Op::Sync { path, began } => {
                if let Some(&n) = names.get(path) {
                    nodes[n].synced_before = nodes[n].synced_before.max(*began);
                }
            }
            Op::Create { path } | Op::Mkdir { path } => {
                nodes.push(Node {
                    dir: matches!(r.op, Op::Mkdir { .. }),
                    ..Default::default()
                });
                let n = nodes.len() - 1;
                names.insert(path.clone(), n);
                renames.push((r.index, names[parent(path)], &r.op, n));
            }
            Op::Unlink { path } | Op::Rmdir { path } => {
                let n = names.remove(path).unwrap_or(usize::MAX);
                renames.push((r.index, names[parent(path)], &r.op, n));
            }
            Op::Rename { from, to } => {
                let n = *names.get(from).expect("renamed file exists");
                rename_tree(&mut names, from, to);
                // A rename within one directory: that directory's sync makes it durable.
                renames.push((r.index, names[parent(to)], &r.op, n));
            }
            Op::RangeSync => {}
        }
    }
    // Which names a cut keeps.
    let durable_names: HashMap<String, usize> = match model {
        Model::Torn => names,
        Model::Strict => {
            let mut d: HashMap<String, usize> = HashMap::from([(String::new(), 0)]);
            for (index, dir, op, n) in renames {
                if nodes[dir].synced_before <= index {
                    continue;
                }
                match op {
                    Op::Create { path } | Op::Mkdir { path } => {
                        d.insert(path.clone(), n);
                    }
                    Op::Unlink { path } | Op::Rmdir { path } => {
                        d.remove(path);
                    }
                    Op::Rename { from, to } => rename_tree(&mut d, from, to),
                    _ => unreachable!(),
                }
            }
            d
        }
    };
    let data_of = |index: u64| match &records[index as usize].op {
        Op::Write { data, .. } => data.as_slice(),
        _ => unreachable!(),
    };
    let mut paths: Vec<(&String, &usize)> = durable_names.iter().collect();
    paths.sort();
    for (path, &n) in paths {
        // A name whose directory a cut loses is lost with it.
        let mut p = parent(path);
        let mut reachable = true;
        while !p.is_empty() {
            if !durable_names.contains_key(p) {
                reachable = false;
            }
            p = parent(p);
        }
        if !reachable {
            continue;
        }
        let target = out.join(path);
        let node = &nodes[n];
        if node.dir {
            std::fs::create_dir_all(&target).unwrap();
            continue;
        }
        let kept = node
            .changes
            .iter()
            .take_while(|(i, _)| *i < node.synced_before)
            .count();
        let extra = match model {
            Model::Strict => 0,
            Model::Torn => rng.below((node.changes.len() - kept) as u64 + 1) as usize,
        };
        let mut content: Vec<u8> = Vec::new();
        for (k, (index, change)) in node.changes[..kept + extra].iter().enumerate() {
            match change {
                Change::Truncate(len) => content.resize(*len as usize, 0),
                Change::Write(offset, len) => {
                    let mut data = &data_of(*index)[..*len];
                    if model == Model::Torn && k + 1 == kept + extra && extra > 0 {
                        let sectors = data.len().div_ceil(512) as u64;
                        let cut = (rng.below(sectors + 1) * 512) as usize;
                        data = &data[..cut.min(data.len())];
                    }
                    let end = *offset as usize + data.len();
                    if content.len() < end {
                        content.resize(end, 0);
                    }
                    content[*offset as usize..end].copy_from_slice(data);
                }
            }
        }
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::write(&target, &content).unwrap();
    }
}

// ---------------------------------------------------------------------------
// What a broker started after the cut must show.

/// The queue's ready count, or None when it does not exist.
async fn ready(conn: &lapin::Connection, queue: &str) -> Option<u32> {
    let ch = channel(conn).await;
    let r = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    if r.is_ok() {
        let _ = ch.close(200, "ok".into()).await;
    }
    r.ok().map(|q| q.message_count())
}

async fn exchange_exists(conn: &lapin::Connection, exchange: &str) -> bool {
    let ch = channel(conn).await;
    let r = ch
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    if r.is_ok() {
        let _ = ch.close(200, "ok".into()).await;
    }
    r.is_ok()
}

/// The `count` messages in `queue`, consumed with acks, 256 unacked at most.
async fn drain(ch: &Channel, queue: &str, count: u32) -> Vec<u64> {
    ok("basic.qos", ch.basic_qos(256, BasicQosOptions::default())).await;
    let mut consumer = ok(
        "basic.consume",
        ch.basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    let mut ids = Vec::new();
    while ids.len() < count as usize {
        let d = match tokio::time::timeout(support::WAIT, consumer.next()).await {
            Ok(Some(Ok(d))) => d,
            other => panic!("{queue}: delivery {} of {count}: {other:?}", ids.len()),
        };
        match parse_body(&d.data) {
            Some(id) => ids.push(id),
            None => panic!(
                "{queue} returned a damaged or foreign body of {} bytes",
                d.data.len()
            ),
        }
        if ids.len() % 128 == 0 || ids.len() == count as usize {
            ok("basic.ack", d.acker.ack(BasicAckOptions { multiple: true })).await;
        }
    }
    ids
}

/// Checks the broker on a directory cut at `cut` (monotonic ns); returns counts
/// for the log line: (messages recovered, confirmed ones that had to be there).
async fn check(url: &str, h: &History, cut: u64, label: &str) -> (usize, usize) {
    let before = |t: Option<u64>| t.is_some_and(|t| t < cut);
    let conn = connect_url(url).await;
    let mut exchanges: Vec<&String> = h.exchanges.keys().collect();
    exchanges.sort();
    for name in exchanges {
        let (sent, ok_at) = h.exchanges[name];
        let deleted = h.exchanges_deleted.get(name);
        let there = exchange_exists(&conn, name).await;
        if before(ok_at) && deleted.is_none_or(|d| d.0 >= cut) {
            assert!(
                there,
                "{label}: exchange {name}, declared (declare-ok) before the cut, is gone"
            );
        }
        if sent >= cut {
            assert!(
                !there,
                "{label}: exchange {name} exists though it was declared after the cut"
            );
        }
        if let Some((_, Some(del_ok))) = deleted {
            if *del_ok < cut {
                assert!(
                    !there,
                    "{label}: exchange {name}, deleted (delete-ok) before the cut, came back"
                );
            }
        }
    }
    let mut present: HashMap<String, Vec<u64>> = HashMap::new();
    let mut queues: Vec<&String> = h.declared.keys().collect();
    queues.sort();
    for q in queues {
        let (sent, ok_at) = h.declared[q];
        let deleted = h.deleted.get(q);
        let count = ready(&conn, q).await;
        let there = count.is_some();
        if before(ok_at) && deleted.is_none_or(|d| d.0 >= cut) {
            assert!(
                there,
                "{label}: queue {q}, declared (declare-ok) before the cut, is gone"
            );
        }
        if sent >= cut {
            assert!(
                !there,
                "{label}: queue {q} exists though it was declared after the cut"
            );
        }
        if let Some((_, Some(del_ok))) = deleted {
            if *del_ok < cut {
                assert!(
                    !there,
                    "{label}: queue {q}, deleted (delete-ok) before the cut, came back"
                );
            }
        }
        if let Some(count) = count {
            let ch = channel(&conn).await;
            present.insert(q.clone(), drain(&ch, q, count).await);
            let _ = ch.close(200, "drained".into()).await;
        }
    }
    let mut recovered = 0;
    let mut promised = 0;
    for (q, ids) in &present {
        recovered += ids.len();
        let mut seen = HashSet::new();
        for id in ids {
            assert!(seen.insert(*id), "{label}: {q} holds message {id} twice");
            let Some((routed, sent, _)) = h.messages.get(id) else {
                panic!("{label}: {q} holds message {id}, never published")
            };
            assert!(
                *sent < cut,
                "{label}: {q} holds message {id}, published after the cut"
            );
            assert!(
                routed.contains(q),
                "{label}: {q} holds message {id}, routed elsewhere"
            );
            if let Some(t) = h.committed_acks.get(&(q.clone(), *id)) {
                assert!(*t >= cut, "{label}: {q} holds message {id}, whose ack a tx.commit-ok covered before the cut");
            }
        }
        for (id, (routed, _, confirmed)) in &h.messages {
            if !routed.contains(q) || !before(*confirmed) {
                continue;
            }
            let gone_from = h.may_be_gone.get(&(q.clone(), *id));
            if gone_from.is_some_and(|t| *t < cut) {
                continue;
            }
            promised += 1;
            assert!(
                seen.contains(id),
                "{label}: message {id}, confirmed before the cut, is missing from {q}"
            );
        }
    }
    // Bindings acknowledged before the cut still route, and those whose unbind-ok
    // came before it do not. A marker's confirm says it was routed.
    let ch = channel(&conn).await;
    ok(
        "confirm.select",
        ch.confirm_select(ConfirmSelectOptions::default()),
    )
    .await;
    for (exchange, queue, key, t) in &h.bound {
        let triple = (exchange.clone(), queue.clone(), key.clone());
        let unbound = h.unbound.get(&triple);
        let exchange_gone = h.exchanges_deleted.get(exchange).is_some_and(|d| d.0 < cut);
        if !present.contains_key(queue) || exchange_gone {
            continue;
        }
        let must_route = *t < cut && unbound.is_none_or(|u| u.0 >= cut);
        let must_not = unbound.is_some_and(|u| before(u.1));
        if !must_route && !must_not {
            continue;
        }
        let marker = format!("marker {exchange} {queue} {key}");
        let confirm = ok(
            "basic.publish",
            ch.basic_publish(
                exchange.as_str().into(),
                key.as_str().into(),
                BasicPublishOptions::default(),
                marker.as_bytes(),
                BasicProperties::default(),
            ),
        )
        .await;
        ok("marker confirm", confirm).await;
        let mut found = false;
        while let Some(m) = ok(
            "basic.get",
            ch.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true }),
        )
        .await
        {
            found |= m.delivery.data == marker.as_bytes();
        }
        if must_route {
            assert!(found, "{label}: binding {exchange} -> {queue} ({key:?}), bound before the cut, no longer routes");
        } else {
            assert!(!found, "{label}: binding {exchange} -> {queue} ({key:?}), unbound (unbind-ok) before the cut, routes again");
        }
    }
    let _ = conn.close(200, "checked".into()).await;
    (recovered, promised)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_state_survives_power_cuts_at_random_moments() {
    let shim = build_shim();
    let root = std::env::temp_dir().join(format!("warrenmq-power-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let config = config_file(&root);
    let journal = root.join("journal");
    let seed = std::env::var("WARRENMQ_POWER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| now_ns() | 1);
    let cuts: usize = std::env::var("WARRENMQ_POWER_CUTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24);
    println!("power-loss seed {seed} (WARRENMQ_POWER_SEED repeats it), {cuts} cuts");

    let h: Shared = Arc::default();
    let started = now_ns();
    let broker = Broker::start_with(&config, &data, |cmd| {
        cmd.env("LD_PRELOAD", &shim)
            .env("WARRENMQ_SHIM_DIR", &data)
            .env("WARRENMQ_SHIM_JOURNAL", &journal);
    });
    let serving = now_ns();
    topology(&broker.url(), &h).await;
    let url = broker.url();
    let tasks = vec![
        tokio::spawn(confirmed_publisher(url.clone(), h.clone(), seed ^ 1)),
        tokio::spawn(tx_publisher(url.clone(), h.clone(), seed ^ 2)),
        tokio::spawn(acking_consumer(url.clone(), h.clone())),
        tokio::spawn(tx_acker(url.clone(), h.clone())),
        tokio::spawn(churn(url.clone(), h.clone(), seed ^ 3)),
    ];
    tokio::time::sleep(RUN).await;
    drop(broker); // SIGKILL
    for t in tasks {
        let _ = t.await;
    }
    let h = Arc::new(Arc::into_inner(h).unwrap().into_inner().unwrap());
    let records = read_journal(&journal);
    let confirmed = h.messages.values().filter(|m| m.2.is_some()).count();
    println!(
        "run: {} messages published, {confirmed} confirmed or committed, {} acks committed, {} queues declared, {} deleted; journal: {} records, {} syncs, {} MB",
        h.messages.len(),
        h.committed_acks.len(),
        h.declared.len(),
        h.deleted.len(),
        records.len(),
        records.iter().filter(|r| matches!(r.op, Op::Sync { .. })).count(),
        std::fs::metadata(&journal).unwrap().len() / 1_000_000
    );
    assert!(confirmed > 100, "the run confirmed too little to test");
    assert!(
        records
            .iter()
            .any(|r| matches!(&r.op, Op::Unlink { path } if path.ends_with(".seg"))),
        "the run deleted no body log segment"
    );

    // Moments: right after each sync of start-up (a fresh directory made,
    // its database put in place: each durable state it passes through, which
    // random moments hit only now and then), random ones over the run, and
    // the very end.
    let end = records.last().map_or(started, |r| r.time);
    let mut rng = Rng(seed);
    let mut moments: Vec<u64> = records
        .iter()
        .filter(|r| r.time < serving && matches!(r.op, Op::Sync { .. }))
        .map(|r| r.time)
        .collect();
    println!("{} cuts at start-up's syncs", moments.len());
    moments.extend((1..cuts).map(|_| started + rng.below(end - started + 1)));
    moments.push(end + 1);
    moments.sort_unstable();
    let times: Vec<u64> = records.iter().map(|r| r.time).collect();
    let mut by_model: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for (i, cut) in moments.into_iter().enumerate() {
        let upto = times.partition_point(|t| *t <= cut);
        let model = if i % 2 == 0 {
            Model::Strict
        } else {
            Model::Torn
        };
        let label = format!(
            "cut {i} ({model:?}, {:.3} s into the run, after record {upto})",
            (cut - started) as f64 / 1e9
        );
        let dir = root.join(format!("cut{i}"));
        let tears = rng.clone();
        rebuild(&records, upto, model, &mut rng, &dir);
        let broker = Broker::start(&config, &dir);
        let checked = tokio::spawn({
            let (url, h, label) = (broker.url(), h.clone(), label.clone());
            async move { check(&url, &h, cut, &label).await }
        })
        .await;
        drop(broker);
        let (recovered, promised) = match checked {
            Ok(counts) => counts,
            Err(e) => {
                // The check changed the directory; keep it as the cut left it.
                let kept = root.join(format!("cut{i}-as-rebuilt"));
                rebuild(&records, upto, model, &mut tears.clone(), &kept);
                eprintln!(
                    "{label} failed; the directory it started from: {}",
                    kept.display()
                );
                std::panic::resume_unwind(e.into_panic());
            }
        };
        println!("{label}: started; {recovered} messages recovered, all {promised} promised ones among them");
        let e = by_model
            .entry(if model == Model::Strict {
                "strict"
            } else {
                "torn"
            })
            .or_default();
        e.0 += 1;
        e.1 += promised;
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!("power cuts survived: {by_model:?} (cuts, promised messages checked)");
    let _ = std::fs::remove_dir_all(&root);
}
