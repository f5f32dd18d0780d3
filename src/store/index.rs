//! The message index. Each change to a queue's entries (an entry put, an entry
//! removed, a queue's entries dropped) is written to the body log as part of an
//! index record, and kept here, in memory, until a checkpoint applies them to
//! sled. A group commit is then one fdatasync of the log, and a message put and
//! removed between two checkpoints never reaches sled at all: that is what kept
//! sled's page writes and CPU on every commit before.
//!
//! In sled, a queue's entries are grouped by 256 consecutive sequence numbers,
//! one value per group (a chunk): a key per message cost sled about 200 bytes of
//! disk and far more memory per entry, and a million-message backlog meant a
//! million keys to scan at start-up.
//!
//! Start-up replays the index records written after the last checkpoint
//! (`log::replay`) into an `Index` ([`Index::replay`]) and checkpoints it; every
//! change sets or removes an entry, so replaying one that sled already holds
//! changes nothing.

use std::collections::HashMap;

use super::chunk;
use super::log::Location;
use std::hash::{BuildHasherDefault, Hasher};

/// Keys here are sequence numbers and buffer addresses that no client picks
/// (a queue's ids come from the broker's counters): a multiply-fold is enough,
/// where SipHash cost a few percent of the persistent path's CPU.
#[derive(Default)]
pub(super) struct FoldHasher(u64);

impl Hasher for FoldHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            // Big-endian, as keys are written: a sequence number's low bits,
            // which vary most, stay the word's low bits.
            self.write_u64(u64::from_be_bytes(word));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
    fn finish(&self) -> u64 {
        // The table takes its bucket from the low bits and a tag from the top
        // ones: the product's high half is folded down into both.
        self.0 ^ (self.0 >> 29)
    }
}

pub(super) type FoldMap<K, V> = HashMap<K, V, BuildHasherDefault<FoldHasher>>;

/// The key of a message's entry: queue id then sequence number, big-endian.
pub(super) type Key = [u8; 16];

/// An entry as the store writes it (`sled_store::encode_entry`).
pub(super) const ENTRY_LEN: usize = 38;
pub(super) type Entry = [u8; ENTRY_LEN];

/// Where an entry keeps what it keeps, after its kind (the first byte): when it
/// was stored (u64), where its record is in the body log (segment, offset and
/// length, u32 each), its priority (u8), TTL (u64, `NO_TTL` for none) and body
/// size (u64), big-endian. `sled_store::encode_entry` writes it; `chunk.rs`
/// writes it smaller in sled.
pub(super) mod at {
    pub const STORED_AT: usize = 1;
    pub const SEG: usize = 9;
    pub const OFFSET: usize = 13;
    pub const LEN: usize = 17;
    pub const PRIORITY: usize = 21;
    pub const TTL: usize = 22;
    pub const SIZE: usize = 30;
    pub const NO_TTL: u64 = u64::MAX;
}

/// An entry from its fields, laid out as `at` says.
pub(super) fn make_entry(
    kind: u8,
    stored_at: u64,
    loc: Location,
    priority: u8,
    ttl: u64,
    size: u64,
) -> Entry {
    let mut e = [0u8; ENTRY_LEN];
    e[0] = kind;
    e[at::STORED_AT..at::SEG].copy_from_slice(&stored_at.to_be_bytes());
    e[at::SEG..at::OFFSET].copy_from_slice(&loc.seg.to_be_bytes());
    e[at::OFFSET..at::LEN].copy_from_slice(&loc.offset.to_be_bytes());
    e[at::LEN..at::PRIORITY].copy_from_slice(&loc.len.to_be_bytes());
    e[at::PRIORITY] = priority;
    e[at::TTL..at::SIZE].copy_from_slice(&ttl.to_be_bytes());
    e[at::SIZE..].copy_from_slice(&size.to_be_bytes());
    e
}

/// Entry kinds (the first byte): the body is in the log, and the entry keeps
/// the priority, TTL and size start-up needs.
pub(super) const IN_LOG: u8 = 2;
/// In the log, moved from an inline entry whose priority and TTL were never
/// recorded: start-up reads such a message to learn them.
pub(super) const IN_LOG_NO_META: u8 = 3;

/// Sequence numbers per chunk: 2^CHUNK_BITS.
const CHUNK_BITS: u32 = 8;

/// The sled key of the chunk holding `key`'s entry: queue id, then the
/// sequence number shifted right, big-endian, so a prefix scan reads a queue's
/// chunks in order.
pub(super) fn chunk_key(key: &Key) -> [u8; 16] {
    let seq = u64::from_be_bytes(key[8..].try_into().unwrap_or_default());
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&key[..8]);
    k[8..].copy_from_slice(&(seq >> CHUNK_BITS).to_be_bytes());
    k
}

