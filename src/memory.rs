//! The memory alarm's view of the process, as RabbitMQ's `rss` strategy: what the
//! kernel counts as resident (what an OOM killer or a container limit acts on,
//! not only the message bodies the gauge adds up), checked every second against
//! the watermark, and a watermark that never exceeds a share of the memory the
//! process may use (the cgroup's limit in a container, else the machine's RAM).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::model::message::MemoryGauge;

const EVERY: Duration = Duration::from_secs(1);

/// Resident bytes of this process (/proc/self/statm), if the platform says.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages.saturating_mul(u64::try_from(page).ok().filter(|&p| p > 0)?))
}

/// The memory this process may use: the smallest of the machine's RAM and the
/// limit of its cgroup (v2 `memory.max`, v1 `memory.limit_in_bytes`).
pub fn available_bytes() -> Option<u64> {
    let ram = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| mem_total(&m));
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|c| cgroup_limit(&c, Path::new("/sys/fs/cgroup")));
    match (ram, cgroup) {
        (Some(r), Some(c)) => Some(r.min(c)),
        (r, c) => r.or(c),
    }
}

/// `MemTotal` of /proc/meminfo, in bytes.
fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// The memory limit of the cgroup named in /proc/self/cgroup (`cgroup`), read
/// under `root`; None when there is none ("max", or v1's "no limit" value).
fn cgroup_limit(cgroup: &str, root: &Path) -> Option<u64> {
    let read = |p: &Path| -> Option<u64> {
        let text = std::fs::read_to_string(p).ok()?;
        let v: u64 = text.trim().parse().ok()?;
        // v1 writes "no limit" as a huge number near i64::MAX.
        (v < 1 << 60).then_some(v)
    };
    for line in cgroup.lines() {
        // v2: "0::/path"; v1: "N:memory:/path" (or with other controllers).
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        if controllers.is_empty() {
            let found =
                read(&root.join(rel).join("memory.max")).or_else(|| read(&root.join("memory.max")));
            if found.is_some() {
                return found;
            }
        } else if controllers.split(',').any(|c| c == "memory") {
            let dir = root.join("memory");
            let found = read(&dir.join(rel).join("memory.limit_in_bytes"))
                .or_else(|| read(&dir.join("memory.limit_in_bytes")));
            if found.is_some() {
                return found;
            }
        }
    }
    None
}

/// The watermark in force: the configured bytes, but never above `relative` of
/// the memory the process may use.
pub fn effective_watermark(absolute: u64, relative: f64, available: Option<u64>) -> u64 {
    match available {
        Some(a) => absolute.min((a as f64 * relative) as u64),
        None => absolute,
    }
}

/// Gives freed heap back to the kernel, so that resident memory falls once the
/// messages that raised it are gone (glibc keeps freed pages otherwise). Also
/// called once after start-up, whose scans of a backlog leave freed buffers.
pub(crate) fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// How often at most freed heap is handed back while under the watermark, and
/// how far resident memory must exceed what the gauge counts (bodies and buffers
/// held) before it is: a drained backlog's freed buffers otherwise stay resident.
const IDLE_TRIM_EVERY: u32 = 10;
const IDLE_TRIM_SLACK: u64 = 64 * 1024 * 1024;

/// Reads resident memory every second into the gauge until `stop` changes.
pub async fn watch(gauge: Arc<MemoryGauge>, mut stop: watch::Receiver<bool>) {
    let mut ticks = 0u32;
    loop {
        crate::model::queue::refresh_coarse();
        ticks = ticks.wrapping_add(1);
        if let Some(mut rss) = resident_bytes() {
            let held = gauge.used() as u64;
            let over = gauge.counts_resident() && rss > gauge.high() as u64;
            let idle_trim = ticks.is_multiple_of(IDLE_TRIM_EVERY)
                && rss > held.saturating_mul(2).saturating_add(IDLE_TRIM_SLACK);
            if over || idle_trim {
                trim();
                rss = resident_bytes().unwrap_or(rss);
            }
            if gauge.set_resident(rss as usize) {
                if gauge.memory_over() {
                    tracing::warn!(
                        "memory alarm: {rss} bytes resident, above the high watermark ({}): publishers blocked",
                        gauge.high()
                    );
                } else {
                    tracing::info!("memory alarm cleared: {rss} bytes resident");
                }
            }
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_memory_is_read() {
        let rss = resident_bytes().expect("/proc/self/statm");
        assert!(rss > 1 << 20, "{rss}");
    }

    #[test]
    fn mem_total_is_in_kib() {
        let m = "MemTotal:       24576000 kB\nMemFree:  1 kB\n";
        assert_eq!(mem_total(m), Some(24_576_000 * 1024));
        assert_eq!(mem_total("garbage"), None);
    }

    #[test]
    fn a_cgroup_limit_caps_the_watermark() {
        let root = std::env::temp_dir().join(format!("warrenmq-cg-{}", std::process::id()));
        let dir = root.join("system.slice/broker.service");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("memory.max"), "536870912\n").unwrap();
        let limit = cgroup_limit("0::/system.slice/broker.service\n", &root);
        assert_eq!(limit, Some(512 << 20));
        assert_eq!(
            effective_watermark(1 << 30, 0.4, limit),
            (512u64 << 20) * 2 / 5
        );
        std::fs::write(dir.join("memory.max"), "max\n").unwrap();
        assert_eq!(
            cgroup_limit("0::/system.slice/broker.service\n", &root),
            None
        );
        let v1 = root.join("memory/docker/abc");
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::write(v1.join("memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        assert_eq!(cgroup_limit("4:memory:/docker/abc\n", &root), None);
        std::fs::write(v1.join("memory.limit_in_bytes"), "268435456\n").unwrap();
        assert_eq!(
            cgroup_limit("5:cpu,cpuacct:/x\n4:memory:/docker/abc\n", &root),
            Some(256 << 20)
        );
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(effective_watermark(1 << 30, 0.4, None), 1 << 30);
    }
}
