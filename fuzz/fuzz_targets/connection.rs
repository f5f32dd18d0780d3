//! The connection state machine: one broker per process, in-process, and for each
//! input one TCP connection that sends the protocol header, optionally a valid
//! handshake and channel.open (bit 0 of the first byte), then the input. After
//! each input a fresh connection must still get connection.start.
//! See `warrenmq_fuzz::harness` for the input format.
#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tokio::runtime::Runtime;
use warrenmq::{BrokerHandle, Config};
use warrenmq_fuzz::harness;

struct Fuzz {
    rt: Runtime,
    addr: SocketAddr,
    _broker: BrokerHandle,
}

fn fuzz() -> &'static Fuzz {
    static FUZZ: OnceLock<Fuzz> = OnceLock::new();
    FUZZ.get_or_init(|| {
        // A panic in a broker task is caught by tokio and never reaches the fuzzer:
        // abort instead, so that libFuzzer reports it with the input at hand.
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            previous(info);
            std::process::abort();
        }));
        warrenmq_fuzz::overflow::install();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .on_thread_start(warrenmq_fuzz::overflow::alt_stack_for_this_thread)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let data_dir = std::env::temp_dir().join(format!("warrenmq-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data_dir);
        std::fs::create_dir_all(&data_dir).expect("data dir");
        let config = Config {
            listen: vec!["127.0.0.1:0".parse().unwrap()],
            data_dir,
            ..Config::default()
        };
        let broker = rt.block_on(warrenmq::start(config)).expect("broker starts");
        Fuzz {
            addr: broker.local_addr(),
            rt,
            _broker: broker,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fuzz();
    f.rt.block_on(async {
        harness::play(f.addr, data).await;
        if let Err(e) = harness::check_alive(f.addr).await {
            panic!("the broker stopped serving after this input: {e}");
        }
    });
});
