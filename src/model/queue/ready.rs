//! A queue's ready messages: one FIFO per priority level, with the counts that
//! length limits and the paging budget need.
//!
//! A backlog of millions is mostly entries whose bodies are on disk. As 32-byte
//! structs, 10M of them would cost 320 MB, so the middle of a long level is kept
//! encoded in blocks (about 4 bytes an entry for a paged-out message without
//! expiry) and only its two ends, where messages are taken and added, are plain
//! entries. Encoding changes nothing a message carries: an entry decoded from a
//! block is the entry that went in, body (if it had one in memory) included.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::model::message::Message;
use crate::varint::{self, unzigzag, zigzag, Reader};

/// Entries a block encodes; a level's newest part holds at most twice this many
/// plain entries before its oldest block of them is encoded.
const BLOCK: usize = 4096;

/// Entries a drained level may keep room for.
const SHRINK_ABOVE: usize = 16 * 1024;

pub(super) const NEVER: u64 = u64::MAX;
pub(super) const REDELIVERED: u8 = 1;
pub(super) const PERSISTED: u8 = 2;

/// A ready message as the queue holds it. A persisted message may be paged out:
/// then only what is needed to order, expire and find it on disk stays in memory.
/// 32 bytes: the ends of a backlog are these (the middle is encoded, see `Block`).
pub(super) struct Entry {
    pub seq: u64,
    /// When it expires (monotonic ms), or `NEVER`.
    pub expires_at: u64,
    /// None when paged out: the body is read back from the store for delivery.
    pub msg: Option<Arc<Message>>,
    /// Body bytes (max_message_size is at most 512 MiB).
    pub size: u32,
    /// Times it went back to the queue, saturating (x-delivery-limit counts
    /// these; a limit above 65,534 is never reached).
    pub returns: u16,
    pub level: u8,
    /// `REDELIVERED`, `PERSISTED`.
    pub flags: u8,
}

const _: () = assert!(std::mem::size_of::<Entry>() <= 32);

impl Entry {
    pub fn expires(&self) -> Option<u64> {
        (self.expires_at != NEVER).then_some(self.expires_at)
    }

    pub fn persisted(&self) -> bool {
        self.flags & PERSISTED != 0
    }

    pub fn redelivered(&self) -> bool {
        self.flags & REDELIVERED != 0
    }

    pub fn size(&self) -> usize {
        self.size as usize
    }

    pub fn expired(&self, now: u64) -> bool {
        self.expires().is_some_and(|t| now >= t)
    }

    fn resident_bytes(&self) -> usize {
        if self.msg.is_some() {
            self.size()
        } else {
            0
        }
    }
}

/// Ready messages, one FIFO per priority level (a single level without x-max-priority).
pub(super) struct Ready {
    levels: Vec<Level>,
    pub len: usize,
    /// Body bytes of every ready message (x-max-length-bytes counts these).
    pub bytes: usize,
    /// Body bytes held in memory (the paging budget counts these).
    pub resident: usize,
}

impl Ready {
    pub fn new(levels: usize) -> Ready {
        Ready {
            levels: (0..levels).map(|_| Level::default()).collect(),
            len: 0,
            bytes: 0,
            resident: 0,
        }
    }

    fn added(&mut self, e: &Entry) {
        self.len += 1;
        self.bytes += e.size();
        self.resident += e.resident_bytes();
    }

    fn removed(&mut self, e: &Entry) {
        self.len -= 1;
        self.bytes -= e.size();
        self.resident -= e.resident_bytes();
    }

    pub fn push_back(&mut self, e: Entry) {
        self.added(&e);
        self.levels[e.level as usize].push_back(e);
    }

    pub fn push_front(&mut self, e: Entry) {
        self.added(&e);
        self.levels[e.level as usize].front.push_front(e);
    }

    pub fn insert_by_seq(&mut self, e: Entry) {
        self.added(&e);
        self.levels[e.level as usize].insert_by_seq(e);
    }

    pub fn front(&self) -> Option<&Entry> {
        self.levels.iter().rev().find_map(|l| l.front())
    }

