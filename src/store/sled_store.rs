//! The store on sled. Two trees: `meta` holds one key per entity; `messages` one
//! key per (queue id, sequence number), both big-endian so a prefix scan reads a
//! queue in order. Few trees, because many trees inflate sled's disk use. A
//! message's entry is small: when it was stored and where its body is in the body
//! log (`log.rs`), which holds each body once however many queues hold it. Entries
//! of the first format, with the body inline, are still read.
//!
//! One thread owns every write: callers send requests over a channel and go on.
//! The thread takes whatever has queued up, applies it in order (message writes
//! as one batch), and if any waiter asked for a sync, flushes sled, syncs the blob
//! files sled wrote (see `blobs`) and fdatasyncs its log, then releases them all.
//! Under load one fdatasync covers thousands of messages; alone, a publisher waits
//! about one. Reads of paged-out messages go through the same thread, so they see
//! every write made before them.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use amq_protocol::frame::WriteContext;
use amq_protocol::types::generation::gen_field_table;
use amq_protocol::types::FieldTable;
use bytes::Bytes;

use super::blobs::Blobs;
use super::log::{segment_path, BodyLog, Location, Segments};
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
        key: [u8; 16],
        stored_at: u64,
        m: MessageRecord,
    },
    DeleteMessage([u8; 16]),
    DeleteQueueMessages(u64),
    Read {
        queue: u64,
        seqs: Vec<u64>,
        done: ReadDone,
    },
    Sync(SyncWaiter),
}

pub struct SledStore {
    dir: PathBuf,
    meta: sled::Tree,
    messages: sled::Tree,
    segments: Arc<Segments>,
    ops: Mutex<Option<mpsc::Sender<Op>>>,
    /// Held across the allocation and its record's request, so that the record
    /// on disk always ends above every id handed out.
    next_queue_id: Mutex<u64>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    _lock: File,
}

const EXCHANGE: u8 = b'x';
const QUEUE: u8 = b'q';
const BINDING: u8 = b'b';
const NOTE: u8 = b'n';
const NEXT_QUEUE_ID: &[u8] = b"next-queue-id";
const FORMAT: &[u8] = b"format";
/// Format 2 adds the body log; a format-1 directory is read as it is (its inline
/// entries stay until their messages go) and marked format 2.
const FORMAT_VERSION: &[u8] = b"warrenmq-store-2";
const FORMAT_1: &[u8] = b"warrenmq-store-1";
/// The body log's segment size: a segment is deleted whole once nothing points
/// into it, so this bounds what a few old messages can keep on disk per segment.
const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Entry versions in the `messages` tree.
const INLINE: u8 = 1;
const IN_LOG: u8 = 2;

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

