//! Message bodies in append-only segment files beside sled (`msgs/<id>.seg`):
//! each body is written once, however many queues hold it, and a segment file is
//! deleted as soon as no queue's index points into it, so the disk is given back
//! as a backlog drains. sled keeps the small per-queue index entries that point
//! here (`sled_store.rs`).
//!
//! The log is also the index's write-ahead log: each batch's index changes
//! (entries put and removed, queues dropped) follow its bodies as one index
//! record, and a group commit is one fdatasync of the log. sled receives the
//! index changes only at a checkpoint (`index.rs`), which records the log
//! position it covers; start-up replays the index records after it. So the log
//! is read in order from a checkpoint, and a crash leaves a prefix of it: the
//! first torn record ends the replay.
//!
//! A record is its payload's length and CRC-32 (both u32, big-endian), then the
//! payload; an index record has the length's top bit set. Only the store's thread
//! writes: appends collect in a buffer that goes to the file in one write per
//! batch, and a group commit fdatasyncs the segments written since the last one
//! (and the directory, when it gained a file). A segment is deleted once no
//! entry points into it and a checkpoint lies beyond it, since the replay may
//! still need its index records until then.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Where a record is: its segment, the offset of its payload and its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Location {
    pub seg: u32,
    pub offset: u32,
    pub len: u32,
}

const RECORD_HEADER: usize = 8;

/// Set in an index record's length: body records are never that long.
const INDEX_FLAG: u32 = 0x8000_0000;

/// A place in the log: a segment and a byte offset in it (a record's start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Position {
    pub seg: u32,
    pub offset: u64,
}

/// An active segment nothing points into is replaced by a new one past this size.
const RESTART_AFTER: u64 = 8 * 1024 * 1024;

/// The segment files, opened for reading; shared by the store's thread and by
/// start-up's scans. Segments other than the active one never change.
#[derive(Default)]
pub(super) struct Segments {
    dir: PathBuf,
    files: Mutex<HashMap<u32, Arc<File>>>,
}

/// A segment's file in the body log's directory `dir`.
pub(super) fn segment_path(dir: &Path, seg: u32) -> PathBuf {
    dir.join(format!("{seg:08}.seg"))
}

impl Segments {
    fn path(&self, seg: u32) -> PathBuf {
        segment_path(&self.dir, seg)
    }

    fn file(&self, seg: u32) -> Result<Arc<File>, String> {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = files.get(&seg) {
            return Ok(f.clone());
        }
        let f = File::open(self.path(seg))
            .map(Arc::new)
            .map_err(|e| format!("segment {seg} cannot be opened: {e}"))?;
        files.insert(seg, f.clone());
        Ok(f)
    }

    fn forget(&self, seg: u32) {
        self.files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&seg);
    }

    /// Reads and checks the record at `loc` from its file. `loc` comes from disk:
    /// it is checked against the file before anything is allocated for it.
    pub fn read(&self, loc: Location) -> Result<Bytes, String> {
        let f = self.file(loc.seg)?;
        let file_len = f
            .metadata()
            .map_err(|e| format!("segment {}: {e}", loc.seg))?
            .len();
        let start = u64::from(loc.offset).checked_sub(RECORD_HEADER as u64);
        let Some(start) =
            start.filter(|s| s + RECORD_HEADER as u64 + u64::from(loc.len) <= file_len)
        else {
            return Err(format!(
                "segment {} at {}: the record ends past the segment's end; it was torn by a crash before it was confirmed, or lost",
                loc.seg, loc.offset
            ));
        };
        let mut buf = vec![0u8; RECORD_HEADER + loc.len as usize];
        f.read_exact_at(&mut buf, start).map_err(|e| {
            format!(
                "segment {} at {}: record cannot be read ({e}); it was torn by a crash before it was confirmed, or lost",
                loc.seg, loc.offset
            )
        })?;
        check(loc, &buf)?;
        let mut b = Bytes::from(buf);
        Ok(b.split_off(RECORD_HEADER))
    }
}

fn check(loc: Location, record: &[u8]) -> Result<(), String> {
    let len = u32::from_be_bytes([record[0], record[1], record[2], record[3]]);
    let crc = u32::from_be_bytes([record[4], record[5], record[6], record[7]]);
    if len != loc.len || crc32fast::hash(&record[RECORD_HEADER..]) != crc {
        return Err(format!(
            "segment {} at {}: the record does not match its checksum (torn by a crash before it was confirmed, or damaged)",
            loc.seg, loc.offset
        ));
    }
    Ok(())
}