    pub fn pop_front(&mut self) -> Option<Entry> {
        let level = self.levels.iter_mut().rev().find(|l| !l.is_empty())?;
        let e = level.pop_front()?;
        self.removed(&e);
        Some(e)
    }

    /// Takes back the newest entry of `level` if it is `seq` (a message with a
    /// TTL of 0 that no consumer took at once).
    pub fn pop_back_if(&mut self, level: u8, seq: u64) -> Option<Entry> {
        let back = &mut self.levels[level as usize].back;
        if back.back().is_some_and(|e| e.seq == seq) {
            let e = back.pop_back()?;
            self.removed(&e);
            return Some(e);
        }
        None
    }

    /// The plain entries at the head of each level, highest first: where the
    /// next deliveries come from, and so the ones worth reading back.
    pub fn heads(&self, per_level: usize) -> impl Iterator<Item = &Entry> {
        self.levels
            .iter()
            .rev()
            .flat_map(move |l| l.head().take(per_level))
    }

    /// Attaches a body read back from the store to its paged-out entry (one of
    /// the first `within` of its level).
    pub fn attach(&mut self, seq: u64, msg: Arc<Message>, within: usize) {
        for level in self.levels.iter_mut().rev() {
            if let Some(e) = level
                .head_mut()
                .take(within)
                .find(|e| e.seq == seq && e.msg.is_none())
            {
                self.resident += e.size();
                e.msg = Some(msg);
                return;
            }
        }
    }

    /// Drops a paged-out entry whose message cannot be read back (one at the
    /// head of its level, where reads are asked for).
    pub fn remove_seq(&mut self, seq: u64) {
        for level in self.levels.iter_mut() {
            if let Some(e) = level.remove_plain(seq) {
                self.removed(&e);
                return;
            }
        }
    }

    /// Empties the queue, showing each entry to `gone`; returns how many there were.
    pub fn clear(&mut self, mut gone: impl FnMut(Entry)) -> usize {
        let n = self.len;
        for level in self.levels.iter_mut() {
            level.drain_into(&mut gone);
        }
        self.len = 0;
        self.bytes = 0;
        self.resident = 0;
        n
    }
}

/// One priority level, oldest first: `front`, then the blocks of `cold`, then
/// `back`. Publishes append to `back`; once it holds `2 * BLOCK` entries its
/// oldest `BLOCK` are encoded onto `cold` (or become `front` if that is empty).
/// Deliveries take from `front`, which is refilled from the oldest block when
/// it runs dry, so `cold` is never non-empty while `front` is empty.
#[derive(Default)]
struct Level {
    front: VecDeque<Entry>,
    cold: VecDeque<Block>,
    back: VecDeque<Entry>,
}

impl Level {
    fn is_empty(&self) -> bool {
        self.front.is_empty() && self.back.is_empty()
    }

    fn front(&self) -> Option<&Entry> {
        self.front.front().or_else(|| self.back.front())
    }

    fn push_back(&mut self, e: Entry) {
        self.back.push_back(e);
        if self.back.len() >= 2 * BLOCK {
            let oldest = self.back.drain(..BLOCK);
            if self.front.is_empty() {
                self.front.extend(oldest);
            } else {
                self.cold.push_back(Block::encode(oldest));
            }
        }
    }

    /// Requeued messages go back where they were: a delivered message came from
    /// the head, so it is older than every block and belongs in `front` (or in
    /// `back` when the level is that alone).
    fn insert_by_seq(&mut self, e: Entry) {
        let into_front = !self.cold.is_empty()
            || self.front.back().is_some_and(|f| e.seq < f.seq)
            || self.back.front().is_some_and(|b| e.seq < b.seq);
        let part = if into_front {
            &mut self.front
        } else {
            &mut self.back
        };
        let pos = part.partition_point(|r| r.seq < e.seq);
        part.insert(pos, e);
    }

    fn pop_front(&mut self) -> Option<Entry> {
        let Some(e) = self.front.pop_front() else {
            let e = self.back.pop_front();
            if self.back.is_empty() {
                shrink(&mut self.back);
            }
            return e;
        };
        if self.front.is_empty() {
            match self.cold.pop_front() {
                Some(block) => block.decode_into(&mut self.front, e.level),
                None => shrink(&mut self.front),
            }
        }
        Some(e)
    }

