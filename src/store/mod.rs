//! Durable state: durable exchanges, queues and bindings, and persistent messages
//! in durable queues, behind the [`Store`] trait; [`SledStore`] is the
//! implementation.
//!
//! Every write is a request, applied in the order it was made, off the caller's
//! thread: nothing here blocks a tokio worker or runs under a queue's lock.
//! Nothing is promised to a client until a sync covers the write: a waiter (a
//! publisher confirm, a tx.commit-ok, a declare-ok) is released once everything
//! asked of the store before it is on disk. One sync covers every waiter queued
//! meanwhile (group commit).

mod blobs;
mod chunk;
mod index;
mod log;
mod reserve;
mod sled_store;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use amq_protocol::types::FieldTable;
use bytes::Bytes;
use tokio::sync::oneshot;

pub use sled_store::SledStore;

/// What the store reads back from disk, for the tests and the fuzz target
/// that read, damage or make up a data directory's records on purpose. Not an
/// interface.
#[doc(hidden)]
pub mod disk_format {
    use bytes::Bytes;

    /// An index entry as the store writes it.
    pub type Entry = [u8; 38];

    /// An index chunk's entries with their sequence numbers' low bytes, in order.
    pub fn decode_chunk(v: &[u8]) -> Result<Vec<(u8, Entry)>, String> {
        super::chunk::decode(v)
    }

    /// An index chunk's value as the store writes it (version 2).
    pub fn encode_chunk(items: &[(u8, Entry)]) -> Vec<u8> {
        super::chunk::encode(&items.iter().copied().collect())
    }

    /// An index chunk's value in version 1 (still read): version, then each
    /// entry's low byte and its 38 bytes, as they are.
    pub fn encode_chunk_v1(items: &[(u8, Entry)]) -> Vec<u8> {
        let mut v = vec![super::chunk::V1];
        for (low, e) in items {
            v.push(*low);
            v.extend_from_slice(e);
        }
        v
    }

    /// One index record of the body log replayed, as start-up does; the
    /// number of changes it held.
    pub fn replay_index_record(record: &[u8]) -> Result<usize, String> {
        super::index::Index::default().replay(record)
    }

    /// A message record of the body log (exchange, routing key, header, body).
    pub fn parse_message_record(record: Bytes) -> Result<super::StoredMessage, String> {
        super::sled_store::parse_record(record)
    }
}

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

pub struct StoredExchange {
    pub vhost: String,
    pub name: String,
    /// The exchange type's code (`ExchangeType::code`).
    pub kind: u8,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
    /// A delayed-message exchange's id for its waiting messages
    /// (`put_message`/`messages` under it, as a queue's).
    pub messages_id: Option<u64>,
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

/// A stored message as start-up first sees it: what ordering, expiry and the
/// memory budget need, and the message itself only where it was asked for (or
/// where the entry holds it anyway).
pub struct StoredEntry {
    pub seq: u64,
    pub stored_at: u64,
    /// Priority, per-message TTL and body size, when the entry keeps them.
    pub meta: Option<EntryMeta>,
    /// The message, when it was loaded; always for an entry without `meta`.
    pub message: Option<StoredMessage>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryMeta {
    pub priority: u8,
    pub ttl: Option<u64>,
    pub size: usize,
}

/// A durable queue's entries in order (see [`StoredMessages`] for the errors).
pub type StoredEntries<'a> =
    Box<dyn Iterator<Item = Result<Result<StoredEntry, UnreadableMessage>, StoreError>> + 'a>;

/// A message as the store keeps it: what it was published to, and its content
/// header and body as they came off the wire (shared, not copied).
#[derive(Clone)]
pub struct MessageRecord {
    pub exchange: Arc<str>,
    pub routing_key: Arc<str>,
    pub header: Bytes,
    pub body: Bytes,
    /// Kept beside the entry, so that start-up needs no body to order and
    /// expire a message it leaves on disk.
    pub priority: u8,
    pub ttl: Option<u64>,
}

/// Messages read back: each asked-for sequence number with its message, None if
/// the store has no such message, or why it could not be read.
pub type ReadBack = Vec<(u64, Result<Option<StoredMessage>, String>)>;

/// Called with what was read, on the store's own thread.
pub type ReadDone = Box<dyn FnOnce(ReadBack) + Send>;

/// A durable queue's stored messages in order; an unreadable record is an
/// `Ok(Err(..))`, so that the caller can skip it and keep the rest.
pub type StoredMessages<'a> =
    Box<dyn Iterator<Item = Result<Result<StoredMessage, UnreadableMessage>, StoreError>> + 'a>;

/// What the broker needs of durable storage. Writes return at once and are
/// applied in the order they were made; their failures are reported to every
/// later sync (and so become nacks and connection errors), never lost.
pub trait Store: Send + Sync {
    fn dir(&self) -> &Path;

