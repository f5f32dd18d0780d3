//! The value of an index chunk in sled: one queue's entries for 256 consecutive
//! sequence numbers.
//!
//! Why it is compact: sled keeps in memory every page it has read or written.
//! Its cache evicts only once 64 accesses have queued up for one of its 256
//! shards, and the chunk tree of a 10M backlog has only a few thousand pages
//! (a leaf holds up to 16 chunks), so after start-up's scan, or a drain that
//! rewrites every chunk, the whole index is resident: version 1, 39 bytes an
//! entry, cost 390 MB of memory for 10M messages. Version 2 writes each entry
//! as its differences from the one before: a run of one publisher's
//! same-sized messages costs 2 bytes an entry (a tag, and the store time's
//! difference), so the index is a twentieth of its former size on disk and in
//! sled's cache alike.
//!
//! Both versions are read; chunks are written in version 2.

use std::collections::BTreeMap;

use super::index::at::{LEN, NO_TTL, OFFSET, PRIORITY, SEG, SIZE, STORED_AT, TTL};
use super::index::{make_entry, Entry, ENTRY_LEN, IN_LOG, IN_LOG_NO_META};
use super::log::Location;
use crate::varint::{self, unzigzag, zigzag};

/// (sequence number's low byte, entry) pairs in order.
pub(super) const V1: u8 = 1;
/// Entries as differences (see `encode`).
pub(super) const V2: u8 = 2;
const V1_ITEM: usize = 1 + ENTRY_LEN;

// A version-2 item's tag. The low two bits: the entry's kind, or RAW for an
// entry of another kind, whose 38 bytes follow the tag as they are.
const RAW: u8 = 0;
const KIND_IN_LOG: u8 = 1;
const KIND_NO_META: u8 = 2;
const KIND_MASK: u8 = 3;
/// Its low byte is the previous item's plus one (else the low byte follows).
const NEXT: u8 = 4;
/// In the previous item's segment (else the segment follows).
const SAME_SEG: u8 = 8;
/// Its record starts where the previous item's ended (else the offset follows).
const CONTIGUOUS: u8 = 16;
/// Record length and body size as the previous item's (else both follow).
const SAME_SIZES: u8 = 32;
const HAS_PRIORITY: u8 = 64;
const HAS_TTL: u8 = 128;

fn u32_at(e: &Entry, i: usize) -> u32 {
    u32::from_be_bytes([e[i], e[i + 1], e[i + 2], e[i + 3]])
}

fn u64_at(e: &Entry, i: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&e[i..i + 8]);
    u64::from_be_bytes(b)
}

/// What the next item is written against.
#[derive(Default, Clone, Copy)]
struct Prev {
    low: Option<u8>,
    stored_at: u64,
    seg: Option<u32>,
    /// Where the previous record ended.
    end: Option<u64>,
    sizes: Option<(u32, u64)>,
}

impl Prev {
    fn advance(&mut self, low: u8, e: &Entry) {
        let (seg, offset, len) = (u32_at(e, SEG), u32_at(e, OFFSET), u32_at(e, LEN));
        *self = Prev {
            low: Some(low),
            stored_at: u64_at(e, STORED_AT),
            seg: Some(seg),
            end: Some(u64::from(offset) + u64::from(len)),
            sizes: Some((len, u64_at(e, SIZE))),
        };
    }
}

/// Writes a chunk's entries, in order of their low byte, as version 2.
pub(super) fn encode(items: &BTreeMap<u8, Entry>) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + items.len() * 3);
    out.push(V2);
    let mut prev = Prev::default();
    for (&low, e) in items {
        let kind = match e[0] {
            IN_LOG => KIND_IN_LOG,
            IN_LOG_NO_META => KIND_NO_META,
            _ => RAW,
        };
        let next = prev.low.map_or(low == 0, |p| p.checked_add(1) == Some(low));
        let mut tag = kind | if next { NEXT } else { 0 };
        if kind == RAW {
            out.push(tag);
            if !next {
                out.push(low);
            }
            out.extend_from_slice(e);
            // The next item is written against nothing but this one's low byte.
            prev = Prev {
                low: Some(low),
                ..Prev::default()
            };
            continue;
        }
        let (seg, offset, len) = (u32_at(e, SEG), u32_at(e, OFFSET), u32_at(e, LEN));
        let (size, ttl, priority) = (u64_at(e, SIZE), u64_at(e, TTL), e[PRIORITY]);
        let same_seg = prev.seg == Some(seg);
        let contiguous = same_seg && prev.end == Some(u64::from(offset));
        let same_sizes = prev.sizes == Some((len, size));
        tag |= if same_seg { SAME_SEG } else { 0 }
            | if contiguous { CONTIGUOUS } else { 0 }
            | if same_sizes { SAME_SIZES } else { 0 }
            | if priority != 0 { HAS_PRIORITY } else { 0 }
            | if ttl != NO_TTL { HAS_TTL } else { 0 };
        out.push(tag);
        if !next {
            out.push(low);
        }
        varint::put(
            &mut out,
            zigzag(u64_at(e, STORED_AT).wrapping_sub(prev.stored_at)),
        );
        if !same_seg {
            varint::put(&mut out, u64::from(seg));
        }
        if !contiguous {
            varint::put(&mut out, u64::from(offset));
        }
        if !same_sizes {
            varint::put(&mut out, u64::from(len));
            varint::put(&mut out, size);
        }
        if priority != 0 {
            out.push(priority);
        }
        if ttl != NO_TTL {
            varint::put(&mut out, ttl);
        }
        prev.advance(low, e);
    }
    out
}