    /// The plain entries from the head: `front`, and `back` after it when no
    /// block lies between them.
    fn head(&self) -> impl Iterator<Item = &Entry> {
        let back = if self.cold.is_empty() { usize::MAX } else { 0 };
        self.front.iter().chain(self.back.iter().take(back))
    }

    fn head_mut(&mut self) -> impl Iterator<Item = &mut Entry> {
        let back = if self.cold.is_empty() { usize::MAX } else { 0 };
        self.front.iter_mut().chain(self.back.iter_mut().take(back))
    }

    fn remove_plain(&mut self, seq: u64) -> Option<Entry> {
        if let Some(i) = self.front.iter().position(|e| e.seq == seq) {
            let e = self.front.remove(i);
            if self.front.is_empty() {
                if let Some(block) = self.cold.pop_front() {
                    block.decode_into(&mut self.front, e.as_ref().map_or(0, |e| e.level));
                }
            }
            return e;
        }
        let i = self.back.iter().position(|e| e.seq == seq)?;
        self.back.remove(i)
    }

    fn drain_into(&mut self, gone: &mut impl FnMut(Entry)) {
        let level = self.front().map_or(0, |e| e.level);
        self.front.drain(..).for_each(&mut *gone);
        let mut plain = VecDeque::new();
        for block in self.cold.drain(..) {
            block.decode_into(&mut plain, level);
            plain.drain(..).for_each(&mut *gone);
        }
        self.back.drain(..).for_each(gone);
        shrink(&mut self.front);
        shrink(&mut self.back);
    }
}

/// A drained deque gives back its memory (it keeps its largest size otherwise:
/// 32 MB after a million entries).
fn shrink(d: &mut VecDeque<Entry>) {
    if d.capacity() > SHRINK_ABOVE {
        d.shrink_to_fit();
    }
}

/// `BLOCK` entries of one level, encoded: per entry a tag byte (its flags and
/// which fields follow), the seq as a signed difference from the previous one,
/// the body size, then the expiry (a signed difference from the previous
/// expiry) and the return count when they are not the usual NEVER and 0. Bodies
/// held in memory stay as they are, in order beside the bytes.
struct Block {
    bytes: Box<[u8]>,
    msgs: Box<[Arc<Message>]>,
}

const HAS_MSG: u8 = 4;
const HAS_EXPIRY: u8 = 8;
const HAS_RETURNS: u8 = 16;

impl Block {
    fn encode(entries: impl Iterator<Item = Entry>) -> Block {
        let mut bytes = Vec::with_capacity(BLOCK * 5);
        let mut msgs = Vec::new();
        let (mut seq, mut expiry) = (0u64, 0u64);
        for e in entries {
            let mut tag = e.flags & (REDELIVERED | PERSISTED);
            if e.msg.is_some() {
                tag |= HAS_MSG;
            }
            if e.expires_at != NEVER {
                tag |= HAS_EXPIRY;
            }
            if e.returns != 0 {
                tag |= HAS_RETURNS;
            }
            bytes.push(tag);
            varint::put(&mut bytes, zigzag(e.seq.wrapping_sub(seq)));
            seq = e.seq;
            varint::put(&mut bytes, u64::from(e.size));
            if e.expires_at != NEVER {
                varint::put(&mut bytes, zigzag(e.expires_at.wrapping_sub(expiry)));
                expiry = e.expires_at;
            }
            if e.returns != 0 {
                varint::put(&mut bytes, u64::from(e.returns));
            }
            if let Some(m) = e.msg {
                msgs.push(m);
            }
        }
        Block {
            bytes: bytes.into_boxed_slice(),
            msgs: msgs.into_boxed_slice(),
        }
    }