/// A chunk's entries, each with its sequence number, in order; a value from
/// disk is checked before it is used (`chunk.rs` has its encoding).
pub(super) fn chunk_entries(ck: &[u8], v: &[u8]) -> Result<Vec<(u64, Entry)>, String> {
    let base = ck
        .get(8..16)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .ok_or("bad index chunk key")?;
    Ok(chunk::decode(v)?
        .into_iter()
        .map(|(low, entry)| ((base << CHUNK_BITS) | u64::from(low), entry))
        .collect())
}

/// A chunk's entries with their sequence numbers' low bytes, in order.
pub(super) fn chunk_items(v: &[u8]) -> Result<Vec<(u8, Entry)>, String> {
    chunk::decode(v)
}

const PUT: u8 = 1;
/// A put of the same entry as the record's previous put (a fanout's copies
/// differ only in their key): 17 bytes instead of 56.
const PUT_AGAIN: u8 = 4;
const REMOVE: u8 = 2;
const DROP: u8 = 3;

/// An entry's state since the last checkpoint.
enum Slot {
    /// Put since the checkpoint; `fresh` when sled does not hold the key, so a
    /// removal before the next checkpoint needs nothing from sled.
    Put { entry: Entry, fresh: bool },
    /// Held by sled, removed since the checkpoint.
    Removed,
}

/// What changed since the last checkpoint, and the changes not yet written to
/// the log.
#[derive(Default)]
pub(super) struct Index {
    overlay: FoldMap<Key, Slot>,
    /// Queues whose entries sled still holds, to go at the next checkpoint.
    dropped: Vec<u64>,
    /// The next index record's payload.
    pending: Vec<u8>,
    /// The entry of the last put in `pending`.
    last_put: Option<Entry>,
}

/// What the index knows of a key without asking sled.
pub(super) enum Known {
    Entry(Entry),
    Removed,
    /// Ask sled.
    Unknown,
}

impl Index {
    pub fn get(&self, key: &Key) -> Known {
        match self.overlay.get(key) {
            Some(Slot::Put { entry, .. }) => Known::Entry(*entry),
            Some(Slot::Removed) => Known::Removed,
            None => Known::Unknown,
        }
    }

    /// Puts an entry; returns the entry it replaced since the checkpoint, if any.
    pub fn put(&mut self, key: Key, entry: Entry) -> Option<Entry> {
        if self.last_put == Some(entry) {
            self.pending.push(PUT_AGAIN);
            self.pending.extend_from_slice(&key);
        } else {
            self.pending.push(PUT);
            self.pending.extend_from_slice(&key);
            self.pending.push(ENTRY_LEN as u8);
            self.pending.extend_from_slice(&entry);
            self.last_put = Some(entry);
        }
        match self.overlay.get_mut(&key) {
            Some(Slot::Put { entry: old, .. }) => Some(std::mem::replace(old, entry)),
            Some(slot @ Slot::Removed) => {
                *slot = Slot::Put {
                    entry,
                    fresh: false,
                };
                None
            }
            None => {
                // Sequence numbers are not reused while an entry holds one, so a
                // key the overlay does not know is not in sled either.
                self.overlay.insert(key, Slot::Put { entry, fresh: true });
                None
            }
        }
    }

    /// Removes an entry: `in_sled` is sled's entry for the key, asked only when
    /// the overlay does not know it. Returns the entry removed, if there was one.
    pub fn remove(&mut self, key: Key, in_sled: impl FnOnce() -> Option<Entry>) -> Option<Entry> {
        let removed = match self.overlay.remove(&key) {
            Some(Slot::Put { entry, fresh: true }) => Some(entry),
            Some(Slot::Put {
                entry,
                fresh: false,
            }) => {
                self.overlay.insert(key, Slot::Removed);
                Some(entry)
            }
            Some(Slot::Removed) => {
                self.overlay.insert(key, Slot::Removed);
                None
            }
            None => {
                let old = in_sled();
                if old.is_some() {
                    self.overlay.insert(key, Slot::Removed);
                }
                old
            }
        };
        if removed.is_some() {
            self.pending.push(REMOVE);
            self.pending.extend_from_slice(&key);
        }
        removed
    }