/// A chunk's entries with their low bytes, in order; a value from disk is
/// checked as it is read, and one that does not parse is an error, never a panic.
pub(super) fn decode(v: &[u8]) -> Result<Vec<(u8, Entry)>, String> {
    match v.split_first() {
        Some((&V1, items)) => {
            if items.len() % V1_ITEM != 0 {
                return Err("index chunk is truncated".into());
            }
            let mut out: Vec<(u8, Entry)> = Vec::with_capacity(items.len() / V1_ITEM);
            for item in items.chunks_exact(V1_ITEM) {
                let entry: Entry = item[1..].try_into().map_err(|_| "bad index entry")?;
                if out.last().is_some_and(|(low, _)| *low >= item[0]) {
                    return Err("index chunk entries out of order".into());
                }
                out.push((item[0], entry));
            }
            Ok(out)
        }
        Some((&V2, items)) => decode_v2(items),
        _ => Err("unknown index chunk version".into()),
    }
}

fn decode_v2(items: &[u8]) -> Result<Vec<(u8, Entry)>, String> {
    let mut r = Reader(varint::Reader(items));
    let mut out: Vec<(u8, Entry)> = Vec::with_capacity(64);
    let mut prev = Prev::default();
    while let Some(tag) = r.byte() {
        let low = if tag & NEXT != 0 {
            match prev.low {
                None => 0,
                Some(p) => p
                    .checked_add(1)
                    .ok_or("index chunk runs past 256 entries")?,
            }
        } else {
            r.need_byte()?
        };
        if prev.low.is_some_and(|p| low <= p) {
            return Err("index chunk entries out of order".into());
        }
        let kind = match tag & KIND_MASK {
            RAW => {
                let e: Entry = r
                    .take(ENTRY_LEN)?
                    .try_into()
                    .map_err(|_| "bad index entry")?;
                out.push((low, e));
                prev = Prev {
                    low: Some(low),
                    ..Prev::default()
                };
                continue;
            }
            KIND_IN_LOG => IN_LOG,
            KIND_NO_META => IN_LOG_NO_META,
            _ => return Err("unknown index entry kind".into()),
        };
        let stored_at = prev.stored_at.wrapping_add(unzigzag(r.varint()?));
        let seg = match (tag & SAME_SEG != 0, prev.seg) {
            (true, Some(seg)) => seg,
            (true, None) => return Err("index entry refers to no previous segment".into()),
            (false, _) => r.u32()?,
        };
        let offset = match (tag & CONTIGUOUS != 0, prev.end) {
            (true, Some(end)) => u32::try_from(end).map_err(|_| "index entry offset too large")?,
            (true, None) => return Err("index entry refers to no previous record".into()),
            (false, _) => r.u32()?,
        };
        let (len, size) = match (tag & SAME_SIZES != 0, prev.sizes) {
            (true, Some(sizes)) => sizes,
            (true, None) => return Err("index entry refers to no previous sizes".into()),
            (false, _) => (r.u32()?, r.varint()?),
        };
        let priority = if tag & HAS_PRIORITY != 0 {
            r.need_byte()?
        } else {
            0
        };
        let ttl = if tag & HAS_TTL != 0 {
            r.varint()?
        } else {
            NO_TTL
        };
        let loc = Location { seg, offset, len };
        let e = make_entry(kind, stored_at, loc, priority, ttl, size);
        prev.advance(low, &e);
        out.push((low, e));
    }
    Ok(out)
}

