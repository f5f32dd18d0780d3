//! The store on sled. Two trees: `meta` holds one key per entity; `index` a
//! queue's message entries in chunks of 256 sequence numbers (`index.rs`), keyed
//! big-endian so a prefix scan reads a queue in order. Few trees, because many
//! trees inflate sled's disk use. A message's entry is small: when it was stored
//! and where its body is in the body log (`log.rs`), which holds each body once
//! however many queues hold it. Older directories, with a key per entry in
//! `messages` (and, in the first format, the body inline), are moved into chunks
//! at start-up.
//!
//! One thread owns every write: callers send requests over a channel and go on.
//! The thread takes whatever has queued up and applies it in order: bodies and
//! then the batch's index changes go to the log, entities to sled. If any waiter
//! asked for a sync, it fdatasyncs the log (and flushes sled only if entities
//! changed), then releases them all. Under load one fdatasync covers thousands of
//! messages; alone, a publisher waits about one. The index changes reach sled at
//! checkpoints (`index.rs`): sled's flush timer is off, so sled only ever holds
//! what the log already made durable. Reads of paged-out messages go through the
//! same thread, so they see every write made before them.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amq_protocol::frame::WriteContext;
use amq_protocol::types::generation::gen_field_table;
use amq_protocol::types::FieldTable;
use bytes::Bytes;

use super::blobs::Blobs;
use super::index::{
    self, at, Entry, FoldMap, Index, Key, Known, ENTRY_LEN, IN_LOG, IN_LOG_NO_META,
};
use super::log::{self as body_log, segment_path, BodyLog, Location, Position, Segments};
use super::reserve::Reserve;
use super::{
    wall_ms, EntryMeta, MessageRecord, ReadBack, ReadDone, Store, StoreError, StoredBinding,
    StoredDestination, StoredEntries, StoredEntry, StoredExchange, StoredMessage, StoredMessages,
    StoredQueue, SyncWaiter, UnreadableMessage,
};

/// A request to the store's thread.
enum Op {
    PutMeta(Vec<u8>, Vec<u8>),
    DeleteMeta(Vec<u8>),
    PutMessage {
        key: Key,
        stored_at: u64,
        m: MessageRecord,
    },
    DeleteMessage(Key),
    DeleteMessageSeqs(u64, Vec<u64>),
    DeleteQueueMessages(u64),
    Read {
        queue: u64,
        seqs: Vec<u64>,
        done: ReadDone,
    },
    Sync(SyncWaiter),
    /// Answered once sled holds every index change made before it.
    Checkpoint(mpsc::Sender<()>),
}

pub struct SledStore {
    dir: PathBuf,
    meta: sled::Tree,
    chunks: sled::Tree,
    segments: Arc<Segments>,
    ops: Mutex<Option<mpsc::Sender<Op>>>,
    /// Held across the allocation and its record's request, so that the record
    /// on disk always ends above every id handed out.
    next_queue_id: Mutex<u64>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Set while writes fail, or while the space kept for a full disk is given
    /// up (`reserve.rs`): publishers are blocked, as by the disk alarm.
    alarm: Arc<AtomicBool>,
    _lock: File,
}

const EXCHANGE: u8 = b'x';
const QUEUE: u8 = b'q';
const BINDING: u8 = b'b';
const NOTE: u8 = b'n';
const NEXT_QUEUE_ID: &[u8] = b"next-queue-id";
const FORMAT: &[u8] = b"format";
/// Format 2 added the body log, format 3 the index changes in it (replayed from
/// `CHECKPOINT`) and the chunked index, format 4 chunks written as differences
/// (`chunk.rs`; a format-3 directory is read as it is, its chunks rewritten as
/// checkpoints touch them, and marked format 4 at once, so that an older broker
/// refuses it rather than skip the chunks it cannot read). A format-1 or 2
/// directory's sled holds its whole index, a key per entry: it is moved into
/// chunks (`migrate`) and marked format 4.
const FORMAT_VERSION: &[u8] = b"warrenmq-store-4";
const FORMAT_3: &[u8] = b"warrenmq-store-3";
const FORMAT_2: &[u8] = b"warrenmq-store-2";
const FORMAT_1: &[u8] = b"warrenmq-store-1";
/// The log position up to which sled holds the index: segment (u32) and
/// offset (u64), big-endian.
const CHECKPOINT: &[u8] = b"checkpoint";
/// A write nobody waits for is made durable within this, as sled's own flush
/// timer did before the index moved to the log.
const COMMIT_AFTER: Duration = Duration::from_millis(500);
/// A checkpoint comes once this much log would be replayed at start-up, once
/// the overlay holds this many entries, or after a second without requests.
const CHECKPOINT_BYTES: u64 = 32 * 1024 * 1024;
const CHECKPOINT_ENTRIES: usize = 100_000;
/// Requests (and messages of a batch) the store's thread takes in one round
/// before it writes the round's index record, commits if asked and checks
/// whether a checkpoint is due.
const ROUND_CHANGES: usize = 16_384;
const CHECKPOINT_IDLE: Duration = Duration::from_secs(1);
/// Dead segments waiting for a checkpoint before one is made for them.
const CHECKPOINT_DEAD_SEGMENTS: usize = 2;
/// The body log's segment size: a segment is deleted whole once nothing points
/// into it, so this bounds what a few old messages can keep on disk per segment.
const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Free bytes the data directory's file system must have before sled writes
/// (a checkpoint, or entities): sled cannot recover from a failed write until
/// the next start, so it never gets near one.
const SLED_HEADROOM: u64 = 4 * 1024 * 1024;
/// Entry versions in the `messages` tree.
const INLINE: u8 = 1;

fn put_str(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    out.extend_from_slice(&(b.len() as u16).to_be_bytes());
    out.extend_from_slice(b);
}

fn encode_table(t: &FieldTable) -> Vec<u8> {
    gen_field_table(t)(WriteContext::from(Vec::new()))
        .map(|c| c.write)
        .unwrap_or_default()
}

/// Reads back what `put_str` and friends wrote; every read is checked.
struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.b.len() < n {
            return Err("record is truncated".into());
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        Ok(u64::from_be_bytes(b.try_into().map_err(|_| "bad u64")?))
    }
    fn str(&mut self) -> Result<String, String> {
        let n = self.take(2)?;
        let n = u16::from_be_bytes([n[0], n[1]]) as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| "name is not UTF-8".to_string())
    }
    fn table(&mut self) -> Result<FieldTable, String> {
        match crate::protocol::decode_stored_table(self.b) {
            Some((rest, t)) => {
                self.b = rest;
                Ok(t)
            }
            None => Err("unreadable arguments table".into()),
        }
    }
}

fn exchange_key(vhost: &str, name: &str) -> Vec<u8> {
    let mut k = vec![EXCHANGE];
    put_str(&mut k, vhost);
    put_str(&mut k, name);
    k
}

