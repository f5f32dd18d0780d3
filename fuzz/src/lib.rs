//! Support for the fuzz targets in `fuzz_targets/`; see fuzz/README.md.
pub mod harness;

/// Makes stack overflows visible to libFuzzer.
///
/// Built without a sanitizer, a fuzz target has no alternate signal stack: libFuzzer's
/// SIGSEGV handler would run on the exhausted stack and the kernel would kill the
/// process without a word and without saving the input (Rust's own overflow handler
/// is not installed either, since libFuzzer owns `main`). So each thread that runs
/// broker or codec code gets an alternate stack (`alt_stack_for_this_thread`), and
/// SIGSEGV/SIGBUS go to a handler on it that names the signal and aborts: libFuzzer
/// then reports a deadly signal and writes the input to the artifacts directory.
pub mod overflow {
    use std::sync::Once;

    const ALT_STACK: usize = 1024 * 1024;

    /// Gives the calling thread an alternate signal stack (once per thread).
    pub fn alt_stack_for_this_thread() {
        thread_local!(static DONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
        if DONE.with(|d| d.replace(true)) {
            return;
        }
        let mem: &'static mut [u8] = Box::leak(vec![0u8; ALT_STACK].into_boxed_slice());
        let st = libc::stack_t {
            ss_sp: mem.as_mut_ptr().cast(),
            ss_flags: 0,
            ss_size: ALT_STACK,
        };
        // SAFETY: the memory is leaked, so it outlives the thread.
        unsafe { libc::sigaltstack(&st, std::ptr::null_mut()) };
    }

    extern "C" fn on_fault(sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
        let name: &[u8] = if sig == libc::SIGBUS {
            b"SIGBUS"
        } else {
            b"SIGSEGV"
        };
        // SAFETY: only async-signal-safe calls (write, abort).
        unsafe {
            let addr = (*info).si_addr() as usize;
            // No allocation in a signal handler: the message is formatted by hand.
            let mut buf = [0u8; 128];
            let mut n = 0;
            for &b in b"==fuzz== ".iter().chain(name).chain(b" at 0x".iter()) {
                buf[n] = b;
                n += 1;
            }
            for i in (0..16).rev() {
                buf[n] = b"0123456789abcdef"[(addr >> (i * 4)) & 0xf];
                n += 1;
            }
            for &b in b" (a stack overflow if near a thread's stack end)\n" {
                buf[n] = b;
                n += 1;
            }
            libc::write(2, buf.as_ptr().cast(), n);
            libc::abort();
        }
    }

    /// Routes SIGSEGV and SIGBUS to `on_fault` on the alternate stack; replaces
    /// libFuzzer's handlers for them, so call it from the target, after start-up.
    pub fn install() {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            alt_stack_for_this_thread();
            for sig in [libc::SIGSEGV, libc::SIGBUS] {
                // SAFETY: a plain sigaction with a handler that only writes and aborts.
                unsafe {
                    let mut sa: libc::sigaction = std::mem::zeroed();
                    sa.sa_sigaction = on_fault as *const () as usize;
                    sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
                    libc::sigemptyset(&mut sa.sa_mask);
                    libc::sigaction(sig, &sa, std::ptr::null_mut());
                }
            }
        });
    }
}