/// The decoder's reads, each an error at the end of the value.
struct Reader<'a>(varint::Reader<'a>);

const TRUNCATED: &str = "index chunk is truncated";

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Option<u8> {
        self.0.byte()
    }

    fn need_byte(&mut self) -> Result<u8, String> {
        self.0.byte().ok_or_else(|| TRUNCATED.into())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        self.0.take(n).ok_or_else(|| TRUNCATED.into())
    }

    fn varint(&mut self) -> Result<u64, String> {
        self.0
            .varint()
            .ok_or_else(|| "index chunk is truncated or has an overlong number".into())
    }

    fn u32(&mut self) -> Result<u32, String> {
        u32::try_from(self.varint()?).map_err(|_| "index chunk number out of range".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: u8, stored_at: u64, seg: u32, offset: u32, len: u32) -> Entry {
        let loc = Location { seg, offset, len };
        let size = u64::from(len.saturating_sub(60));
        make_entry(kind, stored_at, loc, 0, NO_TTL, size)
    }

    fn decoded(items: &BTreeMap<u8, Entry>) -> BTreeMap<u8, Entry> {
        decode(&encode(items)).unwrap().into_iter().collect()
    }

    #[test]
    fn a_run_of_same_sized_messages_costs_two_bytes_an_entry() {
        let items: BTreeMap<u8, Entry> = (0..=255u8)
            .map(|i| {
                let at = 1_700_000_000_000 + u64::from(i) / 7;
                (i, entry(IN_LOG, at, 12, 4096 + u32::from(i) * 1100, 1100))
            })
            .collect();
        let v = encode(&items);
        assert!(v.len() < 1 + 256 * 2 + 16, "{} bytes", v.len());
        assert_eq!(decoded(&items), items);
    }

    #[test]
    fn every_field_and_kind_comes_back() {
        let mut items = BTreeMap::new();
        let mut odd = entry(9, 5, 1, 2, 3);
        odd[PRIORITY] = 7;
        items.insert(0, entry(IN_LOG, 1_000, 3, 100, 50));
        items.insert(1, entry(IN_LOG, 999, 3, 150, 50)); // earlier, contiguous
        items.insert(5, entry(IN_LOG_NO_META, 2_000, 4, 0, 70)); // a gap, new segment
        items.insert(6, odd); // an unknown kind
        let mut rich = entry(IN_LOG, 3_000, 4, 9_999, 70);
        rich[PRIORITY] = 9;
        rich[TTL..SIZE].copy_from_slice(&60_000u64.to_be_bytes());
        rich[SIZE..].copy_from_slice(&u64::MAX.to_be_bytes());
        items.insert(7, rich);
        items.insert(255, entry(IN_LOG, 0, u32::MAX, u32::MAX, u32::MAX));
        assert_eq!(decoded(&items), items);
    }

    #[test]
    fn version_1_is_still_read() {
        let e = entry(IN_LOG, 1, 2, 3, 4);
        let mut v = vec![V1, 17];
        v.extend_from_slice(&e);
        assert_eq!(decode(&v).unwrap(), vec![(17, e)]);
        // The same low byte twice is damage, as in version 2.
        v.push(17);
        v.extend_from_slice(&e);
        assert!(decode(&v).is_err());
    }

    #[test]
    fn damaged_values_are_errors() {
        let items: BTreeMap<u8, Entry> = (0..40u8)
            .map(|i| {
                (
                    i * 3,
                    entry(IN_LOG, u64::from(i) * 1000, 1, u32::from(i) * 7, 9),
                )
            })
            .collect();
        let v = encode(&items);
        for cut in 1..v.len() {
            // A cut at an item's boundary is a shorter chunk; anywhere else an error.
            if let Ok(got) = decode(&v[..cut]) {
                assert!(got.len() < items.len());
            }
        }
        assert!(decode(&[V2, NEXT | KIND_IN_LOG | SAME_SEG, 0]).is_err());
        assert!(decode(&[V2, 3]).is_err());
        assert!(decode(&[7]).is_err());
        assert!(decode(&[]).is_err());
        let mut overlong = vec![V2, KIND_IN_LOG | NEXT];
        overlong.extend_from_slice(&[0xff; 11]);
        assert!(decode(&overlong).is_err());
        // Out of order: a low byte at or below the one before.
        let mut v = vec![V2, RAW, 5];
        v.extend_from_slice(&[0; ENTRY_LEN]);
        v.extend_from_slice(&[RAW, 5]);
        v.extend_from_slice(&[0; ENTRY_LEN]);
        assert!(decode(&v).is_err());
    }
}
