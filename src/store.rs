//! Durable state on sled: durable exchanges, queues and bindings, and persistent
//! messages in durable queues.
//!
//! Writes go into sled's in-memory tree as they happen (publish, ack, declare), so
//! their order is the order the broker acted in. Nothing is promised to a client
//! until a flush covers the write: one committer task gathers every waiter (a
//! publisher confirm, a tx.commit-ok, a declare-ok), runs one `flush_async`, an fsync
//! of each blob file sled wrote since the last commit (see `Blobs`) and one fdatasync
//! for all of them, and then releases them all. Under load one fsync covers
//! thousands of messages; alone, a publisher waits about one fsync.
//!
//! Layout: two trees. `meta` holds one key per entity; `messages` holds one key
//! per (queue id, sequence number), both big-endian so a prefix scan reads a queue
//! in order. Few trees, because many trees inflate sled's disk use.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use amq_protocol::frame::WriteContext;
use amq_protocol::types::generation::gen_field_table;
use amq_protocol::types::FieldTable;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

/// Called once the writes made before it are on disk (Ok) or could not be (Err).
pub type SyncWaiter = Box<dyn FnOnce(Result<(), String>) + Send>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("data directory {dir}: {what}: {source}")]
    Io {
        dir: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("data directory {0} is in use by another WarrenMQ process (lock file {0}/warrenmq.lock is held); stop that broker or choose another --data-dir")]
    Locked(PathBuf),
    #[error("data directory {dir}: cannot open the database: {source}. If the data is corrupt, move the directory aside (the broker starts empty) and keep it for inspection")]
    Open { dir: PathBuf, source: sled::Error },
    #[error("data directory {dir}: unreadable record {key}: {why}. Move the directory aside to start empty, and keep it for inspection")]
    Corrupt {
        dir: PathBuf,
        key: String,
        why: String,
    },
    #[error("store write failed: {0}")]
    Write(#[from] sled::Error),
}

pub struct Store {
    dir: PathBuf,
    db: sled::Db,
    meta: sled::Tree,
    messages: sled::Tree,
    syncs: mpsc::UnboundedSender<SyncWaiter>,
    /// Held across the allocation and its record's write, so that the record on
    /// disk always ends above every id handed out.
    next_queue_id: Mutex<u64>,
    committer: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    _lock: File,
}

pub struct StoredExchange {
    pub vhost: String,
    pub name: String,
    /// The exchange type's code (`ExchangeType::code`).
    pub kind: u8,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
}

pub struct StoredQueue {
    pub vhost: String,
    pub name: String,
    pub id: u64,
    pub auto_delete: bool,
    pub arguments: FieldTable,
}

/// A binding's destination as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredDestination {
    Queue(String),
    Exchange(String),
}

pub struct StoredBinding {
    pub vhost: String,
    pub source: String,
    pub destination: StoredDestination,
    pub routing_key: String,
    pub arguments: FieldTable,
}

/// What the store keeps of a message: what it was published to, and its content
/// header and body as they came off the wire.
#[derive(Clone, Copy)]
pub struct MessageParts<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub header: &'a [u8],
    pub body: &'a [u8],
}

/// What a durable queue's messages looked like on disk.
pub struct StoredMessage {
    pub seq: u64,
    /// Wall-clock milliseconds since the Unix epoch when it was stored.
    pub stored_at: u64,
    pub exchange: String,
    pub routing_key: String,
    pub header: Bytes,
    pub body: Bytes,
}

const EXCHANGE: u8 = b'x';
const QUEUE: u8 = b'q';
const BINDING: u8 = b'b';
const NEXT_QUEUE_ID: &[u8] = b"next-queue-id";
const FORMAT: &[u8] = b"format";
const FORMAT_VERSION: &[u8] = b"warrenmq-store-1";

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

