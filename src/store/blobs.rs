//! sled's blob files, which sled never syncs: the store syncs them itself at each
//! group commit, before releasing its waiters.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

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
pub(super) struct Blobs {
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
    pub(super) fn open(data_dir: &Path) -> std::io::Result<Blobs> {
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
    pub(super) fn sync(&mut self) -> std::io::Result<()> {
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
