//! The message index between checkpoints. Each change to a queue's entries (an
//! entry put, an entry removed, a queue's entries dropped) is written to the body
//! log as part of an index record, and kept here, in memory, until a checkpoint
//! applies them to sled in one batch. A group commit is then one fdatasync of the
//! log, and a message put and removed between two checkpoints never reaches sled
//! at all: that is what kept sled's page writes and CPU on every commit before.
//!
//! Start-up replays the index records written after the last checkpoint
//! (`log::replay`) into sled with [`apply_to_sled`]; every change is a plain set
//! or removal of a key, so replaying one that sled already holds changes nothing.

use std::collections::HashMap;
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

/// An entry that a removal took away: from the overlay, or sled's.
pub(super) enum Removed {
    Overlay(Entry),
    Sled(sled::IVec),
}

impl Removed {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Removed::Overlay(e) => e,
            Removed::Sled(v) => v,
        }
    }
}

const PUT: u8 = 1;
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
    /// The next index record's payload.
    pending: Vec<u8>,
}

/// What the index knows of a key without asking sled.
pub(super) enum Known<'a> {
    Entry(&'a [u8]),
    Removed,
    /// Ask sled.
    Unknown,
}

impl Index {
    pub fn get(&self, key: &Key) -> Known<'_> {
        match self.overlay.get(key) {
            Some(Slot::Put { entry, .. }) => Known::Entry(entry),
            Some(Slot::Removed) => Known::Removed,
            None => Known::Unknown,
        }
    }

    /// Puts an entry; returns the entry it replaced since the checkpoint, if any.
    pub fn put(&mut self, key: Key, entry: Entry) -> Option<Entry> {
        self.pending.push(PUT);
        self.pending.extend_from_slice(&key);
        self.pending.push(ENTRY_LEN as u8);
        self.pending.extend_from_slice(&entry);
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
    pub fn remove(
        &mut self,
        key: Key,
        in_sled: impl FnOnce() -> Option<sled::IVec>,
    ) -> Option<Removed> {
        let removed = match self.overlay.remove(&key) {
            Some(Slot::Put { entry, fresh: true }) => Some(Removed::Overlay(entry)),
            Some(Slot::Put {
                entry,
                fresh: false,
            }) => {
                self.overlay.insert(key, Slot::Removed);
                Some(Removed::Overlay(entry))
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
                old.map(Removed::Sled)
            }
        };
        if removed.is_some() {
            self.pending.push(REMOVE);
            self.pending.extend_from_slice(&key);
        }
        removed
    }

    /// Drops every entry of a queue from the overlay: returns the entries put
    /// since the checkpoint, and the keys already removed there (which sled
    /// still holds, and which were released when they were removed).
    pub fn drop_queue(&mut self, queue: u64) -> (Vec<Entry>, Vec<Key>) {
        self.pending.push(DROP);
        self.pending.extend_from_slice(&queue.to_be_bytes());
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
    }

    pub fn len(&self) -> usize {
        self.overlay.len()
    }

    pub fn is_empty(&self) -> bool {
        self.overlay.is_empty()
    }

    /// Everything since the checkpoint, as one sled batch; the overlay empties.
    pub fn drain_to_batch(&mut self) -> sled::Batch {
        let mut batch = sled::Batch::default();
        for (k, slot) in self.overlay.drain() {
            match slot {
                Slot::Put { entry, .. } => batch.insert(&k[..], &entry[..]),
                Slot::Removed => batch.remove(&k[..]),
            }
        }
        batch
    }
}