    /// Appends the block's entries, in order, to `out`. The bytes are only ever
    /// `encode`'s, from this process: a number cut short (which `encode` never
    /// writes) reads as 0 rather than stop the queue.
    fn decode_into(self, out: &mut VecDeque<Entry>, level: u8) {
        let mut r = Reader(&self.bytes);
        let mut msgs = self.msgs.into_vec().into_iter();
        let (mut seq, mut expiry) = (0u64, 0u64);
        while let Some(tag) = r.byte() {
            seq = seq.wrapping_add(unzigzag(r.varint().unwrap_or(0)));
            let size = r.varint().unwrap_or(0) as u32;
            let expires_at = if tag & HAS_EXPIRY != 0 {
                expiry = expiry.wrapping_add(unzigzag(r.varint().unwrap_or(0)));
                expiry
            } else {
                NEVER
            };
            let returns = if tag & HAS_RETURNS != 0 {
                r.varint().unwrap_or(0) as u16
            } else {
                0
            };
            let msg = if tag & HAS_MSG != 0 {
                msgs.next()
            } else {
                None
            };
            out.push_back(Entry {
                seq,
                expires_at,
                msg,
                size,
                returns,
                level,
                flags: tag & (REDELIVERED | PERSISTED),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64, expires_at: u64, returns: u16, flags: u8) -> Entry {
        Entry {
            seq,
            expires_at,
            msg: None,
            size: (seq * 37 % 70_000) as u32,
            returns,
            level: 3,
            flags,
        }
    }

    fn key(e: &Entry) -> (u64, u64, u32, u16, u8, u8, bool) {
        let m = e.msg.is_some();
        (e.seq, e.expires_at, e.size, e.returns, e.level, e.flags, m)
    }

    #[test]
    fn a_block_gives_back_the_entries_that_went_in() {
        let entries: Vec<Entry> = (0..BLOCK as u64)
            .map(|i| {
                let seq = 1_000_000_000_000 + i * 3;
                let expires = if i % 5 == 0 {
                    NEVER
                } else {
                    1 << 40 | (i * 7919)
                };
                entry(seq, expires, (i % 4) as u16 * 20_000, (i % 4) as u8)
            })
            .collect();
        let want: Vec<_> = entries.iter().map(key).collect();
        let mut out = VecDeque::new();
        Block::encode(entries.into_iter()).decode_into(&mut out, 3);
        let got: Vec<_> = out.iter().map(key).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_paged_out_entry_without_expiry_costs_about_four_bytes() {
        let block = Block::encode((0..BLOCK as u64).map(|i| Entry {
            size: 1024,
            ..entry(5_000_000 + i, NEVER, 0, PERSISTED)
        }));
        // Tag, seq difference and size: 1 + 1 + 2 bytes (the first seq takes more).
        assert!(block.bytes.len() <= 4 * BLOCK + 4, "{}", block.bytes.len());
    }

    #[test]
    fn a_long_level_keeps_its_order_through_blocks_and_requeues() {
        let mut ready = Ready::new(4);
        let n = 5 * BLOCK as u64 + 123;
        for seq in 0..n {
            ready.push_back(entry(seq, NEVER, 0, PERSISTED));
        }
        assert!(!ready.levels[3].cold.is_empty(), "the middle is encoded");
        let mut taken = Vec::new();
        for _ in 0..10 {
            taken.push(ready.pop_front().map(|e| e.seq));
        }
        // Two of them come back (a consumer's requeue), out of order.
        ready.insert_by_seq(entry(7, NEVER, 1, PERSISTED | REDELIVERED));
        ready.insert_by_seq(entry(2, NEVER, 1, PERSISTED | REDELIVERED));
        let mut order = Vec::new();
        while let Some(e) = ready.pop_front() {
            order.push(e.seq);
        }
        let mut want = vec![2, 7];
        want.extend(10..n);
        assert_eq!(order, want);
        assert_eq!((ready.len, ready.bytes), (0, 0));
    }

    #[test]
    fn clearing_shows_every_entry_once() {
        let mut ready = Ready::new(1);
        let n = 3 * BLOCK as u64 + 5;
        for seq in 0..n {
            ready.push_back(Entry {
                level: 0,
                ..entry(seq, NEVER, 0, PERSISTED)
            });
        }
        ready.pop_front();
        let mut seen = Vec::new();
        assert_eq!(ready.clear(|e| seen.push(e.seq)), n as usize - 1);
        assert_eq!(seen, (1..n).collect::<Vec<_>>());
        assert!(ready.front().is_none());
    }
}