impl Store {
    /// Opens (creating if needed) the data directory and starts the committer.
    pub fn open(dir: &Path) -> Result<Arc<Store>, StoreError> {
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
        // sled syncs none of its blob files nor any directory: the committer does.
        let blobs = Blobs::open(dir).map_err(io("cannot sync the database's files"))?;
        let (syncs, rx) = mpsc::unbounded_channel();
        // sled keeps its log in one file, `db`; this handle is only for fdatasync.
        let file = match File::open(dir.join("db").join("db")) {
            Ok(f) => Some(Arc::new(f)),
            Err(e) => {
                tracing::warn!("cannot open the database file for fdatasync: {e}; confirms rely on sled's flush alone");
                None
            }
        };
        let committer = tokio::spawn(committer(db.clone(), file, Arc::new(Mutex::new(blobs)), rx));
        Ok(Arc::new(Store {
            committer: std::sync::Mutex::new(Some(committer)),
            dir: dir.to_path_buf(),
            db,
            meta,
            messages,
            syncs,
            next_queue_id: Mutex::new(next),
            _lock: lock,
        }))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn corrupt(&self, key: &[u8], why: String) -> StoreError {
        StoreError::Corrupt {
            dir: self.dir.clone(),
            key: format!("{key:?}"),
            why,
        }
    }

    /// The committer task: it ends, releasing the database, once the store is dropped.
    pub fn take_committer(&self) -> Option<tokio::task::JoinHandle<()>> {
        self.committer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Runs `waiter` once everything written so far is on disk.
    pub fn sync(&self, waiter: SyncWaiter) {
        if let Err(e) = self.syncs.send(waiter) {
            (e.0)(Err("the store is shut down".into()));
        }
    }

    /// Waits until everything written so far is on disk.
    pub async fn synced(&self) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.sync(Box::new(move |r| {
            let _ = tx.send(r);
        }));
        rx.await
            .unwrap_or_else(|_| Err("the store is shut down".into()))
    }

    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    pub fn new_queue_id(&self) -> Result<u64, StoreError> {
        // Two vhosts may declare at once; without the lock their record writes could
        // land out of order and leave the stored counter at an id already given out.
        let mut next = self.next_queue_id.lock().unwrap_or_else(|p| p.into_inner());
        let id = *next;
        self.meta.insert(NEXT_QUEUE_ID, &(id + 1).to_be_bytes())?;
        *next = id + 1;
        Ok(id)
    }

    pub fn put_exchange(&self, vhost: &str, x: &StoredExchange) -> Result<(), StoreError> {
        let mut v = vec![1u8, x.kind, x.auto_delete as u8, x.internal as u8];
        v.extend_from_slice(&encode_table(&x.arguments));
        self.meta.insert(exchange_key(vhost, &x.name), v)?;
        Ok(())
    }

    pub fn delete_exchange(&self, vhost: &str, name: &str) -> Result<(), StoreError> {
        self.meta.remove(exchange_key(vhost, name))?;
        Ok(())
    }

    pub fn put_queue(&self, q: &StoredQueue) -> Result<(), StoreError> {
        let mut v = vec![1u8];
        v.extend_from_slice(&q.id.to_be_bytes());
        v.push(q.auto_delete as u8);
        v.extend_from_slice(&encode_table(&q.arguments));
        self.meta.insert(queue_key(&q.vhost, &q.name), v)?;
        Ok(())
    }

    /// Removes a queue and every message it held.
    pub fn delete_queue(&self, vhost: &str, name: &str, id: u64) -> Result<(), StoreError> {
        self.meta.remove(queue_key(vhost, name))?;
        let mut batch = sled::Batch::default();
        for kv in self.messages.scan_prefix(id.to_be_bytes()).keys() {
            batch.remove(kv?);
        }
        self.messages.apply_batch(batch)?;
        Ok(())
    }

    pub fn put_binding(&self, b: &StoredBinding) -> Result<(), StoreError> {
        self.meta.insert(
            binding_key(
                &b.vhost,
                &b.source,
                &b.destination,
                &b.routing_key,
                &b.arguments,
            ),
            &[1u8][..],
        )?;
        Ok(())
    }

    pub fn delete_binding(&self, b: &StoredBinding) -> Result<(), StoreError> {
        self.meta.remove(binding_key(
            &b.vhost,
            &b.source,
            &b.destination,
            &b.routing_key,
            &b.arguments,
        ))?;
        Ok(())
    }

    pub fn put_message(&self, queue: u64, seq: u64, m: MessageParts<'_>) -> Result<(), StoreError> {
        let mut v = Vec::with_capacity(
            16 + m.exchange.len() + m.routing_key.len() + m.header.len() + m.body.len(),
        );
        v.push(1u8);
        // When it was stored, so that TTLs keep running across a restart.
        v.extend_from_slice(&wall_ms().to_be_bytes());
        put_str(&mut v, m.exchange);
        put_str(&mut v, m.routing_key);
        v.extend_from_slice(&(m.header.len() as u32).to_be_bytes());
        v.extend_from_slice(m.header);
        v.extend_from_slice(m.body);
        self.messages.insert(message_key(queue, seq), v)?;
        Ok(())
    }

    pub fn delete_message(&self, queue: u64, seq: u64) -> Result<(), StoreError> {
        self.messages.remove(message_key(queue, seq))?;
        Ok(())
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

    pub fn exchanges(&self) -> Result<Vec<StoredExchange>, StoreError> {
        self.scan_meta(EXCHANGE, |key, r| {
            let (vhost, name) = (key.str()?, key.str()?);
            if r.u8()? != 1 {
                return Err("unknown record version".to_string());
            }
            let kind = r.u8()?;
            Ok(StoredExchange {
                vhost,
                name,
                kind,
                auto_delete: r.u8()? != 0,
                internal: r.u8()? != 0,
                arguments: r.table()?,
            })
        })
    }

    pub fn queues(&self) -> Result<Vec<StoredQueue>, StoreError> {
        self.scan_meta(QUEUE, parse_queue)
    }

    /// A binding is all key: the value is a placeholder.
    pub fn bindings(&self) -> Result<Vec<StoredBinding>, StoreError> {
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

    /// A durable queue's messages, in order. A record that cannot be read is an
    /// `Ok(Err(..))`, so that the caller can skip it and keep the rest; a failing
    /// scan is an `Err`.
    pub fn messages(
        &self,
        queue: u64,
    ) -> impl Iterator<Item = Result<Result<StoredMessage, UnreadableMessage>, StoreError>> + '_
    {
        self.messages
            .scan_prefix(queue.to_be_bytes())
            .map(move |kv| {
                let (k, v) = kv?;
                Ok(parse_message(&k, v).map_err(|why| UnreadableMessage {
                    seq: <[u8; 8]>::try_from(k.get(8..).unwrap_or_default())
                        .ok()
                        .map(u64::from_be_bytes),
                    why,
                }))
            })
    }

    /// One message read back for delivery after it was paged out of memory.
    pub fn load_message(&self, queue: u64, seq: u64) -> Result<Option<StoredMessage>, StoreError> {
        let key = message_key(queue, seq);
        let Some(v) = self.messages.get(key)? else {
            return Ok(None);
        };
        parse_message(&key, v)
            .map(Some)
            .map_err(|why| self.corrupt(&key, why))
    }
}

/// A stored message record that could not be read back.
pub struct UnreadableMessage {
    /// From the key; `None` if the key itself is malformed.
    pub seq: Option<u64>,
    pub why: String,
}

/// Header and body are slices of sled's own buffer: reading back copies nothing.
fn parse_message(k: &[u8], v: sled::IVec) -> Result<StoredMessage, String> {
    let all = Bytes::from_owner(v);
    let v: &[u8] = &all;
    if k.len() != 16 {
        return Err("bad message key".to_string());
    }
    let seq = u64::from_be_bytes(k[8..16].try_into().map_err(|_| "bad key")?);
    let mut r = Reader { b: v };
    if r.u8()? != 1 {
        return Err("unknown record version".to_string());
    }
    let stored_at = r.u64()?;
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

/// Milliseconds since the Unix epoch (TTL bookkeeping across restarts).
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How old a timestamp must be before whatever changes the file or directory later
/// is sure to change it too: past the timestamp's granularity. Linux filesystems with
/// sub-second stamps take them from a clock that ticks every few ms (a jiffy);
/// stamps in whole seconds may come from a filesystem counting 1 or 2 s.
fn settled(mtime: Option<SystemTime>, now: SystemTime) -> bool {
    let Some(m) = mtime else {
        return false;
    };
    let whole_seconds = m
        .duration_since(SystemTime::UNIX_EPOCH)
        .is_ok_and(|d| d.subsec_nanos() == 0);
    let granularity = if whole_seconds {
        Duration::from_secs(2)
    } else {
        Duration::from_millis(100)
    };
    m + granularity <= now
}

/// sled 0.34.7's blob files, made durable by the committer.
///
/// sled writes any log item larger than a quarter of its 512 KiB segment (a value of
/// about 128 KiB, or a tree page holding several large values) to a file of its own,
/// `blobs/<lsn>` (`Log::reserve_inner` in pagecache/logger.rs, `write_blob` in
/// pagecache/blob_io.rs), with plain writes and no sync of the file or the directory.
/// It does so while the tree write runs, and also when its segment cleaner rewrites a
/// page (from a writer or its flusher thread), so the broker cannot tell from its own
/// writes which commits created files: the directory is the only record. Listing it
/// costs in proportion to its size, so a commit lists only when the directory's
/// stamp (mtime, size) moved since a listing whose stamp is settled.
struct Blobs {
    dir: PathBuf,
    /// Names of the files synced so far and present at the last listing.
    synced: HashSet<u64>,
    /// Files synced while they might still have been written to (sled creates the
    /// file, then appends to it): each commit checks them again until they settle.
    young: Vec<Young>,
    /// The directory's stamp at the last listing, once later changes must alter it.
    stamp: Option<(u64, Option<SystemTime>)>,
    /// A file was synced but its directory entry not yet.
    dir_dirty: bool,
}

struct Young {
    name: u64,
    len: u64,
    mtime: Option<SystemTime>,
}

impl Blobs {
    /// Takes the blob files already there as known, and syncs the directories
    /// (`blobs`, `db`, the data directory) whose entries sled never synced.
    ///
    /// A previous run that crashed may have left its last blobs in the page cache
    /// only. Syncing them here would delay start-up by one device flush per file
    /// (about 2 ms each even for a clean file on ext4, so 20 s for 10,000 large
    /// messages), so a background thread syncs them while the broker starts.
    fn open(data_dir: &Path) -> std::io::Result<Blobs> {
        let db_dir = data_dir.join("db");
        let dir = db_dir.join("blobs");
        let now = SystemTime::now();
        let md = std::fs::metadata(&dir)?;
        let stamp = (md.len(), md.modified().ok());
        let mut synced = HashSet::new();
        for entry in std::fs::read_dir(&dir)? {
            if let Some(name) = entry?
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
            {
                synced.insert(name);
            }
        }
        for d in [&dir, &db_dir, data_dir] {
            File::open(d)?.sync_all()?;
        }
        if !synced.is_empty() {
            let files: Vec<PathBuf> = synced.iter().map(|n| dir.join(n.to_string())).collect();
            std::thread::Builder::new()
                .name("warrenmq-blob-sync".into())
                .spawn(move || {
                    let started = std::time::Instant::now();
                    for f in &files {
                        match File::open(f).and_then(|f| f.sync_all()) {
                            Ok(()) => {}
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                            Err(e) => tracing::error!("cannot sync {}: {e}", f.display()),
                        }
                    }
                    tracing::info!(
                        "synced the {} blob files found at start-up in {:.3}s",
                        files.len(),
                        started.elapsed().as_secs_f64()
                    );
                })?;
        }
        Ok(Blobs {
            dir,
            synced,
            young: Vec::new(),
            stamp: settled(stamp.1, now).then_some(stamp),
            dir_dirty: false,
        })
    }

    /// Makes every blob file written before the call durable, with its directory entry.
    fn sync(&mut self) -> std::io::Result<()> {
        let now = SystemTime::now();
        let result = self.sync_young(now).and_then(|()| self.sync_new(now));
        if result.is_err() {
            self.stamp = None;
        }
        result
    }

    fn sync_young(&mut self, now: SystemTime) -> std::io::Result<()> {
        for y in std::mem::take(&mut self.young) {
            let md = match std::fs::metadata(self.dir.join(y.name.to_string())) {
                Ok(md) => md,
                // sled removed it: nothing left to keep.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    self.young.push(y);
                    return Err(e);
                }
            };
            if (md.len(), md.modified().ok()) == (y.len, y.mtime) {
                if !settled(y.mtime, now) {
                    self.young.push(y);
                }
                continue;
            }
            match self.sync_file(y.name, now) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    self.young.push(y);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn sync_new(&mut self, now: SystemTime) -> std::io::Result<()> {
        let md = std::fs::metadata(&self.dir)?;
        let stamp = (md.len(), md.modified().ok());
        if self.stamp != Some(stamp) {
            let mut present = HashSet::with_capacity(self.synced.len() + 16);
            for entry in std::fs::read_dir(&self.dir)? {
                // sled names blobs by LSN and ignores anything else (`gc_blobs`).
                let Some(name) = entry?
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<u64>().ok())
                else {
                    continue;
                };
                if !self.synced.contains(&name) {
                    match self.sync_file(name, now) {
                        Ok(()) => self.dir_dirty = true,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(e),
                    }
                }
                present.insert(name);
            }
            self.synced.retain(|n| present.contains(n));
            // Taken before the listing: an entry the listing missed changes the
            // mtime, unless it came within the timestamp's granularity.
            self.stamp = settled(stamp.1, now).then_some(stamp);
        }
        if self.dir_dirty {
            File::open(&self.dir)?.sync_all()?;
            self.dir_dirty = false;
        }
        Ok(())
    }

    /// fsyncs one blob; its length and mtime are read first, so that a write racing
    /// with the sync shows as a change at the next commit.
    fn sync_file(&mut self, name: u64, now: SystemTime) -> std::io::Result<()> {
        let f = File::open(self.dir.join(name.to_string()))?;
        let md = f.metadata()?;
        f.sync_all()?;
        self.synced.insert(name);
        let mtime = md.modified().ok();
        if !settled(mtime, now) {
            self.young.push(Young {
                name,
                len: md.len(),
                mtime,
            });
        }
        Ok(())
    }
}

/// Gathers waiters, flushes once for all of them, releases them.
///
/// sled's flush ends with `sync_file_range`, which neither persists the file's
/// growth nor flushes the drive's cache; only its 500 ms timer calls fsync, and
/// nothing syncs its blob files. A confirm promises more, so each group commit ends
/// with an fsync of every new blob file (and of their directory when it gained
/// entries), then an fdatasync of the database file, off the async workers. Blobs
/// go first so that, as far as the broker decides it, the log never points at a
/// blob the disk does not hold yet.
async fn committer(
    db: sled::Db,
    file: Option<Arc<File>>,
    blobs: Arc<Mutex<Blobs>>,
    mut rx: mpsc::UnboundedReceiver<SyncWaiter>,
) {
    while let Some(first) = rx.recv().await {
        let mut waiters = vec![first];
        while let Ok(w) = rx.try_recv() {
            waiters.push(w);
        }
        let mut result = db.flush_async().await.map(|_| ()).map_err(|e| {
            tracing::error!("flushing the store failed: {e}");
            e.to_string()
        });
        if result.is_ok() {
            let (file, blobs) = (file.clone(), blobs.clone());
            let synced = tokio::task::spawn_blocking(move || {
                blobs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .sync()
                    .map_err(|e| format!("syncing the store's blob files failed: {e}"))?;
                match file {
                    Some(file) => file
                        .sync_data()
                        .map_err(|e| format!("fdatasync of the store failed: {e}")),
                    None => Ok(()),
                }
            })
            .await;
            result = match synced {
                Ok(r) => r,
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = &result {
                tracing::error!("{e}");
            }
        }
        for w in waiters {
            w(result.clone());
        }
    }
}