fn note_key(name: &str) -> Vec<u8> {
    let mut k = vec![NOTE];
    put_str(&mut k, name);
    k
}

fn queue_key(vhost: &str, name: &str) -> Vec<u8> {
    let mut k = vec![QUEUE];
    put_str(&mut k, vhost);
    put_str(&mut k, name);
    k
}

fn binding_key(
    vhost: &str,
    source: &str,
    dest: &StoredDestination,
    rk: &str,
    args: &FieldTable,
) -> Vec<u8> {
    let mut k = vec![BINDING];
    put_str(&mut k, vhost);
    put_str(&mut k, source);
    match dest {
        StoredDestination::Queue(q) => {
            k.push(b'q');
            put_str(&mut k, q);
        }
        StoredDestination::Exchange(x) => {
            k.push(b'x');
            put_str(&mut k, x);
        }
    }
    put_str(&mut k, rk);
    k.extend_from_slice(&encode_table(args));
    k
}

fn message_key(queue: u64, seq: u64) -> Key {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&queue.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

impl SledStore {
    /// Set while the store cannot write, or has given up the space it keeps
    /// for a full disk: the broker blocks publishers meanwhile.
    pub fn write_alarm(&self) -> Arc<AtomicBool> {
        self.alarm.clone()
    }

    pub fn open(dir: &Path) -> Result<Arc<SledStore>, StoreError> {
        Self::open_with(dir, SEGMENT_BYTES)
    }

    /// `open` with message body log segments of `segment_bytes` (`limits.segment_size`).
    pub fn open_with(dir: &Path, segment_bytes: u64) -> Result<Arc<SledStore>, StoreError> {
        let io = |what: &'static str| {
            let dir = dir.to_path_buf();
            move |source| StoreError::Io { dir, what, source }
        };
        std::fs::create_dir_all(dir).map_err(io("cannot create it"))?;
        let lock =
            File::create(dir.join("warrenmq.lock")).map_err(io("cannot create the lock file"))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Locked(dir.to_path_buf()))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io("cannot lock the lock file")(e)),
        }
        if dir.join("db").join("db").exists() {
            wait_for_sled(&dir.join("db").join("db")).map_err(io("cannot open the database"))?;
        } else {
            create_database(dir).map_err(io("cannot create the database"))?;
        }
        let db = sled::Config::new()
            .path(dir.join("db"))
            // Entities and the index's chunks, written at checkpoints and read
            // back by acks of messages already checkpointed: a small cache does.
            .cache_capacity(16 * 1024 * 1024)
            // sled must never persist an index change before the log has it.
            .flush_every_ms(None)
            .open()
            .map_err(|source| StoreError::Open {
                dir: dir.to_path_buf(),
                source,
            })?;
        let open = |name: &str| {
            db.open_tree(name).map_err(|source| StoreError::Open {
                dir: dir.to_path_buf(),
                source,
            })
        };
        let meta = open("meta")?;
        // Formats 1 and 2 kept a key per entry here; emptied into `index` at once.
        let messages = open("messages")?;
        let chunks = open("index")?;
        // sled drops what it cannot read as if it were a torn write. A database that
        // was there but lost even its format record is corrupt, not empty: refuse it.
        let replay_from = match meta.get(FORMAT)? {
            Some(v) if v.as_ref() == FORMAT_VERSION || v.as_ref() == FORMAT_3 => {
                match meta.get(CHECKPOINT)? {
                    Some(p) => Some(decode_position(&p).ok_or_else(|| StoreError::Corrupt {
                        dir: dir.to_path_buf(),
                        key: "checkpoint".into(),
                        why: format!("it is {} bytes long instead of 12", p.len()),
                    })?),
                    // Written with the format at the first start, before anything
                    // could be logged.
                    None => None,
                }
            }
            Some(v) if v.as_ref() == FORMAT_1 || v.as_ref() == FORMAT_2 => None,
            Some(v) => {
                return Err(StoreError::Corrupt {
                    dir: dir.to_path_buf(),
                    key: "format".into(),
                    why: format!("unknown format {:?}", String::from_utf8_lossy(&v)),
                })
            }
            // A database is only ever put in place with its format record, synced.
            None => {
                return Err(StoreError::Corrupt {
                    dir: dir.to_path_buf(),
                    key: "format".into(),
                    why: "the database exists but its format record is missing or unreadable"
                        .into(),
                })
            }
        };
        let msgs = dir.join("msgs");
        let next = next_queue_id(dir, &meta)?;
        // sled syncs none of its blob files nor any directory: the store thread does.
        let mut blobs = Blobs::open(dir).map_err(io("cannot sync the database's files"))?;
        // sled keeps its log in one file, `db`; this handle is only for fdatasync.
        let file = match File::open(dir.join("db").join("db")) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!("cannot open the database file for fdatasync: {e}; confirms rely on sled's flush alone");
                None
            }
        };
        let mut log =
            BodyLog::open(&msgs, segment_bytes).map_err(io("cannot open the message body log"))?;
        if let Some(from) = replay_from {
            replay_index(dir, &msgs, from, &chunks)?;
        }
        if !messages.is_empty() {
            let started = Instant::now();
            let n = migrate(&messages, &chunks, &mut log).map_err(|why| {
                io("cannot move the message index into chunks")(std::io::Error::other(why))
            })?;
            tracing::info!(
                "moved {n} stored message entries into the chunked index in {:.3} s",
                started.elapsed().as_secs_f64()
            );
        }
        // How many entries point into each body segment: the ones nothing points
        // into are deleted after the checkpoint below. An entry whose record ends
        // past its segment's end lost its body (a disk that dropped written data:
        // the store gives sled an entry only after its body's sync), so it goes.
        let mut live: HashMap<u32, u64> = HashMap::new();
        let mut sizes: HashMap<u32, u64> = HashMap::new();
        let mut torn = Index::default();
        let mut n_torn = 0usize;
        for kv in chunks.iter() {
            let (ck, v) = kv?;
            let entries = match index::chunk_entries(&ck, &v) {
                Ok(entries) => entries,
                Err(why) => {
                    tracing::error!(
                        "an unreadable chunk of the message index ({why}, key {ck:?}): its messages are skipped; it stays on disk"
                    );
                    continue;
                }
            };
            for (seq, entry) in entries {
                let Some(loc) = in_log(&entry) else { continue };
                let size = *sizes.entry(loc.seg).or_insert_with(|| {
                    std::fs::metadata(segment_path(&msgs, loc.seg))
                        .map(|m| m.len())
                        .unwrap_or(0)
                });
                if u64::from(loc.offset) + u64::from(loc.len) > size {
                    let queue = u64::from_be_bytes(ck[..8].try_into().unwrap_or_default());
                    torn.remove(message_key(queue, seq), || Some(entry));
                    n_torn += 1;
                    continue;
                }
                *live.entry(loc.seg).or_default() += 1;
            }
        }
        if n_torn > 0 {
            tracing::warn!(
                "{n_torn} stored messages lost their bodies (the body log is shorter than their entries say); removed"
            );
            torn.clear_pending();
            torn.drain_into(&chunks)
                .map_err(|why| io("cannot remove entries")(std::io::Error::other(why)))?;
        }
        log.count_live(live);
        // What was replayed is in sled now: the checkpoint moves to the new
        // segment, so no later start reads the old ones' index records or a tail
        // this crash tore, and segments nothing points into can go.
        let pos = log.position();
        meta.insert(CHECKPOINT, &encode_position(pos)[..])?;
        meta.insert(FORMAT, FORMAT_VERSION)?;
        flush_db(&db, &mut blobs, file.as_ref())
            .map_err(|why| io("cannot write the checkpoint")(std::io::Error::other(why)))?;
        log.checkpointed(pos);
        log.collect();
        let segments = log.segments.clone();
        let (tx, rx) = mpsc::channel();
        let alarm = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            db,
            meta: meta.clone(),
            chunks: chunks.clone(),
            file,
            blobs,
            log,
            index: Index::default(),
            bodies: Bodies::default(),
            sled_dirty: false,
            unsynced: false,
            last_commit: Instant::now(),
            failed: None,
            complained: None,
            reserve: Reserve::open(dir),
            commit_failed: false,
            alarm: alarm.clone(),
            dir: dir.to_path_buf(),
            chunk_cache: ChunkCache::default(),
        };
        let thread = std::thread::Builder::new()
            .name("warrenmq-store".into())
            .spawn(move || writer.run(rx))
            .map_err(io("cannot start the store thread"))?;
        Ok(Arc::new(SledStore {
            dir: dir.to_path_buf(),
            meta,
            chunks,
            segments,
            ops: Mutex::new(Some(tx)),
            next_queue_id: Mutex::new(next),
            thread: Mutex::new(Some(thread)),
            alarm,
            _lock: lock,
        }))
    }

    fn corrupt(&self, key: &[u8], why: String) -> StoreError {
        StoreError::Corrupt {
            dir: self.dir.clone(),
            key: format!("{key:?}"),
            why,
        }
    }

    fn send(&self, op: Op) {
        let ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        let refused = match ops.as_ref() {
            Some(tx) => tx.send(op).err().map(|e| e.0),
            None => Some(op),
        };
        drop(ops);
        match refused {
            Some(Op::Sync(w)) => w(Err("the store is shut down".into())),
            Some(Op::Read { seqs, done, .. }) => done(
                seqs.into_iter()
                    .map(|s| (s, Err("the store is shut down".to_string())))
                    .collect(),
            ),
            _ => {}
        }
    }

    /// Waits until sled holds every index change requested before: what reads
    /// sled's index directly (start-up's scans, a vhost made while running)
    /// must see them. Nothing to do at start-up, when nothing was written yet.
    fn settle(&self) {
        let (tx, rx) = mpsc::channel();
        self.send(Op::Checkpoint(tx));
        let _ = rx.recv();
    }

    /// The store's thread, to wait for: it ends once the store is dropped, after
    /// applying and syncing whatever it was sent.
    pub fn take_thread(&self) -> Option<std::thread::JoinHandle<()>> {
        self.thread.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Every meta record under one tag, parsed; an unreadable one is corruption.
    fn scan_meta<T>(
        &self,
        tag: u8,
        parse: impl Fn(&mut Reader<'_>, &mut Reader<'_>) -> Result<T, String>,
    ) -> Result<Vec<T>, StoreError> {
        let mut out = Vec::new();
        for kv in self.meta.scan_prefix([tag]) {
            let (k, v) = kv?;
            let parsed = parse(&mut Reader { b: &k[1..] }, &mut Reader { b: &v });
            out.push(parsed.map_err(|why| self.corrupt(&k, why))?);
        }
        Ok(out)
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

impl Store for SledStore {
    fn dir(&self) -> &Path {
        &self.dir
    }

    fn sync(&self, waiter: SyncWaiter) {
        self.send(Op::Sync(waiter));
    }

    fn new_queue_id(&self) -> Result<u64, StoreError> {
        // Two vhosts may declare at once; without the lock their record writes could
        // be requested out of order and leave the stored counter at an id already
        // given out.
        let mut next = self.next_queue_id.lock().unwrap_or_else(|p| p.into_inner());
        let id = *next;
        self.send(Op::PutMeta(
            NEXT_QUEUE_ID.to_vec(),
            (id + 1).to_be_bytes().to_vec(),
        ));
        *next = id + 1;
        Ok(id)
    }

    fn put_exchange(&self, vhost: &str, x: &StoredExchange) {
        // Version 2 carries a delayed exchange's message id; others stay version 1.
        let mut v = match x.messages_id {
            None => vec![1u8, x.kind, x.auto_delete as u8, x.internal as u8],
            Some(id) => {
                let mut v = vec![2u8, x.kind, x.auto_delete as u8, x.internal as u8];
                v.extend_from_slice(&id.to_be_bytes());
                v
            }
        };
        v.extend_from_slice(&encode_table(&x.arguments));
        self.send(Op::PutMeta(exchange_key(vhost, &x.name), v));
    }

    fn delete_exchange(&self, vhost: &str, name: &str) {
        self.send(Op::DeleteMeta(exchange_key(vhost, name)));
    }

    fn put_queue(&self, q: &StoredQueue) {
        let mut v = vec![1u8];
        v.extend_from_slice(&q.id.to_be_bytes());
        v.push(q.auto_delete as u8);
        v.extend_from_slice(&encode_table(&q.arguments));
        self.send(Op::PutMeta(queue_key(&q.vhost, &q.name), v));
    }

    fn delete_queue(&self, vhost: &str, name: &str, id: u64) {
        self.send(Op::DeleteMeta(queue_key(vhost, name)));
        self.send(Op::DeleteQueueMessages(id));
    }

    fn put_binding(&self, b: &StoredBinding) {
        let key = binding_key(
            &b.vhost,
            &b.source,
            &b.destination,
            &b.routing_key,
            &b.arguments,
        );
        self.send(Op::PutMeta(key, vec![1u8]));
    }

    fn delete_binding(&self, b: &StoredBinding) {
        self.send(Op::DeleteMeta(binding_key(
            &b.vhost,
            &b.source,
            &b.destination,
            &b.routing_key,
            &b.arguments,
        )));
    }

    fn put_message(&self, queue: u64, seq: u64, m: MessageRecord) {
        // When it was stored, so that TTLs keep running across a restart.
        self.send(Op::PutMessage {
            key: message_key(queue, seq),
            stored_at: wall_ms(),
            m,
        });
    }

    fn delete_message(&self, queue: u64, seq: u64) {
        self.send(Op::DeleteMessage(message_key(queue, seq)));
    }

    fn delete_message_seqs(&self, queue: u64, seqs: Vec<u64>) {
        self.send(Op::DeleteMessageSeqs(queue, seqs));
    }

    fn delete_messages(&self, queue: u64) {
        self.send(Op::DeleteQueueMessages(queue));
    }

    fn read_messages(&self, queue: u64, seqs: Vec<u64>, done: ReadDone) {
        self.send(Op::Read { queue, seqs, done });
    }

    fn exchanges(&self) -> Result<Vec<StoredExchange>, StoreError> {
        self.scan_meta(EXCHANGE, |key, r| {
            let (vhost, name) = (key.str()?, key.str()?);
            let version = r.u8()?;
            if !matches!(version, 1 | 2) {
                return Err("unknown record version".to_string());
            }
            let kind = r.u8()?;
            let (auto_delete, internal) = (r.u8()? != 0, r.u8()? != 0);
            let messages_id = if version == 2 { Some(r.u64()?) } else { None };
            Ok(StoredExchange {
                vhost,
                name,
                kind,
                auto_delete,
                internal,
                messages_id,
                arguments: r.table()?,
            })
        })
    }

    fn put_note(&self, name: &str, value: Vec<u8>) {
        self.send(Op::PutMeta(note_key(name), value));
    }

    fn note(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.meta.get(note_key(name))?.map(|v| v.to_vec()))
    }

    fn queues(&self) -> Result<Vec<StoredQueue>, StoreError> {
        self.scan_meta(QUEUE, parse_queue)
    }

    /// A binding is all key: the value is a placeholder.
    fn bindings(&self) -> Result<Vec<StoredBinding>, StoreError> {
        self.scan_meta(BINDING, |key, _| {
            let vhost = key.str()?;
            let source = key.str()?;
            let destination = match key.u8()? {
                b'q' => StoredDestination::Queue(key.str()?),
                b'x' => StoredDestination::Exchange(key.str()?),
                _ => return Err("unknown binding destination".to_string()),
            };
            Ok(StoredBinding {
                vhost,
                source,
                destination,
                routing_key: key.str()?,
                arguments: key.table()?,
            })
        })
    }

    fn entries<'a>(
        &'a self,
        queue: u64,
        mut load: Box<dyn FnMut(usize) -> bool + 'a>,
    ) -> StoredEntries<'a> {
        self.settle();
        Box::new(self.scan_chunks(queue).map(move |e| {
            Ok(e?.and_then(|(seq, entry)| {
                parse_start_entry(seq, &entry, &self.segments, &mut *load).map_err(|why| {
                    UnreadableMessage {
                        seq: Some(seq),
                        why,
                    }
                })
            }))
        }))
    }

    fn messages(&self, queue: u64) -> StoredMessages<'_> {
        self.settle();
        Box::new(self.scan_chunks(queue).map(move |e| {
            Ok(e?.and_then(|(seq, entry)| {
                parse_entry(seq, &entry, |loc| self.segments.read(loc)).map_err(|why| {
                    UnreadableMessage {
                        seq: Some(seq),
                        why,
                    }
                })
            }))
        }))
    }
}

