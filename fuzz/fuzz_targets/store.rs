//! The store's readers of disk bytes: index chunks, the body log's index
//! records and message records (with their content headers). See
//! `warrenmq_fuzz::harness::check_store` for what must hold.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warrenmq_fuzz::harness;

fuzz_target!(|data: &[u8]| {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(warrenmq_fuzz::overflow::install);
    harness::check_store(data);
});