/// The writing side, owned by the store's thread.
pub(super) struct BodyLog {
    pub segments: Arc<Segments>,
    segment_bytes: u64,
    active: u32,
    active_file: File,
    /// Bytes of the active segment, synced, written or still in `buf`.
    written: u64,
    /// Where the last successful sync of the active segment ended.
    synced: u64,
    /// Everything appended to the active segment since `synced`. Kept until a
    /// sync covers it: a write or fdatasync that fails (a full disk) is done
    /// again from here, at the same offsets, so that nothing appended is ever
    /// dropped while a later sync succeeds. Bounded by what the publishers send
    /// between two commits, or, while the disk is full, by the memory alarm.
    buf: Vec<u8>,
    /// How much of `buf` is in the file.
    on_file: usize,
    /// A failed write may have left part of `buf` in the file past `on_file`:
    /// it is cut off before anything else is written.
    trim: bool,
    /// Index entries pointing into each segment.
    live: HashMap<u32, u64>,
    /// A segment was created since the directory was last synced.
    dir_dirty: bool,
    /// Segments no index entry points into any more: deleted once a
    /// checkpoint past them is durable (`checkpointed`).
    dead: Vec<u32>,
    /// Segments before this one are behind the durable checkpoint.
    checkpoint_seg: u32,
    /// Bytes appended since the last checkpoint: what a start-up would replay.
    since_checkpoint: u64,
}