/// An entry with its sequence number as a chunk scan yields it.
type ScannedEntry = Result<Result<(u64, Entry), UnreadableMessage>, StoreError>;

impl SledStore {
    /// A queue's entries from its chunks, in order; an unreadable chunk is one
    /// unreadable item (its messages cannot be told apart).
    fn scan_chunks(&self, queue: u64) -> impl Iterator<Item = ScannedEntry> + '_ {
        self.chunks
            .scan_prefix(queue.to_be_bytes())
            .flat_map(|kv| -> Vec<ScannedEntry> {
                match kv {
                    Err(e) => vec![Err(e.into())],
                    Ok((ck, v)) => match index::chunk_entries(&ck, &v) {
                        Ok(entries) => entries.into_iter().map(|e| Ok(Ok(e))).collect(),
                        Err(why) => vec![Ok(Err(UnreadableMessage {
                            seq: None,
                            why: format!("a chunk of the message index is unreadable: {why}"),
                        }))],
                    },
                }
            })
    }
}

/// The store's thread and what it owns.
struct Writer {
    db: sled::Db,
    meta: sled::Tree,
    /// The message index's chunks (`index.rs`).
    chunks: sled::Tree,
    file: Option<File>,
    blobs: Blobs,
    log: BodyLog,
    /// Index changes since the last checkpoint.
    index: Index,
    /// The current batch's bodies (kept to reuse its table).
    bodies: Bodies,
    /// sled holds entity changes that no flush made durable.
    sled_dirty: bool,
    /// Something was written since the last commit.
    unsynced: bool,
    last_commit: Instant,
    /// A request that failed since the last commit (sled refused it): that
    /// commit fails, and none of its waiters is released as done, as the broker
    /// cannot tell whose request it was. (A failed log write needs no note
    /// here: the log keeps what it could not write and fails its syncs until
    /// the write succeeds.)
    failed: Option<String>,
    /// When the store last logged a failed commit or a put-off checkpoint:
    /// a full disk fails every commit, and one line every few seconds says so.
    complained: Option<Instant>,
    /// Space kept for a full disk.
    reserve: Reserve,
    /// The last commit failed.
    commit_failed: bool,
    /// Shared with `SledStore::write_alarm`.
    alarm: Arc<AtomicBool>,
    /// The data directory, for the free space sled needs before it writes.
    dir: PathBuf,
    /// The chunk sled's entries were last looked up in.
    chunk_cache: ChunkCache,
}