fn message_key(queue: u64, seq: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&queue.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

impl SledStore {
    pub fn open(dir: &Path) -> Result<Arc<SledStore>, StoreError> {
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
        let existed = dir.join("db").join("db").exists();
        let db = sled::Config::new()
            .path(dir.join("db"))
            .cache_capacity(64 * 1024 * 1024)
            .flush_every_ms(Some(500))
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
        let messages = open("messages")?;
        // sled drops what it cannot read as if it were a torn write. A database that
        // was there but lost even its format record is corrupt, not empty: refuse it.
        match meta.get(FORMAT)? {
            Some(v) if v.as_ref() == FORMAT_VERSION => {}
            Some(v) if v.as_ref() == FORMAT_1 => {
                meta.insert(FORMAT, FORMAT_VERSION)?;
            }
            Some(v) => {
                return Err(StoreError::Corrupt {
                    dir: dir.to_path_buf(),
                    key: "format".into(),
                    why: format!("unknown format {:?}", String::from_utf8_lossy(&v)),
                })
            }
            None if existed => {
                return Err(StoreError::Corrupt {
                    dir: dir.to_path_buf(),
                    key: "format".into(),
                    why: "the database exists but its format record is missing or unreadable"
                        .into(),
                })
            }
            None => {
                meta.insert(FORMAT, FORMAT_VERSION)?;
                db.flush().map_err(|source| StoreError::Open {
                    dir: dir.to_path_buf(),
                    source,
                })?;
            }
        }
        let next = next_queue_id(dir, &meta)?;
        // sled syncs none of its blob files nor any directory: the store thread does.
        let blobs = Blobs::open(dir).map_err(io("cannot sync the database's files"))?;
        // sled keeps its log in one file, `db`; this handle is only for fdatasync.
        let file = match File::open(dir.join("db").join("db")) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!("cannot open the database file for fdatasync: {e}; confirms rely on sled's flush alone");
                None
            }
        };
        // How many entries point into each body segment: the ones nothing points
        // into are deleted as the log opens.
        // An entry whose record ends past its segment's end was written by sled
        // before a crash tore the body: never confirmed (a confirm waits for the
        // body's sync), so it goes.
        let msgs = dir.join("msgs");
        let mut live: HashMap<u32, u64> = HashMap::new();
        let mut sizes: HashMap<u32, u64> = HashMap::new();
        let mut torn = sled::Batch::default();
        let mut n_torn = 0usize;
        for kv in messages.iter() {
            let (k, v) = kv?;
            let Some(loc) = in_log(&v) else { continue };
            let size = *sizes.entry(loc.seg).or_insert_with(|| {
                std::fs::metadata(segment_path(&msgs, loc.seg))
                    .map(|m| m.len())
                    .unwrap_or(0)
            });
            if u64::from(loc.offset) + u64::from(loc.len) > size {
                torn.remove(k);
                n_torn += 1;
                continue;
            }
            *live.entry(loc.seg).or_default() += 1;
        }
        if n_torn > 0 {
            tracing::warn!(
                "{n_torn} stored messages were never confirmed: their bodies were torn by a crash; removed"
            );
            messages.apply_batch(torn)?;
            db.flush().map_err(|source| StoreError::Open {
                dir: dir.to_path_buf(),
                source,
            })?;
        }
        let log = BodyLog::open(&msgs, SEGMENT_BYTES, live)
            .map_err(io("cannot open the message body log"))?;
        let segments = log.segments.clone();
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            db,
            meta: meta.clone(),
            messages: messages.clone(),
            file,
            blobs,
            log,
            failed: None,
        };
        let thread = std::thread::Builder::new()
            .name("warrenmq-store".into())
            .spawn(move || writer.run(rx))
            .map_err(io("cannot start the store thread"))?;
        Ok(Arc::new(SledStore {
            dir: dir.to_path_buf(),
            meta,
            messages,
            segments,
            ops: Mutex::new(Some(tx)),
            next_queue_id: Mutex::new(next),
            thread: Mutex::new(Some(thread)),
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
        Box::new(
            self.messages
                .scan_prefix(queue.to_be_bytes())
                .map(move |kv| {
                    let (k, v) = kv?;
                    Ok(
                        parse_start_entry(&k, v, &self.segments, &mut *load).map_err(|why| {
                            UnreadableMessage {
                                seq: key_seq(&k),
                                why,
                            }
                        }),
                    )
                }),
        )
    }

    fn messages(&self, queue: u64) -> StoredMessages<'_> {
        Box::new(
            self.messages
                .scan_prefix(queue.to_be_bytes())
                .map(move |kv| {
                    let (k, v) = kv?;
                    Ok(
                        parse_entry(&k, v, |loc| self.segments.read(loc)).map_err(|why| {
                            UnreadableMessage {
                                seq: <[u8; 8]>::try_from(k.get(8..).unwrap_or_default())
                                    .ok()
                                    .map(u64::from_be_bytes),
                                why,
                            }
                        }),
                    )
                }),
        )
    }
}