/// Applies one index record, read back at start-up, to sled's `messages` tree.
/// Returns how many changes it held.
pub(super) fn apply_to_sled(messages: &sled::Tree, mut record: &[u8]) -> Result<usize, String> {
    let mut batch = sled::Batch::default();
    let mut n = 0usize;
    let take = |r: &mut &[u8], len: usize| -> Result<Vec<u8>, String> {
        if r.len() < len {
            return Err("an index change is cut short".into());
        }
        let (h, t) = r.split_at(len);
        *r = t;
        Ok(h.to_vec())
    };
    while let Some((&tag, rest)) = record.split_first() {
        record = rest;
        match tag {
            PUT => {
                let key = take(&mut record, 16)?;
                let len = take(&mut record, 1)?[0] as usize;
                let entry = take(&mut record, len)?;
                batch.insert(key, entry);
            }
            REMOVE => batch.remove(take(&mut record, 16)?),
            DROP => {
                let queue = take(&mut record, 8)?;
                // What came before the drop in this record goes first.
                messages
                    .apply_batch(std::mem::take(&mut batch))
                    .map_err(|e| e.to_string())?;
                let mut drop = sled::Batch::default();
                for kv in messages.scan_prefix(&queue) {
                    let (k, _) = kv.map_err(|e| e.to_string())?;
                    drop.remove(k);
                }
                messages.apply_batch(drop).map_err(|e| e.to_string())?;
            }
            other => return Err(format!("unknown index change {other}")),
        }
        n += 1;
    }
    messages.apply_batch(batch).map_err(|e| e.to_string())?;
    Ok(n)
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

    #[test]
    fn the_log_replayed_into_sled_gives_what_the_overlay_would_have() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let messages = db.open_tree("messages").unwrap();
        // sled holds (1,1) and (2,1) from the last checkpoint.
        messages.insert(key(1, 1), b"old-1".to_vec()).unwrap();
        messages.insert(key(2, 1), b"old-2".to_vec()).unwrap();
        let mut index = Index::default();
        let in_sled = |k: Key| messages.get(k).unwrap();
        let removed = |r: Option<Removed>| r.map(|r| r.bytes().to_vec());
        index.put(key(1, 2), entry(2));
        index.put(key(1, 3), entry(3));
        let gone = index.remove(key(1, 2), || in_sled(key(1, 2)));
        assert_eq!(removed(gone), Some(entry(2).to_vec()));
        let gone = index.remove(key(1, 1), || in_sled(key(1, 1)));
        assert_eq!(removed(gone), Some(b"old-1".to_vec()));
        let gone = index.remove(key(1, 1), || in_sled(key(1, 1)));
        assert!(gone.is_none(), "once");
        assert!(index.remove(key(1, 9), || in_sled(key(1, 9))).is_none());
        index.put(key(2, 2), entry(22));
        let (put, removed) = index.drop_queue(2);
        assert_eq!((put, removed), (vec![entry(22)], vec![]));
        let record = index.pending().unwrap().to_vec();
        index.clear_pending();
        // The fresh put and removed (1,2) never reaches sled through the overlay.
        assert_eq!(index.len(), 2);

        // Replayed: twice, as a crash after a checkpoint's flush would.
        let replayed = sled::Config::new().temporary(true).open().unwrap();
        let r = replayed.open_tree("messages").unwrap();
        r.insert(key(1, 1), b"old-1".to_vec()).unwrap();
        r.insert(key(2, 1), b"old-2".to_vec()).unwrap();
        for _ in 0..2 {
            assert_eq!(apply_to_sled(&r, &record).unwrap(), 6);
        }
        // The overlay's checkpoint on the original, with queue 2 dropped there as
        // the store's thread does.
        messages.remove(key(2, 1)).unwrap();
        messages.apply_batch(index.drain_to_batch()).unwrap();
        let all = |t: &sled::Tree| -> Vec<(Vec<u8>, Vec<u8>)> {
            t.iter()
                .map(|kv| kv.unwrap())
                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                .collect()
        };
        assert_eq!(all(&r), all(&messages));
        assert_eq!(all(&r), vec![(key(1, 3).to_vec(), entry(3).to_vec())]);
        assert!(apply_to_sled(&r, &[PUT, 0, 1]).is_err());
        assert!(apply_to_sled(&r, &[9]).is_err());
    }
}