/// The last chunk an entry was looked up in, decoded. Acks and page-in reads
/// after a restart walk a queue's chunks in order, and a chunk is decoded whole
/// to find one entry (`chunk.rs`): one decode serves its 256 entries. Cleared
/// before a checkpoint writes chunks, the only time sled's chunks change while
/// the broker runs.
#[derive(Default)]
struct ChunkCache {
    key: Option<[u8; 16]>,
    items: Vec<(u8, Entry)>,
}

impl ChunkCache {
    fn lookup(&mut self, chunks: &sled::Tree, key: &Key) -> sled::Result<Option<Entry>> {
        let ck = index::chunk_key(key);
        if self.key != Some(ck) {
            self.key = None;
            self.items = match chunks.get(ck)? {
                // An unreadable chunk was reported at start-up; none of its entries is served.
                Some(v) => index::chunk_items(&v).unwrap_or_default(),
                None => Vec::new(),
            };
            self.key = Some(ck);
        }
        let low = key[15];
        Ok(self
            .items
            .binary_search_by_key(&low, |(l, _)| *l)
            .ok()
            .map(|i| self.items[i].1))
    }

    fn clear(&mut self) {
        self.key = None;
        self.items = Vec::new();
    }
}

/// The bodies one batch wrote, by the address of their shared buffers: a fanout
/// hands every queue the same `Bytes`, which is then written once. The records
/// are kept until the batch ends, so that no other body can reuse an address
/// meanwhile.
type Bodies = FoldMap<(usize, usize, usize, usize), (Location, MessageRecord)>;

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Op>) {
        let mut last_request = Instant::now();
        loop {
            let first = match rx.recv_timeout(Duration::from_millis(250)) {
                Ok(op) => op,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.idle(last_request.elapsed());
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            last_request = Instant::now();
            let mut waiters = Vec::new();
            let mut bodies = std::mem::take(&mut self.bodies);
            // A round takes what is queued, up to ROUND_CHANGES: a burst (a purge
            // of millions) then goes through rounds, each followed by the
            // checkpoint check, so the index's overlay stays bounded.
            let mut changes = 0usize;
            for op in std::iter::once(first).chain(rx.try_iter()) {
                match op {
                    Op::PutMessage { key, stored_at, m } => {
                        self.put(&mut bodies, key, stored_at, m)
                    }
                    Op::DeleteMessage(key) => self.delete(key),
                    Op::DeleteMessageSeqs(queue, seqs) => {
                        changes += seqs.len();
                        for seq in seqs {
                            self.delete(message_key(queue, seq));
                        }
                    }
                    Op::Sync(w) => waiters.push(w),
                    other => self.other(other),
                }
                changes += 1;
                if changes >= ROUND_CHANGES {
                    break;
                }
            }
            bodies.clear();
            self.bodies = bodies;
            self.write_index();
            if !waiters.is_empty() || (self.unsynced && self.last_commit.elapsed() >= COMMIT_AFTER)
            {
                let result = self.commit();
                for w in waiters {
                    w(result.clone());
                }
            }
            if self.index.len() >= CHECKPOINT_ENTRIES
                || self.log.since_checkpoint() >= CHECKPOINT_BYTES
                || self.log.dead_waiting() >= CHECKPOINT_DEAD_SEGMENTS
            {
                self.checkpoint();
            }
        }
        // Senders are gone: everything goes to disk, and into sled, so that the
        // next start has nothing to replay.
        self.checkpoint();
    }

    /// No request for a while: what nobody waited for is made durable, and once
    /// the store has been quiet for `CHECKPOINT_IDLE`, checkpointed.
    fn idle(&mut self, quiet: Duration) {
        if self.reserve.released() {
            // Space freed by someone else: the reserve, then publishers, come back.
            self.reserve.take_if_room(&self.dir);
            self.sound_alarm();
        }
        if self.unsynced && self.last_commit.elapsed() >= COMMIT_AFTER {
            let _ = self.commit();
        }
        if quiet >= CHECKPOINT_IDLE
            && (!self.index.is_empty()
                || self.log.since_checkpoint() > 0
                || self.log.dead_waiting() > 0)
        {
            self.checkpoint();
        }
    }

    fn fail(&mut self, e: impl std::fmt::Display) {
        tracing::error!("store write failed: {e}");
        if self.failed.is_none() {
            self.failed = Some(format!("store write failed: {e}"));
        }
    }

    /// A message's entry, its body appended to the log unless this batch already
    /// wrote the same body for another queue (a fanout: the same `Bytes`).
    fn put(&mut self, bodies: &mut Bodies, key: Key, stored_at: u64, m: MessageRecord) {
        let meta = EntryMeta {
            priority: m.priority,
            ttl: m.ttl,
            size: m.body.len(),
        };
        let same = (
            m.body.as_ptr() as usize,
            m.body.len(),
            m.header.as_ptr() as usize,
            m.header.len(),
        );
        let loc = match bodies.get(&same) {
            Some((loc, _)) => {
                self.log.add_ref(loc.seg);
                *loc
            }
            None => {
                match append_message(
                    &mut self.log,
                    &m.exchange,
                    &m.routing_key,
                    &m.header,
                    &m.body,
                ) {
                    Ok(loc) => {
                        bodies.insert(same, (loc, m));
                        loc
                    }
                    Err(e) => return self.fail(format!("writing the body log: {e}")),
                }
            }
        };
        self.unsynced = true;
        if let Some(old) = self.index.put(key, encode_entry(stored_at, loc, meta)) {
            if let Some(old) = in_log(&old) {
                self.log.release(old.seg);
            }
        }
    }

    /// Removes a message's entry; its body segment loses a reference.
    fn delete(&mut self, key: Key) {
        let (chunks, cache) = (&self.chunks, &mut self.chunk_cache);
        let mut error = None;
        let removed = self.index.remove(key, || match cache.lookup(chunks, &key) {
            Ok(entry) => entry,
            Err(e) => {
                error = Some(e);
                None
            }
        });
        if let Some(e) = error {
            self.fail(e);
        }
        if let Some(loc) = removed.as_ref().and_then(|e| in_log(e)) {
            self.log.release(loc.seg);
        }
        self.unsynced = true;
    }

    /// The batch's index changes, as one record after its bodies.
    fn write_index(&mut self) {
        if let Some(record) = self.index.pending() {
            let written = self.log.append_index(record);
            self.index.clear_pending();
            if let Err(e) = written {
                self.fail(format!("writing the body log: {e}"));
            }
            self.unsynced = true;
        }
    }

    fn other(&mut self, op: Op) {
        let r = match op {
            Op::PutMeta(k, v) => self.meta.insert(k, v).map(|_| ()),
            Op::DeleteMeta(k) => self.meta.remove(k).map(|_| ()),
            Op::DeleteQueueMessages(id) => {
                // Logged; sled's chunks change at the next checkpoint.
                let r = self.drop_queue(id);
                self.unsynced = true;
                if let Err(e) = r {
                    self.fail(e);
                }
                return;
            }
            Op::Read { queue, seqs, done } => {
                done(self.read(queue, seqs));
                return;
            }
            Op::Checkpoint(done) => {
                self.write_index();
                self.checkpoint();
                let _ = done.send(());
                return;
            }
            Op::PutMessage { .. }
            | Op::DeleteMessage(_)
            | Op::DeleteMessageSeqs(..)
            | Op::Sync(_) => Ok(()),
        };
        self.sled_dirty = true;
        self.unsynced = true;
        if let Err(e) = r {
            self.fail(e);
        }
    }

    /// Every entry of a queue goes: logged as one change, removed from sled at
    /// the next checkpoint, and each entry's segment loses its reference now.
    fn drop_queue(&mut self, id: u64) -> sled::Result<()> {
        let (put, removed) = self.index.drop_queue(id);
        for e in put {
            if let Some(loc) = in_log(&e) {
                self.log.release(loc.seg);
            }
        }
        // Removed since the checkpoint: released then.
        let removed: HashSet<Key> = removed.into_iter().collect();
        for kv in self.chunks.scan_prefix(id.to_be_bytes()) {
            let (ck, v) = kv?;
            let Ok(entries) = index::chunk_entries(&ck, &v) else {
                continue;
            };
            for (seq, entry) in entries {
                if !removed.contains(&message_key(id, seq)) {
                    if let Some(loc) = in_log(&entry) {
                        self.log.release(loc.seg);
                    }
                }
            }
        }
        Ok(())
    }

    fn read(&mut self, queue: u64, seqs: Vec<u64>) -> ReadBack {
        seqs.into_iter()
            .map(|seq| {
                let key = message_key(queue, seq);
                let entry: Result<Option<Entry>, String> = match self.index.get(&key) {
                    Known::Entry(e) => Ok(Some(e)),
                    Known::Removed => Ok(None),
                    Known::Unknown => self
                        .chunk_cache
                        .lookup(&self.chunks, &key)
                        .map_err(|e| e.to_string()),
                };
                let got = match entry {
                    Ok(Some(e)) => parse_entry(seq, &e, |loc| self.log.read(loc)).map(Some),
                    Ok(None) => Ok(None),
                    Err(e) => Err(e),
                };
                (seq, got)
            })
            .collect()
    }

    /// One group commit: the log's fdatasync, then, if entities changed, sled's
    /// flush with its files. The log goes first: sled may then hold a dropped
    /// queue or a new entity only once the log's changes before it are durable.
    fn commit(&mut self) -> Result<(), String> {
        self.write_index();
        let r = match self.failed.take() {
            Some(e) => Err(e),
            None => {
                let mut synced = self.log.sync();
                // A full disk: what waits is written into the space kept for it.
                if synced.is_err() && self.reserve.release() {
                    synced = self.log.sync();
                }
                synced
                    .map_err(|e| format!("syncing the body log failed: {e}"))
                    .and_then(|_| match self.sled_dirty {
                        true => self.flush_sled(),
                        false => Ok(()),
                    })
            }
        };
        self.commit_failed = r.is_err();
        self.sound_alarm();
        match &r {
            Ok(()) => {
                self.sled_dirty = false;
                self.unsynced = false;
                self.last_commit = Instant::now();
                self.log.collect();
            }
            Err(e) => {
                // Nothing written is dropped: the next commit writes and syncs
                // it again, and only then releases its own waiters.
                if self.complain() {
                    tracing::error!("{e}; the commit's publishes are nacked, and its writes tried again at the next commit");
                }
                self.last_commit = Instant::now();
            }
        }
        r
    }

    /// Free bytes for sled to write into: the reserve is given up when they are
    /// fewer than it needs.
    fn free_for_sled(&mut self) -> std::io::Result<u64> {
        let free = crate::disk::free_bytes(&self.dir)?;
        if free < SLED_HEADROOM && self.reserve.release() {
            self.sound_alarm();
            return crate::disk::free_bytes(&self.dir);
        }
        Ok(free)
    }

    /// Blocks publishers (through the memory gauge, as the disk alarm does)
    /// while commits fail or the reserve is given up; unblocks them after.
    fn sound_alarm(&mut self) {
        let on = self.commit_failed || self.reserve.released();
        if self.alarm.swap(on, Ordering::Relaxed) != on {
            if on {
                tracing::warn!(
                    "store writes fail or the disk is nearly full: publishers are blocked"
                );
            } else {
                tracing::info!(
                    "store writes succeed and the disk has room again: publishers are unblocked"
                );
            }
        }
    }

    /// Whether a failure should be logged now: at most one line per 5 s.
    fn complain(&mut self) -> bool {
        let now = Instant::now();
        let due = self
            .complained
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(5));
        if due {
            self.complained = Some(now);
        }
        due
    }

    /// sled's flush with its files, refused while the file system has less than
    /// `SLED_HEADROOM` free: sled treats a failed write as fatal until the next
    /// start, while the log recovers from one.
    fn flush_sled(&mut self) -> Result<(), String> {
        if let Ok(free) = self.free_for_sled() {
            if free < SLED_HEADROOM {
                self.sled_dirty = true;
                return Err(format!(
                    "only {free} bytes are free on the data directory's file system: entities are not written below {SLED_HEADROOM}"
                ));
            }
        }
        flush_db(&self.db, &mut self.blobs, self.file.as_ref())
    }

    /// Moves the index changes since the last checkpoint into sled: a commit, the
    /// overlay applied and flushed, then the new checkpoint flushed. The
    /// checkpoint is written only once what it covers is durable in sled; until
    /// it is, the replay starts at the previous one, and replaying changes sled
    /// already holds changes nothing.
    fn checkpoint(&mut self) {
        if self.index.is_empty() && self.log.since_checkpoint() == 0 && !self.sled_dirty {
            self.log.collect();
            return;
        }
        if self.commit().is_err() {
            return;
        }
        // A checkpoint can wait; sled cannot take a failed write.
        if let Ok(free) = self.free_for_sled() {
            if free < SLED_HEADROOM {
                if self.complain() {
                    tracing::warn!(
                        "checkpoint put off: only {free} bytes are free on the data directory's file system"
                    );
                }
                return;
            }
        }
        let started = Instant::now();
        let n = self.index.len();
        let pos = self.log.position();
        self.chunk_cache.clear();
        let r = self
            .index
            .drain_into(&self.chunks)
            .and_then(|_| self.flush_sled())
            .and_then(|_| {
                self.meta
                    .insert(CHECKPOINT, &encode_position(pos)[..])
                    .map_err(|e| e.to_string())
            })
            .and_then(|_| self.flush_sled());
        match r {
            Ok(()) => {
                self.log.checkpointed(pos);
                self.log.collect();
                if self.reserve.released() {
                    self.reserve.take_if_room(&self.dir);
                    self.sound_alarm();
                }
                tracing::debug!(
                    entries = n,
                    "checkpoint at segment {} offset {} in {:?}",
                    pos.seg,
                    pos.offset,
                    started.elapsed()
                );
            }
            Err(e) => self.fail(format!("checkpoint failed: {e}")),
        }
    }
}