impl BodyLog {
    /// Opens `dir` (created if missing) and starts a new active segment after
    /// the ones there. Until `count_live` says how many index entries point into
    /// each, the old segments are all kept.
    pub fn open(dir: &Path, segment_bytes: u64) -> std::io::Result<Self> {
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            // The directory's own name must be durable before anything synced in
            // it can be: a power cut could otherwise lose every segment at once.
            if let Some(parent) = dir.parent() {
                File::open(parent)?.sync_all()?;
            }
        }
        let mut existing = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let name = entry?.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            existing.push(id);
        }
        existing.sort_unstable();
        let segments = Arc::new(Segments {
            dir: dir.to_path_buf(),
            files: Mutex::default(),
        });
        let active = existing.last().map_or(1, |last| last + 1);
        let active_file = std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(segments.path(active))?;
        Ok(BodyLog {
            segments,
            segment_bytes: segment_bytes.clamp(1 << 16, u32::MAX as u64 / 2),
            active,
            active_file,
            written: 0,
            synced: 0,
            buf: Vec::new(),
            on_file: 0,
            trim: false,
            live: HashMap::new(),
            dir_dirty: true,
            dead: existing,
            checkpoint_seg: 0,
            since_checkpoint: 0,
        })
    }

    /// Start-up: how many index entries point into each segment (from sled's
    /// index). Segments without any are deleted once the caller has
    /// checkpointed past them (`checkpointed`, then `collect`).
    pub fn count_live(&mut self, live: HashMap<u32, u64>) {
        self.live = live;
    }

    /// Where the next record goes.
    pub fn position(&self) -> Position {
        Position {
            seg: self.active,
            offset: self.written,
        }
    }

    /// Bytes appended since the last checkpoint.
    pub fn since_checkpoint(&self) -> u64 {
        self.since_checkpoint
    }

    /// A checkpoint at `pos` is durable: the replay starts there, so dead
    /// segments before it may go.
    pub fn checkpointed(&mut self, pos: Position) {
        self.checkpoint_seg = pos.seg;
        self.since_checkpoint = 0;
    }

    /// Appends an index record (the index changes of one batch).
    pub fn append_index(&mut self, payload: &[u8]) -> std::io::Result<()> {
        self.append_record(payload.len() as u32 | INDEX_FLAG, &[payload])
            .map(|_| ())
    }

    /// Appends a body record made of `parts` and counts one index entry into it.
    pub fn append(&mut self, parts: &[&[u8]]) -> std::io::Result<Location> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len >= INDEX_FLAG as usize {
            return Err(std::io::Error::other("a message body of 2 GiB or more"));
        }
        let loc = self.append_record(len as u32, parts)?;
        *self.live.entry(self.active).or_default() += 1;
        Ok(loc)
    }

    fn append_record(&mut self, tagged_len: u32, parts: &[&[u8]]) -> std::io::Result<Location> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let size = (RECORD_HEADER + len) as u64;
        if self.written > 0 && self.written + size > self.segment_bytes {
            self.roll();
        }
        let mut crc = crc32fast::Hasher::new();
        for p in parts {
            crc.update(p);
        }
        self.buf.extend_from_slice(&tagged_len.to_be_bytes());
        self.buf.extend_from_slice(&crc.finalize().to_be_bytes());
        for p in parts {
            self.buf.extend_from_slice(p);
        }
        let loc = Location {
            seg: self.active,
            offset: (self.written + RECORD_HEADER as u64) as u32,
            len: len as u32,
        };
        self.written += size;
        self.since_checkpoint += size;
        Ok(loc)
    }

    /// One more index entry points at a record already written.
    pub fn add_ref(&mut self, seg: u32) {
        *self.live.entry(seg).or_default() += 1;
    }

    /// An index entry into `seg` is gone.
    pub fn release(&mut self, seg: u32) {
        if let Some(n) = self.live.get_mut(&seg) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.live.remove(&seg);
                if seg != self.active {
                    self.dead.push(seg);
                }
            }
        }
    }

    /// Reads a record, also one not yet synced (from memory).
    pub fn read(&mut self, loc: Location) -> Result<Bytes, String> {
        if loc.seg == self.active {
            if let Some(start) =
                (u64::from(loc.offset)).checked_sub(self.synced + RECORD_HEADER as u64)
            {
                let start = start as usize;
                let record = self
                    .buf
                    .get(start..start + RECORD_HEADER + loc.len as usize)
                    .ok_or_else(|| {
                        format!(
                            "segment {} at {}: past what was appended",
                            loc.seg, loc.offset
                        )
                    })?;
                check(loc, record)?;
                return Ok(Bytes::copy_from_slice(&record[RECORD_HEADER..]));
            }
        }
        self.segments.read(loc)
    }

    /// Writes what of `buf` is not in the file yet. On failure, cuts off what
    /// part of it reached the file (that needs no space), so that the next
    /// attempt writes it again at the same offsets.
    fn write_out(&mut self) -> std::io::Result<()> {
        if self.trim {
            self.trim_file()?;
        }
        if self.on_file < self.buf.len() {
            if let Err(e) = self.active_file.write_all(&self.buf[self.on_file..]) {
                self.rewrite_from(self.on_file);
                return Err(e);
            }
            self.on_file = self.buf.len();
        }
        Ok(())
    }

    /// Counts only the first `on_file` bytes of `buf` as in the file and cuts
    /// the file there, now if it can, else before the next write.
    fn rewrite_from(&mut self, on_file: usize) {
        self.on_file = on_file;
        self.trim = true;
        let _ = self.trim_file();
    }

    fn trim_file(&mut self) -> std::io::Result<()> {
        self.active_file
            .set_len(self.synced + self.on_file as u64)?;
        self.trim = false;
        Ok(())
    }

    /// The active segment is full: it is synced whole, and the next one starts.
    /// If either fails (a full disk), the active segment grows past its size
    /// and the next append tries again.
    fn roll(&mut self) {
        if let Err(e) = self.sync() {
            tracing::debug!("cannot finish message segment {}: {e}", self.active);
            return;
        }
        let next = self.active + 1;
        let file = match std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(self.segments.path(next))
        {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!("cannot start message segment {next}: {e}");
                return;
            }
        };
        drop(std::mem::replace(&mut self.active_file, file));
        let old = std::mem::replace(&mut self.active, next);
        self.written = 0;
        self.synced = 0;
        self.dir_dirty = true;
        if !self.live.contains_key(&old) {
            self.dead.push(old);
        }
    }

    /// Writes out and fdatasyncs what was appended since the last sync. On
    /// failure nothing is dropped: the next sync writes it again.
    pub fn sync(&mut self) -> std::io::Result<()> {
        self.write_out()?;
        if !self.buf.is_empty() {
            if let Err(e) = self.active_file.sync_data() {
                // The kernel may drop pages it failed to write back, and clean
                // them: all of `buf` is written again next time.
                self.rewrite_from(0);
                return Err(e);
            }
        }
        if self.dir_dirty {
            File::open(&self.segments.dir)?.sync_all()?;
            self.dir_dirty = false;
        }
        self.synced = self.written;
        self.buf.clear();
        self.on_file = 0;
        Ok(())
    }

    /// After a commit: the active segment is replaced once it holds
    /// `RESTART_AFTER` and nothing points into it, so that a steady
    /// publish-ack flow leaves whole dead segments behind; after a checkpoint,
    /// the dead segments before it are deleted, so a drained backlog leaves
    /// little.
    pub fn collect(&mut self) {
        let restart_after = RESTART_AFTER.min(self.segment_bytes / 2);
        if self.written >= restart_after && !self.live.contains_key(&self.active) {
            self.roll();
        }
        let checkpoint = self.checkpoint_seg;
        let mut waiting = Vec::new();
        for seg in std::mem::take(&mut self.dead) {
            if self.live.contains_key(&seg) || seg == self.active {
                continue;
            }
            if seg >= checkpoint {
                waiting.push(seg);
                continue;
            }
            self.segments.forget(seg);
            if let Err(e) = std::fs::remove_file(self.segments.path(seg)) {
                tracing::warn!("cannot delete message segment {seg}: {e}");
            }
        }
        self.dead = waiting;
    }

    /// How many segments nothing points into wait for a checkpoint to go.
    pub fn dead_waiting(&self) -> usize {
        self.dead.len()
    }
}

