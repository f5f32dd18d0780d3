//! The frame codec alone: arbitrary bytes through `protocol::read_frame` (and
//! `check_protocol_header`), with a frame_max taken from the first 4 bytes.
//! See `warrenmq_fuzz::harness::check_frames` for what must hold.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warrenmq_fuzz::harness;

/// The broker parses frames on tokio worker threads, whose stacks are 2 MiB; the
/// fuzzer calls this on the main thread (8 MiB by default). Limit the main stack to
/// the same 2 MiB so that a recursion deep enough to overflow a worker fails here too.
const STACK: libc::rlim_t = 2 * 1024 * 1024;

fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: plain getrlimit/setrlimit on this process.
        unsafe {
            let mut lim: libc::rlimit = std::mem::zeroed();
            if libc::getrlimit(libc::RLIMIT_STACK, &mut lim) == 0 && lim.rlim_cur > STACK {
                lim.rlim_cur = STACK;
                libc::setrlimit(libc::RLIMIT_STACK, &lim);
            }
        }
        warrenmq_fuzz::overflow::install();
    });
}

fuzz_target!(|data: &[u8]| {
    init();
    harness::check_frames(data);
});