/// Waits until nothing in this process holds sled's lock on `file`: sled's
/// threads keep the file, and the lock, a moment after its last handle is
/// dropped, so an open right after a close (a new database, or a broker
/// started again in the same process) would find it locked. Another process
/// cannot hold it: the caller holds the data directory's lock file.
fn wait_for_sled(file: &Path) -> std::io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let f = match File::open(file) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        match f.try_lock() {
            Ok(()) => return Ok(()),
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(std::io::Error::other(format!(
                    "{} stays locked",
                    file.display()
                )))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
    }
}

/// Makes an empty sled database under a temporary name, syncs it and renames it
/// to `db`. sled writes its `conf` file without syncing it, and a power cut that
/// tore it would make every later start refuse the directory; `db` appears only
/// once everything in it is durable. A directory left by an attempt cut short
/// (`db.new`, or a `db` without its log file, which holds nothing) is replaced.
fn create_database(dir: &Path) -> std::io::Result<()> {
    let fresh = dir.join("db.new");
    if fresh.exists() {
        std::fs::remove_dir_all(&fresh)?;
    }
    let db = sled::Config::new()
        .path(&fresh)
        .flush_every_ms(None)
        .open()
        .map_err(std::io::Error::other)?;
    // The format record goes in before the database is synced and put in
    // place: a database without one is refused as damaged, and one written
    // after the rename was lost to a power cut in the moments before the
    // first fdatasync of sled's file (the power-loss test cut there once).
    db.open_tree("meta")
        .and_then(|meta| meta.insert(FORMAT, FORMAT_VERSION))
        .map_err(std::io::Error::other)?;
    db.flush().map_err(std::io::Error::other)?;
    drop(db);
    wait_for_sled(&fresh.join("db"))?;
    for name in ["conf", "db", "blobs", ""] {
        File::open(fresh.join(name))?.sync_all()?;
    }
    let target = dir.join("db");
    if target.exists() {
        std::fs::remove_dir_all(&target)?;
    }
    std::fs::rename(&fresh, &target)?;
    File::open(dir)?.sync_all()
}