/// Where a replay ended, and why if it was not the clean end of the log.
pub(super) struct ReplayEnd {
    /// A torn or damaged record, which a crash leaves at the end of what it
    /// interrupted; everything after it was never synced, so never confirmed.
    pub torn: Option<String>,
    pub records: u64,
}

/// Reads the log in order from `from`, handing each index record's payload to
/// `apply`, and checking every record's checksum on the way. It ends at the
/// first record that is missing, torn or fails its checksum: whatever a crash
/// left after that was never covered by a completed sync. Segments are read in
/// order of their numbers; the first missing one ends the log.
pub(super) fn replay(
    dir: &Path,
    from: Position,
    mut apply: impl FnMut(&[u8]) -> Result<(), String>,
) -> std::io::Result<ReplayEnd> {
    use std::io::Read;
    let mut at = from;
    let mut records = 0u64;
    let mut payload = Vec::new();
    loop {
        let file = match File::open(segment_path(dir, at.seg)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(ReplayEnd {
                    torn: None,
                    records,
                })
            }
            Err(e) => return Err(e),
        };
        let file_len = file.metadata()?.len();
        let mut r = std::io::BufReader::with_capacity(1 << 20, file);
        std::io::Seek::seek(&mut r, std::io::SeekFrom::Start(at.offset))?;
        let torn = |at: Position, why: &str, records: u64| ReplayEnd {
            torn: Some(format!("segment {} at {}: {why}", at.seg, at.offset)),
            records,
        };
        loop {
            let left = file_len.saturating_sub(at.offset);
            if left == 0 {
                break;
            }
            if left < RECORD_HEADER as u64 {
                return Ok(torn(at, "a record header is cut short", records));
            }
            let mut header = [0u8; RECORD_HEADER];
            r.read_exact(&mut header)?;
            let tagged = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
            let crc = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
            let len = u64::from(tagged & !INDEX_FLAG);
            // Checked against the file before anything is allocated for it.
            if len > left - RECORD_HEADER as u64 {
                return Ok(torn(at, "a record runs past the segment's end", records));
            }
            payload.resize(len as usize, 0);
            r.read_exact(&mut payload)?;
            if crc32fast::hash(&payload) != crc {
                return Ok(torn(at, "a record does not match its checksum", records));
            }
            if tagged & INDEX_FLAG != 0 {
                if let Err(why) = apply(&payload) {
                    let why = format!("an index record is unreadable: {why}");
                    return Ok(torn(at, &why, records));
                }
                records += 1;
            }
            at.offset += RECORD_HEADER as u64 + len;
        }
        at = Position {
            seg: at.seg + 1,
            offset: 0,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("warrenmq-log-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn files(d: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn records_read_back_and_a_flipped_byte_is_caught() {
        let d = dir("read");
        let mut log = BodyLog::open(&d, 1 << 20).unwrap();
        let a = log.append(&[b"hello ", b"world"]).unwrap();
        let b = log.append(&[b"second"]).unwrap();
        assert_eq!(&log.read(a).unwrap()[..], b"hello world");
        log.sync().unwrap();
        assert_eq!(&log.read(b).unwrap()[..], b"second");
        let path = d.join("00000001.seg");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[b.offset as usize] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        log.segments.forget(1);
        assert!(log.read(b).unwrap_err().contains("checksum"));
        assert_eq!(&log.read(a).unwrap()[..], b"hello world");
        // Locations come from disk: nonsense ones are errors, never a panic or a
        // huge allocation.
        for bad in [
            Location {
                seg: 1,
                offset: 3,
                len: 4,
            },
            Location {
                seg: 1,
                offset: 8,
                len: u32::MAX,
            },
            Location {
                seg: 9,
                offset: 8,
                len: 1,
            },
        ] {
            assert!(log.read(bad).is_err(), "{bad:?}");
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_segment_goes_once_nothing_points_into_it_and_a_checkpoint_is_past_it() {
        let d = dir("gc");
        let mut log = BodyLog::open(&d, 1 << 16).unwrap();
        let big = vec![7u8; 40_000];
        let first = log.append(&[&big]).unwrap();
        let second = log.append(&[&big]).unwrap();
        assert_ne!(first.seg, second.seg, "the first segment is full");
        log.add_ref(first.seg);
        log.sync().unwrap();
        log.release(first.seg);
        log.collect();
        assert_eq!(files(&d).len(), 2, "one reference is left");
        log.release(first.seg);
        log.sync().unwrap();
        log.collect();
        assert_eq!(
            files(&d).len(),
            2,
            "no checkpoint since: its index records count"
        );
        log.checkpointed(log.position());
        log.collect();
        assert_eq!(files(&d), ["00000002.seg"]);
        // Once nothing points into the active one either, it goes too.
        log.release(second.seg);
        log.sync().unwrap();
        log.collect();
        log.checkpointed(log.position());
        log.collect();
        assert_eq!(files(&d), ["00000003.seg"]);
        drop(log);
        // At start-up, a segment that no index entry counts goes after the
        // first checkpoint.
        let mut log = BodyLog::open(&d, 1 << 16).unwrap();
        assert_eq!(files(&d), ["00000003.seg", "00000004.seg"]);
        log.checkpointed(log.position());
        log.collect();
        assert_eq!(files(&d), ["00000004.seg"]);
        drop(log);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn the_replay_reads_index_records_in_order_and_stops_at_a_torn_one() {
        let d = dir("replay");
        let mut log = BodyLog::open(&d, 1 << 16).unwrap();
        let start = log.position();
        let body = vec![1u8; 30_000];
        for i in 0..5u8 {
            log.append(&[&body]).unwrap();
            log.append_index(&[i; 10]).unwrap();
        }
        log.sync().unwrap();
        assert!(log.position().seg > start.seg, "the records span segments");
        let read = |from: Position| {
            let mut seen = Vec::new();
            let end = replay(&d, from, |r| {
                seen.push(r[0]);
                Ok(())
            })
            .unwrap();
            (seen, end.torn)
        };
        assert_eq!(read(start), (vec![0, 1, 2, 3, 4], None));
        // The last segment's tail torn by a crash: the replay ends before it.
        let last = segment_path(&d, log.position().seg);
        let len = std::fs::metadata(&last).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&last)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let (seen, torn) = read(start);
        assert_eq!(seen, [0, 1, 2, 3]);
        assert!(torn.unwrap().contains("past the segment's end"));
        // A damaged record earlier: nothing after it is replayed, in any segment.
        let first = segment_path(&d, start.seg);
        let mut bytes = std::fs::read(&first).unwrap();
        bytes[RECORD_HEADER + 100] ^= 1;
        std::fs::write(&first, bytes).unwrap();
        let (seen, torn) = read(start);
        assert_eq!(seen, Vec::<u8>::new());
        assert!(torn.unwrap().contains("checksum"));
        // An unreadable index record under a valid checksum ends it too.
        let end = replay(
            &d,
            Position {
                seg: start.seg + 1,
                offset: 0,
            },
            |_| Err("no".into()),
        )
        .unwrap();
        assert!(end.torn.unwrap().contains("unreadable"));
        drop(log);
        let _ = std::fs::remove_dir_all(&d);
    }
}