    /// Drops every entry of a queue: the overlay's now, sled's at the next
    /// checkpoint. Returns the entries put since the checkpoint, and the keys
    /// already removed there (which sled still holds, and which were released
    /// when they were removed).
    pub fn drop_queue(&mut self, queue: u64) -> (Vec<Entry>, Vec<Key>) {
        self.pending.push(DROP);
        self.pending.extend_from_slice(&queue.to_be_bytes());
        self.dropped.push(queue);
        let prefix = queue.to_be_bytes();
        let keys: Vec<Key> = self
            .overlay
            .keys()
            .filter(|k| k[..8] == prefix)
            .copied()
            .collect();
        let mut put = Vec::new();
        let mut removed = Vec::new();
        for k in keys {
            match self.overlay.remove(&k) {
                Some(Slot::Put { entry, .. }) => put.push(entry),
                Some(Slot::Removed) => removed.push(k),
                None => {}
            }
        }
        (put, removed)
    }

    /// The changes not yet written to the log, as one index record's payload
    /// (its buffer is reused: `clear_pending` once it is written).
    pub fn pending(&self) -> Option<&[u8]> {
        (!self.pending.is_empty()).then_some(&self.pending[..])
    }

    pub fn clear_pending(&mut self) {
        self.pending.clear();
        self.last_put = None;
    }

    pub fn len(&self) -> usize {
        self.overlay.len()
    }

    pub fn is_empty(&self) -> bool {
        self.overlay.is_empty() && self.dropped.is_empty()
    }

    /// Applies everything since the checkpoint to sled's chunks; the overlay
    /// empties. Dropped queues go first (their ids are never used again), then
    /// each touched chunk is read, changed and written back once.
    pub fn drain_into(&mut self, tree: &sled::Tree) -> Result<(), String> {
        let e = |e: sled::Error| e.to_string();
        for queue in std::mem::take(&mut self.dropped) {
            let mut batch = sled::Batch::default();
            for kv in tree.scan_prefix(queue.to_be_bytes()) {
                batch.remove(kv.map_err(e)?.0);
            }
            tree.apply_batch(batch).map_err(e)?;
        }
        let mut slots: Vec<(Key, Slot)> = self.overlay.drain().collect();
        slots.sort_unstable_by_key(|(k, _)| *k);
        let mut batch = sled::Batch::default();
        let mut in_batch = 0usize;
        let mut i = 0;
        while i < slots.len() {
            let ck = chunk_key(&slots[i].0);
            let mut items: std::collections::BTreeMap<u8, Entry> = match tree.get(ck).map_err(e)? {
                Some(v) => match chunk::decode(&v) {
                    Ok(entries) => entries.into_iter().collect(),
                    // Start-up reported it and served none of its entries; the
                    // changes for its range replace it rather than stop every
                    // later checkpoint (and lose the overlay drained so far).
                    Err(why) => {
                        tracing::error!("index chunk {ck:02x?} is unreadable ({why}); replaced by the entries changed since");
                        Default::default()
                    }
                },
                None => Default::default(),
            };
            while i < slots.len() && chunk_key(&slots[i].0) == ck {
                let low = slots[i].0[15];
                match &slots[i].1 {
                    Slot::Put { entry, .. } => {
                        items.insert(low, *entry);
                    }
                    Slot::Removed => {
                        items.remove(&low);
                    }
                }
                i += 1;
            }
            if items.is_empty() {
                batch.remove(&ck[..]);
            } else {
                batch.insert(&ck[..], chunk::encode(&items));
            }
            in_batch += 1;
            if in_batch == 256 {
                tree.apply_batch(std::mem::take(&mut batch)).map_err(e)?;
                in_batch = 0;
            }
        }
        tree.apply_batch(batch).map_err(e)?;
        Ok(())
    }