/// sled's flush, its blob files, one fdatasync of its file.
///
/// sled's flush ends with `sync_file_range`, which neither persists the file's
/// growth nor flushes the drive's cache, and nothing syncs its blob files. So the
/// blob files (and their directory when it gained entries) are fsynced, then the
/// database file fdatasynced. Blobs go first so that, as far as the broker
/// decides it, sled's log never points at a blob the disk does not hold yet.
fn flush_db(db: &sled::Db, blobs: &mut Blobs, file: Option<&File>) -> Result<(), String> {
    db.flush()
        .map_err(|e| format!("flushing the store failed: {e}"))?;
    blobs
        .sync()
        .map_err(|e| format!("syncing the store's blob files failed: {e}"))?;
    match file {
        Some(f) => f
            .sync_data()
            .map_err(|e| format!("fdatasync of the store failed: {e}")),
        None => Ok(()),
    }
}

fn encode_position(p: Position) -> [u8; 12] {
    let mut v = [0u8; 12];
    v[..4].copy_from_slice(&p.seg.to_be_bytes());
    v[4..].copy_from_slice(&p.offset.to_be_bytes());
    v
}

fn decode_position(v: &[u8]) -> Option<Position> {
    let v: [u8; 12] = v.try_into().ok()?;
    Some(Position {
        seg: u32::from_be_bytes([v[0], v[1], v[2], v[3]]),
        offset: u64::from_be_bytes([v[4], v[5], v[6], v[7], v[8], v[9], v[10], v[11]]),
    })
}