/// The store's thread and what it owns.
struct Writer {
    db: sled::Db,
    meta: sled::Tree,
    messages: sled::Tree,
    file: Option<File>,
    blobs: Blobs,
    log: BodyLog,
    /// The first write that failed. Every sync after it fails too: the broker
    /// cannot tell which waiter's writes it covered, so none is released as done.
    failed: Option<String>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Op>) {
        while let Ok(first) = rx.recv() {
            let mut waiters = Vec::new();
            let mut batch = Batch::default();
            for op in std::iter::once(first).chain(rx.try_iter()) {
                match op {
                    Op::PutMessage { key, stored_at, m } => self.put(&mut batch, key, stored_at, m),
                    Op::DeleteMessage(key) => self.delete(&mut batch, key),
                    Op::Sync(w) => waiters.push(w),
                    other => {
                        // Whatever must see the batched writes comes after them.
                        self.apply(&mut batch);
                        self.other(other);
                    }
                }
            }
            self.apply(&mut batch);
            if !waiters.is_empty() {
                let result = self.commit();
                for w in waiters {
                    w(result.clone());
                }
            }
        }
        // Senders are gone: whatever was written goes to disk before the database closes.
        if let Err(e) = self.commit() {
            tracing::error!("final flush of the store failed: {e}");
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
    fn put(&mut self, batch: &mut Batch, key: [u8; 16], stored_at: u64, m: MessageRecord) {
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
        let loc = match batch.bodies.get(&same) {
            Some((loc, _)) => {
                self.log.add_ref(loc.seg);
                *loc
            }
            None => {
                let mut names = Vec::with_capacity(8 + m.exchange.len() + m.routing_key.len());
                put_str(&mut names, &m.exchange);
                put_str(&mut names, &m.routing_key);
                names.extend_from_slice(&(m.header.len() as u32).to_be_bytes());
                match self.log.append(&[&names, &m.header, &m.body]) {
                    Ok(loc) => {
                        // Kept until the batch is applied, so that no other body
                        // can reuse the address meanwhile.
                        batch.bodies.insert(same, (loc, m));
                        loc
                    }
                    Err(e) => return self.fail(format!("writing the body log: {e}")),
                }
            }
        };
        if let Some(Some(old)) = batch.entries.insert(key, Some(loc.seg)) {
            self.log.release(old);
        }
        batch
            .sled
            .insert(&key[..], encode_entry(stored_at, loc, meta).to_vec());
    }

    /// Removes a message's entry; its body segment loses a reference.
    fn delete(&mut self, batch: &mut Batch, key: [u8; 16]) {
        match batch.entries.insert(key, None) {
            Some(Some(seg)) => self.log.release(seg),
            Some(None) => {}
            None => match self.messages.get(key) {
                Ok(Some(v)) => {
                    if let Some(loc) = in_log(&v) {
                        self.log.release(loc.seg);
                    }
                }
                Ok(None) => {}
                Err(e) => self.fail(e),
            },
        }
        batch.sled.remove(&key[..]);
    }

    fn apply(&mut self, batch: &mut Batch) {
        if batch.entries.is_empty() {
            return;
        }
        let b = std::mem::take(batch);
        if let Err(e) = self.messages.apply_batch(b.sled) {
            self.fail(e);
        }
    }

    fn other(&mut self, op: Op) {
        let r = match op {
            Op::PutMeta(k, v) => self.meta.insert(k, v).map(|_| ()),
            Op::DeleteMeta(k) => self.meta.remove(k).map(|_| ()),
            Op::DeleteQueueMessages(id) => {
                let mut batch = sled::Batch::default();
                let mut scan = Ok(());
                for kv in self.messages.scan_prefix(id.to_be_bytes()) {
                    match kv {
                        Ok((k, v)) => {
                            if let Some(loc) = in_log(&v) {
                                self.log.release(loc.seg);
                            }
                            batch.remove(k)
                        }
                        Err(e) => {
                            scan = Err(e);
                            break;
                        }
                    }
                }
                scan.and_then(|_| self.messages.apply_batch(batch))
            }
            Op::Read { queue, seqs, done } => {
                done(self.read(queue, seqs));
                Ok(())
            }
            Op::PutMessage { .. } | Op::DeleteMessage(_) | Op::Sync(_) => Ok(()),
        };
        if let Err(e) = r {
            self.fail(e);
        }
    }

    fn read(&mut self, queue: u64, seqs: Vec<u64>) -> ReadBack {
        seqs.into_iter()
            .map(|seq| {
                let key = message_key(queue, seq);
                let got = match self.messages.get(key) {
                    Ok(Some(v)) => parse_entry(&key, v, |loc| self.log.read(loc)).map(Some),
                    Ok(None) => Ok(None),
                    Err(e) => Err(e.to_string()),
                };
                (seq, got)
            })
            .collect()
    }

    /// One group commit: sled's flush, the blob files, one fdatasync.
    ///
    /// sled's flush ends with `sync_file_range`, which neither persists the file's
    /// growth nor flushes the drive's cache; only its 500 ms timer calls fsync, and
    /// nothing syncs its blob files. A confirm promises more, so each group commit
    /// ends with an fsync of every new blob file (and of their directory when it
    /// gained entries), then an fdatasync of the database file. Blobs go first so
    /// that, as far as the broker decides it, the log never points at a blob the
    /// disk does not hold yet.
    fn commit(&mut self) -> Result<(), String> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        // Bodies first: an entry sled makes durable must find its body on disk.
        let r = self
            .log
            .sync()
            .map_err(|e| format!("syncing the body log failed: {e}"))
            .and_then(|_| {
                self.db
                    .flush()
                    .map_err(|e| format!("flushing the store failed: {e}"))
            })
            .and_then(|_| {
                self.blobs
                    .sync()
                    .map_err(|e| format!("syncing the store's blob files failed: {e}"))
            })
            .and_then(|_| match &self.file {
                Some(f) => f
                    .sync_data()
                    .map_err(|e| format!("fdatasync of the store failed: {e}")),
                None => Ok(()),
            });
        match &r {
            // The entries that pointed into dead segments are gone on disk too.
            Ok(()) => self.log.collect(),
            Err(e) => tracing::error!("{e}"),
        }
        r
    }
}