    /// Start-up: one index record read back from the log, applied to the
    /// overlay as it was when written (a removal marks the key whether or not
    /// sled holds it; nothing is released, the counts come later from sled).
    pub fn replay(&mut self, mut record: &[u8]) -> Result<usize, String> {
        let mut n = 0usize;
        let take = |r: &mut &[u8], len: usize| -> Result<Vec<u8>, String> {
            if r.len() < len {
                return Err("an index change is cut short".into());
            }
            let (h, t) = r.split_at(len);
            *r = t;
            Ok(h.to_vec())
        };
        let key = |b: Vec<u8>| -> Result<Key, String> {
            b.try_into().map_err(|_| "bad index key".to_string())
        };
        let mut last: Option<Entry> = None;
        while let Some((&tag, rest)) = record.split_first() {
            record = rest;
            match tag {
                PUT | PUT_AGAIN => {
                    let k = key(take(&mut record, 16)?)?;
                    let entry: Entry = if tag == PUT {
                        let len = take(&mut record, 1)?[0] as usize;
                        take(&mut record, len)?
                            .try_into()
                            .map_err(|_| "bad index entry length".to_string())?
                    } else {
                        last.ok_or("a repeated put with no put before it")?
                    };
                    last = Some(entry);
                    let fresh = !matches!(self.overlay.get(&k), Some(Slot::Removed));
                    self.overlay.insert(k, Slot::Put { entry, fresh });
                }
                REMOVE => {
                    let k = key(take(&mut record, 16)?)?;
                    self.overlay.insert(k, Slot::Removed);
                }
                DROP => {
                    let queue = take(&mut record, 8)?;
                    let queue = u64::from_be_bytes(
                        queue.try_into().map_err(|_| "bad queue id".to_string())?,
                    );
                    self.drop_queue(queue);
                }
                other => return Err(format!("unknown index change {other}")),
            }
            n += 1;
        }
        self.clear_pending();
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(q: u64, s: u64) -> Key {
        let mut k = [0u8; 16];
        k[..8].copy_from_slice(&q.to_be_bytes());
        k[8..].copy_from_slice(&s.to_be_bytes());
        k
    }

    fn entry(n: u8) -> Entry {
        [n; ENTRY_LEN]
    }

    fn all(t: &sled::Tree) -> Vec<(u64, Entry)> {
        t.iter()
            .map(|kv| kv.unwrap())
            .flat_map(|(k, v)| chunk_entries(&k, &v).unwrap())
            .collect()
    }

    #[test]
    fn the_log_replayed_into_sled_gives_what_the_overlay_would_have() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("index").unwrap();
        let replayed_db = sled::Config::new().temporary(true).open().unwrap();
        let replayed = replayed_db.open_tree("index").unwrap();
        // The last checkpoint left (1,1), (1,300) in another chunk, and (2,1).
        let mut index = Index::default();
        for (q, s) in [(1, 1), (1, 300), (2, 1)] {
            index.put(key(q, s), entry(s as u8));
        }
        index.clear_pending();
        index.drain_into(&tree).unwrap();
        let mut setup = Index::default();
        for (q, s) in [(1, 1), (1, 300), (2, 1)] {
            setup.put(key(q, s), entry(s as u8));
        }
        setup.drain_into(&replayed).unwrap();
        assert_eq!(tree.len(), 3, "three chunks");

        let in_sled = |k: Key| {
            let v = tree.get(chunk_key(&k)).unwrap()?;
            let items = chunk_items(&v).unwrap();
            items.iter().find(|(low, _)| *low == k[15]).map(|(_, e)| *e)
        };
        index.put(key(1, 2), entry(2));
        index.put(key(1, 3), entry(3));
        // A fanout's copies: the same entry under other keys.
        index.put(key(1, 4), entry(3));
        index.put(key(1, 5), entry(3));
        assert_eq!(
            index.remove(key(1, 2), || in_sled(key(1, 2))),
            Some(entry(2))
        );
        assert_eq!(
            index.remove(key(1, 1), || in_sled(key(1, 1))),
            Some(entry(1))
        );
        assert_eq!(index.remove(key(1, 1), || in_sled(key(1, 1))), None, "once");
        assert_eq!(index.remove(key(1, 9), || in_sled(key(1, 9))), None);
        assert_eq!(
            index.remove(key(1, 300), || in_sled(key(1, 300))),
            Some(entry(44))
        );
        index.put(key(2, 2), entry(22));
        let (put, removed) = index.drop_queue(2);
        assert_eq!((put, removed), (vec![entry(22)], vec![]));
        let record = index.pending().unwrap().to_vec();
        index.clear_pending();
        // The fresh put and removed (1,2) never reaches sled through the overlay.
        assert!(!matches!(index.get(&key(1, 2)), Known::Entry(_)));
        index.drain_into(&tree).unwrap();
        assert_eq!(
            all(&tree),
            vec![(3, entry(3)), (4, entry(3)), (5, entry(3))]
        );
        assert_eq!(tree.len(), 1, "emptied chunks are removed");

        // Replayed, twice, as a crash after a checkpoint's flush would.
        for _ in 0..2 {
            let mut again = Index::default();
            assert_eq!(again.replay(&record).unwrap(), 9);
            again.drain_into(&replayed).unwrap();
            assert_eq!(all(&replayed), all(&tree));
        }
        assert!(Index::default().replay(&[PUT, 0, 1]).is_err());
        assert!(Index::default().replay(&[PUT_AGAIN; 17]).is_err());
        assert!(Index::default().replay(&[9]).is_err());
        // Damaged chunks are errors, not panics.
        assert!(chunk_entries(&[0; 16], &[chunk::V1, 1, 2]).is_err());
        assert!(chunk_entries(&[0; 3], &[chunk::V1]).is_err());
        assert!(chunk_entries(&[0; 16], &[7]).is_err());
    }
}