/// Start-up: the index changes logged after the checkpoint go into sled, up to
/// the end of the log or the first record a crash tore.
fn replay_index(
    dir: &Path,
    msgs: &Path,
    from: Position,
    chunks: &sled::Tree,
) -> Result<(), StoreError> {
    let started = Instant::now();
    let mut changes = 0usize;
    let mut replayed = Index::default();
    let end = body_log::replay(msgs, from, |record| {
        changes += replayed.replay(record)?;
        Ok(())
    })
    .map_err(|source| StoreError::Io {
        dir: dir.to_path_buf(),
        what: "cannot read the message body log",
        source,
    })?;
    replayed.drain_into(chunks).map_err(|why| StoreError::Io {
        dir: dir.to_path_buf(),
        what: "cannot apply the replayed message index",
        source: std::io::Error::other(why),
    })?;
    if let Some(why) = &end.torn {
        tracing::warn!(
            "the body log ends in a record that a crash interrupted ({why}); nothing after it was confirmed"
        );
    }
    if end.records > 0 {
        tracing::info!(
            "replayed {changes} message index changes from {} log records in {:.3} s",
            end.records,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// An entry pointing into the body log: version, when it was stored, location,
/// then priority, per-message TTL (u64::MAX: none) and body size, so that
/// start-up can leave the body on disk.
fn encode_entry(stored_at: u64, loc: Location, meta: EntryMeta) -> Entry {
    index::make_entry(
        IN_LOG,
        stored_at,
        loc,
        meta.priority,
        meta.ttl.unwrap_or(at::NO_TTL),
        meta.size as u64,
    )
}

/// Where an entry's body is, if it is in the log.
fn in_log(v: &[u8]) -> Option<Location> {
    if v.len() != ENTRY_LEN || !matches!(v[0], IN_LOG | IN_LOG_NO_META) {
        return None;
    }
    let u = |i: usize| u32::from_be_bytes([v[i], v[i + 1], v[i + 2], v[i + 3]]);
    Some(Location {
        seg: u(at::SEG),
        offset: u(at::OFFSET),
        len: u(at::LEN),
    })
}

fn entry_meta(v: &[u8]) -> Option<EntryMeta> {
    if v.first() != Some(&IN_LOG) {
        return None;
    }
    in_log(v)?;
    let u64_at = |i: usize| u64::from_be_bytes(v[i..i + 8].try_into().unwrap_or([0; 8]));
    let ttl = u64_at(at::TTL);
    Some(EntryMeta {
        priority: v[at::PRIORITY],
        ttl: (ttl != at::NO_TTL).then_some(ttl),
        size: usize::try_from(u64_at(at::SIZE)).unwrap_or(usize::MAX),
    })
}

fn stored_at(entry: &[u8]) -> u64 {
    entry
        .get(at::STORED_AT..at::SEG)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

/// An entry for start-up: the message itself only if `load` wants it, or if the
/// entry does not say what ordering and expiry need.
fn parse_start_entry(
    seq: u64,
    entry: &[u8],
    segments: &Segments,
    load: &mut dyn FnMut(usize) -> bool,
) -> Result<StoredEntry, String> {
    let meta = entry_meta(entry);
    let message = match meta {
        Some(m) if !load(m.size) => None,
        _ => Some(parse_entry(seq, entry, |loc| segments.read(loc))?),
    };
    Ok(StoredEntry {
        seq,
        stored_at: stored_at(entry),
        meta,
        message,
    })
}

/// A message from its entry, its body read from the body log.
fn parse_entry(
    seq: u64,
    entry: &[u8],
    read: impl FnOnce(Location) -> Result<Bytes, String>,
) -> Result<StoredMessage, String> {
    let loc = in_log(entry).ok_or("unknown entry version")?;
    parse_body(seq, stored_at(entry), read(loc)?)
}

/// Formats 1 and 2 kept one sled key per entry in `messages`; they move into
/// chunks, format 1's bodies (inline in sled) appended to the body log first.
/// Until the checkpoint after it is flushed, the directory stays format 2 and
/// the old tree is read again on the next start (moving an entry twice is
/// harmless).
fn migrate(messages: &sled::Tree, chunks: &sled::Tree, log: &mut BodyLog) -> Result<usize, String> {
    let mut moved = Index::default();
    let mut n = 0usize;
    let flush = |moved: &mut Index, log: &mut BodyLog| -> Result<(), String> {
        // Bodies first, as for any entry that sled holds.
        log.sync().map_err(|e| e.to_string())?;
        moved.clear_pending();
        moved.drain_into(chunks)
    };
    for kv in messages.iter() {
        let (k, v) = kv.map_err(|e| e.to_string())?;
        let Ok(key) = <Key>::try_from(k.as_ref()) else {
            tracing::error!("skipping a stored message with a malformed key {k:?}");
            continue;
        };
        let entry = match v.first() {
            Some(&IN_LOG) if v.len() == ENTRY_LEN => v.as_ref().try_into().ok(),
            Some(&INLINE) => match parse_message(&k, v.clone()) {
                Ok(m) => {
                    let loc = append_message(log, &m.exchange, &m.routing_key, &m.header, &m.body)
                        .map_err(|e| e.to_string())?;
                    let meta = EntryMeta {
                        priority: 0,
                        ttl: None,
                        size: m.body.len(),
                    };
                    let mut e = encode_entry(m.stored_at, loc, meta);
                    e[0] = IN_LOG_NO_META;
                    Some(e)
                }
                Err(why) => {
                    tracing::error!(key = ?k, "skipping an unreadable stored message: {why}");
                    None
                }
            },
            _ => {
                tracing::error!(key = ?k, "skipping a stored message of an unknown version");
                None
            }
        };
        if let Some(entry) = entry {
            moved.put(key, entry);
            n += 1;
        }
        if moved.len() >= CHECKPOINT_ENTRIES {
            flush(&mut moved, log)?;
        }
    }
    flush(&mut moved, log)?;
    messages.clear().map_err(|e| e.to_string())?;
    Ok(n)
}

/// Header and body are slices of sled's own buffer: reading back copies nothing.
fn parse_message(k: &[u8], v: sled::IVec) -> Result<StoredMessage, String> {
    let all = Bytes::from_owner(v);
    if k.len() != 16 {
        return Err("bad message key".to_string());
    }
    let seq = u64::from_be_bytes(k[8..16].try_into().map_err(|_| "bad key")?);
    if all.len() < 9 || all[0] != INLINE {
        return Err("unknown record version".to_string());
    }
    let stored_at = u64::from_be_bytes(all[1..9].try_into().map_err(|_| "bad record")?);
    parse_body(seq, stored_at, all.slice(9..))
}

/// A message's record in the body log: exchange, routing key, header length,
/// header, body (`parse_body` reads it back).
fn append_message(
    log: &mut BodyLog,
    exchange: &str,
    routing_key: &str,
    header: &[u8],
    body: &[u8],
) -> std::io::Result<Location> {
    let mut names = Vec::with_capacity(8 + exchange.len() + routing_key.len());
    put_str(&mut names, exchange);
    put_str(&mut names, routing_key);
    names.extend_from_slice(&(header.len() as u32).to_be_bytes());
    log.append(&[&names, header, body])
}

/// Exchange, routing key, header and body, as both formats keep them.
/// A message record alone (`store::disk_format`).
pub(super) fn parse_record(all: Bytes) -> Result<StoredMessage, String> {
    parse_body(0, 0, all)
}

fn parse_body(seq: u64, stored_at: u64, all: Bytes) -> Result<StoredMessage, String> {
    let v: &[u8] = &all;
    let mut r = Reader { b: v };
    let exchange = r.str()?;
    let routing_key = r.str()?;
    let n = r.take(4)?;
    let n = u32::from_be_bytes([n[0], n[1], n[2], n[3]]) as usize;
    let start = v.len() - r.b.len();
    let header = all.slice(start..start + r.take(n)?.len());
    let body = all.slice(start + n..);
    // Class, weight, body size and property flags: 14 bytes at least. A body whose
    // size differs from the header's would break the consumer's framing.
    let Some(size) = header.get(4..12) else {
        return Err("content header is truncated".to_string());
    };
    let size = u64::from_be_bytes(size.try_into().map_err(|_| "bad body size")?);
    if header.len() < 14 || size != body.len() as u64 {
        return Err(format!(
            "record is truncated: the body is {} bytes, its header says {size}",
            body.len()
        ));
    }
    Ok(StoredMessage {
        seq,
        stored_at,
        exchange,
        routing_key,
        header,
        body,
    })
}

fn parse_queue(key: &mut Reader<'_>, r: &mut Reader<'_>) -> Result<StoredQueue, String> {
    let (vhost, name) = (key.str()?, key.str()?);
    if r.u8()? != 1 {
        return Err("unknown record version".to_string());
    }
    Ok(StoredQueue {
        vhost,
        name,
        id: r.u64()?,
        auto_delete: r.u8()? != 0,
        arguments: r.table()?,
    })
}

/// The next queue id, checked against the stored queues: a counter that is unreadable,
/// missing or not above every stored id would hand out ids that stored queues (and
/// their messages, keyed by id) already use, so start-up stops instead.
fn next_queue_id(dir: &Path, meta: &sled::Tree) -> Result<u64, StoreError> {
    let corrupt = |why: String| StoreError::Corrupt {
        dir: dir.to_path_buf(),
        key: "next-queue-id".into(),
        why,
    };
    let stored = match meta.get(NEXT_QUEUE_ID)? {
        Some(v) => match <[u8; 8]>::try_from(v.as_ref()) {
            Ok(b) => Some(u64::from_be_bytes(b)),
            Err(_) => {
                return Err(corrupt(format!(
                    "it is {} bytes long instead of 8, so the ids of new queues would collide with stored ones",
                    v.len()
                )))
            }
        },
        None => None,
    };
    let mut highest: Option<(u64, String)> = None;
    for kv in meta.scan_prefix([QUEUE]) {
        let (k, v) = kv?;
        let q = parse_queue(&mut Reader { b: &k[1..] }, &mut Reader { b: &v }).map_err(|why| {
            StoreError::Corrupt {
                dir: dir.to_path_buf(),
                key: format!("{k:?}"),
                why,
            }
        })?;
        if highest.as_ref().is_none_or(|(id, _)| q.id > *id) {
            highest = Some((q.id, q.name));
        }
    }
    match (stored, highest) {
        (None, None) => Ok(1),
        (None, Some((id, name))) => Err(corrupt(format!(
            "it is missing although queue '{name}' is stored with id {id}"
        ))),
        (Some(next), Some((id, name))) if next <= id => Err(corrupt(format!(
            "it is {next}, not above the id {id} of stored queue '{name}'"
        ))),
        (Some(0), _) => Err(corrupt("it is 0, which is never written".into())),
        (Some(next), _) => Ok(next),
    }
}
