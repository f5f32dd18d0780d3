//! Shared start-up for the integration tests: each test gets its own broker
//! in-process on an ephemeral port, so tests run in parallel and never share state.
//!
//! Setting `WARRENMQ_TEST_EXTERNAL=host:port` points the tests at an already
//! running broker instead (used to check expectations against RabbitMQ itself).
#![allow(dead_code)]

use std::net::SocketAddr;

use warrenmq::{BrokerHandle, Config};

pub struct TestBroker {
    pub addr: SocketAddr,
    handle: Option<BrokerHandle>,
    data_dir: Option<std::path::PathBuf>,
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(dir) = &self.data_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A fresh data directory under the system temp dir, unique to this test.
pub fn temp_data_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(unique("warrenmq-test"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl TestBroker {
    /// A broker started elsewhere (with its own configuration), reached at `addr`.
    pub fn at(addr: SocketAddr) -> TestBroker {
        TestBroker {
            addr,
            handle: None,
            data_dir: None,
        }
    }

    /// AMQP URI for guest/guest on the default vhost.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    pub fn is_external(&self) -> bool {
        self.handle.is_none()
    }

    pub async fn stop(mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown().await;
        }
    }
}

pub async fn start() -> TestBroker {
    if let Ok(ext) = std::env::var("WARRENMQ_TEST_EXTERNAL") {
        let addr = ext
            .parse()
            .expect("WARRENMQ_TEST_EXTERNAL must be host:port");
        return TestBroker {
            addr,
            handle: None,
            data_dir: None,
        };
    }
    let data_dir = temp_data_dir();
    let config = Config {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        data_dir: data_dir.clone(),
        ..Config::default()
    };
    let handle = warrenmq::start(config).await.expect("broker starts");
    TestBroker {
        addr: handle.local_addr(),
        handle: Some(handle),
        data_dir: Some(data_dir),
    }
}

/// A unique name per call, so tests against a shared external broker do not collide.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{t}-{}", N.fetch_add(1, Ordering::Relaxed))
}
