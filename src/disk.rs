//! The free-disk alarm, as RabbitMQ's: the data directory's file system is checked
//! every few seconds, and below `limits.disk_free_limit` free bytes publishers are
//! blocked (the memory gauge's alarm) until space returns, so a full disk stops
//! intake before it can fail writes that were confirmed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::model::message::MemoryGauge;

const EVERY: Duration = Duration::from_secs(10);

/// Bytes available to an unprivileged writer on the file system holding `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path and `st` points to writable memory of
    // the right type; statvfs only writes into it.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs succeeded, so it filled the struct.
    let st = unsafe { st.assume_init() };
    // The field types differ between platforms (narrower on 32-bit ones).
    #[allow(clippy::unnecessary_cast)]
    let (blocks, size) = (st.f_bavail as u64, st.f_frsize as u64);
    Ok(blocks.saturating_mul(size))
}

/// Checks once and sets the alarm; returns the free bytes, if they could be read.
pub fn check(dir: &Path, limit: u64, gauge: &MemoryGauge) -> Option<u64> {
    match free_bytes(dir) {
        Ok(free) => {
            let low = free < limit;
            if gauge.set_disk_alarm(low) {
                if low {
                    tracing::warn!(
                        "disk alarm: {free} bytes free in {}, below disk_free_limit ({limit}): publishers blocked",
                        dir.display()
                    );
                } else {
                    tracing::info!("disk alarm cleared: {free} bytes free in {}", dir.display());
                }
            }
            Some(free)
        }
        Err(e) => {
            tracing::warn!("cannot read free disk space of {}: {e}", dir.display());
            None
        }
    }
}

/// Checks every few seconds until `stop` changes.
pub async fn watch(
    dir: PathBuf,
    limit: u64,
    gauge: Arc<MemoryGauge>,
    free: Arc<std::sync::atomic::AtomicU64>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        if let Some(n) = check(&dir, limit, &gauge) {
            free.store(n, std::sync::atomic::Ordering::Relaxed);
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
}