    /// Runs `waiter` once everything asked of the store before it is on disk.
    fn sync(&self, waiter: SyncWaiter);

    /// An id for a new durable queue, never handed out before.
    fn new_queue_id(&self) -> Result<u64, StoreError>;
    fn put_exchange(&self, vhost: &str, x: &StoredExchange);
    fn delete_exchange(&self, vhost: &str, name: &str);
    fn put_queue(&self, q: &StoredQueue);
    /// Removes a queue and every message it held.
    fn delete_queue(&self, vhost: &str, name: &str, id: u64);
    fn put_binding(&self, b: &StoredBinding);
    fn delete_binding(&self, b: &StoredBinding);

    fn put_message(&self, queue: u64, seq: u64, m: MessageRecord);
    fn delete_message(&self, queue: u64, seq: u64);
    /// Removes many of a queue's messages (a purge): one request for them all.
    fn delete_message_seqs(&self, queue: u64, seqs: Vec<u64>);
    /// Removes every message stored under an id (a delayed exchange deleted).
    fn delete_messages(&self, queue: u64);
    /// Reads messages back (paged out of memory); sees every write made before.
    fn read_messages(&self, queue: u64, seqs: Vec<u64>, done: ReadDone);

    /// Recovery, before the broker serves anyone.
    fn exchanges(&self) -> Result<Vec<StoredExchange>, StoreError>;
    fn queues(&self) -> Result<Vec<StoredQueue>, StoreError>;
    fn bindings(&self) -> Result<Vec<StoredBinding>, StoreError>;
    fn messages(&self, queue: u64) -> StoredMessages<'_>;
    /// A queue's entries, each message loaded only if `load(body size)` says so
    /// (start-up loads the head of a backlog, within the queue's memory budget).
    fn entries<'a>(
        &'a self,
        queue: u64,
        load: Box<dyn FnMut(usize) -> bool + 'a>,
    ) -> StoredEntries<'a>;

    /// A small record of the broker's own under `name` (what the configuration
    /// file created), written in order with everything else.
    fn put_note(&self, name: &str, value: Vec<u8>);
    /// Reads such a record back: at start-up, before the broker serves anyone.
    fn note(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError>;
}

impl dyn Store {
    /// Waits until everything asked of the store so far is on disk.
    pub async fn synced(&self) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.sync(Box::new(move |r| {
            let _ = tx.send(r);
        }));
        rx.await
            .unwrap_or_else(|_| Err("the store is shut down".into()))
    }

    /// Reads messages back and waits for them.
    pub async fn read(&self, queue: u64, seqs: Vec<u64>) -> ReadBack {
        let (tx, rx) = oneshot::channel();
        self.read_messages(
            queue,
            seqs,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.await.unwrap_or_default()
    }
}

/// A stored message record that could not be read back.
pub struct UnreadableMessage {
    /// From the key; `None` if the key itself is malformed.
    pub seq: Option<u64>,
    pub why: String,
}

/// Milliseconds since the Unix epoch (TTL bookkeeping across restarts).
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
