//! Space kept back for a full disk: a file of `RESERVE_BYTES` in the data
//! directory, given up when a write fails for want of space. A disk that filled
//! up (the free-disk alarm off, or something else filling it) would otherwise
//! hold the broker stuck: the records it could not write block every later
//! commit, so consumers' acks are never durable, no checkpoint runs, and the
//! segments a drained backlog leaves are never deleted. With the reserve given
//! up, what was waiting is written, acks and checkpoints go on, the segments go,
//! and the reserve is taken again once there is room for it twice over.

use std::fs::File;
use std::path::{Path, PathBuf};

/// What the reserve holds: room for the records in flight when the disk filled
/// (publishers are blocked from then on) and for the checkpoints after.
pub(super) const RESERVE_BYTES: u64 = 16 * 1024 * 1024;

pub(super) struct Reserve {
    path: PathBuf,
    held: bool,
    /// Given up for a full disk and not taken again yet.
    released: bool,
}

impl Reserve {
    /// The reserve of `data_dir`, taken now if it is not there and there is room.
    pub(super) fn open(data_dir: &Path) -> Reserve {
        let path = data_dir.join("reserve");
        let held = std::fs::metadata(&path).is_ok_and(|m| m.len() >= RESERVE_BYTES);
        let mut r = Reserve {
            path,
            held,
            released: false,
        };
        r.take_if_room(data_dir);
        r
    }

    /// Whether it was given up for a full disk and is not back yet.
    pub(super) fn released(&self) -> bool {
        self.released
    }

    /// Gives the space up; whether there was any to give.
    pub(super) fn release(&mut self) -> bool {
        if !self.held {
            return false;
        }
        self.held = false;
        self.released = true;
        match std::fs::remove_file(&self.path) {
            Ok(()) => {
                tracing::warn!(
                    "the disk is full: released the {} MiB kept in {} for this",
                    RESERVE_BYTES >> 20,
                    self.path.display()
                );
                true
            }
            Err(e) => {
                tracing::error!("cannot release {}: {e}", self.path.display());
                false
            }
        }
    }

    /// Takes the reserve again once the file system has room for it three times
    /// over (it, and as much again free after it).
    pub(super) fn take_if_room(&mut self, data_dir: &Path) {
        if self.held {
            return;
        }
        match crate::disk::free_bytes(data_dir) {
            Ok(free) if free >= 3 * RESERVE_BYTES => {}
            _ => return,
        }
        match allocate(&self.path, RESERVE_BYTES) {
            Ok(()) => {
                self.held = true;
                self.released = false;
            }
            Err(e) => {
                tracing::warn!("cannot keep {} in reserve: {e}", self.path.display());
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// A file of `len` bytes whose blocks are allocated, not a sparse one.
fn allocate(path: &Path, len: u64) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::io::AsRawFd;
    let mut f = File::create(path)?;
    let Ok(n) = libc::off_t::try_from(len) else {
        return Err(std::io::Error::other("reserve size out of range"));
    };
    // SAFETY: `f` is an open file descriptor for the duration of the call.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, n) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(e);
        }
        // No fallocate on this file system: zeros take the blocks.
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..len.div_ceil(zeros.len() as u64) {
            f.write_all(&zeros)?;
        }
    }
    f.sync_all()
}