/// One batch of message writes: sled's, the entries it touches (with the body
/// segment each now points into, None once deleted) and the bodies it wrote.
#[derive(Default)]
struct Batch {
    sled: sled::Batch,
    entries: HashMap<[u8; 16], Option<u32>>,
    bodies: HashMap<(usize, usize, usize, usize), (Location, MessageRecord)>,
}

/// An entry pointing into the body log: version, when it was stored, location,
/// then priority, per-message TTL (u64::MAX: none) and body size, so that
/// start-up can leave the body on disk.
const ENTRY_LEN: usize = 38;

fn encode_entry(stored_at: u64, loc: Location, meta: EntryMeta) -> [u8; ENTRY_LEN] {
    let mut v = [0u8; ENTRY_LEN];
    v[0] = IN_LOG;
    v[1..9].copy_from_slice(&stored_at.to_be_bytes());
    v[9..13].copy_from_slice(&loc.seg.to_be_bytes());
    v[13..17].copy_from_slice(&loc.offset.to_be_bytes());
    v[17..21].copy_from_slice(&loc.len.to_be_bytes());
    v[21] = meta.priority;
    v[22..30].copy_from_slice(&meta.ttl.unwrap_or(u64::MAX).to_be_bytes());
    v[30..38].copy_from_slice(&(meta.size as u64).to_be_bytes());
    v
}

/// Where an entry's body is, if it is in the log.
fn in_log(v: &[u8]) -> Option<Location> {
    if v.len() != ENTRY_LEN || v[0] != IN_LOG {
        return None;
    }
    let u = |i: usize| u32::from_be_bytes([v[i], v[i + 1], v[i + 2], v[i + 3]]);
    Some(Location {
        seg: u(9),
        offset: u(13),
        len: u(17),
    })
}

fn entry_meta(v: &[u8]) -> Option<EntryMeta> {
    in_log(v)?;
    let u64_at = |i: usize| u64::from_be_bytes(v[i..i + 8].try_into().unwrap_or([0; 8]));
    let ttl = u64_at(22);
    Some(EntryMeta {
        priority: v[21],
        ttl: (ttl != u64::MAX).then_some(ttl),
        size: usize::try_from(u64_at(30)).unwrap_or(usize::MAX),
    })
}

fn key_seq(k: &[u8]) -> Option<u64> {
    k.get(8..16)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map(u64::from_be_bytes)
}

/// An entry for start-up: the message itself only if `load` wants it, or if the
/// entry is of the inline format (which has no meta).
fn parse_start_entry(
    k: &[u8],
    v: sled::IVec,
    segments: &Segments,
    load: &mut dyn FnMut(usize) -> bool,
) -> Result<StoredEntry, String> {
    let seq = key_seq(k).ok_or("bad message key")?;
    match entry_meta(&v) {
        Some(meta) => {
            let stored_at = u64::from_be_bytes(v[1..9].try_into().map_err(|_| "bad entry")?);
            let message = if load(meta.size) {
                Some(parse_entry(k, v, |loc| segments.read(loc))?)
            } else {
                None
            };
            Ok(StoredEntry {
                seq,
                stored_at,
                meta: Some(meta),
                message,
            })
        }
        None => {
            let m = parse_entry(k, v, |loc| segments.read(loc))?;
            Ok(StoredEntry {
                seq,
                stored_at: m.stored_at,
                meta: None,
                message: Some(m),
            })
        }
    }
}

/// A message from its entry: inline (format 1) or read from the body log.
fn parse_entry(
    k: &[u8],
    v: sled::IVec,
    read: impl FnOnce(Location) -> Result<Bytes, String>,
) -> Result<StoredMessage, String> {
    match v.first() {
        Some(&INLINE) => parse_message(k, v),
        Some(&IN_LOG) => {
            let loc = in_log(&v).ok_or("entry is truncated")?;
            let stored_at = u64::from_be_bytes(v[1..9].try_into().map_err(|_| "bad entry")?);
            let seq = key_seq(k).ok_or("bad message key")?;
            parse_body(seq, stored_at, read(loc)?)
        }
        _ => Err("unknown record version".to_string()),
    }
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

/// Exchange, routing key, header and body, as both formats keep them.
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
